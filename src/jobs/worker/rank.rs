//! One rank of a job reserved across workers, run inside the worker: the worker reserves jobs
//! too big for one worker when the cluster has room (`gang::reserve_next`), picks up the ranks
//! reserved on its devices, starts each under the rank's own lease, publishes the rank's
//! `host:port` and machine through the attempt's rendezvous rows and reads the others', then
//! runs its rank over TCP (ranks on different machines first measure their links: `links`).
//! Rank 0 records the job's metrics, events and checkpoints under its token (the job's lease
//! token); the other ranks record nothing and renew their rank's lease.
//!
//! Any rank that fails, is stopped or loses its lease ends the attempt: its peers see the
//! broken links within seconds, the reservation is released, and the job goes back to the
//! queue (attempt + 1) to resume from its last complete checkpoint. Only rank 0's user
//! failure (a bad spec) fails the job, and only rank 0's completion succeeds it.

use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::finish::store_failure;
use super::heartbeat::heartbeat;
use super::{Running, Worker, WorkerError};
use crate::exec::transport::RankSpec;
use crate::exec::transport::ranks::Bound;
use crate::jobs::gang::reserve_next;
use crate::jobs::gang_plan::GangLayout;
use crate::jobs::rendezvous::{MACHINE, Rendezvous, TCP_ADDRESS};
use crate::jobs::runner::{
    Evaluation, EventLevel, Fault, RunControl, RunEnd, RunFailure, RunSink, SinkError, StepMetrics,
    StopRequest,
};
use crate::jobs::sink::{JobLease, Unrecorded, store_sink};
use crate::spec::StoragePolicy;
use crate::store::{JobState, Lease, RankRow, Store, StoreError};

/// How long the ranks keep trying to reach each other over TCP once they have met.
const CONNECT: Duration = Duration::from_secs(60);

/// How long a rank that finished waits for rank 0 to record the job's end (its lease is
/// renewed meanwhile, so the attempt is not taken for lost).
const AFTER_END: Duration = Duration::from_secs(120);

impl Worker {
    /// Reserves a queued job too big for one worker when the cluster's free devices hold it,
    /// then starts the ranks reserved on this worker's devices.
    pub(super) async fn start_ranks(
        self: &Arc<Self>,
        tasks: &mut JoinSet<Result<(), WorkerError>>,
    ) {
        let reserved = reserve_next(
            self.store.as_ref(),
            self.planning.as_ref(),
            self.config.gang_start,
        );
        match reserved.await {
            Ok(Some(r)) => tracing::info!(
                job = %r.job_id, attempt = r.attempt, ranks = r.ranks.len(),
                "job reserved across workers"
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reserve a job across workers"),
        }
        let ranks = match self.store.worker_ranks(self.id()).await {
            Ok(ranks) => ranks,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this worker's ranks");
                return;
            }
        };
        for row in ranks.into_iter().filter(|r| r.state == "reserved") {
            let Some(token) = row.lease_token.clone() else {
                continue;
            };
            exit_before_rendezvous_if_asked(&row);
            {
                let mut running = self.running();
                if running.contains_key(&token) {
                    continue;
                }
                let rank = Running {
                    devices: vec![row.device_id.clone()],
                    control: RunControl::new(),
                    asked: Instant::now(),
                };
                running.insert(token, rank);
            }
            let me = self.clone();
            tasks.spawn(async move { me.run_rank(row).await });
        }
    }

    async fn run_rank(self: Arc<Self>, row: RankRow) -> Result<(), WorkerError> {
        let token = row.lease_token.clone().unwrap_or_default();
        let control = match self.running().get(&token) {
            Some(running) => running.control.clone(),
            None => RunControl::new(),
        };
        let result = self.run_rank_inner(&row, token.clone(), control).await;
        self.running().remove(&token);
        result
    }

