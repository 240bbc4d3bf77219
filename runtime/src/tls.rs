//! How every client reaches the coordinator: mutual TLS with the coordinator's CA pinned and
//! the caller's own certificate, or plaintext when the operator said `--insecure`.
//!
//! The agent, the trainer and `llmchainctl` build their channels here and nowhere else, so the
//! rules hold everywhere:
//! - with TLS the URL scheme is forced to `https` (tonic would otherwise talk plaintext to an
//!   `http://` URL even with a TLS config), and only the pinned CA is trusted, never the
//!   system roots;
//! - with `--insecure` an `https://` URL is refused rather than silently downgraded, and the
//!   caller logs [`warn_insecure`] once at start;
//! - private keys are written with mode 0600 at creation (never chmod-ed afterwards, so there
//!   is no window where they are readable) and refused when group or others can read them.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::{Error, Result};

/// File names of an identity in a state directory (the agent's) or any identity directory.
pub const IDENTITY_CERT: &str = "identity.pem";
/// The private key of an identity (mode 0600).
pub const IDENTITY_KEY: &str = "identity.key";
/// The coordinator CA certificate pinned for the server.
pub const CA_CERT: &str = "ca.pem";

/// A client's transport to the coordinator.
#[derive(Clone)]
pub enum Transport {
    /// Plaintext HTTP/2, no identity: local development only.
    Insecure,
    /// TLS with the coordinator CA pinned, and a client certificate when given.
    Tls(Box<TlsClient>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        match self {
            Transport::Insecure => f.write_str("Transport::Insecure"),
            Transport::Tls(tls) => {
                write!(f, "Transport::Tls(client_identity: {})", tls.identity.is_some())
            }
        }
    }
}

/// TLS material of a client: the CA it trusts and, optionally, its own certificate and key.
#[derive(Clone)]
pub struct TlsClient {
    ca_pem: String,
    identity: Option<(String, String)>,
}

fn tls_err(msg: impl Into<String>) -> Error {
    Error::Tls(msg.into())
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| tls_err(format!("cannot read {}: {e}", path.display())))
}

/// Reads a private key file, refusing one that group or others can read (as ssh does).
pub fn read_private_key(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).map_err(|e| tls_err(format!("cannot read {}: {e}", path.display())))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(tls_err(format!(
            "private key {} has permissions {:o}; it must not be readable by group or others (chmod 600)",
            path.display(),
            mode & 0o777
        )));
    }
    read(path)
}

/// Writes `contents` to `path` through a temporary file created with `mode` in the same
/// directory and renamed into place, so readers see the old file or the whole new one, and a
/// private key is never readable by others, not even for an instant.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let io = |e: std::io::Error| tls_err(format!("cannot write {}: {e}", path.display()));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    f.write_all(contents).and_then(|()| f.sync_all()).map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Paths of a client's TLS material, as given by flags, environment or a config file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The coordinator CA certificate (PEM).
    pub ca: Option<PathBuf>,
    /// The client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// The client private key (PEM, mode 0600).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// The files of an identity directory (`ca.pem`, `identity.pem`, `identity.key`), when the
    /// directory holds all three.
    pub fn in_dir(dir: &Path) -> Option<TlsFiles> {
        let files = TlsFiles {
            ca: Some(dir.join(CA_CERT)),
            cert: Some(dir.join(IDENTITY_CERT)),
            key: Some(dir.join(IDENTITY_KEY)),
        };
        [&files.ca, &files.cert, &files.key]
            .iter()
            .all(|p| p.as_deref().is_some_and(Path::is_file))
            .then_some(files)
    }
}

/// The TLS flags of a client binary (the trainer): `--ca-file`, `--cert`, `--cert-key`,
/// `--insecure`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// The coordinator's CA certificate (its `ca.pem`).
    #[arg(long, global = true, env = "LLMCHAIN_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// This client's certificate (from `llmchainctl enroll`).
    #[arg(long, global = true, env = "LLMCHAIN_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This client's private key (mode 0600).
    #[arg(long, global = true, env = "LLMCHAIN_CERT_KEY", value_name = "FILE")]
    pub cert_key: Option<PathBuf>,
    /// Plaintext to a coordinator started with --insecure: local development only.
    #[arg(long, global = true, env = "LLMCHAIN_INSECURE", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub insecure: Option<bool>,
}

