//! etcd's `v3lock` and `v3election` gRPC services, built on the store's own KV,
//! lease and revision semantics exactly as etcd builds them on its client-side
//! concurrency recipes:
//!
//! - a contender for `name` owns the key `name/<lease ID in hex>`, attached to its
//!   lease, so a crashed holder's claim disappears with its lease;
//! - contenders are ordered by their key's create revision; the lowest is the holder
//!   (lock owner, election leader);
//! - a contender waits until every key of `name/` created before its own is deleted.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use pontoon_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pontoon_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use pontoon_proto::etcdserverpb::request_op::Request as Op;
use pontoon_proto::etcdserverpb::response_op::Response as OpResponse;
use pontoon_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, ResponseHeader, TxnRequest,
    TxnResponse,
};
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::mvccpb::KeyValue;
use pontoon_proto::v3electionpb::election_server::Election;
use pontoon_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use pontoon_proto::v3lockpb::lock_server::Lock;
use pontoon_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};

use super::status::to_status;
use super::EtcdServer;
use crate::auth::AuthInfo;
use crate::mvcc::ApplyResponse;

/// The smallest key after every key starting with `prefix` (etcd's GetPrefixRangeEnd).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn create_rev_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        range_end: Vec::new(),
    }
}

fn op(r: Op) -> RequestOp {
    RequestOp { request: Some(r) }
}

fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    }
}

/// The oldest key under `prefix`: the current holder.
fn first_created(prefix: &[u8]) -> RangeRequest {
    RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: SortOrder::Ascend as i32,
        sort_target: SortTarget::Create as i32,
        ..Default::default()
    }
}

fn range_kvs(r: &TxnResponse, i: usize) -> Vec<KeyValue> {
    match r.responses.get(i).and_then(|o| o.response.as_ref()) {
        Some(OpResponse::ResponseRange(rr)) => rr.kvs.clone(),
        _ => Vec::new(),
    }
}

/// The contention recipe shared by Lock and Campaign.
pub struct Contention {
    server: Arc<EtcdServer>,
}

impl Contention {
    async fn txn(&self, t: TxnRequest, who: &AuthInfo) -> Result<TxnResponse, Status> {
        match self.server.propose(InternalOp::Txn(t), who).await? {
            ApplyResponse::Txn(r) => Ok(r),
            other => Err(Status::internal(format!("txn answered {other:?}"))),
        }
    }

    async fn range(&self, r: RangeRequest, who: &AuthInfo) -> Result<Vec<KeyValue>, Status> {
        self.server.raft.read_index().await.map_err(to_status)?;
        self.server.check_read(who, &r.key, &r.range_end)?;
        Ok(self.server.mvcc.range(&r).map_err(to_status)?.kvs)
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.server.header(self.server.mvcc.current_revision()))
    }

    /// Creates (or finds) the contender key `prefix<lease hex>` and returns it with its
    /// create revision and current value.
    async fn enter(
        &self,
        prefix: &[u8],
        lease: i64,
        value: &[u8],
        who: &AuthInfo,
    ) -> Result<(Vec<u8>, KeyValue), Status> {
        let mut key = prefix.to_vec();
        key.extend_from_slice(format!("{lease:x}").as_bytes());
        let put = PutRequest {
            key: key.clone(),
            value: value.to_vec(),
            lease,
            ..Default::default()
        };
        let t = TxnRequest {
            compare: vec![create_rev_is(&key, 0)],
            success: vec![op(Op::RequestPut(put)), op(Op::RequestRange(get(&key)))],
            failure: vec![op(Op::RequestRange(get(&key)))],
        };
        let r = self.txn(t, who).await?;
        let idx = if r.succeeded { 1 } else { 0 };
        let kv = range_kvs(&r, idx)
            .pop()
            .ok_or_else(|| Status::internal("contender key vanished"))?;
        Ok((key, kv))
    }

    /// Waits until no key under `prefix` created before `rev` remains.
    async fn wait_turn(&self, prefix: &[u8], rev: i64, who: &AuthInfo) -> Result<(), Status> {
        let hub_rx = self.server.published.clone();
        let mut published = hub_rx.subscribe();
        loop {
            let older = self
                .range(
                    RangeRequest {
                        key: prefix.to_vec(),
                        range_end: prefix_end(prefix),
                        max_create_revision: rev - 1,
                        limit: 1,
                        ..Default::default()
                    },
                    who,
                )
                .await?;
            if older.is_empty() {
                return Ok(());
            }
            if published.changed().await.is_err() {
                return Err(to_status(crate::Error::Stopped));
            }
        }
    }
}

fn name_prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

pub struct LockService(Contention);

