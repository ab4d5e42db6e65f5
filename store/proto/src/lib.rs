//! etcd's v3 wire protocol and Pontoon's internal protocols, generated at build time.
//!
//! - [`mvccpb`], [`authpb`], [`etcdserverpb`]: etcd's packages, with etcd's package,
//!   service, message and field names and numbers, so unmodified etcd clients talk to
//!   Pontoon; [`v3lockpb`] and [`v3electionpb`], etcd's lock and election services.
//! - [`peer`]: member-to-member raft traffic; raft-rs messages travel as opaque bytes.
//! - [`internal`]: the proposals Pontoon writes into raft log entries. Durable format.
//!
//! etcd's packages also implement serde's `Serialize`/`Deserialize` with the protobuf
//! JSON mapping as etcd's grpc-gateway applies it: proto field names, 64-bit integers
//! as strings, bytes as base64, enums by name, default values omitted, unknown fields
//! ignored. The JSON gateway (`pontoon_store::server::gateway`) is their user.

#![allow(clippy::all, missing_docs)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

pub mod peer {
    tonic::include_proto!("pontoonpeer");
}

pub mod internal {
    tonic::include_proto!("pontoonraft");
}
