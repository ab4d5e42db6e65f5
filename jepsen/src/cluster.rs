//! A cluster of local server processes under test, and the faults the nemesis can
//! inject into it: `kill -9` and restart, SIGSTOP / SIGCONT, and network partitions.
//!
//! Partitions need no root: every member advertises a peer URL that points at a
//! proxy the harness owns, which forwards to the member's real peer listener. Cutting
//! a member off closes its proxy's connections and refuses new ones, so the member
//! hears nothing from its peers (its own messages still leave: an asymmetric
//! partition, which is enough to depose a leader and to leave the member's state
//! stale while clients can still reach it). The same works for etcd and Pontoon.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A TCP proxy in front of one member's peer port.
struct Proxy {
    blocked: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(listen: u16, to: u16) -> std::io::Result<Proxy> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await?;
        let (blocked, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = rx.clone();
                if *rx.borrow() {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|b| *b) => {}
                    }
                });
            }
        });
        Ok(Proxy { blocked, task })
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
    proxy: Proxy,
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
}

pub struct Cluster {
    pub target: Target,
    pub nodes: Vec<Node>,
    binary: PathBuf,
    initial: String,
    extra: Vec<String>,
    _dir: tempfile::TempDir,
    partitioned: Arc<AtomicBool>,
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
                proxy: Proxy::start(proxy_port, peer_port).await?,
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
            partitioned: Arc::new(AtomicBool::new(false)),
        };
        for i in 0..n {
            c.spawn(i, "new")?;
        }
        c.wait_healthy(Duration::from_secs(30)).await?;
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
        self.nodes[i].child = Some(cmd.spawn()?);
        self.nodes[i].paused = false;
        Ok(())
    }

    /// Waits until every running member answers a linearizable read.
    pub async fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for node in self.nodes.iter().filter(|n| n.is_up()) {
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
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "{} did not become healthy; log {}",
                        node.name,
                        node.log.display()
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

    /// Cuts member `i` off from its peers' traffic.
    pub fn isolate(&mut self, i: usize) {
        self.nodes[i].proxy.blocked.send_replace(true);
        self.partitioned.store(true, Ordering::Release);
    }

    /// Heals every fault: resumes paused members, restarts killed ones, reconnects.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i);
            }
            self.nodes[i].proxy.blocked.send_replace(false);
            self.restart(i)?;
        }
        self.partitioned.store(false, Ordering::Release);
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
