//! The Llama-architecture decoder (SmolLM2) in libtorch, and its KV cache.
//!
//! The computation follows Hugging Face's `LlamaForCausalLM` operation for operation, so logits
//! agree with `transformers` in f32 to rounding: RMSNorm, rotary embeddings in the HF
//! `rotate_half` convention on HF-ordered (un-permuted) q/k weights, grouped-query attention via
//! `scaled_dot_product_attention`, SwiGLU MLP, optionally tied output head.
//!
//! Parameters live in a [`tch::nn::VarStore`] under their Hugging Face names
//! (`model.layers.3.self_attn.q_proj.weight`, …), so the trainer can hand them to an optimizer,
//! freeze any subset by name, and save them back with the names `transformers` expects. They
//! are loaded frozen (`requires_grad = false`); inference paths additionally run under
//! `no_grad`.
//!
//! Batches of sequences of different lengths are padded; the [`KvCache`] records per slot
//! whether it holds a real token, and positions count real tokens only, so a padded row
//! computes exactly what it would alone. Padded query slots attend to themselves only, which
//! keeps softmax finite; their outputs are never read.
//!
//! A `Llama` is `Send` but not `Sync` (libtorch tensors are not): run it on one thread at a time.

use std::ops::Range;
use std::sync::{Condvar, Mutex, PoisonError};

use tch::{Device, Kind, Tensor, nn};
use tracing::debug;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// Which side of a row shorter than the batch's longest is filled with padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Padding before the tokens: the last slot of every non-empty row is a real token, which
    /// is what prompt prefill wants (the next-token logits sit at one index for all rows).
    Left,
    /// Padding after the tokens: every row's real tokens start at the same slot, which suits
    /// continuations scored position by position.
    Right,
}

/// One decoder layer's weights, each `[out_features, in_features]` as in Hugging Face.
///
/// `q_proj`, `k_proj` and `v_proj` are row ranges (views) of one `qkv` tensor, and `gate_proj`
/// and `up_proj` of one `gate_up` tensor: the parameters keep their HF names and stay separate
/// leaves for optimizers, while inference runs one matrix multiply per group instead of three
/// and two (bigger GEMMs run faster, and decoding pays fewer per-op costs). An optimizer's
/// in-place update of a view writes the fused storage, so both always agree.
struct Layer {
    input_layernorm: Tensor,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    qkv: Tensor,
    o_proj: Tensor,
    post_attention_layernorm: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    gate_up: Tensor,
    down_proj: Tensor,
    /// LoRA adapters of the seven projections in [`LORA_PROJECTIONS`] order, when added.
    lora: Option<Vec<Adapter>>,
}

impl Layer {
    /// Whether the forward pass must go through the separate projections: when any of them is
    /// being trained (or autograd would not reach the parameter views), or when adapters are
    /// set (they act on each projection's own output).
    fn unfused(&self) -> bool {
        self.lora.is_some()
            || [&self.q_proj, &self.k_proj, &self.v_proj, &self.gate_proj, &self.up_proj]
                .iter()
                .any(|t| t.requires_grad())
    }

    /// New handles to the same weights (no copy), for a worker thread to own.
    fn shallow(&self) -> Layer {
        Layer {
            input_layernorm: self.input_layernorm.shallow_clone(),
            q_proj: self.q_proj.shallow_clone(),
            k_proj: self.k_proj.shallow_clone(),
            v_proj: self.v_proj.shallow_clone(),
            qkv: self.qkv.shallow_clone(),
            o_proj: self.o_proj.shallow_clone(),
            post_attention_layernorm: self.post_attention_layernorm.shallow_clone(),
            gate_proj: self.gate_proj.shallow_clone(),
            up_proj: self.up_proj.shallow_clone(),
            gate_up: self.gate_up.shallow_clone(),
            down_proj: self.down_proj.shallow_clone(),
            lora: self.lora.as_ref().map(|adapters| {
                adapters.iter().map(|a| Adapter { a: a.a.shallow_clone(), b: a.b.shallow_clone() }).collect()
            }),
        }
    }
}

/// The projections LoRA adapts, as HF name infixes, in the order [`Layer::lora`] holds them.
pub const LORA_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// One projection's low-rank adapter: `y += scale · B (A x)`, `A` `[rank, in]`, `B` `[out, rank]`.
struct Adapter {
    a: Tensor,
    b: Tensor,
}

/// Rank and alpha of the LoRA adapters a model carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSpec {
    /// Rank of every adapter.
    pub rank: usize,
    /// Scale numerator: adapters add `alpha / rank · B A x`.
    pub alpha: f64,
}

