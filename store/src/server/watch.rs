//! The etcd `Watch` gRPC service: many watchers per bidirectional stream.
//!
//! Each stream is one task owning its watchers. A watcher is a cursor (see
//! `crate::watch`): the task wakes when a revision is published, and for every watcher
//! behind the published revision reads the missing revisions (from the hub's ring, or
//! from the store's history when it fell behind the ring), filters them, and sends
//! them. All events of one revision always travel in one response (atomic), revisions
//! in order, each exactly once.
//!
//! Responses follow etcd 3.5 field by field: `created` with the current revision;
//! events with the revision they bring the watcher to; `canceled` with
//! `compact_revision` when a watcher's position was compacted; progress notifications
//! (`watch_id` of the watcher, or -1 for a stream-wide `RequestProgress`) carrying a
//! revision all the stream's watchers have seen everything up to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use pontoon_proto::authpb::permission::Type as PermType;
use pontoon_proto::etcdserverpb::watch_create_request::FilterType;
use pontoon_proto::etcdserverpb::watch_request::RequestUnion;
use pontoon_proto::etcdserverpb::watch_server::Watch;
use pontoon_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use pontoon_proto::mvccpb::{event::EventType, Event};

use super::auth::Credentials;
use super::EtcdServer;
use crate::auth::AuthInfo;
use crate::error::Error;
use crate::mvcc::{Change, KeySpan};
use crate::watch::WatchHub;

/// Changes read from history per step, so a far-behind watcher is caught up in
/// bounded memory.
const HISTORY_BATCH: usize = 1000;
/// Responses buffered per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 128;

const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's cancel reason for a watch the user may not read (a gRPC error's text).
const PERMISSION_DENIED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

pub struct WatchService {
    server: Arc<EtcdServer>,
    hub: Arc<WatchHub>,
    progress_interval: Duration,
}

