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
//! encoded once for every watcher (`crate::watch`, "Events are encoded once").
//!
//! **One chunk per wake-up.** The task frames its responses as gRPC messages itself
//! (flag byte, length, message) into one buffer, its [`Outbox`], and hands the buffer
//! to the connection as one chunk when it has done what woke it (or once the buffer
//! holds [`CHUNK_BYTES`]): a revision seen by a hundred watchers of the stream is one
//! hand-off and one HTTP/2 write, not a hundred, and so is a burst of requests already
//! received (up to [`REQUESTS_PER_WAKE`]), such as a client creating its watchers at
//! start. The header, which every watcher brought to the same revision shares, is
//! encoded once per wake-up too. The gRPC service is therefore written here rather
//! than generated ([`WatchGrpc`]): the generated one takes `WatchResponse` structs,
//! encodes and frames each, and sends each on its own. Invariants:
//!
//! - messages leave in the order they were queued, and requests are served in the
//!   order they came, each with its deliveries, as if they came one at a time;
//! - everything queued is handed over before the task waits for anything else (a
//!   request, a publication, a timer);
//! - the task holds at most [`STREAM_CHUNKS`] chunks the client has not taken before
//!   it waits for the client.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::FutureExt;
use http_body::Frame;
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::{http, Body, BoxFuture, StdError};
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};

use pontoon_proto::authpb::permission::Type as PermType;
use pontoon_proto::etcdserverpb::watch_create_request::FilterType;
use pontoon_proto::etcdserverpb::watch_request::RequestUnion;
use pontoon_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};

use super::auth::Credentials;
use super::EtcdServer;
use crate::auth::{AuthInfo, AuthState};
use crate::error::Error;
use crate::mvcc::{Change, KeySpan};
use crate::watch::{event_field, Published, WatchHub};

/// Changes read from history per step, so a far-behind watcher is caught up in
/// bounded memory.
const HISTORY_BATCH: usize = 1000;
/// Requests a stream task takes, when they are already there, before it answers them.
const REQUESTS_PER_WAKE: usize = 256;
/// Bytes of framed responses a stream task gathers before handing them over.
const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks handed over but not yet taken by the connection before the stream task
/// waits for the client.
const STREAM_CHUNKS: usize = 4;

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

    /// Starts a watch stream's task; the returned receiver yields its responses as
    /// chunks of gRPC-framed messages.
    fn watch(&self, req: Request<Streaming<WatchRequest>>) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
        let stream = WatchStream {
            creds: self.server.credentials(&req),
            server: self.server.clone(),
            hub: self.hub.clone(),
            out: Outbox {
                tx,
                buf: BytesMut::new(),
            },
            watchers: BTreeMap::new(),
            next_id: 0,
            progress_requested: false,
        };
        tokio::spawn(stream.run(req.into_inner(), self.progress_interval));
        rx
    }
}

/// The `etcdserverpb.Watch` gRPC service over [`WatchService`]: requests are decoded
/// as tonic's generated service would; responses arrive already framed ([`Outbox`]) and
/// go out as they are ([`WireBody`]).
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
        // Pontoon accepts no compressed requests (as tonic without compression).
        if let Some(enc) = req.headers().get("grpc-encoding") {
            if enc.as_bytes() != b"identity" {
                let status = Status::unimplemented(format!(
                    "Content is compressed with `{}` which isn't supported",
                    String::from_utf8_lossy(enc.as_bytes())
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        let max = self.max_decoding_message_size;
        let req = Request::from_http(req.map(|body| {
            Streaming::new_request(
                tonic_prost::ProstDecoder::<WatchRequest>::default(),
                body,
                None,
                Some(max),
            )
        }));
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut resp = http::Response::new(tonic::body::Body::new(WireBody {
                rx: inner.watch(req),
                done: false,
            }));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            Ok(resp)
        })
    }
}

