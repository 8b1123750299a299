//! How two ranks greet when a link opens: each names its rank, the number of ranks and the
//! run's fingerprint, and a greeting that does not fit this run is answered with the reason
//! and refused, so both sides say why before any tensor moves.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::frame::Frame;
use super::{RankSpec, TransportError};

/// Reaches rank `peer`, retrying until `deadline`, and checks it belongs to this run.
pub fn dial(
    spec: &RankSpec,
    peer: u32,
    fingerprint: u64,
    deadline: Instant,
) -> Result<TcpStream, TransportError> {
    let addr = &spec.peers[peer as usize];
    let mut last = String::from("no address");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(TransportError::Connect {
                rank: spec.rank,
                peer,
                addr: addr.clone(),
                secs: spec.connect_timeout.as_secs(),
                reason: last,
            });
        }
        let resolved = addr.to_socket_addrs().map(|mut a| a.next());
        match resolved {
            Ok(Some(sa)) => match TcpStream::connect_timeout(&sa, remaining) {
                Ok(stream) => {
                    let hello = hello(spec, fingerprint);
                    hello
                        .write_to(&mut &stream)
                        .map_err(|e| mismatch(peer, addr, e.to_string()))?;
                    check_hello(&stream, spec, Some(peer), fingerprint, deadline)?;
                    return Ok(stream);
                }
                Err(e) => last = e.to_string(),
            },
            Ok(None) => last = "the name resolves to no address".into(),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks the greeting of a rank that dialled this one and answers it; the peer's rank.
pub fn greet_incoming(
    stream: &TcpStream,
    spec: &RankSpec,
    fingerprint: u64,
    deadline: Instant,
) -> Result<u32, TransportError> {
    let _ = stream.set_nonblocking(false);
    let peer = check_hello(stream, spec, None, fingerprint, deadline)?;
    hello(spec, fingerprint)
        .write_to(&mut &*stream)
        .map_err(|e| mismatch(peer, &spec.peers[peer as usize], e.to_string()))?;
    Ok(peer)
}

fn hello(spec: &RankSpec, fingerprint: u64) -> Frame {
    Frame::Hello {
        rank: spec.rank,
        ranks: spec.ranks(),
        fingerprint,
    }
}

pub fn mismatch(peer: u32, addr: &str, reason: String) -> TransportError {
    TransportError::Mismatch {
        peer,
        addr: addr.to_string(),
        reason,
    }
}

/// Reads a greeting (by `deadline`) and checks it: the expected rank (`expect`, or any higher
/// rank when accepting), the same number of ranks and the same run. A refused greeting is
/// answered with the reason, so both sides say why.
fn check_hello(
    stream: &TcpStream,
    spec: &RankSpec,
    expect: Option<u32>,
    fingerprint: u64,
    deadline: Instant,
) -> Result<u32, TransportError> {
    let wait = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
    let shown = expect.map_or_else(|| "a peer".to_string(), |p| spec.peers[p as usize].clone());
    let frame = Frame::read_from(&mut &*stream);
    let _ = stream.set_read_timeout(None);
    let refuse = |peer: u32, reason: String| {
        let _ = Frame::Abort {
            reason: reason.clone(),
        }
        .write_to(&mut &*stream);
        mismatch(peer, &shown, reason)
    };
    let (rank, ranks, theirs) = match frame {
        Ok(Frame::Hello {
            rank,
            ranks,
            fingerprint,
        }) => (rank, ranks, fingerprint),
        Ok(Frame::Abort { reason }) => {
            return Err(mismatch(expect.unwrap_or(u32::MAX), &shown, reason));
        }
        Ok(other) => {
            return Err(refuse(
                expect.unwrap_or(u32::MAX),
                format!("it spoke before greeting ({other:?})"),
            ));
        }
        Err(e) => {
            return Err(mismatch(
                expect.unwrap_or(u32::MAX),
                &shown,
                format!("no greeting: {e}"),
            ));
        }
    };
    let wanted = match expect {
        Some(p) => rank == p,
        None => rank > spec.rank && rank < spec.ranks(),
    };
    if !wanted || ranks != spec.ranks() {
        return Err(refuse(
            rank,
            format!(
                "it says it is rank {rank} of {ranks}; this is rank {} of {}",
                spec.rank,
                spec.ranks()
            ),
        ));
    }
    if theirs != fingerprint {
        return Err(refuse(
            rank,
            format!(
                "it runs another job or plan (fingerprint {theirs:016x}, this rank's \
                 {fingerprint:016x}): start every rank with the same job, devices and flags"
            ),
        ));
    }
    Ok(rank)
}
