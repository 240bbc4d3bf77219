//! Weights in and out: GGUF import, safetensors export and import with Hugging Face names.
//!
//! GGUF tensors are renamed to Hugging Face's Llama names and dequantised to f32. llama.cpp's
//! converter permutes the rows of `q_proj`/`k_proj` so that its rotary kernel can rotate
//! adjacent pairs; the model here (like `transformers`) rotates halves, so the permutation is
//! undone on import ([`unpermute_rotary`]). After that, a GGUF and the safetensors directory
//! exported from it describe the same function.
//!
//! A model directory is `config.json` + `model.safetensors` (+ `tokenizer.json` when a
//! tokenizer is saved with it), loadable by `transformers`' `AutoModelForCausalLM`. Safetensors
//! files are untrusted: the `safetensors` crate validates the header (offsets inside the file,
//! no overlap), and every tensor's name, dtype and shape is checked against the config before
//! it is used; unknown or missing tensors are errors, never silently ignored.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};
use tch::{Device, Kind, Tensor};
use tracing::{debug, info};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::llama::{Llama, tensor_specs};
use crate::tokenizer::Tokenizer;

/// File name of the weights in a model directory (what `transformers` looks for).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// File name of the architecture config in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the tokenizer in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Element type of saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    /// 32-bit floats: lossless.
    F32,
    /// bfloat16 (round to nearest even): half the size, what training checkpoints usually use.
    Bf16,
}

impl SaveDtype {
    fn kind(self) -> Kind {
        match self {
            SaveDtype::F32 => Kind::Float,
            SaveDtype::Bf16 => Kind::BFloat16,
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::Bf16 => Dtype::BF16,
        }
    }

    /// The name `transformers` uses in `config.json`.
    fn hf_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }
}

/// The Hugging Face name of a llama.cpp tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`), or `None` for a name Llama does not use.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The llama.cpp name of a Hugging Face Llama tensor name; inverse of [`gguf_to_hf_name`].
pub fn hf_to_gguf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.to_owned());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let gguf = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf}"))
}

/// Undoes llama.cpp's rotary row permutation of a `[n_head * head_dim, in]` q or k projection.
///
/// llama.cpp's `convert_hf_to_gguf.py` stores `w.reshape(n_head, 2, head_dim / 2, in)
/// .swapaxes(1, 2)`: within each head it interleaves the two halves that HF's `rotate_half`
/// pairs up. Swapping the axes back restores HF's row order.
pub fn unpermute_rotary(w: &Tensor, n_head: i64) -> Result<Tensor> {
    let size = w.size();
    let &[rows, cols] = size.as_slice() else {
        return Err(Error::weights("rotary projection", format!("expected 2 dimensions, got {size:?}")));
    };
    if n_head <= 0 || rows % (2 * n_head) != 0 {
        return Err(Error::weights(
            "rotary projection",
            format!("{rows} rows do not split into {n_head} heads"),
        ));
    }
    Ok(w.reshape([n_head, rows / n_head / 2, 2, cols]).transpose(1, 2).reshape([rows, cols]))
}

/// The permutation llama.cpp applies (HF order → GGUF order); inverse of [`unpermute_rotary`].
pub fn permute_rotary(w: &Tensor, n_head: i64) -> Result<Tensor> {
    let size = w.size();
    let &[rows, cols] = size.as_slice() else {
        return Err(Error::weights("rotary projection", format!("expected 2 dimensions, got {size:?}")));
    };
    if n_head <= 0 || rows % (2 * n_head) != 0 {
        return Err(Error::weights(
            "rotary projection",
            format!("{rows} rows do not split into {n_head} heads"),
        ));
    }
    Ok(w.reshape([n_head, 2, rows / n_head / 2, cols]).transpose(1, 2).reshape([rows, cols]))
}

impl Llama {
    /// Loads a model from a GGUF file or a safetensors model directory, on `device`.
    pub fn load(path: &Path, device: Device) -> Result<Llama> {
        if path.is_dir() { Llama::load_safetensors(path, device) } else { Llama::load_gguf(path, device) }
    }

    /// Opens a GGUF file and loads its weights dequantised to f32.
    pub fn load_gguf(path: &Path, device: Device) -> Result<Llama> {
        let gguf = Gguf::open(path)?;
        let model = Llama::from_gguf(&gguf, device)?;
        info!(path = %path.display(), ?device, "loaded gguf model");
        Ok(model)
    }

