//! `edge-agent run` configuration: flags > `LLMCHAIN_*` environment > TOML file > defaults.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail, ensure};
use llmchain_artifact::{PublicKey, TrustedKeys};
use serde::{Deserialize, Serialize};

use crate::{
    agent::Settings,
    pipeline::{ExecutorSpec, PipelineConfig, SourceSpec, Stats, WindowConfig},
};

/// Flags of `edge-agent run`; every one may also come from the environment or the file.
#[derive(Debug, Default, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// This agent's id: 1-64 characters of [a-z0-9._-] [default: the host name].
    #[arg(long, env = "LLMCHAIN_AGENT_ID", value_name = "ID")]
    pub agent_id: Option<String>,
    /// A label reported to the coordinator, `key=value`; repeat the flag (or separate with
    /// commas) for several. Rollouts and assignments select agents by label.
    #[arg(long = "label", env = "LLMCHAIN_AGENT_LABELS", value_name = "K=V", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Coordinator gRPC URL [default: http://127.0.0.1:7400].
    #[arg(long, env = "LLMCHAIN_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    /// Directory of the model cache (blobs and verified manifests) [default: llmchain-agent/cache].
    #[arg(long, env = "LLMCHAIN_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Directory of the summary spool and agent state [default: llmchain-agent/state].
    #[arg(long, env = "LLMCHAIN_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Trainer public key file; manifests must be signed by one of these. Repeat the flag (or
    /// separate with commas) for several. Required: an agent without keys would run anything.
    #[arg(long, env = "LLMCHAIN_TRAINER_KEYS", value_name = "FILE", value_delimiter = ',')]
    pub trainer_key: Option<Vec<PathBuf>>,
    /// Offline root public key file (`llmchainctl keys root-init`): key-rotation documents
    /// signed by it replace the trainer keys; without it the trainer keys never change.
    #[arg(long, env = "LLMCHAIN_ROOT_KEY", value_name = "FILE")]
    pub root_key: Option<PathBuf>,
    /// Download rate limit for model blobs, bytes per second with an optional K/M/G suffix
    /// (powers of 1024), e.g. `512K`; unlimited when unset.
    #[arg(long, env = "LLMCHAIN_MAX_DOWNLOAD_RATE", value_name = "RATE")]
    pub max_download_rate: Option<String>,
    /// Model versions kept in the cache per model besides the running one [default: 2].
    #[arg(long, env = "LLMCHAIN_KEEP_VERSIONS", value_name = "N")]
    pub keep_versions: Option<usize>,
    /// Where records come from; repeat for several: `mqtt://HOST[:PORT]/TOPIC`, `jsonl:PATH`,
    /// `stdin`, or the simulator `sim[:seed=N,rate=R,count=N,shifted]` [default: stdin].
    #[arg(long = "source", env = "LLMCHAIN_SOURCES", value_name = "SPEC", value_delimiter = ';')]
    pub sources: Option<Vec<String>>,
    /// Where decisions go; repeat for several: `mqtt://HOST[:PORT]/TOPIC` (JSON per decision),
    /// `jsonl:PATH` (appended), `exec:COMMAND` (run with LLMCHAIN_DEVICE_ID, LLMCHAIN_LABEL,
    /// LLMCHAIN_CONFIDENCE, LLMCHAIN_MODEL in its environment) [default: none].
    #[arg(long = "executor", env = "LLMCHAIN_EXECUTORS", value_name = "SPEC", value_delimiter = ';')]
    pub executors: Option<Vec<String>>,
    /// Most records scored in one batch [default: 16].
    #[arg(long, env = "LLMCHAIN_BATCH_SIZE", value_name = "N")]
    pub batch_size: Option<usize>,
    /// Longest a record waits for its batch to fill, in milliseconds [default: 50].
    #[arg(long, env = "LLMCHAIN_BATCH_WAIT_MS", value_name = "MS")]
    pub batch_wait_ms: Option<u64>,
    /// A summary window closes after this many seconds [default: 60].
    #[arg(long, env = "LLMCHAIN_WINDOW_S", value_name = "SECS")]
    pub window_s: Option<f64>,
    /// A summary window also closes after this many records [default: no limit].
    #[arg(long, env = "LLMCHAIN_WINDOW_RECORDS", value_name = "N")]
    pub window_records: Option<u64>,
    /// Hard examples (lowest confidence) kept per summary [default: 4]. Each costs ~375 bytes of
    /// text and scores; 4 per window keeps summaries over 100x smaller than the records they
    /// describe at 1,000 records a window, and still feeds the trainer a steady trickle.
    #[arg(long, env = "LLMCHAIN_HARD_EXAMPLES", value_name = "N")]
    pub hard_examples: Option<usize>,
    /// Largest summary spool while the coordinator is unreachable; the oldest are dropped
    /// (and counted) beyond it [default: 10000].
    #[arg(long, env = "LLMCHAIN_SPOOL_MAX", value_name = "N")]
    pub spool_max: Option<usize>,
    /// How often spooled summaries are sent, in milliseconds [default: 2000].
    #[arg(long, env = "LLMCHAIN_REPORT_INTERVAL_MS", value_name = "MS")]
    pub report_interval_ms: Option<u64>,
    /// Longest reconnect delay in milliseconds (exponential backoff with jitter from 200 ms)
    /// [default: 30000].
    #[arg(long, env = "LLMCHAIN_MAX_BACKOFF_MS", value_name = "MS")]
    pub max_backoff_ms: Option<u64>,
    /// Compute device: `auto` (CUDA when present), `cpu` or `cuda[:N]` [default: auto].
    #[arg(long, env = "LLMCHAIN_DEVICE", value_name = "DEVICE")]
    pub device: Option<String>,
    /// Serve Prometheus `/metrics` (and `/healthz`) on this address, e.g. `127.0.0.1:9100`;
    /// port 0 picks a free one, printed as `metrics listening on ADDR` [default: off].
    #[arg(long, env = "LLMCHAIN_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Talk plaintext to a coordinator started with --insecure, without an identity: local
    /// development only. Without it the agent needs the identity `edge-agent enroll` wrote
    /// into the state directory, and uses mutual TLS.
    #[arg(long, env = "LLMCHAIN_INSECURE", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub insecure: Option<bool>,
}

