//! The raft driver: owns the raft-rs `RawNode`, makes its output durable, applies
//! committed entries, and completes the callers waiting on them.
//!
//! Two threads:
//!
//! - the **raft thread** owns the `RawNode` and the WAL. It batches everything that
//!   arrived since the last round (proposals, read-index requests, ticks), then
//!   processes one Ready in the order raft-rs's crate docs give: send messages, hand
//!   committed entries to the apply thread, append new entries and the hard state to
//!   the WAL and **fsync once** (group commit: every proposal of the round shares the
//!   fsync; none when the Ready only moves the commit index), send persisted
//!   messages, advance;
//! - the **apply thread** applies committed entries to the MVCC store in log order and
//!   completes each proposal's waiter with the result. It also decides when the state
//!   machine is durable enough for the raft log to be truncated.
//!
//! **Inline apply.** A small group of committed entries (at most [`INLINE_ENTRIES`])
//! that finds the apply thread idle, nothing queued for it, is applied by the raft
//! thread itself, under the same lock the apply thread holds while it works. Waking an
//! idle thread costs tens of microseconds on a virtual machine (its vCPU has halted),
//! a tenth of a lone client's put; under load the apply thread is busy or groups are
//! large, and applying overlaps the next fsync as before. Log order holds: the raft
//! thread is the only one that hands out entries, and it applies inline only when
//! every group it sent before has been applied.
//!
//! Nothing is acknowledged before the entry that carries it is fsynced in the WAL and
//! applied. A read-index request is answered once the leader has confirmed the commit
//! index for it; the caller then waits until the apply thread has reached that index.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, Snapshot,
    SnapshotMetadata,
};
use ::raft::{RawNode, SnapshotStatus, StateRole};
use prost::Message as _;
use protobuf::Message as _;
use tokio::sync::{oneshot, watch};

use pontoon_proto::etcdserverpb::Member;
use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::internal::{AuthHeader, InternalRequest};

use super::logger::raft_logger;
use super::storage::WalStorage;
use super::transport::{Report, Transport};
use crate::error::{Error, Result};
use crate::metrics::{Stage, METRICS};
use crate::mvcc::members::decode_member;
use crate::mvcc::snapshot::SnapshotFile;
use crate::mvcc::{Applied, ApplyResponse, Change, MemberChange, MvccStore};

/// What the apply loop tells the rest of the member. Called on the apply thread, in
/// log order; implementations must not block.
pub trait StateObserver: Send + Sync {
    /// The changes of one applied entry, in revision order (the watch hub).
    fn on_changes(&self, changes: Vec<Change>);
    /// The member list changed (or is known for the first time).
    fn on_members(&self, members: &[Member]);
    /// A snapshot replaced the whole state machine.
    fn on_snapshot_installed(&self);
    /// This member was removed from the cluster: it must stop.
    fn on_removed(&self);
    /// An auth entry applied: assign or drop tokens (they live outside the state
    /// machine).
    fn on_token(&self, effect: &crate::mvcc::TokenEffect);
}

/// Entries kept in the log after truncation, so a briefly lagging follower can catch
/// up without a snapshot (etcd keeps the same number). Never more than the snapshot
/// count, so every truncation drops entries.
const CATCH_UP_ENTRIES: u64 = 5000;
/// The most log entries reserved in memory up front (about 30 MiB of `Entry`
/// structs; their data is allocated separately as entries arrive).
const MAX_RESERVED_ENTRIES: u64 = 1 << 18;

/// How to create the raft log when the WAL does not exist yet.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    /// A new cluster of these members (all voters).
    New(Vec<Member>),
    /// Join a running cluster: start empty, learn everything from the leader.
    Join,
}

/// The largest group of committed entries the raft thread applies itself when the
/// apply thread is idle (see "Inline apply" above).
const INLINE_ENTRIES: usize = 4;

/// Forwarded proposals remembered before the answered ones are pruned.
const FORWARDED_PRUNE_AT: usize = 4096;

#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub id: u64,
    /// Used only when the log does not exist yet.
    pub bootstrap: Bootstrap,
    /// Where state-machine snapshot files are written and received.
    pub snap_dir: PathBuf,
    /// One raft tick: etcd's `--heartbeat-interval`.
    pub tick: Duration,
    /// Ticks without a leader before campaigning: `--election-timeout / --heartbeat-interval`.
    pub election_ticks: usize,
    /// Applied entries between raft log truncations: `--snapshot-count`.
    pub snapshot_count: u64,
}

/// What a caller learns about the node, updated by the raft thread.
#[derive(Debug, Default)]
pub struct RaftStatus {
    id: u64,
    term: AtomicU64,
    leader: AtomicU64,
    commit: AtomicU64,
    last_index: AtomicU64,
    applied: AtomicU64,
    is_learner: AtomicBool,
    stopped: AtomicBool,
    pub leader_changes: AtomicU64,
    pub proposals_committed: AtomicU64,
    pub proposals_applied: AtomicU64,
    pub proposals_pending: AtomicU64,
    pub proposals_failed: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub snapshots_installed: AtomicU64,
}

