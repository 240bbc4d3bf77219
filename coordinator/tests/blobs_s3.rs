//! The S3 blob store passes the backend contract against a local S3-compatible server (moto,
//! installed into the project venv by `scripts/setup.sh` from `requirements/s3.txt`).

#![cfg(feature = "s3")]

mod blobs_support;

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use llmchain_coordinator::{
    blobs::s3::{S3BlobStore, S3Config},
    store::testing::eventually,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A moto S3 server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http(port: u16, request: String) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(request.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

impl Moto {
    async fn start() -> Moto {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.llmchain/venv/bin/moto_server");
        assert!(bin.exists(), "{} is missing: run scripts/setup.sh (requirements/s3.txt)", bin.display());
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto { child, port };
        let get = format!("GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        eventually(Duration::from_secs(30), "moto to answer", || {
            let get = get.clone();
            async move { http(port, get).await.is_some_and(|r| r.starts_with("HTTP/1.1")) }
        })
        .await;
        moto
    }

    async fn create_bucket(&self, bucket: &str) {
        let port = self.port;
        let put = format!(
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let reply = http(port, put).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
}

#[tokio::test]
async fn s3_store_passes_the_contract() {
    let moto = Moto::start().await;
    moto.create_bucket("blobs").await;
    let config = S3Config {
        bucket: "blobs".into(),
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        region: "us-east-1".into(),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        prefix: "llmchain/test".into(),
    };
    let store = S3BlobStore::connect(&config).unwrap();
    // 20 MiB: three multipart parts of 8 MiB, the last one short.
    blobs_support::contract(Arc::new(store), 20 << 20).await;
}
