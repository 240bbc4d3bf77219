//! A real Mosquitto broker for tests: started on a free 127.0.0.1 port with a temporary
//! configuration, killed when dropped.
//!
//! `make setup` installs the broker (`/usr/sbin/mosquitto`, or `LLMCHAIN_MOSQUITTO`); a
//! missing binary fails the test with that instruction rather than silently skipping.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running Mosquitto broker, killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    /// Temporary directory holding the configuration, removed on drop.
    dir: PathBuf,
}

/// Path of the broker binary: `LLMCHAIN_MOSQUITTO` or `/usr/sbin/mosquitto`.
pub fn mosquitto_bin() -> PathBuf {
    let path = std::env::var_os("LLMCHAIN_MOSQUITTO")
        .map_or_else(|| PathBuf::from("/usr/sbin/mosquitto"), PathBuf::from);
    assert!(path.is_file(), "{} is missing: run `make setup` (installs mosquitto)", path.display());
    path
}

fn free_port() -> u16 {
    // Bound and released: the broker gets it unless another process races for it, which
    // `start` detects by the broker exiting.
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local address").port()
}

impl Mosquitto {
    /// Starts a broker on a free port and waits (bounded) until it accepts connections.
    pub fn start() -> Mosquitto {
        for _ in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("llmchain-mosquitto-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temporary directory");
            let mut m = Mosquitto { child: None, port, dir };
            if m.spawn() {
                return m;
            }
        }
        panic!("mosquitto did not start on a free port in 5 attempts");
    }

    /// Kills the broker, leaving the port free; [`Mosquitto::restart`] brings it back on the
    /// same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port (after [`Mosquitto::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(Instant::now() < deadline, "mosquitto did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The broker's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `mqtt://127.0.0.1:PORT/topic`.
    pub fn url(&self, topic: &str) -> String {
        format!("mqtt://127.0.0.1:{}/{topic}", self.port)
    }

    /// Starts the broker; false when it exited before accepting (the port was taken).
    fn spawn(&mut self) -> bool {
        let config = self.dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n",
                self.port
            ),
        )
        .expect("write mosquitto.conf");
        let mut child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mosquitto");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().ok().flatten().is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
