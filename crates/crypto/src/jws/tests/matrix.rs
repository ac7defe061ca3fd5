//! The JOSE attack matrix (`../shared/reference/security.md` T3): every known way to get a
//! forged, confused or stretched JWT past a verifier, each with the exact outcome pinned.
//!
//! A vector names the slot it is presented in — a client assertion (the whole of
//! [`verify_client_assertion`]) or a slot with its own `typ` rule (subject tokens, Latchkey's
//! access tokens; their claim checks are their callers') — the registered keys, and the outcome.
//! The test runs all of them, prints the table, and fails listing every vector whose outcome
//! differs, so a JOSE dependency bump that changes one behaviour is named, not hidden.

use super::*;

const NOW: i64 = 1_800_000_000;
const ISSUER: &str = "https://vault.example/";
const CLIENT: &str = "agt_matrix";
const RULES: AssertionRules<'static> = AssertionRules {
    client_id: CLIENT,
    issuer: ISSUER,
    now: NOW,
    max_lifetime: 300,
    future_skew: 10,
};
const SUBJECT_SLOT: TypRule = TypRule::Exactly("token-vault-req+jwt");
const ACCESS_SLOT: TypRule = TypRule::Exactly("at+jwt");

/// The order of the P-256 group, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

#[derive(Clone, Copy)]
enum Slot {
    Assertion,
    Typed(TypRule),
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Jws(JwsError),
    Claim(String),
}

fn claim(text: &str) -> Outcome {
    Outcome::Claim(text.to_owned())
}

struct Vector {
    name: &'static str,
    slot: Slot,
    keys: Vec<PublicKey>,
    token: String,
    expect: Outcome,
}

fn outcome(v: &Vector) -> Outcome {
    match v.slot {
        Slot::Assertion => match verify_client_assertion(&v.token, &v.keys, &RULES) {
            Ok(_) => Outcome::Accepted,
            Err(AssertionError::Jws(e)) => Outcome::Jws(e),
            Err(AssertionError::Claim(why)) => Outcome::Claim(why),
        },
        Slot::Typed(rule) => match verify_jws(&v.token, rule, &v.keys) {
            Ok(_) => Outcome::Accepted,
            Err(e) => Outcome::Jws(e),
        },
    }
}

/// The agent's four registered keys, one per allowed algorithm, and what an attacker can learn
/// about them (the RSA public key as PEM, DER and JWK).
struct Agent {
    rs: SigningKey,
    ps: SigningKey,
    es: SigningKey,
    ed: SigningKey,
    rs_public_pem: String,
    ps_private_pem: String,
}

fn key(alg: Algorithm, kid: &str) -> (SigningKey, String, String) {
    let g = generate(alg);
    let sk = SigningKey::from_pem(&g.private_pem, alg, Some(kid)).unwrap();
    (sk, g.public_pem, g.private_pem.to_string())
}

impl Agent {
    fn new() -> Self {
        let (rs, rs_public_pem, _) = key(Algorithm::RS256, "rs");
        let (ps, _, ps_private_pem) = key(Algorithm::PS256, "ps");
        Self {
            rs,
            ps,
            es: key(Algorithm::ES256, "es").0,
            ed: key(Algorithm::EdDSA, "ed").0,
            rs_public_pem,
            ps_private_pem,
        }
    }

    fn keys(&self) -> Vec<PublicKey> {
        [&self.rs, &self.ps, &self.es, &self.ed]
            .map(|k| k.public.clone())
            .to_vec()
    }

    fn rs_public_der(&self) -> Vec<u8> {
        use base64::engine::general_purpose::STANDARD;
        let body: String = self
            .rs_public_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        STANDARD.decode(body).unwrap()
    }
}

