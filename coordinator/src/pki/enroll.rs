//! Bootstrap tokens and enrollment: how a new agent, trainer or operator gets its certificate.
//!
//! A token is 32 random bytes (64 hex digits) shown once to the operator who created it. The
//! store keeps only its sha256 under `security/tokens/<hex>` with the role, the optional name
//! and the expiry, so a copy of the store enrolls nobody. `Enroll` reads the record, checks the
//! expiry, the name and the CSR, then deletes the record in a transaction that holds only if
//! the record is unchanged since it was read: of two concurrent enrollments with one token,
//! exactly one wins, and a used token is gone. A token that is never redeemed does not stay
//! either: its record is attached to a store lease that ends a grace period after the token
//! expires (as long again as its lifetime, at most an hour), so the store deletes it by
//! itself, on etcd as on the embedded store; until then, presenting it is answered "expired".
//!
//! Refusals: an unknown, used or expired token is `UNAUTHENTICATED`; a token made for another
//! name is `PERMISSION_DENIED`; a malformed name or CSR is `INVALID_ARGUMENT` (and leaves the
//! token usable); a coordinator without a CA (`--insecure`) answers `FAILED_PRECONDITION`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use llmchain_artifact::PublicKey;
use llmchain_proto::{ApiError, model::AgentId};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::Ca;
use crate::{
    Error, Result,
    auth::{Identity, Role},
    store::{Compare, Op, Store, Txn},
};

/// Store prefix of bootstrap token records, keyed by the token's sha256 (hex).
pub const TOKENS_PREFIX: &str = "security/tokens/";
/// Lifetime of a token created with TTL 0.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime of a token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest time a token's record outlives the token (see the module docs).
const MAX_RECORD_GRACE: Duration = Duration::from_secs(3600);
/// Largest CSR accepted.
const MAX_CSR_BYTES: usize = 16 << 10;

