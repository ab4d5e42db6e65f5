//! The cost floor of a put's request path: a gRPC server on tonic (the stack Pontoon
//! serves clients with) whose `KV.Put` answers at once, with no raft, no storage and no
//! waiting. `pontoon-bench --workload put --cpu-pids <pid>` against it gives the server
//! CPU per request spent in tokio, hyper/h2, tonic and prost alone; Pontoon's CPU per
//! put minus this is what raft, the WAL, the MVCC apply and the hand-offs cost.
//!
//! `scripts/bench.sh` runs it next to etcd and Pontoon (report: "what limits put c256").
//! `--like-pontoon` serves the service behind an axum router with two `from_fn`
//! middleware layers, the way `pontoon store` routed requests until its two layers
//! became one plain tower layer (`store/src/server/http.rs`); the difference prices
//! `from_fn` layering.
//!
//! Usage: `pontoon-grpc-floor [--like-pontoon] [--listen 127.0.0.1:23790]`.

use std::sync::atomic::{AtomicI64, Ordering};

use pontoon_proto::etcdserverpb::kv_server::{Kv, KvServer};
use pontoon_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Default)]
struct Floor {
    revision: AtomicI64,
}

#[tonic::async_trait]
impl Kv for Floor {
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        Err(Status::unimplemented("the floor server answers Put only"))
    }
    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        if req.key.is_empty() {
            return Err(Status::invalid_argument("etcdserver: key is not provided"));
        }
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 2;
        Ok(Response::new(PutResponse {
            header: Some(ResponseHeader {
                cluster_id: 1,
                member_id: 1,
                revision,
                raft_term: 2,
            }),
            prev_kv: None,
        }))
    }
    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("the floor server answers Put only"))
    }
    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented("the floor server answers Put only"))
    }
    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("the floor server answers Put only"))
    }
}

async fn pass(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // As Pontoon's layers do: look at a header and the path, then call on.
    let _grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let _len = req.uri().path().len();
    next.run(req).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let like_pontoon = args.iter().any(|a| a == "--like-pontoon");
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:23790".to_string());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("answering KV.Put on {listen} (like pontoon: {like_pontoon})");
    let kv = KvServer::new(Floor::default());
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if like_pontoon {
        let router = tonic::service::Routes::new(kv)
            .prepare()
            .into_axum_router()
            .layer(axum::middleware::from_fn(pass))
            .layer(axum::middleware::from_fn(pass));
        builder
            .accept_http1(true)
            .add_routes(router.into())
            .serve_with_incoming(incoming)
            .await?;
    } else {
        builder
            .add_service(kv)
            .serve_with_incoming(incoming)
            .await?;
    }
    Ok(())
}
