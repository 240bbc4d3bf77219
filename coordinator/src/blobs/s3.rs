//! Blobs in an S3-compatible object store (feature `s3`), so coordinator replicas on
//! Kubernetes share one blob store: `<prefix>/sha256/<2 hex>/<62 hex>`.
//!
//! S3 has no rename, but a multipart upload is invisible until it is completed: an upload is
//! streamed into a multipart upload of the final key while it is hashed, and completed only
//! when size and digest match, else aborted. Concurrent uploads of one blob complete identical
//! objects, so whichever lands last changes nothing.

use std::{ops::Range, sync::Arc, time::SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use llmchain_artifact::{Hasher, chunks};
use llmchain_proto::{ApiError, model::Digest};
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart, aws::AmazonS3Builder, path::Path};
use tracing::{debug, warn};

use super::{BlobInfo, BlobStore, ByteStream, not_found};
use crate::{Error, Result};

/// Part size of multipart uploads (S3's minimum is 5 MiB for every part but the last).
const PART_BYTES: usize = 8 << 20;
/// Parts uploaded concurrently per blob.
const PART_CONCURRENCY: usize = 4;

/// Where an S3-compatible bucket is and how to sign requests to it.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Endpoint URL for non-AWS servers (MinIO, moto, Ceph); `None` means AWS.
    pub endpoint: Option<String>,
    /// Region, e.g. `us-east-1`.
    pub region: String,
    /// Access key id; `None` takes credentials from the environment (`AWS_*`).
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Key prefix inside the bucket, e.g. `llmchain/blobs`.
    pub prefix: String,
}

/// A content-addressed blob store in an S3 bucket.
#[derive(Debug)]
pub struct S3BlobStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    read_ahead: usize,
}

fn unavailable(e: object_store::Error) -> Error {
    ApiError::Unavailable(format!("object store: {e}")).into()
}

impl S3BlobStore {
    /// Connects to the bucket described by `config` (no request is made yet).
    pub fn connect(config: &S3Config) -> Result<Self> {
        // reqwest is built without a bundled crypto provider (to avoid aws-lc's C build); ring
        // serves TLS. An error only means a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&config.bucket).with_region(&config.region);
        if let Some(endpoint) = &config.endpoint {
            // Self-hosted servers are addressed by path and often speak plain HTTP in-cluster.
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b.build().map_err(|e| ApiError::invalid("s3", e.to_string()))?;
        Ok(Self::new(Arc::new(store), &config.prefix))
    }

    /// A blob store over any [`ObjectStore`], with keys under `prefix`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        S3BlobStore { store, prefix: prefix.trim_matches('/').to_string(), read_ahead: 4 }
    }

    fn root(&self) -> String {
        if self.prefix.is_empty() { "sha256".into() } else { format!("{}/sha256", self.prefix) }
    }

    /// The object key of the blob `digest`.
    pub fn key_of(&self, digest: &Digest) -> Path {
        let hex = digest.hex();
        Path::from(format!("{}/{}/{}", self.root(), &hex[..2], &hex[2..]))
    }

    fn info(digest: Digest, meta: &object_store::ObjectMeta) -> BlobInfo {
        BlobInfo { digest, size: meta.size, modified: SystemTime::from(meta.last_modified) }
    }
}

fn upload_mismatch(field: &str, reason: String) -> Error {
    ApiError::invalid(field, reason).into()
}

#[async_trait::async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>> {
        match self.store.head(&self.key_of(digest)).await {
            Ok(meta) => Ok(Some(Self::info(*digest, &meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn put(&self, digest: Digest, size: u64, mut input: ByteStream) -> Result<BlobInfo> {
        let key = self.key_of(&digest);
        let upload = self.store.put_multipart(&key).await.map_err(unavailable)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut hasher = Hasher::new();
        let outcome: Result<()> = async {
            while let Some(chunk) = input.next().await {
                let chunk = chunk?;
                if hasher.len() + chunk.len() as u64 > size {
                    return Err(upload_mismatch(
                        "data",
                        format!("more than total_size ({size}) bytes were sent"),
                    ));
                }
                writer.wait_for_capacity(PART_CONCURRENCY).await.map_err(unavailable)?;
                hasher.update(&chunk);
                writer.write(&chunk);
            }
            if hasher.len() != size {
                return Err(upload_mismatch(
                    "total_size",
                    format!("stream ended after {} of {size} bytes", hasher.len()),
                ));
            }
            Ok(())
        }
        .await;
        let outcome = outcome.and_then(|()| {
            let actual = hasher.finish();
            if actual == digest {
                Ok(())
            } else {
                Err(upload_mismatch("digest", format!("uploaded bytes hash to {actual}, not {digest}")))
            }
        });
        if let Err(e) = outcome {
            // Nothing became visible; aborting frees the parts already stored.
            if let Err(abort) = writer.abort().await {
                warn!(%digest, error = %abort, "could not abort multipart upload");
            }
            return Err(e);
        }
        writer.finish().await.map_err(unavailable)?;
        debug!(%digest, size, "blob stored in object store");
        self.stat(&digest).await?.ok_or_else(|| not_found(&digest))
    }

    async fn read(&self, digest: &Digest, range: Range<u64>, chunk_size: usize) -> Result<ByteStream> {
        if self.stat(digest).await?.is_none() {
            return Err(not_found(digest));
        }
        let key = self.key_of(digest);
        let store = Arc::clone(&self.store);
        let digest = *digest;
        let reads = stream::iter(chunks(range, chunk_size as u64)).map(move |r| {
            let (store, key) = (Arc::clone(&store), key.clone());
            async move {
                let want = r.end - r.start;
                let data: Bytes = store.get_range(&key, r).await.map_err(|e| match e {
                    object_store::Error::NotFound { .. } => not_found(&digest),
                    other => unavailable(other),
                })?;
                if data.len() as u64 != want {
                    return Err(ApiError::DataLoss(format!(
                        "blob {digest} is shorter than its recorded size"
                    ))
                    .into());
                }
                Ok(data)
            }
        });
        Ok(reads.buffered(self.read_ahead).into_stream().boxed())
    }

    async fn list(&self) -> Result<Vec<BlobInfo>> {
        let root = Path::from(self.root());
        let metas: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&root)).try_collect().await.map_err(unavailable)?;
        let mut out: Vec<BlobInfo> = metas
            .iter()
            .filter_map(|m| {
                let parts: Vec<_> = m.location.parts().map(|p| p.as_ref().to_string()).collect();
                let [.., a, b] = parts.as_slice() else { return None };
                let digest = Digest::parse("blob", &format!("sha256:{a}{b}")).ok()?;
                Some(Self::info(digest, m))
            })
            .collect();
        out.sort_by_key(|b| b.digest);
        Ok(out)
    }

    async fn delete(&self, digest: &Digest) -> Result<bool> {
        if self.stat(digest).await?.is_none() {
            return Ok(false);
        }
        self.store.delete(&self.key_of(digest)).await.map_err(unavailable)?;
        Ok(true)
    }
}
