//! The HTTP face of the client port, next to gRPC as on etcd's: `/health`, `/livez`,
//! `/readyz`, `/version`, `/metrics` (Prometheus text, etcd's metric names) and the
//! JSON gateway under `/v3/` ([`super::gateway`]).
//!
//! `/health` answers as etcd 3.5 does: `{"health":"true","reason":""}` with 200 when
//! this member knows a leader, has no active alarm and can serve a linearizable read;
//! otherwise 503 with the reason (`RAFT NO LEADER`, `ALARM NOSPACE`, ...).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::{EtcdServer, CLUSTER_VERSION, SERVER_VERSION};
use crate::metrics::METRICS;

/// Adds the HTTP endpoints, gRPC request counting and etcd's require-leader check to
/// the gRPC router.
pub fn routes(grpc: Router, server: Arc<EtcdServer>) -> Router {
    let max_request_bytes = server.max_request_bytes;
    let grpc = grpc.layer(GrpcFrontLayer {
        server: server.clone(),
    });
    let http = monitoring(server);
    // The JSON gateway calls the gRPC methods through these same layers.
    let gateway = super::gateway::routes(grpc.clone(), max_request_bytes);
    grpc.merge(http).merge(gateway)
}

/// The plain HTTP endpoints, also served alone on `--listen-metrics-urls`.
pub fn monitoring(server: Arc<EtcdServer>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .with_state(server)
}

/// What every gRPC call passes before its service, as one tower layer (one plain
/// future per call; this is on every request's path):
///
/// - counting: `grpc_server_started_total` on arrival, `grpc_server_handled_total`
///   with the status code when the response (or its trailers-only error) is ready;
/// - etcd's require-leader check: clients mark requests that must not wait for an
///   election with the metadata `hasleader: true` (clientv3's `WithRequireLeader`;
///   Kubernetes sets it on watches); a member that knows no leader answers them
///   `etcdserver: no leader` at once (counted too).
#[derive(Clone)]
struct GrpcFrontLayer {
    server: Arc<EtcdServer>,
}

impl<S> tower_layer::Layer<S> for GrpcFrontLayer {
    type Service = GrpcFront<S>;

    fn layer(&self, inner: S) -> GrpcFront<S> {
        GrpcFront {
            inner,
            server: self.server.clone(),
        }
    }
}

#[derive(Clone)]
struct GrpcFront<S> {
    inner: S,
    server: Arc<EtcdServer>,
}

impl<S> tower_service::Service<Request> for GrpcFront<S>
where
    S: tower_service::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let grpc = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            return Counted::Call {
                inner: self.inner.call(req),
                path: None,
            };
        }
        // Uri clones share their bytes: no allocation per call.
        let uri = req.uri().clone();
        METRICS.grpc_started(uri.path());
        let required = req
            .headers()
            .get("hasleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        if required && self.server.raft.status().leader() == 0 {
            let status = super::status::to_status(crate::Error::NoLeader);
            let resp = status.into_http::<axum::body::Body>().into_response();
            count_handled(&uri, &resp);
            return Counted::Refused { resp: Some(resp) };
        }
        Counted::Call {
            inner: self.inner.call(req),
            path: Some(uri),
        }
    }
}

pin_project_lite::pin_project! {
    /// A gRPC call in flight, counted as handled when its response is ready.
    #[project = CountedProj]
    enum Counted<F> {
        Call { #[pin] inner: F, path: Option<Uri> },
        Refused { resp: Option<Response> },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for Counted<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CountedProj::Call { inner, path } => {
                let resp = ready!(inner.poll(cx))?;
                if let Some(uri) = path.take() {
                    count_handled(&uri, &resp);
                }
                Poll::Ready(Ok(resp))
            }
            CountedProj::Refused { resp } => {
                Poll::Ready(Ok(resp.take().expect("polled after completion")))
            }
        }
    }
}

fn count_handled(uri: &Uri, resp: &Response) {
    // Errors come back trailers-only: the status is in the headers.
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    METRICS.grpc_handled(uri.path(), code);
}

/// Why this member is not healthy, if it is not.
async fn unhealthy(s: &EtcdServer, linearizable: bool) -> Option<String> {
    if s.raft.status().leader() == 0 {
        return Some("RAFT NO LEADER".into());
    }
    if let Ok(alarms) = s.mvcc.alarms() {
        if let Some(a) = alarms.first() {
            return Some(format!("ALARM {}", super::maintenance::alarm_text(a.alarm)));
        }
    }
    if linearizable {
        if let Err(e) = s.raft.read_index().await {
            return Some(format!("QGET ERROR: {e}"));
        }
    }
    None
}

async fn health(State(s): State<Arc<EtcdServer>>) -> Response {
    match unhealthy(&s, true).await {
        None => (
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"health":"true","reason":""}"#.to_string(),
        )
            .into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/json")],
            format!(r#"{{"health":"false","reason":"{reason}"}}"#),
        )
            .into_response(),
    }
}

async fn livez() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

async fn readyz(State(s): State<Arc<EtcdServer>>) -> Response {
    match unhealthy(&s, false).await {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("[-]{reason}\nreadyz check failed\n"),
        )
            .into_response(),
    }
}

async fn version() -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        format!(r#"{{"etcdserver":"{SERVER_VERSION}","etcdcluster":"{CLUSTER_VERSION}"}}"#),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<EtcdServer>>) -> Response {
    let st = s.raft.status();
    let (db, in_use) = s.mvcc.db_size();
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let gauges = [
        (
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            "gauge",
            (st.leader() != 0) as u8 as f64,
        ),
        (
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            "gauge",
            st.is_leader() as u8 as f64,
        ),
        (
            "etcd_server_is_learner",
            "Whether or not this member is a learner. 1 if is, 0 otherwise.",
            "gauge",
            st.is_learner() as u8 as f64,
        ),
        (
            "etcd_server_leader_changes_seen_total",
            "The number of leader changes seen.",
            "counter",
            n(&st.leader_changes),
        ),
        (
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
            "gauge",
            st.commit_index() as f64,
        ),
        (
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied.",
            "gauge",
            st.applied_index() as f64,
        ),
        (
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit.",
            "gauge",
            n(&st.proposals_pending),
        ),
        (
            "etcd_server_proposals_failed_total",
            "The total number of failed proposals seen.",
            "counter",
            n(&st.proposals_failed),
        ),
        (
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            "gauge",
            db as f64,
        ),
        (
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
            "gauge",
            in_use as f64,
        ),
        (
            "etcd_debugging_mvcc_current_revision",
            "The current revision of store.",
            "gauge",
            s.mvcc.current_revision() as f64,
        ),
        (
            "etcd_debugging_mvcc_compact_revision",
            "The revision of the last compaction in store.",
            "gauge",
            s.mvcc.compact_revision() as f64,
        ),
        (
            "etcd_server_snapshot_apply_in_progress_total",
            "1 if the server is applying the incoming snapshot. 0 if none.",
            "gauge",
            0.0,
        ),
        (
            "etcd_network_snapshot_send_success",
            "Total number of successful snapshot sends.",
            "counter",
            n(&st.snapshots_sent),
        ),
        (
            "etcd_server_id",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
            "gauge",
            1.0,
        ),
    ];
    let mut body = METRICS.render(&gauges);
    // etcd labels the member ID gauge; keep its shape.
    body = body.replace(
        "etcd_server_id 1\n",
        &format!("etcd_server_id{{server_id=\"{:x}\"}} 1\n", s.member_id),
    );
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}
