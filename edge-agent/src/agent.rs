//! `edge-agent run`: the agent's tasks and how they talk.
//!
//! ```text
//!            ┌──────────── session (gRPC bidi, reconnects with backoff) ───────────┐
//!  coordinator ── Assignment ──▶ assignments ──▶ sync (delta fetch) ──▶ load + self-test ──▶ Engine::swap
//!            ◀── Hello / Heartbeat(status) / AssignmentResult ──────────────────────┘
//!  sources ──▶ pipeline (batch, decide on a blocking thread, act) ──▶ spool ──▶ reporter ──▶ ReportSummaries
//! ```
//!
//! Every task runs on its own: decisions go on while a version downloads or the link is down,
//! heartbeats go on while the model is busy (inference runs on blocking threads), summaries
//! wait in the on-disk spool until the coordinator acknowledges them. The running version is
//! written to the state directory after each swap, so a restarted agent serves it again from
//! its cache before it has talked to anyone.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use llmchain_artifact::{Applied, PublicKey, RollbackStatement, TrustStore, TrustedKeys};
use llmchain_proto::{
    model::{MAX_SUMMARIES_PER_REPORT, ModelRef},
    pb::{self, fleet_client::FleetClient, registry_client::RegistryClient},
};
use llmchain_runtime::telemetry::{self, TracedChannel};
use prost::Message;
use serde::{Deserialize, Serialize};
use tch::Device;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    backoff::Backoff,
    engine::{Engine, LoadedModel},
    pipeline::{self, Decider, PipelineConfig, Spool, Stats, spool::write_atomic},
    sync::{BlobCache, Refusal, SyncError, Syncer, SyncerConfig, spawn_progress_display},
};

/// Everything `edge-agent run` needs, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This agent's identity.
    pub agent_id: String,
    /// Labels reported to the coordinator (`site=…`, `kind=…`).
    pub labels: Vec<(String, String)>,
    /// Coordinator URL, `http://host:port`.
    pub coordinator: String,
    /// Blob and manifest cache.
    pub cache_dir: PathBuf,
    /// Spool and agent state.
    pub state_dir: PathBuf,
    /// Trainer keys manifests must be signed with.
    pub trusted_keys: TrustedKeys,
    /// The pinned offline root key: only documents it signs change `trusted_keys`.
    pub root_key: Option<PublicKey>,
    /// Download rate limit in bytes per second.
    pub max_download_rate: Option<u64>,
    /// Versions kept in the cache per model (besides the running one).
    pub keep_versions: usize,
    /// How often pending summaries are sent.
    pub report_interval: Duration,
    /// Largest spool, in summaries; the oldest are dropped beyond it.
    pub spool_max: usize,
    /// Sources, batching, executors, summary windows.
    pub pipeline: PipelineConfig,
    /// Where the model runs.
    pub device: Device,
    /// First reconnect delay; doubles up to `max_backoff`, with jitter.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Mutual TLS with the identity from `edge-agent enroll`, or plaintext with `--insecure`.
    pub transport: llmchain_runtime::tls::Transport,
}

/// The version this agent serves, kept across restarts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct RunningState {
    model: String,
    version: u64,
}

const STATE_FILE: &str = "running.json";

/// What the agent reports about itself.
#[derive(Default)]
struct Status {
    running: Option<ModelRef>,
    pending: Option<ModelRef>,
    last_error: String,
}

/// State shared by the agent's tasks.
struct Agent {
    settings: Settings,
    engine: Arc<Engine>,
    syncer: Syncer,
    cache: BlobCache,
    spool: Arc<Spool>,
    stats: Arc<Stats>,
    status: Mutex<Status>,
    summary_bytes: AtomicU64,
    reconnects: AtomicU64,
    /// The trusted trainer keys and the root-signed document that set them.
    trust: Mutex<TrustStore>,
    /// Every call through it carries the caller's trace context.
    channel: TracedChannel,
}

impl Agent {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn running(&self) -> Option<ModelRef> {
        self.status().running.clone()
    }

    fn pb_status(&self) -> pb::AgentStatus {
        let status = self.status();
        let progress = self.syncer.progress();
        let (done, total) = match (&status.pending, &progress) {
            (Some(p), Some(pr)) if &pr.target == p => (pr.done_bytes, pr.total_bytes),
            _ => (0, 0),
        };
        pb::AgentStatus {
            running: status.running.clone().map(Into::into),
            pending: status.pending.clone().map(Into::into),
            download_done_bytes: done,
            download_total_bytes: total,
            decisions_per_second: self.stats.decisions_per_second(),
            raw_bytes: self.stats.raw_bytes(),
            summary_bytes: self.summary_bytes.load(Ordering::Relaxed),
            last_error: status.last_error.clone(),
            spool_depth: self.spool.depth() as u64,
        }
    }

