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
//!
//! **Bounded records.** A key written often between compactions has a long history,
//! and the record is rewritten on every write: whole, that made a put cost
//! O(changes since the last compaction). So the record holds at most [`HEAD_MAX`]
//! changes, the newest; when a write would pass that, all but the newest
//! [`HEAD_KEEP`] are sealed into chunks in the `key_history` column family (see
//! [`history_key`]) and the record is marked as having older changes. A record read
//! from the `index` column family is then a *head*: it answers for revisions at or
//! after its first change ([`KeyIndex::covers`]), which is every write and every read
//! at the current revision; a read further back loads the chunks first (`mvcc::view`).
//!
//! The bound is small because the head is rewritten (read, decoded, encoded, and
//! written to the engine's memtable and WAL) on every put of its key, while a sealed
//! chunk is written once per `HEAD_MAX - HEAD_KEEP` puts. At 128 and 32 (before
//! session 11) a key written all day carried a record of 32 to 128 changes, about
//! 450 bytes per put, more than the revision record itself; at 32 and 8 it is 8 to 32
//! changes, and the apply thread's CPU per put at 256 clients (after 20 s of puts to
//! 10,000 keys) fell from 14.9 µs to 10.4–12.2 µs (16 and 4 measured no better).

use super::revision::Revision;
use crate::error::{Error, Result};

/// The most changes an index record holds. (Small in unit tests, so that their
/// random histories seal chunks often.)
pub const HEAD_MAX: usize = if cfg!(test) { 8 } else { 32 };
/// The changes a record keeps when older ones are sealed into chunks.
pub const HEAD_KEEP: usize = if cfg!(test) { 3 } else { 8 };
/// The most changes in one chunk of the `key_history` column family.
pub const CHUNK_MAX: usize = if cfg!(test) { 4 } else { 1024 };
/// Flag byte of the marker that opens a head with sealed older changes (changes use
/// 0 and 1).
const OLDER_MARKER: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub rev: Revision,
    pub tombstone: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyIndex {
    changes: Vec<Change>,
    /// Changes before the first of `changes` exist in `key_history` chunks.
    older: bool,
}

impl KeyIndex {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && !self.older
    }

    /// The changes held: all of them, or the newest if [`Self::has_older`].
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Whether older changes than those held are sealed in `key_history`.
    pub fn has_older(&self) -> bool {
        self.older
    }

    /// Whether the changes held answer [`Self::visible_at`]`(at)`.
    pub fn covers(&self, at: i64) -> bool {
        !self.older || self.changes.first().is_some_and(|c| c.rev.main <= at)
    }

    /// The whole history: `older` (the sealed chunks' changes, in order) then these.
    pub fn with_older(mut self, mut older: Vec<Change>) -> KeyIndex {
        older.append(&mut self.changes);
        KeyIndex {
            changes: older,
            older: false,
        }
    }

    /// What to store: the record (at most [`HEAD_MAX`] changes) and the chunks of
    /// older changes to add to `key_history` (each at most [`CHUNK_MAX`]), oldest
    /// first. Nothing to add while the record has room.
    pub fn split_for_storage(mut self) -> (KeyIndex, Vec<Vec<Change>>) {
        if self.changes.len() <= HEAD_MAX {
            return (self, Vec::new());
        }
        let kept = self.changes.split_off(self.changes.len() - HEAD_KEEP);
        let chunks = self
            .changes
            .chunks(CHUNK_MAX)
            .map(<[Change]>::to_vec)
            .collect();
        let head = KeyIndex {
            changes: kept,
            older: true,
        };
        (head, chunks)
    }

    /// The revision holding the key's value as of `at`, or `None` if the key did not
    /// exist then (never written, deleted, or its history compacted away). The
    /// changes held must cover `at` ([`Self::covers`]).
    pub fn visible_at(&self, at: i64) -> Option<Revision> {
        debug_assert!(self.covers(at), "a head read below its first change");
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
        debug_assert!(!self.older, "compaction works on the whole history");
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

    /// Wire format: per change, varint main, varint sub, one flag byte (0 put, 1
    /// tombstone); a head with sealed older changes opens with a marker `0, 0, 2`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.changes.len() * 8 + 3);
        if self.older {
            out.extend_from_slice(&[0, 0, OLDER_MARKER]);
        }
        encode_changes(&self.changes, &mut out);
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self> {
        let (older, buf) = match buf {
            [0, 0, OLDER_MARKER, rest @ ..] => (true, rest),
            _ => (false, buf),
        };
        let changes = decode_changes(buf)?;
        if older && changes.is_empty() {
            return Err(Error::Corrupt("key index head holds no change".into()));
        }
        Ok(KeyIndex { changes, older })
    }
}

