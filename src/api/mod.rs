//! The HTTP API. Until the service issue lands it answers `/healthz` only.

mod health;

use axum::Router;
use tokio::net::TcpListener;

/// All routes of the service.
pub fn router() -> Router {
    Router::new().merge(health::routes())
}

/// Serves the API on an already bound listener until `shutdown` resolves. Tests call this on
/// port 0.
pub async fn launch_with_listener(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}
