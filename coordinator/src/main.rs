//! `coordinator`: the LLMChain control plane. Parses configuration and wires; the logic lives
//! in the library.

use clap::{Parser, Subcommand};
use llmchain_coordinator::{config, server};
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
            let listener = server::bind(settings.listen).await?;
            // Tests and scripts read the bound address from this line (port 0 picks a free one).
            println!("listening on {}", listener.local_addr()?);
            let services = server::ServiceSet::default();
            server::serve(listener, services, settings.limits, shutdown::on_signal()).await?;
        }
    }
    Ok(())
}
