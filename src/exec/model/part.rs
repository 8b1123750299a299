//! One entry point for any part, so a pipeline chunk (a contiguous run of parts) is a loop.

use crate::exec::device::{DeviceError, PoolRef};
use crate::exec::model::embedding::{EmbeddingStash, embedding_backward, embedding_forward};
use crate::exec::model::head::{HeadStash, head_backward, head_forward};
use crate::exec::model::layer::{LayerStash, layer_backward, layer_forward};
use crate::exec::model::{ModelError, PartCtx, PartId, PartParams};
use crate::exec::tensor::Tensor;

/// A part's kept activations between its forward and its backward.
#[derive(Debug)]
pub enum PartStash {
    Embedding(EmbeddingStash),
    Layer(Box<LayerStash>),
    Head(HeadStash),
}

impl PartStash {
    pub fn transfer(self, to: &PoolRef) -> Result<Self, DeviceError> {
        Ok(match self {
            PartStash::Embedding(s) => PartStash::Embedding(EmbeddingStash {
                token_ids: s
                    .token_ids
                    .transfer(to, crate::exec::device::MemGroup::Activations)?,
            }),
            PartStash::Layer(s) => PartStash::Layer(Box::new(s.transfer(to)?)),
            PartStash::Head(s) => PartStash::Head(s.transfer(to)?),
        })
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

/// Runs one part forward. `input` is the previous part's output (none for the embedding).
pub fn forward_part(
    ctx: &PartCtx<'_>,
    params: &PartParams,
    input: Option<Tensor>,
    tokens: MicroTokens<'_>,
) -> Result<(PartStash, PartOutput), ModelError> {
    let wrong = |reason: &str| ModelError::WrongInput {
        part: params.id,
        reason: reason.to_string(),
    };
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
            Ok((PartStash::Head(st), PartOutput::LossSum(loss)))
        }
        (PartId::Embedding, Some(_)) => {
            Err(wrong("the embedding takes token ids, not hidden states"))
        }
        (_, None) => Err(wrong("needs the previous part's output")),
    }
}

/// Runs one part backward, adding to its gradients. `grad_output` is the next part's returned
/// gradient (none for the head, which starts from the loss scaled by `loss_scale`). Returns
/// the gradient for the previous part (none for the embedding).
pub fn backward_part(
    ctx: &PartCtx<'_>,
    params: &mut PartParams,
    stash: PartStash,
    grad_output: Option<Tensor>,
    loss_scale: f32,
) -> Result<Option<Tensor>, ModelError> {
    let id = params.id;
    let wrong = |reason: &str| ModelError::WrongInput {
        part: id,
        reason: reason.to_string(),
    };
    match (stash, grad_output) {
        (PartStash::Head(st), None) if id == PartId::Head => {
            Ok(Some(head_backward(ctx, params, st, loss_scale)?))
        }
        (PartStash::Layer(st), Some(g)) if matches!(id, PartId::Layer(_)) => {
            Ok(Some(layer_backward(ctx, params, *st, g)?))
        }
        (PartStash::Embedding(st), Some(g)) if id == PartId::Embedding => {
            embedding_backward(ctx, params, st, g)?;
            Ok(None)
        }
        _ => Err(wrong(
            "stash or incoming gradient does not belong to this part",
        )),
    }
}
