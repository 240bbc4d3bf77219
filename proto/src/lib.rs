//! The LLMChain v1 wire API.
//!
//! Three layers live here (see `shared/STYLE.md`): the prost/tonic code generated from
//! `llmchain/v1/*.proto` ([`pb`]), domain types that validate a wire message once at the
//! boundary ([`model`]), and the single mapping from domain errors to `tonic::Status`
//! ([`error`]). Service logic elsewhere only ever sees domain types.

pub mod error;
pub mod fetch;
pub mod model;

pub use error::{ApiError, ApiResult};

/// Code generated from the `llmchain.v1` protobuf package.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("llmchain.v1");
}

/// Encoded `FileDescriptorSet` of the v1 API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("llmchain_v1_descriptor");

/// Fully qualified names of the v1 services, as reflection lists them.
pub const SERVICE_NAMES: [&str; 3] = ["llmchain.v1.Registry", "llmchain.v1.Fleet", "llmchain.v1.Rollouts"];
