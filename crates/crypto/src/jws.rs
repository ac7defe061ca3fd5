//! Agent public keys and the one JWS verification function.
//!
//! Every signed token Latchkey accepts (client assertions, privileged-worker subject tokens)
//! goes through [`verify_jws`]. It enforces what RFC 8725 asks and what JOSE libraries keep
//! getting wrong: a size cap and exact compact shape; no `jku`/`jwk`/`x5u`/`x5c`/`crit`/`enc`;
//! an explicit `typ` rule per slot so one kind of JWT cannot stand in for another; and the
//! algorithm chosen by the *registered key*, never by the header (so `none` and HS256 keyed
//! with a public key have no key to verify against); and a header and a payload that are JSON
//! objects without a duplicate member (RFC 7519 §4 lets a parser keep either value; two
//! verifiers that disagree are an attack). Claim checks are the caller's, against its own clock,
//! through the strictly-typed accessors of [`Claims`] — for client assertions, the one place is
//! [`verify_client_assertion`].
//!
//! The attack matrix in `jws/tests.rs` pins the outcome of every known JOSE attack against these
//! two functions.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

/// Largest compact JWS accepted, in bytes.
pub const MAX_JWS_LEN: usize = 8 * 1024;

/// Algorithms an agent key may be registered with.
pub const ALLOWED_ALGS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM public key or a JWK: {0}")]
    Unparsable(String),
    #[error("algorithm {0} is not allowed (use RS256, PS256, ES256 or EdDSA)")]
    AlgorithmNotAllowed(String),
    #[error("the key does not fit algorithm {0}")]
    Mismatch(String),
    #[error("RSA keys must have at least 2048 bits (this one has {0})")]
    RsaTooSmall(usize),
    #[error("a private key was given where a public key is expected")]
    PrivateKey,
}

/// A registered public key: its id, its one algorithm, and the verifier.
#[derive(Clone, Debug)]
pub struct PublicKey {
    pub kid: String,
    pub alg: Algorithm,
    jwk: Jwk,
    decoding: DecodingKey,
}

impl PublicKey {
    /// Parse a PEM `PUBLIC KEY` or a JWK (JSON). `alg` is required for RSA keys without a JWK
    /// `alg` (RS256 vs PS256 cannot be guessed); EC P-256 implies ES256 and Ed25519 EdDSA.
    pub fn parse(input: &str, alg: Option<Algorithm>, kid: Option<&str>) -> Result<Self, KeyError> {
        let text = input.trim();
        if text.contains("PRIVATE KEY") || text.contains("\"d\"") {
            return Err(KeyError::PrivateKey);
        }
        let jwk: Jwk = if text.starts_with('{') {
            serde_json::from_str(text).map_err(|e| KeyError::Unparsable(e.to_string()))?
        } else if text.starts_with("-----BEGIN") {
            let decoding = DecodingKey::from_rsa_pem(text.as_bytes())
                .or_else(|_| DecodingKey::from_ec_pem(text.as_bytes()))
                .or_else(|_| DecodingKey::from_ed_pem(text.as_bytes()))
                .map_err(|e| KeyError::Unparsable(e.to_string()))?;
            Jwk::from_decoding_key(&decoding, None)
                .map_err(|e| KeyError::Unparsable(e.to_string()))?
        } else {
            return Err(KeyError::Unparsable("expected PEM or JSON".into()));
        };
        let jwk_alg = match &jwk.common.key_algorithm {
            Some(a) => Some(
                a.to_string()
                    .parse::<Algorithm>()
                    .map_err(|_| KeyError::AlgorithmNotAllowed(a.to_string()))?,
            ),
            None => None,
        };
        let alg = match (alg, jwk_alg) {
            (Some(a), Some(b)) if a != b => {
                return Err(KeyError::Mismatch(format!("{a:?} vs JWK alg {b:?}")));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                _ => Algorithm::RS256,
            },
        };
        Self::from_jwk(jwk, alg, kid)
    }

