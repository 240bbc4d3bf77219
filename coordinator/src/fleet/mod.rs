//! The fleet service: agent sessions, assignments, decision summaries and their aggregates.
//!
//! [`FleetApi`] is the service as a plain async trait over domain types; [`Fleet`] implements
//! it on a [`Store`] (layout in [`records`]), and [`grpc::FleetGrpc`] adapts it to the
//! generated tonic trait. Invariants:
//! - an agent is online exactly while `fleet/online/<id>` exists; the key hangs on a lease of
//!   the configured TTL that only the agent's heartbeats renew, so a silent agent goes offline
//!   after one TTL whether its stream stays open or not (and its session then ends);
//! - one session per agent: a newer session overwrites the online key, the older session sees
//!   that on its watch and ends, and it writes the agent record only while it holds the key;
//! - a session delivers the agent's stored assignment when it starts and every later change
//!   (each assignment id once), so an assignment made while the agent is away reaches it on
//!   reconnect;
//! - a summary is stored once per (agent, seq): one transaction puts it only if absent and
//!   adds it to its version's aggregate and its agent's traffic, so counters never count a
//!   retried report twice.
//!
//! Refusals and their codes: a session whose first message is not a Hello, a summary of
//! another agent, and malformed fields are `INVALID_ARGUMENT`; assigning an unpublished
//! version or an unknown agent id is `NOT_FOUND`; a session replaced by a newer one ends with
//! `FAILED_PRECONDITION`; a session whose lease expired, a store that cannot be reached and a
//! coordinator shutting down are `UNAVAILABLE` (the agent reconnects).

