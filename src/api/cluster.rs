//! `GET /v1/devices` (the devices given at launch and the job on each) and `GET /v1/queue`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;
use super::auth::Tenant;
use super::problem::{ApiResult, Problem};
use super::views::{DeviceList, DeviceView, QueueEntry, QueueView};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices", get(devices))
        .route("/queue", get(queue))
}

/// This service's devices: id, kind, memory, and the job using each (named when it is yours);
/// and the host memory their jobs may offload to.
#[utoipa::path(get, path = "/v1/devices", tag = "cluster",
    responses(
        (status = 200, body = DeviceList),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn devices(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> ApiResult<Json<DeviceList>> {
    let used = match &state.worker_id {
        Some(worker) => state.store.devices_in_use(worker).await?,
        None => Vec::new(),
    };
    let mut data = Vec::with_capacity(state.devices.len());
    for device in &state.devices {
        let job = used
            .iter()
            .find(|(d, _)| d == &device.id)
            .map(|(_, job)| job.clone());
        let visible = match &job {
            Some(job) => state
                .store
                .get_job(&tenant, job)
                .await?
                .map(|_| job.clone()),
            None => None,
        };
        data.push(DeviceView {
            id: device.id.clone(),
            kind: device.kind.clone(),
            memory_bytes: device.memory_bytes,
            in_use: job.is_some(),
            job: visible,
        });
    }
    Ok(Json(DeviceList {
        object: "list",
        data,
        has_more: false,
        host_memory_bytes: state.host_memory_bytes,
    }))
}

/// The queue in claim order (first 100): positions of all tenants' jobs, ids of yours.
#[utoipa::path(get, path = "/v1/queue", tag = "cluster",
    responses(
        (status = 200, body = QueueView),
        (status = 401, description = "Missing or unknown API key", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Rate limited; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn queue(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
) -> ApiResult<Json<QueueView>> {
    let queued = state.store.queued_jobs(100).await?;
    let length = state
        .store
        .job_totals()
        .await?
        .by_state
        .iter()
        .find(|(s, _)| s == "queued")
        .map_or(0, |(_, n)| *n);
    let data = queued
        .into_iter()
        .enumerate()
        .map(|(i, job)| QueueEntry {
            position: i as i64 + 1,
            job: (job.tenant_id == tenant).then_some(job.id),
            devices_needed: job.devices_needed,
        })
        .collect();
    Ok(Json(QueueView {
        object: "queue",
        length,
        data,
    }))
}
