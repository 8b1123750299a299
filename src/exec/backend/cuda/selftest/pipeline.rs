//! Pipeline plans on GPU stages (several stages sharing one GPU): every schedule, and chronos
//! plans the planner squeezed into less memory with recompute and offload, must train to the
//! weights the whole model on one GPU (a one-stage plan) reaches, and each stage's measured peak must be what
//! the planner predicted.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::batches::random_batches;
use super::{Check, Result, pipeline_error};
use crate::data::Microbatch;
use crate::exec::backend::cpu::kernels::rope::Rope;
use crate::exec::backend::cuda::engine::GpuEngine;
use crate::exec::backend::cuda::tensor::GpuTensor;
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::device::{DeviceSet, MemGroup, Pool, PoolRef};
use crate::exec::model::{LlamaConfig, PartParams};
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::optim::{OptimizerConfig, PartOptimState};
use crate::exec::pipeline::engine::Engine;
use crate::exec::pipeline::{Pipeline, seeded_parts};
use crate::exec::tensor::{Element, Tensor};
use crate::plan::inventory::{MicroShape, ModelDims};
use crate::plan::ir::{Action, Plan};
use crate::plan::policy::{Offload, Recompute};
use crate::plan::presets::Cluster;
use crate::plan::reduction::with_gradient_reduction;
use crate::plan::schedule::{ScheduleKind, build};
use crate::plan::search::{Answer, Request, search};
use crate::plan::simulate::{Hardware, chunk_costs, simulate};
use crate::spec::Architecture;

const SEED: u64 = 99;

fn planner_error(e: impl std::fmt::Display) -> CudaError {
    CudaError::Unsupported(format!("planner: {e}"))
}

/// A plan's stages trained on one GPU: the final weights and optimizer state, each stage's
/// measured peak and the seconds per step between the first and the last.
pub struct StagesRun {
    pub state: FlatState,
    pub measured_peaks: Vec<usize>,
    pub step_s: f64,
}

/// A model's weights and AdamW moments, each flattened in model order.
pub struct FlatState {
    pub weights: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl FlatState {
    fn of(pairs: &[(&PartParams, &PartOptimState)]) -> FlatState {
        let parts = || pairs.iter().map(|(p, _)| p);
        let states = || pairs.iter().map(|(_, st)| st);
        FlatState {
            weights: flat(parts().flat_map(|p| &p.weights)),
            exp_avg: flat(states().flat_map(|st| &st.exp_avg)),
            exp_avg_sq: flat(states().flat_map(|st| &st.exp_avg_sq)),
        }
    }
}

fn flat<'a>(tensors: impl Iterator<Item = &'a Tensor>) -> Vec<f32> {
    tensors.flat_map(|t| t.data().iter().copied()).collect()
}

/// Trains `plan` for `steps` (at least 3) steps on `batches`, stage `s` on GPU
/// `gpus[s % gpus.len()]` within `budget` bytes, from the seeded model, and reads its state
/// straight after the last step, as a checkpoint does: state offloaded at the end of the step
/// may still be on its way to host memory.
pub fn train_stages(
    gpus: &[usize],
    precision: Precision,
    config: LlamaConfig,
    plan: Plan,
    budget: usize,
    batches: &[Microbatch],
    steps: usize,
) -> Result<StagesRun> {
    let ordinals: Vec<usize> = (0..plan.devices()).map(|s| gpus[s % gpus.len()]).collect();
    train_on(&ordinals, precision, config, plan, budget, batches, steps)
}

/// As [`train_stages`], with run-wide device `d` (replica by replica) on GPU `ordinals[d]`.
fn train_on(
    ordinals: &[usize],
    precision: Precision,
    config: LlamaConfig,
    plan: Plan,
    budget: usize,
    batches: &[Microbatch],
    steps: usize,
) -> Result<StagesRun> {
    if ordinals.len() != plan.total_devices() {
        return Err(CudaError::Unsupported(format!(
            "{} GPUs given for a plan of {} devices",
            ordinals.len(),
            plan.total_devices()
        )));
    }
    let mut engine = GpuEngine::open(ordinals, precision)?;
    engine.replicate(plan.devices(), plan.replicas as usize)?;
    let host = Pool::new("host", usize::MAX);
    let devices = DeviceSet {
        devices: (ordinals.iter().enumerate())
            .map(|(s, o)| Pool::new(format!("cuda:{o}/stage{s}"), budget))
            .collect(),
        host: host.clone(),
    };
    let parts = seeded_parts(&config, &host, SEED)?;
    let mut p = Pipeline::new(
        config,
        plan,
        devices,
        engine,
        parts,
        OptimizerConfig::default(),
        LrSchedule::constant(3e-4),
        Some(1.0),
    )
    .map_err(pipeline_error)?;
    if steps < 3 {
        return Err(CudaError::Unsupported(format!(
            "the stage checks time the steps between the first and the last: 3 or more, not {steps}"
        )));
    }
    p.train_step(batches).map_err(pipeline_error)?;
    p.engine.synchronize()?;
    let start = Instant::now();
    for _ in 2..steps {
        p.train_step(batches).map_err(pipeline_error)?;
    }
    p.engine.synchronize()?;
    let step_s = start.elapsed().as_secs_f64() / (steps - 2) as f64;
    p.train_step(batches).map_err(pipeline_error)?;
    let state = p.with_state(FlatState::of);
    Ok(StagesRun {
        state: state.map_err(pipeline_error)?,
        measured_peaks: p.measured_peaks(),
        step_s,
    })
}

