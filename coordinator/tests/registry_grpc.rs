//! The registry over gRPC: publish, fetch and reassemble, resume, corruption, every refusal,
//! deltas, uploads and garbage collection, against an in-process server and the real client.

mod registry_support;

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use llmchain_artifact::{
    BlobSource, Digest, Manifest, SigningKey, assemble_safetensors, digest_bytes,
    testing::{synthetic_bytes, synthetic_version, tiny_llama},
};
use llmchain_coordinator::registry::RegistryApi;
use llmchain_proto::pb;
use registry_support::{Coordinator, fetch, publish, publish_signed, trainer_key, upload, upload_missing};
use tonic::Code;

fn v1() -> (Manifest, BTreeMap<Digest, Vec<u8>>) {
    synthetic_version("smol", 1, 0, &tiny_llama(30), |_| 1)
}

/// Version 2 retrains layers 28 and 29 only.
fn v2() -> (Manifest, BTreeMap<Digest, Vec<u8>>) {
    synthetic_version("smol", 2, 1, &tiny_llama(30), |name| {
        1 + u64::from(name.starts_with("model.layers.28.") || name.starts_with("model.layers.29."))
    })
}

struct Mem(BTreeMap<Digest, Vec<u8>>);

impl BlobSource for Mem {
    fn open(&self, digest: &Digest) -> std::io::Result<Box<dyn std::io::Read + '_>> {
        let b = self.0.get(digest).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        Ok(Box::new(&b[..]))
    }
}

fn assert_status(res: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needles: &[&str]) {
    let status = res.expect_err("the request must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(status.message().contains(n), "message {:?} lacks {n:?}", status.message());
    }
}

#[tokio::test]
async fn publish_then_fetch_every_blob_and_reassemble() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let (m, blobs) = v1();

    assert_eq!(upload_missing(&mut client, &blobs).await, blobs.len());
    assert_eq!(upload_missing(&mut client, &blobs).await, 0, "everything is stored now");
    let res = publish(&mut client, &m, &trainer_key()).await.unwrap();
    assert_eq!(res.id.unwrap().version, 1);
    assert_eq!(res.total_bytes, m.total_bytes());
    assert_eq!(res.delta_bytes, m.total_bytes(), "a base import is all delta");

    let models = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models, vec![pb::ModelSummary { model: "smol".into(), latest_version: 1, version_count: 1 }]);

    let got = client.get_manifest(pb::GetManifestRequest { model: "smol".into(), version: 0 }).await.unwrap();
    let got = got.into_inner();
    let signed = llmchain_proto::model::SignedManifest::try_from(got.signed.unwrap()).unwrap();
    let trusted = llmchain_artifact::TrustedKeys::new([trainer_key().public()]);
    let manifest = trusted.verify(&signed).unwrap();
    assert_eq!(manifest, m);

    let mut fetched = BTreeMap::new();
    for t in &manifest.tensors {
        // A small chunk size makes every tensor span several messages.
        let bytes = fetch(&mut client, t.digest, 0, 0, 256).await.unwrap();
        assert_eq!(digest_bytes(&bytes), t.digest);
        fetched.insert(t.digest, bytes);
    }
    let mut from_registry = Vec::new();
    assemble_safetensors(&manifest, &Mem(fetched), &mut from_registry).unwrap();
    let mut original = Vec::new();
    assemble_safetensors(&m, &Mem(blobs), &mut original).unwrap();
    assert_eq!(from_registry, original);
    coord.shutdown().await;
}

