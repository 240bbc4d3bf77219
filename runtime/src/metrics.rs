//! Prometheus metrics over HTTP, shared by the coordinator and the agent.
//!
//! Each binary keeps its metrics in a `prometheus_client` [`Registry`] and exposes it on
//! `/metrics` as OpenMetrics text (which Prometheus scrapes natively, and which is Prometheus
//! text format plus a closing `# EOF`), next to a `/healthz` probe. [`serve`] runs an axum
//! router until the process's shutdown token fires, so the HTTP side drains with the rest.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{encoding::text, registry::Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Content type of the exposition [`encode`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry's metrics as OpenMetrics text; fails only if a collector fails.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    text::encode(&mut out, registry)?;
    Ok(out)
}

/// An HTTP answer with the registry's metrics (500 when a collector fails).
pub fn response(registry: &Registry) -> Response {
    match encode(registry) {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(_) => {
            tracing::warn!("cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
    }
}

/// `/metrics` for `registry` and `/healthz` (always `ok`).
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move { response(&registry) }
            }),
        )
        .route("/healthz", get(healthz))
}

/// The liveness answer: the process serves HTTP.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Binds `addr`, naming it in the error when it is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Serves `router` on `listener` until `shutdown` fires, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn serves_the_registry_and_health_until_shutdown() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("llmchain_test_events", "events seen", counter.clone());
        counter.inc_by(3);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router(Arc::new(registry)), shutdown.clone()));

        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("content-type: application/openmetrics-text"), "{metrics}");
        assert!(metrics.contains("\nllmchain_test_events_total 3\n"), "{metrics}");
        assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
        counter.inc();
        assert!(get(addr, "/metrics").await.contains("\nllmchain_test_events_total 4\n"));
        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
        let taken = bind(addr).await;
        assert!(taken.is_ok(), "the listener is closed after shutdown");
    }
}
