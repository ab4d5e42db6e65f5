//! The etcd `Lease` gRPC service, and the leader's expiry and checkpoint loop.
//!
//! Grant and revoke go through raft. Keep-alives and TTL queries touch only the
//! lessor's deadlines on this member. Every [`EXPIRY_TICK`] the loop revokes (through
//! raft) each lease past its deadline; every [`CHECKPOINT_INTERVAL`] it checkpoints the
//! remaining TTLs through raft, so a restart resumes leases where they were.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use pontoon_proto::etcdserverpb::lease_server::Lease;
use pontoon_proto::etcdserverpb::{
    LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use pontoon_proto::internal::internal_request::Request as InternalOp;

use super::status::to_status;
use super::EtcdServer;
use crate::error::Error;
use crate::lease::Lessor;
use crate::mvcc::lease::{LeaseRecord, MAX_LEASE_TTL};
use crate::mvcc::ApplyResponse;

pub const EXPIRY_TICK: Duration = Duration::from_millis(500);
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// A lease is checkpointed when its stored remaining TTL is off by this many seconds,
/// bounding how much TTL a restart can add (etcd adds up to the full TTL).
pub const CHECKPOINT_DRIFT: i64 = 2;

pub struct LeaseService {
    server: Arc<EtcdServer>,
    lessor: Arc<Lessor>,
    next_id: AtomicU64,
}

impl LeaseService {
    pub fn new(server: Arc<EtcdServer>, lessor: Arc<Lessor>) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = ((server.member_id & 0xffff) << 47) ^ (nanos << 8);
        LeaseService {
            server,
            lessor,
            next_id: AtomicU64::new(seed),
        }
    }

    /// A server-chosen lease ID: positive, never 0.
    fn new_id(&self) -> i64 {
        loop {
            let id = (self.next_id.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64)) as i64;
            if id != 0 {
                return id;
            }
        }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let mut req = req.into_inner();
        if req.ttl > MAX_LEASE_TTL {
            return Err(to_status(Error::LeaseTtlTooLarge));
        }
        req.ttl = req.ttl.max(self.server.min_lease_ttl);
        if req.id == 0 {
            req.id = self.new_id();
        }
        let r = self
            .server
            .propose_for(InternalOp::LeaseGrant(req), &who, |r| match r {
                ApplyResponse::LeaseGrant(g) => Ok(g),
                other => Err(other),
            })
            .await?;
        self.lessor.refresh(&LeaseRecord {
            id: r.id,
            ttl: r.ttl,
            remaining: 0,
        });
        Ok(Response::new(r))
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let req = req.into_inner();
        let id = req.id;
        let r = self
            .server
            .propose_for(InternalOp::LeaseRevoke(req), &who, |r| match r {
                ApplyResponse::LeaseRevoke(v) => Ok(v),
                other => Err(other),
            })
            .await?;
        self.lessor.forget(id);
        Ok(Response::new(r))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let server = self.server.clone();
        let lessor = self.lessor.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = inbound.message().await {
                let ttl = match renew(&server, &lessor, req.id).await {
                    Ok(ttl) => ttl,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let resp = LeaseKeepAliveResponse {
                    header: Some(server.header(server.mvcc.current_revision())),
                    id: req.id,
                    ttl,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let who = self.server.caller(&req).await?;
        let req = req.into_inner();
        self.server.raft.read_index().await.map_err(to_status)?;
        let header = Some(self.server.header(self.server.mvcc.current_revision()));
        let Some(rec) = self.server.mvcc.lease_get(req.id).map_err(to_status)? else {
            // etcd answers an unknown lease with TTL -1, not an error.
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                ..Default::default()
            }));
        };
        // With auth on, the caller must be allowed to read every key attached to the
        // lease (etcd 3.4.26 / 3.5.9 on, CVE-2023-32082: the key names leak otherwise).
        let auth_on = self.server.mvcc.auth().enabled;
        let mut keys = if req.keys || auth_on {
            self.server.mvcc.lease_keys(req.id).map_err(to_status)?
        } else {
            Vec::new()
        };
        if auth_on {
            for key in &keys {
                self.server.check_read(&who, key, &[])?;
            }
        }
        if !req.keys {
            keys.clear();
        }
        let ttl = remaining(&self.server, &self.lessor, &rec).await?;
        Ok(Response::new(LeaseTimeToLiveResponse {
            header,
            id: req.id,
            ttl,
            granted_ttl: rec.ttl,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.server.raft.read_index().await.map_err(to_status)?;
        let leases = self
            .server
            .mvcc
            .lease_list()
            .map_err(to_status)?
            .into_iter()
            .map(|r| LeaseStatus { id: r.id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            leases,
        }))
    }
}

/// Renews a lease on the leader's lessor (forwarding when this member follows), as
/// etcd's followers forward keep-alives. Returns the TTL, 0 if there is no such lease.
///
/// The member that acknowledged a LeaseGrant had applied it, but the leader may not
/// have yet (it commits first, and applies on its own thread): a lease the leader
/// does not know is looked up again once the leader has applied everything
/// committed, so a keep-alive sent right after a grant never reads "not found".
pub async fn renew(server: &EtcdServer, lessor: &Lessor, id: i64) -> Result<i64, Status> {
    if server.raft.status().is_leader() {
        let rec = match server.mvcc.lease_get(id).map_err(to_status)? {
            Some(rec) => Some(rec),
            None => {
                server.raft.read_index().await.map_err(to_status)?;
                server.mvcc.lease_get(id).map_err(to_status)?
            }
        };
        return Ok(rec.map_or(0, |rec| lessor.refresh(&rec)));
    }
    let mut leader = server.leader_peer().await?;
    let r = leader
        .lease_renew(pontoon_proto::peer::LeaseRenewRequest { id })
        .await?;
    Ok(r.into_inner().ttl)
}

/// Seconds `rec` has left, as the leader's lessor counts them.
pub async fn remaining(
    server: &EtcdServer,
    lessor: &Lessor,
    rec: &LeaseRecord,
) -> Result<i64, Status> {
    if server.raft.status().is_leader() {
        return Ok(lessor.remaining(rec));
    }
    let mut leader = server.leader_peer().await?;
    let r = leader
        .lease_remaining(pontoon_proto::peer::LeaseRemainingRequest { id: rec.id })
        .await?;
    Ok(r.into_inner().ttl)
}

/// Revokes expired leases and checkpoints remaining TTLs, until dropped.
pub async fn run_expiry(server: Arc<EtcdServer>, lessor: Arc<Lessor>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    let mut last_checkpoint = tokio::time::Instant::now();
    let mut leading = false;
    loop {
        tick.tick().await;
        if server.raft.status().leader() != server.member_id {
            leading = false;
            continue;
        }
        if !leading {
            // Deadlines seen while following may be stale: restart from checkpoints.
            lessor.clear();
            leading = true;
        }
        let leases = match server.mvcc.lease_list() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "listing leases failed");
                continue;
            }
        };
        let (expired, remaining) = lessor.tick(&leases);
        for id in expired {
            match server
                .raft
                .propose(InternalOp::LeaseRevoke(LeaseRevokeRequest { id }))
                .await
            {
                Ok(_) | Err(Error::LeaseNotFound) => {
                    tracing::debug!(lease = %format!("{id:x}"), "lease expired and revoked");
                    lessor.forget(id);
                }
                Err(e) => {
                    tracing::warn!(lease = %format!("{id:x}"), error = %e, "revoking expired lease failed")
                }
            }
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            last_checkpoint = tokio::time::Instant::now();
            let stored: std::collections::HashMap<i64, i64> =
                leases.iter().map(|r| (r.id, r.remaining)).collect();
            let checkpoints: Vec<LeaseCheckpoint> = remaining
                .into_iter()
                .filter(|(id, left)| {
                    stored
                        .get(id)
                        .is_none_or(|s| *s == 0 || (s - left).abs() >= CHECKPOINT_DRIFT)
                })
                .map(|(id, remaining_ttl)| LeaseCheckpoint { id, remaining_ttl })
                .collect();
            if !checkpoints.is_empty() {
                let req = LeaseCheckpointRequest { checkpoints };
                if let Err(e) = server.raft.propose(InternalOp::LeaseCheckpoint(req)).await {
                    tracing::warn!(error = %e, "lease checkpoint failed");
                }
            }
        }
    }
}
