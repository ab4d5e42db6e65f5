//! Password hashing: bcrypt, as etcd (`--bcrypt-cost`, default 10). The member that
//! receives `UserAdd` / `UserChangePassword` hashes the password before proposing, so
//! the raft log and the snapshots never hold a password in clear, and applying an
//! entry costs no hashing.

use crate::error::{Error, Result};

/// etcd's default `--bcrypt-cost`.
pub const DEFAULT_COST: u32 = 10;

/// Hashes `password` with a random salt; the result is bcrypt's `$2b$...` string.
pub fn hash(password: &str, cost: u32) -> Result<String> {
    bcrypt::hash(password, cost).map_err(|e| Error::Config(format!("bcrypt: {e}")))
}

/// True if `password` matches the stored bcrypt hash. A malformed hash matches
/// nothing.
pub fn verify(password: &str, stored: &[u8]) -> bool {
    match std::str::from_utf8(stored) {
        Ok(h) => bcrypt::verify(password, h).unwrap_or(false),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_differ_by_salt() {
        let a = hash("s3cret", 4).unwrap();
        let b = hash("s3cret", 4).unwrap();
        assert_ne!(a, b, "salted");
        assert!(verify("s3cret", a.as_bytes()));
        assert!(!verify("wrong", a.as_bytes()));
        assert!(!verify("s3cret", b"not a hash"));
        assert!(!verify("", b""));
    }
}
