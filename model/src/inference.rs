//! Scoring and generation: what the edge agent and the operator command run on a [`Llama`].
//!
//! - [`Llama::score`] gives, for every prompt, the log-probability of every candidate
//!   continuation. Each prompt is prefilled once (all prompts in one padded batch); its KV cache
//!   is then fanned out to one row per candidate, so only candidate tokens are computed again.
//!   A [`Prefix`] (the fixed instructions every prompt starts with) is computed once per model
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
use crate::llama::{KvCache, Llama, Padding};

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
    /// With `prefix`, each prompt is the part after the prefix (and may be empty). Prompts are
    /// prefilled in one batch; candidates then run against each prompt's cached keys and values.
    pub fn score(
        &self,
        prefix: Option<&Prefix>,
        prompts: &[Vec<u32>],
        candidates: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
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
        let longest_candidate = candidates.iter().map(Vec::len).max().unwrap_or(0);

        // 1. The prompts, after the (shared) prefix, in one left-padded batch.
        let mut cache = match prefix {
            Some(p) => p.cache.select_rows(&vec![0; b], longest_prompt)?,
            None => self.new_cache(b, longest_prompt)?,
        };
        if longest_prompt > 0 {
            let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let _ = self.forward_cached(&mut cache, &rows, Padding::Left)?;
        }
        let last = cache.last_hidden().ok_or_else(|| Error::input("no tokens were processed"))?;
        let first = self.logits(last).log_softmax(-1, Kind::Float); // [B, V]
        let first_ids: Vec<i64> = candidates.iter().map(|cand| i64::from(cand[0])).collect();
        let first_ids = Tensor::from_slice(&first_ids).to_device(self.device());
        let first: Vec<f32> =
            Vec::try_from(first.index_select(1, &first_ids).to_device(tch::Device::Cpu).view([-1]))?;
        let mut scores: Vec<Vec<f64>> =
            first.chunks(c).map(|row| row.iter().map(|&x| f64::from(x)).collect()).collect();

        // 2. The candidates' remaining tokens, one row per (prompt, candidate). The last token of
        //    a candidate is only ever predicted, never fed, so single-token candidates need no
        //    second pass at all.
        if longest_candidate > 1 {
            let fan_rows: Vec<usize> = (0..b).flat_map(|p| std::iter::repeat_n(p, c)).collect();
            let mut fan = cache.select_rows(&fan_rows, longest_candidate - 1)?;
            drop(cache);
            let inputs: Vec<&[u32]> =
                (0..b).flat_map(|_| candidates.iter().map(|cand| &cand[..cand.len() - 1])).collect();
            let hidden = self.forward_cached(&mut fan, &inputs, Padding::Right)?; // [B*C, L-1, H]
            let width = (longest_candidate - 1) as i64;
            let (mut slots, mut targets, mut owners) = (Vec::new(), Vec::new(), Vec::new());
            for (row, cand) in
                (0..b).flat_map(|p| candidates.iter().enumerate().map(move |(ci, cand)| (p * c + ci, cand)))
            {
                for t in 0..cand.len() - 1 {
                    slots.push(row as i64 * width + t as i64);
                    targets.push(i64::from(cand[t + 1]));
                    owners.push(row);
                }
            }
            let device = self.device();
            let hidden = hidden
                .view([-1, hidden.size()[2]])
                .index_select(0, &Tensor::from_slice(&slots).to_device(device));
            let logp = self.logits(&hidden).log_softmax(-1, Kind::Float);
            let targets = Tensor::from_slice(&targets).to_device(device).view([-1, 1]);
            let picked: Vec<f32> =
                Vec::try_from(logp.gather(1, &targets, false).to_device(tch::Device::Cpu).view([-1]))?;
            for (row, lp) in owners.into_iter().zip(picked) {
                scores[row / c][row % c] += f64::from(lp);
            }
        }
        debug!(prompts = b, candidates = c, prefix = prefix.map_or(0, |p| p.ids.len()), "scored");
        Ok(scores.into_iter().map(|row| row.into_iter().map(|x| x as f32).collect()).collect())
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