impl RaftStatus {
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn is_leader(&self) -> bool {
        self.leader() == self.id
    }
    /// The raft index of the last entry applied to the state machine.
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }
    pub fn is_learner(&self) -> bool {
        self.is_learner.load(Ordering::Acquire)
    }
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
    /// The leader's member id, 0 if none is known.
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Acquire)
    }
    pub fn commit_index(&self) -> u64 {
        self.commit.load(Ordering::Acquire)
    }
    pub fn last_index(&self) -> u64 {
        self.last_index.load(Ordering::Acquire)
    }
}

/// Answers a proposal; holds when it was proposed (for the stage histograms).
type Waiter = (oneshot::Sender<Result<ApplyResponse>>, Instant);
/// Learns the commit index a linearizable read must wait for.
type ReadWaiter = oneshot::Sender<Result<u64>>;

/// Proposals waiting for their entry to be applied, by request id.
#[derive(Default)]
struct Waiters(Mutex<HashMap<u64, Waiter>>);

impl Waiters {
    fn register(&self, id: u64, proposed: Instant) -> oneshot::Receiver<Result<ApplyResponse>> {
        let (tx, rx) = oneshot::channel();
        self.0
            .lock()
            .expect("waiters lock")
            .insert(id, (tx, proposed));
        rx
    }
    fn complete(&self, id: u64, r: Result<ApplyResponse>) {
        // Removed under the lock, answered outside it.
        let waiter = self.0.lock().expect("waiters lock").remove(&id);
        if let Some((tx, proposed)) = waiter {
            METRICS.proposal_stage(Stage::Applied, proposed.elapsed());
            let _ = tx.send(r);
        }
    }
    fn is_waiting(&self, id: u64) -> bool {
        self.0.lock().expect("waiters lock").contains_key(&id)
    }
    fn forget(&self, id: u64) {
        self.0.lock().expect("waiters lock").remove(&id);
    }
    fn fail_all(&self, e: impl Fn() -> Error) {
        for (_, (tx, _)) in self.0.lock().expect("waiters lock").drain() {
            let _ = tx.send(Err(e()));
        }
    }
}

/// Replication progress of one member, as the leader sees it.
#[derive(Clone, Debug)]
pub struct PeerProgress {
    pub id: u64,
    pub matched: u64,
}

enum Command {
    Propose {
        id: u64,
        data: Vec<u8>,
        proposed: Instant,
    },
    ProposeConfChange {
        id: u64,
        cc: ConfChange,
    },
    ReadIndex(oneshot::Sender<Result<u64>>),
    /// The state machine is durable up to this index: the log may be truncated.
    StateDurable(u64),
    /// A message from a peer.
    Step(Message),
    Report(Report),
    /// A state-machine snapshot file for sending was written (or failed).
    SnapshotReady(Result<SnapshotFile>),
    TransferLeader(u64),
    /// The leader's view of every member's progress; `None` if not the leader.
    Progress(oneshot::Sender<Option<Vec<PeerProgress>>>),
    Stop,
}

/// Work for the apply thread, in log order.
enum ApplyTask {
    /// Committed entries; conf changes at the `rejected` indexes were refused by raft
    /// (every member refuses the same ones) and change nothing.
    Entries {
        entries: Vec<Entry>,
        rejected: HashSet<u64>,
    },
    /// Replace the state machine with a received snapshot file.
    Snapshot {
        path: PathBuf,
        meta: SnapshotMetadata,
        done: mpsc::Sender<Result<()>>,
    },
}

/// The apply loop's state, shared by the apply thread and (see "Inline apply") the
/// raft thread.
struct ApplyShared {
    applier: Mutex<Applier>,
    /// Tasks sent to the apply thread and not yet done.
    queued: AtomicUsize,
}

/// A handle to a running raft node. Cheap to share behind an `Arc`.
pub struct RaftNode {
    tx: Mutex<Sender<Command>>,
    waiters: Arc<Waiters>,
    status: Arc<RaftStatus>,
    applied: watch::Receiver<u64>,
    next_id: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    request_timeout: Duration,
    snap_dir: PathBuf,
}

/// The conf-change entries a new cluster's log starts with, one per member, sorted by
/// ID so that every member writes the same log.
fn bootstrap_entries(members: &[Member]) -> Result<Vec<Entry>> {
    let mut members = members.to_vec();
    members.sort_by_key(|m| m.id);
    members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut cc = ConfChange::default();
            cc.set_change_type(ConfChangeType::AddNode);
            cc.node_id = m.id;
            cc.context = m.encode_to_vec().into();
            let mut e = Entry::default();
            e.set_entry_type(EntryType::EntryConfChange);
            e.term = 1;
            e.index = i as u64 + 1;
            e.data = cc
                .write_to_bytes()
                .map_err(|err| Error::Raft(err.to_string()))?
                .into();
            Ok(e)
        })
        .collect()
}

