//! What the pipeline runtime asks of a kind of device. The runtime (programs, mailboxes,
//! stash bookkeeping, optimizer slices, the step's meeting point) is the same for every kind;
//! an [`Engine`] runs a part forward or backward, moves tensors between a device's pool and
//! the host's, hands tensors between devices and updates ranges of parameters.
//!
//! [`CpuEngine`] (`cpu`) is the host implementation: tensors are host buffers, so a move or a
//! send is bookkeeping. The CUDA implementation is `exec::backend::cuda::engine::GpuEngine`.

use std::borrow::Cow;
use std::ops::{Deref, Range};

use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::model::{LlamaConfig, PartId, PartParams};
use crate::exec::optim::{OptimizerConfig, UpdateCoeffs};
use crate::exec::transport::frame::WireTensor;
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

    /// A tensor leaving this process (for another process's device): its values on the host
    /// (a bf16 tensor's widened, and marked so that they travel as bf16).
    fn wire_out(&self, device: u32, t: Self::Tensor) -> Result<WireTensor>;

    /// A tensor from another process, on `device` in `pool`, in the activations' element
    /// type (what goes between processes is hidden states and their gradients).
    fn wire_in(&self, device: u32, t: WireTensor, pool: &PoolRef) -> Result<Self::Tensor>;

    /// Elements `within` of an f32 tensor on the host: borrowed where the tensor is in host
    /// memory, else copied out (what the collectives between processes read); a range the
    /// tensor does not hold is refused by name.
    fn values<'t>(
        &self,
        device: u32,
        t: &'t Self::Tensor,
        within: Range<usize>,
    ) -> Result<Cow<'t, [f32]>>;

    /// The number of elements of a tensor.
    fn len(&self, t: &Self::Tensor) -> usize;

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

    /// Overwrites elements `within` of a tensor with `src` (as many values); a range the
    /// tensor does not hold is refused by name.
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

    /// Whether the replicas of `stage` in this process meet those of other processes over
    /// the engine's own links (NCCL between ranks' GPUs) rather than through host memory.
    fn links_ranks(&self, _stage: u32) -> bool {
        false
    }

    /// One replica collective of one tensor over those links: `copies` are this process's
    /// replicas' (`replicas`, run-wide, in order) of `device`'s stage; the other processes'
    /// replicas take part from their side. Only asked where `links_ranks` says so.
    fn across_ranks(
        &self,
        device: u32,
        _op: AcrossRanks,
        _replicas: &[u32],
        _copies: &mut [&mut Self::Tensor],
    ) -> Result<()> {
        Err(PipelineError::Reduction(format!(
            "device {device}: this engine has no links between processes"
        )))
    }
}

/// A replica collective across processes, as `Engine::across_ranks` runs it; owners are
/// run-wide replicas.
#[derive(Debug, Clone, Copy)]
pub enum AcrossRanks<'a> {
    /// Every replica's copies summed into each (`AR<c>`).
    Sum,
    /// Per (owner, range), the range's sum into the owner's copy, zeros in the others'
    /// (`RS<c>`).
    Scatter(&'a [(usize, Range<usize>)]),
    /// Per (owner, range), the owner's elements into every other copy (`AG<c>`).
    Gather(&'a [(usize, Range<usize>)]),
}

/// A host tensor between devices: its buffer, counted in no pool.
#[derive(Debug)]
pub struct HostMessage {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

mod cpu;
pub use cpu::{CpuEngine, host_range, host_write};