/// The store key of `token`: its sha256, never the token itself.
pub fn token_key(token: &str) -> String {
    format!("{TOKENS_PREFIX}{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// What the store keeps about a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TokenRecord {
    /// Role of the identity it enrolls.
    role: String,
    /// The only name it enrolls; empty: the enrolling side chooses.
    name: String,
    /// Expiry, milliseconds since the Unix epoch.
    expires_unix_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A certificate issued by [`Enrollment::enroll`].
#[derive(Debug, Clone)]
pub struct Issued {
    /// Who it names.
    pub identity: Identity,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The CA certificate (PEM).
    pub ca_pem: String,
    /// The trainer keys the coordinator trusts, handed to agents at enrollment.
    pub trainer_keys: Vec<PublicKey>,
}

/// Tokens and certificate issuance over the coordinator's store and CA.
pub struct Enrollment {
    ca: Option<Arc<Ca>>,
    store: Arc<dyn Store>,
    trainer_keys: Vec<PublicKey>,
    cert_validity: Duration,
}

impl Enrollment {
    /// Enrollment signing with `ca` (`None`: the coordinator runs `--insecure` and refuses),
    /// issuing certificates valid for `cert_validity`.
    pub fn new(
        ca: Option<Arc<Ca>>,
        store: Arc<dyn Store>,
        trainer_keys: Vec<PublicKey>,
        cert_validity: Duration,
    ) -> Self {
        Enrollment { ca, store, trainer_keys, cert_validity }
    }

    fn ca(&self) -> Result<&Ca> {
        self.ca.as_deref().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "this coordinator runs with --insecure: it has no CA, so there is nothing to enroll with"
                    .into(),
            )
            .into()
        })
    }

    /// Creates a token for `role` (and only `name` when given) living `ttl` (zero: one hour);
    /// returns the token, which is not stored, and its expiry.
    pub async fn create_token(
        &self,
        role: Role,
        name: Option<&str>,
        ttl: Duration,
    ) -> Result<(String, SystemTime)> {
        self.ca()?;
        let ttl = if ttl.is_zero() { DEFAULT_TOKEN_TTL } else { ttl };
        if ttl > MAX_TOKEN_TTL {
            return Err(ApiError::invalid("ttl_seconds", "must be at most 7 days").into());
        }
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => AgentId::parse("name", n)?.as_str().to_string(),
            None => String::new(),
        };
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| Error::Tls(format!("no randomness for a token: {e}")))?;
        let token = hex::encode(bytes);
        let expires = SystemTime::now() + ttl;
        let record = TokenRecord { role: role.as_str().into(), name, expires_unix_ms: unix_ms(expires) };
        let value = serde_json::to_vec(&record).map_err(|e| Error::Store(format!("token record: {e}")))?;
        let key = token_key(&token);
        let lease = self.store.grant_lease(ttl + ttl.min(MAX_RECORD_GRACE)).await?;
        let put = Op::put_with_lease(&key, value, lease);
        let done = self.store.txn(Txn::new().when([Compare::absent(&key)]).and_then([put])).await?;
        if !done.succeeded {
            let _ = self.store.revoke_lease(lease).await;
            // 256 random bits collided: never in practice, but never overwrite either.
            return Err(ApiError::Internal("token collision".into()).into());
        }
        tracing::info!(%role, name = %record.name, ttl_s = ttl.as_secs(), "bootstrap token created");
        Ok((token, expires))
    }

    /// Redeems `token` for a certificate over the key of `csr_pem`, naming `name` (empty: the
    /// name the token was made for).
    pub async fn enroll(&self, token: &str, name: &str, csr_pem: &str) -> Result<Issued> {
        let ca = self.ca()?;
        if token.is_empty() || token.len() > 256 {
            return Err(ApiError::Unauthenticated("a bootstrap token is required".into()).into());
        }
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(ApiError::invalid("csr_pem", format!("larger than {MAX_CSR_BYTES} bytes")).into());
        }
        let key = token_key(token);
        let refused =
            || Error::from(ApiError::Unauthenticated("bootstrap token unknown or already used".into()));
        let kv = self.store.get(&key).await?.ok_or_else(refused)?;
        let record: TokenRecord =
            serde_json::from_slice(&kv.value).map_err(|e| Error::Store(format!("token record: {e}")))?;
        if unix_ms(SystemTime::now()) >= record.expires_unix_ms {
            // Expired tokens are useless: drop the record (only if nobody changed it meanwhile).
            let _ = self
                .store
                .txn(
                    Txn::new()
                        .when([Compare::ModRevision(key.clone(), kv.mod_revision)])
                        .and_then([Op::delete(&key)]),
                )
                .await;
            return Err(ApiError::Unauthenticated("bootstrap token expired".into()).into());
        }
        let name = match (record.name.as_str(), name) {
            ("", "") => {
                return Err(ApiError::invalid("name", "this token needs a name for the identity").into());
            }
            ("", asked) => asked,
            (fixed, "") => fixed,
            (fixed, asked) if fixed == asked => asked,
            (fixed, asked) => {
                return Err(ApiError::PermissionDenied(format!(
                    "this bootstrap token enrolls {fixed:?}, not {asked:?}"
                ))
                .into());
            }
        };
        let role: Role = record.role.parse()?;
        let identity = Identity::new(name, role)?;
        // Signing does not consume the token; the transaction below does, so a CSR error
        // leaves the token usable and a race between two enrollments has one winner.
        let cert_pem = ca.issue(csr_pem, &identity, self.cert_validity)?;
        let used = self
            .store
            .txn(
                Txn::new()
                    .when([Compare::ModRevision(key.clone(), kv.mod_revision)])
                    .and_then([Op::delete(&key)]),
            )
            .await?;
        if !used.succeeded {
            return Err(refused());
        }
        // The lease only held this record; ending it now saves the store a timer.
        if let Some(lease) = kv.lease {
            let _ = self.store.revoke_lease(lease).await;
        }
        tracing::info!(%identity, "enrolled");
        Ok(Issued {
            identity,
            cert_pem,
            ca_pem: ca.cert_pem().to_string(),
            trainer_keys: self.trainer_keys.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    fn csr() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
    }

    async fn enrollment(dir: &std::path::Path) -> (Enrollment, Arc<dyn Store>) {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("state.redb")).await.unwrap());
        let (ca, _) = Ca::generate().unwrap();
        (Enrollment::new(Some(Arc::new(ca)), store.clone(), Vec::new(), Duration::from_secs(3600)), store)
    }

    #[tokio::test]
    async fn a_token_enrolls_once_by_hash_and_for_its_name_only() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = enrollment(dir.path()).await;
        let (token, _) = e.create_token(Role::Agent, Some("edge-1"), Duration::ZERO).await.unwrap();
        let stored = store.list(TOKENS_PREFIX).await.unwrap().kvs;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].key, token_key(&token));
        assert!(
            !stored[0].key.contains(&token) && !String::from_utf8_lossy(&stored[0].value).contains(&token)
        );

        let wrong = e.enroll(&token, "edge-2", &csr()).await.unwrap_err();
        assert!(matches!(ApiError::from(wrong), ApiError::PermissionDenied(_)));
        let bad_csr = e.enroll(&token, "", "not a csr").await.unwrap_err();
        assert!(matches!(ApiError::from(bad_csr), ApiError::InvalidArgument { .. }));
        let issued = e.enroll(&token, "", &csr()).await.unwrap();
        assert_eq!(issued.identity, Identity::new("edge-1", Role::Agent).unwrap());
        let again = e.enroll(&token, "edge-1", &csr()).await.unwrap_err();
        assert!(matches!(ApiError::from(again), ApiError::Unauthenticated(m) if m.contains("already used")));
        assert!(store.list(TOKENS_PREFIX).await.unwrap().kvs.is_empty());
    }

    #[tokio::test]
    async fn expired_tokens_are_refused_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = enrollment(dir.path()).await;
        let (token, _) = e.create_token(Role::Trainer, None, Duration::from_millis(50)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let err = e.enroll(&token, "trainer-1", &csr()).await.unwrap_err();
        assert!(matches!(ApiError::from(err), ApiError::Unauthenticated(m) if m.contains("expired")));
        assert!(store.list(TOKENS_PREFIX).await.unwrap().kvs.is_empty());
        let too_long = e.create_token(Role::Agent, None, MAX_TOKEN_TTL * 2).await.unwrap_err();
        assert!(matches!(ApiError::from(too_long), ApiError::InvalidArgument { .. }));
    }

    #[tokio::test]
    async fn a_token_never_redeemed_is_deleted_by_the_store_after_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = enrollment(dir.path()).await;
        let (kept, _) = e.create_token(Role::Agent, None, Duration::ZERO).await.unwrap();
        e.create_token(Role::Agent, None, Duration::from_millis(200)).await.unwrap();
        let stored = store.list(TOKENS_PREFIX).await.unwrap().kvs;
        assert_eq!(stored.len(), 2);
        assert!(stored.iter().all(|kv| kv.lease.is_some()), "{stored:?}");
        // 200 ms of life and 200 ms of grace, then the store's lease expiry removes the record;
        // the one-hour token stays.
        let t0 = std::time::Instant::now();
        let left = loop {
            let left: Vec<String> =
                store.list(TOKENS_PREFIX).await.unwrap().kvs.into_iter().map(|kv| kv.key).collect();
            if left.len() == 1 || t0.elapsed() > Duration::from_secs(10) {
                break left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(t0.elapsed() >= Duration::from_millis(350), "gone after {:?}", t0.elapsed());
        assert_eq!(left, vec![token_key(&kept)]);
        // Redeeming revokes the lease of the used record.
        let lease = store.get(&token_key(&kept)).await.unwrap().unwrap().lease.unwrap();
        e.enroll(&kept, "edge-9", &csr()).await.unwrap();
        assert!(store.keep_alive(lease).await.is_err());
    }

    #[tokio::test]
    async fn an_insecure_coordinator_has_nothing_to_enroll_with() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).await.unwrap());
        let e = Enrollment::new(None, store, Vec::new(), Duration::from_secs(60));
        let err = e.create_token(Role::Agent, None, Duration::ZERO).await.unwrap_err();
        assert!(matches!(ApiError::from(err), ApiError::FailedPrecondition(m) if m.contains("--insecure")));
    }
}
