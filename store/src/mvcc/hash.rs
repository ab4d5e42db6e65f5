//! Consistency hashes, as etcd's Maintenance.Hash / HashKV: members that applied the
//! same log compute the same values, so a mismatch reveals a diverged member.
//!
//! - [`MvccStore::hash_kv`]: CRC-32 (IEEE, `crc32fast`) of every
//!   revision record in `compact_revision..=rev`, key and value, in revision order.
//!   It depends only on the history, not on when each member compacted its engine.
//! - [`MvccStore::hash_all`]: CRC-32 of every replicated record of every column family
//!   (this member's local records excluded), like etcd's whole-backend Hash.

use rocksdb::ReadOptions;

use super::revision::Revision;
use super::snapshot::LOCAL_META_KEYS;
use super::{MvccStore, CF_META, CF_REV, COLUMN_FAMILIES};
use crate::error::{Error, Result};

impl MvccStore {
    /// Returns `(hash, compact revision, hash revision)`; `rev` 0 means the current
    /// revision.
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64)> {
        let snap = self.db.snapshot();
        let current = self.current_revision();
        let compacted = self.compact_revision();
        let rev = if rev <= 0 { current } else { rev };
        if rev > current {
            return Err(Error::FutureRev);
        }
        if rev < compacted {
            return Err(Error::Compacted);
        }
        let mut opts = ReadOptions::default();
        opts.set_snapshot(&snap);
        opts.set_iterate_upper_bound(Revision::first_of(rev + 1).encode().to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_REV), opts);
        it.seek(Revision::first_of(compacted).encode());
        let mut h = crc32fast::Hasher::new();
        while it.valid() {
            h.update(it.key().expect("key"));
            h.update(it.value().expect("value"));
            it.next();
        }
        it.status()?;
        Ok((h.finalize(), compacted, rev))
    }

    pub fn hash_all(&self) -> Result<u32> {
        let snap = self.db.snapshot();
        let mut h = crc32fast::Hasher::new();
        for name in COLUMN_FAMILIES {
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&snap);
            let mut it = self.db.raw_iterator_cf_opt(self.cf(name), opts);
            it.seek_to_first();
            while it.valid() {
                let k = it.key().expect("key");
                if !(name == CF_META && LOCAL_META_KEYS.contains(&k)) {
                    h.update(k);
                    h.update(it.value().expect("value"));
                }
                it.next();
            }
            it.status()?;
        }
        Ok(h.finalize())
    }

    /// Bytes the engine uses on disk and in memtables (etcd's dbSize), and an estimate
    /// of the live data (dbSizeInUse).
    pub fn db_size(&self) -> (i64, i64) {
        let mut total = 0u64;
        let mut live = 0u64;
        for name in COLUMN_FAMILIES {
            let cf = self.cf(name);
            let prop = |p: &str| {
                self.db
                    .property_int_value_cf(cf, p)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            };
            let mem = prop("rocksdb.cur-size-all-mem-tables");
            total += prop("rocksdb.total-sst-files-size") + mem;
            live += prop("rocksdb.estimate-live-data-size") + mem;
        }
        (total as i64, live.min(total) as i64)
    }

    /// Online defragmentation: a full RocksDB compaction of every column family.
    /// Reads and writes continue meanwhile (etcd's defrag stops the world).
    pub fn defragment(&self) {
        for name in COLUMN_FAMILIES {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
    }
}
