//! Generates the etcd v3 and peer protocol code with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler, and the protobuf JSON mapping
//! (serde `Serialize`/`Deserialize`, via pbjson) of etcd's packages for the JSON
//! gateway.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos = [
        "etcd/mvccpb/kv.proto",
        "etcd/authpb/auth.proto",
        "etcd/etcdserverpb/rpc.proto",
        "etcd/v3lockpb/v3lock.proto",
        "etcd/v3electionpb/v3election.proto",
        "pontoon/peer.proto",
        "pontoon/internal.proto",
    ];
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&protos, &["."])?;
    // etcd's gateway (grpc-gateway with jsonpb `OrigName`) writes proto field names
    // (`create_revision`, `peerURLs`) and ignores unknown fields in requests.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".mvccpb",
            ".authpb",
            ".etcdserverpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
