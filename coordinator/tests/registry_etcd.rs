//! Two coordinators on one real etcd and one shared blob directory serve the same registry.

mod registry_support;

use std::{collections::BTreeMap, sync::Arc};

use llmchain_artifact::{
    BlobSource, Digest, TrustedKeys, assemble_safetensors,
    testing::{synthetic_version, tiny_llama},
};
use llmchain_coordinator::store::testing::EtcdServer;
use llmchain_proto::pb;
use registry_support::{Coordinator, fetch, publish, trainer_key, upload_missing};
use tonic::Code;

struct Mem(BTreeMap<Digest, Vec<u8>>);

impl BlobSource for Mem {
    fn open(&self, digest: &Digest) -> std::io::Result<Box<dyn std::io::Read + '_>> {
        let b = self.0.get(digest).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
        Ok(Box::new(&b[..]))
    }
}

#[tokio::test]
async fn a_version_published_through_one_coordinator_is_listed_and_served_by_the_other() {
    let etcd = EtcdServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shared_blobs = dir.path().join("blobs");
    let a = Coordinator::start(Arc::new(etcd.store("/llmchain-test/").await.unwrap()), &shared_blobs).await;
    let b = Coordinator::start(Arc::new(etcd.store("/llmchain-test/").await.unwrap()), &shared_blobs).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let key = trainer_key();

    let (m1, blobs1) = synthetic_version("smol", 1, 0, &tiny_llama(30), |_| 1);
    upload_missing(&mut ca, &blobs1).await;
    publish(&mut ca, &m1, &key).await.unwrap();

    let models = cb.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models, vec![pb::ModelSummary { model: "smol".into(), latest_version: 1, version_count: 1 }]);
    let got = cb.get_manifest(pb::GetManifestRequest { model: "smol".into(), version: 1 }).await.unwrap();
    let signed = llmchain_proto::model::SignedManifest::try_from(got.into_inner().signed.unwrap()).unwrap();
    let manifest = TrustedKeys::new([key.public()]).verify(&signed).unwrap();
    assert_eq!(manifest, m1);
    let mut fetched = BTreeMap::new();
    for t in &manifest.tensors {
        fetched.insert(t.digest, fetch(&mut cb, t.digest, 0, 0, 0).await.unwrap());
    }
    let (mut via_b, mut original) = (Vec::new(), Vec::new());
    assemble_safetensors(&manifest, &Mem(fetched), &mut via_b).unwrap();
    assemble_safetensors(&m1, &Mem(blobs1), &mut original).unwrap();
    assert_eq!(via_b, original);

    // Both coordinators race to publish the same v2: the compare-and-swap lets exactly one win.
    let (m2, blobs2) =
        synthetic_version("smol", 2, 1, &tiny_llama(30), |n| 1 + u64::from(n.contains(".29.")));
    assert_eq!(upload_missing(&mut cb, &blobs2).await, 9);
    let (ra, rb) = tokio::join!(publish(&mut ca, &m2, &key), publish(&mut cb, &m2, &key));
    let outcomes = [ra.map(|_| ()), rb.map(|_| ())];
    assert_eq!(outcomes.iter().filter(|r| r.is_ok()).count(), 1, "{outcomes:?}");
    let loser = outcomes.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(matches!(loser.code(), Code::AlreadyExists | Code::FailedPrecondition), "{loser:?}");

    let versions = ca.list_versions(pb::ListVersionsRequest { model: "smol".into() }).await.unwrap();
    let versions: Vec<u64> = versions.into_inner().versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, vec![1, 2]);
    a.shutdown().await;
    b.shutdown().await;
}
