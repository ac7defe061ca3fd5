//! Argon2id password hashing for human users. Costly by design: callers run it off the async
//! runtime (`spawn_blocking`).

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

/// Hash a password with Argon2id and a random 16-byte salt (PHC string format).
pub fn hash_password(password: &str) -> String {
    let salt = crate::secrets::random_bytes(16);
    let hash: PasswordHash = Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .expect("argon2 hashing with default parameters cannot fail");
    hash.to_string()
}

/// Verify a password against a stored PHC hash; any malformed hash is a mismatch.
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A fixed valid hash used to spend the same time when the user does not exist.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("latchkey-timing-equaliser"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let h = super::hash_password("correct horse");
        assert!(h.starts_with("$argon2id$"));
        assert!(super::verify_password("correct horse", &h));
        assert!(!super::verify_password("wrong", &h));
        assert!(!super::verify_password("x", "not a hash"));
    }
}
