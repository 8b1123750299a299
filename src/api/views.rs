//! What the API returns: stored rows turned into documented JSON objects.

use serde::Serialize;
use utoipa::ToSchema;

use crate::jobs::{PlacementEntry, PlanSummary, RunFailure, StepMetrics};
use crate::spec::JobSpec;
use crate::store::{
    CheckpointRow, EventRow, FileRow, JobRow, JobState, LinkRow, MetricRow, StoreError,
};

fn seconds(ms: i64) -> i64 {
    ms / 1000
}

fn json_or<T: serde::de::DeserializeOwned>(
    text: Option<&str>,
    what: &str,
) -> Result<Option<T>, StoreError> {
    text.map(|t| serde_json::from_str(t).map_err(|e| StoreError::Corrupt(format!("{what}: {e}"))))
        .transpose()
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileView {
    pub id: String,
    /// Always `file`.
    pub object: &'static str,
    /// `train`, `validation`, `model` or `tokenizer`.
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    /// Hex sha256 of the content (for a model, of `model.safetensors`).
    pub sha256: String,
    /// Unix seconds.
    pub created_at: i64,
}

impl From<FileRow> for FileView {
    fn from(f: FileRow) -> Self {
        FileView {
            id: f.id,
            object: "file",
            purpose: f.purpose,
            filename: f.filename,
            bytes: f.bytes,
            sha256: f.sha256,
            created_at: seconds(f.created_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedView {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Progress {
    /// Steps completed.
    pub step: i64,
    pub total_steps: i64,
    /// Tokens trained so far.
    pub tokens: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    /// Always `job`.
    pub object: &'static str,
    pub status: JobState,
    /// The job body as posted (file ids).
    pub spec: JobSpec,
    /// The chosen plan's summary, once planned.
    pub plan: Option<PlanSummary>,
    pub progress: Progress,
    pub latest_metrics: Option<StepMetrics>,
    /// 1 = claimed next; only while queued. Exact up to 1000; 1001 means further back.
    pub queue_position: Option<i64>,
    /// Times the job was resumed on another worker run after losing its worker.
    pub restart_count: i64,
    /// Devices it runs on, while on a worker.
    pub devices: Vec<String>,
    /// Which device runs each replica's pipeline stages, while on a worker (every device
    /// kind): `devices` in order, replica by replica.
    pub placement: Vec<PlacementEntry>,
    /// Unix seconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Why it failed, and whether the input (`user`) or the service was at fault.
    pub error: Option<RunFailure>,
    /// `training.early_stopping` ended its training before the last step (it succeeded; its
    /// best checkpoint is marked `best` among its checkpoints).
    pub stopped_early: bool,
}

impl JobView {
    pub fn new(job: JobRow, queue_position: Option<i64>) -> Result<JobView, StoreError> {
        let status = job.job_state()?;
        let plan: Option<PlanSummary> = json_or(job.plan_summary.as_deref(), "plan summary")?;
        let devices: Vec<String> = json_or(job.devices.as_deref(), "devices")?.unwrap_or_default();
        Ok(JobView {
            spec: serde_json::from_str(&job.spec)
                .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?,
            placement: plan.as_ref().map_or(Vec::new(), |p| p.placement(&devices)),
            plan,
            progress: Progress {
                step: job.step,
                total_steps: job.total_steps,
                tokens: job.tokens,
            },
            latest_metrics: json_or(job.latest_metrics.as_deref(), "metrics")?,
            queue_position,
            restart_count: job.restart_count,
            devices,
            created_at: seconds(job.created_at),
            started_at: job.started_at.map(seconds),
            finished_at: job.finished_at.map(seconds),
            error: json_or(job.error.as_deref(), "error")?,
            stopped_early: job.stopped_early,
            id: job.id,
            object: "job",
            status,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    /// The event's sequence number within its job (the SSE `id`).
    pub id: i64,
    pub object: &'static str,
    /// `state`, `plan`, `metrics`, `checkpoint`, `info`, `warning`; with validation data
    /// `evaluation` (`step`, `val_loss`, ...), and `checkpoint_deleted` (retention) and
    /// `stopped_early` (`step`, `best_step`).
    pub kind: String,
    pub created_at: i64,
    pub data: serde_json::Value,
}

impl From<EventRow> for EventView {
    fn from(e: EventRow) -> Self {
        EventView {
            id: e.seq,
            object: "event",
            kind: e.kind,
            created_at: seconds(e.created_at),
            data: serde_json::from_str(&e.data).unwrap_or(serde_json::Value::Null),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MetricView {
    pub object: &'static str,
    pub created_at: i64,
    #[serde(flatten)]
    pub metrics: StepMetrics,
}

impl TryFrom<MetricRow> for MetricView {
    type Error = StoreError;
    fn try_from(m: MetricRow) -> Result<Self, StoreError> {
        Ok(MetricView {
            object: "metric",
            created_at: seconds(m.created_at),
            metrics: serde_json::from_str(&m.data)
                .map_err(|e| StoreError::Corrupt(format!("metrics: {e}")))?,
        })
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct CheckpointFile {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckpointView {
    pub object: &'static str,
    pub step: i64,
    pub created_at: i64,
    /// Download each with `GET /v1/jobs/{id}/checkpoints/{step}/files/{name}`.
    pub files: Vec<CheckpointFile>,
    /// The validation loss evaluated at its step (`data.validation`), when one was.
    pub val_loss: Option<f64>,
    /// The job's checkpoint with the lowest validation loss (the earliest of equals).
    pub best: bool,
}

impl TryFrom<CheckpointRow> for CheckpointView {
    type Error = StoreError;
    fn try_from(c: CheckpointRow) -> Result<Self, StoreError> {
        Ok(CheckpointView {
            object: "checkpoint",
            step: c.step,
            created_at: seconds(c.created_at),
            files: serde_json::from_str(&c.files)
                .map_err(|e| StoreError::Corrupt(format!("checkpoint files: {e}")))?,
            val_loss: c.val_loss,
            best: false,
        })
    }
}

macro_rules! list_type {
    ($name:ident, $item:ty) => {
        /// A page of results; pass the last id as `after` for the next page.
        #[derive(Debug, Serialize, ToSchema)]
        pub struct $name {
            /// Always `list`.
            pub object: &'static str,
            pub data: Vec<$item>,
            pub has_more: bool,
        }

        impl $name {
            pub fn new(data: Vec<$item>, has_more: bool) -> Self {
                $name {
                    object: "list",
                    data,
                    has_more,
                }
            }
        }
    };
}

list_type!(FileList, FileView);
list_type!(JobList, JobView);
list_type!(EventList, EventView);
list_type!(MetricList, MetricView);
list_type!(CheckpointList, CheckpointView);

/// The service's devices, and the host memory their jobs' offloaded tensors share.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<DeviceView>,
    pub has_more: bool,
    /// The host pool a job's offloaded tensors (and its starting weights) live in, in bytes
    /// (`--host-memory`); plans keep within it.
    pub host_memory_bytes: u64,
    /// The links between the cluster's machines as ranks on them last measured them (pairs
    /// not measured yet are absent), by machine names.
    pub links: Vec<LinkView>,
}

/// The link between two machines as the ranks of a job spanning them measured it, before
/// its first step; jobs placed across machines are costed by it (unless the workers'
/// `--network-bandwidth` / `--network-latency-ms` say otherwise).
#[derive(Debug, Serialize, ToSchema)]
pub struct LinkView {
    /// The two machines (the workers' `--machine`, by default their host names).
    pub machines: Vec<String>,
    pub bytes_per_s: f64,
    /// One message, one way, in seconds.
    pub latency_s: f64,
    /// When it was measured (Unix seconds).
    pub measured_at: i64,
}

impl From<LinkRow> for LinkView {
    fn from(link: LinkRow) -> Self {
        LinkView {
            machines: vec![link.machine_a, link.machine_b],
            bytes_per_s: link.bytes_per_s,
            latency_s: link.latency_s,
            measured_at: seconds(link.measured_at),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceView {
    pub id: String,
    pub kind: String,
    pub memory_bytes: u64,
    pub in_use: bool,
    /// The job using it, when it is one of yours.
    pub job: Option<String>,
    /// The worker it belongs to (`null` for a service without an embedded worker).
    pub worker: Option<String>,
    /// The machine that worker runs on, once registered.
    pub host: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueEntry {
    /// 1 = claimed next.
    pub position: i64,
    /// The job's id when it is yours (others' jobs are counted, not named).
    pub job: Option<String>,
    pub devices_needed: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    /// Always `queue`.
    pub object: &'static str,
    /// Queued jobs of all tenants.
    pub length: i64,
    pub data: Vec<QueueEntry>,
}
