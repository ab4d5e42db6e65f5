//! The etcd `Maintenance` gRPC service: status, alarms, defragmentation, consistency
//! hashes, snapshots and leadership transfer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use pontoon_proto::etcdserverpb::alarm_request::AlarmAction;
use pontoon_proto::etcdserverpb::maintenance_server::Maintenance;
use pontoon_proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse,
    DowngradeRequest, DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use pontoon_proto::internal::internal_request::Request as InternalOp;

use super::status::to_status;
use super::{EtcdServer, SERVER_VERSION};
use crate::error::Error;
use crate::mvcc::snapshot::envelope;
use crate::mvcc::ApplyResponse;

/// Bytes per Snapshot response message.
const SNAPSHOT_CHUNK: usize = 32 * 1024;

pub struct MaintenanceService {
    server: Arc<EtcdServer>,
}

impl MaintenanceService {
    pub fn new(server: Arc<EtcdServer>) -> Self {
        MaintenanceService { server }
    }
}

/// HashKV of this member at `rev` (the Maintenance call, and the peer call the
/// corruption check makes).
pub(crate) async fn hash_kv(server: &EtcdServer, rev: i64) -> Result<HashKvResponse, Status> {
    let mvcc = server.mvcc.clone();
    let (hash, compact_revision, hash_revision) =
        tokio::task::spawn_blocking(move || mvcc.hash_kv(rev))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(to_status)?;
    Ok(HashKvResponse {
        header: Some(server.header(server.mvcc.current_revision())),
        hash,
        compact_revision,
        hash_revision,
    })
}

/// etcd's text for an alarm in Status.errors.
pub(crate) fn alarm_text(a: i32) -> &'static str {
    match AlarmType::try_from(a) {
        Ok(AlarmType::Nospace) => "NOSPACE",
        Ok(AlarmType::Corrupt) => "CORRUPT",
        _ => "NONE",
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let who = self.server.caller(&req).await?;
        if req.get_ref().action != AlarmAction::Get as i32 {
            // etcd lets anyone raise or clear alarms; Pontoon asks for root, so no
            // ordinary user can disarm a NOSPACE or CORRUPT alarm.
            self.server.check_admin(&who)?;
        }
        let op = InternalOp::Alarm(req.into_inner());
        let r = self.server.propose_for(op, &who, |r| match r {
            ApplyResponse::Alarm(a) => Ok(a),
            other => Err(other),
        });
        Ok(Response::new(r.await?))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = &self.server;
        let st = s.raft.status();
        let (db_size, db_size_in_use) = s.mvcc.db_size();
        let errors = s
            .mvcc
            .alarms()
            .map_err(to_status)?
            .iter()
            .map(|a| format!("memberID:{} alarm:{} ", a.member_id, alarm_text(a.alarm)))
            .collect();
        Ok(Response::new(StatusResponse {
            header: Some(s.header(s.mvcc.current_revision())),
            version: SERVER_VERSION.to_string(),
            db_size,
            leader: st.leader(),
            raft_index: st.commit_index(),
            raft_term: st.term(),
            raft_applied_index: st.applied_index(),
            errors,
            db_size_in_use,
            is_learner: st.is_learner(),
        }))
    }

    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let mvcc = self.server.mvcc.clone();
        tokio::task::spawn_blocking(move || mvcc.defragment())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        self.server.invalidate_backend_size();
        Ok(Response::new(DefragmentResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
        }))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let mvcc = self.server.mvcc.clone();
        let hash = tokio::task::spawn_blocking(move || mvcc.hash_all())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(to_status)?;
        Ok(Response::new(HashResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let rev = req.into_inner().revision;
        hash_kv(&self.server, rev).await.map(Response::new)
    }

    type SnapshotStream = ReceiverStream<Result<SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let server = self.server.clone();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = server.snap_dir.join(format!("save-{nanos}.snap"));
        let (tx, rx) = mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let send = |r| tx.blocking_send(r).is_ok();
            let file = match server.mvcc.write_snapshot(&path) {
                Ok(f) => f,
                Err(e) => {
                    send(Err(to_status(e)));
                    return;
                }
            };
            let header = Some(server.header(server.mvcc.current_revision()));
            // etcd's envelope follows the file: padding to 512 bytes and a SHA-256 of
            // everything before it, which `etcdctl snapshot save` checks.
            let padded = file.size.div_ceil(512) * 512;
            let mut remaining = padded + 32;
            let mut sha = sha2::Sha256::default();
            let result = std::fs::File::open(&path).and_then(|mut f| {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                loop {
                    let n = f.read(&mut buf)?;
                    let blob = if n == 0 {
                        let (mut tail, digest) = envelope(file.size, sha.clone());
                        tail.extend_from_slice(&digest);
                        tail
                    } else {
                        sha2::Digest::update(&mut sha, &buf[..n]);
                        buf[..n].to_vec()
                    };
                    remaining = remaining.saturating_sub(blob.len() as u64);
                    let ok = send(Ok(SnapshotResponse {
                        header,
                        remaining_bytes: remaining,
                        blob,
                        version: SERVER_VERSION.to_string(),
                    }));
                    if !ok || n == 0 {
                        return Ok(());
                    }
                }
            });
            if let Err(e) = result {
                send(Err(Status::internal(e.to_string())));
            }
            let _ = std::fs::remove_file(&path);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let target = req.into_inner().target_id;
        let s = &self.server;
        if !s.raft.status().is_leader() {
            return Err(to_status(Error::NotLeader));
        }
        match s.mvcc.member(target).map_err(to_status)? {
            Some(m) if !m.is_learner => {}
            _ => return Err(to_status(Error::BadLeaderTransferee)),
        }
        if target != s.member_id {
            s.raft.transfer_leader(target).map_err(to_status)?;
            let deadline = Instant::now() + s.request_timeout;
            while s.raft.status().leader() != target {
                if Instant::now() > deadline {
                    return Err(to_status(Error::LeaderTransferTimeout));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Response::new(MoveLeaderResponse {
            header: Some(s.header(s.mvcc.current_revision())),
        }))
    }

    async fn downgrade(
        &self,
        req: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        Err(Status::unimplemented("downgrade is not supported"))
    }
}