/// Registers `t` in `vs` under the dot-separated HF `name` (VarStore paths are dot-separated:
/// walk to the parent path, add the leaf).
fn register(vs: &nn::VarStore, name: &str, t: Tensor) -> Tensor {
    let (parent, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let mut path = vs.root();
    for part in parent.split('.').filter(|p| !p.is_empty()) {
        path = path.sub(part);
    }
    path.add(leaf, t, true)
}

/// The HF names of one layer's tensors, in [`Layer`] field order, with their shapes.
fn layer_tensor_specs(config: &LlamaConfig, layer: usize) -> Vec<(String, Vec<i64>)> {
    let h = config.hidden_size as i64;
    let kv = config.kv_dim() as i64;
    let i = config.intermediate_size as i64;
    let p = format!("model.layers.{layer}");
    vec![
        (format!("{p}.input_layernorm.weight"), vec![h]),
        (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
        (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
        (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
        (format!("{p}.post_attention_layernorm.weight"), vec![h]),
        (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
        (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
    ]
}

/// Every tensor a model with `config` has, by Hugging Face name, with its shape; in the order
/// `transformers` lists them (embeddings, layers, final norm, head).
pub fn tensor_specs(config: &LlamaConfig) -> Vec<(String, Vec<i64>)> {
    let h = config.hidden_size as i64;
    let v = config.vocab_size as i64;
    let mut specs = vec![("model.embed_tokens.weight".to_owned(), vec![v, h])];
    for layer in 0..config.num_hidden_layers {
        specs.extend(layer_tensor_specs(config, layer));
    }
    specs.push(("model.norm.weight".to_owned(), vec![h]));
    if !config.tie_word_embeddings {
        specs.push(("lm_head.weight".to_owned(), vec![v, h]));
    }
    specs
}

/// A Llama-architecture causal language model on one device.
pub struct Llama {
    config: LlamaConfig,
    vs: nn::VarStore,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The output projection; shares storage with `embed_tokens` when the head is tied.
    lm_head: Tensor,
    /// `1 / θ^(2i/d)` for the rotary embedding, `[head_dim / 2]`, f32.
    inv_freq: Tensor,
    /// Intra-op threads for steps of at most [`SMALL_STEP_TOKENS`] tokens on the CPU (0: leave
    /// libtorch's setting alone). See [`Llama::set_small_step_threads`].
    small_step_threads: usize,
    /// The adapters' rank and alpha, when [`Llama::add_lora`] added them.
    lora: Option<LoraSpec>,
}

/// A step this small (batch × new tokens) is a matrix-vector product bound by memory bandwidth.
const SMALL_STEP_TOKENS: i64 = 4;

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama").field("config", &self.config).field("device", &self.device()).finish()
    }
}

impl Llama {
    /// Builds a model on `device` from tensors supplied by `fetch(hf_name, expected_shape)`.
    ///
    /// `fetch` is called once per tensor of [`tensor_specs`], in order, and may return the
    /// tensor on any device and in any float kind; it is converted to f32 on `device` and its
    /// shape checked. Fetching one tensor at a time keeps peak memory at one tensor beyond the
    /// model itself.
    pub fn from_fetch(
        config: LlamaConfig,
        device: Device,
        mut fetch: impl FnMut(&str, &[i64]) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let vs = nn::VarStore::new(device);
        // Fetches `name`, checks it, and registers `into` (or a fresh tensor) holding it as a
        // parameter. Registered as trainable so the trainer can unfreeze it; frozen below.
        let mut load = |name: &str, shape: &[i64], into: Option<Tensor>| -> Result<Tensor> {
            let t = fetch(name, shape)?;
            if t.size() != shape {
                return Err(Error::weights(name, format!("shape {:?}, expected {shape:?}", t.size())));
            }
            if !t.is_floating_point() {
                return Err(Error::weights(name, format!("kind {:?} is not a float type", t.kind())));
            }
            let t = t.to_device(device).to_kind(Kind::Float).detach();
            let t = match into {
                Some(mut slot) => {
                    tch::no_grad(|| slot.copy_(&t));
                    slot
                }
                None => t.contiguous(),
            };
            Ok(register(&vs, name, t))
        };
        let (h, kv, inter) =
            (config.hidden_size as i64, config.kv_dim() as i64, config.intermediate_size as i64);
        let specs = tensor_specs(&config);
        let mut specs = specs.iter();
        let mut next = || specs.next().expect("tensor_specs lists every tensor the model loads");
        let (name, shape) = next();
        let embed_tokens = load(name, shape, None)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for _ in 0..config.num_hidden_layers {
            let qkv = Tensor::zeros([h + 2 * kv, h], (Kind::Float, device));
            let gate_up = Tensor::zeros([2 * inter, h], (Kind::Float, device));
            // Field order of `Layer` = order of `layer_tensor_specs`.
            let mut t = |into: Option<Tensor>| {
                let (name, shape) = next();
                load(name, shape, into)
            };
            layers.push(Layer {
                input_layernorm: t(None)?,
                q_proj: t(Some(qkv.narrow(0, 0, h)))?,
                k_proj: t(Some(qkv.narrow(0, h, kv)))?,
                v_proj: t(Some(qkv.narrow(0, h + kv, kv)))?,
                qkv,
                o_proj: t(None)?,
                post_attention_layernorm: t(None)?,
                gate_proj: t(Some(gate_up.narrow(0, 0, inter)))?,
                up_proj: t(Some(gate_up.narrow(0, inter, inter)))?,
                gate_up,
                down_proj: t(None)?,
                lora: None,
            });
        }
        let (name, shape) = next();
        let norm = load(name, shape, None)?;
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            let (name, shape) = next();
            load(name, shape, None)?
        };
        let mut vs = vs;
        vs.freeze();

        // Exactly HF's LlamaRotaryEmbedding: int64 arange cast to f32, divided, θ^x in f32.
        let half = config.head_dim as i64 / 2;
        let exponent = Tensor::arange_start_step(0, 2 * half, 2, (Kind::Int64, device)).to_kind(Kind::Float)
            / config.head_dim as f64;
        let inv_freq = Tensor::pow_scalar(config.rope_theta, &exponent).reciprocal();
        debug!(
            layers = config.num_hidden_layers,
            hidden = config.hidden_size,
            params = config.num_parameters(),
            ?device,
            "llama model built"
        );
        Ok(Llama {
            config,
            vs,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            small_step_threads: 1,
            lora: None,
        })
    }

    /// Sets the intra-op threads used for CPU steps of at most 4 tokens (decoding), 0 to use
    /// libtorch's setting for every step; the default is 1.
    ///
    /// Why 1: a decode step is ~150 small parallel regions (one per matrix-vector product and
    /// attention call), each bound by memory bandwidth, which one core nearly saturates. With
    /// more threads every region waits at a barrier for all of them, and on a node where other
    /// work holds a core (the agent's own I/O, anything else) a descheduled thread stalls each
    /// barrier for a scheduler slice: we measured 2 threads decoding 4-5x slower than 1 on a
    /// busy 2-core machine, and no faster on an idle one. Prefill keeps every thread.
    /// libtorch's thread count is per calling thread (OpenMP and MKL-local), and is restored
    /// after the step.
    pub fn set_small_step_threads(&mut self, threads: usize) {
        self.small_step_threads = threads;
    }

    /// The architecture hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The parameter store, for optimizers and freezing (names are Hugging Face's).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the parameter store (`freeze`, `unfreeze`, device moves are not
    /// supported: the model keeps shallow handles to its tensors).
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Every parameter by Hugging Face name, sorted by name (handles share storage with the
    /// model). The tied head is not listed separately, as in `transformers`' own files.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Sets `requires_grad` on the parameters whose names satisfy `select` and clears it on all
    /// others; returns how many parameters are now trainable. E.g. train only the last two
    /// layers with `|n| n.starts_with("model.layers.28.") || n.starts_with("model.layers.29.")`.
    pub fn set_trainable(&self, mut select: impl FnMut(&str) -> bool) -> usize {
        let mut count = 0;
        for (name, t) in self.vs.variables() {
            let on = select(&name);
            let _ = t.set_requires_grad(on);
            count += usize::from(on);
        }
        count
    }

    /// Checks that every id is inside the vocabulary (ids are untrusted input).
    pub(crate) fn check_ids<'a>(&self, rows: impl IntoIterator<Item = &'a [u32]>) -> Result<()> {
        let vocab = self.config.vocab_size;
        for row in rows {
            if let Some(&bad) = row.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::input(format!("token id {bad} is outside the vocabulary of {vocab}")));
            }
        }
        Ok(())
    }

    /// Logits of the whole batch, for training and evaluation: `input_ids` `[B, T]` (int64) and
    /// an optional `attention_mask` `[B, T]` (1 for real tokens, 0 for padding, either side).
    /// Returns `[B, T, vocab]` f32; differentiable unless called under `no_grad`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let size = input_ids.size();
        let &[b, t] = size.as_slice() else {
            return Err(Error::input(format!("input_ids must be [batch, len], got {size:?}")));
        };
        if t == 0 {
            return Err(Error::input("input_ids has no positions"));
        }
        if t as usize > self.config.max_position_embeddings {
            return Err(Error::input(format!("{t} positions exceed the context of the model")));
        }
        let device = self.device();
        let ids = input_ids.to_device(device).to_kind(Kind::Int64);
        let (min, max) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if min < 0 || max >= self.config.vocab_size as i64 {
            return Err(Error::input(format!("token ids span {min}..={max}, outside the vocabulary")));
        }
        let (positions, mask, causal) = match attention_mask {
            None => (Tensor::arange(t, (Kind::Int64, device)).expand([b, t], true), None, true),
            Some(m) => {
                if m.size() != size {
                    return Err(Error::input(format!("attention_mask {:?} != input_ids {size:?}", m.size())));
                }
                let valid = m.to_device(device).to_kind(Kind::Bool);
                let positions = (valid.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1).clamp_min(0);
                let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
                let diag = Tensor::eye(t, (Kind::Bool, device));
                // [B, 1, T, T]: causal, real keys only, and always the slot itself.
                let mask =
                    causal.unsqueeze(0).logical_and(&valid.unsqueeze(1)).logical_or(&diag).unsqueeze(1);
                (positions, Some(mask), false)
            }
        };
        let x = Tensor::embedding(&self.embed_tokens, &ids, -1, false, false);
        let hidden = self.run_layers(x, &positions, mask.as_ref(), causal, None, false);
        Ok(hidden.linear::<Tensor>(&self.lm_head, None))
    }

    /// Runs `rows` (one per sequence of `cache`, possibly of different lengths, possibly empty)
    /// through the model after the tokens already in `cache`, and appends their keys and values.
    /// Returns the final-norm hidden states `[B, T, hidden]` where `T` is the longest row;
    /// [`KvCache::last_hidden`] then holds each row's state after its last real token.
    pub fn forward_cached(&self, cache: &mut KvCache, rows: &[&[u32]], padding: Padding) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let b = cache.batch;
        if rows.len() != b as usize {
            return Err(Error::input(format!("{} rows for a cache of {b} sequences", rows.len())));
        }
        self.check_ids(rows.iter().copied())?;
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0) as i64;
        if t == 0 {
            return Err(Error::input("every row is empty"));
        }
        if cache.len + t > cache.capacity {
            return Err(Error::input(format!(
                "{} cached + {t} new positions exceed the cache capacity {}",
                cache.len, cache.capacity
            )));
        }
        let max_position = rows.iter().zip(&cache.next_position).map(|(r, &p)| p + r.len() as i64).max();
        if max_position.unwrap_or(0) > self.config.max_position_embeddings as i64 {
            return Err(Error::input("sequence exceeds the context length of the model"));
        }

        // Lay out ids, positions and slot validity on the CPU, then upload once.
        let n = (b * t) as usize;
        let (mut ids, mut pos, mut valid) = (vec![0i64; n], vec![0i64; n], vec![false; n]);
        let mut last = Vec::with_capacity(b as usize);
        for (r, row) in rows.iter().enumerate() {
            let start = match padding {
                Padding::Left => t as usize - row.len(),
                Padding::Right => 0,
            };
            let base = r * t as usize + start;
            for (k, &id) in row.iter().enumerate() {
                ids[base + k] = i64::from(id);
                pos[base + k] = cache.next_position[r] + k as i64;
                valid[base + k] = true;
            }
            // Padding slots get the row's next position: in range, and never attended to.
            for s in 0..t as usize {
                if !valid[r * t as usize + s] {
                    pos[r * t as usize + s] = cache.next_position[r];
                }
            }
            last.push((!row.is_empty()).then(|| (start + row.len() - 1) as i64));
        }
        let padded_step = valid.iter().any(|v| !v);
        let start = cache.len;
        let device = self.device();
        let mask = if cache.padded || padded_step || (start > 0 && t > 1) {
            Some(cache.attention_mask(&valid, None, t, device))
        } else {
            None
        };
        let ids_t = Tensor::from_slice(&ids).view([b, t]).to_device(device);
        let pos_t = Tensor::from_slice(&pos).view([b, t]).to_device(device);
        let x = Tensor::embedding(&self.embed_tokens, &ids_t, -1, false, false);
        // Without a mask and with an empty cache, plain causal attention is exact and lets
        // libtorch pick its flash kernel; one new token with nothing padded needs no mask at all.
        let causal = mask.is_none() && start == 0 && t > 1;
        let _threads = (b * t <= SMALL_STEP_TOKENS && !device.is_cuda())
            .then(|| ThreadsGuard::limit(self.small_step_threads))
            .flatten();
        let hidden = self.run_layers(x, &pos_t, mask.as_ref(), causal, Some(cache), true);

        for (r, row) in rows.iter().enumerate() {
            for s in 0..t as usize {
                cache.valid[r][(start as usize) + s] = valid[r * t as usize + s];
            }
            cache.next_position[r] += row.len() as i64;
        }
        cache.len += t;
        cache.padded |= padded_step;
        // Each row's state after its last real token; rows without new tokens keep theirs.
        let index: Vec<i64> = last.iter().map(|l| l.unwrap_or(0)).collect();
        let index = Tensor::from_slice(&index).to_device(device);
        let gathered = hidden
            .gather(1, &index.view([b, 1, 1]).expand([b, 1, hidden.size()[2]], true), false)
            .squeeze_dim(1);
        let keep: Vec<bool> = last.iter().map(Option::is_none).collect();
        cache.last_hidden = Some(match (&cache.last_hidden, keep.iter().any(|&k| k)) {
            (Some(old), true) => {
                let keep = Tensor::from_slice(&keep).to_device(device).view([b, 1]);
                old.where_self(&keep, &gathered)
            }
            _ => gathered,
        });
        Ok(hidden)
    }

    /// Runs `t` new slots per row of `cache` (`ids`, `positions` and `valid`, row-major `[B, t]`)
    /// whose visibility among themselves is explicit rather than causal: slot `i` of row `r`
    /// attends to every real cached slot of its row, to itself, and to the real new slots `j`
    /// with `sees[(r * t + i) * t + j]`. Returns the final-norm hidden states `[B, t, hidden]`.
    ///
    /// This is how [`Llama::score`] runs a record and all its candidate continuations in one
    /// step: each candidate starts at the position after the record and sees the record and its
    /// own earlier tokens, never another candidate's. The new slots are not one sequence, so the
    /// cache cannot be continued afterwards: it is consumed.
    ///
    /// `trunk` says how the blocks below a layer run (see [`Trunk`]); with [`Trunk::Keep`] the
    /// residual stream entering that layer is returned too.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_tree(
        &self,
        mut cache: KvCache,
        t: usize,
        ids: &[i64],
        positions: &[i64],
        valid: &[bool],
        sees: &[bool],
        trunk: Trunk<'_>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let _guard = tch::no_grad_guard();
        let b = cache.batch as usize;
        let n = b * t;
        if t == 0 || ids.len() != n || positions.len() != n || valid.len() != n || sees.len() != n * t {
            return Err(Error::input(format!("a tree step of {t} slots for {b} rows is malformed")));
        }
        if cache.len + t as i64 > cache.capacity {
            return Err(Error::input(format!(
                "{} cached + {t} new positions exceed the cache capacity {}",
                cache.len, cache.capacity
            )));
        }
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id >= vocab) {
            return Err(Error::input(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let context = self.config.max_position_embeddings as i64;
        if positions.iter().any(|&p| p < 0 || p >= context) {
            return Err(Error::input("sequence exceeds the context length of the model"));
        }
        let device = self.device();
        let mask = cache.attention_mask(valid, Some(sees), t as i64, device);
        let ids = Tensor::from_slice(ids).view([b as i64, t as i64]).to_device(device);
        let positions = Tensor::from_slice(positions).view([b as i64, t as i64]).to_device(device);
        let layers = self.layers.len();
        let (x, from, kept) = match trunk {
            Trunk::Run => (Tensor::embedding(&self.embed_tokens, &ids, -1, false, false), 0, None),
            Trunk::Keep(at) => {
                if at > layers {
                    return Err(Error::input(format!("block {at} is beyond the model's {layers}")));
                }
                let x = Tensor::embedding(&self.embed_tokens, &ids, -1, false, false);
                let x = self.run_blocks(x, &positions, Some(&mask), false, Some(&mut cache), true, 0..at);
                (x.shallow_clone(), at, Some(x))
            }
            Trunk::From(at, x) => {
                let want = [b as i64, t as i64, self.config.hidden_size as i64];
                if at > layers || x.size() != want {
                    return Err(Error::input(format!(
                        "a kept stream {:?} entering block {at} does not fit a step of {want:?} in {layers} blocks",
                        x.size()
                    )));
                }
                (x.to_device(device), at, None)
            }
        };
        let x = self.run_blocks(x, &positions, Some(&mask), false, Some(&mut cache), true, from..layers);
        Ok((rms_norm(&x, &self.norm, self.config.rms_norm_eps), kept))
    }

    /// Output logits `[.., vocab]` for final-norm hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<Tensor>(&self.lm_head, None)
    }

    /// Token embeddings `[B, T, hidden]` of `input_ids` `[B, T]`: the residual stream entering
    /// block 0, for [`Llama::run_span`]. Differentiable when the embeddings are trainable.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        if input_ids.dim() != 2 || input_ids.numel() == 0 {
            return Err(Error::input(format!(
                "input_ids must be a non-empty [batch, len], got {:?}",
                input_ids.size()
            )));
        }
        let ids = input_ids.to_device(self.device()).to_kind(Kind::Int64);
        let (min, max) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if min < 0 || max >= self.config.vocab_size as i64 {
            return Err(Error::input(format!("token ids span {min}..={max}, outside the vocabulary")));
        }
        Ok(Tensor::embedding(&self.embed_tokens, &ids, -1, false, false))
    }

    /// Runs the residual streams of a shared `prefix` `[1, P, hidden]` (optional) and a batch of
    /// continuations `x` `[B, T, hidden]` through blocks `layers`, returning both streams after
    /// them (without the final norm). This is the training forward pass:
    ///
    /// - every row of `x` continues the same prefix, so the prefix runs once (batch 1) and its
    ///   keys and values are shared by all rows — for the task prompt the prefix is the system
    ///   message, about half of every sequence;
    /// - `layers` need not start at 0: with a frozen trunk, the stream entering block `k` is
    ///   computed once per record (under `no_grad`) and training runs only `k..`.
    ///
    /// Rows of `x` are right-padded (real tokens first); the result at a real position equals
    /// [`Llama::forward`] over `prefix ++ row` (then [`Llama::final_norm`] and [`Llama::logits`]).
    /// Positions after a row's end hold values that must not be read. Differentiable unless called
    /// under `no_grad`.
    pub fn run_span(
        &self,
        prefix: Option<&Tensor>,
        x: &Tensor,
        layers: Range<usize>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let h = self.config.hidden_size as i64;
        let size = x.size();
        let &[b, t, xh] = size.as_slice() else {
            return Err(Error::input(format!("x must be [batch, len, hidden], got {size:?}")));
        };
        if xh != h || b == 0 || t == 0 {
            return Err(Error::input(format!("x is {size:?}, expected [batch, len, {h}]")));
        }
        let p = match prefix {
            None => 0,
            Some(p) => match p.size().as_slice() {
                &[1, len, ph] if ph == h && len > 0 => len,
                other => return Err(Error::input(format!("prefix is {other:?}, expected [1, len, {h}]"))),
            },
        };
        if layers.start > layers.end || layers.end > self.layers.len() {
            return Err(Error::input(format!("blocks {layers:?} of a model with {}", self.layers.len())));
        }
        if (p + t) as usize > self.config.max_position_embeddings {
            return Err(Error::input(format!("{} positions exceed the context of the model", p + t)));
        }
        let device = self.device();
        let eps = self.config.rms_norm_eps;
        let (pcos, psin) = self.rotary(&Tensor::arange(p.max(1), (Kind::Int64, device)).view([1, -1]));
        let (cos, sin) = self.rotary(&Tensor::arange_start(p, p + t, (Kind::Int64, device)).view([1, -1]));
        // Query i of a row sees the whole prefix and its own row up to i: right padding keeps
        // every real query away from padded keys without a per-row mask.
        let mask =
            (p > 0).then(|| Tensor::ones([t, p + t], (Kind::Bool, device)).tril(p).view([1, 1, t, p + t]));
        let mut prefix = prefix.map(Tensor::shallow_clone);
        let mut x = x.to_device(device);
        let blocks = self.blocks();
        for layer in &self.layers[layers] {
            let shared = match prefix.as_mut() {
                Some(px) => {
                    let hp = rms_norm(px, &layer.input_layernorm, eps);
                    let (q, k, v) = blocks.qkv(layer, &hp, &pcos, &psin);
                    let attn = blocks.attend(&q, &k, &v, None, true);
                    let next = &*px + blocks.project(layer, O, &layer.o_proj, &attn);
                    *px = blocks.mlp(layer, next);
                    Some((k, v))
                }
                None => None,
            };
            let hx = rms_norm(&x, &layer.input_layernorm, eps);
            let (q, k, v) = blocks.qkv(layer, &hx, &cos, &sin);
            let attn = match shared {
                Some((pk, pv)) => {
                    let (k, v) = (after_prefix(&pk, k, b), after_prefix(&pv, v, b));
                    blocks.attend(&q, &k, &v, mask.as_ref(), false)
                }
                None => blocks.attend(&q, &k, &v, None, true),
            };
            let next = &x + blocks.project(layer, O, &layer.o_proj, &attn);
            x = blocks.mlp(layer, next);
        }
        Ok((prefix, x))
    }

    /// [`Llama::run_span`] when only some positions of `x` are read (training reads those that
    /// predict answer tokens): the blocks before the last of `layers` run every position, as
    /// their keys and values are needed, but the last computes its attention output and MLP only
    /// at `at` (`[B, K]` int64, positions in each row of `x`; repeat one to pad a row). For the
    /// task's prompts that skips most of a block's work. Returns `[B, K, hidden]`, equal to
    /// `run_span`'s output at those positions. Differentiable unless called under `no_grad`.
    pub fn run_span_at(
        &self,
        prefix: Option<&Tensor>,
        x: &Tensor,
        layers: Range<usize>,
        at: &Tensor,
    ) -> Result<Tensor> {
        if layers.is_empty() || layers.end > self.layers.len() {
            return Err(Error::input(format!(
                "run_span_at needs at least one block of the model's {}, got {layers:?}",
                self.layers.len()
            )));
        }
        let last = layers.end - 1;
        let (prefix, x) = self.run_span(prefix, x, layers.start..last)?;
        let (b, t, h) = (x.size()[0], x.size()[1], x.size()[2]);
        let device = self.device();
        let at = at.to_device(device).to_kind(Kind::Int64);
        if at.dim() != 2 || at.size()[0] != b || at.numel() == 0 {
            return Err(Error::input(format!("at is {:?}, expected [{b}, positions]", at.size())));
        }
        let (lo, hi) = (at.min().int64_value(&[]), at.max().int64_value(&[]));
        if lo < 0 || hi >= t {
            return Err(Error::input(format!("positions {lo}..={hi} outside rows of {t}")));
        }
        let k_at = at.size()[1];
        let p = prefix.as_ref().map_or(0, |p| p.size()[1]);
        let eps = self.config.rms_norm_eps;
        let layer = &self.layers[last];
        let blocks = self.blocks();
        let (cos, sin) = self.rotary(&Tensor::arange_start(p, p + t, (Kind::Int64, device)).view([1, -1]));
        let (q, mut k, mut v) = blocks.qkv(layer, &rms_norm(&x, &layer.input_layernorm, eps), &cos, &sin);
        if let Some(px) = &prefix {
            let (pcos, psin) = self.rotary(&Tensor::arange(p, (Kind::Int64, device)).view([1, -1]));
            let (_, pk, pv) = blocks.qkv(layer, &rms_norm(px, &layer.input_layernorm, eps), &pcos, &psin);
            (k, v) = (after_prefix(&pk, k, b), after_prefix(&pv, v, b));
        }
        let d = q.size()[3];
        let q = q.gather(2, &at.view([b, 1, k_at, 1]).expand([b, q.size()[1], k_at, d], false), false);
        // Query at position i of a row sees the whole prefix and the row up to i.
        let mask = Tensor::arange(p + t, (Kind::Int64, device))
            .view([1, 1, 1, -1])
            .le_tensor(&(&at + p).view([b, 1, k_at, 1]));
        let attn = blocks.attend(&q, &k, &v, Some(&mask), false);
        let xs = x.gather(1, &at.view([b, k_at, 1]).expand([b, k_at, h], false), false);
        let next = xs + blocks.project(layer, O, &layer.o_proj, &attn);
        Ok(blocks.mlp(layer, next))
    }

    /// The final RMSNorm, turning a residual stream after the last block into the hidden states
    /// [`Llama::logits`] reads.
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        rms_norm(x, &self.norm, self.config.rms_norm_eps)
    }

    /// Adds rank-`rank` LoRA adapters to the seven projections of every block ([`LORA_PROJECTIONS`]),
    /// registered as trainable parameters `<proj>.lora_A.weight` `[rank, in]` and
    /// `<proj>.lora_B.weight` `[out, rank]`, as PEFT initialises them: `A` uniform in
    /// `±1/sqrt(in)` (from libtorch's generator, so `tch::manual_seed` fixes it) and `B` zero,
    /// so the model's outputs do not change until training moves `B`. Refused if the model has
    /// adapters already. Inference without adapters is untouched (they cost one `Option` check).
    pub fn add_lora(&mut self, rank: usize, alpha: f64) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::input("the model has LoRA adapters already"));
        }
        if rank == 0 || !(alpha.is_finite() && alpha > 0.0) {
            return Err(Error::input(format!("LoRA rank {rank} and alpha {alpha} must be positive")));
        }
        let device = self.device();
        let r = rank as i64;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let weights = [
                &layer.q_proj,
                &layer.k_proj,
                &layer.v_proj,
                &layer.o_proj,
                &layer.gate_proj,
                &layer.up_proj,
                &layer.down_proj,
            ];
            let mut adapters = Vec::with_capacity(7);
            for (infix, w) in LORA_PROJECTIONS.iter().zip(weights) {
                let (out, inp) = (w.size()[0], w.size()[1]);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = Tensor::empty([r, inp], (Kind::Float, device)).uniform_(-bound, bound);
                let b = Tensor::zeros([out, r], (Kind::Float, device));
                let stem = format!("model.layers.{l}.{infix}");
                adapters.push(Adapter {
                    a: register(&self.vs, &format!("{stem}.lora_A.weight"), a),
                    b: register(&self.vs, &format!("{stem}.lora_B.weight"), b),
                });
            }
            layer.lora = Some(adapters);
        }
        self.lora = Some(LoraSpec { rank, alpha });
        debug!(rank, alpha, "added lora adapters");
        Ok(())
    }

    /// The adapters' rank and alpha, when the model has adapters.
    pub fn lora(&self) -> Option<LoraSpec> {
        self.lora
    }

    /// Allocates a cache for `batch` sequences of up to `capacity` positions in total.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(&self.config, self.device(), batch, capacity)
    }

    /// The decoder stack: layers, then the final norm. `positions` `[B, T]`, `mask` `[B, 1, T, S]`.
    ///
    /// With `split` (inference steps, no gradients), a CPU step of at least [`SPLIT_MIN_TOKENS`]
    /// tokens runs as independent workers, one per intra-op thread: rows divided between them
    /// ([`Blocks::run_rows`]), or a single causal sequence cut into chunks that pipeline through
    /// the layers ([`Blocks::run_chunks`]). Each worker runs one-threaded libtorch kernels, so no
    /// operation waits at a barrier for the other thread (on a 2-core machine the per-operation
    /// barriers of intra-op parallelism cost more than the elementwise work they split). The
    /// arithmetic per row and position is the same as the sequential loop's.
    fn run_layers(
        &self,
        x: Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        cache: Option<&mut KvCache>,
        split: bool,
    ) -> Tensor {
        let x = self.run_blocks(x, positions, mask, causal, cache, split, 0..self.layers.len());
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Blocks `range` over the residual stream `x` (no final norm); with `cache`, they write
    /// and read their own layers' keys and values at the cache's current length, which stays
    /// where it is (the caller advances it once every block has run).
    #[allow(clippy::too_many_arguments)]
    fn run_blocks(
        &self,
        x: Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
        cache: Option<&mut KvCache>,
        split: bool,
        range: Range<usize>,
    ) -> Tensor {
        let (cos, sin) = self.rotary(positions);
        let blocks = self.blocks();
        let start = cache.as_ref().map_or(0, |k| k.len);
        let kv = cache.map(|c| (&c.keys[range.clone()], &c.values[range.clone()]));
        let layers = &self.layers[range];
        let (b, t) = (x.size()[0], x.size()[1]);
        let threads = if split && !self.device().is_cuda() && b * t >= SPLIT_MIN_TOKENS {
            tch::get_num_threads().max(1) as usize
        } else {
            1
        };
        match kv {
            Some(kv) if threads > 1 && b > 1 => {
                blocks.run_rows(layers, x, (&cos, &sin), mask, causal, kv, start, threads)
            }
            Some(kv) if threads > 1 && causal && mask.is_none() && start == 0 && t >= 2 * MIN_CHUNK => {
                blocks.run_chunks(layers, x, (&cos, &sin), kv, threads)
            }
            _ => {
                let fold = blocks.fold(mask, causal);
                blocks.run(layers, x, (&cos, &sin), mask, causal, fold, kv, start, &|_| {})
            }
        }
    }

    /// The hyper-parameters and adapter scale the block arithmetic reads.
    fn blocks(&self) -> Blocks<'_> {
        Blocks { config: &self.config, lora: self.lora, cuda: self.device().is_cuda() }
    }
}

