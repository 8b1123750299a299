//! The plan IR: per device, an ordered program of small value-type actions that the executor
//! runs literally (one thread per device, in order; no scheduling decisions in the runtime).
//!
//! Chunks are numbered in model order: chunk 0 starts with the embedding, the last chunk ends
//! with the head, and the activation of chunk `c` feeds chunk `c + 1`. `Plan::chunks` says which
//! device holds each chunk and which layers it has.
//!
//! | text | action | meaning |
//! |---|---|---|
//! | `F3.1` | forward | forward of micro-batch 3 through chunk 1, keeping its stash |
//! | `FD3.1` | forward, dropping | the same, but when it ends it keeps only the chunk input (token ids for chunk 0); an `R3.1` must come before `B3.1` |
//! | `R3.1` | recompute | rebuild the stash of (3, 1) from its kept input |
//! | `B3.1` | backward | backward of (3, 1); weight gradients accumulate in micro-batch order |
//! | `SA3.1>2` | send activation | send the output of `F3.1` to device 2 (which holds chunk 2) |
//! | `RA3.1<0` | receive activation | receive the output of `F3.1` from device 0: the input of (3, 2) |
//! | `SG3.2>1` | send gradient | send the input gradient made by `B3.2` to device 1 (holding chunk 1) |
//! | `RG3.2<0` | receive gradient | receive the input gradient made by `B3.2` from device 0 |
//! | `OFF:g` / `PRE:g` | offload / prefetch | copy group `g` to host and free it / copy it back |
//! | `STEP1` / `STEP1.2` | optimizer step | update chunk 1's weights (slice 0 / slice 2 of them) from the accumulated gradients |
//! | `AR1` | gradient reduction | sum chunk 1's gradients across the plan's replicas (after its last backward, before the device's first step) |
//! | `RS1` | sharded gradient reduction | the same sum, but each replica keeps only its shard of it (`reduction::shard`), and keeps and steps only that shard's optimizer state |
//! | `AG1` | weight gathering | after chunk 1's last step (of a chunk reduced by `RS1`): each replica hands the weights of its shard to every other replica |
//! | `TIE` | tied gradient sum | tied embeddings: the embedding's table gradient (chunk 0) plus the head's copy's (the last chunk), in that order, into both; on the devices holding those chunks, after their last backwards and before their reductions and steps |
//!
//! Groups `g`: `S3.1` the stash of (3, 1) (whatever of it is on the device), `W1` chunk 1's
//! weights, `G1` its gradients, `O1` / `O1.2` slice 0 / slice 2 of its optimizer state. The
//! plan's `optimizer_slices` (default 1) says how many slices each chunk has: equal contiguous
//! ranges of the chunk's flattened parameters, each stepped exactly once per step.
//!
//! Sends and receives pair up by (kind, micro-batch, chunk) and name the peer. A send does not
//! block its device; a receive blocks until the data has arrived. Offload and prefetch are
//! queued on the device's copy engines and do not block; an action that needs a group waits
//! until its prefetch has landed. A prefetch of weights, gradients or optimizer state starts
//! only when the offloads of such state issued before it on the device have finished, so two
//! chunks' optimizer states (say) are never on the device together by accident. A program describes one training step and repeats: a weight,
//! gradient or optimizer group starts the step where the program leaves it (on the host if the
//! program's last `OFF`/`PRE` of it is an `OFF`).
//!
//! Data parallelism: `Plan::replicas` copies of the pipeline run the same programs, each on
//! its own devices (replica `r`'s device `d` is run-wide device `r * devices() + d`) and each
//! on its own `microbatches` micro-batches of the step. Device numbers in chunks, actions and
//! peers are a replica's own. `AR<c>` meets the same action in every other replica: a
//! reduction of one chunk's gradients across the replicas of its device.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::error::PlanError;

/// A named set of tensors that offload and prefetch move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    Stash {
        mb: u32,
        chunk: u32,
    },
    Weights {
        chunk: u32,
    },
    Grads {
        chunk: u32,
    },
    /// Slice `slice` of the chunk's optimizer state (see `Plan::optimizer_slices`).
    Optimizer {
        chunk: u32,
        slice: u32,
    },
}

impl Group {
    pub fn chunk(self) -> u32 {
        match self {
            Group::Stash { chunk, .. }
            | Group::Weights { chunk }
            | Group::Grads { chunk }
            | Group::Optimizer { chunk, .. } => chunk,
        }
    }
}

