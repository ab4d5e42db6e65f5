//! The Watch API through the `etcd-client` crate against a real `pontoon store`:
//! the six guarantees (ordered, unique, atomic, reliable, resumable, bookmarkable),
//! prev_kv, filters, compaction, cancel, and slow consumers under load.

mod common;

use std::time::Duration;

use common::{Member, Target};
use etcd_client::{
    DeleteOptions, EventType, Txn, TxnOp, WatchFilterType, WatchOptions, WatchResponse, WatchStream,
};

async fn next(stream: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("watch response within 10s")
        .expect("watch stream healthy")
        .expect("watch stream open")
}

/// (type, key, value, mod_revision) of each event.
fn events(r: &WatchResponse) -> Vec<(EventType, String, String, i64)> {
    r.events()
        .iter()
        .map(|e| {
            let kv = e.kv().unwrap();
            (
                e.event_type(),
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.mod_revision(),
            )
        })
        .collect()
}

#[tokio::test]
async fn live_events_with_prev_kv_and_filters() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let mut w = c
        .watch("k", Some(WatchOptions::new().with_prefix().with_prev_key()))
        .await
        .unwrap();
    let created = next(&mut w).await;
    assert!(created.created());
    assert_eq!(created.header().unwrap().revision(), 1);
    let mut nodel = c
        .watch(
            "k",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoDelete]),
            ),
        )
        .await
        .unwrap();
    assert!(next(&mut nodel).await.created());

    c.put("k1", "a", None).await.unwrap(); // 2
    c.put("k1", "b", None).await.unwrap(); // 3
    c.put("other", "x", None).await.unwrap(); // 4, not watched
    c.delete("k1", None).await.unwrap(); // 5

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let r = next(&mut w).await;
        assert_eq!(
            r.header().unwrap().revision(),
            r.events().last().unwrap().kv().unwrap().mod_revision()
        );
        for e in r.events() {
            seen.push((
                e.event_type(),
                e.kv().unwrap().mod_revision(),
                e.prev_kv().map(|p| p.value_str().unwrap().to_string()),
            ));
        }
    }
    assert_eq!(
        seen,
        vec![
            (EventType::Put, 2, None),
            (EventType::Put, 3, Some("a".into())),
            (EventType::Delete, 5, Some("b".into())),
        ]
    );
    let mut puts = Vec::new();
    while puts.len() < 2 {
        puts.extend(events(&next(&mut nodel).await));
    }
    assert!(puts.iter().all(|(t, ..)| *t == EventType::Put), "{puts:?}");
}

#[tokio::test]
async fn history_replay_then_live_without_gap_or_duplicate() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    for i in 0..50 {
        c.put(format!("h/{i:02}"), format!("v{i}"), None)
            .await
            .unwrap(); // revs 2..=51
    }
    let mut w = c
        .watch(
            "h/",
            Some(WatchOptions::new().with_prefix().with_start_revision(10)),
        )
        .await
        .unwrap();
    assert!(next(&mut w).await.created());
    for i in 50..60 {
        c.put(format!("h/{i:02}"), format!("v{i}"), None)
            .await
            .unwrap(); // revs 52..=61
    }
    let mut revs = Vec::new();
    while revs.last() != Some(&61) {
        revs.extend(
            next(&mut w)
                .await
                .events()
                .iter()
                .map(|e| e.kv().unwrap().mod_revision()),
        );
    }
    assert_eq!(revs, (10..=61).collect::<Vec<_>>());
}

#[tokio::test]
async fn txn_events_arrive_in_one_response() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    c.put("t/0", "old", None).await.unwrap();
    let mut w = c
        .watch("t/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut w).await.created());
    c.txn(Txn::new().and_then([
        TxnOp::put("t/1", "a", None),
        TxnOp::put("t/2", "b", None),
        TxnOp::delete("t/0", Some(DeleteOptions::new())),
    ]))
    .await
    .unwrap();
    let r = next(&mut w).await;
    assert_eq!(
        events(&r),
        vec![
            (EventType::Put, "t/1".into(), "a".into(), 3),
            (EventType::Put, "t/2".into(), "b".into(), 3),
            (EventType::Delete, "t/0".into(), "".into(), 3),
        ]
    );
}

