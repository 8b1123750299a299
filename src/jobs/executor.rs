//! The planner and the trainer the service runs with: `plan::search` and `exec::run` behind
//! the `Planner` and `JobRunner` contracts.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::devices::{DeviceInfo, gpu_ordinal};
use super::planner::{PlanCandidate, PlanFailure, PlanOutcome, PlanSummary, Planner};
use super::runner::{
    EventLevel, JobRunner, RunControl, RunEnd, RunFailure, RunRequest, RunSink, StepMetrics,
    StopRequest,
};
use crate::exec::device::{DeviceSet, Pool};
use crate::exec::run::{
    DeviceKind, Evaluation, Observer, Outcome, Run, RunError, Stop, drive, plan_job, resolve_arch,
};
use crate::exec::transport::RankSpec;
use crate::plan::PlanError;
use crate::plan::render;
use crate::plan::search::Answer;
use crate::spec::{InvalidSpec, JobSpec};

/// Where a job runs on the service's devices: a pipeline over CPU pools, or over GPU devices
/// (whole GPUs, `cuda:N`, or stages sharing one, `cuda:N/stageS`), replica by replica, as
/// many of them as the job's `parallelism` asks or the planner picks. A job on one GPU is a
/// one-stage pipeline like any other.
enum Placement {
    Cpu(DeviceSet),
    Gpu {
        /// One pool per device, of the memory the service gives it.
        set: DeviceSet,
        /// Each device's GPU.
        ordinals: Vec<usize>,
    },
}

/// The devices as pools of the memory the service gives each, and the host pool.
fn pools(devices: &[DeviceInfo], host_bytes: u64) -> DeviceSet {
    DeviceSet {
        devices: devices
            .iter()
            .map(|d| Pool::new(d.id.clone(), d.memory_bytes as usize))
            .collect(),
        host: Pool::new("host", usize::try_from(host_bytes).unwrap_or(usize::MAX)),
    }
}

fn placement(devices: &[DeviceInfo], host_bytes: u64) -> Result<Placement, String> {
    let Some(first) = devices.first() else {
        return Err("no devices are configured".into());
    };
    let kinds = |d: &DeviceInfo| (d.kind.clone(), gpu_ordinal(d).is_some());
    if let Some(d) = devices.iter().find(|d| kinds(d) != kinds(first)) {
        return Err(format!(
            "device {} is {} but {} is {}: a job runs on CPU devices or on GPUs, not both",
            d.id, d.kind, first.id, first.kind
        ));
    }
    let set = pools(devices, host_bytes);
    if first.kind == "cpu" {
        return Ok(Placement::Cpu(set));
    }
    let ordinals: Option<Vec<usize>> = devices.iter().map(gpu_ordinal).collect();
    match ordinals {
        Some(ordinals) => Ok(Placement::Gpu { set, ordinals }),
        None => Err(format!(
            "device {} is {}: a job runs on CPU devices or on GPUs",
            first.id, first.kind
        )),
    }
}

/// Plans with `plan::search`: `cpu-f32` for CPU devices, `cuda-f32` (or `cuda-bf16` for
/// bf16 jobs) for GPUs' measured memory.
pub struct ExecPlanner;

impl Planner for ExecPlanner {
    fn plan(
        &self,
        spec: &JobSpec,
        devices: &[DeviceInfo],
        host_memory_bytes: u64,
    ) -> Result<PlanOutcome, PlanFailure> {
        spec.validate()?;
        let placement = placement(devices, host_memory_bytes).map_err(PlanFailure::Unavailable)?;
        let answer = resolve_arch(spec)
            .and_then(|arch| match &placement {
                Placement::Cpu(set) => plan_job(spec, &arch, set, DeviceKind::Cpu),
                Placement::Gpu { set, .. } => plan_job(spec, &arch, set, DeviceKind::Cuda),
            })
            .map_err(plan_failure)?;
        Ok(outcome(&answer))
    }
}

