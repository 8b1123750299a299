//! One decoder layer on the GPU: the CPU layer's steps, with the attention of
//! `cuda::attention`.

use super::projection::{project_each, project_input_grad, weight_grads_each};
use super::{Alloc, GpuCtx, GpuPart, ProductWeights, Result, Weight, project, project_backward};
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::{DevPtr, GpuTensor};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::params::layer_param as lp;
use crate::plan::inventory::Part;

/// The layer's kept tensors: the CPU `LayerStash`'s names and shapes.
pub struct LayerStash {
    input: GpuTensor,
    attn_norm_rstd: GpuTensor,
    q: GpuTensor,
    k: GpuTensor,
    v: GpuTensor,
    attn_out: GpuTensor,
    attn_lse: GpuTensor,
    resid_mid: GpuTensor,
    mlp_norm_rstd: GpuTensor,
    gate: GpuTensor,
    up: GpuTensor,
}

impl LayerStash {
    /// Every kept tensor moved into `to` (see [`GpuTensor::relocate`]).
    pub fn relocate(self, gpu: &Gpu, to: &PoolRef, to_host: bool) -> Result<Self> {
        let m = |t: GpuTensor| t.relocate(gpu, to, MemGroup::Activations, to_host);
        Ok(LayerStash {
            input: m(self.input)?,
            attn_norm_rstd: m(self.attn_norm_rstd)?,
            q: m(self.q)?,
            k: m(self.k)?,
            v: m(self.v)?,
            attn_out: m(self.attn_out)?,
            attn_lse: m(self.attn_lse)?,
            resid_mid: m(self.resid_mid)?,
            mlp_norm_rstd: m(self.mlp_norm_rstd)?,
            gate: m(self.gate)?,
            up: m(self.up)?,
        })
    }

    /// Makes the compute stream wait for any prefetch into the stash (see
    /// [`GpuTensor::await_ready`]).
    pub fn await_ready(&self, gpu: &Gpu) -> Result<()> {
        for t in [
            &self.input,
            &self.attn_norm_rstd,
            &self.q,
            &self.k,
            &self.v,
            &self.attn_out,
            &self.attn_lse,
            &self.resid_mid,
            &self.mlp_norm_rstd,
            &self.gate,
            &self.up,
        ] {
            t.await_ready(gpu)?;
        }
        Ok(())
    }

    /// The layer's input, all a recompute needs.
    pub fn into_input(self) -> GpuTensor {
        self.input
    }
}

