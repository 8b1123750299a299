//! From a job spec to a run: the model's architecture, a plan for the devices, the data.

use std::path::Path;

use crate::data::{BatchLayout, Batcher, DataError, Tokenizer};
use crate::exec::backend::CpuBackend;
use crate::exec::backend::cuda::engine::GpuEngine;
use crate::exec::backend::cuda::gpu::Gpu;
use crate::exec::backend::cuda::limits::MAX_HEAD_DIM;
use crate::exec::backend::cuda::{CudaError, Precision};
use crate::exec::checkpoint::CheckpointError;
use crate::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use crate::exec::device::{DeviceSet, Pool, PoolRef};
use crate::exec::device_spec::{DeviceSpec, Target};
use crate::exec::model::{LlamaConfig, ModelError, PartId, PartParams};
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::pipeline::{CpuEngine, Engine, Pipeline, Ranks, seeded_parts};
use crate::plan::policy::{Offload, Recompute};
use crate::plan::presets::Cluster;
use crate::plan::schedule::ScheduleKind;
use crate::plan::search::{Answer, Request};
use crate::spec::{
    JobSpec, ModelArch, ModelInit, OffloadChoice, PrecisionSpec, RecomputeChoice, ScheduleChoice,
    SpecError, Stages,
};

use super::host_budget::search_within_host;
use super::replicas;
use super::{DeviceKind, Run, RunError, ValidationSet};

/// The model's architecture: the spec's fields, or the pretrained model's `config.json`
/// (with which any field the spec gives must agree).
pub fn resolve_arch(spec: &JobSpec) -> Result<ModelArch, RunError> {
    match &spec.model.init {
        ModelInit::Seed { .. } => spec.model.explicit_arch().ok_or_else(|| {
            RunError::Spec(vec![SpecError::new(
                "model",
                "the architecture is incomplete",
            )])
        }),
        init => {
            let from = init.directory().map_err(|e| RunError::Spec(vec![e]))?;
            let from = from.unwrap_or_default();
            let pretrained = read_hf_config(Path::new(from)).map_err(|e| match e {
                // What the user's config.json sets and we do not implement is their input
                // to change, named by its field.
                CheckpointError::Model(ModelError::BadConfig { field, reason }) => {
                    RunError::Spec(vec![SpecError::new(
                        "model.init.from",
                        format!("config.json field {field}: {reason}"),
                    )])
                }
                other => other.into(),
            })?;
            spec.model
                .merge_pretrained(&pretrained.arch())
                .map_err(RunError::Spec)
        }
    }
}

/// What the CUDA backend's kernels cannot run, refused by field before planning.
fn check_cuda_model(arch: &ModelArch) -> Result<(), RunError> {
    let head_dim = arch.hidden_size / arch.num_heads.max(1);
    if head_dim > MAX_HEAD_DIM {
        return Err(RunError::Spec(vec![SpecError::new(
            "model.num_heads",
            format!(
                "head_dim = hidden_size / num_heads = {head_dim}, but CUDA devices run head \
                 dimensions up to {MAX_HEAD_DIM}: use at least {} heads, or CPU devices",
                arch.hidden_size.div_ceil(MAX_HEAD_DIM)
            ),
        )]));
    }
    Ok(())
}

/// The CUDA backend's precision for the spec's: f32 activations with TF32 products, or bf16.
pub fn gpu_precision(precision: PrecisionSpec) -> Precision {
    match precision {
        PrecisionSpec::F32 => Precision::Tf32,
        PrecisionSpec::Bf16 => Precision::Bf16,
    }
}

