//! One decoder layer: RMSNorm → grouped-query attention with RoPE (its q/k/v projections
//! biased where the architecture says so) → residual → RMSNorm →
//! SwiGLU MLP → residual. Shapes: n = tokens of the micro-batch, h = hidden, kv = kv_width,
//! f = ffn.

use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::{AttnGrads, AttnKept, AttnScratch, Backend};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::named::{layer_params, layer_weights};
use crate::exec::model::{InventoryAlloc, ModelBackend, ModelResult, PartCtx, PartParams};
use crate::plan::inventory::Part;

/// What a layer keeps from forward to backward (the inventory's `stash`).
#[derive(Debug)]
pub struct LayerStash<T> {
    /// [n, h] the layer's input (the previous part's output).
    pub input: T,
    /// [n] 1/rms of `input`.
    pub attn_norm_rstd: T,
    /// [n, h] queries after RoPE.
    pub q: T,
    /// [n, kv] keys after RoPE.
    pub k: T,
    /// [n, kv]
    pub v: T,
    /// [n, h] attention output before o_proj.
    pub attn_out: T,
    /// [batch, heads, seq] log-sum-exp of each query's scores.
    pub attn_lse: T,
    /// [n, h] input + attention branch.
    pub resid_mid: T,
    /// [n] 1/rms of `resid_mid`.
    pub mlp_norm_rstd: T,
    /// [n, f]
    pub gate: T,
    /// [n, f]
    pub up: T,
}

impl<T> LayerStash<T> {
    /// Every kept tensor moved into `to`: an offload to the host, or a prefetch back.
    pub fn relocate<B>(self, be: &B, to: &PoolRef, to_host: bool) -> Result<Self, B::Error>
    where
        B: Backend<Tensor = T>,
    {
        let m = |t| be.move_tensor(t, to, MemGroup::Activations, to_host);
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

    /// Orders the backward after any prefetch into the stash.
    pub fn await_ready<B: Backend<Tensor = T>>(&self, be: &B) -> Result<(), B::Error> {
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
        .into_iter()
        .try_for_each(|t| be.await_tensor(t))
    }
}

/// The attention scratch the backend's profile lists for a forward or a backward.
fn attn_scratch<B: ModelBackend>(
    a: &InventoryAlloc<'_, B>,
    backward: bool,
) -> Result<AttnScratch<B::Tensor>, B::Error> {
    Ok(AttnScratch {
        dq_acc: a.scratch_if_listed(backward, "attn_dq_acc")?,
        scores: a.scratch_if_listed(backward, "attn_scores")?,
        d_scores: a.scratch_if_listed(backward, "attn_d_scores")?,
    })
}

/// Runs the layer on `input` [n, h]; returns its stash and its output [n, h].
pub fn layer_forward<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &PartParams<B::Tensor>,
    input: B::Tensor,
) -> ModelResult<B, (LayerStash<B::Tensor>, B::Tensor)> {
    let (be, cfg, m) = (ctx.backend, ctx.config, ctx.micro);
    let d = cfg.dims;
    let a = InventoryAlloc::new(ctx, Part::Layer);
    let input = B::renamed(input, "input");
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
    let mut attn = attn_scratch(&a, false)?;
    let mut output = a.output()?;
    let w = layer_weights(be, params)?;
    let (hd, eps) = (d.head_dim(), cfg.rms_norm_eps);

    // Attention block.
    be.rmsnorm_forward(
        &mut norm_out,
        &mut st.attn_norm_rstd,
        &st.input,
        w.input_norm,
        eps,
    )?;
    be.project_each(
        &norm_out,
        &mut [(&mut st.q, w.q), (&mut st.k, w.k), (&mut st.v, w.v)],
    )?;
    if let Some([bq, bk, bv]) = w.qkv_bias {
        be.bias_add(&mut st.q, bq)?;
        be.bias_add(&mut st.k, bk)?;
        be.bias_add(&mut st.v, bv)?;
    }
    be.rope(&mut st.q, d.hidden, m.seq, hd, &cfg.rope, false)?;
    be.rope(&mut st.k, d.kv_width(), m.seq, hd, &cfg.rope, false)?;
    be.attention_forward(
        (&mut st.attn_out, &mut st.attn_lse),
        (&st.q, &st.k, &st.v),
        &mut attn,
        attn_shape(ctx),
    )?;
    // resid_mid = input + attn_out · Wo^T, the residual added by the product itself.
    be.copy(&mut st.resid_mid, &st.input)?;
    be.project(&mut st.resid_mid, &st.attn_out, w.o, true)?;

    // MLP block.
    be.rmsnorm_forward(
        &mut norm_out,
        &mut st.mlp_norm_rstd,
        &st.resid_mid,
        w.post_norm,
        eps,
    )?;
    be.project_each(&norm_out, &mut [(&mut st.gate, w.gate), (&mut st.up, w.up)])?;
    be.swiglu_forward(&mut act, &st.gate, &st.up)?;
    be.copy(&mut output, &st.resid_mid)?;
    be.project(&mut output, &act, w.down, true)?;
    Ok((st, output))
}

