//! How the fleet lays out its state in the [`Store`](crate::store::Store).
//!
//! - `fleet/agents/<id>`: an [`AgentRecord`] (labels, last status, last heartbeat, last
//!   assignment result), written only by the agent's session.
//! - `fleet/online/<id>`: the id of the agent's current session, attached to that session's
//!   lease. It exists exactly while a session heartbeats; a newer session for the same agent
//!   overwrites it, which tells the older one (watching the key) to end.
//! - `fleet/assignments/<id>`: the agent's desired [`AssignmentRecord`]. Written by `Assign`
//!   and (later) the rollout controller through [`super::write_assignment`]; each session
//!   watches its agent's key.
//! - `fleet/rules/<selector>`: a [`RuleRecord`] per distinct selector given to `Assign`, so an
//!   agent that matches when it next connects gets the assignment too. A newer rule wins over
//!   an older assignment; the key's create revision orders them.
//! - `fleet/summaries/<id>/<seq, 20 digits>`: one summary as its protobuf encoding (the API's
//!   own message, so its stored size is exactly what the summary costs on the wire).
//! - `fleet/aggregates/<model>/<version, 20 digits>`: an [`AggregateRecord`] per version.
//! - `fleet/traffic/<id>`: a [`TrafficRecord`] per agent (raw and summary bytes). Kept apart
//!   from the agent record so summary reports never contend with heartbeats.
//!
//! The summary, its version's aggregate and its agent's traffic change in one transaction, so
//! the counters always equal the sums over the stored summaries. Records other than summaries
//! are JSON, so an operator can read them with `etcdctl get`.

use std::{collections::BTreeMap, time::SystemTime};

use llmchain_proto::{
    model::{
        AgentId, AgentStatus, Assignment, AssignmentOutcome, AssignmentResult, Label, LabelSelector,
        ModelName, ModelRef, SignedStatement, TraceContext,
    },
    pb,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{Error, Result};

/// Prefix of the agent records.
pub const AGENTS_PREFIX: &str = "fleet/agents/";
/// Prefix of the online keys.
pub const ONLINE_PREFIX: &str = "fleet/online/";
/// Prefix of the per-agent assignments.
pub const ASSIGNMENTS_PREFIX: &str = "fleet/assignments/";
/// Prefix of the selector rules.
pub const RULES_PREFIX: &str = "fleet/rules/";
/// Prefix of the stored summaries.
pub const SUMMARIES_PREFIX: &str = "fleet/summaries/";
/// Prefix of the per-version aggregates.
pub const AGGREGATES_PREFIX: &str = "fleet/aggregates/";
/// Prefix of the per-agent traffic counters.
pub const TRAFFIC_PREFIX: &str = "fleet/traffic/";

/// Key of an agent's record.
pub fn agent_key(agent: &AgentId) -> String {
    format!("{AGENTS_PREFIX}{agent}")
}

/// Key of an agent's online marker.
pub fn online_key(agent: &AgentId) -> String {
    format!("{ONLINE_PREFIX}{agent}")
}

/// Key of an agent's assignment.
pub fn assignment_key(agent: &AgentId) -> String {
    format!("{ASSIGNMENTS_PREFIX}{agent}")
}

/// Key of the rule for a selector: its `k=v,…` form with requirements sorted, so the same
/// selector written in another order replaces the same rule.
pub fn rule_key(selector: &LabelSelector) -> String {
    let mut canonical = selector.clone();
    canonical.0.sort();
    canonical.0.dedup();
    format!("{RULES_PREFIX}{canonical}")
}

/// Prefix of one agent's summaries.
pub fn agent_summaries_prefix(agent: &AgentId) -> String {
    format!("{SUMMARIES_PREFIX}{agent}/")
}

/// Key of one summary.
pub fn summary_key(agent: &AgentId, seq: u64) -> String {
    format!("{}{seq:020}", agent_summaries_prefix(agent))
}

/// Key of a version's aggregate.
pub fn aggregate_key(model: &ModelRef) -> String {
    format!("{AGGREGATES_PREFIX}{}/{:020}", model.model, model.version)
}

/// Key of an agent's traffic counters.
pub fn traffic_key(agent: &AgentId) -> String {
    format!("{TRAFFIC_PREFIX}{agent}")
}

/// The agent id at the end of a per-agent key.
pub fn agent_from_key(prefix: &str, key: &str) -> Result<AgentId> {
    let id = key.strip_prefix(prefix).unwrap_or(key);
    AgentId::parse("agent_id", id).map_err(|e| corrupt(key, e))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("corrupt fleet record {what}: {e}"))
}

