//! Building a model version from a model in memory: one blob per tensor (Hugging Face names,
//! row-major, little-endian bf16 or f32), one blob for the tokenizer, and the manifest that
//! lists them by digest.
//!
//! Identical tensors give identical digests, so a version derived from another shares every
//! blob it did not change — the delta an agent downloads is simply the digests it lacks.

use std::{collections::BTreeMap, time::SystemTime};

use llmchain_artifact::{
    DType, Digest, Manifest, ModelRef, TensorInfo, TokenizerRef, TrainingMetadata, digest_bytes,
};
use llmchain_model::{
    Llama, SaveDtype,
    tokenizer::Tokenizer,
    version::{TOKENIZER_KIND, architecture},
    weights::tensor_bytes,
};

use crate::{Error, Result};

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
    // Adapters are tensors of their own: the architecture says their rank and alpha, and the
    // base tensors keep their bytes (and digests) from the parent.
    let mut arch = architecture(model.config());
    if let Some(lora) = model.lora() {
        arch.lora_rank =
            u32::try_from(lora.rank).map_err(|_| Error::Invalid("LoRA rank too large".into()))?;
        arch.lora_alpha = lora.alpha;
    }
    let manifest = Manifest {
        id,
        parent_version,
        architecture: arch,
        tokenizer: tokenizer_ref,
        tensors,
        training,
        created_at: SystemTime::now(),
        expires_at: None,
    };
    Ok(VersionBuild { manifest, blobs })
}
