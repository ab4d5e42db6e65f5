//! Limits that keep one client from exhausting a member: a cap on the bytes one Range
//! answers with, on the watchers one stream holds, and on request size. A request
//! over a limit gets a clear error; the member and other clients carry on.

mod common;

use etcd_client::{GetOptions, Txn, TxnOp, WatchOptions};

use common::{grpc_status, Member, Target};

#[tokio::test]
async fn a_range_over_the_response_cap_is_refused_and_paging_works() {
    let m = Member::start_with(Target::Pontoon, &["--max-range-response-bytes=8192"]);
    let mut c = m.client().await;
    let value = "v".repeat(200);
    for i in 0..100 {
        c.put(format!("/big/{i:03}"), value.clone(), None)
            .await
            .unwrap();
    }
    let e = c
        .get("/big/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap_err();
    let (code, msg) = grpc_status(&e);
    assert_eq!(code, tonic::Code::ResourceExhausted);
    assert!(msg.contains("range response is too large"), "{msg}");
    // Counting, keys only and pages under the cap still work.
    let r = c
        .get(
            "/big/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(r.count(), 100);
    let r = c
        .get(
            "/big/",
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    assert_eq!(r.kvs().len(), 100);
    let mut seen = 0;
    let mut from = "/big/".to_string();
    loop {
        let r = c
            .get(
                from.clone(),
                Some(GetOptions::new().with_range("/big0").with_limit(20)),
            )
            .await
            .unwrap();
        seen += r.kvs().len();
        if !r.more() {
            break;
        }
        from = format!("{}\0", r.kvs().last().unwrap().key_str().unwrap());
    }
    assert_eq!(seen, 100);
    // A read-only Txn is a read served by this member alone: capped like a Range.
    let all = || Some(GetOptions::new().with_prefix());
    let t = Txn::new().and_then([TxnOp::get("/big/", all())]);
    let (code, msg) = grpc_status(&c.txn(t).await.unwrap_err());
    assert_eq!(code, tonic::Code::ResourceExhausted);
    assert!(msg.contains("range response is too large"), "{msg}");
    // The ranges of a Txn that writes are not capped: it applies on every member,
    // which must all compute the same answer.
    let t = Txn::new().and_then([TxnOp::get("/big/", all()), TxnOp::put("/w", "v", None)]);
    let r = c.txn(t).await.unwrap();
    match &r.op_responses()[0] {
        etcd_client::TxnOpResponse::Get(g) => assert_eq!(g.kvs().len(), 100),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_stream_holds_at_most_the_watcher_cap() {
    let m = Member::start_with(Target::Pontoon, &["--max-watchers-per-stream=3"]);
    let mut c = m.client().await;
    let mut stream = c.watch("w0", None).await.unwrap();
    assert!(stream.message().await.unwrap().unwrap().created());
    for key in ["w1", "w2"] {
        stream.watch(key, None).await.unwrap();
        let r = stream.message().await.unwrap().unwrap();
        assert!(r.created() && !r.canceled(), "{r:?}");
    }
    stream
        .watch("w3", Some(WatchOptions::new().with_watch_id(42)))
        .await
        .unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert!(r.created() && r.canceled(), "{r:?}");
    assert!(r.cancel_reason().contains("too many watchers"), "{r:?}");
    // The three watchers on this stream still deliver; other streams are unaffected.
    let mut other = c.watch("w3", None).await.unwrap();
    assert!(other.message().await.unwrap().unwrap().created());
    c.put("w1", "x", None).await.unwrap();
    c.put("w3", "y", None).await.unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert_eq!(r.events()[0].kv().unwrap().key(), b"w1");
    let r = other.message().await.unwrap().unwrap();
    assert_eq!(r.events()[0].kv().unwrap().key(), b"w3");
}

#[tokio::test]
async fn an_oversized_request_is_refused_without_harm() {
    let m = Member::start_with(Target::Pontoon, &["--max-request-bytes=4096"]);
    let mut c = m.client().await;
    let e = c.put("huge", vec![0u8; 8192], None).await.unwrap_err();
    let (code, msg) = grpc_status(&e);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert_eq!(msg, "etcdserver: request is too large");
    c.put("small", "ok", None).await.unwrap();
    assert_eq!(c.get("small", None).await.unwrap().kvs().len(), 1);
}
