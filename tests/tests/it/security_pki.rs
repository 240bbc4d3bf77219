//! Identity and transport with the real binaries: a coordinator with its own CA
//! (`--tls-dir`), bootstrap tokens from `llmchainctl token create`, `edge-agent enroll` and
//! `llmchainctl enroll`, and an enrolled agent that runs a model over mutual TLS.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use llmchain_coordinator::{
    auth::{Identity, Role},
    pki::token_key,
};
use llmchain_proto::pb::fleet_client::FleetClient;
use llmchain_runtime::tls::{TlsFiles, Transport};
use llmchain_tests::{
    bin,
    fleet::{Coordinator, TrainerKey, assign, publish_over, spawn_agent, tiny_model, wait_running},
};

const MODEL: &str = "tiny-pki";

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn run(cmd: &mut Command) -> Output {
    cmd.env_clear().env("RUST_LOG", "warn").output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `llmchainctl` as the coordinator's first operator (admin.pem / admin.key).
fn ctl_admin(tls: &Path, url: &str) -> Command {
    let mut cmd = Command::new(bin("llmchainctl"));
    cmd.args(["--coordinator", url, "--timeout", "10", "--ca-file"])
        .arg(tls.join("ca.pem"))
        .arg("--cert")
        .arg(tls.join("admin.pem"))
        .arg("--cert-key")
        .arg(tls.join("admin.key"));
    cmd
}

fn create_token(tls: &Path, url: &str, role: &str, name: &str, ttl: &str) -> String {
    let out =
        run(ctl_admin(tls, url).args(["token", "create", "--role", role, "--name", name, "--ttl", ttl]));
    assert!(out.status.success(), "token create: {}", stderr(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.len(), 64, "{token:?}");
    token
}

fn agent_enroll(tls: &Path, url: &str, token: &str, state: &Path) -> Output {
    run(Command::new(bin("edge-agent"))
        .args(["enroll", "--coordinator", url, "--token", token, "--force", "--ca-file"])
        .arg(tls.join("ca.pem"))
        .arg("--state-dir")
        .arg(state))
}

fn cert_identity(pem_path: &Path) -> Identity {
    let pem = std::fs::read(pem_path).unwrap();
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    Identity::from_cert_der(&block.contents).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_agent_runs_over_mutual_tls_and_tokens_are_single_use_hashed_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let trainer = TrainerKey::generate(dir.path(), "trainer");
    let tls_arg = tls.to_str().unwrap();
    let c =
        Coordinator::start(dir.path(), &[&trainer.public], &["--tls-dir", tls_arg, "--cert-validity", "2h"]);
    let url = format!("https://{}", c.addr);

    // The CA, the serving identity and the first operator: private keys 0600.
    for key in ["ca.key", "server.key", "admin.key"] {
        assert_eq!(mode(&tls.join(key)), 0o600, "{key}");
    }
    assert_eq!(cert_identity(&tls.join("admin.pem")), Identity::new("admin", Role::Operator).unwrap());

    // Plaintext clients do not get through to a TLS coordinator.
    let out = run(Command::new(bin("llmchainctl")).args([
        "status",
        "--insecure",
        "--timeout",
        "3",
        "--coordinator",
        &format!("http://{}", c.addr),
    ]));
    assert!(!out.status.success(), "plaintext status succeeded against a TLS coordinator");

    // An agent token works once, for its name.
    let token = create_token(&tls, &url, "agent", "edge-s1", "10m");
    let state = dir.path().join("edge-s1").join("state");
    let out = agent_enroll(&tls, &url, &token, &state);
    assert!(out.status.success(), "enroll: {}", stderr(&out));
    assert_eq!(mode(&state.join("identity.key")), 0o600);
    assert_eq!(cert_identity(&state.join("identity.pem")), Identity::new("edge-s1", Role::Agent).unwrap());
    let trusted = std::fs::read_to_string(state.join("trusted-keys")).unwrap();
    assert_eq!(trusted.trim(), std::fs::read_to_string(&trainer.public).unwrap().trim());

    let again = agent_enroll(&tls, &url, &token, &dir.path().join("thief"));
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("Unauthenticated") && stderr(&again).contains("already used"),
        "{}",
        stderr(&again)
    );
    assert!(!dir.path().join("thief").join("identity.pem").exists());

    // A token past its TTL is refused.
    let short = create_token(&tls, &url, "agent", "edge-late", "1s");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late = agent_enroll(&tls, &url, &short, &dir.path().join("late"));
    assert!(!late.status.success());
    assert!(stderr(&late).contains("expired"), "{}", stderr(&late));

    // The store keeps tokens by hash only: the file holds the hash of an unused token and
    // not the token.
    let unused = create_token(&tls, &url, "agent", "edge-unused", "10m");
    let db = std::fs::read(dir.path().join("state.redb")).unwrap();
    let contains = |needle: &str| db.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(contains(&token_key(&unused)), "the token record is not in the store file");
    assert!(!contains(&unused) && !contains(&token), "a plaintext token is in the store file");

    // A trainer enrolls with `llmchainctl enroll` and publishes over mutual TLS.
    let trainer_token = create_token(&tls, &url, "trainer", "trainer-1", "10m");
    let trainer_dir = dir.path().join("trainer-id");
    let out = run(Command::new(bin("llmchainctl"))
        .args(["enroll", "--coordinator", &url, "--token", &trainer_token, "--out"])
        .arg(&trainer_dir)
        .arg("--ca-file")
        .arg(tls.join("ca.pem")));
    assert!(out.status.success(), "ctl enroll: {}", stderr(&out));
    assert_eq!(mode(&trainer_dir.join("identity.key")), 0o600);
    assert_eq!(
        cert_identity(&trainer_dir.join("identity.pem")),
        Identity::new("trainer-1", Role::Trainer).unwrap()
    );
    let trainer_tls = Transport::from_options(false, &TlsFiles::in_dir(&trainer_dir).unwrap()).unwrap();
    publish_over(&url, &trainer_tls, &trainer.key, MODEL, 1, &tiny_model(41, &[])).await;

    // An agent without an identity and without --insecure refuses to start.
    let out = run(Command::new(bin("edge-agent"))
        .args(["run", "--coordinator", &url, "--trainer-key"])
        .arg(&trainer.public)
        .arg("--state-dir")
        .arg(dir.path().join("nobody")));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("edge-agent enroll"), "{}", stderr(&out));

    // The enrolled agent (its state directory holds the identity, so no --insecure) runs the
    // assigned version over mutual TLS.
    let _agent = spawn_agent(dir.path(), "edge-s1", &url, &trainer.public, &["--source", "sim:rate=20"]);
    let admin = Transport::from_options(
        false,
        &TlsFiles {
            ca: Some(tls.join("ca.pem")),
            cert: Some(tls.join("admin.pem")),
            key: Some(tls.join("admin.key")),
        },
    )
    .unwrap();
    let mut fleet = FleetClient::new(admin.endpoint(&url).unwrap().connect().await.unwrap());
    assign(&mut fleet, "edge-s1", MODEL, 1, false).await;
    wait_running(&mut fleet, "edge-s1", MODEL, 1, Duration::from_secs(60)).await;
}
