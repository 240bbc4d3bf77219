//! One test per validated domain type: a malformed wire message becomes an
//! `INVALID_ARGUMENT` status whose message names the offending field.

use tonic::{Code, Status};

use super::*;

const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Asserts that `result` failed with INVALID_ARGUMENT naming `field`.
#[track_caller]
fn rejects<T: fmt::Debug>(result: ApiResult<T>, field: &str) {
    let err = result.expect_err("malformed message was accepted");
    let status = Status::from(err);
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("invalid {field}:")),
        "message {:?} does not name field {field}",
        status.message()
    );
}

fn model_ref(model: &str, version: u64) -> pb::ModelRef {
    pb::ModelRef { model: model.into(), version }
}

#[test]
fn model_ref_validates_name_and_version() {
    assert!(ModelRef::try_from(model_ref("smollm2-135m", 3)).is_ok());
    rejects(ModelRef::try_from(model_ref("", 1)), "model");
    rejects(ModelRef::try_from(model_ref("Bad Name", 1)), "model");
    rejects(ModelRef::try_from(model_ref("-x", 1)), "model");
    rejects(ModelRef::try_from(model_ref("m", 0)), "version");
}

#[test]
fn digest_requires_prefix_and_64_lowercase_hex() {
    assert_eq!(Digest::parse("d", D).unwrap().to_string(), D);
    rejects(Digest::parse("digest", &D[7..]), "digest");
    rejects(Digest::parse("digest", &D.to_uppercase().replace("SHA256", "sha256")), "digest");
    rejects(Digest::parse("digest", &D[..70]), "digest");
}

fn tensor() -> pb::TensorInfo {
    pb::TensorInfo {
        name: "model.norm.weight".into(),
        dtype: pb::DType::Bf16 as i32,
        shape: vec![576],
        digest: D.into(),
        size: 1152,
    }
}

#[test]
fn tensor_info_checks_size_against_dtype_and_shape() {
    assert!(TensorInfo::try_from(tensor()).is_ok());
    rejects(TensorInfo::try_from(pb::TensorInfo { size: 1153, ..tensor() }), "size");
    rejects(TensorInfo::try_from(pb::TensorInfo { shape: vec![], ..tensor() }), "shape");
    rejects(TensorInfo::try_from(pb::TensorInfo { shape: vec![576, 0], ..tensor() }), "shape");
    rejects(TensorInfo::try_from(pb::TensorInfo { shape: vec![u64::MAX, 4], ..tensor() }), "shape");
    rejects(TensorInfo::try_from(pb::TensorInfo { dtype: 0, ..tensor() }), "dtype");
    rejects(TensorInfo::try_from(pb::TensorInfo { dtype: 99, ..tensor() }), "dtype");
    rejects(TensorInfo::try_from(pb::TensorInfo { name: String::new(), ..tensor() }), "name");
    rejects(TensorInfo::try_from(pb::TensorInfo { digest: "sha1:00".into(), ..tensor() }), "digest");
}

#[test]
fn blob_range_defaults_and_limits_chunks() {
    let ok = BlobRange::try_from(pb::FetchBlobRequest { digest: D.into(), ..Default::default() }).unwrap();
    assert_eq!((ok.offset, ok.length, ok.chunk_size), (0, None, DEFAULT_CHUNK_BYTES));
    rejects(BlobRange::try_from(pb::FetchBlobRequest::default()), "digest");
    rejects(
        BlobRange::try_from(pb::FetchBlobRequest {
            digest: D.into(),
            chunk_size: 64 << 20,
            ..Default::default()
        }),
        "chunk_size",
    );
    rejects(
        BlobRange::try_from(pb::FetchBlobRequest {
            digest: D.into(),
            offset: u64::MAX,
            length: 2,
            ..Default::default()
        }),
        "length",
    );
}

#[test]
fn upload_header_requires_digest_and_offset_zero() {
    let first = pb::UploadBlobRequest { digest: D.into(), total_size: 10, offset: 0, data: vec![1; 10] };
    assert_eq!(UploadHeader::try_from(&first).unwrap().total_size, 10);
    rejects(UploadHeader::try_from(&pb::UploadBlobRequest { offset: 5, ..first.clone() }), "offset");
    rejects(UploadHeader::try_from(&pb::UploadBlobRequest { digest: "x".into(), ..first }), "digest");
}

