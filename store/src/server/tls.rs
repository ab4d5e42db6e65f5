//! TLS for the client and peer ports, configured with etcd's flags.
//!
//! - Client side: `--cert-file`, `--key-file`, `--trusted-ca-file`,
//!   `--client-cert-auth`; peer side: the `--peer-*` equivalents. An `https://`
//!   listen URL needs its certificate and key.
//! - `--client-cert-auth` requires a client certificate signed by the trusted CA; its
//!   subject's Common Name becomes the user when auth is on (a token, if sent, wins),
//!   as in etcd. Without it, client certificates are not asked for.
//! - **Reload**: before each handshake (at most once a second) the files' modification
//!   times are compared with those of the loaded configuration; a change loads them
//!   again, so rotated certificates are served without a restart. A reload that
//!   fails (say, a half-written file) keeps the previous configuration and is logged.
//! - Members dial each other (and each other's client URLs) with the peer certificate
//!   as their client identity and the peer CA as trust root ([`peer_client_tls`]).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Certificate files are checked for changes at most this often.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// One side's TLS files (client or peer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trusted_ca: Option<PathBuf>,
    /// Require and verify a client certificate signed by `trusted_ca`.
    pub client_cert_auth: bool,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.cert.as_path(), self.key.as_path()];
        p.extend(self.trusted_ca.as_deref());
        p
    }

    fn mtimes(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    fn load(&self) -> Result<ServerConfig> {
        let bad = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
            Error::Config(format!("TLS {what} {}: {e}", p.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|e| bad("certificate", &self.cert, &e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad("certificate", &self.cert, &e))?;
        if certs.is_empty() {
            return Err(bad("certificate", &self.cert, &"no certificate in file"));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| bad("key", &self.key, &e))?;
        let builder = ServerConfig::builder();
        let builder = match (&self.trusted_ca, self.client_cert_auth) {
            (Some(ca), true) => {
                let roots = Arc::new(load_roots(ca)?);
                let verifier = WebPkiClientVerifier::builder(roots)
                    .build()
                    .map_err(|e| bad("trusted CA", ca, &e))?;
                builder.with_client_cert_verifier(verifier)
            }
            (None, true) => {
                return Err(Error::Config(
                    "--client-cert-auth needs --trusted-ca-file".into(),
                ))
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("certificate/key pair", &self.cert, &e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn load_roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| Error::Config(format!("TLS trusted CA {}: {e}", ca.display())))?
    {
        let cert =
            cert.map_err(|e| Error::Config(format!("TLS trusted CA {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::Config(format!("TLS trusted CA {}: {e}", ca.display())))?;
    }
    Ok(roots)
}

/// A TLS acceptor whose configuration follows its files.
pub struct ReloadingAcceptor {
    files: TlsFiles,
    state: Mutex<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    mtimes: Vec<Option<SystemTime>>,
    checked: Instant,
}

impl ReloadingAcceptor {
    /// Loads the files now: a member with unusable TLS files does not start.
    pub fn new(files: TlsFiles) -> Result<Arc<Self>> {
        let config = files.load()?;
        Ok(Arc::new(ReloadingAcceptor {
            state: Mutex::new(Loaded {
                acceptor: TlsAcceptor::from(Arc::new(config)),
                mtimes: files.mtimes(),
                checked: Instant::now(),
            }),
            files,
        }))
    }

    fn current(&self) -> TlsAcceptor {
        let mut s = self.state.lock().expect("tls state");
        if s.checked.elapsed() >= RELOAD_CHECK {
            s.checked = Instant::now();
            let mtimes = self.files.mtimes();
            if mtimes != s.mtimes {
                match self.files.load() {
                    Ok(config) => {
                        tracing::info!(cert = %self.files.cert.display(), "reloaded TLS certificates");
                        s.acceptor = TlsAcceptor::from(Arc::new(config));
                        s.mtimes = mtimes;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but do not load; keeping the old ones")
                    }
                }
            }
        }
        s.acceptor.clone()
    }
}

/// What a request learns about its TLS connection (in its extensions).
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub remote: Option<SocketAddr>,
    /// The verified client certificate's subject Common Name.
    pub common_name: Option<String>,
}

/// An accepted, handshaken TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl TlsConn {
    pub fn info(&self) -> &TlsConnectInfo {
        &self.info
    }
}

/// The subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Accepts TCP connections and completes their handshakes concurrently (one slow
/// client does not hold up the others); yields the established ones.
pub fn incoming(
    listener: TcpListener,
    acceptor: Arc<ReloadingAcceptor>,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.current();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let common_name = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| common_name(c));
                        let conn = TlsConn {
                            inner: tls,
                            info: TlsConnectInfo {
                                remote: Some(remote),
                                common_name,
                            },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

delegate_async_read!([] TlsConn);

delegate_async_write!([] TlsConn);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// How members dial each other's `https://` URLs: the peer CA as trust root, the
/// peer certificate as client identity. Set once at start.
static PEER_CLIENT_TLS: OnceLock<tonic::transport::ClientTlsConfig> = OnceLock::new();

pub fn set_peer_client_tls(files: &TlsFiles) -> Result<()> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| Error::Config(format!("TLS {}: {e}", p.display())));
    let mut cfg =
        ClientTlsConfig::new().identity(Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    if let Some(ca) = &files.trusted_ca {
        cfg = cfg.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    let _ = PEER_CLIENT_TLS.set(cfg);
    Ok(())
}

/// The TLS settings for dialing `url` from this member, if it is `https://`.
pub fn peer_client_tls(url: &str) -> Option<tonic::transport::ClientTlsConfig> {
    if !url.starts_with("https://") {
        return None;
    }
    Some(PEER_CLIENT_TLS.get().cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_bad_files_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        let files = TlsFiles {
            cert: cert.clone(),
            key: dir.path().join("missing.key"),
            ..Default::default()
        };
        assert!(matches!(files.load(), Err(Error::Config(_))));
        let files = TlsFiles {
            cert: dir.path().join("nope.pem"),
            key: cert,
            trusted_ca: None,
            client_cert_auth: true,
        };
        assert!(matches!(files.load(), Err(Error::Config(_))));
        assert_eq!(common_name(b"garbage"), None);
    }
}
