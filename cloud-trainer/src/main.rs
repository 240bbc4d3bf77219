//! `cloud-trainer`: fine-tunes models and publishes them. Parses configuration and wires; the
//! logic lives in the library crates.

use llmchain_runtime::tls::ClientTlsArgs;
use std::{io::Write, path::PathBuf, time::Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use llmchain_artifact::{BlobDir, Manifest, ModelRef, SigningKey, TrainingMetadata};
use llmchain_cloud_trainer::{
    data::{self, Dataset, Example},
    eval,
    pipeline::{self, RunReport},
    publish::{self, Publisher},
    remote,
    train::{self, CheckpointConfig, Mode, Objective, Schedule, TrainConfig},
    version,
};
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
        /// Agents refuse the signed manifest this long after it is created: 30d, 12h, 90m.
        #[arg(long, env = "LLMCHAIN_MANIFEST_TTL", default_value = "30d", value_parser = publish::parse_ttl)]
        manifest_ttl: std::time::Duration,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
    /// Generate labelled telemetry records (shared/TASK.md) as JSON lines: each line is a record
    /// plus its rule label in "label". The same seed, count, mix and shift give the same file.
    Data {
        /// Random seed of the generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Records to write.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Label mix, e.g. normal=0.4,inspect=0.25,throttle=0.15,shutdown=0.2 (relative weights;
        /// labels left out get none). Default: the generator's mix for the base or shifted set.
        #[arg(long)]
        mix: Option<String>,
        /// Use the shifted distribution (new phrasings, more anomalies) for incremental rounds.
        #[arg(long)]
        shift: bool,
        /// Output file (JSONL); `-` for stdout.
        #[arg(long, default_value = "-")]
        out: PathBuf,
        /// Write what the model reads instead of records: {"instructions", "text", "label"} per
        /// line (the preprocessed text), e.g. for other runtimes to train on the same prompts.
        #[arg(long)]
        texts: bool,
    },
    /// Fine-tune a model on a JSONL data set, evaluate it against the starting model on held-out
    /// data, write reports and plots, and publish the result as a signed version whose delta is
    /// only the changed tensors.
    ///
    /// Data lines are task records (with or without "label") or {"prompt": …, "label": …}.
    /// Modes: last-layers:N (the last N blocks and the final norm, the frozen trunk's
    /// activations computed once), lora:R (rank-R adapters on q,k,v,o,gate,up,down, shipped as
    /// their own tensors) or full. See docs/training.md.
    Train(TrainArgs),
    /// One incremental round: pull hard examples from the agents' summaries (Fleet
    /// ListSummaries), label them with the task rules, mix them with a replay sample of earlier
    /// data, fine-tune from the running version, evaluate on the old and the shifted held-out
    /// sets, and publish only if the new version is better on their mean accuracy.
    Incremental(IncrementalArgs),
}

