//! The embedding part: token ids to hidden states.

use crate::exec::backend::Backend;
use crate::exec::device::{MemGroup, PoolRef};
use crate::exec::model::named::{embedding_grad, embedding_table};
use crate::exec::model::{
    InventoryAlloc, ModelBackend, ModelResult, PartCtx, PartParams, check_tokens,
};
use crate::plan::inventory::Part;

/// What the embedding keeps from forward to backward.
#[derive(Debug)]
pub struct EmbeddingStash<I> {
    /// [tokens] i32
    pub token_ids: I,
}

impl<I> EmbeddingStash<I> {
    /// The token ids moved into `to`: an offload to the host, or a prefetch back.
    pub fn relocate<B>(self, be: &B, to: &PoolRef, to_host: bool) -> Result<Self, B::Error>
    where
        B: Backend<Ids = I>,
    {
        let token_ids = be.move_ids(self.token_ids, to, MemGroup::Activations, to_host)?;
        Ok(EmbeddingStash { token_ids })
    }

    /// Orders the backward after any prefetch into the stash.
    pub fn await_ready<B: Backend<Ids = I>>(&self, be: &B) -> Result<(), B::Error> {
        be.await_ids(&self.token_ids)
    }
}

/// Returns the stash and the hidden states [tokens, hidden] for the next part.
pub fn embedding_forward<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &PartParams<B::Tensor>,
    ids: &[i32],
) -> ModelResult<B, (EmbeddingStash<B::Ids>, B::Tensor)> {
    let (be, dims) = (ctx.backend, ctx.config.dims);
    check_tokens("input_ids", ids, dims.vocab)?;
    let a = InventoryAlloc::new(ctx, Part::Embedding);
    a.check_len(ids, "token_ids")?;
    let mut token_ids = a.stash_ids("token_ids")?;
    be.write_ids(&mut token_ids, ids)?;
    let mut output = a.output()?;
    let table = embedding_table(params)?;
    be.embedding_forward(&mut output, table, &token_ids, dims.hidden)?;
    Ok((EmbeddingStash { token_ids }, output))
}

/// Adds this micro-batch's contribution to the embedding gradient.
pub fn embedding_backward<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    params: &mut PartParams<B::Tensor>,
    stash: EmbeddingStash<B::Ids>,
    grad_output: B::Tensor,
) -> Result<(), B::Error> {
    let a = InventoryAlloc::new(ctx, Part::Embedding);
    a.check(&grad_output, &a.inventory().backward_scratch, "grad_output")?;
    let d_table = embedding_grad(params)?;
    let hidden = ctx.config.dims.hidden;
    ctx.backend
        .embedding_backward(d_table, &grad_output, &stash.token_ids, hidden)
}
