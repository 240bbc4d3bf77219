//! Rollouts: moving selected agents to a model version in steps, with health gates, automatic
//! rollback, pre-fetch, and operator pause / resume / rollback.
//!
//! [`RolloutsApi`] is the service over domain types; [`Rollouts`] implements it on a
//! [`Store`] (layout in [`records`]), [`grpc::RolloutsGrpc`] adapts it to tonic, and
//! [`controller::Controller`] runs the state machine on the one coordinator that wins the
//! leader election. Any coordinator serves the API: operator actions are compare-and-swaps on
//! the rollout's key that the leader's controller then acts on.
//!
//! State machine (persisted in `rollouts/<id>`, one compare-and-swap per transition, each
//! transition recorded once in the history):
//!
//! ```text
//! rollout: Running ──pause──▶ Paused ──resume──▶ Running
//!          Running ──every step passed──▶ Succeeded
//!          Running ──a gate failed──▶ RolledBack   (rollback assignments, automatic)
//!          Running | Paused | Succeeded ──operator rollback──▶ Aborted (rollback assignments)
//! step:    Pending ──assignments stored──▶ Activating ──every agent settled──▶ Soaking
//!          Soaking ──soak elapsed, every enabled gate judged and holding──▶ Passed (next step)
//!          Activating | Soaking ──a judged gate failed──▶ Failed
//! ```
//!
//! Rules:
//! - The agents are chosen when the rollout is created (explicit ids, or the known agents
//!   matching the selector), sorted by id, and split into steps then; each agent's previous
//!   version (the one it reported running, if of the same model) is kept for rollback.
//! - An agent *settles* in its step when it runs the target (reported by a heartbeat or an
//!   `ACTIVATED` result) or answered this rollout with a failure (which the load gate counts).
//!   An offline agent stays pending: its assignment waits in the store and reaches it when it
//!   reconnects, and its step does not soak before it settled. There is no timeout; an
//!   operator who does not want to wait rolls back or pauses.
//! - Gates ([`gates`]) are evaluated over every agent moved so far, in Activating and
//!   Soaking; while paused nothing is evaluated, and resuming restarts a soak.
//! - A rollback (automatic or by an operator) sends every agent whose step started an
//!   assignment with `rollback=true` to its previous version (or the rollout's baseline);
//!   agents that only pre-fetched keep running what they ran.

pub mod controller;
pub mod gates;
pub mod grpc;
pub mod records;

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use llmchain_proto::{
    ApiError,
    model::{AgentId, LabelSelector, ModelName, RolloutAction, RolloutId, RolloutSpec, Targets},
};
use tracing::info;

pub use controller::{Controller, ControllerConfig};
pub use grpc::{RolloutsGrpc, service};
use records::{ROLLOUTS_PREFIX, SpecRecord, StepStatus, millis, rollout_key, split_steps};
pub use records::{Rollout, RolloutState, StepState};

use crate::{
    Result,
    fleet::{self, fresh_id},
    metrics::Metrics,
    registry::records::version_key,
    store::{Compare, Op, Store, Txn},
};

/// Attempts of an operator action's compare-and-swap before it is refused as contended.
const UPDATE_ATTEMPTS: usize = 16;

/// Rollouts as a service over domain types.
#[async_trait::async_trait]
pub trait RolloutsApi: Send + Sync + 'static {
    /// Creates a rollout; it runs at once unless created paused.
    async fn create(&self, spec: RolloutSpec) -> Result<Rollout>;
    /// One rollout.
    async fn get(&self, id: &RolloutId) -> Result<Rollout>;
    /// Rollouts (of `model` only, when given), newest first.
    async fn list(&self, model: Option<&ModelName>) -> Result<Vec<Rollout>>;
    /// Pauses a running rollout (a paused one stays paused).
    async fn pause(&self, action: RolloutAction) -> Result<Rollout>;
    /// Resumes a paused rollout (a running one keeps running).
    async fn resume(&self, action: RolloutAction) -> Result<Rollout>;
    /// Stops a rollout and moves its updated agents back to their previous versions.
    async fn rollback(&self, action: RolloutAction) -> Result<Rollout>;
}

/// Rollouts on a [`Store`].
pub struct Rollouts {
    store: Arc<dyn Store>,
    coordinator: String,
    metrics: Arc<Metrics>,
}

impl Rollouts {
    /// Rollouts over `store`; `coordinator` names this coordinator in rollout histories.
    pub fn new(store: Arc<dyn Store>, coordinator: impl Into<String>) -> Self {
        Rollouts { store, coordinator: coordinator.into(), metrics: Arc::default() }
    }

