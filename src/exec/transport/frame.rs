//! What crosses a TCP link between ranks, one frame at a time. A frame is
//! `magic (4) | kind (1) | payload length (u64) | payload | CRC-32C (u32)`, little-endian,
//! the checksum covering kind, length and payload. A frame that is cut short, fails its
//! checksum or does not parse is an error naming what was wrong, never a tensor with other
//! numbers in it.

use half::bf16;
use std::io::{self, Read, Write};

use thiserror::Error;

use crate::exec::model::PartId;

use super::{Collective, MessageKey};

#[cfg(target_endian = "big")]
compile_error!("frames carry f32 data in host order, which must be little-endian");

const MAGIC: [u8; 4] = *b"CPF1";
/// No frame is larger: a length beyond it is a corrupted header, not an allocation to try.
pub const MAX_PAYLOAD: u64 = 1 << 36;
/// CRC-32C, sixteen bytes a table step (the checksum is on every byte that crosses a link).
const CASTAGNOLI: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("the connection closed")]
    Closed,
    #[error("truncated frame: {0}")]
    Truncated(String),
    #[error("not a chronospipe frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("frame of {0} bytes is larger than the {MAX_PAYLOAD} a frame may hold")]
    TooLarge(u64),
    #[error("checksum mismatch: the frame says {expected:08x}, its bytes give {actual:08x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One replica's gradients of a chunk as they travel: per part, per tensor, its values.
pub type ReplicaGrads = Vec<Vec<Vec<f32>>>;

/// A host tensor as it travels.
#[derive(Debug, Clone, PartialEq)]
pub struct WireTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// Every value is a bf16's, widened (a bf16 tensor's): it travels in 2 bytes, exactly.
    pub bf16: bool,
}

/// Everything ranks say to each other.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The first frame each way: who is speaking and which run (plan) it belongs to.
    Hello {
        rank: u32,
        ranks: u32,
        fingerprint: u64,
    },
    /// An activation or gradient sent to run-wide device `to`.
    Tensor {
        step: u64,
        to: u32,
        key: MessageKey,
        tensor: WireTensor,
    },
    /// One replica's values of a chunk (per part, per tensor) for a reduction (`AR<c>`,
    /// `RS<c>`), a gathering (`AG<c>`) or a checkpoint (`what`).
    Reduce {
        step: u64,
        stage: u32,
        chunk: u32,
        replica: u32,
        what: Collective,
        grads: ReplicaGrads,
    },
    /// A rank's share of the step's meeting point: its parts' squared gradient norms and
    /// its heads' summed losses per micro-batch.
    Meet {
        step: u64,
        squares: Vec<(PartId, f64)>,
        losses: Vec<(u32, f64)>,
    },
    /// Rank 0 to every other rank: write your shard of the checkpoint after `step` into the
    /// staging directory named `staging`, beside the checkpoint's directory.
    Checkpoint { step: u64, staging: String },
    /// To rank 0: the sender's shard of the checkpoint after `step` is written and synced.
    Written { step: u64 },
    /// The sender stopped with this error; every rank stops.
    Abort { reason: String },
    /// The sender is done and sends nothing more.
    Bye,
    /// Nothing to say, but alive: sent on a quiet link so a silent one means trouble.
    Beat,
    /// Measuring the link before the first step (`probe`): bytes that mean nothing.
    Probe { payload: Vec<u8> },
    /// What a transport between the ranks' devices needs before the first step, under its
    /// `key` (a rank's GPU ids, an NCCL unique id).
    Setup { key: String, bytes: Vec<u8> },
}

