//! A full mesh of TCP links between a run's ranks. Rank `R` listens on its own address, dials
//! every lower rank (retrying until the deadline) and accepts every higher one; both sides
//! greet with their rank and the run's fingerprint, so a process of another run or plan is
//! refused before any tensor moves. When the spec names the ranks' machines, the links between
//! machines are measured then, before anything else crosses (`probe`). One reader thread per link files what arrives by step
//! (a fast rank may already send the next step's tensors); a link that breaks without a
//! goodbye, a peer that reports its own failure, or a link silent for longer than the
//! silence allowed (every link carries a heartbeat each second) fails every wait at once.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::exec::model::PartId;

use super::frame::{Frame, FrameError, ReplicaGrads, WireTensor};
use super::handshake::{dial, greet_incoming, mismatch};
use super::{Collective, MessageKey, RankSpec, TransportError};

/// A rank's share of the step's meeting point.
pub type MeetShare = (Vec<(PartId, f64)>, Vec<(u32, f64)>);

/// What has arrived from the other ranks and not been taken yet.
#[derive(Default)]
pub struct Inbox {
    /// By (step, receiving device, message).
    pub tensors: HashMap<(u64, u32, MessageKey), WireTensor>,
    /// By (step, stage, chunk, replica, what for): per part, per tensor.
    pub reductions: HashMap<(u64, u32, u32, u32, Collective), ReplicaGrads>,
    /// By (step, sending rank).
    pub meets: HashMap<(u64, u32), MeetShare>,
    /// By step: the staging directory rank 0 named for the checkpoint after it.
    pub checkpoints: HashMap<u64, String>,
    /// (step, sending rank): that rank's shard of the checkpoint after `step` is written.
    pub written: HashSet<(u64, u32)>,
    /// By (sending rank, key): what it said to set up a transport (`Frame::Setup`).
    pub setup: HashMap<(u32, String), Vec<u8>>,
    failure: Option<TransportError>,
    said_bye: Vec<bool>,
    closing: bool,
}

/// What runs when the mesh fails (`Mesh::on_failure`).
type OnFailure = Box<dyn FnOnce() + Send>;

struct Shared {
    inbox: Mutex<Inbox>,
    changed: Condvar,
    /// What runs once the mesh fails or this rank aborts; `None` once it has run.
    on_failure: Mutex<Option<Vec<OnFailure>>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs (once) what waits for the mesh's failure.
    fn failed(&self) {
        let hooks = (self.on_failure.lock().unwrap_or_else(|e| e.into_inner())).take();
        hooks.into_iter().flatten().for_each(|hook| hook());
    }
}

struct Link {
    addr: String,
    writer: Mutex<TcpStream>,
}

/// This rank's links to every other rank.
pub struct Mesh {
    rank: u32,
    links: Arc<Vec<Option<Link>>>,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    /// Cleared to stop the heartbeat.
    beating: Arc<AtomicBool>,
    heart: Option<JoinHandle<()>>,
}

/// How often a wait looks at its stop condition even when nothing arrives.
const POLL: Duration = Duration::from_millis(100);
/// How often every link carries a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a link may stay silent before its peer is given up: it hangs, or the network
/// between is cut.
pub const SILENCE: Duration = Duration::from_secs(10);

impl Mesh {
    /// Meets every other rank of `spec` that runs the same `fingerprint`, or fails by the
    /// spec's deadline naming the rank that did not come.
    pub fn connect(spec: &RankSpec, fingerprint: u64) -> Result<Mesh, TransportError> {
        Mesh::connect_with(spec, fingerprint, SILENCE)
    }

