//! Deployment artifacts checked against the real tools and binaries: every kustomize overlay
//! renders and validates against the Kubernetes API schemas; what the manifests pass to the
//! coordinator, the trainer and the agent (flags, `LLMCHAIN_*` variables, config file keys,
//! ports, probes, paths on mounted volumes) is what their `--help` accepts; the systemd unit
//! passes `systemd-analyze verify`; and the release tarball, packaged from the debug agent by
//! `scripts/release.sh` (the code path of `make release`), runs from an empty directory with no
//! environment and installs idempotently.
//!
//! Needs `kubectl`, `systemd-analyze`, `patchelf` and the venv's `kubernetes-validate`
//! (`make setup` installs the last three).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use llmchain_tests::bin;
use serde_json::Value;

/// Kubernetes version the manifests are validated against (a recent one kubernetes-validate
/// knows; native gRPC probes need 1.27+).
const KUBERNETES_VERSION: &str = "1.35.0";

const OVERLAYS: [&str; 5] = ["dev", "prod", "with-etcd", "trainer", "edge-agents"];

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn python() -> PathBuf {
    std::env::var_os("LLMCHAIN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".llmchain/venv/bin/python"))
}

/// Runs `cmd`, panicking with its output unless it exits 0.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).expect("utf-8 output")
}

// --- Rendering ------------------------------------------------------------------------------

/// `kubectl kustomize` of one overlay, as YAML.
fn render_yaml(overlay: &str) -> String {
    let dir = root().join("deploy/k8s/overlays").join(overlay);
    stdout(Command::new("kubectl").arg("kustomize").arg(&dir))
}

/// The objects of a rendered overlay (YAML converted by the venv's PyYAML).
fn render(overlay: &str) -> Vec<Value> {
    let yaml = render_yaml(overlay);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let json = stdout(Command::new(python()).arg("-c").arg(
        "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
    ).arg(&file));
    serde_json::from_str(&json).unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// A ConfigMap from a configMapGenerator (its name carries a content hash).
fn config_map<'a>(objects: &'a [Value], name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no ConfigMap {name}"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().expect("string").to_string()).collect())
        .unwrap_or_default()
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    let spec = pod_spec(workload);
    spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

// --- What a binary accepts -----------------------------------------------------------------

/// Long flags (with whether they take a value) and `[env: …]` variables of a `--help` text.
#[derive(Debug, Default)]
struct Help {
    flags: BTreeMap<String, bool>,
    env: BTreeSet<String>,
    text: String,
}

impl Help {
    fn of(binary: &str, args: &[&str]) -> Help {
        let text = stdout(Command::new(bin(binary)).args(args).arg("--help").env_clear());
        let mut help = Help { text: text.clone(), ..Help::default() };
        for line in text.lines() {
            let line = line.trim_start();
            let line = match line.as_bytes() {
                [b'-', c, b',', b' ', ..] if *c != b'-' => &line[4..],
                _ => line,
            };
            if let Some(rest) = line.strip_prefix("--") {
                let name: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                let takes_value = rest[name.len()..].trim_start().starts_with('<');
                help.flags.insert(name, takes_value);
            }
        }
        // `[env: NAME=]`, possibly wrapped after `[env:`.
        let tokens: Vec<&str> = text.split_whitespace().collect();
        for pair in tokens.windows(2) {
            if pair[0] == "[env:" {
                help.env.insert(pair[1].split('=').next().unwrap().to_string());
            } else if let Some(rest) = pair[0].strip_prefix("[env:") {
                help.env.insert(rest.split('=').next().unwrap().to_string());
            }
        }
        help
    }

    /// Flags given in `args` (after the subcommand), with their values; panics on a flag the
    /// binary does not accept or a missing value.
    fn parse(&self, what: &str, args: &[String]) -> BTreeMap<String, Vec<String>> {
        let mut given: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let flag = arg.strip_prefix("--").unwrap_or_else(|| panic!("{what}: stray argument {arg:?}"));
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            let takes_value = *self
                .flags
                .get(name)
                .unwrap_or_else(|| panic!("{what}: --{name} is not a flag of:\n{}", self.text));
            let value = match (takes_value, inline) {
                (true, Some(v)) => v,
                (true, None) => it.next().unwrap_or_else(|| panic!("{what}: --{name} needs a value")).clone(),
                (false, None) => String::new(),
                (false, Some(_)) => panic!("{what}: --{name} takes no value"),
            };
            given.entry(name.to_string()).or_default().push(value);
        }
        given
    }

    /// Checks that every `LLMCHAIN_*` variable is one the binary reads: an `[env: …]` of this
    /// help or one its top-level help documents (`top`, e.g. LLMCHAIN_LOG_FORMAT).
    fn check_env(&self, what: &str, top: &Help, names: &[String]) {
        for name in names.iter().filter(|n| n.starts_with("LLMCHAIN_")) {
            assert!(
                self.env.contains(name) || top.text.contains(name.as_str()),
                "{what}: {name} is read by nothing (known: {:?})",
                self.env
            );
        }
    }

    /// Checks that every key of a TOML config file is a long flag (underscores for dashes);
    /// repeatable flags (`--label`) are plural lists in the file (`labels`).
    fn check_file_keys(&self, what: &str, keys: &[String]) {
        for key in keys {
            let flag = key.replace('_', "-");
            let singular = flag.strip_suffix('s').unwrap_or(&flag);
            assert!(
                self.flags.contains_key(&flag) || self.flags.contains_key(singular),
                "{what}: config key {key:?} matches no flag of:\n{}",
                self.text
            );
        }
    }
}

