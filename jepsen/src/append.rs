//! The `append` workload: transactions over a small rotating keyspace that append
//! unique integers to lists and read whole lists, checked by [`crate::elle`].
//!
//! A list is stored as its elements joined by commas. etcd's Txn cannot read and then
//! write in one request, so a transaction is optimistic, in two requests:
//!
//! 1. one Txn of Gets for every key the transaction touches (a single revision);
//! 2. if it appends: one Txn that compares every touched key's `mod_revision` with
//!    what step 1 saw and puts the appended keys' new lists.
//!
//! If the compares hold, nothing the transaction touched changed in between, so it
//! took effect atomically at step 2's revision with step 1's reads. A failed compare
//! (or an error in step 1) is a definite `fail`: nothing was written. A timeout or a
//! lost connection in step 2 is indeterminate (`info`), never retried; the client
//! continues as a new process.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, Txn as EtcdTxn, TxnOp, TxnOpResponse};

use crate::elle::{Mop, Txn};
use crate::history::{outcome, Status};
use crate::rng::Rng;
use crate::{Clock, RunConfig};

/// How long a set of keys is used before clients move to fresh ones: lists stay
/// short, and so do reads and the checker's work per key.
const KEY_GENERATION: Duration = Duration::from_secs(5);

pub struct Shared {
    pub clock: Clock,
    pub history: Mutex<Vec<Txn>>,
    next_value: AtomicU64,
}

impl Shared {
    pub fn new(clock: Clock) -> Self {
        Shared {
            clock,
            history: Mutex::new(Vec::new()),
            next_value: AtomicU64::new(1),
        }
    }
}

