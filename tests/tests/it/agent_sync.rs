//! The agent's sync layer against a real in-process coordinator: delta downloads, resume
//! after cut connections and restarts, corruption in flight, untrusted manifests, and cache
//! garbage collection. Models are small synthetic Llamas (a few MiB), so the suite is fast.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use llmchain_artifact::{
    Architecture, Digest, Manifest, SigningKey, TrustedKeys, assemble_safetensors, testing::synthetic_version,
};
use llmchain_coordinator::{
    blobs::{LocalBlobStore, VerifiedBlobs},
    registry::{Registry, RegistryConfig, service},
    server::{Limits, ServiceSet, serve},
    store::embedded::EmbeddedStore,
};
use llmchain_edge_agent::sync::{BlobCache, Refusal, SyncError, Syncer, SyncerConfig};
use llmchain_proto::{
    model::ModelRef,
    pb::{self, registry_client::RegistryClient},
};
use llmchain_tests::proxy::{Cuts, FaultProxy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Blobs = BTreeMap<Digest, Vec<u8>>;

const MODEL: &str = "tiny";

fn trainer() -> SigningKey {
    SigningKey::from_seed([7; 32])
}

/// A Llama small enough to be quick and large enough that the embedding (1 MiB) spans many
/// 64 KiB chunks: about 3.3 MiB in all.
fn arch() -> Architecture {
    Architecture {
        family: "llama".into(),
        vocab_size: 2048,
        hidden_size: 128,
        intermediate_size: 256,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        lora_rank: 0,
        lora_alpha: 0.0,
    }
}

/// Version `v` of the test model: layer `l`'s tensors get seed `seeds[l]`, the rest seed 0.
fn version(model: &str, v: u64, seeds: [u64; 4]) -> (Manifest, Blobs) {
    synthetic_version(model, v, v - 1, &arch(), move |name| {
        (0..4).find(|l| name.starts_with(&format!("model.layers.{l}."))).map_or(0, |l| seeds[l])
    })
}

fn id(model: &str, version: u64) -> ModelRef {
    ModelRef { model: model.parse().unwrap(), version }
}

fn config(concurrency: usize) -> SyncerConfig {
    SyncerConfig {
        trusted_keys: TrustedKeys::new([trainer().public()]),
        chunk_size: 64 << 10,
        concurrency,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        idle_timeout: Duration::from_secs(5),
        ..SyncerConfig::default()
    }
}

/// An in-process coordinator (the real server stack) trusting `keys`.
struct Coordinator {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Coordinator {
    async fn start(dir: &Path, keys: TrustedKeys) -> Coordinator {
        let store = Arc::new(EmbeddedStore::open(&dir.join("state.redb")).await.unwrap());
        let local = Arc::new(LocalBlobStore::open(dir.join("blobs")).await.unwrap());
        let registry =
            Arc::new(Registry::new(RegistryConfig::new(keys), store, Arc::new(VerifiedBlobs::new(local))));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut services = ServiceSet::default();
        services.add(service(registry));
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, services, Limits::default(), stop.clone()));
        Coordinator { addr, stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Uploads the blobs the registry lacks and publishes `manifest` signed by `key`.
    async fn publish(&self, manifest: &Manifest, blobs: &Blobs, key: &SigningKey) {
        let mut client = RegistryClient::connect(self.url()).await.unwrap();
        let digests = blobs.keys().map(ToString::to_string).collect();
        let missing =
            client.missing_blobs(pb::MissingBlobsRequest { digests }).await.unwrap().into_inner().missing;
        for d in missing {
            let bytes = &blobs[&d.parse::<Digest>().unwrap()];
            let total_size = bytes.len() as u64;
            let msgs: Vec<_> = bytes
                .chunks(1 << 20)
                .enumerate()
                .map(|(i, c)| pb::UploadBlobRequest {
                    digest: d.clone(),
                    total_size,
                    offset: (i << 20) as u64,
                    data: c.to_vec(),
                })
                .collect();
            client.upload_blob(tokio_stream::iter(msgs)).await.unwrap();
        }
        let signed = key.sign(manifest);
        let signed = pb::SignedManifest {
            manifest: signed.manifest,
            signature: signed.signature.to_vec(),
            key_id: signed.key_id,
        };
        client.publish_version(pb::PublishVersionRequest { signed: Some(signed) }).await.unwrap();
    }
}

fn syncer(url: &str, cache_dir: &Path, config: SyncerConfig) -> Syncer {
    let cache = BlobCache::open(cache_dir).unwrap();
    Syncer::connect_lazy(url, cache, config).unwrap()
}

fn size_of(blobs: &Blobs) -> u64 {
    blobs.values().map(|b| b.len() as u64).sum()
}

/// Every blob of `blobs` is in the cache with exactly these bytes.
fn assert_cached(cache: &BlobCache, blobs: &Blobs) {
    for (d, bytes) in blobs {
        let got = std::fs::read(cache.blob_dir().path(d)).unwrap_or_else(|e| panic!("blob {d}: {e}"));
        assert!(got == *bytes, "cached blob {d} differs from the published bytes");
    }
}

/// Bytes of the blobs of `new` that `old` lacks.
fn changed(old: &Blobs, new: &Blobs) -> u64 {
    new.iter().filter(|(d, _)| !old.contains_key(d)).map(|(_, b)| b.len() as u64).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_version_transfers_only_the_changed_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path(), TrustedKeys::new([trainer().public()])).await;
    let (m1, b1) = version(MODEL, 1, [0; 4]);
    let (m2, b2) = version(MODEL, 2, [0, 0, 2, 2]);
    coordinator.publish(&m1, &b1, &trainer()).await;
    coordinator.publish(&m2, &b2, &trainer()).await;

    let syncer = syncer(&coordinator.url(), &dir.path().join("cache"), config(4));
    let v1 = syncer.fetch_version(&id(MODEL, 1)).await.unwrap();
    assert_eq!(v1.manifest, m1);
    assert_eq!((v1.downloaded_bytes, v1.reused_bytes), (size_of(&b1), 0));
    assert_eq!(syncer.metrics().received_bytes, size_of(&b1));
    assert_cached(syncer.cache(), &b1);
    let p = syncer.progress().unwrap();
    assert_eq!((p.target, p.done_bytes, p.total_bytes), (id(MODEL, 1), size_of(&b1), size_of(&b1)));

    let delta = changed(&b1, &b2);
    // Two of four layers: 2 × 9 tensors, well under half the bytes (the embedding is shared).
    assert!(delta > 0 && delta < size_of(&b2) / 2, "delta {delta}");
    let v2 = syncer.fetch_version(&id(MODEL, 2)).await.unwrap();
    assert_eq!(syncer.metrics().received_bytes - size_of(&b1), delta, "only the changed tensors travel");
    assert_eq!((v2.downloaded_bytes, v2.reused_bytes), (delta, size_of(&b2) - delta));
    assert_cached(syncer.cache(), &b2);
    assert_eq!(syncer.cache().versions().unwrap(), vec![id(MODEL, 1), id(MODEL, 2)]);

    // The cached version assembles into a safetensors file, every blob verified again.
    let mut out = Vec::new();
    assemble_safetensors(&v2.manifest, &v2.blobs, &mut out).unwrap();
    // And it loads back after a restart, re-verified.
    let keys = TrustedKeys::new([trainer().public()]);
    let reopened = BlobCache::open(dir.path().join("cache")).unwrap();
    assert_eq!(reopened.load_version(&id(MODEL, 2), &keys).unwrap().manifest, m2);
    let m = syncer.metrics();
    assert_eq!((m.resumes, m.corrupt_blobs, m.retries), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_resume_after_cut_connections() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path(), TrustedKeys::new([trainer().public()])).await;
    let (m1, b1) = version(MODEL, 1, [0; 4]);
    coordinator.publish(&m1, &b1, &trainer()).await;
    let proxy = FaultProxy::start(coordinator.addr).await.unwrap();
    // Every connection dies after 200 KiB, four times: all inside the 1 MiB embedding.
    proxy.cut_after(200 << 10, Cuts::Times(4));

    let syncer = syncer(&proxy.url(), &dir.path().join("cache"), config(1));
    syncer.fetch_version(&id(MODEL, 1)).await.unwrap();
    assert_eq!(proxy.stats().cuts, 4);
    let m = syncer.metrics();
    assert_eq!(m.resumes, 4, "{m:?}");
    // Resuming never asks for a byte twice.
    assert_eq!(m.received_bytes, size_of(&b1), "{m:?}");
    assert_eq!(m.corrupt_blobs, 0);
    assert_cached(syncer.cache(), &b1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_flight_is_rejected_and_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path(), TrustedKeys::new([trainer().public()])).await;
    let (m1, b1) = version(MODEL, 1, [0; 4]);
    coordinator.publish(&m1, &b1, &trainer()).await;
    let proxy = FaultProxy::start(coordinator.addr).await.unwrap();
    // The manifest takes a few KiB; 300 KB in is the middle of the embedding's bytes.
    proxy.flip_byte_at(300_000);

    let syncer = syncer(&proxy.url(), &dir.path().join("cache"), config(1));
    syncer.fetch_version(&id(MODEL, 1)).await.unwrap();
    assert_eq!(proxy.stats().flips, 1);
    let m = syncer.metrics();
    assert_eq!(m.corrupt_blobs, 1, "{m:?}");
    let embedding = m1.tensor("model.embed_tokens.weight").unwrap().size;
    assert_eq!(m.received_bytes, size_of(&b1) + embedding, "the corrupt blob was fetched again in full");
    assert_cached(syncer.cache(), &b1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_signed_by_another_key_is_refused_and_nothing_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let rogue = SigningKey::from_seed([9; 32]);
    // The coordinator accepts both keys; the agent pins only the trainer's.
    let coordinator =
        Coordinator::start(dir.path(), TrustedKeys::new([trainer().public(), rogue.public()])).await;
    let (m1, b1) = version(MODEL, 1, [0; 4]);
    coordinator.publish(&m1, &b1, &rogue).await;

    let cache_dir = dir.path().join("cache");
    let syncer = syncer(&coordinator.url(), &cache_dir, config(4));
    let err = syncer.fetch_version(&id(MODEL, 1)).await.unwrap_err();
    let expected = rogue.public().key_id();
    assert!(
        matches!(err, SyncError::Refused(Refusal::UntrustedKey { ref key_id, .. }) if *key_id == expected),
        "{err}"
    );
    assert!(err.is_refused());
    assert!(err.to_string().contains("not a trusted key"), "{err}");
    assert_eq!(syncer.metrics().received_bytes, 0);
    assert!(syncer.cache().versions().unwrap().is_empty());
    for sub in ["blobs/sha256", "partial", "versions"] {
        assert_eq!(std::fs::read_dir(cache_dir.join(sub)).unwrap().count(), 0, "{sub} is empty");
    }
    // Asking for a version that does not exist is a fetch error, not a refusal.
    let err = syncer.fetch_version(&id(MODEL, 5)).await.unwrap_err();
    assert!(matches!(err, SyncError::NotFound { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_syncer_resumes_from_the_part_file() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path(), TrustedKeys::new([trainer().public()])).await;
    let (m1, b1) = version(MODEL, 1, [0; 4]);
    coordinator.publish(&m1, &b1, &trainer()).await;
    let cache_dir = dir.path().join("cache");

    // A slow first run (512 KiB/s), killed a few hundred KiB into the embedding.
    let slow = Arc::new(syncer(
        &coordinator.url(),
        &cache_dir,
        SyncerConfig { max_rate: Some(512 << 10), ..config(1) },
    ));
    let mut progress = slow.watch_progress();
    let run = tokio::spawn({
        let slow = slow.clone();
        async move { slow.fetch_version(&id(MODEL, 1)).await }
    });
    // The guard `wait_for` returns is dropped at once: holding it would block the sender.
    let reached = tokio::time::timeout(
        Duration::from_secs(10),
        progress.wait_for(|p| p.as_ref().is_some_and(|p| p.done_bytes >= 300 << 10)),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(reached, "the first run made no progress");
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    drop(slow);
    let embedding = m1.tensor("model.embed_tokens.weight").unwrap();
    let part = BlobCache::open(&cache_dir).unwrap().part_len(&embedding.digest);
    assert!(part >= 300 << 10 && part < embedding.size, "part file holds {part} bytes");

    // The second run picks the part up (re-hashing it) and fetches only the rest.
    let again = syncer(&coordinator.url(), &cache_dir, config(1));
    let v1 = again.fetch_version(&id(MODEL, 1)).await.unwrap();
    let m = again.metrics();
    assert_eq!(m.resumes, 1, "{m:?}");
    assert_eq!(m.received_bytes, size_of(&b1) - part, "{m:?}");
    assert_eq!(v1.downloaded_bytes, size_of(&b1));
    assert_cached(again.cache(), &b1);
    assert_eq!(again.cache().part_len(&embedding.digest), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_part_file_is_detected_and_refetched() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path(), TrustedKeys::new([trainer().public()])).await;
    let (m1, b1) = version(MODEL, 1, [0; 4]);
    coordinator.publish(&m1, &b1, &trainer()).await;
    let cache_dir = dir.path().join("cache");

    // A part file left by a crash, with one byte rotten on disk.
    let embedding = m1.tensor("model.embed_tokens.weight").unwrap();
    let mut part = b1[&embedding.digest][..300_000].to_vec();
    part[1234] ^= 0x01;
    let cache = BlobCache::open(&cache_dir).unwrap();
    std::fs::write(cache.part_path(&embedding.digest), &part).unwrap();

    let syncer = syncer(&coordinator.url(), &cache_dir, config(1));
    syncer.fetch_version(&id(MODEL, 1)).await.unwrap();
    let m = syncer.metrics();
    assert_eq!((m.resumes, m.corrupt_blobs), (1, 1), "{m:?}");
    // The rest of the part, then the whole blob again.
    assert_eq!(m.received_bytes, size_of(&b1) - part.len() as u64 + embedding.size, "{m:?}");
    assert_cached(syncer.cache(), &b1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_keeps_the_newest_versions_and_pinned_ones() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path(), TrustedKeys::new([trainer().public()])).await;
    let versions =
        [version(MODEL, 1, [0; 4]), version(MODEL, 2, [0, 0, 2, 2]), version(MODEL, 3, [0, 0, 0, 3])];
    for (m, b) in &versions {
        coordinator.publish(m, b, &trainer()).await;
    }
    let syncer = syncer(&coordinator.url(), &dir.path().join("cache"), config(4));
    for v in 1..=3 {
        syncer.fetch_version(&id(MODEL, v)).await.unwrap();
    }
    let cache = syncer.cache();
    let [(_, b1), (_, b2), (_, b3)] = &versions;
    let keys = TrustedKeys::new([trainer().public()]);

    // Keep the newest one, plus v1 (say, the running version).
    let report = cache.gc(1, &[id(MODEL, 1)]).unwrap();
    assert_eq!(report.versions_deleted, vec![id(MODEL, 2)]);
    assert_eq!(cache.versions().unwrap(), vec![id(MODEL, 1), id(MODEL, 3)]);
    let only_v2: HashSet<_> = b2.keys().filter(|d| !b1.contains_key(d) && !b3.contains_key(d)).collect();
    assert!(!only_v2.is_empty());
    assert_eq!(report.blobs_deleted, only_v2.len());
    assert_eq!(report.bytes_freed, only_v2.iter().map(|d| b2[*d].len() as u64).sum::<u64>());
    assert!(only_v2.iter().all(|d| !cache.has(d)));
    assert_cached(cache, b1);
    assert_cached(cache, b3);
    assert!(cache.load_version(&id(MODEL, 1), &keys).is_ok());
    assert!(cache.load_version(&id(MODEL, 3), &keys).is_ok());

    // Unpinned, v1 goes too, with the blobs v3 does not share.
    let report = cache.gc(1, &[]).unwrap();
    assert_eq!(report.versions_deleted, vec![id(MODEL, 1)]);
    assert_eq!(cache.versions().unwrap(), vec![id(MODEL, 3)]);
    assert!(b1.keys().filter(|d| !b3.contains_key(d)).all(|d| !cache.has(d)));
    assert_cached(cache, b3);

    // Fetching v2 again needs only what gc removed.
    let before = syncer.metrics().received_bytes;
    syncer.fetch_version(&id(MODEL, 2)).await.unwrap();
    assert_eq!(syncer.metrics().received_bytes - before, changed(b3, b2));
}
