//! The SSRF guard end to end (issue 12 item 4). A canary listener on loopback counts every TCP
//! connection it accepts. A server without `outbound_allow` is pointed at it in each way an
//! operator's setting could spell loopback — `127.0.0.1`, `localhost` (refused after
//! resolution), `[::ffff:127.0.0.1]`, `[::1]`, and the decimal, hexadecimal and short IPv4
//! forms — through every outbound call: the code exchange of a connect callback, the refresh
//! inside a token exchange, the revocation at the provider, a call through `/proxy`, webhook
//! delivery and OpenID discovery. Each is refused with a classified error (503
//! `temporarily_unavailable` for the vault's own calls, 502 `bad_gateway` from the proxy) and
//! the canary accepts 0 connections. With the allowance the same calls reach it (so the
//! count can fail), and an allowed provider that redirects to the canary is not followed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::response::Response;
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewConnection};
use latchkey_server::Config;
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::*;

/// Counts the TCP connections it accepts (and closes them at once).
struct Canary {
    port: u16,
    /// The same on `[::1]`, where the machine has IPv6 loopback.
    v6_port: Option<u16>,
    connections: Arc<AtomicUsize>,
}

impl Canary {
    async fn start() -> Self {
        let connections = Arc::new(AtomicUsize::new(0));
        let count = |listener: tokio::net::TcpListener| {
            let seen = connections.clone();
            tokio::spawn(async move {
                while let Ok((_stream, _)) = listener.accept().await {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            });
        };
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        count(v4);
        let v6_port = match tokio::net::TcpListener::bind("[::1]:0").await {
            Ok(v6) => {
                let p = v6.local_addr().unwrap().port();
                count(v6);
                Some(p)
            }
            Err(_) => None,
        };
        Self {
            port,
            v6_port,
            connections,
        }
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The canary's origin spelled every way that means loopback.
    fn spellings(&self) -> Vec<String> {
        let p = self.port;
        let mut all = vec![
            format!("https://127.0.0.1:{p}"),
            format!("https://localhost:{p}"),
            format!("https://[::ffff:127.0.0.1]:{p}"),
            format!("https://2130706433:{p}"),
            format!("https://0x7f.1:{p}"),
            format!("https://127.1:{p}"),
            format!("http://127.0.0.1:{p}"),
        ];
        // Without IPv6 loopback nothing listens there, but the refusal is still checked.
        all.push(format!("https://[::1]:{}", self.v6_port.unwrap_or(p)));
        all
    }
}

fn config(dir: &tempfile::TempDir, allow: Vec<String>) -> Config {
    Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        outbound_allow: allow,
        ..Config::default()
    }
}

/// A demo-mode server with exactly this allowance (none: the default policy).
async fn server(allow: Vec<String>) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir, allow);
    TestServer::start_with(dir, config).await
}

/// Sign the browser in as the demo user (if `connect_demo_account` has not already).
async fn sign_in(ts: &TestServer) {
    let (status, _, page) = ts.browse("/login?next=/ui/accounts").await;
    if status != 200 {
        return;
    }
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            "/login",
            &[
                ("username", &ts.info.username),
                ("password", &ts.info.password),
                ("csrf", &csrf),
                ("next", "/ui/accounts"),
            ],
        )
        .await;
    assert_eq!(status, 303, "signed in");
}

/// Register a generic connection whose endpoints are under `origin`, start connecting it in
/// the (signed-in) browser, and come back to the callback with a code as if the provider
/// had approved: the vault then exchanges the code at `{origin}/token`. The callback page.
async fn code_exchange(ts: &TestServer, name: &str, origin: &str) -> (StatusCode, String) {
    ts.vault
        .add_connection(
            NewConnection {
                name: name.into(),
                provider: "oauth2".into(),
                client_id: "latchkey".into(),
                client_secret: Some("a-client-secret".into()),
                authorize_url: format!("{origin}/authorize"),
                token_url: format!("{origin}/token"),
                revoke_url: None,
                userinfo_url: None,
                api_base_url: None,
                issuer: None,
                scopes: Scopes::parse("read"),
                keep_alive_secs: None,
            },
            &Actor::cli(),
        )
        .await
        .unwrap();
    let (status, location, body) = ts.browse(&format!("/connect/{name}")).await;
    assert_eq!(status, 303, "{body}");
    // The browser would go there; Latchkey does not (and neither does this test).
    let authorize = url::Url::parse(&location.unwrap()).unwrap();
    let state = authorize
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let (status, _, page) = ts
        .browse(&format!(
            "/connect/{name}/callback?code=a-code&state={state}"
        ))
        .await;
    (status, page)
}

