//! Member and cluster IDs, derived exactly as etcd derives them, so a Pontoon member
//! started with etcd's flags reports the IDs etcd would.
//!
//! - member ID: the first 8 bytes (big-endian) of SHA-1 over the member's sorted peer
//!   URLs concatenated, followed by `--initial-cluster-token`;
//! - cluster ID: the first 8 bytes of SHA-1 over the sorted member IDs, each as 8
//!   big-endian bytes.

pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut h = sha1_smol::Sha1::new();
    h.update(urls.concat().as_bytes());
    h.update(token.as_bytes());
    let d = h.digest().bytes();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 has 20 bytes"))
}

pub fn cluster_id(member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let mut h = sha1_smol::Sha1::new();
    for id in ids {
        h.update(&id.to_be_bytes());
    }
    let d = h.digest().bytes();
    u64::from_be_bytes(d[..8].try_into().expect("sha1 has 20 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_etcds_default_single_member_ids() {
        // `etcd` with no flags reports member 8e9e05c52164694d in cluster cdf818194e3a8c32.
        let m = member_id(&["http://localhost:2380".to_string()], "etcd-cluster");
        assert_eq!(format!("{m:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", cluster_id(&[m])), "cdf818194e3a8c32");
    }
}