/// The arithmetic of the decoder blocks, apart from the parameters' owner: it borrows only plain
/// hyper-parameters (`Sync`), so prefill workers share it while each holds its own handles to the
/// layer weights (libtorch tensors are `Send` but not `Sync`).
#[derive(Clone, Copy)]
struct Blocks<'a> {
    config: &'a LlamaConfig,
    lora: Option<LoraSpec>,
    cuda: bool,
}

/// Steps of fewer tokens (batch × new) run sequentially on libtorch's intra-op threads.
const SPLIT_MIN_TOKENS: i64 = 64;
/// The fewest positions a pipelined chunk of one sequence gets.
const MIN_CHUNK: i64 = 32;
/// Attention cost of one cached key relative to the rest of a position's work (its projections
/// and MLP), for SmolLM2-135M on the CPU: about 1/1000 (attention is ~18% of a 512-token
/// prefill). Later chunks of a pipelined sequence attend to more keys, so they get fewer
/// positions.
const KEY_COST: f64 = 1.0 / 1000.0;

impl Blocks<'_> {
    /// Whether attention folds each group of query heads into the query axis (see
    /// [`Blocks::attend_folded`]): on the CPU, with shared KV heads and an explicit mask.
    fn fold(&self, mask: Option<&Tensor>, causal: bool) -> bool {
        self.gqa_group() > 1 && !self.cuda && !(causal && mask.is_none())
    }

    /// The blocks `layers` over `x` `[B, T, hidden]` (without the final norm). `rope` is the
    /// `(cos, sin)` of [`Llama::rotary`] for these positions. With `kv` (every layer's cache
    /// tensors), the new keys and values go to slots `start..start + T` and attention reads
    /// slots `0..start + T`; `ready(l)` runs after layer `l`'s are written, before attention.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        layers: &[Layer],
        mut x: Tensor,
        rope: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        fold: bool,
        kv: Option<(&[Tensor], &[Tensor])>,
        start: i64,
        ready: &dyn Fn(usize),
    ) -> Tensor {
        let eps = self.config.rms_norm_eps;
        // Shared KV heads on the CPU: fold each group of query heads into the query length (once
        // for every layer) instead of repeating keys and values per layer.
        let folded = mask.filter(|_| fold).map(|m| m.repeat([1, 1, self.gqa_group(), 1]));
        let mask = folded.as_ref().or(mask);
        for (l, layer) in layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_layernorm, eps);
            let (q, k, v) = self.qkv(layer, &h, rope.0, rope.1);
            let (k, v) = match kv {
                Some((keys, values)) => {
                    let t = k.size()[2];
                    let end = start + t;
                    keys[l].narrow(2, start, t).copy_(&k);
                    values[l].narrow(2, start, t).copy_(&v);
                    ready(l);
                    (keys[l].narrow(2, 0, end), values[l].narrow(2, 0, end))
                }
                None => (k, v),
            };
            let attn = if fold {
                self.attend_folded(&q, &k, &v, mask)
            } else {
                self.attend(&q, &k, &v, mask, causal)
            };
            // Out of place on purpose: rms_norm saved `x` for backward, so `+=` would break training.
            x = &x + self.project(layer, O, &layer.o_proj, &attn);
            x = self.mlp(layer, x);
        }
        x
    }

    /// [`Blocks::run`] with the rows of the batch divided among `threads` workers; each writes
    /// its rows of the cache.
    #[allow(clippy::too_many_arguments)]
    fn run_rows(
        &self,
        layers: &[Layer],
        x: Tensor,
        rope: (&Tensor, &Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        kv: (&[Tensor], &[Tensor]),
        start: i64,
        threads: usize,
    ) -> Tensor {
        let b = x.size()[0];
        let workers = (threads as i64).min(b);
        let fold = self.fold(mask, causal);
        let jobs: Vec<_> = (0..workers)
            .map(|w| {
                let (first, n) = (b * w / workers, b * (w + 1) / workers - b * w / workers);
                let rows = |t: &Tensor| t.narrow(0, first, n);
                let layers: Vec<Layer> = layers.iter().map(Layer::shallow).collect();
                let (x, cos, sin, mask) = (rows(&x), rows(rope.0), rows(rope.1), mask.map(rows));
                let keys: Vec<Tensor> = kv.0.iter().map(rows).collect();
                let values: Vec<Tensor> = kv.1.iter().map(rows).collect();
                let blocks = *self;
                move || {
                    let kv = Some((&keys[..], &values[..]));
                    blocks.run(&layers, x, (&cos, &sin), mask.as_ref(), causal, fold, kv, start, &|_| {})
                }
            })
            .collect();
        Tensor::cat(&on_workers(threads, jobs), 0)
    }

    /// A causal prefill of an empty cache, `x` `[B, T, hidden]`, cut along the sequence into one
    /// chunk per worker. Worker `c` runs its chunk through every layer; before attending in a
    /// layer it waits until worker `c - 1` has written that layer's keys and values (which that
    /// worker does after waiting for its own predecessor), so each chunk attends to every
    /// earlier position, as in one causal pass. Workers start together and a follower waits
    /// only for its predecessor's key/value projection of the same layer.
    fn run_chunks(
        &self,
        layers: &[Layer],
        x: Tensor,
        rope: (&Tensor, &Tensor),
        kv: (&[Tensor], &[Tensor]),
        threads: usize,
    ) -> Tensor {
        let t = x.size()[1];
        let chunks = (threads as i64).min(t / MIN_CHUNK);
        // Boundaries that give every chunk the same work: position i costs 1 + KEY_COST · i.
        let work = |s: f64| s + KEY_COST * s * s / 2.0;
        let total = work(t as f64);
        let mut bounds = vec![0i64];
        for c in 1..chunks {
            let goal = total * c as f64 / chunks as f64;
            // Solve s + KEY_COST s² / 2 = goal for s.
            let s = ((1.0 + 2.0 * KEY_COST * goal).sqrt() - 1.0) / KEY_COST;
            let low = bounds[bounds.len() - 1] + MIN_CHUNK;
            bounds.push((s.round() as i64).clamp(low, t - MIN_CHUNK * (chunks - c)));
        }
        bounds.push(t);
        let progress: Vec<Progress> = (0..chunks).map(|_| Progress::default()).collect();
        let device = x.device();
        let jobs: Vec<_> = (0..chunks as usize)
            .map(|c| {
                let (first, end) = (bounds[c], bounds[c + 1]);
                let span = |t: &Tensor| t.narrow(1, first, end - first);
                let layers: Vec<Layer> = layers.iter().map(Layer::shallow).collect();
                let (x, cos, sin) = (span(&x), span(rope.0), span(rope.1));
                let keys: Vec<Tensor> = kv.0.iter().map(Tensor::shallow_clone).collect();
                let values: Vec<Tensor> = kv.1.iter().map(Tensor::shallow_clone).collect();
                // Query i of the chunk (position first + i) sees keys 0..=first + i.
                let mask = (c > 0).then(|| {
                    Tensor::ones([end - first, end], (Kind::Bool, device)).tril(first).view([
                        1,
                        1,
                        end - first,
                        end,
                    ])
                });
                let (blocks, progress) = (*self, &progress);
                move || {
                    let _done = Finished(&progress[c]);
                    let ready = |l: usize| {
                        if c > 0 {
                            progress[c - 1].wait_for(l + 1);
                        }
                        progress[c].publish(l + 1);
                    };
                    let kv = Some((&keys[..], &values[..]));
                    let causal = mask.is_none();
                    blocks.run(&layers, x, (&cos, &sin), mask.as_ref(), causal, false, kv, first, &ready)
                }
            })
            .collect();
        Tensor::cat(&on_workers(threads, jobs), 1)
    }

    /// `h` through one projection, plus its adapter when the layer has adapters.
    fn project(&self, layer: &Layer, which: usize, weight: &Tensor, h: &Tensor) -> Tensor {
        let y = h.linear::<Tensor>(weight, None);
        match (&layer.lora, &self.lora) {
            (Some(adapters), Some(spec)) => {
                let a = &adapters[which];
                let scale = spec.alpha / spec.rank as f64;
                y + h.linear::<Tensor>(&a.a, None).linear::<Tensor>(&a.b, None) * scale
            }
            _ => y,
        }
    }

    /// Queries, keys and values of normed `h` `[B, T, hidden]`, each `[B, heads, T, head_dim]`,
    /// rotary applied to queries and keys.
    fn qkv(&self, layer: &Layer, h: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let c = self.config;
        let (b, t) = (h.size()[0], h.size()[1]);
        let (nh, nkv, hd) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        // q, k, v as [B, T, heads, head_dim]; rotary on q and k (adjacent heads when fused).
        let (q, k, v) = if layer.unfused() {
            let q = self.project(layer, Q, &layer.q_proj, h).view([b, t, nh, hd]);
            let k = self.project(layer, K, &layer.k_proj, h).view([b, t, nkv, hd]);
            let v = self.project(layer, V, &layer.v_proj, h).view([b, t, nkv, hd]);
            (apply_rotary(&q, cos, sin), apply_rotary(&k, cos, sin), v)
        } else {
            let qkv = h.linear::<Tensor>(&layer.qkv, None).view([b, t, nh + 2 * nkv, hd]);
            let qk = apply_rotary(&qkv.narrow(2, 0, nh + nkv), cos, sin);
            (qk.narrow(2, 0, nh), qk.narrow(2, nh, nkv), qkv.narrow(2, nh + nkv, nkv))
        };
        (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    }

    /// Attention of `q` `[B, heads, T, d]` over `k`, `v` `[B, kv_heads, S, d]`, as `[B, T, hidden]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        let c = self.config;
        let (b, t) = (q.size()[0], q.size()[2]);
        let (nh, nkv, hd) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        // Grouped-query attention in the kernel reads each KV head once instead of a repeated
        // copy. libtorch 2.13's CPU flash kernel does so (with or without a mask), but its
        // backward is not the one we validated training with: with gradients, repeat the KV
        // heads as HF's eager path does.
        let gqa_kernel = nkv != nh && (self.cuda || !(q.requires_grad() || k.requires_grad()));
        let (k, v) = if nkv != nh && !gqa_kernel {
            (repeat_kv(k, nh / nkv), repeat_kv(v, nh / nkv))
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let attn = Tensor::scaled_dot_product_attention(q, &k, &v, mask, 0.0, causal, None, gqa_kernel);
        attn.transpose(1, 2).reshape([b, t, nh * hd])
    }

    /// Query heads per KV head.
    fn gqa_group(&self) -> i64 {
        (self.config.num_attention_heads / self.config.num_key_value_heads.max(1)) as i64
    }

    /// Grouped-query attention without repeating keys and values: the `group` query heads that
    /// share a KV head become one head of `group × T` queries, `[B, kv_heads, group·T, d]`, over
    /// the unrepeated `k`, `v` `[B, kv_heads, S, d]`. `mask` is already folded the same way
    /// (`[B, 1, group·T, S]`, row `g·T + i` = query `i`). Returns `[B, T, hidden]`.
    ///
    /// Same arithmetic as [`Blocks::attend`] on repeated heads (each query still reduces over the
    /// same keys), but only the queries are rearranged, not the cached keys and values of every
    /// layer, which for a batch over a long cache is several times more memory traffic.
    fn attend_folded(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let c = self.config;
        let (b, t) = (q.size()[0], q.size()[2]);
        let (nh, nkv, hd) = (c.num_attention_heads as i64, c.num_key_value_heads as i64, c.head_dim as i64);
        let group = nh / nkv;
        let q = q.reshape([b, nkv, group * t, hd]);
        let attn = Tensor::scaled_dot_product_attention(&q, k, v, mask, 0.0, false, None, false);
        attn.reshape([b, nh, t, hd]).transpose(1, 2).reshape([b, t, nh * hd])
    }

    /// The MLP half of a block: `x + down(silu(gate(norm x)) · up(norm x))`.
    fn mlp(&self, layer: &Layer, x: Tensor) -> Tensor {
        let h = rms_norm(&x, &layer.post_attention_layernorm, self.config.rms_norm_eps);
        let inner = if layer.unfused() {
            self.project(layer, GATE, &layer.gate_proj, &h).silu()
                * self.project(layer, UP, &layer.up_proj, &h)
        } else {
            let gate_up = h.linear::<Tensor>(&layer.gate_up, None);
            let i = gate_up.size()[2] / 2;
            gate_up.narrow(2, 0, i).silu() * gate_up.narrow(2, i, i)
        };
        &x + self.project(layer, DOWN, &layer.down_proj, &inner)
    }
}

impl Llama {
    /// `cos` and `sin` of the rotary angles for `positions` `[B, T]`, each `[B, T, 1, head_dim]`
    /// (broadcast over the heads of `[B, T, heads, head_dim]` projections).
    fn rotary(&self, positions: &Tensor) -> (Tensor, Tensor) {
        // Same association as HF (position × inv_freq in f32), so the angles agree bit for bit.
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(2);
        (emb.cos(), emb.sin())
    }
}

/// Runs each job on its own scoped thread, with `threads / jobs` libtorch intra-op threads and
/// autograd off, and returns the results in job order. A panicking job panics the caller once
/// every job has ended. The caller's intra-op thread count is set again afterwards: libtorch
/// also keeps it as the process-wide default that new threads start from, which the workers
/// changed.
fn on_workers<T: Send>(threads: usize, jobs: Vec<impl FnOnce() -> T + Send>) -> Vec<T> {
    let caller = tch::get_num_threads();
    let per = i32::try_from(threads / jobs.len().max(1)).unwrap_or(1).max(1);
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                scope.spawn(move || {
                    tch::set_num_threads(per);
                    let _guard = tch::no_grad_guard();
                    job()
                })
            })
            .collect();
        let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        joined.into_iter().map(|r| r.unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    tch::set_num_threads(caller);
    results
}

