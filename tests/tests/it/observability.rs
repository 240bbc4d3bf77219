//! Metrics and the dashboard on the real binaries: a coordinator with `--http-listen`, agents
//! with `--metrics-listen`, tiny models published through the registry API; `/metrics` parsed
//! as Prometheus text, and the dashboard loaded in a real headless Chromium.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use llmchain_task::generate::{GenConfig, Generator};
use llmchain_tests::{
    eventually,
    fleet::{Coordinator, TrainerKey, assign, publish, spawn_agent, tiny_model, wait_addr, wait_running},
};
use prometheus_parse::{Scrape, Value};

/// A plain HTTP/1.1 GET: status code and body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    (status, body.to_string())
}

/// `/metrics` of `addr`, parsed as Prometheus text.
fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF:\n{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("/metrics parses as Prometheus text")
}

/// The value of sample `name` whose labels include `labels`, if exactly one matches.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    let sample = found.next()?;
    assert!(found.next().is_none(), "several {name} samples match {labels:?}");
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        other => panic!("{name} is not a plain value: {other:?}"),
    }
}

/// Sum of every `name` sample, by its `label` label.
fn by_label(scrape: &Scrape, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in scrape.samples.iter().filter(|s| s.metric == name) {
        let key = s.labels.get(label).unwrap_or_default().to_string();
        if let Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) = s.value {
            *out.entry(key).or_default() += v;
        }
    }
    out
}

