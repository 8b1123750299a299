//! The worker: claims queued jobs when its devices are free (`claim`), holds each claim with a
//! lease it renews by heartbeat (`heartbeat`), runs the job through the `JobRunner`, and
//! records how it ended (`finish`). Expired leases of other (dead) workers are put back in the
//! queue first, so the next claim resumes them from their latest checkpoint. When nothing fits
//! it alone, it reserves jobs too big for one worker and runs the ranks reserved on its
//! devices (`rank`). This module holds the worker's devices and the loop that drives both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinSet;

mod claim;
mod config;
mod finish;
mod heartbeat;
mod links;
mod prepare;
mod rank;

pub use config::WorkerConfig;

use super::cluster::Membership;
use super::gang::GangPlanning;
use super::planner::Planner;
use super::runner::{JobRunner, RunControl, StopRequest};
use crate::store::{Store, StoreError};

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
}

fn log_task_end(done: Result<Result<(), WorkerError>, tokio::task::JoinError>) {
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "job run could not be recorded"),
        Err(e) => tracing::error!(error = %e, "job task panicked"),
    }
}
