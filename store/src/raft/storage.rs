//! The raft log as raft-rs sees it: [`::raft::Storage`] over the WAL.
//!
//! Entries since the last log truncation are kept in memory for raft-rs to read (as
//! etcd's MemoryStorage does) and every change is written to the [`Wal`] first; the
//! driver calls [`WalStorage::sync`] once per Ready before acknowledging anything.
//! The log starts after `snapshot` (index, term, membership): entry `i` lives at
//! `entries[i - snapshot.index - 1]`.
//!
//! Outgoing raft snapshots are produced asynchronously: when raft-rs asks for one and
//! none recent enough is ready, [`WalStorage::snapshot`] asks for a state-machine
//! snapshot file to be written (on another thread) and answers
//! `SnapshotTemporarilyUnavailable`; raft-rs asks again later and gets the file's
//! metadata, with the file's path as the snapshot data (the transport streams it).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ::raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use ::raft::{GetEntriesContext, RaftState, StorageError};

use super::wal::{Wal, WalState, SEGMENT_BYTES};
use crate::error::Result;

/// Asks for a state-machine snapshot file to be written; returns at once.
pub type RequestSnapshot = Arc<dyn Fn() + Send + Sync>;

pub struct WalStorage {
    wal: Wal,
    snapshot: SnapshotMetadata,
    hard_state: HardState,
    conf_state: ConfState,
    /// Membership after each conf change applied since `snapshot`, by entry index, so
    /// a log truncation records the membership as of the truncation point.
    conf_history: Vec<(u64, ConfState)>,
    /// A deque that keeps its capacity across truncations (see [`Self::reserve`]).
    entries: VecDeque<Entry>,
    /// The deque from before the last truncation, emptied on the helper thread and
    /// taken up again by the next truncation (see [`Self::compact`]).
    spare: Arc<Mutex<Option<VecDeque<Entry>>>>,
    /// The newest state-machine snapshot ready to send (data = its file path).
    outgoing: Option<Snapshot>,
    request_snapshot: Option<RequestSnapshot>,
}

impl WalStorage {
    /// Creates the log of a new member whose initial membership is `conf_state`.
    ///
    /// As etcd does, a new cluster's log starts with one committed conf change per
    /// initial member (term 1), carrying the member in its context, so every member
    /// (including ones that join later and replay the log) learns the membership from
    /// the log itself. `conf_state` is that same membership, effective at once.
    pub fn bootstrap(dir: &Path, conf_state: ConfState, initial: Vec<Entry>) -> Result<Self> {
        let mut snapshot = SnapshotMetadata::default();
        snapshot.set_conf_state(conf_state.clone());
        let hard_state = HardState::default();
        let wal = Wal::create(dir, &snapshot, &hard_state)?;
        let mut s = WalStorage {
            wal,
            snapshot,
            hard_state,
            conf_state,
            conf_history: Vec::new(),
            entries: VecDeque::new(),
            spare: Arc::default(),
            outgoing: None,
            request_snapshot: None,
        };
        if !initial.is_empty() {
            let n = initial.len() as u64;
            s.append(&initial)?;
            s.set_hard_state(HardState {
                term: 1,
                commit: n,
                ..Default::default()
            })?;
            s.sync()?;
        }
        Ok(s)
    }

    pub fn set_request_snapshot(&mut self, f: RequestSnapshot) {
        self.request_snapshot = Some(f);
    }

    /// Offers a written state-machine snapshot for sending; returns the file path of
    /// the snapshot it replaces, if any.
    pub fn set_outgoing(&mut self, snap: Snapshot) -> Option<Vec<u8>> {
        self.outgoing.replace(snap).map(|old| old.data.to_vec())
    }

    /// The local file holding a received snapshot (named by its index, see
    /// `RaftNode::incoming_snapshot_path`; set by the peer service).
    pub fn snapshot_path_for(&self, snap: &Snapshot) -> std::path::PathBuf {
        std::path::PathBuf::from(String::from_utf8_lossy(snap.get_data()).into_owned())
    }

