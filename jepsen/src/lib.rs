//! Pontoon's fault-injection harness, in the spirit of Jepsen and etcd's robustness
//! tests: start a cluster of real processes (Pontoon, or etcd with the same flags),
//! run concurrent clients over the etcd gRPC API while a seeded nemesis injects
//! faults, record every operation, heal, and check the history.
//!
//! - [`cluster`]: local processes, peer proxies, kill / pause / partition;
//! - [`history`]: operations as clients saw them (ok / fail / indeterminate);
//! - [`checker`]: linearizability of per-key registers (Wing-Gong-Lowe);
//! - [`append`], [`elle`]: list-append transactions and their dependency-cycle
//!   checker (G0, G1a, G1b, G1c, G2, and their real-time variants);
//! - [`lease`], [`lock`]: lease expiry and revocation, and v3lock mutual exclusion
//!   (separating the overlaps any lease-based lock allows from real violations);
//! - [`timeline`]: an SVG picture of a failing sub-history.
//!
//! Workloads implemented: `register` (reads, writes and compare-and-set over many
//! keys, checked for linearizability), `append` (multi-key transactions, checked for
//! strict serializability), `watch` (watchers resuming across faults, checked for
//! etcd's watch guarantees, see [`watch`]), `lease` and `lock`. Nemeses: `kill`,
//! `pause`, `partition`, `membership`.

pub mod append;
pub mod checker;
pub mod cluster;
pub mod elle;
pub mod history;
pub mod lease;
pub mod lock;
pub mod nemesis;
pub mod rng;
pub mod timeline;
pub mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use checker::Verdict;
use cluster::{Cluster, Target};
use history::{Call, History, Op, Ret, Status};
use rng::Rng;

pub use nemesis::Fault;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Register,
    Watch,
    /// List-append transactions, checked Elle-style ([`append`], [`elle`]).
    Append,
    /// Keys on leases that are kept alive, revoked or left to expire ([`lease`]).
    Lease,
    /// Mutual exclusion through the v3lock API ([`lock`]).
    Lock,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "register" => Ok(Workload::Register),
            "watch" => Ok(Workload::Watch),
            "append" => Ok(Workload::Append),
            "lease" => Ok(Workload::Lease),
            "lock" => Ok(Workload::Lock),
            other => Err(format!(
                "unknown workload {other:?} (register, watch, append, lease, lock)"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub workload: Workload,
    pub target: Target,
    /// The `pontoon` binary (ignored for etcd, which comes from PATH).
    pub binary: PathBuf,
    pub nodes: usize,
    pub nemesis: Vec<Fault>,
    /// How long each fault lasts, and the quiet time between faults.
    pub fault_interval: Duration,
    pub time: Duration,
    /// Operations per second over all clients.
    pub rate: u64,
    pub clients: usize,
    pub keys: usize,
    /// A request not answered within this is indeterminate.
    pub op_timeout: Duration,
    /// Serve reads with `serializable` (local, possibly stale): the harness must then
    /// find a violation under partitions.
    pub serializable_reads: bool,
    /// Watchers send `RequestProgress` now and then (else they rely on periodic
    /// progress notifications only; etcd before the fix of its issue 15220 answers
    /// requests unsafely).
    pub progress_requests: bool,
    pub seed: u64,
    pub check_budget: Duration,
    /// Where the history, verdict and timeline go.
    pub report_dir: PathBuf,
    /// Extra server flags.
    pub server_args: Vec<String>,
}

#[derive(Debug)]
pub struct Report {
    pub verdict: Verdict,
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
    pub faults: Vec<String>,
    pub check_time: Duration,
    pub recovered: bool,
    /// Findings that are not violations (expected caveats, statistics).
    pub notes: Vec<String>,
}

/// How long a set of keys is used before clients move to fresh ones.
const KEY_GENERATION: Duration = Duration::from_secs(5);

/// A monotonic clock shared by all clients of a run.
#[derive(Clone)]
pub struct Clock(Instant);

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Clock(Instant::now())
    }
    /// Nanoseconds since the run started.
    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Whether a failed request certainly had no effect.
pub(crate) fn is_definite_failure(e: &etcd_client::Error) -> bool {
    match e {
        // The connection could not be made: the request never left.
        etcd_client::Error::GRpcStatus(s)
            if s.code() == tonic::Code::Unavailable
                && (s.message().contains("tcp connect error")
                    || s.message().contains("Connection refused")) =>
        {
            true
        }
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::NotFound
                    | tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
            ) || s.message() == "etcdserver: no leader"
        }
        _ => false,
    }
}

