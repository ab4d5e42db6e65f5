//! A write transaction: the changes of one applied request.
//!
//! All changes of a request share main revision `begin + 1` and get sub revisions
//! 0, 1, 2, ... in the order they are made. Until [`WriteTxn::commit`], changes live in
//! an overlay that the transaction's own reads see, so the operations of a Txn observe
//! the writes made before them, as in etcd. A request that makes no change does not
//! advance the revision.
//!
//! Only the apply loop creates write transactions, one at a time: it is the store's
//! single writer, so reading RocksDB directly (without a snapshot) is consistent here,
//! and so is reading its cache of hot keys ([`super::hot`]). A transaction in an apply
//! round ([`super::round`]) reads, in order: its own overlay, the round's (what the
//! round's earlier entries wrote, not yet in the engine), the hot-key cache, the engine.

use std::collections::{BTreeMap, HashMap};

use rocksdb::{ReadOptions, WriteBatch};

use pontoon_proto::mvccpb::KeyValue;

use super::hot::HotKey;
use super::key_index::KeyIndex;
use super::lease::attachment_key;
use super::revision::Revision;
use super::round::Overlay;
use super::span::KeySpan;
use super::view::{get_kv_db, load_older, scan_index_db, ReadView};
use super::{encode_record, MvccStore, CF_INDEX, CF_LEASE, CF_REV};
use crate::error::{Error, Result};

/// One change made by a write transaction, in order. Watchers will be fed from these.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub rev: Revision,
    /// For a put, the new key-value; for a delete, the key with `mod_revision` set to
    /// the deletion revision (etcd's tombstone shape).
    pub kv: KeyValue,
    pub tombstone: bool,
    /// The key's value before this change, if it existed (a watcher's `prev_kv`).
    pub prev: Option<KeyValue>,
}

pub struct WriteTxn<'a> {
    store: &'a MvccStore,
    /// The writes of the apply round this transaction belongs to, if any.
    round: Option<&'a Overlay>,
    begin: i64,
    changes: Vec<Change>,
    index: BTreeMap<Vec<u8>, KeyIndex>,
    kvs: HashMap<Revision, KeyValue>,
    /// Lease attachment entries to write (true) or delete (false).
    attachments: BTreeMap<Vec<u8>, bool>,
    dropped_leases: Vec<i64>,
}

impl<'a> WriteTxn<'a> {
    /// A transaction applied alone: the engine holds everything before it.
    pub fn new(store: &'a MvccStore) -> Self {
        Self::in_round(store, None, store.current_revision())
    }

    /// A transaction after the writes in `round`, which leave the store at revision
    /// `begin`.
    pub fn in_round(store: &'a MvccStore, round: Option<&'a Overlay>, begin: i64) -> Self {
        WriteTxn {
            store,
            round,
            begin,
            changes: Vec::new(),
            index: BTreeMap::new(),
            kvs: HashMap::new(),
            attachments: BTreeMap::new(),
            dropped_leases: Vec::new(),
        }
    }

    /// The revision this transaction's reads see: its begin revision, or the revision
    /// it is writing once it has made a change.
    pub fn read_revision(&self) -> i64 {
        if self.changes.is_empty() {
            self.begin
        } else {
            self.begin + 1
        }
    }

    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    fn next_revision(&self) -> Revision {
        Revision::new(self.begin + 1, self.changes.len() as i64)
    }

    /// The value `key` was given at `rev`: from this transaction, the hot-key cache or
    /// the engine.
    fn value(&self, key: &[u8], rev: Revision) -> Result<KeyValue> {
        if let Some(kv) = self.kvs.get(&rev) {
            return Ok(kv.clone());
        }
        if let Some(kv) = self.round.and_then(|r| r.kvs.get(&rev)) {
            return Ok(kv.clone());
        }
        if let Some(kv) = self.store.hot().value(key, rev) {
            return Ok(kv.clone());
        }
        get_kv_db(self.store, &ReadOptions::default(), rev)
    }

