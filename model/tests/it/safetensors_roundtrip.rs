//! Safetensors export and import: the real model exported in f32 and bf16 loads back bit for
//! bit here and in Hugging Face transformers (a Python step), with logits equal to ours; and
//! broken model directories are clean errors.
//!
//! Needs `make setup` (model, libtorch, the Python venv with transformers).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{max_abs_diff, model, read_f32};
use llmchain_model::{Llama, LlamaConfig, SaveDtype, load_pretrained};
use tch::{Device, Kind, Tensor};

fn python() -> PathBuf {
    let python = std::env::var_os("LLMCHAIN_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.llmchain/venv/bin/python"))
    });
    assert!(python.exists(), "no python at {}: run `make setup`", python.display());
    python
}

/// Logits HF computes for each sequence, `[sum of lengths, vocab]`, by running the reference
/// script on `dir`.
fn hf_logits(dir: &Path, sequences: &[Vec<u32>], vocab: i64) -> Tensor {
    let ids = dir.join("ids.json");
    std::fs::write(&ids, serde_json::to_string(sequences).unwrap()).unwrap();
    let out = dir.join("hf_logits.f32");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/reference/logits.py");
    let status = Command::new(python())
        .arg(script)
        .arg("--model-dir")
        .arg(dir)
        .arg("--ids")
        .arg(&ids)
        .arg("--out")
        .arg(&out)
        .args(["--threads", "2"])
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .expect("run the reference script");
    assert!(status.success(), "reference script failed on {}", dir.display());
    let rows: i64 = sequences.iter().map(|s| s.len() as i64).sum();
    read_f32(&out, &[rows, vocab])
}

fn our_logits(model: &Llama, sequences: &[Vec<u32>]) -> Tensor {
    let parts: Vec<Tensor> = sequences
        .iter()
        .map(|s| {
            let ids: Vec<i64> = s.iter().map(|&i| i64::from(i)).collect();
            let ids = Tensor::from_slice(&ids).view([1, -1]).to_device(model.device());
            tch::no_grad(|| model.forward(&ids, None)).unwrap().get(0).to_device(Device::Cpu)
        })
        .collect();
    Tensor::cat(&parts, 0)
}

fn assert_same_tensors(a: &Llama, b: &Llama, round: impl Fn(&Tensor) -> Tensor) {
    let (a, b) = (a.named_tensors(), b.named_tensors());
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(round(ta).equal(tb), "{na} differs after the round trip");
    }
}

#[test]
fn export_loads_back_here_and_in_transformers_with_equal_logits() {
    let guard = model();
    let (model, tokenizer) = &*guard;
    let vocab = model.config().vocab_size as i64;
    let sequences = vec![
        tokenizer.encode("The capital of France is").unwrap(),
        tokenizer
            .encode("<|im_start|>user\nIs the pump vibrating?<|im_end|>\n<|im_start|>assistant\n")
            .unwrap(),
    ];
    let ours = our_logits(model, &sequences);

    // f32: lossless, so the reload is bit-identical and HF's logits equal ours.
    let dir = tempfile::tempdir().unwrap();
    model.save_safetensors(dir.path(), SaveDtype::F32, Some(tokenizer)).unwrap();
    let (reloaded, reloaded_tokenizer) = load_pretrained(dir.path(), model.device()).unwrap();
    assert_same_tensors(model, &reloaded, Tensor::shallow_clone);
    assert_eq!(reloaded.config(), model.config());
    let reloaded_tokenizer = reloaded_tokenizer.expect("tokenizer.json was saved");
    assert_eq!(
        reloaded_tokenizer.encode("Hello, world!").unwrap(),
        tokenizer.encode("Hello, world!").unwrap()
    );
    let hf = hf_logits(dir.path(), &sequences, vocab);
    let diff = max_abs_diff(&hf, &ours);
    eprintln!("f32 export: HF vs ours max |Δ| = {diff:.2e}");
    assert!(diff <= 1e-3, "f32 export: max |Δ| = {diff}");

    // bf16: the reload holds exactly the bf16-rounded weights, and HF computes the same function.
    let dir = tempfile::tempdir().unwrap();
    model.save_safetensors(dir.path(), SaveDtype::Bf16, None).unwrap();
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    assert!(config.contains("\"bfloat16\""));
    let size = std::fs::metadata(dir.path().join("model.safetensors")).unwrap().len();
    let params = model.config().num_parameters() as u64;
    assert!(size > 2 * params && size < 2 * params + (1 << 20), "bf16 file of {size} bytes");
    let bf16 = Llama::load(dir.path(), model.device()).unwrap();
    assert_same_tensors(model, &bf16, |t| t.to_kind(Kind::BFloat16).to_kind(Kind::Float));
    let ours_bf16 = our_logits(&bf16, &sequences);
    let hf = hf_logits(dir.path(), &sequences, vocab);
    let diff = max_abs_diff(&hf, &ours_bf16);
    eprintln!("bf16 export: HF vs ours max |Δ| = {diff:.2e}");
    assert!(diff <= 1e-3, "bf16 export: max |Δ| = {diff}");
    // Rounding the weights moves the logits, but not far.
    let drift = max_abs_diff(&ours_bf16, &ours);
    eprintln!("bf16 vs f32 weights: max |Δ| = {drift:.2e}");
    assert!(drift > 0.0 && drift < 2.0, "bf16 drift {drift}");
}

