//! `make bench-transfer`: moves one blob (512 MiB by default) through `FetchBlob` on loopback
//! and the same bytes through a plain TCP socket copy, and prints MB/s for both and the ratio.
//!
//! Both paths read the blob from the same file (in the page cache after the first pass) and the
//! receiving side only counts bytes: neither receiver hashes (an agent does, on either
//! transport), so the difference is the cost of gRPC framing, HTTP/2 flow control and the
//! registry's own work. Two `FetchBlob` figures are printed:
//! - **first pass**: a coordinator that has not verified the blob since it started (a restart,
//!   or a blob uploaded through another replica) hashes it while streaming it, once; the raw
//!   copy does no such work, so this ratio is not like for like and is printed for reference;
//! - **verified**: every later fetch of the blob, from the verification cache. This is the
//!   steady state and the like-for-like comparison with the raw copy (the ratio).
//!
//! Each round starts a fresh server (so its first pass is a real one), then measures a verified
//! pass and a raw copy; the median of the rounds is printed, with CPU seconds per GB moved (both
//! ends, from `/proc/self/stat`), which other load on the machine distorts far less than MB/s.
//!
//! Environment: `BENCH_BLOB_MIB` (default 512), `BENCH_ROUNDS` (default 5),
//! `BENCH_CHUNK_KIB` (default 1024, the registry's default chunk size), `BENCH_FRAME_KIB` and
//! `BENCH_WINDOW_MIB` (HTTP/2 frame and window sizes, default the registry's recommendations),
//! `BENCH_ADAPTIVE=1` (HTTP/2 adaptive window), `BENCH_ONLY=grpc|tcp` (only the verified
//! passes or only the raw copies after the first pass, e.g. under `perf record`),
//! `BENCH_CLIENT=tonic` (read with the generated client, whose decoder copies every frame,
//! instead of the agents' [`llmchain_proto::fetch`] client).

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
use llmchain_proto::{
    fetch,
    pb::{self, registry_client::RegistryClient},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Server};

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

/// Largest message the clients accept.
const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Which gRPC client reads the blob.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    /// [`llmchain_proto::fetch`], as the edge agent reads blobs.
    Agent,
    /// The generated `RegistryClient` (tonic's decoder).
    Tonic,
}

