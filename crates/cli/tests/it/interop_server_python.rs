//! Auth0's server SDK for Python (auth0-server-python from PyPI, unchanged) as an app's server
//! against Latchkey: interactive login, Connected Accounts, the token-vault exchange
//! (auth0-wire.md T18, T19, T24–T33). The driver (`interop/python/server_python_driver.py`) runs
//! the SDK; this test is the browser between them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewClient};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::harness::*;
use crate::oidc::{REDIRECT, app};

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn python() -> PathBuf {
    std::env::var_os("LATCHKEY_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("interop/.venv/bin/python"))
}

/// The driver process, speaking one JSON object per line; killed when dropped.
struct Driver {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr_file: PathBuf,
}

impl Driver {
    /// The next message; `step` must be what the driver says it is at.
    async fn expect(&mut self, step: &str) -> Value {
        let line = tokio::time::timeout(STEP_TIMEOUT, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {step:?} from the driver: {}", self.stderr()))
            .unwrap()
            .unwrap_or_else(|| panic!("the driver ended before {step:?}: {}", self.stderr()));
        let msg: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("not JSON: {line}\n{}", self.stderr()));
        assert_eq!(msg["step"], step, "{msg}\n{}", self.stderr());
        msg
    }

    async fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }
}

fn query(location: &str) -> HashMap<String, String> {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The browser at the SDK's authorize URL: sign in at Latchkey, come back with a code.
async fn sign_in(ts: &TestServer, authorize: &str) -> String {
    let (status, to_login, body) = ts.browse(authorize).await;
    assert_eq!(status, 303, "{body}");
    let to_login = to_login.unwrap();
    assert!(to_login.starts_with(&ts.url("/login?")), "{to_login}");
    let (_, _, page) = ts.browse(&to_login).await;
    let csrf = hidden_field(&page, "csrf");
    let next = query(&to_login)["next"].clone();
    let (status, back, _) = ts
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
    assert_eq!(status, 303);
    let (status, callback, body) = ts.browse(&back.unwrap()).await;
    assert_eq!(status, 302, "{body}");
    callback.unwrap()
}

/// The browser at the SDK's connect URL: Latchkey → the demo provider's consent → back to the
/// app with a connect_code.
async fn approve_connect(ts: &TestServer, connect: &str) -> String {
    let (status, to_provider, body) = ts.browse(connect).await;
    assert_eq!(status, 303, "{body}");
    let to_provider = to_provider.unwrap();
    assert!(
        to_provider.starts_with(&ts.url("/demo/oauth/authorize?")),
        "{to_provider}"
    );
    let (status, _, page) = ts.browse(&to_provider).await;
    assert_eq!(status, 200, "the demo provider's consent page");
    let consent = hidden_field(&page, "consent");
    let (status, callback, _) = ts
        .submit(
            "/demo/oauth/authorize",
            &[("consent", &consent), ("decision", "approve")],
        )
        .await;
    assert_eq!(status, 302);
    let (status, back, body) = ts.browse(&callback.unwrap()).await;
    assert_eq!(status, 302, "{body}");
    back.unwrap()
}

/// The app configured as its developers are told to in the SDK's Connected Accounts guide:
/// default scopes per audience (the My Account API's), the login's scopes given at login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_server_python_sdk_scopes_per_audience() {
    login_and_connected_accounts("per-audience").await;
}

/// The app configured with one default scope string (`openid profile offline_access`), which
/// the SDK adds to every token request: the My Account refreshes then ask for
/// `openid profile offline_access create:me:connected_accounts` at audience https://{host}/me/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_server_python_sdk_default_scope_string() {
    login_and_connected_accounts("string").await;
}

