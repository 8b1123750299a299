//! `/v1/jobs`: create (with `Idempotency-Key`), list, retrieve, and the chosen plan.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::IntoParams;

use super::AppState;
use super::auth::Tenant;
use super::extract::{ApiQuery, Body, page, page_limit, unknown_cursor};
use super::plans::{checked_spec, job_devices, planner, run_planner};
use super::problem::{ApiError, ApiResult, Problem};
use super::views::{JobList, JobView};
use crate::exec::run::count_steps;
use crate::jobs::{PlanFailure, RunFailure};
use crate::spec::JobSpec;
use crate::store::{Inserted, JobRow, JobState, NewJob, PlanRow, Planned, new_id};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs", get(list).post(create))
        .route("/jobs/{id}", get(retrieve))
        .route("/jobs/{id}/plan", get(plan_json))
        .route("/jobs/{id}/plan.svg", get(plan_svg))
}

pub(super) async fn view(state: &AppState, job: JobRow) -> ApiResult<JobView> {
    let position = if job.state == JobState::Queued.as_str() {
        Some(state.store.queue_position(&job.id).await?)
    } else {
        None
    };
    Ok(JobView::new(job, position)?)
}

/// Create a job. It is planned at once and queued, or failed with the reason.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSpec,
    params(("Idempotency-Key" = Option<String>, Header, description = "Same key and body: the same job; same key, other body: 422")),
    responses(
        (status = 201, description = "Created", body = JobView),
        (status = 200, description = "The job an earlier request with this Idempotency-Key created", body = JobView),
        (status = 400, description = "Malformed JSON, unknown field or bad header", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body, unknown file, or Idempotency-Key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "This build cannot plan or run jobs", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<(StatusCode, Json<JobView>)> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_owned()),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_idempotency_key",
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                    "Idempotency-Key",
                ));
            }
        },
    };
    if let Some(reason) = &state.refuse_jobs {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "jobs_unavailable",
            reason.clone(),
        ));
    }
    let (spec, resolved) = checked_spec(&state, &tenant, &body).await?;
    let devices = job_devices(&state, &spec).await?;
    let total_steps = total_steps(&resolved.spec).await?;
    let planner = planner(&state)?;
    let canonical = serde_json::to_string(&spec).map_err(ApiError::internal)?;
    // The body as sent decides idempotency; the stored body pins the checkpoint it starts from.
    let request_hash = hex::encode(Sha256::digest(canonical.as_bytes()));
    let stored = serde_json::to_string(&resolved.pinned(&spec)).map_err(ApiError::internal)?;
    // Planning is pure and quick: done first, so the job, its plan and its first states are
    // written in one transaction.
    let planned = match run_planner(planner, resolved.spec, devices, state.host_memory_bytes).await
    {
        Ok(outcome) => Planned::Queued {
            devices_needed: outcome.summary.devices as i64,
            plan: PlanRow {
                plan: Some(outcome.plan.to_string()),
                plan_svg: Some(outcome.svg),
                plan_summary: Some(
                    serde_json::to_string(&outcome.summary).map_err(ApiError::internal)?,
                ),
            },
        },
        Err(failure) => Planned::Failed {
            error: serde_json::to_string(&plan_failure(failure)).map_err(ApiError::internal)?,
        },
    };
    let new = NewJob {
        id: new_id("job"),
        tenant_id: tenant,
        total_steps: total_steps as i64,
        request_hash: Some(request_hash),
        spec: stored,
        file_ids: resolved.file_ids,
        checkpoint_uses: resolved.checkpoint_use.into_iter().collect(),
        idempotency_key: key,
        planned: Some(planned),
        max_restarts: Some(state.limits.max_restarts),
    };
    let job = match state.store.insert_job(&new).await? {
        Inserted::Existing(job) if job.request_hash == new.request_hash => {
            return Ok((StatusCode::OK, Json(view(&state, job).await?)));
        }
        Inserted::Existing(job) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!(
                    "this Idempotency-Key created job {} with a different body",
                    job.id
                ),
            )
            .param("Idempotency-Key"));
        }
        Inserted::Created(job) => job,
    };
    Ok((StatusCode::CREATED, Json(view(&state, job).await?)))
}

