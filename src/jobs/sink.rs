//! The `RunSink` the worker hands a runner. Each record (a step, a checkpoint, an event) goes
//! into a bounded queue that one task writes to the store in order, so a database outage does
//! not stop training: the records wait, retried with backoff, and the run only stops at a step
//! boundary when the queue is full, until the database is back (or the worker's patience runs
//! out). The job's state read back with each step turns a cancel or pause into a stop request;
//! a lost lease stops the writing at once (the job has a new owner), and a checkpoint is only
//! written while the claim surely still holds the job.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TrySendError};

use super::runner::{
    Evaluation, EventLevel, RunControl, RunSink, SinkError, StepMetrics, StopRequest,
};
use crate::exec::checkpoint::manifest::{MANIFEST, verify};
use crate::exec::checkpoint::retention::{Kept, to_delete};
use crate::exec::checkpoint::trainer_state::TrainerState;
use crate::store::{
    Backoff, CheckpointRow, JobState, Lease, StepRecord, Store, StoreError, now_ms,
};

/// Records a run may hold while the database is away before it pauses (by default).
pub const RECORD_QUEUE: usize = 256;

enum Record {
    Step(StepRecord),
    Checkpoint(CheckpointRow),
    Event {
        kind: &'static str,
        data: String,
    },
    /// Apply `training.keep_checkpoints` to the checkpoints recorded so far.
    Retain {
        keep: u64,
    },
    StoppedEarly {
        data: String,
    },
}

/// A record and its key (`Lease::record_key`), so a retried write is written once.
struct Keyed {
    key: String,
    record: Record,
}

/// What the writer task and the heartbeat need to know of their claim.
#[derive(Clone)]
pub(super) struct JobLease {
    pub store: Arc<dyn Store>,
    pub lease: Lease,
    /// How long each renewal holds the job (by the database's clock).
    pub duration: Duration,
    /// How long the worker waits for an absent database before it gives the job up.
    pub patience: Duration,
    pub control: RunControl,
    /// When the last renewal that succeeded was asked for. The database granted `duration`
    /// from a later moment, so no other claim can hold the job before `renewed + duration`.
    pub renewed: Arc<Mutex<Instant>>,
    /// Why the run gave up waiting for the database (`patience` passed, or the job was asked
    /// to stop while its records could not be written): the worker gives the job back.
    pub gave_up: Arc<OnceLock<String>>,
}

impl JobLease {
    /// Notes a renewal asked for at `asked` that the database took.
    pub fn renewed_at(&self, asked: Instant) {
        let mut renewed = self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        *renewed = (*renewed).max(asked);
    }

    /// Whether the claim surely holds the job for `margin` more, by this machine's clock.
    fn held_for(&self, margin: Duration) -> bool {
        let renewed = *self.renewed.lock().unwrap_or_else(|p| p.into_inner());
        renewed.elapsed() + margin < self.duration
    }

    fn lease_ms(&self) -> i64 {
        self.duration.as_millis() as i64
    }

