//! `make bench-fleet`: many simulated agents against one real coordinator process.
//!
//! Each simulated agent speaks the real Fleet protocol with its own identity (its agent id in
//! insecure mode): a `Session` stream that opens with a Hello and then sends a Heartbeat every
//! `FLEET_HEARTBEAT_S`, and a `ReportSummaries` call with one realistic summary (label
//! counts, histogram, 4 hard examples) every `FLEET_SUMMARY_S`. Agents run on tokio in worker
//! processes (this binary re-executed with `--worker`). The coordinator runs on an embedded
//! store in a temp dir.
//!
//! **Connections.** Agents share HTTP/2 connections, `FLEET_AGENTS_PER_CONN` (100) per
//! connection, each agent still on its own session stream: on this machine a process may hold
//! at most 20,000 open files (`RLIMIT_NOFILE`, hard limit, not raisable without
//! CAP_SYS_RESOURCE), so 20,000 agents cannot each own a socket to one coordinator process.
//! 100 agents per connection keep the streams of one connection (100 sessions plus at most
//! one summary call each) within hyper's default of 200 concurrent streams per connection.
//! The number of connections used is printed and in the JSON.
//!
//! What is measured, honestly:
//! - **agents held**: sessions open in the workers at the end, and agents the coordinator
//!   lists as online (their heartbeat lease alive);
//! - **heartbeat latency**: the coordinator sends nothing back on a heartbeat, so each worker
//!   polls `ListAgents` (its own agents, by label, every 5 s) and matches each agent's
//!   `last_heartbeat` — stamped by the coordinator when it handles the heartbeat, after
//!   renewing the session lease and before writing the agent record — with the send time of
//!   the latest heartbeat sent before it (same host, same clock). So it is send → handled,
//!   including queueing on the session and the lease renewal, not the final record write;
//! - **session open**: Hello → Welcome, a real round trip on the stream;
//! - **summary RTT**: `ReportSummaries` request → acknowledgment (each summary stored once);
//! - the coordinator's **CPU %** (utime+stime over wall time) and **RSS** from `/proc/<pid>`,
//!   and the simulated agents' CPU % (all workers together: they share the machine's cores
//!   with the coordinator), plus the machine's load average at start and end (it is shared).
//!
//! Configuration (environment): `FLEET_AGENTS` (20000), `FLEET_SECONDS` of steady state after
//! the ramp (120), `FLEET_RAMP_PER_S` new agents per second (1000), `FLEET_HEARTBEAT_S` (10),
//! `FLEET_SUMMARY_S` (60), `FLEET_AGENTS_PER_CONN` (100; 1 gives each agent its own TCP
//! connection, up to the fd limit), `FLEET_AGENTS_PER_WORKER` (20000),
//! `FLEET_COORDINATOR` (the coordinator binary; default `target/release/coordinator`).
//! `--json OUT` writes the figures as JSON too. It prints figures; it asserts nothing.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use llmchain_proto::pb::{self, fleet_client::FleetClient};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// Every knob of one run.
#[derive(Debug, Clone)]
struct Config {
    agents: usize,
    seconds: u64,
    ramp_per_s: f64,
    heartbeat: Duration,
    summary: Duration,
    agents_per_conn: usize,
    agents_per_worker: usize,
}

