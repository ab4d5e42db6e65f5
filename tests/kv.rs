//! The KV API through the `etcd-client` crate against a real `pontoon store` process:
//! every Range, Put, DeleteRange, Txn and Compact field a client can set.

mod common;

use common::{grpc_status, Member, Target};
use etcd_client::{
    CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse,
};
use tonic::Code;

fn key_strs(kvs: &[etcd_client::KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn put_get_revisions_and_header() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let r = c.put("foo", "bar", None).await.unwrap();
    let h = r.header().unwrap();
    assert_eq!(
        h.revision(),
        2,
        "the first write of a new store is revision 2"
    );
    assert_ne!(h.cluster_id(), 0);
    assert_ne!(h.member_id(), 0);
    assert!(h.raft_term() >= 1);
    let r = c
        .put("foo", "baz", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"bar");
    let g = c.get("foo", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!(
        (
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
            kv.value()
        ),
        (2, 3, 2, &b"baz"[..])
    );
    assert_eq!(g.header().unwrap().revision(), 3);
    assert_eq!(g.count(), 1);
    // Read at an old revision.
    let old = c
        .get("foo", Some(GetOptions::new().with_revision(2)))
        .await
        .unwrap();
    assert_eq!(old.kvs()[0].value(), b"bar");
    // Serializable reads are served locally.
    let s = c
        .get("foo", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert_eq!(s.kvs()[0].value(), b"baz");
    // A future revision is refused with etcd's error.
    let e = c
        .get("foo", Some(GetOptions::new().with_revision(100)))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
}

#[tokio::test]
async fn put_ignore_value_and_lease_flags() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let e = c
        .put("k", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (Code::InvalidArgument, "etcdserver: key not found".into())
    );
    c.put("k", "v1", None).await.unwrap();
    c.put("k", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap();
    let kv = &c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.value(), kv.version()), (&b"v1"[..], 2));
    c.put("k", "v2", Some(PutOptions::new().with_ignore_lease()))
        .await
        .unwrap();
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v2");
    let e = c
        .put("k", "x", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::InvalidArgument,
            "etcdserver: value is provided".into()
        )
    );
    let e = c
        .put("k", "x", Some(PutOptions::new().with_lease(7)))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    // Failed writes changed nothing.
    assert_eq!(
        c.get("k", None).await.unwrap().header().unwrap().revision(),
        4
    );
}