    /// Renews the lease now, waiting out an outage up to `patience`.
    async fn renew(&self) -> Result<(), SinkError> {
        let started = Instant::now();
        let mut backoff = Backoff::default();
        loop {
            if self.control.requested() == Some(StopRequest::Abandon) {
                return Err(SinkError::LeaseLost);
            }
            let asked = Instant::now();
            match self.store.heartbeat(&self.lease, self.lease_ms()).await {
                Ok(state) => {
                    self.renewed_at(asked);
                    self.take_state(state);
                    return Ok(());
                }
                Err(StoreError::LeaseLost { .. }) => {
                    self.control.request(StopRequest::Abandon);
                    return Err(SinkError::LeaseLost);
                }
                Err(e) if e.is_transient() => {
                    if started.elapsed() >= self.patience {
                        return Err(self.give_up(self.away_too_long()));
                    }
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => return Err(SinkError::Store(e.to_string())),
            }
        }
    }

    /// The run stops waiting for the database: the worker gives the job back to the queue.
    fn give_up(&self, why: String) -> SinkError {
        let _ = self.gave_up.set(why.clone());
        SinkError::Store(why)
    }

    fn away_too_long(&self) -> String {
        format!(
            "the database was away for over {} s",
            self.patience.as_secs()
        )
    }

    /// Why the run gave up waiting for the database, when it did.
    pub fn gave_up(&self) -> Option<String> {
        self.gave_up.get().cloned()
    }

    /// A cancel or pause read back from the store becomes a stop request.
    pub fn take_state(&self, state: JobState) {
        match state {
            JobState::Pausing => self.control.request(StopRequest::Pause),
            JobState::Cancelling => self.control.request(StopRequest::Cancel),
            _ => {}
        }
    }
}

pub(super) struct StoreSink {
    lease: JobLease,
    queue: mpsc::Sender<Keyed>,
    /// Set by the writer when the store refused a record for good.
    failed: Arc<OnceLock<String>>,
    /// Tokens trained before this run's next step (restored from the checkpoint on resume).
    tokens: u64,
    /// Records made so far: the next record's key.
    made: u64,
    runtime: tokio::runtime::Handle,
}

/// Why some of a run's records were not written.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Unrecorded {
    /// The store refused a record for good, or the writer crashed.
    Refused(String),
    /// The database stayed away longer than the worker's patience.
    DatabaseAway(Duration),
}

/// The writer's end: await it after the sink is dropped to have every record written.
pub(super) struct RecordWriter {
    pub task: tokio::task::JoinHandle<()>,
    pub failed: Arc<OnceLock<String>>,
}

impl RecordWriter {
    /// Waits until every record is written, the writing stopped, or `patience` passed (the
    /// database did not come back: the writer is stopped and the rest is not written).
    pub async fn finish(mut self, patience: Duration) -> Result<(), Unrecorded> {
        match tokio::time::timeout(patience, &mut self.task).await {
            Err(_) => {
                self.task.abort();
                Err(Unrecorded::DatabaseAway(patience))
            }
            Ok(Err(e)) => Err(Unrecorded::Refused(format!(
                "the record writer crashed: {e}"
            ))),
            Ok(Ok(())) => match self.failed.get() {
                Some(reason) => Err(Unrecorded::Refused(reason.clone())),
                None => Ok(()),
            },
        }
    }
}

/// A sink and the task that writes what it is given. Called on the runtime.
pub(super) fn store_sink(
    lease: JobLease,
    tokens: u64,
    capacity: usize,
) -> (StoreSink, RecordWriter) {
    let (queue, records) = mpsc::channel(capacity.max(1));
    let failed = Arc::new(OnceLock::new());
    let task = tokio::spawn(write_records(lease.clone(), records, failed.clone()));
    let sink = StoreSink {
        lease,
        queue,
        failed: failed.clone(),
        tokens,
        made: 0,
        runtime: tokio::runtime::Handle::current(),
    };
    (sink, RecordWriter { task, failed })
}

impl StoreSink {
    fn push(&mut self, record: Record) -> Result<(), SinkError> {
        if let Some(reason) = self.failed.get() {
            return Err(SinkError::Store(reason.clone()));
        }
        self.made += 1;
        let keyed = Keyed {
            key: self.lease.lease.record_key(self.made),
            record,
        };
        let keyed = match self.queue.try_send(keyed) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(keyed)) => keyed,
            Err(TrySendError::Closed(_)) => return Err(self.stopped()),
        };
        tracing::warn!(
            job = %self.lease.lease.job_id,
            held = self.queue.max_capacity(),
            "the database is away and the record queue is full: training waits for it"
        );
        let started = Instant::now();
        let (queue, lease) = (self.queue.clone(), self.lease.clone());
        self.runtime
            .block_on(wait_for_room(queue, keyed, lease))
            .map_err(|why| why.unwrap_or_else(|| self.stopped()))?;
        tracing::info!(job = %self.lease.lease.job_id, waited_s = started.elapsed().as_secs_f64(), "training goes on");
        Ok(())
    }

    fn stopped(&self) -> SinkError {
        match self.failed.get() {
            Some(reason) => SinkError::Store(reason.clone()),
            None => SinkError::LeaseLost,
        }
    }
}

