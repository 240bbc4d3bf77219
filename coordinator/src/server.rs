//! Wires the gRPC services, health, reflection and middleware into one server.
//!
//! Layer order follows tonic's own stack (see STYLE.md): a span per request (with the W3C
//! trace context of the caller as parent) → authorization ([`crate::auth`]: identity,
//! revocation, role, per-identity rate) → limits (per-request timeout, per-connection
//! concurrency, global load shedding) → the services. (tonic applies its own timeout and
//! per-connection limit around every user layer, so those two run before authorization.) Health and reflection are always
//! served; reflection advertises exactly the services that were added, and health reports
//! each of them SERVING until shutdown begins.

use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    server::NamedService,
    service::{Routes, RoutesBuilder},
};
use tonic_health::{ServingStatus, server::HealthReporter};

/// Limits applied to every RPC.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deadline of a unary RPC (streams are bounded by their own idle checks).
    pub request_timeout: Duration,
    /// Concurrent requests per connection.
    pub per_connection_concurrency: usize,
    /// Concurrent requests across all connections before new ones are shed with
    /// `UNAVAILABLE` instead of queueing.
    pub global_concurrency: usize,
    /// Largest request message any service decodes, when set: it replaces each service's own
    /// limit (registry 17 MiB, fleet 16 MiB, rollouts 4 MiB). Responses keep the service's
    /// limit. Applied where the services are built ([`ServiceSet::add`] takes them as given).
    pub max_message_bytes: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(30),
            per_connection_concurrency: 256,
            global_concurrency: 4096,
            max_message_bytes: None,
        }
    }
}

/// The services one coordinator serves, collected before the server starts.
pub struct ServiceSet {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    health: HealthReporter,
    auth: Option<crate::auth::AuthLayer>,
}

impl Default for ServiceSet {
    fn default() -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        ServiceSet { routes, names: Vec::new(), health, auth: None }
    }
}

impl ServiceSet {
    /// Adds a service; it is advertised by reflection and reported by health.
    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Puts `auth` in front of every service (after the request span, before the limits).
    /// Without it nothing is checked, as with `--insecure`.
    pub fn authorize(&mut self, auth: crate::auth::AuthLayer) -> &mut Self {
        self.auth = Some(auth);
        self
    }

    /// Names of the services added so far.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The health reporter, for services that want to report their own status.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }
}

/// Serves `services` on `listener` until `shutdown` is cancelled, then drains in-flight
/// requests (tonic waits for them) and reports NOT_SERVING first so load balancers move away.
pub async fn serve(
    listener: TcpListener,
    services: ServiceSet,
    limits: Limits,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    serve_with_tls(listener, services, limits, None, shutdown).await
}

/// Like [`serve`], over TLS when `tls` is given (see [`crate::pki::TlsMaterial::server_config`]):
/// tonic then puts the peer's verified certificate chain into every request's extensions
/// (`TlsConnectInfo`, read with `Request::peer_certs`), where the authorization layer finds it.
pub async fn serve_with_tls(
    listener: TcpListener,
    services: ServiceSet,
    limits: Limits,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    let addr = listener.local_addr()?;
    let ServiceSet { mut routes, names, health, auth } = services;
    if tls.is_some() && auth.is_none() {
        tracing::warn!("serving tls without the authorization layer: every rpc is allowed");
    }

    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llmchain_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    for name in &names {
        reflection = reflection.with_service_name(*name);
    }
    let reflection = reflection
        .build_v1()
        .map_err(|e| crate::Error::Api(llmchain_proto::ApiError::Internal(format!("reflection: {e}"))))?;

    for name in &names {
        health.set_service_status(*name, ServingStatus::Serving).await;
    }
    health.set_service_status("", ServingStatus::Serving).await;
    routes.add_service(reflection);
    let routes: Routes = routes.routes();

    tracing::info!(%addr, services = ?names, tls = tls.is_some(), "coordinator serving");
    let drain = {
        let health = health.clone();
        let names = names.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            for name in &names {
                health.set_service_status(*name, ServingStatus::NotServing).await;
            }
            health.set_service_status("", ServingStatus::NotServing).await;
            tracing::info!("draining in-flight requests");
        }
    };

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder =
            builder.tls_config(tls).map_err(|e| crate::Error::Tls(format!("server tls config: {e}")))?;
    }
    builder
        // Large windows keep blob streams from stalling on flow control over fast links.
        .initial_stream_window_size(crate::registry::grpc::H2_WINDOW_BYTES)
        .initial_connection_window_size(crate::registry::grpc::H2_WINDOW_BYTES)
        // 1 MiB frames carry a blob chunk in one frame: far less per-byte CPU than 16 KiB.
        .max_frame_size(Some(crate::registry::grpc::H2_MAX_FRAME_BYTES))
        .timeout(limits.request_timeout)
        .concurrency_limit_per_connection(limits.per_connection_concurrency)
        .layer(tower::util::option_layer(auth))
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(limits.global_concurrency))
        .trace_fn(|req| {
            let span = tracing::info_span!("grpc", path = %req.uri().path());
            let metadata = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
            llmchain_runtime::telemetry::link_parent(&span, &metadata);
            span
        })
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), drain)
        .await
        .map_err(|e| crate::Error::Api(llmchain_proto::ApiError::Unavailable(format!("server: {e}"))))?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Accepted connections with Nagle off: otherwise each small unary answer can wait ~40 ms
/// for the peer's delayed ACK.
fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> + Send + 'static {
    use futures::TryStreamExt;
    TcpListenerStream::new(listener).and_then(|s| async move {
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// Binds `addr`, reporting a clear error when it is taken.
pub async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| crate::Error::Io(std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))))
}
