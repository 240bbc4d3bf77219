//! A TCP fault proxy for tests: sits between a client and a server and breaks the stream on
//! command.
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use llmchain_tests::proxy::{Cuts, FaultProxy};
//! let proxy = FaultProxy::start(server).await?;
//! // Point the client at `proxy.url()`, then, e.g., cut each of the next 3 connections
//! // after 256 KiB from the server, and corrupt the byte 1 MiB further down the stream.
//! proxy.cut_after(256 << 10, Cuts::Times(3));
//! proxy.flip_byte_at(proxy.downstream_bytes() + (1 << 20));
//! # Ok(()) }
//! ```
//!
//! "Downstream" is server → client, "upstream" client → server. Byte counts are bytes
//! actually written to the other side. Faults apply to downstream bytes only (that is where
//! a download breaks); latency applies both ways. Every setter takes effect for bytes
//! forwarded after it returns, on open and new connections alike. Dropping the proxy stops
//! listening and closes every connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// How many connections a [`FaultProxy::cut_after`] rule cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cuts {
    /// The first connection to reach the limit, then the rule is gone.
    Once,
    /// The first `n` connections to reach the limit.
    Times(u32),
    /// Every connection that reaches the limit, until [`FaultProxy::clear`].
    Always,
}

/// Counters of a proxy since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Bytes forwarded server → client.
    pub downstream_bytes: u64,
    /// Bytes forwarded client → server.
    pub upstream_bytes: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Connections cut (by a rule or by [`FaultProxy::cut_all`]).
    pub cuts: u64,
    /// Bytes flipped.
    pub flips: u64,
}

#[derive(Debug, Default)]
struct Faults {
    /// (downstream bytes after which a connection is cut, connections left to cut or `None`
    /// for all).
    cut: Option<(u64, Option<u32>)>,
    /// Global downstream offset of the byte to flip.
    flip_at: Option<u64>,
    latency: Duration,
    bandwidth: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    faults: Mutex<Faults>,
    live: Mutex<Vec<CancellationToken>>,
    downstream: AtomicU64,
    upstream: AtomicU64,
    connections: AtomicU64,
    cuts: AtomicU64,
    flips: AtomicU64,
}

