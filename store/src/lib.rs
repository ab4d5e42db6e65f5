//! Pontoon's store: an etcd v3 compatible key-value store, replicated with raft.
//!
//! Data flow of a write (DESIGN.md, "A write, end to end"): `server` validates a
//! request and proposes it to `raft`; the raft driver makes the entry durable in its
//! own WAL (one fsync per Ready) and hands committed entries to the apply loop; `mvcc`
//! applies each entry in one RocksDB batch together with its raft index; the waiter of
//! the proposal gets the response.
//!
//! Dependency arrows point down: `server` -> `raft` -> `mvcc` -> RocksDB. `mvcc`
//! knows nothing of raft or gRPC (membership, alarms and snapshot files are state
//! machine data to it; raft metadata it stores is opaque bytes). `backup` is the
//! operator's `pontoon snapshot` tooling; `metrics` the process-wide Prometheus
//! registry.

pub mod auth;
pub mod backup;
pub mod duration;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod mvcc;
pub mod raft;
pub mod server;
pub mod watch;

pub use error::{Error, Result};
