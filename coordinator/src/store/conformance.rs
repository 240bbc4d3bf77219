//! The one conformance suite every [`Store`] backend must pass (feature `testing`), in the
//! manner of Quickwit's `metastore_test_suite!`.
//!
//! Each check is a plain async function taking a [`StoreHarness`]; the
//! [`store_conformance_suite!`](crate::store_conformance_suite) macro turns the whole list
//! into `#[tokio::test]`s for one backend. A harness owns one isolated store (a fresh file, or
//! a fresh etcd server), so checks may assume the store starts empty.
//! Panicking assertions are the point here: this module is test code compiled into the library
//! so other crates can run it too.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use llmchain_proto::ApiError;
use tokio_util::sync::CancellationToken;

use super::election::Election;
use super::embedded::{EmbeddedOptions, EmbeddedStore};
use super::testing::{EtcdServer, eventually};
use super::{Compare, KeyValue, Op, OpResponse, Revision, Store, Txn, WatchEvent, WatchStream};
use crate::error::Error;

/// How long any awaited condition may take before a check fails.
const PATIENCE: Duration = Duration::from_secs(15);

/// One backend under test.
#[async_trait::async_trait]
pub trait StoreHarness: Send + Sync {
    /// A handle on the harness's store; etcd hands out a new client each time, as a second
    /// coordinator replica would have.
    async fn store(&self) -> Arc<dyn Store>;

    /// Makes the change history up to `revision` unavailable to watches.
    async fn compact(&self, revision: Revision);
}

/// The embedded backend in a temp dir.
pub struct EmbeddedHarness {
    store: Arc<EmbeddedStore>,
    _dir: tempfile::TempDir,
}

impl EmbeddedHarness {
    /// Opens a fresh embedded store in a new temp dir.
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path: PathBuf = dir.path().join("state.redb");
        let store =
            EmbeddedStore::open_with(&path, EmbeddedOptions::default()).await.expect("open embedded store");
        Self { store: Arc::new(store), _dir: dir }
    }
}

#[async_trait::async_trait]
impl StoreHarness for EmbeddedHarness {
    async fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    async fn compact(&self, revision: Revision) {
        self.store.compact_history(revision);
    }
}

/// A real etcd started for the harness, keys under `/conformance/`.
pub struct EtcdHarness {
    server: EtcdServer,
}

impl EtcdHarness {
    /// The namespace the suite's keys live under.
    pub const PREFIX: &'static str = "/conformance/";

    /// Starts a fresh etcd server.
    pub async fn new() -> Self {
        Self {
            server: EtcdServer::start().await.expect("start etcd (is etcd on PATH? see scripts/setup.sh)"),
        }
    }
}

#[async_trait::async_trait]
impl StoreHarness for EtcdHarness {
    async fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.server.store(Self::PREFIX).await.expect("connect to etcd"))
    }

    async fn compact(&self, revision: Revision) {
        let mut client =
            etcd_client::Client::connect([self.server.endpoint()], None).await.expect("connect to etcd");
        let options = etcd_client::CompactionOptions::new().with_physical();
        client.compact(revision, Some(options)).await.expect("compact etcd");
    }
}

/// Generates one `#[tokio::test]` per conformance check for the harness `$harness` (an
/// expression evaluating to a future of a [`StoreHarness`]).
#[macro_export]
macro_rules! store_conformance_suite {
    ($harness:expr) => {
        $crate::store_conformance_suite!(@tests $harness;
            get_put_delete, list_by_raw_prefix, large_listings, revisions_are_monotonic, txn_compare_and_swap,
            concurrent_cas_has_one_winner, concurrent_increments_are_not_lost,
            watch_catches_up_then_follows, watch_from_listing_sees_only_later_changes,
            watch_reports_compaction, lease_expiry_deletes_keys, lease_revoke_deletes_keys,
            keep_alive_extends_lease, election_hands_over);
    };
    (@tests $harness:expr; $($check:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let harness = $harness.await;
                $crate::store::conformance::$check(&harness).await;
            }
        )+
    };
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn next_event(watch: &mut WatchStream) -> WatchEvent {
    match tokio::time::timeout(PATIENCE, watch.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(err))) => panic!("watch failed: {err}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {PATIENCE:?}"),
    }
}

fn summary(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Put(kv) => format!("put {}={}", kv.key, String::from_utf8_lossy(&kv.value)),
        WatchEvent::Delete { key, .. } => format!("delete {key}"),
    }
}

async fn present(store: &dyn Store, key: &str) -> bool {
    store.get(key).await.expect("get").is_some()
}

