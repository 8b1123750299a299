//! The `RunSink` the worker hands a runner. Each record (a step, a checkpoint, an event) goes
//! into a bounded queue that one task writes to the store in order, so a database outage does
//! not stop training: the records wait, retried with backoff, and the run only stops at a step
//! boundary when the queue is full, until the database is back. The job's state read back
//! with each step turns a cancel or pause into a stop request; a lost lease stops the writing
//! at once (the job has a new owner).

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TrySendError};

use super::runner::{
    Evaluation, EventLevel, RunControl, RunSink, SinkError, StepMetrics, StopRequest,
};
use crate::exec::checkpoint::manifest::{MANIFEST, verify};
use crate::exec::checkpoint::retention::{Kept, to_delete};
use crate::exec::checkpoint::trainer_state::TrainerState;
use crate::store::{Backoff, CheckpointRow, JobState, StepRecord, Store, StoreError, now_ms};

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

/// What the writer task needs to know of its job.
#[derive(Clone)]
pub(super) struct JobLease {
    pub store: Arc<dyn Store>,
    pub job_id: String,
    pub worker_id: String,
    pub lease: Duration,
    pub control: RunControl,
}

pub(super) struct StoreSink {
    lease: JobLease,
    queue: mpsc::Sender<Record>,
    /// Set by the writer when the store refused a record for good.
    failed: Arc<OnceLock<String>>,
    /// Tokens trained before this run's next step (restored from the checkpoint on resume).
    tokens: u64,
}

/// The writer's end: await it after the sink is dropped to have every record written.
pub(super) struct RecordWriter {
    pub task: tokio::task::JoinHandle<()>,
    pub failed: Arc<OnceLock<String>>,
}

impl RecordWriter {
    /// Waits until every record is written (or the writing stopped); the store's refusal, if any.
    pub async fn finish(self) -> Option<String> {
        if let Err(e) = self.task.await {
            return Some(format!("the record writer crashed: {e}"));
        }
        self.failed.get().cloned()
    }
}

/// A sink and the task that writes what it is given.
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
    };
    (sink, RecordWriter { task, failed })
}

impl StoreSink {
    fn push(&mut self, record: Record) -> Result<(), SinkError> {
        if let Some(reason) = self.failed.get() {
            return Err(SinkError::Store(reason.clone()));
        }
        let record = match self.queue.try_send(record) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(record)) => record,
            Err(TrySendError::Closed(_)) => return Err(self.stopped()),
        };
        tracing::warn!(
            job = %self.lease.job_id,
            held = self.queue.max_capacity(),
            "the database is away and the record queue is full: training waits for it"
        );
        let started = Instant::now();
        self.queue
            .blocking_send(record)
            .map_err(|_| self.stopped())?;
        tracing::info!(job = %self.lease.job_id, waited_s = started.elapsed().as_secs_f64(), "training goes on");
        Ok(())
    }

    fn stopped(&self) -> SinkError {
        match self.failed.get() {
            Some(reason) => SinkError::Store(reason.clone()),
            None => SinkError::LeaseLost,
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
            job_id: self.lease.job_id.clone(),
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
    mut records: mpsc::Receiver<Record>,
    failed: Arc<OnceLock<String>>,
) {
    let mut away_since: Option<Instant> = None;
    while let Some(record) = records.recv().await {
        let mut backoff = Backoff::default();
        loop {
            if lease.control.requested() == Some(StopRequest::Abandon) {
                return;
            }
            match write_one(&lease, &record).await {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    if away_since.is_none() {
                        tracing::warn!(job = %lease.job_id, error = %e, "database away: holding the run's records");
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
                job = %lease.job_id,
                away_s = since.elapsed().as_secs_f64(),
                held = records.len() + 1,
                "database back: writing the held records"
            );
        }
    }
}

async fn write_one(lease: &JobLease, record: &Record) -> Result<(), StoreError> {
    let (store, id, worker) = (&lease.store, &lease.job_id, &lease.worker_id);
    match record {
        Record::Step(step) => {
            // The lease runs from when the step reaches the store.
            let step = StepRecord {
                lease_ms: lease.lease.as_millis() as i64,
                ..step.clone()
            };
            match store.record_step(id, worker, &step).await? {
                JobState::Pausing => lease.control.request(StopRequest::Pause),
                JobState::Cancelling => lease.control.request(StopRequest::Cancel),
                _ => {}
            }
            Ok(())
        }
        Record::Checkpoint(row) => store.record_checkpoint(worker, row).await,
        Record::Event { kind, data } => store.record_event(id, worker, kind, data).await,
        Record::Retain { keep } => retain(lease, *keep).await,
        Record::StoppedEarly { data } => store.record_stopped_early(id, worker, data).await,
    }
}

/// Deletes the checkpoints `training.keep_checkpoints` lets go: the row first (a resume
/// never finds a checkpoint whose files are going), then the directory. A directory that
/// cannot be removed is left behind with a warning; it is no longer offered.
async fn retain(lease: &JobLease, keep: u64) -> Result<(), StoreError> {
    let (store, id, worker) = (&lease.store, &lease.job_id, &lease.worker_id);
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
        if !store.delete_checkpoint(id, worker, step as i64).await? {
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