fn wait_line_addr(c: &Coordinator) -> SocketAddr {
    wait_addr(c.proc.as_ref().expect("coordinator process"), "http listening on ", Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_coordinator_and_agent_count_a_scripted_run() {
    const MODEL: &str = "tiny-metrics";
    const GOOD: usize = 24;
    const BAD: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let c = Coordinator::start(dir.path(), &[&trainer.public], &["--http-listen", "127.0.0.1:0"]);
    let http = wait_line_addr(&c);
    publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(3, &[])).await;

    // Records come through a FIFO that this test holds open, so the source never ends (the
    // agent would stop after a finite file) and exactly the lines written are decided.
    let fifo = dir.path().join("records.fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success(), "mkfifo");
    let source = format!("jsonl:{}", fifo.display());
    let agent = spawn_agent(
        dir.path(),
        "edge-1",
        &c.url(),
        &trainer.public,
        &["--source", &source, "--window-s", "0.5", "--metrics-listen", "127.0.0.1:0"],
    );
    let agent_http = wait_addr(&agent, "metrics listening on ", Duration::from_secs(30));
    let mut fleet = c.fleet().await;
    assign(&mut fleet, "edge-1", MODEL, 1, false).await;
    wait_running(&mut fleet, "edge-1", MODEL, 1, Duration::from_secs(60)).await;

    // The agent opens its sources once a model serves; opening the FIFO for writing waits
    // for that.
    let mut generator = Generator::new(GenConfig::base(11));
    let mut lines: Vec<String> = (0..GOOD).map(|_| generator.next_labelled().0.to_json()).collect();
    lines.extend((0..BAD).map(|i| format!("{{\"not a record\": {i}")));
    let writer = std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new().write(true).open(&fifo).expect("open the fifo");
        for line in lines {
            writeln!(file, "{line}").unwrap();
        }
        file.flush().unwrap();
        // Held open until the test ends, so the source does not end.
        file
    });
    let _fifo_writer = tokio::task::spawn_blocking(move || writer.join().unwrap()).await.unwrap();

    // The agent: every record counted, decided or bad, with a latency each; its summaries
    // all acknowledged.
    let total = (GOOD + BAD) as f64;
    let agent_scrape = eventually(Duration::from_secs(30), || {
        let scrape = scrape(agent_http);
        let done = value(&scrape, "llmchain_agent_records_total", &[]) == Some(total)
            && by_label(&scrape, "llmchain_agent_decisions_total", "label").values().sum::<f64>()
                == GOOD as f64
            && value(&scrape, "llmchain_agent_spool_depth", &[]) == Some(0.0)
            && value(&scrape, "llmchain_agent_summaries_total", &[]) > Some(0.0);
        std::future::ready(done.then_some(scrape))
    })
    .await
    .unwrap_or_else(|| panic!("the agent's counters did not settle: {}", http_get(agent_http, "/metrics").1));
    assert_eq!(value(&agent_scrape, "llmchain_agent_bad_records_total", &[]), Some(BAD as f64));
    assert_eq!(value(&agent_scrape, "llmchain_agent_decide_errors_total", &[]), Some(0.0));
    assert_eq!(value(&agent_scrape, "llmchain_agent_decision_latency_seconds_count", &[]), Some(GOOD as f64));
    assert_eq!(value(&agent_scrape, "llmchain_agent_model_version", &[("model", MODEL)]), Some(1.0));
    let agent_downloaded = value(&agent_scrape, "llmchain_agent_download_bytes_total", &[]).unwrap();
    assert!(agent_downloaded > 1e6, "the tiny model is ~13 MB; got {agent_downloaded}");
    assert!(value(&agent_scrape, "llmchain_agent_blob_cache_misses_total", &[]) > Some(0.0));
    assert_eq!(value(&agent_scrape, "llmchain_agent_blob_cache_hits_total", &[]), Some(0.0));
    assert_eq!(
        value(&agent_scrape, "llmchain_agent_download_done_bytes", &[]),
        value(&agent_scrape, "llmchain_agent_download_total_bytes", &[])
    );
    let agent_decisions = by_label(&agent_scrape, "llmchain_agent_decisions_total", "label");

    // The coordinator: the same decisions per label ingested, the bytes it served are the
    // bytes the agent received, one agent online running v1. The records can span two summary
    // windows (they close every 0.5 s) and the agent's gate above can pass between them, so
    // wait until the coordinator holds every record and as many summaries as the agent has
    // sent by then, and compare with that later scrape of the agent.
    let (coordinator, agent_scrape) = eventually(Duration::from_secs(20), || {
        let (coordinator, agent) = (scrape(http), scrape(agent_http));
        let ingested = by_label(&coordinator, "llmchain_decisions_ingested_total", "label");
        let stored = value(&coordinator, "llmchain_summaries_ingested_total", &[("outcome", "stored")]);
        let done = ingested.values().sum::<f64>() == GOOD as f64
            && value(&coordinator, "llmchain_records_ingested_total", &[("model", MODEL)]) == Some(total)
            && stored.is_some()
            && value(&agent, "llmchain_agent_summaries_total", &[]) == stored
            && value(&agent, "llmchain_agent_spool_depth", &[]) == Some(0.0);
        std::future::ready(done.then_some((coordinator, agent)))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the coordinator did not ingest {GOOD} decisions and every summary the agent sent: {}\n\nagent:\n{}",
            http_get(http, "/metrics").1,
            http_get(agent_http, "/metrics").1
        )
    });
    let ingested = by_label(&coordinator, "llmchain_decisions_ingested_total", "label");
    for (label, n) in &agent_decisions {
        assert_eq!(ingested.get(label).copied().unwrap_or(0.0), *n, "decisions labelled {label}");
    }
    let fleet_decisions = by_label(&coordinator, "llmchain_fleet_decisions", "label");
    assert_eq!(fleet_decisions.values().sum::<f64>(), GOOD as f64, "{fleet_decisions:?}");
    assert_eq!(
        value(&coordinator, "llmchain_bad_records_ingested_total", &[("model", MODEL)]),
        Some(BAD as f64)
    );
    assert_eq!(value(&coordinator, "llmchain_records_ingested_total", &[("model", MODEL)]), Some(total));
    assert_eq!(value(&coordinator, "llmchain_fetch_blob_bytes_total", &[]), Some(agent_downloaded));
    assert_eq!(value(&coordinator, "llmchain_agents", &[("state", "online")]), Some(1.0));
    assert_eq!(value(&coordinator, "llmchain_agents", &[("state", "offline")]), Some(0.0));
    assert_eq!(
        value(&coordinator, "llmchain_agents_running", &[("model", MODEL), ("version", "1")]),
        Some(1.0)
    );
    assert_eq!(value(&coordinator, "llmchain_model_versions", &[("model", MODEL)]), Some(1.0));
    assert_eq!(value(&coordinator, "llmchain_versions_published_total", &[("model", MODEL)]), Some(1.0));
    assert!(value(&coordinator, "llmchain_agent_sessions_opened_total", &[]) >= Some(1.0));
    let stored = value(&coordinator, "llmchain_summaries_ingested_total", &[("outcome", "stored")]).unwrap();
    assert_eq!(value(&agent_scrape, "llmchain_agent_summaries_total", &[]), Some(stored));
    let saved = value(&coordinator, "llmchain_fleet_bytes_saved", &[]).unwrap();
    let raw = value(&coordinator, "llmchain_fleet_raw_bytes", &[]).unwrap();
    assert_eq!(raw, value(&agent_scrape, "llmchain_agent_raw_bytes_total", &[]).unwrap());
    assert!(saved > 0.0 && saved < raw, "saved {saved} of {raw} raw bytes");

    let (status, health) = http_get(http, "/healthz");
    assert_eq!((status, health.as_str()), (200, "ok\n"));
    assert_eq!(http_get(agent_http, "/healthz").0, 200);
}

