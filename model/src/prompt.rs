//! Classification by scoring: the one prompt layout the agent decides with and the trainer
//! trains on.
//!
//! A record is asked as a chat: the system message holds the instructions (identical for every
//! record), the user message holds the record's text, and the assistant turn is opened. Each
//! label is a candidate answer, `"<label><|im_end|>"`, scored by its summed log-probability
//! (the end marker makes "inspect" and a hypothetical "inspection" different answers). The
//! system part is its own token run, split at a special-token boundary, so its keys and values
//! are computed once per model version and shared by every record ([`crate::Prefix`]).

use crate::{
    Error, Result,
    tokenizer::{ChatMessage, Tokenizer},
};

/// Token ids of a classification prompt, split into the shared prefix and per-record parts.
#[derive(Debug, Clone)]
pub struct ClassifierPrompt {
    instructions: String,
    system: String,
    prefix: Vec<u32>,
    candidates: Vec<Vec<u32>>,
    labels: Vec<String>,
}

impl ClassifierPrompt {
    /// The prompt for `instructions` (the system message) and the candidate `labels`.
    pub fn new(tokenizer: &Tokenizer, instructions: &str, labels: &[&str]) -> Result<Self> {
        if labels.is_empty() {
            return Err(Error::input("a classifier needs at least one label"));
        }
        let system = tokenizer.apply_chat_template(&[ChatMessage::new("system", instructions)], false);
        let prefix = tokenizer.encode(&system)?;
        let end = tokenizer.im_end_id().map(|_| "<|im_end|>").unwrap_or("");
        let candidates =
            labels.iter().map(|l| tokenizer.encode(&format!("{l}{end}"))).collect::<Result<Vec<_>>>()?;
        Ok(ClassifierPrompt {
            instructions: instructions.to_string(),
            system,
            prefix,
            candidates,
            labels: labels.iter().map(|l| l.to_string()).collect(),
        })
    }

    /// The shared prefix: the rendered system message.
    pub fn prefix_ids(&self) -> &[u32] {
        &self.prefix
    }

    /// The tokens after the prefix for one record: the user turn and the opened assistant turn.
    pub fn record_ids(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let messages =
            [ChatMessage::new("system", self.instructions.as_str()), ChatMessage::new("user", text)];
        let full = tokenizer.apply_chat_template(&messages, true);
        let rest = full.strip_prefix(self.system.as_str()).ok_or_else(|| {
            Error::Tokenizer("the chat template does not render the system turn as a prefix".into())
        })?;
        tokenizer.encode(rest)
    }

    /// The whole prompt for one record (prefix + record part).
    pub fn full_ids(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.prefix.clone();
        ids.extend(self.record_ids(tokenizer, text)?);
        Ok(ids)
    }

    /// Candidate answers, one token run per label, in label order.
    pub fn candidates(&self) -> &[Vec<u32>] {
        &self.candidates
    }

    /// The labels, in candidate order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
}

/// Softmax over label scores (log-probabilities), numerically stable.
pub fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}
