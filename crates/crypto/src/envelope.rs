//! Envelope encryption of stored secrets.
//!
//! ```text
//!   KEK (file 0600 / env, never in the database)
//!    └─ wraps data key v1, v2, …   (table `data_keys`, AAD "latchkey:dek:v{n}")
//!         └─ seals each secret     (AES-256-GCM, AAD "latchkey:{table}.{field}:{row}:v{n}")
//! ```
//!
//! A sealed blob is `b"LK1" ‖ version (u32 BE) ‖ nonce (12) ‖ ciphertext ‖ tag`. The AAD names
//! the row, the field and the key version, so a blob moved to another row, another column, or
//! relabelled with another version fails to open. Nonces are random per seal
//! (`RandomizedNonceKey`): the ≈2³² seals per key budget is far beyond one deployment's writes,
//! and `latchkey key rotate` starts a fresh data key anyway.

use std::collections::HashMap;
use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

const MAGIC: &[u8; 3] = b"LK1";
const HEADER_LEN: usize = 3 + 4 + NONCE_LEN;

/// Why a seal or open failed. Carries no secret material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("the key-encryption key does not open data key v{0}")]
    WrongKek(u32),
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("data key v{0} is not loaded")]
    UnknownVersion(u32),
    #[error("ciphertext does not authenticate for {0}")]
    Unauthentic(String),
    #[error("key file is malformed: {0}")]
    BadKeyFile(String),
}

/// Where a sealed value lives; bound into the AAD.
#[derive(Clone, Copy)]
pub struct Slot<'a> {
    pub table: &'a str,
    pub field: &'a str,
    pub row: &'a str,
}

impl Slot<'_> {
    fn aad(&self, version: u32) -> String {
        format!(
            "latchkey:{}.{}:{}:v{version}",
            self.table, self.field, self.row
        )
    }
}

impl fmt::Display for Slot<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{} of {}", self.table, self.field, self.row)
    }
}

/// The key-encryption key. 256 random bits; never stored in the database.
pub struct Kek {
    bytes: Zeroizing<Vec<u8>>,
    key: RandomizedNonceKey,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({})", self.fingerprint())
    }
}

impl Kek {
    pub fn generate() -> Self {
        Self::from_bytes(&crate::secrets::random_bytes(32)).expect("32 bytes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        if bytes.len() != 32 {
            return Err(EnvelopeError::BadKeyFile(format!(
                "expected 32 bytes of key, found {}",
                bytes.len()
            )));
        }
        let key =
            RandomizedNonceKey::new(&AES_256_GCM, bytes).map_err(|_| EnvelopeError::Malformed)?;
        Ok(Self {
            bytes: Zeroizing::new(bytes.to_vec()),
            key,
        })
    }

    /// The text stored in a key file or an environment variable: base64 of the 32 bytes.
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.bytes.as_slice()))
    }

    pub fn decode(text: &str) -> Result<Self, EnvelopeError> {
        let raw = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| EnvelopeError::BadKeyFile("not base64".into()))?,
        );
        Self::from_bytes(&raw)
    }

    /// A public fingerprint (first 8 bytes of SHA-256, hex) to name the key in logs and rows.
    pub fn fingerprint(&self) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.bytes);
        d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Wrap a fresh data key for `version`.
    pub fn wrap(&self, dek: &DataKeyMaterial, version: u32) -> Vec<u8> {
        seal_with(
            &self.key,
            version,
            &format!("latchkey:dek:v{version}"),
            &dek.0,
        )
    }

    pub fn unwrap(&self, wrapped: &[u8], version: u32) -> Result<DataKeyMaterial, EnvelopeError> {
        let (v, plain) = open_with(&self.key, wrapped, |v| format!("latchkey:dek:v{v}"))
            .map_err(|_| EnvelopeError::WrongKek(version))?;
        if v != version || plain.len() != 32 {
            return Err(EnvelopeError::WrongKek(version));
        }
        Ok(DataKeyMaterial(plain))
    }
}

/// Raw data-key bytes, wiped on drop.
pub struct DataKeyMaterial(Zeroizing<Vec<u8>>);

impl DataKeyMaterial {
    pub fn generate() -> Self {
        Self(Zeroizing::new(crate::secrets::random_bytes(32)))
    }
}

/// The unwrapped data keys, by version, with the one new seals use.
#[derive(Default)]
pub struct Keyring {
    keys: HashMap<u32, RandomizedNonceKey>,
    active: u32,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Keyring(active v{}, {} keys)",
            self.active,
            self.keys.len()
        )
    }
}

impl Keyring {
    pub fn insert(&mut self, version: u32, material: &DataKeyMaterial) {
        let key = RandomizedNonceKey::new(&AES_256_GCM, &material.0).expect("32-byte key");
        self.keys.insert(version, key);
        if version > self.active {
            self.active = version;
        }
    }

