//! A pipeline's state as host tensors, for checkpoints: every part's weights and optimizer
//! state handed to a writer (the shards of sharded optimizer state gathered), and a
//! checkpoint's state loaded back into every replica.

use super::engine::{Engine, HostPart};
use super::{Pipeline, PipelineError};
use crate::exec::checkpoint::CheckpointError;
use crate::exec::model::PartParams;
use crate::exec::optim::PartOptimState;

impl<E: Engine> Pipeline<E> {
    /// Calls `write` with every part and its optimizer state, in model order, as host
    /// tensors (lent where they are host memory already, copied into the host pool otherwise).
    /// Only in one process: a rank of a spread run holds part of the model (`with_own_state`).
    pub fn with_state<R>(
        &self,
        write: impl FnOnce(&[(&PartParams, &PartOptimState)]) -> R,
    ) -> Result<R, PipelineError> {
        if self.ranks.is_some() {
            return Err(crate::exec::transport::TransportError::Protocol(
                "a rank holds part of the model; its checkpoint shard is `with_own_state`'s".into(),
            )
            .into());
        }
        self.with_own_state(write)
    }

    /// As `with_state`, for the parts this process writes into a checkpoint: part `i` of the
    /// model (forward order) is written from replica `i % replicas`'s copy (every replica
    /// holds the same bits), by the process that runs that replica's device holding it. In
    /// one process that is every part; over ranks, each part is written by one rank.
    pub fn with_own_state<R>(
        &self,
        write: impl FnOnce(&[(&PartParams, &PartOptimState)]) -> R,
    ) -> Result<R, PipelineError> {
        let host = &self.devices.host;
        let (stages, replicas) = (self.plan.devices(), self.plan.replicas as usize);
        let layers = self.config.dims.layers;
        let mut own: Vec<(HostPart<'_>, PartOptimState)> = Vec::new();
        // Devices of other processes hold no chunks here.
        for (device, chunk) in (self.chunks.iter().enumerate())
            .flat_map(|(d, cs)| cs.iter().map(move |c| (d as u32, c)))
        {
            let replica = device as usize / stages;
            let parts = chunk
                .parts
                .iter()
                .map(|p| self.engine.host_part(device, p, host, &self.config))
                .collect::<Result<Vec<_>, _>>()?;
            let lent: Vec<&PartParams> = parts.iter().map(|p| &**p).collect();
            let mut states =
                chunk.gather_states(&self.engine, device, &self.optimizer, &lent, host)?;
            if self.plan.sharded(chunk.index) {
                // Each replica keeps its shard of the state: gather the others'.
                self.fill_other_shards(device, chunk.index, &mut states)?;
            }
            let writes = |p: &HostPart<'_>| p.id.order(layers) % replicas == replica;
            own.extend(parts.into_iter().zip(states).filter(|(p, _)| writes(p)));
        }
        own.sort_by_key(|(p, _)| p.id);
        let pairs: Vec<_> = own.iter().map(|(p, s)| (&**p, s)).collect();
        Ok(write(&pairs))
    }

    /// Fills into `states` the shards of `chunk`'s optimizer state that the other replicas
    /// keep (the chunk is on the run-wide `device`; sharded runs are in one process).
    fn fill_other_shards(
        &self,
        device: u32,
        chunk: u32,
        states: &mut [PartOptimState],
    ) -> Result<(), PipelineError> {
        let stages = self.plan.devices() as u32;
        for replica in 0..self.plan.replicas {
            let at = replica * stages + device % stages;
            if at == device {
                continue;
            }
            let copy = (self.chunks.get(at as usize))
                .and_then(|held| held.iter().find(|c| c.index == chunk))
                .ok_or(PipelineError::NotHere { chunk })?;
            copy.fill_states(&self.engine, at, states)?;
        }
        Ok(())
    }

    /// Runs `load` on host copies of each chunk's parts and optimizer state, then keeps what
    /// it loaded (a checkpoint, say).
    pub fn load_state(
        &mut self,
        mut load: impl FnMut(&mut [PartParams], &mut [PartOptimState]) -> Result<(), CheckpointError>,
    ) -> Result<(), PipelineError> {
        let host = &self.devices.host;
        // Every replica loads the same state.
        let held = self.chunks.iter_mut().enumerate();
        for (device, chunk) in held.flat_map(|(d, cs)| cs.iter_mut().map(move |c| (d as u32, c))) {
            let mut parts = Vec::with_capacity(chunk.parts.len());
            for p in &chunk.parts {
                let lent = self.engine.host_part(device, p, host, &self.config)?;
                let mut copy = PartParams::allocate(host, &self.config, lent.id)?;
                copy.copy_weights_from(&lent);
                parts.push(copy);
            }
            let mut states = {
                let lent: Vec<&PartParams> = parts.iter().collect();
                chunk.gather_states(&self.engine, device, &self.optimizer, &lent, host)?
            };
            load(&mut parts, &mut states)?;
            for (p, loaded) in chunk.parts.iter_mut().zip(&parts) {
                self.engine.load_part(device, p, loaded)?;
            }
            chunk.scatter_states(&self.engine, device, &states)?;
        }
        Ok(())
    }
}