/// One step of a device's program. Small and `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Forward {
        mb: u32,
        chunk: u32,
        drop_stash: bool,
    },
    Recompute {
        mb: u32,
        chunk: u32,
    },
    Backward {
        mb: u32,
        chunk: u32,
    },
    SendAct {
        mb: u32,
        chunk: u32,
        peer: u32,
    },
    RecvAct {
        mb: u32,
        chunk: u32,
        peer: u32,
    },
    SendGrad {
        mb: u32,
        chunk: u32,
        peer: u32,
    },
    RecvGrad {
        mb: u32,
        chunk: u32,
        peer: u32,
    },
    Offload(Group),
    Prefetch(Group),
    /// Optimizer step of slice `slice` of the chunk's parameters.
    Step {
        chunk: u32,
        slice: u32,
    },
    /// Sum of the chunk's gradients across the plan's replicas; `shard`: each replica keeps
    /// the sum of its own shard only, and its optimizer state is that shard's (ZeRO-1).
    Reduce {
        chunk: u32,
        shard: bool,
    },
    /// Each replica's updated shard of the chunk's weights copied to every other replica
    /// (after a sharded reduction and the chunk's steps).
    Gather {
        chunk: u32,
    },
    /// Tied embeddings: the gradient of the embedding's table (chunk 0) and of the head's copy
    /// of it (the last chunk) summed, the embedding's first, into both; the devices holding
    /// the two chunks meet (one device: a local sum).
    Tie,
}

impl Action {
    pub fn forward(mb: u32, chunk: u32) -> Self {
        Action::Forward {
            mb,
            chunk,
            drop_stash: false,
        }
    }

    /// True for actions that occupy the device's compute stream.
    pub fn is_compute(self) -> bool {
        matches!(
            self,
            Action::Forward { .. }
                | Action::Recompute { .. }
                | Action::Backward { .. }
                | Action::Step { .. }
        )
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Group::Stash { mb, chunk } => write!(f, "S{mb}.{chunk}"),
            Group::Weights { chunk } => write!(f, "W{chunk}"),
            Group::Grads { chunk } => write!(f, "G{chunk}"),
            Group::Optimizer { chunk, slice: 0 } => write!(f, "O{chunk}"),
            Group::Optimizer { chunk, slice } => write!(f, "O{chunk}.{slice}"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Forward {
                mb,
                chunk,
                drop_stash,
            } => {
                let kind = if drop_stash { "FD" } else { "F" };
                write!(f, "{kind}{mb}.{chunk}")
            }
            Action::Recompute { mb, chunk } => write!(f, "R{mb}.{chunk}"),
            Action::Backward { mb, chunk } => write!(f, "B{mb}.{chunk}"),
            Action::SendAct { mb, chunk, peer } => write!(f, "SA{mb}.{chunk}>{peer}"),
            Action::RecvAct { mb, chunk, peer } => write!(f, "RA{mb}.{chunk}<{peer}"),
            Action::SendGrad { mb, chunk, peer } => write!(f, "SG{mb}.{chunk}>{peer}"),
            Action::RecvGrad { mb, chunk, peer } => write!(f, "RG{mb}.{chunk}<{peer}"),
            Action::Offload(g) => write!(f, "OFF:{g}"),
            Action::Prefetch(g) => write!(f, "PRE:{g}"),
            Action::Step { chunk, slice: 0 } => write!(f, "STEP{chunk}"),
            Action::Step { chunk, slice } => write!(f, "STEP{chunk}.{slice}"),
            Action::Reduce {
                chunk,
                shard: false,
            } => write!(f, "AR{chunk}"),
            Action::Reduce { chunk, shard: true } => write!(f, "RS{chunk}"),
            Action::Gather { chunk } => write!(f, "AG{chunk}"),
            Action::Tie => write!(f, "TIE"),
        }
    }
}

fn parse_err(token: &str, message: &str) -> PlanError {
    PlanError::Parse {
        line: 0,
        token: token.to_string(),
        message: message.to_string(),
    }
}

fn number(token: &str, s: &str) -> Result<u32, PlanError> {
    s.parse()
        .map_err(|_| parse_err(token, &format!("`{s}` is not a number")))
}

/// `3.1` -> (3, 1)
fn mb_chunk(token: &str, s: &str) -> Result<(u32, u32), PlanError> {
    let (mb, chunk) = s
        .split_once('.')
        .ok_or_else(|| parse_err(token, "expected MICROBATCH.CHUNK"))?;
    Ok((number(token, mb)?, number(token, chunk)?))
}

/// `3` -> (3, 0), `3.2` -> (3, 2): a chunk and an optimizer slice (0 when left out).
fn chunk_slice(token: &str, s: &str) -> Result<(u32, u32), PlanError> {
    match s.split_once('.') {
        Some((c, k)) => Ok((number(token, c)?, number(token, k)?)),
        None => Ok((number(token, s)?, 0)),
    }
}

/// `3.1>2` -> (3, 1, 2)
fn mb_chunk_peer(token: &str, s: &str, sep: char) -> Result<(u32, u32, u32), PlanError> {
    let (left, peer) = s
        .split_once(sep)
        .ok_or_else(|| parse_err(token, &format!("expected MICROBATCH.CHUNK{sep}DEVICE")))?;
    let (mb, chunk) = mb_chunk(token, left)?;
    Ok((mb, chunk, number(token, peer)?))
}