/// The fastest plan for `spec` on the first `stages` x `data_parallel` of `devices` (all of
/// them when the spec's stages are `auto`; with `"auto"` replicas, the fastest stages x
/// replicas that the devices hold) whose predicted peak fits each device's budget, with the
/// memory layout of the backend that will run it (`kind`, at the spec's precision).
pub fn plan_job(
    spec: &JobSpec,
    arch: &ModelArch,
    devices: &DeviceSet,
    kind: DeviceKind,
) -> Result<Answer, RunError> {
    let profile = kind.profile(spec.training.precision)?;
    if kind == DeviceKind::Cuda {
        check_cuda_model(arch)?;
    }
    let room = replicas::layout(spec, devices.devices.len())?;
    let budget = devices.devices[0].budget() as u64;
    let t = &spec.training;
    let p = &spec.parallelism;
    let request = Request {
        model: arch.dims(),
        seq_len: t.seq_len as u32,
        global_batch: t.sequences_per_step() as u32,
        micro_batch_size: Some(t.micro_batch_size as u32),
        microbatches: None,
        pipeline: room.pipeline.map(|s| s as u32),
        schedule: (p.schedule.kind(p.chunks_per_stage)).map_err(|e| RunError::Spec(vec![e]))?,
        recompute: match p.recompute {
            RecomputeChoice::Auto => Recompute::Auto,
            RecomputeChoice::None => Recompute::None,
            RecomputeChoice::Full => Recompute::Full,
            RecomputeChoice::Chronos => Recompute::Chronos,
        },
        offload: match p.offload {
            OffloadChoice::Auto => Offload::Auto,
            OffloadChoice::None => Offload::None,
            OffloadChoice::Chronos => Offload::Chronos,
        },
        // Candidates with replicas are planned as they will run.
        shard_optimizer: p.shards_optimizer(),
    };
    let used = room.devices as u32;
    let mut cluster = match kind {
        DeviceKind::Cuda => Cluster::cuda(used, budget, profile),
        DeviceKind::Cpu => Cluster::cpu(used, budget),
    };
    search_within_host(&request, &mut cluster, devices.host.budget())
}

/// Joins a pipeline to the other ranks of its run, once its plan is known.
pub(super) type Connect<E> =
    Box<dyn FnOnce(&Answer, &mut E) -> Result<Box<dyn Ranks<E>>, RunError>>;

/// What every rank of one run shares: the job and the plan. Ranks that disagree refuse to
/// meet instead of training different things.
pub(super) fn run_fingerprint(spec: &JobSpec, answer: &Answer) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(serde_json::to_vec(spec).unwrap_or_default());
    hash.update(answer.plan.to_string().as_bytes());
    let digest = hash.finalize();
    u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
}

/// How much of a GPU's free memory a run leaves alone: the CUDA context's own allocations,
/// cuBLAS workspaces and the compiled kernels are not counted in the device's pool.
pub const GPU_RESERVE: usize = 1 << 30;

/// The memory a whole-model run on GPU `ordinal` may use now: its free memory less a
/// reserve, at most `cap`. Opens the GPU (a clear error where there is no driver or no such
/// GPU).
pub fn gpu_budget(ordinal: usize, cap: Option<usize>) -> Result<usize, RunError> {
    let gpu = Gpu::open(ordinal, Precision::Tf32)?;
    Ok(gpu.pool(cap, GPU_RESERVE)?.budget())
}

/// Plans a whole-model run on one GPU named `name` with `budget` bytes: one stage, laid out
/// as the CUDA backend allocates at the spec's precision.
pub fn plan_on_gpu(
    spec: &JobSpec,
    arch: &ModelArch,
    name: &str,
    budget: usize,
) -> Result<Answer, RunError> {
    let devices = DeviceSet {
        devices: vec![Pool::new(name, budget)],
        host: Pool::new("host", usize::MAX),
    };
    plan_job(&one_stage(spec)?, arch, &devices, DeviceKind::Cuda)
}