#[test]
fn missing_blobs_names_the_bad_index() {
    let ok = MissingBlobsQuery::try_from(pb::MissingBlobsRequest { digests: vec![D.into()] }).unwrap();
    assert_eq!(ok.digests.len(), 1);
    rejects(
        MissingBlobsQuery::try_from(pb::MissingBlobsRequest { digests: vec![D.into(), "nope".into()] }),
        "digests[1]",
    );
}

#[test]
fn delta_query_requires_target() {
    let ok = pb::PlanDeltaRequest { target: Some(model_ref("m", 2)), have: vec![D.into()] };
    assert_eq!(DeltaQuery::try_from(ok).unwrap().have.len(), 1);
    rejects(DeltaQuery::try_from(pb::PlanDeltaRequest { target: None, have: vec![] }), "target");
    rejects(
        DeltaQuery::try_from(pb::PlanDeltaRequest { target: Some(model_ref("m", 0)), have: vec![] }),
        "target.version",
    );
    rejects(
        DeltaQuery::try_from(pb::PlanDeltaRequest {
            target: Some(model_ref("m", 1)),
            have: vec!["z".into()],
        }),
        "have[0]",
    );
}

#[test]
fn signed_manifest_checks_signature_and_key_id() {
    let ok = pb::SignedManifest {
        manifest: vec![1, 2, 3],
        signature: vec![0; 64],
        key_id: "ed25519:0011223344556677".into(),
    };
    assert!(SignedManifest::try_from(ok.clone()).is_ok());
    rejects(
        SignedManifest::try_from(pb::SignedManifest { signature: vec![0; 63], ..ok.clone() }),
        "signature",
    );
    rejects(SignedManifest::try_from(pb::SignedManifest { manifest: vec![], ..ok.clone() }), "manifest");
    rejects(SignedManifest::try_from(pb::SignedManifest { key_id: "rsa:1".into(), ..ok }), "key_id");
    rejects(SignedManifest::try_from(pb::PublishVersionRequest { signed: None }), "signed");
}

#[test]
fn labels_and_selectors() {
    let sel = LabelSelector::parse("selector", "site=plant-7, kind=pump").unwrap();
    let pump = [
        Label { key: "kind".into(), value: "pump".into() },
        Label { key: "site".into(), value: "plant-7".into() },
    ];
    assert!(sel.matches(&pump));
    assert!(!sel.matches(&pump[..1]));
    assert!(LabelSelector::parse("selector", "").unwrap().matches(&[]));
    rejects(LabelSelector::parse("selector", "site"), "selector");
    rejects(LabelSelector::parse("selector", "bad key=1"), "selector.key");
    rejects(Label::try_from(pb::Label { key: "k".into(), value: "a,b".into() }), "value");
}

fn enroll() -> pb::EnrollRequest {
    pb::EnrollRequest {
        bootstrap_token: "tok".into(),
        name: "agent-1".into(),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nMII\n-----END CERTIFICATE REQUEST-----\n".into(),
        labels: vec![pb::Label { key: "site".into(), value: "a".into() }],
    }
}

#[test]
fn enrollment_checks_token_name_csr_and_labels() {
    assert!(Enrollment::try_from(enroll()).is_ok());
    rejects(
        Enrollment::try_from(pb::EnrollRequest { bootstrap_token: String::new(), ..enroll() }),
        "bootstrap_token",
    );
    rejects(Enrollment::try_from(pb::EnrollRequest { name: "UPPER".into(), ..enroll() }), "name");
    rejects(Enrollment::try_from(pb::EnrollRequest { csr_pem: "junk".into(), ..enroll() }), "csr_pem");
    rejects(
        Enrollment::try_from(pb::EnrollRequest {
            labels: vec![pb::Label { key: String::new(), value: "x".into() }],
            ..enroll()
        }),
        "labels[0].key",
    );
}