async fn grpc_pass(channel: &Channel, client: Client, digest: Digest, chunk: u32) -> u64 {
    let req = pb::FetchBlobRequest { digest: digest.to_string(), offset: 0, length: 0, chunk_size: chunk };
    let mut n = 0u64;
    match client {
        Client::Agent => {
            let mut chunks =
                fetch::fetch_blob(&mut channel.clone(), req, MAX_MESSAGE_BYTES).await.expect("fetch starts");
            while let Some(m) = chunks.message().await.expect("fetch streams") {
                n += m.data.len() as u64;
            }
        }
        Client::Tonic => {
            let mut client =
                RegistryClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
            let mut stream = client.fetch_blob(req).await.expect("fetch starts").into_inner();
            while let Some(m) = stream.message().await.expect("fetch streams") {
                n += m.data.len() as u64;
            }
        }
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

/// HTTP/2 settings both ends of the gRPC connection use.
#[derive(Clone, Copy)]
struct H2 {
    window: u32,
    frame: Option<u32>,
    adaptive: bool,
}

/// Starts a registry on a fresh [`VerifiedBlobs`] (nothing verified yet, as after a coordinator
/// restart) over `local`, and connects a channel to it.
async fn start_registry(local: Arc<LocalBlobStore>, state: &std::path::Path, h2: H2) -> Channel {
    let blobs = Arc::new(VerifiedBlobs::new(local));
    let store = Arc::new(EmbeddedStore::open(state).await.expect("store"));
    let registry = Arc::new(Registry::new(RegistryConfig::new(TrustedKeys::default()), store, blobs));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = TcpListenerStream::new(listener).and_then(|s| async move {
        s.set_nodelay(true)?;
        Ok(s)
    });
    tokio::spawn(
        Server::builder()
            .initial_stream_window_size(h2.window)
            .initial_connection_window_size(h2.window)
            .http2_adaptive_window(Some(h2.adaptive))
            .max_frame_size(h2.frame)
            .add_service(service(registry))
            .serve_with_incoming(incoming),
    );
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .initial_stream_window_size(h2.window)
        .initial_connection_window_size(h2.window)
        .http2_adaptive_window(h2.adaptive)
        .max_frame_size(h2.frame)
        .connect()
        .await
        .expect("connect")
}

/// Wall times and total CPU time of a series of passes over the same bytes.
#[derive(Default)]
struct Passes {
    walls: Vec<Duration>,
    cpu: f64,
}

impl Passes {
    async fn time<F: Future<Output = u64>>(&mut self, total: u64, pass: F) {
        let (t, c) = (Instant::now(), cpu_seconds());
        assert_eq!(pass.await, total, "a pass moved the wrong number of bytes");
        self.walls.push(t.elapsed());
        self.cpu += cpu_seconds() - c;
    }

    /// MB/s of the median pass (the upper median of an even count). On two shared cores a
    /// single pass of either kind can run at twice its usual rate or half of it; the best of a
    /// few passes picked those outliers, the median does not.
    fn mbps(&self, total: u64) -> f64 {
        let mut walls = self.walls.clone();
        walls.sort();
        walls.get(walls.len() / 2).map_or(f64::NAN, |m| mbps(total, *m))
    }

    /// MB/s of the latest pass.
    fn last_mbps(&self, total: u64) -> f64 {
        self.walls.last().map_or(f64::NAN, |b| mbps(total, *b))
    }

    fn cpu_per_gb(&self, total: u64) -> f64 {
        self.cpu / ((total * self.walls.len() as u64) as f64 / 1e9)
    }
}

#[tokio::main]
async fn main() {
    let mib = env_u64("BENCH_BLOB_MIB", 512);
    let rounds = env_u64("BENCH_ROUNDS", 5).max(1);
    let chunk = env_u64("BENCH_CHUNK_KIB", 1024) * 1024;
    let total = mib << 20;
    let window = (env_u64("BENCH_WINDOW_MIB", u64::from(H2_WINDOW_BYTES >> 20)) << 20) as u32;
    let frame = (env_u64("BENCH_FRAME_KIB", u64::from(H2_MAX_FRAME_BYTES >> 10)) << 10) as u32;
    let h2 = H2 { window, frame: (frame > 0).then_some(frame), adaptive: env_u64("BENCH_ADAPTIVE", 0) == 1 };
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let client =
        if std::env::var("BENCH_CLIENT").is_ok_and(|c| c == "tonic") { Client::Tonic } else { Client::Agent };
    let dir = tempfile::tempdir().expect("temp dir");

    let local = Arc::new(LocalBlobStore::open(dir.path().join("blobs")).await.expect("blob store"));
    // Times sha256 alone (the generator's time excluded): the first pass's extra work.
    let (mut hasher, mut hashing) = (Hasher::new(), Duration::ZERO);
    for c in blob_chunks(total) {
        let t = Instant::now();
        hasher.update(&c);
        hashing += t.elapsed();
    }
    let digest = hasher.finish();
    let input = futures::stream::iter(blob_chunks(total).map(Ok)).boxed();
    local.put(digest, total, input).await.expect("store the blob");
    let path = local.path_of(&digest);

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "blob: {mib} MiB, chunk {} KiB, h2 window {} MiB, frame {:?}, adaptive {}, {} client, {rounds} rounds (median of); load average {}",
        chunk >> 10,
        h2.window >> 20,
        h2.frame,
        h2.adaptive,
        if client == Client::Agent { "agent (llmchain_proto::fetch)" } else { "tonic" },
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("{:<52} {:8.1} MB/s", "sha256 of the blob in memory, one thread (sha2):", mbps(total, hashing));

    let (mut first, mut verified, mut tcp) = (Passes::default(), Passes::default(), Passes::default());
    for round in 0..rounds {
        let state = dir.path().join(format!("state-{round}.redb"));
        let channel = start_registry(local.clone(), &state, h2).await;
        first.time(total, grpc_pass(&channel, client, digest, chunk as u32)).await;
        if only != "tcp" {
            verified.time(total, grpc_pass(&channel, client, digest, chunk as u32)).await;
        }
        if only != "grpc" {
            tcp.time(total, tcp_pass(path.clone(), chunk as usize)).await;
        }
        // Passes of one round ran back to back, so their ratio suffers least from load that
        // comes and goes.
        let (f, v, t) = (first.last_mbps(total), verified.last_mbps(total), tcp.last_mbps(total));
        println!(
            "round {round}: first pass {f:7.1} MB/s, verified {v:7.1} MB/s, tcp {t:7.1} MB/s, ratio verified/tcp {:.2}",
            v / t
        );
    }
    let line = |name: &str, p: &Passes| {
        println!("{name:<52} {:8.1} MB/s  {:.2} cpu-s/GB", p.mbps(total), p.cpu_per_gb(total));
    };
    line("grpc FetchBlob, first pass (hashing while streaming):", &first);
    line("grpc FetchBlob, verified (cached):", &verified);
    line("raw tcp copy:", &tcp);
    let ratio = |name: &str, p: &Passes| println!("{name:<52} {:8.2}", p.mbps(total) / tcp.mbps(total));
    ratio("ratio grpc verified / tcp (like for like):", &verified);
    ratio("ratio grpc first pass / tcp (grpc also hashes):", &first);
}
