//! The etcd `Cluster` gRPC service: membership through raft conf changes.
//!
//! Checks happen before proposing, with etcd's errors: unknown members, peer URLs
//! already in use, a second learner, promoting a voter or a learner that has not
//! caught up (only the leader knows, so a follower forwards MemberPromote to it), and
//! removing the last voter.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ::raft::prelude::ConfChangeType;
use tonic::{Request, Response, Status};

use pontoon_proto::etcdserverpb::cluster_client::ClusterClient;
use pontoon_proto::etcdserverpb::cluster_server::Cluster;
use pontoon_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use pontoon_proto::internal::internal_request::Request as InternalOp;

use super::config::listen_addrs;
use super::status::to_status;
use super::{identity, EtcdServer};
use crate::error::Error;
use crate::mvcc::ApplyResponse;

/// etcd allows one learner at a time.
const MAX_LEARNERS: usize = 1;
/// A learner may be promoted once its log reaches this share of the leader's.
const LEARNER_READY_PERCENT: f64 = 0.9;

pub struct ClusterService {
    server: Arc<EtcdServer>,
}

impl ClusterService {
    pub fn new(server: Arc<EtcdServer>) -> Self {
        ClusterService { server }
    }

    fn members(&self) -> Result<Vec<Member>, Status> {
        self.server.mvcc.members().map_err(to_status)
    }

    fn member(&self, id: u64) -> Result<Member, Status> {
        self.server
            .mvcc
            .member(id)
            .map_err(to_status)?
            .ok_or_else(|| to_status(Error::MemberNotFound))
    }

    fn check_urls(&self, urls: &[String], except: Option<u64>) -> Result<(), Status> {
        if urls.is_empty() || urls.iter().any(|u| listen_addrs(u).is_err()) {
            return Err(to_status(Error::MemberBadUrls));
        }
        for m in self.members()? {
            if Some(m.id) != except && m.peer_ur_ls.iter().any(|u| urls.contains(u)) {
                return Err(to_status(Error::PeerUrlExist));
            }
        }
        Ok(())
    }

    async fn conf_change(
        &self,
        t: ConfChangeType,
        id: u64,
        m: &Member,
    ) -> Result<Vec<Member>, Status> {
        match self
            .server
            .raft
            .propose_conf_change(t, id, m)
            .await
            .map_err(to_status)?
        {
            ApplyResponse::Members(ms) => Ok(ms),
            other => Err(to_status(Error::Corrupt(format!(
                "conf change answered with {other:?}"
            )))),
        }
    }

    /// Leader only: is the learner's log close enough to ours?
    async fn learner_ready(&self, id: u64) -> Result<bool, Status> {
        let Some(progress) = self.server.raft.progress().await.map_err(to_status)? else {
            return Err(to_status(Error::NotLeader));
        };
        let me = self.server.member_id;
        let leader = progress
            .iter()
            .find(|p| p.id == me)
            .map_or(0, |p| p.matched);
        let learner = progress
            .iter()
            .find(|p| p.id == id)
            .map_or(0, |p| p.matched);
        Ok(learner as f64 >= leader as f64 * LEARNER_READY_PERCENT)
    }

    /// Sends MemberPromote to the leader's client URL.
    async fn forward_promote(
        &self,
        req: MemberPromoteRequest,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<MemberPromoteResponse, Status> {
        let leader = self.server.raft.status().leader();
        if leader == 0 {
            return Err(to_status(Error::NoLeader));
        }
        let urls = self.member(leader)?.client_ur_ls;
        let mut last = to_status(Error::NoLeader);
        for url in urls {
            let Some(endpoint) = crate::raft::transport::endpoint(&url) else {
                continue;
            };
            match endpoint.connect().await.map(ClusterClient::new) {
                Ok(mut c) => match c.member_promote(with_credentials(req, metadata)).await {
                    Ok(r) => return Ok(r.into_inner()),
                    Err(s) => return Err(s),
                },
                Err(e) => last = Status::unavailable(e.to_string()),
            }
        }
        Err(last)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let req = req.into_inner();
        self.check_urls(&req.peer_ur_ls, None)?;
        let members = self.members()?;
        if req.is_learner && members.iter().filter(|m| m.is_learner).count() >= MAX_LEARNERS {
            return Err(to_status(Error::TooManyLearners));
        }
        // As etcd: the ID mixes the URLs with the time, so re-adding a member with the
        // same URLs later gives it a new identity.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let id = identity::member_id(&req.peer_ur_ls, &format!("{now}"));
        if members.iter().any(|m| m.id == id) || self.server.mvcc.is_removed(id).unwrap_or(false) {
            return Err(to_status(Error::MemberExist));
        }
        let member = Member {
            id,
            name: String::new(),
            peer_ur_ls: req.peer_ur_ls.clone(),
            client_ur_ls: Vec::new(),
            is_learner: req.is_learner,
        };
        let t = if req.is_learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        };
        let members = self.conf_change(t, id, &member).await?;
        Ok(Response::new(MemberAddResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            member: Some(member),
            members,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let id = req.into_inner().id;
        let target = self.member(id)?;
        let voters = self.members()?.iter().filter(|m| !m.is_learner).count();
        if !target.is_learner && voters <= 1 {
            return Err(to_status(Error::NotEnoughStartedMembers));
        }
        let members = self
            .conf_change(ConfChangeType::RemoveNode, id, &target)
            .await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            members,
        }))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let who = self.server.caller(&req).await?;
        self.server.check_admin(&who)?;
        let req = req.into_inner();
        self.member(req.id)?;
        self.check_urls(&req.peer_ur_ls, Some(req.id))?;
        let op = InternalOp::MemberPeerUrls(Member {
            id: req.id,
            peer_ur_ls: req.peer_ur_ls,
            ..Default::default()
        });
        let members = match self.server.propose(op, &who).await? {
            ApplyResponse::Members(ms) => ms,
            other => {
                return Err(to_status(Error::Corrupt(format!(
                    "member update answered with {other:?}"
                ))))
            }
        };
        Ok(Response::new(MemberUpdateResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            members,
        }))
    }

    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.server.raft.read_index().await.map_err(to_status)?;
        }
        Ok(Response::new(MemberListResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            members: self.members()?,
        }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.server.check_admin(&self.server.caller(&req).await?)?;
        let metadata = req.metadata().clone();
        let req = req.into_inner();
        let target = self.member(req.id)?;
        if !target.is_learner {
            return Err(to_status(Error::MemberNotLearner));
        }
        if !self.server.raft.status().is_leader() {
            return self
                .forward_promote(req, &metadata)
                .await
                .map(Response::new);
        }
        if !self.learner_ready(req.id).await? {
            return Err(to_status(Error::LearnerNotReady));
        }
        let members = self
            .conf_change(ConfChangeType::AddNode, req.id, &target)
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(self.server.header(self.server.mvcc.current_revision())),
            members,
        }))
    }
}

/// A request to forward to another member, carrying the caller's token along.
fn with_credentials<T>(msg: T, from: &tonic::metadata::MetadataMap) -> Request<T> {
    let mut req = Request::new(msg);
    for key in ["token", "authorization"] {
        if let Some(v) = from.get(key) {
            req.metadata_mut().insert(key, v.clone());
        }
    }
    req
}
