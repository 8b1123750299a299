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

    /// Rank `rank.rank` of a job spanning workers, over TCP (the job's `devices` name the
    /// whole plan's devices, as `chronospipe train` of it would: `cpu:NxSIZE`, or each
    /// run-wide device's GPU on its own worker with one cap, `cuda:0,1,0,1@40GiB`; what
    /// `Run::prepare_rank` does not take it refuses by name).
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
        let host = request.host_memory_bytes;
        let mut run = Run::prepare_rank(request.spec.clone(), "", rank, host).map_err(failure)?;
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
mod tests;
