//! `/v1/files`: uploads streamed to disk with a size limit and their sha256, checked by
//! purpose (a model must parse as safetensors, a tokenizer as a `tokenizer.json` with its
//! config files, JSONL training data record by record).

use std::path::{Path, PathBuf};

use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::auth::Tenant;
use super::extract::{ApiQuery, page, page_limit, unknown_cursor};
use super::problem::{ApiError, ApiResult, Problem};
use super::views::{DeletedView, FileList, FileView};
use crate::data::tokenizer_config::{CONFIG_FILE, TEMPLATE_FILE};
use crate::data::{Tokenizer, records};
use crate::exec::model::{LlamaConfig, ModelError};
use crate::store::{FileRow, new_id, now_ms};

pub const PURPOSES: [&str; 4] = ["train", "validation", "model", "tokenizer"];

pub fn routes(state: &AppState) -> Router<AppState> {
    let upload_limit = state
        .limits
        .max_upload_bytes
        .saturating_mul(2)
        .saturating_add(1 << 20);
    Router::new()
        .route(
            "/files",
            post(upload)
                .layer(DefaultBodyLimit::max(
                    usize::try_from(upload_limit).unwrap_or(usize::MAX),
                ))
                .get(list),
        )
        .route("/files/{id}", get(retrieve).delete(delete))
}

/// The multipart form of `POST /v1/files`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The content.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    file: String,
    /// `train`, `validation`, `model` or `tokenizer`.
    purpose: String,
    /// For `purpose=model`: the Hugging Face `config.json` that goes with the weights.
    #[schema(format = Binary, content_media_type = "application/json")]
    config: Option<String>,
    /// For `purpose=tokenizer`: its `tokenizer_config.json` (`eos_token`, `bos_token`,
    /// `chat_template`), needed by JSONL data.
    #[schema(format = Binary, content_media_type = "application/json")]
    tokenizer_config: Option<String>,
    /// For `purpose=tokenizer`: its `chat_template.jinja`, needed by chat data.
    #[schema(format = Binary, content_media_type = "text/plain")]
    chat_template: Option<String>,
}

/// The optional parts of the form: its name, the file it is saved as, and the purpose it
/// goes with.
const EXTRA_PARTS: [(&str, &str, &str); 3] = [
    ("config", "config.json", "model"),
    ("tokenizer_config", CONFIG_FILE, "tokenizer"),
    ("chat_template", TEMPLATE_FILE, "tokenizer"),
];

struct Received {
    purpose: String,
    filename: String,
    bytes: u64,
    sha256: String,
}

/// Upload a file.
#[utoipa::path(post, path = "/v1/files", tag = "files",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, body = FileView),
        (status = 400, description = "Malformed form, unknown purpose or missing part", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The file is over the upload limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The content does not parse for its purpose", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "The service's storage is full; nothing of the upload is kept", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn upload(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<(StatusCode, Json<FileView>)> {
    let multipart =
        multipart.map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text(), "file"))?;
    let id = new_id("file");
    let dir = state.data_dir.join("files").join(&id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(ApiError::storage)?;
    let received = match receive(&state, &dir, multipart).await {
        Ok(received) => received,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
    };
    let path = if received.purpose == "model" {
        dir.clone()
    } else {
        dir.join("data")
    };
    let row = FileRow {
        id,
        tenant_id: tenant,
        purpose: received.purpose,
        filename: received.filename,
        bytes: received.bytes as i64,
        sha256: received.sha256,
        path: path.display().to_string(),
        created_at: now_ms(),
    };
    if let Err(e) = state.store.insert_file(&row).await {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e.into());
    }
    Ok((StatusCode::CREATED, Json(row.into())))
}

async fn receive(state: &AppState, dir: &Path, mut multipart: Multipart) -> ApiResult<Received> {
    let limit = state.limits.max_upload_bytes;
    let mut purpose = None;
    let mut file = None;
    let mut extras = Vec::new();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        match field.name().unwrap_or("") {
            "purpose" => purpose = Some(field.text().await.map_err(|e| multipart_error(e, limit))?),
            "file" => {
                let filename = field.file_name().unwrap_or("upload").to_owned();
                let (bytes, sha256) = save(field, &dir.join("upload.part"), limit).await?;
                file = Some((filename, bytes, sha256));
            }
            name => {
                let Some(&(part, file, _)) = EXTRA_PARTS.iter().find(|p| p.0 == name) else {
                    return Err(ApiError::bad_request(
                        "unknown_field",
                        format!(
                            "unknown form field {name:?}; send file, purpose and (for a model) \
                             config or (for a tokenizer) tokenizer_config and chat_template"
                        ),
                        name,
                    ));
                };
                save(field, &dir.join(file), limit).await?;
                extras.push(part);
            }
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::bad_request("missing_field", "the form needs a purpose field", "purpose")
    })?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::bad_request(
            "invalid_purpose",
            format!("purpose {purpose:?} is not one of train, validation, model, tokenizer"),
            "purpose",
        ));
    }
    let (filename, bytes, sha256) = file.ok_or_else(|| {
        ApiError::bad_request("missing_field", "the form needs a file part", "file")
    })?;
    for (part, _, with) in EXTRA_PARTS {
        if extras.contains(&part) && purpose != with {
            return Err(ApiError::bad_request(
                "unknown_field",
                format!("only a {with} file comes with a {part} part"),
                part,
            ));
        }
    }
    let name = if purpose == "model" {
        "model.safetensors"
    } else {
        "data"
    };
    let target = dir.join(name);
    tokio::fs::rename(dir.join("upload.part"), &target)
        .await
        .map_err(ApiError::storage)?;
    check_content(
        &purpose,
        &target,
        extras.contains(&"config").then(|| dir.join("config.json")),
    )
    .await?;
    Ok(Received {
        purpose,
        filename,
        bytes,
        sha256,
    })
}

