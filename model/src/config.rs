//! Architecture hyper-parameters of a Llama-family model.
//!
//! One [`LlamaConfig`] is built from either source a model comes in: GGUF metadata (`llama.*`
//! keys, as llama.cpp's converter writes them) or a Hugging Face `config.json`. It is written
//! back as a `config.json` that `transformers` loads with `LlamaForCausalLM`.
//!
//! Invariant: a config returned by any constructor has passed [`LlamaConfig::validate`], so the
//! model code can rely on `hidden_size == num_attention_heads * head_dim`, heads divisible by
//! KV heads, an even head dimension and positive sizes. Features the transformer does not
//! implement (rope scaling, partial rotary, biases, other activations) are refused here rather
//! than silently computed wrong.

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// Hyper-parameters of a Llama-architecture decoder (SmolLM2, TinyLlama, Llama 2, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Number of token embeddings (and output logits).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's inner layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Longest sequence the model was trained for; positions beyond it are refused.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base θ of the rotary embedding frequencies.
    pub rope_theta: f64,
    /// Whether the output head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id, when the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, when the model has one.
    pub eos_token_id: Option<u32>,
    /// Padding token id, when the model has one.
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Reads the hyper-parameters from GGUF metadata (`<arch>.*` keys, `llama` or a Llama clone).
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let arch = gguf.architecture()?.to_owned();
        if !matches!(arch.as_str(), "llama" | "smollm" | "mistral") {
            return Err(Error::config(format!("architecture {arch:?} is not a llama-family model")));
        }
        let key = |name: &str| format!("{arch}.{name}");
        let u = |name: &str| -> Result<usize> { Ok(gguf.get_u32(&key(name))? as usize) };

        let hidden_size = u("embedding_length")?;
        let num_attention_heads = u("attention.head_count")?;
        let num_key_value_heads = if gguf.get(&key("attention.head_count_kv")).is_some() {
            u("attention.head_count_kv")?
        } else {
            num_attention_heads
        };
        let head_dim = if gguf.get(&key("attention.key_length")).is_some() {
            u("attention.key_length")?
        } else {
            hidden_size.checked_div(num_attention_heads).unwrap_or(0)
        };
        if gguf.get(&key("attention.value_length")).is_some() && u("attention.value_length")? != head_dim {
            return Err(Error::config("key and value head widths differ"));
        }
        if gguf.get(&key("rope.dimension_count")).is_some() && u("rope.dimension_count")? != head_dim {
            return Err(Error::config("partial rotary embeddings are not supported"));
        }
        if gguf.get(&key("rope.scaling.type")).is_some() {
            let kind = gguf.get_str(&key("rope.scaling.type"))?;
            if kind != "none" {
                return Err(Error::config(format!("rope scaling {kind:?} is not supported")));
            }
        }
        // Not every converter writes the vocabulary size; the embedding matrix always knows it.
        let vocab_size = if gguf.get(&key("vocab_size")).is_some() {
            u("vocab_size")?
        } else {
            let info = gguf
                .tensor_info("token_embd.weight")
                .ok_or_else(|| Error::TensorNotFound { name: "token_embd.weight".into() })?;
            info.shape().first().copied().unwrap_or(0)
        };
        let rope_theta = if gguf.get(&key("rope.freq_base")).is_some() {
            f64::from(gguf.get_f32(&key("rope.freq_base"))?)
        } else {
            10_000.0
        };
        let token = |name: &str| -> Result<Option<u32>> {
            let k = format!("tokenizer.ggml.{name}");
            if gguf.get(&k).is_some() { gguf.get_u32(&k).map(Some) } else { Ok(None) }
        };
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: u("context_length")?,
            rms_norm_eps: f64::from(gguf.get_f32(&key("attention.layer_norm_rms_epsilon"))?),
            rope_theta,
            // llama.cpp omits `output.weight` exactly when the head is tied to the embeddings.
            tie_word_embeddings: gguf.tensor_info("output.weight").is_none(),
            bos_token_id: token("bos_token_id")?,
            eos_token_id: token("eos_token_id")?,
            pad_token_id: token("padding_token_id")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses a Hugging Face `config.json` of a `LlamaForCausalLM` model.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Json = serde_json::from_str(text).map_err(|e| Error::config(format!("config.json: {e}")))?;
        let model_type = v.get("model_type").and_then(Json::as_str).unwrap_or("llama");
        if model_type != "llama" {
            return Err(Error::config(format!("model_type {model_type:?} is not llama")));
        }
        let act = v.get("hidden_act").and_then(Json::as_str).unwrap_or("silu");
        if act != "silu" {
            return Err(Error::config(format!("activation {act:?} is not supported")));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if v.get(flag).and_then(Json::as_bool).unwrap_or(false) {
                return Err(Error::config(format!("{flag} is not supported")));
            }
        }
        // transformers 5 moved rope settings into `rope_parameters`; older files use the flat keys.
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_type = rope
            .and_then(|r| r.get("rope_type"))
            .or_else(|| v.get("rope_scaling").and_then(|s| s.get("rope_type").or_else(|| s.get("type"))))
            .and_then(Json::as_str)
            .unwrap_or("default");
        if rope_type != "default" {
            return Err(Error::config(format!("rope scaling {rope_type:?} is not supported")));
        }
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .map(|t| t.as_f64().ok_or_else(|| Error::config("rope_theta is not a number")))
            .transpose()?
            .unwrap_or(10_000.0);

        let usize_field = |name: &str| -> Result<usize> {
            v.get(name)
                .and_then(Json::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| Error::config(format!("config.json: {name} is missing or not an integer")))
        };
        let token = |name: &str| -> Result<Option<u32>> {
            match v.get(name) {
                None | Some(Json::Null) => Ok(None),
                // HF allows a list of end tokens; the first is the canonical one.
                Some(Json::Array(ids)) => {
                    Ok(ids.first().and_then(Json::as_u64).and_then(|n| u32::try_from(n).ok()))
                }
                Some(id) => id
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| Error::config(format!("config.json: {name} is not a token id"))),
            }
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let config = LlamaConfig {
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: if v.get("num_key_value_heads").is_some_and(|n| !n.is_null()) {
                usize_field("num_key_value_heads")?
            } else {
                num_attention_heads
            },
            head_dim: if v.get("head_dim").is_some_and(|n| !n.is_null()) {
                usize_field("head_dim")?
            } else {
                hidden_size / num_attention_heads.max(1)
            },
            max_position_embeddings: usize_field("max_position_embeddings")?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Json::as_f64)
                .ok_or_else(|| Error::config("config.json: rms_norm_eps is missing"))?,
            rope_theta,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Json::as_bool).unwrap_or(true),
            bos_token_id: token("bos_token_id")?,
            eos_token_id: token("eos_token_id")?,
            pad_token_id: token("pad_token_id")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Renders a Hugging Face `config.json` for `LlamaForCausalLM`; `dtype` is the stored
    /// weight type (`"float32"` or `"bfloat16"`).
    pub fn to_hf_json(&self, dtype: &str) -> String {
        let v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": Json::Null,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "use_cache": true,
        });
        // A `Value` built by `json!` always serialises.
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// Checks the invariants the transformer relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::config(format!("{name} must be positive")));
            }
            // Sizes become i64 tensor dimensions; anything this large is corrupt, not a model.
            if value > (1 << 24) && name != "max_position_embeddings" {
                return Err(Error::config(format!("{name} = {value} is implausibly large")));
            }
        }
        if self.max_position_embeddings > (1 << 22) {
            return Err(Error::config("max_position_embeddings is implausibly large"));
        }
        if self.num_attention_heads * self.head_dim != self.hidden_size {
            return Err(Error::config(format!(
                "hidden_size {} != num_attention_heads {} x head_dim {}",
                self.hidden_size, self.num_attention_heads, self.head_dim
            )));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(Error::config("num_attention_heads is not a multiple of num_key_value_heads"));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::config("head_dim must be even for rotary embeddings"));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(Error::config("rms_norm_eps must be a positive number"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(Error::config("rope_theta must be a positive number"));
        }
        Ok(())
    }

    /// Width of the key (and value) projection: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Number of parameters, the tied head counted once.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let attn = 2 * h * h + 2 * h * self.kv_dim();
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: Some(2),
        }
    }

    #[test]
    fn hf_json_round_trips() {
        let config = smollm2();
        let back = LlamaConfig::from_hf_json(&config.to_hf_json("float32")).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn smollm2_has_135m_parameters() {
        // SmolLM2-135M: 134,515,008 parameters according to its model card / HF's count.
        assert_eq!(smollm2().num_parameters(), 134_515_008);
    }

    #[test]
    fn reads_transformers5_rope_parameters_and_defaults() {
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":32,
            "rms_norm_eps":1e-6,"rope_parameters":{"rope_type":"default","rope_theta":500000.0},
            "eos_token_id":[7,8]}"#;
        let c = LlamaConfig::from_hf_json(text).unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.eos_token_id, Some(7));
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn refuses_what_the_transformer_does_not_implement() {
        let base = smollm2().to_hf_json("float32");
        let mut v: Json = serde_json::from_str(&base).unwrap();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
        assert!(LlamaConfig::from_hf_json(&v.to_string()).is_err());

        let mut v: Json = serde_json::from_str(&base).unwrap();
        v["hidden_act"] = json!("gelu");
        assert!(LlamaConfig::from_hf_json(&v.to_string()).is_err());

        let mut v: Json = serde_json::from_str(&base).unwrap();
        v["num_key_value_heads"] = json!(4);
        assert!(LlamaConfig::from_hf_json(&v.to_string()).is_err());

        assert!(LlamaConfig::from_hf_json("{not json").is_err());
        assert!(LlamaConfig::from_hf_json(r#"{"vocab_size": -1}"#).is_err());
    }

    #[test]
    fn validate_rejects_inconsistent_shapes() {
        let mut c = smollm2();
        c.head_dim = 63;
        assert!(c.validate().is_err());
        let mut c = smollm2();
        c.rms_norm_eps = f64::NAN;
        assert!(c.validate().is_err());
        let mut c = smollm2();
        c.vocab_size = 0;
        assert!(c.validate().is_err());
    }
}
