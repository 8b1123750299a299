//! `chronospipe selftest --gpu`: holds the CUDA backend against the CPU backend, kernel by
//! kernel on random data and for a whole training step of `shared/testdata/hf-llama-tiny`
//! (also against the PyTorch reference stored there); holds pipeline plans on GPU stages
//! against a one-stage plan of the whole model and the planner; then times training of a ~125M Llama on
//! one GPU in each precision (and in bf16 each kernel variant), its attention and projection
//! products alone, and the model as a 4-stage chronos plan on one GPU. Every check prints a
//! line; the run fails if any check fails.

mod batches;
mod flash;
mod kernels;
mod model;
mod pipeline;
mod products;
mod timing;

pub use flash::{
    FLASH_OUTPUTS, flash_check_shapes, flash_checks, flash_inputs, print_flash_kernels,
    time_attention,
};
pub use kernels::kernel_checks;
pub use model::model_checks;
pub use pipeline::{
    pipeline_checks, replica_checks, squeezed_chronos, train_stages, transfer_checks,
};
pub use timing::{
    Timing, llama_125m, llama_125m_with_heads, predicted_peak, step_flops, time_training,
};

use cudarc::driver::CudaContext;

use crate::exec::backend::CpuBackend;
use crate::exec::backend::cpu::kernels::attention::AttnShape;
use crate::exec::backend::cuda::gpu::{FlashLoads, Gpu};
use crate::exec::backend::cuda::libs::Libraries;
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::compare::rel_err;
use crate::exec::pipeline::PipelineError;
use crate::plan::inventory::{DType, MicroShape, Profile, cuda_flash_attention};

type Result<T> = std::result::Result<T, CudaError>;

/// The runtime's error as the selftest reports it: a CUDA error as itself, the rest as text.
fn pipeline_error(e: PipelineError) -> CudaError {
    match e {
        PipelineError::Cuda(e) => e,
        other => CudaError::Unsupported(other.to_string()),
    }
}

const MIB: f64 = (1 << 20) as f64;

/// One comparison: relative L2 error against a reference, and the bound it must stay under.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn new(name: impl Into<String>, ours: &[f32], reference: &[f32], tolerance: f64) -> Check {
        Check {
            name: name.into(),
            rel_err: rel_err(ours, reference),
            tolerance,
        }
    }

    pub fn passed(&self) -> bool {
        self.rel_err < self.tolerance
    }
}

/// The CPU backend's causal attention of q, k, v (and its backward for dO), in f32: out, lse,
/// dq, dk, dv, delta; the reference for the GPU's attention paths.
pub fn cpu_attention(inputs: &[Vec<f32>; 4], sh: AttnShape) -> [Vec<f32>; 6] {
    let [q, k, v, d_out] = inputs;
    let cpu = CpuBackend::default();
    let n = sh.batch * sh.seq;
    let (w, kvw) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
    let stats = sh.batch * sh.heads * sh.seq;
    let (mut out, mut lse) = (vec![0.0; n * w], vec![0.0; stats]);
    cpu.attention_forward(&mut out, &mut lse, q, k, v, sh);
    let (mut dq, mut dk, mut dv, mut delta) = (
        vec![0.0; n * w],
        vec![0.0; n * kvw],
        vec![0.0; n * kvw],
        vec![0.0; stats],
    );
    cpu.attention_backward(
        &mut dq, &mut dk, &mut dv, &mut delta, d_out, q, k, v, &out, &lse, sh,
    );
    [out, lse, dq, dk, dv, delta]
}

fn print_checks(title: &str, checks: &[Check]) -> bool {
    println!("\n{title}");
    for c in checks {
        let verdict = if c.passed() { "ok  " } else { "FAIL" };
        println!(
            "  {verdict} {:<48} rel err {:.2e} (< {:.0e})",
            c.name, c.rel_err, c.tolerance
        );
    }
    checks.iter().all(Check::passed)
}

/// Each precision the checks run at, with the relative error they allow against the CPU
/// backend and PyTorch (f32 references), and between pipeline stages and the whole-model
/// trainer on the GPU (same kernels; AdamW's first step turns the order of float atomics
/// into whole steps on a few weights). bf16 activations keep 8 significant bits (relative
/// rounding 2^-9 per value); their model checks allow 2e-2, where an H200 measured at most
/// 7.3e-3 (gradients, attention through cuBLAS).
const PRECISIONS: [(Precision, f64, f64); 3] = [
    (Precision::F32, 1e-5, 1e-5),
    (Precision::Tf32, 1e-3, 1e-3),
    (Precision::Bf16, 2e-2, 1e-3),
];

