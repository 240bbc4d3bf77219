//! The rollout controller: a loop that, on the one coordinator leading the
//! `election/rollout-controller` election, advances every active rollout each tick.
//!
//! Invariants:
//! - Every transition is a compare-and-swap on the rollout key's `mod_revision`: a controller
//!   that lost leadership without noticing (or raced an operator) fails the swap and
//!   re-reads, so no step is ever started, passed or failed twice, and none is skipped.
//! - Side effects are fenced and idempotent: assignments are written in transactions that
//!   require the rollout key to still be at the revision the decision was made on, their ids
//!   are derived from rollout id + step + agent, and a flag in the record (set by the next
//!   swap) says they are written. A leader that dies between the two just makes its successor
//!   write the same assignments again.
//! - Time (soak) is wall-clock milliseconds stored in the record, so a new leader continues a
//!   soak where the old one left it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, SystemTime},
};

use llmchain_proto::model::{
    AgentId, Assignment, AssignmentOutcome, LabelSelector, ModelRef, SignedStatement, TraceContext,
};
use tokio::{task::JoinHandle, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, info, info_span, warn};

use super::{
    gates::{self, Observations},
    records::{
        ELECTION_KEY, ROLLOUTS_PREFIX, Rollout, RolloutState, StepState, activate_id, is_forward_assignment,
        millis, prefetch_id, rollback_id, rollout_key,
    },
};
use crate::{
    Error, Result,
    fleet::{self, AgentInfo},
    store::{Compare, Revision, Store, Txn, election::Election},
};

/// Assignments written per fenced transaction (etcd allows 128 operations by default).
const WRITE_CHUNK: usize = 64;
/// Transitions one rollout may take in one tick (e.g. passed → next step activating → written).
const MAX_TRANSITIONS_PER_TICK: usize = 8;

/// Timing of the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerConfig {
    /// How often the leader looks at every active rollout.
    pub tick: Duration,
    /// TTL of the leader's lease: a crashed leader is replaced after about this long.
    pub lease_ttl: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig { tick: Duration::from_millis(500), lease_ttl: Duration::from_secs(10) }
    }
}

/// The leader-elected rollout controller of one coordinator.
pub struct Controller {
    store: Arc<dyn Store>,
    config: ControllerConfig,
    coordinator: String,
}

/// The outcome of one look at a rollout.
enum Progress {
    /// A transition was stored; look again at once.
    Moved(Box<Rollout>, Revision),
    /// Nothing more to do this tick (waiting, bookkeeping stored, or lost a race).
    Idle,
}

impl Controller {
    /// A controller over `store`; `coordinator` is its election candidate id and the name it
    /// records in rollout histories.
    pub fn new(store: Arc<dyn Store>, config: ControllerConfig, coordinator: impl Into<String>) -> Self {
        Controller { store, config, coordinator: coordinator.into() }
    }

    /// Runs [`Controller::run`] on its own task.
    pub fn spawn(self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }

    /// Campaigns for leadership and, while leading, advances rollouts every tick, until
    /// `shutdown`; then resigns, so another coordinator takes over at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let election = Election::start(
            Arc::clone(&self.store),
            ELECTION_KEY,
            &self.coordinator,
            self.config.lease_ttl,
            &shutdown,
        );
        let mut ticks = tokio::time::interval(self.config.tick);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut leading = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if election.is_leader() != leading {
                leading = election.is_leader();
                info!(coordinator = %self.coordinator, leading, "rollout controller leadership changed");
            }
            if !leading {
                continue;
            }
            if let Err(error) = self.pass(&election).await {
                warn!(coordinator = %self.coordinator, %error, "rollout controller pass failed; retrying next tick");
            }
        }
        election.resign().await;
    }

    /// One look at every rollout that may need work.
    async fn pass(&self, election: &Election) -> Result<()> {
        for kv in self.store.list(ROLLOUTS_PREFIX).await?.kvs {
            let rollout = match Rollout::decode(&kv.key, &kv.value) {
                Ok(rollout) => rollout,
                Err(error) => {
                    // One corrupt record must not hold up the other rollouts.
                    warn!(key = %kv.key, %error, "skipping unreadable rollout");
                    continue;
                }
            };
            if rollout.state != RolloutState::Running && !rollout.rollback_pending {
                continue;
            }
            let (mut rollout, mut revision) = (rollout, kv.mod_revision);
            for _ in 0..MAX_TRANSITIONS_PER_TICK {
                if !election.is_leader() {
                    return Ok(());
                }
                // Debug, not info: traced, it would be a new trace per tick per rollout.
                let span = debug_span!("rollout", rollout_id = %rollout.id, step = rollout.current_step);
                match self.advance(&rollout, revision).instrument(span).await {
                    Ok(Progress::Moved(next, rev)) => (rollout, revision) = (*next, rev),
                    Ok(Progress::Idle) => break,
                    Err(error) => {
                        // One broken rollout must not hold up the others.
                        warn!(rollout_id = %rollout.id, %error, "cannot advance rollout");
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Stores `next` if the rollout is still at `revision`.
    async fn swap(&self, revision: Revision, next: Rollout) -> Result<Progress> {
        let key = rollout_key_of(&next)?;
        let txn = Txn::new()
            .when([Compare::ModRevision(key.clone(), revision)])
            .and_then([crate::store::Op::put(key, next.encode())]);
        let result = self.store.txn(txn).await?;
        if result.succeeded {
            Ok(Progress::Moved(Box::new(next), result.revision))
        } else {
            debug!(rollout_id = %next.id, "rollout changed under the controller; re-reading next tick");
            Ok(Progress::Idle)
        }
    }

    /// Like [`Controller::swap`], but returns [`Progress::Idle`] either way: for bookkeeping that
    /// needs no immediate second look.
    async fn note(&self, revision: Revision, next: Rollout) -> Result<Progress> {
        self.swap(revision, next).await.map(|_| Progress::Idle)
    }

    /// Writes assignments only while the rollout is still at `revision`; false when it moved.
    async fn fenced_write(
        &self,
        rollout: &Rollout,
        revision: Revision,
        plan: &[(AgentId, Assignment)],
    ) -> Result<bool> {
        let key = rollout_key_of(rollout)?;
        for chunk in plan.chunks(WRITE_CHUNK) {
            let txn = Txn::new()
                .when([Compare::ModRevision(key.clone(), revision)])
                .and_then(chunk.iter().map(|(agent, a)| fleet::assignment_op(agent, a)));
            if !self.store.txn(txn).await?.succeeded {
                debug!(rollout_id = %rollout.id, "rollout changed while writing assignments; re-reading next tick");
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Decides and stores the next transition of one rollout.
    async fn advance(&self, r: &Rollout, revision: Revision) -> Result<Progress> {
        let now = millis(SystemTime::now());
        if r.rollback_pending {
            return self.roll_back(r, revision).await;
        }
        if r.state != RolloutState::Running {
            return Ok(Progress::Idle);
        }
        let i = r.current_step as usize;
        let Some(step) = r.steps.get(i) else {
            return Err(Error::Store(format!("rollout {} has no step {i}", r.id)));
        };
        let mut next = r.clone();
        match step.state {
            StepState::Pending => {
                let s = &mut next.steps[i];
                s.state = StepState::Activating;
                s.started_at_ms = Some(now);
                s.pending_agent_ids = s.agent_ids.clone();
                let message =
                    format!("step {i} activating: {} agents [{}]", s.agent_ids.len(), s.agent_ids.join(", "));
                next.record(&self.coordinator, message);
                info!(rollout_id = %r.id, step = i, agents = step.agent_ids.len(), "rollout step activating");
                self.swap(revision, next).await
            }
            StepState::Activating if !step.assignments_written => {
                let span = step_span(r, i);
                let plan = span.in_scope(|| self.step_plan(r, i))?;
                if !self.fenced_write(r, revision, &plan).instrument(span).await? {
                    return Ok(Progress::Idle);
                }
                debug!(rollout_id = %r.id, step = i, assignments = plan.len(), "rollout step assignments stored");
                next.steps[i].assignments_written = true;
                self.swap(revision, next).await
            }
            StepState::Activating | StepState::Soaking => {
                let (obs, pending) = self.observe(r, i).await?;
                let verdict = gates::evaluate(&r.spec.gates, &obs);
                let s = &mut next.steps[i];
                s.gates = verdict.results.clone();
                s.pending_agent_ids = pending;
                if verdict.failed() {
                    s.state = StepState::Failed;
                    s.finished_at_ms = Some(now);
                    next.state = RolloutState::RolledBack;
                    next.rollback_pending = true;
                    let failures = verdict.failures().join(", ");
                    warn!(rollout_id = %r.id, step = i, %failures, "rollout gate failed; rolling back");
                    next.record(&self.coordinator, format!("step {i} failed: {failures}"));
                    return self.swap(revision, next).await;
                }
                if step.state == StepState::Activating && s.pending_agent_ids.is_empty() {
                    s.state = StepState::Soaking;
                    s.soak_started_at_ms = Some(now);
                    info!(rollout_id = %r.id, step = i, "rollout step soaking");
                    next.record(&self.coordinator, format!("step {i} soaking"));
                    return self.swap(revision, next).await;
                }
                let soak = r.spec.steps.get(i).map_or(0, |st| st.soak_ms);
                let soaked = s.soak_started_at_ms.is_some_and(|t| now.saturating_sub(t) >= soak);
                if step.state == StepState::Soaking && soaked && verdict.complete() {
                    s.state = StepState::Passed;
                    s.finished_at_ms = Some(now);
                    info!(rollout_id = %r.id, step = i, "rollout step passed");
                    next.record(&self.coordinator, format!("step {i} passed"));
                    if i + 1 == next.steps.len() {
                        next.state = RolloutState::Succeeded;
                        info!(rollout_id = %r.id, "rollout succeeded");
                        next.record(&self.coordinator, "rollout succeeded");
                    } else {
                        next.current_step += 1;
                    }
                    return self.swap(revision, next).await;
                }
                if next != *r { self.note(revision, next).await } else { Ok(Progress::Idle) }
            }
            StepState::Passed | StepState::Failed => {
                Err(Error::Store(format!("rollout {} is running but its current step {i} is finished", r.id)))
            }
        }
    }

    /// The assignments step `i` stores: the target, activated, for its agents, and when the
    /// rollout pre-fetches, the target, not activated, for the next step's agents.
    fn step_plan(&self, r: &Rollout, i: usize) -> Result<Vec<(AgentId, Assignment)>> {
        let target = r.target()?;
        let trace = step_trace();
        let assignment = |id: String, activate: bool| Assignment {
            assignment_id: id,
            target: target.clone(),
            activate,
            rollback: false,
            rollout_id: Some(r.id.clone()),
            trace: trace.clone(),
            rollback_statement: None,
        };
        let mut plan = Vec::new();
        for agent in &r.steps[i].agent_ids {
            plan.push((agent_id(agent)?, assignment(activate_id(&r.id, i, agent), true)));
        }
        if r.spec.prefetch
            && let Some(upcoming) = r.steps.get(i + 1)
        {
            for agent in &upcoming.agent_ids {
                plan.push((agent_id(agent)?, assignment(prefetch_id(&r.id, i + 1, agent), false)));
            }
        }
        Ok(plan)
    }

    /// Writes the rollback assignments, then clears `rollback_pending`.
    async fn roll_back(&self, r: &Rollout, revision: Revision) -> Result<Progress> {
        let target = r.target()?;
        let mut plan = Vec::new();
        let mut stranded = Vec::new();
        for agent in r.updated_agents() {
            let Some(version) = r.previous_of(agent) else {
                stranded.push(agent.clone());
                continue;
            };
            let assignment = Assignment {
                assignment_id: rollback_id(&r.id, agent),
                target: ModelRef { model: target.model.clone(), version },
                activate: true,
                rollback: true,
                rollout_id: Some(r.id.clone()),
                trace: None,
                rollback_statement: None,
            };
            let assignment =
                Assignment { rollback_statement: statement_for(r, &assignment.target), ..assignment };
            plan.push((agent_id(agent)?, assignment));
        }
        if !self.fenced_write(r, revision, &plan).await? {
            return Ok(Progress::Idle);
        }
        let mut next = r.clone();
        next.rollback_pending = false;
        let mut message = format!("rolled back {} agents to their previous version", plan.len());
        if !stranded.is_empty() {
            message.push_str(&format!(
                "; no previous version known for [{}], which keep the target",
                stranded.join(", ")
            ));
        }
        info!(rollout_id = %r.id, agents = plan.len(), stranded = stranded.len(), "rollout rolled back");
        next.record(&self.coordinator, message);
        self.swap(revision, next).await
    }

    /// Gathers what the agents moved so far (steps `0..=i`) reported, and which agents of step
    /// `i` have not settled.
    async fn observe(&self, r: &Rollout, i: usize) -> Result<(Observations, Vec<String>)> {
        let target = r.target()?;
        let infos: HashMap<String, AgentInfo> =
            fleet::list_agents(self.store.as_ref(), &LabelSelector::default())
                .await?
                .into_iter()
                .map(|a| (a.state.agent_id.to_string(), a))
                .collect();
        let mut obs = Observations::default();
        let mut baseline: BTreeMap<String, u64> = BTreeMap::new();
        let mut pending = Vec::new();
        for (index, step) in r.steps.iter().enumerate().take(i + 1) {
            for agent in &step.agent_ids {
                let info = infos.get(agent);
                let result = info.and_then(|a| a.state.last_result.as_ref()).map(|(res, _)| res);
                let failed = result.is_some_and(|res| {
                    is_forward_assignment(&r.id, &res.assignment_id)
                        && matches!(
                            res.outcome,
                            AssignmentOutcome::LoadFailed
                                | AssignmentOutcome::Refused
                                | AssignmentOutcome::FetchFailed
                        )
                });
                let activated = info.is_some_and(|a| a.state.status.running.as_ref() == Some(&target))
                    || result.is_some_and(|res| {
                        res.outcome == AssignmentOutcome::Activated
                            && res.assignment_id == activate_id(&r.id, index, agent)
                    });
                if failed {
                    obs.load_failures += 1;
                } else if index == i && !activated {
                    pending.push(agent.clone());
                }
                let previous = r.previous_of(agent);
                for s in fleet::agent_summaries(self.store.as_ref(), &agent_id(agent)?).await? {
                    let decisions: u64 = s.label_counts.iter().map(|(_, c)| c).sum();
                    if s.model == target {
                        obs.records += s.records;
                        obs.bad_records += s.bad_records;
                        obs.latency_windows.push((s.latency_ms[2], decisions));
                        for (label, count) in &s.label_counts {
                            *obs.target_labels.entry(label.clone()).or_default() += count;
                        }
                    } else if s.model.model == target.model && Some(s.model.version) == previous {
                        for (label, count) in &s.label_counts {
                            *baseline.entry(label.clone()).or_default() += count;
                        }
                    }
                }
            }
        }
        if baseline.values().sum::<u64>() == 0
            && let Some(version) = r.baseline
        {
            // These agents reported nothing of their previous version: compare with the fleet.
            let reference = ModelRef { model: target.model.clone(), version };
            if let Some(aggregate) = fleet::version_aggregate(self.store.as_ref(), &reference).await? {
                baseline = aggregate.decisions;
            }
        }
        obs.baseline_labels = (baseline.values().sum::<u64>() > 0).then_some(baseline);
        Ok((obs, pending))
    }
}

fn agent_id(agent: &str) -> Result<AgentId> {
    AgentId::parse("agent_id", agent).map_err(|e| Error::Store(format!("corrupt rollout record: {e}")))
}

fn rollout_key_of(r: &Rollout) -> Result<String> {
    let id = llmchain_proto::model::RolloutId::parse("id", &r.id)
        .map_err(|e| Error::Store(format!("corrupt rollout record: {e}")))?;
    Ok(rollout_key(&id))
}

/// The operator's rollback statement when it names `target`. The coordinator cannot verify
/// it (it holds no trainer keys' trust decisions); agents do.
fn statement_for(r: &Rollout, target: &ModelRef) -> Option<SignedStatement> {
    if r.rollback_statement.is_empty() {
        return None;
    }
    let bytes = hex::decode(&r.rollback_statement).ok()?;
    let wire = <llmchain_proto::pb::SignedStatement as prost::Message>::decode(bytes.as_slice()).ok()?;
    let signed = SignedStatement::try_from(wire).ok()?;
    let statement = llmchain_artifact::RollbackStatement::from_canonical_bytes(&signed.payload).ok()?;
    (statement.target == *target).then_some(signed)
}

/// The span of step `step`'s activation: a child of the call that created the rollout (a root
/// when that call was untraced), the parent of every agent's fetch, load and swap for the step.
fn step_span(r: &Rollout, step: usize) -> tracing::Span {
    let agents = r.steps.get(step).map_or(0, |s| s.agent_ids.len());
    let target = format!("{}:{}", r.spec.target.model, r.spec.target.version);
    let span = info_span!(parent: None, "rollout_step", rollout_id = %r.id, step, agents, version = %target);
    llmchain_runtime::telemetry::set_remote_parent(&span, &r.traceparent, &r.tracestate);
    span
}

/// Trace context of the current span (the step's, see [`step_span`]), for the assignments.
fn step_trace() -> Option<TraceContext> {
    llmchain_runtime::telemetry::current_w3c()
        .map(|(traceparent, tracestate)| TraceContext { traceparent, tracestate })
}
