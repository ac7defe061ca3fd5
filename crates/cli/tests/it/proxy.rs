//! The credential-injecting proxy (`/proxy/{connection}/{path…}`) and agents' own tokens
//! (`client_credentials`): calls reach the provider with the injected token, the agent never
//! sees it, policy and approvals apply, every call is audited, and attacks on the path,
//! headers, bodies and redirects go nowhere (a canary listener counts connections).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use latchkey_core::vault::{Actor, ApprovalDecision, Decider};
use latchkey_server::config::Config;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// Counts TCP connections to it; nothing should ever reach it.
struct Canary {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Canary {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = connections.clone();
        tokio::spawn(async move {
            while let Ok((_stream, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self { port, connections }
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A provider API under test control (plain HTTP on loopback): it echoes what it received,
/// redirects, answers large bodies, and fails a first call with 401.
struct FakeApi {
    port: u16,
    requests: Arc<AtomicUsize>,
}

const RESPONSE_CAP: u64 = 64 * 1024;
const REQUEST_CAP: usize = 4096;

impl FakeApi {
    async fn start(canary_port: u16) -> Self {
        let requests = Arc::new(AtomicUsize::new(0));
        let flaky = Arc::new(AtomicUsize::new(0));
        let seen = requests.clone();
        let echo = |headers: HeaderMap, body: axum::body::Bytes| async move {
            let h = |n: &str| {
                headers
                    .get_all(n)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                    .collect::<Vec<_>>()
            };
            axum::Json(json!({
                "authorization": h("authorization"), "cookie": h("cookie"),
                "latchkey_user": h("latchkey-user"), "x_custom": h("x-custom"),
                "proxy_authorization": h("proxy-authorization"), "x_secret": h("x-secret"),
                "body_len": body.len(),
            }))
        };
        let app = Router::new()
            .route("/echo", any(echo))
            .route(
                "/redirect-away",
                get(move || async move {
                    Response::builder()
                        .status(302)
                        .header("location", format!("http://127.0.0.1:{canary_port}/steal"))
                        .body(Body::empty())
                        .unwrap()
                }),
            )
            .route(
                "/redirect-here",
                get(|| async {
                    Response::builder()
                        .status(302)
                        .header("location", "/echo")
                        .body(Body::empty())
                        .unwrap()
                }),
            )
            .route(
                "/big-len",
                get(|| async { vec![b'x'; RESPONSE_CAP as usize + 1].into_response() }),
            )
            .route(
                "/big-stream",
                get(|| async {
                    let chunks = (0..20).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 8192]));
                    Body::from_stream(futures_util::stream::iter(chunks))
                }),
            )
            .route(
                "/flaky",
                get(move |headers: HeaderMap| {
                    let flaky = flaky.clone();
                    async move {
                        if flaky.fetch_add(1, Ordering::SeqCst) == 0 {
                            return StatusCode::UNAUTHORIZED.into_response();
                        }
                        let auth = headers
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned());
                        axum::Json(json!({ "authorization": auth })).into_response()
                    }
                }),
            )
            .layer(axum::middleware::from_fn(
                move |req: axum::extract::Request, next: axum::middleware::Next| {
                    let seen = seen.clone();
                    async move {
                        seen.fetch_add(1, Ordering::SeqCst);
                        next.run(req).await
                    }
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { port, requests }
    }

    fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn server_with_small_caps() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        proxy_max_request_bytes: REQUEST_CAP,
        proxy_max_response_bytes: RESPONSE_CAP,
        outbound_allow: loopback_allowed(),
        ..Config::default()
    };
    TestServer::start_with(dir, config).await
}

/// Point `demo-git`'s API base URL somewhere else (the token still comes from the demo
/// provider). The proxy reads connections from the database, not the exchange's cache.
async fn set_api_base(ts: &TestServer, url: &str) {
    sqlx::query("UPDATE connections SET api_base_url = ? WHERE name = 'demo-git'")
        .bind(url)
        .execute(&ts.sql_pool().await)
        .await
        .unwrap();
}

/// A call through the proxy as the demo agent for the demo user.
async fn call(
    ts: &TestServer,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    ts.http
        .request(method, ts.url(&format!("/proxy/demo-git{path}")))
        .bearer_auth(token)
        .header("latchkey-user", &ts.info.username)
}

async fn json_of(resp: reqwest::Response) -> (u16, HeaderMap, Value) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

/// The audit entries with `action`, oldest first.
async fn entries(ts: &TestServer, action: &str) -> Vec<latchkey_core::model::AuditEntry> {
    let mut all = ts.vault.store().list_audit(1000).await.unwrap();
    all.retain(|e| e.record.action == action);
    all.sort_by_key(|e| e.seq);
    all
}

/// Wait for the `proxy.response` entries (written when the answer's stream ends).
async fn responses(ts: &TestServer, n: usize) -> Vec<latchkey_core::model::AuditEntry> {
    for _ in 0..100 {
        let found = entries(ts, "proxy.response").await;
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} proxy.response entries");
}

/// A raw HTTP/1.1 request over TLS: the path goes out exactly as written (HTTP clients
/// normalise `..` and reject backslashes before sending).
async fn raw(ts: &TestServer, request_target: &str, extra_headers: &str) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(&ts.ca_path).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let url = url::Url::parse(&ts.issuer).unwrap();
    let host = url.host_str().unwrap().to_owned();
    let port = url.port().unwrap();
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let req = format!(
        "GET {request_target} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra_headers}Connection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn agents_call_the_demo_api_without_holding_its_token() {
    let ts = TestServer::start().await;
    let token = ts.agent_token().await;

    // Not connected yet: 403 with where the user connects.
    let (status, headers, body) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/user")
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["error"],
        "federated_connection_refresh_token_not_found"
    );
    assert_eq!(body["connect_uri"], ts.url("/connect/demo-git"));
    assert_eq!(
        headers["latchkey-error"],
        "federated_connection_refresh_token_not_found"
    );

    ts.connect_demo_account().await;
    let (status, _, body) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/user")
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["login"], "octo-demo", "{body}");

    // The user can be named by id as well; the answer is the provider's.
    let resp = ts
        .http
        .get(ts.url("/proxy/demo-git/repos"))
        .bearer_auth(&token)
        .header("latchkey-user", &ts.info.user_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("latchkey-error").is_none());

    // A call the provider refuses comes back as it is (the demo's 404).
    let (status, headers, _) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/nope")
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(headers.get("latchkey-error").is_none());

    // Every call: a release recorded before it went out, and how it went after.
    let released = entries(&ts, "proxy.request").await;
    assert_eq!(released.len(), 3);
    let reason = released[0].record.reason.clone().unwrap();
    assert!(
        reason.starts_with("token ") && reason.ends_with("; GET /user"),
        "{reason}"
    );
    assert_eq!(released[0].record.auth_method, "agent_token");
    assert_eq!(
        released[0].record.subject_user.as_deref(),
        Some(ts.info.user_id.as_str())
    );
    let answered = responses(&ts, 3).await;
    let reasons: Vec<String> = answered
        .iter()
        .map(|e| e.record.reason.clone().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("GET /user → 200;")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("GET /nope → 404;")),
        "{reasons:?}"
    );
    let denied = entries(&ts, "proxy.deny").await;
    assert_eq!(denied.len(), 1, "the not-connected refusal");
}

#[tokio::test]
async fn proxy_authentication_is_strict() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let token = ts.agent_token().await;
    let get = |bearer: Option<String>, user: Option<&str>| {
        let mut r = ts.http.get(ts.url("/proxy/demo-git/user"));
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        if let Some(u) = user {
            r = r.header("latchkey-user", u);
        }
        async move { json_of(r.send().await.unwrap()).await }
    };
    let user = Some(ts.info.username.as_str());
    let (status, headers, body) = get(None, user).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    assert!(headers.contains_key("www-authenticate"));
    let (status, _, body) = get(Some("garbage".into()), user).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    // An agent token names the user it acts for.
    let (status, _, body) = get(Some(token.clone()), None).await;
    assert_eq!(status, 400);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("Latchkey-User")
    );
    let (status, _, body) = get(Some(token.clone()), Some("nobody")).await;
    assert_eq!(status, 400, "{body}");

    // A privileged-worker JWT works directly, once.
    let worker = ts.subject(json!({}));
    let (status, _, body) = get(Some(worker.clone()), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = get(Some(worker), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token")),
        "{body}"
    );
    // … naming nobody else.
    let (status, _, _) = get(Some(ts.subject(json!({}))), Some("someone-else")).await;
    assert_eq!(status, 400);

    // The agent token is for the agent API only, and short-lived.
    let (status, _, body) = json_of(
        ts.http
            .get(ts.url("/me/v1/connected-accounts/accounts"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    ts.clock.advance(latchkey_core::vault::AGENT_TOKEN_TTL + 1);
    let (status, _, body) = get(Some(token), user).await;
    assert_eq!(status, 401);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired")
    );

    // Disabling the agent stops its tokens at once.
    let token = ts.agent_token().await;
    ts.cli_ok(&["agent", "disable", &ts.info.agent_id]);
    let (status, _, _) = get(Some(token), user).await;
    assert_eq!(status, 401);

    // Every refused token is on the trail, under the client it claims.
    let refused = entries(&ts, "client.authenticate").await;
    assert!(refused.iter().any(|e| e.record.actor_id == "unknown"));
    let expired = refused
        .iter()
        .find(|e| e.record.reason.as_deref().unwrap().contains("expired"))
        .expect("the expired agent token");
    assert_eq!(expired.record.actor_id, ts.info.agent_id);
    assert_eq!(expired.record.auth_method, "bearer");
    // A replayed worker JWT is refused when its release would consume the `jti`.
    let replayed = entries(&ts, "proxy.deny").await;
    assert!(
        replayed
            .iter()
            .any(|e| e.record.reason.as_deref().unwrap().contains("already used"))
    );
}

#[tokio::test]
async fn client_credentials_issue_only_agent_api_tokens() {
    let ts = TestServer::start().await;
    let base = |extra: &[(&str, &str)]| {
        let mut p: Vec<(String, String)> = [
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", ts.info.agent_id.clone()),
            ("client_assertion_type", JWT_BEARER.to_owned()),
            ("client_assertion", ts.assertion(json!({}))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        p.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        p
    };
    let ok = ts.post_form(&base(&[])).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.body["expires_in"], latchkey_core::vault::AGENT_TOKEN_TTL);
    assert!(ok.body.get("refresh_token").is_none());
    ts.post_form(&base(&[("resource", "https://elsewhere.example/")]))
        .await
        .assert_error(400, "invalid_target");
    ts.post_form(&base(&[("scope", "read:user")]))
        .await
        .assert_error(400, "invalid_scope");
    // The assertion is single use here too.
    let params = base(&[]);
    assert_eq!(ts.post_form(&params).await.status, 200);
    ts.post_form(&params)
        .await
        .assert_error(401, "invalid_client");
    let issued = entries(&ts, "agent.token").await;
    assert_eq!(issued.len(), 2);
    assert!(
        issued[0]
            .record
            .reason
            .as_deref()
            .unwrap()
            .contains("agent access token for")
    );
}

#[tokio::test]
async fn risky_calls_wait_for_the_users_approval_of_that_call() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.grant(
        "read:user repo:read issues:write",
        &["--risk", "issues:write=high"],
    );
    let token = ts.agent_token().await;
    let post = || async {
        json_of(
            call(
                &ts,
                &token,
                reqwest::Method::POST,
                "/repos/hello-world/issues",
            )
            .await
            .header("latchkey-scope", "issues:write")
            .json(&json!({"title": "from the proxy"}))
            .send()
            .await
            .unwrap(),
        )
        .await
    };
    let (status, _, body) = post().await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("authorization_pending")),
        "{body}"
    );
    let uri = body["approval_uri"].as_str().unwrap();
    let id = uri.rsplit('/').next().unwrap().to_owned();
    let approval = ts.vault.store().approval(&id).await.unwrap().unwrap();
    let details = approval.authorization_details.clone().unwrap();
    assert!(
        details.contains("\"method\":\"POST\"") && details.contains("/repos/hello-world/issues"),
        "{details}"
    );
    // Still pending: the same request, not a second one.
    let (status, _, again) = post().await;
    assert_eq!(status, 403);
    assert_eq!(again["approval_uri"], body["approval_uri"]);
    ts.vault
        .decide_approval(
            &id,
            ApprovalDecision::Approve,
            None,
            Decider::Operator(&Actor::cli()),
        )
        .await
        .unwrap();
    // Approved as that call, not as a token: polling for it with the auth_req_id releases
    // nothing, and an agent cannot dress up an exchange as an API call for the user.
    let releases = ts.releases().await;
    let poll: Vec<(String, String)> = [
        ("grant_type", "urn:openid:params:grant-type:ciba".to_owned()),
        ("client_id", ts.info.agent_id.clone()),
        ("client_assertion_type", JWT_BEARER.to_owned()),
        ("client_assertion", ts.assertion(json!({}))),
        (
            "auth_req_id",
            body["auth_req_id"].as_str().unwrap().to_owned(),
        ),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .into();
    let refused = ts.post_form(&poll).await;
    refused.assert_error(400, "invalid_grant");
    assert!(
        refused.body["error_description"]
            .as_str()
            .unwrap()
            .contains("POST /repos/hello-world/issues"),
        "{:?}",
        refused.body
    );
    let mut dressed = ts.exchange_params();
    dressed.push(("scope".into(), "issues:write".into()));
    dressed.push((
        "authorization_details".into(),
        json!([{"type": "api_call", "method": "GET", "path": "/user"}]).to_string(),
    ));
    ts.post_form(&dressed)
        .await
        .assert_error(400, "invalid_authorization_details");
    assert_eq!(ts.releases().await, releases);
    let (status, _, body) = post().await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["title"], "from the proxy");
    // The approval covers that call, not another path.
    let (status, _, body) = json_of(
        call(
            &ts,
            &token,
            reqwest::Method::POST,
            "/repos/latchkey-notes/issues",
        )
        .await
        .header("latchkey-scope", "issues:write")
        .json(&json!({"title": "elsewhere"}))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("authorization_pending"))
    );
    // Low-risk calls need nothing.
    let (status, _, _) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/repos")
            .await
            .header("latchkey-scope", "repo:read")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let released = entries(&ts, "proxy.request").await;
    assert!(
        released
            .iter()
            .any(|e| e.record.reason.as_deref().unwrap().contains("approved by"))
    );
}