/// Top-level keys of a flat TOML file and their raw values.
fn toml_keys(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            assert!(!l.starts_with('['), "config files are flat: {l}");
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not key = value: {l}"));
            (k.trim().to_string(), v.trim().trim_matches('"').to_string())
        })
        .collect()
}

fn env_names(c: &Value) -> Vec<String> {
    c["env"].as_array().into_iter().flatten().map(|e| e["name"].as_str().unwrap().to_string()).collect()
}

fn env_value(c: &Value, name: &str) -> Option<String> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str().map(str::to_string)
}

/// The volume mounted at or above `path` in container `c` of `workload`, as (mount, volume).
fn volume_at<'a>(workload: &'a Value, c: &'a Value, path: &str) -> Option<(&'a Value, &'a Value)> {
    let mount = c["volumeMounts"].as_array()?.iter().find(|m| {
        let at = m["mountPath"].as_str().unwrap();
        path == at || path.starts_with(&format!("{}/", at.trim_end_matches('/')))
    })?;
    let volume = pod_spec(workload)["volumes"].as_array()?.iter().find(|v| v["name"] == mount["name"])?;
    Some((mount, volume))
}

/// The text of the config file a container reads through `--config PATH` from a ConfigMap.
fn mounted_config(objects: &[Value], workload: &Value, c: &Value, path: &str) -> String {
    let (mount, volume) =
        volume_at(workload, c, path).unwrap_or_else(|| panic!("--config {path} is on no volume"));
    let map =
        volume["configMap"]["name"].as_str().unwrap_or_else(|| panic!("{path} is not from a ConfigMap"));
    let key = mount["subPath"].as_str().map(str::to_string).unwrap_or_else(|| {
        path.strip_prefix(mount["mountPath"].as_str().unwrap()).unwrap().trim_start_matches('/').to_string()
    });
    config_map(objects, map)["data"][&key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {map} has no key {key}"))
        .to_string()
}

/// Asserts that `path` is on a writable volume of the container (the root filesystem is
/// read-only).
fn assert_writable(what: &str, workload: &Value, c: &Value, path: &str) {
    let (mount, _) = volume_at(workload, c, path)
        .unwrap_or_else(|| panic!("{what}: {path} is on the read-only root filesystem"));
    assert_ne!(mount["readOnly"], true, "{what}: {path} is mounted read-only");
}

fn assert_from_secret(what: &str, workload: &Value, c: &Value, path: &str) {
    let (_, volume) =
        volume_at(workload, c, path).unwrap_or_else(|| panic!("{what}: {path} is on no volume"));
    assert!(volume["secret"]["secretName"].is_string(), "{what}: {path} does not come from a Secret");
}

// --- Tests ------------------------------------------------------------------------------------

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    let found: BTreeSet<String> = std::fs::read_dir(root().join("deploy/k8s/overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(found, OVERLAYS.iter().map(|s| s.to_string()).collect(), "overlays to check");
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for overlay in OVERLAYS {
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, render_yaml(overlay)).unwrap();
        files.push(file);
    }
    let validate = python().with_file_name("kubernetes-validate");
    let out = run_ok(Command::new(&validate).args(["--strict", "-k", KUBERNETES_VERSION]).args(&files));
    let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!report.contains("ERROR") && !report.contains("WARN"), "{report}");
    // And each object was looked at: kubernetes-validate skips kinds it has no schema for.
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let passed = report.lines().filter(|l| l.contains(&format!("/{overlay}.yaml passed"))).count();
        assert_eq!(passed, objects.len(), "{overlay}: not every object was validated:\n{report}");
    }
}

