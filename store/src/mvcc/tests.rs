//! The MVCC store on a real RocksDB in a temporary directory.

use pontoon_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pontoon_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use pontoon_proto::etcdserverpb::request_op::Request;
use pontoon_proto::etcdserverpb::response_op::Response;
use pontoon_proto::etcdserverpb::*;
use pontoon_proto::internal::internal_request::Request as Op;
use pontoon_proto::internal::InternalRequest;

use super::*;

struct Harness {
    _dir: tempfile::TempDir,
    store: MvccStore,
    index: u64,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = MvccStore::open(dir.path()).unwrap();
        Harness {
            _dir: dir,
            store,
            index: 0,
        }
    }

    fn apply(&mut self, op: Op) -> Result<ApplyResponse> {
        self.index += 1;
        let req = InternalRequest {
            id: self.index,
            request: Some(op),
            header: None,
        };
        self.store.apply(self.index, &req).unwrap().response
    }

    fn must_put(&mut self, k: &str, v: &str) -> PutResponse {
        match self.apply(Op::Put(PutRequest {
            key: k.into(),
            value: v.into(),
            prev_kv: true,
            ..Default::default()
        })) {
            Ok(ApplyResponse::Put(p)) => p,
            other => panic!("put {k}: {other:?}"),
        }
    }

    fn must_delete(&mut self, k: &str, end: &str) -> DeleteRangeResponse {
        match self.apply(Op::DeleteRange(DeleteRangeRequest {
            key: k.into(),
            range_end: end.into(),
            prev_kv: true,
        })) {
            Ok(ApplyResponse::DeleteRange(d)) => d,
            other => panic!("delete {k}: {other:?}"),
        }
    }

    fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.store.range(&req)
    }

    fn get(&self, k: &str, rev: i64) -> Option<KeyValue> {
        self.range(RangeRequest {
            key: k.into(),
            revision: rev,
            ..Default::default()
        })
        .unwrap()
        .kvs
        .pop()
    }
}

fn keys(r: &RangeResponse) -> Vec<String> {
    r.kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect()
}

#[test]
fn revisions_versions_and_generations_follow_etcd() {
    let mut h = Harness::new();
    assert_eq!(h.store.current_revision(), 1);
    let p = h.must_put("foo", "a");
    assert_eq!(p.header.unwrap().revision, 2);
    assert_eq!(p.prev_kv, None);
    let p = h.must_put("foo", "b");
    assert_eq!(p.header.unwrap().revision, 3);
    assert_eq!(p.prev_kv.unwrap().value, b"a");
    let kv = h.get("foo", 0).unwrap();
    assert_eq!(
        (
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.value.as_slice()
        ),
        (2, 3, 2, &b"b"[..])
    );
    let d = h.must_delete("foo", "");
    assert_eq!((d.deleted, d.header.unwrap().revision), (1, 4));
    assert_eq!(h.get("foo", 0), None);
    // Deleting nothing does not advance the revision.
    let d = h.must_delete("foo", "");
    assert_eq!((d.deleted, d.header.unwrap().revision), (0, 4));
    h.must_put("foo", "c");
    let kv = h.get("foo", 0).unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (5, 5, 1));
    // History stays readable.
    assert_eq!(h.get("foo", 2).unwrap().value, b"a");
    assert_eq!(h.get("foo", 4), None);
    assert!(matches!(
        h.range(RangeRequest {
            key: "foo".into(),
            revision: 6,
            ..Default::default()
        }),
        Err(Error::FutureRev)
    ));
}