/// A tiny random model: enough to exercise the file handling in milliseconds.
fn tiny() -> Llama {
    let config = LlamaConfig {
        vocab_size: 32,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 4,
        max_position_embeddings: 16,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_id: Some(1),
        pad_token_id: None,
    };
    tch::manual_seed(3);
    Llama::from_fetch(config, Device::Cpu, |_, shape| Ok(Tensor::randn(shape, (Kind::Float, Device::Cpu))))
        .unwrap()
}

#[test]
fn untied_head_round_trips() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    model.save_safetensors(dir.path(), SaveDtype::F32, None).unwrap();
    let back = Llama::load(dir.path(), Device::Cpu).unwrap();
    assert_same_tensors(&model, &back, Tensor::shallow_clone);
    assert!(back.named_tensors().iter().any(|(n, _)| n == "lm_head.weight"));
    // Without tokenizer.json the directory still loads; the tokenizer is just absent.
    assert!(load_pretrained(dir.path(), Device::Cpu).unwrap().1.is_none());
}

#[test]
fn broken_model_directories_are_errors() {
    let model = tiny();
    let saved = tempfile::tempdir().unwrap();
    model.save_safetensors(saved.path(), SaveDtype::F32, None).unwrap();
    let weights = std::fs::read(saved.path().join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(saved.path().join("config.json")).unwrap();

    let case = |weights: &[u8], config: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), weights).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        Llama::load(dir.path(), Device::Cpu).map(|_| ()).unwrap_err().to_string()
    };
    // Truncated anywhere: in the length prefix, the header, or the data.
    for cut in [0, 4, 9, weights.len() / 2, weights.len() - 1] {
        let err = case(&weights[..cut], &config);
        assert!(err.contains("safetensors"), "cut at {cut}: {err}");
    }
    // A header length pointing far beyond the file.
    let mut huge = weights.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(case(&huge, &config).contains("safetensors"));
    // Garbage header bytes.
    let mut garbage = weights.clone();
    garbage[8..40].fill(b'#');
    assert!(case(&garbage, &config).contains("safetensors"));
    // A config that disagrees with the tensors.
    let wider = config.replace("\"intermediate_size\": 12", "\"intermediate_size\": 16");
    assert_ne!(wider, config);
    let err = case(&weights, &wider);
    assert!(err.contains("mlp.gate_proj") && err.contains("shape"), "{err}");
    // A config that says the head is tied, while the file carries an untied one: a tied model
    // takes the embeddings as its head, so this file's `lm_head.weight` would be ignored;
    // loading must not silently drop it.
    let tied = config.replace("\"tie_word_embeddings\": false", "\"tie_word_embeddings\": true");
    assert_ne!(tied, config);
    assert!(case(&weights, &tied).contains("lm_head"));
    // An unparsable config.
    assert!(case(&weights, "{").contains("config"));
    // A tensor the model does not have.
    let mut extra: Vec<(String, Tensor)> = model.named_tensors();
    extra.push(("model.layers.9.mlp.up_proj.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    let dir = tempfile::tempdir().unwrap();
    Tensor::write_safetensors(&extra, dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), &config).unwrap();
    let err = Llama::load(dir.path(), Device::Cpu).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("model.layers.9.mlp.up_proj.weight"), "{err}");
    // A missing directory.
    assert!(Llama::load(Path::new("/nonexistent/model"), Device::Cpu).is_err());
}