impl Config {
    fn from_env() -> Result<Config> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        }
        let c = Config {
            agents: var("FLEET_AGENTS", 20_000)?,
            seconds: var("FLEET_SECONDS", 120)?,
            ramp_per_s: var("FLEET_RAMP_PER_S", 1000.0)?,
            heartbeat: Duration::from_secs_f64(var("FLEET_HEARTBEAT_S", 10.0)?),
            summary: Duration::from_secs_f64(var("FLEET_SUMMARY_S", 60.0)?),
            agents_per_conn: var("FLEET_AGENTS_PER_CONN", 100)?,
            agents_per_worker: var("FLEET_AGENTS_PER_WORKER", 20_000)?,
        };
        anyhow::ensure!(
            c.agents > 0 && c.agents_per_conn > 0 && c.agents_per_worker > 0,
            "counts must be positive"
        );
        anyhow::ensure!(c.ramp_per_s > 0.0, "FLEET_RAMP_PER_S must be positive");
        Ok(c)
    }

    fn ramp(&self) -> Duration {
        Duration::from_secs_f64(self.agents as f64 / self.ramp_per_s)
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--worker") {
        let get = |k: usize| args.get(i + k).context("--worker WORKER FIRST COUNT ADDR START_UNIX_MS");
        let worker: usize = get(1)?.parse()?;
        let first: usize = get(2)?.parse()?;
        let count: usize = get(3)?.parse()?;
        let addr = get(4)?.clone();
        let start_ms: u64 = get(5)?.parse()?;
        let config = Config::from_env()?;
        raise_fd_limit();
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let report = rt.block_on(worker_main(config, worker, first, count, addr, start_ms))?;
        println!("{report}");
        return Ok(());
    }
    let json_out = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let config = Config::from_env()?;
    let figures = coordinator_main(&config)?;
    print_figures(&figures);
    if let Some(out) = json_out {
        std::fs::write(&out, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        println!("figures written to {}", out.display());
    }
    Ok(())
}

/// Raises the soft file-descriptor limit to the hard one; returns the new soft limit.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn from_timestamp(t: &prost_types::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
}

// ---------------------------------------------------------------------------------------
// The parent: coordinator, workers, /proc sampling, figures.

/// The coordinator binary: `FLEET_COORDINATOR`, else target/release/coordinator next to this
/// bench's target directory.
fn coordinator_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("FLEET_COORDINATOR") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/fleet-<hash> → target/release/coordinator
    let target = exe.ancestors().nth(3).context("target directory")?;
    let path = target.join("release").join("coordinator");
    if !path.is_file() {
        bail!(
            "{} is missing: `cargo build --release -p llmchain-coordinator --bin coordinator` (make bench-fleet does)",
            path.display()
        );
    }
    Ok(path)
}

