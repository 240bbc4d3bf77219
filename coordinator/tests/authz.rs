//! Authorization end to end: an in-process coordinator serving mutual TLS with the
//! authorization layer, talked to by the generated clients holding certificates from its CA.
//!
//! Each test names a claim of `docs/security.md` ("Authorization and revocation"): who is
//! refused on which service, with which gRPC code; what an agent may read and do as itself;
//! that a revocation ends a live session at once; per-identity rate limits; and that
//! `--insecure` checks nothing.

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
    auth::{AuthConfig, AuthLayer, AuthMode, Authorizer, Identity, RateLimit, Role, revocation},
    blobs::{LocalBlobStore, VerifiedBlobs},
    fleet::{self, Fleet, FleetConfig},
    pki::{TlsMaterial, TlsSettings},
    registry::{self, Registry, RegistryApi, RegistryConfig},
    rollout::{self, Rollouts},
    server::{self, Limits, ServiceSet},
    store::{Store, embedded::EmbeddedStore},
};
use llmchain_proto::{
    model::UploadHeader,
    pb::{
        self, agent_message, coordinator_message, fleet_client::FleetClient, registry_client::RegistryClient,
        rollouts_client::RolloutsClient,
    },
};
use llmchain_runtime::tls::Transport;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// How long a test waits for something that should happen at once.
const PROMPT: Duration = Duration::from_secs(5);

fn trainer_key() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

/// One coordinator serving registry, fleet and rollouts over mutual TLS (or plaintext).
struct Coordinator {
    addr: std::net::SocketAddr,
    tls: Option<TlsMaterial>,
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    async fn start(mode: AuthMode, rate_limit: RateLimit) -> Coordinator {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).await.unwrap());
        let local = Arc::new(LocalBlobStore::open(dir.path().join("blobs")).await.unwrap());
        let registry = Arc::new(Registry::new(
            RegistryConfig::new(TrustedKeys::new([trainer_key().public()])),
            store.clone(),
            Arc::new(VerifiedBlobs::new(local)),
        ));
        let stop = CancellationToken::new();
        let fleet_config = FleetConfig {
            heartbeat_interval: Duration::from_millis(300),
            lease_ttl: Duration::from_millis(1000),
        };
        let fleet = Arc::new(Fleet::new(fleet_config, store.clone(), stop.child_token()));
        let rollouts = Arc::new(Rollouts::new(store.clone(), "coordinator-test"));
        let tls = (mode == AuthMode::Mtls).then(|| {
            TlsMaterial::load_or_create(&TlsSettings {
                dir: dir.path().join("tls"),
                sans: vec!["localhost".into(), "127.0.0.1".into()],
                cert_validity: Duration::from_secs(3600),
            })
            .unwrap()
        });
        let authz = Authorizer::start(store.clone(), AuthConfig { mode, rate_limit }, stop.child_token())
            .await
            .unwrap();
        let mut services = ServiceSet::default();
        services.add(registry::service(registry.clone()));
        services.add(fleet::service(fleet));
        services.add(rollout::service(rollouts));
        services.authorize(AuthLayer::new(authz));
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_tls = tls.as_ref().map(TlsMaterial::server_config);
        let token = stop.clone();
        let server = tokio::spawn(async move {
            server::serve_with_tls(listener, services, Limits::default(), server_tls, token).await.unwrap();
        });
        Coordinator { addr, tls, registry, store, stop, server, _dir: dir }
    }

    async fn mtls() -> Coordinator {
        Coordinator::start(AuthMode::Mtls, RateLimit::default()).await
    }

    /// A certificate and key for `name` in `role`, from this coordinator's CA.
    fn issue(&self, name: &str, role: Role, lifetime: Duration) -> (String, String) {
        let ca = &self.tls.as_ref().expect("a tls coordinator").ca;
        ca.issue_with_new_key(&Identity::new(name, role).unwrap(), lifetime).unwrap()
    }

    /// A channel presenting `identity` (cert, key PEM), or no certificate.
    async fn channel(&self, identity: Option<(String, String)>) -> Channel {
        let transport = match &self.tls {
            Some(tls) => Transport::tls(tls.ca.cert_pem().to_string(), identity).unwrap(),
            None => Transport::Insecure,
        };
        transport.endpoint(&self.addr.to_string()).unwrap().connect_lazy()
    }

    async fn as_identity(&self, name: &str, role: Role) -> Channel {
        self.channel(Some(self.issue(name, role, Duration::from_secs(3600)))).await
    }

    /// Publishes a tiny synthetic `model@version` (its blobs differ per version).
    async fn publish(&self, model: &str, version: u64) -> Vec<llmchain_proto::model::Digest> {
        let (manifest, blobs) = synthetic_version(model, version, 0, &tiny_llama(1), |_| version);
        for (digest, bytes) in blobs {
            let header = UploadHeader { digest, total_size: bytes.len() as u64 };
            let chunks = futures::stream::once(async move { Ok(Bytes::from(bytes)) }).boxed();
            self.registry.upload_blob(header, chunks).await.unwrap();
        }
        let digests = manifest.tensors.iter().map(|t| t.digest).collect();
        self.registry.publish(trainer_key().sign(&manifest)).await.unwrap();
        digests
    }

    async fn shutdown(self) {
        self.stop.cancel();
        self.server.await.unwrap();
    }
}