fn summary() -> pb::Summary {
    pb::Summary {
        agent_id: "agent-1".into(),
        seq: 1,
        window_start: Some(prost_types::Timestamp { seconds: 100, nanos: 0 }),
        window_end: Some(prost_types::Timestamp { seconds: 160, nanos: 0 }),
        model: Some(model_ref("m", 1)),
        label_counts: vec![pb::LabelCount { label: "normal".into(), count: 5 }],
        confidence_histogram: vec![0; 10],
        latency_p50_ms: 10.0,
        latency_p95_ms: 20.0,
        latency_p99_ms: 30.0,
        records: 6,
        raw_bytes: 600,
        bad_records: 1,
        hard_examples: vec![],
        spool_dropped: 0,
    }
}

#[test]
fn summary_validation_names_fields() {
    assert!(Summary::try_from(summary()).is_ok());
    rejects(Summary::try_from(pb::Summary { seq: 0, ..summary() }), "seq");
    rejects(Summary::try_from(pb::Summary { window_end: None, ..summary() }), "window_end");
    rejects(
        Summary::try_from(pb::Summary {
            window_end: Some(prost_types::Timestamp { seconds: 50, nanos: 0 }),
            ..summary()
        }),
        "window_end",
    );
    rejects(Summary::try_from(pb::Summary { model: None, ..summary() }), "model");
    rejects(
        Summary::try_from(pb::Summary { confidence_histogram: vec![0; 3], ..summary() }),
        "confidence_histogram",
    );
    rejects(Summary::try_from(pb::Summary { latency_p99_ms: f64::NAN, ..summary() }), "latency_p99_ms");
    rejects(Summary::try_from(pb::Summary { bad_records: 7, ..summary() }), "bad_records");
}

#[test]
fn summary_report_checks_each_summary_and_its_agent() {
    let ok = pb::ReportSummariesRequest { agent_id: "agent-1".into(), summaries: vec![summary()] };
    assert_eq!(SummaryReport::try_from(ok).unwrap().summaries.len(), 1);
    rejects(
        SummaryReport::try_from(pb::ReportSummariesRequest {
            agent_id: "agent-1".into(),
            summaries: vec![summary(), pb::Summary { seq: 0, ..summary() }],
        }),
        "summaries[1].seq",
    );
    rejects(
        SummaryReport::try_from(pb::ReportSummariesRequest {
            agent_id: "agent-2".into(),
            summaries: vec![summary()],
        }),
        "summaries[0].agent_id",
    );
}

fn rollout() -> pb::CreateRolloutRequest {
    pb::CreateRolloutRequest {
        target: Some(model_ref("m", 2)),
        steps: vec![
            pb::RolloutStep { agents: 1, percent: 0, soak_seconds: 30, soak_ms: 500 },
            pb::RolloutStep { agents: 0, percent: 100, soak_seconds: 0, soak_ms: 0 },
        ],
        ..Default::default()
    }
}

#[test]
fn rollout_spec_checks_steps_targets_and_gates() {
    let spec = RolloutSpec::try_from(rollout()).unwrap();
    assert_eq!(spec.steps[0].size, StepSize::Agents(1));
    assert_eq!(spec.steps[0].soak(), std::time::Duration::from_millis(30_500));
    assert_eq!((spec.steps[0].covered(5), spec.steps[0].covered(0)), (1, 0));
    let half = Step { size: StepSize::Percent(50), soak_seconds: 0, soak_ms: 0 };
    assert_eq!((half.covered(5), half.covered(1), half.covered(0)), (3, 1, 0));
    rejects(RolloutSpec::try_from(pb::CreateRolloutRequest { target: None, ..rollout() }), "target");
    rejects(RolloutSpec::try_from(pb::CreateRolloutRequest { steps: vec![], ..rollout() }), "steps");
    rejects(
        RolloutSpec::try_from(pb::CreateRolloutRequest {
            steps: vec![pb::RolloutStep { agents: 0, percent: 50, soak_seconds: 0, soak_ms: 0 }],
            ..rollout()
        }),
        "steps[0]",
    );
    rejects(
        RolloutSpec::try_from(pb::CreateRolloutRequest {
            steps: vec![pb::RolloutStep { agents: 2, percent: 100, soak_seconds: 0, soak_ms: 0 }],
            ..rollout()
        }),
        "steps[0]",
    );
    rejects(
        RolloutSpec::try_from(pb::CreateRolloutRequest {
            agent_ids: vec!["a".into()],
            selector: "k=v".into(),
            ..rollout()
        }),
        "selector",
    );
    rejects(
        RolloutSpec::try_from(pb::CreateRolloutRequest { agent_ids: vec!["A B".into()], ..rollout() }),
        "agent_ids[0]",
    );
    rejects(
        RolloutSpec::try_from(pb::CreateRolloutRequest {
            gates: Some(pb::RolloutGates { max_decision_drift: 1.5, ..Default::default() }),
            ..rollout()
        }),
        "gates.max_decision_drift",
    );
}

