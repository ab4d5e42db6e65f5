//! The nemesis: a fault every other `--fault-interval`, healed one interval later,
//! chosen from `--nemesis` by a generator seeded with `--seed` (which member is the
//! leader at the time is the cluster's doing, so the same seed picks the same faults
//! and the same roles, not always the same member names).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// kill -9 one member (the leader half of the time); restarted at heal.
    Kill,
    /// kill -9 the leader.
    KillLeader,
    /// kill -9 a majority (with the leader half of the time).
    KillMajority,
    /// kill -9 every member.
    KillAll,
    /// SIGSTOP a member; SIGCONT at heal.
    Pause,
    /// Cut one member (the leader half of the time) off from its peers, both ways.
    Partition,
    /// Split the members into a majority and a minority (the leader in the minority
    /// half of the time).
    PartitionMajority,
    /// Two halves that only talk through one bridge member.
    Bridge,
    /// Remove a member (the leader half of the time), wipe it, add it back.
    Membership,
    /// Compact at a recent revision (nothing to heal).
    Compact,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "kill" => Fault::Kill,
            "kill-leader" => Fault::KillLeader,
            "kill-majority" => Fault::KillMajority,
            "kill-all" => Fault::KillAll,
            "pause" => Fault::Pause,
            "partition" => Fault::Partition,
            "partition-majority" => Fault::PartitionMajority,
            "bridge" | "partition-bridge" => Fault::Bridge,
            "membership" => Fault::Membership,
            "compact" => Fault::Compact,
            other => {
                return Err(format!(
                    "unknown nemesis {other:?} (kill, kill-leader, kill-majority, kill-all, pause, \
                     partition, partition-majority, bridge, membership, compact)"
                ))
            }
        })
    }
}

/// Shuffles in place (Fisher-Yates).
fn shuffle(rng: &mut Rng, v: &mut [usize]) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// The members, shuffled, with the leader (if known) moved into the first `front`
/// places when `leader_in_front`, out of them otherwise.
fn arrange(
    rng: &mut Rng,
    n: usize,
    leader: Option<usize>,
    front: usize,
    leader_in_front: bool,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(rng, &mut order);
    if let Some(l) = leader {
        let at = order.iter().position(|x| *x == l).expect("a member");
        let target = if leader_in_front {
            rng.below(front.max(1) as u64) as usize
        } else {
            front + rng.below((n - front).max(1) as u64) as usize
        };
        if target < n {
            order.swap(at, target);
        }
    }
    order
}

