//! Key pairs and signing: the demo agent's key, test keys, Latchkey's own signing key, and the
//! agent-side `latchkey token` command. Private keys are PKCS#8 PEM.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::jws::{KeyError, PublicKey};

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A freshly generated key pair as PEM texts.
pub struct GeneratedKey {
    pub alg: Algorithm,
    pub private_pem: Zeroizing<String>,
    pub public_pem: String,
}

/// Generate a key pair for `alg` (RS256/PS256: RSA-2048; ES256: P-256; EdDSA: Ed25519).
pub fn generate(alg: Algorithm) -> GeneratedKey {
    let (private_der, public_der): (Vec<u8>, Vec<u8>) = match alg {
        Algorithm::RS256 | Algorithm::PS256 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA keygen");
            let private = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'_>>::as_der(&kp).expect("pkcs8");
            let public = kp.public_key().as_der().expect("spki");
            (private.as_ref().to_vec(), public.as_ref().to_vec())
        }
        Algorithm::ES256 => {
            let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            )
            .expect("EC keygen");
            let private = kp.to_pkcs8v1().expect("pkcs8");
            let public = kp.public_key().as_der().expect("spki");
            (private.as_ref().to_vec(), public.as_ref().to_vec())
        }
        Algorithm::EdDSA => {
            let kp = aws_lc_rs::signature::Ed25519KeyPair::generate().expect("Ed25519 keygen");
            let private = kp.to_pkcs8v1().expect("pkcs8");
            let public = kp.public_key().as_der().expect("spki");
            (private.as_ref().to_vec(), public.as_ref().to_vec())
        }
        other => panic!("cannot generate keys for {other:?}"),
    };
    GeneratedKey {
        alg,
        private_pem: Zeroizing::new(pem("PRIVATE KEY", &private_der)),
        public_pem: pem("PUBLIC KEY", &public_der),
    }
}

/// A private key able to sign JWTs, with its public half.
pub struct SigningKey {
    pub alg: Algorithm,
    pub public: PublicKey,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({:?}, kid {})", self.alg, self.public.kid)
    }
}

impl SigningKey {
    /// Load a PKCS#8 PEM private key. `alg` decides RS256 vs PS256 for RSA keys; for EC and
    /// Ed25519 keys it must match the key type.
    pub fn from_pem(
        private_pem: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Self, KeyError> {
        let bytes = private_pem.as_bytes();
        let encoding = match alg {
            Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(bytes),
            Algorithm::ES256 => EncodingKey::from_ec_pem(bytes),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(bytes),
            other => return Err(KeyError::AlgorithmNotAllowed(format!("{other:?}"))),
        }
        .map_err(|e| KeyError::Unparsable(e.to_string()))?;
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, alg)
            .map_err(|e| KeyError::Mismatch(e.to_string()))?;
        let jwk_json = serde_json::to_string(&jwk).expect("a JWK serialises");
        let public = PublicKey::parse(&jwk_json, Some(alg), kid)?;
        Ok(Self {
            alg,
            public,
            encoding,
        })
    }

    /// Sign `claims` with header `{alg, kid, typ}`.
    pub fn sign<T: Serialize>(&self, typ: Option<&str>, claims: &T) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.public.kid.clone());
        header.typ = typ.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .expect("signing with a loaded key cannot fail")
    }
}

#[cfg(test)]
impl SigningKey {
    /// Sign arbitrary header and payload JSON text, exactly as given (the attack matrix needs
    /// headers and payloads a well-behaved encoder cannot produce, e.g. duplicate members).
    pub(crate) fn sign_segments(&self, header: &str, payload: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let input = format!("{}.{}", b64.encode(header), b64.encode(payload));
        let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &self.encoding, self.alg)
            .expect("signing with a loaded key cannot fail");
        format!("{input}.{sig}")
    }
}

/// Guess the algorithm of a PKCS#8 private key PEM: EC → ES256, Ed25519 → EdDSA, RSA → RS256.
pub fn guess_alg(private_pem: &str) -> Option<Algorithm> {
    let b = private_pem.as_bytes();
    if EncodingKey::from_ec_pem(b).is_ok() {
        Some(Algorithm::ES256)
    } else if EncodingKey::from_ed_pem(b).is_ok() {
        Some(Algorithm::EdDSA)
    } else if EncodingKey::from_rsa_pem(b).is_ok() {
        Some(Algorithm::RS256)
    } else {
        None
    }
}