/// Parses `512`, `64K`, `1.5M`, `1G` (powers of 1024) into bytes.
pub fn parse_rate(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1024.0),
        Some('M') => (&t[..t.len() - 1], 1024.0 * 1024.0),
        Some('G') => (&t[..t.len() - 1], 1024.0 * 1024.0 * 1024.0),
        _ => (t, 1.0),
    };
    let v: f64 =
        num.trim().parse().with_context(|| format!("rate {s:?} is not a number with an optional K/M/G"))?;
    ensure!(v.is_finite() && v >= 1.0 / mult, "rate {s:?} must be at least 1 byte per second");
    Ok((v * mult) as u64)
}

/// Parses `auto`, `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    Ok(match s {
        "auto" => llmchain_model::device::default_device(),
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => tch::Device::Cuda(n),
            _ => bail!("device {other:?} is not auto, cpu, cuda or cuda:N"),
        },
    })
}

fn default_agent_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let id: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(64)
        .collect();
    if id.is_empty() { "agent".into() } else { id }
}

impl RunArgs {
    /// Layers flags/env over the optional file, fills defaults and validates.
    pub fn resolve(&self, file: Option<&std::path::Path>) -> anyhow::Result<Settings> {
        let m: RunArgs = llmchain_runtime::config::load(self, file)?;
        let agent_id = m.agent_id.unwrap_or_else(default_agent_id);
        llmchain_proto::model::AgentId::parse("agent_id", &agent_id).map_err(|e| anyhow::anyhow!("{e}"))?;
        let labels = m
            .labels
            .unwrap_or_default()
            .iter()
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .filter(|(k, _)| !k.is_empty())
                    .with_context(|| format!("label {l:?} is not key=value"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let state_dir: PathBuf = m.state_dir.clone().unwrap_or_else(|| "llmchain-agent/state".into());
        let key_files = m.trainer_key.unwrap_or_default();
        let mut trusted_keys = TrustedKeys::default();
        for path in &key_files {
            trusted_keys
                .insert(PublicKey::load(path).with_context(|| format!("trainer key {}", path.display()))?);
        }
        if key_files.is_empty() {
            // The keys handed over at enrollment.
            for key in crate::enroll::read_trusted_keys(&state_dir)? {
                trusted_keys.insert(key);
            }
        }
        ensure!(
            !trusted_keys.is_empty(),
            "give at least one --trainer-key (or enroll first): manifests are verified against them"
        );
        let transport = crate::enroll::transport(m.insecure.unwrap_or(false), &state_dir)?;
        let sources = m
            .sources
            .unwrap_or_else(|| vec!["stdin".into()])
            .iter()
            .map(|s| s.parse::<SourceSpec>().map_err(anyhow::Error::from))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let executors = m
            .executors
            .unwrap_or_default()
            .iter()
            .map(|s| s.parse::<ExecutorSpec>().map_err(anyhow::Error::from))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let window_s = m.window_s.unwrap_or(60.0);
        ensure!(window_s.is_finite() && window_s > 0.0, "window_s must be positive");
        let batch_size = m.batch_size.unwrap_or(16);
        ensure!((1..=256).contains(&batch_size), "batch_size must be 1-256");
        let hard_examples = m.hard_examples.unwrap_or(WindowConfig::default().hard_examples);
        ensure!(hard_examples <= 100, "hard_examples must be at most 100");
        let stats = Arc::new(Stats::default());
        let pipeline = PipelineConfig {
            agent_id: agent_id.clone(),
            sources,
            executors,
            max_batch: batch_size,
            max_wait: Duration::from_millis(m.batch_wait_ms.unwrap_or(50)),
            window: WindowConfig {
                window: Duration::from_secs_f64(window_s),
                max_records: m.window_records,
                hard_examples,
            },
            stats,
            ..PipelineConfig::default()
        };
        Ok(Settings {
            agent_id,
            labels,
            coordinator: m.coordinator.unwrap_or_else(|| "http://127.0.0.1:7400".into()),
            cache_dir: m.cache_dir.unwrap_or_else(|| "llmchain-agent/cache".into()),
            state_dir,
            trusted_keys,
            root_key: m
                .root_key
                .as_deref()
                .map(|p| PublicKey::load(p).with_context(|| format!("root key {}", p.display())))
                .transpose()?,
            max_download_rate: m.max_download_rate.as_deref().map(parse_rate).transpose()?,
            keep_versions: m.keep_versions.unwrap_or(2),
            report_interval: Duration::from_millis(m.report_interval_ms.unwrap_or(2000).max(10)),
            spool_max: m.spool_max.unwrap_or(10_000).max(1),
            pipeline,
            device: parse_device(m.device.as_deref().unwrap_or("auto"))?,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_millis(m.max_backoff_ms.unwrap_or(30_000).max(200)),
            metrics_listen: m.metrics_listen,
            transport,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_binary_suffixes() {
        assert_eq!(parse_rate("512").unwrap(), 512);
        assert_eq!(parse_rate("64K").unwrap(), 64 * 1024);
        assert_eq!(parse_rate("1.5m").unwrap(), 1024 * 1024 * 3 / 2);
        assert_eq!(parse_rate("2G").unwrap(), 2 << 30);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), tch::Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), tch::Device::Cuda(1));
        assert!(parse_device("tpu").is_err());
    }
}
