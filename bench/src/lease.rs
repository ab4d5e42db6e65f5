//! The `lease-keepalive` workload: keep-alive round trips on LeaseKeepAlive streams.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Client, LeaseClient, LeaseKeepAliveStream, LeaseKeeper};
use hdrhistogram::Histogram;

use crate::{new_hist, Args, Ctl, Pacer, Progress, ProgressSpec, Summary};

struct Keeper {
    lc: LeaseClient,
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

async fn keepalive_client(
    i: usize,
    clients: usize,
    mut k: Keeper,
    ctl: Arc<Ctl>,
) -> (Histogram<u64>, Instant) {
    let mut hist = new_hist();
    let mut pacer = Pacer::new(ctl.every, i, clients);
    loop {
        pacer.wait(ctl.deadline).await;
        if ctl.next().is_none() {
            break;
        }
        let started = Instant::now();
        let (ok, broken) = match k.keeper.keep_alive().await {
            Ok(()) => match k.stream.message().await {
                Ok(Some(r)) => (r.ttl() > 0, false),
                Ok(None) | Err(_) => (false, true),
            },
            Err(_) => (false, true),
        };
        if ok {
            hist.saturating_record((started.elapsed().as_micros() as u64).max(1));
        }
        ctl.done(ok);
        if broken {
            // The server ended the stream: this client stops (counted as one error).
            break;
        }
    }
    let ended = Instant::now();
    let _ = k.lc.revoke(k.id).await;
    (hist, ended)
}

pub(crate) async fn run_lease(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let clients = args.clients.max(1);
    eprintln!("granting {clients} leases (TTL {} s)...", args.lease_ttl);
    let retries = Arc::new(AtomicU64::new(0));
    let setup: Vec<_> = (0..clients)
        .map(|i| {
            let mut lc = conns[i % conns.len()].lease_client();
            let ttl = args.lease_ttl;
            let retries = retries.clone();
            tokio::spawn(async move {
                let id = lc.grant(ttl, None).await?.id();
                // The member that acknowledged the grant may have applied it before
                // the leader, which answers keep-alives: until the leader has it too,
                // a keep-alive says "lease not found". Try again for up to 5 s.
                let mut attempt = 0;
                let (keeper, stream) = loop {
                    match lc.keep_alive(id).await {
                        Ok(k) => break k,
                        Err(e) if attempt < 250 && e.to_string().contains("not found") => {
                            attempt += 1;
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => return Err(e).context("opening the keep-alive stream"),
                    }
                };
                Ok::<_, anyhow::Error>(Keeper {
                    lc,
                    id,
                    keeper,
                    stream,
                })
            })
        })
        .collect();
    let mut keepers = Vec::with_capacity(clients);
    for t in setup {
        keepers.push(t.await??);
    }
    let mut ctl = Ctl::new(args, clients, args.duration.is_none().then_some(args.total));
    let started = Instant::now();
    ctl.deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let ctl = Arc::new(ctl);
    let progress = Progress::start(ProgressSpec {
        label: "lease-keepalive".into(),
        unit: "keep-alives",
        count: ctl.completed.clone(),
        errors: ctl.errors.clone(),
        total: ctl.total,
        duration: args.duration.map(Duration::from_secs),
    });
    let tasks: Vec<_> = keepers
        .into_iter()
        .enumerate()
        .map(|(i, k)| tokio::spawn(keepalive_client(i, clients, k, ctl.clone())))
        .collect();
    let mut hist = new_hist();
    // The clients revoke their lease after the run: time the run, not that.
    let mut ended = started;
    for t in tasks {
        let (h, end) = t.await?;
        hist.add(h).expect("same bounds");
        ended = ended.max(end);
    }
    let seconds = (ended - started).as_secs_f64();
    progress.finish();
    Ok(Summary {
        ok: hist.len(),
        errors: ctl.errors.load(Ordering::Relaxed),
        seconds,
        unit: "keep-alives",
        latency_of: "keep-alive round trip",
        hist,
        extra: vec![
            ("leases", clients.to_string()),
            ("setup_retries", retries.load(Ordering::Relaxed).to_string()),
        ],
    })
}