pub fn encode(list: &[u64]) -> String {
    list.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes a stored list; an element that does not parse becomes `u64::MAX`, which
/// nobody appends, so the checker reports it as garbage.
pub fn decode(v: &[u8]) -> Vec<u64> {
    let s = String::from_utf8_lossy(v);
    if s.is_empty() {
        return Vec::new();
    }
    s.split(',')
        .map(|e| e.parse().unwrap_or(u64::MAX))
        .collect()
}

/// A new transaction: 1 to 4 reads or appends over the generation's keys (a key may
/// repeat, so a transaction can append twice to a key or read its own append).
fn generate(rng: &mut Rng, shared: &Shared, keys: usize, generation: u64) -> Vec<Mop> {
    (0..1 + rng.below(4))
        .map(|_| {
            let key = format!("jepsen/a/g{generation}/k{}", rng.below(keys as u64));
            if rng.below(2) == 0 {
                Mop::Read { key, value: None }
            } else {
                Mop::Append {
                    key,
                    value: shared.next_value.fetch_add(1, Ordering::Relaxed),
                }
            }
        })
        .collect()
}

const COMPARE_FAILED: &str = "compare failed";

enum Outcome {
    Ok(Vec<Mop>),
    Fail(String),
    Info(String),
}

async fn execute(c: &mut etcd_client::Client, mops: &[Mop]) -> Outcome {
    let mut keys: Vec<&str> = mops.iter().map(Mop::key).collect();
    keys.sort_unstable();
    keys.dedup();
    // Step 1: read every touched key at one revision.
    let read = EtcdTxn::new().and_then(
        keys.iter()
            .map(|k| TxnOp::get(*k, None))
            .collect::<Vec<_>>(),
    );
    let resp = match c.txn(read).await {
        Ok(r) => r,
        Err(e) => return Outcome::Fail(format!("read step: {e}")),
    };
    let mut state: BTreeMap<&str, (Vec<u64>, i64)> = BTreeMap::new();
    for (k, r) in keys.iter().zip(resp.op_responses()) {
        let TxnOpResponse::Get(g) = r else {
            return Outcome::Fail("read step: not a range response".into());
        };
        let (list, rev) = g.kvs().first().map_or((Vec::new(), 0), |kv| {
            (decode(kv.value()), kv.mod_revision())
        });
        state.insert(k, (list, rev));
    }
    // Apply the micro-operations locally, in order.
    let mut done = Vec::with_capacity(mops.len());
    let mut written: Vec<&str> = Vec::new();
    for m in mops {
        let entry = state.get_mut(m.key()).expect("every key was read");
        match m {
            Mop::Read { key, .. } => done.push(Mop::Read {
                key: key.clone(),
                value: Some(entry.0.clone()),
            }),
            Mop::Append { key, value } => {
                entry.0.push(*value);
                if !written.contains(&key.as_str()) {
                    written.push(key);
                }
                done.push(m.clone());
            }
        }
    }
    if written.is_empty() {
        return Outcome::Ok(done);
    }
    // Step 2: commit if nothing touched changed since step 1.
    let commit = EtcdTxn::new()
        .when(
            state
                .iter()
                .map(|(k, (_, rev))| Compare::mod_revision(*k, CompareOp::Equal, *rev))
                .collect::<Vec<_>>(),
        )
        .and_then(
            written
                .iter()
                .map(|k| TxnOp::put(*k, encode(&state[k].0), None))
                .collect::<Vec<_>>(),
        );
    match outcome(Some(c.txn(commit).await.map(|r| r.succeeded())), false) {
        (Status::Ok, Some(true), _) => Outcome::Ok(done),
        (Status::Ok, _, _) => Outcome::Fail(COMPARE_FAILED.into()),
        (Status::Fail, _, e) => Outcome::Fail(e.unwrap_or_default()),
        (Status::Info, _, e) => Outcome::Info(e.unwrap_or_default()),
    }
}

pub async fn client(
    shared: Arc<Shared>,
    cfg: RunConfig,
    endpoint: String,
    index: usize,
    until: Instant,
) {
    let mut rng = Rng::for_client(cfg.seed, index);
    let mut process = index as u64;
    let per_client = Duration::from_secs_f64(cfg.clients as f64 / cfg.rate.max(1) as f64);
    let mut client: Option<etcd_client::Client> = None;
    while Instant::now() < until {
        let started = Instant::now();
        let Some(c) = crate::cluster::connected(&mut client, &endpoint, cfg.op_timeout).await
        else {
            continue;
        };
        let generation = shared.clock.now() / KEY_GENERATION.as_nanos() as u64;
        let mops = generate(&mut rng, &shared, cfg.keys, generation);
        let invoke = shared.clock.now();
        let outcome = match tokio::time::timeout(cfg.op_timeout * 2, execute(c, &mops)).await {
            Ok(o) => o,
            // Either step may have been in flight: the commit may still happen.
            Err(_) => Outcome::Info("timeout".into()),
        };
        let complete = shared.clock.now();
        let (status, mops, error) = match outcome {
            Outcome::Ok(done) => (Status::Ok, done, None),
            Outcome::Fail(e) => (Status::Fail, mops, Some(e)),
            Outcome::Info(e) => (Status::Info, mops, Some(e)),
        };
        // A failed compare is a normal answer; anything else may mean a broken
        // connection.
        let reconnect = status != Status::Ok && error.as_deref() != Some(COMPARE_FAILED);
        shared.history.lock().expect("history lock").push(Txn {
            process,
            mops,
            status,
            invoke,
            complete: (status != Status::Info).then_some(complete),
            error,
        });
        if status == Status::Info {
            // The transaction stays pending forever: its process never runs another.
            process += cfg.clients as u64;
        }
        if reconnect {
            client = None;
        }
        if let Some(rest) = per_client.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}

/// Writes the transactions as JSON lines, in invocation order.
pub fn write_history(history: &[Txn], path: &Path) -> std::io::Result<()> {
    let mut sorted: Vec<&Txn> = history.iter().collect();
    sorted.sort_by_key(|t| t.invoke);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for t in sorted {
        serde_json::to_writer(&mut f, t)?;
        f.write_all(b"\n")?;
    }
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip() {
        assert_eq!(decode(encode(&[]).as_bytes()), Vec::<u64>::new());
        assert_eq!(decode(encode(&[3, 1, 20]).as_bytes()), vec![3, 1, 20]);
        assert_eq!(decode(b"1,x"), vec![1, u64::MAX]);
    }
}
