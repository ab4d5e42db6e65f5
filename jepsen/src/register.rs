//! The `register` workload: reads, writes of unique values and compare-and-set (a Txn
//! comparing the value) over a few keys at a time, checked for linearizability by
//! [`crate::checker`]. Keys rotate every [`KEY_GENERATION`] (Jepsen's "independent"
//! keys), so each key's history stays short.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::history::{outcome, Call, History, Op, Ret, Status};
use crate::rng::Rng;
use crate::{Clock, RunConfig};

/// How long a set of keys is used before clients move to fresh ones.
const KEY_GENERATION: Duration = Duration::from_secs(5);

fn parse_value(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

pub struct Shared {
    clock: Clock,
    pub history: Mutex<History>,
    next_value: AtomicU64,
    /// The last value written to each key (any outcome), for plausible CAS compares.
    last: Mutex<Vec<u64>>,
}

impl Shared {
    pub fn new(clock: Clock, keys: usize) -> Self {
        Shared {
            clock,
            history: Mutex::new(History::default()),
            next_value: AtomicU64::new(1),
            last: Mutex::new(vec![0; keys]),
        }
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
        // Keys rotate every KEY_GENERATION (Jepsen's "independent" keys): each key's
        // history stays short, so indeterminate operations cannot blow up the search.
        let generation = shared.clock.now() / KEY_GENERATION.as_nanos() as u64;
        let k = rng.below(cfg.keys as u64) as usize;
        let key = format!("jepsen/g{generation}/r{k}");
        let dice = rng.below(10);
        let call = if dice < 4 {
            Call::Read
        } else if dice < 8 {
            Call::Write(shared.next_value.fetch_add(1, Ordering::Relaxed))
        } else {
            // A recent value of this key index (maybe of an older generation: the
            // compare then fails, which is a result too).
            let expect = shared.last.lock().expect("lock")[k];
            Call::Cas(expect, shared.next_value.fetch_add(1, Ordering::Relaxed))
        };
        if let Call::Write(v) | Call::Cas(_, v) = call {
            shared.last.lock().expect("lock")[k] = v;
        }
        let invoke = shared.clock.now();
        let result = tokio::time::timeout(cfg.op_timeout, async {
            match call {
                Call::Read => {
                    let opts = cfg
                        .serializable_reads
                        .then(|| GetOptions::new().with_serializable());
                    c.get(key.as_str(), opts)
                        .await
                        .map(|r| Ret::Read(r.kvs().first().and_then(|kv| parse_value(kv.value()))))
                }
                Call::Write(v) => c
                    .put(key.as_str(), v.to_string(), None)
                    .await
                    .map(|_| Ret::Write),
                Call::Cas(e, n) => {
                    let txn = Txn::new()
                        .when([Compare::value(
                            key.as_str(),
                            CompareOp::Equal,
                            e.to_string(),
                        )])
                        .and_then([TxnOp::put(key.as_str(), n.to_string(), None)]);
                    c.txn(txn).await.map(|r| Ret::Cas(r.succeeded()))
                }
            }
        })
        .await;
        let complete = shared.clock.now();
        // A read has no effect: if it failed, it failed.
        let (status, ret, error) = outcome(result.ok(), call == Call::Read);
        let op = Op {
            process,
            key,
            call,
            ret,
            invoke,
            complete: (status == Status::Ok).then_some(complete),
        };
        shared
            .history
            .lock()
            .expect("history lock")
            .ops
            .push((op, status, error));
        if status != Status::Ok {
            // The connection may be broken; an indeterminate op stays pending forever,
            // so its process never issues another one.
            client = None;
            if status == Status::Info {
                process += cfg.clients as u64;
            }
        }
        let spent = started.elapsed();
        if spent < per_client {
            tokio::time::sleep(per_client - spent).await;
        }
    }
}
