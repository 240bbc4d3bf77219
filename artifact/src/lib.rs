//! Model manifests, content-addressed blobs, signing, delta planning (no libtorch).