/// The weights and optimizer state of the whole model on one GPU (a one-stage 1F1B plan)
/// after the same steps.
fn whole_model_state(
    ordinal: usize,
    precision: Precision,
    config: LlamaConfig,
    batches: &[Microbatch],
    steps: usize,
) -> Result<FlatState> {
    let (microbatches, layers) = (batches.len() as u32, config.dims.layers as u32);
    let plan = build(ScheduleKind::OneFOneB, 1, microbatches, layers).map_err(planner_error)?;
    let run = train_stages(
        &[ordinal],
        precision,
        config,
        plan,
        usize::MAX,
        batches,
        steps,
    )?;
    Ok(run.state)
}

/// The planner's fastest `stages`-stage chronos plan for `config` at `precision` when it must
/// fit in `fraction` of the memory its roomiest plan needs (so it recomputes and offloads).
pub fn squeezed_chronos(
    config: &LlamaConfig,
    precision: Precision,
    micro: MicroShape,
    microbatches: usize,
    stages: usize,
    fraction: f64,
) -> Result<Answer> {
    let request = Request {
        model: config.dims,
        seq_len: micro.seq as u32,
        global_batch: (micro.batch * microbatches) as u32,
        micro_batch_size: Some(micro.batch as u32),
        microbatches: Some(microbatches as u32),
        pipeline: Some(stages as u32),
        schedule: Some(ScheduleKind::Chronos { in_flight: 0 }),
        recompute: Recompute::Chronos,
        offload: Offload::Chronos,
        shard_optimizer: false,
    };
    let profile = precision.profile_name();
    let cluster = |memory_bytes| Cluster::cuda(stages as u32, memory_bytes, profile);
    let roomy = search(&request, &cluster(1 << 50)).map_err(planner_error)?;
    let tight = (roomy.sim.peak_bytes() as f64 * fraction) as u64;
    search(&request, &cluster(tight)).map_err(planner_error)
}

fn count(plan: &Plan, what: fn(&Action) -> bool) -> usize {
    plan.programs.iter().flatten().filter(|a| what(a)).count()
}

/// What a plan recomputes and offloads, in a few words.
pub fn plan_summary(plan: &Plan) -> String {
    format!(
        "{} recomputes, {} offloads",
        count(plan, |a| matches!(a, Action::Recompute { .. })),
        count(plan, |a| matches!(a, Action::Offload(_)))
    )
}

/// The model of the stage checks: small, with 8 layers so chronos fills 4 stages.
fn stage_model() -> LlamaConfig {
    LlamaConfig {
        dims: ModelDims {
            hidden: 128,
            layers: 8,
            heads: 4,
            kv_heads: 2,
            ffn: 256,
            vocab: 512,
            qkv_bias: false,
            tied_embeddings: false,
        },
        rms_norm_eps: 1e-5,
        rope: Rope::plain(10000.0),
        architecture: Architecture::Llama,
        max_position_embeddings: 4096,
    }
}

/// The relative error allowed between the stages' AdamW moments and the one-stage
/// run's. The moments are the step's gradients averaged, so they carry the gradients'
/// rounding differences (float atomics in another order, bf16 roundings that flip) rather
/// than the weights' smaller ones; what this check is for is state read before its copy to
/// the host landed (zeros, or another tensor's values: errors near 1).
const MOMENTS_TOLERANCE: f64 = 1e-2;

const STAGE_MICRO: MicroShape = MicroShape { batch: 2, seq: 64 };
const STAGE_MICROBATCHES: usize = 8;
/// Steps each stage check trains: the first and the last are left out of its timing.
const STAGE_STEPS: usize = 3;

