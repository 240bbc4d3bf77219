//! Enrollment, the client half: generate a key pair locally, send a certificate signing
//! request with a bootstrap token, and write the identity the coordinator's CA issued.
//!
//! The private key never leaves the machine: only the CSR (public key + requested name)
//! travels. `edge-agent enroll`, `llmchainctl enroll` (operators and trainers) all call
//! [`enroll`] and [`Enrolled::write`]; nothing else writes identity files.

use std::path::Path;

use llmchain_proto::pb::{self, fleet_client::FleetClient};

use crate::{
    Error, Result,
    tls::{CA_CERT, IDENTITY_CERT, IDENTITY_KEY, Transport, write_file},
};

/// File of the trainer public keys (one hex key per line) an agent trusts after enrollment.
pub const TRUSTED_KEYS: &str = "trusted-keys";

/// What enrollment produced.
pub struct Enrolled {
    /// The identity name granted.
    pub name: String,
    /// The role granted, as the wire enum.
    pub role: pb::Role,
    /// The issued certificate (PEM).
    pub cert_pem: String,
    /// The private key generated here (PEM); written with mode 0600 only.
    pub key_pem: String,
    /// The coordinator's CA certificate (PEM).
    pub ca_pem: String,
    /// The trainer keys the coordinator is configured with.
    pub trainer_keys: Vec<pb::TrustedKey>,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// How the enrolling client trusts the coordinator before it has an identity.
pub enum ServerTrust {
    /// Pin this CA certificate (PEM), e.g. copied from the coordinator's `ca.pem`.
    Ca(String),
    /// Plaintext to a coordinator started with `--insecure`.
    Insecure,
}

/// Generates a key pair and enrolls `name` (empty: the name the token was made for) with
/// `token` at the coordinator `url`.
pub async fn enroll(
    url: &str,
    trust: ServerTrust,
    token: &str,
    name: &str,
    labels: Vec<pb::Label>,
) -> Result<Enrolled> {
    let key =
        rcgen::KeyPair::generate().map_err(|e| Error::Tls(format!("cannot generate a key pair: {e}")))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| Error::Tls(format!("csr parameters: {e}")))?;
    // The CA decides the subject and names from the token and the request; the CN here is a
    // hint for humans reading the CSR.
    params.distinguished_name = rcgen::DistinguishedName::new();
    if !name.is_empty() {
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
    }
    let csr = params.serialize_request(&key).map_err(|e| Error::Tls(format!("csr: {e}")))?;
    let csr_pem = csr.pem().map_err(|e| Error::Tls(format!("csr: {e}")))?;
    let transport = match trust {
        ServerTrust::Ca(ca) => Transport::tls(ca, None)?,
        ServerTrust::Insecure => Transport::Insecure,
    };
    let channel = transport
        .endpoint(url)?
        .connect()
        .await
        .map_err(|e| Error::Tls(format!("cannot reach the coordinator at {url}: {}", chain(&e))))?;
    let answer = FleetClient::new(channel)
        .enroll(pb::EnrollRequest {
            bootstrap_token: token.trim().to_string(),
            name: name.to_string(),
            csr_pem,
            labels,
        })
        .await
        .map_err(|s| Error::Tls(format!("enrollment refused ({:?}): {}", s.code(), s.message())))?
        .into_inner();
    Ok(Enrolled {
        role: answer.role(),
        name: answer.name,
        cert_pem: answer.certificate_pem,
        key_pem: key.serialize_pem(),
        ca_pem: answer.ca_pem,
        trainer_keys: answer.trainer_keys,
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Enrolled {
    /// Writes `identity.key` (0600), `identity.pem`, `ca.pem` and `trusted-keys` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Tls(format!("cannot create {}: {e}", dir.display())))?;
        // The key first: a certificate without its key is useless, the reverse is harmless.
        write_file(&dir.join(IDENTITY_KEY), self.key_pem.as_bytes(), 0o600)?;
        write_file(&dir.join(IDENTITY_CERT), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(CA_CERT), self.ca_pem.as_bytes(), 0o644)?;
        let keys: String =
            self.trainer_keys.iter().map(|k| format!("{}\n", hex_encode(&k.public_key))).collect();
        write_file(&dir.join(TRUSTED_KEYS), keys.as_bytes(), 0o644)
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
