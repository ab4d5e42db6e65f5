//! Micro-benchmarks of the store's hot paths on the real engine and the real disk:
//! WAL append + fsync per batch (group commit), MVCC put / range on RocksDB, the apply
//! of one Ready's worth of committed entries, and watch fan-out from the hub.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raft::prelude::{Entry, HardState, SnapshotMetadata};

use pontoon_proto::etcdserverpb::{PutRequest, RangeRequest};
use pontoon_proto::internal::internal_request::Request as Op;
use pontoon_proto::internal::InternalRequest;
use pontoon_store::mvcc::MvccStore;
use pontoon_store::raft::wal::Wal;

fn wal_append_sync(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append_fsync");
    for batch in [1usize, 16, 256] {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::create(
            dir.path(),
            &SnapshotMetadata::default(),
            &HardState::default(),
        )
        .unwrap();
        let mut index = 0u64;
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| {
                let ents: Vec<Entry> = (0..batch)
                    .map(|_| {
                        index += 1;
                        Entry {
                            index,
                            term: 1,
                            data: vec![7u8; 300].into(),
                            ..Default::default()
                        }
                    })
                    .collect();
                wal.append(&ents).unwrap();
                wal.sync().unwrap();
            })
        });
    }
    g.finish();
}

fn mvcc_put_range(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(dir.path()).unwrap();
    let mut index = 0u64;
    let mut g = c.benchmark_group("mvcc");
    g.throughput(Throughput::Elements(1));
    g.bench_function("put_256B", |b| {
        b.iter(|| {
            index += 1;
            let req = InternalRequest {
                id: index,
                header: None,
                request: Some(Op::Put(PutRequest {
                    key: format!("/registry/pods/default/pod-{:06}", index % 100_000).into_bytes(),
                    value: vec![1u8; 256],
                    ..Default::default()
                })),
            };
            store.apply(index, &req).unwrap();
        })
    });
    let mut n = 0u64;
    g.bench_function("range_single_key", |b| {
        b.iter(|| {
            n += 1;
            let req = RangeRequest {
                key: format!("/registry/pods/default/pod-{:06}", n % index.max(1)).into_bytes(),
                ..Default::default()
            };
            store.range(&req).unwrap();
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("range_prefix_limit_100", |b| {
        b.iter(|| {
            let req = RangeRequest {
                key: b"/registry/pods/".to_vec(),
                range_end: b"/registry/pods0".to_vec(),
                limit: 100,
                ..Default::default()
            };
            store.range(&req).unwrap();
        })
    });
    g.finish();
}

/// The apply thread's work for one Ready: decode each committed entry and apply it to
/// the MVCC store, as `raft::node::Applier` does (a batch of 64 puts of 256 bytes).
fn apply_ready_batch(c: &mut Criterion) {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(dir.path()).unwrap();
    let mut index = 0u64;
    let mut g = c.benchmark_group("apply");
    const BATCH: usize = 64;
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("ready_64_puts", |b| {
        b.iter(|| {
            let entries: Vec<Vec<u8>> = (0..BATCH)
                .map(|i| {
                    InternalRequest {
                        id: index + i as u64 + 1,
                        header: None,
                        request: Some(Op::Put(PutRequest {
                            key: format!(
                                "/registry/pods/default/pod-{:06}",
                                (index + i as u64) % 10_000
                            )
                            .into_bytes(),
                            value: vec![1u8; 256],
                            ..Default::default()
                        })),
                    }
                    .encode_to_vec()
                })
                .collect();
            for data in entries {
                index += 1;
                let req = InternalRequest::decode(&data[..]).unwrap();
                store.apply(index, &req).unwrap();
            }
        })
    });
    g.finish();
}

/// One revision published to the watch hub and read by W watcher cursors, each
/// filtering the revision's events by its key (a put to one of W keys).
fn watch_fanout(c: &mut Criterion) {
    use pontoon_store::mvcc::Change;
    use pontoon_store::watch::WatchHub;
    let mut g = c.benchmark_group("watch_fanout");
    for watchers in [1usize, 100, 1000] {
        let hub = WatchHub::new(1);
        let keys: Vec<Vec<u8>> = (0..watchers)
            .map(|w| format!("/k/{w:06}").into_bytes())
            .collect();
        let mut rev = 1i64;
        g.throughput(Throughput::Elements(watchers as u64));
        g.bench_with_input(BenchmarkId::from_parameter(watchers), &watchers, |b, _| {
            b.iter(|| {
                rev += 1;
                let key = keys[rev as usize % keys.len()].clone();
                hub.publish(vec![Change {
                    rev: pontoon_store::mvcc::revision::Revision::new(rev, 0),
                    kv: pontoon_proto::mvccpb::KeyValue {
                        key,
                        mod_revision: rev,
                        value: vec![1u8; 256],
                        ..Default::default()
                    },
                    tombstone: false,
                    prev: None,
                }]);
                let mut delivered = 0usize;
                for k in &keys {
                    for p in hub.recent(rev, rev).expect("in the ring") {
                        delivered += p.changes.iter().filter(|c| &c.kv.key == k).count();
                    }
                }
                assert_eq!(delivered, 1);
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    wal_append_sync,
    mvcc_put_range,
    apply_ready_batch,
    watch_fanout
);
criterion_main!(benches);
