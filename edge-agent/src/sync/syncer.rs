//! The syncer: `GetManifest`, verification, delta planning and resumable `FetchBlob`
//! downloads into the [`BlobCache`].
//!
//! Retries: a transient failure (connection lost, `UNAVAILABLE`, idle stream) is retried with
//! exponential backoff and jitter, resuming at the first byte not yet received; a download
//! gives up after `max_attempts` consecutive attempts that brought no new byte. Bytes that do
//! not match the manifest (digest, size, or a chunk out of place) discard the part file and
//! refetch from zero, at most `max_corrupt_retries` times. Chunk writes and hashing happen
//! inline (one chunk at a time, bounded); re-hashing a whole part file runs on the blocking
//! pool.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::{Read, Write},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use futures::{StreamExt, TryStreamExt, stream};
use llmchain_artifact::{Hasher, TrustedKeys, plan_delta};
use llmchain_proto::{
    fetch,
    model::{Digest, ModelRef, SignedManifest},
    pb::{self, registry_client::RegistryClient},
};
use llmchain_runtime::telemetry::{TracedChannel, traced};
use rand::Rng;
use tokio::{sync::watch, time::timeout};
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};
use tracing::{debug, info, info_span, warn};

use super::{
    BlobCache, LocalVersion, Progress, RateLimiter, SyncerConfig,
    error::{Refusal, Result, SyncError},
    verify::verify_manifest,
};

/// HTTP/2 frame size, as the coordinator recommends (`registry::grpc::H2_MAX_FRAME_BYTES`):
/// one frame per 1 MiB chunk (with its 17 header bytes) instead of 64.
const H2_MAX_FRAME_BYTES: u32 = (1 << 20) + (16 << 10);
/// HTTP/2 stream and connection windows, as the coordinator recommends
/// (`registry::grpc::H2_WINDOW_BYTES`), so flow control never waits on a round trip.
const H2_WINDOW_BYTES: u32 = 16 << 20;
/// Largest message accepted: `GetManifest` carries a manifest of up to 16 MiB twice.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Counters of the syncer's work over its lifetime.
#[derive(Debug, Default)]
pub struct SyncMetrics {
    received_bytes: AtomicU64,
    corrupt_blobs: AtomicU64,
    resumes: AtomicU64,
    retries: AtomicU64,
    blobs_fetched: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// A copy of [`SyncMetrics`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Blob bytes received over the wire (including bytes later found corrupt).
    pub received_bytes: u64,
    /// Blob transfers rejected because the bytes did not match the manifest.
    pub corrupt_blobs: u64,
    /// `FetchBlob` calls that started past offset 0 (after a cut or a restart).
    pub resumes: u64,
    /// Attempts retried after a transient failure.
    pub retries: u64,
    /// Blobs verified and moved into the cache.
    pub blobs_fetched: u64,
    /// Blobs of fetched versions that were already in the cache.
    pub cache_hits: u64,
    /// Blobs of fetched versions the cache lacked (downloaded or resumed).
    pub cache_misses: u64,
}

impl SyncMetrics {
    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            received_bytes: self.received_bytes.load(Relaxed),
            corrupt_blobs: self.corrupt_blobs.load(Relaxed),
            resumes: self.resumes.load(Relaxed),
            retries: self.retries.load(Relaxed),
            blobs_fetched: self.blobs_fetched.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
        }
    }
}

/// How one attempt at a blob range ended, short of success.
enum Attempt {
    /// Worth retrying from where it stopped.
    Transient(String),
    /// The bytes do not match the manifest: discard the part and start over.
    Corrupt(String),
    /// Retrying does not help.
    Fatal(SyncError),
}

fn retryable(code: Code) -> bool {
    // Unknown and Internal cover h2 errors of a connection cut mid-stream.
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

fn classify(what: &str, status: Status) -> Attempt {
    if retryable(status.code()) {
        Attempt::Transient(format!("{:?}: {}", status.code(), status.message()))
    } else {
        Attempt::Fatal(SyncError::Rpc {
            what: what.to_string(),
            code: status.code(),
            message: status.message().into(),
        })
    }
}

/// A download's shared state: the version and its progress counter.
struct Download<'a> {
    target: &'a ModelRef,
    done: AtomicU64,
}

/// Fetches verified model versions from the coordinator's registry into a [`BlobCache`].
pub struct Syncer {
    client: RegistryClient<TracedChannel>,
    /// The client's channel, for `FetchBlob` ([`llmchain_proto::fetch`]: chunks without a copy).
    channel: TracedChannel,
    cache: BlobCache,
    config: SyncerConfig,
    limiter: Option<RateLimiter>,
    metrics: Arc<SyncMetrics>,
    progress: watch::Sender<Option<Progress>>,
}