    /// Builds the model from a parsed GGUF: config from its metadata, weights dequantised.
    pub fn from_gguf(gguf: &Gguf, device: Device) -> Result<Llama> {
        let config = LlamaConfig::from_gguf(gguf)?;
        let expected: HashSet<String> = tensor_specs(&config).into_iter().map(|(n, _)| n).collect();
        for info in gguf.tensors() {
            match gguf_to_hf_name(&info.name) {
                Some(hf) if expected.contains(&hf) => {}
                // `rope_freqs` carries rope scaling factors, which this model does not apply.
                _ => return Err(Error::weights(&info.name, "unexpected tensor for this llama config")),
            }
        }
        let (n_head, n_kv) = (config.num_attention_heads as i64, config.num_key_value_heads as i64);
        Llama::from_fetch(config, device, |hf_name, shape| {
            let name = hf_to_gguf_name(hf_name).ok_or_else(|| Error::weights(hf_name, "no gguf name"))?;
            let (values, gguf_shape) = gguf.dequantize(&name)?;
            let gguf_shape: Vec<i64> = gguf_shape.iter().map(|&d| d as i64).collect();
            if gguf_shape != shape {
                return Err(Error::weights(&name, format!("shape {gguf_shape:?}, expected {shape:?}")));
            }
            let t = Tensor::from_slice(&values).view(shape);
            drop(values);
            if hf_name.ends_with("self_attn.q_proj.weight") {
                unpermute_rotary(&t, n_head)
            } else if hf_name.ends_with("self_attn.k_proj.weight") {
                unpermute_rotary(&t, n_kv)
            } else {
                Ok(t)
            }
        })
    }

    /// Writes `config.json` and `model.safetensors` (Hugging Face names and layout) into `dir`,
    /// creating it if needed; with `tokenizer`, also its `tokenizer.json`.
    pub fn save_safetensors(
        &self,
        dir: &Path,
        dtype: SaveDtype,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_owned(), source })?;
        let views: Vec<(String, LazyBytes)> = self
            .named_tensors()
            .into_iter()
            .map(|(name, tensor)| {
                let shape = tensor.size().iter().map(|&d| d as usize).collect();
                (name, LazyBytes { tensor, kind: dtype.kind(), dtype: dtype.safetensors(), shape })
            })
            .collect();
        // transformers refuses safetensors files whose metadata does not say `format: pt`.
        let metadata = Some(HashMap::from([("format".to_owned(), "pt".to_owned())]));
        let weights = dir.join(WEIGHTS_FILE);
        safetensors::serialize_to_file(views, &metadata, &weights)
            .map_err(|e| Error::safetensors(&weights, e.to_string()))?;
        write_file(&dir.join(CONFIG_FILE), self.config().to_hf_json(dtype.hf_name()).as_bytes())?;
        if let Some(tokenizer) = tokenizer {
            write_file(&dir.join(TOKENIZER_FILE), tokenizer.to_json()?.as_bytes())?;
        }
        info!(dir = %dir.display(), ?dtype, "saved safetensors model");
        Ok(())
    }

    /// Loads a model directory written by [`Llama::save_safetensors`] or by `transformers`
    /// (`config.json` + `model.safetensors`, f32, bf16 or f16).
    pub fn load_safetensors(dir: &Path, device: Device) -> Result<Llama> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| Error::Io { path: config_path, source })?;
        let config = LlamaConfig::from_hf_json(&text)?;
        let path = dir.join(WEIGHTS_FILE);
        let file = File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        // SAFETY: read-only private map. Model files are replaced by writing a new file and
        // renaming it, never rewritten in place, so the mapping does not change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| Error::Io { path: path.clone(), source })?;
        let st = SafeTensors::deserialize(&map).map_err(|e| Error::safetensors(&path, format!("{e:?}")))?;

        let tied = config.tie_word_embeddings;
        let specs = tensor_specs(&config);
        let expected: HashSet<&str> = specs.iter().map(|(n, _)| n.as_str()).collect();
        for name in st.names() {
            // transformers writes the tied head too in some versions; it must equal the embeddings.
            let tied_head = config.tie_word_embeddings && name == "lm_head.weight";
            if !expected.contains(name.as_str()) && !tied_head {
                return Err(Error::weights(name, "unexpected tensor for this llama config"));
            }
        }
        let model = Llama::from_fetch(config, device, |name, shape| {
            let view = st.tensor(name).map_err(|_| Error::weights(name, "missing from model.safetensors"))?;
            let t = view_to_f32(name, &view)?;
            if t.size() != shape {
                return Err(Error::weights(name, format!("shape {:?}, expected {shape:?}", t.size())));
            }
            Ok(t)
        })?;
        if let Some(head) = if tied { st.tensor("lm_head.weight").ok() } else { None } {
            // A tied config with a stored head (some transformers versions write it): it must be
            // the embeddings, or the model we built would silently compute something else.
            let head = view_to_f32("lm_head.weight", &head)?;
            let embed = model.named_tensors().into_iter().find(|(n, _)| n == "model.embed_tokens.weight");
            let same =
                embed.is_some_and(|(_, e)| e.size() == head.size() && e.to_device(Device::Cpu).equal(&head));
            if !same {
                return Err(Error::weights("lm_head.weight", "differs from the embeddings of a tied config"));
            }
        }
        debug!(dir = %dir.display(), tensors = st.len(), "loaded safetensors model");
        Ok(model)
    }
}

