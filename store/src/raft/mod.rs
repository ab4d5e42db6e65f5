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

/// Frees `garbage` on the log's helper thread (see [`off_thread`]).
pub(crate) fn drop_off_thread<T: Send + 'static>(garbage: T) {
    off_thread(move || drop(garbage));
}

/// Runs `work` on `raft-log-drop`, one long-lived helper thread, in the order given.
/// Log truncation lets go of a whole log's worth of entries and of released WAL
/// segment files (closing the last descriptor of an unlinked file is when the
/// filesystem frees its blocks and cached pages): tens of milliseconds the raft
/// thread, and every proposal queued behind it, need not wait. One thread started
/// once, not one per truncation: spawning (a stack to map) during a truncation was
/// measured at up to 4 ms of the raft thread. It runs at the lowest priority (nice
/// 19), so on a busy machine the freeing yields to the threads serving requests
/// instead of taking a core from them for tens of milliseconds at once.
pub(crate) fn off_thread(work: impl FnOnce() + Send + 'static) {
    use std::sync::mpsc::Sender;
    type Work = Box<dyn FnOnce() + Send>;
    static HELPER: std::sync::OnceLock<Option<Sender<Work>>> = std::sync::OnceLock::new();
    let helper = HELPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let spawned = std::thread::Builder::new()
            .name("raft-log-drop".into())
            .spawn(move || {
                // SAFETY: setpriority(2) only reads its arguments; on Linux, who = 0
                // with PRIO_PROCESS names the calling thread.
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
                    tracing::debug!("could not lower the log helper's priority");
                }
                rx.into_iter().for_each(|work| work())
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "no helper thread: freeing truncated logs inline");
                None
            }
        }
    });
    let work: Work = Box::new(work);
    // Without a helper (or if it is gone), the work runs here.
    match helper {
        Some(tx) => {
            if let Err(unsent) = tx.send(work) {
                (unsent.0)();
            }
        }
        None => work(),
    }
}

pub use node::{Bootstrap, PeerProgress, RaftConfig, RaftNode, RaftStatus, StateObserver};
pub use transport::{NoPeers, PeerTransport, Transport};
