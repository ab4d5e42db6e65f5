//! `pontoon-jepsen`: run a fault-injection test against a local cluster and check it.
//!
//! Exit status: 0 valid, 1 invalid, 2 unknown or harness error.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use pontoon_jepsen::checker::Verdict;
use pontoon_jepsen::cluster::Target;
use pontoon_jepsen::{run, Fault, RunConfig, Workload};

#[derive(Parser)]
#[command(
    name = "pontoon-jepsen",
    about = "Fault injection + linearizability checking for etcd-API clusters"
)]
struct Args {
    /// pontoon or etcd (etcd from PATH, started with the same flags).
    #[arg(long, default_value = "pontoon")]
    target: Target,
    /// The pontoon binary [default: target/debug/pontoon next to this binary].
    #[arg(long)]
    binary: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// register, append, watch, lease or lock.
    #[arg(long, default_value = "register")]
    workload: Workload,
    /// Comma-separated faults: kill, kill-leader, kill-majority, kill-all, pause,
    /// partition, partition-majority, bridge, membership, compact (none: no faults).
    #[arg(long, default_value = "kill")]
    nemesis: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    time: u64,
    /// Operations per second over all clients.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    clients: usize,
    #[arg(long, default_value_t = 8)]
    keys: usize,
    /// Seconds each fault lasts (and between faults).
    #[arg(long, default_value_t = 3)]
    fault_interval: u64,
    /// Per-request timeout in milliseconds; a timed-out write is indeterminate.
    #[arg(long, default_value_t = 3000)]
    op_timeout_ms: u64,
    /// Read with `serializable` (stale reads possible: expected to fail under partitions).
    #[arg(long)]
    serializable_reads: bool,
    /// Watch workload: rely on periodic progress notifications only, never send
    /// RequestProgress (etcd 3.4.23 answers it before pending events: etcd issue 15220).
    #[arg(long)]
    no_progress_requests: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds the checker may spend before answering unknown.
    #[arg(long, default_value_t = 300)]
    check_budget: u64,
    /// Where to write history.jsonl, results.txt and timeline.svg.
    #[arg(long, default_value = "jepsen-report")]
    report: PathBuf,
    /// An extra flag for every member, repeatable: `--server-arg=--snapshot-count
    /// --server-arg=500` makes raft log truncation happen during the run.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("pontoon")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("pontoon"))
}

fn main() {
    let a = Args::parse();
    let nemesis: Result<Vec<Fault>, String> = a
        .nemesis
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "none")
        .map(str::parse)
        .collect();
    let nemesis = match nemesis {
        Ok(n) => n,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let cfg = RunConfig {
        workload: a.workload,
        target: a.target,
        binary: a.binary.unwrap_or_else(default_binary),
        nodes: a.nodes,
        nemesis,
        fault_interval: Duration::from_secs(a.fault_interval),
        time: Duration::from_secs(a.time),
        rate: a.rate,
        clients: a.clients,
        keys: a.keys,
        op_timeout: Duration::from_millis(a.op_timeout_ms),
        serializable_reads: a.serializable_reads,
        progress_requests: !a.no_progress_requests,
        seed: a.seed,
        check_budget: Duration::from_secs(a.check_budget),
        report_dir: a.report,
        server_args: a.server_args,
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let code = match rt.block_on(run(cfg)) {
        Ok(r) => match r.verdict {
            Verdict::Valid if r.recovered => 0,
            Verdict::Valid => {
                eprintln!("history valid, but the cluster did not serve again after healing");
                2
            }
            Verdict::Invalid { .. } | Verdict::Violations(_) => 1,
            Verdict::Unknown { .. } => 2,
        },
        Err(e) => {
            eprintln!("harness error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}
