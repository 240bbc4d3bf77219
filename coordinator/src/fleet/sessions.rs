//! Agent sessions at fleet scale: liveness in memory, the store written when something lasting
//! changes.
//!
//! A heartbeat used to cost two store writes (a lease renewal and a fenced agent-record write,
//! fsynced), and every session watched its own two keys, so each write woke every session:
//! at a few thousand agents the coordinator spent its time in watch wake-ups and fsyncs. Now:
//! - liveness is in memory: a heartbeat moves the session's deadline and updates its state in
//!   [`Sessions`]; a reaper ends sessions silent past the lease TTL (and deletes their online
//!   key). The online keys of all local sessions hang on **one** lease of this coordinator,
//!   renewed every TTL/3, so they vanish one TTL after the coordinator dies;
//! - agent records are written when a session opens or ends, at once when a heartbeat changes
//!   what rollouts read (running/pending version, last error) or brings an assignment result,
//!   and otherwise by a flusher once per heartbeat interval, many agents per transaction, each
//!   fenced by its online key (so a replaced session never overwrites its successor);
//! - one hub task watches `fleet/online/` and `fleet/assignments/` and hands each change to
//!   the session of that agent by key; a watch that fails (compaction) is followed by a
//!   re-list whose values are handed out the same way.
//!
//! Invariants kept from before: an agent is online exactly while its online key exists; a
//! newer session (here or on another replica) ends the older one with `FAILED_PRECONDITION`;
//! a session delivers the stored assignment on start and every later one, each id once.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use llmchain_proto::{
    ApiError,
    model::{AgentId, AgentMessage, Assignment, Hello, Label},
};
use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    AgentMessages, CoordinatorMessage, FleetConfig, SESSION_QUEUE, SessionStream, Welcome, fresh_id,
    records::{
        self, ASSIGNMENTS_PREFIX, AgentState, ONLINE_PREFIX, OnlineRecord, RULES_PREFIX, RuleRecord,
        agent_key, assignment_key, online_key,
    },
};
use crate::{
    Error, Result,
    metrics::Metrics,
    store::{Compare, KeyValue, LeaseId, Op, Revision, Store, Txn, WatchEvent},
};

/// Longest pause of the reaper between two looks for silent sessions.
const REAP_TICK_MAX: Duration = Duration::from_secs(1);
/// Pause before the hub re-lists after its watch failed and the re-list failed too.
const HUB_RETRY: Duration = Duration::from_secs(1);

/// A change the hub or the reaper hands to one session.
#[derive(Debug)]
enum Event {
    /// The agent's online key changed (`None`: deleted) at `revision`.
    Online { value: Option<bytes::Bytes>, revision: Revision },
    /// The agent's assignment key was written.
    Assignment(Box<KeyValue>),
    /// No heartbeat within the lease TTL.
    Expired,
    /// A newer session of the same agent opened on this coordinator.
    Replaced(String),
    /// This coordinator's lease was lost, and the online keys with it.
    LeaseLost,
}

/// One local session as the coordinator keeps it between store writes.
struct Live {
    session_id: String,
    state: AgentState,
    deadline: tokio::time::Instant,
    /// The state changed since it was last written.
    dirty: bool,
    /// The reaper already told the session it expired.
    expired: bool,
    events: mpsc::UnboundedSender<Event>,
}

/// The local sessions, their liveness and the tasks that keep the store in step.
pub(super) struct Sessions {
    store: Arc<dyn Store>,
    config: FleetConfig,
    shutdown: CancellationToken,
    /// Stops the background tasks when the fleet is dropped.
    stop: CancellationToken,
    live: Mutex<HashMap<String, Live>>,
    /// This coordinator's lease, which every local online key hangs on.
    lease: AtomicI64,
    started: OnceCell<()>,
}

impl Drop for Sessions {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section only moves plain data: a poisoned map is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fields of a status that rollouts read: a change is written at once, not at the next flush.
fn lasting_change(before: &AgentState, status: &llmchain_proto::model::AgentStatus) -> bool {
    before.status.running != status.running
        || before.status.pending != status.pending
        || before.status.last_error != status.last_error
}

impl Sessions {
    pub(super) fn new(store: Arc<dyn Store>, config: FleetConfig, shutdown: CancellationToken) -> Self {
        Sessions {
            store,
            config,
            stop: shutdown.child_token(),
            shutdown,
            live: Mutex::default(),
            lease: AtomicI64::new(0),
            started: OnceCell::new(),
        }
    }

