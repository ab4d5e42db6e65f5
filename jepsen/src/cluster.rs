//! A cluster of local server processes under test, and the faults the nemesis can
//! inject into it: `kill -9` and restart, SIGSTOP / SIGCONT, and network partitions.
//!
//! Partitions need no root: every member advertises a peer URL that points at a
//! proxy the harness owns, which forwards to the member's real peer listener. When a
//! connection arrives, the proxy finds which member opened it (the socket's inode in
//! /proc/net/tcp, among the open files of each member's process), so it can cut
//! single links: a cut link (a, b) closes a's connections into b's proxy and refuses
//! new ones. Partitions cut both directions of every link between two groups;
//! members outside every group keep their links (a bridge). Clients still reach
//! every member, so a cut-off member can serve stale local state to serializable
//! reads. The same works for etcd and Pontoon.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Pontoon,
    Etcd,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pontoon" => Ok(Target::Pontoon),
            "etcd" => Ok(Target::Etcd),
            other => Err(format!("unknown target {other:?} (pontoon or etcd)")),
        }
    }
}

/// A client for `endpoints` whose requests give up after `timeout` (and whose
/// connection attempt gives up after a second).
pub async fn connect(
    endpoints: Vec<String>,
    timeout: Duration,
) -> Result<etcd_client::Client, etcd_client::Error> {
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(Duration::from_secs(1));
    etcd_client::Client::connect(endpoints, Some(opts)).await
}

/// A workload client's connection: the client in `slot`, connecting to `endpoint`
/// first if there is none. A failed connect waits 200 ms and answers `None`, and the
/// caller tries again on its next turn (a workload sets `slot` back to `None` when a
/// request tells it the connection broke).
pub async fn connected<'a>(
    slot: &'a mut Option<etcd_client::Client>,
    endpoint: &str,
    timeout: Duration,
) -> Option<&'a mut etcd_client::Client> {
    if slot.is_none() {
        *slot = connect(vec![endpoint.to_string()], timeout).await.ok();
        if slot.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    slot.as_mut()
}

/// A loopback port nothing listens on, never the same twice in one run. Ports come
/// from below the kernel's ephemeral range (32768-60999 on Linux), so that no outgoing
/// connection can be handed the port between now and the member binding it (seen as
/// `Address already in use`); each process starts at its own offset.
fn free_port() -> u16 {
    const LOW: u32 = 15_000;
    const SPAN: u32 = 17_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + n % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The network between members: which directed links (from, to) are cut, and the
/// process ID of each member, to tell who opened a peer connection.
#[derive(Clone)]
struct Net {
    cut: watch::Sender<BTreeSet<(usize, usize)>>,
    pids: Arc<Mutex<Vec<Option<u32>>>>,
}

impl Net {
    /// Whether a connection from `from` (unknown: `None`) to member `to` must drop.
    /// An unknown source is refused while any link into `to` is cut.
    fn refuses(cut: &BTreeSet<(usize, usize)>, from: Option<usize>, to: usize) -> bool {
        match from {
            Some(f) => cut.contains(&(f, to)),
            None => cut.iter().any(|&(_, t)| t == to),
        }
    }
}

/// The inode of the socket whose local port is `local` and remote port `remote`.
fn socket_inode(local: u16, remote: u16) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |a: &str| {
                a.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if f.len() > 9 && port(f[1]) == Some(local) && port(f[2]) == Some(remote) {
                if let Ok(inode) = f[9].parse::<u64>() {
                    if inode != 0 {
                        return Some(inode);
                    }
                }
            }
        }
    }
    None
}

/// Which member owns the client end of a connection from `peer_port` to `proxy_port`
/// (found through /proc: the socket's inode among each member's open files).
fn connection_owner(peer_port: u16, proxy_port: u16, pids: &[Option<u32>]) -> Option<usize> {
    let inode = socket_inode(peer_port, proxy_port)?;
    let want = format!("socket:[{inode}]");
    pids.iter().enumerate().find_map(|(i, pid)| {
        let dir = std::fs::read_dir(format!("/proc/{}/fd", (*pid)?)).ok()?;
        dir.flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
            .then_some(i)
    })
}

