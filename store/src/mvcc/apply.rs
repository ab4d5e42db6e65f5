//! Executing write requests on a [`WriteTxn`]: Put, DeleteRange and Txn with etcd's
//! semantics.
//!
//! Txn follows etcd's applier step by step:
//! 1. every compare on the chosen path is evaluated up front against the state before
//!    the Txn, nested Txns included (their branches are fixed before anything runs);
//! 2. the ops on that path are checked: a Put naming a lease that does not exist fails
//!    with `LeaseNotFound`; `ignore_value`/`ignore_lease` on a missing key fails with
//!    `KeyNotFound`; a Range at a compacted or future revision fails. Any failure fails
//!    the whole Txn before it changes anything;
//! 3. the ops run in order, each seeing the writes of those before it.
//!
//! Only the top-level response header carries a revision from the store; responses
//! nested in a Txn carry the revision their operation saw, as etcd's do.

use pontoon_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pontoon_proto::etcdserverpb::request_op::Request;
use pontoon_proto::etcdserverpb::response_op::Response;
use pontoon_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use pontoon_proto::mvccpb::KeyValue;

use super::range::{range, range_capped, resolve_read_revision};
use super::span::KeySpan;
use super::view::ReadView;
use super::write::WriteTxn;
use crate::error::{Error, Result};

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn check_put(txn: &WriteTxn<'_>, p: &PutRequest) -> Result<()> {
    if p.lease != 0 && !p.ignore_lease && !txn.lease_exists(p.lease)? {
        return Err(Error::LeaseNotFound);
    }
    if (p.ignore_value || p.ignore_lease) && txn.get(&p.key)?.is_none() {
        return Err(Error::KeyNotFound);
    }
    Ok(())
}

pub fn put(txn: &mut WriteTxn<'_>, p: &PutRequest) -> Result<PutResponse> {
    check_put(txn, p)?;
    put_unchecked(txn, p)
}

fn put_unchecked(txn: &mut WriteTxn<'_>, p: &PutRequest) -> Result<PutResponse> {
    let value = (!p.ignore_value).then(|| p.value.clone());
    let lease = (!p.ignore_lease).then_some(p.lease);
    let prev = txn.put(&p.key, value, lease)?;
    Ok(PutResponse {
        header: header(txn.read_revision()),
        prev_kv: if p.prev_kv { prev } else { None },
    })
}

pub fn delete_range(txn: &mut WriteTxn<'_>, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
    let prevs = txn.delete_range(&KeySpan::new(&d.key, &d.range_end))?;
    Ok(DeleteRangeResponse {
        header: header(txn.read_revision()),
        deleted: prevs.len() as i64,
        prev_kvs: if d.prev_kv { prevs } else { Vec::new() },
    })
}

pub fn txn(txn: &mut WriteTxn<'_>, req: &TxnRequest, compacted: i64) -> Result<TxnResponse> {
    let mut path = Vec::new();
    compare_path(txn, txn.read_revision(), req, &mut path)?;
    let mut cursor = path.iter().copied();
    check_ops(txn, req, &mut cursor, compacted)?;
    let mut cursor = path.iter().copied();
    let mut resp = run_txn(txn, req, &mut cursor, compacted)?;
    resp.header = header(txn.read_revision());
    Ok(resp)
}

/// A Txn that writes nothing ([`txn_is_read_only`]), served from a read view at
/// revision `current` without going through raft, as etcd serves one. The same steps
/// as [`txn`]: compares first, then every Range's revision is checked before any runs.
/// Each Range is refused past `max_bytes`, as a plain Range is (this Txn is served by
/// one member only, so the cap cannot make members disagree).
pub fn read_only_txn(
    view: &dyn ReadView,
    req: &TxnRequest,
    current: i64,
    compacted: i64,
    max_bytes: usize,
) -> Result<TxnResponse> {
    debug_assert!(txn_is_read_only(req));
    let mut path = Vec::new();
    compare_path(view, current, req, &mut path)?;
    check_read_ops(req, &mut path.iter().copied(), current, compacted)?;
    let mut path = path.iter().copied();
    let mut resp = run_read_ops(view, req, &mut path, current, compacted, max_bytes)?;
    resp.header = header(current);
    Ok(resp)
}

fn check_read_ops(
    req: &TxnRequest,
    path: &mut impl Iterator<Item = bool>,
    current: i64,
    compacted: i64,
) -> Result<()> {
    let ok = path.next().expect("compare path covers every txn");
    for op in branch(req, ok) {
        match &op.request {
            Some(Request::RequestRange(r)) => {
                resolve_read_revision(r.revision, current, compacted)?;
            }
            Some(Request::RequestTxn(nested)) => check_read_ops(nested, path, current, compacted)?,
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => {
                unreachable!("read-only txn")
            }
            None => {}
        }
    }
    Ok(())
}