    /// Counts the operator actions that succeed in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Applies `change` to the stored rollout with a compare-and-swap, retrying on races.
    /// `change` returns whether it changed anything; nothing is written when it did not.
    async fn update(
        &self,
        id: &RolloutId,
        change: impl Fn(&mut Rollout) -> Result<bool> + Send + Sync,
    ) -> Result<Rollout> {
        let key = rollout_key(id);
        for _ in 0..UPDATE_ATTEMPTS {
            let kv =
                self.store.get(&key).await?.ok_or_else(|| ApiError::NotFound(format!("rollout {id}")))?;
            let mut rollout = Rollout::decode(&key, &kv.value)?;
            if !change(&mut rollout)? {
                return Ok(rollout);
            }
            let txn = Txn::new()
                .when([Compare::ModRevision(key.clone(), kv.mod_revision)])
                .and_then([Op::put(key.clone(), rollout.encode())]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(rollout);
            }
        }
        Err(ApiError::Unavailable(format!("rollout {id} is contended; retry")).into())
    }
}

fn refuse(rollout: &Rollout, action: &str) -> crate::Error {
    ApiError::FailedPrecondition(format!(
        "rollout {} is {}; cannot {action} it",
        rollout.id,
        rollout.state.as_str()
    ))
    .into()
}

fn with_reason(what: &str, reason: &str) -> String {
    if reason.is_empty() { what.to_string() } else { format!("{what}: {reason}") }
}

#[async_trait::async_trait]
impl RolloutsApi for Rollouts {
    async fn create(&self, spec: RolloutSpec) -> Result<Rollout> {
        if spec.gates.min_probe_accuracy > 0.0 {
            return Err(ApiError::invalid(
                "gates.min_probe_accuracy",
                "probe sets are not implemented yet (agents cannot score them); leave it 0",
            )
            .into());
        }
        if !spec.probe.is_empty() {
            return Err(
                ApiError::invalid("probe", "probe sets are not implemented yet; leave it empty").into()
            );
        }
        let target = &spec.target;
        if self.store.get(&version_key(&target.model, target.version)).await?.is_none() {
            return Err(
                ApiError::NotFound(format!("version {} of model {}", target.version, target.model)).into()
            );
        }
        for other in self.list(Some(&target.model)).await? {
            if matches!(other.state, RolloutState::Running | RolloutState::Paused) || other.rollback_pending {
                return Err(ApiError::FailedPrecondition(format!(
                    "rollout {} of model {} is still active; pause is not enough, roll it back or let it finish",
                    other.id, target.model
                ))
                .into());
            }
        }

        let known = fleet::list_agents(self.store.as_ref(), &LabelSelector::default()).await?;
        let known: BTreeMap<AgentId, fleet::AgentInfo> =
            known.into_iter().map(|a| (a.state.agent_id.clone(), a)).collect();
        let selected: Vec<AgentId> = match &spec.targets {
            Targets::Agents(ids) => {
                let unknown: Vec<String> =
                    ids.iter().filter(|id| !known.contains_key(*id)).map(ToString::to_string).collect();
                if !unknown.is_empty() {
                    return Err(ApiError::NotFound(format!("agents {}", unknown.join(", "))).into());
                }
                let mut ids = ids.clone();
                ids.sort();
                ids.dedup();
                ids
            }
            Targets::Selector(selector) => known
                .values()
                .filter(|a| selector.matches(&a.state.labels))
                .map(|a| a.state.agent_id.clone())
                .collect(),
        };
        if selected.is_empty() {
            return Err(ApiError::FailedPrecondition(
                "no known agent matches the rollout's agents or selector".into(),
            )
            .into());
        }

        // What each agent runs now, if it is another version of the target's model.
        let previous: Vec<(String, u64)> = selected
            .iter()
            .filter_map(|id| {
                let running = known.get(id)?.state.status.running.as_ref()?;
                (running.model == target.model && running.version != target.version)
                    .then(|| (id.to_string(), running.version))
            })
            .collect();
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, v) in &previous {
            *counts.entry(*v).or_default() += 1;
        }
        // The most common previous version; the newest among equals.
        let baseline = counts.iter().max_by_key(|(v, n)| (**n, **v)).map(|(v, _)| *v);

