//! MVCC key-value store on RocksDB, with etcd's revision model.
//!
//! Column families (see DESIGN.md, "Storage"):
//!
//! - `rev`: [`Revision`] (16 bytes, big-endian) -> one flag byte (0 put, 1 tombstone)
//!   and the protobuf `mvccpb.KeyValue`. Both the value store and the history that
//!   reads at old revisions and watchers catch up from.
//! - `index`: raw user key -> [`KeyIndex`], the key's changes (the newest, for a key
//!   with a long history). Range scans iterate it.
//! - `key_history`: the older changes of keys with long histories, in chunks (see
//!   [`key_index`], "Bounded records").
//! - `meta`: applied raft index, current and compacted revision, member identity.
//!
//! Invariants:
//!
//! - **Atomic apply.** Each apply round ([`round`]: consecutive Puts, DeleteRanges and
//!   Txns of one group of committed entries) and each other applied raft entry is one
//!   RocksDB write batch holding its changes and the new applied index, so after a
//!   crash the store is exactly the state after some entry, and replay resumes at the
//!   next one. Nothing of a round is published before its batch is written. Batches
//!   are written with RocksDB's WAL but without fsync, and the WAL is buffered in the
//!   process (`manual_wal_flush`: no write(2) per batch): the raft log is the durable
//!   record, and log truncation first flushes and syncs this WAL (see `raft::node`). A
//!   crash loses a suffix of the buffered WAL at most, and RocksDB recovers a prefix of
//!   the batches (point-in-time recovery), so the state is still that after some entry.
//! - **One writer.** Only the apply loop writes. Readers take a RocksDB snapshot after
//!   loading the current revision, so every revision they may read is in it.
//! - **Compaction is published before it deletes.** The compacted revision is raised in
//!   memory before the batch deleting old revisions is written, and readers load it
//!   after taking their snapshot, so a reader never sees a half-deleted history.
//! - **Writeback.** The engine's WAL and its SST files are written back to the disk
//!   as they grow ([`WRITEBACK_BYTES`] at a time, RocksDB's `wal_bytes_per_sync` and
//!   `bytes_per_sync`: `sync_file_range`, no fsync), not left to pile up as dirty
//!   pages until the kernel's flusher or the sync before raft log truncation writes
//!   them in one burst. Every member applies the same entries, so those bursts came
//!   on every member at once, and the raft WAL's fsyncs queued behind them: the
//!   3-member put tail (bench/README.md, session 9).
//! - Restart reads three numbers from `meta`; nothing proportional to the number of
//!   keys is loaded or rebuilt.

pub mod alarm;
pub mod apply;
pub mod auth;
pub mod hash;
pub mod history;
pub mod hot;
pub mod key_index;
pub mod lease;
pub mod members;
pub mod range;
pub mod revision;
pub mod round;
pub mod snapshot;
pub mod span;
pub mod view;
pub mod write;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use prost::Message;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use pontoon_proto::etcdserverpb::{
    AlarmResponse, CompactionResponse, DeleteRangeResponse, LeaseGrantResponse,
    LeaseRevokeResponse, Member, PutResponse, RangeRequest, RangeResponse, ResponseHeader,
    TxnRequest, TxnResponse,
};
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::internal::InternalRequest;
use pontoon_proto::mvccpb::KeyValue;

use crate::auth::{AuthInfo, AuthState};
use crate::error::{Error, Result};
pub use auth::TokenEffect;
pub use key_index::KeyIndex;
pub use members::MemberChange;
pub use revision::Revision;
pub use span::KeySpan;
pub use write::Change;

pub(crate) const CF_REV: &str = "rev";
pub(crate) const CF_INDEX: &str = "index";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_LEASE: &str = "lease";
/// Older changes of keys with long histories (see `mvcc::key_index`).
pub(crate) const CF_HISTORY: &str = "key_history";
/// Every column family of the store.
pub(crate) const COLUMN_FAMILIES: [&str; 5] = [CF_REV, CF_INDEX, CF_META, CF_LEASE, CF_HISTORY];

const META_APPLIED_INDEX: &[u8] = b"applied_index";
const META_CURRENT_REV: &[u8] = b"current_revision";
const META_COMPACT_REV: &[u8] = b"compact_revision";

