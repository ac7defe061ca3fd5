//! Every audited action writes exactly one entry with the right fields, one test per action
//! (`docs/audit.md`, "What is recorded"), and no entry anywhere holds a secret the test saw:
//! each test seeds canaries (the user's password, client secrets, upstream tokens, TOTP seeds
//! and codes, operator tokens, assertion `jti`s, …) and reads every column of every row.

use latchkey_core::model::AuditRecord;
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewClient};
use latchkey_crypto::secrets::{random_token, sha256_b64};
use latchkey_crypto::totp;
use serde_json::{Value, json};

use crate::harness::*;
use crate::oidc::{App, REDIRECT, app, authorize_url, confidential, pkce, sign_in_for_code};

// --- what an entry must say ---------------------------------------------------------------

#[derive(Clone, Debug, Default)]
enum Reason {
    #[default]
    Absent,
    Is(String),
    StartsWith(String),
}

#[derive(Clone, Debug, Default)]
enum Req {
    /// Not made in an HTTP request (the CLI, the vault itself): no request id, no address.
    #[default]
    Absent,
    /// An HTTP request with a generated id.
    Any,
    /// An HTTP request that sent this `X-Request-Id`.
    Id(String),
    /// Not asserted (made through a surface this file does not own).
    Unchecked,
}

#[derive(Clone, Debug, Default)]
struct Want {
    action: &'static str,
    actor_type: &'static str,
    actor_id: String,
    auth_method: &'static str,
    subject_user: Option<String>,
    connection: Option<String>,
    account_id: Option<String>,
    agent_id: Option<String>,
    scopes: Option<String>,
    decision: &'static str,
    reason: Reason,
    audit_context: Option<String>,
    request: Req,
}

impl Want {
    fn by(
        action: &'static str,
        actor_type: &'static str,
        actor_id: &str,
        auth_method: &'static str,
    ) -> Self {
        Self {
            action,
            actor_type,
            actor_id: actor_id.to_owned(),
            auth_method,
            decision: "allow",
            ..Default::default()
        }
    }
    /// An operator at the command line.
    fn cli(action: &'static str) -> Self {
        Self::by(action, "operator", "local", "cli")
    }
    fn agent(action: &'static str, id: &str, method: &'static str) -> Self {
        Self::by(action, "agent", id, method)
    }
    fn user(action: &'static str, id: &str, method: &'static str) -> Self {
        Self::by(action, "user", id, method)
    }
    fn denied(self, reason_starts: &str) -> Self {
        Self {
            decision: "deny",
            reason: Reason::StartsWith(reason_starts.to_owned()),
            ..self
        }
    }
}

fn some(s: &str) -> Option<String> {
    Some(s.to_owned())
}

fn check(e: &AuditRecord, w: &Want) {
    let what = format!("{}: {e:?}", w.action);
    assert_eq!(e.action, w.action, "{what}");
    assert_eq!(
        (
            e.actor_type.as_str(),
            e.actor_id.as_str(),
            e.auth_method.as_str()
        ),
        (w.actor_type, w.actor_id.as_str(), w.auth_method),
        "actor of {what}"
    );
    assert_eq!(e.subject_user, w.subject_user, "subject user of {what}");
    assert_eq!(
        (&e.connection, &e.account_id, &e.agent_id),
        (&w.connection, &w.account_id, &w.agent_id),
        "target (connection, account, agent) of {what}"
    );
    assert_eq!(e.scopes, w.scopes, "scopes of {what}");
    assert_eq!(e.decision, w.decision, "decision of {what}");
    match &w.reason {
        Reason::Absent => assert_eq!(e.reason, None, "reason of {what}"),
        Reason::Is(r) => assert_eq!(e.reason.as_deref(), Some(r.as_str()), "reason of {what}"),
        Reason::StartsWith(r) => assert!(
            e.reason
                .as_deref()
                .is_some_and(|x| x.starts_with(r.as_str())),
            "reason of {what} should start with {r:?}"
        ),
    }
    assert_eq!(e.audit_context, w.audit_context, "audit_context of {what}");
    match &w.request {
        Req::Absent => assert_eq!(
            (&e.request_id, &e.client_ip),
            (&None, &None),
            "no request behind {what}"
        ),
        Req::Any => {
            assert!(
                e.request_id.as_deref().is_some_and(|r| !r.is_empty()),
                "request id of {what}"
            );
            assert_eq!(
                e.client_ip.as_deref(),
                Some("127.0.0.1"),
                "address of {what}"
            );
        }
        Req::Id(id) => assert_eq!(
            (e.request_id.as_deref(), e.client_ip.as_deref()),
            (Some(id.as_str()), Some("127.0.0.1")),
            "request id and address of {what}"
        ),
        Req::Unchecked => {}
    }
    assert!(e.at > 0, "time of {what}");
}

// --- the trail ------------------------------------------------------------------------------

/// The newest sequence number: what a test reads after.
async fn mark(ts: &TestServer) -> i64 {
    ts.vault
        .store()
        .list_audit(1)
        .await
        .unwrap()
        .first()
        .map_or(0, |e| e.seq)
}

/// The entries written after `since`, oldest first.
async fn since(ts: &TestServer, since: i64) -> Vec<AuditRecord> {
    ts.vault
        .store()
        .audit_range(since, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.record)
        .collect()
}

/// Assert that exactly `actions` (each once, in any order) were written after `seq`, and
/// return the entries by action.
async fn only(ts: &TestServer, seq: i64, actions: &[&str]) -> Vec<AuditRecord> {
    let entries = since(ts, seq).await;
    let mut got: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    got.sort_unstable();
    let mut want = actions.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "the entries written: {entries:#?}");
    actions
        .iter()
        .map(|a| entries.iter().find(|e| e.action == *a).unwrap().clone())
        .collect()
}

/// Exactly one entry, `want.action`, was written after `seq`, and it says what `want` says.
async fn exactly_one(ts: &TestServer, seq: i64, want: &Want) -> AuditRecord {
    let e = only(ts, seq, &[want.action]).await.remove(0);
    check(&e, want);
    e
}

/// Secrets the test saw. Long ones are looked for in every column of every row; short ones
/// (six-digit TOTP codes) in the free-text columns, where a number could not hide by chance.
#[derive(Default)]
struct Canaries {
    long: Vec<String>,
    short: Vec<String>,
}

impl Canaries {
    /// A recognisable random secret.
    fn make(&mut self, what: &str) -> String {
        let c = format!("canary-{what}-{}", random_token(12));
        self.long.push(c.clone());
        c
    }

    fn add(&mut self, secret: impl Into<String>) {
        let s = secret.into();
        assert!(s.len() >= 12, "a canary must be recognisable: {s}");
        self.long.push(s);
    }

    fn add_code(&mut self, code: &str) {
        self.short.push(code.to_owned());
    }

