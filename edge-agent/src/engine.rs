//! The model that decides, and swapping it for a new version without stopping.
//!
//! A [`LoadedModel`] is one verified version in memory with its tokenizer, its classifier
//! prompt and the instructions' keys and values computed once ([`Prefix`]). The [`Engine`]
//! holds the serving one behind a pointer that a swap replaces atomically: a batch takes the
//! pointer once, so it is scored by exactly one version, and a swap never waits for inference
//! nor inference for a swap. A new version is loaded and self-tested next to the old one, and
//! only a model that passed the self-test is ever swapped in.
//!
//! libtorch tensors are `Send` but not `Sync`, so each model sits behind its own mutex; there
//! is one inference thread at a time per model anyway (batches are the unit of parallelism).

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, bail};
use llmchain_artifact::{BlobSource, Manifest};
use llmchain_model::{Llama, Prefix, prompt::ClassifierPrompt, tokenizer::Tokenizer, version::load_version};
use llmchain_proto::model::ModelRef;
use llmchain_task::{
    Label,
    preprocess::{INSTRUCTIONS, record_text},
};
use tch::Device;
use tracing::info;

use crate::pipeline::{Decider, Scored};

/// The record the self-test scores: a pump with a burning smell, plainly a shutdown. The
/// self-test does not require the right answer (a model may legitimately be unsure), only a
/// finite score for every label and a decision among them.
const PROBE_RECORD: &str = r#"{"device_id":"selftest-0","kind":"pump","ts":"2026-01-01T00:00:00Z",
"temp_c":[61.2,61.9,62.5,63.0,63.8,64.1],"vibration_mm_s":[2.1,2.3,2.2,2.4,2.2,2.3],
"current_a":[10.1,10.3,10.2,10.4,10.2,10.3],"rated_current_a":12.0,
"pressure_bar":[6.1,6.0,6.1,6.0,6.1,6.0],"note":"burning smell and smoke near the motor"}"#;

/// One model version loaded for decisions.
pub struct LoadedModel {
    id: ModelRef,
    model: Llama,
    tokenizer: Tokenizer,
    prompt: ClassifierPrompt,
    prefix: Prefix,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("id", &self.id).finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Loads `manifest`'s version from `blobs` (every blob hashed on the way) onto `device`
    /// and computes the instructions' keys and values.
    pub fn load(manifest: &Manifest, blobs: &dyn BlobSource, device: Device) -> anyhow::Result<Self> {
        let (model, tokenizer) =
            load_version(manifest, blobs, device).with_context(|| format!("loading {}", manifest.id))?;
        Self::from_parts(manifest.id.clone(), model, tokenizer)
    }

    /// A loaded model from a model and tokenizer already in memory.
    pub fn from_parts(id: ModelRef, model: Llama, tokenizer: Tokenizer) -> anyhow::Result<Self> {
        let labels: Vec<&str> = Label::ALL.iter().map(|l| l.as_str()).collect();
        let prompt = ClassifierPrompt::new(&tokenizer, INSTRUCTIONS, &labels)?;
        let prefix = model.prefix(prompt.prefix_ids())?;
        Ok(LoadedModel { id, model, tokenizer, prompt, prefix })
    }

    /// The version.
    pub fn id(&self) -> &ModelRef {
        &self.id
    }

    /// Scores preprocessed record texts: one [`Scored`] per text, in order.
    pub fn score(&self, texts: &[String]) -> anyhow::Result<Vec<Scored>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let prompts = texts
            .iter()
            .map(|t| self.prompt.record_ids(&self.tokenizer, t))
            .collect::<Result<Vec<_>, _>>()?;
        let scores = self.model.score(Some(&self.prefix), &prompts, self.prompt.candidates())?;
        Ok(scores.iter().map(|row| scored(row)).collect())
    }

    /// Scores the probe record and checks the answer is usable: finite scores and a label.
    pub fn self_test(&self) -> anyhow::Result<Scored> {
        let record = llmchain_task::Record::parse(PROBE_RECORD.as_bytes()).context("the probe record")?;
        let out = self.score(&[record_text(&record)])?.pop().context("no score for the probe")?;
        if let Some((label, logprob, _)) = out.scores.iter().find(|(_, lp, _)| !lp.is_finite()) {
            bail!("self-test: the score of {} is {logprob}", label.as_str());
        }
        if !out.confidence.is_finite() || out.confidence <= 0.0 {
            bail!("self-test: confidence {} is not a probability", out.confidence);
        }
        Ok(out)
    }
}

/// The decision for one row of label log-probabilities (in [`Label::ALL`] order).
fn scored(row: &[f32]) -> Scored {
    let probs = llmchain_model::prompt::softmax(row);
    let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0);
    Scored {
        label: Label::ALL[best],
        confidence: probs[best],
        scores: Label::ALL.iter().zip(row).zip(&probs).map(|((&l, &lp), &p)| (l, f64::from(lp), p)).collect(),
    }
}

/// A model being served; its id is readable without waiting for a batch to finish.
struct Serving {
    id: ModelRef,
    model: Mutex<LoadedModel>,
}

/// The serving model, swappable while decisions go on.
pub struct Engine {
    current: Mutex<Option<Arc<Serving>>>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine { current: Mutex::new(None), ready: tokio::sync::watch::Sender::new(false) }
    }
}

impl Engine {
    /// An engine with no model yet: decisions fail until the first swap.
    pub fn new() -> Self {
        Self::default()
    }

    /// Becomes true once a model serves (and stays true).
    pub fn ready(&self) -> tokio::sync::watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn serving(&self) -> Option<Arc<Serving>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Makes `model` the serving version; returns the version it replaced. Batches already
    /// running finish on the old one.
    pub fn swap(&self, model: LoadedModel) -> Option<ModelRef> {
        let id = model.id.clone();
        let serving = Arc::new(Serving { id: id.clone(), model: Mutex::new(model) });
        let old = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(serving)
            .map(|s| s.id.clone());
        self.ready.send_replace(true);
        info!(version = %id, previous = ?old.as_ref().map(ToString::to_string), "model swapped in");
        old
    }
}

impl Decider for Engine {
    fn model(&self) -> Option<ModelRef> {
        self.serving().map(|s| s.id.clone())
    }

    fn decide(&self, texts: &[String]) -> anyhow::Result<(ModelRef, Vec<Scored>)> {
        let serving = self.serving().context("no model is loaded yet")?;
        let model = serving.model.lock().unwrap_or_else(PoisonError::into_inner);
        Ok((serving.id.clone(), model.score(texts)?))
    }
}