#[test]
fn range_limit_count_sort_and_filters() {
    let mut h = Harness::new();
    for (k, v) in [("a", "3"), ("b", "1"), ("c", "2"), ("d", "0")] {
        h.must_put(k, v);
    }
    h.must_put("b", "9");
    let all = |extra: RangeRequest| {
        h.range(RangeRequest {
            key: "a".into(),
            range_end: "\0".into(),
            ..extra
        })
        .unwrap()
    };
    let r = all(RangeRequest {
        limit: 2,
        ..Default::default()
    });
    assert_eq!(
        (keys(&r), r.more, r.count),
        (vec!["a".into(), "b".into()], true, 4)
    );
    let r = all(RangeRequest {
        count_only: true,
        ..Default::default()
    });
    assert_eq!((r.kvs.len(), r.count), (0, 4));
    let r = all(RangeRequest {
        sort_target: SortTarget::Value as i32,
        ..Default::default()
    });
    assert_eq!(keys(&r), vec!["d", "c", "a", "b"]);
    let r = all(RangeRequest {
        sort_order: SortOrder::Descend as i32,
        limit: 3,
        ..Default::default()
    });
    assert_eq!(
        (keys(&r), r.more),
        (vec!["d".into(), "c".into(), "b".into()], true)
    );
    let r = all(RangeRequest {
        min_mod_revision: 4,
        ..Default::default()
    });
    assert_eq!(keys(&r), vec!["b", "c", "d"]);
    assert_eq!(r.count, 4, "count is taken before filters, as in etcd");
    let r = all(RangeRequest {
        max_create_revision: 3,
        keys_only: true,
        ..Default::default()
    });
    assert_eq!(keys(&r), vec!["a", "b"]);
    assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
    let r = h
        .range(RangeRequest {
            key: "b".into(),
            range_end: "d".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(keys(&r), vec!["b", "c"]);
    let r = h
        .range(RangeRequest {
            key: "d".into(),
            range_end: "b".into(),
            ..Default::default()
        })
        .unwrap();
    assert!(r.kvs.is_empty());
}

fn cmp(key: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> Compare {
    Compare {
        key: key.into(),
        target: target as i32,
        result: result as i32,
        target_union: Some(u),
        range_end: vec![],
    }
}

fn put_op(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    }
}

fn get_op(k: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: k.into(),
            ..Default::default()
        })),
    }
}

#[test]
fn txn_compares_branches_and_sees_its_own_writes() {
    let mut h = Harness::new();
    h.must_put("k", "v1");
    let txn = TxnRequest {
        compare: vec![cmp(
            "k",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value("v1".into()),
        )],
        success: vec![put_op("k", "v2"), get_op("k"), put_op("other", "x")],
        failure: vec![get_op("k")],
    };
    let Ok(ApplyResponse::Txn(r)) = h.apply(Op::Txn(txn.clone())) else {
        panic!()
    };
    assert!(r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3);
    let Some(Response::ResponseRange(rr)) = &r.responses[1].response else {
        panic!()
    };
    assert_eq!(rr.kvs[0].value, b"v2");
    assert_eq!(h.get("other", 0).unwrap().mod_revision, 3);
    // Same compare now fails: the failure branch only reads, the revision stays.
    let Ok(ApplyResponse::Txn(r)) = h.apply(Op::Txn(txn)) else {
        panic!()
    };
    assert!(!r.succeeded);
    assert_eq!(r.header.unwrap().revision, 3);
    // A compare on a missing key: VALUE is false, VERSION compares against 0.
    let missing = TxnRequest {
        compare: vec![cmp(
            "nope",
            CompareTarget::Version,
            CompareResult::Equal,
            TargetUnion::Version(0),
        )],
        ..Default::default()
    };
    let Ok(ApplyResponse::Txn(r)) = h.apply(Op::Txn(missing)) else {
        panic!()
    };
    assert!(r.succeeded);
    // A compare over a range: every key must match.
    let ranged = TxnRequest {
        compare: vec![Compare {
            range_end: "\0".into(),
            ..cmp(
                "a",
                CompareTarget::Mod,
                CompareResult::Greater,
                TargetUnion::ModRevision(1),
            )
        }],
        ..Default::default()
    };
    let Ok(ApplyResponse::Txn(r)) = h.apply(Op::Txn(ranged)) else {
        panic!()
    };
    assert!(r.succeeded);
}

