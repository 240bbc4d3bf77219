//! The tokenizer and chat template, built from GGUF metadata to match Hugging Face exactly.
//!
//! A GGUF carries no `tokenizer.json`; it stores the vocabulary, merges and token types under
//! `tokenizer.ggml.*`. [`Tokenizer::from_gguf`] rebuilds from them the same `tokenizers`
//! pipeline HF transformers builds for the file (`integrations/gguf/gguf_tokenizer_mapping.py`,
//! `byte_level_tokenizer`): a byte-level BPE over the file's vocabulary (tokens spelt outside the
//! byte alphabet re-spelt through it) and merges, the GPT-2 split regex with no prefix space, a
//! byte-level decoder, control tokens (type 3) added as special tokens and user-defined tokens
//! (type 4) as plain added tokens, so `<|im_start|>` and friends are matched whole.
//!
//! Invariant: `encode` returns exactly HF's `tokenizer(text).input_ids` for the same file and
//! `apply_chat_template` returns exactly HF's `apply_chat_template(..., tokenize=False)`; the
//! fixtures written by `scripts/reference/tokens.py` check both.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokenizers::AddedToken;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::error::{Error, Result};
use crate::gguf::{Gguf, Value};

/// SmolLM2's chat template exactly as its GGUF (and `tokenizer_config.json`) stores it.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
/// The system prompt SmolLM2's template inserts when the conversation does not start with one.
const SMOLLM2_DEFAULT_SYSTEM: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
/// Plain ChatML (transformers' historical default template): no default system prompt.
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// `tokenizer.ggml.pre` values for which HF replaces the GPT-2 split regex with its own; we have
/// not verified those against HF, so we refuse them rather than tokenize differently.
const UNSUPPORTED_PRE: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "tekken",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "qwen35",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
];

/// llama.cpp's token type for control tokens (`LLAMA_TOKEN_TYPE_CONTROL`).
const TOKEN_TYPE_CONTROL: i128 = 3;
/// llama.cpp's token type for user-defined tokens (`LLAMA_TOKEN_TYPE_USER_DEFINED`).
const TOKEN_TYPE_USER_DEFINED: i128 = 4;

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// The ChatML rendering rule of the model, recovered from its template.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChatTemplate {
    /// Inserted as a system message when the first message is not one.
    default_system: Option<String>,
}

impl ChatTemplate {
    fn smollm2() -> Self {
        ChatTemplate { default_system: Some(SMOLLM2_DEFAULT_SYSTEM.to_owned()) }
    }

    /// Recognises a Jinja template we can render natively. We do not embed a Jinja engine: the
    /// two ChatML variants cover SmolLM2, and anything else is refused instead of mis-rendered.
    fn recognise(template: &str) -> Result<Self> {
        match template {
            SMOLLM2_TEMPLATE => Ok(Self::smollm2()),
            CHATML_TEMPLATE => Ok(ChatTemplate { default_system: None }),
            other => Err(Error::Tokenizer(format!(
                "unsupported chat template ({} bytes, starts {:?})",
                other.len(),
                other.chars().take(60).collect::<String>()
            ))),
        }
    }
}

/// A byte-level BPE tokenizer with its chat template and special token ids.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: u32,
    im_end_id: Option<u32>,
    template: ChatTemplate,
}

/// GPT-2's reversible map from bytes to printable characters (`bytes_to_unicode`).
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        map[usize::from(b)] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or(char::REPLACEMENT_CHARACTER);
            next += 1;
            c
        };
    }
    map
}

/// A string array from the metadata, with the key named in errors.
fn string_array<'a>(gguf: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    gguf.get_array(key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().ok_or_else(|| Error::Metadata {
                key: key.to_owned(),
                reason: format!("element {i} is a {}", v.type_name()),
            })
        })
        .collect()
}

