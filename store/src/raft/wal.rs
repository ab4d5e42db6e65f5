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
//! this index). Replaying records in order rebuilds the log: an entry at index `i`
//! replaces any entry at `>= i` (raft's log overwrite rule), and a mark drops the
//! entries at or before its index.
//!
//! Durability: [`Wal::sync`] flushes and fsyncs once for everything appended since the
//! last sync (group commit: the raft driver calls it once per Ready). A new segment is
//! fsynced together with its directory before anything is appended to it.
//!
//! Truncation writes no entry twice. [`Wal::mark`] appends a mark to the current
//! segment; once the mark is synced, [`Wal::release`] removes the closed segments
//! whose entries it covers. [`Wal::cut`] closes a segment that has grown past
//! [`SEGMENT_BYTES`] and starts the next with the latest mark and hard state, so
//! released segments free the disk (etcd also cuts 64 MB segments and purges old
//! ones). Each segment opens with a mark, but after older segments are released a
//! segment's first entries can lie well past its opening mark: the entries in between
//! were in the released segments, and a later mark in the WAL covers them. Replay
//! therefore accepts a gap in the entries when a later mark covers it and refuses to
//! open a WAL whose gap no mark covers (a segment lost). Before this scheme, each
//! truncation rewrote the kept entries (5,000) into a new segment and fsynced it on
//! the raft thread: 7–25 ms during which no proposal was taken (the fixed-rate put
//! tail in bench/README.md, session 11). A whole-log replacement by a received
//! snapshot still goes through [`Wal::rewrite`].
//!
//! Preallocation: a segment's file is extended [`PREALLOCATE_BYTES`] at a time with
//! `fallocate(2)`, ahead of the records written into it, so most syncs only write
//! data: appending past the end of a file makes every `fdatasync` also commit the new
//! file size through the filesystem journal (measured on this project's ext4 machines:
//! a quarter less time per sync preallocated; etcd preallocates its segments too).
//! The records therefore end before the file does: the allocated rest reads as zeros,
//! and a segment's records end where the rest of the file is all zeros. Preallocation
//! is only a speed-up: where the filesystem cannot do it, records extend the file.
//!
//! Recovery: damage (a record cut short, a bad length or checksum) at the end of the
//! last segment with no intact record after it is a write torn by a crash; it was
//! never synced, hence never acknowledged, and is truncated away. Damage followed by
//! an intact record, or in an older segment, is corruption and [`Wal::open`] refuses
//! to start. Zeros to the end of a segment are its unwritten, preallocated rest, not
//! damage.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
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
/// A segment's file grows by this much at a time, ahead of its records.
pub const PREALLOCATE_BYTES: u64 = 16 << 20;
/// A segment holding this many bytes of records is closed at the next truncation
/// ([`Wal::cut`]); etcd's segments are 64 MB.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// What a WAL holds, as replayed at open.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WalState {
    pub snapshot: SnapshotMetadata,
    pub hard_state: HardState,
    pub entries: Vec<Entry>,
}

/// Replay's progress through the segments: the state so far, and whether entries are
/// missing after the last mark (left by released segments until a later mark covers
/// them).
#[derive(Default)]
struct Replay {
    state: WalState,
    gap: bool,
}

/// What replaying one segment found.
struct SegmentEnd {
    /// Where its records end: the next record goes here.
    end: u64,
    /// The highest entry index among its records (0 for none).
    last_index: u64,
    /// Whether it holds a hard state record.
    hard_state: bool,
}

/// A segment before the current one: its sequence number and the highest entry index
/// it holds (0 for none). It may be removed once a durable mark covers that index.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Closed {
    seq: u64,
    last_index: u64,
}

