//! A small fleet for end-to-end tests: a real `coordinator` process, tiny models published
//! through the real registry API, real `edge-agent run` processes, and a gRPC operator client.
//!
//! Models are tiny (2 layers, hidden 64) but use SmolLM2's real tokenizer and chat template, so
//! every code path of the agent — verified load, prefix cache, scoring, self-test — runs as it
//! does on the 135M model, in milliseconds instead of seconds.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use llmchain_artifact::{Manifest, ModelRef, SigningKey, TrainingMetadata};
use llmchain_cloud_trainer::{publish::Publisher, version};
use llmchain_model::{Llama, LlamaConfig, SaveDtype, gguf::Gguf, tokenizer::Tokenizer};
use llmchain_proto::{
    model::ModelName,
    pb::{self, fleet_client::FleetClient},
};
use tch::{Device, Kind, Tensor};
use tonic::transport::Channel;

use crate::{Proc, bin, eventually, smollm2_gguf, spawn_listening};

/// SmolLM2's tokenizer, built once per test process.
pub fn smollm2_tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let gguf = Gguf::open(&smollm2_gguf()).expect("open the SmolLM2 gguf");
        Tokenizer::from_gguf(&gguf).expect("tokenizer from the gguf")
    })
}

/// The config of the tiny test model: SmolLM2's vocabulary, 2 layers of width 64.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 49152,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: 2048,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

/// A tiny model with seeded random weights. Tensors whose name contains one of `changed`
/// are drawn from `seed + 1`, the others from `seed`, so two models built with the same seed
/// share every unchanged tensor bit for bit (and so their blobs).
pub fn tiny_model(seed: i64, changed: &[&str]) -> Llama {
    Llama::from_fetch(tiny_config(), Device::Cpu, |name, shape| {
        let salt = name.bytes().fold(0i64, |h, b| h.wrapping_mul(31).wrapping_add(i64::from(b)));
        let bump = i64::from(changed.iter().any(|c| name.contains(c)));
        tch::manual_seed(seed.wrapping_add(bump).wrapping_mul(1_000_003).wrapping_add(salt));
        Ok(if name.ends_with("norm.weight") {
            Tensor::ones(shape, (Kind::Float, Device::Cpu))
        } else {
            Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.05
        })
    })
    .expect("tiny model")
}

/// A trainer identity: a key pair on disk.
pub struct TrainerKey {
    /// The private key file.
    pub private: PathBuf,
    /// The public key file (what coordinators and agents trust).
    pub public: PathBuf,
    /// The key itself.
    pub key: SigningKey,
}

impl TrainerKey {
    /// Generates a key pair under `dir` named `name.key` / `name.pub`.
    pub fn generate(dir: &Path, name: &str) -> TrainerKey {
        let key = SigningKey::generate().expect("key");
        let private = dir.join(format!("{name}.key"));
        let public = dir.join(format!("{name}.pub"));
        key.save(&private).expect("save key");
        key.public().save(&public).expect("save public key");
        TrainerKey { private, public, key }
    }
}

/// Builds version `version` of `model_name` from `model`, signs it with `key` and publishes it
/// to a coordinator started with `--insecure`.
pub async fn publish(
    addr: SocketAddr,
    key: &SigningKey,
    model_name: &str,
    version: u64,
    model: &Llama,
) -> Manifest {
    let transport = llmchain_runtime::tls::Transport::Insecure;
    publish_over(&format!("http://{addr}"), &transport, key, model_name, version, model).await
}

/// Like [`publish`], to the coordinator at `url` over `transport` (e.g. a trainer identity).
pub async fn publish_over(
    url: &str,
    transport: &llmchain_runtime::tls::Transport,
    key: &SigningKey,
    model_name: &str,
    version: u64,
    model: &Llama,
) -> Manifest {
    let id = ModelRef { model: ModelName::parse("model", model_name).unwrap(), version };
    let build = version::build(
        model,
        smollm2_tokenizer(),
        id.clone(),
        version.saturating_sub(1),
        SaveDtype::F32,
        TrainingMetadata {
            mode: "import".into(),
            dataset_digest: None,
            metrics: Vec::new(),
            records: 0,
            note: "tiny test model".into(),
        },
    )
    .expect("build version");
    let signed = key.sign(&build.manifest);
    let mut publisher = Publisher::connect_with(url, transport).await.expect("connect publisher");
    publisher.publish(&build.blobs, &signed, &id).await.expect("publish");
    build.manifest
}

