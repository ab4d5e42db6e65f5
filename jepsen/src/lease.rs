//! The `lease` workload: clients grant leases with short TTLs, put one key on each,
//! keep some alive, revoke some, abandon the rest to expire, and read the whole
//! prefix all the while.
//!
//! What etcd promises, and so what is checked (a key's put is acknowledged before the
//! read in question was invoked; reads are linearizable):
//!
//! - **never after an acknowledged revoke**: a read invoked after a revoke of the
//!   key's lease was acknowledged must not see the key;
//! - **not before it could expire**: a read that completed before the grant's
//!   invocation + TTL, with no revoke of the lease invoked before it completed, must
//!   see the key. The leader sets expiry to apply time + TTL, later than our
//!   invocation, and a new leader only extends it, so this bound is safe under any
//!   fault; keep-alive acknowledgements are *not* used to extend it, because a
//!   deposed leader that does not know it yet may still acknowledge them;
//! - **gone stays gone**: once a read saw the key absent (after its put was
//!   acknowledged), no read invoked later may see it again;
//! - **expiry happens**: after the run, with nobody keeping anything alive and the
//!   faults healed, every key is gone within [`DRAIN`].
//!
//! How *late* an abandoned lease expires is not promised (leader changes restart the
//! TTL; etcd issues #9395, #13294), so it is reported as a note, not a violation.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, LeaseGrantOptions, PutOptions};
use serde::{Deserialize, Serialize};

use crate::history::{outcome, Status};
use crate::rng::Rng;
use crate::{Clock, RunConfig};

pub const PREFIX: &str = "jepsen/l/";

