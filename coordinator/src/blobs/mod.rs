//! Content-addressed blob storage (local directory, S3-compatible object store).
