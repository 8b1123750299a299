//! A worker's place in the cluster: it registers its devices and host, renews its own lease by
//! heartbeat (a worker not heard from within it is not live), and on each beat releases the
//! gang reservations whose ranks did not start in time or lost their lease. And the
//! planner-facing call that reserves a job across workers.
//!
//! A worker whose runner can run one rank of a job spanning workers registers with
//! `runs_ranks`; the store reserves such jobs only on those workers
//! (`GangRefusal::RanksUnsupported` otherwise).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::devices::DeviceInfo;
use super::gang_plan::GangLayout;
use crate::store::{
    Backoff, ClusterError, GangOutcome, GangRefusal, RankPlacement, Reservation, Store, StoreError,
    WorkerDevice, WorkerRegistration,
};

/// This machine's name by default (`worker --machine` names it otherwise): the kernel's host
/// name, else `$HOSTNAME`, else `unknown`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A worker's registration and the lease that keeps it live.
pub struct Membership {
    store: Arc<dyn Store>,
    registration: WorkerRegistration,
    lease: Duration,
}

impl Membership {
    /// `machine`: the name of the machine the worker runs on (its registration's `host`);
    /// `host_memory_bytes`: what its runs may hold in host memory (`u64::MAX`: unbounded).
    pub fn new(
        store: Arc<dyn Store>,
        worker_id: &str,
        machine: &str,
        devices: &[DeviceInfo],
        runs_ranks: bool,
        host_memory_bytes: u64,
        lease: Duration,
    ) -> Membership {
        let devices = devices
            .iter()
            .map(|d| WorkerDevice {
                device_id: d.id.clone(),
                kind: d.kind.clone(),
                memory_bytes: i64::try_from(d.memory_bytes).unwrap_or(i64::MAX),
            })
            .collect();
        Membership {
            store,
            registration: WorkerRegistration {
                worker_id: worker_id.to_owned(),
                host: machine.to_owned(),
                runs_ranks,
                host_memory_bytes: (host_memory_bytes != u64::MAX)
                    .then(|| i64::try_from(host_memory_bytes).unwrap_or(i64::MAX)),
                devices,
            },
            lease,
        }
    }

    pub fn registration(&self) -> &WorkerRegistration {
        &self.registration
    }

    fn lease_ms(&self) -> i64 {
        self.lease.as_millis() as i64
    }

    pub async fn register(&self) -> Result<(), StoreError> {
        self.store
            .register_worker(&self.registration, self.lease_ms())
            .await
    }

    /// One beat: renews the lease (registering again when the store forgot the worker) and
    /// releases the reservations that ran out.
    pub async fn beat(&self) -> Result<(), StoreError> {
        match self
            .store
            .worker_heartbeat(&self.registration.worker_id, self.lease_ms())
            .await
        {
            Err(StoreError::Cluster(ClusterError::WorkerUnknown(_))) => self.register().await?,
            other => other?,
        }
        for (job, attempt) in self.store.expire_reservations().await? {
            tracing::warn!(%job, attempt, "gang reservation released; job requeued");
        }
        Ok(())
    }

    /// Beats every third of the lease until `stop` turns true (waiting out a database that
    /// does not answer), then marks the worker as gone.
    pub async fn keep(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Backoff::default();
        while !*stop.borrow() {
            let wait = match self.beat().await {
                Ok(()) => {
                    backoff = Backoff::default();
                    self.lease / 3
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the worker's registration");
                    backoff.next_wait().min(self.lease / 3)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        if let Err(e) = self
            .store
            .deregister_worker(&self.registration.worker_id)
            .await
        {
            tracing::warn!(error = %e, "cannot mark the worker as gone; its lease will run out");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GangError {
    #[error(
        "job {job} fits on one worker ({worker}): it takes the one-worker claim, not a gang reservation"
    )]
    OneWorker { job: String, worker: String },
    #[error("cannot reserve job {job} across workers: {refusal}")]
    Refused { job: String, refusal: GangRefusal },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reserves queued job `job_id` on `ranks` (rank i on `ranks[i]`), which must span at least two
/// workers; the ranks must all be claimed within `start_timeout`, else the reservation is
/// released and the job queued again for its next attempt.
pub async fn reserve_across_workers(
    store: &dyn Store,
    job_id: &str,
    ranks: &[RankPlacement],
    start_timeout: Duration,
) -> Result<Reservation, GangError> {
    reserve(store, job_id, ranks, None, start_timeout).await
}

/// `reserve_across_workers` for a job planned over the cluster: its ranks plan on `layout`.
pub async fn reserve_laid_out(
    store: &dyn Store,
    job_id: &str,
    ranks: &[RankPlacement],
    layout: &GangLayout,
    start_timeout: Duration,
) -> Result<Reservation, GangError> {
    let layout = serde_json::to_string(layout)
        .map_err(|e| GangError::Store(StoreError::Corrupt(e.to_string())))?;
    reserve(store, job_id, ranks, Some(&layout), start_timeout).await
}

async fn reserve(
    store: &dyn Store,
    job_id: &str,
    ranks: &[RankPlacement],
    layout: Option<&str>,
    start_timeout: Duration,
) -> Result<Reservation, GangError> {
    if let Some(first) = ranks.first()
        && ranks.iter().all(|r| r.worker_id == first.worker_id)
    {
        return Err(GangError::OneWorker {
            job: job_id.to_owned(),
            worker: first.worker_id.clone(),
        });
    }
    let timeout_ms = start_timeout.as_millis() as i64;
    match (store.reserve_gang_laid_out(job_id, ranks, timeout_ms, layout)).await? {
        GangOutcome::Reserved(reservation) => Ok(reservation),
        GangOutcome::Refused(refusal) => Err(GangError::Refused {
            job: job_id.to_owned(),
            refusal,
        }),
    }
}
