//! Reading the change history back: what watchers catch up from.
//!
//! The `rev` column family holds every change in revision order, so the changes in a
//! window of revisions are one iteration. A delete is a tombstone record carrying the
//! key; the value a change replaced (`prev_kv`) is found through the key's index.

use rocksdb::ReadOptions;

use super::key_index::KeyIndex;
use super::revision::Revision;
use super::view::get_kv_db;
use super::write::Change;
use super::{decode_record, MvccStore, CF_INDEX, CF_REV};
use crate::error::{Error, Result};

impl MvccStore {
    /// The changes with main revision in `from..=to`, in revision order. Stops early,
    /// at a revision boundary, once at least `max` changes are collected; returns the
    /// changes and the last main revision covered. Fails with `Compacted` if history
    /// before `from` is gone (`from` below the compacted revision).
    pub fn changes_between(
        &self,
        from: i64,
        to: i64,
        max: usize,
        with_prev: bool,
    ) -> Result<(Vec<Change>, i64)> {
        let snap = self.db.snapshot();
        if from < self.compact_revision() {
            return Err(Error::Compacted);
        }
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        opts.set_iterate_upper_bound(Revision::first_of(to + 1).encode().to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_REV), opts);
        it.seek(Revision::first_of(from).encode());
        let mut changes: Vec<Change> = Vec::new();
        let mut covered = to;
        while it.valid() {
            let rev = Revision::decode(it.key().expect("valid iterator has a key"))?;
            if changes.len() >= max && changes.last().is_some_and(|c| c.rev.main != rev.main) {
                covered = rev.main - 1;
                break;
            }
            let (tombstone, kv) = decode_record(it.value().expect("valid iterator has a value"))?;
            changes.push(Change {
                rev,
                kv,
                tombstone,
                prev: None,
            });
            it.next();
        }
        it.status()?;
        if with_prev {
            for c in &mut changes {
                c.prev = self.prev_kv(&snap, &c.kv.key, c.rev)?;
            }
        }
        Ok((changes, covered))
    }

    /// The key's value just before revision `rev`, if it existed then.
    fn prev_kv(
        &self,
        snap: &rocksdb::SnapshotWithThreadMode<'_, rocksdb::DB>,
        key: &[u8],
        rev: Revision,
    ) -> Result<Option<pontoon_proto::mvccpb::KeyValue>> {
        let ro = || {
            let mut o = ReadOptions::default();
            o.set_snapshot(snap);
            o
        };
        let Some(raw) = self.db.get_pinned_cf_opt(self.cf(CF_INDEX), key, &ro())? else {
            return Ok(None);
        };
        let mut ki = KeyIndex::decode(&raw)?;
        drop(raw);
        if ki.has_older() && ki.changes().first().is_none_or(|c| c.rev >= rev) {
            ki = super::view::load_older(self, ro(), key, ki)?;
        }
        let before = ki.changes().iter().take_while(|c| c.rev < rev).last();
        match before {
            Some(c) if !c.tombstone => Ok(Some(get_kv_db(self, &ro(), c.rev)?)),
            _ => Ok(None),
        }
    }
}
