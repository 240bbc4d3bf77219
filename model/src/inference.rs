//! Scoring and generation: what the edge agent and the operator command run on a [`Llama`].
//!
//! - [`Llama::score`] gives, for every prompt, the log-probability of every candidate
//!   continuation. All prompts and all their candidates run in one padded forward step: each
//!   row holds its prompt then every candidate's tokens, each candidate at the positions after
//!   the prompt and masked from the others, so no KV cache is copied per candidate. A
//!   [`Prefix`] (the fixed instructions every prompt starts with) is computed once per model
//!   and shared by every call.
//! - [`Llama::generate`] decodes greedily (temperature 0) or samples with temperature and top-p
//!   from a seeded generator, so a seed reproduces its output; it stops at EOS, at any of the
//!   caller's stop ids (e.g. `<|im_end|>`), or after `max_tokens`.
//!
//! All entry points run under `no_grad`; token ids are checked against the vocabulary, and
//! malformed requests are errors.

use tch::{Kind, Tensor};
use tracing::debug;

use crate::error::{Error, Result};
use crate::llama::{KvCache, Llama, Padding, Trunk};

/// The KV cache of a token sequence that many prompts start with, computed once.
#[derive(Debug)]
pub struct Prefix {
    ids: Vec<u32>,
    cache: KvCache,
}

impl Prefix {
    /// The prefix's token ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// The residual stream of one [`Llama::score_keeping`] request entering a block, for
/// [`Llama::score_from`]: `[prompts, step width, hidden]` f32 (about 2.3 KiB per position for
/// SmolLM2-135M).
#[derive(Debug)]
pub struct KeptTrunk {
    layer: usize,
    /// None when the request needed no step (empty prompts after a prefix, one-token candidates).
    hidden: Option<Tensor>,
    request: u64,
}

impl KeptTrunk {
    /// The block the kept stream enters.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Bytes the kept stream holds.
    pub fn bytes(&self) -> usize {
        self.hidden.as_ref().map_or(0, |h| h.numel() * h.kind().elt_size_in_bytes())
    }
}

/// What identifies a scoring request (the prefix's, prompts' and candidates' ids).
fn request_key(prefix: Option<&Prefix>, prompts: &[Vec<u32>], candidates: &[Vec<u32>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (prefix.map(Prefix::ids), prompts, candidates).hash(&mut h);
    h.finish()
}

/// How [`Llama::generate`] picks and stops.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (the stop token not counted).
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: sample among the most likely tokens whose mass reaches `top_p`
    /// (1.0 keeps the whole vocabulary). Ignored when greedy.
    pub top_p: f32,
    /// Seed of the sampling generator; the same seed gives the same tokens.
    pub seed: u64,
    /// Token ids that end generation besides the model's EOS (e.g. `<|im_end|>`).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: 64, temperature: 0.0, top_p: 1.0, seed: 0, stop_ids: Vec::new() }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced this stop id (EOS or one of `stop_ids`); it is not in the output.
    Stop(u32),
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context length of the model was reached.
    ContextFull,
}

/// The result of [`Llama::generate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Generated token ids, without the prompt and without the stop token.
    pub ids: Vec<u32>,
    /// Why generation ended.
    pub stop: StopReason,
}

impl Llama {
    /// Computes the KV cache of `ids`, to be passed to [`Llama::score`] for prompts that all
    /// start with these tokens.
    pub fn prefix(&self, ids: &[u32]) -> Result<Prefix> {
        if ids.is_empty() {
            return Err(Error::input("an empty prefix"));
        }
        let mut cache = self.new_cache(1, ids.len())?;
        let _ = self.forward_cached(&mut cache, &[ids], Padding::Left)?;
        debug!(tokens = ids.len(), "computed shared prefix");
        Ok(Prefix { ids: ids.to_vec(), cache })
    }

