//! Executors: what the node does with each decision.
//!
//! `mqtt://host:port/topic` publishes the decision as JSON, `jsonl:PATH` appends it as one
//! line, `exec:COMMAND` runs `sh -c COMMAND` with the decision in `LLMCHAIN_*` variables.
//! Each configured executor runs on its own task behind a bounded queue, so a slow command
//! does not delay an MQTT publish, and decisions reach each executor in order. Every action
//! has a timeout; a failure is logged and counted, never fatal.

use std::{fmt, path::PathBuf, str::FromStr, sync::Arc, time::Duration};

use llmchain_task::{Label, Record};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};
use serde::Serialize;
use tokio::{io::AsyncWriteExt, sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::{
    Error, Result, Scored, Stats,
    source::{MQTT_MAX_BACKOFF, MQTT_MIN_BACKOFF, parse_mqtt_url},
};
use crate::backoff::Backoff;

/// Decisions queued per executor before the pipeline waits.
const QUEUE: usize = 256;
/// Longest the executors may take to drain their queues at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// Where decisions go, parsed from a command-line string.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecutorSpec {
    /// `mqtt://host[:port]/topic`: publish each decision as JSON (QoS 1).
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port (default 1883).
        port: u16,
        /// Topic to publish to.
        topic: String,
    },
    /// `jsonl:PATH`: append each decision as one JSON line.
    Jsonl(PathBuf),
    /// `exec:COMMAND`: run `sh -c COMMAND` per decision with `LLMCHAIN_DEVICE_ID`,
    /// `LLMCHAIN_LABEL`, `LLMCHAIN_CONFIDENCE`, `LLMCHAIN_MODEL` and `LLMCHAIN_DECISION` (the
    /// JSON) set; a non-zero exit is a failure.
    Exec(String),
}

impl FromStr for ExecutorSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            |reason: &str| Error::Spec { kind: "executor", spec: s.to_string(), reason: reason.to_string() };
        if s.starts_with("mqtt://") {
            let (host, port, topic) = parse_mqtt_url("executor", s)?;
            if topic.contains(['+', '#']) {
                return Err(bad("cannot publish to a topic filter"));
            }
            return Ok(ExecutorSpec::Mqtt { host, port, topic });
        }
        if let Some(path) = s.strip_prefix("jsonl:") {
            if path.is_empty() {
                return Err(bad("the path is empty"));
            }
            return Ok(ExecutorSpec::Jsonl(PathBuf::from(path)));
        }
        if let Some(cmd) = s.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err(bad("the command is empty"));
            }
            return Ok(ExecutorSpec::Exec(cmd.to_string()));
        }
        Err(bad("expected mqtt://host:port/topic, jsonl:PATH or exec:COMMAND"))
    }
}

impl fmt::Display for ExecutorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecutorSpec::Mqtt { host, port, topic } => write!(f, "mqtt://{host}:{port}/{topic}"),
            ExecutorSpec::Jsonl(path) => write!(f, "jsonl:{}", path.display()),
            ExecutorSpec::Exec(cmd) => write!(f, "exec:{cmd}"),
        }
    }
}

/// One label's score in a published decision.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DecisionScore {
    /// Label.
    pub label: Label,
    /// Log-probability.
    pub logprob: f64,
    /// Softmax probability.
    pub probability: f64,
}

/// A decision as executors publish it (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Decision {
    /// Machine the record came from.
    pub device_id: String,
    /// The record's timestamp, as sent.
    pub ts: String,
    /// Chosen label.
    pub label: Label,
    /// Softmax probability of the label.
    pub confidence: f64,
    /// Version that decided, `name@vN`.
    pub model: String,
    /// Every label's score.
    pub scores: Vec<DecisionScore>,
}

impl Decision {
    /// The decision on `record`.
    pub fn new(record: &Record, scored: &Scored, model: &str) -> Self {
        Decision {
            device_id: record.device_id.clone(),
            ts: record.ts.clone(),
            label: scored.label,
            confidence: scored.confidence,
            model: model.to_string(),
            scores: scored
                .scores
                .iter()
                .map(|&(label, logprob, probability)| DecisionScore { label, logprob, probability })
                .collect(),
        }
    }

    /// The decision as one line of JSON.
    pub fn to_json(&self) -> String {
        // Non-finite scores serialise as null, so this cannot fail.
        serde_json::to_string(self).expect("a decision always serialises")
    }
}

/// The running executors.
pub struct Executors {
    queues: Vec<mpsc::Sender<Arc<Decision>>>,
    tasks: Vec<JoinHandle<()>>,
}

enum Action {
    Mqtt { client: AsyncClient, topic: String, driver: JoinHandle<()> },
    Jsonl { file: tokio::fs::File },
    Exec { command: String },
}

impl Executors {
    /// Opens every executor (a JSONL file is created or appended to now; an MQTT broker is
    /// connected to in the background) and starts its task.
    pub async fn start(
        specs: &[ExecutorSpec],
        agent_id: &str,
        timeout: Duration,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for spec in specs {
            let action = match spec {
                ExecutorSpec::Mqtt { host, port, topic } => {
                    let client_id = format!("{agent_id}-exec-{:08x}", rand::random::<u32>());
                    let mut opts = MqttOptions::new(client_id, host.clone(), *port);
                    opts.set_keep_alive(Duration::from_secs(15));
                    opts.set_max_packet_size(64 << 10, 64 << 10);
                    let (client, events) = AsyncClient::new(opts, 64);
                    let driver = tokio::spawn(drive(events, host.clone(), *port));
                    Action::Mqtt { client, topic: topic.clone(), driver }
                }
                ExecutorSpec::Jsonl(path) => {
                    let file =
                        tokio::fs::OpenOptions::new().create(true).append(true).open(path).await.map_err(
                            |source| Error::Io {
                                what: "cannot open decision file",
                                path: path.clone(),
                                source,
                            },
                        )?;
                    Action::Jsonl { file }
                }
                ExecutorSpec::Exec(command) => Action::Exec { command: command.clone() },
            };
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push(tx);
            tasks.push(tokio::spawn(run(spec.to_string(), action, rx, timeout, stats.clone())));
        }
        Ok(Executors { queues, tasks })
    }

