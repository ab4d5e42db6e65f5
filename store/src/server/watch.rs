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
//!
//! Responses travel in wire form: the stream task encodes each response itself, and
//! an event response is the watcher's own header and watch ID followed by events
//! encoded once for every watcher (`crate::watch`, "Events are encoded once"). The
//! gRPC service is therefore written here rather than generated ([`WatchGrpc`]): the
//! generated one takes `WatchResponse` structs and encodes each again.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use pontoon_proto::authpb::permission::Type as PermType;
use pontoon_proto::etcdserverpb::watch_create_request::FilterType;
use pontoon_proto::etcdserverpb::watch_request::RequestUnion;
use pontoon_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};

use super::auth::Credentials;
use super::EtcdServer;
use crate::auth::AuthInfo;
use crate::error::Error;
use crate::mvcc::{Change, KeySpan};
use crate::watch::{event_field, WatchHub};

/// Changes read from history per step, so a far-behind watcher is caught up in
/// bounded memory.
const HISTORY_BATCH: usize = 1000;
/// Responses buffered per stream before the stream task waits for the client.
const STREAM_BUFFER: usize = 128;

const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's cancel reason for a watch the user may not read (a gRPC error's text).
const PERMISSION_DENIED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

/// Encoded `WatchResponse`s, as a stream task sends them.
type WireStream = ReceiverStream<Result<Bytes, Status>>;

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

    /// Starts a watch stream's task; its responses, encoded, are the returned stream.
    fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Response<WireStream> {
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
        Response::new(ReceiverStream::new(rx))
    }
}

/// The `etcdserverpb.Watch` gRPC service over [`WatchService`]: what tonic would
/// generate, with a codec that sends already-encoded responses as they are.
#[derive(Clone)]
pub struct WatchGrpc {
    inner: Arc<WatchService>,
    max_decoding_message_size: usize,
}

impl WatchGrpc {
    pub fn new(inner: WatchService, max_decoding_message_size: usize) -> Self {
        WatchGrpc {
            inner: Arc::new(inner),
            max_decoding_message_size,
        }
    }
}

impl NamedService for WatchGrpc {
    const NAME: &'static str = "etcdserverpb.Watch";
}

struct WatchMethod(Arc<WatchService>);

impl StreamingService<WatchRequest> for WatchMethod {
    type Response = Bytes;
    type ResponseStream = WireStream;
    type Future = BoxFuture<Response<WireStream>, Status>;

    fn call(&mut self, req: Request<Streaming<WatchRequest>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { Ok(inner.watch(req)) })
    }
}

impl<B> tower_service::Service<http::Request<B>> for WatchGrpc
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != "/etcdserverpb.Watch/Watch" {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = WatchMethod(self.inner.clone());
        let mut grpc = Grpc::new(WireCodec)
            .apply_max_message_size_config(Some(self.max_decoding_message_size), None);
        Box::pin(async move { Ok(grpc.streaming(method, req).await) })
    }
}

/// Decodes `WatchRequest`s as tonic's prost codec does; encodes by copying bytes that
/// are already a `WatchResponse`.
struct WireCodec;

impl Codec for WireCodec {
    type Encode = Bytes;
    type Decode = WatchRequest;
    type Encoder = WireEncoder;
    type Decoder = tonic_prost::ProstDecoder<WatchRequest>;

