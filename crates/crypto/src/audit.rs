//! The audit trail's integrity: a MAC chain over the entries and Ed25519-signed checkpoints.
//!
//! Each entry's MAC is `HMAC-SHA256(key, prev_mac || "\n" || content)` in lower-case hex, where
//! `content` is the entry's canonical encoding (made by the caller) and the first entry's
//! `prev_mac` is [`GENESIS`]. Editing, deleting, reordering or inserting entries breaks the
//! chain for anyone holding the key; truncating the tail is caught by a checkpoint (sequence
//! number and MAC, signed) kept off the machine.

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::secrets;

/// The `prev_mac` of the first entry.
pub const GENESIS: &str = "latchkey-audit-v1";

/// The MAC of an entry whose predecessor's MAC is `prev`.
pub fn entry_mac(key: &[u8], prev: &str, content: &str) -> String {
    secrets::hmac_hex(key, format!("{prev}\n{content}").as_bytes())
}

/// What a checkpoint signature covers.
fn checkpoint_message(seq: i64, mac: &str, at: i64) -> String {
    format!("latchkey-audit-checkpoint-v1\n{seq}\n{mac}\n{at}")
}

/// Signs checkpoints with an Ed25519 key made from a 32-byte seed (kept sealed by the vault).
pub struct CheckpointSigner {
    pair: Ed25519KeyPair,
}

impl CheckpointSigner {
    pub fn from_seed(seed: &[u8]) -> Result<Self, String> {
        Ed25519KeyPair::from_seed_unchecked(seed)
            .map(|pair| Self { pair })
            .map_err(|_| "the checkpoint key seed is not 32 bytes".to_owned())
    }

    /// The public key, base64url (what a verifier pins).
    pub fn public_key(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref())
    }

    /// The signature (base64url) over a checkpoint.
    pub fn sign(&self, seq: i64, mac: &str, at: i64) -> String {
        let sig = self.pair.sign(checkpoint_message(seq, mac, at).as_bytes());
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    }
}

/// Whether `signature` is `public_key`'s signature over the checkpoint (both base64url).
pub fn verify_checkpoint(public_key: &str, seq: i64, mac: &str, at: i64, signature: &str) -> bool {
    let (Ok(pk), Ok(sig)) = (
        URL_SAFE_NO_PAD.decode(public_key),
        URL_SAFE_NO_PAD.decode(signature),
    ) else {
        return false;
    };
    UnparsedPublicKey::new(&signature::ED25519, pk)
        .verify(checkpoint_message(seq, mac, at).as_bytes(), &sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_macs_depend_on_key_predecessor_and_content() {
        let a = entry_mac(b"k1", GENESIS, "[1]");
        assert_eq!(a.len(), 64);
        assert_eq!(a, entry_mac(b"k1", GENESIS, "[1]"));
        assert_ne!(a, entry_mac(b"k2", GENESIS, "[1]"));
        assert_ne!(a, entry_mac(b"k1", "x", "[1]"));
        assert_ne!(a, entry_mac(b"k1", GENESIS, "[2]"));
        // Independent check (Python: hmac.new(b"k1", b"latchkey-audit-v1\n[1]", sha256)).
        assert_eq!(
            a,
            "64874dd266a1f888ddd0dddd1ce3c287bcc65f96f87e29550ecdddabe2e162ff"
        );
    }

    #[test]
    fn checkpoints_verify_only_unchanged_and_with_their_key() {
        let s = CheckpointSigner::from_seed(&[7u8; 32]).unwrap();
        let other = CheckpointSigner::from_seed(&[8u8; 32]).unwrap();
        let sig = s.sign(10, "abc", 99);
        assert!(verify_checkpoint(&s.public_key(), 10, "abc", 99, &sig));
        assert!(!verify_checkpoint(&s.public_key(), 11, "abc", 99, &sig));
        assert!(!verify_checkpoint(&s.public_key(), 10, "abd", 99, &sig));
        assert!(!verify_checkpoint(&s.public_key(), 10, "abc", 98, &sig));
        assert!(!verify_checkpoint(&other.public_key(), 10, "abc", 99, &sig));
        assert!(!verify_checkpoint("!!", 10, "abc", 99, &sig));
        assert!(CheckpointSigner::from_seed(&[1u8; 31]).is_err());
    }
}
