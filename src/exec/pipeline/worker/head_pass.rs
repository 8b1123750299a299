//! A one-stage plan's forward and backward of a micro-batch in one pass: where the engine
//! runs the head's forward and backward together (`Engine::one_pass_head`, the CUDA
//! engine) and a chunk holding the whole model has its backward right after its forward,
//! the two actions run as one: the layers forward, the head's one pass, the layers backward.
//! The backward action then finds its work done. What is live at any time is what the two
//! actions hold, so the planner's peak holds.

use super::{DeviceWorker, PipelineError, StepContext};
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::pipeline::engine::{At, Engine};
use crate::plan::inventory::Part;
use crate::plan::ir::{Action, Group};

impl<E: Engine> DeviceWorker<'_, E> {
    /// Whether the forward of (mb, chunk) runs with its backward, which is `next`.
    pub(super) fn one_pass(
        &self,
        cx: &StepContext<'_, E>,
        mb: u32,
        chunk: u32,
        next: Option<Action>,
    ) -> Result<bool, PipelineError> {
        let backward_next = next == Some(Action::Backward { mb, chunk });
        Ok(backward_next
            && cx.engine.one_pass_head()
            && self.end_kind(cx, chunk, false)? == Part::Embedding
            && self.end_kind(cx, chunk, true)? == Part::Head)
    }

    /// The forward and backward of (mb, chunk), a chunk from the embedding to the head.
    pub(super) fn forward_backward(
        &mut self,
        cx: &StepContext<'_, E>,
        mb: u32,
        chunk: u32,
    ) -> Result<(), PipelineError> {
        self.require_weights(chunk)?;
        let batch = self.batch(cx, mb);
        let at = At {
            device: self.device,
            pool: self.pool,
            config: cx.config,
            micro: batch.shape,
        };
        let tokens = MicroTokens {
            input_ids: &batch.input_ids,
            targets: &batch.targets,
        };
        let state = (self.chunks.iter_mut())
            .find(|c| c.index == chunk)
            .ok_or(PipelineError::NotHere { chunk })?;
        if state.grads_on_host {
            return Err(PipelineError::GroupOnHost {
                group: Group::Grads { chunk },
            });
        }
        let (head, body) = state
            .parts
            .split_last_mut()
            .ok_or(PipelineError::EmptyChunk)?;
        let mut carry = None;
        let mut stashes = Vec::with_capacity(body.len());
        for part in body.iter() {
            let (stash, out) = cx.engine.forward(at, part, carry.take(), tokens)?;
            stashes.push(stash);
            let PartOutput::Hidden(t) = out else {
                return Err(PipelineError::EmptyChunk);
            };
            carry = Some(t);
        }
        let input = carry.ok_or(PipelineError::EmptyChunk)?;
        let (grad, loss) =
            cx.engine
                .head_forward_backward(at, head, input, tokens, cx.loss_scale)?;
        let mut grad = Some(grad);
        for (part, stash) in body.iter_mut().zip(stashes).rev() {
            grad = cx
                .engine
                .backward(at, part, stash, grad.take(), cx.loss_scale)?;
        }
        self.losses.push((self.seat.microbatch(mb) as u32, loss));
        self.done_backward = Some((mb, chunk));
        Ok(())
    }
}
