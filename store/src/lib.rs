//! Pontoon's store: an etcd v3 compatible key-value store, replicated with raft.
//!
//! Data flow of a write (DESIGN.md, "A write, end to end"): `server` validates a
//! request and proposes it to `raft`; the raft driver makes the entry durable in its
//! own WAL (one fsync per Ready) and hands committed entries to the apply loop; `mvcc`
//! applies each entry in one RocksDB batch together with its raft index; the waiter of
//! the proposal gets the response.
//!
//! Dependency arrows point down: `server` -> `raft` -> `mvcc` -> RocksDB. `mvcc`
//! knows nothing of raft or gRPC.

pub mod error;
pub mod lease;
pub mod mvcc;
pub mod raft;
pub mod server;
pub mod watch;

pub use error::{Error, Result};
