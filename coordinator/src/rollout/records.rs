//! How rollouts lay out their state in the [`Store`](crate::store::Store).
//!
//! - `rollouts/<id>`: one [`Rollout`] as JSON (readable with `etcdctl get`): the spec, the
//!   agents it selected when it was created (frozen, sorted) split into steps, each agent's
//!   previous version, the state, per-step status with gate results, and the event history.
//!   Every change is a compare-and-swap on the key's `mod_revision`, so two writers (the
//!   controller on the leader, an operator's RPC on any coordinator, a deposed leader that
//!   has not noticed yet) never both apply a transition.
//! - `election/rollout-controller`: the leader election key (see
//!   [`crate::store::election`]); its value is the leading coordinator's id.
//!
//! Assignments a rollout writes live in the fleet's `fleet/assignments/<agent>`; their ids
//! are derived from the rollout id, the step and the agent ([`activate_id`],
//! [`prefetch_id`], [`rollback_id`]), so writing one again after a crash is harmless.

use std::time::{Duration, SystemTime};

use llmchain_proto::model::{AgentId, ModelName, ModelRef, RolloutId, RolloutSpec, StepSize, Targets};
use serde::{Deserialize, Serialize};

use super::gates::{GateResult, Gates};
use crate::{Error, Result, fleet::records::ModelRecord};

/// Prefix of the rollout records.
pub const ROLLOUTS_PREFIX: &str = "rollouts/";
/// Key of the rollout controller's leader election.
pub const ELECTION_KEY: &str = "election/rollout-controller";

/// Key of one rollout.
pub fn rollout_key(id: &RolloutId) -> String {
    format!("{ROLLOUTS_PREFIX}{id}")
}

/// Id of the assignment that activates the target on `agent` in step `step`.
pub fn activate_id(rollout: &str, step: usize, agent: &str) -> String {
    format!("{rollout}.s{step}.activate:{agent}")
}

/// Id of the assignment that pre-fetches the target on `agent` ahead of step `step`.
pub fn prefetch_id(rollout: &str, step: usize, agent: &str) -> String {
    format!("{rollout}.s{step}.prefetch:{agent}")
}

/// Id of the assignment that moves `agent` back to its previous version.
pub fn rollback_id(rollout: &str, agent: &str) -> String {
    format!("{rollout}.rollback:{agent}")
}

/// Whether an assignment id belongs to `rollout` (and is not its rollback).
pub fn is_forward_assignment(rollout: &str, assignment_id: &str) -> bool {
    assignment_id.strip_prefix(rollout).is_some_and(|rest| rest.starts_with(".s"))
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("corrupt rollout record {key}: {e}"))
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis())
        .unwrap_or(u64::MAX)
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// State of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Moving through its steps.
    Running,
    /// Paused by an operator; nothing moves.
    Paused,
    /// Every step passed.
    Succeeded,
    /// A gate failed; the updated agents are (being) moved back.
    RolledBack,
    /// An operator rolled it back.
    Aborted,
}

impl RolloutState {
    /// Lowercase name, as the record and messages write it.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }
}

/// State of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not started.
    Pending,
    /// Its assignments are out; waiting for its agents to activate the target.
    Activating,
    /// Every agent of the step settled; gates are watched for the soak time.
    Soaking,
    /// Gates held for the soak time.
    Passed,
    /// A gate failed.
    Failed,
}

/// A step as requested: an absolute agent count or a percentage, and its soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Agents after the step when > 0 ...
    pub agents: u32,
    /// ... otherwise a percentage of the selected agents.
    pub percent: u32,
    /// Soak time in milliseconds.
    pub soak_ms: u64,
}

/// The request a rollout was created from, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecRecord {
    /// Target version.
    pub target: ModelRecord,
    /// Agents named explicitly (empty when a selector chose).
    pub agent_ids: Vec<String>,
    /// Label selector `k=v,…` (empty with agent ids, or to select every agent).
    pub selector: String,
    /// Steps in order.
    pub steps: Vec<StepSpec>,
    /// Gate thresholds.
    pub gates: Gates,
    /// Whether agents pre-fetch ahead of their step.
    pub prefetch: bool,
    /// Whether it was created paused.
    pub paused: bool,
}

impl From<&RolloutSpec> for SpecRecord {
    fn from(s: &RolloutSpec) -> Self {
        let (agent_ids, selector) = match &s.targets {
            Targets::Agents(ids) => (ids.iter().map(ToString::to_string).collect(), String::new()),
            Targets::Selector(sel) => (Vec::new(), sel.to_string()),
        };
        SpecRecord {
            target: (&s.target).into(),
            agent_ids,
            selector,
            steps: s
                .steps
                .iter()
                .map(|st| {
                    let (agents, percent) = match st.size {
                        StepSize::Agents(n) => (n, 0),
                        StepSize::Percent(p) => (0, p),
                    };
                    StepSpec {
                        agents,
                        percent,
                        soak_ms: u64::try_from(st.soak().as_millis()).unwrap_or(u64::MAX),
                    }
                })
                .collect(),
            gates: Gates::from(&s.gates),
            prefetch: s.prefetch,
            paused: s.paused,
        }
    }
}

/// Progress of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepStatus {
    /// Step index from 0.
    pub index: u32,
    /// State.
    pub state: StepState,
    /// Agents this step moves to the target (those of earlier steps not repeated).
    pub agent_ids: Vec<String>,
    /// Whether this step's assignments (and the next step's pre-fetches) are stored.
    pub assignments_written: bool,
    /// Agents of the step that have not settled yet (neither activated nor failed).
    pub pending_agent_ids: Vec<String>,
    /// When it started activating, ms since the epoch.
    pub started_at_ms: Option<u64>,
    /// When its soak began, ms since the epoch.
    pub soak_started_at_ms: Option<u64>,
    /// When it passed or failed, ms since the epoch.
    pub finished_at_ms: Option<u64>,
    /// Latest gate evaluation.
    pub gates: Vec<GateResult>,
}

