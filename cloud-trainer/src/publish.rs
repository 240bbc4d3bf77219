//! Publishing a version to a coordinator's registry over gRPC.
//!
//! Order matters for crash safety: blobs first (each verified by the coordinator against its
//! digest before it is stored), the signed manifest last, so a version becomes visible only
//! when every byte it references is there. An interrupted publish is simply run again:
//! `MissingBlobs` skips what already arrived.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use llmchain_artifact::{Digest, ModelRef, SignedManifest};
use llmchain_proto::{ApiError, pb, pb::registry_client::RegistryClient};
use llmchain_runtime::telemetry::{TracedChannel, traced};
use llmchain_runtime::tls::Transport;

use crate::{Error, Result};

/// Default lifetime of a signed manifest (`--manifest-ttl`): agents refuse it afterwards, so a
/// coordinator cannot keep an old version alive forever by serving it.
pub const DEFAULT_MANIFEST_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// Signs `manifest` with its expiry set `ttl` after its creation.
pub fn sign_with_expiry(
    key: &llmchain_artifact::SigningKey,
    manifest: &llmchain_artifact::Manifest,
    ttl: std::time::Duration,
) -> SignedManifest {
    let mut manifest = manifest.clone();
    manifest.expires_at = Some(manifest.created_at + ttl);
    key.sign(&manifest)
}

/// Parses a manifest lifetime: `30d`, `12h`, `90m`, `3600s` (a bare number is seconds).
pub fn parse_ttl(s: &str) -> std::result::Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split].parse().map_err(|_| format!("{s:?} is not a number with s, m, h or d"))?;
    let secs = match &t[split..] {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => return Err(format!("unit {other:?} is not s, m, h or d")),
    };
    if secs == 0 {
        return Err("must be positive".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// Bytes per upload message.
const CHUNK_BYTES: usize = 1 << 20;

/// What a publish moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReport {
    /// The published version.
    pub version: u64,
    /// Bytes of the whole version.
    pub total_bytes: u64,
    /// Bytes of the tensors not shared with the parent version.
    pub delta_bytes: u64,
    /// Bytes uploaded by this call (blobs the coordinator lacked).
    pub uploaded_bytes: u64,
    /// Blobs uploaded by this call.
    pub uploaded_blobs: usize,
}

/// A registry client for the trainer.
pub struct Publisher {
    client: RegistryClient<TracedChannel>,
}

impl Publisher {
    /// Connects to the coordinator at `url` (e.g. `http://127.0.0.1:7400`).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &Transport::Insecure).await
    }

    /// Connects to the coordinator at `url` over `transport` (mutual TLS or `--insecure`).
    pub async fn connect_with(url: &str, transport: &Transport) -> Result<Self> {
        let connect = |message: String| Error::Connect { url: url.to_string(), message };
        let channel = transport
            .endpoint(url)
            .map_err(|e| connect(e.to_string()))?
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(16 << 20)
            .connect()
            .await
            .map_err(|e| connect(e.to_string()))?;
        // Every call carries the caller's trace context: the coordinator's spans join the publish.
        let client = RegistryClient::new(traced(channel)).max_decoding_message_size(64 << 20);
        Ok(Publisher { client })
    }

    /// The latest published version of `model`, or `None` when it has none.
    pub async fn latest_version(&mut self, model: &str) -> Result<Option<u64>> {
        let models = self.client.list_models(pb::ListModelsRequest {}).await.map_err(ApiError::from)?;
        Ok(models.into_inner().models.into_iter().find(|m| m.model == model).map(|m| m.latest_version))
    }

    /// Uploads the blobs the coordinator lacks, then publishes `signed`.
    #[tracing::instrument(name = "publish", skip_all, fields(%id, blobs = blobs.len()))]
    pub async fn publish(
        &mut self,
        blobs: &BTreeMap<Digest, Vec<u8>>,
        signed: &SignedManifest,
        id: &ModelRef,
    ) -> Result<PublishReport> {
        let digests: Vec<String> = blobs.keys().map(Digest::to_string).collect();
        let missing = self
            .client
            .missing_blobs(pb::MissingBlobsRequest { digests })
            .await
            .map_err(ApiError::from)?
            .into_inner()
            .missing;
        let mut todo = Vec::with_capacity(missing.len());
        for d in &missing {
            let digest = Digest::parse("missing", d)?;
            let bytes = blobs
                .get(&digest)
                .ok_or_else(|| Error::Invalid(format!("coordinator asked for unknown blob {d}")))?;
            todo.push((digest, bytes));
        }
        let uploaded_bytes: u64 = todo.iter().map(|(_, b)| b.len() as u64).sum();
        let bar = ProgressBar::new(uploaded_bytes).with_style(
            ProgressStyle::with_template(
                "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        tracing::info!(model = %id, blobs = todo.len(), bytes = uploaded_bytes, "uploading missing blobs");
        for (digest, bytes) in &todo {
            self.upload(digest, bytes).await?;
            bar.inc(bytes.len() as u64);
        }
        bar.finish_and_clear();
        let answer = self
            .client
            .publish_version(pb::PublishVersionRequest {
                signed: Some(pb::SignedManifest {
                    manifest: signed.manifest.clone(),
                    signature: signed.signature.to_vec(),
                    key_id: signed.key_id.clone(),
                }),
            })
            .await
            .map_err(ApiError::from)?
            .into_inner();
        Ok(PublishReport {
            version: answer.id.map(|m| m.version).unwrap_or(id.version),
            total_bytes: answer.total_bytes,
            delta_bytes: answer.delta_bytes,
            uploaded_bytes,
            uploaded_blobs: todo.len(),
        })
    }

    #[tracing::instrument(name = "upload", skip(self, bytes), fields(%digest, size = bytes.len()))]
    async fn upload(&mut self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let total_size = bytes.len() as u64;
        let digest_str = digest.to_string();
        // Chunks borrow nothing across the await: each message owns its slice copy.
        let mut messages = Vec::with_capacity(bytes.len().div_ceil(CHUNK_BYTES).max(1));
        let mut offset = 0usize;
        loop {
            let end = (offset + CHUNK_BYTES).min(bytes.len());
            messages.push(pb::UploadBlobRequest {
                digest: if offset == 0 { digest_str.clone() } else { String::new() },
                total_size,
                offset: offset as u64,
                data: bytes[offset..end].to_vec(),
            });
            offset = end;
            if offset >= bytes.len() {
                break;
            }
        }
        self.client.upload_blob(futures::stream::iter(messages)).await.map_err(ApiError::from)?;
        Ok(())
    }
}