    pub fn active_version(&self) -> u32 {
        self.active
    }

    pub fn has(&self, version: u32) -> bool {
        self.keys.contains_key(&version)
    }

    /// Seal `plain` for `slot` under the active data key.
    pub fn seal(&self, slot: Slot<'_>, plain: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let key = self
            .keys
            .get(&self.active)
            .ok_or(EnvelopeError::UnknownVersion(self.active))?;
        Ok(seal_with(key, self.active, &slot.aad(self.active), plain))
    }

    /// Open a blob sealed for `slot`; fails if it was sealed for any other slot.
    pub fn open(&self, slot: Slot<'_>, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let version = blob_version(blob)?;
        let key = self
            .keys
            .get(&version)
            .ok_or(EnvelopeError::UnknownVersion(version))?;
        open_with(key, blob, |v| slot.aad(v))
            .map(|(_, plain)| plain)
            .map_err(|_| EnvelopeError::Unauthentic(slot.to_string()))
    }
}

/// The data-key version a blob was sealed under.
pub fn blob_version(blob: &[u8]) -> Result<u32, EnvelopeError> {
    if blob.len() < HEADER_LEN + 16 || &blob[..3] != MAGIC {
        return Err(EnvelopeError::Malformed);
    }
    Ok(u32::from_be_bytes([blob[3], blob[4], blob[5], blob[6]]))
}

fn seal_with(key: &RandomizedNonceKey, version: u32, aad: &str, plain: &[u8]) -> Vec<u8> {
    let mut in_out = plain.to_vec();
    let nonce = key
        .seal_in_place_append_tag(Aad::from(aad.as_bytes()), &mut in_out)
        .expect("AES-GCM sealing cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(HEADER_LEN + in_out.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(nonce.as_ref());
    out.extend_from_slice(&in_out);
    in_out.fill(0);
    out
}

fn open_with(
    key: &RandomizedNonceKey,
    blob: &[u8],
    aad: impl Fn(u32) -> String,
) -> Result<(u32, Zeroizing<Vec<u8>>), EnvelopeError> {
    let version = blob_version(blob)?;
    let nonce = Nonce::try_assume_unique_for_key(&blob[7..HEADER_LEN])
        .map_err(|_| EnvelopeError::Malformed)?;
    let mut in_out = Zeroizing::new(blob[HEADER_LEN..].to_vec());
    let plain_len = key
        .open_in_place(nonce, Aad::from(aad(version).as_bytes()), &mut in_out)
        .map_err(|_| EnvelopeError::Malformed)?
        .len();
    in_out.truncate(plain_len);
    Ok((version, in_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        let mut r = Keyring::default();
        r.insert(1, &DataKeyMaterial::generate());
        r
    }

    const A: Slot<'static> = Slot {
        table: "connected_accounts",
        field: "refresh_token",
        row: "cac_a",
    };
    const B: Slot<'static> = Slot {
        table: "connected_accounts",
        field: "refresh_token",
        row: "cac_b",
    };

    #[test]
    fn round_trip_and_row_binding() {
        let r = ring();
        let blob = r.seal(A, b"secret-token").unwrap();
        assert_eq!(r.open(A, &blob).unwrap().as_slice(), b"secret-token");
        assert!(matches!(
            r.open(B, &blob),
            Err(EnvelopeError::Unauthentic(_))
        ));
        let other_field = Slot {
            field: "access_token",
            ..A
        };
        assert!(r.open(other_field, &blob).is_err());
        // Nonces are random: sealing twice gives different blobs.
        assert_ne!(r.seal(A, b"x").unwrap(), r.seal(A, b"x").unwrap());
    }

    #[test]
    fn tampering_and_relabelling_fail() {
        let r = ring();
        let mut blob = r.seal(A, b"secret").unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        assert!(r.open(A, &blob).is_err());
        let mut relabelled = r.seal(A, b"secret").unwrap();
        relabelled[6] = 2; // claim version 2
        assert!(r.open(A, &relabelled).is_err());
        assert!(r.open(A, b"garbage").is_err());
    }

    #[test]
    fn kek_wraps_and_wrong_kek_fails() {
        let kek = Kek::generate();
        let dek = DataKeyMaterial::generate();
        let wrapped = kek.wrap(&dek, 3);
        assert!(kek.unwrap(&wrapped, 3).is_ok());
        assert_eq!(
            kek.unwrap(&wrapped, 4).err(),
            Some(EnvelopeError::WrongKek(4))
        );
        let other = Kek::generate();
        assert_eq!(
            other.unwrap(&wrapped, 3).err(),
            Some(EnvelopeError::WrongKek(3))
        );
        let text = kek.encode();
        assert_eq!(Kek::decode(&text).unwrap().fingerprint(), kek.fingerprint());
        assert!(Kek::decode("dG9vIHNob3J0").is_err());
    }
}
