//! Range: etcd's read, with its exact options and quirks.
//!
//! Order of work, as in etcd's applier:
//! 1. check the revision: above the current one is `FutureRev`, below the compacted one
//!    is `Compacted` (reading *at* the compacted revision is allowed); 0 means current;
//! 2. walk the key index over the span, counting every key visible at that revision
//!    (`count` is always the full count, before filters and limit) and collecting
//!    `limit + 1` of them (all of them when sorting or filtering, which need every
//!    candidate);
//! 3. drop keys outside `min/max_mod_revision` and `min/max_create_revision`;
//! 4. sort (a non-KEY sort target with order NONE sorts ascending);
//! 5. cut to `limit`, setting `more` if anything was cut; `keys_only` drops values.

use std::cmp::Ordering;

use pontoon_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use pontoon_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use pontoon_proto::mvccpb::KeyValue;

use super::span::KeySpan;
use super::view::ReadView;
use crate::error::{Error, Result};

/// Checks `requested` against the store's `current` and `compacted` revisions and
/// returns the revision to read at.
pub fn resolve_read_revision(requested: i64, current: i64, compacted: i64) -> Result<i64> {
    if requested > current {
        return Err(Error::FutureRev);
    }
    let rev = if requested <= 0 { current } else { requested };
    if rev < compacted {
        return Err(Error::Compacted);
    }
    Ok(rev)
}

/// Runs `req` against `view`, where `current` is the view's revision and `compacted`
/// the store's compacted revision. The response header carries only the revision.
pub fn range(
    view: &dyn ReadView,
    req: &RangeRequest,
    current: i64,
    compacted: i64,
) -> Result<RangeResponse> {
    range_capped(view, req, current, compacted, usize::MAX)
}

/// Bytes a key-value is charged against a response cap: its key, its value (unless
/// `keys_only`) and a fixed allowance for the revisions and framing.
fn charged_bytes(kv: &KeyValue, keys_only: bool) -> usize {
    64 + kv.key.len() + if keys_only { 0 } else { kv.value.len() }
}

/// [`range`], refusing (before reading further) a response that would hold more than
/// `max_bytes` of keys and values: one client cannot make the member load an
/// unbounded key space into memory. Ranges inside a Txn that writes are never capped
/// (it applies on every member, whose answers must agree); a read-only Txn is served
/// by one member and capped per Range.
pub fn range_capped(
    view: &dyn ReadView,
    req: &RangeRequest,
    current: i64,
    compacted: i64,
    max_bytes: usize,
) -> Result<RangeResponse> {
    let rev = resolve_read_revision(req.revision, current, compacted)?;
    let order = SortOrder::try_from(req.sort_order).map_err(|_| Error::InvalidSortOption)?;
    let target = SortTarget::try_from(req.sort_target).map_err(|_| Error::InvalidSortOption)?;
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    // How many revisions to fetch: 0 = all.
    let fetch = if req.count_only {
        0
    } else if order != SortOrder::None || filtered || req.limit <= 0 {
        usize::MAX
    } else {
        (req.limit as usize).saturating_add(1)
    };

    let span = KeySpan::new(&req.key, &req.range_end);
    let mut count: i64 = 0;
    let mut revs = Vec::new();
    view.scan_index(&span, rev, &mut |_key, ki| {
        if let Some(r) = ki.visible_at(rev) {
            count += 1;
            if revs.len() < fetch {
                revs.push(r);
            }
        }
        Ok(true)
    })?;

    let header = Some(ResponseHeader {
        revision: current,
        ..Default::default()
    });
    if req.count_only {
        return Ok(RangeResponse {
            header,
            kvs: Vec::new(),
            more: false,
            count,
        });
    }

    let mut kvs = Vec::with_capacity(revs.len());
    let mut bytes = 0usize;
    for r in revs {
        let kv = view.get_kv(r)?;
        bytes = bytes.saturating_add(charged_bytes(&kv, req.keys_only));
        if bytes > max_bytes {
            return Err(Error::RangeTooLarge(max_bytes));
        }
        kvs.push(kv);
    }
    if filtered {
        kvs.retain(|kv| {
            (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
                && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
        });
    }
    sort(&mut kvs, order, target);
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header,
        kvs,
        more,
        count,
    })
}

fn sort(kvs: &mut [KeyValue], order: SortOrder, target: SortTarget) {
    // Keys come out of the index in ascending key order; etcd only sorts by default
    // when the target is not the key.
    let order = match (order, target) {
        (SortOrder::None, SortTarget::Key) => return,
        (SortOrder::None, _) => SortOrder::Ascend,
        (o, _) => o,
    };
    let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
        match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        }
    };
    match order {
        SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
        _ => kvs.sort_by(cmp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_revision_rules_match_etcd() {
        assert_eq!(resolve_read_revision(0, 10, 0).unwrap(), 10);
        assert_eq!(resolve_read_revision(7, 10, 5).unwrap(), 7);
        assert_eq!(resolve_read_revision(5, 10, 5).unwrap(), 5);
        assert!(matches!(
            resolve_read_revision(4, 10, 5),
            Err(Error::Compacted)
        ));
        assert!(matches!(
            resolve_read_revision(11, 10, 5),
            Err(Error::FutureRev)
        ));
    }
}