#[tokio::test]
async fn compacted_start_is_canceled_with_compact_revision() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    for i in 0..5 {
        c.put("c", format!("{i}"), None).await.unwrap(); // 2..=6
    }
    c.compact(5, None).await.unwrap();
    let mut w = c
        .watch("c", Some(WatchOptions::new().with_start_revision(3)))
        .await
        .unwrap();
    let mut r = next(&mut w).await;
    if r.created() {
        r = next(&mut w).await;
    }
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), 5);
    // Watching from the compacted revision itself still works.
    let mut w = c
        .watch("c", Some(WatchOptions::new().with_start_revision(5)))
        .await
        .unwrap();
    assert!(next(&mut w).await.created());
    let r = next(&mut w).await;
    assert_eq!(
        events(&r).iter().map(|e| e.3).collect::<Vec<_>>(),
        vec![5, 6]
    );
}

#[tokio::test]
async fn many_watchers_per_stream_cancel_and_progress() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let mut w = c.watch("a", None).await.unwrap();
    let first = next(&mut w).await;
    assert!(first.created());
    let a_id = first.watch_id();
    w.watch("b", Some(WatchOptions::new().with_watch_id(100)))
        .await
        .unwrap();
    let r = next(&mut w).await;
    assert!(r.created());
    assert_eq!(r.watch_id(), 100);
    // A duplicate id is refused the way etcd refuses it.
    w.watch("b", Some(WatchOptions::new().with_watch_id(100)))
        .await
        .unwrap();
    let r = next(&mut w).await;
    assert!(r.created() && r.canceled());
    assert_eq!(r.watch_id(), -1);
    assert_eq!(
        r.cancel_reason(),
        "mvcc: duplicate watch ID provided on the WatchStream"
    );

    c.put("a", "1", None).await.unwrap();
    c.put("b", "2", None).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let r = next(&mut w).await;
        got.push((r.watch_id(), events(&r)[0].1.clone()));
    }
    got.sort();
    assert_eq!(got, vec![(a_id, "a".into()), (100, "b".into())]);

    w.cancel(a_id).await.unwrap();
    let r = next(&mut w).await;
    assert!(r.canceled());
    assert_eq!(r.watch_id(), a_id);
    c.put("a", "ignored", None).await.unwrap();
    c.put("b", "3", None).await.unwrap();
    let r = next(&mut w).await;
    assert_eq!(r.watch_id(), 100, "the canceled watcher gets nothing more");

    // Bookmarkable: a progress response carries a revision everything is seen up to.
    w.request_progress().await.unwrap();
    let r = next(&mut w).await;
    assert_eq!(r.watch_id(), -1);
    assert!(r.events().is_empty());
    assert_eq!(r.header().unwrap().revision(), 5);
}

/// Creates sent back to back on one stream, more than a stream task takes at once:
/// each is answered in order, and a watcher from a past revision gets its history
/// before the next watcher's `created`, as if the requests came one at a time.
#[tokio::test]
async fn a_burst_of_creates_is_answered_in_order() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let past = c.put("burst", "old", None).await.unwrap();
    let past_rev = past.header().unwrap().revision();
    let mut w = c.watch("burst", None).await.unwrap();
    assert!(next(&mut w).await.created());
    const N: i64 = 600;
    for id in 1..=N {
        let mut opts = WatchOptions::new().with_watch_id(id);
        if id % 3 == 0 {
            opts = opts.with_start_revision(past_rev);
        }
        w.watch("burst", Some(opts)).await.unwrap();
    }
    for id in 1..=N {
        let r = next(&mut w).await;
        assert!(r.created() && !r.canceled(), "watcher {id}: {r:?}");
        assert_eq!(r.watch_id(), id);
        if id % 3 == 0 {
            let r = next(&mut w).await;
            assert_eq!(r.watch_id(), id, "history right after its created");
            assert_eq!(
                events(&r),
                [(EventType::Put, "burst".into(), "old".into(), past_rev)]
            );
        }
    }
    c.put("burst", "new", None).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..=N {
        let r = next(&mut w).await;
        assert_eq!(events(&r)[0].2, "new");
        ids.push(r.watch_id());
    }
    ids.sort();
    assert_eq!(ids, (0..=N).collect::<Vec<_>>());
}