/// The workspace's `target/` directory (the test executable is `target/<profile>/deps/<test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).expect("target directory").to_path_buf()
}

fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
    ])
    .args(["--virtual-time-budget=5000", "--window-size=1400,1100"])
    .args(args)
    .arg(url);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run chromium ({e}): run `make setup`, which installs it"));
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_in_a_real_browser() {
    const MODEL: &str = "tiny-dash";
    let dir = tempfile::tempdir().unwrap();
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let c = Coordinator::start(dir.path(), &[&trainer.public], &["--http-listen", "127.0.0.1:0"]);
    let http = wait_line_addr(&c);
    publish(c.addr, &trainer.key, MODEL, 1, &tiny_model(5, &[])).await;
    publish(c.addr, &trainer.key, MODEL, 2, &tiny_model(5, &["layers.1.mlp.down_proj"])).await;
    let args = ["--source", "sim:rate=20", "--window-s", "0.5"];
    let _a1 = spawn_agent(dir.path(), "dash-edge-1", &c.url(), &trainer.public, &args);
    let _a2 = spawn_agent(dir.path(), "dash-edge-2", &c.url(), &trainer.public, &args);
    let mut fleet = c.fleet().await;
    assign(&mut fleet, "dash-edge-1", MODEL, 1, false).await;
    assign(&mut fleet, "dash-edge-2", MODEL, 2, false).await;
    wait_running(&mut fleet, "dash-edge-1", MODEL, 1, Duration::from_secs(60)).await;
    wait_running(&mut fleet, "dash-edge-2", MODEL, 2, Duration::from_secs(60)).await;
    // Some decisions reach the coordinator, so the chart has bars.
    let decided = eventually(Duration::from_secs(20), || {
        let (_, body) = http_get(http, "/api/fleet");
        let fleet: serde_json::Value = serde_json::from_str(&body).unwrap();
        std::future::ready((fleet["totals"]["summaries"].as_u64() >= Some(2)).then_some(()))
    })
    .await;
    assert!(decided.is_some(), "no summaries reached the coordinator");

    let url = format!("http://{http}/");
    let dom = String::from_utf8(chromium(&["--dump-dom"], &url).stdout).unwrap();
    for agent in ["dash-edge-1", "dash-edge-2"] {
        assert!(
            dom.contains(&format!("<td class=\"agent-id\">{agent}</td>")),
            "{agent} not on the page:\n{dom}"
        );
    }
    for version in [1, 2] {
        let shown = format!("<td class=\"model-version\">{MODEL}:{version}");
        assert!(dom.contains(&shown), "version {version} not on the page:\n{dom}");
    }
    assert!(dom.contains(&format!("<td class=\"agent-version\">{MODEL}:2")), "dash-edge-2 runs v2:\n{dom}");
    assert!(dom.contains(">2 / 2</div>"), "both agents online:\n{dom}");
    // A refresh that failed would show its error here.
    let no_error = r#"<div id="error" style="display: none;"></div>"#;
    assert!(dom.contains(no_error), "the page failed to load its data:\n{dom}");
    assert!(dom.contains("<rect"), "the decisions chart has bars:\n{dom}");

    let out_dir = target_dir().join("test-output");
    std::fs::create_dir_all(&out_dir).unwrap();
    let png = out_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(&[&format!("--screenshot={}", png.display())], &url);
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", png.display());
    assert!(bytes.len() > 20_000, "{} is only {} bytes", png.display(), bytes.len());
    eprintln!("dashboard screenshot: {} ({} bytes)", png.display(), bytes.len());
}
