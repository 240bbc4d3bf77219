//! Update integrity against a compromised coordinator (issue 8, part 3).
//!
//! The real `edge-agent run` binary talks to an in-process *hostile* coordinator: a tonic
//! server implementing Fleet and Registry that serves whatever the test tells it to — genuine
//! signed versions, or manifests and blobs altered after signing, versions relabelled, expiries
//! stretched, rollbacks unsigned or signed by the wrong key, forged trust documents. It holds no
//! private key the agent trusts, exactly like a coordinator an attacker took over. In every case
//! the agent must refuse and keep running (and deciding with) the version it had; genuine
//! versions and a root-signed key rotation must still get through.

use std::{
    collections::HashMap,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use llmchain_artifact::{Manifest, ModelRef, RollbackStatement, SigningKey, TrainingMetadata, TrustDocument};
use llmchain_cloud_trainer::{
    publish,
    version::{self, VersionBuild},
};
use llmchain_model::SaveDtype;
use llmchain_proto::{
    model::ModelName,
    pb::{
        self,
        fleet_server::{Fleet, FleetServer},
        registry_server::{Registry, RegistryServer},
    },
};
use llmchain_tests::{
    eventually,
    fleet::{TrainerKey, smollm2_tokenizer, spawn_agent, tiny_model},
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

const MODEL: &str = "tiny-guarded";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What the hostile coordinator serves and what it saw.
#[derive(Default)]
struct State {
    /// Signed manifests by version, served as they are (the test puts altered ones here).
    manifests: HashMap<u64, pb::SignedManifest>,
    /// Blob bytes by digest.
    blobs: HashMap<String, Vec<u8>>,
    /// A blob served with one byte flipped.
    corrupt_blob: Option<String>,
    /// The trust document served by GetTrustDocument.
    trust: Option<pb::SignedStatement>,
    /// The session's outbound queue, while an agent is connected.
    session: Option<mpsc::Sender<Result<pb::CoordinatorMessage, Status>>>,
    /// The agent's last reported running version.
    running: Option<pb::ModelRef>,
}

#[derive(Clone)]
struct Hostile {
    state: Arc<Mutex<State>>,
    results: mpsc::UnboundedSender<pb::AssignmentResult>,
}

impl Hostile {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not served by the test double"))
}

#[tonic::async_trait]
impl Registry for Hostile {
    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        unimplemented()
    }
    async fn list_versions(
        &self,
        _: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        unimplemented()
    }
    async fn get_manifest(
        &self,
        request: Request<pb::GetManifestRequest>,
    ) -> Result<Response<pb::GetManifestResponse>, Status> {
        let version = request.into_inner().version;
        let signed = self.state().manifests.get(&version).cloned();
        let signed = signed.ok_or_else(|| Status::not_found(format!("version {version}")))?;
        Ok(Response::new(pb::GetManifestResponse { signed: Some(signed), manifest: None }))
    }
    async fn missing_blobs(
        &self,
        _: Request<pb::MissingBlobsRequest>,
    ) -> Result<Response<pb::MissingBlobsResponse>, Status> {
        unimplemented()
    }
    async fn plan_delta(
        &self,
        _: Request<pb::PlanDeltaRequest>,
    ) -> Result<Response<pb::PlanDeltaResponse>, Status> {
        unimplemented()
    }
    async fn upload_blob(
        &self,
        _: Request<Streaming<pb::UploadBlobRequest>>,
    ) -> Result<Response<pb::UploadBlobResponse>, Status> {
        unimplemented()
    }
    async fn publish_version(
        &self,
        _: Request<pb::PublishVersionRequest>,
    ) -> Result<Response<pb::PublishVersionResponse>, Status> {
        unimplemented()
    }

    type FetchBlobStream = BoxStream<pb::FetchBlobResponse>;

    async fn fetch_blob(
        &self,
        request: Request<pb::FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        let r = request.into_inner();
        let (mut bytes, corrupt) = {
            let state = self.state();
            let bytes =
                state.blobs.get(&r.digest).cloned().ok_or_else(|| Status::not_found(r.digest.clone()))?;
            (bytes, state.corrupt_blob.as_deref() == Some(r.digest.as_str()))
        };
        if corrupt {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x40;
        }
        let total_size = bytes.len() as u64;
        let start = (r.offset as usize).min(bytes.len());
        let chunk = if r.chunk_size == 0 { 1 << 20 } else { r.chunk_size as usize };
        let chunks: Vec<_> = bytes[start..]
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                Ok(pb::FetchBlobResponse {
                    offset: (start + i * chunk) as u64,
                    data: c.to_vec().into(),
                    total_size,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn publish_trust_document(
        &self,
        _: Request<pb::PublishTrustDocumentRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        unimplemented()
    }
    async fn get_trust_document(
        &self,
        _: Request<pb::GetTrustDocumentRequest>,
    ) -> Result<Response<pb::GetTrustDocumentResponse>, Status> {
        Ok(Response::new(pb::GetTrustDocumentResponse { document: self.state().trust.clone() }))
    }
}

#[tonic::async_trait]
impl Fleet for Hostile {
    async fn enroll(&self, _: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        unimplemented()
    }

    type SessionStream = BoxStream<pb::CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let welcome =
            pb::Welcome { session_id: "hostile".into(), heartbeat_interval_ms: 200, lease_ttl_ms: 2000 };
        tx.send(Ok(pb::CoordinatorMessage { kind: Some(pb::coordinator_message::Kind::Welcome(welcome)) }))
            .await
            .unwrap();
        self.state().session = Some(tx);
        let me = self.clone();
        tokio::spawn(async move {
            use pb::agent_message::Kind;
            while let Some(Ok(msg)) = inbound.next().await {
                match msg.kind {
                    Some(Kind::Hello(h)) => me.state().running = h.status.and_then(|s| s.running),
                    Some(Kind::Heartbeat(h)) => me.state().running = h.status.and_then(|s| s.running),
                    Some(Kind::Result(r)) => {
                        let _ = me.results.send(r);
                    }
                    None => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_summaries(
        &self,
        request: Request<pb::ReportSummariesRequest>,
    ) -> Result<Response<pb::ReportSummariesResponse>, Status> {
        let acked = request.into_inner().summaries.iter().map(|s| s.seq).collect();
        Ok(Response::new(pb::ReportSummariesResponse { acked }))
    }
    async fn list_agents(
        &self,
        _: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        unimplemented()
    }
    async fn list_summaries(
        &self,
        _: Request<pb::ListSummariesRequest>,
    ) -> Result<Response<pb::ListSummariesResponse>, Status> {
        unimplemented()
    }

    type WatchSummariesStream = BoxStream<pb::Summary>;

    async fn watch_summaries(
        &self,
        _: Request<pb::ListSummariesRequest>,
    ) -> Result<Response<Self::WatchSummariesStream>, Status> {
        unimplemented()
    }
    async fn create_bootstrap_token(
        &self,
        _: Request<pb::CreateBootstrapTokenRequest>,
    ) -> Result<Response<pb::CreateBootstrapTokenResponse>, Status> {
        unimplemented()
    }
    async fn revoke_agent(&self, _: Request<pb::RevokeAgentRequest>) -> Result<Response<pb::Empty>, Status> {
        unimplemented()
    }
    async fn assign(&self, _: Request<pb::AssignRequest>) -> Result<Response<pb::AssignResponse>, Status> {
        unimplemented()
    }
    async fn get_fleet_stats(
        &self,
        _: Request<pb::GetFleetStatsRequest>,
    ) -> Result<Response<pb::FleetStats>, Status> {
        unimplemented()
    }
}

/// The hostile coordinator and the test's handles on it.
struct Harness {
    double: Hostile,
    results: mpsc::UnboundedReceiver<pb::AssignmentResult>,
    url: String,
    next_id: u32,
}

impl Harness {
    async fn start() -> Harness {
        let (results_tx, results) = mpsc::unbounded_channel();
        let double = Hostile { state: Arc::default(), results: results_tx };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(FleetServer::new(double.clone()))
            .add_service(RegistryServer::new(double.clone()).max_decoding_message_size(64 << 20));
        tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        Harness { double, results, url, next_id: 0 }
    }

    /// Serves `build`'s blobs and its manifest as `key` signed it, under its own version.
    fn serve(&self, build: &VersionBuild, signed: &pb::SignedManifest) {
        let mut state = self.double.state();
        for (digest, bytes) in &build.blobs {
            state.blobs.insert(digest.to_string(), bytes.clone());
        }
        state.manifests.insert(build.manifest.id.version, signed.clone());
    }

    /// Sends an assignment and waits for the agent's answer to it.
    async fn assign(&mut self, version: u64, rollback: Option<pb::SignedStatement>) -> pb::AssignmentResult {
        self.next_id += 1;
        let assignment = pb::Assignment {
            assignment_id: format!("a{}", self.next_id),
            target: Some(pb::ModelRef { model: MODEL.into(), version }),
            activate: true,
            rollback: rollback.is_some(),
            rollback_statement: rollback,
            ..Default::default()
        };
        let id = assignment.assignment_id.clone();
        let session = eventually(Duration::from_secs(30), || async { self.double.state().session.clone() })
            .await
            .expect("the agent opens a session");
        let msg =
            pb::CoordinatorMessage { kind: Some(pb::coordinator_message::Kind::Assignment(assignment)) };
        session.send(Ok(msg)).await.expect("session open");
        loop {
            let r = tokio::time::timeout(Duration::from_secs(60), self.results.recv())
                .await
                .expect("the agent answers the assignment in time")
                .expect("results channel open");
            if r.assignment_id == id {
                return r;
            }
        }
    }
}

fn outcome(r: &pb::AssignmentResult) -> pb::AssignmentOutcome {
    pb::AssignmentOutcome::try_from(r.outcome).unwrap()
}

/// Asserts the agent refused (`outcome`) with a message containing `why`, and still runs v`running`.
fn refused(r: &pb::AssignmentResult, expected: pb::AssignmentOutcome, why: &str, running: u64) {
    assert_eq!(outcome(r), expected, "{r:?}");
    assert!(r.message.contains(why), "expected {why:?} in {:?}", r.message);
    assert_eq!(r.running.as_ref().map(|m| m.version), Some(running), "{r:?}");
}

fn build(version: u64, seed: i64, changed: &[&str]) -> VersionBuild {
    let id = ModelRef { model: ModelName::parse("model", MODEL).unwrap(), version };
    let training = TrainingMetadata {
        mode: "import".into(),
        dataset_digest: None,
        metrics: Vec::new(),
        records: 0,
        note: "tiny test model".into(),
    };
    let model = tiny_model(seed, changed);
    version::build(&model, smollm2_tokenizer(), id, version - 1, SaveDtype::F32, training).expect("build")
}

fn sign(key: &SigningKey, manifest: &Manifest) -> pb::SignedManifest {
    let s = key.sign(manifest);
    pb::SignedManifest { manifest: s.manifest, signature: s.signature.to_vec(), key_id: s.key_id }
}

/// `signed` with its manifest decoded, changed by `f`, and re-encoded; the signature kept.
fn altered(signed: &pb::SignedManifest, f: impl FnOnce(&mut pb::Manifest)) -> pb::SignedManifest {
    let mut m = pb::Manifest::decode(signed.manifest.as_slice()).unwrap();
    f(&mut m);
    pb::SignedManifest { manifest: m.encode_to_vec(), ..signed.clone() }
}

fn decisions_by(path: &Path, version: u64) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter(|l| l.contains(&format!("{MODEL}@v{version}\""))).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_coordinator_cannot_make_the_agent_load_altered_or_unauthorised_versions() {
    use pb::AssignmentOutcome::{Activated, FetchFailed, Refused};
    let dir = tempfile::tempdir().unwrap();
    let old = TrainerKey::generate(dir.path(), "trainer-old");
    let new = TrainerKey::generate(dir.path(), "trainer-new");
    let rogue = SigningKey::generate().unwrap();
    let root = SigningKey::generate().unwrap();
    let root_pub = dir.path().join("root.pub");
    root.public().save(&root_pub).unwrap();
    let mut h = Harness::start().await;

    let ttl = Duration::from_secs(3600);
    let v1 = build(1, 11, &[]);
    let v2 = build(2, 11, &["layers.1.mlp.down_proj"]);
    // The trainer's signing path sets the expiry (`--manifest-ttl`) inside the signed bytes.
    let wire = |s: llmchain_artifact::SignedManifest| pb::SignedManifest {
        manifest: s.manifest,
        signature: s.signature.to_vec(),
        key_id: s.key_id,
    };
    let (s1, s2) = (
        wire(publish::sign_with_expiry(&old.key, &v1.manifest, ttl)),
        wire(publish::sign_with_expiry(&old.key, &v2.manifest, ttl)),
    );
    let keys = llmchain_artifact::TrustedKeys::new([old.key.public()]);
    let m1 = keys.verify(&s1.clone().try_into().unwrap()).unwrap();
    let m2 = keys.verify(&s2.clone().try_into().unwrap()).unwrap();
    assert_eq!(m1.expires_at, Some(v1.manifest.created_at + ttl));
    h.serve(&v1, &s1);

    let decisions = dir.path().join("decisions.jsonl");
    let executor = format!("jsonl:{}", decisions.display());
    let root_arg = root_pub.to_str().unwrap();
    let _agent = spawn_agent(
        dir.path(),
        "edge-guarded",
        &h.url,
        &old.public,
        &[
            "--root-key",
            root_arg,
            "--source",
            "sim:rate=20",
            "--executor",
            &executor,
            "--batch-wait-ms",
            "10",
        ],
    );
    let r = h.assign(1, None).await;
    assert_eq!(outcome(&r), Activated, "{r:?}");

    // 1. Manifest bytes altered after signing: a tensor now points at another blob.
    let changed = v2.manifest.tensors.iter().find(|t| m1.tensor(&t.name).map(|o| o.digest) != Some(t.digest));
    let changed = changed.expect("v2 changes a tensor").name.clone();
    let old_digest = m1.tensor(&changed).unwrap().digest.to_string();
    h.serve(
        &v2,
        &altered(&s2, |m| {
            m.tensors.iter_mut().filter(|t| t.name == changed).for_each(|t| t.digest = old_digest.clone())
        }),
    );
    refused(&h.assign(2, None).await, Refused, "does not verify", 1);

    // 2. A blob altered: the genuine manifest, one tensor's bytes flipped in transit.
    h.serve(&v2, &s2);
    let v2_digest = m2.tensor(&changed).unwrap().digest.to_string();
    h.double.state().corrupt_blob = Some(v2_digest.clone());
    refused(&h.assign(2, None).await, FetchFailed, "corrupt", 1);
    h.double.state().corrupt_blob = None;

    // 3. The version number: v2's genuine manifest served as v7, and v2 relabelled v7.
    h.double.state().manifests.insert(7, s2.clone());
    refused(&h.assign(7, None).await, Refused, "signed manifest is for", 1);
    h.double.state().manifests.insert(7, altered(&s2, |m| m.id.as_mut().unwrap().version = 7));
    refused(&h.assign(7, None).await, Refused, "does not verify", 1);

    // 4. The expiry: a genuinely expired manifest, and the same with its expiry pushed back.
    let mut m8 = build(8, 11, &[]).manifest;
    m8.expires_at = Some(SystemTime::now() - Duration::from_secs(60));
    let s8 = sign(&old.key, &m8);
    h.double.state().manifests.insert(8, s8.clone());
    refused(&h.assign(8, None).await, Refused, "expired", 1);
    let later: prost_types::Timestamp = (SystemTime::now() + Duration::from_secs(86_400)).into();
    h.double.state().manifests.insert(8, altered(&s8, |m| m.expires_at = Some(later)));
    refused(&h.assign(8, None).await, Refused, "does not verify", 1);
    // v1 decided while those versions were refused (the agent's pipeline writes its decisions
    // on its own schedule, so wait for the first).
    let v1_decisions = eventually(Duration::from_secs(20), || async {
        let n = decisions_by(&decisions, 1);
        (n > 0).then_some(n)
    })
    .await
    .unwrap_or(0);

    // The genuine v2 still loads: the refusals above were not the agent refusing everything.
    let r = h.assign(2, None).await;
    assert_eq!(outcome(&r), Activated, "{r:?}");

    // 5. A downgrade the coordinator makes up: no statement, one signed by a key the agent does
    // not trust, one for another version; then the trainer's own statement.
    let target1 = m1.id.clone();
    let statement = |key: &SigningKey, target: &ModelRef| -> pb::SignedStatement {
        RollbackStatement { target: target.clone(), expires_at: SystemTime::now() + ttl }.sign(key).into()
    };
    let unsigned = pb::SignedStatement {
        payload: RollbackStatement { target: target1.clone(), expires_at: SystemTime::now() + ttl }
            .canonical_bytes(),
        signature: vec![0; 64],
        key_id: old.key.public().key_id(),
    };
    refused(&h.assign(1, Some(unsigned)).await, Refused, "rollback statement is refused", 2);
    refused(&h.assign(1, Some(statement(&rogue, &target1))).await, Refused, "not trusted", 2);
    refused(&h.assign(1, Some(statement(&old.key, &m2.id))).await, Refused, "not tiny-guarded@v1", 2);
    let r = h.assign(1, Some(statement(&old.key, &target1))).await;
    assert_eq!(outcome(&r), Activated, "a trainer-signed rollback goes through: {r:?}");

    // 6. Key rotation. v3 is signed by the new trainer key, which the agent does not trust yet.
    let v3 = build(3, 12, &[]);
    let mut m3 = v3.manifest.clone();
    m3.expires_at = Some(SystemTime::now() + ttl);
    h.serve(&v3, &sign(&new.key, &m3));
    let rotation = |version, signer: &SigningKey| -> pb::SignedStatement {
        TrustDocument {
            version,
            trainer_keys: vec![new.key.public()],
            revoked_key_ids: [old.key.public().key_id()].into(),
            issued_at: SystemTime::now(),
        }
        .sign(signer)
        .into()
    };
    // A rotation "signed" by the coordinator's own key is not one.
    h.double.state().trust = Some(rotation(1, &rogue));
    refused(&h.assign(3, None).await, Refused, "not a trusted key", 1);
    // The root-signed rotation: the new key's version loads, the old key's are refused.
    h.double.state().trust = Some(rotation(1, &root));
    let r = h.assign(3, None).await;
    assert_eq!(outcome(&r), Activated, "after the rotation the new key's version loads: {r:?}");
    let v4 = build(4, 13, &[]);
    let mut m4 = v4.manifest.clone();
    m4.expires_at = Some(SystemTime::now() + ttl);
    h.serve(&v4, &sign(&old.key, &m4));
    refused(&h.assign(4, None).await, Refused, "revoked", 3);
    // v2 was fetched and verified before the rotation, and its blobs are cached: even a
    // rollback to it that the new key signed is refused now, its manifest's key is revoked.
    refused(&h.assign(2, Some(statement(&new.key, &m2.id))).await, Refused, "revoked", 3);
    assert!(dir.path().join("edge-guarded/state/trust-document.pb").is_file(), "the rotation is kept");

    // Decisions went on all along with v1 while the tampered versions were refused, then v3.
    assert!(v1_decisions > 0, "v1 kept deciding");
    let v3_decisions = eventually(Duration::from_secs(20), || async {
        let n = decisions_by(&decisions, 3);
        (n > 0).then_some(n)
    })
    .await;
    assert!(v3_decisions.is_some(), "v3 decides after the rotation");
    // The agent reports what it runs in its next heartbeat (every 200 ms here), which can
    // arrive after its first v3 decisions are written.
    let running = || h.double.state().running.as_ref().map(|m| m.version);
    let reported =
        eventually(Duration::from_secs(10), || async { (running() == Some(3)).then_some(()) }).await;
    assert!(reported.is_some(), "the agent reports running v3, last report: {:?}", running());
}
