//! End-to-end tests through the router, driven with `tower::ServiceExt::oneshot` and a
//! `ManualClock`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use latchkey_core::clock::ManualClock;
use latchkey_crypto::secrets::{random_token, sha256_b64};
use serde_json::Value;
use tower::ServiceExt;

use crate::{DemoConfig, DemoProvider, DemoStats};

const CLIENT_ID: &str = "latchkey-vault";
const CLIENT_SECRET: &str = "s3cret-for-tests";
const REDIRECT: &str = "https://vault.example/connect/callback";
const TTL: i64 = 300;

struct Harness {
    provider: DemoProvider,
    router: Router,
    clock: ManualClock,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    /// Query parameters of the `Location` header.
    fn location_params(&self) -> Vec<(String, String)> {
        let url = url::Url::parse(self.header(header::LOCATION)).expect("a Location URL");
        url.query_pairs().into_owned().collect()
    }
    fn location_param(&self, name: &str) -> Option<String> {
        self.location_params()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

struct Tokens {
    access: String,
    refresh: String,
}

fn basic() -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    )
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

fn pkce() -> (String, String) {
    let verifier = random_token(32);
    let challenge = sha256_b64(verifier.as_bytes());
    (verifier, challenge)
}

impl Harness {
    fn new() -> Self {
        let clock = ManualClock::default();
        let provider = DemoProvider::new(
            DemoConfig {
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                redirect_uris: vec![REDIRECT.into()],
                redirect_uri_pattern: None,
                access_token_ttl: TTL,
            },
            Arc::new(clock.clone()),
        );
        let router = provider.router();
        Self {
            provider,
            router,
            clock,
        }
    }

    async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body")
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, uri: &str, bearer: Option<&str>) -> Reply {
        let mut req = Request::builder().method(Method::GET).uri(uri);
        if let Some(t) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }

    async fn post_form(&self, uri: &str, auth: Option<&str>, body: String) -> Reply {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }

    async fn post_json(&self, uri: &str, bearer: &str, body: impl Into<Body>) -> Reply {
        let req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {bearer}"))
            .body(body.into())
            .unwrap();
        self.send(req).await
    }

    fn authorize_uri(&self, scope: &str, challenge: &str, state: &str) -> String {
        format!(
            "/oauth/authorize?{}",
            form(&[
                ("response_type", "code"),
                ("client_id", CLIENT_ID),
                ("redirect_uri", REDIRECT),
                ("scope", scope),
                ("state", state),
                ("code_challenge", challenge),
                ("code_challenge_method", "S256"),
            ])
        )
    }

    /// GET the consent page and pull out the consent ticket.
    async fn consent_ticket(&self, scope: &str, challenge: &str, state: &str) -> String {
        let page = self
            .get(&self.authorize_uri(scope, challenge, state), None)
            .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        let html = page.text();
        let marker = "name=\"consent\" value=\"";
        let start = html.find(marker).expect("consent field") + marker.len();
        let end = start + html[start..].find('"').expect("end quote");
        html[start..end].to_owned()
    }

    async fn decide(&self, ticket: &str, decision: &str) -> Reply {
        self.post_form(
            "/oauth/authorize",
            None,
            form(&[("consent", ticket), ("decision", decision)]),
        )
        .await
    }

    /// Authorize and approve; returns (code, verifier).
    async fn code(&self, scope: &str) -> (String, String) {
        let (verifier, challenge) = pkce();
        let ticket = self.consent_ticket(scope, &challenge, "xyz").await;
        let reply = self.decide(&ticket, "approve").await;
        assert_eq!(reply.status, StatusCode::FOUND);
        assert_eq!(reply.location_param("state").as_deref(), Some("xyz"));
        (reply.location_param("code").expect("code"), verifier)
    }