    fn lease(&self) -> LeaseId {
        LeaseId(self.lease.load(Ordering::Acquire))
    }

    /// Grants this coordinator's lease and starts the hub, reaper, flusher and lease keeper,
    /// once, before the first session registers (so the hub's watch starts before any write a
    /// session makes).
    async fn start(self: &Arc<Self>) -> Result<()> {
        self.started
            .get_or_try_init(|| async {
                let lease = self.store.grant_lease(self.config.lease_ttl).await?;
                self.lease.store(lease.0, Ordering::Release);
                let from = self.store.current_revision().await?;
                let weak = Arc::downgrade(self);
                tokio::spawn(run_hub(weak.clone(), Arc::clone(&self.store), from, self.stop.clone()));
                let reap = tokio::time::interval(self.reap_tick());
                tokio::spawn(every(weak.clone(), reap, self.stop.clone(), |s| async move { s.reap() }));
                let flush = tokio::time::interval(self.flush_interval());
                tokio::spawn(every(
                    weak.clone(),
                    flush,
                    self.stop.clone(),
                    |s| async move { s.flush().await },
                ));
                // The lease was just granted: its first renewal is one period away.
                let renew = (self.config.lease_ttl / 3).max(Duration::from_millis(10));
                let renew = tokio::time::interval_at(tokio::time::Instant::now() + renew, renew);
                tokio::spawn(every(weak, renew, self.stop.clone(), |s| async move { s.keep_lease().await }));
                info!(lease = %lease, from, "fleet session hub started");
                Ok::<_, Error>(())
            })
            .await?;
        Ok(())
    }

    fn reap_tick(&self) -> Duration {
        (self.config.lease_ttl / 8).clamp(Duration::from_millis(10), REAP_TICK_MAX)
    }

    /// Agent records of live sessions reach the store at most this late (heartbeat time and
    /// counters only; what rollouts read is written at once).
    fn flush_interval(&self) -> Duration {
        self.config.heartbeat_interval.max(Duration::from_millis(100))
    }

    /// Replaces the stored state of agents with a local session by the newer one in memory.
    pub(super) fn overlay(&self, agents: &mut [super::AgentInfo]) {
        let live = lock(&self.live);
        for info in agents {
            if let Some(l) = live.get(info.state.agent_id.as_str()) {
                info.state = l.state.clone();
            }
        }
    }

    /// Opens a session after `hello`; see the module docs.
    pub(super) async fn open(
        self: &Arc<Self>,
        hello: Hello,
        messages: AgentMessages,
        metrics: Arc<Metrics>,
    ) -> Result<SessionStream> {
        self.start().await?;
        let agent = hello.agent_id.clone();
        let session_id = fresh_id();
        let online_value = OnlineRecord { session_id: session_id.clone() }.encode();
        let previous = self.store.get(&agent_key(&agent)).await?;
        let known = previous.is_some();
        let last_result = match previous {
            Some(kv) => AgentState::decode(&kv.key, &kv.value)?.last_result,
            None => None,
        };
        let state = AgentState {
            agent_id: agent.clone(),
            labels: hello.labels,
            agent_version: hello.agent_version,
            status: hello.status,
            last_heartbeat: SystemTime::now(),
            session_id: session_id.clone(),
            last_result,
        };
        // Registered before any write, so every later change of its keys reaches it.
        let (events_tx, events) = mpsc::unbounded_channel();
        let replaced = lock(&self.live).insert(
            agent.to_string(),
            Live {
                session_id: session_id.clone(),
                state: state.clone(),
                deadline: tokio::time::Instant::now() + self.config.lease_ttl,
                dirty: false,
                expired: false,
                events: events_tx,
            },
        );
        if let Some(old) = replaced {
            let _ = old.events.send(Event::Replaced(session_id.clone()));
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let mut session = Session {
            sessions: Arc::clone(self),
            agent: agent.clone(),
            session_id: session_id.clone(),
            online_key: online_key(&agent),
            online_value: online_value.clone(),
            online_revision: 0,
            assignment_key: assignment_key(&agent),
            delivered_revision: 0,
            last_sent: None,
            tx,
        };
        let start = async {
            // The online key and the agent record in one write.
            let txn = Txn::new().and_then([
                Op::put_with_lease(session.online_key.clone(), online_value.clone(), self.lease()),
                Op::put(agent_key(&agent), state.encode()),
            ]);
            session.online_revision = self.store.txn(txn).await?.revision;
            apply_rules(self.store.as_ref(), &agent, &state.labels).await?;
            self.store.get(&session.assignment_key).await
        };
        let current = match start.await {
            Ok(current) => current,
            Err(e) => {
                session.end(false).await;
                return Err(e);
            }
        };
        let welcome = Welcome {
            session_id: session_id.clone(),
            heartbeat_interval: self.config.heartbeat_interval,
            lease_ttl: self.config.lease_ttl,
        };
        info!(agent_id = %agent, session_id = %session_id, "agent session opened");
        metrics.session_opened(known);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut outcome = Ok(());
            if session.tx.send(Ok(Box::new(CoordinatorMessage::Welcome(welcome)))).await.is_ok() {
                let delivered = match current {
                    Some(kv) => session.deliver_kv(&kv).await,
                    None => Ok(true),
                };
                outcome = match delivered {
                    Ok(true) => session.run(messages, events, shutdown).await,
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                };
            }
            session.end(true).await;
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
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).map(|m| m.map(|m| *m)).boxed())
    }

