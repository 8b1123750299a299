//! One decoder layer: RMSNorm → grouped-query attention with RoPE → residual → RMSNorm →
//! SwiGLU MLP → residual. Shapes: n = tokens of the micro-batch, h = hidden, kv = kv_width,
//! f = ffn.

use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::exec::kernels::attention::AttnShape;
use crate::exec::kernels::matmul::MatRef;
use crate::exec::model::params::layer_param as lp;
use crate::exec::model::{InventoryAlloc, ModelError, PartCtx, PartParams};
use crate::exec::tensor::Tensor;
use crate::plan::inventory::Part;

/// What a layer keeps from forward to backward (the `cpu-f32` inventory's `stash`).
#[derive(Debug)]
pub struct LayerStash {
    /// [n, h] the layer's input (the previous part's output).
    pub input: Tensor,
    /// [n] 1/rms of `input`.
    pub attn_norm_rstd: Tensor,
    /// [n, h] queries after RoPE.
    pub q: Tensor,
    /// [n, kv] keys after RoPE.
    pub k: Tensor,
    /// [n, kv]
    pub v: Tensor,
    /// [n, h] attention output before o_proj.
    pub attn_out: Tensor,
    /// [batch, heads, seq] log-sum-exp of each query's scores.
    pub attn_lse: Tensor,
    /// [n, h] input + attention branch.
    pub resid_mid: Tensor,
    /// [n] 1/rms of `resid_mid`.
    pub mlp_norm_rstd: Tensor,
    /// [n, f]
    pub gate: Tensor,
    /// [n, f]
    pub up: Tensor,
}

impl LayerStash {
    /// Moves every kept tensor to another pool (offload to the host and prefetch back).
    pub fn transfer(self, to: &PoolRef) -> Result<Self, DeviceError> {
        let g = MemGroup::Activations;
        Ok(LayerStash {
            input: self.input.transfer(to, g)?,
            attn_norm_rstd: self.attn_norm_rstd.transfer(to, g)?,
            q: self.q.transfer(to, g)?,
            k: self.k.transfer(to, g)?,
            v: self.v.transfer(to, g)?,
            attn_out: self.attn_out.transfer(to, g)?,
            attn_lse: self.attn_lse.transfer(to, g)?,
            resid_mid: self.resid_mid.transfer(to, g)?,
            mlp_norm_rstd: self.mlp_norm_rstd.transfer(to, g)?,
            gate: self.gate.transfer(to, g)?,
            up: self.up.transfer(to, g)?,
        })
    }

    pub fn bytes(&self) -> usize {
        [
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
        ]
        .iter()
        .map(|t| t.bytes())
        .sum()
    }
}

fn rows(t: &Tensor) -> MatRef<'_> {
    MatRef::rows(t.data(), t.shape()[0], t.shape()[1])
}

/// Runs the layer on `input` [n, h]; returns its stash and its output [n, h].
pub fn layer_forward(
    ctx: &PartCtx<'_>,
    params: &PartParams,
    input: Tensor,
) -> Result<(LayerStash, Tensor), ModelError> {
    let (be, cfg, m) = (ctx.backend, ctx.config, ctx.micro);
    let d = cfg.dims;
    let a = InventoryAlloc::new(ctx, Part::Layer);
    let input = input.renamed("input");
    a.check(&input, &a.inventory().stash, "input")?;
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
    let mut norm_out = a.forward_scratch("norm_out")?;
    let mut act = a.forward_scratch("act")?;
    let mut output = a.output()?;
    let w = &params.weights;

    // Attention block.
    be.rmsnorm_forward(
        norm_out.data_mut(),
        st.attn_norm_rstd.data_mut(),
        st.input.data(),
        w[lp::INPUT_NORM].data(),
        cfg.rms_norm_eps,
    );
    for (dst, wi) in [(&mut st.q, lp::Q), (&mut st.k, lp::K), (&mut st.v, lp::V)] {
        be.matmul(dst.data_mut(), rows(&norm_out), rows(&w[wi]).t(), false);
    }
    let hd = d.head_dim();
    be.rope(st.q.data_mut(), d.hidden, m.seq, hd, &cfg.rope, false);
    be.rope(st.k.data_mut(), d.kv_width(), m.seq, hd, &cfg.rope, false);
    be.attention_forward(
        st.attn_out.data_mut(),
        st.attn_lse.data_mut(),
        st.q.data(),
        st.k.data(),
        st.v.data(),
        attn_shape(ctx),
    );
    // resid_mid = input + attn_out · Wo^T, the residual added by the product itself.
    be.copy(st.resid_mid.data_mut(), st.input.data());
    be.matmul(
        st.resid_mid.data_mut(),
        rows(&st.attn_out),
        rows(&w[lp::O]).t(),
        true,
    );

    // MLP block.
    be.rmsnorm_forward(
        norm_out.data_mut(),
        st.mlp_norm_rstd.data_mut(),
        st.resid_mid.data(),
        w[lp::POST_NORM].data(),
        cfg.rms_norm_eps,
    );
    be.matmul(
        st.gate.data_mut(),
        rows(&norm_out),
        rows(&w[lp::GATE]).t(),
        false,
    );
    be.matmul(
        st.up.data_mut(),
        rows(&norm_out),
        rows(&w[lp::UP]).t(),
        false,
    );
    be.swiglu_forward(act.data_mut(), st.gate.data(), st.up.data());
    be.copy(output.data_mut(), st.resid_mid.data());
    be.matmul(output.data_mut(), rows(&act), rows(&w[lp::DOWN]).t(), true);
    Ok((st, output))
}

