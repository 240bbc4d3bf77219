//! The local directory blob store passes the backend contract and cleans up after itself.

mod blobs_support;

use std::sync::Arc;

use llmchain_coordinator::blobs::{BlobStore, LocalBlobStore};

type Result<T> = std::result::Result<T, llmchain_coordinator::Error>;

#[tokio::test]
async fn local_store_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalBlobStore::open(dir.path()).await.unwrap());
    blobs_support::contract(store.clone(), 3 << 20).await;
    // Failed and concurrent uploads leave no temporary files behind.
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    let blob = store.list().await.unwrap()[0];
    let path = store.path_of(&blob.digest);
    let hex = blob.digest.hex();
    assert!(path.ends_with(format!("sha256/{}/{}", &hex[..2], &hex[2..])), "{}", path.display());
}

#[tokio::test]
async fn a_truncated_file_reads_as_data_loss() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobStore::open(dir.path()).await.unwrap();
    let bytes = llmchain_artifact::testing::synthetic_bytes("t", 0, 10_000);
    let d = llmchain_artifact::digest_bytes(&bytes);
    store.put(d, 10_000, blobs_support::chunked(&bytes, 4096)).await.unwrap();
    // The range was computed from a size the file no longer has.
    std::fs::OpenOptions::new().write(true).open(store.path_of(&d)).unwrap().set_len(5000).unwrap();
    let res: Vec<Result<bytes::Bytes>> =
        futures::StreamExt::collect(store.read(&d, 0..10_000, 4096).await.unwrap()).await;
    assert!(
        res.iter().any(|r| matches!(
            r,
            Err(llmchain_coordinator::Error::Api(llmchain_proto::ApiError::DataLoss(_)))
        )),
        "{res:?}"
    );
}