    /// Hands `event` to the local session of the agent `id`, if any.
    fn dispatch(&self, id: &str, event: Event) {
        if let Some(live) = lock(&self.live).get(id) {
            let _ = live.events.send(event);
        }
    }

    /// Writes the dirty agent records of live sessions, many per transaction.
    async fn flush(&self) {
        let dirty: Vec<(String, String, AgentState)> = {
            let mut live = lock(&self.live);
            live.values_mut()
                .filter(|l| l.dirty)
                .map(|l| {
                    l.dirty = false;
                    (l.state.agent_id.to_string(), l.session_id.clone(), l.state.clone())
                })
                .collect()
        };
        if dirty.is_empty() {
            return;
        }
        let batch = (self.store.max_txn_ops() / 2).max(1);
        let mut written = 0usize;
        for chunk in dirty.chunks(batch) {
            let fences = chunk.iter().map(|(_, sid, s)| fence(&s.agent_id, sid));
            let puts = chunk.iter().map(|(_, _, s)| Op::put(agent_key(&s.agent_id), s.encode()));
            match self.store.txn(Txn::new().when(fences).and_then(puts)).await {
                Ok(r) if r.succeeded => written += chunk.len(),
                Ok(_) => {
                    // Some session lost its key meanwhile: write the others one by one.
                    for (_, sid, s) in chunk {
                        let txn = Txn::new()
                            .when([fence(&s.agent_id, sid)])
                            .and_then([Op::put(agent_key(&s.agent_id), s.encode())]);
                        match self.store.txn(txn).await {
                            Ok(r) => written += usize::from(r.succeeded),
                            Err(error) => warn!(agent_id = %s.agent_id, %error, "cannot write agent record"),
                        }
                    }
                }
                Err(error) => {
                    warn!(agents = chunk.len(), %error, "cannot write agent records; they stay dirty");
                    let mut live = lock(&self.live);
                    for (id, sid, _) in chunk {
                        if let Some(l) = live.get_mut(id).filter(|l| &l.session_id == sid) {
                            l.dirty = true;
                        }
                    }
                }
            }
        }
        debug!(dirty = dirty.len(), written, "agent records flushed");
    }

    /// Tells every session past its deadline that it expired (it then ends itself).
    fn reap(&self) {
        let now = tokio::time::Instant::now();
        let mut expired = 0usize;
        for live in lock(&self.live).values_mut() {
            if !live.expired && live.deadline <= now {
                live.expired = true;
                expired += 1;
                let _ = live.events.send(Event::Expired);
            }
        }
        if expired > 0 {
            debug!(expired, "silent agent sessions expired");
        }
    }

