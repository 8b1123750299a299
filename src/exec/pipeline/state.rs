//! A pipeline's state as host tensors, for checkpoints: every part's weights and optimizer
//! state handed to a writer (the shards of sharded optimizer state gathered, from the other
//! processes too when the run is spread over ranks), and a checkpoint's state loaded back
//! into every replica.

use std::collections::BTreeMap;

use super::chunk::ChunkState;
use super::engine::{Engine, HostPart};
use super::tcp_shards::{Payload, fill_state, owned_state};
use super::{Pipeline, PipelineError};
use crate::exec::checkpoint::CheckpointError;
use crate::exec::model::PartParams;
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::exec::transport::frame::ReplicaGrads;

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
        self.send_state_shards()?;
        // Other processes' shards, by (chunk, replica), as they come.
        let mut taken: BTreeMap<(u32, u32), ReplicaGrads> = BTreeMap::new();
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
            let writes = |p: &HostPart<'_>| p.id.order(layers) % replicas == replica;
            if self.plan.sharded(chunk.index) && parts.iter().any(writes) {
                // Each replica keeps its shard of the state: gather the others'.
                self.fill_other_shards(device, chunk, &mut states, &mut taken)?;
            }
            own.extend(parts.into_iter().zip(states).filter(|(p, _)| writes(p)));
        }
        own.sort_by_key(|(p, _)| p.id);
        let pairs: Vec<_> = own.iter().map(|(p, s)| (&**p, s)).collect();
        Ok(write(&pairs))
    }

    /// Fills into `states` the shards of `chunk`'s optimizer state that the other replicas
    /// keep (the chunk is on the run-wide `device`): from their copies here, or as the other
    /// processes sent them (`taken` keeps those for the next copy here that needs them).
    fn fill_other_shards(
        &self,
        device: u32,
        chunk: &ChunkState<E>,
        states: &mut [PartOptimState],
        taken: &mut BTreeMap<(u32, u32), ReplicaGrads>,
    ) -> Result<(), PipelineError> {
        let stages = self.plan.devices() as u32;
        let stage = device % stages;
        let shards = chunk.shards(&self.engine, self.plan.replicas);
        for replica in 0..self.plan.replicas {
            let at = replica * stages + stage;
            if at == device {
                continue;
            }
            let copy = (self.chunks.get(at as usize))
                .and_then(|held| held.iter().find(|c| c.index == chunk.index));
            match (copy, &self.ranks) {
                (Some(copy), _) => copy.fill_states(&self.engine, at, states)?,
                (None, Some(ranks)) if self.keeps_moments() => {
                    let key = (chunk.index, replica);
                    let values = match taken.remove(&key) {
                        Some(values) => values,
                        None => ranks.take_state_shard(self.step, (stage, chunk.index, replica))?,
                    };
                    let payload = Payload::new(replica, values.clone());
                    fill_state(states, &shards[replica as usize], payload)?;
                    taken.insert(key, values);
                }
                // SGD keeps no state to gather.
                (None, Some(_)) => {}
                (None, None) => return Err(PipelineError::NotHere { chunk: chunk.index }),
            }
        }
        Ok(())
    }

    /// Whether the optimizer keeps state per parameter (AdamW's moments; SGD keeps none).
    fn keeps_moments(&self) -> bool {
        matches!(self.optimizer, OptimizerConfig::AdamW { .. })
    }

    /// Over ranks: sends this process's replicas' shards of each sharded chunk's optimizer
    /// state to the processes that write some of the chunk's parts into the checkpoint.
    fn send_state_shards(&self) -> Result<(), PipelineError> {
        let Some(ranks) = &self.ranks else {
            return Ok(());
        };
        if !self.keeps_moments() {
            return Ok(());
        }
        let host = &self.devices.host;
        let stages = self.plan.devices() as u32;
        let (replicas, layers) = (self.plan.replicas, self.config.dims.layers);
        let local = ranks.local();
        for (device, chunk) in (self.chunks.iter().enumerate())
            .flat_map(|(d, cs)| cs.iter().map(move |c| (d as u32, c)))
            .filter(|(_, c)| self.plan.sharded(c.index))
        {
            let (replica, stage) = (device / stages, device % stages);
            let parts = (chunk.parts.iter())
                .map(|p| self.engine.host_part(device, p, host, &self.config))
                .collect::<Result<Vec<_>, _>>()?;
            // The devices of the replicas that write some of the chunk's parts, elsewhere.
            let writers: Vec<u32> = (parts.iter())
                .map(|p| (p.id.order(layers) as u32 % replicas) * stages + stage)
                .filter(|d| !local.contains(d))
                .collect();
            if writers.is_empty() {
                continue;
            }
            let lent: Vec<&PartParams> = parts.iter().map(|p| &**p).collect();
            let states = chunk.gather_states(&self.engine, device, &self.optimizer, &lent, host)?;
            let shards = chunk.shards(&self.engine, replicas);
            let values = owned_state(&states, &shards[replica as usize])?;
            ranks.send_state_shard(self.step, (stage, chunk.index, replica), &writers, values)?;
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
