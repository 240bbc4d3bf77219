//! Embeds an rpath to libtorch: test binaries that drive the edge agent in-process link it.
fn main() {
    llmchain_build::libtorch_rpath();
}
