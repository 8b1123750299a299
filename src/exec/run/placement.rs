//! Where a run's model lives and steps: the pipeline runtime over CPU devices, or the whole
//! model on one GPU (`devices: "cuda"` or `"cuda:N"`). Multi-stage plans on GPUs need the
//! pipeline runtime made generic over the device (docs/architecture.md); until then a GPU
//! run is one stage without recompute or offload.

use crate::data::Microbatch;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::model::GpuTrainer;
use crate::exec::checkpoint::CheckpointError;
use crate::exec::device::PoolRef;
use crate::exec::model::{LlamaConfig, PartParams};
use crate::exec::optim::PartOptimState;
use crate::exec::pipeline::{Pipeline, PipelineError};
use crate::exec::train::StepReport;

use super::RunError;

pub enum Placement {
    Pipeline(Box<Pipeline>),
    Gpu {
        trainer: Box<GpuTrainer>,
        /// Where checkpoints are staged on their way to and from the GPU.
        host: PoolRef,
    },
}

impl Placement {
    pub fn config(&self) -> &LlamaConfig {
        match self {
            Placement::Pipeline(p) => &p.config,
            Placement::Gpu { trainer, .. } => &trainer.config,
        }
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        match self {
            Placement::Pipeline(p) => p.step,
            Placement::Gpu { trainer, .. } => trainer.step,
        }
    }

    pub fn set_step(&mut self, step: u64) {
        match self {
            Placement::Pipeline(p) => p.step = step,
            Placement::Gpu { trainer, .. } => trainer.step = step,
        }
    }

    /// Each device's measured peak bytes so far.
    pub fn measured_peaks(&self) -> Vec<usize> {
        match self {
            Placement::Pipeline(p) => p.measured_peaks(),
            Placement::Gpu { trainer, .. } => vec![trainer.pool.peak_bytes()],
        }
    }

    pub fn train_step(&mut self, microbatches: &[Microbatch]) -> Result<StepReport, RunError> {
        match self {
            Placement::Pipeline(p) => Ok(p.train_step(microbatches)?.0),
            Placement::Gpu { trainer, .. } => {
                trainer.train_step(microbatches).map_err(|e| match e {
                    // The CPU runtime's errors for the same events, so both blame the same.
                    CudaError::Diverged { step, loss, .. } if !loss.is_finite() => {
                        PipelineError::NonFiniteLoss { step, loss }.into()
                    }
                    CudaError::Diverged {
                        step, grad_norm, ..
                    } => PipelineError::NonFiniteGradNorm {
                        step,
                        norm: grad_norm,
                    }
                    .into(),
                    other => RunError::Cuda(other),
                })
            }
        }
    }

    /// Calls `write` with every part and its optimizer state, in model order (host copies
    /// for a GPU).
    pub fn with_state(
        &self,
        write: impl FnOnce(&[(&PartParams, &PartOptimState)]) -> Result<(), RunError>,
    ) -> Result<(), RunError> {
        match self {
            Placement::Pipeline(p) => p.with_state(write)?,
            Placement::Gpu { trainer, host } => {
                let owned = trainer.to_host(host)?;
                let pairs: Vec<_> = owned.iter().map(|(p, s)| (p, s)).collect();
                write(&pairs)
            }
        }
    }

    /// Runs `load` on the parts and their optimizer state (a checkpoint, say), then keeps
    /// what it loaded.
    pub fn load_state(
        &mut self,
        mut load: impl FnMut(&mut [PartParams], &mut [PartOptimState]) -> Result<(), CheckpointError>,
    ) -> Result<(), RunError> {
        match self {
            Placement::Pipeline(p) => Ok(p.load_state(load)?),
            Placement::Gpu { trainer, host } => {
                let (mut parts, mut states): (Vec<_>, Vec<_>) =
                    trainer.to_host(host)?.into_iter().unzip();
                load(&mut parts, &mut states)?;
                let loaded: Vec<_> = parts.into_iter().zip(states).collect();
                trainer.load_from_host(&loaded)?;
                Ok(())
            }
        }
    }
}
