//! Cluster membership as state-machine data.
//!
//! Each member is one `meta` record `member/<id as 16 hex digits>` holding an
//! `etcdserverpb.Member`; a removed member leaves a `removed/<id>` record, so a
//! removed member is recognised (and refused) if it ever comes back, as in etcd.
//!
//! Membership changes are raft log entries (conf changes, plus normal entries for a
//! member's published attributes and peer-URL updates) and are written in the same
//! RocksDB batch as the applied index, like every other change: after a crash the
//! member list is exactly the one of the last applied entry. Raft's own voter and
//! learner sets are derived from these records ([`MvccStore::voters_and_learners`]),
//! so the two cannot disagree.

use prost::Message;
use rocksdb::WriteBatch;

use pontoon_proto::etcdserverpb::Member;

use super::{MvccStore, CF_META};
use crate::error::{Error, Result};

const MEMBER_PREFIX: &str = "member/";
const REMOVED_PREFIX: &str = "removed/";

fn member_key(id: u64) -> String {
    format!("{MEMBER_PREFIX}{id:016x}")
}

fn removed_key(id: u64) -> String {
    format!("{REMOVED_PREFIX}{id:016x}")
}

/// One committed membership change.
#[derive(Clone, Debug, PartialEq)]
pub enum MemberChange {
    /// A new voter or learner (`is_learner`), with its peer URLs.
    Add(Member),
    /// A learner becomes a voter.
    Promote(u64),
    Remove(u64),
    /// A started member publishes its name and client URLs.
    Attributes(Member),
    /// MemberUpdate: new peer URLs.
    PeerUrls(Member),
}

impl MvccStore {
    /// Every current member, ordered by ID.
    pub fn members(&self) -> Result<Vec<Member>> {
        let mut out = Vec::new();
        let cf = self.cf(CF_META);
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek(MEMBER_PREFIX.as_bytes());
        while it.valid() {
            let k = it.key().expect("valid iterator has a key");
            if !k.starts_with(MEMBER_PREFIX.as_bytes()) {
                break;
            }
            out.push(Member::decode(
                it.value().expect("valid iterator has a value"),
            )?);
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    pub fn member(&self, id: u64) -> Result<Option<Member>> {
        match self.db.get_pinned_cf(self.cf(CF_META), member_key(id))? {
            Some(v) => Ok(Some(Member::decode(&v[..])?)),
            None => Ok(None),
        }
    }

    /// True if `id` was a member and was removed.
    pub fn is_removed(&self, id: u64) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_META), removed_key(id))?
            .is_some())
    }

    /// Raft's voters and learners, from the member records.
    pub fn voters_and_learners(&self) -> Result<(Vec<u64>, Vec<u64>)> {
        let (learners, voters): (Vec<Member>, Vec<Member>) =
            self.members()?.into_iter().partition(|m| m.is_learner);
        Ok((
            voters.iter().map(|m| m.id).collect(),
            learners.iter().map(|m| m.id).collect(),
        ))
    }

    /// Records the members of a new cluster (or the cluster this member joins), once,
    /// before any entry is applied.
    pub fn bootstrap_members(&self, members: &[Member]) -> Result<()> {
        if !self.members()?.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for m in members {
            batch.put_cf(self.cf(CF_META), member_key(m.id), m.encode_to_vec());
        }
        self.write_sync(batch)
    }

    /// Applies a committed membership change of entry `index` and returns the new
    /// member list. A change that no longer makes sense (an unknown member, an ID that
    /// already exists) leaves the members as they are: every member reaches the same
    /// decision from the same entry.
    pub fn apply_member_change(&self, index: u64, change: &MemberChange) -> Result<Vec<Member>> {
        self.flush_round()?;
        let mut batch = WriteBatch::default();
        let meta = self.cf(CF_META);
        match change {
            MemberChange::Add(m) => {
                if self.member(m.id)?.is_none() && !self.is_removed(m.id)? {
                    let m = Member {
                        id: m.id,
                        name: String::new(),
                        peer_ur_ls: m.peer_ur_ls.clone(),
                        client_ur_ls: Vec::new(),
                        is_learner: m.is_learner,
                    };
                    batch.put_cf(meta, member_key(m.id), m.encode_to_vec());
                }
            }
            MemberChange::Promote(id) => {
                if let Some(mut m) = self.member(*id)? {
                    m.is_learner = false;
                    batch.put_cf(meta, member_key(m.id), m.encode_to_vec());
                }
            }
            MemberChange::Remove(id) => {
                if self.member(*id)?.is_some() {
                    batch.delete_cf(meta, member_key(*id));
                    batch.put_cf(meta, removed_key(*id), []);
                }
            }
            MemberChange::Attributes(a) => {
                if let Some(mut m) = self.member(a.id)? {
                    m.name = a.name.clone();
                    m.client_ur_ls = a.client_ur_ls.clone();
                    batch.put_cf(meta, member_key(m.id), m.encode_to_vec());
                }
            }
            MemberChange::PeerUrls(a) => {
                if let Some(mut m) = self.member(a.id)? {
                    m.peer_ur_ls = a.peer_ur_ls.clone();
                    batch.put_cf(meta, member_key(m.id), m.encode_to_vec());
                }
            }
        }
        self.finish_meta(index, batch)?;
        self.members()
    }
}

/// Decodes the `Member` carried in a conf change's context.
pub fn decode_member(context: &[u8]) -> Result<Member> {
    Member::decode(context)
        .map_err(|e| Error::Corrupt(format!("conf change context is not a Member: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, learner: bool) -> Member {
        Member {
            id,
            name: String::new(),
            peer_ur_ls: vec![format!("http://127.0.0.1:{id}")],
            client_ur_ls: vec![],
            is_learner: learner,
        }
    }

    #[test]
    fn membership_changes_apply_once_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = MvccStore::open(dir.path()).unwrap();
            s.bootstrap_members(&[member(1, false), member(2, false)])
                .unwrap();
            s.apply_member_change(1, &MemberChange::Add(member(3, true)))
                .unwrap();
            assert_eq!(s.voters_and_learners().unwrap(), (vec![1, 2], vec![3]));
            s.apply_member_change(2, &MemberChange::Promote(3)).unwrap();
            let ms = s.apply_member_change(3, &MemberChange::Remove(1)).unwrap();
            assert_eq!(ms.iter().map(|m| m.id).collect::<Vec<_>>(), vec![2, 3]);
            // A removed ID is never re-added.
            s.apply_member_change(4, &MemberChange::Add(member(1, false)))
                .unwrap();
            let mut attrs = member(2, false);
            attrs.name = "two".into();
            attrs.client_ur_ls = vec!["http://127.0.0.1:12379".into()];
            s.apply_member_change(5, &MemberChange::Attributes(attrs))
                .unwrap();
            assert_eq!(s.applied_index(), 5);
            s.sync().unwrap();
        }
        let s = MvccStore::open(dir.path()).unwrap();
        assert_eq!(s.applied_index(), 5);
        assert!(s.is_removed(1).unwrap());
        assert_eq!(s.voters_and_learners().unwrap(), (vec![2, 3], vec![]));
        let two = s.member(2).unwrap().unwrap();
        assert_eq!(two.name, "two");
        assert_eq!(two.client_ur_ls, vec!["http://127.0.0.1:12379"]);
    }
}
