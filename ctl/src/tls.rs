//! Where `llmchainctl` connects and as whom, and `llmchainctl enroll`.
//!
//! Settings come from flags, then `LLMCHAIN_*` environment variables, then a TOML file
//! (`--config`, else `$XDG_CONFIG_HOME/llmchain/ctl.toml` or `~/.config/llmchain/ctl.toml` when
//! present), then defaults. Paths in the file are relative to the file. Without `--insecure`
//! the coordinator's CA must be given (`--ca-file`), and every command except `status` needs
//! a certificate and key (`--cert`, `--cert-key`): the `admin.pem`/`admin.key` the coordinator wrote into its TLS
//! directory, or an identity from `llmchainctl enroll`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use llmchain_proto::pb;
use llmchain_runtime::{
    enroll::ServerTrust,
    tls::{CA_CERT, IDENTITY_CERT, IDENTITY_KEY, TlsFiles, Transport},
};
use serde::{Deserialize, Serialize};

/// Default coordinator address; the scheme follows the transport.
const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7400";

/// Connection flags shared by every command (also the keys of `ctl.toml`).
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectArgs {
    /// Coordinator gRPC address [default: 127.0.0.1:7400, https unless --insecure].
    #[arg(long, global = true, env = "LLMCHAIN_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    /// The coordinator's CA certificate (its `ca.pem`).
    #[arg(long, global = true, env = "LLMCHAIN_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// This operator's certificate (e.g. the coordinator's `admin.pem`).
    #[arg(long, global = true, env = "LLMCHAIN_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This operator's private key (mode 0600, e.g. the coordinator's `admin.key`).
    #[arg(long, global = true, env = "LLMCHAIN_CERT_KEY", value_name = "FILE")]
    pub cert_key: Option<PathBuf>,
    /// Plaintext to a coordinator started with --insecure: local development only.
    #[arg(
        long,
        global = true,
        env = "LLMCHAIN_INSECURE",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub insecure: Option<bool>,
}

/// The `--config` flag.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArg {
    /// TOML file with keys coordinator, ca_file, cert, cert_key, insecure [default:
    /// ~/.config/llmchain/ctl.toml when it exists].
    #[arg(long, global = true, env = "LLMCHAIN_CTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Where to connect and how.
pub struct Connection {
    /// The coordinator URL, scheme matching the transport.
    pub url: String,
    /// TLS or plaintext.
    pub transport: Transport,
}

/// The default config directory: `$XDG_CONFIG_HOME/llmchain` or `~/.config/llmchain`.
fn default_config_dir() -> Option<PathBuf> {
    match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(xdg) => Some(PathBuf::from(xdg).join("llmchain")),
        None => std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join(".config/llmchain")),
    }
}

fn relative_to(base: &Path, path: Option<PathBuf>) -> Option<PathBuf> {
    path.map(|p| if p.is_relative() { base.join(p) } else { p })
}

impl ConnectArgs {
    /// Layers these flags over the config file and fills defaults (without reading keys).
    pub fn merged(&self, config: &ConfigArg) -> anyhow::Result<ConnectArgs> {
        let file = match &config.config {
            Some(path) => Some(path.clone()),
            None => default_config_dir().map(|d| d.join("ctl.toml")).filter(|p| p.is_file()),
        };
        let Some(file) = file else { return Ok(self.clone()) };
        let mut from_file: ConnectArgs = llmchain_runtime::config::read_file(&file)?;
        let base = file.parent().unwrap_or(Path::new("."));
        from_file.ca_file = relative_to(base, from_file.ca_file);
        from_file.cert = relative_to(base, from_file.cert);
        from_file.cert_key = relative_to(base, from_file.cert_key);
        Ok(llmchain_runtime::config::layer(&from_file, self)?)
    }

    /// The connection these settings describe.
    pub fn resolve(&self, config: &ConfigArg) -> anyhow::Result<Connection> {
        let m = self.merged(config)?;
        let files = TlsFiles { ca: m.ca_file, cert: m.cert, key: m.cert_key };
        let transport = Transport::from_options(m.insecure.unwrap_or(false), &files)?;
        let url = transport.url(m.coordinator.as_deref().unwrap_or(DEFAULT_COORDINATOR))?;
        Ok(Connection { url, transport })
    }
}