/// Put, get and delete keep etcd's per-key metadata.
pub async fn get_put_delete(h: &dyn StoreHarness) {
    let store = h.store().await;
    assert_eq!(store.get("k").await.unwrap(), None);
    let r1 = store.put("k", bytes("v1"), None).await.unwrap();
    assert!(r1 > 0);
    let kv = store.get("k").await.unwrap().expect("k exists");
    assert_eq!(
        kv,
        KeyValue {
            key: "k".into(),
            value: bytes("v1"),
            create_revision: r1,
            mod_revision: r1,
            version: 1,
            lease: None
        }
    );
    let r2 = store.put("k", bytes("v2"), None).await.unwrap();
    assert!(r2 > r1);
    let kv = store.get("k").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.create_revision, kv.mod_revision, kv.version), (bytes("v2"), r1, r2, 2));
    assert!(store.delete("k").await.unwrap());
    assert_eq!(store.get("k").await.unwrap(), None);
    assert!(!store.delete("k").await.unwrap(), "deleting an absent key reports false");
    let r3 = store.put("k", Bytes::new(), None).await.unwrap();
    let kv = store.get("k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version, kv.value.len()), (r3, 1, 0), "re-created key starts over");
    let err = store.put("", bytes("x"), None).await.unwrap_err();
    assert!(matches!(err, Error::Api(ApiError::InvalidArgument { .. })), "{err}");
}

/// Prefixes are raw string prefixes; a trailing `/` gives directory semantics.
pub async fn list_by_raw_prefix(h: &dyn StoreHarness) {
    let store = h.store().await;
    let mut last = 0;
    for key in ["a/c", "a/bc", "a/b/2", "a/b", "a/b/1", "b/a"] {
        last = store.put(key, bytes(key), None).await.unwrap();
    }
    let keys = |listing: super::Listing| listing.kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    let dir = store.list("a/b/").await.unwrap();
    assert!(dir.revision >= last, "listing revision {} before last write {last}", dir.revision);
    assert_eq!(keys(dir), ["a/b/1", "a/b/2"], "a directory prefix must not leak a/bc");
    assert_eq!(keys(store.list("a/b").await.unwrap()), ["a/b", "a/b/1", "a/b/2", "a/bc"]);
    assert_eq!(keys(store.list("").await.unwrap()), ["a/b", "a/b/1", "a/b/2", "a/bc", "a/c", "b/a"]);
    assert!(store.list("c/").await.unwrap().kvs.is_empty());
    let values: Vec<_> = store.list("a/").await.unwrap().kvs.into_iter().map(|kv| kv.value).collect();
    assert_eq!(values, ["a/b", "a/b/1", "a/b/2", "a/bc", "a/c"].map(bytes));
}

/// A listing larger than gRPC's default 4 MiB message limit still arrives whole.
pub async fn large_listings(h: &dyn StoreHarness) {
    let store = h.store().await;
    // 1 MiB values stay under etcd's default 1.5 MiB request limit.
    let value = Bytes::from(vec![7u8; 1 << 20]);
    for i in 0..6 {
        store.put(&format!("big/{i}"), value.clone(), None).await.unwrap();
    }
    let listing = store.list("big/").await.unwrap();
    assert_eq!(listing.kvs.len(), 6);
    assert!(listing.kvs.iter().all(|kv| kv.value == value));
}

/// Every write gets a higher revision; reads and no-op deletes do not advance it.
pub async fn revisions_are_monotonic(h: &dyn StoreHarness) {
    let store = h.store().await;
    let mut previous = store.current_revision().await.unwrap();
    for i in 0..10 {
        let key = format!("r/{}", i % 3);
        let revision = if i % 4 == 3 {
            store.delete(&key).await.unwrap();
            store.current_revision().await.unwrap()
        } else {
            store.put(&key, bytes("x"), None).await.unwrap()
        };
        assert!(revision > previous, "revision {revision} after {previous}");
        assert_eq!(store.current_revision().await.unwrap(), revision);
        previous = revision;
    }
    store.get("r/0").await.unwrap();
    store.list("r/").await.unwrap();
    assert!(!store.delete("r/absent").await.unwrap());
    assert_eq!(
        store.current_revision().await.unwrap(),
        previous,
        "reads and no-op deletes keep the revision"
    );
}

