//! Prometheus metrics with etcd's names, so etcd's dashboards and alerts work.
//!
//! One process is one member, so the registry is a process-wide static ([`METRICS`]);
//! hot paths record with a relaxed atomic add. Gauges that already live elsewhere
//! (raft status, database size) are read when `/metrics` is rendered.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

/// A histogram with fixed buckets (upper bounds in seconds).
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// etcd's buckets: 1 ms doubling 14 times (fsync and backend commit).
const DISK_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];
/// etcd's buckets: 0.1 ms doubling 16 times (peer round trip).
const RTT_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192, 1.6384, 3.2768,
];

/// Where a proposal has got to, for `pontoon_server_proposal_duration_seconds`: each
/// is measured from the moment the request was proposed, so comparing them shows
/// which step a slow request waited in.
#[derive(Clone, Copy)]
pub enum Stage {
    /// The raft thread took it from its queue and handed it to raft.
    Queued,
    /// The leader's WAL fsync covering it returned (leader only).
    Persisted,
    /// The apply thread applied it and woke the caller.
    Applied,
    /// The caller's task ran again with the answer.
    Answered,
}

impl Stage {
    const ALL: [(Stage, &'static str); 4] = [
        (Stage::Queued, "queued"),
        (Stage::Persisted, "persisted"),
        (Stage::Applied, "applied"),
        (Stage::Answered, "answered"),
    ];
}

pub struct Metrics {
    pub wal_fsync: Histogram,
    pub backend_commit: Histogram,
    /// Peer round trip, by peer member ID (hex).
    pub peer_rtt: Mutex<BTreeMap<String, Histogram>>,
    /// gRPC calls by path (`/etcdserverpb.KV/Range`). After a path's first call,
    /// counting takes a shared lock and two atomic adds, no allocation.
    grpc: RwLock<HashMap<String, GrpcCounters>>,
    /// By [`Stage`].
    proposal_stages: [Histogram; 4],
}

/// Calls of one gRPC method: started, and handled by status code (0..=16).
#[derive(Default)]
struct GrpcCounters {
    started: AtomicU64,
    handled: [AtomicU64; 17],
}

pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(|| Metrics {
    wal_fsync: Histogram::new(DISK_BUCKETS),
    backend_commit: Histogram::new(DISK_BUCKETS),
    peer_rtt: Mutex::new(BTreeMap::new()),
    grpc: RwLock::new(HashMap::new()),
    proposal_stages: std::array::from_fn(|_| Histogram::new(RTT_BUCKETS)),
});

impl Metrics {
    pub fn observe_peer_rtt(&self, peer: u64, d: Duration) {
        self.peer_rtt
            .lock()
            .expect("metrics lock")
            .entry(format!("{peer:x}"))
            .or_insert_with(|| Histogram::new(RTT_BUCKETS))
            .observe(d);
    }

    pub fn proposal_stage(&self, stage: Stage, since_proposed: Duration) {
        self.proposal_stages[stage as usize].observe(since_proposed);
    }

    fn with_grpc(&self, path: &str, f: impl Fn(&GrpcCounters)) {
        if let Some(c) = self.grpc.read().expect("metrics lock").get(path) {
            return f(c);
        }
        let mut map = self.grpc.write().expect("metrics lock");
        f(map.entry(path.to_string()).or_default());
    }

    pub fn grpc_started(&self, path: &str) {
        self.with_grpc(path, |c| {
            c.started.fetch_add(1, Ordering::Relaxed);
        });
    }

    /// `code` is the gRPC status code (0 = OK).
    pub fn grpc_handled(&self, path: &str, code: usize) {
        self.with_grpc(path, |c| {
            c.handled[code.min(16)].fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Renders the histograms and gRPC counters; `gauges` are (name, help, type,
    /// value) lines computed by the caller.
    pub fn render(&self, gauges: &[(&str, &str, &str, f64)]) -> String {
        let mut out = String::new();
        for (name, help, kind, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let hist = |out: &mut String, name: &str, help: &str, h: &Histogram| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            h.render(out, name, "");
        };
        hist(
            &mut out,
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL.",
            &self.wal_fsync,
        );
        hist(
            &mut out,
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend.",
            &self.backend_commit,
        );
        let name = "etcd_network_peer_round_trip_time_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Round-Trip-Time histogram between peers\n# TYPE {name} histogram"
        );
        for (peer, h) in self.peer_rtt.lock().expect("metrics lock").iter() {
            h.render(&mut out, name, &format!("To=\"{peer}\""));
        }
        let name = "pontoon_server_proposal_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from proposing a write to the end of each stage: queued (taken by raft), persisted (leader's WAL fsync), applied, answered (caller resumed).\n# TYPE {name} histogram"
        );
        for (stage, label) in Stage::ALL {
            self.proposal_stages[stage as usize].render(
                &mut out,
                name,
                &format!("stage=\"{label}\""),
            );
        }
        let grpc = self.grpc.read().expect("metrics lock");
        let mut paths: Vec<&String> = grpc.keys().collect();
        paths.sort();
        let labels = |path: &str| {
            let p = path.trim_start_matches('/');
            let (service, method) = p.split_once('/').unwrap_or((p, ""));
            format!(
                "grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{}\"",
                grpc_type(method)
            )
        };
        let name = "grpc_server_started_total";
        let _ = writeln!(
            out,
            "# HELP {name} Total number of RPCs started on the server.\n# TYPE {name} counter"
        );
        for path in &paths {
            let n = grpc[*path].started.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{{}}} {n}", labels(path));
        }
        let name = "grpc_server_handled_total";
        let _ = writeln!(
            out,
            "# HELP {name} Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE {name} counter"
        );
        for path in &paths {
            for (code, n) in grpc[*path].handled.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{grpc_code=\"{}\",{}}} {n}",
                        CODE_NAMES[code],
                        labels(path)
                    );
                }
            }
        }
        out
    }
}

/// gRPC status code names as grpc-go's Prometheus interceptor writes them.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The streaming kind of an etcd RPC, as grpc-go labels it.
fn grpc_type(method: &str) -> &'static str {
    match method {
        "Watch" | "LeaseKeepAlive" => "bidi_stream",
        "Snapshot" | "Observe" => "server_stream",
        _ => "unary",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let h = Histogram::new(DISK_BUCKETS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.004\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"8.192\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
