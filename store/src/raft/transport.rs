//! Sending raft messages to peers over gRPC (`pontoonpeer.RaftPeer`).
//!
//! One task per peer owns a long-lived client stream (`RaftPeer.Send`). The raft
//! thread never waits on the network: [`PeerTransport::send`] puts each message on the
//! peer's **bounded** queue and returns; a full queue (a dead or slow peer) drops the
//! message and reports the peer unreachable to raft, which resends what matters. So a
//! dead peer costs at most [`QUEUE_MESSAGES`] messages of memory.
//!
//! The task batches whatever is queued into one `RaftBatch`, reconnects with
//! exponential backoff (up to [`MAX_BACKOFF`]) when the stream breaks, and drops
//! messages queued while the peer is unreachable (they are stale by the time it
//! returns; raft retransmits).
//!
//! `MsgSnapshot` travels separately (`RaftPeer.Snapshot`): the message's snapshot data
//! is the path of a local snapshot file, streamed in checksummed chunks; the outcome is
//! reported to raft (`report_snapshot`) so it resumes replication or retries.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ::raft::prelude::{Message, MessageType};
use protobuf::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use pontoon_proto::peer::raft_peer_client::RaftPeerClient;
use pontoon_proto::peer::{RaftBatch, SnapshotChunk};

/// Messages queued per peer before new ones are dropped.
pub const QUEUE_MESSAGES: usize = 4096;
/// Messages sent in one `RaftBatch` at most.
const BATCH_MESSAGES: usize = 512;
/// Snapshot file bytes per chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What the transport tells the raft thread.
#[derive(Debug)]
pub enum Report {
    Unreachable(u64),
    Snapshot {
        to: u64,
        ok: bool,
    },
    /// A peer refused our traffic because this member was removed from the cluster
    /// (possibly before this member applied its own removal: a removed member may
    /// never receive that entry). As etcd does, the member must stop.
    Removed,
}

pub type Reporter = Arc<dyn Fn(Report) + Send + Sync>;

/// Where raft messages go. The raft thread calls [`Transport::send`] once per Ready.
pub trait Transport: Send + Sync {
    /// Queues messages; never blocks. Returns the peers that could not take theirs.
    fn send(&self, msgs: Vec<Message>) -> Vec<u64>;
    /// Called once by the raft node before the first `send`.
    fn attach(&self, reporter: Reporter);
}

/// A transport for a member with no peers (and for tests): drops everything.
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, msgs: Vec<Message>) -> Vec<u64> {
        msgs.iter().map(|m| m.to).collect()
    }
    fn attach(&self, _reporter: Reporter) {}
}

struct Peer {
    queue: mpsc::Sender<Message>,
    urls: watch::Sender<Vec<String>>,
    task: tokio::task::JoinHandle<()>,
}

/// The gRPC transport to the other members of the cluster.
pub struct PeerTransport {
    me: u64,
    cluster_id: u64,
    rt: tokio::runtime::Handle,
    peers: Mutex<HashMap<u64, Peer>>,
    reporter: OnceLock<Reporter>,
}

impl PeerTransport {
    pub fn new(me: u64, cluster_id: u64, rt: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(PeerTransport {
            me,
            cluster_id,
            rt,
            peers: Mutex::new(HashMap::new()),
            reporter: OnceLock::new(),
        })
    }

    fn report(&self, r: Report) {
        if let Some(f) = self.reporter.get() {
            f(r);
        }
    }

    /// Makes the peer set exactly `peers` (member ID, peer URLs), this member excluded:
    /// starts senders for new peers, updates URLs, stops senders of removed ones.
    pub fn set_peers(self: &Arc<Self>, peers: &[(u64, Vec<String>)]) {
        let mut map = self.peers.lock().expect("peers lock");
        map.retain(|id, p| {
            let keep = peers.iter().any(|(i, _)| i == id);
            if !keep {
                p.task.abort();
            }
            keep
        });
        for (id, urls) in peers {
            if *id == self.me {
                continue;
            }
            match map.get(id) {
                Some(p) => {
                    if *p.urls.borrow() != *urls {
                        p.urls.send_replace(urls.clone());
                    }
                }
                None => {
                    let (queue, rx) = mpsc::channel(QUEUE_MESSAGES);
                    let (urls_tx, urls_rx) = watch::channel(urls.clone());
                    let task = self.rt.spawn(run_peer(self.clone(), *id, urls_rx, rx));
                    self.rt.spawn(probe_peer(
                        std::sync::Arc::downgrade(self),
                        *id,
                        urls.clone(),
                    ));
                    map.insert(
                        *id,
                        Peer {
                            queue,
                            urls: urls_tx,
                            task,
                        },
                    );
                }
            }
        }
    }

    fn urls_of(&self, id: u64) -> Option<Vec<String>> {
        let map = self.peers.lock().expect("peers lock");
        map.get(&id).map(|p| p.urls.borrow().clone())
    }
}

impl Drop for PeerTransport {
    fn drop(&mut self) {
        for p in self.peers.lock().expect("peers lock").values() {
            p.task.abort();
        }
    }
}

impl Transport for Arc<PeerTransport> {
    fn send(&self, msgs: Vec<Message>) -> Vec<u64> {
        let mut unreachable = Vec::new();
        let map = self.peers.lock().expect("peers lock");
        for m in msgs {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                let this = self.clone();
                self.rt.spawn(async move {
                    let to = m.to;
                    let ok = match this.urls_of(to) {
                        Some(urls) => match send_snapshot(&this, &urls, m).await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::warn!(to = %format!("{to:x}"), error = %e, "sending snapshot failed");
                                false
                            }
                        },
                        None => false,
                    };
                    this.report(Report::Snapshot { to, ok });
                });
                continue;
            }
            let to = m.to;
            let sent = map.get(&to).is_some_and(|p| p.queue.try_send(m).is_ok());
            if !sent && !unreachable.contains(&to) {
                unreachable.push(to);
            }
        }
        unreachable
    }

    fn attach(&self, reporter: Reporter) {
        let _ = self.reporter.set(reporter);
    }
}