#[test]
fn every_workload_runs_non_root_read_only_without_capabilities() {
    for overlay in OVERLAYS {
        for w in render(overlay).iter().filter(|o| {
            matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet" | "DaemonSet" | "Job"))
        }) {
            let what = format!("{overlay}: {} {}", w["kind"], w["metadata"]["name"]);
            let pod = pod_spec(w);
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
            assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{what}");
            assert_eq!(pod["automountServiceAccountToken"], false, "{what}: no API token needed");
            let containers = pod["containers"].as_array().unwrap().iter().map(|c| (c, false));
            let inits = pod["initContainers"].as_array().into_iter().flatten().map(|c| (c, true));
            for (c, init) in containers.chain(inits) {
                let what = format!("{what} container {}", c["name"]);
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
                assert!(strs(&sc["capabilities"]["drop"]).contains(&"ALL".to_string()), "{what}");
                let added = strs(&sc["capabilities"]["add"]);
                if sc["runAsUser"] == 0 || !added.is_empty() {
                    // Only the agent's init container that hands its hostPath directories to the
                    // agent's user runs as root, with nothing but ownership rights.
                    assert!(init && c["name"] == "own-dirs", "{what} runs as root or adds capabilities");
                    assert!(added.iter().all(|a| a == "CHOWN" || a == "FOWNER"), "{what}: {added:?}");
                }
                assert!(c["resources"]["requests"]["memory"].is_string(), "{what}: memory request");
                assert!(c["resources"]["limits"]["memory"].is_string(), "{what}: memory limit");
            }
        }
    }
}

