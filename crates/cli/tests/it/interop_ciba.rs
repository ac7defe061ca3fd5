//! CIBA with clients nobody here wrote (auth0-wire.md T36–T41): auth0-python's
//! `BackChannelLogin.back_channel_login` and `GetToken.backchannel_login`, and `@auth0/ai`'s
//! `withAsyncAuthorization` (through `@auth0/ai-vercel`, in interrupt and block mode), unchanged,
//! through pending, slow_down, approve, deny and expiry; and `@auth0/ai`'s CIBA poller resuming
//! a token exchange Latchkey held for approval. `scripts/test` installs both.
//!
//! And the other SDKs' CIBA calls (T37, T42–T44, `interop/node/ciba_sdks.mjs`,
//! `interop/python/ciba_server.py`): `auth0` (Node) `backchannel.authorize` with `audience: ""`,
//! a user with no way to be asked (`invalid_request` → `UserDoesNotHavePushNotificationsInterrupt`),
//! `@auth0/auth0-auth-js` `backchannelAuthentication` and auth0-server-python `login_backchannel`
//! (HTTP Basic), each polling on its own until the user approves.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::approvals::{Client, secret_client};
use crate::harness::*;
use crate::login::password_step;
use crate::oidc::{claims_unverified, userinfo};

fn domain(ts: &TestServer) -> String {
    ts.issuer
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned()
}

/// `interop/python/ciba.py` with `args` and `vars`: its JSON answer and whether it succeeded.
async fn python(ts: &TestServer, args: &[&str], vars: &[(&str, &str)]) -> (bool, Value) {
    let python = std::env::var_os("LATCHKEY_INTEROP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("interop/.venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates interop/.venv with auth0-python)",
        python.display()
    );
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(workspace_root().join("interop/python/ciba.py"))
        .args(args)
        .env("LK_DOMAIN", domain(ts))
        .env("REQUESTS_CA_BUNDLE", &ts.ca_path)
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the Python script finishes within 60 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || out.status.code() == Some(3),
        "{args:?}: {stderr}"
    );
    let answer = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{args:?}: not JSON: {} / {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.success(), answer)
}

fn assert_refused(answer: &(bool, Value), status: u16, code: &str) {
    assert!(!answer.0, "{:?}", answer.1);
    assert_eq!(
        (answer.1["status"].as_u64(), answer.1["error"].as_str()),
        (Some(u64::from(status)), Some(code)),
        "{:?}",
        answer.1
    );
}

