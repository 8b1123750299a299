//! `POST /v1/jobs/{id}/cancel`, `/pause`, `/resume`. A running job is asked (`cancelling`,
//! `pausing`) and its worker acts within one step; a job off the devices changes at once.

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};

use super::AppState;
use super::auth::Tenant;
use super::jobs::view;
use super::problem::{ApiError, ApiResult, Problem};
use super::views::JobView;
use crate::store::{JobState, TransitionChange};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs/{id}/cancel", post(cancel))
        .route("/jobs/{id}/pause", post(pause))
        .route("/jobs/{id}/resume", post(resume))
}

#[derive(Clone, Copy)]
enum Action {
    Cancel,
    Pause,
    Resume,
}

fn target(action: Action, from: JobState) -> Option<JobState> {
    use JobState::*;
    match (action, from) {
        (Action::Cancel, Running | Pausing) => Some(Cancelling),
        (Action::Cancel, Validating | Queued | Paused) => Some(Cancelled),
        (Action::Pause, Running) => Some(Pausing),
        (Action::Pause, Queued) => Some(Paused),
        (Action::Resume, Paused) => Some(Queued),
        _ => None,
    }
}

async fn act(
    state: AppState,
    tenant: String,
    id: String,
    action: Action,
    verb: &str,
) -> ApiResult<Json<JobView>> {
    let job = state.tenant_job(&tenant, &id).await?;
    let from = job.job_state()?;
    let to = target(action, from).ok_or_else(|| {
        ApiError::conflict(
            "invalid_state",
            format!("job {id} is {from} and cannot be {verb}"),
        )
    })?;
    let change = TransitionChange {
        message: Some(format!("{verb} on request")),
        ..TransitionChange::default()
    };
    let job = state.store.transition(&id, to, change).await?;
    Ok(Json(view(&state, job).await?))
}

/// Cancel a job. A running one stops at its next step boundary.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses(
        (status = 200, body = JobView),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job has finished", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    act(state, tenant, id, Action::Cancel, "cancelled").await
}

/// Pause a job: a running one checkpoints and frees its devices.
#[utoipa::path(post, path = "/v1/jobs/{id}/pause", tag = "jobs", params(("id" = String, Path)),
    responses(
        (status = 200, body = JobView),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is not queued or running", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    act(state, tenant, id, Action::Pause, "paused").await
}

/// Resume a paused job: it is queued and continues from its latest checkpoint.
#[utoipa::path(post, path = "/v1/jobs/{id}/resume", tag = "jobs", params(("id" = String, Path)),
    responses(
        (status = 200, body = JobView),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is not paused", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    act(state, tenant, id, Action::Resume, "resumed").await
}