fn decode_json<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))
}

fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("fleet records are plain data and always serialise")
}

fn millis(t: SystemTime) -> u64 {
    let ms = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn from_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// A model version as stored: `name` and `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRecord {
    /// Model name.
    pub model: String,
    /// Version number.
    pub version: u64,
}

impl From<&ModelRef> for ModelRecord {
    fn from(m: &ModelRef) -> Self {
        ModelRecord { model: m.model.to_string(), version: m.version }
    }
}

impl ModelRecord {
    fn decode(&self, key: &str) -> Result<ModelRef> {
        let model = ModelName::parse("model", &self.model).map_err(|e| corrupt(key, e))?;
        if self.version == 0 {
            return Err(corrupt(key, "version 0"));
        }
        Ok(ModelRef { model, version: self.version })
    }
}

/// An agent's status as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRecord {
    /// Version serving decisions.
    pub running: Option<ModelRecord>,
    /// Version being fetched or loaded.
    pub pending: Option<ModelRecord>,
    /// Bytes of the pending version downloaded.
    pub download_done_bytes: u64,
    /// Bytes of the pending version in all.
    pub download_total_bytes: u64,
    /// Decisions per second.
    pub decisions_per_second: f64,
    /// Raw bytes seen since the agent started.
    pub raw_bytes: u64,
    /// Summary bytes sent since the agent started.
    pub summary_bytes: u64,
    /// Last error.
    pub last_error: String,
    /// Spooled summaries.
    pub spool_depth: u64,
}

impl From<&AgentStatus> for StatusRecord {
    fn from(s: &AgentStatus) -> Self {
        StatusRecord {
            running: s.running.as_ref().map(Into::into),
            pending: s.pending.as_ref().map(Into::into),
            download_done_bytes: s.download_done_bytes,
            download_total_bytes: s.download_total_bytes,
            decisions_per_second: s.decisions_per_second,
            raw_bytes: s.raw_bytes,
            summary_bytes: s.summary_bytes,
            last_error: s.last_error.clone(),
            spool_depth: s.spool_depth,
        }
    }
}

impl StatusRecord {
    fn decode(&self, key: &str) -> Result<AgentStatus> {
        Ok(AgentStatus {
            running: self.running.as_ref().map(|m| m.decode(key)).transpose()?,
            pending: self.pending.as_ref().map(|m| m.decode(key)).transpose()?,
            download_done_bytes: self.download_done_bytes,
            download_total_bytes: self.download_total_bytes,
            decisions_per_second: self.decisions_per_second,
            raw_bytes: self.raw_bytes,
            summary_bytes: self.summary_bytes,
            last_error: self.last_error.clone(),
            spool_depth: self.spool_depth,
        })
    }
}

/// An assignment result as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultRecord {
    /// The assignment answered.
    pub assignment_id: String,
    /// Outcome name ([`AssignmentOutcome::as_str`]).
    pub outcome: String,
    /// Details.
    pub message: String,
    /// Version running afterwards.
    pub running: Option<ModelRecord>,
    /// When the coordinator received it, ms since the Unix epoch.
    pub received_at_ms: u64,
}

/// What the coordinator knows about one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentState {
    /// Agent identity.
    pub agent_id: AgentId,
    /// Labels it reported.
    pub labels: Vec<Label>,
    /// Agent software version.
    pub agent_version: String,
    /// Last reported status.
    pub status: AgentStatus,
    /// When its last Hello or heartbeat arrived.
    pub last_heartbeat: SystemTime,
    /// Session that wrote the record last.
    pub session_id: String,
    /// The last assignment result it reported, with its arrival time.
    pub last_result: Option<(AssignmentResult, SystemTime)>,
}

/// The stored form of [`AgentState`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    /// Labels as `[key, value]` pairs.
    pub labels: Vec<(String, String)>,
    /// Agent software version.
    pub agent_version: String,
    /// Last status.
    pub status: StatusRecord,
    /// Last heartbeat, ms since the Unix epoch.
    pub last_heartbeat_ms: u64,
    /// Session that wrote the record last.
    pub session_id: String,
    /// Last assignment result.
    pub last_result: Option<ResultRecord>,
}