/// A coordinator process on an embedded store under `dir`, restartable on the same port.
pub struct Coordinator {
    /// The process (killed on drop).
    pub proc: Option<Proc>,
    /// Its gRPC address.
    pub addr: SocketAddr,
    dir: PathBuf,
    keys: Vec<PathBuf>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl Coordinator {
    /// Starts a coordinator trusting `keys`, with a short heartbeat and lease for tests.
    pub fn start(dir: &Path, keys: &[&Path], extra: &[&str]) -> Coordinator {
        Self::start_with_env(dir, keys, extra, &[])
    }

    /// Like [`Coordinator::start`], with extra environment variables (e.g.
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`), kept across restarts.
    pub fn start_with_env(dir: &Path, keys: &[&Path], extra: &[&str], env: &[(&str, &str)]) -> Coordinator {
        let mut c = Coordinator {
            proc: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            keys: keys.iter().map(|k| k.to_path_buf()).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        c.restart();
        c
    }

    /// (Re)starts the process on the same address (a fresh port the first time).
    pub fn restart(&mut self) {
        self.proc = None;
        let mut cmd = Command::new(bin("coordinator"));
        cmd.args(["serve", "--listen", &self.addr.to_string(), "--store"])
            .arg(format!("embedded:{}", self.dir.join("state.redb").display()))
            .arg("--blobs")
            .arg(self.dir.join("blobs"))
            .args(["--heartbeat-interval-ms", "300", "--lease-ttl-ms", "1500"])
            .args(&self.extra)
            .env_clear()
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        for k in &self.keys {
            cmd.arg("--trainer-key").arg(k);
        }
        // Plaintext unless the test asks for TLS with `--tls-dir`: most tests are not about
        // transport security (security_pki.rs is).
        if !self.extra.iter().any(|a| a == "--tls-dir") {
            cmd.arg("--insecure");
        }
        let (proc, addr) = spawn_listening(cmd, Duration::from_secs(30));
        self.proc = Some(proc);
        self.addr = addr;
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// The coordinator's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A Fleet client (operator view).
    pub async fn fleet(&self) -> FleetClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(self.url()).unwrap().connect().await.unwrap();
        FleetClient::new(channel)
    }
}

/// Starts `edge-agent run` with id `id`, state under `dir/<id>`, talking to `coordinator_url`.
pub fn spawn_agent(dir: &Path, id: &str, coordinator_url: &str, trainer_key: &Path, args: &[&str]) -> Proc {
    spawn_agent_with_env(dir, id, coordinator_url, trainer_key, args, &[])
}

/// Like [`spawn_agent`], with extra environment variables (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
pub fn spawn_agent_with_env(
    dir: &Path,
    id: &str,
    coordinator_url: &str,
    trainer_key: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let home = dir.join(id);
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["run", "--agent-id", id, "--coordinator", coordinator_url, "--cache-dir"])
        .arg(home.join("cache"))
        .arg("--state-dir")
        .arg(home.join("state"))
        .arg("--trainer-key")
        .arg(trainer_key)
        .args(["--report-interval-ms", "200", "--max-backoff-ms", "1000", "--device", "cpu"])
        .args(args)
        .env_clear()
        .env("RUST_LOG", "info,llmchain_edge_agent=debug")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join(format!("{id}.log"))).expect("agent log file")));
    // Plaintext unless `edge-agent enroll` left an identity in the state directory, which
    // `run` then uses for mutual TLS.
    if !home.join("state").join(llmchain_runtime::tls::IDENTITY_CERT).is_file() {
        cmd.arg("--insecure");
    }
    let mut child = cmd.spawn().expect("spawn edge-agent");
    // Lines the agent prints (e.g. `metrics listening on ADDR`) for [`wait_addr`].
    let stdout = child.stdout.take().expect("agent stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc { child, stdout: rx }
}

/// Waits (bounded) for the stdout line `PREFIX ADDR` of `proc` (e.g. the coordinator's
/// `http listening on ` or the agent's `metrics listening on `) and returns the address.
pub fn wait_addr(proc: &Proc, prefix: &str, timeout: Duration) -> SocketAddr {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match proc.stdout.recv_timeout(left) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix(prefix) {
                    return addr.trim().parse().expect("listening address");
                }
            }
            Err(e) => panic!("no `{prefix}ADDR` line within {timeout:?} ({e})"),
        }
    }
}

/// Assigns `model:version` to `agent` (activate), waiting until the agent is known.
pub async fn assign(
    fleet: &mut FleetClient<Channel>,
    agent: &str,
    model: &str,
    version: u64,
    rollback: bool,
) {
    let request = pb::AssignRequest {
        agent_ids: vec![agent.into()],
        selector: String::new(),
        target: Some(pb::ModelRef { model: model.into(), version }),
        activate: true,
        rollback,
        rollout_id: String::new(),
        rollback_statement: None,
    };
    assign_request(fleet, request).await;
}

/// Moves `agent` back to `model:version` with a rollback statement signed by `key` (valid for
/// an hour), as `llmchainctl assign --rollback --rollback-statement` does.
pub async fn assign_rollback(
    fleet: &mut FleetClient<Channel>,
    agent: &str,
    model: &str,
    version: u64,
    key: &SigningKey,
) {
    let target = ModelRef { model: ModelName::parse("model", model).unwrap(), version };
    let statement = llmchain_artifact::RollbackStatement {
        target,
        expires_at: std::time::SystemTime::now() + Duration::from_secs(3600),
    };
    let request = pb::AssignRequest {
        agent_ids: vec![agent.into()],
        target: Some(pb::ModelRef { model: model.into(), version }),
        activate: true,
        rollback: true,
        rollback_statement: Some(statement.sign(key).into()),
        ..Default::default()
    };
    assign_request(fleet, request).await;
}

/// Sends `request` until the coordinator accepts it (the agent may not be known yet).
pub async fn assign_request(fleet: &mut FleetClient<Channel>, request: pb::AssignRequest) {
    let what = format!("{:?} to {:?}", request.target, request.agent_ids);
    let done = eventually(Duration::from_secs(30), || {
        let mut fleet = fleet.clone();
        let request = request.clone();
        async move { fleet.assign(request).await.ok() }
    })
    .await;
    assert!(done.is_some(), "assigning {what} kept failing");
}

/// The coordinator's record of `agent`.
pub async fn agent_info(fleet: &mut FleetClient<Channel>, agent: &str) -> Option<pb::AgentInfo> {
    let agents =
        fleet.list_agents(pb::ListAgentsRequest { selector: String::new() }).await.ok()?.into_inner();
    agents.agents.into_iter().find(|a| a.agent_id == agent)
}

/// Waits until `agent` reports `version` of `model` running; panics with the agent's last
/// status after `timeout`.
pub async fn wait_running(
    fleet: &mut FleetClient<Channel>,
    agent: &str,
    model: &str,
    version: u64,
    timeout: Duration,
) {
    let ok = eventually(timeout, || {
        let mut fleet = fleet.clone();
        async move {
            let info = agent_info(&mut fleet, agent).await?;
            let running = info.status.as_ref()?.running.as_ref()?;
            (running.model == model && running.version == version).then_some(())
        }
    })
    .await;
    if ok.is_none() {
        let info = agent_info(fleet, agent).await;
        panic!("{agent} does not run {model}:{version} after {timeout:?}; last seen {info:?}");
    }
}