fn parse_value(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

struct Shared {
    clock: Clock,
    history: Mutex<History>,
    next_value: AtomicU64,
    /// The last value written to each key (any outcome), for plausible CAS compares.
    last: Mutex<Vec<u64>>,
}

async fn run_client(
    shared: Arc<Shared>,
    cfg: RunConfig,
    endpoint: String,
    index: usize,
    until: Instant,
) {
    let mut rng = Rng::new(cfg.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut process = index as u64;
    let per_client = Duration::from_secs_f64(cfg.clients as f64 / cfg.rate.max(1) as f64);
    let mut client: Option<etcd_client::Client> = None;
    while Instant::now() < until {
        let started = Instant::now();
        if client.is_none() {
            client = cluster::connect(vec![endpoint.clone()], cfg.op_timeout)
                .await
                .ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let c = client.as_mut().expect("connected");
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
        let (status, ret, error) = match result {
            Ok(Ok(ret)) => (Status::Ok, Some(ret), None),
            Ok(Err(e)) if call == Call::Read || is_definite_failure(&e) => {
                (Status::Fail, None, Some(e.to_string()))
            }
            Ok(Err(e)) => (Status::Info, None, Some(e.to_string())),
            Err(_) if call == Call::Read => (Status::Fail, None, Some("timeout".into())),
            Err(_) => (Status::Info, None, Some("timeout".into())),
        };
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

/// Runs one test and writes its report directory.
pub async fn run(cfg: RunConfig) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&cfg.report_dir)?;
    eprintln!(
        "starting {} members of {:?} (seed {})",
        cfg.nodes, cfg.target, cfg.seed
    );
    let mut server_args = cfg.server_args.clone();
    if cfg.workload == Workload::Watch {
        // Periodic progress notifications too, not only requested ones.
        server_args.extend([
            "--experimental-watch-progress-notify-interval".to_string(),
            watch::PROGRESS_NOTIFY_INTERVAL.to_string(),
        ]);
    }
    let cluster = Cluster::start(cfg.target, cfg.nodes, &cfg.binary, &server_args).await?;
    let endpoints = cluster.endpoints();
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let shared = Arc::new(Shared {
        clock: Clock::new(),
        history: Mutex::new(History::default()),
        next_value: AtomicU64::new(1),
        last: Mutex::new(vec![0; cfg.keys]),
    });
    let until = Instant::now() + cfg.time;
    let faults = Arc::new(Mutex::new(nemesis::Log::default()));
    let nemesis = tokio::spawn(nemesis::run(
        cluster.clone(),
        cfg.nemesis.clone(),
        cfg.fault_interval,
        cfg.seed,
        until,
        faults.clone(),
    ));
    match cfg.workload {
        Workload::Watch => return run_watch(cfg, cluster, endpoints, until, nemesis, faults).await,
        Workload::Append => {
            return run_append(cfg, cluster, endpoints, until, nemesis, faults).await
        }
        Workload::Lease => return run_lease(cfg, cluster, endpoints, until, nemesis, faults).await,
        Workload::Lock => return run_lock(cfg, cluster, endpoints, until, nemesis, faults).await,
        Workload::Register => {}
    }
    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| {
            tokio::spawn(run_client(
                shared.clone(),
                cfg.clone(),
                endpoints[i % endpoints.len()].clone(),
                i,
                until,
            ))
        })
        .collect();
    let progress = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let h = shared.history.lock().expect("lock");
                eprintln!(
                    "{:>6.1}s: {} ok, {} failed, {} indeterminate",
                    started.elapsed().as_secs_f64(),
                    h.count(Status::Ok),
                    h.count(Status::Fail),
                    h.count(Status::Info)
                );
            }
        })
    };
    for c in clients {
        let _ = c.await;
    }
    let _ = nemesis.await;
    progress.abort();

    // Heal, then the cluster must serve again.
    let recovered = {
        let mut c = cluster.lock().await;
        c.heal()?;
        c.wait_healthy(Duration::from_secs(60)).await.is_ok()
    };
    let history = std::mem::take(&mut *shared.history.lock().expect("lock"));
    history.write_jsonl(&cfg.report_dir.join("history.jsonl"))?;
    eprintln!(
        "checking {} operations ({} ok, {} failed, {} indeterminate)",
        history.ops.len(),
        history.count(Status::Ok),
        history.count(Status::Fail),
        history.count(Status::Info)
    );
    let ops = history.for_checker();
    let started = Instant::now();
    let budget = cfg.check_budget;
    let verdict = tokio::task::spawn_blocking(move || checker::check(&ops, budget)).await?;
    let check_time = started.elapsed();
    let faults = faults.lock().expect("lock").lines.clone();
    let report = Report {
        verdict,
        ok: history.count(Status::Ok),
        failed: history.count(Status::Fail),
        indeterminate: history.count(Status::Info),
        faults,
        check_time,
        recovered,
        notes: Vec::new(),
    };
    write_report(&cfg, &report)?;
    Ok(report)
}

