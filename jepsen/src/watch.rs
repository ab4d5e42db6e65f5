//! The `watch` workload: writers put unique values under one prefix (one key per put,
//! or several in one Txn) while watchers, spread over the members, watch the prefix
//! from revision 1 with `prev_kv` and `progress_notify`, ask for progress now and then
//! (`RequestProgress`), and resume from their last revision + 1 on any error (on
//! another member), as etcd clients do.
//!
//! Every revision of the cluster belongs to this workload (the store starts empty and
//! nothing else writes), so etcd's guarantees reduce to checks on plain sequences. For
//! every watcher:
//!
//! - **ordered / unique**: revisions strictly increase;
//! - **reliable / resumable**: no revision is missing between 2 and the final revision,
//!   across every reconnect;
//! - **atomic**: all events of one revision arrive in one `WatchResponse`, next to each
//!   other, never split across responses; and a revision carries exactly the keys its
//!   write put (the acknowledged Txn's keys, and the same set for every watcher);
//! - **correct**: each acknowledged write appears at the revision its response named,
//!   with its keys and values;
//! - **agreement**: all watchers report the same keys and values for a revision;
//! - **prev_kv**: an event's `prev_kv` is the key's previous event in revision order
//!   (value and `mod_revision`; its `version` is one less), or absent when the key had
//!   none. The previous event is taken from the union of what all watchers saw, and
//!   only where it is known: a revision nobody saw (compacted away for everyone) makes
//!   every key's previous value unknown until the key is written again. etcd leaves
//!   `prev_kv` out when the revision before the event is compacted, so a missing
//!   `prev_kv` is excused below the highest compaction;
//! - **bookmarkable**: a progress notification (a response with no events that is
//!   neither `created` nor `canceled`) at revision R promises every event up to R was
//!   delivered: no later event may have a revision <= R, and since every revision has
//!   an event, every revision up to R must already have arrived (or lie in an
//!   announced compaction gap). Watchers resume from R + 1 after a notification, so a
//!   false promise also shows up as lost events.
//!
//! With the `compact` nemesis, watchers also fall behind on purpose now and then
//! (they drop their stream and wait before resuming), so that a compaction overtakes
//! them. etcd then cancels the resumed watch with `compact_revision` set: the events
//! before it are gone for good, and the watcher resumes from `compact_revision`. So a
//! watcher may skip revisions only inside such announced gaps, and an announcement
//! must be true: `compact_revision` above the revision the watcher asked for, and not
//! above a revision the nemesis compacted at.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, Txn, TxnOp, WatchOptions};
use serde::Serialize;

use crate::rng::Rng;

pub const PREFIX: &str = "jepsen/w/";

/// The progress-notify interval the servers are started with for this workload
/// (`--experimental-watch-progress-notify-interval`, a flag etcd 3.4 and Pontoon share).
pub const PROGRESS_NOTIFY_INTERVAL: &str = "1s";

/// A key's value before an event, as the event's `prev_kv` gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Prev {
    pub value: String,
    pub mod_rev: i64,
    pub version: i64,
}

/// One event as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub rev: i64,
    pub key: String,
    pub value: String,
    pub version: i64,
    /// The number of the response that brought it (counted per watcher over all its
    /// streams), to tell whether a revision's events came together.
    pub resp: u64,
    pub prev: Option<Prev>,
}

/// A progress notification: revision `rev`, received after the watcher's first
/// `after` events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub after: usize,
    pub rev: i64,
}

/// What the writers and watchers recorded.
#[derive(Default)]
pub struct WatchHistory {
    /// Acknowledged writes: revision -> the (key, value) pairs it put, sorted by key.
    pub acked: BTreeMap<i64, Vec<(String, String)>>,
    /// Per watcher, the events in the order received.
    pub watchers: Vec<Vec<Seen>>,
    /// Per watcher, the revisions (from, to) a compaction notice told it it had lost.
    pub gaps: Vec<Vec<(i64, i64)>>,
    /// Per watcher, the progress notifications received.
    pub progress: Vec<Vec<Progress>>,
    /// The revisions the nemesis compacted at.
    pub compactions: Vec<i64>,
    pub reconnects: usize,
}

impl WatchHistory {
    pub fn new(watchers: usize) -> Self {
        WatchHistory {
            watchers: vec![Vec::new(); watchers],
            gaps: vec![Vec::new(); watchers],
            progress: vec![Vec::new(); watchers],
            ..Default::default()
        }
    }

