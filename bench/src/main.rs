//! `pontoon-bench`: a load generator for any etcd-API endpoint (Pontoon or etcd).
//!
//! ```text
//! pontoon-bench --endpoints 127.0.0.1:2379 --workload put --clients 256 --conns 16 \
//!     --total 100000 --key-size 16 --val-size 256
//! ```
//!
//! Workloads:
//!
//! - `put`, `range` (linearizable), `range-serializable`, `txn-put` (a Txn comparing the
//!   key's mod revision, then putting), `delete`: each client is a task issuing one
//!   request at a time on one of `--conns` shared connections, on random keys of the
//!   key space (`range*` and `delete` write the key space first unless `--no-preload`).
//! - `load`: puts `--total` distinct keys `0..total` as fast as the clients go (for the
//!   memory after loading N keys).
//! - `watch`: fan-out. `--watchers` watchers on one key (or a prefix with
//!   `--watch-prefix`), spread over `--streams` watch streams on the `--conns`
//!   connections, then `--clients` writers put to the key at `--rate` in total. Each
//!   value starts with the send time (this process's monotonic clock, taken just before
//!   the Put is sent), so the delivery latency of every event is receive time minus send
//!   time. Throughput is events received per second over all watchers; every watcher
//!   must see every acknowledged put, the ones missing are reported as lost.
//! - `watch-idle`: opens `--watchers` watchers (distinct keys), holds them for
//!   `--duration` seconds and exits (a script measures the server's memory meanwhile).
//! - `lease-keepalive`: each client grants one lease, opens a LeaseKeepAlive stream and
//!   sends keep-alives on it one after the other as fast as possible; the latency is
//!   the round trip of one keep-alive.
//!
//! Latencies go into HDR histograms. A progress bar updates while it runs; at the end a
//! table and one JSON line (for scripts, on stdout, last) are printed.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, Txn,
    TxnOp, WatchOptions, WatchRequestSender, WatchResponseStream,
};
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

const WORKLOADS: &[&str] = &[
    "put",
    "range",
    "range-serializable",
    "txn-put",
    "delete",
    "load",
    "watch",
    "watch-idle",
    "lease-keepalive",
];

#[derive(Parser, Clone)]
#[command(
    name = "pontoon-bench",
    about = "Load generator for etcd-API endpoints"
)]
struct Args {
    /// Comma-separated endpoints; connections are spread over them round-robin.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// put, range, range-serializable, txn-put, delete, load, watch, watch-idle,
    /// lease-keepalive.
    #[arg(long, default_value = "put")]
    workload: String,
    /// Concurrent clients (one request in flight each); for watch, the writers.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// gRPC connections shared by the clients (and the watch streams).
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Requests in total (for watch: puts; for load: keys). Ignored with --duration,
    /// except by load, which stops at whichever comes first.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Run for this many seconds instead of a total (watch-idle: hold this long,
    /// default 10).
    #[arg(long)]
    duration: Option<u64>,
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Distinct keys written or read.
    #[arg(long, default_value_t = 10_000)]
    key_space: u64,
    /// Target requests per second over all clients (0: as fast as possible). For
    /// watch, the put rate.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Do not write the key space before a range or delete workload.
    #[arg(long)]
    no_preload: bool,
    /// watch, watch-idle: watchers in total.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// watch, watch-idle: watch streams the watchers are spread over, round-robin
    /// over the connections (0: one stream per 100 watchers, at least --conns).
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// watch: the key watched and written (with --watch-prefix: the prefix, and the
    /// writers put random keys of the key space under it). watch-idle: the prefix of
    /// the watchers' distinct keys.
    #[arg(long, default_value = "/bench/watch/")]
    watch_key: String,
    /// watch: watch a prefix rather than one key.
    #[arg(long)]
    watch_prefix: bool,
    /// watch: seconds to wait after the last put for events still on their way.
    #[arg(long, default_value_t = 10)]
    drain_timeout: u64,
    /// lease-keepalive: the leases' TTL in seconds.
    #[arg(long, default_value_t = 60)]
    lease_ttl: i64,
    /// Comma-separated server process IDs on this machine: their CPU time (user +
    /// system) during the measured phase is reported per operation, next to the load
    /// generator's own.
    #[arg(long, default_value = "")]
    cpu_pids: String,
}

