//! Job state lives here: tenants and API keys, files, jobs, events, metrics, checkpoints.
//!
//! `Store` has one method per query. `PgStore` and `SqliteStore` implement it with runtime
//! queries (`query_as` + `FromRow`, no database at build time); the SQL they share is written
//! once in `queries.rs`, and the dialects differ only in how a writer locks (PostgreSQL
//! `FOR UPDATE [SKIP LOCKED]`, SQLite one `BEGIN IMMEDIATE` writer). Migrations for each live
//! in `migrations/postgres` and `migrations/sqlite` and run on connect.

pub mod cluster;
mod cluster_sql;
mod gang_sql;
mod ids;
mod lease;
mod postgres;
mod queries;
mod queue_sql;
pub mod restarts;
mod rows;
mod sqlite;
pub mod state;
mod transient;

use std::sync::Arc;

use async_trait::async_trait;

pub use cluster::{
    ClusterDeviceRow, ClusterError, ClusterStore, GangOutcome, GangRefusal, LinkRow, RankPlacement,
    RankRow, Reservation, WorkerDevice, WorkerRegistration,
};
pub use ids::{new_id, now_ms};
pub use lease::Lease;
pub use postgres::PgStore;
pub use restarts::DEFAULT_MAX_RESTARTS;
pub use rows::*;
pub use sqlite::SqliteStore;
pub use state::{InvalidTransition, JobState};
pub use transient::{Backoff, retry_transient};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported database URL {0:?}: expected postgres://... or sqlite://PATH")]
    UnsupportedUrl(String),
    #[error("cannot create the database directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("file {file} is used by job {job}, which has not finished")]
    FileInUse { file: String, job: String },
    #[error(
        "the checkpoint of job {job} at step {step} was deleted (that job's \
         training.keep_checkpoints) before this job could hold it; name another checkpoint"
    )]
    CheckpointGone { job: String, step: i64 },
    #[error("job {job} is no longer leased to worker {worker}")]
    LeaseLost { job: String, worker: String },
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Queue positions are counted exactly up to this; beyond it they read `QUEUE_POSITION_CAP + 1`.
pub const QUEUE_POSITION_CAP: i64 = 1000;

/// What `insert_job` did with an `Idempotency-Key`.
#[derive(Debug, Clone)]
pub enum Inserted {
    Created(JobRow),
    /// A job with the same tenant and key already exists (its request hash may differ).
    Existing(JobRow),
}

/// Optional changes made together with a state transition.
#[derive(Debug, Clone, Default)]
pub struct TransitionChange {
    /// The `error` JSON of a failed job.
    pub error: Option<String>,
    /// Add one to `restart_count` (the job leaves a worker and will be resumed).
    pub restart: bool,
    /// Only while this claim holds the job (else `LeaseLost`).
    pub lease: Option<Lease>,
    /// Said in the state event.
    pub message: Option<String>,
}

/// A claimed job: it is `running`, leased to the worker, on `devices`.
#[derive(Debug, Clone)]
pub struct Claim {
    pub job: JobRow,
    pub resume_from: Option<CheckpointRow>,
    /// This claim's lease: every write of its run carries it.
    pub lease: Lease,
}

