//! The head: final RMSNorm, LM head and cross-entropy, fused so logits exist a block of
//! tokens at a time (the block is the inventory's `logits_block`).
//!
//! The pipeline runs the head's forward (the loss) and, later, its backward, which makes each
//! block's logits again. Where the backend's profile stashes each token's loss
//! (`token_loss`, the CUDA profiles), a forward followed at once by its backward can run as
//! one pass ([`head_forward_backward`]): one product per block for the logits instead of two,
//! the loss and its gradient together, one normalisation; it holds the stash and the
//! backward's scratch, exactly what the backward holds, so the planner's peak is unchanged.

use crate::exec::backend::cpu::kernels::cross_entropy::HeadShape;
use crate::exec::backend::cpu::kernels::matmul::MatRef;
use crate::exec::backend::{Backend, CpuBackend, HeadLoss};
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::named::{HeadGrads, HeadWeights, head_params, head_weights};
use crate::exec::model::{
    InventoryAlloc, ModelBackend, ModelError, ModelResult, PartCtx, PartParams, check_targets,
};
use crate::exec::tensor::Tensor;
use crate::plan::inventory::Part;

/// What the head keeps from forward to backward.
#[derive(Debug)]
pub struct HeadStash<T, I> {
    /// [n, h] the last layer's output.
    pub input: T,
    /// [n] 1/rms of `input`.
    pub final_norm_rstd: T,
    /// [n] i32 next-token targets.
    pub targets: I,
    /// [n] each token's loss, where the backend's profile keeps it (see the module's comment).
    pub token_loss: Option<T>,
}

impl<T, I> HeadStash<T, I> {
    /// Every kept tensor moved into `to`: an offload to the host, or a prefetch back.
    pub fn relocate<B>(self, be: &B, to: &PoolRef, to_host: bool) -> Result<Self, B::Error>
    where
        B: Backend<Tensor = T, Ids = I>,
    {
        let g = MemGroup::Activations;
        let m = |t| be.move_tensor(t, to, g, to_host);
        Ok(HeadStash {
            input: m(self.input)?,
            final_norm_rstd: m(self.final_norm_rstd)?,
            targets: be.move_ids(self.targets, to, g, to_host)?,
            token_loss: self.token_loss.map(m).transpose()?,
        })
    }

    /// Orders the backward after any prefetch into the stash.
    pub fn await_ready<B: Backend<Tensor = T, Ids = I>>(&self, be: &B) -> Result<(), B::Error> {
        be.await_tensor(&self.input)?;
        be.await_tensor(&self.final_norm_rstd)?;
        be.await_ids(&self.targets)?;
        self.token_loss.iter().try_for_each(|t| be.await_tensor(t))
    }

    /// The stash of a micro-batch whose last layer's output is `input`, its targets written.
    fn new<B>(
        a: &InventoryAlloc<'_, B>,
        be: &B,
        input: T,
        targets: &[i32],
    ) -> Result<Self, B::Error>
    where
        B: ModelBackend<Tensor = T, Ids = I>,
    {
        let input = B::renamed(input, "input");
        a.check(&input, &a.inventory().stash, "input")?;
        a.check_len(targets, "targets")?;
        let mut st = HeadStash {
            input,
            final_norm_rstd: a.stash("final_norm_rstd")?,
            targets: a.stash_ids("targets")?,
            token_loss: a.stash_if_listed("token_loss")?,
        };
        be.write_ids(&mut st.targets, targets)?;
        Ok(st)
    }
}

fn head_shape<B: ModelBackend>(ctx: &PartCtx<'_, B>, a: &InventoryAlloc<'_, B>) -> HeadShape {
    let d = ctx.config.dims;
    let block = (a.inventory().forward_scratch.iter())
        .find(|t| t.name == "logits_block")
        .map_or(1, |t| t.shape[0]);
    HeadShape {
        tokens: ctx.micro.tokens(),
        hidden: d.hidden,
        vocab: d.vocab,
        block,
    }
}

type Stash<B> = HeadStash<<B as Backend>::Tensor, <B as Backend>::Ids>;

/// Returns the stash and the micro-batch's summed (not averaged) cross-entropy.
pub fn head_forward<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &PartParams<B::Tensor>,
    input: B::Tensor,
    targets: &[i32],
) -> Result<(Stash<B>, f64), B::Error> {
    let be = ctx.backend;
    check_targets(targets, ctx.config.dims.vocab)?;
    let a = InventoryAlloc::new(ctx, Part::Head);
    let mut st = HeadStash::new(&a, be, input, targets)?;
    let mut norm_out = a.forward_scratch("norm_out")?;
    let mut logits_block = a.forward_scratch("logits_block")?;
    let w = head_weights(be, params)?;
    be.rmsnorm_forward(
        &mut norm_out,
        &mut st.final_norm_rstd,
        &st.input,
        w.norm,
        ctx.config.rms_norm_eps,
    )?;
    let head = HeadLoss {
        x: &norm_out,
        lm_head: w.lm_head,
        targets: &st.targets,
        shape: head_shape(ctx, &a),
    };
    let loss_sum = be.head_loss_forward(&mut logits_block, st.token_loss.as_mut(), head)?;
    Ok((st, loss_sum))
}

