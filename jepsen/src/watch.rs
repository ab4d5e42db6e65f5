//! The `watch` workload: writers put unique values under one prefix while watchers,
//! spread over the members, watch the prefix from revision 1 and resume from their
//! last revision + 1 on any error (on another member), as etcd clients do.
//!
//! Every revision of the cluster belongs to this workload, so etcd's guarantees reduce
//! to checks on plain sequences. For every watcher:
//!
//! - **ordered / unique**: revisions strictly increase;
//! - **reliable / resumable**: no revision is missing between 2 and the final revision,
//!   across every reconnect;
//! - **correct**: each acknowledged put appears at the revision its response named,
//!   with its key and value;
//! - **agreement**: all watchers report the same key and value for a revision.
//!
//! With the `compact` nemesis, watchers also fall behind on purpose now and then
//! (they drop their stream and wait before resuming), so that a compaction overtakes
//! them. etcd then cancels the resumed watch with `compact_revision` set: the events
//! before it are gone for good, and the watcher resumes from `compact_revision`. So a
//! watcher may skip revisions only inside such announced gaps, and an announcement
//! must be true: `compact_revision` above the revision the watcher asked for, and not
//! above a revision the nemesis compacted at.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};

const PREFIX: &str = "jepsen/w/";

/// One event as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub rev: i64,
    pub key: String,
    pub value: String,
}

/// What the writers and watchers recorded.
#[derive(Default)]
pub struct WatchHistory {
    /// Acknowledged puts: revision -> (key, value).
    pub acked: BTreeMap<i64, (String, String)>,
    /// Per watcher, the events in the order received.
    pub watchers: Vec<Vec<Seen>>,
    /// Per watcher, the revisions (from, to) a compaction notice told it it had lost.
    pub gaps: Vec<Vec<(i64, i64)>>,
    /// The revisions the nemesis compacted at.
    pub compactions: Vec<i64>,
    pub reconnects: usize,
}

pub async fn writer(
    endpoint: String,
    index: usize,
    keys: usize,
    until: Instant,
    per_op: Duration,
    out: Arc<Mutex<WatchHistory>>,
) {
    let mut client = None;
    let mut n = 0u64;
    while Instant::now() < until {
        if client.is_none() {
            client = crate::cluster::connect(vec![endpoint.clone()], Duration::from_secs(3))
                .await
                .ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let c = client.as_mut().expect("connected");
        n += 1;
        let key = format!("{PREFIX}{}", (index as u64 * 7919 + n) % keys as u64);
        let value = format!("w{index}-{n}");
        let started = Instant::now();
        // The client's request timeout (3 s) bounds the put.
        match c.put(key.as_str(), value.as_str(), None).await {
            Ok(r) => {
                let rev = r.header().map_or(0, |h| h.revision());
                out.lock().expect("lock").acked.insert(rev, (key, value));
            }
            _ => client = None,
        }
        if let Some(rest) = per_op.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// Watches the prefix from revision 1 until it has seen `final_rev` (set once the
/// writers stopped and the cluster healed) or `give_up`. With `lag` (a seed), it
/// drops its stream every few seconds and waits a while before resuming.
pub async fn watcher(
    endpoints: Vec<String>,
    index: usize,
    final_rev: Arc<Mutex<Option<i64>>>,
    give_up: Instant,
    lag: Option<u64>,
    out: Arc<Mutex<WatchHistory>>,
) {
    let mut seen: Vec<Seen> = Vec::new();
    let mut gaps: Vec<(i64, i64)> = Vec::new();
    let mut rng = crate::rng::Rng::new(lag.unwrap_or(0) ^ ((index as u64 + 1) * 31));
    let mut next_lag = Instant::now() + Duration::from_millis(1000 + rng.below(3000));
    let mut next = 1i64;
    let mut member = index;
    let mut reconnects = 0;
    'outer: while Instant::now() < give_up {
        if final_rev.lock().expect("lock").is_some_and(|f| next > f) {
            break;
        }
        let ep = endpoints[member % endpoints.len()].clone();
        member += 1;
        let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(2),
            etcd_client::Client::connect([ep], None),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), c.watch(PREFIX, Some(opts))).await
        else {
            continue;
        };
        loop {
            if final_rev.lock().expect("lock").is_some_and(|f| next > f) {
                break 'outer;
            }
            if lag.is_some()
                && Instant::now() > next_lag
                && final_rev.lock().expect("lock").is_none()
            {
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
                next_lag = Instant::now() + Duration::from_millis(1000 + rng.below(3000));
                reconnects += 1;
                continue 'outer;
            }
            let msg = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            let resp = match msg {
                Err(_) => {
                    if Instant::now() > give_up {
                        break 'outer;
                    }
                    continue; // idle; check for the end
                }
                Ok(Ok(Some(r))) => r,
                Ok(_) => {
                    reconnects += 1;
                    continue 'outer; // stream broken: resume elsewhere
                }
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    // The events from `next` up to the compaction are gone for good.
                    gaps.push((next, resp.compact_revision() - 1));
                    next = next.max(resp.compact_revision());
                }
                reconnects += 1;
                continue 'outer;
            }
            for e in resp.events() {
                let Some(kv) = e.kv() else { continue };
                if e.event_type() != EventType::Put {
                    continue;
                }
                let rev = kv.mod_revision();
                seen.push(Seen {
                    rev,
                    key: kv.key_str().unwrap_or_default().to_string(),
                    value: kv.value_str().unwrap_or_default().to_string(),
                });
                next = next.max(rev + 1);
            }
        }
    }
    let mut h = out.lock().expect("lock");
    h.watchers[index] = seen;
    h.gaps[index] = gaps;
    h.reconnects += reconnects;
}