/// Where the starting model comes from and where results go.
#[derive(Debug, Args)]
struct Common {
    /// Training mode: last-layers:N, lora:R or full.
    #[arg(long, default_value = "last-layers:2")]
    mode: String,
    /// Model name in the registry.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Start from this published version (0: the latest), pulled from the coordinator into
    /// --blob-cache. Without it (and without --from-dir) the GGUF is the start.
    #[arg(long)]
    from_version: Option<u64>,
    /// Start from a local version directory (manifest.pb + blobs/, as --save-dir writes).
    #[arg(long, conflicts_with = "from_version")]
    from_dir: Option<PathBuf>,
    /// GGUF to start from when no version is given (its import is taken as version 0's parent).
    #[arg(long, env = "LLMCHAIN_SMOLLM2_GGUF", value_name = "FILE")]
    gguf: Option<PathBuf>,
    /// Local blob directory for pulled versions (the coordinator's own blob directory works
    /// and then nothing is downloaded).
    #[arg(long, default_value = "llmchain-data/trainer-blobs")]
    blob_cache: PathBuf,
    /// Directory for report.json, report.txt, loss.png, confusion.png and checkpoints.
    #[arg(long, default_value = "llmchain-data/train")]
    out: PathBuf,
    /// Peak learning rate (default: by mode, see docs/training.md).
    #[arg(long)]
    lr: Option<f64>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Linear warm-up steps before the cosine decay.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// LoRA alpha (default 2 x rank).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Seed of the data order, the split and the adapters.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps into OUT/checkpoints (0: never). A rerun with the same
    /// arguments resumes from the last checkpoint.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Stop after this many steps in total (simulates an interruption; rerun to resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Run the frozen trunk every step instead of caching its activations (last-layers only;
    /// for comparison).
    #[arg(long)]
    no_activation_cache: bool,
    /// What a step minimises: `candidates` (a softmax over the labels' first tokens, the
    /// decision as the agent takes it, plus the answer's later tokens) or `vocab` (the answer's
    /// cross-entropy over the whole vocabulary).
    #[arg(long, default_value = "candidates", value_parser = |s: &str| s.parse::<Objective>().map_err(|e| e.to_string()))]
    objective: Objective,
    /// The learning rate after the warm-up: `cosine` (decays to zero at the last step) or
    /// `constant` (stays at --lr).
    #[arg(long, default_value = "cosine", value_parser = |s: &str| s.parse::<Schedule>().map_err(|e| e.to_string()))]
    schedule: Schedule,
    /// Skip evaluating the starting model.
    #[arg(long)]
    skip_baseline: bool,
    /// Element type of the published tensors (must match the parent's for shared digests).
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// Trainer private key; also verifies pulled versions.
    #[arg(long, env = "LLMCHAIN_TRAINER_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Coordinator gRPC address.
    #[arg(long, env = "LLMCHAIN_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// Agents refuse the signed manifest this long after it is created: 30d, 12h, 90m.
    #[arg(long, env = "LLMCHAIN_MANIFEST_TTL", default_value = "30d", value_parser = publish::parse_ttl)]
    manifest_ttl: std::time::Duration,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Do not publish; with --save-dir the version is still written locally.
    #[arg(long)]
    no_publish: bool,
    /// Also write the new version to this directory (manifest.pb + blobs/).
    #[arg(long)]
    save_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Training data (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Held-out data (JSONL); without it, --held-out examples are split off --data.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Examples split off --data for evaluation when --eval is not given.
    #[arg(long, default_value_t = 200)]
    held_out: usize,
    /// System message for plain {"prompt","label"} data (default: the task's instructions).
    #[arg(long)]
    instructions: Option<String>,
    /// Train only: no evaluation and no version (for throughput measurements such as
    /// `make bench-train`); prints the training report as JSON.
    #[arg(long)]
    skip_eval: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args)]
struct IncrementalArgs {
    /// Earlier training data (JSONL) to replay alongside the hard examples.
    #[arg(long)]
    replay: PathBuf,
    /// Replay examples drawn (seeded) from --replay.
    #[arg(long, default_value_t = 500)]
    replay_count: usize,
    /// Held-out set of the distribution the running version was trained on.
    #[arg(long)]
    old_eval: PathBuf,
    /// Held-out set of the shifted distribution.
    #[arg(long)]
    shifted_eval: PathBuf,
    /// Newest summaries to read hard examples from.
    #[arg(long, default_value_t = 1000)]
    summaries: u32,
    /// Also read hard examples from this JSONL of {"text": …} lines (e.g. exported summaries).
    #[arg(long)]
    hard_file: Option<PathBuf>,
    /// Publish even if the new version is not better.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    common: Common,
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
        Command::Import { gguf, model, dtype, key, coordinator, manifest_ttl, tls } => {
            let name = ModelName::parse("model", &model)?;
            let key = SigningKey::load(&key).with_context(|| format!("cannot load key {}", key.display()))?;
            let mut publisher =
                Publisher::connect_with(&coordinator, &tls.transport("cloud-trainer")?).await?;
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
            let signed = publish::sign_with_expiry(&key, &build.manifest, manifest_ttl);
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
        Command::Data { seed, count, mix, shift, out, texts } => {
            let mix = mix.as_deref().map(data::parse_mix).transpose()?;
            let records = data::generate(seed, count, mix, shift);
            let mut sink: Box<dyn Write> = if out.as_os_str() == "-" {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&out)
                        .with_context(|| format!("cannot create {}", out.display()))?,
                ))
            };
            let mut counts = [0usize; 4];
            for (record, label) in &records {
                let line = if texts {
                    serde_json::json!({
                        "instructions": llmchain_task::preprocess::INSTRUCTIONS,
                        "text": llmchain_task::preprocess::record_text(record),
                        "label": label.as_str(),
                    })
                    .to_string()
                } else {
                    data::record_line(record, *label)
                };
                writeln!(sink, "{line}")?;
                counts[label.index()] += 1;
            }
            sink.flush()?;
            eprintln!(
                "{} records: normal {} inspect {} throttle {} shutdown {}",
                records.len(),
                counts[0],
                counts[1],
                counts[2],
                counts[3]
            );
        }
        Command::Train(args) => train_command(args).await?,
        Command::Incremental(args) => incremental_command(args).await?,
    }
    Ok(())
}