    async fn assert_absent(&self, ts: &TestServer) {
        let pool = ts.sql_pool().await;
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('audit_events')")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(columns.len() >= 16, "{columns:?}");
        let text = |c: &String| format!("COALESCE(CAST(\"{c}\" AS TEXT), '')");
        let all = columns
            .iter()
            .map(text)
            .collect::<Vec<_>>()
            .join(" || char(31) || ");
        let free = ["actor_id", "reason", "audit_context", "scopes"]
            .map(|c| text(&c.to_owned()))
            .join(" || char(31) || ");
        let rows: Vec<(i64, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT seq, {all}, {free} FROM audit_events ORDER BY seq"
        )))
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        assert!(!rows.is_empty());
        for (seq, row, free) in &rows {
            for c in &self.long {
                assert!(
                    !row.contains(c.as_str()),
                    "entry {seq} holds a secret ({c}): {row}"
                );
            }
            for c in &self.short {
                assert!(
                    !free.contains(c.as_str()),
                    "entry {seq} holds a code ({c}): {row}"
                );
            }
        }
    }
}

/// A demo server whose demo user's password is a canary, with the upstream client secret a
/// canary too.
async fn start() -> (TestServer, Canaries) {
    start_with(TestServer::start().await).await
}

async fn start_with(mut ts: TestServer) -> (TestServer, Canaries) {
    let mut c = Canaries::default();
    let password = c.make("password");
    ts.vault
        .set_password("demo", &password, &Actor::cli())
        .await
        .unwrap();
    ts.info.password = password;
    c.add(
        latchkey_server::demo::demo_client_secret(&ts.vault)
            .await
            .unwrap(),
    );
    (ts, c)
}

/// Connect the demo account; its upstream refresh token becomes a canary.
async fn connect(ts: &TestServer, c: &mut Canaries) -> String {
    let account = ts.connect_demo_account().await;
    c.add(ts.stored_refresh_token(&account).await);
    account
}

fn rid(what: &str) -> String {
    format!("audit-{what}-{}", random_token(6).replace(['-', '_'], "x"))
}

// --- requests with a request id -------------------------------------------------------------

async fn post_token(ts: &TestServer, form: &[(String, String)], request_id: &str) -> Answer {
    let resp = ts
        .http
        .post(ts.url("/oauth/token"))
        .header("x-request-id", request_id)
        .form(form)
        .send()
        .await
        .unwrap();
    Answer::read(resp).await
}

async fn post_token_json(ts: &TestServer, body: &Value, request_id: &str) -> Answer {
    let resp = ts
        .http
        .post(ts.url("/oauth/token"))
        .header("x-request-id", request_id)
        .json(body)
        .send()
        .await
        .unwrap();
    Answer::read(resp).await
}

async fn post_basic(
    ts: &TestServer,
    path: &str,
    (id, secret): (&str, &str),
    form: &[(&str, &str)],
    request_id: &str,
) -> reqwest::Response {
    ts.http
        .post(ts.url(path))
        .header("x-request-id", request_id)
        .basic_auth(id, Some(secret))
        .form(form)
        .send()
        .await
        .unwrap()
}

async fn app_token(ts: &TestServer, app: &App, form: &[(&str, &str)], request_id: &str) -> Answer {
    Answer::read(post_basic(ts, "/oauth/token", (&app.id, &app.secret), form, request_id).await)
        .await
}

/// The demo agent's exchange, with `subject` and `assertion` overrides and extra parameters.
fn exchange(
    ts: &TestServer,
    subject: Value,
    assertion: Value,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut p = ts.params_with(ts.subject(subject), ts.assertion(assertion));
    p.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    p
}