fn model(name: &str, version: u64) -> pb::ModelRef {
    pb::ModelRef { model: name.into(), version }
}

fn hello(agent_id: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        kind: Some(agent_message::Kind::Hello(pb::Hello {
            agent_id: agent_id.into(),
            labels: vec![],
            status: Some(pb::AgentStatus::default()),
            agent_version: "0.1.0".into(),
        })),
    }
}

/// Opens a session as `agent_id`; keeps the sender so the stream stays open.
async fn open_session(
    channel: &Channel,
    agent_id: &str,
) -> Result<(mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::CoordinatorMessage>), Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(hello(agent_id)).await.unwrap();
    let mut stream = FleetClient::new(channel.clone()).session(ReceiverStream::new(rx)).await?.into_inner();
    match tokio::time::timeout(PROMPT, stream.message()).await.expect("no answer to hello")? {
        Some(pb::CoordinatorMessage { kind: Some(coordinator_message::Kind::Welcome(_)) }) => {
            Ok((tx, stream))
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
}

fn summary(agent: &str, seq: u64) -> pb::Summary {
    let end = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seq * 60);
    pb::Summary {
        agent_id: agent.into(),
        seq,
        window_start: Some((end - Duration::from_secs(60)).into()),
        window_end: Some(end.into()),
        model: Some(model("m", 1)),
        label_counts: vec![pb::LabelCount { label: "normal".into(), count: 5 }],
        confidence_histogram: vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
        latency_p50_ms: 1.0,
        latency_p95_ms: 2.0,
        latency_p99_ms: 3.0,
        records: 5,
        raw_bytes: 500,
        bad_records: 0,
        hard_examples: vec![],
        spool_dropped: 0,
    }
}

fn report(agent: &str, seq: u64) -> pb::ReportSummariesRequest {
    pb::ReportSummariesRequest { agent_id: agent.into(), summaries: vec![summary(agent, seq)] }
}

