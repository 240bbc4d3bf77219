//! The LLMChain edge agent as a library: the `edge-agent` binary wires these modules, and the
//! tests drive them in-process.
//!
//! - [`sync`]: model versions from the coordinator — manifest verification, delta download
//!   with resume into a local blob cache, cache garbage collection.
//! - [`pipeline`]: records in (MQTT, JSONL, stdin, simulator), batching, actions out
//!   (MQTT, JSONL, command), per-window summaries and their on-disk spool.

pub mod pipeline;
pub mod sync;
