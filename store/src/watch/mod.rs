//! The watch hub: recent changes in memory, shared by every watcher.
//!
//! Watchers are *cursors*, not queues. Each watcher remembers only the next revision
//! it needs; the apply loop [`WatchHub::publish`]es each revision's changes into a
//! bounded ring of recent revisions and bumps a notification, and never waits for any
//! watcher. A watcher whose next revision is still in the ring reads it from there; one
//! that fell further behind (a slow consumer, or a watch from an old revision) reads
//! the revisions it missed from the store's history (`rev` column family) and then
//! continues from the ring. So:
//!
//! - a slow or stalled consumer never blocks writes or other watchers;
//! - no event is ever dropped: a watcher either gets every revision after its start,
//!   in order, or is canceled with `compact_revision` if that history was compacted;
//! - memory per watcher is constant; the ring's size is bounded.
//!
//! Invariant: the ring holds every revision in `ring_start..=published`, contiguously,
//! and everything at or below `published` is already in the store.
//!
//! **Events are encoded once.** A revision's changes are encoded as `events` fields of
//! a `WatchResponse` ([`Published::wire_events`]) by the first watcher that needs them
//! and shared by every other: a thousand watchers of one key cost one encoding of each
//! event, and each watcher's response is its own header and watch ID followed by the
//! shared bytes.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::sync::watch;

use pontoon_proto::mvccpb::{event::EventType, Event};

use crate::mvcc::Change;

/// Revisions kept in memory for watchers that are keeping up.
pub const RING_REVISIONS: usize = 8192;

/// The key of a `WatchResponse`'s `events` field (number 11, length-delimited), the
/// last field of the message: an encoded response is its other fields followed by its
/// events.
pub const EVENTS_FIELD_KEY: u8 = (11 << 3) | 2;

/// A change as a watcher sees it, with the value it replaced if asked for.
pub fn event(c: &Change, prev_kv: bool) -> Event {
    Event {
        r#type: if c.tombstone {
            EventType::Delete as i32
        } else {
            EventType::Put as i32
        },
        kv: Some(c.kv.clone()),
        prev_kv: if prev_kv { c.prev.clone() } else { None },
    }
}

/// A change encoded as one `events` field of a `WatchResponse`: key, length, `Event`.
pub fn event_field(c: &Change, prev_kv: bool) -> Bytes {
    let ev = event(c, prev_kv);
    let len = ev.encoded_len();
    let mut buf = BytesMut::with_capacity(1 + prost::length_delimiter_len(len) + len);
    buf.put_u8(EVENTS_FIELD_KEY);
    ev.encode_length_delimited(&mut buf)
        .expect("the buffer was sized for the event");
    buf.freeze()
}

/// The changes of one revision.
#[derive(Debug)]
pub struct Published {
    pub rev: i64,
    pub changes: Vec<Change>,
    /// `changes` as encoded `events` fields ([`event_field`]), without and with
    /// `prev_kv`; each encoded when a watcher first needs it.
    wire: [OnceLock<Vec<Bytes>>; 2],
}

impl Published {
    pub fn new(rev: i64, changes: Vec<Change>) -> Self {
        Published {
            rev,
            changes,
            wire: Default::default(),
        }
    }

    /// Each change as an encoded `events` field, in order: encoded once, shared by
    /// every watcher.
    pub fn wire_events(&self, prev_kv: bool) -> &[Bytes] {
        self.wire[usize::from(prev_kv)].get_or_init(|| {
            self.changes
                .iter()
                .map(|c| event_field(c, prev_kv))
                .collect()
        })
    }
}

struct Ring {
    start: i64,
    revs: VecDeque<Arc<Published>>,
}

pub struct WatchHub {
    ring: Mutex<Ring>,
    published: watch::Sender<i64>,
    capacity: usize,
}

impl WatchHub {
    /// A hub for a store currently at revision `current`.
    pub fn new(current: i64) -> Self {
        Self::with_capacity(current, RING_REVISIONS)
    }

    pub fn with_capacity(current: i64, capacity: usize) -> Self {
        WatchHub {
            ring: Mutex::new(Ring {
                start: current + 1,
                revs: VecDeque::new(),
            }),
            published: watch::channel(current).0,
            capacity: capacity.max(1),
        }
    }

    /// Publishes the changes of one applied revision. Called by the apply loop after the
    /// changes are written to the store; never blocks on watchers.
    pub fn publish(&self, changes: Vec<Change>) {
        let Some(rev) = changes.first().map(|c| c.rev.main) else {
            return;
        };
        {
            let mut ring = self.ring.lock().expect("watch ring lock");
            if ring.revs.is_empty() {
                ring.start = rev;
            }
            ring.revs.push_back(Arc::new(Published::new(rev, changes)));
            while ring.revs.len() > self.capacity {
                ring.revs.pop_front();
                ring.start = ring.revs.front().map_or(rev + 1, |p| p.rev);
            }
        }
        self.published.send_replace(rev);
    }

    /// Forgets the ring after a snapshot replaced the store, which is now at revision
    /// `current`: watchers behind it catch up from the store's history.
    pub fn reset(&self, current: i64) {
        {
            let mut ring = self.ring.lock().expect("watch ring lock");
            ring.revs.clear();
            ring.start = current + 1;
        }
        self.published.send_replace(current);
    }

    /// The newest published revision.
    pub fn published(&self) -> i64 {
        *self.published.borrow()
    }

    /// A receiver that wakes up whenever a revision is published.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.published.subscribe()
    }

    /// The published revisions `from..=to` if the ring still holds `from`; `None` if
    /// `from` is older than the ring (read the store's history instead).
    pub fn recent(&self, from: i64, to: i64) -> Option<Vec<Arc<Published>>> {
        let ring = self.ring.lock().expect("watch ring lock");
        if from < ring.start {
            return None;
        }
        let skip = (from - ring.start) as usize;
        Some(
            ring.revs
                .iter()
                .skip(skip)
                .take_while(|p| p.rev <= to)
                .cloned()
                .collect(),
        )
    }

    /// The oldest revision the ring holds (or would hold next).
    pub fn ring_start(&self) -> i64 {
        self.ring.lock().expect("watch ring lock").start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::Revision;
    use pontoon_proto::mvccpb::KeyValue;

    fn change(rev: i64) -> Vec<Change> {
        vec![Change {
            rev: Revision::new(rev, 0),
            kv: KeyValue::default(),
            tombstone: false,
            prev: None,
        }]
    }

    #[test]
    fn ring_is_bounded_and_contiguous() {
        let hub = WatchHub::with_capacity(1, 3);
        assert!(hub.recent(1, 1).is_none(), "revision 1 predates the hub");
        assert_eq!(hub.recent(2, 1).unwrap().len(), 0);
        for rev in 2..=6 {
            hub.publish(change(rev));
        }
        assert_eq!(hub.published(), 6);
        assert_eq!(hub.ring_start(), 4);
        assert!(hub.recent(3, 6).is_none());
        let revs: Vec<i64> = hub.recent(4, 6).unwrap().iter().map(|p| p.rev).collect();
        assert_eq!(revs, vec![4, 5, 6]);
        let revs: Vec<i64> = hub.recent(5, 5).unwrap().iter().map(|p| p.rev).collect();
        assert_eq!(revs, vec![5]);
    }
}
