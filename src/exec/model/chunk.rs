//! A pipeline chunk: a contiguous run of parts run forward and backward as one unit.

use crate::exec::device::{DeviceError, PoolRef};
use crate::exec::model::part::{MicroTokens, PartOutput, PartStash, backward_part, forward_part};
use crate::exec::model::{ModelError, PartCtx, PartParams};
use crate::exec::tensor::Tensor;

/// The stashes of a chunk's parts, in forward order.
#[derive(Debug)]
pub struct ChunkStash {
    pub parts: Vec<PartStash>,
}

impl ChunkStash {
    /// Moves every kept tensor to another pool: offload to the host, prefetch back.
    pub fn transfer(self, to: &PoolRef) -> Result<Self, DeviceError> {
        let parts = self
            .parts
            .into_iter()
            .map(|p| p.transfer(to))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ChunkStash { parts })
    }
}

/// Runs `parts` (contiguous, forward order) on `input` (none when the chunk starts with the
/// embedding). Returns the chunk's stash and its output: hidden states for the next chunk,
/// or the micro-batch's summed loss when the chunk ends with the head.
pub fn forward_chunk(
    ctx: &PartCtx<'_>,
    parts: &[PartParams],
    input: Option<Tensor>,
    tokens: MicroTokens<'_>,
) -> Result<(ChunkStash, PartOutput), ModelError> {
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
                part: crate::exec::model::PartId::Embedding,
                reason: "an empty chunk has no output".into(),
            });
        }
    };
    Ok((stash, output))
}

/// Runs the chunk backward in reverse part order. `grad_output` is the next chunk's input
/// gradient (none when the chunk ends with the head). Returns the gradient of the chunk's
/// input (none when it starts with the embedding).
pub fn backward_chunk(
    ctx: &PartCtx<'_>,
    parts: &mut [PartParams],
    stash: ChunkStash,
    grad_output: Option<Tensor>,
    loss_scale: f32,
) -> Result<Option<Tensor>, ModelError> {
    let mut grad = grad_output;
    for (part, st) in parts.iter_mut().zip(stash.parts).rev() {
        grad = backward_part(ctx, part, st, grad.take(), loss_scale)?;
    }
    Ok(grad)
}