    /// Renews this coordinator's lease; when it is gone, grants a new one and ends every
    /// local session (their online keys went with the old lease; the agents reconnect).
    async fn keep_lease(&self) {
        let lease = self.lease();
        match self.store.keep_alive(lease).await {
            Ok(_) => {}
            Err(Error::LeaseExpired(_)) => match self.store.grant_lease(self.config.lease_ttl).await {
                Ok(new) => {
                    self.lease.store(new.0, Ordering::Release);
                    let live = lock(&self.live);
                    warn!(old = %lease, new = %new, sessions = live.len(), "fleet lease lost; ending local sessions");
                    for l in live.values() {
                        let _ = l.events.send(Event::LeaseLost);
                    }
                }
                Err(error) => warn!(%error, "fleet lease lost and a new one cannot be granted"),
            },
            Err(error) => warn!(lease = %lease, %error, "cannot renew the fleet lease"),
        }
    }
}

/// The condition "`agent`'s online key names session `sid`".
fn fence(agent: &AgentId, sid: &str) -> Compare {
    Compare::Value(online_key(agent), OnlineRecord { session_id: sid.to_string() }.encode().into())
}

/// Applies the newest selector rule that matches `labels` and is newer than the agent's
/// stored assignment, so an agent that was away or had other labels catches up.
async fn apply_rules(store: &dyn Store, agent: &AgentId, labels: &[Label]) -> Result<()> {
    let rules = store.list(RULES_PREFIX).await?;
    if rules.kvs.is_empty() {
        return Ok(());
    }
    let key = assignment_key(agent);
    let current_revision = store.get(&key).await?.map_or(0, |kv| kv.mod_revision);
    let mut newest: Option<(Revision, Assignment)> = None;
    for kv in rules.kvs {
        if kv.mod_revision <= current_revision || newest.as_ref().is_some_and(|(r, _)| *r >= kv.mod_revision)
        {
            continue;
        }
        let (selector, template) = RuleRecord::decode(&kv.key, &kv.value)?;
        if selector.matches(labels) {
            newest = Some((kv.mod_revision, template));
        }
    }
    let Some((_, template)) = newest else { return Ok(()) };
    let assignment = super::for_agent(&template, agent);
    // Only if nothing was assigned since we looked: a newer direct assignment wins.
    let txn = Txn::new()
        .when([Compare::ModRevision(key.clone(), current_revision)])
        .and_then([Op::put(key, records::encode_assignment(&assignment))]);
    if store.txn(txn).await?.succeeded {
        info!(agent_id = %agent, assignment_id = %assignment.assignment_id, target = %assignment.target, "selector rule applied on connect");
    }
    Ok(())
}

/// Everything a running session needs; owned by its task.
struct Session {
    sessions: Arc<Sessions>,
    agent: AgentId,
    session_id: String,
    online_key: String,
    online_value: Vec<u8>,
    /// Revision of this session's write of its online key: older changes are not news.
    online_revision: Revision,
    assignment_key: String,
    /// Revision of the assignment delivered last: older ones are not news.
    delivered_revision: Revision,
    last_sent: Option<String>,
    /// Boxed: a channel allocates its slots up front, and 20,000 sessions' worth of
    /// assignment-sized slots was a tenth of the coordinator's memory.
    tx: mpsc::Sender<Result<Box<CoordinatorMessage>>>,
}

impl Session {
    fn lost(&self) -> Error {
        ApiError::Unavailable(format!(
            "session {} of agent {} lost its lease (no heartbeat within the lease ttl) or was replaced; reconnect",
            self.session_id, self.agent
        ))
        .into()
    }

    fn replaced(&self, by: &str) -> Error {
        ApiError::FailedPrecondition(format!(
            "session {} of agent {} was replaced by session {by}",
            self.session_id, self.agent
        ))
        .into()
    }

    /// Runs `f` on this session's in-memory entry; `None` when it is gone or not ours.
    fn with_live<T>(&self, f: impl FnOnce(&mut Live) -> T) -> Option<T> {
        let mut live = lock(&self.sessions.live);
        live.get_mut(self.agent.as_str()).filter(|l| l.session_id == self.session_id).map(f)
    }