impl Dtype {
    fn save(self) -> SaveDtype {
        match self {
            Dtype::Bf16 => SaveDtype::Bf16,
            Dtype::F32 => SaveDtype::F32,
        }
    }
}

/// The starting point of a run.
struct Start {
    model: Llama,
    tokenizer: Tokenizer,
    parent: Option<Manifest>,
}

async fn load_start(c: &Common) -> anyhow::Result<Start> {
    let device = llmchain_model::device::default_device();
    if let Some(dir) = &c.from_dir {
        let (manifest, blobs) = remote::local_version(dir)?;
        let (model, tokenizer) = pipeline::load_for_training(&manifest, &blobs, device)?;
        return Ok(Start { model, tokenizer, parent: Some(manifest) });
    }
    if let Some(version) = c.from_version {
        let key = c.key.as_ref().context("--from-version needs --key to verify the version")?;
        let public = SigningKey::load(key)?.public();
        let manifest = remote::pull_version(
            &c.coordinator,
            &c.tls.transport("cloud-trainer")?,
            &c.model,
            version,
            &public,
            &c.blob_cache,
        )
        .await?;
        let blobs = BlobDir(c.blob_cache.clone());
        let (model, tokenizer) = pipeline::load_for_training(&manifest, &blobs, device)?;
        return Ok(Start { model, tokenizer, parent: Some(manifest) });
    }
    let gguf = c.gguf.as_ref().context("give --from-version, --from-dir or --gguf")?;
    let file = Gguf::open(gguf)?;
    Ok(Start {
        tokenizer: Tokenizer::from_gguf(&file)?,
        model: Llama::from_gguf(&file, device)?,
        parent: None,
    })
}

fn train_config(c: &Common, mode: Mode) -> TrainConfig {
    let mut cfg = TrainConfig::for_mode(mode);
    if let Some(lr) = c.lr {
        cfg.lr = lr;
    }
    cfg.epochs = c.epochs;
    cfg.batch_size = c.batch_size;
    cfg.warmup_steps = c.warmup;
    cfg.clip_norm = c.clip_norm;
    cfg.weight_decay = c.weight_decay;
    cfg.seed = c.seed;
    cfg.activation_cache = !c.no_activation_cache;
    cfg.objective = c.objective;
    cfg.schedule = c.schedule;
    cfg.stop_after = c.stop_after;
    cfg.checkpoint = (c.checkpoint_every > 0)
        .then(|| CheckpointConfig { dir: c.out.join("checkpoints"), every: c.checkpoint_every });
    cfg
}