/// The coordinator as an overlay deploys it, checked against `coordinator serve --help` and
/// the real config loader.
fn check_coordinator(overlay: &str) -> BTreeMap<String, String> {
    let objects = render(overlay);
    let deployment = find(&objects, "Deployment", "llmchain-coordinator");
    let c = container(deployment, "coordinator");
    let serve = Help::of("coordinator", &["serve"]);
    let top = Help::of("coordinator", &[]);
    let what = format!("{overlay}: coordinator");

    let args = strs(&c["args"]);
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{what}: {args:?}");
    let flags = serve.parse(&what, &args[1..]);
    serve.check_env(&what, &top, &env_names(c));

    // The file: keys are flags, and the coordinator's own loader accepts it (unknown keys and
    // bad types are refused, values validated).
    let config_path = &flags.get("config").unwrap_or_else(|| panic!("{what}: no --config"))[0];
    let text = mounted_config(&objects, deployment, c, config_path);
    let file = toml_keys(&text);
    serve.check_file_keys(&what, &file.keys().cloned().collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(&path, &text).unwrap();
    llmchain_coordinator::config::ServeArgs::default()
        .resolve(Some(&path))
        .unwrap_or_else(|e| panic!("{what}: the config file is refused: {e:#}"));

    // Effective settings: flags > LLMCHAIN_* > file.
    let setting = |flag: &str, env: &str| -> Option<String> {
        flags
            .get(flag)
            .map(|v| v.join(","))
            .or_else(|| env_value(c, env))
            .or_else(|| file.get(&flag.replace('-', "_")).cloned())
    };
    let listen = setting("listen", "LLMCHAIN_LISTEN").unwrap_or_else(|| panic!("{what}: no listen address"));
    let (host, port) = listen.rsplit_once(':').unwrap();
    assert!(host == "0.0.0.0" || host == "[::]", "{what}: listens on {host}: unreachable from the kubelet");
    let port: u64 = port.parse().unwrap();
    let ports = c["ports"].as_array().unwrap();
    let named =
        |name: &str| ports.iter().find(|p| p["name"] == name).map(|p| p["containerPort"].as_u64().unwrap());
    assert_eq!(named("grpc"), Some(port), "{what}: the grpc port is the listen port");
    assert_eq!(named("http"), Some(8080), "{what}: metrics/dashboard port");
    // The kubelet's gRPC probes cannot speak TLS: probes use /healthz on the HTTP port.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{what}: {probe} is /healthz");
        assert_eq!(c[probe]["httpGet"]["port"], "http", "{what}: {probe} is on the http port");
    }
    // Production is mutual TLS with one CA for every replica, from a Secret; only the dev
    // overlay may run --insecure.
    let insecure = flags.contains_key("insecure") || env_value(c, "LLMCHAIN_INSECURE").is_some();
    assert!(!insecure || overlay == "dev", "{what}: --insecure outside the dev overlay");
    if !insecure {
        let tls_dir = setting("tls-dir", "LLMCHAIN_TLS_DIR").unwrap_or_else(|| panic!("{what}: no tls_dir"));
        for file in ["ca.pem", "ca.key", "server.pem", "server.key"] {
            assert_from_secret(&what, deployment, c, &format!("{}/{file}", tls_dir.trim_matches('"')));
        }
    }
    let service = find(&objects, "Service", "llmchain-coordinator");
    let service_ports: BTreeMap<String, (u64, String)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let target =
                p["targetPort"].as_str().map(str::to_string).unwrap_or_else(|| p["targetPort"].to_string());
            (p["name"].as_str().unwrap().to_string(), (p["port"].as_u64().unwrap(), target))
        })
        .collect();
    assert_eq!(service_ports.get("grpc"), Some(&(7400, "grpc".to_string())), "{what}: Service");
    assert_eq!(service_ports.get("http"), Some(&(8080, "http".to_string())), "{what}: Service");

    // State and blobs: explicit, and on volumes (the root filesystem is read-only).
    let store = setting("store", "LLMCHAIN_STORE").unwrap_or_else(|| panic!("{what}: no --store"));
    if let Some(path) = store.strip_prefix("embedded:") {
        assert!(path.starts_with('/'), "{what}: {store}");
        assert_writable(&what, deployment, c, path);
        assert_eq!(deployment["spec"]["replicas"], 1, "{what}: the embedded store allows one process");
    } else {
        assert!(store.starts_with("etcd:http"), "{what}: store {store}");
    }
    let blobs = setting("blobs", "LLMCHAIN_BLOBS").unwrap_or_else(|| panic!("{what}: no blobs"));
    if blobs.starts_with("s3://") {
        let env = env_names(c);
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            assert!(env.contains(&key.to_string()), "{what}: S3 blobs without {key}");
        }
    } else {
        assert_writable(&what, deployment, c, &blobs);
    }
    let keys =
        setting("trainer-key", "LLMCHAIN_TRAINER_KEYS").unwrap_or_else(|| panic!("{what}: no trainer key"));
    for key in keys.trim_matches(['[', ']']).split(',') {
        assert_from_secret(&what, deployment, c, key.trim().trim_matches('"'));
    }
    let mut effective = BTreeMap::new();
    effective.insert("store".to_string(), store);
    effective.insert("blobs".to_string(), blobs);
    effective.insert("replicas".to_string(), deployment["spec"]["replicas"].to_string());
    effective
}

