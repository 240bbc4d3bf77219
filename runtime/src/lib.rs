//! Runtime pieces every LLMChain binary shares: telemetry setup, configuration layering
//! (flags > `LLMCHAIN_*` environment > TOML file > defaults) and graceful shutdown.

pub mod config;
pub mod enroll;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

/// Errors of the shared runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigRead { path: String, source: std::io::Error },
    /// The configuration file or a merged value is invalid.
    #[error("invalid config {path}: {message}")]
    ConfigInvalid { path: String, message: String },
    /// Telemetry could not be installed.
    #[error("telemetry setup failed: {0}")]
    Telemetry(String),
    /// TLS material is missing or invalid, or enrollment failed.
    #[error("tls: {0}")]
    Tls(String),
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
