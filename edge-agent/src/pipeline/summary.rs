//! The summary window: what one agent decided over a stretch of time, with one model.
//!
//! A window folds decisions and bad records in as they happen and turns into one
//! `pb::Summary` when it closes — after `window` has passed, after `max_records` records, or
//! just before a decision from another model version joins it. Latencies are kept whole (a
//! window holds at most a few thousand records) so percentiles are exact (nearest rank), and
//! only the `hard_examples` lowest-confidence decisions are kept.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use llmchain_proto::{
    model::{CONFIDENCE_BUCKETS, ModelRef},
    pb,
};
use llmchain_task::Label;

use super::Scored;

/// Longest hard-example text, in bytes.
pub const HARD_EXAMPLE_TEXT_BYTES: usize = 2048;

/// When windows close and what they keep.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowConfig {
    /// A window closes this long after it opened.
    pub window: Duration,
    /// A window also closes once it holds this many records (good and bad); `None`: no limit.
    pub max_records: Option<u64>,
    /// Most hard examples per summary (the proto allows 100).
    pub hard_examples: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { window: Duration::from_secs(60), max_records: None, hard_examples: 4 }
    }
}

/// What closing a window produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Closed {
    /// The summary (seq 0: the spool assigns it); `None` when the window was empty or no
    /// model version was known to name it (its counts then stay in the window).
    pub summary: Option<pb::Summary>,
    /// Decisions per second over the window, when it closed.
    pub decisions_per_s: Option<f64>,
}

/// One open summary window.
#[derive(Debug)]
pub struct Window {
    agent_id: String,
    config: WindowConfig,
    opened: Instant,
    start: SystemTime,
    model: Option<ModelRef>,
    counts: [u64; Label::ALL.len()],
    histogram: [u64; CONFIDENCE_BUCKETS],
    latencies_ms: Vec<f64>,
    records: u64,
    raw_bytes: u64,
    bad_records: u64,
    /// Lowest confidence first, at most `config.hard_examples`.
    hard: Vec<(f64, pb::HardExample)>,
}

impl Window {
    /// An empty window opened now.
    pub fn new(agent_id: String, config: WindowConfig) -> Self {
        Window {
            agent_id,
            config,
            opened: Instant::now(),
            start: SystemTime::now(),
            model: None,
            counts: [0; Label::ALL.len()],
            histogram: [0; CONFIDENCE_BUCKETS],
            latencies_ms: Vec::new(),
            records: 0,
            raw_bytes: 0,
            bad_records: 0,
            hard: Vec::new(),
        }
    }

    /// When the window closes on time.
    pub fn deadline(&self) -> Instant {
        self.opened + self.config.window
    }

    /// The version whose decisions the window holds, if any yet.
    pub fn model(&self) -> Option<&ModelRef> {
        self.model.as_ref()
    }

    /// Records the window holds (good and bad).
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Whether the window reached `max_records`.
    pub fn is_full(&self) -> bool {
        self.config.max_records.is_some_and(|n| self.records >= n)
    }

    /// Names the version of the decisions that follow; the caller closes the window first
    /// when it holds another version's decisions.
    pub fn set_model(&mut self, model: ModelRef) {
        debug_assert!(self.model.as_ref().is_none_or(|m| *m == model), "one model per window");
        self.model = Some(model);
    }

    /// Counts a record that could not be parsed.
    pub fn add_bad(&mut self, raw_bytes: usize) {
        self.records += 1;
        self.raw_bytes += raw_bytes as u64;
        self.bad_records += 1;
    }

    /// Folds in one decision: its record's size, its latency (arrival → decision), the text
    /// the model read and the scores.
    pub fn add_decision(&mut self, raw_bytes: usize, latency: Duration, text: &str, scored: &Scored) {
        self.records += 1;
        self.raw_bytes += raw_bytes as u64;
        self.counts[scored.label.index()] += 1;
        self.histogram[bucket(scored.confidence)] += 1;
        self.latencies_ms.push(latency.as_secs_f64() * 1e3);
        let k = self.config.hard_examples;
        if k == 0 {
            return;
        }
        let confidence = if scored.confidence.is_nan() { 0.0 } else { scored.confidence };
        if self.hard.len() == k && self.hard.last().is_some_and(|(c, _)| *c <= confidence) {
            return;
        }
        let example = pb::HardExample {
            text: truncate(text, HARD_EXAMPLE_TEXT_BYTES).to_string(),
            decision: scored.label.as_str().to_string(),
            scores: scored
                .scores
                .iter()
                .map(|&(label, logprob, probability)| pb::LabelScore {
                    label: label.as_str().to_string(),
                    logprob,
                    probability,
                })
                .collect(),
        };
        // Stable: among equal confidences the earlier decision stays first.
        let at = self.hard.partition_point(|(c, _)| *c <= confidence);
        self.hard.insert(at, (confidence, example));
        self.hard.truncate(k);
    }

