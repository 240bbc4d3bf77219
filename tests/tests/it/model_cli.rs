//! `edge-agent model …` on the real SmolLM2, as an operator runs it on a node.

use std::process::Command;

use llmchain_tests::{bin, smollm2_gguf};

fn model_cmd(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("edge-agent"))
        .arg("model")
        .args(args)
        .arg("--model")
        .arg(smollm2_gguf())
        .arg("--threads")
        .arg("2")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn generate_answers_the_france_chat_and_score_prefers_the_true_label() {
    let answer =
        model_cmd(&["generate", "--user", "What is the capital of France?", "--max-tokens", "16", "--json"]);
    assert!(answer["text"].as_str().unwrap().contains("Paris"), "{answer}");

    let scores = model_cmd(&[
        "score",
        "--user",
        "Answer with one word. What is the capital of France?",
        "--label",
        "Paris",
        "--label",
        "Berlin",
    ]);
    assert_eq!(scores["best"], "Paris", "{scores}");

    let logits = model_cmd(&["logits", "--prompt", "The capital of France is", "--top-k", "3"]);
    assert_eq!(logits["top"].as_array().map(Vec::len), Some(3), "{logits}");
}
