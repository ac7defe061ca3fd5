//! Latchkey as the OpenID provider of first-party apps, and the user-present exchanges that
//! build on it (a Latchkey refresh token or access token as the subject).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewClient};
use latchkey_crypto::jws::{PublicKey, TypRule, verify_jws};
use serde_json::{Value, json};

use crate::harness::*;

pub(crate) const REDIRECT: &str = "https://app.example/callback";

pub(crate) struct App {
    pub(crate) id: String,
    pub(crate) secret: String,
}

pub(crate) async fn app(ts: &TestServer, name: &str, new: NewClient) -> App {
    let (client, secret) = ts
        .vault
        .add_client(
            NewClient {
                name: name.into(),
                ..new
            },
            &Actor::cli(),
        )
        .await
        .unwrap();
    App {
        id: client.id,
        secret: secret
            .map(|s| secrecy::ExposeSecret::expose_secret(&s).to_owned())
            .unwrap_or_default(),
    }
}

pub(crate) fn confidential() -> NewClient {
    NewClient {
        with_secret: true,
        redirect_uris: vec![REDIRECT.into()],
        ..Default::default()
    }
}

pub(crate) struct Pkce {
    pub(crate) verifier: String,
    pub(crate) challenge: String,
}

pub(crate) fn pkce() -> Pkce {
    let verifier = latchkey_crypto::secrets::random_token(32);
    let challenge = latchkey_crypto::secrets::sha256_b64(verifier.as_bytes());
    Pkce {
        verifier,
        challenge,
    }
}

pub(crate) fn authorize_url(
    ts: &TestServer,
    client_id: &str,
    pkce: &Pkce,
    extra: &[(&str, &str)],
) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("response_type", "code")
        .append_pair("client_id", client_id)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", "openid offline_access")
        .append_pair("state", "st4te")
        .append_pair("nonce", "n0nce")
        .append_pair("code_challenge", &pkce.challenge)
        .append_pair("code_challenge_method", "S256");
    for (k, v) in extra {
        q.append_pair(k, v);
    }
    format!("{}authorize?{}", ts.issuer, q.finish())
}

fn query_of(location: &str) -> std::collections::HashMap<String, String> {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Sign in as the demo user if asked, and come back to the app with a code.
pub(crate) async fn sign_in_for_code(ts: &TestServer, url: &str) -> String {
    let (status, location, _) = ts.browse(url).await;
    let mut location = location.unwrap();
    if status == 303 && location.contains("/login?") {
        let (_, _, page) = ts.browse(&location).await;
        let csrf = hidden_field(&page, "csrf");
        let next = query_of(&location)["next"].clone();
        let (status, back, _) = ts
            .submit(
                "/login",
                &[
                    ("username", "demo"),
                    ("password", &ts.info.password),
                    ("csrf", &csrf),
                    ("next", &next),
                ],
            )
            .await;
        assert_eq!(status, 303);
        let (status, to, body) = ts.browse(&back.unwrap()).await;
        assert_eq!(status, 302, "{body}");
        location = to.unwrap();
    } else {
        assert_eq!(status, 302);
    }
    assert!(location.starts_with(REDIRECT), "{location}");
    let q = query_of(&location);
    assert_eq!(q.get("state").map(String::as_str), Some("st4te"));
    assert_eq!(q.get("iss"), Some(&ts.issuer), "RFC 9207 iss");
    q["code"].clone()
}

pub(crate) async fn token(ts: &TestServer, app: &App, form: &[(&str, &str)]) -> Answer {
    let resp = ts
        .http
        .post(ts.url("/oauth/token"))
        .basic_auth(&app.id, Some(&app.secret))
        .form(form)
        .send()
        .await
        .unwrap();
    Answer::read(resp).await
}

pub(crate) async fn code_grant(ts: &TestServer, app: &App, code: &str, verifier: &str) -> Answer {
    token(
        ts,
        app,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ],
    )
    .await
}

pub(crate) async fn userinfo(ts: &TestServer, access: &str) -> (u16, Value, Option<String>) {
    let resp = ts
        .http
        .get(ts.url("/userinfo"))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, resp.json().await.unwrap_or(Value::Null), challenge)
}