#[tokio::test]
async fn progress_notify_at_an_interval() {
    let m = Member::start_with(
        Target::Pontoon,
        &["--experimental-watch-progress-notify-interval", "300ms"],
    );
    let mut c = m.client().await;
    c.put("p", "1", None).await.unwrap();
    let mut w = c
        .watch("p", Some(WatchOptions::new().with_progress_notify()))
        .await
        .unwrap();
    assert!(next(&mut w).await.created());
    let r = next(&mut w).await;
    assert!(r.events().is_empty());
    assert_eq!(r.header().unwrap().revision(), 2);
}

/// A writer at full speed with 1,000 watchers, a tenth of them reading slowly: every
/// watcher gets every event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_watchers_lose_nothing_under_load() {
    const WATCHERS: usize = 1000;
    const STREAMS: usize = 20;
    const WRITES: i64 = 1000;
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let mut w = c
            .watch("load/", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        assert!(next(&mut w).await.created());
        for _ in 1..WATCHERS / STREAMS {
            w.watch("load/", Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
            assert!(next(&mut w).await.created());
        }
        let slow = s % 10 == 0;
        tasks.push(tokio::spawn(async move {
            let mut per_watcher: std::collections::HashMap<i64, i64> = Default::default();
            let mut done = 0;
            while done < WATCHERS / STREAMS {
                let r = next(&mut w).await;
                if slow {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let last = per_watcher.entry(r.watch_id()).or_insert(1);
                for e in r.events() {
                    let rev = e.kv().unwrap().mod_revision();
                    assert_eq!(
                        rev,
                        *last + 1,
                        "watcher {} skipped or repeated",
                        r.watch_id()
                    );
                    *last = rev;
                }
                if *last == WRITES + 1 && !r.events().is_empty() {
                    done += 1;
                }
            }
        }));
    }
    let mut writers = Vec::new();
    for wtr in 0..4 {
        let mut c = m.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..WRITES / 4 {
                c.put(format!("load/{wtr}/{i}"), "v", None).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("watchers caught up")
            .unwrap();
    }
}

#[tokio::test]
async fn revoke_deletes_in_one_response_and_bad_input_keeps_serving() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let lease = c.lease_grant(60, None).await.unwrap().id();
    for k in ["r/1", "r/2"] {
        c.put(
            k,
            "v",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    }
    let mut w = c
        .watch("r/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(next(&mut w).await.created());
    // Canceling a watcher that does not exist is ignored, as etcd ignores it.
    w.cancel(12345).await.unwrap();
    c.lease_revoke(lease).await.unwrap();
    let r = next(&mut w).await;
    assert_eq!(
        events(&r),
        vec![
            (EventType::Delete, "r/1".into(), "".into(), 4),
            (EventType::Delete, "r/2".into(), "".into(), 4),
        ]
    );
    // An empty key watches the smallest key, "\0", as in etcd: created, no error.
    w.watch("", None).await.unwrap();
    let r = next(&mut w).await;
    assert!(r.created() && !r.canceled());
    c.put("r/3", "v", None).await.unwrap();
    assert_eq!(events(&next(&mut w).await)[0].1, "r/3");
    // A negative TTL is raised to the minimum TTL.
    assert_eq!(c.lease_grant(-5, None).await.unwrap().ttl(), 2);
}