pub fn layer_forward(
    ctx: GpuCtx<'_>,
    p: &GpuPart,
    input: GpuTensor,
) -> Result<(LayerStash, GpuTensor)> {
    let (gpu, cfg, m) = (ctx.gpu, ctx.config, ctx.micro);
    let d = cfg.dims;
    let (n, h, kv, f) = (m.tokens(), d.hidden, d.kv_width(), d.ffn);
    let a = Alloc::new(ctx, Part::Layer);
    let mut st = LayerStash {
        input,
        attn_norm_rstd: a.stash("attn_norm_rstd")?,
        q: a.stash("q")?,
        k: a.stash("k")?,
        v: a.stash("v")?,
        attn_out: a.stash("attn_out")?,
        attn_lse: a.stash("attn_lse")?,
        resid_mid: a.stash("resid_mid")?,
        mlp_norm_rstd: a.stash("mlp_norm_rstd")?,
        gate: a.stash("gate")?,
        up: a.stash("up")?,
    };
    let norm_out = a.fwd("norm_out")?;
    let act = a.fwd("act")?;
    let scores = (!ctx.flash_attention())
        .then(|| a.fwd("attn_scores"))
        .transpose()?;
    let mut output = a.output()?;
    let w = &p.weights;
    let pw = ProductWeights::of(gpu, p)?;
    let pw = |i| pw.get(p, i);
    let hd = d.head_dim();

    gpu.rmsnorm_forward(
        norm_out.ptr(),
        st.attn_norm_rstd.ptr(),
        st.input.ptr(),
        w[lp::INPUT_NORM].ptr(),
        n,
        h,
        cfg.rms_norm_eps,
    )?;
    let qkv = [(&st.q, lp::Q), (&st.k, lp::K), (&st.v, lp::V)].map(|(t, i)| (t.ptr(), pw(i)));
    project_each(gpu, norm_out.ptr(), &qkv, n)?;
    gpu.rope(st.q.ptr(), n, h, m.seq, hd, &cfg.rope, false)?;
    gpu.rope(st.k.ptr(), n, kv, m.seq, hd, &cfg.rope, false)?;
    match &scores {
        None => gpu.flash_attention_forward(
            (st.attn_out.ptr(), st.attn_lse.ptr()),
            (st.q.ptr(), st.k.ptr(), st.v.ptr()),
            ctx.attn_shape(),
        )?,
        Some(scores) => gpu.attention_forward(
            st.attn_out.ptr(),
            st.attn_lse.ptr(),
            st.q.ptr(),
            st.k.ptr(),
            st.v.ptr(),
            scores.ptr(),
            ctx.attn_shape(),
        )?,
    }
    st.resid_mid.copy_from(gpu, &st.input)?;
    project(
        gpu,
        st.resid_mid.ptr(),
        st.attn_out.ptr(),
        pw(lp::O),
        n,
        true,
    )?;

    gpu.rmsnorm_forward(
        norm_out.ptr(),
        st.mlp_norm_rstd.ptr(),
        st.resid_mid.ptr(),
        w[lp::POST_NORM].ptr(),
        n,
        h,
        cfg.rms_norm_eps,
    )?;
    let gate_up = [(st.gate.ptr(), pw(lp::GATE)), (st.up.ptr(), pw(lp::UP))];
    project_each(gpu, norm_out.ptr(), &gate_up, n)?;
    gpu.swiglu_forward(act.ptr(), st.gate.ptr(), st.up.ptr(), n * f)?;
    output.copy_from(gpu, &st.resid_mid)?;
    project(gpu, output.ptr(), act.ptr(), pw(lp::DOWN), n, true)?;
    Ok((st, output))
}

