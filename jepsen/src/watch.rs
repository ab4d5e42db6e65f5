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
/// writers stopped and the cluster healed) or `give_up`.
pub async fn watcher(
    endpoints: Vec<String>,
    index: usize,
    final_rev: Arc<Mutex<Option<i64>>>,
    give_up: Instant,
    out: Arc<Mutex<WatchHistory>>,
) {
    let mut seen: Vec<Seen> = Vec::new();
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
    h.reconnects += reconnects;
}

/// Checks the guarantees listed in the module note; returns the violations found.
pub fn check(h: &WatchHistory, final_rev: i64) -> Vec<String> {
    let mut problems = Vec::new();
    let mut agreed: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for (w, events) in h.watchers.iter().enumerate() {
        let mut last = 1i64;
        for e in events {
            if e.rev <= last {
                problems.push(format!(
                    "watcher {w}: revision {} after {last} (not ordered / duplicated)",
                    e.rev
                ));
            } else if e.rev != last + 1 {
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
        if last < final_rev {
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
            None if h.watchers.iter().any(|w| !w.is_empty()) => problems.push(format!(
                "acknowledged put {k}={v} at revision {rev} never reached a watcher"
            )),
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
}
