//! etcd's v3 wire protocol and Pontoon's internal protocols, generated at build time.
//!
//! - [`mvccpb`], [`authpb`], [`etcdserverpb`]: etcd's packages, with etcd's package,
//!   service, message and field names and numbers, so unmodified etcd clients talk to
//!   Pontoon; [`v3lockpb`] and [`v3electionpb`], etcd's lock and election services.
//! - [`peer`]: member-to-member raft traffic; raft-rs messages travel as opaque bytes.
//! - [`internal`]: the proposals Pontoon writes into raft log entries. Durable format.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

pub mod peer {
    tonic::include_proto!("pontoonpeer");
}

pub mod internal {
    tonic::include_proto!("pontoonraft");
}
