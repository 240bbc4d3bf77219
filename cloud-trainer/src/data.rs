//! Data sets: generating labelled task records, loading JSONL, splitting, and turning a
//! hard example's preprocessed text back into something the label rules can read.
//!
//! A data file is JSON lines of one of two shapes, mixed freely:
//! - a task record (`shared/TASK.md`) with an optional `"label"`; the text the model reads is
//!   [`record_text`], and a missing label is computed by the rules;
//! - `{"prompt": "...", "label": "..."}` for any other task: the prompt is the user message as
//!   is, and the labels are whatever strings the file uses.
//!
//! The data set digest recorded in a version's manifest is the sha256 of the canonical JSONL
//! of the examples (text and label per line), so the same examples give the same digest
//! whatever file layout they came from.

use std::{collections::BTreeSet, io::BufRead, path::Path};

use llmchain_artifact::{Digest, digest_bytes};
use llmchain_task::{
    Kind, Label, Record,
    generate::{GenConfig, Generator},
    preprocess::{INSTRUCTIONS, record_text},
    record::{SAMPLES, Series},
    rules,
};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One training or evaluation example: the text the model reads and its label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The user message (a record's preprocessed text or a plain prompt).
    pub text: String,
    /// The label, one of the data set's labels.
    pub label: String,
}

/// Examples with the instructions and label set they are asked with.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// System message of every prompt.
    pub instructions: String,
    /// Candidate labels, in scoring order.
    pub labels: Vec<String>,
    /// The examples.
    pub examples: Vec<Example>,
}

impl Dataset {
    /// The telemetry-triage task's examples: instructions and labels as the agent asks them.
    pub fn task(examples: Vec<Example>) -> Self {
        Dataset {
            instructions: INSTRUCTIONS.to_string(),
            labels: Label::ALL.iter().map(|l| l.as_str().to_string()).collect(),
            examples,
        }
    }

    /// Index of every example's label in [`Dataset::labels`].
    pub fn label_indices(&self) -> Result<Vec<usize>> {
        self.examples
            .iter()
            .map(|e| {
                self.labels.iter().position(|l| *l == e.label).ok_or_else(|| {
                    Error::Invalid(format!("label {:?} is not one of {:?}", e.label, self.labels))
                })
            })
            .collect()
    }

    /// sha256 over the canonical JSONL of the examples (see the module docs).
    pub fn digest(&self) -> Digest {
        let mut bytes = Vec::new();
        for e in &self.examples {
            bytes.extend(serde_json::to_vec(e).expect("examples serialise"));
            bytes.push(b'\n');
        }
        digest_bytes(&bytes)
    }

    /// A copy with only the examples at `indices`.
    pub fn subset(&self, indices: impl IntoIterator<Item = usize>) -> Dataset {
        Dataset {
            instructions: self.instructions.clone(),
            labels: self.labels.clone(),
            examples: indices.into_iter().map(|i| self.examples[i].clone()).collect(),
        }
    }
}

/// Parses a label mix such as `normal=0.4,inspect=0.3,throttle=0.1,shutdown=0.2` into the
/// generator's weights (labels not named get weight 0; weights need not sum to 1).
pub fn parse_mix(text: &str) -> Result<[f64; 4]> {
    let mut mix = [0.0; 4];
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("mix entry {part:?} is not label=weight")))?;
        let label: Label = name.trim().parse().map_err(Error::Invalid)?;
        let weight: f64 = weight
            .trim()
            .parse()
            .ok()
            .filter(|w: &f64| w.is_finite() && *w >= 0.0)
            .ok_or_else(|| Error::Invalid(format!("weight of {name} must be a non-negative number")))?;
        mix[label.index()] = weight;
    }
    if mix.iter().sum::<f64>() <= 0.0 {
        return Err(Error::Invalid("the mix gives every label weight 0".into()));
    }
    Ok(mix)
}

/// `count` labelled task records from the seeded generator (`mix` overrides its default).
pub fn generate(seed: u64, count: usize, mix: Option<[f64; 4]>, shift: bool) -> Vec<(Record, Label)> {
    let mut cfg = if shift { GenConfig::shifted(seed) } else { GenConfig::base(seed) };
    if let Some(mix) = mix {
        cfg.mix = mix;
    }
    Generator::new(cfg).take(count).collect()
}

/// One JSONL line for a generated record: the record's fields plus `"label"`.
pub fn record_line(record: &Record, label: Label) -> String {
    let mut value = serde_json::to_value(record).expect("records serialise");
    value["label"] = serde_json::Value::String(label.as_str().to_string());
    value.to_string()
}