/// One entry of a rollout's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// What happened, e.g. `step 1 passed`.
    pub message: String,
    /// Coordinator that recorded it.
    pub coordinator: String,
}

/// A rollout: its spec and its whole persisted state machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Identifier.
    pub id: String,
    /// The request it was created from.
    pub spec: SpecRecord,
    /// State.
    pub state: RolloutState,
    /// Index of the current step.
    pub current_step: u32,
    /// Every step.
    pub steps: Vec<StepStatus>,
    /// Version each selected agent ran before the rollout (agent id, version); agents without
    /// one are rolled back to `baseline` when there is one.
    pub previous: Vec<(String, u64)>,
    /// The version most selected agents ran before (the drift gate's reference).
    pub baseline: Option<u64>,
    /// True from a rollback decision until every rollback assignment is stored.
    pub rollback_pending: bool,
    /// History, oldest first.
    pub history: Vec<Event>,
    /// Creation time, ms since the epoch.
    pub created_at_ms: u64,
    /// W3C `traceparent` of the call that created it: every step's span is its child, so the
    /// whole rollout, agents' fetches and swaps included, is one trace. Empty when untraced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
    /// W3C `tracestate` going with `traceparent`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tracestate: String,
    /// A trainer-signed rollback statement from the operator's rollback (hex of its protobuf
    /// encoding), relayed with the rollback assignments whose target it names; empty if none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rollback_statement: String,
}

impl Rollout {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("rollout records are plain data and always serialise")
    }

    /// Decodes the record stored under `key`.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))
    }

    /// The target version.
    pub fn target(&self) -> Result<ModelRef> {
        let model = ModelName::parse("model", &self.spec.target.model).map_err(|e| corrupt(&self.id, e))?;
        Ok(ModelRef { model, version: self.spec.target.version })
    }

    /// Appends an event to the history.
    pub fn record(&mut self, coordinator: &str, message: impl Into<String>) {
        self.history.push(Event {
            at_ms: millis(SystemTime::now()),
            message: message.into(),
            coordinator: coordinator.to_string(),
        });
    }

    /// The version `agent` goes back to on rollback: the one it ran before, else the baseline.
    pub fn previous_of(&self, agent: &str) -> Option<u64> {
        self.previous.iter().find(|(a, _)| a == agent).map(|(_, v)| *v).or(self.baseline)
    }

    /// Agents that steps up to and including `step` move to the target.
    pub fn agents_through(&self, step: usize) -> impl Iterator<Item = &String> {
        self.steps.iter().take(step + 1).flat_map(|s| s.agent_ids.iter())
    }

    /// Agents whose step started: the ones a rollback moves back.
    pub fn updated_agents(&self) -> impl Iterator<Item = &String> {
        self.steps.iter().filter(|s| s.state != StepState::Pending).flat_map(|s| s.agent_ids.iter())
    }
}

/// Splits `selected` (sorted) into the agents each step adds: step `i` covers the first
/// [`Step::covered`](llmchain_proto::model::Step::covered) agents, never fewer than step `i-1`.
pub fn split_steps(spec: &RolloutSpec, selected: &[AgentId]) -> Vec<Vec<String>> {
    let mut done = 0usize;
    spec.steps
        .iter()
        .map(|step| {
            let upto = step.covered(selected.len()).max(done);
            let agents = selected[done..upto].iter().map(ToString::to_string).collect();
            done = upto;
            agents
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use llmchain_proto::{model::RolloutSpec, pb};

    use super::*;

    fn spec(steps: &[(u32, u32)]) -> RolloutSpec {
        RolloutSpec::try_from(pb::CreateRolloutRequest {
            target: Some(pb::ModelRef { model: "smol".into(), version: 2 }),
            steps: steps
                .iter()
                .map(|&(agents, percent)| pb::RolloutStep { agents, percent, soak_seconds: 0, soak_ms: 300 })
                .collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn agents(n: usize) -> Vec<AgentId> {
        (0..n).map(|i| AgentId::parse("a", &format!("edge-{i}")).unwrap()).collect()
    }

    #[test]
    fn steps_split_the_selected_agents_cumulatively() {
        let split = split_steps(&spec(&[(1, 0), (0, 50), (0, 100)]), &agents(5));
        assert_eq!(split, [vec!["edge-0"], vec!["edge-1", "edge-2"], vec!["edge-3", "edge-4"]]);
        // A step smaller than the one before adds nobody; counts beyond the fleet are capped.
        let split = split_steps(&spec(&[(3, 0), (0, 10), (9, 0), (0, 100)]), &agents(4));
        assert_eq!(split.iter().map(Vec::len).collect::<Vec<_>>(), [3, 0, 1, 0]);
    }

    #[test]
    fn assignment_ids_name_rollout_step_and_agent() {
        assert_eq!(activate_id("r1", 0, "edge-1"), "r1.s0.activate:edge-1");
        assert!(is_forward_assignment("r1", &activate_id("r1", 3, "a")));
        assert!(is_forward_assignment("r1", &prefetch_id("r1", 1, "a")));
        assert!(!is_forward_assignment("r1", &rollback_id("r1", "a")));
        assert!(!is_forward_assignment("r1", &activate_id("r10", 0, "a")));
        assert!(!is_forward_assignment("r1", "other:a"));
    }
}
