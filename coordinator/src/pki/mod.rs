//! The coordinator's certificate authority and TLS material.
//!
//! `coordinator serve --tls-dir DIR` keeps everything in one directory, generated on first
//! start and reused after (like kubeadm's `/etc/kubernetes/pki`):
//! - `ca.pem` / `ca.key`: the CA (ECDSA P-256, 10 years) that signs every identity;
//! - `server.pem` / `server.key`: the serving certificate, with the `--tls-san` names;
//! - `admin.pem` / `admin.key`: a first operator identity (`spiffe://llmchain/operator/admin`)
//!   so an operator can create bootstrap tokens for everyone else (like kubeadm's admin.conf).
//!
//! Invariants: private keys are created with mode 0600 at creation (temporary file + rename,
//! never chmod-ed later) and never logged; loading refuses a key file group or others can
//! read. Every certificate the CA issues to a client has CN = the identity name, exactly one
//! URI SAN `spiffe://llmchain/<role>/<name>` (see [`crate::auth::Identity`]), the client-auth
//! extended key usage only, and no CA rights, whatever the CSR asked for: the CSR contributes
//! its public key and nothing else.

pub mod enroll;

use std::{
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use llmchain_proto::ApiError;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

pub use enroll::{Enrollment, TOKENS_PREFIX, token_key};

use crate::{Error, Result, auth::Identity};

/// Lifetime of the CA certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the serving certificate.
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating of every certificate, so a peer whose clock is a little behind accepts it.
const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Name of the operator identity created with the CA.
pub const ADMIN_NAME: &str = "admin";

fn tls_err(msg: impl Into<String>) -> Error {
    Error::Tls(msg.into())
}

/// Writes `contents` atomically with `mode` (see [`llmchain_runtime::tls::write_file`], shared
/// with the clients that write their identities): a key is never readable by others.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    llmchain_runtime::tls::write_file(path, contents, mode).map_err(|e| match e {
        llmchain_runtime::Error::Tls(msg) => tls_err(msg),
        other => tls_err(other.to_string()),
    })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| tls_err(format!("cannot read {}: {e}", path.display())))
}

/// Reads a private key PEM, refusing a file others can read or its group can write. Group
/// read is allowed for Kubernetes Secret volumes, which grant it to the pod's `fsGroup`.
fn read_key(path: &Path) -> Result<KeyPair> {
    let meta =
        std::fs::metadata(path).map_err(|e| tls_err(format!("cannot read {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(tls_err(format!("{} has permissions {mode:o}; chmod 600 it", path.display())));
    }
    // The error of a malformed key says nothing about its contents.
    KeyPair::from_pem(&read(path)?)
        .map_err(|_| tls_err(format!("{} is not a PEM private key", path.display())))
}

fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| tls_err(format!("no randomness for a serial number: {e}")))?;
    // Positive and non-zero, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + lifetime).into();
}

