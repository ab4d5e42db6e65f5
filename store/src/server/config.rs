//! `pontoon store` configuration: etcd's flags, defaults, meanings and `ETCD_*`
//! environment variables, so existing etcd deployment files work unchanged.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

pub use crate::duration::parse_go_duration;
use crate::error::{Error, Result};
use crate::server::tls::TlsFiles;

/// etcd's default backend quota: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: i64 = 2 << 30;

/// etcd's flags for a member. Every flag can also come from the environment variable
/// etcd reads for it (`--data-dir` from `ETCD_DATA_DIR`, ...).
#[derive(Args, Clone, Debug)]
pub struct StoreArgs {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory [default: <name>.pontoon].
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Path to the dedicated raft WAL directory [default: <data-dir>/member/wal].
    #[arg(long, env = "ETCD_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// URLs to listen on for client traffic, comma separated.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub listen_client_urls: String,
    /// This member's client URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379"
    )]
    pub advertise_client_urls: String,
    /// URLs to listen on for peer traffic, comma separated.
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// This member's peer URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping, `name=peerURL,...`
    /// [default: <name>=<initial-advertise-peer-urls>].
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Initial cluster state ('new' or 'existing').
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// Number of committed transactions to trigger a raft log truncation.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = 1_572_864)]
    pub max_request_bytes: u64,
    /// Raise alarms when backend size exceeds the given quota (0 defaults to low space
    /// quota; a negative value disables the quota).
    #[arg(
        long,
        env = "ETCD_QUOTA_BACKEND_BYTES",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub quota_backend_bytes: i64,
    /// Additional URLs to serve /metrics and /health on (plain http://), as etcd's
    /// flag; kubeadm points its liveness probe there.
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", default_value = "")]
    pub listen_metrics_urls: String,
    /// Check the store against the other members' before serving (accepted for
    /// etcd compatibility; Pontoon's periodic check is
    /// `--experimental-corrupt-check-time`).
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub experimental_initial_corrupt_check: bool,
    /// Maximum concurrent streams that each client connection can open.
    #[arg(long, env = "ETCD_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX)]
    pub max_concurrent_streams: u32,
    /// Pontoon: the most bytes of keys and values one Range may answer with (a
    /// larger answer is refused with ResourceExhausted; page with `limit`).
    #[arg(long, env = "PONTOON_MAX_RANGE_RESPONSE_BYTES", default_value_t = 1 << 30)]
    pub max_range_response_bytes: u64,
    /// Pontoon: the most watchers one Watch stream may hold.
    #[arg(
        long,
        env = "PONTOON_MAX_WATCHERS_PER_STREAM",
        default_value_t = 100_000
    )]
    pub max_watchers_per_stream: u64,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: u64,
    /// Interpret 'auto-compaction-retention' as hours ('periodic') or revisions
    /// ('revision').
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,
    /// Auto compaction retention for the MVCC key value store. 0 means disable.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,
    /// Duration of periodic watch progress notifications.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
        default_value = "10m"
    )]
    pub experimental_watch_progress_notify_interval: String,
    /// Duration of time between cluster corruption check passes (0 disables).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME",
        default_value = "0s"
    )]
    pub experimental_corrupt_check_time: String,
    /// Auth token type and options: `simple`, or
    /// `jwt,pub-key=<path>,priv-key=<path>,sign-method=<RS256|ES256|...>[,ttl=5m]`.
    #[arg(long, env = "ETCD_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// Time (in seconds) of the auth token time-to-live (simple tokens).
    #[arg(long, env = "ETCD_AUTH_TOKEN_TTL", default_value_t = 300)]
    pub auth_token_ttl: u64,
    /// Strength of hashing auth passwords (bcrypt cost, 4..=31).
    #[arg(long, env = "ETCD_BCRYPT_COST", default_value_t = 10)]
    pub bcrypt_cost: u32,
    /// Path to the client server TLS cert file.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Path to the client server TLS key file.
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Path to the client server TLS trusted CA cert file.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Enable client cert authentication (`--client-cert-auth` or `=true|false`, as
    /// etcd's Go flags take it).
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub client_cert_auth: bool,
    /// Path to the peer server TLS cert file.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// Path to the peer server TLS key file.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// Path to the peer server TLS trusted CA file.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Enable peer client cert authentication.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub peer_client_cert_auth: bool,
    /// Log level: debug, info, warn, error, panic, or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Automatic compaction, decoded from `--auto-compaction-mode/-retention`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    Disabled,
    /// Keep the last `retention` of history.
    Periodic(Duration),
    /// Keep the last `n` revisions.
    Revision(i64),
}

