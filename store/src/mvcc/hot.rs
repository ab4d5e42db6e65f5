//! The apply loop's cache of hot keys: the [`KeyIndex`] and current value of keys
//! written more than once, so that a write to such a key (lease renewals, status
//! updates, counters: most writes in a Kubernetes cluster) needs no RocksDB read. Without
//! it every Put makes two point reads (the key's index, then its previous value for the
//! version, create revision, lease and `prev_kv`), which measured a quarter of the apply
//! thread's CPU under load, mostly memtable skiplist searches. etcd keeps every key's
//! index in memory; this keeps only the hot ones, within a fixed budget.
//!
//! Invariants:
//!
//! - **Write-through.** An entry equals what RocksDB holds for its key after the last
//!   batch written: entries are recorded only after their batch is written
//!   ([`HotKeys::record`]), and if a write fails the cache is emptied.
//! - **Nothing else rewrites a cached key unseen.** Compaction (which trims indexes)
//!   and installing a snapshot (which replaces the key space) empty the cache.
//! - **Apply loop only.** Readers on other threads use RocksDB snapshots; the cache
//!   serves the single writer's own reads ([`super::write::WriteTxn`]).
//! - **Bounded.** At most [`BUDGET`] bytes (estimated). A key enters on its second
//!   write, so a bulk load of distinct keys caches nothing; when the budget is reached
//!   the cache is emptied and refills with the keys written again.

use std::collections::HashMap;

use pontoon_proto::mvccpb::KeyValue;

use super::key_index::KeyIndex;
use super::revision::Revision;

/// Estimated bytes the cache may hold.
pub const BUDGET: usize = 16 << 20;
/// Estimated bookkeeping per entry beyond the key, value and index (map slot, vectors).
const ENTRY_OVERHEAD: usize = 128;

/// A cached key.
#[derive(Clone, Debug, PartialEq)]
pub struct HotKey {
    pub index: KeyIndex,
    /// The key's value at the current revision and the revision that wrote it; `None`
    /// if the key is deleted.
    pub latest: Option<(Revision, KeyValue)>,
}

impl HotKey {
    fn cost(&self, key: &[u8]) -> usize {
        let value = self
            .latest
            .as_ref()
            .map_or(0, |(_, kv)| kv.key.len() + kv.value.len());
        key.len() + value + std::mem::size_of_val(self.index.changes()) + ENTRY_OVERHEAD
    }
}

#[derive(Default)]
pub struct HotKeys {
    map: HashMap<Vec<u8>, HotKey>,
    bytes: usize,
}

impl HotKeys {
    pub fn index(&self, key: &[u8]) -> Option<&KeyIndex> {
        self.map.get(key).map(|h| &h.index)
    }

    /// The key's value written at `rev`, if that is its cached current value.
    pub fn value(&self, key: &[u8], rev: Revision) -> Option<&KeyValue> {
        match &self.map.get(key)?.latest {
            Some((r, kv)) if *r == rev => Some(kv),
            _ => None,
        }
    }

    /// Records a key's state after a written batch: `None` if it is not known (the
    /// key is dropped from the cache). A key not cached yet enters once it has more
    /// than one change, i.e. on its second write.
    pub fn record(&mut self, key: Vec<u8>, state: Option<HotKey>) {
        let cached = match self.map.remove(&key) {
            Some(old) => {
                self.bytes -= old.cost(&key);
                true
            }
            None => false,
        };
        let Some(hot) = state else { return };
        if !cached && hot.index.changes().len() < 2 {
            return;
        }
        let cost = hot.cost(&key);
        if self.bytes + cost > BUDGET {
            self.clear();
        }
        self.bytes += cost;
        self.map.insert(key, hot);
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hot(revs: &[i64], value: &[u8]) -> HotKey {
        let mut index = KeyIndex::default();
        for r in revs {
            index.put(Revision::new(*r, 0));
        }
        let last = Revision::new(*revs.last().unwrap(), 0);
        HotKey {
            index,
            latest: Some((
                last,
                KeyValue {
                    key: b"k".to_vec(),
                    value: value.to_vec(),
                    mod_revision: last.main,
                    ..Default::default()
                },
            )),
        }
    }

    #[test]
    fn a_key_enters_on_its_second_write_and_serves_its_current_value_only() {
        let mut c = HotKeys::default();
        c.record(b"k".to_vec(), Some(hot(&[2], b"a")));
        assert!(c.index(b"k").is_none(), "one write: not hot");
        c.record(b"k".to_vec(), Some(hot(&[2, 3], b"b")));
        assert_eq!(c.index(b"k").unwrap().changes().len(), 2);
        assert_eq!(c.value(b"k", Revision::new(3, 0)).unwrap().value, b"b");
        assert!(
            c.value(b"k", Revision::new(2, 0)).is_none(),
            "an older value"
        );
        // Once cached, every later state is recorded, and an unknown one drops it.
        c.record(b"k".to_vec(), Some(hot(&[2, 3, 4], b"c")));
        assert_eq!(c.value(b"k", Revision::new(4, 0)).unwrap().value, b"c");
        c.record(b"k".to_vec(), None);
        assert!(c.is_empty());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn the_budget_empties_the_cache_and_the_accounting_stays_exact() {
        let mut c = HotKeys::default();
        let value = vec![7u8; 4096];
        let per_key = hot(&[1, 2], &value).cost(b"key-00000");
        let fit = BUDGET / per_key;
        for i in 0..fit {
            c.record(
                format!("key-{i:05}").into_bytes(),
                Some(hot(&[1, 2], &value)),
            );
        }
        assert_eq!(c.len(), fit);
        assert_eq!(c.bytes(), fit * per_key);
        // Replacing an entry re-counts it rather than adding to it.
        c.record(b"key-00000".to_vec(), Some(hot(&[1, 2], &value)));
        assert_eq!(c.bytes(), fit * per_key);
        c.record(b"key-99999".to_vec(), Some(hot(&[1, 2], &value)));
        assert_eq!(c.len(), 1, "over budget: emptied, then the new key");
        assert_eq!(c.bytes(), per_key);
    }
}