/// One call of each service (and the agent-only fleet calls); returns each outcome's code.
async fn one_call_per_service(channel: &Channel) -> Vec<(&'static str, Code)> {
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());
    let mut registry = RegistryClient::new(channel.clone());
    let mut fleet = FleetClient::new(channel.clone());
    let mut rollouts = RolloutsClient::new(channel.clone());
    vec![
        ("Registry.ListModels", code(registry.list_models(pb::ListModelsRequest {}).await.map(drop))),
        (
            "Registry.GetManifest",
            code(
                registry
                    .get_manifest(pb::GetManifestRequest { model: "m".into(), version: 1 })
                    .await
                    .map(drop),
            ),
        ),
        ("Fleet.ListAgents", code(fleet.list_agents(pb::ListAgentsRequest::default()).await.map(drop))),
        ("Fleet.ReportSummaries", code(fleet.report_summaries(report("agent-1", 1)).await.map(drop))),
        ("Fleet.Session", code(open_session(channel, "agent-1").await.map(drop))),
        (
            "Rollouts.ListRollouts",
            code(rollouts.list_rollouts(pb::ListRolloutsRequest::default()).await.map(drop)),
        ),
    ]
}

fn assert_all(outcomes: &[(&str, Code)], expected: Code) {
    for (rpc, code) in outcomes {
        assert_eq!(*code, expected, "{rpc}: {outcomes:?}");
    }
}

#[tokio::test]
async fn callers_without_a_valid_certificate_are_refused_by_every_service() {
    let c = Coordinator::mtls().await;

    // No client certificate: the TLS handshake succeeds (client auth is optional for Enroll),
    // the authorization layer refuses.
    let anonymous = c.channel(None).await;
    assert_all(&one_call_per_service(&anonymous).await, Code::Unauthenticated);
    // Public RPCs still answer without one.
    let health =
        HealthClient::new(anonymous.clone()).check(HealthCheckRequest { service: String::new() }).await;
    assert!(health.is_ok(), "health needs no certificate: {health:?}");

    // An expired certificate of the right CA and role: rustls refuses the handshake with a fatal
    // alert, so no RPC reaches any service (tonic reports UNKNOWN "transport error").
    let (cert, key) = c.issue("agent-1", Role::Agent, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await; // the certificate's lifetime, passed
    let expired = c.channel(Some((cert, key))).await;
    let refusal =
        RegistryClient::new(expired.clone()).list_models(pb::ListModelsRequest {}).await.unwrap_err();
    // tonic reports the handshake's fatal alert as UNKNOWN "transport error".
    assert!(format!("{refusal:?}").contains("CertificateExpired"), "{refusal:?}");
    let outcomes = one_call_per_service(&expired).await;
    assert_all(&outcomes, Code::Unknown);

    // A certificate of another CA naming an operator is refused the same way (alert UnknownCA).
    let foreign = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "admin");
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://llmchain/operator/admin").unwrap(),
        ));
        let cert = params.self_signed(&key).unwrap();
        c.channel(Some((cert.pem(), key.serialize_pem()))).await
    };
    let refusal =
        RegistryClient::new(foreign.clone()).list_models(pb::ListModelsRequest {}).await.unwrap_err();
    assert!(format!("{refusal:?}").contains("UnknownCA"), "{refusal:?}");
    assert_all(&one_call_per_service(&foreign).await, Code::Unknown);
    c.shutdown().await;
}

