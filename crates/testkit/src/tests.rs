//! The mock itself, over real HTTP: the flows Latchkey relies on and each behaviour's answer.

use std::sync::Arc;

use latchkey_core::clock::ManualClock;
use latchkey_crypto::secrets::{random_token, sha256_b64};
use serde_json::Value;

use super::*;

const ID: &str = "client-1";
const SECRET: &str = "s3cret&+/=";
const REDIRECT: &str = "http://127.0.0.1:1/callback";

struct Fixture {
    mock: MockUpstream,
    clock: ManualClock,
    http: reqwest::Client,
}

impl Fixture {
    async fn new() -> Self {
        let clock = ManualClock::default();
        let mock = MockUpstream::start(Arc::new(clock.clone()), ID, SECRET).await;
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self { mock, clock, http }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.mock.url())
    }

    /// `/authorize` with PKCE; returns (code, verifier).
    async fn authorize(&self) -> (String, String) {
        let verifier = random_token(32);
        let challenge = sha256_b64(verifier.as_bytes());
        let url = url::Url::parse_with_params(
            &self.url("authorize"),
            [
                ("response_type", "code"),
                ("client_id", ID),
                ("redirect_uri", REDIRECT),
                ("scope", "read write"),
                ("state", "st-1"),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        )
        .unwrap();
        let resp = self.http.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 302);
        let location = resp.headers()["location"].to_str().unwrap();
        let url = url::Url::parse(location).unwrap();
        assert!(location.starts_with(REDIRECT), "{location}");
        let get = |k: &str| {
            url.query_pairs()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        assert_eq!(get("state").as_deref(), Some("st-1"));
        (get("code").unwrap(), verifier)
    }

    /// POST /token with Basic client authentication (form-encoded parts, as RFC 6749 says).
    async fn token(&self, form: &[(&str, &str)]) -> (u16, Option<String>, Value) {
        let enc =
            |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
        let resp = self
            .http
            .post(self.url("token"))
            .basic_auth(enc(ID), Some(enc(SECRET)))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = resp.text().await.unwrap();
        (
            status,
            retry,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn connect(&self) -> Value {
        let (code, verifier) = self.authorize().await;
        let (status, _, body) = self
            .token(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", &verifier),
            ])
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn refresh(&self, token: &str) -> (u16, Option<String>, Value) {
        self.token(&[("grant_type", "refresh_token"), ("refresh_token", token)])
            .await
    }

    async fn ping(&self, access: &str) -> u16 {
        self.http
            .get(self.url("api/ping"))
            .bearer_auth(access)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[tokio::test]
async fn code_grant_checks_pkce_redirect_and_single_use() {
    let f = Fixture::new().await;
    let (code, _) = f.authorize().await;
    let grant = |code: &str, redirect: &str, verifier: &str| {
        let (c, r, v) = (code.to_owned(), redirect.to_owned(), verifier.to_owned());
        let f = &f;
        async move {
            f.token(&[
                ("grant_type", "authorization_code"),
                ("code", &c),
                ("redirect_uri", &r),
                ("code_verifier", &v),
            ])
            .await
        }
    };
    let (status, _, body) = grant(&code, REDIRECT, "wrong-verifier").await;
    assert_eq!((status, s(&body, "error")), (400, "invalid_grant"));
    let (code, verifier) = f.authorize().await;
    let (status, _, body) = grant(&code, "http://127.0.0.1:1/other", &verifier).await;
    assert_eq!((status, s(&body, "error")), (400, "invalid_grant"));

    let (code, verifier) = f.authorize().await;
    let (status, _, body) = grant(&code, REDIRECT, &verifier).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s(&body, "scope"), "read write");
    assert_eq!(body["expires_in"], 300);
    let access = s(&body, "access_token").to_owned();
    assert_eq!(f.ping(&access).await, 200);
    // A second use fails and takes down what the first produced.
    let (status, _, _) = grant(&code, REDIRECT, &verifier).await;
    assert_eq!(status, 400);
    assert_eq!(f.ping(&access).await, 401);
    assert_eq!(f.mock.stats().invalid_grants, 3);
    assert_eq!(f.mock.stats().code_grants, 1);

    // Authorization without PKCE is sent back with an error; unknown clients are not redirected.
    let url = url::Url::parse_with_params(
        &f.url("authorize"),
        [
            ("response_type", "code"),
            ("client_id", ID),
            ("redirect_uri", REDIRECT),
        ],
    )
    .unwrap();
    let resp = f.http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 302);
    assert!(
        resp.headers()["location"]
            .to_str()
            .unwrap()
            .contains("error=invalid_request")
    );
    let resp = f
        .http
        .get(f.url("authorize?client_id=nope&redirect_uri=http://x/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn client_authentication_is_required() {
    let f = Fixture::new().await;
    let resp = f
        .http
        .post(f.url("token"))
        .basic_auth(ID, Some("wrong"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    // In the body works too.
    let resp = f
        .http
        .post(f.url("token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", "x"),
            ("client_id", ID),
            ("client_secret", SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "authenticated, unknown refresh token");
    let resp = f
        .http
        .post(f.url("token"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn strict_rotation_detects_reuse() {
    let f = Fixture::new().await;
    let first = f.connect().await;
    let r1 = s(&first, "refresh_token").to_owned();
    let (status, _, second) = f.refresh(&r1).await;
    assert_eq!(status, 200);
    let r2 = s(&second, "refresh_token").to_owned();
    assert_ne!(r1, r2);
    assert_eq!(
        f.mock.stats().last_issued_refresh_token.as_deref(),
        Some(r2.as_str())
    );
    // Reusing r1 is refused and revokes the family: r2 and its access token die too.
    let (status, _, body) = f.refresh(&r1).await;
    assert_eq!((status, s(&body, "error")), (400, "invalid_grant"));
    assert_eq!(f.refresh(&r2).await.0, 400);
    assert_eq!(f.ping(s(&second, "access_token")).await, 401);
    let stats = f.mock.stats();
    assert_eq!(stats.refresh_calls, 3);
    assert_eq!(stats.invalid_grants, 2);
    assert_eq!(stats.refresh_calls_per_token[&sha256_b64(r1.as_bytes())], 2);
}

#[tokio::test]
async fn grace_rotation_and_non_rotating() {
    let f = Fixture::new().await;
    f.mock.set(Behaviour::GraceRotation { seconds: 30 });
    let r1 = s(&f.connect().await, "refresh_token").to_owned();
    let (_, _, a) = f.refresh(&r1).await;
    let r2 = s(&a, "refresh_token").to_owned();
    let (status, _, again) = f.refresh(&r1).await;
    assert_eq!(status, 200, "within the grace period");
    assert_eq!(s(&again, "refresh_token"), r2, "answers the current token");
    f.clock.advance(31);
    assert_eq!(f.refresh(&r1).await.0, 400, "after the grace period");

    f.mock.set(Behaviour::NonRotating);
    let r = s(&f.connect().await, "refresh_token").to_owned();
    for _ in 0..3 {
        let (status, _, body) = f.refresh(&r).await;
        assert_eq!((status, s(&body, "refresh_token")), (200, r.as_str()));
    }
}

#[tokio::test]
async fn access_tokens_expire_on_the_clock() {
    let f = Fixture::new().await;
    f.mock.set_access_token_ttl(60);
    let body = f.connect().await;
    assert_eq!(body["expires_in"], 60);
    let access = s(&body, "access_token");
    assert_eq!(f.ping(access).await, 200);
    let info: Value = f
        .http
        .get(f.url("userinfo"))
        .bearer_auth(access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["sub"], MOCK_SUBJECT);
    f.clock.advance(60);
    assert_eq!(f.ping(access).await, 401);
    assert_eq!(f.ping("made-up").await, 401);

    f.mock.set(Behaviour::NonExpiring);
    let body = f.connect().await;
    assert!(body.get("expires_in").is_none() && body.get("refresh_token").is_none());
    f.clock.advance(10 * 365 * 86400);
    assert_eq!(f.ping(s(&body, "access_token")).await, 200);
}

#[tokio::test]
async fn fault_behaviours_apply_to_the_refresh_grant_only() {
    let f = Fixture::new().await;
    let cases = [
        Behaviour::ServerError { status: 502 },
        Behaviour::RateLimited { retry_after: 17 },
        Behaviour::MalformedJson,
        Behaviour::OversizedJson,
        Behaviour::MissingRefreshToken,
        Behaviour::MissingExpiresIn,
        Behaviour::Slow { millis: 50 },
    ];
    for b in cases {
        f.mock.set(b);
        let r = s(&f.connect().await, "refresh_token").to_owned();
        let (status, retry, body) = f.refresh(&r).await;
        match b {
            Behaviour::ServerError { status: st } => {
                assert_eq!((status, s(&body, "error")), (st, "server_error"));
            }
            Behaviour::RateLimited { retry_after } => {
                assert_eq!(status, 429);
                assert_eq!(retry, Some(retry_after.to_string()));
            }
            Behaviour::MalformedJson => {
                assert_eq!((status, body), (200, Value::String("{not json".into())));
            }
            Behaviour::OversizedJson => {
                assert_eq!(status, 200);
                assert!(body.to_string().len() > 1024 * 1024);
            }
            Behaviour::MissingRefreshToken => {
                assert_eq!(status, 200);
                assert!(body.get("refresh_token").is_none());
                assert!(body["expires_in"].is_i64());
                assert_eq!(f.refresh(&r).await.0, 200, "the old one still works");
            }
            Behaviour::MissingExpiresIn => {
                assert_eq!(status, 200);
                assert!(body.get("expires_in").is_none());
                assert!(body["refresh_token"].is_string());
            }
            Behaviour::Slow { .. } => assert_eq!(status, 200),
            _ => unreachable!(),
        }
    }
}

#[tokio::test]
async fn revocation_kills_the_family() {
    let f = Fixture::new().await;
    let body = f.connect().await;
    let (access, refresh) = (s(&body, "access_token"), s(&body, "refresh_token"));
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let revoke = |token: &str| {
        f.http
            .post(f.url("revoke"))
            .basic_auth(enc(ID), Some(enc(SECRET)))
            .form(&[("token", token), ("token_type_hint", "refresh_token")])
            .send()
    };
    assert_eq!(revoke("unknown").await.unwrap().status(), 200);
    assert_eq!(f.mock.stats().revocations, 0);
    assert_eq!(revoke(refresh).await.unwrap().status(), 200);
    assert_eq!(f.mock.stats().revocations, 1);
    assert_eq!(f.ping(access).await, 401);
    assert_eq!(f.refresh(refresh).await.0, 400);

    let body = f.connect().await;
    f.mock.revoke_all();
    assert_eq!(f.refresh(s(&body, "refresh_token")).await.0, 400);
    assert_eq!(f.mock.stats().revocations, 1);
}

#[tokio::test]
async fn rotate_then_slow_rotates_before_answering_and_the_rotation_stands() {
    let f = Fixture::new().await;
    f.mock.set(Behaviour::RotateThenSlow { millis: 200 });

    // A patient client gets the new pair, no sooner than the sleep.
    let r1 = s(&f.connect().await, "refresh_token").to_owned();
    let started = std::time::Instant::now();
    let (status, _, body) = f.refresh(&r1).await;
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    let r2 = s(&body, "refresh_token").to_owned();
    assert_ne!(r1, r2);
    assert_eq!(f.ping(s(&body, "access_token")).await, 200);

    // A client that gives up during the sleep never sees the new pair, but the provider acted:
    // the token it presented is dead and its replacement is live.
    f.mock.set(Behaviour::RotateThenSlow { millis: 30_000 });
    let request = f
        .http
        .post(f.url("token"))
        .basic_auth(ID, Some(SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &r2)])
        .send();
    let client = tokio::spawn(request);
    // Wait until the provider has acted, then drop the request (the connection closes).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r3 = loop {
        let issued = f.mock.stats().last_issued_refresh_token.unwrap();
        if issued != r2 {
            break issued;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mock never rotated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert!(!client.is_finished(), "no answer before the sleep ends");
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    assert_eq!(f.mock.stats().refresh_calls, 2);

    f.mock.set(Behaviour::StrictRotation);
    let (status, _, fresh) = f.refresh(&r3).await;
    assert_eq!(status, 200, "the unseen replacement works: {fresh}");
    let access = s(&fresh, "access_token");
    assert_eq!(f.ping(access).await, 200);
    assert_eq!(f.mock.stats().reused_refresh_tokens, 0);
    // A vault that lost the answer presents its old token: reuse, the family is revoked.
    let (status, _, body) = f.refresh(&r2).await;
    assert_eq!((status, s(&body, "error")), (400, "invalid_grant"));
    assert_eq!(f.mock.stats().reused_refresh_tokens, 1);
    assert_eq!(f.ping(access).await, 401);
}
