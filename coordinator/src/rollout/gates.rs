//! Health gates: pure functions from what the updated agents reported to a verdict.
//!
//! Rules (each gate compares a measured value with its threshold; a value above the threshold
//! fails):
//! - `max_load_failures` (always on; 0 tolerates none): updated agents whose last answer to an
//!   assignment of this rollout was `LOAD_FAILED`, `REFUSED` or `FETCH_FAILED`.
//! - `max_bad_record_rate` (0 disables): bad records / records over the target's summaries;
//!   judged once any record arrived.
//! - `max_latency_p99_ms` (0 disables): the decision-weighted 99th percentile of the
//!   per-window p99 latencies ([`weighted_p99`]); judged from `min_decisions` decisions on.
//! - `max_decision_drift` (0 disables): total variation distance ([`total_variation`])
//!   between the label distributions of the target and of the previous version; judged from
//!   `min_decisions` decisions on, and skipped (judged, passing, value 0) when no decision of
//!   the previous version exists to compare with.
//! - `min_probe_accuracy`: not implemented (agents cannot score a probe set yet); the service
//!   refuses a rollout that enables it.
//!
//! A verdict fails as soon as one judged gate fails; it is complete (a step may pass) when
//! every enabled gate was judged.

use std::collections::BTreeMap;

use llmchain_proto::pb;
use serde::{Deserialize, Serialize};

/// Gate name of the load-failure gate.
pub const LOAD_FAILURES: &str = "max_load_failures";
/// Gate name of the bad-record-rate gate.
pub const BAD_RECORD_RATE: &str = "max_bad_record_rate";
/// Gate name of the latency gate.
pub const LATENCY_P99: &str = "max_latency_p99_ms";
/// Gate name of the decision-drift gate.
pub const DECISION_DRIFT: &str = "max_decision_drift";

/// Thresholds of a rollout's gates, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Most load or self-test failures tolerated.
    pub max_load_failures: u32,
    /// Highest bad-record rate (0 disables).
    pub max_bad_record_rate: f64,
    /// Highest p99 latency in ms (0 disables).
    pub max_latency_p99_ms: f64,
    /// Highest total variation distance to the previous version (0 disables).
    pub max_decision_drift: f64,
    /// Lowest probe accuracy (0 disables; not implemented).
    pub min_probe_accuracy: f64,
    /// Fewest decisions on the target before latency and drift are judged.
    pub min_decisions: u64,
}

impl From<&pb::RolloutGates> for Gates {
    fn from(g: &pb::RolloutGates) -> Self {
        Gates {
            max_load_failures: g.max_load_failures,
            max_bad_record_rate: g.max_bad_record_rate,
            max_latency_p99_ms: g.max_latency_p99_ms,
            max_decision_drift: g.max_decision_drift,
            min_probe_accuracy: g.min_probe_accuracy,
            min_decisions: g.min_decisions,
        }
    }
}

impl From<Gates> for pb::RolloutGates {
    fn from(g: Gates) -> Self {
        pb::RolloutGates {
            max_load_failures: g.max_load_failures,
            max_bad_record_rate: g.max_bad_record_rate,
            max_latency_p99_ms: g.max_latency_p99_ms,
            max_decision_drift: g.max_decision_drift,
            min_probe_accuracy: g.min_probe_accuracy,
            min_decisions: g.min_decisions,
        }
    }
}

/// One gate's latest evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateResult {
    /// Gate name, e.g. `max_decision_drift`.
    pub name: String,
    /// Measured value (0 while not judged).
    pub value: f64,
    /// Threshold.
    pub threshold: f64,
    /// Whether it holds (true while not judged).
    pub passed: bool,
    /// Whether enough data arrived to judge it.
    pub judged: bool,
}

/// What the updated agents of a step reported, gathered by the controller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// Agents whose last answer to this rollout was a load, fetch or refusal failure.
    pub load_failures: u32,
    /// Records in the target's summaries.
    pub records: u64,
    /// Bad records among them.
    pub bad_records: u64,
    /// Per summary window of the target: (p99 latency in ms, decisions in the window).
    pub latency_windows: Vec<(f64, u64)>,
    /// Decisions per label of the target.
    pub target_labels: BTreeMap<String, u64>,
    /// Decisions per label of the previous version; `None` when there is none to compare with.
    pub baseline_labels: Option<BTreeMap<String, u64>>,
}

impl Observations {
    /// Decisions of the target (sum of its label counts).
    pub fn decisions(&self) -> u64 {
        self.target_labels.values().sum()
    }
}

/// The outcome of evaluating every enabled gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// One result per enabled gate, in a fixed order.
    pub results: Vec<GateResult>,
}

impl Verdict {
    /// Whether a judged gate failed.
    pub fn failed(&self) -> bool {
        self.results.iter().any(|r| r.judged && !r.passed)
    }

    /// Whether every enabled gate was judged.
    pub fn complete(&self) -> bool {
        self.results.iter().all(|r| r.judged)
    }

