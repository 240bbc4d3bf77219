//! The tonic adapter of rollouts: converts wire types to domain types (validating them once),
//! calls [`RolloutsApi`], converts the stored [`Rollout`] back, and maps errors through
//! `ApiError` to `tonic::Status`.

use std::sync::Arc;

use llmchain_proto::{
    ApiError,
    model::{ModelName, RolloutAction, RolloutId, RolloutSpec},
    pb::{self, rollouts_server::RolloutsServer},
};
use tonic::{Request, Response, Status};

use super::{
    Rollout, RolloutState, RolloutsApi, StepState,
    gates::GateResult,
    records::{Event, StepStatus, from_millis},
};
use crate::Error;

/// Largest message rollouts accept: a rollout spec with up to 10,000 agent ids.
pub const MAX_DECODING_MESSAGE_BYTES: usize = 4 << 20;
/// Largest message rollouts send: a listing of rollouts with their histories.
pub const MAX_ENCODING_MESSAGE_BYTES: usize = 16 << 20;

/// The generated server around `rollouts`, with the rollouts' message-size limits set.
pub fn service<R: RolloutsApi>(rollouts: Arc<R>) -> RolloutsServer<RolloutsGrpc<R>> {
    RolloutsServer::new(RolloutsGrpc(rollouts))
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_BYTES)
}

/// Implements the generated `Rollouts` trait on any [`RolloutsApi`].
pub struct RolloutsGrpc<R>(
    /// The rollouts the adapter serves.
    pub Arc<R>,
);

fn status(e: Error) -> Status {
    Status::from(ApiError::from(e))
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    from_millis(ms).into()
}

fn state_to_wire(s: RolloutState) -> pb::RolloutState {
    match s {
        RolloutState::Running => pb::RolloutState::Running,
        RolloutState::Paused => pb::RolloutState::Paused,
        RolloutState::Succeeded => pb::RolloutState::Succeeded,
        RolloutState::RolledBack => pb::RolloutState::RolledBack,
        RolloutState::Aborted => pb::RolloutState::Aborted,
    }
}

fn step_state_to_wire(s: StepState) -> pb::StepState {
    match s {
        StepState::Pending => pb::StepState::Pending,
        StepState::Activating => pb::StepState::Activating,
        StepState::Soaking => pb::StepState::Soaking,
        StepState::Passed => pb::StepState::Passed,
        StepState::Failed => pb::StepState::Failed,
    }
}

fn gate_to_wire(g: GateResult) -> pb::GateResult {
    pb::GateResult {
        name: g.name,
        value: g.value,
        threshold: g.threshold,
        passed: g.passed,
        judged: g.judged,
    }
}

fn step_to_wire(s: StepStatus, spec: Option<pb::RolloutStep>) -> pb::RolloutStepStatus {
    pb::RolloutStepStatus {
        index: s.index,
        step: spec,
        state: step_state_to_wire(s.state) as i32,
        agent_ids: s.agent_ids,
        started_at: s.started_at_ms.map(timestamp),
        finished_at: s.finished_at_ms.map(timestamp),
        gates: s.gates.into_iter().map(gate_to_wire).collect(),
        pending_agent_ids: s.pending_agent_ids,
        soak_started_at: s.soak_started_at_ms.map(timestamp),
    }
}

fn event_to_wire(e: Event) -> pb::RolloutEvent {
    pb::RolloutEvent { at: Some(timestamp(e.at_ms)), message: e.message, coordinator: e.coordinator }
}

/// The wire form of a stored rollout.
pub fn rollout_to_wire(r: Rollout) -> pb::Rollout {
    let steps_spec: Vec<pb::RolloutStep> = r
        .spec
        .steps
        .iter()
        .map(|s| pb::RolloutStep {
            agents: s.agents,
            percent: s.percent,
            soak_seconds: u32::try_from(s.soak_ms / 1000).unwrap_or(u32::MAX),
            soak_ms: u32::try_from(s.soak_ms % 1000).unwrap_or(0),
        })
        .collect();
    let spec = pb::CreateRolloutRequest {
        target: Some(pb::ModelRef { model: r.spec.target.model.clone(), version: r.spec.target.version }),
        agent_ids: r.spec.agent_ids,
        selector: r.spec.selector,
        steps: steps_spec.clone(),
        gates: Some(r.spec.gates.into()),
        prefetch: r.spec.prefetch,
        probe: Vec::new(),
        paused: r.spec.paused,
    };
    pb::Rollout {
        id: r.id,
        spec: Some(spec),
        state: state_to_wire(r.state) as i32,
        current_step: r.current_step,
        steps: r
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| step_to_wire(s, steps_spec.get(i).cloned()))
            .collect(),
        previous: r
            .previous
            .into_iter()
            .map(|(agent_id, version)| pb::AgentVersion { agent_id, version })
            .collect(),
        history: r.history.into_iter().map(event_to_wire).collect(),
        created_at: Some(timestamp(r.created_at_ms)),
    }
}

#[tonic::async_trait]
impl<R: RolloutsApi> pb::rollouts_server::Rollouts for RolloutsGrpc<R> {
    async fn create_rollout(
        &self,
        request: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let spec = RolloutSpec::try_from(request.into_inner())?;
        let rollout = self.0.create(spec).await.map_err(status)?;
        Ok(Response::new(rollout_to_wire(rollout)))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let id = RolloutId::parse("id", &request.get_ref().id)?;
        let rollout = self.0.get(&id).await.map_err(status)?;
        Ok(Response::new(rollout_to_wire(rollout)))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        let model = &request.get_ref().model;
        let model = (!model.is_empty()).then(|| ModelName::parse("model", model)).transpose()?;
        let rollouts = self.0.list(model.as_ref()).await.map_err(status)?;
        Ok(Response::new(pb::ListRolloutsResponse {
            rollouts: rollouts.into_iter().map(rollout_to_wire).collect(),
        }))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutAction>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let action = RolloutAction::try_from(request.into_inner())?;
        let rollout = self.0.pause(action).await.map_err(status)?;
        Ok(Response::new(rollout_to_wire(rollout)))
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutAction>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let action = RolloutAction::try_from(request.into_inner())?;
        let rollout = self.0.resume(action).await.map_err(status)?;
        Ok(Response::new(rollout_to_wire(rollout)))
    }

    async fn rollback_rollout(
        &self,
        request: Request<pb::RolloutAction>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let action = RolloutAction::try_from(request.into_inner())?;
        let rollout = self.0.rollback(action).await.map_err(status)?;
        Ok(Response::new(rollout_to_wire(rollout)))
    }
}
