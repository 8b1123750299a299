//! The data-parallel actions: `AR<c>`/`RS<c>` (a chunk's gradients summed with the other
//! replicas', whole or by shard) and `AG<c>` (the updated shards gathered).

use std::time::Instant;

use super::{DeviceWorker, StepContext};
use crate::exec::pipeline::PipelineError;
use crate::exec::pipeline::engine::Engine;
use crate::exec::pipeline::reduce_point::ChunkGrads;
use crate::plan::ir::{Action, Group};

impl<E: Engine> DeviceWorker<'_, E> {
    /// Whether the program reduces `chunk` sharded (`RS<c>`).
    pub(super) fn sharded(&self, chunk: u32) -> bool {
        self.program
            .contains(&Action::Reduce { chunk, shard: true })
    }

    /// Sums the chunk's gradients with the other replicas' (`AR<c>`), or each replica's
    /// shard of them into that replica (`RS<c>`).
    pub(super) fn reduce(
        &mut self,
        cx: &StepContext<'_, E>,
        chunk: u32,
        shard: bool,
    ) -> Result<(), PipelineError> {
        let start = Instant::now();
        let (engine, seat) = (cx.engine, self.seat);
        let state = self.chunk(chunk)?;
        if state.grads_on_host {
            return Err(PipelineError::GroupOnHost {
                group: Group::Grads { chunk },
            });
        }
        let shards = shard.then(|| state.shards(engine, seat.replicas));
        let grads: ChunkGrads<E::Tensor> = (state.parts.iter_mut())
            .map(|p| std::mem::take(engine.params_mut(p).1))
            .collect();
        let (summed, result) = match &shards {
            Some(shards) => cx
                .transport
                .reduce_scatter(engine, seat, chunk, grads, shards),
            None => cx.transport.reduce(engine, seat, chunk, grads),
        };
        for (part, grads) in state.parts.iter_mut().zip(summed) {
            *engine.params_mut(part).1 = grads;
        }
        self.report.reducing += start.elapsed();
        result
    }

    /// Hands this replica's updated shard of the chunk's weights to the other replicas and
    /// takes theirs (`AG<c>`).
    pub(super) fn gather(
        &mut self,
        cx: &StepContext<'_, E>,
        chunk: u32,
    ) -> Result<(), PipelineError> {
        let start = Instant::now();
        let (engine, seat) = (cx.engine, self.seat);
        let state = self.chunk(chunk)?;
        if state.weights_on_host {
            return Err(PipelineError::GroupOnHost {
                group: Group::Weights { chunk },
            });
        }
        let shards = state.shards(engine, seat.replicas);
        let weights: ChunkGrads<E::Tensor> = (state.parts.iter_mut())
            .map(|p| std::mem::take(engine.params_mut(p).0))
            .collect();
        let (gathered, result) = cx
            .transport
            .all_gather(engine, seat, chunk, weights, &shards);
        for (part, weights) in state.parts.iter_mut().zip(gathered) {
            *engine.params_mut(part).0 = weights;
        }
        self.report.reducing += start.elapsed();
        result
    }
}
