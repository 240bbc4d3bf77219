//! The fleet over gRPC: sessions, assignments by id and by selector, liveness through leases,
//! exactly-once summaries with their aggregates, listing and watching summaries. An in-process
//! coordinator (registry + fleet on one store) is talked to by the generated client; the core
//! scenarios run on the embedded store and on a real etcd.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::StreamExt;
use llmchain_artifact::{
    SigningKey, TrustedKeys,
    testing::{synthetic_version, tiny_llama},
};
use llmchain_coordinator::{
    blobs::{LocalBlobStore, VerifiedBlobs},
    fleet::{self, Fleet, FleetApi, FleetConfig},
    registry::{self, Registry, RegistryApi, RegistryConfig},
    store::{Store, embedded::EmbeddedStore, testing::EtcdServer, testing::eventually},
};
use llmchain_proto::{
    model::{LabelSelector, UploadHeader},
    pb::{self, agent_message, coordinator_message, fleet_client::FleetClient},
};
use prost::Message;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Streaming, transport::Channel};

/// How long a test waits for something that should happen at once.
const PROMPT: Duration = Duration::from_secs(5);

/// Short session timing so liveness tests finish in a few seconds.
fn fast() -> FleetConfig {
    FleetConfig { heartbeat_interval: Duration::from_millis(300), lease_ttl: Duration::from_millis(1000) }
}

fn trainer_key() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

/// One in-process coordinator serving the registry and the fleet on one store.
struct Coordinator {
    addr: std::net::SocketAddr,
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    async fn start(store: Arc<dyn Store>, config: FleetConfig) -> Coordinator {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalBlobStore::open(&dir.path().join("blobs")).await.unwrap());
        let blobs = Arc::new(VerifiedBlobs::new(local));
        let registry = Arc::new(Registry::new(
            RegistryConfig::new(TrustedKeys::new([trainer_key().public()])),
            store.clone(),
            blobs,
        ));
        let stop = CancellationToken::new();
        let fleet = Arc::new(Fleet::new(config, store, stop.child_token()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (reg, flt, token) =
            (registry::service(registry.clone()), fleet::service(fleet.clone()), stop.clone());
        let server = tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener).map(|s| {
                let s = s?;
                s.set_nodelay(true)?;
                Ok::<_, std::io::Error>(s)
            });
            tonic::transport::Server::builder()
                .add_service(reg)
                .add_service(flt)
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
                .unwrap();
        });
        Coordinator { addr, fleet, registry, stop, server, _dir: dir }
    }

    async fn embedded(config: FleetConfig) -> (Coordinator, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("state.redb")).await.unwrap();
        (Coordinator::start(Arc::new(store), config).await, dir)
    }

    async fn client(&self) -> FleetClient<Channel> {
        FleetClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    /// Publishes a tiny synthetic `model@version` through the registry.
    async fn publish(&self, model: &str, version: u64) {
        let (manifest, blobs) = synthetic_version(model, version, 0, &tiny_llama(1), |_| version);
        for (digest, bytes) in blobs {
            let header = UploadHeader { digest, total_size: bytes.len() as u64 };
            let chunks = futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed();
            self.registry.upload_blob(header, chunks).await.unwrap();
        }
        self.registry.publish(trainer_key().sign(&manifest)).await.unwrap();
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.server.await.unwrap();
    }
}

fn label(key: &str, value: &str) -> pb::Label {
    pb::Label { key: key.into(), value: value.into() }
}

fn model(name: &str, version: u64) -> pb::ModelRef {
    pb::ModelRef { model: name.into(), version }
}