impl AgentState {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        encode_json(&AgentRecord {
            labels: self.labels.iter().map(|l| (l.key.clone(), l.value.clone())).collect(),
            agent_version: self.agent_version.clone(),
            status: (&self.status).into(),
            last_heartbeat_ms: millis(self.last_heartbeat),
            session_id: self.session_id.clone(),
            last_result: self.last_result.as_ref().map(|(r, at)| ResultRecord {
                assignment_id: r.assignment_id.clone(),
                outcome: r.outcome.as_str().to_string(),
                message: r.message.clone(),
                running: r.running.as_ref().map(Into::into),
                received_at_ms: millis(*at),
            }),
        })
    }

    /// Decodes the record stored under `key` (`fleet/agents/<id>`).
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let r: AgentRecord = decode_json(key, bytes)?;
        let last_result = r
            .last_result
            .map(|res| {
                let outcome = AssignmentOutcome::from_name(&res.outcome)
                    .ok_or_else(|| corrupt(key, format!("unknown outcome {:?}", res.outcome)))?;
                let running = res.running.as_ref().map(|m| m.decode(key)).transpose()?;
                let result = AssignmentResult {
                    assignment_id: res.assignment_id,
                    outcome,
                    message: res.message,
                    running,
                };
                Ok::<_, Error>((result, from_millis(res.received_at_ms)))
            })
            .transpose()?;
        Ok(AgentState {
            agent_id: agent_from_key(AGENTS_PREFIX, key)?,
            labels: r.labels.into_iter().map(|(key, value)| Label { key, value }).collect(),
            agent_version: r.agent_version,
            status: r.status.decode(key)?,
            last_heartbeat: from_millis(r.last_heartbeat_ms),
            session_id: r.session_id,
            last_result,
        })
    }
}

/// The value of an online key: the session holding it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineRecord {
    /// The session.
    pub session_id: String,
}

impl OnlineRecord {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }

    /// Decodes a stored online key.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        decode_json(key, bytes)
    }
}

/// An assignment as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignmentRecord {
    /// Unique id.
    pub assignment_id: String,
    /// The version.
    pub target: ModelRecord,
    /// Load and switch to it.
    pub activate: bool,
    /// Downgrade on purpose.
    pub rollback: bool,
    /// Rollout, empty when assigned directly.
    pub rollout_id: String,
    /// W3C `traceparent`, empty when none.
    pub traceparent: String,
    /// W3C `tracestate`.
    pub tracestate: String,
    /// With `rollback`: the trainer-signed rollback statement relayed to the agent, the hex of
    /// its protobuf encoding; empty when none (and in records written before it existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rollback_statement: String,
}

impl AssignmentRecord {
    /// The stored form of `a`.
    pub fn from_assignment(a: &Assignment) -> Self {
        let (traceparent, tracestate) =
            a.trace.as_ref().map(|t| (t.traceparent.clone(), t.tracestate.clone())).unwrap_or_default();
        AssignmentRecord {
            assignment_id: a.assignment_id.clone(),
            target: (&a.target).into(),
            activate: a.activate,
            rollback: a.rollback,
            rollout_id: a.rollout_id.clone().unwrap_or_default(),
            traceparent,
            tracestate,
            rollback_statement: a
                .rollback_statement
                .clone()
                .map(|s| hex::encode(prost::Message::encode_to_vec(&pb::SignedStatement::from(s))))
                .unwrap_or_default(),
        }
    }

    /// The assignment it stores; `key` names it in errors.
    pub fn to_assignment(&self, key: &str) -> Result<Assignment> {
        Ok(Assignment {
            assignment_id: self.assignment_id.clone(),
            target: self.target.decode(key)?,
            activate: self.activate,
            rollback: self.rollback,
            rollout_id: (!self.rollout_id.is_empty()).then(|| self.rollout_id.clone()),
            trace: (!self.traceparent.is_empty()).then(|| TraceContext {
                traceparent: self.traceparent.clone(),
                tracestate: self.tracestate.clone(),
            }),
            rollback_statement: decode_statement(key, &self.rollback_statement)?,
        })
    }
}

/// The rollback statement stored as hex, if any.
fn decode_statement(key: &str, hex_text: &str) -> Result<Option<SignedStatement>> {
    if hex_text.is_empty() {
        return Ok(None);
    }
    let bad = |e: String| Error::Store(format!("{key}: rollback statement: {e}"));
    let bytes = hex::decode(hex_text).map_err(|e| bad(e.to_string()))?;
    let wire =
        <pb::SignedStatement as prost::Message>::decode(bytes.as_slice()).map_err(|e| bad(e.to_string()))?;
    SignedStatement::try_from(wire).map(Some).map_err(|e| bad(e.to_string()))
}