/// Builds, optionally saves and publishes the trained version; prints its delta next to its size.
async fn finish(
    c: &Common,
    start: Start,
    mode: Mode,
    train_data: Dataset,
    metrics: Vec<llmchain_artifact::Metric>,
    note: String,
    publish: bool,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Start { model, tokenizer, parent } = start;
    let name = llmchain_proto::model::ModelName::parse("model", &c.model)?;
    let mut publisher = if publish && !c.no_publish {
        Some(Publisher::connect_with(&c.coordinator, &c.tls.transport("cloud-trainer")?).await?)
    } else {
        None
    };
    let latest = match publisher.as_mut() {
        Some(p) => p.latest_version(&c.model).await?.unwrap_or(0),
        None => parent.as_ref().map_or(0, |p| p.id.version),
    };
    let parent_version = parent.as_ref().map_or(0, |p| p.id.version);
    let id = ModelRef { model: name, version: latest.max(parent_version) + 1 };
    let (dtype, mode_text) = (c.dtype.save(), mode.to_string());
    let (build, model) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let build = pipeline::build_version(
            &model,
            &tokenizer,
            id,
            parent_version,
            dtype,
            &mode_text,
            &train_data,
            metrics,
            note,
        )?;
        Ok((build, model))
    })
    .await??;
    drop(model);
    let full = build.manifest.total_bytes();
    let delta = pipeline::delta_bytes(&build, parent.as_ref());
    if let Some(dir) = &c.save_dir {
        pipeline::save_local(dir, &build)?;
    }
    let mut summary = serde_json::json!({
        "model": c.model,
        "version": build.manifest.id.version,
        "parent_version": parent_version,
        "mode": mode.to_string(),
        "full_bytes": full,
        "delta_bytes": delta,
        "delta_share": delta as f64 / full.max(1) as f64,
    });
    if let Some(p) = publisher.as_mut() {
        let key_path = c.key.as_ref().context("publishing needs --key")?;
        let key =
            SigningKey::load(key_path).with_context(|| format!("cannot load key {}", key_path.display()))?;
        let signed = publish::sign_with_expiry(&key, &build.manifest, c.manifest_ttl);
        let report = p.publish(&build.blobs, &signed, &build.manifest.id).await?;
        summary["published"] = true.into();
        summary["uploaded_bytes"] = report.uploaded_bytes.into();
        summary["uploaded_blobs"] = report.uploaded_blobs.into();
        summary["coordinator_delta_bytes"] = report.delta_bytes.into();
    }
    eprintln!(
        "version {} ({mode}): delta {} bytes of {} full ({:.2}%)",
        build.manifest.id,
        delta,
        full,
        100.0 * delta as f64 / full.max(1) as f64
    );
    Ok(Some(summary))
}

async fn train_command(args: TrainArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let c = &args.common;
    let mode: Mode = c.mode.parse()?;
    let all = data::load_jsonl(&args.data, args.instructions.as_deref())?;
    let (train_set, eval_set) = match &args.eval {
        Some(path) => (all, data::load_jsonl(path, args.instructions.as_deref())?),
        None => {
            let (train_idx, test_idx) = data::split(all.examples.len(), args.held_out, c.seed);
            (all.subset(train_idx), all.subset(test_idx))
        }
    };
    anyhow::ensure!(
        train_set.labels == eval_set.labels,
        "training and held-out data have different label sets"
    );
    let mut start = load_start(c).await?;
    let cfg = train_config(c, mode);
    let (lora_alpha, seed, dtype) = (c.lora_alpha, c.seed, c.dtype.save());
    let skip_eval = args.skip_eval;
    let skip_baseline = c.skip_baseline || skip_eval;
    let (train_for_blocking, eval_for_blocking) = (train_set.clone(), eval_set.clone());
    let (start_back, report) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let (_, train_tokens) = pipeline::tokenize(&start.tokenizer, &train_for_blocking)?;
        let (_, eval_tokens) = pipeline::tokenize(&start.tokenizer, &eval_for_blocking)?;
        let labels = &eval_for_blocking.labels;
        let steps = data::rule_steps(&eval_for_blocking);
        let mut evals = Vec::new();
        // `last-layers` leaves the blocks below its own unchanged: the baseline keeps their
        // output for the held-out set and the evaluation after training starts from it.
        let frozen = pipeline::frozen_trunk(&start.model, mode);
        let mut kept = None;
        if !skip_baseline {
            let (report, streams) = pipeline::evaluate_named(
                &start.model,
                &eval_tokens,
                labels,
                steps.as_deref(),
                "before",
                eval::Trunk::keep(frozen),
            )?;
            evals.push(("before".to_string(), report));
            kept = streams.filter(|_| !skip_eval);
        }
        train::prepare(&mut start.model, mode, seed, lora_alpha)?;
        let trained = train::train(&start.model, &train_tokens, &cfg)?;
        eprintln!(
            "trained {} steps ({} resumed) of {}: {:.0} tokens/s, {:.0} s (+{:.0} s activation cache); \
             gradient clipped at {} in {} steps",
            trained.steps_done - trained.resumed_from,
            trained.resumed_from,
            trained.total_steps,
            trained.tokens_per_second(),
            trained.train_seconds,
            trained.cache_seconds,
            cfg.clip_norm,
            trained.clipped_steps(cfg.clip_norm)
        );
        train::round_trainable(&start.model, dtype);
        if !skip_eval {
            let trunk = eval::Trunk::reuse(kept.as_ref());
            let (report, _) = pipeline::evaluate_named(
                &start.model,
                &eval_tokens,
                labels,
                steps.as_deref(),
                "after",
                trunk,
            )?;
            evals.push(("after".to_string(), report));
        }
        let report = RunReport {
            mode: mode.to_string(),
            train_examples: train_for_blocking.examples.len(),
            dataset_digest: train_for_blocking.digest().to_string(),
            train: trained,
            eval: evals,
            seconds: 0.0,
            published: None,
        };
        Ok((start, report))
    })
    .await??;
    let mut report = report;
    if skip_eval {
        report.seconds = t0.elapsed().as_secs_f64();
        pipeline::write_reports(&c.out, &report)?;
        println!("{}", serde_json::to_string(&report.train)?);
        return Ok(());
    }
    if report.train.steps_done < report.train.total_steps {
        eprintln!(
            "stopped at step {} of {}; rerun to resume",
            report.train.steps_done, report.train.total_steps
        );
        report.seconds = t0.elapsed().as_secs_f64();
        pipeline::write_reports(&c.out, &report)?;
        return Ok(());
    }
    let after = &report.eval.last().expect("after is evaluated").1;
    let mut metrics = after.manifest_metrics("");
    if let Some((_, before)) = report.eval.iter().find(|(n, _)| n == "before") {
        metrics.push(llmchain_artifact::Metric { name: "baseline_accuracy".into(), value: before.accuracy });
    }
    let note = format!("{} on {} examples, held-out {}", report.mode, report.train_examples, after.examples);
    report.published = finish(c, start_back, mode, train_set, metrics, note, true).await?;
    report.seconds = t0.elapsed().as_secs_f64();
    pipeline::write_reports(&c.out, &report)?;
    println!("{}", serde_json::to_string(&report.published)?);
    Ok(())
}