fn msg(kind: agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

/// One simulated agent on its session.
struct Agent {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::CoordinatorMessage>,
    welcome: pb::Welcome,
    seq: u64,
}

impl Agent {
    async fn connect(client: &mut FleetClient<Channel>, id: &str, labels: Vec<pb::Label>) -> Agent {
        let hello = pb::Hello {
            agent_id: id.into(),
            labels,
            status: Some(pb::AgentStatus { decisions_per_second: 1.5, ..Default::default() }),
            agent_version: "0.1.0".into(),
        };
        let (tx, rx) = mpsc::channel(16);
        tx.send(msg(agent_message::Kind::Hello(hello))).await.unwrap();
        let mut rx = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let first = tokio::time::timeout(PROMPT, rx.message()).await.unwrap().unwrap().unwrap();
        let Some(coordinator_message::Kind::Welcome(welcome)) = first.kind else {
            panic!("the first answer must be a welcome, got {first:?}");
        };
        Agent { tx, rx, welcome, seq: 0 }
    }

    async fn heartbeat(&mut self, decisions_per_second: f64) {
        self.seq += 1;
        let status = pb::AgentStatus { decisions_per_second, ..Default::default() };
        let hb =
            pb::Heartbeat { seq: self.seq, sent_at: Some(SystemTime::now().into()), status: Some(status) };
        self.tx.send(msg(agent_message::Kind::Heartbeat(hb))).await.unwrap();
    }

    /// The next message, which must be an assignment.
    async fn assignment(&mut self) -> pb::Assignment {
        let next = tokio::time::timeout(PROMPT, self.rx.message()).await.expect("no assignment arrived");
        match next.unwrap().and_then(|m| m.kind) {
            Some(coordinator_message::Kind::Assignment(a)) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    /// Waits for the session to end with an error and returns it.
    async fn ended(&mut self, within: Duration) -> tonic::Status {
        loop {
            match tokio::time::timeout(within, self.rx.message()).await.expect("the session did not end") {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the session ended without a status"),
                Err(status) => return status,
            }
        }
    }
}

async fn agents(client: &mut FleetClient<Channel>, selector: &str) -> Vec<pb::AgentInfo> {
    client.list_agents(pb::ListAgentsRequest { selector: selector.into() }).await.unwrap().into_inner().agents
}

async fn is_online(client: &FleetClient<Channel>, id: &str) -> bool {
    let mut client = client.clone();
    agents(&mut client, "").await.iter().any(|a| a.agent_id == id && a.online)
}

fn assign_ids(ids: &[&str], target: pb::ModelRef) -> pb::AssignRequest {
    pb::AssignRequest {
        agent_ids: ids.iter().map(|s| s.to_string()).collect(),
        target: Some(target),
        activate: true,
        ..Default::default()
    }
}

fn assign_selector(selector: &str, target: pb::ModelRef) -> pb::AssignRequest {
    pb::AssignRequest {
        selector: selector.into(),
        target: Some(target),
        activate: true,
        ..Default::default()
    }
}

fn at(secs: u64) -> prost_types::Timestamp {
    (SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)).into()
}

/// A summary of `agent` for a 60 s window ending at `at(end)`.
fn summary(agent: &str, seq: u64, m: pb::ModelRef, end: u64) -> pb::Summary {
    pb::Summary {
        agent_id: agent.into(),
        seq,
        window_start: Some(at(end - 60)),
        window_end: Some(at(end)),
        model: Some(m),
        label_counts: vec![
            pb::LabelCount { label: "normal".into(), count: 50 + seq },
            pb::LabelCount { label: "shutdown".into(), count: 1 },
        ],
        confidence_histogram: vec![0, 0, 0, 0, 0, 1, 2, 3, 4, 5],
        latency_p50_ms: 12.0,
        latency_p95_ms: 30.0,
        latency_p99_ms: 41.0,
        records: 51 + seq,
        raw_bytes: 100_000 + seq,
        bad_records: 1,
        hard_examples: vec![pb::HardExample {
            text: format!("pump temp rising, seq {seq}"),
            decision: "inspect".into(),
            scores: vec![],
        }],
        spool_dropped: 0,
    }
}

async fn report(
    client: &mut FleetClient<Channel>,
    agent: &str,
    summaries: Vec<pb::Summary>,
) -> Result<Vec<u64>, tonic::Status> {
    let req = pb::ReportSummariesRequest { agent_id: agent.into(), summaries };
    client.report_summaries(req).await.map(|r| r.into_inner().acked)
}

async fn list(client: &mut FleetClient<Channel>, req: pb::ListSummariesRequest) -> Vec<(String, u64)> {
    let got = client.list_summaries(req).await.unwrap().into_inner().summaries;
    got.into_iter().map(|s| (s.agent_id, s.seq)).collect()
}

// ---- scenarios, each run on every backend that matters ----

async fn assignments_reach_connected_and_later_agents(coord: &Coordinator) {
    coord.publish("smol", 1).await;
    coord.publish("smol", 2).await;
    let mut client = coord.client().await;
    let mut a = Agent::connect(&mut client, "edge-a", vec![label("site", "p7")]).await;
    let mut b = Agent::connect(&mut client, "edge-b", vec![label("site", "p8"), label("kind", "pump")]).await;

    // By id: only that agent's session gets it.
    let res = client.assign(assign_ids(&["edge-a"], model("smol", 1))).await.unwrap().into_inner();
    assert_eq!(res.agent_ids, ["edge-a"]);
    let got = a.assignment().await;
    assert_eq!(got.target, Some(model("smol", 1)));
    assert!(got.activate && !got.rollback);
    assert!(got.assignment_id.ends_with(":edge-a"), "{}", got.assignment_id);

    // By selector: every connected agent that matches, and later ones through the rule.
    let res = client.assign(assign_selector("site=p8", model("smol", 2))).await.unwrap().into_inner();
    assert_eq!(res.agent_ids, ["edge-b"]);
    let got_b = b.assignment().await;
    assert_eq!(got_b.target, Some(model("smol", 2)));
    let mut c = Agent::connect(&mut client, "edge-c", vec![label("site", "p8")]).await;
    let got_c = c.assignment().await;
    assert_eq!(got_c.target, Some(model("smol", 2)), "an agent connecting later gets the selector's version");
    assert_ne!(got_c.assignment_id, got_b.assignment_id);

    // A reconnecting agent gets its stored assignment first thing.
    drop(a);
    let mut a = Agent::connect(&mut client, "edge-a", vec![label("site", "p7")]).await;
    assert_eq!(a.assignment().await.assignment_id, got.assignment_id);

    // A direct assignment after the rule wins over it on reconnect.
    client.assign(assign_ids(&["edge-c"], model("smol", 1))).await.unwrap();
    let direct = c.assignment().await;
    assert_eq!(direct.target, Some(model("smol", 1)));
    drop(c);
    let mut c = Agent::connect(&mut client, "edge-c", vec![label("site", "p8")]).await;
    assert_eq!(c.assignment().await.assignment_id, direct.assignment_id);

    // Refusals.
    let err = client.assign(assign_ids(&["edge-a", "nobody"], model("smol", 1))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("nobody"), "{err:?}");
    let err = client.assign(assign_ids(&["edge-a"], model("smol", 9))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let both = pb::AssignRequest { selector: "site=p7".into(), ..assign_ids(&["edge-a"], model("smol", 1)) };
    let err = client.assign(both).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

async fn summaries_are_stored_and_counted_once(coord: &Coordinator) {
    let mut client = coord.client().await;
    let v1 = model("smol", 1);
    let s: Vec<pb::Summary> = (1..=4).map(|seq| summary("edge-a", seq, v1.clone(), 60 * seq)).collect();

    assert_eq!(report(&mut client, "edge-a", s[..3].to_vec()).await.unwrap(), [1, 2, 3]);
    // Sent again, reordered, with a duplicate inside the request and a new one.
    let again = vec![s[3].clone(), s[1].clone(), s[2].clone(), s[1].clone()];
    assert_eq!(report(&mut client, "edge-a", again).await.unwrap(), [2, 3, 4]);
    // Two reports racing over the same summaries still count each once.
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (r1, r2) = tokio::join!(report(&mut c1, "edge-a", s.clone()), report(&mut c2, "edge-a", s.clone()));
    assert_eq!(r1.unwrap(), [1, 2, 3, 4]);
    assert_eq!(r2.unwrap(), [1, 2, 3, 4]);

    let stored = list(&mut client, pb::ListSummariesRequest::default()).await;
    assert_eq!(
        stored,
        [("edge-a".into(), 4), ("edge-a".into(), 3), ("edge-a".into(), 2), ("edge-a".into(), 1)]
    );

    let raw: u64 = s.iter().map(|x| x.raw_bytes).sum();
    let summary_bytes: u64 = s.iter().map(|x| x.encoded_len() as u64).sum();
    let stats = client.get_fleet_stats(pb::GetFleetStatsRequest::default()).await.unwrap().into_inner();
    assert_eq!((stats.summaries, stats.raw_bytes, stats.summary_bytes), (4, raw, summary_bytes));
    assert_eq!(stats.bytes_saved, raw - summary_bytes);
    let [version] = &stats.versions[..] else { panic!("one version: {stats:?}") };
    assert_eq!(version.model, Some(v1));
    assert_eq!(version.records, s.iter().map(|x| x.records).sum::<u64>());
    assert_eq!(version.bad_records, 4);
    let normal = s.iter().map(|x| x.label_counts[0].count).sum::<u64>();
    assert_eq!(
        version.decisions,
        [
            pb::LabelCount { label: "normal".into(), count: normal },
            pb::LabelCount { label: "shutdown".into(), count: 4 }
        ]
    );

    // Per agent: bytes_saved is raw bytes minus the stored summaries' encoded size.
    let mut agent = Agent::connect(&mut client, "edge-a", vec![]).await;
    agent.heartbeat(2.0).await;
    let listed = agents(&mut client, "").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].bytes_saved, raw - summary_bytes);

    // A summary of another agent is refused, naming it, and nothing of the request is stored.
    let err = report(
        &mut client,
        "edge-a",
        vec![summary("edge-a", 5, model("smol", 1), 300), summary("edge-b", 6, model("smol", 1), 360)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("summaries[1].agent_id"), "{err:?}");
    assert_eq!(list(&mut client, pb::ListSummariesRequest::default()).await.len(), 4);
}

async fn a_silent_agent_goes_offline_after_the_lease_ttl(coord: &Coordinator) {
    let mut client = coord.client().await;
    let mut silent = Agent::connect(&mut client, "edge-silent", vec![]).await;
    assert_eq!((silent.welcome.heartbeat_interval_ms, silent.welcome.lease_ttl_ms), (300, 1000));
    // Heartbeats keep it online for longer than one TTL.
    for _ in 0..5 {
        silent.heartbeat(1.0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(is_online(&client, "edge-silent").await);

    // Then it stays connected but says nothing: offline after the TTL, and its session ends.
    eventually(Duration::from_secs(4), "the silent agent to show offline", || {
        let client = client.clone();
        async move { !is_online(&client, "edge-silent").await }
    })
    .await;
    let status = silent.ended(PROMPT).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(agents(&mut client, "").await.len(), 1, "offline agents stay listed");
}

// ---- embedded store ----

#[tokio::test]
async fn hello_gets_welcome_and_heartbeats_update_the_record() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    let mut client = coord.client().await;
    let mut a = Agent::connect(&mut client, "edge-a", vec![label("site", "p7"), label("kind", "pump")]).await;
    assert_eq!((a.welcome.heartbeat_interval_ms, a.welcome.lease_ttl_ms), (5000, 15000));
    assert_eq!(a.welcome.session_id.len(), 16);

    let listed = agents(&mut client, "site=p7").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].agent_id, "edge-a");
    assert!(listed[0].online);
    assert_eq!(listed[0].labels, [label("site", "p7"), label("kind", "pump")]);
    assert_eq!(listed[0].status.as_ref().unwrap().decisions_per_second, 1.5);
    assert!(agents(&mut client, "site=p8").await.is_empty());

    a.heartbeat(9.0).await;
    let result = pb::AssignmentResult {
        assignment_id: "x:edge-a".into(),
        outcome: pb::AssignmentOutcome::LoadFailed as i32,
        message: "self-test failed".into(),
        running: None,
    };
    a.tx.send(msg(agent_message::Kind::Result(result))).await.unwrap();
    eventually(PROMPT, "the heartbeat and result to be stored", || {
        let fleet = coord.fleet.clone();
        async move {
            let listed = fleet.list_agents(&LabelSelector::default()).await.unwrap();
            let state = &listed[0].state;
            state.status.decisions_per_second == 9.0
                && state.last_result.as_ref().is_some_and(|(r, _)| r.message == "self-test failed")
        }
    })
    .await;

    // A second hello on the same session is refused and ends it.
    let hello = pb::Hello { agent_id: "edge-a".into(), ..Default::default() };
    a.tx.send(msg(agent_message::Kind::Hello(hello))).await.unwrap();
    assert_eq!(a.ended(PROMPT).await.code(), Code::InvalidArgument);

    // An agent that drops its stream shows offline at once, long before the 15 s TTL: its
    // session revokes the lease.
    let b = Agent::connect(&mut client, "edge-b", vec![]).await;
    assert!(is_online(&client, "edge-b").await);
    drop(b);
    eventually(Duration::from_secs(3), "the dropped agent to show offline", || {
        let client = client.clone();
        async move { !is_online(&client, "edge-b").await && !is_online(&client, "edge-a").await }
    })
    .await;
    coord.shutdown().await;
}

#[tokio::test]
async fn a_session_must_start_with_hello() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    let mut client = coord.client().await;
    let hb = msg(agent_message::Kind::Heartbeat(pb::Heartbeat { seq: 1, ..Default::default() }));
    let err = client.session(tokio_stream::iter([hb])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hello"), "{err:?}");
    let bad = msg(agent_message::Kind::Hello(pb::Hello { agent_id: "Bad Id".into(), ..Default::default() }));
    let err = client.session(tokio_stream::iter([bad])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("hello.agent_id"), "{err:?}");
    coord.shutdown().await;
}

#[tokio::test]
async fn a_second_session_replaces_the_first() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    let mut client = coord.client().await;
    let mut first = Agent::connect(&mut client, "edge-a", vec![]).await;
    let second = Agent::connect(&mut client, "edge-a", vec![]).await;
    let status = first.ended(PROMPT).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(&second.welcome.session_id), "{status:?}");
    // The first session revoked its own lease, which no longer holds the online key.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(is_online(&client, "edge-a").await);
    coord.shutdown().await;
}

