//! Spawn a demo-mode server on `127.0.0.1:0` with a fresh data directory and a movable clock,
//! and the helpers every test uses: a cookie-keeping browser flow, signed requests, counters.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use latchkey_core::Vault;
use latchkey_core::clock::{Clock, ManualClock};
use latchkey_crypto::Algorithm;
use latchkey_crypto::keygen::SigningKey;
use latchkey_demo::DemoProvider;
use latchkey_server::demo::DemoInfo;
use latchkey_server::{Config, ServeOptions, Server};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::sync::oneshot;

// --- canaries: no upstream secret in a log, an error body, a page or the database ----------

/// Everything this test process's in-process servers log, at debug level: scanned for
/// upstream secrets (`latchkey_testkit::assert_no_canary`) when each server stops.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,h2=info,hyper=info,hyper_util=info,rustls=info,tokio=info,runtime=info",
            ))
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether the captured logs hold `needle` (the capture's own test).
pub fn captured_logs_contain(needle: &str) -> bool {
    let logs = captured_logs();
    let logs = logs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    logs.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The logs captured so far hold no upstream secret.
fn assert_no_canary_in_logs() {
    let logs = captured_logs();
    let logs = logs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(
        !logs.is_empty(),
        "the servers logged nothing: is the capture installed?"
    );
    latchkey_testkit::assert_no_canary("the server's log", &logs);
}

/// A SQLite database's files (with its WAL) hold no upstream secret in plaintext.
pub fn assert_no_canary_in_db(db: &Path) {
    for file in [db.to_path_buf(), db.with_extension("db-wal")] {
        if let Ok(bytes) = std::fs::read(&file) {
            latchkey_testkit::assert_no_canary(&file.display().to_string(), &bytes);
        }
    }
}

pub const GRANT: &str =
    "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token";
pub const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const VAULT_TOKEN_TYPE: &str = "http://auth0.com/oauth/token-type/token-vault-access-token";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub issuer: String,
    pub ca_path: PathBuf,
    pub http: reqwest::Client,
    pub clock: ManualClock,
    pub vault: Arc<Vault>,
    pub demo: DemoProvider,
    pub info: DemoInfo,
    pub agent_key: SigningKey,
    cookies: Mutex<HashMap<String, String>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The outbound allowance of the test servers: the mock providers, fake APIs and webhook
/// receivers the tests start listen on 127.0.0.1, which the SSRF guard refuses by default
/// (`crates/cli/tests/it/ssrf.rs` runs servers without it).
pub fn loopback_allowed() -> Vec<String> {
    vec!["127.0.0.1".into()]
}

/// `outbound_allow` as the environment gives it (a TOML list), for `latchkey` subprocesses.
pub fn outbound_allow_env(allow: &[String]) -> String {
    let quoted: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A plain HTTP client trusting the server's CA, following no redirects.
pub fn client_for(ca_pem: &[u8]) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

impl TestServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".into(),
            outbound_allow: loopback_allowed(),
            ..Config::default()
        };
        Self::start_with(dir, config).await
    }

    pub async fn start_with(dir: tempfile::TempDir, config: Config) -> Self {
        captured_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let clock = ManualClock::default();
        let server = Server::with_listener(
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
        // With an operator certificate, the test still trusts the CA that issued it.
        let ca_path = server
            .ca_path
            .clone()
            .unwrap_or_else(|| config.data_dir.join("tls").join("ca.pem"));
        let http = client_for(&std::fs::read(&ca_path).unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let (issuer, vault, demo) = (
            server.issuer.clone(),
            server.vault.clone(),
            server.demo.clone().unwrap(),
        );
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        let pem = std::fs::read_to_string(&info.agent_key).unwrap();
        let agent_key = SigningKey::from_pem(&pem, Algorithm::RS256, None).unwrap();
        Self {
            dir,
            config,
            issuer,
            ca_path,
            http,
            clock,
            vault,
            demo,
            info,
            agent_key,
            cookies: Mutex::new(HashMap::new()),
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stop serving; hands back the data directory (for restart tests).
    pub async fn stop(mut self) -> (tempfile::TempDir, Config) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.assert_no_canary();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.config.clone())
    }

    /// No upstream secret in what the servers logged or in this server's SQLite database.
    fn assert_no_canary(&self) {
        assert_no_canary_in_logs();
        if self.config.database_url.is_none() {
            assert_no_canary_in_db(&self.db_path());
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.issuer, path.trim_start_matches('/'))
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub fn db_path(&self) -> PathBuf {
        self.config.data_dir.join("latchkey.db")
    }

    // --- a browser: cookies by hand ---------------------------------------------------------

    fn cookie_header(&self) -> String {
        self.cookies
            .lock()
            .unwrap()
            .iter()
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

    /// GET (absolute URL or path) with cookies; returns status, Location, body.
    pub async fn browse(&self, url: &str) -> (StatusCode, Option<String>, String) {
        let url = if url.starts_with("http") {
            url.to_owned()
        } else {
            self.url(url)
        };
        let resp = self
            .http
            .get(&url)
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    pub async fn submit(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, String) {
        let url = if url.starts_with("http") {
            url.to_owned()
        } else {
            self.url(url)
        };
        let resp = self
            .http
            .post(&url)
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    async fn finish(&self, resp: reqwest::Response) -> (StatusCode, Option<String>, String) {
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
        let body = resp.text().await.unwrap();
        latchkey_testkit::assert_no_canary(&format!("the page {status}"), body.as_bytes());
        (status, location, body)
    }

    /// Sign in as the demo user and connect `demo-git` through the real HTTP flow: Latchkey's
    /// login, the provider's consent page, the callback. Returns the connected account id.
    pub async fn connect_demo_account(&self) -> String {
        let (status, _, page) = self.browse("/login?next=/connect/demo-git").await;
        assert_eq!(status, 200);
        let csrf = hidden_field(&page, "csrf");
        let (status, location, _) = self
            .submit(
                "/login",
                &[
                    ("username", &self.info.username),
                    ("password", &self.info.password),
                    ("csrf", &csrf),
                    ("next", "/connect/demo-git"),
                ],
            )
            .await;
        assert_eq!(status, 303, "login redirects");
        let (status, location, _) = self.browse(&location.unwrap()).await;
        assert_eq!(status, 303, "connect redirects to the provider");
        let authorize = location.unwrap();
        assert!(
            authorize.starts_with(&self.url("/demo/oauth/authorize?")),
            "{authorize}"
        );
        assert!(authorize.contains("code_challenge_method=S256"));
        let (status, _, consent_page) = self.browse(&authorize).await;
        assert_eq!(status, 200);
        let consent = hidden_field(&consent_page, "consent");
        let (status, location, _) = self
            .submit(
                "/demo/oauth/authorize",
                &[("consent", &consent), ("decision", "approve")],
            )
            .await;
        assert_eq!(status, 302, "consent redirects back");
        let callback = location.unwrap();
        assert!(callback.starts_with(&self.url("/connect/demo-git/callback?")));
        let (status, location, body) = self.browse(&callback).await;
        assert_eq!(status, 303, "callback completes: {body}");
        assert!(
            location
                .unwrap()
                .ends_with("/ui/accounts?connected=demo-git")
        );
        let accounts = self
            .vault
            .store()
            .list_accounts(Some(&self.info.user_id))
            .await
            .unwrap();
        accounts.last().expect("an account").id.clone()
    }

    // --- an agent ---------------------------------------------------------------------------

    fn signed(&self, typ: Option<&str>, base: Value, overrides: Value) -> String {
        self.agent_key.sign(typ, &merge(base, overrides))
    }

    /// A privileged-worker subject JWT for the demo user; `overrides` replace claims (`null`
    /// removes one).
    pub fn subject(&self, overrides: Value) -> String {
        let now = self.now();
        let base = json!({
            "iss": self.info.agent_id, "sub": self.info.user_id, "aud": self.issuer,
            "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(), "audit_context": "integration test",
        });
        self.signed(Some("token-vault-req+jwt"), base, overrides)
    }

    pub fn assertion(&self, overrides: Value) -> String {
        let now = self.now();
        let id = &self.info.agent_id;
        let base = json!({"iss": id, "sub": id, "aud": self.issuer, "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string()});
        self.signed(None, base, overrides)
    }

    /// A complete, valid exchange request authenticated by `private_key_jwt`.
    pub fn exchange_params(&self) -> Vec<(String, String)> {
        self.params_with(self.subject(json!({})), self.assertion(json!({})))
    }

    pub fn params_with(&self, subject: String, assertion: String) -> Vec<(String, String)> {
        [
            ("grant_type", GRANT.to_owned()),
            ("client_id", self.info.agent_id.clone()),
            ("client_assertion_type", JWT_BEARER.to_owned()),
            ("client_assertion", assertion),
            ("subject_token_type", JWT_TYPE.to_owned()),
            ("subject_token", subject),
            ("requested_token_type", VAULT_TOKEN_TYPE.to_owned()),
            ("connection", "demo-git".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    pub async fn post_form(&self, params: &[(String, String)]) -> Answer {
        let resp = self
            .http
            .post(self.url("/oauth/token"))
            .form(params)
            .send()
            .await
            .unwrap();
        Answer::read(resp).await
    }

    pub async fn post_raw(&self, content_type: &str, body: Vec<u8>) -> Answer {
        let resp = self
            .http
            .post(self.url("/oauth/token"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        Answer::read(resp).await
    }

    pub async fn post_json(&self, body: &Value) -> Answer {
        self.post_raw("application/json", serde_json::to_vec(body).unwrap())
            .await
    }

    /// Token releases recorded in the audit trail.
    pub async fn releases(&self) -> usize {
        self.vault
            .store()
            .list_audit(100_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.record.action == "token.release")
            .count()
    }

    /// The account's upstream refresh token, opened from storage (tests act behind the vault).
    pub async fn stored_refresh_token(&self, account: &str) -> String {
        let stored = self
            .vault
            .store()
            .account_by_id(account)
            .await
            .unwrap()
            .unwrap();
        let token = self
            .vault
            .keys
            .open_string(
                latchkey_core::vault::account_slot(account, "refresh_token"),
                stored.refresh_token.as_deref().unwrap(),
            )
            .await
            .unwrap();
        secrecy::ExposeSecret::expose_secret(&token).to_owned()
    }

    /// POST to one of the demo provider's endpoints as Latchkey's client would: the status and
    /// the JSON body (`Null` when empty).
    pub async fn demo_client_post(&self, path: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let secret = latchkey_server::demo::demo_client_secret(&self.vault)
            .await
            .unwrap();
        let resp = self
            .http
            .post(self.url(path))
            .basic_auth(latchkey_server::demo::DEMO_CLIENT_ID, Some(secret))
            .form(form)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn sql_pool(&self) -> sqlx::SqlitePool {
        sqlx::SqlitePool::connect(&format!("sqlite://{}", self.db_path().display()))
            .await
            .unwrap()
    }

    pub async fn used_jtis(&self) -> i64 {
        let pool = self.sql_pool().await;
        let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM used_jtis")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n.0
    }

    /// Run the `latchkey` binary on this server's data directory.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
        cmd.args(args)
            .arg("--data-dir")
            .arg(&self.config.data_dir)
            .env("LATCHKEY_PUBLIC_URL", &self.issuer)
            .env_remove("LATCHKEY_KEK")
            .env_remove("LATCHKEY_DATABASE_URL")
            .env(
                "LATCHKEY_OUTBOUND_ALLOW",
                outbound_allow_env(&self.config.outbound_allow),
            )
            .env(
                "LATCHKEY_OUTBOUND_ALLOW_PRIVATE",
                self.config.outbound_allow_private.to_string(),
            );
        if let Some(url) = &self.config.database_url {
            cmd.env("LATCHKEY_DATABASE_URL", url);
        }
        cmd.output().unwrap()
    }

    /// Run the `latchkey` binary on this server's data directory; assert it succeeded; its
    /// standard output.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `latchkey agent grant` for the demo agent on `demo-git`, with more flags (the grant
    /// replaces an earlier one whole).
    pub fn grant(&self, scopes: &str, flags: &[&str]) {
        let mut args = vec![
            "agent",
            "grant",
            &self.info.agent_id,
            "--connection",
            "demo-git",
            "--scopes",
            scopes,
        ];
        args.extend_from_slice(flags);
        self.cli_ok(&args);
    }

    /// The demo agent's own Latchkey access token for the agent API (`client_credentials`
    /// with `private_key_jwt`).
    pub async fn agent_token(&self) -> String {
        let params: Vec<(String, String)> = [
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", self.info.agent_id.clone()),
            ("client_assertion_type", JWT_BEARER.to_owned()),
            ("client_assertion", self.assertion(json!({}))),
            ("resource", self.url("/mcp")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let answer = self.post_form(&params).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        answer.token().to_owned()
    }

    /// Call the demo provider's API with an upstream token.
    pub async fn demo_api(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(self.url(&format!("/demo/api/{path}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// A token-endpoint answer with the checks every answer must pass.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub async fn read(resp: reqwest::Response) -> Self {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        if status.as_u16() >= 400 {
            latchkey_testkit::assert_no_canary("an error body", text.as_bytes());
        }
        let body =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        assert!(
            status.as_u16() < 500 || status == 503,
            "no 5xx for client input: {status} {text}"
        );
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/json",
            "exact content type"
        );
        assert!(
            headers.get("www-authenticate").is_none(),
            "no WWW-Authenticate on /oauth/token"
        );
        assert_eq!(headers.get("cache-control").unwrap(), "no-store");
        Self {
            status,
            headers,
            body,
        }
    }

    pub fn token(&self) -> &str {
        assert_eq!(self.status, 200, "{:?}", self.body);
        self.body["access_token"].as_str().unwrap()
    }

    /// Assert an error answer: status and code, and that no token came with it.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status.as_u16(), self.body["error"].as_str()),
            (status, Some(code)),
            "{:?}",
            self.body
        );
        assert!(self.body.get("access_token").is_none());
        assert!(
            self.body["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }
}

pub fn merge(mut base: Value, overrides: Value) -> Value {
    if let (Some(b), Value::Object(o)) = (base.as_object_mut(), overrides) {
        for (k, v) in o {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
    base
}

pub fn hidden_field(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no field {name} in {html}"))
        + marker.len();
    html[start..].split('"').next().unwrap().to_owned()
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A new, empty database on the machine's PostgreSQL (`LATCHKEY_TEST_PG_URL` names another
/// server); its URL.
pub async fn fresh_database() -> String {
    let admin = std::env::var("LATCHKEY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {admin} is needed for this test ({e}); start it with \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
            )
        });
    let name = format!("lk_it_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_path(&name);
    url.to_string()
}

pub async fn drop_database(url: &str) {
    let mut admin = url::Url::parse(url).unwrap();
    let name = admin.path().trim_start_matches('/').to_owned();
    admin.set_path("postgres");
    if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(admin.as_str()).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

// --- either backend -------------------------------------------------------------------------

/// The database a test server runs on: the default SQLite file in its data directory, or a
/// fresh database of the machine's PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A PostgreSQL database this test created: dropped (its connections ended) when the guard is,
/// so a failing test leaves none behind either.
pub struct PgDatabase {
    pub url: String,
}

impl PgDatabase {
    pub async fn fresh() -> Self {
        Self {
            url: fresh_database().await,
        }
    }

    /// A copy of this database (`CREATE DATABASE … TEMPLATE`). PostgreSQL copies only a
    /// database nobody is connected to: connections still open (a stopped server's pool closing,
    /// a CLI process that just exited) are ended first.
    pub async fn copy(&self) -> Self {
        let mut admin = url::Url::parse(&self.url).unwrap();
        let template = admin.path().trim_start_matches('/').to_owned();
        admin.set_path("postgres");
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin.as_str())
            .await
            .unwrap();
        let name = format!("lk_it_{}", uuid::Uuid::new_v4().simple());
        for attempt in 0.. {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&template)
            .execute(&mut conn)
            .await
            .unwrap();
            let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {name} TEMPLATE {template}"
            )))
            .execute(&mut conn)
            .await;
            match created {
                Ok(_) => break,
                // 55006 object_in_use: a terminated backend has not exited yet.
                Err(e)
                    if attempt < 50
                        && e.as_database_error().and_then(|d| d.code()).as_deref()
                            == Some("55006") =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("copying {template}: {e}"),
            }
        }
        let mut url = url::Url::parse(&self.url).unwrap();
        url.set_path(&name);
        Self {
            url: url.to_string(),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() && self.task.is_some() {
            self.assert_no_canary();
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot block on a future: a runtime of
        // its own on a thread of its own.
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(drop_database(&url))
        })
        .join();
    }
}

/// A pool on a test server's database, whichever the backend.
pub enum Sql {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Sql {
    pub async fn connect(config: &Config) -> Self {
        match &config.database_url {
            Some(url) => Self::Postgres(sqlx::PgPool::connect(url).await.unwrap()),
            None => Self::Sqlite(
                sqlx::SqlitePool::connect(&format!(
                    "sqlite://{}",
                    config.data_dir.join("latchkey.db").display()
                ))
                .await
                .unwrap(),
            ),
        }
    }

    /// Run `sql` (any number of statements, no parameters).
    pub async fn execute(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Self::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Self::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The one integer `sql` selects.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Self::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Self::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        }
        .unwrap()
    }

    pub async fn close(self) {
        match self {
            Self::Sqlite(p) => p.close().await,
            Self::Postgres(p) => p.close().await,
        }
    }
}

impl TestServer {
    /// A demo server on `backend`; on PostgreSQL, the guard of its fresh database (keep it
    /// until the server has stopped).
    pub async fn start_on(backend: Backend) -> (Self, Option<PgDatabase>) {
        match backend {
            Backend::Sqlite => (Self::start().await, None),
            Backend::Postgres => {
                let db = PgDatabase::fresh().await;
                let dir = tempfile::tempdir().unwrap();
                let config = Config {
                    data_dir: dir.path().join("data"),
                    listen: "127.0.0.1:0".into(),
                    database_url: Some(db.url.clone()),
                    outbound_allow: loopback_allowed(),
                    ..Config::default()
                };
                (Self::start_with(dir, config).await, Some(db))
            }
        }
    }

    /// A pool on this server's database (SQLite file or PostgreSQL).
    pub async fn sql(&self) -> Sql {
        Sql::connect(&self.config).await
    }
}
