//! `llmchainctl keys …`: the offline root key, key-rotation documents, rollback statements.
//!
//! `root-init`, `rotate` and `sign-rollback` never talk to a coordinator: the root key should
//! live on a machine that does not. Their outputs are `pb::SignedStatement` files, which
//! `keys publish` (trust documents) and `assign --rollback-statement` / `rollout rollback
//! --statement` (rollback statements) hand to the coordinator, which only relays them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail, ensure};
use clap::{Args, Subcommand};
use llmchain_artifact::{PublicKey, RollbackStatement, SigningKey, TrustDocument, trust::is_key_id};
use llmchain_proto::{
    model::{ModelName, ModelRef},
    pb,
};
use prost::Message;

/// `llmchainctl keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create the offline root key pair: DIR/root.key (0600) and DIR/root.pub. Give root.pub
    /// to agents (`edge-agent run --root-key`); keep root.key offline.
    RootInit {
        /// Directory to write the key pair into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a key-rotation document with the root key: the complete set of trusted trainer
    /// keys and the revoked key ids, with a version higher than any before.
    Rotate(Box<RotateArgs>),
    /// Send a signed key-rotation document to the coordinator, which relays it to agents
    /// (Registry.PublishTrustDocument).
    Publish {
        /// The document written by `keys rotate`.
        document: PathBuf,
    },
    /// Sign a rollback statement with a trainer key: agents accept a move back to
    /// MODEL:VERSION only with one, until it expires.
    SignRollback {
        /// Trainer private key.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The version agents may go back to, MODEL:VERSION.
        #[arg(long, value_name = "MODEL:VERSION")]
        version: String,
        /// How long the statement is valid: e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// File to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// Arguments of `keys rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// Root private key (from `keys root-init`).
    #[arg(long, value_name = "FILE")]
    root_key: PathBuf,
    /// A trainer public key file to trust; repeatable.
    #[arg(long = "add", value_name = "FILE")]
    add: Vec<PathBuf>,
    /// A key id to revoke ("ed25519:" + 16 hex digits); repeatable.
    #[arg(long = "revoke", value_name = "KEYID")]
    revoke: Vec<String>,
    /// The previous document: its trusted keys stay trusted (unless revoked) and its
    /// revocations stay.
    #[arg(long, value_name = "FILE")]
    previous: Option<PathBuf>,
    /// Version of the new document; must exceed every earlier one.
    #[arg(long)]
    version: u64,
    /// File to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

impl KeysCommand {
    /// Whether the command runs without a coordinator.
    pub fn is_offline(&self) -> bool {
        !matches!(self, KeysCommand::Publish { .. })
    }
}

/// Parses `30s`, `30m`, `24h`, `7d` (a bare number is seconds).
fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) =
        s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit()).unwrap_or(s.trim().len()));
    let n: u64 = num.parse().with_context(|| format!("ttl {s:?} is not a number with s, m, h or d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => bail!("ttl unit {other:?} is not s, m, h or d"),
    };
    ensure!(secs > 0, "ttl must be positive");
    Ok(Duration::from_secs(secs))
}

/// Reads a `pb::SignedStatement` file.
pub fn read_statement(path: &Path) -> anyhow::Result<pb::SignedStatement> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    pb::SignedStatement::decode(bytes.as_slice())
        .with_context(|| format!("{} is not a signed statement", path.display()))
}