/// Login, connect two accounts, list, exchange, delete — all through the SDK; `scopes` is the
/// driver's LK_SCOPES.
async fn login_and_connected_accounts(scopes: &str) {
    let ts = TestServer::start().await;
    // A second demo connection, so that listing has two accounts to page through.
    let second = latchkey_server::demo::demo_connection(&ts.vault, "demo-git-2")
        .await
        .unwrap();
    ts.vault
        .add_connection(second, &Actor::cli())
        .await
        .unwrap();
    let spy = app(
        &ts,
        "spy",
        NewClient {
            redirect_uris: vec![REDIRECT.into()],
            with_secret: true,
            ..Default::default()
        },
    )
    .await;
    ts.vault
        .grant(
            &spy.id,
            "demo-git",
            Scopes::parse("read:user repo:read"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();

    let python = python();
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates interop/.venv from interop/python/requirements.txt)",
        python.display()
    );
    let domain = ts
        .issuer
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let stderr_file = ts.dir.path().join("driver.stderr");
    let mut child = Command::new(&python)
        .arg(workspace_root().join("interop/python/server_python_driver.py"))
        .env("LK_DOMAIN", &domain)
        .env("LK_CLIENT_ID", &spy.id)
        .env("LK_CLIENT_SECRET", &spy.secret)
        .env("LK_REDIRECT_URI", REDIRECT)
        .env("LK_CONNECTIONS", "demo-git,demo-git-2")
        .env("LK_SCOPES", scopes)
        .env("SSL_CERT_FILE", &ts.ca_path)
        .env("LK_WIRE_LOG", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_file).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut driver = Driver {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
        _child: child,
        stderr_file,
    };

    // Login: the SDK built the authorize URL from Latchkey's discovery document.
    let login = driver.expect("login").await;
    let authorize = login["url"].as_str().unwrap();
    assert!(authorize.starts_with(&ts.url("/authorize?")), "{authorize}");
    let q = query(authorize);
    assert_eq!(
        (
            q["response_type"].as_str(),
            q["client_id"].as_str(),
            q["redirect_uri"].as_str(),
            q["scope"].as_str(),
            q["code_challenge_method"].as_str(),
        ),
        (
            "code",
            spy.id.as_str(),
            REDIRECT,
            "openid profile offline_access",
            "S256"
        )
    );
    let callback = sign_in(&ts, authorize).await;
    assert!(callback.starts_with(REDIRECT), "{callback}");
    assert_eq!(query(&callback)["state"], q["state"]);
    driver.send(&callback).await;

    // T24–T26 for each connection: the SDK's connect URL is connect_uri?ticket=…; the browser
    // comes back with connect_code and the SDK's state.
    let mut states = Vec::new();
    for connection in ["demo-git", "demo-git-2"] {
        let connect = driver.expect("connect").await;
        assert_eq!(connect["connection"], connection);
        let url = connect["url"].as_str().unwrap();
        assert!(
            url.starts_with(&ts.url("/connected-accounts/connect?ticket=")),
            "{url}"
        );
        let back = approve_connect(&ts, url).await;
        assert!(back.starts_with(REDIRECT), "{back}");
        let bq = query(&back);
        assert!(bq.contains_key("connect_code"), "{back}");
        states.push(bq["state"].clone());
        driver.send(&back).await;
    }
    assert_ne!(states[0], states[1]);

    // T18: the exchange answered 200 with a token the provider accepts, narrowed to the grant.
    let exchanged = driver.expect("exchanged").await;
    let token = exchanged["token"].as_str().unwrap().to_owned();
    assert_eq!(ts.demo_api(&token, "user").await.0, 200);
    assert_eq!(ts.demo_api(&token, "repos").await.0, 200);
    driver.send("continue").await;

    let done = driver.expect("done").await;
    let d = |k: &str| done[k].clone();

    // Login: the session is the demo user's, with a refresh token.
    assert_eq!(
        d("login"),
        json!({"sub": ts.info.user_id, "has_refresh_token": true, "scope": "offline_access openid profile"})
    );
    assert_eq!(d("user"), json!(ts.info.user_id));
    // The My Account tokens came from refreshing with audience https://{domain}/me/, a scope at
    // a time as the SDK asked for them, next to the login's own token set.
    let me = format!("{}me/", ts.issuer);
    let token_sets = d("token_sets");
    let token_sets = token_sets.as_array().unwrap();
    assert!(
        token_sets
            .contains(&json!({"audience": "default", "scope": "offline_access openid profile"})),
        "{token_sets:?}"
    );
    // Which scopes the SDK caches per token set is its own business (it differs between the
    // scope settings); what Latchkey guarantees is a My Account token it could connect with. The
    // listing and deleting below only succeed with tokens carrying their scopes.
    assert!(
        token_sets.iter().any(|t| t["audience"] == me.as_str()
            && t["scope"]
                .as_str()
                .unwrap()
                .split(' ')
                .any(|s| s == "create:me:connected_accounts")),
        "{token_sets:?}"
    );

    // T26: complete answered 201 with the account. Latchkey asks the provider for the
    // connection's scopes plus those requested (here all of the demo's).
    let demo_scopes: Vec<&str> = {
        let mut all = latchkey_core::catalog::demo_paths::SCOPES.to_vec();
        all.sort();
        all
    };
    let completed = d("completed");
    let completed = completed.as_array().unwrap();
    assert_eq!(completed.len(), 2);
    for (account, connection) in completed.iter().zip(["demo-git", "demo-git-2"]) {
        assert!(
            account["id"].as_str().unwrap().starts_with("cac_"),
            "{account}"
        );
        assert_eq!(account["connection"], connection);
        assert_eq!(account["access_type"], "offline");
        assert_eq!(account["scopes"], json!(demo_scopes), "{account}");
        assert!(account["created_at"].as_str().unwrap().ends_with('Z'));
    }
    let (main, other) = (&completed[0], &completed[1]);
    let without_app_state = |a: &Value| {
        let mut a = a.clone();
        a.as_object_mut().unwrap().remove("app_state");
        a
    };

    // T30: listing, filtered, and paged one at a time following `next` (sent back as `from`).
    let accounts = d("accounts");
    let mut listed = accounts["accounts"].as_array().unwrap().clone();
    listed.sort_by_key(|a| a["connection"].as_str().unwrap().to_owned());
    assert_eq!(
        listed,
        vec![without_app_state(main), without_app_state(other)]
    );
    assert!(accounts.get("next").is_none());
    assert_eq!(
        d("accounts_filtered"),
        json!({"accounts": [without_app_state(main)]})
    );
    let pages = d("account_pages");
    let pages = pages.as_array().unwrap();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert!(pages[0]["next"].is_string());
    assert!(pages[1].get("next").is_none());
    let mut paged: Vec<Value> = pages
        .iter()
        .map(|p| {
            assert_eq!(p["accounts"].as_array().unwrap().len(), 1, "{p}");
            p["accounts"][0].clone()
        })
        .collect();
    paged.sort_by_key(|a| a["connection"].as_str().unwrap().to_owned());
    assert_eq!(paged, listed);

    // T32: the connections, the same way.
    let connections = d("connections");
    let mut names: Vec<&str> = connections["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["demo-git", "demo-git-2"]);
    for c in connections["connections"].as_array().unwrap() {
        assert_eq!(
            (&c["strategy"], &c["scopes"]),
            (&json!("demo"), &json!(demo_scopes)),
            "{c}"
        );
    }
    let pages = d("connection_pages");
    let pages = pages.as_array().unwrap();
    assert_eq!(pages.len(), 2, "{pages:?}");
    assert_ne!(
        pages[0]["connections"][0]["name"],
        pages[1]["connections"][0]["name"]
    );
    assert!(pages[1].get("next").is_none());

    // T18 (continued): the SDK authenticated with HTTP Basic; the SDK kept the scope.
    assert_eq!(d("connection_token"), json!(token));
    assert_eq!(d("connection_token_scope"), json!("read:user repo:read"));
    // The SDK exchanged again for the second call; Latchkey handed back the same, still valid
    // upstream token.
    assert_eq!(d("connection_token_again"), d("connection_token"));
    let audit = ts.vault.store().list_audit(1000).await.unwrap();
    let releases: Vec<_> = audit
        .iter()
        .filter(|e| e.record.action == "token.release")
        .map(|e| {
            (
                e.record.actor_id.as_str(),
                e.record.auth_method.as_str(),
                e.record.connection.as_deref(),
                e.record.subject_user.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        releases,
        [(
            spy.id.as_str(),
            "client_secret_basic",
            Some("demo-git"),
            Some(ts.info.user_id.as_str())
        ); 2]
    );

    // T33: deleted (204), and gone from the list.
    assert_eq!(d("deleted"), main["id"]);
    assert_eq!(
        d("accounts_after_delete"),
        json!({"accounts": [without_app_state(other)]})
    );
    // Latchkey revoked the account's grant at the provider too: the token is dead.
    assert_eq!(ts.demo_api(&token, "user").await.0, 401);
    // T19: the exchange is now a 401 whose error_description is the SDK's error message.
    let wire = d("after_delete_wire");
    assert_eq!(
        (
            wire["status"].as_i64(),
            wire["content_type"].as_str(),
            wire["body"]["error"].as_str()
        ),
        (
            Some(401),
            Some("application/json"),
            Some("federated_connection_refresh_token_not_found")
        ),
        "{wire}"
    );
    assert_eq!(
        d("after_delete"),
        json!({
            "type": "AccessTokenForConnectionError",
            "code": "api_error",
            "message": wire["body"]["error_description"],
        })
    );
    // Deleting again: a 404 problem, read by the SDK as MyAccountApiError.
    assert_eq!(d("delete_again")["status"], 404, "{}", d("delete_again"));
    assert_eq!(d("delete_again")["title"], "Not Found");
}
