//! The fleet service: agent sessions, assignments, decision summaries and their aggregates.
//!
//! [`FleetApi`] is the service as a plain async trait over domain types; [`Fleet`] implements
//! it on a [`Store`] (layout in [`records`]), and [`grpc::FleetGrpc`] adapts it to the
//! generated tonic trait. Invariants:
//! - an agent is online exactly while `fleet/online/<id>` exists; the key is written when a
//!   session opens, on this coordinator's lease, and deleted when the session ends, which it
//!   does when its agent leaves or stays silent for the lease TTL (liveness is kept in memory,
//!   see [`sessions`]; a heartbeat writes nothing unless what rollouts read changed);
//! - one session per agent: a newer session overwrites the online key, the older session learns
//!   it from the fleet's one watch of the online keys and ends, and it writes the agent record
//!   only while it holds the key;
//! - a session delivers the agent's stored assignment when it starts and every later change
//!   (each assignment id once), so an assignment made while the agent is away reaches it on
//!   reconnect;
//! - a summary is stored once per (agent, seq): a transaction puts it only if absent and adds
//!   it to its version's aggregate and its agent's traffic, so counters never count a retried
//!   report twice; reports arriving together share one durable transaction ([`ingest`]) and
//!   are acknowledged only after it commits.
//!
//! Refusals and their codes: a session whose first message is not a Hello, a summary of
//! another agent, and malformed fields are `INVALID_ARGUMENT`; assigning an unpublished
//! version or an unknown agent id is `NOT_FOUND`; a session replaced by a newer one ends with
//! `FAILED_PRECONDITION`; a session whose lease expired, a store that cannot be reached and a
//! coordinator shutting down are `UNAVAILABLE` (the agent reconnects).

pub mod grpc;
mod ingest;
pub mod records;
mod sessions;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use llmchain_proto::{
    ApiError,
    model::{
        AgentId, AgentMessage, AssignSpec, Assignment, Hello, LabelSelector, ModelName, ModelRef, Summary,
        SummaryQuery, SummaryReport, Targets, TraceContext,
    },
    pb,
};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use grpc::{FleetGrpc, service, service_with_enrollment};
use ingest::Ingest;
use records::{
    AGENTS_PREFIX, AGGREGATES_PREFIX, AgentState, AggregateRecord, AssignmentRecord, ONLINE_PREFIX,
    RuleRecord, SUMMARIES_PREFIX, TRAFFIC_PREFIX, TrafficRecord, agent_from_key, agent_key,
    agent_summaries_prefix, aggregate_key, assignment_key, rule_key,
};
use sessions::Sessions;

use crate::{
    Error, Result,
    metrics::Metrics,
    registry::records::version_key,
    store::{Op, Revision, Store, WatchEvent},
};

/// Assignments written concurrently by one `Assign`.
const ASSIGN_CONCURRENCY: usize = 16;
/// Messages queued towards one agent before its session waits for the agent to read.
const SESSION_QUEUE: usize = 16;

/// Session timing of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetConfig {
    /// How often agents must heartbeat (told in Welcome).
    pub heartbeat_interval: Duration,
    /// TTL of a session's lease: an agent silent this long shows offline.
    pub lease_ttl: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat_interval: Duration::from_millis(5000),
            lease_ttl: Duration::from_millis(15_000),
        }
    }
}

/// Session parameters sent first on every session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Identifier of the session, for logs.
    pub session_id: String,
    /// How often the agent must heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which the agent shows offline.
    pub lease_ttl: Duration,
}

/// One message from the coordinator on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorMessage {
    /// First message of a session.
    Welcome(Welcome),
    /// Hold or run a version.
    Assignment(Assignment),
}

/// The agent's messages after its Hello, validated; an error ends the session with it.
pub type AgentMessages = BoxStream<'static, Result<AgentMessage>>;
/// The coordinator's messages on a session; it ends after an error.
pub type SessionStream = BoxStream<'static, Result<CoordinatorMessage>>;
/// Summaries as they are stored.
pub type SummaryStream = BoxStream<'static, Result<Summary>>;

/// The coordinator's view of one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    /// What its sessions reported.
    pub state: AgentState,
    /// True while its heartbeat lease is alive.
    pub online: bool,
    /// Bytes its stored summaries account for.
    pub traffic: TrafficRecord,
}

/// Aggregates of one version's summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStats {
    /// The version.
    pub model: ModelRef,
    /// Its counters.
    pub aggregate: AggregateRecord,
}

