//! `edge-agent model …`: try a model by hand on a node.
//!
//! Operators use it to check that a model file works on the node before (or after) the agent
//! serves it, and tools outside the crate use its JSON output. It loads a GGUF file or a
//! safetensors model directory (`config.json`, `model.safetensors`, `tokenizer.json`) and runs
//! one request: `generate` prints text (or JSON), `score` and `logits` print JSON on stdout.
//! Logs stay on stderr, so stdout is always just the result.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use llmchain_model::tokenizer::{ChatMessage, Tokenizer};
use llmchain_model::{GenerateOptions, Llama, StopReason, device::default_device, load_pretrained};
use serde_json::json;

/// Commands for trying a model by hand.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Continue a prompt (or answer chat messages) and print the text.
    Generate(GenerateArgs),
    /// Log-probability of each label after a prompt, as JSON (best label first in `best`).
    Score(ScoreArgs),
    /// Token ids of a prompt and the top-k next-token logits, as JSON.
    Logits(LogitsArgs),
}

/// Which model to load and how.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// GGUF file or safetensors model directory.
    #[arg(long, env = "LLMCHAIN_SMOLLM2_GGUF")]
    pub model: PathBuf,
    /// libtorch intra-op threads (0 keeps libtorch's default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// The text the model reads: raw, or chat messages rendered with the model's template.
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// Raw prompt text, fed as is (no chat template).
    #[arg(long, conflicts_with_all = ["user", "messages"])]
    pub prompt: Option<String>,
    /// A user message, rendered with the chat template and the assistant turn opened.
    #[arg(long, conflicts_with = "messages")]
    pub user: Option<String>,
    /// System message to go with `--user`.
    #[arg(long, requires = "user")]
    pub system: Option<String>,
    /// Chat messages as JSON: `[{"role": "user", "content": "…"}, …]`.
    #[arg(long)]
    pub messages: Option<String>,
}

impl PromptArgs {
    /// Renders the prompt to text; `chat` says whether the chat template was used.
    fn render(&self, tokenizer: &Tokenizer) -> anyhow::Result<(String, bool)> {
        if let Some(prompt) = &self.prompt {
            return Ok((prompt.clone(), false));
        }
        let messages: Vec<ChatMessage> = if let Some(json) = &self.messages {
            serde_json::from_str(json).context("--messages is not a JSON list of {role, content}")?
        } else if let Some(user) = &self.user {
            let mut messages = Vec::new();
            if let Some(system) = &self.system {
                messages.push(ChatMessage::new("system", system.clone()));
            }
            messages.push(ChatMessage::new("user", user.clone()));
            messages
        } else {
            bail!("give --prompt, --user or --messages");
        };
        if messages.is_empty() {
            bail!("--messages is empty");
        }
        Ok((tokenizer.apply_chat_template(&messages, true), true))
    }
}

/// Arguments of `model generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON (ids, text, stop reason, timing) instead of the text alone.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `model score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// A candidate continuation; repeat for each label (e.g. `--label normal --label inspect`).
    #[arg(long = "label", required = true)]
    pub labels: Vec<String>,
    /// Text put between the prompt and every label (e.g. a leading space).
    #[arg(long, default_value = "")]
    pub label_prefix: String,
}

/// Arguments of `model logits`.
#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// How many of the largest logits to print.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
}

/// Runs one `model` subcommand, printing its result on stdout.
pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Generate(args) => generate(args),
        ModelCommand::Score(args) => score(args),
        ModelCommand::Logits(args) => logits(args),
    }
}

fn load(args: &ModelArgs) -> anyhow::Result<(Llama, Tokenizer)> {
    if args.threads > 0 {
        tch::set_num_threads(i32::try_from(args.threads).context("--threads is too large")?);
    }
    let started = Instant::now();
    let (model, tokenizer) = load_pretrained(&args.model, default_device())
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let tokenizer = tokenizer.with_context(|| {
        format!("{} has no tokenizer (a model directory needs tokenizer.json)", args.model.display())
    })?;
    tracing::info!(model = %args.model.display(), elapsed_ms = started.elapsed().as_millis() as u64, "model loaded");
    Ok((model, tokenizer))
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (model, tokenizer) = load(&args.model)?;
    let (text, _) = args.prompt.render(&tokenizer)?;
    let ids = tokenizer.encode(&text)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_ids: tokenizer.im_end_id().into_iter().chain([tokenizer.eos_id()]).collect(),
    };
    let started = Instant::now();
    let out = model.generate(&ids, &options)?;
    let elapsed = started.elapsed().as_secs_f64();
    let generated = tokenizer.decode(&out.ids)?;
    if args.json {
        let stop = match out.stop {
            StopReason::Stop(id) => json!({"token": id}),
            StopReason::MaxTokens => json!("max_tokens"),
            StopReason::ContextFull => json!("context_full"),
        };
        let value = json!({
            "prompt_ids": ids,
            "ids": out.ids,
            "text": generated,
            "stop": stop,
            "seconds": elapsed,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("{generated}");
    }
    Ok(())
}

fn score(args: ScoreArgs) -> anyhow::Result<()> {
    let (model, tokenizer) = load(&args.model)?;
    let (text, _) = args.prompt.render(&tokenizer)?;
    let prompt = tokenizer.encode(&text)?;
    let candidates = args
        .labels
        .iter()
        .map(|l| tokenizer.encode(&format!("{}{l}", args.label_prefix)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some((label, _)) = args.labels.iter().zip(&candidates).find(|(_, ids)| ids.is_empty()) {
        bail!("label {label:?} encodes to no tokens");
    }
    let scores = model.score(None, std::slice::from_ref(&prompt), &candidates)?;
    let scores = &scores[0];
    // Confidence as the agent computes it: the softmax over the labels' scores.
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = scores.iter().map(|&s| f64::from(s - max).exp()).sum();
    let labels: Vec<_> = args
        .labels
        .iter()
        .zip(&candidates)
        .zip(scores)
        .map(|((label, ids), &logprob)| {
            json!({
                "label": label,
                "ids": ids,
                "logprob": logprob,
                "probability": f64::from(logprob - max).exp() / total,
            })
        })
        .collect();
    let best =
        scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| args.labels[i].clone());
    let value = json!({"prompt_ids": prompt, "labels": labels, "best": best});
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

fn logits(args: LogitsArgs) -> anyhow::Result<()> {
    let (model, tokenizer) = load(&args.model)?;
    let (text, _) = args.prompt.render(&tokenizer)?;
    let ids = tokenizer.encode(&text)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let logits = model.next_token_logits(std::slice::from_ref(&ids))?.get(0).to_device(tch::Device::Cpu);
    let logprobs = logits.log_softmax(-1, tch::Kind::Float);
    let k = args.top_k.clamp(1, model.config().vocab_size) as i64;
    let (values, indices) = logits.topk(k, -1, true, true);
    let values: Vec<f32> = Vec::try_from(&values)?;
    let indices: Vec<i64> = Vec::try_from(&indices)?;
    let top: Vec<_> = values
        .iter()
        .zip(&indices)
        .map(|(&logit, &id)| {
            let id = u32::try_from(id).unwrap_or(u32::MAX);
            json!({
                "id": id,
                "token": tokenizer.decode(&[id]).unwrap_or_default(),
                "logit": logit,
                "logprob": logprobs.double_value(&[i64::from(id)]),
            })
        })
        .collect();
    let value = json!({"ids": ids, "position": ids.len() - 1, "top": top});
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