/// A validated member configuration.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub wal_dir: PathBuf,
    /// Where to listen, and whether with TLS (`https://`).
    pub listen_client: Vec<(SocketAddr, bool)>,
    pub listen_peer: Vec<(SocketAddr, bool)>,
    /// `--listen-metrics-urls`: where to serve the HTTP endpoints alone.
    pub listen_metrics: Vec<SocketAddr>,
    /// `--cert-file` etc.; `None` without a certificate.
    pub client_tls: Option<TlsFiles>,
    /// `--peer-cert-file` etc.
    pub peer_tls: Option<TlsFiles>,
    pub advertise_client_urls: Vec<String>,
    pub initial_advertise_peer_urls: Vec<String>,
    /// `(name, peer URLs)` of the bootstrap members.
    pub initial_cluster: Vec<(String, Vec<String>)>,
    pub initial_cluster_state_new: bool,
    pub initial_cluster_token: String,
    pub snapshot_count: u64,
    pub heartbeat: Duration,
    pub election_ticks: usize,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub max_concurrent_streams: u32,
    pub max_range_response_bytes: usize,
    pub max_watchers_per_stream: usize,
    /// Backend size that raises the NOSPACE alarm; `None` when disabled.
    pub quota_backend_bytes: Option<i64>,
    pub auto_compaction: AutoCompaction,
    pub watch_progress_notify_interval: Duration,
    /// `--experimental-corrupt-check-time`; `None` when disabled.
    pub corrupt_check_every: Option<Duration>,
    /// `--auth-token` as given (parsed when the member starts).
    pub auth_token: String,
    pub auth_token_ttl: Duration,
    pub bcrypt_cost: u32,
}

fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// Resolves `http://host:port` to the socket addresses to bind. `localhost` binds the
/// IPv4 loopback, as clients and the etcd default of 127.0.0.1:2379 expect.
pub fn listen_addrs(url: &str) -> Result<Vec<SocketAddr>> {
    let rest = if let Some(r) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    {
        r
    } else {
        return Err(Error::Config(format!(
            "{url}: URL scheme must be http:// or https:// (for example http://127.0.0.1:2379)"
        )));
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.contains('/') {
        return Err(Error::Config(format!("{url}: a listen URL has no path")));
    }
    let hostport = match hostport.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => hostport.to_string(),
    };
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("{url}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Config(format!("{url}: resolves to no address")));
    }
    Ok(addrs)
}

/// One side's TLS files from its flags: certificate and key come together.
fn tls_files(
    side: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    ca: &Option<PathBuf>,
    client_cert_auth: bool,
) -> Result<Option<TlsFiles>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            trusted_ca: ca.clone(),
            client_cert_auth,
        })),
        (None, None) => Ok(None),
        _ => Err(Error::Config(format!(
            "{side} TLS needs both a certificate and a key file"
        ))),
    }
}

fn parse_auto_compaction(mode: &str, retention: &str) -> Result<AutoCompaction> {
    let bad = || {
        Error::Config(format!(
            "invalid --auto-compaction-retention {retention:?} for mode {mode:?}"
        ))
    };
    match mode {
        "periodic" => {
            // A bare number is hours, as in etcd.
            let d = match retention.parse::<u64>() {
                Ok(h) => Duration::from_secs(h * 3600),
                Err(_) => parse_go_duration(retention).ok_or_else(bad)?,
            };
            Ok(if d.is_zero() {
                AutoCompaction::Disabled
            } else {
                AutoCompaction::Periodic(d)
            })
        }
        "revision" => {
            let n: i64 = retention.parse().map_err(|_| bad())?;
            if n < 0 {
                return Err(bad());
            }
            Ok(if n == 0 {
                AutoCompaction::Disabled
            } else {
                AutoCompaction::Revision(n)
            })
        }
        other => Err(Error::Config(format!(
            "unknown auto-compaction-mode {other:?} (use 'periodic' or 'revision')"
        ))),
    }
}