/// Compacts at the current revision minus a little; the revision asked for.
async fn compact(c: &Cluster, rng: &mut Rng) -> anyhow::Result<i64> {
    let live: Vec<String> = c
        .nodes
        .iter()
        .filter(|n| n.is_up() && !n.is_paused())
        .map(|n| n.endpoint())
        .collect();
    let mut client = crate::cluster::connect(live, Duration::from_secs(3)).await?;
    let rev = client
        .get("jepsen-health", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    let at = (rev - rng.below(5) as i64).max(1);
    client.compact(at, None).await?;
    Ok(at)
}

/// What the nemesis did, for the report and for checkers.
#[derive(Default)]
pub struct Log {
    pub lines: Vec<String>,
    /// Revisions compacted at (asked for: a request that failed may still count).
    pub compactions: Vec<i64>,
}

/// Runs the nemesis until `until`.
pub async fn run(
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    faults: Vec<Fault>,
    interval: Duration,
    seed: u64,
    until: Instant,
    log: Arc<Mutex<Log>>,
) {
    if faults.is_empty() {
        return;
    }
    let mut rng = Rng::new(seed.wrapping_add(7));
    let started = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() + interval > until {
            return;
        }
        let fault = faults[rng.below(faults.len() as u64) as usize];
        let mut c = cluster.lock().await;
        let n = c.nodes.len();
        let leader = c.leader().await;
        let coin = rng.below(2) == 0;
        let one = match (leader, coin) {
            (Some(l), true) => l,
            _ => rng.below(n as u64) as usize,
        };
        let names = |c: &Cluster, ms: &[usize]| {
            ms.iter()
                .map(|&m| {
                    let mark = if leader == Some(m) { "(leader)" } else { "" };
                    format!("{}{mark}", c.nodes[m].name)
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let what = match fault {
            Fault::Kill | Fault::KillLeader => {
                let t = if fault == Fault::KillLeader {
                    leader.unwrap_or(one)
                } else {
                    one
                };
                c.kill(t);
                format!("kill -9 {}", names(&c, &[t]))
            }
            Fault::KillMajority => {
                let k = n / 2 + 1;
                let order = arrange(&mut rng, n, leader, k, coin);
                for &m in &order[..k] {
                    c.kill(m);
                }
                format!("kill -9 majority {}", names(&c, &order[..k]))
            }
            Fault::KillAll => {
                for m in 0..n {
                    c.kill(m);
                }
                "kill -9 all".to_string()
            }
            Fault::Pause => {
                let t = rng.below(n as u64) as usize;
                c.pause(t);
                format!("pause {}", names(&c, &[t]))
            }
            Fault::Partition => {
                c.isolate(one);
                format!("isolate {}", names(&c, &[one]))
            }
            Fault::PartitionMajority => {
                let minority = n / 2;
                let order = arrange(&mut rng, n, leader, minority, coin);
                let (small, big) = order.split_at(minority);
                c.partition(&[small, big]);
                format!(
                    "partition minority [{}] | majority [{}]",
                    names(&c, small),
                    names(&c, big)
                )
            }
            Fault::Bridge => {
                let mut order: Vec<usize> = (0..n).collect();
                shuffle(&mut rng, &mut order);
                let half = (n - 1) / 2;
                let (a, rest) = order.split_at(half);
                let (bridge, b) = rest.split_at(rest.len() - half);
                c.partition(&[a, b]);
                format!(
                    "bridge [{}] - [{}] - [{}]",
                    names(&c, a),
                    names(&c, bridge),
                    names(&c, b)
                )
            }
            Fault::Membership => match c.remove_and_readd(one).await {
                Ok(()) => format!("remove and re-add {}", names(&c, &[one])),
                Err(e) => format!("membership change failed for {}: {e:#}", names(&c, &[one])),
            },
            Fault::Compact => match compact(&c, &mut rng).await {
                Ok(at) => {
                    log.lock().expect("log").compactions.push(at);
                    format!("compact at revision {at}")
                }
                Err(e) => format!("compaction failed: {e:#}"),
            },
        };
        let line = format!("{:>6.1}s {what}", started.elapsed().as_secs_f64());
        eprintln!("nemesis: {line}");
        log.lock().expect("log").lines.push(line);
        drop(c);
        if fault == Fault::Compact {
            continue;
        }
        tokio::time::sleep(interval).await;
        let mut c = cluster.lock().await;
        if let Err(e) = c.heal() {
            eprintln!("nemesis: heal failed: {e}");
        }
        log.lock()
            .expect("log")
            .lines
            .push(format!("{:>6.1}s heal", started.elapsed().as_secs_f64()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_lands_where_asked() {
        let mut rng = Rng::new(1);
        for _ in 0..50 {
            let o = arrange(&mut rng, 5, Some(3), 2, true);
            assert!(o[..2].contains(&3), "{o:?}");
            let o = arrange(&mut rng, 5, Some(3), 2, false);
            assert!(o[2..].contains(&3), "{o:?}");
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn names_parse() {
        for s in [
            "kill",
            "kill-all",
            "partition-majority",
            "bridge",
            "compact",
        ] {
            assert!(s.parse::<Fault>().is_ok(), "{s}");
        }
        assert!("flood".parse::<Fault>().is_err());
    }
}