impl WatchService {
    pub fn new(server: Arc<EtcdServer>, hub: Arc<WatchHub>, progress_interval: Duration) -> Self {
        WatchService {
            server,
            hub,
            progress_interval,
        }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = WatchStream {
            creds: self.server.credentials(&req),
            server: self.server.clone(),
            hub: self.hub.clone(),
            tx,
            watchers: BTreeMap::new(),
            next_id: 0,
            progress_requested: false,
        };
        tokio::spawn(stream.run(req.into_inner(), self.progress_interval));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Watcher {
    span: KeySpan,
    /// The next revision this watcher has not yet seen.
    next_rev: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    /// The user that created the watcher, and the auth revision its read permission
    /// was last confirmed at (`u64::MAX` with auth off).
    user: String,
    auth_checked: u64,
}

impl Watcher {
    fn wants(&self, c: &Change) -> bool {
        if c.tombstone && self.no_delete || !c.tombstone && self.no_put {
            return false;
        }
        self.span.contains(&c.kv.key)
    }

    fn event(&self, c: &Change) -> Event {
        Event {
            r#type: if c.tombstone {
                EventType::Delete as i32
            } else {
                EventType::Put as i32
            },
            kv: Some(c.kv.clone()),
            prev_kv: if self.prev_kv { c.prev.clone() } else { None },
        }
    }
}

/// The client went away; stop the stream.
struct Closed;

struct WatchStream {
    /// The stream's token or client certificate, looked up for each new watcher.
    creds: Credentials,
    server: Arc<EtcdServer>,
    hub: Arc<WatchHub>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    progress_requested: bool,
}

impl WatchStream {
    async fn run(mut self, mut inbound: Streaming<WatchRequest>, progress_interval: Duration) {
        let mut published = self.hub.subscribe();
        let mut progress = tokio::time::interval(progress_interval);
        progress.tick().await;
        loop {
            if self.deliver().await.is_err() {
                return;
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if self.on_request(req).await.is_err() {
                            return;
                        }
                    }
                    // Client closed its side or the transport failed: done.
                    Ok(None) | Err(_) => return,
                },
                changed = published.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = progress.tick() => {
                    if self.on_progress_tick().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    async fn send(&self, resp: WatchResponse) -> Result<(), Closed> {
        self.tx.send(Ok(resp)).await.map_err(|_| Closed)
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: Some(self.server.header(revision)),
            watch_id,
            ..Default::default()
        }
    }

    async fn on_request(&mut self, req: WatchRequest) -> Result<(), Closed> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.on_create(c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                // etcd answers only the cancellation of a watcher that exists.
                if self.watchers.remove(&c.watch_id).is_some() {
                    let mut r = self.response(c.watch_id, self.server.mvcc.current_revision());
                    r.canceled = true;
                    self.send(r).await?;
                }
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                self.progress_requested = true;
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn on_create(&mut self, c: WatchCreateRequest) -> Result<(), Closed> {
        let current = self.server.mvcc.current_revision();
        // As in etcd: an empty key means the smallest key, "\0".
        let key = if c.key.is_empty() { vec![0] } else { c.key };
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                let mut r = self.response(-1, current);
                r.created = true;
                r.canceled = true;
                r.cancel_reason = DUPLICATE_ID.into();
                return self.send(r).await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        if self.watchers.len() >= self.server.max_watchers_per_stream {
            let mut r = self.response(c.watch_id, current);
            r.created = true;
            r.canceled = true;
            r.cancel_reason =
                Error::TooManyWatchers(self.server.max_watchers_per_stream).to_string();
            return self.send(r).await;
        }
        // etcd's isWatchPermitted: read permission on the watched range.
        let auth = self.server.mvcc.auth();
        let mut user = String::new();
        if auth.enabled {
            let who = self.server.resolve(&self.creds).await;
            // Resolving may have waited for this member to apply more entries.
            let auth = self.server.mvcc.auth();
            let permitted = who
                .as_ref()
                .is_ok_and(|who| auth.check(who, &key, &c.range_end, PermType::Read).is_ok());
            if !permitted {
                let mut r = self.response(c.watch_id, current);
                r.created = true;
                r.canceled = true;
                r.cancel_reason = PERMISSION_DENIED.into();
                return self.send(r).await;
            }
            user = who.map(|w| w.username).unwrap_or_default();
        }
        let filters: Vec<_> = c
            .filters
            .iter()
            .filter_map(|f| FilterType::try_from(*f).ok())
            .collect();
        self.watchers.insert(
            id,
            Watcher {
                span: KeySpan::new(&key, &c.range_end),
                next_rev: if c.start_revision > 0 {
                    c.start_revision
                } else {
                    current + 1
                },
                prev_kv: c.prev_kv,
                no_put: filters.contains(&FilterType::Noput),
                no_delete: filters.contains(&FilterType::Nodelete),
                progress_notify: c.progress_notify,
                fragment: c.fragment,
                user,
                auth_checked: if auth.enabled {
                    auth.revision
                } else {
                    u64::MAX
                },
            },
        );
        let mut r = self.response(id, current);
        r.created = true;
        self.send(r).await
    }

    /// Brings every watcher up to the published revision.
    async fn deliver(&mut self) -> Result<(), Closed> {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            loop {
                let target = self.hub.published();
                let Some(w) = self.watchers.get(&id) else {
                    break;
                };
                if w.next_rev > target {
                    break;
                }
                if !self.step(id, target).await? {
                    break;
                }
            }
        }
        if self.progress_requested {
            self.progress_requested = false;
            let rev = self.synced_revision();
            self.send(self.response(-1, rev)).await?;
        }
        Ok(())
    }

    /// Sends one batch of revisions to watcher `id`. Returns false if the watcher is
    /// gone (canceled for compaction).
    async fn step(&mut self, id: i64, target: i64) -> Result<bool, Closed> {
        let w = &self.watchers[&id];
        let from = w.next_rev;
        // As in etcd, a position below the compacted revision is canceled even if the
        // events are still at hand.
        let compacted = if from < self.server.mvcc.compact_revision() {
            Some(Err(Error::Compacted))
        } else {
            None
        };
        let batch = match compacted.or_else(|| self.hub.recent(from, target).map(Ok)) {
            Some(Err(e)) => Err(e),
            Some(Ok(revs)) => {
                let upto = revs.last().map_or(target, |p| p.rev);
                let events: Vec<Event> = revs
                    .iter()
                    .flat_map(|p| p.changes.iter())
                    .filter(|c| w.wants(c))
                    .map(|c| w.event(c))
                    .collect();
                Ok((events, upto))
            }
            None => {
                let to = target.min(self.hub.ring_start() - 1);
                self.server
                    .mvcc
                    .changes_between(from, to, HISTORY_BATCH, w.prev_kv)
                    .map(|(changes, upto)| {
                        let events = changes
                            .iter()
                            .filter(|c| w.wants(c))
                            .map(|c| w.event(c))
                            .collect();
                        (events, upto)
                    })
            }
        };
        let (events, upto) = match batch {
            Ok(b) => b,
            Err(Error::Compacted) => {
                self.watchers.remove(&id);
                let r = WatchResponse {
                    header: Some(self.server.header(0)),
                    watch_id: id,
                    canceled: true,
                    compact_revision: self.server.mvcc.compact_revision(),
                    ..Default::default()
                };
                self.send(r).await?;
                return Ok(false);
            }
            Err(e) => {
                tracing::error!(error = %e, watch_id = id, "reading watch history failed");
                self.watchers.remove(&id);
                let mut r = self.response(id, target);
                r.canceled = true;
                r.cancel_reason = e.to_string();
                self.send(r).await?;
                return Ok(false);
            }
        };
        let fragment = w.fragment;
        if !events.is_empty() && !self.still_permitted(id) {
            self.watchers.remove(&id);
            let mut r = self.response(id, target);
            r.canceled = true;
            r.cancel_reason = PERMISSION_DENIED.into();
            self.send(r).await?;
            return Ok(false);
        }
        if let Some(w) = self.watchers.get_mut(&id) {
            w.next_rev = upto + 1;
        }
        if !events.is_empty() {
            let mut r = self.response(id, upto);
            r.events = events;
            if fragment {
                for part in split_fragments(r, self.server.max_request_bytes) {
                    self.send(part).await?;
                }
            } else {
                self.send(r).await?;
            }
        }
        Ok(true)
    }

    /// Re-checks a watcher's read permission when the auth state changed since it was
    /// last confirmed. etcd checks only when a watcher is created; Pontoon also stops
    /// delivering to a watcher whose user lost the permission (or was deleted), so a
    /// revoked permission takes effect on open watches too.
    fn still_permitted(&mut self, id: i64) -> bool {
        let auth = self.server.mvcc.auth();
        let Some(w) = self.watchers.get_mut(&id) else {
            return false;
        };
        if w.auth_checked == auth.revision || (!auth.enabled && w.auth_checked == u64::MAX) {
            return true;
        }
        let who = AuthInfo {
            username: w.user.clone(),
            revision: if w.user.is_empty() { 0 } else { auth.revision },
        };
        let (start, end) = w.span.key_and_range_end();
        if auth.check(&who, start, end, PermType::Read).is_ok() {
            w.auth_checked = if auth.enabled {
                auth.revision
            } else {
                u64::MAX
            };
            true
        } else {
            false
        }
    }

    /// The revision every watcher of this stream has seen everything up to.
    fn synced_revision(&self) -> i64 {
        let published = self.hub.published();
        self.watchers
            .values()
            .map(|w| w.next_rev - 1)
            .fold(published, i64::min)
            .max(0)
    }

    async fn on_progress_tick(&mut self) -> Result<(), Closed> {
        let published = self.hub.published();
        let ids: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify && w.next_rev > published)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.send(self.response(id, published)).await?;
        }
        Ok(())
    }
}

