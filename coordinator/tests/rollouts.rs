//! Rollouts end to end: an in-process coordinator (registry, fleet and rollouts on one store)
//! with its leader-elected controller, and simulated agents that are real `Session` clients:
//! they answer assignments with ACTIVATED (or LOAD_FAILED for a bad version), heartbeat the
//! version they run, and report summaries with a label mix chosen per version.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use futures::StreamExt;
use llmchain_artifact::{
    SigningKey, TrustedKeys,
    testing::{synthetic_version, tiny_llama},
};
use llmchain_coordinator::{
    Error,
    blobs::{LocalBlobStore, VerifiedBlobs},
    fleet::{self, Fleet, FleetConfig},
    registry::{self, Registry, RegistryApi, RegistryConfig},
    rollout::{self, Controller, ControllerConfig, Rollouts, records::ELECTION_KEY},
    store::{
        KeyValue, LeaseId, Listing, Revision, Store, Txn, TxnResult, WatchStream,
        election::Election,
        embedded::EmbeddedStore,
        testing::{EtcdServer, eventually},
    },
};
use llmchain_proto::{
    model::UploadHeader,
    pb::{
        self, agent_message, coordinator_message, fleet_client::FleetClient, rollouts_client::RolloutsClient,
    },
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

/// How long a test waits for something that should happen within a few ticks.
const PROMPT: Duration = Duration::from_secs(10);
/// Controller timing for tests: a fast tick, and a short lease for the failover test.
const CONTROLLER: ControllerConfig =
    ControllerConfig { tick: Duration::from_millis(100), lease_ttl: Duration::from_secs(2) };

fn trainer_key() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

fn model(version: u64) -> pb::ModelRef {
    pb::ModelRef { model: "smol".into(), version }
}

/// An in-process coordinator serving the registry, the fleet and rollouts on one store.
struct Coordinator {
    addr: std::net::SocketAddr,
    registry: Arc<Registry>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    async fn start(store: Arc<dyn Store>) -> Coordinator {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalBlobStore::open(&dir.path().join("blobs")).await.unwrap());
        let registry = Arc::new(Registry::new(
            RegistryConfig::new(TrustedKeys::new([trainer_key().public()])),
            store.clone(),
            Arc::new(VerifiedBlobs::new(local)),
        ));
        let stop = CancellationToken::new();
        let fleet = Arc::new(Fleet::new(FleetConfig::default(), store.clone(), stop.child_token()));
        let rollouts = Arc::new(Rollouts::new(store, "api"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let services =
            (registry::service(registry.clone()), fleet::service(fleet), rollout::service(rollouts));
        let token = stop.clone();
        let server = tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener).map(|s| {
                let s = s?;
                s.set_nodelay(true)?;
                Ok::<_, std::io::Error>(s)
            });
            tonic::transport::Server::builder()
                .add_service(services.0)
                .add_service(services.1)
                .add_service(services.2)
                .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
                .await
                .unwrap();
        });
        let coord = Coordinator { addr, registry, stop, server, _dir: dir };
        coord.publish(1).await;
        coord.publish(2).await;
        coord
    }

    /// A coordinator on a fresh embedded store, with one controller that leads at once.
    async fn embedded() -> (Coordinator, Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).await.unwrap());
        let coord = Coordinator::start(store.clone()).await;
        Controller::new(store.clone(), CONTROLLER, "coord-a").spawn(coord.stop.child_token());
        (coord, store, dir)
    }

    async fn publish(&self, version: u64) {
        let (manifest, blobs) = synthetic_version("smol", version, 0, &tiny_llama(1), |_| version);
        for (digest, bytes) in blobs {
            let header = UploadHeader { digest, total_size: bytes.len() as u64 };
            let chunks = futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed();
            self.registry.upload_blob(header, chunks).await.unwrap();
        }
        self.registry.publish(trainer_key().sign(&manifest)).await.unwrap();
    }

    async fn fleet(&self) -> FleetClient<Channel> {
        FleetClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    async fn rollouts(&self) -> RolloutsClient<Channel> {
        RolloutsClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.server.await.unwrap();
    }
}