impl RaftNode {
    /// Opens (or bootstraps) the raft log in `wal_dir` and starts the raft and apply
    /// threads. `on_fatal` is called once if the node must stop (an I/O or corruption
    /// error while persisting or applying): continuing could diverge from the log.
    pub fn start(
        cfg: RaftConfig,
        wal_dir: &Path,
        mvcc: Arc<MvccStore>,
        observer: Arc<dyn StateObserver>,
        transport: Arc<dyn Transport>,
        on_fatal: Arc<dyn Fn(Error) + Send + Sync>,
    ) -> Result<Arc<RaftNode>> {
        std::fs::create_dir_all(&cfg.snap_dir)?;
        let mut storage = if super::wal::Wal::exists(wal_dir) {
            WalStorage::open(wal_dir)?
        } else {
            match &cfg.bootstrap {
                Bootstrap::New(members) => {
                    let voters: Vec<u64> = members.iter().map(|m| m.id).collect();
                    let cs = ConfState::from((voters, Vec::<u64>::new()));
                    WalStorage::bootstrap(wal_dir, cs, bootstrap_entries(members)?)?
                }
                Bootstrap::Join => WalStorage::bootstrap(wal_dir, ConfState::default(), vec![])?,
            }
        };
        // A snapshot the state machine installed but the log never recorded (a crash
        // between the two): the log continues after it.
        if let Some(raw) = mvcc.installed_raft_snapshot()? {
            let meta = SnapshotMetadata::parse_from_bytes(&raw)
                .map_err(|e| Error::Corrupt(format!("stored raft snapshot metadata: {e}")))?;
            if meta.index > storage.last_index() {
                tracing::info!(
                    index = meta.index,
                    "log resumes after an installed snapshot"
                );
                storage.apply_snapshot(meta)?;
                storage.sync()?;
            }
        }
        let applied = mvcc.applied_index();
        if applied < storage.first_index() - 1 {
            return Err(Error::Corrupt(format!(
                "state machine applied index {applied} is behind the raft log start {}",
                storage.first_index()
            )));
        }
        if applied > storage.last_index() {
            return Err(Error::Corrupt(format!(
                "state machine applied index {applied} is ahead of the raft log end {}",
                storage.last_index()
            )));
        }
        // An applied entry was committed, even if the commit index recording it was
        // not yet synced when the member stopped.
        if storage.hard_state().commit < applied {
            storage.set_commit(applied)?;
            storage.sync()?;
        }
        let raft_cfg = ::raft::Config {
            id: cfg.id,
            election_tick: cfg.election_ticks.max(2),
            heartbeat_tick: 1,
            // Replay from the log start: conf changes after it must be re-applied to
            // raft; the apply thread skips entries the state machine already has.
            applied: storage.snapshot_index(),
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate()?;

        let (tx, rx) = mpsc::channel();
        let generating = Arc::new(AtomicBool::new(false));
        {
            let (tx, mvcc, dir, generating) = (
                Mutex::new(tx.clone()),
                mvcc.clone(),
                cfg.snap_dir.clone(),
                generating.clone(),
            );
            let seq = AtomicU64::new(0);
            storage.set_request_snapshot(Arc::new(move || {
                if generating.swap(true, Ordering::AcqRel) {
                    return;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let path = dir.join(format!("out-{}-{n}.snap", std::process::id()));
                let (mvcc, busy) = (mvcc.clone(), generating.clone());
                let tx = tx.lock().expect("sender lock").clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("snapshot".into())
                        .spawn(move || {
                            let r = mvcc.write_snapshot(&path);
                            busy.store(false, Ordering::Release);
                            let _ = tx.send(Command::SnapshotReady(r));
                        });
                if spawned.is_err() {
                    generating.store(false, Ordering::Release);
                }
            }));
        }

        // What the log holds between two truncations, and a little room for
        // truncation to come after a leader change (capped: a huge --snapshot-count
        // grows the log as it fills).
        let between_truncations = cfg.snapshot_count + CATCH_UP_ENTRIES.min(cfg.snapshot_count);
        storage.reserve(
            (between_truncations + between_truncations / 8).min(MAX_RESERVED_ENTRIES) as usize,
        );
        let mut raw = RawNode::new(&raft_cfg, storage, &raft_logger())?;
        let single =
            raw.raft.prs().is_singleton() && raw.raft.prs().conf().voters().contains(cfg.id);
        if single {
            // A lone voter need not wait an election timeout to lead (etcd advances its
            // ticks for the same reason).
            raw.campaign()?;
        }

        let (apply_tx, apply_rx) = mpsc::channel::<ApplyTask>();
        let (applied_tx, applied_rx) = watch::channel(applied);
        let waiters = Arc::new(Waiters::default());
        let status = Arc::new(RaftStatus {
            id: cfg.id,
            ..Default::default()
        });
        status.applied.store(applied, Ordering::Release);
        let prefix = (cfg.id & 0xffff) << 48;
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let node = Arc::new(RaftNode {
            tx: Mutex::new(tx.clone()),
            waiters: waiters.clone(),
            status: status.clone(),
            applied: applied_rx,
            next_id: AtomicU64::new(prefix | ((millis & 0xff_ffff_ffff) << 8)),
            threads: Mutex::new(Vec::new()),
            request_timeout: Duration::from_secs(5) + cfg.tick * (2 * cfg.election_ticks as u32),
            snap_dir: cfg.snap_dir.clone(),
        });
        {
            let tx = Mutex::new(tx.clone());
            transport.attach(Arc::new(move |r| {
                let _ = tx.lock().expect("sender lock").send(Command::Report(r));
            }));
        }

        let apply_waiters = waiters.clone();
        let apply = Arc::new(ApplyShared {
            applier: Mutex::new(Applier {
                id: cfg.id,
                mvcc,
                tx,
                waiters: waiters.clone(),
                observer,
                status: status.clone(),
                applied_tx,
                snapshot_count: cfg.snapshot_count.max(1),
                last_durable: applied,
                held: Vec::new(),
            }),
            queued: AtomicUsize::new(0),
        });
        let mut driver = Driver {
            raw,
            rx,
            apply_tx,
            apply: apply.clone(),
            transport,
            waiters: waiters.clone(),
            status: status.clone(),
            tick: cfg.tick,
            election_ticks: cfg.election_ticks,
            catch_up: CATCH_UP_ENTRIES.min(cfg.snapshot_count),
            queued: Vec::new(),
            forwarded: Vec::new(),
            appending: Vec::new(),
            reads_new: Vec::new(),
            reads_in_flight: HashMap::new(),
            next_read_ctx: 0,
            removed: false,
        };
        let fatal = on_fatal.clone();
        let raft_thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || {
                if let Err(e) = driver.run() {
                    tracing::error!(error = %e, "raft loop stopped");
                    driver.status.stopped.store(true, Ordering::Release);
                    driver.waiters.fail_all(|| Error::Stopped);
                    fatal(e);
                }
            })?;
        let apply_thread = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || {
                if let Err(e) = run_apply_thread(&apply, apply_rx) {
                    tracing::error!(error = %e, "apply loop stopped");
                    apply_waiters.fail_all(|| Error::Stopped);
                    on_fatal(e);
                }
            })?;
        node.threads
            .lock()
            .expect("threads lock")
            .extend([raft_thread, apply_thread]);
        Ok(node)
    }

