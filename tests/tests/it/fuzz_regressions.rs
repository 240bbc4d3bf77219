//! The fuzz targets' inputs as regression tests on stable: every file under
//! `fuzz/regressions/<target>/` (crash reproducers, kept forever) and `fuzz/corpus/<target>/`
//! (the committed corpus) goes through the same harness functions `cargo fuzz` runs
//! (`fuzz/src/`, included here), which panic on a crash or a broken invariant.
//!
//! `write_seed_corpus` (ignored; run it by name) writes the seed inputs the corpus grew from:
//! manifests and statements signed with the harness's fixed keys, summaries, records.

#[path = "../../../model/tests/it/gguf_writer/mod.rs"]
mod gguf_writer;
#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;
#[path = "../../../fuzz/src/model_targets.rs"]
mod model_targets;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use llmchain_artifact::{
    RollbackStatement, TrustDocument,
    testing::{synthetic_version, tiny_llama},
};
use llmchain_proto::{model::ModelRef, pb};
use prost::Message;

/// A fuzz target's harness function: panics on a crash or a broken invariant.
type Target = fn(&[u8]);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Feeds every regression and corpus file of `target` to `run`; returns how many.
fn replay(target: &str, run: Target) -> usize {
    let mut n = 0;
    for kind in ["regressions", "corpus"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                let data = std::fs::read(&path).unwrap();
                let result = std::panic::catch_unwind(|| run(&data));
                assert!(result.is_ok(), "{} crashes the {target} target", path.display());
                n += 1;
            }
        }
    }
    n
}

#[test]
fn every_fuzz_input_is_handled_without_a_crash() {
    let targets: [(&str, Target); 6] = [
        ("manifest", harness::manifest),
        ("trust", harness::trust),
        ("records", harness::records),
        ("summaries", harness::summaries),
        ("gguf", model_targets::gguf),
        ("safetensors", model_targets::safetensors),
    ];
    for (target, run) in targets {
        let n = replay(target, run);
        assert!(n > 0, "no committed input for the {target} target under fuzz/");
        eprintln!("{target}: {n} inputs");
    }
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

#[test]
#[ignore = "writes the seed corpus under fuzz/corpus; run by name when the formats change"]
fn write_seed_corpus() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let key = harness::trainer_key();
    let (mut manifest, _) = synthetic_version("fuzz", 2, 1, &tiny_llama(1), |_| 0);
    manifest.expires_at = Some(now + Duration::from_secs(3600));
    write("manifest", "canonical", &manifest.canonical_bytes());
    let signed = key.sign(&manifest);
    let wire = pb::SignedManifest {
        manifest: signed.manifest,
        signature: signed.signature.to_vec(),
        key_id: signed.key_id,
    };
    write("manifest", "signed", &wire.encode_to_vec());

    let doc = TrustDocument {
        version: 2,
        trainer_keys: vec![key.public()],
        revoked_key_ids: ["ed25519:0123456789abcdef".to_string()].into(),
        issued_at: now,
    };
    write("trust", "document", &doc.canonical_bytes());
    write(
        "trust",
        "signed-document",
        &pb::SignedStatement::from(doc.sign(&harness::root_key())).encode_to_vec(),
    );
    let target = ModelRef { model: manifest.id.model.clone(), version: 1 };
    let rollback = RollbackStatement { target, expires_at: now };
    write("trust", "rollback", &rollback.canonical_bytes());
    write("trust", "signed-rollback", &pb::SignedStatement::from(rollback.sign(&key)).encode_to_vec());

    let record = br#"{"device_id":"pump-7","kind":"pump","ts":"2026-01-01T00:00:00Z","temp_c":[61.2,61.9,62.5,63.0,63.8,64.1],"vibration_mm_s":[2.1,2.3,2.2,2.4,2.2,2.3],"current_a":[10.1,10.3,10.2,10.4,10.2,10.3],"rated_current_a":12.0,"pressure_bar":[6.1,6.0,6.1,6.0,6.1,6.0],"note":"burning smell near the motor"}"#;
    write("records", "pump", record);
    write("records", "minimal", br#"{"device_id":"f-1","kind":"fan","ts":"t","temp_c":[1.0],"vibration_mm_s":[1.0],"current_a":[1.0],"rated_current_a":1.0}"#);

    let summary = pb::Summary {
        agent_id: "edge-1".into(),
        seq: 3,
        window_start: Some(now.into()),
        window_end: Some((now + Duration::from_secs(60)).into()),
        model: Some(pb::ModelRef { model: "fuzz".into(), version: 1 }),
        label_counts: vec![pb::LabelCount { label: "normal".into(), count: 9 }],
        confidence_histogram: vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 8],
        latency_p50_ms: 3.0,
        latency_p95_ms: 5.0,
        latency_p99_ms: 7.0,
        records: 10,
        raw_bytes: 4000,
        bad_records: 1,
        hard_examples: vec![pb::HardExample {
            text: "pump temp rising".into(),
            decision: "inspect".into(),
            scores: vec![pb::LabelScore { label: "inspect".into(), logprob: -0.5, probability: 0.6 }],
        }],
        spool_dropped: 0,
    };
    write("summaries", "summary", &summary.encode_to_vec());
    let report = pb::ReportSummariesRequest { agent_id: "edge-1".into(), summaries: vec![summary] };
    write("summaries", "report", &report.encode_to_vec());

    for version in [1, 2, 3] {
        write("gguf", &format!("sample-v{version}"), &gguf_writer::sample().version(version).build().bytes);
    }
    let config = llmchain_model::LlamaConfig::from_hf_json(model_targets::CONFIG).unwrap();
    let model = llmchain_model::Llama::from_fetch(config, tch::Device::Cpu, |_, shape| {
        Ok(tch::Tensor::ones(shape, (tch::Kind::Float, tch::Device::Cpu)) * 0.01)
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, dtype) in [("f32", llmchain_model::SaveDtype::F32), ("bf16", llmchain_model::SaveDtype::Bf16)]
    {
        model.save_safetensors(dir.path(), dtype, None).unwrap();
        write("safetensors", name, &std::fs::read(dir.path().join("model.safetensors")).unwrap());
    }
}