/// Every schedule on 2 and 4 stages, stage `s` on GPU `gpus[s % gpus.len()]`, and squeezed
/// chronos plans, against the one-stage run on `gpus[0]` (weights and AdamW moments
/// after three steps) and the planner (peaks per stage). The moments are held to
/// [`MOMENTS_TOLERANCE`].
pub fn pipeline_checks(gpus: &[usize], precision: Precision, tol: f64) -> Result<Vec<Check>> {
    let (config, micro, microbatches) = (stage_model(), STAGE_MICRO, STAGE_MICROBATCHES);
    let (batches, steps) = (random_batches(&config, micro, microbatches), STAGE_STEPS);
    let reference = whole_model_state(gpus[0], precision, config, &batches, steps)?;
    let layers = config.dims.layers as u32;
    let mut plans = Vec::new();
    for stages in [2, 4] {
        for kind in ScheduleKind::EACH {
            let plan = build(kind, stages, microbatches as u32, layers).map_err(planner_error)?;
            plans.push((format!("{kind} on {stages} stages"), plan, usize::MAX));
        }
        let squeezed = squeezed_chronos(
            &config,
            precision,
            micro,
            microbatches,
            stages as usize,
            0.7,
        )?;
        let label = format!(
            "chronos on {stages} stages in 70% ({})",
            plan_summary(&squeezed.plan)
        );
        plans.push((label, squeezed.plan, squeezed.budget_bytes as usize));
    }
    let mut checks = Vec::new();
    for (label, plan, budget) in plans {
        let predicted = predicted_peaks(&plan, precision, &config, micro)?;
        let run = train_stages(gpus, precision, config, plan, budget, &batches, steps)?;
        checks.extend(run_checks(&label, &run, &reference, &predicted, tol));
    }
    Ok(checks)
}

/// A run against the reference state (weights within `tol`, AdamW moments within
/// [`MOMENTS_TOLERANCE`]) and its measured peaks against the planner's.
fn run_checks(
    label: &str,
    run: &StagesRun,
    reference: &FlatState,
    predicted: &[u64],
    tol: f64,
) -> [Check; 4] {
    let (ours, theirs) = (&run.state, reference);
    [
        Check::new(
            format!("{label}: weights"),
            &ours.weights,
            &theirs.weights,
            tol,
        ),
        Check::new(
            format!("{label}: AdamW first moments"),
            &ours.exp_avg,
            &theirs.exp_avg,
            MOMENTS_TOLERANCE,
        ),
        Check::new(
            format!("{label}: AdamW second moments"),
            &ours.exp_avg_sq,
            &theirs.exp_avg_sq,
            MOMENTS_TOLERANCE,
        ),
        peak_check(format!("{label}: peaks"), &run.measured_peaks, predicted),
    ]
}

/// Data parallelism on GPUs: 2 replicas of 1- and 2-stage 1F1B plans sharing a step's
/// micro-batches, replica `r` on GPU `gpus[r % gpus.len()]` (on one GPU its stages share it
/// and sum with the device add kernel; on two GPUs through NCCL, or host memory without it),
/// against one replica on `gpus[0]`: weights within `tol` and AdamW moments after three
/// steps, and each device's measured peak against the planner's.
pub fn replica_checks(gpus: &[usize], precision: Precision, tol: f64) -> Result<Vec<Check>> {
    let (config, micro, microbatches) = (stage_model(), STAGE_MICRO, STAGE_MICROBATCHES);
    let (batches, steps) = (random_batches(&config, micro, microbatches), STAGE_STEPS);
    let replicas = 2;
    let layers = config.dims.layers as u32;
    let one_f_one_b = |microbatches: usize, stages: u32| {
        build(ScheduleKind::OneFOneB, stages, microbatches as u32, layers).map_err(planner_error)
    };
    let mut checks = Vec::new();
    for stages in [1usize, 2] {
        let single = one_f_one_b(microbatches, stages as u32)?;
        let reference = train_stages(
            &gpus[..1],
            precision,
            config,
            single,
            usize::MAX,
            &batches,
            steps,
        )?;
        let plan = one_f_one_b(microbatches / replicas, stages as u32)?;
        let plan = with_gradient_reduction(plan, replicas as u32).map_err(planner_error)?;
        let predicted = predicted_peaks(&plan, precision, &config, micro)?.repeat(replicas);
        let ordinals: Vec<usize> = (0..replicas * stages)
            .map(|d| gpus[(d / stages) % gpus.len()])
            .collect();
        let run = train_on(
            &ordinals,
            precision,
            config,
            plan,
            usize::MAX,
            &batches,
            steps,
        )?;
        let label = format!("{stages} stage(s) x {replicas} replicas on {ordinals:?}");
        checks.extend(run_checks(&label, &run, &reference.state, &predicted, tol));
    }
    Ok(checks)
}