/// The answer to an applied write request.
#[derive(Clone, Debug, PartialEq)]
pub enum ApplyResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compaction(CompactionResponse),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    LeaseCheckpoint,
    /// The member list after a membership change.
    Members(Vec<Member>),
    Alarm(AlarmResponse),
    /// An auth management entry applied; what it asks of the token keeper.
    Auth(TokenEffect),
}

/// What applying one entry did.
#[derive(Debug)]
pub struct Applied {
    /// The request's answer: a response, or a deterministic error such as
    /// `LeaseNotFound`, after which nothing was changed.
    pub response: Result<ApplyResponse>,
    /// The changes made, in revision order (empty on error).
    pub changes: Vec<Change>,
}

pub struct MvccStore {
    pub(crate) db: DB,
    current: AtomicI64,
    compacted: AtomicI64,
    applied: AtomicU64,
    /// Cached: a NOSPACE alarm is active.
    no_space: AtomicBool,
    /// Cached: a CORRUPT alarm is active.
    corrupt: AtomicBool,
    /// Held for writing while a snapshot replaces the key space; readers take it
    /// (briefly) to start a consistent read.
    install_lock: RwLock<()>,
    /// The auth state as of the last applied entry (see `mvcc::auth`).
    auth: RwLock<Arc<AuthState>>,
    /// The apply loop's cache of hot keys (see `mvcc::hot`).
    hot: Mutex<hot::HotKeys>,
    /// Entries applied but not yet written (see `mvcc::round`); apply loop only.
    round: Mutex<round::Round>,
}

pub(crate) fn encode_record(tombstone: bool, kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + kv.encoded_len());
    out.push(tombstone as u8);
    kv.encode(&mut out).expect("Vec has room");
    out
}

pub(crate) fn decode_record(b: &[u8]) -> Result<(bool, KeyValue)> {
    match b.split_first() {
        Some((&flag, rest)) if flag <= 1 => Ok((flag == 1, KeyValue::decode(rest)?)),
        _ => Err(Error::Corrupt("revision record has no valid flag".into())),
    }
}

fn get_i64(db: &DB, cf: &ColumnFamily, key: &[u8]) -> Result<Option<i64>> {
    match db.get_pinned_cf(cf, key)? {
        Some(v) if v.len() == 8 => Ok(Some(i64::from_be_bytes(
            v.as_ref().try_into().expect("8 bytes"),
        ))),
        Some(v) => Err(Error::Corrupt(format!(
            "meta {} has {} bytes",
            String::from_utf8_lossy(key),
            v.len()
        ))),
        None => Ok(None),
    }
}

/// Bytes written to an engine file between two writebacks of it (see the module note).
const WRITEBACK_BYTES: u64 = 1 << 20;

impl MvccStore {
    /// Opens (creating if needed) the store in directory `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Apply batches reach the WAL file when the buffer fills or on `sync`; writes
        // made with `sync` flush the buffer first. See the module note.
        opts.set_manual_wal_flush(true);
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Write unsynced files back as they grow (sync_file_range every MiB) instead of
        // leaving it to the kernel or to the sync at raft log truncation: see the module
        // note, "Writeback".
        opts.set_wal_bytes_per_sync(WRITEBACK_BYTES);
        opts.set_bytes_per_sync(WRITEBACK_BYTES);
        let cfs = COLUMN_FAMILIES.map(|name| {
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(name, o)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let meta = db.cf_handle(CF_META).expect("meta column family exists");
        // An empty store is at revision 1, as etcd's is.
        let current = get_i64(&db, meta, META_CURRENT_REV)?.unwrap_or(1);
        let compacted = get_i64(&db, meta, META_COMPACT_REV)?.unwrap_or(0);
        let applied = get_i64(&db, meta, META_APPLIED_INDEX)?.unwrap_or(0) as u64;
        let store = MvccStore {
            db,
            current: AtomicI64::new(current),
            compacted: AtomicI64::new(compacted),
            applied: AtomicU64::new(applied),
            no_space: AtomicBool::new(false),
            corrupt: AtomicBool::new(false),
            install_lock: RwLock::new(()),
            auth: RwLock::new(Arc::new(AuthState::default())),
            hot: Mutex::new(hot::HotKeys::default()),
            round: Mutex::new(round::Round::default()),
        };
        store.resume_install()?;
        store.refresh_alarm_cache()?;
        store.reload_auth()?;
        Ok(store)
    }

    /// Writes a batch and syncs the engine's WAL.
    pub(crate) fn write_sync(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        Ok(self.db.write_opt(batch, &wo)?)
    }

    /// Commits a batch that changes no key as the apply of entry `index`.
    pub(crate) fn finish_meta(&self, index: u64, batch: WriteBatch) -> Result<()> {
        self.finish(index, batch, None, Ok(ApplyResponse::LeaseCheckpoint))
            .map(|_| ())
    }

    /// The hot-key cache; only the apply loop uses it.
    pub(crate) fn hot(&self) -> MutexGuard<'_, hot::HotKeys> {
        self.hot.lock().expect("hot-key cache lock")
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// The store revision: the revision of the last change applied.
    pub fn current_revision(&self) -> i64 {
        self.current.load(Ordering::Acquire)
    }

    /// Revisions below this have been compacted; 0 if never compacted.
    pub fn compact_revision(&self) -> i64 {
        self.compacted.load(Ordering::Acquire)
    }

    /// The raft index of the last entry applied.
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Serves a Range at its revision from a consistent snapshot.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        self.range_capped(req, usize::MAX)
    }

