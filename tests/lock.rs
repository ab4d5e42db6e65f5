//! etcd's Lock and Election services (etcd-client's `lock` / `campaign` family, which
//! call them over gRPC) and `etcdctl lock` / `etcdctl elect` (which build the same
//! recipes on KV, Watch and Lease) against a real `pontoon store`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Member, Target};
use etcd_client::{LockOptions, ProclaimOptions, ResignOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_excludes_until_unlock_or_lease_expiry() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let l1 = c.lease_grant(60, None).await.unwrap().id();
    let l2 = c.lease_grant(3, None).await.unwrap().id();
    let l3 = c.lease_grant(60, None).await.unwrap().id();
    let held = c
        .lock("mylock", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap();
    assert!(held.key().starts_with(b"mylock/"));

    let mut c2 = m.client().await;
    let waiter = tokio::spawn(async move {
        c2.lock("mylock", Some(LockOptions::new().with_lease(l3)))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "second locker must wait while the lock is held"
    );
    c.unlock(held.key()).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(second.key(), held.key());

    // A holder whose lease expires releases the lock.
    c.unlock(second.key()).await.unwrap();
    let _short = c
        .lock("other", Some(LockOptions::new().with_lease(l2)))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let next = c
        .lock("other", Some(LockOptions::new().with_lease(l1)))
        .await
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "acquired before the lease expired"
    );
    assert!(next.key().starts_with(b"other/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_campaign_proclaim_observe_resign() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let l1 = c.lease_grant(60, None).await.unwrap().id();
    let l2 = c.lease_grant(60, None).await.unwrap().id();
    let won = c.campaign("elect", "alpha", l1).await.unwrap();
    let leader = won.leader().unwrap().clone();
    assert_eq!(
        c.leader("elect").await.unwrap().kv().unwrap().value(),
        b"alpha"
    );

    let mut observe = c.observe("elect").await.unwrap();
    let first = observe.message().await.unwrap().unwrap();
    assert_eq!(first.kv().unwrap().value(), b"alpha");

    c.proclaim(
        "beta",
        Some(ProclaimOptions::new().with_leader(leader.clone())),
    )
    .await
    .unwrap();
    let next = observe.message().await.unwrap().unwrap();
    assert_eq!(next.kv().unwrap().value(), b"beta");

    let mut c2 = m.client().await;
    let second = tokio::spawn(async move { c2.campaign("elect", "gamma", l2).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished());
    c.resign(Some(ResignOptions::new().with_leader(leader)))
        .await
        .unwrap();
    let won2 = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(won2.leader().unwrap().lease(), l2);
    let next = observe.message().await.unwrap().unwrap();
    assert_eq!(next.kv().unwrap().value(), b"gamma");
}

#[test]
fn etcdctl_lock_and_elect() {
    let m = Member::start(Target::Pontoon);
    // `etcdctl lock NAME CMD` runs CMD while holding the lock.
    let (ok, out, err) = m.etcdctl(&["lock", "L", "echo", "inside"]);
    assert!(ok, "{err}");
    assert_eq!(out, "inside\n");
    // `etcdctl elect NAME PROPOSAL` prints the leader key and value once elected.
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &m.endpoint(), "elect", "E", "me"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    // `elect -l` observes the leader until interrupted: give it two seconds.
    let observed = Command::new("timeout")
        .args([
            "2",
            "etcdctl",
            "--endpoints",
            &m.endpoint(),
            "elect",
            "-l",
            "E",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let value = String::from_utf8_lossy(&observed.stdout).into_owned();
    assert!(
        value.starts_with("E/") && value.ends_with("\nme\n"),
        "{value:?}"
    );
}