/// Checks the guarantees listed in the module note; returns the violations found.
pub fn check(h: &WatchHistory, final_rev: i64) -> Vec<String> {
    let mut problems = Vec::new();
    let mut agreed: BTreeMap<i64, (String, String)> = BTreeMap::new();
    let no_gaps = Vec::new();
    let gaps_of = |w: usize| h.gaps.get(w).unwrap_or(&no_gaps);
    let compacted_max = h.compactions.iter().copied().max().unwrap_or(0);
    // Whether every revision in from..=to lies in one of the watcher's gaps.
    let excused = |w: usize, from: i64, to: i64| {
        let mut r = from;
        while r <= to {
            match gaps_of(w).iter().find(|(a, b)| *a <= r && r <= *b) {
                Some(&(_, b)) => r = b + 1,
                None => return false,
            }
        }
        true
    };
    for (w, events) in h.watchers.iter().enumerate() {
        for &(from, to) in gaps_of(w) {
            if to < from {
                problems.push(format!(
                    "watcher {w}: cancelled as compacted at {} though it asked to start at {from}",
                    to + 1
                ));
            }
            if to + 1 > compacted_max {
                problems.push(format!(
                    "watcher {w}: told revisions up to {} were compacted, but the nemesis compacted at most at {compacted_max}",
                    to + 1
                ));
            }
        }
        let mut last = 1i64;
        for e in events {
            if e.rev <= last {
                problems.push(format!(
                    "watcher {w}: revision {} after {last} (not ordered / duplicated)",
                    e.rev
                ));
            } else if e.rev != last + 1 && !excused(w, last + 1, e.rev - 1) {
                problems.push(format!(
                    "watcher {w}: revisions {}..{} missing (event lost)",
                    last + 1,
                    e.rev - 1
                ));
            }
            last = last.max(e.rev);
            match agreed.get(&e.rev) {
                Some((k, v)) if (k, v) != (&e.key, &e.value) => problems.push(format!(
                    "watcher {w}: revision {} is {}={} but another watcher saw {k}={v}",
                    e.rev, e.key, e.value
                )),
                Some(_) => {}
                None => {
                    agreed.insert(e.rev, (e.key.clone(), e.value.clone()));
                }
            }
        }
        let gap_end = gaps_of(w).iter().map(|g| g.1).max().unwrap_or(0);
        if last.max(gap_end) < final_rev {
            problems.push(format!(
                "watcher {w}: stopped at revision {last}, the store reached {final_rev}"
            ));
        }
    }
    for (rev, (k, v)) in &h.acked {
        match agreed.get(rev) {
            Some((k2, v2)) if (k2, v2) == (k, v) => {}
            Some((k2, v2)) => problems.push(format!(
                "acknowledged put {k}={v} at revision {rev}, watchers saw {k2}={v2}"
            )),
            None if (0..h.watchers.len())
                .any(|w| !h.watchers[w].is_empty() && !excused(w, *rev, *rev)) =>
            {
                problems.push(format!(
                    "acknowledged put {k}={v} at revision {rev} never reached a watcher"
                ))
            }
            None => {}
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rev: i64, v: &str) -> Seen {
        Seen {
            rev,
            key: "k".into(),
            value: v.into(),
        }
    }

    #[test]
    fn gaps_duplicates_and_disagreements_are_found() {
        let mut h = WatchHistory {
            watchers: vec![vec![s(2, "a"), s(3, "b"), s(4, "c")]],
            ..Default::default()
        };
        h.acked.insert(3, ("k".into(), "b".into()));
        assert!(check(&h, 4).is_empty(), "{:?}", check(&h, 4));
        assert!(!check(&h, 5).is_empty(), "stopped early");
        h.watchers.push(vec![s(2, "a"), s(4, "c")]);
        assert!(check(&h, 4).iter().any(|p| p.contains("missing")));
        h.watchers[1] = vec![s(2, "a"), s(3, "b"), s(3, "b"), s(4, "c")];
        assert!(check(&h, 4).iter().any(|p| p.contains("not ordered")));
        h.watchers[1] = vec![s(2, "a"), s(3, "X"), s(4, "c")];
        assert!(check(&h, 4).iter().any(|p| p.contains("another watcher")));
    }

    #[test]
    fn only_announced_compactions_excuse_a_gap() {
        let mut h = WatchHistory {
            watchers: vec![vec![s(2, "a"), s(5, "d")]],
            gaps: vec![vec![(3, 4)]],
            compactions: vec![5],
            ..Default::default()
        };
        assert!(check(&h, 5).is_empty(), "{:?}", check(&h, 5));
        // A gap longer than the announcement is a lost event.
        h.gaps = vec![vec![(3, 3)]];
        assert!(check(&h, 5).iter().any(|p| p.contains("missing")));
        // An announcement beyond any compaction is false.
        h.gaps = vec![vec![(3, 4)]];
        h.compactions = vec![4];
        assert!(check(&h, 5).iter().any(|p| p.contains("compacted at most")));
        // So is one below the revision the watcher asked for.
        h.compactions = vec![5];
        h.gaps = vec![vec![(3, 4), (6, 4)]];
        assert!(check(&h, 5).iter().any(|p| p.contains("asked to start")));
        // A watcher that ends in a gap reached the end.
        h.watchers = vec![vec![s(2, "a")]];
        h.gaps = vec![vec![(3, 4)]];
        assert!(check(&h, 4).is_empty(), "{:?}", check(&h, 4));
    }
}