#[tokio::test]
async fn proxy_attacks_go_nowhere() {
    let ts = server_with_small_caps().await;
    ts.connect_demo_account().await;
    let canary = Canary::start().await;
    let api = FakeApi::start(canary.port).await;
    set_api_base(&ts, &format!("http://127.0.0.1:{}", api.port)).await;
    let token = ts.agent_token().await;
    let auth = format!(
        "Authorization: Bearer {token}\r\nLatchkey-User: {}\r\n",
        ts.info.username
    );
    let c = canary.port;
    // Paths that try to leave the API base URL, sent byte for byte.
    for (target, says) in [
        (
            format!("/proxy/demo-git/http://127.0.0.1:{c}/x"),
            "absolute URLs",
        ),
        (
            format!("/proxy/demo-git/http:%2F%2F127.0.0.1:{c}/x"),
            "encoded slashes",
        ),
        ("/proxy/demo-git/../../../etc/passwd".to_owned(), "`..`"),
        ("/proxy/demo-git/echo/%2e%2e/%2E%2E/x".to_owned(), "`..`"),
        (
            "/proxy/demo-git/echo/%252e%252e/x".to_owned(),
            "double-encoded",
        ),
        (format!("/proxy/demo-git/@127.0.0.1:{c}/x"), "`@`"),
        (format!("/proxy/demo-git/%40127.0.0.1:{c}/x"), "`@`"),
        (format!("/proxy/demo-git/%5C127.0.0.1:{c}/x"), "backslashes"),
        (format!("/proxy/demo-git//127.0.0.1:{c}/x"), "not a URL"),
    ] {
        let (status, text) = raw(&ts, &target, &auth).await;
        assert_eq!(status, 400, "{target}: {text}");
        assert!(text.contains(says), "{target}: {text}");
    }
    // A raw backslash is not even valid HTTP: refused before routing.
    let (status, _) = raw(&ts, &format!("/proxy/demo-git/\\127.0.0.1:{c}/x"), &auth).await;
    assert_eq!(status, 400);
    // A second Authorization header (the agent's own credential for the provider).
    let resp = ts
        .http
        .get(ts.url("/proxy/demo-git/echo"))
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", "Bearer agents-own-upstream-token")
        .header("latchkey-user", &ts.info.username)
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_of(resp).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("exactly one Authorization")
    );

    // Oversized request bodies: refused before anything goes out, with or without a length.
    let (status, _, body) = json_of(
        call(&ts, &token, reqwest::Method::POST, "/echo")
            .await
            .body(vec![b'z'; REQUEST_CAP + 1])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(vec![b'z'; REQUEST_CAP / 2]));
    let (status, _, _) = json_of(
        call(&ts, &token, reqwest::Method::POST, "/echo")
            .await
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(api.count(), 0, "no attack reached the provider");

    // An absolute-form request target naming another host: the host part is not where the
    // call goes; it goes to the connection's API, as any other.
    let before = api.count();
    let (status, text) = raw(
        &ts,
        &format!("http://127.0.0.1:{c}/proxy/demo-git/echo"),
        &auth,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(api.count(), before + 1);

    // A redirect to another host is not followed.
    let (status, _, body) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/redirect-away")
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("redirect_refused")),
        "{body}"
    );
    assert!(
        !body.to_string().contains(&c.to_string()),
        "the target is not echoed"
    );

    // Oversized answers: refused by their length, or cut mid-stream.
    let (status, _, body) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/big-len")
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("response_too_large"))
    );
    let resp = call(&ts, &token, reqwest::Method::GET, "/big-stream")
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.is_err(), "the answer is cut at the cap");
    let answered = responses(&ts, 4).await;
    assert!(
        answered.iter().any(|e| e
            .record
            .reason
            .as_deref()
            .unwrap()
            .contains("answer cut at the proxy's limit")),
        "{answered:?}"
    );

    // A stored API base URL whose host part hides another host (`user@host`, a backslash):
    // refused when a connection is added (`catalog::check_url`), and never followed if one is
    // in the database anyway.
    for base in [
        format!("http://127.0.0.1:{}@127.0.0.1:{c}", api.port),
        format!("http://127.0.0.1:{}\\@127.0.0.1:{c}", api.port),
    ] {
        set_api_base(&ts, &base).await;
        let (status, _, body) = json_of(
            call(&ts, &token, reqwest::Method::GET, "/echo")
                .await
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (502, Some("bad_gateway")),
            "{base}: {body}"
        );
    }
    assert_eq!(canary.count(), 0, "nothing ever reached the canary");
}

