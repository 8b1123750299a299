//! `model.init.from` naming a job: the tenant's job, one of its complete checkpoints, whose
//! directory then starts the new job as any pretrained model directory would.

use std::path::Path;

use crate::exec::checkpoint::manifest::verify;
use crate::exec::checkpoint::sharded::{MODEL, check_listed};

use crate::spec::SpecError;
use crate::store::{CheckpointRow, Store, StoreResult};

const PARAM: &str = "model.init.from";

/// The checkpoint of `job` (of `tenant_id`) at `step`, else its latest; a user's error names
/// `model.init.from`.
pub async fn job_checkpoint(
    store: &dyn Store,
    tenant_id: &str,
    job: &str,
    step: Option<u64>,
) -> StoreResult<Result<CheckpointRow, SpecError>> {
    // Another tenant's job reads as no job at all, as the API's 404 does.
    if store.get_job(tenant_id, job).await?.is_none() {
        return Ok(Err(SpecError::new(PARAM, format!("no such job {job:?}"))));
    }
    let row = match step {
        None => store.latest_checkpoint(job).await?,
        Some(step) => store.get_checkpoint(job, step as i64).await?,
    };
    let Some(row) = row else {
        let steps: Vec<String> = store
            .list_checkpoints(job)
            .await?
            .iter()
            .map(|c| c.step.to_string())
            .collect();
        let message = match (step, steps.is_empty()) {
            (_, true) => format!("job {job} has no checkpoint yet"),
            (Some(step), false) => format!(
                "job {job} has no checkpoint at step {step}; its checkpoints are at steps {}",
                steps.join(", ")
            ),
            (None, false) => format!("job {job} has no latest checkpoint"),
        };
        return Ok(Err(SpecError::new(PARAM, message)));
    };
    Ok(check_complete(&row).map(|()| row))
}

/// The checkpoint's manifest (written last) is there and every file it lists is on disk at
/// its size, and the model's own files are among them (`config.json` and the weights, in one
/// file or in shards with their index): a half-written, torn or pruned
/// checkpoint is refused rather than loaded. Sizes only: hashing every file would hold the
/// request; a resume, which reads the files anyway, checks their sha256.
fn check_complete(row: &CheckpointRow) -> Result<(), SpecError> {
    let incomplete = |why: String| {
        SpecError::new(
            PARAM,
            format!(
                "the checkpoint of job {} at step {} is not complete: {why}",
                row.job_id, row.step
            ),
        )
    };
    let manifest = verify(Path::new(&row.path), false).map_err(|e| incomplete(e.to_string()))?;
    if manifest.file("config.json").is_none() {
        return Err(incomplete("it has no config.json".into()));
    }
    let dir = Path::new(&row.path);
    check_listed(dir, &manifest, MODEL).map_err(|e| incomplete(e.to_string()))
}
