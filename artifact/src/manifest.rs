//! The model-version manifest and its canonical byte encoding.
//!
//! The canonical bytes of a manifest are the protobuf encoding of `pb::Manifest` with tensors
//! and metrics sorted by name. Protobuf has no canonical form in general (field order, unknown
//! fields, non-minimal varints and map order can all vary), but this message has no maps, prost
//! writes fields in tag order with minimal varints, and it drops nothing it knows. So one
//! manifest has exactly one encoding *as prost writes it*, and [`Manifest::from_canonical_bytes`]
//! enforces it: it decodes, re-encodes and refuses bytes that do not come back identical. That
//! way the bytes a signature covers are the only bytes that can mean this manifest, and a field
//! a reader does not know (which it would silently drop) cannot ride along under a signature.

use std::{collections::HashSet, time::SystemTime};

use llmchain_proto::{
    ApiError, ApiResult,
    model::{self, Digest, ModelRef, TensorInfo},
    pb,
};
use prost::Message;

use crate::{Error, Result};

/// Most tensors a manifest may list.
pub const MAX_TENSORS: usize = 100_000;

/// Transformer hyper-parameters of a Llama-family model (`pb::ArchitectureConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// Architecture family; only `"llama"` is defined.
    pub family: String,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Model width.
    pub hidden_size: u32,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: u32,
    /// Transformer blocks.
    pub num_layers: u32,
    /// Query heads.
    pub num_heads: u32,
    /// Key/value heads; divides `num_heads`.
    pub num_kv_heads: u32,
    /// Rotary base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest trained sequence.
    pub max_position_embeddings: u32,
    /// Whether the output head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// LoRA rank of the adapter tensors; 0 when there are none.
    pub lora_rank: u32,
    /// LoRA alpha.
    pub lora_alpha: f64,
}

impl TryFrom<pb::ArchitectureConfig> for Architecture {
    type Error = ApiError;
    fn try_from(a: pb::ArchitectureConfig) -> ApiResult<Self> {
        if a.family != "llama" {
            return Err(ApiError::invalid(
                "family",
                format!("{:?} is not supported (only \"llama\")", a.family),
            ));
        }
        for (name, v) in [
            ("vocab_size", a.vocab_size),
            ("hidden_size", a.hidden_size),
            ("intermediate_size", a.intermediate_size),
            ("num_layers", a.num_layers),
            ("num_heads", a.num_heads),
            ("num_kv_heads", a.num_kv_heads),
            ("max_position_embeddings", a.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(ApiError::invalid(name, "must be at least 1"));
            }
        }
        if !a.hidden_size.is_multiple_of(a.num_heads) {
            return Err(ApiError::invalid("num_heads", "must divide hidden_size"));
        }
        if !a.num_heads.is_multiple_of(a.num_kv_heads) {
            return Err(ApiError::invalid("num_kv_heads", "must divide num_heads"));
        }
        for (name, v) in [("rope_theta", a.rope_theta), ("rms_norm_eps", a.rms_norm_eps)] {
            if !v.is_finite() || v <= 0.0 {
                return Err(ApiError::invalid(name, "must be a finite, positive number"));
            }
        }
        if !a.lora_alpha.is_finite() || a.lora_alpha < 0.0 {
            return Err(ApiError::invalid("lora_alpha", "must be a finite, non-negative number"));
        }
        Ok(Architecture {
            family: a.family,
            vocab_size: a.vocab_size,
            hidden_size: a.hidden_size,
            intermediate_size: a.intermediate_size,
            num_layers: a.num_layers,
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            rope_theta: a.rope_theta,
            rms_norm_eps: a.rms_norm_eps,
            max_position_embeddings: a.max_position_embeddings,
            tie_word_embeddings: a.tie_word_embeddings,
            lora_rank: a.lora_rank,
            lora_alpha: a.lora_alpha,
        })
    }
}

impl From<Architecture> for pb::ArchitectureConfig {
    fn from(a: Architecture) -> Self {
        pb::ArchitectureConfig {
            family: a.family,
            vocab_size: a.vocab_size,
            hidden_size: a.hidden_size,
            intermediate_size: a.intermediate_size,
            num_layers: a.num_layers,
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            rope_theta: a.rope_theta,
            rms_norm_eps: a.rms_norm_eps,
            max_position_embeddings: a.max_position_embeddings,
            tie_word_embeddings: a.tie_word_embeddings,
            lora_rank: a.lora_rank,
            lora_alpha: a.lora_alpha,
        }
    }
}

