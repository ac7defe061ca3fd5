//! Latchkey's cryptography, in one place so that every caller uses the same vetted code.
//!
//! - [`envelope`]: the key-encryption key (KEK), versioned data keys and AES-256-GCM sealing
//!   with AAD that names the row and field, so a ciphertext copied elsewhere does not open.
//! - [`jws`]: agent public keys (PEM or JWK) and the one JWS verification function every
//!   token check goes through (`typ`, algorithm pinned by the registered key, header hygiene).
//! - [`secrets`]: random identifiers, SHA-256 / HMAC digests for values stored as hashes.
//! - [`keygen`]: key pairs for the demo agent, tests and Latchkey's own signing key.
//! - [`password`]: Argon2id for human passwords (never for machine secrets).
//! - [`totp`]: RFC 6238 one-time codes for the second factor.

pub mod audit;
pub mod envelope;
pub mod jws;
pub mod keygen;
pub mod password;
pub mod secrets;
pub mod totp;

pub use jsonwebtoken::Algorithm;

#[cfg(test)]
mod supply_chain;
