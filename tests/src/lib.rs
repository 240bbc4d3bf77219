//! Helpers for end-to-end tests that drive the real LLMChain binaries.
//!
//! The binaries come from the same target directory as the test executable: `cargo nextest run
//! --workspace` (what `make test` runs) builds every package's binaries along with its
//! integration tests. Running only this package's tests does not rebuild the other packages'
//! binaries, so build them first (`cargo build --workspace --bins`); a missing one fails the test
//! with that instruction rather than silently skipping.

pub mod fleet;
pub mod mosquitto;
pub mod proxy;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Lines the child wrote to stdout after the one we waited for.
    pub stdout: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and waits (bounded) for the stdout line `listening on ADDR`.
pub fn spawn_listening(mut cmd: Command, timeout: Duration) -> (Proc, SocketAddr) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn binary");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut proc = Proc { child, stdout: rx };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match proc.stdout.recv_timeout(left) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return (proc, addr.trim().parse().expect("listening address"));
                }
            }
            Err(e) => {
                let status = proc.child.try_wait().ok().flatten();
                panic!("no `listening on` line within {timeout:?} ({e}); exit status {status:?}");
            }
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The SmolLM2-135M-Instruct GGUF that `make setup` links into the work tree.
pub fn smollm2_gguf() -> PathBuf {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.llmchain/smollm2.gguf"));
    assert!(path.exists(), "{} is missing: run `make setup`", path.display());
    path
}