impl Shared {
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A TCP proxy on 127.0.0.1 that forwards to a target and injects faults (see module docs).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            faults: Mutex::default(),
            live: Mutex::default(),
            downstream: AtomicU64::new(0),
            upstream: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            flips: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.connections.fetch_add(1, Relaxed);
                tokio::spawn(connection(s.clone(), client));
            }
        });
        Ok(FaultProxy { addr, shared, accept })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for gRPC clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts connections once they have forwarded `bytes` downstream bytes (counted from each
    /// connection's start), as many times as `cuts` says. The client receives exactly `bytes`
    /// bytes, then the connection is closed both ways.
    pub fn cut_after(&self, bytes: u64, cuts: Cuts) {
        let left = match cuts {
            Cuts::Once => Some(1),
            Cuts::Times(n) => Some(n),
            Cuts::Always => None,
        };
        self.shared.faults().cut = (left != Some(0)).then_some((bytes, left));
    }

    /// Flips (xor 0xff) the downstream byte at `offset`, counted over all connections since
    /// the proxy started (aim relative to [`FaultProxy::downstream_bytes`]); once.
    pub fn flip_byte_at(&self, offset: u64) {
        self.shared.faults().flip_at = Some(offset);
    }

    /// Holds every forwarded read back for `latency`, in both directions (throughput is kept).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults().latency = latency;
    }

    /// Caps each connection's downstream throughput; `None` removes the cap.
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.shared.faults().bandwidth = bytes_per_sec.map(|b| b.max(1));
    }

    /// Closes every open connection now; new connections are accepted as usual.
    pub fn cut_all(&self) {
        let live = std::mem::take(&mut *self.shared.live.lock().unwrap_or_else(|e| e.into_inner()));
        for token in live.into_iter().filter(|t| !t.is_cancelled()) {
            token.cancel();
            self.shared.cuts.fetch_add(1, Relaxed);
        }
    }

    /// Removes every fault (cuts, pending flip, latency, bandwidth cap).
    pub fn clear(&self) {
        *self.shared.faults() = Faults::default();
    }

    /// Bytes forwarded server → client so far.
    pub fn downstream_bytes(&self) -> u64 {
        self.shared.downstream.load(Relaxed)
    }

    /// All counters.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            downstream_bytes: s.downstream.load(Relaxed),
            upstream_bytes: s.upstream.load(Relaxed),
            connections: s.connections.load(Relaxed),
            cuts: s.cuts.load(Relaxed),
            flips: s.flips.load(Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn connection(shared: Arc<Shared>, client: TcpStream) {
    let Ok(server) = TcpStream::connect(shared.target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let token = CancellationToken::new();
    {
        let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|t| !t.is_cancelled());
        live.push(token.clone());
    }
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(shared.clone(), false, cr, sw, token.clone());
    let down = pump(shared.clone(), true, sr, cw, token.clone());
    tokio::select! {
        _ = token.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
    // Dropping the halves closes both sockets.
    token.cancel();
}

/// Forwards `r` to `w`; downstream pumps apply the faults. Reads are stamped on arrival and
/// written once their latency has passed, so latency does not cut throughput.
async fn pump(
    shared: Arc<Shared>,
    downstream: bool,
    mut r: impl AsyncRead + Unpin,
    mut w: impl AsyncWrite + Unpin,
    token: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let for_reader = shared.clone();
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = Instant::now() + for_reader.faults().latency;
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async {
        let mut sent = 0u64;
        while let Some((due, mut bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let mut cut = false;
            let mut bandwidth = None;
            if downstream {
                let mut faults = shared.faults();
                if let Some((limit, left)) = faults.cut
                    && sent + bytes.len() as u64 >= limit
                {
                    bytes.truncate(limit.saturating_sub(sent) as usize);
                    cut = true;
                    faults.cut = match left {
                        Some(n) if n > 1 => Some((limit, Some(n - 1))),
                        Some(_) => None,
                        None => Some((limit, None)),
                    };
                }
                let start = shared.downstream.fetch_add(bytes.len() as u64, Relaxed);
                if let Some(at) = faults.flip_at
                    && (start..start + bytes.len() as u64).contains(&at)
                {
                    bytes[(at - start) as usize] ^= 0xff;
                    faults.flip_at = None;
                    shared.flips.fetch_add(1, Relaxed);
                }
                bandwidth = faults.bandwidth;
            } else {
                shared.upstream.fetch_add(bytes.len() as u64, Relaxed);
            }
            // Under a bandwidth cap, pace small pieces (50 per second of rate, at most 16 KiB)
            // so the bytes trickle out rather than burst.
            let piece = bandwidth.map_or(bytes.len().max(1), |rate| (rate / 50).clamp(1, 16 << 10) as usize);
            for part in bytes.chunks(piece) {
                if let Some(rate) = bandwidth {
                    tokio::time::sleep(Duration::from_secs_f64(part.len() as f64 / rate as f64)).await;
                }
                if w.write_all(part).await.is_err() {
                    return;
                }
            }
            sent += bytes.len() as u64;
            if cut {
                let _ = w.flush().await;
                shared.cuts.fetch_add(1, Relaxed);
                token.cancel();
                return;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A server that writes `data` to every connection, then closes it.
    async fn server(data: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let data = data.clone();
                tokio::spawn(async move {
                    let _ = s.write_all(&data).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    /// Everything one connection delivers until it closes or breaks.
    async fn fetch(addr: SocketAddr) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[tokio::test]
    async fn forwards_and_injects_each_fault() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let proxy = FaultProxy::start(server(data.clone()).await).await.unwrap();
        assert_eq!(fetch(proxy.addr()).await, data);

        proxy.cut_after(1000, Cuts::Times(2));
        assert_eq!(fetch(proxy.addr()).await, data[..1000]);
        assert_eq!(fetch(proxy.addr()).await, data[..1000]);
        assert_eq!(fetch(proxy.addr()).await, data, "two cuts only");

        proxy.flip_byte_at(proxy.downstream_bytes() + 5);
        let got = fetch(proxy.addr()).await;
        assert_eq!((got[5], &got[6..], &got[..5]), (data[5] ^ 0xff, &data[6..], &data[..5]));
        assert_eq!(fetch(proxy.addr()).await, data, "one flip only");

        proxy.set_bandwidth(Some(100_000));
        let t = Instant::now();
        assert_eq!(fetch(proxy.addr()).await, data);
        assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());

        proxy.clear();
        proxy.set_latency(Duration::from_millis(100));
        let t = Instant::now();
        assert_eq!(fetch(proxy.addr()).await, data);
        assert!(t.elapsed() >= Duration::from_millis(100), "{:?}", t.elapsed());

        // A slow transfer, cut from outside midway.
        proxy.clear();
        proxy.set_bandwidth(Some(10_000));
        let pending = tokio::spawn(fetch(proxy.addr()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.cut_all();
        let got = pending.await.unwrap();
        assert!(!got.is_empty() && got.len() < data.len(), "got {} bytes", got.len());
        assert_eq!(got, data[..got.len()]);

        let stats = proxy.stats();
        assert_eq!((stats.connections, stats.cuts, stats.flips), (9, 3, 1), "{stats:?}");
        assert!(stats.upstream_bytes == 0 && stats.downstream_bytes > 5 * data.len() as u64);
    }
}
