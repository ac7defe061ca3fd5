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
