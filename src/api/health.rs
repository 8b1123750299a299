//! Liveness: the process is up and serving requests.

use axum::{Json, Router, routing::get};
use serde_json::{Value, json};

pub fn routes() -> Router {
    Router::new().route("/healthz", get(healthz))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}
