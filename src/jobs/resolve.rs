//! A job body names uploaded files by id; runs and plans need local paths. Resolving checks
//! each id belongs to the tenant and has the purpose its field needs.

use crate::spec::{InvalidSpec, JobSpec, ModelInit, SpecError};
use crate::store::{Store, StoreError};

/// The built-in tokenizer name that is not a file id.
const BYTES_TOKENIZER: &str = "bytes";

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The body with paths in place of file ids, and the ids it uses.
#[derive(Debug, Clone)]
pub struct ResolvedSpec {
    pub spec: JobSpec,
    pub file_ids: Vec<String>,
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
    if let ModelInit::From { from } = &mut resolved.model.init {
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
    if errors.is_empty() {
        Ok(ResolvedSpec {
            spec: resolved,
            file_ids,
        })
    } else {
        Err(InvalidSpec(errors).into())
    }
}
