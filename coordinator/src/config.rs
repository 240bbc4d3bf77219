//! `coordinator serve` configuration: flags > `LLMCHAIN_*` environment > TOML file > defaults.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{fleet::FleetConfig, rollout::ControllerConfig, server::Limits};

/// Flags of `coordinator serve`; every one may also come from the environment or the file.
#[derive(Debug, Default, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// Address of the gRPC listener [default: 127.0.0.1:7400].
    #[arg(long, env = "LLMCHAIN_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address of the HTTP listener: the dashboard on `/`, Prometheus `/metrics`, `/healthz`
    /// and the dashboard's `/api/*` [default: 127.0.0.1:9090, skipped with a warning when that
    /// port is taken; an address given explicitly must be free].
    #[arg(long, env = "LLMCHAIN_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Deadline of one unary RPC, in seconds [default: 30].
    #[arg(long, env = "LLMCHAIN_REQUEST_TIMEOUT_S", value_name = "SECS")]
    pub request_timeout_s: Option<u64>,
    /// Concurrent requests per connection [default: 256].
    #[arg(long, env = "LLMCHAIN_MAX_CONCURRENT_PER_CONN", value_name = "N")]
    pub max_concurrent_per_conn: Option<usize>,
    /// Concurrent requests across connections before shedding load [default: 4096].
    #[arg(long, env = "LLMCHAIN_MAX_CONCURRENT", value_name = "N")]
    pub max_concurrent: Option<usize>,
    /// Largest request message any service accepts, in bytes; larger ones are refused with
    /// OUT_OF_RANGE [default: each service's own limit: registry 17 MiB, fleet 16 MiB, rollouts
    /// 4 MiB].
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
    /// How often agents must heartbeat on their session, in milliseconds [default: 5000].
    #[arg(long, env = "LLMCHAIN_HEARTBEAT_INTERVAL_MS", value_name = "MS")]
    pub heartbeat_interval_ms: Option<u32>,
    /// Silence after which an agent shows offline and its session ends, in milliseconds; more
    /// than the heartbeat interval (etcd rounds it up to whole seconds) [default: 15000].
    #[arg(long, env = "LLMCHAIN_LEASE_TTL_MS", value_name = "MS")]
    pub lease_ttl_ms: Option<u32>,
    /// How often the leading coordinator advances rollouts, in milliseconds [default: 500].
    #[arg(long, env = "LLMCHAIN_CONTROLLER_TICK_MS", value_name = "MS")]
    pub controller_tick_ms: Option<u32>,
    /// TTL of the rollout controller's leader lease, in milliseconds: a crashed leader is
    /// replaced after about this long (etcd rounds it up to whole seconds) [default: 10000].
    #[arg(long, env = "LLMCHAIN_CONTROLLER_LEASE_TTL_MS", value_name = "MS")]
    pub controller_lease_ttl_ms: Option<u32>,
    /// This coordinator's name in the leader election and rollout histories, e.g. the pod
    /// name [default: coordinator-HEX, with 16 random hex digits].
    #[arg(long, env = "LLMCHAIN_COORDINATOR_ID", value_name = "NAME")]
    pub coordinator_id: Option<String>,
    /// Directory of the CA, the serving certificate and the first operator identity
    /// (`admin.pem`/`admin.key`), generated on first start and reused after; private keys are
    /// 0600 [default: llmchain-data/tls].
    #[arg(long, env = "LLMCHAIN_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Name or IP address the serving certificate is valid for; repeat the flag (or separate
    /// with commas) for several. Used when the certificate is generated [default:
    /// localhost,127.0.0.1].
    #[arg(long, env = "LLMCHAIN_TLS_SANS", value_name = "NAME", value_delimiter = ',')]
    pub tls_san: Option<Vec<String>>,
    /// Lifetime of the certificates issued at enrollment, e.g. `30d`, `12h` [default: 30d].
    #[arg(long, env = "LLMCHAIN_CERT_VALIDITY", value_name = "DURATION")]
    pub cert_validity: Option<String>,
    /// Serve plaintext gRPC without identities or authorization: for local development only,
    /// never on a network you do not control.
    #[arg(long, env = "LLMCHAIN_INSECURE", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub insecure: Option<bool>,
    /// Requests per second each identity (agent, trainer, operator) may make; more are refused
    /// with RESOURCE_EXHAUSTED. A stream counts once, when it opens [default: 200].
    #[arg(long, env = "LLMCHAIN_RATE_LIMIT_RPS", value_name = "N")]
    pub rate_limit_rps: Option<u32>,
    /// Requests an identity may make at once after a quiet period [default: 1000].
    #[arg(long, env = "LLMCHAIN_RATE_LIMIT_BURST", value_name = "N")]
    pub rate_limit_burst: Option<u32>,
}

