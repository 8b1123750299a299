//! The compute backend: a device's storage and the operations of Llama training over it, so
//! the model (`exec::model`) is written once. [`cpu::CpuBackend`] stores tensors in host
//! memory and runs the kernels of `cpu::kernels`; the CUDA backend ([`cuda`]: `Gpu`) stores
//! them in a GPU's memory and runs NVRTC kernels and cuBLAS products.
//!
//! A backend's own choices show in two places only: its methods (CUDA groups products of one
//! input, reads projection weights through bf16 copies, picks flash attention or scores
//! through cuBLAS) and its inventory profile ([`Backend::profile`]): the scratch a choice
//! needs (attention scores, the head's per-token losses) is listed there, and the model
//! allocates whatever the profile lists and hands it to the backend.

pub mod cpu;
pub mod cuda;

use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::cpu::kernels::cross_entropy::HeadShape;
use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::plan::inventory::{Profile, TensorSpec};

pub use cpu::CpuBackend;

/// A layer's attention scratch, each present where the backend's profile lists it: the
/// scores of one sequence (forward and backward) and their gradient for products through
/// cuBLAS, or the flash kernels' f32 dQ accumulator. The CPU backend lists none.
pub struct AttnScratch<T> {
    pub scores: Option<T>,
    pub d_scores: Option<T>,
    pub dq_acc: Option<T>,
}

/// The gradients a layer's attention backward writes: `dq`, `dk`, `dv` and each row's
/// `delta` (rowsum of `dO ∘ O`).
pub struct AttnGrads<'a, T> {
    pub dq: &'a mut T,
    pub dk: &'a mut T,
    pub dv: &'a mut T,
    pub delta: &'a mut T,
}

/// What a layer's attention forward kept: queries, keys, values, output, log-sum-exp.
pub struct AttnKept<'a, T> {
    pub q: &'a T,
    pub k: &'a T,
    pub v: &'a T,
    pub out: &'a T,
    pub lse: &'a T,
}

/// The head's loss and gradient over one micro-batch, a block of logits at a time; `'w` is
/// the weights' borrow.
pub struct HeadLoss<'a, 'w, B: Backend + ?Sized + 'w> {
    /// The final norm's output, the head's product input.
    pub x: &'a B::Tensor,
    pub lm_head: B::Weight<'w>,
    pub targets: &'a B::Ids,
    pub shape: HeadShape,
}

/// A device's storage and the operations of Llama training over it. Each forward has its
/// backward; arguments are explicit and shapes come with the tensors. Every operation may
/// fail (a GPU's driver, a missing kernel); the CPU backend never does.
#[allow(clippy::too_many_arguments)]
pub trait Backend: Sync {
    /// Activations (of the backend's activation type), parameters and gradients (f32).
    type Tensor: Send;
    /// Token ids and targets (i32).
    type Ids: Send;
    /// A projection weight as the products read it (on CUDA with bf16 activations: its bf16
    /// copy, refreshed where the weight changed).
    type Weight<'a>: Copy
    where
        Self: 'a;
    type Error: From<DeviceError> + Send;

    fn name(&self) -> &'static str;
    /// The planner's inventory of what this backend allocates.
    fn profile(&self) -> Profile;

    /// A tensor of an inventory entry, contents unspecified, counted in `pool`.
    fn alloc(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Self::Tensor, Self::Error>;
    fn alloc_ids(
        &self,
        pool: &PoolRef,
        spec: &TensorSpec,
        group: MemGroup,
    ) -> Result<Self::Ids, Self::Error>;
    fn write_ids(&self, dst: &mut Self::Ids, ids: &[i32]) -> Result<(), Self::Error>;
    fn shape(t: &Self::Tensor) -> &[usize];
    /// The same tensor under another name (a part's output becoming the next one's input).
    fn renamed(t: Self::Tensor, name: &str) -> Self::Tensor;

    /// Moves a tensor into `to` under `group`: the host's pool when `to_host` (an offload),
    /// else the device's (a prefetch).
    fn move_tensor(
        &self,
        t: Self::Tensor,
        to: &PoolRef,
        group: MemGroup,
        to_host: bool,
    ) -> Result<Self::Tensor, Self::Error>;
    fn move_ids(
        &self,
        t: Self::Ids,
        to: &PoolRef,
        group: MemGroup,
        to_host: bool,
    ) -> Result<Self::Ids, Self::Error>;
    /// Orders what follows after a prefetch into `t` has landed.
    fn await_tensor(&self, t: &Self::Tensor) -> Result<(), Self::Error>;
    fn await_ids(&self, t: &Self::Ids) -> Result<(), Self::Error>;

    /// Every weight of a part as its products read it (same order).
    fn product_weights<'a>(
        &'a self,
        weights: &'a [Self::Tensor],
    ) -> Result<Vec<Self::Weight<'a>>, Self::Error>;

