//! Key/value state with revisions, watches, leases and transactions (embedded and etcd backends).
