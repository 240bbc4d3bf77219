//! Compiles the v1 `.proto` files into Rust and writes the descriptor set that the server's
//! reflection service publishes.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let files = [
        "llmchain/v1/common.proto",
        "llmchain/v1/registry.proto",
        "llmchain/v1/fleet.proto",
        "llmchain/v1/rollout.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("llmchain_v1_descriptor.bin"))
        .compile_protos(&files, &["."])?;
    Ok(())
}
