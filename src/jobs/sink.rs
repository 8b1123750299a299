//! The `RunSink` the worker hands a runner: each call blocks its (blocking) thread until the
//! store has the record, so a step's metrics and a checkpoint are durable before the next
//! step, and the job's state read back turns a cancel or pause into a stop request.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

use super::runner::{EventLevel, RunControl, RunSink, SinkError, StepMetrics, StopRequest};
use crate::exec::checkpoint::manifest::{MANIFEST, verify};
use crate::store::{CheckpointRow, JobState, StepRecord, Store, StoreError, now_ms};

pub(super) struct StoreSink {
    pub handle: Handle,
    pub store: Arc<dyn Store>,
    pub job_id: String,
    pub worker_id: String,
    pub lease: Duration,
    pub control: RunControl,
    /// Tokens trained before this run's next step (restored from the checkpoint on resume).
    pub tokens: u64,
}

impl StoreSink {
    fn fail(&self, e: StoreError) -> SinkError {
        match e {
            StoreError::LeaseLost { .. } => {
                self.control.request(StopRequest::Abandon);
                SinkError::LeaseLost
            }
            other => SinkError::Store(other.to_string()),
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
            lease_until: now_ms() + self.lease.as_millis() as i64,
        };
        let state = self
            .handle
            .block_on(
                self.store
                    .record_step(&self.job_id, &self.worker_id, &record),
            )
            .map_err(|e| self.fail(e))?;
        self.tokens = tokens;
        match state {
            JobState::Pausing => self.control.request(StopRequest::Pause),
            JobState::Cancelling => self.control.request(StopRequest::Cancel),
            _ => {}
        }
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
            job_id: self.job_id.clone(),
            step: step as i64,
            path: dir.display().to_string(),
            files: serde_json::Value::from(files).to_string(),
            created_at: now_ms(),
        };
        self.handle
            .block_on(self.store.record_checkpoint(&self.worker_id, &row))
            .map_err(|e| self.fail(e))
    }

    fn event(&mut self, level: EventLevel, message: &str) -> Result<(), SinkError> {
        let kind = match level {
            EventLevel::Info => "info",
            EventLevel::Warning => "warning",
        };
        let data = serde_json::json!({ "message": message }).to_string();
        self.handle
            .block_on(self.store.append_event(&self.job_id, kind, &data))
            .map(|_| ())
            .map_err(|e| self.fail(e))
    }
}