    fn hello(&self) -> pb::AgentMessage {
        pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                agent_id: self.settings.agent_id.clone(),
                labels: self
                    .settings
                    .labels
                    .iter()
                    .map(|(k, v)| pb::Label { key: k.clone(), value: v.clone() })
                    .collect(),
                status: Some(self.pb_status()),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            })),
        }
    }

    fn save_running(&self, id: &ModelRef) -> anyhow::Result<()> {
        let state = RunningState { model: id.model.to_string(), version: id.version };
        write_atomic(&self.settings.state_dir, STATE_FILE, &serde_json::to_vec(&state)?)
            .with_context(|| format!("writing {}", self.settings.state_dir.join(STATE_FILE).display()))
    }
}

/// What `/metrics` reports: the counters the agent keeps for its heartbeats anyway.
impl crate::metrics::Observe for Agent {
    fn observe(&self) -> crate::metrics::AgentSnapshot {
        crate::metrics::AgentSnapshot {
            stats: self.stats.snapshot(),
            spool_depth: self.spool.depth() as u64,
            reconnects: self.reconnects.load(Ordering::Relaxed),
            sync: self.syncer.metrics(),
            download: self.syncer.progress(),
            running: self.running(),
        }
    }
}

fn read_running(state_dir: &Path) -> anyhow::Result<Option<ModelRef>> {
    let path = state_dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state: RunningState = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not valid agent state", path.display()))?;
    let id = ModelRef::try_from(pb::ModelRef { model: state.model, version: state.version })
        .with_context(|| format!("{} names an invalid version", path.display()))?;
    Ok(Some(id))
}

/// Runs the agent until `cancel` fires.
pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("creating the state directory {}", settings.state_dir.display()))?;
    let sync_config = SyncerConfig {
        trusted_keys: settings.trusted_keys.clone(),
        max_rate: settings.max_download_rate,
        ..SyncerConfig::default()
    };
    // One HTTP/2 connection carries the session, the reports and the downloads.
    // Mutual TLS with the enrolled identity, or plaintext with --insecure (see config.rs).
    let url = settings.transport.url(&settings.coordinator)?;
    let endpoint = Syncer::endpoint(&url, &sync_config)
        .with_context(|| format!("coordinator URL {:?}", settings.coordinator))?;
    let channel = settings.transport.apply(endpoint)?.connect_lazy();
    let cache = BlobCache::open(&settings.cache_dir)
        .with_context(|| format!("opening the model cache {}", settings.cache_dir.display()))?;
    let syncer = Syncer::new(channel.clone(), cache.clone(), sync_config);
    let _progress_display = spawn_progress_display(syncer.watch_progress());
    let spool = Arc::new(
        Spool::open(settings.state_dir.join("spool"), settings.spool_max)
            .with_context(|| format!("opening the summary spool in {}", settings.state_dir.display()))?,
    );
    // Before anything is loaded: a rotation accepted earlier revokes keys for cached versions too.
    let trust = TrustStore::open(&settings.state_dir, settings.root_key, settings.trusted_keys.clone())
        .with_context(|| format!("the trust document in {}", settings.state_dir.display()))?;
    let agent = Arc::new(Agent {
        trust: Mutex::new(trust),
        engine: Arc::new(Engine::new()),
        syncer,
        cache,
        spool,
        stats: settings.pipeline.stats.clone(),
        status: Mutex::new(Status::default()),
        summary_bytes: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        channel: telemetry::traced(channel),
        settings,
    });

    let _metrics_server = match agent.settings.metrics_listen {
        Some(addr) => {
            let registry = crate::metrics::registry(
                agent.clone() as Arc<dyn crate::metrics::Observe>,
                agent.stats.latency(),
            );
            Some(
                crate::metrics::spawn(addr, registry, cancel.clone())
                    .await
                    .with_context(|| format!("serving /metrics on {addr}"))?,
            )
        }
        None => None,
    };
    resume_running(&agent).await;

    let (assign_tx, assign_rx) = mpsc::channel(16);
    let (result_tx, result_rx) = mpsc::channel(64);
    let tasks = vec![
        tokio::spawn(session_loop(agent.clone(), assign_tx, result_rx, cancel.clone())),
        tokio::spawn(assignment_loop(agent.clone(), assign_rx, result_tx, cancel.clone())),
        tokio::spawn(report_loop(agent.clone(), cancel.clone())),
    ];
    // Records stay in their sources (files unread, MQTT messages with the broker) until a
    // model can decide them.
    let mut ready = agent.engine.ready();
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = ready.wait_for(|r| *r) => info!("a model is serving; opening the sources"),
    }
    let pipeline = pipeline::run_pipeline(
        agent.settings.pipeline.clone(),
        agent.engine.clone() as Arc<dyn Decider>,
        agent.spool.clone(),
        cancel.clone(),
    )
    .await;
    // The sources ended (a finite file or simulator) or we were cancelled: flush what the
    // spool holds before stopping, bounded, then stop the other tasks.
    if !cancel.is_cancelled() {
        let deadline =
            tokio::time::Instant::now() + agent.settings.report_interval * 4 + Duration::from_secs(5);
        while agent.spool.depth() > 0 && tokio::time::Instant::now() < deadline && !cancel.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cancel.cancel();
    for t in tasks {
        let _ = t.await;
    }
    pipeline.context("the decision pipeline")
}

