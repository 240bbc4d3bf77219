//! Fine-tuning a [`Llama`] to answer with a label: AdamW, linear warm-up then cosine decay,
//! global gradient-norm clipping, a seeded data order, atomic checkpoints and resume.
//!
//! Every example is `prefix ++ record ids ++ label tokens` (the prompt layout of
//! [`llmchain_model::prompt::ClassifierPrompt`]); the loss reads the answer tokens only
//! ([`Objective`]: by default the decision as the agent takes it, a softmax over the labels'
//! first tokens), and the last block and the output head run only at the positions that
//! predict them ([`Llama::run_span_at`]; the head is a 49,152-wide matrix: computing it for
//! every position would cost a quarter of the forward pass). The shared prefix (the system
//! message) runs once per step, batch 1, and every row attends to its keys and values.
//!
//! Modes ([`Mode`]):
//! - `last-layers:N` trains the last N blocks and the final norm. The trunk below them does not
//!   change, so with the activation cache (default) the residual stream entering block `L-N` is
//!   computed once per example, before the first step, and every epoch then runs only the top N
//!   blocks: per epoch that saves the trunk's forward pass, `(L-N)/L` of the model (28 of 30
//!   blocks for SmolLM2), at the price of `tokens × hidden × 4` bytes of memory (~0.3 MB per
//!   example).
//! - `lora:R` adds rank-R adapters to q, k, v, o, gate, up and down of every block and trains
//!   only those; the base tensors keep their bytes, so a version's delta is the adapters.
//! - `full` trains every tensor.
//!
//! Determinism: the data order of epoch `e` is a function of `(seed, e)`, the adapters'
//! initialisation of the seed, and a checkpoint holds the trainable tensors, the AdamW moments,
//! the step and the loss history, so an interrupted run resumed from its last checkpoint
//! continues exactly as if it had not stopped.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Instant,
};

use llmchain_model::{Llama, SaveDtype};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use tracing::info;

use crate::{Error, Result};

/// What to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The last N blocks and the final norm.
    LastLayers(usize),
    /// Rank-R LoRA adapters on every projection.
    Lora(usize),
    /// Every tensor.
    Full,
}

impl Mode {
    /// The first block this mode trains in a model of `layers` blocks: the blocks below it (the
    /// frozen trunk) are left unchanged. 0 for modes that change every block.
    pub fn trunk_end(self, layers: usize) -> usize {
        match self {
            Mode::LastLayers(n) => layers.saturating_sub(n),
            Mode::Lora(_) | Mode::Full => 0,
        }
    }
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("mode {s:?} is not last-layers:N, lora:R or full"));
        let number = |v: &str| v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(bad);
        match s.split_once(':') {
            Some(("last-layers", n)) => Ok(Mode::LastLayers(number(n)?)),
            Some(("lora", r)) => Ok(Mode::Lora(number(r)?)),
            None if s == "full" => Ok(Mode::Full),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::LastLayers(n) => write!(f, "last-layers:{n}"),
            Mode::Lora(r) => write!(f, "lora:{r}"),
            Mode::Full => f.write_str("full"),
        }
    }
}

/// What a step minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// The decision as the agent takes it: the cross-entropy of a softmax over the candidates'
    /// first-token logits (the token that tells the labels apart), plus the summed
    /// cross-entropy of the true answer's later tokens (which follow from the first, and which
    /// the agent's score adds). Nothing is spent putting mass on the candidates as opposed to
    /// the rest of the vocabulary, which the decision never sees.
    #[default]
    Candidates,
    /// The true answer's summed cross-entropy over the whole vocabulary (its negative
    /// log-probability).
    Vocab,
}

impl FromStr for Objective {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "candidates" => Ok(Objective::Candidates),
            "vocab" => Ok(Objective::Vocab),
            _ => Err(Error::Invalid(format!("objective {s:?} is not candidates or vocab"))),
        }
    }
}

/// How the learning rate moves after the linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Cosine decay from the peak to zero at the last step.
    #[default]
    Cosine,
    /// The peak rate until the last step.
    Constant,
}

impl Schedule {
    /// The learning rate of `step` of `total`: linear warm-up to `lr` over `warmup` steps, then
    /// this schedule.
    pub fn rate(self, lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return lr * (step + 1) as f64 / warmup as f64;
        }
        match self {
            Schedule::Cosine => {
                let span = total.saturating_sub(warmup).max(1);
                let progress = ((step - warmup) as f64 / span as f64).min(1.0);
                lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Constant => lr,
        }
    }
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "constant" => Ok(Schedule::Constant),
            _ => Err(Error::Invalid(format!("schedule {s:?} is not cosine or constant"))),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Schedule::Cosine => "cosine",
            Schedule::Constant => "constant",
        })
    }
}

/// One example as token ids: the part after the shared prefix, and its label's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenExample {
    /// Prompt ids after the prefix (the user turn and the opened assistant turn); not empty.
    pub ids: Vec<u32>,
    /// Index into [`TokenSet::candidates`].
    pub label: usize,
}

/// A tokenised data set: the shared prefix, the candidate answers, and the examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSet {
    /// Prompt ids every example starts with (may be empty).
    pub prefix: Vec<u32>,
    /// Token ids of each label's answer.
    pub candidates: Vec<Vec<u32>>,
    /// The examples.
    pub examples: Vec<TokenExample>,
}