/// How many layers of a pipelined chunk have their keys and values in the cache.
#[derive(Default)]
struct Progress {
    layers: Mutex<usize>,
    changed: Condvar,
}

impl Progress {
    fn publish(&self, layers: usize) {
        *self.layers.lock().unwrap_or_else(PoisonError::into_inner) = layers;
        self.changed.notify_all();
    }

    fn wait_for(&self, layers: usize) {
        let mut done = self.layers.lock().unwrap_or_else(PoisonError::into_inner);
        while *done < layers {
            done = self.changed.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Marks a pipeline worker finished (every layer published) when it ends, by returning or by
/// panicking, so its follower never waits forever.
struct Finished<'a>(&'a Progress);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.publish(usize::MAX);
    }
}

/// Lowers libtorch's intra-op thread count for a scope and restores it on drop.
struct ThreadsGuard {
    previous: i32,
}

impl ThreadsGuard {
    /// `None` when `threads` is 0 or not below the current count (nothing to change).
    fn limit(threads: usize) -> Option<Self> {
        let previous = tch::get_num_threads();
        let threads = i32::try_from(threads).ok().filter(|&n| n > 0 && n < previous)?;
        tch::set_num_threads(threads);
        Some(ThreadsGuard { previous })
    }
}

impl Drop for ThreadsGuard {
    fn drop(&mut self) {
        tch::set_num_threads(self.previous);
    }
}

