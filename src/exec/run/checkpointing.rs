//! A run's checkpoints: written in Hugging Face's layout by every process of the run, each its
//! own shard (`checkpoint::sharded`), completed by the one that commits, and read back from
//! either layout whatever wrote them, so a sharded checkpoint resumes in one process and the
//! reverse, exactly.

use std::path::Path;
use std::time::Duration;

use super::{Run, RunError};
use crate::exec::checkpoint::commit::Staging;
use crate::exec::checkpoint::manifest::sync_files;
use crate::exec::checkpoint::model_files::{load_weights, save_config, save_weights};
use crate::exec::checkpoint::sharded::{
    MAX_SHARD_BYTES, MODEL, OPTIMIZER, Shard, TensorSet, split_by_size, write_index,
};
use crate::exec::checkpoint::trainer_state::{TrainerState, load_optimizer, save_optimizer};

/// How long the committing rank waits for the other ranks' shards of a checkpoint.
const SHARDS_WITHIN: Duration = Duration::from_secs(600);

impl Run {
    /// Writes the checkpoint after the current step into `dir`, whole or not at all
    /// (`checkpoint::commit`): the weights (`model.safetensors`, or shards with their index),
    /// `config.json`, the optimizer state (`optimizer.safetensors`, or shards beside the
    /// model's), `trainer_state.json` and, last, `manifest.json`. In a run over ranks every
    /// rank writes its shard into the staging directory rank 0 names, and rank 0 completes
    /// the checkpoint once every other rank has said its shard is written.
    pub fn save_checkpoint(&self, dir: &Path, last_loss: Option<f64>) -> Result<(), RunError> {
        let pipeline = &self.pipeline;
        if !pipeline.commits_checkpoints() {
            let staging = Staging::join(dir, &pipeline.staging(None)?)?;
            self.write_own_shard(&staging.path())?;
            return Ok(pipeline.shard_written(SHARDS_WITHIN)?);
        }
        let staging = Staging::create(dir)?;
        match self.complete(&staging.path(), &staging.name(), last_loss) {
            Ok(()) => Ok(staging.commit()?),
            Err(e) => {
                staging.discard();
                Err(e)
            }
        }
    }

    /// Rank 0's (or the one process's) part: names the staging directory, writes its shard,
    /// waits for the others', then adds the indexes, the config and the trainer state.
    fn complete(&self, path: &Path, name: &str, last_loss: Option<f64>) -> Result<(), RunError> {
        let pipeline = &self.pipeline;
        pipeline.staging(Some(name))?;
        let shards = self.write_own_shard(path)?;
        pipeline.shard_written(SHARDS_WITHIN)?;
        if shards > 1 {
            write_index(path, MODEL, shards)?;
            write_index(path, OPTIMIZER, shards)?;
        }
        save_config(path, pipeline.config())?;
        let step = self.step();
        TrainerState {
            step,
            data_position: step * self.spec.training.sequences_per_step() as u64,
            rng_seed: self.spec.training.seed,
            last_loss,
            val_loss: self.progress.loss_at(step),
            validation: self.progress,
        }
        .save(path)?;
        Ok(())
    }

    /// Writes this process's weights and optimizer state into `dir`: its rank's shard over
    /// ranks (synced before rank 0 is told), or in one process every part, in one file or in
    /// shards of at most `MAX_SHARD_BYTES` of weights. Returns the checkpoint's shard count.
    fn write_own_shard(&self, dir: &Path) -> Result<u32, RunError> {
        let shard = self.pipeline.shard();
        let mut count = shard.count;
        self.pipeline.with_own_state(&mut |pairs| {
            let parts: Vec<_> = pairs.iter().map(|(p, _)| *p).collect();
            if shard.count > 1 {
                save_weights(dir, shard, &parts)?;
                save_optimizer(dir, shard, pairs)?;
                let files = [shard.file(MODEL), shard.file(OPTIMIZER)];
                return Ok(sync_files(dir, &files)?);
            }
            let bytes = |p: &&crate::exec::model::PartParams| {
                p.counted()
                    .map(|(i, _)| p.weights[i].len() as u64 * 4)
                    .sum::<u64>()
            };
            let sizes: Vec<u64> = parts.iter().map(bytes).collect();
            let (groups, n) = split_by_size(&sizes, MAX_SHARD_BYTES);
            count = n;
            for index in 0..n {
                let shard = Shard { index, count: n };
                let mine: Vec<_> = (pairs.iter().zip(&groups))
                    .filter(|(_, g)| **g == index)
                    .map(|(pair, _)| *pair)
                    .collect();
                let weights: Vec<_> = mine.iter().map(|(p, _)| *p).collect();
                save_weights(dir, shard, &weights)?;
                save_optimizer(dir, shard, &mine)?;
            }
            Ok(())
        })?;
        Ok(count)
    }

    /// Continues from a checkpoint written by `save_checkpoint` for the same model, in either
    /// layout and whatever plan or ranks wrote it.
    pub fn resume_from(&mut self, dir: &Path) -> Result<TrainerState, RunError> {
        let state = TrainerState::load(dir)?;
        let weights = TensorSet::open(dir, MODEL)?;
        let moments = TensorSet::open(dir, OPTIMIZER)?;
        self.pipeline.load_state(&mut |parts, states| {
            load_weights(parts, &weights)?;
            let mut pairs: Vec<_> = parts.iter().zip(states.iter_mut()).collect();
            load_optimizer(&moments, &mut pairs)
        })?;
        self.pipeline.set_step(state.step);
        self.progress = state.validation;
        Ok(state)
    }
}
