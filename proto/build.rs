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
        // A blob chunk decodes to a slice of the receive buffer instead of a copy of it: the
        // copy was about 6% of a FetchBlob client's CPU in `make bench-transfer`.
        .bytes(".llmchain.v1.FetchBlobResponse.data")
        .file_descriptor_set_path(out.join("llmchain_v1_descriptor.bin"))
        .compile_protos(&files, &["."])?;
    Ok(())
}