/// A valid client assertion's claims with `overrides` applied (`null` removes a claim).
fn claims_with(overrides: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "iss": CLIENT, "sub": CLIENT, "aud": ISSUER,
        "iat": NOW, "exp": NOW + 60, "jti": "jti-1",
    });
    for (k, v) in overrides.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn segments(token: &str) -> (String, String, String) {
    let mut p = token.split('.').map(str::to_owned);
    (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
}

/// A token with this header and payload and whatever signature bytes are given.
fn forge(header: &serde_json::Value, payload: &serde_json::Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload.to_string()),
        B64.encode(sig)
    )
}

/// An HMAC-signed assertion whose secret is `secret` (the confused-deputy attack: a verifier
/// that lets the header choose the algorithm would use the public key as the HMAC key).
fn hmac_forgery(alg: Algorithm, secret: &[u8]) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some("rs".into());
    jsonwebtoken::encode(
        &header,
        &claims_with(json!({})),
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// `n − s` as 32 big-endian bytes: the other valid `s` of an ECDSA signature.
fn negate_mod_n(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        out[i] = d.rem_euclid(256) as u8;
    }
    out
}

fn es256_signature_with(token: &str, r: Option<&[u8]>, s: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let (h, p, sig) = segments(token);
    let sig = B64.decode(sig).unwrap();
    let mut out = r.map_or_else(|| sig[..32].to_vec(), <[u8]>::to_vec);
    out.extend(s(&sig[32..]));
    format!("{h}.{p}.{}", B64.encode(out))
}

/// A DER `SEQUENCE { INTEGER r, INTEGER s }` of a fixed-size signature (what a JWS must not use).
fn der_signature(token: &str) -> String {
    let (h, p, sig) = segments(token);
    let sig = B64.decode(sig).unwrap();
    let int = |x: &[u8]| {
        let x: Vec<u8> = x.iter().copied().skip_while(|b| *b == 0).collect();
        let x = if x[0] & 0x80 != 0 {
            [vec![0], x].concat()
        } else {
            x
        };
        [vec![0x02, x.len() as u8], x].concat()
    };
    let body = [int(&sig[..32]), int(&sig[32..])].concat();
    let der = [vec![0x30, body.len() as u8], body].concat();
    format!("{h}.{p}.{}", B64.encode(der))
}

struct Matrix(Vec<Vector>);

impl Matrix {
    fn add(
        &mut self,
        name: &'static str,
        slot: Slot,
        keys: &[PublicKey],
        token: String,
        expect: Outcome,
    ) {
        self.0.push(Vector {
            name,
            slot,
            keys: keys.to_vec(),
            token,
            expect,
        });
    }
}

