//! Records in, decisions out, summaries: the agent's data path.
//!
//! Sources ([`source`]) push raw records with their arrival time into one bounded channel;
//! [`batch::next_batch`] groups what arrives together (at most `max_batch` records, at most
//! `max_wait` after the first one arrived); [`run_pipeline`] parses and preprocesses each
//! record, scores the batch with the [`Decider`] off the async runtime, hands every decision
//! to the executors ([`executor`]) and folds it into the current summary window
//! ([`summary`]). Closed windows go to a [`SummarySink`], normally the on-disk [`Spool`], from
//! which the session reports them to the coordinator.
//!
//! Invariants: a bad record is counted and skipped, never fatal; an executor failure is
//! logged and counted, never fatal; every summary describes decisions of exactly one model
//! version (a hot swap closes the window); per window `records = bad_records + decisions`.

pub mod batch;
pub mod executor;
pub mod source;
pub mod spool;
pub mod stats;
pub mod summary;

use std::{sync::Arc, time::Duration};

use llmchain_proto::{model::ModelRef, pb};
use llmchain_task::{Label, Record, preprocess};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use batch::next_batch;
pub use executor::{Decision, DecisionScore, ExecutorSpec, Executors};
pub use source::{RawRecord, SourceSpec};
pub use spool::Spool;
pub use stats::{Stats, StatsSnapshot};
pub use summary::{Window, WindowConfig};

/// Errors of the pipeline: bad specifications at start-up and spool I/O.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A source or executor specification could not be parsed.
    #[error("invalid {kind} {spec:?}: {reason}")]
    Spec {
        /// `source` or `executor`.
        kind: &'static str,
        /// The specification as given.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A spool entry or state file could not be decoded.
    #[error("corrupt spool file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The model's scores for one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Chosen label (highest probability).
    pub label: Label,
    /// Softmax probability of `label`.
    pub confidence: f64,
    /// Every label with its log-probability and softmax probability.
    pub scores: Vec<(Label, f64, f64)>,
}

/// Scores a batch of preprocessed texts with one model version; blocking (call it from
/// `spawn_blocking`).
pub trait Decider: Send + Sync + 'static {
    /// The version that will score the next batch (None: no model loaded yet).
    fn model(&self) -> Option<ModelRef>;
    /// Scores every text with one and the same model version, returned alongside.
    fn decide(&self, texts: &[String]) -> anyhow::Result<(ModelRef, Vec<Scored>)>;
}

/// Where closed summary windows go; blocking (the pipeline calls it from `spawn_blocking`).
pub trait SummarySink: Send + Sync + 'static {
    /// Stores one summary (its `seq` is assigned by the sink when it is a spool).
    fn submit(&self, summary: pb::Summary) -> Result<()>;
}

impl SummarySink for Spool {
    fn submit(&self, summary: pb::Summary) -> Result<()> {
        self.push(summary).map(|_| ())
    }
}

/// Everything [`run_pipeline`] needs besides the decider, the sink and the cancel token.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Agent id written into every summary.
    pub agent_id: String,
    /// Where records come from (at least one).
    pub sources: Vec<SourceSpec>,
    /// Where decisions go (possibly none).
    pub executors: Vec<ExecutorSpec>,
    /// Most records scored in one batch.
    pub max_batch: usize,
    /// Longest a record waits for its batch to fill (latency bound).
    pub max_wait: Duration,
    /// Capacity of the record channel between the sources and the batcher.
    pub channel_capacity: usize,
    /// When summary windows close and how many hard examples they keep.
    pub window: WindowConfig,
    /// Longest one executor action (a command, a publish) may take.
    pub executor_timeout: Duration,
    /// Counters shared with the session (heartbeats, metrics).
    pub stats: Arc<Stats>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            agent_id: "agent".to_string(),
            sources: Vec::new(),
            executors: Vec::new(),
            max_batch: 16,
            max_wait: Duration::from_millis(50),
            channel_capacity: 1024,
            window: WindowConfig::default(),
            executor_timeout: Duration::from_secs(5),
            stats: Arc::new(Stats::default()),
        }
    }
}