impl TokenSet {
    /// Checks that every example has ids and a valid label and every candidate has tokens.
    pub fn validate(&self) -> Result<()> {
        if self.candidates.is_empty() || self.candidates.iter().any(Vec::is_empty) {
            return Err(Error::Invalid("every label needs at least one token".into()));
        }
        if self.examples.is_empty() {
            return Err(Error::Invalid("no examples".into()));
        }
        if let Some(e) = self.examples.iter().find(|e| e.ids.is_empty() || e.label >= self.candidates.len()) {
            return Err(Error::Invalid(format!(
                "example with {} ids and label {} is invalid",
                e.ids.len(),
                e.label
            )));
        }
        Ok(())
    }

    /// Ids fed for example `i`: its prompt part and its answer without the last token.
    fn input(&self, i: usize) -> Vec<u32> {
        let e = &self.examples[i];
        let answer = &self.candidates[e.label];
        let mut ids = e.ids.clone();
        ids.extend_from_slice(&answer[..answer.len() - 1]);
        ids
    }

    /// Tokens of example `i` as a whole sequence (prefix, prompt, answer), for throughput.
    fn sequence_len(&self, i: usize) -> usize {
        let e = &self.examples[i];
        self.prefix.len() + e.ids.len() + self.candidates[e.label].len()
    }
}

/// Where and how often to checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// Directory of the checkpoints (created if missing).
    pub dir: PathBuf,
    /// Steps between checkpoints.
    pub every: usize,
}

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// What to train.
    pub mode: Mode,
    /// Peak learning rate.
    pub lr: f64,
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Steps of linear warm-up before the schedule.
    pub warmup_steps: usize,
    /// The learning rate after the warm-up.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    pub clip_norm: f64,
    /// Seed of the data order (and, via [`prepare`], of the adapters).
    pub seed: u64,
    /// Compute the frozen trunk once (`last-layers` only).
    pub activation_cache: bool,
    /// What a step minimises.
    pub objective: Objective,
    /// Checkpointing, if any.
    pub checkpoint: Option<CheckpointConfig>,
    /// Stop after this many steps in total (the schedule still spans every epoch): how tests
    /// and `--stop-after` simulate an interruption.
    pub stop_after: Option<usize>,
}

impl TrainConfig {
    /// Defaults that suit each mode on the task (see docs/training.md).
    pub fn for_mode(mode: Mode) -> Self {
        let lr = match mode {
            Mode::LastLayers(_) => 5e-4,
            Mode::Lora(_) => 1e-3,
            Mode::Full => 2e-5,
        };
        TrainConfig {
            mode,
            lr,
            epochs: 2,
            batch_size: 16,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            weight_decay: 0.01,
            clip_norm: 1.0,
            seed: 0,
            activation_cache: true,
            objective: Objective::Candidates,
            checkpoint: None,
            stop_after: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Loss of every step, from step 0: the mean over the batch of each answer's summed
    /// cross-entropy (the negative log-probability the decision scores).
    pub losses: Vec<f32>,
    /// Mean cross-entropy of the answers' first tokens at every step: the token that tells the
    /// labels apart (the rest of an answer follows from it); ln 4 ≈ 1.39 is chance for four.
    #[serde(default)]
    pub first_token_losses: Vec<f32>,
    /// Steps of the schedule.
    pub total_steps: usize,
    /// Steps done when the run returned.
    pub steps_done: usize,
    /// Step the run resumed from (0 when it started fresh).
    pub resumed_from: usize,
    /// Trainable tensors.
    pub trainable_tensors: usize,
    /// Trainable parameters.
    pub trainable_params: u64,
    /// Seconds spent computing the activation cache.
    pub cache_seconds: f64,
    /// Seconds of the training steps this run executed.
    pub train_seconds: f64,
    /// Sequence tokens (prefix, prompt and answer) of the steps this run executed.
    pub train_tokens: u64,
    /// Global gradient norm (before clipping) of every step this run executed.
    #[serde(default)]
    pub grad_norms: Vec<f32>,
}

impl TrainReport {
    /// Training throughput of this run's steps, in sequence tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        self.train_tokens as f64 / self.train_seconds.max(1e-9)
    }

    /// How many of this run's steps had their gradient clipped at `clip_norm`.
    pub fn clipped_steps(&self, clip_norm: f64) -> usize {
        if clip_norm <= 0.0 {
            0
        } else {
            self.grad_norms.iter().filter(|&&n| f64::from(n) > clip_norm).count()
        }
    }
}

/// Sets up `model` for `mode`: adds adapters for `lora` (alpha `lora_alpha`, default 2·R;
/// initialised from `seed`) and marks exactly the tensors to train. Returns how many tensors
/// are trainable.
pub fn prepare(model: &mut Llama, mode: Mode, seed: u64, lora_alpha: Option<f64>) -> Result<usize> {
    let layers = model.config().num_hidden_layers;
    let count = match mode {
        Mode::LastLayers(n) => {
            if n > layers {
                return Err(Error::Invalid(format!("last-layers:{n} of a model with {layers} blocks")));
            }
            let first = mode.trunk_end(layers);
            model.set_trainable(|name| {
                name == "model.norm.weight"
                    || name
                        .strip_prefix("model.layers.")
                        .and_then(|rest| rest.split('.').next())
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i >= first)
            })
        }
        Mode::Lora(rank) => {
            if model.lora().is_none() {
                tch::manual_seed(seed as i64);
                model.add_lora(rank, lora_alpha.unwrap_or(2.0 * rank as f64))?;
            } else if model.lora().map(|l| l.rank) != Some(rank) {
                return Err(Error::Invalid(format!("the model has adapters of another rank than {rank}")));
            }
            model.set_trainable(|name| name.contains(".lora_"))
        }
        Mode::Full => model.set_trainable(|_| true),
    };
    Ok(count)
}