    pub fn status(&self) -> &RaftStatus {
        &self.status
    }

    fn send(&self, c: Command) -> Result<()> {
        if self.status.stopped.load(Ordering::Acquire) {
            return Err(Error::Stopped);
        }
        self.tx
            .lock()
            .expect("sender lock")
            .send(c)
            .map_err(|_| Error::Stopped)
    }

    async fn wait(
        &self,
        id: u64,
        rx: oneshot::Receiver<Result<ApplyResponse>>,
    ) -> Result<ApplyResponse> {
        self.status
            .proposals_pending
            .fetch_add(1, Ordering::Relaxed);
        let r = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => {
                self.waiters.forget(id);
                Err(Error::Timeout)
            }
        };
        self.status
            .proposals_pending
            .fetch_sub(1, Ordering::Relaxed);
        if matches!(
            r,
            Err(Error::Timeout | Error::Stopped | Error::NoLeader | Error::LeaderChanged)
        ) {
            self.status.proposals_failed.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Proposes a write and waits until it is applied, returning the store's answer.
    pub async fn propose(&self, op: InternalOp) -> Result<ApplyResponse> {
        self.propose_as(op, None).await
    }

    /// Proposes a client's request: `header` names who asked, and the entry is
    /// checked against the auth state when it applies (`mvcc::auth`).
    pub async fn propose_as(
        &self,
        op: InternalOp,
        header: Option<AuthHeader>,
    ) -> Result<ApplyResponse> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let data = InternalRequest {
            id,
            request: Some(op),
            header,
        }
        .encode_to_vec();
        let proposed = Instant::now();
        let rx = self.waiters.register(id, proposed);
        if let Err(e) = self.send(Command::Propose { id, data, proposed }) {
            self.waiters.forget(id);
            return Err(e);
        }
        let r = self.wait(id, rx).await;
        METRICS.proposal_stage(Stage::Answered, proposed.elapsed());
        r
    }

    /// Proposes a membership change and waits until it is applied; answers with the
    /// new member list.
    pub async fn propose_conf_change(
        &self,
        change_type: ConfChangeType,
        node_id: u64,
        member: &Member,
    ) -> Result<ApplyResponse> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut cc = ConfChange::default();
        cc.set_change_type(change_type);
        cc.node_id = node_id;
        cc.id = id;
        cc.context = member.encode_to_vec().into();
        let rx = self.waiters.register(id, Instant::now());
        if let Err(e) = self.send(Command::ProposeConfChange { id, cc }) {
            self.waiters.forget(id);
            return Err(e);
        }
        self.wait(id, rx).await
    }

    /// Size in bytes of the log entry a proposal of `op` would write (before the
    /// auth header): the request plus the largest request id's field.
    pub fn proposal_size(op: &InternalOp) -> usize {
        /// Tag byte and a 10-byte varint.
        const ID_FIELD: usize = 11;
        op.encoded_len() + ID_FIELD
    }

    /// Linearizable read barrier: returns once this member has applied every entry
    /// committed before the call.
    pub async fn read_index(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::ReadIndex(tx))?;
        let index = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(Error::Stopped),
            Err(_) => return Err(Error::Timeout),
        };
        self.wait_applied(index).await
    }

    /// Returns once this member has applied the entry at `index` (`Timeout` after the
    /// request timeout).
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        if *self.applied.borrow() >= index {
            return Ok(());
        }
        let mut applied = self.applied.clone();
        let waited = tokio::time::timeout(self.request_timeout, applied.wait_for(|a| *a >= index))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Hands a message received from a peer to raft.
    pub fn step(&self, m: Message) -> Result<()> {
        self.send(Command::Step(m))
    }

    /// Where a snapshot received for `index` is stored before it is installed.
    pub fn incoming_snapshot_path(&self, index: u64) -> PathBuf {
        self.snap_dir.join(format!("in-{index:016x}.snap"))
    }

    /// Asks raft to hand leadership to `target` (leader only).
    pub fn transfer_leader(&self, target: u64) -> Result<()> {
        self.send(Command::TransferLeader(target))
    }

    /// The leader's view of each member's replication progress; `None` when this
    /// member is not the leader.
    pub async fn progress(&self) -> Result<Option<Vec<PeerProgress>>> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Progress(tx))?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Stops both threads after the work in hand; pending callers get `Stopped`.
    pub fn stop(&self) {
        let _ = self.send(Command::Stop);
        let threads: Vec<_> = self
            .threads
            .lock()
            .expect("threads lock")
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
        self.status.stopped.store(true, Ordering::Release);
        self.waiters.fail_all(|| Error::Stopped);
    }
}

