//! The one place that maps store errors to etcd's gRPC status codes and message texts
//! (etcd's `rpctypes`). Clients match on both, so both must be etcd's.

use tonic::{Code, Status};

use crate::error::Error;

pub fn to_status(e: Error) -> Status {
    let code = match &e {
        Error::EmptyKey
        | Error::KeyNotFound
        | Error::ValueProvided
        | Error::LeaseProvided
        | Error::TooManyOps
        | Error::DuplicateKey
        | Error::InvalidSortOption
        | Error::RequestTooLarge
        | Error::MemberBadUrls => Code::InvalidArgument,
        Error::NoSpace | Error::RangeTooLarge(_) | Error::TooManyWatchers(_) => {
            Code::ResourceExhausted
        }
        Error::CorruptCluster => Code::DataLoss,
        Error::MemberNotFound => Code::NotFound,
        Error::MemberExist
        | Error::PeerUrlExist
        | Error::NotEnoughStartedMembers
        | Error::MemberNotLearner
        | Error::LearnerNotReady
        | Error::TooManyLearners
        | Error::BadLeaderTransferee => Code::FailedPrecondition,
        Error::NotLeader
        | Error::LeaderTransferTimeout
        | Error::UnhealthyCluster
        | Error::MemberRemoved => Code::Unavailable,
        Error::Compacted | Error::FutureRev => Code::OutOfRange,
        Error::LeaseNotFound => Code::NotFound,
        Error::LeaseExist => Code::FailedPrecondition,
        Error::LeaseTtlTooLarge => Code::OutOfRange,
        Error::RootUserNotExist
        | Error::RootRoleNotExist
        | Error::UserAlreadyExist
        | Error::UserNotFound
        | Error::RoleAlreadyExist
        | Error::RoleNotFound
        | Error::RoleNotGranted
        | Error::PermissionNotGranted
        | Error::AuthNotEnabled => Code::FailedPrecondition,
        Error::UserEmpty
        | Error::RoleEmpty
        | Error::AuthFailed
        | Error::PermissionNotGiven
        | Error::InvalidAuthMgmt
        | Error::AuthOldRevision => Code::InvalidArgument,
        Error::PermissionDenied => Code::PermissionDenied,
        Error::InvalidAuthToken => Code::Unauthenticated,
        Error::NoLeader | Error::Timeout | Error::Stopped | Error::LeaderChanged => {
            Code::Unavailable
        }
        Error::Engine(_) | Error::Io(_) | Error::Corrupt(_) | Error::Raft(_) | Error::Config(_) => {
            Code::Internal
        }
    };
    Status::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_texts_are_etcds() {
        let s = to_status(Error::Compacted);
        assert_eq!(s.code(), Code::OutOfRange);
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let s = to_status(Error::DuplicateKey);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "etcdserver: duplicate key given in txn request"
        );
        let s = to_status(Error::LeaseNotFound);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "etcdserver: requested lease not found");
        assert_eq!(to_status(Error::NoLeader).code(), Code::Unavailable);
    }
}