/// CPU seconds (user + system) process `pid` ("self" for this one) has used, from
/// `/proc/<pid>/stat` (Linux; clock ticks of 1/100 s).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds of (this process, the `--cpu-pids` servers) when the measured phase
/// began.
static PHASE_CPU: std::sync::Mutex<Option<(f64, f64)>> = std::sync::Mutex::new(None);

fn cpu_now(args: &Args) -> (f64, f64) {
    let servers = args
        .cpu_pids
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(cpu_seconds)
        .sum();
    (cpu_seconds("self").unwrap_or(0.0), servers)
}

/// The process's clock origin: watch values carry nanoseconds since it.
static BASE: OnceLock<Instant> = OnceLock::new();

fn now_nanos() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let mut k = format!("{i:0width$}", width = size.max(1)).into_bytes();
    k.truncate(size.max(1));
    k
}

fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 us .. 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn lcg(n: u64) -> u64 {
    n.wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
}

async fn connect(args: &Args) -> anyhow::Result<Vec<Client>> {
    let eps: Vec<String> = args
        .endpoints
        .split(',')
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if eps.is_empty() {
        bail!("no endpoints");
    }
    let mut out = Vec::new();
    for i in 0..args.conns.max(1) {
        let ep = eps[i % eps.len()].clone();
        let c = Client::connect([ep.clone()], None)
            .await
            .with_context(|| format!("connecting to {ep}"))?;
        out.push(c);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Progress

/// A one-line progress bar on stderr, redrawn every second (every 5 s, one line each,
/// when stderr is not a terminal).
struct Progress {
    task: JoinHandle<()>,
    tty: bool,
}

struct ProgressSpec {
    label: String,
    /// What is counted, e.g. "req" or "events".
    unit: &'static str,
    count: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    /// The bar follows count / total ...
    total: Option<u64>,
    /// ... or elapsed time / duration.
    duration: Option<Duration>,
}

impl Progress {
    fn start(spec: ProgressSpec) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let every = if tty { 1 } else { 5 };
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_secs(every)).await;
                let done = spec.count.load(Ordering::Relaxed);
                let errors = spec.errors.load(Ordering::Relaxed);
                let elapsed = started.elapsed().as_secs_f64();
                let now_rate = (done - last.1.min(done)) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), done);
                let frac = match (spec.duration, spec.total) {
                    (Some(d), _) => Some(elapsed / d.as_secs_f64()),
                    (None, Some(t)) if t > 0 => Some(done as f64 / t as f64),
                    _ => None,
                };
                let bar = frac.map_or(String::new(), |f| {
                    let f = f.clamp(0.0, 1.0);
                    let width = 30;
                    let filled = (f * width as f64).round() as usize;
                    format!(
                        "[{}{}] {:>3.0}% ",
                        "#".repeat(filled),
                        "-".repeat(width - filled),
                        f * 100.0
                    )
                });
                let of = match (spec.duration, spec.total) {
                    (Some(d), _) => format!("{elapsed:.1}/{}s", d.as_secs()),
                    _ => format!("{elapsed:.1}s"),
                };
                let count = match (spec.duration, spec.total) {
                    (None, Some(t)) => format!("{done}/{t}"),
                    _ => done.to_string(),
                };
                let line = format!(
                    "{} {bar}{of} {count} {} | {:.0}/s avg, {now_rate:.0}/s now | {errors} errors",
                    spec.label,
                    spec.unit,
                    done as f64 / elapsed.max(1e-9),
                );
                let mut err = std::io::stderr().lock();
                if tty {
                    let _ = write!(err, "\r\x1b[2K{line}");
                } else {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
            }
        });
        Progress { task, tty }
    }

    fn finish(self) {
        self.task.abort();
        if self.tty {
            eprintln!();
        }
    }
}

// ---------------------------------------------------------------------------
// Request loop control shared by the clients.

struct Ctl {
    issued: AtomicU64,
    completed: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    total: Option<u64>,
    deadline: Option<Instant>,
    /// The interval between one client's requests for the target rate.
    every: Option<Duration>,
}