struct Driver {
    raw: RawNode<WalStorage>,
    rx: Receiver<Command>,
    apply_tx: Sender<ApplyTask>,
    apply: Arc<ApplyShared>,
    transport: Arc<dyn Transport>,
    waiters: Arc<Waiters>,
    status: Arc<RaftStatus>,
    tick: Duration,
    election_ticks: usize,
    /// Entries kept behind a log truncation.
    catch_up: u64,
    /// Proposals held while no leader is known.
    queued: Vec<Queued>,
    /// Proposals forwarded to another member as leader: (waiter id, that leader).
    forwarded: Vec<(u64, u64)>,
    /// When each proposal this leader appended in the current round was made; the
    /// round's fsync makes them durable (the `persisted` stage).
    appending: Vec<Instant>,
    /// Read-index requests not yet sent to raft; they will share one round.
    reads_new: Vec<ReadWaiter>,
    /// Read-index rounds in flight, by context, with the ticks they have waited.
    reads_in_flight: HashMap<u64, (Vec<ReadWaiter>, usize)>,
    next_read_ctx: u64,
    /// A committed conf change removed this member: raft-rs must not be driven any
    /// further (a removed leader has no progress entry of its own, and advancing or
    /// proposing would panic inside raft-rs); the apply thread stops the member once
    /// it reaches the removal.
    removed: bool,
}

enum Queued {
    Normal(u64, Vec<u8>, Instant),
    ConfChange(u64, ConfChange),
}

impl Driver {
    fn run(&mut self) -> Result<()> {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(cmd) => {
                    if !self.on_command(cmd)? {
                        return Ok(());
                    }
                    // Batch everything else that is already waiting.
                    while let Ok(cmd) = self.rx.try_recv() {
                        if !self.on_command(cmd)? {
                            return Ok(());
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + self.tick;
                self.raw.tick();
                self.on_tick_reads();
            }
            self.flush_queued();
            self.issue_reads();
            self.on_ready()?;
            if self.removed {
                // Proposals still waiting may yet be committed by the others: they
                // stay unanswered (indeterminate) until the process stops.
                tracing::info!("this member's removal is committed; raft stops");
                return Ok(());
            }
        }
    }

    /// Returns false on `Stop`.
    fn on_command(&mut self, cmd: Command) -> Result<bool> {
        match cmd {
            Command::Propose { id, data, proposed } => {
                self.queued.push(Queued::Normal(id, data, proposed))
            }
            Command::ProposeConfChange { id, cc } => self.queued.push(Queued::ConfChange(id, cc)),
            Command::ReadIndex(tx) => self.reads_new.push(tx),
            Command::StateDurable(index) => {
                let upto = index.saturating_sub(self.catch_up);
                if upto >= self.raw.store().first_index() {
                    let started = Instant::now();
                    self.raw.mut_store().compact(upto)?;
                    tracing::info!(
                        compact_index = upto,
                        took_ms = started.elapsed().as_millis() as u64,
                        "truncated raft log"
                    );
                }
            }
            Command::Step(m) => {
                if let Err(e) = self.raw.step(m) {
                    tracing::debug!(error = %e, "dropped a peer message");
                }
            }
            Command::Report(Report::Unreachable(id)) => self.raw.report_unreachable(id),
            Command::Report(Report::Removed) => {
                tracing::warn!("peers refuse this member: it was removed from the cluster");
                return Err(Error::MemberRemoved);
            }
            Command::Report(Report::Snapshot { to, ok }) => {
                if ok {
                    self.status.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                }
                let st = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, st);
            }
            Command::SnapshotReady(r) => self.offer_snapshot(r),
            Command::TransferLeader(target) => self.raw.transfer_leader(target),
            Command::Progress(tx) => {
                let r = (self.raw.raft.state == StateRole::Leader).then(|| {
                    self.raw
                        .raft
                        .prs()
                        .iter()
                        .map(|(id, pr)| PeerProgress {
                            id: *id,
                            matched: pr.matched,
                        })
                        .collect()
                });
                let _ = tx.send(r);
            }
            Command::Stop => return Ok(false),
        }
        Ok(true)
    }

