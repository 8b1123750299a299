//! The worker: claims queued jobs when its devices are free, holds each claim with a lease it
//! renews by heartbeat, runs the job through the `JobRunner`, and records how it ended. Expired
//! leases of other (dead) workers are put back in the queue first, so the next claim resumes
//! them from their latest checkpoint.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

mod links;
mod rank;

use super::cluster::Membership;
use super::devices::DeviceInfo;
use super::gang::GangPlanning;
use super::planner::Planner;
use super::redact::without_server_paths;
use super::resolve::{ResolveError, resolve_files};
use super::resume::complete_checkpoint;
use super::runner::{JobRunner, RunControl, RunEnd, RunFailure, RunRequest, StopRequest};
use super::sink::{JobLease, RECORD_QUEUE, Unrecorded, store_sink};
use crate::plan::network::Configured;
use crate::spec::{JobSpec, StoragePolicy};
use crate::store::{
    Backoff, Claim, JobRow, JobState, Lease, Store, StoreError, TransitionChange, new_id,
    retry_transient,
};

/// How long a job waits for an absent database before the worker gives it up (it goes back
/// to the queue, or its lease runs out, and it is resumed from its last recorded checkpoint).
const PATIENCE: Duration = Duration::from_secs(600);

/// How long a job reserved across workers waits for all its ranks to start.
const GANG_START: Duration = Duration::from_secs(30);

/// The failure code of a store that did not answer.
const STORE_UNAVAILABLE: &str = "store_unavailable";

/// The failure code of a checkpoint the storage refused (no space, read-only, quota).
const STORAGE_FULL: &str = "storage_full";

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    pub devices: Vec<DeviceInfo>,
    /// Checkpoints go under `DATA_DIR/jobs/JOB_ID/checkpoints` (shared storage when several
    /// machines work one queue).
    pub data_dir: PathBuf,
    /// A claim not renewed for this long is taken back.
    pub lease: Duration,
    /// How often an idle worker looks for work.
    pub poll: Duration,
    /// Records a running job may hold while the database is away before it waits.
    pub record_queue: usize,
    /// How long a job waits for an absent database before the worker gives it up.
    pub patience: Duration,
    /// The host pool each run's offloaded tensors live in (`--host-memory`).
    pub host_memory_bytes: u64,
    /// The host other workers reach this worker's ranks at (`--rank-address`); each rank
    /// listens on a port the OS chooses there and publishes `host:port` to the others.
    pub rank_address: String,
    /// How long the ranks of a job reserved across workers have to all start, and then to
    /// meet, before the reservation is released and the job queued again.
    pub gang_start: Duration,
    /// The machine this worker runs on (`--machine`, default the kernel's host name):
    /// workers naming one machine are planned as sharing it (their devices talk for free),
    /// and links between machines are measured and looked up by these names.
    pub machine: String,
    /// The operator's figures for the links between machines, for placing jobs planned over
    /// the cluster; unset figures are the measured links', else assumed.
    pub network: Configured,
}

