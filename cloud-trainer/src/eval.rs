//! Held-out evaluation the way the agent decides: every label's answer is scored after the
//! prompt ([`Llama::score`] over the shared prefix), the decision is the best score, and the
//! confidence is the softmax over the label scores.
//!
//! Reported: accuracy, per-label precision / recall / F1, the confusion matrix (rows are the
//! true labels, columns the decisions) and the expected calibration error (10 equal-width
//! confidence bins, `Σ |bin| / n · |accuracy(bin) − confidence(bin)|`).

use llmchain_model::{KeptTrunk, Llama, prompt::softmax};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, train::TokenSet};

/// Scores of one label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    /// The label.
    pub label: String,
    /// Share of the decisions for this label that were right.
    pub precision: f64,
    /// Share of this label's examples decided right.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Examples with this true label.
    pub support: u64,
}

/// The metrics of one model on one held-out set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Examples evaluated.
    pub examples: usize,
    /// Share decided right.
    pub accuracy: f64,
    /// Mean per-label F1.
    pub macro_f1: f64,
    /// Expected calibration error (10 bins).
    pub ece: f64,
    /// Mean confidence of the decisions.
    pub mean_confidence: f64,
    /// Per label, in scoring order.
    pub per_label: Vec<LabelMetrics>,
    /// `confusion[true][decided]`.
    pub confusion: Vec<Vec<u64>>,
    /// Labels in scoring order.
    pub labels: Vec<String>,
    /// Seconds the scoring took.
    pub seconds: f64,
    /// Accuracy per group of examples (for the task's records, per rule step), when the
    /// evaluation was given groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_group: Vec<GroupAccuracy>,
}

/// Accuracy on the examples of one group; for the task's records the group is the rule step
/// that decided the true label (shared/TASK.md), which says what kind of evidence a model
/// reads badly: a note, or a number against a limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAccuracy {
    /// The group's name.
    pub group: String,
    /// Its examples decided right.
    pub right: u64,
    /// Its examples.
    pub examples: u64,
}

/// How an evaluation runs the frozen blocks below a layer.
pub enum Trunk<'a> {
    /// Every block.
    Run,
    /// Every block, keeping the residual stream entering this block (see [`KeptEval`]).
    Keep(usize),
    /// Only the blocks from the kept layer on: for a model whose embeddings and blocks below
    /// it are those of the model that kept the streams (`last-layers` training changes only the
    /// blocks above), on the same data.
    From(&'a KeptEval),
}

impl<'a> Trunk<'a> {
    /// [`Trunk::Keep`] at `layer` if there is one, else [`Trunk::Run`].
    pub fn keep(layer: Option<usize>) -> Self {
        layer.map_or(Trunk::Run, Trunk::Keep)
    }

    /// [`Trunk::From`] `kept` if there is one, else [`Trunk::Run`].
    pub fn reuse(kept: Option<&'a KeptEval>) -> Self {
        kept.map_or(Trunk::Run, Trunk::From)
    }
}

/// The residual streams one evaluation kept at a block, per batch, so that the same data can be
/// evaluated again after training the blocks above for the cost of those blocks alone.
pub struct KeptEval {
    batches: Vec<KeptTrunk>,
}

impl KeptEval {
    /// Bytes the kept streams hold.
    pub fn bytes(&self) -> usize {
        self.batches.iter().map(KeptTrunk::bytes).sum()
    }
}

/// Per-example label probabilities (softmax over the label scores) of `data` under `model`,
/// `batch` prompts per forward pass.
pub fn probabilities(model: &Llama, data: &TokenSet, batch: usize) -> Result<Vec<Vec<f64>>> {
    Ok(probabilities_with(model, data, batch, Trunk::Run)?.0)
}

/// [`probabilities`] with the trunk run, kept or reused as `trunk` says. Prompts are batched
/// by length (less padding); results come back in the order of `data`.
pub fn probabilities_with(
    model: &Llama,
    data: &TokenSet,
    batch: usize,
    trunk: Trunk<'_>,
) -> Result<(Vec<Vec<f64>>, Option<KeptEval>)> {
    let prefix = if data.prefix.is_empty() { None } else { Some(model.prefix(&data.prefix)?) };
    let mut order: Vec<usize> = (0..data.examples.len()).collect();
    order.sort_by_key(|&i| data.examples[i].ids.len());
    let chunks: Vec<&[usize]> = order.chunks(batch.max(1)).collect();
    if let Trunk::From(kept) = &trunk
        && kept.batches.len() != chunks.len()
    {
        return Err(Error::Invalid(format!(
            "the kept streams cover {} batches, this evaluation has {}",
            kept.batches.len(),
            chunks.len()
        )));
    }
    let mut out = vec![Vec::new(); data.examples.len()];
    let mut kept = Vec::new();
    for (k, chunk) in chunks.into_iter().enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| data.examples[i].ids.clone()).collect();
        let (prefix, candidates) = (prefix.as_ref(), &data.candidates);
        let scores = match &trunk {
            Trunk::Run => model.score(prefix, &prompts, candidates)?,
            Trunk::Keep(layer) => {
                let (scores, trunk) = model.score_keeping(prefix, &prompts, candidates, *layer)?;
                kept.push(trunk);
                scores
            }
            Trunk::From(from) => model.score_from(prefix, &prompts, candidates, &from.batches[k])?,
        };
        for (&i, row) in chunk.iter().zip(&scores) {
            out[i] = softmax(row);
        }
    }
    let kept = matches!(trunk, Trunk::Keep(_)).then_some(KeptEval { batches: kept });
    Ok((out, kept))
}