impl Ctl {
    /// Created when the measured phase begins (after any preload or setup).
    fn new(args: &Args, clients: usize, total: Option<u64>) -> Ctl {
        *PHASE_CPU.lock().expect("cpu mark") = Some(cpu_now(args));
        Ctl {
            issued: AtomicU64::new(0),
            completed: Arc::new(AtomicU64::new(0)),
            errors: Arc::new(AtomicU64::new(0)),
            total,
            deadline: None,
            every: (args.rate > 0)
                .then(|| Duration::from_secs_f64(clients as f64 / args.rate as f64)),
        }
    }

    /// The index of the next request, or None when the run is over.
    fn next(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        if self.total.is_some_and(|t| i >= t) {
            return None;
        }
        Some(i)
    }

    fn done(&self, ok: bool) {
        if ok {
            self.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Spaces one client's requests for the target rate (open schedule: a late client
/// catches up, but never by more than one second's worth of requests).
struct Pacer {
    next: Instant,
    every: Option<Duration>,
}

impl Pacer {
    fn new(every: Option<Duration>, client: usize, clients: usize) -> Pacer {
        // Stagger the clients over one interval.
        let offset = every.map_or(Duration::ZERO, |e| {
            e.mul_f64(client as f64 / clients as f64)
        });
        Pacer {
            next: Instant::now() + offset,
            every,
        }
    }

    /// Waits for this client's next slot, but not past the end of the run.
    async fn wait(&mut self, deadline: Option<Instant>) {
        let Some(every) = self.every else { return };
        let now = Instant::now();
        if self.next + Duration::from_secs(1) < now {
            self.next = now;
        }
        let until = deadline.map_or(self.next, |d| d.min(self.next));
        if until > now {
            tokio::time::sleep_until(until.into()).await;
        }
        self.next += every;
    }
}

// ---------------------------------------------------------------------------
// Results

#[derive(Clone)]
struct Summary {
    /// Operations counted for the throughput (requests, events, watchers).
    ok: u64,
    errors: u64,
    seconds: f64,
    unit: &'static str,
    /// What the latency histogram measures.
    latency_of: &'static str,
    hist: Histogram<u64>,
    /// Extra (name, JSON value) pairs.
    extra: Vec<(&'static str, String)>,
}

fn print_summary(args: &Args, s: &Summary) {
    let mut s = s.clone();
    if let Some((bench0, server0)) = *PHASE_CPU.lock().expect("cpu mark") {
        let (bench1, server1) = cpu_now(args);
        let per_op = |cpu: f64| format!("{:.1}", cpu * 1e6 / s.ok.max(1) as f64);
        s.extra
            .push(("bench_cpu_us_per_op", per_op(bench1 - bench0)));
        if !args.cpu_pids.is_empty() {
            s.extra
                .push(("server_cpu_us_per_op", per_op(server1 - server0)));
        }
    }
    let s = &s;
    let h = &s.hist;
    let ms = |q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let rps = s.ok as f64 / s.seconds.max(1e-9);
    let (p50, p90, p99, p999, max) = (
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
    );
    let (w, c, n) = (&args.workload, args.clients, args.conns);
    let eps = args.endpoints.split(',').filter(|e| !e.is_empty()).count();
    let unit = s.unit;
    println!("{:<12} {w}", "workload");
    println!("{:<12} {c} clients, {n} conns, {eps} endpoints", "load");
    println!(
        "{:<12} {} {unit} ok, {} errors in {:.2} s",
        "done", s.ok, s.errors, s.seconds
    );
    println!("{:<12} {rps:.0} {unit}/s", "throughput");
    println!(
        "{:<12} p50 {p50:.3}  p90 {p90:.3}  p99 {p99:.3}  p99.9 {p999:.3}  max {max:.3}  ({})",
        "latency ms", s.latency_of
    );
    for (k, v) in &s.extra {
        println!("{k:<12} {}", v.trim_matches('"'));
    }
    let mut json = format!(
        "{{\"workload\":\"{w}\",\"clients\":{c},\"conns\":{n},\"endpoints\":{eps},\"ok\":{},\"errors\":{},\"seconds\":{:.3},\"rps\":{rps:.1},\"unit\":\"{unit}/s\",\"latency_of\":\"{}\",\"p50_ms\":{p50:.3},\"p90_ms\":{p90:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3},\"max_ms\":{max:.3}",
        s.ok, s.errors, s.seconds, s.latency_of
    );
    for (k, v) in &s.extra {
        json.push_str(&format!(",\"{k}\":{v}"));
    }
    json.push('}');
    println!("{json}");
}

// ---------------------------------------------------------------------------
// KV workloads: put, range, range-serializable, txn-put, delete, load

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
            hist.saturating_record((started.elapsed().as_micros() as u64).max(1));
        }
        ctl.done(r.is_ok());
    }
    (hist, deleted)
}

async fn run_kv(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let load = args.workload == "load";
    if !args.no_preload && (args.workload.starts_with("range") || args.workload == "delete") {
        eprintln!("preloading {} keys...", args.key_space);
        preload(args, conns).await?;
    }
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
        label: args.workload.clone(),
        unit: "req",
        count: ctl.completed.clone(),
        errors: ctl.errors.clone(),
        total: ctl.total,
        duration: args.duration.map(Duration::from_secs),
    });
    let shared = Arc::new(args.clone());
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(kv_client(
                i,
                shared.clone(),
                conns[i % conns.len()].clone(),
                ctl.clone(),
            ))
        })
        .collect();
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