/// The parameters of a client certificate for `identity`: the only things it may say.
fn client_params(identity: &Identity, lifetime: Duration) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, identity.name.as_str());
    let uri = rcgen::string::Ia5String::try_from(identity.spiffe_uri())
        .map_err(|e| tls_err(format!("identity uri: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    validity(&mut params, lifetime);
    Ok(params)
}

/// The coordinator's certificate authority.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate() -> Result<(Ca, String)> {
        let key = KeyPair::generate().map_err(|e| tls_err(format!("cannot generate the CA key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "llmchain coordinator CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial()?);
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(|e| tls_err(format!("cannot self-sign the CA: {e}")))?;
        let key_pem = key.serialize_pem();
        Ok((Ca { cert_pem: cert.pem(), issuer: Issuer::new(params, key) }, key_pem))
    }

    /// The CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key: KeyPair) -> Result<Ca> {
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| tls_err(format!("the CA certificate cannot be parsed: {e}")))?;
        Ok(Ca { cert_pem: cert_pem.to_string(), issuer })
    }

    /// The CA certificate (PEM), what clients pin.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a certificate for `identity` over the public key of `csr_pem` (whose own
    /// signature must verify), valid for `lifetime`.
    pub fn issue(&self, csr_pem: &str, identity: &Identity, lifetime: Duration) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| ApiError::invalid("csr_pem", format!("not a valid signed PKCS#10 request: {e}")))?;
        let request = CertificateSigningRequestParams {
            params: client_params(identity, lifetime)?,
            public_key: csr.public_key,
        };
        let cert = request.signed_by(&self.issuer).map_err(|e| tls_err(format!("cannot sign: {e}")))?;
        Ok(cert.pem())
    }

    /// Generates a key here and signs a certificate for `identity`; returns (cert, key) PEM.
    pub fn issue_with_new_key(&self, identity: &Identity, lifetime: Duration) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(|e| tls_err(format!("cannot generate a key: {e}")))?;
        let cert = client_params(identity, lifetime)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_err(format!("cannot sign: {e}")))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issue_server(&self, sans: &[String]) -> Result<(String, String)> {
        let key = KeyPair::generate().map_err(|e| tls_err(format!("cannot generate the server key: {e}")))?;
        let mut params = CertificateParams::new(sans.to_vec())
            .map_err(|e| tls_err(format!("invalid --tls-san {sans:?}: {e}")))?;
        params.distinguished_name.push(DnType::CommonName, "llmchain-coordinator");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        validity(&mut params, SERVER_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_err(format!("cannot sign the server: {e}")))?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Settings of the coordinator's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Directory of the CA, server and admin material.
    pub dir: PathBuf,
    /// Names and addresses the serving certificate is valid for.
    pub sans: Vec<String>,
    /// Lifetime of the client certificates the CA issues.
    pub cert_validity: Duration,
}

/// Flags of `coordinator tls-init`.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsInitArgs {
    /// Directory to fill (created 0700); files already there are kept.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: PathBuf,
    /// Name or IP address the serving certificate is valid for; repeat or separate with commas.
    #[arg(long, value_name = "NAME", value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    pub tls_san: Vec<String>,
    /// Lifetime of the admin certificate, e.g. `30d`.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub cert_validity: Duration,
}

impl TlsInitArgs {
    /// The settings these flags describe.
    pub fn settings(&self) -> TlsSettings {
        TlsSettings {
            dir: self.tls_dir.clone(),
            sans: self.tls_san.clone(),
            cert_validity: self.cert_validity,
        }
    }
}

/// The CA and serving identity of one coordinator.
pub struct TlsMaterial {
    /// The CA.
    pub ca: std::sync::Arc<Ca>,
    server_cert_pem: String,
    server_key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial")
    }
}

/// File names inside the TLS directory.
pub mod files {
    /// The CA certificate.
    pub const CA_CERT: &str = "ca.pem";
    /// The CA key (0600).
    pub const CA_KEY: &str = "ca.key";
    /// The serving certificate.
    pub const SERVER_CERT: &str = "server.pem";
    /// The serving key (0600).
    pub const SERVER_KEY: &str = "server.key";
    /// The first operator's certificate.
    pub const ADMIN_CERT: &str = "admin.pem";
    /// The first operator's key (0600).
    pub const ADMIN_KEY: &str = "admin.key";
}

