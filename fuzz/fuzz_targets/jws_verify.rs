//! The one JWS verification function, two ways: the input as a whole compact token (the
//! parser's every branch), and the input as `header \0 claims` signed with a registered
//! Ed25519 key, so that the header and claim checks behind a valid signature are reached too.
//! Oracle: no panic; a token accepted under one typ rule carries a header `typ` that rule
//! allows; a signature made by a key that is not registered never verifies.
#![no_main]

use std::sync::OnceLock;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use latchkey_crypto::Algorithm;
use latchkey_crypto::jws::{PublicKey, TypRule, verify_jws};
use libfuzzer_sys::fuzz_target;

struct Keys {
    signer: Ed25519KeyPair,
    stranger: Ed25519KeyPair,
    registered: Vec<PublicKey>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
        let stranger = Ed25519KeyPair::from_seed_unchecked(&[8; 32]).unwrap();
        let jwk = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(signer.public_key().as_ref()),
        })
        .to_string();
        let registered = vec![PublicKey::parse(&jwk, Some(Algorithm::EdDSA), Some("k1")).unwrap()];
        Keys {
            signer,
            stranger,
            registered,
        }
    })
}

const RULES: [TypRule; 3] = [
    TypRule::Exactly("token-vault-req+jwt"),
    TypRule::Exactly("at+jwt"),
    TypRule::JwtOrAbsent,
];

fn exercise(token: &str, rule: TypRule) -> bool {
    match verify_jws(token, rule, &keys().registered) {
        Ok(claims) => {
            for name in ["iss", "sub", "aud", "jti", "exp", "iat", "nbf", "scope"] {
                let _ = claims.opt_str(name);
                let _ = claims.opt_int(name);
            }
            let _ = claims.audience_is("https://vault.example/");
            true
        }
        Err(_) => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let rule = RULES[usize::from(mode >> 4) % RULES.len()];
    if mode & 1 == 0 {
        if let Ok(token) = std::str::from_utf8(rest) {
            exercise(token, rule);
        }
        return;
    }
    let (header, claims) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b"{}"[..]),
    };
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signed = |key: &Ed25519KeyPair| {
        format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(key.sign(input.as_bytes()).as_ref())
        )
    };
    exercise(&signed(&keys().signer), rule);
    assert!(
        !exercise(&signed(&keys().stranger), rule),
        "a token signed by an unregistered key verified: {input}"
    );
});
