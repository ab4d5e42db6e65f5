//! TLS on the client and peer ports with etcd's flags, tested with the real etcdctl:
//! server certificates, client certificate authentication (and the certificate's
//! Common Name as the auth user), certificates from a wrong CA refused, a cluster
//! whose members talk over mutually authenticated TLS, and certificates reloaded
//! when their files change. Every certificate is made here with `openssl`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{free_port, Cluster, Member, Target};

/// A throwaway PKI: a CA, a server certificate for 127.0.0.1, client certificates,
/// and a second, untrusted CA with a certificate of its own.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        pki.ca("ca", "pontoon-test-ca");
        pki.ca("other-ca", "someone-else");
        pki.leaf("server", "server", "ca", true);
        pki.leaf("alice", "alice", "ca", false);
        pki.leaf("root", "root", "ca", false);
        pki.leaf("mallory", "alice", "other-ca", false);
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    fn ca(&self, name: &str, cn: &str) {
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    /// A certificate for both server and client use, valid for 127.0.0.1.
    fn leaf(&self, name: &str, cn: &str, ca: &str, _server: bool) {
        let ext = self.dir.path().join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n",
        )
        .unwrap();
        openssl(
            self.dir.path(),
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            self.dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    /// etcdctl's TLS flags for a client presenting `who`'s certificate.
    fn etcdctl_as(&self, who: Option<&str>, trust: &str) -> Vec<String> {
        let mut v = vec![format!("--cacert={}", self.path(&format!("{trust}.crt")))];
        if let Some(w) = who {
            v.push(format!("--cert={}", self.path(&format!("{w}.crt"))));
            v.push(format!("--key={}", self.path(&format!("{w}.key"))));
        }
        v
    }
}

fn tls_member(pki: &Pki, client_cert_auth: bool) -> Member {
    let cert = format!("--cert-file={}", pki.path("server.crt"));
    let key = format!("--key-file={}", pki.path("server.key"));
    let ca = format!("--trusted-ca-file={}", pki.path("ca.crt"));
    let mut extra = vec![cert.as_str(), key.as_str(), ca.as_str()];
    if client_cert_auth {
        extra.push("--client-cert-auth");
    }
    let mut m = Member::new(Target::Pontoon, "default", &extra);
    m.client_scheme = "https";
    m.etcdctl_args = pki.etcdctl_as(client_cert_auth.then_some("root"), "ca");
    m.spawn_process();
    m.wait_ready();
    m
}

/// Runs etcdctl against `m` with exactly these TLS flags.
fn etcdctl(m: &Member, tls: Vec<String>, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", m.endpoint()))
        .arg("--command-timeout=3s")
        .args(tls)
        .args(args)
        .output()
        .expect("etcdctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn server_tls_without_client_certificates() {
    let pki = Pki::new();
    let m = tls_member(&pki, false);
    let (ok, out, err) = etcdctl(&m, pki.etcdctl_as(None, "ca"), &["put", "k", "v"]);
    assert!(ok && out == "OK\n", "{out}{err}");
    let (ok, out, _) = etcdctl(&m, pki.etcdctl_as(None, "ca"), &["get", "k"]);
    assert!(ok && out == "k\nv\n");
    // A client that does not trust the server's CA refuses to talk.
    let (ok, _, _) = etcdctl(&m, pki.etcdctl_as(None, "other-ca"), &["get", "k"]);
    assert!(!ok, "untrusted server certificate accepted");
    // Plain HTTP/2 to the TLS port gets nowhere.
    let plain = m.endpoint().replace("https://", "http://");
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints={plain}"),
            "--command-timeout=2s",
            "get",
            "k",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn client_certificates_are_required_and_name_the_user() {
    let pki = Pki::new();
    let m = tls_member(&pki, true);
    let (ok, _, err) = etcdctl(
        &m,
        pki.etcdctl_as(Some("alice"), "ca"),
        &["put", "a/x", "1"],
    );
    assert!(ok, "{err}");
    let (ok, _, _) = etcdctl(&m, pki.etcdctl_as(None, "ca"), &["get", "a/x"]);
    assert!(!ok, "no client certificate: refused");
    let (ok, _, _) = etcdctl(&m, pki.etcdctl_as(Some("mallory"), "ca"), &["get", "a/x"]);
    assert!(!ok, "a certificate from another CA: refused");

    // With auth on, the certificate's CN is the user (etcd's client-cert-auth).
    let root = pki.etcdctl_as(Some("root"), "ca");
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "alice:alicepw"],
        &["role", "add", "reader"],
        &[
            "role",
            "grant-permission",
            "reader",
            "read",
            "a/",
            "--prefix",
        ],
        &["user", "grant-role", "alice", "reader"],
        &["auth", "enable"],
    ] {
        let (ok, out, err) = etcdctl(&m, root.clone(), args);
        assert!(ok, "{args:?}: {out}{err}");
    }
    let alice = pki.etcdctl_as(Some("alice"), "ca");
    let (ok, out, err) = etcdctl(&m, alice.clone(), &["get", "a/x"]);
    assert!(ok && out == "a/x\n1\n", "{out}{err}");
    let (ok, _, err) = etcdctl(&m, alice.clone(), &["put", "a/x", "2"]);
    assert!(!ok && err.contains("permission denied"), "{err}");
    // The root certificate is root: admin requests pass without a password.
    let (ok, out, err) = etcdctl(&m, root, &["user", "list"]);
    assert!(ok && out == "alice\nroot\n", "{out}{err}");
}

#[test]
fn members_talk_over_mutual_tls() {
    let pki = Pki::new();
    let flags = [
        format!("--peer-cert-file={}", pki.path("server.crt")),
        format!("--peer-key-file={}", pki.path("server.key")),
        format!("--peer-trusted-ca-file={}", pki.path("ca.crt")),
        "--peer-client-cert-auth".to_string(),
    ];
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let mut cluster = Cluster::start_on_with(Target::Pontoon, &ports, &extra, |m| {
        m.peer_scheme = "https";
    });
    let eps = cluster.endpoints();
    let (ok, out, err) = cluster.members[0].etcdctl(&["put", "over-tls", "yes"]);
    assert!(ok && out == "OK\n", "{out}{err}");
    for m in &cluster.members {
        let (ok, out, _) = m.etcdctl(&["get", "over-tls", "--consistency=s"]);
        assert!(ok);
        if out != "over-tls\nyes\n" {
            // Followers apply shortly after the leader answers.
            std::thread::sleep(Duration::from_millis(500));
            let (_, out, _) = m.etcdctl(&["get", "over-tls", "--consistency=s"]);
            assert_eq!(out, "over-tls\nyes\n");
        }
    }
    let (ok, out, _) = cluster.members[0].etcdctl(&["member", "list"]);
    assert!(ok);
    assert_eq!(out.matches("https://127.0.0.1:").count(), 3, "{out}");
    // The peer port refuses a client without a certificate from the peer CA.
    let peer = cluster.members[0].peer_url();
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "3", &format!("{peer}/health")])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "peer port served an anonymous client"
    );
    drop(eps);
}

