//! `coordinator serve` configuration: flags > `LLMCHAIN_*` environment > TOML file > defaults.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::server::Limits;

/// Flags of `coordinator serve`; every one may also come from the environment or the file.
#[derive(Debug, Default, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// Address of the gRPC listener [default: 127.0.0.1:7400].
    #[arg(long, env = "LLMCHAIN_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Deadline of one unary RPC, in seconds [default: 30].
    #[arg(long, env = "LLMCHAIN_REQUEST_TIMEOUT_S", value_name = "SECS")]
    pub request_timeout_s: Option<u64>,
    /// Concurrent requests per connection [default: 256].
    #[arg(long, env = "LLMCHAIN_MAX_CONCURRENT_PER_CONN", value_name = "N")]
    pub max_concurrent_per_conn: Option<usize>,
    /// Concurrent requests across connections before shedding load [default: 4096].
    #[arg(long, env = "LLMCHAIN_MAX_CONCURRENT", value_name = "N")]
    pub max_concurrent: Option<usize>,
    /// Largest gRPC message in bytes [default: 8388608].
    #[arg(long, env = "LLMCHAIN_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Where state lives: `embedded:PATH` (one local file) or `etcd:URL[,URL…][?prefix=P]`
    /// [default: embedded:llmchain-data/state.redb].
    #[arg(long, env = "LLMCHAIN_STORE", value_name = "SPEC")]
    pub store: Option<String>,
    /// Blob store shared by every replica: a directory, or
    /// `s3://BUCKET[/PREFIX][?endpoint=URL&region=R]` (credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY) [default: llmchain-data/blobs].
    #[arg(long, env = "LLMCHAIN_BLOBS", value_name = "DIR|URL")]
    pub blobs: Option<String>,
    /// Trainer public key file whose signatures PublishVersion accepts; repeat the flag (or
    /// separate with commas) for several. Without any, every publish is refused.
    #[arg(long, env = "LLMCHAIN_TRAINER_KEYS", value_name = "FILE", value_delimiter = ',')]
    pub trainer_key: Option<Vec<PathBuf>>,
    /// Hours an unreferenced blob is kept before garbage collection removes it [default: 24].
    #[arg(long, env = "LLMCHAIN_BLOB_GC_GRACE_H", value_name = "HOURS")]
    pub blob_gc_grace_h: Option<u64>,
}

/// Validated settings of `coordinator serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// RPC limits.
    pub limits: Limits,
    /// State store spec.
    pub store: String,
    /// Blob store spec (a directory or an `s3://` URL).
    pub blobs: String,
    /// Trainer public key files.
    pub trainer_keys: Vec<PathBuf>,
    /// Grace period before unreferenced blobs are deleted.
    pub blob_gc_grace: Duration,
}

impl ServeArgs {
    /// Layers flags/env over the optional file and fills defaults.
    pub fn resolve(&self, file: Option<&std::path::Path>) -> anyhow::Result<ServeSettings> {
        let merged: ServeArgs = llmchain_runtime::config::load(self, file)?;
        let defaults = Limits::default();
        let limits = Limits {
            request_timeout: merged
                .request_timeout_s
                .map(Duration::from_secs)
                .unwrap_or(defaults.request_timeout),
            per_connection_concurrency: merged
                .max_concurrent_per_conn
                .unwrap_or(defaults.per_connection_concurrency),
            global_concurrency: merged.max_concurrent.unwrap_or(defaults.global_concurrency),
            max_message_bytes: merged.max_message_bytes.unwrap_or(defaults.max_message_bytes),
        };
        anyhow::ensure!(limits.request_timeout > Duration::ZERO, "request_timeout_s must be at least 1");
        anyhow::ensure!(limits.per_connection_concurrency > 0, "max_concurrent_per_conn must be at least 1");
        anyhow::ensure!(limits.global_concurrency > 0, "max_concurrent must be at least 1");
        anyhow::ensure!(limits.max_message_bytes >= 64 << 10, "max_message_bytes must be at least 65536");
        Ok(ServeSettings {
            listen: merged.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7400))),
            limits,
            store: merged.store.unwrap_or_else(|| "embedded:llmchain-data/state.redb".into()),
            blobs: merged.blobs.unwrap_or_else(|| "llmchain-data/blobs".into()),
            trainer_keys: merged.trainer_key.unwrap_or_default(),
            blob_gc_grace: Duration::from_secs(3600 * merged.blob_gc_grace_h.unwrap_or(24)),
        })
    }
}

/// Path of the config file from `--config` / `LLMCHAIN_CONFIG`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFile {
    /// TOML file with the same keys as the long flags (underscores for dashes).
    #[arg(long, env = "LLMCHAIN_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}
