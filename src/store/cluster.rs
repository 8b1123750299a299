//! The cluster in the store: which workers are live and what devices they have, which job holds
//! each device, gang reservations of jobs that span workers (every device of every rank in one
//! transaction, or none), each rank's lease, the rendezvous rows ranks meet through, and the
//! links between machines as ranks measured them. Every row of a reservation carries its
//! attempt, so a restarted job never meets a rank of an earlier attempt. `ClusterStore` is implemented once for both databases (`cluster_sql.rs`,
//! `gang_sql.rs`).

use async_trait::async_trait;

use super::{JobState, StoreResult};

/// What a worker tells the cluster when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRegistration {
    pub worker_id: String,
    /// The machine it runs on (ranks on one host have fast links).
    pub host: String,
    /// Whether it can run one rank of a job spanning workers; a gang is reserved only on
    /// workers that can.
    pub runs_ranks: bool,
    /// The host memory its runs may hold (`--host-memory`); `None`: unbounded.
    pub host_memory_bytes: Option<i64>,
    pub devices: Vec<WorkerDevice>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerDevice {
    pub device_id: String,
    /// `cpu` or `cuda`.
    pub kind: String,
    pub memory_bytes: i64,
}

/// One device of a live worker, and the job holding it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ClusterDeviceRow {
    pub worker_id: String,
    pub host: String,
    /// Its worker's host memory (`None`: unbounded).
    pub host_memory_bytes: Option<i64>,
    pub device_id: String,
    pub kind: String,
    pub memory_bytes: i64,
    /// The job holding it, if any.
    pub job_id: Option<String>,
    /// The holder's reservation attempt and rank when it is held for a job spanning workers.
    pub attempt: Option<i64>,
    pub rank: Option<i64>,
}

/// The link between two machines as ranks on them last measured it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LinkRow {
    /// The pair's machine names, the lesser first.
    pub machine_a: String,
    pub machine_b: String,
    pub bytes_per_s: f64,
    /// One way, one message.
    pub latency_s: f64,
    /// Milliseconds since the Unix epoch.
    pub measured_at: i64,
}

/// Where one rank of a job spanning workers runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlacement {
    pub worker_id: String,
    pub device_id: String,
}

/// A rank of one attempt: `reserved` until its worker claims it, then `running` under its own
/// lease, `released` once the attempt is over.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RankRow {
    pub job_id: String,
    pub attempt: i64,
    pub rank: i64,
    pub worker_id: String,
    pub device_id: String,
    pub state: String,
    pub lease_expires_at: Option<i64>,
    /// The rank's claim token, minted with the reservation (rank 0's is the job's lease
    /// token, which fences the job's records).
    pub lease_token: Option<String>,
}

/// One attempt at running a job across workers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub job_id: String,
    pub attempt: i64,
    /// `reserved` (waiting for every rank to start), `running` or `released`.
    pub state: String,
    /// By the database's clock: ranks not all started by then release the reservation.
    pub start_deadline: i64,
    /// Why it was released.
    pub reason: Option<String>,
    /// What its ranks plan on, when the reserving worker planned the job over the cluster.
    pub layout: Option<String>,
    /// In rank order.
    pub ranks: Vec<RankRow>,
}

/// Why a gang reservation took nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GangRefusal {
    #[error("a gang reservation needs at least one rank")]
    NoRanks,
    #[error("device {device} of worker {worker} is named by two ranks")]
    DeviceTwice { worker: String, device: String },
    #[error("worker {worker} is not live (not registered, or its lease ran out)")]
    WorkerNotLive { worker: String },
    #[error(
        "worker {worker} cannot run a rank of a job spanning workers (it runs each job inside \
         itself); reserve only on workers registered with runs_ranks"
    )]
    RanksUnsupported { worker: String },
    #[error("worker {worker} has no device {device}")]
    UnknownDevice { worker: String, device: String },
    #[error("device {device} of worker {worker} is held by job {job}")]
    DeviceHeld {
        worker: String,
        device: String,
        job: String,
    },
}

/// What `reserve_gang` did.
#[derive(Debug, Clone, PartialEq)]
pub enum GangOutcome {
    /// Every device is held for the job, which is now `running` under this attempt.
    Reserved(Reservation),
    /// Nothing was reserved and the job is still queued.
    Refused(GangRefusal),
}

/// Cluster operations that failed for a reason a caller acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("worker {0} is not registered (register it again)")]
    WorkerUnknown(String),
    #[error("device {device} of worker {worker} is held by job {job}")]
    DeviceHeld {
        worker: String,
        device: String,
        job: String,
    },
    #[error("attempt {attempt} of job {job} is over (released or never reserved)")]
    AttemptOver { job: String, attempt: i64 },
    #[error(
        "not a measured link between machines {a:?} and {b:?}: {why} (two different machines, \
         a bandwidth and a latency above 0)"
    )]
    BadLink { a: String, b: String, why: String },
    #[error("rank {rank} of attempt {attempt} of job {job} is not held by worker {worker}")]
    RankLost {
        job: String,
        attempt: i64,
        rank: i64,
        worker: String,
    },
}