    /// A snapshot file for sending was written: offer it to raft-rs.
    fn offer_snapshot(&mut self, r: Result<SnapshotFile>) {
        let file = match r {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "writing a snapshot for a peer failed");
                return;
            }
        };
        let term = match ::raft::Storage::term(self.raw.store(), file.applied_index) {
            Ok(t) => t,
            Err(_) => {
                // The log moved past it meanwhile; raft will ask again.
                let _ = std::fs::remove_file(&file.path);
                return;
            }
        };
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = file.applied_index;
        meta.term = term;
        meta.set_conf_state(ConfState::from((file.voters, file.learners)));
        snap.data = file.path.to_string_lossy().as_bytes().to_vec().into();
        tracing::info!(
            index = file.applied_index,
            bytes = file.size,
            "snapshot ready to send"
        );
        if let Some(old) = self.raw.mut_store().set_outgoing(snap) {
            let _ = std::fs::remove_file(String::from_utf8_lossy(&old).as_ref());
        }
    }

    fn flush_queued(&mut self) {
        if self.raw.raft.leader_id == ::raft::INVALID_ID || self.queued.is_empty() {
            return;
        }
        for q in std::mem::take(&mut self.queued) {
            let (id, r) = match q {
                Queued::Normal(id, data, proposed) => {
                    METRICS.proposal_stage(Stage::Queued, proposed.elapsed());
                    if self.raw.raft.state == StateRole::Leader {
                        self.appending.push(proposed);
                    }
                    (id, self.raw.propose(Vec::new(), data))
                }
                Queued::ConfChange(id, cc) => (id, self.raw.propose_conf_change(Vec::new(), cc)),
            };
            if r.is_err() {
                self.waiters.complete(id, Err(Error::NoLeader));
            } else if self.raw.raft.state != StateRole::Leader {
                self.forwarded.push((id, self.raw.raft.leader_id));
            }
        }
        if self.forwarded.len() > FORWARDED_PRUNE_AT {
            let waiters = &self.waiters;
            self.forwarded.retain(|(id, _)| waiters.is_waiting(*id));
        }
    }

    /// Proposals forwarded to a leader that is no longer the leader were most likely
    /// lost with it: answer them now with etcd's "leader changed" instead of letting
    /// the caller wait out the request timeout. (Like a timeout, this does not say the
    /// write failed: the old leader may have replicated it before it went away.)
    fn on_leader_change(&mut self, leader: u64) {
        if self.forwarded.is_empty() {
            return;
        }
        let waiters = &self.waiters;
        self.forwarded.retain(|(id, to)| {
            if *to != leader {
                waiters.complete(*id, Err(Error::LeaderChanged));
                false
            } else {
                waiters.is_waiting(*id)
            }
        });
    }

    fn issue_reads(&mut self) {
        if self.reads_new.is_empty() || self.raw.raft.leader_id == ::raft::INVALID_ID {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.reads_in_flight
            .insert(ctx, (std::mem::take(&mut self.reads_new), 0));
    }

    /// raft-rs drops a read-index request silently when the leader has not yet
    /// committed an entry in its term, or leadership moves: retry, then give up.
    fn on_tick_reads(&mut self) {
        let limit = self.election_ticks * 3;
        let mut retry = Vec::new();
        self.reads_in_flight.retain(|ctx, (waiters, ticks)| {
            *ticks += 1;
            if *ticks > limit {
                for w in waiters.drain(..) {
                    let _ = w.send(Err(Error::Timeout));
                }
                return false;
            }
            if *ticks % 3 == 0 {
                retry.push(*ctx);
            }
            true
        });
        if self.raw.raft.leader_id != ::raft::INVALID_ID {
            for ctx in retry {
                self.raw.read_index(ctx.to_be_bytes().to_vec());
            }
        }
    }

    fn on_read_states(&mut self, states: Vec<::raft::ReadState>) {
        for rs in states {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some((waiters, _)) = self.reads_in_flight.remove(&u64::from_be_bytes(ctx)) {
                for w in waiters {
                    let _ = w.send(Ok(rs.index));
                }
            }
        }
    }

    fn send_messages(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        for id in self.transport.send(msgs) {
            self.raw.report_unreachable(id);
        }
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            let previous = self.status.leader.swap(ss.leader_id, Ordering::AcqRel);
            if ss.leader_id != previous {
                self.on_leader_change(ss.leader_id);
            }
            if ss.leader_id != previous && ss.leader_id != ::raft::INVALID_ID {
                self.status.leader_changes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    leader = %format!("{:x}", ss.leader_id),
                    term = self.raw.raft.term,
                    "leader elected"
                );
            }
        }
        self.send_messages(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(snap)?;
        }
        self.handle_committed(ready.take_committed_entries())?;
        if self.removed {
            // Entries of this Ready not yet persisted were never committed; the
            // cluster goes on without them and without this member.
            return Ok(());
        }
        if !ready.entries().is_empty() {
            self.raw.mut_store().append(ready.entries())?;
        }
        if let Some(hs) = ready.hs() {
            self.status.term.store(hs.term, Ordering::Release);
            self.raw.mut_store().set_hard_state(hs.clone())?;
        }
        // Group commit: one fsync covers every entry and the hard state of this Ready.
        // A Ready that only moves the commit index does not wait for the disk (raft's
        // MustSync, as in etcd: entries, term, vote or a snapshot must be durable
        // before messages that promise them go out; a commit index need not be, since
        // it is learned again from the leader, and at start-up from the applied
        // index). Its record is synced with the next Ready that must sync.
        if ready.must_sync() {
            self.raw.mut_store().sync()?;
        }
        for proposed in self.appending.drain(..) {
            METRICS.proposal_stage(Stage::Persisted, proposed.elapsed());
        }
        let persisted = ready.take_persisted_messages();
        self.send_messages(persisted);
        let reads = ready.take_read_states();
        self.on_read_states(reads);
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        let msgs = light.take_messages();
        self.send_messages(msgs);
        self.handle_committed(light.take_committed_entries())?;
        if self.removed {
            return Ok(());
        }
        self.raw.advance_apply();
        self.status
            .commit
            .store(self.raw.raft.raft_log.committed, Ordering::Release);
        self.status
            .last_index
            .store(self.raw.store().last_index(), Ordering::Release);
        self.status.is_learner.store(
            self.raw
                .raft
                .prs()
                .conf()
                .learners()
                .contains(&self.raw.raft.id),
            Ordering::Release,
        );
        Ok(())
    }

    /// Installs a snapshot received from the leader: the apply thread replaces the
    /// state machine (after every entry handed to it before), then the log restarts
    /// after the snapshot. The state machine goes first: a crash in between is
    /// repaired at start-up from the metadata the state machine stored.
    fn install_snapshot(&mut self, snap: Snapshot) -> Result<()> {
        let meta = snap.get_metadata().clone();
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing snapshot from leader"
        );
        let path = self.raw.store().snapshot_path_for(&snap);
        let (done_tx, done_rx) = mpsc::channel();
        self.to_apply(ApplyTask::Snapshot {
            path: path.clone(),
            meta: meta.clone(),
            done: done_tx,
        })?;
        done_rx.recv().map_err(|_| Error::Stopped)??;
        self.raw.mut_store().apply_snapshot(meta)?;
        self.raw.mut_store().sync()?;
        self.status
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        // Older received files are no longer needed.
        if let Some(dir) = path.parent() {
            for e in std::fs::read_dir(dir)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("in-") && e.path() != path {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Applies membership changes here (they change raft's own state) and hands every
    /// committed entry to the apply thread, in order.
    fn handle_committed(&mut self, mut entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut rejected = HashSet::new();
        let me = self.raw.raft.id;
        let mut removed_at = None;
        for (i, e) in entries.iter().enumerate() {
            let (cs, removes_me) = match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|err| Error::Corrupt(format!("conf change {}: {err}", e.index)))?;
                    let removes_me =
                        cc.get_change_type() == ConfChangeType::RemoveNode && cc.node_id == me;
                    (self.raw.apply_conf_change(&cc), removes_me)
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .map_err(|err| Error::Corrupt(format!("conf change {}: {err}", e.index)))?;
                    let removes_me = cc.get_changes().iter().any(|c| {
                        c.get_change_type() == ConfChangeType::RemoveNode && c.node_id == me
                    });
                    (self.raw.apply_conf_change(&cc), removes_me)
                }
                EntryType::EntryNormal => continue,
            };
            match cs {
                Ok(cs) => {
                    self.raw.mut_store().set_conf_state(e.index, cs);
                    if removes_me {
                        removed_at = Some(i);
                        break;
                    }
                }
                Err(err) => {
                    // Deterministic: every member refuses the same change.
                    tracing::warn!(index = e.index, error = %err, "conf change refused");
                    rejected.insert(e.index);
                }
            }
        }
        if let Some(i) = removed_at {
            // Nothing after our removal concerns us; the apply thread gets the entries
            // up to it.
            self.removed = true;
            entries.truncate(i + 1);
        }
        self.status
            .proposals_committed
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        let small = entries.len() <= INLINE_ENTRIES;
        let task = ApplyTask::Entries { entries, rejected };
        if small && self.apply.queued.load(Ordering::Acquire) == 0 {
            if let Ok(mut applier) = self.apply.applier.try_lock() {
                // Checked again under the lock: the apply thread takes it for every
                // task it has received, and counts a task done before letting go.
                if self.apply.queued.load(Ordering::Acquire) == 0 {
                    return applier.run_task(task);
                }
            }
        }
        self.to_apply(task)
    }

    /// Queues a task for the apply thread.
    fn to_apply(&self, task: ApplyTask) -> Result<()> {
        self.apply.queued.fetch_add(1, Ordering::AcqRel);
        self.apply_tx.send(task).map_err(|_| Error::Stopped)
    }
}

