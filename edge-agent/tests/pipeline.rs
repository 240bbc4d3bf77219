//! The pipeline end to end, in-process: real sources (JSONL, simulator, MQTT through a real
//! Mosquitto), real executors and the on-disk spool, with a seeded fake model.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use llmchain_edge_agent::pipeline::{
    Decider, Decision, ExecutorSpec, PipelineConfig, Scored, SourceSpec, Spool, Stats, WindowConfig,
    run_pipeline,
};
use llmchain_proto::{
    model::{ModelName, ModelRef, Summary},
    pb,
};
use llmchain_task::{
    Label,
    generate::{GenConfig, Generator},
};
use tokio_util::sync::CancellationToken;

// The broker helper of the end-to-end crate, included by path: that crate depends on this one,
// and the pipeline's MQTT test belongs with the pipeline's other tests.
#[allow(dead_code)]
#[path = "../../tests/src/mosquitto.rs"]
mod mosquitto;

const AGENT: &str = "edge-1";

/// A seeded stand-in for the model: label and confidence from a hash of the text; switches to
/// version 2 after `swap_after` calls.
struct FakeDecider {
    swap_after: usize,
    calls: AtomicUsize,
    batches: Mutex<Vec<usize>>,
    per_version: Mutex<BTreeMap<u64, u64>>,
}

impl FakeDecider {
    fn new(swap_after: usize) -> Arc<Self> {
        Arc::new(FakeDecider {
            swap_after,
            calls: AtomicUsize::new(0),
            batches: Mutex::default(),
            per_version: Mutex::default(),
        })
    }

    fn version(&self, calls: usize) -> u64 {
        if calls < self.swap_after { 1 } else { 2 }
    }
}

fn model(version: u64) -> ModelRef {
    ModelRef { model: ModelName::parse("model", "smollm2").unwrap(), version }
}

fn fake_score(text: &str) -> Scored {
    let h =
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let label = Label::ALL[(h % 4) as usize];
    let confidence = 0.25 + ((h >> 8) % 750) as f64 / 1000.0;
    let rest = (1.0 - confidence) / 3.0;
    let scores = Label::ALL
        .iter()
        .map(|&l| {
            let p = if l == label { confidence } else { rest };
            (l, p.ln(), p)
        })
        .collect();
    Scored { label, confidence, scores }
}

impl Decider for FakeDecider {
    fn model(&self) -> Option<ModelRef> {
        Some(model(self.version(self.calls.load(Ordering::SeqCst))))
    }

    fn decide(&self, texts: &[String]) -> anyhow::Result<(ModelRef, Vec<Scored>)> {
        let version = self.version(self.calls.fetch_add(1, Ordering::SeqCst));
        self.batches.lock().unwrap().push(texts.len());
        *self.per_version.lock().unwrap().entry(version).or_default() += texts.len() as u64;
        Ok((model(version), texts.iter().map(|t| fake_score(t)).collect()))
    }
}

fn config(sources: Vec<SourceSpec>, executors: Vec<ExecutorSpec>) -> PipelineConfig {
    PipelineConfig {
        agent_id: AGENT.into(),
        sources,
        executors,
        max_batch: 16,
        max_wait: Duration::from_millis(20),
        window: WindowConfig { window: Duration::from_secs(60), max_records: None, hard_examples: 4 },
        ..Default::default()
    }
}

/// Every pending summary, validated as the coordinator would.
fn summaries(spool: &Spool) -> Vec<pb::Summary> {
    let all = spool.pending(10_000).unwrap();
    for s in &all {
        Summary::try_from(s.clone()).unwrap_or_else(|e| panic!("summary {} is invalid: {e}", s.seq));
        assert_eq!(s.agent_id, AGENT);
    }
    let seqs: Vec<u64> = all.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>(), "gapless sequence numbers");
    all
}

fn decided(s: &pb::Summary) -> u64 {
    s.label_counts.iter().map(|c| c.count).sum()
}

