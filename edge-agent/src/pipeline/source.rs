//! Sources of raw records: MQTT, a JSONL file, stdin and the built-in simulator.
//!
//! Every source runs on its own task and sends [`RawRecord`]s — the untouched bytes and the
//! moment they arrived — into the pipeline's bounded channel, so a slow model pushes back on
//! the sources instead of growing memory. Sources never parse: a malformed record is the
//! pipeline's to count. A line or message longer than [`MAX_RECORD_BYTES`] is cut just past
//! the limit, so it still arrives (and is refused as too large) without being buffered whole.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use bytes::Bytes;
use llmchain_task::{
    generate::{GenConfig, Generator},
    record::MAX_RECORD_BYTES,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    sync::mpsc,
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Error, Result};
use crate::backoff::Backoff;

/// First delay before an MQTT client reconnects (sources and executors).
pub(crate) const MQTT_MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between MQTT reconnect attempts.
pub(crate) const MQTT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One record as it arrived: raw bytes and arrival time.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// The bytes, unparsed (at most `MAX_RECORD_BYTES + 1` from line sources).
    pub bytes: Bytes,
    /// When the record arrived; latency is measured from here to the decision.
    pub arrived: Instant,
}

/// Settings of the built-in simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSpec {
    /// Generator seed.
    pub seed: u64,
    /// Records per second; 0 means as fast as the pipeline takes them.
    pub rate: f64,
    /// Records to produce before the source ends; `None`: endless.
    pub count: Option<u64>,
    /// Use the shifted distribution (new phrasings, other label mix).
    pub shifted: bool,
}

impl Default for SimSpec {
    fn default() -> Self {
        SimSpec { seed: 1, rate: 10.0, count: None, shifted: false }
    }
}

/// Where records come from, parsed from a command-line string.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// `mqtt://host[:port]/topic`: one JSON record per message (topic filters allowed).
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port (default 1883).
        port: u16,
        /// Topic filter to subscribe to.
        topic: String,
    },
    /// `jsonl:PATH`: one record per line, then the source ends.
    Jsonl(PathBuf),
    /// `stdin`: one record per line until end of input.
    Stdin,
    /// `sim[:seed=N,rate=R,count=N,shifted]`: the seeded generator.
    Sim(SimSpec),
}

fn spec_error(kind: &'static str, spec: &str, reason: impl Into<String>) -> Error {
    Error::Spec { kind, spec: spec.to_string(), reason: reason.into() }
}

/// Parses `mqtt://host[:port]/topic` into host, port and topic (shared with executors).
pub(crate) fn parse_mqtt_url(kind: &'static str, spec: &str) -> Result<(String, u16, String)> {
    let rest = spec.strip_prefix("mqtt://").ok_or_else(|| spec_error(kind, spec, "expected mqtt://"))?;
    let (authority, topic) =
        rest.split_once('/').ok_or_else(|| spec_error(kind, spec, "expected mqtt://host:port/topic"))?;
    if topic.is_empty() {
        return Err(spec_error(kind, spec, "the topic is empty"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| spec_error(kind, spec, format!("bad port {p:?}")))?),
        None => (authority, 1883),
    };
    if host.is_empty() {
        return Err(spec_error(kind, spec, "the host is empty"));
    }
    Ok((host.to_string(), port, topic.to_string()))
}

