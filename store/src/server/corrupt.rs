//! The periodic corruption check (etcd's `--experimental-corrupt-check-time`).
//!
//! Every interval the leader computes HashKV at its current revision and asks every
//! other member (over its peer URL, where client auth does not apply) for HashKV at
//! the same revision. A member that answers for the same revision and the same
//! compaction point with a different hash has diverged from the log: the leader
//! raises a CORRUPT alarm for it through raft. While any CORRUPT alarm is active,
//! writes are refused with `etcdserver: corrupt cluster`, as etcd refuses them, until
//! an operator has repaired the member and disarmed the alarm. Members that have not
//! reached the revision yet, or are unreachable, are skipped until the next round.

use std::sync::Arc;
use std::time::Duration;

use pontoon_proto::etcdserverpb::alarm_request::AlarmAction;
use pontoon_proto::etcdserverpb::{AlarmRequest, AlarmType, HashKvRequest};
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::peer::raft_peer_client::RaftPeerClient;

use super::EtcdServer;

/// One member's answer: (hash, compact revision, hash revision).
pub type PeerHash = (u32, i64, i64);

/// The members whose hash at `rev` contradicts ours (same revision, same compaction
/// point, different hash).
pub fn diverged(ours: PeerHash, peers: &[(u64, PeerHash)]) -> Vec<u64> {
    peers
        .iter()
        .filter(|(_, (h, compact, rev))| *rev == ours.2 && *compact == ours.1 && *h != ours.0)
        .map(|(id, _)| *id)
        .collect()
}

async fn peer_hash(urls: &[String], rev: i64) -> Option<PeerHash> {
    for url in urls {
        let Some(endpoint) = crate::raft::transport::endpoint(url) else {
            continue;
        };
        let Ok(channel) = endpoint.connect().await else {
            continue;
        };
        let mut c = RaftPeerClient::new(channel);
        if let Ok(r) = c.hash_kv(HashKvRequest { revision: rev }).await {
            let r = r.into_inner();
            return Some((r.hash, r.compact_revision, r.hash_revision));
        }
    }
    None
}

/// Runs the check every `every` on the leader, until dropped.
pub async fn run(server: Arc<EtcdServer>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if !server.raft.status().is_leader() {
            continue;
        }
        let rev = server.mvcc.current_revision();
        let mvcc = server.mvcc.clone();
        let ours = match tokio::task::spawn_blocking(move || mvcc.hash_kv(rev)).await {
            Ok(Ok(h)) => h,
            _ => continue,
        };
        let Ok(members) = server.mvcc.members() else {
            continue;
        };
        let mut answers = Vec::new();
        for m in members.iter().filter(|m| m.id != server.member_id) {
            if let Some(h) = peer_hash(&m.peer_ur_ls, rev).await {
                answers.push((m.id, h));
            }
        }
        for id in diverged(ours, &answers) {
            tracing::error!(
                member = %format!("{id:x}"),
                revision = rev,
                "HashKV mismatch: member has diverged; raising CORRUPT alarm"
            );
            let alarm = InternalOp::Alarm(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: id,
                alarm: AlarmType::Corrupt as i32,
            });
            if let Err(e) = server.raft.propose(alarm).await {
                tracing::warn!(error = %e, "raising the CORRUPT alarm failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_contradicting_hash_at_the_same_point_is_divergence() {
        let ours = (7, 10, 100);
        let peers = [
            (1, (7, 10, 100)), // agrees
            (2, (8, 10, 100)), // diverged
            (3, (8, 11, 100)), // compacted elsewhere: not comparable
            (4, (8, 10, 99)),  // answered for another revision
        ];
        assert_eq!(diverged(ours, &peers), vec![2]);
    }
}
