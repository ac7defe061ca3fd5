//! Software nobody here wrote, from npm (pinned in interop/node/package-lock.json; `scripts/test`
//! runs `npm ci`): a certified OpenID provider, `oidc-provider`, as a real upstream that users
//! connect through its own login and consent pages; and Auth0's Node SDKs — `auth0`,
//! `@auth0/auth0-auth-js`, `@auth0/ai`, `@auth0/ai-vercel` — unchanged, against Latchkey over
//! TLS.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use latchkey_core::model::ConnectedAccount;
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewClient};
use latchkey_crypto::Algorithm;
use latchkey_crypto::jws::PublicKey;
use latchkey_crypto::keygen::generate;
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::*;
use crate::oidc::*;

const RT_TYPE: &str = "urn:ietf:params:oauth:token-type:refresh_token";
const AT_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const FCAT: &str = "http://auth0.com/oauth/token-type/federated-connection-access-token";
const NOT_CONNECTED: &str = "federated_connection_refresh_token_not_found";

fn node_dir() -> PathBuf {
    let dir = workspace_root().join("interop/node");
    assert!(
        dir.join("node_modules/oidc-provider").is_dir(),
        "{}/node_modules is missing: run scripts/test (it runs npm ci there)",
        dir.display()
    );
    dir
}

/// Latchkey's host:port, the `domain` every Auth0 SDK takes.
fn domain(ts: &TestServer) -> String {
    ts.issuer
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned()
}