/// What `selftest --gpu` runs.
#[derive(Debug, Clone)]
pub struct SelftestOptions {
    pub device: usize,
    pub fixture: std::path::PathBuf,
    pub micro_batch_size: usize,
    pub microbatches: usize,
    /// Sequences in the extra timing row's single micro-batch (0: no extra row).
    pub large_micro_batch: usize,
    /// Attention heads (and key/value heads) of the timed model.
    pub timing_heads: usize,
    pub steps: usize,
    pub skip_timing: bool,
    /// Only the timings (for comparing kernels once the checks have passed).
    pub skip_checks: bool,
    /// The precisions to check and time (the timing table has rows for TF32 and bf16, and the
    /// 4-stage plan runs in TF32).
    pub precisions: Vec<Precision>,
    /// Also print where one step's time goes, operation by operation.
    pub profile: bool,
}

/// Prints a section's error and reports failure, so one broken section does not hide the rest.
fn section<T>(title: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            println!("\n{title}\n  FAIL {e}");
            None
        }
    }
}

/// Runs every check and prints the tables; `Ok(false)` when a check failed.
pub fn run(opts: &SelftestOptions) -> Result<bool> {
    let libs = Libraries::probe();
    println!("libraries: {libs}");
    libs.require_compute()?;
    let mut ok = true;
    let count = CudaContext::device_count()?.max(0) as usize;
    let second = (0..count).find(|&o| o != opts.device);
    if let Some(other) = second.filter(|_| !opts.skip_checks) {
        let title = format!("transfers between cuda:{} and cuda:{other}", opts.device);
        ok &= section(&title, transfer_checks(opts.device, other)).is_some_and(|(nccl, c)| {
            let via = if nccl {
                "NCCL"
            } else {
                "host memory (NCCL missing or failed to start: see the log)"
            };
            print_checks(&format!("{title}, through {via}"), &c)
        });
    }
    let asked = |p: &Precision| opts.precisions.contains(p);
    let checked = PRECISIONS.into_iter().filter(|(p, ..)| asked(p));
    for (i, (precision, tol, stage_tol)) in checked.enumerate() {
        ok &= precision_checks(opts, (precision, tol, stage_tol), i == 0, second)?;
    }
    if !opts.skip_timing && (asked(&Precision::Tf32) || asked(&Precision::Bf16)) {
        ok &= timing_tables(opts)?;
    }
    if second.is_none() {
        println!(
            "\nnot run: transfers and pipeline stages between GPUs (NCCL), this machine has one GPU"
        );
    }
    Ok(ok)
}

/// The checks of one precision (and the device's description before the first), printed;
/// `Ok(false)` when one failed.
fn precision_checks(
    opts: &SelftestOptions,
    (precision, tol, stage_tol): (Precision, f64, f64),
    first: bool,
    second: Option<usize>,
) -> Result<bool> {
    let mut ok = true;
    let mut gpu = Gpu::open(opts.device, precision)?;
    if first {
        let (free, total) = gpu.ctx.mem_get_info()?;
        let (major, minor) = gpu.ctx.compute_capability()?;
        println!(
            "device cuda:{}: {} (sm_{major}{minor}), {} MiB free of {} MiB, cuBLAS \
             workspace {} MiB",
            opts.device,
            gpu.name,
            free >> 20,
            total >> 20,
            gpu.blas_workspace_bytes() >> 20
        );
    }
    if opts.skip_checks {
        return Ok(true);
    }
    let name = precision.name();
    if precision.activations() == DType::F32 {
        let title = format!("kernels vs CPU, products in {name}");
        ok &= section(&title, kernel_checks(&gpu, tol)).is_some_and(|c| print_checks(&title, &c));
    } else {
        ok &= section("flash kernels as compiled", print_flash_kernels(&gpu)).is_some();
        let title = "flash attention (bf16) vs CPU attention on the same inputs";
        ok &= section(title, flash_checks(&mut gpu)).is_some_and(|c| print_checks(title, &c));
    }
    let fixture = opts
        .fixture
        .file_name()
        .unwrap_or_default()
        .to_string_lossy();
    let title = format!("{fixture} training step vs CPU and PyTorch, {name}");
    ok &= section(
        &title,
        model_checks(gpu, &opts.fixture, tol, precision == Precision::F32),
    )
    .is_some_and(|c| print_checks(&title, &c));
    if precision == Precision::Bf16 {
        let title = format!("{title}, products that share an input batched");
        let checks = Gpu::open(opts.device, precision).and_then(|mut gpu| {
            gpu.batch_products = true;
            model_checks(gpu, &opts.fixture, tol, false)
        });
        ok &= section(&title, checks).is_some_and(|c| print_checks(&title, &c));
    }
    let title = format!("pipeline stages on one GPU vs one stage and the planner, {name}");
    ok &= section(
        &title,
        pipeline_checks(&[opts.device], precision, stage_tol),
    )
    .is_some_and(|c| print_checks(&title, &c));
    if let Some(other) = second {
        let title = format!(
            "pipeline stages alternating between cuda:{} and cuda:{other} vs \
             one stage and the planner, {name}",
            opts.device
        );
        let gpus = [opts.device, other];
        ok &= section(&title, pipeline_checks(&gpus, precision, stage_tol))
            .is_some_and(|c| print_checks(&title, &c));
    }
    let title = format!(
        "data parallelism: 2 replicas sharing cuda:{} (device add) vs one, {name}",
        opts.device
    );
    ok &= section(&title, replica_checks(&[opts.device], precision, stage_tol))
        .is_some_and(|c| print_checks(&title, &c));
    if let Some(other) = second {
        let title = format!(
            "data parallelism: replicas on cuda:{} and cuda:{other} (NCCL all-reduce, or \
             host memory without NCCL: see the transfers above) vs one, {name}",
            opts.device
        );
        let gpus = [opts.device, other];
        ok &= section(&title, replica_checks(&gpus, precision, stage_tol))
            .is_some_and(|c| print_checks(&title, &c));
    }
    Ok(ok)
}