/// Serves the version recorded in the state directory again, if it is still in the cache.
async fn resume_running(agent: &Arc<Agent>) {
    let id = match read_running(&agent.settings.state_dir) {
        Ok(Some(id)) => id,
        Ok(None) => return,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "ignoring the saved running version");
            return;
        }
    };
    let a = agent.clone();
    let loaded = tokio::task::spawn_blocking(move || -> anyhow::Result<LoadedModel> {
        let version = a.cache.load_version(&id, &a.settings.trusted_keys)?;
        let model = LoadedModel::load(&version.manifest, &version.blobs, a.settings.device)?;
        model.self_test()?;
        Ok(model)
    })
    .await;
    match loaded {
        Ok(Ok(model)) => {
            let id = model.id().clone();
            agent.engine.swap(model);
            agent.status().running = Some(id.clone());
            info!(version = %id, "serving the cached version from before the restart");
        }
        Ok(Err(e)) => {
            warn!(error = %format!("{e:#}"), "the saved running version cannot be served; waiting for an assignment")
        }
        Err(e) => warn!(error = %e, "loading the saved version panicked"),
    }
}

/// Holds the session to the coordinator, reconnecting with backoff, until cancelled.
async fn session_loop(
    agent: Arc<Agent>,
    assign_tx: mpsc::Sender<pb::Assignment>,
    mut results: mpsc::Receiver<pb::AssignmentResult>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(agent.settings.min_backoff, agent.settings.max_backoff);
    loop {
        let outcome = session_once(&agent, &assign_tx, &mut results, &cancel, &mut backoff).await;
        if cancel.is_cancelled() {
            return;
        }
        match outcome {
            Ok(()) => info!("the coordinator closed the session"),
            Err(e) => warn!(error = %format!("{e:#}"), "session to the coordinator failed"),
        }
        agent.reconnects.fetch_add(1, Ordering::Relaxed);
        let delay = backoff.next_delay();
        debug!(?delay, "reconnecting after");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session_once(
    agent: &Arc<Agent>,
    assign_tx: &mpsc::Sender<pb::Assignment>,
    results: &mut mpsc::Receiver<pb::AssignmentResult>,
    cancel: &CancellationToken,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    use pb::{agent_message::Kind as Up, coordinator_message::Kind as Down};
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(32);
    tx.send(agent.hello()).await?;
    let mut client = FleetClient::new(agent.channel.clone());
    let mut inbound =
        client.session(ReceiverStream::new(rx)).await.context("opening the session")?.into_inner();
    let welcome = match inbound.message().await.context("waiting for the welcome")? {
        Some(pb::CoordinatorMessage { kind: Some(Down::Welcome(w)) }) => w,
        other => bail!("the coordinator answered the hello with {other:?} instead of a welcome"),
    };
    backoff.reset();
    refresh_trust(agent).await;
    info!(session = %welcome.session_id, heartbeat_ms = welcome.heartbeat_interval_ms, "session open");
    let period = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {
                seq += 1;
                let hb = pb::Heartbeat { seq, sent_at: Some(SystemTime::now().into()), status: Some(agent.pb_status()) };
                tx.send(pb::AgentMessage { kind: Some(Up::Heartbeat(hb)) }).await.context("sending a heartbeat")?;
            }
            Some(result) = results.recv() => {
                tx.send(pb::AgentMessage { kind: Some(Up::Result(result)) }).await.context("sending a result")?;
            }
            msg = inbound.message() => match msg.context("reading the session")? {
                Some(pb::CoordinatorMessage { kind: Some(Down::Assignment(a)) }) => {
                    assign_tx.send(a).await.context("the assignment worker stopped")?;
                }
                Some(other) => debug!(?other, "ignoring a session message"),
                None => return Ok(()),
            },
        }
    }
}