impl TlsMaterial {
    /// Loads the material from `settings.dir`, generating what is missing: the CA on first
    /// start, the server certificate when absent, the admin identity when absent. A CA key
    /// without its certificate (or the reverse) is an error, never silently replaced.
    pub fn load_or_create(settings: &TlsSettings) -> Result<TlsMaterial> {
        use files::*;
        let dir = &settings.dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| tls_err(format!("cannot create {}: {e}", dir.display())))?;
        let path = |name: &str| dir.join(name);
        let ca = match (path(CA_CERT).exists(), path(CA_KEY).exists()) {
            (true, true) => Ca::from_pem(&read(&path(CA_CERT))?, read_key(&path(CA_KEY))?)?,
            (false, false) => {
                let (ca, key_pem) = Ca::generate()?;
                write_file(&path(CA_KEY), key_pem.as_bytes(), 0o600)?;
                write_file(&path(CA_CERT), ca.cert_pem().as_bytes(), 0o644)?;
                tracing::info!(dir = %dir.display(), "generated a new coordinator CA");
                ca
            }
            _ => {
                return Err(tls_err(format!(
                    "{} holds only one of {CA_CERT} and {CA_KEY}; restore the other or remove both",
                    dir.display()
                )));
            }
        };
        if !(path(SERVER_CERT).exists() && path(SERVER_KEY).exists()) {
            let (cert, key) = ca.issue_server(&settings.sans)?;
            write_file(&path(SERVER_KEY), key.as_bytes(), 0o600)?;
            write_file(&path(SERVER_CERT), cert.as_bytes(), 0o644)?;
            tracing::info!(sans = ?settings.sans, "issued the serving certificate");
        }
        if !(path(ADMIN_CERT).exists() && path(ADMIN_KEY).exists()) {
            let admin = Identity::new(ADMIN_NAME, crate::auth::Role::Operator)?;
            let (cert, key) = ca.issue_with_new_key(&admin, settings.cert_validity)?;
            write_file(&path(ADMIN_KEY), key.as_bytes(), 0o600)?;
            write_file(&path(ADMIN_CERT), cert.as_bytes(), 0o644)?;
            tracing::info!(identity = %admin, "issued the first operator identity");
        }
        let server_key = read_key(&path(SERVER_KEY))?;
        Ok(TlsMaterial {
            ca: std::sync::Arc::new(ca),
            server_cert_pem: read(&path(SERVER_CERT))?,
            server_key_pem: server_key.serialize_pem(),
        })
    }

    /// The server's TLS configuration: its certificate, and client certificates verified
    /// against the CA but optional at the TLS level, so `Enroll`, health and reflection work
    /// without one; the authorization layer refuses the other RPCs to anonymous callers.
    pub fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        llmchain_runtime::tls::install_crypto_provider();
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.server_cert_pem, &self.server_key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(self.ca.cert_pem()))
            .client_auth_optional(true)
            .timeout(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use rcgen::PublicKeyData;

    use super::*;
    use crate::auth::Role;

    #[test]
    fn material_is_generated_once_with_private_keys_0600_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = TlsSettings {
            dir: dir.path().join("tls"),
            sans: vec!["localhost".into(), "127.0.0.1".into()],
            cert_validity: Duration::from_secs(3600),
        };
        let first = TlsMaterial::load_or_create(&settings).unwrap();
        for key in [files::CA_KEY, files::SERVER_KEY, files::ADMIN_KEY] {
            let mode = std::fs::metadata(settings.dir.join(key)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let second = TlsMaterial::load_or_create(&settings).unwrap();
        assert_eq!(first.ca.cert_pem(), second.ca.cert_pem());
        assert_eq!(first.server_cert_pem, second.server_cert_pem);

        let admin = std::fs::read(settings.dir.join(files::ADMIN_CERT)).unwrap();
        let admin = rustls_pem_der(&admin);
        assert_eq!(Identity::from_cert_der(&admin).unwrap(), Identity::new("admin", Role::Operator).unwrap());

        std::fs::set_permissions(settings.dir.join(files::CA_KEY), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = TlsMaterial::load_or_create(&settings).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::remove_file(settings.dir.join(files::CA_KEY)).unwrap();
        let err = TlsMaterial::load_or_create(&settings).unwrap_err().to_string();
        assert!(err.contains("only one of"), "{err}");
    }

    #[test]
    fn issued_certificates_take_only_the_public_key_from_the_csr() {
        let (ca, _) = Ca::generate().unwrap();
        let key = KeyPair::generate().unwrap();
        // The CSR asks for CA rights and another name; the CA grants neither.
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        asked.distinguished_name.push(DnType::CommonName, "someone-else");
        let csr = asked.serialize_request(&key).unwrap().pem().unwrap();
        let id = Identity::new("edge-7", Role::Agent).unwrap();
        let pem = ca.issue(&csr, &id, Duration::from_secs(600)).unwrap();
        let der = rustls_pem_der(pem.as_bytes());
        assert_eq!(Identity::from_cert_der(&der).unwrap(), id);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(cert.public_key().raw, key.subject_public_key_info().as_slice());
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 600 + CLOCK_SKEW.as_secs() as i64);

        let garbage = ca.issue(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            &id,
            Duration::from_secs(60),
        );
        assert!(matches!(garbage, Err(Error::Api(ApiError::InvalidArgument { .. }))), "{garbage:?}");
    }

    /// The DER of the first PEM block.
    fn rustls_pem_der(pem: &[u8]) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem).unwrap();
        p.contents
    }
}