    /// Writes acknowledged writes, then every watcher's events, gaps and progress
    /// notifications, as JSON lines.
    pub fn write_jsonl(&self, path: &Path) -> std::io::Result<()> {
        #[derive(Serialize)]
        #[serde(rename_all = "kebab-case")]
        enum Line<'a> {
            Acked {
                rev: i64,
                puts: &'a [(String, String)],
            },
            Event {
                watcher: usize,
                #[serde(flatten)]
                seen: &'a Seen,
            },
            Gap {
                watcher: usize,
                from: i64,
                to: i64,
            },
            Progress {
                watcher: usize,
                #[serde(flatten)]
                progress: Progress,
            },
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut line = |l: Line| -> std::io::Result<()> {
            serde_json::to_writer(&mut f, &l)?;
            f.write_all(b"\n")
        };
        for (rev, puts) in &self.acked {
            line(Line::Acked { rev: *rev, puts })?;
        }
        for (w, events) in self.watchers.iter().enumerate() {
            for seen in events {
                line(Line::Event { watcher: w, seen })?;
            }
        }
        for (w, gaps) in self.gaps.iter().enumerate() {
            for &(from, to) in gaps {
                line(Line::Gap {
                    watcher: w,
                    from,
                    to,
                })?;
            }
        }
        for (w, marks) in self.progress.iter().enumerate() {
            for &progress in marks {
                line(Line::Progress {
                    watcher: w,
                    progress,
                })?;
            }
        }
        f.flush()
    }
}

/// Puts unique values under the prefix until `until`: one key per put, or (a third
/// of the time) 2-4 distinct keys in one Txn, so that one revision has several events.
pub async fn writer(
    endpoint: String,
    index: usize,
    keys: usize,
    seed: u64,
    until: Instant,
    per_op: Duration,
    out: Arc<Mutex<WatchHistory>>,
) {
    let mut rng = Rng::new(seed ^ (index as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let keys = keys.max(1) as u64;
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
        let value = format!("w{index}-{n}");
        let first = (index as u64 * 7919 + n) % keys;
        let width = if rng.below(3) == 0 {
            (2 + rng.below(3)).min(keys)
        } else {
            1
        };
        // Distinct keys: a Txn may not put one key twice.
        let mut puts: Vec<(String, String)> = (0..width)
            .map(|j| (format!("{PREFIX}{}", (first + j * 3) % keys), value.clone()))
            .collect();
        puts.sort();
        puts.dedup();
        let started = Instant::now();
        // The client's request timeout (3 s) bounds the write.
        let rev = if let [(key, value)] = puts.as_slice() {
            c.put(key.as_str(), value.as_str(), None)
                .await
                .map(|r| r.header().map_or(0, |h| h.revision()))
        } else {
            let ops: Vec<TxnOp> = puts
                .iter()
                .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                .collect();
            c.txn(Txn::new().and_then(ops))
                .await
                .map(|r| r.header().map_or(0, |h| h.revision()))
        };
        match rev {
            Ok(rev) => {
                out.lock().expect("lock").acked.insert(rev, puts);
            }
            Err(_) => client = None,
        }
        if let Some(rest) = per_op.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct WatcherOptions {
    pub seed: u64,
    /// Drop the stream every few seconds and wait a while before resuming, so that
    /// compactions overtake the watcher.
    pub lag: bool,
    /// Send `RequestProgress` every 100-800 ms (periodic notifications come anyway).
    pub progress_requests: bool,
}

/// Watches the prefix from revision 1 until it has seen `final_rev` (set once the
/// writers stopped and the cluster healed) or `give_up`.
pub async fn watcher(
    endpoints: Vec<String>,
    index: usize,
    final_rev: Arc<Mutex<Option<i64>>>,
    give_up: Instant,
    opts: WatcherOptions,
    out: Arc<Mutex<WatchHistory>>,
) {
    let WatcherOptions {
        seed,
        lag,
        progress_requests,
    } = opts;
    let mut seen: Vec<Seen> = Vec::new();
    let mut gaps: Vec<(i64, i64)> = Vec::new();
    let mut marks: Vec<Progress> = Vec::new();
    let mut rng = Rng::new(seed ^ ((index as u64 + 1) * 31));
    let mut next_lag = Instant::now() + Duration::from_millis(1000 + rng.below(3000));
    let mut next = 1i64;
    let mut member = index;
    let mut reconnects = 0;
    let mut responses = 0u64;
    let done = |next: i64| final_rev.lock().expect("lock").is_some_and(|f| next > f);
    'outer: while Instant::now() < give_up {
        if done(next) {
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
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_prev_key()
            .with_progress_notify();
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), c.watch(PREFIX, Some(opts))).await
        else {
            continue;
        };
        let mut next_progress = Instant::now() + Duration::from_millis(100 + rng.below(700));
        loop {
            if done(next) {
                break 'outer;
            }
            if lag && Instant::now() > next_lag && final_rev.lock().expect("lock").is_none() {
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
                next_lag = Instant::now() + Duration::from_millis(1000 + rng.below(3000));
                reconnects += 1;
                continue 'outer;
            }
            if progress_requests && Instant::now() >= next_progress {
                next_progress = Instant::now() + Duration::from_millis(100 + rng.below(700));
                if stream.request_progress().await.is_err() {
                    reconnects += 1;
                    continue 'outer;
                }
            }
            let msg = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
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
            responses += 1;
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    // The events from `next` up to the compaction are gone for good.
                    gaps.push((next, resp.compact_revision() - 1));
                    next = next.max(resp.compact_revision());
                }
                reconnects += 1;
                continue 'outer;
            }
            if resp.created() {
                continue;
            }
            if resp.events().is_empty() {
                if resp.compact_revision() == 0 {
                    // A progress notification: everything up to `rev` was delivered,
                    // so resuming from `rev + 1` must lose nothing.
                    let rev = resp.header().map_or(0, |h| h.revision());
                    marks.push(Progress {
                        after: seen.len(),
                        rev,
                    });
                    next = next.max(rev + 1);
                }
                continue;
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
                    version: kv.version(),
                    resp: responses,
                    prev: e.prev_kv().map(|p| Prev {
                        value: p.value_str().unwrap_or_default().to_string(),
                        mod_rev: p.mod_revision(),
                        version: p.version(),
                    }),
                });
                next = next.max(rev + 1);
            }
        }
    }
    let mut h = out.lock().expect("lock");
    h.watchers[index] = seen;
    h.gaps[index] = gaps;
    h.progress[index] = marks;
    h.reconnects += reconnects;
}