#[tokio::test]
async fn range_options() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    for (k, v) in [("/a/1", "c"), ("/a/2", "a"), ("/a/3", "b"), ("/b/1", "z")] {
        c.put(k, v, None).await.unwrap();
    }
    c.put("/a/1", "d", None).await.unwrap(); // /a/1: version 2, mod 6
    let prefix = |o: GetOptions| o.with_prefix();

    let r = c.get("/a/", Some(prefix(GetOptions::new()))).await.unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/1", "/a/2", "/a/3"]);
    let r = c
        .get("/a/", Some(prefix(GetOptions::new().with_limit(2))))
        .await
        .unwrap();
    assert_eq!(
        (key_strs(r.kvs()), r.more(), r.count()),
        (vec!["/a/1".into(), "/a/2".into()], true, 3)
    );
    let r = c
        .get("/a/", Some(prefix(GetOptions::new().with_count_only())))
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.count()), (0, 3));
    let r = c
        .get("/a/", Some(prefix(GetOptions::new().with_keys_only())))
        .await
        .unwrap();
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));
    let r = c
        .get(
            "/a/",
            Some(prefix(
                GetOptions::new().with_sort(SortTarget::Value, SortOrder::Ascend),
            )),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/2", "/a/3", "/a/1"]);
    let r = c
        .get(
            "/a/",
            Some(prefix(
                GetOptions::new().with_sort(SortTarget::Key, SortOrder::Descend),
            )),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/3", "/a/2", "/a/1"]);
    let r = c
        .get(
            "/a/",
            Some(prefix(
                GetOptions::new()
                    .with_sort(SortTarget::Version, SortOrder::Descend)
                    .with_limit(1),
            )),
        )
        .await
        .unwrap();
    assert_eq!((key_strs(r.kvs()), r.more()), (vec!["/a/1".into()], true));
    let r = c
        .get(
            "/a/",
            Some(prefix(
                GetOptions::new().with_sort(SortTarget::Create, SortOrder::Descend),
            )),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/3", "/a/2", "/a/1"]);
    let r = c
        .get(
            "/a/",
            Some(prefix(
                GetOptions::new().with_sort(SortTarget::Mod, SortOrder::Ascend),
            )),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/2", "/a/3", "/a/1"]);
    // Revision filters.
    let r = c
        .get(
            "/a/",
            Some(prefix(GetOptions::new().with_min_mod_revision(4))),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/1", "/a/3"]);
    let r = c
        .get(
            "/a/",
            Some(prefix(GetOptions::new().with_max_mod_revision(4))),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/2", "/a/3"]);
    let r = c
        .get(
            "/a/",
            Some(prefix(GetOptions::new().with_min_create_revision(3))),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/2", "/a/3"]);
    let r = c
        .get(
            "/a/",
            Some(prefix(GetOptions::new().with_max_create_revision(3))),
        )
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/1", "/a/2"]);
    // Explicit range_end, from-key ("\0"), all keys.
    let r = c
        .get("/a/2", Some(GetOptions::new().with_range("/b/")))
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/2", "/a/3"]);
    let r = c
        .get("/a/3", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(key_strs(r.kvs()), ["/a/3", "/b/1"]);
    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(r.count(), 4);
    // A range whose end is before its start is empty, not an error.
    let r = c
        .get("/b/", Some(GetOptions::new().with_range("/a/")))
        .await
        .unwrap();
    assert_eq!(r.count(), 0);
}

#[tokio::test]
async fn delete_range() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    for k in ["a1", "a2", "a3", "b1"] {
        c.put(k, "v", None).await.unwrap();
    }
    let r = c
        .delete(
            "a",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(r.deleted(), 3);
    assert_eq!(key_strs(r.prev_kvs()), ["a1", "a2", "a3"]);
    assert_eq!(
        r.header().unwrap().revision(),
        6,
        "one revision for the whole delete"
    );
    let r = c.delete("nothing", None).await.unwrap();
    assert_eq!((r.deleted(), r.header().unwrap().revision()), (0, 6));
    let r = c
        .delete("b1", Some(DeleteOptions::new().with_range("b2")))
        .await
        .unwrap();
    assert_eq!(r.deleted(), 1);
    assert_eq!(
        c.get("", Some(GetOptions::new().with_all_keys()))
            .await
            .unwrap()
            .count(),
        0
    );
    // Recreating a deleted key starts a new generation.
    c.put("a1", "again", None).await.unwrap();
    let kv = c.get("a1", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.version(), kv.create_revision()), (1, 8));
}

#[tokio::test]
async fn txn_compares_branches_and_nesting() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    c.put("k", "v1", None).await.unwrap(); // rev 2
    c.put("other", "o", None).await.unwrap(); // rev 3

    // Kubernetes' optimistic update: compare mod_revision, put, else get.
    let update = |rev: i64, v: &'static str| {
        Txn::new()
            .when([Compare::mod_revision("k", CompareOp::Equal, rev)])
            .and_then([TxnOp::put("k", v, None)])
            .or_else([TxnOp::get("k", None)])
    };
    let r = c.txn(update(2, "v2")).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 4);
    let r = c.txn(update(2, "v3")).await.unwrap();
    assert!(!r.succeeded());
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"v2"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.header().unwrap().revision(),
        4,
        "a read-only branch does not bump"
    );

    // Every compare target and result.
    let cases = [
        (Compare::version("k", CompareOp::Equal, 2), true),
        (Compare::version("k", CompareOp::Greater, 2), false),
        (Compare::create_revision("k", CompareOp::Less, 3), true),
        (Compare::mod_revision("k", CompareOp::NotEqual, 4), false),
        (Compare::value("k", CompareOp::Equal, "v2"), true),
        (Compare::value("k", CompareOp::Greater, "v1"), true),
        (Compare::lease("k", CompareOp::Equal, 0), true),
        (Compare::value("missing", CompareOp::Equal, ""), false),
        (Compare::version("missing", CompareOp::Equal, 0), true),
        (
            Compare::create_revision("missing", CompareOp::Equal, 0),
            true,
        ),
    ];
    for (cmp, want) in cases {
        let r = c.txn(Txn::new().when([cmp.clone()])).await.unwrap();
        assert_eq!(r.succeeded(), want, "{cmp:?}");
    }
    // A compare over a range holds only if it holds for every key.
    let r = c
        .txn(Txn::new().when([Compare::version("\0", CompareOp::Greater, 0).with_range("\0")]))
        .await
        .unwrap();
    assert!(r.succeeded());
    let r = c
        .txn(Txn::new().when([Compare::version("\0", CompareOp::Greater, 1).with_range("\0")]))
        .await
        .unwrap();
    assert!(!r.succeeded());

    // All op kinds, a nested txn, and reads that see earlier writes of the same txn.
    let nested = Txn::new()
        .when([Compare::value("other", CompareOp::Equal, "o")])
        .and_then([TxnOp::put("n", "nested", None)])
        .or_else([TxnOp::put("n", "never", None)]);
    let r = c
        .txn(Txn::new().and_then([
            TxnOp::put("t1", "x", None),
            TxnOp::get("t1", None),
            TxnOp::delete("other", Some(DeleteOptions::new().with_prev_key())),
            TxnOp::txn(nested),
        ]))
        .await
        .unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 5);
    let ops = r.op_responses();
    match &ops[1] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"x"),
        other => panic!("{other:?}"),
    }
    match &ops[2] {
        TxnOpResponse::Delete(d) => assert_eq!(d.deleted(), 1),
        other => panic!("{other:?}"),
    }
    match &ops[3] {
        TxnOpResponse::Txn(t) => assert!(
            t.succeeded(),
            "nested compares see the state before the txn"
        ),
        other => panic!("{other:?}"),
    }
    let n = c.get("n", None).await.unwrap();
    assert_eq!(n.kvs()[0].value(), b"nested");
    assert_eq!(n.kvs()[0].mod_revision(), 5);
}

