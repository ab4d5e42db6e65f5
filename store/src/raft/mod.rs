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

/// Frees `garbage` on a short-lived thread of its own. Log truncation lets go of a
/// whole log's worth of entries and of the old WAL segment's file (closing the last
/// descriptor of an unlinked file is when the filesystem frees its blocks): tens of
/// milliseconds the raft thread, and every proposal queued behind it, need not wait.
pub(crate) fn drop_off_thread<T: Send + 'static>(garbage: T) {
    let spawned = std::thread::Builder::new()
        .name("raft-log-drop".into())
        .spawn(move || drop(garbage));
    if let Err(e) = spawned {
        // The closure, and with it the garbage, was dropped here instead.
        tracing::debug!(error = %e, "freeing the truncated log inline");
    }
}

pub use node::{Bootstrap, PeerProgress, RaftConfig, RaftNode, RaftStatus, StateObserver};
pub use transport::{NoPeers, PeerTransport, Transport};