/// HF's `LlamaRMSNorm`: `weight * x / sqrt(mean(x²) + eps)`, computed in f32.
/// The shared prefix's keys or values (`[1, heads, P, d]`) in front of each of `b` rows'
/// (`[b, heads, T, d]`), without copying the prefix per row before the concatenation.
fn after_prefix(prefix: &Tensor, rows: Tensor, b: i64) -> Tensor {
    let mut size = prefix.size();
    size[0] = b;
    Tensor::cat(&[prefix.expand(size, false), rows], 2)
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let dim = weight.size()[0];
    Tensor::rms_norm(x, [dim], Some(weight), Some(eps))
}

/// HF's `repeat_kv`: `[B, kv_heads, S, D]` → `[B, kv_heads * n_rep, S, D]`, query head `i` reading
/// KV head `i / n_rep`.
fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    let size = x.size();
    let (b, kv, s, d) = (size[0], size[1], size[2], size[3]);
    x.unsqueeze(2).expand([b, kv, n_rep, s, d], false).reshape([b, kv * n_rep, s, d])
}

/// HF's `apply_rotary_pos_emb`: `x * cos + rotate_half(x) * sin`, `rotate_half(x) = [-x₂, x₁]`.
/// `x` is `[B, T, heads, head_dim]`.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
    x * cos + rotated * sin
}