/// The throughput tables of the asked-for precisions, printed; `Ok(false)` when one failed.
fn timing_tables(opts: &SelftestOptions) -> Result<bool> {
    let mut ok = true;
    let asked = |p: &Precision| opts.precisions.contains(p);
    let config = llama_125m_with_heads(opts.timing_heads)
        .map_err(|e| CudaError::Unsupported(format!("--timing-heads: {e}")))?;
    let flash = cuda_flash_attention(Profile::CudaBf16, &config.dims);
    let micro = MicroShape {
        batch: opts.micro_batch_size,
        seq: 1024,
    };
    println!(
        "\ntraining throughput: ~125M Llama (hidden 768, 12 layers, {} heads, FFN 2048, \
         vocab 32000), seq 1024, AdamW; micro-batches x sequences per step",
        config.dims.heads
    );
    println!(
        "| precision | step | tokens/s | step ms | MFU | measured peak MiB | predicted peak MiB |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    let rows = timed_rows(opts, flash);
    let mut profiles = Vec::new();
    for (precision, step, profile) in rows {
        let TimedStep {
            microbatches,
            batch,
            loads,
            batch_products,
        } = step;
        let attention = if flash {
            loads.name()
        } else {
            "attention through cuBLAS"
        };
        let label = match precision {
            Precision::Bf16 if batch_products => {
                format!("{} ({attention}, batched products)", precision.name())
            }
            Precision::Bf16 => format!("{} ({attention})", precision.name()),
            _ => precision.name().to_string(),
        };
        let timed = Gpu::open(opts.device, precision).and_then(|mut gpu| {
            gpu.flash_loads = loads;
            gpu.batch_products = batch_products;
            time_training(
                gpu,
                config,
                MicroShape { batch, seq: 1024 },
                microbatches,
                (2, opts.steps),
                profile,
            )
        });
        let Some(t) = section(&label, timed) else {
            ok = false;
            continue;
        };
        let mfu = t.mfu.map_or("-".into(), |m| format!("{:.1}%", 100.0 * m));
        println!(
            "| {label} | {microbatches} x {batch} | {:.0} | {:.1} | {mfu} | {:.1} | {:.1} |",
            t.tokens_per_s,
            t.step_ms,
            t.peak_bytes as f64 / MIB,
            t.predicted_peak_bytes as f64 / MIB
        );
        profiles.push((precision, t));
    }
    if asked(&Precision::Bf16) {
        ok &= section(
            "attention alone, bf16",
            attention_table(opts.device, &config, micro, opts.steps),
        )
        .is_some();
    }
    if asked(&Precision::Bf16) {
        let title = "projection products alone, bf16";
        ok &= section(
            title,
            products_table(opts.device, &config, micro, opts.steps),
        )
        .unwrap_or(false);
    }
    if asked(&Precision::Tf32) {
        ok &= section(
            "4-stage chronos plan on one GPU",
            stages_table(opts.device, config, micro, opts.microbatches),
        )
        .unwrap_or(false);
    }
    for (precision, t) in profiles.iter().filter(|(_, t)| !t.profile.is_empty()) {
        print_profile(precision.name(), t);
    }
    Ok(ok)
}

/// The timing table's rows, each with whether to profile it: the asked-for step, profiled if
/// asked, then one micro-batch of `large_micro_batch` sequences (larger products, as
/// throughput runs use); with bf16, the asked-for step again on the flash kernels that load
/// fragments with ldmatrix, and again with the products that share an input batched.
fn timed_rows(opts: &SelftestOptions, flash: bool) -> Vec<(Precision, TimedStep, bool)> {
    let asked = |p: &Precision| opts.precisions.contains(p);
    let asked_step = TimedStep {
        microbatches: opts.microbatches,
        batch: opts.micro_batch_size,
        loads: FlashLoads::Scalar,
        batch_products: false,
    };
    let mut rows = Vec::new();
    for precision in [Precision::Tf32, Precision::Bf16].into_iter().filter(asked) {
        rows.push((precision, asked_step, opts.profile));
        if opts.large_micro_batch > 0 {
            let large = TimedStep {
                microbatches: 1,
                batch: opts.large_micro_batch,
                ..asked_step
            };
            rows.push((precision, large, false));
        }
        if precision == Precision::Bf16 && flash {
            let ldmatrix = TimedStep {
                loads: FlashLoads::Ldmatrix,
                ..asked_step
            };
            let batched = TimedStep {
                batch_products: true,
                ..asked_step
            };
            rows.push((precision, ldmatrix, false));
            rows.push((precision, batched, false));
        }
    }
    rows
}

/// One row of the timing table: the step's shape and the kernels' variants.
#[derive(Debug, Clone, Copy)]
struct TimedStep {
    microbatches: usize,
    batch: usize,
    loads: FlashLoads,
    batch_products: bool,
}

/// Where one profiled step's time went, operation by operation, with the rate of each: TFLOP/s
/// of products (cuBLAS, and the flash kernels' on the causal half of the scores), GB/s of
/// memory for the other kernels (their main buffers, once per pass).
fn print_profile(precision: &str, t: &Timing) {
    let total: f64 = t.profile.iter().map(|r| r.secs).sum();
    println!(
        "\none {precision} step, operation by operation (GPU time between events; {:.1} ms in \
         kernels and products of a {:.1} ms step; TFLOP/s of products, GB/s of other kernels)",
        total * 1e3,
        t.profiled_step_secs * 1e3
    );
    for r in t.profile.iter().take(25) {
        let rate = if r.work.flops > 0.0 {
            format!("{:>7.1} TFLOP/s", r.work.flops / r.secs / 1e12)
        } else if r.work.bytes > 0.0 {
            format!("{:>7.0} GB/s   ", r.work.bytes / r.secs / 1e9)
        } else {
            format!("{:>15}", "-")
        };
        println!(
            "  {:>7.2} ms {:>5.1}% {:>6}x {rate}  {}",
            r.secs * 1e3,
            100.0 * r.secs / total,
            r.calls,
            r.name
        );
    }
}

/// Times causal attention, forward and backward, with bf16 activations through cuBLAS and on
/// the flash kernels: one micro-batch of the timed model (heads of 64), and two sequences of
/// 2,048 tokens with Llama-2-7B's 32 heads of 128 on 8 key/value heads.
fn attention_table(
    ordinal: usize,
    config: &crate::exec::model::LlamaConfig,
    micro: MicroShape,
    reps: usize,
) -> Result<()> {
    let d = &config.dims;
    let timed = AttnShape {
        batch: micro.batch,
        seq: micro.seq,
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim(),
    };
    let wide = AttnShape {
        batch: 2,
        seq: 2048,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
    };
    let mut gpu = Gpu::open(ordinal, Precision::Bf16)?;
    println!("\nattention alone, bf16, forward + backward");
    println!("| shape | path | ms | model TFLOP/s |");
    println!("|---|---|---:|---:|");
    for sh in [timed, wide] {
        let (cublas, flash) = time_attention(&mut gpu, sh, reps)?;
        // Model FLOPs: forward Q K^T and P V over the causal half, backward twice the forward.
        let flops = 3.0 * 2.0 * (sh.batch * sh.heads * sh.seq * sh.seq * sh.head_dim) as f64;
        let shape = format!(
            "{} x {} tokens, {} heads of {} ({} kv)",
            sh.batch, sh.seq, sh.heads, sh.head_dim, sh.kv_heads
        );
        let flash = FlashLoads::EACH.iter().zip(flash);
        let rows = flash.map(|(loads, ms)| (format!("flash kernels, {}", loads.name()), ms));
        for (path, ms) in [("cuBLAS, scores in memory".to_string(), cublas)]
            .into_iter()
            .chain(rows)
        {
            let rate = flops / (ms * 1e-3) / 1e12;
            println!("| {shape} | {path} | {ms:.2} | {rate:.1} |");
        }
    }
    Ok(())
}

/// Times the timed model's projection products of one micro-batch in bf16, one call each and
/// batched by shared operand (see [`products`]); `Ok(false)` when a batched call's results
/// differ from the separate calls'.
fn products_table(
    ordinal: usize,
    config: &crate::exec::model::LlamaConfig,
    micro: MicroShape,
    reps: usize,
) -> Result<bool> {
    let gpu = Gpu::open(ordinal, Precision::Bf16)?;
    let (groups, checks) = products::time_products(&gpu, config, micro.tokens(), reps)?;
    let ok = print_checks(
        "batched products vs the same products one call each",
        &checks,
    );
    println!(
        "\nprojection products alone, bf16, {} tokens: one call each vs one batched call",
        micro.tokens()
    );
    println!("| products | one call each ms | TFLOP/s | batched ms | TFLOP/s | speed-up |");
    println!("|---|---:|---:|---:|---:|---:|");
    for g in groups {
        let rate = |ms: f64| g.flops / (ms * 1e-3) / 1e12;
        println!(
            "| {} | {:.3} | {:.1} | {:.3} | {:.1} | {:.2}x |",
            g.name,
            g.separate_ms,
            rate(g.separate_ms),
            g.batched_ms,
            rate(g.batched_ms),
            g.separate_ms / g.batched_ms
        );
    }
    Ok(ok)
}

/// Trains the ~125M Llama as a 4-stage chronos plan on one GPU, squeezed by the planner into
/// 70% of the memory its roomiest plan needs, and prints each stage's predicted and measured
/// peak and the throughput. `Ok(false)` when a peak misses its prediction by more than 5%.
fn stages_table(
    ordinal: usize,
    config: crate::exec::model::LlamaConfig,
    micro: MicroShape,
    microbatches: usize,
) -> Result<bool> {
    const STAGES: usize = 4;
    let microbatches = microbatches.max(2 * STAGES);
    let answer = squeezed_chronos(&config, Precision::Tf32, micro, microbatches, STAGES, 0.7)?;
    let predicted: Vec<u64> = answer.sim.devices.iter().map(|d| d.peak_bytes).collect();
    let batches = batches::random_batches(&config, micro, microbatches);
    let plan = answer.plan.clone();
    let budget = answer.budget_bytes as usize;
    let run = train_stages(
        &[ordinal],
        Precision::Tf32,
        config,
        plan,
        budget,
        &batches,
        4,
    )?;
    let tokens = (micro.tokens() * microbatches) as f64;
    println!(
        "\n4-stage chronos plan on one GPU (TF32), same model, {microbatches} x {} sequences \
         per step, planned into {:.0} MiB a stage (70% of the roomiest plan's peak): {}; \
         {:.0} tokens/s, {:.1} ms a step",
        micro.batch,
        budget as f64 / MIB,
        pipeline::plan_summary(&answer.plan),
        tokens / run.step_s,
        run.step_s * 1e3
    );
    println!("| stage | predicted peak MiB | measured peak MiB | gap |");
    println!("|---:|---:|---:|---:|");
    for (stage, (&m, &p)) in run.measured_peaks.iter().zip(&predicted).enumerate() {
        println!(
            "| {stage} | {:.1} | {:.1} | {:+.2}% |",
            p as f64 / MIB,
            m as f64 / MIB,
            100.0 * (m as f64 - p as f64) / p as f64
        );
    }
    let check = pipeline::peak_check("peaks".into(), &run.measured_peaks, &predicted);
    Ok(check.passed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_fails_past_its_tolerance() {
        assert!(!Check::new("x", &[2.0], &[1.0], 1e-3).passed());
        assert!(Check::new("x", &[1.0], &[1.0], 1e-3).passed());
    }
}
