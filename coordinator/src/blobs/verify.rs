//! Serving blobs only while their bytes still hash to their digest.
//!
//! Hashing a 512 MiB blob on every range request would cost more than sending it, so results
//! are cached per blob, tied to the stored object's size and write time (a rewrite invalidates
//! them):
//! - a full read (offset 0 to the end) is hashed as it streams and the **last chunk is held
//!   back** until the digest is checked, so a client never completes a corrupt blob; the
//!   result is then cached;
//! - a partial read (a resumed transfer) of a blob not verified since this process started is
//!   preceded by a full verification;
//! - [`VerifiedBlobs::scrub`] re-hashes everything periodically, which catches rot of blobs
//!   that were verified once and are then only read in ranges.
//!
//! A blob found corrupt is refused with `DATA_LOSS`, logged at error level, counted, and
//! reported as missing by [`VerifiedBlobs::stat`] so uploaders send it again (an upload
//! replaces the corrupt object).

use std::{
    collections::HashMap,
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use llmchain_artifact::Hasher;
use llmchain_proto::{
    ApiError,
    model::{BlobRange, Digest},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{BlobInfo, BlobStore, ByteStream, not_found};
use crate::{Error, Result};

/// Chunk size used for verification reads.
const VERIFY_CHUNK: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Good,
    Corrupt,
}

/// One chunk of a fetched blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobChunk {
    /// Offset of `data` within the blob.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
}

/// A blob range being served.
pub struct BlobFetch {
    /// Size of the whole blob.
    pub total_size: u64,
    /// The chunks of the range, in order; a `DATA_LOSS` error ends a corrupt stream.
    pub chunks: BoxStream<'static, Result<BlobChunk>>,
}

/// What one scrub pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Blobs hashed.
    pub checked: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// Blobs whose bytes no longer match their digest.
    pub corrupt: Vec<Digest>,
}

type CacheKey = (u64, SystemTime);

/// Verification results, shared with the streams that finish a full-read check.
#[derive(Default)]
struct Checks {
    map: Mutex<HashMap<Digest, (CacheKey, Check)>>,
    corruptions: AtomicU64,
}

impl Checks {
    fn get(&self, info: &BlobInfo) -> Result<Option<Check>> {
        let map = self.map.lock().map_err(|_| lock_err())?;
        Ok(map.get(&info.digest).filter(|(key, _)| *key == (info.size, info.modified)).map(|(_, c)| *c))
    }

    fn record(&self, info: &BlobInfo, check: Check) -> Result<()> {
        if check == Check::Corrupt {
            self.corruptions.fetch_add(1, Ordering::Relaxed);
            error!(digest = %info.digest, size = info.size, "blob is corrupt; refusing to serve it");
        }
        let mut map = self.map.lock().map_err(|_| lock_err())?;
        map.insert(info.digest, ((info.size, info.modified), check));
        Ok(())
    }
}

/// A [`BlobStore`] wrapped with cached integrity checks; the only way the servers read blobs.
pub struct VerifiedBlobs {
    store: Arc<dyn BlobStore>,
    checks: Arc<Checks>,
}

fn lock_err() -> Error {
    ApiError::Internal("verification cache lock poisoned".into()).into()
}

fn corrupt(digest: &Digest) -> Error {
    ApiError::DataLoss(format!("blob {digest} is corrupt: its bytes no longer match its digest")).into()
}

/// Starts hashing one chunk off the async runtime (sha256 of a MiB takes about half a
/// millisecond with the SHA extensions); the work starts now, not when the result is awaited.
fn hash_chunk(mut hasher: Hasher, data: Bytes) -> impl Future<Output = Result<Hasher>> {
    let task = tokio::task::spawn_blocking(move || {
        hasher.update(&data);
        hasher
    });
    async move { task.await.map_err(|e| ApiError::Internal(format!("hashing task failed: {e}")).into()) }
}

/// Attaches offsets to the raw chunks of `range`.
fn with_offsets(range: Range<u64>, raw: ByteStream) -> BoxStream<'static, Result<BlobChunk>> {
    raw.scan(range.start, |offset, chunk| {
        let item = chunk.map(|data| {
            let c = BlobChunk { offset: *offset, data };
            *offset += c.data.len() as u64;
            c
        });
        futures::future::ready(Some(item))
    })
    .boxed()
}

/// Streams a whole blob while hashing it, holding the last chunk back until the digest checks.
///
/// Chunk `n` is hashed while chunk `n - 1` is being sent, so hashing adds CPU time but little
/// wall time; a chunk is sent only once it has been hashed (and its hasher clone dropped, so
/// the gRPC adapter takes its buffer without a copy).
fn hashed(info: BlobInfo, mut raw: ByteStream, checks: Arc<Checks>) -> BoxStream<'static, Result<BlobChunk>> {
    async_stream::try_stream! {
        let mut hasher = Hasher::new();
        let mut held: Option<BlobChunk> = None;
        let mut offset = 0u64;
        while let Some(data) = raw.next().await {
            let data = match data {
                Err(Error::Api(ApiError::DataLoss(_))) => {
                    checks.record(&info, Check::Corrupt)?;
                    Err(corrupt(&info.digest))?
                }
                other => other?,
            };
            let hashing = hash_chunk(hasher, data.clone());
            let len = data.len() as u64;
            if let Some(prev) = held.replace(BlobChunk { offset, data }) {
                yield prev;
            }
            hasher = hashing.await?;
            offset += len;
        }
        if hasher.len() != info.size || hasher.finish() != info.digest {
            checks.record(&info, Check::Corrupt)?;
            Err(corrupt(&info.digest))?;
        }
        checks.record(&info, Check::Good)?;
        if let Some(last) = held {
            yield last;
        }
    }
    .boxed()
}

