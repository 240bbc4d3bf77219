//! Who is calling: the identity and role the coordinator's CA wrote into a certificate.
//!
//! Every certificate the CA issues names its holder twice: subject CN = the identity name and
//! exactly one URI SAN `spiffe://llmchain/<role>/<name>`. The URI is what counts (it carries the
//! role); a CN that disagrees with it makes the certificate unusable rather than ambiguous.
//! Names follow the agent id rules (1-64 characters of `[a-z0-9._-]`, starting with a letter or
//! digit), so a name can never smuggle a `/` into the URI or a store key.

use std::{fmt, str::FromStr, time::SystemTime};

use llmchain_proto::{ApiError, model::AgentId, pb};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{Error, Result};

/// Scheme and trust domain of every identity URI.
const SPIFFE_PREFIX: &str = "spiffe://llmchain/";

/// What an identity may do; written into its certificate by the CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// An edge agent: its own session, its own summaries, blobs of versions assigned to it.
    Agent,
    /// A trainer: uploads blobs and publishes versions.
    Trainer,
    /// An operator: rollouts, assignments, tokens, revocations and every read.
    Operator,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 3] = [Role::Agent, Role::Trainer, Role::Operator];

    /// The role's path segment in an identity URI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Trainer => "trainer",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ApiError;
    fn from_str(s: &str) -> Result<Self, ApiError> {
        match s {
            "agent" => Ok(Role::Agent),
            "trainer" => Ok(Role::Trainer),
            "operator" => Ok(Role::Operator),
            other => Err(ApiError::invalid("role", format!("{other:?} must be agent, trainer or operator"))),
        }
    }
}

impl From<Role> for pb::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Agent => pb::Role::Agent,
            Role::Trainer => pb::Role::Trainer,
            Role::Operator => pb::Role::Operator,
        }
    }
}

impl TryFrom<pb::Role> for Role {
    type Error = ApiError;
    fn try_from(role: pb::Role) -> Result<Self, ApiError> {
        match role {
            pb::Role::Agent => Ok(Role::Agent),
            pb::Role::Trainer => Ok(Role::Trainer),
            pb::Role::Operator => Ok(Role::Operator),
            pb::Role::Unspecified => Err(ApiError::invalid("role", "must be agent, trainer or operator")),
        }
    }
}

/// An authenticated caller: its name (for an agent, its agent id) and its role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Identity name, as in the certificate's CN.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

impl Identity {
    /// An identity; `name` must be a valid identity name.
    pub fn new(name: &str, role: Role) -> Result<Self> {
        let name = AgentId::parse("name", name)?;
        Ok(Identity { name: name.as_str().to_string(), role })
    }

    /// The URI SAN the CA writes for this identity: `spiffe://llmchain/<role>/<name>`.
    pub fn spiffe_uri(&self) -> String {
        format!("{SPIFFE_PREFIX}{}/{}", self.role, self.name)
    }

    /// Parses an identity URI; `None` for anything that is not exactly
    /// `spiffe://llmchain/<role>/<valid name>`.
    pub fn from_spiffe_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(SPIFFE_PREFIX)?;
        let (role, name) = rest.split_once('/')?;
        let role = role.parse().ok()?;
        AgentId::parse("name", name).ok()?;
        Some(Identity { name: name.to_string(), role })
    }

    /// Reads the identity from a DER certificate (the CA's format: one spiffe URI SAN, CN equal
    /// to its name). Does not check the signature or the validity period: the TLS handshake
    /// verified the chain; see [`Identity::from_cert_der_at`] for the time check.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity> {
        Ok(PeerCertificate::parse(der)?.identity)
    }

    /// Like [`Identity::from_cert_der`], and refuses a certificate not valid at `now`.
    pub fn from_cert_der_at(der: &[u8], now: SystemTime) -> Result<Identity> {
        let cert = PeerCertificate::parse(der)?;
        cert.check_valid_at(now)?;
        Ok(cert.identity)
    }
}

/// What the authorization layer needs from a peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// Who it names.
    pub identity: Identity,
    /// Start of its validity period.
    pub not_before: SystemTime,
    /// End of its validity period.
    pub not_after: SystemTime,
}