fn coordinator_main(config: &Config) -> Result<Value> {
    let fd_limit = raise_fd_limit();
    let dir = tempfile::tempdir()?;
    let bin = coordinator_bin()?;
    let help = Command::new(&bin).args(["serve", "--help"]).output().with_context(|| {
        format!("cannot run {} (FLEET_COORDINATOR must be an absolute path)", bin.display())
    })?;
    let insecure = String::from_utf8_lossy(&help.stdout).contains("--insecure");
    let lease_ms = (config.heartbeat.as_millis() * 3).max(1000);
    let mut cmd = Command::new(&bin);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("embedded:{}", dir.path().join("state.redb").display()))
        .arg("--blobs")
        .arg(dir.path().join("blobs"))
        .args(["--heartbeat-interval-ms", &config.heartbeat.as_millis().to_string()])
        .args(["--lease-ttl-ms", &lease_ms.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.path().join("coordinator.log"))?));
    if insecure {
        cmd.arg("--insecure");
    }
    let mut coordinator = Killed(cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?);
    let pid = coordinator.0.id();
    let mut lines = BufReader::new(coordinator.0.stdout.take().context("coordinator stdout")?).lines();
    let addr = loop {
        match lines.next() {
            Some(line) => {
                if let Some(a) = line?.strip_prefix("listening on ") {
                    break a.trim().to_string();
                }
            }
            None => bail!(
                "coordinator exited before listening; see {}",
                dir.path().join("coordinator.log").display()
            ),
        }
    };
    let per_worker = config.agents_per_worker.div_ceil(config.agents_per_conn) * config.agents_per_conn;
    // Agent connections (a new one every `agents_per_conn` agents of a worker), plus one per
    // worker for its ListAgents prober.
    let conns = (0..config.agents)
        .step_by(per_worker)
        .map(|first| per_worker.min(config.agents - first).div_ceil(config.agents_per_conn) + 1)
        .sum::<usize>();
    let load_start = loadavg();
    eprintln!(
        "fleet bench: {} agents on {conns} connections, ramp {:.0}/s, heartbeat {:?}, summary {:?}, steady {} s; coordinator {} (pid {pid}, {addr}{}), fd limit {fd_limit}",
        config.agents,
        config.ramp_per_s,
        config.heartbeat,
        config.summary,
        config.seconds,
        bin.display(),
        if insecure { ", --insecure" } else { "" },
    );

    // Workers start together, each ramping its share at its share of the rate.
    let start_ms = unix_ms(SystemTime::now()) + 500;
    let exe = std::env::current_exe()?;
    let mut workers = Vec::new();
    let mut first = 0;
    while first < config.agents {
        let count = per_worker.min(config.agents - first);
        let mut child = Command::new(&exe)
            .args(["--worker", &workers.len().to_string(), &first.to_string(), &count.to_string(), &addr])
            .arg(start_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        // Read its report as it comes: it is larger than a pipe holds.
        let mut stdout = child.stdout.take().context("worker stdout")?;
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
            out
        });
        workers.push((Killed(child), reader));
        first += count;
    }

    // Sample the coordinator once a second until the workers are done.
    let started = Instant::now();
    let ticks = user_hz();
    let page = 4096u64;
    let mut samples: Vec<(f64, f64, u64)> = Vec::new(); // (t s, cpu s, rss bytes)
    let worker_pids: Vec<u32> = workers.iter().map(|w| w.0.0.id()).collect();
    let mut client_samples: Vec<(f64, f64)> = Vec::new(); // (t s, cpu s of all workers)
    let total = config.ramp() + Duration::from_secs(config.seconds) + Duration::from_secs(2);
    let mut last_print = Instant::now();
    while workers.iter_mut().any(|w| w.0.0.try_wait().ok().flatten().is_none()) {
        let client_cpu: Option<f64> =
            worker_pids.iter().map(|&p| proc_sample(p, ticks, page).map(|s| s.0)).sum();
        if let Some(cpu) = client_cpu {
            client_samples.push((started.elapsed().as_secs_f64(), cpu));
        }
        if let Some((cpu, rss)) = proc_sample(pid, ticks, page) {
            samples.push((started.elapsed().as_secs_f64(), cpu, rss));
            if last_print.elapsed() >= Duration::from_secs(10) {
                last_print = Instant::now();
                eprintln!(
                    "  t={:>4.0}s/{:.0}s coordinator rss {:.0} MiB, cpu {:.1} s",
                    started.elapsed().as_secs_f64(),
                    total.as_secs_f64(),
                    rss as f64 / (1 << 20) as f64,
                    cpu
                );
            }
        } else if coordinator.0.try_wait().ok().flatten().is_some() {
            eprintln!("coordinator exited during the run");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut reports = Vec::new();
    for (_child, reader) in workers {
        let out = reader.join().map_err(|_| anyhow::anyhow!("worker reader panicked"))?;
        let line = out.lines().last().unwrap_or_default();
        reports.push(serde_json::from_str::<Value>(line).with_context(|| format!("worker report {line:?}"))?);
    }
    let coordinator_alive = coordinator.0.try_wait().ok().flatten().is_none();

    // CPU and RSS over the steady state (after the ramp), and peak RSS over the whole run.
    let steady_from = (config.ramp() + Duration::from_secs(1)).as_secs_f64();
    let steady: Vec<_> = samples.iter().filter(|s| s.0 >= steady_from).collect();
    let cpu_pct = match (steady.first(), steady.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => 100.0 * (b.1 - a.1) / (b.0 - a.0),
        _ => f64::NAN,
    };
    let client_steady: Vec<_> = client_samples.iter().filter(|s| s.0 >= steady_from).collect();
    let client_cpu_pct = match (client_steady.first(), client_steady.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => 100.0 * (b.1 - a.1) / (b.0 - a.0),
        _ => f64::NAN,
    };
    let rss_end = samples.last().map_or(0, |s| s.2);
    let rss_peak = proc_peak_rss(pid).unwrap_or_else(|| samples.iter().map(|s| s.2).max().unwrap_or(0));

    let sum = |k: &str| reports.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let merged = |k: &str| {
        let mut v: Vec<u64> = reports
            .iter()
            .flat_map(|r| r[k].as_array().cloned().unwrap_or_default())
            .filter_map(|x| x.as_u64())
            .collect();
        v.sort_unstable();
        v
    };
    let hb = merged("heartbeat_us");
    let hb_steady = merged("heartbeat_steady_us");
    let hello = merged("hello_us");
    let summary = merged("summary_us");
    let online = reports.iter().map(|r| r["online_seen"].as_u64().unwrap_or(0)).sum::<u64>();
    Ok(json!({
        "agents_target": config.agents,
        "connections": conns,
        "agents_per_connection": config.agents_per_conn,
        "workers": reports.len(),
        "steady_seconds": config.seconds,
        "ramp_seconds": config.ramp().as_secs_f64(),
        "heartbeat_interval_s": config.heartbeat.as_secs_f64(),
        "summary_interval_s": config.summary.as_secs_f64(),
        "fd_limit": fd_limit,
        "coordinator_alive": coordinator_alive,
        "agents_connected_end": sum("connected_end"),
        "agents_online_end": online,
        "agents_max_connected": sum("max_connected"),
        "sessions_opened": sum("sessions_opened"),
        "session_failures": sum("session_failures"),
        "connect_failures": sum("connect_failures"),
        "heartbeats_sent": sum("heartbeats_sent"),
        "heartbeat_samples": hb.len(),
        "heartbeat_p50_ms": pct_ms(&hb, 0.50),
        "heartbeat_p99_ms": pct_ms(&hb, 0.99),
        "heartbeat_max_ms": hb.last().map(|&u| u as f64 / 1000.0),
        "heartbeat_steady_samples": hb_steady.len(),
        "heartbeat_steady_p50_ms": pct_ms(&hb_steady, 0.50),
        "heartbeat_steady_p99_ms": pct_ms(&hb_steady, 0.99),
        "hello_p50_ms": pct_ms(&hello, 0.50),
        "hello_p99_ms": pct_ms(&hello, 0.99),
        "summaries_sent": sum("summaries_sent"),
        "summaries_acked": sum("summaries_acked"),
        "summary_failures": sum("summary_failures"),
        "summary_p50_ms": pct_ms(&summary, 0.50),
        "summary_p99_ms": pct_ms(&summary, 0.99),
        "coordinator_cpu_pct": cpu_pct,
        "client_cpu_pct": client_cpu_pct,
        "load_start": load_start,
        "load_end": loadavg(),
        "coordinator_rss_mib_end": rss_end as f64 / (1 << 20) as f64,
        "coordinator_rss_mib_peak": rss_peak as f64 / (1 << 20) as f64,
        "machine_cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
    }))
}

fn print_figures(f: &Value) {
    let ms = |k: &str| f[k].as_f64().map_or("n/a".to_string(), |v| format!("{v:.1} ms"));
    println!(
        "fleet bench ({} agents target, {} connections, {} workers)",
        f["agents_target"], f["connections"], f["workers"]
    );
    println!(
        "  agents connected at the end   {} (coordinator lists {} online; max connected {})",
        f["agents_connected_end"], f["agents_online_end"], f["agents_max_connected"]
    );
    println!(
        "  sessions opened               {} ({} session failures, {} connect failures)",
        f["sessions_opened"], f["session_failures"], f["connect_failures"]
    );
    println!(
        "  heartbeat send → handled      p50 {}  p99 {}  ({} samples of {} sent)",
        ms("heartbeat_p50_ms"),
        ms("heartbeat_p99_ms"),
        f["heartbeat_samples"],
        f["heartbeats_sent"]
    );
    println!(
        "  … sent after the ramp         p50 {}  p99 {}  ({} samples: every agent connected)",
        ms("heartbeat_steady_p50_ms"),
        ms("heartbeat_steady_p99_ms"),
        f["heartbeat_steady_samples"]
    );
    println!("  session open Hello → Welcome  p50 {}  p99 {}", ms("hello_p50_ms"), ms("hello_p99_ms"));
    println!(
        "  ReportSummaries RTT           p50 {}  p99 {}  ({} acked of {} sent, {} failed calls)",
        ms("summary_p50_ms"),
        ms("summary_p99_ms"),
        f["summaries_acked"],
        f["summaries_sent"],
        f["summary_failures"]
    );
    println!(
        "  coordinator                   cpu {:.0}% of one core (steady state), rss {:.0} MiB at the end, {:.0} MiB peak",
        f["coordinator_cpu_pct"].as_f64().unwrap_or(f64::NAN),
        f["coordinator_rss_mib_end"].as_f64().unwrap_or(0.0),
        f["coordinator_rss_mib_peak"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  simulated agents (workers)    cpu {:.0}% of one core (steady state); {} agents per HTTP/2 connection (fd limit {})",
        f["client_cpu_pct"].as_f64().unwrap_or(f64::NAN),
        f["agents_per_connection"],
        f["fd_limit"]
    );
    println!(
        "  machine load average          {} at start, {} at the end ({} cpus, shared)",
        f["load_start"].as_str().unwrap_or("?"),
        f["load_end"].as_str().unwrap_or("?"),
        f["machine_cpus"]
    );
    println!("  targets: 20,000 agents, heartbeat p99 < 100 ms, rss < 1024 MiB (reported, not asserted)");
}

fn pct_ms(sorted: &[u64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i] as f64 / 1000.0)
}

/// Clock ticks per second of /proc/<pid>/stat times: Linux's USER_HZ, 100 on every mainstream
/// architecture (the kernel scales to it whatever its internal HZ).
fn user_hz() -> u64 {
    100
}

/// (CPU seconds used, resident bytes) of `pid` from /proc.
fn proc_sample(pid: u32, ticks: u64, page: u64) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the ")" that ends the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let rss_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(((utime + stime) as f64 / ticks as f64, rss_pages * page))
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg writes them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// VmHWM (peak resident set) of `pid`.
fn proc_peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A child killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------------
// A worker: `count` simulated agents from `first`, then one JSON line of figures.

/// What one agent shares with the worker's prober: send times of its recent heartbeats.
#[derive(Default)]
struct Probe {
    /// (send time, heartbeat seq) of the last few heartbeats, newest last.
    sent: Vec<(SystemTime, u64)>,
    /// Highest heartbeat seq whose latency was already sampled (per session, see `session`).
    sampled: u64,
    /// Session counter, so a new session's seq 1 is not taken for the old one's.
    session: u64,
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    max_connected: AtomicU64,
    sessions_opened: AtomicU64,
    session_failures: AtomicU64,
    connect_failures: AtomicU64,
    heartbeats_sent: AtomicU64,
    summaries_sent: AtomicU64,
    summaries_acked: AtomicU64,
    summary_failures: AtomicU64,
}

struct Shared {
    counters: Counters,
    probes: Vec<Mutex<Probe>>,
    hello_us: Mutex<Vec<u64>>,
    summary_us: Mutex<Vec<u64>>,
    heartbeat_us: Mutex<Vec<u64>>,
    /// The samples of heartbeats sent after the ramp (every agent connected).
    heartbeat_steady_us: Mutex<Vec<u64>>,
    /// When the ramp ends, on the wall clock the coordinator stamps heartbeats with.
    steady_from: SystemTime,
    config: Config,
    worker: usize,
    first: usize,
    end: tokio::time::Instant,
    /// Cancelled after the prober's last listing: agents hold their sessions until then, so
    /// the coordinator's final count of online agents is not racing their goodbyes.
    release: tokio_util::sync::CancellationToken,
}

fn agent_id(i: usize) -> String {
    format!("sim-{i:06}")
}

async fn worker_main(
    config: Config,
    worker: usize,
    first: usize,
    count: usize,
    addr: String,
    start_ms: u64,
) -> Result<Value> {
    let now_ms = unix_ms(SystemTime::now());
    tokio::time::sleep(Duration::from_millis(start_ms.saturating_sub(now_ms))).await;
    let begin = tokio::time::Instant::now();
    let end = begin + config.ramp() + Duration::from_secs(config.seconds);
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        probes: (0..count).map(|_| Mutex::default()).collect(),
        hello_us: Mutex::default(),
        summary_us: Mutex::default(),
        heartbeat_us: Mutex::default(),
        heartbeat_steady_us: Mutex::default(),
        steady_from: UNIX_EPOCH + Duration::from_millis(start_ms) + config.ramp(),
        config: config.clone(),
        worker,
        first,
        end,
        release: tokio_util::sync::CancellationToken::new(),
    });
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30));
    let prober = tokio::spawn(prober(shared.clone(), endpoint.clone(), count));
    // This worker's share of the global ramp rate.
    let total_workers = config.agents.div_ceil(config.agents_per_worker).max(1);
    let interval = Duration::from_secs_f64(total_workers as f64 / config.ramp_per_s);
    let mut agents = Vec::with_capacity(count);
    let mut channel: Option<Channel> = None;
    for k in 0..count {
        tokio::time::sleep_until(begin + interval.mul_f64(k as f64)).await;
        if k % config.agents_per_conn == 0 || channel.is_none() {
            // Lazy: the connection is made by the first call and remade after it breaks.
            channel = Some(endpoint.connect_lazy());
        }
        let ch = channel.clone().expect("channel");
        agents.push(tokio::spawn(agent(shared.clone(), k, ch)));
    }
    for a in agents {
        let _ = a.await;
    }
    let online_seen = prober.await.unwrap_or(0);
    let c = &shared.counters;
    let take = |m: &Mutex<Vec<u64>>| std::mem::take(&mut *m.lock().unwrap());
    Ok(json!({
        "worker": worker,
        "connected_end": c.connected.load(Relaxed),
        "max_connected": c.max_connected.load(Relaxed),
        "sessions_opened": c.sessions_opened.load(Relaxed),
        "session_failures": c.session_failures.load(Relaxed),
        "connect_failures": c.connect_failures.load(Relaxed),
        "heartbeats_sent": c.heartbeats_sent.load(Relaxed),
        "summaries_sent": c.summaries_sent.load(Relaxed),
        "summaries_acked": c.summaries_acked.load(Relaxed),
        "summary_failures": c.summary_failures.load(Relaxed),
        "online_seen": online_seen,
        "hello_us": take(&shared.hello_us),
        "summary_us": take(&shared.summary_us),
        "heartbeat_us": take(&shared.heartbeat_us),
        "heartbeat_steady_us": take(&shared.heartbeat_steady_us),
    }))
}

