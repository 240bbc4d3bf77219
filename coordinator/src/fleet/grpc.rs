//! The tonic adapter of the fleet: converts wire types to domain types (validating them once),
//! calls [`FleetApi`], and maps errors through `ApiError` to `tonic::Status`.
//!
//! `Enroll` and `CreateBootstrapToken` call [`crate::pki::Enrollment`] (bootstrap tokens and
//! the CA); `RevokeAgent` records the revocation through [`crate::auth::Caller`]. The caller's
//! own checks (an agent opens only its own session and reports only its own summaries) are
//! made here, on the validated request, with the [`Caller`] the authorization layer attached.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use llmchain_proto::{
    ApiError,
    model::{
        AgentMessage, AssignSpec, Label, LabelSelector, ModelName, SummaryQuery, SummaryReport, TraceContext,
    },
    pb::{self, fleet_server::FleetServer},
};
use tonic::{Request, Response, Status, Streaming};

use super::{AgentInfo, CoordinatorMessage, FleetApi, VersionStats, records::AggregateRecord};
use crate::{
    Error,
    auth::{Caller, Role, revocation},
    pki::Enrollment,
};

/// Largest message the fleet accepts or sends: a full summary report with hard examples.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The generated server around `fleet`, with the fleet's message-size limits set; without a
/// CA, so `Enroll` and `CreateBootstrapToken` answer `FAILED_PRECONDITION`.
pub fn service<F: FleetApi>(fleet: Arc<F>) -> FleetServer<FleetGrpc<F>> {
    service_with_enrollment(fleet, None)
}

