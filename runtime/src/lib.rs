//! Shared runtime pieces: telemetry, configuration layering, graceful shutdown.