    /// `dst = src` (the residual stream's copies).
    fn copy(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> Result<(), Self::Error>;
    /// `dst += src` (the residual stream's sums).
    fn add(&self, dst: &mut Self::Tensor, src: &Self::Tensor) -> Result<(), Self::Error>;
    /// `dst = a + b`.
    fn sum(
        &self,
        dst: &mut Self::Tensor,
        a: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<(), Self::Error>;

    fn rmsnorm_forward(
        &self,
        out: &mut Self::Tensor,
        rstd: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
    ) -> Result<(), Self::Error>;
    fn rmsnorm_apply(
        &self,
        out: &mut Self::Tensor,
        rstd: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
    ) -> Result<(), Self::Error>;
    /// `dw += Σ dy·x·rstd`, then `dy` becomes `dx` in place.
    fn rmsnorm_backward(
        &self,
        dy_to_dx: &mut Self::Tensor,
        dw: &mut Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        rstd: &Self::Tensor,
    ) -> Result<(), Self::Error>;

    /// Rotates rows of `width` in place by their positions in sequences of `seq` rows.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        width: usize,
        seq: usize,
        head_dim: usize,
        rope: &Rope,
        inverse: bool,
    ) -> Result<(), Self::Error>;

    /// `y (+)= x · W^T`, a projection's forward.
    fn project(
        &self,
        y: &mut Self::Tensor,
        x: &Self::Tensor,
        w: Self::Weight<'_>,
        accumulate: bool,
    ) -> Result<(), Self::Error>;
    /// [`Backend::project`] of one input through each weight into its output.
    fn project_each(
        &self,
        x: &Self::Tensor,
        outputs: &mut [(&mut Self::Tensor, Self::Weight<'_>)],
    ) -> Result<(), Self::Error>;
    /// Backward of [`Backend::project`]: `dW += dy^T · x`, then `dx (+)= dy · W`.
    fn project_backward(
        &self,
        dw: &mut Self::Tensor,
        dx: &mut Self::Tensor,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: Self::Weight<'_>,
        accumulate_dx: bool,
    ) -> Result<(), Self::Error>;
    /// `y[r, :] += b` for every row of `y`: a projection's bias (Qwen2's q, k and v).
    fn bias_add(&self, y: &mut Self::Tensor, b: &Self::Tensor) -> Result<(), Self::Error>;
    /// Backward of [`Backend::bias_add`]: `db += Σ_r dy[r, :]`.
    fn bias_backward(&self, db: &mut Self::Tensor, dy: &Self::Tensor) -> Result<(), Self::Error>;
    /// Backward of projections of one input `x`, each `(dW, dy, W)`: every weight's
    /// gradient, then `dx` as the sum of `dy · W` over them.
    fn projections_backward(
        &self,
        dx: &mut Self::Tensor,
        x: &Self::Tensor,
        items: &mut [(&mut Self::Tensor, &Self::Tensor, Self::Weight<'_>)],
    ) -> Result<(), Self::Error>;

    fn swiglu_forward(
        &self,
        act: &mut Self::Tensor,
        gate: &Self::Tensor,
        up: &Self::Tensor,
    ) -> Result<(), Self::Error>;
    /// Backward of `out += swiglu(gate, up) · W_down^T` from `dy`: recomputes `act`, adds
    /// the down projection's weight gradient `d_down`, writes `d_gate` and `d_up`. Each
    /// backend orders the steps its own way (the CPU shares the recompute's sigmoid with
    /// SwiGLU's backward).
    fn swiglu_down_backward(
        &self,
        act: &mut Self::Tensor,
        d_gate: &mut Self::Tensor,
        d_up: &mut Self::Tensor,
        d_down: &mut Self::Tensor,
        dy: &Self::Tensor,
        gate_up: (&Self::Tensor, &Self::Tensor),
        w_down: Self::Weight<'_>,
    ) -> Result<(), Self::Error>;

    fn embedding_forward(
        &self,
        out: &mut Self::Tensor,
        table: &Self::Tensor,
        ids: &Self::Ids,
        hidden: usize,
    ) -> Result<(), Self::Error>;
    fn embedding_backward(
        &self,
        d_table: &mut Self::Tensor,
        d_out: &Self::Tensor,
        ids: &Self::Ids,
        hidden: usize,
    ) -> Result<(), Self::Error>;

    /// Causal grouped-query attention: fills `out` and `lse`.
    fn attention_forward(
        &self,
        out_lse: (&mut Self::Tensor, &mut Self::Tensor),
        qkv: (&Self::Tensor, &Self::Tensor, &Self::Tensor),
        scratch: &mut AttnScratch<Self::Tensor>,
        shape: AttnShape,
    ) -> Result<(), Self::Error>;
    fn attention_backward(
        &self,
        grads: AttnGrads<'_, Self::Tensor>,
        d_out: &Self::Tensor,
        kept: AttnKept<'_, Self::Tensor>,
        scratch: &mut AttnScratch<Self::Tensor>,
        shape: AttnShape,
    ) -> Result<(), Self::Error>;

    /// Returns the summed cross-entropy of the counted targets; with `token_loss` (where the
    /// profile stashes it), each token's loss is kept there.
    fn head_loss_forward(
        &self,
        logits_block: &mut Self::Tensor,
        token_loss: Option<&mut Self::Tensor>,
        head: HeadLoss<'_, '_, Self>,
    ) -> Result<f64, Self::Error>;
    /// Adds the LM head's weight gradient `dw` and writes `dx` for a loss scaled by `scale`;
    /// with `token_loss`, each token's loss is written there in the same pass.
    fn head_loss_backward(
        &self,
        dx_dw: (&mut Self::Tensor, &mut Self::Tensor),
        logits_block: &mut Self::Tensor,
        token_loss: Option<&mut Self::Tensor>,
        head: HeadLoss<'_, '_, Self>,
        scale: f32,
    ) -> Result<(), Self::Error>;
    /// The sum of per-token losses, in token order, in f64.
    fn summed_losses(&self, token_loss: &Self::Tensor) -> Result<f64, Self::Error>;
}

/// Runs `work` on one of rayon's pool threads, the threads the CPU kernels split their loops
/// over. From outside the pool every parallel kernel (hundreds a step) hands its whole loop to
/// the pool and sleeps until it is done; from inside, the calling thread does a share itself and
/// only the other threads are woken (about 3% of a step on 2 cores). Only for a thread that
/// computes alone: a device thread that waits for other devices' messages would hold a pool
/// thread while it waits.
pub fn on_compute_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
