//! Read access to the key space at a fixed point in the apply sequence.
//!
//! Reads run against a [`ReadView`]: either a RocksDB snapshot ([`SnapView`], for Range
//! requests served concurrently with apply), or a write transaction's own view
//! (`WriteTxn`, so that the operations of a Txn see the writes made before them).
//! Range, compare and delete logic is written once against this trait.

use rocksdb::{ReadOptions, SnapshotWithThreadMode, DB};

use super::key_index::{decode_changes, history_end, history_prefix, KeyIndex};
use super::revision::Revision;
use super::span::KeySpan;
use super::{decode_record, MvccStore, CF_HISTORY, CF_INDEX, CF_REV};
use crate::error::{Error, Result};
use pontoon_proto::mvccpb::KeyValue;

pub trait ReadView {
    /// Calls `f` for every key in `span` that has an index entry, in key order, until
    /// `f` returns `false`. Each index covers revision `at` ([`KeyIndex::covers`]):
    /// older changes are loaded from `key_history` where `at` needs them.
    fn scan_index(
        &self,
        span: &KeySpan,
        at: i64,
        f: &mut dyn FnMut(&[u8], &KeyIndex) -> Result<bool>,
    ) -> Result<()>;

    /// The index record of one key: its newest changes, which cover the current
    /// revision (see `mvcc::key_index`, "Bounded records").
    fn get_index(&self, key: &[u8]) -> Result<Option<KeyIndex>>;

    /// The record written at `rev`. A revision named by a key index must exist: a
    /// missing one is corruption.
    fn get_kv(&self, rev: Revision) -> Result<KeyValue>;
}

/// A consistent read view over a RocksDB snapshot.
pub struct SnapView<'a> {
    store: &'a MvccStore,
    snap: SnapshotWithThreadMode<'a, DB>,
}

impl<'a> SnapView<'a> {
    pub fn new(store: &'a MvccStore) -> Self {
        SnapView {
            store,
            snap: store.db.snapshot(),
        }
    }

    fn read_opts(&self) -> ReadOptions {
        let mut o = ReadOptions::default();
        o.set_snapshot(&self.snap);
        o
    }
}

impl ReadView for SnapView<'_> {
    fn scan_index(
        &self,
        span: &KeySpan,
        at: i64,
        f: &mut dyn FnMut(&[u8], &KeyIndex) -> Result<bool>,
    ) -> Result<()> {
        scan_index_db(self.store, &|| self.read_opts(), span, at, f)
    }

    fn get_index(&self, key: &[u8]) -> Result<Option<KeyIndex>> {
        let cf = self.store.cf(CF_INDEX);
        match self
            .store
            .db
            .get_pinned_cf_opt(cf, key, &self.read_opts())?
        {
            Some(v) => Ok(Some(KeyIndex::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn get_kv(&self, rev: Revision) -> Result<KeyValue> {
        get_kv_db(self.store, &self.read_opts(), rev)
    }
}

/// [`ReadView::scan_index`] over the engine; `opts` makes the read options (the same
/// snapshot each time).
pub(super) fn scan_index_db(
    store: &MvccStore,
    opts: &dyn Fn() -> ReadOptions,
    span: &KeySpan,
    at: i64,
    f: &mut dyn FnMut(&[u8], &KeyIndex) -> Result<bool>,
) -> Result<()> {
    if span.is_empty() {
        return Ok(());
    }
    let mut o = opts();
    if let Some(end) = span.iter_end() {
        o.set_iterate_upper_bound(end);
    }
    let mut it = store.db.raw_iterator_cf_opt(store.cf(CF_INDEX), o);
    it.seek(span.start());
    while it.valid() {
        let (k, v) = (
            it.key().expect("valid iterator has a key"),
            it.value().expect("valid iterator has a value"),
        );
        let mut ki = KeyIndex::decode(v)?;
        if !ki.covers(at) {
            ki = load_older(store, opts(), k, ki)?;
        }
        if !f(k, &ki)? {
            return Ok(());
        }
        it.next();
    }
    it.status()?;
    Ok(())
}

/// The whole history of `key`: its sealed chunks from `key_history`, then `head`.
pub(super) fn load_older(
    store: &MvccStore,
    mut opts: ReadOptions,
    key: &[u8],
    head: KeyIndex,
) -> Result<KeyIndex> {
    if !head.has_older() {
        return Ok(head);
    }
    opts.set_iterate_upper_bound(history_end(key));
    let mut it = store.db.raw_iterator_cf_opt(store.cf(CF_HISTORY), opts);
    it.seek(history_prefix(key));
    let mut older = Vec::new();
    while it.valid() {
        older.extend(decode_changes(
            it.value().expect("valid iterator has a value"),
        )?);
        it.next();
    }
    it.status()?;
    if older.is_empty() {
        return Err(Error::Corrupt(format!(
            "key index of {:?} names older changes that key_history lacks",
            String::from_utf8_lossy(key)
        )));
    }
    Ok(head.with_older(older))
}

pub(super) fn get_kv_db(store: &MvccStore, opts: &ReadOptions, rev: Revision) -> Result<KeyValue> {
    match store
        .db
        .get_pinned_cf_opt(store.cf(CF_REV), rev.encode(), opts)?
    {
        Some(v) => Ok(decode_record(&v)?.1),
        None => Err(Error::Corrupt(format!(
            "revision {}.{} named by the key index is missing",
            rev.main, rev.sub
        ))),
    }
}
