//! `make bench-transfer`: moves one blob (512 MiB by default) through `FetchBlob` on loopback
//! and the same bytes through a plain TCP socket copy, and prints MB/s for both and the ratio.
//!
//! Both paths read the blob from the same file (in the page cache after the first pass) and the
//! receiving side only counts bytes, so the difference is the cost of gRPC framing, HTTP/2 flow
//! control and the registry's own work. The first gRPC pass also hashes the blob while streaming
//! it (its first verification); later passes serve from the verification cache.
//!
//! Environment: `BENCH_BLOB_MIB` (default 512), `BENCH_ROUNDS` (default 3),
//! `BENCH_CHUNK_KIB` (default 1024, the registry's default chunk size), `BENCH_FRAME_KIB` and
//! `BENCH_WINDOW_MIB` (HTTP/2 frame and window sizes, default the registry's recommendations),
//! `BENCH_ADAPTIVE=1` (HTTP/2 adaptive window).

use std::{
    io::Read,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use llmchain_artifact::{Digest, Hasher, TrustedKeys};
use llmchain_coordinator::{
    blobs::{BlobStore, LocalBlobStore, VerifiedBlobs},
    registry::{
        Registry, RegistryConfig,
        grpc::{H2_MAX_FRAME_BYTES, H2_WINDOW_BYTES},
        service,
    },
    store::embedded::EmbeddedStore,
};
use llmchain_proto::pb::{self, registry_client::RegistryClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Endpoint, Server};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (10 ms ticks):
/// a measure of the work per byte that other load on the machine does not distort.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Deterministic incompressible bytes (xorshift64*), generated in 4 MiB chunks.
fn blob_chunks(total: u64) -> impl Iterator<Item = Bytes> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut left = total;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(4 << 20) as usize;
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(n);
        left -= n as u64;
        Some(Bytes::from(out))
    })
}

async fn grpc_pass(
    client: &mut RegistryClient<tonic::transport::Channel>,
    digest: Digest,
    chunk: u32,
) -> u64 {
    let req = pb::FetchBlobRequest { digest: digest.to_string(), offset: 0, length: 0, chunk_size: chunk };
    let mut stream = client.fetch_blob(req).await.expect("fetch starts").into_inner();
    let mut n = 0u64;
    while let Some(m) = stream.message().await.expect("fetch streams") {
        n += m.data.len() as u64;
    }
    n
}

async fn tcp_pass(path: std::path::PathBuf, chunk: usize) -> u64 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.expect("accept");
        sock.set_nodelay(true).expect("nodelay");
        let mut file = std::fs::File::open(path).expect("open blob");
        let mut buf = vec![0u8; chunk];
        loop {
            // Read like the registry does (a chunk at a time from the file), then send.
            let n = file.read(&mut buf).expect("read blob");
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).await.expect("send");
        }
        sock.shutdown().await.expect("shutdown");
    });
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    sock.set_nodelay(true).expect("nodelay");
    let mut buf = vec![0u8; chunk];
    let mut n = 0u64;
    loop {
        let got = sock.read(&mut buf).await.expect("receive");
        if got == 0 {
            break;
        }
        n += got as u64;
    }
    server.await.expect("tcp server");
    n
}

#[tokio::main]
async fn main() {
    let mib = env_u64("BENCH_BLOB_MIB", 512);
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1);
    let chunk = env_u64("BENCH_CHUNK_KIB", 1024) * 1024;
    let total = mib << 20;
    let window = (env_u64("BENCH_WINDOW_MIB", u64::from(H2_WINDOW_BYTES >> 20)) << 20) as u32;
    let frame = (env_u64("BENCH_FRAME_KIB", u64::from(H2_MAX_FRAME_BYTES >> 10)) << 10) as u32;
    let frame = (frame > 0).then_some(frame);
    let adaptive = env_u64("BENCH_ADAPTIVE", 0) == 1;
    let dir = tempfile::tempdir().expect("temp dir");

    let local = Arc::new(LocalBlobStore::open(dir.path().join("blobs")).await.expect("blob store"));
    let mut hasher = Hasher::new();
    for c in blob_chunks(total) {
        hasher.update(&c);
    }
    let digest = hasher.finish();
    let input = futures::stream::iter(blob_chunks(total).map(Ok)).boxed();
    local.put(digest, total, input).await.expect("store the blob");
    let path = local.path_of(&digest);

    // A fresh VerifiedBlobs: the blob is unverified, as after a coordinator restart.
    let blobs = Arc::new(VerifiedBlobs::new(local.clone()));
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).await.expect("store"));
    let registry = Arc::new(Registry::new(RegistryConfig::new(TrustedKeys::default()), store, blobs));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = TcpListenerStream::new(listener).and_then(|s| async move {
        s.set_nodelay(true)?;
        Ok(s)
    });
    tokio::spawn(
        Server::builder()
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .http2_adaptive_window(Some(adaptive))
            .max_frame_size(frame)
            .add_service(service(registry))
            .serve_with_incoming(incoming),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .http2_adaptive_window(adaptive)
        .max_frame_size(frame)
        .connect()
        .await
        .expect("connect");
    let mut client = RegistryClient::new(channel).max_decoding_message_size(8 << 20);

    println!(
        "blob: {mib} MiB, chunk {} KiB, h2 window {} MiB, frame {:?}, adaptive {adaptive}, {rounds} rounds (best of)",
        chunk >> 10,
        window >> 20,
        frame
    );
    let t = Instant::now();
    let n = grpc_pass(&mut client, digest, chunk as u32).await;
    assert_eq!(n, total);
    println!("grpc FetchBlob, first pass (hashing while streaming): {:8.1} MB/s", mbps(n, t.elapsed()));

    let (mut best_grpc, mut best_tcp) = (Duration::MAX, Duration::MAX);
    let (mut cpu_grpc, mut cpu_tcp) = (0.0, 0.0);
    for _ in 0..rounds {
        let (t, c) = (Instant::now(), cpu_seconds());
        assert_eq!(grpc_pass(&mut client, digest, chunk as u32).await, total);
        best_grpc = best_grpc.min(t.elapsed());
        cpu_grpc += cpu_seconds() - c;
        let (t, c) = (Instant::now(), cpu_seconds());
        assert_eq!(tcp_pass(path.clone(), chunk as usize).await, total);
        best_tcp = best_tcp.min(t.elapsed());
        cpu_tcp += cpu_seconds() - c;
    }
    let gb = (total * rounds) as f64 / 1e9;
    let grpc = mbps(total, best_grpc);
    let tcp = mbps(total, best_tcp);
    println!(
        "grpc FetchBlob (verified, cached):                   {grpc:8.1} MB/s  {:.2} cpu-s/GB",
        cpu_grpc / gb
    );
    println!(
        "raw tcp copy:                                        {tcp:8.1} MB/s  {:.2} cpu-s/GB",
        cpu_tcp / gb
    );
    println!("ratio grpc / tcp:                                    {:8.2}", grpc / tcp);
}
