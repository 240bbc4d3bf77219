//! A published model version (manifest + content-addressed blobs) as a runnable model.
//!
//! This is the one load path of the edge agent and of the trainer when it continues from a
//! running version. Every blob is hashed while it is read and must match its digest and size,
//! so bytes that changed on disk since they were verified are refused rather than run.
//!
//! LoRA versions carry `<proj>.lora_A.weight` (`[rank, in]`) and `<proj>.lora_B.weight`
//! (`[out, rank]`) next to the frozen base projection; they are merged at load,
//! `W' = W + (alpha / rank) · B · A`, so inference costs exactly what the base model costs.

use std::{collections::HashMap, io::Read};

use llmchain_artifact::{Architecture, BlobSource, DType, Digest, Hasher, Manifest};
use tch::{Device, Kind, Tensor};
use tracing::debug;

use crate::{Error, Llama, LlamaConfig, Result, tokenizer::Tokenizer};

/// Tokenizer blob kind: a `tokenizer.json` of the `tokenizers` library.
pub const TOKENIZER_KIND: &str = "tokenizer-json";

/// The manifest architecture of a model config (no LoRA).
pub fn architecture(config: &LlamaConfig) -> Architecture {
    let u = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    Architecture {
        family: "llama".into(),
        vocab_size: u(config.vocab_size),
        hidden_size: u(config.hidden_size),
        intermediate_size: u(config.intermediate_size),
        num_layers: u(config.num_hidden_layers),
        num_heads: u(config.num_attention_heads),
        num_kv_heads: u(config.num_key_value_heads),
        rope_theta: config.rope_theta,
        rms_norm_eps: config.rms_norm_eps,
        max_position_embeddings: u(config.max_position_embeddings),
        tie_word_embeddings: config.tie_word_embeddings,
        lora_rank: 0,
        lora_alpha: 0.0,
    }
}

/// The model config a manifest architecture describes (validated).
pub fn config_from_architecture(a: &Architecture) -> Result<LlamaConfig> {
    if a.family != "llama" {
        return Err(Error::config(format!("model family {:?} is not llama", a.family)));
    }
    let heads = a.num_heads as usize;
    let config = LlamaConfig {
        vocab_size: a.vocab_size as usize,
        hidden_size: a.hidden_size as usize,
        intermediate_size: a.intermediate_size as usize,
        num_hidden_layers: a.num_layers as usize,
        num_attention_heads: heads,
        num_key_value_heads: a.num_kv_heads as usize,
        head_dim: (a.hidden_size as usize).checked_div(heads).unwrap_or(0),
        max_position_embeddings: a.max_position_embeddings as usize,
        rms_norm_eps: a.rms_norm_eps,
        rope_theta: a.rope_theta,
        tie_word_embeddings: a.tie_word_embeddings,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    };
    config.validate()?;
    Ok(config)
}

/// Reads blob `digest` completely, checking its size and hash.
fn read_verified(source: &dyn BlobSource, what: &str, digest: &Digest, size: u64) -> Result<Vec<u8>> {
    let mut reader = source
        .open(digest)
        .map_err(|e| Error::weights(what, format!("blob {digest} cannot be opened: {e}")))?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    reader
        .by_ref()
        .take(size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::weights(what, format!("blob {digest} cannot be read: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(Error::weights(
            what,
            format!("blob {digest} has {} bytes, the manifest says {size}", bytes.len()),
        ));
    }
    let mut hasher = Hasher::new();
    hasher.update(&bytes);
    let actual = hasher.finish();
    if actual != *digest {
        return Err(Error::weights(
            what,
            format!("blob content hashes to {actual}, the manifest says {digest}"),
        ));
    }
    Ok(bytes)
}

/// A tensor from little-endian blob bytes of `dtype`, as f32 on the CPU.
fn tensor_from_bytes(name: &str, bytes: &[u8], dtype: DType, shape: &[u64]) -> Result<Tensor> {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let kind = match dtype {
        DType::F32 => Kind::Float,
        DType::F16 => Kind::Half,
        DType::Bf16 => Kind::BFloat16,
    };
    let elems: i64 = shape.iter().product();
    if bytes.len() as i64 != elems * dtype.size() as i64 {
        return Err(Error::weights(name, format!("{} bytes do not hold {dtype:?} {shape:?}", bytes.len())));
    }
    Ok(Tensor::from_data_size(bytes, &shape, kind).to_kind(Kind::Float))
}

/// Loads the model and tokenizer of `manifest` from `source` onto `device`, merging LoRA
/// adapters into their projections.
pub fn load_version(
    manifest: &Manifest,
    source: &dyn BlobSource,
    device: Device,
) -> Result<(Llama, Tokenizer)> {
    let config = config_from_architecture(&manifest.architecture)?;
    if manifest.tokenizer.kind != TOKENIZER_KIND {
        return Err(Error::Tokenizer(format!(
            "tokenizer kind {:?} is not {TOKENIZER_KIND:?}",
            manifest.tokenizer.kind
        )));
    }
    let tok = read_verified(source, "tokenizer", &manifest.tokenizer.digest, manifest.tokenizer.size)?;
    let tokenizer = Tokenizer::from_json(
        std::str::from_utf8(&tok).map_err(|_| Error::Tokenizer("tokenizer.json is not UTF-8".into()))?,
    )?;
    let by_name: HashMap<&str, _> = manifest.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let read = |name: &str| -> Result<Option<Tensor>> {
        let Some(info) = by_name.get(name) else { return Ok(None) };
        let bytes = read_verified(source, name, &info.digest, info.size)?;
        tensor_from_bytes(name, &bytes, info.dtype, &info.shape).map(Some)
    };
    let lora_scale = match manifest.architecture.lora_rank {
        0 => 0.0,
        rank => manifest.architecture.lora_alpha / f64::from(rank),
    };
    let mut merged = 0usize;
    let model = Llama::from_fetch(config, device, |name, _shape| {
        let mut w = read(name)?.ok_or_else(|| Error::weights(name, "missing from the manifest"))?;
        if let Some(stem) = name.strip_suffix(".weight") {
            let (a, b) = (read(&format!("{stem}.lora_A.weight"))?, read(&format!("{stem}.lora_B.weight"))?);
            match (a, b) {
                (Some(a), Some(b)) => {
                    w += b.matmul(&a) * lora_scale;
                    merged += 1;
                }
                (None, None) => {}
                _ => return Err(Error::weights(name, "has only one of its two LoRA adapters")),
            }
        }
        Ok(w)
    })?;
    debug!(version = %manifest.id, lora_merged = merged, "loaded model version");
    Ok((model, tokenizer))
}