impl ClientTlsArgs {
    /// The transport these flags describe (warning once when it is plaintext).
    pub fn transport(&self, component: &str) -> Result<Transport> {
        let insecure = self.insecure.unwrap_or(false);
        if insecure {
            warn_insecure(component);
        }
        let files =
            TlsFiles { ca: self.ca_file.clone(), cert: self.cert.clone(), key: self.cert_key.clone() };
        Transport::from_options(insecure, &files)
    }
}

impl Transport {
    /// Mutual TLS from PEM text: the CA to pin and, optionally, a certificate and its key.
    pub fn tls(ca_pem: String, identity: Option<(String, String)>) -> Result<Transport> {
        if !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(tls_err("the CA file holds no PEM certificate"));
        }
        if let Some((cert, key)) = &identity {
            if !cert.contains("-----BEGIN CERTIFICATE-----") {
                return Err(tls_err("the certificate file holds no PEM certificate"));
            }
            if !key.contains("PRIVATE KEY-----") {
                return Err(tls_err("the key file holds no PEM private key"));
            }
        }
        Ok(Transport::Tls(Box::new(TlsClient { ca_pem, identity })))
    }

    /// The transport chosen by `--insecure` and the TLS files: plaintext when `insecure`,
    /// otherwise TLS, which needs at least the CA (and the certificate and key together).
    pub fn from_options(insecure: bool, files: &TlsFiles) -> Result<Transport> {
        if insecure {
            return Ok(Transport::Insecure);
        }
        let ca = files.ca.as_deref().ok_or_else(|| {
            tls_err("no coordinator CA given: pass --ca-file (with --cert and --cert-key), or --insecure for local development")
        })?;
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read_private_key(key)?)),
            (None, None) => None,
            _ => return Err(tls_err("--cert and --cert-key go together")),
        };
        Transport::tls(read(ca)?, identity)
    }

    /// Whether this is plaintext.
    pub fn is_insecure(&self) -> bool {
        matches!(self, Transport::Insecure)
    }

    /// `url` with the scheme this transport speaks (`https` with TLS); a bare `host:port` gets
    /// one. Refuses `https` URLs in insecure mode instead of downgrading them.
    pub fn url(&self, url: &str) -> Result<String> {
        let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
        match self {
            Transport::Insecure if url.starts_with("https://") => Err(tls_err(format!(
                "{url} asks for TLS but --insecure is set: use an http:// URL or drop --insecure"
            ))),
            Transport::Insecure => Ok(if rest.is_some() { url.to_string() } else { format!("http://{url}") }),
            Transport::Tls(_) => Ok(format!("https://{}", rest.unwrap_or(url))),
        }
    }

    /// Applies the TLS settings to an endpoint built for [`Transport::url`].
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint> {
        match self {
            Transport::Insecure => Ok(endpoint),
            Transport::Tls(tls) => {
                install_crypto_provider();
                let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                endpoint.tls_config(config).map_err(|e| tls_err(format!("tls config: {e}")))
            }
        }
    }

    /// An endpoint for the coordinator at `url` over this transport.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let url = self.url(url)?;
        let endpoint =
            Endpoint::from_shared(url.clone()).map_err(|e| tls_err(format!("invalid url {url}: {e}")))?;
        self.apply(endpoint)
    }
}

/// Makes ring the process's rustls provider (the only one built in); idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Logs, once at start, that `component` runs without TLS or identities.
pub fn warn_insecure(component: &str) {
    tracing::warn!(
        component,
        "INSECURE: --insecure is set, so traffic is plaintext and callers are not authenticated; \
         use it for local development only, never on a network you do not control"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_follows_the_transport() {
        let tls = Transport::tls("-----BEGIN CERTIFICATE-----\n".into(), None).unwrap();
        assert_eq!(tls.url("http://127.0.0.1:7400").unwrap(), "https://127.0.0.1:7400");
        assert_eq!(tls.url("127.0.0.1:7400").unwrap(), "https://127.0.0.1:7400");
        let plain = Transport::Insecure;
        assert_eq!(plain.url("http://h:1").unwrap(), "http://h:1");
        assert_eq!(plain.url("h:1").unwrap(), "http://h:1");
        assert!(plain.url("https://h:1").is_err());
    }

    #[test]
    fn tls_needs_a_ca_and_a_private_key_kept_private() {
        let err = Transport::from_options(false, &TlsFiles::default()).unwrap_err().to_string();
        assert!(err.contains("--insecure"), "{err}");
        assert!(Transport::from_options(true, &TlsFiles::default()).unwrap().is_insecure());

        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        write_file(&key, b"-----BEGIN PRIVATE KEY-----\n", 0o600).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(read_private_key(&key).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private_key(&key).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
