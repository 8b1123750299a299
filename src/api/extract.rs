//! Extractors whose rejections are problem+json: a JSON body under the size limit, a query
//! string, list cursors.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::problem::ApiError;

/// The raw body, refused with 413 above `Limits::max_body_bytes` (set as the router's
/// `DefaultBodyLimit`).
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request body too large: {}", rejection.body_text()),
                ))
            }
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_body",
                rejection.body_text(),
                "",
            )),
        }
    }
}

/// A query string; a bad value is a 400 naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match Query::<T>::try_from_uri(&parts.uri) {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => {
                let text = rejection.body_text();
                let param = text.split('`').nth(1).unwrap_or("").to_owned();
                Err(ApiError::bad_request("invalid_query", text, &param))
            }
        }
    }
}

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

/// `limit` in 1..=100, default 20.
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit must be between 1 and {MAX_LIMIT}, got {n}"),
            "limit",
        )),
    }
}

/// The error for an `after` cursor that names no `kind` (job, file) of the caller's.
pub fn unknown_cursor(kind: &str, after: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_cursor",
        format!("no {kind} {after:?} to list after"),
        "after",
    )
}

/// Splits a `limit + 1` fetch into the page and `has_more`.
pub fn page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    (rows, has_more)
}