        let steps = split_steps(&spec, &selected)
            .into_iter()
            .enumerate()
            .map(|(i, agent_ids)| StepStatus {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                state: StepState::Pending,
                agent_ids,
                assignments_written: false,
                pending_agent_ids: Vec::new(),
                started_at_ms: None,
                soak_started_at_ms: None,
                finished_at_ms: None,
                gates: Vec::new(),
            })
            .collect::<Vec<_>>();
        let id = RolloutId::parse("id", &fresh_id())?;
        let (traceparent, tracestate) = llmchain_runtime::telemetry::current_w3c().unwrap_or_default();
        let mut rollout = Rollout {
            id: id.to_string(),
            spec: SpecRecord::from(&spec),
            state: if spec.paused { RolloutState::Paused } else { RolloutState::Running },
            current_step: 0,
            previous,
            baseline,
            rollback_pending: false,
            history: Vec::new(),
            created_at_ms: millis(SystemTime::now()),
            steps,
            traceparent,
            tracestate,
            rollback_statement: String::new(),
        };
        rollout.record(
            &self.coordinator,
            format!(
                "created{}: {} on {} agents in {} steps",
                if spec.paused { " paused" } else { "" },
                spec.target,
                selected.len(),
                rollout.steps.len()
            ),
        );
        let key = rollout_key(&id);
        let txn = Txn::new().when([Compare::absent(key.clone())]).and_then([Op::put(key, rollout.encode())]);
        if !self.store.txn(txn).await?.succeeded {
            return Err(ApiError::AlreadyExists(format!("rollout {id}")).into());
        }
        info!(rollout_id = %id, target = %spec.target, agents = selected.len(), steps = rollout.steps.len(), "rollout created");
        self.metrics.rollout_action("create");
        Ok(rollout)
    }

    async fn get(&self, id: &RolloutId) -> Result<Rollout> {
        let key = rollout_key(id);
        let kv = self.store.get(&key).await?.ok_or_else(|| ApiError::NotFound(format!("rollout {id}")))?;
        Rollout::decode(&key, &kv.value)
    }

    async fn list(&self, model: Option<&ModelName>) -> Result<Vec<Rollout>> {
        let mut out = Vec::new();
        for kv in self.store.list(ROLLOUTS_PREFIX).await?.kvs {
            let rollout = Rollout::decode(&kv.key, &kv.value)?;
            if model.is_none_or(|m| m.as_str() == rollout.spec.target.model) {
                out.push(rollout);
            }
        }
        out.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn pause(&self, action: RolloutAction) -> Result<Rollout> {
        let rollout = self
            .update(&action.id, |r| match r.state {
                RolloutState::Paused => Ok(false),
                RolloutState::Running => {
                    r.state = RolloutState::Paused;
                    r.record(&self.coordinator, with_reason("paused", &action.reason));
                    Ok(true)
                }
                _ => Err(refuse(r, "pause")),
            })
            .await?;
        info!(rollout_id = %action.id, reason = %action.reason, "rollout paused");
        self.metrics.rollout_action("pause");
        Ok(rollout)
    }

    async fn resume(&self, action: RolloutAction) -> Result<Rollout> {
        let rollout = self
            .update(&action.id, |r| match r.state {
                RolloutState::Running => Ok(false),
                RolloutState::Paused => {
                    r.state = RolloutState::Running;
                    // Gates were not watched while paused: the soak starts over.
                    if let Some(step) = r.steps.get_mut(r.current_step as usize)
                        && step.state == StepState::Soaking
                    {
                        step.soak_started_at_ms = Some(millis(SystemTime::now()));
                    }
                    r.record(&self.coordinator, with_reason("resumed", &action.reason));
                    Ok(true)
                }
                _ => Err(refuse(r, "resume")),
            })
            .await?;
        info!(rollout_id = %action.id, reason = %action.reason, "rollout resumed");
        self.metrics.rollout_action("resume");
        Ok(rollout)
    }

    async fn rollback(&self, action: RolloutAction) -> Result<Rollout> {
        let statement = action.rollback_statement.clone().map(|s| {
            hex::encode(prost::Message::encode_to_vec(&llmchain_proto::pb::SignedStatement::from(s)))
        });
        let rollout = self
            .update(&action.id, |r| match r.state {
                // Agents refuse a downgrade without a signed statement: one given after the
                // rollback sends the rollback assignments again, with it.
                RolloutState::RolledBack | RolloutState::Aborted if statement.is_some() => {
                    r.rollback_statement = statement.clone().unwrap_or_default();
                    r.rollback_pending = true;
                    r.record(
                        &self.coordinator,
                        with_reason("rollback re-sent with a signed rollback statement", &action.reason),
                    );
                    Ok(true)
                }
                RolloutState::Running | RolloutState::Paused | RolloutState::Succeeded => {
                    r.state = RolloutState::Aborted;
                    r.rollback_statement = statement.clone().unwrap_or_default();
                    r.rollback_pending = true;
                    r.record(
                        &self.coordinator,
                        with_reason("rollback requested by an operator", &action.reason),
                    );
                    Ok(true)
                }
                RolloutState::RolledBack | RolloutState::Aborted => Err(refuse(r, "roll back")),
            })
            .await?;
        info!(rollout_id = %action.id, reason = %action.reason, "rollout rollback requested");
        self.metrics.rollout_action("rollback");
        Ok(rollout)
    }
}