impl Frame {
    /// The kind byte that starts the frame on the wire.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::Tensor { .. } => 2,
            Frame::Reduce { .. } => 3,
            Frame::Meet { .. } => 4,
            Frame::Checkpoint { .. } => 5,
            Frame::Abort { .. } => 6,
            Frame::Bye => 7,
            Frame::Beat => 8,
            Frame::Written { .. } => 9,
            Frame::Probe { .. } => 10,
            Frame::Setup { .. } => 11,
        }
    }

    /// The whole frame's bytes, header and checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(64 + self.data_bytes()));
        w.0.extend_from_slice(&MAGIC);
        w.0.push(self.kind());
        w.u64(0); // the payload length, filled in below
        match self {
            Frame::Hello {
                rank,
                ranks,
                fingerprint,
            } => {
                w.u32(*rank);
                w.u32(*ranks);
                w.u64(*fingerprint);
            }
            Frame::Tensor {
                step,
                to,
                key,
                tensor,
            } => {
                w.u64(*step);
                w.u32(*to);
                w.key(*key);
                w.tensor(tensor);
            }
            Frame::Reduce {
                step,
                stage,
                chunk,
                replica,
                what,
                grads,
            } => {
                w.u64(*step);
                w.u32(*stage);
                w.u32(*chunk);
                w.u32(*replica);
                w.0.push(*what as u8);
                w.u64(grads.len() as u64);
                for part in grads {
                    w.u64(part.len() as u64);
                    part.iter().for_each(|t| w.f32s(t));
                }
            }
            Frame::Meet {
                step,
                squares,
                losses,
            } => {
                w.u64(*step);
                w.u64(squares.len() as u64);
                for (part, s) in squares {
                    w.part(*part);
                    w.f64(*s);
                }
                w.u64(losses.len() as u64);
                for (mb, l) in losses {
                    w.u32(*mb);
                    w.f64(*l);
                }
            }
            Frame::Checkpoint { step, staging } => {
                w.u64(*step);
                w.str(staging);
            }
            Frame::Written { step } => w.u64(*step),
            Frame::Abort { reason } => w.str(reason),
            Frame::Probe { payload } => {
                w.u64(payload.len() as u64);
                w.0.extend_from_slice(payload);
            }
            Frame::Setup { key, bytes } => {
                w.str(key);
                w.u64(bytes.len() as u64);
                w.0.extend_from_slice(bytes);
            }
            Frame::Bye | Frame::Beat => {}
        }
        let payload = (w.0.len() - HEADER) as u64;
        w.0[5..HEADER].copy_from_slice(&payload.to_le_bytes());
        let crc = CASTAGNOLI.checksum(&w.0[4..]);
        w.u32(crc);
        w.0
    }

    fn data_bytes(&self) -> usize {
        let f = |v: &Vec<f32>| v.len() * 4;
        match self {
            Frame::Tensor { tensor, .. } => f(&tensor.data),
            Frame::Reduce { grads, .. } => grads.iter().flatten().map(f).sum(),
            Frame::Probe { payload } => payload.len(),
            _ => 0,
        }
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.encode())?;
        out.flush()
    }

    /// Reads one frame; `Closed` when the stream ends cleanly before a frame starts.
    pub fn read_from(input: &mut impl Read) -> Result<Frame, FrameError> {
        let mut header = [0u8; HEADER];
        let got = read_full(input, &mut header)?;
        if got == 0 {
            return Err(FrameError::Closed);
        }
        if got < HEADER {
            return Err(FrameError::Truncated(format!(
                "the header has {got} of its {HEADER} bytes"
            )));
        }
        let magic = [header[0], header[1], header[2], header[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let len = u64::from_le_bytes(header[5..HEADER].try_into().unwrap_or_default());
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let mut rest = vec![0u8; len as usize + 4];
        let got = read_full(input, &mut rest)?;
        if got < rest.len() {
            return Err(FrameError::Truncated(format!(
                "the payload and checksum have {got} of their {} bytes",
                rest.len()
            )));
        }
        let (payload, crc) = rest.split_at(len as usize);
        let expected = u32::from_le_bytes(crc.try_into().unwrap_or_default());
        let mut digest = CASTAGNOLI.digest();
        digest.update(&header[4..]);
        digest.update(payload);
        let actual = digest.finalize();
        if actual != expected {
            return Err(FrameError::Checksum { expected, actual });
        }
        let mut r = Reader { bytes: payload };
        let frame = r.frame(header[4])?;
        if !r.bytes.is_empty() {
            return Err(FrameError::Malformed(format!(
                "{} bytes after the frame's content",
                r.bytes.len()
            )));
        }
        Ok(frame)
    }
}

const HEADER: usize = 4 + 1 + 8;

/// Fills `buf` as far as the stream goes; the count read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn f32s(&mut self, data: &[f32]) {
        self.u64(data.len() as u64);
        self.0.extend_from_slice(bytemuck::cast_slice(data));
    }
    fn part(&mut self, part: PartId) {
        self.u32(match part {
            PartId::Embedding => 0,
            PartId::Layer(i) => i as u32 + 1,
            PartId::Head => u32::MAX,
        });
    }
    fn key(&mut self, key: MessageKey) {
        self.0.push(key.kind as u8);
        self.u32(key.mb);
        self.u32(key.chunk);
    }
    fn tensor(&mut self, t: &WireTensor) {
        self.str(&t.name);
        self.u64(t.shape.len() as u64);
        t.shape.iter().for_each(|&d| self.u64(d as u64));
        self.0.push(u8::from(t.bf16));
        match t.bf16 {
            false => self.f32s(&t.data),
            true => {
                self.u64(t.data.len() as u64);
                (t.data.iter()).for_each(|&v| {
                    self.0
                        .extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())
                });
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], FrameError> {
        if self.bytes.len() < n {
            return Err(FrameError::Malformed(format!(
                "{what} needs {n} bytes, {} are left",
                self.bytes.len()
            )));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &str) -> Result<u32, FrameError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, FrameError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn f64(&mut self, what: &str) -> Result<f64, FrameError> {
        Ok(f64::from_bits(self.u64(what)?))
    }
    /// A count of items of at least `item_bytes` each, checked against what is left.
    fn count(&mut self, item_bytes: usize, what: &str) -> Result<usize, FrameError> {
        let n = self.u64(what)?;
        if n.saturating_mul(item_bytes as u64) > self.bytes.len() as u64 {
            return Err(FrameError::Malformed(format!(
                "{what}: {n} items do not fit in the {} bytes left",
                self.bytes.len()
            )));
        }
        Ok(n as usize)
    }
    fn str(&mut self, what: &str) -> Result<String, FrameError> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| FrameError::Malformed(format!("{what}: not UTF-8")))
    }
    fn f32s(&mut self, what: &str) -> Result<Vec<f32>, FrameError> {
        let n = self.count(4, what)?;
        let bytes = self.take(n * 4, what)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
    /// bf16 values, widened to f32 (exactly).
    fn bf16s(&mut self, what: &str) -> Result<Vec<f32>, FrameError> {
        let n = self.count(2, what)?;
        let bytes = self.take(n * 2, what)?;
        Ok((bytes.chunks_exact(2))
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect())
    }
    fn part(&mut self) -> Result<PartId, FrameError> {
        Ok(match self.u32("part")? {
            0 => PartId::Embedding,
            u32::MAX => PartId::Head,
            i => PartId::Layer(i as usize - 1),
        })
    }
    fn key(&mut self) -> Result<MessageKey, FrameError> {
        use super::MessageKind;
        let kind = match self.u8("message kind")? {
            k if k == MessageKind::Activation as u8 => MessageKind::Activation,
            k if k == MessageKind::Gradient as u8 => MessageKind::Gradient,
            k if k == MessageKind::Tied as u8 => MessageKind::Tied,
            k => return Err(FrameError::Malformed(format!("message kind {k}"))),
        };
        Ok(MessageKey {
            kind,
            mb: self.u32("micro-batch")?,
            chunk: self.u32("chunk")?,
        })
    }
    fn collective(&mut self) -> Result<Collective, FrameError> {
        Ok(match self.u8("collective")? {
            k if k == Collective::Sum as u8 => Collective::Sum,
            k if k == Collective::Scatter as u8 => Collective::Scatter,
            k if k == Collective::Gather as u8 => Collective::Gather,
            k if k == Collective::OptimizerState as u8 => Collective::OptimizerState,
            k => return Err(FrameError::Malformed(format!("collective {k}"))),
        })
    }
    fn tensor(&mut self) -> Result<WireTensor, FrameError> {
        let name = self.str("tensor name")?;
        let dims = self.count(8, "tensor shape")?;
        let shape = (0..dims)
            .map(|_| self.u64("tensor shape").map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let (data, bf16) = match self.u8("tensor element type")? {
            0 => (self.f32s("tensor data")?, false),
            1 => (self.bf16s("tensor data")?, true),
            other => {
                return Err(FrameError::Malformed(format!(
                    "tensor {name}: element type {other} (0 is f32, 1 bf16)"
                )));
            }
        };
        let elements = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements != Some(data.len()) {
            return Err(FrameError::Malformed(format!(
                "tensor {name} of shape {shape:?} carries {} values",
                data.len()
            )));
        }
        Ok(WireTensor {
            name,
            shape,
            data,
            bf16,
        })
    }

    fn frame(&mut self, kind: u8) -> Result<Frame, FrameError> {
        Ok(match kind {
            1 => Frame::Hello {
                rank: self.u32("rank")?,
                ranks: self.u32("ranks")?,
                fingerprint: self.u64("fingerprint")?,
            },
            2 => Frame::Tensor {
                step: self.u64("step")?,
                to: self.u32("device")?,
                key: self.key()?,
                tensor: self.tensor()?,
            },
            3 => {
                let (step, stage) = (self.u64("step")?, self.u32("stage")?);
                let (chunk, replica) = (self.u32("chunk")?, self.u32("replica")?);
                let what = self.collective()?;
                let parts = self.count(8, "parts")?;
                let mut grads = Vec::with_capacity(parts);
                for _ in 0..parts {
                    let tensors = self.count(8, "tensors")?;
                    grads.push(
                        (0..tensors)
                            .map(|_| self.f32s("gradient"))
                            .collect::<Result<_, _>>()?,
                    );
                }
                Frame::Reduce {
                    step,
                    stage,
                    chunk,
                    replica,
                    what,
                    grads,
                }
            }
            4 => {
                let step = self.u64("step")?;
                let n = self.count(12, "squares")?;
                let squares = (0..n)
                    .map(|_| Ok((self.part()?, self.f64("square")?)))
                    .collect::<Result<_, FrameError>>()?;
                let n = self.count(12, "losses")?;
                let losses = (0..n)
                    .map(|_| Ok((self.u32("micro-batch")?, self.f64("loss")?)))
                    .collect::<Result<_, FrameError>>()?;
                Frame::Meet {
                    step,
                    squares,
                    losses,
                }
            }
            5 => Frame::Checkpoint {
                step: self.u64("step")?,
                staging: self.str("staging")?,
            },
            6 => Frame::Abort {
                reason: self.str("reason")?,
            },
            7 => Frame::Bye,
            8 => Frame::Beat,
            9 => Frame::Written {
                step: self.u64("step")?,
            },
            10 => {
                let n = self.count(1, "probe")?;
                Frame::Probe {
                    payload: self.take(n, "probe")?.to_vec(),
                }
            }
            11 => {
                let key = self.str("setup key")?;
                let n = self.count(1, "setup")?;
                Frame::Setup {
                    key,
                    bytes: self.take(n, "setup")?.to_vec(),
                }
            }
            k => return Err(FrameError::Malformed(format!("unknown frame kind {k}"))),
        })
    }
}

#[cfg(test)]
mod tests;
