//! A connected account's life against a provider that misbehaves on demand
//! ([`latchkey_testkit::MockUpstream`], registered as a generic `oauth2` connection over plain
//! HTTP on loopback): a refresh storm under strict rotation, every provider fault, a grant the
//! provider killed, and revocation. The mock shares the server's `ManualClock`, so moving it
//! expires the upstream tokens on both sides.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use latchkey_core::model::ConnectedAccount;
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewConnection, account_slot};
use latchkey_crypto::Algorithm;
use latchkey_crypto::keygen::{self, SigningKey};
use latchkey_server::Config;
use latchkey_testkit::{Behaviour, DEFAULT_ACCESS_TOKEN_TTL, MockUpstream};
use secrecy::ExposeSecret;
use serde_json::json;

use crate::harness::*;

const CONNECTION: &str = "mock";
const CLIENT_ID: &str = "latchkey-vault";
const CLIENT_SECRET: &str = "mock-client-secret-0123456789";

/// Storm size: rounds of (expire, 200 concurrent exchanges).
const STORM_ROUNDS: usize = 100;
const STORM_CONCURRENCY: usize = 200;

/// Start a mock provider on the server's clock, register it as connection `mock`, and grant the
/// demo agent `read` on it.
async fn with_mock(ts: TestServer) -> (Arc<TestServer>, MockUpstream) {
    let mock = MockUpstream::start(Arc::new(ts.clock.clone()), CLIENT_ID, CLIENT_SECRET).await;
    let base = mock.url();
    ts.vault
        .add_connection(
            NewConnection {
                name: CONNECTION.into(),
                provider: "oauth2".into(),
                client_id: CLIENT_ID.into(),
                client_secret: Some(CLIENT_SECRET.into()),
                authorize_url: format!("{base}authorize"),
                token_url: format!("{base}token"),
                revoke_url: Some(format!("{base}revoke")),
                userinfo_url: Some(format!("{base}userinfo")),
                api_base_url: None,
                issuer: None,
                scopes: Scopes::parse("read"),
                keep_alive_secs: None,
            },
            &Actor::cli(),
        )
        .await
        .unwrap();
    ts.vault
        .grant(
            &ts.info.agent_id,
            CONNECTION,
            Scopes::parse("read"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    (Arc::new(ts), mock)
}

/// Sign in as the demo user and connect `mock` through the real HTTP flow: Latchkey's login,
/// `/connect/mock` → the mock's `/authorize` → the callback. Returns the account id.
async fn connect(ts: &TestServer, mock: &MockUpstream) -> String {
    let next = format!("/connect/{CONNECTION}");
    let (status, _, page) = ts.browse(&format!("/login?next={next}")).await;
    assert_eq!(status, 200);
    let csrf = hidden_field(&page, "csrf");
    let (status, location, _) = ts
        .submit(
            "/login",
            &[
                ("username", &ts.info.username),
                ("password", &ts.info.password),
                ("csrf", &csrf),
                ("next", &next),
            ],
        )
        .await;
    assert_eq!(status, 303, "login redirects");
    let (status, location, body) = ts.browse(&location.unwrap()).await;
    assert_eq!(status, 303, "connect redirects to the provider: {body}");
    let authorize = location.unwrap();
    assert!(
        authorize.starts_with(&format!("{}authorize?", mock.url())),
        "{authorize}"
    );
    assert!(authorize.contains("code_challenge_method=S256"));
    let (status, location, body) = ts.browse(&authorize).await;
    assert_eq!(status, 302, "the mock approves at once: {body}");
    let callback = location.unwrap();
    assert!(
        callback.starts_with(&ts.url(&format!("/connect/{CONNECTION}/callback?"))),
        "{callback}"
    );
    let (status, location, body) = ts.browse(&callback).await;
    assert_eq!(status, 303, "callback completes: {body}");
    assert!(
        location
            .unwrap()
            .ends_with(&format!("/ui/accounts?connected={CONNECTION}"))
    );
    let conn = ts
        .vault
        .store()
        .connection_by_name(CONNECTION)
        .await
        .unwrap()
        .unwrap();
    let mine: Vec<ConnectedAccount> = ts
        .vault
        .store()
        .list_accounts(Some(&ts.info.user_id))
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.connection_id == conn.id)
        .collect();
    assert_eq!(mine.len(), 1, "reconnecting updates the one account");
    assert_eq!(mine[0].status.as_str(), "active");
    assert_eq!(mine[0].upstream_account_id.as_deref(), Some("mock-user"));
    mine[0].id.clone()
}

/// A privileged-worker exchange for connection `mock`.
fn mock_params(ts: &TestServer) -> Vec<(String, String)> {
    let mut params = ts.exchange_params();
    for (k, v) in &mut params {
        if k == "connection" {
            *v = CONNECTION.into();
        }
    }
    params
}

/// A second agent, with an ES256 key, for the storm: the test signs two JWTs per exchange on
/// the same two cores the server runs on, and a P-256 signature costs microseconds where the
/// demo agent's RSA-2048 one costs about a millisecond.
struct FastAgent {
    id: String,
    key: SigningKey,
}

impl FastAgent {
    async fn register(ts: &TestServer) -> Self {
        let generated = keygen::generate(Algorithm::ES256);
        let key = SigningKey::from_pem(&generated.private_pem, Algorithm::ES256, None).unwrap();
        let (agent, _) = ts
            .vault
            .add_agent(
                "storm-agent",
                std::slice::from_ref(&key.public),
                false,
                &Actor::cli(),
            )
            .await
            .unwrap();
        ts.vault
            .grant(
                &agent.id,
                CONNECTION,
                Scopes::parse("read"),
                vec![],
                &Actor::cli(),
            )
            .await
            .unwrap();
        Self { id: agent.id, key }
    }

    /// The same privileged-worker exchange as [`TestServer::exchange_params`], for `mock`.
    fn params(&self, ts: &TestServer) -> Vec<(String, String)> {
        let now = ts.now();
        let jti = || uuid::Uuid::new_v4().to_string();
        let subject = self.key.sign(
            Some("token-vault-req+jwt"),
            &json!({
                "iss": self.id, "sub": ts.info.user_id, "aud": ts.issuer, "iat": now,
                "exp": now + 60, "jti": jti(), "audit_context": "refresh storm",
            }),
        );
        let assertion = self.key.sign(
            None,
            &json!({"iss": self.id, "sub": self.id, "aud": ts.issuer, "iat": now, "exp": now + 60, "jti": jti()}),
        );
        [
            ("grant_type", GRANT.to_owned()),
            ("client_id", self.id.clone()),
            ("client_assertion_type", JWT_BEARER.to_owned()),
            ("client_assertion", assertion),
            ("subject_token_type", JWT_TYPE.to_owned()),
            ("subject_token", subject),
            ("requested_token_type", VAULT_TOKEN_TYPE.to_owned()),
            ("connection", CONNECTION.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

async fn stored(ts: &TestServer, id: &str) -> ConnectedAccount {
    ts.vault.store().account_by_id(id).await.unwrap().unwrap()
}

/// The stored upstream refresh token, opened.
async fn stored_refresh(ts: &TestServer, id: &str) -> Option<String> {
    let account = stored(ts, id).await;
    let blob = account.refresh_token.as_deref()?;
    let token = ts
        .vault
        .keys
        .open_string(account_slot(id, "refresh_token"), blob)
        .await
        .unwrap();
    Some(token.expose_secret().to_owned())
}

/// What a failed refresh must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    refresh_token: Option<Vec<u8>>,
    access_token: Option<Vec<u8>>,
    access_expires_at: Option<i64>,
    status: &'static str,
}

async fn snapshot(ts: &TestServer, id: &str) -> Snapshot {
    let a = stored(ts, id).await;
    Snapshot {
        refresh_token: a.refresh_token,
        access_token: a.access_token,
        access_expires_at: a.access_expires_at,
        status: a.status.as_str(),
    }
}

/// Move the shared clock past the upstream access token's expiry.
fn expire(ts: &TestServer) {
    ts.clock.advance(DEFAULT_ACCESS_TOKEN_TTL + 1);
}

/// Call the mock's API with an upstream access token.
async fn ping(ts: &TestServer, mock: &MockUpstream, token: &str) -> u16 {
    ts.http
        .get(format!("{}api/ping", mock.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn retry_after(a: &Answer) -> u64 {
    a.headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("503 without Retry-After: {:?}", a.body))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_storm_under_strict_rotation() {
    let (ts, mock) = with_mock(TestServer::start().await).await;
    let agent = Arc::new(FastAgent::register(&ts).await);
    let id = connect(&ts, &mock).await;
    let first = ts.post_form(&mock_params(&ts)).await;
    assert_eq!(ping(&ts, &mock, first.token()).await, 200);
    assert_eq!(
        mock.stats().refresh_calls,
        0,
        "the connect's token is fresh"
    );

    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for round in 0..STORM_ROUNDS {
        expire(&ts);
        let before = mock.stats();
        let round_started = Instant::now();
        let tasks: Vec<_> = (0..STORM_CONCURRENCY)
            .map(|_| {
                let (ts, agent) = (ts.clone(), agent.clone());
                tokio::spawn(async move {
                    let params = agent.params(&ts);
                    ts.post_form(&params).await
                })
            })
            .collect();
        let mut tokens = HashSet::new();
        for t in tasks {
            let a = t.await.unwrap();
            assert_eq!(a.status, 200, "round {round}: {:?}", a.body);
            tokens.insert(a.token().to_owned());
        }
        slowest = slowest.max(round_started.elapsed());
        let after = mock.stats();
        assert_eq!(
            after.refresh_calls - before.refresh_calls,
            1,
            "round {round}: exactly one upstream refresh"
        );
        assert_eq!(after.invalid_grants, 0, "round {round}: no invalid_grant");
        assert_eq!(
            tokens.len(),
            1,
            "round {round}: all got the refreshed token"
        );
        let issued = after.last_issued_refresh_token.clone();
        assert!(issued.is_some());
        assert_eq!(
            stored_refresh(&ts, &id).await,
            issued,
            "round {round}: the vault holds the provider's newest refresh token"
        );
        let token = tokens.into_iter().next().unwrap();
        assert_eq!(ping(&ts, &mock, &token).await, 200, "round {round}");
    }
    let stats = mock.stats();
    assert_eq!(stats.refresh_calls, STORM_ROUNDS as u32);
    assert!(
        stats.refresh_calls_per_token.values().all(|n| *n == 1),
        "no refresh token was presented twice"
    );
    assert_eq!(stored(&ts, &id).await.status.as_str(), "active");
    eprintln!(
        "refresh storm: {STORM_ROUNDS} rounds x {STORM_CONCURRENCY} exchanges in {:?} (slowest round {slowest:?})",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_faults_leave_the_stored_account_alone() {
    let (ts, mock) = with_mock(TestServer::start().await).await;

    // Transient failures and garbage: 503 + Retry-After, nothing stored changes.
    for b in [
        Behaviour::ServerError { status: 500 },
        Behaviour::ServerError { status: 502 },
        Behaviour::ServerError { status: 503 },
        Behaviour::RateLimited { retry_after: 42 },
        Behaviour::MalformedJson,
        Behaviour::OversizedJson,
    ] {
        mock.set(Behaviour::StrictRotation);
        let id = connect(&ts, &mock).await;
        let before = snapshot(&ts, &id).await;
        let calls = mock.stats().refresh_calls;
        mock.set(b);
        expire(&ts);
        let a = ts.post_form(&mock_params(&ts)).await;
        a.assert_error(503, "temporarily_unavailable");
        let wait = retry_after(&a);
        match b {
            Behaviour::RateLimited { retry_after } => {
                assert_eq!(wait, retry_after, "the provider's Retry-After is passed on")
            }
            _ => assert!(wait >= 1, "{b:?}"),
        }
        assert!(
            mock.stats().refresh_calls > calls,
            "{b:?}: the provider was asked"
        );
        assert_eq!(mock.stats().invalid_grants, 0, "{b:?}");
        assert_eq!(
            snapshot(&ts, &id).await,
            before,
            "{b:?}: the stored account is unchanged"
        );
    }

    // Answers that are odd but valid: 200, and the right refresh token kept.
    for b in [
        Behaviour::StrictRotation,
        Behaviour::GraceRotation { seconds: 60 },
        Behaviour::NonRotating,
        Behaviour::MissingRefreshToken,
        Behaviour::MissingExpiresIn,
        Behaviour::NonExpiring,
    ] {
        mock.set(Behaviour::StrictRotation);
        let id = connect(&ts, &mock).await;
        let old = stored_refresh(&ts, &id).await.unwrap();
        mock.set(b);
        expire(&ts);
        let calls = mock.stats().refresh_calls;
        let a = ts.post_form(&mock_params(&ts)).await;
        assert_eq!(a.status, 200, "{b:?}: {:?}", a.body);
        assert_eq!(mock.stats().refresh_calls, calls + 1, "{b:?}");
        let expires_in = a.body["expires_in"].as_i64();
        assert!(
            expires_in.is_some_and(|e| e > 0),
            "{b:?}: an integer expires_in: {:?}",
            a.body
        );
        assert_eq!(ping(&ts, &mock, a.token()).await, 200, "{b:?}");
        let now = stored_refresh(&ts, &id).await.unwrap();
        match b {
            Behaviour::StrictRotation
            | Behaviour::GraceRotation { .. }
            | Behaviour::MissingExpiresIn => {
                assert_ne!(now, old, "{b:?}: rotated");
                assert_eq!(
                    Some(&now),
                    mock.stats().last_issued_refresh_token.as_ref(),
                    "{b:?}"
                );
            }
            _ => assert_eq!(now, old, "{b:?}: the refresh token is kept"),
        }
        assert_eq!(stored(&ts, &id).await.status.as_str(), "active");
        if matches!(b, Behaviour::MissingExpiresIn | Behaviour::NonExpiring) {
            // An access token without a lifetime is not refreshed again.
            expire(&ts);
            let again = ts.post_form(&mock_params(&ts)).await;
            assert_eq!(again.token(), a.token(), "{b:?}");
            assert!(again.body["expires_in"].as_i64().is_some_and(|e| e > 0));
            assert_eq!(mock.stats().refresh_calls, calls + 1, "{b:?}");
        }
    }
    assert_eq!(mock.stats().invalid_grants, 0);

    // GitHub classic from the start: no refresh token, no expiry; exchanges need no refresh.
    mock.set(Behaviour::NonExpiring);
    let calls = mock.stats().refresh_calls;
    let id = connect(&ts, &mock).await;
    let a = ts.post_form(&mock_params(&ts)).await;
    assert!(a.body["expires_in"].as_i64().is_some_and(|e| e > 0));
    expire(&ts);
    let b = ts.post_form(&mock_params(&ts)).await;
    assert_eq!(a.token(), b.token());
    assert_eq!(ping(&ts, &mock, b.token()).await, 200);
    assert_eq!(mock.stats().refresh_calls, calls);
    assert_eq!(stored(&ts, &id).await.status.as_str(), "active");

    // The provider killed the grant: the user must reconnect.
    mock.set(Behaviour::StrictRotation);
    let id = connect(&ts, &mock).await;
    mock.revoke_all();
    expire(&ts);
    let a = ts.post_form(&mock_params(&ts)).await;
    a.assert_error(401, "federated_connection_refresh_token_not_found");
    assert_eq!(stored(&ts, &id).await.status.as_str(), "needs_reauth");
    let again = ts.post_form(&mock_params(&ts)).await;
    again.assert_error(401, "federated_connection_refresh_token_not_found");
    // Reconnecting brings the same account back.
    assert_eq!(connect(&ts, &mock).await, id);
    let a = ts.post_form(&mock_params(&ts)).await;
    assert_eq!(ping(&ts, &mock, a.token()).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_provider_meets_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        upstream_timeout_secs: 1,
        outbound_allow: loopback_allowed(),
        ..Config::default()
    };
    let (ts, mock) = with_mock(TestServer::start_with(dir, config).await).await;
    let id = connect(&ts, &mock).await;
    let before = snapshot(&ts, &id).await;
    mock.set(Behaviour::Slow { millis: 5_000 });
    expire(&ts);
    let started = Instant::now();
    let a = ts.post_form(&mock_params(&ts)).await;
    let took = started.elapsed();
    a.assert_error(503, "temporarily_unavailable");
    assert!(retry_after(&a) >= 1);
    assert!(
        took < Duration::from_secs(4),
        "answered within a few seconds of the 1 s deadline: {took:?}"
    );
    assert_eq!(
        mock.stats().refresh_calls,
        1,
        "a timed-out refresh is not re-sent"
    );
    assert_eq!(snapshot(&ts, &id).await, before, "nothing stored changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_stops_every_later_exchange() {
    let (ts, mock) = with_mock(TestServer::start().await).await;
    let id = connect(&ts, &mock).await;
    let a = ts.post_form(&mock_params(&ts)).await;
    let upstream_token = a.token().to_owned();
    assert_eq!(ping(&ts, &mock, &upstream_token).await, 200);

    let out = ts.cli(&["account", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stored(&ts, &id).await.status.as_str(), "revoked");
    assert_eq!(mock.stats().revocations, 1, "the provider was asked once");

    // 1,000 exchanges, 50 at a time: none succeeds.
    let workers: Vec<_> = (0..50)
        .map(|_| {
            let ts = ts.clone();
            tokio::spawn(async move {
                let mut refused = 0;
                for _ in 0..20 {
                    let a = ts.post_form(&mock_params(&ts)).await;
                    a.assert_error(401, "federated_connection_refresh_token_not_found");
                    refused += 1;
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for w in workers {
        refused += w.await.unwrap();
    }
    assert_eq!(refused, 1000);
    let stats = mock.stats();
    assert_eq!(stats.revocations, 1);
    assert_eq!(
        stats.refresh_calls, 0,
        "a revoked account is never refreshed"
    );
    // The provider dropped the grant, access token included.
    assert_eq!(ping(&ts, &mock, &upstream_token).await, 401);
}