/// Rounds every trainable tensor to `dtype` in place, so the model in memory is the model a
/// version stores (and evaluation measures what agents will run).
pub fn round_trainable(model: &Llama, dtype: SaveDtype) {
    let kind = match dtype {
        SaveDtype::F32 => return,
        SaveDtype::Bf16 => Kind::BFloat16,
    };
    tch::no_grad(|| {
        for (_, t) in model.named_tensors() {
            if t.requires_grad() {
                let rounded = t.to_kind(kind).to_kind(Kind::Float);
                t.shallow_clone().copy_(&rounded);
            }
        }
    });
}

/// Fisher–Yates with SplitMix64: an order that depends on `seed` only (no crate upgrade can
/// change it).
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// The frozen trunk's output for every example: the residual stream entering the first trained
/// block (`trunk_end`), for the prefix (`[1, P, hidden]`) and each example (`[len, hidden]`).
pub struct ActivationCache {
    trunk_end: usize,
    prefix: Option<Tensor>,
    rows: Vec<Tensor>,
}

impl ActivationCache {
    /// Runs blocks `0..trunk_end` of `model` once over every example of `data`: its prompt and,
    /// with `answers`, its answer but the last token (what training feeds); without, the prompt
    /// only (what evaluation needs).
    pub fn build(model: &Llama, data: &TokenSet, trunk_end: usize, answers: bool) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let device = model.device();
        let prefix_in = prefix_embedding(model, data)?;
        let mut prefix = None;
        let mut rows = Vec::with_capacity(data.examples.len());
        // Similar lengths per batch waste less on padding, and the prefix runs once per batch (32
        // rows keep that under a tenth of the pass); the cache is indexed by example.
        let mut order: Vec<usize> = (0..data.examples.len()).collect();
        order.sort_by_key(|&i| data.examples[i].ids.len());
        let mut slots: Vec<Option<Tensor>> = (0..data.examples.len()).map(|_| None).collect();
        for chunk in order.chunks(32) {
            let inputs: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| if answers { data.input(i) } else { data.examples[i].ids.clone() })
                .collect();
            let (ids, _) = pad_ids(&inputs);
            let x = model.embed(&ids.to_device(device))?;
            let (p, out) = model.run_span(prefix_in.as_ref(), &x, 0..trunk_end)?;
            if prefix.is_none() {
                prefix = p;
            }
            for (r, (&i, input)) in chunk.iter().zip(&inputs).enumerate() {
                slots[i] = Some(out.get(r as i64).narrow(0, 0, input.len() as i64).copy());
            }
        }
        rows.extend(slots.into_iter().map(|s| s.expect("every example cached")));
        Ok(ActivationCache { trunk_end, prefix, rows })
    }

    /// The cached streams of `examples`, right-padded with zeros to `t` positions:
    /// `[examples, t, hidden]`.
    fn padded(&self, examples: &[usize], t: i64) -> Tensor {
        let (h, kind, device) = match self.rows.first() {
            Some(row) => (row.size()[1], row.kind(), row.device()),
            None => (0, Kind::Float, tch::Device::Cpu),
        };
        let x = Tensor::zeros([examples.len() as i64, t, h], (kind, device));
        for (r, &i) in examples.iter().enumerate() {
            let row = &self.rows[i];
            x.get(r as i64).narrow(0, 0, row.size()[0]).copy_(row);
        }
        x
    }

    /// The block the cached stream enters.
    pub fn trunk_end(&self) -> usize {
        self.trunk_end
    }

    /// Cached examples.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no example is cached.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The cache of the first `n` examples (sharing storage).
    pub fn truncated(&self, n: usize) -> Self {
        ActivationCache {
            trunk_end: self.trunk_end,
            prefix: self.prefix.as_ref().map(Tensor::shallow_clone),
            rows: self.rows.iter().take(n).map(Tensor::shallow_clone).collect(),
        }
    }

    /// Writes the cache as safetensors (for runs that reuse one trunk pass).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> =
            vec![("trunk_end".into(), Tensor::from_slice(&[self.trunk_end as i64]))];
        if let Some(p) = &self.prefix {
            tensors.push(("prefix".into(), p.to_device(tch::Device::Cpu)));
        }
        for (i, r) in self.rows.iter().enumerate() {
            tensors.push((format!("row.{i}"), r.to_device(tch::Device::Cpu)));
        }
        Tensor::write_safetensors(&tensors, path).map_err(|e| io_err("cannot write", path, e))
    }

    /// Reads a cache [`ActivationCache::save`] wrote, onto `device`.
    pub fn load(path: &Path, device: tch::Device) -> Result<Self> {
        let mut tensors: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(path).map_err(|e| io_err("cannot read", path, e))?.into_iter().collect();
        let trunk_end = tensors
            .remove("trunk_end")
            .map(|t| t.int64_value(&[0]) as usize)
            .ok_or_else(|| io_err("no trunk_end in", path, "cache"))?;
        let prefix = tensors.remove("prefix").map(|t| t.to_device(device));
        let mut rows = Vec::with_capacity(tensors.len());
        for i in 0..tensors.len() {
            let row =
                tensors.remove(&format!("row.{i}")).ok_or_else(|| io_err("missing rows in", path, i))?;
            rows.push(row.to_device(device));
        }
        Ok(ActivationCache { trunk_end, prefix, rows })
    }
}