/// The examples of generated records.
pub fn task_examples(records: &[(Record, Label)]) -> Vec<Example> {
    records.iter().map(|(r, l)| Example { text: record_text(r), label: l.as_str().to_string() }).collect()
}

#[derive(Deserialize)]
struct Plain {
    prompt: String,
    label: String,
}

/// Loads a JSONL data file (both shapes of the module docs). Task records use the task's
/// instructions and labels; a file of plain prompts uses `instructions` (or the task's when
/// `None`) and its own labels in sorted order.
pub fn load_jsonl(path: &Path, instructions: Option<&str>) -> Result<Dataset> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Invalid(format!("cannot open {}: {e}", path.display())))?;
    let mut examples = Vec::new();
    let (mut plain, mut records) = (0usize, 0usize);
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| Error::Invalid(format!("{}: {e}", at())))?;
        if value.get("prompt").is_some() {
            let p: Plain =
                serde_json::from_value(value).map_err(|e| Error::Invalid(format!("{}: {e}", at())))?;
            if p.label.is_empty() {
                return Err(Error::Invalid(format!("{}: empty label", at())));
            }
            examples.push(Example { text: p.prompt, label: p.label });
            plain += 1;
        } else {
            let record =
                Record::parse(line.as_bytes()).map_err(|e| Error::Invalid(format!("{}: {e}", at())))?;
            let label = match value.get("label").and_then(|l| l.as_str()) {
                Some(l) => l.parse::<Label>().map_err(|e| Error::Invalid(format!("{}: {e}", at())))?,
                None => rules::label(&record),
            };
            examples.push(Example { text: record_text(&record), label: label.as_str().to_string() });
            records += 1;
        }
    }
    if examples.is_empty() {
        return Err(Error::Invalid(format!("{} holds no examples", path.display())));
    }
    if plain == 0 {
        let mut d = Dataset::task(examples);
        if let Some(i) = instructions {
            d.instructions = i.to_string();
        }
        return Ok(d);
    }
    let labels: BTreeSet<String> = examples.iter().map(|e| e.label.clone()).collect();
    if records > 0 {
        tracing::warn!(records, plain, "data file mixes task records and plain prompts");
    }
    Ok(Dataset {
        instructions: instructions.unwrap_or(INSTRUCTIONS).to_string(),
        labels: labels.into_iter().collect(),
        examples,
    })
}

/// Splits `n` indices into a shuffled (seeded) training part and a held-out part of `held_out`.
pub fn split(n: usize, held_out: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    crate::train::shuffle(&mut order, seed);
    let held_out = held_out.min(n);
    let test = order.split_off(n - held_out);
    (order, test)
}

/// For a data set of the task's records (its instructions are the task's and every text is a
/// record's [`record_text`]), the rule step that decides each example's label
/// ([`rules::Step::as_str`]), to report accuracy per kind of evidence; `None` for any other
/// data set.
pub fn rule_steps(data: &Dataset) -> Option<Vec<String>> {
    if data.instructions != INSTRUCTIONS {
        return None;
    }
    data.examples
        .iter()
        .map(|e| record_from_text(&e.text).map(|r| rules::decide(&r).1.as_str().to_string()))
        .collect()
}

/// Reads back the facts the label rules need from a record's preprocessed text
/// ([`record_text`]) and rebuilds a record that has them: per series the maximum (and, where
/// the text has them, the first and last samples) and as many dropouts as the text reports;
/// the rated current; the note verbatim.
///
/// The rules only look at max, first, last, dropouts, the rated current and the note, and the
/// text prints them with one decimal, which is the precision of the generator's samples, so
/// [`rules::label`] of the rebuilt record is the label of the original (for real feeds with
/// more decimals, values within 0.05 of a threshold may round across it). `None` when the text
/// is not in that format (e.g. truncated).
pub fn record_from_text(text: &str) -> Option<Record> {
    let mut lines = text.lines();
    let kind = match lines.next()?.strip_prefix("machine: ")? {
        "pump" => Kind::Pump,
        "compressor" => Kind::Compressor,
        "motor" => Kind::Motor,
        "fan" => Kind::Fan,
        _ => return None,
    };
    let (mut temp, mut vib, mut cur, mut pres, mut rated, mut note) = (None, None, None, None, None, None);
    for line in lines {
        if let Some(n) = line.strip_prefix("note: ") {
            note = Some(if n == "(none)" { String::new() } else { n.to_string() });
            continue;
        }
        let (name, rest) = line.split_once(": ")?;
        let series = parse_series(rest)?;
        match name {
            "temperature C" => temp = Some(series),
            "vibration mm/s" => vib = Some(series),
            "current A" => {
                rated = Some(match rest.split_once("of rated ") {
                    Some((_, r)) => r.split(',').next()?.trim().parse::<f64>().ok()?,
                    // All samples dropped: the rules cannot exceed a ratio; any rating works.
                    None => 1.0,
                });
                cur = Some(series);
            }
            "pressure bar" => pres = Some(series),
            _ => return None,
        }
    }
    let record = Record {
        device_id: format!("{}-hard", kind.as_str()),
        kind,
        ts: String::new(),
        temp_c: temp?,
        vibration_mm_s: vib?,
        current_a: cur?,
        rated_current_a: rated?,
        pressure_bar: pres,
        note: note?,
    };
    record.validate().ok()?;
    Some(record)
}

