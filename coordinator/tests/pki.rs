//! The coordinator's TLS transport, in process: the server built by `server::serve_with_tls`
//! with the material of `pki::TlsMaterial` hands each request the caller's verified
//! certificate (what the authorization layer reads), accepts callers without one (enrollment),
//! and refuses certificates that are expired or from another CA during the handshake.

use std::{
    convert::Infallible,
    task::{Context, Poll},
    time::Duration,
};

use llmchain_coordinator::{
    auth::{Identity, Role},
    pki::{Ca, TlsMaterial, TlsSettings, files},
    server::{self, Limits, ServiceSet},
};
use llmchain_proto::pb::{self, fleet_client::FleetClient};
use llmchain_runtime::tls::Transport;
use tokio_util::sync::CancellationToken;
use tonic::{
    server::NamedService,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

/// A stand-in `llmchain.v1.Fleet` that answers every call with the identity tonic put into the
/// request's extensions, as a trailers-only status `UNAUTHENTICATED` whose message is
/// `peer=<role>/<name>` or `peer=none`.
#[derive(Clone)]
struct WhoAmI;

impl NamedService for WhoAmI {
    const NAME: &'static str = "llmchain.v1.Fleet";
}

impl tower::Service<http::Request<tonic::body::Body>> for WhoAmI {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|certs| certs.first().map(|c| Identity::from_cert_der(c).map(|i| i.to_string())))
            .map_or_else(|| "none".to_string(), |r| r.unwrap_or_else(|e| format!("invalid: {e}")));
        let response = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "16")
            .header("grpc-message", format!("peer={peer}"))
            .body(tonic::body::Body::empty())
            .unwrap();
        std::future::ready(Ok(response))
    }
}

struct Server {
    url: String,
    ca_pem: String,
    stop: CancellationToken,
}

async fn start(dir: &std::path::Path) -> (Server, TlsMaterial) {
    let settings = TlsSettings {
        dir: dir.join("tls"),
        sans: vec!["localhost".into(), "127.0.0.1".into()],
        cert_validity: Duration::from_secs(3600),
    };
    let material = TlsMaterial::load_or_create(&settings).unwrap();
    let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut services = ServiceSet::default();
    services.add(WhoAmI);
    let stop = CancellationToken::new();
    let tls = Some(material.server_config());
    tokio::spawn(server::serve_with_tls(listener, services, Limits::default(), tls, stop.clone()));
    let ca_pem = material.ca.cert_pem().to_string();
    (Server { url: format!("https://{addr}"), ca_pem, stop }, material)
}

/// What the server saw of the caller (the message of its status), or the transport error.
async fn who(url: &str, transport: &Transport) -> Result<String, tonic::Status> {
    let channel = match transport.endpoint(url).unwrap().connect().await {
        Ok(c) => c,
        Err(e) => return Err(tonic::Status::unavailable(format!("connect: {e}"))),
    };
    let err = FleetClient::new(channel)
        .list_agents(pb::ListAgentsRequest { selector: String::new() })
        .await
        .expect_err("the stand-in always answers with a status");
    if err.code() == tonic::Code::Unauthenticated && err.message().starts_with("peer=") {
        Ok(err.message().trim_start_matches("peer=").to_string())
    } else {
        Err(err)
    }
}

#[tokio::test]
async fn the_verified_peer_certificate_reaches_the_request_and_bad_ones_never_do() {
    let dir = tempfile::tempdir().unwrap();
    let (server, material) = start(dir.path()).await;

    // The admin identity generated with the CA.
    let tls = dir.path().join("tls");
    let read = |name: &str| std::fs::read_to_string(tls.join(name)).unwrap();
    let admin =
        Transport::tls(server.ca_pem.clone(), Some((read(files::ADMIN_CERT), read(files::ADMIN_KEY))));
    assert_eq!(who(&server.url, &admin.unwrap()).await.unwrap(), "operator/admin");

    // A certificate issued to an agent from its own CSR.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let agent = Identity::new("edge-9", Role::Agent).unwrap();
    let cert = material.ca.issue(&csr, &agent, Duration::from_secs(600)).unwrap();
    let transport = Transport::tls(server.ca_pem.clone(), Some((cert, key.serialize_pem()))).unwrap();
    assert_eq!(who(&server.url, &transport).await.unwrap(), "agent/edge-9");

    // No client certificate: the handshake succeeds (Enroll must work) and the request says so.
    let anonymous = Transport::tls(server.ca_pem.clone(), None).unwrap();
    assert_eq!(who(&server.url, &anonymous).await.unwrap(), "none");

    // Plaintext to the TLS port never reaches a service.
    let plain = who(&server.url.replace("https://", "http://"), &Transport::Insecure).await.unwrap_err();
    assert!(!plain.message().starts_with("peer="), "{plain:?}");

    // An expired certificate fails the handshake.
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    let short = material.ca.issue(&csr, &agent, Duration::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = Transport::tls(server.ca_pem.clone(), Some((short, key.serialize_pem()))).unwrap();
    let refused = who(&server.url, &expired).await.unwrap_err();
    assert!(!refused.message().starts_with("peer="), "{refused:?}");

    // A certificate from another CA (same name and role) fails the handshake too.
    let (other_ca, _) = Ca::generate().unwrap();
    let (forged, forged_key) = other_ca.issue_with_new_key(&agent, Duration::from_secs(600)).unwrap();
    let forged = Transport::tls(server.ca_pem.clone(), Some((forged, forged_key))).unwrap();
    let refused = who(&server.url, &forged).await.unwrap_err();
    assert!(!refused.message().starts_with("peer="), "{refused:?}");

    // A client that pins another CA does not talk to this server.
    let wrong_pin = Transport::tls(other_ca.cert_pem().to_string(), None).unwrap();
    assert!(who(&server.url, &wrong_pin).await.is_err());

    server.stop.cancel();
}