impl FromStr for Group {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        let rest = s.get(1..).unwrap_or("");
        match s.chars().next() {
            Some('S') => {
                let (mb, chunk) = mb_chunk(s, rest)?;
                Ok(Group::Stash { mb, chunk })
            }
            Some('W') => Ok(Group::Weights {
                chunk: number(s, rest)?,
            }),
            Some('G') => Ok(Group::Grads {
                chunk: number(s, rest)?,
            }),
            Some('O') => {
                let (chunk, slice) = chunk_slice(s, rest)?;
                Ok(Group::Optimizer { chunk, slice })
            }
            _ => Err(parse_err(
                s,
                "a group is S<mb>.<chunk>, W<c>, G<c> or O<c>[.<slice>]",
            )),
        }
    }
}

impl FromStr for Action {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Self, PlanError> {
        // Longest prefixes first: `FD` before `F`, `STEP` before `SA`/`SG`.
        if s == "TIE" {
            return Ok(Action::Tie);
        }
        if let Some(g) = s.strip_prefix("OFF:") {
            return Ok(Action::Offload(g.parse()?));
        }
        if let Some(g) = s.strip_prefix("PRE:") {
            return Ok(Action::Prefetch(g.parse()?));
        }
        if let Some(c) = s.strip_prefix("STEP") {
            let (chunk, slice) = chunk_slice(s, c)?;
            return Ok(Action::Step { chunk, slice });
        }
        let two = |p: &str| s.strip_prefix(p);
        for (prefix, shard) in [("AR", false), ("RS", true)] {
            if let Some(c) = two(prefix) {
                return Ok(Action::Reduce {
                    chunk: number(s, c)?,
                    shard,
                });
            }
        }
        if let Some(c) = two("AG") {
            return Ok(Action::Gather {
                chunk: number(s, c)?,
            });
        }
        if let Some(r) = two("FD") {
            let (mb, chunk) = mb_chunk(s, r)?;
            return Ok(Action::Forward {
                mb,
                chunk,
                drop_stash: true,
            });
        }
        if let Some(r) = two("SA") {
            let (mb, chunk, peer) = mb_chunk_peer(s, r, '>')?;
            return Ok(Action::SendAct { mb, chunk, peer });
        }
        if let Some(r) = two("RA") {
            let (mb, chunk, peer) = mb_chunk_peer(s, r, '<')?;
            return Ok(Action::RecvAct { mb, chunk, peer });
        }
        if let Some(r) = two("SG") {
            let (mb, chunk, peer) = mb_chunk_peer(s, r, '>')?;
            return Ok(Action::SendGrad { mb, chunk, peer });
        }
        if let Some(r) = two("RG") {
            let (mb, chunk, peer) = mb_chunk_peer(s, r, '<')?;
            return Ok(Action::RecvGrad { mb, chunk, peer });
        }
        let rest = s.get(1..).unwrap_or("");
        match s.chars().next() {
            Some('F') => {
                let (mb, chunk) = mb_chunk(s, rest)?;
                Ok(Action::forward(mb, chunk))
            }
            Some('R') => {
                let (mb, chunk) = mb_chunk(s, rest)?;
                Ok(Action::Recompute { mb, chunk })
            }
            Some('B') => {
                let (mb, chunk) = mb_chunk(s, rest)?;
                Ok(Action::Backward { mb, chunk })
            }
            _ => Err(parse_err(s, "unknown action")),
        }
    }
}

impl Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn one() -> u32 {
    1
}

/// Which device holds a chunk and what the chunk is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpec {
    pub device: u32,
    pub embedding: bool,
    /// Decoder layers `first_layer..end_layer`.
    pub first_layer: u32,
    pub end_layer: u32,
    pub head: bool,
}

impl ChunkSpec {
    pub fn layers(&self) -> u32 {
        self.end_layer - self.first_layer
    }
    pub fn parts(&self) -> Vec<super::inventory::Part> {
        super::memory::chunk_parts(self.embedding, self.layers() as usize, self.head)
    }
}

/// A whole plan: chunk placement and one program per device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub microbatches: u32,
    /// Each chunk's optimizer state and step come in this many slices: equal contiguous
    /// ranges of its flattened parameters (Adam is elementwise, so any split is exact).
    #[serde(default = "one")]
    pub optimizer_slices: u32,
    /// Data-parallel copies of the pipeline (see the module's header); `microbatches` is
    /// each one's share of the step.
    #[serde(default = "one")]
    pub replicas: u32,
    pub chunks: Vec<ChunkSpec>,
    pub programs: Vec<Vec<Action>>,
}