pub(crate) fn attn_shape(ctx: &PartCtx<'_>) -> AttnShape {
    let d = ctx.config.dims;
    AttnShape {
        batch: ctx.micro.batch,
        seq: ctx.micro.seq,
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim(),
    }
}

/// Adds this micro-batch's parameter gradients and returns the gradient of the layer's input
/// [n, h] (named `grad_output`: it is the previous part's incoming gradient).
pub fn layer_backward(
    ctx: &PartCtx<'_>,
    params: &mut PartParams,
    st: LayerStash,
    grad_output: Tensor,
) -> Result<Tensor, ModelError> {
    let (be, cfg, m) = (ctx.backend, ctx.config, ctx.micro);
    let d = cfg.dims;
    let a = InventoryAlloc::new(ctx, Part::Layer);
    a.check(&grad_output, &a.inventory().backward_scratch, "grad_output")?;
    let mut norm_out = a.backward_scratch("norm_out")?;
    let mut act = a.backward_scratch("act")?;
    let mut d_gate = a.backward_scratch("d_gate")?;
    let mut d_up = a.backward_scratch("d_up")?;
    let mut d_norm_out = a.backward_scratch("d_norm_out")?;
    let mut d_resid_mid = a.backward_scratch("d_resid_mid")?;
    let mut d_attn_out = a.backward_scratch("d_attn_out")?;
    let mut d_q = a.backward_scratch("d_q")?;
    let mut d_k = a.backward_scratch("d_k")?;
    let mut d_v = a.backward_scratch("d_v")?;
    let mut attn_delta = a.backward_scratch("attn_delta")?;
    let PartParams {
        weights: w,
        grads: g,
        ..
    } = params;
    let dy = &grad_output;

    // MLP block, recomputing its normalised input and (with SwiGLU's backward) its activation
    // from the stash.
    be.rmsnorm_apply(
        norm_out.data_mut(),
        st.mlp_norm_rstd.data(),
        st.resid_mid.data(),
        w[lp::POST_NORM].data(),
    );
    be.matmul(d_up.data_mut(), rows(dy), rows(&w[lp::DOWN]), false);
    be.swiglu_backward(
        act.data_mut(),
        d_gate.data_mut(),
        d_up.data_mut(),
        st.gate.data(),
        st.up.data(),
    );
    be.matmul(g[lp::DOWN].data_mut(), rows(dy).t(), rows(&act), true);
    be.matmul(
        g[lp::GATE].data_mut(),
        rows(&d_gate).t(),
        rows(&norm_out),
        true,
    );
    be.matmul(g[lp::UP].data_mut(), rows(&d_up).t(), rows(&norm_out), true);
    be.matmul(
        d_norm_out.data_mut(),
        rows(&d_gate),
        rows(&w[lp::GATE]),
        false,
    );
    be.matmul(d_norm_out.data_mut(), rows(&d_up), rows(&w[lp::UP]), true);
    be.rmsnorm_backward(
        d_norm_out.data_mut(),
        g[lp::POST_NORM].data_mut(),
        st.resid_mid.data(),
        w[lp::POST_NORM].data(),
        st.mlp_norm_rstd.data(),
    );
    be.copy(d_resid_mid.data_mut(), dy.data());
    be.add(d_resid_mid.data_mut(), d_norm_out.data());

    // Attention block.
    be.matmul(
        g[lp::O].data_mut(),
        rows(&d_resid_mid).t(),
        rows(&st.attn_out),
        true,
    );
    be.matmul(
        d_attn_out.data_mut(),
        rows(&d_resid_mid),
        rows(&w[lp::O]),
        false,
    );
    be.attention_backward(
        d_q.data_mut(),
        d_k.data_mut(),
        d_v.data_mut(),
        attn_delta.data_mut(),
        d_attn_out.data(),
        st.q.data(),
        st.k.data(),
        st.v.data(),
        st.attn_out.data(),
        st.attn_lse.data(),
        attn_shape(ctx),
    );
    let hd = d.head_dim();
    be.rope(d_q.data_mut(), d.hidden, m.seq, hd, &cfg.rope, true);
    be.rope(d_k.data_mut(), d.kv_width(), m.seq, hd, &cfg.rope, true);
    be.rmsnorm_apply(
        norm_out.data_mut(),
        st.attn_norm_rstd.data(),
        st.input.data(),
        w[lp::INPUT_NORM].data(),
    );
    let projections = [(&d_q, lp::Q), (&d_k, lp::K), (&d_v, lp::V)];
    for (dp, wi) in projections {
        be.matmul(g[wi].data_mut(), rows(dp).t(), rows(&norm_out), true);
    }
    for (i, (dp, wi)) in projections.into_iter().enumerate() {
        be.matmul(d_norm_out.data_mut(), rows(dp), rows(&w[wi]), i > 0);
    }
    be.rmsnorm_backward(
        d_norm_out.data_mut(),
        g[lp::INPUT_NORM].data_mut(),
        st.input.data(),
        w[lp::INPUT_NORM].data(),
        st.attn_norm_rstd.data(),
    );
    be.add(d_resid_mid.data_mut(), d_norm_out.data());
    Ok(d_resid_mid.renamed("grad_output"))
}
