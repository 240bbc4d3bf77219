//! Shared helpers for the tests that run the real SmolLM2 GGUF against Hugging Face fixtures.
//!
//! The fixtures are written by `scripts/reference/logits.py` (`make fixtures`) into the
//! git-ignored `.llmchain/fixtures`; the GGUF is linked by `scripts/setup.sh`. The model is
//! loaded once per test binary and shared behind a mutex (libtorch tensors are not `Sync`).

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use llmchain_model::Llama;
use llmchain_model::gguf::Gguf;
use llmchain_model::tokenizer::Tokenizer;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Where `make fixtures` writes the reference outputs.
pub fn fixtures_dir() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.llmchain/fixtures"));
    assert!(dir.join("manifest.json").is_file(), "no fixtures in {}: run `make fixtures`", dir.display());
    dir
}

/// The SmolLM2 GGUF: `LLMCHAIN_SMOLLM2_GGUF` (set by `.cargo/config.toml`) or the setup link.
pub fn gguf_path() -> PathBuf {
    let path = std::env::var_os("LLMCHAIN_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.llmchain/smollm2.gguf")));
    assert!(path.is_file(), "no model at {}: run `make setup`", path.display());
    path
}

/// The fixture manifest.
pub fn manifest() -> &'static Value {
    static MANIFEST: OnceLock<Value> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures_dir().join("manifest.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

/// The model and tokenizer of the real GGUF, loaded once per test binary.
pub fn model() -> MutexGuard<'static, (Llama, Tokenizer)> {
    static MODEL: OnceLock<Mutex<(Llama, Tokenizer)>> = OnceLock::new();
    let cell = MODEL.get_or_init(|| {
        tch::set_num_threads(2);
        let gguf = Gguf::open(&gguf_path()).unwrap();
        let tokenizer = Tokenizer::from_gguf(&gguf).unwrap();
        let model = Llama::from_gguf(&gguf, Device::cuda_if_available()).unwrap();
        Mutex::new((model, tokenizer))
    });
    // A test that panicked while holding the lock leaves the model intact (inference does not
    // mutate it), so a poisoned lock is still usable.
    cell.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads a raw little-endian f32 file as a tensor of `shape`.
pub fn read_f32(path: &Path, shape: &[i64]) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let numel: i64 = shape.iter().product();
    assert_eq!(bytes.len() as i64, numel * 4, "{} has the wrong size", path.display());
    Tensor::from_data_size(&bytes, shape, Kind::Float)
}

/// `value` (a JSON array of arrays of integers) as `Vec<Vec<T>>`.
pub fn int_rows<T: TryFrom<i64>>(value: &Value) -> Vec<Vec<T>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array().unwrap().iter().map(|x| T::try_from(x.as_i64().unwrap()).ok().unwrap()).collect()
        })
        .collect()
}

/// Largest absolute element-wise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_device(Device::Cpu) - b.to_device(Device::Cpu)).abs().max().double_value(&[])
}