    async fn exchange(&self, code: &str, verifier: &str) -> Reply {
        self.post_form(
            "/oauth/token",
            Some(&basic()),
            form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", verifier),
            ]),
        )
        .await
    }

    async fn refresh(&self, refresh_token: &str, scope: Option<&str>) -> Reply {
        let mut pairs = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ];
        if let Some(s) = scope {
            pairs.push(("scope", s));
        }
        self.post_form("/oauth/token", Some(&basic()), form(&pairs))
            .await
    }

    async fn revoke(&self, token: &str) -> Reply {
        self.post_form("/oauth/revoke", Some(&basic()), form(&[("token", token)]))
            .await
    }

    async fn tokens(&self, scope: &str) -> Tokens {
        let (code, verifier) = self.code(scope).await;
        let reply = self.exchange(&code, &verifier).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        tokens_of(&reply)
    }
}

fn tokens_of(reply: &Reply) -> Tokens {
    let json = reply.json();
    Tokens {
        access: json["access_token"].as_str().expect("access_token").into(),
        refresh: json["refresh_token"]
            .as_str()
            .expect("refresh_token")
            .into(),
    }
}

fn assert_oauth_error(reply: &Reply, status: StatusCode, error: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.json()["error"], error, "{}", reply.text());
    assert!(reply.json()["error_description"].is_string());
    assert_eq!(reply.header(header::CONTENT_TYPE), "application/json");
    assert_eq!(reply.header(header::CACHE_CONTROL), "no-store");
}

const ALL: &str = "read:user repo:read repo:write issues:write";

// ---------------------------------------------------------------------------------------------
// Authorization endpoint

#[tokio::test]
async fn full_flow_with_pkce() {
    let h = Harness::new();
    let (verifier, challenge) = pkce();

    let page = h
        .get(
            &h.authorize_uri("read:user repo:read", &challenge, "st-1"),
            None,
        )
        .await;
    assert_eq!(page.status, StatusCode::OK);
    let html = page.text();
    assert!(
        html.contains("Authorize latchkey-vault to access octo-demo"),
        "{html}"
    );
    assert!(html.contains("<code>read:user</code>"));
    assert!(html.contains("<code>repo:read</code>"));
    assert!(!html.contains("issues:write"));
    assert!(!html.contains("<script"));
    assert!(html.contains("value=\"approve\"") && html.contains("value=\"deny\""));
    assert_eq!(page.header(header::X_FRAME_OPTIONS), "DENY");
    assert!(
        page.header(header::CONTENT_SECURITY_POLICY)
            .contains("frame-ancestors 'none'")
    );

    let ticket = h
        .consent_ticket("read:user repo:read", &challenge, "st-1")
        .await;
    let reply = h.decide(&ticket, "approve").await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert!(reply.header(header::LOCATION).starts_with(REDIRECT));
    assert_eq!(reply.location_param("state").as_deref(), Some("st-1"));
    let code = reply.location_param("code").expect("code");
    assert!(code.len() >= 22, "≥ 128 bits");

    let reply = h.exchange(&code, &verifier).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header(header::CACHE_CONTROL), "no-store");
    assert_eq!(reply.header(header::CONTENT_TYPE), "application/json");
    let json = reply.json();
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], TTL);
    assert_eq!(json["scope"], "read:user repo:read");
    let access = json["access_token"].as_str().unwrap();
    assert!(access.len() >= 43, "≥ 256 bits");
    assert!(json["refresh_token"].as_str().unwrap().len() >= 43);

    let me = h.get("/api/user", Some(access)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(
        me.json(),
        serde_json::json!({"login": "octo-demo", "id": "1001", "name": "Octo Demo"})
    );
    assert_eq!(
        h.provider.stats(),
        DemoStats {
            authorization_code_grants: 1,
            refresh_grants: 0,
            revocations: 0,
            api_calls: 1
        }
    );
}

