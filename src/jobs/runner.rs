//! The contract between the worker and whatever trains: the executor implements `JobRunner`;
//! the worker gives it a `RunSink` that writes to the store as things happen and a
//! `RunControl` it checks between steps.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::devices::DeviceInfo;
pub use crate::exec::run::Evaluation;
use crate::exec::transport::RankSpec;
use crate::spec::JobSpec;

/// Trains one job. Called on a blocking thread; it returns when the job finishes, fails, or
/// stops because `control` asked it to.
pub trait JobRunner: Send + Sync + 'static {
    fn run(
        &self,
        request: RunRequest,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure>;

    /// Whether it can run one rank of a job spanning workers (`run_rank`); the worker
    /// registers so, and only such workers are reserved for those jobs.
    fn runs_ranks(&self) -> bool {
        false
    }

    /// Runs rank `rank.rank` of a job spanning workers, reaching the other ranks at the
    /// addresses in `rank`. Only rank 0 records (its `sink`); the others get a sink that
    /// records nothing.
    fn run_rank(
        &self,
        request: RunRequest,
        rank: RankSpec,
        sink: &mut dyn RunSink,
        control: &RunControl,
    ) -> Result<RunEnd, RunFailure> {
        let _ = (request, sink, control);
        Err(RunFailure::service(
            "ranks_unsupported",
            format!(
                "this worker cannot run rank {} of a job spanning workers",
                rank.rank
            ),
        ))
    }
}

/// Everything a run needs, with file ids already resolved to local paths.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub job_id: String,
    /// The job body with `data.train`, `data.validation`, `data.tokenizer` and
    /// `model.init.from` replaced by local paths (a model is a directory holding
    /// `model.safetensors` and, when uploaded, `config.json`).
    pub spec: JobSpec,
    /// The plan chosen when the job was created (the planner's JSON rendering).
    pub plan: serde_json::Value,
    /// The devices this run may use, `plan`'s device count of them.
    pub devices: Vec<DeviceInfo>,
    /// The host pool offloaded tensors (and the starting weights) live in, in bytes.
    pub host_memory_bytes: u64,
    /// Checkpoints go to `checkpoint_dir(step)` under this directory.
    pub checkpoint_root: PathBuf,
    /// Continue after this checkpoint (its step was the last one completed).
    pub resume_from: Option<ResumePoint>,
}

impl RunRequest {
    /// Where the checkpoint after `step` must be written (Hugging Face layout, plus optimizer
    /// and trainer state, and `manifest.json` last), before `RunSink::checkpoint` is called
    /// for it.
    pub fn checkpoint_dir(&self, step: u64) -> PathBuf {
        self.checkpoint_root.join(format!("step-{step}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    pub step: u64,
    pub dir: PathBuf,
}

/// What one optimizer step measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StepMetrics {
    /// 1 for the first step; steps completed so far.
    pub step: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: Option<f64>,
    /// Tokens trained in this step.
    pub tokens: u64,
    pub tokens_per_second: f64,
    pub step_time_ms: f64,
    /// Measured peak memory of each device during the step, in the run's device order.
    pub device_peak_bytes: Vec<u64>,
    /// The validation loss evaluated after this step (`data.validation`), when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventLevel {
    Info,
    Warning,
}

/// Where a run reports. Each call returns once the store has it; an error means the run must
/// stop (its lease was lost or the store is unreachable) and return.
pub trait RunSink: Send {
    fn step(&mut self, metrics: &StepMetrics) -> Result<(), SinkError>;
    /// Asked before the checkpoint after `step` is written: an error means the run must not
    /// write it (the lease may have passed to another claim) and must stop.
    fn before_checkpoint(&mut self, step: u64) -> Result<(), SinkError>;
    /// The checkpoint after `step` is complete in `dir`.
    fn checkpoint(&mut self, step: u64, dir: &Path) -> Result<(), SinkError>;
    fn event(&mut self, level: EventLevel, message: &str) -> Result<(), SinkError>;
    /// The validation data was evaluated after `step` (an `evaluation` event).
    fn evaluation(&mut self, evaluation: &Evaluation) -> Result<(), SinkError>;
    /// Deletes all but the latest `keep` checkpoints and the best by validation loss, and
    /// none that a job still starts from (`training.keep_checkpoints`), once every checkpoint
    /// reported before is recorded.
    fn retain_checkpoints(&mut self, keep: u64) -> Result<(), SinkError>;
    /// Early stopping ended the run after `step`; the best validation loss was after
    /// `best_step`.
    fn stopped_early(&mut self, step: u64, best_step: Option<u64>) -> Result<(), SinkError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("the job is no longer leased to this worker")]
    LeaseLost,
    #[error("cannot record the run: {0}")]
    Store(String),
    #[error("the checkpoint of step {step} is not complete: {reason}")]
    Incomplete { step: u64, reason: String },
}

/// What the worker asks of a running job, checked by the runner between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// Save a checkpoint, then return `RunEnd::Stopped` (the devices are freed).
    Pause,
    /// Return `RunEnd::Cancelled` without a checkpoint.
    Cancel,
    /// The worker is shutting down: checkpoint, then return `RunEnd::Stopped`; it is requeued.
    Shutdown,
    /// The lease is gone and another worker may own the job: return at once, write nothing.
    Abandon,
}

/// A shared flag; the strongest request wins (abandon > cancel > shutdown > pause).
#[derive(Debug, Clone, Default)]
pub struct RunControl(Arc<AtomicU8>);

impl RunControl {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self, stop: StopRequest) {
        let code = match stop {
            StopRequest::Pause => 1,
            StopRequest::Shutdown => 2,
            StopRequest::Cancel => 3,
            StopRequest::Abandon => 4,
        };
        self.0.fetch_max(code, Ordering::SeqCst);
    }

    pub fn requested(&self) -> Option<StopRequest> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(StopRequest::Pause),
            2 => Some(StopRequest::Shutdown),
            3 => Some(StopRequest::Cancel),
            4 => Some(StopRequest::Abandon),
            _ => None,
        }
    }
}

/// How a run ended without failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// All `training.steps` done and the final checkpoint saved.
    Completed,
    /// Stopped on request after checkpointing `step`.
    Stopped {
        step: u64,
    },
    Cancelled,
}

/// Whose fault a failure is: users fix their input, operators fix the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    User,
    Service,
}

/// A failed job's `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RunFailure {
    pub fault: Fault,
    /// Stable machine-readable reason, e.g. `file_not_found`, `out_of_memory`.
    pub code: String,
    pub message: String,
    /// JSON path of the job body's field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

impl RunFailure {
    pub fn user(code: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        RunFailure {
            fault: Fault::User,
            code: code.to_owned(),
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }

    pub fn service(code: &str, message: impl Into<String>) -> Self {
        RunFailure {
            fault: Fault::Service,
            code: code.to_owned(),
            message: message.into(),
            param: None,
        }
    }
}
