//! `pontoon`: one binary, with a subcommand per role (like k3s). Only wiring lives
//! here; the store is in the `pontoon-store` crate.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
    Store(StoreArgs),
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
    }
    Ok(())
}