/// The watch workload: half the clients write, the other half watch.
async fn run_watch(
    cfg: RunConfig,
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    endpoints: Vec<String>,
    until: Instant,
    nemesis: tokio::task::JoinHandle<()>,
    faults: Arc<Mutex<nemesis::Log>>,
) -> anyhow::Result<Report> {
    let writers_n = (cfg.clients / 2).max(1);
    let watchers_n = (cfg.clients - writers_n).max(1);
    let out = Arc::new(Mutex::new(watch::WatchHistory::new(watchers_n)));
    let final_rev = Arc::new(Mutex::new(None));
    let give_up = until + Duration::from_secs(90);
    let per_op = Duration::from_secs_f64(writers_n as f64 / cfg.rate.max(1) as f64);
    let writers: Vec<_> = (0..writers_n)
        .map(|i| {
            tokio::spawn(watch::writer(
                endpoints[i % endpoints.len()].clone(),
                i,
                cfg.keys,
                cfg.seed,
                until,
                per_op,
                out.clone(),
            ))
        })
        .collect();
    let watchers: Vec<_> = (0..watchers_n)
        .map(|i| {
            tokio::spawn(watch::watcher(
                endpoints.clone(),
                i,
                final_rev.clone(),
                give_up,
                watch::WatcherOptions {
                    seed: cfg.seed,
                    lag: cfg.nemesis.contains(&Fault::Compact),
                    progress_requests: cfg.progress_requests,
                },
                out.clone(),
            ))
        })
        .collect();
    for w in writers {
        let _ = w.await;
    }
    let _ = nemesis.await;
    let recovered = {
        let mut c = cluster.lock().await;
        c.heal()?;
        c.wait_healthy(Duration::from_secs(60)).await.is_ok()
    };
    // The revision every watcher must reach.
    let mut c = etcd_client::Client::connect(endpoints.clone(), None).await?;
    let last = c
        .get(watch::PREFIX, None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    *final_rev.lock().expect("lock") = Some(last);
    for w in watchers {
        let _ = w.await;
    }
    let started = Instant::now();
    let mut h = std::mem::take(&mut *out.lock().expect("lock"));
    h.compactions = faults.lock().expect("lock").compactions.clone();
    h.write_jsonl(&cfg.report_dir.join("history.jsonl"))?;
    let problems = watch::check(&h, last);
    let events: usize = h.watchers.iter().map(Vec::len).sum();
    let summary = format!(
        "{} acknowledged writes ({} multi-key Txns), final revision {last}, {} watchers saw {events} events \
         ({} with prev_kv), {} progress notifications, {} reconnects, {} compacted gaps",
        h.acked.len(),
        h.acked.values().filter(|p| p.len() > 1).count(),
        h.watchers.len(),
        h.watchers.iter().flatten().filter(|e| e.prev.is_some()).count(),
        h.progress.iter().map(Vec::len).sum::<usize>(),
        h.reconnects,
        h.gaps.iter().map(Vec::len).sum::<usize>()
    );
    eprintln!("{summary}");
    let report = Report {
        verdict: if problems.is_empty() {
            Verdict::Valid
        } else {
            Verdict::Violations(problems)
        },
        ok: h.acked.len(),
        failed: 0,
        indeterminate: 0,
        faults: faults.lock().expect("lock").lines.clone(),
        check_time: started.elapsed(),
        recovered,
        notes: vec![summary],
    };
    write_report(&cfg, &report)?;
    Ok(report)
}

/// Heals every fault; true if every member then serves again.
async fn heal_and_wait(cluster: &tokio::sync::Mutex<Cluster>) -> anyhow::Result<bool> {
    let mut c = cluster.lock().await;
    c.heal()?;
    Ok(c.wait_healthy(Duration::from_secs(60)).await.is_ok())
}

/// Prints counts every 5 s while a workload runs.
fn progress(
    count: impl Fn() -> (usize, usize, usize) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (ok, failed, info) = count();
            eprintln!(
                "{:>6.1}s: {ok} ok, {failed} failed, {info} indeterminate",
                started.elapsed().as_secs_f64()
            );
        }
    })
}