/// Evaluates `model` on `data` (see the module docs).
pub fn evaluate(model: &Llama, data: &TokenSet, labels: &[String]) -> Result<EvalReport> {
    Ok(evaluate_with(model, data, labels, None, Trunk::Run)?.0)
}

/// [`evaluate`] with the trunk run, kept or reused as `trunk` says (see [`Trunk`]), and with
/// the accuracy per group when `groups` names each example's group.
pub fn evaluate_with(
    model: &Llama,
    data: &TokenSet,
    labels: &[String],
    groups: Option<&[String]>,
    trunk: Trunk<'_>,
) -> Result<(EvalReport, Option<KeptEval>)> {
    if let Some(g) = groups
        && g.len() != data.examples.len()
    {
        return Err(Error::Invalid(format!("{} groups for {} examples", g.len(), data.examples.len())));
    }
    let t0 = std::time::Instant::now();
    let (probs, kept) = probabilities_with(model, data, 16, trunk)?;
    let truth: Vec<usize> = data.examples.iter().map(|e| e.label).collect();
    let mut report = metrics(&probs, &truth, labels);
    if let Some(groups) = groups {
        report.by_group = accuracy_by_group(&probs, &truth, groups);
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok((report, kept))
}

/// The accuracy of the examples of each group (`groups[i]` is example `i`'s), groups in the
/// order they first appear.
pub fn accuracy_by_group(probs: &[Vec<f64>], truth: &[usize], groups: &[String]) -> Vec<GroupAccuracy> {
    let mut out: Vec<GroupAccuracy> = Vec::new();
    for ((p, &t), group) in probs.iter().zip(truth).zip(groups) {
        let decided = decision(p).0;
        let row = match out.iter().position(|g| &g.group == group) {
            Some(i) => &mut out[i],
            None => {
                out.push(GroupAccuracy { group: group.clone(), right: 0, examples: 0 });
                out.last_mut().expect("just pushed")
            }
        };
        row.examples += 1;
        row.right += u64::from(decided == t);
    }
    out
}

/// The decided label of one example's probabilities (the first of equal maxima) and its
/// probability.
fn decision(p: &[f64]) -> (usize, f64) {
    p.iter().copied().enumerate().fold((0, f64::MIN), |best, (i, v)| if v > best.1 { (i, v) } else { best })
}

/// The metrics of probabilities `probs` against true label indices `truth`.
pub fn metrics(probs: &[Vec<f64>], truth: &[usize], labels: &[String]) -> EvalReport {
    let k = labels.len();
    let n = probs.len();
    let mut confusion = vec![vec![0u64; k]; k];
    let mut bins = [(0u64, 0.0f64, 0.0f64); 10]; // count, correct, confidence sum
    let mut confidence_sum = 0.0;
    for (p, &t) in probs.iter().zip(truth) {
        let (decided, conf) = decision(p);
        confusion[t][decided] += 1;
        let bin = ((conf * 10.0) as usize).min(9);
        bins[bin].0 += 1;
        bins[bin].1 += f64::from(u8::from(decided == t));
        bins[bin].2 += conf;
        confidence_sum += conf;
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_label: Vec<LabelMetrics> = (0..k)
        .map(|i| {
            let tp = confusion[i][i];
            let decided: u64 = confusion.iter().map(|row| row[i]).sum();
            let support: u64 = confusion[i].iter().sum();
            let (precision, recall) = (ratio(tp, decided), ratio(tp, support));
            let f1 =
                if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            LabelMetrics { label: labels[i].clone(), precision, recall, f1, support }
        })
        .collect();
    let correct: u64 = (0..k).map(|i| confusion[i][i]).sum();
    let ece = bins
        .iter()
        .filter(|b| b.0 > 0)
        .map(|&(count, right, conf)| {
            count as f64 / n.max(1) as f64 * (right / count as f64 - conf / count as f64).abs()
        })
        .sum();
    EvalReport {
        examples: n,
        accuracy: ratio(correct, n as u64),
        macro_f1: per_label.iter().map(|l| l.f1).sum::<f64>() / k.max(1) as f64,
        ece,
        mean_confidence: confidence_sum / n.max(1) as f64,
        per_label,
        confusion,
        labels: labels.to_vec(),
        seconds: 0.0,
        by_group: Vec::new(),
    }
}

impl EvalReport {
    /// A short text table: headline figures, per-label scores and the confusion matrix.
    pub fn table(&self, title: &str) -> String {
        let mut out = format!(
            "{title}: {} examples, accuracy {:.2}%, macro F1 {:.3}, ECE {:.3}, mean confidence {:.3} ({:.0} s)\n",
            self.examples,
            100.0 * self.accuracy,
            self.macro_f1,
            self.ece,
            self.mean_confidence,
            self.seconds
        );
        out.push_str(&format!(
            "  {:<10} {:>9} {:>9} {:>9} {:>8}\n",
            "label", "precision", "recall", "f1", "support"
        ));
        for l in &self.per_label {
            out.push_str(&format!(
                "  {:<10} {:>9.3} {:>9.3} {:>9.3} {:>8}\n",
                l.label, l.precision, l.recall, l.f1, l.support
            ));
        }
        out.push_str(&format!("  {:<10}", "true\\said"));
        for l in &self.labels {
            out.push_str(&format!(" {:>9}", l));
        }
        out.push('\n');
        for (l, row) in self.labels.iter().zip(&self.confusion) {
            out.push_str(&format!("  {:<10}", l));
            for c in row {
                out.push_str(&format!(" {c:>9}"));
            }
            out.push('\n');
        }
        if !self.by_group.is_empty() {
            out.push_str("  right by group:");
            for g in &self.by_group {
                out.push_str(&format!(
                    " {} {}/{} ({:.1}%);",
                    g.group,
                    g.right,
                    g.examples,
                    100.0 * g.right as f64 / g.examples.max(1) as f64
                ));
            }
            out.pop();
            out.push('\n');
        }
        out
    }

    /// The headline figures as manifest metrics, names prefixed with `prefix`.
    pub fn manifest_metrics(&self, prefix: &str) -> Vec<llmchain_artifact::Metric> {
        let mut m = vec![
            (format!("{prefix}accuracy"), self.accuracy),
            (format!("{prefix}macro_f1"), self.macro_f1),
            (format!("{prefix}ece"), self.ece),
        ];
        for l in &self.per_label {
            m.push((format!("{prefix}f1_{}", l.label), l.f1));
        }
        m.into_iter().map(|(name, value)| llmchain_artifact::Metric { name, value }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_a_known_confusion() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let probs = vec![vec![0.9, 0.1], vec![0.8, 0.2], vec![0.3, 0.7], vec![0.6, 0.4]];
        let truth = vec![0, 0, 1, 1];
        let r = metrics(&probs, &truth, &labels);
        assert_eq!(r.confusion, vec![vec![2, 0], vec![1, 1]]);
        assert!((r.accuracy - 0.75).abs() < 1e-12);
        assert!((r.per_label[0].precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.per_label[1].recall - 0.5).abs() < 1e-12);
        // Bins: 0.9 (right), 0.8 (right), 0.7 (right), 0.6 (wrong).
        let ece = 0.25 * (0.1 + 0.2 + 0.3 + 0.6);
        assert!((r.ece - ece).abs() < 1e-9, "{}", r.ece);
        assert!(r.table("t").contains("accuracy 75.00%"));
        assert!(!r.table("t").contains("by group"), "no groups, no group line");
    }

    #[test]
    fn accuracy_by_group_counts_each_group_in_first_seen_order() {
        let probs = vec![vec![0.9, 0.1], vec![0.2, 0.8], vec![0.3, 0.7], vec![0.6, 0.4], vec![0.1, 0.9]];
        let truth = vec![0, 0, 1, 1, 1];
        let groups: Vec<String> = ["x", "y", "x", "y", "z"].iter().map(|s| s.to_string()).collect();
        let by = accuracy_by_group(&probs, &truth, &groups);
        let got: Vec<(&str, u64, u64)> = by.iter().map(|g| (g.group.as_str(), g.right, g.examples)).collect();
        assert_eq!(got, vec![("x", 2, 2), ("y", 0, 2), ("z", 1, 1)]);
        let labels = vec!["a".to_string(), "b".to_string()];
        let mut r = metrics(&probs, &truth, &labels);
        r.by_group = by;
        assert!(r.table("t").contains("right by group: x 2/2 (100.0%); y 0/2 (0.0%); z 1/1 (100.0%)\n"));
    }
}
