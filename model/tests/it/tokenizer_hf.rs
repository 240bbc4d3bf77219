//! The tokenizer built from the SmolLM2 GGUF produces exactly Hugging Face's ids and chat
//! renderings (fixtures from `scripts/reference/tokens.py`, run by `make fixtures`), decodes back
//! to the input, and survives the `tokenizer.json` round trip artifacts use.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::gguf_writer::GgufWriter;
use llmchain_model::gguf::{Gguf, Value};
use llmchain_model::tokenizer::{ChatMessage, Tokenizer};

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn smollm2() -> &'static Gguf {
    static GGUF: OnceLock<Gguf> = OnceLock::new();
    GGUF.get_or_init(|| {
        let path = std::env::var_os("LLMCHAIN_SMOLLM2_GGUF")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_path(".llmchain/smollm2.gguf"));
        Gguf::open(&path).unwrap_or_else(|e| panic!("{e}: run `make setup` to install the SmolLM2 gguf"))
    })
}

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf(smollm2()).unwrap())
}

fn fixture() -> &'static serde_json::Value {
    static FIXTURE: OnceLock<serde_json::Value> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = repo_path(".llmchain/fixtures/tokens.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}: run `make fixtures`", path.display()));
        serde_json::from_str(&text).unwrap()
    })
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
}

#[test]
fn ids_equal_hf_for_every_fixture_string() {
    let tok = tokenizer();
    let strings = fixture()["strings"].as_array().unwrap();
    assert!(strings.len() >= 50, "only {} strings in the fixture", strings.len());
    let mut mismatches = Vec::new();
    for s in strings {
        let text = s["text"].as_str().unwrap();
        let want = ids(&s["ids"]);
        let got = tok.encode(text).unwrap();
        if got != want {
            mismatches.push(format!("{text:?}: ours {got:?} hf {want:?}"));
        }
    }
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
}

#[test]
fn decode_equals_hf_and_round_trips() {
    let tok = tokenizer();
    for s in fixture()["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want_ids = ids(&s["ids"]);
        assert_eq!(tok.decode(&want_ids).unwrap(), s["decoded"].as_str().unwrap(), "{text:?}");
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
}

#[test]
fn chat_template_renders_and_tokenizes_like_hf() {
    let tok = tokenizer();
    let chats = fixture()["chats"].as_array().unwrap();
    assert!(chats.len() >= 4);
    let mut with_system = 0;
    for chat in chats {
        let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
        with_system += usize::from(messages.first().is_some_and(|m| m.role == "system"));
        let agp = chat["add_generation_prompt"].as_bool().unwrap();
        let text = tok.apply_chat_template(&messages, agp);
        assert_eq!(text, chat["text"].as_str().unwrap(), "{messages:?}");
        assert_eq!(tok.encode(&text).unwrap(), ids(&chat["ids"]), "{messages:?}");
    }
    assert!(with_system >= 1 && with_system < chats.len(), "fixture must cover both template branches");
}

#[test]
fn special_ids_and_sizes() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.vocab_size() as u64, fixture()["vocab_size"].as_u64().unwrap());
    assert_eq!(u64::from(tok.eos_id()), fixture()["eos_token_id"].as_u64().unwrap());
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.im_end_id(), Some(2));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.token_id("no such token"), None);
    // Special tokens are matched whole, and no BOS is added.
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
    let err = tok.decode(&[1, 49152]).unwrap_err().to_string();
    assert!(err.contains("49152"), "{err}");
}

#[test]
fn tokenizer_json_round_trip_keeps_ids_and_template() {
    let tok = tokenizer();
    let json = tok.to_json().unwrap();
    let back = Tokenizer::from_json(&json).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.eos_id(), tok.eos_id());
    assert_eq!(back.im_end_id(), tok.im_end_id());
    for s in fixture()["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        assert_eq!(back.encode(text).unwrap(), ids(&s["ids"]), "{text:?}");
    }
    let chat = [ChatMessage::new("user", "hi")];
    assert_eq!(back.apply_chat_template(&chat, true), tok.apply_chat_template(&chat, true));
    assert!(Tokenizer::from_json("{not json").unwrap_err().to_string().starts_with("tokenizer: "));
}

