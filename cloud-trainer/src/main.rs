//! `cloud-trainer`: fine-tunes models and publishes them. Parses configuration and wires; the
//! logic lives in the library crates.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use llmchain_artifact::{ModelRef, SigningKey, TrainingMetadata};
use llmchain_cloud_trainer::{publish::Publisher, version};
use llmchain_model::{Llama, SaveDtype, device::DeviceReport, gguf::Gguf, tokenizer::Tokenizer};
use llmchain_proto::model::ModelName;
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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Dtype {
    /// bfloat16: half the bytes.
    Bf16,
    /// 32-bit floats: lossless.
    F32,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the compute device libtorch will use (CPU threads, CUDA devices) as JSON.
    Device,
    /// Generate an ed25519 trainer key: FILE (private, mode 0600) and FILE.pub (give it to
    /// the coordinator with --trainer-key and to agents).
    Keygen {
        /// Private key file to create; refused if it exists.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Import a GGUF model as a new version: dequantise, sign, upload the missing blobs and
    /// publish.
    Import {
        /// GGUF file (e.g. SmolLM2-135M-Instruct).
        #[arg(long, env = "LLMCHAIN_SMOLLM2_GGUF", value_name = "FILE")]
        gguf: PathBuf,
        /// Model name in the registry.
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        /// Element type of the stored tensors.
        #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
        dtype: Dtype,
        /// Trainer private key (from `cloud-trainer keygen`).
        #[arg(long, env = "LLMCHAIN_TRAINER_KEY", value_name = "FILE")]
        key: PathBuf,
        /// Coordinator gRPC address.
        #[arg(long, env = "LLMCHAIN_COORDINATOR", default_value = "http://127.0.0.1:7400")]
        coordinator: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = telemetry::init(&telemetry::TelemetryConfig::from_env("llmchain-cloud-trainer"))?;
    match cli.command {
        Command::Device => println!("{}", serde_json::to_string_pretty(&DeviceReport::probe())?),
        Command::Keygen { out } => {
            anyhow::ensure!(!out.exists(), "{} exists; refusing to overwrite a key", out.display());
            let key = SigningKey::generate()?;
            key.save(&out)?;
            let public = out.with_extension(match out.extension() {
                Some(ext) => format!("{}.pub", ext.to_string_lossy()),
                None => "pub".into(),
            });
            key.public().save(&public)?;
            println!(
                "{}",
                serde_json::json!({
                    "private_key": out, "public_key": public, "key_id": key.public().key_id(),
                })
            );
        }
        Command::Import { gguf, model, dtype, key, coordinator } => {
            let name = ModelName::parse("model", &model)?;
            let key = SigningKey::load(&key).with_context(|| format!("cannot load key {}", key.display()))?;
            let mut publisher = Publisher::connect(&coordinator).await?;
            let version = publisher.latest_version(&model).await?.map_or(1, |v| v + 1);
            let id = ModelRef { model: name, version };
            let (gguf_path, device) = (gguf.clone(), tch::Device::Cpu);
            let build = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let file = Gguf::open(&gguf_path)?;
                let tokenizer = Tokenizer::from_gguf(&file)?;
                let llama = Llama::from_gguf(&file, device)?;
                let training = TrainingMetadata {
                    mode: "import".into(),
                    dataset_digest: None,
                    metrics: vec![],
                    records: 0,
                    note: format!("imported from {}", gguf_path.display()),
                };
                let dtype = match dtype {
                    Dtype::Bf16 => SaveDtype::Bf16,
                    Dtype::F32 => SaveDtype::F32,
                };
                Ok(version::build(&llama, &tokenizer, id, 0, dtype, training)?)
            })
            .await??;
            let signed = key.sign(&build.manifest);
            let report = publisher.publish(&build.blobs, &signed, &build.manifest.id).await?;
            println!(
                "{}",
                serde_json::json!({
                    "model": model,
                    "version": report.version,
                    "total_bytes": report.total_bytes,
                    "delta_bytes": report.delta_bytes,
                    "uploaded_bytes": report.uploaded_bytes,
                    "uploaded_blobs": report.uploaded_blobs,
                })
            );
        }
    }
    Ok(())
}
