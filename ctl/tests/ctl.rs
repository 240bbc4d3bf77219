//! `llmchainctl` end to end: an in-process coordinator (registry, fleet and rollouts on one
//! embedded store) with two published synthetic versions and one simulated agent session, driven
//! by the real binary with `-o json`; each answer is checked against what the API holds.

use std::{process::Output, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use llmchain_artifact::{
    SigningKey, TrustedKeys,
    testing::{synthetic_version, tiny_llama},
};
use llmchain_coordinator::{
    blobs::{LocalBlobStore, VerifiedBlobs},
    fleet::{self, Fleet, FleetConfig},
    registry::{self, Registry, RegistryApi, RegistryConfig},
    rollout::{self, Rollouts},
    server,
    store::{Store, embedded::EmbeddedStore},
};
use llmchain_proto::{
    model::UploadHeader,
    pb::{
        self, agent_message, coordinator_message, fleet_client::FleetClient, registry_client::RegistryClient,
        rollouts_client::RolloutsClient,
    },
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

const PROMPT: Duration = Duration::from_secs(5);

fn trainer_key() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

fn model(version: u64) -> pb::ModelRef {
    pb::ModelRef { model: "smol".into(), version }
}

/// Starts registry, fleet and rollouts on a fresh embedded store; returns its URL.
async fn start_coordinator(dir: &std::path::Path, stop: CancellationToken) -> (String, Arc<Registry>) {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("state.redb")).await.unwrap());
    let local = Arc::new(LocalBlobStore::open(&dir.join("blobs")).await.unwrap());
    let registry = Arc::new(Registry::new(
        RegistryConfig::new(TrustedKeys::new([trainer_key().public()])),
        store.clone(),
        Arc::new(VerifiedBlobs::new(local)),
    ));
    let fleet = Arc::new(Fleet::new(FleetConfig::default(), store.clone(), stop.child_token()));
    let rollouts = Arc::new(Rollouts::new(store, "api"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The coordinator's own server: health and reflection too, for `status`.
    let mut services = server::ServiceSet::default();
    services.add(registry::service(registry.clone()));
    services.add(fleet::service(fleet));
    services.add(rollout::service(rollouts));
    tokio::spawn(async move {
        server::serve(listener, services, server::Limits::default(), stop).await.unwrap();
    });
    (format!("http://{addr}"), registry)
}

async fn publish(registry: &Registry, version: u64) {
    let (manifest, blobs) = synthetic_version("smol", version, 0, &tiny_llama(1), |_| version);
    for (digest, bytes) in blobs {
        let header = UploadHeader { digest, total_size: bytes.len() as u64 };
        let chunks = futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed();
        registry.upload_blob(header, chunks).await.unwrap();
    }
    registry.publish(trainer_key().sign(&manifest)).await.unwrap();
}

/// Runs the real binary against `url`.
async fn ctl(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_llmchainctl"))
        .args(["--coordinator", url, "--timeout", "5", "--insecure"])
        .args(args)
        .env_remove("LLMCHAIN_COORDINATOR")
        .output()
        .await
        .unwrap()
}

/// Runs the binary with `-o json`, expects success, and parses its output.
async fn ctl_json(url: &str, args: &[&str]) -> Value {
    let out = ctl(url, &[&["-o", "json"], args].concat()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "llmchainctl {args:?} failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("llmchainctl {args:?}: not JSON ({e})"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_print_what_the_api_holds() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (url, registry) = start_coordinator(dir.path(), stop.clone()).await;
    publish(&registry, 1).await;
    publish(&registry, 2).await;

    // One agent on its session, running smol:1, with one summary stored.
    let mut fleet_client = FleetClient::connect(url.clone()).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    let hello = pb::Hello {
        agent_id: "edge-0".into(),
        labels: vec![pb::Label { key: "site".into(), value: "p7".into() }],
        status: Some(pb::AgentStatus {
            running: Some(model(1)),
            decisions_per_second: 2.5,
            ..Default::default()
        }),
        agent_version: "sim".into(),
    };
    tx.send(pb::AgentMessage { kind: Some(agent_message::Kind::Hello(hello)) }).await.unwrap();
    let mut inbound = fleet_client.session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let welcome = tokio::time::timeout(PROMPT, inbound.message()).await.unwrap().unwrap().unwrap();
    assert!(matches!(welcome.kind, Some(coordinator_message::Kind::Welcome(_))));
    let now = std::time::SystemTime::now();
    let summary = pb::Summary {
        agent_id: "edge-0".into(),
        seq: 1,
        window_start: Some((now - Duration::from_secs(60)).into()),
        window_end: Some(now.into()),
        model: Some(model(1)),
        label_counts: vec![pb::LabelCount { label: "normal".into(), count: 9 }],
        confidence_histogram: vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 8],
        latency_p99_ms: 41.0,
        records: 10,
        raw_bytes: 100_000,
        bad_records: 1,
        ..Default::default()
    };
    let req = pb::ReportSummariesRequest { agent_id: "edge-0".into(), summaries: vec![summary.clone()] };
    fleet_client.report_summaries(req).await.unwrap();

    // models and versions
    let mut reg = RegistryClient::connect(url.clone()).await.unwrap();
    let models = ctl_json(&url, &["models"]).await;
    assert_eq!(models, json!({ "models": [{ "model": "smol", "latest_version": 2, "version_count": 2 }] }));
    let versions = ctl_json(&url, &["versions", "smol"]).await;
    let api = reg.list_versions(pb::ListVersionsRequest { model: "smol".into() }).await.unwrap().into_inner();
    let got = versions["versions"].as_array().unwrap();
    assert_eq!(got.len(), api.versions.len());
    for (g, v) in got.iter().zip(&api.versions) {
        assert_eq!(g["version"], v.version);
        assert_eq!(g["parent_version"], v.parent_version);
        assert_eq!(g["mode"], v.mode.as_str());
        assert_eq!(g["total_bytes"], v.total_bytes);
        assert_eq!(g["delta_bytes"], v.delta_bytes);
        assert_eq!(g["key_id"], v.key_id.as_str());
        assert!(g["published_at"].as_str().unwrap().ends_with('Z'), "{g}");
    }

    // fleet, with and without a selector
    let fleet = ctl_json(&url, &["fleet"]).await;
    let agent = &fleet["agents"][0];
    assert_eq!(agent["agent_id"], "edge-0");
    assert_eq!(agent["labels"], json!([{ "key": "site", "value": "p7" }]));
    assert_eq!(agent["online"], true);
    assert_eq!(agent["status"]["running"], json!({ "model": "smol", "version": 1 }));
    assert_eq!(agent["status"]["decisions_per_second"], 2.5);
    let stats = fleet_client.get_fleet_stats(pb::GetFleetStatsRequest::default()).await.unwrap().into_inner();
    assert_eq!(fleet["stats"]["agents"], 1);
    assert_eq!(fleet["stats"]["online_agents"], 1);
    assert_eq!(fleet["stats"]["summaries"], 1);
    assert_eq!(fleet["stats"]["raw_bytes"], stats.raw_bytes);
    assert_eq!(fleet["stats"]["bytes_saved"], stats.bytes_saved);
    assert_eq!(agent["bytes_saved"], stats.bytes_saved);
    let none = ctl_json(&url, &["fleet", "--selector", "site=elsewhere"]).await;
    assert_eq!(none["agents"], json!([]));

    // assign reaches the agent on its session
    let assigned =
        ctl_json(&url, &["assign", "--version", "smol:2", "--agent", "edge-0", "--prefetch"]).await;
    assert_eq!(assigned, json!({ "agent_ids": ["edge-0"] }));
    let msg = tokio::time::timeout(PROMPT, inbound.message()).await.unwrap().unwrap().unwrap();
    let Some(coordinator_message::Kind::Assignment(a)) = msg.kind else { panic!("{msg:?}") };
    assert_eq!((a.target, a.activate, a.rollback), (Some(model(2)), false, false));

    // rollouts: create maps every flag onto the spec; get and list show the stored rollout
    let created = ctl_json(
        &url,
        &[
            "rollout",
            "create",
            "--version",
            "smol:2",
            "--selector",
            "site=p7",
            "--steps",
            "1,100%",
            "--soak",
            "1500ms",
            "--max-bad-record-rate",
            "0.05",
            "--max-p99-ms",
            "250",
            "--max-drift",
            "0.2",
            "--max-load-failures",
            "1",
            "--paused",
        ],
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let spec = &created["spec"];
    assert_eq!(spec["target"], json!({ "model": "smol", "version": 2 }));
    assert_eq!(spec["selector"], "site=p7");
    assert_eq!(
        spec["steps"],
        json!([
            { "agents": 1, "percent": 0, "soak_seconds": 1, "soak_ms": 500 },
            { "agents": 0, "percent": 100, "soak_seconds": 1, "soak_ms": 500 },
        ])
    );
    assert_eq!(
        spec["gates"],
        json!({
            "max_load_failures": 1,
            "max_bad_record_rate": 0.05,
            "max_latency_p99_ms": 250.0,
            "max_decision_drift": 0.2,
            "min_probe_accuracy": 0.0,
            "min_decisions": 0,
        })
    );
    assert_eq!(spec["paused"], true);
    assert_eq!(created["state"], "ROLLOUT_STATE_PAUSED");
    let mut rollouts = RolloutsClient::connect(url.clone()).await.unwrap();
    let stored = rollouts.get_rollout(pb::GetRolloutRequest { id: id.clone() }).await.unwrap().into_inner();
    let got = ctl_json(&url, &["rollout", "get", &id]).await;
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["spec"], created["spec"]);
    assert_eq!(got["current_step"], stored.current_step);
    let steps = got["steps"].as_array().unwrap();
    assert_eq!(steps.len(), stored.steps.len());
    for (g, s) in steps.iter().zip(&stored.steps) {
        assert_eq!(g["index"], s.index);
        assert_eq!(g["state"], pb::StepState::try_from(s.state).unwrap().as_str_name());
        assert_eq!(g["agent_ids"], json!(s.agent_ids));
        assert_eq!(g["gates"].as_array().unwrap().len(), s.gates.len());
    }
    assert_eq!(got["history"].as_array().unwrap().len(), stored.history.len());
    let list = ctl_json(&url, &["rollout", "list"]).await;
    assert_eq!(list["rollouts"].as_array().unwrap().len(), 1);
    assert_eq!(list["rollouts"][0]["id"], id.as_str());
    let resumed = ctl_json(&url, &["rollout", "resume", &id, "--reason", "go"]).await;
    assert_eq!(resumed["state"], "ROLLOUT_STATE_RUNNING");
    // pause and rollback answer the rollout as stored afterwards
    let paused = ctl_json(&url, &["rollout", "pause", &id, "--reason", "hold"]).await;
    assert_eq!(paused["state"], "ROLLOUT_STATE_PAUSED");
    let rolled_back = ctl_json(&url, &["rollout", "rollback", &id, "--reason", "bad canary"]).await;
    let stored = rollouts.get_rollout(pb::GetRolloutRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(stored.state, pb::RolloutState::Aborted as i32);
    assert_eq!(rolled_back["state"], "ROLLOUT_STATE_ABORTED");
    let history = rolled_back["history"].as_array().unwrap();
    assert_eq!(history.len(), stored.history.len());
    for (g, e) in history.iter().zip(&stored.history) {
        assert_eq!(g["message"], e.message.as_str());
    }
    assert!(history.last().unwrap()["message"].as_str().unwrap().contains("bad canary"), "{rolled_back}");

    // summaries
    let sums = ctl_json(&url, &["summaries", "--agent", "edge-0", "--limit", "5"]).await;
    let s = &sums["summaries"][0];
    assert_eq!(sums["summaries"].as_array().unwrap().len(), 1);
    assert_eq!((s["agent_id"].clone(), s["seq"].clone()), (json!("edge-0"), json!(1)));
    assert_eq!(s["model"], json!({ "model": "smol", "version": 1 }));
    assert_eq!(s["label_counts"], json!([{ "label": "normal", "count": 9 }]));
    assert_eq!((s["records"].clone(), s["bad_records"].clone()), (json!(10), json!(1)));
    assert_eq!(s["latency_p99_ms"], 41.0);

    // summaries --follow: one JSON object per line, each a summary as stored
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmchainctl"))
        .args(["--coordinator", &url, "--timeout", "5", "--insecure", "-o", "json"])
        .args(["summaries", "--follow", "--agent", "edge-0"])
        .env_remove("LLMCHAIN_COORDINATOR")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    let mut seq = 1;
    // Summaries are reported until one shows: the watch starts when the command has connected.
    let line = loop {
        seq += 1;
        let summary = pb::Summary {
            seq,
            label_counts: vec![pb::LabelCount { label: "inspect".into(), count: seq }],
            records: seq,
            ..summary.clone()
        };
        let req = pb::ReportSummariesRequest { agent_id: "edge-0".into(), summaries: vec![summary] };
        fleet_client.report_summaries(req).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
            Ok(line) => break line.unwrap().expect("summaries --follow ended"),
            Err(_) => assert!(seq < 20, "summaries --follow printed nothing"),
        }
    };
    let followed: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    let followed_seq = followed["seq"].as_u64().unwrap();
    assert!((2..=seq).contains(&followed_seq), "{followed}");
    let stored = fleet_client
        .list_summaries(pb::ListSummariesRequest {
            agent_id: "edge-0".into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let stored =
        stored.summaries.iter().find(|s| s.seq == followed_seq).expect("the followed summary is stored");
    assert_eq!(followed["label_counts"], json!([{ "label": "inspect", "count": stored.records }]));
    assert_eq!(followed["records"], stored.records);
    assert_eq!(followed["model"], json!({ "model": "smol", "version": 1 }));
    drop(follow);

    // status lists every service the coordinator serves, each healthy
    let status = ctl_json(&url, &["status"]).await;
    let rows = status.as_array().unwrap_or_else(|| panic!("{status}"));
    for service in ["llmchain.v1.Registry", "llmchain.v1.Fleet", "llmchain.v1.Rollouts"] {
        assert!(rows.contains(&json!({ "service": service, "health": "SERVING" })), "{status}");
    }
    assert!(rows.iter().any(|r| r["service"] == "grpc.health.v1.Health"), "{status}");

    // tables render too
    for args in [&["fleet"][..], &["models"], &["rollout", "get", &id], &["summaries"]] {
        let out = ctl(&url, args).await;
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.stdout.is_empty());
    }

    // a coordinator error is exit code 1 with the server's message
    let out = ctl(&url, &["rollout", "get", "no-such-rollout"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));

    drop(tx);
    stop.cancel();
}

#[tokio::test]
async fn unreachable_coordinator_exits_2_with_a_clear_message() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let out = ctl(&url, &["models"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach the coordinator at {url}: ")), "{stderr}");
}
