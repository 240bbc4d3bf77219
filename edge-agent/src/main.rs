//! `edge-agent`: runs LLMChain models on an edge node. Parses configuration and wires; the
//! logic lives in the library crates.

mod model_cmd;

use clap::{Parser, Subcommand};
use llmchain_model::device::DeviceReport;
use llmchain_runtime::telemetry;

/// LLMChain edge agent: runs a small language model next to the data and acts on its
/// decisions locally.
///
/// Logs go to stderr (RUST_LOG filters, LLMCHAIN_LOG_FORMAT=json for JSON).
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the compute device libtorch will use (CPU threads, CUDA devices) as JSON.
    Device,
    /// Try a model by hand: generate text, score labels, or show next-token logits.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = telemetry::init(&telemetry::TelemetryConfig::from_env("llmchain-edge-agent"))?;
    match cli.command {
        Command::Device => println!("{}", serde_json::to_string_pretty(&DeviceReport::probe())?),
        Command::Model(cmd) => model_cmd::run(cmd)?,
    }
    Ok(())
}