/// Flags of `llmchainctl enroll`.
#[derive(Debug, Clone, clap::Args)]
pub struct EnrollArgs {
    /// The bootstrap token from `llmchainctl token create --role operator|trainer`.
    #[arg(long, env = "LLMCHAIN_BOOTSTRAP_TOKEN", value_name = "TOKEN")]
    pub token: String,
    /// Identity name [default: the name the token was made for].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Directory for identity.key (0600), identity.pem, ca.pem and, if absent, a ctl.toml
    /// pointing at them [default: ~/.config/llmchain].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Replace an identity already in the directory.
    #[arg(long)]
    pub force: bool,
}

/// `llmchainctl enroll`: a key made here, a certificate from the coordinator's CA.
pub async fn enroll(connect: &ConnectArgs, config: &ConfigArg, args: EnrollArgs) -> anyhow::Result<()> {
    let m = connect.merged(config)?;
    let insecure = m.insecure.unwrap_or(false);
    let trust = match (&m.ca_file, insecure) {
        (_, true) => ServerTrust::Insecure,
        (Some(ca), false) => ServerTrust::Ca(
            std::fs::read_to_string(ca).with_context(|| format!("cannot read {}", ca.display()))?,
        ),
        (None, false) => {
            bail!("enrollment pins the coordinator's CA: pass --ca-file (its ca.pem), or --insecure")
        }
    };
    let out = match args.out.or_else(default_config_dir) {
        Some(dir) => dir,
        None => bail!("no --out given and no home directory to default to"),
    };
    if out.join(IDENTITY_CERT).exists() && !args.force {
        bail!("{} already holds an identity; pass --force to replace it", out.display());
    }
    let url = m.coordinator.as_deref().unwrap_or(DEFAULT_COORDINATOR);
    let name = args.name.unwrap_or_default();
    let enrolled = llmchain_runtime::enroll::enroll(url, trust, &args.token, &name, Vec::new()).await?;
    enrolled.write(&out)?;
    let config_file = out.join("ctl.toml");
    if !config_file.exists() {
        let text = format!(
            "# Written by `llmchainctl enroll`: the identity {name} ({role:?}).\ncoordinator = {url:?}\nca_file = {CA_CERT:?}\ncert = {IDENTITY_CERT:?}\ncert_key = {IDENTITY_KEY:?}\n",
            name = enrolled.name,
            role = enrolled.role,
        );
        llmchain_runtime::tls::write_file(&config_file, text.as_bytes(), 0o644)?;
    }
    let role = match enrolled.role {
        pb::Role::Agent => "agent",
        pb::Role::Trainer => "trainer",
        pb::Role::Operator => "operator",
        pb::Role::Unspecified => "unspecified",
    };
    println!("enrolled {role} {} into {}", enrolled.name, out.display());
    println!(
        "use: --ca-file {0}/{CA_CERT} --cert {0}/{IDENTITY_CERT} --cert-key {0}/{IDENTITY_KEY} (or --config {0}/ctl.toml)",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_whose_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ctl.toml");
        std::fs::write(&file, "coordinator = \"10.0.0.1:7400\"\nca_file = \"ca.pem\"\ninsecure = false\n")
            .unwrap();
        let config = ConfigArg { config: Some(file) };
        let merged = ConnectArgs::default().merged(&config).unwrap();
        assert_eq!(merged.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(merged.coordinator.as_deref(), Some("10.0.0.1:7400"));
        let flags = ConnectArgs { insecure: Some(true), ..Default::default() };
        let conn = flags.resolve(&config).unwrap();
        assert!(conn.transport.is_insecure());
        assert_eq!(conn.url, "http://10.0.0.1:7400");
        let err = ConnectArgs::default().resolve(&ConfigArg::default()).err().unwrap().to_string();
        assert!(err.contains("--ca-file") && err.contains("--insecure"), "{err}");
    }
}