#[tokio::test]
async fn txn_errors_are_etcds() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let e = c
        .txn(Txn::new().and_then([TxnOp::put("a", "1", None), TxnOp::put("a", "2", None)]))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request".into()
        )
    );
    let e = c
        .txn(Txn::new().and_then([
            TxnOp::put("b", "1", None),
            TxnOp::delete("a", Some(DeleteOptions::new().with_prefix())),
            TxnOp::put("a1", "1", None),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e).1,
        "etcdserver: duplicate key given in txn request"
    );
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    let e = c.txn(Txn::new().and_then(ops)).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request".into()
        )
    );
    let ops: Vec<TxnOp> = (0..128)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    assert!(c.txn(Txn::new().and_then(ops)).await.unwrap().succeeded());
    // A txn whose chosen branch names a missing lease fails as a whole.
    let e = c
        .txn(Txn::new().and_then([
            TxnOp::put("z1", "v", None),
            TxnOp::put("z2", "v", Some(PutOptions::new().with_lease(99))),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    assert!(c.get("z1", None).await.unwrap().kvs().is_empty());

    // Read-only Txns are served without raft, with the same revision checks.
    let rev = c
        .get("k0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let future = Txn::new().and_then([TxnOp::get(
        "k0",
        Some(GetOptions::new().with_revision(rev + 1)),
    )]);
    let e = c.txn(future).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    c.compact(rev, None).await.unwrap();
    let old = Txn::new()
        .when([Compare::version("k0", CompareOp::Equal, 2)])
        .or_else([TxnOp::get(
            "k0",
            Some(GetOptions::new().with_revision(rev - 1)),
        )]);
    let e = c.txn(old).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    // The compare holds, so the compacted read on the failure branch never runs.
    let old = Txn::new()
        .when([Compare::version("k0", CompareOp::Equal, 1)])
        .and_then([TxnOp::get("k0", None)])
        .or_else([TxnOp::get(
            "k0",
            Some(GetOptions::new().with_revision(rev - 1)),
        )]);
    let r = c.txn(old).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), rev);
    match &r.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"v"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn compaction() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    for i in 0..5 {
        c.put("k", format!("v{i}"), None).await.unwrap(); // revs 2..=6
    }
    let e = c.compact(100, None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    let r = c
        .compact(4, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    assert_eq!(r.header().unwrap().revision(), 6);
    let e = c
        .get("k", Some(GetOptions::new().with_revision(3)))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    // The compacted revision itself is still readable.
    let r = c
        .get("k", Some(GetOptions::new().with_revision(4)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"v2");
    let e = c.compact(4, None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e).1,
        "etcdserver: mvcc: required revision has been compacted"
    );
    let e = c
        .txn(Txn::new().and_then([TxnOp::get("k", Some(GetOptions::new().with_revision(2)))]))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e).1,
        "etcdserver: mvcc: required revision has been compacted"
    );
}

