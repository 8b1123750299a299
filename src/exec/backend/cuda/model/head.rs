//! Final norm, LM head and cross-entropy on the GPU, logits a block of tokens at a time.

use super::{Alloc, GpuCtx, GpuPart, Result, project, project_backward};
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::check_tokens;
use crate::exec::model::params::head_param as hp;
use crate::plan::inventory::{CUDA_LOGITS_BLOCK_TOKENS, Part};

pub struct HeadStash {
    input: GpuTensor,
    final_norm_rstd: GpuTensor,
    targets: GpuTensor,
}

impl HeadStash {
    /// Every kept tensor moved into `to` (see [`GpuTensor::relocate`]).
    pub fn relocate(self, gpu: &Gpu, to: &PoolRef, to_host: bool) -> Result<Self> {
        let g = MemGroup::Activations;
        Ok(HeadStash {
            input: self.input.relocate(gpu, to, g, to_host)?,
            final_norm_rstd: self.final_norm_rstd.relocate(gpu, to, g, to_host)?,
            targets: self.targets.relocate(gpu, to, g, to_host)?,
        })
    }

    /// Makes the compute stream wait for any prefetch into the stash.
    pub fn await_ready(&self, gpu: &Gpu) -> Result<()> {
        self.input.await_ready(gpu)?;
        self.final_norm_rstd.await_ready(gpu)?;
        self.targets.await_ready(gpu)
    }

    /// The head's input, all a recompute needs.
    pub fn into_input(self) -> GpuTensor {
        self.input
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
    check_tokens("targets", targets, d.vocab)?;
    let (n, h, v) = (ctx.micro.tokens(), d.hidden, d.vocab);
    let a = Alloc::new(ctx, Part::Head);
    let mut st = HeadStash {
        input,
        final_norm_rstd: a.stash("final_norm_rstd")?,
        targets: a.stash("targets")?,
    };
    if targets.len() != n {
        return Err(CudaError::Unsupported(format!(
            "{} targets for a micro-batch of {n} tokens",
            targets.len()
        )));
    }
    st.targets.copy_from_host(gpu, targets)?;
    let norm_out = a.fwd("norm_out")?;
    let logits = a.fwd("logits_block")?;
    let token_loss = a.fwd("token_loss")?;
    let w = &p.weights;
    let products = a.product_weights(p, false)?;
    let lm_head = products.get(p, hp::LM_HEAD);
    gpu.rmsnorm_forward(
        norm_out.ptr(),
        st.final_norm_rstd.ptr(),
        st.input.ptr(),
        w[hp::NORM].ptr(),
        n,
        h,
        ctx.config.rms_norm_eps,
    )?;
    for t0 in (0..n).step_by(CUDA_LOGITS_BLOCK_TOKENS) {
        let bt = CUDA_LOGITS_BLOCK_TOKENS.min(n - t0);
        project(gpu, logits.ptr(), norm_out.at(t0 * h), lm_head, bt, false)?;
        gpu.ce_forward(token_loss.at(t0), logits.ptr(), st.targets.at(t0), bt, v)?;
    }
    // Summed in token order in f64, as the CPU head does.
    let loss: f64 = token_loss
        .to_host::<f32>(gpu)?
        .iter()
        .map(|&l| l as f64)
        .sum();
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
    let (n, h, v) = (ctx.micro.tokens(), d.hidden, d.vocab);
    let a = Alloc::new(ctx, Part::Head);
    let norm_out = a.bwd("norm_out")?;
    let logits = a.bwd("logits_block")?;
    let d_norm_out = a.bwd("d_norm_out")?;
    let products = a.product_weights(p, true)?;
    let lm_head = products.get(p, hp::LM_HEAD);
    let (w, g) = (&p.weights, &p.grads);
    gpu.rmsnorm_apply(
        norm_out.ptr(),
        st.final_norm_rstd.ptr(),
        st.input.ptr(),
        w[hp::NORM].ptr(),
        n,
        h,
    )?;
    for t0 in (0..n).step_by(CUDA_LOGITS_BLOCK_TOKENS) {
        let bt = CUDA_LOGITS_BLOCK_TOKENS.min(n - t0);
        let x = norm_out.at(t0 * h);
        project(gpu, logits.ptr(), x, lm_head, bt, false)?;
        gpu.ce_backward(logits.ptr(), st.targets.at(t0), bt, v, scale)?;
        project_backward(
            gpu,
            &g[hp::LM_HEAD],
            d_norm_out.at(t0 * h),
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
