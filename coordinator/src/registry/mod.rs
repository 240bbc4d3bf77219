//! The model registry service: versions, manifests, blob upload and fetch.
//!
//! [`RegistryApi`] is the service as a plain async trait over domain types; [`Registry`]
//! implements it on a [`Store`] (versions) and [`VerifiedBlobs`] (tensor bytes), and
//! [`grpc::RegistryGrpc`] adapts it to the generated tonic trait. Invariants:
//! - a version is visible only after its signature verified against a configured trainer key,
//!   its tensors fit its architecture, and every blob it references is stored with the size
//!   the manifest declares;
//! - versions of a model strictly increase; publishing is one compare-and-swap transaction on
//!   the model's index key, so concurrent coordinators cannot publish the same version twice;
//! - a blob is served only while its bytes hash to its digest (see [`crate::blobs::verify`]).
//!
//! Refusals of `PublishVersion` and their codes: a signature that does not verify or names an
//! untrusted key is `PERMISSION_DENIED` (the trainer may be authenticated, but this manifest is
//! not authorised); a missing blob, an unknown parent, an expired manifest or a version not above
//! the latest is `FAILED_PRECONDITION`; an existing version is `ALREADY_EXISTS`; a size that
//! disagrees with dtype × shape or with the stored blob, and a tensor set that does not fit the
//! architecture, are `INVALID_ARGUMENT`.

pub mod grpc;
pub mod records;
pub mod trust;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::{StreamExt, TryStreamExt, stream};
use llmchain_artifact::{DeltaPlan, Manifest, TrustedKeys, delta_bytes_from, plan_delta};
use llmchain_proto::{
    ApiError,
    model::{BlobRange, DeltaQuery, Digest, MissingBlobsQuery, ModelName, SignedManifest, UploadHeader},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use grpc::{RegistryGrpc, service};
pub use records::PublishedVersion;
use records::{INDEX_PREFIX, IndexRecord, index_key, version_key, versions_prefix};

use crate::{
    Error, Result,
    blobs::{BlobFetch, BlobInfo, ByteStream, VerifiedBlobs},
    metrics::Metrics,
    store::{Compare, Op, Store, Txn},
};

/// How many blob stats run concurrently when checking a manifest or a digest list.
const STAT_CONCURRENCY: usize = 32;
/// Attempts of the publish compare-and-swap before giving up on a contended model.
const PUBLISH_ATTEMPTS: usize = 5;

/// One model and its latest version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSummary {
    /// Model name.
    pub model: ModelName,
    /// Highest published version.
    pub latest_version: u64,
    /// Number of published versions.
    pub version_count: u64,
}

/// The outcome of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadOutcome {
    /// The stored blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// True when the blob was already stored and the upload was discarded.
    pub already_present: bool,
}

/// What garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs deleted.
    pub deleted: Vec<Digest>,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Unreferenced blobs kept because they are younger than the grace period.
    pub kept_recent: usize,
}

/// The registry as a service over domain types.
#[async_trait::async_trait]
pub trait RegistryApi: Send + Sync + 'static {
    /// Every model, sorted by name.
    async fn list_models(&self) -> Result<Vec<ModelSummary>>;
    /// Every version of `model`, oldest first.
    async fn list_versions(&self, model: &ModelName) -> Result<Vec<PublishedVersion>>;
    /// One version, or the latest when `version` is `None`.
    async fn get_manifest(&self, model: &ModelName, version: Option<u64>) -> Result<PublishedVersion>;
    /// The digests of `query` that are not stored, in request order.
    async fn missing_blobs(&self, query: MissingBlobsQuery) -> Result<Vec<Digest>>;
    /// The tensors of a version the caller lacks.
    async fn plan_delta(&self, query: DeltaQuery) -> Result<DeltaPlan>;
    /// Stores one blob from a stream of chunks.
    async fn upload_blob(&self, header: UploadHeader, chunks: ByteStream) -> Result<UploadOutcome>;
    /// Publishes a signed version.
    async fn publish(&self, signed: SignedManifest) -> Result<PublishedVersion>;
    /// Streams a blob range.
    async fn fetch_blob(&self, range: BlobRange) -> Result<BlobFetch>;
    /// Stores a root-signed trust document for agents (relayed, not verified; see [`trust`]).
    async fn publish_trust_document(&self, signed: llmchain_proto::model::SignedStatement) -> Result<u64>;
    /// The latest trust document, if any.
    async fn trust_document(&self) -> Result<Option<llmchain_proto::model::SignedStatement>>;
}

/// Settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Keys whose signatures are accepted on `PublishVersion`; empty refuses every publish.
    pub trusted_keys: TrustedKeys,
    /// Largest blob an upload may declare.
    pub max_blob_bytes: u64,
}

impl RegistryConfig {
    /// A config trusting `keys`, with a 16 GiB blob limit.
    pub fn new(trusted_keys: TrustedKeys) -> Self {
        RegistryConfig { trusted_keys, max_blob_bytes: 16 << 30 }
    }
}

/// The registry on a [`Store`] and a blob store.
pub struct Registry {
    store: Arc<dyn Store>,
    blobs: Arc<VerifiedBlobs>,
    config: RegistryConfig,
    metrics: Arc<Metrics>,
}

fn model_not_found(model: &ModelName) -> Error {
    ApiError::NotFound(format!("model {model}")).into()
}

fn version_not_found(model: &ModelName, version: u64) -> Error {
    ApiError::NotFound(format!("version {version} of model {model}")).into()
}

impl Registry {
    /// A registry over `store` and `blobs`.
    pub fn new(config: RegistryConfig, store: Arc<dyn Store>, blobs: Arc<VerifiedBlobs>) -> Self {
        Registry { store, blobs, config, metrics: Arc::default() }
    }

    /// Counts uploads, publishes and `FetchBlob` bytes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The verified blob store.
    pub fn blobs(&self) -> &Arc<VerifiedBlobs> {
        &self.blobs
    }

