//! API tokens are never stored or compared in the clear: only their SHA-256 digests are kept,
//! and the configured admin token is compared digest to digest in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub type TokenHash = [u8; 32];

/// What every token Herald mints starts with, so secret scanners and people can tell one
/// when they see it.
pub const PREFIX: &str = "hrld_";

/// A fresh API token: [`PREFIX`] and 256 random bits, base64url without padding.
pub fn generate() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let mut token = String::with_capacity(PREFIX.len() + 43);
    token.push_str(PREFIX);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
    token
}

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

    #[test]
    fn generated_tokens_are_prefixed_and_distinct() {
        let (a, b) = (generate(), generate());
        assert!(a.starts_with(PREFIX));
        assert_eq!(
            a.len(),
            PREFIX.len() + 43,
            "32 bytes in base64url without padding"
        );
        assert_ne!(a, b);
    }
}