/// Subject CN of the certificate the server presents now.
fn served_cn(port: u16, pki: &Pki) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-CAfile",
            &pki.path("ca.crt"),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("subject=").map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn certificates_are_reloaded_when_their_files_change() {
    let pki = Pki::new();
    let live: PathBuf = pki.dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    std::fs::copy(pki.path("server.crt"), live.join("tls.crt")).unwrap();
    std::fs::copy(pki.path("server.key"), live.join("tls.key")).unwrap();
    let cert = format!("--cert-file={}", live.join("tls.crt").display());
    let key = format!("--key-file={}", live.join("tls.key").display());
    let mut m = Member::new(Target::Pontoon, "default", &[&cert, &key]);
    m.client_scheme = "https";
    m.etcdctl_args = pki.etcdctl_as(None, "ca");
    m.spawn_process();
    m.wait_ready();
    assert!(served_cn(m.client_port, &pki).contains("CN = server"));
    // Rotate: the "alice" certificate (same CA, also valid for 127.0.0.1).
    std::fs::copy(pki.path("alice.key"), live.join("tls.key.new")).unwrap();
    std::fs::copy(pki.path("alice.crt"), live.join("tls.crt.new")).unwrap();
    std::fs::rename(live.join("tls.key.new"), live.join("tls.key")).unwrap();
    std::fs::rename(live.join("tls.crt.new"), live.join("tls.crt")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The first handshake after the change may still be served the old one.
        if served_cn(m.client_port, &pki).contains("CN = alice") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (ok, out, err) = m.etcdctl(&["put", "after-rotation", "1"]);
    assert!(ok && out == "OK\n", "{out}{err}");
}
