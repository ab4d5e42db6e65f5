//! State-machine snapshot files: the whole store at one applied index, as one
//! checksummed file.
//!
//! The same file is what the leader streams to a lagging or new member (raft
//! snapshots), what `Maintenance.Snapshot` streams to `etcdctl snapshot save`, and what
//! `pontoon snapshot restore` reads.
//!
//! Format (all integers big-endian):
//!
//! ```text
//! "PNTNSNAP" | version u32 = 1 | applied index u64
//! { column family u8 (1..=4) | key length u32 | key | value length u32 | value }*
//! 0u8 (end of records)
//! CRC-32 (u32) of every byte above
//! ```
//!
//! Invariants:
//!
//! - A file is written from one RocksDB snapshot, so it is exactly the state after
//!   entry `applied index`; it is fsynced and renamed into place only when complete.
//! - A file is verified (checksum, structure) in full before installing begins.
//! - **Install is redo-logged**: before the store is touched, a durable `meta` marker
//!   names the file; installation then replaces the key space and finally clears the
//!   marker in a synced batch. A crash in between leaves the marker, and opening the
//!   store redoes the install from the same (kept) file, so the store is never left
//!   half-installed. Readers are held off while the key space is replaced.
//! - Member-local records (this member's ID, the install marker) are never copied.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rocksdb::{ReadOptions, WriteBatch};

use super::{
    get_i64, MvccStore, CF_HISTORY, CF_INDEX, CF_LEASE, CF_META, CF_REV, META_APPLIED_INDEX,
};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PNTNSNAP";
const VERSION: u32 = 1;
const CFS: [&str; 5] = [CF_REV, CF_INDEX, CF_META, CF_LEASE, CF_HISTORY];
/// `meta` keys that belong to this member, not to the replicated state.
pub(crate) const LOCAL_META_KEYS: [&[u8]; 3] =
    [b"member_id", META_SNAPSHOT_INSTALL, META_RAFT_SNAPSHOT];
/// Redo marker: the path of the file being installed, then the raft metadata.
pub(crate) const META_SNAPSHOT_INSTALL: &[u8] = b"snapshot_install";
/// The raft snapshot metadata of the last installed snapshot (opaque to mvcc).
pub(crate) const META_RAFT_SNAPSHOT: &[u8] = b"raft_snapshot";
/// Records written per RocksDB batch while installing.
const INSTALL_BATCH_BYTES: usize = 4 << 20;

/// What a written snapshot file holds.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub applied_index: u64,
    pub size: u64,
    /// Voters and learners at `applied_index`.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// A writer that checksums everything it writes.
