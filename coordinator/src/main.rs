//! `coordinator`: the LLMChain control plane. Parses configuration and wires; the logic lives
//! in the library.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use llmchain_artifact::{PublicKey, TrustedKeys};
use llmchain_coordinator::{
    auth,
    blobs::{self, VerifiedBlobs},
    config, fleet, http, metrics, pki, registry, rollout, server, store,
};
use llmchain_runtime::{shutdown, telemetry};

/// LLMChain coordinator: model registry, fleet sessions and rollouts over gRPC.
///
/// Configuration comes from flags, then LLMCHAIN_* environment variables, then a TOML file
/// (--config), then defaults. Logs go to stderr (RUST_LOG filters, LLMCHAIN_LOG_FORMAT=json
/// for JSON); spans are exported over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    file: config::ConfigFile,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API (with health and reflection) until SIGTERM or Ctrl-C.
    Serve(Box<config::ServeArgs>),
    /// Create the TLS directory (CA, serving certificate, first operator identity) and exit,
    /// e.g. to store it in a Kubernetes Secret shared by every replica.
    TlsInit(pki::TlsInitArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = telemetry::init(&telemetry::TelemetryConfig::from_env("llmchain-coordinator"))?;
    match cli.command {
        Command::TlsInit(args) => {
            let settings = args.settings();
            pki::TlsMaterial::load_or_create(&settings)
                .with_context(|| format!("cannot set up TLS in {}", settings.dir.display()))?;
            println!("TLS material in {} (private keys 0600)", settings.dir.display());
        }
        Command::Serve(args) => {
            let settings = args.resolve(cli.file.config.as_deref())?;
            let shutdown = shutdown::on_signal();
            let state = store::open(&settings.store)
                .await
                .with_context(|| format!("cannot open store {}", settings.store))?;
            let blobs = Arc::new(VerifiedBlobs::new(
                blobs::open(&settings.blobs)
                    .await
                    .with_context(|| format!("cannot open blob store {}", settings.blobs))?,
            ));
            let mut keys = Vec::new();
            for path in &settings.trainer_keys {
                keys.push(
                    PublicKey::load(path)
                        .with_context(|| format!("cannot load trainer key {}", path.display()))?,
                );
            }
            if keys.is_empty() {
                tracing::warn!("no --trainer-key given: every PublishVersion will be refused");
            }
            let tls = match &settings.tls {
                Some(tls) => Some(
                    pki::TlsMaterial::load_or_create(tls)
                        .with_context(|| format!("cannot set up TLS in {}", tls.dir.display()))?,
                ),
                None => {
                    llmchain_runtime::tls::warn_insecure("coordinator");
                    None
                }
            };
            let enrollment = Arc::new(pki::Enrollment::new(
                tls.as_ref().map(|m| m.ca.clone()),
                state.clone(),
                keys.clone(),
                settings.tls.as_ref().map_or(Duration::from_secs(3600), |t| t.cert_validity),
            ));
            let metrics = Arc::new(metrics::Metrics::new());
            let registry = Arc::new(
                registry::Registry::new(
                    registry::RegistryConfig::new(TrustedKeys::new(keys)),
                    state.clone(),
                    blobs.clone(),
                )
                .with_metrics(metrics.clone()),
            );
            blobs.spawn_scrubber(Duration::from_secs(6 * 3600), shutdown.child_token());
            registry.clone().spawn_gc(
                Duration::from_secs(3600),
                settings.blob_gc_grace,
                shutdown.child_token(),
            );

            let listener = server::bind(settings.listen).await?;
            // Tests and scripts read the bound address from this line (port 0 picks a free one).
            println!("listening on {}", listener.local_addr()?);
            let fleet = Arc::new(
                fleet::Fleet::new(settings.fleet, state.clone(), shutdown.child_token())
                    .with_metrics(metrics.clone()),
            );
            let rollouts = Arc::new(
                rollout::Rollouts::new(state.clone(), settings.coordinator_id.clone())
                    .with_metrics(metrics.clone()),
            );
            // Every coordinator campaigns; only the elected one advances rollouts.
            let controller =
                rollout::Controller::new(state.clone(), settings.controller, settings.coordinator_id.clone())
                    .spawn(shutdown.child_token());
            // The dashboard and /metrics, stopped by the same token as the gRPC server.
            let http_server = match http::bind(settings.http_listen).await {
                Ok(listener) => {
                    // Printed after the gRPC line, which tests and scripts read first.
                    println!("http listening on {}", listener.local_addr()?);
                    let state = http::HttpState {
                        registry: registry.clone(),
                        fleet: fleet.clone(),
                        rollouts: rollouts.clone(),
                        metrics,
                    };
                    Some(tokio::spawn(http::serve(listener, state, shutdown.child_token())))
                }
                Err(e) if settings.http_listen_defaulted => {
                    tracing::warn!(error = %e, "dashboard and /metrics not served: the default port is taken; set --http-listen");
                    None
                }
                Err(e) => return Err(e).context("cannot serve the dashboard and /metrics"),
            };
            let mut services = server::ServiceSet::default();
            let (registry, fleet, rollouts) = (
                registry::service(registry),
                fleet::service_with_enrollment(fleet, enrollment),
                rollout::service(rollouts),
            );
            match settings.limits.max_message_bytes {
                Some(n) => services
                    .add(registry.max_decoding_message_size(n))
                    .add(fleet.max_decoding_message_size(n))
                    .add(rollouts.max_decoding_message_size(n)),
                None => services.add(registry).add(fleet).add(rollouts),
            };
            let auth_mode = if tls.is_some() { auth::AuthMode::Mtls } else { auth::AuthMode::Insecure };
            let authz = auth::Authorizer::start(
                state.clone(),
                auth::AuthConfig { mode: auth_mode, rate_limit: settings.rate_limit },
                shutdown.child_token(),
            )
            .await
            .context("cannot load the revocation set")?;
            services.authorize(auth::AuthLayer::new(authz));
            let server_tls = tls.as_ref().map(pki::TlsMaterial::server_config);
            server::serve_with_tls(listener, services, settings.limits, server_tls, shutdown).await?;
            // The server returns after shutdown was cancelled: the controller resigns, so a
            // standby coordinator takes over at once rather than after the lease TTL.
            controller.await.context("rollout controller task failed")?;
            if let Some(http_server) = http_server {
                http_server.await.context("http server task failed")?.context("http server")?;
            }
        }
    }
    Ok(())
}