fn plan_failure(e: RunError) -> PlanFailure {
    match e {
        RunError::Spec(errors) => PlanFailure::Invalid(InvalidSpec(errors)),
        RunError::Plan(PlanError::DoesNotFit {
            have_bytes,
            need_bytes,
            closest,
        }) => PlanFailure::DoesNotFit {
            message: format!(
                "no plan fits in {have_bytes} bytes per device; the closest, {closest}, needs {need_bytes}"
            ),
            smallest_memory_bytes: need_bytes,
            closest: json!({ "configuration": closest, "memory_bytes": need_bytes }),
        },
        e @ RunError::HostMemory { param, .. } => {
            PlanFailure::Invalid(InvalidSpec(vec![crate::spec::SpecError::new(
                param,
                e.to_string(),
            )]))
        }
        RunError::Plan(PlanError::Invalid { field, message }) => PlanFailure::Invalid(InvalidSpec(
            vec![crate::spec::SpecError::new(field, message)],
        )),
        other => PlanFailure::Internal(other.to_string()),
    }
}

fn outcome(answer: &Answer) -> PlanOutcome {
    let sim = &answer.sim;
    // Per run-wide device: every replica's devices run the first replica's programs.
    let replicas = answer.plan.replicas as usize;
    let summary = PlanSummary {
        schedule: answer.best.schedule.clone(),
        stages: answer.best.pipeline,
        replicas: answer.plan.replicas,
        devices: answer.plan.total_devices() as u32,
        actions_per_device: (answer.plan.programs.iter())
            .map(|p| p.len() as u64)
            .collect::<Vec<_>>()
            .repeat(replicas),
        peak_bytes: (sim.devices.iter())
            .map(|d| d.peak_bytes)
            .collect::<Vec<_>>()
            .repeat(replicas),
        eval_peak_bytes: (sim.devices.iter())
            .map(|d| d.eval_peak_bytes)
            .collect::<Vec<_>>()
            .repeat(replicas),
        step_time_s: sim.step_time_s,
        bubble_ratio: sim.bubble_ratio,
        runners_up: answer
            .runners_up
            .iter()
            .map(|r| PlanCandidate {
                label: format!(
                    "{} ({})",
                    crate::plan::search::describe(&r.candidate),
                    r.why
                ),
                max_peak_bytes: r.candidate.peak_bytes,
                step_time_s: r.candidate.step_time_s,
                bubble_ratio: r.candidate.bubble_ratio,
            })
            .collect(),
    };
    let title = crate::plan::search::describe(&answer.best);
    PlanOutcome {
        plan: json!({ "best": answer.best, "plan": answer.plan }),
        svg: render::svg(&answer.plan, sim, answer.budget_bytes, &title),
        summary,
    }
}

/// Trains with `exec::run`: a pipeline (replicas x stages) on CPU devices or on GPUs.
pub struct ExecRunner;