pub(crate) fn claims_unverified(jwt: &str) -> Value {
    serde_json::from_slice(&B64.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

async fn families(ts: &TestServer) -> i64 {
    let pool = ts.sql_pool().await;
    let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM token_families")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_code_refresh_userinfo_revoke() {
    let ts = TestServer::start().await;
    let app1 = app(&ts, "notes", confidential()).await;
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    let a = code_grant(&ts, &app1, &code, &p.verifier).await;
    assert_eq!(
        (a.status.as_u16(), a.body["token_type"].as_str()),
        (200, Some("Bearer"))
    );
    assert!(a.body["expires_in"].is_i64());
    let access = a.token().to_owned();
    let refresh = a.body["refresh_token"].as_str().unwrap().to_owned();

    // The ID token verifies with the published key and carries what the app asked for.
    let jwks: Value = ts
        .http
        .get(ts.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = [PublicKey::parse(&jwks["keys"][0].to_string(), None, None).unwrap()];
    let id = verify_jws(
        a.body["id_token"].as_str().unwrap(),
        TypRule::JwtOrAbsent,
        &keys,
    )
    .unwrap();
    assert_eq!(id.str("iss").unwrap(), ts.issuer);
    assert_eq!(id.str("aud").unwrap(), app1.id);
    assert_eq!(id.str("sub").unwrap(), ts.info.user_id);
    assert_eq!(id.str("nonce").unwrap(), "n0nce");
    assert_eq!(id.0["amr"], json!(["pwd"]));
    // The access token is an at+jwt for the issuer; /userinfo accepts it.
    let at = verify_jws(&access, TypRule::Exactly("at+jwt"), &keys).unwrap();
    assert_eq!(at.str("client_id").unwrap(), app1.id);
    let (status, info, _) = userinfo(&ts, &access).await;
    assert_eq!(
        (
            status,
            info["sub"].as_str(),
            info["preferred_username"].as_str()
        ),
        (200, Some(ts.info.user_id.as_str()), Some("demo"))
    );
    // An ID token is not an access token.
    let (status, _, challenge) = userinfo(&ts, a.body["id_token"].as_str().unwrap()).await;
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("invalid_token"));

    // Refresh: same scope, narrower scope, the My Account audience; not more.
    let r = token(
        &ts,
        &app1,
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await;
    assert!(
        r.body.get("refresh_token").is_none(),
        "no rotation unless the app asks for it"
    );
    assert_eq!(userinfo(&ts, r.token()).await.0, 200);
    let r = token(
        &ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("scope", "openid"),
        ],
    )
    .await;
    assert_eq!(r.body["scope"], "openid");
    token(
        &ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("scope", "openid admin"),
        ],
    )
    .await
    .assert_error(400, "invalid_scope");
    let me = format!("{}me/", ts.issuer);
    let r = token(
        &ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("audience", &me),
            ("scope", "create:me:connected_accounts"),
        ],
    )
    .await;
    let claims = claims_unverified(r.token());
    assert_eq!(
        (claims["aud"].as_str(), claims["scope"].as_str()),
        (Some(me.as_str()), Some("create:me:connected_accounts"))
    );
    assert!(r.body.get("id_token").is_none());
    // The sign-in's own scopes may ride along (auth0-server-python sends them); others not.
    let r = token(
        &ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("audience", &me),
            ("scope", "openid offline_access read:me:connected_accounts"),
        ],
    )
    .await;
    assert_eq!(
        r.body["scope"],
        "offline_access openid read:me:connected_accounts"
    );
    token(
        &ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("audience", &me),
            ("scope", "admin read:me:connected_accounts"),
        ],
    )
    .await
    .assert_error(400, "invalid_scope");
    token(
        &ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("audience", "https://evil.example/"),
        ],
    )
    .await
    .assert_error(400, "invalid_target");

    // Another client's refresh token is refused.
    let app2 = app(&ts, "other", confidential()).await;
    token(
        &ts,
        &app2,
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await
    .assert_error(400, "invalid_grant");
    // Revoking it at /oauth/revoke ends the whole sign-in: refresh and access tokens.
    let resp = ts
        .http
        .post(ts.url("/oauth/revoke"))
        .basic_auth(&app2.id, Some(&app2.secret))
        .form(&[("token", &refresh)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "another client's token: 200, and nothing happens"
    );
    assert_eq!(userinfo(&ts, &access).await.0, 200);
    let resp = ts
        .http
        .post(ts.url("/oauth/revoke"))
        .basic_auth(&app1.id, Some(&app1.secret))
        .form(&[("token", &refresh)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    token(
        &ts,
        &app1,
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
    )
    .await
    .assert_error(400, "invalid_grant");
    assert_eq!(userinfo(&ts, &access).await.0, 401);
    let resp = ts
        .http
        .post(ts.url("/oauth/revoke"))
        .basic_auth(&app1.id, Some(&app1.secret))
        .form(&[("token", "unknown")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "unknown tokens: 200");
    let resp = ts
        .http
        .post(ts.url("/oauth/revoke"))
        .basic_auth(&app1.id, Some("wrong"))
        .form(&[("token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reuse_revokes_the_family() {
    let ts = TestServer::start().await;
    let rotating = app(
        &ts,
        "rotating",
        NewClient {
            rotate_refresh_tokens: true,
            ..confidential()
        },
    )
    .await;
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &rotating.id, &p, &[])).await;
    let first = code_grant(&ts, &rotating, &code, &p.verifier).await;
    let rt1 = first.body["refresh_token"].as_str().unwrap().to_owned();
    let second = token(
        &ts,
        &rotating,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
    )
    .await;
    let rt2 = second.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt1, rt2);
    // The old one again: refused, and the family (rt2 included) dies with it.
    token(
        &ts,
        &rotating,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
    )
    .await
    .assert_error(400, "invalid_grant");
    token(
        &ts,
        &rotating,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
    )
    .await
    .assert_error(400, "invalid_grant");
    assert_eq!(userinfo(&ts, second.token()).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_and_code_bad_input() {
    let ts = TestServer::start().await;
    let app1 = app(&ts, "notes", confidential()).await;
    let p = pkce();
    // Sign in once so later requests have a session.
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;

    // Never redirect to an unregistered URI: case, trailing slash, extra query, other host.
    for bad in [
        "https://APP.example/callback",
        "https://app.example/Callback",
        "https://app.example/callback/",
        "https://app.example/callback?x=1",
        "https://app.example/callback#f",
        "http://app.example/callback",
        "https://evil.example/callback",
    ] {
        let url = authorize_url(&ts, &app1.id, &p, &[]).replace(
            &url::form_urlencoded::byte_serialize(REDIRECT.as_bytes()).collect::<String>(),
            &url::form_urlencoded::byte_serialize(bad.as_bytes()).collect::<String>(),
        );
        let (status, location, _) = ts.browse(&url).await;
        assert_eq!((status.as_u16(), location), (400, None), "{bad}");
    }
    let (status, location, _) = ts.browse(&authorize_url(&ts, "app_unknown", &p, &[])).await;
    assert_eq!((status.as_u16(), location), (400, None));

    // Errors the app can be told about go back to it, with state and iss.
    let error_of = |location: Option<String>| query_of(&location.unwrap())["error"].clone();
    let without_pkce = authorize_url(&ts, &app1.id, &p, &[])
        .replace(&format!("&code_challenge={}", p.challenge), "");
    assert_eq!(
        error_of(ts.browse(&without_pkce).await.1),
        "invalid_request"
    );
    let plain = authorize_url(&ts, &app1.id, &p, &[])
        .replace("code_challenge_method=S256", "code_challenge_method=plain");
    assert_eq!(error_of(ts.browse(&plain).await.1), "invalid_request");
    let implicit =
        authorize_url(&ts, &app1.id, &p, &[]).replace("response_type=code", "response_type=token");
    assert_eq!(
        error_of(ts.browse(&implicit).await.1),
        "unsupported_response_type"
    );
    let dup = format!("{}&state=again", authorize_url(&ts, &app1.id, &p, &[]));
    assert_eq!(
        ts.browse(&dup).await.0,
        400,
        "repeated parameters are refused"
    );

    let before = families(&ts).await;
    // PKCE verifier mismatch (the code is then spent).
    code_grant(&ts, &app1, &code, &pkce().verifier)
        .await
        .assert_error(400, "invalid_grant");
    // Wrong redirect_uri, and a missing verifier, on fresh codes.
    let c = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    token(
        &ts,
        &app1,
        &[
            ("grant_type", "authorization_code"),
            ("code", &c),
            ("redirect_uri", "https://app.example/other"),
            ("code_verifier", &p.verifier),
        ],
    )
    .await
    .assert_error(400, "invalid_grant");
    let c = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    token(
        &ts,
        &app1,
        &[
            ("grant_type", "authorization_code"),
            ("code", &c),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await
    .assert_error(400, "invalid_grant");
    // Expired.
    let c = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    ts.clock.advance(61);
    code_grant(&ts, &app1, &c, &p.verifier)
        .await
        .assert_error(400, "invalid_grant");
    // Another client's code.
    let app2 = app(&ts, "other", confidential()).await;
    let c = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    code_grant(&ts, &app2, &c, &p.verifier)
        .await
        .assert_error(400, "invalid_grant");
    assert_eq!(
        families(&ts).await,
        before,
        "no failed grant issued anything"
    );

    // A reused code: refused, and what its first use obtained is revoked.
    let c = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    let first = code_grant(&ts, &app1, &c, &p.verifier).await;
    assert_eq!(userinfo(&ts, first.token()).await.0, 200);
    code_grant(&ts, &app1, &c, &p.verifier)
        .await
        .assert_error(400, "invalid_grant");
    assert_eq!(userinfo(&ts, first.token()).await.0, 401);

    // prompt=none without a session: login_required, at the app.
    let fresh = TestServer::start().await;
    let app3 = app(&fresh, "notes", confidential()).await;
    let (status, location, _) = fresh
        .browse(&authorize_url(&fresh, &app3.id, &p, &[("prompt", "none")]))
        .await;
    assert_eq!(status, 302);
    assert_eq!(query_of(&location.unwrap())["error"], "login_required");
    // max_age=0 / prompt=login send a signed-in user back to sign in.
    let (status, location, _) = ts
        .browse(&authorize_url(&ts, &app1.id, &p, &[("prompt", "login")]))
        .await;
    assert_eq!(status, 303);
    assert!(location.unwrap().contains("/login?next="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_app_uses_pkce_alone() {
    let ts = TestServer::start().await;
    let spa = app(
        &ts,
        "spa",
        NewClient {
            public_client: true,
            redirect_uris: vec![REDIRECT.into()],
            ..Default::default()
        },
    )
    .await;
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &spa.id, &p, &[])).await;
    let resp = ts
        .http
        .post(ts.url("/oauth/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", &spa.id),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &p.verifier),
        ])
        .send()
        .await
        .unwrap();
    let a = Answer::read(resp).await;
    assert_eq!(userinfo(&ts, a.token()).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_present_exchanges() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let app1 = app(&ts, "notes", confidential()).await;
    ts.vault
        .grant(
            &app1.id,
            "demo-git",
            Scopes::parse("read:user repo:read"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    let signed_in = code_grant(&ts, &app1, &code, &p.verifier).await;
    let refresh = signed_in.body["refresh_token"].as_str().unwrap().to_owned();

    // The app exchanges the user's refresh token (JSON body, secret in the body: T3's shape).
    let exchange = |subject: &str, kind: &str, extra: Value| {
        let mut body = json!({
            "grant_type": GRANT, "client_id": app1.id, "client_secret": app1.secret,
            "subject_token_type": kind, "subject_token": subject,
            "requested_token_type": "http://auth0.com/oauth/token-type/federated-connection-access-token",
            "connection": "demo-git",
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let rt_type = "urn:ietf:params:oauth:token-type:refresh_token";
    let a = ts.post_json(&exchange(&refresh, rt_type, json!({}))).await;
    assert_eq!(a.body["scope"], "read:user repo:read");
    assert_eq!(ts.demo_api(a.token(), "user").await.0, 200);
    let audit = ts.vault.store().list_audit(3).await.unwrap();
    assert_eq!(
        (
            audit[0].record.action.as_str(),
            audit[0].record.actor_id.as_str()
        ),
        ("token.release", app1.id.as_str())
    );
    // login_hint: the account's upstream id selects it; an unknown one is 401.
    ts.post_json(&exchange(&refresh, rt_type, json!({"login_hint": "1001"})))
        .await
        .token();
    ts.post_json(&exchange(&refresh, rt_type, json!({"login_hint": "9999"})))
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");
    // Another client cannot use this refresh token; a revoked one is dead (T21).
    let app2 = app(&ts, "other", confidential()).await;
    ts.vault
        .grant(
            &app2.id,
            "demo-git",
            Scopes::parse("read:user"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    let mut foreign = exchange(&refresh, rt_type, json!({}));
    foreign["client_id"] = json!(app2.id);
    foreign["client_secret"] = json!(app2.secret);
    ts.post_json(&foreign)
        .await
        .assert_error(400, "invalid_grant");

    // An API registered as a resource server exchanges an access token issued for it.
    let api_id = "https://api.notes.example";
    let api = app(
        &ts,
        "notes-api",
        NewClient {
            with_secret: true,
            resource_server: Some(api_id.into()),
            ..Default::default()
        },
    )
    .await;
    ts.vault
        .grant(
            &api.id,
            "demo-git",
            Scopes::parse("repo:read"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    let code = sign_in_for_code(
        &ts,
        &authorize_url(&ts, &app1.id, &p, &[("audience", api_id)]),
    )
    .await;
    let for_api = code_grant(&ts, &app1, &code, &p.verifier).await;
    assert_eq!(claims_unverified(for_api.token())["aud"], api_id);
    let at_type = "urn:ietf:params:oauth:token-type:access_token";
    let mut by_api = exchange(for_api.token(), at_type, json!({}));
    by_api["client_id"] = json!(api.id);
    by_api["client_secret"] = json!(api.secret);
    let a = ts.post_json(&by_api).await;
    assert_eq!(ts.demo_api(a.token(), "repos").await.0, 200);
    // An access token for another audience is refused (T12).
    let mut wrong_aud = exchange(signed_in.token(), at_type, json!({}));
    wrong_aud["client_id"] = json!(api.id);
    wrong_aud["client_secret"] = json!(api.secret);
    ts.post_json(&wrong_aud)
        .await
        .assert_error(400, "invalid_grant");
    // A client that is no API may not exchange access tokens at all.
    ts.post_json(&exchange(for_api.token(), at_type, json!({})))
        .await
        .assert_error(403, "unauthorized_client");

    let resp = ts
        .http
        .post(ts.url("/oauth/revoke"))
        .basic_auth(&app1.id, Some(&app1.secret))
        .form(&[("token", &refresh)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    ts.post_json(&exchange(&refresh, rt_type, json!({})))
        .await
        .assert_error(400, "invalid_grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_rotate_with_overlap() {
    let ts = TestServer::start().await;
    let app1 = app(&ts, "notes", confidential()).await;
    let p = pkce();
    let jwks = || async {
        let v: Value = ts
            .http
            .get(ts.url("/.well-known/jwks.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let kid_of = |jwt: &str| -> String {
        let header: Value =
            serde_json::from_slice(&B64.decode(jwt.split('.').next().unwrap()).unwrap()).unwrap();
        header["kid"].as_str().unwrap().to_owned()
    };
    let before = code_grant(
        &ts,
        &app1,
        &sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await,
        &p.verifier,
    )
    .await;
    let old_kid = kid_of(before.token());
    assert_eq!(jwks().await, vec![old_kid.clone()]);

    // Rotate from the CLI while the server runs; the server reloads (it does so every minute).
    let out = ts.cli(&["key", "rotate", "--signing"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ts.vault.reload_signing_keys().await.unwrap();
    let keys = jwks().await;
    assert_eq!(keys.len(), 2, "the old key stays published");
    assert!(keys.contains(&old_kid));
    // Tokens signed before the rotation still verify; new ones use the new key.
    assert_eq!(userinfo(&ts, before.token()).await.0, 200);
    let after = code_grant(
        &ts,
        &app1,
        &sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await,
        &p.verifier,
    )
    .await;
    let new_kid = kid_of(after.token());
    assert_ne!(new_kid, old_kid);
    assert!(keys.contains(&new_kid));
    // A second rotation retires the first key: its tokens stop verifying.
    assert!(ts.cli(&["key", "rotate", "--signing"]).status.success());
    ts.vault.reload_signing_keys().await.unwrap();
    assert!(!jwks().await.contains(&old_kid));
    assert_eq!(userinfo(&ts, before.token()).await.0, 401);
    assert_eq!(userinfo(&ts, after.token()).await.0, 200);
    let audit = ts.vault.store().list_audit(50).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.record.action == "key.rotate_signing")
            .count(),
        2
    );
}
