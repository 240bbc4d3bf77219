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
}

/// Validated settings of `coordinator serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// RPC limits.
    pub limits: Limits,
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
