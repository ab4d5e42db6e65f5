//! The history of one key: which revisions wrote it and which deleted it.
//!
//! A [`KeyIndex`] is stored in the `index` column family under the raw user key, so a
//! range scan over user keys is a plain RocksDB iteration and nothing proportional to
//! the number of keys is held in memory or rebuilt on restart.
//!
//! It is the list of the key's changes in revision order, each a put or a tombstone.
//! A tombstone ends a *generation* of the key (etcd's term); the next put starts a new
//! one. For example, after
//!
//! ```text
//! put foo @2, put foo @3, delete foo @4, put foo @6
//! ```
//!
//! the index holds `[2 put, 3 put, 4 tombstone, 6 put]`: at revision 3 the key is the
//! value written at 3, at revision 5 it does not exist, at 6 and later it is the value
//! written at 6.
//!
//! Compaction at revision `c` keeps, of the changes at or below `c`, only the newest,
//! and only if it is a put (it is still the key's value at `c`) or a tombstone made
//! exactly at `c` (a watcher starting at `c` must still see it); newer changes stay.
//! Compacting the example at 5 leaves `[6 put]`; at 3 it leaves `[3 put, 4 tombstone,
//! 6 put]`.

use super::revision::Revision;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub rev: Revision,
    pub tombstone: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyIndex {
    changes: Vec<Change>,
}

impl KeyIndex {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// The revision holding the key's value as of `at`, or `None` if the key did not
    /// exist then (never written, deleted, or its history compacted away).
    pub fn visible_at(&self, at: i64) -> Option<Revision> {
        let idx = self.changes.partition_point(|c| c.rev.main <= at);
        if idx == 0 {
            return None;
        }
        let c = self.changes[idx - 1];
        (!c.tombstone).then_some(c.rev)
    }

    /// Records a put. Revisions must only grow.
    pub fn put(&mut self, rev: Revision) {
        debug_assert!(self.changes.last().is_none_or(|c| c.rev < rev));
        self.changes.push(Change {
            rev,
            tombstone: false,
        });
    }

    /// Records a delete of a key that currently exists.
    pub fn tombstone(&mut self, rev: Revision) {
        debug_assert!(self
            .changes
            .last()
            .is_some_and(|c| !c.tombstone && c.rev < rev));
        self.changes.push(Change {
            rev,
            tombstone: true,
        });
    }

    /// Compacts the history at main revision `at` (see the module note) and returns the
    /// revisions whose records are no longer reachable and may be deleted.
    pub fn compact(&mut self, at: i64) -> Vec<Revision> {
        let upto = self.changes.partition_point(|c| c.rev.main <= at);
        if upto == 0 {
            return Vec::new();
        }
        let newest = self.changes[upto - 1];
        // A tombstone exactly at `at` stays until a later compaction: a watcher may
        // start at the compacted revision and must see that delete.
        let keep_newest = !newest.tombstone || newest.rev.main == at;
        let drop_count = if keep_newest { upto - 1 } else { upto };
        self.changes.drain(..drop_count).map(|c| c.rev).collect()
    }

    /// Wire format: per change, varint main, varint sub, one flag byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.changes.len() * 8);
        for c in &self.changes {
            prost::encoding::encode_varint(c.rev.main as u64, &mut out);
            prost::encoding::encode_varint(c.rev.sub as u64, &mut out);
            out.push(c.tombstone as u8);
        }
        out
    }

    pub fn decode(mut buf: &[u8]) -> Result<Self> {
        let mut changes = Vec::new();
        while !buf.is_empty() {
            let main = prost::encoding::decode_varint(&mut buf)? as i64;
            let sub = prost::encoding::decode_varint(&mut buf)? as i64;
            let (&flag, rest) = buf
                .split_first()
                .ok_or_else(|| Error::Corrupt("key index record cut short".into()))?;
            buf = rest;
            if flag > 1 {
                return Err(Error::Corrupt(format!("key index flag {flag}")));
            }
            changes.push(Change {
                rev: Revision::new(main, sub),
                tombstone: flag == 1,
            });
        }
        Ok(KeyIndex { changes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> KeyIndex {
        let mut ki = KeyIndex::default();
        ki.put(Revision::new(2, 0));
        ki.put(Revision::new(3, 0));
        ki.tombstone(Revision::new(4, 0));
        ki.put(Revision::new(6, 1));
        ki
    }

    #[test]
    fn visibility_follows_generations() {
        let ki = example();
        assert_eq!(ki.visible_at(1), None);
        assert_eq!(ki.visible_at(2), Some(Revision::new(2, 0)));
        assert_eq!(ki.visible_at(3), Some(Revision::new(3, 0)));
        assert_eq!(ki.visible_at(4), None);
        assert_eq!(ki.visible_at(5), None);
        assert_eq!(ki.visible_at(6), Some(Revision::new(6, 1)));
        assert_eq!(ki.visible_at(100), Some(Revision::new(6, 1)));
    }

    #[test]
    fn compaction_keeps_the_value_visible_at_the_compacted_revision() {
        let mut ki = example();
        assert_eq!(ki.compact(1), vec![]);
        assert_eq!(ki.compact(3), vec![Revision::new(2, 0)]);
        assert_eq!(ki.visible_at(3), Some(Revision::new(3, 0)));
        // The tombstone at 4 is the newest change at 5: it and the put before it go.
        assert_eq!(
            ki.compact(5),
            vec![Revision::new(3, 0), Revision::new(4, 0)]
        );
        assert_eq!(ki.changes().len(), 1);
        assert_eq!(ki.compact(9), vec![]);
        assert_eq!(ki.visible_at(9), Some(Revision::new(6, 1)));
    }

    #[test]
    fn compaction_of_a_deleted_key_empties_it() {
        let mut ki = KeyIndex::default();
        ki.put(Revision::new(2, 0));
        ki.tombstone(Revision::new(3, 0));
        // At the deletion revision itself the tombstone stays, for watchers.
        assert_eq!(ki.compact(3), vec![Revision::new(2, 0)]);
        assert_eq!(ki.visible_at(3), None);
        assert_eq!(ki.compact(4), vec![Revision::new(3, 0)]);
        assert!(ki.is_empty());
    }

    #[test]
    fn encoding_round_trips_and_rejects_garbage() {
        let ki = example();
        assert_eq!(KeyIndex::decode(&ki.encode()).unwrap(), ki);
        assert_eq!(KeyIndex::decode(&[]).unwrap(), KeyIndex::default());
        assert!(KeyIndex::decode(&[2, 0]).is_err());
        assert!(KeyIndex::decode(&[2, 0, 7]).is_err());
    }
}
