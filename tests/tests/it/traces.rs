//! One rollout, one trace: a real coordinator and a real agent export their spans over
//! OTLP/gRPC to a receiver in this process, and the spans of the operator's `CreateRollout`,
//! the rollout step, the agent's assignment (fetch, verify, blob downloads, load, self-test,
//! swap) and the coordinator's answers to those downloads hang together by trace id and
//! parent span id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use llmchain_proto::pb::{self, rollouts_client::RolloutsClient};
use llmchain_tests::{
    eventually,
    fleet::{Coordinator, TrainerKey, agent_info, publish, spawn_agent_with_env, tiny_model, wait_running},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{KeyValue, any_value::Value},
    trace::v1::Span,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, metadata::MetadataValue};

const MODEL: &str = "tiny-traced";
const COORDINATOR: &str = "llmchain-coordinator";
const AGENT: &str = "llmchain-edge-agent";
/// The trace the test's own `CreateRollout` call belongs to (the operator's side).
const TRACE_ID: &str = "5b8efff798038103d269b633813fc60c";
const OPERATOR_SPAN_ID: &str = "eee19b7ec3c1b174";

/// One exported span with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn name(&self) -> &str {
        &self.span.name
    }
    fn id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn trace(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn attr(&self, key: &str) -> Option<String> {
        string_of(&self.span.attributes, key)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_of(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// An OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string_of(&r.attributes, "service.name"))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received { service: service.clone(), span });
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    /// Serves on a fresh loopback port; returns its URL.
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn snapshot(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

/// The one span of `service` named `name` in `spans`, optionally with attribute `key=value`.
fn one<'a>(
    spans: &'a [Received],
    service: &str,
    name: &str,
    attr: Option<(&str, &str)>,
) -> Option<&'a Received> {
    let mut found = spans.iter().filter(|s| {
        s.service == service && s.name() == name && attr.is_none_or(|(k, v)| s.attr(k).as_deref() == Some(v))
    });
    let first = found.next()?;
    assert!(found.next().is_none(), "more than one {service} span {name} {attr:?}");
    Some(first)
}

fn describe(spans: &[Received]) -> String {
    let mut lines: Vec<String> = spans
        .iter()
        .map(|s| {
            format!(
                "{} {} {} parent={} trace={} path={:?}",
                s.service,
                s.name(),
                s.id(),
                s.parent(),
                s.trace(),
                s.attr("path")
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_one_trace_from_the_operator_call_to_the_agents_swap() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    // Exported within 200 ms, so the test does not wait out the default 5 s batch delay.
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "200")];

    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let c =
        Coordinator::start_with_env(dir.path(), &[&trainer.public], &["--controller-tick-ms", "100"], &env);
    publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(3, &[])).await;
    let _agent = spawn_agent_with_env(
        dir.path(),
        "edge-1",
        &c.url(),
        &trainer.public,
        &["--source", "sim:rate=20", "--window-s", "1"],
        &env,
    );
    let mut fleet = c.fleet().await;
    eventually(Duration::from_secs(30), || {
        let mut fleet = fleet.clone();
        async move { agent_info(&mut fleet, "edge-1").await }
    })
    .await
    .expect("the agent opens its session");

    // The operator's call, with the operator's trace context in its metadata.
    let mut request = Request::new(pb::CreateRolloutRequest {
        target: Some(pb::ModelRef { model: MODEL.into(), version: 1 }),
        agent_ids: vec!["edge-1".into()],
        steps: vec![pb::RolloutStep { agents: 0, percent: 100, soak_seconds: 0, soak_ms: 0 }],
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{TRACE_ID}-{OPERATOR_SPAN_ID}-01")).unwrap(),
    );
    let mut rollouts = RolloutsClient::connect(c.url()).await.unwrap();
    let rollout = rollouts.create_rollout(request).await.unwrap().into_inner();
    wait_running(&mut fleet, "edge-1", MODEL, 1, Duration::from_secs(30)).await;

    // Every span below is exported within a batch delay of being closed.
    let spans = eventually(Duration::from_secs(10), || {
        let spans = receiver.snapshot();
        let have = |service: &str, name: &str| spans.iter().any(|s| s.service == service && s.name() == name);
        let complete = have(COORDINATOR, "rollout_step")
            && have(COORDINATOR, "fetch")
            && have(COORDINATOR, "ingest_summaries")
            && [
                "assignment",
                "fetch",
                "verify",
                "fetch_blob",
                "load",
                "self_test",
                "swap",
                "batch",
                "report_summaries",
            ]
            .iter()
            .all(|name| have(AGENT, name))
            // A parent span closes after its children, so it can be exported a batch later:
            // wait for the request spans too, not only for what runs inside them.
            && grpc_spans(&spans, "/llmchain.v1.Registry/FetchBlob")
                >= spans.iter().filter(|s| s.service == AGENT && s.name() == "fetch_blob").count()
            && grpc_spans(&spans, "/llmchain.v1.Registry/GetManifest") > 0
            && grpc_spans(&spans, "/llmchain.v1.Rollouts/CreateRollout") > 0
            && summary_report_traced(&spans);
        async move { complete.then_some(spans) }
    })
    .await
    .unwrap_or_else(|| panic!("spans missing; received:\n{}", describe(&receiver.snapshot())));
    let listing = describe(&spans);

    // The operator's call → the coordinator's request span → the rollout step.
    let create = one(&spans, COORDINATOR, "grpc", Some(("path", "/llmchain.v1.Rollouts/CreateRollout")))
        .unwrap_or_else(|| panic!("no CreateRollout span:\n{listing}"));
    assert_eq!(create.trace(), TRACE_ID, "{listing}");
    assert_eq!(create.parent(), OPERATOR_SPAN_ID, "{listing}");
    let step = one(&spans, COORDINATOR, "rollout_step", None).unwrap();
    assert_eq!(step.trace(), TRACE_ID, "the step joins the rollout's trace:\n{listing}");
    assert_eq!(step.parent(), create.id(), "{listing}");
    assert_eq!(step.attr("rollout_id").as_deref(), Some(rollout.id.as_str()));
    assert_eq!(step.attr("step").as_deref(), Some("0"));

    // The step → the agent's assignment, carried inside the assignment message (a session
    // that reopened could deliver it twice; every copy belongs to the step).
    let assignments: Vec<&Received> =
        spans.iter().filter(|s| s.service == AGENT && s.name() == "assignment").collect();
    assert!(!assignments.is_empty());
    for a in &assignments {
        assert_eq!(a.trace(), TRACE_ID, "{listing}");
        assert_eq!(a.parent(), step.id(), "the agent's top span is a child of the step:\n{listing}");
        assert_eq!(a.attr("rollout").as_deref(), Some(rollout.id.as_str()));
    }
    let fetch_parent = one(&spans, AGENT, "fetch", None).unwrap().parent();
    let assignment = *assignments
        .iter()
        .find(|a| a.id() == fetch_parent)
        .unwrap_or_else(|| panic!("the fetch is not under an assignment:\n{listing}"));

    // The agent's work, each span under its parent.
    let child = |name: &str, parent: &Received| {
        let span =
            one(&spans, AGENT, name, None).unwrap_or_else(|| panic!("no agent span {name}:\n{listing}"));
        assert_eq!(span.trace(), TRACE_ID, "{name}:\n{listing}");
        assert_eq!(span.parent(), parent.id(), "{name} is a child of {}:\n{listing}", parent.name());
        span
    };
    let fetch = child("fetch", assignment);
    child("verify", fetch);
    let load = child("load", assignment);
    child("self_test", load);
    child("swap", assignment);
    let blobs: Vec<&Received> =
        spans.iter().filter(|s| s.service == AGENT && s.name() == "fetch_blob").collect();
    let expected_blobs: usize = fetch.attr("blobs").unwrap().parse().unwrap();
    assert!(expected_blobs > 0);
    assert_eq!(blobs.len(), expected_blobs, "one fetch_blob span per blob downloaded:\n{listing}");
    assert!(blobs.iter().all(|b| b.trace() == TRACE_ID && b.parent() == fetch.id()), "{listing}");

    // The agent's calls carry its context: the coordinator answers them inside the same trace.
    let manifest = one(&spans, COORDINATOR, "grpc", Some(("path", "/llmchain.v1.Registry/GetManifest")))
        .unwrap_or_else(|| panic!("no GetManifest span:\n{listing}"));
    assert_eq!((manifest.trace(), manifest.parent()), (TRACE_ID.to_string(), fetch.id()), "{listing}");
    let blob_ids: Vec<String> = blobs.iter().map(|b| b.id()).collect();
    let served: Vec<&Received> = spans
        .iter()
        .filter(|s| {
            s.service == COORDINATOR && s.attr("path").as_deref() == Some("/llmchain.v1.Registry/FetchBlob")
        })
        .collect();
    assert!(served.len() >= blobs.len(), "{listing}");
    for grpc in &served {
        assert_eq!(grpc.trace(), TRACE_ID, "{listing}");
        assert!(
            blob_ids.contains(&grpc.parent()),
            "FetchBlob answered under an agent fetch_blob:\n{listing}"
        );
        let inner =
            spans.iter().find(|s| s.service == COORDINATOR && s.name() == "fetch" && s.parent() == grpc.id());
        assert!(inner.is_some(), "the registry's fetch span is inside the request span:\n{listing}");
    }

    // Summary reports: the agent's report span → the coordinator's request → ingestion.
    assert!(
        summary_report_traced(&spans),
        "a summary report is traced from the agent into the coordinator:\n{listing}"
    );

    // Inference batches are traced, each its own trace (they belong to no rollout).
    let batch = spans.iter().find(|s| s.service == AGENT && s.name() == "batch").unwrap();
    assert!(batch.parent().is_empty() && batch.trace() != TRACE_ID, "{listing}");
    assert!(batch.attr("records").is_some_and(|n| n.parse::<u64>().unwrap() > 0), "{listing}");
}

/// Coordinator request spans of the gRPC method `path`.
fn grpc_spans(spans: &[Received], path: &str) -> usize {
    spans.iter().filter(|s| s.service == COORDINATOR && s.attr("path").as_deref() == Some(path)).count()
}

/// Whether some summary report is traced from the agent's report span through the
/// coordinator's request span into its ingestion.
fn summary_report_traced(spans: &[Received]) -> bool {
    let by_id: HashMap<String, &Received> = spans.iter().map(|s| (s.id(), s)).collect();
    spans.iter().filter(|s| s.service == COORDINATOR && s.name() == "ingest_summaries").any(|ingest| {
        let Some(request) = by_id.get(&ingest.parent()) else { return false };
        let Some(report) = by_id.get(&request.parent()) else { return false };
        request.attr("path").as_deref() == Some("/llmchain.v1.Fleet/ReportSummaries")
            && report.service == AGENT
            && report.name() == "report_summaries"
            && ingest.trace() == report.trace()
            && ingest.attr("agent_id").as_deref() == Some("edge-1")
    })
}