/// Handles assignments one at a time, in order.
async fn assignment_loop(
    agent: Arc<Agent>,
    mut assignments: mpsc::Receiver<pb::Assignment>,
    results: mpsc::Sender<pb::AssignmentResult>,
    cancel: CancellationToken,
) {
    loop {
        let a = tokio::select! {
            _ = cancel.cancelled() => return,
            a = assignments.recv() => match a { Some(a) => a, None => return },
        };
        let target = a.target.as_ref().map(|t| format!("{}:{}", t.model, t.version)).unwrap_or_default();
        let span = info_span!(
            "assignment",
            id = %a.assignment_id,
            rollout = %a.rollout_id,
            version = %target,
            activate = a.activate,
            rollback = a.rollback
        );
        // A rollout step's assignment carries the step's trace context: this agent's fetch,
        // load and swap join the rollout's trace.
        if let Some(trace) = &a.trace {
            telemetry::set_remote_parent(&span, &trace.traceparent, &trace.tracestate);
        }
        let (outcome, message) = handle_assignment(&agent, &a).instrument(span).await;
        {
            let mut status = agent.status();
            status.pending = None;
            if outcome != pb::AssignmentOutcome::Activated && outcome != pb::AssignmentOutcome::Prefetched {
                status.last_error = message.clone();
            }
        }
        let result = pb::AssignmentResult {
            assignment_id: a.assignment_id.clone(),
            outcome: outcome as i32,
            message,
            running: agent.running().map(Into::into),
        };
        if results.send(result).await.is_err() {
            return;
        }
    }
}

async fn handle_assignment(agent: &Arc<Agent>, a: &pb::Assignment) -> (pb::AssignmentOutcome, String) {
    use pb::AssignmentOutcome as O;
    let target = match a.target.clone().map(ModelRef::try_from) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return (O::Refused, format!("invalid target: {e}")),
        None => return (O::Refused, "the assignment has no target".into()),
    };
    let running = agent.running();
    if a.activate && running.as_ref() == Some(&target) {
        return (O::Activated, format!("already running {target}"));
    }
    if let Some(r) = &running
        && r.model == target.model
        && target.version < r.version
    {
        if let Err(why) = check_rollback(agent, a, &target) {
            warn!(%target, running = %r, reason = %why, "refusing a downgrade");
            return (O::Refused, format!("{target} is older than the running {r}: {why}"));
        }
        info!(%target, running = %r, "downgrade allowed by a signed rollback statement");
    }
    agent.status().pending = Some(target.clone());
    info!(%target, activate = a.activate, "fetching");
    let mut fetched = agent.syncer.fetch_version(&target).await;
    // A key the agent does not know may come with a rotation it has not seen yet.
    if matches!(&fetched, Err(SyncError::Refused(Refusal::UntrustedKey { .. }))) && refresh_trust(agent).await
    {
        fetched = agent.syncer.fetch_version(&target).await;
    }
    let version = match fetched {
        Ok(v) => v,
        Err(e) if e.is_refused() => {
            warn!(%target, error = %e, "refused the version");
            return (O::Refused, e.to_string());
        }
        Err(e) => {
            warn!(%target, error = %e, "fetch failed");
            return (O::FetchFailed, e.to_string());
        }
    };
    info!(%target, downloaded = version.downloaded_bytes, reused = version.reused_bytes, "version verified in the cache");
    if !a.activate {
        return (O::Prefetched, format!("{target} downloaded and verified"));
    }
    let device = agent.settings.device;
    // Entered on the blocking thread: a span does not follow work into `spawn_blocking`.
    let load_span = info_span!("load", version = %target);
    let load = tokio::task::spawn_blocking(move || -> anyhow::Result<LoadedModel> {
        let _entered = load_span.enter();
        let model = LoadedModel::load(&version.manifest, &version.blobs, device)?;
        let probe = info_span!("self_test").in_scope(|| model.self_test()).context("self-test")?;
        info!(label = probe.label.as_str(), confidence = probe.confidence, "self-test passed");
        Ok(model)
    })
    .await;
    let model = match load {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            warn!(%target, error = %format!("{e:#}"), "load failed; the previous version keeps serving");
            return (O::LoadFailed, format!("{e:#}"));
        }
        Err(e) => return (O::LoadFailed, format!("loading panicked: {e}")),
    };
    info_span!("swap", version = %target, previous = tracing::field::Empty).in_scope(|| {
        if let Some(previous) = agent.engine.swap(model) {
            tracing::Span::current().record("previous", tracing::field::display(previous));
        }
        agent.status().running = Some(target.clone());
        if let Err(e) = agent.save_running(&target) {
            warn!(error = %format!("{e:#}"), "could not record the running version");
        }
    });
    let pinned = [target.clone()];
    match agent.cache.gc(agent.settings.keep_versions, &pinned) {
        Ok(report) => debug!(?report, "cache gc"),
        Err(e) => warn!(error = %e, "cache gc failed"),
    }
    (O::Activated, format!("running {target}"))
}