/// A TCP proxy in front of one member's peer port; it drops connections over cut links.
struct Proxy {
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(listen: u16, to_port: u16, to: usize, net: Net) -> std::io::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, addr)) = listener.accept().await else {
                    continue;
                };
                let net = net.clone();
                tokio::spawn(async move {
                    let pids = net.pids.lock().expect("pids").clone();
                    let from = tokio::task::spawn_blocking(move || {
                        connection_owner(addr.port(), listen, &pids)
                    })
                    .await
                    .ok()
                    .flatten();
                    if std::env::var_os("JEPSEN_DEBUG_NET").is_some() {
                        eprintln!("proxy n{}: connection from {from:?}", to + 1);
                    }
                    let mut rx = net.cut.subscribe();
                    if Net::refuses(&rx.borrow_and_update(), from, to) {
                        let _ = inbound.shutdown().await;
                        return;
                    }
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", to_port)).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|cut| Net::refuses(cut, from, to)) => {}
                    }
                });
            }
        });
        Ok(Proxy { task })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Node {
    pub name: String,
    pub client_port: u16,
    /// The member's real peer listener.
    pub peer_port: u16,
    /// What the cluster dials: the proxy.
    pub proxy_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Removed and added back: restarts join the running cluster.
    rejoined: bool,
    _proxy: Proxy,
}

impl Node {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }
    pub fn is_paused(&self) -> bool {
        self.paused
    }
    /// The last `lines` lines of the member's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

pub struct Cluster {
    pub target: Target,
    pub nodes: Vec<Node>,
    binary: PathBuf,
    initial: String,
    extra: Vec<String>,
    _dir: tempfile::TempDir,
    net: Net,
}

