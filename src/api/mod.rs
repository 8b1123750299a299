//! The HTTP API: `/v1` resources (one handler file each), problem+json errors, Bearer-key
//! auth with per-key rate limits, the OpenAPI document and Swagger UI, the web dashboard at
//! `/`, health and Prometheus.

mod auth;
mod checkpoints;
mod cluster;
mod dashboard;
mod docs;
mod events;
mod extract;
mod files;
mod health;
mod job_actions;
mod job_metrics;
mod jobs;
mod plans;
mod problem;
mod prometheus;
mod views;

pub use auth::{bootstrap_key, create_key, generate_key, hash_key};
pub use docs::ApiDoc;
pub use problem::{ApiError, Problem};

use std::collections::HashMap;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::jobs::{DeviceInfo, Planner};
use crate::store::Store;

/// Request limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// JSON request bodies.
    pub max_body_bytes: usize,
    /// One uploaded file (a model's `config.json` part counts too).
    pub max_upload_bytes: u64,
    /// Per API key.
    pub rate_per_second: f64,
    pub rate_burst: f64,
    /// Server-Sent Events comment sent when idle.
    pub keep_alive: Duration,
    /// How many times a job created here may be requeued after its run was lost before it
    /// fails (`serve --max-restarts`).
    pub max_restarts: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_upload_bytes: 4 << 30,
            rate_per_second: 100.0,
            rate_burst: 200.0,
            keep_alive: Duration::from_secs(15),
            max_restarts: crate::store::DEFAULT_MAX_RESTARTS,
        }
    }
}

/// What handlers share.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub planner: Option<Arc<dyn Planner>>,
    /// Why jobs are refused, when this service cannot run them.
    pub refuse_jobs: Option<String>,
    pub devices: Vec<DeviceInfo>,
    /// The host memory jobs' offloaded tensors may take (`--host-memory`).
    pub host_memory_bytes: u64,
    /// The embedded worker, whose jobs `GET /v1/devices` shows.
    pub worker_id: Option<String>,
    pub data_dir: PathBuf,
    pub limits: Limits,
    /// Turns true when the service stops: event streams end.
    pub shutdown: watch::Receiver<bool>,
    keys: Mutex<HashMap<String, String>>,
    rate: auth::RateLimiter,
    requests: prometheus::RequestMetrics,
}

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct AppConfig {
    pub planner: Option<Arc<dyn Planner>>,
    pub refuse_jobs: Option<String>,
    pub devices: Vec<DeviceInfo>,
    pub host_memory_bytes: u64,
    pub worker_id: Option<String>,
    pub data_dir: PathBuf,
    pub limits: Limits,
    pub shutdown: watch::Receiver<bool>,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, config: AppConfig) -> AppState {
        AppState(Arc::new(Shared {
            store,
            planner: config.planner,
            refuse_jobs: config.refuse_jobs,
            devices: config.devices,
            host_memory_bytes: config.host_memory_bytes,
            worker_id: config.worker_id,
            data_dir: config.data_dir,
            rate: auth::RateLimiter::new(config.limits.rate_per_second, config.limits.rate_burst),
            limits: config.limits,
            shutdown: config.shutdown,
            keys: Mutex::new(HashMap::new()),
            requests: prometheus::RequestMetrics::default(),
        }))
    }

    /// The tenant's job `id`; another tenant's job is as absent as a missing one (404).
    pub(crate) async fn tenant_job(
        &self,
        tenant: &str,
        id: &str,
    ) -> problem::ApiResult<crate::store::JobRow> {
        self.store
            .get_job(tenant, id)
            .await?
            .ok_or_else(|| problem::ApiError::not_found("job", id))
    }
}

/// All routes of the service.
pub fn router(state: AppState) -> Router {
    let max_body = state.limits.max_body_bytes;
    let v1 = Router::new()
        .merge(files::routes(&state))
        .merge(jobs::routes())
        .merge(job_actions::routes())
        .merge(plans::routes())
        .merge(events::routes())
        .merge(job_metrics::routes())
        .merge(checkpoints::routes())
        .merge(cluster::routes());
    Router::new()
        .nest("/v1", v1)
        .merge(health::routes())
        .merge(prometheus::routes())
        .merge(docs::routes())
        .merge(dashboard::routes())
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            prometheus::record_latency,
        ))
        .with_state(state)
}

/// Serves the API on an already bound listener until `shutdown` resolves. Tests call this on
/// port 0.
pub async fn launch_with_listener(
    state: AppState,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