    /// Closes the window and opens the next one now. `fallback` names the model for a
    /// window that holds only bad records; without any model the counts are kept for the
    /// next window instead (a summary must name a version).
    pub fn close(&mut self, fallback: Option<ModelRef>) -> Closed {
        let now = Instant::now();
        let end = SystemTime::now();
        let elapsed = now.saturating_duration_since(self.opened).as_secs_f64();
        let decisions = self.records - self.bad_records;
        let decisions_per_s = (elapsed > 0.0).then(|| decisions as f64 / elapsed);
        if self.records == 0 {
            self.opened = now;
            self.start = end;
            return Closed { summary: None, decisions_per_s };
        }
        let Some(model) = self.model.clone().or(fallback) else {
            self.opened = now;
            return Closed { summary: None, decisions_per_s };
        };
        let mut latencies = std::mem::take(&mut self.latencies_ms);
        latencies.sort_by(f64::total_cmp);
        let summary = pb::Summary {
            agent_id: self.agent_id.clone(),
            seq: 0,
            window_start: Some(self.start.into()),
            window_end: Some(end.into()),
            model: Some(model.into()),
            label_counts: Label::ALL
                .iter()
                .map(|l| pb::LabelCount { label: l.as_str().to_string(), count: self.counts[l.index()] })
                .collect(),
            confidence_histogram: self.histogram.to_vec(),
            latency_p50_ms: percentile(&latencies, 50.0),
            latency_p95_ms: percentile(&latencies, 95.0),
            latency_p99_ms: percentile(&latencies, 99.0),
            records: self.records,
            raw_bytes: self.raw_bytes,
            bad_records: self.bad_records,
            hard_examples: std::mem::take(&mut self.hard).into_iter().map(|(_, h)| h).collect(),
            spool_dropped: 0,
        };
        *self = Window::new(std::mem::take(&mut self.agent_id), self.config.clone());
        self.opened = now;
        self.start = end;
        Closed { summary: Some(summary), decisions_per_s }
    }
}

/// Histogram bucket of a confidence: `[0, 0.1)`, …, `[0.9, 1]`; out-of-range values clamp.
pub fn bucket(confidence: f64) -> usize {
    if confidence.is_nan() {
        return 0;
    }
    ((confidence.clamp(0.0, 1.0) * CONFIDENCE_BUCKETS as f64) as usize).min(CONFIDENCE_BUCKETS - 1)
}

/// Nearest-rank percentile of sorted values; 0 for none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmchain_proto::model::ModelName;

    fn model(v: u64) -> ModelRef {
        ModelRef { model: ModelName::parse("model", "smollm2").unwrap(), version: v }
    }

    fn scored(label: Label, confidence: f64) -> Scored {
        Scored { label, confidence, scores: vec![(label, confidence.ln(), confidence)] }
    }

    #[test]
    fn percentiles_and_histogram_of_a_known_input() {
        let mut w = Window::new("a".into(), WindowConfig { hard_examples: 0, ..Default::default() });
        w.set_model(model(1));
        // Latencies 1..=100 ms, confidences 0.005, 0.015, … 0.995 (ten per bucket).
        for i in 1..=100u64 {
            let c = (i as f64 - 0.5) / 100.0;
            w.add_decision(10, Duration::from_millis(i), "t", &scored(Label::ALL[(i % 4) as usize], c));
        }
        w.add_bad(7);
        let s = w.close(None).summary.unwrap();
        assert_eq!((s.latency_p50_ms, s.latency_p95_ms, s.latency_p99_ms), (50.0, 95.0, 99.0));
        assert_eq!(s.confidence_histogram, vec![10; 10]);
        assert_eq!((s.records, s.bad_records, s.raw_bytes), (101, 1, 1007));
        assert_eq!(s.label_counts.iter().map(|c| c.count).collect::<Vec<_>>(), vec![25; 4]);
        assert_eq!(s.model.unwrap().version, 1);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!((bucket(0.0), bucket(0.1), bucket(0.999), bucket(1.0), bucket(1.5)), (0, 1, 9, 9, 9));
        // Closing resets: the next window starts empty.
        assert!(w.close(None).summary.is_none());
    }

    #[test]
    fn hard_examples_are_the_lowest_confidence_ones_truncated() {
        let mut w = Window::new("a".into(), WindowConfig { hard_examples: 3, ..Default::default() });
        w.set_model(model(1));
        let long = "é".repeat(2000); // 4000 bytes
        for (i, c) in [0.9, 0.3, 0.8, 0.26, 0.95, 0.5, 0.27].into_iter().enumerate() {
            w.add_decision(1, Duration::ZERO, &format!("{i}{long}"), &scored(Label::Inspect, c));
        }
        let s = w.close(None).summary.unwrap();
        let firsts: Vec<char> = s.hard_examples.iter().map(|h| h.text.chars().next().unwrap()).collect();
        assert_eq!(firsts, vec!['3', '6', '1']);
        for h in &s.hard_examples {
            assert!(h.text.len() <= HARD_EXAMPLE_TEXT_BYTES && h.text.len() >= HARD_EXAMPLE_TEXT_BYTES - 1);
            assert_eq!(h.decision, "inspect");
            assert_eq!(h.scores[0].label, "inspect");
        }
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn a_window_of_bad_records_needs_a_model_to_close() {
        let mut w = Window::new("a".into(), WindowConfig { max_records: Some(2), ..Default::default() });
        w.add_bad(5);
        assert!(!w.is_full());
        assert!(w.close(None).summary.is_none(), "no model to name it");
        w.add_bad(5);
        assert!(w.is_full());
        let s = w.close(Some(model(2))).summary.unwrap();
        assert_eq!((s.records, s.bad_records, s.raw_bytes), (2, 2, 10));
    }
}
