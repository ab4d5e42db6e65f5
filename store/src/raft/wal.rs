//! The raft write-ahead log: Pontoon's durable record of raft entries and hard state.
//!
//! A WAL is a directory of segment files `<seq as 16 hex digits>.wal`, read in
//! sequence order. Each segment is a sequence of records:
//!
//! ```text
//! | len: u32 LE | crc32: u32 LE | kind: u8 | payload: len - 1 bytes |
//! ```
//!
//! where the crc32 covers kind and payload. Kinds: an entry (raft-rs `Entry`), a hard
//! state (`HardState`), and a snapshot mark (`SnapshotMetadata`: the log starts after
//! this index; only first in a segment). Replaying records in order rebuilds the log:
//! an entry at index `i` replaces any entry at `>= i` (raft's log overwrite rule).
//!
//! Durability: [`Wal::sync`] flushes and fsyncs once for everything appended since the
//! last sync (group commit: the raft driver calls it once per Ready). A new segment is
//! fsynced together with its directory before older segments are removed.
//!
//! Recovery: damage (a record cut short, a bad length or checksum) at the end of the
//! last segment with no intact record after it is a write torn by a crash; it was
//! never synced, hence never acknowledged, and is truncated away. Damage followed by
//! an intact record, or in an older segment, is corruption and [`Wal::open`] refuses
//! to start.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ::raft::prelude::{Entry, HardState, SnapshotMetadata};
use protobuf::Message as _;

use crate::error::{Error, Result};

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const HEADER_LEN: usize = 9;
/// No record is larger than this; a larger length field is corruption or a torn write.
const MAX_RECORD: usize = 256 << 20;

/// What a WAL holds, as replayed at open.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WalState {
    pub snapshot: SnapshotMetadata,
    pub hard_state: HardState,
    pub entries: Vec<Entry>,
}