    /// [`Self::range`], refused with `RangeTooLarge` past `max_bytes` of keys and
    /// values.
    pub fn range_capped(&self, req: &RangeRequest, max_bytes: usize) -> Result<RangeResponse> {
        let installing = self.install_lock.read().expect("install lock");
        let current = self.current_revision();
        let view = view::SnapView::new(self);
        let compacted = self.compact_revision();
        drop(installing);
        range::range_capped(&view, req, current, compacted, max_bytes)
    }

    /// Serves a read-only Txn ([`apply::txn_is_read_only`]) from a consistent
    /// snapshot at the current revision, each Range capped at `max_bytes`.
    pub fn read_only_txn(&self, req: &TxnRequest, max_bytes: usize) -> Result<TxnResponse> {
        let installing = self.install_lock.read().expect("install lock");
        let current = self.current_revision();
        let view = view::SnapView::new(self);
        let compacted = self.compact_revision();
        drop(installing);
        apply::read_only_txn(&view, req, current, compacted, max_bytes)
    }

    /// Reads a value from the `meta` column family.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_META), key.as_bytes())?)
    }

    /// Writes a value to the `meta` column family, durably.
    pub fn meta_put_sync(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), key.as_bytes(), value);
        self.write_sync(batch)
    }

    /// Applies the write request of raft entry `index` and writes it to the engine,
    /// with the apply round before it if there is one. An `Err` return is not the
    /// request's answer: the store can no longer apply and the member must stop.
    pub fn apply(&self, index: u64, req: &InternalRequest) -> Result<Applied> {
        let applied = self.apply_batched(index, req)?;
        self.flush_round()?;
        Ok(applied)
    }

    /// [`Self::apply`], except that a Put, DeleteRange or Txn joins the apply round
    /// ([`round`]) and may stay unwritten and unpublished until [`Self::flush_round`]
    /// ([`Self::round_pending`] says whether it did). Any other entry writes the round
    /// first and then itself.
    pub fn apply_batched(&self, index: u64, req: &InternalRequest) -> Result<Applied> {
        debug_assert!(index > self.applied_index(), "entries apply once, in order");
        if round::joins_round(req) {
            return self.apply_in_round(index, req);
        }
        self.flush_round()?;
        self.apply_alone(index, req)
    }

    /// Whether applied entries wait in the apply round for [`Self::flush_round`].
    pub fn round_pending(&self) -> bool {
        !self.round.lock().expect("apply round").is_empty()
    }

    /// Writes the apply round, then publishes it: the store revision, the applied
    /// index and the hot-key cache move to the state after its last entry.
    pub fn flush_round(&self) -> Result<()> {
        let r = {
            let mut round = self.round.lock().expect("apply round");
            if round.is_empty() {
                return Ok(());
            }
            std::mem::take(&mut *round)
        };
        let mut batch = r.batch;
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_APPLIED_INDEX, (r.index as i64).to_be_bytes());
        batch.put_cf(meta, META_CURRENT_REV, r.revision.to_be_bytes());
        self.write_and_publish(batch, r.index, r.revision, r.hot)
    }

    /// Why a client's write request is refused before it runs, if it is: no space,
    /// a corrupt cluster, or no permission.
    fn refusal(&self, req: &InternalRequest) -> Option<Error> {
        if self.no_space() && grows_store(req.request.as_ref()) {
            return Some(Error::NoSpace);
        }
        if self.corrupt() && changes_keys(req.request.as_ref()) {
            return Some(Error::CorruptCluster);
        }
        // Requests from clients carry a header (who asked); the members' own requests
        // (lease expiry, alarms, auto-compaction) carry none and are not checked.
        if let (Some(op), Some(header)) = (&req.request, &req.header) {
            if let Err(e) = self.check_write(op, &AuthInfo::from(Some(header))) {
                return Some(e);
            }
        }
        None
    }

    /// Applies a Put, DeleteRange or Txn into the apply round.
    fn apply_in_round(&self, index: u64, req: &InternalRequest) -> Result<Applied> {
        let mut guard = self.round.lock().expect("apply round");
        let round = &mut *guard;
        if round.is_empty() {
            round.revision = self.current_revision();
        }
        let (response, changes) = if let Some(e) = self.refusal(req) {
            (Err(e), Vec::new())
        } else {
            let mut txn = write::WriteTxn::in_round(self, Some(&round.overlay), round.revision);
            let outcome = match &req.request {
                Some(InternalOp::Put(p)) => apply::put(&mut txn, p).map(ApplyResponse::Put),
                Some(InternalOp::DeleteRange(d)) => {
                    apply::delete_range(&mut txn, d).map(ApplyResponse::DeleteRange)
                }
                Some(InternalOp::Txn(t)) => {
                    apply::txn(&mut txn, t, self.compact_revision()).map(ApplyResponse::Txn)
                }
                _ => unreachable!("only Put, DeleteRange and Txn join a round"),
            };
            match outcome {
                Ok(resp) => {
                    let committed = txn.commit(&mut round.batch);
                    round.revision = committed.revision;
                    // Chunks sealed in the batch must be in the engine before a later
                    // entry reads back that far.
                    round.incomplete |= committed.sealed;
                    round.absorb(&committed.changes, committed.hot);
                    (Ok(resp), committed.changes)
                }
                Err(e) if e.is_deterministic() => (Err(e), Vec::new()),
                Err(e) => return Err(e),
            }
        };
        round.entries += 1;
        round.index = index;
        let full = round.is_full();
        drop(guard);
        if full {
            self.flush_round()?;
        }
        Ok(Applied { response, changes })
    }

    /// Applies an entry that does not join apply rounds; the round is written.
    fn apply_alone(&self, index: u64, req: &InternalRequest) -> Result<Applied> {
        let mut batch = WriteBatch::default();
        if let Some(e) = self.refusal(req) {
            return self.finish(index, batch, None, Err(e));
        }
        if let Some(op) = &req.request {
            if let Some(result) = self.apply_auth(index, op, &mut batch) {
                return match result {
                    Ok((state, effect)) => {
                        let applied =
                            self.finish(index, batch, None, Ok(ApplyResponse::Auth(effect)))?;
                        self.install_auth(state);
                        Ok(applied)
                    }
                    Err(e) => self.finish(index, WriteBatch::default(), None, Err(e)),
                };
            }
        }
        let mut txn = write::WriteTxn::new(self);
        let outcome = match &req.request {
            Some(InternalOp::Put(_))
            | Some(InternalOp::DeleteRange(_))
            | Some(InternalOp::Txn(_)) => {
                unreachable!("Put, DeleteRange and Txn join apply rounds")
            }
            Some(InternalOp::LeaseRevoke(r)) => self
                .apply_lease_revoke(&mut txn, r.id)
                .map(ApplyResponse::LeaseRevoke),
            Some(InternalOp::LeaseGrant(g)) => {
                drop(txn);
                return match self.apply_lease_grant(g, &mut batch) {
                    Ok(resp) => {
                        self.finish(index, batch, None, Ok(ApplyResponse::LeaseGrant(resp)))
                    }
                    Err(e) if e.is_deterministic() => {
                        self.finish(index, WriteBatch::default(), None, Err(e))
                    }
                    Err(e) => Err(e),
                };
            }
            Some(InternalOp::LeaseCheckpoint(c)) => {
                drop(txn);
                self.apply_lease_checkpoint(c, &mut batch)?;
                return self.finish(index, batch, None, Ok(ApplyResponse::LeaseCheckpoint));
            }
            Some(InternalOp::Compaction(c)) => {
                drop(txn);
                return match self.compact(c.revision, &mut batch) {
                    Ok(resp) => {
                        self.finish(index, batch, None, Ok(ApplyResponse::Compaction(resp)))
                    }
                    Err(e) if e.is_deterministic() => {
                        self.finish(index, WriteBatch::default(), None, Err(e))
                    }
                    Err(e) => Err(e),
                };
            }
            Some(InternalOp::MemberAttributes(m)) => {
                drop(txn);
                let members =
                    self.apply_member_change(index, &MemberChange::Attributes(m.clone()))?;
                return Ok(Applied {
                    response: Ok(ApplyResponse::Members(members)),
                    changes: Vec::new(),
                });
            }
            Some(InternalOp::MemberPeerUrls(m)) => {
                drop(txn);
                let members =
                    self.apply_member_change(index, &MemberChange::PeerUrls(m.clone()))?;
                return Ok(Applied {
                    response: Ok(ApplyResponse::Members(members)),
                    changes: Vec::new(),
                });
            }
            Some(InternalOp::Alarm(a)) => {
                drop(txn);
                let resp = self.apply_alarm(a, &mut batch)?;
                let applied = self.finish(index, batch, None, Ok(ApplyResponse::Alarm(resp)))?;
                self.refresh_alarm_cache()?;
                return Ok(applied);
            }
            // Auth entries were applied above.
            Some(_) => Err(Error::Corrupt(format!("entry {index}: unexpected request"))),
            None => Err(Error::Corrupt(format!("entry {index} carries no request"))),
        };
        match outcome {
            Ok(resp) => self.finish(index, batch, Some(txn), Ok(resp)),
            Err(e) if e.is_deterministic() => self.finish(index, batch, None, Err(e)),
            Err(e) => Err(e),
        }
    }

    /// Records that entry `index` was applied without changing the key space (empty
    /// entries, membership changes). Persisted with the next write batch; published
    /// with the apply round if one is pending.
    pub fn apply_noop(&self, index: u64) {
        let mut round = self.round.lock().expect("apply round");
        if round.is_empty() {
            self.applied.store(index, Ordering::Release);
        } else {
            round.entries += 1;
            round.index = index;
        }
    }

    /// Writes the applied index to the engine and syncs the engine's WAL, so the state
    /// machine is durable up to [`Self::applied_index`]. Called before the raft log is
    /// truncated.
    pub fn sync(&self) -> Result<()> {
        self.flush_round()?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META),
            META_APPLIED_INDEX,
            (self.applied_index() as i64).to_be_bytes(),
        );
        self.db.write(batch)?;
        self.db.flush_wal(true)?;
        Ok(())
    }

    fn finish(
        &self,
        index: u64,
        mut batch: WriteBatch,
        txn: Option<write::WriteTxn<'_>>,
        response: Result<ApplyResponse>,
    ) -> Result<Applied> {
        let (rev, changes, hot) = match txn {
            Some(t) => {
                let c = t.commit(&mut batch);
                (c.revision, c.changes, c.hot)
            }
            None => (self.current_revision(), Vec::new(), Vec::new()),
        };
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_APPLIED_INDEX, (index as i64).to_be_bytes());
        batch.put_cf(meta, META_CURRENT_REV, rev.to_be_bytes());
        self.write_and_publish(batch, index, rev, hot)?;
        Ok(Applied { response, changes })
    }

    /// Writes a batch that leaves the store at revision `rev` after entry `index`,
    /// then publishes that state: the hot-key cache, the revision and the index.
    fn write_and_publish(
        &self,
        batch: WriteBatch,
        index: u64,
        rev: i64,
        hot: Vec<(Vec<u8>, Option<hot::HotKey>)>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        if let Err(e) = self.db.write(batch) {
            // The cache must not run ahead of the engine.
            self.hot().clear();
            return Err(e.into());
        }
        if !hot.is_empty() {
            let mut cache = self.hot();
            for (key, state) in hot {
                cache.record(key, state);
            }
        }
        crate::metrics::METRICS
            .backend_commit
            .observe(started.elapsed());
        self.current.store(rev, Ordering::Release);
        self.applied.store(index, Ordering::Release);
        Ok(())
    }

    /// Adds `key`'s index to `batch`: the record, and the older changes that do not
    /// fit in it as new `key_history` chunks (see `mvcc::key_index`, "Bounded
    /// records"). `ki` must begin after the key's last stored chunk, or those chunks
    /// must be deleted in `batch` first (as compaction does). Returns the record
    /// written and whether chunks were.
    pub(crate) fn put_index(
        &self,
        batch: &mut WriteBatch,
        key: &[u8],
        ki: KeyIndex,
    ) -> (KeyIndex, bool) {
        let (head, chunks) = ki.split_for_storage();
        for chunk in &chunks {
            let mut value = Vec::with_capacity(chunk.len() * 6);
            key_index::encode_changes(chunk, &mut value);
            batch.put_cf(
                self.cf(CF_HISTORY),
                key_index::history_key(key, chunk[0].rev),
                value,
            );
        }
        batch.put_cf(self.cf(CF_INDEX), key, head.encode());
        (head, !chunks.is_empty())
    }

    /// Compacts the history at revision `at`. Work is proportional to the number of
    /// revisions written since the previous compaction, not to the number of keys: only
    /// keys changed in that window can have anything left to drop.
    fn compact(&self, at: i64, batch: &mut WriteBatch) -> Result<CompactionResponse> {
        let previous = self.compact_revision();
        if at <= previous {
            return Err(Error::Compacted);
        }
        if at > self.current_revision() {
            return Err(Error::FutureRev);
        }
        let rev_cf = self.cf(CF_REV);
        let index_cf = self.cf(CF_INDEX);
        let mut keys = std::collections::BTreeSet::new();
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(Revision::first_of(at + 1).encode().to_vec());
        let mut it = self.db.raw_iterator_cf_opt(rev_cf, opts);
        // From `previous` itself: a tombstone made exactly at the previous compaction
        // revision was kept then and is dropped now.
        it.seek(Revision::first_of(previous).encode());
        while it.valid() {
            let (_, kv) = decode_record(it.value().expect("valid iterator has a value"))?;
            keys.insert(kv.key);
            it.next();
        }
        it.status()?;
        // Publish before deleting; see the module note.
        self.compacted.store(at, Ordering::Release);
        // Compaction trims the indexes of keys the cache may hold.
        self.hot().clear();
        for key in keys {
            let Some(raw) = self.db.get_pinned_cf(index_cf, &key)? else {
                continue;
            };
            let head = KeyIndex::decode(&raw)?;
            drop(raw);
            // The whole history: the records of sealed changes go too. The chunks are
            // rewritten from what is left.
            let sealed = head.has_older();
            let mut ki = view::load_older(self, rocksdb::ReadOptions::default(), &key, head)?;
            for rev in ki.compact(at) {
                batch.delete_cf(rev_cf, rev.encode());
            }
            if sealed {
                batch.delete_range_cf(
                    self.cf(CF_HISTORY),
                    key_index::history_prefix(&key),
                    key_index::history_end(&key),
                );
            }
            if ki.is_empty() {
                batch.delete_cf(index_cf, &key);
            } else {
                self.put_index(batch, &key, ki);
            }
        }
        batch.put_cf(self.cf(CF_META), META_COMPACT_REV, at.to_be_bytes());
        Ok(CompactionResponse {
            header: Some(ResponseHeader {
                revision: self.current_revision(),
                ..Default::default()
            }),
        })
    }
}

/// Requests refused while a NOSPACE alarm is active, as etcd's capped applier does:
/// puts, transactions that write, and lease grants.
pub fn grows_store(op: Option<&InternalOp>) -> bool {
    match op {
        Some(InternalOp::Put(_)) | Some(InternalOp::LeaseGrant(_)) => true,
        Some(InternalOp::Txn(t)) => !apply::txn_is_read_only(t),
        _ => false,
    }
}

/// Requests refused while a CORRUPT alarm is active: everything that changes keys,
/// leases or the compaction point.
fn changes_keys(op: Option<&InternalOp>) -> bool {
    match op {
        Some(InternalOp::Txn(t)) => !apply::txn_is_read_only(t),
        Some(
            InternalOp::Put(_)
            | InternalOp::DeleteRange(_)
            | InternalOp::Compaction(_)
            | InternalOp::LeaseGrant(_)
            | InternalOp::LeaseRevoke(_),
        ) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