/// The apply thread: runs each task it is handed, in order.
fn run_apply_thread(shared: &ApplyShared, rx: Receiver<ApplyTask>) -> Result<()> {
    while let Ok(task) = rx.recv() {
        let mut applier = shared.applier.lock().expect("applier lock");
        let r = applier.run_task(task);
        shared.queued.fetch_sub(1, Ordering::AcqRel);
        drop(applier);
        r?;
    }
    Ok(())
}

struct Applier {
    id: u64,
    mvcc: Arc<MvccStore>,
    tx: Sender<Command>,
    waiters: Arc<Waiters>,
    observer: Arc<dyn StateObserver>,
    status: Arc<RaftStatus>,
    applied_tx: watch::Sender<u64>,
    snapshot_count: u64,
    last_durable: u64,
    /// Applied entries of the apply round not yet written (see `mvcc::round`): their
    /// answers and watch events wait until the round is in the engine.
    held: Vec<(u64, Applied)>,
}

impl Applier {
    fn run_task(&mut self, task: ApplyTask) -> Result<()> {
        match task {
            ApplyTask::Entries { entries, rejected } => {
                let mut last = None;
                for e in entries {
                    self.apply_one(&e, rejected.contains(&e.index))?;
                    last = Some(e.index);
                }
                self.end_round()?;
                if let Some(index) = last {
                    self.applied(index)?;
                }
            }
            ApplyTask::Snapshot { path, meta, done } => {
                let r = self.install(&path, &meta);
                let failed = r.as_ref().err().map(|e| Error::Corrupt(e.to_string()));
                let _ = done.send(r);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn install(&mut self, path: &Path, meta: &SnapshotMetadata) -> Result<()> {
        let raw = meta
            .write_to_bytes()
            .map_err(|e| Error::Raft(e.to_string()))?;
        self.mvcc.install_snapshot(path, &raw)?;
        self.last_durable = meta.index;
        self.status.applied.store(meta.index, Ordering::Release);
        self.applied_tx.send_replace(meta.index);
        self.observer.on_snapshot_installed();
        self.observer.on_members(&self.mvcc.members()?);
        Ok(())
    }

    fn applied(&mut self, index: u64) -> Result<()> {
        self.status.applied.store(index, Ordering::Release);
        self.applied_tx.send_replace(index);
        if index - self.last_durable >= self.snapshot_count {
            // Durable state machine first, then the log may forget the entries.
            self.mvcc.sync()?;
            self.last_durable = index;
            let _ = self.tx.send(Command::StateDurable(index));
        }
        Ok(())
    }

    /// Writes the apply round, then answers its entries.
    fn end_round(&mut self) -> Result<()> {
        self.mvcc.flush_round()?;
        self.deliver();
        Ok(())
    }

    /// Hands the held entries' changes to watchers and their answers to the callers,
    /// in apply order. Only once they are written.
    fn deliver(&mut self) {
        for (id, applied) in self.held.drain(..) {
            // Watchers first: a client that sees the response may start watching at once.
            if !applied.changes.is_empty() {
                self.observer.on_changes(applied.changes);
            }
            match &applied.response {
                Ok(ApplyResponse::Members(m)) => self.observer.on_members(m),
                Ok(ApplyResponse::Auth(effect)) => self.observer.on_token(effect),
                _ => {}
            }
            self.waiters.complete(id, applied.response);
        }
    }

    fn apply_one(&mut self, e: &Entry, rejected: bool) -> Result<()> {
        if e.index <= self.mvcc.applied_index() {
            return Ok(()); // Already applied before a restart.
        }
        self.status
            .proposals_applied
            .fetch_add(1, Ordering::Relaxed);
        match e.get_entry_type() {
            EntryType::EntryConfChange => {
                self.end_round()?;
                return self.apply_conf_change(e, rejected);
            }
            EntryType::EntryConfChangeV2 => {
                self.mvcc.apply_noop(e.index);
                return Ok(());
            }
            EntryType::EntryNormal if e.data.is_empty() => {
                self.mvcc.apply_noop(e.index);
                return Ok(());
            }
            EntryType::EntryNormal => {}
        }
        let req = InternalRequest::decode(&e.data[..])
            .map_err(|err| Error::Corrupt(format!("entry {}: {err}", e.index)))?;
        let applied = self.mvcc.apply_batched(e.index, &req)?;
        self.held.push((req.id, applied));
        if !self.mvcc.round_pending() {
            // Written: this entry alone, or a round that reached its bounds.
            self.deliver();
        }
        Ok(())
    }

    fn apply_conf_change(&self, e: &Entry, rejected: bool) -> Result<()> {
        let cc = ConfChange::parse_from_bytes(&e.data)
            .map_err(|err| Error::Corrupt(format!("conf change {}: {err}", e.index)))?;
        if rejected {
            self.mvcc.apply_noop(e.index);
            self.waiters.complete(
                cc.id,
                Err(Error::Raft("membership change refused by raft".into())),
            );
            return Ok(());
        }
        let change = match cc.get_change_type() {
            ConfChangeType::AddNode => match self.mvcc.member(cc.node_id)? {
                Some(m) if m.is_learner => MemberChange::Promote(cc.node_id),
                _ => MemberChange::Add(Member {
                    is_learner: false,
                    ..decode_member(&cc.context)?
                }),
            },
            ConfChangeType::AddLearnerNode => MemberChange::Add(Member {
                is_learner: true,
                ..decode_member(&cc.context)?
            }),
            ConfChangeType::RemoveNode => MemberChange::Remove(cc.node_id),
        };
        let members = self.mvcc.apply_member_change(e.index, &change)?;
        tracing::info!(index = e.index, ?change, "membership changed");
        self.observer.on_members(&members);
        self.waiters
            .complete(cc.id, Ok(ApplyResponse::Members(members)));
        if change == MemberChange::Remove(self.id) {
            // Stop raft at once: a removed leader must not go on acknowledging
            // anything (raft-rs keeps a removed leader leading) while the rest of
            // the process shuts down.
            self.status.stopped.store(true, Ordering::Release);
            let _ = self.tx.send(Command::Stop);
            self.observer.on_removed();
            return Err(Error::MemberRemoved);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pontoon_proto::etcdserverpb::PutRequest;

    #[test]
    fn proposal_size_is_the_encoded_entry_without_header() {
        for len in [0usize, 1, 300, 70_000] {
            let op = InternalOp::Put(PutRequest {
                key: b"k".to_vec(),
                value: vec![1; len],
                ..Default::default()
            });
            let full = InternalRequest {
                id: u64::MAX,
                request: Some(op.clone()),
                header: None,
            }
            .encoded_len();
            assert_eq!(RaftNode::proposal_size(&op), full);
        }
    }
}