/// How a simulated agent behaves.
#[derive(Clone, Default)]
struct Behavior {
    /// Versions whose load (self-test) fails.
    bad: HashSet<u64>,
    /// Label mix each version decides with; (normal 90, shutdown 10) when not given.
    mixes: HashMap<u64, Vec<(&'static str, u64)>>,
}

impl Behavior {
    fn mix(&self, version: u64) -> Vec<pb::LabelCount> {
        let default = vec![("normal", 90), ("shutdown", 10)];
        let mix = self.mixes.get(&version).unwrap_or(&default);
        mix.iter().map(|(l, c)| pb::LabelCount { label: l.to_string(), count: *c }).collect()
    }
}

/// Summary sequence numbers, unique across agents and reconnects of one test binary.
static SEQ: AtomicU64 = AtomicU64::new(1);

/// A simulated agent running on its own task until dropped or stopped.
struct SimAgent {
    id: String,
    /// Every assignment received, in order.
    log: Arc<Mutex<Vec<pb::Assignment>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SimAgent {
    /// Connects as `id`, running `running`, and reports one summary of it.
    async fn start(coord: &Coordinator, id: &str, running: u64, behavior: Behavior) -> SimAgent {
        let mut client = coord.fleet().await;
        let (tx, rx) = mpsc::channel(16);
        let status = |v: u64| pb::AgentStatus { running: Some(model(v)), ..Default::default() };
        let hello = pb::Hello {
            agent_id: id.into(),
            labels: vec![pb::Label { key: "site".into(), value: "p7".into() }],
            status: Some(status(running)),
            agent_version: "sim".into(),
        };
        tx.send(msg(agent_message::Kind::Hello(hello))).await.unwrap();
        let mut inbound = client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let first = tokio::time::timeout(PROMPT, inbound.message()).await.unwrap().unwrap().unwrap();
        assert!(matches!(first.kind, Some(coordinator_message::Kind::Welcome(_))), "{first:?}");
        report(&mut client, id, running, &behavior).await;

        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (agent, log2, stop2) = (id.to_string(), log.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut current = running;
            let mut beat = 0u64;
            loop {
                let next = tokio::select! {
                    () = stop2.cancelled() => return,
                    next = inbound.message() => next,
                };
                let Ok(Some(pb::CoordinatorMessage { kind: Some(coordinator_message::Kind::Assignment(a)) })) =
                    next
                else {
                    return;
                };
                log2.lock().unwrap().push(a.clone());
                let version = a.target.as_ref().map_or(0, |t| t.version);
                let outcome = if !a.activate {
                    pb::AssignmentOutcome::Prefetched
                } else if behavior.bad.contains(&version) && !a.rollback {
                    pb::AssignmentOutcome::LoadFailed
                } else {
                    current = version;
                    pb::AssignmentOutcome::Activated
                };
                let result = pb::AssignmentResult {
                    assignment_id: a.assignment_id.clone(),
                    outcome: outcome as i32,
                    message: if outcome == pb::AssignmentOutcome::LoadFailed {
                        "self-test failed".into()
                    } else {
                        String::new()
                    },
                    running: Some(model(current)),
                };
                beat += 1;
                let hb = pb::Heartbeat {
                    seq: beat,
                    sent_at: Some(SystemTime::now().into()),
                    status: Some(status(current)),
                };
                if tx.send(msg(agent_message::Kind::Result(result))).await.is_err()
                    || tx.send(msg(agent_message::Kind::Heartbeat(hb))).await.is_err()
                {
                    return;
                }
                if outcome == pb::AssignmentOutcome::Activated {
                    report(&mut client, &agent, current, &behavior).await;
                }
            }
        });
        SimAgent { id: id.into(), log, stop, task }
    }

    fn assignments(&self) -> Vec<pb::Assignment> {
        self.log.lock().unwrap().clone()
    }

