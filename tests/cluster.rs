//! Three-member clusters as separate `pontoon store` processes on loopback: leader
//! failure, catch-up through a raft snapshot, membership changes and maintenance with
//! the real `etcdctl`, and hostile peer traffic.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{grpc_status, Cluster, Member, Target};
use etcd_client::GetOptions;

/// Writes `key=value` pairs through `endpoint` until `stop`, recording acknowledged ones.
fn spawn_writer(
    endpoint: String,
    prefix: String,
    acked: Arc<Mutex<Vec<(String, i64)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = etcd_client::Client::connect([endpoint], None)
            .await
            .unwrap();
        for i in 0.. {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let key = format!("{prefix}/{i:05}");
            match c.put(key.clone(), format!("v{i}"), None).await {
                Ok(r) => acked
                    .lock()
                    .unwrap()
                    .push((key, r.header().unwrap().revision())),
                // A dead member fails at once: don't spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
}

/// Every acknowledged key is present on `m` (read locally there) at its revision.
async fn assert_has_all(m: &Member, acked: &[(String, i64)]) {
    let mut c = m.client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let max_rev = acked.iter().map(|(_, r)| *r).max().unwrap_or(0);
    // Wait until the member has applied everything acknowledged.
    loop {
        let r = c
            .get("probe", Some(GetOptions::new().with_serializable()))
            .await
            .unwrap();
        if r.header().unwrap().revision() >= max_rev {
            break;
        }
        assert!(Instant::now() < deadline, "{} never caught up", m.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (key, rev) in acked {
        let r = c
            .get(key.as_str(), Some(GetOptions::new().with_serializable()))
            .await
            .unwrap();
        let kv = r
            .kvs()
            .first()
            .unwrap_or_else(|| panic!("acknowledged {key} missing on {}", m.name));
        assert_eq!(kv.mod_revision(), *rev, "{key} on {}", m.name);
    }
}

/// HashKV at one revision is equal on every running member.
async fn assert_same_hash(cluster: &mut Cluster) {
    let mut rev = 0;
    let mut hashes = Vec::new();
    for m in cluster.members.iter_mut() {
        if !m.is_running() {
            continue;
        }
        let mut c = m.client().await;
        if rev == 0 {
            rev = c.get("x", None).await.unwrap().header().unwrap().revision();
        }
        // Wait until this member has reached `rev`.
        let deadline = Instant::now() + Duration::from_secs(20);
        let hash = loop {
            match c.hash_kv(rev).await {
                Ok(h) => break h.hash(),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("hash_kv on {}: {e}", m.name),
            }
        };
        hashes.push((m.name.clone(), hash));
    }
    assert!(
        hashes.windows(2).all(|w| w[0].1 == w[1].1),
        "HashKV at {rev} differs: {hashes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_elects_a_new_leader_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &["--snapshot-count", "500"]);
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writers on every member: followers forward their proposals to the leader.
    let mut writers: Vec<_> = cluster
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| spawn_writer(m.endpoint(), format!("w{i}"), acked.clone(), stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = cluster
        .wait_leader(Duration::from_secs(5))
        .await
        .expect("a leader");
    let before = acked.lock().unwrap().len();
    assert!(before > 20, "only {before} writes before the kill");

    let killed_at = Instant::now();
    cluster.members[leader].kill9();
    let new_leader = cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .expect("a new leader after the kill");
    let elected_in = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    // Writes continue through the survivors. (Writes a follower had forwarded to the
    // dead leader are answered "leader changed" at once, not after a timeout.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = acked.lock().unwrap().len();
    assert!(after > before + 20, "writes stalled: {before} -> {after}");

    cluster.members[leader].restart();
    writers.push(spawn_writer(
        cluster.members[leader].endpoint(),
        "w-restarted".into(),
        acked.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    for m in &cluster.members {
        assert_has_all(m, &acked).await;
    }
    assert_same_hash(&mut cluster).await;
    eprintln!(
        "new leader elected {elected_in:?} after kill -9; {} writes acknowledged",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_member_catches_up_through_a_snapshot() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &["--snapshot-count", "100"]);
    let down = 2;
    cluster.members[down].kill9();
    let mut c = cluster.members[0].client().await;
    let mut acked = Vec::new();
    // Far more than --snapshot-count entries: the log the member needs is truncated.
    // (If the killed member led, the first puts may time out during the election.)
    for i in 0..600 {
        let key = format!("k{:03}", i % 150);
        for attempt in 0.. {
            match c.put(key.clone(), format!("v{i}"), None).await {
                Ok(r) => {
                    acked.push((key, r.header().unwrap().revision()));
                    break;
                }
                Err(e) if attempt < 5 => eprintln!("put retried: {e}"),
                Err(e) => panic!("put failed: {e}"),
            }
        }
    }
    let mut latest = std::collections::BTreeMap::new();
    for (k, rev) in acked {
        latest.insert(k, rev);
    }
    let latest: Vec<(String, i64)> = latest.into_iter().collect();
    cluster.members[down].restart();
    assert_has_all(&cluster.members[down], &latest).await;
    let log = cluster.members[down].log_text();
    assert!(
        log.contains("installing snapshot from leader"),
        "the member did not catch up through a snapshot:\n{log}"
    );
    // It keeps replicating normally afterwards, and survives a restart.
    let r = c.put("after", "snapshot", None).await.unwrap();
    let after = vec![("after".to_string(), r.header().unwrap().revision())];
    assert_has_all(&cluster.members[down], &after).await;
    cluster.members[down].kill9();
    cluster.members[down].restart();
    assert_has_all(&cluster.members[down], &latest).await;
    assert_has_all(&cluster.members[down], &after).await;
    assert_same_hash(&mut cluster).await;
}

fn etcdctl(endpoints: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .output()
        .expect("run etcdctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn ok(r: (bool, String, String)) -> String {
    assert!(r.0, "etcdctl failed: {}{}", r.1, r.2);
    r.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcdctl_operates_the_cluster() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &[]);
    let eps = cluster.endpoints();

    // member list: every member started, with its name and URLs.
    let list = ok(etcdctl(&eps, &["member", "list"]));
    for m in &cluster.members {
        let line = format!(
            "started, {}, {}, {}, false",
            m.name,
            m.peer_url(),
            m.endpoint()
        );
        assert!(list.contains(&line), "{line} missing from:\n{list}");
    }
    assert_eq!(list.lines().count(), 3);

    // endpoint status / health over the whole cluster (etcdctl 3.4 sends these
    // per-member calls with `:authority: http://...`; see server::h2_authority).
    let first = cluster.members[0].endpoint();
    let status = ok(etcdctl(&first, &["endpoint", "status", "--cluster"]));
    assert_eq!(status.lines().count(), 3, "{status}");
    assert_eq!(
        status.matches(", true, false,").count(),
        1,
        "one leader:\n{status}"
    );
    assert!(status.contains("3.5."), "version: {status}");
    let health = etcdctl(&first, &["endpoint", "health", "--cluster"]);
    assert!(health.0, "{health:?}");
    assert_eq!(
        health.2.matches("is healthy").count() + health.1.matches("is healthy").count(),
        3
    );

    // Grow: a learner joins with --initial-cluster-state existing, is promoted.
    let mut m4 = Member::new(Target::Pontoon, "m4", &[]);
    let added = ok(etcdctl(
        &eps,
        &[
            "member",
            "add",
            "m4",
            "--learner",
            &format!("--peer-urls={}", m4.peer_url()),
        ],
    ));
    assert!(
        added.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{added}"
    );
    let id4 = added
        .split_whitespace()
        .nth(1)
        .expect("Member <id> added")
        .to_string();
    m4.initial_cluster = Some(cluster.initial_cluster_with(&format!("m4={}", m4.peer_url())));
    m4.cluster_state = "existing";
    m4.spawn_process();
    m4.wait_ready();
    let list = ok(etcdctl(&eps, &["member", "list"]));
    assert!(list.contains(&format!("{id4}, started, m4")), "{list}");
    assert!(
        list.contains("m4, ") && list.contains(", true\n"),
        "m4 is a learner:\n{list}"
    );
    // Promote through a follower: it forwards to the leader.
    let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    let follower = cluster.members[(leader + 1) % 3].endpoint();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = etcdctl(&follower, &["member", "promote", &id4]);
        if r.0 {
            assert!(r.1.contains("promoted"), "{r:?}");
            break;
        }
        assert!(
            r.2.contains("in sync with leader") && Instant::now() < deadline,
            "promote failed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let list = ok(etcdctl(&eps, &["member", "list"]));
    assert_eq!(list.matches(", false").count(), 4, "{list}");
    let again = etcdctl(&eps, &["member", "promote", &id4]);
    assert!(
        !again.0
            && again
                .2
                .contains("etcdserver: can only promote a learner member"),
        "{again:?}"
    );

    // move-leader to m4, then shrink: remove m4, which stops itself.
    let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    let leader_ep = cluster.members[leader].endpoint();
    let moved = ok(etcdctl(&leader_ep, &["move-leader", &id4]));
    assert!(moved.contains(&format!("to {id4}")), "{moved}");
    // Only the leader can hand leadership over (etcdctl looks for it client-side).
    let new_leader = cluster.wait_leader(Duration::from_secs(5)).await;
    assert_eq!(new_leader, None, "m4 (outside `cluster`) leads now");
    let mut follower = cluster.members[0].client().await;
    let id4_num = u64::from_str_radix(&id4, 16).unwrap();
    let e = follower.move_leader(id4_num).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (tonic::Code::Unavailable, "etcdserver: not leader".into())
    );
    ok(etcdctl(&eps, &["member", "remove", &id4]));
    let exit = m4.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some(), "a removed member stops itself");
    assert!(m4.log_text().contains("removed from the cluster"));
    // m4 led: the others elect a leader among themselves.
    assert!(cluster.wait_leader(Duration::from_secs(10)).await.is_some());
    let list = ok(etcdctl(&eps, &["member", "list"]));
    assert_eq!(list.lines().count(), 3, "{list}");
    let gone = etcdctl(&eps, &["member", "remove", &id4]);
    assert!(
        !gone.0 && gone.2.contains("etcdserver: member not found"),
        "{gone:?}"
    );

    // Maintenance: alarms, defrag, snapshot, hashkv.
    ok(etcdctl(&eps, &["put", "k", "v"]));
    assert_eq!(ok(etcdctl(&eps, &["alarm", "list"])), "");
    ok(etcdctl(&eps, &["alarm", "disarm"]));
    let defrag = ok(etcdctl(&first, &["defrag"]));
    assert!(
        defrag.contains("Finished defragmenting etcd member"),
        "{defrag}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    let saved = etcdctl(&first, &["snapshot", "save", file.to_str().unwrap()]);
    assert!(saved.0, "{saved:?}");
    assert!(std::fs::metadata(&file).unwrap().len() > 100);

    // Restore: a new single-member cluster from the backup has every key at its
    // revision, and a new identity.
    let mut c = cluster.members[0].client().await;
    let before = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let pontoon = env!("CARGO_BIN_EXE_pontoon");
    let st = std::process::Command::new(pontoon)
        .args(["snapshot", "status", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(st.status.success(), "{st:?}");
    assert!(String::from_utf8_lossy(&st.stdout).contains("checksum OK"));
    let mut restored = Member::new(Target::Pontoon, "default", &[]);
    let r = std::process::Command::new(pontoon)
        .args(["snapshot", "restore", file.to_str().unwrap(), "--data-dir"])
        .arg(&restored.data_dir)
        .output()
        .unwrap();
    assert!(r.status.success(), "{r:?}");
    restored.spawn_process();
    restored.wait_ready();
    let mut rc = restored.client().await;
    let after = rc
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let view = |r: &etcd_client::GetResponse| {
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key().to_vec(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(!view(&before).is_empty());
    assert_eq!(view(&before), view(&after));
    assert!(after.header().unwrap().revision() >= before.header().unwrap().revision());
    assert_ne!(
        after.header().unwrap().cluster_id(),
        before.header().unwrap().cluster_id()
    );
    let list = ok(restored.etcdctl(&["member", "list"]));
    assert_eq!(list.lines().count(), 1, "{list}");
    // A damaged backup is refused before anything is written.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, &bytes).unwrap();
    let target = dir.path().join("never");
    let r = std::process::Command::new(pontoon)
        .args(["snapshot", "restore", bad.to_str().unwrap(), "--data-dir"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(!target.join("member").join("kv").join("CURRENT").exists());
    let hashes = ok(etcdctl(&first, &["endpoint", "hashkv", "--cluster"]));
    assert_eq!(hashes.lines().count(), 3, "{hashes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_peer_traffic_and_bad_membership_requests_are_refused() {
    use pontoon_proto::peer::raft_peer_client::RaftPeerClient;
    use pontoon_proto::peer::{MembersRequest, RaftBatch};

    let mut cluster = Cluster::start(Target::Pontoon, 3, &[]);
    let peer = cluster.members[0].peer_url();
    let mut p = RaftPeerClient::connect(peer.clone()).await.unwrap();
    let cluster_id = p
        .members(MembersRequest {})
        .await
        .unwrap()
        .into_inner()
        .cluster_id;
    let send = |batch: RaftBatch| {
        let peer = peer.clone();
        async move {
            let mut p = RaftPeerClient::connect(peer).await.unwrap();
            p.send(tokio_stream::iter(vec![batch])).await
        }
    };
    // Garbage where a raft message should be.
    let r = send(RaftBatch {
        from: 1,
        cluster_id,
        messages: vec![vec![0xff, 0xff, 0xff, 0x01, 0x02]],
    })
    .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);
    // Another cluster.
    let r = send(RaftBatch {
        from: 1,
        cluster_id: cluster_id ^ 1,
        messages: vec![],
    })
    .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::FailedPrecondition);
    // A well-formed message for a member that is not this one.
    let m = raft::prelude::Message {
        to: 12345,
        from: 678,
        ..Default::default()
    };
    let bytes = protobuf::Message::write_to_bytes(&m).unwrap();
    let r = send(RaftBatch {
        from: 678,
        cluster_id,
        messages: vec![bytes],
    })
    .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Membership requests with etcd's errors.
    let mut c = cluster.members[1].client().await;
    let e = c.member_remove(0x1234).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (tonic::Code::NotFound, "etcdserver: member not found".into())
    );
    let url = cluster.members[0].peer_url();
    let e = c.member_add([url.as_str()], None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: Peer URLs already exists".into()
        )
    );
    let e = c
        .member_add(["http://no-port-here"], None)
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: given member URLs are invalid".into()
        )
    );

    // Every member still serves, with one leader.
    let eps = cluster.endpoints();
    ok(etcdctl(&eps, &["put", "still", "works"]));
    assert!(cluster.wait_leader(Duration::from_secs(5)).await.is_some());
    for m in &mut cluster.members {
        assert!(m.is_running(), "{} died:\n{}", m.name, m.log_text());
    }

    // Removing the last member of a single-member cluster is refused.
    let single = Member::start(Target::Pontoon);
    let mut c = single.client().await;
    let id = c.status().await.unwrap().header().unwrap().member_id();
    let e = c.member_remove(id).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: re-configuration failed due to not enough started members".into()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_list_is_etcds() {
    if !common::have_etcd() {
        eprintln!("etcd not installed; skipping");
        return;
    }
    // The same names, URLs and token: etcd and Pontoon must report the same member
    // and cluster IDs and print the same member list.
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| (common::free_port(), common::free_port()))
        .collect();
    let mut outputs = Vec::new();
    for target in [Target::Etcd, Target::Pontoon] {
        let mut cluster = Cluster::start_on(target, &ports, &[]);
        let eps = cluster.endpoints();
        let list = ok(etcdctl(&eps, &["member", "list", "-w", "table"]));
        let json = ok(etcdctl(&eps, &["member", "list", "-w", "json"]));
        let cluster_id = json
            .split("\"cluster_id\":")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or_default()
            .to_string();
        outputs.push((list, cluster_id));
        drop(cluster);
        // Let the ports go before the next cluster binds them.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(outputs[0].0, outputs[1].0, "member list differs");
    assert_eq!(outputs[0].1, outputs[1].1, "cluster ID differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_are_kept_alive_through_followers_and_survive_a_leader_change() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &[]);
    let leader = cluster
        .wait_leader(Duration::from_secs(5))
        .await
        .expect("a leader");
    let follower = (leader + 1) % 3;
    let mut fc = cluster.members[follower].client().await;

    // A short lease kept alive only through a follower stays alive: the follower
    // forwards keep-alives to the leader, whose lessor decides expiry.
    let short = fc.lease_grant(3, None).await.unwrap().id();
    fc.put(
        "short",
        "v",
        Some(etcd_client::PutOptions::new().with_lease(short)),
    )
    .await
    .unwrap();
    let (mut keeper, mut responses) = fc.lease_keep_alive(short).await.unwrap();
    for _ in 0..8 {
        keeper.keep_alive().await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert_eq!(r.ttl(), 3);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(fc.get("short", None).await.unwrap().count(), 1);
    drop(keeper);
    drop(responses);

    // A keep-alive sent through a follower right after its grant finds the lease, even
    // when the leader has committed but not yet applied the grant.
    for i in 0..50 {
        let id = fc.lease_grant(60, None).await.unwrap().id();
        let (mut keeper, mut responses) = fc.lease_keep_alive(id).await.unwrap();
        keeper.keep_alive().await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert_eq!(r.ttl(), 60, "keep-alive {i} right after the grant");
        fc.lease_revoke(id).await.unwrap();
    }

    // A long lease keeps its remaining TTL across the leader's death (etcd restarts it
    // at the full TTL).
    let long = fc.lease_grant(30, None).await.unwrap().id();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let before = fc.lease_time_to_live(long, None).await.unwrap().ttl();
    assert!((22..=24).contains(&before), "TTL before the kill: {before}");
    cluster.members[leader].kill9();
    let new_leader = cluster
        .wait_leader(Duration::from_secs(10))
        .await
        .expect("a new leader");
    let mut nc = cluster.members[new_leader].client().await;
    let after = nc.lease_time_to_live(long, None).await.unwrap().ttl();
    // The new leader resumes from the last checkpoint (taken every second once the
    // stored TTL is 2 s off), so the lease may gain up to ~3 s; etcd would restart it
    // at the full 30 s.
    assert!(
        (18..=27).contains(&after),
        "TTL after the leader change: {after} (before: {before})"
    );

    // The short lease, no longer kept alive, expired and took its key with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while nc.get("short", None).await.unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the short lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(nc.lease_time_to_live(short, None).await.unwrap().ttl(), -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_diverged_member_raises_the_corrupt_alarm() {
    let mut cluster = Cluster::start(
        Target::Pontoon,
        3,
        &["--experimental-corrupt-check-time", "1s"],
    );
    let eps = cluster.endpoints();
    for i in 0..20 {
        ok(etcdctl(&eps, &["put", &format!("k{i}"), "AAAAAAAA"]));
    }
    // Healthy: a few check rounds raise nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ok(etcdctl(&eps, &["alarm", "list"])), "");

    // Change one stored value behind raft's back on a follower.
    let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    let victim = (leader + 1) % 3;
    assert!(cluster.members[victim].terminate(), "clean stop");
    {
        let path = cluster.members[victim].data_dir().join("member").join("kv");
        let db = rocksdb::DB::open_cf(
            &rocksdb::Options::default(),
            &path,
            ["rev", "index", "meta", "lease", "key_history"],
        )
        .unwrap();
        let rev = db.cf_handle("rev").unwrap();
        let (k, v) = db
            .iterator_cf(rev, rocksdb::IteratorMode::End)
            .next()
            .unwrap()
            .unwrap();
        let pos = v.windows(8).position(|w| w == b"AAAAAAAA").unwrap();
        let mut bad = v.to_vec();
        bad[pos..pos + 8].copy_from_slice(b"BBBBBBBB");
        db.put_cf(rev, k, bad).unwrap();
        db.flush_cf(rev).unwrap();
    }
    cluster.members[victim].restart();
    let victim_id = cluster.members[victim]
        .client()
        .await
        .status()
        .await
        .unwrap()
        .header()
        .unwrap()
        .member_id();
    let deadline = Instant::now() + Duration::from_secs(15);
    let alarms = loop {
        let a = ok(etcdctl(&eps, &["alarm", "list"]));
        if a.contains("CORRUPT") {
            break a;
        }
        assert!(Instant::now() < deadline, "no CORRUPT alarm raised");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        alarms.contains(&format!("memberID:{victim_id} alarm:CORRUPT")),
        "{alarms}"
    );
    // Writes are refused cluster-wide until the alarm is disarmed.
    let mut c = cluster.members[leader].client().await;
    let e = c.put("after", "x", None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (tonic::Code::DataLoss, "etcdserver: corrupt cluster".into())
    );
    assert_eq!(
        c.get("k1", None).await.unwrap().count(),
        1,
        "reads still work"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_without_a_leader_answers_with_etcds_errors() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &[]);
    cluster.members[0].kill9();
    cluster.members[1].kill9();
    let survivor = &cluster.members[2];
    // Wait until it has noticed (check-quorum / election timeout).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = survivor.client().await;
    while c.status().await.unwrap().leader() != 0 {
        assert!(
            Instant::now() < deadline,
            "the survivor still believes in a leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Clients that require a leader get "no leader" at once.
    let opts = etcd_client::ConnectOptions::new().with_require_leader(true);
    let mut strict = etcd_client::Client::connect([survivor.endpoint()], Some(opts))
        .await
        .unwrap();
    let started = Instant::now();
    let e = strict.put("k", "v", None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (tonic::Code::Unavailable, "etcdserver: no leader".into())
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // Others wait for a leader, then time out with etcd's error.
    let e = c.put("k", "v", None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            tonic::Code::Unavailable,
            "etcdserver: request timed out".into()
        )
    );
    // Serializable reads are still served locally.
    c.get("k", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_removed_while_down_stops_when_it_comes_back() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    let gone = (leader + 1) % 3;
    let mut c = cluster.members[gone].client().await;
    let id = c.status().await.unwrap().header().unwrap().member_id();
    drop(c);
    // Down while it is removed: it never receives the entry that removes it.
    cluster.members[gone].kill9();
    let mut c = cluster.members[leader].client().await;
    c.member_remove(id).await.unwrap();
    c.put("after-removal", "v", None).await.unwrap();
    // Back with its old data, it believes it is a member; its peers refuse its
    // traffic, and it stops itself as etcd does.
    cluster.members[gone].spawn_process();
    let exit = cluster.members[gone].wait_exit(Duration::from_secs(15));
    assert!(
        exit.is_some_and(|s| !s.success()),
        "a removed member must stop: {exit:?}\n{}",
        cluster.members[gone].log_text()
    );
    assert!(cluster.members[gone]
        .log_text()
        .contains("the member has been permanently removed from the cluster"));
    // The others are unaffected.
    c.put("still", "fine", None).await.unwrap();
}

/// Removing the leader while it is busy with proposals: raft-rs drops the leader's own
/// progress when the removal applies, so the member must stop driving raft there and
/// then (it used to panic inside raft-rs when it persisted the next entries). It stops
/// cleanly, and every write acknowledged by anyone is on the remaining members.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_busy_leader_stops_it_cleanly() {
    let mut cluster = Cluster::start(Target::Pontoon, 3, &[]);
    let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
    let mut lc = cluster.members[leader].client().await;
    let id = lc.status().await.unwrap().header().unwrap().member_id();
    drop(lc);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let m = &cluster.members[if w % 4 == 0 { (leader + 1) % 3 } else { leader }];
            spawn_writer(m.endpoint(), format!("w{w}"), acked.clone(), stop.clone())
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let follower = (leader + 1) % 3;
    let mut fc = cluster.members[follower].client().await;
    fc.member_remove(id).await.unwrap();
    let exit = cluster.members[leader].wait_exit(Duration::from_secs(15));
    let log = cluster.members[leader].log_text();
    assert!(exit.is_some(), "the removed leader stops itself\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("removed from the cluster"), "{log}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "writers made progress: {}", acked.len());
    for m in 0..3 {
        if m != leader {
            assert_has_all(&cluster.members[m], &acked).await;
        }
    }
}
