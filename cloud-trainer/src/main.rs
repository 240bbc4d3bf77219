//! `cloud-trainer`: fine-tunes models and publishes them. Parses configuration and wires; the
//! logic lives in the library crates.

use clap::{Parser, Subcommand};
use llmchain_model::device::DeviceReport;
use llmchain_runtime::telemetry;

/// LLMChain cloud trainer: fine-tunes SmolLM2 with libtorch and publishes signed
/// weight deltas to the coordinator.
///
/// Logs go to stderr (RUST_LOG filters, LLMCHAIN_LOG_FORMAT=json for JSON).
#[derive(Debug, Parser)]
#[command(name = "cloud-trainer", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the compute device libtorch will use (CPU threads, CUDA devices) as JSON.
    Device,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = telemetry::init(&telemetry::TelemetryConfig::from_env("llmchain-cloud-trainer"))?;
    match cli.command {
        Command::Device => println!("{}", serde_json::to_string_pretty(&DeviceReport::probe())?),
    }
    Ok(())
}
