//! The HTTP views over a real registry, fleet and rollouts on an embedded store.

use std::{sync::Arc, time::SystemTime};

use axum::body::Body;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use llmchain_artifact::{SigningKey, TrustedKeys, testing};
use llmchain_proto::{
    model::{BlobRange, Hello, RolloutSpec, SummaryReport},
    pb,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::*;
use crate::{
    blobs::{LocalBlobStore, VerifiedBlobs},
    fleet::{Fleet, FleetConfig, SessionStream},
    registry::{Registry, RegistryConfig},
    rollout::Rollouts,
    store::embedded::EmbeddedStore,
};

const MODEL: &str = "tiny";

struct Harness {
    _dir: tempfile::TempDir,
    state: HttpState,
    registry: Arc<Registry>,
    fleet: Arc<Fleet>,
    rollouts: Arc<Rollouts>,
    _stop: CancellationToken,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn crate::store::Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).await.unwrap());
    let blobs = Arc::new(VerifiedBlobs::new(Arc::new(
        LocalBlobStore::open(&dir.path().join("blobs")).await.unwrap(),
    )));
    let metrics = Arc::new(Metrics::new());
    let key = SigningKey::from_seed([7; 32]);
    let registry = Arc::new(
        Registry::new(RegistryConfig::new(TrustedKeys::new([key.public()])), store.clone(), blobs)
            .with_metrics(metrics.clone()),
    );
    let stop = CancellationToken::new();
    let fleet = Arc::new(
        Fleet::new(FleetConfig::default(), store.clone(), stop.clone()).with_metrics(metrics.clone()),
    );
    let rollouts = Arc::new(Rollouts::new(store, "test-coordinator").with_metrics(metrics.clone()));
    let state =
        HttpState { registry: registry.clone(), fleet: fleet.clone(), rollouts: rollouts.clone(), metrics };
    Harness { _dir: dir, state, registry, fleet, rollouts, _stop: stop }
}

/// Publishes version `version` (a child of `version - 1`) whose last layer differs.
async fn publish(registry: &Registry, version: u64) -> llmchain_artifact::Manifest {
    let arch = testing::tiny_llama(2);
    let (manifest, blobs) = testing::synthetic_version(MODEL, version, version - 1, &arch, |name| {
        if name.contains("layers.1.") { version } else { 1 }
    });
    for (digest, bytes) in blobs {
        let size = bytes.len() as u64;
        let chunks = futures::stream::iter([Ok(Bytes::from(bytes))]).boxed();
        registry.blobs().put(digest, size, chunks).await.unwrap();
    }
    registry.publish(SigningKey::from_seed([7; 32]).sign(&manifest)).await.unwrap();
    manifest
}

async fn get(state: &HttpState, path: &str) -> (StatusCode, String) {
    let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
    let response = router(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 16 << 20).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn json(state: &HttpState, path: &str) -> Value {
    let (status, body) = get(state, path).await;
    assert_eq!(status, StatusCode::OK, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path} is not JSON ({e}): {body}"))
}

/// The value of the sample `series` (name and labels as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn open_session(fleet: &Fleet, agent: &str, running: u64) -> SessionStream {
    let hello = Hello::try_from(pb::Hello {
        agent_id: agent.into(),
        labels: vec![pb::Label { key: "site".into(), value: "lab".into() }],
        status: Some(pb::AgentStatus {
            running: Some(pb::ModelRef { model: MODEL.into(), version: running }),
            decisions_per_second: 2.5,
            ..Default::default()
        }),
        agent_version: "0.1.0".into(),
    })
    .unwrap();
    let mut stream = fleet.session(hello, futures::stream::pending().boxed()).await.unwrap();
    assert!(stream.next().await.unwrap().is_ok(), "welcome");
    stream
}

fn summary(agent: &str, seq: u64, version: u64, normal: u64, shutdown: u64) -> pb::Summary {
    let end = SystemTime::now();
    pb::Summary {
        agent_id: agent.into(),
        seq,
        window_start: Some((end - std::time::Duration::from_secs(10)).into()),
        window_end: Some(end.into()),
        model: Some(pb::ModelRef { model: MODEL.into(), version }),
        label_counts: vec![
            pb::LabelCount { label: "normal".into(), count: normal },
            pb::LabelCount { label: "shutdown".into(), count: shutdown },
        ],
        confidence_histogram: vec![0; 10],
        records: normal + shutdown + 1,
        raw_bytes: 10_000 * seq,
        bad_records: 1,
        ..Default::default()
    }
}