/// Where the tokenizer of a version comes from (`pb::TokenizerRef`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerRef {
    /// Tokenizer kind, e.g. `"gguf-bpe"`.
    pub kind: String,
    /// Content address of the tokenizer blob.
    pub digest: Digest,
    /// Size of the tokenizer blob.
    pub size: u64,
}

impl TryFrom<pb::TokenizerRef> for TokenizerRef {
    type Error = ApiError;
    fn try_from(t: pb::TokenizerRef) -> ApiResult<Self> {
        if t.kind.is_empty() || t.kind.len() > 64 {
            return Err(ApiError::invalid("kind", "must be 1-64 characters"));
        }
        Ok(TokenizerRef { kind: t.kind, digest: Digest::parse("digest", &t.digest)?, size: t.size })
    }
}

impl From<TokenizerRef> for pb::TokenizerRef {
    fn from(t: TokenizerRef) -> Self {
        pb::TokenizerRef { kind: t.kind, digest: t.digest.to_string(), size: t.size }
    }
}

/// A named evaluation metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Metric name.
    pub name: String,
    /// Finite value.
    pub value: f64,
}

/// How a version was produced (`pb::TrainingMetadata`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingMetadata {
    /// `"import"`, `"last-layers:N"`, `"lora:R"` or `"full"`.
    pub mode: String,
    /// Digest of the training data set; `None` for an import.
    pub dataset_digest: Option<Digest>,
    /// Held-out metrics, unique names (sorted when encoded).
    pub metrics: Vec<Metric>,
    /// Training records.
    pub records: u64,
    /// Free-form note, at most 4 KiB.
    pub note: String,
}

impl TryFrom<pb::TrainingMetadata> for TrainingMetadata {
    type Error = ApiError;
    fn try_from(t: pb::TrainingMetadata) -> ApiResult<Self> {
        if t.mode.is_empty() || t.mode.len() > 64 {
            return Err(ApiError::invalid("mode", "must be 1-64 characters"));
        }
        let dataset_digest = (!t.dataset_digest.is_empty())
            .then(|| Digest::parse("dataset_digest", &t.dataset_digest))
            .transpose()?;
        if t.metrics.len() > 1024 {
            return Err(ApiError::invalid("metrics", "at most 1024 metrics"));
        }
        let mut seen = HashSet::new();
        let mut metrics = Vec::with_capacity(t.metrics.len());
        for (i, m) in t.metrics.into_iter().enumerate() {
            let field = format!("metrics[{i}]");
            if m.name.is_empty() || m.name.len() > 64 {
                return Err(ApiError::invalid(format!("{field}.name"), "must be 1-64 characters"));
            }
            if !m.value.is_finite() {
                return Err(ApiError::invalid(format!("{field}.value"), "must be finite"));
            }
            if !seen.insert(m.name.clone()) {
                return Err(ApiError::invalid(format!("{field}.name"), format!("{:?} is repeated", m.name)));
            }
            metrics.push(Metric { name: m.name, value: m.value });
        }
        if t.note.len() > 4096 {
            return Err(ApiError::invalid("note", "at most 4 KiB"));
        }
        Ok(TrainingMetadata { mode: t.mode, dataset_digest, metrics, records: t.records, note: t.note })
    }
}

impl From<TrainingMetadata> for pb::TrainingMetadata {
    fn from(t: TrainingMetadata) -> Self {
        let mut metrics: Vec<pb::Metric> =
            t.metrics.into_iter().map(|m| pb::Metric { name: m.name, value: m.value }).collect();
        metrics.sort_by(|a, b| a.name.cmp(&b.name));
        pb::TrainingMetadata {
            mode: t.mode,
            dataset_digest: t.dataset_digest.map(|d| d.to_string()).unwrap_or_default(),
            metrics,
            records: t.records,
            note: t.note,
        }
    }
}

