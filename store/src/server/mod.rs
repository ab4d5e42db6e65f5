//! The member process: configuration, identity, the gRPC services, auto-compaction,
//! and start-up and shutdown.
//!
//! [`EtcdServer`] ties the MVCC store to the raft node and fills etcd's response
//! header (cluster_id, member_id, revision, raft_term) on every answer.

pub mod compactor;
pub mod config;
pub mod identity;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod status;
pub mod validate;
pub mod watch;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::Status;

use pontoon_proto::etcdserverpb::kv_server::KvServer;
use pontoon_proto::etcdserverpb::lease_server::LeaseServer;
use pontoon_proto::etcdserverpb::watch_server::WatchServer;
use pontoon_proto::etcdserverpb::ResponseHeader;
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::v3electionpb::election_server::ElectionServer;
use pontoon_proto::v3lockpb::lock_server::LockServer;

use crate::error::{Error, Result};
use crate::mvcc::{ApplyResponse, MvccStore};
use crate::raft::{RaftConfig, RaftNode};
use crate::watch::WatchHub;
pub use config::{StoreArgs, StoreConfig};
use status::to_status;

/// gRPC allows this much framing on top of `--max-request-bytes`, as etcd's does.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

const META_MEMBER_ID: &str = "member_id";
const META_CLUSTER_ID: &str = "cluster_id";

pub struct EtcdServer {
    pub mvcc: Arc<MvccStore>,
    pub raft: Arc<RaftNode>,
    pub cluster_id: u64,
    pub member_id: u64,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// Shortest lease TTL granted, in seconds (etcd's rule: 1.5 election timeouts,
    /// rounded up).
    pub min_lease_ttl: i64,
    /// Wakes up whenever a revision is published (the watch hub).
    pub published: Arc<WatchHub>,
}

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

    /// Checks the size of a write and proposes it.
    pub async fn propose(&self, op: InternalOp) -> Result<ApplyResponse, Status> {
        if RaftNode::proposal_size(&op) > self.max_request_bytes {
            return Err(to_status(Error::RequestTooLarge));
        }
        self.raft.propose(op).await.map_err(to_status)
    }

    /// Proposes a write whose answer is the response `pick` extracts (handing back
    /// any other), and completes that response's header.
    pub async fn propose_for<T: HasHeader>(
        &self,
        op: InternalOp,
        pick: fn(ApplyResponse) -> Result<T, ApplyResponse>,
    ) -> Result<T, Status> {
        let mut r = pick(self.propose(op).await?)
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
    pontoon_proto::etcdserverpb::LeaseRevokeResponse
);

impl EtcdServer {}

fn read_id(mvcc: &MvccStore, key: &str) -> Result<Option<u64>> {
    match mvcc.meta_get(key)? {
        Some(b) if b.len() == 8 => Ok(Some(u64::from_be_bytes(b.try_into().expect("8 bytes")))),
        Some(_) => Err(Error::Corrupt(format!("meta {key} is not 8 bytes"))),
        None => Ok(None),
    }
}

/// Runs a member until `shutdown` resolves (then stops cleanly) or a fatal error
/// stops it.
pub async fn run(cfg: StoreConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let kv_dir = cfg.data_dir.join("member").join("kv");
    std::fs::create_dir_all(&kv_dir)?;
    let mvcc = Arc::new(MvccStore::open(&kv_dir)?);

    // Identity: fixed at bootstrap, as etcd's; later flags cannot change it.
    let (member_id, cluster_id) = match (
        read_id(&mvcc, META_MEMBER_ID)?,
        read_id(&mvcc, META_CLUSTER_ID)?,
    ) {
        (Some(m), Some(c)) => (m, c),
        _ => {
            let ids: Vec<u64> = cfg
                .initial_cluster
                .iter()
                .map(|(_, urls)| identity::member_id(urls, &cfg.initial_cluster_token))
                .collect();
            let member =
                identity::member_id(&cfg.initial_advertise_peer_urls, &cfg.initial_cluster_token);
            let cluster = identity::cluster_id(&ids);
            mvcc.meta_put_sync(META_MEMBER_ID, &member.to_be_bytes())?;
            mvcc.meta_put_sync(META_CLUSTER_ID, &cluster.to_be_bytes())?;
            (member, cluster)
        }
    };
    tracing::info!(
        name = %cfg.name,
        member_id = %format!("{member_id:x}"),
        cluster_id = %format!("{cluster_id:x}"),
        data_dir = %cfg.data_dir.display(),
        "starting member"
    );

    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel::<Error>();
    let on_fatal = Arc::new(move |e: Error| {
        let _ = fatal_tx.send(e);
    });
    let hub = Arc::new(WatchHub::new(mvcc.current_revision()));
    let publish = {
        let hub = hub.clone();
        Arc::new(move |changes| hub.publish(changes))
    };
    let raft = RaftNode::start(
        RaftConfig {
            id: member_id,
            initial_voters: vec![member_id],
            tick: cfg.heartbeat,
            election_ticks: cfg.election_ticks,
            snapshot_count: cfg.snapshot_count,
        },
        &cfg.wal_dir,
        mvcc.clone(),
        publish,
        on_fatal,
    )?;
    let server = Arc::new(EtcdServer {
        mvcc,
        raft: raft.clone(),
        cluster_id,
        member_id,
        max_request_bytes: cfg.max_request_bytes,
        max_txn_ops: cfg.max_txn_ops,
        published: hub.clone(),
        min_lease_ttl: {
            let ms = (3 * cfg.election_ticks as u128 / 2) * cfg.heartbeat.as_millis();
            ms.div_ceil(1000) as i64
        },
    });
    let lessor = Arc::new(crate::lease::Lessor::default());
    let expiry = tokio::spawn(lease::run_expiry(server.clone(), lessor.clone()));

    let compactor = tokio::spawn(compactor::run(cfg.auto_compaction, server.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut listeners = Vec::new();
    for addr in &cfg.listen_client {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("listen on {addr}: {e}")))?;
        tracing::info!(address = %addr, "serving client requests");
        let kv = KvServer::new(kv::KvService::new(server.clone()))
            .max_decoding_message_size(cfg.max_request_bytes + GRPC_OVERHEAD_BYTES)
            .max_encoding_message_size(usize::MAX);
        let watch = WatchServer::new(watch::WatchService::new(
            server.clone(),
            hub.clone(),
            cfg.watch_progress_notify_interval,
        ))
        .max_decoding_message_size(cfg.max_request_bytes + GRPC_OVERHEAD_BYTES)
        .max_encoding_message_size(usize::MAX);
        let lease = LeaseServer::new(lease::LeaseService::new(server.clone(), lessor.clone()))
            .max_decoding_message_size(cfg.max_request_bytes + GRPC_OVERHEAD_BYTES);
        let lock = LockServer::new(lock::LockService::new(server.clone()));
        let election = ElectionServer::new(lock::ElectionService::new(server.clone()));
        let mut stop = stop_rx.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        listeners.push(tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(kv)
                .add_service(watch)
                .add_service(lease)
                .add_service(lock)
                .add_service(election)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }),
        ));
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
