//! `pontoon snapshot save | restore | status`: backups of a running cluster and new
//! clusters from them, as `etcdctl snapshot` does for etcd.
//!
//! - **save** streams `Maintenance.Snapshot` from one member into `<file>.part`,
//!   verifies the checksum of the complete file, then renames it into place, so a
//!   file at the final name is always whole;
//! - **restore** verifies the file, then creates a fresh data directory from it: every
//!   key, value, revision, lease and compaction point is kept, while membership,
//!   alarms and raft state are dropped. The member then bootstraps a *new* cluster
//!   from its flags (`--name`, `--initial-cluster`, ...), with new member and cluster
//!   IDs, exactly as after `etcdctl snapshot restore`;
//! - **status** prints the file's applied index, revision and size after verifying it.

use std::io::Write;
use std::path::{Path, PathBuf};

use pontoon_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use pontoon_proto::etcdserverpb::SnapshotRequest;

use crate::error::{Error, Result};
use crate::mvcc::snapshot::verify_snapshot;
use crate::mvcc::MvccStore;

/// Saves a snapshot from `endpoint` into `file`, printing progress to stderr.
pub async fn save(endpoint: &str, file: &Path) -> Result<u64> {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let mut client = MaintenanceClient::connect(url.clone())
        .await
        .map_err(|e| Error::Config(format!("connect to {url}: {e}")))?
        .max_decoding_message_size(usize::MAX);
    let mut stream = client
        .snapshot(SnapshotRequest {})
        .await
        .map_err(|s| Error::Config(format!("snapshot from {url}: {}", s.message())))?
        .into_inner();
    let part = file.with_extension("part");
    let mut out = std::fs::File::create(&part)?;
    let mut received = 0u64;
    let mut last_report = 0u64;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| Error::Config(format!("snapshot stream: {}", s.message())))?
    {
        out.write_all(&chunk.blob)?;
        received += chunk.blob.len() as u64;
        if received - last_report >= 8 << 20 || chunk.remaining_bytes == 0 {
            eprintln!(
                "saving: {received} bytes received, {} remaining",
                chunk.remaining_bytes
            );
            last_report = received;
        }
    }
    out.sync_all()?;
    drop(out);
    if let Err(e) = verify_snapshot(&part) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, file)?;
    Ok(received)
}

/// What `status` reports about a snapshot file.
#[derive(Debug)]
pub struct FileStatus {
    pub applied_index: u64,
    pub revision: i64,
    pub size: u64,
}

/// Verifies `file` and reads its revision (by restoring it into a scratch store).
pub fn status(file: &Path) -> Result<FileStatus> {
    let applied_index = verify_snapshot(file)?;
    let size = std::fs::metadata(file)?.len();
    let scratch =
        std::env::temp_dir().join(format!("pontoon-snapshot-status-{}", std::process::id()));
    let revision = {
        let store = MvccStore::open(&scratch)?;
        store.install_snapshot(file, b"")?;
        store.current_revision()
    };
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(FileStatus {
        applied_index,
        revision,
        size,
    })
}

/// Creates `data_dir` from a snapshot file for a member of a new cluster.
pub fn restore(file: &Path, data_dir: &Path) -> Result<PathBuf> {
    if data_dir.exists() && std::fs::read_dir(data_dir)?.next().is_some() {
        return Err(Error::Config(format!(
            "data-dir {:?} exists",
            data_dir.display()
        )));
    }
    verify_snapshot(file)?;
    let kv_dir = data_dir.join("member").join("kv");
    std::fs::create_dir_all(&kv_dir)?;
    let store = MvccStore::open(&kv_dir)?;
    store.install_snapshot(file, b"")?;
    store.forget_cluster()?;
    Ok(kv_dir)
}
