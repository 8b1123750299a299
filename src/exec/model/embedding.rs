//! The embedding part: token ids to hidden states.

use crate::exec::model::{InventoryAlloc, ModelError, PartCtx, PartParams, check_tokens};
use crate::exec::tensor::Tensor;
use crate::plan::inventory::Part;

/// What the embedding keeps from forward to backward.
#[derive(Debug)]
pub struct EmbeddingStash {
    /// [tokens] i32
    pub token_ids: Tensor<i32>,
}

/// Returns the stash and the hidden states [tokens, hidden] for the next part.
pub fn embedding_forward(
    ctx: &PartCtx<'_>,
    params: &PartParams,
    ids: &[i32],
) -> Result<(EmbeddingStash, Tensor), ModelError> {
    let dims = ctx.config.dims;
    check_tokens("input_ids", ids, dims.vocab)?;
    let alloc = InventoryAlloc::new(ctx, Part::Embedding);
    let mut token_ids: Tensor<i32> = alloc.stash("token_ids")?;
    if ids.len() != token_ids.len() {
        return Err(ModelError::ShapeMismatch {
            what: "input_ids".into(),
            got: vec![ids.len()],
            want: token_ids.shape().to_vec(),
        });
    }
    token_ids.data_mut().copy_from_slice(ids);
    let mut output = alloc.output()?;
    ctx.backend.embedding_forward(
        output.data_mut(),
        params.weights[0].data(),
        token_ids.data(),
        dims.hidden,
    );
    Ok((EmbeddingStash { token_ids }, output))
}

/// Adds this micro-batch's contribution to the embedding gradient.
pub fn embedding_backward(
    ctx: &PartCtx<'_>,
    params: &mut PartParams,
    stash: EmbeddingStash,
    grad_output: Tensor,
) -> Result<(), ModelError> {
    let alloc = InventoryAlloc::new(ctx, Part::Embedding);
    alloc.check(
        &grad_output,
        &alloc.inventory().backward_scratch,
        "grad_output",
    )?;
    ctx.backend.embedding_backward(
        params.grads[0].data_mut(),
        grad_output.data(),
        stash.token_ids.data(),
        ctx.config.dims.hidden,
    );
    Ok(())
}