/// The newest approval's id, from the store.
async fn newest(ts: &TestServer) -> latchkey_core::model::Approval {
    ts.vault
        .store()
        .list_approvals(&latchkey_core::store::ApprovalFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_python_back_channel_login() {
    let ts = TestServer::start().await;
    let c = secret_client(&ts, "python-ciba").await;
    let details = r#"[{"type": "account_information", "actions": ["list_accounts"]}]"#;
    let with_secret = |extra: &[(&'static str, String)]| {
        let mut v: Vec<(&str, String)> = vec![
            ("LK_CLIENT_ID", c.id.clone()),
            ("LK_CLIENT_SECRET", c.secret.clone()),
            ("LK_USER_ID", ts.info.user_id.clone()),
        ];
        v.extend(extra.iter().cloned());
        v
    };
    let run = |args: Vec<String>, v: Vec<(&'static str, String)>| {
        let ts = &ts;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let v: Vec<(&str, &str)> = v.iter().map(|(k, x)| (*k, x.as_str())).collect();
            python(ts, &args, &v).await
        }
    };

    // T36/T38: form body, login_hint JSON with spaces, audience=None, requested_expiry.
    let start_vars = with_secret(&[
        ("LK_BINDING_MESSAGE", "Confirm 42".into()),
        ("LK_AUTHORIZATION_DETAILS", details.into()),
    ]);
    let (ok, started) = run(vec!["start".into()], start_vars).await;
    assert!(ok, "{started}");
    assert_eq!(
        (started["expires_in"].as_i64(), started["interval"].as_i64()),
        (Some(300), Some(5))
    );
    let auth_req_id = started["auth_req_id"].as_str().unwrap().to_owned();
    let approval = newest(&ts).await;
    assert_eq!(approval.binding_message.as_deref(), Some("Confirm 42"));
    assert_eq!(approval.audience, None, "audience=None is absent");
    assert_eq!(approval.client_id, c.id);

    // T39: pending, then too fast (JSON body at the token endpoint).
    let poll = || run(vec!["poll".into(), auth_req_id.clone()], with_secret(&[]));
    assert_refused(&poll().await, 400, "authorization_pending");
    let fast = poll().await;
    assert_refused(&fast, 400, "slow_down");
    assert_eq!(fast.1["retry_after"], "10");

    // T40: approved → ID token, access token, authorization_details; then invalid_grant.
    ts.cli_ok(&["approvals", "approve", &approval.id]);
    ts.clock.advance(10);
    let (ok, tokens) = poll().await;
    assert!(ok, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert!(tokens["expires_in"].is_i64());
    assert_eq!(
        tokens["authorization_details"],
        serde_json::from_str::<Value>(details).unwrap()
    );
    let id_token = claims_unverified(tokens["id_token"].as_str().unwrap());
    assert_eq!(
        (id_token["iss"].as_str(), id_token["aud"].as_str()),
        (Some(ts.issuer.as_str()), Some(c.id.as_str()))
    );
    assert_eq!(
        userinfo(&ts, tokens["access_token"].as_str().unwrap())
            .await
            .0,
        200
    );
    ts.clock.advance(10);
    assert_refused(&poll().await, 400, "invalid_grant");

    // T41: denied → access_denied. This time the client authenticates with private_key_jwt.
    let key_file = ts.info.agent_key.display().to_string();
    let by_key = |extra: &[(&'static str, String)]| {
        let mut v: Vec<(&'static str, String)> = vec![
            ("LK_CLIENT_ID", ts.info.agent_id.clone()),
            ("LK_KEY_FILE", key_file.clone()),
            ("LK_USER_ID", ts.info.user_id.clone()),
        ];
        v.extend(extra.iter().cloned());
        v
    };
    let (ok, started) = run(
        vec!["start".into()],
        by_key(&[("LK_BINDING_MESSAGE", "Transfer 7".into())]),
    )
    .await;
    assert!(ok, "{started}");
    let denied_id = started["auth_req_id"].as_str().unwrap().to_owned();
    ts.cli_ok(&["approvals", "deny", &newest(&ts).await.id]);
    assert_refused(
        &run(vec!["poll".into(), denied_id], by_key(&[])).await,
        400,
        "access_denied",
    );

    // T41: expired → access_denied (not expired_token).
    let (ok, started) = run(
        vec!["start".into()],
        with_secret(&[
            ("LK_BINDING_MESSAGE", "Expires soon".into()),
            ("LK_REQUESTED_EXPIRY", "30".into()),
        ]),
    )
    .await;
    assert!(ok, "{started}");
    assert_eq!(started["expires_in"], 30);
    let expiring = started["auth_req_id"].as_str().unwrap().to_owned();
    ts.clock.advance(31);
    assert_refused(
        &run(vec!["poll".into(), expiring], with_secret(&[])).await,
        400,
        "access_denied",
    );
    assert_eq!(newest(&ts).await.status.as_str(), "expired");
}

/// `interop/node/ciba.mjs`, kept running: one command line in, one answer line out.
struct NodeAgent {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl NodeAgent {
    fn start(ts: &TestServer, c: &Client) -> Self {
        let dir = workspace_root().join("interop/node");
        assert!(
            dir.join("node_modules/@auth0/ai-vercel").is_dir(),
            "{}/node_modules is missing: run scripts/test (it runs npm ci there)",
            dir.display()
        );
        let mut child = tokio::process::Command::new("node")
            .arg(dir.join("ciba.mjs"))
            .env("LK_DOMAIN", domain(ts))
            .env("LK_CLIENT_ID", &c.id)
            .env("LK_CLIENT_SECRET", &c.secret)
            .env("LK_USER_ID", &ts.info.user_id)
            .env("NODE_EXTRA_CA_CERTS", &ts.ca_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed (scripts/test checks)");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            stdout,
        }
    }

    async fn send(&mut self, command: Value) {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn answer(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .expect("the Node agent answers within 60 s")
            .unwrap()
            .expect("the Node agent is still running");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
    }

    /// Invoke a protected tool once (as the AI SDK would) and return what came of it.
    async fn call(&mut self, tool: &str, call: &str, qty: i64) -> Value {
        self.send(json!({"tool": tool, "call": call, "qty": qty}))
            .await;
        self.answer().await
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn interrupt_code(answer: &Value) -> &str {
    assert_eq!(answer["ok"], false, "{answer}");
    answer["interrupt"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"))
}

/// The user approves (or denies) on the approvals page.
async fn decide_on_the_page(ts: &TestServer, id: &str, decision: &str) {
    let (status, _, page) = ts.browse(&format!("/ui/approvals/{id}")).await;
    assert_eq!(status, 200, "{page}");
    let csrf = hidden_field(&page, "csrf");
    let (status, _, body) = ts
        .submit(
            &format!("/ui/approvals/{id}"),
            &[("csrf", &csrf), ("decision", decision)],
        )
        .await;
    assert_eq!(status, 303, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_ai_with_async_authorization() {
    let ts = TestServer::start().await;
    let c = secret_client(&ts, "vercel-agent").await;
    assert_eq!(password_step(&ts, &ts.info.password).await.0, 303);
    let mut agent = NodeAgent::start(&ts, &c);

    // First call: /bc-authorize, one poll, AuthorizationPendingInterrupt (the agent pauses).
    let first = agent.call("buy", "call-1", 3).await;
    assert_eq!(
        interrupt_code(&first),
        "ASYNC_AUTHORIZATION_AUTHORIZATION_PENDING"
    );
    assert_eq!(first["retry"], 5);
    let approval = newest(&ts).await;
    assert_eq!(approval.client_id, c.id);
    assert_eq!(
        approval.binding_message.as_deref(),
        Some("Buy 3 shares of ACME")
    );
    assert_eq!(approval.scopes.to_string_spaced(), "openid stock:trade");
    assert_eq!(approval.audience, None, "`audience=` is absent");
    assert_eq!(
        serde_json::from_str::<Value>(approval.authorization_details.as_deref().unwrap()).unwrap(),
        json!([{"type": "trade", "ticker": "ACME", "qty": 3}])
    );
    // Resumed at once: too fast → AuthorizationPollingInterrupt with Retry-After.
    let fast = agent.call("buy", "call-1", 3).await;
    assert_eq!(
        interrupt_code(&fast),
        "ASYNC_AUTHORIZATION_AUTHORIZATION_POLLING_ERROR"
    );
    assert_eq!(fast["retry"], 10);

    // The user approves on the page; the resumed call runs the tool with the credentials.
    decide_on_the_page(&ts, &approval.id, "approve").await;
    ts.clock.advance(10);
    let done = agent.call("buy", "call-1", 3).await;
    assert_eq!(done["ok"], true, "{done}");
    let creds = &done["credentials"];
    assert_eq!(creds["tokenType"], "Bearer");
    assert_eq!(
        creds["authorizationDetails"],
        json!([{"type": "trade", "ticker": "ACME", "qty": 3}])
    );
    assert_eq!(
        claims_unverified(creds["idToken"].as_str().unwrap())["aud"],
        c.id.as_str()
    );
    let (status, me, _) = userinfo(&ts, creds["accessToken"].as_str().unwrap()).await;
    assert_eq!(
        (status, me["sub"].as_str()),
        (200, Some(ts.info.user_id.as_str()))
    );

    // Denied → AccessDeniedInterrupt.
    assert_eq!(
        interrupt_code(&agent.call("buy", "call-2", 5).await),
        "ASYNC_AUTHORIZATION_AUTHORIZATION_PENDING"
    );
    decide_on_the_page(&ts, &newest(&ts).await.id, "deny").await;
    ts.clock.advance(10);
    assert_eq!(
        interrupt_code(&agent.call("buy", "call-2", 5).await),
        "ASYNC_AUTHORIZATION_ACCESS_DENIED"
    );

    // Expired at the server → access_denied → AccessDeniedInterrupt.
    assert_eq!(
        interrupt_code(&agent.call("buy", "call-3", 7).await),
        "ASYNC_AUTHORIZATION_AUTHORIZATION_PENDING"
    );
    ts.clock.advance(301);
    assert_eq!(
        interrupt_code(&agent.call("buy", "call-3", 7).await),
        "ASYNC_AUTHORIZATION_ACCESS_DENIED"
    );
    assert_eq!(newest(&ts).await.status.as_str(), "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_ai_with_async_authorization_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let config = latchkey_server::Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        approval_interval_secs: 1,
        outbound_allow: loopback_allowed(),
        ..Default::default()
    };
    let ts = TestServer::start_with(dir, config).await;
    let c = secret_client(&ts, "vercel-agent").await;
    let mut agent = NodeAgent::start(&ts, &c);

    // Block mode: the call polls every `interval` until the user decides.
    agent
        .send(json!({"tool": "buy-block", "call": "call-9", "qty": 1}))
        .await;
    let mut waited = 0;
    let id = loop {
        waited += 1;
        assert!(waited < 300, "the SDK never polled twice");
        let pending = ts
            .vault
            .store()
            .list_approvals(&latchkey_core::store::ApprovalFilter {
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        // Wait until the SDK has polled at least twice: it is really waiting.
        if let Some(a) = pending.first()
            && a.last_polled_at.is_some_and(|t| t > a.created_at)
        {
            break a.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ts.cli_ok(&["approvals", "approve", &id]);
    let done = agent.answer().await;
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(
        done["credentials"]["authorizationDetails"],
        json!([{"type": "trade", "ticker": "ACME", "qty": 1}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_ai_resumes_an_exchange_held_for_approval() {
    use latchkey_core::vault::Actor;
    use latchkey_crypto::Algorithm;
    use latchkey_crypto::jws::PublicKey;
    use latchkey_crypto::keygen::{SigningKey, generate};

    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    // An agent with a key (to sign its privileged-worker requests) and a secret (what the AI
    // SDK authenticates with), whose grant makes repo:read medium risk.
    let pair = generate(Algorithm::RS256);
    let key = SigningKey::from_pem(&pair.private_pem, Algorithm::RS256, None).unwrap();
    let public = PublicKey::parse(&pair.public_pem, Some(Algorithm::RS256), None).unwrap();
    let (agent, secret) = ts
        .vault
        .add_agent("held-agent", &[public], true, &Actor::cli())
        .await
        .unwrap();
    let c = Client {
        id: agent.id.clone(),
        secret: secrecy::ExposeSecret::expose_secret(&secret.unwrap()).to_owned(),
    };
    ts.cli_ok(&[
        "agent",
        "grant",
        &c.id,
        "--connection",
        "demo-git",
        "--scopes",
        "repo:read",
        "--risk",
        "repo:read=medium",
    ]);
    let now = ts.now();
    let subject = key.sign(
        Some("token-vault-req+jwt"),
        &json!({"iss": c.id, "sub": ts.info.user_id, "aud": ts.issuer, "iat": now, "exp": now + 60,
                "jti": uuid::Uuid::new_v4().to_string(), "audit_context": "read the repositories"}),
    );
    let held = ts
        .post_form(
            &[
                ("grant_type", GRANT),
                ("client_id", &c.id),
                ("client_secret", &c.secret),
                ("subject_token_type", JWT_TYPE),
                ("subject_token", &subject),
                ("requested_token_type", VAULT_TOKEN_TYPE),
                ("connection", "demo-git"),
                ("scope", "repo:read"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .await;
    held.assert_error(403, "authorization_pending");

    // The SDK's CIBA poller takes the held exchange's body as it is.
    let mut agent = NodeAgent::start(&ts, &c);
    agent.send(json!({"resume": held.body})).await;
    assert_eq!(
        interrupt_code(&agent.answer().await),
        "ASYNC_AUTHORIZATION_AUTHORIZATION_PENDING"
    );
    ts.cli_ok(&["approvals", "approve", &newest(&ts).await.id]);
    ts.clock.advance(10);
    agent.send(json!({"resume": held.body})).await;
    let done = agent.answer().await;
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(done["credentials"]["scopes"], json!(["repo:read"]));
    assert_eq!(done["credentials"]["tokenType"], "Bearer");
    let token = done["credentials"]["accessToken"].as_str().unwrap();
    assert_eq!(ts.demo_api(token, "repos").await.0, 200);
    // Redeemed once: the SDK reports the invalid grant.
    ts.clock.advance(10);
    agent.send(json!({"resume": held.body})).await;
    assert_eq!(
        interrupt_code(&agent.answer().await),
        "ASYNC_AUTHORIZATION_INVALID_GRANT"
    );
}

// ---- auth0-wire.md T37, T42, T43, T44: the other SDKs' CIBA calls -----------------------------

/// `interop/node/ciba_sdks.mjs <scenario>` with the client, the user and `vars`, trusting
/// Latchkey's CA, started (not awaited): the test may act while the SDK polls.
fn spawn_node_sdk(
    ts: &TestServer,
    scenario: &str,
    c: &Client,
    user_id: &str,
    vars: &[(&str, &str)],
) -> tokio::process::Child {
    let dir = workspace_root().join("interop/node");
    assert!(
        dir.join("node_modules/@auth0/auth0-auth-js").is_dir(),
        "{}/node_modules is missing: run scripts/test (it runs npm ci there)",
        dir.display()
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(dir.join("ciba_sdks.mjs"))
        .arg(scenario)
        .env("LK_DOMAIN", domain(ts))
        .env("LK_CLIENT_ID", &c.id)
        .env("LK_CLIENT_SECRET", &c.secret)
        .env("LK_USER_ID", user_id)
        .env("NODE_EXTRA_CA_CERTS", &ts.ca_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.spawn()
        .expect("node is installed (scripts/test checks)")
}

/// A spawned SDK script's JSON answer; it must end within 60 s (it is killed otherwise).
async fn script_answer(what: &str, child: tokio::process::Child) -> Value {
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: the SDK script did not finish within 60 s"))
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{what}: not JSON (exit {:?}): {} / {stderr}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

async fn node_sdk(
    ts: &TestServer,
    scenario: &str,
    c: &Client,
    user_id: &str,
    vars: &[(&str, &str)],
) -> Value {
    script_answer(scenario, spawn_node_sdk(ts, scenario, c, user_id, vars)).await
}

/// The requests the script's spy saw going to `path`.
fn sent_to<'a>(answer: &'a Value, path: &str) -> Vec<&'a Value> {
    answer["sent"]
        .as_array()
        .unwrap_or_else(|| panic!("no `sent` in {answer}"))
        .iter()
        .filter(|r| {
            r["path"] == path
                || r["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(path) || u.contains(&format!("{path}?")))
        })
        .collect()
}

/// Wait (bounded) until the SDK's CIBA request exists and it has polled it at least once — it is
/// really waiting — and return it.
/// Wait for the client's first poll, check the request is the client's, for the user, with
/// `message`; approve it from the CLI.
async fn approve_once_polled(ts: &TestServer, client: &str, user: &str, message: &str) {
    let approval = polled_approval(ts).await;
    assert_eq!(
        (approval.client_id.as_str(), approval.user_id.as_str()),
        (client, user)
    );
    assert_eq!(approval.binding_message.as_deref(), Some(message));
    ts.cli_ok(&["approvals", "approve", &approval.id]);
}

async fn polled_approval(ts: &TestServer) -> latchkey_core::model::Approval {
    for _ in 0..300 {
        let newest = ts
            .vault
            .store()
            .list_approvals(&latchkey_core::store::ApprovalFilter {
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        if let Some(a) = newest.into_iter().next()
            && a.last_polled_at.is_some()
        {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the SDK never polled its CIBA request");
}

/// A server whose CIBA interval is 1 s, so the SDKs that poll on their own (sleeping `interval`
/// between polls) finish quickly.
async fn fast_polling_server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = latchkey_server::Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        approval_interval_secs: 1,
        outbound_allow: loopback_allowed(),
        ..Default::default()
    };
    TestServer::start_with(dir, config).await
}

async fn discovery(ts: &TestServer) -> Value {
    let resp = ts
        .http
        .get(ts.url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// T37: `auth0` (Node) `backchannel.authorize` with `audience: ""` → accepted as absent; pending
/// until the user approves; then the tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_node_backchannel_authorize_with_empty_audience() {
    let ts = TestServer::start().await;
    let c = secret_client(&ts, "node-ciba").await;
    let user = ts.info.user_id.clone();

    let started = node_sdk(
        &ts,
        "n4-authorize",
        &c,
        &user,
        &[("LK_BINDING_MESSAGE", "Node 37")],
    )
    .await;
    assert_eq!(started["ok"], true, "{started}");
    assert_eq!(
        (
            started["data"]["expires_in"].as_i64(),
            started["data"]["interval"].as_i64()
        ),
        (Some(300), Some(5)),
        "{started}"
    );
    let sent = sent_to(&started, "/bc-authorize");
    assert_eq!(sent.len(), 1, "{started}");
    let params = &sent[0]["params"];
    assert_eq!(
        (
            params["audience"].as_str(),
            params["requested_expiry"].as_str(),
            params["scope"].as_str()
        ),
        (Some(""), Some("300"), Some("openid")),
        "the SDK sends `audience=`: {started}"
    );
    let hint: Value = serde_json::from_str(params["login_hint"].as_str().unwrap()).unwrap();
    assert_eq!(hint["sub"], user.as_str());

    let approval = newest(&ts).await;
    assert_eq!(approval.client_id, c.id);
    assert_eq!(approval.user_id, user);
    assert_eq!(approval.audience, None, "`audience=` is absent");
    assert_eq!(approval.binding_message.as_deref(), Some("Node 37"));
    assert_eq!(approval.scopes.to_string_spaced(), "openid");

    let by_id = [(
        "LK_AUTH_REQ_ID",
        started["data"]["auth_req_id"].as_str().unwrap(),
    )];
    let grant = || node_sdk(&ts, "n4-grant", &c, &user, &by_id);
    let pending = grant().await;
    assert_eq!(
        (
            pending["ok"].as_bool(),
            pending["statusCode"].as_u64(),
            pending["error"].as_str()
        ),
        (Some(false), Some(400), Some("authorization_pending")),
        "{pending}"
    );

    ts.cli_ok(&["approvals", "approve", &approval.id]);
    ts.clock.advance(10);
    let done = grant().await;
    assert_eq!(done["ok"], true, "{done}");
    let tokens = &done["data"];
    assert_eq!(tokens["token_type"], "Bearer");
    let id_token = claims_unverified(tokens["id_token"].as_str().unwrap());
    assert_eq!(
        (
            id_token["iss"].as_str(),
            id_token["aud"].as_str(),
            id_token["sub"].as_str()
        ),
        (
            Some(ts.issuer.as_str()),
            Some(c.id.as_str()),
            Some(user.as_str())
        )
    );
    let (status, me, _) = userinfo(&ts, tokens["access_token"].as_str().unwrap()).await;
    assert_eq!((status, me["sub"].as_str()), (200, Some(user.as_str())));
}

/// T42: a user who cannot sign in while no webhook is configured has no way to see a request:
/// `/bc-authorize` answers 400 `invalid_request`, which `@auth0/ai` reports as
/// `UserDoesNotHavePushNotificationsInterrupt`. Nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciba_for_a_user_without_a_notification_channel() {
    let ts = TestServer::start().await;
    assert!(
        ts.config.webhook_url.is_none(),
        "the test server has no webhook"
    );
    let c = secret_client(&ts, "no-channel").await;
    let out = ts.cli(&["user", "add", "nochannel", "--no-password", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let user = created["id"].as_str().unwrap().to_owned();

    let n4 = node_sdk(
        &ts,
        "n4-authorize",
        &c,
        &user,
        &[("LK_BINDING_MESSAGE", "Node 42")],
    )
    .await;
    assert_eq!(
        (
            n4["ok"].as_bool(),
            n4["statusCode"].as_u64(),
            n4["error"].as_str()
        ),
        (Some(false), Some(400), Some("invalid_request")),
        "{n4}"
    );

    let ai = node_sdk(&ts, "ai-start", &c, &user, &[]).await;
    assert_eq!(ai["ok"], false, "{ai}");
    assert_eq!(
        (
            ai["interrupt"]["class"].as_str(),
            ai["interrupt"]["code"].as_str()
        ),
        (
            Some("UserDoesNotHavePushNotificationsInterrupt"),
            Some("ASYNC_AUTHORIZATION_USER_DOES_NOT_HAVE_PUSH_NOTIFICATIONS")
        ),
        "{ai}"
    );
    let bc = sent_to(&ai, "/bc-authorize");
    assert_eq!(
        (bc.len(), bc[0]["status"].as_u64(), bc[0]["error"].as_str()),
        (1, Some(400), Some("invalid_request")),
        "{ai}"
    );
    assert!(
        ts.vault
            .store()
            .list_approvals(&latchkey_core::store::ApprovalFilter::default())
            .await
            .unwrap()
            .is_empty(),
        "a refused request stores no approval"
    );

    // The same client and SDK for a user who can sign in: a request, pending.
    let ok = node_sdk(&ts, "ai-start", &c, &ts.info.user_id, &[]).await;
    assert_eq!(
        ok["interrupt"]["code"], "ASYNC_AUTHORIZATION_AUTHORIZATION_PENDING",
        "{ok}"
    );
}

/// T43: `@auth0/auth0-auth-js` `backchannelAuthentication` end to end: it starts with a
/// `login_hint` naming the discovery issuer, polls (openid-client, honouring `interval`) while
/// the user decides, and returns the tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_auth_js_backchannel_authentication() {
    let ts = fast_polling_server().await;
    let c = secret_client(&ts, "auth-js-ciba").await;
    let user = ts.info.user_id.clone();
    let issuer = discovery(&ts).await["issuer"].as_str().unwrap().to_owned();

    let child = spawn_node_sdk(
        &ts,
        "auth-js-backchannel",
        &c,
        &user,
        &[("LK_BINDING_MESSAGE", "AuthJS 43")],
    );
    // The server's view: the hint's `iss` was accepted and its `sub` is the user.
    approve_once_polled(&ts, &c.id, &user, "AuthJS 43").await;
    let done = script_answer("auth-js-backchannel", child).await;
    assert_eq!(done["ok"], true, "{done}");
    assert_eq!(done["issuer"], issuer.as_str());

    // The hint the SDK built: JSON, `iss` the discovery document's issuer.
    let bc = sent_to(&done, "/bc-authorize");
    assert_eq!(bc.len(), 1, "{done}");
    let hint: Value =
        serde_json::from_str(bc[0]["params"]["login_hint"].as_str().unwrap()).unwrap();
    assert_eq!(
        (
            hint["format"].as_str(),
            hint["iss"].as_str(),
            hint["sub"].as_str()
        ),
        (Some("iss_sub"), Some(issuer.as_str()), Some(user.as_str())),
        "{done}"
    );
    // It polled: pending at least once, never too fast, then the tokens.
    let polls = sent_to(&done, "/oauth/token");
    assert!(polls.len() >= 2, "{done}");
    assert!(
        polls
            .iter()
            .all(|p| p["params"]["grant_type"] == "urn:openid:params:grant-type:ciba"),
        "{done}"
    );
    let (last, waiting) = polls.split_last().unwrap();
    assert!(
        waiting
            .iter()
            .all(|p| p["error"] == "authorization_pending"),
        "{done}"
    );
    assert_eq!(last["status"], 200, "{done}");

    let token = &done["token"];
    assert_eq!(token["claims"]["sub"], user.as_str(), "{done}");
    assert_eq!(token["claims"]["aud"], c.id.as_str(), "{done}");
    assert_eq!(token["claims"]["iss"], issuer.as_str(), "{done}");
    assert!(token["refreshToken"].is_string(), "offline_access: {done}");
    let (status, me, _) = userinfo(&ts, token["accessToken"].as_str().unwrap()).await;
    assert_eq!((status, me["sub"].as_str()), (200, Some(user.as_str())));
}

/// T44: auth0-server-python `ServerClient.login_backchannel` end to end, authenticating with HTTP
/// Basic at the discovered `backchannel_authentication_endpoint` and the token endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_server_python_login_backchannel() {
    let ts = fast_polling_server().await;
    let c = secret_client(&ts, "server-python-ciba").await;
    let user = ts.info.user_id.clone();
    let metadata = discovery(&ts).await;
    let endpoint = metadata["backchannel_authentication_endpoint"]
        .as_str()
        .unwrap()
        .to_owned();

    let python = std::env::var_os("LATCHKEY_INTEROP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("interop/.venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates interop/.venv)",
        python.display()
    );
    let child = tokio::process::Command::new(python)
        .arg(workspace_root().join("interop/python/ciba_server.py"))
        .env("LK_DOMAIN", domain(&ts))
        .env("LK_CLIENT_ID", &c.id)
        .env("LK_CLIENT_SECRET", &c.secret)
        .env("LK_USER_ID", &user)
        .env("LK_BINDING_MESSAGE", "Server 44")
        .env("SSL_CERT_FILE", &ts.ca_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    approve_once_polled(&ts, &c.id, &user, "Server 44").await;
    let done = script_answer("ciba_server.py", child).await;
    assert_eq!(done["ok"], true, "{done}");

    // Discovery, then the discovered endpoint with HTTP Basic (no secret in the body).
    let sent = done["sent"].as_array().unwrap();
    let bc: Vec<&Value> = sent
        .iter()
        .filter(|r| r["url"] == endpoint.as_str())
        .collect();
    assert_eq!(bc.len(), 1, "{done}");
    assert_eq!(
        (
            bc[0]["method"].as_str(),
            bc[0]["authorization"].as_str(),
            bc[0]["status"].as_u64()
        ),
        (Some("POST"), Some("Basic"), Some(200)),
        "{done}"
    );
    assert!(bc[0]["params"]["client_secret"].is_null(), "{done}");
    let hint: Value =
        serde_json::from_str(bc[0]["params"]["login_hint"].as_str().unwrap()).unwrap();
    assert_eq!(
        (hint["iss"].as_str(), hint["sub"].as_str()),
        (metadata["issuer"].as_str(), Some(user.as_str()))
    );
    let token_endpoint = metadata["token_endpoint"].as_str().unwrap();
    let polls: Vec<&Value> = sent.iter().filter(|r| r["url"] == token_endpoint).collect();
    assert!(polls.len() >= 2, "pending, then the tokens: {done}");
    assert!(
        polls.iter().all(|p| p["authorization"] == "Basic"
            && p["params"]["grant_type"] == "urn:openid:params:grant-type:ciba"),
        "{done}"
    );
    assert_eq!(polls.last().unwrap()["status"], 200, "{done}");

    // The SDK's session: the ID token and the access token it got. (Its `user` stays empty: this
    // SDK version fills it from a `claims` member of the token response, which its CIBA grant
    // never adds — Auth0 does not send one either.)
    let session = &done["session"];
    let id_token = claims_unverified(
        session["id_token"]
            .as_str()
            .unwrap_or_else(|| panic!("{done}")),
    );
    assert_eq!(
        (
            id_token["iss"].as_str(),
            id_token["aud"].as_str(),
            id_token["sub"].as_str()
        ),
        (
            metadata["issuer"].as_str(),
            Some(c.id.as_str()),
            Some(user.as_str())
        )
    );
    let access_token = session["token_sets"][0]["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{done}"));
    let (status, me, _) = userinfo(&ts, access_token).await;
    assert_eq!((status, me["sub"].as_str()), (200, Some(user.as_str())));
}