struct Crc<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl MvccStore {
    /// Writes the current state to `path` (via a temporary file, fsynced, renamed).
    pub fn write_snapshot(&self, path: &Path) -> Result<SnapshotFile> {
        let tmp = path.with_extension("part");
        let snap = self.db.snapshot();
        let read = || {
            let mut o = ReadOptions::default();
            o.set_snapshot(&snap);
            o
        };
        let meta = self.cf(CF_META);
        let applied = match snap.get_cf(meta, META_APPLIED_INDEX)? {
            Some(v) if v.len() == 8 => i64::from_be_bytes(v[..].try_into().expect("8")) as u64,
            _ => 0,
        };
        let mut voters = Vec::new();
        let mut learners = Vec::new();
        let file = File::create(&tmp)?;
        let mut w = Crc {
            inner: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            len: 0,
        };
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_be_bytes())?;
        w.write_all(&applied.to_be_bytes())?;
        for (i, name) in CFS.iter().enumerate() {
            let mut it = self.db.raw_iterator_cf_opt(self.cf(name), read());
            it.seek_to_first();
            while it.valid() {
                let (k, v) = (it.key().expect("key"), it.value().expect("value"));
                if *name == CF_META {
                    if LOCAL_META_KEYS.contains(&k) {
                        it.next();
                        continue;
                    }
                    if k.starts_with(b"member/") {
                        let m = <pontoon_proto::etcdserverpb::Member as prost::Message>::decode(v)?;
                        if m.is_learner {
                            learners.push(m.id);
                        } else {
                            voters.push(m.id);
                        }
                    }
                }
                w.write_all(&[i as u8 + 1])?;
                w.write_all(&(k.len() as u32).to_be_bytes())?;
                w.write_all(k)?;
                w.write_all(&(v.len() as u32).to_be_bytes())?;
                w.write_all(v)?;
                it.next();
            }
            it.status()?;
        }
        w.write_all(&[0])?;
        let crc = w.crc.clone().finalize();
        let mut inner = w.inner;
        inner.write_all(&crc.to_be_bytes())?;
        let file = inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            applied_index: applied,
            size: w.len + 4,
            voters,
            learners,
        })
    }

    /// Installs a snapshot file in place of the whole key space (see the module note).
    /// `raft_meta` is stored with it, opaque, for the raft layer to read back.
    pub fn install_snapshot(&self, path: &Path, raft_meta: &[u8]) -> Result<()> {
        verify_snapshot(path)?;
        self.flush_round()?;
        let mut marker = Vec::new();
        let p = path.to_string_lossy();
        marker.extend_from_slice(&(p.len() as u32).to_be_bytes());
        marker.extend_from_slice(p.as_bytes());
        marker.extend_from_slice(raft_meta);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), META_SNAPSHOT_INSTALL, &marker);
        self.write_sync(batch)?;
        self.redo_install(path, raft_meta)
    }

    /// Finishes an install that a crash interrupted, if the marker says there is one.
    pub(crate) fn resume_install(&self) -> Result<()> {
        let Some(marker) = self.db.get_cf(self.cf(CF_META), META_SNAPSHOT_INSTALL)? else {
            return Ok(());
        };
        let bad = || Error::Corrupt("snapshot install marker is malformed".into());
        let len = u32::from_be_bytes(marker.get(..4).ok_or_else(bad)?.try_into().expect("4"));
        let end = 4 + len as usize;
        let path = PathBuf::from(
            String::from_utf8(marker.get(4..end).ok_or_else(bad)?.to_vec()).map_err(|_| bad())?,
        );
        tracing::warn!(file = %path.display(), "resuming an interrupted snapshot install");
        verify_snapshot(&path)?;
        self.redo_install(&path, &marker[end..])
    }

    fn redo_install(&self, path: &Path, raft_meta: &[u8]) -> Result<()> {
        let _readers = self.install_lock.write().expect("install lock");
        // The key space is replaced: nothing cached about it holds.
        self.hot().clear();
        for name in CFS {
            self.clear_cf(name)?;
        }
        let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
        let mut header = [0u8; 20];
        r.read_exact(&mut header)?;
        let mut batch = WriteBatch::default();
        let mut pending = 0usize;
        loop {
            let mut cf = [0u8; 1];
            r.read_exact(&mut cf)?;
            if cf[0] == 0 {
                break;
            }
            let name = *CFS
                .get(cf[0] as usize - 1)
                .ok_or_else(|| Error::Corrupt("snapshot names an unknown column family".into()))?;
            let k = read_chunk(&mut r)?;
            let v = read_chunk(&mut r)?;
            pending += k.len() + v.len();
            batch.put_cf(self.cf(name), k, v);
            if pending >= INSTALL_BATCH_BYTES {
                self.db.write(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_RAFT_SNAPSHOT, raft_meta);
        batch.delete_cf(meta, META_SNAPSHOT_INSTALL);
        self.write_sync(batch)?;
        self.reload_counters()?;
        Ok(())
    }

    /// Deletes every record of a column family (the `meta` family keeps this member's
    /// local records).
    fn clear_cf(&self, name: &str) -> Result<()> {
        let cf = self.cf(name);
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek_to_first();
        let Some(first) = it.key().map(<[u8]>::to_vec) else {
            return it.status().map_err(Into::into);
        };
        it.seek_to_last();
        let mut end = it.key().map(<[u8]>::to_vec).unwrap_or_default();
        end.push(0);
        let mut batch = WriteBatch::default();
        if name == CF_META {
            let mut it = self.db.raw_iterator_cf(cf);
            it.seek_to_first();
            while it.valid() {
                let k = it.key().expect("key");
                if !LOCAL_META_KEYS.contains(&k) {
                    batch.delete_cf(cf, k);
                }
                it.next();
            }
            it.status()?;
        } else {
            batch.delete_range_cf(cf, first, end);
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// Drops everything that ties the key space to its old cluster (members, alarms,
    /// cluster ID, raft position), keeping keys, revisions, leases and the compaction
    /// point: what a restored backup starts a new cluster with.
    pub fn forget_cluster(&self) -> Result<()> {
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        let mut it = self.db.raw_iterator_cf(meta);
        it.seek_to_first();
        while it.valid() {
            let k = it.key().expect("key");
            if [&b"member/"[..], b"removed/", b"alarm/"]
                .iter()
                .any(|p| k.starts_with(p))
                || [&b"cluster_id"[..], b"member_id", META_RAFT_SNAPSHOT].contains(&k)
            {
                batch.delete_cf(meta, k);
            }
            it.next();
        }
        it.status()?;
        batch.put_cf(meta, META_APPLIED_INDEX, 0i64.to_be_bytes());
        self.write_sync(batch)?;
        self.reload_counters()?;
        self.refresh_alarm_cache()
    }

    /// The raft metadata stored by the last snapshot install, if any.
    pub fn installed_raft_snapshot(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_META), META_RAFT_SNAPSHOT)?)
    }

    pub(crate) fn reload_counters(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let meta = self.cf(CF_META);
        let current = get_i64(&self.db, meta, super::META_CURRENT_REV)?.unwrap_or(1);
        let compacted = get_i64(&self.db, meta, super::META_COMPACT_REV)?.unwrap_or(0);
        let applied = get_i64(&self.db, meta, META_APPLIED_INDEX)?.unwrap_or(0) as u64;
        self.current.store(current, Ordering::Release);
        self.compacted.store(compacted, Ordering::Release);
        self.applied.store(applied, Ordering::Release);
        self.reload_auth()
    }
}

