//! Which keys a request names, decoded from etcd's `key` / `range_end` pair.

/// A set of user keys in etcd's encoding:
///
/// - `range_end` empty: the single key `key`;
/// - `range_end == "\0"`: every key `>= key`;
/// - otherwise the half-open interval `[key, range_end)`, empty if `range_end <= key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySpan {
    Single(Vec<u8>),
    /// `[start, end)`; `end == None` means unbounded above.
    Interval {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
}

impl KeySpan {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        if range_end.is_empty() {
            KeySpan::Single(key.to_vec())
        } else if range_end == [0] {
            KeySpan::Interval {
                start: key.to_vec(),
                end: None,
            }
        } else {
            KeySpan::Interval {
                start: key.to_vec(),
                end: Some(range_end.to_vec()),
            }
        }
    }

    /// Back to etcd's `(key, range_end)` encoding.
    pub fn key_and_range_end(&self) -> (&[u8], &[u8]) {
        match self {
            KeySpan::Single(k) => (k, &[]),
            KeySpan::Interval { start, end: None } => (start, &[0]),
            KeySpan::Interval {
                start,
                end: Some(e),
            } => (start, e),
        }
    }

    pub fn start(&self) -> &[u8] {
        match self {
            KeySpan::Single(k) => k,
            KeySpan::Interval { start, .. } => start,
        }
    }

    /// Exclusive upper bound for iteration, `None` if unbounded.
    pub fn iter_end(&self) -> Option<Vec<u8>> {
        match self {
            KeySpan::Single(k) => {
                let mut e = k.clone();
                e.push(0);
                Some(e)
            }
            KeySpan::Interval { end, .. } => end.clone(),
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeySpan::Single(k) => k == key,
            KeySpan::Interval { start, end } => {
                key >= start.as_slice() && end.as_ref().is_none_or(|e| key < e.as_slice())
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, KeySpan::Interval { start, end: Some(end) } if end <= start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_etcds_range_encoding() {
        let single = KeySpan::new(b"a", b"");
        assert!(single.contains(b"a") && !single.contains(b"a\0") && !single.contains(b"b"));
        let from = KeySpan::new(b"b", b"\0");
        assert!(from.contains(b"b") && from.contains(b"zzz") && !from.contains(b"a"));
        let interval = KeySpan::new(b"b", b"d");
        assert!(interval.contains(b"c") && !interval.contains(b"d"));
        assert!(KeySpan::new(b"d", b"b").is_empty());
        assert!(KeySpan::new(b"d", b"d").is_empty());
        assert!(!interval.is_empty() && !single.is_empty());
    }
}