/// `node interop/node/sdk.mjs <scenario>` with `vars`, trusting Latchkey's CA; its JSON answer.
/// Bounded: a script still running after 60 s is killed and the test fails.
async fn sdk(ts: &TestServer, scenario: &str, vars: &[(&str, &str)]) -> Value {
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(node_dir().join("sdk.mjs"))
        .arg(scenario)
        .env("LK_DOMAIN", domain(ts))
        .env("NODE_EXTRA_CA_CERTS", &ts.ca_path)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{scenario}: the SDK script did not finish within 60 s"))
        .expect("node is installed (scripts/test checks)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{scenario}: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{scenario}: not JSON: {} / {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The SDK's one request to `/oauth/token`, as the script's fetch spy saw it.
fn token_request(answer: &Value) -> &Value {
    let sent: Vec<&Value> = answer["sent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"] == "/oauth/token")
        .collect();
    assert_eq!(sent.len(), 1, "{answer}");
    sent[0]
}

// --- oidc-provider, a real upstream ----------------------------------------------------------

/// `oidc-provider` running `interop/node/upstream.mjs` on 127.0.0.1; killed when dropped (and it
/// exits by itself when its standard input closes, should this process die first).
struct Upstream {
    issuer: String,
    child: Child,
    _stdin: ChildStdin,
    events: Arc<(Mutex<Vec<Value>>, Condvar)>,
}

impl Upstream {
    fn start(redirect_uri: &str, client_secret: &str) -> Self {
        let mut child = Command::new("node")
            .arg(node_dir().join("upstream.mjs"))
            .env("UP_CLIENT_SECRET", client_secret)
            .env("UP_REDIRECT_URI", redirect_uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node is installed (scripts/test checks)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let (first_line, issuer) = mpsc::channel();
        let sink = events.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
            if let Some(first) = lines.next() {
                let _ = first_line.send(first);
            }
            for line in lines {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    let (list, changed) = &*sink;
                    list.lock().unwrap().push(event);
                    changed.notify_all();
                }
            }
        });
        let mut up = Self {
            issuer: String::new(),
            child,
            _stdin: stdin,
            events,
        };
        up.issuer = issuer
            .recv_timeout(Duration::from_secs(30))
            .expect("oidc-provider prints its issuer within 30 s");
        assert!(up.issuer.starts_with("http://127.0.0.1:"), "{}", up.issuer);
        up
    }

    /// The first provider event matching `wanted`, waiting at most 10 s for it to be reported.
    fn event(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        tokio::task::block_in_place(|| {
            let (list, changed) = &*self.events;
            let list = list.lock().unwrap();
            let (list, _) = changed
                .wait_timeout_while(list, Duration::from_secs(10), |l| !l.iter().any(&wanted))
                .unwrap();
            list.iter()
                .find(|e| wanted(e))
                .cloned()
                .unwrap_or_else(|| panic!("oidc-provider reported no {what}: {list:?}"))
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session at the provider: plain HTTP, its own cookies (another origin than
/// Latchkey's), no redirects followed on its own.
struct ProviderBrowser {
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

impl ProviderBrowser {
    fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: HashMap::new(),
        }
    }

    async fn send(
        &mut self,
        url: &str,
        form: Option<&[(&str, &str)]>,
    ) -> (StatusCode, Option<String>, String) {
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let req = match form {
            Some(form) => self.http.post(url).form(form),
            None => self.http.get(url),
        };
        let resp = req.header("cookie", cookie).send().await.unwrap();
        for v in resp.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (name, value) = pair.split_once('=').unwrap();
            let attrs = attrs.to_ascii_lowercase();
            if value.is_empty() || attrs.contains("max-age=0") || attrs.contains("1970") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        let status = resp.status();
        let base = url::Url::parse(url).unwrap();
        let location = resp
            .headers()
            .get("location")
            .map(|l| base.join(l.to_str().unwrap()).unwrap().to_string());
        (status, location, resp.text().await.unwrap())
    }
}

/// The `action` of the page's form, resolved against the page's URL.
fn form_action(page_url: &str, html: &str) -> String {
    let start = html.find("action=\"").expect("a form") + "action=\"".len();
    let action = html[start..].split('"').next().unwrap();
    url::Url::parse(page_url)
        .unwrap()
        .join(action)
        .unwrap()
        .to_string()
}

/// Connect `up` for the demo user as `login` at oidc-provider, like a browser: Latchkey's own
/// sign-in if needed, then the provider's login page (pick the account, type its password) and
/// consent page in a fresh provider session, then Latchkey's callback. Returns the account.
async fn connect_up(ts: &TestServer, login: &str, password: &str) -> ConnectedAccount {
    let (mut status, mut location, _) = ts.browse("/connect/up").await;
    if status == 303 && location.as_deref().unwrap().contains("/login?") {
        let (_, _, page) = ts.browse(&location.unwrap()).await;
        let csrf = hidden_field(&page, "csrf");
        let (s, back, _) = ts
            .submit(
                "/login",
                &[
                    ("username", &ts.info.username),
                    ("password", &ts.info.password),
                    ("csrf", &csrf),
                    ("next", "/connect/up"),
                ],
            )
            .await;
        assert_eq!(s, 303);
        (status, location, _) = ts.browse(&back.unwrap()).await;
    }
    assert_eq!(status, 303, "Latchkey sends the browser to the provider");
    let authorize = location.unwrap();
    let request: HashMap<String, String> = url::Url::parse(&authorize)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(request["scope"], "offline_access openid profile");
    assert_eq!(request["code_challenge_method"], "S256");

    let mut browser = ProviderBrowser::new();
    let (mut logins, mut consents, mut url) = (0, 0, authorize);
    let callback = loop {
        assert!(logins + consents < 4, "the provider keeps asking");
        let (status, location, page) = browser.send(&url, None).await;
        let next = match status.as_u16() {
            302 | 303 => location.unwrap(),
            200 if page.contains("name=\"login\"") => {
                logins += 1;
                for account in ["alice", "bob"] {
                    assert!(page.contains(&format!("<option value=\"{account}\">")));
                }
                let action = form_action(&url, &page);
                let (status, location, page) = browser
                    .send(&action, Some(&[("login", login), ("password", password)]))
                    .await;
                assert_eq!(status, 303, "{page}");
                location.unwrap()
            }
            200 if page.contains("/confirm\"") => {
                consents += 1;
                let action = form_action(&url, &page);
                let (status, location, page) = browser
                    .send(&action, Some(&[("decision", "approve")]))
                    .await;
                assert_eq!(status, 303, "{page}");
                location.unwrap()
            }
            _ => panic!("unexpected page at the provider ({status}): {page}"),
        };
        if next.starts_with(&ts.issuer) {
            break next;
        }
        url = next;
    };
    assert_eq!(
        (logins, consents),
        (1, 1),
        "one login page, one consent page"
    );
    assert!(
        callback.starts_with(&ts.url("/connect/up/callback?")),
        "{callback}"
    );
    let (status, location, body) = ts.browse(&callback).await;
    assert_eq!(status, 303, "callback completes: {body}");
    assert!(location.unwrap().ends_with("/ui/accounts?connected=up"));

    let conn = ts
        .vault
        .store()
        .connection_by_name("up")
        .await
        .unwrap()
        .unwrap();
    let sub = format!("acc-{login}");
    ts.vault
        .store()
        .list_accounts(Some(&ts.info.user_id))
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.connection_id == conn.id && a.upstream_account_id.as_deref() == Some(&sub))
        .unwrap_or_else(|| panic!("no account {sub} for connection up"))
}

/// A privileged-worker exchange by the demo agent for connection `up`.
async fn exchange_up(ts: &TestServer, login_hint: Option<&str>) -> Answer {
    let mut params = ts.exchange_params();
    for (k, v) in params.iter_mut() {
        if k == "connection" {
            *v = "up".into();
        }
    }
    if let Some(hint) = login_hint {
        params.push(("login_hint".into(), hint.into()));
    }
    ts.post_form(&params).await
}

/// The provider's userinfo endpoint called with an upstream access token.
async fn upstream_userinfo(ts: &TestServer, token: &str) -> (StatusCode, Value) {
    let conn = ts
        .vault
        .store()
        .connection_by_name("up")
        .await
        .unwrap()
        .unwrap();
    let resp = reqwest::Client::new()
        .get(conn.userinfo_url.unwrap())
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// oidc-provider on 127.0.0.1, registered in Latchkey as connection `up` through the CLI
/// (OpenID discovery), and the demo agent allowed `openid profile` on it.
async fn start_up(ts: &TestServer) -> Upstream {
    let secret = "latchkey-at-oidc-provider";
    let up = Upstream::start(&ts.url("/connect/up/callback"), secret);
    let secret_file = ts.dir.path().join("up.secret");
    std::fs::write(&secret_file, secret).unwrap();
    let out = ts.cli(&[
        "connection",
        "add",
        "up",
        "--provider",
        "oidc",
        "--issuer",
        &up.issuer,
        "--client-id",
        "latchkey",
        "--client-secret-file",
        secret_file.to_str().unwrap(),
        "--scopes",
        "openid offline_access profile",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = ts
        .vault
        .store()
        .connection_by_name("up")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conn.authorize_url, format!("{}/auth", up.issuer));
    assert_eq!(conn.token_url, format!("{}/token", up.issuer));
    assert_eq!(
        conn.revoke_url,
        Some(format!("{}/token/revocation", up.issuer))
    );
    ts.vault
        .grant(
            &ts.info.agent_id,
            "up",
            Scopes::parse("openid profile"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    up
}

/// Two accounts of one connection for one Latchkey user; `login_hint` (the provider's `sub`)
/// picks one, an unknown one is a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_provider_two_accounts_and_login_hint() {
    let ts = TestServer::start().await;
    let _up = start_up(&ts).await;

    let alice = connect_up(&ts, "alice", "alice-password").await;
    let answer = exchange_up(&ts, None).await;
    assert_eq!(answer.body["scope"], "openid profile");
    let expires_in = answer.body["expires_in"].as_i64().unwrap();
    assert!((1..=60).contains(&expires_in), "{expires_in}");
    let (status, info) = upstream_userinfo(&ts, answer.token()).await;
    assert_eq!(
        (
            status,
            info["sub"].as_str(),
            info["preferred_username"].as_str()
        ),
        (StatusCode::OK, Some("acc-alice"), Some("alice"))
    );

    let bob = connect_up(&ts, "bob", "bob-password").await;
    assert_ne!(bob.id, alice.id);
    for sub in ["acc-alice", "acc-bob", "acc-alice"] {
        let answer = exchange_up(&ts, Some(sub)).await;
        let (status, info) = upstream_userinfo(&ts, answer.token()).await;
        assert_eq!((status, info["sub"].as_str()), (StatusCode::OK, Some(sub)));
    }
    exchange_up(&ts, Some("nobody"))
        .await
        .assert_error(401, NOT_CONNECTED);
}

/// Refresh at the provider after expiry (rotating the refresh token), then disconnect: the
/// provider revokes the grant and the next exchange is a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_provider_refresh_rotation_and_revocation() {
    let ts = TestServer::start().await;
    let up = start_up(&ts).await;

    // Alice connects; the provider issued a refresh token for her (offline_access).
    let alice = connect_up(&ts, "alice", "alice-password").await;
    assert_eq!(
        alice.scopes.to_string_spaced(),
        "offline_access openid profile",
        "the provider granted offline_access"
    );
    assert!(alice.refresh_token.is_some());
    let rt1 = up.event("refresh token for alice", |e| {
        e["event"] == "refresh_token.saved" && e["sub"] == "acc-alice"
    });
    let token1 = exchange_up(&ts, None).await.token().to_owned();
    assert_eq!(upstream_userinfo(&ts, &token1).await.0, StatusCode::OK);

    // Past the access token's expiry (Latchkey's clock): Latchkey refreshes at the provider,
    // which rotates the refresh token; the new access token works there.
    ts.clock.advance(61);
    let token2 = exchange_up(&ts, None).await.token().to_owned();
    assert_ne!(token2, token1, "a refreshed token");
    let (status, info) = upstream_userinfo(&ts, &token2).await;
    assert_eq!(
        (status, info["sub"].as_str()),
        (StatusCode::OK, Some("acc-alice"))
    );
    up.event("consumption of the first refresh token", |e| {
        e["event"] == "refresh_token.consumed" && e["id"] == rt1["id"]
    });
    let rt2 = up.event("a rotated refresh token", |e| {
        e["event"] == "refresh_token.saved" && e["sub"] == "acc-alice" && e["id"] != rt1["id"]
    });
    assert_eq!(rt2["grant"], rt1["grant"], "same grant, rotated token");
    // Fresh again: the next exchange reuses it without another refresh.
    assert_eq!(exchange_up(&ts, None).await.token(), token2);

    // Disconnect: Latchkey asks the provider to revoke (RFC 7009), which ends the grant and
    // with it the access token handed out; the next exchange is refused.
    let out = ts.cli(&["account", "revoke", &alice.id]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("the provider revoked its refresh token"),
        "{said}"
    );
    up.event("revocation of alice's grant", |e| {
        e["event"] == "grant.revoked" && e["grant"] == rt1["grant"]
    });
    assert_eq!(
        upstream_userinfo(&ts, &token2).await.0,
        StatusCode::UNAUTHORIZED
    );
    exchange_up(&ts, None)
        .await
        .assert_error(401, NOT_CONNECTED);
}

// --- Auth0's Node SDKs ---------------------------------------------------------------------

/// The demo user signs in to `app` (scope `openid offline_access`); its Latchkey refresh token.
async fn refresh_token_for(ts: &TestServer, app: &App) -> String {
    let p = pkce();
    let code = sign_in_for_code(ts, &authorize_url(ts, &app.id, &p, &[])).await;
    let signed_in = code_grant(ts, app, &code, &p.verifier).await;
    signed_in.body["refresh_token"].as_str().unwrap().to_owned()
}

async fn grant(ts: &TestServer, client_id: &str, scopes: &str) {
    ts.vault
        .grant(
            client_id,
            "demo-git",
            Scopes::parse(scopes),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
}

/// T6, T7: `auth0` 7's (legacy) AuthenticationClient `oauth.tokenForConnection`, which sends
/// the client secret without a client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_node_token_for_connection() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let app1 = app(&ts, "notes", confidential()).await;
    grant(&ts, &app1.id, "read:user repo:read").await;
    let refresh = refresh_token_for(&ts, &app1).await;

    // T6: a refresh token as the subject (the SDK's default subject type).
    let run = |vars: Vec<(&'static str, String)>| {
        let ts = &ts;
        async move {
            let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            sdk(ts, "auth0-token-for-connection", &vars).await
        }
    };
    let answer = run(vec![
        ("LK_CLIENT_ID", app1.id.clone()),
        ("LK_CLIENT_SECRET", app1.secret.clone()),
        ("LK_SUBJECT_TOKEN", refresh.clone()),
        ("LK_CONNECTION", "demo-git".into()),
    ])
    .await;
    assert_eq!(answer["status"], 200, "{answer}");
    let data = &answer["data"];
    assert_eq!(
        (
            data["token_type"].as_str(),
            data["issued_token_type"].as_str(),
            data["scope"].as_str()
        ),
        (Some("Bearer"), Some(FCAT), Some("read:user repo:read"))
    );
    assert!(data["expires_in"].is_i64());
    assert_eq!(
        ts.demo_api(data["access_token"].as_str().unwrap(), "user")
            .await
            .0,
        200
    );
    let request = token_request(&answer);
    assert_eq!(request["contentType"], "application/x-www-form-urlencoded");
    assert!(
        request["params"].get("client_id").is_none(),
        "no client_id: {request}"
    );
    assert_eq!(request["params"]["client_secret"], "<secret>");
    assert_eq!(request["params"]["subject_token_type"], RT_TYPE);
    let audit = ts.vault.store().list_audit(1).await.unwrap();
    assert_eq!(
        (
            audit[0].record.action.as_str(),
            audit[0].record.actor_id.as_str()
        ),
        ("token.release", app1.id.as_str()),
        "Latchkey knew the client by its secret"
    );
    // An unknown login_hint: the SDK's AuthApiError carries Latchkey's status and code.
    let answer = run(vec![
        ("LK_CLIENT_ID", app1.id.clone()),
        ("LK_CLIENT_SECRET", app1.secret.clone()),
        ("LK_SUBJECT_TOKEN", refresh.clone()),
        ("LK_CONNECTION", "demo-git".into()),
        ("LK_LOGIN_HINT", "9999".into()),
    ])
    .await;
    assert_eq!(
        (
            answer["name"].as_str(),
            answer["statusCode"].as_i64(),
            answer["error"].as_str()
        ),
        (Some("AuthApiError"), Some(401), Some(NOT_CONNECTED)),
        "{answer}"
    );

    // T7: an API's access token as the subject, with login_hint; the API is the client.
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
    grant(&ts, &api.id, "repo:read").await;
    let p = pkce();
    let code = sign_in_for_code(
        &ts,
        &authorize_url(&ts, &app1.id, &p, &[("audience", api_id)]),
    )
    .await;
    let for_api = code_grant(&ts, &app1, &code, &p.verifier).await;
    let answer = run(vec![
        ("LK_CLIENT_ID", api.id.clone()),
        ("LK_CLIENT_SECRET", api.secret.clone()),
        ("LK_SUBJECT_TOKEN", for_api.token().to_owned()),
        ("LK_SUBJECT_TOKEN_TYPE", AT_TYPE.into()),
        ("LK_CONNECTION", "demo-git".into()),
        ("LK_LOGIN_HINT", "1001".into()),
    ])
    .await;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["data"]["scope"], "repo:read");
    let token = answer["data"]["access_token"].as_str().unwrap();
    assert_eq!(ts.demo_api(token, "repos").await.0, 200);
    assert_eq!(
        ts.demo_api(token, "user").await.0,
        403,
        "narrowed to the API's grant"
    );
    let request = token_request(&answer);
    assert!(request["params"].get("client_id").is_none());
    assert_eq!(
        (
            request["params"]["subject_token_type"].as_str(),
            request["params"]["login_hint"].as_str()
        ),
        (Some(AT_TYPE), Some("1001"))
    );
}

/// T2, T14, T15, T16: `@auth0/auth0-auth-js` AuthClient — discovery, `exchangeToken` with a
/// client secret and with `private_key_jwt`, and its error path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_auth_js_exchange_token() {
    let ts = TestServer::start().await;
    let key = generate(Algorithm::RS256);
    let key_file = ts.dir.path().join("app.key");
    std::fs::write(&key_file, key.private_pem.as_bytes()).unwrap();
    let public = PublicKey::parse(&key.public_pem, Some(Algorithm::RS256), None).unwrap();
    let app1 = app(
        &ts,
        "notes",
        NewClient {
            keys: vec![public],
            ..confidential()
        },
    )
    .await;
    grant(&ts, &app1.id, "read:user").await;
    let refresh = refresh_token_for(&ts, &app1).await;
    let by_secret = [
        ("LK_CLIENT_ID", app1.id.as_str()),
        ("LK_CLIENT_SECRET", app1.secret.as_str()),
    ];

    // T2: discovery over TLS.
    let answer = sdk(&ts, "auth-js-discovery", &by_secret).await;
    assert_eq!(answer["metadata"]["issuer"], ts.issuer.as_str(), "{answer}");
    assert_eq!(answer["metadata"]["token_endpoint"], ts.url("/oauth/token"));
    assert_eq!(
        answer["metadata"]["jwks_uri"],
        ts.url("/.well-known/jwks.json")
    );

    let exchange = [
        ("LK_SUBJECT_TOKEN", refresh.as_str()),
        ("LK_SUBJECT_TOKEN_TYPE", RT_TYPE),
        ("LK_CONNECTION", "demo-git"),
    ];
    // T16: the user has not connected demo-git yet.
    let answer = sdk(
        &ts,
        "auth-js-exchange",
        &[&by_secret[..], &exchange[..]].concat(),
    )
    .await;
    assert_eq!(
        (
            answer["ok"].as_bool(),
            answer["name"].as_str(),
            answer["statusCode"].as_i64(),
            answer["cause"]["error"].as_str()
        ),
        (
            Some(false),
            Some("TokenExchangeError"),
            Some(401),
            Some(NOT_CONNECTED)
        ),
        "{answer}"
    );
    assert_eq!(
        answer["message"],
        "Failed to exchange token for connection 'demo-git'."
    );

    ts.connect_demo_account().await;
    // T14: client secret (client_secret_post: client_id and secret in the form).
    let answer = sdk(
        &ts,
        "auth-js-exchange",
        &[&by_secret[..], &exchange[..]].concat(),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let token = &answer["token"];
    // openid-client lower-cases token_type ("Bearer" on the wire).
    assert_eq!(token["tokenType"], "bearer");
    assert_eq!(
        (token["issuedTokenType"].as_str(), token["scope"].as_str()),
        (Some(FCAT), Some("read:user"))
    );
    let lifetime = token["expiresAt"].as_i64().unwrap() - answer["now"].as_i64().unwrap();
    assert!((1..=3600).contains(&lifetime), "{lifetime}");
    assert_eq!(
        ts.demo_api(token["accessToken"].as_str().unwrap(), "user")
            .await
            .0,
        200
    );
    let request = token_request(&answer);
    assert!(
        request["contentType"]
            .as_str()
            .unwrap()
            .starts_with("application/x-www-form-urlencoded")
    );
    assert_eq!(request["params"]["client_id"], app1.id.as_str());
    assert_eq!(request["params"]["client_secret"], "<secret>");
    assert_eq!(request["params"]["requested_token_type"], FCAT);

    // T15: private_key_jwt, the SDK minting the assertion for the discovered issuer.
    let by_key = [
        ("LK_CLIENT_ID", app1.id.as_str()),
        ("LK_KEY_FILE", key_file.to_str().unwrap()),
    ];
    let answer = sdk(
        &ts,
        "auth-js-exchange",
        &[&by_key[..], &exchange[..]].concat(),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        ts.demo_api(answer["token"]["accessToken"].as_str().unwrap(), "user")
            .await
            .0,
        200
    );
    let request = token_request(&answer);
    assert_eq!(request["params"]["client_id"], app1.id.as_str());
    assert_eq!(request["params"]["client_assertion_type"], JWT_BEARER);
    assert!(request["params"].get("client_secret").is_none());
    let audit = ts.vault.store().list_audit(1).await.unwrap();
    assert_eq!(
        (
            audit[0].record.actor_id.as_str(),
            audit[0].record.auth_method.as_str()
        ),
        (app1.id.as_str(), "private_key_jwt")
    );
}

/// The two ways `@auth0/ai`'s Token Vault authorizer runs a tool here: its base class's
/// `protect()` directly, and `@auth0/ai-vercel`'s `withTokenVault()` around a Vercel AI SDK
/// `tool()` — what an application writes.
const AI_SCENARIOS: [&str; 2] = ["ai-token-vault", "ai-vercel-with-token-vault"];

/// T8, T9, T10 (in part), T11: `@auth0/ai`'s Token Vault authorizer around a tool, in a plain
/// Node script (no model): bare, and through `@auth0/ai-vercel`'s `withTokenVault`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_ai_token_vault() {
    let ts = TestServer::start().await;
    let app1 = app(&ts, "agent-app", confidential()).await;
    grant(&ts, &app1.id, "read:user repo:read").await;
    let refresh = refresh_token_for(&ts, &app1).await;
    let run = |scenario: &'static str, scopes: &'static str| {
        let (ts, app1, refresh) = (&ts, &app1, &refresh);
        async move {
            sdk(
                ts,
                scenario,
                &[
                    ("LK_CLIENT_ID", app1.id.as_str()),
                    ("LK_CLIENT_SECRET", app1.secret.as_str()),
                    ("LK_REFRESH_TOKEN", refresh.as_str()),
                    ("LK_CONNECTION", "demo-git"),
                    ("LK_SCOPES", scopes),
                ],
            )
            .await
        }
    };

    // T11: not connected → Latchkey's 401 becomes a TokenVaultInterrupt for the connection.
    for scenario in AI_SCENARIOS {
        let answer = run(scenario, "read:user").await;
        let interrupt = &answer["interrupt"];
        assert_eq!(
            (
                answer["ok"].as_bool(),
                interrupt["name"].as_str(),
                interrupt["code"].as_str(),
                interrupt["connection"].as_str()
            ),
            (
                Some(false),
                Some("AUTH0_AI_INTERRUPT"),
                Some("TOKEN_VAULT_ERROR"),
                Some("demo-git")
            ),
            "{scenario}: {answer}"
        );
        assert_eq!(
            interrupt["requiredScopes"],
            serde_json::json!(["read:user"]),
            "{scenario}"
        );
        let request = token_request(&answer);
        assert_eq!(request["contentType"], "application/json", "{scenario}");
        assert_eq!(
            request["params"]["client_id"],
            app1.id.as_str(),
            "{scenario}"
        );
    }

    ts.connect_demo_account().await;
    for scenario in AI_SCENARIOS {
        // T8: the tool runs with the upstream token.
        let answer = run(scenario, "read:user repo:read").await;
        assert_eq!(answer["ok"], true, "{scenario}: {answer}");
        assert_eq!(
            answer["credentials"]["scopes"],
            serde_json::json!(["read:user", "repo:read"]),
            "{scenario}"
        );
        assert!(answer["credentials"]["expiresIn"].is_i64(), "{scenario}");
        let token = answer["accessToken"].as_str().unwrap();
        assert_eq!(ts.demo_api(token, "user").await.0, 200, "{scenario}");
        assert_eq!(ts.demo_api(token, "repos").await.0, 200, "{scenario}");
        // T10 (the part that applies here): one scope out of a space-delimited multi-scope
        // answer.
        let answer = run(scenario, "repo:read").await;
        assert_eq!(answer["ok"], true, "{scenario}: {answer}");
        // T9: a scope outside the grant → an interrupt naming what is missing.
        let answer = run(scenario, "read:user repo:write").await;
        let interrupt = &answer["interrupt"];
        assert_eq!(
            interrupt["code"], "TOKEN_VAULT_ERROR",
            "{scenario}: {answer}"
        );
        assert_eq!(
            interrupt["requiredScopes"],
            serde_json::json!(["read:user", "repo:read", "repo:write"]),
            "{scenario}"
        );
        assert!(
            interrupt["message"]
                .as_str()
                .unwrap()
                .ends_with("Missing scopes: repo:write"),
            "{scenario}: {interrupt}"
        );
    }
}