/// Waits for room in the queue: until the database is back, the worker's patience runs out,
/// or the job is asked to stop (a stopping worker does not wait for a database it cannot use).
/// `Err(None)`: the writer is gone.
async fn wait_for_room(
    queue: mpsc::Sender<Keyed>,
    keyed: Keyed,
    lease: JobLease,
) -> Result<(), Option<SinkError>> {
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), queue.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(keyed);
                return Ok(());
            }
            Ok(Err(_)) => return Err(None),
            Err(_) => {}
        }
        if let Some(stop) = lease.control.requested() {
            return Err(Some(match stop {
                StopRequest::Abandon => SinkError::LeaseLost,
                _ => lease.give_up("the database is away and the job was asked to stop".into()),
            }));
        }
        if started.elapsed() >= lease.patience {
            return Err(Some(lease.give_up(lease.away_too_long())));
        }
    }
}

impl RunSink for StoreSink {
    fn step(&mut self, metrics: &StepMetrics) -> Result<(), SinkError> {
        let tokens = self.tokens + metrics.tokens;
        let record = StepRecord {
            step: metrics.step as i64,
            tokens: tokens as i64,
            data: serde_json::to_string(metrics).map_err(|e| SinkError::Store(e.to_string()))?,
            lease_ms: 0,
        };
        self.push(Record::Step(record))?;
        self.tokens = tokens;
        Ok(())
    }

    /// A checkpoint is written only while the claim surely holds the job for a third of a
    /// lease more (time to write it); else the lease is renewed first, so a run whose job was
    /// claimed again writes no checkpoint over its new owner's.
    fn before_checkpoint(&mut self, _step: u64) -> Result<(), SinkError> {
        if self.lease.control.requested() == Some(StopRequest::Abandon) {
            return Err(SinkError::LeaseLost);
        }
        if self.lease.held_for(self.lease.duration / 3) {
            return Ok(());
        }
        self.runtime.block_on(self.lease.renew())
    }

    fn checkpoint(&mut self, step: u64, dir: &Path) -> Result<(), SinkError> {
        // Only a complete checkpoint is recorded: its files are the manifest's, and the manifest.
        let manifest = verify(dir, false).map_err(|why| SinkError::Incomplete {
            step,
            reason: why.to_string(),
        })?;
        let mut files: Vec<serde_json::Value> = manifest
            .files
            .iter()
            .map(|f| serde_json::json!({"name": f.name, "bytes": f.bytes}))
            .collect();
        let manifest_bytes = std::fs::metadata(dir.join(MANIFEST)).map_or(0, |m| m.len());
        files.push(serde_json::json!({"name": MANIFEST, "bytes": manifest_bytes}));
        let row = CheckpointRow {
            job_id: self.lease.lease.job_id.clone(),
            step: step as i64,
            path: dir.display().to_string(),
            files: serde_json::Value::from(files).to_string(),
            created_at: now_ms(),
            val_loss: TrainerState::load(dir).ok().and_then(|s| s.val_loss),
        };
        self.push(Record::Checkpoint(row))
    }

    fn evaluation(&mut self, e: &Evaluation) -> Result<(), SinkError> {
        let data = serde_json::to_string(e).map_err(|e| SinkError::Store(e.to_string()))?;
        self.push(Record::Event {
            kind: "evaluation",
            data,
        })
    }

    fn retain_checkpoints(&mut self, keep: u64) -> Result<(), SinkError> {
        self.push(Record::Retain { keep })
    }

