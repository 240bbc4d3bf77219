//! The authorization layer: every request's identity, revocation, role and rate are checked
//! before any service sees it.
//!
//! Order of checks, and the refusal of each (the test table in `docs/security.md` follows it):
//! 1. the path's row in [`policy::METHODS`]: public RPCs (enrollment, health, reflection) pass
//!    with or without a certificate;
//! 2. no client certificate, or one that is malformed or outside its validity period →
//!    `UNAUTHENTICATED` (rustls already refused certificates of other CAs);
//! 3. a revoked identity → `UNAUTHENTICATED`, naming the revocation;
//! 4. a path not in the table, or a role not in its row → `PERMISSION_DENIED`;
//! 5. the identity's token bucket is empty → `RESOURCE_EXHAUSTED`.
//!
//! An admitted request carries a [`Caller`] (and its [`Identity`]) in its extensions for the
//! handlers' per-identity checks, and its response body ends with `UNAUTHENTICATED` the moment
//! the identity is revoked, which is how `RevokeAgent` ends a live session on every replica.
//! In [`AuthMode::Insecure`] nothing is checked and requests carry an unrestricted caller.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::Frame;
use llmchain_proto::{
    ApiError,
    model::{AgentId, Digest, ModelRef},
};
use tokio_util::sync::CancellationToken;
use tonic::{
    Status,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tracing::info;

use super::{
    Identity, Role,
    policy::{self, Access},
    ratelimit::{RateLimit, RateLimiters},
    revocation::{self, RevocationRecord, RevocationSet},
    scope::AgentScopes,
};
use crate::{Result, store::Store};

/// Whether the server checks identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Plaintext development mode (`--insecure`): every RPC is allowed to everyone.
    Insecure,
    /// Mutual TLS: every non-public RPC needs a valid, unrevoked certificate of an allowed role.
    Mtls,
}

/// Settings of the authorization layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthConfig {
    /// Whether identities are checked.
    pub mode: AuthMode,
    /// Requests each identity may make.
    pub rate_limit: RateLimit,
}

impl AuthConfig {
    /// A config in `mode` with the default rate limit.
    pub fn new(mode: AuthMode) -> Self {
        AuthConfig { mode, rate_limit: RateLimit::default() }
    }
}

/// Decides on requests; shared by the layer and, through [`Caller`], the handlers.
#[derive(Debug)]
pub struct Authorizer {
    mode: AuthMode,
    revoked: RevocationSet,
    limits: RateLimiters,
    scopes: AgentScopes,
}

