//! Unit tests of the JWS verification functions. `matrix.rs` holds the JOSE attack matrix.

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

mod matrix;

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
