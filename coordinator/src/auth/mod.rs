//! Authentication and authorization of callers.
//!
//! The TLS handshake proves a caller holds a certificate from the coordinator's CA; this module
//! turns that certificate into an [`Identity`] and decides what the identity may do:
//! [`policy`] maps each RPC to its roles, [`layer`] enforces it (with [`revocation`] and
//! [`ratelimit`]) in front of every service, and [`scope`] backs the handlers' per-agent checks.

pub mod identity;
pub mod layer;
pub mod policy;
pub mod ratelimit;
pub mod revocation;
pub mod scope;

pub use identity::{Identity, PeerCertificate, Role};
pub use layer::{AuthConfig, AuthLayer, AuthMode, Authorizer, Caller};
pub use ratelimit::RateLimit;