/// Encodes an assignment for the store.
pub fn encode_assignment(a: &Assignment) -> Vec<u8> {
    encode_json(&AssignmentRecord::from_assignment(a))
}

/// Decodes a stored assignment.
pub fn decode_assignment(key: &str, bytes: &[u8]) -> Result<Assignment> {
    decode_json::<AssignmentRecord>(key, bytes)?.to_assignment(key)
}

/// A selector assignment kept for agents that connect later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRecord {
    /// The selector, `k=v,…`.
    pub selector: String,
    /// The assignment; each agent gets it with `assignment_id` + `:` + its id.
    pub assignment: AssignmentRecord,
}

impl RuleRecord {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }

    /// Decodes a stored rule into its selector and assignment template.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<(LabelSelector, Assignment)> {
        let r: RuleRecord = decode_json(key, bytes)?;
        let selector = LabelSelector::parse("selector", &r.selector).map_err(|e| corrupt(key, e))?;
        Ok((selector, r.assignment.to_assignment(key)?))
    }
}

/// Counters over the stored summaries of one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateRecord {
    /// Summaries counted.
    pub summaries: u64,
    /// Records seen.
    pub records: u64,
    /// Bad records.
    pub bad_records: u64,
    /// Raw bytes.
    pub raw_bytes: u64,
    /// Stored summary bytes.
    pub summary_bytes: u64,
    /// Decisions per label.
    pub decisions: BTreeMap<String, u64>,
}

impl AggregateRecord {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }

    /// Decodes a stored aggregate.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        decode_json(key, bytes)
    }

    /// The version an aggregate key (`fleet/aggregates/<model>/<version>`) is about.
    pub fn model_of(key: &str) -> Result<ModelRef> {
        let rest = key.strip_prefix(AGGREGATES_PREFIX).unwrap_or(key);
        let (model, version) = rest.rsplit_once('/').ok_or_else(|| corrupt(key, "not model/version"))?;
        let version: u64 = version.parse().map_err(|e| corrupt(key, e))?;
        ModelRecord { model: model.to_string(), version }.decode(key)
    }
}

/// Bytes one agent's stored summaries account for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficRecord {
    /// Summaries stored.
    pub summaries: u64,
    /// Raw bytes the summaries describe.
    pub raw_bytes: u64,
    /// Bytes of the stored summaries.
    pub summary_bytes: u64,
}

impl TrafficRecord {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        encode_json(self)
    }

    /// Decodes stored traffic counters.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        decode_json(key, bytes)
    }

    /// Raw bytes minus summary bytes, never below zero.
    pub fn bytes_saved(&self) -> u64 {
        self.raw_bytes.saturating_sub(self.summary_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_like_numbers_and_parse_back() {
        let a = AgentId::parse("a", "edge-1").unwrap();
        assert!(summary_key(&a, 9) < summary_key(&a, 10));
        let m = ModelRef { model: ModelName::parse("m", "smol").unwrap(), version: 12 };
        assert_eq!(AggregateRecord::model_of(&aggregate_key(&m)).unwrap(), m);
        assert_eq!(agent_from_key(AGENTS_PREFIX, &agent_key(&a)).unwrap(), a);
        let sel = |s| rule_key(&LabelSelector::parse("selector", s).unwrap());
        assert_eq!(sel("site=p7,kind=pump"), sel("kind=pump, site=p7"));
        assert_eq!(sel("kind=pump,site=p7"), "fleet/rules/kind=pump,site=p7");
    }

    #[test]
    fn agent_state_round_trips() {
        let state = AgentState {
            agent_id: AgentId::parse("a", "edge-1").unwrap(),
            labels: vec![Label { key: "site".into(), value: "p7".into() }],
            agent_version: "0.1.0".into(),
            status: AgentStatus { raw_bytes: 7, ..Default::default() },
            last_heartbeat: from_millis(1_700_000_000_123),
            session_id: "s1".into(),
            last_result: Some((
                AssignmentResult {
                    assignment_id: "x:edge-1".into(),
                    outcome: AssignmentOutcome::LoadFailed,
                    message: "self-test".into(),
                    running: None,
                },
                from_millis(1_700_000_000_999),
            )),
        };
        let key = agent_key(&state.agent_id);
        assert_eq!(AgentState::decode(&key, &state.encode()).unwrap(), state);
    }
}