async fn report(fleet: &Fleet, summaries: Vec<pb::Summary>) {
    let agent_id = summaries[0].agent_id.clone();
    let report = SummaryReport::try_from(pb::ReportSummariesRequest { agent_id, summaries }).unwrap();
    fleet.report_summaries(report).await.unwrap();
}

#[tokio::test]
async fn empty_coordinator_serves_empty_views_and_the_page() {
    let h = harness().await;
    let fleet = json(&h.state, "/api/fleet").await;
    assert_eq!(fleet["agents"], serde_json::json!([]));
    assert_eq!(fleet["totals"]["online"], 0);
    assert_eq!(json(&h.state, "/api/models").await, serde_json::json!([]));
    assert_eq!(json(&h.state, "/api/rollouts").await, serde_json::json!([]));
    assert_eq!(json(&h.state, "/api/decisions").await["points"], serde_json::json!([]));
    let (status, page) = get(&h.state, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<title>LLMChain coordinator</title>") && page.contains("/api/fleet"));
    assert_eq!(get(&h.state, "/healthz").await, (StatusCode::OK, "ok\n".to_string()));
    assert_eq!(get(&h.state, "/api/nothing").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn views_and_metrics_follow_the_fleet() {
    let h = harness().await;
    let v1 = publish(&h.registry, 1).await;
    let v2 = publish(&h.registry, 2).await;
    let _edge1 = open_session(&h.fleet, "edge-1", 1).await;
    let edge2 = open_session(&h.fleet, "edge-2", 2).await;
    report(&h.fleet, vec![summary("edge-1", 1, 1, 40, 2), summary("edge-1", 2, 1, 30, 1)]).await;
    report(&h.fleet, vec![summary("edge-2", 1, 2, 10, 5)]).await;
    // A retried report is stored once.
    report(&h.fleet, vec![summary("edge-2", 1, 2, 10, 5)]).await;

    let fleet = json(&h.state, "/api/fleet").await;
    let agents = fleet["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 2);
    assert_eq!(
        (agents[0]["agent_id"].as_str(), agents[0]["running_version"].as_u64()),
        (Some("edge-1"), Some(1))
    );
    assert_eq!(agents[0]["online"], true);
    assert_eq!(agents[0]["labels"]["site"], "lab");
    assert_eq!(agents[0]["summaries"], 2);
    assert_eq!(agents[1]["running_model"], MODEL);
    let totals = &fleet["totals"];
    assert_eq!((totals["agents"].as_u64(), totals["online"].as_u64()), (Some(2), Some(2)));
    assert_eq!(totals["summaries"], 3);
    assert_eq!(totals["decisions"]["normal"], 80);
    assert_eq!(totals["decisions"]["shutdown"], 8);
    assert_eq!(totals["bad_records"], 3);
    let saved = totals["raw_bytes"].as_u64().unwrap() - totals["summary_bytes"].as_u64().unwrap();
    assert_eq!(totals["bytes_saved"].as_u64(), Some(saved));

    let models = json(&h.state, "/api/models").await;
    let versions = models[0]["versions"].as_array().unwrap();
    assert_eq!((models[0]["model"].as_str(), models[0]["latest_version"].as_u64()), (Some(MODEL), Some(2)));
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["total_bytes"].as_u64(), Some(v1.total_bytes()));
    assert_eq!(versions[0]["delta_bytes"].as_u64(), Some(v1.total_bytes()), "a root version is all delta");
    let changed: u64 = v2
        .tensors
        .iter()
        .filter(|t| v1.tensor(&t.name).map(|o| o.digest) != Some(t.digest))
        .map(|t| t.size)
        .sum();
    assert!(changed > 0 && changed < v2.total_bytes());
    assert_eq!(versions[1]["delta_bytes"].as_u64(), Some(changed));
    assert_eq!(versions[1]["agents_running"], 1);
    assert_eq!(versions[1]["decisions"]["shutdown"], 5);
    assert_eq!(versions[0]["records"], 40 + 2 + 1 + 30 + 1 + 1);
    assert!(versions[1]["metrics"]["accuracy"].as_f64().is_some());

    let decisions = json(&h.state, "/api/decisions").await;
    assert_eq!(decisions["labels"], serde_json::json!(["normal", "shutdown"]));
    let sum = |label: &str| -> u64 {
        decisions["points"].as_array().unwrap().iter().map(|p| p["counts"][label].as_u64().unwrap_or(0)).sum()
    };
    assert_eq!((sum("normal"), sum("shutdown")), (80, 8));

    let spec = RolloutSpec::try_from(pb::CreateRolloutRequest {
        target: Some(pb::ModelRef { model: MODEL.into(), version: 2 }),
        agent_ids: vec!["edge-1".into(), "edge-2".into()],
        steps: vec![
            pb::RolloutStep { agents: 1, percent: 0, soak_seconds: 0, soak_ms: 100 },
            pb::RolloutStep { agents: 0, percent: 100, soak_seconds: 0, soak_ms: 100 },
        ],
        paused: true,
        ..Default::default()
    })
    .unwrap();
    let created = h.rollouts.create(spec).await.unwrap();
    let rollouts = json(&h.state, "/api/rollouts").await;
    assert_eq!(rollouts[0]["id"], created.id.as_str());
    assert_eq!(rollouts[0]["state"], "paused");
    assert_eq!(rollouts[0]["steps"].as_array().unwrap().len(), 2);
    assert_eq!(rollouts[0]["steps"][0]["agent_ids"], serde_json::json!(["edge-1"]));

    // A FetchBlob that is read to the end counts every byte it sent.
    let tensor = &v2.tensors[0];
    let fetch = h
        .registry
        .fetch_blob(
            BlobRange::try_from(pb::FetchBlobRequest {
                digest: tensor.digest.to_string(),
                offset: 0,
                length: 0,
                chunk_size: 0,
            })
            .unwrap(),
        )
        .await
        .unwrap();
    let fetched: Vec<_> = fetch.chunks.try_collect().await.unwrap();
    assert_eq!(fetched.iter().map(|c| c.data.len() as u64).sum::<u64>(), tensor.size);

    drop(edge2);
    let (status, text) = get(&h.state, "/metrics").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let value = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    assert_eq!(value("llmchain_fetch_blob_bytes_total"), tensor.size as f64);
    assert_eq!(value("llmchain_fetch_blob_requests_total"), 1.0);
    assert_eq!(value(&format!("llmchain_versions_published_total{{model=\"{MODEL}\"}}")), 2.0);
    assert_eq!(value("llmchain_summaries_ingested_total{outcome=\"stored\"}"), 3.0);
    assert_eq!(value("llmchain_summaries_ingested_total{outcome=\"duplicate\"}"), 1.0);
    assert_eq!(
        value(&format!("llmchain_decisions_ingested_total{{model=\"{MODEL}\",label=\"normal\"}}")),
        80.0
    );
    assert_eq!(value(&format!("llmchain_bad_records_ingested_total{{model=\"{MODEL}\"}}")), 3.0);
    assert_eq!(value("llmchain_agent_sessions_opened_total"), 2.0);
    assert_eq!(value("llmchain_rollout_actions_total{action=\"create\"}"), 1.0);
    assert_eq!(value(&format!("llmchain_model_versions{{model=\"{MODEL}\"}}")), 2.0);
    assert_eq!(value(&format!("llmchain_model_latest_version{{model=\"{MODEL}\"}}")), 2.0);
    assert_eq!(
        value(&format!("llmchain_model_version_bytes{{model=\"{MODEL}\",version=\"2\",kind=\"delta\"}}")),
        changed as f64
    );
    assert_eq!(
        value(&format!(
            "llmchain_rollout_state{{rollout=\"{}\",model=\"{MODEL}\",version=\"2\",state=\"paused\"}}",
            created.id
        )),
        1.0
    );
    assert_eq!(
        value(&format!("llmchain_fleet_decisions{{model=\"{MODEL}\",version=\"1\",label=\"normal\"}}")),
        70.0
    );
    assert_eq!(value("llmchain_fleet_bytes_saved"), saved as f64);
    // edge-2's session ended when its stream was dropped; its lease is revoked with it. The
    // session task revokes the lease and counts the end one after the other, so wait for both.
    let ended = |text: &str| {
        (
            sample(text, "llmchain_agents{state=\"online\"}"),
            sample(text, "llmchain_agents{state=\"offline\"}"),
            sample(text, "llmchain_agent_sessions_ended_total{outcome=\"closed\"}"),
        )
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, text) = get(&h.state, "/metrics").await;
        let seen = ended(&text);
        if seen == (Some(1.0), Some(1.0), Some(1.0)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "edge-2's session never ended: (online, offline, closed) = {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