/// Adds the micro-batch's parameter gradients; returns the gradient of the layer's input.
pub fn layer_backward(
    ctx: GpuCtx<'_>,
    p: &mut GpuPart,
    st: LayerStash,
    grad_output: GpuTensor,
) -> Result<GpuTensor> {
    let (gpu, cfg, m) = (ctx.gpu, ctx.config, ctx.micro);
    let d = cfg.dims;
    let (n, h, kv, f) = (m.tokens(), d.hidden, d.kv_width(), d.ffn);
    let a = Alloc::new(ctx, Part::Layer);
    let norm_out = a.bwd("norm_out")?;
    let act = a.bwd("act")?;
    let d_gate = a.bwd("d_gate")?;
    let d_up = a.bwd("d_up")?;
    let d_norm_out = a.bwd("d_norm_out")?;
    let d_resid_mid = a.bwd("d_resid_mid")?;
    let d_attn_out = a.bwd("d_attn_out")?;
    let d_q = a.bwd("d_q")?;
    let d_k = a.bwd("d_k")?;
    let d_v = a.bwd("d_v")?;
    let attn_delta = a.bwd("attn_delta")?;
    let mut attn_scratch = if ctx.flash_attention() {
        AttnScratch::Flash(a.bwd("attn_dq_acc")?)
    } else {
        AttnScratch::Scores(a.bwd("attn_scores")?, a.bwd("attn_d_scores")?)
    };
    let pw = ProductWeights::of(gpu, p)?;
    let pw = |i| pw.get(p, i);
    let (w, g) = (&p.weights, &p.grads);
    let dy = grad_output.ptr();
    let hd = d.head_dim();

    // MLP block, recomputing its normalised input and activation from the stash.
    gpu.rmsnorm_apply(
        norm_out.ptr(),
        st.mlp_norm_rstd.ptr(),
        st.resid_mid.ptr(),
        w[lp::POST_NORM].ptr(),
        n,
        h,
    )?;
    gpu.swiglu_forward(act.ptr(), st.gate.ptr(), st.up.ptr(), n * f)?;
    project_backward(
        gpu,
        &g[lp::DOWN],
        d_up.ptr(),
        dy,
        act.ptr(),
        pw(lp::DOWN),
        n,
        false,
    )?;
    gpu.swiglu_backward(d_gate.ptr(), d_up.ptr(), st.gate.ptr(), st.up.ptr(), n * f)?;
    let gate_up = [(&d_gate, lp::GATE), (&d_up, lp::UP)];
    projections_backward(gpu, p, &pw, &gate_up, d_norm_out.ptr(), norm_out.ptr(), n)?;
    gpu.rmsnorm_backward(
        d_norm_out.ptr(),
        g[lp::POST_NORM].ptr(),
        st.resid_mid.ptr(),
        w[lp::POST_NORM].ptr(),
        st.mlp_norm_rstd.ptr(),
        n,
        h,
    )?;
    gpu.add(d_resid_mid.ptr(), dy, d_norm_out.ptr(), n * h)?;

    // Attention block.
    project_backward(
        gpu,
        &g[lp::O],
        d_attn_out.ptr(),
        d_resid_mid.ptr(),
        st.attn_out.ptr(),
        pw(lp::O),
        n,
        false,
    )?;
    let grads = (d_q.ptr(), d_k.ptr(), d_v.ptr(), attn_delta.ptr());
    let kept = (
        st.q.ptr(),
        st.k.ptr(),
        st.v.ptr(),
        st.attn_out.ptr(),
        st.attn_lse.ptr(),
    );
    let sh = ctx.attn_shape();
    match &mut attn_scratch {
        AttnScratch::Flash(dq_acc) => {
            dq_acc.fill_zero(gpu)?;
            gpu.flash_attention_backward(grads, d_attn_out.ptr(), kept, dq_acc.ptr(), sh)?;
        }
        AttnScratch::Scores(scores, d_scores) => {
            let scratch = (scores.ptr(), d_scores.ptr());
            gpu.attention_backward(grads, d_attn_out.ptr(), kept, scratch, sh)?;
        }
    }
    gpu.rope(d_q.ptr(), n, h, m.seq, hd, &cfg.rope, true)?;
    gpu.rope(d_k.ptr(), n, kv, m.seq, hd, &cfg.rope, true)?;
    gpu.rmsnorm_apply(
        norm_out.ptr(),
        st.attn_norm_rstd.ptr(),
        st.input.ptr(),
        w[lp::INPUT_NORM].ptr(),
        n,
        h,
    )?;
    let qkv = [(&d_q, lp::Q), (&d_k, lp::K), (&d_v, lp::V)];
    projections_backward(gpu, p, &pw, &qkv, d_norm_out.ptr(), norm_out.ptr(), n)?;
    gpu.rmsnorm_backward(
        d_norm_out.ptr(),
        g[lp::INPUT_NORM].ptr(),
        st.input.ptr(),
        w[lp::INPUT_NORM].ptr(),
        st.attn_norm_rstd.ptr(),
        n,
        h,
    )?;
    gpu.add(
        d_resid_mid.ptr(),
        d_resid_mid.ptr(),
        d_norm_out.ptr(),
        n * h,
    )?;
    Ok(d_resid_mid)
}

/// Backward of projections of one input `x` (each output's gradient with its weight index):
/// their weight gradients, then `dx` as the sum of their inputs' gradients.
fn projections_backward(
    gpu: &Gpu,
    p: &GpuPart,
    pw: &dyn Fn(usize) -> Weight,
    outputs: &[(&GpuTensor, usize)],
    dx: DevPtr,
    x: DevPtr,
    n: usize,
) -> Result<()> {
    let grads: Vec<_> = (outputs.iter())
        .map(|&(dy, i)| (&p.grads[i], dy.ptr(), pw(i)))
        .collect();
    weight_grads_each(gpu, x, &grads, n)?;
    for (j, &(dy, i)) in outputs.iter().enumerate() {
        project_input_grad(gpu, dx, dy.ptr(), pw(i), n, j > 0)?;
    }
    Ok(())
}

/// A layer backward's attention scratch, held for the whole backward as the inventory says:
/// the flash kernels' f32 dQ accumulator, or the scores and their gradient for cuBLAS.
enum AttnScratch {
    Flash(GpuTensor),
    Scores(GpuTensor, GpuTensor),
}
