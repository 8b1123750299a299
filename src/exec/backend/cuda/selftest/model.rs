//! One training step of the Hugging Face fixture on the GPU against the CPU backend and the
//! PyTorch reference stored with it.

use std::path::Path;

use super::{Check, Result};
use crate::data::Microbatch;
use crate::exec::backend::CpuBackend;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::model::GpuTrainer;
use crate::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use crate::exec::checkpoint::safetensors_io::TensorFile;
use crate::exec::device::{Pool, PoolRef};
use crate::exec::model::chunk::{backward_chunk, forward_chunk};
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use crate::exec::optim::clip::{clip_factor, global_norm, part_squares};
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::plan::inventory::MicroShape;

pub(super) fn microbatch(shape: MicroShape, input_ids: Vec<i32>, targets: Vec<i32>) -> Microbatch {
    Microbatch {
        step: 0,
        index: 0,
        shape,
        windows: Vec::new(),
        input_ids,
        targets,
    }
}

/// A fresh host copy of every part's layout (for downloads).
pub(super) fn host_parts(config: &LlamaConfig, pool: &PoolRef) -> Result<Vec<PartParams>> {
    PartId::all(config.dims.layers)
        .into_iter()
        .map(|id| Ok(PartParams::allocate(pool, config, id)?))
        .collect()
}

/// One AdamW step (clipped at 1.0) of the fixture's batch, CPU against GPU, plus the PyTorch
/// reference for the loss, the gradient norm and every gradient.
pub fn model_checks(gpu: Gpu, fixture: &Path, tol: f64, own_grads: bool) -> Result<Vec<Check>> {
    let bad = |e: &dyn std::fmt::Display| {
        CudaError::Unsupported(format!("fixture {}: {e}", fixture.display()))
    };
    let config = read_hf_config(fixture).map_err(|e| bad(&e))?;
    let reference =
        TensorFile::open(&fixture.join("reference.safetensors")).map_err(|e| bad(&e))?;
    let (shape, input_ids) = reference.i32("input_ids").map_err(|e| bad(&e))?;
    let (_, targets) = reference.i32("targets").map_err(|e| bad(&e))?;
    let micro = MicroShape {
        batch: shape[0],
        seq: shape[1],
    };
    let host = Pool::new("cpu:0", usize::MAX);
    let ids = PartId::all(config.dims.layers);
    let mut cpu_parts = load_hf_parts(fixture, &config, &ids, &host).map_err(|e| bad(&e))?;
    let (lr, max_norm) = (1e-3, 1.0);
    let adamw = OptimizerConfig::default();

    let pool = gpu.pool(None, 1 << 30)?;
    let mut trainer = GpuTrainer::upload(
        gpu,
        pool,
        config,
        &cpu_parts,
        adamw,
        LrSchedule::constant(lr),
        Some(max_norm),
    )?;

    // CPU: forward and backward of the whole batch as one micro-batch.
    let backend = CpuBackend::default();
    let ctx = PartCtx {
        backend: &backend,
        pool: &host,
        config: &config,
        micro,
    };
    let tokens = MicroTokens {
        input_ids: &input_ids,
        targets: &targets,
    };
    let (stash, out) = forward_chunk(&ctx, &cpu_parts, None, tokens).map_err(CudaError::from)?;
    let PartOutput::LossSum(cpu_loss_sum) = out else {
        return Err(CudaError::Unsupported(
            "the model's last part is not the head".into(),
        ));
    };
    let scale = 1.0 / micro.tokens() as f32;
    backward_chunk(&ctx, &mut cpu_parts, stash, None, scale).map_err(CudaError::from)?;
    let cpu_loss = cpu_loss_sum / micro.tokens() as f64;

    // GPU: the same micro-batch.
    let gpu_loss = trainer.forward_backward(
        &microbatch(micro, input_ids.clone(), targets.clone()),
        scale,
    )? / micro.tokens() as f64;
    let mut gpu_parts = host_parts(&config, &host)?;
    for (g, h) in trainer.parts.iter().zip(gpu_parts.iter_mut()) {
        g.download(&trainer.gpu, h)?;
    }
    let torch = |name: &str| reference.f32(name).map(|(_, v)| v).map_err(|e| bad(&e));
    let mut checks = vec![
        Check::new("loss vs CPU", &[gpu_loss as f32], &[cpu_loss as f32], tol),
        Check::new("loss vs PyTorch", &[gpu_loss as f32], &torch("loss")?, tol),
    ];
    for (c, g) in cpu_parts.iter().zip(&gpu_parts) {
        for ((name, cg), gg) in c.names.iter().zip(&c.grads).zip(&g.grads) {
            checks.push(Check::new(
                format!("grad.{name} vs CPU"),
                gg.data(),
                cg.data(),
                tol,
            ));
            checks.push(Check::new(
                format!("grad.{name} vs PyTorch"),
                gg.data(),
                &torch(&format!("grad.{name}"))?,
                tol,
            ));
        }
    }
    let cpu_norm = global_norm(&cpu_parts.iter().map(part_squares).collect::<Vec<_>>());
    let gpu_norm = trainer.grad_norm()?;
    checks.push(Check::new(
        "grad_norm vs CPU",
        &[gpu_norm as f32],
        &[cpu_norm as f32],
        tol,
    ));
    checks.push(Check::new(
        "grad_norm vs PyTorch",
        &[gpu_norm as f32],
        &torch("grad_norm")?,
        tol,
    ));

    // One AdamW step with clipping on both.
    let cpu_grads: Vec<Vec<Vec<f32>>> = cpu_parts
        .iter()
        .map(|p| p.grads.iter().map(|g| g.data().to_vec()).collect())
        .collect();
    let factor = clip_factor(cpu_norm, max_norm);
    for p in &mut cpu_parts {
        let mut state = PartOptimState::allocate(&host, &adamw, p)?;
        crate::exec::optim::step_part(&adamw, 1, lr, factor, p, &mut state);
    }
    // With rounded products, AdamW's first step (about lr·sign(g)) turns the rounding noise
    // of near-zero gradients into whole steps; there the step runs on the CPU's gradients,
    // so it checks the update itself. Strict f32 runs it on the GPU's own gradients.
    let suffix = if own_grads {
        trainer.update(1, lr, clip_factor(gpu_norm, max_norm))?;
        ""
    } else {
        for (g, c) in trainer.parts.iter_mut().zip(&cpu_grads) {
            for (dst, src) in g.grads.iter_mut().zip(c) {
                dst.copy_from_host(&trainer.gpu, src)?;
            }
        }
        trainer.update(1, lr, factor)?;
        " (same gradients)"
    };
    for (g, h) in trainer.parts.iter().zip(gpu_parts.iter_mut()) {
        g.download(&trainer.gpu, h)?;
    }
    for (c, g) in cpu_parts.iter().zip(&gpu_parts) {
        for ((name, cw), gw) in c.names.iter().zip(&c.weights).zip(&g.weights) {
            let label = format!("adamw.{name} vs CPU{suffix}");
            checks.push(Check::new(label, gw.data(), cw.data(), tol));
        }
    }
    Ok(checks)
}
