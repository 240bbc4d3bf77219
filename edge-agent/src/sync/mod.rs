//! Model versions from the coordinator: manifest verification, delta download with resume
//! into a local blob cache, and cache garbage collection.
//!
//! [`Syncer::fetch_version`] asks the registry for a signed manifest, verifies it against the
//! pinned trainer keys before trusting any byte of it, stores it in the [`BlobCache`], and
//! downloads the blobs the cache lacks with `FetchBlob`. A download appends to a part file
//! and resumes from it after a broken connection or a restart; a blob reaches its final name
//! only after its size and sha256 match the manifest. Invariants:
//! - nothing is cached from a manifest that failed verification;
//! - a file under a final cache name is complete and verified (see [`cache`]);
//! - downgrade and rollback decisions are the caller's: the syncer fetches what it is asked.

pub mod cache;
pub mod error;
pub mod progress;
pub mod rate;
mod syncer;
pub mod verify;

use std::time::Duration;

pub use cache::{BlobCache, GcReport};
pub use error::{ErrorKind, Refusal, Result, SyncError};
use llmchain_artifact::{BlobDir, Manifest, TrustedKeys};
pub use progress::{Progress, spawn_progress_display};
pub use rate::RateLimiter;
pub use syncer::{MetricsSnapshot, SyncMetrics, Syncer};
pub use verify::verify_manifest;

/// A version whose blobs are all in the local cache.
#[derive(Debug, Clone)]
pub struct LocalVersion {
    /// The verified manifest.
    pub manifest: Manifest,
    /// Where its blobs are (the cache's blob directory).
    pub blobs: BlobDir,
    /// Bytes of the blobs that were missing and are now downloaded (resumed parts included).
    pub downloaded_bytes: u64,
    /// Bytes of the blobs that were already in the cache.
    pub reused_bytes: u64,
}

/// Settings of a [`Syncer`].
#[derive(Debug, Clone)]
pub struct SyncerConfig {
    /// The pinned trainer keys: a manifest must be signed by one of them.
    pub trusted_keys: TrustedKeys,
    /// Chunk size asked of `FetchBlob` (at most 4 MiB).
    pub chunk_size: u32,
    /// Blobs downloaded at the same time.
    pub concurrency: usize,
    /// Consecutive attempts without a new byte before a download gives up.
    pub max_attempts: u32,
    /// First retry delay; doubles per failed attempt, with jitter.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Times one blob may arrive corrupt (and be refetched from zero) before giving up.
    pub max_corrupt_retries: u32,
    /// Cap on received bytes per second (`--max-download-rate`); `None` is unlimited.
    pub max_rate: Option<u64>,
    /// A call or stream that delivers nothing for this long is abandoned and retried.
    pub idle_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
}

/// The defaults trust no key (every manifest is refused): set `trusted_keys`.
impl Default for SyncerConfig {
    fn default() -> Self {
        SyncerConfig {
            trusted_keys: TrustedKeys::default(),
            chunk_size: 1 << 20,
            concurrency: 4,
            max_attempts: 8,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_corrupt_retries: 3,
            max_rate: None,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}