/// Transactions run the success branch only when every compare holds.
pub async fn txn_compare_and_swap(h: &dyn StoreHarness) {
    let store = h.store().await;
    let create =
        Txn::new().when([Compare::absent("t/k")]).and_then([Op::put("t/k", "v1")]).or_else([Op::get("t/k")]);
    let first = store.txn(create.clone()).await.unwrap();
    assert!(first.succeeded);
    assert_eq!(first.responses, [OpResponse::Put]);
    assert_eq!(store.get("t/k").await.unwrap().unwrap().mod_revision, first.revision);

    let second = store.txn(create).await.unwrap();
    assert!(!second.succeeded, "put-if-absent must fail on an existing key");
    assert_eq!(second.revision, first.revision, "a failed txn that only reads writes nothing");
    let [OpResponse::Get(Some(kv))] = second.responses.as_slice() else { panic!("{:?}", second.responses) };
    assert_eq!(kv.value, bytes("v1"));

    let stale = Txn::new()
        .when([Compare::ModRevision("t/k".into(), first.revision - 1)])
        .and_then([Op::delete("t/k")]);
    assert!(!store.txn(stale).await.unwrap().succeeded);
    let swap = Txn::new()
        .when([
            Compare::ModRevision("t/k".into(), first.revision),
            Compare::Version("t/k".into(), 1),
            Compare::Value("t/k".into(), bytes("v1")),
        ])
        .and_then([
            Op::put("t/k", "v2"),
            Op::put("t/other", "o"),
            Op::delete("t/absent"),
            Op::get("t/other"),
        ]);
    let swapped = store.txn(swap).await.unwrap();
    assert!(swapped.succeeded);
    assert!(swapped.revision > first.revision);
    let [
        OpResponse::Put,
        OpResponse::Put,
        OpResponse::Delete { deleted: false },
        OpResponse::Get(Some(other)),
    ] = swapped.responses.as_slice()
    else {
        panic!("{:?}", swapped.responses)
    };
    assert_eq!(other.value, bytes("o"), "a read sees the txn's own earlier write");
    for key in ["t/k", "t/other"] {
        assert_eq!(
            store.get(key).await.unwrap().unwrap().mod_revision,
            swapped.revision,
            "one revision per txn"
        );
    }
    let wrong_value =
        Txn::new().when([Compare::Value("t/missing".into(), Bytes::new())]).and_then([Op::delete("t/k")]);
    assert!(!store.txn(wrong_value).await.unwrap().succeeded, "a value compare never matches an absent key");
    assert!(present(store.as_ref(), "t/k").await);
    let twice = Txn::new().and_then([Op::put("t/k", "x"), Op::delete("t/k")]);
    let err = store.txn(twice).await.unwrap_err();
    assert!(matches!(err, Error::Api(ApiError::InvalidArgument { .. })), "{err}");
    assert_eq!(store.get("t/k").await.unwrap().unwrap().value, bytes("v2"));
}

