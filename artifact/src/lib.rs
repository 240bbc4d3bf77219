//! Model artifacts without libtorch: manifests and their canonical bytes, sha256 content
//! addresses, ed25519 signing and verification, delta planning and safetensors assembly.
//!
//! The trainer builds a [`Manifest`], signs it with a [`SigningKey`]; the coordinator and the
//! agents accept it only through [`TrustedKeys::verify`], which checks the signature over the
//! exact bytes before decoding them and refuses any non-canonical encoding.

pub mod architecture;
pub mod assemble;
pub mod delta;
pub mod digest;
pub mod error;
pub mod keys;
pub mod manifest;
pub mod trust;

pub use assemble::{BlobDir, BlobSource, assemble_safetensors, safetensors_header};
pub use delta::{DeltaPlan, delta_bytes_from, plan_delta};
pub use digest::{Hasher, chunks, digest_bytes, digest_reader};
pub use error::{Error, Result};
pub use keys::{PublicKey, SigningKey, TrustedKeys};
pub use llmchain_proto::model::SignedStatement;
pub use llmchain_proto::model::{DType, Digest, ModelRef, SignedManifest, TensorInfo};
pub use manifest::{Architecture, Manifest, Metric, TokenizerRef, TrainingMetadata};
pub use trust::{Applied, RollbackStatement, TrustDocument, TrustStore};

#[cfg(any(test, feature = "testing"))]
pub mod testing;