/// Every 5 s, lists this worker's agents and samples send → handled of new heartbeats.
/// Returns how many of them the coordinator listed online in the last successful listing.
async fn prober(shared: Arc<Shared>, endpoint: Endpoint, count: usize) -> u64 {
    let _release = shared.release.clone().drop_guard();
    let Ok(channel) = endpoint.connect().await else { return 0 };
    let mut client = FleetClient::new(channel).max_decoding_message_size(256 << 20);
    let selector = format!("bench-worker={}", shared.worker);
    let mut online = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let last = tokio::time::Instant::now() >= shared.end;
        let Ok(listing) = client.list_agents(pb::ListAgentsRequest { selector: selector.clone() }).await
        else {
            if last {
                return online;
            }
            continue;
        };
        let agents = listing.into_inner().agents;
        online = agents.iter().filter(|a| a.online).count() as u64;
        let (mut samples, mut steady) = (Vec::new(), Vec::new());
        for info in agents {
            let Some(k) = info.agent_id.strip_prefix("sim-").and_then(|n| n.parse::<usize>().ok()) else {
                continue;
            };
            let Some(k) = k.checked_sub(shared.first).filter(|&k| k < count) else { continue };
            let Some(stamp) = info.last_heartbeat.as_ref().map(from_timestamp) else { continue };
            let mut probe = shared.probes[k].lock().unwrap();
            // The latest heartbeat sent before the coordinator's stamp is the one it handled.
            let Some(&(sent, seq)) = probe.sent.iter().rev().find(|(sent, _)| *sent <= stamp) else {
                continue;
            };
            if seq > probe.sampled {
                probe.sampled = seq;
                let us = stamp.duration_since(sent).unwrap_or_default().as_micros() as u64;
                samples.push(us);
                if sent >= shared.steady_from {
                    steady.push(us);
                }
            }
        }
        shared.heartbeat_us.lock().unwrap().extend(samples);
        shared.heartbeat_steady_us.lock().unwrap().extend(steady);
        if last {
            return online;
        }
    }
}