    /// The key's current value as this transaction sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        match self.get_index(key)? {
            Some(ki) => match ki.visible_at(self.read_revision()) {
                Some(rev) => Ok(Some(self.value(key, rev)?)),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Writes `key`, returning the previous value if the key existed. A `None` value
    /// or lease keeps the key's current one (etcd's `ignore_value` / `ignore_lease`),
    /// which fails with `KeyNotFound` if the key does not exist. One index read and
    /// one value read: this is the hot path of every Put.
    pub fn put(
        &mut self,
        key: &[u8],
        value: Option<Vec<u8>>,
        lease: Option<i64>,
    ) -> Result<Option<KeyValue>> {
        let mut ki = self.get_index(key)?.unwrap_or_default();
        let prev = match ki.visible_at(self.read_revision()) {
            Some(rev) => Some(self.value(key, rev)?),
            None => None,
        };
        let (value, lease) = match (&prev, value, lease) {
            (_, Some(value), Some(lease)) => (value, lease),
            (None, _, _) => return Err(Error::KeyNotFound),
            (Some(p), value, lease) => (
                value.unwrap_or_else(|| p.value.clone()),
                lease.unwrap_or(p.lease),
            ),
        };
        let rev = self.next_revision();
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: prev.as_ref().map_or(rev.main, |p| p.create_revision),
            mod_revision: rev.main,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            if old_lease != 0 {
                self.attachments
                    .insert(attachment_key(old_lease, key), false);
            }
            if lease != 0 {
                self.attachments.insert(attachment_key(lease, key), true);
            }
        }
        ki.put(rev);
        self.index.insert(key.to_vec(), ki);
        self.kvs.insert(rev, kv.clone());
        self.changes.push(Change {
            rev,
            kv,
            tombstone: false,
            prev: prev.clone(),
        });
        Ok(prev)
    }

    /// Deletes every key in `span` that exists, returning their last values in key order.
    pub fn delete_range(&mut self, span: &KeySpan) -> Result<Vec<KeyValue>> {
        let at = self.read_revision();
        let mut victims = Vec::new();
        self.scan_index(span, at, &mut |key, ki| {
            if let Some(rev) = ki.visible_at(at) {
                victims.push((key.to_vec(), ki.clone(), rev));
            }
            Ok(true)
        })?;
        let mut prevs = Vec::with_capacity(victims.len());
        for (key, mut ki, rev) in victims {
            let prev = self.value(&key, rev)?;
            if prev.lease != 0 {
                self.attachments
                    .insert(attachment_key(prev.lease, &key), false);
            }
            prevs.push(prev.clone());
            let del = self.next_revision();
            ki.tombstone(del);
            let kv = KeyValue {
                key: key.clone(),
                mod_revision: del.main,
                ..Default::default()
            };
            self.index.insert(key, ki);
            self.kvs.insert(del, kv.clone());
            self.changes.push(Change {
                rev: del,
                kv,
                tombstone: true,
                prev: Some(prev),
            });
        }
        Ok(prevs)
    }

    /// True if lease `id` exists.
    pub fn lease_exists(&self, id: i64) -> Result<bool> {
        self.store.lease_exists(id)
    }

    /// Removes lease `id`'s record (its keys are deleted separately).
    pub fn drop_lease(&mut self, id: i64) {
        self.dropped_leases.push(id);
    }