/// Runs the pipeline until every source has ended or `cancel` fires, then closes the last
/// window into `sink` and drains the executors.
///
/// Fails only at start-up (a source or executor that cannot be opened); afterwards bad
/// records, decider errors, executor failures and sink errors are logged and counted.
pub async fn run_pipeline(
    config: PipelineConfig,
    decider: Arc<dyn Decider>,
    sink: Arc<dyn SummarySink>,
    cancel: CancellationToken,
) -> Result<()> {
    let stats = config.stats.clone();
    let (record_tx, mut record_rx) = mpsc::channel::<RawRecord>(config.channel_capacity.max(1));
    let source_cancel = cancel.child_token();
    // Stops the sources on every way out, an early error included.
    let _stop_sources = source_cancel.clone().drop_guard();
    let mut sources = Vec::new();
    for spec in &config.sources {
        sources.push(source::spawn(spec, &config.agent_id, record_tx.clone(), source_cancel.clone()).await?);
    }
    drop(record_tx);
    let executors =
        Executors::start(&config.executors, &config.agent_id, config.executor_timeout, stats.clone()).await?;

    // The batcher runs on its own task so the main loop can wait on batches, the window
    // timer and cancellation without losing a half-collected batch.
    let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<RawRecord>>(2);
    let (max_batch, max_wait) = (config.max_batch.max(1), config.max_wait);
    let batcher = tokio::spawn(async move {
        while let Some(batch) = next_batch(&mut record_rx, max_batch, max_wait).await {
            if batch_tx.send(batch).await.is_err() {
                break;
            }
        }
    });

    let mut window = Window::new(config.agent_id.clone(), config.window.clone());
    info!(sources = config.sources.len(), executors = config.executors.len(), "pipeline started");
    loop {
        let deadline = window.deadline();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            batch = batch_rx.recv() => match batch {
                Some(batch) => {
                    process_batch(batch, &decider, &mut window, &executors, &stats, &sink).await;
                    // Under a steady stream of batches the timer branch may never win.
                    if tokio::time::Instant::now() >= window.deadline() {
                        close_window(&mut window, decider.model(), &stats, &sink).await;
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                close_window(&mut window, decider.model(), &stats, &sink).await;
            }
        }
    }
    source_cancel.cancel();
    batcher.abort();
    for s in sources {
        s.abort();
    }
    close_window(&mut window, decider.model(), &stats, &sink).await;
    executors.shutdown().await;
    info!("pipeline stopped");
    Ok(())
}

/// Parses, scores, acts on and summarises one batch.
#[tracing::instrument(name = "batch", skip_all, fields(records = batch.len()))]
async fn process_batch(
    batch: Vec<RawRecord>,
    decider: &Arc<dyn Decider>,
    window: &mut Window,
    executors: &Executors,
    stats: &Stats,
    sink: &Arc<dyn SummarySink>,
) {
    let mut good: Vec<(Record, RawRecord)> = Vec::with_capacity(batch.len());
    let mut bad_bytes = Vec::new();
    for raw in batch {
        stats.record(raw.bytes.len());
        match Record::parse(&raw.bytes) {
            Ok(record) => good.push((record, raw)),
            Err(e) => {
                stats.bad_record();
                debug!(error = %e, bytes = raw.bytes.len(), "bad record skipped");
                bad_bytes.push(raw.bytes.len());
            }
        }
    }
    let mut decided = None;
    if !good.is_empty() {
        let texts: Vec<String> = good.iter().map(|(r, _)| preprocess::record_text(r)).collect();
        let d = decider.clone();
        let result = tokio::task::spawn_blocking(move || d.decide(&texts).map(|out| (texts, out))).await;
        let decided_at = tokio::time::Instant::now();
        match result {
            Ok(Ok((texts, (model, scored)))) if scored.len() == texts.len() => {
                decided = Some((model, texts, scored, decided_at));
            }
            Ok(Ok((texts, (_, scored)))) => {
                error!(
                    texts = texts.len(),
                    scores = scored.len(),
                    "decider returned the wrong number of scores"
                );
                stats.decide_errors(texts.len());
            }
            Ok(Err(e)) => {
                warn!(error = %e, records = good.len(), "decider failed; batch skipped");
                stats.decide_errors(good.len());
            }
            Err(e) => {
                error!(error = %e, records = good.len(), "decider panicked; batch skipped");
                stats.decide_errors(good.len());
            }
        }
    }
    if let Some((model, ..)) = &decided
        && window.model().is_some_and(|m| m != model)
    {
        // A hot swap: every summary describes one version.
        info!(from = %window.model().expect("checked"), to = %model, "model changed; closing the window");
        close_window(window, None, stats, sink).await;
    }
    for n in bad_bytes {
        window.add_bad(n);
    }
    let Some((model, texts, scored, decided_at)) = decided else { return };
    window.set_model(model.clone());
    let model_name = model.to_string();
    for (((record, raw), text), s) in good.into_iter().zip(texts).zip(scored) {
        let latency = decided_at.saturating_duration_since(raw.arrived);
        stats.decision(s.label);
        stats.decision_latency(latency);
        let decision = Decision::new(&record, &s, &model_name);
        window.add_decision(raw.bytes.len(), latency, &text, &s);
        executors.dispatch(decision).await;
    }
    if window.is_full() {
        close_window(window, None, stats, sink).await;
    }
}

/// Closes the window and hands its summary to the sink on a blocking thread (a spool
/// fsyncs). An empty window, or one without any model to name, produces nothing.
async fn close_window(
    window: &mut Window,
    fallback: Option<ModelRef>,
    stats: &Stats,
    sink: &Arc<dyn SummarySink>,
) {
    let closed = window.close(fallback);
    if let Some(rate) = closed.decisions_per_s {
        stats.set_decision_rate(rate);
    }
    let Some(summary) = closed.summary else { return };
    let sink = sink.clone();
    match tokio::task::spawn_blocking(move || sink.submit(summary)).await {
        Ok(Ok(())) => stats.summary(),
        Ok(Err(e)) => {
            error!(error = %e, "summary could not be stored; dropped");
            stats.summary_error();
        }
        Err(e) => {
            error!(error = %e, "summary sink panicked; summary dropped");
            stats.summary_error();
        }
    }
}