/// Tensors sent from GPU `a` to GPU `b` and back through the pipeline engine's transport:
/// each must arrive bit for bit, f32 and bf16, with lengths that are not a multiple of any
/// transfer width. Also says whether the transport was NCCL.
pub fn transfer_checks(a: usize, b: usize) -> Result<(bool, Vec<Check>)> {
    // The transfer moves bytes: f32 kernels open on any GPU, and bf16 tensors still move.
    let engine = GpuEngine::open(&[a, b], Precision::F32)?;
    let pool = Pool::new("transfers", usize::MAX);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut checks = Vec::new();
    for len in [1usize, 1001, 3 << 20] {
        let values: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let halves: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let exact = [
            round_trip(&engine, &pool, &values)?,
            round_trip(&engine, &pool, &halves)?,
        ];
        for (exact, dtype) in exact.into_iter().zip(["f32", "bf16"]) {
            checks.push(Check {
                name: format!("{len} {dtype} values cuda:{a} -> cuda:{b} -> cuda:{a}, bit for bit"),
                rel_err: if exact { 0.0 } else { f64::INFINITY },
                tolerance: f64::MIN_POSITIVE,
            });
        }
    }
    Ok((engine.has_nccl(), checks))
}

/// Sends `values` from the engine's first GPU to its second and back; whether they came back
/// unchanged.
fn round_trip<T: Element + PartialEq>(
    engine: &GpuEngine,
    pool: &PoolRef,
    values: &[T],
) -> Result<bool> {
    let (first, act) = (engine.gpu(0), MemGroup::Activations);
    let t = GpuTensor::from_host(first, pool, "sent", &[values.len()], values, act)?;
    let there = engine.send(0, t).and_then(|m| engine.receive(1, m, pool));
    let back = there.and_then(|t| engine.send(1, t).and_then(|m| engine.receive(0, m, pool)));
    Ok(back.map_err(pipeline_error)?.to_host::<T>(first)? == values)
}

/// Each stage's peak as the planner simulates `plan` with the inventory of `precision`.
pub fn predicted_peaks(
    plan: &Plan,
    precision: Precision,
    config: &LlamaConfig,
    micro: MicroShape,
) -> Result<Vec<u64>> {
    let hw = Hardware {
        peak_flops: 1e15,
        efficiency: 1.0,
        hbm_bytes_per_s: 1e12,
        p2p_bytes_per_s: 1e30,
        p2p_latency_s: 0.0,
        host_bytes_per_s: 1e30,
    };
    let costs = chunk_costs(plan, precision.profile(), &config.dims, micro, &hw);
    let sim = simulate(plan, &costs, &hw, false).map_err(planner_error)?;
    Ok(sim.devices.iter().map(|d| d.peak_bytes).collect())
}

/// The largest relative gap between measured and predicted peaks, held to the 5% goal.
pub fn peak_check(name: String, measured: &[usize], predicted: &[u64]) -> Check {
    let gap = if measured.len() != predicted.len() {
        f64::INFINITY
    } else {
        measured
            .iter()
            .zip(predicted)
            .map(|(&m, &p)| (m as f64 - p as f64).abs() / (p as f64).max(1.0))
            .fold(0.0, f64::max)
    };
    Check {
        name,
        rel_err: gap,
        tolerance: 0.05,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::backend::cuda::selftest::llama_125m;

    /// The plans `selftest --gpu` squeezes (the stage checks' model on 2 and 4 stages, the
    /// table's 125M model on 4) fit their budgets only by recomputing or offloading, and the
    /// planner's peaks are the ones `predicted_peaks` checks the GPU against.
    #[test]
    fn squeezed_chronos_plans_recompute_or_offload_to_fit() {
        let cases = [
            (stage_model(), STAGE_MICRO, STAGE_MICROBATCHES, 2),
            (stage_model(), STAGE_MICRO, STAGE_MICROBATCHES, 4),
            (
                llama_125m(),
                MicroShape {
                    batch: 8,
                    seq: 1024,
                },
                8,
                4,
            ),
        ];
        for (config, micro, microbatches, stages) in cases {
            for precision in [Precision::Tf32, Precision::Bf16] {
                let a =
                    squeezed_chronos(&config, precision, micro, microbatches, stages, 0.7).unwrap();
                let moved = count(&a.plan, |a| {
                    matches!(a, Action::Recompute { .. } | Action::Offload(_))
                });
                assert!(moved > 0, "{stages} stages: {}", plan_summary(&a.plan));
                let peaks = predicted_peaks(&a.plan, precision, &config, micro).unwrap();
                let planned: Vec<u64> = a.sim.devices.iter().map(|d| d.peak_bytes).collect();
                assert_eq!(peaks, planned);
                assert!(peaks.iter().all(|&p| p <= a.budget_bytes), "{peaks:?}");
            }
        }
    }
}