impl PeerCertificate {
    /// Parses a DER certificate issued by the coordinator's CA.
    pub fn parse(der: &[u8]) -> Result<PeerCertificate> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| unauthenticated(format!("malformed client certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| unauthenticated(format!("malformed subject alternative name: {e}")))?;
        let mut uris =
            san.iter().flat_map(|ext| ext.value.general_names.iter()).filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            });
        let (Some(uri), None) = (uris.next(), uris.next()) else {
            return Err(unauthenticated("client certificate must carry exactly one identity uri"));
        };
        let identity = Identity::from_spiffe_uri(uri).ok_or_else(|| {
            unauthenticated(format!(
                "client certificate identity uri {uri:?} is not spiffe://llmchain/<role>/<name>"
            ))
        })?;
        for cn in cert.subject().iter_common_name() {
            match cn.as_str() {
                Ok(cn) if cn == identity.name => {}
                _ => {
                    return Err(unauthenticated(
                        "client certificate common name does not match its identity uri",
                    ));
                }
            }
        }
        let validity = cert.validity();
        Ok(PeerCertificate {
            identity,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
        })
    }

    /// Refuses the certificate outside its validity period.
    pub fn check_valid_at(&self, now: SystemTime) -> Result<()> {
        if now > self.not_after {
            return Err(unauthenticated(format!("client certificate of {} expired", self.identity)));
        }
        if now < self.not_before {
            return Err(unauthenticated(format!("client certificate of {} is not valid yet", self.identity)));
        }
        Ok(())
    }
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    let magnitude = std::time::Duration::from_secs(unix_seconds.unsigned_abs());
    if unix_seconds >= 0 { SystemTime::UNIX_EPOCH + magnitude } else { SystemTime::UNIX_EPOCH - magnitude }
}

fn unauthenticated(msg: impl Into<String>) -> Error {
    Error::Api(ApiError::Unauthenticated(msg.into()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A self-signed certificate valid from 2025-12-31 to 2026-01-31.
    fn cert(cn: &str, uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*uri).unwrap()));
        }
        params.not_before = rcgen::date_time_ymd(2025, 12, 31);
        params.not_after = rcgen::date_time_ymd(2026, 1, 31);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn at(y: i32, m: u8, d: u8) -> SystemTime {
        let dt = rcgen::date_time_ymd(y, m, d);
        SystemTime::UNIX_EPOCH + Duration::from_secs(dt.unix_timestamp() as u64)
    }

    #[test]
    fn spiffe_uri_round_trips_for_every_role() {
        for role in Role::ALL {
            let id = Identity::new("pump-7.site_a", role).unwrap();
            let uri = id.spiffe_uri();
            assert_eq!(uri, format!("spiffe://llmchain/{role}/pump-7.site_a"));
            assert_eq!(Identity::from_spiffe_uri(&uri), Some(id));
            assert_eq!(Role::try_from(pb::Role::from(role)).unwrap(), role);
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!(Role::try_from(pb::Role::Unspecified).is_err());
    }

    #[test]
    fn malformed_uris_are_refused() {
        for uri in [
            "spiffe://llmchain/agent/",
            "spiffe://llmchain/agent/a/b",
            "spiffe://llmchain/admin/a",
            "spiffe://other/agent/a",
            "https://llmchain/agent/a",
            "spiffe://llmchain/agent/A",
            "spiffe://llmchain/agent/-a",
            "spiffe://llmchain/agent",
        ] {
            assert_eq!(Identity::from_spiffe_uri(uri), None, "{uri}");
        }
        assert!(Identity::new("Bad/Name", Role::Agent).is_err());
    }

    #[test]
    fn certificate_names_its_identity_and_validity() {
        let der = cert("agent-1", &["spiffe://llmchain/agent/agent-1"]);
        let id = Identity::from_cert_der(&der).unwrap();
        assert_eq!(id, Identity { name: "agent-1".into(), role: Role::Agent });
        assert_eq!(Identity::from_cert_der_at(&der, at(2026, 1, 15)).unwrap(), id);

        let expired = Identity::from_cert_der_at(&der, at(2026, 3, 1)).unwrap_err();
        assert!(matches!(expired, Error::Api(ApiError::Unauthenticated(m)) if m.contains("expired")));
        let early = Identity::from_cert_der_at(&der, at(2025, 12, 1)).unwrap_err();
        assert!(matches!(early, Error::Api(ApiError::Unauthenticated(m)) if m.contains("not valid yet")));
    }

    #[test]
    fn certificates_without_exactly_one_consistent_identity_are_refused() {
        let cases = [
            cert("agent-1", &[]),
            cert("agent-1", &["spiffe://llmchain/agent/agent-1", "spiffe://llmchain/operator/agent-1"]),
            cert("agent-2", &["spiffe://llmchain/agent/agent-1"]),
            cert("agent-1", &["spiffe://llmchain/root/agent-1"]),
        ];
        for der in cases {
            let err = Identity::from_cert_der(&der).unwrap_err();
            assert!(matches!(err, Error::Api(ApiError::Unauthenticated(_))), "{err}");
        }
        assert!(matches!(
            Identity::from_cert_der(b"not a certificate").unwrap_err(),
            Error::Api(ApiError::Unauthenticated(_))
        ));
    }
}
