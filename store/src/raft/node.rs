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
//!   fsync), send persisted messages, advance;
//! - the **apply thread** applies committed entries to the MVCC store in log order and
//!   completes each proposal's waiter with the result. It also decides when the state
//!   machine is durable enough for the raft log to be truncated.
//!
//! Nothing is acknowledged before the entry that carries it is fsynced in the WAL and
//! applied. A read-index request is answered once the leader has confirmed the commit
//! index for it; the caller then waits until the apply thread has reached that index.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::raft::prelude::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType};
use ::raft::{RawNode, StateRole};
use prost::Message as _;
use protobuf::Message as _;
use tokio::sync::{oneshot, watch};

use pontoon_proto::internal::internal_request::Request as InternalOp;
use pontoon_proto::internal::InternalRequest;

use super::logger::raft_logger;
use super::storage::WalStorage;
use crate::error::{Error, Result};
use crate::mvcc::{ApplyResponse, Change, MvccStore};

/// Receives the changes of each applied entry, in revision order (the watch hub).
pub type OnApplied = Arc<dyn Fn(Vec<Change>) + Send + Sync>;

/// Entries kept in the log after truncation, so a briefly lagging follower can catch
/// up without a snapshot (etcd keeps the same number). Never more than the snapshot
/// count: each truncation rewrites the kept entries.
const CATCH_UP_ENTRIES: u64 = 5000;

#[derive(Clone, Debug)]
pub struct RaftConfig {
    pub id: u64,
    /// Voters of a new cluster; ignored when the log already exists.
    pub initial_voters: Vec<u64>,
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
    term: AtomicU64,
    leader: AtomicU64,
    commit: AtomicU64,
    last_index: AtomicU64,
    stopped: AtomicBool,
}

impl RaftStatus {
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

type Waiter = oneshot::Sender<Result<ApplyResponse>>;
/// Learns the commit index a linearizable read must wait for.
type ReadWaiter = oneshot::Sender<Result<u64>>;

/// Proposals waiting for their entry to be applied, by request id.
#[derive(Default)]
struct Waiters(Mutex<HashMap<u64, Waiter>>);

impl Waiters {
    fn register(&self, id: u64) -> oneshot::Receiver<Result<ApplyResponse>> {
        let (tx, rx) = oneshot::channel();
        self.0.lock().expect("waiters lock").insert(id, tx);
        rx
    }
    fn complete(&self, id: u64, r: Result<ApplyResponse>) {
        if let Some(tx) = self.0.lock().expect("waiters lock").remove(&id) {
            let _ = tx.send(r);
        }
    }
    fn forget(&self, id: u64) {
        self.0.lock().expect("waiters lock").remove(&id);
    }
    fn fail_all(&self, e: impl Fn() -> Error) {
        for (_, tx) in self.0.lock().expect("waiters lock").drain() {
            let _ = tx.send(Err(e()));
        }
    }
}

enum Command {
    Propose {
        id: u64,
        data: Vec<u8>,
    },
    ReadIndex(oneshot::Sender<Result<u64>>),
    /// The state machine is durable up to this index: the log may be truncated.
    StateDurable(u64),
    Stop,
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
}

impl RaftNode {
    /// Opens (or bootstraps) the raft log in `wal_dir` and starts the raft and apply
    /// threads. `on_fatal` is called once if the node must stop (an I/O or corruption
    /// error while persisting or applying): continuing could diverge from the log.
    pub fn start(
        cfg: RaftConfig,
        wal_dir: &Path,
        mvcc: Arc<MvccStore>,
        on_applied: OnApplied,
        on_fatal: Arc<dyn Fn(Error) + Send + Sync>,
    ) -> Result<Arc<RaftNode>> {
        let mut storage = if super::wal::Wal::exists(wal_dir) {
            WalStorage::open(wal_dir)?
        } else {
            let cs = ConfState::from((cfg.initial_voters.clone(), Vec::<u64>::new()));
            WalStorage::bootstrap(wal_dir, cs)?
        };
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
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_cfg.validate()?;
        let mut raw = RawNode::new(&raft_cfg, storage, &raft_logger())?;
        let single =
            raw.raft.prs().is_singleton() && raw.raft.prs().conf().voters().contains(cfg.id);
        if single {
            // A lone voter need not wait an election timeout to lead (etcd advances its
            // ticks for the same reason).
            raw.campaign()?;
        }

        let (tx, rx) = mpsc::channel();
        let (apply_tx, apply_rx) = mpsc::channel::<Vec<Entry>>();
        let (applied_tx, applied_rx) = watch::channel(applied);
        let waiters = Arc::new(Waiters::default());
        let status = Arc::new(RaftStatus::default());
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
        });