/// How long expiry may take once the run is over and the cluster healed.
pub const DRAIN: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    Grant {
        lease: i64,
        ttl: i64,
    },
    /// Puts the lease's key, attached to it.
    Put {
        lease: i64,
    },
    KeepAlive {
        lease: i64,
    },
    Revoke {
        lease: i64,
    },
    /// Reads the whole prefix.
    Read,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ret {
    /// A grant's or keep-alive's TTL in seconds (<= 0: the lease is gone).
    Ttl(i64),
    Done,
    /// The leases whose keys a read saw.
    Keys(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseOp {
    pub process: usize,
    pub call: Call,
    pub ret: Option<Ret>,
    pub status: Status,
    pub invoke: u64,
    /// `None` when indeterminate.
    pub complete: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn key(lease: i64) -> String {
    format!("{PREFIX}{lease:016x}")
}

fn lease_of(key: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(key).ok()?.strip_prefix(PREFIX)?;
    i64::from_str_radix(s, 16).ok()
}

/// The operations of a run (shared with the lock workload) and lease IDs to use.
pub struct Recorder {
    pub clock: Clock,
    pub ops: Mutex<Vec<LeaseOp>>,
    next_lease: AtomicI64,
}

impl Recorder {
    pub fn new(clock: Clock, seed: u64) -> Self {
        // Client-chosen lease IDs: known even when a grant is indeterminate.
        Recorder {
            clock,
            ops: Mutex::new(Vec::new()),
            next_lease: AtomicI64::new(((seed % 1000) as i64 + 1) << 32),
        }
    }

    pub fn new_lease(&self) -> i64 {
        self.next_lease.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs and records one request; `Some` with its result when it succeeded.
    /// A failed read is a `fail` (reads have no effect); so is a definite error.
    pub async fn record<F>(
        &self,
        process: usize,
        call: Call,
        timeout: Duration,
        request: F,
    ) -> Option<Ret>
    where
        F: Future<Output = Result<Ret, etcd_client::Error>>,
    {
        let invoke = self.clock.now();
        let result = tokio::time::timeout(timeout, request).await;
        let complete = self.clock.now();
        let (status, ret, error) = outcome(result.ok(), call == Call::Read);
        self.ops.lock().expect("ops lock").push(LeaseOp {
            process,
            call,
            ret: ret.clone(),
            status,
            invoke,
            complete: (status != Status::Info).then_some(complete),
            error,
        });
        ret
    }

    /// Grants a new lease (its ID chosen here) and records it; the ID if acknowledged.
    pub async fn grant(
        &self,
        c: &mut etcd_client::Client,
        process: usize,
        ttl: i64,
        timeout: Duration,
    ) -> Option<i64> {
        let lease = self.new_lease();
        let grant = c.lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(lease)));
        self.record(process, Call::Grant { lease, ttl }, timeout, async {
            grant.await.map(|r| Ret::Ttl(r.ttl()))
        })
        .await
        .map(|_| lease)
    }

    /// Revokes a lease and records it; true if acknowledged.
    pub async fn revoke(
        &self,
        c: &mut etcd_client::Client,
        process: usize,
        lease: i64,
        timeout: Duration,
    ) -> bool {
        let revoke = c.lease_revoke(lease);
        self.record(process, Call::Revoke { lease }, timeout, async {
            revoke.await.map(|_| Ret::Done)
        })
        .await
        .is_some()
    }

    /// Sends one keep-alive and records it; true if answered.
    pub async fn keep_alive(&self, process: usize, k: &mut Keeper, timeout: Duration) -> bool {
        let lease = k.lease;
        self.record(process, Call::KeepAlive { lease }, timeout, k.once())
            .await
            .is_some()
    }

    pub fn write_history(&self, path: &Path) -> std::io::Result<()> {
        let mut ops = self.ops.lock().expect("ops lock").clone();
        ops.sort_by_key(|o| o.invoke);
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        for o in ops {
            serde_json::to_writer(&mut f, &o)?;
            f.write_all(b"\n")?;
        }
        f.flush()
    }
}

/// An open keep-alive stream of one lease.
pub struct Keeper {
    lease: i64,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

impl Keeper {
    /// Opens the stream (nothing is sent yet, so nothing to record).
    pub async fn open(c: &mut etcd_client::Client, lease: i64, timeout: Duration) -> Option<Self> {
        let (keeper, stream) = tokio::time::timeout(timeout, c.lease_keep_alive(lease))
            .await
            .ok()?
            .ok()?;
        Some(Keeper {
            lease,
            keeper,
            stream,
        })
    }

    /// Sends one keep-alive; the TTL the server answered.
    async fn once(&mut self) -> Result<Ret, etcd_client::Error> {
        self.keeper.keep_alive().await?;
        match self.stream.message().await? {
            Some(r) => Ok(Ret::Ttl(r.ttl())),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream ended".into(),
            )),
        }
    }
}

async fn read_prefix(c: &mut etcd_client::Client) -> Result<Ret, etcd_client::Error> {
    let r = c
        .get(
            PREFIX,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    Ok(Ret::Keys(
        r.kvs().iter().filter_map(|kv| lease_of(kv.key())).collect(),
    ))
}

pub async fn client(
    rec: Arc<Recorder>,
    cfg: RunConfig,
    endpoint: String,
    index: usize,
    until: Instant,
) {
    let mut rng = Rng::for_client(cfg.seed, index);
    let t = cfg.op_timeout;
    let mut client: Option<etcd_client::Client> = None;
    while Instant::now() < until {
        let Some(c) = crate::cluster::connected(&mut client, &endpoint, t).await else {
            continue;
        };
        let ttl = 2 + rng.below(2) as i64;
        let Some(lease) = rec.grant(c, index, ttl, t).await else {
            client = None;
            continue;
        };
        let put = c.put(key(lease), "x", Some(PutOptions::new().with_lease(lease)));
        let put = rec.record(index, Call::Put { lease }, t, async {
            put.await.map(|_| Ret::Done)
        });
        if put.await.is_none() {
            client = None;
            continue;
        }
        // 0: keep alive past the TTL, then revoke; 1: revoke within the TTL;
        // 2: abandon it to expire.
        let plan = rng.below(3);
        let ttl_ms = ttl as u64 * 1000;
        let hold = Duration::from_millis(match plan {
            0 => ttl_ms + rng.below(1500),
            1 => rng.below(ttl_ms),
            _ => rng.below(300),
        });
        let hold_until = Instant::now() + hold;
        let mut keeper = None;
        if plan == 0 {
            keeper = Keeper::open(c, lease, t).await;
        }
        let mut next_keep_alive = Instant::now() + Duration::from_millis(ttl_ms / 3);
        let mut broken = false;
        while Instant::now() < hold_until && Instant::now() < until && !broken {
            let read = rec.record(index, Call::Read, t, read_prefix(c));
            broken |= read.await.is_none();
            if let (Some(k), true) = (&mut keeper, Instant::now() >= next_keep_alive) {
                broken |= !rec.keep_alive(index, k, t).await;
                next_keep_alive = Instant::now() + Duration::from_millis(ttl_ms / 3);
            }
            tokio::time::sleep(Duration::from_millis(50 + rng.below(100))).await;
        }
        if plan != 2 && !broken {
            broken |= !rec.revoke(c, index, lease, t).await;
        }
        if broken {
            client = None;
        }
    }
}

/// After the run: waits up to [`DRAIN`] for every key to expire; the leases whose
/// keys are still there.
pub async fn drain(endpoints: Vec<String>) -> Vec<i64> {
    let deadline = Instant::now() + DRAIN;
    let mut left = Vec::new();
    while Instant::now() < deadline {
        if let Ok(mut c) = crate::cluster::connect(endpoints.clone(), Duration::from_secs(3)).await
        {
            if let Ok(Ret::Keys(k)) = read_prefix(&mut c).await {
                left = k;
                if left.is_empty() {
                    return left;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    left
}

/// What one lease went through.
#[derive(Default)]
struct Life {
    /// Invocation of its grant and the TTL asked for (the server may only raise it).
    granted: Option<(u64, i64)>,
    put_acked: Option<u64>,
    revoke_invoked: Option<u64>,
    revoke_acked: Option<u64>,
    kept_alive: bool,
}

/// Checks a lease history; returns (violations, notes).
pub fn check(ops: &[LeaseOp]) -> (Vec<String>, Vec<String>) {
    let mut lives: HashMap<i64, Life> = HashMap::new();
    for o in ops {
        let live = o.status != Status::Fail;
        match &o.call {
            Call::Grant { lease, ttl } if live => {
                lives.entry(*lease).or_default().granted = Some((o.invoke, *ttl));
            }
            Call::Put { lease } if o.status == Status::Ok => {
                lives.entry(*lease).or_default().put_acked = o.complete;
            }
            Call::KeepAlive { lease } => lives.entry(*lease).or_default().kept_alive = true,
            Call::Revoke { lease } if live => {
                let l = lives.entry(*lease).or_default();
                l.revoke_invoked = Some(l.revoke_invoked.map_or(o.invoke, |t| t.min(o.invoke)));
                if o.status == Status::Ok {
                    let done = o.complete.expect("ok ops complete");
                    l.revoke_acked = Some(l.revoke_acked.map_or(done, |t| t.min(done)));
                }
            }
            _ => {}
        }
    }
    let mut reads: Vec<(u64, u64, &Vec<i64>)> = ops
        .iter()
        .filter_map(|o| match (&o.ret, o.complete) {
            (Some(Ret::Keys(k)), Some(c)) if o.status == Status::Ok => Some((o.invoke, c, k)),
            _ => None,
        })
        .collect();
    reads.sort_by_key(|r| r.0);
    let mut violations = Vec::new();
    let ms = |t: u64| t as f64 / 1e6;
    // Per lease, the earliest completion of a read that saw its key gone.
    let mut gone_seen: HashMap<i64, u64> = HashMap::new();
    // Per abandoned lease, the latest read that still saw it, after its TTL.
    let mut late: HashMap<i64, u64> = HashMap::new();
    for &(a, b, keys) in &reads {
        for (lease, life) in &lives {
            let Some(put) = life.put_acked.filter(|p| *p < a) else {
                continue;
            };
            let present = keys.contains(lease);
            if present {
                if let Some(r) = life.revoke_acked.filter(|r| *r < a) {
                    violations.push(format!(
                        "lease {lease:x}: its key was read at {:.1}..{:.1} ms, after a revoke acknowledged at {:.1} ms",
                        ms(a), ms(b), ms(r)
                    ));
                }
                if let Some(g) = gone_seen.get(lease).filter(|g| **g < a) {
                    violations.push(format!(
                        "lease {lease:x}: its key was read at {:.1}..{:.1} ms, after a read completed at {:.1} ms had seen it gone",
                        ms(a), ms(b), ms(*g)
                    ));
                }
                if let Some((g, ttl)) = life.granted {
                    if !life.kept_alive && life.revoke_invoked.is_none() {
                        let lateness = a.saturating_sub(g + ttl as u64 * 1_000_000_000);
                        if lateness > 0 {
                            let l = late.entry(*lease).or_default();
                            *l = (*l).max(lateness);
                        }
                    }
                }
            } else {
                gone_seen.entry(*lease).or_insert(b);
                let revoked_before = life.revoke_invoked.is_some_and(|r| r < b);
                if let Some((g, ttl)) = life.granted {
                    if !revoked_before && b < g + ttl as u64 * 1_000_000_000 {
                        violations.push(format!(
                            "lease {lease:x} (TTL {ttl} s, granted at {:.1} ms, put acknowledged at {:.1} ms): \
                             its key was missing from a read at {:.1}..{:.1} ms, before the lease could expire",
                            ms(g), ms(put), ms(a), ms(b)
                        ));
                    }
                }
            }
        }
    }
    let mut notes = vec![format!(
        "{} leases, {} reads, {} revokes acknowledged",
        lives.len(),
        reads.len(),
        lives.values().filter(|l| l.revoke_acked.is_some()).count()
    )];
    if let Some(worst) = late.values().max() {
        notes.push(format!(
            "{} abandoned leases were still readable after invocation + TTL, by up to {:.2} s \
             (not a violation: expiry may be late, e.g. across leader changes)",
            late.len(),
            *worst as f64 / 1e9
        ));
    }
    (violations, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn op(call: Call, ret: Option<Ret>, status: Status, a: u64, b: u64) -> LeaseOp {
        LeaseOp {
            process: 0,
            call,
            ret,
            status,
            invoke: a,
            complete: (status != Status::Info).then_some(b),
            error: None,
        }
    }
    fn ok(call: Call, ret: Ret, a: u64, b: u64) -> LeaseOp {
        op(call, Some(ret), Status::Ok, a, b)
    }
    fn read(keys: &[i64], a: u64, b: u64) -> LeaseOp {
        ok(Call::Read, Ret::Keys(keys.to_vec()), a, b)
    }
    /// Lease 1 with TTL 2 s granted at 0, its key put by 0.1 s.
    fn granted() -> Vec<LeaseOp> {
        vec![
            ok(Call::Grant { lease: 1, ttl: 2 }, Ret::Ttl(2), 0, S / 20),
            ok(Call::Put { lease: 1 }, Ret::Done, S / 20, S / 10),
        ]
    }

    #[test]
    fn a_revoked_lease_is_gone_and_an_expiring_one_may_linger() {
        let mut h = granted();
        h.push(read(&[1], S / 2, S / 2 + 10));
        h.push(ok(Call::Revoke { lease: 1 }, Ret::Done, S, S + 10));
        h.push(read(&[], S + 20, S + 30));
        assert_eq!(check(&h).0, Vec::<String>::new());
        // Without a revoke, readable long after the TTL: only a note.
        let mut h = granted();
        h.push(read(&[1], 5 * S, 5 * S + 10));
        let (v, notes) = check(&h);
        assert_eq!(v, Vec::<String>::new());
        assert!(notes.iter().any(|n| n.contains("1 abandoned")), "{notes:?}");
    }

    #[test]
    fn a_read_after_an_acknowledged_revoke_must_not_see_the_key() {
        let mut h = granted();
        h.push(ok(Call::Revoke { lease: 1 }, Ret::Done, S / 2, S / 2 + 10));
        h.push(read(&[1], S / 2 + 20, S / 2 + 30));
        let v = check(&h).0;
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("after a revoke acknowledged"));
        // A read concurrent with the revoke may see it.
        let mut h = granted();
        h.push(ok(Call::Revoke { lease: 1 }, Ret::Done, S / 2, S / 2 + 10));
        h.push(read(&[1], S / 2 + 5, S / 2 + 30));
        assert_eq!(check(&h).0, Vec::<String>::new());
    }

    #[test]
    fn a_key_may_not_vanish_before_its_lease_could_expire() {
        let mut h = granted();
        h.push(read(&[], S, S + 10));
        assert!(check(&h).0[0].contains("before the lease could expire"));
        // Unless a revoke was invoked (even one that is indeterminate).
        h.insert(
            2,
            op(Call::Revoke { lease: 1 }, None, Status::Info, S / 2, 0),
        );
        assert_eq!(check(&h).0, Vec::<String>::new());
        // After the TTL it may be gone.
        let mut h = granted();
        h.push(read(&[], 2 * S + 1, 2 * S + 10));
        assert_eq!(check(&h).0, Vec::<String>::new());
    }

    #[test]
    fn a_key_seen_gone_stays_gone() {
        let mut h = granted();
        h.push(read(&[], 3 * S, 3 * S + 10));
        h.push(read(&[1], 3 * S + 20, 3 * S + 30));
        let v = check(&h).0;
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("had seen it gone"));
        // Concurrent reads may disagree.
        let mut h = granted();
        h.push(read(&[], 3 * S, 3 * S + 30));
        h.push(read(&[1], 3 * S + 10, 3 * S + 20));
        assert_eq!(check(&h).0, Vec::<String>::new());
    }

    #[test]
    fn keys_name_their_lease() {
        assert_eq!(
            lease_of(key(0x1234_0000_0007).as_bytes()),
            Some(0x1234_0000_0007)
        );
        assert_eq!(lease_of(b"other/1"), None);
    }
}
