//! The planner and the trainer the service runs with: `plan::search` and `exec::run` behind
//! the `Planner` and `JobRunner` contracts.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::devices::DeviceInfo;
use super::planner::{PlanCandidate, PlanFailure, PlanOutcome, PlanSummary, Planner};
use super::runner::{
    EventLevel, JobRunner, RunControl, RunEnd, RunFailure, RunRequest, RunSink, StepMetrics,
    StopRequest,
};
use crate::exec::device::{DeviceSet, Pool};
use crate::exec::run::{Observer, Outcome, Run, RunError, Stop, drive, plan_job, resolve_arch};
use crate::plan::PlanError;
use crate::plan::presets::ProfileName;
use crate::plan::render;
use crate::plan::search::Answer;
use crate::spec::{InvalidSpec, JobSpec};

/// CPU device pools for the service's devices; CUDA devices need the CUDA backend.
fn device_set(devices: &[DeviceInfo]) -> Result<DeviceSet, String> {
    if let Some(d) = devices.iter().find(|d| d.kind != "cpu") {
        return Err(format!(
            "device {} is {}: this build trains on CPU devices only",
            d.id, d.kind
        ));
    }
    if devices.is_empty() {
        return Err("no devices are configured".into());
    }
    Ok(DeviceSet {
        devices: devices
            .iter()
            .map(|d| Pool::new(d.id.clone(), d.memory_bytes as usize))
            .collect(),
        host: Pool::new("host", usize::MAX),
    })
}

/// Plans with `plan::search` for CPU devices.
pub struct ExecPlanner;

impl Planner for ExecPlanner {
    fn plan(&self, spec: &JobSpec, devices: &[DeviceInfo]) -> Result<PlanOutcome, PlanFailure> {
        spec.validate()?;
        let set = device_set(devices).map_err(PlanFailure::Unavailable)?;
        let answer = resolve_arch(spec)
            .and_then(|arch| plan_job(spec, &arch, &set, ProfileName::CpuF32))
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
        RunError::Plan(PlanError::Invalid { field, message }) => PlanFailure::Invalid(InvalidSpec(
            vec![crate::spec::SpecError::new(field, message)],
        )),
        other => PlanFailure::Internal(other.to_string()),
    }
}

fn outcome(answer: &Answer) -> PlanOutcome {
    let sim = &answer.sim;
    let summary = PlanSummary {
        schedule: answer.best.schedule.clone(),
        stages: answer.best.pipeline,
        devices: answer.plan.devices() as u32,
        actions_per_device: answer
            .plan
            .programs
            .iter()
            .map(|p| p.len() as u64)
            .collect(),
        peak_bytes: sim.devices.iter().map(|d| d.peak_bytes).collect(),
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

/// Trains with `exec::run` on CPU devices.
pub struct ExecRunner;

impl JobRunner for ExecRunner {
    fn run(
        &self,
        request: RunRequest,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure> {
        let set = device_set(&request.devices)
            .map_err(|m| RunFailure::service("devices_unavailable", m))?;
        let mut run = Run::prepare_on(request.spec.clone(), set).map_err(failure)?;
        if let Some(resume) = &request.resume_from {
            run.resume_from(&resume.dir).map_err(failure)?;
        }
        let mut observer = SinkObserver {
            request: &request,
            sink,
            control,
        };
        let outcome = drive(&mut run, &mut observer).map_err(failure)?;
        Ok(match (outcome, control.requested()) {
            (Outcome::Completed { .. }, _) => RunEnd::Completed,
            (Outcome::Stopped { .. }, Some(StopRequest::Cancel | StopRequest::Abandon)) => {
                RunEnd::Cancelled
            }
            (Outcome::Stopped { step }, _) => RunEnd::Stopped { step },
        })
    }
}

fn failure(e: RunError) -> RunFailure {
    let blame = e.blame();
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
        };
        self.sink
            .step(&metrics)
            .map_err(|e| RunError::Observer(e.to_string()))
    }

    fn checkpoint_dir(&self, step: u64, _last: bool) -> PathBuf {
        self.request.checkpoint_dir(step)
    }

    fn checkpoint_saved(&mut self, step: u64, dir: &Path) -> Result<(), RunError> {
        self.sink
            .checkpoint(step, dir)
            .map_err(|e| RunError::Observer(e.to_string()))
    }

    fn stop_requested(&mut self) -> Option<Stop> {
        match self.control.requested()? {
            StopRequest::Pause | StopRequest::Shutdown => Some(Stop::Checkpoint),
            StopRequest::Cancel | StopRequest::Abandon => Some(Stop::Now),
        }
    }
}
