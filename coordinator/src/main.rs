//! `coordinator`: the LLMChain control plane. Parses configuration and wires; the logic lives
//! in the library.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use llmchain_artifact::{PublicKey, TrustedKeys};
use llmchain_coordinator::{
    blobs::{self, VerifiedBlobs},
    config, fleet, registry, rollout, server, store,
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
    Serve(config::ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = telemetry::init(&telemetry::TelemetryConfig::from_env("llmchain-coordinator"))?;
    match cli.command {
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
            let registry = Arc::new(registry::Registry::new(
                registry::RegistryConfig::new(TrustedKeys::new(keys)),
                state.clone(),
                blobs.clone(),
            ));
            blobs.spawn_scrubber(Duration::from_secs(6 * 3600), shutdown.child_token());
            registry.clone().spawn_gc(
                Duration::from_secs(3600),
                settings.blob_gc_grace,
                shutdown.child_token(),
            );

            let listener = server::bind(settings.listen).await?;
            // Tests and scripts read the bound address from this line (port 0 picks a free one).
            println!("listening on {}", listener.local_addr()?);
            let fleet = Arc::new(fleet::Fleet::new(settings.fleet, state.clone(), shutdown.child_token()));
            let rollouts = Arc::new(rollout::Rollouts::new(state.clone(), settings.coordinator_id.clone()));
            // Every coordinator campaigns; only the elected one advances rollouts.
            let controller =
                rollout::Controller::new(state.clone(), settings.controller, settings.coordinator_id.clone())
                    .spawn(shutdown.child_token());
            let mut services = server::ServiceSet::default();
            services.add(registry::service(registry));
            services.add(fleet::service(fleet));
            services.add(rollout::service(rollouts));
            server::serve(listener, services, settings.limits, shutdown).await?;
            // The server returns after shutdown was cancelled: the controller resigns, so a
            // standby coordinator takes over at once rather than after the lease TTL.
            controller.await.context("rollout controller task failed")?;
        }
    }
    Ok(())
}