#[tokio::test]
async fn a_broken_fetch_resumes_from_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let bytes = synthetic_bytes("big", 7, 3 << 20);
    let digest = digest_bytes(&bytes);
    upload(&mut client, digest, &bytes, 1 << 20).await.unwrap();

    // Read a few chunks, then drop the stream mid-blob as a dying connection would.
    let req = pb::FetchBlobRequest { digest: digest.to_string(), offset: 0, length: 0, chunk_size: 64 << 10 };
    let mut stream = client.fetch_blob(req).await.unwrap().into_inner();
    let mut got = Vec::new();
    for _ in 0..5 {
        let m = stream.message().await.unwrap().unwrap();
        assert_eq!(m.total_size, bytes.len() as u64);
        got.extend_from_slice(&m.data);
    }
    drop(stream);
    drop(client);
    assert!(got.len() < bytes.len());

    // A new connection asks for the rest from where the first one stopped.
    let mut client = coord.client().await;
    let rest = fetch(&mut client, digest, got.len() as u64, 0, 0).await.unwrap();
    got.extend_from_slice(&rest);
    assert_eq!(got, bytes);

    // An explicit length bounds the range.
    let mid = fetch(&mut client, digest, 1000, 5000, 999).await.unwrap();
    assert_eq!(mid, bytes[1000..6000]);
    let err = fetch(&mut client, digest, bytes.len() as u64 + 1, 0, 0).await.unwrap_err().1;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    coord.shutdown().await;
}

#[tokio::test]
async fn a_corrupted_blob_on_disk_is_refused_with_data_loss() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let (m, blobs) = v1();
    upload_missing(&mut client, &blobs).await;
    publish(&mut client, &m, &trainer_key()).await.unwrap();

    // Flip one byte of a tensor on disk, keeping its size.
    let victim = m.tensor("model.layers.3.self_attn.q_proj.weight").unwrap().clone();
    let path = coord.local.path_of(&victim.digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();

    // A full read streams all but the last chunk, then fails instead of completing.
    let (partial, status) = fetch(&mut client, victim.digest, 0, 0, 128).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains(&victim.digest.to_string()), "{status:?}");
    assert!((partial.len() as u64) < victim.size);
    assert_eq!(coord.blobs.corruptions_detected(), 1);

    // Now known corrupt: refused up front, also for ranges, and reported missing for re-upload.
    let (_, status) = fetch(&mut client, victim.digest, 10, 10, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    let missing = client
        .missing_blobs(pb::MissingBlobsRequest { digests: vec![victim.digest.to_string()] })
        .await
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing, vec![victim.digest.to_string()]);

    // Re-uploading the right bytes repairs it.
    let good = &blobs[&victim.digest];
    upload(&mut client, victim.digest, good, 100).await.unwrap();
    assert_eq!(fetch(&mut client, victim.digest, 0, 0, 0).await.unwrap(), *good);
    coord.shutdown().await;
}

