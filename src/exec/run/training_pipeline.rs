//! How a run sees its pipeline, whatever the engine: CPU devices, pipeline stages on GPUs
//! (`cuda:0,1`, `cuda:0x4`), or the whole model on one GPU (`devices: "cuda"` or `"cuda:N"`:
//! a one-stage plan).

use crate::data::Microbatch;
use crate::exec::checkpoint::CheckpointError;
use crate::exec::model::{LlamaConfig, PartParams};
use crate::exec::optim::PartOptimState;
use crate::exec::pipeline::{DeviceTiming, Engine, Pipeline, PipelineError};
use crate::exec::train::StepReport;

use super::RunError;

/// What a checkpoint writer is given: every part with its optimizer state, in model order.
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
    fn with_state(&self, write: &mut WriteState<'_>) -> Result<(), RunError>;
    fn load_state(&mut self, load: &mut LoadState<'_>) -> Result<(), PipelineError>;
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

    fn with_state(&self, write: &mut WriteState<'_>) -> Result<(), RunError> {
        Pipeline::with_state(self, write)?
    }

    fn load_state(&mut self, load: &mut LoadState<'_>) -> Result<(), PipelineError> {
        Pipeline::load_state(self, load)
    }
}
