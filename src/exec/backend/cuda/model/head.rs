//! Final norm, LM head and cross-entropy on the GPU, logits a block of tokens at a time.
//!
//! The pipeline runs the head's forward (the loss) and, later, its backward, which makes each
//! block's logits again. A one-stage run, whose backward follows at once, calls
//! [`head_forward_backward`] instead: one product per block for the logits instead of two,
//! the cross-entropy's loss and gradient in one kernel, and one normalisation. It holds the
//! stash and the backward's scratch, exactly what the backward holds, so the planner's peak
//! for the run is unchanged.

use super::{Alloc, GpuCtx, GpuPart, ProductWeights, Result, Weight, project, project_backward};
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::check_targets;
use crate::exec::model::params::head_param as hp;
use crate::plan::inventory::{CUDA_LOGITS_BLOCK_TOKENS, Part};

pub struct HeadStash {
    input: GpuTensor,
    final_norm_rstd: GpuTensor,
    targets: GpuTensor,
    /// Each token's loss (kept for the inventory: see the module's comment).
    token_loss: GpuTensor,
}

impl HeadStash {
    /// The stash of a micro-batch whose last layer's output is `input`, its targets uploaded.
    fn new(ctx: GpuCtx<'_>, a: &Alloc<'_>, input: GpuTensor, targets: &[i32]) -> Result<Self> {
        check_targets(targets, ctx.config.dims.vocab)?;
        let n = ctx.micro.tokens();
        if targets.len() != n {
            return Err(CudaError::Unsupported(format!(
                "{} targets for a micro-batch of {n} tokens",
                targets.len()
            )));
        }
        let mut st = HeadStash {
            input,
            final_norm_rstd: a.stash("final_norm_rstd")?,
            targets: a.stash("targets")?,
            token_loss: a.stash("token_loss")?,
        };
        st.targets.copy_from_host(ctx.gpu, targets)?;
        Ok(st)
    }

    /// Every kept tensor moved into `to` (see [`GpuTensor::relocate`]).
    pub fn relocate(self, gpu: &Gpu, to: &PoolRef, to_host: bool) -> Result<Self> {
        let g = MemGroup::Activations;
        Ok(HeadStash {
            input: self.input.relocate(gpu, to, g, to_host)?,
            final_norm_rstd: self.final_norm_rstd.relocate(gpu, to, g, to_host)?,
            targets: self.targets.relocate(gpu, to, g, to_host)?,
            token_loss: self.token_loss.relocate(gpu, to, g, to_host)?,
        })
    }

    /// Makes the compute stream wait for any prefetch into the stash.
    pub fn await_ready(&self, gpu: &Gpu) -> Result<()> {
        self.input.await_ready(gpu)?;
        self.final_norm_rstd.await_ready(gpu)?;
        self.targets.await_ready(gpu)?;
        self.token_loss.await_ready(gpu)
    }

    /// The head's input, all a recompute needs.
    pub fn into_input(self) -> GpuTensor {
        self.input
    }

    /// The micro-batch's loss: the tokens' losses summed in token order in f64, as the CPU
    /// head sums them (waits for the stream).
    fn loss(&self, gpu: &Gpu) -> Result<f64> {
        let losses = self.token_loss.to_host::<f32>(gpu)?;
        Ok(losses.iter().map(|&l| l as f64).sum())
    }
}

/// Final norm, LM head and cross-entropy; returns the stash and the summed loss.
pub fn head_forward(
    ctx: GpuCtx<'_>,
    p: &GpuPart,
    input: GpuTensor,
    targets: &[i32],
) -> Result<(HeadStash, f64)> {
    let (gpu, d) = (ctx.gpu, ctx.config.dims);
    let (n, h, v) = (ctx.micro.tokens(), d.hidden, d.vocab);
    let a = Alloc::new(ctx, Part::Head);
    let st = HeadStash::new(ctx, &a, input, targets)?;
    let norm_out = a.fwd("norm_out")?;
    let logits = a.fwd("logits_block")?;
    let products = ProductWeights::of(gpu, p)?;
    let lm_head = products.get(p, hp::LM_HEAD);
    normalise(ctx, p, &st, &norm_out)?;
    for t0 in (0..n).step_by(CUDA_LOGITS_BLOCK_TOKENS) {
        let bt = CUDA_LOGITS_BLOCK_TOKENS.min(n - t0);
        project(gpu, logits.ptr(), norm_out.at(t0 * h), lm_head, bt, false)?;
        gpu.ce_forward(st.token_loss.at(t0), logits.ptr(), st.targets.at(t0), bt, v)?;
    }
    let loss = st.loss(gpu)?;
    Ok((st, loss))
}