/// Fleet-wide figures for operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetStats {
    /// Agents known.
    pub agents: u64,
    /// Agents online.
    pub online_agents: u64,
    /// Sums over `versions` (summaries, bytes, decisions).
    pub totals: AggregateRecord,
    /// Per version, sorted by model then version.
    pub versions: Vec<VersionStats>,
}

/// The fleet as a service over domain types.
#[async_trait::async_trait]
pub trait FleetApi: Send + Sync + 'static {
    /// Opens a session after `hello`; the answer starts with [`CoordinatorMessage::Welcome`].
    async fn session(&self, hello: Hello, messages: AgentMessages) -> Result<SessionStream>;
    /// Stores an assignment for the agents `spec` names; returns them, sorted.
    async fn assign(&self, spec: AssignSpec, trace: Option<TraceContext>) -> Result<Vec<AgentId>>;
    /// Stores each summary once; returns every sequence number now stored, ascending.
    async fn report_summaries(&self, report: SummaryReport) -> Result<Vec<u64>>;
    /// Agents whose labels match `selector`, sorted by id.
    async fn list_agents(&self, selector: &LabelSelector) -> Result<Vec<AgentInfo>>;
    /// Stored summaries matching `query`, newest window end first.
    async fn list_summaries(&self, query: SummaryQuery) -> Result<Vec<Summary>>;
    /// Summaries stored from now on that match `query` (its limit aside).
    async fn watch_summaries(&self, query: SummaryQuery) -> Result<SummaryStream>;
    /// Per-version aggregates (of `model` only when given) and their totals.
    async fn stats(&self, model: Option<ModelName>) -> Result<FleetStats>;
}

/// The fleet on a [`Store`].
pub struct Fleet {
    store: Arc<dyn Store>,
    /// Live sessions, their liveness and the tasks writing their records.
    sessions: Arc<Sessions>,
    /// The summary writer (group commit), started on the first report.
    ingest: OnceLock<Ingest>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

/// A fresh random identifier (16 hex digits), for sessions and assignments.
pub fn fresh_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        // No OS randomness: the clock still makes ids unique enough within one fleet.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes = (nanos as u64).to_le_bytes();
    }
    hex::encode(bytes)
}

/// Stores `assignment` as `agent`'s desired state; its session (if any) delivers it at once.
///
/// The one writer of `fleet/assignments/<id>`, shared by `Assign` and the rollout controller.
/// Returns the revision of the write.
pub async fn write_assignment(
    store: &dyn Store,
    agent: &AgentId,
    assignment: &Assignment,
) -> Result<Revision> {
    let revision =
        store.put(&assignment_key(agent), records::encode_assignment(assignment).into(), None).await?;
    debug!(agent_id = %agent, assignment_id = %assignment.assignment_id, target = %assignment.target, "assignment stored");
    Ok(revision)
}

/// The transaction op that stores `assignment` as `agent`'s desired state, for writers that
/// fence the write with a compare (the rollout controller); same encoding as
/// [`write_assignment`].
pub fn assignment_op(agent: &AgentId, assignment: &Assignment) -> Op {
    Op::put(assignment_key(agent), records::encode_assignment(assignment))
}

/// Every known agent whose labels match `selector`, sorted by id, with its liveness and traffic.
pub async fn list_agents(store: &dyn Store, selector: &LabelSelector) -> Result<Vec<AgentInfo>> {
    let (agents, online, traffic) =
        tokio::try_join!(store.list(AGENTS_PREFIX), store.list(ONLINE_PREFIX), store.list(TRAFFIC_PREFIX))?;
    let online: HashSet<AgentId> =
        online.kvs.iter().map(|kv| agent_from_key(ONLINE_PREFIX, &kv.key)).collect::<Result<_>>()?;
    let traffic: HashMap<AgentId, TrafficRecord> = traffic
        .kvs
        .iter()
        .map(|kv| Ok((agent_from_key(TRAFFIC_PREFIX, &kv.key)?, TrafficRecord::decode(&kv.key, &kv.value)?)))
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for kv in agents.kvs {
        let state = AgentState::decode(&kv.key, &kv.value)?;
        if !selector.matches(&state.labels) {
            continue;
        }
        out.push(AgentInfo {
            online: online.contains(&state.agent_id),
            traffic: traffic.get(&state.agent_id).copied().unwrap_or_default(),
            state,
        });
    }
    Ok(out)
}

/// Every stored summary of one agent, oldest sequence number first.
pub async fn agent_summaries(store: &dyn Store, agent: &AgentId) -> Result<Vec<Summary>> {
    let listing = store.list(&agent_summaries_prefix(agent)).await?;
    listing.kvs.iter().map(|kv| decode_summary(&kv.key, &kv.value)).collect()
}

