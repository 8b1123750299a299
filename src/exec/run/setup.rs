//! From a job spec to a run: the model's architecture, a plan for the devices, the data.

use std::path::Path;

use crate::data::{BatchLayout, Batcher, Tokenizer};
use crate::exec::backend::CpuBackend;
use crate::exec::checkpoint::model_files::{load_hf_parts, read_hf_config};
use crate::exec::device::DeviceSet;
use crate::exec::model::{LlamaConfig, PartId};
use crate::exec::optim::OptimizerConfig;
use crate::exec::optim::schedule::LrSchedule;
use crate::exec::pipeline::{Pipeline, seeded_parts};
use crate::plan::policy::{Offload, Recompute};
use crate::plan::presets::Cluster;
use crate::plan::schedule::ScheduleKind;
use crate::plan::search::{Answer, Request, search};
use crate::spec::{
    JobSpec, ModelArch, ModelInit, OffloadChoice, RecomputeChoice, ScheduleChoice, SpecError,
};

use super::{Run, RunError};

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
        ModelInit::From { from } => {
            let c = read_hf_config(Path::new(from))?;
            let pretrained = ModelArch {
                hidden_size: c.dims.hidden,
                num_layers: c.dims.layers,
                num_heads: c.dims.heads,
                num_kv_heads: c.dims.kv_heads,
                intermediate_size: c.dims.ffn,
                vocab_size: c.dims.vocab,
                rms_norm_eps: c.rms_norm_eps as f64,
                rope_theta: c.rope_theta as f64,
            };
            spec.model
                .merge_pretrained(&pretrained)
                .map_err(RunError::Spec)
        }
    }
}

/// The fastest plan for `spec` on the first `stages` of `devices` (all of them when the
/// spec says `auto`) whose predicted peak fits each device's budget.
pub fn plan_job(spec: &JobSpec, arch: &ModelArch, devices: &DeviceSet) -> Result<Answer, RunError> {
    let available = devices.devices.len();
    let stages = spec.parallelism.stages.count().unwrap_or(available);
    if stages > available {
        return Err(RunError::Spec(vec![SpecError::new(
            "parallelism.stages",
            format!("{stages} stages need {stages} devices but {available} are available"),
        )]));
    }
    let budget = devices.devices[0].budget() as u64;
    let t = &spec.training;
    let p = &spec.parallelism;
    let request = Request {
        model: arch.dims(),
        seq_len: t.seq_len as u32,
        global_batch: t.sequences_per_step() as u32,
        micro_batch_size: Some(t.micro_batch_size as u32),
        microbatches: Some(t.microbatches as u32),
        pipeline: Some(stages as u32),
        schedule: match p.schedule {
            ScheduleChoice::Auto => None,
            ScheduleChoice::Gpipe => Some(ScheduleKind::Gpipe),
            ScheduleChoice::OneFOneB => Some(ScheduleKind::OneFOneB),
            ScheduleChoice::Interleaved => Some(ScheduleKind::Interleaved {
                chunks_per_device: p.chunks_per_stage.unwrap_or(2) as u32,
            }),
            ScheduleChoice::Chronos => Some(ScheduleKind::Chronos { in_flight: 0 }),
        },
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
    };
    Ok(search(&request, &Cluster::cpu(stages as u32, budget))?)
}

impl Run {
    /// Plans, loads the data and places the model. `default_devices` is used when the spec
    /// names none.
    pub fn prepare(spec: JobSpec, default_devices: &str) -> Result<Run, RunError> {
        let device_spec = spec.devices.as_deref().unwrap_or(default_devices);
        let devices = DeviceSet::parse(device_spec).map_err(|e| RunError::Devices {
            spec: device_spec.to_owned(),
            reason: e.to_string(),
        })?;
        Run::prepare_on(spec, devices)
    }

    /// As `prepare`, on devices already made (the service's).
    pub fn prepare_on(spec: JobSpec, mut devices: DeviceSet) -> Result<Run, RunError> {
        spec.validate().map_err(|e| RunError::Spec(e.0))?;
        let arch = resolve_arch(&spec)?;
        let config = LlamaConfig::from_arch(&arch)?;
        let answer = plan_job(&spec, &arch, &devices)?;
        devices.devices.truncate(answer.plan.devices());

        let t = &spec.training;
        let tokenizer = Tokenizer::load(&spec.data.tokenizer)?;
        let tokens = tokenizer.encode_file(Path::new(&spec.data.train))?;
        let layout = BatchLayout {
            seq_len: t.seq_len,
            micro_batch_size: t.micro_batch_size,
            microbatches: t.microbatches,
            shuffle: t.shuffle,
            seed: t.seed,
        };
        let batcher = Batcher::new(&tokens, arch.vocab_size, layout)?;

        let parts = match &spec.model.init {
            ModelInit::Seed { seed } => seeded_parts(&config, &devices.host, *seed)?,
            ModelInit::From { from } => load_hf_parts(
                Path::new(from),
                &config,
                &PartId::all(config.dims.layers),
                &devices.host,
            )?,
        };
        let pipeline = Pipeline::new(
            config,
            answer.plan.clone(),
            devices,
            Box::new(CpuBackend::default()),
            parts,
            OptimizerConfig::from_spec(&t.optimizer),
            LrSchedule::from_spec(t),
            t.grad_clip.map(|c| c as f32),
        )?;
        Ok(Run {
            spec,
            answer,
            pipeline,
            batcher,
        })
    }
}
