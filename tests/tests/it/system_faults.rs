//! The loop under faults, with the real binaries: a coordinator SIGKILLed during an agent's
//! download and restarted, an agent link with latency, a bandwidth cap and dropped
//! connections, and etcd restarted under a coordinator with connected agents. Each test ends
//! with the agent on the intended version, every blob of it in the agent's cache hashing to
//! the manifest's digest, and the agent's summaries stored exactly once (sequence numbers
//! 1..=N, each once, and the version aggregate counting N).
//!
//! SIGKILLing an agent with spooled summaries is `agent_e2e.rs`'s
//! `spooled_summaries_survive_sigkill_and_arrive_exactly_once`; it is not repeated here.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use llmchain_artifact::{BlobDir, Manifest, digest_reader};
use llmchain_coordinator::store::testing::EtcdServer;
use llmchain_proto::pb::{self, fleet_client::FleetClient};
use llmchain_tests::{
    Proc, bin, eventually,
    fleet::{Coordinator, TrainerKey, agent_info, assign, publish, spawn_agent, tiny_model, wait_running},
    proxy::{Cuts, FaultProxy},
    spawn_listening,
};
use tonic::transport::Channel;

const MODEL: &str = "tiny-faults";

async fn connect(addr: SocketAddr) -> FleetClient<Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    FleetClient::new(channel)
}

/// Every stored summary of `agent` (of every agent when empty), by sequence number.
async fn summaries(fleet: &mut FleetClient<Channel>, agent: &str) -> Option<Vec<pb::Summary>> {
    let request = pb::ListSummariesRequest { agent_id: agent.into(), limit: 10_000, ..Default::default() };
    let mut list = fleet.list_summaries(request).await.ok()?.into_inner().summaries;
    list.sort_by_key(|s| s.seq);
    Some(list)
}

/// Waits until `agent` has at least `at_least` summaries stored and an empty spool, then
/// checks that they are exactly 1..=N, each once, and that the version aggregates counted
/// each once too. Returns N.
async fn assert_summaries_exactly_once(
    fleet: &mut FleetClient<Channel>,
    agent: &str,
    at_least: usize,
) -> usize {
    let all = eventually(Duration::from_secs(45), || {
        let mut fleet = fleet.clone();
        async move {
            let depth = agent_info(&mut fleet, agent).await?.status?.spool_depth;
            let s = summaries(&mut fleet, agent).await?;
            (depth == 0 && s.len() >= at_least).then_some(s)
        }
    })
    .await;
    let Some(all) = all else {
        let info = agent_info(fleet, agent).await;
        let n = summaries(fleet, agent).await.map(|s| s.len());
        panic!(
            "{agent}: fewer than {at_least} summaries stored with an empty spool ({n:?}); last seen {info:?}"
        );
    };
    let seqs: Vec<u64> = all.iter().map(|s| s.seq).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "duplicates in {seqs:?}");
    let last = *seqs.last().unwrap();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "gaps in the sequence numbers");
    // The aggregates only grow when a summary is new: a duplicate store would show here. Read
    // them and the list again until they agree, as summaries keep arriving.
    let counted = eventually(Duration::from_secs(10), || {
        let mut fleet = fleet.clone();
        async move {
            let stats = fleet
                .get_fleet_stats(pb::GetFleetStatsRequest { model: MODEL.into() })
                .await
                .ok()?
                .into_inner();
            // Every agent's, as the aggregate is per version.
            let stored = summaries(&mut fleet, "").await?;
            (stats.summaries == stored.len() as u64).then_some(())
        }
    })
    .await;
    assert!(
        counted.is_some(),
        "the version aggregates count a different number of summaries than are stored"
    );
    seqs.len()
}

/// Every blob of `manifest` is in `agent`'s cache under `dir` and hashes to its digest.
fn assert_cached_weights(dir: &Path, agent: &str, manifest: &Manifest) {
    let cache = BlobDir(dir.join(agent).join("cache").join("blobs"));
    let cache = if cache.0.exists() { cache } else { BlobDir(dir.join(agent).join("cache")) };
    for t in &manifest.tensors {
        let path = cache.path(&t.digest);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| {
            panic!("{agent}: tensor {} is not in the cache at {}: {e}", t.name, path.display())
        });
        let (digest, size) = digest_reader(file).unwrap();
        assert_eq!((digest, size), (t.digest, t.size), "{agent}: cached bytes of tensor {}", t.name);
    }
}

