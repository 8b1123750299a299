//! What the pipeline runtime asks of a kind of device. The runtime (programs, mailboxes,
//! stash bookkeeping, optimizer slices, the step's meeting point) is the same for every kind;
//! an [`Engine`] runs a part forward or backward, moves tensors between a device's pool and
//! the host's, hands tensors between devices and updates ranges of parameters.
//!
//! [`CpuEngine`] is the host implementation: tensors are host buffers, so a move or a send is
//! bookkeeping. The CUDA implementation is `exec::backend::cuda::engine::GpuEngine`.

use std::ops::{Deref, Range};

use crate::exec::backend::CpuBackend;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::part::{MicroTokens, PartOutput, PartStash, backward_part, forward_part};
use crate::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use crate::exec::optim::clip::part_squares;
use crate::exec::optim::{OptimizerConfig, UpdateCoeffs, update_elements};
use crate::exec::tensor::Tensor;
use crate::plan::inventory::MicroShape;

use super::PipelineError;

type Result<T> = std::result::Result<T, PipelineError>;

/// Where a part runs: the plan's device, its pool, the model and the micro-batch's shape.
#[derive(Clone, Copy)]
pub struct At<'a> {
    pub device: u32,
    pub pool: &'a PoolRef,
    pub config: &'a LlamaConfig,
    pub micro: MicroShape,
}

/// What a stash-dropping forward keeps of its first part's stash.
pub enum Kept<T, S> {
    /// The chunk's input hidden states.
    Input(T),
    /// The embedding's whole stash (its token ids).
    Stash(S),
}

/// A part's parameters as host tensors: lent where they already are on the host, copied
/// otherwise.
pub enum HostPart<'a> {
    Lent(&'a PartParams),
    Copied(PartParams),
}

impl Deref for HostPart<'_> {
    type Target = PartParams;
    fn deref(&self) -> &PartParams {
        match self {
            HostPart::Lent(p) => p,
            HostPart::Copied(p) => p,
        }
    }
}

/// One optimizer update's settings for a step.
#[derive(Clone, Copy)]
pub struct Update<'a> {
    pub config: &'a OptimizerConfig,
    pub coeffs: &'a UpdateCoeffs,
    /// The global-norm clipping factor (1 without clipping).
    pub clip_factor: f32,
}

/// A kind of device the pipeline runtime can drive. Every method that touches a device names
/// it by its index in the plan (`device`), so one engine can hold several devices.
pub trait Engine: Sync {
    /// A dense f32 tensor: hidden states, their gradients, weights, optimizer moments.
    type Tensor: Send;
    /// One part's kept activations.
    type Stash: Send;
    /// One part's weights and gradients.
    type Part: Send;
    /// A tensor on its way between devices: its sender's bytes are given back.
    type Message: Send;

    fn forward(
        &self,
        at: At<'_>,
        part: &Self::Part,
        input: Option<Self::Tensor>,
        tokens: MicroTokens<'_>,
    ) -> Result<(Self::Stash, PartOutput<Self::Tensor>)>;

    /// Adds to the part's gradients; returns the gradient of its input (none for the
    /// embedding).
    fn backward(
        &self,
        at: At<'_>,
        part: &mut Self::Part,
        stash: Self::Stash,
        grad_output: Option<Self::Tensor>,
        loss_scale: f32,
    ) -> Result<Option<Self::Tensor>>;

    /// Whether a head's forward followed at once by its backward runs as one pass
    /// ([`Engine::head_forward_backward`]); the pipeline asks only for a chunk that holds the
    /// whole model (a one-stage plan).
    fn one_pass_head(&self) -> bool {
        false
    }

    /// The head's forward and backward of one micro-batch in one pass: adds the head's
    /// gradients and returns the gradient of its input and the summed loss.
    fn head_forward_backward(
        &self,
        at: At<'_>,
        part: &mut Self::Part,
        input: Self::Tensor,
        tokens: MicroTokens<'_>,
        loss_scale: f32,
    ) -> Result<(Self::Tensor, f64)> {
        let (stash, output) = self.forward(at, part, Some(input), tokens)?;
        let PartOutput::LossSum(loss) = output else {
            return Err(PipelineError::Model(
                crate::exec::model::ModelError::WrongInput {
                    part: self.part_id(part),
                    reason: "a one-pass head forward and backward of a part that is not the head"
                        .into(),
                },
            ));
        };
        let grad = self.backward(at, part, stash, None, loss_scale)?;
        let grad = grad.ok_or(PipelineError::EmptyChunk)?;
        Ok((grad, loss))
    }

    fn keep_input(&self, first: Self::Stash) -> Kept<Self::Tensor, Self::Stash>;