    /// `name value > threshold` for each failed gate, for the history.
    pub fn failures(&self) -> Vec<String> {
        self.results
            .iter()
            .filter(|r| r.judged && !r.passed)
            .map(|r| format!("{} {} > {}", r.name, round(r.value), r.threshold))
            .collect()
    }
}

fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Total variation distance between two label distributions given as counts: half the sum of
/// the absolute differences of their probabilities, in [0, 1]. `None` when either is empty.
pub fn total_variation(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> Option<f64> {
    let (total_a, total_b) = (a.values().sum::<u64>(), b.values().sum::<u64>());
    if total_a == 0 || total_b == 0 {
        return None;
    }
    let p = |m: &BTreeMap<String, u64>, total: u64, label: &str| {
        m.get(label).copied().unwrap_or(0) as f64 / total as f64
    };
    let distance: f64 = a
        .keys()
        .chain(b.keys().filter(|k| !a.contains_key(*k)))
        .map(|label| (p(a, total_a, label) - p(b, total_b, label)).abs())
        .sum();
    Some((distance / 2.0).clamp(0.0, 1.0))
}

/// The 99th percentile of per-window p99 latencies, each window weighted by its decisions:
/// the smallest window p99 such that windows at or below it hold at least 99% of the
/// decisions. Exact percentiles cannot be merged from summaries; this bound ignores only the
/// worst 1% of decisions' windows, so one slow window among many does not fail a step but a
/// slow agent does. `None` without decisions.
pub fn weighted_p99(windows: &[(f64, u64)]) -> Option<f64> {
    let mut sorted: Vec<(f64, u64)> = windows.iter().copied().filter(|(_, w)| *w > 0).collect();
    let total: u64 = sorted.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Integer arithmetic: the first window where the cumulative weight reaches 99%.
    let mut cumulative = 0u64;
    for (p99, weight) in &sorted {
        cumulative += weight;
        if u128::from(cumulative) * 100 >= u128::from(total) * 99 {
            return Some(*p99);
        }
    }
    sorted.last().map(|(p99, _)| *p99)
}

/// Bad records over records; `None` without records.
pub fn bad_record_rate(records: u64, bad_records: u64) -> Option<f64> {
    (records > 0).then(|| bad_records as f64 / records as f64)
}

fn gate(name: &str, threshold: f64, value: Option<f64>) -> GateResult {
    match value {
        Some(value) => {
            GateResult { name: name.into(), value, threshold, passed: value <= threshold, judged: true }
        }
        None => GateResult { name: name.into(), value: 0.0, threshold, passed: true, judged: false },
    }
}

/// Evaluates every enabled gate of `gates` on `obs` (see the module docs for the rules).
pub fn evaluate(gates: &Gates, obs: &Observations) -> Verdict {
    let enough = obs.decisions() >= gates.min_decisions.max(1);
    let mut results =
        vec![gate(LOAD_FAILURES, f64::from(gates.max_load_failures), Some(f64::from(obs.load_failures)))];
    if gates.max_bad_record_rate > 0.0 {
        results.push(gate(
            BAD_RECORD_RATE,
            gates.max_bad_record_rate,
            bad_record_rate(obs.records, obs.bad_records),
        ));
    }
    if gates.max_latency_p99_ms > 0.0 {
        let value = if enough { weighted_p99(&obs.latency_windows) } else { None };
        results.push(gate(LATENCY_P99, gates.max_latency_p99_ms, value));
    }
    if gates.max_decision_drift > 0.0 {
        let value = match &obs.baseline_labels {
            _ if !enough => None,
            // Nothing to compare with: skipped rather than waited for forever.
            None => Some(0.0),
            Some(baseline) => Some(total_variation(&obs.target_labels, baseline).unwrap_or(0.0)),
        };
        results.push(gate(DECISION_DRIFT, gates.max_decision_drift, value));
    }
    Verdict { results }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(l, c)| (l.to_string(), *c)).collect()
    }

    #[test]
    fn total_variation_is_half_the_l1_distance() {
        let a = labels(&[("normal", 90), ("shutdown", 10)]);
        assert_eq!(total_variation(&a, &a), Some(0.0));
        // Scale does not matter, only the distribution.
        assert_eq!(total_variation(&a, &labels(&[("normal", 9), ("shutdown", 1)])), Some(0.0));
        let b = labels(&[("normal", 10), ("shutdown", 90)]);
        assert!((total_variation(&a, &b).unwrap() - 0.8).abs() < 1e-12);
        // Disjoint supports are as far apart as can be, whichever side has the extra label.
        let c = labels(&[("inspect", 5)]);
        assert_eq!(total_variation(&a, &c), Some(1.0));
        assert_eq!(total_variation(&c, &a), Some(1.0));
        // A label missing on one side counts fully.
        let d = labels(&[("normal", 50), ("inspect", 50)]);
        assert!((total_variation(&labels(&[("normal", 100)]), &d).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(total_variation(&a, &BTreeMap::new()), None);
        assert_eq!(total_variation(&labels(&[("normal", 0)]), &a), None);
    }

    #[test]
    fn weighted_p99_ignores_only_the_slowest_percent_of_decisions() {
        assert_eq!(weighted_p99(&[]), None);
        assert_eq!(weighted_p99(&[(50.0, 0)]), None);
        assert_eq!(weighted_p99(&[(41.0, 100)]), Some(41.0));
        // One slow window holding 1% of the decisions is ignored...
        let mut windows = vec![(20.0, 99), (900.0, 1)];
        assert_eq!(weighted_p99(&windows), Some(20.0));
        // ...but not when it holds more than that.
        windows[1].1 = 2;
        assert_eq!(weighted_p99(&windows), Some(900.0));
        // Order of the windows does not matter.
        assert_eq!(weighted_p99(&[(900.0, 2), (20.0, 99)]), Some(900.0));
        assert_eq!(weighted_p99(&[(30.0, 50), (10.0, 50)]), Some(30.0));
    }

    #[test]
    fn bad_record_rate_needs_records() {
        assert_eq!(bad_record_rate(0, 0), None);
        assert_eq!(bad_record_rate(200, 10), Some(0.05));
    }

    fn gates() -> Gates {
        Gates {
            max_load_failures: 0,
            max_bad_record_rate: 0.1,
            max_latency_p99_ms: 100.0,
            max_decision_drift: 0.2,
            min_probe_accuracy: 0.0,
            min_decisions: 50,
        }
    }

    fn healthy() -> Observations {
        Observations {
            load_failures: 0,
            records: 100,
            bad_records: 2,
            latency_windows: vec![(40.0, 98)],
            target_labels: labels(&[("normal", 88), ("shutdown", 10)]),
            baseline_labels: Some(labels(&[("normal", 900), ("shutdown", 100)])),
        }
    }

    fn result<'a>(v: &'a Verdict, name: &str) -> &'a GateResult {
        v.results.iter().find(|r| r.name == name).unwrap()
    }

    #[test]
    fn healthy_observations_pass_every_gate() {
        let v = evaluate(&gates(), &healthy());
        assert_eq!(v.results.len(), 4);
        assert!(v.complete() && !v.failed(), "{v:?}");
        assert_eq!(result(&v, BAD_RECORD_RATE).value, 0.02);
        assert_eq!(result(&v, LATENCY_P99).value, 40.0);
    }

    #[test]
    fn each_threshold_fails_only_when_exceeded() {
        let load = Observations { load_failures: 1, ..healthy() };
        let v = evaluate(&gates(), &load);
        assert!(v.failed());
        assert_eq!(v.failures(), ["max_load_failures 1 > 0"]);
        // Tolerated failures pass.
        assert!(!evaluate(&Gates { max_load_failures: 1, ..gates() }, &load).failed());

        let bad = Observations { bad_records: 11, ..healthy() };
        assert_eq!(evaluate(&gates(), &bad).failures(), ["max_bad_record_rate 0.11 > 0.1"]);
        // Exactly at the threshold holds.
        assert!(!evaluate(&gates(), &Observations { bad_records: 10, ..healthy() }).failed());

        let slow = Observations { latency_windows: vec![(40.0, 50), (150.0, 48)], ..healthy() };
        assert_eq!(evaluate(&gates(), &slow).failures(), ["max_latency_p99_ms 150 > 100"]);

        let drift = Observations { target_labels: labels(&[("normal", 10), ("shutdown", 88)]), ..healthy() };
        let v = evaluate(&gates(), &drift);
        assert!(v.failed());
        assert!((result(&v, DECISION_DRIFT).value - (0.9 - 10.0 / 98.0)).abs() < 1e-9);
    }

    #[test]
    fn latency_and_drift_wait_for_min_decisions_and_disabled_gates_are_absent() {
        let few = Observations {
            target_labels: labels(&[("shutdown", 10)]),
            latency_windows: vec![(900.0, 10)],
            ..healthy()
        };
        let v = evaluate(&gates(), &few);
        assert!(!v.failed() && !v.complete(), "{v:?}");
        assert!(!result(&v, LATENCY_P99).judged && !result(&v, DECISION_DRIFT).judged);
        assert!(result(&v, BAD_RECORD_RATE).judged, "the bad-record rate needs records only");

        let only_load = Gates { max_load_failures: 2, ..Gates::default() };
        let v = evaluate(&only_load, &Observations::default());
        assert_eq!(v.results.len(), 1);
        assert!(v.complete() && !v.failed());
    }

    #[test]
    fn drift_without_a_previous_version_is_skipped() {
        let v = evaluate(&gates(), &Observations { baseline_labels: None, ..healthy() });
        let drift = result(&v, DECISION_DRIFT);
        assert!(drift.judged && drift.passed && drift.value == 0.0);
    }

    #[test]
    fn gates_round_trip_the_wire() {
        let g = gates();
        assert_eq!(Gates::from(&pb::RolloutGates::from(g)), g);
    }
}