fn good_records(seed: u64, n: usize) -> Vec<String> {
    Generator::new(GenConfig::base(seed)).take(n).map(|(r, _)| r.to_json()).collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = good_records(11, 900);
    let mut lines = Vec::new();
    for (i, g) in good.iter().enumerate() {
        lines.push(g.clone());
        if i % 9 == 8 {
            // 100 bad ones: invalid JSON, wrong types, missing fields, out of domain, too large.
            lines.push(match (i / 9) % 6 {
                0 => g.chars().take(g.chars().count() / 2).collect(),
                1 => g.replacen("\"temp_c\":[", "\"temp_c\":[\"hot\",", 1),
                2 => g.replacen("\"device_id\"", "\"device\"", 1),
                3 => "[1,2,3]".to_string(),
                4 => g.replacen("\"rated_current_a\":", "\"rated_current_a\":-", 1),
                _ => format!("{{\"note\":\"{}\"}}", "x".repeat(70 << 10)),
            });
        }
    }
    assert_eq!(lines.len(), 1000);
    let input = dir.path().join("records.jsonl");
    write_lines(&input, &lines);
    let out = dir.path().join("decisions.jsonl");
    let spool = Arc::new(Spool::open(dir.path().join("spool"), 100).unwrap());
    let decider = FakeDecider::new(usize::MAX);
    let cfg = config(vec![SourceSpec::Jsonl(input)], vec![ExecutorSpec::Jsonl(out.clone())]);
    let stats = cfg.stats.clone();
    tokio::time::timeout(
        Duration::from_secs(20),
        run_pipeline(cfg, decider.clone(), spool.clone(), CancellationToken::new()),
    )
    .await
    .expect("the pipeline ends with its input")
    .unwrap();

    let all = summaries(&spool);
    assert_eq!(all.iter().map(|s| s.records).sum::<u64>(), 1000);
    assert_eq!(all.iter().map(|s| s.bad_records).sum::<u64>(), 100);
    assert_eq!(all.iter().map(decided).sum::<u64>(), 900);
    // A line over the limit is cut just past it: it arrives, and is refused, without being held whole.
    let cut = |l: &String| l.len().min(llmchain_task::record::MAX_RECORD_BYTES + 1) as u64;
    assert_eq!(all.iter().map(|s| s.raw_bytes).sum::<u64>(), lines.iter().map(cut).sum::<u64>());
    let snap = stats.snapshot();
    assert_eq!((snap.records, snap.bad_records, snap.decided(), snap.executor_failures), (1000, 100, 900, 0));
    assert!(decider.batches.lock().unwrap().iter().all(|&n| (1..=16).contains(&n)));

    // Every decision was executed, in order, with the model's scores.
    let written: Vec<Decision> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(written.len(), 900);
    for (d, g) in written.iter().zip(&good) {
        let record = llmchain_task::Record::parse(g.as_bytes()).unwrap();
        let expected = fake_score(&llmchain_task::preprocess::record_text(&record));
        assert_eq!((&d.device_id, &d.ts, d.label), (&record.device_id, &record.ts, expected.label));
        assert!((d.confidence - expected.confidence).abs() < 1e-12);
        assert_eq!(d.model, "smollm2@v1");
        assert_eq!(d.scores.len(), 4);
    }
    // Hard examples: the lowest confidences of their window, lowest first.
    let s = &all[0];
    let mut confidences: Vec<f64> = written.iter().map(|d| d.confidence).collect();
    confidences.sort_by(f64::total_cmp);
    let hard: Vec<f64> = s
        .hard_examples
        .iter()
        .map(|h| h.scores.iter().find(|sc| sc.label == h.decision).unwrap().probability)
        .collect();
    assert_eq!(all.len(), 1);
    assert_eq!(hard.len(), 4);
    for (h, c) in hard.iter().zip(&confidences) {
        assert!((h - c).abs() < 1e-12, "{hard:?} vs {:?}", &confidences[..4]);
    }
    assert_eq!(s.confidence_histogram.iter().sum::<u64>(), 900);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_swap_closes_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("records.jsonl");
    write_lines(&input, &good_records(5, 200));
    let spool = Arc::new(Spool::open(dir.path().join("spool"), 100).unwrap());
    let decider = FakeDecider::new(4);
    let mut cfg = config(vec![SourceSpec::Jsonl(input)], vec![]);
    cfg.max_batch = 10;
    cfg.window.max_records = Some(50);
    run_pipeline(cfg, decider.clone(), spool.clone(), CancellationToken::new()).await.unwrap();

    let all = summaries(&spool);
    let mut per_version = BTreeMap::new();
    for s in &all {
        *per_version.entry(s.model.as_ref().unwrap().version).or_insert(0) += decided(s);
        assert!(s.records <= 50 + 9, "closes at max_records: {}", s.records);
    }
    assert_eq!(
        per_version,
        *decider.per_version.lock().unwrap(),
        "each summary counts one version's decisions"
    );
    assert_eq!(per_version.len(), 2);
    let versions: Vec<u64> = all.iter().map(|s| s.model.as_ref().unwrap().version).collect();
    assert!(versions.is_sorted(), "{versions:?}");
    assert!(all.len() >= 4, "200 records, at most 59 per window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_close_on_time_and_executors_fail_softly() {
    let dir = tempfile::tempdir().unwrap();
    let env_out = dir.path().join("env.txt");
    let spool = Arc::new(Spool::open(dir.path().join("spool"), 100).unwrap());
    let mut cfg = config(
        vec!["sim:seed=3,rate=100,count=60".parse().unwrap()],
        vec![
            ExecutorSpec::Exec(format!(
                "echo \"$LLMCHAIN_DEVICE_ID $LLMCHAIN_LABEL $LLMCHAIN_CONFIDENCE $LLMCHAIN_MODEL\" >> {}",
                env_out.display()
            )),
            "exec:exit 3".parse().unwrap(),
        ],
    );
    cfg.window.window = Duration::from_millis(150);
    cfg.max_batch = 4;
    let stats: Arc<Stats> = cfg.stats.clone();
    let started = Instant::now();
    run_pipeline(cfg, FakeDecider::new(usize::MAX), spool.clone(), CancellationToken::new()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(550), "paced at 100 records/s");

    let all = summaries(&spool);
    assert!(all.len() >= 3, "a window every 150 ms over 0.6 s: {}", all.len());
    assert_eq!(all.iter().map(decided).sum::<u64>(), 60);
    for s in &all {
        assert!(s.latency_p50_ms <= s.latency_p95_ms && s.latency_p95_ms <= s.latency_p99_ms);
        assert!(s.latency_p99_ms < 5_000.0);
    }
    let lines: Vec<String> = std::fs::read_to_string(&env_out).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), 60);
    for line in &lines {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 4, "{line}");
        assert!(fields[1].parse::<Label>().is_ok() && fields[2].parse::<f64>().is_ok(), "{line}");
        assert_eq!(fields[3], "smollm2@v1");
    }
    let snap = stats.snapshot();
    assert_eq!(snap.executor_failures, 60, "every `exit 3` counted");
    assert!(snap.decisions_per_s > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_command_times_out_and_cancel_stops_an_endless_source() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path().join("spool"), 100).unwrap());
    let mut cfg = config(vec!["sim:rate=20".parse().unwrap()], vec!["exec:sleep 10".parse().unwrap()]);
    cfg.executor_timeout = Duration::from_millis(100);
    let stats = cfg.stats.clone();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(run_pipeline(cfg, FakeDecider::new(usize::MAX), spool.clone(), cancel.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.snapshot().executor_failures < 2 {
        assert!(Instant::now() < deadline, "timeouts counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(15), run).await.expect("stops when cancelled").unwrap().unwrap();
    let all = summaries(&spool);
    assert_eq!(
        all.iter().map(|s| s.records).sum::<u64>(),
        stats.snapshot().records,
        "the last window is flushed"
    );
}

#[test]
fn spool_numbers_survive_reopen_and_the_bound_drops_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let s = |records| pb::Summary { agent_id: AGENT.into(), records, ..Default::default() };
    {
        let spool = Spool::open(dir.path(), 3).unwrap();
        assert_eq!((spool.push(s(1)).unwrap(), spool.push(s(2)).unwrap()), (1, 2));
        assert_eq!(spool.ack(&[1, 99]).unwrap(), 1, "ack deletes; unknown numbers ignored");
        assert_eq!(spool.depth(), 1);
    }
    // Reopen: numbers continue, nothing repeats, even when everything was acked.
    let spool = Spool::open(dir.path(), 3).unwrap();
    assert_eq!(spool.pending(10).unwrap().iter().map(|x| x.seq).collect::<Vec<_>>(), vec![2]);
    assert_eq!(spool.ack(&[2]).unwrap(), 1);
    drop(spool);
    let spool = Spool::open(dir.path(), 3).unwrap();
    assert_eq!(spool.depth(), 0);
    let mut watch = spool.watch();
    assert_eq!(spool.push(s(3)).unwrap(), 3);
    assert!(watch.has_changed().unwrap());
    assert_eq!(*watch.borrow_and_update(), 3);

    // Bound 3: pushing 6 drops 3, and the drop rides on the summary that caused it.
    for n in 4..=6 {
        spool.push(s(n)).unwrap();
    }
    let pending = spool.pending(10).unwrap();
    assert_eq!(
        pending.iter().map(|x| (x.seq, x.records, x.spool_dropped)).collect::<Vec<_>>(),
        vec![(4, 4, 0), (5, 5, 0), (6, 6, 1)]
    );
    assert_eq!(spool.pending(2).unwrap().len(), 2);
    assert_eq!(spool.dropped_total(), 1);

    // A smaller bound at reopen drops the oldest and reports them in the next summary.
    drop(spool);
    let spool = Spool::open(dir.path(), 2).unwrap();
    assert_eq!(spool.pending(10).unwrap().iter().map(|x| x.seq).collect::<Vec<_>>(), vec![5, 6]);
    assert_eq!(spool.push(s(7)).unwrap(), 7);
    assert_eq!(
        spool.pending(10).unwrap().iter().map(|x| (x.seq, x.spool_dropped)).collect::<Vec<_>>(),
        vec![(6, 1), (7, 2)]
    );
    assert_eq!(spool.dropped_total(), 3);
}

#[test]
fn spool_reopens_cleanly_after_a_crash_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path(), 10).unwrap();
        for n in 1..=3 {
            spool.push(pb::Summary { agent_id: AGENT.into(), records: n, ..Default::default() }).unwrap();
        }
    }
    // What a kill between write and rename leaves: half-written temporary files.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for name in &names {
        std::fs::write(dir.path().join(format!("{name}.tmp")), b"\x0a\x05half").unwrap();
    }
    std::fs::write(dir.path().join("00000000000000000004.summary.tmp"), b"\x0a").unwrap();
    let spool = Spool::open(dir.path(), 10).unwrap();
    let left: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(left.iter().all(|n| !n.ends_with(".tmp")), "{left:?}");
    assert_eq!(spool.pending(10).unwrap().iter().map(|x| x.records).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(spool.push(pb::Summary::default()).unwrap(), 4);
}

