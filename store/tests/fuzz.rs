//! Fuzzing the request decoders, time-bounded so it runs in the default suite.
//!
//! Byte strings are mutated (flips, insertions, deletions, splices) from a corpus of
//! valid requests and fed to everything that decodes untrusted input:
//!
//! - protobuf decoding of client requests (KV, Txn, Watch, Lease, Auth, Cluster) and of
//!   raft log entries (`InternalRequest`), then the server's validation and the state
//!   machine's apply, exactly as a request travels: a decoded write that passes
//!   validation must apply without stopping the member (only deterministic answers);
//! - the gateway's JSON decoding of the same messages;
//! - the auth permission check on arbitrary keys and ranges.
//!
//! A panic anywhere fails the test. `PONTOON_FUZZ_SECS` (default 6) sets the time;
//! `PONTOON_FUZZ_SEED` reproduces a run.

use std::time::{Duration, Instant};

use prost::Message;

use pontoon_proto::authpb::permission::Type as PermType;
use pontoon_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pontoon_proto::etcdserverpb::request_op::Request as Op;
use pontoon_proto::etcdserverpb::*;
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::internal::{AuthHeader, InternalRequest};
use pontoon_store::auth::{AuthInfo, AuthState};
use pontoon_store::mvcc::MvccStore;
use pontoon_store::server::validate;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let put = PutRequest {
        key: b"/registry/pods/a".to_vec(),
        value: b"v".repeat(40),
        lease: 0,
        prev_kv: true,
        ..Default::default()
    };
    let txn = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: b"/registry/pods/a".to_vec(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::ModRevision(3)),
        }],
        success: vec![
            RequestOp {
                request: Some(Op::RequestPut(put.clone())),
            },
            RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key: b"/registry/".to_vec(),
                    range_end: b"/registry0".to_vec(),
                    limit: 5,
                    ..Default::default()
                })),
            },
        ],
        failure: vec![RequestOp {
            request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: b"\0".to_vec(),
                prev_kv: true,
            })),
        }],
    };
    let entry = |op: InternalOp| {
        InternalRequest {
            id: 7,
            header: Some(AuthHeader {
                username: "alice".into(),
                auth_revision: 3,
            }),
            request: Some(op),
        }
        .encode_to_vec()
    };
    vec![
        put.encode_to_vec(),
        txn.encode_to_vec(),
        RangeRequest {
            key: b"k".to_vec(),
            range_end: b"\0".to_vec(),
            revision: 2,
            sort_order: 1,
            sort_target: 3,
            ..Default::default()
        }
        .encode_to_vec(),
        WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: b"k".to_vec(),
                    range_end: b"l".to_vec(),
                    start_revision: 1,
                    prev_kv: true,
                    ..Default::default()
                },
            )),
        }
        .encode_to_vec(),
        entry(InternalOp::Put(put.clone())),
        entry(InternalOp::Txn(txn)),
        entry(InternalOp::RoleGrantPermission(
            AuthRoleGrantPermissionRequest {
                name: "app".into(),
                perm: Some(pontoon_proto::authpb::Permission {
                    perm_type: 2,
                    key: b"a".to_vec(),
                    range_end: b"b".to_vec(),
                }),
            },
        )),
        entry(InternalOp::UserAdd(AuthUserAddRequest {
            name: "bob".into(),
            hashed_password: "$2b$04$abcdefghijklmnopqrstuu".into(),
            ..Default::default()
        })),
        entry(InternalOp::LeaseGrant(LeaseGrantRequest { ttl: 10, id: 5 })),
        entry(InternalOp::Compaction(CompactionRequest {
            revision: 2,
            physical: false,
        })),
        AuthenticateRequest {
            name: "root".into(),
            password: "pw".into(),
        }
        .encode_to_vec(),
        MemberAddRequest {
            peer_ur_ls: vec!["http://127.0.0.1:2380".into()],
            is_learner: true,
        }
        .encode_to_vec(),
    ]
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(b.len() + 1);
                b.insert(i, rng.next() as u8);
            }
            2 if !b.is_empty() => {
                let i = rng.below(b.len());
                b.remove(i);
            }
            3 => {
                // Splice in a slice of another seed (nested structure).
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len());
                let to = from + rng.below(other.len() - from + 1);
                let at = rng.below(b.len() + 1);
                b.splice(at..at, other[from..to].iter().copied());
            }
            _ if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = [0x00, 0x7f, 0x80, 0xff][rng.below(4)];
            }
            _ => {}
        }
    }
    b
}

