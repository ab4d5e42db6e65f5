//! Pontoon's fault-injection harness, in the spirit of Jepsen and etcd's robustness
//! tests: start a cluster of real processes (Pontoon, or etcd with the same flags),
//! run concurrent clients over the etcd gRPC API while a seeded nemesis injects
//! faults, record every operation, heal, and check the history.
//!
//! - [`cluster`]: local processes, peer proxies, kill / pause / partition;
//! - [`history`]: operations as clients saw them (ok / fail / indeterminate);
//! - [`register`], [`checker`]: reads, writes and compare-and-set over rotating keys,
//!   and the linearizability checker of per-key registers (Wing-Gong-Lowe);
//! - [`append`], [`elle`]: list-append transactions and their dependency-cycle
//!   checker (G0, G1a, G1b, G1c, G2, and their real-time variants);
//! - [`lease`], [`lock`]: lease expiry and revocation, and v3lock mutual exclusion
//!   (separating the overlaps any lease-based lock allows from real violations);
//! - [`timeline`]: an SVG picture of a failing sub-history.
//!
//! Workloads implemented: `register` (reads, writes and compare-and-set over many
//! keys, checked for linearizability), `append` (multi-key transactions, checked for
//! strict serializability), `watch` (watchers resuming across faults, checked for
//! etcd's six watch guarantees and prev_kv, see [`watch`]), `lease` and `lock`.
//! Nemeses: `kill`, `pause`, `partition`, `membership`, `compact` (see [`nemesis`]).
//!
//! Every workload runs through one runner ([`run`]): clients until `--time`, heal,
//! wait for recovery, check, write the report; every request's outcome is
//! classified by [`history::outcome`].

pub mod append;
pub mod checker;
pub mod cluster;
pub mod elle;
pub mod history;
pub mod lease;
pub mod lock;
pub mod nemesis;
pub mod register;
pub mod rng;
pub mod timeline;
pub mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checker::Verdict;
use cluster::{Cluster, Target};
use history::Status;

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
    let run = Run {
        cfg,
        cluster,
        endpoints,
        until,
        nemesis: Some(nemesis),
        faults,
    };
    match run.cfg.workload {
        Workload::Register => run_register(run).await,
        Workload::Watch => run_watch(run).await,
        Workload::Append => run_append(run).await,
        Workload::Lease => run_lease(run).await,
        Workload::Lock => run_lock(run).await,
    }
}

/// One run in progress: the cluster, its faults, and when the load ends.
struct Run {
    cfg: RunConfig,
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    endpoints: Vec<String>,
    until: Instant,
    nemesis: Option<tokio::task::JoinHandle<()>>,
    faults: Arc<Mutex<nemesis::Log>>,
}

/// What a workload's checker concluded.
struct Checked {
    verdict: Verdict,
    /// Operations ok, failed and indeterminate.
    counts: (usize, usize, usize),
    check_time: Duration,
    notes: Vec<String>,
}

impl Run {
    /// The common shape of every workload's run: `n` clients, `client(index,
    /// endpoint)` with the endpoints dealt round-robin, until they end (at `until`),
    /// printing `count()` (ok, failed, indeterminate) every 5 s; then the nemesis
    /// ends, every fault is healed and every member must serve again. Returns
    /// whether it did.
    async fn load<F, Fut>(
        &mut self,
        n: usize,
        mut client: F,
        count: impl Fn() -> (usize, usize, usize) + Send + 'static,
    ) -> anyhow::Result<bool>
    where
        F: FnMut(usize, String) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let clients: Vec<_> = (0..n)
            .map(|i| tokio::spawn(client(i, self.endpoints[i % self.endpoints.len()].clone())))
            .collect();
        let progress = progress(count);
        for c in clients {
            let _ = c.await;
        }
        if let Some(nemesis) = self.nemesis.take() {
            let _ = nemesis.await;
        }
        progress.abort();
        let mut c = self.cluster.lock().await;
        c.heal()?;
        Ok(c.wait_healthy(Duration::from_secs(60)).await.is_ok())
    }

    /// Writes the report of a checked run.
    fn finish(&self, recovered: bool, checked: Checked) -> anyhow::Result<Report> {
        let (ok, failed, indeterminate) = checked.counts;
        let report = Report {
            verdict: checked.verdict,
            ok,
            failed,
            indeterminate,
            faults: self.faults.lock().expect("lock").lines.clone(),
            check_time: checked.check_time,
            recovered,
            notes: checked.notes,
        };
        write_report(&self.cfg, &report)?;
        Ok(report)
    }
}