async fn incremental_command(args: IncrementalArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let c = &args.common;
    let mode: Mode = c.mode.parse()?;
    // Hard examples: agents' summaries (and an optional file), labelled by the task rules read
    // back from the preprocessed text; texts that do not read back (truncated) are skipped.
    let transport = c.tls.transport("cloud-trainer")?;
    let mut texts: Vec<String> =
        match remote::hard_examples(&c.coordinator, &transport, &c.model, args.summaries).await {
            Ok(h) => h.into_iter().map(|h| h.text).collect(),
            Err(e) if args.hard_file.is_some() => {
                tracing::warn!(error = %e, "cannot list summaries; using --hard-file only");
                Vec::new()
            }
            Err(e) => return Err(e.into()),
        };
    if let Some(path) = &args.hard_file {
        for line in
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?.lines()
        {
            if let Some(text) = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["text"].as_str().map(str::to_string))
            {
                texts.push(text);
            }
        }
    }
    let total_hard = texts.len();
    let mut hard: Vec<Example> = texts
        .into_iter()
        .filter_map(|text| data::label_text(&text).map(|l| Example { text, label: l.as_str().to_string() }))
        .collect();
    hard.sort_by(|a, b| a.text.cmp(&b.text));
    hard.dedup_by(|a, b| a.text == b.text);
    eprintln!("hard examples: {total_hard} pulled, {} labelled (unique)", hard.len());
    let replay = data::load_jsonl(&args.replay, None)?;
    let mut order: Vec<usize> = (0..replay.examples.len()).collect();
    train::shuffle(&mut order, c.seed ^ 0x5eed);
    order.truncate(args.replay_count);
    let mut mixed = replay.subset(order);
    mixed.examples.extend(hard);
    anyhow::ensure!(!mixed.examples.is_empty(), "no hard examples and no replay data");
    let old_eval = data::load_jsonl(&args.old_eval, None)?;
    let shifted_eval = data::load_jsonl(&args.shifted_eval, None)?;
    let mut start = load_start(c).await?;
    anyhow::ensure!(
        start.parent.is_some(),
        "an incremental round starts from a published version (--from-version or --from-dir)"
    );
    let cfg = train_config(c, mode);
    let (lora_alpha, seed, dtype) = (c.lora_alpha, c.seed, c.dtype.save());
    let mixed_for_blocking = mixed.clone();
    let (start_back, report) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let (_, train_tokens) = pipeline::tokenize(&start.tokenizer, &mixed_for_blocking)?;
        let (_, old_tokens) = pipeline::tokenize(&start.tokenizer, &old_eval)?;
        let (_, shifted_tokens) = pipeline::tokenize(&start.tokenizer, &shifted_eval)?;
        let labels = &old_eval.labels;
        let (old_steps, shifted_steps) = (data::rule_steps(&old_eval), data::rule_steps(&shifted_eval));
        // As in `train`: the running version's evaluations keep the frozen trunk's output, the
        // candidate's start from it.
        let frozen = pipeline::frozen_trunk(&start.model, mode);
        let (old_before, old_kept) = pipeline::evaluate_named(
            &start.model,
            &old_tokens,
            labels,
            old_steps.as_deref(),
            "old_before",
            eval::Trunk::keep(frozen),
        )?;
        let (shifted_before, shifted_kept) = pipeline::evaluate_named(
            &start.model,
            &shifted_tokens,
            labels,
            shifted_steps.as_deref(),
            "shifted_before",
            eval::Trunk::keep(frozen),
        )?;
        let mut evals =
            vec![("old_before".to_string(), old_before), ("shifted_before".to_string(), shifted_before)];
        train::prepare(&mut start.model, mode, seed, lora_alpha)?;
        let trained = train::train(&start.model, &train_tokens, &cfg)?;
        train::round_trainable(&start.model, dtype);
        let trunk = eval::Trunk::reuse(old_kept.as_ref());
        let (old_after, _) = pipeline::evaluate_named(
            &start.model,
            &old_tokens,
            labels,
            old_steps.as_deref(),
            "old_after",
            trunk,
        )?;
        evals.push(("old_after".to_string(), old_after));
        let trunk = eval::Trunk::reuse(shifted_kept.as_ref());
        let (shifted_after, _) = pipeline::evaluate_named(
            &start.model,
            &shifted_tokens,
            labels,
            shifted_steps.as_deref(),
            "shifted_after",
            trunk,
        )?;
        evals.push(("shifted_after".to_string(), shifted_after));
        let report = RunReport {
            mode: mode.to_string(),
            train_examples: mixed_for_blocking.examples.len(),
            dataset_digest: mixed_for_blocking.digest().to_string(),
            train: trained,
            eval: evals,
            seconds: 0.0,
            published: None,
        };
        Ok((start, report))
    })
    .await??;
    let mut report = report;
    let acc = |name: &str| report.eval.iter().find(|(n, _)| n == name).map_or(0.0, |(_, r)| r.accuracy);
    let before = (acc("old_before") + acc("shifted_before")) / 2.0;
    let after = (acc("old_after") + acc("shifted_after")) / 2.0;
    eprintln!("mean held-out accuracy (old, shifted): {:.2}% -> {:.2}%", 100.0 * before, 100.0 * after);
    let complete = report.train.steps_done >= report.train.total_steps;
    if complete && (after > before || args.force) {
        let mut metrics = Vec::new();
        for (name, r) in &report.eval {
            if name.ends_with("_after") {
                metrics.extend(r.manifest_metrics(&format!("{}_", name.trim_end_matches("_after"))));
            }
        }
        metrics.push(llmchain_artifact::Metric { name: "parent_mean_accuracy".into(), value: before });
        let note = format!(
            "incremental {} on {} examples ({} hard)",
            report.mode, report.train_examples, total_hard
        );
        report.published = finish(c, start_back, mode, mixed, metrics, note, true).await?;
    } else {
        eprintln!(
            "not published: {}",
            if complete { "not better than the running version" } else { "training stopped early" }
        );
    }
    report.seconds = t0.elapsed().as_secs_f64();
    pipeline::write_reports(&c.out, &report)?;
    println!("{}", serde_json::to_string(&report.published)?);
    Ok(())
}
