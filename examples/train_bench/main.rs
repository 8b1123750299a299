//! Training throughput of the CPU executor on one device, for comparison with PyTorch eager
//! (`shared/bench/torch_llama_ref.py`, same shapes). Usage:
//! `cargo run --release --example train_bench -- --config a|b [--steps N] [--profile]`
//! Prints the median step time over the steps after two warm-up steps, as tokens/s. With
//! `--profile`, every kernel call is timed and a table of milliseconds per step by kernel
//! follows (the timing adds little, but quote throughput from runs without it).

mod timed;

use std::time::Instant;

use anyhow::{Context, bail};
use chronospipe::data::Microbatch;
use chronospipe::exec::backend::CpuBackend;
use chronospipe::exec::backend::cpu::kernels::rope::Rope;
use chronospipe::exec::device::Pool;
use chronospipe::exec::model::LlamaConfig;
use chronospipe::exec::optim::OptimizerConfig;
use chronospipe::exec::optim::schedule::LrSchedule;
use chronospipe::exec::train::{HostBackend, SingleDevice};
use chronospipe::plan::inventory::{MicroShape, ModelDims};
use chronospipe::spec::Architecture;
use rand::{Rng, SeedableRng};

struct BenchConfig {
    dims: ModelDims,
    seq: usize,
    batch: usize,
}

fn config(name: &str) -> anyhow::Result<BenchConfig> {
    let (hidden, layers, heads, ffn, seq, batch) = match name {
        "a" => (256, 4, 4, 688, 256, 8),
        "b" => (512, 8, 8, 1376, 512, 4),
        other => bail!("unknown config {other:?}: expected a or b"),
    };
    Ok(BenchConfig {
        dims: ModelDims {
            hidden,
            layers,
            heads,
            kv_heads: heads,
            ffn,
            vocab: 256,
            qkv_bias: false,
            tied_embeddings: false,
        },
        seq,
        batch,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let bench = config(&flag("--config").unwrap_or_else(|| "a".into()))?;
    let steps: usize = flag("--steps")
        .unwrap_or_else(|| "8".into())
        .parse()
        .context("--steps")?;
    let profile = args.iter().any(|a| a == "--profile");
    let llama = LlamaConfig {
        dims: bench.dims,
        rms_norm_eps: 1e-5,
        rope: Rope::plain(10000.0),
        architecture: Architecture::Llama,
        max_position_embeddings: 4096,
    };
    let optimizer = OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let pool = Pool::new("cpu:0", usize::MAX);
    let (schedule, inner) = (LrSchedule::constant(1e-3), CpuBackend::default());
    if profile {
        let timed = timed::Timed { inner };
        let trainer = SingleDevice::from_seed(llama, pool, timed, 0, optimizer, schedule, None)?;
        run(trainer, &bench, steps, profile)
    } else {
        let trainer = SingleDevice::from_seed(llama, pool, inner, 0, optimizer, schedule, None)?;
        run(trainer, &bench, steps, profile)
    }
}

/// Runs `steps` steps after two warm-up steps and prints the median step's throughput.
fn run<B: HostBackend>(
    mut trainer: SingleDevice<B>,
    bench: &BenchConfig,
    steps: usize,
    profile: bool,
) -> anyhow::Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let shape = MicroShape {
        batch: bench.batch,
        seq: bench.seq,
    };
    let tokens: Vec<i32> = (0..shape.tokens() + 1)
        .map(|_| rng.gen_range(0..256))
        .collect();
    let mb = Microbatch {
        step: 0,
        index: 0,
        shape,
        windows: vec![0; bench.batch],
        input_ids: tokens[..shape.tokens()].to_vec(),
        targets: tokens[1..].to_vec(),
    };
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t = Instant::now();
        let report = trainer.train_step(std::slice::from_ref(&mb))?;
        let dt = t.elapsed().as_secs_f64();
        if i >= 2 {
            times.push(dt);
        }
        if i == 1 {
            timed::reset();
        }
        eprintln!("step {i}: loss {:.4} {:.3}s", report.loss, dt);
    }
    let total: f64 = times.iter().sum();
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    if profile {
        timed::print_table(times.len(), total * 1e3 / times.len() as f64);
    }
    let params: usize = trainer.parts.iter().map(|p| p.param_count()).sum();
    println!(
        "params={params} threads={} step_s={med:.4} tokens_per_s={:.0} peak_bytes={}",
        rayon::current_num_threads(),
        shape.tokens() as f64 / med,
        trainer.pool.peak_bytes()
    );
    Ok(())
}
