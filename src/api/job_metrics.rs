//! `GET /v1/jobs/{id}/metrics`: each step's loss, learning rate, grad norm, throughput, step
//! time and per-device measured peak bytes.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::auth::Tenant;
use super::extract::{ApiQuery, page, page_limit};
use super::problem::{ApiResult, Problem};
use super::views::{MetricList, MetricView};

pub fn routes() -> Router<AppState> {
    Router::new().route("/jobs/{id}/metrics", get(list))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Steps after this one (default 0: from the first).
    pub after_step: Option<i64>,
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
}

/// Step metrics in step order.
#[utoipa::path(get, path = "/v1/jobs/{id}/metrics", tag = "jobs", params(("id" = String, Path), MetricsQuery),
    responses(
        (status = 200, body = MetricList),
        (status = 400, description = "Bad limit or after_step", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job of yours", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> ApiResult<Json<MetricList>> {
    let limit = page_limit(query.limit)?;
    state.tenant_job(&tenant, &id).await?;
    let rows = state
        .store
        .list_metrics(&id, query.after_step.unwrap_or(0), limit + 1)
        .await?;
    let (rows, has_more) = page(rows, limit);
    let data = rows
        .into_iter()
        .map(MetricView::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(MetricList::new(data, has_more)))
}
