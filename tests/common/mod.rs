//! Test harness: real `pontoon store` (and, for comparisons, real `etcd`) processes on
//! loopback ports, each with its own data directory.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on, never the same twice in one test process.
///
/// Ports come from below the kernel's ephemeral range (32768-60999 on Linux): a port
/// from that range, released here and bound by the server a moment later, can be
/// handed in between to any outgoing connection as its source port (seen as
/// `Address already in use`). Each process starts at its own offset.
pub fn free_port() -> u16 {
    const LOW: u32 = 15_000;
    const SPAN: u32 = 17_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        std::sync::atomic::Ordering::Relaxed,
        std::sync::atomic::Ordering::Relaxed,
    );
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (LOW + n % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Which server binary a [`Member`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Pontoon,
    Etcd,
}

/// One server process with its data directory.
pub struct Member {
    pub target: Target,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub extra_args: Vec<String>,
    /// `--name`; "default" for a single member.
    pub name: String,
    /// `--initial-cluster`; `<name>=<own peer URL>` when `None`.
    pub initial_cluster: Option<String>,
    /// `--initial-cluster-state`.
    pub cluster_state: &'static str,
    /// `http` or `https`, for the client and the peer URLs.
    pub client_scheme: &'static str,
    pub peer_scheme: &'static str,
    /// Added to every etcdctl call (TLS flags).
    pub etcdctl_args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    log: PathBuf,
}

impl Member {
    pub fn start(target: Target) -> Member {
        Self::start_with(target, &[])
    }

    pub fn start_with(target: Target, extra: &[&str]) -> Member {
        let mut m = Self::new(target, "default", extra);
        m.spawn();
        m
    }

    /// A member that is not started yet.
    pub fn new(target: Target, name: &str, extra: &[&str]) -> Member {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let log = tmp.path().join("server.log");
        Member {
            target,
            client_port: free_port(),
            peer_port: free_port(),
            data_dir,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            name: name.to_string(),
            initial_cluster: None,
            cluster_state: "new",
            client_scheme: "http",
            peer_scheme: "http",
            etcdctl_args: Vec::new(),
            _tmp: Some(tmp),
            child: None,
            log,
        }
    }

    pub fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.peer_scheme, self.peer_port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.client_scheme, self.client_port)
    }

    fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready();
    }

    /// Starts the process without waiting for it to serve.
    pub fn spawn_process(&mut self) {
        let client = self.endpoint();
        let peer = self.peer_url();
        let mut cmd = match self.target {
            Target::Pontoon => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_pontoon"));
                c.arg("store");
                c
            }
            Target::Etcd => Command::new("etcd"),
        };
        let cluster = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={peer}", self.name));
        cmd.args([
            "--name",
            &self.name,
            "--initial-cluster-state",
            self.cluster_state,
            "--data-dir",
            self.data_dir.to_str().expect("utf-8 path"),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
        ]);
        cmd.args(&self.extra_args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open server log");
        cmd.stdout(Stdio::null()).stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", self.target));
        self.child = Some(child);
    }

    /// Waits until the server answers a linearizable read.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{:?} exited with {status}:\n{}",
                    self.target,
                    self.log_text()
                );
            }
            let out = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoint(), "--command-timeout=1s"])
                .args(&self.etcdctl_args)
                .args(["get", "ready-probe"])
                .output();
            if matches!(&out, Ok(o) if o.status.success()) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{:?} did not become ready:\n{}",
                    self.target,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process stays, its threads stop (a stalled disk or VM).
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let c = self.child.as_ref().expect("member is running");
        let st = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill {sig} {}", c.id());
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the member first");
        self.spawn();
    }

    /// The process's exit status once it has exited by itself, waiting up to `d`.
    pub fn wait_exit(&mut self, d: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + d;
        loop {
            let st = self.child.as_mut()?.try_wait().ok().flatten();
            if let Some(st) = st {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs etcdctl against this member; returns (success, stdout, stderr).
    pub fn etcdctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(&self.etcdctl_args)
            .args(args)
            .output()
            .expect("run etcdctl (apt-get install etcd-client)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs etcdctl with `stdin` (for `etcdctl txn`).
    pub fn etcdctl_stdin(&self, args: &[&str], stdin: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint())
            .args(&self.etcdctl_args)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("etcdctl output");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None)
            .await
            .expect("connect etcd client")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A cluster of members on loopback, started together.
pub struct Cluster {
    pub members: Vec<Member>,
}

impl Cluster {
    pub fn start(target: Target, n: usize, extra: &[&str]) -> Cluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        Self::start_on(target, &ports, extra)
    }

    /// A cluster whose members use these (client, peer) ports.
    pub fn start_on(target: Target, ports: &[(u16, u16)], extra: &[&str]) -> Cluster {
        Self::start_on_with(target, ports, extra, |_| {})
    }

    /// [`Self::start_on`], with each member adjusted by `configure` before it starts.
    pub fn start_on_with(
        target: Target,
        ports: &[(u16, u16)],
        extra: &[&str],
        configure: impl Fn(&mut Member),
    ) -> Cluster {
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let mut m = Member::new(target, &format!("m{}", i + 1), extra);
                m.client_port = *client;
                m.peer_port = *peer;
                configure(&mut m);
                m
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = Some(initial.clone());
            m.spawn_process();
        }
        for m in &mut members {
            m.wait_ready();
        }
        Cluster { members }
    }

    /// `--initial-cluster` naming every member plus `extra` (`name=url`).
    pub fn initial_cluster_with(&self, extra: &str) -> String {
        let mut parts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        parts.push(extra.to_string());
        parts.join(",")
    }

    /// Comma-separated client endpoints of the running members.
    pub fn endpoints(&mut self) -> String {
        self.members
            .iter_mut()
            .filter_map(|m| m.is_running().then(|| m.endpoint()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the member that reports itself leader, waiting up to `d`.
    pub async fn wait_leader(&mut self, d: Duration) -> Option<usize> {
        let deadline = Instant::now() + d;
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if !m.is_running() {
                    continue;
                }
                let ep = m.endpoint();
                let Ok(mut c) = etcd_client::Client::connect([ep], None).await else {
                    continue;
                };
                if let Ok(s) = c.status().await {
                    let id = s.header().map(|h| h.member_id()).unwrap_or(0);
                    if s.leader() == id && id != 0 {
                        return Some(i);
                    }
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// True if the real etcd server binary is installed (`apt-get install etcd-server`).
pub fn have_etcd() -> bool {
    Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The gRPC status of an etcd-client error.
pub fn grpc_status(e: &etcd_client::Error) -> (tonic::Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

/// Replaces what follows `pat` (up to the first char where `end` holds) with
/// `<label>`, everywhere in `s`.
pub fn mask(s: &str, pat: &str, label: &str, end: impl Fn(char) -> bool) -> String {
    let mut res = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(pat) {
        res.push_str(&rest[..i + pat.len()]);
        rest = &rest[i + pat.len()..];
        res.push_str(&format!("<{label}>"));
        rest = &rest[rest.find(&end).unwrap_or(rest.len())..];
    }
    res.push_str(rest);
    res
}

/// Masks what legitimately differs between two clusters: IDs and raft terms, and the
/// timestamp and connection name in etcdctl's own log lines.
pub fn normalize(s: &str) -> String {
    let mut out = s.to_string();
    for field in ["ts", "target"] {
        out = mask(&out, &format!("\"{field}\":\""), field, |c| c == '"');
    }
    for field in ["cluster_id", "member_id", "raft_term"] {
        out = mask(&out, &format!("\"{field}\":"), field, |c| {
            !c.is_ascii_digit()
        });
    }
    out
}

/// Runs `run` against a fresh real etcd and a fresh Pontoon and asserts that every
/// step printed the same.
pub fn must_match_etcd(run: impl Fn(&Member) -> Vec<String>) {
    assert!(
        have_etcd(),
        "this test compares with real etcd: apt-get install -y etcd-server"
    );
    let want = run(&Member::start(Target::Etcd));
    let got = run(&Member::start(Target::Pontoon));
    assert_eq!(want.len(), got.len());
    let diffs: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("--- etcd\n{w}--- pontoon\n{g}"))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} steps differ:\n{}",
        diffs.len(),
        want.len(),
        diffs.join("\n")
    );
}