#[test]
fn token_request_checks_role_name_and_ttl() {
    let ok =
        pb::CreateBootstrapTokenRequest { role: pb::Role::Agent as i32, name: String::new(), ttl_seconds: 0 };
    assert_eq!(TokenRequest::try_from(ok.clone()).unwrap().ttl_seconds, 3600);
    rejects(TokenRequest::try_from(pb::CreateBootstrapTokenRequest { role: 0, ..ok.clone() }), "role");
    rejects(
        TokenRequest::try_from(pb::CreateBootstrapTokenRequest { name: "X".into(), ..ok.clone() }),
        "name",
    );
    rejects(
        TokenRequest::try_from(pb::CreateBootstrapTokenRequest { ttl_seconds: u32::MAX, ..ok }),
        "ttl_seconds",
    );
}

fn assign() -> pb::AssignRequest {
    pb::AssignRequest {
        agent_ids: vec!["b".into(), "a".into(), "b".into()],
        target: Some(model_ref("m", 2)),
        activate: true,
        ..Default::default()
    }
}

#[test]
fn assign_spec_takes_ids_or_a_selector_and_a_target() {
    let spec = AssignSpec::try_from(assign()).unwrap();
    let ids = |v: &[&str]| v.iter().map(|s| AgentId::parse("a", s).unwrap()).collect::<Vec<_>>();
    assert_eq!(spec.targets, Targets::Agents(ids(&["a", "b"])), "sorted and deduplicated");
    assert_eq!(spec.rollout_id, None);
    let by_sel = pb::AssignRequest { agent_ids: vec![], selector: "site=p7".into(), ..assign() };
    let spec = AssignSpec::try_from(by_sel.clone()).unwrap();
    assert!(matches!(spec.targets, Targets::Selector(ref s) if s.to_string() == "site=p7"));
    rejects(AssignSpec::try_from(pb::AssignRequest { agent_ids: vec![], ..assign() }), "agent_ids");
    rejects(AssignSpec::try_from(pb::AssignRequest { selector: "site=p7".into(), ..assign() }), "selector");
    rejects(AssignSpec::try_from(pb::AssignRequest { selector: " , ".into(), ..by_sel.clone() }), "selector");
    rejects(
        AssignSpec::try_from(pb::AssignRequest { agent_ids: vec!["A B".into()], ..assign() }),
        "agent_ids[0]",
    );
    rejects(AssignSpec::try_from(pb::AssignRequest { target: None, ..assign() }), "target");
    rejects(
        AssignSpec::try_from(pb::AssignRequest { target: Some(model_ref("m", 0)), ..assign() }),
        "target.version",
    );
    rejects(AssignSpec::try_from(pb::AssignRequest { rollout_id: "a b".into(), ..assign() }), "rollout_id");
}

