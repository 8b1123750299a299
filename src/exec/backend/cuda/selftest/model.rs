//! One training step of the Hugging Face fixture on the GPU against the CPU backend and the
//! PyTorch reference stored with it.

use std::path::Path;

use super::{Check, Result, pipeline_error};
use crate::exec::backend::CpuBackend;
use crate::exec::backend::cuda::CudaError;
use crate::exec::backend::cuda::engine::{GpuEngine, GpuPart};
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use crate::exec::checkpoint::safetensors_io::TensorFile;
use crate::exec::device::{MemGroup, Pool, PoolRef};
use crate::exec::model::chunk::{backward_chunk, forward_chunk};
use crate::exec::model::head::head_forward_backward;
use crate::exec::model::params::TIED_TABLE;
use crate::exec::model::part::{MicroTokens, PartOutput};
use crate::exec::model::tied::sum_tied_grads;
use crate::exec::model::{LlamaConfig, PartCtx, PartId, PartParams};
use crate::exec::optim::clip::{clip_factor, global_norm, part_squares};
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::exec::pipeline::engine::{Engine, Update};
use crate::plan::inventory::{DType, MicroShape};

/// A fresh host copy of every part's layout (for downloads).
pub(super) fn host_parts(config: &LlamaConfig, pool: &PoolRef) -> Result<Vec<PartParams>> {
    PartId::all(config.dims.layers)
        .into_iter()
        .map(|id| Ok(PartParams::allocate(pool, config, id)?))
        .collect()
}

/// Host parts as the engine's parts on its GPU: weights and zero gradients on the device.
fn upload(
    engine: &GpuEngine,
    parts: Vec<PartParams>,
    host: &PoolRef,
    pool: &PoolRef,
) -> Result<Vec<GpuPart>> {
    let to_device = |t, group| engine.move_tensor(0, t, pool, group, false);
    let mut on_gpu = Vec::with_capacity(parts.len());
    for part in parts {
        let mut part = engine.adopt(part, host).map_err(pipeline_error)?;
        let (weights, grads) = (
            std::mem::take(&mut part.weights),
            std::mem::take(&mut part.grads),
        );
        part.weights = (weights.into_iter())
            .map(|t| to_device(t, MemGroup::Weights))
            .collect::<std::result::Result<_, _>>()
            .map_err(pipeline_error)?;
        part.grads = (grads.into_iter())
            .map(|t| to_device(t, MemGroup::Gradients))
            .collect::<std::result::Result<_, _>>()
            .map_err(pipeline_error)?;
        on_gpu.push(part);
    }
    Ok(on_gpu)
}

/// Copies each part's weights and gradients into host parts of the same layout.
fn download(gpu: &Gpu, parts: &[GpuPart], host: &mut [PartParams]) -> Result<()> {
    for (g, h) in parts.iter().zip(host.iter_mut()) {
        let weights = g.weights.iter().zip(h.weights.iter_mut());
        for (src, dst) in weights.chain(g.grads.iter().zip(h.grads.iter_mut())) {
            src.read_range(gpu, 0..src.len(), dst.data_mut())?;
        }
    }
    Ok(())
}

/// Forward and backward of one micro-batch through every part as a one-stage run takes it
/// (the head's forward and backward in one pass); returns its summed loss.
fn forward_backward(
    ctx: &PartCtx<'_, Gpu>,
    parts: &mut [GpuPart],
    tokens: MicroTokens<'_>,
    scale: f32,
) -> Result<f64> {
    let (head, body) = parts
        .split_last_mut()
        .ok_or(CudaError::Unsupported("no parts".into()))?;
    let (stash, out) = forward_chunk(ctx, body, None, tokens)?;
    let PartOutput::Hidden(x) = out else {
        return Err(CudaError::Unsupported(
            "the head is not the last part".into(),
        ));
    };
    let (grad, loss) = head_forward_backward(ctx, head, x, tokens.targets, scale)?;
    backward_chunk(ctx, body, stash, Some(grad), scale)?;
    Ok(loss)
}

/// Tied embeddings (a no-op otherwise): the table's gradients of its two uses summed into both
/// copies on the GPU, as the pipeline's `TIE` sums them on one device.
fn sum_tied(engine: &GpuEngine, parts: &mut [GpuPart]) -> Result<()> {
    let tied = |p: &GpuPart| p.names.iter().position(|n| n == TIED_TABLE);
    if !config_tied(parts) {
        return Ok(());
    }
    let Some((embedding, rest)) = parts.split_first_mut() else {
        return Ok(());
    };
    let head = rest
        .last_mut()
        .ok_or(CudaError::Unsupported("no head".into()))?;
    let (Some(e), Some(h)) = (tied(embedding), tied(head)) else {
        return Err(CudaError::Unsupported(
            "a tied model without its table".into(),
        ));
    };
    let copies = &mut [&mut embedding.grads[e], &mut head.grads[h]];
    engine.sum_here(0, copies).map_err(pipeline_error)
}

/// Whether the model's head holds a copy of the embedding's table.
fn config_tied(parts: &[GpuPart]) -> bool {
    (parts.last()).is_some_and(|h| h.names.iter().any(|n| h.id.is_tied_copy(n)))
}

