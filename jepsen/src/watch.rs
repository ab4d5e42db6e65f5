//! The `watch` workload: writers put unique values under one prefix and sometimes
//! delete a key (one key per request, or several in one Txn that may also delete)
//! while watchers, spread over the members, watch the prefix
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
//!   with its keys and values, and each acknowledged delete that deleted the key as a
//!   DELETE event of the key at that revision. A delete event has etcd's tombstone
//!   shape: `mod_revision` = the delete's revision, empty value, `version` 0 and
//!   `create_revision` 0; a put has `version` >= 1, and `version` 1 exactly when
//!   `create_revision` is its own revision;
//! - **no-op deletes**: a delete of a key that does not exist (acknowledged with
//!   `deleted` = 0) creates no revision and no event; its response names the current
//!   revision, which belongs to another write, and the key must be absent there (where
//!   the union of the watchers knows it). A DELETE event of a key known to be absent
//!   (never written, or last deleted) is a phantom; a revision without events shows up
//!   as a lost event;
//! - **agreement**: all watchers report the same keys, event types and values for a
//!   revision;
//! - **prev_kv**: an event's `prev_kv` (a put's or a delete's) is the key's previous
//!   put in revision order (value and `mod_revision`; a put's `version` is one more
//!   than it and its `create_revision` the same), or absent when the key had no value:
//!   before its first write and after a delete, where the next put must have
//!   `version` 1 and `create_revision` = its own revision. The previous event is taken
//!   from the union of what all watchers saw, and only where it is known: a revision
//!   nobody saw (compacted away for everyone) makes every key's previous value unknown
//!   until the key is written or deleted again. etcd leaves `prev_kv` out when the
//!   revision before the event is compacted, so a missing `prev_kv` is excused below
//!   the highest compaction;
//! - **bookmarkable**: a progress notification (a response with no events that is
//!   neither `created` nor `canceled`) at revision R promises every event up to R was
//!   delivered: no later event may have a revision <= R, and since every revision has
//!   an event (a no-op delete makes none), every revision up to R must already have arrived (or lie in an
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

use etcd_client::{EventType, Txn, TxnOp, TxnOpResponse, WatchOptions};
use serde::Serialize;

use crate::rng::Rng;

pub const PREFIX: &str = "jepsen/w/";

/// The progress-notify interval the servers are started with for this workload
/// (`--experimental-watch-progress-notify-interval`, a flag etcd 3.4 and Pontoon share).
pub const PROGRESS_NOTIFY_INTERVAL: &str = "1s";

/// What a write did to one key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    Put(String),
    /// A delete that deleted the key (a DELETE event).
    Delete,
}

/// A key's value before an event, as the event's `prev_kv` gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Prev {
    pub value: String,
    pub mod_rev: i64,
    pub version: i64,
    pub create_rev: i64,
}

