//! A run spread over processes (ranks): every rank plans the whole job on the whole device
//! list, so all plan alike, then runs its block of the plan's devices and reaches the others
//! over TCP (`TcpRanks`). CPU devices are pools of host memory; GPUs name their ordinals on
//! their own machines and one cap, the memory every rank plans each device with; what crosses
//! processes goes through host memory, except the replica collectives of stages the ranks
//! link GPU to GPU (`rank_links`).

use std::ops::Range;

use crate::exec::backend::CpuBackend;
use crate::exec::backend::cuda::engine::GpuEngine;
use crate::exec::device::{DeviceSet, Pool};
use crate::exec::device_spec::{DeviceSpec, Target};
use crate::exec::model::LlamaConfig;
use crate::exec::pipeline::{CpuEngine, Engine, PipelineError, Ranks, TcpRanks};
use crate::exec::transport::{Mesh, RankSpec};
use crate::plan::search::Answer;
use crate::spec::{JobSpec, SpecError};

use super::rank_links::link_gpu_ranks;
use super::setup::{
    Connect, GPU_RESERVE, gpu_precision, plan_job, resolve_arch, run_fingerprint, stage_budgets,
};
use super::{DeviceKind, Run, RunError};

impl Run {
    /// As `prepare`, for rank `rank.rank` of a run spread over processes: every rank plans
    /// the whole job on the whole device list (the same plan, so every rank is given the same
    /// `host_bytes` of host memory, `u64::MAX` for unbounded), then runs its block of the
    /// plan's devices and reaches the others over TCP. GPUs (`cuda:0,1@40GiB`: each device's
    /// GPU on its rank's machine, repeats allowed) need the cap, which every rank plans with.
    pub fn prepare_rank(
        spec: JobSpec,
        default_devices: &str,
        rank: RankSpec,
        host_bytes: u64,
    ) -> Result<Run, RunError> {
        let named = spec.devices.clone();
        let named = named.as_deref().unwrap_or(default_devices);
        let host = Pool::new("host", usize::try_from(host_bytes).unwrap_or(usize::MAX));
        let target = DeviceSpec::parse(named)?.target();
        spec.validate().map_err(|e| RunError::Spec(e.0))?;
        let (stage_gpus, cap) = match target {
            Target::CpuPipeline(mut devices) => {
                devices.host = host;
                return Run::cpu_rank(spec, devices, rank);
            }
            Target::WholeModelGpu {
                ordinal,
                cap_bytes: Some(cap),
            } => (vec![ordinal], cap),
            Target::GpuPipeline {
                stage_gpus,
                cap_bytes: Some(cap),
            } => (stage_gpus, cap),
            _ => {
                return Err(RunError::Spec(vec![SpecError::new(
                    "devices",
                    format!(
                        "{named}: GPUs over ranks name the memory every rank plans each device \
                         with, as `{named}@40GiB`: ranks that measured their own GPUs could \
                         plan apart"
                    ),
                )]));
            }
        };
        let devices = DeviceSet {
            devices: (stage_gpus.iter().enumerate())
                .map(|(d, g)| Pool::new(format!("cuda:{g} (device {d})"), cap))
                .collect(),
            host,
        };
        Run::gpu_rank(spec, devices, &stage_gpus, rank)
    }

    fn cpu_rank(spec: JobSpec, devices: DeviceSet, rank: RankSpec) -> Result<Run, RunError> {
        let arch = resolve_arch(&spec)?;
        let answer = plan_job(&spec, &arch, &devices, DeviceKind::Cpu)?;
        let engine = CpuEngine {
            backend: CpuBackend::default(),
        };
        let connect = connect(&spec, rank, |_, _, _, _| Ok(()));
        Run::on_pipeline(spec, &arch, answer, devices, engine, Some(connect))
    }