    /// Closes the session, like an agent going offline.
    async fn disconnect(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

fn msg(kind: agent_message::Kind) -> pb::AgentMessage {
    pb::AgentMessage { kind: Some(kind) }
}

/// Reports one summary of 100 decisions made by `version`, with its label mix.
async fn report(client: &mut FleetClient<Channel>, agent: &str, version: u64, behavior: &Behavior) {
    let now = SystemTime::now();
    let label_counts = behavior.mix(version);
    let records = label_counts.iter().map(|c| c.count).sum::<u64>() + 1;
    let summary = pb::Summary {
        agent_id: agent.into(),
        seq: SEQ.fetch_add(1, Ordering::Relaxed),
        window_start: Some((now - Duration::from_secs(60)).into()),
        window_end: Some(now.into()),
        model: Some(model(version)),
        label_counts,
        confidence_histogram: vec![0, 0, 0, 0, 0, 1, 2, 3, 4, 90],
        latency_p50_ms: 12.0,
        latency_p95_ms: 30.0,
        latency_p99_ms: 41.0,
        records,
        raw_bytes: 100_000,
        bad_records: 1,
        hard_examples: vec![],
        spool_dropped: 0,
    };
    let req = pb::ReportSummariesRequest { agent_id: agent.into(), summaries: vec![summary] };
    client.report_summaries(req).await.unwrap();
}

async fn start_agents(coord: &Coordinator, n: usize, behavior: &Behavior) -> Vec<SimAgent> {
    let mut agents = Vec::new();
    for i in 0..n {
        agents.push(SimAgent::start(coord, &format!("edge-{i}"), 1, behavior.clone()).await);
    }
    agents
}

fn step(agents: u32, percent: u32, soak_ms: u32) -> pb::RolloutStep {
    pb::RolloutStep { agents, percent, soak_seconds: 0, soak_ms }
}

fn gates() -> pb::RolloutGates {
    pb::RolloutGates {
        max_load_failures: 0,
        max_bad_record_rate: 0.05,
        max_latency_p99_ms: 500.0,
        max_decision_drift: 0.2,
        min_probe_accuracy: 0.0,
        min_decisions: 50,
    }
}

fn request(steps: Vec<pb::RolloutStep>) -> pb::CreateRolloutRequest {
    pb::CreateRolloutRequest {
        target: Some(model(2)),
        selector: "site=p7".into(),
        steps,
        gates: Some(gates()),
        ..Default::default()
    }
}

async fn get(client: &RolloutsClient<Channel>, id: &str) -> pb::Rollout {
    let mut client = client.clone();
    client.get_rollout(pb::GetRolloutRequest { id: id.into() }).await.unwrap().into_inner()
}

/// Waits until the rollout satisfies `check`, then returns it.
async fn wait_for(
    client: &RolloutsClient<Channel>,
    id: &str,
    within: Duration,
    what: &str,
    check: impl Fn(&pb::Rollout) -> bool,
) -> pb::Rollout {
    let check = &check;
    eventually(within, what, || async move { check(&get(client, id).await) }).await;
    get(client, id).await
}

fn in_state(state: pb::RolloutState) -> impl Fn(&pb::Rollout) -> bool {
    move |r| r.state == state as i32
}

/// The history's step and outcome events, without their details (what follows a colon).
fn transitions(r: &pb::Rollout) -> Vec<String> {
    r.history
        .iter()
        .map(|e| e.message.split(':').next().unwrap().to_string())
        .filter(|m| m.starts_with("step ") || m.starts_with("rollout ") || m.starts_with("rolled back"))
        .collect()
}

fn full_run(steps: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..steps {
        out.extend([format!("step {i} activating"), format!("step {i} soaking"), format!("step {i} passed")]);
    }
    out.push("rollout succeeded".into());
    out
}

/// Versions the fleet shows each agent running, by id.
async fn running(coord: &Coordinator) -> Vec<(String, u64)> {
    let mut client = coord.fleet().await;
    let agents = client.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    agents
        .into_iter()
        .map(|a| (a.agent_id, a.status.and_then(|s| s.running).map_or(0, |m| m.version)))
        .collect()
}

async fn all_run(coord: &Coordinator, version: u64, n: usize) {
    eventually(PROMPT, &format!("every agent to run v{version}"), || async {
        let r = running(coord).await;
        r.len() == n && r.iter().all(|(_, v)| *v == version)
    })
    .await;
}

// ---- scenarios ----

#[tokio::test]
async fn canary_then_full_moves_every_agent_once_per_step() {
    let (coord, store, _dir) = Coordinator::embedded().await;
    let agents = start_agents(&coord, 5, &Behavior::default()).await;
    let client = coord.rollouts().await;

    let created = client
        .clone()
        .create_rollout(pb::CreateRolloutRequest {
            prefetch: true,
            ..request(vec![step(1, 0, 300), step(0, 100, 300)])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.state, pb::RolloutState::Running as i32);
    assert_eq!(created.previous.len(), 5);
    assert!(created.previous.iter().all(|p| p.version == 1));

    let done = wait_for(
        &client,
        &created.id,
        PROMPT,
        "the rollout to succeed",
        in_state(pb::RolloutState::Succeeded),
    )
    .await;
    assert_eq!(transitions(&done), full_run(2), "{:#?}", done.history);
    assert_eq!(done.steps[0].agent_ids, ["edge-0"]);
    assert_eq!(done.steps[1].agent_ids, ["edge-1", "edge-2", "edge-3", "edge-4"]);
    for s in &done.steps {
        assert_eq!(s.state, pb::StepState::Passed as i32);
        assert!(s.pending_agent_ids.is_empty());
        let names: Vec<_> = s.gates.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(
            names,
            ["max_load_failures", "max_bad_record_rate", "max_latency_p99_ms", "max_decision_drift"]
        );
        assert!(s.gates.iter().all(|g| g.judged && g.passed), "{:?}", s.gates);
    }
    all_run(&coord, 2, 5).await;

    // The canary was activated directly; every other agent pre-fetched during the canary step,
    // then activated when its step started.
    let kinds = |a: &SimAgent| -> Vec<(bool, u64)> {
        a.assignments().iter().map(|x| (x.activate, x.target.as_ref().unwrap().version)).collect()
    };
    assert_eq!(kinds(&agents[0]), [(true, 2)]);
    for agent in &agents[1..] {
        assert_eq!(kinds(agent), [(false, 2), (true, 2)], "{}", agent.id);
        let ids: Vec<_> = agent.assignments().into_iter().map(|a| a.assignment_id).collect();
        assert_eq!(
            ids,
            [
                format!("{}.s1.prefetch:{}", done.id, agent.id),
                format!("{}.s1.activate:{}", done.id, agent.id)
            ]
        );
    }

    // The state machine lives in the store, in the record a new leader would read.
    let kv = store.get(&format!("rollouts/{}", done.id)).await.unwrap().unwrap();
    let record: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(record["state"], "succeeded");
    assert_eq!(record["current_step"], 1);
    coord.shutdown().await;
}

/// A bad version stops at the canary, which is moved back to v1 without operator action.
async fn bad_version_is_rolled_back_at_the_canary(behavior: Behavior, failed_gate: &str) {
    let (coord, _store, _dir) = Coordinator::embedded().await;
    let agents = start_agents(&coord, 3, &behavior).await;
    let client = coord.rollouts().await;
    let created = client
        .clone()
        .create_rollout(request(vec![step(1, 0, 300), step(0, 100, 300)]))
        .await
        .unwrap()
        .into_inner();
    let done = wait_for(&client, &created.id, PROMPT, "the rollback", |r| {
        r.state == pb::RolloutState::RolledBack as i32
            && r.history.iter().any(|e| e.message.starts_with("rolled back"))
    })
    .await;
    // A load failure settles the canary as failed (no soak); drift may be seen before or after
    // the soak began, depending on when its summary arrives.
    let mut seen = transitions(&done);
    seen.retain(|m| m != "step 0 soaking");
    assert_eq!(
        seen,
        ["step 0 activating", "step 0 failed", "rolled back 1 agents to their previous version"]
    );
    let failed = done.history.iter().find(|e| e.message.starts_with("step 0 failed")).unwrap();
    assert!(failed.message.contains(failed_gate), "{}", failed.message);
    assert_eq!(done.steps[0].state, pb::StepState::Failed as i32);
    assert_eq!(done.steps[1].state, pb::StepState::Pending as i32);
    let gate = done.steps[0].gates.iter().find(|g| g.name == failed_gate).unwrap();
    assert!(gate.judged && !gate.passed, "{gate:?}");

    // The canary got a rollback assignment to v1 and reports v1 running; nobody else was
    // ever told to activate v2.
    eventually(PROMPT, "the canary to run v1 again", || async {
        running(&coord).await.iter().all(|(_, v)| *v == 1)
            && agents[0].assignments().last().is_some_and(|a| a.rollback)
    })
    .await;
    let last = agents[0].assignments().last().cloned().unwrap();
    assert_eq!((last.target, last.activate, last.rollback), (Some(model(1)), true, true));
    assert_eq!(last.assignment_id, format!("{}.rollback:edge-0", done.id));
    for agent in &agents[1..] {
        assert!(agent.assignments().is_empty(), "{}: {:?}", agent.id, agent.assignments());
    }
    coord.shutdown().await;
}

#[tokio::test]
async fn a_version_failing_its_self_test_stops_at_the_canary() {
    let behavior = Behavior { bad: [2].into(), ..Default::default() };
    bad_version_is_rolled_back_at_the_canary(behavior, "max_load_failures").await;
}

#[tokio::test]
async fn a_version_whose_decisions_drift_stops_at_the_canary() {
    let behavior =
        Behavior { mixes: [(2, vec![("normal", 10), ("shutdown", 90)])].into(), ..Default::default() };
    bad_version_is_rolled_back_at_the_canary(behavior, "max_decision_drift").await;
}

#[tokio::test]
async fn an_offline_agent_catches_up_and_its_step_waits_for_it() {
    let (coord, _store, _dir) = Coordinator::embedded().await;
    let mut agents = start_agents(&coord, 3, &Behavior::default()).await;
    // edge-2 is known (it ran v1) but offline when the rollout reaches it.
    agents.pop().unwrap().disconnect().await;
    let client = coord.rollouts().await;
    let created = client
        .clone()
        .create_rollout(request(vec![step(1, 0, 200), step(0, 100, 200)]))
        .await
        .unwrap()
        .into_inner();

    // Step 1 activates edge-1 at once; edge-2 is pending, and the step waits for it.
    let waiting = wait_for(&client, &created.id, PROMPT, "step 1 to wait for edge-2", |r| {
        r.current_step == 1 && r.steps[1].pending_agent_ids == ["edge-2"]
    })
    .await;
    assert_eq!(waiting.steps[1].state, pb::StepState::Activating as i32);
    eventually(PROMPT, "edge-1 to run v2", || async {
        running(&coord).await.iter().any(|(a, v)| a == "edge-1" && *v == 2)
    })
    .await;
    // Absence of progress can only be shown by waiting: ten ticks.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = get(&client, &created.id).await;
    assert_eq!(
        (still.state, still.steps[1].state),
        (pb::RolloutState::Running as i32, pb::StepState::Activating as i32)
    );

    // It comes back: its stored assignment reaches it first thing, and the rollout finishes.
    let back = SimAgent::start(&coord, "edge-2", 1, Behavior::default()).await;
    let done = wait_for(
        &client,
        &created.id,
        PROMPT,
        "the rollout to succeed",
        in_state(pb::RolloutState::Succeeded),
    )
    .await;
    assert_eq!(transitions(&done), full_run(2));
    let got: Vec<_> = back.assignments().into_iter().map(|a| a.assignment_id).collect();
    assert_eq!(got, [format!("{}.s1.activate:edge-2", done.id)]);
    all_run(&coord, 2, 3).await;
    coord.shutdown().await;
}

#[tokio::test]
async fn operators_pause_resume_and_roll_back_over_grpc() {
    let (coord, _store, _dir) = Coordinator::embedded().await;
    let agents = start_agents(&coord, 3, &Behavior::default()).await;
    let mut client = coord.rollouts().await;
    let action = |id: &str, reason: &str| pb::RolloutAction {
        id: id.into(),
        reason: reason.into(),
        ..Default::default()
    };

    // Refusals first: nothing matches, an unpublished version, the probe gate.
    let none = pb::CreateRolloutRequest { selector: "site=nowhere".into(), ..request(vec![step(0, 100, 0)]) };
    assert_eq!(client.create_rollout(none).await.unwrap_err().code(), Code::FailedPrecondition);
    let unpublished = pb::CreateRolloutRequest { target: Some(model(9)), ..request(vec![step(0, 100, 0)]) };
    assert_eq!(client.create_rollout(unpublished).await.unwrap_err().code(), Code::NotFound);
    let probe = pb::CreateRolloutRequest {
        gates: Some(pb::RolloutGates { min_probe_accuracy: 0.9, ..gates() }),
        ..request(vec![step(0, 100, 0)])
    };
    let err = client.create_rollout(probe).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("min_probe_accuracy"), "{err:?}");
    let unknown = pb::CreateRolloutRequest {
        agent_ids: vec!["edge-0".into(), "nobody".into()],
        selector: String::new(),
        ..request(vec![step(0, 100, 0)])
    };
    assert_eq!(client.create_rollout(unknown).await.unwrap_err().code(), Code::NotFound);

    // Created paused: nothing moves.
    let created = client
        .create_rollout(pb::CreateRolloutRequest {
            paused: true,
            ..request(vec![step(1, 0, 200), step(0, 100, 60_000)])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.state, pb::RolloutState::Paused as i32);
    let id = created.id.clone();
    let again = request(vec![step(0, 100, 0)]);
    let err = client.create_rollout(again).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "one active rollout per model: {err:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused = get(&client, &id).await;
    assert_eq!(paused.steps[0].state, pb::StepState::Pending as i32);
    assert!(agents.iter().all(|a| a.assignments().is_empty()));
    // Pausing a paused rollout changes nothing.
    let same = client.pause_rollout(action(&id, "still looking")).await.unwrap().into_inner();
    assert_eq!(same.history.len(), paused.history.len());

    // Resumed, it runs until the long soak of the last step; paused there, it stays.
    client.resume_rollout(action(&id, "looks fine")).await.unwrap();
    wait_for(&client, &id, PROMPT, "the last step to soak", |r| {
        r.current_step == 1 && r.steps[1].state == pb::StepState::Soaking as i32
    })
    .await;
    all_run(&coord, 2, 3).await;
    let p = client.pause_rollout(action(&id, "investigating")).await.unwrap().into_inner();
    assert_eq!(p.state, pb::RolloutState::Paused as i32);
    let r = client.resume_rollout(action(&id, "")).await.unwrap().into_inner();
    assert_eq!(r.state, pb::RolloutState::Running as i32);

    // Rolled back by hand: every updated agent returns to v1.
    let aborted = client.rollback_rollout(action(&id, "operator says no")).await.unwrap().into_inner();
    assert_eq!(aborted.state, pb::RolloutState::Aborted as i32);
    let done = wait_for(&client, &id, PROMPT, "the rollback assignments", |r| {
        r.history.iter().any(|e| e.message.starts_with("rolled back 3 agents"))
    })
    .await;
    all_run(&coord, 1, 3).await;
    for agent in &agents {
        let last = agent.assignments().last().cloned().unwrap();
        assert_eq!((last.target, last.rollback), (Some(model(1)), true), "{}", agent.id);
    }
    let messages: Vec<_> = done.history.iter().map(|e| e.message.as_str()).collect();
    for expected in [
        "paused: investigating",
        "resumed: looks fine",
        "resumed",
        "rollback requested by an operator: operator says no",
    ] {
        assert!(messages.contains(&expected), "{expected:?} missing from {messages:?}");
    }
    assert!(done.history.iter().all(|e| e.coordinator == "api" || e.coordinator == "coord-a"));

    // Finished rollouts refuse further actions; unknown ids are not found.
    for err in [
        client.resume_rollout(action(&id, "")).await.unwrap_err(),
        client.pause_rollout(action(&id, "")).await.unwrap_err(),
        client.rollback_rollout(action(&id, "")).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }
    let err = client.get_rollout(pb::GetRolloutRequest { id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A new rollout of the model is allowed again; the list shows both, newest first.
    let second = client.create_rollout(request(vec![step(0, 100, 0)])).await.unwrap().into_inner();
    let listed =
        client.list_rollouts(pb::ListRolloutsRequest { model: "smol".into() }).await.unwrap().into_inner();
    let ids: Vec<_> = listed.rollouts.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, [second.id.clone(), id]);
    let other = client.list_rollouts(pb::ListRolloutsRequest { model: "other".into() }).await.unwrap();
    assert!(other.into_inner().rollouts.is_empty());
    coord.shutdown().await;
}

// ---- two coordinators on one etcd ----

/// A store whose connection can be cut at once, like the process holding it being killed:
/// every later call fails and open watches end, so its lease is never revoked and expires.
struct Killable {
    inner: Arc<dyn Store>,
    dead: CancellationToken,
}

impl Killable {
    fn check(&self) -> Result<(), Error> {
        if self.dead.is_cancelled() { Err(Error::StoreUnavailable("killed".into())) } else { Ok(()) }
    }
}

#[async_trait::async_trait]
impl Store for Killable {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<Revision, Error> {
        self.check()?;
        self.inner.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<bool, Error> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Listing, Error> {
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, Error> {
        self.check()?;
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream, Error> {
        self.check()?;
        let events = self.inner.watch(prefix, from_revision).await?;
        Ok(events.take_until(self.dead.clone().cancelled_owned()).boxed())
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, Error> {
        self.check()?;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, Error> {
        self.check()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), Error> {
        self.check()?;
        self.inner.revoke_lease(lease).await
    }
    async fn current_revision(&self) -> Result<Revision, Error> {
        self.check()?;
        self.inner.current_revision().await
    }
}

#[tokio::test]
async fn a_killed_leader_is_replaced_and_the_rollout_finishes_with_every_step_once() {
    let etcd = EtcdServer::start().await.unwrap();
    let prefix = "/rollouts-ha/";
    let store: Arc<dyn Store> = Arc::new(etcd.store(prefix).await.unwrap());
    let coord = Coordinator::start(store.clone()).await;
    // Two controllers, each on its own connection, as in two coordinator processes.
    let mut controllers = HashMap::new();
    for name in ["coord-a", "coord-b"] {
        let dead = CancellationToken::new();
        let own: Arc<dyn Store> =
            Arc::new(Killable { inner: Arc::new(etcd.store(prefix).await.unwrap()), dead: dead.clone() });
        let task = Controller::new(own, CONTROLLER, name).spawn(coord.stop.child_token());
        controllers.insert(name, (dead, task));
    }
    let _agents = start_agents(&coord, 4, &Behavior::default()).await;
    let client = coord.rollouts().await;
    let created = client
        .clone()
        .create_rollout(request(vec![step(1, 0, 600), step(0, 50, 1500), step(0, 100, 300)]))
        .await
        .unwrap()
        .into_inner();

    // Kill the leader while step 1 soaks.
    wait_for(&client, &created.id, PROMPT, "step 1 to soak", |r| {
        r.current_step == 1 && r.steps[1].state == pb::StepState::Soaking as i32
    })
    .await;
    let leader = Election::leader(store.as_ref(), ELECTION_KEY).await.unwrap().expect("a leader");
    let survivor = if leader == "coord-a" { "coord-b" } else { "coord-a" };
    let (dead, task) = controllers.remove(leader.as_str()).unwrap();
    dead.cancel();
    task.abort();
    let killed_at = tokio::time::Instant::now();
    // Killed, not resigned: the election key stays on its lease until that expires.
    assert_eq!(Election::leader(store.as_ref(), ELECTION_KEY).await.unwrap(), Some(leader.clone()));

    // The other takes over once the lease expires, and finishes the rollout.
    let done = wait_for(
        &client,
        &created.id,
        CONTROLLER.lease_ttl + Duration::from_secs(8),
        "the survivor to finish the rollout",
        in_state(pb::RolloutState::Succeeded),
    )
    .await;
    let took = killed_at.elapsed();
    assert_eq!(transitions(&done), full_run(3), "{:#?}", done.history);
    assert_eq!(Election::leader(store.as_ref(), ELECTION_KEY).await.unwrap().as_deref(), Some(survivor));
    let by = |e: &pb::RolloutEvent| e.coordinator.clone();
    let passed: Vec<_> = done.history.iter().filter(|e| e.message.ends_with("passed")).map(by).collect();
    assert_eq!(passed.len(), 3);
    assert_eq!(passed[0], leader, "the first leader passed step 0");
    assert_eq!(passed[1..], [survivor, survivor], "the survivor passed the rest");
    all_run(&coord, 2, 4).await;
    eprintln!("failover: rollout finished {took:?} after the leader was killed");
    coord.shutdown().await;
}