pub mod grpc;
pub mod records;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use llmchain_proto::{
    ApiError,
    model::{
        AgentId, AgentMessage, AssignSpec, Assignment, Hello, Label, LabelSelector, ModelName, ModelRef,
        Summary, SummaryQuery, SummaryReport, Targets, TraceContext,
    },
    pb,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use grpc::{FleetGrpc, service, service_with_enrollment};
use records::{
    AGENTS_PREFIX, AGGREGATES_PREFIX, AgentState, AggregateRecord, AssignmentRecord, ONLINE_PREFIX,
    OnlineRecord, RULES_PREFIX, RuleRecord, SUMMARIES_PREFIX, TRAFFIC_PREFIX, TrafficRecord, agent_from_key,
    agent_key, agent_summaries_prefix, aggregate_key, assignment_key, online_key, rule_key, summary_key,
    traffic_key,
};

use crate::{
    Error, Result,
    metrics::Metrics,
    registry::records::version_key,
    store::{Compare, KeyValue, LeaseId, Op, OpResponse, Revision, Store, Txn, WatchEvent, WatchStream},
};

/// Attempts of a summary's compare-and-swap before the report is refused as contended.
const SUMMARY_ATTEMPTS: usize = 16;
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
    config: FleetConfig,
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

/// The key-value of exactly `key` in a prefix listing (prefixes are raw: `a/x` lists `a/xy`).
fn exact(kvs: Vec<KeyValue>, key: &str) -> Option<KeyValue> {
    kvs.into_iter().find(|kv| kv.key == key)
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

/// Last known value and revision of the counters a report updates, so a report of many
/// summaries costs one transaction per summary when nothing else writes them.
#[derive(Default)]
struct CounterCache {
    traffic: Option<(TrafficRecord, Revision)>,
    aggregates: HashMap<String, (AggregateRecord, Revision)>,
}

impl Fleet {
    /// A fleet over `store`; its sessions and watches end when `shutdown` is cancelled, so a
    /// draining server is not held open by long-lived streams.
    pub fn new(config: FleetConfig, store: Arc<dyn Store>, shutdown: CancellationToken) -> Self {
        Fleet { store, config, shutdown, metrics: Arc::default() }
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

    async fn load<T>(
        &self,
        key: &str,
        decode: impl Fn(&str, &[u8]) -> Result<T>,
    ) -> Result<Option<(T, Revision)>> {
        match self.store.get(key).await? {
            Some(kv) => Ok(Some((decode(key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Applies the newest selector rule that matches `labels` and is newer than the agent's
    /// stored assignment, so an agent that was away or had other labels catches up.
    async fn apply_rules(&self, agent: &AgentId, labels: &[Label]) -> Result<()> {
        let rules = self.store.list(RULES_PREFIX).await?;
        let key = assignment_key(agent);
        let current_revision = self.store.get(&key).await?.map_or(0, |kv| kv.mod_revision);
        let mut newest: Option<(Revision, Assignment)> = None;
        for kv in rules.kvs {
            if kv.mod_revision <= current_revision
                || newest.as_ref().is_some_and(|(r, _)| *r >= kv.mod_revision)
            {
                continue;
            }
            let (selector, template) = RuleRecord::decode(&kv.key, &kv.value)?;
            if selector.matches(labels) {
                newest = Some((kv.mod_revision, template));
            }
        }
        let Some((_, template)) = newest else { return Ok(()) };
        let assignment = for_agent(&template, agent);
        // Only if nothing was assigned since we looked: a newer direct assignment wins.
        let txn = Txn::new()
            .when([Compare::ModRevision(key.clone(), current_revision)])
            .and_then([Op::put(key, records::encode_assignment(&assignment))]);
        if self.store.txn(txn).await?.succeeded {
            info!(agent_id = %agent, assignment_id = %assignment.assignment_id, target = %assignment.target, "selector rule applied on connect");
        }
        Ok(())
    }

    /// Stores one summary unless already stored; returns whether it was new.
    async fn store_summary(&self, s: &Summary, cache: &mut CounterCache) -> Result<bool> {
        let key = summary_key(&s.agent_id, s.seq);
        let agg_key = aggregate_key(&s.model);
        let t_key = traffic_key(&s.agent_id);
        let bytes = pb::Summary::from(s.clone()).encode_to_vec();
        let size = bytes.len() as u64;
        for _ in 0..SUMMARY_ATTEMPTS {
            let (traffic, t_rev) = match cache.traffic {
                Some(t) => t,
                None => self.load(&t_key, TrafficRecord::decode).await?.unwrap_or_default(),
            };
            let (agg, a_rev) = match cache.aggregates.get(&agg_key) {
                Some(a) => a.clone(),
                None => self.load(&agg_key, AggregateRecord::decode).await?.unwrap_or_default(),
            };
            let mut next_agg = agg;
            add_summary(&mut next_agg, s, size);
            let next_traffic = TrafficRecord {
                summaries: traffic.summaries + 1,
                raw_bytes: traffic.raw_bytes + s.raw_bytes,
                summary_bytes: traffic.summary_bytes + size,
            };
            let txn = Txn::new()
                .when([
                    Compare::absent(key.clone()),
                    Compare::ModRevision(agg_key.clone(), a_rev),
                    Compare::ModRevision(t_key.clone(), t_rev),
                ])
                .and_then([
                    Op::put(key.clone(), bytes.clone()),
                    Op::put(agg_key.clone(), next_agg.encode()),
                    Op::put(t_key.clone(), next_traffic.encode()),
                ])
                .or_else([Op::get(key.clone()), Op::get(agg_key.clone()), Op::get(t_key.clone())]);
            let result = self.store.txn(txn).await?;
            if result.succeeded {
                cache.traffic = Some((next_traffic, result.revision));
                cache.aggregates.insert(agg_key, (next_agg, result.revision));
                return Ok(true);
            }
            let mut responses = result.responses.into_iter();
            let mut next_kv = || match responses.next() {
                Some(OpResponse::Get(kv)) => Ok(kv),
                other => Err(Error::Store(format!("unexpected transaction response {other:?}"))),
            };
            let (existing, agg_kv, t_kv) = (next_kv()?, next_kv()?, next_kv()?);
            cache.aggregates.insert(
                agg_key.clone(),
                match agg_kv {
                    Some(kv) => (AggregateRecord::decode(&agg_key, &kv.value)?, kv.mod_revision),
                    None => Default::default(),
                },
            );
            cache.traffic = Some(match t_kv {
                Some(kv) => (TrafficRecord::decode(&t_key, &kv.value)?, kv.mod_revision),
                None => Default::default(),
            });
            if existing.is_some() {
                return Ok(false);
            }
        }
        warn!(agent_id = %s.agent_id, seq = s.seq, "summary lost every compare-and-swap race");
        Err(ApiError::Unavailable(format!(
            "counters of agent {} are contended; retry the report",
            s.agent_id
        ))
        .into())
    }
}

/// Everything a running session needs; owned by its task.
struct Session {
    store: Arc<dyn Store>,
    agent: AgentId,
    session_id: String,
    lease: LeaseId,
    online_key: String,
    online_value: Vec<u8>,
    assignment_key: String,
    state: AgentState,
    last_sent: Option<String>,
    tx: mpsc::Sender<Result<CoordinatorMessage>>,
}

impl Session {
    /// Writes the agent record, only while this session holds the agent's online key.
    async fn save(&self) -> Result<()> {
        let txn = Txn::new()
            .when([Compare::Value(self.online_key.clone(), self.online_value.clone().into())])
            .and_then([Op::put(agent_key(&self.agent), self.state.encode())]);
        if self.store.txn(txn).await?.succeeded { Ok(()) } else { Err(self.lost()) }
    }

    fn lost(&self) -> Error {
        ApiError::Unavailable(format!(
            "session {} of agent {} lost its lease (no heartbeat within the lease ttl) or was replaced; reconnect",
            self.session_id, self.agent
        ))
        .into()
    }

    /// Sends the assignment unless this session sent the same id already.
    async fn deliver(&mut self, assignment: Assignment) -> bool {
        if self.last_sent.as_deref() == Some(assignment.assignment_id.as_str()) {
            return true;
        }
        self.last_sent = Some(assignment.assignment_id.clone());
        debug!(agent_id = %self.agent, assignment_id = %assignment.assignment_id, "assignment sent");
        self.tx.send(Ok(CoordinatorMessage::Assignment(assignment))).await.is_ok()
    }

    async fn on_message(&mut self, msg: AgentMessage) -> Result<()> {
        match msg {
            AgentMessage::Hello(_) => {
                Err(ApiError::invalid("hello", "only the first message of a session may be a hello").into())
            }
            AgentMessage::Heartbeat(h) => {
                match self.store.keep_alive(self.lease).await {
                    Ok(_) => {}
                    Err(Error::LeaseExpired(_)) => return Err(self.lost()),
                    Err(e) => return Err(e),
                }
                self.state.status = h.status;
                self.state.last_heartbeat = SystemTime::now();
                self.save().await
            }
            AgentMessage::Result(r) => {
                info!(agent_id = %self.agent, assignment_id = %r.assignment_id, outcome = r.outcome.as_str(), message = %r.message, "assignment result");
                self.state.last_result = Some((r, SystemTime::now()));
                self.save().await
            }
        }
    }

    /// Runs until the agent leaves (Ok) or the session must end (the error to send).
    async fn run(
        &mut self,
        mut messages: AgentMessages,
        mut online: WatchStream,
        mut assignments: WatchStream,
        shutdown: CancellationToken,
    ) -> Result<()> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    return Err(ApiError::Unavailable("coordinator shutting down; reconnect".into()).into());
                }
                () = self.tx.closed() => return Ok(()),
                msg = messages.next() => match msg {
                    None => return Ok(()),
                    Some(msg) => self.on_message(msg?).await?,
                },
                event = online.next() => match event {
                    None => return Err(ApiError::Unavailable("store watch ended".into()).into()),
                    Some(event) => match event? {
                        e if e.key() != self.online_key => {}
                        WatchEvent::Put(kv) if kv.value.as_ref() != self.online_value.as_slice() => {
                            let newer = OnlineRecord::decode(&kv.key, &kv.value)?;
                            return Err(ApiError::FailedPrecondition(format!(
                                "session {} of agent {} was replaced by session {}",
                                self.session_id, self.agent, newer.session_id
                            ))
                            .into());
                        }
                        WatchEvent::Put(_) => {}
                        WatchEvent::Delete { .. } => return Err(self.lost()),
                    },
                },
                event = assignments.next() => match event {
                    None => return Err(ApiError::Unavailable("store watch ended".into()).into()),
                    Some(event) => match event? {
                        WatchEvent::Put(kv) if kv.key == self.assignment_key => {
                            let assignment = records::decode_assignment(&kv.key, &kv.value)?;
                            if !self.deliver(assignment).await {
                                return Ok(());
                            }
                        }
                        _ => {}
                    },
                },
            }
        }
    }
}

#[async_trait::async_trait]
impl FleetApi for Fleet {
    async fn session(&self, hello: Hello, messages: AgentMessages) -> Result<SessionStream> {
        let agent = hello.agent_id.clone();
        let session_id = fresh_id();
        let lease = self.store.grant_lease(self.config.lease_ttl).await?;
        let online_value = OnlineRecord { session_id: session_id.clone() }.encode();
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let mut session = Session {
            store: Arc::clone(&self.store),
            agent: agent.clone(),
            session_id: session_id.clone(),
            lease,
            online_key: online_key(&agent),
            online_value: online_value.clone(),
            assignment_key: assignment_key(&agent),
            state: AgentState {
                agent_id: agent.clone(),
                labels: hello.labels,
                agent_version: hello.agent_version,
                status: hello.status,
                last_heartbeat: SystemTime::now(),
                session_id: session_id.clone(),
                last_result: None,
            },
            last_sent: None,
            tx,
        };
        let mut known = false;
        let start = async {
            let previous = self.load(&agent_key(&agent), AgentState::decode).await?;
            known = previous.is_some();
            session.state.last_result = previous.and_then(|(p, _)| p.last_result);
            let online_rev = self.store.put(&session.online_key, online_value.into(), Some(lease)).await?;
            session.save().await?;
            self.apply_rules(&agent, &session.state.labels).await?;
            let listing = self.store.list(&session.assignment_key).await?;
            let current = exact(listing.kvs, &session.assignment_key)
                .map(|kv| records::decode_assignment(&kv.key, &kv.value))
                .transpose()?;
            let online = self.store.watch(&session.online_key, online_rev).await?;
            let assignments = self.store.watch(&session.assignment_key, listing.revision).await?;
            Ok::<_, Error>((current, online, assignments))
        };
        let (current, online, assignments) = match start.await {
            Ok(started) => started,
            Err(e) => {
                let _ = self.store.revoke_lease(lease).await;
                return Err(e);
            }
        };
        let welcome = Welcome {
            session_id: session_id.clone(),
            heartbeat_interval: self.config.heartbeat_interval,
            lease_ttl: self.config.lease_ttl,
        };
        info!(agent_id = %agent, session_id = %session_id, lease = %lease, "agent session opened");
        self.metrics.session_opened(known);
        let metrics = Arc::clone(&self.metrics);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut outcome = Ok(());
            if session.tx.send(Ok(CoordinatorMessage::Welcome(welcome))).await.is_ok() {
                let delivered = match current {
                    Some(a) => session.deliver(a).await,
                    None => true,
                };
                if delivered {
                    outcome = session.run(messages, online, assignments, shutdown).await;
                }
            }
            match session.store.revoke_lease(session.lease).await {
                Ok(()) | Err(Error::LeaseExpired(_)) => {}
                Err(e) => {
                    warn!(agent_id = %session.agent, error = %e, "cannot revoke session lease; it expires")
                }
            }
            metrics.session_ended(outcome.is_err());
            match outcome {
                Ok(()) => {
                    info!(agent_id = %session.agent, session_id = %session.session_id, "agent session closed")
                }
                Err(e) => {
                    info!(agent_id = %session.agent, session_id = %session.session_id, reason = %e, "agent session ended");
                    let _ = session.tx.send(Err(e)).await;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
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
        let mut cache = CounterCache::default();
        let mut acked = Vec::with_capacity(report.summaries.len());
        let mut seen = HashSet::new();
        let mut new = 0usize;
        for s in &report.summaries {
            if !seen.insert(s.seq) {
                continue;
            }
            let stored = self.store_summary(s, &mut cache).await?;
            self.metrics.summary_ingested(s, stored);
            if stored {
                new += 1;
            }
            acked.push(s.seq);
        }
        acked.sort_unstable();
        tracing::Span::current().record("new", new);
        debug!(agent_id = %report.agent_id, new, duplicates = acked.len() - new, "summaries reported");
        Ok(acked)
    }

    async fn list_agents(&self, selector: &LabelSelector) -> Result<Vec<AgentInfo>> {
        list_agents(self.store.as_ref(), selector).await
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