/// The CPU's forward and backward of one micro-batch; returns its mean loss.
fn cpu_forward_backward(
    ctx: &PartCtx<'_, CpuBackend>,
    parts: &mut [PartParams],
    tokens: MicroTokens<'_>,
    scale: f32,
) -> Result<f64> {
    let (stash, out) = forward_chunk(ctx, parts, None, tokens).map_err(CudaError::from)?;
    let PartOutput::LossSum(loss_sum) = out else {
        return Err(CudaError::Unsupported(
            "the model's last part is not the head".into(),
        ));
    };
    backward_chunk(ctx, parts, stash, None, scale).map_err(CudaError::from)?;
    sum_tied_grads(parts).map_err(CudaError::from)?;
    Ok(loss_sum / ctx.micro.tokens() as f64)
}

/// One AdamW step on the CPU parts, each with fresh optimizer state.
fn cpu_adamw_step(
    parts: &mut [PartParams],
    host: &PoolRef,
    (adamw, lr, factor): (&OptimizerConfig, f32, f32),
) -> Result<()> {
    for p in parts {
        let mut state = PartOptimState::allocate(host, adamw, p)?;
        crate::exec::optim::step_part(adamw, 1, lr, factor, p, &mut state);
    }
    Ok(())
}

/// Gives the GPU parts the CPU's gradients (per part, per tensor).
fn upload_grads(gpu: &Gpu, parts: &mut [GpuPart], grads: &[Vec<Vec<f32>>]) -> Result<()> {
    for (g, c) in parts.iter_mut().zip(grads) {
        for (dst, src) in g.grads.iter_mut().zip(c) {
            dst.copy_from_host(gpu, src)?;
        }
    }
    Ok(())
}

/// AdamW's step 1 with `lr` and the clipping `factor` on every parameter (fresh moments).
fn adamw_step(
    engine: &GpuEngine,
    parts: &mut [GpuPart],
    pool: &PoolRef,
    (adamw, lr, factor): (&OptimizerConfig, f32, f32),
) -> Result<()> {
    let coeffs = adamw.coeffs(1, lr);
    let update = Update {
        config: adamw,
        coeffs: &coeffs,
        clip_factor: factor,
    };
    let gpu = engine.gpu(0);
    for part in parts {
        for (w, g) in part.weights.iter_mut().zip(part.grads.iter_mut()) {
            let zeros = || {
                GpuTensor::zeros(
                    gpu,
                    pool,
                    "moment",
                    w.shape(),
                    DType::F32,
                    MemGroup::OptimizerState,
                )
            };
            let (mut m, mut v) = (zeros()?, zeros()?);
            let all = 0..w.len();
            engine
                .update(0, update, w, g, all.clone(), Some((&mut m, &mut v)), all)
                .map_err(pipeline_error)?;
        }
    }
    Ok(())
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
    let load = || load_hf_parts(fixture, &config, &ids, &host).map_err(|e| bad(&e));
    let mut cpu_parts = load()?;
    let (lr, max_norm) = (1e-3, 1.0);
    let adamw = OptimizerConfig::default();

    let pool = gpu.pool(None, 1 << 30)?;
    let engine = GpuEngine::of(gpu);
    let mut gpu_model = upload(&engine, load()?, &host, &pool)?;

    // CPU: forward and backward of the whole batch as one micro-batch.
    let tokens = MicroTokens {
        input_ids: &input_ids,
        targets: &targets,
    };
    let scale = 1.0 / micro.tokens() as f32;
    let cpu_ctx = PartCtx {
        backend: &CpuBackend::default(),
        pool: &host,
        config: &config,
        micro,
    };
    let cpu_loss = cpu_forward_backward(&cpu_ctx, &mut cpu_parts, tokens, scale)?;

    // GPU: the same micro-batch.
    let gpu_ctx = PartCtx {
        backend: engine.gpu(0),
        pool: &pool,
        config: &config,
        micro,
    };
    let gpu_loss =
        forward_backward(&gpu_ctx, &mut gpu_model, tokens, scale)? / micro.tokens() as f64;
    sum_tied(&engine, &mut gpu_model)?;
    let mut gpu_parts = host_parts(&config, &host)?;
    download(engine.gpu(0), &gpu_model, &mut gpu_parts)?;
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
    let mut gpu_squares = 0.0;
    for part in &gpu_model {
        gpu_squares += engine.grad_squares(0, part).map_err(pipeline_error)?;
    }
    let gpu_norm = gpu_squares.sqrt();
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
    cpu_adamw_step(&mut cpu_parts, &host, (&adamw, lr, factor))?;
    // With rounded products, AdamW's first step (about lr·sign(g)) turns the rounding noise
    // of near-zero gradients into whole steps; there the step runs on the CPU's gradients,
    // so it checks the update itself. Strict f32 runs it on the GPU's own gradients.
    let suffix = if own_grads {
        let factor = clip_factor(gpu_norm, max_norm);
        adamw_step(&engine, &mut gpu_model, &pool, (&adamw, lr, factor))?;
        ""
    } else {
        upload_grads(engine.gpu(0), &mut gpu_model, &cpu_grads)?;
        adamw_step(&engine, &mut gpu_model, &pool, (&adamw, lr, factor))?;
        " (same gradients)"
    };
    download(engine.gpu(0), &gpu_model, &mut gpu_parts)?;
    for (c, g) in cpu_parts.iter().zip(&gpu_parts) {
        for ((name, cw), gw) in c.names.iter().zip(&c.weights).zip(&g.weights) {
            let label = format!("adamw.{name} vs CPU{suffix}");
            checks.push(Check::new(label, gw.data(), cw.data(), tol));
        }
    }
    Ok(checks)
}