/// Like [`service`], enrolling identities and creating bootstrap tokens with `enrollment`.
pub fn service_with_enrollment<F: FleetApi>(
    fleet: Arc<F>,
    enrollment: impl Into<Option<Arc<Enrollment>>>,
) -> FleetServer<FleetGrpc<F>> {
    FleetServer::new(FleetGrpc(fleet, enrollment.into()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Implements the generated `Fleet` trait on any [`FleetApi`].
pub struct FleetGrpc<F>(
    /// The fleet the adapter serves.
    pub Arc<F>,
    /// Bootstrap tokens and certificate issuance (`Enroll`, `CreateBootstrapToken`).
    pub Option<Arc<Enrollment>>,
);

impl<F> FleetGrpc<F> {
    fn enrollment(&self) -> Result<&Enrollment, Status> {
        self.1.as_deref().ok_or_else(|| {
            ApiError::FailedPrecondition("this coordinator has no CA: enrollment is not configured".into())
                .into()
        })
    }
}

fn status(e: Error) -> Status {
    Status::from(ApiError::from(e))
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn to_wire(m: CoordinatorMessage) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Kind;
    let kind = match m {
        CoordinatorMessage::Welcome(w) => Kind::Welcome(pb::Welcome {
            session_id: w.session_id,
            heartbeat_interval_ms: millis(w.heartbeat_interval),
            lease_ttl_ms: millis(w.lease_ttl),
        }),
        CoordinatorMessage::Assignment(a) => Kind::Assignment(a.into()),
    };
    pb::CoordinatorMessage { kind: Some(kind) }
}

fn agent_to_wire(a: AgentInfo, revoked: bool) -> pb::AgentInfo {
    pb::AgentInfo {
        agent_id: a.state.agent_id.to_string(),
        labels: a.state.labels.into_iter().map(Into::into).collect(),
        online: a.online,
        last_heartbeat: Some(a.state.last_heartbeat.into()),
        status: Some(a.state.status.into()),
        bytes_saved: a.traffic.bytes_saved(),
        revoked,
    }
}

fn decisions(a: &AggregateRecord) -> Vec<pb::LabelCount> {
    a.decisions.iter().map(|(label, count)| pb::LabelCount { label: label.clone(), count: *count }).collect()
}

fn version_to_wire(v: VersionStats) -> pb::VersionStats {
    let a = &v.aggregate;
    pb::VersionStats {
        model: Some(v.model.into()),
        summaries: a.summaries,
        records: a.records,
        bad_records: a.bad_records,
        raw_bytes: a.raw_bytes,
        summary_bytes: a.summary_bytes,
        bytes_saved: a.raw_bytes.saturating_sub(a.summary_bytes),
        decisions: decisions(a),
    }
}

/// The caller's trace context (the server span is its child), to travel inside assignments.
fn current_trace() -> Option<TraceContext> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    llmchain_runtime::telemetry::inject_context(&mut metadata);
    let get = |k: &str| metadata.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    get("traceparent")
        .map(|traceparent| TraceContext { traceparent, tracestate: get("tracestate").unwrap_or_default() })
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;
type SummaryStream = Pin<Box<dyn Stream<Item = Result<pb::Summary, Status>> + Send>>;

#[tonic::async_trait]
impl<F: FleetApi> pb::fleet_server::Fleet for FleetGrpc<F> {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let request = request.into_inner();
        if request.labels.len() > 64 {
            return Err(ApiError::invalid("labels", "at most 64").into());
        }
        for label in request.labels {
            Label::try_from(label).map_err(|e| e.within("labels"))?;
        }
        let issued = self
            .enrollment()?
            .enroll(&request.bootstrap_token, &request.name, &request.csr_pem)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::EnrollResponse {
            name: issued.identity.name.clone(),
            role: pb::Role::from(issued.identity.role).into(),
            certificate_pem: issued.cert_pem,
            ca_pem: issued.ca_pem,
            trainer_keys: issued
                .trainer_keys
                .iter()
                .map(|k| pb::TrustedKey { key_id: k.key_id(), public_key: k.to_bytes().to_vec() })
                .collect(),
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| ApiError::invalid("hello", "a session starts with a hello message"))?;
        let hello = match AgentMessage::try_from(first)? {
            // An agent may only open its own session.
            AgentMessage::Hello(hello) => {
                caller.require_agent(&hello.agent_id).map_err(status)?;
                hello
            }
            _ => {
                return Err(
                    ApiError::invalid("hello", "the first message of a session must be a hello").into()
                );
            }
        };
        let rest = inbound
            .map(|m| match m {
                Ok(m) => AgentMessage::try_from(m).map_err(Error::Api),
                Err(s) => Err(Error::Api(ApiError::from(s))),
            })
            .boxed();
        let out = self.0.session(hello, rest).await.map_err(status)?;
        Ok(Response::new(Box::pin(out.map(|m| m.map(to_wire).map_err(status)))))
    }

    async fn report_summaries(
        &self,
        request: Request<pb::ReportSummariesRequest>,
    ) -> Result<Response<pb::ReportSummariesResponse>, Status> {
        let caller = Caller::of(&request);
        let report = SummaryReport::try_from(request.into_inner())?;
        caller.require_agent(&report.agent_id).map_err(status)?;
        let acked = self.0.report_summaries(report).await.map_err(status)?;
        Ok(Response::new(pb::ReportSummariesResponse { acked }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = Caller::of(&request);
        let selector = LabelSelector::parse("selector", &request.get_ref().selector)?;
        let agents = self.0.list_agents(&selector).await.map_err(status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|a| {
                    let revoked = caller.is_revoked(a.state.agent_id.as_str());
                    agent_to_wire(a, revoked)
                })
                .collect(),
        }))
    }

    async fn list_summaries(
        &self,
        request: Request<pb::ListSummariesRequest>,
    ) -> Result<Response<pb::ListSummariesResponse>, Status> {
        let query = SummaryQuery::try_from(request.into_inner())?;
        let summaries = self.0.list_summaries(query).await.map_err(status)?;
        Ok(Response::new(pb::ListSummariesResponse {
            summaries: summaries.into_iter().map(Into::into).collect(),
        }))
    }

    type WatchSummariesStream = SummaryStream;

    async fn watch_summaries(
        &self,
        request: Request<pb::ListSummariesRequest>,
    ) -> Result<Response<Self::WatchSummariesStream>, Status> {
        let query = SummaryQuery::try_from(request.into_inner())?;
        let stream = self.0.watch_summaries(query).await.map_err(status)?;
        Ok(Response::new(Box::pin(stream.map(|s| s.map(Into::into).map_err(status)))))
    }

    async fn create_bootstrap_token(
        &self,
        request: Request<pb::CreateBootstrapTokenRequest>,
    ) -> Result<Response<pb::CreateBootstrapTokenResponse>, Status> {
        let request = request.into_inner();
        let role = pb::Role::try_from(request.role)
            .map_err(|_| ApiError::invalid("role", "must be agent, trainer or operator"))
            .and_then(Role::try_from)?;
        let ttl = Duration::from_secs(request.ttl_seconds.into());
        let (token, expires) =
            self.enrollment()?.create_token(role, Some(&request.name), ttl).await.map_err(status)?;
        Ok(Response::new(pb::CreateBootstrapTokenResponse { token, expires_at: Some(expires.into()) }))
    }

    async fn revoke_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let caller = Caller::of(&request);
        let (agent, reason) = revocation::parse_request(request.into_inner())?;
        caller.revoke(&agent, &reason).await.map_err(status)?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        let spec = AssignSpec::try_from(request.into_inner())?;
        let agents = self.0.assign(spec, current_trace()).await.map_err(status)?;
        Ok(Response::new(pb::AssignResponse { agent_ids: agents.iter().map(ToString::to_string).collect() }))
    }

    async fn get_fleet_stats(
        &self,
        request: Request<pb::GetFleetStatsRequest>,
    ) -> Result<Response<pb::FleetStats>, Status> {
        let model = &request.get_ref().model;
        let model = (!model.is_empty()).then(|| ModelName::parse("model", model)).transpose()?;
        let stats = self.0.stats(model).await.map_err(status)?;
        let t = &stats.totals;
        Ok(Response::new(pb::FleetStats {
            agents: stats.agents,
            online_agents: stats.online_agents,
            summaries: t.summaries,
            raw_bytes: t.raw_bytes,
            summary_bytes: t.summary_bytes,
            bytes_saved: t.raw_bytes.saturating_sub(t.summary_bytes),
            versions: stats.versions.into_iter().map(version_to_wire).collect(),
        }))
    }
}