    /// Index of the snapshot the log starts after.
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.index
    }

    /// Opens an existing log. Membership is the snapshot's, updated by the conf
    /// changes the driver re-applies while replaying committed entries.
    pub fn open(dir: &Path) -> Result<Self> {
        let (
            wal,
            WalState {
                snapshot,
                hard_state,
                entries,
            },
        ) = Wal::open(dir)?;
        Ok(WalStorage {
            wal,
            conf_state: snapshot.get_conf_state().clone(),
            snapshot,
            hard_state,
            conf_history: Vec::new(),
            entries: entries.into(),
            spare: Arc::default(),
            outgoing: None,
            request_snapshot: None,
        })
    }

    /// Makes room for `entries` in memory at once. The raft driver reserves what the
    /// log holds between two truncations, so appends never reallocate and copy the
    /// whole log (a growing `Vec` doubled and copied ~100,000 entries at a time, with
    /// fresh pages to fault in: 10–30 ms of the raft thread each time).
    pub fn reserve(&mut self, entries: usize) {
        self.entries
            .reserve(entries.saturating_sub(self.entries.len()));
    }

    pub fn first_index(&self) -> u64 {
        self.snapshot.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot.index + self.entries.len() as u64
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Records the membership after the conf change of entry `index`.
    pub fn set_conf_state(&mut self, index: u64, cs: ConfState) {
        self.conf_history.push((index, cs.clone()));
        self.conf_state = cs;
    }

    /// Replaces the whole log with a state-machine snapshot's position: the log now
    /// starts after `meta.index`, with `meta`'s membership.
    pub fn apply_snapshot(&mut self, meta: SnapshotMetadata) -> Result<()> {
        let mut hs = self.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.wal.rewrite(&meta, &hs, &[])?;
        self.entries.clear();
        self.conf_state = meta.get_conf_state().clone();
        self.conf_history.clear();
        self.hard_state = hs;
        self.snapshot = meta;
        Ok(())
    }

    /// Appends entries, replacing any at or after the first one's index.
    pub fn append(&mut self, ents: &[Entry]) -> Result<()> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        if first.index <= self.snapshot.index || first.index > self.last_index() + 1 {
            return Err(crate::Error::Raft(format!(
                "append at {} outside log ({}..={})",
                first.index,
                self.first_index(),
                self.last_index()
            )));
        }
        self.wal.append(ents)?;
        self.entries
            .truncate((first.index - self.first_index()) as usize);
        self.entries.extend(ents.iter().cloned());
        Ok(())
    }

    pub fn set_hard_state(&mut self, hs: HardState) -> Result<()> {
        if hs != self.hard_state {
            self.wal.set_hard_state(&hs)?;
            self.hard_state = hs;
        }
        Ok(())
    }

    /// Records the commit index learned after a Ready; made durable with the next sync.
    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(hs)
    }

    /// One fsync for everything written since the last one.
    pub fn sync(&mut self) -> Result<()> {
        self.wal.sync()
    }

    /// Drops entries up to and including `index`, which the state machine has made
    /// durable: a mark in the WAL (synced at once), then the removal of the segments
    /// it covers, and a new segment if the current one has grown past
    /// [`SEGMENT_BYTES`]. No entry is written again (see `raft::wal`).
    pub fn compact(&mut self, index: u64) -> Result<()> {
        if index <= self.snapshot.index || index > self.last_index() {
            return Ok(());
        }
        let cut = (index - self.first_index()) as usize;
        let term = self.entries[cut].term;
        // The kept tail moves to the spare deque, and the old one (with the entries
        // dropped) is emptied on the helper thread to be the next spare. Two deques
        // that trade places: a fresh one of the log's capacity (10+ MiB) cost 4-5 ms
        // of page faults here, and freeing the entries inline about as much.
        let capacity = self.entries.capacity();
        let spare = self.spare.lock().expect("spare log lock").take();
        let mut retained = spare
            .filter(|d| d.capacity() >= capacity)
            .unwrap_or_else(|| VecDeque::with_capacity(capacity));
        retained.extend(self.entries.drain(cut + 1..));
        let mut old = std::mem::replace(&mut self.entries, retained);
        let spare = self.spare.clone();
        super::off_thread(move || {
            old.clear();
            *spare.lock().expect("spare log lock") = Some(old);
        });
        let mut snap = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        // Membership as of `index`: the last conf change at or before it.
        let kept = self.conf_history.partition_point(|(i, _)| *i <= index);
        let cs = match kept {
            0 => self.snapshot.get_conf_state().clone(),
            n => self.conf_history[n - 1].1.clone(),
        };
        self.conf_history.drain(..kept);
        snap.set_conf_state(cs);
        self.wal.mark(&snap)?;
        // Segments may go only once the mark that covers them is durable.
        self.wal.sync()?;
        if self.wal.segment_bytes() >= SEGMENT_BYTES {
            self.wal.cut(&snap, &self.hard_state)?;
        }
        self.wal.release(index)?;
        self.snapshot = snap;
        Ok(())
    }
}

