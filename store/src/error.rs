//! The store's error type.
//!
//! Errors fall in two groups, as in toydb: *deterministic* errors are part of the
//! request's answer (every member computes the same one from the same log entry,
//! e.g. "requested lease not found") and go back to the client; everything else
//! (disk, corruption) is not, and a member that meets one while applying must stop
//! rather than diverge from its peers. `server::status` is the one place that turns
//! these into etcd's gRPC codes and message texts.

use std::io;

/// Result alias for the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- request validation and deterministic apply errors (etcd's texts) ----
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// Pontoon's `--max-range-response-bytes` (etcd has no such cap).
    #[error("etcdserver: range response is too large (over {0} bytes of keys and values); ask for fewer keys with a limit")]
    RangeTooLarge(usize),
    /// Pontoon's `--max-watchers-per-stream`.
    #[error("etcdserver: too many watchers on this stream (at most {0})")]
    TooManyWatchers(usize),
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: corrupt cluster")]
    CorruptCluster,
    #[error("etcdserver: given member URLs are invalid")]
    MemberBadUrls,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: member ID already exist")]
    MemberExist,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExist,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: too many learner members in cluster")]
    TooManyLearners,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    #[error("etcdserver: unhealthy cluster")]
    UnhealthyCluster,
    #[error("etcdserver: the member has been permanently removed from the cluster")]
    MemberRemoved,

    // ---- auth (etcd's texts) ----
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,

    // ---- availability: the request may be retried ----
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    #[error("etcdserver: server stopped")]
    Stopped,

    // ---- not deterministic: a member that meets one while applying must stop ----
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("raft log I/O: {0}")]
    Io(#[from] io::Error),
    #[error("data corruption: {0}")]
    Corrupt(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// True if every member applying the same log entry reaches the same error, so it
    /// is the request's answer rather than a reason to stop the member.
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            Error::EmptyKey
                | Error::KeyNotFound
                | Error::ValueProvided
                | Error::LeaseProvided
                | Error::TooManyOps
                | Error::DuplicateKey
                | Error::InvalidSortOption
                | Error::Compacted
                | Error::FutureRev
                | Error::LeaseNotFound
                | Error::LeaseExist
                | Error::LeaseTtlTooLarge
                | Error::RequestTooLarge
                | Error::NoSpace
                | Error::CorruptCluster
                | Error::RootUserNotExist
                | Error::RootRoleNotExist
                | Error::UserAlreadyExist
                | Error::UserEmpty
                | Error::UserNotFound
                | Error::RoleAlreadyExist
                | Error::RoleNotFound
                | Error::RoleEmpty
                | Error::AuthFailed
                | Error::PermissionNotGiven
                | Error::PermissionDenied
                | Error::RoleNotGranted
                | Error::PermissionNotGranted
                | Error::AuthNotEnabled
                | Error::InvalidAuthToken
                | Error::InvalidAuthMgmt
                | Error::AuthOldRevision
        )
    }
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Engine(e.into_string())
    }
}

impl From<::raft::Error> for Error {
    fn from(e: ::raft::Error) -> Self {
        Error::Raft(e.to_string())
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Corrupt(format!("undecodable record: {e}"))
    }
}