#[tokio::test]
async fn assignments_embedded() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    assignments_reach_connected_and_later_agents(&coord).await;
    coord.shutdown().await;
}

#[tokio::test]
async fn summaries_embedded() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    summaries_are_stored_and_counted_once(&coord).await;
    coord.shutdown().await;
}

#[tokio::test]
async fn offline_embedded() {
    let (coord, _dir) = Coordinator::embedded(fast()).await;
    a_silent_agent_goes_offline_after_the_lease_ttl(&coord).await;
    coord.shutdown().await;
}

#[tokio::test]
async fn list_summaries_filters_and_orders_newest_first() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    let mut client = coord.client().await;
    report(
        &mut client,
        "edge-a",
        vec![summary("edge-a", 1, model("smol", 1), 60), summary("edge-a", 2, model("smol", 2), 180)],
    )
    .await
    .unwrap();
    report(
        &mut client,
        "edge-b",
        vec![summary("edge-b", 1, model("smol", 2), 120), summary("edge-b", 2, model("big", 1), 240)],
    )
    .await
    .unwrap();
    let all = list(&mut client, pb::ListSummariesRequest::default()).await;
    let ids = |v: &[(&str, u64)]| v.iter().map(|(a, s)| (a.to_string(), *s)).collect::<Vec<_>>();
    assert_eq!(all, ids(&[("edge-b", 2), ("edge-a", 2), ("edge-b", 1), ("edge-a", 1)]));

    let by_agent = pb::ListSummariesRequest { agent_id: "edge-a".into(), ..Default::default() };
    assert_eq!(list(&mut client, by_agent).await, ids(&[("edge-a", 2), ("edge-a", 1)]));
    let by_model = pb::ListSummariesRequest { model: Some(model("smol", 0)), ..Default::default() };
    assert_eq!(list(&mut client, by_model).await, ids(&[("edge-a", 2), ("edge-b", 1), ("edge-a", 1)]));
    let by_version = pb::ListSummariesRequest { model: Some(model("smol", 2)), ..Default::default() };
    assert_eq!(list(&mut client, by_version).await, ids(&[("edge-a", 2), ("edge-b", 1)]));
    // Window ends in [120, 240): 120 and 180.
    let window = pb::TimeRange { start: Some(at(120)), end: Some(at(240)) };
    let by_window = pb::ListSummariesRequest { window: Some(window), ..Default::default() };
    assert_eq!(list(&mut client, by_window).await, ids(&[("edge-a", 2), ("edge-b", 1)]));
    let limited = pb::ListSummariesRequest { limit: 1, ..Default::default() };
    assert_eq!(list(&mut client, limited).await, ids(&[("edge-b", 2)]));
    let bad = pb::ListSummariesRequest { model: Some(model("", 3)), ..Default::default() };
    assert_eq!(client.list_summaries(bad).await.unwrap_err().code(), Code::InvalidArgument);

    let stats = client.get_fleet_stats(pb::GetFleetStatsRequest { model: "smol".into() }).await.unwrap();
    let versions: Vec<_> =
        stats.into_inner().versions.into_iter().map(|v| (v.model.unwrap(), v.summaries)).collect();
    assert_eq!(versions, [(model("smol", 1), 1), (model("smol", 2), 2)]);
    coord.shutdown().await;
}

