//! Synthetic tiny Llama versions for tests: deterministic tensor bytes, real digests.
//!
//! Only built for tests (`cfg(test)` or the `testing` feature); the data is not a usable model,
//! but every name, shape, size and digest is exactly what a real version would carry.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use llmchain_proto::model::{DType, Digest, ModelName, ModelRef, TensorInfo};

use crate::{Architecture, Manifest, TokenizerRef, TrainingMetadata, digest_bytes, manifest::Metric};

/// A Llama config with tiny dimensions and `num_layers` blocks.
pub fn tiny_llama(num_layers: u32) -> Architecture {
    Architecture {
        family: "llama".into(),
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers,
        num_heads: 4,
        num_kv_heads: 2,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 128,
        tie_word_embeddings: true,
        lora_rank: 0,
        lora_alpha: 0.0,
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each `(label, seed)`.
pub fn synthetic_bytes(label: &str, seed: u64, len: usize) -> Vec<u8> {
    let mut state = digest_bytes(format!("{label}/{seed}").as_bytes()).0[..8]
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A version of `model` and the bytes of each blob it references (tensors and tokenizer).
///
/// Tensor bytes depend on the tensor name and `seed_of(name)`, so two versions built with
/// seed functions that differ only for some tensors share every other blob.
pub fn synthetic_version(
    model: &str,
    version: u64,
    parent_version: u64,
    architecture: &Architecture,
    seed_of: impl Fn(&str) -> u64,
) -> (Manifest, BTreeMap<Digest, Vec<u8>>) {
    let mut blobs = BTreeMap::new();
    let shapes = architecture.base_tensors().into_iter().chain(architecture.lora_tensors());
    let mut tensors = Vec::new();
    for (name, shape) in shapes {
        let size = shape.iter().product::<u64>() * DType::F32.size();
        let bytes = synthetic_bytes(&name, seed_of(&name), size as usize);
        let digest = digest_bytes(&bytes);
        blobs.insert(digest, bytes);
        tensors.push(TensorInfo { name, dtype: DType::F32, shape, digest, size });
    }
    let tokenizer_bytes = br#"{"model":{"type":"BPE","vocab":{}}}"#.to_vec();
    let tokenizer = TokenizerRef {
        kind: "gguf-bpe".into(),
        digest: digest_bytes(&tokenizer_bytes),
        size: tokenizer_bytes.len() as u64,
    };
    blobs.insert(tokenizer.digest, tokenizer_bytes);
    let manifest = Manifest {
        id: ModelRef { model: ModelName::parse("model", model).expect("valid test model name"), version },
        parent_version,
        architecture: architecture.clone(),
        tokenizer,
        tensors,
        training: TrainingMetadata {
            mode: if parent_version == 0 { "import".into() } else { "last-layers:2".into() },
            dataset_digest: (parent_version > 0).then(|| digest_bytes(b"dataset")),
            metrics: vec![Metric { name: "accuracy".into(), value: 0.5 + version as f64 / 100.0 }],
            records: 1000 * version,
            note: String::new(),
        },
        created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + version),
        expires_at: None,
    };
    (manifest, blobs)
}
