//! The etcd `KV` gRPC service.
//!
//! Writes are validated, proposed through raft and answered after apply. Range is a
//! read: linearizable by default (a read-index round, then a local read once this
//! member has applied up to it), or served locally at once when `serializable`; so is
//! a Txn none of whose operations can write, as in etcd.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use pontoon_proto::etcdserverpb::kv_server::Kv;
use pontoon_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use pontoon_proto::internal::internal_request::Request as InternalOp;

use super::status::to_status;
use super::validate;
use super::EtcdServer;
use crate::mvcc::{apply, ApplyResponse};

pub struct KvService {
    server: Arc<EtcdServer>,
}

impl KvService {
    pub fn new(server: Arc<EtcdServer>) -> Self {
        KvService { server }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let req = req.into_inner();
        validate::check_range(&req).map_err(to_status)?;
        if !req.serializable {
            self.server.raft.read_index().await.map_err(to_status)?;
        }
        self.server.check_read(&who, &req.key, &req.range_end)?;
        let mut resp = self
            .server
            .mvcc
            .range_capped(&req, self.server.max_range_bytes)
            .map_err(to_status)?;
        self.server.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let req = req.into_inner();
        validate::check_put(&req).map_err(to_status)?;
        let op = InternalOp::Put(req);
        let r = self.server.propose_for(op, &who, |r| match r {
            ApplyResponse::Put(p) => Ok(p),
            other => Err(other),
        });
        Ok(Response::new(r.await?))
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let req = req.into_inner();
        validate::check_delete(&req).map_err(to_status)?;
        let op = InternalOp::DeleteRange(req);
        let r = self.server.propose_for(op, &who, |r| match r {
            ApplyResponse::DeleteRange(d) => Ok(d),
            other => Err(other),
        });
        Ok(Response::new(r.await?))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let req = req.into_inner();
        validate::check_txn(&req, self.server.max_txn_ops).map_err(to_status)?;
        if apply::txn_is_read_only(&req) {
            // As etcd: a Txn that cannot write is a read, served here without raft.
            if !apply::txn_is_serializable(&req) {
                self.server.raft.read_index().await.map_err(to_status)?;
            }
            self.server.check_read_txn(&who, &req)?;
            let mut resp = self
                .server
                .mvcc
                .read_only_txn(&req, self.server.max_range_bytes)
                .map_err(to_status)?;
            self.server.fill_header(&mut resp.header);
            return Ok(Response::new(resp));
        }
        let op = InternalOp::Txn(req);
        let r = self.server.propose_for(op, &who, |r| match r {
            ApplyResponse::Txn(t) => Ok(t),
            other => Err(other),
        });
        Ok(Response::new(r.await?))
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let op = InternalOp::Compaction(req.into_inner());
        let r = self.server.propose_for(op, &who, |r| match r {
            ApplyResponse::Compaction(c) => Ok(c),
            other => Err(other),
        });
        Ok(Response::new(r.await?))
    }
}