        let mut driver = Driver {
            raw,
            rx,
            apply_tx,
            waiters: waiters.clone(),
            status: status.clone(),
            tick: cfg.tick,
            election_ticks: cfg.election_ticks,
            catch_up: CATCH_UP_ENTRIES.min(cfg.snapshot_count),
            queued: Vec::new(),
            reads_new: Vec::new(),
            reads_in_flight: HashMap::new(),
            next_read_ctx: 0,
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
        let mut applier = Applier {
            mvcc,
            rx: apply_rx,
            tx,
            waiters,
            on_applied,
            applied_tx,
            snapshot_count: cfg.snapshot_count.max(1),
            last_durable: applied,
        };
        let apply_thread = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || {
                if let Err(e) = applier.run() {
                    tracing::error!(error = %e, "apply loop stopped");
                    applier.waiters.fail_all(|| Error::Stopped);
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

    /// Proposes a write and waits until it is applied, returning the store's answer.
    pub async fn propose(&self, op: InternalOp) -> Result<ApplyResponse> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let data = InternalRequest {
            id,
            request: Some(op),
        }
        .encode_to_vec();
        let rx = self.waiters.register(id);
        if let Err(e) = self.send(Command::Propose { id, data }) {
            self.waiters.forget(id);
            return Err(e);
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => {
                self.waiters.forget(id);
                Err(Error::Timeout)
            }
        }
    }

    /// Size in bytes of the log entry a proposal of `op` would write.
    pub fn proposal_size(op: &InternalOp) -> usize {
        InternalRequest {
            id: u64::MAX,
            request: Some(op.clone()),
        }
        .encoded_len()
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
        self.waiters.fail_all(|| Error::Stopped);
    }
}

struct Driver {
    raw: RawNode<WalStorage>,
    rx: Receiver<Command>,
    apply_tx: Sender<Vec<Entry>>,
    waiters: Arc<Waiters>,
    status: Arc<RaftStatus>,
    tick: Duration,
    election_ticks: usize,
    /// Entries kept behind a log truncation.
    catch_up: u64,
    /// Proposals held while no leader is known.
    queued: Vec<(u64, Vec<u8>)>,
    /// Read-index requests not yet sent to raft; they will share one round.
    reads_new: Vec<ReadWaiter>,
    /// Read-index rounds in flight, by context, with the ticks they have waited.
    reads_in_flight: HashMap<u64, (Vec<ReadWaiter>, usize)>,
    next_read_ctx: u64,
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
        }
    }

    /// Returns false on `Stop`.
    fn on_command(&mut self, cmd: Command) -> Result<bool> {
        match cmd {
            Command::Propose { id, data } => self.queued.push((id, data)),
            Command::ReadIndex(tx) => self.reads_new.push(tx),
            Command::StateDurable(index) => {
                let upto = index.saturating_sub(self.catch_up);
                if upto >= self.raw.store().first_index() {
                    tracing::info!(compact_index = upto, "truncating raft log");
                    self.raw.mut_store().compact(upto)?;
                }
            }
            Command::Stop => return Ok(false),
        }
        Ok(true)
    }