    fn from_jwk(mut jwk: Jwk, alg: Algorithm, kid: Option<&str>) -> Result<Self, KeyError> {
        if !ALLOWED_ALGS.contains(&alg) {
            return Err(KeyError::AlgorithmNotAllowed(format!("{alg:?}")));
        }
        match (&jwk.algorithm, alg) {
            (AlgorithmParameters::RSA(rsa), Algorithm::RS256 | Algorithm::PS256) => {
                let n = URL_SAFE_NO_PAD
                    .decode(rsa.n.trim_end_matches('='))
                    .map_err(|_| KeyError::Unparsable("bad RSA modulus".into()))?;
                let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
                if bits < 2048 {
                    return Err(KeyError::RsaTooSmall(bits));
                }
            }
            (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256)
                if ec.curve == EllipticCurve::P256 => {}
            (AlgorithmParameters::OctetKeyPair(okp), Algorithm::EdDSA)
                if okp.curve == EllipticCurve::Ed25519 => {}
            _ => return Err(KeyError::Mismatch(format!("{alg:?}"))),
        }
        let decoding =
            DecodingKey::from_jwk(&jwk).map_err(|e| KeyError::Unparsable(e.to_string()))?;
        let kid = match kid.or(jwk.common.key_id.as_deref()) {
            Some(k) if !k.is_empty() && k.len() <= 128 => k.to_owned(),
            Some(_) => return Err(KeyError::Unparsable("kid must be 1–128 characters".into())),
            None => jwk
                .thumbprint(ThumbprintHash::SHA256)
                .map_err(|e| KeyError::Unparsable(e.to_string()))?,
        };
        jwk.common.key_id = Some(kid.clone());
        jwk.common.key_algorithm = Some(
            alg_name(alg)
                .parse()
                .map_err(|_| KeyError::AlgorithmNotAllowed(alg_name(alg).into()))?,
        );
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        Ok(Self {
            kid,
            alg,
            jwk,
            decoding,
        })
    }

    /// The normalised public JWK (with `kid`, `alg`, `use`), as stored and published.
    pub fn to_jwk_json(&self) -> String {
        serde_json::to_string(&self.jwk).expect("a JWK serialises")
    }

    /// Rebuild from [`PublicKey::to_jwk_json`] output.
    pub fn from_jwk_json(json: &str) -> Result<Self, KeyError> {
        Self::parse(json, None, None)
    }
}

pub fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::RS256 => "RS256",
        Algorithm::PS256 => "PS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "unsupported",
    }
}

/// The `typ` a slot demands.
#[derive(Clone, Copy, Debug)]
pub enum TypRule {
    /// Exactly this media type (compared case-insensitively, `application/` prefix optional).
    Exactly(&'static str),
    /// Client assertions: no `typ`, or `JWT`. Latchkey's own explicit types are refused here so
    /// that a subject token can never double as a client assertion.
    JwtOrAbsent,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwsError {
    #[error("token is larger than {MAX_JWS_LEN} bytes")]
    TooLarge,
    #[error("token is not a compact JWS")]
    Malformed,
    #[error("a JSON member appears twice in the header or the payload")]
    DuplicateMember,
    #[error("header parameter `{0}` is not accepted")]
    ForbiddenHeader(&'static str),
    #[error("wrong token type (typ)")]
    WrongType,
    #[error("algorithm is not the one registered for the key")]
    AlgorithmNotAllowed,
    #[error("no registered key matches the token")]
    UnknownKey,
    #[error("signature does not verify")]
    BadSignature,
}

/// Verified claims with strictly-typed accessors: a claim that is present with the wrong JSON
/// type is an error, never "absent" (the CVE-2026-25537 lesson).
#[derive(Debug, Clone)]
pub struct Claims(pub Map<String, Value>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("claim `{0}` {1}")]
pub struct ClaimError(pub String, pub &'static str);

impl Claims {
    pub fn opt_str(&self, name: &str) -> Result<Option<&str>, ClaimError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ClaimError(name.into(), "must be a string")),
        }
    }

    pub fn str(&self, name: &str) -> Result<&str, ClaimError> {
        self.opt_str(name)?
            .ok_or_else(|| ClaimError(name.into(), "is required"))
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, ClaimError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| ClaimError(name.into(), "must be an integer")),
            Some(_) => Err(ClaimError(name.into(), "must be a number")),
        }
    }

    pub fn int(&self, name: &str) -> Result<i64, ClaimError> {
        self.opt_int(name)?
            .ok_or_else(|| ClaimError(name.into(), "is required"))
    }

    /// `aud` must be exactly `expected`, as a single string (draft-ietf-oauth-rfc7523bis: an
    /// array, or any other value that merely contains the issuer, let an assertion minted for one
    /// server be replayed at another). Compared byte for byte: no case folding, no trailing-slash
    /// normalisation.
    pub fn audience_is(&self, expected: &str) -> Result<(), ClaimError> {
        match self.0.get("aud") {
            Some(Value::String(s)) if s == expected => Ok(()),
            Some(Value::String(_)) => Err(ClaimError("aud".into(), "is not this server's issuer")),
            None => Err(ClaimError("aud".into(), "is required")),
            Some(_) => Err(ClaimError("aud".into(), "must be a single string")),
        }
    }
}

