//! How the registry lays out its state in the [`Store`](crate::store::Store).
//!
//! - `models/<name>/versions/<version, 20 digits>`: one [`VersionRecord`] per published
//!   version; zero padding makes key order equal version order.
//! - `model-index/<name>`: an [`IndexRecord`] with the latest version and the version count.
//!   Publishing compares this key's revision, so two coordinators racing to publish the same
//!   model serialise on it and the loser re-checks against the winner's version.
//!
//! Records are JSON so an operator can read them with `etcdctl get`; the signed manifest
//! bytes are kept exactly as received (hex) because the signature covers those bytes.

use std::time::{Duration, SystemTime};

use llmchain_artifact::Manifest;
use llmchain_proto::model::{ModelName, SignedManifest};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Prefix of the per-model index keys.
pub const INDEX_PREFIX: &str = "model-index/";
/// Prefix of every version key.
pub const VERSIONS_PREFIX: &str = "models/";

/// Key of a model's index record.
pub fn index_key(model: &ModelName) -> String {
    format!("{INDEX_PREFIX}{model}")
}

/// Prefix of the version keys of one model.
pub fn versions_prefix(model: &ModelName) -> String {
    format!("{VERSIONS_PREFIX}{model}/versions/")
}

/// Key of one version record.
pub fn version_key(model: &ModelName, version: u64) -> String {
    format!("{}{version:020}", versions_prefix(model))
}

/// The latest version of a model and how many there are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexRecord {
    /// Highest published version.
    pub latest: u64,
    /// Number of published versions.
    pub count: u64,
}

/// One published version as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    /// The manifest bytes exactly as signed, hex.
    pub manifest_hex: String,
    /// The ed25519 signature, hex.
    pub signature_hex: String,
    /// Signing key id.
    pub key_id: String,
    /// When the coordinator accepted it, milliseconds since the Unix epoch.
    pub published_at_ms: u64,
    /// Bytes of all tensors.
    pub total_bytes: u64,
    /// Bytes of tensors not in the parent version.
    pub delta_bytes: u64,
}

/// A published version, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedVersion {
    /// The signed manifest exactly as published.
    pub signed: SignedManifest,
    /// Its decoded content.
    pub manifest: Manifest,
    /// When the coordinator accepted it.
    pub published_at: SystemTime,
    /// Bytes of all tensors.
    pub total_bytes: u64,
    /// Bytes of tensors not in the parent version.
    pub delta_bytes: u64,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store(format!("corrupt registry record {what}: {e}"))
}

impl IndexRecord {
    /// Decodes a stored index record.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))
    }

    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serialising plain integers cannot fail")
    }
}

impl PublishedVersion {
    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        let ms = self.published_at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
        let record = VersionRecord {
            manifest_hex: hex::encode(&self.signed.manifest),
            signature_hex: hex::encode(self.signed.signature),
            key_id: self.signed.key_id.clone(),
            published_at_ms: u64::try_from(ms).unwrap_or(u64::MAX),
            total_bytes: self.total_bytes,
            delta_bytes: self.delta_bytes,
        };
        serde_json::to_vec(&record).expect("serialising strings and integers cannot fail")
    }

    /// Decodes a stored record. The signature was verified at publish time; the manifest is
    /// decoded canonically again so a tampered record cannot pass as a different manifest.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let r: VersionRecord = serde_json::from_slice(bytes).map_err(|e| corrupt(key, e))?;
        let manifest_bytes = hex::decode(&r.manifest_hex).map_err(|e| corrupt(key, e))?;
        let signature: [u8; 64] = hex::decode(&r.signature_hex)
            .map_err(|e| corrupt(key, e))?
            .try_into()
            .map_err(|_| corrupt(key, "signature is not 64 bytes"))?;
        let manifest = Manifest::from_canonical_bytes(&manifest_bytes).map_err(|e| corrupt(key, e))?;
        Ok(PublishedVersion {
            signed: SignedManifest { manifest: manifest_bytes, signature, key_id: r.key_id },
            manifest,
            published_at: SystemTime::UNIX_EPOCH + Duration::from_millis(r.published_at_ms),
            total_bytes: r.total_bytes,
            delta_bytes: r.delta_bytes,
        })
    }
}
