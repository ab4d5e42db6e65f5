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
//!
//! This file holds the flags, the run control (pacing, progress, CPU accounting) and
//! the summary; the workloads are in `kv.rs`, `watch.rs` and `lease.rs`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use etcd_client::Client;
use hdrhistogram::Histogram;
use pontoon_store::server::coalesce::Coalesce;
use tokio::task::JoinHandle;

/// The load generator's CPU is part of every measurement on a small machine; glibc
/// malloc was a tenth of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// KV workloads: print each request slower than this many milliseconds to stderr
    /// (`slow <wall-clock start, unix seconds> <latency ms>`), to line a latency tail
    /// up with server logs and traces. 0: off.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// KV workloads with --duration: run this many seconds on the same connections
    /// first, neither counted nor recorded (the first requests on new connections
    /// are slow for any server). 0: none.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
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

/// Opens `--conns` connections, round-robin over the endpoints. Each one coalesces the
/// requests that are ready into one write ([`Coalesce`]), as grpc-go (etcdctl's,
/// Kubernetes' client) does: the generator's own cost per request stays low, and the
/// servers see the write pattern real Go clients send.
async fn connect(args: &Args) -> anyhow::Result<Vec<Client>> {
    let eps: Vec<String> = args
        .endpoints
        .split(',')
        .filter(|e| !e.is_empty())
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect();
    if eps.is_empty() {
        bail!("no endpoints");
    }
    let mut out = Vec::new();
    for i in 0..args.conns.max(1) {
        let addr = eps[i % eps.len()].clone();
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("endpoint {addr}"))?;
        let dial = addr.clone();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let dial = dial.clone();
            async move {
                let s = tokio::net::TcpStream::connect(&dial).await?;
                s.set_nodelay(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Coalesce::new(s)))
            }
        });
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let c = Client::from_channel(etcd_client::Channel::Tonic(channel), None)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
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

    /// Spawns `n` client tasks `client(i, args, connection, ctl)`, spread over the
    /// connections round-robin.
    fn spawn_clients<T, Fut>(
        self: &Arc<Self>,
        n: usize,
        args: &Args,
        conns: &[Client],
        client: impl Fn(usize, Arc<Args>, Client, Arc<Ctl>) -> Fut,
    ) -> Vec<JoinHandle<T>>
    where
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let shared = Arc::new(args.clone());
        (0..n)
            .map(|i| {
                tokio::spawn(client(
                    i,
                    shared.clone(),
                    conns[i % conns.len()].clone(),
                    self.clone(),
                ))
            })
            .collect()
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

mod kv;
mod lease;
mod watch;

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
        "watch" => watch::run_watch(&args, &conns).await?,
        "watch-idle" => watch::run_watch_idle(&args, &conns).await?,
        "lease-keepalive" => lease::run_lease(&args, &conns).await?,
        _ => kv::run_kv(&args, &conns).await?,
    };
    print_summary(&args, &summary);
    Ok(())
}
