//! Counters of the pipeline, shared with the session for heartbeats and metrics.
//!
//! Plain relaxed atomics: each counter is monotonic and read on its own, so no ordering
//! between them is promised (a snapshot may be a few records apart across fields).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use llmchain_task::Label;
use serde::Serialize;

/// Shared counters since the pipeline started.
#[derive(Debug, Default)]
pub struct Stats {
    records: AtomicU64,
    raw_bytes: AtomicU64,
    bad_records: AtomicU64,
    decisions: [AtomicU64; Label::ALL.len()],
    decide_errors: AtomicU64,
    executor_failures: AtomicU64,
    summaries: AtomicU64,
    summary_errors: AtomicU64,
    /// `f64` bits of the decisions per second of the last closed window.
    decision_rate: AtomicU64,
    /// Arrival-to-decision latency of every decision (for `/metrics`).
    latency: crate::metrics::LatencyHistogram,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// Records received (good and bad).
    pub records: u64,
    /// Raw bytes of those records.
    pub raw_bytes: u64,
    /// Records that failed to parse.
    pub bad_records: u64,
    /// Decisions per label, in [`Label::ALL`] order.
    pub decisions: [u64; Label::ALL.len()],
    /// Records the decider failed on (not decided, not bad).
    pub decide_errors: u64,
    /// Executor actions that failed or timed out.
    pub executor_failures: u64,
    /// Summaries handed to the sink.
    pub summaries: u64,
    /// Summaries the sink refused (lost).
    pub summary_errors: u64,
    /// Decisions per second over the last closed window.
    pub decisions_per_s: f64,
}

impl StatsSnapshot {
    /// Decisions of every label together.
    pub fn decided(&self) -> u64 {
        self.decisions.iter().sum()
    }
}

impl Stats {
    /// A copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            records: self.records.load(Relaxed),
            raw_bytes: self.raw_bytes.load(Relaxed),
            bad_records: self.bad_records.load(Relaxed),
            decisions: std::array::from_fn(|i| self.decisions[i].load(Relaxed)),
            decide_errors: self.decide_errors.load(Relaxed),
            executor_failures: self.executor_failures.load(Relaxed),
            summaries: self.summaries.load(Relaxed),
            summary_errors: self.summary_errors.load(Relaxed),
            decisions_per_s: f64::from_bits(self.decision_rate.load(Relaxed)),
        }
    }

    /// Raw bytes of the records received so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes.load(Relaxed)
    }

    /// Decisions per second over the last closed window.
    pub fn decisions_per_second(&self) -> f64 {
        f64::from_bits(self.decision_rate.load(Relaxed))
    }

    /// Counts a received record of `bytes` bytes.
    pub fn record(&self, bytes: usize) {
        self.records.fetch_add(1, Relaxed);
        self.raw_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts a record that failed to parse.
    pub fn bad_record(&self) {
        self.bad_records.fetch_add(1, Relaxed);
    }

    /// Counts one decision.
    pub fn decision(&self, label: Label) {
        self.decisions[label.index()].fetch_add(1, Relaxed);
    }

    /// Counts `n` records the decider failed on.
    pub fn decide_errors(&self, n: usize) {
        self.decide_errors.fetch_add(n as u64, Relaxed);
    }

    /// Counts a failed executor action.
    pub fn executor_failure(&self) {
        self.executor_failures.fetch_add(1, Relaxed);
    }

    /// Counts a summary handed to the sink.
    pub fn summary(&self) {
        self.summaries.fetch_add(1, Relaxed);
    }

    /// Counts a summary the sink refused.
    pub fn summary_error(&self) {
        self.summary_errors.fetch_add(1, Relaxed);
    }

    /// Records one decision's latency from the record's arrival.
    pub fn decision_latency(&self, latency: std::time::Duration) {
        self.latency.observe(latency);
    }

    /// The decision latency histogram.
    pub fn latency(&self) -> &crate::metrics::LatencyHistogram {
        &self.latency
    }

    /// Sets the decisions per second of the last closed window.
    pub fn set_decision_rate(&self, per_s: f64) {
        self.decision_rate.store(per_s.to_bits(), Relaxed);
    }
}