/// Backward with the loss scaled by `scale`; returns the gradient of the head's input.
pub fn head_backward(
    ctx: GpuCtx<'_>,
    p: &mut GpuPart,
    st: HeadStash,
    scale: f32,
) -> Result<GpuTensor> {
    let (gpu, d) = (ctx.gpu, ctx.config.dims);
    let a = Alloc::new(ctx, Part::Head);
    let norm_out = a.bwd("norm_out")?;
    let products = ProductWeights::of(gpu, p)?;
    let lm_head = products.get(p, hp::LM_HEAD);
    gpu.rmsnorm_apply(
        norm_out.ptr(),
        st.final_norm_rstd.ptr(),
        st.input.ptr(),
        p.weights[hp::NORM].ptr(),
        ctx.micro.tokens(),
        d.hidden,
    )?;
    backward_from_norm(ctx, &a, p, &st, &norm_out, lm_head, scale, false)
}

/// [`head_forward`] then [`head_backward`] in one pass: returns the gradient of the head's
/// input and the micro-batch's summed loss.
pub fn head_forward_backward(
    ctx: GpuCtx<'_>,
    p: &mut GpuPart,
    input: GpuTensor,
    targets: &[i32],
    scale: f32,
) -> Result<(GpuTensor, f64)> {
    let a = Alloc::new(ctx, Part::Head);
    let st = HeadStash::new(ctx, &a, input, targets)?;
    let norm_out = a.bwd("norm_out")?;
    let products = ProductWeights::of(ctx.gpu, p)?;
    let lm_head = products.get(p, hp::LM_HEAD);
    normalise(ctx, p, &st, &norm_out)?;
    let grad = backward_from_norm(ctx, &a, p, &st, &norm_out, lm_head, scale, true)?;
    Ok((grad, st.loss(ctx.gpu)?))
}

/// The final RMSNorm of the stash's input into `norm_out`, keeping 1/rms in the stash.
fn normalise(ctx: GpuCtx<'_>, p: &GpuPart, st: &HeadStash, norm_out: &GpuTensor) -> Result<()> {
    ctx.gpu.rmsnorm_forward(
        norm_out.ptr(),
        st.final_norm_rstd.ptr(),
        st.input.ptr(),
        p.weights[hp::NORM].ptr(),
        ctx.micro.tokens(),
        ctx.config.dims.hidden,
        ctx.config.rms_norm_eps,
    )
}

/// The backward from the normalised input: per block of tokens, the logits, their gradient
/// (and, with `with_losses`, the tokens' losses into the stash) and both products; then the
/// norm's backward. Returns the gradient of the head's input.
#[allow(clippy::too_many_arguments)]
fn backward_from_norm(
    ctx: GpuCtx<'_>,
    a: &Alloc<'_>,
    p: &GpuPart,
    st: &HeadStash,
    norm_out: &GpuTensor,
    lm_head: Weight,
    scale: f32,
    with_losses: bool,
) -> Result<GpuTensor> {
    let (gpu, d) = (ctx.gpu, ctx.config.dims);
    let (n, h, v) = (ctx.micro.tokens(), d.hidden, d.vocab);
    let logits = a.bwd("logits_block")?;
    let d_norm_out = a.bwd("d_norm_out")?;
    let (w, g) = (&p.weights, &p.grads);
    for t0 in (0..n).step_by(CUDA_LOGITS_BLOCK_TOKENS) {
        let bt = CUDA_LOGITS_BLOCK_TOKENS.min(n - t0);
        let x = norm_out.at(t0 * h);
        project(gpu, logits.ptr(), x, lm_head, bt, false)?;
        let losses = with_losses.then(|| st.token_loss.at(t0));
        gpu.ce_backward(logits.ptr(), losses, st.targets.at(t0), bt, v, scale)?;
        let dx = d_norm_out.at(t0 * h);
        project_backward(
            gpu,
            &g[hp::LM_HEAD],
            dx,
            logits.ptr(),
            x,
            lm_head,
            bt,
            false,
        )?;
    }
    gpu.rmsnorm_backward(
        d_norm_out.ptr(),
        g[hp::NORM].ptr(),
        st.input.ptr(),
        w[hp::NORM].ptr(),
        st.final_norm_rstd.ptr(),
        n,
        h,
    )?;
    Ok(d_norm_out)
}