/// The aggregate of one version's stored summaries, if any was stored.
pub async fn version_aggregate(store: &dyn Store, model: &ModelRef) -> Result<Option<AggregateRecord>> {
    let key = aggregate_key(model);
    store.get(&key).await?.map(|kv| AggregateRecord::decode(&key, &kv.value)).transpose()
}

/// The assignment one agent gets from a template shared by several agents.
fn for_agent(template: &Assignment, agent: &AgentId) -> Assignment {
    Assignment { assignment_id: format!("{}:{agent}", template.assignment_id), ..template.clone() }
}

fn decode_summary(key: &str, bytes: &[u8]) -> Result<Summary> {
    let wire = pb::Summary::decode(bytes).map_err(|e| Error::Store(format!("corrupt summary {key}: {e}")))?;
    Summary::try_from(wire).map_err(|e| Error::Store(format!("corrupt summary {key}: {e}")))
}

/// Adds one summary to an aggregate.
fn add_summary(agg: &mut AggregateRecord, s: &Summary, summary_bytes: u64) {
    agg.summaries += 1;
    agg.records += s.records;
    agg.bad_records += s.bad_records;
    agg.raw_bytes += s.raw_bytes;
    agg.summary_bytes += summary_bytes;
    for (label, count) in &s.label_counts {
        *agg.decisions.entry(label.clone()).or_default() += count;
    }
}

fn add_aggregate(total: &mut AggregateRecord, a: &AggregateRecord) {
    total.summaries += a.summaries;
    total.records += a.records;
    total.bad_records += a.bad_records;
    total.raw_bytes += a.raw_bytes;
    total.summary_bytes += a.summary_bytes;
    for (label, count) in &a.decisions {
        *total.decisions.entry(label.clone()).or_default() += count;
    }
}

impl Fleet {
    /// A fleet over `store`; its sessions and watches end when `shutdown` is cancelled, so a
    /// draining server is not held open by long-lived streams.
    pub fn new(config: FleetConfig, store: Arc<dyn Store>, shutdown: CancellationToken) -> Self {
        let sessions = Arc::new(Sessions::new(Arc::clone(&store), config, shutdown.clone()));
        Fleet { store, sessions, ingest: OnceLock::new(), shutdown, metrics: Arc::default() }
    }

    /// Counts sessions and ingested summaries in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The store the fleet keeps its state in.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn ingest(&self) -> &Ingest {
        // Started on first use: the writer task needs the runtime, which `new` may not run in.
        self.ingest.get_or_init(|| Ingest::start(Arc::clone(&self.store)))
    }
}

#[async_trait::async_trait]
impl FleetApi for Fleet {
    async fn session(&self, hello: Hello, messages: AgentMessages) -> Result<SessionStream> {
        self.sessions.open(hello, messages, Arc::clone(&self.metrics)).await
    }

    async fn assign(&self, spec: AssignSpec, trace: Option<TraceContext>) -> Result<Vec<AgentId>> {
        let target = &spec.target;
        if self.store.get(&version_key(&target.model, target.version)).await?.is_none() {
            return Err(
                ApiError::NotFound(format!("version {} of model {}", target.version, target.model)).into()
            );
        }
        let template = Assignment {
            assignment_id: fresh_id(),
            target: spec.target.clone(),
            activate: spec.activate,
            rollback: spec.rollback,
            rollout_id: spec.rollout_id.clone(),
            trace,
            rollback_statement: spec.rollback_statement.clone(),
        };
        let agents = match &spec.targets {
            Targets::Agents(ids) => {
                let mut unknown = Vec::new();
                for id in ids {
                    if self.store.get(&agent_key(id)).await?.is_none() {
                        unknown.push(id.to_string());
                    }
                }
                if !unknown.is_empty() {
                    return Err(ApiError::NotFound(format!("agents {}", unknown.join(", "))).into());
                }
                ids.clone()
            }
            Targets::Selector(selector) => {
                // The rule first: an agent connecting while the assignments below are written
                // then finds the rule, so none falls between the two.
                let rule = RuleRecord {
                    selector: selector.to_string(),
                    assignment: AssignmentRecord::from_assignment(&template),
                };
                self.store.put(&rule_key(selector), rule.encode().into(), None).await?;
                let mut matched = Vec::new();
                for kv in self.store.list(AGENTS_PREFIX).await?.kvs {
                    let state = AgentState::decode(&kv.key, &kv.value)?;
                    if selector.matches(&state.labels) {
                        matched.push(state.agent_id);
                    }
                }
                matched
            }
        };
        let writes: Vec<_> = agents
            .iter()
            .map(|agent| {
                let assignment = for_agent(&template, agent);
                let (store, agent) = (Arc::clone(&self.store), agent.clone());
                async move { write_assignment(store.as_ref(), &agent, &assignment).await }
            })
            .collect();
        futures::stream::iter(writes).buffer_unordered(ASSIGN_CONCURRENCY).try_collect::<Vec<_>>().await?;
        info!(assignment_id = %template.assignment_id, target = %spec.target, agents = agents.len(), activate = spec.activate, "assignment stored");
        Ok(agents)
    }