/// Splits a response whose encoding exceeds `limit` into fragments: every part but the
/// last has `fragment` set; each part has at least one event.
fn split_fragments(resp: WatchResponse, limit: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() <= limit || resp.events.len() <= 1 {
        return vec![resp];
    }
    let base = WatchResponse {
        events: Vec::new(),
        ..resp.clone()
    };
    let overhead = base.encoded_len();
    let mut parts = Vec::new();
    let mut current = base.clone();
    let mut size = overhead;
    for ev in resp.events {
        let ev_size = ev.encoded_len() + 4;
        if !current.events.is_empty() && size + ev_size > limit {
            current.fragment = true;
            parts.push(std::mem::replace(&mut current, base.clone()));
            size = overhead;
        }
        size += ev_size;
        current.events.push(ev);
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use pontoon_proto::mvccpb::KeyValue;

    #[test]
    fn fragments_keep_every_event_in_order() {
        let events: Vec<Event> = (0..10)
            .map(|i| Event {
                r#type: 0,
                kv: Some(KeyValue {
                    key: format!("k{i}").into_bytes(),
                    value: vec![0; 100],
                    ..Default::default()
                }),
                prev_kv: None,
            })
            .collect();
        let resp = WatchResponse {
            watch_id: 3,
            events: events.clone(),
            ..Default::default()
        };
        let parts = split_fragments(resp.clone(), 350);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        assert!(parts
            .iter()
            .all(|p| p.watch_id == 3 && !p.events.is_empty()));
        let rejoined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(rejoined, events);
        assert_eq!(split_fragments(resp, 1 << 20).len(), 1);
    }
}
