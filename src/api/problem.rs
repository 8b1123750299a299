//! Errors as RFC 9457 `application/problem+json`, with `code` (stable, machine-readable) and
//! `param` (the JSON path of the field at fault) so clients can point at it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::spec::{InvalidSpec, SpecError};
use crate::store::StoreError;

/// An error response body.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:chronospipe:problem:CODE`.
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable reason, e.g. `invalid_spec`, `not_found`, `rate_limited`.
    pub code: String,
    /// JSON path of the request field at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// Every problem found in a job body, when there are several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<SpecError>>,
    /// For `plan_does_not_fit`: the least memory per device with which a plan would fit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smallest_memory_bytes: Option<u64>,
    /// For `plan_does_not_fit`: the configuration that comes closest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closest: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub problem: Box<Problem>,
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            problem: Box::new(Problem {
                problem_type: format!("urn:chronospipe:problem:{code}"),
                title: status.canonical_reason().unwrap_or("Error").to_owned(),
                status: status.as_u16(),
                detail: detail.into(),
                code: code.to_owned(),
                param: None,
                errors: None,
                smallest_memory_bytes: None,
                closest: None,
            }),
            retry_after: None,
        }
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.problem.param = Some(param.into());
        self
    }

    pub fn bad_request(code: &str, detail: impl Into<String>, param: &str) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail).param(param)
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} {id:?}"),
        )
    }

    pub fn conflict(code: &str, detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn too_large(limit: u64, what: &str) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("{what} is larger than the limit of {limit} bytes"),
        )
    }

    /// The cause goes to the log, not to the client: it may name the server's paths.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the service failed; its log has the cause",
        )
    }

    /// A failed file write: 507 when the storage is full (no space, read-only, quota).
    pub fn storage(error: std::io::Error) -> Self {
        if crate::exec::checkpoint::is_storage_full(&error) {
            tracing::error!(%error, "storage full");
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                format!(
                    "the service's storage cannot take this ({}); nothing was kept",
                    error.kind()
                ),
            )
        } else {
            ApiError::internal(error)
        }
    }

    /// 422 with every problem of a job body; `param` is the first.
    pub fn invalid_spec(invalid: InvalidSpec) -> Self {
        let first = invalid.first().clone();
        let mut e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_spec",
            invalid.to_string(),
        )
        .param(first.param);
        e.problem.errors = Some(invalid.0);
        e
    }
}

/// How long a client waits before asking again while the database is away.
pub const DATABASE_RETRY_AFTER_S: u64 = 2;

impl ApiError {
    /// 503 with `Retry-After`: the database is away; the request may be repeated as it is.
    pub fn database_unavailable(error: impl std::fmt::Display) -> Self {
        tracing::warn!(%error, "database unavailable");
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "database_unavailable",
            "the service's database does not answer; try again shortly",
        );
        e.retry_after = Some(DATABASE_RETRY_AFTER_S);
        e
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_transient() {
            return ApiError::database_unavailable(e);
        }
        match e {
            StoreError::JobNotFound(id) => ApiError::not_found("job", &id),
            StoreError::Transition(t) => ApiError::conflict("invalid_state", t.to_string()),
            StoreError::FileInUse { .. } => ApiError::conflict("file_in_use", e.to_string()),
            StoreError::CheckpointGone { .. } => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_spec",
                e.to_string(),
            )
            .param("model.init.from"),
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