impl Authorizer {
    /// Loads the revocation set from `store` and follows it until `cancel` fires.
    pub async fn start(
        store: Arc<dyn Store>,
        config: AuthConfig,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>> {
        let revoked = RevocationSet::follow(Arc::clone(&store), cancel).await?;
        Ok(Arc::new(Authorizer {
            mode: config.mode,
            revoked,
            limits: RateLimiters::new(config.rate_limit),
            scopes: AgentScopes::new(store),
        }))
    }

    /// Whether identities are checked.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The revoked identities.
    pub fn revocations(&self) -> &RevocationSet {
        &self.revoked
    }

    /// Admits a request for `path` from the holder of `cert` (DER), or says why not.
    ///
    /// Returns the caller's identity for non-public RPCs in [`AuthMode::Mtls`].
    pub fn admit(&self, path: &str, cert: Option<&[u8]>) -> Result<Option<Identity>, ApiError> {
        let access = policy::access(path);
        if self.mode == AuthMode::Insecure || access == Some(Access::Public) {
            return Ok(None);
        }
        let der = cert.ok_or_else(|| {
            ApiError::Unauthenticated(format!("{path} needs a client certificate; enroll to get one"))
        })?;
        let identity = Identity::from_cert_der_at(der, SystemTime::now()).map_err(ApiError::from)?;
        if self.revoked.contains(&identity.name) {
            return Err(revocation::revoked_error(&identity.name));
        }
        let Some(Access::Roles(roles)) = access else {
            return Err(ApiError::PermissionDenied(format!("{path} is not an rpc of this server")));
        };
        if !roles.contains(&identity.role) {
            return Err(ApiError::PermissionDenied(format!(
                "{} may not call {path} (allowed: {})",
                identity,
                roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        self.limits.check(&identity.name)?;
        Ok(Some(identity))
    }
}

/// The caller of a request as the handlers see it; [`Caller::of`] reads it from the request.
///
/// Without an identity (insecure mode, or a service called without the layer, as unit tests
/// do) every per-identity check passes.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    identity: Option<Identity>,
    authz: Option<Arc<Authorizer>>,
}

impl Caller {
    /// The caller the authorization layer attached to `request`.
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request.extensions().get::<Caller>().cloned().unwrap_or_default()
    }

    /// The authenticated identity, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The identity's name when the caller is an agent.
    fn agent(&self) -> Option<&str> {
        self.identity.as_ref().filter(|i| i.role == Role::Agent).map(|i| i.name.as_str())
    }

    /// Refuses unless the caller may act as agent `agent_id` (an agent only as itself).
    pub fn require_agent(&self, agent_id: &AgentId) -> Result<()> {
        match &self.identity {
            None => Ok(()),
            Some(i) if i.role == Role::Agent && i.name == agent_id.as_str() => Ok(()),
            Some(i) => Err(ApiError::PermissionDenied(format!("{i} may not act as agent {agent_id}")).into()),
        }
    }

    /// Refuses an agent a version other than the one assigned to it.
    pub async fn require_version(&self, version: &ModelRef) -> Result<()> {
        match (self.agent(), &self.authz) {
            (Some(agent), Some(authz)) => authz.scopes.check_version(agent, version).await,
            _ => Ok(()),
        }
    }

    /// Refuses an agent a blob that is not part of the version assigned to it.
    pub async fn require_blob(&self, digest: &Digest) -> Result<()> {
        match (self.agent(), &self.authz) {
            (Some(agent), Some(authz)) => authz.scopes.check_blob(agent, digest).await,
            _ => Ok(()),
        }
    }

    /// Whether identity `name` is revoked (false when served without the layer).
    pub fn is_revoked(&self, name: &str) -> bool {
        self.authz.as_ref().is_some_and(|a| a.revoked.contains(name))
    }

    /// Revokes `agent`: stores the record and ends its requests and streams on every replica.
    pub async fn revoke(&self, agent: &AgentId, reason: &str) -> Result<RevocationRecord> {
        let authz = self.authz.as_ref().ok_or_else(|| {
            ApiError::Internal("revocation needs the authorization layer, which this server lacks".into())
        })?;
        let by = self.identity.as_ref().map(ToString::to_string).unwrap_or_default();
        revocation::revoke(authz.scopes.store().as_ref(), &authz.revoked, agent.as_str(), reason, &by).await
    }
}

/// Tower layer of the authorization checks.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authz: Arc<Authorizer>,
}

impl AuthLayer {
    /// The layer deciding with `authz` (whose mode says whether it checks anything).
    pub fn new(authz: Arc<Authorizer>) -> Self {
        AuthLayer { authz }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, authz: Arc::clone(&self.authz) }
    }
}

/// The service [`AuthLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    authz: Arc<Authorizer>,
}

/// The first certificate the client presented in the TLS handshake, if any.
fn peer_certificate<B>(req: &http::Request<B>) -> Option<Vec<u8>> {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    certs.first().map(|c| c.as_ref().to_vec())
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let cert = peer_certificate(&req);
        let path = req.uri().path().to_string();
        let identity = match self.authz.admit(&path, cert.as_deref()) {
            Ok(identity) => identity,
            Err(refusal) => {
                info!(path = %path, code = ?refusal.code(), reason = %refusal, "request refused");
                return Box::pin(futures::future::ready(Ok(Status::from(refusal).into_http())));
            }
        };
        let revoked = identity.as_ref().map(|i| (i.name.clone(), self.authz.revoked.revoked(i.name.clone())));
        if let Some(identity) = &identity {
            req.extensions_mut().insert(identity.clone());
        }
        req.extensions_mut().insert(Caller { identity, authz: Some(Arc::clone(&self.authz)) });
        // The clone that was polled ready serves this request; the fresh one waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(req).await?;
            Ok(response.map(|body| match revoked {
                Some((name, revoked)) => tonic::body::Body::new(RevocableBody {
                    inner: tonic::body::Body::new(body),
                    revoked: Some(Box::pin(revoked)),
                    name,
                    ended: false,
                }),
                None => tonic::body::Body::new(body),
            }))
        })
    }
}

/// A response body that ends with `UNAUTHENTICATED` once its caller is revoked.
struct RevocableBody {
    inner: tonic::body::Body,
    /// Completes on revocation; dropped once the inner body sent its trailers.
    revoked: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    name: String,
    ended: bool,
}

impl http_body::Body for RevocableBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(revoked) = this.revoked.as_mut()
            && revoked.as_mut().poll(cx).is_ready()
        {
            this.ended = true;
            info!(identity = %this.name, "ending the stream of a revoked identity");
            let mut trailers = http::HeaderMap::new();
            return Poll::Ready(Some(
                match Status::from(revocation::revoked_error(&this.name)).add_header(&mut trailers) {
                    Ok(()) => Ok(Frame::trailers(trailers)),
                    Err(status) => Err(status),
                },
            ));
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Ok(f))) if f.is_trailers() => this.revoked = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }
}