/// Why a downgrade to `target` is not allowed, if it is not: it needs the rollback flag and a
/// rollback statement for exactly `target`, unexpired, signed by a trusted trainer key. The
/// coordinator only relays the statement, so it cannot move agents back on its own.
fn check_rollback(agent: &Agent, a: &pb::Assignment, target: &ModelRef) -> Result<(), String> {
    if !a.rollback {
        return Err("the assignment is not a rollback".into());
    }
    let signed = a.rollback_statement.clone().ok_or("the rollback carries no signed rollback statement")?;
    let signed = llmchain_artifact::SignedStatement::try_from(signed)
        .map_err(|e| format!("the rollback statement is malformed: {e}"))?;
    RollbackStatement::verify(&signed, &agent.settings.trusted_keys, target, SystemTime::now())
        .map(|_| ())
        .map_err(|e| format!("the rollback statement is refused: {e}"))
}

/// Fetches the coordinator's latest trust document and applies it when the pinned root signed
/// it and it is newer; returns whether the trusted keys changed. Failures are logged: the
/// keys already trusted stay trusted.
async fn refresh_trust(agent: &Agent) -> bool {
    if agent.settings.root_key.is_none() {
        return false;
    }
    let mut client = RegistryClient::new(agent.channel.clone());
    let signed = match client.get_trust_document(pb::GetTrustDocumentRequest {}).await {
        Ok(r) => match r.into_inner().document {
            Some(d) => d,
            None => return false,
        },
        Err(status) => {
            debug!(code = ?status.code(), message = status.message(), "no trust document from the coordinator");
            return false;
        }
    };
    let applied = llmchain_artifact::SignedStatement::try_from(signed)
        .map_err(llmchain_artifact::Error::from)
        .and_then(|s| agent.trust.lock().unwrap_or_else(PoisonError::into_inner).apply(&s));
    match applied {
        Ok(Applied::Updated { version }) => {
            info!(version, keys = ?agent.settings.trusted_keys.key_ids(), "trust document applied");
            true
        }
        Ok(Applied::Unchanged) => false,
        Err(e) => {
            warn!(error = %e, "refusing the trust document the coordinator relayed");
            false
        }
    }
}

/// Sends spooled summaries and deletes those the coordinator acknowledged.
async fn report_loop(agent: Arc<Agent>, cancel: CancellationToken) {
    let mut backoff = Backoff::new(agent.settings.min_backoff, agent.settings.max_backoff);
    let mut client = FleetClient::new(agent.channel.clone());
    loop {
        let mut wait = agent.settings.report_interval;
        let pending = match agent.spool.pending(MAX_SUMMARIES_PER_REPORT) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading the spool");
                Vec::new()
            }
        };
        if !pending.is_empty() {
            let bytes: u64 = pending.iter().map(|s| s.encoded_len() as u64).sum();
            let request =
                pb::ReportSummariesRequest { agent_id: agent.settings.agent_id.clone(), summaries: pending };
            let span = info_span!("report_summaries", summaries = request.summaries.len(), bytes);
            match client.report_summaries(request).instrument(span).await {
                Ok(response) => {
                    let acked = response.into_inner().acked;
                    agent.summary_bytes.fetch_add(bytes, Ordering::Relaxed);
                    if let Err(e) = agent.spool.ack(&acked) {
                        warn!(error = %format!("{e:#}"), "deleting acknowledged summaries");
                    }
                    debug!(acked = acked.len(), "summaries acknowledged");
                    backoff.reset();
                    if agent.spool.depth() > 0 {
                        wait = Duration::ZERO;
                    }
                }
                Err(status) => {
                    wait = backoff
                        .next_delay()
                        .min(agent.settings.report_interval.max(Duration::from_millis(200)) * 8);
                    debug!(code = ?status.code(), message = status.message(), ?wait, "reporting summaries failed; they stay spooled");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