#[tokio::test]
async fn each_role_is_refused_what_it_is_not_allowed() {
    let c = Coordinator::mtls().await;
    c.publish("m", 1).await;
    let agent = c.as_identity("agent-1", Role::Agent).await;
    let trainer = c.as_identity("trainer-1", Role::Trainer).await;
    let operator = c.as_identity("ops", Role::Operator).await;
    let code = |r: Result<(), Status>| r.err().map_or(Code::Ok, |s| s.code());

    let upload = |channel: &Channel| {
        let mut client = RegistryClient::new(channel.clone());
        async move {
            let data = b"blob".to_vec();
            let digest = llmchain_artifact::digest_bytes(&data).to_string();
            let msg = pb::UploadBlobRequest { digest, total_size: 4, offset: 0, data };
            code(client.upload_blob(futures::stream::iter([msg])).await.map(drop))
        }
    };
    let publish = |channel: &Channel| {
        let mut client = RegistryClient::new(channel.clone());
        async move { code(client.publish_version(pb::PublishVersionRequest::default()).await.map(drop)) }
    };
    let assign = |channel: &Channel| {
        let mut client = FleetClient::new(channel.clone());
        let req = pb::AssignRequest {
            agent_ids: vec!["agent-1".into()],
            target: Some(model("m", 1)),
            activate: true,
            ..Default::default()
        };
        async move { code(client.assign(req).await.map(drop)) }
    };
    let create_rollout = |channel: &Channel| {
        let mut client = RolloutsClient::new(channel.clone());
        async move { code(client.create_rollout(pb::CreateRolloutRequest::default()).await.map(drop)) }
    };
    let token = |channel: &Channel| {
        let mut client = FleetClient::new(channel.clone());
        let req = pb::CreateBootstrapTokenRequest {
            role: pb::Role::Agent.into(),
            name: String::new(),
            ttl_seconds: 60,
        };
        async move { code(client.create_bootstrap_token(req).await.map(drop)) }
    };
    let revoke = |channel: &Channel| {
        let mut client = FleetClient::new(channel.clone());
        let req = pb::RevokeAgentRequest { agent_id: "agent-9".into(), reason: String::new() };
        async move { code(client.revoke_agent(req).await.map(drop)) }
    };
    let list_models = |channel: &Channel| {
        let mut client = RegistryClient::new(channel.clone());
        async move { code(client.list_models(pb::ListModelsRequest {}).await.map(drop)) }
    };
    let list_rollouts = |channel: &Channel| {
        let mut client = RolloutsClient::new(channel.clone());
        async move { code(client.list_rollouts(pb::ListRolloutsRequest::default()).await.map(drop)) }
    };

    let denied = Code::PermissionDenied;
    // Agents: only their own session, summaries and assigned reads.
    for (rpc, got) in [
        ("UploadBlob", upload(&agent).await),
        ("PublishVersion", publish(&agent).await),
        ("ListModels", list_models(&agent).await),
        ("Assign", assign(&agent).await),
        ("CreateBootstrapToken", token(&agent).await),
        ("RevokeAgent", revoke(&agent).await),
        ("ListRollouts", list_rollouts(&agent).await),
        ("CreateRollout", create_rollout(&agent).await),
    ] {
        assert_eq!(got, denied, "agent calling {rpc}");
    }
    // Trainers: publish and read the registry, nothing of the fleet's administration.
    for (rpc, got) in [
        ("Session", open_session(&trainer, "trainer-1").await.err().map_or(Code::Ok, |s| s.code())),
        ("Assign", assign(&trainer).await),
        ("CreateBootstrapToken", token(&trainer).await),
        ("RevokeAgent", revoke(&trainer).await),
        ("ListRollouts", list_rollouts(&trainer).await),
        ("CreateRollout", create_rollout(&trainer).await),
    ] {
        assert_eq!(got, denied, "trainer calling {rpc}");
    }
    // Operators: everything but publishing and acting as an agent.
    for (rpc, got) in [
        ("UploadBlob", upload(&operator).await),
        ("PublishVersion", publish(&operator).await),
        ("Session", open_session(&operator, "ops").await.err().map_or(Code::Ok, |s| s.code())),
        (
            "ReportSummaries",
            code(FleetClient::new(operator.clone()).report_summaries(report("ops", 1)).await.map(drop)),
        ),
    ] {
        assert_eq!(got, denied, "operator calling {rpc}");
    }

    // The same calls by the roles that may make them pass the layer.
    assert_eq!(upload(&trainer).await, Code::Ok);
    assert_eq!(list_models(&trainer).await, Code::Ok);
    assert_eq!(list_models(&operator).await, Code::Ok);
    assert_eq!(list_rollouts(&operator).await, Code::Ok);
    assert_eq!(revoke(&operator).await, Code::Ok);
    // The trainer's empty publish reaches the registry, which finds it malformed.
    assert_eq!(publish(&trainer).await, Code::InvalidArgument);
    assert_eq!(token(&operator).await, Code::FailedPrecondition, "reaches the fleet, which has no CA here");
    assert!(open_session(&agent, "agent-1").await.is_ok());
    c.shutdown().await;
}

