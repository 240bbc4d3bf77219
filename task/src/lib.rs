//! The reference edge task of LLMChain: equipment telemetry triage (`shared/TASK.md`).
//!
//! - [`record`]: the JSON record an edge node sees, parsed and validated from untrusted bytes;
//! - [`rules`]: the ground-truth label rules, a pure function of a record;
//! - [`notes`]: reading operator notes for the rules (synonyms, typos, capitals, negations);
//! - [`generate`]: a seeded generator of labelled records, with a shifted distribution for
//!   incremental-learning rounds;
//! - [`preprocess`]: the text the model reads (statistics and the note, never the rules) and
//!   the prompt around it.

pub mod generate;
pub mod notes;
pub mod preprocess;
pub mod record;
pub mod rules;

pub use record::{Kind, Record, RecordError};
pub use rules::{Label, label};
