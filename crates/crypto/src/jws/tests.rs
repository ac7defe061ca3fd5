//! The JWT attack matrix: every vector must get exactly the outcome pinned here.

use super::*;
use crate::keygen::{SigningKey, generate};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::json;

const TYP: TypRule = TypRule::Exactly("token-vault-req+jwt");

fn rsa() -> (SigningKey, String) {
    let g = generate(Algorithm::RS256);
    (
        SigningKey::from_pem(&g.private_pem, Algorithm::RS256, Some("k1")).unwrap(),
        g.public_pem,
    )
}

fn claims() -> serde_json::Value {
    json!({"iss": "agt_1", "sub": "usr_1", "aud": "https://vault/", "iat": 1, "jti": "j"})
}

fn forge(header: serde_json::Value, claims: &serde_json::Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(sig)
    )
}

#[test]
fn valid_token_verifies_for_each_algorithm() {
    for alg in ALLOWED_ALGS {
        let g = generate(alg);
        let sk = SigningKey::from_pem(&g.private_pem, alg, None).unwrap();
        let pk = PublicKey::parse(&g.public_pem, Some(alg), None).unwrap();
        assert_eq!(
            pk.kid, sk.public.kid,
            "thumbprint kid is stable for {alg:?}"
        );
        let token = sk.sign(Some("token-vault-req+jwt"), &claims());
        let c = verify_jws(&token, TYP, &[pk]).unwrap();
        assert_eq!(c.str("sub").unwrap(), "usr_1");
    }
}

#[test]
fn typ_rules() {
    let (sk, pem) = rsa();
    let pk = PublicKey::parse(&pem, Some(Algorithm::RS256), Some("k1")).unwrap();
    let keys = [pk];
    for typ in [Some("JWT"), None, Some("at+jwt"), Some("dpop+jwt")] {
        assert_eq!(
            verify_jws(&sk.sign(typ, &claims()), TYP, &keys).err(),
            Some(JwsError::WrongType),
            "{typ:?}"
        );
    }
    assert!(
        verify_jws(
            &sk.sign(Some("application/Token-Vault-Req+JWT"), &claims()),
            TYP,
            &keys
        )
        .is_ok()
    );
    // A subject token is never accepted as a client assertion.
    let subject = sk.sign(Some("token-vault-req+jwt"), &claims());
    assert_eq!(
        verify_jws(&subject, TypRule::JwtOrAbsent, &keys).err(),
        Some(JwsError::WrongType)
    );
    assert!(
        verify_jws(
            &sk.sign(Some("JWT"), &claims()),
            TypRule::JwtOrAbsent,
            &keys
        )
        .is_ok()
    );
    assert!(verify_jws(&sk.sign(None, &claims()), TypRule::JwtOrAbsent, &keys).is_ok());
}

