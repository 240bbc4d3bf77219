//! Which tensors a Llama architecture config implies, and checking a manifest against it.
//!
//! Names follow Hugging Face Llama checkpoints (`model.layers.{i}.self_attn.q_proj.weight`,
//! ...). Shapes are `[out, in]` for linear layers as stored by PyTorch. LoRA adapters are
//! separate tensors named after the projection they adapt, `<proj>.lora_A.weight` with shape
//! `[rank, in]` and `<proj>.lora_B.weight` with shape `[out, rank]`; they are allowed only when
//! the config sets a rank, and come in pairs. A tied output head is the embedding matrix, so
//! `lm_head.weight` must then be absent (a separate copy would silently diverge from it).

use std::collections::{BTreeMap, HashMap};

use llmchain_proto::{ApiError, ApiResult, model::TensorInfo};

use crate::manifest::Architecture;

/// The linear projections of one block that LoRA may adapt, as (name suffix, out, in).
fn projections(a: &Architecture) -> [(&'static str, u64, u64); 7] {
    let hidden = u64::from(a.hidden_size);
    let inter = u64::from(a.intermediate_size);
    let head_dim = hidden / u64::from(a.num_heads);
    let kv = head_dim * u64::from(a.num_kv_heads);
    [
        ("self_attn.q_proj", hidden, hidden),
        ("self_attn.k_proj", kv, hidden),
        ("self_attn.v_proj", kv, hidden),
        ("self_attn.o_proj", hidden, hidden),
        ("mlp.gate_proj", inter, hidden),
        ("mlp.up_proj", inter, hidden),
        ("mlp.down_proj", hidden, inter),
    ]
}

impl Architecture {
    /// Every base tensor (no adapters) with its shape, by name.
    pub fn base_tensors(&self) -> BTreeMap<String, Vec<u64>> {
        let hidden = u64::from(self.hidden_size);
        let vocab = u64::from(self.vocab_size);
        let mut out = BTreeMap::new();
        out.insert("model.embed_tokens.weight".to_string(), vec![vocab, hidden]);
        out.insert("model.norm.weight".to_string(), vec![hidden]);
        if !self.tie_word_embeddings {
            out.insert("lm_head.weight".to_string(), vec![vocab, hidden]);
        }
        for layer in 0..self.num_layers {
            let p = format!("model.layers.{layer}");
            for (suffix, o, i) in projections(self) {
                out.insert(format!("{p}.{suffix}.weight"), vec![o, i]);
            }
            out.insert(format!("{p}.input_layernorm.weight"), vec![hidden]);
            out.insert(format!("{p}.post_attention_layernorm.weight"), vec![hidden]);
        }
        out
    }

    /// Every LoRA adapter tensor the config allows, with its shape, by name.
    pub fn lora_tensors(&self) -> BTreeMap<String, Vec<u64>> {
        let rank = u64::from(self.lora_rank);
        let mut out = BTreeMap::new();
        if rank == 0 {
            return out;
        }
        for layer in 0..self.num_layers {
            for (suffix, o, i) in projections(self) {
                let p = format!("model.layers.{layer}.{suffix}");
                out.insert(format!("{p}.lora_A.weight"), vec![rank, i]);
                out.insert(format!("{p}.lora_B.weight"), vec![o, rank]);
            }
        }
        out
    }

    /// Checks that `tensors` is exactly the base set, plus LoRA pairs if a rank is configured.
    ///
    /// The error names the first offending tensor, as `tensors` field `InvalidArgument`.
    pub fn check_tensors(&self, tensors: &[TensorInfo]) -> ApiResult<()> {
        let base = self.base_tensors();
        let lora = self.lora_tensors();
        let by_name: HashMap<&str, &TensorInfo> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        for t in tensors {
            let want = base.get(&t.name).or_else(|| lora.get(&t.name)).ok_or_else(|| {
                let why = if t.name == "lm_head.weight" {
                    "is present although tie_word_embeddings is set".to_string()
                } else if t.name.contains(".lora_") && self.lora_rank == 0 {
                    "is a LoRA adapter but the architecture has lora_rank 0".to_string()
                } else {
                    format!(
                        "is not a tensor of a llama model with {} layers (hidden {}, {} heads, {} kv heads)",
                        self.num_layers, self.hidden_size, self.num_heads, self.num_kv_heads
                    )
                };
                ApiError::invalid("tensors", format!("tensor {:?} {why}", t.name))
            })?;
            if &t.shape != want {
                return Err(ApiError::invalid(
                    "tensors",
                    format!("tensor {:?} has shape {:?}, the architecture needs {:?}", t.name, t.shape, want),
                ));
            }
            if let Some(partner) = lora_partner(&t.name)
                && !by_name.contains_key(partner.as_str())
            {
                return Err(ApiError::invalid(
                    "tensors",
                    format!("tensor {:?} comes without its LoRA partner {partner:?}", t.name),
                ));
            }
        }
        if let Some(missing) = base.keys().find(|name| !by_name.contains_key(name.as_str())) {
            return Err(ApiError::invalid("tensors", format!("tensor {missing:?} is missing")));
        }
        Ok(())
    }
}

fn lora_partner(name: &str) -> Option<String> {
    if let Some(p) = name.strip_suffix(".lora_A.weight") {
        Some(format!("{p}.lora_B.weight"))
    } else {
        name.strip_suffix(".lora_B.weight").map(|p| format!("{p}.lora_A.weight"))
    }
}
