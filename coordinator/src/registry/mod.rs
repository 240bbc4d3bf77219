//! The model registry service: versions, manifests, blob upload and fetch.
