//! Timing a ~125M Llama's training on one GPU, and the planner's memory prediction for it.

use std::time::Instant;

use super::batches::random_batches;
use super::pipeline::predicted_peaks;
use super::{Result, pipeline_error};
use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::backend::cuda::engine::GpuEngine;
use crate::exec::backend::cuda::gpu::{Gpu, ProfileRow};
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::device::{DeviceSet, Pool};
use crate::exec::model::{LlamaConfig, ModelError};
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::pipeline::{Pipeline, seeded_parts};
use crate::plan::cost::part_forward_flops;
use crate::plan::inventory::{MicroShape, ModelDims, Part, Profile};
use crate::plan::schedule::{ScheduleKind, build};
use crate::spec::Architecture;

/// One row of the timing table.
#[derive(Debug, Clone)]
pub struct Timing {
    pub precision: Precision,
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Model FLOPs per second over the GPU's dense peak for the precision, if known.
    pub mfu: Option<f64>,
    pub peak_bytes: usize,
    /// The planner's prediction for the same run (the precision's inventory, one-stage plan).
    pub predicted_peak_bytes: u64,
    /// Per-operation GPU times of one extra step, when asked for, longest first, and that
    /// step's wall time in seconds.
    pub profile: Vec<ProfileRow>,
    pub profiled_step_secs: f64,
}

/// The ~125M-parameter Llama of the issue: hidden 768, 12 layers, 12 heads, FFN 2048.
pub fn llama_125m() -> LlamaConfig {
    LlamaConfig {
        dims: ModelDims {
            hidden: 768,
            layers: 12,
            heads: 12,
            kv_heads: 12,
            ffn: 2048,
            vocab: 32000,
            qkv_bias: false,
            tied_embeddings: false,
        },
        rms_norm_eps: 1e-5,
        rope: Rope::plain(10000.0),
        architecture: Architecture::Llama,
        max_position_embeddings: 4096,
    }
}

/// [`llama_125m`] with `heads` attention heads, as many key/value heads, checked as any
/// model config is.
pub fn llama_125m_with_heads(heads: usize) -> std::result::Result<LlamaConfig, ModelError> {
    let mut config = llama_125m();
    config.dims.heads = heads;
    config.dims.kv_heads = heads;
    config.validate()?;
    Ok(config)
}

/// Dense tensor-core peak in FLOP/s for the GPUs whose figures we know.
fn peak_flops(name: &str, precision: Precision) -> Option<f64> {
    let hopper = name.contains("H100") || name.contains("H200") || name.contains("GH200");
    let a100 = name.contains("A100");
    match precision {
        Precision::Bf16 if hopper => Some(989.4e12),
        Precision::Tf32 if hopper => Some(494.7e12),
        Precision::Bf16 if a100 => Some(312e12),
        Precision::Tf32 if a100 => Some(156e12),
        _ => None,
    }
}

/// Model FLOPs of one training step (forward + backward = 3x forward, causal attention).
pub fn step_flops(config: &LlamaConfig, micro: MicroShape, microbatches: usize) -> f64 {
    let d = &config.dims;
    let f = |p| part_forward_flops(Profile::CudaF32, d, micro, p);
    let forward = f(Part::Embedding) + d.layers as f64 * f(Part::Layer) + f(Part::Head);
    3.0 * forward * microbatches as f64
}

/// The planner's peak for training on one device: a one-stage 1F1B plan (each micro-batch's
/// forward then backward, the step at the end) simulated with `precision`'s inventory.
pub fn predicted_peak(
    config: &LlamaConfig,
    precision: Precision,
    micro: MicroShape,
    microbatches: usize,
) -> Result<u64> {
    let plan = build(
        ScheduleKind::OneFOneB,
        1,
        microbatches as u32,
        config.dims.layers as u32,
    )
    .map_err(|e| CudaError::Unsupported(format!("planner: {e}")))?;
    Ok(predicted_peaks(&plan, precision, config, micro)?[0])
}