fn count_by<T>(items: &[T], status: impl Fn(&T) -> Status) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    for i in items {
        match status(i) {
            Status::Ok => c.0 += 1,
            Status::Fail => c.1 += 1,
            Status::Info => c.2 += 1,
        }
    }
    c
}

/// The list-append workload: transactions checked Elle-style.
async fn run_append(
    cfg: RunConfig,
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    endpoints: Vec<String>,
    until: Instant,
    nemesis: tokio::task::JoinHandle<()>,
    faults: Arc<Mutex<nemesis::Log>>,
) -> anyhow::Result<Report> {
    let shared = Arc::new(append::Shared::new(Clock::new()));
    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| {
            tokio::spawn(append::client(
                shared.clone(),
                cfg.clone(),
                endpoints[i % endpoints.len()].clone(),
                i,
                until,
            ))
        })
        .collect();
    let progress = {
        let shared = shared.clone();
        progress(move || count_by(&shared.history.lock().expect("lock"), |t| t.status))
    };
    for c in clients {
        let _ = c.await;
    }
    let _ = nemesis.await;
    progress.abort();
    let recovered = heal_and_wait(&cluster).await?;
    let history = std::mem::take(&mut *shared.history.lock().expect("lock"));
    append::write_history(&history, &cfg.report_dir.join("history.jsonl"))?;
    let (ok, failed, indeterminate) = count_by(&history, |t| t.status);
    eprintln!(
        "checking {} transactions ({ok} ok, {failed} failed, {indeterminate} indeterminate)",
        history.len()
    );
    let started = Instant::now();
    let anomalies = tokio::task::spawn_blocking(move || elle::check(&history)).await?;
    let check_time = started.elapsed();
    let notes = vec![format!("anomaly kinds: {:?}", elle::kinds(&anomalies))];
    let report = Report {
        verdict: if anomalies.is_empty() {
            Verdict::Valid
        } else {
            Verdict::Violations(anomalies.iter().map(ToString::to_string).collect())
        },
        ok,
        failed,
        indeterminate,
        faults: faults.lock().expect("lock").lines.clone(),
        check_time,
        recovered,
        notes,
    };
    write_report(&cfg, &report)?;
    Ok(report)
}

/// The lease workload: keys on leases, checked against revokes and TTLs.
async fn run_lease(
    cfg: RunConfig,
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    endpoints: Vec<String>,
    until: Instant,
    nemesis: tokio::task::JoinHandle<()>,
    faults: Arc<Mutex<nemesis::Log>>,
) -> anyhow::Result<Report> {
    let rec = Arc::new(lease::Recorder::new(Clock::new(), cfg.seed));
    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| {
            tokio::spawn(lease::client(
                rec.clone(),
                cfg.clone(),
                endpoints[i % endpoints.len()].clone(),
                i,
                until,
            ))
        })
        .collect();
    let progress = {
        let rec = rec.clone();
        progress(move || count_by(&rec.ops.lock().expect("lock"), |o| o.status))
    };
    for c in clients {
        let _ = c.await;
    }
    let _ = nemesis.await;
    progress.abort();
    let recovered = heal_and_wait(&cluster).await?;
    let left = lease::drain(endpoints).await;
    rec.write_history(&cfg.report_dir.join("history.jsonl"))?;
    let ops = rec.ops.lock().expect("lock").clone();
    let (ok, failed, indeterminate) = count_by(&ops, |o| o.status);
    let started = Instant::now();
    let (mut violations, notes) = lease::check(&ops);
    if !left.is_empty() {
        violations.push(format!(
            "{} keys were still there {:?} after the run ended and the faults healed (leases {:x?})",
            left.len(),
            lease::DRAIN,
            &left[..left.len().min(10)]
        ));
    }
    let report = Report {
        verdict: if violations.is_empty() {
            Verdict::Valid
        } else {
            Verdict::Violations(violations)
        },
        ok,
        failed,
        indeterminate,
        faults: faults.lock().expect("lock").lines.clone(),
        check_time: started.elapsed(),
        recovered,
        notes,
    };
    write_report(&cfg, &report)?;
    Ok(report)
}

