//! Bad input, each with its exact error code, and nothing changed: no token released, no
//! single-use identifier consumed, no 5xx.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use latchkey_crypto::Algorithm;
use latchkey_crypto::keygen::{SigningKey, generate};
use serde_json::{Value, json};

use crate::harness::*;

/// Send `params`, expect (status, code), and check nothing changed.
async fn rejects(ts: &TestServer, params: &[(String, String)], status: u16, code: &str) {
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);
    ts.post_form(params).await.assert_error(status, code);
    assert_eq!(
        (ts.releases().await, ts.used_jtis().await),
        (releases, jtis),
        "state changed on {code}"
    );
}

fn with(
    mut params: Vec<(String, String)>,
    name: &str,
    value: Option<&str>,
) -> Vec<(String, String)> {
    params.retain(|(k, _)| k != name);
    if let Some(v) = value {
        params.push((name.to_owned(), v.to_owned()));
    }
    params
}

fn forge(header: Value, claims: Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(sig)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_token_attacks() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let fresh = |subject: String| ts.params_with(subject, ts.assertion(json!({})));
    let now = ts.now();

    // Wrong typ (plain JWT; an access-token type), and none at all.
    for typ in [Some("JWT"), Some("at+jwt"), None] {
        let claims = json!({"iss": ts.info.agent_id, "sub": ts.info.user_id, "aud": ts.issuer, "iat": now, "jti": "t1", "audit_context": "x"});
        rejects(
            &ts,
            &fresh(ts.agent_key.sign(typ, &claims)),
            400,
            "invalid_grant",
        )
        .await;
    }
    // alg none.
    let claims = json!({"iss": ts.info.agent_id, "sub": ts.info.user_id, "aud": ts.issuer, "iat": now, "jti": "n1", "audit_context": "x"});
    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"token-vault-req+jwt"}"#),
        B64.encode(claims.to_string())
    );
    rejects(&ts, &fresh(none), 400, "invalid_grant").await;
    // HS256 keyed with the agent's registered public key (PEM text).
    let pem = std::fs::read_to_string(&ts.info.agent_key).unwrap();
    let public_pem =
        latchkey_crypto::jws::PublicKey::parse(&ts.agent_key.public.to_jwk_json(), None, None)
            .unwrap()
            .to_jwk_json();
    for secret in [pem.as_bytes(), public_pem.as_bytes()] {
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.typ = Some("token-vault-req+jwt".into());
        let hs = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap();
        rejects(&ts, &fresh(hs), 400, "invalid_grant").await;
    }
    // A key that is not registered (same kid, different key).
    let stranger = generate(Algorithm::RS256);
    let stranger = SigningKey::from_pem(
        &stranger.private_pem,
        Algorithm::RS256,
        Some(&ts.agent_key.public.kid),
    )
    .unwrap();
    let mut c = claims.clone();
    c["jti"] = json!("k1");
    rejects(
        &ts,
        &fresh(stranger.sign(Some("token-vault-req+jwt"), &c)),
        400,
        "invalid_grant",
    )
    .await;
    // A forged signature.
    rejects(
        &ts,
        &fresh(forge(
            json!({"alg": "RS256", "typ": "token-vault-req+jwt"}),
            claims.clone(),
            b"sig",
        )),
        400,
        "invalid_grant",
    )
    .await;
    // Embedded key.
    let h =
        json!({"alg": "RS256", "typ": "token-vault-req+jwt", "jwk": {"kty": "oct", "k": "AAAA"}});
    rejects(
        &ts,
        &fresh(forge(h, claims.clone(), b"sig")),
        400,
        "invalid_grant",
    )
    .await;

    // Claims: iat too old, in the future, missing, mistyped; exp passed; aud, iss, sub wrong;
    // jti and audit_context missing or too long.
    for overrides in [
        json!({"iat": now - 61}),
        json!({"iat": now + 30}),
        json!({"nbf": now + 30}),
        json!({"iat": null}),
        json!({"iat": (now).to_string()}),
        json!({"exp": now - 1}),
        json!({"aud": "https://elsewhere.example/"}),
        json!({"aud": format!("{}oauth/token", ts.issuer)}),
        json!({"aud": [ts.issuer, "https://elsewhere.example/"]}),
        json!({"iss": "agt_someone_else"}),
        json!({"sub": 42}),
        json!({"jti": null}),
        json!({"jti": ""}),
        json!({"audit_context": null}),
        json!({"audit_context": ""}),
        json!({"audit_context": "x".repeat(257)}),
    ] {
        rejects(
            &ts,
            &fresh(ts.subject(overrides.clone())),
            400,
            "invalid_grant",
        )
        .await;
    }
    // Unknown user.
    rejects(
        &ts,
        &fresh(ts.subject(json!({"sub": "usr_nobody"}))),
        400,
        "invalid_grant",
    )
    .await;

    // The boundaries that must pass: iat 59 s old, 9 s in the future.
    ts.post_form(&fresh(ts.subject(json!({"iat": ts.now() - 59}))))
        .await
        .token();
    ts.post_form(&fresh(ts.subject(json!({"iat": ts.now() + 9}))))
        .await
        .token();

    // A replayed subject jti (with a fresh client assertion) is refused.
    let subject = ts.subject(json!({}));
    ts.post_form(&fresh(subject.clone())).await.token();
    rejects(&ts, &fresh(subject), 400, "invalid_grant").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_copies_one_success() {
    let ts = std::sync::Arc::new(TestServer::start().await);
    ts.connect_demo_account().await;
    let params = ts.exchange_params();
    let releases = ts.releases().await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (ts, params) = (ts.clone(), params.clone());
        tasks.push(tokio::spawn(async move { ts.post_form(&params).await }));
    }
    let mut ok = 0;
    for t in tasks {
        let a = t.await.unwrap();
        if a.status == 200 {
            ok += 1;
        } else {
            // The client assertion's jti is consumed first: a copy is a replayed assertion.
            a.assert_error(401, "invalid_client");
        }
    }
    assert_eq!(ok, 1, "exactly one of 50 identical requests succeeds");
    assert_eq!(ts.releases().await, releases + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_policy_errors() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let good = ts.exchange_params();

    // Client authentication.
    rejects(
        &ts,
        &with(
            with(good.clone(), "client_assertion", None),
            "client_assertion_type",
            None,
        ),
        401,
        "invalid_client",
    )
    .await;
    for overrides in [
        json!({"aud": "https://elsewhere.example/"}),
        json!({"exp": ts.now() - 1}),
        json!({"exp": ts.now() + 3600}),
        json!({"sub": "agt_other"}),
        json!({"jti": null}),
    ] {
        let p = ts.params_with(ts.subject(json!({})), ts.assertion(overrides));
        rejects(&ts, &p, 401, "invalid_client").await;
    }
    rejects(
        &ts,
        &with(
            ts.exchange_params(),
            "client_assertion_type",
            Some("urn:other"),
        ),
        401,
        "invalid_client",
    )
    .await;
    rejects(
        &ts,
        &with(ts.exchange_params(), "client_id", Some("agt_other")),
        401,
        "invalid_client",
    )
    .await;
    // A subject token is never a client assertion.
    let p = ts.params_with(
        ts.subject(json!({})),
        ts.subject(json!({"sub": ts.info.agent_id})),
    );
    rejects(&ts, &p, 401, "invalid_client").await;
    // Two authentication methods at once.
    rejects(
        &ts,
        &with(ts.exchange_params(), "client_secret", Some("x")),
        400,
        "invalid_request",
    )
    .await;

    // Grant type and token types.
    rejects(
        &ts,
        &with(ts.exchange_params(), "grant_type", Some("password")),
        400,
        "unsupported_grant_type",
    )
    .await;
    rejects(
        &ts,
        &with(ts.exchange_params(), "grant_type", None),
        400,
        "invalid_request",
    )
    .await;
    rejects(
        &ts,
        &with(ts.exchange_params(), "requested_token_type", Some("urn:x")),
        400,
        "invalid_request",
    )
    .await;
    rejects(
        &ts,
        &with(ts.exchange_params(), "subject_token_type", Some("urn:x")),
        400,
        "invalid_request",
    )
    .await;
    rejects(
        &ts,
        &with(
            ts.exchange_params(),
            "audience",
            Some("https://api.example/"),
        ),
        400,
        "invalid_target",
    )
    .await;

    // Policy: no grant for the connection, unknown connection, scope outside the grant.
    let actor = latchkey_core::vault::Actor::cli();
    ts.vault
        .add_connection(
            latchkey_server::demo::demo_connection(&ts.vault, "other-git")
                .await
                .unwrap(),
            &actor,
        )
        .await
        .unwrap();
    rejects(
        &ts,
        &with(ts.exchange_params(), "connection", Some("other-git")),
        403,
        "unauthorized_client",
    )
    .await;
    rejects(
        &ts,
        &with(ts.exchange_params(), "connection", Some("no-such")),
        400,
        "invalid_request",
    )
    .await;
    rejects(
        &ts,
        &with(ts.exchange_params(), "scope", Some("repo:write")),
        400,
        "invalid_scope",
    )
    .await;
    rejects(
        &ts,
        &with(ts.exchange_params(), "scope", Some("repo:read admin")),
        400,
        "invalid_scope",
    )
    .await;
    // An IP allow-list that excludes 127.0.0.1.
    ts.vault
        .grant(
            &ts.info.agent_id,
            "demo-git",
            latchkey_core::scope::Scopes::parse("repo:read"),
            vec!["10.0.0.0/8".into()],
            &actor,
        )
        .await
        .unwrap();
    rejects(&ts, &ts.exchange_params(), 403, "unauthorized_client").await;
    ts.vault
        .grant(
            &ts.info.agent_id,
            "demo-git",
            latchkey_core::scope::Scopes::parse("repo:read"),
            vec!["127.0.0.1/32".into()],
            &actor,
        )
        .await
        .unwrap();
    assert_eq!(
        ts.post_form(&ts.exchange_params()).await.body["scope"],
        "repo:read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);
    let check = |a: Answer, status: u16, code: &str| a.assert_error(status, code);

    // Missing each required parameter, as form and as JSON.
    for missing in [
        "grant_type",
        "subject_token",
        "subject_token_type",
        "requested_token_type",
        "connection",
    ] {
        let p = with(ts.exchange_params(), missing, None);
        check(ts.post_form(&p).await, 400, "invalid_request");
        let body: serde_json::Map<String, Value> =
            p.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
        check(
            ts.post_json(&Value::Object(body)).await,
            400,
            "invalid_request",
        );
    }
    // Duplicated parameters, form and JSON.
    let mut dup = ts.exchange_params();
    dup.push(("connection".into(), "demo-git".into()));
    check(ts.post_form(&dup).await, 400, "invalid_request");
    let p = ts.exchange_params();
    let mut raw = String::from("{");
    for (k, v) in &p {
        raw.push_str(&format!("{}:{},", json!(k), json!(v)));
    }
    raw.push_str("\"connection\":\"demo-git\"}");
    check(
        ts.post_raw("application/json", raw.into_bytes()).await,
        400,
        "invalid_request",
    );
    // Oversized parameter and oversized body.
    check(
        ts.post_form(&with(
            ts.exchange_params(),
            "connection",
            Some(&"x".repeat(9000)),
        ))
        .await,
        400,
        "invalid_request",
    );
    let huge = format!("grant_type={}", "a".repeat(70 * 1024));
    check(
        ts.post_raw("application/x-www-form-urlencoded", huge.into_bytes())
            .await,
        413,
        "invalid_request",
    );
    // Garbage.
    for (ct, body) in [
        ("application/json", b"{not json".to_vec()),
        ("application/json", b"[1,2,3]".to_vec()),
        (
            "application/json",
            br#"{"grant_type": {"nested": true}}"#.to_vec(),
        ),
        ("application/json", b"\xff\xfe\x00".to_vec()),
        (
            "application/x-www-form-urlencoded",
            b"\xff\xfe=\x80".to_vec(),
        ),
        ("application/x-www-form-urlencoded", b"&&&===".to_vec()),
        ("text/plain", b"grant_type=x".to_vec()),
        ("", Vec::new()),
    ] {
        check(ts.post_raw(ct, body).await, 400, "invalid_request");
    }
    let many: Vec<(String, String)> = (0..40).map(|i| (format!("p{i}"), "v".into())).collect();
    check(ts.post_form(&many).await, 400, "invalid_request");
    // A malformed Basic header.
    let resp = ts
        .http
        .post(ts.url("/oauth/token"))
        .header("authorization", "Basic !!!")
        .form(&ts.exchange_params())
        .send()
        .await
        .unwrap();
    check(Answer::read(resp).await, 401, "invalid_client");

    assert_eq!(
        (ts.releases().await, ts.used_jtis().await),
        (releases, jtis),
        "nothing changed"
    );
    // And the server still works.
    ts.post_form(&ts.exchange_params()).await.token();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests() {
    let dir = tempfile::tempdir().unwrap();
    let config = latchkey_server::Config {
        data_dir: dir.path().join("data"),
        agent_requests_per_minute: 3,
        outbound_allow: loopback_allowed(),
        ..latchkey_server::Config::default()
    };
    let ts = TestServer::start_with(dir, config).await;
    ts.connect_demo_account().await;
    // Start at the beginning of a minute so the window cannot roll over mid-test.
    ts.clock.advance(60 - ts.now().rem_euclid(60));
    for _ in 0..3 {
        ts.post_form(&ts.exchange_params()).await.token();
    }
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);
    let a = ts.post_form(&ts.exchange_params()).await;
    a.assert_error(429, "too_many_requests");
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(
        (ts.releases().await, ts.used_jtis().await),
        (releases, jtis)
    );
    ts.clock.advance(60);
    ts.post_form(&ts.exchange_params()).await.token();
}
