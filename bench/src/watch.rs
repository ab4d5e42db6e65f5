//! The watch workloads: `watch` (fan-out with delivery latency and lost events) and
//! `watch-idle` (watchers held open for a memory measurement).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use etcd_client::{Client, WatchOptions, WatchRequestSender, WatchResponseStream};
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;

use crate::{key, lcg, new_hist, now_nanos, Args, Ctl, Pacer, Progress, ProgressSpec, Summary};

fn stream_count(args: &Args) -> usize {
    let w = args.watchers.max(1);
    let s = if args.streams > 0 {
        args.streams
    } else {
        w.div_ceil(100).max(args.conns.max(1))
    };
    s.min(w)
}

struct OpenStream {
    tx: WatchRequestSender,
    rx: WatchResponseStream,
    ids: Vec<i64>,
}

/// Opens `--watchers` watchers over the streams and waits until each is created.
/// `distinct`: watcher i watches `<watch-key><i>`; otherwise all watch `--watch-key`
/// (as a prefix with `--watch-prefix`).
async fn open_watchers(
    args: &Args,
    conns: &[Client],
    distinct: bool,
) -> anyhow::Result<Vec<OpenStream>> {
    let w = args.watchers.max(1);
    let streams = stream_count(args);
    let created = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    eprintln!(
        "opening {w} watchers on {streams} streams over {} connections...",
        conns.len()
    );
    let progress = Progress::start(ProgressSpec {
        label: "creating".into(),
        unit: "watchers",
        count: created.clone(),
        errors: errors.clone(),
        total: Some(w as u64),
        duration: None,
    });
    let opts = if args.watch_prefix && !distinct {
        WatchOptions::new().with_prefix()
    } else {
        WatchOptions::new()
    };
    let mut tasks = Vec::new();
    let mut first = 0usize;
    for s in 0..streams {
        let n = w / streams + usize::from(s < w % streams);
        let mut wc = conns[s % conns.len()].watch_client();
        let (opts, created) = (opts.clone(), created.clone());
        let base = args.watch_key.clone();
        let key_of = move |i: usize| -> Vec<u8> {
            if distinct {
                format!("{base}{i}").into_bytes()
            } else {
                base.clone().into_bytes()
            }
        };
        let range = first..first + n;
        first += n;
        tasks.push(tokio::spawn(async move {
            let mut keys = range.map(key_of);
            let k0 = keys.next().expect("n >= 1");
            let (mut tx, mut rx) = wc.watch(k0, Some(opts.clone())).await?.split();
            // Send the creates while reading the answers, so neither side's buffer
            // holds things up.
            let sender = tokio::spawn(async move {
                for k in keys {
                    tx.watch(k, Some(opts.clone())).await?;
                }
                Ok::<_, anyhow::Error>(tx)
            });
            let mut ids = Vec::with_capacity(n);
            while ids.len() < n {
                let resp = rx
                    .message()
                    .await?
                    .ok_or_else(|| anyhow!("watch stream closed while creating"))?;
                if resp.canceled() {
                    bail!("watch refused: {}", resp.cancel_reason());
                }
                if resp.created() {
                    ids.push(resp.watch_id());
                    created.fetch_add(1, Ordering::Relaxed);
                }
            }
            let tx = sender.await??;
            Ok::<_, anyhow::Error>(OpenStream { tx, rx, ids })
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await??);
    }
    progress.finish();
    Ok(out)
}

struct StreamResult {
    hist: Histogram<u64>,
    counts: HashMap<i64, u64>,
    canceled: u64,
    broken: u64,
}

/// One [`receive`] task per stream, sharing the event counters, and the switch that
/// stops them.
struct Receivers {
    /// Events received over all streams.
    events: Arc<AtomicU64>,
    /// When the last event arrived ([`now_nanos`]).
    last_event: Arc<AtomicU64>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<JoinHandle<StreamResult>>,
}

impl Receivers {
    fn spawn(streams: Vec<OpenStream>) -> Receivers {
        let events = Arc::new(AtomicU64::new(0));
        let last_event = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let tasks = streams
            .into_iter()
            .map(|s| {
                tokio::spawn(receive(
                    s,
                    events.clone(),
                    last_event.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        Receivers {
            events,
            last_event,
            stop_tx,
            tasks,
        }
    }
}

/// Reads one watch stream until told to stop: counts events per watcher and records
/// each event's delivery latency (receive time minus the send time in the value).
async fn receive(
    mut s: OpenStream,
    events: Arc<AtomicU64>,
    last_event: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> StreamResult {
    let _tx = s.tx; // dropping it would half-close the stream
    let mut r = StreamResult {
        hist: new_hist(),
        counts: s.ids.iter().map(|id| (*id, 0)).collect(),
        canceled: 0,
        broken: 0,
    };
    loop {
        let msg = tokio::select! {
            m = s.rx.message() => m,
            _ = stop.changed() => break,
        };
        match msg {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    r.canceled += 1;
                    continue;
                }
                let evs = resp.events();
                if evs.is_empty() {
                    continue;
                }
                let now = now_nanos();
                for ev in evs {
                    let sent = ev
                        .kv()
                        .and_then(|kv| kv.value().get(..8))
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                    if let Some(sent) = sent {
                        r.hist
                            .saturating_record((now.saturating_sub(sent) / 1000).max(1));
                    }
                }
                *r.counts.entry(resp.watch_id()).or_default() += evs.len() as u64;
                events.fetch_add(evs.len() as u64, Ordering::Relaxed);
                last_event.fetch_max(now, Ordering::Relaxed);
            }
            Ok(None) | Err(_) => {
                r.broken += 1;
                break;
            }
        }
    }
    r
}

async fn watch_writer(id: usize, args: Arc<Args>, mut c: Client, ctl: Arc<Ctl>) -> Histogram<u64> {
    let mut hist = new_hist();
    let mut pacer = Pacer::new(ctl.every, id, args.clients.max(1));
    let mut n: u64 = lcg(id as u64 + 1);
    let pad = args.val_size.saturating_sub(8);
    loop {
        pacer.wait(ctl.deadline).await;
        if ctl.next().is_none() {
            break;
        }
        n = lcg(n);
        let k = if args.watch_prefix {
            let mut k = args.watch_key.clone().into_bytes();
            k.extend(key((n >> 33) % args.key_space.max(1), args.key_size));
            k
        } else {
            args.watch_key.clone().into_bytes()
        };
        let started = Instant::now();
        let mut value = Vec::with_capacity(8 + pad);
        value.extend_from_slice(&now_nanos().to_le_bytes());
        value.resize(8 + pad, b'v');
        let r = c.put(k, value, None).await;
        if r.is_ok() {
            hist.saturating_record((started.elapsed().as_micros() as u64).max(1));
        }
        ctl.done(r.is_ok());
    }
    hist
}

pub(crate) async fn run_watch(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let streams = open_watchers(args, conns, false).await?;
    let watchers = args.watchers.max(1) as u64;
    let n_streams = streams.len();
    let Receivers {
        events,
        last_event,
        stop_tx,
        tasks: receivers,
    } = Receivers::spawn(streams);

    let writers = args.clients.max(1);
    let mut ctl = Ctl::new(args, writers, args.duration.is_none().then_some(args.total));
    let started = Instant::now();
    let started_nanos = now_nanos();
    ctl.deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let ctl = Arc::new(ctl);
    let progress = Progress::start(ProgressSpec {
        label: format!("watch x{watchers}"),
        unit: "events",
        count: events.clone(),
        errors: ctl.errors.clone(),
        total: ctl.total.map(|t| t * watchers),
        duration: args.duration.map(Duration::from_secs),
    });
    let tasks = ctl.spawn_clients(writers, args, conns, watch_writer);
    let mut put_hist = new_hist();
    for t in tasks {
        put_hist.add(t.await?).expect("same bounds");
    }
    let puts_ok = ctl.completed.load(Ordering::Relaxed);
    let put_errors = ctl.errors.load(Ordering::Relaxed);
    let put_seconds = started.elapsed().as_secs_f64();
    let expected = puts_ok * watchers;
    let drain_until = Instant::now() + Duration::from_secs(args.drain_timeout);
    while events.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    progress.finish();

    let mut hist = new_hist();
    let (mut canceled, mut broken, mut lost, mut short) = (0, 0, 0, 0);
    let mut received = 0;
    for t in receivers {
        let r = t.await?;
        hist.add(&r.hist).expect("same bounds");
        canceled += r.canceled;
        broken += r.broken;
        for count in r.counts.values() {
            received += count;
            if *count < puts_ok {
                lost += puts_ok - count;
                short += 1;
            }
        }
    }
    let last = last_event.load(Ordering::Relaxed);
    let seconds = if last > started_nanos {
        (last - started_nanos) as f64 / 1e9
    } else {
        put_seconds
    };
    let ms = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let extra = vec![
        ("watchers", watchers.to_string()),
        ("streams", n_streams.to_string()),
        ("writers", writers.to_string()),
        ("put_rate_target", args.rate.to_string()),
        ("puts", puts_ok.to_string()),
        ("put_errors", put_errors.to_string()),
        ("put_rps", format!("{:.1}", puts_ok as f64 / put_seconds)),
        ("put_p50_ms", format!("{:.3}", ms(&put_hist, 0.5))),
        ("put_p99_ms", format!("{:.3}", ms(&put_hist, 0.99))),
        ("events", received.to_string()),
        ("events_expected", expected.to_string()),
        ("events_lost", lost.to_string()),
        ("watchers_short", short.to_string()),
        ("canceled", canceled.to_string()),
        ("streams_broken", broken.to_string()),
    ];
    Ok(Summary {
        ok: received,
        errors: put_errors,
        seconds,
        unit: "events",
        latency_of: "delivery: put sent to event received",
        hist,
        extra,
    })
}

pub(crate) async fn run_watch_idle(args: &Args, conns: &[Client]) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let streams = open_watchers(args, conns, true).await?;
    let create_seconds = started.elapsed().as_secs_f64();
    let n_streams = streams.len();
    let watchers: u64 = streams.iter().map(|s| s.ids.len() as u64).sum();
    let Receivers {
        events,
        stop_tx,
        tasks: receivers,
        ..
    } = Receivers::spawn(streams);
    let hold = Duration::from_secs(args.duration.unwrap_or(10));
    eprintln!("holding {watchers} watchers for {} s", hold.as_secs());
    let progress = Progress::start(ProgressSpec {
        label: "holding".into(),
        unit: "events",
        count: events.clone(),
        errors: Arc::new(AtomicU64::new(0)),
        total: None,
        duration: Some(hold),
    });
    tokio::time::sleep(hold).await;
    let _ = stop_tx.send(true);
    progress.finish();
    let mut broken = 0;
    for t in receivers {
        broken += t.await?.broken;
    }
    Ok(Summary {
        ok: watchers,
        errors: broken,
        seconds: create_seconds,
        unit: "watchers",
        latency_of: "none measured",
        hist: new_hist(),
        extra: vec![
            ("watchers", watchers.to_string()),
            ("streams", n_streams.to_string()),
            ("create_seconds", format!("{create_seconds:.3}")),
            ("held_seconds", hold.as_secs().to_string()),
            ("streams_broken", broken.to_string()),
        ],
    })
}
