//! `edge-agent enroll`: the agent's identity, made once per node.
//!
//! The key pair is generated here and never leaves the node; the coordinator's CA signs a
//! certificate naming the agent id (`spiffe://llmchain/agent/<id>`) in exchange for a
//! single-use bootstrap token from `llmchainctl token create --role agent`. The state
//! directory then holds `identity.key` (0600), `identity.pem`, `ca.pem` (the CA pinned for the
//! server) and `trusted-keys` (the trainer keys handed over at enrollment), and `edge-agent
//! run` uses them for mutual TLS without further flags.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use llmchain_artifact::PublicKey;
use llmchain_proto::pb;
use llmchain_runtime::{
    enroll::{ServerTrust, TRUSTED_KEYS},
    tls::{IDENTITY_CERT, TlsFiles, Transport},
};

/// Flags of `edge-agent enroll`.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// Coordinator gRPC URL.
    #[arg(long, env = "LLMCHAIN_COORDINATOR", value_name = "URL", default_value = "https://127.0.0.1:7400")]
    pub coordinator: String,
    /// The bootstrap token from `llmchainctl token create --role agent`.
    #[arg(long, env = "LLMCHAIN_BOOTSTRAP_TOKEN", value_name = "TOKEN")]
    pub token: String,
    /// The coordinator's CA certificate (its `ca.pem`), pinned for this first connection.
    #[arg(long, env = "LLMCHAIN_CA_FILE", value_name = "FILE", required_unless_present = "insecure")]
    pub ca_file: Option<PathBuf>,
    /// This agent's id: 1-64 characters of [a-z0-9._-] [default: the name the token was made for].
    #[arg(long, env = "LLMCHAIN_AGENT_ID", value_name = "ID")]
    pub agent_id: Option<String>,
    /// A label, `key=value`; repeat for several.
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Where the identity is written; the same directory as `run --state-dir`.
    #[arg(long, env = "LLMCHAIN_STATE_DIR", value_name = "DIR", default_value = "llmchain-agent/state")]
    pub state_dir: PathBuf,
    /// Replace an identity already in the state directory.
    #[arg(long)]
    pub force: bool,
    /// Enroll over plaintext (a coordinator under test only; the certificate is still real).
    #[arg(long)]
    pub insecure: bool,
}

/// Runs `edge-agent enroll`: prints the granted identity on success.
pub async fn run(args: EnrollArgs) -> anyhow::Result<()> {
    if args.state_dir.join(IDENTITY_CERT).exists() && !args.force {
        bail!("{} already holds an identity; pass --force to replace it", args.state_dir.display());
    }
    let trust = match &args.ca_file {
        Some(path) if !args.insecure => ServerTrust::Ca(
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        ),
        _ => {
            llmchain_runtime::tls::warn_insecure("edge-agent enroll");
            ServerTrust::Insecure
        }
    };
    let labels = args
        .labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| pb::Label { key: k.trim().into(), value: v.trim().into() })
                .with_context(|| format!("label {l:?} is not key=value"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let name = args.agent_id.unwrap_or_default();
    let enrolled =
        llmchain_runtime::enroll::enroll(&args.coordinator, trust, &args.token, &name, labels).await?;
    if enrolled.role != pb::Role::Agent {
        bail!(
            "the token enrolls a {:?}, not an agent; use `llmchainctl enroll` for operators and trainers",
            enrolled.role
        );
    }
    enrolled.write(&args.state_dir)?;
    println!(
        "enrolled agent {} into {} ({} trusted trainer keys)",
        enrolled.name,
        args.state_dir.display(),
        enrolled.trainer_keys.len()
    );
    Ok(())
}

/// The transport of `edge-agent run`: plaintext when `insecure`, otherwise mutual TLS with the
/// identity in `state_dir`, which must then exist.
pub fn transport(insecure: bool, state_dir: &Path) -> anyhow::Result<Transport> {
    if insecure {
        llmchain_runtime::tls::warn_insecure("edge-agent");
        return Ok(Transport::Insecure);
    }
    let Some(files) = TlsFiles::in_dir(state_dir) else {
        bail!(
            "no identity in {}: run `edge-agent enroll --token …` first, or pass --insecure for local development",
            state_dir.display()
        );
    };
    Ok(Transport::from_options(false, &files)?)
}

/// The trainer keys written at enrollment (none when the agent never enrolled).
pub fn read_trusted_keys(state_dir: &Path) -> anyhow::Result<Vec<PublicKey>> {
    let path = state_dir.join(TRUSTED_KEYS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let bytes: [u8; 32] = hex::decode(line)
                .ok()
                .and_then(|b| b.try_into().ok())
                .with_context(|| format!("{} holds a line that is not a 32-byte hex key", path.display()))?;
            Ok(PublicKey::from_bytes(&bytes)?)
        })
        .collect()
}