/// The cluster's operations (`ClusterStore`) are part of every store.
#[async_trait]
pub trait Store: ClusterStore + Send + Sync + 'static {
    /// `SELECT 1`, for readiness.
    async fn ping(&self) -> StoreResult<()>;

    async fn create_tenant(&self, name: &str) -> StoreResult<TenantRow>;
    async fn create_api_key(
        &self,
        tenant_id: &str,
        name: &str,
        key_hash: &str,
    ) -> StoreResult<ApiKeyRow>;
    async fn tenant_for_key(&self, key_hash: &str) -> StoreResult<Option<String>>;
    async fn count_api_keys(&self) -> StoreResult<i64>;

    async fn insert_file(&self, file: &FileRow) -> StoreResult<()>;
    async fn get_file(&self, tenant_id: &str, id: &str) -> StoreResult<Option<FileRow>>;
    /// Newest first; ids below `before` (exclusive) when given.
    async fn list_files(
        &self,
        tenant_id: &str,
        before: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<FileRow>>;
    /// Refused with `FileInUse` while an unfinished job uses it; returns the deleted row.
    async fn delete_file(&self, tenant_id: &str, id: &str) -> StoreResult<Option<FileRow>>;

    /// Inserts a `validating` job, its file uses and its first event.
    async fn insert_job(&self, job: &NewJob) -> StoreResult<Inserted>;
    async fn get_job(&self, tenant_id: &str, id: &str) -> StoreResult<Option<JobRow>>;
    /// For workers: no tenant filter.
    async fn get_job_any(&self, id: &str) -> StoreResult<Option<JobRow>>;
    /// Newest first; ids below `before` (exclusive) when given; `state` filters.
    async fn list_jobs(
        &self,
        tenant_id: &str,
        before: Option<&str>,
        state: Option<JobState>,
        limit: i64,
    ) -> StoreResult<Vec<JobRow>>;
    /// The plan JSON and SVG of a job.
    async fn get_plan(&self, tenant_id: &str, id: &str) -> StoreResult<Option<PlanRow>>;
    async fn set_plan(&self, id: &str, plan: &PlanRow, devices_needed: i64) -> StoreResult<()>;
    /// For a queued job: 1 when it is claimed next; `QUEUE_POSITION_CAP + 1` means further back.
    async fn queue_position(&self, id: &str) -> StoreResult<i64>;
    /// `queue_position` of several queued jobs at once (a page of a list), in the order given.
    async fn queue_positions(&self, ids: &[&str]) -> StoreResult<Vec<i64>>;
    /// Queued jobs in claim order (all tenants).
    async fn queued_jobs(&self, limit: i64) -> StoreResult<Vec<JobRow>>;

    /// The one way a job's state changes (checked by `JobState::check`); writes a state event.
    async fn transition(
        &self,
        id: &str,
        to: JobState,
        change: TransitionChange,
    ) -> StoreResult<JobRow>;

    /// Takes the oldest queued job needing at most `free_devices`, leases it to `worker_id`
    /// for `lease_ms` by the database's clock and records its devices. PostgreSQL:
    /// `FOR UPDATE SKIP LOCKED`.
    async fn claim_job(
        &self,
        worker_id: &str,
        free_devices: &[String],
        lease_ms: i64,
    ) -> StoreResult<Option<Claim>>;
    /// Extends the lease to `lease_ms` from now by the database's clock; returns the job's
    /// state, or `LeaseLost` once the claim no longer holds the job.
    async fn heartbeat(&self, lease: &Lease, lease_ms: i64) -> StoreResult<JobState>;
    /// Jobs whose lease ran out go back to the queue (restart count + 1); returns their ids.
    /// Judged by the database's clock, so workers' clocks need not agree.
    async fn requeue_expired(&self) -> StoreResult<Vec<String>>;
    /// Drops metrics after `step` (from a run that died before its next checkpoint), for the
    /// claim that resumes the job.
    async fn discard_metrics_after(&self, lease: &Lease, step: i64) -> StoreResult<u64>;

    /// One training step: its metrics, the job's progress and a `metrics` event. Returns the
    /// job's state so the worker sees a cancel or pause within one step. Each record of a run
    /// carries a key (`Lease::record_key`): one written before (a retry after a commit whose
    /// answer was lost) is not written again.
    async fn record_step(
        &self,
        lease: &Lease,
        key: &str,
        step: &StepRecord,
    ) -> StoreResult<JobState>;
    async fn record_checkpoint(
        &self,
        lease: &Lease,
        key: &str,
        row: &CheckpointRow,
    ) -> StoreResult<()>;
    /// A running job's event, only while `lease` holds it (else `LeaseLost`).
    async fn record_event(
        &self,
        lease: &Lease,
        key: &str,
        kind: &str,
        data: &str,
    ) -> StoreResult<()>;
    async fn latest_checkpoint(&self, id: &str) -> StoreResult<Option<CheckpointRow>>;
    async fn list_checkpoints(&self, id: &str) -> StoreResult<Vec<CheckpointRow>>;
    async fn get_checkpoint(&self, id: &str, step: i64) -> StoreResult<Option<CheckpointRow>>;
    /// `(step, job)` for each checkpoint of job `id` that an unfinished job starts from: these
    /// must be kept (a retention policy deletes only the others).
    async fn checkpoints_in_use(&self, id: &str) -> StoreResult<Vec<(i64, String)>>;
    /// Deletes the row of job `id`'s checkpoint at `step` (retention), under the claim's
    /// lease, with a `checkpoint_deleted` event; false, deleting nothing, while an unfinished
    /// job starts from it (`model.init.from`).
    async fn delete_checkpoint(&self, lease: &Lease, step: i64) -> StoreResult<bool>;
    /// Marks the job as stopped early under the claim's lease, with a `stopped_early` event
    /// (`data`, JSON).
    async fn record_stopped_early(&self, lease: &Lease, key: &str, data: &str) -> StoreResult<()>;

    async fn append_event(&self, id: &str, kind: &str, data: &str) -> StoreResult<i64>;
    async fn list_events(&self, id: &str, after: i64, limit: i64) -> StoreResult<Vec<EventRow>>;
    async fn list_metrics(
        &self,
        id: &str,
        after_step: i64,
        limit: i64,
    ) -> StoreResult<Vec<MetricRow>>;

    /// Device ids held by `worker_id`'s jobs, with the job.
    async fn devices_in_use(&self, worker_id: &str) -> StoreResult<Vec<(String, String)>>;
    /// Counts by state and totals, for `/metrics`.
    async fn job_totals(&self) -> StoreResult<JobTotals>;
}

/// Connects by the URL's scheme and runs the migrations.
pub async fn connect(url: &str) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }
}
