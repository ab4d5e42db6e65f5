//! The member process: configuration, identity, the gRPC services, auto-compaction,
//! and start-up and shutdown.
//!
//! [`EtcdServer`] ties the MVCC store to the raft node and fills etcd's response
//! header (cluster_id, member_id, revision, raft_term) on every answer.

/// Implements `tokio::io::AsyncWrite` for a connection wrapper by handing every call to
/// its `inner` stream: the wrappers (`tls::TlsConn`, `h2_authority::AuthorityFix`)
/// only change what is read or what is known about the peer (`coalesce::Coalesce`
/// writes itself and delegates the rest). Usage:
/// `delegate_async_write!([generics] Type);` (defined before the modules that use it).
macro_rules! delegate_async_write {
    ([$($generics:tt)*] $t:ty) => {
        impl<$($generics)*> tokio::io::AsyncWrite for $t {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}

/// Implements `tokio::io::AsyncRead` for a connection wrapper that only changes writes
/// (`tls::TlsConn`, `coalesce::Coalesce`) by handing reads to its `inner` stream.
/// Usage: `delegate_async_read!([generics] Type);`.
macro_rules! delegate_async_read {
    ([$($generics:tt)*] $t:ty) => {
        impl<$($generics)*> tokio::io::AsyncRead for $t {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
            }
        }
    };
}

/// Implements tonic's `Connected` for a connection wrapper by reporting its `inner`
/// stream's peer (`h2_authority::AuthorityFix`, `coalesce::Coalesce`).
/// Usage: `delegate_connected!(Type);` for a `Type<S>`.
macro_rules! delegate_connected {
    ($t:ident) => {
        impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for $t<S> {
            type ConnectInfo = S::ConnectInfo;
            fn connect_info(&self) -> Self::ConnectInfo {
                self.inner.connect_info()
            }
        }
    };
}

pub mod auth;
pub mod cluster;
pub mod coalesce;
pub mod compactor;
pub mod config;
pub mod corrupt;
pub mod gateway;
pub mod h2_authority;
pub mod http;
pub mod identity;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod peer;
pub mod status;
pub mod tls;
pub mod validate;
pub mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coalesce::Coalesce;
use tokio::sync::mpsc;
use tonic::Status;

use pontoon_proto::etcdserverpb::alarm_request::AlarmAction;
use pontoon_proto::etcdserverpb::auth_server::AuthServer;
use pontoon_proto::etcdserverpb::cluster_server::ClusterServer;
use pontoon_proto::etcdserverpb::kv_server::KvServer;
use pontoon_proto::etcdserverpb::lease_server::LeaseServer;
use pontoon_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use pontoon_proto::etcdserverpb::ResponseHeader;
use pontoon_proto::etcdserverpb::{AlarmRequest, AlarmType, Member};
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::internal::AuthHeader;
use pontoon_proto::peer::raft_peer_client::RaftPeerClient;
use pontoon_proto::peer::raft_peer_server::RaftPeerServer;
use pontoon_proto::peer::MembersRequest;
use pontoon_proto::v3electionpb::election_server::ElectionServer;
use pontoon_proto::v3lockpb::lock_server::LockServer;

use crate::auth::token::TokenProvider;
use crate::auth::AuthInfo;
use crate::error::{Error, Result};
use crate::mvcc::{ApplyResponse, MvccStore};
use crate::mvcc::{Change, TokenEffect};
use crate::raft::{Bootstrap, PeerTransport, RaftConfig, RaftNode, StateObserver};
use crate::watch::WatchHub;
pub use config::{StoreArgs, StoreConfig};
use status::to_status;

/// gRPC allows this much framing on top of `--max-request-bytes`, as etcd's does.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// The etcd version Pontoon reports (Maintenance.Status, /version). Kubernetes turns
/// on its watch-progress features only for etcd >= 3.5.13.
pub const SERVER_VERSION: &str = "3.5.17";
/// The cluster version reported by /version.
pub const CLUSTER_VERSION: &str = "3.5.0";

const META_MEMBER_ID: &str = "member_id";
const META_CLUSTER_ID: &str = "cluster_id";

pub struct EtcdServer {
    pub mvcc: Arc<MvccStore>,
    pub raft: Arc<RaftNode>,
    pub cluster_id: u64,
    pub member_id: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// `--max-range-response-bytes`.
    pub max_range_bytes: usize,
    /// `--max-watchers-per-stream`.
    pub max_watchers_per_stream: usize,
    /// Shortest lease TTL granted, in seconds (etcd's rule: 1.5 election timeouts,
    /// rounded up).
    pub min_lease_ttl: i64,
    /// Wakes up whenever a revision is published (the watch hub).
    pub published: Arc<WatchHub>,
    /// Where snapshot files are written (raft snapshots, Maintenance.Snapshot).
    pub snap_dir: PathBuf,
    /// How long a request may wait for raft (etcd's request timeout).
    pub request_timeout: Duration,
    /// `--quota-backend-bytes`; `None` when disabled.
    pub quota_bytes: Option<i64>,
    /// Backend size, cached for the quota check: (bytes, when measured in ms).
    size_cache: (AtomicI64, AtomicU64),
    /// Lease deadlines (meaningful on the leader).
    pub lessor: Arc<crate::lease::Lessor>,
    /// Connections to peers' `RaftPeer` service, for requests only the leader answers.
    peer_clients: tokio::sync::Mutex<
        std::collections::HashMap<u64, RaftPeerClient<tonic::transport::Channel>>,
    >,
    /// `--auth-token`: simple tokens (assigned as `Authenticate` entries apply) or JWT.
    pub tokens: Arc<TokenProvider>,
    pub bcrypt_cost: u32,
    /// `--client-cert-auth`: a verified client certificate's CN names the user.
    pub client_cert_auth: bool,
}

/// Bytes a write is charged on top of its size for the quota (etcd's kv overhead).
const QUOTA_OVERHEAD_BYTES: i64 = 256;
/// How long a measured backend size is reused by the quota check.
const SIZE_CACHE_MS: u64 = 500;

impl EtcdServer {
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: self.raft.status().term(),
        }
    }

    /// Completes a response header that carries the store revision.
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let revision = header
            .as_ref()
            .map_or_else(|| self.mvcc.current_revision(), |h| h.revision);
        *header = Some(self.header(revision));
    }

    /// Checks the size of a client's write and proposes it on behalf of `who`
    /// (whose permissions are checked when the entry applies).
    pub async fn propose(&self, op: InternalOp, who: &AuthInfo) -> Result<ApplyResponse, Status> {
        let size = RaftNode::proposal_size(&op);
        if size > self.max_request_bytes {
            return Err(to_status(Error::RequestTooLarge));
        }
        if crate::mvcc::grows_store(Some(&op)) {
            self.check_quota(size as i64)?;
        }
        let header = AuthHeader {
            username: who.username.clone(),
            auth_revision: who.revision,
        };
        self.raft
            .propose_as(op, Some(header))
            .await
            .map_err(to_status)
    }

    /// The backend size, measured at most every [`SIZE_CACHE_MS`].
    pub fn backend_size(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (size, at) = &self.size_cache;
        if now.saturating_sub(at.load(Ordering::Relaxed)) >= SIZE_CACHE_MS {
            size.store(self.mvcc.db_size().0, Ordering::Relaxed);
            at.store(now, Ordering::Relaxed);
        }
        size.load(Ordering::Relaxed)
    }

    /// A client to the current leader's peer service (for lease keep-alives and TTLs,
    /// which the leader's lessor answers).
    pub async fn leader_peer(&self) -> Result<RaftPeerClient<tonic::transport::Channel>, Status> {
        let leader = self.raft.status().leader();
        if leader == 0 {
            return Err(to_status(Error::NoLeader));
        }
        let mut clients = self.peer_clients.lock().await;
        if let Some(c) = clients.get(&leader) {
            return Ok(c.clone());
        }
        let member = self
            .mvcc
            .member(leader)
            .map_err(to_status)?
            .ok_or_else(|| to_status(Error::NoLeader))?;
        let mut last = to_status(Error::NoLeader);
        for url in &member.peer_ur_ls {
            let Some(endpoint) = crate::raft::transport::endpoint(url) else {
                continue;
            };
            match endpoint.connect().await {
                Ok(ch) => {
                    let c = RaftPeerClient::new(ch);
                    clients.insert(leader, c.clone());
                    return Ok(c);
                }
                Err(e) => last = Status::unavailable(format!("leader unreachable: {e}")),
            }
        }
        Err(last)
    }

    /// Forgets the cached backend size (after a defragmentation shrank it).
    pub fn invalidate_backend_size(&self) {
        self.size_cache.1.store(0, Ordering::Relaxed);
    }

    /// etcd's quota rule: a write that would take the backend past the quota is
    /// refused and raises the cluster-wide NOSPACE alarm (through raft).
    fn check_quota(&self, cost: i64) -> Result<(), Status> {
        let Some(quota) = self.quota_bytes else {
            return Ok(());
        };
        if self.mvcc.no_space() {
            return Err(to_status(Error::NoSpace));
        }
        if self.backend_size() + cost + QUOTA_OVERHEAD_BYTES <= quota {
            return Ok(());
        }
        let raft = self.raft.clone();
        let member_id = self.member_id;
        tokio::spawn(async move {
            let alarm = InternalOp::Alarm(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id,
                alarm: AlarmType::Nospace as i32,
            });
            if let Err(e) = raft.propose(alarm).await {
                tracing::warn!(error = %e, "raising the NOSPACE alarm failed");
            } else {
                tracing::warn!("backend quota exceeded: NOSPACE alarm raised");
            }
        });
        Err(to_status(Error::NoSpace))
    }

    /// Proposes a write whose answer is the response `pick` extracts (handing back
    /// any other), and completes that response's header.
    pub async fn propose_for<T: HasHeader>(
        &self,
        op: InternalOp,
        who: &AuthInfo,
        pick: fn(ApplyResponse) -> Result<T, ApplyResponse>,
    ) -> Result<T, Status> {
        let mut r = pick(self.propose(op, who).await?)
            .map_err(|other| to_status(Error::Corrupt(format!("apply answered with {other:?}"))))?;
        self.fill_header(r.header_mut());
        Ok(r)
    }
}

