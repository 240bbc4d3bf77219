//! Blobs as files in a directory: `<root>/sha256/<2 hex>/<62 hex>`, uploads staged in
//! `<root>/tmp/`.
//!
//! Commit is `rename(2)` from `tmp/` into place (same file system, hence atomic) after the file
//! and then its directory are fsynced, so a crash leaves either no blob or a complete one.
//! Several coordinators may share the directory (e.g. over NFS): temporary names carry the
//! process id and a counter, and two commits of one digest replace identical bytes.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use llmchain_artifact::{Hasher, chunks};
use llmchain_proto::{ApiError, model::Digest};
use tracing::{debug, warn};

use super::{BlobInfo, BlobStore, ByteStream, not_found};
use crate::{Error, Result};

/// Temporary uploads older than this at open time are leftovers of a crash and removed.
const STALE_UPLOAD: Duration = Duration::from_secs(3600);

/// A content-addressed directory of blobs.
#[derive(Debug)]
pub struct LocalBlobStore {
    root: PathBuf,
    read_ahead: usize,
    seq: AtomicU64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Api(ApiError::Internal(format!("blocking task failed: {e}"))))?
        .map_err(Error::Io)
}

/// Removes a temporary upload unless it was committed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take()
            && let Err(e) = std::fs::remove_file(&path)
        {
            warn!(path = %path.display(), error = %e, "could not remove temporary upload");
        }
    }
}

impl LocalBlobStore {
    /// Opens (creating if needed) the store at `root` and removes stale temporary uploads.
    pub async fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let tmp = root.join("tmp");
        let sha = root.join("sha256");
        blocking(move || {
            std::fs::create_dir_all(&tmp)?;
            std::fs::create_dir_all(&sha)?;
            let now = SystemTime::now();
            for entry in std::fs::read_dir(&tmp)? {
                let entry = entry?;
                let age = entry.metadata()?.modified().ok().and_then(|m| now.duration_since(m).ok());
                if age.is_some_and(|a| a > STALE_UPLOAD) {
                    std::fs::remove_file(entry.path())?;
                }
            }
            Ok(())
        })
        .await?;
        Ok(LocalBlobStore { root, read_ahead: 4, seq: AtomicU64::new(0) })
    }

    /// How many chunks a read keeps in flight ahead of the consumer (default 4).
    pub fn with_read_ahead(mut self, chunks: usize) -> Self {
        self.read_ahead = chunks.max(1);
        self
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` is (or would be) stored.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("sha256").join(&hex[..2]).join(&hex[2..])
    }
}

/// Reads exactly `len` bytes at `offset` into a new buffer, without zeroing it first: a
/// zero-filled 1 MiB buffer per chunk cost FetchBlob about 7% of its CPU in
/// `make bench-transfer`. The buffer's length equals its capacity, so `Bytes::from` and the
/// `Vec` the gRPC message needs convert without copying.
fn read_exact_at(file: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(buf)
}

fn info(digest: Digest, meta: &std::fs::Metadata) -> BlobInfo {
    BlobInfo { digest, size: meta.len(), modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH) }
}

fn upload_mismatch(field: &str, reason: String) -> Error {
    ApiError::invalid(field, reason).into()
}

#[async_trait::async_trait]
impl BlobStore for LocalBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>> {
        let path = self.path_of(digest);
        let digest = *digest;
        blocking(move || match std::fs::metadata(&path) {
            Ok(meta) => Ok(Some(info(digest, &meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn put(&self, digest: Digest, size: u64, mut input: ByteStream) -> Result<BlobInfo> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{}.{}.{n}", digest.hex(), std::process::id()));
        let mut guard = TempGuard(Some(tmp.clone()));
        let create = tmp.clone();
        let mut file = blocking(move || OpenOptions::new().write(true).create_new(true).open(create)).await?;
        let mut hasher = Hasher::new();
        while let Some(chunk) = input.next().await {
            let chunk = chunk?;
            if hasher.len() + chunk.len() as u64 > size {
                return Err(upload_mismatch(
                    "data",
                    format!("more than total_size ({size}) bytes were sent"),
                ));
            }
            // Writing and hashing one chunk off the runtime keeps other RPCs responsive.
            (file, hasher) = blocking(move || {
                file.write_all(&chunk)?;
                hasher.update(&chunk);
                Ok((file, hasher))
            })
            .await?;
        }
        if hasher.len() != size {
            return Err(upload_mismatch(
                "total_size",
                format!("stream ended after {} of {size} bytes", hasher.len()),
            ));
        }
        let actual = hasher.finish();
        if actual != digest {
            return Err(upload_mismatch("digest", format!("uploaded bytes hash to {actual}, not {digest}")));
        }
        let dest = self.path_of(&digest);
        let meta = blocking(move || {
            file.sync_all()?;
            drop(file);
            let dir = dest.parent().ok_or_else(|| std::io::Error::other("blob path has no parent"))?;
            std::fs::create_dir_all(dir)?;
            std::fs::rename(&tmp, &dest)?;
            // The rename is durable only once the directory entry is.
            File::open(dir)?.sync_all()?;
            std::fs::metadata(&dest)
        })
        .await?;
        guard.0 = None;
        debug!(%digest, size, "blob stored");
        Ok(info(digest, &meta))
    }

    async fn read(&self, digest: &Digest, range: Range<u64>, chunk_size: usize) -> Result<ByteStream> {
        let path = self.path_of(digest);
        let file = blocking(move || match File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?
        .ok_or_else(|| not_found(digest))?;
        let file = Arc::new(file);
        let digest = *digest;
        // Positional reads of consecutive chunks, `read_ahead` of them in flight, so disk reads
        // overlap with the network send of earlier chunks without holding a thread per stream.
        let reads = stream::iter(chunks(range, chunk_size as u64)).map(move |r| {
            let file = Arc::clone(&file);
            async move {
                let len = (r.end - r.start) as usize;
                let res = blocking(move || read_exact_at(&file, len, r.start).map(Bytes::from)).await;
                res.map_err(|e| match e {
                    Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                        ApiError::DataLoss(format!("blob {digest} is shorter than its recorded size")).into()
                    }
                    other => other,
                })
            }
        });
        Ok(reads.buffered(self.read_ahead).into_stream().boxed())
    }

    async fn list(&self) -> Result<Vec<BlobInfo>> {
        let sha = self.root.join("sha256");
        blocking(move || {
            let mut out = Vec::new();
            for dir in std::fs::read_dir(&sha)? {
                let dir = dir?;
                let prefix = dir.file_name().to_string_lossy().into_owned();
                if prefix.len() != 2 || !dir.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(dir.path())? {
                    let entry = entry?;
                    let name = format!("sha256:{prefix}{}", entry.file_name().to_string_lossy());
                    // Anything that is not a well-formed address is not ours; leave it alone.
                    if let Ok(digest) = Digest::parse("blob", &name) {
                        out.push(info(digest, &entry.metadata()?));
                    }
                }
            }
            out.sort_by_key(|b| b.digest);
            Ok(out)
        })
        .await
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        let path = self.path_of(digest);
        blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        })
        .await
    }
}