/// The bytes downloaded so far of `agent`'s pending version, once a download is under way.
async fn downloading(fleet: &mut FleetClient<Channel>, agent: &str) -> Option<(u64, u64)> {
    let status = agent_info(fleet, agent).await?.status?;
    let (done, total) = (status.download_done_bytes, status.download_total_bytes);
    (done > 0 && done < total).then_some((done, total))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkilled_during_a_download_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let mut c = Coordinator::start(dir.path(), &[&trainer.public], &[]);
    let v1 = publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(11, &[])).await;
    // ~13 MB at 3 MiB/s: the download lasts long enough to be interrupted in the middle.
    let args = ["--source", "sim:seed=3,rate=50", "--window-records", "10", "--max-download-rate", "3M"];
    let _agent = spawn_agent(dir.path(), "edge-k", &c.url(), &trainer.public, &args);
    let mut fleet = c.fleet().await;
    assign(&mut fleet, "edge-k", MODEL, 1, false).await;
    let (done, total) = eventually(Duration::from_secs(30), || {
        let mut fleet = fleet.clone();
        async move { downloading(&mut fleet, "edge-k").await }
    })
    .await
    .expect("the agent starts downloading v1");
    assert!(done < total);

    // SIGKILL mid-download; the agent's transfer breaks. Restart on the same port and store.
    c.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.restart();
    let mut fleet = c.fleet().await;
    wait_running(&mut fleet, "edge-k", MODEL, 1, Duration::from_secs(60)).await;
    assert_cached_weights(dir.path(), "edge-k", &v1);
    assert_summaries_exactly_once(&mut fleet, "edge-k", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_lossy_link_delivers_the_version_and_every_summary_once() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let c = Coordinator::start(dir.path(), &[&trainer.public], &[]);
    let v1 = publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(21, &[])).await;
    let proxy = FaultProxy::start(c.addr).await.unwrap();
    // 40 ms each way, 4 MiB/s down, and the first three connections dropped after 3 MiB.
    proxy.set_latency(Duration::from_millis(40));
    proxy.set_bandwidth(Some(4 << 20));
    proxy.cut_after(3 << 20, Cuts::Times(3));
    let args = ["--source", "sim:seed=4,rate=50", "--window-records", "10"];
    let _agent = spawn_agent(dir.path(), "edge-l", &proxy.url(), &trainer.public, &args);
    let mut fleet = c.fleet().await;
    assign(&mut fleet, "edge-l", MODEL, 1, false).await;
    wait_running(&mut fleet, "edge-l", MODEL, 1, Duration::from_secs(60)).await;
    assert_eq!(proxy.stats().cuts, 3, "{:?}", proxy.stats());
    assert_cached_weights(dir.path(), "edge-l", &v1);

    // Summaries keep flowing over the slow link while it is cut twice more mid-stream. Each
    // cut waits for a summary stored since the last one, so the agent is connected again.
    let mut seen = 1;
    for _ in 0..2 {
        seen = eventually(Duration::from_secs(20), || {
            let mut fleet = fleet.clone();
            async move {
                let n = summaries(&mut fleet, "edge-l").await?.len();
                (n > seen).then_some(n)
            }
        })
        .await
        .expect("summaries over the slow link");
        proxy.cut_all();
    }
    assert!(proxy.stats().cuts >= 5, "{:?}", proxy.stats());
    wait_running(&mut fleet, "edge-l", MODEL, 1, Duration::from_secs(30)).await;
    assert_summaries_exactly_once(&mut fleet, "edge-l", 4).await;
}

/// A coordinator process on `store` (an `etcd:` spec), as `Coordinator` starts one on the
/// embedded store.
fn coordinator_on(dir: &Path, store: &str, key: &Path) -> (Proc, SocketAddr) {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--store", store, "--blobs"])
        .arg(dir.join("blobs"))
        .args(["--heartbeat-interval-ms", "300", "--lease-ttl-ms", "1500", "--insecure", "--trainer-key"])
        .arg(key)
        .env_clear()
        .env("RUST_LOG", "warn");
    spawn_listening(cmd, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_under_connected_agents() {
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let mut etcd = EtcdServer::start().await.expect("start etcd (is etcd on PATH? see scripts/setup.sh)");
    let (_coordinator, addr) = coordinator_on(dir.path(), &etcd.spec("/faults/"), &trainer.public);
    publish(addr, &trainer.key, MODEL, 1, &tiny_model(31, &[])).await;
    let url = format!("http://{addr}");
    let args = ["--source", "sim:seed=6,rate=50", "--window-records", "10"];
    let _a = spawn_agent(dir.path(), "edge-e1", &url, &trainer.public, &args);
    let _b = spawn_agent(dir.path(), "edge-e2", &url, &trainer.public, &args);
    let mut fleet = connect(addr).await;
    for agent in ["edge-e1", "edge-e2"] {
        assign(&mut fleet, agent, MODEL, 1, false).await;
    }
    for agent in ["edge-e1", "edge-e2"] {
        wait_running(&mut fleet, agent, MODEL, 1, Duration::from_secs(60)).await;
    }
    let before = eventually(Duration::from_secs(20), || {
        let mut fleet = fleet.clone();
        async move { (summaries(&mut fleet, "edge-e1").await?.len() >= 2).then_some(()) }
    })
    .await;
    assert!(before.is_some(), "summaries before the etcd restart");

    // etcd goes down for a few seconds (longer than the lease TTL): sessions and reports fail,
    // the agents spool their summaries. Then it comes back on the same data and ports.
    etcd.kill().await.unwrap();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.restart().await.unwrap();
    let outage = down.elapsed();

    // After etcd returns, sessions resume (a new version reaches both agents) and every
    // summary, spooled ones included, is stored exactly once.
    let v2 = publish(addr, &trainer.key, MODEL, 2, &tiny_model(31, &["layers.0.mlp.up_proj"])).await;
    for agent in ["edge-e1", "edge-e2"] {
        assign(&mut fleet, agent, MODEL, 2, false).await;
    }
    for agent in ["edge-e1", "edge-e2"] {
        wait_running(&mut fleet, agent, MODEL, 2, Duration::from_secs(60)).await;
        // Sessions may still be reopening after leases expired during the outage.
        let online = eventually(Duration::from_secs(20), || {
            let mut fleet = fleet.clone();
            async move { agent_info(&mut fleet, agent).await.filter(|a| a.online).map(|_| ()) }
        })
        .await;
        assert!(online.is_some(), "{agent} online");
        assert_cached_weights(dir.path(), agent, &v2);
    }
    let n1 = assert_summaries_exactly_once(&mut fleet, "edge-e1", 4).await;
    let n2 = assert_summaries_exactly_once(&mut fleet, "edge-e2", 4).await;
    assert!(n1 + n2 >= 8, "{n1} + {n2} summaries (etcd was down {outage:?})");
}
