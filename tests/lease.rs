//! The Lease API through the `etcd-client` crate and `etcdctl` against a real
//! `pontoon store`: grant, attach, keep-alive, time-to-live, list, revoke, expiry, and
//! remaining TTLs that survive a restart.

mod common;

use std::time::Duration;

use common::{grpc_status, Member, Target};
use etcd_client::{GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions};
use tonic::Code;

#[tokio::test]
async fn grant_attach_time_to_live_list_revoke() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let g = c.lease_grant(60, None).await.unwrap();
    assert!(g.id() > 0);
    assert_eq!(g.ttl(), 60);
    let chosen = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x1234)))
        .await
        .unwrap();
    assert_eq!(chosen.id(), 0x1234);
    let e = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(0x1234)))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::FailedPrecondition,
            "etcdserver: lease already exists".into()
        )
    );
    // etcd's minimum TTL: 1.5 election timeouts (1s default), rounded up: 2s.
    assert_eq!(c.lease_grant(1, None).await.unwrap().ttl(), 2);
    let e = c.lease_grant(9_000_000_001, None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (Code::OutOfRange, "etcdserver: too large lease TTL".into())
    );

    c.put("l/a", "1", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    c.put("l/b", "2", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    c.put("l/c", "3", Some(PutOptions::new().with_lease(0x1234)))
        .await
        .unwrap();
    // Moving a key to another lease detaches it from the first.
    c.put("l/c", "3", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap();
    assert_eq!(c.get("l/a", None).await.unwrap().kvs()[0].lease(), g.id());

    let t = c
        .lease_time_to_live(g.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(t.granted_ttl(), 60);
    assert!((58..=60).contains(&t.ttl()), "{}", t.ttl());
    assert_eq!(
        t.keys(),
        [b"l/a".to_vec(), b"l/b".to_vec(), b"l/c".to_vec()]
    );
    let t = c
        .lease_time_to_live(0x1234, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert!(t.keys().is_empty());
    let unknown = c.lease_time_to_live(0x999, None).await.unwrap();
    assert_eq!(unknown.ttl(), -1);

    let mut ids: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&g.id()) && ids.contains(&0x1234));

    let before = c
        .get("l/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let rev = before.header().unwrap().revision();
    let r = c.lease_revoke(g.id()).await.unwrap();
    assert_eq!(
        r.header().unwrap().revision(),
        rev + 1,
        "all keys deleted in one revision"
    );
    let after = c
        .get("l/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(after.count(), 0);
    let e = c.lease_revoke(g.id()).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    let e = c
        .put("x", "y", Some(PutOptions::new().with_lease(g.id())))
        .await
        .unwrap_err();
    assert_eq!(grpc_status(&e).1, "etcdserver: requested lease not found");
}

#[tokio::test]
async fn keep_alive_holds_a_lease_and_expiry_deletes_its_keys() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let kept = c.lease_grant(3, None).await.unwrap().id();
    let left = c.lease_grant(3, None).await.unwrap().id();
    c.put("kept", "v", Some(PutOptions::new().with_lease(kept)))
        .await
        .unwrap();
    c.put("left", "v", Some(PutOptions::new().with_lease(left)))
        .await
        .unwrap();
    let (mut keeper, mut responses) = c.lease_keep_alive(kept).await.unwrap();
    for _ in 0..6 {
        keeper.keep_alive().await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert_eq!((r.id(), r.ttl()), (kept, 3));
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    assert_eq!(c.get("kept", None).await.unwrap().count(), 1);
    assert_eq!(
        c.get("left", None).await.unwrap().count(),
        0,
        "expired lease's key deleted"
    );
    assert_eq!(c.lease_time_to_live(left, None).await.unwrap().ttl(), -1);
    // Keep-alive of an unknown lease answers TTL 0, which the client reports as
    // "lease not found".
    match c.lease_keep_alive(left).await {
        Err(etcd_client::Error::LeaseKeepAliveError(m)) => assert_eq!(m, "lease not found"),
        other => panic!("expected lease not found, got {other:?}"),
    }
}

#[tokio::test]
async fn remaining_ttl_survives_restart() {
    let mut m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let id = c.lease_grant(30, None).await.unwrap().id();
    c.put("k", "v", Some(PutOptions::new().with_lease(id)))
        .await
        .unwrap();
    // Let checkpoints record the remaining TTL (about 23s left by now), then crash.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    m.kill9();
    m.restart();
    let mut c = m.client().await;
    let t = c.lease_time_to_live(id, None).await.unwrap();
    assert_eq!(t.granted_ttl(), 30);
    assert!(
        (20..=26).contains(&t.ttl()),
        "remaining TTL {} should resume from the checkpoint, not reset to 30",
        t.ttl()
    );
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].lease(), id);
}

#[test]
fn etcdctl_lease_commands() {
    let m = Member::start(Target::Pontoon);
    let (ok, out, err) = m.etcdctl(&["lease", "grant", "100"]);
    assert!(ok, "{err}");
    // "lease 694d77aa9e38260f granted with TTL(100s)"
    let id = out.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(out, format!("lease {id} granted with TTL(100s)\n"));
    assert!(m.etcdctl(&["put", "--lease", &id, "foo", "bar"]).0);
    let (_, out, _) = m.etcdctl(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        out.starts_with(&format!("lease {id} granted with TTL(100s), remaining(")),
        "{out}"
    );
    assert!(out.trim_end().ends_with("attached keys([foo])"), "{out}");
    let (_, out, _) = m.etcdctl(&["lease", "list"]);
    assert_eq!(out, format!("found 1 leases\n{id}\n"));
    let (ok, out, _) = m.etcdctl(&["lease", "keep-alive", "--once", &id]);
    assert!(ok);
    assert_eq!(out, format!("lease {id} keepalived with TTL(100)\n"));
    let (_, out, _) = m.etcdctl(&["lease", "revoke", &id]);
    assert_eq!(out, format!("lease {id} revoked\n"));
    let (_, out, _) = m.etcdctl(&["get", "foo"]);
    assert_eq!(out, "");
    let (ok, _, err) = m.etcdctl(&["lease", "revoke", &id]);
    assert!(
        !ok && err.contains("etcdserver: requested lease not found"),
        "{err}"
    );
}