    #[tracing::instrument(
        name = "ingest_summaries",
        skip_all,
        fields(agent_id = %report.agent_id, summaries = report.summaries.len(), new = tracing::field::Empty)
    )]
    async fn report_summaries(&self, report: SummaryReport) -> Result<Vec<u64>> {
        let mut seen = HashSet::new();
        let summaries: Vec<Summary> = report.summaries.into_iter().filter(|s| seen.insert(s.seq)).collect();
        let stored = self.ingest().store(summaries.clone()).await?;
        let new = stored.iter().filter(|&&n| n).count();
        for (s, stored) in summaries.iter().zip(stored) {
            self.metrics.summary_ingested(s, stored);
        }
        let mut acked: Vec<u64> = summaries.iter().map(|s| s.seq).collect();
        acked.sort_unstable();
        tracing::Span::current().record("new", new);
        debug!(agent_id = %report.agent_id, new, duplicates = acked.len() - new, "summaries reported");
        Ok(acked)
    }

    async fn list_agents(&self, selector: &LabelSelector) -> Result<Vec<AgentInfo>> {
        let mut agents = list_agents(self.store.as_ref(), selector).await?;
        // Local sessions know more than their last flushed record (heartbeat time, counters).
        self.sessions.overlay(&mut agents);
        Ok(agents)
    }

    async fn list_summaries(&self, query: SummaryQuery) -> Result<Vec<Summary>> {
        let prefix =
            query.agent_id.as_ref().map_or_else(|| SUMMARIES_PREFIX.to_string(), agent_summaries_prefix);
        let mut out = Vec::new();
        for kv in self.store.list(&prefix).await?.kvs {
            let s = decode_summary(&kv.key, &kv.value)?;
            if query.matches(&s) {
                out.push(s);
            }
        }
        out.sort_by(|a, b| {
            b.window_end.cmp(&a.window_end).then_with(|| a.agent_id.cmp(&b.agent_id)).then(b.seq.cmp(&a.seq))
        });
        out.truncate(query.limit);
        Ok(out)
    }

    async fn watch_summaries(&self, query: SummaryQuery) -> Result<SummaryStream> {
        let prefix =
            query.agent_id.as_ref().map_or_else(|| SUMMARIES_PREFIX.to_string(), agent_summaries_prefix);
        let from = self.store.current_revision().await?;
        let events = self.store.watch(&prefix, from).await?;
        let stream = events
            .filter_map(move |event| {
                let out = match event {
                    Ok(WatchEvent::Put(kv)) => match decode_summary(&kv.key, &kv.value) {
                        Ok(s) if query.matches(&s) => Some(Ok(s)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    },
                    Ok(WatchEvent::Delete { .. }) => None,
                    Err(e) => Some(Err(e)),
                };
                futures::future::ready(out)
            })
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(stream.boxed())
    }

    async fn stats(&self, model: Option<ModelName>) -> Result<FleetStats> {
        let prefix =
            model.map_or_else(|| AGGREGATES_PREFIX.to_string(), |m| format!("{AGGREGATES_PREFIX}{m}/"));
        let (agents, online, aggregates) = tokio::try_join!(
            self.store.list(AGENTS_PREFIX),
            self.store.list(ONLINE_PREFIX),
            self.store.list(&prefix),
        )?;
        let mut stats = FleetStats {
            agents: agents.kvs.len() as u64,
            online_agents: online.kvs.len() as u64,
            ..Default::default()
        };
        let mut versions = BTreeMap::new();
        for kv in aggregates.kvs {
            let aggregate = AggregateRecord::decode(&kv.key, &kv.value)?;
            add_aggregate(&mut stats.totals, &aggregate);
            versions.insert(AggregateRecord::model_of(&kv.key)?, aggregate);
        }
        stats.versions =
            versions.into_iter().map(|(model, aggregate)| VersionStats { model, aggregate }).collect();
        Ok(stats)
    }
}