pub struct Wal {
    dir: PathBuf,
    seq: u64,
    out: BufWriter<File>,
    dirty: bool,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut segs = Vec::new();
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".wal") {
            let seq = u64::from_str_radix(hex, 16)
                .map_err(|_| Error::Corrupt(format!("unexpected WAL file {name}")))?;
            segs.push((seq, ent.path()));
        }
    }
    segs.sort();
    Ok(segs)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn encode_record(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = (payload.len() + 1) as u32;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

fn pb_bytes(m: &impl protobuf::Message) -> Vec<u8> {
    m.write_to_bytes()
        .expect("raft protobuf messages always encode")
}

impl Wal {
    /// True if `dir` holds a WAL.
    pub fn exists(dir: &Path) -> bool {
        segments(dir).map(|s| !s.is_empty()).unwrap_or(false)
    }

    /// Creates a new WAL in `dir` whose log starts after `snapshot`.
    pub fn create(dir: &Path, snapshot: &SnapshotMetadata, hs: &HardState) -> Result<Wal> {
        fs::create_dir_all(dir)?;
        if Wal::exists(dir) {
            return Err(Error::Config(format!(
                "{} already holds a WAL",
                dir.display()
            )));
        }
        let mut wal = Wal::new_segment(dir, 1)?;
        wal.write_base(snapshot, hs, &[])?;
        Ok(wal)
    }

    fn new_segment(dir: &Path, seq: u64) -> Result<Wal> {
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(dir.join(segment_name(seq)))?;
        Ok(Wal {
            dir: dir.to_path_buf(),
            seq,
            out: BufWriter::with_capacity(1 << 20, file),
            dirty: false,
        })
    }

    /// Writes a segment's opening records and makes the segment durable.
    fn write_base(
        &mut self,
        snap: &SnapshotMetadata,
        hs: &HardState,
        ents: &[Entry],
    ) -> Result<()> {
        let mut buf = Vec::new();
        encode_record(KIND_SNAPSHOT, &pb_bytes(snap), &mut buf);
        encode_record(KIND_HARD_STATE, &pb_bytes(hs), &mut buf);
        self.out.write_all(&buf)?;
        self.dirty = true;
        self.append(ents)?;
        self.sync()?;
        sync_dir(&self.dir)
    }

    /// Opens the WAL in `dir`, replaying it and truncating a torn tail.
    pub fn open(dir: &Path) -> Result<(Wal, WalState)> {
        let segs = segments(dir)?;
        let Some(&(last_seq, ref last_path)) = segs.last() else {
            return Err(Error::Config(format!("no WAL in {}", dir.display())));
        };
        let mut state = WalState::default();
        for (i, (_, path)) in segs.iter().enumerate() {
            let is_last = i + 1 == segs.len();
            replay_segment(path, is_last, &mut state)?;
        }
        let file = OpenOptions::new().append(true).open(last_path)?;
        let wal = Wal {
            dir: dir.to_path_buf(),
            seq: last_seq,
            out: BufWriter::with_capacity(1 << 20, file),
            dirty: false,
        };
        Ok((wal, state))
    }

    /// Appends entries (not yet durable: see [`Wal::sync`]).
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let mut buf = Vec::new();
        for e in entries {
            encode_record(KIND_ENTRY, &pb_bytes(e), &mut buf);
        }
        self.out.write_all(&buf)?;
        self.dirty |= !entries.is_empty();
        Ok(())
    }

    /// Records a new hard state (not yet durable: see [`Wal::sync`]).
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<()> {
        let mut buf = Vec::new();
        encode_record(KIND_HARD_STATE, &pb_bytes(hs), &mut buf);
        self.out.write_all(&buf)?;
        self.dirty = true;
        Ok(())
    }

    /// Makes everything appended so far durable: one write and one fsync.
    pub fn sync(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        crate::metrics::METRICS.wal_fsync.observe(started.elapsed());
        self.dirty = false;
        Ok(())
    }

    /// Replaces the WAL with one whose log starts after `snapshot` and holds `entries`:
    /// log truncation. The new segment is durable before older ones are removed, so a
    /// crash at any point leaves a complete log.
    pub fn rewrite(
        &mut self,
        snapshot: &SnapshotMetadata,
        hs: &HardState,
        entries: &[Entry],
    ) -> Result<()> {
        self.sync()?;
        let mut next = Wal::new_segment(&self.dir, self.seq + 1)?;
        next.write_base(snapshot, hs, entries)?;
        for (seq, path) in segments(&self.dir)? {
            if seq < next.seq {
                fs::remove_file(path)?;
            }
        }
        sync_dir(&self.dir)?;
        super::drop_off_thread(std::mem::replace(self, next));
        Ok(())
    }
}

fn replay_segment(path: &Path, is_last: bool, state: &mut WalState) -> Result<()> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut pos = 0usize;
    let name = path.display();
    while pos < data.len() {
        let rest = &data[pos..];
        let damaged = |why: &str| -> Result<()> {
            // Only the end of the last segment can hold a write torn by a crash, and
            // only if no intact record follows the damage.
            if is_last && !intact_record_after(&data, pos) {
                tracing::warn!(wal = %name, offset = pos, "truncating torn WAL tail: {why}");
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(pos as u64)?;
                f.sync_all()?;
                Ok(())
            } else {
                Err(Error::Corrupt(format!("WAL {name} at offset {pos}: {why}")))
            }
        };
        if rest.len() < HEADER_LEN {
            return damaged("record header cut short");
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_RECORD {
            return damaged(&format!("invalid record length {len}"));
        }
        if rest.len() < 8 + len {
            return damaged("record cut short");
        }
        let body = &rest[8..8 + len];
        if crc32fast::hash(body) != crc {
            return damaged("checksum mismatch");
        }
        let (kind, payload) = (body[0], &body[1..]);
        let bad =
            |e: protobuf::ProtobufError| Error::Corrupt(format!("WAL {name} at offset {pos}: {e}"));
        match kind {
            KIND_ENTRY => {
                let e = Entry::parse_from_bytes(payload).map_err(bad)?;
                push_entry(state, e)
                    .map_err(|why| Error::Corrupt(format!("WAL {name} at offset {pos}: {why}")))?;
            }
            KIND_HARD_STATE => {
                state.hard_state = HardState::parse_from_bytes(payload).map_err(bad)?
            }
            KIND_SNAPSHOT => {
                state.snapshot = SnapshotMetadata::parse_from_bytes(payload).map_err(bad)?;
                state.entries.retain(|e| e.index > state.snapshot.index);
                if state
                    .entries
                    .first()
                    .is_some_and(|e| e.index != state.snapshot.index + 1)
                {
                    state.entries.clear();
                }
            }
            other => {
                return Err(Error::Corrupt(format!(
                    "WAL {name} at offset {pos}: unknown record kind {other}"
                )))
            }
        }
        pos += 8 + len;
    }
    Ok(())
}

