//! Test support (feature `testing`): a real `etcd` server in a temp dir, and a bounded polling
//! helper. Usable from this crate's tests and from other crates' tests (e.g. `tests/`).
//!
//! Invariants: the server never touches a system etcd — it runs the `etcd` binary from `PATH`
//! on two loopback ports found free just before it starts (retried with fresh ports when
//! another process wins the race for them), with its data and log in its own temp dir; the
//! child is killed when the [`EtcdServer`] is dropped. Restarts reuse the data dir and ports.

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tracing::debug;

use super::etcd::EtcdStore;
use crate::error::{Error, Result};

/// How long a started etcd may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped etcd may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Start attempts, each with fresh ports, before giving up.
const START_ATTEMPTS: usize = 5;
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A single-member etcd cluster owned by a test.
#[derive(Debug)]
pub struct EtcdServer {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it answers.
    pub async fn start() -> Result<Self> {
        let mut server = Self { dir: tempfile::tempdir()?, client_port: 0, peer_port: 0, child: None };
        let mut last_error = None;
        for attempt in 1..=START_ATTEMPTS {
            (server.client_port, server.peer_port) = free_port_pair()?;
            // A member's peer URL is recorded in its data; a fresh cluster needs a fresh dir.
            let data = server.data_dir();
            if data.exists() {
                std::fs::remove_dir_all(&data)?;
            }
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(error) => {
                    debug!(attempt, %error, "etcd did not start, retrying on other ports");
                    server.kill().await?;
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::StoreUnavailable("etcd did not start".into())))
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A `--store` spec for this server with keys under `prefix`.
    pub fn spec(&self, prefix: &str) -> String {
        format!("etcd:{}?prefix={prefix}", self.endpoint())
    }

    /// Connects a store with keys under `prefix`.
    pub async fn store(&self, prefix: &str) -> Result<EtcdStore> {
        EtcdStore::connect(&[self.endpoint()], prefix).await
    }

    /// The member's data directory (kept across restarts).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Whether the etcd process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops etcd gracefully (SIGTERM), killing it if it does not exit in time.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else { return Ok(()) };
        if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
            // It may have exited already (ESRCH); waiting below settles it either way.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(STOP_TIMEOUT, child.wait()).await.is_err() {
            debug!("etcd ignored sigterm, killing it");
        }
        self.kill().await
    }

    /// Kills etcd at once (SIGKILL), like a crash.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited, which is what we want.
            let _ = child.start_kill();
            child.wait().await?;
        }
        Ok(())
    }

    /// Starts etcd again on the same data dir and ports (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)) and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.launch().await
    }

    async fn launch(&mut self) -> Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--initial-cluster-state=new")
            // Short raft timings make etcd's minimum lease TTL one second instead of two, so
            // lease tests stay fast.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=250")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::Io(std::io::Error::new(e.kind(), format!("cannot run etcd from PATH: {e}")))
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !self.is_running() {
                return Err(Error::StoreUnavailable(format!("etcd exited early: {}", self.log_tail())));
            }
            let probe = tokio::time::timeout(Duration::from_secs(2), self.store("/")).await;
            if let Ok(Ok(_)) = probe {
                debug!(endpoint = %self.endpoint(), "etcd is ready");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::StoreUnavailable(format!(
                    "etcd did not answer within {READY_TIMEOUT:?}: {}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(log.len());
        log[start..].to_owned()
    }
}

/// Two distinct loopback ports that were free a moment ago (bound together, then released).
fn free_port_pair() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// Polls `check` until it returns true, panicking with `what` after `timeout`: the bounded
/// alternative to sleeping in tests.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