/// A trainable tensor and its AdamW moments.
struct Slot {
    name: String,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    step: usize,
    fingerprint: String,
    losses: Vec<f32>,
    #[serde(default)]
    first_token_losses: Vec<f32>,
}

/// Trains `model` (already [`prepare`]d) on `data`; resumes from `cfg.checkpoint` when it
/// holds a checkpoint of the same run.
pub fn train(model: &Llama, data: &TokenSet, cfg: &TrainConfig) -> Result<TrainReport> {
    train_with(model, data, cfg, None, &mut |_, _| Ok(()))
}

/// [`train`] with a trunk pass computed before (`cache`, built with answers from the same
/// `data`; `last-layers` only), and `after_epoch(epoch, model)` called after each epoch's
/// last step (e.g. to evaluate as training goes).
pub fn train_with(
    model: &Llama,
    data: &TokenSet,
    cfg: &TrainConfig,
    cache: Option<&ActivationCache>,
    after_epoch: &mut dyn FnMut(usize, &Llama) -> Result<()>,
) -> Result<TrainReport> {
    data.validate()?;
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Invalid("batch size and epochs must be at least 1".into()));
    }
    let layers = model.config().num_hidden_layers;
    let trunk_end = cfg.mode.trunk_end(layers);
    let mut slots: Vec<Slot> = model
        .named_tensors()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(name, param)| Slot {
            m: param.zeros_like(),
            v: param.zeros_like(),
            decay: param.dim() >= 2,
            name,
            param,
        })
        .collect();
    if slots.is_empty() {
        return Err(Error::Invalid("nothing is trainable; call prepare first".into()));
    }
    let n = data.examples.len();
    let steps_per_epoch = n.div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let fingerprint = format!(
        "mode={} n={n} bs={} epochs={} lr={} schedule={} seed={} tensors={}",
        cfg.mode,
        cfg.batch_size,
        cfg.epochs,
        cfg.lr,
        cfg.schedule,
        cfg.seed,
        slots.len()
    );
    let (mut losses, mut first_losses) = (Vec::new(), Vec::new());
    let mut start = 0;
    if let Some(ck) = &cfg.checkpoint
        && let Some(meta) = load_checkpoint(&ck.dir, &fingerprint, &mut slots)?
    {
        info!(step = meta.step, dir = %ck.dir.display(), "resuming from checkpoint");
        start = meta.step;
        losses = meta.losses;
        first_losses = meta.first_token_losses;
    }
    let mut report = TrainReport {
        losses: Vec::new(),
        first_token_losses: Vec::new(),
        total_steps: total,
        steps_done: start,
        resumed_from: start,
        trainable_tensors: slots.len(),
        trainable_params: slots.iter().map(|s| s.param.numel() as u64).sum(),
        cache_seconds: 0.0,
        train_seconds: 0.0,
        train_tokens: 0,
        grad_norms: Vec::new(),
    };
    let end = cfg.stop_after.map_or(total, |s| s.min(total));
    if let Some(c) = cache
        && (c.trunk_end != trunk_end || c.rows.len() != n)
    {
        return Err(Error::Invalid(format!(
            "the activation cache holds {} examples entering block {}, this run needs {n} entering {trunk_end}",
            c.rows.len(),
            c.trunk_end
        )));
    }
    let built;
    let cache = match cache {
        Some(c) if trunk_end > 0 => Some(c),
        _ if trunk_end > 0 && cfg.activation_cache && start < end => {
            let t0 = Instant::now();
            built = ActivationCache::build(model, data, trunk_end, true)?;
            report.cache_seconds = t0.elapsed().as_secs_f64();
            info!(examples = n, seconds = report.cache_seconds, "computed the frozen trunk's activations");
            Some(&built)
        }
        _ => None,
    };
    let t0 = Instant::now();
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = usize::MAX;
    let (mut right_epoch, mut right_seen) = (usize::MAX, (0usize, 0usize));
    for step in start..end {
        let epoch = step / steps_per_epoch;
        if epoch != order_epoch {
            order = (0..n).collect();
            shuffle(&mut order, cfg.seed ^ (epoch as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
            order_epoch = epoch;
        }
        let first = (step % steps_per_epoch) * cfg.batch_size;
        let batch = &order[first..(first + cfg.batch_size).min(n)];
        for s in &mut slots {
            s.param.zero_grad();
        }
        let (loss, first_token, right) = batch_loss(model, data, batch, trunk_end, cache, cfg.objective)?;
        if epoch != right_epoch {
            if right_epoch != usize::MAX {
                info!(
                    epoch = right_epoch,
                    accuracy = right_seen.0 as f64 / right_seen.1.max(1) as f64,
                    "training accuracy during the epoch"
                );
            }
            (right_epoch, right_seen) = (epoch, (0, 0));
        }
        right_seen = (right_seen.0 + right, right_seen.1 + batch.len());
        loss.backward();
        let lr = cfg.schedule.rate(cfg.lr, step, cfg.warmup_steps, total);
        let grad_norm = adamw_step(&mut slots, step + 1, lr, cfg.weight_decay, cfg.clip_norm);
        report.grad_norms.push(grad_norm as f32);
        let value = loss.double_value(&[]) as f32;
        if !value.is_finite() {
            return Err(Error::Invalid(format!("loss is {value} at step {step}; lower the learning rate")));
        }
        losses.push(value);
        first_losses.push(first_token);
        report.train_tokens += batch.iter().map(|&i| data.sequence_len(i) as u64).sum::<u64>();
        if step % 10 == 0 || step + 1 == end {
            info!(step, total, loss = value, first_token_loss = first_token, lr, grad_norm, "step");
        }
        if (step + 1) % steps_per_epoch == 0 {
            after_epoch(epoch, model)?;
        }
        if let Some(ck) = &cfg.checkpoint
            && ck.every > 0
            && (step + 1) % ck.every == 0
        {
            save_checkpoint(
                &ck.dir,
                &CheckpointMeta {
                    step: step + 1,
                    fingerprint: fingerprint.clone(),
                    losses: losses.clone(),
                    first_token_losses: first_losses.clone(),
                },
                &slots,
            )?;
        }
    }
    if right_seen.1 > 0 {
        info!(
            epoch = right_epoch,
            accuracy = right_seen.0 as f64 / right_seen.1 as f64,
            "training accuracy during the epoch"
        );
    }
    for s in &mut slots {
        s.param.zero_grad();
    }
    report.train_seconds = t0.elapsed().as_secs_f64();
    report.steps_done = end.max(start);
    report.losses = losses;
    report.first_token_losses = first_losses;
    Ok(report)
}

/// Right-padded `[B, T]` ids of `rows`, and `T`.
fn pad_ids(rows: &[Vec<u32>]) -> (Tensor, i64) {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut flat = vec![0i64; rows.len() * t];
    for (r, row) in rows.iter().enumerate() {
        for (k, &id) in row.iter().enumerate() {
            flat[r * t + k] = i64::from(id);
        }
    }
    (Tensor::from_slice(&flat).view([rows.len() as i64, t as i64]), t as i64)
}

fn prefix_embedding(model: &Llama, data: &TokenSet) -> Result<Option<Tensor>> {
    if data.prefix.is_empty() {
        return Ok(None);
    }
    let ids: Vec<i64> = data.prefix.iter().map(|&i| i64::from(i)).collect();
    Ok(Some(model.embed(&Tensor::from_slice(&ids).view([1, -1]))?))
}

/// The loss of `batch` under `objective` (see [`Objective`]), averaged over its examples; the
/// mean cross-entropy of the answers' first tokens over the whole vocabulary (for the logs);
/// and how many of the batch the model gets right before the step.
fn batch_loss(
    model: &Llama,
    data: &TokenSet,
    batch: &[usize],
    trunk_end: usize,
    cache: Option<&ActivationCache>,
    objective: Objective,
) -> Result<(Tensor, f32, usize)> {
    let device = model.device();
    let layers = model.config().num_hidden_layers;
    let inputs: Vec<Vec<u32>> = batch.iter().map(|&i| data.input(i)).collect();
    let t = inputs.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let (prefix, x) = match cache {
        Some(cache) => (cache.prefix.as_ref().map(Tensor::shallow_clone), cache.padded(batch, t)),
        None => {
            let (ids, _) = pad_ids(&inputs);
            let x = model.embed(&ids.to_device(device))?;
            let prefix = prefix_embedding(model, data)?;
            if trunk_end > 0 {
                let (p, x) = tch::no_grad(|| model.run_span(prefix.as_ref(), &x, 0..trunk_end))?;
                (p, x)
            } else {
                (prefix, x)
            }
        }
    };
    // Only the positions that predict answer tokens are read: each example's first answer
    // position, then those that predict the later tokens of its true answer. The last block
    // computes only them (`run_span_at`); rows are padded by repeating a position.
    let width = batch.iter().map(|&i| data.candidates[data.examples[i].label].len()).max().unwrap_or(1);
    let mut at = Vec::with_capacity(batch.len() * width);
    let (mut firsts, mut later, mut later_targets) = (Vec::new(), Vec::new(), Vec::new());
    for (r, &i) in batch.iter().enumerate() {
        let e = &data.examples[i];
        let answer = &data.candidates[e.label];
        let start = (e.ids.len() - 1) as i64;
        firsts.push((r * width) as i64);
        for (j, &token) in answer.iter().enumerate().skip(1) {
            later.push((r * width + j) as i64);
            later_targets.push(i64::from(token));
        }
        at.extend((0..width).map(|j| start + j.min(answer.len() - 1) as i64));
    }
    let at = Tensor::from_slice(&at).view([batch.len() as i64, width as i64]);
    let out = model.run_span_at(prefix.as_ref(), &x, trunk_end..layers, &at)?;
    let rows: Vec<i64> = firsts.iter().chain(&later).copied().collect();
    let hidden = out.view([-1, out.size()[2]]).index_select(0, &Tensor::from_slice(&rows).to_device(device));
    let log_probs = model.logits(&model.final_norm(&hidden)).log_softmax(-1, Kind::Float);
    let b = batch.len() as i64;
    let first = log_probs.narrow(0, 0, b);
    let heads: Vec<i64> = data.candidates.iter().map(|c| i64::from(c[0])).collect();
    let truth: Vec<i64> = batch.iter().map(|&i| data.examples[i].label as i64).collect();
    let truth = Tensor::from_slice(&truth).to_device(device);
    let head_ids: Vec<i64> = batch.iter().map(|&i| heads[data.examples[i].label]).collect();
    let first_nll = first
        .gather(1, &Tensor::from_slice(&head_ids).to_device(device).view([-1, 1]), false)
        .neg()
        .view([-1]);
    // Logits of the candidates' first tokens: what tells the labels apart (the later tokens of
    // an answer follow from its first when the first tokens differ, as for the task's labels).
    let candidate_scores = first.index_select(1, &Tensor::from_slice(&heads).to_device(device));
    let later_nll = if later.is_empty() {
        Tensor::zeros([0], (Kind::Float, device))
    } else {
        log_probs
            .narrow(0, b, later.len() as i64)
            .gather(1, &Tensor::from_slice(&later_targets).to_device(device).view([-1, 1]), false)
            .neg()
            .view([-1])
    };
    let first_loss = match objective {
        Objective::Vocab => first_nll.sum(Kind::Float),
        Objective::Candidates => candidate_scores
            .log_softmax(-1, Kind::Float)
            .gather(1, &truth.view([-1, 1]), false)
            .neg()
            .sum(Kind::Float),
    };
    let (first_token, right) = tch::no_grad(|| {
        let said = candidate_scores.argmax(-1, false);
        let right = said.eq_tensor(&truth).sum(Kind::Int64).int64_value(&[]);
        (first_nll.mean(Kind::Float).double_value(&[]), right as usize)
    });
    // Per example, the answer's summed negative log-probability (Vocab) or the candidates'
    // cross-entropy plus the later tokens' (Candidates), averaged over the batch.
    Ok(((first_loss + later_nll.sum(Kind::Float)) / batch.len() as f64, first_token as f32, right))
}

/// Label probabilities of every example of `data` from the first answer token alone (softmax
/// over the candidates' first-token logits), run through the trained blocks on `cache` (built
/// with or without answers). Equal to the agent's decision when the answers' later tokens follow from
/// their first; [`crate::eval`] scores whole answers.
pub fn cached_first_token_probabilities(
    model: &Llama,
    data: &TokenSet,
    cache: &ActivationCache,
    batch: usize,
) -> Result<Vec<Vec<f64>>> {
    let _guard = tch::no_grad_guard();
    let device = model.device();
    let layers = model.config().num_hidden_layers;
    let h = model.config().hidden_size as i64;
    let heads: Vec<i64> = data.candidates.iter().map(|c| i64::from(c[0])).collect();
    let heads = Tensor::from_slice(&heads).to_device(device);
    let mut out = Vec::with_capacity(data.examples.len());
    let order: Vec<usize> = (0..data.examples.len()).collect();
    for chunk in order.chunks(batch.max(1)) {
        // The prompt's last position: the cache may hold the answer after it (a training cache).
        let at: Vec<i64> = chunk.iter().map(|&i| data.examples[i].ids.len() as i64 - 1).collect();
        let x = cache.padded(chunk, chunk.iter().map(|&i| cache.rows[i].size()[0]).max().unwrap_or(0));
        let at = Tensor::from_slice(&at).view([-1, 1]);
        let y = model.run_span_at(cache.prefix.as_ref(), &x, cache.trunk_end..layers, &at)?;
        let hidden = y.view([-1, h]);
        let p = model.logits(&model.final_norm(&hidden)).index_select(1, &heads).softmax(-1, Kind::Double);
        let p: Vec<f64> = Vec::<f64>::try_from(p.to_device(tch::Device::Cpu).view([-1]))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        out.extend(p.chunks(heads.size()[0] as usize).map(<[f64]>::to_vec));
    }
    Ok(out)
}

/// One AdamW update (β = 0.9, 0.999; ε = 1e-8) after clipping the global gradient norm;
/// returns that norm before clipping.
///
/// Every operation works in place except one square per tensor: on CPU the update is bound by
/// memory traffic (parameters, gradients and both moments are read and written once per
/// operation), and the straightforward form, with a temporary per arithmetic operation, cost
/// more than half of a `last-layers:2` step.
fn adamw_step(slots: &mut [Slot], t: usize, lr: f64, weight_decay: f64, clip_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let grads: Vec<Option<Tensor>> = slots
        .iter()
        .map(|s| {
            let g = s.param.grad();
            g.defined().then_some(g)
        })
        .collect();
    let norm = grads.iter().flatten().map(|g| g.norm().double_value(&[]).powi(2)).sum::<f64>().sqrt();
    let scale = if clip_norm > 0.0 && norm > clip_norm { clip_norm / (norm + 1e-6) } else { 1.0 };
    let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
    for (s, g) in slots.iter_mut().zip(grads) {
        let Some(mut g) = g else { continue };
        if scale < 1.0 {
            // The gradient is zeroed before the next backward pass, so it may be scaled in place.
            let _ = g.g_mul_scalar_(scale);
        }
        // m ← β₁m + (1 − β₁)g and v ← β₂v + (1 − β₂)g², as interpolations.
        let _ = s.m.lerp_(&g, 1.0 - b1);
        let _ = s.v.lerp_(&g.square(), 1.0 - b2);
        if lr == 0.0 {
            continue;
        }
        let mut p = s.param.shallow_clone();
        if s.decay && weight_decay > 0.0 {
            let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
        }
        // p ← p − lr·(m/c₁)/(√(v/c₂) + ε), written as p + m/d with d = −(c₁/lr)(√v/√c₂ + ε).
        let mut d = s.v.sqrt();
        let _ = d.g_div_scalar_(c2.sqrt()).g_add_scalar_(eps).g_mul_scalar_(-c1 / lr);
        let _ = p.addcdiv_(&s.m, &d);
    }
    norm
}

const LATEST: &str = "LATEST";

fn io_err(what: &str, path: &Path, e: impl fmt::Display) -> Error {
    Error::Invalid(format!("{what} {}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_err("cannot write", &tmp, e))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io_err("cannot sync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err("cannot rename to", path, e))
}

/// Saves a checkpoint: tensors and metadata under step-named files (each written atomically),
/// then the `LATEST` pointer (atomically), then older checkpoints are removed. A crash at any
/// point leaves `LATEST` naming a complete checkpoint.
fn save_checkpoint(dir: &Path, meta: &CheckpointMeta, slots: &[Slot]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    let stem = format!("step-{:08}", meta.step);
    let tensors: Vec<(String, Tensor)> = slots
        .iter()
        .flat_map(|s| {
            [
                (format!("param/{}", s.name), s.param.detach()),
                (format!("m/{}", s.name), s.m.shallow_clone()),
                (format!("v/{}", s.name), s.v.shallow_clone()),
            ]
        })
        .map(|(n, t)| (n, t.to_device(tch::Device::Cpu)))
        .collect();
    let st = dir.join(format!("{stem}.safetensors"));
    let tmp = dir.join(format!("{stem}.safetensors.tmp"));
    Tensor::write_safetensors(&tensors, &tmp).map_err(|e| io_err("cannot write", &tmp, e))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io_err("cannot sync", &tmp, e))?;
    std::fs::rename(&tmp, &st).map_err(|e| io_err("cannot rename to", &st, e))?;
    let json = serde_json::to_vec(meta).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&dir.join(format!("{stem}.json")), &json)?;
    write_atomic(&dir.join(LATEST), stem.as_bytes())?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("step-") && !name.starts_with(&stem) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    info!(step = meta.step, dir = %dir.display(), "checkpoint saved");
    Ok(())
}

