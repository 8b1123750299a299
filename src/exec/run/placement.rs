//! Where a run's model lives and steps: the pipeline runtime (over CPU devices, or over
//! pipeline stages on GPUs: `cuda:0,1`, `cuda:0x4`), or the whole model on one GPU
//! (`devices: "cuda"` or `"cuda:N"`, the fastest way to train on one GPU).

use crate::data::Microbatch;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::model::GpuTrainer;
use crate::exec::backend::on_compute_pool;
use crate::exec::checkpoint::CheckpointError;
use crate::exec::device::PoolRef;
use crate::exec::model::{LlamaConfig, PartParams};
use crate::exec::optim::PartOptimState;
use crate::exec::pipeline::{DeviceTiming, Engine, Pipeline, PipelineError};
use crate::exec::train::StepReport;

use super::RunError;
use super::evaluate::gpu_loss_sum;

/// What a checkpoint writer is given: every part with its optimizer state, in model order.
pub type WriteState<'a> = dyn FnMut(&[(&PartParams, &PartOptimState)]) -> Result<(), RunError> + 'a;
/// What a checkpoint reader fills in: each chunk's parts and their optimizer state.
pub type LoadState<'a> =
    dyn FnMut(&mut [PartParams], &mut [PartOptimState]) -> Result<(), CheckpointError> + 'a;

/// A pipeline on any engine, as a run sees it.
pub trait Stages: Send {
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
    /// Calls `write` with the whole model's state, unless this is a rank of a spread run
    /// other than rank 0, which sends its parts to rank 0 instead.
    fn with_state(&self, write: &mut WriteState<'_>) -> Result<(), RunError>;
    fn load_state(&mut self, load: &mut LoadState<'_>) -> Result<(), PipelineError>;
    fn local_devices(&self) -> std::ops::Range<u32>;
    fn writes_checkpoints(&self) -> bool;
    fn close_ranks(&self) -> Result<(), PipelineError>;
    fn abort_ranks(&self, reason: &str);
}

impl<E: Engine + Send> Stages for Pipeline<E>
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

    fn with_state(&self, write: &mut WriteState<'_>) -> Result<(), RunError> {
        Pipeline::with_run_state(self, write)?.unwrap_or(Ok(()))
    }

    fn load_state(&mut self, load: &mut LoadState<'_>) -> Result<(), PipelineError> {
        Pipeline::load_state(self, load)
    }

    fn local_devices(&self) -> std::ops::Range<u32> {
        Pipeline::local_devices(self)
    }

    fn writes_checkpoints(&self) -> bool {
        Pipeline::writes_checkpoints(self)
    }

    fn close_ranks(&self) -> Result<(), PipelineError> {
        Pipeline::close_ranks(self)
    }

    fn abort_ranks(&self, reason: &str) {
        Pipeline::abort_ranks(self, reason)
    }
}

pub enum Placement {
    Pipeline(Box<dyn Stages>),
    Gpu {
        trainer: Box<GpuTrainer>,
        /// Where checkpoints are staged on their way to and from the GPU.
        host: PoolRef,
    },
}

impl Placement {
    pub fn config(&self) -> &LlamaConfig {
        match self {
            Placement::Pipeline(p) => p.config(),
            Placement::Gpu { trainer, .. } => &trainer.config,
        }
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        match self {
            Placement::Pipeline(p) => p.step(),
            Placement::Gpu { trainer, .. } => trainer.step,
        }
    }

    pub fn set_step(&mut self, step: u64) {
        match self {
            Placement::Pipeline(p) => p.set_step(step),
            Placement::Gpu { trainer, .. } => trainer.step = step,
        }
    }

    /// The run-wide devices this process runs (all but in a run spread over ranks).
    pub fn local_devices(&self) -> std::ops::Range<u32> {
        match self {
            Placement::Pipeline(p) => p.local_devices(),
            Placement::Gpu { .. } => 0..1,
        }
    }

    /// Whether this process writes checkpoints (all but ranks other than 0 of a spread run).
    pub fn writes_checkpoints(&self) -> bool {
        match self {
            Placement::Pipeline(p) => p.writes_checkpoints(),
            Placement::Gpu { .. } => true,
        }
    }

    /// Ends a spread run's links (nothing otherwise).
    pub fn close_ranks(&self) -> Result<(), RunError> {
        match self {
            Placement::Pipeline(p) => Ok(p.close_ranks()?),
            Placement::Gpu { .. } => Ok(()),
        }
    }

    /// Tells a spread run's other ranks this one stopped (nothing otherwise).
    pub fn abort_ranks(&self, reason: &str) {
        if let Placement::Pipeline(p) = self {
            p.abort_ranks(reason);
        }
    }

    /// Each device's measured peak bytes so far.
    pub fn measured_peaks(&self) -> Vec<usize> {
        match self {
            Placement::Pipeline(p) => p.measured_peaks(),
            Placement::Gpu { trainer, .. } => vec![trainer.pool.peak_bytes()],
        }
    }

    /// One step; with the pipeline runtime, what each device spent (none for a whole-model
    /// GPU run).
    pub fn train_step(
        &mut self,
        microbatches: &[Microbatch],
    ) -> Result<(StepReport, Vec<DeviceTiming>), RunError> {
        match self {
            Placement::Pipeline(p) => Ok(p.train_step(microbatches)?),
            Placement::Gpu { trainer, .. } => {
                trainer
                    .train_step(microbatches)
                    .map_err(|e| match e {
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
                        CudaError::Model(e) => PipelineError::Model(*e).into(),
                        other => RunError::Cuda(other),
                    })
                    .map(|report| (report, Vec::new()))
            }
        }
    }

    /// The summed loss of `batches`' counted targets, forward only, on the devices the model
    /// trains on (`evaluate`).
    pub fn evaluate(&mut self, batches: &[Microbatch]) -> Result<f64, RunError> {
        match self {
            Placement::Pipeline(p) => Ok(p.evaluate(batches)?),
            Placement::Gpu { trainer, .. } => Ok(gpu_loss_sum(trainer, batches)?),
        }
    }

    /// Calls `write` with every part and its optimizer state, in model order (host copies
    /// for a GPU).
    pub fn with_state(
        &self,
        mut write: impl FnMut(&[(&PartParams, &PartOptimState)]) -> Result<(), RunError>,
    ) -> Result<(), RunError> {
        match self {
            Placement::Pipeline(p) => p.with_state(&mut write),
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
            Placement::Pipeline(p) => Ok(p.load_state(&mut load)?),
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