/// True if a record with a valid length and checksum starts anywhere after `pos`:
/// then the damage at `pos` is not a torn tail but corruption.
fn intact_record_after(data: &[u8], pos: usize) -> bool {
    (pos + 1..data.len().saturating_sub(HEADER_LEN - 1)).any(|off| {
        let rest = &data[off..];
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_RECORD || rest.len() < 8 + len {
            return false;
        }
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        rest[8] <= KIND_SNAPSHOT && crc32fast::hash(&rest[8..8 + len]) == crc
    })
}

fn push_entry(state: &mut WalState, e: Entry) -> std::result::Result<(), String> {
    let first = state.snapshot.index + 1;
    if e.index < first {
        return Ok(());
    }
    let expected = first + state.entries.len() as u64;
    if e.index > expected {
        return Err(format!(
            "entry {} leaves a gap after {}",
            e.index,
            expected - 1
        ));
    }
    state.entries.truncate((e.index - first) as usize);
    state.entries.push(e);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("data-{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn hs(term: u64, commit: u64) -> HardState {
        HardState {
            term,
            commit,
            ..Default::default()
        }
    }

    fn indexes(s: &WalState) -> Vec<(u64, u64)> {
        s.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn replays_entries_hard_state_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &SnapshotMetadata::default(), &hs(1, 0)).unwrap();
        wal.append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
            .unwrap();
        wal.set_hard_state(&hs(2, 2)).unwrap();
        // A new leader overwrites the uncommitted entry 3.
        wal.append(&[entry(3, 2), entry(4, 2)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(s.hard_state, hs(2, 2));
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &SnapshotMetadata::default(), &hs(1, 0)).unwrap();
        wal.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let full = fs::read(&path).unwrap();
        // Cut the last record in half: a write torn by a crash.
        fs::write(&path, &full[..full.len() - 5]).unwrap();
        let (mut wal, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1)]);
        wal.append(&[entry(2, 1), entry(3, 1)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 1), (3, 1)]);

        // A flipped bit in the last record is also a torn write.
        let full = fs::read(&path).unwrap();
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 2] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn corruption_in_the_middle_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &SnapshotMetadata::default(), &hs(1, 0)).unwrap();
        wal.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        wal.sync().unwrap();
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let before_last = fs::metadata(&path).unwrap().len() as usize;
        wal.append(&[entry(3, 1)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let good = fs::read(&path).unwrap();
        // Damage to any byte before the last record (length, checksum, kind or
        // payload of any record) is followed by an intact record: corruption.
        for at in 0..before_last {
            let mut data = good.clone();
            data[at] ^= 0xff;
            fs::write(&path, &data).unwrap();
            match Wal::open(dir.path()) {
                Err(Error::Corrupt(_)) => {}
                Err(e) => panic!("byte {at}: unexpected error {e}"),
                Ok(_) => panic!("byte {at}: corruption in the middle was accepted"),
            }
        }
    }

    #[test]
    fn rewrite_truncates_the_log_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(dir.path(), &SnapshotMetadata::default(), &hs(1, 0)).unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        wal.append(&ents).unwrap();
        wal.sync().unwrap();
        let snap = SnapshotMetadata {
            index: 7,
            term: 1,
            ..Default::default()
        };
        wal.rewrite(&snap, &hs(1, 10), &ents[7..]).unwrap();
        wal.append(&[entry(11, 1)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(s.snapshot.index, 7);
        assert_eq!(indexes(&s), vec![(8, 1), (9, 1), (10, 1), (11, 1)]);
        assert_eq!(s.hard_state.commit, 10);
    }
}