/// Loads the checkpoint `LATEST` names into `slots`; `None` when there is none. A checkpoint
/// of a different run (other fingerprint) is an error rather than silently mixed in.
fn load_checkpoint(dir: &Path, fingerprint: &str, slots: &mut [Slot]) -> Result<Option<CheckpointMeta>> {
    let Ok(stem) = std::fs::read_to_string(dir.join(LATEST)) else { return Ok(None) };
    let stem = stem.trim();
    let meta_path = dir.join(format!("{stem}.json"));
    let meta: CheckpointMeta =
        serde_json::from_slice(&std::fs::read(&meta_path).map_err(|e| io_err("cannot read", &meta_path, e))?)
            .map_err(|e| io_err("cannot parse", &meta_path, e))?;
    if meta.fingerprint != fingerprint {
        return Err(Error::Invalid(format!(
            "checkpoint in {} is of another run ({}), this run is {fingerprint}; use another --checkpoint-dir",
            dir.display(),
            meta.fingerprint
        )));
    }
    let st = dir.join(format!("{stem}.safetensors"));
    let tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&st).map_err(|e| io_err("cannot read", &st, e))?.into_iter().collect();
    let _guard = tch::no_grad_guard();
    for s in slots.iter_mut() {
        for (prefix, dst) in [("param", &mut s.param), ("m", &mut s.m), ("v", &mut s.v)] {
            let key = format!("{prefix}/{}", s.name);
            let src = tensors
                .get(&key)
                .ok_or_else(|| io_err(&format!("{key} is missing from"), &st, "checkpoint"))?;
            dst.copy_(src);
        }
    }
    Ok(Some(meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for s in ["last-layers:2", "lora:8", "full"] {
            assert_eq!(s.parse::<Mode>().unwrap().to_string(), s);
        }
        for s in ["last-layers:0", "lora", "lora:x", "half"] {
            assert!(s.parse::<Mode>().is_err(), "{s}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let learning_rate = |step| Schedule::Cosine.rate(1.0, step, 4, 20);
        assert!((learning_rate(0) - 0.25).abs() < 1e-12);
        assert!((learning_rate(3) - 1.0).abs() < 1e-12);
        assert!((learning_rate(4) - 1.0).abs() < 1e-12);
        assert!(learning_rate(12) < 1.0);
        assert!(learning_rate(20).abs() < 1e-12);
    }

    #[test]
    fn constant_schedule_warms_up_then_stays_at_the_peak() {
        let rate = |step| Schedule::Constant.rate(2.0, step, 4, 20);
        assert!((rate(0) - 0.5).abs() < 1e-12);
        assert!((rate(3) - 2.0).abs() < 1e-12);
        for step in [4, 12, 19, 20] {
            assert_eq!(rate(step), 2.0, "step {step}");
        }
        assert_eq!("constant".parse::<Schedule>().unwrap(), Schedule::Constant);
        assert_eq!("cosine".parse::<Schedule>().unwrap().to_string(), "cosine");
        assert!("linear".parse::<Schedule>().is_err());
    }

    /// The in-place update against AdamW written out per element, over three steps with
    /// clipping, weight decay on matrices only and a tensor without a gradient.
    #[test]
    fn adamw_matches_the_update_written_per_element() {
        let init = [vec![0.5f32, -1.0, 2.0, 0.25, -0.75, 1.5], vec![0.1f32, -0.2, 0.3]];
        let grads = [vec![1.0f32, -2.0, 0.5, 3.0, -0.5, 0.25], vec![-0.4f32, 0.8, 0.2]];
        let mut slots: Vec<Slot> = init
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let p = Tensor::from_slice(v);
                let p = if i == 0 { p.view([2, 3]) } else { p };
                let p = p.set_requires_grad(true);
                Slot {
                    name: i.to_string(),
                    m: p.zeros_like(),
                    v: p.zeros_like(),
                    decay: p.dim() >= 2,
                    param: p,
                }
            })
            .collect();
        let frozen = Tensor::from_slice(&[7.0f32]).set_requires_grad(true);
        slots.push(Slot {
            name: "no-grad".into(),
            m: frozen.zeros_like(),
            v: frozen.zeros_like(),
            decay: false,
            param: frozen,
        });
        let (lr, wd, clip) = (0.01, 0.1, 2.0);
        let mut want: Vec<Vec<f64>> =
            init.iter().map(|v| v.iter().map(|&x| f64::from(x)).collect()).collect();
        let mut m: Vec<Vec<f64>> = want.iter().map(|v| vec![0.0; v.len()]).collect();
        let mut v2 = m.clone();
        for t in 1..=3usize {
            // Gradients scaled per step so that the first is clipped and the others are not.
            let k = [1.0f32, 0.1, 0.05][t - 1];
            for (s, g) in slots.iter_mut().zip(&grads) {
                let g: Vec<f32> = g.iter().map(|x| x * k).collect();
                let loss =
                    (&s.param * Tensor::from_slice(&g).view(s.param.size().as_slice())).sum(Kind::Float);
                s.param.zero_grad();
                loss.backward();
            }
            let reported = adamw_step(&mut slots, t, lr, wd, clip);
            let g: Vec<Vec<f64>> =
                grads.iter().map(|g| g.iter().map(|&x| f64::from(x * k)).collect()).collect();
            let norm = g.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
            assert!((reported - norm).abs() < 1e-5 * norm, "step {t}: norm {reported} vs {norm}");
            let scale = if norm > clip { clip / (norm + 1e-6) } else { 1.0 };
            let (c1, c2) = (1.0 - 0.9f64.powi(t as i32), 1.0 - 0.999f64.powi(t as i32));
            for (i, gi) in g.iter().enumerate() {
                for (j, &gij) in gi.iter().enumerate() {
                    let gij = gij * scale;
                    m[i][j] = 0.9 * m[i][j] + 0.1 * gij;
                    v2[i][j] = 0.999 * v2[i][j] + 0.001 * gij * gij;
                    if i == 0 {
                        want[i][j] *= 1.0 - lr * wd;
                    }
                    want[i][j] -= lr * (m[i][j] / c1) / ((v2[i][j] / c2).sqrt() + 1e-8);
                }
            }
        }
        for (s, w) in slots.iter().zip(&want) {
            let got: Vec<f32> = Vec::try_from(s.param.detach().view([-1])).unwrap();
            for (a, b) in got.iter().zip(w) {
                assert!((f64::from(*a) - b).abs() < 1e-6, "{}: {got:?} vs {w:?}", s.name);
            }
        }
        let untouched: Vec<f32> = Vec::try_from(slots[2].param.detach()).unwrap();
        assert_eq!(untouched, vec![7.0]);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let mut a: Vec<usize> = (0..100).collect();
        let mut b = a.clone();
        shuffle(&mut a, 3);
        shuffle(&mut b, 3);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        shuffle(&mut b, 4);
        assert_ne!(a, b);
    }
}