#[tokio::test]
async fn watch_summaries_delivers_new_matching_summaries() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    let mut client = coord.client().await;
    report(&mut client, "edge-b", vec![summary("edge-b", 1, model("smol", 1), 60)]).await.unwrap();
    let req = pb::ListSummariesRequest { agent_id: "edge-b".into(), ..Default::default() };
    let mut watch = client.watch_summaries(req).await.unwrap().into_inner();
    report(&mut client, "edge-a", vec![summary("edge-a", 1, model("smol", 1), 60)]).await.unwrap();
    report(&mut client, "edge-b", vec![summary("edge-b", 2, model("smol", 1), 120)]).await.unwrap();
    let got = tokio::time::timeout(PROMPT, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!((got.agent_id.as_str(), got.seq), ("edge-b", 2), "only new summaries of the watched agent");
    assert_eq!(got, summary("edge-b", 2, model("smol", 1), 120));
    coord.shutdown().await;
}

#[tokio::test]
async fn security_rpcs_without_a_ca_or_authorization_layer() {
    let (coord, _dir) = Coordinator::embedded(FleetConfig::default()).await;
    let mut client = coord.client().await;
    // No CA configured: nothing to enroll with.
    let err = client.enroll(pb::EnrollRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // Requests are validated before anything else.
    let err = client.create_bootstrap_token(pb::CreateBootstrapTokenRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = client.revoke_agent(pb::RevokeAgentRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A valid revocation needs the authorization layer, which this bare server lacks.
    let req = pb::RevokeAgentRequest { agent_id: "agent-1".into(), reason: String::new() };
    let err = client.revoke_agent(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    coord.shutdown().await;
}

// ---- etcd: one server per test, each scenario under its own prefix ----

async fn on_etcd(config: FleetConfig) -> (Coordinator, EtcdServer) {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/fleet-test/").await.unwrap();
    (Coordinator::start(Arc::new(store), config).await, etcd)
}

#[tokio::test]
async fn assignments_etcd() {
    let (coord, _etcd) = on_etcd(FleetConfig::default()).await;
    assignments_reach_connected_and_later_agents(&coord).await;
    coord.shutdown().await;
}

#[tokio::test]
async fn summaries_etcd() {
    let (coord, _etcd) = on_etcd(FleetConfig::default()).await;
    summaries_are_stored_and_counted_once(&coord).await;
    coord.shutdown().await;
}

#[tokio::test]
async fn offline_etcd() {
    let (coord, _etcd) = on_etcd(fast()).await;
    a_silent_agent_goes_offline_after_the_lease_ttl(&coord).await;
    coord.shutdown().await;
}