/// Appends the wire form of `changes` (see [`KeyIndex::encode`]) to `out`; also the
/// form of a `key_history` chunk.
pub fn encode_changes(changes: &[Change], out: &mut Vec<u8>) {
    for c in changes {
        prost::encoding::encode_varint(c.rev.main as u64, out);
        prost::encoding::encode_varint(c.rev.sub as u64, out);
        out.push(c.tombstone as u8);
    }
}

pub fn decode_changes(mut buf: &[u8]) -> Result<Vec<Change>> {
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
    Ok(changes)
}

/// The prefix of every `key_history` record of `key`: the key with each 0x00 byte
/// written as 0x00 0xFF, then 0x00 0x01. No such prefix is a prefix of another key's,
/// so a key's chunks are exactly the records under its prefix, ordered by revision.
pub fn history_prefix(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + 2 + 16);
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 1]);
    out
}

/// The `key_history` record of the chunk of `key` whose first change is `first`.
pub fn history_key(key: &[u8], first: Revision) -> Vec<u8> {
    let mut out = history_prefix(key);
    out.extend_from_slice(&first.encode());
    out
}

/// The end (exclusive) of `key`'s records in `key_history`.
pub fn history_end(key: &[u8]) -> Vec<u8> {
    let mut out = history_prefix(key);
    *out.last_mut().expect("prefix ends 0x00 0x01") = 2;
    out
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

    fn puts(n: i64) -> KeyIndex {
        let mut ki = KeyIndex::default();
        for r in 1..=n {
            ki.put(Revision::new(r, 0));
        }
        ki
    }

    #[test]
    fn a_long_history_splits_into_a_head_and_chunks_that_join_back() {
        let small = puts(HEAD_MAX as i64);
        assert_eq!(small.clone().split_for_storage(), (small, Vec::new()));
        let full = puts(20);
        let (head, chunks) = full.clone().split_for_storage();
        assert!(head.has_older());
        assert_eq!(head.changes().len(), HEAD_KEEP);
        assert_eq!(head.changes()[0].rev.main, 20 - HEAD_KEEP as i64 + 1);
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= CHUNK_MAX));
        // The head answers at and after its first change only.
        assert!(head.covers(20) && head.covers(18) && !head.covers(17));
        assert_eq!(head.visible_at(19), Some(Revision::new(19, 0)));
        // Stored and read back: the marker survives, and the chunks rejoin in order.
        let stored = KeyIndex::decode(&head.encode()).unwrap();
        assert_eq!(stored, head);
        let older: Vec<Change> = chunks.into_iter().flatten().collect();
        let joined = stored.with_older(older);
        assert_eq!(joined, full);
        assert!(joined.covers(1));
        // A marker with nothing after it is corrupt.
        assert!(KeyIndex::decode(&[0, 0, 2]).is_err());
    }

    #[test]
    fn history_keys_group_each_key_and_order_by_revision() {
        let keys: [&[u8]; 5] = [b"a", b"a\x00", b"a\x00b", b"a\x01", b"ab"];
        let mut all = Vec::new();
        for k in keys {
            for r in [5, 300, 70_000] {
                all.push((history_key(k, Revision::new(r, 0)), k, r));
            }
        }
        all.sort();
        // Sorted, each key's records are contiguous and in revision order, and lie
        // within [prefix, end).
        for k in keys {
            let pos: Vec<usize> = (0..all.len()).filter(|&i| all[i].1 == k).collect();
            assert_eq!(pos, (pos[0]..pos[0] + 3).collect::<Vec<_>>(), "{k:?}");
            let revs: Vec<i64> = pos.iter().map(|&i| all[i].2).collect();
            assert_eq!(revs, [5, 300, 70_000]);
            for (rk, other, _) in &all {
                let inside = rk[..] >= history_prefix(k)[..] && rk[..] < history_end(k)[..];
                assert_eq!(inside, *other == k, "{rk:?} vs {k:?}");
            }
        }
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
