//! Revisions: etcd's logical clock.
//!
//! Every change to the key space gets a [`Revision`] `(main, sub)`: `main` is the store
//! revision, bumped once per mutating request (a Txn that writes three keys bumps it
//! once); `sub` orders the changes inside that request, from 0. The store starts at
//! main revision 1 with no keys, so the first write is revision 2, as in etcd.
//!
//! Encoded as 16 bytes, both halves big-endian, so RocksDB's bytewise order is revision
//! order: the `rev` column family iterates in exactly the order watchers must see.

use crate::error::{Error, Result};

/// A point in the store's history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// Length of an encoded [`Revision`].
pub const REVISION_LEN: usize = 16;

impl Revision {
    pub const fn new(main: i64, sub: i64) -> Self {
        Revision { main, sub }
    }

    /// The smallest revision with this main revision: the start of a range scan.
    pub const fn first_of(main: i64) -> Self {
        Revision { main, sub: 0 }
    }

    pub fn encode(&self) -> [u8; REVISION_LEN] {
        let mut out = [0u8; REVISION_LEN];
        out[..8].copy_from_slice(&(self.main as u64).to_be_bytes());
        out[8..].copy_from_slice(&(self.sub as u64).to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != REVISION_LEN {
            return Err(Error::Corrupt(format!("revision key of {} bytes", b.len())));
        }
        let main = u64::from_be_bytes(b[..8].try_into().expect("8 bytes")) as i64;
        let sub = u64::from_be_bytes(b[8..].try_into().expect("8 bytes")) as i64;
        Ok(Revision { main, sub })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_sorts_like_revisions() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(255, 7),
            Revision::new(256, 0),
            Revision::new(1 << 40, 3),
        ];
        for w in revs.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].encode() < w[1].encode(), "{:?} vs {:?}", w[0], w[1]);
        }
        for r in revs {
            assert_eq!(Revision::decode(&r.encode()).unwrap(), r);
        }
        assert!(Revision::decode(&[0u8; 3]).is_err());
    }
}