impl WorkerConfig {
    pub fn new(data_dir: PathBuf, devices: Vec<DeviceInfo>) -> Self {
        WorkerConfig {
            worker_id: new_id("worker"),
            devices,
            data_dir,
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            record_queue: RECORD_QUEUE,
            patience: PATIENCE,
            host_memory_bytes: u64::MAX,
            rank_address: super::cluster::host_name(),
            gang_start: GANG_START,
            machine: super::cluster::host_name(),
            network: Configured::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A claim this worker runs.
struct Running {
    devices: Vec<String>,
    control: RunControl,
    /// When the claim was asked for: its lease holds from a later moment.
    asked: Instant,
}

pub struct Worker {
    store: Arc<dyn Store>,
    runner: Arc<dyn JobRunner>,
    /// Plans jobs naming no `devices` over the cluster's free devices, remembering those that
    /// did not fit (none: such jobs run only where they fit one worker).
    planning: Option<GangPlanning>,
    config: WorkerConfig,
    /// The claims this worker runs, by lease token (a job claimed again while an earlier
    /// claim's run still winds down is two entries).
    running: Mutex<HashMap<String, Running>>,
    /// The last renewal of a lease failed for want of the database.
    lease_trouble: Arc<AtomicBool>,
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        runner: Arc<dyn JobRunner>,
        config: WorkerConfig,
    ) -> Arc<Self> {
        Self::with_planner(store, runner, None, config)
    }

    /// A worker that also plans jobs naming no `devices` over the cluster's free devices.
    pub fn with_planner(
        store: Arc<dyn Store>,
        runner: Arc<dyn JobRunner>,
        planner: Option<Arc<dyn Planner>>,
        config: WorkerConfig,
    ) -> Arc<Self> {
        let planning = planner.map(|planner| GangPlanning::new(planner, config.network));
        Arc::new(Worker {
            store,
            runner,
            planning,
            config,
            running: Mutex::new(HashMap::new()),
            lease_trouble: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn id(&self) -> &str {
        &self.config.worker_id
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn free_devices(&self) -> Vec<String> {
        let running = self.running();
        self.config
            .devices
            .iter()
            .map(|d| d.id.clone())
            .filter(|d| !running.values().any(|r| r.devices.contains(d)))
            .collect()
    }

    /// Requeues expired leases, then claims the next job that fits the free devices.
    pub async fn claim_next(&self) -> Result<Option<Claim>, WorkerError> {
        for id in self.store.requeue_expired().await? {
            tracing::warn!(job = %id, "lease expired; job requeued");
        }
        let free = self.free_devices();
        let asked = Instant::now();
        let Some(claim) = self
            .store
            .claim_job(self.id(), &free, self.config.lease.as_millis() as i64)
            .await?
        else {
            return Ok(None);
        };
        let devices: Vec<String> =
            serde_json::from_str(claim.job.devices.as_deref().unwrap_or("[]")).unwrap_or_default();
        let running = Running {
            devices,
            control: RunControl::new(),
            asked,
        };
        self.running().insert(claim.lease.token.clone(), running);
        tracing::info!(job = %claim.job.id, worker = %self.id(), "claimed");
        Ok(Some(claim))
    }

    /// Claims one job and runs it to its end; returns its id. Tests drain the queue with it.
    pub async fn try_execute_one(self: &Arc<Self>) -> Result<Option<String>, WorkerError> {
        let Some(claim) = self.claim_next().await? else {
            return Ok(None);
        };
        let id = claim.job.id.clone();
        self.execute(claim).await?;
        Ok(Some(id))
    }

    /// Claims and runs jobs until `shutdown` turns true; then stops claiming, asks running jobs
    /// to checkpoint, and waits for them to be requeued.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = JoinSet::new();
        // Registered before the first claim, so the devices that claim takes are recorded.
        let membership = self.membership();
        if let Err(e) = membership.register().await {
            tracing::warn!(error = %e, "cannot register the worker yet; trying again");
        }
        let (left_tx, left_rx) = watch::channel(false);
        let membership = tokio::spawn(membership.keep(left_rx));
        tracing::info!(worker = %self.id(), devices = self.config.devices.len(), "worker started");
        while !*shutdown.borrow() {
            if self.running().is_empty() {
                // No lease left to renew: the next claim asks the database itself.
                self.lease_trouble.store(false, Ordering::SeqCst);
            }
            let claim = if self.lease_trouble.load(Ordering::SeqCst) {
                // A worker that cannot renew the leases it holds takes on no more.
                Ok(None)
            } else {
                self.claim_next().await
            };
            match claim {
                Ok(Some(claim)) => {
                    let me = self.clone();
                    tasks.spawn(async move { me.execute(claim).await });
                    continue;
                }
                Ok(None) => {
                    if self.runner.runs_ranks() && !self.lease_trouble.load(Ordering::SeqCst) {
                        self.start_ranks(&mut tasks).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot claim a job"),
            }
            while let Some(done) = tasks.try_join_next() {
                log_task_end(done);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll) => {}
                _ = shutdown.changed() => {}
            }
        }
        tracing::info!(
            running = self.running().len(),
            "worker stopping: checkpointing running jobs"
        );
        for running in self.running().values() {
            running.control.request(StopRequest::Shutdown);
        }
        while let Some(done) = tasks.join_next().await {
            log_task_end(done);
        }
        let _ = left_tx.send(true);
        let _ = membership.await;
        tracing::info!(worker = %self.id(), "worker stopped");
    }

    fn membership(&self) -> Membership {
        Membership::new(
            self.store.clone(),
            self.id(),
            &self.config.machine,
            &self.config.devices,
            self.runner.runs_ranks(),
            self.config.host_memory_bytes,
            self.config.lease,
        )
    }

    /// Runs a claimed job until it ends, fails, stops on request, or the lease is lost.
    pub async fn execute(self: &Arc<Self>, claim: Claim) -> Result<(), WorkerError> {
        let token = claim.lease.token.clone();
        let result = self.execute_inner(claim).await;
        self.running().remove(&token);
        result
    }

    async fn execute_inner(self: &Arc<Self>, claim: Claim) -> Result<(), WorkerError> {
        let id = claim.job.id.clone();
        let patience = self.config.patience;
        let (control, asked) = match self.running().get(&claim.lease.token) {
            Some(running) => (running.control.clone(), running.asked),
            None => (RunControl::new(), Instant::now()),
        };
        let lease = JobLease {
            store: self.store.clone(),
            lease: claim.lease.clone(),
            duration: self.config.lease,
            patience,
            control: control.clone(),
            renewed: Arc::new(Mutex::new(asked)),
            gave_up: Arc::new(OnceLock::new()),
        };
        // Renewed from the claim on: preparing (verifying a large checkpoint, waiting out the
        // database) may take longer than one lease.
        let heartbeat = tokio::spawn(heartbeat(lease.clone(), self.lease_trouble.clone()));
        let request = match self.prepare_patiently(&claim).await {
            Ok(request) => request,
            Err(failure) => {
                heartbeat.abort();
                return self
                    .finish(
                        &claim.lease,
                        Ok(Err(failure)),
                        &control,
                        StoragePolicy::Fail,
                    )
                    .await;
            }
        };
        let on_storage = request
            .spec
            .training
            .storage_policy()
            .unwrap_or(StoragePolicy::Fail);
        let tokens = match retry_transient(patience, || self.store.get_job_any(&id)).await {
            Ok(job) => job.map_or(0, |j| j.tokens.max(0) as u64),
            Err(e) => {
                heartbeat.abort();
                return Err(e.into());
            }
        };
        let (mut sink, writer) = store_sink(lease.clone(), tokens, self.config.record_queue);
        let runner = self.runner.clone();
        let run_control = control.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let outcome = runner.run(request, &mut sink, &run_control);
            drop(sink);
            outcome
        })
        .await;
        // The held records reach the store before the job's end does (within the worker's
        // patience); the lease is renewed until then.
        // A stopping worker waits one lease at most: the job resumes from what was recorded.
        let wait = match control.requested() {
            Some(StopRequest::Shutdown) => patience.min(self.config.lease),
            _ => patience,
        };
        let unrecorded = writer.finish(wait).await;
        heartbeat.abort();
        let outcome = outcome.map_err(|e| {
            RunFailure::service("executor_crashed", format!("the executor panicked: {e}"))
        });
        let outcome = match (outcome, unrecorded) {
            (_, Err(Unrecorded::DatabaseAway(waited))) => Ok(Err(database_away(format!(
                "the database was away for over {} s",
                waited.as_secs()
            )))),
            _ if lease.gave_up().is_some() => {
                Ok(Err(database_away(lease.gave_up().unwrap_or_default())))
            }
            (Ok(Ok(_)), Err(Unrecorded::Refused(reason))) => {
                Ok(Err(RunFailure::service("internal", reason)))
            }
            (outcome, _) => outcome,
        };
        self.finish(&claim.lease, outcome, &control, on_storage)
            .await
    }

    /// `prepare`, waiting out a database outage rather than failing the job for it.
    async fn prepare_patiently(&self, claim: &Claim) -> Result<RunRequest, RunFailure> {
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::default();
        loop {
            match self.prepare(claim).await {
                Err(f)
                    if f.code == STORE_UNAVAILABLE && started.elapsed() < self.config.patience =>
                {
                    tracing::warn!(job = %claim.job.id, error = %f, "database away; preparing again");
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                done => return done,
            }
        }
    }

    async fn prepare(&self, claim: &Claim) -> Result<RunRequest, RunFailure> {
        let resuming = claim.resume_from.is_some();
        self.prepare_job(&claim.job, resuming, Some(&claim.lease))
            .await
    }

    /// The run of `job`: its files resolved, resuming from its last complete checkpoint when
    /// `resuming`. With the `records` lease, the metrics of steps after that checkpoint go
    /// (they are trained again).
    async fn prepare_job(
        &self,
        job: &JobRow,
        resuming: bool,
        records: Option<&Lease>,
    ) -> Result<RunRequest, RunFailure> {
        let spec: JobSpec = serde_json::from_str(&job.spec).map_err(|e| {
            RunFailure::service(
                "corrupt_job",
                format!("stored job body does not parse: {e}"),
            )
        })?;
        let resolved = match resolve_files(self.store.as_ref(), &job.tenant_id, &spec).await {
            Ok(resolved) => resolved,
            Err(ResolveError::Invalid(invalid)) => {
                let first = invalid.first();
                // A starting checkpoint gone since the job was made is not a missing file.
                let code = match spec.model.init.source_job() {
                    Some(_) if first.param == "model.init.from" => "checkpoint_unavailable",
                    _ => "file_not_found",
                };
                return Err(RunFailure::user(
                    code,
                    first.message.clone(),
                    Some(&first.param),
                ));
            }
            Err(ResolveError::Store(e)) => {
                return Err(store_failure(e));
            }
        };
        let store_err = store_failure;
        let plan_row = self
            .store
            .get_plan(&job.tenant_id, &job.id)
            .await
            .map_err(store_err)?;
        let plan = plan_row
            .and_then(|p| p.plan)
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(serde_json::Value::Null);
        let resume_from = match resuming {
            true => complete_checkpoint(self.store.as_ref(), &job.id)
                .await
                .map_err(store_err)?,
            false => None,
        };
        // Steps after the checkpoint are trained again; their earlier metrics go.
        if let Some(lease) = records {
            let kept = resume_from.as_ref().map_or(0, |r| r.step as i64);
            self.store
                .discard_metrics_after(lease, kept)
                .await
                .map_err(store_err)?;
        }
        let device_ids: Vec<String> =
            serde_json::from_str(job.devices.as_deref().unwrap_or("[]")).unwrap_or_default();
        let devices = device_ids
            .iter()
            .filter_map(|d| {
                self.config
                    .devices
                    .iter()
                    .find(|info| &info.id == d)
                    .cloned()
            })
            .collect();
        Ok(RunRequest {
            job_id: job.id.clone(),
            spec: resolved.spec,
            plan,
            devices,
            host_memory_bytes: self.config.host_memory_bytes,
            checkpoint_root: self
                .config
                .data_dir
                .join("jobs")
                .join(&job.id)
                .join("checkpoints"),
            resume_from,
        })
    }

    async fn finish(
        &self,
        lease: &Lease,
        outcome: Result<Result<RunEnd, RunFailure>, RunFailure>,
        control: &RunControl,
        on_storage: StoragePolicy,
    ) -> Result<(), WorkerError> {
        let id = lease.job_id.as_str();
        if control.requested() == Some(StopRequest::Abandon) {
            tracing::warn!(job = %id, "lease lost; leaving the job to its new worker");
            return Ok(());
        }
        let patience = self.config.patience;
        let mut change = TransitionChange {
            lease: Some(lease.clone()),
            ..Default::default()
        };
        let to = match outcome.and_then(|run| run) {
            Ok(RunEnd::Completed) => JobState::Succeeded,
            Ok(RunEnd::Cancelled) => JobState::Cancelled,
            Ok(RunEnd::Stopped { step }) => {
                let state = match retry_transient(patience, || self.store.get_job_any(id)).await? {
                    Some(job) => job.job_state()?,
                    None => return Ok(()),
                };
                change.message = Some(format!("stopped after checkpoint of step {step}"));
                match state {
                    JobState::Pausing => JobState::Paused,
                    JobState::Cancelling => JobState::Cancelled,
                    _ => {
                        change.restart = true;
                        JobState::Queued
                    }
                }
            }
            Err(failure) if failure.code == STORE_UNAVAILABLE => {
                // Nothing is lost: the job resumes from its last recorded checkpoint.
                tracing::warn!(job = %id, error = %failure, "database away too long; job requeued");
                change.restart = true;
                change.message = Some(format!("requeued: {}", failure.message));
                JobState::Queued
            }
            Err(mut failure) => {
                tracing::warn!(job = %id, error = %failure, "job failed");
                failure.message = without_server_paths(&failure.message, &self.config.data_dir);
                if failure.code == STORAGE_FULL && on_storage == StoragePolicy::Pause {
                    change.message = Some(format!(
                        "paused until storage is freed ({STORAGE_FULL}): {}",
                        failure.message
                    ));
                    JobState::Paused
                } else {
                    change.error = serde_json::to_string(&failure).ok();
                    JobState::Failed
                }
            }
        };
        let transition =
            retry_transient(patience, || self.store.transition(id, to, change.clone()));
        match transition.await {
            Ok(_) => Ok(()),
            Err(StoreError::LeaseLost { .. }) => {
                tracing::warn!(job = %id, "lease lost before the job's end was recorded");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The run gave up waiting for the database (`why`): the job goes back to the queue.
fn database_away(why: String) -> RunFailure {
    RunFailure::service(
        STORE_UNAVAILABLE,
        format!("{why}; the job resumes from its last recorded checkpoint"),
    )
}

/// `store_unavailable` (waited out) for an outage, `internal` for anything else.
fn store_failure(e: StoreError) -> RunFailure {
    let code = if e.is_transient() {
        STORE_UNAVAILABLE
    } else {
        "internal"
    };
    RunFailure::service(code, e.to_string())
}

/// Renews the job's lease every third of it. A lost lease abandons the job; a renewal the
/// database cannot take marks the worker as unable to hold leases, so it claims nothing new.
async fn heartbeat(lease: JobLease, trouble: Arc<AtomicBool>) {
    let id = &lease.lease.job_id;
    loop {
        tokio::time::sleep(lease.duration / 3).await;
        let asked = Instant::now();
        let lease_ms = lease.duration.as_millis() as i64;
        match lease.store.heartbeat(&lease.lease, lease_ms).await {
            Ok(state) => {
                trouble.store(false, Ordering::SeqCst);
                lease.renewed_at(asked);
                lease.take_state(state);
            }
            Err(StoreError::LeaseLost { .. }) => {
                lease.control.request(StopRequest::Abandon);
                return;
            }
            Err(e) => {
                trouble.store(true, Ordering::SeqCst);
                tracing::warn!(job = %id, error = %e, "heartbeat failed");
            }
        }
    }
}

fn log_task_end(done: Result<Result<(), WorkerError>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "job run could not be recorded"),
        Err(e) => tracing::error!(error = %e, "job task panicked"),
    }
}