    /// Writes the agent record now, only while this session holds the agent's online key.
    async fn save(&self) -> Result<()> {
        let state = self
            .with_live(|l| {
                l.dirty = false;
                l.state.clone()
            })
            .ok_or_else(|| self.lost())?;
        let txn = Txn::new()
            .when([Compare::Value(self.online_key.clone(), self.online_value.clone().into())])
            .and_then([Op::put(agent_key(&self.agent), state.encode())]);
        if self.sessions.store.txn(txn).await?.succeeded { Ok(()) } else { Err(self.lost()) }
    }

    /// Leaves the in-memory table and deletes the online key if it is still this session's,
    /// writing the last state with it when `flush` (a session that never started has none).
    async fn end(&self, flush: bool) {
        let live = {
            let mut table = lock(&self.sessions.live);
            match table.get(self.agent.as_str()) {
                Some(l) if l.session_id == self.session_id => table.remove(self.agent.as_str()),
                _ => None,
            }
        };
        let mut ops = vec![Op::delete(self.online_key.clone())];
        if let Some(live) = live.filter(|l| flush && l.dirty) {
            ops.push(Op::put(agent_key(&self.agent), live.state.encode()));
        }
        let txn = Txn::new()
            .when([Compare::Value(self.online_key.clone(), self.online_value.clone().into())])
            .and_then(ops);
        if let Err(error) = self.sessions.store.txn(txn).await {
            // The key hangs on this coordinator's lease: it goes when the lease does.
            warn!(agent_id = %self.agent, %error, "cannot delete the online key of an ended session");
        }
    }

    /// Sends the assignment stored in `kv` unless it is older than the one sent last.
    async fn deliver_kv(&mut self, kv: &KeyValue) -> Result<bool> {
        if kv.mod_revision <= self.delivered_revision {
            return Ok(true);
        }
        self.delivered_revision = kv.mod_revision;
        let assignment = records::decode_assignment(&kv.key, &kv.value)?;
        Ok(self.deliver(assignment).await)
    }

    /// Sends the assignment unless this session sent the same id already.
    async fn deliver(&mut self, assignment: Assignment) -> bool {
        if self.last_sent.as_deref() == Some(assignment.assignment_id.as_str()) {
            return true;
        }
        self.last_sent = Some(assignment.assignment_id.clone());
        debug!(agent_id = %self.agent, assignment_id = %assignment.assignment_id, "assignment sent");
        self.tx.send(Ok(Box::new(CoordinatorMessage::Assignment(assignment)))).await.is_ok()
    }

    async fn on_message(&mut self, msg: AgentMessage) -> Result<()> {
        match msg {
            AgentMessage::Hello(_) => {
                Err(ApiError::invalid("hello", "only the first message of a session may be a hello").into())
            }
            AgentMessage::Heartbeat(h) => {
                let deadline = tokio::time::Instant::now() + self.sessions.config.lease_ttl;
                let lasting = self
                    .with_live(|l| {
                        if l.expired {
                            return None;
                        }
                        let lasting = lasting_change(&l.state, &h.status);
                        l.deadline = deadline;
                        l.state.status = h.status;
                        l.state.last_heartbeat = SystemTime::now();
                        l.dirty = true;
                        Some(lasting)
                    })
                    .flatten()
                    .ok_or_else(|| self.lost())?;
                if lasting { self.save().await } else { Ok(()) }
            }
            AgentMessage::Result(r) => {
                info!(agent_id = %self.agent, assignment_id = %r.assignment_id, outcome = r.outcome.as_str(), message = %r.message, "assignment result");
                self.with_live(|l| l.state.last_result = Some((r, SystemTime::now())))
                    .ok_or_else(|| self.lost())?;
                self.save().await
            }
        }
    }

    /// Runs until the agent leaves (Ok) or the session must end (the error to send).
    async fn run(
        &mut self,
        mut messages: AgentMessages,
        mut events: mpsc::UnboundedReceiver<Event>,
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
                event = events.recv() => match event {
                    None | Some(Event::Expired | Event::LeaseLost) => return Err(self.lost()),
                    Some(Event::Replaced(by)) => return Err(self.replaced(&by)),
                    Some(Event::Online { revision, .. }) if revision <= self.online_revision => {}
                    Some(Event::Online { value: None, .. }) => return Err(self.lost()),
                    Some(Event::Online { value: Some(v), .. }) => {
                        if v.as_ref() != self.online_value.as_slice() {
                            let newer = OnlineRecord::decode(&self.online_key, &v)?;
                            return Err(self.replaced(&newer.session_id));
                        }
                    }
                    Some(Event::Assignment(kv)) => {
                        if !self.deliver_kv(&kv).await? {
                            return Ok(());
                        }
                    }
                },
            }
        }
    }
}