#[tokio::test]
async fn a_ranged_read_of_an_unverified_blob_verifies_it_first_and_scrub_finds_rot() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let (m, blobs) = v1();
    upload_missing(&mut client, &blobs).await;
    let t = m.tensors[10].clone();

    // A restarted coordinator has verified nothing yet; corrupt the file before its first read.
    let path = coord.local.path_of(&t.digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let restarted = Coordinator::start(
        std::sync::Arc::new(
            llmchain_coordinator::store::embedded::EmbeddedStore::open(&dir.path().join("other.redb"))
                .await
                .unwrap(),
        ),
        &dir.path().join("blobs"),
    )
    .await;
    let mut c2 = restarted.client().await;
    let (_, status) = fetch(&mut c2, t.digest, 50, 10, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");

    // Rot that keeps the file's size and mtime is invisible to the cache; the scrub catches it.
    let u = m.tensors[11].clone();
    assert_eq!(fetch(&mut c2, u.digest, 0, 0, 0).await.unwrap(), blobs[&u.digest]);
    let upath = coord.local.path_of(&u.digest);
    let mtime = std::fs::metadata(&upath).unwrap().modified().unwrap();
    let mut ub = std::fs::read(&upath).unwrap();
    ub[5] ^= 1;
    std::fs::write(&upath, &ub).unwrap();
    std::fs::File::options().write(true).open(&upath).unwrap().set_modified(mtime).unwrap();
    assert!(fetch(&mut c2, u.digest, 5, 1, 0).await.is_ok(), "served from the verification cache");
    let report = restarted.blobs.scrub().await.unwrap();
    assert_eq!(report.corrupt.iter().copied().collect::<HashSet<_>>(), HashSet::from([t.digest, u.digest]));
    let (_, status) = fetch(&mut c2, u.digest, 5, 1, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    restarted.shutdown().await;
    coord.shutdown().await;
}

#[tokio::test]
async fn every_publish_refusal_has_its_code_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let (m, blobs) = v1();
    let key = trainer_key();

    // A blob is missing: FAILED_PRECONDITION naming the tensor and the digest.
    let absent = m.tensor("model.layers.12.mlp.down_proj.weight").unwrap().clone();
    let mut partial = blobs.clone();
    partial.remove(&absent.digest);
    upload_missing(&mut client, &partial).await;
    assert_status(
        publish(&mut client, &m, &key).await,
        Code::FailedPrecondition,
        &["model.layers.12.mlp.down_proj.weight", &absent.digest.to_string(), "missing"],
    );
    upload_missing(&mut client, &blobs).await;

    // An untrusted key, and a forged signature under the trusted key's id: PERMISSION_DENIED.
    let stranger = SigningKey::from_seed([9; 32]);
    assert_status(publish(&mut client, &m, &stranger).await, Code::PermissionDenied, &["not trusted"]);
    let mut forged = stranger.sign(&m);
    forged.key_id = key.public().key_id();
    assert_status(publish_signed(&mut client, forged).await, Code::PermissionDenied, &["does not verify"]);
    let mut tampered = key.sign(&m);
    let last = tampered.manifest.len() - 1;
    tampered.manifest[last] ^= 1;
    assert_status(publish_signed(&mut client, tampered).await, Code::PermissionDenied, &["does not verify"]);

    // size disagrees with dtype × shape: INVALID_ARGUMENT naming the field.
    let mut bad_size = m.clone();
    let i = bad_size.tensors.iter().position(|t| t.name == "model.norm.weight").unwrap();
    bad_size.tensors[i].size += 4;
    let idx = {
        let mut names: Vec<_> = bad_size.tensors.iter().map(|t| t.name.clone()).collect();
        names.sort();
        names.iter().position(|n| n == "model.norm.weight").unwrap()
    };
    assert_status(
        publish(&mut client, &bad_size, &key).await,
        Code::InvalidArgument,
        &[&format!("signed.manifest.tensors[{idx}].size"), "disagrees with dtype and shape"],
    );

    // The stored blob's size disagrees with the manifest: INVALID_ARGUMENT.
    let mut wrong_blob = m.clone();
    let norm = wrong_blob.tensor("model.layers.0.input_layernorm.weight").unwrap().clone();
    let q =
        wrong_blob.tensors.iter_mut().find(|t| t.name == "model.layers.0.self_attn.q_proj.weight").unwrap();
    q.digest = norm.digest;
    assert_status(
        publish(&mut client, &wrong_blob, &key).await,
        Code::InvalidArgument,
        &["model.layers.0.self_attn.q_proj.weight", &format!("holds {} bytes", norm.size), "declares 1024"],
    );

    // The tensor set does not fit the architecture: INVALID_ARGUMENT.
    let mut short = m.clone();
    short.tensors.retain(|t| t.name != "model.layers.29.post_attention_layernorm.weight");
    assert_status(
        publish(&mut client, &short, &key).await,
        Code::InvalidArgument,
        &["model.layers.29.post_attention_layernorm.weight", "is missing"],
    );
    let mut reshaped = m.clone();
    let arch_mismatch = reshaped.tensors.iter_mut().find(|t| t.name == "model.embed_tokens.weight").unwrap();
    arch_mismatch.shape = vec![16, 32];
    assert_status(
        publish(&mut client, &reshaped, &key).await,
        Code::InvalidArgument,
        &["model.embed_tokens.weight", "has shape [16, 32], the architecture needs [32, 16]"],
    );

    // Publish v2, then: the same version again is ALREADY_EXISTS, an older one FAILED_PRECONDITION.
    let (m2, blobs2) = v2();
    upload_missing(&mut client, &blobs2).await;
    let mut first = m2.clone();
    first.parent_version = 0;
    publish(&mut client, &first, &key).await.unwrap();
    assert_status(
        publish(&mut client, &first, &key).await,
        Code::AlreadyExists,
        &["version 2 of model smol"],
    );
    assert_status(
        publish(&mut client, &m, &key).await,
        Code::FailedPrecondition,
        &["version 1 of model smol is not greater than the latest version 2"],
    );

    // An unknown parent and an expired manifest: FAILED_PRECONDITION.
    let (mut m5, _) = synthetic_version("smol", 5, 4, &tiny_llama(30), |_| 1);
    assert_status(publish(&mut client, &m5, &key).await, Code::FailedPrecondition, &["parent version 4"]);
    m5.parent_version = 2;
    m5.expires_at = Some(std::time::SystemTime::now() - Duration::from_secs(1));
    assert_status(publish(&mut client, &m5, &key).await, Code::FailedPrecondition, &["expired"]);

    let versions = client.list_versions(pb::ListVersionsRequest { model: "smol".into() }).await.unwrap();
    assert_eq!(versions.into_inner().versions.len(), 1, "no refused version became visible");
    coord.shutdown().await;
}

#[tokio::test]
async fn a_holder_of_v1_needs_only_the_two_changed_layers_of_v2() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let key = trainer_key();
    let (m1, blobs1) = v1();
    let (m2, blobs2) = v2();
    upload_missing(&mut client, &blobs1).await;
    publish(&mut client, &m1, &key).await.unwrap();

    // The trainer asks which v2 blobs the registry lacks: exactly the 18 changed tensors.
    let digests = m2.tensors.iter().map(|t| t.digest.to_string()).collect();
    let missing =
        client.missing_blobs(pb::MissingBlobsRequest { digests }).await.unwrap().into_inner().missing;
    let changed: HashSet<String> = m2
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("model.layers.28.") || t.name.starts_with("model.layers.29."))
        .map(|t| t.digest.to_string())
        .collect();
    assert_eq!(missing.iter().cloned().collect::<HashSet<_>>(), changed);
    assert_eq!(upload_missing(&mut client, &blobs2).await, 18);
    let res = publish(&mut client, &m2, &key).await.unwrap();
    let layer_bytes: u64 =
        m2.tensors.iter().filter(|t| t.name.starts_with("model.layers.29.")).map(|t| t.size).sum();
    assert_eq!(res.delta_bytes, 2 * layer_bytes);

    // An agent holding v1 plans its download of v2.
    let have = m1.tensors.iter().map(|t| t.digest.to_string()).collect();
    let target = Some(pb::ModelRef { model: "smol".into(), version: 2 });
    let plan = client.plan_delta(pb::PlanDeltaRequest { target, have }).await.unwrap().into_inner();
    assert_eq!(plan.needed.len(), 18);
    assert!(
        plan.needed
            .iter()
            .all(|t| t.name.starts_with("model.layers.28.") || t.name.starts_with("model.layers.29."))
    );
    assert_eq!(plan.delta_bytes, 2 * layer_bytes);
    assert_eq!(plan.total_bytes, m2.total_bytes());
    println!(
        "delta v1 -> v2: {} of {} tensors, {} of {} bytes",
        plan.needed.len(),
        m2.tensors.len(),
        plan.delta_bytes,
        plan.total_bytes
    );

    let versions = client.list_versions(pb::ListVersionsRequest { model: "smol".into() }).await.unwrap();
    let versions = versions.into_inner().versions;
    assert_eq!(
        versions.iter().map(|v| (v.version, v.delta_bytes)).collect::<Vec<_>>(),
        vec![(1, m1.total_bytes()), (2, 2 * layer_bytes)]
    );
    assert_eq!(versions[1].parent_version, 1);
    assert_eq!(versions[1].key_id, key.public().key_id());

    let unknown = Some(pb::ModelRef { model: "smol".into(), version: 3 });
    let res = client.plan_delta(pb::PlanDeltaRequest { target: unknown, have: vec![] }).await;
    assert_status(res, Code::NotFound, &["version 3 of model smol"]);
    coord.shutdown().await;
}

