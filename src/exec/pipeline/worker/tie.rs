//! `TIE`: tied embeddings' table gradient made by its two uses, the embedding's (chunk 0) and
//! the head's copy's (the last chunk), summed in that order into both copies. On one device a
//! local sum; across two, the embedding's device sends its gradient to the head's, which adds
//! its copy's and sends the sum back, so both hold the same bits.

use std::time::Instant;

use crate::exec::device::MemGroup;
use crate::exec::model::PartId;
use crate::exec::model::params::TIED_TABLE;
use crate::exec::transport::MessageKind;

use super::{DeviceWorker, StepContext};
use crate::exec::pipeline::PipelineError;
use crate::exec::pipeline::engine::Engine;

/// Messages of `TIE`: the embedding's gradient out, the sum back.
const OUT: u32 = 0;
const BACK: u32 = 1;

impl<E: Engine> DeviceWorker<'_, E> {
    pub(super) fn tie(&mut self, cx: &StepContext<'_, E>) -> Result<(), PipelineError> {
        let start = Instant::now();
        let [embedding, head] = cx.tie_stages;
        let last = cx.last_chunk;
        let (engine, device) = (cx.engine, self.device);
        if embedding == head {
            let [e, h] = self.tied_grads(engine, [(0, PartId::Embedding), (last, PartId::Head)])?;
            engine.sum_here(device, &mut [e, h])?;
        } else if self.seat.stage == embedding {
            let g = self.take_tied_grad(engine, 0, PartId::Embedding)?;
            self.send(cx, head, MessageKind::Tied, OUT, 0, g)?;
            let sum = self.receive(cx, head, MessageKind::Tied, BACK, last)?;
            let sum = engine.regroup(sum, MemGroup::Gradients);
            self.put_tied_grad(engine, 0, PartId::Embedding, sum)?;
        } else {
            let got = self.receive(cx, embedding, MessageKind::Tied, OUT, 0)?;
            let mut got = engine.regroup(got, MemGroup::Communication);
            let [h] = self.tied_grads(engine, [(last, PartId::Head)])?;
            engine.sum_here(device, &mut [&mut got, h])?;
            self.send(cx, embedding, MessageKind::Tied, BACK, last, got)?;
        }
        self.report.reducing += start.elapsed();
        Ok(())
    }

    /// Where the table's gradient is in `part` of `chunk`: the part's index in the chunk and
    /// the tensor's in the part.
    fn tied_at(
        &self,
        engine: &E,
        chunk: u32,
        part: PartId,
    ) -> Result<(usize, usize), PipelineError> {
        let state = (self.chunks.iter().find(|c| c.index == chunk))
            .ok_or(PipelineError::NotHere { chunk })?;
        if state.grads_on_host {
            return Err(PipelineError::GroupOnHost {
                group: crate::plan::ir::Group::Grads { chunk },
            });
        }
        let p = (state.parts.iter())
            .position(|p| engine.part_id(p) == part)
            .ok_or(PipelineError::NotHere { chunk })?;
        let t = engine
            .param_names(&state.parts[p])
            .iter()
            .position(|n| n == TIED_TABLE)
            .ok_or(PipelineError::Untied { part })?;
        Ok((p, t))
    }

    /// The table's gradients in the given parts, in that order.
    fn tied_grads<const N: usize>(
        &mut self,
        engine: &E,
        at: [(u32, PartId); N],
    ) -> Result<[&mut E::Tensor; N], PipelineError> {
        let mut places = Vec::with_capacity(N);
        for (chunk, part) in at {
            let (p, t) = self.tied_at(engine, chunk, part)?;
            let c = (self.chunks.iter()).position(|s| s.index == chunk);
            places.push((c.ok_or(PipelineError::NotHere { chunk })?, p, t));
        }
        let mut found: Vec<Option<&mut E::Tensor>> = (0..N).map(|_| None).collect();
        for (c, state) in self.chunks.iter_mut().enumerate() {
            for (p, part) in state.parts.iter_mut().enumerate() {
                let grads = engine.params_mut(part).1;
                for (t, g) in grads.iter_mut().enumerate() {
                    if let Some(k) = places.iter().position(|&at| at == (c, p, t)) {
                        found[k] = Some(g);
                    }
                }
            }
        }
        let found: Vec<&mut E::Tensor> = found.into_iter().flatten().collect();
        found
            .try_into()
            .map_err(|_| PipelineError::Untied { part: at[0].1 })
    }

    fn take_tied_grad(
        &mut self,
        engine: &E,
        chunk: u32,
        part: PartId,
    ) -> Result<E::Tensor, PipelineError> {
        let (p, t) = self.tied_at(engine, chunk, part)?;
        let state = self.chunk(chunk)?;
        Ok(engine.params_mut(&mut state.parts[p]).1.remove(t))
    }

    fn put_tied_grad(
        &mut self,
        engine: &E,
        chunk: u32,
        part: PartId,
        g: E::Tensor,
    ) -> Result<(), PipelineError> {
        let state = self.chunk(chunk)?;
        let p = (state.parts.iter())
            .position(|x| engine.part_id(x) == part)
            .ok_or(PipelineError::NotHere { chunk })?;
        let names = engine.param_names(&state.parts[p]);
        let t = names.iter().position(|n| n == TIED_TABLE);
        let t = t.ok_or(PipelineError::Untied { part })?;
        engine.params_mut(&mut state.parts[p]).1.insert(t, g);
        Ok(())
    }
}