/// Valid if nothing was found.
fn verdict(violations: Vec<String>) -> Verdict {
    if violations.is_empty() {
        Verdict::Valid
    } else {
        Verdict::Violations(violations)
    }
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

/// The register workload: checked for linearizability.
async fn run_register(mut run: Run) -> anyhow::Result<Report> {
    let shared = Arc::new(register::Shared::new(Clock::new(), run.cfg.keys));
    let (cfg, until) = (run.cfg.clone(), run.until);
    let recovered = run
        .load(
            cfg.clients,
            |i, endpoint| register::client(shared.clone(), cfg.clone(), endpoint, i, until),
            {
                let shared = shared.clone();
                move || {
                    let h = shared.history.lock().expect("lock");
                    (
                        h.count(Status::Ok),
                        h.count(Status::Fail),
                        h.count(Status::Info),
                    )
                }
            },
        )
        .await?;
    let history = std::mem::take(&mut *shared.history.lock().expect("lock"));
    history.write_jsonl(&cfg.report_dir.join("history.jsonl"))?;
    let counts = (
        history.count(Status::Ok),
        history.count(Status::Fail),
        history.count(Status::Info),
    );
    eprintln!(
        "checking {} operations ({} ok, {} failed, {} indeterminate)",
        history.ops.len(),
        counts.0,
        counts.1,
        counts.2
    );
    let ops = history.for_checker();
    let started = Instant::now();
    let budget = cfg.check_budget;
    let verdict = tokio::task::spawn_blocking(move || checker::check(&ops, budget)).await?;
    run.finish(
        recovered,
        Checked {
            verdict,
            counts,
            check_time: started.elapsed(),
            notes: Vec::new(),
        },
    )
}

/// The watch workload: half the clients write, the other half watch.
async fn run_watch(mut run: Run) -> anyhow::Result<Report> {
    let cfg = run.cfg.clone();
    let writers_n = (cfg.clients / 2).max(1);
    let watchers_n = (cfg.clients - writers_n).max(1);
    let out = Arc::new(Mutex::new(watch::WatchHistory::new(watchers_n)));
    let final_rev = Arc::new(Mutex::new(None));
    let give_up = run.until + Duration::from_secs(90);
    let per_op = Duration::from_secs_f64(writers_n as f64 / cfg.rate.max(1) as f64);
    let watchers: Vec<_> = (0..watchers_n)
        .map(|i| {
            tokio::spawn(watch::watcher(
                run.endpoints.clone(),
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
    let until = run.until;
    let recovered = run
        .load(
            writers_n,
            |i, endpoint| {
                watch::writer(endpoint, i, cfg.keys, cfg.seed, until, per_op, out.clone())
            },
            {
                let out = out.clone();
                move || (out.lock().expect("lock").acked.len(), 0, 0)
            },
        )
        .await?;
    // The revision every watcher must reach.
    let mut c = etcd_client::Client::connect(run.endpoints.clone(), None).await?;
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
    h.compactions = run.faults.lock().expect("lock").compactions.clone();
    h.write_jsonl(&cfg.report_dir.join("history.jsonl"))?;
    let problems = watch::check(&h, last);
    let events: usize = h.watchers.iter().map(Vec::len).sum();
    let summary = format!(
        "{} acknowledged writes ({} multi-key Txns, {} deletes, {} deletes in Txns, {} no-op deletes), \
         final revision {last}, {} watchers saw {events} events ({} with prev_kv, {} deletes, \
         {} deletes with prev_kv), {} progress notifications, {} reconnects, {} compacted gaps",
        h.acked.len(),
        h.acked.values().filter(|p| p.len() > 1).count(),
        h.acked
            .values()
            .flatten()
            .filter(|(_, c)| *c == watch::Change::Delete)
            .count(),
        h.acked
            .values()
            .filter(|p| p.len() > 1)
            .flatten()
            .filter(|(_, c)| *c == watch::Change::Delete)
            .count(),
        h.noop_deletes.len(),
        h.watchers.len(),
        h.watchers.iter().flatten().filter(|e| e.prev.is_some()).count(),
        h.watchers.iter().flatten().filter(|e| e.delete).count(),
        h.watchers
            .iter()
            .flatten()
            .filter(|e| e.delete && e.prev.is_some())
            .count(),
        h.progress.iter().map(Vec::len).sum::<usize>(),
        h.reconnects,
        h.gaps.iter().map(Vec::len).sum::<usize>()
    );
    eprintln!("{summary}");
    run.finish(
        recovered,
        Checked {
            verdict: verdict(problems),
            counts: (h.acked.len(), 0, 0),
            check_time: started.elapsed(),
            notes: vec![summary],
        },
    )
}

/// The list-append workload: transactions checked Elle-style.
async fn run_append(mut run: Run) -> anyhow::Result<Report> {
    let shared = Arc::new(append::Shared::new(Clock::new()));
    let (cfg, until) = (run.cfg.clone(), run.until);
    let recovered = run
        .load(
            cfg.clients,
            |i, endpoint| append::client(shared.clone(), cfg.clone(), endpoint, i, until),
            {
                let shared = shared.clone();
                move || count_by(&shared.history.lock().expect("lock"), |t| t.status)
            },
        )
        .await?;
    let history = std::mem::take(&mut *shared.history.lock().expect("lock"));
    append::write_history(&history, &cfg.report_dir.join("history.jsonl"))?;
    let counts = count_by(&history, |t| t.status);
    eprintln!(
        "checking {} transactions ({} ok, {} failed, {} indeterminate)",
        history.len(),
        counts.0,
        counts.1,
        counts.2
    );
    let started = Instant::now();
    let anomalies = tokio::task::spawn_blocking(move || elle::check(&history)).await?;
    let check_time = started.elapsed();
    let notes = vec![format!("anomaly kinds: {:?}", elle::kinds(&anomalies))];
    run.finish(
        recovered,
        Checked {
            verdict: verdict(anomalies.iter().map(ToString::to_string).collect()),
            counts,
            check_time,
            notes,
        },
    )
}

/// The lease workload: keys on leases, checked against revokes and TTLs.
async fn run_lease(mut run: Run) -> anyhow::Result<Report> {
    let rec = Arc::new(lease::Recorder::new(Clock::new(), run.cfg.seed));
    let (cfg, until) = (run.cfg.clone(), run.until);
    let recovered = run
        .load(
            cfg.clients,
            |i, endpoint| lease::client(rec.clone(), cfg.clone(), endpoint, i, until),
            {
                let rec = rec.clone();
                move || count_by(&rec.ops.lock().expect("lock"), |o| o.status)
            },
        )
        .await?;
    let left = lease::drain(run.endpoints.clone()).await;
    rec.write_history(&cfg.report_dir.join("history.jsonl"))?;
    let ops = rec.ops.lock().expect("lock").clone();
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
    run.finish(
        recovered,
        Checked {
            verdict: verdict(violations),
            counts: count_by(&ops, |o| o.status),
            check_time: started.elapsed(),
            notes,
        },
    )
}

/// The lock workload: holds through the Lock API, checked for overlaps.
async fn run_lock(mut run: Run) -> anyhow::Result<Report> {
    let shared = Arc::new(lock::Shared {
        leases: lease::Recorder::new(Clock::new(), run.cfg.seed),
        locks: Mutex::new(Vec::new()),
    });
    let (cfg, until) = (run.cfg.clone(), run.until);
    let recovered = run
        .load(
            cfg.clients,
            |i, endpoint| lock::client(shared.clone(), cfg.clone(), endpoint, i, until),
            {
                let shared = shared.clone();
                move || count_by(&shared.locks.lock().expect("lock"), |o| o.status)
            },
        )
        .await?;
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
    let started = Instant::now();
    let (violations, notes) = lock::check(&locks, &leases);
    run.finish(
        recovered,
        Checked {
            verdict: verdict(violations),
            counts: count_by(&locks, |o| o.status),
            check_time: started.elapsed(),
            notes,
        },
    )
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
