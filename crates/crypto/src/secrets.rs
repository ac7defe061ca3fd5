//! Random values and digests.
//!
//! Every opaque value Latchkey issues comes from [`random_token`] (≥ 256 bits by default, from
//! the OS CSPRNG via aws-lc-rs). Values that only need to be recognised later are stored as
//! [`sha256_b64`] digests; agent client secrets are stored as [`hmac_b64`] under a server key so
//! a stolen database cannot be brute-forced offline even for low-entropy inputs.

use aws_lc_rs::{digest, hmac, rand::SecureRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `n` random bytes from the system CSPRNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("the system random number generator failed");
    buf
}

/// A URL-safe random token carrying `bytes * 8` bits of entropy.
pub fn random_token(bytes: usize) -> String {
    URL_SAFE_NO_PAD.encode(random_bytes(bytes))
}

/// A short random identifier with a type prefix, e.g. `agt_3kq…` (128 bits).
pub fn random_id(prefix: &str) -> String {
    // Base32-like lowercase alphabet: easy to read and copy from a terminal.
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
    let raw = random_bytes(26);
    let body: String = raw
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect();
    format!("{prefix}_{body}")
}

/// SHA-256 of `data`, base64url without padding.
pub fn sha256_b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, data))
}

/// HMAC-SHA-256 of `data` under `key`, base64url without padding.
pub fn hmac_b64(key: &[u8], data: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    URL_SAFE_NO_PAD.encode(hmac::sign(&key, data).as_ref())
}

/// HMAC-SHA-256 of `data` under `key`, lower-case hex (webhook signatures).
pub fn hmac_hex(key: &[u8], data: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Constant-time equality for secrets, hashes and MACs.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    #[allow(deprecated)]
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_long() {
        let a = random_token(32);
        let b = random_token(32);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(random_id("agt").starts_with("agt_"));
        assert_eq!(random_id("agt").len(), 30);
    }

    #[test]
    fn hmac_depends_on_key() {
        assert_ne!(hmac_b64(b"k1", b"x"), hmac_b64(b"k2", b"x"));
        assert_eq!(hmac_b64(b"k1", b"x"), hmac_b64(b"k1", b"x"));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
    }
}
