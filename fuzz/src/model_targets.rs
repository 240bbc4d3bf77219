//! Fuzz functions for the parsers in the model crate (they link libtorch).

use std::{io::Write, sync::OnceLock};

use llmchain_model::{Llama, gguf::Gguf, tokenizer::Tokenizer};

/// Largest tensor dequantised per input, so a header that declares huge tensors over few
/// bytes cannot make the harness allocate gigabytes (the parser must refuse those anyway).
const MAX_DEQUANT_ELEMENTS: u64 = 1 << 16;

/// GGUF: header and metadata parsing, tensor byte ranges, dequantisation, the tokenizer.
pub fn gguf(data: &[u8]) {
    let Ok(g) = Gguf::from_bytes(data.to_vec()) else { return };
    for info in g.tensors() {
        let bytes = g.tensor_bytes(info);
        assert!(bytes.len() as u64 <= data.len() as u64);
        if info.n_elements() <= MAX_DEQUANT_ELEMENTS
            && let Ok((values, shape)) = g.dequantize(&info.name)
        {
            assert_eq!(values.len(), shape.iter().product::<usize>());
        }
    }
    let _ = g.architecture();
    let _ = Tokenizer::from_gguf(&g);
}

/// A tiny Hugging Face config, so a fuzzed `model.safetensors` is checked against it.
pub const CONFIG: &str = r#"{"model_type":"llama","hidden_act":"silu","vocab_size":16,"hidden_size":8,
"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
"max_position_embeddings":32,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#;

fn model_dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("config.json"), CONFIG).expect("config.json");
        dir
    })
}

/// safetensors: a model directory whose weights file holds the bytes, loaded as the trainer
/// loads `--from-dir` models (header, dtypes, shapes, offsets, tied head).
pub fn safetensors(data: &[u8]) {
    let dir = model_dir().path();
    // Replace by rename, as the loader's mmap expects files never to change in place.
    let tmp = dir.join("model.safetensors.tmp");
    let mut f = std::fs::File::create(&tmp).expect("weights file");
    f.write_all(data).expect("write weights");
    drop(f);
    std::fs::rename(&tmp, dir.join("model.safetensors")).expect("rename weights");
    let _ = Llama::load_safetensors(dir, tch::Device::Cpu);
}