#[test]
fn default_system_prompt_rule() {
    let tok = tokenizer();
    let rendered = tok.apply_chat_template(&[ChatMessage::new("user", "x")], false);
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nx<|im_end|>\n"
    );
    let own =
        tok.apply_chat_template(&[ChatMessage::new("system", "S"), ChatMessage::new("user", "x")], true);
    assert_eq!(
        own,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    );
    // HF refuses an empty conversation; we render only the generation prompt.
    assert_eq!(tok.apply_chat_template(&[], true), "<|im_start|>assistant\n");
}

/// Merges of the tiny vocabulary, best first.
const MERGES: &[&str] = &["h e", "l l", "he ll", "hell o", "Ġ w"];

/// A tiny byte-level vocabulary: three specials, the 256 byte symbols and a few merged tokens.
fn tiny(model: &str, pre: &str, merges: &[&str], template: Option<&str>) -> GgufWriter {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![3, 3, 3];
    // GPT-2's byte alphabet, in byte order.
    for b in 0..=255u8 {
        let c = match b {
            b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF => char::from(b),
            _ => {
                let rank = (0..b).filter(|x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)).count();
                char::from_u32(256 + rank as u32).unwrap()
            }
        };
        tokens.push(c.to_string());
        types.push(1);
    }
    tokens.extend(["he".into(), "ll".into(), "hell".into(), "hello".into(), "Ġw".into()]);
    types.extend([1; 5]);
    let mut w = GgufWriter::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("tokenizer.ggml.model", Value::String(model.into()))
        .kv("tokenizer.ggml.pre", Value::String(pre.into()))
        .kv("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect()))
        .kv("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| Value::String((*m).into())).collect()),
        )
        .kv("tokenizer.ggml.eos_token_id", Value::U32(2));
    if let Some(t) = template {
        w = w.kv("tokenizer.chat_template", Value::String(t.into()));
    }
    w
}

fn tiny_tokenizer(w: GgufWriter) -> llmchain_model::Result<Tokenizer> {
    Tokenizer::from_gguf(&Gguf::from_bytes(w.build().bytes).unwrap())
}

#[test]
fn tiny_vocabulary_applies_merges_in_rank_order() {
    let tok = tiny_tokenizer(tiny("gpt2", "smollm", MERGES, None)).unwrap();
    let hello = tok.token_id("hello").unwrap();
    let space_w = tok.token_id("Ġw").unwrap();
    let o = tok.token_id("o").unwrap();
    let r = tok.token_id("r").unwrap();
    let l = tok.token_id("l").unwrap();
    let d = tok.token_id("d").unwrap();
    assert_eq!(tok.encode("hello world").unwrap(), vec![hello, space_w, o, r, l, d]);
    assert_eq!(tok.encode("<|im_end|>hello").unwrap(), vec![2, hello]);
    assert_eq!(tok.decode(&tok.encode("héllo ✓\n").unwrap()).unwrap(), "héllo ✓\n");
    assert_eq!(tok.eos_id(), 2);
}