/// One simulated agent until the end of the run: session, heartbeats, summaries, reconnects.
async fn agent(shared: Arc<Shared>, k: usize, channel: Channel) {
    let id = agent_id(shared.first + k);
    let mut client = FleetClient::new(channel);
    let config = &shared.config;
    let c = &shared.counters;
    // Spread the periodic work evenly: a fixed per-agent phase.
    let phase = |period: Duration| period.mul_f64(((k * 7919) % 1000) as f64 / 1000.0);
    let mut next_summary = tokio::time::Instant::now() + phase(config.summary);
    let mut summary_seq = 1u64;
    let labels = vec![
        pb::Label { key: "bench".into(), value: "fleet".into() },
        pb::Label { key: "bench-worker".into(), value: shared.worker.to_string() },
    ];
    while tokio::time::Instant::now() < shared.end {
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(4);
        let hello = pb::AgentMessage {
            kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                agent_id: id.clone(),
                labels: labels.clone(),
                status: Some(status()),
                agent_version: "fleet-bench".into(),
            })),
        };
        let _ = tx.send(hello).await;
        let sent = Instant::now();
        let opened = tokio::time::timeout(
            Duration::from_secs(30),
            client.session(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let mut inbound = match opened {
            Ok(Ok(r)) => r.into_inner(),
            _ => {
                c.connect_failures.fetch_add(1, Relaxed);
                backoff(&shared).await;
                continue;
            }
        };
        match tokio::time::timeout(Duration::from_secs(30), inbound.message()).await {
            Ok(Ok(Some(pb::CoordinatorMessage {
                kind: Some(pb::coordinator_message::Kind::Welcome(_)),
            }))) => {}
            _ => {
                c.session_failures.fetch_add(1, Relaxed);
                backoff(&shared).await;
                continue;
            }
        }
        shared.hello_us.lock().unwrap().push(sent.elapsed().as_micros() as u64);
        c.sessions_opened.fetch_add(1, Relaxed);
        let now = c.connected.fetch_add(1, Relaxed) + 1;
        c.max_connected.fetch_max(now, Relaxed);
        {
            let mut p = shared.probes[k].lock().unwrap();
            p.session += 1;
            p.sent.clear();
            p.sampled = 0;
        }
        let mut hb_seq = 0u64;
        let mut next_hb = tokio::time::Instant::now() + phase(config.heartbeat);
        let mut summary: Option<tokio::task::JoinHandle<bool>> = None;
        let ended_ok = loop {
            tokio::select! {
                () = tokio::time::sleep_until(shared.end) => break true,
                () = tokio::time::sleep_until(next_hb) => {
                    next_hb += config.heartbeat;
                    hb_seq += 1;
                    let now = SystemTime::now();
                    {
                        let mut p = shared.probes[k].lock().unwrap();
                        p.sent.push((now, hb_seq));
                        if p.sent.len() > 4 {
                            p.sent.remove(0);
                        }
                    }
                    let msg = pb::AgentMessage {
                        kind: Some(pb::agent_message::Kind::Heartbeat(pb::Heartbeat {
                            seq: hb_seq,
                            sent_at: Some(timestamp(now)),
                            status: Some(status()),
                        })),
                    };
                    if tx.send(msg).await.is_err() {
                        break false;
                    }
                    c.heartbeats_sent.fetch_add(1, Relaxed);
                }
                () = tokio::time::sleep_until(next_summary), if summary.is_none() => {
                    next_summary += config.summary;
                    let report = pb::ReportSummariesRequest { agent_id: id.clone(), summaries: vec![make_summary(&id, summary_seq)] };
                    let mut client = client.clone();
                    let shared = shared.clone();
                    summary = Some(tokio::spawn(async move {
                        let c = &shared.counters;
                        c.summaries_sent.fetch_add(1, Relaxed);
                        let t = Instant::now();
                        match client.report_summaries(report).await {
                            Ok(r) => {
                                shared.summary_us.lock().unwrap().push(t.elapsed().as_micros() as u64);
                                c.summaries_acked.fetch_add(r.into_inner().acked.len() as u64, Relaxed);
                                true
                            }
                            Err(_) => {
                                c.summary_failures.fetch_add(1, Relaxed);
                                false
                            }
                        }
                    }));
                }
                done = async { summary.as_mut().expect("guarded").await }, if summary.is_some() => {
                    summary = None;
                    // An acknowledged summary is done; a failed one is sent again next time.
                    if done.unwrap_or(false) {
                        summary_seq += 1;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break false,
                },
            }
        };
        if let Some(s) = summary.take()
            && s.await.unwrap_or(false)
        {
            summary_seq += 1;
        }
        c.connected.fetch_sub(1, Relaxed);
        if ended_ok {
            // Hold the session until every agent is done and the prober has counted the
            // coordinator's online agents.
            c.connected.fetch_add(1, Relaxed);
            shared.release.cancelled().await;
            return;
        }
        c.session_failures.fetch_add(1, Relaxed);
        backoff(&shared).await;
    }
}

/// 1-2 s before reconnecting, jittered so a mass disconnect does not reconnect in lockstep.
async fn backoff(shared: &Shared) {
    let jitter =
        (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos() % 1000) as u64;
    let wake = tokio::time::Instant::now() + Duration::from_millis(1000 + jitter);
    tokio::time::sleep_until(wake.min(shared.end)).await;
}

fn status() -> pb::AgentStatus {
    pb::AgentStatus {
        running: Some(pb::ModelRef { model: "smollm2-135m".into(), version: 1 }),
        pending: None,
        decisions_per_second: 2.5,
        raw_bytes: 1 << 20,
        summary_bytes: 4096,
        ..Default::default()
    }
}

/// A summary of the size the agent sends by default (4 hard examples).
fn make_summary(agent: &str, seq: u64) -> pb::Summary {
    let end = SystemTime::now();
    let labels = ["normal", "inspect", "throttle", "shutdown"];
    let example = "temp 81.2C (+12.4 over 5 min), vibration 4.1 mm/s rising, pressure 3.2 bar steady, \
                   rpm 1450; operator note: slight burning smell near the bearing housing after restart";
    pb::Summary {
        agent_id: agent.into(),
        seq,
        window_start: Some(timestamp(end - Duration::from_secs(60))),
        window_end: Some(timestamp(end)),
        model: Some(pb::ModelRef { model: "smollm2-135m".into(), version: 1 }),
        label_counts: labels
            .iter()
            .zip([120u64, 20, 8, 2])
            .map(|(l, n)| pb::LabelCount { label: (*l).into(), count: n })
            .collect(),
        confidence_histogram: vec![0, 0, 1, 2, 4, 9, 15, 30, 50, 39],
        latency_p50_ms: 40.0,
        latency_p95_ms: 80.0,
        latency_p99_ms: 120.0,
        records: 152,
        raw_bytes: 152 * 420,
        bad_records: 2,
        hard_examples: (0..4)
            .map(|_| pb::HardExample {
                text: example.into(),
                decision: "inspect".into(),
                scores: labels
                    .iter()
                    .zip([0.30, 0.35, 0.2, 0.15])
                    .map(|(l, p): (&&str, f64)| pb::LabelScore {
                        label: (*l).into(),
                        logprob: p.ln(),
                        probability: p,
                    })
                    .collect(),
            })
            .collect(),
        spool_dropped: 0,
    }
}
