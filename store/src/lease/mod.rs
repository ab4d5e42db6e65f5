//! The lessor: when each lease expires.
//!
//! Which leases exist, their granted TTLs and attached keys live in the store and
//! change only through raft (`mvcc::lease`). The lessor adds the one thing that is not
//! replicated: each lease's *deadline*, kept in memory by the member that decides
//! expiry (the leader) and pushed back by keep-alives. The leader proposes a revoke
//! for every lease past its deadline, so expiry is carried out identically everywhere.
//!
//! Unlike etcd (which restarts every lease at its full TTL after a restart or a
//! leader change), the lessor checkpoints each lease's remaining TTL through raft at
//! a short interval, and a lessor that first meets a lease starts it from its last
//! checkpoint: a lease outlives a restart by at most one checkpoint interval.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::mvcc::lease::LeaseRecord;

#[derive(Default)]
pub struct Lessor {
    deadlines: Mutex<HashMap<i64, Instant>>,
}

/// Whole seconds left until `deadline`, rounded up, as etcd reports TTLs.
fn secs_left(deadline: Instant, now: Instant) -> i64 {
    let left = deadline.saturating_duration_since(now);
    (left.as_millis() as i64 + 999) / 1000
}

impl Lessor {
    /// The deadline of `rec`, starting it if this lessor has not seen it yet.
    fn deadline(
        &self,
        map: &mut HashMap<i64, Instant>,
        rec: &LeaseRecord,
        now: Instant,
    ) -> Instant {
        *map.entry(rec.id).or_insert_with(|| {
            let start = if rec.remaining > 0 {
                rec.remaining
            } else {
                rec.ttl
            };
            now + Duration::from_secs(start.max(0) as u64)
        })
    }

    /// A lease was just granted (or is being kept alive): full TTL from now.
    pub fn refresh(&self, rec: &LeaseRecord) -> i64 {
        let now = Instant::now();
        self.deadlines
            .lock()
            .expect("lessor lock")
            .insert(rec.id, now + Duration::from_secs(rec.ttl.max(0) as u64));
        rec.ttl
    }

    /// Seconds the lease has left.
    pub fn remaining(&self, rec: &LeaseRecord) -> i64 {
        let now = Instant::now();
        let mut map = self.deadlines.lock().expect("lessor lock");
        let d = self.deadline(&mut map, rec, now);
        secs_left(d, now)
    }

    /// Forgets every deadline: called when this member becomes leader, so that each
    /// lease restarts from its replicated checkpoint rather than from whatever this
    /// member last saw while it followed.
    pub fn clear(&self) {
        self.deadlines.lock().expect("lessor lock").clear();
    }

    /// Forgets a revoked lease.
    pub fn forget(&self, id: i64) {
        self.deadlines.lock().expect("lessor lock").remove(&id);
    }

    /// Given every existing lease, returns the expired ones and the remaining TTL of
    /// the others (for checkpointing); forgets leases that no longer exist.
    pub fn tick(&self, leases: &[LeaseRecord]) -> (Vec<i64>, Vec<(i64, i64)>) {
        let now = Instant::now();
        let mut map = self.deadlines.lock().expect("lessor lock");
        let live: std::collections::HashSet<i64> = leases.iter().map(|r| r.id).collect();
        map.retain(|id, _| live.contains(id));
        let mut expired = Vec::new();
        let mut remaining = Vec::new();
        for rec in leases {
            let d = self.deadline(&mut map, rec, now);
            if d <= now {
                expired.push(rec.id);
            } else {
                remaining.push((rec.id, secs_left(d, now)));
            }
        }
        (expired, remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: i64, ttl: i64, remaining: i64) -> LeaseRecord {
        LeaseRecord { id, ttl, remaining }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_keepalive_and_checkpoints() {
        let l = Lessor::default();
        let a = rec(1, 10, 0);
        let b = rec(2, 10, 3); // checkpointed with 3s left before a restart
        assert_eq!(l.refresh(&a), 10);
        assert_eq!(
            l.remaining(&b),
            3,
            "resumes from the checkpoint, not the full TTL"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        let (expired, left) = l.tick(&[a, b]);
        assert_eq!(expired, vec![2]);
        assert_eq!(left, vec![(1, 6)]);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(l.refresh(&a), 10, "keep-alive restarts the full TTL");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(l.tick(&[a]).0.is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(l.tick(&[a]).0, vec![1]);
        // A lease that no longer exists is forgotten.
        assert_eq!(l.tick(&[]), (vec![], vec![]));
    }
}
