//! The receiving side of member-to-member traffic (`pontoonpeer.RaftPeer`), served on
//! `--listen-peer-urls`.
//!
//! Everything a peer sends is checked before raft sees it: the sender's cluster ID
//! must be ours, a removed member is refused (as etcd refuses it), every message must
//! decode and be addressed to this member, and snapshot chunks must match their
//! checksums and form a complete, verified file. Bad input is answered with an error
//! status and dropped; it never reaches raft and never panics.

use std::io::Write;
use std::sync::Arc;

use protobuf::Message as _;
use tonic::{Request, Response, Status, Streaming};

use pontoon_proto::peer::raft_peer_server::RaftPeer;
use pontoon_proto::peer::{
    LeaseRemainingRequest, LeaseRemainingResponse, LeaseRenewRequest, LeaseRenewResponse,
    MembersRequest, MembersResponse, RaftBatch, RaftBatchAck, SnapshotAck, SnapshotChunk,
};

use super::EtcdServer;
use crate::mvcc::snapshot::verify_snapshot;

pub struct PeerService {
    server: Arc<EtcdServer>,
}

impl PeerService {
    pub fn new(server: Arc<EtcdServer>) -> Self {
        PeerService { server }
    }

    fn check_sender(&self, cluster_id: u64, from: u64) -> Result<(), Status> {
        if cluster_id != self.server.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster ID mismatch: local {:x}, remote {cluster_id:x}",
                self.server.cluster_id
            )));
        }
        if self.server.mvcc.is_removed(from).unwrap_or(false) {
            return Err(Status::permission_denied(format!(
                "rejected traffic from member {from:x}: it was removed from the cluster"
            )));
        }
        Ok(())
    }

    fn decode(&self, bytes: &[u8]) -> Result<::raft::prelude::Message, Status> {
        let m = ::raft::prelude::Message::parse_from_bytes(bytes)
            .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
        if m.to != self.server.member_id {
            return Err(Status::invalid_argument(format!(
                "raft message for member {:x} sent to member {:x}",
                m.to, self.server.member_id
            )));
        }
        Ok(m)
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn send(
        &self,
        req: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftBatchAck>, Status> {
        let mut stream = req.into_inner();
        while let Some(batch) = stream.message().await? {
            self.check_sender(batch.cluster_id, batch.from)?;
            for bytes in &batch.messages {
                let m = self.decode(bytes)?;
                if m.get_msg_type() == ::raft::prelude::MessageType::MsgSnapshot {
                    return Err(Status::invalid_argument(
                        "snapshots travel on RaftPeer.Snapshot",
                    ));
                }
                self.server
                    .raft
                    .step(m)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
            }
        }
        Ok(Response::new(RaftBatchAck {}))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        let mut stream = req.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("empty snapshot stream"));
        };
        self.check_sender(first.cluster_id, first.from)?;
        let mut msg = self.decode(&first.message)?;
        if msg.get_msg_type() != ::raft::prelude::MessageType::MsgSnapshot {
            return Err(Status::invalid_argument(
                "first chunk carries no MsgSnapshot",
            ));
        }
        let index = msg.get_snapshot().get_metadata().index;
        let path = self.server.raft.incoming_snapshot_path(index);
        let part = path.with_extension("part");
        let mut file = std::fs::File::create(&part)
            .map_err(|e| Status::internal(format!("{}: {e}", part.display())))?;
        let mut chunk = Some(first);
        let mut total = 0u64;
        while let Some(c) = chunk.take() {
            if crc32fast::hash(&c.data) != c.crc32 {
                let _ = std::fs::remove_file(&part);
                return Err(Status::data_loss("snapshot chunk checksum mismatch"));
            }
            total += c.data.len() as u64;
            file.write_all(&c.data)
                .map_err(|e| Status::internal(e.to_string()))?;
            chunk = stream.message().await?;
        }
        file.sync_all()
            .map_err(|e| Status::internal(e.to_string()))?;
        drop(file);
        let verified = {
            let part = part.clone();
            tokio::task::spawn_blocking(move || verify_snapshot(&part))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
        };
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&part);
            return Err(Status::data_loss(e.to_string()));
        }
        std::fs::rename(&part, &path).map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(index, bytes = total, "received snapshot");
        msg.mut_snapshot()
            .set_data(path.to_string_lossy().as_bytes().to_vec().into());
        self.server
            .raft
            .step(msg)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(SnapshotAck {}))
    }

    async fn lease_renew(
        &self,
        req: Request<LeaseRenewRequest>,
    ) -> Result<Response<LeaseRenewResponse>, Status> {
        if !self.server.raft.status().is_leader() {
            return Err(super::status::to_status(crate::Error::NotLeader));
        }
        let id = req.into_inner().id;
        let ttl = super::lease::renew(&self.server, &self.server.lessor, id).await?;
        Ok(Response::new(LeaseRenewResponse { ttl }))
    }

    async fn hash_kv(
        &self,
        req: Request<pontoon_proto::etcdserverpb::HashKvRequest>,
    ) -> Result<Response<pontoon_proto::etcdserverpb::HashKvResponse>, Status> {
        let rev = req.into_inner().revision;
        super::maintenance::hash_kv(&self.server, rev)
            .await
            .map(Response::new)
    }

    async fn lease_remaining(
        &self,
        req: Request<LeaseRemainingRequest>,
    ) -> Result<Response<LeaseRemainingResponse>, Status> {
        if !self.server.raft.status().is_leader() {
            return Err(super::status::to_status(crate::Error::NotLeader));
        }
        let id = req.into_inner().id;
        let ttl = match self
            .server
            .mvcc
            .lease_get(id)
            .map_err(super::status::to_status)?
        {
            Some(rec) => self.server.lessor.remaining(&rec),
            None => -1,
        };
        Ok(Response::new(LeaseRemainingResponse { ttl }))
    }

    async fn members(
        &self,
        _req: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let members = self
            .server
            .mvcc
            .members()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(MembersResponse {
            cluster_id: self.server.cluster_id,
            members,
        }))
    }
}
