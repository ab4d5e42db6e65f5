//! `pontoon`: one binary, with a subcommand per role (like k3s). Only wiring lives
//! here; the store is in the `pontoon-store` crate.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use std::path::PathBuf;

use pontoon_store::backup;

/// glibc's allocator cost about 13% of the server's CPU under put load (`_int_malloc`,
/// `malloc_consolidate`, `unlink_chunk`, ...; see bench/README.md); mimalloc's
/// thread-local free lists suit the many short-lived request buffers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use pontoon_store::server::{self, StoreArgs};

#[derive(Parser)]
#[command(
    name = "pontoon",
    version,
    about = "An etcd v3 compatible, raft-replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a store member (accepts etcd's flags and ETCD_* environment variables).
    Store(Box<StoreArgs>),
    /// Back up a running cluster, or start a new one from a backup.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Stream a consistent snapshot from a member into a file (checksum verified).
    Save {
        file: PathBuf,
        /// The member to save from.
        #[arg(long, default_value = "127.0.0.1:2379")]
        endpoints: String,
    },
    /// Create a data directory for a member of a new cluster from a snapshot file.
    Restore {
        file: PathBuf,
        /// The data directory to create [default: <name>.pontoon].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The member name (only used for the default data directory).
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Verify a snapshot file and print what it holds.
    Status { file: PathBuf },
}

fn snapshot(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Save { file, endpoints } => {
            let endpoint = endpoints.split(',').next().unwrap_or_default().to_string();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let bytes = rt.block_on(backup::save(&endpoint, &file))?;
            println!("Snapshot saved at {} ({bytes} bytes)", file.display());
        }
        SnapshotCommand::Restore {
            file,
            data_dir,
            name,
        } => {
            let dir = data_dir.unwrap_or_else(|| PathBuf::from(format!("{name}.pontoon")));
            backup::restore(&file, &dir)?;
            println!(
                "Restored {} into {}; start the member with --initial-cluster-state new",
                file.display(),
                dir.display()
            );
        }
        SnapshotCommand::Status { file } => {
            let s = backup::status(&file)?;
            println!(
                "checksum OK, applied index {}, revision {}, {} bytes",
                s.applied_index, s.revision, s.size
            );
        }
    }
    Ok(())
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    let level = match level {
        "debug" | "info" | "warn" | "error" => level,
        "panic" | "fatal" => "error",
        other => {
            anyhow::bail!("unknown --log-level {other:?} (debug, info, warn, error, panic, fatal)")
        }
    };
    let filter = EnvFilter::try_from_env("PONTOON_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Store(args) => {
            init_logging(&args.log_level)?;
            let cfg = args.validate().context("invalid configuration")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(server::run(cfg, shutdown_signal()))
                .context("pontoon store")?;
        }
        Command::Snapshot(cmd) => snapshot(cmd)?,
    }
    Ok(())
}