#[test]
fn prod_overlay_passes_the_coordinator_only_what_serve_accepts() {
    let prod = check_coordinator("prod");
    assert!(prod["store"].starts_with("etcd:http"), "{prod:?}");
    assert!(prod["blobs"].starts_with("s3://"), "{prod:?}");
    assert_eq!(prod["replicas"], "3");
}

#[test]
fn dev_and_with_etcd_overlays_pass_the_coordinator_only_what_serve_accepts() {
    let dev = check_coordinator("dev");
    assert!(dev["store"].starts_with("embedded:/"), "{dev:?}");
    let with_etcd = check_coordinator("with-etcd");
    let objects = render("with-etcd");
    let etcd = find(&objects, "StatefulSet", "llmchain-etcd");
    let members = etcd["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(members, 3);
    let headless = find(&objects, "Service", "llmchain-etcd");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    // The coordinator talks to every member, by its stable name.
    for i in 0..members {
        assert!(
            with_etcd["store"].contains(&format!("http://llmchain-etcd-{i}.llmchain-etcd:2379")),
            "{with_etcd:?}"
        );
    }
}

#[test]
fn trainer_job_runs_real_subcommands_with_their_flags_on_a_gpu() {
    let objects = render("trainer");
    let job = find(&objects, "Job", "llmchain-train");
    let pod = pod_spec(job);
    let all = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().into_iter().flatten());
    let top = Help::of("cloud-trainer", &[]);
    let mut subcommands = Vec::new();
    for c in all {
        assert!(c["image"].as_str().unwrap().contains("cloud-trainer"), "{}", c["image"]);
        let args = strs(&c["args"]);
        let sub = args[0].as_str();
        let what = format!("trainer container {} (`cloud-trainer {sub}`)", c["name"]);
        let help = Help::of("cloud-trainer", &[sub]);
        let flags = help.parse(&what, &args[1..]);
        help.check_env(&what, &top, &env_names(c));
        if let Some(key) = flags.get("key") {
            assert_from_secret(&what, job, c, &key[0]);
        }
        for flag in ["out", "blob-cache"] {
            if let Some(path) = flags.get(flag) {
                assert_writable(&what, job, c, &path[0]);
            }
        }
        subcommands.push((c["name"].as_str().unwrap().to_string(), sub.to_string(), c.clone()));
    }
    let train = subcommands.iter().find(|(_, sub, _)| sub == "train").expect("a train container");
    assert_eq!(train.2["resources"]["limits"]["nvidia.com/gpu"], 1, "the trainer asks for one GPU");
    assert_eq!(pod["restartPolicy"], "Never");
}