    /// Adds the transaction's changes to `batch`; what the store records once the batch
    /// is written.
    pub fn commit(mut self, batch: &mut WriteBatch) -> Committed {
        let lease_cf = self.store.cf(CF_LEASE);
        for (k, attach) in &self.attachments {
            if *attach {
                batch.put_cf(lease_cf, k, []);
            } else {
                batch.delete_cf(lease_cf, k);
            }
        }
        for id in &self.dropped_leases {
            batch.delete_cf(lease_cf, id.to_be_bytes());
        }
        if self.changes.is_empty() {
            return Committed {
                revision: self.begin,
                changes: self.changes,
                hot: Vec::new(),
                sealed: false,
            };
        }
        let rev_cf = self.store.cf(CF_REV);
        for c in &self.changes {
            batch.put_cf(rev_cf, c.rev.encode(), encode_record(c.tombstone, &c.kv));
        }
        let revision = self.begin + 1;
        let mut hot = Vec::with_capacity(self.index.len());
        let mut sealed = false;
        for (key, index) in std::mem::take(&mut self.index) {
            // `index` is the key's head plus this transaction's changes (writes read
            // heads only, never a history loaded from chunks), so any chunk split off
            // here is older than the head and newer than every chunk stored.
            let (index, chunks) = self.store.put_index(batch, &key, index);
            sealed |= chunks;
            // Every key in the overlay was written here, so its current value (if it
            // is not deleted) is one of this transaction's.
            let state = match index.visible_at(revision) {
                None => Some(HotKey {
                    index,
                    latest: None,
                }),
                Some(rev) => self.kvs.remove(&rev).map(|kv| HotKey {
                    index,
                    latest: Some((rev, kv)),
                }),
            };
            hot.push((key, state));
        }
        Committed {
            revision,
            changes: self.changes,
            hot,
            sealed,
        }
    }
}

/// A committed write transaction.
pub struct Committed {
    /// The store revision after it (unchanged if nothing was written).
    pub revision: i64,
    pub changes: Vec<Change>,
    /// Each written key's state, for the hot-key cache once the batch is written.
    pub hot: Vec<(Vec<u8>, Option<HotKey>)>,
    /// Older changes of some key were sealed into `key_history` chunks in the batch:
    /// reads further back must wait until it is written.
    pub sealed: bool,
}

impl ReadView for WriteTxn<'_> {
    fn scan_index(
        &self,
        span: &KeySpan,
        at: i64,
        f: &mut dyn FnMut(&[u8], &KeyIndex) -> Result<bool>,
    ) -> Result<()> {
        let round = self.round.map(|r| &r.index).filter(|i| !i.is_empty());
        if self.index.is_empty() && round.is_none() {
            return scan_index_db(self.store, &ReadOptions::default, span, at, f);
        }
        // Merge the engine's keys with the overlays', the newest writer winning.
        let mut merged: BTreeMap<Vec<u8>, KeyIndex> = BTreeMap::new();
        scan_index_db(self.store, &ReadOptions::default, span, at, &mut |k, ki| {
            merged.insert(k.to_vec(), ki.clone());
            Ok(true)
        })?;
        for overlay in round.into_iter().chain([&self.index]) {
            for (k, ki) in overlay {
                if span.contains(k) {
                    merged.insert(k.clone(), ki.clone());
                }
            }
        }
        for (k, ki) in merged {
            // An overlay's index is a head; a round that sealed chunks was written
            // before the next entry ran (`mvcc::round`), so they are in the engine.
            let ki = if ki.covers(at) {
                ki
            } else {
                load_older(self.store, ReadOptions::default(), &k, ki)?
            };
            if !f(&k, &ki)? {
                break;
            }
        }
        Ok(())
    }

    fn get_index(&self, key: &[u8]) -> Result<Option<KeyIndex>> {
        if let Some(ki) = self.index.get(key) {
            return Ok(Some(ki.clone()));
        }
        if let Some(ki) = self.round.and_then(|r| r.index.get(key)) {
            return Ok(Some(ki.clone()));
        }
        if let Some(ki) = self.store.hot().index(key) {
            return Ok(Some(ki.clone()));
        }
        match self.store.db.get_pinned_cf(self.store.cf(CF_INDEX), key)? {
            Some(v) => Ok(Some(KeyIndex::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn get_kv(&self, rev: Revision) -> Result<KeyValue> {
        if let Some(kv) = self.kvs.get(&rev) {
            return Ok(kv.clone());
        }
        if let Some(kv) = self.round.and_then(|r| r.kvs.get(&rev)) {
            return Ok(kv.clone());
        }
        get_kv_db(self.store, &ReadOptions::default(), rev)
    }
}
