//! Saving and resuming a single-device run as a checkpoint directory.

use std::path::Path;

use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::model_files::{load_weights, save_model};
use crate::exec::checkpoint::sharded::{MODEL, OPTIMIZER, Shard, TensorSet};
use crate::exec::checkpoint::trainer_state::{TrainerState, load_optimizer, save_optimizer};
use crate::exec::train::SingleDevice;

impl<B: crate::exec::train::HostBackend> SingleDevice<B> {
    /// Writes `model.safetensors`, `config.json`, `optimizer.safetensors`, `trainer_state.json`.
    pub fn save_checkpoint(&self, dir: &Path, state: &TrainerState) -> Result<(), CheckpointError> {
        let parts: Vec<_> = self.parts.iter().collect();
        save_model(dir, &self.config, &parts)?;
        let with_state: Vec<_> = self.parts.iter().zip(&self.states).collect();
        save_optimizer(dir, Shard::ONE, &with_state)?;
        state.save(dir)
    }

    /// Loads weights, optimizer state and the step from a checkpoint of the same model.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<TrainerState, CheckpointError> {
        load_weights(&mut self.parts, &TensorSet::open(dir, MODEL)?)?;
        let mut with_state: Vec<_> = self.parts.iter().zip(self.states.iter_mut()).collect();
        load_optimizer(&TensorSet::open(dir, OPTIMIZER)?, &mut with_state)?;
        let state = TrainerState::load(dir)?;
        self.step = state.step;
        Ok(state)
    }
}