/// Reads key `k` at each revision of `history` and checks its value (`None`: absent).
async fn read_history(c: &mut etcd_client::Client, history: &[(i64, Option<String>)]) {
    for (rev, want) in history {
        let r = c
            .get("k", Some(GetOptions::new().with_revision(*rev)))
            .await
            .unwrap();
        let got = r
            .kvs()
            .first()
            .map(|kv| kv.value_str().unwrap().to_string());
        assert_eq!(&got, want, "k at revision {rev}");
        if let Some(kv) = r.kvs().first() {
            assert_eq!(kv.mod_revision(), *rev);
        }
    }
}

/// A key written far more often than an index record holds (`key_index::HEAD_MAX`
/// changes; older ones are sealed into history chunks): every revision of it reads
/// back, with a delete and a re-create in the middle, before and after a compaction.
#[tokio::test]
async fn a_long_key_history_reads_back_at_every_revision() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let mut history = Vec::new(); // (revision, value or None for deleted)
    for i in 0..150 {
        let rev = if i == 70 {
            let r = c.delete("k", None).await.unwrap();
            history.push((r.header().unwrap().revision(), None));
            continue;
        } else {
            let r = c.put("k", format!("v{i}"), None).await.unwrap();
            r.header().unwrap().revision()
        };
        history.push((rev, Some(format!("v{i}"))));
        // Another key between, so revisions of "k" are not contiguous.
        c.put("other", "x", None).await.unwrap();
    }
    read_history(&mut c, &history).await;
    // The first generation ended with the delete: the re-created key starts over.
    let now = c.get("k", None).await.unwrap();
    assert_eq!(now.kvs()[0].version(), 150 - 71);
    let (mid, _) = history[100];
    c.compact(mid, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    read_history(&mut c, &history[100..]).await;
    let e = c
        .get("k", Some(GetOptions::new().with_revision(mid - 1)))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_status(&e).1,
        "etcdserver: mvcc: required revision has been compacted"
    );
}