impl FromStr for SourceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("mqtt://") {
            let (host, port, topic) = parse_mqtt_url("source", s)?;
            return Ok(SourceSpec::Mqtt { host, port, topic });
        }
        if let Some(path) = s.strip_prefix("jsonl:") {
            if path.is_empty() {
                return Err(spec_error("source", s, "the path is empty"));
            }
            return Ok(SourceSpec::Jsonl(PathBuf::from(path)));
        }
        if s == "stdin" {
            return Ok(SourceSpec::Stdin);
        }
        if s == "sim" {
            return Ok(SourceSpec::Sim(SimSpec::default()));
        }
        if let Some(opts) = s.strip_prefix("sim:") {
            let mut sim = SimSpec::default();
            for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                let bad = |what: &str| spec_error("source", s, format!("bad {what} in {opt:?}"));
                match opt.split_once('=') {
                    Some(("seed", v)) => sim.seed = v.parse().map_err(|_| bad("seed"))?,
                    Some(("rate", v)) => {
                        sim.rate = v.parse().map_err(|_| bad("rate"))?;
                        if !(sim.rate.is_finite() && sim.rate >= 0.0) {
                            return Err(bad("rate"));
                        }
                    }
                    Some(("count", v)) => sim.count = Some(v.parse().map_err(|_| bad("count"))?),
                    None if opt == "shifted" => sim.shifted = true,
                    _ => {
                        return Err(spec_error(
                            "source",
                            s,
                            format!("unknown option {opt:?} (seed, rate, count, shifted)"),
                        ));
                    }
                }
            }
            return Ok(SourceSpec::Sim(sim));
        }
        Err(spec_error("source", s, "expected mqtt://host:port/topic, jsonl:PATH, stdin or sim[:options]"))
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceSpec::Mqtt { host, port, topic } => write!(f, "mqtt://{host}:{port}/{topic}"),
            SourceSpec::Jsonl(path) => write!(f, "jsonl:{}", path.display()),
            SourceSpec::Stdin => f.write_str("stdin"),
            SourceSpec::Sim(s) => {
                write!(f, "sim:seed={},rate={}", s.seed, s.rate)?;
                if let Some(c) = s.count {
                    write!(f, ",count={c}")?;
                }
                if s.shifted {
                    f.write_str(",shifted")?;
                }
                Ok(())
            }
        }
    }
}

/// Starts the source on its own task; it ends at its end of input, when the channel closes
/// or when `cancel` fires. Fails only when the source cannot be opened (a missing file).
pub async fn spawn(
    spec: &SourceSpec,
    agent_id: &str,
    tx: mpsc::Sender<RawRecord>,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>> {
    let name = spec.to_string();
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match spec.clone() {
        SourceSpec::Mqtt { host, port, topic } => {
            let client_id = format!("{agent_id}-src-{:08x}", rand::random::<u32>());
            Box::pin(mqtt(client_id, host, port, topic, tx))
        }
        SourceSpec::Jsonl(path) => {
            let file = tokio::fs::File::open(&path).await.map_err(|source| Error::Io {
                what: "cannot open record file",
                path: path.clone(),
                source,
            })?;
            Box::pin(lines(file, tx))
        }
        SourceSpec::Stdin => Box::pin(lines(tokio::io::stdin(), tx)),
        SourceSpec::Sim(sim) => Box::pin(simulate(sim, tx)),
    };
    Ok(tokio::spawn(async move {
        info!(source = %name, "source started");
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = task => {}
        }
        info!(source = %name, "source ended");
    }))
}

/// Reads newline-separated records, each cut at `MAX_RECORD_BYTES + 1` bytes; blank lines are
/// skipped.
async fn lines<R: AsyncRead + Unpin>(reader: R, tx: mpsc::Sender<RawRecord>) {
    let limit = MAX_RECORD_BYTES + 1;
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let (done, used, eof) = match reader.fill_buf().await {
            Ok([]) => (true, 0, true),
            Ok(buf) => {
                let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (&buf[..i], true),
                    None => (buf, false),
                };
                let room = limit.saturating_sub(line.len());
                line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                (done, chunk.len() + usize::from(done), false)
            }
            Err(e) => {
                warn!(error = %e, "record input failed; source ends");
                (true, 0, true)
            }
        };
        reader.consume(used);
        if done {
            let record = std::mem::take(&mut line);
            let trimmed = record.strip_suffix(b"\r").unwrap_or(&record);
            if !trimmed.iter().all(u8::is_ascii_whitespace) {
                let raw = RawRecord { bytes: Bytes::copy_from_slice(trimmed), arrived: Instant::now() };
                if tx.send(raw).await.is_err() {
                    return;
                }
            }
        }
        if eof {
            return;
        }
    }
}