/// Times `steps` training steps (after `warmup`) of `config` on `gpu`, at its precision: the
/// whole model as a one-stage 1F1B plan on the pipeline runtime.
pub fn time_training(
    gpu: Gpu,
    config: LlamaConfig,
    micro: MicroShape,
    microbatches: usize,
    (warmup, steps): (usize, usize),
    profile: bool,
) -> Result<Timing> {
    let precision = gpu.precision;
    let host = Pool::new("host", usize::MAX);
    let parts = seeded_parts(&config, &host, 1234)?;
    let devices = DeviceSet {
        devices: vec![gpu.pool(None, 1 << 30)?],
        host,
    };
    let layers = config.dims.layers as u32;
    let plan = build(ScheduleKind::OneFOneB, 1, microbatches as u32, layers)
        .map_err(|e| CudaError::Unsupported(format!("planner: {e}")))?;
    let mut p = Pipeline::new(
        config,
        plan,
        devices,
        GpuEngine::of(gpu),
        parts,
        OptimizerConfig::default(),
        LrSchedule::constant(3e-4),
        Some(1.0),
    )
    .map_err(pipeline_error)?;
    let batches = random_batches(&config, micro, microbatches);
    let step = |p: &mut Pipeline<GpuEngine>| -> Result<()> {
        p.train_step(&batches).map_err(pipeline_error)?;
        p.engine.synchronize()
    };
    for _ in 0..warmup {
        step(&mut p)?;
    }
    let start = Instant::now();
    for _ in 0..steps {
        p.train_step(&batches).map_err(pipeline_error)?;
    }
    p.engine.synchronize()?;
    let secs = start.elapsed().as_secs_f64() / steps.max(1) as f64;
    let tokens = (micro.tokens() * microbatches) as f64;
    let mfu = peak_flops(&p.engine.gpu(0).name, precision)
        .map(|peak| step_flops(&config, micro, microbatches) / secs / peak);
    let (mut report, mut profiled_step_secs) = (Vec::new(), 0.0);
    if profile {
        p.engine.gpu_mut(0).profile();
        let start = Instant::now();
        step(&mut p)?;
        profiled_step_secs = start.elapsed().as_secs_f64();
        report = p.engine.gpu(0).profile_report()?;
    }
    Ok(Timing {
        precision,
        tokens_per_s: tokens / secs,
        step_ms: secs * 1e3,
        mfu,
        peak_bytes: p.measured_peaks()[0],
        predicted_peak_bytes: predicted_peak(&config, precision, micro, microbatches)?,
        profile: report,
        profiled_step_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::super::MIB;
    use super::*;
    use crate::plan::cost::model_params;
    use crate::plan::inventory::{act_copy_bytes, total_bytes};

    /// The timing run's predicted peak holds the f32 states (16 bytes per parameter; with bf16
    /// activations, also 2 per projection weight for its copy) and one micro-batch's stashes,
    /// never two: micro-batches run one after another.
    #[test]
    fn predicted_peak_of_the_timing_run_is_states_plus_one_microbatch() {
        let config = llama_125m();
        let micro = MicroShape {
            batch: 8,
            seq: 1024,
        };
        let states = 16 * model_params(&config.dims);
        let stash = |p| total_bytes(&Profile::CudaF32.part(&config.dims, micro, p).stash) as u64;
        let one_mb = stash(Part::Embedding) + 12 * stash(Part::Layer) + stash(Part::Head);
        let peak = predicted_peak(&config, Precision::Tf32, micro, 2).unwrap();
        assert!(peak > states + one_mb, "{peak} <= {states} + {one_mb}");
        assert!(
            peak < states + 2 * one_mb,
            "{peak} >= {states} + 2 x {one_mb}"
        );
        assert_eq!(
            peak,
            predicted_peak(&config, Precision::Tf32, micro, 4).unwrap()
        );
        // bf16 activations: the states and the weights' copies, each micro-batch's activations
        // about halved.
        let copy = |p| act_copy_bytes(Profile::CudaBf16, &config.dims, p);
        let copies = copy(Part::Embedding) + 12 * copy(Part::Layer) + copy(Part::Head);
        let bf16_states = states + copies;
        let bf16 = predicted_peak(&config, Precision::Bf16, micro, 2).unwrap();
        assert!(
            bf16 > bf16_states && bf16 - bf16_states < (peak - states) * 6 / 10,
            "{bf16}"
        );
        println!(
            "predicted peak {:.1} MiB (f32 activations), {:.1} MiB (bf16); states {:.1} MiB, \
             bf16 copies of the weights {:.1} MiB",
            peak as f64 / MIB,
            bf16 as f64 / MIB,
            states as f64 / MIB,
            copies as f64 / MIB
        );
    }
}