    async fn index(&self, model: &ModelName) -> Result<Option<(IndexRecord, i64)>> {
        let key = index_key(model);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((IndexRecord::decode(&key, &kv.value)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    async fn version(&self, model: &ModelName, version: u64) -> Result<Option<PublishedVersion>> {
        let key = version_key(model, version);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some(PublishedVersion::decode(&key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Stats many blobs concurrently, answers in input order.
    async fn stat_all(&self, digests: Vec<Digest>) -> Result<Vec<Option<BlobInfo>>> {
        stream::iter(digests)
            .map(|d| {
                let blobs = Arc::clone(&self.blobs);
                async move { blobs.stat(&d).await }
            })
            .buffered(STAT_CONCURRENCY)
            .try_collect()
            .await
    }

    /// Checks every referenced blob is stored with the declared size; names the first tensor
    /// that fails.
    async fn check_blobs(&self, manifest: &Manifest) -> Result<()> {
        let tokenizer = ("tokenizer".to_string(), manifest.tokenizer.digest, manifest.tokenizer.size);
        let wanted: Vec<(String, Digest, u64)> = manifest
            .tensors
            .iter()
            .map(|t| (format!("tensor {:?}", t.name), t.digest, t.size))
            .chain(std::iter::once(tokenizer))
            .collect();
        let stats = self.stat_all(wanted.iter().map(|(_, d, _)| *d).collect()).await?;
        for ((what, digest, size), stat) in wanted.iter().zip(stats) {
            match stat {
                None => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "{what}: blob {digest} is missing; upload it before publishing"
                    ))
                    .into());
                }
                Some(info) if info.size != *size => {
                    return Err(ApiError::invalid(
                        "signed.manifest.tensors",
                        format!(
                            "{what}: stored blob {digest} holds {} bytes, the manifest declares {size}",
                            info.size
                        ),
                    )
                    .into());
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Every blob digest some published version references.
    pub async fn referenced_blobs(&self) -> Result<HashSet<Digest>> {
        let listing = self.store.list(records::VERSIONS_PREFIX).await?;
        let mut out = HashSet::new();
        for kv in listing.kvs {
            let v = PublishedVersion::decode(&kv.key, &kv.value)?;
            out.extend(v.manifest.blob_digests());
        }
        Ok(out)
    }

    /// Deletes blobs no version references and that are older than `grace`.
    ///
    /// The grace period protects blobs uploaded for a version that is not published yet: an
    /// uploader publishes within minutes, so a grace of hours never races with it.
    pub async fn collect_garbage(&self, grace: Duration) -> Result<GcReport> {
        let referenced = self.referenced_blobs().await?;
        let now = SystemTime::now();
        let mut report = GcReport::default();
        for blob in self.blobs.store().list().await? {
            if referenced.contains(&blob.digest) {
                continue;
            }
            let age = now.duration_since(blob.modified).unwrap_or_default();
            if age < grace {
                report.kept_recent += 1;
                continue;
            }
            if self.blobs.store().delete(&blob.digest).await? {
                info!(digest = %blob.digest, size = blob.size, "garbage-collected unreferenced blob");
                report.bytes_freed += blob.size;
                report.deleted.push(blob.digest);
            }
        }
        Ok(report)
    }

    /// Runs [`Registry::collect_garbage`] every `every` until `cancel` fires.
    pub fn spawn_gc(
        self: Arc<Self>,
        every: Duration,
        grace: Duration,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                match self.collect_garbage(grace).await {
                    Ok(r) => info!(deleted = r.deleted.len(), bytes_freed = r.bytes_freed, "blob gc done"),
                    Err(e) => warn!(error = %e, "blob gc failed"),
                }
            }
        })
    }
}

fn verify_error(e: llmchain_artifact::Error) -> Error {
    use llmchain_artifact::Error as A;
    match e {
        A::UnknownKey(_) | A::BadSignature(_) => ApiError::PermissionDenied(format!(
            "manifest signature refused: {e}; publish with a configured trainer key"
        ))
        .into(),
        A::Invalid(api) => api.within("signed.manifest").into(),
        other => ApiError::invalid("signed.manifest", other.to_string()).into(),
    }
}

#[async_trait::async_trait]
impl RegistryApi for Registry {
    async fn list_models(&self) -> Result<Vec<ModelSummary>> {
        let listing = self.store.list(INDEX_PREFIX).await?;
        listing
            .kvs
            .into_iter()
            .map(|kv| {
                let name = kv.key.strip_prefix(INDEX_PREFIX).unwrap_or(&kv.key);
                let model = ModelName::parse("model", name)
                    .map_err(|e| Error::Store(format!("corrupt registry key {}: {e}", kv.key)))?;
                let index = IndexRecord::decode(&kv.key, &kv.value)?;
                Ok(ModelSummary { model, latest_version: index.latest, version_count: index.count })
            })
            .collect()
    }

    async fn list_versions(&self, model: &ModelName) -> Result<Vec<PublishedVersion>> {
        let listing = self.store.list(&versions_prefix(model)).await?;
        if listing.kvs.is_empty() {
            return Err(model_not_found(model));
        }
        listing.kvs.iter().map(|kv| PublishedVersion::decode(&kv.key, &kv.value)).collect()
    }

    async fn get_manifest(&self, model: &ModelName, version: Option<u64>) -> Result<PublishedVersion> {
        let version = match version {
            Some(v) => v,
            None => self.index(model).await?.ok_or_else(|| model_not_found(model))?.0.latest,
        };
        self.version(model, version).await?.ok_or_else(|| version_not_found(model, version))
    }

    async fn missing_blobs(&self, query: MissingBlobsQuery) -> Result<Vec<Digest>> {
        let stats = self.stat_all(query.digests.clone()).await?;
        Ok(query.digests.iter().zip(stats).filter(|(_, s)| s.is_none()).map(|(d, _)| *d).collect())
    }

    async fn plan_delta(&self, query: DeltaQuery) -> Result<DeltaPlan> {
        let target = self.get_manifest(&query.target.model, Some(query.target.version)).await?;
        let have: HashSet<Digest> = query.have.into_iter().collect();
        Ok(plan_delta(&target.manifest, &have))
    }

    #[tracing::instrument(name = "upload", skip_all, fields(digest = %header.digest, size = header.total_size))]
    async fn upload_blob(&self, header: UploadHeader, chunks: ByteStream) -> Result<UploadOutcome> {
        if header.total_size > self.config.max_blob_bytes {
            return Err(ApiError::invalid(
                "total_size",
                format!(
                    "{} bytes exceeds the limit of {} bytes",
                    header.total_size, self.config.max_blob_bytes
                ),
            )
            .into());
        }
        if let Some(info) = self.blobs.stat(&header.digest).await?
            && info.size == header.total_size
        {
            return Ok(UploadOutcome { digest: header.digest, size: info.size, already_present: true });
        }
        let info = self.blobs.put(header.digest, header.total_size, chunks).await?;
        self.metrics.blob_uploaded(info.size);
        info!(digest = %info.digest, size = info.size, "blob uploaded");
        Ok(UploadOutcome { digest: info.digest, size: info.size, already_present: false })
    }

    #[tracing::instrument(
        name = "publish",
        skip_all,
        fields(key_id = %signed.key_id, model = tracing::field::Empty, version = tracing::field::Empty)
    )]
    async fn publish(&self, signed: SignedManifest) -> Result<PublishedVersion> {
        if self.config.trusted_keys.is_empty() {
            return Err(ApiError::PermissionDenied("no trainer public key is configured".into()).into());
        }
        let manifest = self.config.trusted_keys.verify(&signed).map_err(|e| {
            warn!(key_id = %signed.key_id, error = %e, "publish refused: manifest not verified");
            verify_error(e)
        })?;
        let id = manifest.id.clone();
        tracing::Span::current()
            .record("model", tracing::field::display(&id.model))
            .record("version", id.version);
        let now = SystemTime::now();
        if manifest.is_expired(now) {
            return Err(ApiError::FailedPrecondition(format!("manifest of {id} has already expired")).into());
        }
        manifest.architecture.check_tensors(&manifest.tensors).map_err(|e| e.within("signed.manifest"))?;
        self.check_blobs(&manifest).await?;
        let delta_bytes = match manifest.parent_version {
            0 => manifest.total_bytes(),
            p => {
                let parent = self.version(&id.model, p).await?.ok_or_else(|| {
                    ApiError::FailedPrecondition(format!(
                        "parent version {p} of model {} is not published",
                        id.model
                    ))
                })?;
                delta_bytes_from(&manifest, &parent.manifest)
            }
        };
        let published = PublishedVersion {
            total_bytes: manifest.total_bytes(),
            delta_bytes,
            signed,
            manifest,
            published_at: now,
        };
        let idx_key = index_key(&id.model);
        let ver_key = version_key(&id.model, id.version);
        let record = published.encode();
        for _ in 0..PUBLISH_ATTEMPTS {
            let current = self.index(&id.model).await?;
            let (index, revision) = current.unwrap_or_default();
            if self.store.get(&ver_key).await?.is_some() {
                return Err(
                    ApiError::AlreadyExists(format!("version {} of model {}", id.version, id.model)).into()
                );
            }
            if id.version <= index.latest {
                return Err(ApiError::FailedPrecondition(format!(
                    "version {} of model {} is not greater than the latest version {}",
                    id.version, id.model, index.latest
                ))
                .into());
            }
            let next = IndexRecord { latest: id.version, count: index.count + 1 };
            let txn = Txn::new()
                .when([Compare::ModRevision(idx_key.clone(), revision), Compare::absent(ver_key.clone())])
                .and_then([
                    Op::put(idx_key.clone(), next.encode()),
                    Op::put(ver_key.clone(), record.clone()),
                ]);
            if self.store.txn(txn).await?.succeeded {
                self.metrics.version_published(id.model.as_str());
                info!(
                    model = %id.model,
                    version = id.version,
                    key_id = %published.signed.key_id,
                    total_bytes = published.total_bytes,
                    delta_bytes = published.delta_bytes,
                    "version published"
                );
                return Ok(published);
            }
        }
        error!(model = %id.model, version = id.version, "publish lost every compare-and-swap race");
        Err(ApiError::Unavailable(format!("model {} is being published concurrently; retry", id.model))
            .into())
    }

    async fn publish_trust_document(&self, signed: llmchain_proto::model::SignedStatement) -> Result<u64> {
        trust::publish(self.store.as_ref(), signed).await
    }

    async fn trust_document(&self) -> Result<Option<llmchain_proto::model::SignedStatement>> {
        trust::latest(self.store.as_ref()).await
    }

    #[tracing::instrument(name = "fetch", skip_all, fields(digest = %range.digest, offset = range.offset))]
    async fn fetch_blob(&self, range: BlobRange) -> Result<BlobFetch> {
        let fetch = self.blobs.fetch(range).await?;
        self.metrics.fetch_blob_request();
        let metrics = Arc::clone(&self.metrics);
        let chunks = fetch.chunks.inspect_ok(move |c| metrics.fetch_blob_bytes(c.data.len() as u64)).boxed();
        Ok(BlobFetch { chunks, ..fetch })
    }
}
