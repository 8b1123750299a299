//! `GET /metrics` in the Prometheus text format: jobs by state, queue length, steps and tokens
//! trained (from the store, so every worker counts), and this process's request latencies.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::problem::{ApiResult, Problem};
use crate::store::state::ALL_STATES;

const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Latency histograms keyed by (method, route template, status).
#[derive(Default)]
pub struct RequestMetrics(Mutex<BTreeMap<(String, String, u16), Histogram>>);

impl RequestMetrics {
    fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let h = map
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    fn render(&self, out: &mut String) {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str("# HELP chronospipe_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE chronospipe_http_request_duration_seconds histogram\n");
        for ((method, route, status), h) in map.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
            for (bound, n) in BUCKETS.iter().zip(h.buckets) {
                let _ = writeln!(
                    out,
                    "chronospipe_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "chronospipe_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "chronospipe_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "chronospipe_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
    }
}

/// Middleware: times each request under its route template (not its concrete path).
pub async fn record_latency(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    state.requests.observe(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 500, description = "The database does not answer", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn metrics(State(state): State<AppState>) -> ApiResult<Response> {
    let totals = state.store.job_totals().await?;
    let mut out = String::new();
    out.push_str("# HELP chronospipe_jobs Jobs by state.\n# TYPE chronospipe_jobs gauge\n");
    for s in ALL_STATES {
        let n = totals
            .by_state
            .iter()
            .find(|(name, _)| name == s.as_str())
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "chronospipe_jobs{{state=\"{s}\"}} {n}");
    }
    let queued = totals
        .by_state
        .iter()
        .find(|(name, _)| name == "queued")
        .map_or(0, |(_, n)| *n);
    let _ = writeln!(
        out,
        "# HELP chronospipe_queue_length Jobs waiting for devices.\n# TYPE chronospipe_queue_length gauge\nchronospipe_queue_length {queued}"
    );
    let _ = writeln!(
        out,
        "# HELP chronospipe_steps_total Training steps recorded.\n# TYPE chronospipe_steps_total counter\nchronospipe_steps_total {}",
        totals.steps
    );
    let _ = writeln!(
        out,
        "# HELP chronospipe_tokens_total Tokens trained.\n# TYPE chronospipe_tokens_total counter\nchronospipe_tokens_total {}",
        totals.tokens
    );
    state.requests.render(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