fn write_statement(path: &Path, statement: llmchain_artifact::SignedStatement) -> anyhow::Result<()> {
    let bytes = pb::SignedStatement::from(statement).encode_to_vec();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Runs an offline subcommand, printing one JSON object.
pub fn run_offline(command: KeysCommand) -> anyhow::Result<()> {
    let report = match command {
        KeysCommand::RootInit { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let (private, public) = (out.join("root.key"), out.join("root.pub"));
            ensure!(!private.exists(), "{} exists; refusing to overwrite a root key", private.display());
            let key = SigningKey::generate()?;
            key.save(&private)?;
            key.public().save(&public)?;
            serde_json::json!({ "private_key": private, "public_key": public, "key_id": key.public().key_id() })
        }
        KeysCommand::Rotate(args) => rotate(*args)?,
        KeysCommand::SignRollback { key, version, ttl, out } => {
            let key = SigningKey::load(&key).with_context(|| format!("trainer key {}", key.display()))?;
            let (model, v) = version.rsplit_once(':').context("--version must be MODEL:VERSION")?;
            let target = ModelRef {
                model: ModelName::parse("model", model)?,
                version: v.parse().context("--version must be MODEL:VERSION")?,
            };
            let expires_at = SystemTime::now() + parse_ttl(&ttl)?;
            let statement = RollbackStatement { target, expires_at };
            write_statement(&out, statement.sign(&key))?;
            serde_json::json!({
                "rollback_statement": out,
                "target": version,
                "key_id": key.public().key_id(),
                "expires_at": humantime_rfc3339(expires_at),
            })
        }
        KeysCommand::Publish { .. } => bail!("keys publish needs a coordinator"),
    };
    println!("{report}");
    Ok(())
}

fn humantime_rfc3339(t: SystemTime) -> String {
    let ts = prost_types::Timestamp::from(t);
    crate::json::rfc3339(&ts)
}

fn rotate(args: RotateArgs) -> anyhow::Result<serde_json::Value> {
    let root =
        SigningKey::load(&args.root_key).with_context(|| format!("root key {}", args.root_key.display()))?;
    let mut revoked: BTreeSet<String> = BTreeSet::new();
    for id in &args.revoke {
        ensure!(is_key_id(id), "--revoke {id:?} is not a key id (\"ed25519:\" and 16 hex digits)");
        revoked.insert(id.clone());
    }
    let mut keys: Vec<PublicKey> = Vec::new();
    if let Some(path) = &args.previous {
        let previous = TrustDocument::verify(&read_statement(path)?.try_into()?, &root.public())
            .with_context(|| format!("{} is not a document signed by this root key", path.display()))?;
        ensure!(
            args.version > previous.version,
            "--version {} must exceed the previous document's version {}",
            args.version,
            previous.version
        );
        revoked.extend(previous.revoked_key_ids);
        keys.extend(previous.trainer_keys);
    }
    for path in &args.add {
        keys.push(PublicKey::load(path).with_context(|| format!("trainer key {}", path.display()))?);
    }
    keys.retain(|k| !revoked.contains(&k.key_id()));
    keys.sort_by_key(PublicKey::to_bytes);
    keys.dedup();
    ensure!(!keys.is_empty(), "the document would trust no trainer key; --add one");
    ensure!(args.version >= 1, "--version must be at least 1");
    let doc = TrustDocument {
        version: args.version,
        trainer_keys: keys,
        revoked_key_ids: revoked,
        issued_at: SystemTime::now(),
    };
    write_statement(&args.out, doc.sign(&root))?;
    Ok(serde_json::json!({
        "trust_document": args.out,
        "version": doc.version,
        "trusted": doc.trainer_keys.iter().map(PublicKey::key_id).collect::<Vec<_>>(),
        "revoked": doc.revoked_key_ids,
        "root_key_id": root.public().key_id(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1w").is_err());
    }

    #[test]
    fn rotate_keeps_previous_keys_drops_revoked_and_needs_a_higher_version() {
        let dir = tempfile::tempdir().unwrap();
        let root = SigningKey::from_seed([1; 32]);
        let (old, new) = (SigningKey::from_seed([2; 32]), SigningKey::from_seed([3; 32]));
        root.save(&dir.path().join("root.key")).unwrap();
        old.public().save(&dir.path().join("old.pub")).unwrap();
        new.public().save(&dir.path().join("new.pub")).unwrap();
        let args = |version, add: &str, revoke: Vec<String>, previous: Option<&str>, out: &str| RotateArgs {
            root_key: dir.path().join("root.key"),
            add: vec![dir.path().join(add)],
            revoke,
            previous: previous.map(|p| dir.path().join(p)),
            version,
            out: dir.path().join(out),
        };
        rotate(args(1, "old.pub", vec![], None, "d1")).unwrap();
        rotate(args(2, "new.pub", vec![old.public().key_id()], Some("d1"), "d2")).unwrap();
        let d2 = TrustDocument::verify(
            &read_statement(&dir.path().join("d2")).unwrap().try_into().unwrap(),
            &root.public(),
        )
        .unwrap();
        assert_eq!(d2.trainer_keys, vec![new.public()]);
        assert!(d2.revoked_key_ids.contains(&old.public().key_id()));
        assert!(rotate(args(2, "new.pub", vec![], Some("d2"), "d3")).is_err(), "version must increase");
        assert!(rotate(args(3, "new.pub", vec!["nope".into()], None, "d3")).is_err());
    }
}
