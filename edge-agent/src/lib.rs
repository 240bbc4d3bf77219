//! The LLMChain edge agent as a library: the `edge-agent` binary wires these modules, and the
//! tests drive them in-process.
//!
//! - [`sync`]: model versions from the coordinator — manifest verification, delta download
//!   with resume into a local blob cache, cache garbage collection.
//! - [`agent`]: `edge-agent run` — the session, assignments, hot swap and summary reports.
//! - [`backoff`]: reconnect delays shared by every retrying loop.
//! - [`config`]: its flags, environment variables and config file.
//! - [`enroll`]: `edge-agent enroll` — a key made here, a certificate from the coordinator's CA.
//! - [`engine`]: the serving model version, its self-test, and the atomic hot swap.
//! - [`pipeline`]: records in (MQTT, JSONL, stdin, simulator), batching, actions out
//!   (MQTT, JSONL, command), per-window summaries and their on-disk spool.

pub mod agent;
pub mod backoff;
pub mod config;
pub mod engine;
pub mod enroll;
pub mod metrics;
pub mod pipeline;
pub mod sync;