/// The lock workload: holds through the Lock API, checked for overlaps.
async fn run_lock(
    cfg: RunConfig,
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    endpoints: Vec<String>,
    until: Instant,
    nemesis: tokio::task::JoinHandle<()>,
    faults: Arc<Mutex<nemesis::Log>>,
) -> anyhow::Result<Report> {
    let shared = Arc::new(lock::Shared {
        leases: lease::Recorder::new(Clock::new(), cfg.seed),
        locks: Mutex::new(Vec::new()),
    });
    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| {
            tokio::spawn(lock::client(
                shared.clone(),
                cfg.clone(),
                endpoints[i % endpoints.len()].clone(),
                i,
                until,
            ))
        })
        .collect();
    let progress = {
        let shared = shared.clone();
        progress(move || count_by(&shared.locks.lock().expect("lock"), |o| o.status))
    };
    for c in clients {
        let _ = c.await;
    }
    let _ = nemesis.await;
    progress.abort();
    let recovered = heal_and_wait(&cluster).await?;
    shared
        .leases
        .write_history(&cfg.report_dir.join("lease-history.jsonl"))?;
    let locks = shared.locks.lock().expect("lock").clone();
    {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(cfg.report_dir.join("history.jsonl"))?);
        for o in &locks {
            serde_json::to_writer(&mut f, o)?;
            std::io::Write::write_all(&mut f, b"\n")?;
        }
    }
    let leases = shared.leases.ops.lock().expect("lock").clone();
    let (ok, failed, indeterminate) = count_by(&locks, |o| o.status);
    let started = Instant::now();
    let (violations, notes) = lock::check(&locks, &leases);
    let report = Report {
        verdict: if violations.is_empty() {
            Verdict::Valid
        } else {
            Verdict::Violations(violations)
        },
        ok,
        failed,
        indeterminate,
        faults: faults.lock().expect("lock").lines.clone(),
        check_time: started.elapsed(),
        recovered,
        notes,
    };
    write_report(&cfg, &report)?;
    Ok(report)
}

fn write_report(cfg: &RunConfig, r: &Report) -> anyhow::Result<()> {
    let verdict = match &r.verdict {
        Verdict::Valid => "valid".to_string(),
        Verdict::Invalid { key, ops } => {
            std::fs::write(cfg.report_dir.join("timeline.svg"), timeline::svg(key, ops))?;
            let mut text =
                format!("INVALID: key {key} is not linearizable; minimal sub-history:\n");
            for op in ops {
                text.push_str(&format!("  {}\n", timeline::describe(op)));
            }
            text
        }
        Verdict::Unknown { reason } => format!("unknown: {reason}"),
        Verdict::Violations(problems) => {
            let mut text = format!("INVALID: {} violations:\n", problems.len());
            for p in problems.iter().take(50) {
                text.push_str(&format!("  {p}\n"));
            }
            text
        }
    };
    let summary = format!(
        "workload: {:?}\ntarget: {:?}\nnodes: {}\nnemesis: {:?}\nseed: {}\nops: {} ok, {} failed, {} indeterminate\n\
         recovered after heal: {}\nchecked in: {:.2?}\nverdict: {verdict}\nnotes:\n{}\nfaults:\n{}\n",
        cfg.workload,
        cfg.target,
        cfg.nodes,
        cfg.nemesis,
        cfg.seed,
        r.ok,
        r.failed,
        r.indeterminate,
        r.recovered,
        r.check_time,
        r.notes.join("\n"),
        r.faults.join("\n")
    );
    std::fs::write(cfg.report_dir.join("results.txt"), &summary)?;
    eprint!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connections_are_definite_failures() {
        let refused =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("tcp connect error"));
        assert!(is_definite_failure(&refused));
        let lost = etcd_client::Error::GRpcStatus(tonic::Status::unknown("transport error"));
        assert!(!is_definite_failure(&lost));
        let changed = etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "etcdserver: leader changed",
        ));
        assert!(!is_definite_failure(&changed));
    }
}
