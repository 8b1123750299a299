//! A whole model and its optimizer on one GPU.

use cudarc::driver::{CudaSlice, DevicePtr};

use super::{
    GpuCtx, GpuPart, Result, embedding_backward, embedding_forward, head_forward_backward,
    layer_backward, layer_forward,
};
use crate::data::Microbatch;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::DevPtr;
use crate::exec::device::PoolRef;
use crate::exec::model::{LlamaConfig, PartId, PartParams};
use crate::exec::optim::clip::clip_factor;
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::exec::train::StepReport;
use crate::plan::inventory::DType;

/// The whole model and its optimizer on one GPU.
pub struct GpuTrainer {
    pub gpu: Gpu,
    pub pool: PoolRef,
    pub config: LlamaConfig,
    /// Every part in forward order.
    pub parts: Vec<GpuPart>,
    pub optimizer: OptimizerConfig,
    pub schedule: LrSchedule,
    pub grad_clip: Option<f32>,
    /// Steps completed so far.
    pub step: u64,
    /// One f64 on the device for the sum of squared gradients (8 bytes, not counted).
    norm_acc: CudaSlice<f64>,
}

impl GpuTrainer {
    /// Uploads host parts (every part of the model, in forward order).
    pub fn upload(
        gpu: Gpu,
        pool: PoolRef,
        config: LlamaConfig,
        host: &[PartParams],
        optimizer: OptimizerConfig,
        schedule: LrSchedule,
        grad_clip: Option<f32>,
    ) -> Result<GpuTrainer> {
        config.validate()?;
        let want = PartId::all(config.dims.layers);
        let got: Vec<PartId> = host.iter().map(|p| p.id).collect();
        if got != want {
            return Err(CudaError::Unsupported(format!(
                "the GPU trainer holds the whole model: parts {want:?}, got {got:?}"
            )));
        }
        let parts = host
            .iter()
            .map(|p| GpuPart::upload(&gpu, &pool, p, &optimizer))
            .collect::<Result<Vec<_>>>()?;
        let norm_acc = gpu.stream.alloc_zeros::<f64>(1)?;
        Ok(GpuTrainer {
            gpu,
            pool,
            config,
            parts,
            optimizer,
            schedule,
            grad_clip,
            step: 0,
            norm_acc,
        })
    }

    /// Forward and backward of one micro-batch through every part; returns its summed loss.
    pub fn forward_backward(&mut self, mb: &Microbatch, loss_scale: f32) -> Result<f64> {
        let ctx = GpuCtx {
            gpu: &self.gpu,
            pool: &self.pool,
            config: &self.config,
            micro: mb.shape,
        };
        let layers = self.config.dims.layers;
        let (embedding, rest) = self.parts.split_at_mut(1);
        let (layer_parts, head) = rest.split_at_mut(layers);
        let (emb_st, mut x) = embedding_forward(ctx, &embedding[0], &mb.input_ids)?;
        let mut stashes = Vec::with_capacity(layers);
        for p in layer_parts.iter() {
            let (st, y) = layer_forward(ctx, p, x)?;
            stashes.push(st);
            x = y;
        }
        let (mut grad, loss) =
            head_forward_backward(ctx, &mut head[0], x, &mb.targets, loss_scale)?;
        for (p, st) in layer_parts.iter_mut().zip(stashes).rev() {
            grad = layer_backward(ctx, p, st, grad)?;
        }
        embedding_backward(ctx, &mut embedding[0], emb_st, grad)?;
        Ok(loss)
    }

    /// The global L2 norm of every gradient.
    pub fn grad_norm(&mut self) -> Result<f64> {
        let gpu = &self.gpu;
        gpu.stream.memset_zeros(&mut self.norm_acc)?;
        let acc = DevPtr::new(self.norm_acc.device_ptr(&gpu.stream).0, DType::F64);
        for g in self.parts.iter().flat_map(|p| &p.grads) {
            gpu.sum_squares(acc, g.ptr(), g.len())?;
        }
        let sum = gpu.stream.clone_dtoh(&self.norm_acc)?[0];
        Ok(sum.sqrt())
    }

    /// Clips by `factor`, applies the update for step `step` (from 1) with `lr`; the update
    /// kernels clear the gradients.
    pub fn update(&mut self, step: u64, lr: f32, factor: f32) -> Result<()> {
        let gpu = &self.gpu;
        let c = self.optimizer.coeffs(step, lr);
        for p in &mut self.parts {
            for i in 0..p.weights.len() {
                let (w, g) = (p.weights[i].ptr(), p.grads[i].ptr());
                let (n, copy) = (p.weights[i].len(), p.weights[i].act_copy_at(0));
                match self.optimizer {
                    OptimizerConfig::Sgd => gpu.sgd_update(w, copy, g, n, factor, lr)?,
                    OptimizerConfig::AdamW {
                        beta1, beta2, eps, ..
                    } => gpu.adamw_update(
                        w,
                        copy,
                        g,
                        p.exp_avg[i].ptr(),
                        p.exp_avg_sq[i].ptr(),
                        n,
                        factor,
                        (beta1, beta2, eps),
                        c.kernel_args(),
                    )?,
                }
            }
        }
        Ok(())
    }

    /// Every part's weights with its optimizer state, copied into `host`'s pool, in model
    /// order: what a checkpoint writes (gradients are zero between steps, as on the host).
    pub fn to_host(&self, host: &PoolRef) -> Result<Vec<(PartParams, PartOptimState)>> {
        self.parts
            .iter()
            .map(|p| {
                let mut part = PartParams::allocate(host, &self.config, p.id)?;
                let mut state = PartOptimState::allocate(host, &self.optimizer, &part)?;
                p.download_checkpoint(&self.gpu, &mut part, &mut state)?;
                Ok((part, state))
            })
            .collect()
    }

    /// Loads weights and optimizer state from host copies (as [`GpuTrainer::to_host`] makes).
    pub fn load_from_host(&mut self, host: &[(PartParams, PartOptimState)]) -> Result<()> {
        for (p, (part, state)) in self.parts.iter_mut().zip(host) {
            p.load(&self.gpu, part, state)?;
        }
        Ok(())
    }

    /// Clears every gradient (after an update, or when a step is abandoned).
    fn zero_grads(&mut self) -> Result<()> {
        for g in self.parts.iter_mut().flat_map(|p| &mut p.grads) {
            g.fill_zero(&self.gpu)?;
        }
        Ok(())
    }

    /// One optimizer step over all of the step's micro-batches, in order.
    pub fn train_step(&mut self, microbatches: &[Microbatch]) -> Result<StepReport> {
        let total_tokens = crate::exec::model::counted_tokens(microbatches)?;
        let loss_scale = 1.0 / total_tokens as f32;
        let mut loss_sum = 0.0;
        for mb in microbatches {
            loss_sum += self.forward_backward(mb, loss_scale)?;
        }
        let step = self.step;
        let loss = loss_sum / total_tokens as f64;
        let grad_norm = self.grad_norm()?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            // As on the CPU: the parameters stay as they were and the next step starts clean.
            self.zero_grads()?;
            return Err(CudaError::Diverged {
                step,
                loss,
                grad_norm,
            });
        }
        let factor = self.grad_clip.map_or(1.0, |c| clip_factor(grad_norm, c));
        let lr = self.schedule.lr_at(step);
        self.update(step + 1, lr, factor)?;
        self.step += 1;
        Ok(StepReport {
            step,
            loss,
            grad_norm,
            lr,
        })
    }
}