/// Point `demo-git` at `origin` as a generic provider (its refresh and revocation go there),
/// behind the running server's back.
async fn provider_at(ts: &TestServer, origin: &str) {
    sqlx::query(
        "UPDATE connections SET provider = 'oauth2', token_url = ?, revoke_url = ?, \
         authorize_url = ? WHERE name = 'demo-git'",
    )
    .bind(format!("{origin}/token"))
    .bind(format!("{origin}/revoke"))
    .bind(format!("{origin}/authorize"))
    .execute(&ts.sql_pool().await)
    .await
    .unwrap();
}

/// Point `demo-git`'s API base URL (for `/proxy`) at `origin`.
async fn api_at(ts: &TestServer, origin: &str) {
    sqlx::query("UPDATE connections SET api_base_url = ? WHERE name = 'demo-git'")
        .bind(format!("{origin}/api"))
        .execute(&ts.sql_pool().await)
        .await
        .unwrap();
}

/// `GET /proxy/demo-git/user` as the demo agent for the demo user.
async fn proxy_call(ts: &TestServer, agent_token: &str) -> (u16, Option<String>, Value) {
    let resp = ts
        .http
        .get(ts.url("/proxy/demo-git/user"))
        .bearer_auth(agent_token)
        .header("latchkey-user", &ts.info.username)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let code = resp
        .headers()
        .get("latchkey-error")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    latchkey_testkit::assert_no_canary("a proxy answer", text.as_bytes());
    (
        status,
        code,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// A server whose webhooks (every audit entry) go to `{origin}/hook`, once deliveries were
/// attempted: (delivered, attempted), and an error recorded for a failed delivery.
async fn webhook_round(origin: &str, allow: Vec<String>) -> ((i64, i64), Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        webhook_url: Some(format!("{origin}/hook")),
        webhook_secret: Some("a-webhook-secret-of-more-than-32-characters".into()),
        audit_webhook: true,
        ..config(&dir, allow)
    };
    let ts = TestServer::start_with(dir, config).await;
    // Seeding the demo wrote audit entries, so deliveries are due; the server's own delivery
    // task may be the one that attempts them.
    let pool = ts.sql_pool().await;
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
            n
        }
    };
    let mut attempted = 0;
    for _ in 0..100 {
        ts.vault.deliver_webhooks(50).await;
        attempted = count("SELECT COUNT(*) FROM webhook_outbox WHERE attempts > 0").await;
        if attempted > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let delivered =
        count("SELECT COUNT(*) FROM webhook_outbox WHERE delivered_at IS NOT NULL").await;
    let error: Option<(Option<String>,)> = sqlx::query_as(
        "SELECT last_error FROM webhook_outbox WHERE last_error IS NOT NULL LIMIT 1",
    )
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    ts.stop().await;
    ((delivered, attempted), error.and_then(|e| e.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_outbound_call_reaches_a_loopback_canary() {
    let canary = Canary::start().await;
    let ts = server(Vec::new()).await;
    // The built-in demo provider, served at Latchkey's own origin, works without any
    // allowance: connect, exchange, and a call through the proxy.
    let account = ts.connect_demo_account().await;
    let agent = ts.agent_token().await;
    ts.post_form(&ts.exchange_params()).await.token();
    assert_eq!(proxy_call(&ts, &agent).await.0, 200);
    sign_in(&ts).await;

    for (i, origin) in canary.spellings().iter().enumerate() {
        // The code exchange of a connect callback.
        let (status, page) = code_exchange(&ts, &format!("canary-{i}"), origin).await;
        assert_eq!(canary.count(), 0, "{origin}: code exchange connected");
        assert_eq!(status, 503, "{origin}: {page}");
        assert!(
            page.contains("blocked address") || page.contains("resolves only to blocked"),
            "{origin}: the page says why: {page}"
        );

        // A call through the proxy.
        api_at(&ts, origin).await;
        let (status, code, body) = proxy_call(&ts, &agent).await;
        assert_eq!(canary.count(), 0, "{origin}: the proxy connected");
        assert_eq!(
            (status, code.as_deref()),
            (502, Some("bad_gateway")),
            "{origin}: {body}"
        );
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("not one Latchkey calls"),
            "{body}"
        );

        // OpenID discovery at `connection add` (the CLI, another process, same policy).
        let out = ts.cli(&[
            "connection",
            "add",
            &format!("oidc-{i}"),
            "--provider",
            "oidc",
            "--issuer",
            origin,
            "--client-id",
            "x",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(canary.count(), 0, "{origin}: discovery connected");
        assert!(!out.status.success(), "{origin}: discovery passed");
        assert!(err.contains("blocked"), "{origin}: {err}");
    }

    // The refresh inside an exchange, then the revocation at the provider.
    ts.clock.advance(301);
    for origin in canary.spellings() {
        provider_at(&ts, &origin).await;
        let a = ts.post_form(&ts.exchange_params()).await;
        assert_eq!(canary.count(), 0, "{origin}: the refresh connected");
        a.assert_error(503, "temporarily_unavailable");
    }
    let stored = ts
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status.as_str(), "active", "nothing was lost");
    let outcome = ts
        .vault
        .revoke_account(&account, &Actor::cli())
        .await
        .unwrap();
    assert!(!outcome.upstream_revoked, "the provider was not called");
    assert_eq!(canary.count(), 0, "the revocation connected");
    assert!(
        captured_logs_contain("is a blocked address"),
        "the operator's log says why"
    );
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_webhook_reaches_a_loopback_canary() {
    let canary = Canary::start().await;
    for origin in canary.spellings() {
        let ((delivered, attempted), error) = webhook_round(&origin, Vec::new()).await;
        assert_eq!(canary.count(), 0, "{origin}: a webhook connected");
        assert_eq!(delivered, 0, "{origin}");
        assert!(attempted > 0, "{origin}: deliveries were attempted");
        let error = error.unwrap_or_default();
        assert!(
            error.contains("the receiver's address is refused"),
            "{origin}: {error}"
        );
    }
}

/// The same calls with `outbound_allow = ["127.0.0.1"]` reach the canary: the count above
/// would see a leak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_allowance_the_canary_is_reached() {
    let canary = Canary::start().await;
    let origins = [
        format!("https://127.0.0.1:{}", canary.port),
        format!("https://localhost:{}", canary.port),
    ];
    let ts = server(vec!["127.0.0.1".into()]).await;
    let account = ts.connect_demo_account().await;
    let agent = ts.agent_token().await;
    sign_in(&ts).await;
    for (i, origin) in origins.iter().enumerate() {
        let before = canary.count();
        let (status, page) = code_exchange(&ts, &format!("canary-{i}"), origin).await;
        assert_eq!(status, 503, "the canary speaks no TLS: {page}");
        assert!(
            canary.count() > before,
            "{origin}: the code exchange connected"
        );

        let before = canary.count();
        api_at(&ts, origin).await;
        assert_eq!(proxy_call(&ts, &agent).await.0, 502);
        assert!(canary.count() > before, "{origin}: the proxy connected");
    }
    ts.clock.advance(301);
    let before = canary.count();
    provider_at(&ts, &origins[0]).await;
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(503, "temporarily_unavailable");
    assert!(canary.count() > before, "the refresh connected");
    let before = canary.count();
    ts.vault
        .revoke_account(&account, &Actor::cli())
        .await
        .unwrap();
    assert!(canary.count() > before, "the revocation connected");
    ts.stop().await;

    let before = canary.count();
    let ((delivered, _), _) = webhook_round(&origins[0], vec!["127.0.0.1".into()]).await;
    assert_eq!(delivered, 0, "the canary speaks no HTTP");
    assert!(canary.count() > before, "the webhook connected");

    // `outbound_allow_private` lifts the guard as a whole.
    let dir = tempfile::tempdir().unwrap();
    let everything = Config {
        outbound_allow_private: true,
        ..config(&dir, Vec::new())
    };
    let ts = TestServer::start_with(dir, everything).await;
    sign_in(&ts).await;
    let before = canary.count();
    code_exchange(&ts, "canary-any", &origins[1]).await;
    assert!(canary.count() > before, "allow_private: connected");
    ts.stop().await;
}

/// A provider the operator allowed (on 127.0.0.2) that answers every request with a redirect
/// to the canary (on 127.0.0.1, not allowed): no redirect is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_to_the_canary_are_not_followed() {
    let canary = Canary::start().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    let to = format!("https://127.0.0.1:{}/steal", canary.port);
    let app = axum::Router::new().fallback(move || {
        seen.fetch_add(1, Ordering::SeqCst);
        let to = to.clone();
        async move {
            Response::builder()
                .status(302)
                .header("location", to)
                .body(Body::empty())
                .unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let redirector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let ts = server(vec!["127.0.0.2".into()]).await;
    ts.connect_demo_account().await;
    let agent = ts.agent_token().await;
    sign_in(&ts).await;

    let (status, page) = code_exchange(&ts, "redirecting", &redirector).await;
    assert_eq!(status, 503, "{page}");
    assert!(page.contains("302"), "{page}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the allowed provider was asked"
    );

    api_at(&ts, &redirector).await;
    let (status, code, body) = proxy_call(&ts, &agent).await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("redirect_refused")),
        "{body}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    ts.clock.advance(301);
    provider_at(&ts, &redirector).await;
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(503, "temporarily_unavailable");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    ts.stop().await;

    let ((delivered, attempted), error) =
        webhook_round(&redirector, vec!["127.0.0.2".into()]).await;
    assert_eq!(delivered, 0);
    assert!(attempted > 0);
    assert!(error.unwrap_or_default().contains("302"));
    assert!(hits.load(Ordering::SeqCst) > 3, "the webhooks were sent");

    assert_eq!(canary.count(), 0, "no redirect reached the canary");
}