/// A whole-model GPU run is one stage running each micro-batch's forward then its backward,
/// without recompute or offload: `auto` settings become that, anything else
/// is refused by field.
fn one_stage(spec: &JobSpec) -> Result<JobSpec, RunError> {
    let p = &spec.parallelism;
    let mut errors = Vec::new();
    let why = "`cuda` and `cuda:N` hold the whole model on one GPU (one stage, 1F1B, no \
               recompute or offload); for pipeline stages name them, as `cuda:0x4` (four on \
               GPU 0) or `cuda:0,1`";
    if p.stages.count().is_some_and(|n| n != 1) {
        errors.push(SpecError::new("parallelism.stages", why));
    }
    if p.data_parallel.count().is_some_and(|n| n != 1) {
        errors.push(SpecError::new(
            "parallelism.data_parallel",
            "one GPU holding the whole model runs one replica: for replicas name devices for \
             them, as `cuda:0x2` (two sharing GPU 0) or `cuda:0,1`",
        ));
    }
    let one_f_one_b = ScheduleChoice::of(ScheduleKind::OneFOneB);
    if p.schedule != ScheduleChoice::Auto && p.schedule != one_f_one_b {
        errors.push(SpecError::new("parallelism.schedule", why));
    }
    if !matches!(p.recompute, RecomputeChoice::Auto | RecomputeChoice::None) {
        errors.push(SpecError::new("parallelism.recompute", why));
    }
    if !matches!(p.offload, OffloadChoice::Auto | OffloadChoice::None) {
        errors.push(SpecError::new("parallelism.offload", why));
    }
    if !errors.is_empty() {
        return Err(RunError::Spec(errors));
    }
    let mut one = spec.clone();
    one.parallelism.stages = Stages::Count(1);
    one.parallelism.schedule = one_f_one_b;
    one.parallelism.recompute = RecomputeChoice::None;
    one.parallelism.offload = OffloadChoice::None;
    Ok(one)
}

/// The batches of the spec's data, for a model of `arch`.
fn load_data(spec: &JobSpec, arch: &ModelArch) -> Result<Batcher, RunError> {
    let t = &spec.training;
    let tokenizer = Tokenizer::load(&spec.data.tokenizer)?;
    let corpus = tokenizer.corpus_of_file(Path::new(&spec.data.train))?;
    let layout = BatchLayout {
        seq_len: t.seq_len,
        micro_batch_size: t.micro_batch_size,
        microbatches: t.microbatches,
        shuffle: t.shuffle,
        seed: t.seed,
    };
    let mut batcher = Batcher::of_corpus(&corpus, arch.vocab_size, layout)?;
    // A step with nothing to learn from is refused now, not when training reaches it.
    let steps = steps_for(spec, &batcher)?;
    if let Some(step) = batcher.first_step_without_targets(steps) {
        return Err(DataError::StepWithoutTargets {
            step: step + 1,
            sequences: layout.sequences_per_step(),
            seq_len: t.seq_len,
        }
        .into());
    }
    Ok(batcher)
}

/// The run's optimizer steps: `training.steps`, or its epochs over the training data's
/// windows.
fn steps_for(spec: &JobSpec, batcher: &Batcher) -> Result<u64, RunError> {
    (spec.training)
        .total_steps(batcher.windows())
        .map_err(|e| RunError::Spec(vec![e]))
}

/// The optimizer steps `spec` (validated) will train: its `training.steps`, or its epochs
/// over the training data's windows. The training data is read, tokenized and cut as the run
/// will, so what the run would refuse when it starts is the user's error now, by field:
/// training data without one whole window (a run cycles through the windows, so one window
/// serves any number of steps), a token outside the vocabulary, a step with no counted
/// target. Validation data likewise, naming `data.validation`.
pub fn count_steps(spec: &JobSpec) -> Result<u64, RunError> {
    let arch = resolve_arch(spec)?;
    ValidationSet::load(spec, &arch)?;
    steps_for(spec, &load_data(spec, &arch)?)
}