#[async_trait]
pub trait ClusterStore: Send + Sync {
    /// Records (or renews) a worker and its devices, live for `lease_ms` by the database's
    /// clock. Devices it no longer lists go unless a job holds them.
    async fn register_worker(&self, worker: &WorkerRegistration, lease_ms: i64) -> StoreResult<()>;
    /// Extends a worker's lease; `ClusterError::WorkerUnknown` when it is not registered.
    async fn worker_heartbeat(&self, worker_id: &str, lease_ms: i64) -> StoreResult<()>;
    /// A worker stopping: no longer live (what its jobs hold is released as they end).
    async fn deregister_worker(&self, worker_id: &str) -> StoreResult<()>;
    /// Every live worker's devices, by worker id then the worker's own order.
    async fn cluster_devices(&self) -> StoreResult<Vec<ClusterDeviceRow>>;

    /// In one transaction, holds every rank's device for queued job `job_id` (rank = index in
    /// `ranks`) under a new attempt and makes the job `running`; or, when any device is held,
    /// unknown, or on a worker that is not live or cannot run ranks, holds nothing. Ranks not
    /// all claimed within `start_timeout_ms` release it (`expire_reservations`).
    async fn reserve_gang(
        &self,
        job_id: &str,
        ranks: &[RankPlacement],
        start_timeout_ms: i64,
    ) -> StoreResult<GangOutcome> {
        self.reserve_gang_laid_out(job_id, ranks, start_timeout_ms, None)
            .await
    }
    /// `reserve_gang`, keeping `layout` (what the ranks plan on: opaque to the store) on the
    /// attempt's reservation, written in the same transaction.
    async fn reserve_gang_laid_out(
        &self,
        job_id: &str,
        ranks: &[RankPlacement],
        start_timeout_ms: i64,
        layout: Option<&str>,
    ) -> StoreResult<GangOutcome>;
    /// `(job, devices_needed)` of the queued jobs needing more than `devices` devices (more
    /// than any one worker has: they run across workers), in queue order.
    async fn queued_jobs_over(&self, devices: i64) -> StoreResult<Vec<(String, i64)>>;
    /// The ranks reserved for or run by `worker_id` in attempts not yet over.
    async fn worker_ranks(&self, worker_id: &str) -> StoreResult<Vec<RankRow>>;
    /// The worker starts a rank: it holds it for `lease_ms`; once every rank has started the
    /// reservation is `running`. `RankLost` when the rank is not this worker's, `AttemptOver`
    /// when the attempt was released.
    async fn claim_rank(
        &self,
        job_id: &str,
        attempt: i64,
        rank: i64,
        worker_id: &str,
        lease_ms: i64,
    ) -> StoreResult<RankRow>;
    /// Renews a started rank's lease; returns the job's state (a pause or cancel shows here).
    async fn heartbeat_rank(
        &self,
        job_id: &str,
        attempt: i64,
        rank: i64,
        worker_id: &str,
        lease_ms: i64,
    ) -> StoreResult<JobState>;
    /// Releases reservations whose ranks did not all start by the deadline, and those with a
    /// started rank whose lease ran out; their jobs go back to the queue (paused or cancelled
    /// when that was asked). Returns `(job, attempt)` of each.
    async fn expire_reservations(&self) -> StoreResult<Vec<(String, i64)>>;
    /// Releases attempt `attempt` of the job if it is not over: its devices are freed and the
    /// job goes back to the queue. Returns whether it was released now.
    async fn release_reservation(
        &self,
        job_id: &str,
        attempt: i64,
        reason: &str,
    ) -> StoreResult<bool>;
    /// The job's newest reservation, with its ranks.
    async fn latest_reservation(&self, job_id: &str) -> StoreResult<Option<Reservation>>;

    /// Rank `rank` of an attempt not yet over says `key` = `value` (written again, replaced).
    async fn publish_rendezvous(
        &self,
        job_id: &str,
        attempt: i64,
        rank: i64,
        key: &str,
        value: &[u8],
    ) -> StoreResult<()>;
    /// Records what ranks measured between machines `a` and `b` (named in either order),
    /// replacing the pair's earlier figures; `BadLink` for one machine or a figure that is
    /// not above 0.
    async fn record_link(
        &self,
        a: &str,
        b: &str,
        bytes_per_s: f64,
        latency_s: f64,
    ) -> StoreResult<()>;
    /// Every measured link, by machine names.
    async fn network_links(&self) -> StoreResult<Vec<LinkRow>>;

    /// `(rank, value)` of every rank that said `key` in this attempt, in rank order;
    /// `AttemptOver` once the attempt is released.
    async fn read_rendezvous(
        &self,
        job_id: &str,
        attempt: i64,
        key: &str,
    ) -> StoreResult<Vec<(i64, Vec<u8>)>>;
}