impl ::raft::Storage for WalStorage {
    fn initial_state(&self) -> ::raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> ::raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(::raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 {
            return Err(::raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first_index()) as usize;
        let hi = (high - self.first_index()) as usize;
        let mut ents: Vec<Entry> = self.entries.range(lo..hi).cloned().collect();
        ::raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> ::raft::Result<u64> {
        if idx == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if idx < self.first_index() {
            return Err(::raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(::raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first_index()) as usize].term)
    }

    fn first_index(&self) -> ::raft::Result<u64> {
        Ok(WalStorage::first_index(self))
    }

    fn last_index(&self) -> ::raft::Result<u64> {
        Ok(WalStorage::last_index(self))
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> ::raft::Result<Snapshot> {
        if let Some(s) = &self.outgoing {
            let index = s.get_metadata().index;
            // Usable if the follower can continue from our log right after it.
            if index >= request_index && index >= self.snapshot.index {
                return Ok(s.clone());
            }
        }
        if let Some(request) = &self.request_snapshot {
            request();
        }
        Err(::raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use ::raft::Storage as _;

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry {
            index,
            term: 1 + index / 5,
            data: format!("entry {index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn data(s: &WalStorage, lo: u64, hi: u64) -> Vec<Vec<u8>> {
        s.entries(lo, hi, None, GetEntriesContext::empty(false))
            .unwrap()
            .into_iter()
            .map(|e| e.data.to_vec())
            .collect()
    }

    /// Truncation keeps the entries after the cut, in memory (with the room reserved
    /// for the log) and in the WAL (the old log is freed on another thread).
    #[test]
    fn compaction_keeps_the_tail_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = WalStorage::bootstrap(dir.path(), ConfState::default(), Vec::new()).unwrap();
        s.reserve(64);
        s.append(&(1..=20).map(entry).collect::<Vec<_>>()).unwrap();
        s.sync().unwrap();
        s.compact(12).unwrap();
        // The reserved room survives truncation: appends do not reallocate.
        assert!(s.entries.capacity() >= 64, "{}", s.entries.capacity());
        assert_eq!((s.first_index(), s.last_index()), (13, 20));
        assert_eq!(s.term(12).unwrap(), entry(12).term);
        let want: Vec<Vec<u8>> = (13..=20).map(|i| entry(i).data.to_vec()).collect();
        assert_eq!(data(&s, 13, 21), want);
        assert!(s
            .entries(12, 14, None, GetEntriesContext::empty(false))
            .is_err());
        // Appends after the cut go on in the same segment.
        s.append(&[entry(21)]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = WalStorage::open(dir.path()).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (13, 21));
        assert_eq!(data(&s, 13, 22)[..8], want[..]);
    }

    /// A segment past [`SEGMENT_BYTES`] is closed at the next truncation and removed
    /// at the first truncation that covers all its entries.
    #[test]
    fn compaction_cuts_large_segments_and_removes_covered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let wal_files = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "wal")
                })
                .count()
        };
        let big = |index: u64| Entry {
            index,
            term: 1,
            data: vec![index as u8; 1 << 20].into(),
            ..Default::default()
        };
        let mut s = WalStorage::bootstrap(dir.path(), ConfState::default(), Vec::new()).unwrap();
        let per_segment = SEGMENT_BYTES >> 20;
        s.append(&(1..=per_segment + 2).map(big).collect::<Vec<_>>())
            .unwrap();
        s.sync().unwrap();
        s.compact(10).unwrap();
        assert_eq!(wal_files(), 2, "the full segment was closed");
        s.append(&[big(per_segment + 3)]).unwrap();
        s.sync().unwrap();
        s.compact(per_segment + 1).unwrap();
        assert_eq!(
            wal_files(),
            2,
            "the closed segment still holds a needed entry"
        );
        s.compact(per_segment + 2).unwrap();
        assert_eq!(wal_files(), 1, "covered: removed");
        drop(s);
        let s = WalStorage::open(dir.path()).unwrap();
        assert_eq!(
            (s.first_index(), s.last_index()),
            (per_segment + 3, per_segment + 3)
        );
        assert_eq!(
            data(&s, per_segment + 3, per_segment + 4),
            vec![big(per_segment + 3).data.to_vec()]
        );
    }
}
