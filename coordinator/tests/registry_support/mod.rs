//! Shared harness of the registry tests: an in-process coordinator serving the registry on
//! 127.0.0.1:0, talked to by the generated tonic client, plus upload/publish/fetch helpers.

#![allow(dead_code)]

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc};

use llmchain_artifact::{Digest, Manifest, SigningKey, TrustedKeys};
use llmchain_coordinator::{
    blobs::{LocalBlobStore, VerifiedBlobs},
    registry::{Registry, RegistryConfig, service},
    store::{Store, embedded::EmbeddedStore},
};
use llmchain_proto::pb::{self, registry_client::RegistryClient};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// The trainer key every harness trusts.
pub fn trainer_key() -> SigningKey {
    SigningKey::from_seed([42; 32])
}

/// One in-process coordinator serving the registry.
pub struct Coordinator {
    pub addr: SocketAddr,
    pub registry: Arc<Registry>,
    pub blobs: Arc<VerifiedBlobs>,
    pub local: Arc<LocalBlobStore>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Coordinator {
    /// Starts a coordinator on `store` and the blob directory `blob_root`.
    pub async fn start(store: Arc<dyn Store>, blob_root: &Path) -> Coordinator {
        let local = Arc::new(LocalBlobStore::open(blob_root).await.unwrap());
        let blobs = Arc::new(VerifiedBlobs::new(local.clone()));
        let config = RegistryConfig::new(TrustedKeys::new([trainer_key().public()]));
        let registry = Arc::new(Registry::new(config, store, blobs.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let svc = service(registry.clone());
        let token = stop.clone();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming(listener), token.cancelled_owned())
                .await
                .unwrap();
        });
        Coordinator { addr, registry, blobs, local, stop, server }
    }

    /// Starts a coordinator on a fresh embedded store inside `dir`.
    pub async fn embedded(dir: &Path) -> Coordinator {
        let store = EmbeddedStore::open(&dir.join("state.redb")).await.unwrap();
        Coordinator::start(Arc::new(store), &dir.join("blobs")).await
    }

    /// A client of this coordinator.
    pub async fn client(&self) -> RegistryClient<Channel> {
        RegistryClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.server.await.unwrap();
    }
}

/// Accepted connections with Nagle's algorithm off: small gRPC frames otherwise wait for
/// the peer's delayed ACK (~40 ms per round trip).
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use futures::TryStreamExt;
    TcpListenerStream::new(listener).and_then(|s| async move {
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// Uploads one blob in chunks of `chunk` bytes.
pub async fn upload(
    client: &mut RegistryClient<Channel>,
    digest: Digest,
    bytes: &[u8],
    chunk: usize,
) -> Result<pb::UploadBlobResponse, tonic::Status> {
    let total_size = bytes.len() as u64;
    let mut msgs: Vec<pb::UploadBlobRequest> = bytes
        .chunks(chunk.max(1))
        .scan(0u64, |offset, c| {
            let m = pb::UploadBlobRequest {
                digest: digest.to_string(),
                total_size,
                offset: *offset,
                data: c.to_vec(),
            };
            *offset += c.len() as u64;
            Some(m)
        })
        .collect();
    if msgs.is_empty() {
        msgs.push(pb::UploadBlobRequest { digest: digest.to_string(), total_size, offset: 0, data: vec![] });
    }
    client.upload_blob(tokio_stream::iter(msgs)).await.map(|r| r.into_inner())
}

/// Uploads every blob of `blobs` that the registry reports missing.
pub async fn upload_missing(
    client: &mut RegistryClient<Channel>,
    blobs: &BTreeMap<Digest, Vec<u8>>,
) -> usize {
    let digests = blobs.keys().map(ToString::to_string).collect();
    let missing =
        client.missing_blobs(pb::MissingBlobsRequest { digests }).await.unwrap().into_inner().missing;
    for d in &missing {
        let digest: Digest = d.parse().unwrap();
        upload(client, digest, &blobs[&digest], 1000).await.unwrap();
    }
    missing.len()
}

/// Publishes `manifest` signed by `key`.
pub async fn publish(
    client: &mut RegistryClient<Channel>,
    manifest: &Manifest,
    key: &SigningKey,
) -> Result<pb::PublishVersionResponse, tonic::Status> {
    let signed = key.sign(manifest);
    publish_signed(client, signed).await
}

/// Publishes an already signed manifest.
pub async fn publish_signed(
    client: &mut RegistryClient<Channel>,
    signed: llmchain_proto::model::SignedManifest,
) -> Result<pb::PublishVersionResponse, tonic::Status> {
    let signed = pb::SignedManifest {
        manifest: signed.manifest,
        signature: signed.signature.to_vec(),
        key_id: signed.key_id,
    };
    client.publish_version(pb::PublishVersionRequest { signed: Some(signed) }).await.map(|r| r.into_inner())
}

/// Fetches `[offset, offset+length)` of a blob (length 0: to the end) in chunks of `chunk`.
pub async fn fetch(
    client: &mut RegistryClient<Channel>,
    digest: Digest,
    offset: u64,
    length: u64,
    chunk: u32,
) -> Result<Vec<u8>, (Vec<u8>, tonic::Status)> {
    let req = pb::FetchBlobRequest { digest: digest.to_string(), offset, length, chunk_size: chunk };
    let mut stream = match client.fetch_blob(req).await {
        Ok(s) => s.into_inner(),
        Err(s) => return Err((Vec::new(), s)),
    };
    let mut out = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                assert_eq!(m.offset, offset + out.len() as u64, "chunks arrive in order without gaps");
                out.extend_from_slice(&m.data);
            }
            Ok(None) => return Ok(out),
            Err(s) => return Err((out, s)),
        }
    }
}