/// Subscribes to `topic` and forwards each message's payload.
async fn subscriber(port: u16, topic: &str) -> tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (client, mut events) = AsyncClient::new(MqttOptions::new("test-sub", "127.0.0.1", port), 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let topic = topic.to_string();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.try_subscribe(topic.clone(), QoS::AtLeastOnce).unwrap()
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p.payload).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    rx
}

/// Publishes `records` to `topic` until every device id among them has a decision on `rx`.
async fn publish_until_decided(
    client: &rumqttc::AsyncClient,
    topic: &str,
    records: &[String],
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
) -> Vec<Decision> {
    let want: BTreeSet<String> =
        records.iter().map(|r| llmchain_task::Record::parse(r.as_bytes()).unwrap().device_id).collect();
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Resend until everything came back: the pipeline subscribes (again) asynchronously.
    while !want.iter().all(|d| seen.contains_key(d)) {
        assert!(
            Instant::now() < deadline,
            "decisions for {:?} never arrived",
            want.difference(&seen.keys().cloned().collect())
        );
        for r in records
            .iter()
            .filter(|r| !seen.contains_key(&llmchain_task::Record::parse(r.as_bytes()).unwrap().device_id))
        {
            client.publish(topic, rumqttc::QoS::AtLeastOnce, false, r.clone()).await.unwrap();
        }
        let until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(payload)) = tokio::time::timeout_at(until, rx.recv()).await {
            let d: Decision = serde_json::from_slice(&payload).unwrap();
            seen.insert(d.device_id.clone(), d);
        }
    }
    want.iter().map(|d| seen[d].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_records_in_decisions_out_across_a_broker_restart() {
    use rumqttc::{AsyncClient, MqttOptions};
    let mut broker = mosquitto::Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path().join("spool"), 100).unwrap());
    let cfg = config(
        vec![broker.url("plant/+/telemetry").parse().unwrap()],
        vec![broker.url("plant/decisions").parse().unwrap()],
    );
    let stats = cfg.stats.clone();
    let cancel = CancellationToken::new();
    let run = tokio::spawn(run_pipeline(cfg, FakeDecider::new(usize::MAX), spool.clone(), cancel.clone()));

    let mut decisions = subscriber(broker.port(), "plant/decisions").await;
    let (client, mut events) = AsyncClient::new(MqttOptions::new("test-pub", "127.0.0.1", broker.port()), 64);
    tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let records = good_records(21, 20);
    for bad in ["{not json", "{\"device_id\":7}"] {
        client.publish("plant/a/telemetry", rumqttc::QoS::AtLeastOnce, false, bad).await.unwrap();
    }
    let got = publish_until_decided(&client, "plant/a/telemetry", &records, &mut decisions).await;
    assert!(!got.is_empty());
    for d in &got {
        assert_eq!(d.model, "smollm2@v1");
        assert_eq!(d.scores.len(), 4);
    }

    // The broker goes away and comes back: the source and executor reconnect on their own.
    broker.restart();
    let more = good_records(22, 5);
    let got = publish_until_decided(&client, "plant/b/telemetry", &more, &mut decisions).await;
    assert_eq!(got.len(), 5);

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(15), run).await.expect("stops when cancelled").unwrap().unwrap();
    let snap = stats.snapshot();
    assert!(snap.decided() >= 25, "{snap:?}");
    let all = summaries(&spool);
    assert_eq!(all.iter().map(decided).sum::<u64>(), snap.decided());
    assert!(all.iter().map(|s| s.bad_records).sum::<u64>() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_open_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(Spool::open(dir.path().join("spool"), 10).unwrap());
    let cfg = config(
        vec!["sim:rate=1000".parse().unwrap(), SourceSpec::Jsonl(dir.path().join("missing.jsonl"))],
        vec![],
    );
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        run_pipeline(cfg, FakeDecider::new(usize::MAX), spool.clone(), CancellationToken::new()),
    )
    .await
    .expect("fails at once")
    .unwrap_err();
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
    assert_eq!(spool.depth(), 0);
}