#[test]
fn edge_agent_daemonset_and_systemd_settings_match_run_flags() {
    let run = Help::of("edge-agent", &["run"]);
    let top = Help::of("edge-agent", &[]);

    let objects = render("edge-agents");
    let ds = find(&objects, "DaemonSet", "llmchain-edge-agent");
    let c = container(ds, "agent");
    let what = "edge-agents: agent";
    let args = strs(&c["args"]);
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    let flags = run.parse(what, &args[1..]);
    run.check_env(what, &top, &env_names(c));
    let text = mounted_config(&objects, ds, c, &flags["config"][0]);
    let file = toml_keys(&text);
    run.check_file_keys(what, &file.keys().cloned().collect::<Vec<_>>());
    assert!(pod_spec(ds)["nodeSelector"].as_object().is_some_and(|m| !m.is_empty()), "{what}: node selector");
    for key in ["cache_dir", "state_dir"] {
        let path = &file[key];
        assert_writable(what, ds, c, path);
        let (_, volume) = volume_at(ds, c, path).unwrap();
        assert!(volume["hostPath"]["path"].is_string(), "{what}: {key} survives the pod on a hostPath");
    }
    for key in file["trainer_key"].trim_matches(['[', ']']).split(',') {
        assert_from_secret(what, ds, c, key.trim().trim_matches('"'));
    }

    // The agent's own loader accepts the file with the DaemonSet's environment on top (the
    // node's name and address substituted), once the key paths name a real key.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("trainer.pub");
    llmchain_artifact::SigningKey::generate().unwrap().public().save(&key).unwrap();
    let node = |v: String| v.replace("$(NODE_NAME)", "edge-node-1").replace("$(NODE_IP)", "10.0.0.7");
    let daemonset_args = llmchain_edge_agent::config::RunArgs {
        agent_id: env_value(c, "LLMCHAIN_AGENT_ID").map(node),
        sources: env_value(c, "LLMCHAIN_SOURCES").map(|v| vec![node(v)]),
        executors: env_value(c, "LLMCHAIN_EXECUTORS").map(|v| vec![node(v)]),
        ..Default::default()
    };
    resolve_agent_config(what, &text, &key, &daemonset_args);

    // The systemd unit's command line and the example files of the tarball.
    let unit = std::fs::read_to_string(root().join("deploy/systemd/llmchain-edge-agent.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let words: Vec<String> = exec.split_whitespace().map(str::to_string).collect();
    assert!(words[0].ends_with("/bin/edge-agent") && words[1] == "run", "{exec}");
    let flags = run.parse("systemd unit", &words[2..]);
    assert_eq!(flags["config"], ["/etc/llmchain/agent.toml"]);
    let example = std::fs::read_to_string(root().join("deploy/systemd/agent.toml")).unwrap();
    run.check_file_keys(
        "deploy/systemd/agent.toml",
        &toml_keys(&example).keys().cloned().collect::<Vec<_>>(),
    );
    resolve_agent_config("deploy/systemd/agent.toml", &example, &key, &Default::default());
    let env_file = std::fs::read_to_string(root().join("deploy/systemd/agent.env")).unwrap();
    let env: Vec<String> = env_file
        .lines()
        .map(|l| l.trim_start_matches(['#', ' ']))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
        .filter(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    run.check_env("deploy/systemd/agent.env", &top, &env);
}

/// Loads an agent config file through `edge-agent`'s own resolver (unknown keys, bad types and
/// invalid values are refused), its trainer key paths pointed at `key`.
fn resolve_agent_config(what: &str, text: &str, key: &Path, over: &llmchain_edge_agent::config::RunArgs) {
    let text = text.replace("/etc/llmchain/trainer-keys/trainer.pub", &key.display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    // Without --insecure `run` needs the identity `edge-agent enroll` leaves in the state
    // directory: stand one in (its contents are only read when connecting).
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("ca.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    std::fs::write(state.join("identity.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    llmchain_runtime::tls::write_file(&state.join("identity.key"), b"-----BEGIN PRIVATE KEY-----\n", 0o600)
        .unwrap();
    let over = llmchain_edge_agent::config::RunArgs { state_dir: Some(state), ..over.clone() };
    over.resolve(Some(&path)).unwrap_or_else(|e| panic!("{what}: the agent refuses its config: {e:#}"));
}

/// `systemd-analyze verify` of a unit; its warnings (unknown keys, bad values) fail too.
fn verify_unit(unit: &Path) {
    let out = run_ok(Command::new("systemd-analyze").arg("verify").arg(unit));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = unit.file_name().unwrap().to_string_lossy();
    assert!(!stderr.contains(name.as_ref()), "systemd-analyze verify {}:\n{stderr}", unit.display());
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/llmchain-edge-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/llmchain/bin/edge-agent "), "install.sh rewrites this prefix");
    // verify wants the ExecStart binary to exist: point it at the built one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llmchain-edge-agent.service");
    let agent = bin("edge-agent");
    std::fs::write(&path, unit.replace("/opt/llmchain/bin/edge-agent", &agent.display().to_string()))
        .unwrap();
    verify_unit(&path);
    for required in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "DynamicUser=yes",
        "CapabilityBoundingSet=\n",
        "StateDirectory=",
        "CacheDirectory=",
        "EnvironmentFile=",
        "Restart=",
        "--config /etc/llmchain/agent.toml",
    ] {
        assert!(unit.contains(required), "the unit lacks {required:?}");
    }
}

#[test]
fn release_tarball_runs_from_an_empty_directory_without_environment_and_installs_idempotently() {
    let work = tempfile::tempdir().unwrap();
    let dist = work.path().join("dist");
    let agent = bin("edge-agent");
    // The packaging of `make release`, on the debug binary and with fast compression.
    let out = stdout(
        Command::new("bash")
            .arg(root().join("scripts/release.sh"))
            .args(["--profile", "debug", "--gzip-level", "1", "--binary"])
            .arg(&agent)
            .arg("--out")
            .arg(&dist),
    );
    let tarball = PathBuf::from(out.trim().lines().last().unwrap());
    let name = tarball.file_name().unwrap().to_string_lossy().to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(name, format!("llmchain-edge-agent-{version}-linux-{}.tar.gz", std::env::consts::ARCH));
    run_ok(Command::new("sha256sum").arg("-c").arg(format!("{name}.sha256")).current_dir(&dist));

    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run_ok(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&unpacked));
    let top = unpacked.join(name.trim_end_matches(".tar.gz"));
    run_ok(Command::new("sha256sum").args(["--strict", "-c", "SHA256SUMS"]).current_dir(&top));
    for file in [
        "bin/edge-agent",
        "systemd/llmchain-edge-agent.service",
        "install.sh",
        "etc/agent.toml",
        "SHA256SUMS",
    ] {
        assert!(top.join(file).is_file(), "the tarball lacks {file}");
    }

    // No environment at all: the binary finds its libraries through $ORIGIN/../lib.
    let help = stdout(Command::new(top.join("bin/edge-agent")).arg("--help").env_clear());
    assert!(help.contains("Usage: edge-agent"), "{help}");
    let ldd = stdout(Command::new("ldd").arg(top.join("bin/edge-agent")).env_clear());
    let bundled: BTreeSet<String> = std::fs::read_dir(top.join("lib"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut from_bundle = BTreeSet::new();
    for line in ldd.lines() {
        assert!(!line.contains("not found"), "{line}\n{ldd}");
        let Some((soname, path)) = line.trim().split_once(" => ") else { continue };
        let path = PathBuf::from(path.split_whitespace().next().unwrap());
        let real = std::fs::canonicalize(&path).unwrap();
        if real.starts_with(std::fs::canonicalize(&top).unwrap()) {
            from_bundle.insert(soname.to_string());
        } else {
            assert!(
                ["/lib", "/usr/lib", "/lib64", "/usr/lib64"].iter().any(|d| real.starts_with(d)),
                "{soname} resolves outside the bundle and the system: {}",
                real.display()
            );
        }
    }
    assert_eq!(from_bundle, bundled, "lib/ holds exactly the libraries the binary loads from it");
    assert!(bundled.contains("libtorch_cpu.so") && bundled.contains("libc10.so"), "{bundled:?}");
    let readelf = stdout(Command::new("readelf").arg("-d").arg(top.join("bin/edge-agent")));
    assert!(readelf.contains("[$ORIGIN/../lib]"), "{readelf}");

    // install.sh: into a prefix, then again with nothing to do; the installed unit verifies.
    let root_dir = work.path().join("root");
    let install = |extra: &[&str]| {
        stdout(
            Command::new("bash")
                .arg(top.join("install.sh"))
                .arg("--prefix")
                .arg(root_dir.join("opt/llmchain"))
                .arg("--config-dir")
                .arg(root_dir.join("etc/llmchain"))
                .arg("--unit-dir")
                .arg(root_dir.join("etc/systemd/system"))
                .arg("--no-systemctl")
                .args(extra),
        )
    };
    let dry = install(&["--dry-run"]);
    assert!(dry.contains("would install") && !root_dir.exists(), "{dry}");
    let first = install(&[]);
    assert!(first.contains("installed"), "{first}");
    let second = install(&[]);
    assert!(second.contains("up to date") && !second.contains("installed"), "{second}");
    let installed = root_dir.join("opt/llmchain/bin/edge-agent");
    let version_out = stdout(Command::new(&installed).arg("--version").env_clear());
    assert!(version_out.contains(version), "{version_out}");
    let unit = root_dir.join("etc/systemd/system/llmchain-edge-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains(&format!(
            "ExecStart={} run --config {}",
            installed.display(),
            root_dir.join("etc/llmchain/agent.toml").display()
        )),
        "{text}"
    );
    verify_unit(&unit);
}

#[test]
fn scripts_are_syntax_and_shellcheck_clean() {
    let scripts = [root().join("scripts/release.sh"), root().join("deploy/systemd/install.sh")];
    for script in &scripts {
        run_ok(Command::new("bash").arg("-n").arg(script));
    }
    match Command::new("shellcheck").arg("--version").output() {
        Ok(_) => {
            run_ok(Command::new("shellcheck").args(&scripts));
        }
        Err(_) => eprintln!("shellcheck is not installed; only `bash -n` ran"),
    }
}

#[test]
fn container_files_build_what_the_manifests_run() {
    let docker = root().join("deploy/docker");
    for (image, binary) in
        [("coordinator", "coordinator"), ("edge-agent", "edge-agent"), ("cloud-trainer", "cloud-trainer")]
    {
        let file = docker.join(format!("{image}.Dockerfile"));
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "{image}: multi-stage");
        assert!(text.contains(&format!("/bin/{binary}\"]")), "{image}: ENTRYPOINT runs {binary}");
        assert!(text.contains("USER 65532:65532"), "{image}: the manifests run as 65532");
        assert!(docker.join(format!("{image}.Dockerfile.dockerignore")).is_file(), "{image}: dockerignore");
        assert!(text.contains("--locked"), "{image}: builds from Cargo.lock");
    }
    let coordinator = std::fs::read_to_string(docker.join("coordinator.Dockerfile")).unwrap();
    assert!(!coordinator.contains("requirements/runtime.txt"), "the coordinator image carries no libtorch");
    let agent = std::fs::read_to_string(docker.join("edge-agent.Dockerfile")).unwrap();
    assert!(agent.contains("scripts/release.sh"), "the agent image is the release bundle");
    // The coordinator binary indeed links no libtorch (so a distroless base works).
    // Only the library names are read: a load address such as 0x...2d1c1000 holds "c10" too.
    let ldd = stdout(Command::new("ldd").arg(bin("coordinator")));
    let libraries: Vec<&str> = ldd.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(libraries.iter().all(|l| !l.contains("torch") && !l.starts_with("libc10")), "{ldd}");
    // Every image the manifests use has a container file.
    for overlay in OVERLAYS {
        for o in render(overlay) {
            let spec = &o["spec"]["template"]["spec"];
            for c in
                spec["containers"].as_array().into_iter().chain(spec["initContainers"].as_array()).flatten()
            {
                let image = c["image"].as_str().unwrap();
                if let Some(rest) = image.split("/llmchain/").nth(1) {
                    let name = rest.split(':').next().unwrap();
                    assert!(
                        docker.join(format!("{name}.Dockerfile")).is_file(),
                        "{overlay}: no container file for {image}"
                    );
                }
            }
        }
    }
}