    /// Next-token logits `[B, vocab]` after each prompt (a padded batch of any lengths).
    pub fn next_token_logits(&self, prompts: &[Vec<u32>]) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(Error::input("every prompt needs at least one token"));
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = self.new_cache(prompts.len(), longest)?;
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let _ = self.forward_cached(&mut cache, &rows, Padding::Left)?;
        let hidden = cache.last_hidden().ok_or_else(|| Error::input("no tokens were processed"))?;
        Ok(self.logits(hidden))
    }

    /// Log-probability of each candidate continuation after each prompt: `result[p][c]` is
    /// `log P(candidates[c] | prefix ++ prompts[p])`, summed over the candidate's tokens.
    ///
    /// With `prefix`, each prompt is the part after the prefix (and may be empty). Prompts and
    /// candidates run in one batched step (see the module docs).
    pub fn score(
        &self,
        prefix: Option<&Prefix>,
        prompts: &[Vec<u32>],
        candidates: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        Ok(self.score_tree(prefix, prompts, candidates, Trunk::Run)?.0)
    }

    /// [`Llama::score`], also keeping the residual stream entering block `layer` at every
    /// position of the step, so that a model whose blocks below `layer` are the same (e.g. after
    /// training only the blocks from `layer` on) scores the same request with
    /// [`Llama::score_from`] for the cost of its top blocks.
    pub fn score_keeping(
        &self,
        prefix: Option<&Prefix>,
        prompts: &[Vec<u32>],
        candidates: &[Vec<u32>],
        layer: usize,
    ) -> Result<(Vec<Vec<f32>>, KeptTrunk)> {
        let (scores, hidden) = self.score_tree(prefix, prompts, candidates, Trunk::Keep(layer))?;
        Ok((scores, KeptTrunk { layer, hidden, request: request_key(prefix, prompts, candidates) }))
    }

    /// [`Llama::score`] of the request `kept` was computed for, running only blocks
    /// `kept.layer()..` of this model on the kept stream. `prefix` must be this model's (its
    /// keys and values of those blocks differ from the keeping model's). The result equals
    /// [`Llama::score`] when this model's embeddings and blocks below the layer are the ones
    /// that kept the stream; that is the caller's to ensure. A different request is refused.
    pub fn score_from(
        &self,
        prefix: Option<&Prefix>,
        prompts: &[Vec<u32>],
        candidates: &[Vec<u32>],
        kept: &KeptTrunk,
    ) -> Result<Vec<Vec<f32>>> {
        if kept.request != request_key(prefix, prompts, candidates) {
            return Err(Error::input("the kept stream was computed for other prompts, candidates or prefix"));
        }
        let trunk = match &kept.hidden {
            Some(h) => Trunk::From(kept.layer, h),
            None => Trunk::Run,
        };
        Ok(self.score_tree(prefix, prompts, candidates, trunk)?.0)
    }

    fn score_tree(
        &self,
        prefix: Option<&Prefix>,
        prompts: &[Vec<u32>],
        candidates: &[Vec<u32>],
        trunk: Trunk<'_>,
    ) -> Result<(Vec<Vec<f32>>, Option<Tensor>)> {
        let _guard = tch::no_grad_guard();
        if prompts.is_empty() {
            return Err(Error::input("no prompts to score"));
        }
        if candidates.is_empty() || candidates.iter().any(Vec::is_empty) {
            return Err(Error::input("every candidate needs at least one token"));
        }
        if prefix.is_none() && prompts.iter().any(Vec::is_empty) {
            return Err(Error::input("an empty prompt without a prefix has nothing to condition on"));
        }
        self.check_ids(prompts.iter().chain(candidates).map(Vec::as_slice))?;
        let (b, c) = (prompts.len(), candidates.len());
        let longest_prompt = prompts.iter().map(Vec::len).max().unwrap_or(0);
        // The tokens a candidate feeds: all but its last, which is only ever predicted.
        let fed: Vec<&[u32]> = candidates.iter().map(|cand| &cand[..cand.len() - 1]).collect();
        let offsets: Vec<usize> = fed
            .iter()
            .scan(longest_prompt, |at, f| {
                let start = *at;
                *at += f.len();
                Some(start)
            })
            .collect();
        let width = longest_prompt + fed.iter().map(|f| f.len()).sum::<usize>();

        // One step per batch: each row is its prompt (left-padded, so every prompt ends at slot
        // `longest_prompt - 1`) followed by every candidate's fed tokens. Each candidate starts
        // at the position after its prompt and sees the prefix, the prompt and its own earlier
        // tokens only, so no cache is copied per candidate.
        let cache = match prefix {
            Some(p) => p.cache.select_rows(&vec![0; b], width)?,
            None => self.new_cache(b, width)?,
        };
        let base: Vec<i64> = cache.positions().to_vec();
        let prefix_hidden = cache.last_hidden().map(Tensor::shallow_clone);
        let mut kept = None;
        let hidden = if width > 0 {
            let n = b * width;
            let (mut ids, mut pos, mut valid) = (vec![0i64; n], vec![0i64; n], vec![false; n]);
            let mut sees = vec![false; n * width];
            for (r, prompt) in prompts.iter().enumerate() {
                let row = r * width;
                let first = longest_prompt - prompt.len();
                pos[row..row + width].fill(base[r]);
                for (k, &id) in prompt.iter().enumerate() {
                    let slot = row + first + k;
                    (ids[slot], pos[slot], valid[slot]) = (i64::from(id), base[r] + k as i64, true);
                    sees[slot * width + first..=slot * width + first + k].fill(true);
                }
                let end = base[r] + prompt.len() as i64;
                for (f, &at) in fed.iter().zip(&offsets) {
                    for (k, &id) in f.iter().enumerate() {
                        let slot = row + at + k;
                        (ids[slot], pos[slot], valid[slot]) = (i64::from(id), end + k as i64, true);
                        let sees = &mut sees[slot * width..(slot + 1) * width];
                        sees[first..longest_prompt].fill(true);
                        sees[at..=at + k].fill(true);
                    }
                }
            }
            let (hidden, trunk) = self.forward_tree(cache, width, &ids, &pos, &valid, &sees, trunk)?;
            kept = trunk;
            Some(hidden) // [B, W, H]
        } else {
            None
        };

        // The states that predict each candidate token: a prompt's last one predicts every
        // candidate's first token (one row per prompt, shared), a fed token the next one.
        let device = self.device();
        let first = match (&hidden, longest_prompt) {
            (Some(h), n) if n > 0 => {
                let last = h.select(1, n as i64 - 1);
                match (&prefix_hidden, prompts.iter().any(Vec::is_empty)) {
                    (Some(p), true) => {
                        let empty: Vec<bool> = prompts.iter().map(Vec::is_empty).collect();
                        p.where_self(&Tensor::from_slice(&empty).to_device(device).view([b as i64, 1]), &last)
                    }
                    _ => last,
                }
            }
            _ => prefix_hidden.ok_or_else(|| Error::input("no tokens were processed"))?,
        };
        let (mut slots, mut targets) = (Vec::new(), Vec::new());
        for r in 0..b {
            for ((cand, f), &at) in candidates.iter().zip(&fed).zip(&offsets) {
                for k in 0..f.len() {
                    slots.push((r * width + at + k) as i64);
                    targets.push(i64::from(cand[k + 1]));
                }
            }
        }
        let states = match &hidden {
            Some(h) if !slots.is_empty() => {
                let flat = h.view([-1, h.size()[2]]);
                Tensor::cat(
                    &[&first, &flat.index_select(0, &Tensor::from_slice(&slots).to_device(device))],
                    0,
                )
            }
            _ => first,
        };
        // One output projection for every state that predicts something.
        let logp = self.logits(&states).log_softmax(-1, Kind::Float); // [B + slots, V]
        let first_ids: Vec<i64> = candidates.iter().map(|cand| i64::from(cand[0])).collect();
        let first_ids = Tensor::from_slice(&first_ids).to_device(device);
        let first: Vec<f32> = Vec::try_from(
            logp.narrow(0, 0, b as i64).index_select(1, &first_ids).to_device(tch::Device::Cpu).view([-1]),
        )?;
        let mut scores: Vec<Vec<f64>> =
            first.chunks(c).map(|row| row.iter().map(|&x| f64::from(x)).collect()).collect();
        if !slots.is_empty() {
            let targets = Tensor::from_slice(&targets).to_device(device).view([-1, 1]);
            let picked: Vec<f32> = Vec::try_from(
                logp.narrow(0, b as i64, slots.len() as i64)
                    .gather(1, &targets, false)
                    .to_device(tch::Device::Cpu)
                    .view([-1]),
            )?;
            let owners = (0..b).flat_map(|r| {
                fed.iter().enumerate().flat_map(move |(ci, f)| std::iter::repeat_n((r, ci), f.len()))
            });
            for ((r, ci), lp) in owners.zip(picked) {
                scores[r][ci] += f64::from(lp);
            }
        }
        debug!(prompts = b, candidates = c, prefix = prefix.map_or(0, |p| p.ids.len()), "scored");
        Ok((scores.into_iter().map(|row| row.into_iter().map(|x| x as f32).collect()).collect(), kept))
    }

    /// Continues `prompt` token by token; see [`GenerateOptions`].
    pub fn generate(&self, prompt: &[u32], options: &GenerateOptions) -> Result<Generation> {
        let _guard = tch::no_grad_guard();
        if prompt.is_empty() {
            return Err(Error::input("an empty prompt"));
        }
        if !(options.temperature.is_finite() && options.temperature >= 0.0) {
            return Err(Error::input("temperature must be a non-negative number"));
        }
        if !(options.top_p > 0.0 && options.top_p <= 1.0) {
            return Err(Error::input("top_p must be in (0, 1]"));
        }
        let context = self.config().max_position_embeddings;
        if prompt.len() > context {
            return Err(Error::input(format!(
                "prompt of {} tokens exceeds the context of {context}",
                prompt.len()
            )));
        }
        let capacity = (prompt.len() + options.max_tokens).min(context);
        let mut cache = self.new_cache(1, capacity)?;
        let _ = self.forward_cached(&mut cache, &[prompt], Padding::Left)?;
        let mut stops = options.stop_ids.clone();
        stops.extend(self.config().eos_token_id);
        let mut rng = SplitMix64::new(options.seed);
        let mut ids = Vec::new();
        loop {
            if ids.len() == options.max_tokens {
                return Ok(Generation { ids, stop: StopReason::MaxTokens });
            }
            let hidden = cache.last_hidden().ok_or_else(|| Error::input("no tokens were processed"))?;
            let logits = self.logits(hidden).get(0);
            let next = if options.temperature == 0.0 {
                u32::try_from(logits.argmax(0, false).int64_value(&[])).unwrap_or(0)
            } else {
                let logits: Vec<f32> = Vec::try_from(logits.to_device(tch::Device::Cpu))?;
                sample(&logits, options.temperature, options.top_p, &mut rng)
            };
            if stops.contains(&next) {
                return Ok(Generation { ids, stop: StopReason::Stop(next) });
            }
            ids.push(next);
            if cache.len() == capacity {
                let stop = if ids.len() == options.max_tokens {
                    StopReason::MaxTokens
                } else {
                    StopReason::ContextFull
                };
                return Ok(Generation { ids, stop });
            }
            let _ = self.forward_cached(&mut cache, &[&[next]], Padding::Left)?;
        }
    }
}