#[tokio::test]
async fn an_agent_reads_only_its_assignment_and_acts_only_as_itself() {
    let c = Coordinator::mtls().await;
    let blobs_v1 = c.publish("m", 1).await;
    let blobs_v2 = c.publish("m", 2).await;
    assert!(blobs_v1.iter().all(|d| !blobs_v2.contains(d)), "versions share no tensor blob");
    let a1 = c.as_identity("agent-1", Role::Agent).await;
    let a2 = c.as_identity("agent-2", Role::Agent).await;
    let operator = c.as_identity("ops", Role::Operator).await;

    // Only its own session.
    let err = open_session(&a1, "agent-2").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let _s1 = open_session(&a1, "agent-1").await.unwrap();
    let _s2 = open_session(&a2, "agent-2").await.unwrap();

    // Only its own summaries.
    let mut fleet = FleetClient::new(a1.clone());
    let err = fleet.report_summaries(report("agent-2", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_eq!(fleet.report_summaries(report("agent-1", 1)).await.unwrap().into_inner().acked, vec![1]);

    let mut ops = FleetClient::new(operator.clone());
    for (agent, version) in [("agent-1", 1), ("agent-2", 2)] {
        let req = pb::AssignRequest {
            agent_ids: vec![agent.into()],
            target: Some(model("m", version)),
            activate: true,
            ..Default::default()
        };
        ops.assign(req).await.unwrap();
    }

    let mut registry = RegistryClient::new(a1.clone());
    let manifest = |version| pb::GetManifestRequest { model: "m".into(), version };
    let fetch = |digest: &llmchain_proto::model::Digest| pb::FetchBlobRequest {
        digest: digest.to_string(),
        offset: 0,
        length: 0,
        chunk_size: 0,
    };
    // Its own assignment: manifest, delta plan, blobs.
    registry.get_manifest(manifest(1)).await.unwrap();
    let plan = pb::PlanDeltaRequest { target: Some(model("m", 1)), have: vec![] };
    registry.plan_delta(plan).await.unwrap();
    let mut stream = registry.fetch_blob(fetch(&blobs_v1[0])).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    // Another agent's: refused, also when asked for as "latest".
    for version in [2, 0] {
        let err = registry.get_manifest(manifest(version)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "version {version}: {err}");
    }
    let err = registry.plan_delta(pb::PlanDeltaRequest { target: Some(model("m", 2)), have: vec![] }).await;
    assert_eq!(err.unwrap_err().code(), Code::PermissionDenied);
    let err = registry.fetch_blob(fetch(&blobs_v2[0])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // A new assignment moves what it may read.
    let req = pb::AssignRequest {
        agent_ids: vec!["agent-1".into()],
        target: Some(model("m", 2)),
        activate: true,
        ..Default::default()
    };
    ops.assign(req).await.unwrap();
    registry.get_manifest(manifest(2)).await.unwrap();
    registry.fetch_blob(fetch(&blobs_v2[0])).await.unwrap();
    let err = registry.fetch_blob(fetch(&blobs_v1[0])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // Operators and trainers read any version.
    RegistryClient::new(operator.clone()).get_manifest(manifest(1)).await.unwrap();
    c.shutdown().await;
}

#[tokio::test]
async fn a_revoked_agent_is_refused_everywhere_and_its_open_session_ends() {
    let c = Coordinator::mtls().await;
    let agent = c.as_identity("agent-1", Role::Agent).await;
    let operator = c.as_identity("ops", Role::Operator).await;
    let (_tx, mut session) = open_session(&agent, "agent-1").await.unwrap();

    let started = tokio::time::Instant::now();
    let req = pb::RevokeAgentRequest { agent_id: "agent-1".into(), reason: "stolen device".into() };
    FleetClient::new(operator.clone()).revoke_agent(req).await.unwrap();

    // The open session ends at once with UNAUTHENTICATED, well before its lease would expire.
    let ended = loop {
        match tokio::time::timeout(PROMPT, session.message()).await.expect("the session did not end") {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the session ended without a status"),
            Err(status) => break status,
        }
    };
    // The message says the revocation ended it, not a lapsed lease; the bound only catches a
    // revocation that waits for something (it is loose for a loaded 2-core machine).
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended}");
    assert!(ended.message().contains("revoked"), "{ended}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // Every service refuses the certificate from now on, before looking at the role.
    let outcomes = one_call_per_service(&agent).await;
    assert_all(&outcomes, Code::Unauthenticated);

    // The record is in the store, and operators see the agent as revoked.
    let stored = c.store.get(&revocation::revoked_key("agent-1")).await.unwrap().expect("revocation stored");
    let record = revocation::RevocationRecord::decode(&stored.key, &stored.value).unwrap();
    assert_eq!(record.reason, "stolen device");
    assert_eq!(record.revoked_by, "operator/ops");
    let agents = FleetClient::new(operator.clone())
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let info = agents.iter().find(|a| a.agent_id == "agent-1").expect("agent-1 is known");
    assert!(info.revoked);
    // Other identities are untouched.
    let other = c.as_identity("agent-2", Role::Agent).await;
    assert!(open_session(&other, "agent-2").await.is_ok());
    c.shutdown().await;
}

#[tokio::test]
async fn each_identity_has_its_own_rate_limit() {
    let limit = RateLimit { per_second: 1.try_into().unwrap(), burst: 5.try_into().unwrap() };
    let c = Coordinator::start(AuthMode::Mtls, limit).await;
    let greedy = c.as_identity("ops", Role::Operator).await;
    let mut client = RegistryClient::new(greedy.clone());
    // The burst of 5 passes; then calls are refused, except that a loaded machine may take
    // long enough between calls for the bucket to refill one per second.
    let started = std::time::Instant::now();
    let mut passed = 0;
    let err = loop {
        match client.list_models(pb::ListModelsRequest {}).await {
            Ok(_) => passed += 1,
            Err(e) => break e,
        }
        let refilled = started.elapsed().as_secs_f64().ceil() as usize;
        assert!(passed <= 5 + refilled, "{passed} calls passed in {:?}", started.elapsed());
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(passed >= 5, "the burst of 5 passed: {passed}");
    // Another identity still has its whole burst.
    let calm = c.as_identity("ops-2", Role::Operator).await;
    RegistryClient::new(calm).list_models(pb::ListModelsRequest {}).await.unwrap();
    c.shutdown().await;
}

#[tokio::test]
async fn insecure_mode_checks_nothing_but_still_records_revocations() {
    let c = Coordinator::start(AuthMode::Insecure, RateLimit::default()).await;
    let channel = c.channel(None).await;
    let outcomes = one_call_per_service(&channel).await;
    // Without identities every call reaches its service, which answers on its own terms.
    for (rpc, code) in &outcomes {
        assert!(
            !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
            "{rpc} refused in insecure mode: {outcomes:?}"
        );
    }
    let req = pb::RevokeAgentRequest { agent_id: "agent-1".into(), reason: String::new() };
    FleetClient::new(channel.clone()).revoke_agent(req).await.unwrap();
    assert!(c.store.get(&revocation::revoked_key("agent-1")).await.unwrap().is_some());
    let bad = pb::RevokeAgentRequest { agent_id: "Not/An-Id".into(), reason: String::new() };
    let err = FleetClient::new(channel).revoke_agent(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.shutdown().await;
}
