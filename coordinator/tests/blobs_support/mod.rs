//! One contract every [`BlobStore`] backend must pass (local directory and S3).

#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use llmchain_artifact::{digest_bytes, testing::synthetic_bytes};
use llmchain_coordinator::{
    Error,
    blobs::{BlobStore, ByteStream},
};
use llmchain_proto::ApiError;

/// `bytes` as a stream of `chunk`-sized pieces.
pub fn chunked(bytes: &[u8], chunk: usize) -> ByteStream {
    let pieces: Vec<Result<Bytes>> = bytes.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    stream::iter(pieces).boxed()
}

type Result<T> = std::result::Result<T, Error>;

async fn read_all(
    store: &dyn BlobStore,
    d: &llmchain_artifact::Digest,
    r: std::ops::Range<u64>,
    c: usize,
) -> Vec<u8> {
    let parts: Vec<Bytes> = store.read(d, r, c).await.unwrap().try_collect().await.unwrap();
    assert!(parts.iter().all(|p| p.len() <= c), "chunks respect the chunk size");
    parts.concat()
}

fn is_invalid(e: &Error, needle: &str) -> bool {
    matches!(e, Error::Api(ApiError::InvalidArgument { reason, .. }) if reason.contains(needle))
}

/// Runs the contract; `size` is the large blob's size (S3 tests use several multipart parts).
pub async fn contract(store: Arc<dyn BlobStore>, size: usize) {
    let bytes = synthetic_bytes("contract", 1, size);
    let digest = digest_bytes(&bytes);
    assert!(store.stat(&digest).await.unwrap().is_none());
    assert!(matches!(store.read(&digest, 0..1, 1).await.err(), Some(Error::Api(ApiError::NotFound(_)))));

    // Wrong bytes, too few bytes and too many bytes never become visible.
    let mut wrong = bytes.clone();
    wrong[size / 2] ^= 1;
    let err = store.put(digest, size as u64, chunked(&wrong, 1 << 20)).await.unwrap_err();
    assert!(is_invalid(&err, "hash to"), "{err}");
    let err = store.put(digest, size as u64, chunked(&bytes[..size - 1], 1 << 20)).await.unwrap_err();
    assert!(is_invalid(&err, "stream ended"), "{err}");
    let err = store.put(digest, size as u64 - 1, chunked(&bytes, 1 << 20)).await.unwrap_err();
    assert!(is_invalid(&err, "more than total_size"), "{err}");
    assert!(store.stat(&digest).await.unwrap().is_none());
    assert!(store.list().await.unwrap().is_empty());

    // A good upload is visible with its size; ranges read back exactly.
    let info = store.put(digest, size as u64, chunked(&bytes, 1 << 20)).await.unwrap();
    assert_eq!(info.size, size as u64);
    assert_eq!(store.stat(&digest).await.unwrap().unwrap().size, size as u64);
    assert_eq!(read_all(&*store, &digest, 0..size as u64, 1 << 20).await, bytes);
    assert_eq!(read_all(&*store, &digest, 1000..5000, 333).await, bytes[1000..5000]);
    assert!(read_all(&*store, &digest, 7..7, 10).await.is_empty());

    // Concurrent uploads of one blob all succeed and leave one intact copy.
    let small = synthetic_bytes("small", 2, 300_000);
    let small_digest = digest_bytes(&small);
    let uploads = (0..6).map(|_| store.put(small_digest, small.len() as u64, chunked(&small, 65_536)));
    for r in futures::future::join_all(uploads).await {
        r.unwrap();
    }
    assert_eq!(read_all(&*store, &small_digest, 0..small.len() as u64, 1 << 20).await, small);

    let listed: Vec<_> = store.list().await.unwrap().iter().map(|b| (b.digest, b.size)).collect();
    let mut expected = vec![(digest, size as u64), (small_digest, small.len() as u64)];
    expected.sort();
    assert_eq!(listed, expected);

    assert!(store.delete(&small_digest).await.unwrap());
    assert!(!store.delete(&small_digest).await.unwrap());
    assert!(store.stat(&small_digest).await.unwrap().is_none());
}