/// Samples a token from `logits / temperature`, restricted to the top-`top_p` nucleus.
fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut SplitMix64) -> u32 {
    let t = f64::from(temperature);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, (f64::from(l - max) / t).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    // Most likely first; ties by id so the order (and thus the draw) is deterministic.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, p) in &probs {
        mass += p / total;
        kept += 1;
        if mass >= f64::from(top_p) {
            break;
        }
    }
    let nucleus = &probs[..kept.max(1)];
    let nucleus_mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.next_f64() * nucleus_mass;
    for &(id, p) in nucleus {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    // Rounding left a sliver of mass: it belongs to the last kept token.
    nucleus[nucleus.len() - 1].0
}

/// SplitMix64: tiny, fast, and good enough for sampling; chosen over a crate so the sequence
/// for a seed never changes with a dependency upgrade.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::tests::tiny;

    /// The scoring before one-step candidates: prefill the prompts, copy each prompt's cache once
    /// per candidate, run the candidates' tokens on the copies (right-padded).
    fn fan_out_score(
        model: &Llama,
        prefix: &Prefix,
        prompts: &[Vec<u32>],
        candidates: &[Vec<u32>],
    ) -> Vec<Vec<f64>> {
        let _guard = tch::no_grad_guard();
        let (b, c) = (prompts.len(), candidates.len());
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        let mut cache = prefix.cache.select_rows(&vec![0; b], longest).unwrap();
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let _ = model.forward_cached(&mut cache, &rows, Padding::Left).unwrap();
        let first = model.logits(cache.last_hidden().unwrap()).log_softmax(-1, Kind::Double);
        let mut scores: Vec<Vec<f64>> = (0..b)
            .map(|p| candidates.iter().map(|k| first.double_value(&[p as i64, i64::from(k[0])])).collect())
            .collect();
        let longest_candidate = candidates.iter().map(Vec::len).max().unwrap();
        let fan_rows: Vec<usize> = (0..b).flat_map(|p| std::iter::repeat_n(p, c)).collect();
        let mut fan = cache.select_rows(&fan_rows, longest_candidate - 1).unwrap();
        let inputs: Vec<&[u32]> = (0..b).flat_map(|_| candidates.iter().map(|k| &k[..k.len() - 1])).collect();
        let hidden = model.forward_cached(&mut fan, &inputs, Padding::Right).unwrap();
        let logp = model.logits(&hidden).log_softmax(-1, Kind::Double);
        for (p, row) in scores.iter_mut().enumerate() {
            for (ci, k) in candidates.iter().enumerate() {
                let fan_row = (p * c + ci) as i64;
                for (t, &id) in k.iter().enumerate().skip(1) {
                    row[ci] += logp.double_value(&[fan_row, t as i64 - 1, i64::from(id)]);
                }
            }
        }
        scores
    }

    #[test]
    fn one_step_scoring_equals_the_per_candidate_fan_out() {
        let model = tiny(11);
        let prefix = model.prefix(&[3, 4, 5, 6]).unwrap();
        // Prompts of different lengths (one empty: the prefix alone predicts), candidates of
        // 1 to 4 tokens sharing a first token, so a mask leak between candidates would show.
        let prompts: Vec<Vec<u32>> = vec![vec![7, 8, 9, 10, 11], vec![12], vec![], vec![13, 14, 15]];
        let candidates: Vec<Vec<u32>> = vec![vec![20], vec![21, 22], vec![21, 23, 24], vec![25, 26, 27, 28]];
        let one_step = model.score(Some(&prefix), &prompts, &candidates).unwrap();
        let nonempty: Vec<Vec<u32>> =
            prompts.iter().map(|p| if p.is_empty() { vec![30] } else { p.clone() }).collect();
        let reference = fan_out_score(&model, &prefix, &nonempty, &candidates);
        let one_step_nonempty = model.score(Some(&prefix), &nonempty, &candidates).unwrap();
        for (p, row) in reference.iter().enumerate() {
            for (ci, &lp) in row.iter().enumerate() {
                let got = f64::from(one_step_nonempty[p][ci]);
                assert!((got - lp).abs() < 1e-4, "prompt {p} candidate {ci}: {got} vs {lp}");
            }
        }
        // Against a full forward pass of prefix ++ prompt ++ candidate (empty prompt included),
        // and against scoring without a cached prefix.
        for (p, prompt) in prompts.iter().enumerate() {
            for (ci, cand) in candidates.iter().enumerate() {
                let seq: Vec<i64> =
                    prefix.ids().iter().chain(prompt).chain(cand).map(|&i| i64::from(i)).collect();
                let logits =
                    tch::no_grad(|| model.forward(&Tensor::from_slice(&seq).view([1, -1]), None)).unwrap();
                let logp = logits.get(0).log_softmax(-1, Kind::Double);
                let start = prefix.ids().len() + prompt.len();
                let full: f64 = cand
                    .iter()
                    .enumerate()
                    .map(|(k, &id)| logp.double_value(&[(start + k - 1) as i64, i64::from(id)]))
                    .sum();
                let got = f64::from(one_step[p][ci]);
                assert!((got - full).abs() < 1e-4, "prompt {p} candidate {ci}: {got} vs full {full}");
            }
            let full_prompt: Vec<u32> = prefix.ids().iter().chain(&nonempty[p]).copied().collect();
            let alone = model.score(None, &[full_prompt], &candidates).unwrap();
            for ci in 0..candidates.len() {
                assert!((alone[0][ci] - one_step_nonempty[p][ci]).abs() < 1e-4, "no prefix: prompt {p} {ci}");
            }
        }
    }

    /// A model that differs from `tiny(11)` only in its top block and final norm scores from
    /// the stream `tiny(11)` kept as it scores from scratch; the keeping model's own scores are
    /// unchanged by keeping; another request is refused.
    #[test]
    fn scoring_from_a_kept_trunk_equals_scoring_from_scratch() {
        let base = tiny(11);
        let tuned = tiny(11);
        tch::no_grad(|| {
            tch::manual_seed(5);
            for (name, mut t) in tuned.named_tensors() {
                if name.starts_with("model.layers.1.") || name == "model.norm.weight" {
                    let noise = t.randn_like() * 0.2;
                    let _ = t.g_add_(&noise);
                }
            }
        });
        // Enough rows × slots (≥ 64) that the step is split over prefill workers by rows.
        let long: Vec<u32> = (0..24).map(|i| 5 + (i * 7) % 40).collect();
        let prompts: Vec<Vec<u32>> =
            vec![vec![7, 8, 9, 10, 11], vec![12], vec![], vec![13, 14, 15], long.clone(), long[3..].to_vec()];
        let candidates: Vec<Vec<u32>> = vec![vec![20], vec![21, 22], vec![21, 23, 24]];
        let (base_prefix, tuned_prefix) =
            (base.prefix(&[3, 4, 5, 6]).unwrap(), tuned.prefix(&[3, 4, 5, 6]).unwrap());
        let close = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
        };
        for layer in [0, 1] {
            let (kept_scores, kept) =
                base.score_keeping(Some(&base_prefix), &prompts, &candidates, layer).unwrap();
            assert_eq!(kept.layer(), layer);
            assert!(kept.bytes() > 0);
            let scratch = base.score(Some(&base_prefix), &prompts, &candidates).unwrap();
            assert!(close(&kept_scores, &scratch) < 1e-6, "keeping changed the scores at {layer}");
            let want = tuned.score(Some(&tuned_prefix), &prompts, &candidates).unwrap();
            let got = tuned.score_from(Some(&tuned_prefix), &prompts, &candidates, &kept).unwrap();
            assert!(close(&got, &want) < 1e-5, "layer {layer}: {got:?} vs {want:?}");
            assert!(close(&want, &scratch) > 1e-3, "the tuned top block changes the scores");
        }
        // Kept past every block: only the final norm and the head remain.
        let (_, kept) = base.score_keeping(Some(&base_prefix), &prompts, &candidates, 2).unwrap();
        let again = base.score_from(Some(&base_prefix), &prompts, &candidates, &kept).unwrap();
        let scratch = base.score(Some(&base_prefix), &prompts, &candidates).unwrap();
        assert!(close(&again, &scratch) < 1e-6);
        let (_, kept) = base.score_keeping(Some(&base_prefix), &prompts, &candidates, 1).unwrap();
        let err = tuned.score_from(Some(&tuned_prefix), &prompts[1..], &candidates, &kept).unwrap_err();
        assert!(err.to_string().contains("other prompts"), "{err}");
        assert!(base.score_keeping(Some(&base_prefix), &prompts, &candidates, 3).is_err());
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_p() {
        let logits = vec![2.0f32, 1.0, 0.5, -1.0, 3.0];
        let draw = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..200).map(|_| sample(&logits, 1.0, 1.0, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // Every token has some mass, so 200 draws at temperature 1 see more than one.
        assert!(draw(7).iter().any(|&t| t != 4));
        // top_p small enough keeps only the argmax.
        let mut rng = SplitMix64::new(1);
        assert!((0..100).all(|_| sample(&logits, 1.0, 0.1, &mut rng) == 4));
        // A very low temperature is effectively greedy.
        let mut rng = SplitMix64::new(2);
        assert!((0..100).all(|_| sample(&logits, 1e-3, 1.0, &mut rng) == 4));
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let logits = vec![0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut rng = SplitMix64::new(42);
        let n = 20_000;
        let ones = (0..n).filter(|_| sample(&logits, 1.0, 1.0, &mut rng) == 1).count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }
}