pub(crate) fn attn_shape<B>(ctx: &PartCtx<'_, B>) -> AttnShape {
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
pub fn layer_backward<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &mut PartParams<B::Tensor>,
    st: LayerStash<B::Tensor>,
    grad_output: B::Tensor,
) -> Result<B::Tensor, B::Error> {
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
    let mut attn = attn_scratch(&a, true)?;
    let (w, g) = layer_params(be, params)?;
    let dy = &grad_output;
    let hd = d.head_dim();

    // MLP block, recomputing its normalised input and activation from the stash.
    be.rmsnorm_apply(&mut norm_out, &st.mlp_norm_rstd, &st.resid_mid, w.post_norm)?;
    be.swiglu_down_backward(
        &mut act,
        &mut d_gate,
        &mut d_up,
        g.down,
        dy,
        (&st.gate, &st.up),
        w.down,
    )?;
    be.projections_backward(
        &mut d_norm_out,
        &norm_out,
        &mut [(g.gate, &d_gate, w.gate), (g.up, &d_up, w.up)],
    )?;
    be.rmsnorm_backward(
        &mut d_norm_out,
        g.post_norm,
        &st.resid_mid,
        w.post_norm,
        &st.mlp_norm_rstd,
    )?;
    be.sum(&mut d_resid_mid, dy, &d_norm_out)?;

    // Attention block.
    be.project_backward(g.o, &mut d_attn_out, &d_resid_mid, &st.attn_out, w.o, false)?;
    be.attention_backward(
        AttnGrads {
            dq: &mut d_q,
            dk: &mut d_k,
            dv: &mut d_v,
            delta: &mut attn_delta,
        },
        &d_attn_out,
        AttnKept {
            q: &st.q,
            k: &st.k,
            v: &st.v,
            out: &st.attn_out,
            lse: &st.attn_lse,
        },
        &mut attn,
        attn_shape(ctx),
    )?;
    be.rope(&mut d_q, d.hidden, m.seq, hd, &cfg.rope, true)?;
    be.rope(&mut d_k, d.kv_width(), m.seq, hd, &cfg.rope, true)?;
    if let Some([bq, bk, bv]) = g.qkv_bias {
        be.bias_backward(bq, &d_q)?;
        be.bias_backward(bk, &d_k)?;
        be.bias_backward(bv, &d_v)?;
    }
    be.rmsnorm_apply(&mut norm_out, &st.attn_norm_rstd, &st.input, w.input_norm)?;
    be.projections_backward(
        &mut d_norm_out,
        &norm_out,
        &mut [(g.q, &d_q, w.q), (g.k, &d_k, w.k), (g.v, &d_v, w.v)],
    )?;
    be.rmsnorm_backward(
        &mut d_norm_out,
        g.input_norm,
        &st.input,
        w.input_norm,
        &st.attn_norm_rstd,
    )?;
    be.add(&mut d_resid_mid, &d_norm_out)?;
    Ok(B::renamed(d_resid_mid, "grad_output"))
}
