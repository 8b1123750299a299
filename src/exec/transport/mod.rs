//! How a run's devices reach each other when they are not all threads of one process: TCP
//! links between processes ("ranks"), each running a contiguous block of the plan's devices.
//! Frames are length-prefixed and checksummed (`frame`); a full mesh of links carries
//! activations, gradients, replica reductions, the step's meeting point and checkpoint state
//! (`mesh`), in the same fixed orders as in one process, so a run spread over ranks gives the
//! same bits as the same plan in one process. Ranks on different machines measure the link
//! between them as the mesh connects, before the first step (`probe`). The pipeline's `Transport` trait
//! (`exec::pipeline::transport`) is what the runtime sees; this module knows nothing of
//! engines or plans.

pub mod frame;
mod handshake;
pub mod mesh;
pub mod probe;
pub mod ranks;

use thiserror::Error;

pub use mesh::Mesh;
pub use probe::{LinkProbe, MeasuredLink};
pub use ranks::RankSpec;

/// What a point-to-point message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageKind {
    /// The output of a chunk's forward.
    Activation = 1,
    /// The gradient of a chunk's input, made by its backward.
    Gradient = 2,
    /// Tied embeddings' `TIE`: the embedding's table gradient to the head's device (micro-batch
    /// 0), the sum back (micro-batch 1).
    Tied = 3,
}

/// What one replica's values of a chunk (a `Reduce` frame) are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Collective {
    /// Its whole gradients, summed with the other replicas' (`AR<c>`).
    Sum = 1,
    /// Its gradients over the elements the receiving rank's replicas own (`RS<c>`).
    Scatter = 2,
    /// Its updated weights over the elements it owns (`AG<c>`).
    Gather = 3,
    /// Its shard of the chunk's optimizer state, for a checkpoint written elsewhere.
    OptimizerState = 4,
}

/// A message is named by what it is, the micro-batch and the chunk that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageKey {
    pub kind: MessageKind,
    pub mb: u32,
    pub chunk: u32,
}

/// Why ranks could not meet or went on without each other.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("--peers / --rank: {0}")]
    Peers(String),
    #[error("rank {rank} cannot listen on {addr}: {reason}")]
    Listen {
        rank: u32,
        addr: String,
        reason: String,
    },
    #[error("rank {rank} could not reach rank {peer} at {addr} within {secs} s: {reason}")]
    Connect {
        rank: u32,
        peer: u32,
        addr: String,
        secs: u64,
        reason: String,
    },
    #[error("the process at {addr} is not rank {peer} of this run: {reason}")]
    Mismatch {
        peer: u32,
        addr: String,
        reason: String,
    },
    #[error("lost rank {peer} ({addr}): {reason}")]
    PeerLost {
        peer: u32,
        addr: String,
        reason: String,
    },
    #[error("rank {peer} stopped: {reason}")]
    PeerFailed { peer: u32, reason: String },
    #[error("{0}")]
    Protocol(String),
}
