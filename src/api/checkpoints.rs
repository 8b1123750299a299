//! `GET /v1/jobs/{id}/checkpoints` and the download of a checkpoint's files, with
//! Content-Length, an ETag (checkpoints never change once recorded) and single byte ranges.

use std::io::SeekFrom;
use std::path::PathBuf;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use file_stream::reader_stream;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::AppState;
use super::auth::Tenant;
use super::problem::{ApiError, ApiResult, Problem};
use super::views::{CheckpointFile, CheckpointList, CheckpointView};
use crate::exec::checkpoint::manifest::{Incomplete, MANIFEST, check_file, verify};
use crate::exec::checkpoint::retention::{self, Kept};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs/{id}/checkpoints", get(list))
        .route("/jobs/{id}/checkpoints/{step}/files/{name}", get(download))
}

/// A job's checkpoints in step order, with their files.
#[utoipa::path(get, path = "/v1/jobs/{id}/checkpoints", tag = "checkpoints", params(("id" = String, Path)),
    responses(
        (status = 200, body = CheckpointList),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<CheckpointList>> {
    state.tenant_job(&tenant, &id).await?;
    let rows = state.store.list_checkpoints(&id).await?;
    // Only complete checkpoints: a torn or truncated one is never offered (sizes suffice here;
    // a download checks the file's sha256 too).
    let rows = tokio::task::spawn_blocking(move || {
        rows.into_iter()
            .filter(|row| verify(std::path::Path::new(&row.path), false).is_ok())
            .collect::<Vec<_>>()
    })
    .await
    .map_err(ApiError::internal)?;
    // The lowest validation loss among the checkpoints offered.
    let kept: Vec<Kept> = (rows.iter())
        .map(|r| Kept {
            step: r.step as u64,
            val_loss: r.val_loss,
        })
        .collect();
    let best = retention::best(&kept);
    let data = rows
        .into_iter()
        .map(|row| {
            let best = best == Some(row.step as u64);
            CheckpointView::try_from(row).map(|view| CheckpointView { best, ..view })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(CheckpointList::new(data, false)))
}

/// Download one file of a checkpoint (`model.safetensors`, `config.json`, ...). Supports
/// `Range: bytes=...` (one range) and `If-None-Match`.
#[utoipa::path(get, path = "/v1/jobs/{id}/checkpoints/{step}/files/{name}", tag = "checkpoints",
    params(("id" = String, Path), ("step" = i64, Path), ("name" = String, Path),
           ("Range" = Option<String>, Header, description = "bytes=START-END, bytes=START- or bytes=-SUFFIX")),
    responses(
        (status = 200, description = "The file", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 304, description = "Unchanged (If-None-Match)"),
        (status = 400, description = "Bad step", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job, checkpoint or file", body = Problem, content_type = "application/problem+json"),
        (status = 416, description = "Range not satisfiable", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn download(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, step, name)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let step: i64 = step.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_step",
            format!("step must be an integer, got {step:?}"),
            "step",
        )
    })?;
    state.tenant_job(&tenant, &id).await?;
    let checkpoint = state
        .store
        .get_checkpoint(&id, step)
        .await?
        .ok_or_else(|| ApiError::not_found("checkpoint at step", &step.to_string()))?;
    let view = CheckpointView::try_from(checkpoint.clone())?;
    // Only names the checkpoint lists are served, so no path can leave its directory.
    let file: &CheckpointFile = view
        .files
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| ApiError::not_found("checkpoint file", &name))?;
    let dir = PathBuf::from(&checkpoint.path);
    let path = dir.join(&file.name);
    check_complete(dir, file.name.clone(), step).await?;
    let meta = tokio::fs::metadata(&path).await.map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("checkpoint file {name} is gone from storage: {}", e.kind()),
        )
    })?;
    let len = meta.len();
    let etag = format!("\"{id}-{step}-{name}-{len}\"");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        == Some(etag.as_str())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(text) => Some(parse_range(text, len).ok_or_else(|| {
            ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("range {text:?} is not within the file's {len} bytes"),
            )
            .param("Range")
        })?),
        None => None,
    };
    let mut fh = tokio::fs::File::open(&path)
        .await
        .map_err(ApiError::internal)?;
    let (status, start, count) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, len),
    };
    fh.seek(SeekFrom::Start(start))
        .await
        .map_err(ApiError::internal)?;
    let body = Body::from_stream(reader_stream(fh.take(count)));
    let mut response = (status, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(response)
}

/// Refuses a file of a checkpoint that is not complete (a file missing or of the wrong size),
/// or that differs from its manifest (a file altered on storage is not the trained one).
async fn check_complete(dir: PathBuf, name: String, step: i64) -> ApiResult<()> {
    let verdict = tokio::task::spawn_blocking(move || {
        let manifest = verify(&dir, false)?;
        match manifest.file(&name) {
            Some(entry) => check_file(&dir, entry, true),
            None if name == MANIFEST => Ok(()),
            None => Err(Incomplete::Missing { name }),
        }
    })
    .await
    .map_err(ApiError::internal)?;
    verdict.map_err(|why| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "checkpoint_incomplete",
            format!("the checkpoint of step {step} is not complete: {why}"),
        )
    })
}

/// One range of `bytes=a-b`, `bytes=a-`, `bytes=-n`, as inclusive `(start, end)` in `len`.
fn parse_range(text: &str, len: u64) -> Option<(u64, u64)> {
    let spec = text.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || len == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            if n == 0 {
                return None;
            }
            (len.saturating_sub(n), len - 1)
        }
        (a, "") => (a.parse().ok()?, len - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(len - 1)),
    };
    (start <= end && start < len).then_some((start, end))
}

/// A file read as a body stream in 64 KiB chunks.
mod file_stream {
    use bytes::Bytes;
    use futures_util::Stream;
    use tokio::io::{AsyncRead, AsyncReadExt};

    pub fn reader_stream<R: AsyncRead + Unpin + Send + 'static>(
        reader: R,
    ) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        futures_util::stream::unfold(reader, |mut reader| async move {
            let mut buf = vec![0u8; 64 * 1024];
            match reader.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), reader))
                }
                Err(e) => Some((Err(e), reader)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_within_the_file() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        for bad in [
            "bytes=100-",
            "bytes=5-2",
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=-0",
            "bytes=x-",
        ] {
            assert_eq!(parse_range(bad, 100), None, "{bad}");
        }
    }
}