#[test]
fn algorithm_attacks() {
    let (sk, pem) = rsa();
    let pk = PublicKey::parse(&pem, Some(Algorithm::RS256), Some("k1")).unwrap();
    let keys = [pk];
    let good = sk.sign(Some("token-vault-req+jwt"), &claims());
    let body = good.split('.').nth(1).unwrap();
    // alg none, in its spellings, with and without a signature segment.
    for alg in ["none", "None", "NONE"] {
        let h = B64.encode(json!({"alg": alg, "typ": "token-vault-req+jwt"}).to_string());
        assert_eq!(
            verify_jws(&format!("{h}.{body}."), TYP, &keys).err(),
            Some(JwsError::AlgorithmNotAllowed)
        );
        assert_eq!(
            verify_jws(&format!("{h}.{body}.c2ln"), TYP, &keys).err(),
            Some(JwsError::AlgorithmNotAllowed)
        );
    }
    // HS256 keyed with the agent's public key (PEM text and JWK text as the HMAC secret).
    for secret in [pem.as_bytes().to_vec(), keys[0].to_jwk_json().into_bytes()] {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.typ = Some("token-vault-req+jwt".into());
        let forged = jsonwebtoken::encode(
            &header,
            &claims(),
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_eq!(
            verify_jws(&forged, TYP, &keys).err(),
            Some(JwsError::AlgorithmNotAllowed)
        );
    }
    // PS256 signature presented for an RS256-registered key.
    let g = generate(Algorithm::PS256);
    let ps = SigningKey::from_pem(&g.private_pem, Algorithm::PS256, Some("k1")).unwrap();
    assert_eq!(
        verify_jws(&ps.sign(Some("token-vault-req+jwt"), &claims()), TYP, &keys).err(),
        Some(JwsError::AlgorithmNotAllowed)
    );
}

#[test]
fn key_attacks() {
    let (sk, pem) = rsa();
    let keys = [PublicKey::parse(&pem, Some(Algorithm::RS256), Some("k1")).unwrap()];
    // A token from an unregistered key with the same kid: bad signature.
    let (other, _) = rsa();
    assert_eq!(
        verify_jws(
            &other.sign(Some("token-vault-req+jwt"), &claims()),
            TYP,
            &keys
        )
        .err(),
        Some(JwsError::BadSignature)
    );
    // Unknown kid.
    let g = generate(Algorithm::RS256);
    let stranger = SigningKey::from_pem(&g.private_pem, Algorithm::RS256, Some("nope")).unwrap();
    assert_eq!(
        verify_jws(
            &stranger.sign(Some("token-vault-req+jwt"), &claims()),
            TYP,
            &keys
        )
        .err(),
        Some(JwsError::UnknownKey)
    );
    // Embedded keys and key URLs are refused before any verification.
    let good = sk.sign(Some("token-vault-req+jwt"), &claims());
    let mut parts = good.split('.');
    let (_, body, sig) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
    for (field, value) in [
        ("jwk", json!({"kty": "oct", "k": "AAAA"})),
        ("jku", json!("https://evil/jwks")),
        ("x5u", json!("https://evil/cert")),
        ("x5c", json!(["MIIB"])),
        ("crit", json!(["exp"])),
    ] {
        let mut h = json!({"alg": "RS256", "typ": "token-vault-req+jwt", "kid": "k1"});
        h[field] = value;
        let t = format!("{}.{body}.{sig}", B64.encode(h.to_string()));
        assert!(
            matches!(
                verify_jws(&t, TYP, &keys),
                Err(JwsError::ForbiddenHeader(_))
            ),
            "{field}"
        );
    }
    // Tampered payload.
    let tampered_claims =
        json!({"iss": "agt_1", "sub": "usr_admin", "aud": "https://vault/", "iat": 1, "jti": "j"});
    let h = good.split('.').next().unwrap();
    let t = format!("{h}.{}.{sig}", B64.encode(tampered_claims.to_string()));
    assert_eq!(
        verify_jws(&t, TYP, &keys).err(),
        Some(JwsError::BadSignature)
    );
    // ECDSA r = s = 0 ("psychic signature") against an ES256 key.
    let g = generate(Algorithm::ES256);
    let ec = [PublicKey::parse(&g.public_pem, None, Some("e")).unwrap()];
    let psychic = forge(
        json!({"alg": "ES256", "typ": "token-vault-req+jwt"}),
        &claims(),
        &[0u8; 64],
    );
    assert_eq!(
        verify_jws(&psychic, TYP, &ec).err(),
        Some(JwsError::BadSignature)
    );
}

#[test]
fn shape_attacks() {
    let (_, pem) = rsa();
    let keys = [PublicKey::parse(&pem, Some(Algorithm::RS256), None).unwrap()];
    for bad in ["", "a", "a.b", "a.b.c.d", "..", "!!.b.c", "e30.e30.e30"] {
        assert!(verify_jws(bad, TYP, &keys).is_err(), "{bad}");
    }
    let big = "a".repeat(MAX_JWS_LEN + 1);
    assert_eq!(verify_jws(&big, TYP, &keys).err(), Some(JwsError::TooLarge));
    let many_dots = ".".repeat(5000);
    assert_eq!(
        verify_jws(&many_dots, TYP, &keys).err(),
        Some(JwsError::Malformed)
    );
}

#[test]
fn claims_are_strictly_typed() {
    let c = Claims(
        json!({"iat": "123", "exp": 1.5, "aud": ["x", "y"], "sub": 7, "ok": "s"})
            .as_object()
            .unwrap()
            .clone(),
    );
    assert!(c.int("iat").is_err());
    assert!(c.opt_int("exp").is_err());
    assert!(c.str("sub").is_err());
    assert!(c.audience_is("x").is_err());
    assert!(c.str("missing").is_err());
    assert_eq!(c.opt_str("missing").unwrap(), None);
    assert_eq!(c.str("ok").unwrap(), "s");
}

#[test]
fn key_registration_rules() {
    // Private keys are refused where a public key is expected.
    let g = generate(Algorithm::ES256);
    assert_eq!(
        PublicKey::parse(&g.private_pem, None, None).err(),
        Some(KeyError::PrivateKey)
    );
    // Key type / algorithm mismatches.
    assert!(PublicKey::parse(&g.public_pem, Some(Algorithm::RS256), None).is_err());
    let r = generate(Algorithm::RS256);
    assert!(PublicKey::parse(&r.public_pem, Some(Algorithm::ES256), None).is_err());
    assert!(PublicKey::parse(&r.public_pem, Some(Algorithm::HS256), None).is_err());
    // JWK round trip keeps kid and alg.
    let pk = PublicKey::parse(&r.public_pem, Some(Algorithm::PS256), Some("mine")).unwrap();
    let back = PublicKey::from_jwk_json(&pk.to_jwk_json()).unwrap();
    assert_eq!((back.kid.as_str(), back.alg), ("mine", Algorithm::PS256));
    // RSA-1024 is refused.
    let small = json!({"kty": "RSA", "n": B64.encode([0xffu8; 128]), "e": "AQAB"}).to_string();
    assert_eq!(
        PublicKey::parse(&small, Some(Algorithm::RS256), None).err(),
        Some(KeyError::RsaTooSmall(1024))
    );
    assert!(PublicKey::parse("hello", None, None).is_err());
}