    fn flush_queued(&mut self) {
        if self.raw.raft.leader_id == ::raft::INVALID_ID || self.queued.is_empty() {
            return;
        }
        for (id, data) in std::mem::take(&mut self.queued) {
            if self.raw.propose(Vec::new(), data).is_err() {
                self.waiters.complete(id, Err(Error::NoLeader));
            }
        }
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

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            self.status.leader.store(ss.leader_id, Ordering::Release);
            if ss.raft_state == StateRole::Leader {
                tracing::info!(term = self.raw.raft.term, "became leader");
            }
        }
        // Single-member clusters have no peers to send to; the peer transport arrives
        // with multi-member clusters.
        let _ = ready.take_messages();
        if !ready.snapshot().is_empty() {
            return Err(Error::Raft(
                "installing a state-machine snapshot needs multi-member support".into(),
            ));
        }
        self.handle_committed(ready.take_committed_entries())?;
        if !ready.entries().is_empty() {
            self.raw.mut_store().append(ready.entries())?;
        }
        if let Some(hs) = ready.hs() {
            self.status.term.store(hs.term, Ordering::Release);
            self.raw.mut_store().set_hard_state(hs.clone())?;
        }
        // Group commit: one fsync covers every entry and the hard state of this Ready.
        self.raw.mut_store().sync()?;
        let _ = ready.take_persisted_messages();
        let reads = ready.take_read_states();
        self.on_read_states(reads);
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        let _ = light.take_messages();
        self.handle_committed(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.status
            .commit
            .store(self.raw.raft.raft_log.committed, Ordering::Release);
        self.status
            .last_index
            .store(self.raw.store().last_index(), Ordering::Release);
        Ok(())
    }

    /// Applies membership changes here (they change raft's own state) and hands every
    /// committed entry to the apply thread, in order.
    fn handle_committed(&mut self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in &entries {
            let cs = match e.get_entry_type() {
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|err| Error::Corrupt(format!("conf change {}: {err}", e.index)))?;
                    Some(self.raw.apply_conf_change(&cc)?)
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .map_err(|err| Error::Corrupt(format!("conf change {}: {err}", e.index)))?;
                    Some(self.raw.apply_conf_change(&cc)?)
                }
                EntryType::EntryNormal => None,
            };
            if let Some(cs) = cs {
                self.raw.mut_store().set_conf_state(cs);
            }
        }
        self.apply_tx.send(entries).map_err(|_| Error::Stopped)
    }
}

struct Applier {
    mvcc: Arc<MvccStore>,
    rx: Receiver<Vec<Entry>>,
    tx: Sender<Command>,
    waiters: Arc<Waiters>,
    on_applied: OnApplied,
    applied_tx: watch::Sender<u64>,
    snapshot_count: u64,
    last_durable: u64,
}

impl Applier {
    fn run(&mut self) -> Result<()> {
        while let Ok(entries) = self.rx.recv() {
            let mut last = None;
            for e in entries {
                self.apply_one(&e)?;
                last = Some(e.index);
            }
            if let Some(index) = last {
                self.applied_tx.send_replace(index);
                if index - self.last_durable >= self.snapshot_count {
                    // Durable state machine first, then the log may forget the entries.
                    self.mvcc.sync()?;
                    self.last_durable = index;
                    let _ = self.tx.send(Command::StateDurable(index));
                }
            }
        }
        Ok(())
    }

    fn apply_one(&self, e: &Entry) -> Result<()> {
        if e.index <= self.mvcc.applied_index() {
            return Ok(()); // Already applied before a restart.
        }
        if e.get_entry_type() != EntryType::EntryNormal || e.data.is_empty() {
            self.mvcc.apply_noop(e.index);
            return Ok(());
        }
        let req = InternalRequest::decode(&e.data[..])
            .map_err(|err| Error::Corrupt(format!("entry {}: {err}", e.index)))?;
        let applied = self.mvcc.apply(e.index, &req)?;
        // Watchers first: a client that sees the response may start watching at once.
        if !applied.changes.is_empty() {
            (self.on_applied)(applied.changes);
        }
        self.waiters.complete(req.id, applied.response);
        Ok(())
    }
}