/// What the union of all watchers knows about a key just before a revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Before<'a> {
    /// A revision before it that nobody saw may have written the key.
    Unknown,
    /// The key had no value: every earlier revision was seen, none wrote it.
    Absent,
    /// Its previous event: value and revision.
    Value(&'a str, i64),
}

fn show(kvs: &[(String, String)]) -> String {
    kvs.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the guarantees listed in the module note; returns the violations found.
pub fn check(h: &WatchHistory, final_rev: i64) -> Vec<String> {
    let mut problems = Vec::new();
    let no_gaps = Vec::new();
    let no_marks = Vec::new();
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
    // Per revision, the sorted (key, value) pairs the first watcher to see it saw.
    let mut agreed: BTreeMap<i64, Vec<(String, String)>> = BTreeMap::new();
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
        // Runs of events with one revision: a revision's events must come together.
        for group in events.chunk_by(|a, b| a.rev == b.rev) {
            let rev = group[0].rev;
            if rev <= last {
                problems.push(format!(
                    "watcher {w}: revision {rev} after {last} (not ordered / duplicated)"
                ));
            } else if rev != last + 1 && !excused(w, last + 1, rev - 1) {
                problems.push(format!(
                    "watcher {w}: revisions {}..{} missing (event lost)",
                    last + 1,
                    rev - 1
                ));
            }
            last = last.max(rev);
            if group.iter().any(|e| e.resp != group[0].resp) {
                let mut resps: Vec<u64> = group.iter().map(|e| e.resp).collect();
                resps.dedup();
                problems.push(format!(
                    "watcher {w}: the {} events of revision {rev} came split over responses {resps:?} (not atomic)",
                    group.len()
                ));
            }
            let mut kvs: Vec<(String, String)> = group
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect();
            kvs.sort();
            if kvs.windows(2).any(|p| p[0].0 == p[1].0) {
                problems.push(format!(
                    "watcher {w}: revision {rev} has one key twice: {} (not unique)",
                    show(&kvs)
                ));
            }
            match agreed.get(&rev) {
                Some(a) if *a != kvs => problems.push(format!(
                    "watcher {w}: revision {rev} is {} but another watcher saw {}",
                    show(&kvs),
                    show(a)
                )),
                Some(_) => {}
                None => {
                    agreed.insert(rev, kvs);
                }
            }
        }
        let gap_end = gaps_of(w).iter().map(|g| g.1).max().unwrap_or(0);
        if last.max(gap_end) < final_rev {
            problems.push(format!(
                "watcher {w}: stopped at revision {last}, the store reached {final_rev}"
            ));
        }
        // Bookmarkable: a progress notification at R comes after every event <= R.
        let mut suffix_min = vec![i64::MAX; events.len() + 1];
        for i in (0..events.len()).rev() {
            suffix_min[i] = suffix_min[i + 1].min(events[i].rev);
        }
        let mut delivered = 1i64;
        let mut counted = 0;
        for m in h.progress.get(w).unwrap_or(&no_marks) {
            let after = m.after.min(events.len());
            while counted < after {
                delivered = delivered.max(events[counted].rev);
                counted += 1;
            }
            if m.rev > delivered && !excused(w, delivered + 1, m.rev) {
                problems.push(format!(
                    "watcher {w}: progress notification at revision {} when only revisions up to {delivered} had arrived (not bookmarkable)",
                    m.rev
                ));
            }
            if suffix_min[after] <= m.rev {
                let e = events[after..]
                    .iter()
                    .find(|e| e.rev <= m.rev)
                    .expect("the suffix minimum is an event");
                problems.push(format!(
                    "watcher {w}: event {}={} at revision {} arrived after a progress notification at revision {} (not bookmarkable)",
                    e.key, e.value, e.rev, m.rev
                ));
            }
        }
    }
    // prev_kv: each key's previous value in revision order, where the union of all
    // watchers saw every revision since the key's last write (or since the start).
    let mut before: HashMap<(i64, &str), Before> = HashMap::new();
    let mut known: HashMap<&str, (&str, i64)> = HashMap::new();
    let mut complete = true;
    let mut expect = 2;
    for (&rev, kvs) in &agreed {
        if rev != expect {
            // Revisions expect..rev-1 reached nobody: any key may have changed.
            known.clear();
            complete = false;
        }
        expect = rev + 1;
        for (k, v) in kvs {
            let b = match known.get(k.as_str()) {
                Some(&(v0, r0)) => Before::Value(v0, r0),
                None if complete => Before::Absent,
                None => Before::Unknown,
            };
            before.insert((rev, k), b);
            known.insert(k, (v, rev));
        }
    }
    for (w, events) in h.watchers.iter().enumerate() {
        for e in events {
            let b = before
                .get(&(e.rev, e.key.as_str()))
                .copied()
                .unwrap_or(Before::Unknown);
            let at = format!("watcher {w}: {}={} at revision {}", e.key, e.value, e.rev);
            match (b, &e.prev) {
                (Before::Absent, Some(p)) => problems.push(format!(
                    "{at} has prev_kv {}@{}, but the key had no earlier value",
                    p.value, p.mod_rev
                )),
                (Before::Absent, None) if e.version != 1 => problems.push(format!(
                    "{at} is the key's first write but has version {}",
                    e.version
                )),
                (Before::Value(v0, r0), Some(p)) if (p.value.as_str(), p.mod_rev) != (v0, r0) => {
                    problems.push(format!(
                        "{at} has prev_kv {}@{}, but the key's previous event is {v0}@{r0}",
                        p.value, p.mod_rev
                    ))
                }
                // etcd omits prev_kv when the revision before the event (rev - 1) is
                // below a compaction.
                (Before::Value(v0, r0), None) if e.rev > compacted_max => problems.push(format!(
                    "{at} has no prev_kv, but the key was {v0} at revision {r0}"
                )),
                _ => {}
            }
            if let Some(p) = &e.prev {
                // Nobody deletes, so each write adds one to the key's version.
                if e.version != p.version + 1 || p.mod_rev >= e.rev {
                    problems.push(format!(
                        "{at} (version {}) has prev_kv {}@{} with version {}",
                        e.version, p.value, p.mod_rev, p.version
                    ));
                }
            }
        }
    }
    for (rev, puts) in &h.acked {
        match agreed.get(rev) {
            Some(seen) if seen == puts => {}
            Some(seen) => problems.push(format!(
                "acknowledged write {} at revision {rev}, watchers saw {}",
                show(puts),
                show(seen)
            )),
            None if (0..h.watchers.len())
                .any(|w| !h.watchers[w].is_empty() && !excused(w, *rev, *rev)) =>
            {
                problems.push(format!(
                    "acknowledged write {} at revision {rev} never reached a watcher",
                    show(puts)
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

    /// A watcher's events, one response per revision, with the versions and prev_kv
    /// a correct server would give from these events alone.
    fn seen(events: &[(i64, &str, &str)]) -> Vec<Seen> {
        let mut last: HashMap<&str, Prev> = HashMap::new();
        events
            .iter()
            .map(|&(rev, key, value)| {
                let prev = last.get(key).cloned();
                let version = prev.as_ref().map_or(1, |p| p.version + 1);
                last.insert(
                    key,
                    Prev {
                        value: value.into(),
                        mod_rev: rev,
                        version,
                    },
                );
                Seen {
                    rev,
                    key: key.into(),
                    value: value.into(),
                    version,
                    resp: rev as u64,
                    prev,
                }
            })
            .collect()
    }

    fn s(rev: i64, v: &str) -> (i64, &'static str, &str) {
        (rev, "k", v)
    }

    fn history(watchers: Vec<Vec<Seen>>) -> WatchHistory {
        let mut h = WatchHistory::new(watchers.len());
        h.watchers = watchers;
        h
    }

    fn must_find(h: &WatchHistory, final_rev: i64, what: &str) {
        let p = check(h, final_rev);
        assert!(p.iter().any(|p| p.contains(what)), "{what:?} not in {p:?}");
    }

    fn must_pass(h: &WatchHistory, final_rev: i64) {
        let p = check(h, final_rev);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn gaps_duplicates_and_disagreements_are_found() {
        let mut h = history(vec![seen(&[s(2, "a"), s(3, "b"), s(4, "c")])]);
        h.acked.insert(3, vec![("k".into(), "b".into())]);
        must_pass(&h, 4);
        must_find(&h, 5, "stopped at revision 4");
        h.watchers.push(seen(&[s(2, "a"), s(4, "c")]));
        must_find(&h, 4, "missing");
        h.watchers[1] = seen(&[s(2, "a"), s(3, "b"), s(2, "a"), s(4, "c")]);
        must_find(&h, 4, "not ordered");
        h.watchers[1] = seen(&[s(2, "a"), s(3, "X"), s(4, "c")]);
        must_find(&h, 4, "another watcher");
    }

    #[test]
    fn only_announced_compactions_excuse_a_gap() {
        let mut h = history(vec![seen(&[s(2, "a"), s(5, "d")])]);
        h.gaps = vec![vec![(3, 4)]];
        h.compactions = vec![5];
        must_pass(&h, 5);
        // A gap longer than the announcement is a lost event.
        h.gaps = vec![vec![(3, 3)]];
        must_find(&h, 5, "missing");
        // An announcement beyond any compaction is false.
        h.gaps = vec![vec![(3, 4)]];
        h.compactions = vec![4];
        must_find(&h, 5, "compacted at most");
        // So is one below the revision the watcher asked for.
        h.compactions = vec![5];
        h.gaps = vec![vec![(3, 4), (6, 4)]];
        must_find(&h, 5, "asked to start");
        // A watcher that ends in a gap reached the end.
        h.watchers = vec![seen(&[s(2, "a")])];
        h.gaps = vec![vec![(3, 4)]];
        must_pass(&h, 4);
    }

    /// Revision 3 is a Txn that put a and b; both watchers get it in one response.
    fn txn_history() -> WatchHistory {
        let events = [(2, "a", "1"), (3, "a", "2"), (3, "b", "2"), (4, "b", "3")];
        let mut one = seen(&events);
        one[2].resp = one[1].resp;
        let mut h = history(vec![one.clone(), one]);
        h.acked
            .insert(3, vec![("a".into(), "2".into()), ("b".into(), "2".into())]);
        h
    }

    #[test]
    fn a_revision_split_over_responses_is_not_atomic() {
        let mut h = txn_history();
        must_pass(&h, 4);
        h.watchers[1][2].resp += 10;
        h.watchers[1][3].resp += 10;
        must_find(&h, 4, "revision 3 came split over responses");
        // A revision's events must also come next to each other.
        let mut h = txn_history();
        h.watchers[1].swap(2, 3);
        must_find(&h, 4, "not ordered");
    }

    #[test]
    fn a_revision_must_carry_exactly_the_keys_written() {
        // Both watchers miss b at revision 3: they agree, but the Txn put a and b.
        let mut h = txn_history();
        for w in &mut h.watchers {
            w.remove(2);
            w[2].prev = None;
            w[2].version = 1;
        }
        must_find(
            &h,
            4,
            "acknowledged write a=2, b=2 at revision 3, watchers saw a=2",
        );
        // One watcher sees a key twice in a revision.
        let mut h = txn_history();
        h.watchers[1][2].key = "a".into();
        must_find(&h, 4, "one key twice");
    }

    #[test]
    fn prev_kv_must_be_the_previous_event_of_the_key() {
        let h = history(vec![seen(&[
            s(2, "a"),
            s(3, "b"),
            (4, "j", "x"),
            s(5, "c"),
        ])]);
        must_pass(&h, 5);
        // A wrong previous value.
        let mut bad = h.watchers[0].clone();
        bad[3].prev.as_mut().unwrap().value = "a".into();
        must_find(
            &history(vec![bad]),
            5,
            "has prev_kv a@3, but the key's previous event is b@3",
        );
        // A previous value from the wrong revision.
        let mut bad = h.watchers[0].clone();
        bad[3].prev.as_mut().unwrap().mod_rev = 2;
        must_find(&history(vec![bad]), 5, "previous event is b@3");
        // A previous value for a key written for the first time.
        let mut bad = h.watchers[0].clone();
        bad[2].prev = Some(Prev {
            value: "w".into(),
            mod_rev: 1,
            version: 1,
        });
        bad[2].version = 2;
        must_find(&history(vec![bad]), 5, "no earlier value");
        // A missing previous value.
        let mut bad = h.watchers[0].clone();
        bad[3].prev = None;
        let mut missing = history(vec![bad]);
        must_find(
            &missing,
            5,
            "has no prev_kv, but the key was b at revision 3",
        );
        // ... is excused when the revision before the event was compacted.
        missing.compactions = vec![5];
        must_pass(&missing, 5);
        // A version that does not follow prev_kv's.
        let mut bad = h.watchers[0].clone();
        bad[3].version = 7;
        must_find(&history(vec![bad]), 5, "(version 7)");
    }

    #[test]
    fn prev_kv_is_not_checked_where_the_previous_value_is_unknown() {
        // Revision 3 reached nobody (compacted for everyone): k's value before 4 is
        // unknown, and so is whether j existed before 5.
        let mut w = seen(&[s(2, "a"), s(4, "c"), (5, "j", "x")]);
        w[1].prev = Some(Prev {
            value: "b".into(),
            mod_rev: 3,
            version: 2,
        });
        w[1].version = 3;
        w[2].prev = Some(Prev {
            value: "y".into(),
            mod_rev: 3,
            version: 1,
        });
        w[2].version = 2;
        let mut h = history(vec![w]);
        h.gaps = vec![vec![(3, 3)]];
        h.compactions = vec![4];
        must_pass(&h, 5);
        // Once k is written again, it is known again.
        h.watchers[0].extend(seen(&[s(6, "d")]).into_iter().map(|mut e| {
            e.prev = Some(Prev {
                value: "a".into(),
                mod_rev: 2,
                version: 3,
            });
            e.version = 4;
            e
        }));
        must_find(&h, 6, "previous event is c@4");
    }

    #[test]
    fn nothing_may_arrive_at_or_below_an_announced_progress_revision() {
        let mut h = history(vec![seen(&[s(2, "a"), s(3, "b"), s(4, "c")])]);
        h.progress = vec![vec![
            Progress { after: 0, rev: 1 },
            Progress { after: 2, rev: 3 },
            Progress { after: 3, rev: 4 },
        ]];
        must_pass(&h, 4);
        // Progress at 4 after only 2 and 3 arrived, then 4 arrives.
        h.progress = vec![vec![Progress { after: 2, rev: 4 }]];
        must_find(
            &h,
            4,
            "at revision 4 arrived after a progress notification at revision 4",
        );
        must_find(&h, 4, "only revisions up to 3 had arrived");
        // An event far below the announced revision.
        h.progress = vec![vec![Progress { after: 1, rev: 3 }]];
        must_find(&h, 4, "k=b at revision 3 arrived after a progress");
        // A progress notification inside an announced compaction gap is fine.
        let mut h = history(vec![seen(&[s(2, "a"), s(5, "d")])]);
        h.gaps = vec![vec![(3, 4)]];
        h.compactions = vec![5];
        h.progress = vec![vec![Progress { after: 1, rev: 4 }]];
        must_pass(&h, 5);
    }
}
