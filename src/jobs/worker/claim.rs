//! The one-worker path: a claim of a queued job that fits this worker's free devices, run to
//! its end under the claim's lease.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::finish::{STORE_UNAVAILABLE, database_away};
use super::heartbeat::heartbeat;
use super::{Running, Worker, WorkerError};
use crate::jobs::runner::{RunControl, RunFailure, RunRequest, StopRequest};
use crate::jobs::sink::{JobLease, Unrecorded, store_sink};
use crate::spec::StoragePolicy;
use crate::store::{Backoff, Claim, retry_transient};

impl Worker {
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
}