impl JobRunner for ExecRunner {
    fn run(
        &self,
        request: RunRequest,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure> {
        let placement = placement(&request.devices, request.host_memory_bytes)
            .map_err(|m| RunFailure::service("devices_unavailable", m))?;
        let spec = request.spec.clone();
        let mut run = match placement {
            Placement::Cpu(set) => Run::prepare_on(spec, set),
            // Within the memory the job was planned for (measured, or capped, at start).
            Placement::Gpu { set, ordinals } => {
                let each = set.devices.iter().map(|p| p.budget()).min();
                Run::prepare_on_gpu_stages(spec, &ordinals, each)
            }
        }
        .map_err(failure)?;
        run_to_end(&mut run, &request, sink, control, false)
    }

    fn runs_ranks(&self) -> bool {
        true
    }

    /// Rank `rank.rank` of a job spanning workers: CPU devices only, over TCP (the job's
    /// `devices` name the whole plan's devices, as `chronospipe train` of it would).
    fn run_rank(
        &self,
        request: RunRequest,
        rank: RankSpec,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure> {
        if request.spec.devices.is_none() {
            return Err(RunFailure::user(
                "devices_unnamed",
                "a job spanning workers names the plan's devices (`devices`, e.g. \
                 `cpu:6x64MiB`): every rank plans the same job on them",
                Some("devices"),
            ));
        }
        let mut run = Run::prepare_rank(request.spec.clone(), "", rank).map_err(failure)?;
        let end = run_to_end(&mut run, &request, sink, control, true);
        match &end {
            Ok(RunEnd::Completed) => run.close_ranks().map_err(failure)?,
            Ok(_) => run.abort_ranks("the rank was stopped"),
            Err(f) => run.abort_ranks(&f.message),
        }
        end
    }
}

/// Resumes `run` when asked, then drives it to its end, reporting to `sink`. A rank of a job
/// spanning workers stops at once on any request (the ranks cannot meet at one checkpoint:
/// the attempt is released and resumes from the last complete checkpoint).
fn run_to_end(
    run: &mut Run,
    request: &RunRequest,
    sink: &mut dyn RunSink,
    control: &RunControl,
    rank: bool,
) -> Result<RunEnd, RunFailure> {
    if let Some(resume) = &request.resume_from {
        run.resume_from(&resume.dir).map_err(failure)?;
    }
    let mut observer = SinkObserver {
        request,
        sink,
        control,
        rank,
    };
    let outcome = drive(run, &mut observer).map_err(failure)?;
    if let Outcome::StoppedEarly {
        step, best_step, ..
    } = &outcome
    {
        (observer.sink)
            .stopped_early(*step, *best_step)
            .map_err(|e| failure(RunError::Observer(e.to_string())))?;
    }
    Ok(match (outcome, control.requested()) {
        (Outcome::Completed { .. } | Outcome::StoppedEarly { .. }, _) => RunEnd::Completed,
        (Outcome::Stopped { .. }, Some(StopRequest::Cancel | StopRequest::Abandon)) => {
            RunEnd::Cancelled
        }
        (Outcome::Stopped { step }, _) => RunEnd::Stopped { step },
    })
}

fn failure(e: RunError) -> RunFailure {
    let blame = e.blame();
    if let Some(kind) = e.storage_full() {
        tracing::error!(error = %e, "a checkpoint could not be written");
        return RunFailure::service(
            blame.code,
            format!(
                "a checkpoint could not be written: the service's storage refused it ({kind}); \
                 the checkpoints before it are kept"
            ),
        );
    }
    let message = e.to_string();
    if blame.user {
        RunFailure::user(blame.code, message, blame.param.as_deref())
    } else {
        RunFailure::service(blame.code, message)
    }
}

/// Reports a run to the worker's sink and takes its stop requests.
struct SinkObserver<'a> {
    request: &'a RunRequest,
    sink: &'a mut dyn RunSink,
    control: &'a RunControl,
    /// A rank of a job spanning workers: every stop is immediate.
    rank: bool,
}

impl Observer for SinkObserver<'_> {
    fn plan_chosen(&mut self, run: &Run) -> Result<(), RunError> {
        let message = format!(
            "training on {}: {}",
            crate::plan::search::describe(&run.answer.best),
            run.answer.best.choices
        );
        self.sink
            .event(EventLevel::Info, &message)
            .map_err(|e| RunError::Observer(e.to_string()))
    }

    fn step(&mut self, m: &crate::exec::run::StepMetrics) -> Result<(), RunError> {
        let metrics = StepMetrics {
            step: m.step,
            loss: m.loss,
            learning_rate: m.learning_rate,
            grad_norm: Some(m.grad_norm),
            tokens: m.tokens,
            tokens_per_second: m.tokens_per_s,
            step_time_ms: m.step_time_s * 1e3,
            device_peak_bytes: m.device_peak_bytes.clone(),
            val_loss: m.val_loss,
        };
        self.sink
            .step(&metrics)
            .map_err(|e| RunError::Observer(e.to_string()))
    }

    fn checkpoint_dir(&self, step: u64, _last: bool) -> PathBuf {
        self.request.checkpoint_dir(step)
    }

    fn before_checkpoint(&mut self, step: u64) -> Result<(), RunError> {
        self.sink
            .before_checkpoint(step)
            .map_err(|e| RunError::Observer(e.to_string()))
    }

    fn evaluated(&mut self, evaluation: &Evaluation) -> Result<(), RunError> {
        self.sink
            .evaluation(evaluation)
            .map_err(|e| RunError::Observer(e.to_string()))
    }

