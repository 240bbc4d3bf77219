//! `edge-agent`: runs LLMChain models on an edge node. Parses configuration and wires; the
//! logic lives in the library.

mod model_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use llmchain_edge_agent::{agent, config::RunArgs, enroll};
use llmchain_model::device::DeviceReport;
use llmchain_runtime::{shutdown, telemetry};

/// LLMChain edge agent: runs a small language model next to the data and acts on its
/// decisions locally.
///
/// Settings come from flags, then `LLMCHAIN_*` environment variables, then a TOML file
/// (--config), then defaults. Logs go to stderr (RUST_LOG filters, LLMCHAIN_LOG_FORMAT=json
/// for JSON).
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about, long_about)]
struct Cli {
    /// TOML file with the same keys as the long flags of `run` (underscores for dashes).
    #[arg(long, env = "LLMCHAIN_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or Ctrl-C: hold a session to the coordinator, pull and
    /// verify assigned model versions, decide on records from the sources, act through the
    /// executors, and report summaries.
    Run(Box<RunArgs>),
    /// Enroll this node once: generate a key pair here, send a certificate signing request
    /// with a bootstrap token, and write the identity `run` then uses for mutual TLS.
    Enroll(Box<enroll::EnrollArgs>),
    /// Show the compute device libtorch will use (CPU threads, CUDA devices) as JSON.
    Device,
    /// Try a model by hand: generate text, score labels, or show next-token logits.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The OTLP exporter needs a runtime; model commands run on the main thread regardless.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _entered = runtime.enter();
    let _telemetry = telemetry::init(&telemetry::TelemetryConfig::from_env("llmchain-edge-agent"))?;
    match cli.command {
        Command::Run(args) => {
            let settings = args.resolve(cli.config.as_deref())?;
            runtime.block_on(async {
                let cancel = shutdown::on_signal();
                agent::run(settings, cancel).await
            })?;
        }
        Command::Enroll(args) => runtime.block_on(enroll::run(*args))?,
        Command::Device => println!("{}", serde_json::to_string_pretty(&DeviceReport::probe())?),
        Command::Model(cmd) => model_cmd::run(cmd)?,
    }
    Ok(())
}
