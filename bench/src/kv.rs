//! The KV workloads: `put`, `range`, `range-serializable`, `txn-put`, `delete` and
//! `load`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use hdrhistogram::Histogram;

use crate::{key, lcg, new_hist, Args, Ctl, Pacer, Progress, ProgressSpec, Summary};

async fn preload(args: &Args, clients: &[Client]) -> anyhow::Result<()> {
    let value = vec![b'v'; args.val_size];
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(ProgressSpec {
        label: "preload".into(),
        unit: "keys",
        count: next.clone(),
        errors: errors.clone(),
        total: Some(args.key_space),
        duration: None,
    });
    let mut tasks = Vec::new();
    for i in 0..64usize {
        let mut c = clients[i % clients.len()].clone();
        let (next, value, args) = (next.clone(), value.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= args.key_space {
                    return Ok::<_, anyhow::Error>(());
                }
                c.put(key(k, args.key_size), value.clone(), None).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    progress.finish();
    Ok(())
}

async fn kv_client(
    id: usize,
    args: Arc<Args>,
    mut c: Client,
    ctl: Arc<Ctl>,
) -> (Histogram<u64>, u64) {
    let value = vec![b'v'; args.val_size];
    let mut hist = new_hist();
    let mut deleted = 0u64;
    let mut pacer = Pacer::new(ctl.every, id, args.clients.max(1));
    let mut n: u64 = lcg(id as u64 + 1);
    loop {
        pacer.wait(ctl.deadline).await;
        let Some(i) = ctl.next() else { break };
        n = lcg(n);
        let k = if args.workload == "load" {
            key(i, args.key_size)
        } else {
            key((n >> 33) % args.key_space.max(1), args.key_size)
        };
        let started = Instant::now();
        let r = match args.workload.as_str() {
            "put" | "load" => c.put(k, value.clone(), None).await.map(|_| ()),
            "range" => c.get(k, None).await.map(|_| ()),
            "range-serializable" => c
                .get(k, Some(GetOptions::new().with_serializable()))
                .await
                .map(|_| ()),
            "txn-put" => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(k.clone(), CompareOp::Greater, -1)])
                    .and_then([TxnOp::put(k, value.clone(), None)]);
                c.txn(txn).await.map(|_| ())
            }
            "delete" => c.delete(k, None).await.map(|r| {
                deleted += r.deleted().max(0) as u64;
            }),
            other => unreachable!("workload {other}"),
        };
        if r.is_ok() {
            let took = started.elapsed();
            hist.saturating_record((took.as_micros() as u64).max(1));
            if args.slow_ms > 0 && took >= Duration::from_millis(args.slow_ms) {
                log_slow(took);
            }
        }
        ctl.done(r.is_ok());
    }
    (hist, deleted)
}

/// One line per slow request: when it started (wall clock) and how long it took.
fn log_slow(took: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let start = now.saturating_sub(took);
    eprintln!(
        "slow {}.{:03} {:.1}",
        start.as_secs(),
        start.subsec_millis(),
        took.as_secs_f64() * 1000.0
    );
}

pub(crate) async fn run_kv(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let load = args.workload == "load";
    if !args.no_preload && (args.workload.starts_with("range") || args.workload == "delete") {
        eprintln!("preloading {} keys...", args.key_space);
        preload(args, conns).await?;
    }
    if args.warmup > 0 && args.duration.is_some() && !load {
        let mut warm = args.clone();
        warm.duration = Some(args.warmup);
        warm.slow_ms = 0;
        measure(&warm, conns, "warm-up").await?;
    }
    measure(args, conns, &args.workload).await
}

/// One pass of the workload: the measured phase, or a warm-up whose result is dropped.
async fn measure(args: &Args, conns: &[Client], label: &str) -> anyhow::Result<Summary> {
    let load = args.workload == "load";
    let clients = args.clients.max(1);
    let mut ctl = Ctl::new(
        args,
        clients,
        (load || args.duration.is_none()).then_some(args.total),
    );
    let started = Instant::now();
    ctl.deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let ctl = Arc::new(ctl);
    let progress = Progress::start(ProgressSpec {
        label: label.to_string(),
        unit: "req",
        count: ctl.completed.clone(),
        errors: ctl.errors.clone(),
        total: ctl.total,
        duration: args.duration.map(Duration::from_secs),
    });
    let tasks = ctl.spawn_clients(clients, args, conns, kv_client);
    let mut hist = new_hist();
    let mut deleted = 0;
    for t in tasks {
        let (h, d) = t.await?;
        hist.add(h).expect("same bounds");
        deleted += d;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.finish();
    let mut extra = Vec::new();
    if load {
        extra.push(("keys", ctl.completed.load(Ordering::Relaxed).to_string()));
    }
    if args.workload == "delete" {
        // Random keys: once the preloaded ones are gone, deletes find nothing.
        extra.push(("keys_deleted", deleted.to_string()));
    }
    Ok(Summary {
        ok: hist.len(),
        errors: ctl.errors.load(Ordering::Relaxed),
        seconds,
        unit: "req",
        latency_of: "request round trip",
        hist,
        extra,
    })
}
