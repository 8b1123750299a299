//! `POST /v1/plans`: the plan a job body would get, without creating a job; and the planning
//! step `POST /v1/jobs` shares with it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::auth::Tenant;
use super::extract::Body;
use super::problem::{ApiError, ApiResult, Problem};
use crate::jobs::gang_plan::cluster_for_new_jobs;
use crate::jobs::{
    DeviceInfo, PlanFailure, PlanOutcome, PlanSummary, Planner, ResolveError, ResolvedSpec,
    parse_devices, resolve_files,
};
use crate::spec::{JobSpec, SpecError};

pub fn routes() -> Router<AppState> {
    Router::new().route("/plans", post(create))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    /// Always `plan`.
    pub object: &'static str,
    pub summary: PlanSummary,
    /// The whole plan: per-device programs, as the planner renders it.
    pub plan: serde_json::Value,
}

/// Parses and validates a job body and resolves its file ids (400 / 422 on problems).
pub(super) async fn checked_spec(
    state: &AppState,
    tenant: &str,
    body: &[u8],
) -> ApiResult<(JobSpec, ResolvedSpec)> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("body is not UTF-8: {e}"), "")
    })?;
    let spec = JobSpec::from_json(text).map_err(|e| {
        let first = e.first();
        ApiError::bad_request("invalid_json", first.message.clone(), &first.param)
    })?;
    spec.validate().map_err(ApiError::invalid_spec)?;
    let resolved = match resolve_files(state.store.as_ref(), tenant, &spec).await {
        Ok(resolved) => resolved,
        Err(ResolveError::Invalid(invalid)) => return Err(ApiError::invalid_spec(invalid)),
        Err(ResolveError::Store(e)) => return Err(e.into()),
    };
    Ok((spec, resolved))
}

/// The devices a job body is planned on: those it names (CPU devices may be any size, they
/// are the plan's budget; GPUs must be the service's own, whose memory it measured); else, on
/// a cluster of several workers of CPU devices only or of GPUs only, all of theirs (a job too
/// big for one worker is planned again over the free ones when it is reserved); else the
/// service's own.
pub(super) async fn job_devices(state: &AppState, spec: &JobSpec) -> ApiResult<Vec<DeviceInfo>> {
    if spec.devices.is_none()
        && let Some(cluster) = cluster_for_new_jobs(&state.store.cluster_devices().await?)
    {
        return Ok(cluster.devices);
    }
    named_devices(state, spec)
}

fn named_devices(state: &AppState, spec: &JobSpec) -> ApiResult<Vec<DeviceInfo>> {
    let invalid = |message: String| {
        ApiError::invalid_spec(crate::spec::InvalidSpec(vec![SpecError::new(
            "devices", message,
        )]))
    };
    let Some(text) = &spec.devices else {
        return Ok(state.devices.clone());
    };
    let asked = parse_devices(text).map_err(|e| invalid(e.to_string()))?;
    asked
        .into_iter()
        .map(|d| {
            if d.kind == "cpu" {
                return Ok(d);
            }
            if d.memory_bytes > 0 {
                return Err(invalid(format!(
                    "a job runs within the memory the service gives {} (`serve --devices \
                     cuda@SIZE` sets it); name the GPU without `@SIZE`",
                    d.id
                )));
            }
            state
                .devices
                .iter()
                .find(|own| own.id == d.id)
                .cloned()
                .ok_or_else(|| {
                    let own: Vec<&str> = state.devices.iter().map(|o| o.id.as_str()).collect();
                    invalid(format!(
                        "this service has no GPU {}; its devices are {}",
                        d.id,
                        own.join(", ")
                    ))
                })
        })
        .collect()
}

pub(super) fn planner(state: &AppState) -> ApiResult<Arc<dyn Planner>> {
    state.planner.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "planner_unavailable",
            "this build of the service has no planner plugged in; plans and jobs cannot be made",
        )
    })
}

/// Runs the planner on a blocking thread.
pub(super) async fn run_planner(
    planner: Arc<dyn Planner>,
    spec: JobSpec,
    devices: Vec<DeviceInfo>,
    host_memory_bytes: u64,
) -> Result<PlanOutcome, PlanFailure> {
    tokio::task::spawn_blocking(move || planner.plan(&spec, &devices, host_memory_bytes))
        .await
        .unwrap_or_else(|e| Err(PlanFailure::Internal(format!("the planner panicked: {e}"))))
}

/// Plan a job body without creating a job.
#[utoipa::path(post, path = "/v1/plans", tag = "plans", request_body = JobSpec,
    responses(
        (status = 200, body = PlanView),
        (status = 400, description = "Malformed JSON or unknown field", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body, unknown file, or no plan fits the devices (then with smallest_memory_bytes and closest)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No planner in this build", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Body(body): Body,
) -> ApiResult<Json<PlanView>> {
    let (spec, resolved) = checked_spec(&state, &tenant, &body).await?;
    let devices = job_devices(&state, &spec).await?;
    let planner = planner(&state)?;
    match run_planner(planner, resolved.spec, devices, state.host_memory_bytes).await {
        Ok(outcome) => Ok(Json(PlanView {
            object: "plan",
            summary: outcome.summary,
            plan: outcome.plan,
        })),
        Err(failure) => Err(plan_problem(failure)),
    }
}

pub(super) fn plan_problem(failure: PlanFailure) -> ApiError {
    match failure {
        PlanFailure::DoesNotFit {
            message,
            smallest_memory_bytes,
            closest,
        } => {
            let mut e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "plan_does_not_fit",
                message,
            )
            .param("devices");
            e.problem.smallest_memory_bytes = Some(smallest_memory_bytes);
            e.problem.closest = Some(closest);
            e
        }
        PlanFailure::Invalid(invalid) => ApiError::invalid_spec(invalid),
        PlanFailure::Unavailable(why) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "planner_unavailable", why)
        }
        PlanFailure::Internal(why) => ApiError::internal(why),
    }
}