/// Adds the head's gradients for a loss scaled by `loss_scale` (1 / tokens of the step) and
/// returns the gradient of the head's input, named `grad_output` for the part before it.
pub fn head_backward<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &mut PartParams<B::Tensor>,
    st: Stash<B>,
    loss_scale: f32,
) -> Result<B::Tensor, B::Error> {
    let be = ctx.backend;
    let a = InventoryAlloc::new(ctx, Part::Head);
    let mut norm_out = a.backward_scratch("norm_out")?;
    let (w, g) = head_params(be, params)?;
    be.rmsnorm_apply(&mut norm_out, &st.final_norm_rstd, &st.input, w.norm)?;
    let (grad, _) = backward_from_norm(ctx, &a, (w, g), st, norm_out, loss_scale, false)?;
    Ok(grad)
}

/// [`head_forward`] then [`head_backward`], in one pass where the backend's profile stashes
/// each token's loss: returns the gradient of the head's input and the summed loss.
pub fn head_forward_backward<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &mut PartParams<B::Tensor>,
    input: B::Tensor,
    targets: &[i32],
    loss_scale: f32,
) -> Result<(B::Tensor, f64), B::Error> {
    let be = ctx.backend;
    let a = InventoryAlloc::new(ctx, Part::Head);
    if !a.inventory().stash.iter().any(|t| t.name == "token_loss") {
        let (st, loss) = head_forward(ctx, params, input, targets)?;
        return Ok((head_backward(ctx, params, st, loss_scale)?, loss));
    }
    check_targets(targets, ctx.config.dims.vocab)?;
    let mut st = HeadStash::new(&a, be, input, targets)?;
    let mut norm_out = a.backward_scratch("norm_out")?;
    let (w, g) = head_params(be, params)?;
    let eps = ctx.config.rms_norm_eps;
    be.rmsnorm_forward(
        &mut norm_out,
        &mut st.final_norm_rstd,
        &st.input,
        w.norm,
        eps,
    )?;
    let (grad, losses) = backward_from_norm(ctx, &a, (w, g), st, norm_out, loss_scale, true)?;
    let missing = ModelError::NotInInventory {
        part: Part::Head,
        name: "token_loss",
    };
    Ok((grad, be.summed_losses(losses.as_ref().ok_or(missing)?)?))
}

/// The backward from the normalised input `norm_out`: the loss's gradient through the LM
/// head, block by block (with `with_losses`, each token's loss into the stash in the same
/// pass), then the norm's backward. Returns the gradient of the head's input and the
/// stash's per-token losses.
fn backward_from_norm<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    a: &InventoryAlloc<'_, B>,
    (w, g): (HeadWeights<'_, B>, HeadGrads<'_, B::Tensor>),
    mut st: Stash<B>,
    norm_out: B::Tensor,
    scale: f32,
    with_losses: bool,
) -> ModelResult<B, (B::Tensor, Option<B::Tensor>)> {
    let be = ctx.backend;
    let mut logits_block = a.backward_scratch("logits_block")?;
    let mut d_norm_out = a.backward_scratch("d_norm_out")?;
    let head = HeadLoss {
        x: &norm_out,
        lm_head: w.lm_head,
        targets: &st.targets,
        shape: head_shape(ctx, a),
    };
    let losses = st.token_loss.as_mut().filter(|_| with_losses);
    be.head_loss_backward(
        (&mut d_norm_out, g.lm_head),
        &mut logits_block,
        losses,
        head,
        scale,
    )?;
    be.rmsnorm_backward(
        &mut d_norm_out,
        g.norm,
        &st.input,
        w.norm,
        &st.final_norm_rstd,
    )?;
    Ok((B::renamed(d_norm_out, "grad_output"), st.token_loss))
}

/// Full logits [n, vocab] of the head's input on the CPU, for evaluation and tests. Host
/// memory, not counted: training never calls it.
pub fn head_logits(
    ctx: &PartCtx<'_, CpuBackend>,
    params: &PartParams,
    input: &Tensor,
) -> Result<Vec<f32>, ModelError> {
    let (n, h, v) = (
        ctx.micro.tokens(),
        ctx.config.dims.hidden,
        ctx.config.dims.vocab,
    );
    let (mut norm, mut rstd, mut logits) = (vec![0.0; n * h], vec![0.0; n], vec![0.0; n * v]);
    let w = head_weights(ctx.backend, params)?;
    let eps = ctx.config.rms_norm_eps;
    ctx.backend
        .rmsnorm_forward(&mut norm, &mut rstd, input.data(), w.norm.data(), eps);
    ctx.backend.matmul(
        &mut logits,
        MatRef::rows(&norm, n, h),
        MatRef::rows(w.lm_head.data(), v, h).t(),
        false,
    );
    Ok(logits)
}