/// How [`Llama::forward_tree`] runs the blocks below a layer.
#[derive(Clone, Copy)]
pub(crate) enum Trunk<'a> {
    /// Every block, from the embeddings.
    Run,
    /// Every block, keeping the residual stream entering this block.
    Keep(usize),
    /// Only the blocks from this one on, from a stream kept at it (by a model whose blocks
    /// below are the same).
    From(usize, &'a Tensor),
}

/// Keys and values of every layer for a batch of sequences, preallocated to a capacity so a
/// decode step writes in place instead of re-allocating.
///
/// Invariant: slots `0..len` are written for every row; `valid[r][s]` says whether slot `s` of
/// row `r` holds a real token (padding does not); `next_position[r]` is the number of real
/// tokens row `r` has seen, i.e. the position its next token takes.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    batch: i64,
    len: i64,
    capacity: i64,
    valid: Vec<Vec<bool>>,
    next_position: Vec<i64>,
    /// Whether any slot so far is padding (then every step needs an explicit mask).
    padded: bool,
    /// Each row's final-norm hidden state after its last real token, `[B, hidden]`.
    last_hidden: Option<Tensor>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("batch", &self.batch)
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("padded", &self.padded)
            .finish()
    }
}

impl KvCache {
    fn new(config: &LlamaConfig, device: Device, batch: usize, capacity: usize) -> Result<Self> {
        if batch == 0 || capacity == 0 {
            return Err(Error::input("a cache needs at least one sequence and one position"));
        }
        let limit = config.max_position_embeddings.saturating_mul(4);
        if capacity > limit || batch > 1 << 16 {
            return Err(Error::input(format!("cache of {batch} x {capacity} positions is too large")));
        }
        let shape =
            [batch as i64, config.num_key_value_heads as i64, capacity as i64, config.head_dim as i64];
        let alloc = || Tensor::zeros(shape, (Kind::Float, device));
        Ok(KvCache {
            keys: (0..config.num_hidden_layers).map(|_| alloc()).collect(),
            values: (0..config.num_hidden_layers).map(|_| alloc()).collect(),
            batch: batch as i64,
            len: 0,
            capacity: capacity as i64,
            valid: vec![vec![false; capacity]; batch],
            next_position: vec![0; batch],
            padded: false,
            last_hidden: None,
        })
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch as usize
    }