/// The rules' label of a hard example's text, `None` when the text cannot be read back.
pub fn label_text(text: &str) -> Option<Label> {
    record_from_text(text).map(|r| rules::label(&r))
}

/// A series with the stats of one text line after the name: `min A max M, F -> L (±D)[, …][, N
/// missing]` or `all N missing`.
fn parse_series(rest: &str) -> Option<Series> {
    let mut s: Series = [None; SAMPLES];
    if rest.starts_with("all ") {
        return Some(s);
    }
    let parse = |v: &str| v.trim().parse::<f64>().ok();
    let mut parts = rest.split(", ");
    let (min, max) = parts.next()?.strip_prefix("min ")?.split_once(" max ")?;
    let (min, max) = (parse(min)?, parse(max)?);
    let (mut ends, mut missing) = (None, 0);
    for part in parts {
        if let Some((first, after)) = part.split_once(" -> ") {
            ends = Some((parse(first)?, parse(after.split_once(" (")?.0)?));
        } else if let Some(n) = part.strip_suffix(" missing") {
            missing = n.parse::<usize>().ok()?;
        }
    }
    let (first, last) = ends?;
    let present = SAMPLES.checked_sub(missing).filter(|&p| p > 0)?;
    // First, then min and max where the ends are not already them, padded with max, then last;
    // dropouts fill the end. With one sample first, min, max and last are that sample.
    let values: Vec<f64> = if present == 1 {
        vec![first]
    } else {
        let mut v = vec![first];
        v.extend([min, max].into_iter().filter(|x| *x != first && *x != last));
        v.resize(present - 1, max);
        v.push(last);
        v
    };
    for (slot, v) in s.iter_mut().zip(values) {
        *slot = Some(v);
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_example_text_reads_back_to_the_same_label() {
        for shift in [false, true] {
            for (record, label) in generate(11, 3000, None, shift) {
                let text = record_text(&record);
                let back = record_from_text(&text).unwrap_or_else(|| panic!("unreadable: {text}"));
                assert_eq!(rules::label(&back), label, "{text}");
                // Stats survive, so the rebuilt record preprocesses to the same text.
                assert_eq!(record_text(&back), text);
            }
        }
        assert_eq!(label_text("not a record"), None);
    }

    #[test]
    fn rule_steps_name_the_deciding_step_of_task_records_only() {
        let records = generate(5, 400, None, false);
        let task = Dataset::task(task_examples(&records));
        let steps = rule_steps(&task).expect("task records have steps");
        let expected: Vec<&str> = records.iter().map(|(r, _)| rules::decide(r).1.as_str()).collect();
        assert_eq!(steps, expected);
        for step in rules::Step::ALL {
            assert!(steps.iter().any(|s| s == step.as_str()), "400 records cover {step:?}");
        }
        let plain = Dataset { instructions: "Say yes or no.".into(), ..task.clone() };
        assert_eq!(rule_steps(&plain), None, "another task's instructions");
        let mut odd = task;
        odd.examples[3].text = "not a record".into();
        assert_eq!(rule_steps(&odd), None, "a text that is not a record");
    }

    #[test]
    fn mix_parses_and_refuses_nonsense() {
        assert_eq!(parse_mix("normal=1, shutdown=3").unwrap(), [1.0, 0.0, 0.0, 3.0]);
        assert!(parse_mix("normal=-1").is_err());
        assert!(parse_mix("bogus=1").is_err());
        assert!(parse_mix("normal=0").is_err());
    }
}