/// A watch stream's response body: the stream task's chunks as data frames, then the
/// trailers of a stream that ended well (`grpc-status: 0`) once the task is done.
struct WireBody {
    rx: mpsc::Receiver<Bytes>,
    done: bool,
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            Poll::Ready(None) => {
                self.done = true;
                let mut trailers = http::HeaderMap::with_capacity(1);
                let ok = Status::ok("").add_header(&mut trailers).map(|()| trailers);
                Poll::Ready(Some(ok.map(Frame::trailers)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A stream's responses, framed, on their way to the connection (module note, "One
/// chunk per wake-up").
struct Outbox {
    tx: mpsc::Sender<Bytes>,
    buf: BytesMut,
}

impl Outbox {
    /// Frames and queues a response.
    fn push(&mut self, resp: &WatchResponse) {
        self.frame(resp.encoded_len());
        resp.encode(&mut self.buf)
            .expect("a BytesMut grows to fit the message");
    }

    /// Queues a response already encoded.
    fn push_wire(&mut self, msg: &[u8]) {
        self.frame(msg.len());
        self.buf.put_slice(msg);
    }

    /// Queues an event response: `head` (an encoded `WatchResponse` holding only its
    /// header), the watch ID, then the events; what prost would encode for the same
    /// response (field order 1, 2, 11).
    fn push_events<'a>(
        &mut self,
        head: &[u8],
        watch_id: i64,
        events: impl Iterator<Item = &'a Bytes> + Clone,
    ) {
        let id_len = if watch_id == 0 {
            0
        } else {
            1 + prost::encoding::encoded_len_varint(watch_id as u64)
        };
        let len = head.len() + id_len + events.clone().map(Bytes::len).sum::<usize>();
        self.frame(len);
        self.buf.put_slice(head);
        if watch_id != 0 {
            prost::encoding::int64::encode(2, &watch_id, &mut self.buf);
        }
        for ev in events {
            self.buf.put_slice(ev);
        }
    }

    /// A gRPC message's prefix: not compressed, then the length.
    fn frame(&mut self, len: usize) {
        self.buf.reserve(5 + len);
        self.buf.put_u8(0);
        self.buf
            .put_u32(u32::try_from(len).expect("a watch response is under 4 GiB"));
    }

    /// Hands what is queued to the connection once it holds a chunk's worth.
    async fn maybe_flush(&mut self) -> Result<(), Closed> {
        if self.buf.len() >= CHUNK_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands everything queued to the connection, waiting while the client is
    /// [`STREAM_CHUNKS`] behind.
    async fn flush(&mut self) -> Result<(), Closed> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // The whole buffer goes, spare capacity included: an idle stream keeps no
        // allocation (a `split` would keep the rest of it, and with it the chunk's).
        let chunk = std::mem::take(&mut self.buf).freeze();
        self.tx.send(chunk).await.map_err(|_| Closed)
    }
}

/// An event response in wire form: `head` (header, watch ID, fragment flag; no
/// events) followed by encoded `events` fields. Used for the parts of a fragmented
/// response ([`split_fragments`]); whole ones are written straight into the outbox
/// ([`Outbox::push_events`]).
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

/// What the watchers of one stream share within one wake-up: computed for the first
/// watcher that needs it, reused by the others at the same position.
#[derive(Default)]
struct Shared {
    /// The ring's revisions `from..=to`.
    recent: Option<Arc<Recent>>,
    /// An encoded `WatchResponse` holding only the header for a revision.
    head: Option<(i64, Vec<u8>)>,
    auth: Option<Arc<AuthState>>,
}

struct Recent {
    from: i64,
    to: i64,
    revs: Vec<Arc<Published>>,
}

impl Shared {
    fn auth(&mut self, server: &EtcdServer) -> &AuthState {
        self.auth.get_or_insert_with(|| server.mvcc.auth())
    }

    fn head(&mut self, revision: i64, server: &EtcdServer) -> &[u8] {
        if self.head.as_ref().is_none_or(|(rev, _)| *rev != revision) {
            let head = WatchResponse {
                header: Some(server.header(revision)),
                ..Default::default()
            };
            self.head = Some((revision, head.encode_to_vec()));
        }
        &self.head.as_ref().expect("set above").1
    }
}

/// The encoded events of `revs` that watcher `w` wants, in order.
fn wanted<'a>(
    revs: &'a [Arc<Published>],
    w: &'a Watcher,
) -> impl Iterator<Item = &'a Bytes> + Clone + 'a {
    revs.iter()
        .flat_map(move |p| p.changes.iter().zip(p.wire_events(w.prev_kv)))
        .filter(move |(c, _)| w.wants(c))
        .map(|(_, ev)| ev)
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
    out: Outbox,
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
            if self.deliver().await.is_err() || self.out.flush().await.is_err() {
                return;
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if self.on_request(req).await.is_err() {
                            return;
                        }
                        // Requests already received are taken before answering (each
                        // served, deliveries included, before the next, as one at a
                        // time): a burst of creates is answered in one chunk.
                        for _ in 1..REQUESTS_PER_WAKE {
                            let Some(msg) = inbound.message().now_or_never() else {
                                break;
                            };
                            if self.deliver().await.is_err() {
                                return;
                            }
                            let Ok(Some(req)) = msg else {
                                let _ = self.out.flush().await;
                                return;
                            };
                            if self.on_request(req).await.is_err() {
                                return;
                            }
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

    /// Queues a response; it leaves with the rest of this wake-up's.
    async fn send(&mut self, resp: WatchResponse) -> Result<(), Closed> {
        self.out.push(&resp);
        self.out.maybe_flush().await
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
        let mut shared = Shared::default();
        for id in ids {
            loop {
                let target = self.hub.published();
                let Some(w) = self.watchers.get(&id) else {
                    break;
                };
                if w.next_rev > target {
                    break;
                }
                if !self.step(id, target, &mut shared).await? {
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
    /// gone (canceled for compaction or lost permission).
    async fn step(&mut self, id: i64, target: i64, shared: &mut Shared) -> Result<bool, Closed> {
        let from = self.watchers[&id].next_rev;
        // As in etcd, a position below the compacted revision is canceled even if the
        // events are still at hand.
        if from < self.server.mvcc.compact_revision() {
            return self.cancel_compacted(id).await;
        }
        let recent = match &shared.recent {
            Some(r) if r.from == from && r.to == target => Some(r.clone()),
            _ => {
                let r = self.hub.recent(from, target).map(|revs| {
                    Arc::new(Recent {
                        from,
                        to: target,
                        revs,
                    })
                });
                shared.recent = r.clone();
                r
            }
        };
        let Some(recent) = recent else {
            return self.step_from_history(id, target, shared).await;
        };
        // The common case: the revisions are in the hub's ring, their events encoded
        // once and shared by every watcher at the same position.
        let upto = recent.revs.last().map_or(target, |p| p.rev);
        let w = &self.watchers[&id];
        let fragment = w.fragment;
        if wanted(&recent.revs, w).next().is_none() {
            self.watchers.get_mut(&id).expect("present").next_rev = upto + 1;
            return Ok(true);
        }
        if !self.still_permitted(id, shared.auth(&self.server)) {
            return self.cancel_denied(id, target).await;
        }
        if fragment {
            let events = wanted(&recent.revs, &self.watchers[&id]).cloned().collect();
            return self.send_events(id, upto, events, shared).await;
        }
        let head = shared.head(upto, &self.server);
        self.out
            .push_events(head, id, wanted(&recent.revs, &self.watchers[&id]));
        self.watchers.get_mut(&id).expect("present").next_rev = upto + 1;
        self.out.maybe_flush().await?;
        Ok(true)
    }

    /// [`Self::step`] for a watcher behind the hub's ring: reads a bounded batch of
    /// its revisions from the store's history.
    async fn step_from_history(
        &mut self,
        id: i64,
        target: i64,
        shared: &mut Shared,
    ) -> Result<bool, Closed> {
        let w = &self.watchers[&id];
        let to = target.min(self.hub.ring_start() - 1);
        let (events, upto): (Vec<Bytes>, i64) =
            match self
                .server
                .mvcc
                .changes_between(w.next_rev, to, HISTORY_BATCH, w.prev_kv)
            {
                Ok((changes, upto)) => (
                    changes
                        .iter()
                        .filter(|c| w.wants(c))
                        .map(|c| event_field(c, w.prev_kv))
                        .collect(),
                    upto,
                ),
                Err(Error::Compacted) => return self.cancel_compacted(id).await,
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
        if !events.is_empty() && !self.still_permitted(id, shared.auth(&self.server)) {
            return self.cancel_denied(id, target).await;
        }
        self.send_events(id, upto, events, shared).await
    }

    /// Sends watcher `id` the `events` that bring it to revision `upto` (split into
    /// fragments if it asked for them) and moves it past `upto`.
    async fn send_events(
        &mut self,
        id: i64,
        upto: i64,
        events: Vec<Bytes>,
        shared: &mut Shared,
    ) -> Result<bool, Closed> {
        let Some(w) = self.watchers.get_mut(&id) else {
            return Ok(false);
        };
        w.next_rev = upto + 1;
        if events.is_empty() {
            return Ok(true);
        }
        if w.fragment {
            let head = self.response(id, upto);
            for part in split_fragments(head, &events, self.server.max_request_bytes) {
                self.out.push_wire(&part);
                self.out.maybe_flush().await?;
            }
        } else {
            let head = shared.head(upto, &self.server);
            self.out.push_events(head, id, events.iter());
            self.out.maybe_flush().await?;
        }
        Ok(true)
    }

    async fn cancel_compacted(&mut self, id: i64) -> Result<bool, Closed> {
        self.watchers.remove(&id);
        let r = WatchResponse {
            header: Some(self.server.header(0)),
            watch_id: id,
            canceled: true,
            compact_revision: self.server.mvcc.compact_revision(),
            ..Default::default()
        };
        self.send(r).await?;
        Ok(false)
    }

    async fn cancel_denied(&mut self, id: i64, target: i64) -> Result<bool, Closed> {
        self.watchers.remove(&id);
        let mut r = self.response(id, target);
        r.canceled = true;
        r.cancel_reason = PERMISSION_DENIED.into();
        self.send(r).await?;
        Ok(false)
    }

    /// Re-checks a watcher's read permission when the auth state changed since it was
    /// last confirmed. etcd checks only when a watcher is created; Pontoon also stops
    /// delivering to a watcher whose user lost the permission (or was deleted), so a
    /// revoked permission takes effect on open watches too.
    fn still_permitted(&mut self, id: i64, auth: &AuthState) -> bool {
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

    /// Splits a chunk into its gRPC messages, checking each prefix.
    fn messages(mut chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !chunk.is_empty() {
            assert_eq!(chunk[0], 0, "not compressed");
            let len = u32::from_be_bytes(chunk[1..5].try_into().unwrap()) as usize;
            out.push(chunk[5..5 + len].to_vec());
            chunk = &chunk[5 + len..];
        }
        out
    }

    #[tokio::test]
    async fn one_chunk_carries_every_queued_response_framed_in_order() {
        let (tx, mut rx) = mpsc::channel(STREAM_CHUNKS);
        let mut out = Outbox {
            tx,
            buf: BytesMut::new(),
        };
        let changes = changes();
        let wire: Vec<Bytes> = changes.iter().map(|c| event_field(c, true)).collect();
        let created = WatchResponse {
            created: true,
            ..head(7)
        };
        let mut expected = vec![created.encode_to_vec()];
        out.push(&created);
        let only_header = WatchResponse {
            watch_id: 0,
            ..head(0)
        }
        .encode_to_vec();
        for watch_id in [0, 3, -1, i64::MAX] {
            out.push_events(&only_header, watch_id, wire.iter());
            let whole = WatchResponse {
                events: changes.iter().map(|c| event(c, true)).collect(),
                ..head(watch_id)
            };
            expected.push(whole.encode_to_vec());
        }
        out.push_wire(b"");
        expected.push(Vec::new());
        out.flush().await.ok().unwrap();
        out.flush().await.ok().unwrap();
        let chunk = rx.try_recv().unwrap();
        assert!(rx.try_recv().is_err(), "an empty outbox sends nothing");
        assert_eq!(messages(&chunk), expected);
    }

    #[tokio::test]
    async fn the_body_ends_with_an_ok_status_once_the_stream_task_is_gone() {
        use http_body_util::BodyExt;
        let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
        let mut body = WireBody { rx, done: false };
        tx.send(Bytes::from_static(b"one")).await.unwrap();
        drop(tx);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "one");
        let last = body.frame().await.unwrap().unwrap();
        let trailers = last.into_trailers().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(trailers.len(), 1);
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
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