    fn stopped_early(&mut self, step: u64, best_step: Option<u64>) -> Result<(), SinkError> {
        let data = serde_json::json!({ "step": step, "best_step": best_step }).to_string();
        self.push(Record::StoppedEarly { data })
    }

    fn event(&mut self, level: EventLevel, message: &str) -> Result<(), SinkError> {
        let kind = match level {
            EventLevel::Info => "info",
            EventLevel::Warning => "warning",
        };
        let data = serde_json::json!({ "message": message }).to_string();
        self.push(Record::Event { kind, data })
    }
}

/// Writes the records in order, each retried with backoff while the database is away; stops
/// when the lease is lost (writing nothing more) or the store refuses a record for good.
async fn write_records(
    lease: JobLease,
    mut records: mpsc::Receiver<Keyed>,
    failed: Arc<OnceLock<String>>,
) {
    let mut away_since: Option<Instant> = None;
    while let Some(keyed) = records.recv().await {
        let mut backoff = Backoff::default();
        loop {
            if lease.control.requested() == Some(StopRequest::Abandon) {
                return;
            }
            match write_one(&lease, &keyed).await {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    if away_since.is_none() {
                        tracing::warn!(job = %lease.lease.job_id, error = %e, "database away: holding the run's records");
                        away_since = Some(Instant::now());
                    }
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(StoreError::LeaseLost { .. }) => {
                    lease.control.request(StopRequest::Abandon);
                    return;
                }
                Err(e) => {
                    let _ = failed.set(format!("cannot record the run: {e}"));
                    return;
                }
            }
        }
        if let Some(since) = away_since.take() {
            tracing::info!(
                job = %lease.lease.job_id,
                away_s = since.elapsed().as_secs_f64(),
                held = records.len() + 1,
                "database back: writing the held records"
            );
        }
    }
}

async fn write_one(lease: &JobLease, keyed: &Keyed) -> Result<(), StoreError> {
    let (store, claim, key) = (&lease.store, &lease.lease, keyed.key.as_str());
    match &keyed.record {
        Record::Step(step) => {
            // The lease runs from when the step reaches the store.
            let step = StepRecord {
                lease_ms: lease.lease_ms(),
                ..step.clone()
            };
            let asked = Instant::now();
            let state = store.record_step(claim, key, &step).await?;
            lease.renewed_at(asked);
            lease.take_state(state);
            Ok(())
        }
        Record::Checkpoint(row) => store.record_checkpoint(claim, key, row).await,
        Record::Event { kind, data } => store.record_event(claim, key, kind, data).await,
        Record::Retain { keep } => retain(lease, *keep).await,
        Record::StoppedEarly { data } => store.record_stopped_early(claim, key, data).await,
    }
}

/// Deletes the checkpoints `training.keep_checkpoints` lets go: the row first (a resume
/// never finds a checkpoint whose files are going), then the directory. A directory that
/// cannot be removed is left behind with a warning; it is no longer offered.
async fn retain(lease: &JobLease, keep: u64) -> Result<(), StoreError> {
    let (store, id) = (&lease.store, &lease.lease.job_id);
    let rows = store.list_checkpoints(id).await?;
    let needed: Vec<u64> = (store.checkpoints_in_use(id).await?.iter())
        .map(|(step, _)| *step as u64)
        .collect();
    let kept: Vec<Kept> = (rows.iter())
        .map(|r| Kept {
            step: r.step as u64,
            val_loss: r.val_loss,
        })
        .collect();
    for step in to_delete(&kept, keep as usize, &needed) {
        if !store.delete_checkpoint(&lease.lease, step as i64).await? {
            continue;
        }
        let Some(row) = rows.iter().find(|r| r.step as u64 == step) else {
            continue;
        };
        match tokio::fs::remove_dir_all(&row.path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(job = %id, step, error = %e, "a pruned checkpoint's files stay on disk")
            }
        }
    }
    Ok(())
}
