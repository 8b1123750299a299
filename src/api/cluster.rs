//! `GET /v1/devices` (the cluster's devices by worker and the job on each, and the measured
//! links between its machines) and `GET /v1/queue`.

use std::collections::HashMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;
use super::auth::Tenant;
use super::problem::{ApiResult, Problem};
use super::views::{DeviceList, DeviceView, LinkView, QueueEntry, QueueView};
use crate::store::StoreError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices", get(devices))
        .route("/queue", get(queue))
}

/// The cluster's devices by worker, and the job holding each (named when it is yours).
///
/// This service's own devices come first (those it was started with, and its embedded
/// worker's jobs on them), then every other live worker's, in worker id order.
///
/// `host_memory_bytes`: the host memory this service's jobs may offload to. `links`: the
/// links between machines as ranks of jobs spanning them measured them.
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
    let cluster = state.store.cluster_devices().await?;
    let local_host = cluster
        .iter()
        .find(|row| Some(&row.worker_id) == state.worker_id.as_ref())
        .map(|row| row.host.clone());
    let mut yours = Visible::new(&state, &tenant);
    let mut data = Vec::with_capacity(state.devices.len() + cluster.len());
    for device in &state.devices {
        let job = used
            .iter()
            .find(|(d, _)| d == &device.id)
            .map(|(_, job)| job.clone());
        data.push(DeviceView {
            id: device.id.clone(),
            kind: device.kind.clone(),
            memory_bytes: device.memory_bytes,
            in_use: job.is_some(),
            job: yours.only_yours(job).await?,
            worker: state.worker_id.clone(),
            host: local_host.clone(),
        });
    }
    let others = cluster
        .into_iter()
        .filter(|row| Some(&row.worker_id) != state.worker_id.as_ref());
    for row in others {
        data.push(DeviceView {
            id: row.device_id,
            kind: row.kind,
            memory_bytes: row.memory_bytes.max(0) as u64,
            in_use: row.job_id.is_some(),
            job: yours.only_yours(row.job_id).await?,
            worker: Some(row.worker_id),
            host: Some(row.host),
        });
    }
    let links = state.store.network_links().await?;
    Ok(Json(DeviceList {
        object: "list",
        data,
        has_more: false,
        host_memory_bytes: state.host_memory_bytes,
        links: links.into_iter().map(LinkView::from).collect(),
    }))
}

/// Which jobs are the tenant's, each asked of the store once.
struct Visible<'a> {
    state: &'a AppState,
    tenant: &'a str,
    known: HashMap<String, bool>,
}

impl<'a> Visible<'a> {
    fn new(state: &'a AppState, tenant: &'a str) -> Self {
        Visible {
            state,
            tenant,
            known: HashMap::new(),
        }
    }

    /// `job` when it is the tenant's, else `None`.
    async fn only_yours(&mut self, job: Option<String>) -> Result<Option<String>, StoreError> {
        let Some(job) = job else { return Ok(None) };
        let yours = match self.known.get(&job) {
            Some(&yours) => yours,
            None => {
                let yours = self.state.store.get_job(self.tenant, &job).await?.is_some();
                self.known.insert(job.clone(), yours);
                yours
            }
        };
        Ok(yours.then_some(job))
    }
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
