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

    /// Issue 12 item 6: every opaque value Latchkey issues — authorization codes, connect
    /// codes and tickets, `auth_req_id`s, refresh tokens, session and CSRF tokens, client
    /// secrets, ids — comes from these two generators with at least 128 bits from the OS
    /// CSPRNG. A million of each shape in use, no duplicates, every character from the
    /// expected alphabet, and no character much more frequent than chance allows.
    #[test]
    fn a_million_of_each_identifier_are_distinct_and_carry_128_bits() {
        const N: usize = 1_000_000;
        type Make = fn() -> String;
        let shapes: [(&str, Make, usize, &[u8]); 4] = [
            ("random_token(16)", || random_token(16), 16 * 8, B64URL),
            ("random_token(24)", || random_token(24), 24 * 8, B64URL),
            ("random_token(32)", || random_token(32), 32 * 8, B64URL),
            (
                "random_id(\"apr\")",
                || random_id("apr")[4..].to_owned(),
                26 * 5,
                ID,
            ),
        ];
        for (name, make, bits, alphabet) in shapes {
            assert!(bits >= 128, "{name}: {bits} bits");
            let bits_per_char = (alphabet.len() as f64).log2();
            let mut seen = std::collections::HashSet::with_capacity(N);
            let mut counts = [0u64; 256];
            for _ in 0..N {
                let v = make();
                assert!(
                    v.len() as f64 * bits_per_char >= bits as f64,
                    "{name}: {v} is too short"
                );
                // Characters that each carry full bits (base64's last one may carry fewer).
                let full = (bits as f64 / bits_per_char).floor() as usize;
                for b in v.bytes().take(full) {
                    counts[usize::from(b)] += 1;
                }
                assert!(v.bytes().all(|b| alphabet.contains(&b)), "{name}: {v}");
                assert!(seen.insert(v), "{name}: a duplicate in {N}");
            }
            let total: u64 = counts.iter().sum();
            // Uniform characters: each within 2 % of its share (the sample is tens of millions
            // of characters, so chance alone stays far inside this).
            let expected = total as f64 / alphabet.len() as f64;
            for &a in alphabet {
                let c = counts[usize::from(a)] as f64;
                let off = (c - expected).abs() / expected;
                assert!(
                    off < 0.02,
                    "{name}: {:?} appears {c} times, expected about {expected}",
                    a as char
                );
            }
        }
    }

    const B64URL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const ID: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";

    /// Every call site asks for at least 16 bytes (128 bits), except the ones listed here,
    /// which are not secrets or identifiers an attacker could guess to gain anything.
    #[test]
    fn every_generated_secret_has_at_least_128_bits() {
        const NOT_SECRETS: &[(&str, &str)] = &[
            ("crates/server/src/http/mod.rs", "random_token(12)"), // X-Request-Id
            ("crates/server/src/demo.rs", "random_token(12)"), // the demo user's password, printed
            ("crates/core/src/vault/webhooks.rs", "random_bytes(1)"), // retry jitter
            ("crates/core/src/vault/tokens.rs", "random_bytes(1)"), // refresh jitter
            ("crates/server/src/lib.rs", "random_bytes(1)"),   // refresher jitter
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut checked = 0;
        let mut stack = vec![root.join("crates")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if rel.contains("/tests")
                    || rel.ends_with("tests.rs")
                    || rel.contains("/examples/")
                    || rel == "crates/crypto/src/secrets.rs"
                {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                for call in ["random_token(", "random_bytes("] {
                    for (at, _) in text.match_indices(call) {
                        let arg: String = text[at + call.len()..]
                            .chars()
                            .take_while(|c| *c != ')')
                            .collect();
                        let Ok(n) = arg.trim().parse::<usize>() else {
                            continue; // the definitions, and named constants (checked below)
                        };
                        checked += 1;
                        let site = format!("{call}{n})");
                        assert!(
                            n >= 16 || NOT_SECRETS.contains(&(rel.as_str(), site.as_str())),
                            "{rel}: {site} carries {} bits; opaque values need at least 128",
                            n * 8
                        );
                    }
                }
            }
        }
        assert!(
            checked > 20,
            "only {checked} call sites found: is the scan looking in the right place?"
        );
        let demo = std::fs::read_to_string(root.join("crates/demo/src/state.rs")).unwrap();
        assert!(
            demo.contains("const TOKEN_BYTES: usize = 32;"),
            "the demo provider's tokens"
        );
    }

    #[test]
    fn hmac_depends_on_key() {
        assert_ne!(hmac_b64(b"k1", b"x"), hmac_b64(b"k2", b"x"));
        assert_eq!(hmac_b64(b"k1", b"x"), hmac_b64(b"k1", b"x"));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
    }
}