/// Validated settings of `coordinator serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP (dashboard, `/metrics`) listen address.
    pub http_listen: SocketAddr,
    /// True when `http_listen` is the default rather than configured: a busy port is then
    /// only a warning, so several coordinators on one machine still start.
    pub http_listen_defaulted: bool,
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
    /// Agent session timing.
    pub fleet: FleetConfig,
    /// Rollout controller timing.
    pub controller: ControllerConfig,
    /// This coordinator's name in elections and histories.
    pub coordinator_id: String,
    /// TLS settings; `None` with `--insecure`.
    pub tls: Option<crate::pki::TlsSettings>,
    /// Requests each identity may make.
    pub rate_limit: crate::auth::RateLimit,
}

impl ServeArgs {
    /// Layers flags/env over the optional file and fills defaults.
    pub fn resolve(&self, file: Option<&std::path::Path>) -> anyhow::Result<ServeSettings> {
        let merged: ServeArgs = llmchain_runtime::config::load(self, file)?;
        let tls = tls_settings(&merged)?;
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
            max_message_bytes: merged.max_message_bytes.or(defaults.max_message_bytes),
        };
        anyhow::ensure!(limits.request_timeout > Duration::ZERO, "request_timeout_s must be at least 1");
        anyhow::ensure!(limits.per_connection_concurrency > 0, "max_concurrent_per_conn must be at least 1");
        anyhow::ensure!(limits.global_concurrency > 0, "max_concurrent must be at least 1");
        anyhow::ensure!(
            limits.max_message_bytes.is_none_or(|n| n >= 64 << 10),
            "max_message_bytes must be at least 65536"
        );
        let fleet_defaults = FleetConfig::default();
        let fleet = FleetConfig {
            heartbeat_interval: merged
                .heartbeat_interval_ms
                .map(|ms| Duration::from_millis(ms.into()))
                .unwrap_or(fleet_defaults.heartbeat_interval),
            lease_ttl: merged
                .lease_ttl_ms
                .map(|ms| Duration::from_millis(ms.into()))
                .unwrap_or(fleet_defaults.lease_ttl),
        };
        anyhow::ensure!(
            fleet.heartbeat_interval >= Duration::from_millis(10),
            "heartbeat_interval_ms must be at least 10"
        );
        anyhow::ensure!(
            fleet.lease_ttl > fleet.heartbeat_interval,
            "lease_ttl_ms ({}) must exceed heartbeat_interval_ms ({})",
            fleet.lease_ttl.as_millis(),
            fleet.heartbeat_interval.as_millis()
        );
        let controller_defaults = ControllerConfig::default();
        let controller = ControllerConfig {
            tick: merged
                .controller_tick_ms
                .map(|ms| Duration::from_millis(ms.into()))
                .unwrap_or(controller_defaults.tick),
            lease_ttl: merged
                .controller_lease_ttl_ms
                .map(|ms| Duration::from_millis(ms.into()))
                .unwrap_or(controller_defaults.lease_ttl),
        };
        anyhow::ensure!(
            controller.tick >= Duration::from_millis(10),
            "controller_tick_ms must be at least 10"
        );
        anyhow::ensure!(
            controller.lease_ttl >= Duration::from_secs(1),
            "controller_lease_ttl_ms must be at least 1000"
        );
        let rate_defaults = crate::auth::RateLimit::default();
        let nonzero = |v: Option<u32>, default: std::num::NonZeroU32, what: &str| match v {
            None => Ok(default),
            Some(v) => {
                std::num::NonZeroU32::new(v).ok_or_else(|| anyhow::anyhow!("{what} must be at least 1"))
            }
        };
        let rate_limit = crate::auth::RateLimit {
            per_second: nonzero(merged.rate_limit_rps, rate_defaults.per_second, "rate_limit_rps")?,
            burst: nonzero(merged.rate_limit_burst, rate_defaults.burst, "rate_limit_burst")?,
        };
        let coordinator_id =
            merged.coordinator_id.unwrap_or_else(|| format!("coordinator-{}", crate::fleet::fresh_id()));
        anyhow::ensure!(
            !coordinator_id.is_empty()
                && coordinator_id.len() <= 128
                && coordinator_id.bytes().all(|b| b.is_ascii_graphic()),
            "coordinator_id must be 1-128 printable ASCII characters"
        );
        Ok(ServeSettings {
            listen: merged.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7400))),
            http_listen: merged.http_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
            http_listen_defaulted: merged.http_listen.is_none(),
            limits,
            store: merged.store.unwrap_or_else(|| "embedded:llmchain-data/state.redb".into()),
            blobs: merged.blobs.unwrap_or_else(|| "llmchain-data/blobs".into()),
            trainer_keys: merged.trainer_key.unwrap_or_default(),
            blob_gc_grace: Duration::from_secs(3600 * merged.blob_gc_grace_h.unwrap_or(24)),
            fleet,
            controller,
            coordinator_id,
            tls,
            rate_limit,
        })
    }
}