/// Watches the online and assignment keys and hands each change to its agent's session.
async fn run_hub(
    sessions: std::sync::Weak<Sessions>,
    store: Arc<dyn Store>,
    mut from: Revision,
    stop: CancellationToken,
) {
    loop {
        let watches = async {
            let online = store.watch(ONLINE_PREFIX, from).await?;
            let assignments = store.watch(ASSIGNMENTS_PREFIX, from).await?;
            Ok::<_, Error>(futures::stream::select(online, assignments))
        };
        let failure = match watches.await {
            Ok(mut events) => loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    event = events.next() => event,
                };
                let Some(sessions) = sessions.upgrade() else { return };
                match event {
                    Some(Ok(event)) => dispatch_event(&sessions, event),
                    Some(Err(e)) => break e,
                    None => break Error::StoreUnavailable("store watch ended".into()),
                }
            },
            Err(e) => e,
        };
        warn!(error = %failure, "fleet watch failed; re-listing online and assignment keys");
        loop {
            let Some(strong) = sessions.upgrade() else { return };
            match resync(&strong, store.as_ref()).await {
                Ok(revision) => {
                    from = revision;
                    break;
                }
                Err(error) => {
                    warn!(%error, "fleet re-list failed; retrying");
                    drop(strong);
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(HUB_RETRY) => {}
                    }
                }
            }
        }
    }
}

fn dispatch_event(sessions: &Sessions, event: WatchEvent) {
    match event {
        WatchEvent::Put(kv) => {
            if let Some(id) = kv.key.strip_prefix(ONLINE_PREFIX) {
                let id = id.to_string();
                sessions.dispatch(&id, Event::Online { value: Some(kv.value), revision: kv.mod_revision });
            } else if let Some(id) = kv.key.strip_prefix(ASSIGNMENTS_PREFIX) {
                let id = id.to_string();
                sessions.dispatch(&id, Event::Assignment(Box::new(kv)));
            }
        }
        WatchEvent::Delete { key, revision } => {
            if let Some(id) = key.strip_prefix(ONLINE_PREFIX) {
                sessions.dispatch(id, Event::Online { value: None, revision });
            }
        }
    }
}

/// Hands every local session its online key and assignment as listed now; returns the
/// revision to watch from.
async fn resync(sessions: &Sessions, store: &dyn Store) -> Result<Revision> {
    let online = store.list(ONLINE_PREFIX).await?;
    let assignments = store.list(ASSIGNMENTS_PREFIX).await?;
    let online_by_id: HashMap<&str, &KeyValue> =
        online.kvs.iter().filter_map(|kv| Some((kv.key.strip_prefix(ONLINE_PREFIX)?, kv))).collect();
    let live = lock(&sessions.live);
    for (id, l) in live.iter() {
        let value = online_by_id.get(id.as_str()).map(|kv| kv.value.clone());
        let _ = l.events.send(Event::Online { value, revision: online.revision });
    }
    for kv in assignments.kvs {
        if let Some(l) = kv.key.strip_prefix(ASSIGNMENTS_PREFIX).and_then(|id| live.get(id)) {
            let _ = l.events.send(Event::Assignment(Box::new(kv)));
        }
    }
    Ok(online.revision.min(assignments.revision))
}

/// Runs `job` on the sessions at each tick of `interval` (a missed tick is delayed, not
/// bunched) until `stop` is cancelled or the sessions are dropped: the reaper, the flusher and
/// the lease keeper.
async fn every<Fut: std::future::Future<Output = ()>>(
    sessions: std::sync::Weak<Sessions>,
    mut interval: tokio::time::Interval,
    stop: CancellationToken,
    job: impl Fn(Arc<Sessions>) -> Fut,
) {
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let Some(sessions) = sessions.upgrade() else { return };
        job(sessions).await;
    }
}