    fn encoder(&mut self) -> WireEncoder {
        WireEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct WireEncoder;

impl Encoder for WireEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

/// An event response in wire form: `head` (header, watch ID, fragment flag; no
/// events) followed by encoded `events` fields.
fn events_response(head: &WatchResponse, events: &[Bytes]) -> Bytes {
    let len = head.encoded_len() + events.iter().map(Bytes::len).sum::<usize>();
    let mut buf = BytesMut::with_capacity(len);
    head.encode(&mut buf)
        .expect("the buffer was sized for the response");
    for ev in events {
        buf.put_slice(ev);
    }
    buf.freeze()
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
}

/// The client went away; stop the stream.
struct Closed;

struct WatchStream {
    /// The stream's token or client certificate, looked up for each new watcher.
    creds: Credentials,
    server: Arc<EtcdServer>,
    hub: Arc<WatchHub>,
    tx: mpsc::Sender<Result<Bytes, Status>>,
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
        self.send_wire(resp.encode_to_vec().into()).await
    }

    async fn send_wire(&self, resp: Bytes) -> Result<(), Closed> {
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
                let events: Vec<Bytes> = revs
                    .iter()
                    .flat_map(|p| p.changes.iter().zip(p.wire_events(w.prev_kv)))
                    .filter(|(c, _)| w.wants(c))
                    .map(|(_, ev)| ev.clone())
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
                            .map(|c| event_field(c, w.prev_kv))
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
            let head = self.response(id, upto);
            if fragment {
                for part in split_fragments(head, &events, self.server.max_request_bytes) {
                    self.send_wire(part).await?;
                }
            } else {
                self.send_wire(events_response(&head, &events)).await?;
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

/// An event response for `head`'s watcher whose encoding would exceed `limit`, split
/// into fragments: every part but the last has `fragment` set; each part has at least
/// one event.
fn split_fragments(head: WatchResponse, events: &[Bytes], limit: usize) -> Vec<Bytes> {
    let whole = events_response(&head, events);
    if whole.len() <= limit || events.len() <= 1 {
        return vec![whole];
    }
    let part_head = WatchResponse {
        fragment: true,
        ..head.clone()
    };
    let overhead = part_head.encoded_len();
    let mut parts = Vec::new();
    let (mut start, mut size) = (0, overhead);
    for (i, ev) in events.iter().enumerate() {
        if i > start && size + ev.len() > limit {
            parts.push(events_response(&part_head, &events[start..i]));
            (start, size) = (i, overhead);
        }
        size += ev.len();
    }
    parts.push(events_response(&head, &events[start..]));
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::Revision;
    use crate::watch::event;
    use pontoon_proto::etcdserverpb::ResponseHeader;
    use pontoon_proto::mvccpb::{Event, KeyValue};

    fn kv(key: &str, rev: i64, value_len: usize) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            create_revision: 2,
            mod_revision: rev,
            version: rev - 1,
            value: vec![7; value_len],
            lease: 0,
        }
    }

    fn changes() -> Vec<Change> {
        (0..10)
            .map(|i| Change {
                rev: Revision::new(5, i),
                kv: kv(&format!("k{i}"), 5, 100),
                tombstone: i % 3 == 2,
                prev: (i % 2 == 0).then(|| kv(&format!("k{i}"), 4, 50)),
            })
            .collect()
    }

    fn head(watch_id: i64) -> WatchResponse {
        WatchResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 5,
                raft_term: 3,
            }),
            watch_id,
            ..Default::default()
        }
    }

    #[test]
    fn event_responses_are_what_prost_encodes() {
        for prev_kv in [false, true] {
            for watch_id in [0, 3] {
                let changes = changes();
                let wire: Vec<Bytes> = changes.iter().map(|c| event_field(c, prev_kv)).collect();
                let expected = WatchResponse {
                    events: changes.iter().map(|c| event(c, prev_kv)).collect(),
                    ..head(watch_id)
                };
                assert_eq!(
                    events_response(&head(watch_id), &wire),
                    expected.encode_to_vec(),
                    "prev_kv {prev_kv}, watch_id {watch_id}"
                );
            }
        }
    }

    #[test]
    fn fragments_keep_every_event_in_order() {
        let changes = changes();
        let wire: Vec<Bytes> = changes.iter().map(|c| event_field(c, true)).collect();
        let events: Vec<Event> = changes.iter().map(|c| event(c, true)).collect();
        let limit = 350;
        let parts: Vec<WatchResponse> = split_fragments(head(3), &wire, limit)
            .iter()
            .map(|b| WatchResponse::decode(&b[..]).unwrap())
            .collect();
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts.last().unwrap().fragment);
        assert!(parts
            .iter()
            .all(|p| p.watch_id == 3 && !p.events.is_empty() && p.header == head(3).header));
        assert!(parts
            .iter()
            .all(|p| p.events.len() == 1 || p.encoded_len() <= limit));
        let rejoined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(rejoined, events);
        assert_eq!(split_fragments(head(3), &wire, 1 << 20).len(), 1);
    }
}
