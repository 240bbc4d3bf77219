//! The store conformance suite on the embedded (redb) backend, plus what only a local file
//! can show: data, revisions and lease deadlines survive a restart.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use llmchain_coordinator::Error;
use llmchain_coordinator::store::conformance::EmbeddedHarness;
use llmchain_coordinator::store::embedded::{EmbeddedOptions, EmbeddedStore};
use llmchain_coordinator::store::testing::eventually;
use llmchain_coordinator::store::{self, Store};

llmchain_coordinator::store_conformance_suite!(EmbeddedHarness::new());

const PATIENCE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn reopening_keeps_data_and_continues_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/state.redb");
    let store = EmbeddedStore::open(&path).await.unwrap();
    store.put("models/a", Bytes::from_static(b"v1"), None).await.unwrap();
    let last = store.put("models/a", Bytes::from_static(b"v2"), None).await.unwrap();
    store.close().await;

    let store = EmbeddedStore::open(&path).await.unwrap();
    assert_eq!(store.current_revision().await.unwrap(), last);
    let kv = store.get("models/a").await.unwrap().unwrap();
    assert_eq!((kv.value.as_ref(), kv.version, kv.mod_revision), (&b"v2"[..], 2, last));
    assert!(
        store.put("models/b", Bytes::new(), None).await.unwrap() > last,
        "revisions continue after restart"
    );
}

#[tokio::test]
async fn leases_that_expired_while_closed_are_reaped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = EmbeddedStore::open(&path).await.unwrap();
    let short = store.grant_lease(Duration::from_millis(300)).await.unwrap();
    let long = store.grant_lease(Duration::from_secs(600)).await.unwrap();
    store.put("fleet/short", Bytes::new(), Some(short)).await.unwrap();
    store.put("fleet/long", Bytes::new(), Some(long)).await.unwrap();
    let before = store.current_revision().await.unwrap();
    store.close().await;

    let store = EmbeddedStore::open(&path).await.unwrap();
    eventually(PATIENCE, "the short lease's key to be reaped", || async {
        store.get("fleet/short").await.unwrap().is_none()
    })
    .await;
    assert!(store.current_revision().await.unwrap() > before, "the reaping delete has its own revision");
    assert!(matches!(store.keep_alive(short).await, Err(Error::LeaseExpired(_))));
    assert!(store.get("fleet/long").await.unwrap().is_some());
    assert_eq!(store.keep_alive(long).await.unwrap(), Duration::from_secs(600));
}

#[tokio::test]
async fn watches_from_before_a_restart_report_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = EmbeddedStore::open(&path).await.unwrap();
    store.put("k/1", Bytes::new(), None).await.unwrap();
    store.close().await;
    let store = EmbeddedStore::open(&path).await.unwrap();
    let mut watch = store.watch("k/", 0).await.unwrap();
    assert!(matches!(watch.next().await, Some(Err(Error::Compacted { requested: 1, compacted: 1 }))));
}

#[tokio::test]
async fn bounded_history_compacts_whole_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions { history_events: 3, history_bytes: 1 << 20 };
    let store = EmbeddedStore::open_with(&dir.path().join("s.redb"), options).await.unwrap();
    for i in 0..6 {
        store.put(&format!("h/{i}"), Bytes::new(), None).await.unwrap();
    }
    // Revisions 1..=3 fell out of a 3-event history; 4..=6 are still replayable.
    let mut old = store.watch("h/", 2).await.unwrap();
    assert!(matches!(old.next().await, Some(Err(Error::Compacted { requested: 3, compacted: 3 }))));
    let mut recent = store.watch("h/", 3).await.unwrap();
    let first = recent.next().await.unwrap().unwrap();
    assert_eq!((first.key(), first.revision()), ("h/3", 4));
}

#[tokio::test]
async fn watches_end_when_the_store_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap();
    let mut watch = store.watch("", 0).await.unwrap();
    store.close().await;
    let end = tokio::time::timeout(PATIENCE, watch.next()).await.expect("watch noticed the close");
    assert!(matches!(end, Some(Err(Error::StoreUnavailable(_)))), "{end:?}");
    assert!(watch.next().await.is_none());
}

#[tokio::test]
async fn open_parses_the_embedded_spec() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("embedded:{}", dir.path().join("state.redb").display());
    let store: Arc<dyn Store> = store::open(&spec).await.unwrap();
    let revision = store.put("x", Bytes::from_static(b"1"), None).await.unwrap();
    assert_eq!(store.get("x").await.unwrap().unwrap().mod_revision, revision);
    assert!(matches!(store::open("embedded:").await, Err(Error::InvalidStoreSpec { .. })));
}

#[tokio::test]
async fn a_second_opener_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let _first = EmbeddedStore::open(&path).await.unwrap();
    let err = EmbeddedStore::open(&path).await.unwrap_err();
    assert!(matches!(&err, Error::Store(msg) if msg.contains("already open")), "{err}");
}