    /// Rank `rank` on GPUs: plans on `devices` (every one at the cap), then opens the GPUs
    /// of its own block of the plan's devices and checks they have the cap free.
    fn gpu_rank(
        spec: JobSpec,
        devices: DeviceSet,
        stage_gpus: &[usize],
        rank: RankSpec,
    ) -> Result<Run, RunError> {
        let arch = resolve_arch(&spec)?;
        LlamaConfig::from_arch(&arch)?; // refused before the GPUs are opened
        let answer = plan_job(&spec, &arch, &devices, DeviceKind::Cuda)?;
        let local = local_devices(&rank, &answer)?;
        let here = &stage_gpus[local.start as usize..local.end as usize];
        let precision = gpu_precision(spec.training.precision);
        let stages = answer.plan.devices();
        let engine = GpuEngine::open_rank(here, local.clone(), stages, precision)?;
        check_free(&engine, here, local, devices.devices[0].budget())?;
        let connect = connect(&spec, rank, link_gpu_ranks);
        Run::on_pipeline(spec, &arch, answer, devices, engine, Some(connect))
    }
}

/// The run-wide devices rank `rank` runs of `answer`'s plan.
fn local_devices(rank: &RankSpec, answer: &Answer) -> Result<Range<u32>, RunError> {
    let total = answer.plan.total_devices() as u32;
    rank.check_divides(total).map_err(PipelineError::from)?;
    Ok(rank.devices_of(rank.rank, total))
}

/// Refused unless this rank's GPUs (`here`, its devices `local`) have `cap` free for each of
/// their devices, after the reserve.
fn check_free(
    engine: &GpuEngine,
    here: &[usize],
    local: Range<u32>,
    cap: usize,
) -> Result<(), RunError> {
    let mut free = Vec::with_capacity(here.len());
    for device in local {
        free.push(engine.gpu(device).pool(None, GPU_RESERVE)?.budget());
    }
    stage_budgets(here, Some(cap), &free).map(|_| ())
}

/// What an engine sets up with the other ranks once they are reached (GPUs: their links).
type Link<E> = fn(&Mesh, &RankSpec, &Answer, &mut E) -> Result<(), RunError>;

/// Joins the other ranks once the plan is known: every rank's mesh checks the others run the
/// same job and plan; then `link` sets up what the engine needs of them.
fn connect<E: Engine + Send + 'static>(
    spec: &JobSpec,
    rank: RankSpec,
    link: Link<E>,
) -> Connect<E> {
    let fingerprint_of = spec.clone();
    Box::new(
        move |answer: &Answer, engine: &mut E| -> Result<Box<dyn Ranks<E>>, RunError> {
            let plan = &answer.plan;
            local_devices(&rank, answer)?;
            let fingerprint = run_fingerprint(&fingerprint_of, answer);
            let mesh = Mesh::connect(&rank, fingerprint).map_err(PipelineError::from)?;
            if let Err(e) = link(&mesh, &rank, answer, engine) {
                mesh.abort(&e.to_string()); // the others stop waiting for this one
                return Err(e);
            }
            let stages = plan.devices() as u32;
            Ok(Box::new(TcpRanks::new(mesh, rank, plan.replicas, stages)))
        },
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec(devices: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"model": {{"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                          "intermediate_size": 128, "vocab_size": 256, "init": {{"seed": 1}}}},
                "data": {{"train": "f"}}, "devices": "{devices}",
                "training": {{"seq_len": 16, "micro_batch_size": 1, "microbatches": 2,
                              "steps": 1}}}}"#
        ))
        .unwrap()
    }

    fn rank(rank: u32) -> RankSpec {
        RankSpec::parse(rank, "127.0.0.1:1,127.0.0.1:2", Duration::from_secs(1)).unwrap()
    }

    fn refusal(devices: &str) -> String {
        match Run::prepare_rank(spec(devices), "", rank(1), u64::MAX) {
            Ok(_) => panic!("{devices} over ranks was prepared"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn gpus_over_ranks_without_a_cap_are_refused_by_name() {
        let err = refusal("cuda:0,0");
        assert!(
            err.contains("devices") && err.contains("`cuda:0,0@40GiB`"),
            "{err}"
        );
    }

    /// Every rank plans each GPU at the cap, before any GPU is opened: a cap the model does
    /// not fit is the planner's refusal, on a machine with GPUs or without.
    #[test]
    fn gpus_over_ranks_plan_at_the_cap_before_opening_any() {
        let err = refusal("cuda:0,1@64KiB");
        assert!(
            err.contains("no plan fits in 65536 bytes per device") && err.contains("pp2 dp1"),
            "{err}"
        );
    }
}