fn parse_initial_cluster(s: &str) -> Result<Vec<(String, Vec<String>)>> {
    let mut members: Vec<(String, Vec<String>)> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (name, url) = item.split_once('=').ok_or_else(|| {
            Error::Config(format!("--initial-cluster entry {item:?} is not name=url"))
        })?;
        match members.iter_mut().find(|(n, _)| n == name) {
            Some((_, urls)) => urls.push(url.to_string()),
            None => members.push((name.to_string(), vec![url.to_string()])),
        }
    }
    Ok(members)
}

impl StoreArgs {
    pub fn validate(&self) -> Result<StoreConfig> {
        if self.heartbeat_interval == 0 {
            return Err(Error::Config("--heartbeat-interval must be > 0".into()));
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(Error::Config(format!(
                "--election-timeout[{}ms] should be at least as 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            )));
        }
        if self.election_timeout > 50_000 {
            return Err(Error::Config(format!(
                "--election-timeout[{}ms] is too long, and should be set less than 50000ms",
                self.election_timeout
            )));
        }
        let state_new = match self.initial_cluster_state.as_str() {
            "new" => true,
            "existing" => false,
            other => {
                return Err(Error::Config(format!(
                    "--initial-cluster-state must be 'new' or 'existing', not {other:?}"
                )))
            }
        };
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.pontoon", self.name)));
        let wal_dir = self
            .wal_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("member").join("wal"));
        let client_tls = tls_files(
            "client",
            &self.cert_file,
            &self.key_file,
            &self.trusted_ca_file,
            self.client_cert_auth,
        )?;
        let peer_tls = tls_files(
            "peer",
            &self.peer_cert_file,
            &self.peer_key_file,
            &self.peer_trusted_ca_file,
            self.peer_client_cert_auth,
        )?;
        let mut listen_client = Vec::new();
        for url in split_urls(&self.listen_client_urls) {
            let https = url.starts_with("https://");
            if https && client_tls.is_none() {
                return Err(Error::Config(format!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url {url} with HTTPS scheme"
                )));
            }
            listen_client.extend(listen_addrs(&url)?.into_iter().map(|a| (a, https)));
        }
        if listen_client.is_empty() {
            return Err(Error::Config("--listen-client-urls is empty".into()));
        }
        let peer_urls = split_urls(&self.initial_advertise_peer_urls);
        let initial_cluster = match &self.initial_cluster {
            Some(s) => parse_initial_cluster(s)?,
            None => vec![(self.name.clone(), peer_urls.clone())],
        };
        let Some((_, own_urls)) = initial_cluster.iter().find(|(n, _)| *n == self.name) else {
            return Err(Error::Config(format!(
                "couldn't find local name {:?} in the initial cluster configuration",
                self.name
            )));
        };
        let (mut a, mut b) = (own_urls.clone(), peer_urls.clone());
        a.sort();
        b.sort();
        if a != b {
            return Err(Error::Config(format!(
                "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={} ",
                self.name,
                own_urls.join(","),
                peer_urls.join(",")
            )));
        }
        let mut listen_peer = Vec::new();
        for url in split_urls(&self.listen_peer_urls) {
            let https = url.starts_with("https://");
            if https && peer_tls.is_none() {
                return Err(Error::Config(format!(
                    "TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url {url} with HTTPS scheme"
                )));
            }
            listen_peer.extend(listen_addrs(&url)?.into_iter().map(|a| (a, https)));
        }
        Ok(StoreConfig {
            name: self.name.clone(),
            data_dir,
            wal_dir,
            listen_client,
            listen_peer,
            listen_metrics: {
                let mut v = Vec::new();
                for url in split_urls(&self.listen_metrics_urls) {
                    if url.starts_with("https://") {
                        return Err(Error::Config(format!(
                            "--listen-metrics-urls {url}: only http:// is supported"
                        )));
                    }
                    v.extend(listen_addrs(&url)?);
                }
                v
            },
            client_tls,
            peer_tls,
            advertise_client_urls: split_urls(&self.advertise_client_urls),
            initial_advertise_peer_urls: peer_urls,
            initial_cluster,
            initial_cluster_state_new: state_new,
            initial_cluster_token: self.initial_cluster_token.clone(),
            snapshot_count: self.snapshot_count,
            heartbeat: Duration::from_millis(self.heartbeat_interval),
            election_ticks: (self.election_timeout / self.heartbeat_interval) as usize,
            max_request_bytes: self.max_request_bytes as usize,
            max_txn_ops: self.max_txn_ops as usize,
            max_concurrent_streams: self.max_concurrent_streams,
            max_range_response_bytes: self.max_range_response_bytes as usize,
            max_watchers_per_stream: self.max_watchers_per_stream as usize,
            quota_backend_bytes: match self.quota_backend_bytes {
                q if q < 0 => None,
                0 => Some(DEFAULT_QUOTA_BYTES),
                q => Some(q),
            },
            auto_compaction: parse_auto_compaction(
                &self.auto_compaction_mode,
                &self.auto_compaction_retention,
            )?,
            corrupt_check_every: match self.experimental_corrupt_check_time.as_str() {
                "0" => None,
                s => Some(parse_go_duration(s).ok_or_else(|| {
                    Error::Config(format!("invalid --experimental-corrupt-check-time {s:?}"))
                })?)
                .filter(|d| !d.is_zero()),
            },
            auth_token: self.auth_token.clone(),
            auth_token_ttl: Duration::from_secs(self.auth_token_ttl),
            // etcd falls back to its default for a cost bcrypt does not accept.
            bcrypt_cost: if (4..=31).contains(&self.bcrypt_cost) {
                self.bcrypt_cost
            } else {
                crate::auth::password::DEFAULT_COST
            },
            watch_progress_notify_interval: parse_go_duration(
                &self.experimental_watch_progress_notify_interval,
            )
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Error::Config(format!(
                    "invalid --experimental-watch-progress-notify-interval {:?}",
                    self.experimental_watch_progress_notify_interval
                ))
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_compaction_modes() {
        assert_eq!(
            parse_auto_compaction("periodic", "1").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_auto_compaction("periodic", "30m").unwrap(),
            AutoCompaction::Periodic(Duration::from_secs(1800))
        );
        assert_eq!(
            parse_auto_compaction("periodic", "0").unwrap(),
            AutoCompaction::Disabled
        );
        assert_eq!(
            parse_auto_compaction("revision", "1000").unwrap(),
            AutoCompaction::Revision(1000)
        );
        assert!(parse_auto_compaction("revision", "1h").is_err());
        assert!(parse_auto_compaction("weekly", "1").is_err());
    }

    #[test]
    fn listen_urls() {
        assert_eq!(
            listen_addrs("http://localhost:2379").unwrap(),
            vec!["127.0.0.1:2379".parse().unwrap()]
        );
        assert_eq!(
            listen_addrs("http://0.0.0.0:12379").unwrap(),
            vec!["0.0.0.0:12379".parse().unwrap()]
        );
        assert!(listen_addrs("https://127.0.0.1:2379").is_ok());
        assert!(listen_addrs("unix://x").is_err());
        assert!(listen_addrs("127.0.0.1:2379").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: StoreArgs,
    }

    fn parse(argv: &[&str]) -> StoreArgs {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("pontoon").chain(argv.iter().copied()))
            .map(|c| c.args)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
    }

    #[test]
    fn boolean_flags_take_go_style_values() {
        // kubeadm's etcd manifest writes `--client-cert-auth=true`.
        assert!(parse(&["--client-cert-auth=true"]).client_cert_auth);
        assert!(parse(&["--client-cert-auth"]).client_cert_auth);
        assert!(!parse(&["--client-cert-auth=false"]).client_cert_auth);
        assert!(!parse(&[]).client_cert_auth);
        assert!(parse(&["--peer-client-cert-auth=true"]).peer_client_cert_auth);
        let a = parse(&[
            "--listen-metrics-urls=http://127.0.0.1:2381",
            "--experimental-initial-corrupt-check=true",
        ]);
        assert_eq!(
            a.validate().unwrap().listen_metrics,
            vec!["127.0.0.1:2381".parse().unwrap()]
        );
    }

    #[test]
    fn https_needs_its_certificate() {
        let a = parse(&["--listen-client-urls=https://127.0.0.1:2379"]);
        assert!(matches!(a.validate(), Err(Error::Config(m)) if m.contains("--cert-file")));
        let a = parse(&["--cert-file=/c.pem"]);
        assert!(
            matches!(a.validate(), Err(Error::Config(m)) if m.contains("certificate and a key"))
        );
    }
}