impl Plan {
    /// One replica's devices: the programs.
    pub fn devices(&self) -> usize {
        self.programs.len()
    }

    /// Every replica's devices.
    pub fn total_devices(&self) -> usize {
        self.programs.len() * self.replicas as usize
    }

    /// Whether `chunk`'s optimizer state is sharded over the replicas (reduced by `RS<c>`).
    pub fn sharded(&self, chunk: u32) -> bool {
        (self.programs.iter().flatten()).any(|a| *a == Action::Reduce { chunk, shard: true })
    }

    /// The device holding `chunk`, if the chunk exists.
    pub fn device_of(&self, chunk: u32) -> Option<u32> {
        self.chunks.get(chunk as usize).map(|c| c.device)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "microbatches {}", self.microbatches)?;
        if self.optimizer_slices != 1 {
            writeln!(f, "optimizer_slices {}", self.optimizer_slices)?;
        }
        if self.replicas != 1 {
            writeln!(f, "replicas {}", self.replicas)?;
        }
        for (i, c) in self.chunks.iter().enumerate() {
            write!(f, "chunk {i} device {}", c.device)?;
            if c.embedding {
                write!(f, " embedding")?;
            }
            write!(f, " layers {}..{}", c.first_layer, c.end_layer)?;
            if c.head {
                write!(f, " head")?;
            }
            writeln!(f)?;
        }
        for (d, program) in self.programs.iter().enumerate() {
            write!(f, "device {d}:")?;
            for a in program {
                write!(f, " {a}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn at_line(line: usize, e: PlanError) -> PlanError {
    match e {
        PlanError::Parse { token, message, .. } => PlanError::Parse {
            line,
            token,
            message,
        },
        other => other,
    }
}

impl FromStr for Plan {
    type Err = PlanError;
    fn from_str(text: &str) -> Result<Self, PlanError> {
        let mut plan = Plan {
            microbatches: 0,
            optimizer_slices: 1,
            replicas: 1,
            chunks: vec![],
            programs: vec![],
        };
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let bad = |msg: &str| PlanError::Parse {
                line,
                token: l.to_string(),
                message: msg.to_string(),
            };
            if let Some(n) = l.strip_prefix("microbatches ") {
                plan.microbatches = n.trim().parse().map_err(|_| bad("expected a number"))?;
            } else if let Some(n) = l.strip_prefix("optimizer_slices ") {
                plan.optimizer_slices = n.trim().parse().map_err(|_| bad("expected a number"))?;
            } else if let Some(n) = l.strip_prefix("replicas ") {
                plan.replicas = n.trim().parse().map_err(|_| bad("expected a number"))?;
            } else if let Some(rest) = l.strip_prefix("chunk ") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let idx: usize = words
                    .first()
                    .and_then(|w| w.parse().ok())
                    .ok_or_else(|| bad("expected `chunk N device D ...`"))?;
                if idx != plan.chunks.len() {
                    return Err(bad("chunks must be listed in order from 0"));
                }
                let mut spec = ChunkSpec {
                    device: 0,
                    embedding: false,
                    first_layer: 0,
                    end_layer: 0,
                    head: false,
                };
                let mut k = 1;
                while k < words.len() {
                    match words[k] {
                        "device" => {
                            k += 1;
                            spec.device = words
                                .get(k)
                                .and_then(|w| w.parse().ok())
                                .ok_or_else(|| bad("expected a device number"))?;
                        }
                        "embedding" => spec.embedding = true,
                        "head" => spec.head = true,
                        "layers" => {
                            k += 1;
                            let (a, b) = words
                                .get(k)
                                .and_then(|w| w.split_once(".."))
                                .ok_or_else(|| bad("expected layers A..B"))?;
                            spec.first_layer = a.parse().map_err(|_| bad("bad layer range"))?;
                            spec.end_layer = b.parse().map_err(|_| bad("bad layer range"))?;
                            if spec.end_layer < spec.first_layer {
                                return Err(bad("layer range runs backwards"));
                            }
                        }
                        _ => return Err(bad("unknown word in chunk line")),
                    }
                    k += 1;
                }
                plan.chunks.push(spec);
            } else if let Some(rest) = l.strip_prefix("device ") {
                let (d, actions) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("expected `device N: ACTIONS`"))?;
                let d: usize = d.trim().parse().map_err(|_| bad("bad device number"))?;
                if d != plan.programs.len() {
                    return Err(bad("devices must be listed in order from 0"));
                }
                let program = actions
                    .split_whitespace()
                    .map(|t| t.parse().map_err(|e| at_line(line, e)))
                    .collect::<Result<Vec<Action>, _>>()?;
                plan.programs.push(program);
            } else {
                return Err(bad(
                    "expected `microbatches`, `optimizer_slices`, `replicas`, `chunk` or `device`",
                ));
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests;