fn vectors() -> Vec<Vector> {
    let a = Agent::new();
    let all = a.keys();
    let valid = claims_with(json!({}));
    let rs = |typ: Option<&str>, c: serde_json::Value| a.rs.sign(typ, &c);
    let good = rs(None, valid.clone());
    let es_good = a.es.sign(None, &valid);
    let (good_h, good_p, good_sig) = segments(&good);
    let mut m = Matrix(Vec::new());
    use Outcome::{Accepted, Jws};
    use Slot::{Assertion, Typed};

    // Baseline: each algorithm's valid assertion, with and without `typ: JWT`.
    m.add("RS256 valid", Assertion, &all, good.clone(), Accepted);
    m.add(
        "PS256 valid",
        Assertion,
        &all,
        a.ps.sign(None, &valid),
        Accepted,
    );
    m.add("ES256 valid", Assertion, &all, es_good.clone(), Accepted);
    m.add(
        "EdDSA valid",
        Assertion,
        &all,
        a.ed.sign(None, &valid),
        Accepted,
    );
    m.add(
        "typ JWT",
        Assertion,
        &all,
        rs(Some("JWT"), valid.clone()),
        Accepted,
    );
    m.add(
        "typ application/jwt",
        Assertion,
        &all,
        rs(Some("application/jwt"), valid.clone()),
        Accepted,
    );
    m.add(
        "no kid: every key of the algorithm is tried",
        Assertion,
        &all,
        a.rs.sign_segments(r#"{"alg":"RS256"}"#, &valid.to_string()),
        Accepted,
    );

    // `alg: none` in its spellings, with and without a signature segment; a missing `alg`.
    for (name, alg) in [
        ("alg none", "none"),
        ("alg None", "None"),
        ("alg NONE", "NONE"),
    ] {
        let h = B64.encode(json!({"alg": alg}).to_string());
        m.add(
            name,
            Assertion,
            &all,
            format!("{h}.{good_p}."),
            Jws(JwsError::AlgorithmNotAllowed),
        );
    }
    let h = B64.encode(json!({"alg": "none", "kid": "rs"}).to_string());
    m.add(
        "alg none with a signature",
        Assertion,
        &all,
        format!("{h}.{good_p}.{good_sig}"),
        Jws(JwsError::AlgorithmNotAllowed),
    );
    let h = B64.encode(json!({"kid": "rs"}).to_string());
    m.add(
        "no alg",
        Assertion,
        &all,
        format!("{h}.{good_p}.{good_sig}"),
        Jws(JwsError::Malformed),
    );

    // HS256/384/512 keyed with the RSA public key as PEM, DER and JWK text.
    let jwk = a.rs.public.to_jwk_json();
    let der = a.rs_public_der();
    for (alg, names) in [
        (
            Algorithm::HS256,
            [
                "HS256 keyed with the public PEM",
                "HS256 keyed with the public DER",
                "HS256 keyed with the public JWK",
            ],
        ),
        (
            Algorithm::HS384,
            [
                "HS384 keyed with the public PEM",
                "HS384 keyed with the public DER",
                "HS384 keyed with the public JWK",
            ],
        ),
        (
            Algorithm::HS512,
            [
                "HS512 keyed with the public PEM",
                "HS512 keyed with the public DER",
                "HS512 keyed with the public JWK",
            ],
        ),
    ] {
        for (name, secret) in
            names
                .into_iter()
                .zip([a.rs_public_pem.as_bytes(), &der, jwk.as_bytes()])
        {
            m.add(
                name,
                Assertion,
                &all,
                hmac_forgery(alg, secret),
                Jws(JwsError::AlgorithmNotAllowed),
            );
        }
    }

    // Algorithm confusion between registered keys.
    let ps_only = [a.ps.public.clone()];
    let rs_with_ps_key =
        SigningKey::from_pem(&a.ps_private_pem, Algorithm::RS256, Some("ps")).unwrap();
    m.add(
        "RS256 signed by a PS256-only key",
        Assertion,
        &ps_only,
        rs_with_ps_key.sign(None, &valid),
        Jws(JwsError::AlgorithmNotAllowed),
    );
    m.add(
        "PS256 for an RS256-only key",
        Assertion,
        std::slice::from_ref(&a.rs.public),
        a.ps.sign(None, &valid),
        Jws(JwsError::AlgorithmNotAllowed),
    );
    m.add(
        "ES384 (not registered)",
        Assertion,
        &all,
        forge(&json!({"alg": "ES384", "kid": "es"}), &valid, &[1; 96]),
        Jws(JwsError::AlgorithmNotAllowed),
    );
    let (_, es_p, es_sig) = segments(&es_good);
    let h = B64.encode(json!({"alg": "RS256", "kid": "es"}).to_string());
    m.add(
        "RS256 header on the ES256 key's kid",
        Assertion,
        &all,
        format!("{h}.{es_p}.{es_sig}"),
        Jws(JwsError::UnknownKey),
    );

    // ECDSA signature values.
    m.add(
        "ES256 r = s = 0",
        Assertion,
        &all,
        es256_signature_with(&es_good, Some(&[0; 32]), |_| vec![0; 32]),
        Jws(JwsError::BadSignature),
    );
    // The high-S twin of a valid signature is itself valid ECDSA (P-256 JWS does not demand low
    // S, and common signers emit both): accepted. Harmless: single use is keyed on `jti`, not
    // on the signature bytes.
    m.add(
        "ES256 high-S twin of a valid signature",
        Assertion,
        &all,
        es256_signature_with(&es_good, None, negate_mod_n),
        Accepted,
    );
    m.add(
        "ES256 s = n",
        Assertion,
        &all,
        es256_signature_with(&es_good, None, |_| P256_N.to_vec()),
        Jws(JwsError::BadSignature),
    );
    m.add(
        "ES256 r = n",
        Assertion,
        &all,
        es256_signature_with(&es_good, Some(&P256_N), <[u8]>::to_vec),
        Jws(JwsError::BadSignature),
    );
    m.add(
        "ES256 DER-encoded signature",
        Assertion,
        &all,
        der_signature(&es_good),
        Jws(JwsError::BadSignature),
    );
    m.add(
        "ES256 truncated signature",
        Assertion,
        &all,
        es256_signature_with(&es_good, None, |s| s[..16].to_vec()),
        Jws(JwsError::BadSignature),
    );

    // Keys and key URLs carried by the token itself, and critical extensions.
    let attacker = key(Algorithm::RS256, "rs").0;
    let attacker_jwk: serde_json::Value =
        serde_json::from_str(&attacker.public.to_jwk_json()).unwrap();
    for (name, field, value, expect) in [
        ("jwk: the attacker's own key", "jwk", attacker_jwk, "jwk"),
        (
            "jku: a key set URL",
            "jku",
            json!("https://attacker.example/jwks"),
            "jku",
        ),
        (
            "x5u: a certificate URL",
            "x5u",
            json!("https://attacker.example/cert"),
            "x5u",
        ),
        (
            "x5c: a certificate chain",
            "x5c",
            json!(["MIIBszCCAVmgAwIBAgIU"]),
            "x5c",
        ),
        ("crit: a registered name", "crit", json!(["exp"]), "crit"),
        (
            "crit: an unknown extension",
            "crit",
            json!(["urn:attacker:ext"]),
            "crit",
        ),
    ] {
        let mut h = json!({"alg": "RS256", "kid": "rs"});
        h[field] = value;
        m.add(
            name,
            Assertion,
            &all,
            attacker.sign_segments(&h.to_string(), &valid.to_string()),
            Jws(JwsError::ForbiddenHeader(expect)),
        );
    }

    // `kid` values aimed at a key store; an unregistered key reusing a registered kid.
    for (name, kid) in [
        ("kid path traversal", json!("../../../../../../dev/null")),
        ("kid SQL injection", json!("rs' OR '1'='1")),
        ("kid empty", json!("")),
    ] {
        let h = json!({"alg": "RS256", "kid": kid});
        m.add(
            name,
            Assertion,
            &all,
            a.rs.sign_segments(&h.to_string(), &valid.to_string()),
            Jws(JwsError::UnknownKey),
        );
    }
    let h = json!({"alg": "RS256", "kid": "k".repeat(10 * 1024)});
    m.add(
        "kid of 10 KiB",
        Assertion,
        &all,
        a.rs.sign_segments(&h.to_string(), &valid.to_string()),
        Jws(JwsError::TooLarge),
    );
    m.add(
        "kid as a number",
        Assertion,
        &all,
        a.rs.sign_segments(r#"{"alg":"RS256","kid":7}"#, &valid.to_string()),
        Jws(JwsError::Malformed),
    );
    m.add(
        "unregistered key with a registered kid",
        Assertion,
        &all,
        attacker.sign(None, &valid),
        Jws(JwsError::BadSignature),
    );
    let tampered = B64.encode(claims_with(json!({"sub": "agt_other"})).to_string());
    m.add(
        "payload changed after signing",
        Assertion,
        &all,
        format!("{good_h}.{tampered}.{good_sig}"),
        Jws(JwsError::BadSignature),
    );

    // Each slot given another slot's token type.
    let wrong = || Jws(JwsError::WrongType);
    for (name, typ) in [
        ("assertion slot: a subject token", "token-vault-req+jwt"),
        ("assertion slot: an access token", "at+jwt"),
        ("assertion slot: a DPoP proof", "dpop+jwt"),
        ("assertion slot: a logout token", "logout+jwt"),
    ] {
        m.add(name, Assertion, &all, rs(Some(typ), valid.clone()), wrong());
    }
    let id_token = claims_with(json!({"iss": ISSUER, "aud": CLIENT, "nonce": "n"}));
    for (name, typ) in [
        ("subject slot: an ID token (typ JWT)", Some("JWT")),
        ("subject slot: no typ", None),
        ("subject slot: a DPoP proof", Some("dpop+jwt")),
        ("subject slot: a logout token", Some("logout+jwt")),
        ("subject slot: an access token", Some("at+jwt")),
    ] {
        m.add(
            name,
            Typed(SUBJECT_SLOT),
            &all,
            rs(typ, id_token.clone()),
            wrong(),
        );
    }
    m.add(
        "subject slot: a subject token",
        Typed(SUBJECT_SLOT),
        &all,
        rs(Some("token-vault-req+jwt"), valid.clone()),
        Accepted,
    );
    m.add(
        "access-token slot: an ID token (typ JWT)",
        Typed(ACCESS_SLOT),
        &all,
        rs(Some("JWT"), id_token.clone()),
        wrong(),
    );
    m.add(
        "access-token slot: a logout token",
        Typed(ACCESS_SLOT),
        &all,
        rs(Some("logout+jwt"), valid.clone()),
        wrong(),
    );
    m.add(
        "typ as a number",
        Assertion,
        &all,
        a.rs.sign_segments(r#"{"alg":"RS256","kid":"rs","typ":1}"#, &valid.to_string()),
        wrong(),
    );

    // Audience.
    let assertion = |overrides: serde_json::Value| rs(None, claims_with(overrides));
    let not_issuer = || claim("claim `aud` is not this server's issuer");
    m.add(
        "aud: the token endpoint URL",
        Assertion,
        &all,
        assertion(json!({"aud": format!("{ISSUER}oauth/token")})),
        not_issuer(),
    );
    m.add(
        "aud: the CIBA endpoint URL",
        Assertion,
        &all,
        assertion(json!({"aud": format!("{ISSUER}bc-authorize")})),
        not_issuer(),
    );
    m.add(
        "aud: the issuer without its trailing slash",
        Assertion,
        &all,
        assertion(json!({"aud": ISSUER.trim_end_matches('/')})),
        not_issuer(),
    );
    m.add(
        "aud: the issuer with a second trailing slash",
        Assertion,
        &all,
        assertion(json!({"aud": format!("{ISSUER}/")})),
        not_issuer(),
    );
    m.add(
        "aud: the issuer in upper case",
        Assertion,
        &all,
        assertion(json!({"aud": ISSUER.to_uppercase()})),
        not_issuer(),
    );
    m.add(
        "aud: another server",
        Assertion,
        &all,
        assertion(json!({"aud": "https://other.example/"})),
        not_issuer(),
    );
    m.add(
        "aud: an array holding only the issuer",
        Assertion,
        &all,
        assertion(json!({"aud": [ISSUER]})),
        claim("claim `aud` must be a single string"),
    );
    m.add(
        "aud: an array holding the issuer and another",
        Assertion,
        &all,
        assertion(json!({"aud": [ISSUER, "https://other.example/"]})),
        claim("claim `aud` must be a single string"),
    );
    m.add(
        "aud: missing",
        Assertion,
        &all,
        assertion(json!({"aud": null})),
        claim("claim `aud` is required"),
    );

    // Expiry and lifetime.
    m.add(
        "exp as a string",
        Assertion,
        &all,
        assertion(json!({"exp": (NOW + 60).to_string()})),
        claim("claim `exp` must be a number"),
    );
    m.add(
        "exp as a fraction",
        Assertion,
        &all,
        assertion(json!({"exp": NOW as f64 + 60.5})),
        claim("claim `exp` must be an integer"),
    );
    m.add(
        "exp missing",
        Assertion,
        &all,
        assertion(json!({"exp": null})),
        claim("claim `exp` is required"),
    );
    m.add(
        "exp now",
        Assertion,
        &all,
        assertion(json!({"exp": NOW})),
        claim("expired"),
    );
    m.add(
        "exp in the past",
        Assertion,
        &all,
        assertion(json!({"iat": NOW - 120, "exp": NOW - 60})),
        claim("expired"),
    );
    m.add(
        "exp an hour ahead",
        Assertion,
        &all,
        assertion(json!({"exp": NOW + 3600})),
        claim("lifetime exceeds 300 seconds"),
    );
    m.add(
        "exp soon but iat an hour ago",
        Assertion,
        &all,
        assertion(json!({"iat": NOW - 3600})),
        claim("lifetime exceeds 300 seconds"),
    );
    m.add(
        "lifetime exactly the cap plus skew",
        Assertion,
        &all,
        assertion(json!({"exp": NOW + 310})),
        Accepted,
    );

    // Issued-at and not-before: up to 10 s in the future is clock skew.
    m.add(
        "iat +8 s",
        Assertion,
        &all,
        assertion(json!({"iat": NOW + 8})),
        Accepted,
    );
    m.add(
        "iat +11 s",
        Assertion,
        &all,
        assertion(json!({"iat": NOW + 11})),
        claim("`iat` is in the future"),
    );
    m.add(
        "iat +61 s",
        Assertion,
        &all,
        assertion(json!({"iat": NOW + 61, "exp": NOW + 120})),
        claim("`iat` is in the future"),
    );
    m.add(
        "iat missing",
        Assertion,
        &all,
        assertion(json!({"iat": null})),
        claim("claim `iat` is required"),
    );
    m.add(
        "iat as a string",
        Assertion,
        &all,
        assertion(json!({"iat": NOW.to_string()})),
        claim("claim `iat` must be a number"),
    );
    m.add(
        "nbf +11 s",
        Assertion,
        &all,
        assertion(json!({"nbf": NOW + 11})),
        claim("`nbf` is in the future"),
    );
    m.add(
        "nbf as a string",
        Assertion,
        &all,
        assertion(json!({"nbf": NOW.to_string()})),
        claim("claim `nbf` must be a number"),
    );

    // Identity claims.
    m.add(
        "jti missing",
        Assertion,
        &all,
        assertion(json!({"jti": null})),
        claim("claim `jti` is required"),
    );
    m.add(
        "jti empty",
        Assertion,
        &all,
        assertion(json!({"jti": ""})),
        claim("`jti` must be 1–256 characters"),
    );
    m.add(
        "jti of 257 characters",
        Assertion,
        &all,
        assertion(json!({"jti": "j".repeat(257)})),
        claim("`jti` must be 1–256 characters"),
    );
    m.add(
        "jti as a number",
        Assertion,
        &all,
        assertion(json!({"jti": 1})),
        claim("claim `jti` must be a string"),
    );
    m.add(
        "sub missing",
        Assertion,
        &all,
        assertion(json!({"sub": null})),
        claim("claim `sub` is required"),
    );
    m.add(
        "iss missing",
        Assertion,
        &all,
        assertion(json!({"iss": null})),
        claim("claim `iss` is required"),
    );
    m.add(
        "iss ≠ sub (sub a user)",
        Assertion,
        &all,
        assertion(json!({"sub": "usr_1"})),
        claim("`iss` and `sub` must both be the client id"),
    );
    m.add(
        "iss = sub = another client",
        Assertion,
        &all,
        assertion(json!({"iss": "agt_other", "sub": "agt_other"})),
        claim("`iss` and `sub` must both be the client id"),
    );
    m.add(
        "sub as a number",
        Assertion,
        &all,
        assertion(json!({"sub": 7})),
        claim("claim `sub` must be a string"),
    );

    // Duplicate members: two parsers could each see a different value.
    let dup_claims = format!(
        r#"{{"iss":"{CLIENT}","sub":"{CLIENT}","sub":"usr_admin","aud":"{ISSUER}","iat":{NOW},"exp":{},"jti":"j"}}"#,
        NOW + 60
    );
    m.add(
        "duplicate claim (sub twice)",
        Assertion,
        &all,
        a.rs.sign_segments(r#"{"alg":"RS256","kid":"rs"}"#, &dup_claims),
        Jws(JwsError::DuplicateMember),
    );
    m.add(
        "duplicate header member (alg twice)",
        Assertion,
        &all,
        a.rs.sign_segments(
            r#"{"alg":"none","alg":"RS256","kid":"rs"}"#,
            &valid.to_string(),
        ),
        Jws(JwsError::DuplicateMember),
    );

    // Shapes that are not a compact JWS.
    let jwe_header =
        B64.encode(json!({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "rs"}).to_string());
    m.add(
        "a JWE (five segments)",
        Assertion,
        &all,
        format!("{jwe_header}.a2V5.aXY.Y2lwaGVy.dGFn"),
        Jws(JwsError::Malformed),
    );
    m.add(
        "a JWE header in three segments",
        Assertion,
        &all,
        format!("{jwe_header}.{good_p}.{good_sig}"),
        Jws(JwsError::ForbiddenHeader("enc")),
    );
    m.add(
        "a compressed payload (zip)",
        Assertion,
        &all,
        a.rs.sign_segments(
            r#"{"alg":"RS256","kid":"rs","zip":"DEF"}"#,
            &valid.to_string(),
        ),
        Jws(JwsError::ForbiddenHeader("zip")),
    );
    m.add(
        "payload an array",
        Assertion,
        &all,
        a.rs.sign_segments(r#"{"alg":"RS256","kid":"rs"}"#, "[1,2]"),
        Jws(JwsError::Malformed),
    );
    m.add(
        "payload not JSON",
        Assertion,
        &all,
        a.rs.sign_segments(r#"{"alg":"RS256","kid":"rs"}"#, "iss=agt"),
        Jws(JwsError::Malformed),
    );
    m.add(
        "header not base64url",
        Assertion,
        &all,
        format!("{{}}.{good_p}.{good_sig}"),
        Jws(JwsError::Malformed),
    );
    m.add(
        "signature with base64 padding",
        Assertion,
        &all,
        format!("{good}=="),
        Jws(JwsError::Malformed),
    );
    m.add(
        "over 8 KiB",
        Assertion,
        &all,
        assertion(json!({"pad": "x".repeat(MAX_JWS_LEN)})),
        Jws(JwsError::TooLarge),
    );
    m.add(
        "empty",
        Assertion,
        &all,
        String::new(),
        Jws(JwsError::Malformed),
    );
    m.0
}

#[test]
fn every_attack_vector_gets_its_pinned_outcome() {
    let vectors = vectors();
    let mut wrong = Vec::new();
    for v in &vectors {
        let got = outcome(v);
        let mark = if got == v.expect { "ok " } else { "BAD" };
        println!("{mark} {:<50} {:?}", v.name, got);
        if got != v.expect {
            wrong.push(format!("{}: expected {:?}, got {got:?}", v.name, v.expect));
        }
    }
    assert!(
        vectors.len() >= 60,
        "the matrix has {} vectors",
        vectors.len()
    );
    let names: std::collections::HashSet<_> = vectors.iter().map(|v| v.name).collect();
    assert_eq!(names.len(), vectors.len(), "vector names are unique");
    assert!(
        wrong.is_empty(),
        "{} of {} vectors:\n{}",
        wrong.len(),
        vectors.len(),
        wrong.join("\n")
    );
}