#[tokio::test]
async fn bad_input_gets_etcd_errors_and_server_keeps_serving() {
    let m = Member::start(Target::Pontoon);
    let mut c = m.client().await;
    let e = c.put("", "v", None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::InvalidArgument,
            "etcdserver: key is not provided".into()
        )
    );
    let e = c.get("", None).await.unwrap_err();
    assert_eq!(grpc_status(&e).1, "etcdserver: key is not provided");
    let e = c.delete("", None).await.unwrap_err();
    assert_eq!(grpc_status(&e).1, "etcdserver: key is not provided");
    // Over --max-request-bytes (1.5 MiB) but within gRPC's overhead allowance.
    let big = vec![b'x'; 1_600_000];
    let e = c.put("big", big, None).await.unwrap_err();
    assert_eq!(
        grpc_status(&e),
        (
            Code::InvalidArgument,
            "etcdserver: request is too large".into()
        )
    );
    // Far over: refused by the gRPC layer before decoding.
    let huge = vec![b'x'; 4 << 20];
    let e = c.put("huge", huge, None).await.unwrap_err();
    assert_eq!(grpc_status(&e).0, Code::OutOfRange, "{e:?}");
    // Just under the limit is fine.
    let ok = vec![b'x'; 1_500_000];
    c.put("ok", ok, None).await.unwrap();
    // Still serving.
    c.put("after", "v", None).await.unwrap();
    assert_eq!(c.get("after", None).await.unwrap().kvs()[0].value(), b"v");
}

#[tokio::test]
async fn periodic_auto_compaction_runs() {
    let m = Member::start_with(
        Target::Pontoon,
        &[
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1s",
        ],
    );
    let mut c = m.client().await;
    c.put("k", "v1", None).await.unwrap(); // rev 2
    c.put("k", "v2", None).await.unwrap(); // rev 3
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match c.get("k", Some(GetOptions::new().with_revision(2))).await {
            Err(e) => {
                assert_eq!(
                    grpc_status(&e).1,
                    "etcdserver: mvcc: required revision has been compacted"
                );
                break;
            }
            Ok(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                c.put("tick", "x", None).await.unwrap();
            }
            Ok(_) => panic!("history older than the 1s retention was never compacted"),
        }
    }
    // The latest value is never compacted away.
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v2");
}

/// Writes alternate between bursts of concurrent clients (large groups of committed
/// entries, applied by the apply thread) and a lone client (small groups, which the
/// raft thread may apply itself when the apply thread is idle): either way each write
/// is applied once, in log order. Checked from the history: revisions 2.. are
/// contiguous, one per acknowledged put, each client's puts in the order it made them,
/// and every acknowledged value is read back.
#[tokio::test]
async fn writes_apply_once_in_order_whoever_applies_them() {
    let m = Member::start(Target::Pontoon);
    let mut acked: Vec<(i64, String, String)> = Vec::new();
    for round in 0..4 {
        let mut burst = Vec::new();
        for w in 0..32 {
            let mut c = m.client().await;
            burst.push(tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0..5 {
                    let (k, v) = (format!("b{round}/w{w:02}/{i}"), format!("{round}.{w}.{i}"));
                    let r = c.put(k.as_str(), v.as_str(), None).await.unwrap();
                    done.push((r.header().unwrap().revision(), k, v));
                }
                done
            }));
        }
        for t in burst {
            let done = t.await.unwrap();
            assert!(
                done.windows(2).all(|p| p[0].0 < p[1].0),
                "one client's puts are applied in the order it made them: {done:?}"
            );
            acked.extend(done);
        }
        let mut c = m.client().await;
        for i in 0..20 {
            let (k, v) = (format!("s{round}/{i:02}"), format!("{round}.{i}"));
            let r = c.put(k.as_str(), v.as_str(), None).await.unwrap();
            acked.push((r.header().unwrap().revision(), k, v));
        }
    }
    acked.sort();
    let revs: Vec<i64> = acked.iter().map(|a| a.0).collect();
    let expected: Vec<i64> = (2..2 + acked.len() as i64).collect();
    assert_eq!(
        revs, expected,
        "one revision per put, none skipped or repeated"
    );
    let mut c = m.client().await;
    for (rev, k, v) in &acked {
        let g = c.get(k.as_str(), None).await.unwrap();
        let kv = &g.kvs()[0];
        assert_eq!((kv.mod_revision(), kv.value()), (*rev, v.as_bytes()), "{k}");
    }
}
