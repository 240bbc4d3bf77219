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
    println!("cargo:rerun-if-env-changed=LLMCHAIN_LINK_CUDA");
    let bundle = env::var("LLMCHAIN_LIBTORCH_RPATH").ok();
    link_cuda(bundle.is_some());
    if let Some(rpath) = bundle {
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

/// Links `libtorch_cuda.so` when libtorch has it, so `tch` sees the GPU.
///
/// Nothing in our code or `tch` references a symbol of `libtorch_cuda`: its static initialisers
/// register the CUDA backend with libtorch when the library is loaded. The linker's default
/// `--as-needed` therefore drops it, and `tch::Cuda::is_available()` is false even on a GPU
/// machine. `--no-as-needed` around it keeps it (check with `ldd`).
///
/// Loading it costs every process ~0.5 s of start-up and ~390 MB of resident memory (measured
/// on a CPU-only machine with the cu130 libtorch), so it is linked by default only where the
/// build machine has an NVIDIA driver (`/dev/nvidiactl`) and the build is not a release bundle
/// (`LLMCHAIN_LIBTORCH_RPATH`: a bundle ships every library the binary loads).
/// `LLMCHAIN_LINK_CUDA=1` or `=0` decides explicitly.
fn link_cuda(bundle: bool) {
    let wanted = match env::var("LLMCHAIN_LINK_CUDA").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => !bundle && std::path::Path::new("/dev/nvidiactl").exists(),
    };
    let Some(lib) = env::var_os("LIBTORCH").map(|dir| PathBuf::from(dir).join("lib")) else {
        return;
    };
    let cuda = lib.join("libtorch_cuda.so");
    if wanted && cuda.exists() {
        let cuda = cuda.canonicalize().unwrap_or(cuda);
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,{},--pop-state", cuda.display());
    }
}
