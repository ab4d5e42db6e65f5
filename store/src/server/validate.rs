//! Request checks made before anything is proposed, as etcd's gRPC layer makes them:
//! empty keys, flags that contradict each other, too many txn operations, and a Txn
//! that would write one key twice.

use pontoon_proto::etcdserverpb::request_op::Request;
use pontoon_proto::etcdserverpb::{
    range_request, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::error::{Error, Result};
use crate::mvcc::KeySpan;

pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if range_request::SortOrder::try_from(r.sort_order).is_err()
        || range_request::SortTarget::try_from(r.sort_target).is_err()
    {
        return Err(Error::InvalidSortOption);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Error::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Error::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(Error::EmptyKey);
    }
    Ok(())
}

/// Checks a Txn: the number of operations per level (nested levels share the
/// budget as in etcd), each operation, and duplicate writes in each branch.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<()> {
    check_txn_ops(r, max_txn_ops as i64)?;
    check_writes(&r.success)?;
    check_writes(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_ops: i64) -> Result<()> {
    let ops = r.compare.len().max(r.success.len()).max(r.failure.len()) as i64;
    if ops > max_ops {
        return Err(Error::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Error::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        check_op(op, max_ops - ops)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: i64) -> Result<()> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(p)) => check_put(p),
        Some(Request::RequestDeleteRange(d)) => check_delete(d),
        Some(Request::RequestTxn(t)) => check_txn_ops(t, max_ops),
        // etcd answers an empty operation with "key not found".
        None => Err(Error::KeyNotFound),
    }
}

/// Keys put and ranges deleted by one branch (and the branches nested in it).
struct Writes {
    puts: Vec<Vec<u8>>,
    dels: Vec<KeySpan>,
}

impl Writes {
    fn deleted(&self, key: &[u8]) -> bool {
        self.dels.iter().any(|d| d.contains(key))
    }
}

/// etcd's rule: within one branch, a key may be put at most once and may not be both
/// put and deleted. The success and failure branches of a nested Txn exclude each
/// other, so the same key may be put in both.
fn check_writes(ops: &[RequestOp]) -> Result<Writes> {
    let mut w = Writes {
        puts: Vec::new(),
        dels: Vec::new(),
    };
    for op in ops {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            w.dels.push(KeySpan::new(&d.key, &d.range_end));
        }
    }
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let then = check_writes(&t.success)?;
        let otherwise = check_writes(&t.failure)?;
        for k in &then.puts {
            if w.puts.contains(k) || w.deleted(k) {
                return Err(Error::DuplicateKey);
            }
        }
        let mut nested_puts = then.puts.clone();
        for k in &otherwise.puts {
            if (w.puts.contains(k) && !then.puts.contains(k)) || w.deleted(k) {
                return Err(Error::DuplicateKey);
            }
            nested_puts.push(k.clone());
        }
        w.puts.extend(nested_puts);
        w.dels.extend(then.dels);
        w.dels.extend(otherwise.dels);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if w.puts.contains(&p.key) || w.deleted(&p.key) {
            return Err(Error::DuplicateKey);
        }
        w.puts.push(p.key.clone());
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }

    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                prev_kv: false,
            })),
        }
    }

    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(txn(success, failure))),
        }
    }

    #[test]
    fn duplicate_writes_are_refused() {
        let dup = |t: TxnRequest| matches!(check_txn(&t, 128), Err(Error::DuplicateKey));
        assert!(dup(txn(vec![put("a"), put("a")], vec![])));
        assert!(dup(txn(vec![put("b"), del("a", "c")], vec![])));
        assert!(dup(txn(
            vec![put("a"), nested(vec![put("a")], vec![])],
            vec![]
        )));
        // Different branches never both run.
        assert!(!dup(txn(vec![put("a")], vec![put("a")])));
        assert!(!dup(txn(
            vec![nested(vec![put("a")], vec![put("a")])],
            vec![]
        )));
        // Deletes may overlap each other.
        assert!(!dup(txn(vec![del("a", "c"), del("b", "d")], vec![])));
        assert!(!dup(txn(vec![put("c"), del("a", "c")], vec![])));
    }

    #[test]
    fn op_limits_and_empty_ops() {
        let many = txn((0..129).map(|i| put(&format!("k{i}"))).collect(), vec![]);
        assert!(matches!(check_txn(&many, 128), Err(Error::TooManyOps)));
        let ok = txn((0..128).map(|i| put(&format!("k{i}"))).collect(), vec![]);
        assert!(check_txn(&ok, 128).is_ok());
        let empty = txn(vec![RequestOp { request: None }], vec![]);
        assert!(matches!(check_txn(&empty, 128), Err(Error::KeyNotFound)));
        assert!(matches!(
            check_txn(&txn(vec![put("")], vec![]), 128),
            Err(Error::EmptyKey)
        ));
    }

    #[test]
    fn put_flag_conflicts() {
        let p = PutRequest {
            key: "k".into(),
            value: "v".into(),
            ignore_value: true,
            ..Default::default()
        };
        assert!(matches!(check_put(&p), Err(Error::ValueProvided)));
        let p = PutRequest {
            key: "k".into(),
            lease: 5,
            ignore_lease: true,
            ..Default::default()
        };
        assert!(matches!(check_put(&p), Err(Error::LeaseProvided)));
    }
}