    fn checkpoint_saved(&mut self, step: u64, dir: &Path) -> Result<(), RunError> {
        let observed = |e: super::runner::SinkError| RunError::Observer(e.to_string());
        self.sink.checkpoint(step, dir).map_err(observed)?;
        match self.request.spec.training.keep_checkpoints {
            Some(keep) => self.sink.retain_checkpoints(keep).map_err(observed),
            None => Ok(()),
        }
    }

    fn stop_requested(&mut self) -> Option<Stop> {
        match self.control.requested()? {
            _ if self.rank => Some(Stop::Now),
            StopRequest::Pause | StopRequest::Shutdown => Some(Stop::Checkpoint),
            StopRequest::Cancel | StopRequest::Abandon => Some(Stop::Now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 4 << 30;

    fn spec(parallelism: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"model": {{"hidden_size": 64, "num_layers": 4, "num_heads": 4,
                          "intermediate_size": 176, "vocab_size": 256}},
                "data": {{"train": "f"}},
                "training": {{"seq_len": 32, "micro_batch_size": 1, "microbatches": 4,
                              "steps": 3}},
                "parallelism": {parallelism}}}"#
        ))
        .unwrap()
    }

    fn gpu(id: &str, memory_bytes: u64) -> DeviceInfo {
        DeviceInfo {
            id: id.into(),
            kind: "cuda".into(),
            memory_bytes,
        }
    }

    fn gpus(count: usize, memory_bytes: u64) -> Vec<DeviceInfo> {
        (0..count)
            .map(|g| gpu(&format!("cuda:{g}"), memory_bytes))
            .collect()
    }

    /// One GPU runs a one-stage pipeline, planned with the CUDA layout against its measured
    /// memory; a job asking for more stages than the GPUs is refused by field.
    #[test]
    fn a_gpu_is_planned_as_one_stage_against_its_measured_memory() {
        let planner = ExecPlanner;
        let devices = [gpu("cuda:1", 8 << 30)];
        let out = planner.plan(&spec("{}"), &devices, HOST).unwrap();
        assert_eq!(
            (
                out.summary.stages,
                out.summary.replicas,
                out.summary.devices
            ),
            (1, 1, 1)
        );
        // The cuda-f32 layout is not the CPU's: the same job on a CPU device of the same size
        // is planned with its own (different) peak.
        let cpu = DeviceInfo {
            kind: "cpu".into(),
            ..gpu("cpu:0", 8 << 30)
        };
        let on_cpu = planner
            .plan(&spec(r#"{"stages": 1}"#), &[cpu], HOST)
            .unwrap();
        assert_ne!(out.summary.peak_bytes, on_cpu.summary.peak_bytes);

        match planner.plan(&spec(r#"{"stages": 2}"#), &devices, HOST) {
            Err(PlanFailure::Invalid(e)) => assert_eq!(e.first().param, "parallelism.stages"),
            other => panic!("stages 2 on a GPU: {other:?}"),
        }
        match planner.plan(&spec("{}"), &[gpu("cuda:0", 1 << 16)], HOST) {
            Err(PlanFailure::DoesNotFit {
                smallest_memory_bytes,
                ..
            }) => assert!(smallest_memory_bytes > 1 << 16),
            other => panic!("64 KiB GPU: {other:?}"),
        }
    }

    /// Whole GPUs (`serve --devices cuda:0,1,2,3`): a job takes as many as its stages x
    /// replicas, replica by replica, each device on its own GPU; the rest stay free for
    /// other jobs (the worker claims the first free ones: a 2 x 2 job given GPUs 2 to 5 runs
    /// replica 0 on GPUs 2 and 3, replica 1 on 4 and 5).
    #[test]
    fn a_job_takes_stages_x_replicas_gpus() {
        let planner = ExecPlanner;
        let eight = gpus(8, 8 << 30);
        let two_by_two = spec(r#"{"stages": 2, "data_parallel": 2, "schedule": "1f1b"}"#);
        let out = planner.plan(&two_by_two, &eight, HOST).unwrap();
        let s = &out.summary;
        assert_eq!((s.stages, s.replicas, s.devices), (2, 2, 4));
        assert_eq!(s.peak_bytes.len(), 4);
        assert_eq!(out.plan["plan"]["replicas"], 2);
        let Ok(Placement::Gpu { set, ordinals }) = placement(&eight[2..6], HOST) else {
            panic!("four GPUs");
        };
        assert_eq!(ordinals, [2, 3, 4, 5]);
        assert_eq!(set.devices[1].name(), "cuda:3");
        let devices: Vec<String> = eight[2..6].iter().map(|d| d.id.clone()).collect();
        let placed = s.placement(&devices);
        let got: Vec<(u32, u32, &str)> = (placed.iter())
            .map(|p| (p.replica, p.stage, p.device.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0, "cuda:2"),
                (0, 1, "cuda:3"),
                (1, 0, "cuda:4"),
                (1, 1, "cuda:5")
            ]
        );
        // Two smaller jobs each take what they ask, so both fit the 8 side by side.
        let stages_only = planner
            .plan(&spec(r#"{"stages": 2}"#), &eight, HOST)
            .unwrap();
        let replicas_only = planner
            .plan(&spec(r#"{"stages": 1, "data_parallel": 4}"#), &eight, HOST)
            .unwrap();
        assert_eq!(
            (stages_only.summary.devices, replicas_only.summary.devices),
            (2, 4)
        );
        assert_eq!(replicas_only.summary.replicas, 4);
    }

    /// `"auto"` replicas on GPUs: the planner picks stages x replicas within the GPUs, no
    /// slower than any layout it could have been given.
    #[test]
    fn auto_replicas_on_gpus_pick_the_fastest_layout() {
        let planner = ExecPlanner;
        let four = gpus(4, 8 << 30);
        let auto = planner
            .plan(
                &spec(r#"{"stages": "auto", "data_parallel": "auto", "schedule": "1f1b"}"#),
                &four,
                HOST,
            )
            .unwrap();
        let a = &auto.summary;
        assert_eq!(a.stages * a.replicas, a.devices);
        assert!(a.devices <= 4);
        assert_eq!(auto.plan["best"]["data_parallel"], a.replicas);
        for (stages, replicas) in [(1, 4), (2, 2), (4, 1)] {
            let fixed = planner
                .plan(
                    &spec(&format!(
                        r#"{{"stages": {stages}, "data_parallel": {replicas}, "schedule": "1f1b"}}"#
                    )),
                    &four,
                    HOST,
                )
                .unwrap();
            assert!(
                a.step_time_s <= fixed.summary.step_time_s * (1.0 + 1e-9),
                "auto {} x {}: {} s; {stages} x {replicas}: {} s",
                a.stages,
                a.replicas,
                a.step_time_s,
                fixed.summary.step_time_s
            );
        }
    }

    /// What the GPUs cannot hold, or the runtime cannot run on them, is refused by field.
    #[test]
    fn gpu_layouts_that_do_not_fit_are_refused_by_field() {
        let planner = ExecPlanner;
        let four = gpus(4, 8 << 30);
        let refused = |parallelism: &str, microbatches: usize| {
            let mut s = spec(parallelism);
            s.training.microbatches = microbatches;
            match planner.plan(&s, &four, HOST) {
                Err(PlanFailure::Invalid(e)) => {
                    (e.first().param.clone(), e.first().message.clone())
                }
                other => panic!("{parallelism}: {other:?}"),
            }
        };
        let (param, message) = refused(r#"{"stages": "auto", "data_parallel": 3}"#, 3);
        assert_eq!(param, "parallelism.data_parallel");
        assert!(message.contains("do not divide the 4 devices"), "{message}");
        let (param, message) = refused(r#"{"stages": 3, "data_parallel": 2}"#, 4);
        assert_eq!(param, "parallelism.stages");
        assert!(message.contains("need 6 devices but 4"), "{message}");
        let (param, message) = refused(r#"{"stages": 1, "data_parallel": 3}"#, 4);
        assert_eq!(param, "parallelism.data_parallel");
        assert!(message.contains("training.microbatches"), "{message}");
    }

    /// Stages sharing a GPU (`serve --devices cuda:0x4`) are a pipeline planned with the
    /// CUDA layout, each stage within the memory the service gives it.
    #[test]
    fn stages_sharing_a_gpu_are_planned_as_a_pipeline() {
        let planner = ExecPlanner;
        let stages: Vec<DeviceInfo> = (0..4)
            .map(|s| gpu(&format!("cuda:0/stage{s}"), 2 << 30))
            .collect();
        let one_f_one_b = spec(r#"{"schedule": "1f1b"}"#);
        let out = planner.plan(&one_f_one_b, &stages, HOST).unwrap();
        assert_eq!((out.summary.stages, out.summary.devices), (4, 4));
        assert_eq!(out.summary.schedule, "1f1b");
        let Ok(Placement::Gpu { set, ordinals }) = placement(&stages, HOST) else {
            panic!("stages of one GPU");
        };
        assert_eq!(ordinals, [0, 0, 0, 0]);
        assert_eq!(set.devices[3].name(), "cuda:0/stage3");
        // The same pipeline on four CPU devices is planned with its own (different) peaks.
        let cpus: Vec<DeviceInfo> = (0..4)
            .map(|i| DeviceInfo {
                kind: "cpu".into(),
                ..gpu(&format!("cpu:{i}"), 2 << 30)
            })
            .collect();
        let on_cpu = planner.plan(&one_f_one_b, &cpus, HOST).unwrap();
        assert_ne!(out.summary.peak_bytes, on_cpu.summary.peak_bytes);
    }

    /// `training.precision: bf16` plans GPU stages with the `cuda-bf16` layout and is refused
    /// on CPU devices, by field. The layout halves activations and adds a 2-byte copy of each
    /// projection weight, so its peaks are smaller where a stage's f32 activations outweigh its
    /// projection weights' f32 bytes (roughly): here 256-token sequences, 4 to a
    /// micro-batch (the helper's 32-token, 1-sequence micro-batches hold less than the copies).
    #[test]
    fn bf16_jobs_plan_smaller_on_gpus_and_are_refused_on_cpus() {
        let planner = ExecPlanner;
        let bf16 = |s: JobSpec| {
            let mut s = s;
            s.training.precision = crate::spec::PrecisionSpec::Bf16;
            s
        };
        let mut one_f_one_b = spec(r#"{"schedule": "1f1b"}"#);
        (
            one_f_one_b.training.seq_len,
            one_f_one_b.training.micro_batch_size,
        ) = (256, 4);
        let stages: Vec<DeviceInfo> = (0..2)
            .map(|s| gpu(&format!("cuda:0/stage{s}"), 2 << 30))
            .collect();
        let f32_plan = planner.plan(&one_f_one_b, &stages, HOST).unwrap();
        let bf16_plan = planner
            .plan(&bf16(one_f_one_b.clone()), &stages, HOST)
            .unwrap();
        let (b, f) = (&bf16_plan.summary.peak_bytes, &f32_plan.summary.peak_bytes);
        assert_eq!(b.len(), f.len());
        assert!(
            b.iter().zip(f).all(|(b, f)| b < f),
            "bf16 {b:?} vs f32 {f:?}"
        );
        let whole = planner.plan(&bf16(spec("{}")), &[gpu("cuda:0", 8 << 30)], HOST);
        assert!(whole.is_ok(), "{whole:?}");

        let cpu = DeviceInfo {
            kind: "cpu".into(),
            ..gpu("cpu:0", 1 << 30)
        };
        match planner.plan(&bf16(one_f_one_b), &[cpu], HOST) {
            Err(PlanFailure::Invalid(e)) => {
                assert_eq!(e.first().param, "training.precision");
                assert!(e.first().message.contains("CUDA"), "{}", e.first().message);
            }
            other => panic!("bf16 on a CPU device: {other:?}"),
        }
    }

    #[test]
    fn devices_of_two_kinds_are_refused() {
        let cpu = DeviceInfo {
            id: "cpu:0".into(),
            kind: "cpu".into(),
            memory_bytes: 1 << 30,
        };
        let err = placement(&[cpu, gpu("cuda:0", 1 << 30)], HOST)
            .err()
            .unwrap();
        assert!(err.contains("cuda:0"), "{err}");
    }
}