/// Turns a peer URL into a gRPC endpoint.
/// How this member dials another's URL (`https://` with the peer TLS settings).
pub(crate) fn endpoint(url: &str) -> Option<tonic::transport::Endpoint> {
    let mut e = tonic::transport::Endpoint::from_shared(url.to_string()).ok()?;
    if let Some(tls) = crate::server::tls::peer_client_tls(url) {
        e = e.tls_config(tls).ok()?;
    }
    Some(
        e.connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5)),
    )
}

async fn connect(
    urls: &[String],
    attempt: usize,
) -> Option<RaftPeerClient<tonic::transport::Channel>> {
    if urls.is_empty() {
        return None;
    }
    let url = &urls[attempt % urls.len()];
    let channel = endpoint(url)?.connect().await.ok()?;
    Some(
        RaftPeerClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    )
}

/// One peer's sender: connect, stream batches, reconnect on failure.
async fn run_peer(
    t: Arc<PeerTransport>,
    id: u64,
    urls: watch::Receiver<Vec<String>>,
    mut rx: mpsc::Receiver<Message>,
) {
    let mut attempt = 0usize;
    let mut backoff = Duration::from_millis(50);
    loop {
        let current = urls.borrow().clone();
        let Some(mut client) = connect(&current, attempt).await else {
            attempt += 1;
            // Unreachable: what is queued is stale; raft will resend.
            while rx.try_recv().is_ok() {}
            t.report(Report::Unreachable(id));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        };
        let (tx, stream_rx) = mpsc::channel::<RaftBatch>(4);
        let mut call =
            tokio::spawn(async move { client.send(ReceiverStream::new(stream_rx)).await });
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else {
                        call.abort();
                        return; // The peer was removed.
                    };
                    let mut batch = RaftBatch {
                        from: t.me,
                        cluster_id: t.cluster_id,
                        messages: Vec::with_capacity(8),
                    };
                    push(&mut batch, &m);
                    while batch.messages.len() < BATCH_MESSAGES {
                        match rx.try_recv() {
                            Ok(m) => push(&mut batch, &m),
                            Err(_) => break,
                        }
                    }
                    if tx.send(batch).await.is_err() {
                        break;
                    }
                    backoff = Duration::from_millis(50);
                }
                r = &mut call => {
                    if let Ok(Err(status)) = r {
                        tracing::debug!(peer = %format!("{id:x}"), %status, "peer stream closed");
                        if status.code() == tonic::Code::PermissionDenied
                            && status.message().contains("removed")
                        {
                            t.report(Report::Removed);
                        }
                    }
                    break;
                }
            }
        }
        call.abort();
        attempt += 1;
        t.report(Report::Unreachable(id));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Measures the round trip to a peer every few seconds (etcd's
/// `etcd_network_peer_round_trip_time_seconds`), for as long as the peer is known.
async fn probe_peer(t: std::sync::Weak<PeerTransport>, id: u64, urls: Vec<String>) {
    let mut client = None;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(transport) = t.upgrade() else {
            return;
        };
        if !transport
            .peers
            .lock()
            .expect("peers lock")
            .contains_key(&id)
        {
            return;
        }
        drop(transport);
        if client.is_none() {
            client = connect(&urls, 0).await;
        }
        if let Some(c) = client.as_mut() {
            let started = std::time::Instant::now();
            match c.members(pontoon_proto::peer::MembersRequest {}).await {
                Ok(_) => crate::metrics::METRICS.observe_peer_rtt(id, started.elapsed()),
                Err(_) => client = None,
            }
        }
    }
}

fn push(batch: &mut RaftBatch, m: &Message) {
    match m.write_to_bytes() {
        Ok(b) => batch.messages.push(b),
        Err(e) => tracing::error!(error = %e, "cannot encode a raft message"),
    }
}

/// Streams the snapshot file named by `m`'s snapshot data, then the message itself.
async fn send_snapshot(t: &PeerTransport, urls: &[String], mut m: Message) -> Result<(), String> {
    let path = String::from_utf8(m.get_snapshot().get_data().to_vec())
        .map_err(|_| "snapshot data is not a path".to_string())?;
    // The receiver stores the file under its own name.
    m.mut_snapshot().set_data(Vec::new().into());
    let message = m.write_to_bytes().map_err(|e| e.to_string())?;
    let mut client = connect(urls, 0).await.ok_or("peer unreachable")?;
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let (from, cluster_id) = (t.me, t.cluster_id);
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        let mut first = Some(message);
        loop {
            let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            let mut n = 0;
            while n < data.len() {
                match f.read(&mut data[n..]).map_err(|e| e.to_string())? {
                    0 => break,
                    k => n += k,
                }
            }
            data.truncate(n);
            let done = n == 0;
            if done && first.is_none() {
                return Ok(());
            }
            let chunk = SnapshotChunk {
                from,
                cluster_id,
                message: first.take().unwrap_or_default(),
                crc32: crc32fast::hash(&data),
                data,
            };
            if tx.blocking_send(chunk).is_err() {
                return Err("peer closed the snapshot stream".into());
            }
            if done {
                return Ok(());
            }
        }
    });
    let sent = client.snapshot(ReceiverStream::new(rx)).await;
    let read = reader.await.map_err(|e| e.to_string())?;
    sent.map_err(|s| s.message().to_string())?;
    read
}