    /// Number of slots written (real or padding), the same for every row.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total slots available.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Number of real tokens seen by each row.
    pub fn positions(&self) -> &[i64] {
        &self.next_position
    }

    /// Each row's final-norm hidden state after its last real token, `[B, hidden]`; `None`
    /// until a row has seen a token.
    pub fn last_hidden(&self) -> Option<&Tensor> {
        self.last_hidden.as_ref()
    }

    /// A new cache whose row `i` is a copy of row `rows[i]` of this one (rows may repeat), with
    /// room for `extra` more positions. This is how a prompt's cache is shared: prefill once,
    /// then fan out to one row per candidate continuation.
    pub fn select_rows(&self, rows: &[usize], extra: usize) -> Result<KvCache> {
        if rows.is_empty() {
            return Err(Error::input("no rows selected"));
        }
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch as usize) {
            return Err(Error::input(format!("row {bad} of a cache of {} rows", self.batch)));
        }
        let _guard = tch::no_grad_guard();
        let device = self.keys.first().map_or(Device::Cpu, Tensor::device);
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::from_slice(&index).to_device(device);
        let capacity = self.len + extra as i64;
        let copy = |src: &Tensor| {
            let mut shape = src.size();
            shape[0] = rows.len() as i64;
            shape[2] = capacity;
            let dst = Tensor::empty(shape, (src.kind(), device));
            if self.len > 0 {
                // One row (a shared prefix) broadcasts: one copy instead of a gather and a copy.
                let src = src.narrow(2, 0, self.len);
                let src = if self.batch == 1 { src } else { src.index_select(0, &index) };
                dst.narrow(2, 0, self.len).copy_(&src);
            }
            dst
        };
        let valid = rows
            .iter()
            .map(|&r| {
                let mut v = vec![false; capacity as usize];
                v[..self.len as usize].copy_from_slice(&self.valid[r][..self.len as usize]);
                v
            })
            .collect();
        Ok(KvCache {
            keys: self.keys.iter().map(copy).collect(),
            values: self.values.iter().map(copy).collect(),
            batch: rows.len() as i64,
            len: self.len,
            capacity,
            valid,
            next_position: rows.iter().map(|&r| self.next_position[r]).collect(),
            padded: self.padded,
            last_hidden: self.last_hidden.as_ref().map(|h| h.index_select(0, &index)),
        })
    }

    /// The `[B, 1, T, len + T]` boolean mask for `t` new slots whose validity is `new_valid`
    /// (row-major `[B, T]`): real keys only, and every slot may see itself. Among the new slots
    /// it is causal, or `sees` (`[B, T, T]`: new slot `i` sees new slot `j`) when given.
    fn attention_mask(&self, new_valid: &[bool], sees: Option<&[bool]>, t: i64, device: Device) -> Tensor {
        let (b, start) = (self.batch as usize, self.len as usize);
        let (t, s) = (t as usize, start + t as usize);
        let mut mask = vec![false; b * t * s];
        for r in 0..b {
            let key_valid =
                |j: usize| if j < start { self.valid[r][j] } else { new_valid[r * t + (j - start)] };
            for i in 0..t {
                let row = &mut mask[(r * t + i) * s..(r * t + i + 1) * s];
                let visible = |j: usize| match sees {
                    Some(sees) if j >= start => sees[(r * t + i) * t + (j - start)],
                    _ => j <= start + i,
                };
                for (j, m) in row.iter_mut().enumerate() {
                    *m = j == start + i || (visible(j) && key_valid(j));
                }
            }
        }
        Tensor::from_slice(&mask).view([b as i64, 1, t as i64, s as i64]).to_device(device)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny random model: small enough to build in milliseconds.
    pub(crate) fn tiny(seed: i64) -> Llama {
        tiny_with_context(seed, 64)
    }

    /// [`tiny`] with a context of `context` positions.
    fn tiny_with_context(seed: i64, context: usize) -> Llama {
        let config = LlamaConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            max_position_embeddings: context,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: Some(1),
            pad_token_id: None,
        };
        tch::manual_seed(seed);
        Llama::from_fetch(config, Device::Cpu, |name, shape| {
            let t = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.5;
            Ok(if name.ends_with("norm.weight") { t + 1.0 } else { t })
        })
        .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn padded_rows_compute_what_they_compute_alone() {
        let model = tiny(1);
        let rows: [&[u32]; 3] = [&[3, 4, 5, 6, 7], &[8, 9], &[10, 11, 12]];
        for padding in [Padding::Left, Padding::Right] {
            let mut batch = model.new_cache(3, 8).unwrap();
            let _ = model.forward_cached(&mut batch, &rows, padding).unwrap();
            let batched = batch.last_hidden().unwrap().shallow_clone();
            for (r, row) in rows.iter().enumerate() {
                let mut single = model.new_cache(1, 8).unwrap();
                let _ = model.forward_cached(&mut single, &[row], padding).unwrap();
                let alone = single.last_hidden().unwrap().get(0);
                assert!(max_diff(&batched.get(r as i64), &alone) < 1e-5, "{padding:?} row {r}");
            }
        }
    }

    #[test]
    fn cached_decoding_equals_full_forward() {
        let model = tiny(2);
        let ids: Vec<u32> = vec![5, 17, 23, 2, 44, 9, 31];
        let full = tch::no_grad(|| {
            let t = Tensor::from_slice(&ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>()).view([1, -1]);
            model.forward(&t, None).unwrap()
        });
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let _ = model.forward_cached(&mut cache, &[&ids[..3]], Padding::Left).unwrap();
        for (k, id) in ids.iter().enumerate().skip(3) {
            let _ = model.forward_cached(&mut cache, &[&[*id]], Padding::Left).unwrap();
            let step = model.logits(cache.last_hidden().unwrap()).get(0);
            assert!(max_diff(&step, &full.get(0).get(k as i64)) < 1e-4, "position {k}");
        }
        // Two new tokens at once after a cached prefix (offset causal mask).
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let _ = model.forward_cached(&mut cache, &[&ids[..4]], Padding::Left).unwrap();
        let h = model.forward_cached(&mut cache, &[&ids[4..6]], Padding::Left).unwrap();
        assert!(max_diff(&model.logits(&h).get(0), &full.get(0).narrow(0, 4, 2)) < 1e-4);
    }

    #[test]
    fn split_prefill_equals_the_sequential_forward() {
        // Steps of >= SPLIT_MIN_TOKENS tokens run as workers; three threads make three row
        // groups, or three pipelined chunks where each waits for the one before.
        tch::set_num_threads(3);
        let model = tiny_with_context(10, 128);
        let rows: Vec<Vec<u32>> =
            (0..3).map(|r| (0..40).map(|i| ((7 * i + 11 * r) % 50) as u32).collect()).collect();
        let full = |row: &[u32]| {
            let ids: Vec<i64> = row.iter().map(|&i| i64::from(i)).collect();
            tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).view([1, -1]), None).unwrap())
        };
        // Rows split between workers, equal lengths (causal) and padded (explicit mask).
        let slices: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let padded: Vec<&[u32]> = vec![&rows[0][..40], &rows[1][..25], &rows[2][..33]];
        for batch in [slices, padded] {
            let mut cache = model.new_cache(3, 41).unwrap();
            let h = model.forward_cached(&mut cache, &batch, Padding::Left).unwrap();
            for (r, row) in batch.iter().enumerate() {
                let got = model.logits(&h.get(r as i64).narrow(0, 40 - row.len() as i64, row.len() as i64));
                assert!(max_diff(&got, &full(row).get(0)) < 1e-4, "row {r} of {}", row.len());
            }
            // The cache the workers wrote continues like a sequential one.
            let _ = model.forward_cached(&mut cache, &[&[5], &[6], &[7]], Padding::Left).unwrap();
            for (r, (row, next)) in batch.iter().zip([5, 6, 7]).enumerate() {
                let mut ids = row.to_vec();
                ids.push(next);
                let step = model.logits(&cache.last_hidden().unwrap().get(r as i64));
                assert!(max_diff(&step, &full(&ids).get(0).get(row.len() as i64)) < 1e-4, "step {r}");
            }
        }
        // One long sequence pipelined in chunks.
        let long: Vec<u32> = (0..120).map(|i| ((13 * i + 3) % 50) as u32).collect();
        let mut cache = model.new_cache(1, 121).unwrap();
        let h = model.forward_cached(&mut cache, &[&long], Padding::Left).unwrap();
        assert!(max_diff(&model.logits(&h), &full(&long)) < 1e-4);
        let _ = model.forward_cached(&mut cache, &[&[9]], Padding::Left).unwrap();
        let mut ids = long.clone();
        ids.push(9);
        let step = model.logits(&cache.last_hidden().unwrap().get(0));
        assert!(max_diff(&step, &full(&ids).get(0).get(120)) < 1e-4);
        assert_eq!(tch::get_num_threads(), 3, "the workers restore the caller's thread count");
    }

    #[test]
    fn masked_forward_matches_unpadded_rows() {
        let model = tiny(3);
        let ids = Tensor::from_slice(&[0i64, 0, 7, 8, 9, 10, 11, 12, 13, 14]).view([2, 5]);
        let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 5]);
        let batched = tch::no_grad(|| model.forward(&ids, Some(&mask)).unwrap());
        let alone = tch::no_grad(|| model.forward(&ids.get(0).narrow(0, 2, 3).view([1, 3]), None).unwrap());
        assert!(max_diff(&batched.get(0).narrow(0, 2, 3), &alone.get(0)) < 1e-5);
        let all = tch::no_grad(|| model.forward(&ids.get(1).view([1, 5]), None).unwrap());
        assert!(max_diff(&batched.get(1), &all.get(0)) < 1e-5);
    }

    #[test]
    fn select_rows_fans_out_a_prefix() {
        let model = tiny(4);
        let mut cache = model.new_cache(2, 4).unwrap();
        let _ = model.forward_cached(&mut cache, &[&[3, 4], &[5]], Padding::Left).unwrap();
        let mut fan = cache.select_rows(&[1, 0, 1], 2).unwrap();
        assert_eq!(fan.positions(), &[1, 2, 1]);
        let _ = model.forward_cached(&mut fan, &[&[9], &[9], &[9]], Padding::Left).unwrap();
        let h = fan.last_hidden().unwrap();
        assert!(max_diff(&h.get(0), &h.get(2)) < 1e-6);
        let mut alone = model.new_cache(1, 3).unwrap();
        let _ = model.forward_cached(&mut alone, &[&[5, 9]], Padding::Left).unwrap();
        assert!(max_diff(&h.get(0), &alone.last_hidden().unwrap().get(0)) < 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let model = tiny(5);
        let mut cache = model.new_cache(1, 4).unwrap();
        assert!(model.forward_cached(&mut cache, &[&[50]], Padding::Left).is_err());
        assert!(model.forward_cached(&mut cache, &[&[]], Padding::Left).is_err());
        assert!(model.forward_cached(&mut cache, &[&[1], &[2]], Padding::Left).is_err());
        assert!(model.forward_cached(&mut cache, &[&[1, 2, 3, 4, 5]], Padding::Left).is_err());
        assert!(model.new_cache(0, 4).is_err());
        assert!(cache.select_rows(&[1], 0).is_err());
        let ids = Tensor::from_slice(&[1i64, 99]).view([1, 2]);
        assert!(model.forward(&ids, None).is_err());
        let ids = Tensor::from_slice(&[1i64, 2]);
        assert!(model.forward(&ids, None).is_err());
    }

    #[test]
    fn training_path_matches_fused_inference_and_reaches_every_parameter() {
        let model = tiny(7);
        let ids = Tensor::from_slice(&[4i64, 8, 15, 16, 23, 42]).view([1, 6]);
        let frozen = tch::no_grad(|| model.forward(&ids, None).unwrap());
        assert_eq!(model.set_trainable(|_| true), 2 * 9 + 2);
        let trained = model.forward(&ids, None).unwrap();
        assert!(max_diff(&frozen, &trained.detach()) < 1e-4);
        trained.square().sum(Kind::Float).backward();
        for (name, t) in model.named_tensors() {
            let grad = t.grad();
            assert!(
                grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name} has no gradient"
            );
        }
        // An in-place update of a parameter view (what an optimizer does) reaches the fused path.
        let (_, mut q) = model
            .named_tensors()
            .into_iter()
            .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        tch::no_grad(|| q.copy_(&q.zeros_like()));
        model.set_trainable(|_| false);
        let fused = tch::no_grad(|| model.forward(&ids, None).unwrap());
        assert!(max_diff(&fused, &frozen) > 1e-4);
        model.set_trainable(|_| true);
        let separate = tch::no_grad(|| model.forward(&ids, None).unwrap());
        // Fused and separate GEMMs may round differently; logits here are O(10).
        assert!(max_diff(&fused, &separate) < 1e-4);
    }

    #[test]
    fn run_span_with_a_shared_prefix_equals_the_full_forward() {
        let model = tiny(8);
        let prefix: [i64; 3] = [3, 4, 5];
        let rows: [&[i64]; 2] = [&[6, 7, 8, 9], &[10, 11]];
        let ids = Tensor::from_slice(&[6i64, 7, 8, 9, 10, 11, 0, 0]).view([2, 4]);
        let x = model.embed(&ids).unwrap();
        let p = model.embed(&Tensor::from_slice(&prefix).view([1, 3])).unwrap();
        let (_, whole) = tch::no_grad(|| model.run_span(Some(&p), &x, 0..2)).unwrap();
        // Two spans, as the trainer's activation cache splits them, give the same stream.
        let (mid_p, mid_x) = tch::no_grad(|| model.run_span(Some(&p), &x, 0..1)).unwrap();
        let (_, split) = tch::no_grad(|| model.run_span(mid_p.as_ref(), &mid_x, 1..2)).unwrap();
        assert!(max_diff(&whole, &split) < 1e-6);
        let logits = model.logits(&model.final_norm(&whole));
        for (r, row) in rows.iter().enumerate() {
            let full: Vec<i64> = prefix.iter().chain(row.iter()).copied().collect();
            let reference =
                tch::no_grad(|| model.forward(&Tensor::from_slice(&full).view([1, -1]), None).unwrap());
            let n = row.len() as i64;
            let got = logits.get(r as i64).narrow(0, 0, n);
            assert!(max_diff(&got, &reference.get(0).narrow(0, 3, n)) < 1e-4, "row {r}");
        }
        // Without a prefix it is the plain causal forward.
        let (_, alone) = tch::no_grad(|| model.run_span(None, &x.narrow(0, 0, 1), 0..2)).unwrap();
        let reference = tch::no_grad(|| model.forward(&ids.narrow(0, 0, 1), None).unwrap());
        assert!(max_diff(&model.logits(&model.final_norm(&alone)), &reference) < 1e-4);
        assert!(model.run_span(None, &x, 0..3).is_err());
        assert!(model.run_span(Some(&x), &x, 0..2).is_err());
    }

    #[test]
    fn lora_adapters_start_neutral_and_equal_their_merged_weights() {
        let mut model = tiny(9);
        let ids = Tensor::from_slice(&[4i64, 8, 15, 16, 23, 42]).view([1, 6]);
        let before = tch::no_grad(|| model.forward(&ids, None).unwrap());
        model.add_lora(2, 4.0).unwrap();
        assert!(model.add_lora(2, 4.0).is_err());
        assert_eq!(model.lora(), Some(LoraSpec { rank: 2, alpha: 4.0 }));
        let adapters: Vec<(String, Tensor)> =
            model.named_tensors().into_iter().filter(|(n, _)| n.contains(".lora_")).collect();
        assert_eq!(adapters.len(), 2 * 7 * 2);
        // Adapters switch to the separate projections, which may round differently from the fused.
        assert!(max_diff(&before, &tch::no_grad(|| model.forward(&ids, None).unwrap())) < 1e-4);
        for (name, t) in &adapters {
            if name.ends_with("lora_B.weight") {
                tch::no_grad(|| {
                    t.shallow_clone().copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.3))
                });
            }
        }
        let adapted = tch::no_grad(|| model.forward(&ids, None).unwrap());
        assert!(max_diff(&before, &adapted) > 1e-3);
        let all: std::collections::HashMap<String, Tensor> = model.named_tensors().into_iter().collect();
        let merged = Llama::from_fetch(model.config().clone(), Device::Cpu, |name, _| {
            let w = all[name].detach().copy();
            let stem = name.trim_end_matches(".weight");
            Ok(match (all.get(&format!("{stem}.lora_A.weight")), all.get(&format!("{stem}.lora_B.weight"))) {
                (Some(a), Some(b)) => w + b.matmul(a) * 2.0,
                _ => w,
            })
        })
        .unwrap();
        assert!(max_diff(&adapted, &tch::no_grad(|| merged.forward(&ids, None).unwrap())) < 1e-4);
    }

    #[test]
    fn set_trainable_selects_by_name() {
        let model = tiny(6);
        let n = model.set_trainable(|name| name.starts_with("model.layers.1."));
        assert_eq!(n, 9);
        let trainable: Vec<String> =
            model.named_tensors().into_iter().filter(|(_, t)| t.requires_grad()).map(|(n, _)| n).collect();
        assert!(trainable.iter().all(|n| n.starts_with("model.layers.1.")));
        assert_eq!(trainable.len(), 9);
    }
}
