//! Content-addressed blob storage: a local directory backend and an S3-compatible one.
//!
//! Invariants every backend keeps:
//! - a blob is visible under its digest only once all its bytes are durably stored and hash
//!   to that digest (write to a temporary object, hash while writing, commit only on a match);
//! - concurrent uploads of the same blob are safe: each writes its own temporary object and the
//!   commit is an atomic replace of identical bytes;
//! - reads return raw stored bytes. Whether those still match the digest (disks rot, people
//!   edit files) is checked one layer up, by [`VerifiedBlobs`], which every server path uses.

pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
pub mod verify;

use std::{ops::Range, time::SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use llmchain_proto::model::Digest;

use crate::Result;

pub use local::LocalBlobStore;
pub use verify::{BlobChunk, BlobFetch, ScrubReport, VerifiedBlobs};

/// A stream of byte chunks (upload input or raw read output).
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// What a store knows about one stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobInfo {
    /// Content address.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// When the stored object was last written; verification results are tied to it and
    /// garbage collection measures its grace period from it.
    pub modified: SystemTime,
}

/// Storage of immutable, content-addressed blobs.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Size and write time of a stored blob, `None` when absent.
    async fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>>;

    /// Stores the bytes of `chunks` as blob `digest`, only if they are exactly `size` bytes
    /// that hash to `digest`; otherwise nothing becomes visible and the error names the
    /// mismatch. Replaces an existing blob of the same digest (used to repair a corrupt one).
    async fn put(&self, digest: Digest, size: u64, chunks: ByteStream) -> Result<BlobInfo>;

    /// Streams the raw stored bytes of `range` in chunks of at most `chunk_size` bytes.
    async fn read(&self, digest: &Digest, range: Range<u64>, chunk_size: usize) -> Result<ByteStream>;

    /// Every stored blob.
    async fn list(&self) -> Result<Vec<BlobInfo>>;

    /// Deletes a blob; returns whether it existed.
    async fn delete(&self, digest: &Digest) -> Result<bool>;
}

/// Error for a blob that is not stored.
pub(crate) fn not_found(digest: &Digest) -> crate::Error {
    llmchain_proto::ApiError::NotFound(format!("blob {digest}")).into()
}
