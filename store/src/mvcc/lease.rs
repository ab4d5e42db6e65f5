//! Leases in the store: their records and the keys attached to them.
//!
//! The `lease` column family holds, per lease, a record under the 8-byte big-endian
//! lease ID (granted TTL and the last checkpointed remaining TTL), and one entry per
//! attached key under the ID followed by the key. Listing a lease's keys is a prefix
//! scan, and restart rebuilds nothing per key.
//!
//! Grant, revoke and checkpoint are applied from raft like every write, so all members
//! agree on which leases exist; *when* a lease expires is decided by the leader, which
//! proposes the revoke (see `server::lease`).

use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};

use pontoon_proto::etcdserverpb::{
    LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeResponse,
    ResponseHeader,
};

use super::span::KeySpan;
use super::write::WriteTxn;
use super::{MvccStore, CF_LEASE};
use crate::error::{Error, Result};

/// etcd's largest lease TTL, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    /// The granted TTL in seconds.
    pub ttl: i64,
    /// Remaining TTL in seconds at the last checkpoint; 0 if never checkpointed.
    pub remaining: i64,
}

fn record_key(id: i64) -> [u8; 8] {
    id.to_be_bytes()
}

pub(crate) fn attachment_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn encode(r: &LeaseRecord) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&r.ttl.to_be_bytes());
    v.extend_from_slice(&r.remaining.to_be_bytes());
    v
}

fn decode(id: i64, v: &[u8]) -> Result<LeaseRecord> {
    if v.len() != 16 {
        return Err(Error::Corrupt(format!(
            "lease {id:x} record has {} bytes",
            v.len()
        )));
    }
    Ok(LeaseRecord {
        id,
        ttl: i64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
        remaining: i64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
    })
}

impl MvccStore {
    pub fn lease_get(&self, id: i64) -> Result<Option<LeaseRecord>> {
        match self.db.get_pinned_cf(self.cf(CF_LEASE), record_key(id))? {
            Some(v) => Ok(Some(decode(id, &v)?)),
            None => Ok(None),
        }
    }

    /// Every lease, in ID order.
    pub fn lease_list(&self) -> Result<Vec<LeaseRecord>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_LEASE), IteratorMode::Start) {
            let (k, v) = item?;
            if k.len() == 8 {
                let id = i64::from_be_bytes(k.as_ref().try_into().expect("8 bytes"));
                out.push(decode(id, &v)?);
            }
        }
        Ok(out)
    }

    /// The keys attached to lease `id`, in key order.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        let prefix = record_key(id);
        let mut opts = ReadOptions::default();
        if let Some(end) = id.checked_add(1) {
            opts.set_iterate_upper_bound(end.to_be_bytes().to_vec());
        }
        let mut keys = Vec::new();
        let it = self.db.iterator_cf_opt(
            self.cf(CF_LEASE),
            opts,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        for item in it {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if k.len() > 8 {
                keys.push(k[8..].to_vec());
            }
        }
        Ok(keys)
    }

    pub(crate) fn lease_exists(&self, id: i64) -> Result<bool> {
        Ok(self.lease_get(id)?.is_some())
    }

    pub(super) fn apply_lease_grant(
        &self,
        req: &LeaseGrantRequest,
        batch: &mut WriteBatch,
    ) -> Result<LeaseGrantResponse> {
        if req.ttl > MAX_LEASE_TTL {
            return Err(Error::LeaseTtlTooLarge);
        }
        if req.id <= 0 {
            return Err(Error::LeaseNotFound);
        }
        if self.lease_exists(req.id)? {
            return Err(Error::LeaseExist);
        }
        let rec = LeaseRecord {
            id: req.id,
            ttl: req.ttl,
            remaining: 0,
        };
        batch.put_cf(self.cf(CF_LEASE), record_key(req.id), encode(&rec));
        Ok(LeaseGrantResponse {
            header: Some(ResponseHeader {
                revision: self.current_revision(),
                ..Default::default()
            }),
            id: req.id,
            ttl: req.ttl,
            error: String::new(),
        })
    }

    /// Deletes every key attached to the lease (one revision, with delete events) and
    /// the lease itself.
    pub(super) fn apply_lease_revoke(
        &self,
        txn: &mut WriteTxn<'_>,
        id: i64,
    ) -> Result<LeaseRevokeResponse> {
        if !self.lease_exists(id)? {
            return Err(Error::LeaseNotFound);
        }
        for key in self.lease_keys(id)? {
            // Deleting detaches the key from the lease (see `WriteTxn`).
            txn.delete_range(&KeySpan::Single(key))?;
        }
        txn.drop_lease(id);
        Ok(LeaseRevokeResponse {
            header: Some(ResponseHeader {
                revision: txn.read_revision(),
                ..Default::default()
            }),
        })
    }

    pub(super) fn apply_lease_checkpoint(
        &self,
        req: &LeaseCheckpointRequest,
        batch: &mut WriteBatch,
    ) -> Result<()> {
        for cp in &req.checkpoints {
            if let Some(mut rec) = self.lease_get(cp.id)? {
                rec.remaining = cp.remaining_ttl.max(0);
                batch.put_cf(self.cf(CF_LEASE), record_key(cp.id), encode(&rec));
            }
        }
        Ok(())
    }
}
