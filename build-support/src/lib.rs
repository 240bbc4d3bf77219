//! Build-script helper shared by every crate whose binaries or tests link libtorch.
//!
//! `tch`'s build script links against libtorch but leaves finding it at run time to the user
//! (`LD_LIBRARY_PATH`). We embed an rpath instead, so `edge-agent --help` works from a plain
//! shell. `cargo:rustc-link-arg` only reaches the targets of the package whose build script
//! prints it, hence one call in each such package.

use std::{env, path::PathBuf};

/// Prints the link arguments that put libtorch's `lib/` directory on the rpath.
///
/// The directory comes from `LIBTORCH` (set by `.cargo/config.toml` after `make setup`) or,
/// for release bundles, `LLMCHAIN_LIBTORCH_RPATH` (e.g. `$ORIGIN/../lib`).
pub fn libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LLMCHAIN_LIBTORCH_RPATH");
    if let Ok(rpath) = env::var("LLMCHAIN_LIBTORCH_RPATH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{rpath}");
        return;
    }
    let Ok(libtorch) = env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run `make setup` so binaries find libtorch");
        return;
    };
    // Resolve the `.llmchain/libtorch` link so the rpath survives the work tree moving.
    let dir = PathBuf::from(&libtorch);
    let dir = dir.canonicalize().unwrap_or(dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.join("lib").display());
}