    /// As `connect`, giving up a link after `silence` without a frame.
    pub fn connect_with(
        spec: &RankSpec,
        fingerprint: u64,
        silence: Duration,
    ) -> Result<Mesh, TransportError> {
        let deadline = Instant::now() + spec.connect_timeout;
        let (me, ranks) = (spec.rank, spec.ranks());
        let own = &spec.peers[me as usize];
        let listen_error = |reason: String| TransportError::Listen {
            rank: me,
            addr: own.clone(),
            reason,
        };
        let bound;
        let listener = match &spec.listener {
            Some(held) => &*held.0,
            None => {
                bound = TcpListener::bind(own).map_err(|e| listen_error(e.to_string()))?;
                &bound
            }
        };
        let mut streams: Vec<Option<TcpStream>> = (0..ranks).map(|_| None).collect();
        for peer in 0..me {
            streams[peer as usize] = Some(dial(spec, peer, fingerprint, deadline)?);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| listen_error(e.to_string()))?;
        while let Some(missing) = (me + 1..ranks).find(|&p| streams[p as usize].is_none()) {
            match listener.accept() {
                Ok((stream, _)) => {
                    let peer = greet_incoming(&stream, spec, fingerprint, deadline)?;
                    if streams[peer as usize].is_some() {
                        return Err(mismatch(
                            peer,
                            &spec.peers[peer as usize],
                            "a second process says it is this rank".into(),
                        ));
                    }
                    streams[peer as usize] = Some(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(TransportError::Connect {
                            rank: me,
                            peer: missing,
                            addr: spec.peers[missing as usize].clone(),
                            secs: spec.connect_timeout.as_secs(),
                            reason: "it never connected".into(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(listen_error(e.to_string())),
            }
        }
        if let Some(probe) = &spec.probe {
            super::probe::run(me, &spec.peers, probe, &streams, deadline)?;
        }
        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox {
                said_bye: vec![false; ranks as usize],
                ..Inbox::default()
            }),
            changed: Condvar::new(),
            on_failure: Mutex::new(Some(Vec::new())),
        });
        let mut links = Vec::with_capacity(ranks as usize);
        let mut readers = Vec::new();
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                links.push(None);
                continue;
            };
            let addr = spec.peers[peer].clone();
            let _ = stream.set_nodelay(true);
            let reading = stream
                .try_clone()
                .and_then(|s| s.set_read_timeout(Some(silence)).map(|()| s))
                .map_err(|e| TransportError::PeerLost {
                    peer: peer as u32,
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
            let (shared, from) = (Arc::clone(&shared), (peer as u32, addr.clone()));
            readers.push(std::thread::spawn(move || {
                read_link(reading, from, silence, &shared)
            }));
            links.push(Some(Link {
                addr,
                writer: Mutex::new(stream),
            }));
        }
        let links = Arc::new(links);
        let beating = Arc::new(AtomicBool::new(true));
        let heart = {
            let (links, beating) = (Arc::clone(&links), Arc::clone(&beating));
            std::thread::spawn(move || beat(&links, &beating))
        };
        Ok(Mesh {
            rank: me,
            links,
            shared,
            readers,
            beating,
            heart: Some(heart),
        })
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn ranks(&self) -> u32 {
        self.links.len() as u32
    }

    /// Sends `frame` to rank `peer`; a link that cannot take it fails the mesh.
    pub fn send(&self, peer: u32, frame: &Frame) -> Result<(), TransportError> {
        let link = self
            .links
            .get(peer as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| TransportError::Protocol(format!("no link to rank {peer}")))?;
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        let bytes = frame.encode();
        let mut writer = link.writer.lock().unwrap_or_else(|e| e.into_inner());
        writer
            .write_all(&bytes)
            .and_then(|()| writer.flush())
            .map_err(|e| {
                self.fail(TransportError::PeerLost {
                    peer,
                    addr: link.addr.clone(),
                    reason: if broke(&e) {
                        format!("sending failed ({e}): the process ended or was killed")
                    } else {
                        format!("sending failed: {e}")
                    },
                })
            })
    }

    /// Waits until `take` finds what it looks for in the inbox (`Some`), `stopped` says this
    /// process gave up (`None`), or the mesh failed (`Err`).
    pub fn wait<T>(
        &self,
        mut take: impl FnMut(&mut Inbox) -> Option<T>,
        stopped: &dyn Fn() -> bool,
    ) -> Result<Option<T>, TransportError> {
        let mut inbox = self.shared.lock();
        loop {
            if let Some(found) = take(&mut inbox) {
                return Ok(Some(found));
            }
            if let Some(failure) = &inbox.failure {
                return Err(failure.clone());
            }
            if stopped() {
                return Ok(None);
            }
            inbox = self
                .shared
                .changed
                .wait_timeout(inbox, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Wakes every wait so it looks at its stop condition again.
    pub fn wake(&self) {
        let _inbox = self.shared.lock();
        self.shared.changed.notify_all();
    }

    /// The first failure seen, if any.
    pub fn failure(&self) -> Option<TransportError> {
        self.shared.lock().failure.clone()
    }

    /// Records `failure` unless one is there already and wakes every wait; returns it.
    fn fail(&self, failure: TransportError) -> TransportError {
        record(&self.shared, failure)
    }

    /// Runs `hook` once, when the mesh first fails (a peer lost or failed) or this rank
    /// aborts: at once if that has happened. For what a failed wait cannot reach, such as
    /// device work waiting on the other ranks outside the mesh.
    pub fn on_failure(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = self
            .shared
            .on_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match hooks.as_mut() {
            Some(waiting) => waiting.push(Box::new(hook)),
            None => {
                drop(hooks);
                hook();
            }
        }
    }

    /// Tells every other rank this one stopped with `reason` (best effort: a rank that is
    /// gone already cannot be told).
    pub fn abort(&self, reason: &str) {
        let frame = Frame::Abort {
            reason: reason.to_string(),
        };
        for peer in 0..self.ranks() {
            if peer != self.rank {
                let _ = self.send(peer, &frame);
            }
        }
        self.shared.failed();
    }

    /// Sends `frame` to every other rank in rank order, up to the first link that cannot
    /// take it (which fails the mesh).
    pub fn send_to_others(&self, frame: &Frame) -> Result<(), TransportError> {
        (0..self.ranks())
            .filter(|&peer| peer != self.rank)
            .try_for_each(|peer| self.send(peer, frame))
    }

    /// Says goodbye to every rank and waits (up to `within`) for theirs, so nothing still in
    /// flight is cut off when the processes end.
    pub fn close(&self, within: Duration) -> Result<(), TransportError> {
        self.beating.store(false, Ordering::SeqCst);
        self.send_to_others(&Frame::Bye)?;
        let deadline = Instant::now() + within;
        let me = self.rank as usize;
        let all_said_bye = |inbox: &mut Inbox| {
            let done = inbox
                .said_bye
                .iter()
                .enumerate()
                .all(|(p, &b)| b || p == me);
            if done {
                inbox.closing = true;
            }
            done.then_some(())
        };
        match self.wait(all_said_bye, &|| Instant::now() >= deadline)? {
            Some(()) => Ok(()),
            None => Err(TransportError::Protocol(format!(
                "the other ranks did not finish within {} s of this one",
                within.as_secs()
            ))),
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.beating.store(false, Ordering::SeqCst);
        if let Some(heart) = self.heart.take() {
            let _ = heart.join();
        }
        for link in self.links.iter().flatten() {
            let writer = link.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writer.shutdown(Shutdown::Both);
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// Sends a heartbeat on every link each `HEARTBEAT` until `beating` is cleared; a link busy
/// with a frame is alive already and is skipped.
fn beat(links: &[Option<Link>], beating: &AtomicBool) {
    let frame = Frame::Beat.encode();
    let tick = Duration::from_millis(50);
    let mut since = Duration::ZERO;
    while beating.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        since += tick;
        if since < HEARTBEAT {
            continue;
        }
        since = Duration::ZERO;
        for link in links.iter().flatten() {
            if let Ok(mut writer) = link.writer.try_lock() {
                let _ = writer.write_all(&frame);
            }
        }
    }
}

fn record(shared: &Shared, failure: TransportError) -> TransportError {
    let mut inbox = shared.lock();
    let first = inbox.failure.get_or_insert(failure).clone();
    shared.changed.notify_all();
    drop(inbox);
    shared.failed();
    first
}

/// Whether `e` says the other end of a link is gone (reset, closed under a write or a read).
fn broke(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        e.kind(),
        BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof
    )
}

/// Files every frame from rank `peer` until it says goodbye or the link breaks.
fn read_link(stream: TcpStream, (peer, addr): (u32, String), silence: Duration, shared: &Shared) {
    let mut input = BufReader::with_capacity(1 << 16, stream);
    loop {
        let frame = match Frame::read_from(&mut input) {
            Ok(f) => f,
            Err(e) => {
                let inbox = shared.lock();
                if inbox.closing || inbox.said_bye[peer as usize] {
                    return;
                }
                drop(inbox);
                let reason = match e {
                    FrameError::Closed => {
                        "the connection closed without a goodbye (the process ended or was \
                         killed)"
                            .to_string()
                    }
                    FrameError::Io(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        format!(
                            "nothing heard for {} s (the process hangs or the network is cut)",
                            silence.as_secs_f64()
                        )
                    }
                    FrameError::Io(e) if broke(&e) => {
                        format!("the connection broke ({e}): the process ended or was killed")
                    }
                    FrameError::Truncated(what) => format!(
                        "the connection closed in the middle of a frame ({what}): the process \
                         ended or was killed"
                    ),
                    other => other.to_string(),
                };
                record(
                    shared,
                    TransportError::PeerLost {
                        peer,
                        addr: addr.clone(),
                        reason,
                    },
                );
                return;
            }
        };
        let mut inbox = shared.lock();
        match frame {
            Frame::Tensor {
                step,
                to,
                key,
                tensor,
            } => {
                inbox.tensors.insert((step, to, key), tensor);
            }
            Frame::Reduce {
                step,
                stage,
                chunk,
                replica,
                what,
                grads,
            } => {
                inbox
                    .reductions
                    .insert((step, stage, chunk, replica, what), grads);
            }
            Frame::Meet {
                step,
                squares,
                losses,
            } => {
                inbox.meets.insert((step, peer), (squares, losses));
            }
            Frame::Checkpoint { step, staging } => {
                inbox.checkpoints.insert(step, staging);
            }
            Frame::Written { step } => {
                inbox.written.insert((step, peer));
            }
            Frame::Setup { key, bytes } => {
                inbox.setup.insert((peer, key), bytes);
            }
            Frame::Abort { reason } => {
                inbox
                    .failure
                    .get_or_insert(TransportError::PeerFailed { peer, reason });
            }
            Frame::Bye => {
                inbox.said_bye[peer as usize] = true;
                shared.changed.notify_all();
                return;
            }
            Frame::Beat => continue,
            Frame::Hello { .. } => {
                inbox.failure.get_or_insert(TransportError::PeerLost {
                    peer,
                    addr: addr.clone(),
                    reason: "it greeted again in the middle of the run".into(),
                });
            }
            Frame::Probe { .. } => {
                inbox.failure.get_or_insert(TransportError::PeerLost {
                    peer,
                    addr: addr.clone(),
                    reason: "it measures the link, which this rank does not (the ranks were \
                             told different machines)"
                        .into(),
                });
            }
        }
        shared.changed.notify_all();
        if inbox.failure.is_some() {
            drop(inbox);
            shared.failed();
        }
    }
}

#[cfg(test)]
mod tests;
