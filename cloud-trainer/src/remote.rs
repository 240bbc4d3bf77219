//! What the trainer pulls from a coordinator: a published version's verified manifest and
//! blobs (to continue training from the running version), and the hard examples agents
//! reported in their summaries.
//!
//! Blobs land in a local directory laid out as [`BlobDir`]; each is written to a temporary
//! file and renamed into place, and [`llmchain_model::version::load_version`] verifies every
//! digest again when it reads them, so a torn or tampered file is never trained on.

use std::path::Path;

use futures::StreamExt;
use llmchain_artifact::{BlobDir, Manifest, PublicKey, SignedManifest, TrustedKeys};
use llmchain_proto::{ApiError, pb, pb::fleet_client::FleetClient, pb::registry_client::RegistryClient};
use llmchain_runtime::telemetry::{TracedChannel, traced};
use llmchain_runtime::tls::Transport;

use crate::{Error, Result};

/// A channel whose calls carry the caller's trace context.
async fn channel(url: &str, transport: &Transport) -> Result<TracedChannel> {
    let connect = |message: String| Error::Connect { url: url.to_string(), message };
    transport
        .endpoint(url)
        .map_err(|e| connect(e.to_string()))?
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .connect()
        .await
        .map(traced)
        .map_err(|e| connect(e.to_string()))
}

/// Fetches version `version` of `model` (0: the latest) into `blobs`, downloading only the blobs
/// not already there, and returns its manifest after checking its signature against `key`.
pub async fn pull_version(
    url: &str,
    transport: &Transport,
    model: &str,
    version: u64,
    key: &PublicKey,
    blobs: &Path,
) -> Result<Manifest> {
    let mut client = RegistryClient::new(channel(url, transport).await?).max_decoding_message_size(64 << 20);
    let answer = client
        .get_manifest(pb::GetManifestRequest { model: model.to_string(), version })
        .await
        .map_err(ApiError::from)?
        .into_inner();
    let signed = answer.signed.ok_or_else(|| Error::Invalid("coordinator sent no signed manifest".into()))?;
    let signed = SignedManifest::try_from(signed)?;
    let manifest = TrustedKeys::new([*key]).verify(&signed)?;
    let dir = BlobDir(blobs.to_path_buf());
    let mut fetched = 0u64;
    for digest in manifest.blob_digests() {
        let path = dir.path(&digest);
        if path.exists() {
            continue;
        }
        let mut stream = client
            .fetch_blob(pb::FetchBlobRequest {
                digest: digest.to_string(),
                offset: 0,
                length: 0,
                chunk_size: 4 << 20,
            })
            .await
            .map_err(ApiError::from)?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(ApiError::from)?;
            if chunk.offset != bytes.len() as u64 {
                return Err(Error::Invalid(format!(
                    "blob {digest}: chunk at {} after {} bytes",
                    chunk.offset,
                    bytes.len()
                )));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        if llmchain_artifact::digest_bytes(&bytes) != digest {
            return Err(Error::Invalid(format!("blob {digest} arrived with other content")));
        }
        let parent = path.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::Invalid(format!("{}: {e}", parent.display())))?;
        let tmp = path.with_extension("part");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        fetched += bytes.len() as u64;
    }
    tracing::info!(version = %manifest.id, fetched_bytes = fetched, "pulled version");
    Ok(manifest)
}

/// A hard example as the trainer uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct HardExample {
    /// The preprocessed text the agent's model read.
    pub text: String,
    /// What the model decided.
    pub decision: String,
    /// Reporting agent.
    pub agent_id: String,
}

/// The hard examples of the newest `limit` summaries (of `model` when not empty), newest first.
pub async fn hard_examples(
    url: &str,
    transport: &Transport,
    model: &str,
    limit: u32,
) -> Result<Vec<HardExample>> {
    let mut client = FleetClient::new(channel(url, transport).await?).max_decoding_message_size(64 << 20);
    let request = pb::ListSummariesRequest {
        agent_id: String::new(),
        model: (!model.is_empty()).then(|| pb::ModelRef { model: model.to_string(), version: 0 }),
        window: None,
        limit,
    };
    let summaries = client.list_summaries(request).await.map_err(ApiError::from)?.into_inner().summaries;
    Ok(summaries
        .into_iter()
        .flat_map(|s| {
            let agent = s.agent_id;
            s.hard_examples.into_iter().map(move |h| HardExample {
                text: h.text,
                decision: h.decision,
                agent_id: agent.clone(),
            })
        })
        .collect())
}

/// The manifest of a local version directory: `manifest.pb` (canonical bytes, as
/// [`crate::pipeline::save_local`] writes) next to a `blobs/` directory.
pub fn local_version(dir: &Path) -> Result<(Manifest, BlobDir)> {
    let path = dir.join("manifest.pb");
    let bytes =
        std::fs::read(&path).map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
    Ok((Manifest::from_canonical_bytes(&bytes)?, BlobDir(dir.join("blobs"))))
}