impl LockService {
    pub fn new(server: Arc<EtcdServer>) -> Self {
        LockService(Contention { server })
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let who = self.0.server.caller(&req).await?;
        let req = req.into_inner();
        let prefix = name_prefix(&req.name);
        let (key, kv) = self.0.enter(&prefix, req.lease, b"", &who).await?;
        self.0.wait_turn(&prefix, kv.create_revision, &who).await?;
        // The holder's lease may have expired while it waited.
        if self.0.range(get(&key), &who).await?.is_empty() {
            return Err(Status::failed_precondition("etcdserver: session expired"));
        }
        Ok(Response::new(LockResponse {
            header: self.0.header(),
            key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let who = self.0.server.caller(&req).await?;
        let req = req.into_inner();
        let d = DeleteRangeRequest {
            key: req.key,
            ..Default::default()
        };
        self.0
            .server
            .propose(InternalOp::DeleteRange(d), &who)
            .await?;
        Ok(Response::new(UnlockResponse {
            header: self.0.header(),
        }))
    }
}

pub struct ElectionService(Contention);

impl ElectionService {
    pub fn new(server: Arc<EtcdServer>) -> Self {
        ElectionService(Contention { server })
    }

    async fn leader_kv(&self, name: &[u8], who: &AuthInfo) -> Result<Option<KeyValue>, Status> {
        Ok(self
            .0
            .range(first_created(&name_prefix(name)), who)
            .await?
            .pop())
    }
}

fn not_leader() -> Status {
    Status::failed_precondition("election: not leader")
}

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let who = self.0.server.caller(&req).await?;
        let req = req.into_inner();
        let prefix = name_prefix(&req.name);
        let (key, kv) = self.0.enter(&prefix, req.lease, &req.value, &who).await?;
        if kv.value != req.value {
            // Re-campaigning with a new value proclaims it, as etcd's recipe does.
            self.0
                .server
                .propose(
                    InternalOp::Put(PutRequest {
                        key: key.clone(),
                        value: req.value.clone(),
                        lease: req.lease,
                        ..Default::default()
                    }),
                    &who,
                )
                .await?;
        }
        self.0.wait_turn(&prefix, kv.create_revision, &who).await?;
        Ok(Response::new(CampaignResponse {
            header: self.0.header(),
            leader: Some(LeaderKey {
                name: req.name,
                key,
                rev: kv.create_revision,
                lease: req.lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let who = self.0.server.caller(&req).await?;
        let req = req.into_inner();
        let leader = req
            .leader
            .ok_or_else(|| Status::invalid_argument("\"leader\" field must be provided"))?;
        let put = PutRequest {
            key: leader.key.clone(),
            value: req.value,
            lease: leader.lease,
            ..Default::default()
        };
        let t = TxnRequest {
            compare: vec![create_rev_is(&leader.key, leader.rev)],
            success: vec![op(Op::RequestPut(put))],
            failure: vec![],
        };
        if !self.0.txn(t, &who).await?.succeeded {
            return Err(not_leader());
        }
        Ok(Response::new(ProclaimResponse {
            header: self.0.header(),
        }))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let who = self.0.server.caller(&req).await?;
        let req = req.into_inner();
        match self.leader_kv(&req.name, &who).await? {
            Some(kv) => Ok(Response::new(LeaderResponse {
                header: self.0.header(),
                kv: Some(kv),
            })),
            None => Err(Status::not_found("election: no leader")),
        }
    }

    type ObserveStream = ReceiverStream<Result<LeaderResponse, Status>>;

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let who = self.0.server.caller(&req).await?;
        let name = req.into_inner().name;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = ElectionService(Contention {
            server: self.0.server.clone(),
        });
        tokio::spawn(async move {
            let mut published = this.0.server.published.subscribe();
            let mut last: Option<(Vec<u8>, i64)> = None;
            loop {
                match this.leader_kv(&name, &who).await {
                    Ok(Some(kv)) => {
                        let seen = Some((kv.key.clone(), kv.mod_revision));
                        if seen != last {
                            last = seen;
                            let resp = LeaderResponse {
                                header: this.0.header(),
                                kv: Some(kv),
                            };
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let who = self.0.server.caller(&req).await?;
        let req = req.into_inner();
        let leader = req
            .leader
            .ok_or_else(|| Status::invalid_argument("\"leader\" field must be provided"))?;
        let del = DeleteRangeRequest {
            key: leader.key.clone(),
            ..Default::default()
        };
        let t = TxnRequest {
            compare: vec![create_rev_is(&leader.key, leader.rev)],
            success: vec![op(Op::RequestDeleteRange(del))],
            failure: vec![],
        };
        self.0.txn(t, &who).await?;
        Ok(Response::new(ResignResponse {
            header: self.0.header(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
