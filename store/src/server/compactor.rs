//! Automatic compaction, as etcd's `--auto-compaction-mode` runs it.
//!
//! - **periodic** (retention `r`): every `min(r, 1h) / 10` the current revision is
//!   sampled; every `min(r, 1h)` the store is compacted to the oldest sample still
//!   inside the window, i.e. the revision current `r` ago. History younger than `r`
//!   is always kept.
//! - **revision** (retention `n`): every 5 minutes the store is compacted to
//!   `current - n`, keeping the last `n` revisions.
//!
//! Compactions are proposed through raft like a client's `Compact`, so every member
//! compacts at the same revision.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use pontoon_proto::etcdserverpb::CompactionRequest;
use pontoon_proto::internal::internal_request::Request as InternalOp;

use super::config::AutoCompaction;
use super::EtcdServer;
use crate::error::Error;

/// How often revision mode checks, as in etcd.
pub const REVISION_CHECK_INTERVAL: Duration = Duration::from_secs(300);

/// Something that can report the revision and compact: the server, or a test double.
#[tonic::async_trait]
pub trait Compactable: Send + Sync {
    fn revision(&self) -> i64;
    async fn compact(&self, revision: i64) -> Result<(), Error>;
}

#[tonic::async_trait]
impl Compactable for EtcdServer {
    fn revision(&self) -> i64 {
        self.mvcc.current_revision()
    }
    async fn compact(&self, revision: i64) -> Result<(), Error> {
        self.raft
            .propose(InternalOp::Compaction(CompactionRequest {
                revision,
                physical: false,
            }))
            .await
            .map(|_| ())
    }
}

/// Runs the compactor until the task is dropped.
pub async fn run(mode: AutoCompaction, target: Arc<dyn Compactable>) {
    match mode {
        AutoCompaction::Disabled => std::future::pending().await,
        AutoCompaction::Periodic(retention) => periodic(retention, target).await,
        AutoCompaction::Revision(keep) => revision(keep, target).await,
    }
}

async fn periodic(retention: Duration, target: Arc<dyn Compactable>) {
    let interval = retention.min(Duration::from_secs(3600));
    let sample_every = interval / 10;
    // Samples older than the retention window are useless: keep just enough.
    let keep = (retention.as_secs_f64() / sample_every.as_secs_f64()).ceil() as usize + 1;
    let mut samples: VecDeque<(Instant, i64)> = VecDeque::new();
    let mut last_compaction = Instant::now();
    let mut last_rev = 0;
    loop {
        samples.push_back((Instant::now(), target.revision()));
        while samples.len() > keep {
            samples.pop_front();
        }
        tokio::time::sleep(sample_every).await;
        let now = Instant::now();
        if now.duration_since(last_compaction) < interval {
            continue;
        }
        // The newest sample at least `retention` old.
        let Some(&(_, rev)) = samples
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= retention)
        else {
            continue;
        };
        if rev <= last_rev {
            continue;
        }
        match target.compact(rev).await {
            Ok(()) | Err(Error::Compacted) => {
                tracing::info!(revision = rev, retention = ?retention, "auto-compacted");
                last_compaction = now;
                last_rev = rev;
            }
            Err(e) => {
                tracing::warn!(revision = rev, error = %e, "auto-compaction failed; will retry")
            }
        }
    }
}

async fn revision(keep: i64, target: Arc<dyn Compactable>) {
    let mut last = 0;
    loop {
        tokio::time::sleep(REVISION_CHECK_INTERVAL).await;
        let rev = target.revision() - keep;
        if rev <= 0 || rev == last {
            continue;
        }
        match target.compact(rev).await {
            Ok(()) | Err(Error::Compacted) => {
                tracing::info!(revision = rev, retention = keep, "auto-compacted");
                last = rev;
            }
            Err(e) => {
                tracing::warn!(revision = rev, error = %e, "auto-compaction failed; will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// A revision that grows by one per second of (paused) time.
    struct Clocked {
        start: Instant,
        compactions: Mutex<Vec<(u64, i64)>>,
        base: AtomicI64,
    }

    #[tonic::async_trait]
    impl Compactable for Clocked {
        fn revision(&self) -> i64 {
            self.base.load(Ordering::Relaxed) + self.start.elapsed().as_secs() as i64
        }
        async fn compact(&self, revision: i64) -> Result<(), Error> {
            let at = self.start.elapsed().as_secs();
            self.compactions.lock().unwrap().push((at, revision));
            Ok(())
        }
    }

    fn clocked() -> Arc<Clocked> {
        Arc::new(Clocked {
            start: Instant::now(),
            compactions: Mutex::new(Vec::new()),
            base: AtomicI64::new(1),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_keeps_the_retention_window() {
        let c = clocked();
        let task = tokio::spawn(run(
            AutoCompaction::Periodic(Duration::from_secs(100)),
            c.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(350)).await;
        task.abort();
        let done = c.compactions.lock().unwrap().clone();
        assert!(done.len() >= 2, "{done:?}");
        for (at, rev) in &done {
            // Compacted to the revision of about `retention` earlier, never younger.
            let age = c.base.load(Ordering::Relaxed) + *at as i64 - rev;
            assert!(
                (100..=110).contains(&age),
                "at {at}s compacted to {rev}: {done:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn revision_mode_keeps_n_revisions() {
        let c = clocked();
        let task = tokio::spawn(run(AutoCompaction::Revision(50), c.clone()));
        tokio::time::sleep(Duration::from_secs(601)).await;
        task.abort();
        let done = c.compactions.lock().unwrap().clone();
        assert_eq!(done, vec![(300, 301 - 50), (600, 601 - 50)]);
    }
}