#[tokio::test]
async fn proxy_injects_only_its_token_and_retries_a_401_once() {
    let ts = server_with_small_caps().await;
    ts.connect_demo_account().await;
    let canary = Canary::start().await;
    let api = FakeApi::start(canary.port).await;
    set_api_base(&ts, &format!("http://127.0.0.1:{}/", api.port)).await;
    let token = ts.agent_token().await;

    let resp = call(&ts, &token, reqwest::Method::POST, "/echo?x=1")
        .await
        .header("cookie", "session=agent")
        .header("proxy-authorization", "Basic eDp5")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .header("x-custom", "kept")
        .body("hello")
        .send()
        .await
        .unwrap();
    let (status, _, seen) = json_of(resp).await;
    assert_eq!(status, 200, "{seen}");
    let injected = seen["authorization"][0].as_str().unwrap().to_owned();
    assert!(injected.starts_with("Bearer ") && !injected.contains(&token));
    assert_eq!(seen["authorization"].as_array().unwrap().len(), 1);
    for gone in ["cookie", "latchkey_user", "proxy_authorization", "x_secret"] {
        assert_eq!(seen[gone], json!([]), "{gone} reached the provider");
    }
    assert_eq!(seen["x_custom"], json!(["kept"]));
    assert_eq!(seen["body_len"], 5);

    // Same-origin redirects are followed, with the token.
    let (status, _, seen) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/redirect-here")
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(seen["authorization"][0], injected.as_str());

    // A 401 from the provider: one refresh, one retry with the new token.
    let refreshes = ts.demo.stats().refresh_grants;
    let (status, _, seen) = json_of(
        call(&ts, &token, reqwest::Method::GET, "/flaky")
            .await
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{seen}");
    assert_ne!(
        seen["authorization"],
        injected.as_str(),
        "a refreshed token"
    );
    assert_eq!(ts.demo.stats().refresh_grants, refreshes + 1);
    let answered = responses(&ts, 3).await;
    assert!(answered.iter().any(|e| {
        e.record
            .reason
            .as_deref()
            .unwrap()
            .contains("retried once with a refreshed token")
    }));
    // No upstream token in the audit trail, ever.
    let all = ts.vault.store().list_audit(1000).await.unwrap();
    let bare = injected.trim_start_matches("Bearer ");
    assert!(all.iter().all(|e| !format!("{e:?}").contains(bare)));
    assert!(api.count() >= 4);
    assert_eq!(canary.count(), 0);
}

/// An agent the user signed in to (an app, audience = the agent API) acts for that user with
/// the user's own access token: no `Latchkey-User`, and the sign-out ends it.
#[tokio::test]
async fn a_users_token_for_the_agent_api_acts_for_that_user() {
    use crate::oidc::{app, authorize_url, code_grant, confidential, pkce, sign_in_for_code};
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let agent = app(&ts, "assistant", confidential()).await;
    ts.vault
        .grant(
            &agent.id,
            "demo-git",
            latchkey_core::scope::Scopes::parse("read:user"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    let p = pkce();
    let resource = ts.url("/mcp");
    let code = sign_in_for_code(
        &ts,
        &authorize_url(&ts, &agent.id, &p, &[("audience", &resource)]),
    )
    .await;
    let signed_in = code_grant(&ts, &agent, &code, &p.verifier).await;
    let token = signed_in.token().to_owned();
    let get = |user: Option<&str>| {
        let mut r = ts
            .http
            .get(ts.url("/proxy/demo-git/user"))
            .bearer_auth(&token);
        if let Some(u) = user {
            r = r.header("latchkey-user", u);
        }
        async move { json_of(r.send().await.unwrap()).await }
    };
    let (status, _, body) = get(None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["login"], "octo-demo");
    let (status, _, _) = get(Some("someone-else")).await;
    assert_eq!(status, 400);
    let released = entries(&ts, "proxy.request").await;
    assert_eq!(released[0].record.auth_method, "user_token");
    assert_eq!(released[0].record.actor_id, agent.id);
    // The sign-in revoked: its access token stops at once.
    let revoke = ts
        .http
        .post(ts.url("/oauth/revoke"))
        .form(&[
            (
                "token",
                signed_in.body["refresh_token"].as_str().unwrap_or(&token),
            ),
            ("client_id", &agent.id),
            ("client_secret", &agent.secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    let (status, _, body) = get(None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
}