/// The model's starting parts, in `host`: seeded, or read from a Hugging Face directory.
fn initial_parts(
    spec: &JobSpec,
    config: &LlamaConfig,
    host: &PoolRef,
) -> Result<Vec<PartParams>, RunError> {
    let directory = spec
        .model
        .init
        .directory()
        .map_err(|e| RunError::Spec(vec![e]))?;
    Ok(match (&spec.model.init, directory) {
        (_, Some(from)) => load_hf_parts(
            Path::new(from),
            config,
            &PartId::all(config.dims.layers),
            host,
        )?,
        (ModelInit::Seed { seed }, None) => seeded_parts(config, host, *seed)?,
        (_, None) => {
            return Err(RunError::Spec(vec![SpecError::new(
                "model.init",
                "names neither a seed nor weights to load",
            )]));
        }
    })
}

impl Run {
    /// Plans, loads the data and places the model. `default_devices` is used when the spec
    /// names none.
    pub fn prepare(spec: JobSpec, default_devices: &str) -> Result<Run, RunError> {
        let devices = DeviceSpec::parse(spec.devices.as_deref().unwrap_or(default_devices))?;
        match devices.target() {
            Target::CpuPipeline(set) => Run::prepare_on(spec, set),
            Target::WholeModelGpu { ordinal, cap_bytes } => {
                Run::prepare_on_gpu(spec, ordinal, cap_bytes)
            }
            Target::GpuPipeline {
                stage_gpus,
                cap_bytes,
            } => Run::prepare_on_gpu_stages(spec, &stage_gpus, cap_bytes),
        }
    }

    /// As `prepare`, on devices already made (the service's).
    pub fn prepare_on(spec: JobSpec, devices: DeviceSet) -> Result<Run, RunError> {
        spec.validate().map_err(|e| RunError::Spec(e.0))?;
        let arch = resolve_arch(&spec)?;
        let answer = plan_job(&spec, &arch, &devices, DeviceKind::Cpu)?;
        let engine = CpuEngine {
            backend: CpuBackend::default(),
        };
        Run::on_pipeline(spec, &arch, answer, devices, engine, None)
    }

    /// Loads a validated `spec`'s data and places the model on the pipeline runtime over
    /// `engine`, running `answer`'s plan on `devices`; with `connect`, only the devices of this
    /// process's rank, reaching the others through what `connect` makes of the plan.
    pub(super) fn on_pipeline<E>(
        spec: JobSpec,
        arch: &ModelArch,
        answer: Answer,
        mut devices: DeviceSet,
        mut engine: E,
        connect: Option<Connect<E>>,
    ) -> Result<Run, RunError>
    where
        E: Engine + Send + 'static,
        E::Part: Send,
    {
        let config = LlamaConfig::from_arch(arch)?;
        devices.devices.truncate(answer.plan.total_devices());
        let batcher = load_data(&spec, arch)?;
        let total_steps = steps_for(&spec, &batcher)?;
        let validation = ValidationSet::load(&spec, arch)?;
        let parts = initial_parts(&spec, &config, &devices.host)?;
        let t = &spec.training;
        let training = (
            OptimizerConfig::from_spec(&t.optimizer),
            LrSchedule::from_spec(t, total_steps),
            t.grad_clip.map(|c| c as f32),
        );
        let plan = answer.plan.clone();
        let pipeline = match connect {
            None => {
                let (optimizer, schedule, clip) = training;
                Pipeline::new(
                    config, plan, devices, engine, parts, optimizer, schedule, clip,
                )?
            }
            Some(connect) => {
                let ranks = connect(&answer, &mut engine)?;
                Pipeline::new_on_rank(config, plan, devices, engine, parts, training, ranks)?
            }
        };
        Ok(Run {
            spec,
            answer,
            pipeline: Box::new(pipeline),
            batcher,
            total_steps,
            validation,
            progress: Default::default(),
        })
    }

