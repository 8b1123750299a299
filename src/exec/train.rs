//! A training step on one device: every part forward then backward per micro-batch, gradients
//! accumulated in micro-batch order, global-norm clipping, the optimizer update. The pipeline
//! runtime drives the same per-part calls (`forward_part`, `backward_part`, `part_squares`,
//! `update_parts`) from plan actions; this is the reference it must match bit for bit.

use thiserror::Error;

use crate::data::Microbatch;
use crate::exec::backend::{Backend, CpuBackend, on_compute_pool};
use crate::exec::device::{DeviceError, PoolRef};
use crate::exec::model::chunk::{backward_chunk, forward_chunk};
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::model::{LlamaConfig, ModelError, PartCtx, PartId, PartParams};
use crate::exec::optim::clip::{clip_factor, global_norm, part_squares};
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::optim::{OptimizerConfig, PartOptimState, update_parts};
use crate::exec::tensor::Tensor;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("step {step}: the loss is {loss} (not finite); parameters were left unchanged")]
    NonFiniteLoss { step: u64, loss: f64 },
    #[error(
        "step {step}: the gradient norm is {norm} (not finite); parameters were left unchanged"
    )]
    NonFiniteGradNorm { step: u64, norm: f64 },
    #[error("a step needs at least one micro-batch")]
    NoMicrobatches,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The step just taken, counted from 0.
    pub step: u64,
    /// Mean cross-entropy over the step's counted (unmasked) target tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f32,
}

/// A backend over host tensors (the CPU's, or one that wraps it, as the benchmark's timing
/// of each operation does).
pub trait HostBackend:
    Backend<Tensor = Tensor, Ids = Tensor<i32>, Error = ModelError> + Send
{
}
impl<B: Backend<Tensor = Tensor, Ids = Tensor<i32>, Error = ModelError> + Send> HostBackend for B {}

/// The whole model and its optimizer on one device.
pub struct SingleDevice<B: HostBackend = CpuBackend> {
    pub config: LlamaConfig,
    pub pool: PoolRef,
    pub backend: B,
    /// Every part in forward order.
    pub parts: Vec<PartParams>,
    pub states: Vec<PartOptimState>,
    pub optimizer: OptimizerConfig,
    pub schedule: LrSchedule,
    pub grad_clip: Option<f32>,
    /// Steps completed so far.
    pub step: u64,
}

impl<B: HostBackend> SingleDevice<B> {
    /// Allocates every part in `pool`, initialised from `seed`, with zeroed optimizer state.
    pub fn from_seed(
        config: LlamaConfig,
        pool: PoolRef,
        backend: B,
        seed: u64,
        optimizer: OptimizerConfig,
        schedule: LrSchedule,
        grad_clip: Option<f32>,
    ) -> Result<Self, TrainError> {
        config.validate()?;
        let mut parts = Vec::new();
        for id in PartId::all(config.dims.layers) {
            let mut p = PartParams::allocate(&pool, &config, id)?;
            p.init_from_seed(seed);
            parts.push(p);
        }
        Self::from_parts(config, pool, backend, parts, optimizer, schedule, grad_clip)
    }

    /// Wraps already loaded parts (e.g. from a Hugging Face directory).
    pub fn from_parts(
        config: LlamaConfig,
        pool: PoolRef,
        backend: B,
        parts: Vec<PartParams>,
        optimizer: OptimizerConfig,
        schedule: LrSchedule,
        grad_clip: Option<f32>,
    ) -> Result<Self, TrainError> {
        let states = parts
            .iter()
            .map(|p| PartOptimState::allocate(&pool, &optimizer, p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SingleDevice {
            config,
            pool,
            backend,
            parts,
            states,
            optimizer,
            schedule,
            grad_clip,
            step: 0,
        })
    }

    /// One optimizer step over `microbatches` (all of the step's micro-batches, in order).
    pub fn train_step(&mut self, microbatches: &[Microbatch]) -> Result<StepReport, TrainError> {
        on_compute_pool(|| self.step_on_this_thread(microbatches))
    }

    fn step_on_this_thread(
        &mut self,
        microbatches: &[Microbatch],
    ) -> Result<StepReport, TrainError> {
        if microbatches.is_empty() {
            return Err(TrainError::NoMicrobatches);
        }
        let total_tokens = crate::exec::model::counted_tokens(microbatches)?;
        let loss_scale = 1.0 / total_tokens as f32;
        let mut loss_sum = 0.0f64;
        for mb in microbatches {
            loss_sum += self.forward_backward(mb, loss_scale)?;
        }
        // The table's two uses accumulate apart, as a pipeline's copies do, then add up.
        crate::exec::model::tied::sum_tied_grads(&mut self.parts)?;
        let step = self.step;
        let loss = loss_sum / total_tokens as f64;
        if !loss.is_finite() {
            self.parts.iter_mut().for_each(PartParams::zero_grads);
            return Err(TrainError::NonFiniteLoss { step, loss });
        }
        let squares: Vec<_> = self.parts.iter().map(part_squares).collect();
        let grad_norm = global_norm(&squares);
        if !grad_norm.is_finite() {
            self.parts.iter_mut().for_each(PartParams::zero_grads);
            return Err(TrainError::NonFiniteGradNorm {
                step,
                norm: grad_norm,
            });
        }
        let factor = self.grad_clip.map_or(1.0, |c| clip_factor(grad_norm, c));
        let lr = self.schedule.lr_at(step);
        update_parts(
            &self.optimizer,
            step + 1,
            lr,
            factor,
            &mut self.parts,
            &mut self.states,
        );
        self.step += 1;
        Ok(StepReport {
            step,
            loss,
            grad_norm,
            lr,
        })
    }

    /// Forward and backward of one micro-batch through every part; returns its summed loss.
    fn forward_backward(&mut self, mb: &Microbatch, loss_scale: f32) -> Result<f64, TrainError> {
        let ctx = PartCtx {
            backend: &self.backend,
            pool: &self.pool,
            config: &self.config,
            micro: mb.shape,
        };
        let tokens = MicroTokens {
            input_ids: &mb.input_ids,
            targets: &mb.targets,
        };
        let (stash, out) = forward_chunk(&ctx, &self.parts, None, tokens)?;
        let PartOutput::LossSum(loss_sum) = out else {
            return Err(TrainError::Model(ModelError::WrongInput {
                part: PartId::Head,
                reason: "the model's last part is not the head".into(),
            }));
        };
        backward_chunk(&ctx, &mut self.parts, stash, None, loss_scale)?;
        Ok(loss_sum)
    }
}
