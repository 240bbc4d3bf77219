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

/// Opens the blob store a `--blobs` spec names: a directory path, or (with the `s3` feature)
/// `s3://BUCKET[/PREFIX][?endpoint=URL&region=R]` with credentials from the environment.
pub async fn open(spec: &str) -> Result<std::sync::Arc<dyn BlobStore>> {
    let Some(rest) = spec.strip_prefix("s3://") else {
        return Ok(std::sync::Arc::new(LocalBlobStore::open(spec).await?));
    };
    #[cfg(feature = "s3")]
    {
        Ok(std::sync::Arc::new(s3::S3BlobStore::connect(&parse_s3(rest)?)?))
    }
    #[cfg(not(feature = "s3"))]
    {
        let _ = rest;
        Err(llmchain_proto::ApiError::invalid("blobs", "this build has no s3 support").into())
    }
}

#[cfg(feature = "s3")]
fn parse_s3(rest: &str) -> Result<s3::S3Config> {
    let invalid =
        |reason: String| -> crate::Error { llmchain_proto::ApiError::invalid("blobs", reason).into() };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
    if bucket.is_empty() {
        return Err(invalid("s3:// needs a bucket name".into()));
    }
    let mut config = s3::S3Config {
        bucket: bucket.to_string(),
        endpoint: None,
        region: "us-east-1".into(),
        access_key_id: None,
        secret_access_key: None,
        prefix: prefix.trim_end_matches('/').to_string(),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("endpoint", v)) if !v.is_empty() => config.endpoint = Some(v.to_string()),
            Some(("region", v)) if !v.is_empty() => config.region = v.to_string(),
            _ => return Err(invalid(format!("unknown s3 option {pair:?} (endpoint=URL, region=R)"))),
        }
    }
    Ok(config)
}

#[cfg(all(test, feature = "s3"))]
mod spec_tests {
    use super::*;

    #[test]
    fn parses_s3_specs_and_refuses_bad_ones() {
        let c = parse_s3("models/llmchain/blobs?endpoint=http://127.0.0.1:9000&region=eu-west-1").unwrap();
        assert_eq!(c.bucket, "models");
        assert_eq!(c.prefix, "llmchain/blobs");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.region, "eu-west-1");
        let c = parse_s3("bucket").unwrap();
        assert_eq!((c.prefix.as_str(), c.endpoint.is_none(), c.region.as_str()), ("", true, "us-east-1"));
        for bad in ["", "/x", "b?colour=red", "b?endpoint="] {
            let err = parse_s3(bad).unwrap_err().to_string();
            assert!(err.contains("blobs"), "{bad}: {err}");
        }
    }
}
