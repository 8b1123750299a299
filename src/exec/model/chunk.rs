//! A pipeline chunk: a contiguous run of parts run forward and backward as one unit.

use crate::exec::device::PoolRef;
use crate::exec::model::part::{MicroTokens, PartOutput, StashOf, backward_part, forward_part};
use crate::exec::model::{ModelBackend, ModelError, ModelResult, PartCtx, PartId, PartParams};

/// The stashes of a chunk's parts, in forward order.
pub struct ChunkStash<B: ModelBackend> {
    pub parts: Vec<StashOf<B>>,
}

impl<B: ModelBackend> ChunkStash<B> {
    /// Moves every kept tensor into `to`: an offload to the host, or a prefetch back.
    pub fn relocate(self, be: &B, to: &PoolRef, to_host: bool) -> Result<Self, B::Error> {
        let parts = (self.parts.into_iter())
            .map(|p| p.relocate(be, to, to_host))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ChunkStash { parts })
    }
}

/// Runs `parts` (contiguous, forward order) on `input` (none when the chunk starts with the
/// embedding). Returns the chunk's stash and its output: hidden states for the next chunk,
/// or the micro-batch's summed loss when the chunk ends with the head.
pub fn forward_chunk<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    parts: &[PartParams<B::Tensor>],
    input: Option<B::Tensor>,
    tokens: MicroTokens<'_>,
) -> ModelResult<B, (ChunkStash<B>, PartOutput<B::Tensor>)> {
    let mut stash = ChunkStash {
        parts: Vec::with_capacity(parts.len()),
    };
    let mut carry = input;
    let mut last = None;
    for part in parts {
        let (st, out) = forward_part(ctx, part, carry.take(), tokens)?;
        stash.parts.push(st);
        match out {
            PartOutput::Hidden(t) => carry = Some(t),
            loss @ PartOutput::LossSum(_) => last = Some(loss),
        }
    }
    let output = match (last, carry) {
        (Some(loss), _) => loss,
        (None, Some(hidden)) => PartOutput::Hidden(hidden),
        (None, None) => {
            return Err(ModelError::WrongInput {
                part: PartId::Embedding,
                reason: "an empty chunk has no output".into(),
            }
            .into());
        }
    };
    Ok((stash, output))
}

/// Runs the chunk backward in reverse part order. `grad_output` is the next chunk's input
/// gradient (none when the chunk ends with the head). Returns the gradient of the chunk's
/// input (none when it starts with the embedding).
pub fn backward_chunk<B: ModelBackend>(
    ctx: &PartCtx<'_, B>,
    parts: &mut [PartParams<B::Tensor>],
    stash: ChunkStash<B>,
    grad_output: Option<B::Tensor>,
    loss_scale: f32,
) -> Result<Option<B::Tensor>, B::Error> {
    let mut grad = grad_output;
    for (part, st) in parts.iter_mut().zip(stash.parts).rev() {
        grad = backward_part(ctx, part, st, grad.take(), loss_scale)?;
    }
    Ok(grad)
}