fn map_err(context: &str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error + '_ {
    move |e| Error::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Builds the tokenizer HF transformers builds for this GGUF (`tokenizer.ggml.model` must be
    /// `gpt2`, i.e. byte-level BPE).
    pub fn from_gguf(gguf: &Gguf) -> Result<Tokenizer> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "tokenizer model {model:?} is not supported (only byte-level bpe, \"gpt2\")"
            )));
        }
        if let Some(Value::String(pre)) = gguf.get("tokenizer.ggml.pre")
            && UNSUPPORTED_PRE.contains(&pre.as_str())
        {
            return Err(Error::Tokenizer(format!("pre-tokenizer {pre:?} is not supported")));
        }
        // HF's post-processor would then wrap every encoding in BOS/EOS; unverified, so refused.
        for key in ["tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"] {
            if let Some(Value::Bool(true)) = gguf.get(key) {
                return Err(Error::Tokenizer(format!("{key} = true is not supported")));
            }
        }
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let merges = string_array(gguf, "tokenizer.ggml.merges")?;
        let types: Vec<i128> = match gguf.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(_) => gguf
                .get_array("tokenizer.ggml.token_type")?
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_integer().ok_or_else(|| {
                        Error::metadata(
                            "tokenizer.ggml.token_type",
                            format!("element {i} is a {}", v.type_name()),
                        )
                    })
                })
                .collect::<Result<_>>()?,
        };
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(Error::metadata(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let n_tokens = u32::try_from(tokens.len())
            .map_err(|_| Error::metadata("tokenizer.ggml.tokens", "more than 2^32 tokens"))?;

        // HF re-spells tokens written outside the byte alphabet through it; for a byte-level
        // vocabulary that is only ever a mislabelled special token.
        let spell = byte_to_char();
        let alphabet: HashSet<char> = spell.iter().copied().collect();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab = Vocab::default();
        for (id, token) in (0..n_tokens).zip(&tokens) {
            let spelt = if in_alphabet(token) {
                (*token).to_owned()
            } else {
                token.bytes().map(|b| spell[usize::from(b)]).collect()
            };
            // Later duplicates win, as in HF's dict comprehension.
            vocab.insert(spelt, id);
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| {
                    Error::metadata("tokenizer.ggml.merges", format!("merge {i} {m:?} has no space"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building bpe: {e}")))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(t, &ty)| ty == TOKEN_TYPE_CONTROL && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(*t, true).normalized(false))
            .collect();
        inner.add_special_tokens(&control);
        let user_defined: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(t, &ty)| ty == TOKEN_TYPE_USER_DEFINED && inner.token_to_id(t).is_some())
            .map(|(t, _)| AddedToken::from(*t, false).normalized(false))
            .collect();
        inner.add_tokens(&user_defined);

        let token_at = |key: &str| -> Result<Option<u32>> {
            match gguf.get(key) {
                None => Ok(None),
                Some(_) => {
                    let id = gguf.get_u32(key)?;
                    if id >= n_tokens {
                        return Err(Error::metadata(
                            key,
                            format!("token id {id} out of vocabulary ({n_tokens})"),
                        ));
                    }
                    Ok(Some(id))
                }
            }
        };
        let im_end_id = inner.token_to_id("<|im_end|>");
        let eos_id = match token_at("tokenizer.ggml.eos_token_id")? {
            Some(id) => id,
            None => fallback_eos(&inner)?,
        };
        // HF also registers the bos/unk/pad tokens it reads from the file as special tokens.
        let named: Vec<AddedToken> = [
            token_at("tokenizer.ggml.bos_token_id")?,
            Some(eos_id),
            token_at("tokenizer.ggml.unknown_token_id")?,
            token_at("tokenizer.ggml.padding_token_id")?,
        ]
        .into_iter()
        .flatten()
        .filter_map(|id| tokens.get(id as usize))
        .filter(|t| in_alphabet(t))
        .map(|t| AddedToken::from(*t, true).normalized(false))
        .collect();
        inner.add_special_tokens(&named);

        let template = match gguf.get("tokenizer.chat_template") {
            None => ChatTemplate::smollm2(),
            Some(_) => ChatTemplate::recognise(gguf.get_str("tokenizer.chat_template")?)?,
        };
        tracing::debug!(vocab = n_tokens, eos_id, special = control.len(), "built tokenizer from gguf");
        Ok(Tokenizer { inner, eos_id, im_end_id, template })
    }

    /// Loads a tokenizer from HF's `tokenizer.json` form (as written by [`Tokenizer::to_json`]).
    /// That form has no chat template or EOS id: the template is SmolLM2's, EOS is
    /// `<|im_end|>` (the end of a ChatML turn), else `<|endoftext|>`.
    pub fn from_json(json: &str) -> Result<Tokenizer> {
        let inner = tokenizers::Tokenizer::from_str(json).map_err(map_err("parsing tokenizer json"))?;
        let eos_id = fallback_eos(&inner)?;
        let im_end_id = inner.token_to_id("<|im_end|>");
        Ok(Tokenizer { inner, eos_id, im_end_id, template: ChatTemplate::smollm2() })
    }

    /// The tokenizer in HF's `tokenizer.json` form, so an artifact can ship it as one blob.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(false).map_err(map_err("serialising tokenizer"))
    }

    /// The token ids of `text`, exactly as HF's `tokenizer(text).input_ids` (SmolLM2 adds no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, true).map_err(map_err("encoding"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included (HF's `decode` default).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
            // `tokenizers` silently drops unknown ids; a caller passing one has a bug to hear about.
            return Err(Error::Tokenizer(format!("token id {bad} out of vocabulary ({size})")));
        }
        self.inner.decode(ids, false).map_err(map_err("decoding"))
    }

    /// The id of `token` (spelt as in the vocabulary, e.g. `<|im_end|>` or `Ġthe`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id that ends generation (`tokenizer.ggml.eos_token_id`; `<|im_end|>` for SmolLM2).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of `<|im_end|>`, which ends every ChatML turn, if the vocabulary has it.
    pub fn im_end_id(&self) -> Option<u32> {
        self.im_end_id
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The vocabulary: token to id, added tokens included.
    pub fn vocab(&self) -> HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// Renders `messages` as the model's chat template does (HF's `apply_chat_template` with
    /// `tokenize=False`): ChatML turns, SmolLM2's default system prompt first when the
    /// conversation does not open with a system message, and an open assistant turn when
    /// `add_generation_prompt`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let mut out = String::new();
        if let (Some(first), Some(system)) = (messages.first(), &self.template.default_system)
            && first.role != "system"
        {
            push_turn(&mut out, "system", system);
        }
        for m in messages {
            push_turn(&mut out, &m.role, &m.content);
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        out
    }
}

fn push_turn(out: &mut String, role: &str, content: &str) {
    out.push_str("<|im_start|>");
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str("<|im_end|>\n");
}

/// The EOS of a tokenizer whose metadata does not name one.
fn fallback_eos(inner: &tokenizers::Tokenizer) -> Result<u32> {
    ["<|im_end|>", "<|endoftext|>"].iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| {
        Error::Tokenizer("no eos token: neither <|im_end|> nor <|endoftext|> in vocabulary".into())
    })
}