/// A JSON object whose members are all distinct (serde_json's `Map` keeps the last of two).
struct UniqueObject(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut m = Map::new();
                while let Some((k, v)) = a.next_entry::<String, Value>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(DUPLICATE));
                    }
                    m.insert(k, v);
                }
                Ok(UniqueObject(m))
            }
        }
        d.deserialize_map(Members)
    }
}

const DUPLICATE: &str = "duplicate member";

/// Decode one base64url segment holding a JSON object without duplicate members.
fn parse_segment(segment: &str) -> Result<Map<String, Value>, JwsError> {
    let raw = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwsError::Malformed)?;
    match serde_json::from_slice::<UniqueObject>(&raw) {
        Ok(UniqueObject(m)) => Ok(m),
        Err(e) if e.to_string().starts_with(DUPLICATE) => Err(JwsError::DuplicateMember),
        Err(_) => Err(JwsError::Malformed),
    }
}

fn typ_matches(found: Option<&str>, rule: TypRule) -> bool {
    let norm = |s: &str| {
        let l = s.to_ascii_lowercase();
        l.strip_prefix("application/")
            .map(str::to_owned)
            .unwrap_or(l)
    };
    match rule {
        TypRule::Exactly(want) => found.is_some_and(|t| norm(t) == norm(want)),
        TypRule::JwtOrAbsent => found.is_none_or(|t| norm(t) == "jwt"),
    }
}

/// Verify a compact JWS against `keys` (the registered keys of one principal).
pub fn verify_jws(token: &str, rule: TypRule, keys: &[PublicKey]) -> Result<Claims, JwsError> {
    if token.len() > MAX_JWS_LEN {
        return Err(JwsError::TooLarge);
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts[0].is_empty() || parts[1].is_empty() {
        return Err(JwsError::Malformed);
    }
    if parts[2].is_empty() {
        // An unsigned token (alg none) has no signature segment.
        return Err(JwsError::AlgorithmNotAllowed);
    }
    let header = parse_segment(parts[0])?;
    let payload = parse_segment(parts[1])?;
    for forbidden in ["jku", "jwk", "x5u", "x5c", "crit", "enc", "zip"] {
        if header.contains_key(forbidden) {
            return Err(JwsError::ForbiddenHeader(match forbidden {
                "jku" => "jku",
                "jwk" => "jwk",
                "x5u" => "x5u",
                "x5c" => "x5c",
                "crit" => "crit",
                "enc" => "enc",
                _ => "zip",
            }));
        }
    }
    let typ = match header.get("typ") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(JwsError::WrongType),
    };
    if !typ_matches(typ, rule) {
        return Err(JwsError::WrongType);
    }
    let Some(Value::String(alg_text)) = header.get("alg") else {
        return Err(JwsError::Malformed);
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(JwsError::Malformed),
    };
    // The algorithm must be one some registered key was registered with.
    let Some(alg) = keys
        .iter()
        .map(|k| k.alg)
        .find(|a| alg_name(*a) == alg_text)
    else {
        return Err(JwsError::AlgorithmNotAllowed);
    };
    let candidates: Vec<&PublicKey> = keys
        .iter()
        .filter(|k| k.alg == alg && kid.is_none_or(|id| id == k.kid))
        .collect();
    if candidates.is_empty() {
        return Err(JwsError::UnknownKey);
    }
    // The header and payload are parsed above; only the signature is left to check, over the
    // signing input exactly as sent (no second decoding of the payload).
    let signing_input = &token[..parts[0].len() + 1 + parts[1].len()];
    for key in candidates {
        match jsonwebtoken::crypto::verify(parts[2], signing_input.as_bytes(), &key.decoding, alg) {
            Ok(true) => return Ok(Claims(payload)),
            Ok(false) => continue,
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => continue,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                    return Err(JwsError::AlgorithmNotAllowed);
                }
                _ => return Err(JwsError::Malformed),
            },
        }
    }
    Err(JwsError::BadSignature)
}