    /// The same tensor counted under another group of its pool.
    fn regroup(&self, t: Self::Tensor, group: MemGroup) -> Self::Tensor;

    /// Moves a tensor into `to`: the host's pool when `to_host` (an offload), else the
    /// device's (a prefetch, or a part placed on its device).
    fn move_tensor(
        &self,
        device: u32,
        t: Self::Tensor,
        to: &PoolRef,
        group: MemGroup,
        to_host: bool,
    ) -> Result<Self::Tensor>;

    fn move_stash(
        &self,
        device: u32,
        s: Self::Stash,
        to: &PoolRef,
        to_host: bool,
    ) -> Result<Self::Stash>;

    fn send(&self, device: u32, t: Self::Tensor) -> Result<Self::Message>;
    fn receive(&self, device: u32, m: Self::Message, pool: &PoolRef) -> Result<Self::Tensor>;

    /// A part of host parameters as this engine's part, still in the host pool.
    fn adopt(&self, part: PartParams, host: &PoolRef) -> Result<Self::Part>;
    fn part_id(&self, part: &Self::Part) -> PartId;
    /// The part's weights and gradients, in inventory order.
    #[allow(clippy::type_complexity)]
    fn params_mut<'p>(
        &self,
        part: &'p mut Self::Part,
    ) -> (&'p mut Vec<Self::Tensor>, &'p mut Vec<Self::Tensor>);
    /// The lengths of the part's parameter tensors, in inventory order.
    fn param_lens(&self, part: &Self::Part) -> Vec<usize>;
    /// The Hugging Face names of the part's parameters, in inventory order.
    fn param_names<'p>(&self, part: &'p Self::Part) -> &'p [String];

    /// A zero-filled tensor in the host's pool (optimizer moments start there).
    fn host_zeros(
        &self,
        host: &PoolRef,
        name: &str,
        len: usize,
        group: MemGroup,
    ) -> Result<Self::Tensor>;

    /// The sum of the squares of the part's gradients.
    fn grad_squares(&self, device: u32, part: &Self::Part) -> Result<f64>;

    /// Clips, updates and zeroes elements `local` of weight `w` and its gradient `g`;
    /// `moments` are AdamW's (none for SGD) with the same elements at `within`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        device: u32,
        update: Update<'_>,
        w: &mut Self::Tensor,
        g: &mut Self::Tensor,
        local: Range<usize>,
        moments: Option<(&mut Self::Tensor, &mut Self::Tensor)>,
        within: Range<usize>,
    ) -> Result<()>;

    fn zero_grads(&self, device: u32, part: &mut Self::Part) -> Result<()>;

    /// The part's weights as host tensors (for checkpoints).
    fn host_part<'p>(
        &self,
        device: u32,
        part: &'p Self::Part,
        host: &PoolRef,
        config: &LlamaConfig,
    ) -> Result<HostPart<'p>>;

    /// Replaces the part's weights with `from`'s (same layout).
    fn load_part(&self, device: u32, part: &mut Self::Part, from: &PartParams) -> Result<()>;

    /// Copies elements `within` of a moment tensor into `dst`.
    fn read(
        &self,
        device: u32,
        t: &Self::Tensor,
        within: Range<usize>,
        dst: &mut [f32],
    ) -> Result<()>;

    /// Overwrites elements `within` of a moment tensor with `src`.
    fn write(
        &self,
        device: u32,
        t: &mut Self::Tensor,
        within: Range<usize>,
        src: &[f32],
    ) -> Result<()>;

    /// Sums one gradient tensor's copies, one per replica, in replica order
    /// (`copies[0] + copies[1] + ...`, element by element) and writes the sum into every copy.
    fn sum_replicas(&self, device: u32, copies: &mut [&mut Self::Tensor]) -> Result<()>;

    /// A sharded reduction of one gradient tensor (`RS<c>`): for each `(owner, range)` of
    /// `owned`, sums elements `range` of the copies (one per replica) in replica order, the
    /// same sum as `sum_replicas`, into copy `owner`'s, and zeroes them in the others'.
    fn scatter_ranges(
        &self,
        device: u32,
        copies: &mut [&mut Self::Tensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()>;

    /// A gathering of one weight tensor (`AG<c>`): for each `(owner, range)` of `owned`,
    /// copies elements `range` of copy `owner` into every other copy.
    fn gather_ranges(
        &self,
        device: u32,
        copies: &mut [&mut Self::Tensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()>;

    /// Sums copies of one tensor that are all on `device` itself, in the order given
    /// (`copies[0] + copies[1] + ...`), into every copy: tied embeddings' `TIE`.
    fn sum_here(&self, device: u32, copies: &mut [&mut Self::Tensor]) -> Result<()>;
}

/// A host tensor between devices: its buffer, counted in no pool.
#[derive(Debug)]
pub struct HostMessage {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The host's engine: every device is a pool of host memory and kernels run on `backend`.
pub struct CpuEngine {
    pub backend: CpuBackend,
}

impl CpuEngine {
    fn ctx<'a>(&'a self, at: At<'a>) -> PartCtx<'a, CpuBackend> {
        PartCtx {
            backend: &self.backend,
            pool: at.pool,
            config: at.config,
            micro: at.micro,
        }
    }
}

impl Engine for CpuEngine {
    type Tensor = Tensor;
    type Stash = PartStash;
    type Part = PartParams;
    type Message = HostMessage;

    fn forward(
        &self,
        at: At<'_>,
        part: &PartParams,
        input: Option<Tensor>,
        tokens: MicroTokens<'_>,
    ) -> Result<(PartStash, PartOutput)> {
        Ok(forward_part(&self.ctx(at), part, input, tokens)?)
    }

    fn backward(
        &self,
        at: At<'_>,
        part: &mut PartParams,
        stash: PartStash,
        grad_output: Option<Tensor>,
        loss_scale: f32,
    ) -> Result<Option<Tensor>> {
        Ok(backward_part(
            &self.ctx(at),
            part,
            stash,
            grad_output,
            loss_scale,
        )?)
    }

    fn keep_input(&self, first: PartStash) -> Kept<Tensor, PartStash> {
        match first.into_input() {
            Ok(input) => Kept::Input(input),
            Err(embedding) => Kept::Stash(embedding),
        }
    }

    fn regroup(&self, t: Tensor, group: MemGroup) -> Tensor {
        t.regroup(group)
    }

    fn move_tensor(
        &self,
        _device: u32,
        t: Tensor,
        to: &PoolRef,
        group: MemGroup,
        _to_host: bool,
    ) -> Result<Tensor> {
        Ok(t.transfer(to, group)?)
    }

    fn move_stash(
        &self,
        _device: u32,
        s: PartStash,
        to: &PoolRef,
        _to_host: bool,
    ) -> Result<PartStash> {
        Ok(s.relocate(&self.backend, to, false)?)
    }

    /// The host buffer changes hands: the sender's bytes are given back now, the receiver's
    /// taken when it receives.
    fn send(&self, _device: u32, t: Tensor) -> Result<HostMessage> {
        let (name, shape, data) = t.into_data();
        Ok(HostMessage { name, shape, data })
    }

    fn receive(&self, _device: u32, m: HostMessage, pool: &PoolRef) -> Result<Tensor> {
        let group = MemGroup::Activations;
        Ok(Tensor::from_data(pool, m.name, &m.shape, m.data, group)?)
    }

    fn adopt(&self, part: PartParams, host: &PoolRef) -> Result<PartParams> {
        let mut part = part;
        for (list, group) in [
            (&mut part.weights, MemGroup::Weights),
            (&mut part.grads, MemGroup::Gradients),
        ] {
            *list = std::mem::take(list)
                .into_iter()
                .map(|t| t.transfer(host, group))
                .collect::<std::result::Result<_, _>>()?;
        }
        Ok(part)
    }

    fn part_id(&self, part: &PartParams) -> PartId {
        part.id
    }

    fn params_mut<'p>(
        &self,
        part: &'p mut PartParams,
    ) -> (&'p mut Vec<Tensor>, &'p mut Vec<Tensor>) {
        (&mut part.weights, &mut part.grads)
    }

    fn param_names<'p>(&self, part: &'p PartParams) -> &'p [String] {
        &part.names
    }

    fn param_lens(&self, part: &PartParams) -> Vec<usize> {
        part.weights.iter().map(Tensor::len).collect()
    }

    fn host_zeros(
        &self,
        host: &PoolRef,
        name: &str,
        len: usize,
        group: MemGroup,
    ) -> Result<Tensor> {
        Ok(Tensor::zeros(host, name, &[len], group)?)
    }

    fn grad_squares(&self, _device: u32, part: &PartParams) -> Result<f64> {
        Ok(part_squares(part).sum_of_squares)
    }

    fn update(
        &self,
        _device: u32,
        u: Update<'_>,
        w: &mut Tensor,
        g: &mut Tensor,
        local: Range<usize>,
        moments: Option<(&mut Tensor, &mut Tensor)>,
        within: Range<usize>,
    ) -> Result<()> {
        let (m, v): (&mut [f32], &mut [f32]) = match moments {
            Some((m, v)) => (&mut m.data_mut()[within.clone()], &mut v.data_mut()[within]),
            None => (&mut [], &mut []),
        };
        update_elements(
            u.config,
            u.coeffs,
            u.clip_factor,
            &mut w.data_mut()[local.clone()],
            &mut g.data_mut()[local],
            m,
            v,
        );
        Ok(())
    }

    fn zero_grads(&self, _device: u32, part: &mut PartParams) -> Result<()> {
        part.zero_grads();
        Ok(())
    }

    fn host_part<'p>(
        &self,
        _device: u32,
        part: &'p PartParams,
        _host: &PoolRef,
        _config: &LlamaConfig,
    ) -> Result<HostPart<'p>> {
        Ok(HostPart::Lent(part))
    }

    fn load_part(&self, _device: u32, part: &mut PartParams, from: &PartParams) -> Result<()> {
        part.copy_weights_from(from);
        Ok(())
    }

    fn read(&self, _device: u32, t: &Tensor, within: Range<usize>, dst: &mut [f32]) -> Result<()> {
        dst.copy_from_slice(&t.data()[within]);
        Ok(())
    }

    fn write(&self, _device: u32, t: &mut Tensor, within: Range<usize>, src: &[f32]) -> Result<()> {
        t.data_mut()[within].copy_from_slice(src);
        Ok(())
    }

    fn sum_here(&self, device: u32, copies: &mut [&mut Tensor]) -> Result<()> {
        // Host tensors: where they are does not change the sum.
        self.sum_replicas(device, copies)
    }

    fn sum_replicas(&self, _device: u32, copies: &mut [&mut Tensor]) -> Result<()> {
        check_lengths(copies)?;
        let Some((first, rest)) = copies.split_first_mut() else {
            return Ok(());
        };
        let sum = first.data_mut();
        for other in rest.iter() {
            for (s, o) in sum.iter_mut().zip(other.data()) {
                *s += *o;
            }
        }
        for other in rest.iter_mut() {
            other.data_mut().copy_from_slice(sum);
        }
        Ok(())
    }

    /// Sums each range into copy 0's elements (so in replica order), moves the sum to its
    /// owner's copy and zeroes the rest: no buffer besides the copies.
    fn scatter_ranges(
        &self,
        _device: u32,
        copies: &mut [&mut Tensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        check_ranges(copies, owned)?;
        let Some((first, rest)) = copies.split_first_mut() else {
            return Ok(());
        };
        for (owner, range) in owned {
            let sum = &mut first.data_mut()[range.clone()];
            for other in rest.iter() {
                for (s, o) in sum.iter_mut().zip(&other.data()[range.clone()]) {
                    *s += *o;
                }
            }
            for (r, other) in rest.iter_mut().enumerate() {
                let values = &mut other.data_mut()[range.clone()];
                if r + 1 == *owner {
                    values.copy_from_slice(sum);
                } else {
                    values.fill(0.0);
                }
            }
            if *owner != 0 {
                sum.fill(0.0);
            }
        }
        Ok(())
    }

    fn gather_ranges(
        &self,
        _device: u32,
        copies: &mut [&mut Tensor],
        owned: &[(usize, Range<usize>)],
    ) -> Result<()> {
        check_ranges(copies, owned)?;
        for (owner, range) in owned {
            let (before, rest) = copies.split_at_mut(*owner);
            let Some((src, after)) = rest.split_first_mut() else {
                continue;
            };
            let values = &src.data()[range.clone()];
            for dst in before.iter_mut().chain(after.iter_mut()) {
                dst.data_mut()[range.clone()].copy_from_slice(values);
            }
        }
        Ok(())
    }
}

/// Every copy has the first's length.
fn check_lengths(copies: &[&mut Tensor]) -> Result<()> {
    let Some(first) = copies.first() else {
        return Ok(());
    };
    let len = first.len();
    if let Some(other) = copies.iter().find(|t| t.len() != len) {
        return Err(PipelineError::Reduction(format!(
            "{} has {len} elements in one replica and {} in another",
            first.name(),
            other.len()
        )));
    }
    Ok(())
}

/// Every copy has the first's length, and every owner and range is within them.
fn check_ranges(copies: &[&mut Tensor], owned: &[(usize, Range<usize>)]) -> Result<()> {
    check_lengths(copies)?;
    let Some(first) = copies.first() else {
        return Ok(());
    };
    let len = first.len();
    if let Some((owner, range)) = (owned.iter()).find(|(o, r)| *o >= copies.len() || r.end > len) {
        return Err(PipelineError::Reduction(format!(
            "{}: replica {owner} of {} cannot own elements {range:?} of {len}",
            first.name(),
            copies.len()
        )));
    }
    Ok(())
}