#[test]
fn agent_messages_validate_their_kind_and_fields() {
    use pb::agent_message::Kind;
    let hello =
        pb::Hello { agent_id: "edge-1".into(), labels: vec![], status: None, agent_version: "1".into() };
    let msg = |kind| pb::AgentMessage { kind: Some(kind) };
    let Ok(AgentMessage::Hello(h)) = AgentMessage::try_from(msg(Kind::Hello(hello.clone()))) else {
        panic!("a valid hello")
    };
    assert_eq!(h.status, AgentStatus::default(), "an absent status is the empty one");
    rejects(AgentMessage::try_from(pb::AgentMessage { kind: None }), "kind");
    rejects(
        AgentMessage::try_from(msg(Kind::Hello(pb::Hello { agent_id: "".into(), ..hello.clone() }))),
        "hello.agent_id",
    );
    let status = pb::AgentStatus { decisions_per_second: f64::NAN, ..Default::default() };
    rejects(
        AgentMessage::try_from(msg(Kind::Heartbeat(pb::Heartbeat {
            seq: 1,
            sent_at: None,
            status: Some(status),
        }))),
        "heartbeat.status.decisions_per_second",
    );
    // Version 0 means "none" in a status; a named model with version 0 is still checked.
    let running = pb::AgentStatus { running: Some(model_ref("m", 0)), ..Default::default() };
    assert_eq!(AgentStatus::try_from(running).unwrap().running, None);
    rejects(
        AgentStatus::try_from(pb::AgentStatus { pending: Some(model_ref("Bad", 0)), ..Default::default() }),
        "pending.model",
    );
    let result = pb::AssignmentResult {
        assignment_id: "x".into(),
        outcome: pb::AssignmentOutcome::Activated as i32,
        message: String::new(),
        running: Some(model_ref("m", 2)),
    };
    let Ok(AgentMessage::Result(r)) = AgentMessage::try_from(msg(Kind::Result(result.clone()))) else {
        panic!("a valid result")
    };
    assert_eq!(pb::AssignmentResult::from(r), result, "round-trips");
    rejects(AssignmentResult::try_from(pb::AssignmentResult { outcome: 0, ..result.clone() }), "outcome");
    rejects(
        AssignmentResult::try_from(pb::AssignmentResult { assignment_id: "".into(), ..result }),
        "assignment_id",
    );
}

#[test]
fn summary_round_trips_to_the_wire() {
    let mut s = summary();
    s.hard_examples = vec![pb::HardExample {
        text: "t".into(),
        decision: "inspect".into(),
        scores: vec![pb::LabelScore { label: "inspect".into(), logprob: -0.5, probability: 0.6 }],
    }];
    assert_eq!(pb::Summary::from(Summary::try_from(s.clone()).unwrap()), s);
}

#[test]
fn summary_query_defaults_caps_and_filters() {
    let q = SummaryQuery::try_from(pb::ListSummariesRequest::default()).unwrap();
    assert_eq!(
        (q.agent_id.clone(), q.model.clone(), q.version, q.limit),
        (None, None, None, DEFAULT_SUMMARY_LIMIT)
    );
    let s = Summary::try_from(summary()).unwrap();
    assert!(q.matches(&s));
    let q = SummaryQuery::try_from(pb::ListSummariesRequest { limit: 5_000, ..Default::default() }).unwrap();
    assert_eq!(q.limit, DEFAULT_SUMMARY_LIMIT);
    let ts = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    let window = |start, end| pb::ListSummariesRequest {
        window: Some(pb::TimeRange { start: ts(start), end: ts(end) }),
        ..Default::default()
    };
    assert!(SummaryQuery::try_from(window(160, 161)).unwrap().matches(&s), "start is inclusive");
    assert!(!SummaryQuery::try_from(window(100, 160)).unwrap().matches(&s), "end is exclusive");
    let version = pb::ListSummariesRequest { model: Some(model_ref("m", 2)), ..Default::default() };
    assert!(!SummaryQuery::try_from(version).unwrap().matches(&s));
    let other = pb::ListSummariesRequest { agent_id: "agent-2".into(), ..Default::default() };
    assert!(!SummaryQuery::try_from(other).unwrap().matches(&s));
    rejects(SummaryQuery::try_from(window(200, 100)), "window.end");
    rejects(
        SummaryQuery::try_from(pb::ListSummariesRequest {
            model: Some(model_ref("", 1)),
            ..Default::default()
        }),
        "model.model",
    );
    rejects(
        SummaryQuery::try_from(pb::ListSummariesRequest { agent_id: "A".into(), ..Default::default() }),
        "agent_id",
    );
}

#[test]
fn rollout_action_checks_id_and_reason() {
    let ok = RolloutAction::try_from(pb::RolloutAction {
        id: "0123abcd".into(),
        reason: "bad drift".into(),
        ..Default::default()
    });
    assert_eq!(ok.unwrap().id.as_str(), "0123abcd");
    rejects(RolloutAction::try_from(pb::RolloutAction::default()), "id");
    rejects(
        RolloutAction::try_from(pb::RolloutAction {
            id: "r1".into(),
            reason: "x".repeat(1025),
            ..Default::default()
        }),
        "reason",
    );
}