/// A response message with etcd's header.
pub trait HasHeader {
    fn header_mut(&mut self) -> &mut Option<ResponseHeader>;
}

macro_rules! has_header {
    ($($t:ty),*) => {
        $(impl HasHeader for $t {
            fn header_mut(&mut self) -> &mut Option<ResponseHeader> {
                &mut self.header
            }
        })*
    };
}

has_header!(
    pontoon_proto::etcdserverpb::PutResponse,
    pontoon_proto::etcdserverpb::DeleteRangeResponse,
    pontoon_proto::etcdserverpb::TxnResponse,
    pontoon_proto::etcdserverpb::CompactionResponse,
    pontoon_proto::etcdserverpb::LeaseGrantResponse,
    pontoon_proto::etcdserverpb::LeaseRevokeResponse,
    pontoon_proto::etcdserverpb::AlarmResponse
);

fn read_id(mvcc: &MvccStore, key: &str) -> Result<Option<u64>> {
    match mvcc.meta_get(key)? {
        Some(b) if b.len() == 8 => Ok(Some(u64::from_be_bytes(b.try_into().expect("8 bytes")))),
        Some(_) => Err(Error::Corrupt(format!("meta {key} is not 8 bytes"))),
        None => Ok(None),
    }
}

fn same_urls(a: &[String], b: &[String]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// `--initial-cluster-state existing`: asks the running members (the other entries of
/// `--initial-cluster`) for the cluster, and finds this member in it by its peer URLs,
/// as etcd does. The member must have been added (`etcdctl member add`) first.
async fn discover(cfg: &StoreConfig) -> Result<(u64, u64, Vec<Member>)> {
    let peers: Vec<&String> = cfg
        .initial_cluster
        .iter()
        .filter(|(name, _)| *name != cfg.name)
        .flat_map(|(_, urls)| urls)
        .collect();
    let mut last = String::from("no other member in --initial-cluster");
    for attempt in 0..20 {
        for url in &peers {
            let channel = match crate::raft::transport::endpoint(url) {
                Some(e) => e.connect().await.ok(),
                None => None,
            };
            let Some(mut c) = channel.map(RaftPeerClient::new) else {
                last = format!("cannot reach {url}");
                continue;
            };
            match c.members(MembersRequest {}).await {
                Ok(r) => {
                    let r = r.into_inner();
                    return match r
                        .members
                        .iter()
                        .find(|m| same_urls(&m.peer_ur_ls, &cfg.initial_advertise_peer_urls))
                    {
                        Some(m) => Ok((m.id, r.cluster_id, r.members.clone())),
                        None => Err(Error::Config(format!(
                            "member with peer URLs {} has not been added to the cluster \
                             (run `etcdctl member add {} --peer-urls={}` first)",
                            cfg.initial_advertise_peer_urls.join(","),
                            cfg.name,
                            cfg.initial_advertise_peer_urls.join(",")
                        ))),
                    };
                }
                Err(s) => last = format!("{url}: {}", s.message()),
            }
        }
        if attempt < 19 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Err(Error::Config(format!(
        "cannot fetch the cluster from its members: {last}"
    )))
}

/// Connects the apply loop to the watch hub, the peer transport and shutdown.
struct Observer {
    hub: Arc<WatchHub>,
    mvcc: Arc<MvccStore>,
    transport: Arc<PeerTransport>,
    fatal: mpsc::UnboundedSender<Error>,
    tokens: Arc<TokenProvider>,
}

impl StateObserver for Observer {
    fn on_changes(&self, changes: Vec<Change>) {
        self.hub.publish(changes);
    }
    fn on_members(&self, members: &[Member]) {
        let peers: Vec<(u64, Vec<String>)> = members
            .iter()
            .map(|m| (m.id, m.peer_ur_ls.clone()))
            .collect();
        self.transport.set_peers(&peers);
    }
    fn on_snapshot_installed(&self) {
        self.hub.reset(self.mvcc.current_revision());
    }
    fn on_removed(&self) {
        tracing::warn!("this member has been removed from the cluster; stopping");
        let _ = self.fatal.send(Error::MemberRemoved);
    }
    fn on_token(&self, effect: &TokenEffect) {
        match effect {
            TokenEffect::None => {}
            TokenEffect::Assign { token, user } => {
                if let TokenProvider::Simple(s) = self.tokens.as_ref() {
                    s.assign(token.clone(), user);
                }
            }
            TokenEffect::InvalidateUser(user) => self.tokens.invalidate_user(user),
            TokenEffect::ClearAll => self.tokens.clear(),
        }
    }
}

/// Publishes this member's name and client URLs through raft until the member list
/// shows them (etcd's "published local member to cluster").
async fn publish_attributes(server: Arc<EtcdServer>, name: String, client_urls: Vec<String>) {
    loop {
        if let Ok(Some(m)) = server.mvcc.member(server.member_id) {
            if m.name == name && m.client_ur_ls == client_urls {
                return;
            }
            let op = InternalOp::MemberAttributes(Member {
                id: server.member_id,
                name: name.clone(),
                client_ur_ls: client_urls.clone(),
                ..Default::default()
            });
            if server.raft.propose(op).await.is_ok() {
                tracing::info!(%name, "published local member to cluster");
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs a member until `shutdown` resolves (then stops cleanly) or a fatal error
/// stops it.
pub async fn run(cfg: StoreConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let member_dir = cfg.data_dir.join("member");
    let kv_dir = member_dir.join("kv");
    let snap_dir = member_dir.join("snap");
    std::fs::create_dir_all(&kv_dir)?;
    std::fs::create_dir_all(&snap_dir)?;
    let mvcc = Arc::new(MvccStore::open(&kv_dir)?);

    // Identity: fixed at bootstrap, as etcd's; later flags cannot change it.
    let wal_exists = crate::raft::wal::Wal::exists(&cfg.wal_dir);
    let stored = (
        read_id(&mvcc, META_MEMBER_ID)?,
        read_id(&mvcc, META_CLUSTER_ID)?,
    );
    // Members to talk to before the log has told us the membership.
    let mut known: Vec<Member> = Vec::new();
    let (member_id, cluster_id, bootstrap) = match stored {
        (Some(m), Some(c)) if wal_exists => (m, c, Bootstrap::Join),
        _ if cfg.initial_cluster_state_new => {
            let members: Vec<Member> = cfg
                .initial_cluster
                .iter()
                .map(|(name, urls)| Member {
                    id: identity::member_id(urls, &cfg.initial_cluster_token),
                    name: name.clone(),
                    peer_ur_ls: urls.clone(),
                    client_ur_ls: Vec::new(),
                    is_learner: false,
                })
                .collect();
            let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
            let member =
                identity::member_id(&cfg.initial_advertise_peer_urls, &cfg.initial_cluster_token);
            known = members.clone();
            (member, identity::cluster_id(&ids), Bootstrap::New(members))
        }
        _ => {
            let (m, c, members) = discover(&cfg).await?;
            known = members;
            (m, c, Bootstrap::Join)
        }
    };
    if stored.0.is_none() {
        mvcc.meta_put_sync(META_MEMBER_ID, &member_id.to_be_bytes())?;
        mvcc.meta_put_sync(META_CLUSTER_ID, &cluster_id.to_be_bytes())?;
    }
    if mvcc.is_removed(member_id)? {
        return Err(Error::MemberRemoved);
    }
    tracing::info!(
        name = %cfg.name,
        member_id = %format!("{member_id:x}"),
        cluster_id = %format!("{cluster_id:x}"),
        data_dir = %cfg.data_dir.display(),
        "starting member"
    );

    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<Error>();
    let on_fatal = {
        let fatal_tx = fatal_tx.clone();
        Arc::new(move |e: Error| {
            let _ = fatal_tx.send(e);
        })
    };
    let hub = Arc::new(WatchHub::new(mvcc.current_revision()));
    let transport = PeerTransport::new(member_id, cluster_id, tokio::runtime::Handle::current());
    // Peers: the stored member list, or the bootstrap members until entries apply.
    let mut peers: Vec<(u64, Vec<String>)> = mvcc
        .members()?
        .into_iter()
        .map(|m| (m.id, m.peer_ur_ls))
        .collect();
    if peers.is_empty() {
        peers = known.iter().map(|m| (m.id, m.peer_ur_ls.clone())).collect();
    }
    transport.set_peers(&peers);
    let tokens = Arc::new(TokenProvider::from_flag(
        &cfg.auth_token,
        cfg.auth_token_ttl,
    )?);
    let observer = Arc::new(Observer {
        hub: hub.clone(),
        mvcc: mvcc.clone(),
        transport: transport.clone(),
        fatal: fatal_tx,
        tokens: tokens.clone(),
    });
    let request_timeout = Duration::from_secs(5) + cfg.heartbeat * (2 * cfg.election_ticks as u32);
    let raft = RaftNode::start(
        RaftConfig {
            id: member_id,
            bootstrap,
            snap_dir: snap_dir.clone(),
            tick: cfg.heartbeat,
            election_ticks: cfg.election_ticks,
            snapshot_count: cfg.snapshot_count,
        },
        &cfg.wal_dir,
        mvcc.clone(),
        observer,
        Arc::new(transport.clone()),
        on_fatal,
    )?;
    let server = Arc::new(EtcdServer {
        mvcc,
        raft: raft.clone(),
        cluster_id,
        member_id,
        max_request_bytes: cfg.max_request_bytes,
        max_txn_ops: cfg.max_txn_ops,
        max_range_bytes: cfg.max_range_response_bytes,
        max_watchers_per_stream: cfg.max_watchers_per_stream,
        published: hub.clone(),
        min_lease_ttl: {
            let ms = (3 * cfg.election_ticks as u128 / 2) * cfg.heartbeat.as_millis();
            ms.div_ceil(1000) as i64
        },
        snap_dir,
        request_timeout,
        quota_bytes: cfg.quota_backend_bytes,
        size_cache: (AtomicI64::new(0), AtomicU64::new(0)),
        lessor: Arc::new(crate::lease::Lessor::default()),
        peer_clients: tokio::sync::Mutex::new(std::collections::HashMap::new()),
        tokens,
        bcrypt_cost: cfg.bcrypt_cost,
        client_cert_auth: cfg.client_tls.as_ref().is_some_and(|t| t.client_cert_auth),
    });
    let lessor = server.lessor.clone();
    let expiry = tokio::spawn(lease::run_expiry(server.clone(), lessor.clone()));
    let compactor = tokio::spawn(compactor::run(cfg.auto_compaction, server.clone()));
    let corrupt_check = cfg
        .corrupt_check_every
        .map(|every| tokio::spawn(corrupt::run(server.clone(), every)));
    let publisher = tokio::spawn(publish_attributes(
        server.clone(),
        cfg.name.clone(),
        cfg.advertise_client_urls.clone(),
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut listeners = Vec::new();
    let peer_acceptor = match &cfg.peer_tls {
        Some(files) => {
            tls::set_peer_client_tls(files)?;
            Some(tls::ReloadingAcceptor::new(files.clone())?)
        }
        None => None,
    };
    let client_acceptor = match &cfg.client_tls {
        Some(files) => Some(tls::ReloadingAcceptor::new(files.clone())?),
        None => None,
    };
    for (addr, https) in &cfg.listen_peer {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("listen on {addr}: {e}")))?;
        tracing::info!(address = %addr, tls = https, "serving peer traffic");
        let svc = RaftPeerServer::new(peer::PeerService::new(server.clone()))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(svc);
        listeners.push(match (https, &peer_acceptor) {
            (true, Some(acceptor)) => {
                tokio::spawn(router.serve_with_incoming_shutdown(
                    tls::incoming(listener, acceptor.clone()),
                    shutdown,
                ))
            }
            _ => tokio::spawn(router.serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown,
            )),
        });
    }
    for addr in &cfg.listen_metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("listen on {addr}: {e}")))?;
        tracing::info!(address = %addr, "serving /metrics and /health");
        let app = http::monitoring(server.clone());
        let mut stop = stop_rx.clone();
        listeners.push(tokio::spawn(
            tonic::transport::Server::builder()
                .accept_http1(true)
                .add_routes(app.into())
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                ),
        ));
    }
    for (addr, https) in &cfg.listen_client {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("listen on {addr}: {e}")))?;
        tracing::info!(address = %addr, tls = https, "serving client requests");
        let kv = KvServer::new(kv::KvService::new(server.clone()))
            .max_decoding_message_size(cfg.max_request_bytes + GRPC_OVERHEAD_BYTES)
            .max_encoding_message_size(usize::MAX);
        let watch = watch::WatchGrpc::new(
            watch::WatchService::new(
                server.clone(),
                hub.clone(),
                cfg.watch_progress_notify_interval,
            ),
            cfg.max_request_bytes + GRPC_OVERHEAD_BYTES,
        );
        let lease = LeaseServer::new(lease::LeaseService::new(server.clone(), lessor.clone()))
            .max_decoding_message_size(cfg.max_request_bytes + GRPC_OVERHEAD_BYTES);
        let lock = LockServer::new(lock::LockService::new(server.clone()));
        let election = ElectionServer::new(lock::ElectionService::new(server.clone()));
        let cluster = ClusterServer::new(cluster::ClusterService::new(server.clone()));
        let maintenance =
            MaintenanceServer::new(maintenance::MaintenanceService::new(server.clone()))
                .max_encoding_message_size(usize::MAX);
        let auth = AuthServer::new(auth::AuthService::new(server.clone()));
        let grpc = tonic::service::Routes::new(kv)
            .add_service(auth)
            .add_service(watch)
            .add_service(lease)
            .add_service(lock)
            .add_service(election)
            .add_service(cluster)
            .add_service(maintenance);
        let routes = http::routes(grpc.prepare().into_axum_router(), server.clone());
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .accept_http1(true)
            .add_routes(routes.into());
        listeners.push(match (https, &client_acceptor) {
            (true, Some(acceptor)) => {
                let incoming = tokio_stream::StreamExt::map(
                    tls::incoming(listener, acceptor.clone()),
                    |conn| conn.map(|s| Coalesce::new(h2_authority::AuthorityFix::new(s))),
                );
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
            }
            _ => {
                let incoming = tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    |conn| {
                        conn.map(|s| {
                            let _ = s.set_nodelay(true);
                            Coalesce::new(h2_authority::AuthorityFix::new(s))
                        })
                    },
                );
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
            }
        });
    }

    let outcome = tokio::select! {
        _ = shutdown => {
            tracing::info!("received shutdown signal; stopping");
            Ok(())
        }
        e = fatal_rx.recv() => Err(e.unwrap_or(Error::Stopped)),
    };
    let _ = stop_tx.send(true);
    compactor.abort();
    expiry.abort();
    publisher.abort();
    if let Some(c) = corrupt_check {
        c.abort();
    }
    for l in listeners {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), l).await;
    }
    let r = raft.clone();
    tokio::task::spawn_blocking(move || r.stop())
        .await
        .map_err(|e| Error::Raft(format!("stopping raft: {e}")))?;
    server.mvcc.sync()?;
    tracing::info!("stopped");
    outcome
}