fn auth_state() -> AuthState {
    let mut s = AuthState::default();
    s.user_add(&AuthUserAddRequest {
        name: "root".into(),
        hashed_password: "h".into(),
        ..Default::default()
    })
    .unwrap();
    s.user_grant_role("root", "root").unwrap();
    s.user_add(&AuthUserAddRequest {
        name: "alice".into(),
        hashed_password: "h".into(),
        ..Default::default()
    })
    .unwrap();
    s.role_add("app").unwrap();
    s.user_grant_role("alice", "app").unwrap();
    s.enable().unwrap();
    s
}

#[test]
fn decoders_validation_and_apply_survive_mutated_input() {
    let secs: u64 = std::env::var("PONTOON_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let seed: u64 = std::env::var("PONTOON_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fuzz seed {seed} (PONTOON_FUZZ_SEED={seed} reproduces)");
    let mut rng = Rng(seed);
    let corpus = corpus();
    let dir = tempfile::tempdir().unwrap();
    let store = MvccStore::open(dir.path()).unwrap();
    let auth = auth_state();
    let mut index = 1u64;
    let (mut decoded, mut applied, mut runs) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        runs += 1;
        let bytes = mutate(&mut rng, &corpus);
        // Client requests: decode, validate as the services do.
        if let Ok(r) = RangeRequest::decode(&bytes[..]) {
            decoded += 1;
            if validate::check_range(&r).is_ok() {
                let _ = store.range(&r);
            }
            let who = AuthInfo {
                username: "alice".into(),
                revision: auth.revision,
            };
            let _ = auth.check(&who, &r.key, &r.range_end, PermType::Read);
        }
        if let Ok(t) = TxnRequest::decode(&bytes[..]) {
            decoded += 1;
            let _ = validate::check_txn(&t, 128);
        }
        let _ = PutRequest::decode(&bytes[..]).map(|p| validate::check_put(&p));
        let _ = WatchRequest::decode(&bytes[..]);
        let _ = AuthenticateRequest::decode(&bytes[..]);
        let _ = MemberAddRequest::decode(&bytes[..]);
        let _ = LeaseKeepAliveRequest::decode(&bytes[..]);
        // The gateway's JSON decoding of the same bytes.
        let _ = serde_json::from_slice::<TxnRequest>(&bytes);
        let _ = serde_json::from_slice::<RangeRequest>(&bytes);
        let _ = serde_json::from_slice::<WatchRequest>(&bytes);
        // Raft log entries: what passes the services' validation must apply with a
        // deterministic answer (an Err here would stop the member).
        if let Ok(entry) = InternalRequest::decode(&bytes[..]) {
            decoded += 1;
            let valid = match &entry.request {
                Some(InternalOp::Put(p)) => validate::check_put(p).is_ok(),
                Some(InternalOp::DeleteRange(d)) => validate::check_delete(d).is_ok(),
                Some(InternalOp::Txn(t)) => validate::check_txn(t, 128).is_ok(),
                Some(InternalOp::LeaseGrant(g)) => g.ttl > 0 && g.id > 0,
                Some(InternalOp::Compaction(_))
                | Some(InternalOp::LeaseRevoke(_))
                | Some(InternalOp::AuthEnable(_))
                | Some(InternalOp::AuthDisable(_))
                | Some(InternalOp::UserAdd(_))
                | Some(InternalOp::UserDelete(_))
                | Some(InternalOp::UserGrantRole(_))
                | Some(InternalOp::UserRevokeRole(_))
                | Some(InternalOp::RoleAdd(_))
                | Some(InternalOp::RoleDelete(_))
                | Some(InternalOp::RoleGrantPermission(_))
                | Some(InternalOp::RoleRevokePermission(_)) => true,
                _ => false,
            };
            if valid {
                let r = store.apply(index, &entry);
                assert!(r.is_ok(), "entry {entry:?} stopped the member: {r:?}");
                index += 1;
                applied += 1;
            }
        }
    }
    eprintln!("fuzz: {runs} inputs, {decoded} decoded, {applied} entries applied");
    assert!(runs > 1000, "the fuzzer barely ran ({runs} inputs)");
    assert!(applied > 0, "no mutated entry ever reached apply");
}
