//! The SDK against a real Latchkey: a demo-mode server on `127.0.0.1:0` over HTTPS with a
//! fresh data directory, its demo provider and a movable clock that the SDK shares (so moving
//! it moves both). What is counted is counted at the server: `token.release` and
//! `agent.token` entries of the audit trail (written in the release's own transaction) and
//! consumed `jti`s.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use latchkey_client::{Client, ClientBuilder, Error, TokenRequest};
use latchkey_core::Vault;
use latchkey_core::clock::{Clock, ManualClock};
use latchkey_core::policy::{GrantPolicy, Quotas, Risk};
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, ApprovalDecision, Decider};
use latchkey_server::demo::{DEMO_GRANT, DemoInfo};
use latchkey_server::{Config, ServeOptions};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;
use tokio::sync::oneshot;

// --- a server ---------------------------------------------------------------------------

struct TestServer {
    _dir: tempfile::TempDir,
    config: Config,
    issuer: String,
    ca_pem: Vec<u8>,
    http: reqwest::Client,
    clock: ManualClock,
    vault: Arc<Vault>,
    info: DemoInfo,
    cookies: Mutex<HashMap<String, String>>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The server's clock, for the SDK: both read the same moved time.
#[derive(Clone)]
struct SharedClock(ManualClock);

impl latchkey_client::Clock for SharedClock {
    fn now(&self) -> i64 {
        self.0.now()
    }
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".into(),
            ..Config::default()
        };
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let clock = ManualClock::default();
        let server = latchkey_server::Server::with_listener(
            &config,
            listener,
            ServeOptions {
                demo: true,
                clock: Arc::new(clock.clone()),
            },
        )
        .await
        .expect("server starts");
        let info = latchkey_server::demo::seed(&server.vault, &config.data_dir)
            .await
            .unwrap();
        let ca_path = server
            .ca_path
            .clone()
            .unwrap_or_else(|| config.data_dir.join("tls").join("ca.pem"));
        let ca_pem = std::fs::read(&ca_path).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca_pem).unwrap()])
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let (issuer, vault) = (server.issuer.clone(), server.vault.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            _dir: dir,
            config,
            issuer,
            ca_pem,
            http,
            clock,
            vault,
            info,
            cookies: Mutex::new(HashMap::new()),
            shutdown: Some(tx),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.issuer, path.trim_start_matches('/'))
    }

    /// An SDK client for the demo agent (its RS256 key from the file the demo wrote, the CA as
    /// PEM bytes), on the server's clock.
    fn client(&self) -> ClientBuilder {
        Client::builder()
            .issuer(&self.issuer)
            .ca_cert_pem(&self.ca_pem)
            .client_id(&self.info.agent_id)
            .private_key_file(&self.info.agent_key)
            .audit_context("sdk test")
            .clock(SharedClock(self.clock.clone()))
    }

    async fn audit_count(&self, action: &str) -> usize {
        self.vault
            .store()
            .list_audit(100_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.record.action == action)
            .count()
    }

    /// Upstream tokens released by exchanges (and approvals redeemed).
    async fn releases(&self) -> usize {
        self.audit_count("token.release").await
    }

    async fn sql(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!(
            "sqlite://{}",
            self.config.data_dir.join("latchkey.db").display()
        ))
        .await
        .unwrap()
    }

    async fn used_jtis(&self) -> i64 {
        let pool = self.sql().await;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_jtis")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    }

    /// Replace the demo agent's grant on `demo-git` (the demo's scopes) with this policy.
    async fn set_policy(&self, policy: GrantPolicy) {
        self.vault
            .grant_with_policy(
                &self.info.agent_id,
                "demo-git",
                Scopes::parse(DEMO_GRANT),
                vec![],
                policy,
                &Actor::cli(),
            )
            .await
            .unwrap();
    }

    async fn decide(&self, approval_id: &str, decision: ApprovalDecision) {
        self.vault
            .decide_approval(
                approval_id,
                decision,
                None,
                Decider::Operator(&Actor::cli()),
            )
            .await
            .unwrap();
    }

    async fn demo_api(&self, token: &str, path: &str) -> StatusCode {
        self.http
            .get(self.url(&format!("/demo/api/{path}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
    }

    // --- a browser: the demo user connects demo-git -------------------------------------

    fn cookie_header(&self) -> String {
        let jar = self.cookies.lock().unwrap();
        jar.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep_cookies(&self, headers: &HeaderMap) {
        let mut jar = self.cookies.lock().unwrap();
        for v in headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") {
                jar.remove(name);
            } else {
                jar.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    async fn browse(&self, req: reqwest::RequestBuilder) -> (StatusCode, Option<String>, String) {
        let resp = req
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.keep_cookies(resp.headers());
        let status = resp.status();
        let location = resp.headers().get("location").map(|l| {
            let l = l.to_str().unwrap();
            if l.starts_with('/') {
                self.url(l)
            } else {
                l.to_owned()
            }
        });
        (status, location, resp.text().await.unwrap())
    }

    async fn get(&self, url: &str) -> (StatusCode, Option<String>, String) {
        self.browse(self.http.get(url)).await
    }

    async fn post(&self, url: &str, form: &[(&str, &str)]) -> (StatusCode, Option<String>, String) {
        self.browse(self.http.post(self.url(url)).form(form)).await
    }

    /// Sign in as the demo user and connect `demo-git` through the real flow: Latchkey's
    /// login, the demo provider's consent page, the callback.
    async fn connect_demo_account(&self) {
        let (_, _, page) = self.get(&self.url("/login?next=/connect/demo-git")).await;
        let csrf = hidden_field(&page, "csrf");
        let (status, location, _) = self
            .post(
                "/login",
                &[
                    ("username", &self.info.username),
                    ("password", &self.info.password),
                    ("csrf", &csrf),
                    ("next", "/connect/demo-git"),
                ],
            )
            .await;
        assert_eq!(status, 303, "login");
        let (_, authorize, _) = self.get(&location.unwrap()).await;
        let (_, _, consent_page) = self.get(&authorize.unwrap()).await;
        let consent = hidden_field(&consent_page, "consent");
        let (status, callback, _) = self
            .post(
                "/demo/oauth/authorize",
                &[("consent", &consent), ("decision", "approve")],
            )
            .await;
        assert_eq!(status, 302, "consent");
        let (status, _, body) = self.get(&callback.unwrap()).await;
        assert_eq!(status, 303, "callback: {body}");
    }
}

fn hidden_field(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no field {name} in {html}"))
        + marker.len();
    html[start..].split('"').next().unwrap().to_owned()
}

fn medium_risk(scope: &str) -> GrantPolicy {
    GrantPolicy {
        risk: BTreeMap::from([(scope.to_owned(), Risk::Medium)]),
        ..GrantPolicy::default()
    }
}

// --- the cache --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_serves_repeats_until_the_margin() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let client = ts
        .client()
        .cache_margin(Duration::from_secs(60))
        .build()
        .unwrap();
    let user = &ts.info.user_id;
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);

    let first = client.token("demo-git", user).await.unwrap();
    assert_eq!(ts.demo_api(first.secret(), "user").await, 200);
    assert_eq!(first.scope(), "issues:write read:user repo:read");
    assert!((290..=300).contains(&first.expires_in()), "{first:?}");
    assert_eq!(ts.releases().await, releases + 1);
    // One exchange consumes two jtis: the subject JWT's and the client assertion's.
    assert_eq!(ts.used_jtis().await, jtis + 2);

    // Repeats: not one request reaches the server.
    for _ in 0..20 {
        let again = client.token("demo-git", user).await.unwrap();
        assert_eq!(again.secret(), first.secret());
    }
    assert_eq!(ts.releases().await, releases + 1);
    assert_eq!(ts.used_jtis().await, jtis + 2);

    // Two seconds before the margin: still from the cache.
    let fresh_until = first.expires_at() - 60;
    ts.clock.advance(fresh_until - ts.clock.now() - 2);
    client.token("demo-git", user).await.unwrap();
    assert_eq!(ts.releases().await, releases + 1, "inside the margin");

    // Past it: exchanged again. The server still holds the same upstream token (it refreshes
    // 30 s before expiry), now with under a minute to live — less than the margin, so it is
    // handed out but not served from the cache.
    ts.clock.advance(3);
    let late = client.token("demo-git", user).await.unwrap();
    assert_eq!(ts.releases().await, releases + 2, "past the margin");
    assert_eq!(late.secret(), first.secret());
    assert!(late.expires_in() <= 60, "{late:?}");
    client.token("demo-git", user).await.unwrap();
    assert_eq!(ts.releases().await, releases + 3, "short-lived: not cached");

    // The server refreshes upstream: a new token with its full life, cached again.
    ts.clock.advance(35);
    let renewed = client.token("demo-git", user).await.unwrap();
    assert_ne!(renewed.secret(), first.secret());
    assert!(renewed.expires_in() > 250, "{renewed:?}");
    assert_eq!(ts.demo_api(renewed.secret(), "user").await, 200);
    let count = ts.releases().await;
    for _ in 0..5 {
        client.token("demo-git", user).await.unwrap();
    }
    assert_eq!(ts.releases().await, count);

    // Scopes are part of the key, as a set.
    let narrow = client
        .token_for(&TokenRequest::new("demo-git", user).scope("repo:read"))
        .await
        .unwrap();
    assert_eq!(narrow.scope(), "repo:read");
    assert_eq!(ts.demo_api(narrow.secret(), "user").await, 403, "narrowed");
    assert_eq!(ts.releases().await, count + 1);
    let same = client
        .token_for(&TokenRequest::new("demo-git", user).scope(" repo:read "))
        .await
        .unwrap();
    assert_eq!(same.secret(), narrow.secret());
    assert_eq!(ts.releases().await, count + 1);

    // Forgetting a token makes the next call exchange.
    client.forget_token(&TokenRequest::new("demo-git", user));
    client.token("demo-git", user).await.unwrap();
    assert_eq!(ts.releases().await, count + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_calls_make_one_exchange() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let client = ts.client().build().unwrap();
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);
    let user = ts.info.user_id.clone();
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let (client, user) = (client.clone(), user.clone());
            tokio::spawn(async move { client.token("demo-git", &user).await })
        })
        .collect();
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().unwrap().secret().to_owned());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    assert_eq!(ts.releases().await, releases + 1, "one exchange");
    assert_eq!(ts.used_jtis().await, jtis + 2);

    // Two requests at once, fifty callers each: one exchange per request.
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let (client, user) = (client.clone(), user.clone());
            let scope = if i % 2 == 0 { "repo:read" } else { "read:user" };
            tokio::spawn(async move {
                client
                    .token_for(&TokenRequest::new("demo-git", &user).scope(scope))
                    .await
                    .map(|t| t.scope().to_owned())
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let scope = call.await.unwrap().unwrap();
        assert_eq!(scope, if i % 2 == 0 { "repo:read" } else { "read:user" });
    }
    assert_eq!(ts.releases().await, releases + 3);
}

// --- each error from the answer that produces it ----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_connected_says_where_to_connect() {
    let ts = TestServer::start().await;
    let client = ts.client().build().unwrap();
    let e = client
        .token("demo-git", &ts.info.user_id)
        .await
        .unwrap_err();
    let Error::NotConnected {
        connection,
        connect_url,
        status,
        description,
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(connection, "demo-git");
    assert_eq!(
        connect_url.as_deref(),
        Some(ts.url("/connect/demo-git").as_str())
    );
    assert_eq!(*status, 401);
    assert!(description.contains("connect"), "{description}");
    assert!(e.to_string().contains(&ts.url("/connect/demo-git")));

    // The error is not cached: once the user connects, the next call gets the token.
    ts.connect_demo_account().await;
    let token = client.token("demo-git", &ts.info.user_id).await.unwrap();
    assert_eq!(ts.demo_api(token.secret(), "user").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_required_then_approved() {
    let ts = TestServer::start_with(|c| c.approval_interval_secs = 1).await;
    ts.connect_demo_account().await;
    ts.set_policy(medium_risk("issues:write")).await;
    let client = ts.client().build().unwrap();
    let req = TokenRequest::new("demo-git", &ts.info.user_id).scope("issues:write");

    // Low-risk scopes are released at once; the medium one is held.
    client
        .token_for(&TokenRequest::new("demo-git", &ts.info.user_id).scope("repo:read"))
        .await
        .unwrap();
    let releases = ts.releases().await;
    let e = client.token_for(&req).await.unwrap_err();
    let Error::ApprovalRequired(pending) = e else {
        panic!("{e:?}")
    };
    assert!(
        pending
            .approval_url
            .starts_with(&ts.url("/ui/approvals/apr_")),
        "{pending:?}"
    );
    let id = pending.approval_id.clone().expect("the approval's id");
    assert!(pending.approval_url.ends_with(&id));
    assert_eq!(pending.interval, Duration::from_secs(1));
    assert_eq!(pending.expires_in, Duration::from_secs(300));
    assert_eq!(pending.status, 403);
    assert!(pending.description.contains("approval"), "{pending:?}");
    assert!(!pending.auth_req_id().is_empty());
    assert_eq!(pending.token_request(), Some(&req));

    let waiter = {
        let (client, pending) = (client.clone(), pending.clone());
        tokio::spawn(async move {
            client
                .wait_for_approval(&pending, Duration::from_secs(60))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !waiter.is_finished(),
        "polling while the user has not decided"
    );
    assert_eq!(ts.releases().await, releases);
    ts.decide(&id, ApprovalDecision::Approve).await;
    let token = waiter.await.unwrap().unwrap();
    assert_eq!(token.scope(), "issues:write");
    assert_eq!(ts.releases().await, releases + 1);

    // The approved token is cached like any other.
    let again = client.token_for(&req).await.unwrap();
    assert_eq!(again.secret(), token.secret());
    assert_eq!(ts.releases().await, releases + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_denied_timed_out_and_expired() {
    let ts = TestServer::start_with(|c| c.approval_interval_secs = 1).await;
    ts.connect_demo_account().await;
    ts.set_policy(medium_risk("issues:write")).await;
    let client = ts.client().build().unwrap();
    let req = TokenRequest::new("demo-git", &ts.info.user_id).scope("issues:write");
    let pending = |e: Error| match e {
        Error::ApprovalRequired(p) => p,
        other => panic!("{other:?}"),
    };

    // Denied.
    let first = pending(client.token_for(&req).await.unwrap_err());
    ts.decide(
        first.approval_id.as_deref().unwrap(),
        ApprovalDecision::Deny,
    )
    .await;
    let e = client
        .wait_for_approval(&first, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Denied { code, description, .. }
            if code == "access_denied" && description.contains("denied")),
        "{e:?}"
    );

    // Nobody decides within the timeout: still pending, and said so.
    let second = pending(client.token_for(&req).await.unwrap_err());
    assert_ne!(second.approval_id, first.approval_id, "a new request");
    let started = tokio::time::Instant::now();
    let e = client
        .wait_for_approval(&second, Duration::from_secs(2))
        .await
        .unwrap_err();
    let Error::ApprovalTimedOut(p) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(p.approval_id, second.approval_id);
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(e.to_string().contains(&second.approval_url), "{e}");

    // The request expires before anyone decides.
    ts.clock.advance(301);
    let e = client
        .wait_for_approval(&second, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ApprovalExpired { approval, description }
            if approval.approval_id == second.approval_id && description.contains("expired")),
        "{e:?}"
    );
    assert_eq!(ts.releases().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_say_why() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let client = ts.client().build().unwrap();
    let user = &ts.info.user_id;

    // A scope outside the grant.
    let e = client
        .token_for(&TokenRequest::new("demo-git", user).scope("repo:write"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Denied { code, status: 400, description }
            if code == "invalid_scope" && !description.is_empty()),
        "{e:?}"
    );

    // No grant at all.
    ts.vault
        .remove_grant(&ts.info.agent_id, "demo-git", &Actor::cli())
        .await
        .unwrap();
    let e = client.token("demo-git", user).await.unwrap_err();
    assert!(
        matches!(&e, Error::Denied { code, status: 403, description }
            if code == "unauthorized_client" && !description.is_empty()),
        "{e:?}"
    );
    assert_eq!(ts.releases().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_by_a_grant_quota() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.set_policy(GrantPolicy {
        quotas: Quotas {
            agent_per_minute: Some(2),
            ..Quotas::default()
        },
        ..GrantPolicy::default()
    })
    .await;
    let client = ts.client().build().unwrap();
    let user = &ts.info.user_id;
    // Three different requests (the cache would answer a repeat).
    for scope in ["repo:read", "read:user"] {
        client
            .token_for(&TokenRequest::new("demo-git", user).scope(scope))
            .await
            .unwrap();
    }
    let e = client
        .token_for(&TokenRequest::new("demo-git", user).scope("issues:write"))
        .await
        .unwrap_err();
    let Error::RateLimited {
        retry_after,
        description,
    } = &e
    else {
        panic!("{e:?}")
    };
    let wait = retry_after.expect("Retry-After");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(60),
        "{wait:?}"
    );
    assert!(!description.is_empty());
    assert!(e.is_transient());
    // Cached tokens are still served while the quota is used up.
    client
        .token_for(&TokenRequest::new("demo-git", user).scope("repo:read"))
        .await
        .unwrap();
    assert_eq!(ts.releases().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_when_the_audit_cannot_be_written() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let client = ts.client().build().unwrap();
    let pool = ts.sql().await;
    sqlx::raw_sql(
        "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
         BEGIN SELECT RAISE(ABORT, 'audit sink down'); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    let e = client
        .token("demo-git", &ts.info.user_id)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Unavailable { retry_after: Some(d), status: 503, code, description }
            if *d == Duration::from_secs(1) && code == "temporarily_unavailable"
                && description.contains("nothing was released")),
        "{e:?}"
    );
    sqlx::raw_sql("DROP TRIGGER audit_down")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    client.token("demo-git", &ts.info.user_id).await.unwrap();
    assert_eq!(ts.releases().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_client_for_credentials_latchkey_does_not_know() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    // Another key than the one registered.
    let other = latchkey_crypto::keygen::generate(latchkey_client::Algorithm::ES256);
    let client = Client::builder()
        .issuer(&ts.issuer)
        .ca_cert_pem(&ts.ca_pem)
        .client_id(&ts.info.agent_id)
        .private_key_pem(other.private_pem.as_bytes())
        .clock(SharedClock(ts.clock.clone()))
        .build()
        .unwrap();
    let e = client
        .token("demo-git", &ts.info.user_id)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidClient { code, status: 401, .. } if code == "invalid_client"),
        "{e:?}"
    );
    // An unknown client id; a wrong secret (for the agent token too).
    let e = ts
        .client()
        .client_id("agt_nobody")
        .build()
        .unwrap()
        .token("demo-git", &ts.info.user_id)
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidClient { .. }), "{e:?}");
    let e = ts
        .client()
        .client_secret("not the secret")
        .build()
        .unwrap()
        .agent_token()
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidClient { .. }), "{e:?}");
    assert_eq!(ts.releases().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_keys_and_client_secrets() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let key = latchkey_crypto::keygen::generate(latchkey_client::Algorithm::ES256);
    let public = latchkey_crypto::jws::PublicKey::parse(&key.public_pem, None, None).unwrap();
    let (agent, secret) = ts
        .vault
        .add_agent("es-agent", &[public], true, &Actor::cli())
        .await
        .unwrap();
    let secret = secrecy::ExposeSecret::expose_secret(&secret.unwrap()).to_owned();
    ts.vault
        .grant(
            &agent.id,
            "demo-git",
            Scopes::parse("repo:read"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    let builder = || {
        Client::builder()
            .domain(ts.issuer.trim_start_matches("https://"))
            .ca_cert_pem(&ts.ca_pem)
            .client_id(&agent.id)
            .clock(SharedClock(ts.clock.clone()))
    };
    let user = &ts.info.user_id;

    // ES256 private_key_jwt (the algorithm read from the key).
    let token = builder()
        .private_key_pem(key.private_pem.as_bytes())
        .build()
        .unwrap()
        .token("demo-git", user)
        .await
        .unwrap();
    assert_eq!(token.scope(), "repo:read");
    // The key signs the subject JWT, the secret authenticates the client.
    builder()
        .private_key_pem(key.private_pem.as_bytes())
        .client_secret(&secret)
        .build()
        .unwrap()
        .token("demo-git", user)
        .await
        .unwrap();
    let audit = ts.vault.store().list_audit(1000).await.unwrap();
    let methods: Vec<&str> = audit
        .iter()
        .filter(|e| e.record.action == "token.release")
        .map(|e| e.record.auth_method.as_str())
        .collect();
    assert_eq!(methods.len(), 2);
    assert!(methods.contains(&"private_key_jwt"), "{methods:?}");
    assert!(methods.contains(&"client_secret_post"), "{methods:?}");

    // A secret alone serves the proxy, not the exchange (its subject JWT needs the key).
    let secret_only = builder().client_secret(&secret).build().unwrap();
    let e = secret_only.token("demo-git", user).await.unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    let resp = secret_only
        .proxy("demo-git", user)
        .get("/repos")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Set-up mistakes are said at build time.
    for (b, why) in [
        (builder(), "key or secret"),
        (builder().private_key_pem("not a key"), "bad key"),
        (
            builder()
                .client_secret("s")
                .ca_cert_file("/nonexistent/ca.pem"),
            "bad CA",
        ),
        (
            Client::builder().client_id("agt_x").client_secret("s"),
            "no issuer",
        ),
    ] {
        assert!(matches!(b.build(), Err(Error::Config(_))), "{why}");
    }
}

// --- the proxy --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_calls_the_api_without_the_agent_holding_a_token() {
    let ts = TestServer::start().await;
    let client = ts.client().build().unwrap();
    let proxy = client.proxy("demo-git", &ts.info.username);

    // Latchkey's own refusal: not connected (403 from the proxy), with the connect URL.
    let e = proxy.get("/user").send().await.unwrap_err();
    assert!(
        matches!(&e, Error::NotConnected { status: 403, connect_url: Some(u), .. }
            if *u == ts.url("/connect/demo-git")),
        "{e:?}"
    );
    ts.connect_demo_account().await;

    let resp = proxy.get("/user").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = format!("{:?}", resp.headers());
    let text = resp.text().await.unwrap();
    let profile: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(profile["login"], "octo-demo");
    // A body, and a query in the path.
    let created = proxy
        .post("/repos/hello-world/issues")
        .json(&serde_json::json!({"title": "from the SDK"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let repos = proxy.get("/repos?page=1").send().await.unwrap();
    assert_eq!(repos.status(), 200);

    // No exchange was made: the upstream token stayed in Latchkey.
    assert_eq!(ts.releases().await, 0);
    assert!(ts.audit_count("proxy.request").await >= 3);
    let upstream = ts
        .client()
        .build()
        .unwrap()
        .token("demo-git", &ts.info.user_id)
        .await
        .unwrap();
    assert!(!text.contains(upstream.secret()) && !headers.contains(upstream.secret()));

    // A narrowed call: the provider itself refuses (its answer, not an SDK error).
    let narrowed = proxy
        .clone()
        .scope("repo:read")
        .get("/user")
        .send()
        .await
        .unwrap();
    assert_eq!(narrowed.status(), 403);
    assert!(narrowed.headers().get("latchkey-error").is_none());
    // Latchkey's refusal of a scope outside the grant.
    let e = proxy
        .clone()
        .scope("repo:write")
        .get("/user")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Denied { code, .. } if code == "invalid_scope"),
        "{e:?}"
    );
    // A call that needs approval.
    ts.set_policy(medium_risk("issues:write")).await;
    let e = proxy
        .clone()
        .scope("issues:write")
        .post("/repos/hello-world/issues")
        .json(&serde_json::json!({"title": "held"}))
        .send()
        .await
        .unwrap_err();
    let Error::ApprovalRequired(p) = &e else {
        panic!("{e:?}")
    };
    assert!(p.approval_url.starts_with(&ts.url("/ui/approvals/")));
    assert!(p.token_request().is_none(), "repeat the call once approved");

    // One agent token for all of it, renewed only past the margin.
    assert_eq!(ts.audit_count("agent.token").await, 1);
    let agent_token = client.agent_token().await.unwrap();
    assert!((295..=300).contains(&agent_token.expires_in()));
    ts.clock
        .advance(agent_token.expires_at() - 60 - ts.clock.now() + 1);
    // (The grant now holds issues:write for approval: ask for less.)
    let profile = proxy.clone().scope("read:user").get("/user").send().await;
    assert_eq!(profile.unwrap().status(), 200);
    assert_eq!(ts.audit_count("agent.token").await, 2);
    assert_ne!(
        client.agent_token().await.unwrap().secret(),
        agent_token.secret()
    );

    // A token refused by the proxy (the agent disabled) is dropped and a new one asked for
    // once: here refused too, as invalid_client from the token endpoint (the proxy's own
    // answer would be invalid_token).
    let tokens = ts.audit_count("agent.token").await;
    ts.vault
        .set_agent_disabled(&ts.info.agent_id, true, &Actor::cli())
        .await
        .unwrap();
    let e = proxy.get("/repos").send().await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidClient { code, status: 401, .. } if code == "invalid_client"),
        "{e:?}"
    );
    ts.vault
        .set_agent_disabled(&ts.info.agent_id, false, &Actor::cli())
        .await
        .unwrap();
    let repos = proxy.clone().scope("repo:read").get("/repos").send().await;
    assert_eq!(repos.unwrap().status(), 200);
    assert_eq!(
        ts.audit_count("agent.token").await,
        tokens + 1,
        "a new agent token"
    );
}

// --- examples/bounty_agent.rs -----------------------------------------------------------

// The example's `run` against this server, as `cargo run --example bounty_agent` runs it (its
// `main` only parses the arguments and sets the exit status).
#[allow(dead_code)]
#[path = "../examples/bounty_agent.rs"]
mod bounty_agent;

use bounty_agent::{Claim, WORKING_ON_IT, claim_body};

impl TestServer {
    /// The demo agent's grant with `repo:write`, which claims need (the demo leaves it out).
    async fn grant_claims(&self) {
        self.vault
            .grant(
                &self.info.agent_id,
                "demo-git",
                Scopes::parse("read:user repo:read issues:write repo:write"),
                vec![],
                &Actor::cli(),
            )
            .await
            .unwrap();
    }

    /// An upstream token for the demo user (as the demo agent, not as the bounty agent).
    async fn upstream(&self, scope: &str) -> String {
        let client = self.client().audit_context("sdk test: set-up").build();
        let req = TokenRequest::new("demo-git", &self.info.user_id).scope(scope);
        client
            .unwrap()
            .token_for(&req)
            .await
            .unwrap()
            .secret()
            .to_owned()
    }

    /// File issues on hello-world, in order (#1, #2, …).
    async fn file_issues(&self, issues: &[(&str, &str)]) {
        let token = self.upstream("issues:write").await;
        for (title, body) in issues {
            let resp = self
                .http
                .post(self.url("/demo/api/repos/hello-world/issues"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"title": title, "body": body}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201);
        }
    }

    /// Issue number → the bodies of its comments, read from the demo provider.
    async fn comments(&self) -> BTreeMap<u64, Vec<(u64, String)>> {
        let token = self.upstream("repo:read").await;
        let issues: Value = self
            .http
            .get(self.url("/demo/api/repos/hello-world/issues"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        issues
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let comments = i["comments"].as_array().unwrap().iter();
                let comments = comments.map(|c| {
                    let body = c["body"].as_str().unwrap().to_owned();
                    (c["id"].as_u64().unwrap(), body)
                });
                (i["number"].as_u64().unwrap(), comments.collect())
            })
            .collect()
    }

    fn bounty_options(&self, approval_timeout: Duration) -> bounty_agent::Options {
        bounty_agent::Options {
            domain: self.issuer.trim_start_matches("https://").to_owned(),
            data_dir: self.config.data_dir.clone(),
            approval_timeout,
            ..bounty_agent::Options::default()
        }
    }

    /// The one pending approval, once the agent has asked (bounded: a test that waits forever
    /// fails).
    async fn pending_approval(&self) -> latchkey_core::model::Approval {
        let filter = latchkey_core::store::ApprovalFilter {
            user_id: None,
            status: Some(latchkey_core::model::ApprovalStatus::Pending),
            limit: 10,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut pending = self.vault.store().list_approvals(&filter).await.unwrap();
            if !pending.is_empty() {
                assert_eq!(pending.len(), 1, "{pending:?}");
                return pending.remove(0);
            }
            assert!(tokio::time::Instant::now() < deadline, "no approval asked");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The agent's report as (issue, amount, claim), and its "working on this" comment ids.
fn outcome(report: &bounty_agent::Report) -> (Vec<(u64, u64, Claim)>, Vec<u64>) {
    let claims = report.bounties.iter();
    let claims = claims
        .map(|b| (b.issue, b.amount, b.claim.clone()))
        .collect();
    let working = report.bounties.iter().map(|b| b.working_comment).collect();
    (claims, working)
}

fn working(comments: &[(u64, String)]) -> Vec<u64> {
    let mine = comments.iter().filter(|c| c.1 == WORKING_ON_IT);
    mine.map(|c| c.0).collect()
}

fn claims(comments: &BTreeMap<u64, Vec<(u64, String)>>) -> Vec<(u64, u64, String)> {
    let all = comments
        .iter()
        .flat_map(|(n, cs)| cs.iter().map(move |c| (*n, c)));
    let claims = all.filter(|(_, c)| bounty_agent::is_claim(&c.1));
    claims.map(|(n, c)| (n, c.0, c.1.clone())).collect()
}

const BOUNTY_ISSUES: &[(&str, &str)] = &[
    ("Typo in the README", "bounty: $50 for whoever fixes it"),
    ("Crash on an empty config (Bounty: $1,250)", "steps below"),
    ("How do I rotate keys?", "no reward here: just asking"),
    ("Flaky login test", "BOUNTY: $100"),
];

/// The bounty agent (`examples/bounty_agent.rs`): "working on this" on every bounty issue at
/// once; the claim of the one bounty above the threshold waits for the approval the test
/// gives — while it waits the request is pending and no claim is on the provider — and is
/// posted with the approved token; read back, every comment is where the report says. Run
/// again, it repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounty_agent_claims_above_the_threshold_once_approved() {
    let ts = TestServer::start_with(|c| c.approval_interval_secs = 1).await;
    let opts = ts.bounty_options(Duration::from_secs(60));

    // Not connected yet: says where to connect, exit status 2.
    let result = bounty_agent::run(&opts).await;
    assert!(
        matches!(&result, Err(bounty_agent::Failure::NotConnected { connect_url: Some(u) })
            if *u == ts.url("/connect/demo-git")),
        "{result:?}"
    );
    assert_eq!(bounty_agent::exit_code(&result), 2);

    ts.connect_demo_account().await;
    ts.grant_claims().await;
    ts.file_issues(BOUNTY_ISSUES).await;
    let agent = tokio::spawn(async move { bounty_agent::run(&opts).await });

    // The agent asks for the claim's scopes, at high risk, and waits.
    let approval = ts.pending_approval().await;
    assert_eq!(
        approval.scopes.to_string_spaced(),
        "issues:write repo:write"
    );
    assert_eq!(approval.risk, "high");
    assert_eq!(
        approval.audit_context.as_deref(),
        Some(bounty_agent::AUDIT_CONTEXT)
    );
    let before = ts.comments().await;
    assert!(!agent.is_finished(), "waiting for the decision");
    assert_eq!(claims(&before), vec![], "no claim before the approval");
    for issue in [1, 2, 4] {
        assert_eq!(working(&before[&issue]).len(), 1, "#{issue}: {before:?}");
    }
    assert_eq!(before[&3], vec![], "no bounty, no comment");

    ts.decide(&approval.id, ApprovalDecision::Approve).await;
    let report = tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .expect("the agent finishes once approved")
        .unwrap()
        .unwrap();
    let after = ts.comments().await;
    let [(claim_issue, claim_id, claim_text)] = &claims(&after)[..] else {
        panic!("one claim: {after:?}")
    };
    assert_eq!(
        (*claim_issue, claim_text.as_str()),
        (2, claim_body(1250).as_str())
    );
    let (claimed, working_ids) = outcome(&report);
    assert_eq!(
        claimed,
        vec![
            (1, 50, Claim::NotNeeded),
            (
                2,
                1250,
                Claim::Claimed {
                    comment: *claim_id,
                    approval: Some(approval.id.clone())
                }
            ),
            (4, 100, Claim::NotNeeded),
        ]
    );
    assert_eq!(
        working_ids,
        [1, 2, 4].map(|i| working(&after[&i])[0]).to_vec()
    );
    assert_eq!(after[&3], vec![]);
    assert_eq!(after[&2].len(), 2, "working on it, then the claim");
    assert!(report.complete());
    assert_eq!(bounty_agent::exit_code(&Ok(report)), 0);

    // Again: everything is done already; no new comment, no new approval.
    let again = bounty_agent::run(&ts.bounty_options(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(ts.comments().await, after);
    let filter = latchkey_core::store::ApprovalFilter {
        user_id: None,
        status: None,
        limit: 10,
    };
    let approvals = ts.vault.store().list_approvals(&filter).await.unwrap();
    assert_eq!(approvals.len(), 1, "{approvals:?}");
    assert_eq!(
        again.bounties[1].claim,
        Claim::AlreadyClaimed { comment: *claim_id }
    );
}

/// The bounty agent when the claim is not approved: denied, it posts no claim, reports the
/// denial and exits 0; asked again and undecided within its timeout, it posts no claim and
/// exits non-zero — the low-value work done, once, either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounty_agent_claims_nothing_unless_approved() {
    let ts = TestServer::start_with(|c| c.approval_interval_secs = 1).await;
    ts.connect_demo_account().await;
    ts.grant_claims().await;
    ts.file_issues(&[("Small", "bounty: $20"), ("Big", "bounty: $500")])
        .await;

    // The operator denies.
    let opts = ts.bounty_options(Duration::from_secs(60));
    let agent = tokio::spawn(async move { bounty_agent::run(&opts).await });
    let denied = ts.pending_approval().await;
    assert!(!agent.is_finished(), "waiting for the decision");
    ts.decide(&denied.id, ApprovalDecision::Deny).await;
    let report = tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .expect("the agent finishes once denied")
        .unwrap()
        .unwrap();
    let (claimed, working_ids) = outcome(&report);
    assert_eq!(
        claimed,
        vec![
            (1, 20, Claim::NotNeeded),
            (
                2,
                500,
                Claim::Denied {
                    approval: Some(denied.id.clone())
                }
            ),
        ]
    );
    let comments = ts.comments().await;
    assert_eq!(claims(&comments), vec![], "no claim");
    for (issue, id) in [1, 2].into_iter().zip(working_ids.clone()) {
        assert_eq!(comments[&issue], vec![(id, WORKING_ON_IT.to_owned())]);
    }
    assert!(report.complete());
    assert_eq!(bounty_agent::exit_code(&Ok(report)), 0);

    // Again: a new request, and nobody decides within the agent's two seconds.
    let report = bounty_agent::run(&ts.bounty_options(Duration::from_secs(2)))
        .await
        .unwrap();
    let pending = ts.pending_approval().await;
    assert_ne!(pending.id, denied.id);
    let (claimed, again) = outcome(&report);
    assert_eq!(
        claimed,
        vec![
            (1, 20, Claim::NotNeeded),
            (
                2,
                500,
                Claim::Undecided {
                    approval_url: ts.url(&format!("/ui/approvals/{}", pending.id))
                }
            ),
        ]
    );
    assert_eq!(again, working_ids, "not said twice");
    assert!(!report.complete());
    assert_eq!(bounty_agent::exit_code(&Ok(report)), 1);
    assert_eq!(ts.comments().await, comments, "nothing new");

    // Nothing with repo:write was ever released.
    let audit = ts.vault.store().list_audit(1000).await.unwrap();
    let claim_releases = audit.iter().filter(|e| {
        e.record.action == "token.release"
            && e.record
                .scopes
                .as_deref()
                .unwrap_or_default()
                .contains("repo:write")
    });
    assert_eq!(claim_releases.count(), 0);
}

/// Each claim asks Latchkey again (no token cached from the claim before): with single-use
/// (critical) approvals on the grant, two high-value bounties wait for two approvals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounty_agent_asks_again_for_each_claim() {
    let ts = TestServer::start_with(|c| c.approval_interval_secs = 1).await;
    ts.connect_demo_account().await;
    ts.vault
        .grant_with_policy(
            &ts.info.agent_id,
            "demo-git",
            Scopes::parse("read:user repo:read issues:write repo:write"),
            vec![],
            GrantPolicy {
                risk: BTreeMap::from([("repo:write".to_owned(), Risk::Critical)]),
                ..GrantPolicy::default()
            },
            &Actor::cli(),
        )
        .await
        .unwrap();
    ts.file_issues(&[("One", "bounty: $200"), ("Two", "bounty: $300")])
        .await;
    let opts = ts.bounty_options(Duration::from_secs(60));
    let agent = tokio::spawn(async move { bounty_agent::run(&opts).await });
    let first = ts.pending_approval().await;
    assert!(first.single_use);
    ts.decide(&first.id, ApprovalDecision::Approve).await;
    let second = ts.pending_approval().await;
    assert_ne!(second.id, first.id);
    let [(1, one, _)] = &claims(&ts.comments().await)[..] else {
        panic!("#1 claimed, #2 not yet")
    };
    assert!(!agent.is_finished());
    ts.decide(&second.id, ApprovalDecision::Approve).await;
    let report = tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .expect("the agent finishes once approved")
        .unwrap()
        .unwrap();
    let [(1, _, _), (2, two, _)] = &claims(&ts.comments().await)[..] else {
        panic!("both claimed")
    };
    let (claimed, _) = outcome(&report);
    let claim = |comment: &u64, approval: &latchkey_core::model::Approval| Claim::Claimed {
        comment: *comment,
        approval: Some(approval.id.clone()),
    };
    assert_eq!(
        claimed,
        vec![(1, 200, claim(one, &first)), (2, 300, claim(two, &second))]
    );
}

/// The bounty format, the arguments, and the check of its own outcome failing when a comment
/// it counts on is missing or a claim is where it made none.
#[test]
fn bounty_agent_parses_bounties_and_checks_its_outcome() {
    use bounty_agent::{Bounty, find_bounty, parse_args, verify};
    for (text, amount) in [
        ("bounty: $250", Some(250)),
        ("Fix it (BOUNTY:$1,500)", Some(1500)),
        ("bounty: 250", None),
        ("bounty: $ 5", None),
        ("a bounty of $300", None),
        ("bounty: later; bounty: $7", Some(7)),
        ("", None),
    ] {
        assert_eq!(find_bounty(text), amount, "{text:?}");
    }
    let issue = serde_json::json!({"title": "no", "body": "bounty: $9"});
    assert_eq!(bounty_agent::bounty_of(&issue), Some(9));

    let args = |a: &[&str]| parse_args(a.iter().map(|s| s.to_string()));
    let opts = args(&["--threshold", "500", "--repo=latchkey-notes"])
        .unwrap()
        .unwrap();
    assert_eq!(
        (opts.threshold, opts.repo.as_str()),
        (500, "latchkey-notes")
    );
    assert_eq!(opts.domain, "127.0.0.1:8750");
    assert!(args(&["--help"]).unwrap().is_none());
    for bad in [
        &["--threshold", "lots"][..],
        &["--repo", "../x"],
        &["--nope"],
        &["--repo"],
    ] {
        assert!(args(bad).is_err(), "{bad:?}");
    }

    let issues = |comments: Value| vec![serde_json::json!({"number": 2, "comments": comments})];
    let bounty = |claim| Bounty {
        issue: 2,
        title: "Big".into(),
        amount: 500,
        working_comment: 7,
        claim,
    };
    let working = serde_json::json!({"id": 7, "body": WORKING_ON_IT});
    let claim = serde_json::json!({"id": 8, "body": claim_body(500)});
    let claimed = || Claim::Claimed {
        comment: 8,
        approval: None,
    };
    let denied = || Claim::Denied { approval: None };
    assert_eq!(
        verify(
            &[bounty(claimed())],
            &issues(serde_json::json!([working, claim]))
        ),
        Ok(())
    );
    assert_eq!(
        verify(&[bounty(denied())], &issues(serde_json::json!([working]))),
        Ok(())
    );
    for (b, comments) in [
        (bounty(claimed()), serde_json::json!([working])),
        (bounty(claimed()), serde_json::json!([claim])),
        (bounty(denied()), serde_json::json!([working, claim])),
        (bounty(Claim::NotNeeded), serde_json::json!([])),
    ] {
        let e = verify(&[b], &issues(comments.clone()));
        assert!(matches!(&e, Err(p) if p.len() == 1), "{comments}: {e:?}");
    }
    assert!(verify(&[bounty(Claim::NotNeeded)], &[]).is_err(), "gone");
}
