//! A job body names uploaded files by id, and may start from another job's checkpoint; runs
//! and plans need local paths. Resolving checks each id belongs to the tenant and has the
//! purpose its field needs.

use super::init_checkpoint::job_checkpoint;
use crate::spec::{InvalidSpec, JobCheckpointRef, JobSpec, ModelInit, SpecError};
use crate::store::{CheckpointUse, Store, StoreError};

/// The built-in tokenizer name that is not a file id.
const BYTES_TOKENIZER: &str = "bytes";

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The body with paths in place of file ids, and the ids and checkpoint it uses.
#[derive(Debug, Clone)]
pub struct ResolvedSpec {
    pub spec: JobSpec,
    pub file_ids: Vec<String>,
    pub checkpoint_use: Option<CheckpointUse>,
}

impl ResolvedSpec {
    /// `spec` with a job's "latest checkpoint" pinned to the step resolved now, so the job
    /// starts from the same weights however long it waits in the queue.
    pub fn pinned(&self, spec: &JobSpec) -> JobSpec {
        let mut pinned = spec.clone();
        if let Some(used) = &self.checkpoint_use {
            pinned.model.init = ModelInit::FromCheckpoint {
                from: JobCheckpointRef {
                    job: used.job_id.clone(),
                    step: used.step.max(0) as u64,
                },
            };
        }
        pinned
    }
}

pub async fn resolve_files(
    store: &dyn Store,
    tenant_id: &str,
    spec: &JobSpec,
) -> Result<ResolvedSpec, ResolveError> {
    let mut resolved = spec.clone();
    let mut file_ids = Vec::new();
    let mut errors = Vec::new();
    let mut fields: Vec<(&str, &str, &mut String)> =
        vec![("data.train", "train", &mut resolved.data.train)];
    if let Some(validation) = resolved.data.validation.as_mut() {
        fields.push(("data.validation", "validation", validation));
    }
    if resolved.data.tokenizer != BYTES_TOKENIZER {
        fields.push(("data.tokenizer", "tokenizer", &mut resolved.data.tokenizer));
    }
    let source_job = spec.model.init.source_job();
    if let (ModelInit::From { from }, None) = (&mut resolved.model.init, source_job) {
        fields.push(("model.init.from", "model", from));
    }
    for (param, purpose, value) in fields {
        match store.get_file(tenant_id, value).await? {
            None => errors.push(SpecError::new(
                param,
                format!("no file {value:?}; upload it with POST /v1/files (purpose={purpose}) and use its id"),
            )),
            Some(file) if file.purpose != purpose => errors.push(SpecError::new(
                param,
                format!("file {} was uploaded with purpose={}; this field needs purpose={purpose}", file.id, file.purpose),
            )),
            Some(file) => {
                file_ids.push(file.id);
                *value = file.path;
            }
        }
    }
    let mut checkpoint_use = None;
    if let Some((job, step)) = source_job {
        match job_checkpoint(store, tenant_id, job, step).await? {
            Ok(row) => {
                resolved.model.init = ModelInit::From { from: row.path };
                checkpoint_use = Some(CheckpointUse {
                    job_id: row.job_id,
                    step: row.step,
                });
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ResolvedSpec {
            spec: resolved,
            file_ids,
            checkpoint_use,
        })
    } else {
        Err(InvalidSpec(errors).into())
    }
}