/// One event as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Seen {
    /// The event's `mod_revision`.
    pub rev: i64,
    pub key: String,
    /// A DELETE event (else a PUT).
    pub delete: bool,
    pub value: String,
    pub version: i64,
    pub create_rev: i64,
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
    /// Acknowledged writes: revision -> the keys it put or deleted, sorted by key.
    /// Deletes that found nothing are not here: they made no revision.
    pub acked: BTreeMap<i64, Vec<(String, Change)>>,
    /// Acknowledged deletes that deleted nothing (`deleted` = 0): the revision their
    /// response named (the store's revision then) and the key.
    pub noop_deletes: Vec<(i64, String)>,
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
                writes: &'a [(String, Change)],
            },
            NoopDelete {
                rev: i64,
                key: &'a str,
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
        for (rev, writes) in &self.acked {
            line(Line::Acked { rev: *rev, writes })?;
        }
        for (rev, key) in &self.noop_deletes {
            line(Line::NoopDelete { rev: *rev, key })?;
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

/// Puts unique values under the prefix until `until`: one key per request, or (a
/// third of the time) 2-4 distinct keys in one Txn, so that one revision has several
/// events. A quarter of the single-key requests delete the key instead (a plain
/// DeleteRange of one key), and so does each key of a Txn with the same chance. A
/// delete of a key that is already gone deletes nothing (`deleted` = 0), which etcd
/// does not count as a change: such deletes are recorded apart.
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
        let Some(c) =
            crate::cluster::connected(&mut client, &endpoint, Duration::from_secs(3)).await
        else {
            continue;
        };
        n += 1;
        let value = format!("w{index}-{n}");
        let first = (index as u64 * 7919 + n) % keys;
        let width = if rng.below(3) == 0 {
            (2 + rng.below(3)).min(keys)
        } else {
            1
        };
        // Distinct keys: a Txn may not write one key twice.
        let mut writes: Vec<(String, Change)> = (0..width)
            .map(|j| {
                let key = format!("{PREFIX}{}", (first + j * 3) % keys);
                if rng.below(4) == 0 {
                    (key, Change::Delete)
                } else {
                    (key, Change::Put(value.clone()))
                }
            })
            .collect();
        writes.sort();
        writes.dedup_by(|a, b| a.0 == b.0);
        let started = Instant::now();
        // The client's request timeout (3 s) bounds the write. The answer: the
        // revision, and per write whether it changed anything.
        let done: Result<(i64, Vec<bool>), _> = match writes.as_slice() {
            [(key, Change::Put(value))] => c
                .put(key.as_str(), value.as_str(), None)
                .await
                .map(|r| (r.header().map_or(0, |h| h.revision()), vec![true])),
            [(key, Change::Delete)] => c.delete(key.as_str(), None).await.map(|r| {
                (
                    r.header().map_or(0, |h| h.revision()),
                    vec![r.deleted() > 0],
                )
            }),
            _ => {
                let ops: Vec<TxnOp> = writes
                    .iter()
                    .map(|(k, w)| match w {
                        Change::Put(v) => TxnOp::put(k.as_str(), v.as_str(), None),
                        Change::Delete => TxnOp::delete(k.as_str(), None),
                    })
                    .collect();
                c.txn(Txn::new().and_then(ops)).await.map(|r| {
                    let changed = r
                        .op_responses()
                        .iter()
                        .map(|o| match o {
                            TxnOpResponse::Delete(d) => d.deleted() > 0,
                            _ => true,
                        })
                        .collect();
                    (r.header().map_or(0, |h| h.revision()), changed)
                })
            }
        };
        match done {
            Ok((rev, changed)) => {
                let mut out = out.lock().expect("lock");
                let mut made = Vec::new();
                for (w, changed) in writes.into_iter().zip(changed) {
                    match w {
                        (key, Change::Delete) if !changed => out.noop_deletes.push((rev, key)),
                        w => made.push(w),
                    }
                }
                if !made.is_empty() {
                    out.acked.insert(rev, made);
                }
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
                let rev = kv.mod_revision();
                seen.push(Seen {
                    rev,
                    key: kv.key_str().unwrap_or_default().to_string(),
                    delete: e.event_type() == EventType::Delete,
                    value: kv.value_str().unwrap_or_default().to_string(),
                    version: kv.version(),
                    create_rev: kv.create_revision(),
                    resp: responses,
                    prev: e.prev_kv().map(|p| Prev {
                        value: p.value_str().unwrap_or_default().to_string(),
                        mod_rev: p.mod_revision(),
                        version: p.version(),
                        create_rev: p.create_revision(),
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
    /// The key's previous event deleted it, at this revision (every revision since
    /// was seen).
    Deleted(i64),
    /// Its previous event put this value at this revision (every revision since was
    /// seen).
    Value(&'a str, i64),
}

fn show(kvs: &[(String, Change)]) -> String {
    kvs.iter()
        .map(|(k, c)| match c {
            Change::Put(v) => format!("{k}={v}"),
            Change::Delete => format!("delete {k}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Names etcd's known bug when two views of a revision differ only by deletes that
/// one of them lacks, at a revision the nemesis compacted at: etcd before the fix of
/// issue 18089 (PR 18274, in 3.4.23 too) removes a tombstone whose revision equals the
/// compaction revision, so a watch that starts or catches up from exactly that
/// revision never gets the DELETE.
fn known_bug(
    compactions: &[i64],
    rev: i64,
    a: &[(String, Change)],
    b: &[(String, Change)],
) -> &'static str {
    let (short, long) = if a.len() < b.len() { (a, b) } else { (b, a) };
    let only_deletes_lacking = long
        .iter()
        .filter(|x| !short.contains(x))
        .all(|(_, c)| *c == Change::Delete)
        && short.iter().all(|x| long.contains(x));
    if short.len() < long.len() && only_deletes_lacking && compactions.contains(&rev) {
        " (a DELETE at the compaction revision dropped: etcd issue 18089)"
    } else {
        ""
    }
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
    // Per revision, the sorted changes the first watcher to see it saw.
    let mut agreed: BTreeMap<i64, Vec<(String, Change)>> = BTreeMap::new();
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
            let mut kvs: Vec<(String, Change)> = group
                .iter()
                .map(|e| {
                    let change = if e.delete {
                        Change::Delete
                    } else {
                        Change::Put(e.value.clone())
                    };
                    (e.key.clone(), change)
                })
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
                    "watcher {w}: revision {rev} is {} but another watcher saw {}{}",
                    show(&kvs),
                    show(a),
                    known_bug(&h.compactions, rev, a, &kvs)
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
    // Acknowledged no-op deletes are checked on the way: the key must be absent at
    // the revision their response named.
    let mut noops: Vec<&(i64, String)> = h.noop_deletes.iter().collect();
    noops.sort();
    let mut noops = noops.into_iter().peekable();
    let mut before: HashMap<(i64, &str), Before> = HashMap::new();
    let mut known: HashMap<&str, Before> = HashMap::new();
    let mut complete = true;
    let mut expect = 2;
    for (&rev, kvs) in &agreed {
        if rev != expect {
            // Revisions expect..rev-1 reached nobody: any key may have changed.
            known.clear();
            complete = false;
        }
        expect = rev + 1;
        for (k, c) in kvs {
            let b = match known.get(k.as_str()) {
                Some(&b) => b,
                None if complete => Before::Absent,
                None => Before::Unknown,
            };
            before.insert((rev, k), b);
            let now = match c {
                Change::Put(v) => Before::Value(v, rev),
                Change::Delete => Before::Deleted(rev),
            };
            known.insert(k, now);
        }
        // No-op deletes at revisions nobody saw (or before any write) tell nothing.
        while noops.next_if(|(r, _)| *r < rev).is_some() {}
        while let Some((r, k)) = noops.next_if(|(r, _)| *r == rev) {
            if let Some(Before::Value(v0, r0)) = known.get(k.as_str()) {
                problems.push(format!(
                    "acknowledged delete of {k} deleted nothing at revision {r}, but the key was {v0} (put at revision {r0})"
                ));
            }
        }
    }
    for (w, events) in h.watchers.iter().enumerate() {
        for e in events {
            let b = before
                .get(&(e.rev, e.key.as_str()))
                .copied()
                .unwrap_or(Before::Unknown);
            let at = if e.delete {
                format!("watcher {w}: delete of {} at revision {}", e.key, e.rev)
            } else {
                format!("watcher {w}: {}={} at revision {}", e.key, e.value, e.rev)
            };
            // The event's own shape.
            if e.delete && (!e.value.is_empty() || e.version != 0 || e.create_rev != 0) {
                problems.push(format!(
                    "{at} is not a tombstone: value {:?}, version {}, create_revision {} (etcd gives an empty value, version 0, create_revision 0)",
                    e.value, e.version, e.create_rev
                ));
            }
            if !e.delete
                && (e.version < 1
                    || e.create_rev < 1
                    || e.create_rev > e.rev
                    || (e.version == 1) != (e.create_rev == e.rev))
            {
                problems.push(format!(
                    "{at} has version {} and create_revision {}",
                    e.version, e.create_rev
                ));
            }
            // Against the key's previous event.
            let gone = || match b {
                Before::Deleted(r0) => format!("was deleted at revision {r0}"),
                _ => "had no earlier value".to_string(),
            };
            match (b, &e.prev) {
                (Before::Absent | Before::Deleted(_), _) if e.delete => problems.push(format!(
                    "{at}, but the key {}: a phantom event (deleting a missing key makes none)",
                    gone()
                )),
                (Before::Absent | Before::Deleted(_), Some(p)) => problems.push(format!(
                    "{at} has prev_kv {}@{}, but the key {}",
                    p.value,
                    p.mod_rev,
                    gone()
                )),
                (Before::Absent | Before::Deleted(_), None)
                    if e.version != 1 || e.create_rev != e.rev =>
                {
                    problems.push(format!(
                        "{at} has version {} and create_revision {}, but the key {} (expected 1 and {})",
                        e.version,
                        e.create_rev,
                        gone(),
                        e.rev
                    ))
                }
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
                // A put adds one to the version of the key's previous value and keeps
                // its create_revision; a delete makes no value (version 0).
                let bad = p.mod_rev >= e.rev
                    || p.version < 1
                    || p.create_rev < 1
                    || p.create_rev > p.mod_rev
                    || (!e.delete && (e.version != p.version + 1 || e.create_rev != p.create_rev));
                if bad {
                    problems.push(format!(
                        "{at} (version {}, create_revision {}) has prev_kv {}@{} with version {} and create_revision {}",
                        e.version, e.create_rev, p.value, p.mod_rev, p.version, p.create_rev
                    ));
                }
            }
        }
    }
    for (rev, writes) in &h.acked {
        match agreed.get(rev) {
            Some(seen) if seen == writes => {}
            Some(seen) => problems.push(format!(
                "acknowledged write {} at revision {rev}, watchers saw {}{}",
                show(writes),
                show(seen),
                known_bug(&h.compactions, *rev, writes, seen)
            )),
            None if (0..h.watchers.len())
                .any(|w| !h.watchers[w].is_empty() && !excused(w, *rev, *rev)) =>
            {
                problems.push(format!(
                    "acknowledged write {} at revision {rev} never reached a watcher",
                    show(writes)
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

    /// The value that stands for a delete in [`seen`]'s events.
    const DEL: &str = "<delete>";

    /// A watcher's events, one response per revision, with the versions,
    /// create_revisions and prev_kv a correct server would give from these events
    /// alone; a value of [`DEL`] is a delete (etcd's tombstone).
    fn seen(events: &[(i64, &str, &str)]) -> Vec<Seen> {
        let mut last: HashMap<&str, Prev> = HashMap::new();
        events
            .iter()
            .map(|&(rev, key, value)| {
                if value == DEL {
                    return Seen {
                        rev,
                        key: key.into(),
                        delete: true,
                        value: String::new(),
                        version: 0,
                        create_rev: 0,
                        resp: rev as u64,
                        prev: last.remove(key),
                    };
                }
                let prev = last.get(key).cloned();
                let version = prev.as_ref().map_or(1, |p| p.version + 1);
                let create_rev = prev.as_ref().map_or(rev, |p| p.create_rev);
                last.insert(
                    key,
                    Prev {
                        value: value.into(),
                        mod_rev: rev,
                        version,
                        create_rev,
                    },
                );
                Seen {
                    rev,
                    key: key.into(),
                    delete: false,
                    value: value.into(),
                    version,
                    create_rev,
                    resp: rev as u64,
                    prev,
                }
            })
            .collect()
    }

    fn put(k: &str, v: &str) -> (String, Change) {
        (k.into(), Change::Put(v.into()))
    }

    fn del(k: &str) -> (String, Change) {
        (k.into(), Change::Delete)
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
        h.acked.insert(3, vec![put("k", "b")]);
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
        h.acked.insert(3, vec![put("a", "2"), put("b", "2")]);
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
            w[2].create_rev = 4;
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
            create_rev: 1,
        });
        bad[2].version = 2;
        bad[2].create_rev = 1;
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
        must_find(&history(vec![bad]), 5, "(version 7,");
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
            create_rev: 2,
        });
        w[1].version = 3;
        w[2].prev = Some(Prev {
            value: "y".into(),
            mod_rev: 3,
            version: 1,
            create_rev: 3,
        });
        w[2].version = 2;
        w[2].create_rev = 3;
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
                create_rev: 2,
            });
            e.version = 4;
            e.create_rev = 2;
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

    /// k is put, deleted, put again; revision 5 is a Txn that puts j and deletes k;
    /// two deletes find nothing: of k at 3 (just deleted) and of z at 4 (never
    /// written). Their responses name the revisions 3 and 4 of other writes.
    fn delete_history() -> WatchHistory {
        let events = [
            s(2, "a"),
            s(3, DEL),
            s(4, "b"),
            (5, "j", "x"),
            s(5, DEL),
            s(6, "c"),
        ];
        let mut one = seen(&events);
        one[4].resp = one[3].resp;
        let mut h = history(vec![one.clone(), one]);
        h.acked.insert(2, vec![put("k", "a")]);
        h.acked.insert(3, vec![del("k")]);
        h.acked.insert(4, vec![put("k", "b")]);
        h.acked.insert(5, vec![put("j", "x"), del("k")]);
        h.acked.insert(6, vec![put("k", "c")]);
        h.noop_deletes = vec![(3, "k".into()), (4, "z".into()), (5, "k".into())];
        h
    }

    #[test]
    fn deletes_and_no_op_deletes_pass_when_right() {
        let h = delete_history();
        assert!(h.watchers[0][1].prev.is_some() && h.watchers[0][2].prev.is_none());
        must_pass(&h, 6);
        // A no-op delete names a revision nobody saw: nothing to check.
        let mut h = delete_history();
        for w in &mut h.watchers {
            w.remove(1);
        }
        h.gaps = vec![vec![(3, 3)], vec![(3, 3)]];
        h.compactions = vec![4];
        h.acked.remove(&3);
        must_pass(&h, 6);
    }

    #[test]
    fn a_delete_must_be_a_delete_event_with_the_tombstone_shape() {
        // The acknowledged delete at 3 arrives as a PUT.
        let mut h = delete_history();
        for w in &mut h.watchers {
            w[1].delete = false;
            w[1].value = "a".into();
            w[1].version = 2;
            w[1].create_rev = 2;
            w[2].prev = w[1].prev.clone();
        }
        must_find(
            &h,
            6,
            "acknowledged write delete k at revision 3, watchers saw k=a",
        );
        // Watchers disagree on the event type.
        let mut h = delete_history();
        h.watchers[1][1].delete = false;
        must_find(&h, 6, "revision 3 is k= but another watcher saw delete k");
        // A delete event that is not a tombstone.
        let mut h = delete_history();
        h.watchers[1][1].version = 2;
        h.watchers[1][1].create_rev = 2;
        must_find(&h, 6, "delete of k at revision 3 is not a tombstone");
    }

    #[test]
    fn a_delete_dropped_at_the_compaction_revision_is_named() {
        // A watcher that resumed at the compaction revision 5 lacks the delete of k
        // there (etcd 3.4.23 does this).
        let mut h = delete_history();
        h.watchers[1].remove(4);
        h.watchers[1].truncate(4);
        h.watchers[1].extend(seen(&[s(6, "c")]));
        h.watchers[1].splice(0..3, []);
        h.gaps = vec![vec![], vec![(1, 4)]];
        h.compactions = vec![5];
        must_find(
            &h,
            6,
            "watcher 1: revision 5 is j=x but another watcher saw j=x, delete k (a DELETE at the compaction revision dropped: etcd issue 18089)",
        );
        // Not at a compaction revision: no excuse named.
        h.gaps = vec![vec![], vec![(1, 3)]];
        h.watchers[1].insert(0, delete_history().watchers[0][2].clone());
        h.compactions = vec![4];
        let p = check(&h, 6);
        assert!(
            p.iter()
                .any(|p| p.contains("revision 5 is j=x") && !p.contains("18089")),
            "{p:?}"
        );
    }

    #[test]
    fn a_delete_must_carry_the_previous_value() {
        let base = delete_history();
        // prev_kv missing on a delete of a known key.
        let mut h = delete_history();
        h.watchers[1][1].prev = None;
        must_find(
            &h,
            6,
            "watcher 1: delete of k at revision 3 has no prev_kv, but the key was a at revision 2",
        );
        // ... excused when the revision before it was compacted.
        h.compactions = vec![3];
        must_pass(&h, 6);
        // A wrong previous value on a delete.
        let mut h = base;
        h.watchers[0][4].prev.as_mut().unwrap().value = "a".into();
        must_find(
            &h,
            6,
            "delete of k at revision 5 has prev_kv a@4, but the key's previous event is b@4",
        );
    }

    #[test]
    fn a_put_after_a_delete_starts_the_key_over() {
        // The version is not reset after the delete.
        let mut h = delete_history();
        h.watchers[1][2].version = 2;
        h.watchers[1][2].create_rev = 2;
        must_find(
            &h,
            6,
            "watcher 1: k=b at revision 4 has version 2 and create_revision 2, but the key was deleted at revision 3",
        );
        // A version of 1 with the create_revision of the deleted key.
        let mut h = delete_history();
        h.watchers[1][2].create_rev = 2;
        must_find(
            &h,
            6,
            "k=b at revision 4 has version 1 and create_revision 2",
        );
        // A prev_kv from before the delete.
        let mut h = delete_history();
        h.watchers[0][2].prev = h.watchers[0][1].prev.clone();
        h.watchers[0][2].version = 2;
        h.watchers[0][2].create_rev = 2;
        must_find(
            &h,
            6,
            "k=b at revision 4 has prev_kv a@2, but the key was deleted at revision 3",
        );
    }

    #[test]
    fn a_no_op_delete_makes_no_event_and_finds_nothing() {
        // The store bumps the revision for the no-op delete of k after 3, and the
        // watchers see a phantom DELETE event there (k was deleted at 3).
        let mut h = delete_history();
        let phantom = Seen {
            rev: 7,
            key: "k".into(),
            delete: true,
            value: String::new(),
            version: 0,
            create_rev: 0,
            resp: 7,
            prev: None,
        };
        for w in &mut h.watchers {
            w.remove(5);
            w.remove(4);
            w.remove(3);
            w.remove(2);
            w.push(Seen {
                rev: 4,
                resp: 4,
                ..phantom.clone()
            });
        }
        h.acked.retain(|r, _| *r <= 3);
        h.noop_deletes = vec![(3, "k".into())];
        must_find(
            &h,
            4,
            "delete of k at revision 4, but the key was deleted at revision 3: a phantom event",
        );
        // A phantom delete of a key never written.
        for w in &mut h.watchers {
            w[2].key = "z".into();
        }
        must_find(
            &h,
            4,
            "delete of z at revision 4, but the key had no earlier value: a phantom event",
        );
        // A no-op delete that creates a revision without events loses an event.
        let mut h = delete_history();
        h.noop_deletes = vec![(7, "k".into())];
        for w in &mut h.watchers {
            w.push(Seen {
                rev: 8,
                key: "j".into(),
                resp: 8,
                prev: Some(Prev {
                    value: "x".into(),
                    mod_rev: 5,
                    version: 1,
                    create_rev: 5,
                }),
                ..phantom.clone()
            });
        }
        must_find(&h, 8, "revisions 7..7 missing");
        // A delete that claims to have found nothing though the key had a value.
        let mut h = delete_history();
        h.noop_deletes.push((4, "k".into()));
        must_find(
            &h,
            6,
            "acknowledged delete of k deleted nothing at revision 4, but the key was b (put at revision 4)",
        );
    }
}
