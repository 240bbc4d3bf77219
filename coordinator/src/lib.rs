//! The LLMChain coordinator: stores signed model versions and their blobs, holds the fleet's
//! sessions, and drives rollouts. It never links libtorch: artifacts are validated from the
//! manifest and the safetensors layout alone.

pub mod auth;
pub mod blobs;
pub mod config;
pub mod error;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod pki;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod store;

pub use error::{Error, Result};
