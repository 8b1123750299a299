//! How a run's end is recorded: the job's next state from how the run ended, and the failure
//! codes that put it back in the queue (the database away) or pause it (storage full).

use super::{Worker, WorkerError};
use crate::jobs::redact::without_server_paths;
use crate::jobs::runner::{RunControl, RunEnd, RunFailure, StopRequest};
use crate::spec::StoragePolicy;
use crate::store::{JobState, Lease, StoreError, TransitionChange, retry_transient};

/// The failure code of a store that did not answer.
pub(super) const STORE_UNAVAILABLE: &str = "store_unavailable";

/// The failure code of a checkpoint the storage refused (no space, read-only, quota).
pub(super) const STORAGE_FULL: &str = "storage_full";

impl Worker {
    /// Records how the run under `lease` ended (nothing when its lease was lost).
    pub(super) async fn finish(
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
pub(super) fn database_away(why: String) -> RunFailure {
    RunFailure::service(
        STORE_UNAVAILABLE,
        format!("{why}; the job resumes from its last recorded checkpoint"),
    )
}

/// `store_unavailable` (waited out) for an outage, `internal` for anything else.
pub(super) fn store_failure(e: StoreError) -> RunFailure {
    let code = if e.is_transient() {
        STORE_UNAVAILABLE
    } else {
        "internal"
    };
    RunFailure::service(code, e.to_string())
}