#[test]
fn put_with_unknown_lease_fails_whole_txn_without_changes() {
    let mut h = Harness::new();
    let bad = TxnRequest {
        success: vec![
            put_op("a", "1"),
            RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: "b".into(),
                    lease: 42,
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    assert!(matches!(h.apply(Op::Txn(bad)), Err(Error::LeaseNotFound)));
    assert_eq!(h.store.current_revision(), 1);
    assert_eq!(h.get("a", 0), None);
    assert!(matches!(
        h.apply(Op::Put(PutRequest {
            key: "a".into(),
            ignore_value: true,
            ..Default::default()
        })),
        Err(Error::KeyNotFound)
    ));
    assert_eq!(
        h.store.applied_index(),
        2,
        "failed entries still count as applied"
    );
}

#[test]
fn compaction_drops_history_but_keeps_current_values() {
    let mut h = Harness::new();
    h.must_put("a", "1"); // 2
    h.must_put("a", "2"); // 3
    h.must_put("b", "1"); // 4
    h.must_delete("b", ""); // 5
    h.must_put("c", "1"); // 6
    let compact = |h: &mut Harness, rev| {
        h.apply(Op::Compaction(CompactionRequest {
            revision: rev,
            physical: true,
        }))
    };
    assert!(matches!(compact(&mut h, 7), Err(Error::FutureRev)));
    assert!(compact(&mut h, 5).is_ok());
    assert!(matches!(compact(&mut h, 5), Err(Error::Compacted)));
    assert!(matches!(compact(&mut h, 3), Err(Error::Compacted)));
    assert_eq!(h.store.compact_revision(), 5);
    assert!(matches!(
        h.range(RangeRequest {
            key: "a".into(),
            revision: 4,
            ..Default::default()
        }),
        Err(Error::Compacted)
    ));
    assert_eq!(h.get("a", 5).unwrap().value, b"2");
    assert_eq!(h.get("b", 5), None);
    assert_eq!(h.get("c", 0).unwrap().value, b"1");
    // The dropped revisions are physically gone: 3 (a), 6 (c) and the tombstone
    // made exactly at the compacted revision (b at 5) remain.
    let remaining = |h: &Harness| {
        h.store
            .db
            .iterator_cf(h.store.cf(CF_REV), rocksdb::IteratorMode::Start)
            .count()
    };
    assert_eq!(remaining(&h), 3);
    // The next compaction drops that tombstone too.
    assert!(compact(&mut h, 6).is_ok());
    assert_eq!(remaining(&h), 2);
    assert_eq!(h.get("b", 6), None);
}

#[test]
fn state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = MvccStore::open(dir.path()).unwrap();
        let put = |i: u64, k: &str| InternalRequest {
            id: i,
            header: None,
            request: Some(Op::Put(PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        };
        store.apply(1, &put(1, "x")).unwrap();
        store.apply(2, &put(2, "y")).unwrap();
        store.apply_noop(3);
        store.sync().unwrap();
    }
    let store = MvccStore::open(dir.path()).unwrap();
    assert_eq!(store.current_revision(), 3);
    assert_eq!(store.applied_index(), 3);
    let r = store
        .range(&RangeRequest {
            key: "x".into(),
            range_end: "z".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(r.count, 2);
}

/// A small deterministic generator for the randomized tests.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A random write entry over 12 keys: puts (values, `ignore_value`, onto and off
/// leases 100 and 200), single and ranged deletes, multi-key Txns that write a key
/// twice and read it, lease revokes and compactions (`compacted` is the last compaction
/// revision asked for; `current` the store's revision).
fn random_op(rng: &mut Lcg, i: usize, current: i64, compacted: &mut i64) -> Op {
    let key = format!("k{}", rng.next(12));
    match rng.next(20) {
        0..=9 => Op::Put(PutRequest {
            key: key.into(),
            value: format!("v{i}").into(),
            prev_kv: rng.next(2) == 0,
            lease: [0, 0, 100, 200][rng.next(4) as usize],
            ..Default::default()
        }),
        10 => Op::Put(PutRequest {
            key: key.into(),
            ignore_value: true,
            prev_kv: true,
            ..Default::default()
        }),
        11..=13 => Op::DeleteRange(DeleteRangeRequest {
            key: key.into(),
            range_end: if rng.next(3) == 0 {
                b"k5".to_vec()
            } else {
                Vec::new()
            },
            prev_kv: true,
        }),
        14..=17 => Op::Txn(TxnRequest {
            compare: vec![cmp(
                &key,
                CompareTarget::Version,
                CompareResult::Greater,
                TargetUnion::Version(1),
            )],
            success: vec![put_op(&key, "t1"), get_op(&key), put_op(&key, "t2")],
            failure: vec![
                put_op(&key, "f1"),
                put_op("k0", "f2"),
                // All keys as of a few revisions back: a read of history the
                // preceding entries may have just written.
                RequestOp {
                    request: Some(Request::RequestRange(RangeRequest {
                        key: b"k".to_vec(),
                        range_end: b"l".to_vec(),
                        revision: (current - rng.next(4) as i64).max(*compacted).max(1),
                        ..Default::default()
                    })),
                },
            ],
        }),
        18 => Op::LeaseRevoke(LeaseRevokeRequest {
            id: [100, 200][rng.next(2) as usize],
        }),
        // Mostly puts to one hot key, whose history outgrows its index record and is
        // sealed into chunks (small records in unit tests: `key_index::HEAD_MAX`).
        _ if rng.next(4) != 0 => Op::Put(PutRequest {
            key: b"hot".to_vec(),
            value: format!("h{i}").into(),
            prev_kv: true,
            ..Default::default()
        }),
        _ => {
            *compacted = (*compacted + 1).max(current - rng.next(20) as i64);
            Op::Compaction(CompactionRequest {
                revision: (*compacted).min(current),
                physical: true,
            })
        }
    }
}

/// Two fresh stores with leases 100 and 200, for the randomized comparisons, and a
/// generator seeded with `seed`.
fn twin_stores(seed: u64) -> (Harness, Harness, Lcg) {
    let (mut a, mut b) = (Harness::new(), Harness::new());
    for lease in [100, 200] {
        for h in [&mut a, &mut b] {
            h.apply(Op::LeaseGrant(LeaseGrantRequest { id: lease, ttl: 60 }))
                .unwrap();
        }
    }
    (a, b, Lcg(seed))
}

fn all_keys(h: &Harness) -> Vec<KeyValue> {
    h.range(RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    })
    .unwrap()
    .kvs
}

/// One column family's records, raw.
type RawCf = Vec<(Box<[u8]>, Box<[u8]>)>;

/// Every record of the given column families.
fn raw_cfs(h: &Harness, cfs: &[&str]) -> Vec<RawCf> {
    cfs.iter()
        .map(|cf| {
            h.store
                .db
                .iterator_cf(h.store.cf(cf), rocksdb::IteratorMode::Start)
                .map(|kv| kv.unwrap())
                .collect()
        })
        .collect()
}

/// The hot-key cache changes no answer: the same random mix ([`random_op`]) applied to
/// a store whose cache is emptied before every entry (so every read goes to RocksDB)
/// gives identical responses and identical column families.
#[test]
fn hot_key_cache_gives_the_engines_answers() {
    let (mut cached, mut cold, mut rng) = twin_stores(7);
    let mut compacted = 0;
    let mut used = 0;
    for i in 0..3000 {
        let op = random_op(&mut rng, i, cold.store.current_revision(), &mut compacted);
        cold.store.hot().clear();
        let a = cached.apply(op.clone());
        let b = cold.apply(op.clone());
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "entry {i}: {op:?}");
        used = used.max(cached.store.hot().len());
    }
    assert!(used > 5, "the cache was used: at most {used} keys");
    assert_eq!(all_keys(&cached), all_keys(&cold));
    // And the same bytes underneath: no stale index (say, one the compaction trimmed)
    // was written back from the cache.
    let cfs = [CF_INDEX, CF_REV, CF_LEASE];
    assert_eq!(raw_cfs(&cached, &cfs), raw_cfs(&cold, &cfs));
}

/// The same mix applied in apply rounds of random length (`apply_batched`, then
/// `flush_round`; lease revokes and compactions write the round before them) gives
/// each entry the answer and the changes it gets when applied alone, and the same
/// bytes in every column family. Until a round is written nothing of it is visible:
/// not the revision, not the applied index, not a key.
#[test]
fn apply_rounds_give_the_answers_of_entries_applied_one_by_one() {
    let (mut rounds, mut alone, mut rng) = twin_stores(11);
    let mut compacted = 0;
    let mut pending = 0;
    let (mut seen_rev, mut seen_index, mut seen_keys) = (0, 0, Vec::new());
    let mut longest = 0;
    for i in 0..3000 {
        let op = random_op(&mut rng, i, alone.store.current_revision(), &mut compacted);
        if pending == 0 {
            seen_rev = rounds.store.current_revision();
            seen_index = rounds.store.applied_index();
            seen_keys = all_keys(&rounds);
        }
        rounds.index += 1;
        alone.index += 1;
        let req = InternalRequest {
            id: rounds.index,
            request: Some(op.clone()),
            header: None,
        };
        let b = alone.store.apply(alone.index, &req).unwrap();
        let a = rounds.store.apply_batched(rounds.index, &req).unwrap();
        // The answer and the changes handed to watchers.
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "entry {i}: {op:?}");
        if rounds.store.round_pending() {
            pending += 1;
            longest = longest.max(pending);
            assert_eq!(rounds.store.current_revision(), seen_rev, "entry {i}");
            assert_eq!(rounds.store.applied_index(), seen_index, "entry {i}");
            if rng.next(8) == 0 {
                assert_eq!(all_keys(&rounds), seen_keys, "entry {i}: published early");
            }
            if rng.next(30) == 0 {
                rounds.store.flush_round().unwrap();
                pending = 0;
            }
        } else {
            pending = 0;
        }
        if pending == 0 {
            assert_eq!(
                rounds.store.current_revision(),
                alone.store.current_revision()
            );
            assert_eq!(rounds.store.applied_index(), alone.store.applied_index());
        }
    }
    rounds.store.flush_round().unwrap();
    assert!(
        longest >= 10,
        "rounds of many entries were tried: {longest}"
    );
    assert_eq!(all_keys(&rounds), all_keys(&alone));
    let cfs = [CF_INDEX, CF_REV, CF_LEASE, CF_META];
    assert_eq!(raw_cfs(&rounds, &cfs), raw_cfs(&alone, &cfs));
}

/// A round that was not written is not in the engine after a restart: the store
/// reopens at the last written entry, and the applied index says replay starts after
/// it.
#[test]
fn an_unwritten_round_is_replayed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let put = |k: &str| InternalRequest {
        id: 0,
        request: Some(Op::Put(PutRequest {
            key: k.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
        header: None,
    };
    {
        let store = MvccStore::open(dir.path()).unwrap();
        store.apply(1, &put("a")).unwrap();
        store.apply_batched(2, &put("b")).unwrap();
        store.apply_batched(3, &put("c")).unwrap();
        assert!(store.round_pending());
        // Dropped as a crash would leave it: the round never reached the engine.
    }
    let store = MvccStore::open(dir.path()).unwrap();
    assert_eq!(store.applied_index(), 1);
    assert_eq!(store.current_revision(), 2);
    let all = store
        .range(&RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(keys(&all), ["a"]);
    // Replay from the raft log gives the same revisions as the first time.
    store.apply_batched(2, &put("b")).unwrap();
    let c = store.apply_batched(3, &put("c")).unwrap();
    store.flush_round().unwrap();
    match c.response {
        Ok(ApplyResponse::Put(p)) => assert_eq!(p.header.unwrap().revision, 4),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.applied_index(), 3);
}

/// A key written far more often than its index record holds (unit tests seal past 8
/// changes) answers at every revision exactly as written, through reads at old
/// revisions, watch catch-up with `prev_kv`, Txns inside an apply round, compaction
/// and a restart; compaction drops the sealed chunks with the history.
#[test]
fn a_key_with_a_long_history_answers_at_every_revision() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness {
        store: MvccStore::open(dir.path()).unwrap(),
        _dir: tempfile::tempdir().unwrap(),
        index: 0,
    };
    // expected[r]: the value of "hot" at revision r (None: absent).
    let mut expected: Vec<Option<String>> = vec![None, None];
    for i in 0..300 {
        if i % 50 == 49 {
            h.must_delete("hot", "");
            expected.push(None);
        } else if i % 7 == 0 {
            h.must_put("cold", &format!("c{i}"));
            let last = expected.last().unwrap().clone();
            expected.push(last);
        } else {
            h.must_put("hot", &format!("v{i}"));
            expected.push(Some(format!("v{i}")));
        }
    }
    let current = h.store.current_revision();
    assert_eq!(current as usize, expected.len() - 1);
    let raw = h
        .store
        .db
        .get_cf(h.store.cf(CF_INDEX), b"hot")
        .unwrap()
        .unwrap();
    let head = KeyIndex::decode(&raw).unwrap();
    assert!(head.has_older() && head.changes().len() <= key_index::HEAD_MAX);
    let value_at = |h: &Harness, r: i64| {
        h.get("hot", r)
            .map(|kv| String::from_utf8(kv.value).unwrap())
    };
    for r in 1..=current {
        assert_eq!(value_at(&h, r), expected[r as usize], "revision {r}");
    }

    // Watch catch-up from far back, with prev_kv.
    let (changes, _) = h
        .store
        .changes_between(2, current, usize::MAX, true)
        .unwrap();
    for c in changes.iter().filter(|c| c.kv.key == b"hot") {
        let prev = c
            .prev
            .as_ref()
            .map(|kv| String::from_utf8(kv.value.clone()).unwrap());
        assert_eq!(
            prev,
            expected[c.rev.main as usize - 1],
            "prev of {}",
            c.rev.main
        );
    }

    // Inside an apply round: puts that seal, then a Txn reading far back.
    let back = current - 40;
    for i in 0..30 {
        h.index += 1;
        let req = InternalRequest {
            id: h.index,
            request: Some(Op::Put(PutRequest {
                key: b"hot".to_vec(),
                value: format!("r{i}").into(),
                ..Default::default()
            })),
            header: None,
        };
        h.store.apply_batched(h.index, &req).unwrap();
        expected.push(Some(format!("r{i}")));
    }
    h.index += 1;
    let txn = InternalRequest {
        id: h.index,
        request: Some(Op::Txn(TxnRequest {
            success: vec![RequestOp {
                request: Some(Request::RequestRange(RangeRequest {
                    key: b"hot".to_vec(),
                    revision: back,
                    ..Default::default()
                })),
            }],
            ..Default::default()
        })),
        header: None,
    };
    let applied = h.store.apply_batched(h.index, &txn).unwrap();
    h.store.flush_round().unwrap();
    let Ok(ApplyResponse::Txn(t)) = applied.response else {
        panic!("{:?}", applied.response)
    };
    let Some(Response::ResponseRange(r)) = &t.responses[0].response else {
        panic!("{t:?}")
    };
    let got = r
        .kvs
        .first()
        .map(|kv| String::from_utf8(kv.value.clone()).unwrap());
    assert_eq!(got, expected[back as usize]);

    // Compaction keeps what is visible at and after it, sealed or not.
    let current = h.store.current_revision();
    let at = 120;
    h.apply(Op::Compaction(CompactionRequest {
        revision: at,
        physical: true,
    }))
    .unwrap();
    for r in at..=current {
        assert_eq!(
            value_at(&h, r),
            expected[r as usize],
            "revision {r} after compaction"
        );
    }
    assert!(h
        .range(RangeRequest {
            key: b"hot".to_vec(),
            revision: at - 1,
            ..Default::default()
        })
        .is_err());

    // After a restart too.
    drop(h.store);
    h.store = MvccStore::open(dir.path()).unwrap();
    for r in at..=current {
        assert_eq!(
            value_at(&h, r),
            expected[r as usize],
            "revision {r} after reopen"
        );
    }

    // Compacting everything leaves no chunk behind.
    h.apply(Op::Compaction(CompactionRequest {
        revision: current,
        physical: true,
    }))
    .unwrap();
    let chunks = h
        .store
        .db
        .iterator_cf(h.store.cf(CF_HISTORY), rocksdb::IteratorMode::Start)
        .count();
    assert_eq!(chunks, 0);
    assert_eq!(value_at(&h, current), expected[current as usize]);
}