impl Cluster {
    /// Starts `n` members of `target` (`binary` for Pontoon, `etcd` from PATH).
    pub async fn start(
        target: Target,
        n: usize,
        binary: &Path,
        extra: &[String],
    ) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("jepsen-cluster")
            .tempdir()?;
        if std::env::var_os("JEPSEN_KEEP").is_some() {
            eprintln!("cluster files: {}", dir.path().display());
        }
        let net = Net {
            cut: watch::channel(BTreeSet::new()).0,
            pids: Arc::new(Mutex::new(vec![None; n])),
        };
        let mut nodes = Vec::new();
        for i in 0..n {
            let (client_port, peer_port, proxy_port) = (free_port(), free_port(), free_port());
            nodes.push(Node {
                name: format!("n{}", i + 1),
                client_port,
                peer_port,
                proxy_port,
                data_dir: dir.path().join(format!("n{}", i + 1)),
                log: dir.path().join(format!("n{}.log", i + 1)),
                child: None,
                paused: false,
                rejoined: false,
                _proxy: Proxy::start(proxy_port, peer_port, i, net.clone()).await?,
            });
        }
        let initial = nodes
            .iter()
            .map(|n| format!("{}=http://127.0.0.1:{}", n.name, n.proxy_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            target,
            nodes,
            binary: binary.to_path_buf(),
            initial,
            extra: extra.to_vec(),
            _dir: dir,
            net,
        };
        for i in 0..n {
            c.spawn(i, "new")?;
        }
        c.wait_healthy(Duration::from_secs(60)).await?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize, state: &str) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let mut cmd = match self.target {
            Target::Pontoon => {
                let mut c = Command::new(&self.binary);
                c.arg("store");
                c
            }
            Target::Etcd => Command::new("etcd"),
        };
        let client = node.endpoint();
        cmd.args([
            "--name",
            &node.name,
            "--data-dir",
            node.data_dir.to_str().expect("utf-8 path"),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{}", node.peer_port),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{}", node.proxy_port),
            "--initial-cluster",
            &self.initial,
            "--initial-cluster-state",
            state,
        ]);
        cmd.args(&self.extra);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        cmd.stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn()?;
        self.net.pids.lock().expect("pids")[i] = Some(child.id());
        self.nodes[i].child = Some(child);
        self.nodes[i].paused = false;
        Ok(())
    }

    /// Waits until every running member answers a linearizable read. A member whose
    /// process has exited, or that is not serving by the deadline, is an error that
    /// carries the end of its log (the log lives in a temporary directory that is gone
    /// once the cluster is dropped).
    pub async fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for node in self.nodes.iter_mut().filter(|n| n.is_up()) {
            loop {
                let ok = async {
                    let mut c = connect(vec![node.endpoint()], Duration::from_secs(2))
                        .await
                        .ok()?;
                    c.get("jepsen-health", None).await.ok()
                }
                .await
                .is_some();
                if ok {
                    break;
                }
                let exited = node
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if let Some(status) = exited {
                    anyhow::bail!(
                        "{} exited ({status}) before serving; its log ends:\n{}",
                        node.name,
                        node.log_tail(40)
                    );
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "{} did not become healthy within {within:?}; its log ends:\n{}",
                        node.name,
                        node.log_tail(40)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Node::endpoint).collect()
    }

    /// The index of the member that says it leads, if one answers.
    pub async fn leader(&self) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_up() || node.paused {
                continue;
            }
            let Ok(mut c) = connect(vec![node.endpoint()], Duration::from_secs(1)).await else {
                continue;
            };
            if let Ok(s) = c.status().await {
                let me = s.header().map(|h| h.member_id()).unwrap_or(0);
                if me != 0 && s.leader() == me {
                    return Some(i);
                }
            }
        }
        None
    }

    pub fn kill(&mut self, i: usize) {
        self.net.pids.lock().expect("pids")[i] = None;
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
    }

    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        if self.nodes[i].child.is_none() {
            let state = if self.nodes[i].rejoined {
                "existing"
            } else {
                "new"
            };
            self.spawn(i, state)?;
        }
        Ok(())
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.nodes[i].child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    pub fn pause(&mut self, i: usize) {
        self.signal(i, "-STOP");
        self.nodes[i].paused = true;
    }

    pub fn resume(&mut self, i: usize) {
        self.signal(i, "-CONT");
        self.nodes[i].paused = false;
    }

    /// Membership change: removes member `i` through another member, wipes its data,
    /// adds it back under a new ID and starts it with `--initial-cluster-state existing`.
    pub async fn remove_and_readd(&mut self, i: usize) -> anyhow::Result<()> {
        let others: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != i && n.is_up() && !n.paused)
            .map(|(_, n)| n.endpoint())
            .collect();
        let mut c = connect(others, Duration::from_secs(5)).await?;
        let url = format!("http://127.0.0.1:{}", self.nodes[i].proxy_port);
        let member_id = |list: &etcd_client::MemberListResponse| {
            list.members()
                .iter()
                .find(|m| m.peer_urls().contains(&url))
                .map(|m| m.id())
        };
        let Some(id) = member_id(&c.member_list().await?) else {
            anyhow::bail!("{} is not a member", self.nodes[i].name);
        };
        // An error may still have removed it ("leader changed" when the leader
        // removes itself): look before trying again.
        for attempt in 0.. {
            match c.member_remove(id).await {
                Ok(_) => break,
                Err(e) if attempt >= 5 => return Err(e.into()),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Ok(list) = c.member_list().await {
                        if member_id(&list).is_none() {
                            break;
                        }
                    }
                }
            }
        }
        if std::env::var_os("JEPSEN_REMOVE_ONLY").is_some() {
            // Diagnostic mode: leave the removed member to stop by itself.
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.kill(i);
        let _ = std::fs::remove_dir_all(&self.nodes[i].data_dir);
        for attempt in 0.. {
            match c.member_add([url.clone()], None).await {
                Ok(_) => break,
                Err(e) if attempt >= 5 => return Err(e.into()),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Ok(list) = c.member_list().await {
                        if member_id(&list).is_some() {
                            break;
                        }
                    }
                }
            }
        }
        self.nodes[i].rejoined = true;
        self.spawn(i, "existing")
    }

    /// Cuts member `i` off from its peers, both ways.
    pub fn isolate(&mut self, i: usize) {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|j| *j != i).collect();
        self.partition(&[&[i], &others]);
    }

    /// Cuts every link between members of different groups (both ways); members in
    /// no group keep all their links (a bridge).
    pub fn partition(&mut self, groups: &[&[usize]]) {
        let mut cut = BTreeSet::new();
        for (g, a) in groups.iter().enumerate() {
            for (h, b) in groups.iter().enumerate() {
                if g != h {
                    for &x in *a {
                        for &y in *b {
                            cut.insert((x, y));
                        }
                    }
                }
            }
        }
        self.net.cut.send_replace(cut);
    }

    /// Heals every fault: resumes paused members, restarts killed ones, reconnects.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i);
            }
            self.restart(i)?;
        }
        self.net.cut.send_replace(BTreeSet::new());
        Ok(())
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("JEPSEN_KEEP").is_some() {
            let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().expect("tempdir"));
            let _ = dir.keep();
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i);
            }
            self.kill(i);
        }
    }
}