/// The job's optimizer steps: `training.steps`, or what its `training.epochs` come to over
/// the training data. Its training and validation data are read and cut into windows as the
/// run will (on a blocking thread), so data the run could not train on is a 422 naming the
/// field now, not a failure when the job starts.
async fn total_steps(spec: &JobSpec) -> ApiResult<u64> {
    let owned = spec.clone();
    let counted = tokio::task::spawn_blocking(move || count_steps(&owned))
        .await
        .map_err(ApiError::internal)?;
    counted.map_err(|e| {
        let blame = e.blame();
        if !blame.user {
            return ApiError::internal(e);
        }
        let error = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, blame.code, e.to_string());
        match blame.param {
            Some(param) => error.param(param),
            None => error,
        }
    })
}

fn plan_failure(failure: PlanFailure) -> RunFailure {
    match failure {
        PlanFailure::DoesNotFit {
            message,
            smallest_memory_bytes,
            ..
        } => RunFailure::user(
            "plan_does_not_fit",
            format!(
                "{message} (smallest memory per device that fits: {smallest_memory_bytes} bytes)"
            ),
            Some("devices"),
        ),
        PlanFailure::Invalid(invalid) => {
            let first = invalid.first();
            RunFailure::user("invalid_spec", first.message.clone(), Some(&first.param))
        }
        PlanFailure::Unavailable(why) => RunFailure::service("planner_unavailable", why),
        PlanFailure::Internal(why) => RunFailure::service("planner_failed", why),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Return jobs created before this job id (the last id of the previous page).
    pub after: Option<String>,
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
    /// Only jobs in this state.
    pub status: Option<String>,
}

/// List your jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses(
        (status = 200, body = JobList),
        (status = 400, description = "Bad limit, cursor or status", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<JobList>> {
    let limit = page_limit(query.limit)?;
    let status = query
        .status
        .as_deref()
        .map(JobState::parse)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_status", e.to_string(), "status"))?;
    if let Some(after) = &query.after
        && state.store.get_job(&tenant, after).await?.is_none()
    {
        return Err(unknown_cursor("job", after));
    }
    let rows = state
        .store
        .list_jobs(&tenant, query.after.as_deref(), status, limit + 1)
        .await?;
    let (rows, has_more) = page(rows, limit);
    let queued: Vec<&str> = rows
        .iter()
        .filter(|r| r.state == JobState::Queued.as_str())
        .map(|r| r.id.as_str())
        .collect();
    let mut positions = if queued.is_empty() {
        Vec::new()
    } else {
        state.store.queue_positions(&queued).await?
    }
    .into_iter();
    let mut data = Vec::with_capacity(rows.len());
    for row in rows {
        let position = (row.state == JobState::Queued.as_str())
            .then(|| positions.next())
            .flatten();
        data.push(JobView::new(row, position)?);
    }
    Ok(Json(JobList::new(data, has_more)))
}

/// One job: spec, plan summary, progress, latest metrics, queue position, error.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses(
        (status = 200, body = JobView),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn retrieve(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let job = state.tenant_job(&tenant, &id).await?;
    Ok(Json(view(&state, job).await?))
}

async fn stored_plan(state: &AppState, tenant: &str, id: &str) -> ApiResult<PlanRow> {
    let plan = state
        .store
        .get_plan(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))?;
    if plan.plan.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_planned",
            format!("job {id} has no plan (it failed before planning)"),
        ));
    }
    Ok(plan)
}

/// The job's plan as JSON (per-device programs).
#[utoipa::path(get, path = "/v1/jobs/{id}/plan", tag = "jobs", params(("id" = String, Path)),
    responses(
        (status = 200, description = "The planner's JSON rendering", body = serde_json::Value),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours, or not planned", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn plan_json(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let plan = stored_plan(&state, &tenant, &id).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        plan.plan.unwrap_or_default(),
    )
        .into_response())
}

/// The job's schedule drawn as SVG.
#[utoipa::path(get, path = "/v1/jobs/{id}/plan.svg", tag = "jobs", params(("id" = String, Path)),
    responses(
        (status = 200, description = "SVG image", body = String, content_type = "image/svg+xml"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours, or not planned", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn plan_svg(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let plan = stored_plan(&state, &tenant, &id).await?;
    Ok((
        [(header::CONTENT_TYPE, "image/svg+xml")],
        plan.plan_svg.unwrap_or_default(),
    )
        .into_response())
}