pub struct Wal {
    dir: PathBuf,
    seq: u64,
    out: BufWriter<File>,
    /// Bytes of records in the segment, buffered ones included: where the next goes.
    end: u64,
    /// The segment file's length; `end..allocated` is preallocated and reads as zeros.
    allocated: u64,
    /// False once preallocating this segment failed (say, a filesystem without
    /// `fallocate`): records then extend the file, without a failing call per append.
    preallocating: bool,
    dirty: bool,
    /// The highest entry index appended to the current segment (0 for none).
    last_index: u64,
    /// Segments before the current one, oldest first.
    closed: Vec<Closed>,
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
        Ok(Wal::writer(dir, seq, file, 0, 0))
    }

    /// A WAL appending to segment `seq` (open in `file`) at byte `end`.
    fn writer(dir: &Path, seq: u64, file: File, end: u64, allocated: u64) -> Wal {
        Wal {
            dir: dir.to_path_buf(),
            seq,
            out: BufWriter::with_capacity(1 << 20, file),
            end,
            allocated,
            preallocating: true,
            dirty: false,
            last_index: 0,
            closed: Vec::new(),
        }
    }

    /// Buffers encoded records, first preallocating the file if they would reach past
    /// its end.
    fn write_records(&mut self, buf: &[u8]) -> Result<()> {
        let end = self.end + buf.len() as u64;
        if end > self.allocated && self.preallocating {
            let to = end.next_multiple_of(PREALLOCATE_BYTES);
            match preallocate(self.out.get_ref(), self.allocated, to - self.allocated) {
                Ok(()) => self.allocated = to,
                // Only a speed-up: the write below extends the file instead.
                Err(e) => {
                    tracing::warn!(error = %e, "WAL preallocation failed; appending instead");
                    self.preallocating = false;
                }
            }
        }
        self.out.write_all(buf)?;
        self.end = end;
        self.allocated = self.allocated.max(end);
        Ok(())
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
        self.write_records(&buf)?;
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
        let mut replay = Replay::default();
        let (mut closed, mut last) = (Vec::new(), None);
        for (i, (seq, path)) in segs.iter().enumerate() {
            let is_last = i + 1 == segs.len();
            let found = replay_segment(path, is_last, &mut replay)?;
            if is_last {
                last = Some(found);
            } else {
                closed.push(Closed {
                    seq: *seq,
                    last_index: found.last_index,
                });
            }
        }
        let last = last.expect("at least one segment");
        let Replay { state, gap } = replay;
        if gap {
            return Err(Error::Corrupt(format!(
                "WAL in {}: entries after index {} are missing (a segment was lost)",
                dir.display(),
                state.snapshot.index
            )));
        }
        let mut file = OpenOptions::new().write(true).open(last_path)?;
        let allocated = file.metadata()?.len();
        file.seek(SeekFrom::Start(last.end))?;
        let mut wal = Wal::writer(dir, last_seq, file, last.end, allocated);
        wal.last_index = last.last_index;
        wal.closed = closed;
        if !last.hard_state {
            // A crash cut the opening records of a new segment short. Write them
            // again, so the hard state (term, vote, commit) outlives the release of
            // the older segments that hold it.
            wal.mark(&state.snapshot)?;
            wal.set_hard_state(&state.hard_state)?;
            wal.sync()?;
        }
        Ok((wal, state))
    }

    /// Appends entries (not yet durable: see [`Wal::sync`]).
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let mut buf = Vec::new();
        for e in entries {
            encode_record(KIND_ENTRY, &pb_bytes(e), &mut buf);
            self.last_index = self.last_index.max(e.index);
        }
        self.write_records(&buf)?;
        self.dirty |= !entries.is_empty();
        Ok(())
    }

    /// Records a new hard state (not yet durable: see [`Wal::sync`]).
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<()> {
        self.write_one(KIND_HARD_STATE, &pb_bytes(hs))
    }

    /// Writes one record (not yet durable).
    fn write_one(&mut self, kind: u8, payload: &[u8]) -> Result<()> {
        let mut buf = Vec::new();
        encode_record(kind, payload, &mut buf);
        self.write_records(&buf)?;
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

    /// Records that the log now starts after `snapshot` (not yet durable: see
    /// [`Wal::sync`]). Entries at or before its index are dropped at replay.
    pub fn mark(&mut self, snapshot: &SnapshotMetadata) -> Result<()> {
        self.write_one(KIND_SNAPSHOT, &pb_bytes(snapshot))
    }

    /// Bytes of records in the current segment.
    pub fn segment_bytes(&self) -> u64 {
        self.end
    }

    /// Closes the current segment and starts the next with `snapshot` (the latest
    /// mark) and `hs`. Everything appended so far is synced first.
    pub fn cut(&mut self, snapshot: &SnapshotMetadata, hs: &HardState) -> Result<()> {
        self.sync()?;
        let mut next = Wal::new_segment(&self.dir, self.seq + 1)?;
        next.write_base(snapshot, hs, &[])?;
        next.closed = std::mem::take(&mut self.closed);
        next.closed.push(Closed {
            seq: self.seq,
            last_index: self.last_index,
        });
        *self = next;
        Ok(())
    }

    /// Removes the oldest closed segments whose entries are all at or before `index`,
    /// the index of a durable mark. Returns how many closed segments it released.
    ///
    /// Each file is unlinked here but its last descriptor is closed on another thread:
    /// that close frees the blocks and the cached pages of a 64 MiB+ file, 40–45 ms
    /// measured, which the raft thread does not wait for.
    pub fn release(&mut self, index: u64) -> Result<usize> {
        let n = self
            .closed
            .iter()
            .take_while(|c| c.last_index <= index)
            .count();
        let mut open = Vec::with_capacity(n);
        for c in self.closed.drain(..n) {
            // A removal lost to a crash leaves a segment replay skips over (its
            // entries are all at or before the mark).
            let path = self.dir.join(segment_name(c.seq));
            match File::open(&path) {
                Ok(f) => open.push(f),
                // Already gone (removed by hand): nothing to free.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
            fs::remove_file(path)?;
        }
        super::drop_off_thread(open);
        Ok(n)
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

/// Extends `file` by `len` bytes from `offset`, allocated and reading as zeros.
fn preallocate(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::Error::other("preallocation range out of bounds"));
    };
    // SAFETY: the descriptor belongs to `file`, open for writing, for the whole call;
    // fallocate(2) with mode 0 touches no memory of this process.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Replays one segment's records.
fn replay_segment(path: &Path, is_last: bool, replay: &mut Replay) -> Result<SegmentEnd> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut pos = 0usize;
    let (mut last_index, mut hard_state) = (0, false);
    let name = path.display();
    while pos < data.len() {
        let rest = &data[pos..];
        let end = |pos: usize| SegmentEnd {
            end: pos as u64,
            last_index,
            hard_state,
        };
        let damaged = |why: &str| -> Result<SegmentEnd> {
            if rest.iter().all(|&b| b == 0) {
                // The preallocated rest of the file: no record was ever written here.
                return Ok(end(pos));
            }
            // Only the end of the last segment can hold a write torn by a crash, and
            // only if no intact record follows the damage.
            if is_last && !intact_record_after(&data, pos) {
                tracing::warn!(wal = %name, offset = pos, "truncating torn WAL tail: {why}");
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(pos as u64)?;
                f.sync_all()?;
                Ok(end(pos))
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
                last_index = last_index.max(e.index);
                replay.push_entry(e);
            }
            KIND_HARD_STATE => {
                replay.state.hard_state = HardState::parse_from_bytes(payload).map_err(bad)?;
                hard_state = true;
            }
            KIND_SNAPSHOT => replay.mark(SnapshotMetadata::parse_from_bytes(payload).map_err(bad)?),
            other => {
                return Err(Error::Corrupt(format!(
                    "WAL {name} at offset {pos}: unknown record kind {other}"
                )))
            }
        }
        pos += 8 + len;
    }
    Ok(SegmentEnd {
        end: pos as u64,
        last_index,
        hard_state,
    })
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

impl Replay {
    /// An entry in log order: it replaces any entry at or after its index. One that
    /// leaves entries missing before it opens a gap (see the module note).
    fn push_entry(&mut self, e: Entry) {
        let s = &mut self.state;
        if e.index <= s.snapshot.index {
            return;
        }
        let start = s.entries.first().map_or(s.snapshot.index + 1, |f| f.index);
        if e.index < start || e.index > start + s.entries.len() as u64 {
            s.entries.clear();
            self.gap = e.index != s.snapshot.index + 1;
        } else {
            s.entries.truncate((e.index - start) as usize);
        }
        s.entries.push(e);
    }

    /// A snapshot mark: the log starts after it. Entries it covers are dropped, and so
    /// is a gap below it.
    fn mark(&mut self, snap: SnapshotMetadata) {
        let s = &mut self.state;
        s.snapshot = snap;
        s.entries.retain(|e| e.index > s.snapshot.index);
        self.gap = s
            .entries
            .first()
            .is_some_and(|e| e.index != s.snapshot.index + 1);
    }
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

    /// A new WAL in `dir` holding `ents`, synced.
    fn synced_wal(dir: &Path, ents: &[Entry]) -> Wal {
        let mut wal = Wal::create(dir, &SnapshotMetadata::default(), &hs(1, 0)).unwrap();
        wal.append(ents).unwrap();
        wal.sync().unwrap();
        wal
    }

    /// A WAL of entries `1..=last` (term 1) in two segments: the first holds 1-10
    /// and was cut with a mark at 3 (so the second opens with that mark), the second
    /// holds the rest.
    fn cut_after_ten(dir: &Path, last: u64) -> Wal {
        let ents: Vec<_> = (1..=last).map(|i| entry(i, 1)).collect();
        let mut wal = synced_wal(dir, &ents[..10]);
        wal.mark(&mark_at(3)).unwrap();
        wal.cut(&mark_at(3), &hs(1, 10)).unwrap();
        wal.append(&ents[10..]).unwrap();
        wal
    }

    /// Opening the WAL in `dir` must fail as corrupt; returns why. `what` names the
    /// damage in the panic message otherwise.
    fn open_corrupt(dir: &Path, what: &str) -> String {
        match Wal::open(dir) {
            Err(Error::Corrupt(why)) => why,
            Err(e) => panic!("{what}: unexpected error {e}"),
            Ok(_) => panic!("{what} was accepted"),
        }
    }

    fn first_segment(dir: &Path) -> PathBuf {
        segments(dir).unwrap()[0].1.clone()
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
        let wal = synced_wal(dir.path(), &[entry(1, 1), entry(2, 1)]);
        let end = wal.end as usize;
        drop(wal);
        let path = first_segment(dir.path());
        let full = fs::read(&path).unwrap();
        // Cut the last record in half: a write torn by a crash.
        fs::write(&path, &full[..end - 5]).unwrap();
        let (mut wal, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1)]);
        wal.append(&[entry(2, 1), entry(3, 1)]).unwrap();
        wal.sync().unwrap();
        let end = wal.end as usize;
        drop(wal);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 1), (3, 1)]);

        // A flipped bit in the last record is also a torn write.
        let mut bad = fs::read(&path).unwrap();
        bad[end - 2] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn preallocated_segments_reopen_where_their_records_end() {
        let dir = tempfile::tempdir().unwrap();
        let wal = synced_wal(dir.path(), &[entry(1, 1), entry(2, 1)]);
        let path = first_segment(dir.path());
        let len = || fs::metadata(&path).unwrap().len();
        assert_eq!(len(), PREALLOCATE_BYTES, "the segment is preallocated");
        drop(wal);

        // Reopened, the zeros after the records are no damage, and appends go where
        // the records end, not after the preallocated bytes.
        let (mut wal, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 1)]);
        assert_eq!(len(), PREALLOCATE_BYTES, "nothing truncated");
        wal.append(&[entry(3, 1)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 1), (3, 1)]);

        // Records past the preallocated end grow the file by another step.
        let big: Vec<Entry> = (4..=20)
            .map(|i| Entry {
                index: i,
                term: 1,
                data: vec![i as u8; 1 << 20].into(),
                ..Default::default()
            })
            .collect();
        wal.append(&big).unwrap();
        wal.sync().unwrap();
        assert_eq!(len(), 2 * PREALLOCATE_BYTES);
        drop(wal);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(s.entries.len(), 20);
        assert_eq!(s.entries[19].data, vec![20u8; 1 << 20]);
    }

    #[test]
    fn appends_go_on_where_preallocation_fails() {
        // /dev/null takes writes but not fallocate(2) (ENODEV).
        let dir = tempfile::tempdir().unwrap();
        let null = OpenOptions::new().write(true).open("/dev/null").unwrap();
        let mut wal = Wal::writer(dir.path(), 1, null, 0, 0);
        wal.append(&[entry(1, 1)]).unwrap();
        assert!(!wal.preallocating, "the failure switches preallocation off");
        wal.append(&[entry(2, 1)]).unwrap();
        wal.out.flush().unwrap();
        assert_eq!(wal.allocated, wal.end, "the records extended the file");
    }

    #[test]
    fn a_torn_record_before_preallocated_zeros_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let wal = synced_wal(dir.path(), &[entry(1, 1), entry(2, 1)]);
        let end = wal.end as usize;
        drop(wal);
        let path = first_segment(dir.path());
        // A crash that left the end of the last record unwritten: it reads as the
        // zeros of the preallocated rest.
        let mut data = fs::read(&path).unwrap();
        data[end - 5..end].fill(0);
        fs::write(&path, &data).unwrap();
        let (mut wal, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1)]);
        wal.append(&[entry(2, 2), entry(3, 2)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), vec![(1, 1), (2, 2), (3, 2)]);
    }

    #[test]
    fn an_older_segment_left_by_a_crash_in_rewrite_replays() {
        let dir = tempfile::tempdir().unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        let mut wal = synced_wal(dir.path(), &ents);
        let old = first_segment(dir.path());
        let old_data = fs::read(&old).unwrap();
        let snap = SnapshotMetadata {
            index: 7,
            term: 1,
            ..Default::default()
        };
        wal.rewrite(&snap, &hs(1, 10), &ents[7..]).unwrap();
        drop(wal);
        // As if the crash came after the new segment was durable and before the old
        // one (with its preallocated zeros) was removed.
        fs::write(&old, &old_data).unwrap();
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(s.snapshot.index, 7);
        assert_eq!(indexes(&s), vec![(8, 1), (9, 1), (10, 1)]);
    }

    #[test]
    fn corruption_in_the_middle_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = synced_wal(dir.path(), &[entry(1, 1), entry(2, 1)]);
        let path = first_segment(dir.path());
        let before_last = wal.end as usize;
        wal.append(&[entry(3, 1)]).unwrap();
        wal.sync().unwrap();
        let end = wal.end as usize;
        drop(wal);
        // The records and some of the preallocated zeros after them.
        let good = fs::read(&path).unwrap()[..end + 64].to_vec();
        // Damage to any byte before the last record (length, checksum, kind or
        // payload of any record) is followed by an intact record: corruption.
        for at in 0..before_last {
            let mut data = good.clone();
            data[at] ^= 0xff;
            fs::write(&path, &data).unwrap();
            open_corrupt(dir.path(), &format!("byte {at}: corruption in the middle"));
        }
    }

    #[test]
    fn rewrite_truncates_the_log_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        let mut wal = synced_wal(dir.path(), &ents);
        wal.rewrite(&mark_at(7), &hs(1, 10), &ents[7..]).unwrap();
        let s = append_eleven_and_reopen(wal, dir.path());
        assert_eq!(s.hard_state.commit, 10);
    }

    fn mark_at(index: u64) -> SnapshotMetadata {
        SnapshotMetadata {
            index,
            term: 1,
            ..Default::default()
        }
    }

    /// Appends entry 11 to a log of entries 1-10 truncated at 7, reopens it, and checks
    /// that one segment holds the mark at 7 and entries 8-11.
    fn append_eleven_and_reopen(mut wal: Wal, dir: &Path) -> WalState {
        wal.append(&[entry(11, 1)]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        assert_eq!(segments(dir).unwrap().len(), 1);
        let (_, s) = Wal::open(dir).unwrap();
        assert_eq!(s.snapshot.index, 7);
        assert_eq!(indexes(&s), vec![(8, 1), (9, 1), (10, 1), (11, 1)]);
        s
    }

    #[test]
    fn a_mark_truncates_the_log_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        let mut wal = synced_wal(dir.path(), &ents);
        let end = wal.end;
        wal.mark(&mark_at(7)).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.release(7).unwrap(), 0, "no closed segment to remove");
        assert!(
            wal.end - end < 64,
            "the mark alone was written, no entry again"
        );
        append_eleven_and_reopen(wal, dir.path());
    }

    /// Segments are cut and later released once a durable mark covers all their
    /// entries; after the release the first segment left opens with a mark older than
    /// its entries (a gap a later mark covers), and replay accepts it.
    #[test]
    fn cut_segments_are_released_once_a_mark_covers_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = cut_after_ten(dir.path(), 20);
        wal.mark(&mark_at(8)).unwrap();
        wal.cut(&mark_at(8), &hs(1, 20)).unwrap();
        wal.append(&(21..=30).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        wal.sync().unwrap();
        // Segment 1 holds entries up to 10: a mark at 8 does not cover it.
        assert_eq!(wal.release(8).unwrap(), 0);
        assert_eq!(segments(dir.path()).unwrap().len(), 3);
        drop(wal);

        // Closed segments are known again after a restart.
        let (mut wal, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(s.snapshot.index, 8);
        assert_eq!(indexes(&s), (9..=30).map(|i| (i, 1)).collect::<Vec<_>>());
        let released = fs::read(first_segment(dir.path())).unwrap();
        wal.mark(&mark_at(15)).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.release(15).unwrap(), 1, "segment 1 (entries 1-10) goes");
        let left: Vec<u64> = segments(dir.path()).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(left, vec![2, 3]);
        drop(wal);
        // Segment 2 opens with the mark at 3 and holds entries 11-20: the gap from 4
        // to 10 is covered by the mark at 15.
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(s.snapshot.index, 15);
        assert_eq!(indexes(&s), (16..=30).map(|i| (i, 1)).collect::<Vec<_>>());

        // A removal lost to a crash: the segment is back, and replays harmlessly.
        fs::write(dir.path().join(segment_name(1)), &released).unwrap();
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(s.snapshot.index, 15);
        assert_eq!(indexes(&s), (16..=30).map(|i| (i, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn a_lost_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = cut_after_ten(dir.path(), 20);
        wal.sync().unwrap();
        drop(wal);
        // Entries 4-10 are needed (the mark is at 3) and only segment 1 held them.
        fs::remove_file(first_segment(dir.path())).unwrap();
        let why = open_corrupt(dir.path(), "a log with a hole");
        assert!(why.contains("missing"), "{why}");
    }

    /// A crash right after a cut created the next segment leaves it without its
    /// opening records; reopening writes them, so the hard state outlives the release
    /// of the segment that held it.
    #[test]
    fn a_segment_cut_short_gets_its_opening_records_again() {
        let dir = tempfile::tempdir().unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        let mut wal = synced_wal(dir.path(), &ents);
        wal.set_hard_state(&hs(3, 10)).unwrap();
        wal.cut(&mark_at(0), &hs(3, 10)).unwrap();
        drop(wal);
        let second = dir.path().join(segment_name(2));
        fs::write(&second, b"").unwrap();
        let (mut wal, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(s.hard_state, hs(3, 10));
        wal.append(&[entry(11, 3)]).unwrap();
        wal.mark(&mark_at(10)).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.release(10).unwrap(), 1);
        drop(wal);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(
            s.hard_state,
            hs(3, 10),
            "the hard state survived the release"
        );
        assert_eq!(indexes(&s), vec![(11, 3)]);
    }

    #[test]
    fn releasing_a_segment_already_gone_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let ents: Vec<_> = (1..=10).map(|i| entry(i, 1)).collect();
        let mut wal = synced_wal(dir.path(), &ents[..5]);
        wal.cut(&mark_at(0), &hs(1, 5)).unwrap();
        wal.append(&ents[5..]).unwrap();
        fs::remove_file(first_segment(dir.path())).unwrap();
        wal.mark(&mark_at(6)).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.release(6).unwrap(), 1);
        drop(wal);
        let (_, s) = Wal::open(dir.path()).unwrap();
        assert_eq!(indexes(&s), (7..=10).map(|i| (i, 1)).collect::<Vec<_>>());
    }
}
