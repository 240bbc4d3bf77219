//! Building a model version from a model in memory: one blob per tensor (Hugging Face names,
//! row-major, little-endian bf16 or f32), one blob for the tokenizer, and the manifest that
//! lists them by digest.
//!
//! Identical tensors give identical digests, so a version derived from another shares every
//! blob it did not change — the delta an agent downloads is simply the digests it lacks.

use std::{collections::BTreeMap, time::SystemTime};

use llmchain_artifact::{
    Architecture, DType, Digest, Manifest, ModelRef, TensorInfo, TokenizerRef, TrainingMetadata, digest_bytes,
};
use llmchain_model::{Llama, LlamaConfig, SaveDtype, tokenizer::Tokenizer, weights::tensor_bytes};

use crate::{Error, Result};

/// Tokenizer blob kind: a `tokenizer.json` of the `tokenizers` library.
pub const TOKENIZER_KIND: &str = "tokenizer-json";

/// A version ready to publish: its manifest and the bytes of every blob it references.
pub struct VersionBuild {
    /// The (unsigned) manifest.
    pub manifest: Manifest,
    /// Blob bytes by digest (tensors and the tokenizer).
    pub blobs: BTreeMap<Digest, Vec<u8>>,
}

impl VersionBuild {
    /// Bytes of all blobs.
    pub fn total_bytes(&self) -> u64 {
        self.blobs.values().map(|b| b.len() as u64).sum()
    }
}

/// The manifest architecture of a model config.
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

/// Builds version `id` (derived from `parent_version`, 0 for none) of `model`.
pub fn build(
    model: &Llama,
    tokenizer: &Tokenizer,
    id: ModelRef,
    parent_version: u64,
    dtype: SaveDtype,
    training: TrainingMetadata,
) -> Result<VersionBuild> {
    let wire_dtype = match dtype {
        SaveDtype::F32 => DType::F32,
        SaveDtype::Bf16 => DType::Bf16,
    };
    let mut blobs = BTreeMap::new();
    let mut tensors = Vec::new();
    for (name, tensor) in model.named_tensors() {
        let bytes = tensor_bytes(&tensor, dtype);
        let digest = digest_bytes(&bytes);
        let shape = tensor.size().iter().map(|&d| d as u64).collect();
        tensors.push(TensorInfo { name, dtype: wire_dtype, shape, digest, size: bytes.len() as u64 });
        blobs.insert(digest, bytes);
    }
    let tokenizer_json = tokenizer.to_json()?.into_bytes();
    let tokenizer_ref = TokenizerRef {
        kind: TOKENIZER_KIND.into(),
        digest: digest_bytes(&tokenizer_json),
        size: tokenizer_json.len() as u64,
    };
    blobs.insert(tokenizer_ref.digest, tokenizer_json);
    if parent_version >= id.version {
        return Err(Error::Invalid(format!("parent version {parent_version} must be below {}", id.version)));
    }
    let manifest = Manifest {
        id,
        parent_version,
        architecture: architecture(model.config()),
        tokenizer: tokenizer_ref,
        tensors,
        training,
        created_at: SystemTime::now(),
        expires_at: None,
    };
    Ok(VersionBuild { manifest, blobs })
}
