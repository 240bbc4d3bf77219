//! Model versions from the coordinator (being written).