    /// The whole model on GPU `ordinal` at the spec's precision: a one-stage plan on the
    /// pipeline runtime, planned with the CUDA backend's memory layout against the GPU's free
    /// memory less a reserve, at most `cap` bytes.
    pub fn prepare_on_gpu(
        spec: JobSpec,
        ordinal: usize,
        cap: Option<usize>,
    ) -> Result<Run, RunError> {
        spec.validate().map_err(|e| RunError::Spec(e.0))?;
        let arch = resolve_arch(&spec)?;
        LlamaConfig::from_arch(&arch)?;
        let one = one_stage(&spec)?; // refused by field before the GPU is opened
        let engine = GpuEngine::open(&[ordinal], gpu_precision(spec.training.precision))?;
        let devices = DeviceSet {
            devices: vec![engine.gpu(0).pool(cap, GPU_RESERVE)?],
            host: Pool::new("host", usize::MAX),
        };
        let answer = plan_job(&one, &arch, &devices, DeviceKind::Cuda)?;
        Run::on_pipeline(spec, &arch, answer, devices, engine, None)
    }

    /// The pipeline runtime on GPU stages: run-wide device `i` (replica by replica, as
    /// `parallelism` asks or the planner picks) on GPU `stage_gpus[i]` with its own pool of
    /// `cap` bytes, or an equal share of what its GPU has free less a reserve. Planned with the
    /// CUDA backend's memory layout at the spec's precision.
    pub fn prepare_on_gpu_stages(
        spec: JobSpec,
        stage_gpus: &[usize],
        cap: Option<usize>,
    ) -> Result<Run, RunError> {
        spec.validate().map_err(|e| RunError::Spec(e.0))?;
        let arch = resolve_arch(&spec)?;
        LlamaConfig::from_arch(&arch)?; // refused before the GPUs are opened
        let mut engine = GpuEngine::open(stage_gpus, gpu_precision(spec.training.precision))?;
        let devices = DeviceSet {
            devices: stage_pools(&engine, stage_gpus, cap)?,
            host: Pool::new("host", usize::MAX),
        };
        let answer = plan_job(&spec, &arch, &devices, DeviceKind::Cuda)?;
        let plan = &answer.plan;
        engine.replicate(plan.devices(), plan.replicas as usize)?;
        Run::on_pipeline(spec, &arch, answer, devices, engine, None)
    }
}

/// One pool per stage: `cap` bytes each, or an equal share of the free memory (less a
/// reserve) of the GPU it shares with the other stages there.
fn stage_pools(
    engine: &GpuEngine,
    stage_gpus: &[usize],
    cap: Option<usize>,
) -> Result<Vec<PoolRef>, RunError> {
    let mut free = Vec::with_capacity(stage_gpus.len());
    for stage in 0..stage_gpus.len() {
        free.push(engine.gpu(stage as u32).pool(None, GPU_RESERVE)?.budget());
    }
    stage_budgets(stage_gpus, cap, &free).map(|budgets| {
        budgets
            .into_iter()
            .map(|(name, bytes)| Pool::new(name, bytes))
            .collect()
    })
}

/// Each stage's pool name and budget, given what each stage's GPU has free (`free[stage]`).
pub(super) fn stage_budgets(
    stage_gpus: &[usize],
    cap: Option<usize>,
    free: &[usize],
) -> Result<Vec<(String, usize)>, RunError> {
    let mut budgets = Vec::with_capacity(stage_gpus.len());
    for (stage, (&ordinal, &free)) in stage_gpus.iter().zip(free).enumerate() {
        let sharing = stage_gpus.iter().filter(|&&g| g == ordinal).count();
        let budget = match cap {
            Some(c) if c.saturating_mul(sharing) > free => {
                return Err(RunError::Cuda(CudaError::Unsupported(format!(
                    "{sharing} stages of {} MiB on cuda:{ordinal} need {} MiB but it has {} MiB \
                     free (after a reserve of {} MiB); name a smaller cap or fewer stages",
                    c >> 20,
                    c.saturating_mul(sharing) >> 20,
                    free >> 20,
                    GPU_RESERVE >> 20,
                ))));
            }
            Some(c) => c,
            None => free / sharing,
        };
        let name = if sharing == 1 {
            format!("cuda:{ordinal}")
        } else {
            format!("cuda:{ordinal}/stage{stage}")
        };
        budgets.push((name, budget));
    }
    Ok(budgets)
}

#[cfg(test)]
mod tests;