#[tokio::test]
async fn uploads_are_checked_and_concurrent_uploads_of_one_blob_are_safe() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let bytes = synthetic_bytes("blob", 1, 200_000);
    let digest = digest_bytes(&bytes);

    // Bytes that hash to another digest are refused and never become visible.
    let mut wrong = bytes.clone();
    wrong[7] ^= 1;
    assert_status(upload(&mut client, digest, &wrong, 4096).await, Code::InvalidArgument, &["hash to"]);
    // Fewer bytes than announced.
    let mut short = client.clone();
    let msgs = vec![pb::UploadBlobRequest {
        digest: digest.to_string(),
        total_size: bytes.len() as u64,
        offset: 0,
        data: bytes[..10].to_vec(),
    }];
    assert_status(
        short.upload_blob(tokio_stream::iter(msgs)).await,
        Code::InvalidArgument,
        &["stream ended"],
    );
    // A gap between chunks.
    let msgs = vec![
        pb::UploadBlobRequest {
            digest: digest.to_string(),
            total_size: 20,
            offset: 0,
            data: bytes[..10].to_vec(),
        },
        pb::UploadBlobRequest {
            digest: String::new(),
            total_size: 0,
            offset: 11,
            data: bytes[10..20].to_vec(),
        },
    ];
    assert_status(
        client.upload_blob(tokio_stream::iter(msgs)).await,
        Code::InvalidArgument,
        &["expected 10"],
    );
    let missing = client.missing_blobs(pb::MissingBlobsRequest { digests: vec![digest.to_string()] }).await;
    assert_eq!(missing.unwrap().into_inner().missing.len(), 1);
    assert_eq!(std::fs::read_dir(coord.local.root().join("tmp")).unwrap().count(), 0, "no temp file left");

    // Eight concurrent uploads of the same blob all succeed and store it once.
    let uploads = (0..8).map(|_| {
        let mut c = client.clone();
        let b = bytes.clone();
        async move { upload(&mut c, digest, &b, 8192).await }
    });
    for r in futures::future::join_all(uploads).await {
        assert_eq!(r.unwrap().size, bytes.len() as u64);
    }
    assert_eq!(std::fs::read(coord.local.path_of(&digest)).unwrap(), bytes);
    let again = upload(&mut client, digest, &bytes, 8192).await.unwrap();
    assert!(again.already_present);
    coord.shutdown().await;
}

