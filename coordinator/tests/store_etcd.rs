//! The store conformance suite on a real etcd (started from `PATH` on free loopback ports),
//! plus what only a server can show: namespacing, unavailability and restarts.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use llmchain_coordinator::Error;
use llmchain_coordinator::store::conformance::EtcdHarness;
use llmchain_coordinator::store::testing::{EtcdServer, eventually};
use llmchain_coordinator::store::{self, Store};

llmchain_coordinator::store_conformance_suite!(EtcdHarness::new());

const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_isolate_deployments() {
    let server = EtcdServer::start().await.unwrap();
    let a: Arc<dyn Store> = store::open(&server.spec("/team-a/")).await.unwrap();
    let b: Arc<dyn Store> = store::open(&server.spec("/team-b/")).await.unwrap();
    a.put("models/m", Bytes::from_static(b"a"), None).await.unwrap();
    b.put("models/m", Bytes::from_static(b"b"), None).await.unwrap();
    b.put("models/n", Bytes::from_static(b"b"), None).await.unwrap();
    let listed = a.list("").await.unwrap();
    let keys: Vec<_> = listed.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["models/m"], "the namespace prefix is stripped and other namespaces are invisible");
    assert_eq!(a.get("models/m").await.unwrap().unwrap().value, Bytes::from_static(b"a"));
    let mut watch = a.watch("", listed.revision).await.unwrap();
    b.put("models/m", Bytes::from_static(b"b2"), None).await.unwrap();
    a.put("models/z", Bytes::from_static(b"a2"), None).await.unwrap();
    let event = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(event.key(), "models/z", "a watch sees only its own namespace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_an_etcd_crash_and_requests_fail_as_unavailable_meanwhile() {
    let mut server = EtcdServer::start().await.unwrap();
    let store = server.store("/llmchain/").await.unwrap();
    let revision = store.put("models/m", Bytes::from_static(b"v1"), None).await.unwrap();
    let mut watch = store.watch("models/", revision).await.unwrap();

    server.kill().await.unwrap();
    let broken = tokio::time::timeout(PATIENCE, watch.next()).await.expect("the watch notices the crash");
    assert!(matches!(broken, Some(Err(Error::StoreUnavailable(_)))), "{broken:?}");
    assert!(watch.next().await.is_none(), "a broken watch ends");
    let err = tokio::time::timeout(PATIENCE, store.get("models/m")).await.expect("fails fast").unwrap_err();
    assert!(matches!(err, Error::StoreUnavailable(_)), "{err}");

    server.restart().await.unwrap();
    eventually(PATIENCE, "the same client to reconnect", || async { store.get("models/m").await.is_ok() })
        .await;
    let kv = store.get("models/m").await.unwrap().unwrap();
    assert_eq!((kv.value, kv.mod_revision), (Bytes::from_static(b"v1"), revision));
    assert!(store.put("models/m", Bytes::from_static(b"v2"), None).await.unwrap() > revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_and_restart_keep_leases_running() {
    let mut server = EtcdServer::start().await.unwrap();
    let store = server.store("/llmchain/").await.unwrap();
    let lease = store.grant_lease(Duration::from_secs(30)).await.unwrap();
    store.put("fleet/agent-1", Bytes::new(), Some(lease)).await.unwrap();
    server.stop().await.unwrap();
    assert!(!server.is_running());
    server.restart().await.unwrap();
    eventually(PATIENCE, "keep-alive after restart", || async { store.keep_alive(lease).await.is_ok() })
        .await;
    assert_eq!(store.get("fleet/agent-1").await.unwrap().unwrap().lease.map(|l| l.0), Some(lease.0));
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable() {
    // Bind-then-release: nothing listens on this port afterwards.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let result = store::open(&format!("etcd:http://127.0.0.1:{port}")).await;
    assert!(matches!(result, Err(Error::StoreUnavailable(_))), "{:?}", result.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_steps_down_and_leads_again_after_recovery() {
    use llmchain_coordinator::store::election::Election;
    use tokio_util::sync::CancellationToken;

    let mut server = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Store> = Arc::new(server.store("/llmchain/").await.unwrap());
    let cancel = CancellationToken::new();
    let election =
        Election::start(store.clone(), "leader/rollouts", "replica-1", Duration::from_secs(2), &cancel);
    eventually(PATIENCE, "replica-1 to lead", || async { election.is_leader() }).await;

    // Without keep-alives the lease may lapse any moment: the leader must not keep leading.
    server.kill().await.unwrap();
    eventually(PATIENCE, "the cut-off leader to step down", || async { !election.is_leader() }).await;

    server.restart().await.unwrap();
    eventually(PATIENCE, "leadership to come back once etcd is reachable", || async { election.is_leader() })
        .await;
    let holder = Election::leader(store.as_ref(), "leader/rollouts").await.unwrap();
    assert_eq!(holder.as_deref(), Some("replica-1"));
    cancel.cancel();
}
