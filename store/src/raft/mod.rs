//! Consensus: the raft-rs driver, Pontoon's raft WAL, and raft-rs's view of it.
//!
//! - [`wal`]: the durable, checksummed, segmented log of entries and hard state;
//! - [`storage`]: `raft::Storage` over the WAL (the in-memory tail raft-rs reads);
//! - [`node`]: the Ready loop and the apply loop, proposals and read-index reads;
//! - [`transport`]: raft messages and snapshots to peers over gRPC;
//! - [`logger`]: raft-rs's slog output bridged to `tracing`.

pub mod logger;
pub mod node;
pub mod storage;
pub mod transport;
pub mod wal;

pub use node::{Bootstrap, PeerProgress, RaftConfig, RaftNode, RaftStatus, StateObserver};
pub use transport::{NoPeers, PeerTransport, Transport};