impl VerifiedBlobs {
    /// Wraps `store`; nothing is trusted as verified yet.
    pub fn new(store: Arc<dyn BlobStore>) -> Self {
        VerifiedBlobs { store, checks: Arc::new(Checks::default()) }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// Corrupt blobs detected since start (for metrics).
    pub fn corruptions_detected(&self) -> u64 {
        self.checks.corruptions.load(Ordering::Relaxed)
    }

    /// The blob if it is stored and not known to be corrupt (a corrupt blob counts as missing,
    /// so that uploaders send it again).
    pub async fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>> {
        let Some(info) = self.store.stat(digest).await? else { return Ok(None) };
        Ok((self.checks.get(&info)? != Some(Check::Corrupt)).then_some(info))
    }

    /// Stores an upload (hashed while written, so it is recorded as verified).
    pub async fn put(&self, digest: Digest, size: u64, chunks: ByteStream) -> Result<BlobInfo> {
        let info = self.store.put(digest, size, chunks).await?;
        self.checks.record(&info, Check::Good)?;
        Ok(info)
    }

    /// Hashes the whole blob now, records the result, and fails with `DATA_LOSS` if corrupt.
    pub async fn verify(&self, digest: &Digest) -> Result<BlobInfo> {
        let info = self.store.stat(digest).await?.ok_or_else(|| not_found(digest))?;
        let mut chunks = self.store.read(digest, 0..info.size, VERIFY_CHUNK).await?;
        let mut hasher = Hasher::new();
        while let Some(chunk) = chunks.next().await {
            hasher = match chunk {
                Ok(data) => hash_chunk(hasher, data).await?,
                Err(Error::Api(ApiError::DataLoss(_))) => break,
                Err(e) => return Err(e),
            };
        }
        let good = hasher.len() == info.size && hasher.finish() == *digest;
        self.checks.record(&info, if good { Check::Good } else { Check::Corrupt })?;
        if good { Ok(info) } else { Err(corrupt(digest)) }
    }

    /// Streams a range, verified as described in the module docs.
    pub async fn fetch(&self, range: BlobRange) -> Result<BlobFetch> {
        let digest = range.digest;
        let info = self.store.stat(&digest).await?.ok_or_else(|| not_found(&digest))?;
        if range.offset > info.size {
            return Err(ApiError::invalid(
                "offset",
                format!("{} is past the end of blob {digest} ({} bytes)", range.offset, info.size),
            )
            .into());
        }
        let end = match range.length {
            Some(len) => range.offset.saturating_add(len).min(info.size),
            None => info.size,
        };
        let check = self.checks.get(&info)?;
        if check == Some(Check::Corrupt) {
            error!(%digest, "refusing to serve a blob known to be corrupt");
            return Err(corrupt(&digest));
        }
        let full = range.offset == 0 && end == info.size;
        if !full && check.is_none() {
            self.verify(&digest).await?;
        }
        let chunk_size = usize::try_from(range.chunk_size).unwrap_or(usize::MAX);
        let raw = self.store.read(&digest, range.offset..end, chunk_size).await?;
        let chunks = if full && check.is_none() {
            hashed(info, raw, Arc::clone(&self.checks))
        } else {
            with_offsets(range.offset..end, raw)
        };
        Ok(BlobFetch { total_size: info.size, chunks })
    }

    /// Re-hashes every stored blob and records the results.
    pub async fn scrub(&self) -> Result<ScrubReport> {
        let mut report = ScrubReport::default();
        for blob in self.store.list().await? {
            match self.verify(&blob.digest).await {
                Ok(info) => {
                    report.checked += 1;
                    report.bytes += info.size;
                }
                Err(Error::Api(ApiError::DataLoss(_))) => {
                    report.checked += 1;
                    report.bytes += blob.size;
                    report.corrupt.push(blob.digest);
                }
                // Deleted by garbage collection between list and verify: nothing to check.
                Err(Error::Api(ApiError::NotFound(_))) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Runs [`VerifiedBlobs::scrub`] every `every` until `cancel` fires.
    pub fn spawn_scrubber(
        self: Arc<Self>,
        every: Duration,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                match self.scrub().await {
                    Ok(r) if r.corrupt.is_empty() => {
                        info!(checked = r.checked, bytes = r.bytes, "blob scrub clean")
                    }
                    Ok(r) => error!(
                        checked = r.checked,
                        corrupt = r.corrupt.len(),
                        "blob scrub found corrupt blobs"
                    ),
                    Err(e) => warn!(error = %e, "blob scrub failed"),
                }
            }
        })
    }
}