#[tokio::test]
async fn works_when_nested_under_demo() {
    let h = Harness::new();
    let app = Router::new().nest("/demo", h.provider.router());
    let (_, challenge) = pkce();
    let uri = format!("/demo{}", h.authorize_uri("read:user", &challenge, "s"));
    let resp = app
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_client_or_redirect_is_an_error_page_not_a_redirect() {
    let h = Harness::new();
    let (_, challenge) = pkce();
    let good = h.authorize_uri("read:user", &challenge, "s");
    for (from, to) in [
        (CLIENT_ID, "someone-else"),
        (
            &*form(&[("redirect_uri", REDIRECT)]),
            "redirect_uri=https%3A%2F%2Fevil.example%2Fcb",
        ),
        (
            &*form(&[("redirect_uri", REDIRECT)]),
            "redirect_uri=https%3A%2F%2Fvault.example%2Fconnect%2Fcallback%2Fextra",
        ),
    ] {
        let uri = good.replacen(from, to, 1);
        assert_ne!(uri, good);
        let reply = h.get(&uri, None).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(reply.headers.get(header::LOCATION).is_none());
        assert!(reply.header(header::CONTENT_TYPE).starts_with("text/html"));
    }
    // Missing everything.
    let reply = h.get("/oauth/authorize", None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.headers.get(header::LOCATION).is_none());
}

#[tokio::test]
async fn invalid_requests_redirect_back_with_an_error() {
    let h = Harness::new();
    let (_, challenge) = pkce();
    let good = h.authorize_uri("read:user", &challenge, "s<1>");
    let cases = [
        (
            good.replace("scope=read%3Auser", "scope=read%3Auser+admin"),
            "invalid_scope",
        ),
        (good.replace("scope=read%3Auser", "scope="), "invalid_scope"),
        (
            good.replace("response_type=code", "response_type=token"),
            "unsupported_response_type",
        ),
        (
            good.replace("code_challenge_method=S256", "code_challenge_method=plain"),
            "invalid_request",
        ),
        (
            good.replace("&code_challenge_method=S256", ""),
            "invalid_request",
        ),
        (good.replace(&challenge, "too-short"), "invalid_request"),
        (format!("{good}&scope=repo%3Aread"), "invalid_request"),
    ];
    for (uri, error) in cases {
        assert_ne!(uri, good);
        let reply = h.get(&uri, None).await;
        assert_eq!(reply.status, StatusCode::FOUND, "{uri}");
        assert!(reply.header(header::LOCATION).starts_with(REDIRECT));
        assert_eq!(
            reply.location_param("error").as_deref(),
            Some(error),
            "{uri}"
        );
        assert_eq!(reply.location_param("state").as_deref(), Some("s<1>"));
        assert!(reply.location_param("code").is_none());
    }
}

#[tokio::test]
async fn deny_redirects_with_access_denied() {
    let h = Harness::new();
    let (_, challenge) = pkce();
    let ticket = h.consent_ticket("read:user", &challenge, "st").await;
    let reply = h.decide(&ticket, "deny").await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(
        reply.location_param("error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(reply.location_param("state").as_deref(), Some("st"));
    assert!(reply.location_param("code").is_none());
}

#[tokio::test]
async fn consent_tickets_are_single_use_and_expire() {
    let h = Harness::new();
    let (_, challenge) = pkce();
    let ticket = h.consent_ticket("read:user", &challenge, "st").await;
    assert_eq!(h.decide(&ticket, "approve").await.status, StatusCode::FOUND);
    let again = h.decide(&ticket, "approve").await;
    assert_eq!(again.status, StatusCode::BAD_REQUEST);
    assert!(again.headers.get(header::LOCATION).is_none());

    // A forged ticket, or a bad decision, is refused without redirecting.
    assert_eq!(
        h.decide("forged", "approve").await.status,
        StatusCode::BAD_REQUEST
    );
    let ticket = h.consent_ticket("read:user", &challenge, "st").await;
    assert_eq!(
        h.decide(&ticket, "maybe").await.status,
        StatusCode::BAD_REQUEST
    );
    // …and a bad decision does not burn the ticket, but time does.
    h.clock.advance(crate::state::CONSENT_TTL + 1);
    assert_eq!(
        h.decide(&ticket, "approve").await.status,
        StatusCode::BAD_REQUEST
    );
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

#[tokio::test]
async fn wrong_verifier_is_invalid_grant_and_burns_the_code() {
    let h = Harness::new();
    let (code, verifier) = h.code("read:user").await;
    let (other, _) = pkce();
    assert_oauth_error(
        &h.exchange(&code, &other).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
    assert_oauth_error(
        &h.exchange(&code, &verifier).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
}

#[tokio::test]
async fn redirect_uri_must_match() {
    let h = Harness::new();
    let (code, verifier) = h.code("read:user").await;
    let reply = h
        .post_form(
            "/oauth/token",
            Some(&basic()),
            form(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", "https://vault.example/other"),
                ("code_verifier", &verifier),
            ]),
        )
        .await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_grant");
}

#[tokio::test]
async fn code_reuse_revokes_the_tokens_issued_from_it() {
    let h = Harness::new();
    let (code, verifier) = h.code("read:user").await;
    let first = h.exchange(&code, &verifier).await;
    assert_eq!(first.status, StatusCode::OK);
    let t = tokens_of(&first);
    assert_eq!(
        h.get("/api/user", Some(&t.access)).await.status,
        StatusCode::OK
    );

    assert_oauth_error(
        &h.exchange(&code, &verifier).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
    assert_eq!(
        h.get("/api/user", Some(&t.access)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_oauth_error(
        &h.refresh(&t.refresh, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
    assert_eq!(h.provider.stats().authorization_code_grants, 2);
}

#[tokio::test]
async fn codes_expire_after_60_seconds() {
    let h = Harness::new();
    let (code, verifier) = h.code("read:user").await;
    h.clock.advance(61);
    assert_oauth_error(
        &h.exchange(&code, &verifier).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
}

#[tokio::test]
async fn client_authentication() {
    let h = Harness::new();
    let (code, verifier) = h.code("read:user").await;
    let body = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier.as_str()),
        ];
        pairs.extend_from_slice(extra);
        form(&pairs)
    };

    // No credentials, wrong secret (both styles), wrong client, malformed header.
    let wrong_basic = format!("Basic {}", STANDARD.encode(format!("{CLIENT_ID}:nope")));
    let attempts = [
        (None, body(&[])),
        (Some(wrong_basic.as_str()), body(&[])),
        (Some("Basic !!!"), body(&[])),
        (Some("Bearer abc"), body(&[])),
        (
            None,
            body(&[("client_id", CLIENT_ID), ("client_secret", "nope")]),
        ),
        (
            None,
            body(&[("client_id", "other"), ("client_secret", CLIENT_SECRET)]),
        ),
    ];
    for (auth, b) in attempts {
        let reply = h.post_form("/oauth/token", auth, b).await;
        assert_oauth_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
        assert!(reply.header(header::WWW_AUTHENTICATE).starts_with("Basic"));
    }
    // Two methods at once.
    let reply = h
        .post_form(
            "/oauth/token",
            Some(&basic()),
            body(&[("client_secret", CLIENT_SECRET)]),
        )
        .await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");

    // client_secret_post works (and the code was not burnt by the failed authentications).
    let reply = h
        .post_form(
            "/oauth/token",
            None,
            body(&[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)]),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn token_endpoint_rejects_malformed_requests() {
    let h = Harness::new();
    let cases = [
        (
            form(&[("grant_type", "client_credentials")]),
            "unsupported_grant_type",
        ),
        (
            form(&[("grant_type", "password")]),
            "unsupported_grant_type",
        ),
        (form(&[]), "invalid_request"),
        (
            form(&[("grant_type", "authorization_code")]),
            "invalid_request",
        ),
        (
            form(&[("grant_type", "authorization_code"), ("code", "x")]),
            "invalid_request",
        ),
        (form(&[("grant_type", "refresh_token")]), "invalid_request"),
        (
            form(&[
                ("grant_type", "refresh_token"),
                ("grant_type", "refresh_token"),
            ]),
            "invalid_request",
        ),
        ("%%%===&&&".to_owned(), "invalid_request"),
    ];
    for (body, error) in cases {
        let reply = h
            .post_form("/oauth/token", Some(&basic()), body.clone())
            .await;
        assert_oauth_error(&reply, StatusCode::BAD_REQUEST, error);
    }
    // Wrong content type.
    let req = Request::post("/oauth/token")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, basic())
        .body(Body::from("{\"grant_type\":\"refresh_token\"}"))
        .unwrap();
    assert_oauth_error(
        &h.send(req).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // Oversized body: refused, not a 5xx.
    let huge = format!(
        "grant_type=refresh_token&refresh_token={}",
        "a".repeat(1 << 20)
    );
    let reply = h.post_form("/oauth/token", Some(&basic()), huge).await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    // Unknown code / refresh token.
    let reply = h.exchange("no-such-code", &pkce().0).await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_grant");
    let reply = h.refresh("no-such-token", None).await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_grant");
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let h = Harness::new();
    let first = h.tokens(ALL).await;

    let reply = h.refresh(&first.refresh, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["scope"], ALL);
    assert_eq!(reply.json()["expires_in"], TTL);
    let second = tokens_of(&reply);
    assert_ne!(second.refresh, first.refresh);
    assert_ne!(second.access, first.access);
    assert_eq!(
        h.get("/api/user", Some(&second.access)).await.status,
        StatusCode::OK
    );
    // The previous access token stays valid until it expires (only the refresh token rotates).
    assert_eq!(
        h.get("/api/user", Some(&first.access)).await.status,
        StatusCode::OK
    );

    // Replay of the rotated refresh token: refused, and the whole family dies.
    assert_oauth_error(
        &h.refresh(&first.refresh, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
    assert_oauth_error(
        &h.refresh(&second.refresh, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
    assert_eq!(
        h.get("/api/user", Some(&second.access)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.get("/api/user", Some(&first.access)).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Every refresh request counts, valid or not.
    assert_eq!(h.provider.stats().refresh_grants, 3);

    // Other families are unaffected.
    let other = h.tokens(ALL).await;
    assert_eq!(h.refresh(&other.refresh, None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn refresh_may_narrow_but_not_widen_scope() {
    let h = Harness::new();
    let t = h.tokens("read:user repo:read").await;

    let reply = h.refresh(&t.refresh, Some("read:user issues:write")).await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
    let reply = h.refresh(&t.refresh, Some("admin")).await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");

    // A refused scope did not rotate the token away.
    let reply = h.refresh(&t.refresh, Some("read:user")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["scope"], "read:user");
    let narrowed = tokens_of(&reply);
    assert_eq!(
        h.get("/api/user", Some(&narrowed.access)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/api/repos", Some(&narrowed.access)).await.status,
        StatusCode::FORBIDDEN
    );

    // The refresh token still carries the original grant.
    let reply = h.refresh(&narrowed.refresh, None).await;
    assert_eq!(reply.json()["scope"], "read:user repo:read");
}

#[tokio::test]
async fn access_tokens_expire_with_the_clock() {
    let h = Harness::new();
    let t = h.tokens("read:user").await;
    h.clock.advance(TTL - 1);
    assert_eq!(
        h.get("/api/user", Some(&t.access)).await.status,
        StatusCode::OK
    );
    h.clock.advance(1);
    let reply = h.get("/api/user", Some(&t.access)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.header(header::WWW_AUTHENTICATE),
        "Bearer error=\"invalid_token\""
    );

    // Refresh tokens do not expire.
    h.clock.advance(30 * 24 * 3600);
    let reply = h.refresh(&t.refresh, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let fresh = tokens_of(&reply);
    assert_eq!(
        h.get("/api/user", Some(&fresh.access)).await.status,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// Revocation

#[tokio::test]
async fn revoking_an_access_token_revokes_only_that_token() {
    let h = Harness::new();
    let t = h.tokens("read:user").await;
    let reply = h.revoke(&t.access).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        h.get("/api/user", Some(&t.access)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let reply = h.refresh(&t.refresh, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let next = tokens_of(&reply);
    assert_eq!(
        h.get("/api/user", Some(&next.access)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn revoking_a_refresh_token_revokes_the_family() {
    let h = Harness::new();
    let first = h.tokens("read:user").await;
    let second = tokens_of(&h.refresh(&first.refresh, None).await);
    let reply = h
        .post_form(
            "/oauth/revoke",
            Some(&basic()),
            form(&[
                ("token", &second.refresh),
                ("token_type_hint", "refresh_token"),
            ]),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    for access in [&first.access, &second.access] {
        assert_eq!(
            h.get("/api/user", Some(access)).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_oauth_error(
        &h.refresh(&second.refresh, None).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    );
}

#[tokio::test]
async fn revocation_edge_cases() {
    let h = Harness::new();
    let t = h.tokens("read:user").await;
    // Unknown token: 200.
    assert_eq!(h.revoke("never-issued").await.status, StatusCode::OK);
    // No or bad client authentication: 401, nothing revoked.
    let reply = h
        .post_form("/oauth/revoke", None, form(&[("token", &t.access)]))
        .await;
    assert_oauth_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
    let wrong = format!("Basic {}", STANDARD.encode(format!("{CLIENT_ID}:wrong")));
    let reply = h
        .post_form("/oauth/revoke", Some(&wrong), form(&[("token", &t.access)]))
        .await;
    assert_oauth_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
    assert_eq!(
        h.get("/api/user", Some(&t.access)).await.status,
        StatusCode::OK
    );
    // Missing token.
    let reply = h
        .post_form("/oauth/revoke", Some(&basic()), form(&[]))
        .await;
    assert_oauth_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(h.provider.stats().revocations, 4);
}

// ---------------------------------------------------------------------------------------------
// API

#[tokio::test]
async fn api_requires_a_valid_bearer_token() {
    let h = Harness::new();
    for (uri, bearer) in [("/api/user", None), ("/api/repos", Some("garbage"))] {
        let reply = h.get(uri, bearer).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            reply.header(header::WWW_AUTHENTICATE),
            "Bearer error=\"invalid_token\""
        );
        assert!(reply.json()["message"].is_string());
    }
    let req = Request::get("/api/user")
        .header(header::AUTHORIZATION, "Basic Zm9vOmJhcg==")
        .body(Body::empty())
        .unwrap();
    assert_eq!(h.send(req).await.status, StatusCode::UNAUTHORIZED);
    let reply = h
        .post_json("/api/repos/hello-world/issues", "garbage", "{}")
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.provider.stats().api_calls, 4);
}

#[tokio::test]
async fn api_enforces_scopes() {
    let h = Harness::new();
    let t = h.tokens("read:user").await;
    let reply = h.get("/api/repos", Some(&t.access)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        reply.header(header::WWW_AUTHENTICATE),
        "Bearer error=\"insufficient_scope\", scope=\"repo:read\""
    );
    assert!(reply.json()["message"].is_string());
    let reply = h
        .post_json(
            "/api/repos/hello-world/issues",
            &t.access,
            r#"{"title":"x"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        reply.header(header::WWW_AUTHENTICATE),
        "Bearer error=\"insufficient_scope\", scope=\"issues:write\""
    );

    let t = h.tokens("repo:read").await;
    assert_eq!(
        h.get("/api/user", Some(&t.access)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.get("/api/repos", Some(&t.access)).await.status,
        StatusCode::OK
    );
    assert_eq!(h.provider.stats().api_calls, 4);
}

#[tokio::test]
async fn repos_issues_and_comments() {
    let h = Harness::new();
    let t = h.tokens(ALL).await;

    let repos = h.get("/api/repos", Some(&t.access)).await;
    assert_eq!(repos.status, StatusCode::OK);
    let repos = repos.json();
    let names: Vec<&str> = repos
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["description"].is_string() && r["private"].is_boolean());
            r["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(names, ["hello-world", "latchkey-notes"]);

    let issues = h
        .get("/api/repos/hello-world/issues", Some(&t.access))
        .await;
    assert_eq!(issues.status, StatusCode::OK);
    assert_eq!(issues.json(), serde_json::json!([]));
    let missing = h.get("/api/repos/nope/issues", Some(&t.access)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.json()["message"].is_string());

    let created = h
        .post_json(
            "/api/repos/hello-world/issues",
            &t.access,
            r#"{"title":"Token expired","body":"It said invalid_token"}"#,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert_eq!(
        created.json(),
        serde_json::json!({"number": 1, "title": "Token expired", "body": "It said invalid_token", "comments": []})
    );
    let second = h
        .post_json(
            "/api/repos/hello-world/issues",
            &t.access,
            r#"{"title":"No body"}"#,
        )
        .await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(second.json()["number"], 2);
    assert_eq!(second.json()["body"], Value::Null);

    let comment = h
        .post_json(
            "/api/repos/hello-world/issues/1/comments",
            &t.access,
            r#"{"body":"Refreshed fine"}"#,
        )
        .await;
    assert_eq!(comment.status, StatusCode::CREATED, "{}", comment.text());
    assert_eq!(comment.json()["body"], "Refreshed fine");

    let issues = h
        .get("/api/repos/hello-world/issues", Some(&t.access))
        .await;
    let list = issues.json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["comments"][0]["body"], "Refreshed fine");

    for uri in [
        "/api/repos/hello-world/issues/99/comments",
        "/api/repos/hello-world/issues/abc/comments",
        "/api/repos/nope/issues/1/comments",
    ] {
        let reply = h.post_json(uri, &t.access, r#"{"body":"x"}"#).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
    }
    let reply = h
        .post_json("/api/repos/nope/issues", &t.access, r#"{"title":"x"}"#)
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_api_input_is_4xx_never_5xx() {
    let h = Harness::new();
    let t = h.tokens(ALL).await;
    let long_title = format!(r#"{{"title":"{}"}}"#, "t".repeat(257));
    let big_body = format!(r#"{{"title":"ok","body":"{}"}}"#, "b".repeat(64 * 1024 + 1));
    for body in [
        "",
        "not json",
        "[]",
        r#"{"title":""}"#,
        r#"{"title":"   "}"#,
        r#"{"title":42}"#,
        r#"{"body":"no title"}"#,
        r#"{"title":"ok","body":7}"#,
        long_title.as_str(),
        big_body.as_str(),
    ] {
        let reply = h
            .post_json("/api/repos/hello-world/issues", &t.access, body.to_owned())
            .await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body:.40}");
        assert!(reply.json()["message"].is_string());
    }
    for body in ["{}", r#"{"body":""}"#, r#"{"body":null}"#] {
        let reply = h
            .post_json("/api/repos/hello-world/issues/1/comments", &t.access, body)
            .await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
    // Past the body cap: refused before parsing.
    let huge = format!(r#"{{"title":"ok","body":"{}"}}"#, "b".repeat(1 << 20));
    let reply = h
        .post_json("/api/repos/hello-world/issues", &t.access, huge)
        .await;
    assert!(reply.status.is_client_error(), "{}", reply.status);
    // Nothing was created.
    let issues = h
        .get("/api/repos/hello-world/issues", Some(&t.access))
        .await;
    assert_eq!(issues.json(), serde_json::json!([]));
}
