//! Embeds an rpath to libtorch so the binary starts without LD_LIBRARY_PATH.
fn main() {
    llmchain_build::libtorch_rpath();
}