impl Syncer {
    /// An endpoint for `url` tuned for blob transfer (large HTTP/2 windows and frames, no
    /// Nagle, keep-alives that notice a dead link).
    pub fn endpoint(url: &str, config: &SyncerConfig) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| SyncError::Connect { url: url.to_string(), message: e.to_string() })?;
        Ok(endpoint
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(H2_WINDOW_BYTES)
            .initial_connection_window_size(H2_WINDOW_BYTES)
            .max_frame_size(H2_MAX_FRAME_BYTES)
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(20)))
    }

    /// A syncer for the coordinator at `url`; connects on first use and reconnects as needed.
    pub fn connect_lazy(url: &str, cache: BlobCache, config: SyncerConfig) -> Result<Self> {
        let channel = Self::endpoint(url, &config)?.connect_lazy();
        Ok(Self::new(channel, cache, config))
    }

    /// A syncer over an existing channel (see [`Syncer::endpoint`] for suitable settings);
    /// its calls carry the caller's trace context.
    pub fn new(channel: Channel, cache: BlobCache, config: SyncerConfig) -> Self {
        let channel = traced(channel);
        let client = RegistryClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let limiter = config.max_rate.map(RateLimiter::new);
        let progress = watch::Sender::new(None);
        Syncer { client, channel, cache, config, limiter, metrics: Arc::default(), progress }
    }

    /// The cache the syncer fills.
    pub fn cache(&self) -> &BlobCache {
        &self.cache
    }

    /// The pinned trainer keys.
    pub fn trusted_keys(&self) -> &TrustedKeys {
        &self.config.trusted_keys
    }

    /// Progress of the current (or last) download; `None` before the first.
    pub fn progress(&self) -> Option<Progress> {
        self.progress.borrow().clone()
    }

    /// A watch of [`Syncer::progress`] (for [`super::spawn_progress_display`]).
    pub fn watch_progress(&self) -> watch::Receiver<Option<Progress>> {
        self.progress.subscribe()
    }

    /// The counters, shared (for a metrics endpoint).
    pub fn metrics_handle(&self) -> Arc<SyncMetrics> {
        self.metrics.clone()
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Fetches `id`: verifies its signed manifest, stores it, and downloads the blobs the
    /// cache lacks (tensors and tokenizer), resuming any part files.
    #[tracing::instrument(
        name = "fetch",
        skip(self),
        fields(%id, blobs = tracing::field::Empty, delta_bytes = tracing::field::Empty, reused_bytes = tracing::field::Empty)
    )]
    pub async fn fetch_version(&self, id: &ModelRef) -> Result<LocalVersion> {
        let signed = self.get_manifest(id).await?;
        let manifest = info_span!("verify", key_id = %signed.key_id)
            .in_scope(|| verify_manifest(&self.config.trusted_keys, &signed, id, SystemTime::now()))?;
        // Stored before its blobs, so garbage collection that pins a pending version keeps
        // what it has downloaded so far; `load_version` tells a complete version apart.
        self.cache.store_version(id, &signed)?;

        let have: HashSet<Digest> = manifest.blob_digests().filter(|d| self.cache.has(d)).collect();
        let plan = plan_delta(&manifest, &have);
        let mut needed: Vec<(Digest, u64)> = plan.needed.iter().map(|t| (t.digest, t.size)).collect();
        let tokenizer = (manifest.tokenizer.digest, manifest.tokenizer.size);
        if !have.contains(&tokenizer.0) && !needed.iter().any(|(d, _)| *d == tokenizer.0) {
            needed.push(tokenizer);
        }
        let downloaded_bytes: u64 = needed.iter().map(|(_, s)| s).sum();
        self.metrics.cache_hits.fetch_add(have.len() as u64, Relaxed);
        self.metrics.cache_misses.fetch_add(needed.len() as u64, Relaxed);
        let mut seen = HashSet::new();
        let sizes = manifest.tensors.iter().map(|t| (t.digest, t.size)).chain(std::iter::once(tokenizer));
        let reused_bytes: u64 =
            sizes.filter(|(d, _)| have.contains(d) && seen.insert(*d)).map(|(_, s)| s).sum();

        tracing::Span::current()
            .record("blobs", needed.len())
            .record("delta_bytes", downloaded_bytes)
            .record("reused_bytes", reused_bytes);
        info!(%id, blobs = needed.len(), delta_bytes = downloaded_bytes, reused_bytes, "syncing model version");
        self.progress.send_replace(Some(Progress {
            target: id.clone(),
            done_bytes: 0,
            total_bytes: downloaded_bytes,
        }));
        let download = Download { target: id, done: AtomicU64::new(0) };
        stream::iter(needed)
            .map(|(digest, size)| self.fetch_blob(&download, digest, size))
            .buffer_unordered(self.config.concurrency.max(1))
            .try_collect::<()>()
            .await?;
        info!(%id, downloaded_bytes, reused_bytes, "model version in cache");
        Ok(LocalVersion { manifest, blobs: self.cache.blob_dir().clone(), downloaded_bytes, reused_bytes })
    }

    fn backoff(&self, failures: u32) -> Duration {
        let base =
            self.config.backoff_initial.saturating_mul(1 << failures.min(20)).min(self.config.backoff_max);
        // Jitter spreads reconnecting agents over [base/2, base].
        let half = base / 2;
        half + half.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    async fn get_manifest(&self, id: &ModelRef) -> Result<SignedManifest> {
        let what = format!("GetManifest {id}");
        let mut failures = 0;
        loop {
            let req = pb::GetManifestRequest { model: id.model.to_string(), version: id.version };
            let mut client = self.client.clone();
            let last = match timeout(self.config.idle_timeout, client.get_manifest(req)).await {
                Ok(Ok(resp)) => {
                    let invalid = |reason: String| Refusal::InvalidManifest { requested: id.clone(), reason };
                    let signed =
                        resp.into_inner().signed.ok_or_else(|| invalid("the answer has none".into()))?;
                    return SignedManifest::try_from(signed).map_err(|e| invalid(e.to_string()).into());
                }
                Ok(Err(status)) if status.code() == Code::NotFound => {
                    return Err(SyncError::NotFound { id: id.clone() });
                }
                Ok(Err(status)) => match classify(&what, status) {
                    Attempt::Fatal(e) => return Err(e),
                    Attempt::Transient(m) | Attempt::Corrupt(m) => m,
                },
                Err(_) => format!("no answer within {:?}", self.config.idle_timeout),
            };
            failures += 1;
            if failures >= self.config.max_attempts {
                return Err(SyncError::RetriesExhausted { what, attempts: failures, last });
            }
            self.metrics.retries.fetch_add(1, Relaxed);
            let delay = self.backoff(failures - 1);
            warn!(%id, attempt = failures, error = %last, ?delay, "manifest fetch failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// Re-hashes the part file of `digest`, returning the hasher state and its length; a part
    /// longer than the blob is discarded.
    async fn rehash_part(&self, digest: Digest, size: u64) -> Result<(Hasher, u64)> {
        let path = self.cache.part_path(&digest);
        let p = path.clone();
        let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Hasher>> {
            let mut file = match File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let mut hasher = Hasher::new();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => return Ok(Some(hasher)),
                    Ok(n) => hasher.update(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                if hasher.len() > size {
                    drop(file);
                    fs::remove_file(&p)?;
                    return Ok(None);
                }
            }
        })
        .await
        .map_err(|e| SyncError::cache(&path)(std::io::Error::other(e)))?
        .map_err(SyncError::cache(&path))?;
        Ok(hashed
            .map(|h| {
                let len = h.len();
                (h, len)
            })
            .unwrap_or_default())
    }

    /// Downloads one blob into the cache, resuming its part file.
    #[tracing::instrument(name = "fetch_blob", skip(self, download), fields(%digest, size))]
    async fn fetch_blob(&self, download: &Download<'_>, digest: Digest, size: u64) -> Result<()> {
        let part = self.cache.part_path(&digest);
        let mut corrupt = 0;
        loop {
            let (mut hasher, mut have) = self.rehash_part(digest, size).await?;
            if have > 0 {
                debug!(%digest, have, size, "resuming from the part file");
                self.advance(download, have);
            }
            let mut file =
                OpenOptions::new().create(true).append(true).open(&part).map_err(SyncError::cache(&part))?;
            let reason = match self.receive(download, digest, size, &mut file, &mut hasher, &mut have).await {
                Ok(()) => {
                    let actual = hasher.finish();
                    if actual == digest {
                        file.sync_data().map_err(SyncError::cache(&part))?;
                        drop(file);
                        self.cache.commit_part(&digest)?;
                        self.metrics.blobs_fetched.fetch_add(1, Relaxed);
                        return Ok(());
                    }
                    format!("bytes hash to {actual}")
                }
                Err(Attempt::Corrupt(reason)) => reason,
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Transient(_)) => unreachable!("receive retries transient failures itself"),
            };
            drop(file);
            corrupt += 1;
            self.metrics.corrupt_blobs.fetch_add(1, Relaxed);
            fs::remove_file(&part).map_err(SyncError::cache(&part))?;
            download.done.fetch_sub(have, Relaxed);
            self.report(download);
            if corrupt > self.config.max_corrupt_retries {
                return Err(SyncError::Corrupt { digest, times: corrupt, last: reason });
            }
            warn!(%digest, size, error = %reason, attempt = corrupt, "blob arrived corrupt; refetching from zero");
        }
    }

    fn advance(&self, download: &Download<'_>, n: u64) {
        download.done.fetch_add(n, Relaxed);
        self.report(download);
    }

    fn report(&self, download: &Download<'_>) {
        self.progress.send_modify(|p| {
            if let Some(p) = p.as_mut().filter(|p| p.target == *download.target) {
                // Loaded under the watch's lock, so concurrent downloads never publish an
                // older count after a newer one.
                p.done_bytes = download.done.load(Relaxed).min(p.total_bytes);
            }
        });
    }

    /// Receives the rest of a blob (from `*have`) into `file`, retrying transient failures.
    async fn receive(
        &self,
        download: &Download<'_>,
        digest: Digest,
        size: u64,
        file: &mut File,
        hasher: &mut Hasher,
        have: &mut u64,
    ) -> Result<(), Attempt> {
        let mut failures = 0;
        while *have < size {
            let before = *have;
            let last = match self.stream_range(download, digest, size, file, hasher, have).await {
                Ok(()) if *have < size => format!("stream ended at byte {have} of {size}"),
                Ok(()) => break,
                Err(Attempt::Transient(m)) => m,
                Err(other) => return Err(other),
            };
            failures = if *have > before { 0 } else { failures + 1 };
            if failures >= self.config.max_attempts {
                return Err(Attempt::Fatal(SyncError::RetriesExhausted {
                    what: format!("FetchBlob {digest}"),
                    attempts: failures,
                    last,
                }));
            }
            self.metrics.retries.fetch_add(1, Relaxed);
            let delay = self.backoff(failures);
            warn!(%digest, at = *have, size, attempt = failures, error = %last, ?delay, "blob transfer broke; resuming");
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    /// One `FetchBlob` call from `*have` to the end.
    async fn stream_range(
        &self,
        download: &Download<'_>,
        digest: Digest,
        size: u64,
        file: &mut File,
        hasher: &mut Hasher,
        have: &mut u64,
    ) -> Result<(), Attempt> {
        let what = format!("FetchBlob {digest}");
        let idle = self.config.idle_timeout;
        if *have > 0 {
            self.metrics.resumes.fetch_add(1, Relaxed);
        }
        let req = pb::FetchBlobRequest {
            digest: digest.to_string(),
            offset: *have,
            length: 0,
            chunk_size: self.config.chunk_size,
        };
        let mut channel = self.channel.clone();
        let mut chunks = match timeout(idle, fetch::fetch_blob(&mut channel, req, MAX_MESSAGE_BYTES)).await {
            Ok(Ok(chunks)) => chunks,
            Ok(Err(status)) => return Err(classify(&what, status)),
            Err(_) => return Err(Attempt::Transient(format!("no answer within {idle:?}"))),
        };
        loop {
            let chunk = match timeout(idle, chunks.message()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(status)) => return Err(classify(&what, status)),
                Err(_) => return Err(Attempt::Transient(format!("stream idle for {idle:?}"))),
            };
            let n = chunk.data.len() as u64;
            self.metrics.received_bytes.fetch_add(n, Relaxed);
            if chunk.offset != *have || chunk.total_size != size || *have + n > size {
                return Err(Attempt::Corrupt(format!(
                    "chunk of {n} bytes at offset {} of {} does not continue byte {have} of {size}",
                    chunk.offset, chunk.total_size
                )));
            }
            if let Some(limiter) = &self.limiter {
                limiter.acquire(n).await;
            }
            let path = || self.cache.part_path(&digest);
            file.write_all(&chunk.data).map_err(|e| Attempt::Fatal(SyncError::cache(path())(e)))?;
            hasher.update(&chunk.data);
            *have += n;
            self.advance(download, n);
        }
    }
}
