//! `pontoon-bench`: a load generator for any etcd-API endpoint (Pontoon or etcd).
//!
//! ```text
//! pontoon-bench --endpoints 127.0.0.1:2379 --workload put --clients 256 --conns 16 \
//!     --total 100000 --key-size 16 --val-size 256
//! ```
//!
//! Workloads: `put`, `range` (linearizable), `range-serializable`, `txn-put` (a Txn
//! comparing the key's mod revision, then putting), `delete`. Each client is a task
//! issuing one request at a time on one of `--conns` shared connections; latencies go
//! into an HDR histogram. A progress line updates every second; at the end a table and
//! one JSON line (for scripts) are printed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use hdrhistogram::Histogram;

#[derive(Parser, Clone)]
#[command(
    name = "pontoon-bench",
    about = "Load generator for etcd-API endpoints"
)]
struct Args {
    /// Comma-separated endpoints; connections are spread over them.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// put, range, range-serializable, txn-put, delete.
    #[arg(long, default_value = "put")]
    workload: String,
    /// Concurrent clients (one request in flight each).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Requests in total (ignored with --duration).
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Run for this many seconds instead of a total.
    #[arg(long)]
    duration: Option<u64>,
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Distinct keys written or read.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Target requests per second over all clients (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Write the key space once before a read workload.
    #[arg(long, default_value_t = true)]
    preload: bool,
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let mut k = format!("{i:0width$}", width = size.max(1)).into_bytes();
    k.truncate(size.max(1));
    k
}

async fn connect(args: &Args) -> anyhow::Result<Vec<Client>> {
    let eps: Vec<String> = args.endpoints.split(',').map(str::to_string).collect();
    let mut out = Vec::new();
    for i in 0..args.conns.max(1) {
        out.push(Client::connect([eps[i % eps.len()].clone()], None).await?);
    }
    Ok(out)
}

async fn preload(args: &Args, clients: &[Client]) -> anyhow::Result<()> {
    let value = vec![b'v'; args.val_size];
    let next = Arc::new(AtomicU64::new(0));
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
    Ok(())
}

struct Totals {
    hist: Mutex<Histogram<u64>>,
    done: AtomicU64,
    errors: AtomicU64,
}

async fn client(
    id: usize,
    args: Args,
    mut c: Client,
    totals: Arc<Totals>,
    deadline: Option<Instant>,
) {
    let value = vec![b'v'; args.val_size];
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let per_client =
        (args.rate > 0).then(|| Duration::from_secs_f64(args.clients as f64 / args.rate as f64));
    let mut n: u64 = id as u64;
    loop {
        let i = totals.done.fetch_add(1, Ordering::Relaxed);
        let over = match deadline {
            Some(d) => Instant::now() >= d,
            None => i >= args.total,
        };
        if over {
            totals.done.fetch_sub(1, Ordering::Relaxed);
            break;
        }
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = key((n >> 33) % args.key_space.max(1), args.key_size);
        let started = Instant::now();
        let r = match args.workload.as_str() {
            "put" => c.put(k, value.clone(), None).await.map(|_| ()),
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
            "delete" => c.delete(k, None).await.map(|_| ()),
            other => panic!("unknown workload {other}"),
        };
        let micros = started.elapsed().as_micros() as u64;
        if r.is_err() {
            totals.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = local.record(micros.max(1));
        }
        if let Some(p) = per_client {
            let spent = started.elapsed();
            if spent < p {
                tokio::time::sleep(p - spent).await;
            }
        }
    }
    totals
        .hist
        .lock()
        .expect("lock")
        .add(&local)
        .expect("same bounds");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !["put", "range", "range-serializable", "txn-put", "delete"]
        .contains(&args.workload.as_str())
    {
        anyhow::bail!("unknown workload {:?}", args.workload);
    }
    let conns = connect(&args).await?;
    if args.preload && args.workload.starts_with("range") {
        eprintln!("preloading {} keys...", args.key_space);
        preload(&args, &conns).await?;
    }
    let totals = Arc::new(Totals {
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let started = Instant::now();
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let progress = {
        let (totals, args) = (totals.clone(), args.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = totals.done.load(Ordering::Relaxed);
                let target = args
                    .duration
                    .map_or(format!("/{}", args.total), |d| format!(" ({d}s run)"));
                eprint!(
                    "\r{:>6.1}s {done}{target} requests, {:.0} req/s   ",
                    started.elapsed().as_secs_f64(),
                    done as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let tasks: Vec<_> = (0..args.clients.max(1))
        .map(|i| {
            tokio::spawn(client(
                i,
                args.clone(),
                conns[i % conns.len()].clone(),
                totals.clone(),
                deadline,
            ))
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    progress.abort();
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let h = totals.hist.lock().expect("lock");
    let ok = h.len();
    let errors = totals.errors.load(Ordering::Relaxed);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let rps = ok as f64 / elapsed;
    let (p50, p90, p99, p999, max) = (
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
    );
    let (w, c, n) = (&args.workload, args.clients, args.conns);
    println!("workload {w} | clients {c} | conns {n} | {ok} ok, {errors} errors in {elapsed:.2}s");
    println!(
        "throughput {rps:.0} req/s | latency ms: p50 {p50:.3}  p90 {p90:.3}  p99 {p99:.3}  p99.9 {p999:.3}  max {max:.3}"
    );
    println!(
        "{{\"workload\":\"{w}\",\"clients\":{c},\"conns\":{n},\"ok\":{ok},\"errors\":{errors},\"seconds\":{elapsed:.3},\"rps\":{rps:.1},\"p50_ms\":{p50:.3},\"p90_ms\":{p90:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3},\"max_ms\":{max:.3}}}"
    );
    Ok(())
}