fn tls_settings(merged: &ServeArgs) -> anyhow::Result<Option<crate::pki::TlsSettings>> {
    if merged.insecure.unwrap_or(false) {
        return Ok(None);
    }
    let cert_validity = match &merged.cert_validity {
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| anyhow::anyhow!("cert_validity {text:?} is not a duration like 30d or 12h: {e}"))?,
        None => Duration::from_secs(30 * 24 * 3600),
    };
    anyhow::ensure!(cert_validity >= Duration::from_secs(60), "cert_validity must be at least 1m");
    let sans = merged.tls_san.clone().unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into()]);
    anyhow::ensure!(
        !sans.is_empty() && sans.iter().all(|s| !s.trim().is_empty()),
        "tls_san must not be empty"
    );
    Ok(Some(crate::pki::TlsSettings {
        dir: merged.tls_dir.clone().unwrap_or_else(|| "llmchain-data/tls".into()),
        sans: sans.iter().map(|s| s.trim().to_string()).collect(),
        cert_validity,
    }))
}

/// Path of the config file from `--config` / `LLMCHAIN_CONFIG`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigFile {
    /// TOML file with the same keys as the long flags (underscores for dashes).
    #[arg(long, env = "LLMCHAIN_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_timing_defaults_and_must_leave_room_for_a_heartbeat() {
        let defaults = ServeArgs::default().resolve(None).unwrap();
        assert_eq!(defaults.fleet, FleetConfig::default());
        assert_eq!(defaults.fleet.heartbeat_interval, Duration::from_millis(5000));
        assert_eq!(defaults.fleet.lease_ttl, Duration::from_millis(15_000));
        let args =
            ServeArgs { heartbeat_interval_ms: Some(300), lease_ttl_ms: Some(1000), ..Default::default() };
        let fleet = args.resolve(None).unwrap().fleet;
        assert_eq!(
            (fleet.heartbeat_interval, fleet.lease_ttl),
            (Duration::from_millis(300), Duration::from_secs(1))
        );
        let args =
            ServeArgs { heartbeat_interval_ms: Some(2000), lease_ttl_ms: Some(1000), ..Default::default() };
        let err = args.resolve(None).unwrap_err().to_string();
        assert!(err.contains("lease_ttl_ms"), "{err}");
    }

    #[test]
    fn controller_timing_and_identity() {
        let defaults = ServeArgs::default().resolve(None).unwrap();
        assert_eq!(defaults.controller, ControllerConfig::default());
        assert!(defaults.coordinator_id.starts_with("coordinator-"), "{}", defaults.coordinator_id);
        let args = ServeArgs {
            controller_tick_ms: Some(100),
            controller_lease_ttl_ms: Some(2000),
            coordinator_id: Some("pod-7".into()),
            ..Default::default()
        };
        let settings = args.resolve(None).unwrap();
        assert_eq!(
            (settings.controller.tick, settings.controller.lease_ttl, settings.coordinator_id.as_str()),
            (Duration::from_millis(100), Duration::from_secs(2), "pod-7")
        );
        let err =
            ServeArgs { controller_lease_ttl_ms: Some(10), ..Default::default() }.resolve(None).unwrap_err();
        assert!(err.to_string().contains("controller_lease_ttl_ms"), "{err}");
        let err =
            ServeArgs { coordinator_id: Some("a b".into()), ..Default::default() }.resolve(None).unwrap_err();
        assert!(err.to_string().contains("coordinator_id"), "{err}");
    }

    #[test]
    fn the_file_supplies_fleet_timing_that_flags_override() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator.toml");
        std::fs::write(&file, "heartbeat_interval_ms = 1000\nlease_ttl_ms = 4000\n").unwrap();
        let from_file = ServeArgs::default().resolve(Some(&file)).unwrap().fleet;
        assert_eq!(
            (from_file.heartbeat_interval, from_file.lease_ttl),
            (Duration::from_secs(1), Duration::from_secs(4))
        );
        let flags = ServeArgs { lease_ttl_ms: Some(9000), ..Default::default() };
        let merged = flags.resolve(Some(&file)).unwrap().fleet;
        assert_eq!(
            (merged.heartbeat_interval, merged.lease_ttl),
            (Duration::from_secs(1), Duration::from_secs(9))
        );
    }
}
