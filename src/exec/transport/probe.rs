//! Measuring the links between ranks on different machines, once, while the mesh connects:
//! after every link is greeted and before any reader starts or any step runs, so nothing the
//! training sends is touched (its bits stay the same). For each pair of machines the first
//! pair of ranks across it (in rank order) measures: the lower rank times a few empty round
//! trips (latency: half the median) and then a few MiB one way (bandwidth: the bytes over the
//! time until the other rank says it has them all, less one round trip). Every rank runs the
//! same list of pairs in the same order, so no two wait on each other in a circle. The rank
//! that measured hands the figures to `LinkProbe::report`; what becomes of them (the store) is
//! its caller's business.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::TransportError;
use super::frame::Frame;

/// Empty round trips timed for the latency.
const ROUND_TRIPS: usize = 5;
/// Frames of `BULK_FRAME_BYTES` sent one way for the bandwidth (4 MiB in all).
const BULK_FRAMES: usize = 4;
const BULK_FRAME_BYTES: usize = 1 << 20;
/// How long past the connect deadline a rank waits for a peer still meeting others.
const GRACE: Duration = Duration::from_secs(10);

/// What a rank needs to measure its links: where every rank runs, and who is told.
#[derive(Clone)]
pub struct LinkProbe {
    /// The machine each rank runs on, in rank order.
    pub machines: Vec<String>,
    /// Told each link this rank measured.
    pub report: Arc<dyn Fn(MeasuredLink) + Send + Sync>,
}

impl std::fmt::Debug for LinkProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkProbe")
            .field("machines", &self.machines)
            .finish_non_exhaustive()
    }
}

/// Two probes are equal when they name the same machines.
impl PartialEq for LinkProbe {
    fn eq(&self, other: &Self) -> bool {
        self.machines == other.machines
    }
}

impl Eq for LinkProbe {}

/// The link between two machines as one pair of ranks measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasuredLink {
    /// The measuring rank's machine, then its peer's.
    pub machines: (String, String),
    pub bytes_per_s: f64,
    /// One way, one message.
    pub latency_s: f64,
}

/// The pairs of ranks that measure: for each pair of machines, the first pair of ranks
/// across it in rank order, in that order.
pub fn pairs(machines: &[String]) -> Vec<(u32, u32)> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    let mut pairs = Vec::new();
    for (a, x) in machines.iter().enumerate() {
        for (b, y) in machines.iter().enumerate().skip(a + 1) {
            let key = if x <= y { (&**x, &**y) } else { (&**y, &**x) };
            if x != y && !seen.contains(&key) {
                seen.push(key);
                pairs.push((a as u32, b as u32));
            }
        }
    }
    pairs
}

/// Rank `me`'s part of every pair in `pairs` order, over `streams` (its greeted link to each
/// other rank, at `peers`, read by no one yet); the connect's `deadline`, plus a grace for
/// peers still meeting others.
pub(super) fn run(
    me: u32,
    peers: &[String],
    probe: &LinkProbe,
    streams: &[Option<TcpStream>],
    deadline: Instant,
) -> Result<(), TransportError> {
    if probe.machines.len() != peers.len() {
        return Err(TransportError::Peers(format!(
            "{} machines named for {} ranks: name one machine per rank",
            probe.machines.len(),
            peers.len()
        )));
    }
    let until = deadline.max(Instant::now()) + GRACE;
    for (a, b) in pairs(&probe.machines) {
        let peer = match me {
            _ if me == a => b,
            _ if me == b => a,
            _ => continue,
        };
        let lost = |reason: String| TransportError::PeerLost {
            peer,
            addr: peers[peer as usize].clone(),
            reason: format!("while measuring the link: {reason}"),
        };
        let stream = (streams.get(peer as usize).and_then(Option::as_ref))
            .ok_or_else(|| TransportError::Protocol(format!("no link to rank {peer}")))?;
        let _ = stream.set_nodelay(true);
        if me == a {
            let (bytes_per_s, latency_s) = measure(stream, peer, until).map_err(lost)?;
            (probe.report)(MeasuredLink {
                machines: (
                    probe.machines[a as usize].clone(),
                    probe.machines[b as usize].clone(),
                ),
                bytes_per_s,
                latency_s,
            });
        } else {
            answer(stream, peer, until).map_err(lost)?;
        }
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(None);
    }
    Ok(())
}

/// `(bytes per second, latency in seconds)` of the link to `peer` on `stream`.
fn measure(stream: &TcpStream, peer: u32, until: Instant) -> Result<(f64, f64), String> {
    let empty = Frame::Probe {
        payload: Vec::new(),
    }
    .encode();
    let mut trips = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let sent = Instant::now();
        write(stream, &empty, until)?;
        expect(stream, peer, until, 0)?;
        trips.push(sent.elapsed().as_secs_f64());
    }
    trips.sort_by(f64::total_cmp);
    let round_trip = trips[ROUND_TRIPS / 2];
    let bulk = Frame::Probe {
        payload: vec![0; BULK_FRAME_BYTES],
    }
    .encode();
    let sent = Instant::now();
    for _ in 0..BULK_FRAMES {
        write(stream, &bulk, until)?;
    }
    expect(stream, peer, until, 0)?;
    let elapsed = sent.elapsed().as_secs_f64();
    let moving = (elapsed - round_trip).max(elapsed / 10.0).max(1e-9);
    let bytes = (BULK_FRAMES * BULK_FRAME_BYTES) as f64;
    Ok((bytes / moving, (round_trip / 2.0).max(1e-9)))
}

/// The other side of `measure`: echoes each round trip, then says when the bulk arrived.
fn answer(stream: &TcpStream, peer: u32, until: Instant) -> Result<(), String> {
    let empty = Frame::Probe {
        payload: Vec::new(),
    }
    .encode();
    for _ in 0..ROUND_TRIPS {
        expect(stream, peer, until, 0)?;
        write(stream, &empty, until)?;
    }
    for _ in 0..BULK_FRAMES {
        expect(stream, peer, until, BULK_FRAME_BYTES)?;
    }
    write(stream, &empty, until)
}

/// Writes `bytes` by `until`.
fn write(mut stream: &TcpStream, bytes: &[u8], until: Instant) -> Result<(), String> {
    use std::io::Write;
    let wait = until.saturating_duration_since(Instant::now());
    let _ = stream.set_write_timeout(Some(wait.max(Duration::from_millis(1))));
    stream
        .write_all(bytes)
        .and_then(|()| stream.flush())
        .map_err(|e| format!("sending failed: {e}"))
}

/// Reads the next frame by `until`: a probe of `bytes` bytes, else an error saying what came.
fn expect(stream: &TcpStream, peer: u32, until: Instant, bytes: usize) -> Result<(), String> {
    let wait = until.saturating_duration_since(Instant::now());
    let _ = stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
    match Frame::read_from(&mut &*stream) {
        Ok(Frame::Probe { payload }) if payload.len() == bytes => Ok(()),
        Ok(Frame::Probe { payload }) => Err(format!(
            "rank {peer} sent {} probe bytes where {bytes} were due",
            payload.len()
        )),
        Ok(Frame::Abort { reason }) => Err(format!("rank {peer} stopped: {reason}")),
        Ok(other) => Err(format!(
            "rank {peer} sent a frame of kind {} where a probe was due (does it measure \
             links too?)",
            other.kind()
        )),
        Err(e) => Err(format!("nothing usable from rank {peer}: {e}")),
    }
}

#[cfg(test)]
mod tests;