/// What a client assertion (RFC 7523 `private_key_jwt`) must satisfy besides its signature.
#[derive(Clone, Copy, Debug)]
pub struct AssertionRules<'a> {
    /// The client it authenticates: `iss` and `sub` must both be exactly this.
    pub client_id: &'a str,
    /// This server's issuer identifier: `aud` must be exactly this, as a single string.
    pub issuer: &'a str,
    /// The verifier's clock, in Unix seconds.
    pub now: i64,
    /// Longest lifetime accepted, both `exp` − `iat` and `exp` − now, in seconds.
    pub max_lifetime: i64,
    /// How far `iat` and `nbf` may be in the future (clock skew), in seconds.
    pub future_skew: i64,
}

/// A client assertion that passed every check.
#[derive(Debug)]
pub struct VerifiedAssertion {
    /// Its `jti` (1–256 characters), for the caller's single-use check.
    pub jti: String,
    /// Its `exp`: the `jti` must be remembered until then plus the skew.
    pub exp: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssertionError {
    #[error(transparent)]
    Jws(#[from] JwsError),
    #[error("{0}")]
    Claim(String),
}

impl From<ClaimError> for AssertionError {
    fn from(e: ClaimError) -> Self {
        Self::Claim(e.to_string())
    }
}

/// Verify a client assertion: [`verify_jws`] with the client-assertion `typ` rule, then the
/// claims RFC 7523 and draft-ietf-oauth-rfc7523bis require — `iss` = `sub` = the client,
/// `aud` = the issuer (one string), `exp` in the future and not too far, `iat` present and not
/// in the future beyond the skew (`nbf` too, when present), `jti` present. Every registered
/// claim is strictly typed: a present claim of the wrong JSON type is an error, never "absent".
pub fn verify_client_assertion(
    token: &str,
    keys: &[PublicKey],
    rules: &AssertionRules<'_>,
) -> Result<VerifiedAssertion, AssertionError> {
    let c = verify_jws(token, TypRule::JwtOrAbsent, keys)?;
    let claim = |why: String| AssertionError::Claim(why);
    if c.str("iss")? != rules.client_id || c.str("sub")? != rules.client_id {
        return Err(claim("`iss` and `sub` must both be the client id".into()));
    }
    c.audience_is(rules.issuer)?;
    let exp = c.int("exp")?;
    let iat = c.int("iat")?;
    let now = rules.now;
    if exp <= now {
        return Err(claim("expired".into()));
    }
    if exp - now.min(iat) > rules.max_lifetime + rules.future_skew {
        return Err(claim(format!(
            "lifetime exceeds {} seconds",
            rules.max_lifetime
        )));
    }
    let limit = now + rules.future_skew;
    for (name, at) in [("iat", Some(iat)), ("nbf", c.opt_int("nbf")?)] {
        if at.is_some_and(|t| t > limit) {
            return Err(claim(format!("`{name}` is in the future")));
        }
    }
    let jti = c.str("jti")?;
    if jti.is_empty() || jti.len() > 256 {
        return Err(claim("`jti` must be 1–256 characters".into()));
    }
    Ok(VerifiedAssertion {
        jti: jti.to_owned(),
        exp,
    })
}

#[cfg(test)]
mod tests;
