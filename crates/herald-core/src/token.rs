//! API tokens are never stored or compared in the clear: only their SHA-256 digests are kept,
//! and the configured admin token is compared digest to digest in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub type TokenHash = [u8; 32];

pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

pub fn equal(a: &TokenHash, b: &TokenHash) -> bool {
    a.ct_eq(b).into()
}

/// Lower-case hex of a digest, for keys and logs that must not reveal the token.
pub fn hex(hash: &TokenHash) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_compare() {
        assert!(equal(&hash("demo-token"), &hash("demo-token")));
        assert!(!equal(&hash("demo-token"), &hash("demo-tokem")));
        assert_eq!(hex(&hash("")).len(), 64);
        assert!(hex(&hash("")).starts_with("e3b0c442"));
    }
}