/// One model version: identity, architecture, tokenizer, tensors and training metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Model name and version.
    pub id: ModelRef,
    /// Version this one derives from; 0 for a base import.
    pub parent_version: u64,
    /// Architecture hyper-parameters.
    pub architecture: Architecture,
    /// Tokenizer blob.
    pub tokenizer: TokenizerRef,
    /// Tensors, unique names (sorted when encoded).
    pub tensors: Vec<TensorInfo>,
    /// Training metadata.
    pub training: TrainingMetadata,
    /// When the trainer created the manifest.
    pub created_at: SystemTime,
    /// After this instant the manifest must be refused; `None` never expires.
    pub expires_at: Option<SystemTime>,
}

fn required<P, D>(field: &str, value: Option<P>) -> ApiResult<D>
where
    D: TryFrom<P, Error = ApiError>,
{
    let value = value.ok_or_else(|| ApiError::invalid(field, "is required"))?;
    D::try_from(value).map_err(|e| e.within(field))
}

impl TryFrom<pb::Manifest> for Manifest {
    type Error = ApiError;
    fn try_from(m: pb::Manifest) -> ApiResult<Self> {
        let id: ModelRef = required("id", m.id)?;
        if m.parent_version >= id.version {
            return Err(ApiError::invalid(
                "parent_version",
                format!("{} must be lower than the version ({})", m.parent_version, id.version),
            ));
        }
        let architecture = required("architecture", m.architecture)?;
        let tokenizer = required("tokenizer", m.tokenizer)?;
        if m.tensors.is_empty() || m.tensors.len() > MAX_TENSORS {
            return Err(ApiError::invalid("tensors", format!("must list 1-{MAX_TENSORS} tensors")));
        }
        let mut names = HashSet::with_capacity(m.tensors.len());
        let mut tensors = Vec::with_capacity(m.tensors.len());
        for (i, t) in m.tensors.into_iter().enumerate() {
            let field = format!("tensors[{i}]");
            let t = TensorInfo::try_from(t).map_err(|e| e.within(&field))?;
            if !names.insert(t.name.clone()) {
                return Err(ApiError::invalid(format!("{field}.name"), format!("{:?} is repeated", t.name)));
            }
            tensors.push(t);
        }
        let training = required("training", m.training)?;
        let created_at = model::timestamp(
            "created_at",
            m.created_at.as_ref().ok_or_else(|| ApiError::invalid("created_at", "is required"))?,
        )?;
        let expires_at = m.expires_at.as_ref().map(|t| model::timestamp("expires_at", t)).transpose()?;
        Ok(Manifest {
            id,
            parent_version: m.parent_version,
            architecture,
            tokenizer,
            tensors,
            training,
            created_at,
            expires_at,
        })
    }
}

impl From<Manifest> for pb::Manifest {
    fn from(m: Manifest) -> Self {
        let mut tensors: Vec<pb::TensorInfo> = m.tensors.into_iter().map(Into::into).collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        pb::Manifest {
            id: Some(m.id.into()),
            parent_version: m.parent_version,
            architecture: Some(m.architecture.into()),
            tokenizer: Some(m.tokenizer.into()),
            tensors,
            training: Some(m.training.into()),
            created_at: Some(m.created_at.into()),
            expires_at: m.expires_at.map(Into::into),
        }
    }
}

impl Manifest {
    /// The canonical bytes of this manifest: what a signature covers (see the module docs).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        pb::Manifest::from(self.clone()).encode_to_vec()
    }

    /// Decodes canonical bytes, refusing any other encoding of a manifest.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Self> {
        let wire = pb::Manifest::decode(bytes)?;
        let manifest = Manifest::try_from(wire)?;
        let again = manifest.canonical_bytes();
        if again != bytes {
            let at =
                again.iter().zip(bytes).position(|(a, b)| a != b).unwrap_or(again.len().min(bytes.len()));
            return Err(Error::NotCanonical(format!(
                "re-encoding gives {} bytes that first differ at byte {at} of {} (unsorted tensors or \
                 metrics, unknown fields or a non-minimal encoding)",
                again.len(),
                bytes.len()
            )));
        }
        Ok(manifest)
    }

    /// Sum of the sizes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.size).sum()
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Every blob the version references: its tensors and its tokenizer.
    pub fn blob_digests(&self) -> impl Iterator<Item = Digest> + '_ {
        self.tensors.iter().map(|t| t.digest).chain(std::iter::once(self.tokenizer.digest))
    }

    /// Whether the manifest has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}