// ---------------------------------------------------------------------------
// Watch workloads

fn stream_count(args: &Args) -> usize {
    let w = args.watchers.max(1);
    let s = if args.streams > 0 {
        args.streams
    } else {
        w.div_ceil(100).max(args.conns.max(1))
    };
    s.min(w)
}

struct OpenStream {
    tx: WatchRequestSender,
    rx: WatchResponseStream,
    ids: Vec<i64>,
}

/// Opens `--watchers` watchers over the streams and waits until each is created.
/// `distinct`: watcher i watches `<watch-key><i>`; otherwise all watch `--watch-key`
/// (as a prefix with `--watch-prefix`).
async fn open_watchers(
    args: &Args,
    conns: &[Client],
    distinct: bool,
) -> anyhow::Result<Vec<OpenStream>> {
    let w = args.watchers.max(1);
    let streams = stream_count(args);
    let created = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    eprintln!(
        "opening {w} watchers on {streams} streams over {} connections...",
        conns.len()
    );
    let progress = Progress::start(ProgressSpec {
        label: "creating".into(),
        unit: "watchers",
        count: created.clone(),
        errors: errors.clone(),
        total: Some(w as u64),
        duration: None,
    });
    let opts = if args.watch_prefix && !distinct {
        WatchOptions::new().with_prefix()
    } else {
        WatchOptions::new()
    };
    let mut tasks = Vec::new();
    let mut first = 0usize;
    for s in 0..streams {
        let n = w / streams + usize::from(s < w % streams);
        let mut wc = conns[s % conns.len()].watch_client();
        let (opts, created) = (opts.clone(), created.clone());
        let base = args.watch_key.clone();
        let key_of = move |i: usize| -> Vec<u8> {
            if distinct {
                format!("{base}{i}").into_bytes()
            } else {
                base.clone().into_bytes()
            }
        };
        let range = first..first + n;
        first += n;
        tasks.push(tokio::spawn(async move {
            let mut keys = range.map(key_of);
            let k0 = keys.next().expect("n >= 1");
            let (mut tx, mut rx) = wc.watch(k0, Some(opts.clone())).await?.split();
            // Send the creates while reading the answers, so neither side's buffer
            // holds things up.
            let sender = tokio::spawn(async move {
                for k in keys {
                    tx.watch(k, Some(opts.clone())).await?;
                }
                Ok::<_, anyhow::Error>(tx)
            });
            let mut ids = Vec::with_capacity(n);
            while ids.len() < n {
                let resp = rx
                    .message()
                    .await?
                    .ok_or_else(|| anyhow!("watch stream closed while creating"))?;
                if resp.canceled() {
                    bail!("watch refused: {}", resp.cancel_reason());
                }
                if resp.created() {
                    ids.push(resp.watch_id());
                    created.fetch_add(1, Ordering::Relaxed);
                }
            }
            let tx = sender.await??;
            Ok::<_, anyhow::Error>(OpenStream { tx, rx, ids })
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    progress.finish();
    Ok(out)
}

struct StreamResult {
    hist: Histogram<u64>,
    counts: HashMap<i64, u64>,
    canceled: u64,
    broken: u64,
}

/// Reads one watch stream until told to stop: counts events per watcher and records
/// each event's delivery latency (receive time minus the send time in the value).
async fn receive(
    mut s: OpenStream,
    events: Arc<AtomicU64>,
    last_event: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> StreamResult {
    let _tx = s.tx; // dropping it would half-close the stream
    let mut r = StreamResult {
        hist: new_hist(),
        counts: s.ids.iter().map(|id| (*id, 0)).collect(),
        canceled: 0,
        broken: 0,
    };
    loop {
        let msg = tokio::select! {
            m = s.rx.message() => m,
            _ = stop.changed() => break,
        };
        match msg {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    r.canceled += 1;
                    continue;
                }
                let evs = resp.events();
                if evs.is_empty() {
                    continue;
                }
                let now = now_nanos();
                for ev in evs {
                    let sent = ev
                        .kv()
                        .and_then(|kv| kv.value().get(..8))
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                    if let Some(sent) = sent {
                        r.hist
                            .saturating_record((now.saturating_sub(sent) / 1000).max(1));
                    }
                }
                *r.counts.entry(resp.watch_id()).or_default() += evs.len() as u64;
                events.fetch_add(evs.len() as u64, Ordering::Relaxed);
                last_event.fetch_max(now, Ordering::Relaxed);
            }
            Ok(None) | Err(_) => {
                r.broken += 1;
                break;
            }
        }
    }
    r
}

async fn watch_writer(id: usize, args: Arc<Args>, mut c: Client, ctl: Arc<Ctl>) -> Histogram<u64> {
    let mut hist = new_hist();
    let mut pacer = Pacer::new(ctl.every, id, args.clients.max(1));
    let mut n: u64 = lcg(id as u64 + 1);
    let pad = args.val_size.saturating_sub(8);
    loop {
        pacer.wait(ctl.deadline).await;
        if ctl.next().is_none() {
            break;
        }
        n = lcg(n);
        let k = if args.watch_prefix {
            let mut k = args.watch_key.clone().into_bytes();
            k.extend(key((n >> 33) % args.key_space.max(1), args.key_size));
            k
        } else {
            args.watch_key.clone().into_bytes()
        };
        let started = Instant::now();
        let mut value = Vec::with_capacity(8 + pad);
        value.extend_from_slice(&now_nanos().to_le_bytes());
        value.resize(8 + pad, b'v');
        let r = c.put(k, value, None).await;
        if r.is_ok() {
            hist.saturating_record((started.elapsed().as_micros() as u64).max(1));
        }
        ctl.done(r.is_ok());
    }
    hist
}

async fn run_watch(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let streams = open_watchers(args, conns, false).await?;
    let watchers = args.watchers.max(1) as u64;
    let n_streams = streams.len();
    let events = Arc::new(AtomicU64::new(0));
    let last_event = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let receivers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            tokio::spawn(receive(
                s,
                events.clone(),
                last_event.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();

    let writers = args.clients.max(1);
    let mut ctl = Ctl::new(args, writers, args.duration.is_none().then_some(args.total));
    let started = Instant::now();
    let started_nanos = now_nanos();
    ctl.deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let ctl = Arc::new(ctl);
    let progress = Progress::start(ProgressSpec {
        label: format!("watch x{watchers}"),
        unit: "events",
        count: events.clone(),
        errors: ctl.errors.clone(),
        total: ctl.total.map(|t| t * watchers),
        duration: args.duration.map(Duration::from_secs),
    });
    let shared = Arc::new(args.clone());
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            tokio::spawn(watch_writer(
                i,
                shared.clone(),
                conns[i % conns.len()].clone(),
                ctl.clone(),
            ))
        })
        .collect();
    let mut put_hist = new_hist();
    for t in tasks {
        put_hist.add(t.await?).expect("same bounds");
    }
    let puts_ok = ctl.completed.load(Ordering::Relaxed);
    let put_errors = ctl.errors.load(Ordering::Relaxed);
    let put_seconds = started.elapsed().as_secs_f64();
    let expected = puts_ok * watchers;
    let drain_until = Instant::now() + Duration::from_secs(args.drain_timeout);
    while events.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    progress.finish();

    let mut hist = new_hist();
    let (mut canceled, mut broken, mut lost, mut short) = (0, 0, 0, 0);
    let mut received = 0;
    for t in receivers {
        let r = t.await?;
        hist.add(&r.hist).expect("same bounds");
        canceled += r.canceled;
        broken += r.broken;
        for count in r.counts.values() {
            received += count;
            if *count < puts_ok {
                lost += puts_ok - count;
                short += 1;
            }
        }
    }
    let last = last_event.load(Ordering::Relaxed);
    let seconds = if last > started_nanos {
        (last - started_nanos) as f64 / 1e9
    } else {
        put_seconds
    };
    let ms = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let extra = vec![
        ("watchers", watchers.to_string()),
        ("streams", n_streams.to_string()),
        ("writers", writers.to_string()),
        ("put_rate_target", args.rate.to_string()),
        ("puts", puts_ok.to_string()),
        ("put_errors", put_errors.to_string()),
        ("put_rps", format!("{:.1}", puts_ok as f64 / put_seconds)),
        ("put_p50_ms", format!("{:.3}", ms(&put_hist, 0.5))),
        ("put_p99_ms", format!("{:.3}", ms(&put_hist, 0.99))),
        ("events", received.to_string()),
        ("events_expected", expected.to_string()),
        ("events_lost", lost.to_string()),
        ("watchers_short", short.to_string()),
        ("canceled", canceled.to_string()),
        ("streams_broken", broken.to_string()),
    ];
    Ok(Summary {
        ok: received,
        errors: put_errors,
        seconds,
        unit: "events",
        latency_of: "delivery: put sent to event received",
        hist,
        extra,
    })
}

async fn run_watch_idle(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let streams = open_watchers(args, conns, true).await?;
    let create_seconds = started.elapsed().as_secs_f64();
    let n_streams = streams.len();
    let watchers: u64 = streams.iter().map(|s| s.ids.len() as u64).sum();
    let events = Arc::new(AtomicU64::new(0));
    let last_event = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let receivers: Vec<_> = streams
        .into_iter()
        .map(|s| {
            tokio::spawn(receive(
                s,
                events.clone(),
                last_event.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let hold = Duration::from_secs(args.duration.unwrap_or(10));
    eprintln!("holding {watchers} watchers for {} s", hold.as_secs());
    let progress = Progress::start(ProgressSpec {
        label: "holding".into(),
        unit: "events",
        count: events.clone(),
        errors: Arc::new(AtomicU64::new(0)),
        total: None,
        duration: Some(hold),
    });
    tokio::time::sleep(hold).await;
    let _ = stop_tx.send(true);
    progress.finish();
    let mut broken = 0;
    for t in receivers {
        broken += t.await?.broken;
    }
    Ok(Summary {
        ok: watchers,
        errors: broken,
        seconds: create_seconds,
        unit: "watchers",
        latency_of: "none measured",
        hist: new_hist(),
        extra: vec![
            ("watchers", watchers.to_string()),
            ("streams", n_streams.to_string()),
            ("create_seconds", format!("{create_seconds:.3}")),
            ("held_seconds", hold.as_secs().to_string()),
            ("streams_broken", broken.to_string()),
        ],
    })
}

// ---------------------------------------------------------------------------
// Lease keep-alive

struct Keeper {
    lc: LeaseClient,
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

async fn keepalive_client(
    i: usize,
    clients: usize,
    mut k: Keeper,
    ctl: Arc<Ctl>,
) -> (Histogram<u64>, Instant) {
    let mut hist = new_hist();
    let mut pacer = Pacer::new(ctl.every, i, clients);
    loop {
        pacer.wait(ctl.deadline).await;
        if ctl.next().is_none() {
            break;
        }
        let started = Instant::now();
        let (ok, broken) = match k.keeper.keep_alive().await {
            Ok(()) => match k.stream.message().await {
                Ok(Some(r)) => (r.ttl() > 0, false),
                Ok(None) | Err(_) => (false, true),
            },
            Err(_) => (false, true),
        };
        if ok {
            hist.saturating_record((started.elapsed().as_micros() as u64).max(1));
        }
        ctl.done(ok);
        if broken {
            // The server ended the stream: this client stops (counted as one error).
            break;
        }
    }
    let ended = Instant::now();
    let _ = k.lc.revoke(k.id).await;
    (hist, ended)
}

async fn run_lease(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let clients = args.clients.max(1);
    eprintln!("granting {clients} leases (TTL {} s)...", args.lease_ttl);
    let retries = Arc::new(AtomicU64::new(0));
    let setup: Vec<_> = (0..clients)
        .map(|i| {
            let mut lc = conns[i % conns.len()].lease_client();
            let ttl = args.lease_ttl;
            let retries = retries.clone();
            tokio::spawn(async move {
                let id = lc.grant(ttl, None).await?.id();
                // The member that acknowledged the grant may have applied it before
                // the leader, which answers keep-alives: until the leader has it too,
                // a keep-alive says "lease not found". Try again for up to 5 s.
                let mut attempt = 0;
                let (keeper, stream) = loop {
                    match lc.keep_alive(id).await {
                        Ok(k) => break k,
                        Err(e) if attempt < 250 && e.to_string().contains("not found") => {
                            attempt += 1;
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => return Err(e).context("opening the keep-alive stream"),
                    }
                };
                Ok::<_, anyhow::Error>(Keeper {
                    lc,
                    id,
                    keeper,
                    stream,
                })
            })
        })
        .collect();
    let mut keepers = Vec::with_capacity(clients);
    for t in setup {
        keepers.push(t.await??);
    }
    let mut ctl = Ctl::new(args, clients, args.duration.is_none().then_some(args.total));
    let started = Instant::now();
    ctl.deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let ctl = Arc::new(ctl);
    let progress = Progress::start(ProgressSpec {
        label: "lease-keepalive".into(),
        unit: "keep-alives",
        count: ctl.completed.clone(),
        errors: ctl.errors.clone(),
        total: ctl.total,
        duration: args.duration.map(Duration::from_secs),
    });
    let tasks: Vec<_> = keepers
        .into_iter()
        .enumerate()
        .map(|(i, k)| tokio::spawn(keepalive_client(i, clients, k, ctl.clone())))
        .collect();
    let mut hist = new_hist();
    // The clients revoke their lease after the run: time the run, not that.
    let mut ended = started;
    for t in tasks {
        let (h, end) = t.await?;
        hist.add(h).expect("same bounds");
        ended = ended.max(end);
    }
    let seconds = (ended - started).as_secs_f64();
    progress.finish();
    Ok(Summary {
        ok: hist.len(),
        errors: ctl.errors.load(Ordering::Relaxed),
        seconds,
        unit: "keep-alives",
        latency_of: "keep-alive round trip",
        hist,
        extra: vec![
            ("leases", clients.to_string()),
            ("setup_retries", retries.load(Ordering::Relaxed).to_string()),
        ],
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    BASE.get_or_init(Instant::now);
    let args = Args::parse();
    if !WORKLOADS.contains(&args.workload.as_str()) {
        bail!(
            "unknown workload {:?} (one of {})",
            args.workload,
            WORKLOADS.join(", ")
        );
    }
    if args.workload == "watch" && args.val_size < 8 {
        bail!("watch needs --val-size >= 8 (the value carries the send time)");
    }
    let conns = connect(&args).await?;
    let summary = match args.workload.as_str() {
        "watch" => run_watch(&args, &conns).await?,
        "watch-idle" => run_watch_idle(&args, &conns).await?,
        "lease-keepalive" => run_lease(&args, &conns).await?,
        _ => run_kv(&args, &conns).await?,
    };
    print_summary(&args, &summary);
    Ok(())
}