/// Loads a model and, when it carries one, its tokenizer: from a GGUF file (tokenizer from the
/// metadata) or a model directory (`tokenizer.json`, if present).
pub fn load_pretrained(path: &Path, device: Device) -> Result<(Llama, Option<Tokenizer>)> {
    if path.is_dir() {
        let model = Llama::load_safetensors(path, device)?;
        let tok_path = path.join(TOKENIZER_FILE);
        let tokenizer = match std::fs::read_to_string(&tok_path) {
            Ok(json) => Some(Tokenizer::from_json(&json)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(Error::Io { path: tok_path, source }),
        };
        Ok((model, tokenizer))
    } else {
        let gguf = Gguf::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let model = Llama::from_gguf(&gguf, device)?;
        info!(path = %path.display(), ?device, "loaded gguf model and tokenizer");
        Ok((model, Some(tokenizer)))
    }
}

/// Copies a safetensors tensor out of the file as an f32 CPU tensor (the model must outlive
/// the map, so no borrowing).
fn view_to_f32(name: &str, view: &TensorView<'_>) -> Result<Tensor> {
    let dims: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let kind = match view.dtype() {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        other => return Err(Error::weights(name, format!("dtype {other:?} is not a float type"))),
    };
    Ok(Tensor::f_from_data_size(view.data(), &dims, kind)?.to_kind(Kind::Float))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Write { path: path.to_owned(), source })
}

/// Row-major little-endian bytes of `tensor` converted to `dtype` (the safetensors layout,
/// and the layout of a tensor blob in a model version).
pub fn tensor_bytes(tensor: &Tensor, dtype: SaveDtype) -> Vec<u8> {
    kind_bytes(tensor, dtype.kind())
}

fn kind_bytes(tensor: &Tensor, kind: Kind) -> Vec<u8> {
    let t = tch::no_grad(|| tensor.to_device(Device::Cpu).to_kind(kind).contiguous());
    let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    // Little-endian, as is every platform libtorch supports.
    t.copy_data_u8(&mut bytes, t.numel());
    bytes
}

/// A tensor that turns into bytes only when the serialiser asks, so saving needs memory for
/// one converted tensor at a time rather than a second copy of the model.
struct LazyBytes {
    tensor: Tensor,
    kind: Kind,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl View for LazyBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(kind_bytes(&self.tensor, self.kind))
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for layer in [0usize, 7, 29] {
            for part in [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ] {
                let gguf = format!("blk.{layer}.{part}.weight");
                let hf = gguf_to_hf_name(&gguf).unwrap();
                assert!(hf.starts_with(&format!("model.layers.{layer}.")));
                assert_eq!(hf_to_gguf_name(&hf).unwrap(), gguf);
            }
        }
        assert_eq!(gguf_to_hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert_eq!(gguf_to_hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(gguf_to_hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_to_hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_to_gguf_name("model.layers.1.self_attn.rotary_emb.inv_freq"), None);
    }

    #[test]
    fn rotary_permutation_matches_llama_cpp_and_inverts() {
        // 2 heads of width 4, 1 input column: HF rows [a0 a1 | a2 a3], [b0 b1 | b2 b3].
        // llama.cpp interleaves the halves within each head: a0 a2 a1 a3 b0 b2 b1 b3.
        let hf = Tensor::from_slice(&[0f32, 1., 2., 3., 10., 11., 12., 13.]).view([8, 1]);
        let gguf = permute_rotary(&hf, 2).unwrap();
        let got: Vec<f32> = Vec::try_from(gguf.view([-1])).unwrap();
        assert_eq!(got, vec![0., 2., 1., 3., 10., 12., 11., 13.]);
        let back = unpermute_rotary(&gguf, 2).unwrap();
        assert!(back.equal(&hf));
        let wide = Tensor::randn([576, 12], (Kind::Float, Device::Cpu));
        assert!(unpermute_rotary(&permute_rotary(&wide, 9).unwrap(), 9).unwrap().equal(&wide));
        assert!(unpermute_rotary(&wide, 5).is_err());
        assert!(unpermute_rotary(&Tensor::zeros([4], (Kind::Float, Device::Cpu)), 1).is_err());
    }
}