#[tokio::test]
async fn garbage_collection_keeps_referenced_and_recent_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    let (m, blobs) = synthetic_version("gc", 1, 0, &tiny_llama(1), |_| 3);
    upload_missing(&mut client, &blobs).await;
    publish(&mut client, &m, &trainer_key()).await.unwrap();
    let orphan = synthetic_bytes("orphan", 0, 1000);
    let orphan_digest = digest_bytes(&orphan);
    upload(&mut client, orphan_digest, &orphan, 1000).await.unwrap();

    let kept = coord.registry.collect_garbage(Duration::from_secs(3600)).await.unwrap();
    assert!(kept.deleted.is_empty());
    assert_eq!(kept.kept_recent, 1);

    let report = coord.registry.collect_garbage(Duration::ZERO).await.unwrap();
    assert_eq!(report.deleted, vec![orphan_digest]);
    assert_eq!(report.bytes_freed, 1000);
    let all: Vec<String> = blobs.keys().map(ToString::to_string).collect();
    let missing = client.missing_blobs(pb::MissingBlobsRequest { digests: all }).await.unwrap().into_inner();
    assert!(missing.missing.is_empty(), "referenced blobs survive");
    assert!(coord.registry.get_manifest(&m.id.model, None).await.is_ok());
    coord.shutdown().await;
}

#[tokio::test]
async fn unknown_models_and_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::embedded(dir.path()).await;
    let mut client = coord.client().await;
    assert!(client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models.is_empty());
    let res = client.get_manifest(pb::GetManifestRequest { model: "nope".into(), version: 0 }).await;
    assert_status(res, Code::NotFound, &["model nope"]);
    let res = client.list_versions(pb::ListVersionsRequest { model: "Bad Name".into() }).await;
    assert_status(res, Code::InvalidArgument, &["model"]);
    let res = client.missing_blobs(pb::MissingBlobsRequest { digests: vec!["sha256:xyz".into()] }).await;
    assert_status(res, Code::InvalidArgument, &["digests[0]"]);
    let res = fetch(&mut client, digest_bytes(b"absent"), 0, 0, 0).await;
    assert_eq!(res.unwrap_err().1.code(), Code::NotFound);
    let res = client.publish_version(pb::PublishVersionRequest { signed: None }).await;
    assert_status(res, Code::InvalidArgument, &["signed"]);
    coord.shutdown().await;
}
