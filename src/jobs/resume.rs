//! Which checkpoint a claimed job resumes from: the newest recorded one whose files match its
//! manifest and whose weights are all there, in one file or in shards with their index. A newer one that is torn (a worker killed while storage lost its writes) or
//! altered is passed over with a warning event, so the job goes on from the one before it
//! rather than fail.

use std::path::{Path, PathBuf};

use super::runner::ResumePoint;
use crate::exec::checkpoint::manifest::{Incomplete, Manifest, verify};
use crate::exec::checkpoint::sharded::{MODEL, check_listed};
use crate::store::{Store, StoreError};

/// The newest complete checkpoint of `job_id`, or `None` (training starts over).
pub(super) async fn complete_checkpoint(
    store: &dyn Store,
    job_id: &str,
) -> Result<Option<ResumePoint>, StoreError> {
    let rows = store.list_checkpoints(job_id).await?;
    let mut passed_over = false;
    for row in rows.iter().rev() {
        let dir = PathBuf::from(&row.path);
        let checked = dir.clone();
        let verdict = tokio::task::spawn_blocking(move || resumable(&checked))
            .await
            .unwrap_or_else(|e| Err(Incomplete::BadManifest(e.to_string())));
        match verdict {
            Ok(_) => {
                return Ok(Some(ResumePoint {
                    step: row.step.max(0) as u64,
                    dir,
                }));
            }
            Err(why) => {
                passed_over = true;
                let message = format!(
                    "the checkpoint of step {} is not usable ({why}); resuming from an earlier one",
                    row.step
                );
                tracing::warn!(job = %job_id, step = row.step, reason = %why, "checkpoint passed over");
                warn(store, job_id, &message).await?;
            }
        }
    }
    if passed_over {
        warn(
            store,
            job_id,
            "no complete checkpoint is left: training starts over from step 0",
        )
        .await?;
    }
    Ok(None)
}

/// Whether `dir` is a complete checkpoint with the model's weights, whichever layout.
pub(super) fn resumable(dir: &Path) -> Result<Manifest, Incomplete> {
    let manifest = verify(dir, true)?;
    check_listed(dir, &manifest, MODEL)?;
    Ok(manifest)
}

async fn warn(store: &dyn Store, job_id: &str, message: &str) -> Result<(), StoreError> {
    let data = serde_json::json!({ "message": message }).to_string();
    store
        .append_event(job_id, "warning", &data)
        .await
        .map(|_| ())
}
