//! One entry point for any part, so a pipeline chunk (a contiguous run of parts) is a loop.

use crate::exec::backend::Backend;
use crate::exec::device::PoolRef;
use crate::exec::model::embedding::{EmbeddingStash, embedding_backward, embedding_forward};
use crate::exec::model::head::{HeadStash, head_backward, head_forward};
use crate::exec::model::layer::{LayerStash, layer_backward, layer_forward};
use crate::exec::model::{ModelBackend, ModelError, ModelResult, PartCtx, PartId, PartParams};
use crate::exec::tensor::Tensor;

/// A part's kept activations between its forward and its backward: tensors `T`, ids `I`.
#[derive(Debug)]
pub enum PartStash<T = Tensor, I = Tensor<i32>> {
    Embedding(EmbeddingStash<I>),
    Layer(Box<LayerStash<T>>),
    Head(Box<HeadStash<T, I>>),
}

/// A part's stash on backend `B`.
pub type StashOf<B> = PartStash<<B as Backend>::Tensor, <B as Backend>::Ids>;

impl<T, I> PartStash<T, I> {
    /// Every kept tensor moved into `to`: an offload to the host, or a prefetch back.
    pub fn relocate<B>(self, be: &B, to: &PoolRef, to_host: bool) -> Result<Self, B::Error>
    where
        B: Backend<Tensor = T, Ids = I>,
    {
        Ok(match self {
            PartStash::Embedding(s) => PartStash::Embedding(s.relocate(be, to, to_host)?),
            PartStash::Layer(s) => PartStash::Layer(Box::new(s.relocate(be, to, to_host)?)),
            PartStash::Head(s) => PartStash::Head(Box::new(s.relocate(be, to, to_host)?)),
        })
    }

    /// Orders the backward after any prefetch into the stash.
    pub fn await_ready<B: Backend<Tensor = T, Ids = I>>(&self, be: &B) -> Result<(), B::Error> {
        match self {
            PartStash::Embedding(s) => s.await_ready(be),
            PartStash::Layer(s) => s.await_ready(be),
            PartStash::Head(s) => s.await_ready(be),
        }
    }

    /// What a recompute needs of a part's stash: a layer's or the head's input; the
    /// embedding's whole stash (its token ids).
    pub fn into_input(self) -> Result<T, Self> {
        match self {
            PartStash::Layer(s) => Ok(s.input),
            PartStash::Head(s) => Ok(s.input),
            embedding => Err(embedding),
        }
    }
}

/// What a part's forward hands on.
#[derive(Debug)]
pub enum PartOutput<T = Tensor> {
    /// Hidden states [tokens, hidden] for the next part.
    Hidden(T),
    /// The micro-batch's summed cross-entropy (the head).
    LossSum(f64),
}

/// The inputs of a micro-batch that the first and last parts read.
#[derive(Debug, Clone, Copy)]
pub struct MicroTokens<'a> {
    pub input_ids: &'a [i32],
    pub targets: &'a [i32],
}

fn wrong(part: PartId, reason: &str) -> ModelError {
    ModelError::WrongInput {
        part,
        reason: reason.to_string(),
    }
}

/// Runs one part forward. `input` is the previous part's output (none for the embedding).
pub fn forward_part<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &PartParams<B::Tensor>,
    input: Option<B::Tensor>,
    tokens: MicroTokens<'_>,
) -> ModelResult<B, (StashOf<B>, PartOutput<B::Tensor>)> {
    match (params.id, input) {
        (PartId::Embedding, None) => {
            let (st, out) = embedding_forward(ctx, params, tokens.input_ids)?;
            Ok((PartStash::Embedding(st), PartOutput::Hidden(out)))
        }
        (PartId::Layer(_), Some(x)) => {
            let (st, out) = layer_forward(ctx, params, x)?;
            Ok((PartStash::Layer(Box::new(st)), PartOutput::Hidden(out)))
        }
        (PartId::Head, Some(x)) => {
            let (st, loss) = head_forward(ctx, params, x, tokens.targets)?;
            Ok((PartStash::Head(Box::new(st)), PartOutput::LossSum(loss)))
        }
        (PartId::Embedding, Some(_)) => Err(wrong(
            params.id,
            "the embedding takes token ids, not hidden states",
        )
        .into()),
        (_, None) => Err(wrong(params.id, "needs the previous part's output").into()),
    }
}

/// Runs one part backward, adding to its gradients. `grad_output` is the next part's returned
/// gradient (none for the head, which starts from the loss scaled by `loss_scale`). Returns
/// the gradient for the previous part (none for the embedding).
pub fn backward_part<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &mut PartParams<B::Tensor>,
    stash: StashOf<B>,
    grad_output: Option<B::Tensor>,
    loss_scale: f32,
) -> Result<Option<B::Tensor>, B::Error> {
    let id = params.id;
    match (stash, grad_output) {
        (PartStash::Head(st), None) if id == PartId::Head => {
            Ok(Some(head_backward(ctx, params, *st, loss_scale)?))
        }
        (PartStash::Layer(st), Some(g)) if matches!(id, PartId::Layer(_)) => {
            Ok(Some(layer_backward(ctx, params, *st, g)?))
        }
        (PartStash::Embedding(st), Some(g)) if id == PartId::Embedding => {
            embedding_backward(ctx, params, st, g)?;
            Ok(None)
        }
        _ => Err(wrong(
            id,
            "stash or incoming gradient does not belong to this part",
        )
        .into()),
    }
}