fn run_read_ops(
    view: &dyn ReadView,
    req: &TxnRequest,
    path: &mut impl Iterator<Item = bool>,
    current: i64,
    compacted: i64,
    max_bytes: usize,
) -> Result<TxnResponse> {
    let ok = path.next().expect("compare path covers every txn");
    let mut responses = Vec::new();
    for op in branch(req, ok) {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Some(Response::ResponseRange(range_capped(
                view, r, current, compacted, max_bytes,
            )?)),
            Some(Request::RequestTxn(nested)) => {
                let mut r = run_read_ops(view, nested, path, current, compacted, max_bytes)?;
                r.header = Some(ResponseHeader::default());
                Some(Response::ResponseTxn(r))
            }
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => {
                unreachable!("read-only txn")
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}

/// Evaluates the compares of `req` (against `view` at revision `at`) and, depth first,
/// of the nested Txns on the branch each compare selects, recording each outcome in
/// `path`.
fn compare_path(
    view: &dyn ReadView,
    at: i64,
    req: &TxnRequest,
    path: &mut Vec<bool>,
) -> Result<()> {
    let mut ok = true;
    for c in &req.compare {
        if !compare(view, at, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    for op in branch(req, ok) {
        if let Some(Request::RequestTxn(nested)) = &op.request {
            compare_path(view, at, nested, path)?;
        }
    }
    Ok(())
}

fn branch(req: &TxnRequest, succeeded: bool) -> &[RequestOp] {
    if succeeded {
        &req.success
    } else {
        &req.failure
    }
}

fn check_ops(
    txn: &WriteTxn<'_>,
    req: &TxnRequest,
    path: &mut impl Iterator<Item = bool>,
    compacted: i64,
) -> Result<()> {
    let ok = path.next().expect("compare path covers every txn");
    for op in branch(req, ok) {
        match &op.request {
            Some(Request::RequestPut(p)) => check_put(txn, p)?,
            Some(Request::RequestRange(r)) => {
                resolve_read_revision(r.revision, txn.read_revision(), compacted)?;
            }
            Some(Request::RequestTxn(nested)) => check_ops(txn, nested, path, compacted)?,
            Some(Request::RequestDeleteRange(_)) | None => {}
        }
    }
    Ok(())
}

fn run_txn(
    txn: &mut WriteTxn<'_>,
    req: &TxnRequest,
    path: &mut impl Iterator<Item = bool>,
    compacted: i64,
) -> Result<TxnResponse> {
    let ok = path.next().expect("compare path covers every txn");
    let mut responses = Vec::new();
    for op in branch(req, ok) {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => {
                let current = txn.read_revision();
                Some(Response::ResponseRange(range(txn, r, current, compacted)?))
            }
            Some(Request::RequestPut(p)) => Some(Response::ResponsePut(put_unchecked(txn, p)?)),
            Some(Request::RequestDeleteRange(d)) => {
                Some(Response::ResponseDeleteRange(delete_range(txn, d)?))
            }
            Some(Request::RequestTxn(nested)) => {
                let mut r = run_txn(txn, nested, path, compacted)?;
                r.header = Some(ResponseHeader::default());
                Some(Response::ResponseTxn(r))
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}

/// etcd's compare: against every key in the compare's range, all must match. With no
/// key present, a VALUE compare is false and the others compare against zero.
fn compare(view: &dyn ReadView, at: i64, c: &Compare) -> Result<bool> {
    let span = KeySpan::new(&c.key, &c.range_end);
    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut err = None;
    view.scan_index(&span, at, &mut |_k, ki| {
        if let Some(rev) = ki.visible_at(at) {
            match view.get_kv(rev) {
                Ok(kv) => kvs.push(kv),
                Err(e) => {
                    err = Some(e);
                    return Ok(false);
                }
            }
        }
        Ok(true)
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    if kvs.is_empty() {
        if target == CompareTarget::Value {
            return Ok(false);
        }
        return Ok(compare_kv(c, target, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match target {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        _ => {
            let (have, want) = match target {
                CompareTarget::Version => (
                    kv.version,
                    int_target(c, |t| match t {
                        TargetUnion::Version(v) => Some(*v),
                        _ => None,
                    }),
                ),
                CompareTarget::Create => (
                    kv.create_revision,
                    int_target(c, |t| match t {
                        TargetUnion::CreateRevision(v) => Some(*v),
                        _ => None,
                    }),
                ),
                CompareTarget::Mod => (
                    kv.mod_revision,
                    int_target(c, |t| match t {
                        TargetUnion::ModRevision(v) => Some(*v),
                        _ => None,
                    }),
                ),
                CompareTarget::Lease => (
                    kv.lease,
                    int_target(c, |t| match t {
                        TargetUnion::Lease(v) => Some(*v),
                        _ => None,
                    }),
                ),
                CompareTarget::Value => unreachable!("handled above"),
            };
            have.cmp(&want)
        }
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
        CompareResult::NotEqual => ord != Ordering::Equal,
    }
}

/// The compare's integer operand; a mismatched or missing operand counts as 0, as in
/// etcd.
fn int_target(c: &Compare, pick: impl Fn(&TargetUnion) -> Option<i64>) -> i64 {
    c.target_union.as_ref().and_then(pick).unwrap_or(0)
}

/// True if `req` can change the key space on any path (etcd's `isTxnReadonly`, negated).
pub fn txn_writes(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => true,
            Some(Request::RequestTxn(t)) => txn_writes(t),
            _ => false,
        })
}

/// etcd's `isTxnSerializable`: every operation on either branch is a Range asking
/// for a serializable read (so an op-less Txn is too). Such a read-only Txn skips
/// the read-index round.
pub fn txn_is_serializable(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| matches!(&op.request, Some(Request::RequestRange(r)) if r.serializable))
}

/// True if no operation of `req` (on either branch, at any depth) writes.
pub fn txn_is_read_only(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(_)) | None => true,
            Some(Request::RequestTxn(t)) => txn_is_read_only(t),
            Some(_) => false,
        })
}
