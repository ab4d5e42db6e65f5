//! Durability: every write acknowledged before a `kill -9` is present after restart,
//! at the revision it was acknowledged with; the revision never goes backwards.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Member, Target};
use etcd_client::GetOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    // A small --snapshot-count makes raft log truncation happen during the test too.
    let mut m = Member::start_with(Target::Pontoon, &["--snapshot-count", "300"]);
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut last_rev = 1;
    for round in 0..3 {
        let mut writers = Vec::new();
        for w in 0..8 {
            let acked = acked.clone();
            let mut c = m.client().await;
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("r{round}/w{w}/{i:05}");
                    match c.put(key.clone(), format!("value-{i}"), None).await {
                        Ok(r) => acked
                            .lock()
                            .unwrap()
                            .push((key, r.header().unwrap().revision())),
                        Err(_) => return, // the server died under us
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500 + 300 * round as u64)).await;
        m.kill9();
        for w in writers {
            let _ = w.await;
        }
        m.restart();
        let mut c = m.client().await;
        let acked = acked.lock().unwrap().clone();
        assert!(
            acked.len() > 100,
            "round {round}: only {} writes acknowledged",
            acked.len()
        );
        for (key, rev) in &acked {
            let r = c.get(key.as_str(), None).await.unwrap();
            let kv = r
                .kvs()
                .first()
                .unwrap_or_else(|| panic!("acknowledged {key} lost"));
            assert_eq!(kv.mod_revision(), *rev, "{key} changed revision");
        }
        let now = c
            .get("r", Some(GetOptions::new().with_prefix().with_count_only()))
            .await
            .unwrap();
        let rev = now.header().unwrap().revision();
        let max_acked = acked.iter().map(|(_, r)| *r).max().unwrap();
        assert!(
            rev >= max_acked && rev >= last_rev,
            "revision went backwards: {rev}"
        );
        last_rev = rev;
    }
    // The raft log was truncated along the way (each truncation logs it), in the
    // run before the last kill or after a restart.
    assert!(
        m.log_text().contains("truncated raft log"),
        "no log truncation happened:\n{}",
        m.log_text()
    );
}

#[tokio::test]
async fn clean_shutdown_on_sigterm() {
    let mut m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    c.put("k", "v", None).await.unwrap();
    drop(c);
    assert!(m.terminate(), "SIGTERM must exit 0:\n{}", m.log_text());
    m.restart();
    let mut c = m.client().await;
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v");
}