    /// Queues `decision` for every executor, waiting while a queue is full.
    pub async fn dispatch(&self, decision: Decision) {
        let decision = Arc::new(decision);
        for q in &self.queues {
            // A closed queue means its task ended, which it only does at shutdown.
            let _ = q.send(decision.clone()).await;
        }
    }

    /// Lets every executor drain its queue (bounded), then stops them.
    pub async fn shutdown(self) {
        drop(self.queues);
        let deadline = tokio::time::Instant::now() + DRAIN;
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                warn!("executor did not drain in time; stopped");
                abort.abort();
            }
        }
    }
}

async fn run(
    name: String,
    mut action: Action,
    mut rx: mpsc::Receiver<Arc<Decision>>,
    timeout: Duration,
    stats: Arc<Stats>,
) {
    info!(executor = %name, "executor started");
    while let Some(decision) = rx.recv().await {
        let result = action.act(&decision, timeout).await;
        if let Err(e) = result {
            stats.executor_failure();
            warn!(executor = %name, device_id = %decision.device_id, label = %decision.label, error = %e, "executor failed");
        }
    }
    action.close().await;
    info!(executor = %name, "executor stopped");
}

impl Action {
    async fn act(&mut self, d: &Decision, timeout: Duration) -> Result<(), String> {
        let timed_out = || format!("timed out after {timeout:?}");
        match self {
            Action::Mqtt { client, topic, .. } => {
                let publish = client.publish(topic.as_str(), QoS::AtLeastOnce, false, d.to_json());
                match tokio::time::timeout(timeout, publish).await {
                    Ok(r) => r.map_err(|e| format!("publish: {e}")),
                    Err(_) => Err(timed_out()),
                }
            }
            Action::Jsonl { file } => {
                let mut line = d.to_json();
                line.push('\n');
                let write = async {
                    file.write_all(line.as_bytes()).await?;
                    file.flush().await
                };
                match tokio::time::timeout(timeout, write).await {
                    Ok(r) => r.map_err(|e| format!("write: {e}")),
                    Err(_) => Err(timed_out()),
                }
            }
            Action::Exec { command } => {
                let mut child = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(command.as_str())
                    .env("LLMCHAIN_DEVICE_ID", &d.device_id)
                    .env("LLMCHAIN_LABEL", d.label.as_str())
                    .env("LLMCHAIN_CONFIDENCE", format!("{:.4}", d.confidence))
                    .env("LLMCHAIN_MODEL", &d.model)
                    .env("LLMCHAIN_DECISION", d.to_json())
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    // Its own process group, so a timeout kills whatever the shell started too.
                    .process_group(0)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot run sh: {e}"))?;
                match tokio::time::timeout(timeout, child.wait()).await {
                    Ok(Ok(status)) if status.success() => Ok(()),
                    Ok(Ok(status)) => Err(format!("command exited with {status}")),
                    Ok(Err(e)) => Err(format!("waiting for the command: {e}")),
                    Err(_) => {
                        if let Some(pid) = child.id() {
                            let _ = tokio::process::Command::new("kill")
                                .args(["-KILL", "--", &format!("-{pid}")])
                                .stderr(std::process::Stdio::null())
                                .status()
                                .await;
                        }
                        let _ = child.kill().await;
                        Err(timed_out())
                    }
                }
            }
        }
    }

    async fn close(self) {
        if let Action::Mqtt { client, driver, .. } = self {
            // Queued publishes go out before the disconnect; the driver stops after it.
            let abort = driver.abort_handle();
            let _ = client.disconnect().await;
            if tokio::time::timeout(Duration::from_secs(2), driver).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Drives an MQTT client's connection: reconnects with backoff and jitter; ends after the
/// client disconnects.
async fn drive(mut events: rumqttc::EventLoop, host: String, port: u16) {
    let mut backoff = Backoff::new(MQTT_MIN_BACKOFF, MQTT_MAX_BACKOFF);
    loop {
        match events.poll().await {
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                backoff.reset();
                info!(%host, port, "mqtt executor connected");
            }
            Ok(_) => {}
            Err(e) => {
                let wait = backoff.next_delay();
                warn!(error = %e, %host, port, retry_in_ms = wait.as_millis() as u64, "mqtt executor disconnected");
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
        assert_eq!(
            "mqtt://127.0.0.1:1999/plant/decisions".parse::<ExecutorSpec>().unwrap(),
            ExecutorSpec::Mqtt { host: "127.0.0.1".into(), port: 1999, topic: "plant/decisions".into() }
        );
        assert_eq!(
            "jsonl:out.jsonl".parse::<ExecutorSpec>().unwrap(),
            ExecutorSpec::Jsonl("out.jsonl".into())
        );
        assert_eq!("exec:echo $X".parse::<ExecutorSpec>().unwrap(), ExecutorSpec::Exec("echo $X".into()));
        for bad in ["mqtt://h/a/#", "exec: ", "jsonl:", "stdout"] {
            assert!(bad.parse::<ExecutorSpec>().is_err(), "{bad}");
        }
    }
}