/// Produces simulated records at `rate` per second (paced on the ideal schedule, so the
/// average rate holds even with a coarse timer).
async fn simulate(sim: SimSpec, tx: mpsc::Sender<RawRecord>) {
    let cfg = if sim.shifted { GenConfig::shifted(sim.seed) } else { GenConfig::base(sim.seed) };
    let mut generator = Generator::new(cfg);
    let start = Instant::now();
    let mut sent = 0u64;
    while sim.count.is_none_or(|c| sent < c) {
        if sim.rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / sim.rate)).await;
        }
        let (record, _) = generator.next_labelled();
        let raw = RawRecord { bytes: record.to_json().into(), arrived: Instant::now() };
        if tx.send(raw).await.is_err() {
            return;
        }
        sent += 1;
    }
}

/// Subscribes to `topic` and forwards every message; reconnects with exponential backoff and
/// jitter, subscribing again on every connection (the session is clean).
async fn mqtt(client_id: String, host: String, port: u16, topic: String, tx: mpsc::Sender<RawRecord>) {
    let mut opts = MqttOptions::new(client_id, host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(15));
    opts.set_clean_session(true);
    // Over-size records must still arrive, to be counted as bad rather than break the link.
    opts.set_max_packet_size(4 * MAX_RECORD_BYTES, 64 << 10);
    let (client, mut events) = AsyncClient::new(opts, 64);
    let mut backoff = Backoff::new(MQTT_MIN_BACKOFF, MQTT_MAX_BACKOFF);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                match client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                    Ok(()) => info!(%host, port, %topic, "mqtt source connected"),
                    Err(e) => warn!(error = %e, %topic, "mqtt subscribe failed"),
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let raw = RawRecord { bytes: p.payload, arrived: Instant::now() };
                if tx.send(raw).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(error = %e, %host, port, retry_in_ms = wait.as_millis() as u64, "mqtt source disconnected");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let cases = [
            (
                "mqtt://broker:1884/plant/+/telemetry",
                SourceSpec::Mqtt { host: "broker".into(), port: 1884, topic: "plant/+/telemetry".into() },
            ),
            ("mqtt://broker/t", SourceSpec::Mqtt { host: "broker".into(), port: 1883, topic: "t".into() }),
            ("jsonl:/tmp/r.jsonl", SourceSpec::Jsonl("/tmp/r.jsonl".into())),
            ("stdin", SourceSpec::Stdin),
            ("sim", SourceSpec::Sim(SimSpec::default())),
            (
                "sim:seed=7,rate=50,count=1000,shifted",
                SourceSpec::Sim(SimSpec { seed: 7, rate: 50.0, count: Some(1000), shifted: true }),
            ),
        ];
        for (text, spec) in cases {
            assert_eq!(text.parse::<SourceSpec>().unwrap(), spec, "{text}");
            assert_eq!(spec.to_string().parse::<SourceSpec>().unwrap(), spec, "{text} round trip");
        }
        for bad in
            ["mqtt://host:x/t", "mqtt://host", "mqtt://:1/t", "jsonl:", "sim:rate=-1", "sim:fast", "file.txt"]
        {
            assert!(bad.parse::<SourceSpec>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn lines_skip_blanks_and_cut_long_ones() {
        let long = "x".repeat(MAX_RECORD_BYTES + 100);
        let input = format!("a\r\n\n  \n{long}\nb");
        let (tx, mut rx) = mpsc::channel(8);
        lines(std::io::Cursor::new(input.into_bytes()), tx).await;
        let mut got = Vec::new();
        while let Some(r) = rx.recv().await {
            got.push(r.bytes.len());
        }
        assert_eq!(got, vec![1, MAX_RECORD_BYTES + 1, 1]);
    }

    #[tokio::test]
    async fn simulator_honours_count() {
        let (tx, mut rx) = mpsc::channel(8);
        let h = tokio::spawn(simulate(SimSpec { seed: 3, rate: 0.0, count: Some(20), shifted: false }, tx));
        let mut n = 0;
        while let Some(r) = rx.recv().await {
            llmchain_task::Record::parse(&r.bytes).unwrap();
            n += 1;
        }
        h.await.unwrap();
        assert_eq!(n, 20);
    }
}