fn read_chunk(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut v = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Checks a snapshot file's checksum and structure; returns its applied index.
///
/// A file may carry etcd's backup envelope after the snapshot proper (what
/// `Maintenance.Snapshot` streams, so that `etcdctl snapshot save` accepts it): zero
/// padding to a multiple of 512 bytes, then the SHA-256 of everything before it. If
/// present, it is verified too.
pub fn verify_snapshot(path: &Path) -> Result<u64> {
    let corrupt = |why: &str| Error::Corrupt(format!("snapshot {}: {why}", path.display()));
    let len = std::fs::metadata(path)?.len();
    if len < 8 + 4 + 8 + 1 + 4 {
        return Err(corrupt("too short"));
    }
    let mut r = BufReader::new(File::open(path)?);
    let mut header = [0u8; 20];
    r.read_exact(&mut header)?;
    if &header[..8] != MAGIC {
        return Err(corrupt("not a Pontoon snapshot"));
    }
    if u32::from_be_bytes(header[8..12].try_into().expect("4")) != VERSION {
        return Err(corrupt("unknown version"));
    }
    // Structure: every record must fit before the trailer; this finds its end.
    let mut pos = 20u64;
    loop {
        let mut cf = [0u8; 1];
        r.read_exact(&mut cf).map_err(|_| corrupt("truncated"))?;
        pos += 1;
        if cf[0] == 0 {
            break;
        }
        if cf[0] as usize > CFS.len() {
            return Err(corrupt("unknown column family"));
        }
        for _ in 0..2 {
            let mut l = [0u8; 4];
            r.read_exact(&mut l).map_err(|_| corrupt("truncated"))?;
            let l = u32::from_be_bytes(l) as u64;
            pos += 4 + l;
            if pos + 4 > len {
                return Err(corrupt("record runs past the end"));
            }
            std::io::copy(&mut (&mut r).take(l), &mut std::io::sink())?;
        }
    }
    let content = pos + 4;
    // The checksum of everything before the trailer.
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut crc = crc32fast::Hasher::new();
    let mut sha = sha2::Sha256::default();
    let mut remaining = pos;
    let mut buf = vec![0u8; 1 << 16];
    while remaining > 0 {
        let n = (remaining as usize).min(buf.len());
        r.read_exact(&mut buf[..n])?;
        crc.update(&buf[..n]);
        sha2::Digest::update(&mut sha, &buf[..n]);
        remaining -= n as u64;
    }
    let mut want = [0u8; 4];
    r.read_exact(&mut want)?;
    if crc.finalize() != u32::from_be_bytes(want) {
        return Err(corrupt("checksum mismatch"));
    }
    sha2::Digest::update(&mut sha, want);
    if len > content {
        // etcd's envelope: zero padding, then SHA-256.
        if len % 512 != 32 || len - content < 32 {
            return Err(corrupt("bytes after the last record"));
        }
        let mut rest = vec![0u8; (len - content) as usize];
        r.read_exact(&mut rest)?;
        let (padding, digest) = rest.split_at(rest.len() - 32);
        if padding.iter().any(|b| *b != 0) {
            return Err(corrupt("bytes after the last record"));
        }
        sha2::Digest::update(&mut sha, padding);
        if sha2::Digest::finalize(sha).as_slice() != digest {
            return Err(corrupt("sha256 mismatch"));
        }
    }
    Ok(u64::from_be_bytes(header[12..20].try_into().expect("8")))
}

/// etcd's backup envelope for a snapshot of `size` bytes whose bytes hash to `sha`
/// so far: the zero padding to append, and the final digest.
pub fn envelope(size: u64, mut sha: sha2::Sha256) -> (Vec<u8>, [u8; 32]) {
    let padding = vec![0u8; ((512 - size % 512) % 512) as usize];
    sha2::Digest::update(&mut sha, &padding);
    (padding, sha2::Digest::finalize(sha).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pontoon_proto::etcdserverpb::PutRequest;
    use pontoon_proto::internal::internal_request::Request as Op;
    use pontoon_proto::internal::InternalRequest;

    fn put(s: &MvccStore, index: u64, k: &str, v: &str) {
        let req = InternalRequest {
            id: index,
            header: None,
            request: Some(Op::Put(PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            })),
        };
        s.apply(index, &req).unwrap().response.unwrap();
    }

    #[test]
    fn snapshot_round_trip_replaces_the_key_space() {
        let dir = tempfile::tempdir().unwrap();
        let a = MvccStore::open(&dir.path().join("a")).unwrap();
        a.meta_put_sync("member_id", &1u64.to_be_bytes()).unwrap();
        for i in 1..=50 {
            put(&a, i, &format!("k{}", i % 7), &format!("v{i}"));
        }
        let file = a.write_snapshot(&dir.path().join("a.snap")).unwrap();
        assert_eq!(file.applied_index, 50);
        assert_eq!(verify_snapshot(&file.path).unwrap(), 50);

        let b = MvccStore::open(&dir.path().join("b")).unwrap();
        b.meta_put_sync("member_id", &2u64.to_be_bytes()).unwrap();
        put(&b, 1, "stale", "x");
        b.install_snapshot(&file.path, b"raft-meta").unwrap();
        assert_eq!(b.applied_index(), 50);
        assert_eq!(b.current_revision(), a.current_revision());
        let all = |s: &MvccStore| {
            s.range(&pontoon_proto::etcdserverpb::RangeRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            })
            .unwrap()
            .kvs
        };
        assert_eq!(all(&a), all(&b));
        // The member's own identity is kept; the raft metadata is recorded.
        assert_eq!(
            b.meta_get("member_id").unwrap(),
            Some(2u64.to_be_bytes().to_vec())
        );
        assert_eq!(
            b.installed_raft_snapshot().unwrap(),
            Some(b"raft-meta".to_vec())
        );
    }

    #[test]
    fn an_installed_snapshot_replaces_what_the_hot_key_cache_held() {
        let dir = tempfile::tempdir().unwrap();
        let a = MvccStore::open(&dir.path().join("a")).unwrap();
        for i in 1..=5 {
            put(&a, i, "k", &format!("a{i}"));
        }
        let file = a.write_snapshot(&dir.path().join("a.snap")).unwrap();
        let b = MvccStore::open(&dir.path().join("b")).unwrap();
        for i in 1..=3 {
            put(&b, i, "k", &format!("b{i}"));
        }
        assert!(!b.hot().is_empty(), "k is hot on b");
        b.install_snapshot(&file.path, b"raft-meta").unwrap();
        // The next write to k builds on the snapshot's k (version 5, value a5), on both.
        let next = |s: &MvccStore| {
            let req = InternalRequest {
                id: 6,
                header: None,
                request: Some(Op::Put(PutRequest {
                    key: "k".into(),
                    value: "x".into(),
                    prev_kv: true,
                    ..Default::default()
                })),
            };
            format!("{:?}", s.apply(6, &req).unwrap())
        };
        assert_eq!(next(&b), next(&a));
        let k = b
            .range(&pontoon_proto::etcdserverpb::RangeRequest {
                key: "k".into(),
                ..Default::default()
            })
            .unwrap()
            .kvs;
        assert_eq!((k[0].version, k[0].value.as_slice()), (6, &b"x"[..]));
    }

    #[test]
    fn damaged_files_are_refused_before_anything_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = MvccStore::open(&dir.path().join("a")).unwrap();
        put(&a, 1, "k", "v");
        let file = a.write_snapshot(&dir.path().join("a.snap")).unwrap();
        let bytes = std::fs::read(&file.path).unwrap();
        for i in [0, 9, 25, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let p = dir.path().join(format!("bad{i}.snap"));
            std::fs::write(&p, &bad).unwrap();
            assert!(verify_snapshot(&p).is_err(), "flipped byte {i} accepted");
            let b = MvccStore::open(&dir.path().join(format!("b{i}"))).unwrap();
            put(&b, 1, "mine", "x");
            assert!(b.install_snapshot(&p, b"").is_err());
            assert_eq!(b.current_revision(), 2, "nothing changed");
        }
        std::fs::write(dir.path().join("short.snap"), &bytes[..10]).unwrap();
        assert!(verify_snapshot(&dir.path().join("short.snap")).is_err());
        // etcd's envelope (padding + SHA-256) is accepted, and checked.
        let mut sha = sha2::Sha256::default();
        sha2::Digest::update(&mut sha, &bytes);
        let (padding, digest) = envelope(bytes.len() as u64, sha);
        let mut wrapped = bytes.clone();
        wrapped.extend_from_slice(&padding);
        wrapped.extend_from_slice(&digest);
        assert_eq!(wrapped.len() % 512, 32);
        let p = dir.path().join("wrapped.snap");
        std::fs::write(&p, &wrapped).unwrap();
        assert_eq!(verify_snapshot(&p).unwrap(), 1);
        let n = wrapped.len();
        wrapped[n - 1] ^= 1;
        std::fs::write(&p, &wrapped).unwrap();
        assert!(verify_snapshot(&p).is_err(), "a wrong digest is refused");
    }

    #[test]
    fn an_interrupted_install_is_redone_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = MvccStore::open(&dir.path().join("a")).unwrap();
        for i in 1..=10 {
            put(&a, i, &format!("k{i}"), "v");
        }
        let file = a.write_snapshot(&dir.path().join("a.snap")).unwrap();
        {
            let b = MvccStore::open(&dir.path().join("b")).unwrap();
            put(&b, 1, "old", "x");
            // The marker is down, then the "crash": the key space is half cleared.
            let mut marker = Vec::new();
            let p = file.path.to_string_lossy();
            marker.extend_from_slice(&(p.len() as u32).to_be_bytes());
            marker.extend_from_slice(p.as_bytes());
            marker.extend_from_slice(b"m");
            let mut batch = WriteBatch::default();
            batch.put_cf(b.cf(CF_META), META_SNAPSHOT_INSTALL, &marker);
            b.write_sync(batch).unwrap();
            b.clear_cf(CF_INDEX).unwrap();
        }
        let b = MvccStore::open(&dir.path().join("b")).unwrap();
        assert_eq!(b.applied_index(), 10);
        assert_eq!(b.current_revision(), a.current_revision());
        assert_eq!(b.installed_raft_snapshot().unwrap(), Some(b"m".to_vec()));
    }
}
