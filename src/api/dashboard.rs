//! `GET /`: the web dashboard, plain ES modules and CSS compiled into the binary
//! (assets/dashboard, with uPlot vendored in assets/uplot), so it works with no network. The
//! page talks to `/v1` with the key the user types; these files themselves carry no data.

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::problem::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { asset("index.html") }))
        .route(
            "/dashboard/{name}",
            get(|Path(name): Path<String>| async move { asset(&name) }),
        )
}

/// Every file the page loads: name, content type, bytes.
static ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/dashboard/index.html"),
    ),
    (
        "app.css",
        "text/css",
        include_bytes!("../../assets/dashboard/app.css"),
    ),
    (
        "app.js",
        JS,
        include_bytes!("../../assets/dashboard/app.js"),
    ),
    (
        "api.js",
        JS,
        include_bytes!("../../assets/dashboard/api.js"),
    ),
    (
        "dom.js",
        JS,
        include_bytes!("../../assets/dashboard/dom.js"),
    ),
    (
        "format.js",
        JS,
        include_bytes!("../../assets/dashboard/format.js"),
    ),
    (
        "json_path.js",
        JS,
        include_bytes!("../../assets/dashboard/json_path.js"),
    ),
    (
        "charts.js",
        JS,
        include_bytes!("../../assets/dashboard/charts.js"),
    ),
    (
        "jobs.js",
        JS,
        include_bytes!("../../assets/dashboard/jobs.js"),
    ),
    (
        "job.js",
        JS,
        include_bytes!("../../assets/dashboard/job.js"),
    ),
    (
        "job_charts.js",
        JS,
        include_bytes!("../../assets/dashboard/job_charts.js"),
    ),
    (
        "job_plan.js",
        JS,
        include_bytes!("../../assets/dashboard/job_plan.js"),
    ),
    (
        "job_records.js",
        JS,
        include_bytes!("../../assets/dashboard/job_records.js"),
    ),
    (
        "new_job.js",
        JS,
        include_bytes!("../../assets/dashboard/new_job.js"),
    ),
    (
        "cluster.js",
        JS,
        include_bytes!("../../assets/dashboard/cluster.js"),
    ),
    (
        "uPlot.esm.js",
        JS,
        include_bytes!("../../assets/uplot/uPlot.esm.js"),
    ),
    (
        "uPlot.min.css",
        "text/css",
        include_bytes!("../../assets/uplot/uPlot.min.css"),
    ),
];

const JS: &str = "text/javascript";

/// Scripts and styles only from this origin; the plan SVG and downloads come as blob URLs.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; \
                   connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(name: &str) -> Response {
    let Some((_, content_type, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the dashboard has no file {name:?}"),
        )
        .into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *content_type),
            // The files change with the binary; revalidating keeps an upgraded page consistent.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        *bytes,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_served() {
        let served: Vec<&str> = ASSETS.iter().map(|(n, _, _)| *n).collect();
        for (name, _, bytes) in ASSETS.iter().filter(|(_, t, _)| *t == JS) {
            let text = std::str::from_utf8(bytes).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let target = line
                    .rsplit_once("from \"./")
                    .map(|(_, rest)| rest.trim_end_matches("\";"))
                    .unwrap_or_else(|| panic!("{name}: import not from ./: {line}"));
                assert!(
                    served.contains(&target),
                    "{name} imports {target}, not served"
                );
            }
        }
    }

    #[test]
    fn an_unknown_file_is_a_problem_404() {
        let response = asset("../Cargo.toml");
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
