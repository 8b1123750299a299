//! How a run sees its pipeline, whatever the engine: CPU devices, pipeline stages on GPUs
//! (`cuda:0,1`, `cuda:0x4`), or the whole model on one GPU (`devices: "cuda"` or `"cuda:N"`:
//! a one-stage plan).

use crate::data::Microbatch;
use crate::exec::backend::on_compute_pool;
use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::sharded::Shard;
use crate::exec::model::{LlamaConfig, PartParams};
use crate::exec::optim::PartOptimState;
use crate::exec::pipeline::{DeviceTiming, Engine, Pipeline, PipelineError};
use crate::exec::train::StepReport;

use super::RunError;

/// What a checkpoint writer is given: the parts this process writes with their optimizer
/// state, in model order.
pub type WriteState<'a> = dyn FnMut(&[(&PartParams, &PartOptimState)]) -> Result<(), RunError> + 'a;
/// What a checkpoint reader fills in: each chunk's parts and their optimizer state.
pub type LoadState<'a> =
    dyn FnMut(&mut [PartParams], &mut [PartOptimState]) -> Result<(), CheckpointError> + 'a;

/// A pipeline on any engine, as a run sees it.
pub trait TrainingPipeline: Send {
    fn config(&self) -> &LlamaConfig;
    fn step(&self) -> u64;
    fn set_step(&mut self, step: u64);
    fn measured_peaks(&self) -> Vec<usize>;
    fn train_step(
        &mut self,
        microbatches: &[Microbatch],
    ) -> Result<(StepReport, Vec<DeviceTiming>), PipelineError>;
    /// The summed loss of `batches`' counted targets, forward only.
    fn evaluate(&mut self, batches: &[Microbatch]) -> Result<f64, PipelineError>;
    /// Calls `write` with the state of the parts this process writes into a checkpoint (the
    /// whole model's in one process): `Pipeline::with_own_state`.
    fn with_own_state(&self, write: &mut WriteState<'_>) -> Result<(), RunError>;
    fn load_state(&mut self, load: &mut LoadState<'_>) -> Result<(), PipelineError>;
    /// The run-wide devices this process runs (all but in a run spread over ranks).
    fn local_devices(&self) -> std::ops::Range<u32>;
    /// Whether this process completes checkpoints (all but ranks other than 0 of a spread
    /// run, which write their shards only).
    fn commits_checkpoints(&self) -> bool;
    /// This process's shard of a checkpoint.
    fn shard(&self) -> Shard;
    /// The staging directory of the checkpoint after the current step: `Pipeline::staging`.
    fn staging(&self, named: Option<&str>) -> Result<String, PipelineError>;
    /// This process's shard of the checkpoint is written: `Pipeline::shard_written`.
    fn shard_written(&self, within: std::time::Duration) -> Result<(), PipelineError>;
    /// Ends a spread run's links (nothing otherwise).
    fn close_ranks(&self) -> Result<(), PipelineError>;
    /// Tells a spread run's other ranks this one stopped (nothing otherwise).
    fn abort_ranks(&self, reason: &str);
}

impl<E: Engine + Send> TrainingPipeline for Pipeline<E>
where
    E::Part: Send,
{
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn step(&self) -> u64 {
        self.step
    }

    fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    fn measured_peaks(&self) -> Vec<usize> {
        Pipeline::measured_peaks(self)
    }

    fn train_step(
        &mut self,
        microbatches: &[Microbatch],
    ) -> Result<(StepReport, Vec<DeviceTiming>), PipelineError> {
        Pipeline::train_step(self, microbatches)
    }

    fn evaluate(&mut self, batches: &[Microbatch]) -> Result<f64, PipelineError> {
        // One thread computes: it may run on the compute pool.
        on_compute_pool(|| Pipeline::evaluate(self, batches))
    }

    fn with_own_state(&self, write: &mut WriteState<'_>) -> Result<(), RunError> {
        Pipeline::with_own_state(self, write)?
    }

    fn load_state(&mut self, load: &mut LoadState<'_>) -> Result<(), PipelineError> {
        Pipeline::load_state(self, load)
    }

    fn local_devices(&self) -> std::ops::Range<u32> {
        Pipeline::local_devices(self)
    }

    fn commits_checkpoints(&self) -> bool {
        Pipeline::commits_checkpoints(self)
    }

    fn shard(&self) -> Shard {
        Pipeline::shard(self)
    }

    fn staging(&self, named: Option<&str>) -> Result<String, PipelineError> {
        Pipeline::staging(self, named)
    }

    fn shard_written(&self, within: std::time::Duration) -> Result<(), PipelineError> {
        Pipeline::shard_written(self, within)
    }

    fn close_ranks(&self) -> Result<(), PipelineError> {
        Pipeline::close_ranks(self)
    }

    fn abort_ranks(&self, reason: &str) {
        Pipeline::abort_ranks(self, reason)
    }
}
