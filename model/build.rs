//! Embeds an rpath to libtorch so test binaries and examples start without LD_LIBRARY_PATH.
fn main() {
    llmchain_build::libtorch_rpath();
}
