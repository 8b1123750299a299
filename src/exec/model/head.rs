//! The head: final RMSNorm, LM head and cross-entropy, fused so logits exist a block at a time.

use crate::exec::device::{DeviceError, MemGroup, PoolRef};
use crate::exec::kernels::cross_entropy::HeadShape;
use crate::exec::kernels::matmul::MatRef;
use crate::exec::model::params::head_param as hp;
use crate::exec::model::{InventoryAlloc, ModelError, PartCtx, PartParams, check_targets};
use crate::exec::tensor::Tensor;
use crate::plan::inventory::{Part, logits_block_tokens};

/// What the head keeps from forward to backward.
#[derive(Debug)]
pub struct HeadStash {
    /// [n, h] the last layer's output.
    pub input: Tensor,
    /// [n] 1/rms of `input`.
    pub final_norm_rstd: Tensor,
    /// [n] i32 next-token targets.
    pub targets: Tensor<i32>,
}

impl HeadStash {
    pub fn transfer(self, to: &PoolRef) -> Result<Self, DeviceError> {
        let g = MemGroup::Activations;
        Ok(HeadStash {
            input: self.input.transfer(to, g)?,
            final_norm_rstd: self.final_norm_rstd.transfer(to, g)?,
            targets: self.targets.transfer(to, g)?,
        })
    }
}

fn head_shape(ctx: &PartCtx<'_>) -> HeadShape {
    HeadShape {
        tokens: ctx.micro.tokens(),
        hidden: ctx.config.dims.hidden,
        vocab: ctx.config.dims.vocab,
        block: logits_block_tokens(ctx.config.dims.vocab),
    }
}

/// Returns the stash and the micro-batch's summed (not averaged) cross-entropy.
pub fn head_forward(
    ctx: &PartCtx<'_>,
    params: &PartParams,
    input: Tensor,
    targets: &[i32],
) -> Result<(HeadStash, f64), ModelError> {
    let be = ctx.backend;
    check_targets(targets, ctx.config.dims.vocab)?;
    let a = InventoryAlloc::new(ctx, Part::Head);
    let input = input.renamed("input");
    a.check(&input, &a.inventory().stash, "input")?;
    let mut st = HeadStash {
        input,
        final_norm_rstd: a.stash("final_norm_rstd")?,
        targets: a.stash("targets")?,
    };
    if targets.len() != st.targets.len() {
        return Err(ModelError::ShapeMismatch {
            what: "targets".into(),
            got: vec![targets.len()],
            want: st.targets.shape().to_vec(),
        });
    }
    st.targets.data_mut().copy_from_slice(targets);
    let mut norm_out = a.forward_scratch("norm_out")?;
    let mut logits_block = a.forward_scratch("logits_block")?;
    let w = &params.weights;
    be.rmsnorm_forward(
        norm_out.data_mut(),
        st.final_norm_rstd.data_mut(),
        st.input.data(),
        w[hp::NORM].data(),
        ctx.config.rms_norm_eps,
    );
    let loss_sum = be.head_ce_forward(
        logits_block.data_mut(),
        norm_out.data(),
        w[hp::LM_HEAD].data(),
        st.targets.data(),
        head_shape(ctx),
    );
    Ok((st, loss_sum))
}

/// Adds the head's gradients for a loss scaled by `loss_scale` (1 / tokens of the step) and
/// returns the gradient of the head's input, named `grad_output` for the part before it.
pub fn head_backward(
    ctx: &PartCtx<'_>,
    params: &mut PartParams,
    st: HeadStash,
    loss_scale: f32,
) -> Result<Tensor, ModelError> {
    let be = ctx.backend;
    let a = InventoryAlloc::new(ctx, Part::Head);
    let mut norm_out = a.backward_scratch("norm_out")?;
    let mut logits_block = a.backward_scratch("logits_block")?;
    let mut d_norm_out = a.backward_scratch("d_norm_out")?;
    let PartParams {
        weights: w,
        grads: g,
        ..
    } = params;
    be.rmsnorm_apply(
        norm_out.data_mut(),
        st.final_norm_rstd.data(),
        st.input.data(),
        w[hp::NORM].data(),
    );
    be.head_ce_backward(
        d_norm_out.data_mut(),
        g[hp::LM_HEAD].data_mut(),
        logits_block.data_mut(),
        norm_out.data(),
        w[hp::LM_HEAD].data(),
        st.targets.data(),
        loss_scale,
        head_shape(ctx),
    );
    be.rmsnorm_backward(
        d_norm_out.data_mut(),
        g[hp::NORM].data_mut(),
        st.input.data(),
        w[hp::NORM].data(),
        st.final_norm_rstd.data(),
    );
    Ok(d_norm_out.renamed("grad_output"))
}

/// Full logits [n, vocab] of the head's input, for evaluation and tests. Host memory, not
/// counted: training never calls it.
pub fn head_logits(ctx: &PartCtx<'_>, params: &PartParams, input: &Tensor) -> Vec<f32> {
    let (n, h, v) = (
        ctx.micro.tokens(),
        ctx.config.dims.hidden,
        ctx.config.dims.vocab,
    );
    let (mut norm, mut rstd, mut logits) = (vec![0.0; n * h], vec![0.0; n], vec![0.0; n * v]);
    let w = &params.weights;
    ctx.backend.rmsnorm_forward(
        &mut norm,
        &mut rstd,
        input.data(),
        w[hp::NORM].data(),
        ctx.config.rms_norm_eps,
    );
    ctx.backend.matmul(
        &mut logits,
        MatRef::rows(&norm, n, h),
        MatRef::rows(w[hp::LM_HEAD].data(), v, h).t(),
        false,
    );
    logits
}
