//! Maintenance on a single member: the backend quota and the NOSPACE alarm, the HTTP
//! endpoints (/health, /version, /metrics) and Status.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{free_port, grpc_status, Member, Target};

/// A plain HTTP/1.1 GET on the client port: (status code, body).
fn http_get(m: &Member, path: &str) -> (u16, String) {
    http_get_port(m.client_port, path)
}

fn http_get_port(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exceeding_the_quota_raises_nospace_until_disarmed() {
    let m = Member::start_with(Target::Pontoon, &["--quota-backend-bytes", "3000000"]);
    let mut c = m.client().await;
    let value = vec![b'x'; 100 * 1024];
    let mut refused = None;
    for i in 0..200 {
        match c.put(format!("big{i:03}"), value.clone(), None).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(grpc_status(&e));
                break;
            }
        }
    }
    assert_eq!(
        refused,
        Some((
            tonic::Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded".into()
        )),
        "writes past the quota are refused"
    );
    // The alarm is raised through raft; every write that grows the store is refused,
    // reads and deletes still work.
    let mut alarms = String::new();
    for _ in 0..50 {
        alarms = m.etcdctl(&["alarm", "list"]).1;
        if alarms.contains("NOSPACE") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms:?}");
    let e = c.put("small", "v", None).await.unwrap_err();
    assert_eq!(grpc_status(&e).0, tonic::Code::ResourceExhausted);
    let e = c.lease_grant(60, None).await.unwrap_err();
    assert_eq!(grpc_status(&e).0, tonic::Code::ResourceExhausted);
    let (code, body) = http_get(&m, "/health");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("ALARM NOSPACE"), "{body}");
    let status = c.status().await.unwrap();
    assert!(
        status.errors().iter().any(|e| e.contains("NOSPACE")),
        "{:?}",
        status.errors()
    );
    assert!(c.get("big000", None).await.unwrap().count() == 1);

    // Recover as etcd's operators do: delete, compact, defragment, disarm.
    let rev = c
        .delete("big", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev, None).await.unwrap();
    assert!(m.etcdctl(&["defrag"]).0);
    let (ok, out, err) = m.etcdctl(&["alarm", "disarm"]);
    assert!(ok && out.contains("NOSPACE"), "{out}{err}");
    assert_eq!(m.etcdctl(&["alarm", "list"]).1, "");
    let size = c.status().await.unwrap().db_size();
    assert!(
        size < 3_000_000,
        "defragment reclaimed the space: {size} bytes"
    );
    c.put("small", "v", None).await.unwrap();
    let (code, body) = http_get(&m, "/health");
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_endpoints_and_status() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    c.put("k", "v", None).await.unwrap();

    let (code, body) = http_get(&m, "/version");
    assert_eq!(code, 200);
    assert!(body.contains(r#""etcdserver":"3.5."#), "{body}");
    assert_eq!(http_get(&m, "/livez").0, 200);
    assert_eq!(http_get(&m, "/readyz").0, 200);
    assert_eq!(http_get(&m, "/health").0, 200);

    let (code, metrics) = http_get(&m, "/metrics");
    assert_eq!(code, 200);
    for series in [
        "etcd_server_has_leader 1",
        "etcd_server_leader_changes_seen_total 1",
        "etcd_server_proposals_committed_total",
        "etcd_server_proposals_applied_total",
        "etcd_server_proposals_pending 0",
        "etcd_server_proposals_failed_total 0",
        "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"}",
        "etcd_disk_wal_fsync_duration_seconds_count",
        "etcd_disk_backend_commit_duration_seconds_count",
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_network_peer_round_trip_time_seconds",
        "grpc_server_started_total{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
        "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics:\n{metrics}");
    }
    // Where the put spent its time, stage by stage (it went through all of them).
    for stage in ["queued", "persisted", "applied", "answered"] {
        let series =
            format!("pontoon_server_proposal_duration_seconds_count{{stage=\"{stage}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{metrics}"))
            .parse()
            .unwrap();
        assert!(count >= 1, "{series}{count}");
    }
    // A failed call is counted with its code.
    let _ = c.compact(1_000_000, None).await.unwrap_err();
    let (_, metrics) = http_get(&m, "/metrics");
    assert!(
        metrics.contains("grpc_code=\"OutOfRange\",grpc_method=\"Compact\""),
        "{metrics}"
    );

    let s = c.status().await.unwrap();
    let id = s.header().unwrap().member_id();
    assert_eq!(s.leader(), id);
    assert!(s.version().starts_with("3.5."));
    assert!(s.db_size() > 0);
    assert!(s.raft_index() >= 2);
    assert!(!s.is_learner());
    // The same as etcdctl shows it.
    let (ok, out, _) = m.etcdctl(&["endpoint", "status"]);
    assert!(ok);
    assert!(out.contains(&format!("{id:x}, 3.5.")), "{out}");
}

/// `--listen-metrics-urls` (kubeadm's liveness probe target) serves the HTTP
/// endpoints alone; kubeadm's boolean spelling `--client-cert-auth=false` is taken.
#[test]
fn metrics_urls_serve_health_and_metrics() {
    let port = free_port();
    let url = format!("--listen-metrics-urls=http://127.0.0.1:{port}");
    let m = Member::start_with(
        Target::Pontoon,
        &[
            &url,
            "--experimental-initial-corrupt-check=true",
            "--client-cert-auth=false",
        ],
    );
    let (code, body) = http_get_port(port, "/health");
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
    let (code, body) = http_get_port(port, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("etcd_server_has_leader 1"), "{body}");
    drop(m);
}
