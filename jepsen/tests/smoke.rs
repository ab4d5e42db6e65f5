//! The short runs of the default test suite: Pontoon under kill and partition faults
//! is linearizable (and strict serializable for list-append transactions), real etcd
//! 3.4 under the same faults is too, stale (serializable) reads under partitions are
//! caught, watchers lose nothing (and get atomic revisions, right prev_kv and true
//! progress notifications), leases and locks keep their promises. About 1.5
//! minutes with two test threads. Longer runs: see jepsen/README.md.

use std::path::PathBuf;
use std::time::Duration;

use pontoon_jepsen::checker::Verdict;
use pontoon_jepsen::cluster::Target;
use pontoon_jepsen::{run, Fault, RunConfig, Workload};

fn pontoon_binary() -> PathBuf {
    // target/<profile>/deps/smoke-* -> target/<profile>/pontoon
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("pontoon")
}

fn have_etcd() -> bool {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn config(target: Target, nemesis: Vec<Fault>, secs: u64, name: &str) -> RunConfig {
    RunConfig {
        workload: Workload::Register,
        target,
        binary: pontoon_binary(),
        nodes: 3,
        nemesis,
        fault_interval: Duration::from_secs(3),
        time: Duration::from_secs(secs),
        rate: 300,
        clients: 10,
        keys: 6,
        op_timeout: Duration::from_secs(3),
        serializable_reads: false,
        progress_requests: true,
        seed: 7,
        check_budget: Duration::from_secs(60),
        report_dir: std::env::temp_dir()
            .join(format!("pontoon-jepsen-{name}-{}", std::process::id())),
        server_args: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pontoon_is_linearizable_under_kill_pause_and_partition() {
    let cfg = config(
        Target::Pontoon,
        vec![Fault::Kill, Fault::Pause, Fault::Partition],
        21,
        "pontoon",
    );
    let r = run(cfg).await.unwrap();
    assert_eq!(r.verdict, Verdict::Valid, "{r:?}");
    assert!(r.recovered, "the cluster serves again after healing");
    assert!(r.ok > 1000, "enough load: {r:?}");
    assert!(r.faults.len() >= 6, "faults were injected: {:?}", r.faults);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_is_linearizable_under_kill_and_partition() {
    if !have_etcd() {
        eprintln!("etcd not installed; skipping");
        return;
    }
    let cfg = config(
        Target::Etcd,
        vec![Fault::Kill, Fault::Partition],
        15,
        "etcd",
    );
    let r = run(cfg).await.unwrap();
    assert_eq!(r.verdict, Verdict::Valid, "{r:?}");
    assert!(r.recovered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_serializable_reads_under_partition_are_caught() {
    let mut cfg = config(Target::Pontoon, vec![Fault::Partition], 26, "stale");
    cfg.serializable_reads = true;
    cfg.fault_interval = Duration::from_secs(4);
    cfg.keys = 3;
    cfg.rate = 400;
    let r = run(cfg).await.unwrap();
    assert!(
        matches!(r.verdict, Verdict::Invalid { .. }),
        "serializable reads from an isolated member must be caught: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pontoon_watchers_lose_nothing_under_kill_and_partition() {
    let mut cfg = config(
        Target::Pontoon,
        vec![Fault::Kill, Fault::Partition],
        15,
        "watch",
    );
    cfg.workload = Workload::Watch;
    cfg.clients = 8;
    cfg.keys = 20;
    let r = run(cfg).await.unwrap();
    assert_eq!(r.verdict, Verdict::Valid, "{r:?}");
    assert!(r.ok > 500, "enough writes: {r:?}");
    // The atomic, prev_kv, delete and bookmarkable checks had something to check.
    let summary = &r.notes[0];
    for none in [
        "(0 multi-key",
        ", 0 deletes,",
        ", 0 deletes in Txns",
        ", 0 no-op deletes",
        "(0 with prev_kv",
        ", 0 deletes with prev_kv",
        " 0 progress notifications",
    ] {
        assert!(!summary.contains(none), "{summary}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pontoon_list_append_is_strict_serializable_under_kill_and_partition() {
    let mut cfg = config(
        Target::Pontoon,
        vec![Fault::Kill, Fault::Partition],
        18,
        "append",
    );
    cfg.workload = Workload::Append;
    cfg.rate = 200;
    let r = run(cfg).await.unwrap();
    assert_eq!(r.verdict, Verdict::Valid, "{r:?}");
    assert!(r.recovered);
    assert!(r.ok > 500, "enough committed transactions: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pontoon_leases_hold_until_revoked_or_expired_under_kill_and_pause() {
    let mut cfg = config(
        Target::Pontoon,
        vec![Fault::Kill, Fault::Pause],
        15,
        "lease",
    );
    cfg.workload = Workload::Lease;
    cfg.clients = 6;
    let r = run(cfg).await.unwrap();
    assert_eq!(r.verdict, Verdict::Valid, "{r:?}");
    assert!(r.recovered);
    assert!(r.ok > 300, "enough lease operations and reads: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pontoon_lock_holds_never_overlap_unexcused_under_pause() {
    let mut cfg = config(Target::Pontoon, vec![Fault::Pause], 15, "lock");
    cfg.workload = Workload::Lock;
    cfg.clients = 5;
    let r = run(cfg).await.unwrap();
    // Overlaps a lease expiry explains are notes; an unexcused one is a violation.
    assert_eq!(r.verdict, Verdict::Valid, "{r:?}");
    assert!(r.recovered);
    assert!(r.ok > 30, "enough lock operations: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_list_append_is_strict_serializable_under_kill_and_partition() {
    if !have_etcd() {
        eprintln!("etcd not installed; skipping");
        return;
    }
    let mut cfg = config(
        Target::Etcd,
        vec![Fault::Kill, Fault::Partition],
        12,
        "etcd-append",
    );
    cfg.workload = Workload::Append;
    cfg.rate = 200;
    let r = run(cfg).await.unwrap();
    assert_eq!(r.verdict, Verdict::Valid, "{r:?}");
    assert!(r.recovered);
}