/// Streams a part to `path`, hashing as it goes; 413 past `limit`.
async fn save(mut field: Field<'_>, path: &Path, limit: u64) -> ApiResult<(u64, String)> {
    let mut out = tokio::fs::File::create(path)
        .await
        .map_err(ApiError::storage)?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        bytes += chunk.len() as u64;
        if bytes > limit {
            return Err(ApiError::too_large(limit, "the uploaded file").param("file"));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(ApiError::storage)?;
    }
    out.flush().await.map_err(ApiError::storage)?;
    // Space a file system only reserves at sync (tmpfs, quotas) fails here, not at close.
    out.sync_all().await.map_err(ApiError::storage)?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

fn multipart_error(e: MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit, "the uploaded file").param("file")
    } else {
        ApiError::bad_request("invalid_multipart", e.body_text(), "file")
    }
}

/// Parses the content as its purpose requires, on a blocking thread.
async fn check_content(purpose: &str, path: &Path, config: Option<PathBuf>) -> ApiResult<()> {
    let purpose = purpose.to_owned();
    let path = path.to_owned();
    let checked = tokio::task::spawn_blocking(move || -> Result<(), (String, &'static str)> {
        match purpose.as_str() {
            "model" => {
                let bytes = std::fs::read(&path).map_err(|e| (e.to_string(), "file"))?;
                safetensors::SafeTensors::deserialize(&bytes)
                    .map_err(|e| (format!("not a safetensors file: {e:?}"), "file"))?;
                if let Some(config) = config {
                    let text =
                        std::fs::read_to_string(&config).map_err(|e| (e.to_string(), "config"))?;
                    let value: serde_json::Value = serde_json::from_str(&text)
                        .map_err(|e| (format!("config is not JSON: {e}"), "config"))?;
                    // What the model does not compute is refused now, by field, rather than
                    // when a job names the file.
                    LlamaConfig::from_hf_json(&value).map_err(|e| match e {
                        ModelError::BadConfig { field, reason } => {
                            (format!("config.json field {field}: {reason}"), "config")
                        }
                        other => (other.to_string(), "config"),
                    })?;
                }
            }
            "tokenizer" => check_tokenizer(&path)?,
            _ => {
                let raw = std::fs::read(&path).map_err(|e| (e.to_string(), "file"))?;
                if records::is_jsonl(&raw) {
                    records::parse(&raw).map_err(|e| (format!("JSONL {e}"), "file"))?;
                }
            }
        }
        Ok(())
    })
    .await
    .map_err(ApiError::internal)?;
    checked.map_err(|(detail, param)| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_file", detail).param(param)
    })
}

/// A `tokenizer.json` that loads, with its config and chat template (which must compile).
fn check_tokenizer(path: &Path) -> Result<(), (String, &'static str)> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| (format!("not a Hugging Face tokenizer.json: {e}"), "file"))?;
    let Tokenizer::HuggingFace(t) = Tokenizer::load(&path.display().to_string())
        .map_err(|e| (e.to_string(), "tokenizer_config"))?
    else {
        return Ok(());
    };
    if t.config.chat_template.is_some() {
        t.chat_template()
            .map_err(|e| (e.to_string(), "chat_template"))?;
    }
    Ok(())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Return files created before this file id (the last id of the previous page).
    pub after: Option<String>,
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
}

/// List your files, newest first.
#[utoipa::path(get, path = "/v1/files", tag = "files", params(ListQuery),
    responses(
        (status = 200, body = FileList),
        (status = 400, description = "Bad limit or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<FileList>> {
    let limit = page_limit(query.limit)?;
    if let Some(after) = &query.after
        && state.store.get_file(&tenant, after).await?.is_none()
    {
        return Err(unknown_cursor("file", after));
    }
    let rows = state
        .store
        .list_files(&tenant, query.after.as_deref(), limit + 1)
        .await?;
    let (rows, has_more) = page(rows, limit);
    Ok(Json(FileList::new(
        rows.into_iter().map(FileView::from).collect(),
        has_more,
    )))
}

/// One file.
#[utoipa::path(get, path = "/v1/files/{id}", tag = "files", params(("id" = String, Path)),
    responses(
        (status = 200, body = FileView),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such file of yours", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<FileView>> {
    let file = state
        .store
        .get_file(&tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    Ok(Json(file.into()))
}

/// Delete a file; refused while an unfinished job uses it.
#[utoipa::path(delete, path = "/v1/files/{id}", tag = "files", params(("id" = String, Path)),
    responses(
        (status = 200, body = DeletedView),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such file of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A job that has not finished uses it", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<DeletedView>> {
    let file = state
        .store
        .delete_file(&tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("file", &id))?;
    let dir = state.data_dir.join("files").join(&file.id);
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a deleted file's data");
    }
    Ok(Json(DeletedView {
        id: file.id,
        object: "file",
        deleted: true,
    }))
}
