//! The trainer publishes the real SmolLM2 to a real coordinator through the gRPC API, and the
//! registry serves back exactly what was signed.

use std::{process::Command, time::Duration};

use llmchain_artifact::{PublicKey, TrustedKeys, digest_bytes};
use llmchain_proto::{
    model::SignedManifest,
    pb::{self, registry_client::RegistryClient},
};
use llmchain_tests::{bin, smollm2_gguf, spawn_listening};

fn keygen(path: &std::path::Path) -> serde_json::Value {
    let out =
        Command::new(bin("cloud-trainer")).arg("keygen").arg("--out").arg(path).env_clear().output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn import(key: &std::path::Path, addr: std::net::SocketAddr) -> std::process::Output {
    Command::new(bin("cloud-trainer"))
        .args([
            "import",
            "--insecure",
            "--model",
            "smollm2-135m",
            "--coordinator",
            &format!("http://{addr}"),
            "--gguf",
        ])
        .arg(smollm2_gguf())
        .arg("--key")
        .arg(key)
        .env_clear()
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test]
async fn trainer_imports_smollm2_and_the_registry_serves_the_signed_version() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("trainer.key");
    let ids = keygen(&key);
    let public = std::path::PathBuf::from(ids["public_key"].as_str().unwrap());
    // The private key is written for its owner only.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    // A second keygen must not overwrite it.
    let again = Command::new(bin("cloud-trainer")).arg("keygen").arg("--out").arg(&key).output().unwrap();
    assert!(!again.status.success());

    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("embedded:{}", dir.path().join("state.redb").display()))
        .arg("--blobs")
        .arg(dir.path().join("blobs"))
        .arg("--trainer-key")
        .arg(&public)
        .env_clear()
        .env("RUST_LOG", "warn");
    let (_coordinator, addr) = spawn_listening(cmd, Duration::from_secs(30));

    let out = import(&key, addr);
    assert!(out.status.success(), "import failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["version"], 1, "{report}");
    let total = report["total_bytes"].as_u64().unwrap();
    // 134.5M parameters in bf16, plus nothing else counted as tensors.
    assert!((260_000_000..280_000_000).contains(&total), "{report}");
    assert!(report["uploaded_bytes"].as_u64().unwrap() >= total, "{report}");

    // The registry answers with the trainer's exact signed bytes, which verify.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut registry = RegistryClient::new(channel).max_decoding_message_size(64 << 20);
    let got = registry
        .get_manifest(pb::GetManifestRequest { model: "smollm2-135m".into(), version: 0 })
        .await
        .unwrap()
        .into_inner();
    let signed = SignedManifest::try_from(got.signed.unwrap()).unwrap();
    let manifest = TrustedKeys::new([PublicKey::load(&public).unwrap()]).verify(&signed).unwrap();
    assert_eq!(manifest.id.version, 1);
    assert_eq!(manifest.tensors.len(), 1 + 30 * 9 + 1, "embeddings, 30 layers × 9, final norm (tied head)");

    // A fetched tensor hashes to its manifest digest.
    let norm = manifest.tensor("model.norm.weight").unwrap();
    let mut stream = registry
        .fetch_blob(pb::FetchBlobRequest { digest: norm.digest.to_string(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        bytes.extend_from_slice(&chunk.data);
    }
    assert_eq!(bytes.len() as u64, norm.size);
    assert_eq!(digest_bytes(&bytes), norm.digest);

    // Importing the same weights again is a new version that uploads nothing.
    let out = import(&key, addr);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["version"].as_u64(), report["uploaded_bytes"].as_u64()),
        (Some(2), Some(0)),
        "{report}"
    );

    // A key the coordinator does not trust is refused, and nothing is published.
    let rogue = dir.path().join("rogue.key");
    keygen(&rogue);
    let out = import(&rogue, addr);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permission denied"), "{stderr}");
    let versions = registry
        .list_versions(pb::ListVersionsRequest { model: "smollm2-135m".into() })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions.len(), 2);
}