    async fn run_rank_inner(
        self: &Arc<Self>,
        row: &RankRow,
        token: String,
        control: RunControl,
    ) -> Result<(), WorkerError> {
        let (job_id, attempt, rank) = (row.job_id.as_str(), row.attempt, row.rank);
        let lease_ms = self.config.lease.as_millis() as i64;
        let claimed = (self.store)
            .claim_rank(job_id, attempt, rank, self.id(), lease_ms)
            .await;
        match claimed {
            Ok(_) => {}
            Err(StoreError::Cluster(e)) => {
                tracing::warn!(job = %job_id, attempt, rank, error = %e, "rank not started");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(job = %job_id, attempt, rank, worker = %self.id(), "rank started");
        let mut beating = tokio::spawn(rank_heartbeat(
            self.store.clone(),
            row.clone(),
            self.config.lease,
            control.clone(),
        ));
        let lease = Lease {
            job_id: job_id.to_owned(),
            worker_id: self.id().to_owned(),
            token,
        };
        let (ended, storage) = self.rank_attempt(row, &lease, &control).await;
        if control.requested() == Some(StopRequest::Abandon) {
            // The attempt is over (another rank ended it): nothing of it is recorded.
            beating.abort();
            return Ok(());
        }
        match ended {
            Ok(RunEnd::Completed) if rank == 0 => {
                beating.abort();
                self.finish(&lease, Ok(Ok(RunEnd::Completed)), &control, storage)
                    .await
            }
            Ok(RunEnd::Completed) => {
                // Renewed until rank 0 records the end, which releases the attempt.
                if tokio::time::timeout(AFTER_END, &mut beating).await.is_err() {
                    beating.abort();
                }
                Ok(())
            }
            Err(failure) if rank == 0 && failure.fault == Fault::User => {
                beating.abort();
                self.finish(&lease, Ok(Err(failure)), &control, storage)
                    .await
            }
            other => {
                beating.abort();
                let why = match other {
                    Err(failure) => failure.to_string(),
                    Ok(end) => format!("{end:?}"),
                };
                let reason = format!("rank {rank} (worker {}) ended: {why}", self.id());
                tracing::warn!(job = %job_id, attempt, "{reason}");
                self.store
                    .release_reservation(job_id, attempt, &reason)
                    .await?;
                Ok(())
            }
        }
    }

    /// Prepares, meets the other ranks and runs this rank; rank 0 records under `lease`.
    /// Returns how it ended and the job's storage policy.
    async fn rank_attempt(
        self: &Arc<Self>,
        row: &RankRow,
        lease: &Lease,
        control: &RunControl,
    ) -> (Result<RunEnd, RunFailure>, StoragePolicy) {
        let records = (row.rank == 0).then_some(lease);
        let prepared = async {
            let job = (self.store.get_job_any(&row.job_id).await)
                .map_err(store_failure)?
                .ok_or_else(|| RunFailure::service("internal", "the job is gone"))?;
            let mut request = self.prepare_job(&job, true, records).await?;
            // Every rank plans within the same host memory, or they would plan apart: the
            // layout's, else none.
            request.host_memory_bytes = u64::MAX;
            if let Some(layout) = self.layout(row).await? {
                layout.apply(&mut request.spec);
                request.host_memory_bytes = layout.host_memory_bytes.unwrap_or(u64::MAX);
            }
            let rank = self.meet(row).await?;
            Ok::<_, RunFailure>((job, request, rank))
        };
        let (job, request, rank) = match prepared.await {
            Ok(prepared) => prepared,
            Err(failure) => return (Err(failure), StoragePolicy::Fail),
        };
        let storage = (request.spec.training.storage_policy()).unwrap_or(StoragePolicy::Fail);
        let runner = self.runner.clone();
        let run_control = control.clone();
        if row.rank != 0 {
            let ran = tokio::task::spawn_blocking(move || {
                runner.run_rank(request, rank, &mut RecordsNothing, &run_control)
            })
            .await;
            return (crashed(ran), storage);
        }
        let job_lease = JobLease {
            store: self.store.clone(),
            lease: lease.clone(),
            duration: self.config.lease,
            patience: self.config.patience,
            control: control.clone(),
            renewed: Arc::new(Mutex::new(Instant::now())),
            gave_up: Arc::new(OnceLock::new()),
        };
        let renewing = tokio::spawn(heartbeat(job_lease.clone(), self.lease_trouble.clone()));
        let tokens = job.tokens.max(0) as u64;
        let (mut sink, writer) = store_sink(job_lease.clone(), tokens, self.config.record_queue);
        let ran = tokio::task::spawn_blocking(move || {
            let ran = runner.run_rank(request, rank, &mut sink, &run_control);
            drop(sink);
            ran
        })
        .await;
        let unrecorded = writer.finish(self.config.patience).await;
        renewing.abort();
        let ended = match (crashed(ran), unrecorded) {
            (_, Err(Unrecorded::DatabaseAway(waited))) => Err(RunFailure::service(
                "store_unavailable",
                format!("the database was away for over {} s", waited.as_secs()),
            )),
            (Ok(RunEnd::Completed), Err(Unrecorded::Refused(reason))) => {
                Err(RunFailure::service("internal", reason))
            }
            (ended, _) => ended,
        };
        (ended, storage)
    }

    /// What the attempt's ranks plan on, when the job was planned over the cluster.
    async fn layout(&self, row: &RankRow) -> Result<Option<GangLayout>, RunFailure> {
        let reservation = (self.store.latest_reservation(&row.job_id).await)
            .map_err(store_failure)?
            .filter(|r| r.attempt == row.attempt);
        let Some(text) = reservation.and_then(|r| r.layout) else {
            return Ok(None);
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            RunFailure::service(
                "internal",
                format!("the attempt's layout does not parse: {e}"),
            )
        })
    }

    /// Publishes this rank's machine and address and reads every rank's, within the start
    /// deadline.
    async fn meet(&self, row: &RankRow) -> Result<RankSpec, RunFailure> {
        let unmet = |what: String| RunFailure::service("rendezvous_failed", what);
        let reservation = (self.store.latest_reservation(&row.job_id).await)
            .map_err(store_failure)?
            .filter(|r| r.attempt == row.attempt)
            .ok_or_else(|| unmet(format!("attempt {} is over", row.attempt)))?;
        let meeting = Rendezvous::new(
            self.store.clone(),
            &reservation,
            row.rank,
            self.config.gang_start,
        )
        .map_err(|e| unmet(e.to_string()))?;
        let host = self.config.rank_address.as_str();
        let listener = TcpListener::bind((host, 0))
            .map_err(|e| unmet(format!("cannot listen on {host} (--rank-address): {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| unmet(e.to_string()))?
            .port();
        let address = format!("{host}:{port}");
        let machine = self.config.machine.as_bytes();
        (meeting.publish(MACHINE, machine).await).map_err(|e| unmet(e.to_string()))?;
        (meeting.publish(TCP_ADDRESS, address.as_bytes()).await)
            .map_err(|e| unmet(e.to_string()))?;
        let all = |values: Vec<Vec<u8>>| -> Vec<String> {
            (values.into_iter())
                .map(|a| String::from_utf8_lossy(&a).into_owned())
                .collect()
        };
        let peers =
            all((meeting.wait_for_all(TCP_ADDRESS).await).map_err(|e| unmet(e.to_string()))?);
        let machines =
            all((meeting.wait_for_all(MACHINE).await).map_err(|e| unmet(e.to_string()))?);
        let mut spec = RankSpec::parse(row.rank as u32, &peers.join(","), CONNECT)
            .map_err(|e| unmet(e.to_string()))?;
        spec.listener = Some(Bound(Arc::new(listener)));
        spec.probe = Some(self.link_probe(machines));
        Ok(spec)
    }
}

/// The environment variable that makes a worker process exit as soon as it finds a rank
/// reserved on its devices, before starting it (fault injection: a worker that dies between
/// the reservation and the rendezvous; `tests/cluster_elastic.rs`).
const FAULT_EXIT_BEFORE_RENDEZVOUS: &str = "CHRONOSPIPE_FAULT_EXIT_BEFORE_RENDEZVOUS";

fn exit_before_rendezvous_if_asked(row: &RankRow) {
    if std::env::var_os(FAULT_EXIT_BEFORE_RENDEZVOUS).is_some() {
        tracing::error!(
            job = %row.job_id, attempt = row.attempt, rank = row.rank,
            "{FAULT_EXIT_BEFORE_RENDEZVOUS} is set: exiting before the rank starts"
        );
        std::process::exit(86);
    }
}

/// A blocking run that panicked is the executor's crash.
fn crashed(
    ran: Result<Result<RunEnd, RunFailure>, tokio::task::JoinError>,
) -> Result<RunEnd, RunFailure> {
    ran.unwrap_or_else(|e| {
        Err(RunFailure::service(
            "executor_crashed",
            format!("the executor panicked: {e}"),
        ))
    })
}

/// Renews a started rank's lease every third of it; a pause or cancel of the job stops the
/// rank, and an attempt found over abandons it. Returns once the attempt is over.
async fn rank_heartbeat(store: Arc<dyn Store>, row: RankRow, lease: Duration, control: RunControl) {
    let lease_ms = lease.as_millis() as i64;
    loop {
        tokio::time::sleep(lease / 3).await;
        let renewed = store
            .heartbeat_rank(&row.job_id, row.attempt, row.rank, &row.worker_id, lease_ms)
            .await;
        match renewed {
            Ok(JobState::Pausing) => control.request(StopRequest::Pause),
            Ok(JobState::Cancelling) => control.request(StopRequest::Cancel),
            Ok(_) => {}
            Err(StoreError::Cluster(_)) => {
                control.request(StopRequest::Abandon);
                return;
            }
            Err(e) => {
                tracing::warn!(job = %row.job_id, rank = row.rank, error = %e, "rank heartbeat failed")
            }
        }
    }
}

/// The sink of ranks other than 0: rank 0 records the job.
struct RecordsNothing;

impl RunSink for RecordsNothing {
    fn step(&mut self, _: &StepMetrics) -> Result<(), SinkError> {
        Ok(())
    }
    fn before_checkpoint(&mut self, _: u64) -> Result<(), SinkError> {
        Ok(())
    }
    fn checkpoint(&mut self, _: u64, _: &Path) -> Result<(), SinkError> {
        Ok(())
    }
    fn event(&mut self, _: EventLevel, _: &str) -> Result<(), SinkError> {
        Ok(())
    }
    fn evaluation(&mut self, _: &Evaluation) -> Result<(), SinkError> {
        Ok(())
    }
    fn retain_checkpoints(&mut self, _: u64) -> Result<(), SinkError> {
        Ok(())
    }
    fn stopped_early(&mut self, _: u64, _: Option<u64>) -> Result<(), SinkError> {
        Ok(())
    }
}