/// `latchkey …` on the server's data directory, which must succeed; its standard output.
fn cli(ts: &TestServer, args: &[&str]) -> String {
    let out = ts.cli(args);
    assert!(
        out.status.success(),
        "latchkey {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `latchkey …` with `input` on standard input (passwords).
fn cli_stdin(ts: &TestServer, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .arg("--data-dir")
        .arg(&ts.config.data_dir)
        .env("LATCHKEY_PUBLIC_URL", &ts.issuer)
        .env_remove("LATCHKEY_KEK")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{input}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "latchkey {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_out(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|_| panic!("not JSON: {out}"))
}

/// An agent with a client secret (a canary) and a grant on `demo-git`.
fn secret_agent(ts: &TestServer, c: &mut Canaries, name: &str) -> (String, String) {
    let v = json_out(&cli(ts, &["agent", "add", name, "--secret", "--json"]));
    let (id, secret) = (
        v["client_id"].as_str().unwrap().to_owned(),
        v["client_secret"].as_str().unwrap().to_owned(),
    );
    c.add(secret.clone());
    cli(
        ts,
        &[
            "agent",
            "grant",
            &id,
            "--connection",
            "demo-git",
            "--scopes",
            "repo:read",
        ],
    );
    (id, secret)
}

// --- an app and its signed-in user ---------------------------------------------------------

/// A confidential app (secret a canary) with a grant on `demo-git`.
async fn granted_app(ts: &TestServer, c: &mut Canaries, new: NewClient) -> App {
    let a = app(ts, "notes", new).await;
    c.add(a.secret.clone());
    ts.vault
        .grant(
            &a.id,
            "demo-git",
            Scopes::parse("read:user repo:read"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    a
}

/// Sign the demo user in to `app` and redeem the code: the token answer (its tokens canaries).
async fn signed_in(ts: &TestServer, c: &mut Canaries, app: &App, request_id: &str) -> Answer {
    let p = pkce();
    let code = sign_in_for_code(ts, &authorize_url(ts, &app.id, &p, &[])).await;
    c.add(code.clone());
    c.add(p.verifier.clone());
    let a = app_token(
        ts,
        app,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &p.verifier),
        ],
        request_id,
    )
    .await;
    c.add(a.token());
    c.add(a.body["refresh_token"].as_str().unwrap());
    a
}

fn openid_scopes() -> Option<String> {
    Some(Scopes::parse("openid offline_access").to_string_spaced())
}

// =============================================================================================
// The token endpoint: releases and issues
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_release_privileged_worker() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let (subject_jti, assertion_jti) = (c.make("subject-jti"), c.make("assertion-jti"));
    let seq = mark(&ts).await;
    let r = rid("release");
    let a = post_token(
        &ts,
        &exchange(
            &ts,
            json!({"jti": subject_jti, "audit_context": "nightly triage"}),
            json!({"jti": assertion_jti}),
            &[("scope", "repo:read")],
        ),
        &r,
    )
    .await;
    let token = a.token().to_owned();
    c.add(token.clone());
    let agent = ts.info.agent_id.clone();
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            agent_id: Some(agent.clone()),
            scopes: some("repo:read"),
            reason: Reason::Is(format!("token {}", sha256_b64(token.as_bytes()))),
            audit_context: some("nightly triage"),
            request: Req::Id(r),
            ..Want::agent("token.release", &agent, "private_key_jwt")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_release_user_present() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let app1 = granted_app(&ts, &mut c, confidential()).await;
    let refresh = signed_in(&ts, &mut c, &app1, &rid("sign-in")).await.body["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let seq = mark(&ts).await;
    let r = rid("user-present");
    let a = post_token_json(
        &ts,
        &json!({
            "grant_type": GRANT, "client_id": app1.id, "client_secret": app1.secret,
            "subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token",
            "subject_token": refresh, "requested_token_type": VAULT_TOKEN_TYPE,
            "connection": "demo-git",
        }),
        &r,
    )
    .await;
    let token = a.token().to_owned();
    c.add(token.clone());
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            agent_id: Some(app1.id.clone()),
            scopes: some("read:user repo:read"),
            reason: Reason::Is(format!("token {}", sha256_b64(token.as_bytes()))),
            request: Req::Id(r),
            ..Want::agent("token.release", &app1.id, "client_secret_post")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_issue_authorization_code() {
    let (ts, mut c) = start().await;
    let app1 = granted_app(&ts, &mut c, confidential()).await;
    // Sign in first (that is `user.login`'s test), then take the code to the token endpoint.
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    c.add(code.clone());
    c.add(p.verifier.clone());
    let seq = mark(&ts).await;
    let r = rid("code");
    let a = app_token(
        &ts,
        &app1,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", &p.verifier),
        ],
        &r,
    )
    .await;
    c.add(a.token());
    c.add(a.body["refresh_token"].as_str().unwrap());
    c.add(a.body["id_token"].as_str().unwrap());
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            agent_id: Some(app1.id.clone()),
            scopes: openid_scopes(),
            reason: Reason::StartsWith("authorization code; family fam_".into()),
            request: Req::Id(r),
            ..Want::agent("token.issue", &app1.id, "authorization_code")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_issue_refresh_token() {
    let (ts, mut c) = start().await;
    let app1 = granted_app(&ts, &mut c, confidential()).await;
    let first = signed_in(&ts, &mut c, &app1, &rid("code")).await;
    let refresh = first.body["refresh_token"].as_str().unwrap().to_owned();
    let seq = mark(&ts).await;
    let r = rid("refresh");
    let a = app_token(
        &ts,
        &app1,
        &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
        &r,
    )
    .await;
    c.add(a.token());
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            agent_id: Some(app1.id.clone()),
            scopes: openid_scopes(),
            reason: Reason::StartsWith(format!("refresh for {}; family fam_", ts.issuer)),
            request: Req::Id(r),
            ..Want::agent("token.issue", &app1.id, "refresh_token")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

// =============================================================================================
// Revocation of an app's sign-in
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoke_at_the_revoke_endpoint() {
    let (ts, mut c) = start().await;
    let app1 = granted_app(&ts, &mut c, confidential()).await;
    let first = signed_in(&ts, &mut c, &app1, &rid("code")).await;
    let refresh = first.body["refresh_token"].as_str().unwrap().to_owned();
    let seq = mark(&ts).await;
    let r = rid("revoke");
    let resp = post_basic(
        &ts,
        "/oauth/revoke",
        (&app1.id, &app1.secret),
        &[("token", &refresh)],
        &r,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let e = exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            agent_id: Some(app1.id.clone()),
            reason: Reason::StartsWith("family fam_".into()),
            request: Req::Id(r),
            ..Want::agent("token.revoke", &app1.id, "token")
        },
    )
    .await;
    assert!(e.reason.unwrap().ends_with(": revoked by the client"));
    // Revoking it again changes nothing and writes nothing.
    let seq = mark(&ts).await;
    let resp = post_basic(
        &ts,
        "/oauth/revoke",
        (&app1.id, &app1.secret),
        &[("token", &refresh)],
        &rid("again"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    only(&ts, seq, &[]).await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoke_on_a_replayed_authorization_code() {
    let (ts, mut c) = start().await;
    let app1 = granted_app(&ts, &mut c, confidential()).await;
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    c.add(code.clone());
    c.add(p.verifier.clone());
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", p.verifier.as_str()),
    ];
    let first = app_token(&ts, &app1, &form, &rid("first")).await;
    c.add(first.token());
    c.add(first.body["refresh_token"].as_str().unwrap());

    // The replay: its sign-in is revoked (one entry), and the request is refused (one entry).
    let seq = mark(&ts).await;
    let r = rid("replay");
    app_token(&ts, &app1, &form, &r)
        .await
        .assert_error(400, "invalid_grant");
    let entries = only(&ts, seq, &["token.revoke", "token.deny"]).await;
    check(
        &entries[0],
        &Want {
            subject_user: some(&ts.info.user_id),
            agent_id: Some(app1.id.clone()),
            reason: Reason::StartsWith("family fam_".into()),
            request: Req::Id(r.clone()),
            ..Want::agent("token.revoke", &app1.id, "token")
        },
    );
    assert!(
        entries[0]
            .reason
            .as_deref()
            .unwrap()
            .ends_with(": authorization code replayed")
    );
    check(
        &entries[1],
        &Want {
            agent_id: Some(app1.id.clone()),
            request: Req::Id(r),
            ..Want::agent("token.deny", &app1.id, "client_secret_basic")
                .denied("invalid_grant: the authorization code was already used")
        },
    );
    // Replayed again: refused and recorded, but the sign-in is not revoked a second time.
    let seq = mark(&ts).await;
    app_token(&ts, &app1, &form, &rid("replay-2"))
        .await
        .assert_error(400, "invalid_grant");
    only(&ts, seq, &["token.deny"]).await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoke_on_a_reused_rotated_refresh_token() {
    let (ts, mut c) = start().await;
    let app1 = granted_app(
        &ts,
        &mut c,
        NewClient {
            rotate_refresh_tokens: true,
            ..confidential()
        },
    )
    .await;
    let first = signed_in(&ts, &mut c, &app1, &rid("code")).await;
    let rt1 = first.body["refresh_token"].as_str().unwrap().to_owned();
    let second = app_token(
        &ts,
        &app1,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
        &rid("rotate"),
    )
    .await;
    c.add(second.token());
    c.add(second.body["refresh_token"].as_str().unwrap());
    let seq = mark(&ts).await;
    let r = rid("reuse");
    app_token(
        &ts,
        &app1,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt1)],
        &r,
    )
    .await
    .assert_error(400, "invalid_grant");
    let entries = only(&ts, seq, &["token.revoke", "token.deny"]).await;
    check(
        &entries[0],
        &Want {
            subject_user: some(&ts.info.user_id),
            agent_id: Some(app1.id.clone()),
            reason: Reason::StartsWith("family fam_".into()),
            request: Req::Id(r.clone()),
            ..Want::agent("token.revoke", &app1.id, "token")
        },
    );
    assert!(
        entries[0]
            .reason
            .as_deref()
            .unwrap()
            .ends_with(": rotated refresh token reused")
    );
    check(
        &entries[1],
        &Want {
            agent_id: Some(app1.id.clone()),
            request: Req::Id(r),
            ..Want::agent("token.deny", &app1.id, "client_secret_basic")
                .denied("invalid_grant: the refresh token was already used")
        },
    );
    c.assert_absent(&ts).await;
}

// =============================================================================================
// The token endpoint: refusals (`token.deny`), each with the facts known when it was refused
// =============================================================================================

/// A refused exchange by the demo agent: exactly one `token.deny` entry saying `want`.
async fn refused_exchange(
    ts: &TestServer,
    c: &Canaries,
    params: &[(String, String)],
    (status, code): (u16, &str),
    want: Want,
) {
    let seq = mark(ts).await;
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);
    let r = rid("deny");
    post_token(ts, params, &r).await.assert_error(status, code);
    let agent = ts.info.agent_id.clone();
    exactly_one(
        ts,
        seq,
        &Want {
            agent_id: Some(agent.clone()),
            request: Req::Id(r),
            ..Want {
                actor_type: "agent",
                actor_id: agent,
                auth_method: "private_key_jwt",
                ..want
            }
        },
    )
    .await;
    assert_eq!(
        (ts.releases().await, ts.used_jtis().await),
        (releases, jtis),
        "a refusal changes nothing"
    );
    c.assert_absent(ts).await;
}

fn deny(reason: &str) -> Want {
    Want {
        action: "token.deny",
        ..Default::default()
    }
    .denied(reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_without_a_grant() {
    let (ts, mut c) = start().await;
    connect(&ts, &mut c).await;
    cli(
        &ts,
        &[
            "agent",
            "ungrant",
            &ts.info.agent_id,
            "--connection",
            "demo-git",
        ],
    );
    let jti = c.make("jti");
    refused_exchange(
        &ts,
        &c,
        &exchange(&ts, json!({}), json!({"jti": jti}), &[]),
        (403, "unauthorized_client"),
        Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            audit_context: some("integration test"),
            ..deny(&format!(
                "unauthorized_client: agent {} has no grant for connection demo-git",
                ts.info.agent_id
            ))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_scope_beyond_the_grant() {
    let (ts, mut c) = start().await;
    connect(&ts, &mut c).await;
    refused_exchange(
        &ts,
        &c,
        &exchange(
            &ts,
            json!({}),
            json!({}),
            &[("scope", "repo:read repo:write")],
        ),
        (400, "invalid_scope"),
        Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            scopes: some("repo:read repo:write"),
            audit_context: some("integration test"),
            ..deny("invalid_scope: scope outside the agent's grant: repo:write")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_from_an_address_the_grant_does_not_allow() {
    let (ts, mut c) = start().await;
    connect(&ts, &mut c).await;
    cli(
        &ts,
        &[
            "agent",
            "grant",
            &ts.info.agent_id,
            "--connection",
            "demo-git",
            "--scopes",
            "repo:read",
            "--ip",
            "10.0.0.0/8",
        ],
    );
    refused_exchange(
        &ts,
        &c,
        &exchange(&ts, json!({}), json!({}), &[]),
        (403, "unauthorized_client"),
        Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            audit_context: some("integration test"),
            ..deny(
                "unauthorized_client: the request comes from an address the grant does not allow",
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_when_the_user_has_not_connected() {
    let (ts, c) = start().await;
    refused_exchange(
        &ts,
        &c,
        &exchange(&ts, json!({}), json!({}), &[]),
        (401, "federated_connection_refresh_token_not_found"),
        Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            audit_context: some("integration test"),
            ..deny("federated_connection_refresh_token_not_found: ")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_on_a_replayed_subject_token() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let jti = c.make("subject-jti");
    let subject = ts.subject(json!({"jti": jti}));
    c.add(subject.clone());
    let first = ts
        .post_form(&ts.params_with(subject.clone(), ts.assertion(json!({}))))
        .await;
    c.add(first.token());
    refused_exchange(
        &ts,
        &c,
        &ts.params_with(subject, ts.assertion(json!({}))),
        (400, "invalid_grant"),
        Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            audit_context: some("integration test"),
            ..deny("invalid_grant: subject_token rejected: `jti` was already used")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_on_a_bad_subject_token() {
    let (ts, mut c) = start().await;
    connect(&ts, &mut c).await;
    let subject = ts.subject(json!({"aud": "https://elsewhere.example/", "jti": c.make("jti")}));
    c.add(subject.clone());
    refused_exchange(
        &ts,
        &c,
        &ts.params_with(subject, ts.assertion(json!({}))),
        (400, "invalid_grant"),
        deny("invalid_grant: subject_token rejected: claim `aud`"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_over_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let config = latchkey_server::Config {
        data_dir: dir.path().join("data"),
        agent_requests_per_minute: 1,
        outbound_allow: loopback_allowed(),
        ..latchkey_server::Config::default()
    };
    let (ts, mut c) = start_with(TestServer::start_with(dir, config).await).await;
    connect(&ts, &mut c).await;
    ts.clock.advance(60 - ts.now().rem_euclid(60));
    c.add(ts.post_form(&ts.exchange_params()).await.token());
    refused_exchange(
        &ts,
        &c,
        &exchange(&ts, json!({}), json!({}), &[]),
        (429, "too_many_requests"),
        deny(&format!(
            "too_many_requests: agent {} exceeded 1 token requests per minute",
            ts.info.agent_id
        )),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_for_an_unsupported_grant_type() {
    let (ts, c) = start().await;
    let mut params = exchange(&ts, json!({}), json!({}), &[]);
    params[0].1 = "password".into();
    refused_exchange(
        &ts,
        &c,
        &params,
        (400, "unsupported_grant_type"),
        deny("unsupported_grant_type: grant_type `password` is not supported"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_deny_and_account_needs_reauth_when_the_provider_refuses_the_refresh() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    c.add(ts.post_form(&ts.exchange_params()).await.token());
    // The provider forgets the refresh token behind the vault's back.
    let refresh = ts.stored_refresh_token(&account).await;
    let (status, _) = ts
        .demo_client_post(
            "/demo/oauth/revoke",
            &[("token", &refresh), ("token_type_hint", "refresh_token")],
        )
        .await;
    assert_eq!(status, 200);
    ts.clock.advance(301);
    let seq = mark(&ts).await;
    let r = rid("reauth");
    post_token(&ts, &ts.exchange_params(), &r)
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");
    let entries = only(&ts, seq, &["account.needs_reauth", "token.deny"]).await;
    check(
        &entries[0],
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account.clone()),
            reason: Reason::StartsWith("demo-git refused the stored refresh token".into()),
            ..Want::by("account.needs_reauth", "operator", "vault", "refresh")
        },
    );
    let agent = ts.info.agent_id.clone();
    check(
        &entries[1],
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            agent_id: Some(agent.clone()),
            audit_context: some("integration test"),
            request: Req::Id(r),
            ..Want::agent("token.deny", &agent, "private_key_jwt").denied(
                "federated_connection_refresh_token_not_found: the user must reconnect demo-git",
            )
        },
    );
    // The next request is refused without asking the provider: one entry, the refusal.
    let seq = mark(&ts).await;
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");
    only(&ts, seq, &["token.deny"]).await;
    c.assert_absent(&ts).await;
}

// =============================================================================================
// Client authentication failures (`client.authenticate`, deny): the claimed client, never the
// credential presented
// =============================================================================================

async fn failed_authentication(
    ts: &TestServer,
    c: &Canaries,
    send: impl std::future::Future<Output = Answer>,
    request_id: &str,
    want: Want,
) {
    let seq = mark(ts).await;
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);
    send.await.assert_error(401, "invalid_client");
    exactly_one(
        ts,
        seq,
        &Want {
            action: "client.authenticate",
            actor_type: "agent",
            request: Req::Id(request_id.to_owned()),
            ..want
        },
    )
    .await;
    assert_eq!(
        (ts.releases().await, ts.used_jtis().await),
        (releases, jtis)
    );
    c.assert_absent(ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_with_a_wrong_secret() {
    let (ts, mut c) = start().await;
    let (agent, _) = secret_agent(&ts, &mut c, "nightly");
    let wrong = c.make("wrong-secret");
    let r = rid("wrong-secret");
    let mut params = exchange(&ts, json!({}), json!({}), &[]);
    params.retain(|(k, _)| !k.starts_with("client_"));
    let send = async {
        let resp = ts
            .http
            .post(ts.url("/oauth/token"))
            .header("x-request-id", &r)
            .basic_auth(&agent, Some(&wrong))
            .form(&params)
            .send()
            .await
            .unwrap();
        Answer::read(resp).await
    };
    failed_authentication(
        &ts,
        &c,
        send,
        &r,
        Want {
            actor_id: agent.clone(),
            auth_method: "client_secret_basic",
            agent_id: Some(agent.clone()),
            ..Want::default().denied("invalid_client: unknown client or wrong client secret")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_with_a_badly_signed_assertion() {
    let (ts, mut c) = start().await;
    let agent = ts.info.agent_id.clone();
    let other = latchkey_crypto::keygen::SigningKey::from_pem(
        &latchkey_crypto::keygen::generate(latchkey_crypto::Algorithm::RS256).private_pem,
        latchkey_crypto::Algorithm::RS256,
        None,
    )
    .unwrap();
    let now = ts.now();
    let jti = c.make("assertion-jti");
    let forged = other.sign(None, &json!({"iss": agent, "sub": agent, "aud": ts.issuer, "iat": now, "exp": now + 60, "jti": jti}));
    c.add(forged.clone());
    let r = rid("forged");
    let params = ts.params_with(ts.subject(json!({})), forged);
    failed_authentication(
        &ts,
        &c,
        post_token(&ts, &params, &r),
        &r,
        Want {
            actor_id: agent.clone(),
            auth_method: "private_key_jwt",
            agent_id: Some(agent.clone()),
            ..Want::default().denied("invalid_client: client assertion rejected: ")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_as_an_unknown_client() {
    let (ts, mut c) = start().await;
    // No client_id: the assertion's (unverified) `iss` is what the request claimed to be.
    let jti = c.make("assertion-jti");
    let assertion = ts.assertion(json!({"iss": "agt_nobody", "sub": "agt_nobody", "jti": jti}));
    c.add(assertion.clone());
    let mut params = ts.params_with(ts.subject(json!({})), assertion);
    params.retain(|(k, _)| k != "client_id");
    let r = rid("unknown");
    failed_authentication(
        &ts,
        &c,
        post_token(&ts, &params, &r),
        &r,
        Want {
            actor_id: "agt_nobody".into(),
            auth_method: "private_key_jwt",
            agent_id: some("agt_nobody"),
            ..Want::default().denied("invalid_client: client assertion rejected: unknown client")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_with_a_replayed_assertion() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let jti = c.make("assertion-jti");
    let assertion = ts.assertion(json!({"jti": jti}));
    c.add(assertion.clone());
    let first = ts
        .post_form(&ts.params_with(ts.subject(json!({})), assertion.clone()))
        .await;
    c.add(first.token());
    let r = rid("replayed-assertion");
    let agent = ts.info.agent_id.clone();
    let params = ts.params_with(ts.subject(json!({})), assertion);
    failed_authentication(
        &ts,
        &c,
        post_token(&ts, &params, &r),
        &r,
        Want {
            actor_id: agent.clone(),
            auth_method: "private_key_jwt",
            agent_id: Some(agent.clone()),
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            scopes: None,
            audit_context: some("integration test"),
            ..Want::default()
                .denied("invalid_client: client assertion rejected: `jti` was already used")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_as_a_disabled_agent() {
    let (ts, mut c) = start().await;
    connect(&ts, &mut c).await;
    let agent = ts.info.agent_id.clone();
    cli(&ts, &["agent", "disable", &agent]);
    let r = rid("disabled");
    let params = ts.exchange_params();
    failed_authentication(
        &ts,
        &c,
        post_token(&ts, &params, &r),
        &r,
        Want {
            actor_id: agent.clone(),
            auth_method: "private_key_jwt",
            agent_id: Some(agent.clone()),
            ..Want::default().denied("invalid_client: client assertion rejected: unknown client")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_without_credentials() {
    let (ts, c) = start().await;
    let agent = ts.info.agent_id.clone();
    let mut params = ts.exchange_params();
    params.retain(|(k, _)| !k.starts_with("client_assertion"));
    let r = rid("none");
    failed_authentication(
        &ts,
        &c,
        post_token(&ts, &params, &r),
        &r,
        Want {
            actor_id: agent.clone(),
            auth_method: "none",
            agent_id: Some(agent.clone()),
            ..Want::default().denied("invalid_client: client authentication is required")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_with_two_methods_at_once() {
    let (ts, mut c) = start().await;
    let (agent, secret) = secret_agent(&ts, &mut c, "nightly");
    let mut params = ts.exchange_params();
    params.retain(|(k, _)| k != "client_id");
    params.push(("client_id".into(), agent.clone()));
    params.push(("client_secret".into(), secret));
    let r = rid("two");
    let seq = mark(&ts).await;
    post_token(&ts, &params, &r)
        .await
        .assert_error(400, "invalid_request");
    exactly_one(
        &ts,
        seq,
        &Want {
            agent_id: Some(agent.clone()),
            request: Req::Id(r),
            ..Want::agent(
                "client.authenticate",
                &agent,
                "client_secret_post+private_key_jwt",
            )
            .denied("invalid_request: use exactly one client authentication method")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authenticate_at_the_revoke_endpoint() {
    let (ts, mut c) = start().await;
    let app1 = granted_app(&ts, &mut c, confidential()).await;
    let first = signed_in(&ts, &mut c, &app1, &rid("code")).await;
    let refresh = first.body["refresh_token"].as_str().unwrap().to_owned();
    let wrong = c.make("wrong-secret");
    let seq = mark(&ts).await;
    let r = rid("revoke-auth");
    let resp = post_basic(
        &ts,
        "/oauth/revoke",
        (&app1.id, &wrong),
        &[("token", &refresh)],
        &r,
    )
    .await;
    assert_eq!(resp.status(), 401);
    exactly_one(
        &ts,
        seq,
        &Want {
            agent_id: Some(app1.id.clone()),
            request: Req::Id(r),
            ..Want::agent("client.authenticate", &app1.id, "client_secret_basic")
                .denied("invalid_client: unknown client or wrong client secret")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

// =============================================================================================
// Users signing in (`user.login`)
// =============================================================================================

async fn password_step(ts: &TestServer, username: &str, password: &str) -> u16 {
    let (_, _, page) = ts.browse("/login?next=/ui/accounts").await;
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            "/login",
            &[
                ("username", username),
                ("password", password),
                ("csrf", &csrf),
                ("next", "/ui/accounts"),
            ],
        )
        .await;
    status.as_u16()
}

async fn code_step(ts: &TestServer, code: &str) -> u16 {
    let (_, _, page) = ts.browse("/login/totp?next=/ui/accounts").await;
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            "/login/totp",
            &[("code", code), ("csrf", &csrf), ("next", "/ui/accounts")],
        )
        .await;
    status.as_u16()
}

fn base32_decode(s: &str) -> Vec<u8> {
    let (mut out, mut buffer, mut bits) = (Vec::new(), 0u32, 0u32);
    for ch in s.bytes() {
        let v = match ch {
            b'A'..=b'Z' => ch - b'A',
            b'2'..=b'7' => ch - b'2' + 26,
            _ => panic!("not base32: {s}"),
        };
        buffer = (buffer << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            out.push((buffer >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

/// Start TOTP enrolment for `demo` at the command line: the seed (its base32 form a canary).
fn enrol(ts: &TestServer, c: &mut Canaries) -> Vec<u8> {
    let v = json_out(&cli(ts, &["user", "mfa", "demo", "--json"]));
    let uri = v["otpauth_uri"].as_str().unwrap().to_owned();
    let secret = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    c.add(secret);
    base32_decode(secret)
}

/// Enrol and confirm TOTP for `demo` (the CLI runs on the real clock).
fn enrol_and_confirm(ts: &TestServer, c: &mut Canaries) -> Vec<u8> {
    let seed = enrol(ts, c);
    let code = totp::code_at(
        &seed,
        std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64,
    );
    c.add_code(&code);
    cli(ts, &["user", "mfa", "demo", "--confirm", &code]);
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_login_with_a_password() {
    let (ts, c) = start().await;
    let seq = mark(&ts).await;
    assert_eq!(password_step(&ts, "demo", &ts.info.password).await, 303);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            request: Req::Any,
            ..Want::user("user.login", "demo", "password")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_login_with_a_wrong_password() {
    let (ts, mut c) = start().await;
    let wrong = c.make("wrong-password");
    let seq = mark(&ts).await;
    assert_eq!(password_step(&ts, "demo", &wrong).await, 401);
    // The refused sign-in names the username tried, not the user (it may not exist).
    exactly_one(
        &ts,
        seq,
        &Want {
            reason: Reason::Is("wrong username or password".into()),
            request: Req::Any,
            ..Want::user("user.login", "demo", "password").denied("")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_login_throttled() {
    let (ts, mut c) = start().await;
    let wrong = c.make("wrong-password");
    for _ in 0..5 {
        assert_eq!(password_step(&ts, "demo", &wrong).await, 401);
    }
    let seq = mark(&ts).await;
    // Even the right password waits now; the attempt is refused and recorded once.
    assert_eq!(password_step(&ts, "demo", &ts.info.password).await, 429);
    exactly_one(
        &ts,
        seq,
        &Want {
            reason: Reason::Is("throttled".into()),
            request: Req::Any,
            ..Want::user("user.login", "demo", "password").denied("")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_login_with_a_second_factor() {
    let (ts, mut c) = start().await;
    let seed = enrol_and_confirm(&ts, &mut c);
    ts.clock.advance(30);
    // Both steps: the password (a pending session, no entry yet) and the code (one entry).
    let seq = mark(&ts).await;
    assert_eq!(password_step(&ts, "demo", &ts.info.password).await, 303);
    let code = totp::code_at(&seed, ts.now());
    c.add_code(&code);
    assert_eq!(code_step(&ts, &code).await, 303);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            request: Req::Any,
            ..Want::user("user.login", "demo", "password+totp")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_login_with_a_wrong_code() {
    let (ts, mut c) = start().await;
    let seed = enrol_and_confirm(&ts, &mut c);
    ts.clock.advance(30);
    assert_eq!(password_step(&ts, "demo", &ts.info.password).await, 303);
    let right = totp::code_at(&seed, ts.now());
    let wrong = if right == "424242" {
        "242424"
    } else {
        "424242"
    };
    c.add_code(&right);
    c.add_code(wrong);
    let seq = mark(&ts).await;
    assert_eq!(code_step(&ts, wrong).await, 401);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            reason: Reason::Is("wrong TOTP code".into()),
            request: Req::Any,
            ..Want::user("user.login", "demo", "password+totp").denied("")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

// =============================================================================================
// Users: administration (`user.*`)
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_create() {
    let (ts, mut c) = start().await;
    let password = c.make("alice-password");
    let seq = mark(&ts).await;
    let v = json_out(&cli_stdin(
        &ts,
        &["user", "add", "alice", "--json"],
        &password,
    ));
    let id = v["id"].as_str().unwrap();
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(id),
            reason: Reason::Is("role user".into()),
            ..Want::cli("user.create")
        },
    )
    .await;
    let seq = mark(&ts).await;
    let v = json_out(&cli(
        &ts,
        &[
            "user",
            "add",
            "olga",
            "--operator",
            "--no-password",
            "--json",
        ],
    ));
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(v["id"].as_str().unwrap()),
            reason: Reason::Is("role operator".into()),
            ..Want::cli("user.create")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_role() {
    let (ts, c) = start().await;
    let seq = mark(&ts).await;
    // The demo user is an operator.
    cli(&ts, &["user", "role", "demo", "user"]);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            reason: Reason::Is("role user (was operator)".into()),
            ..Want::cli("user.role")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password() {
    let (ts, mut c) = start().await;
    let password = c.make("new-password");
    let seq = mark(&ts).await;
    cli_stdin(&ts, &["user", "passwd", "demo"], &password);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            ..Want::cli("user.password")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_totp_enrolment_started() {
    let (ts, mut c) = start().await;
    let seq = mark(&ts).await;
    enrol(&ts, &mut c);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            reason: Reason::Is("enrolment started".into()),
            ..Want::cli("user.totp")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_totp_enabled() {
    let (ts, mut c) = start().await;
    let seed = enrol(&ts, &mut c);
    let code = totp::code_at(
        &seed,
        std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64,
    );
    c.add_code(&code);
    let seq = mark(&ts).await;
    cli(&ts, &["user", "mfa", "demo", "--confirm", &code]);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            reason: Reason::Is("enabled".into()),
            ..Want::cli("user.totp")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_totp_disabled() {
    let (ts, mut c) = start().await;
    enrol_and_confirm(&ts, &mut c);
    let seq = mark(&ts).await;
    cli(&ts, &["user", "mfa", "demo", "--disable"]);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            reason: Reason::Is("disabled".into()),
            ..Want::cli("user.totp")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_delete() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let seq = mark(&ts).await;
    cli(&ts, &["user", "delete", "demo"]);
    // The user's account is revoked first (its own entry), then the user goes.
    let entries = only(&ts, seq, &["account.revoke", "user.delete"]).await;
    check(
        &entries[0],
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            ..Want::cli("account.revoke")
        },
    );
    check(
        &entries[1],
        &Want {
            subject_user: some(&ts.info.user_id),
            reason: Reason::Is("user demo deleted".into()),
            ..Want::cli("user.delete")
        },
    );
    c.assert_absent(&ts).await;
}

// =============================================================================================
// Connected accounts: connect, disconnect, revoke
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_connect() {
    let (ts, mut c) = start().await;
    let seq = mark(&ts).await;
    let account = connect(&ts, &mut c).await;
    // Signing in on the way is its own entry (see `user_login_with_a_password`).
    let entries = only(&ts, seq, &["user.login", "account.connect"]).await;
    let stored = ts
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap();
    check(
        &entries[1],
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            scopes: Some(stored.scopes.to_string_spaced()),
            request: Req::Any,
            ..Want::user("account.connect", &ts.info.user_id, "session")
        },
    );
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_revoke_at_the_command_line() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let seq = mark(&ts).await;
    cli(&ts, &["account", "revoke", &account]);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            ..Want::cli("account.revoke")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

fn api_token(ts: &TestServer, c: &mut Canaries, name: &str) -> String {
    let token = cli(ts, &["api-token", "create", name]).trim().to_owned();
    c.add(token.clone());
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_revoke_through_the_admin_api() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let token = api_token(&ts, &mut c, "ops");
    let seq = mark(&ts).await;
    let resp = ts
        .http
        .delete(ts.url(&format!("/api/v1/accounts/{account}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            request: Req::Unchecked,
            ..Want::by("account.revoke", "operator", "ops", "api_token")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_disconnect_through_the_my_account_api() {
    let (ts, mut c) = start().await;
    let account = connect(&ts, &mut c).await;
    let app1 = granted_app(&ts, &mut c, confidential()).await;
    let first = signed_in(&ts, &mut c, &app1, &rid("code")).await;
    let refresh = first.body["refresh_token"].as_str().unwrap().to_owned();
    let me = app_token(
        &ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("audience", &format!("{}me/", ts.issuer)),
            ("scope", "delete:me:connected_accounts"),
        ],
        &rid("me"),
    )
    .await
    .token()
    .to_owned();
    c.add(me.clone());
    let seq = mark(&ts).await;
    let r = rid("disconnect");
    let resp = ts
        .http
        .delete(ts.url(&format!("/me/v1/connected-accounts/accounts/{account}")))
        .header("x-request-id", &r)
        .bearer_auth(&me)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    exactly_one(
        &ts,
        seq,
        &Want {
            subject_user: some(&ts.info.user_id),
            connection: some("demo-git"),
            account_id: Some(account),
            reason: Reason::Is(format!("disconnected through {}", app1.id)),
            request: Req::Id(r),
            ..Want::user("account.revoke", &ts.info.user_id, "access_token")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

// =============================================================================================
// The registry: connections, clients (agents and apps), grants, operator tokens
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_create() {
    let (ts, mut c) = start().await;
    let secret = c.make("upstream-client-secret");
    let file = ts.dir.path().join("corp.secret");
    std::fs::write(&file, &secret).unwrap();
    let seq = mark(&ts).await;
    cli(
        &ts,
        &[
            "connection",
            "add",
            "corp",
            "--provider",
            "oauth2",
            "--client-id",
            "corp-client",
            "--client-secret-file",
            file.to_str().unwrap(),
            "--authorize-url",
            "https://idp.example/authorize",
            "--token-url",
            "https://idp.example/token",
        ],
    );
    exactly_one(
        &ts,
        seq,
        &Want {
            connection: some("corp"),
            ..Want::cli("connection.create")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_create_agent() {
    let (ts, mut c) = start().await;
    let seq = mark(&ts).await;
    let v = json_out(&cli(
        &ts,
        &["agent", "add", "nightly", "--secret", "--json"],
    ));
    c.add(v["client_secret"].as_str().unwrap());
    let id = v["client_id"].as_str().unwrap();
    exactly_one(
        &ts,
        seq,
        &Want {
            agent_id: some(id),
            // The store names the new client in front of what it was given.
            reason: Reason::Is(format!("{id} (0 key(s), secret: true, redirect URIs: 0)")),
            ..Want::cli("client.create")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_create_app() {
    let (ts, mut c) = start().await;
    let seq = mark(&ts).await;
    let v = json_out(&cli(
        &ts,
        &["app", "add", "notes", "--redirect-uri", REDIRECT, "--json"],
    ));
    c.add(v["client_secret"].as_str().unwrap());
    let id = v["client_id"].as_str().unwrap();
    assert!(id.starts_with("app_"), "{id}");
    exactly_one(
        &ts,
        seq,
        &Want {
            agent_id: some(id),
            // The store names the new client in front of what it was given.
            reason: Reason::Is(format!("{id} (0 key(s), secret: true, redirect URIs: 1)")),
            ..Want::cli("client.create")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disable() {
    let (ts, c) = start().await;
    let agent = ts.info.agent_id.clone();
    let seq = mark(&ts).await;
    cli(&ts, &["agent", "disable", &agent]);
    exactly_one(
        &ts,
        seq,
        &Want {
            agent_id: Some(agent.clone()),
            reason: Reason::Is(format!("{agent} disabled")),
            ..Want::cli("client.disable")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_enable() {
    let (ts, c) = start().await;
    let agent = ts.info.agent_id.clone();
    cli(&ts, &["agent", "disable", &agent]);
    let seq = mark(&ts).await;
    cli(&ts, &["agent", "enable", &agent]);
    exactly_one(
        &ts,
        seq,
        &Want {
            agent_id: Some(agent.clone()),
            reason: Reason::Is(format!("{agent} enabled")),
            ..Want::cli("client.enable")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disable_through_the_admin_api() {
    let (ts, mut c) = start().await;
    let token = api_token(&ts, &mut c, "ops");
    let agent = ts.info.agent_id.clone();
    let seq = mark(&ts).await;
    let resp = ts
        .http
        .post(ts.url(&format!("/api/v1/agents/{agent}/disable")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    exactly_one(
        &ts,
        seq,
        &Want {
            agent_id: Some(agent.clone()),
            reason: Reason::Is(format!("{agent} disabled")),
            request: Req::Unchecked,
            ..Want::by("client.disable", "operator", "ops", "api_token")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_upsert() {
    let (ts, c) = start().await;
    let agent = ts.info.agent_id.clone();
    let seq = mark(&ts).await;
    cli(
        &ts,
        &[
            "agent",
            "grant",
            &agent,
            "--connection",
            "demo-git",
            "--scopes",
            "repo:read read:user",
            "--ip",
            "10.0.0.0/8",
        ],
    );
    exactly_one(
        &ts,
        seq,
        &Want {
            connection: some("demo-git"),
            agent_id: Some(agent.clone()),
            scopes: some("read:user repo:read"),
            reason: Reason::Is(format!("grant to {agent}")),
            ..Want::cli("grant.upsert")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_delete() {
    let (ts, c) = start().await;
    let agent = ts.info.agent_id.clone();
    let seq = mark(&ts).await;
    cli(
        &ts,
        &["agent", "ungrant", &agent, "--connection", "demo-git"],
    );
    exactly_one(
        &ts,
        seq,
        &Want {
            connection: some("demo-git"),
            agent_id: Some(agent.clone()),
            reason: Reason::Is(format!("grant of {agent} removed")),
            ..Want::cli("grant.delete")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_token_create() {
    let (ts, mut c) = start().await;
    let seq = mark(&ts).await;
    api_token(&ts, &mut c, "ops");
    exactly_one(
        &ts,
        seq,
        &Want {
            reason: Reason::Is("operator token ops".into()),
            ..Want::cli("operator_token.create")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_token_revoke() {
    let (ts, mut c) = start().await;
    api_token(&ts, &mut c, "ops");
    let seq = mark(&ts).await;
    cli(&ts, &["api-token", "revoke", "ops"]);
    exactly_one(
        &ts,
        seq,
        &Want {
            reason: Reason::Is("operator token ops".into()),
            ..Want::cli("operator_token.revoke")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

// =============================================================================================
// Keys
// =============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_create_on_first_start() {
    let (ts, mut c) = start().await;
    c.add(
        std::fs::read_to_string(ts.config.data_dir.join("kek"))
            .unwrap()
            .trim(),
    );
    let all = since(&ts, 0).await;
    let created: Vec<&AuditRecord> = all.iter().filter(|e| e.action == "key.create").collect();
    assert_eq!(created.len(), 1, "{all:#?}");
    check(
        created[0],
        &Want {
            reason: Reason::Is("first data key".into()),
            ..Want::cli("key.create")
        },
    );
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotate() {
    let (ts, mut c) = start().await;
    c.add(
        std::fs::read_to_string(ts.config.data_dir.join("kek"))
            .unwrap()
            .trim(),
    );
    let seq = mark(&ts).await;
    cli(&ts, &["key", "rotate"]);
    exactly_one(
        &ts,
        seq,
        &Want {
            reason: Reason::Is("data key v2".into()),
            ..Want::cli("key.rotate")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotate_kek() {
    let (ts, mut c) = start().await;
    let kek = ts.config.data_dir.join("kek");
    c.add(std::fs::read_to_string(&kek).unwrap().trim());
    let seq = mark(&ts).await;
    cli(&ts, &["key", "rotate", "--kek"]);
    c.add(std::fs::read_to_string(&kek).unwrap().trim());
    // A new KEK, then a new data key under it: one entry each.
    let entries = only(&ts, seq, &["key.rotate_kek", "key.rotate"]).await;
    check(
        &entries[0],
        &Want {
            reason: Reason::StartsWith("new KEK ".into()),
            ..Want::cli("key.rotate_kek")
        },
    );
    check(
        &entries[1],
        &Want {
            reason: Reason::Is("data key v2".into()),
            ..Want::cli("key.rotate")
        },
    );
    c.assert_absent(&ts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotate_signing() {
    let (ts, c) = start().await;
    let seq = mark(&ts).await;
    cli(&ts, &["key", "rotate", "--signing"]);
    exactly_one(
        &ts,
        seq,
        &Want {
            reason: Reason::StartsWith("new signing key ".into()),
            ..Want::cli("key.rotate_signing")
        },
    )
    .await;
    c.assert_absent(&ts).await;
}

/// Whether [`Canaries::assert_absent`] finds a secret planted in an entry by `plant`.
async fn planted_is_found(plant: impl FnOnce(&mut AuditRecord, &mut Canaries)) -> bool {
    let (ts, mut c) = start().await;
    let mut record = AuditRecord {
        at: ts.now(),
        actor_type: "operator".into(),
        actor_id: "local".into(),
        auth_method: "cli".into(),
        action: "test.plant".into(),
        decision: "allow".into(),
        ..Default::default()
    };
    plant(&mut record, &mut c);
    ts.vault.store().append_audit(&record).await.unwrap();
    let ts = std::sync::Arc::new(ts);
    let check = {
        let ts = ts.clone();
        tokio::spawn(async move { c.assert_absent(&ts).await })
    };
    check.await.is_err_and(|e| e.is_panic())
}

/// The check itself: a secret in any column is found, a code in a free-text one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_check_finds_a_planted_secret() {
    assert!(
        planted_is_found(|r, c| r.request_id = Some(format!("x{}x", c.make("planted")))).await,
        "a secret in request_id"
    );
    assert!(
        planted_is_found(|r, c| {
            c.add_code("987654");
            r.reason = Some("code 987654".into());
        })
        .await,
        "a code in reason"
    );
    assert!(
        !planted_is_found(|_, c| {
            c.make("unused");
        })
        .await,
        "nothing planted, nothing found"
    );
}
