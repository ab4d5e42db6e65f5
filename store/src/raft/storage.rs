//! The raft log as raft-rs sees it: [`::raft::Storage`] over the WAL.
//!
//! Entries since the last log truncation are kept in memory for raft-rs to read (as
//! etcd's MemoryStorage does) and every change is written to the [`Wal`] first; the
//! driver calls [`WalStorage::sync`] once per Ready before acknowledging anything.
//! The log starts after `snapshot` (index, term, membership): entry `i` lives at
//! `entries[i - snapshot.index - 1]`.

use std::path::Path;

use ::raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use ::raft::{GetEntriesContext, RaftState, StorageError};

use super::wal::{Wal, WalState};
use crate::error::Result;

pub struct WalStorage {
    wal: Wal,
    snapshot: SnapshotMetadata,
    hard_state: HardState,
    conf_state: ConfState,
    entries: Vec<Entry>,
}

impl WalStorage {
    /// Creates the log of a new member whose initial membership is `conf_state`.
    pub fn bootstrap(dir: &Path, conf_state: ConfState) -> Result<Self> {
        let mut snapshot = SnapshotMetadata::default();
        snapshot.set_conf_state(conf_state.clone());
        let hard_state = HardState::default();
        let wal = Wal::create(dir, &snapshot, &hard_state)?;
        Ok(WalStorage {
            wal,
            snapshot,
            hard_state,
            conf_state,
            entries: Vec::new(),
        })
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
            entries,
        })
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

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
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
        self.entries.extend_from_slice(ents);
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
    /// durable, and rewrites the WAL without them.
    pub fn compact(&mut self, index: u64) -> Result<()> {
        if index <= self.snapshot.index || index > self.last_index() {
            return Ok(());
        }
        let term = self.entries[(index - self.first_index()) as usize].term;
        self.entries.drain(..=(index - self.first_index()) as usize);
        let mut snap = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        snap.set_conf_state(self.conf_state.clone());
        self.wal.rewrite(&snap, &self.hard_state, &self.entries)?;
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
        let mut ents = self.entries[lo..hi].to_vec();
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

    fn snapshot(&self, _request_index: u64, _to: u64) -> ::raft::Result<Snapshot> {
        // Sending state-machine snapshots to lagging followers comes with multi-member
        // clusters; a single member never needs one.
        Err(::raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}
