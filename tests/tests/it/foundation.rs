//! Foundation checks on the real binaries: the coordinator serves health and reflection,
//! shuts down cleanly on SIGTERM, and the libtorch boundary holds (the coordinator and
//! llmchainctl never link it; the agent finds it through its rpath).

use std::{process::Command, time::Duration};

use llmchain_tests::{bin, spawn_listening};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// `coordinator serve` on a free port with its state in `dir`.
fn coordinator(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin("coordinator"));
    cmd.args(["serve", "--insecure", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("embedded:{}", dir.join("state.redb").display()))
        .arg("--blobs")
        .arg(dir.join("blobs"))
        .env_clear()
        .env("RUST_LOG", "warn");
    cmd
}

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

async fn list_services(addr: std::net::SocketAddr) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let answer = stream.message().await.unwrap().expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test]
async fn coordinator_serves_health_and_reflection_then_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr) = spawn_listening(coordinator(dir.path()), Duration::from_secs(30));

    let services = list_services(addr).await;
    for expected in ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "llmchain.v1.Registry"] {
        assert!(services.iter().any(|s| s == expected), "{expected} missing from {services:?}");
    }

    let mut health = HealthClient::new(channel(addr).await);
    let overall = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(overall.status(), ServingStatus::Serving);
    let registry = health.check(HealthCheckRequest { service: "llmchain.v1.Registry".into() }).await.unwrap();
    assert_eq!(registry.into_inner().status(), ServingStatus::Serving);
    let unknown = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let pid = nix::unistd::Pid::from_raw(proc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = llmchain_tests::eventually(Duration::from_secs(20), || {
        let s = proc.child.try_wait().unwrap();
        async move { s }
    })
    .await
    .expect("coordinator did not exit within 20 s of SIGTERM");
    assert!(status.success(), "coordinator exited with {status}");
}

#[tokio::test]
async fn max_message_bytes_bounds_every_service_request() {
    use llmchain_proto::pb;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = coordinator(dir.path());
    cmd.args(["--max-message-bytes", "65536"]);
    let (_proc, addr) = spawn_listening(cmd, Duration::from_secs(30));
    let publish = |bytes: usize| pb::PublishVersionRequest {
        signed: Some(pb::SignedManifest {
            manifest: vec![7; bytes],
            signature: vec![0; 64],
            key_id: "ed25519:00".into(),
        }),
    };
    let mut registry = pb::registry_client::RegistryClient::new(channel(addr).await);
    let big = registry.publish_version(publish(80 << 10)).await.unwrap_err();
    assert_eq!(big.code(), tonic::Code::OutOfRange, "{big:?}");
    assert!(big.message().contains("65536"), "{big:?}");
    // Under the limit the request is decoded and refused for what it is (not a manifest).
    let small = registry.publish_version(publish(32 << 10)).await.unwrap_err();
    assert_ne!(small.code(), tonic::Code::OutOfRange, "{small:?}");

    let mut rollouts = pb::rollouts_client::RolloutsClient::new(channel(addr).await);
    let spec = pb::CreateRolloutRequest { selector: "m".repeat(80 << 10), ..Default::default() };
    let err = rollouts.create_rollout(spec).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    let mut fleet = pb::fleet_client::FleetClient::new(channel(addr).await);
    let err = fleet.list_agents(pb::ListAgentsRequest { selector: "k".repeat(80 << 10) }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
}

#[test]
fn coordinator_refuses_a_bad_config_file_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\nlisten_port = 3\n").unwrap();
    let out =
        Command::new(bin("coordinator")).args(["serve", "--config"]).arg(&path).env_clear().output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_port") && stderr.contains("coordinator.toml"), "{stderr}");
}

fn ldd(binary: &str) -> String {
    let out = Command::new("ldd").arg(bin(binary)).output().expect("ldd is part of libc-bin");
    assert!(out.status.success(), "ldd {binary}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn coordinator_and_llmchainctl_do_not_link_libtorch() {
    for binary in ["coordinator", "llmchainctl"] {
        let libs = ldd(binary);
        assert!(!libs.contains("libtorch") && !libs.contains("libc10"), "{binary} links libtorch:\n{libs}");
    }
    // The check is meaningful only if ldd does show libtorch where it is linked.
    assert!(ldd("edge-agent").contains("libtorch_cpu"), "edge-agent should link libtorch");
}

#[test]
fn every_binary_answers_help_without_any_environment() {
    for binary in ["coordinator", "edge-agent", "cloud-trainer", "llmchainctl"] {
        let out = Command::new(bin(binary)).arg("--help").env_clear().output().unwrap();
        assert!(out.status.success(), "{binary} --help failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage:"), "{binary} --help printed no usage:\n{text}");
        assert!(!text.to_lowercase().contains("not implemented"), "{binary} advertises a placeholder");
    }
}

#[test]
fn edge_agent_reports_its_device_from_a_bare_environment() {
    let out = Command::new(bin("edge-agent")).arg("device").env_clear().output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["cpu_threads"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["device"] == "cpu" || report["device"].as_str().unwrap().starts_with("cuda"), "{report}");
}

#[tokio::test]
async fn llmchainctl_status_lists_services_and_fails_clearly_when_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let (_proc, addr) = spawn_listening(coordinator(dir.path()), Duration::from_secs(30));
    let out = Command::new(bin("llmchainctl"))
        .args(["status", "-o", "json", "--insecure", "--coordinator", &format!("http://{addr}")])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(rows.as_array().unwrap().iter().any(|r| r["service"] == "grpc.health.v1.Health"), "{rows}");

    // A port nothing listens on: bind one, then release it.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = Command::new(bin("llmchainctl"))
        .args(["status", "--timeout", "2", "--insecure", "--coordinator", &format!("http://{free}")])
        .env_clear()
        .output()
        .unwrap();
    // Exit code 2 is llmchainctl's "cannot reach the coordinator".
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach the coordinator"), "{stderr}");
}