/// Of N concurrent put-if-absent transactions exactly one wins.
pub async fn concurrent_cas_has_one_winner(h: &dyn StoreHarness) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = h.store().await;
        tasks.push(tokio::spawn(async move {
            let txn = Txn::new()
                .when([Compare::absent("cas/owner")])
                .and_then([Op::put("cas/owner", format!("c{i}"))]);
            (i, store.txn(txn).await.unwrap().succeeded)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (i, won) = task.await.unwrap();
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let owner = h.store().await.get("cas/owner").await.unwrap().unwrap();
    assert_eq!(owner.value, bytes(&format!("c{}", winners[0])));
    assert_eq!(owner.version, 1);
}

/// Read-modify-write loops guarded by `ModRevision` lose no increment under contention.
pub async fn concurrent_increments_are_not_lost(h: &dyn StoreHarness) {
    const WORKERS: u64 = 4;
    const INCREMENTS: u64 = 5;
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let store = h.store().await;
        tasks.push(tokio::spawn(async move {
            let mut retries = 0u64;
            for _ in 0..INCREMENTS {
                loop {
                    let current = store.get("counter").await.unwrap();
                    let (value, revision) = match &current {
                        Some(kv) => {
                            (std::str::from_utf8(&kv.value).unwrap().parse::<u64>().unwrap(), kv.mod_revision)
                        }
                        None => (0, 0),
                    };
                    let txn = Txn::new()
                        .when([Compare::ModRevision("counter".into(), revision)])
                        .and_then([Op::put("counter", (value + 1).to_string())]);
                    if store.txn(txn).await.unwrap().succeeded {
                        break;
                    }
                    retries += 1;
                }
            }
            retries
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let kv = h.store().await.get("counter").await.unwrap().unwrap();
    assert_eq!(kv.value, bytes(&(WORKERS * INCREMENTS).to_string()));
    assert_eq!(kv.version, i64::try_from(WORKERS * INCREMENTS).unwrap());
}

/// A watch from a past revision replays history in order, then delivers live changes.
pub async fn watch_catches_up_then_follows(h: &dyn StoreHarness) {
    let store = h.store().await;
    let start = store.current_revision().await.unwrap();
    store.put("w/1", bytes("a"), None).await.unwrap();
    store.put("w/2", bytes("b"), None).await.unwrap();
    store.put("x/1", bytes("other prefix"), None).await.unwrap();
    store.delete("w/1").await.unwrap();
    let txn = store.txn(Txn::new().and_then([Op::put("w/3", "c"), Op::put("w/4", "d")])).await.unwrap();
    let mut watch = store.watch("w/", start).await.unwrap();
    let mut seen = Vec::new();
    let mut revisions = Vec::new();
    for _ in 0..5 {
        let event = next_event(&mut watch).await;
        seen.push(summary(&event));
        revisions.push(event.revision());
    }
    assert_eq!(seen, ["put w/1=a", "put w/2=b", "delete w/1", "put w/3=c", "put w/4=d"]);
    assert!(revisions.windows(2).all(|w| w[0] <= w[1]), "{revisions:?}");
    assert!(revisions[0] > start);
    assert_eq!(&revisions[3..], [txn.revision, txn.revision], "a txn's events share its revision");
    let live = store.put("w/5", bytes("e"), None).await.unwrap();
    let event = next_event(&mut watch).await;
    assert_eq!((summary(&event), event.revision()), ("put w/5=e".to_owned(), live));
    store.delete("w/5").await.unwrap();
    assert_eq!(summary(&next_event(&mut watch).await), "delete w/5");
}

/// The list-then-watch pattern sees each change exactly once.
pub async fn watch_from_listing_sees_only_later_changes(h: &dyn StoreHarness) {
    let store = h.store().await;
    store.put("l/old", bytes("1"), None).await.unwrap();
    let listing = store.list("l/").await.unwrap();
    assert_eq!(listing.kvs.len(), 1);
    let mut watch = store.watch("l/", listing.revision).await.unwrap();
    store.put("l/new", bytes("2"), None).await.unwrap();
    store.put("l/old", bytes("3"), None).await.unwrap();
    assert_eq!(summary(&next_event(&mut watch).await), "put l/new=2");
    let event = next_event(&mut watch).await;
    assert_eq!(summary(&event), "put l/old=3");
    let WatchEvent::Put(kv) = event else { unreachable!() };
    assert_eq!(kv.version, 2);
}

/// A watch from compacted history fails with `Compacted` and ends; a fresh one works.
pub async fn watch_reports_compaction(h: &dyn StoreHarness) {
    let store = h.store().await;
    for i in 0..5 {
        store.put(&format!("c/{i}"), bytes("x"), None).await.unwrap();
    }
    let compacted_at = store.current_revision().await.unwrap();
    h.compact(compacted_at).await;
    let mut watch = store.watch("c/", 0).await.unwrap();
    match tokio::time::timeout(PATIENCE, watch.next()).await.expect("compaction reported in time") {
        Some(Err(Error::Compacted { compacted, .. })) => assert!(compacted > 0 && compacted <= compacted_at),
        other => panic!("expected a compaction error, got {other:?}"),
    }
    assert!(watch.next().await.is_none(), "a compacted watch ends");
    let mut fresh = store.watch("c/", compacted_at).await.unwrap();
    store.put("c/after", bytes("y"), None).await.unwrap();
    assert_eq!(summary(&next_event(&mut fresh).await), "put c/after=y");
}

/// Keys on an expired lease vanish with delete events; the lease is unusable afterwards.
pub async fn lease_expiry_deletes_keys(h: &dyn StoreHarness) {
    let store = h.store().await;
    let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    store.put("e/a", bytes("1"), Some(lease)).await.unwrap();
    store.put("e/b", bytes("2"), Some(lease)).await.unwrap();
    store.put("e/keep", bytes("3"), None).await.unwrap();
    assert_eq!(store.get("e/a").await.unwrap().unwrap().lease, Some(lease));
    let mut watch = store.watch("e/", store.current_revision().await.unwrap()).await.unwrap();
    eventually(PATIENCE, "leased keys to expire", || async {
        !present(store.as_ref(), "e/a").await && !present(store.as_ref(), "e/b").await
    })
    .await;
    let deleted: BTreeSet<_> =
        [next_event(&mut watch).await, next_event(&mut watch).await].iter().map(summary).collect();
    assert_eq!(deleted, BTreeSet::from(["delete e/a".to_owned(), "delete e/b".to_owned()]));
    assert!(present(store.as_ref(), "e/keep").await, "keys without the lease stay");
    let err = store.keep_alive(lease).await.unwrap_err();
    assert!(matches!(err, Error::LeaseExpired(id) if id == lease.0), "{err}");
    let err = store.put("e/late", bytes("x"), Some(lease)).await.unwrap_err();
    assert!(matches!(err, Error::LeaseExpired(_)), "{err}");
    let txn = Txn::new().and_then([Op::put_with_lease("e/late", "x", lease)]);
    assert!(matches!(store.txn(txn).await.unwrap_err(), Error::LeaseExpired(_)));
    assert!(!present(store.as_ref(), "e/late").await);
}

/// Revoking a lease deletes its keys at once, at one revision.
pub async fn lease_revoke_deletes_keys(h: &dyn StoreHarness) {
    let store = h.store().await;
    let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    let other = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(lease, other);
    store.put("v/a", bytes("1"), Some(lease)).await.unwrap();
    store.put("v/b", bytes("2"), Some(lease)).await.unwrap();
    store.put("v/c", bytes("3"), Some(other)).await.unwrap();
    // Re-putting a key without the lease detaches it.
    store.put("v/b", bytes("2'"), None).await.unwrap();
    let before = store.current_revision().await.unwrap();
    let mut watch = store.watch("v/", before).await.unwrap();
    store.revoke_lease(lease).await.unwrap();
    assert!(!present(store.as_ref(), "v/a").await);
    assert!(present(store.as_ref(), "v/b").await, "a detached key survives its old lease");
    assert!(present(store.as_ref(), "v/c").await);
    let event = next_event(&mut watch).await;
    assert_eq!(summary(&event), "delete v/a");
    assert!(event.revision() > before);
    assert!(matches!(store.revoke_lease(lease).await.unwrap_err(), Error::LeaseExpired(_)));
    assert!(matches!(store.keep_alive(lease).await.unwrap_err(), Error::LeaseExpired(_)));
    assert!(store.keep_alive(other).await.is_ok());
}

/// Keep-alives hold a lease past its TTL; once they stop it expires.
pub async fn keep_alive_extends_lease(h: &dyn StoreHarness) {
    let store = h.store().await;
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.unwrap();
    store.put("ka/k", bytes("1"), Some(lease)).await.unwrap();
    let until = tokio::time::Instant::now() + ttl * 2;
    // Renewing at a quarter of the TTL for twice the TTL: the time passing is what is tested.
    while tokio::time::Instant::now() < until {
        assert_eq!(store.keep_alive(lease).await.unwrap(), ttl);
        assert!(present(store.as_ref(), "ka/k").await, "key expired although its lease was kept alive");
        tokio::time::sleep(ttl / 4).await;
    }
    eventually(PATIENCE, "the lease to expire after keep-alives stop", || async {
        !present(store.as_ref(), "ka/k").await
    })
    .await;
}

/// Two candidates: revoking the leader's lease hands leadership over, resigning hands it back.
pub async fn election_hands_over(h: &dyn StoreHarness) {
    let cancel = CancellationToken::new();
    let ttl = Duration::from_secs(2);
    let key = "election/rollout";
    let a = Election::start(h.store().await, key, "a", ttl, &cancel);
    eventually(PATIENCE, "a to lead", || async { a.is_leader() }).await;
    let b = Election::start(h.store().await, key, "b", ttl, &cancel);
    let observer = h.store().await;
    assert_eq!(Election::leader(observer.as_ref(), key).await.unwrap().as_deref(), Some("a"));
    assert!(!b.is_leader(), "b cannot lead while a holds the key");

    let a_changes = a.subscribe();
    let held = observer.get(key).await.unwrap().expect("leader key").lease.expect("leader key has a lease");
    observer.revoke_lease(held).await.unwrap();
    eventually(PATIENCE, "b to take over", || async { b.is_leader() }).await;
    eventually(PATIENCE, "a to step down", || async { !a.is_leader() }).await;
    assert!(a_changes.has_changed().unwrap(), "a's subscribers see it step down");
    assert_eq!(Election::leader(observer.as_ref(), key).await.unwrap().as_deref(), Some("b"));

    b.resign().await;
    eventually(PATIENCE, "a to lead again after b resigned", || async { a.is_leader() }).await;
    assert_eq!(Election::leader(observer.as_ref(), key).await.unwrap().as_deref(), Some("a"));
    cancel.cancel();
    eventually(PATIENCE, "the key to go when the last candidate stops", || async {
        !present(observer.as_ref(), key).await
    })
    .await;
    assert!(!a.is_leader());
}