#[test]
fn unsupported_or_broken_tokenizer_metadata_is_an_error() {
    let err = tiny_tokenizer(tiny("llama", "smollm", MERGES, None)).unwrap_err().to_string();
    assert!(err.contains("llama") && err.contains("not supported"), "{err}");

    let err = tiny_tokenizer(tiny("gpt2", "smollm", MERGES, Some("{{ messages }}"))).unwrap_err().to_string();
    assert!(err.contains("chat template"), "{err}");

    let err = tiny_tokenizer(tiny("gpt2", "qwen2", MERGES, None)).unwrap_err().to_string();
    assert!(err.contains("qwen2"), "{err}");

    let err = tiny_tokenizer(
        tiny("gpt2", "smollm", MERGES, None).kv("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("add_bos_token"), "{err}");
    let ok = tiny("gpt2", "smollm", MERGES, None).kv("tokenizer.ggml.add_bos_token", Value::Bool(false));
    assert!(tiny_tokenizer(ok).is_ok());

    let err = tiny_tokenizer(
        tiny("gpt2", "smollm", MERGES, None).kv("tokenizer.ggml.bos_token_id", Value::String("one".into())),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tokenizer.ggml.bos_token_id") && err.contains("string"), "{err}");

    let no_tokens = GgufWriter::new().kv("tokenizer.ggml.model", Value::String("gpt2".into())).build();
    let err = Tokenizer::from_gguf(&Gguf::from_bytes(no_tokens.bytes).unwrap()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.tokens") && err.contains("missing"), "{err}");

    let err = tiny_tokenizer(tiny("gpt2", "smollm", &["h e", "nospace"], None)).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.merges") && err.contains("merge 1"), "{err}");

    let unknown_merge = GgufWriter::new()
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(vec![Value::String("a".into())]))
        .kv("tokenizer.ggml.merges", Value::Array(vec![Value::String("a b".into())]))
        .build();
    let err = Tokenizer::from_gguf(&Gguf::from_bytes(unknown_merge.bytes).unwrap()).unwrap_err().to_string();
    assert!(err.starts_with("tokenizer: "), "{err}");

    let eos_out_of_range = GgufWriter::new()
        .kv("tokenizer.ggml.model", Value::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(vec![Value::String("a".into())]))
        .kv("tokenizer.ggml.merges", Value::Array(vec![]))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(5))
        .build();
    let err =
        Tokenizer::from_gguf(&Gguf::from_bytes(eos_out_of_range.bytes).unwrap()).unwrap_err().to_string();
    assert!(err.contains("eos_token_id") && err.contains("out of vocabulary"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

    /// Byte-level BPE is lossless: any text, special-token look-alikes included, decodes back.
    #[test]
    fn decode_inverts_encode_for_any_text(
        text in proptest::prop_oneof![
            proptest::prelude::any::<String>(),
            "[ a-z0-9\\n\\t<|>_]{0,64}",
            "(<\\|im_(start|end)\\|>|[ \\n]{1,3}|[a-zé中😀]{1,4}){0,12}",
        ]
    ) {
        let tok = tokenizer();
        let ids = tok.encode(&text).unwrap();
        proptest::prop_assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}

#[test]
fn classifier_prompt_splits_at_a_token_boundary() {
    use llmchain_model::prompt::ClassifierPrompt;
    let tok = tokenizer();
    let instructions = "Reply with one word: normal or shutdown.";
    let prompt = ClassifierPrompt::new(tok, instructions, &["normal", "shutdown"]).unwrap();
    for text in ["machine: pump\nnote: smoke!", "", "  leading spaces and ünïcode"] {
        let whole = tok
            .encode(&tok.apply_chat_template(
                &[ChatMessage::new("system", instructions), ChatMessage::new("user", text)],
                true,
            ))
            .unwrap();
        // Tokenizing the prefix and the record part apart gives exactly the whole prompt's ids,
        // so the prefix's cached keys and values are the ones the whole prompt would compute.
        assert_eq!(prompt.full_ids(tok, text).unwrap(), whole, "text {text:?}");
        assert!(whole.starts_with(prompt.prefix_ids()));
    }
    let im_end = tok.im_end_id().unwrap();
    for (cand, label) in prompt.candidates().iter().zip(["normal", "shutdown"]) {
        assert_eq!(cand.last(), Some(&im_end));
        assert_eq!(tok.decode(&cand[..cand.len() - 1]).unwrap(), label);
    }
}
