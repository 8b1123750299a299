//! Rows as stored. JSON columns are TEXT in both databases and times are milliseconds since
//! the epoch, so one `FromRow` serves PostgreSQL and SQLite.

use super::{JobState, StoreError, StoreResult};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TenantRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub key_hash: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct FileRow {
    pub id: String,
    pub tenant_id: String,
    /// `train`, `validation`, `model` or `tokenizer`.
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub sha256: String,
    /// The file, or for `model` the directory holding `model.safetensors` (+ `config.json`).
    pub path: String,
    pub created_at: i64,
}

pub const JOB_COLUMNS: &str = "id, tenant_id, state, spec, plan_summary, devices_needed, \
    total_steps, step, tokens, latest_metrics, restart_count, worker_id, lease_expires_at, \
    devices, error, idempotency_key, request_hash, created_at, started_at, finished_at, \
    stopped_early";

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub tenant_id: String,
    pub state: String,
    /// The job body as posted (file ids, not paths).
    pub spec: String,
    pub plan_summary: Option<String>,
    pub devices_needed: i64,
    pub total_steps: i64,
    pub step: i64,
    pub tokens: i64,
    pub latest_metrics: Option<String>,
    pub restart_count: i64,
    pub worker_id: Option<String>,
    pub lease_expires_at: Option<i64>,
    /// JSON array of the device ids it runs on.
    pub devices: Option<String>,
    /// JSON `{code, message, param, fault}` of a failed job.
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Early stopping ended its training (`training.early_stopping`).
    pub stopped_early: bool,
}

impl JobRow {
    pub fn job_state(&self) -> Result<JobState, StoreError> {
        JobState::parse(&self.state)
            .map_err(|e| StoreError::Corrupt(format!("job {}: {e}", self.id)))
    }
}

/// What `insert_job` needs.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub tenant_id: String,
    pub spec: String,
    pub total_steps: i64,
    pub file_ids: Vec<String>,
    /// Checkpoints of other jobs it starts from (`model.init.from`).
    pub checkpoint_uses: Vec<CheckpointUse>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    /// Planning's outcome, recorded in the same transaction; `None` leaves it `validating`.
    pub planned: Option<Planned>,
    /// How many times it may go back to the queue after its run was lost (a worker or rank
    /// died, the database was away) before it fails; `None`: `DEFAULT_MAX_RESTARTS`.
    pub max_restarts: Option<i64>,
}

/// A job's checkpoint that another job starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointUse {
    pub job_id: String,
    pub step: i64,
}

/// How planning went for a new job.
#[derive(Debug, Clone)]
pub enum Planned {
    /// Queue it with this plan, needing this many devices.
    Queued { plan: PlanRow, devices_needed: i64 },
    /// Fail it with this `error` JSON.
    Failed { error: String },
}

/// What a new job is written as, in the one transaction that inserts it: its state after
/// validation, its plan, the devices it needs, its error and its first events.
pub struct FirstStates<'a> {
    pub state: JobState,
    pub plan: Option<&'a PlanRow>,
    pub devices_needed: i64,
    pub error: Option<&'a str>,
    pub events: Vec<(&'static str, String)>,
}

impl NewJob {
    /// The job goes from `validating` to its planned state (each step checked), with an
    /// event for each.
    pub fn first_states(&self) -> StoreResult<FirstStates<'_>> {
        let mut events = vec![("state", r#"{"to":"validating"}"#.to_owned())];
        let (state, plan, devices_needed, error) = match &self.planned {
            None => (JobState::Validating, None, 0, None),
            Some(Planned::Queued {
                plan,
                devices_needed,
            }) => {
                JobState::Validating.check(JobState::Queued)?;
                let summary = plan.plan_summary.clone().unwrap_or_else(|| "{}".into());
                events.push(("plan", summary));
                (JobState::Queued, Some(plan), *devices_needed, None)
            }
            Some(Planned::Failed { error }) => {
                JobState::Validating.check(JobState::Failed)?;
                (JobState::Failed, None, 0, Some(error.as_str()))
            }
        };
        if state != JobState::Validating {
            let mut event = serde_json::json!({"from": JobState::Validating, "to": state});
            if let Some(error) = error {
                event["error"] = serde_json::from_str(error).unwrap_or_default();
            }
            events.push(("state", event.to_string()));
        }
        Ok(FirstStates {
            state,
            plan,
            devices_needed,
            error,
            events,
        })
    }
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PlanRow {
    /// The plan as JSON.
    pub plan: Option<String>,
    pub plan_svg: Option<String>,
    /// JSON summary shown on the job.
    pub plan_summary: Option<String>,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EventRow {
    pub job_id: String,
    /// 1, 2, ... per job: the SSE event id.
    pub seq: i64,
    pub kind: String,
    pub created_at: i64,
    /// JSON.
    pub data: String,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct MetricRow {
    pub job_id: String,
    pub step: i64,
    pub created_at: i64,
    /// JSON of `jobs::StepMetrics`.
    pub data: String,
}

/// One step as the worker records it.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub step: i64,
    /// Tokens trained so far (all steps).
    pub tokens: i64,
    /// JSON of `jobs::StepMetrics`.
    pub data: String,
    /// The lease runs this long from when the database takes the step, by its clock.
    pub lease_ms: i64,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CheckpointRow {
    pub job_id: String,
    pub step: i64,
    /// The checkpoint directory.
    pub path: String,
    /// JSON array of `{name, bytes}`.
    pub files: String,
    pub created_at: i64,
    /// The validation loss evaluated at its step, when one was.
    pub val_loss: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobTotals {
    pub by_state: Vec<(String, i64)>,
    pub steps: i64,
    pub tokens: i64,
}
