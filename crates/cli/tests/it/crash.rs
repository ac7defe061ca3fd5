//! The kill -9 crash battery (issue 4): the real `latchkey` binary, killed with SIGKILL at
//! random points of a connect / exchange / refresh / revoke loop, [`ITERATIONS`] times, against
//! SQLite.
//!
//! - After each kill, before the restart, the database must pass `PRAGMA integrity_check` and
//!   hold every operation that was acknowledged before the kill: a connect's final redirect (the
//!   account is there), a revoke's exit status 0 (the account is revoked, its tokens gone), an
//!   exchange's 200 (its `token.release` audit row, which names the token's digest, is there).
//!   Operations the kill interrupted are neither acknowledged nor failures.
//! - After each restart, every `active` account must work (200 with a token the provider
//!   accepts) or fail honestly (401 `federated_connection_refresh_token_not_found`, telling the
//!   user to reconnect): never a 5xx, never a dead token.
//!
//! The provider is a [`MockUpstream`] that rotates refresh tokens strictly; in about half of the
//! rounds it answers only some time after rotating ([`Behaviour::RotateThenSlow`]), so kills
//! land in the window between the provider's action and the vault's commit. Its access tokens
//! live [`MOCK_ACCESS_TTL`] seconds, inside the vault's 30 s refresh margin, so every exchange is
//! also an upstream refresh. The accounts that hit the window are counted: they must end
//! `needs_reauth`, never `active` with a dead refresh token.
//!
//! `LATCHKEY_CRASH_SEED` replays a seed (printed in the report); the interleavings of the
//! concurrent operations still differ from run to run. The data directory and the servers' logs
//! are kept when the battery fails, or with `LATCHKEY_CRASH_KEEP=1`.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use latchkey_core::clock::{Clock, ManualClock, SystemClock};
use latchkey_crypto::Algorithm;
use latchkey_crypto::keygen::{self, SigningKey};
use latchkey_crypto::secrets::{random_bytes, sha256_b64};
use latchkey_testkit::{Behaviour, MockUpstream};
use serde_json::{Value, json};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use crate::harness::{GRANT, JWT_BEARER, JWT_TYPE, VAULT_TOKEN_TYPE};

/// Kills (each followed by a restart and a check).
const ITERATIONS: usize = 200;
/// Users; each has at most one account of the mock connection (the mock has one subject).
const USERS: usize = 10;
/// Users connected during set-up; the others get their first account from the loop.
const SEEDED: usize = 4;
/// Concurrent workers per round: 1..=this.
const MAX_WORKERS: u64 = 4;
/// The operations run for 0..=this many milliseconds before the kill.
const MAX_RUN_MILLIS: u64 = 400;
/// [`Behaviour::RotateThenSlow`] sleeps this range of milliseconds.
const SLOW_MILLIS: (u64, u64) = (50, 300);
/// The mock's access-token lifetime: below the vault's refresh margin (30 s), so every exchange
/// refreshes upstream; long enough that a token checked right after its release is alive.
const MOCK_ACCESS_TTL: i64 = 20;
const CONNECTION: &str = "mock";
const CLIENT_ID: &str = "latchkey-vault";
const CLIENT_SECRET: &str = "mock-client-secret-0123456789";
/// Every HTTP call has a deadline.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(20);

// --- randomness: a seeded SplitMix64, so a failing seed can be replayed ----------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[(self.next() % items.len() as u64) as usize])
        }
    }

    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

// --- the model: what was acknowledged -------------------------------------------------------

/// What the last acknowledged connect-or-revoke says about a user's account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Never connected.
    Nothing,
    /// A connect was acknowledged: the account exists (`active`, or `needs_reauth` if the
    /// provider refused it since).
    Connected,
    /// A revoke was acknowledged: the account is `revoked`, without tokens.
    Revoked,
    /// A connect or revoke was cut off by a kill: it may or may not have committed.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Connect,
    Revoke,
}

struct User {
    name: String,
    id: String,
    password: String,
    account: Option<String>,
    expect: Expect,
    acked_connects: u64,
}

#[derive(Default, Debug)]
struct OpCount {
    started: u64,
    acked: u64,
    /// Answered, but not with success (counted separately from interruptions).
    refused: u64,
}

#[derive(Default)]
struct Counts {
    connect: OpCount,
    revoke: OpCount,
    exchange: OpCount,
    exchange_not_connected: u64,
    exchange_unavailable: u64,
    verified_ok: u64,
    verified_reconnect: u64,
    /// Accounts `active` at a kill that came back `needs_reauth`, by the reason recorded.
    window_interrupted: u64,
    window_refused: u64,
    window_other: u64,
    /// …of which the restarted vault flagged before the first exchange (its start-up pass).
    window_at_startup: u64,
    /// …of which had no `refresh_started_at` mark at the kill.
    window_without_marker: u64,
    /// Kills after which at least one account hit the window.
    kills_with_window: u64,
    /// Accounts with a mark at the kill that came back `active` and working (the provider had
    /// not acted, the interrupted refresh was simply done again).
    marker_recovered: u64,
    /// Reuse detections at the mock while the restarted vault settled (startup + checks).
    reuse_after_restart: u64,
    /// Reuse detections at the mock during the operations (a vault that presents a replaced
    /// token while running has lost track of its own rotation).
    reuse_during_ops: u64,
    /// Accounts with `refresh_started_at` set when the database was checked after a kill.
    markers_at_kill: u64,
    /// …of which the killed process still claimed for its background refresher
    /// (`refresh_claimed_until` in the future), so that the next start-up pass skips them.
    markers_claimed: u64,
    kills_with_markers: u64,
    slow_rounds: u64,
    anomalies: Vec<String>,
    violations: Vec<String>,
}

struct Model {
    users: Vec<User>,
    /// This round's connect/revoke per user (at most one, so acknowledgements never race).
    claimed: HashMap<usize, Kind>,
    acked: HashSet<usize>,
    /// Digests of every released token that was acknowledged.
    releases: Vec<String>,
    acked_revokes: HashMap<String, u64>,
    counts: Counts,
}

// --- shared context ---------------------------------------------------------------------------

struct Agent {
    id: String,
    secret: String,
    key: SigningKey,
}

struct Shared {
    dir: PathBuf,
    data_dir: PathBuf,
    mock: MockUpstream,
    plain: reqwest::Client,
    agent: Agent,
    model: Mutex<Model>,
}

impl Shared {
    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One server incarnation.
struct Ctx {
    shared: Arc<Shared>,
    issuer: String,
    http: reqwest::Client,
}

/// The `latchkey` binary in `dir`, with none of the caller's `LATCHKEY_*` settings.
fn latchkey(dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LATCHKEY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env("LATCHKEY_LOG", "warn")
        // The mock provider listens on 127.0.0.1, which the SSRF guard refuses by default.
        .env(
            "LATCHKEY_OUTBOUND_ALLOW",
            crate::harness::outbound_allow_env(&crate::harness::loopback_allowed()),
        )
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Run an administrative command on the data directory; panics unless it succeeds.
async fn cli(dir: &Path, data_dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = latchkey(dir);
    cmd.args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the CLI finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "latchkey {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A client trusting the server's CA, following no redirects; `None` while the CA is not
/// (completely) written.
fn vault_client(ca: &Path) -> Option<reqwest::Client> {
    let pem = std::fs::read(ca).ok()?;
    let cert = reqwest::Certificate::from_pem(&pem).ok()?;
    reqwest::Client::builder()
        .tls_certs_only([cert])
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HTTP_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .ok()
}

// --- the server process -----------------------------------------------------------------------

struct Server {
    child: tokio::process::Child,
    issuer: String,
    http: reqwest::Client,
    log: PathBuf,
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"))
}

impl Server {
    /// `latchkey serve` on a free loopback port; waits for `/readyz`.
    async fn start(dir: &Path, data_dir: &Path, n: usize) -> Self {
        let ca = data_dir.join("tls").join("ca.pem");
        'attempt: for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = dir.join(format!("server-{n:03}-{attempt}.log"));
            let mut child = latchkey(dir)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(data_dir)
                .env("LATCHKEY_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let issuer = format!("https://127.0.0.1:{port}/");
            let started = Instant::now();
            let mut http = None;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let text = read_log(&log);
                    if text.contains("binding 127.0.0.1") {
                        continue 'attempt; // the port was taken meanwhile
                    }
                    panic!("the server exited ({status}) before it was ready:\n{text}");
                }
                if started.elapsed() > READY_TIMEOUT {
                    let _ = child.kill().await;
                    panic!(
                        "the server was not ready within {READY_TIMEOUT:?}:\n{}",
                        read_log(&log)
                    );
                }
                if http.is_none() {
                    http = vault_client(&ca);
                }
                if let Some(client) = &http {
                    let ready = client
                        .get(format!("{issuer}readyz"))
                        .timeout(Duration::from_secs(1))
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    if ready {
                        return Self {
                            child,
                            issuer,
                            http: http.unwrap(),
                            log,
                        };
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("no free loopback port in 5 attempts");
    }

    /// SIGKILL, and reap. Fails if the server had already died on its own.
    async fn kill9(mut self) -> PathBuf {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "the server died on its own ({status}):\n{}",
                read_log(&self.log)
            );
        }
        self.child.kill().await.unwrap();
        self.log
    }
}

// --- operations -------------------------------------------------------------------------------

/// Why an operation was not acknowledged.
enum NotAcked {
    /// No answer (the kill, most likely): it may or may not have taken effect.
    Interrupted,
    /// An answer that was not success.
    Refused(String),
}

impl From<reqwest::Error> for NotAcked {
    fn from(_: reqwest::Error) -> Self {
        NotAcked::Interrupted
    }
}

/// A browser for one sign-in: cookies by hand, sent only to the vault.
struct Browser<'a> {
    ctx: &'a Ctx,
    cookies: HashMap<String, String>,
}

impl Browser<'_> {
    async fn send(
        &mut self,
        req: reqwest::RequestBuilder,
        to_vault: bool,
    ) -> Result<(u16, Option<String>, String), NotAcked> {
        let req = if to_vault {
            let jar = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            req.header("cookie", jar)
        } else {
            req
        };
        let resp = req.send().await?;
        if to_vault {
            for v in resp.headers().get_all("set-cookie") {
                let v = v.to_str().unwrap_or_default();
                let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
                if let Some((name, value)) = pair.split_once('=') {
                    if attrs.contains("Max-Age=0") {
                        self.cookies.remove(name);
                    } else {
                        self.cookies.insert(name.to_owned(), value.to_owned());
                    }
                }
            }
        }
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(|l| match l.strip_prefix('/') {
                Some(path) => format!("{}{path}", self.ctx.issuer),
                None => l.to_owned(),
            });
        let body = resp.text().await?;
        Ok((status, location, body))
    }

    async fn get(&mut self, url: &str) -> Result<(u16, Option<String>, String), NotAcked> {
        let to_vault = url.starts_with(&self.ctx.issuer);
        let req = if to_vault {
            self.ctx.http.get(url)
        } else {
            self.ctx.shared.plain.get(url)
        };
        self.send(req, to_vault).await
    }
}

fn expect_status(
    step: &str,
    got: (u16, Option<String>, String),
    want: u16,
) -> Result<(Option<String>, String), NotAcked> {
    if got.0 == want {
        Ok((got.1, got.2))
    } else {
        Err(NotAcked::Refused(format!(
            "{step}: {} (wanted {want}) {:?} {}",
            got.0,
            got.1,
            got.2.chars().take(300).collect::<String>()
        )))
    }
}

fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    html[start..].split('"').next().map(str::to_owned)
}

/// Sign in as `name` and connect the mock through the HTTP flow; acknowledged by the callback's
/// redirect to the account page.
async fn connect_flow(ctx: &Ctx, name: &str, password: &str) -> Result<(), NotAcked> {
    let issuer = &ctx.issuer;
    let mut b = Browser {
        ctx,
        cookies: HashMap::new(),
    };
    let next = format!("/connect/{CONNECTION}");
    let got = b.get(&format!("{issuer}login?next={next}")).await?;
    let (_, page) = expect_status("login page", got, 200)?;
    let csrf = hidden(&page, "csrf").ok_or_else(|| NotAcked::Refused("no csrf field".into()))?;
    let form = [
        ("username", name),
        ("password", password),
        ("csrf", &csrf),
        ("next", &next),
    ];
    let got = b
        .send(ctx.http.post(format!("{issuer}login")).form(&form), true)
        .await?;
    let (to_connect, _) = expect_status("sign-in", got, 303)?;
    let got = b.get(&to_connect.unwrap_or_default()).await?;
    let (to_provider, _) = expect_status("connect start", got, 303)?;
    let authorize = to_provider.unwrap_or_default();
    if !authorize.starts_with(&format!("{}authorize?", ctx.shared.mock.url())) {
        return Err(NotAcked::Refused(format!("connect went to {authorize}")));
    }
    let got = b.get(&authorize).await?;
    let (callback, _) = expect_status("mock authorize", got, 302)?;
    let got = b.get(&callback.unwrap_or_default()).await?;
    let (done, _) = expect_status("callback", got, 303)?;
    let done = done.unwrap_or_default();
    if done.ends_with(&format!("/ui/accounts?connected={CONNECTION}")) {
        Ok(())
    } else {
        Err(NotAcked::Refused(format!("callback went to {done}")))
    }
}

/// An exchange's answer.
enum Exchanged {
    Token(String),
    NotConnected {
        description: String,
        connect_uri: Option<String>,
    },
    Unavailable(String),
    Other(u16, String),
}

/// The privileged-worker exchange as the agent for `user_id`, authenticated by the client
/// secret or by `private_key_jwt` at random. `Err` when no answer came.
async fn exchange(ctx: &Ctx, user_id: &str, rng: &mut Rng) -> Result<Exchanged, ()> {
    let agent = &ctx.shared.agent;
    let now = SystemClock.now();
    let jti = || uuid::Uuid::new_v4().to_string();
    let subject = agent.key.sign(
        Some("token-vault-req+jwt"),
        &json!({
            "iss": agent.id, "sub": user_id, "aud": ctx.issuer, "iat": now, "exp": now + 60,
            "jti": jti(), "audit_context": "crash battery",
        }),
    );
    let mut form = vec![
        ("grant_type", GRANT.to_owned()),
        ("client_id", agent.id.clone()),
        ("subject_token_type", JWT_TYPE.to_owned()),
        ("subject_token", subject),
        ("requested_token_type", VAULT_TOKEN_TYPE.to_owned()),
        ("connection", CONNECTION.to_owned()),
    ];
    if rng.chance(50) {
        form.push(("client_secret", agent.secret.clone()));
    } else {
        let assertion = agent.key.sign(
            None,
            &json!({"iss": agent.id, "sub": agent.id, "aud": ctx.issuer, "iat": now, "exp": now + 60, "jti": jti()}),
        );
        form.push(("client_assertion_type", JWT_BEARER.to_owned()));
        form.push(("client_assertion", assertion));
    }
    let resp = ctx
        .http
        .post(format!("{}oauth/token", ctx.issuer))
        .form(&form)
        .send()
        .await
        .map_err(|_| ())?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|_| ())?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let field = |k: &str| body[k].as_str().map(str::to_owned);
    Ok(match (status, field("error").as_deref()) {
        (200, None) => match field("access_token") {
            Some(t) => Exchanged::Token(t),
            None => Exchanged::Other(status, text),
        },
        (401, Some("federated_connection_refresh_token_not_found")) => Exchanged::NotConnected {
            description: field("error_description").unwrap_or_default(),
            connect_uri: field("connect_uri"),
        },
        (503, Some("temporarily_unavailable")) => Exchanged::Unavailable(text),
        _ => Exchanged::Other(status, text),
    })
}

/// The mock's `/api/ping` with an upstream access token.
async fn ping(shared: &Shared, token: &str) -> Option<u16> {
    shared
        .plain
        .get(format!("{}api/ping", shared.mock.url()))
        .bearer_auth(token)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// `latchkey account revoke` on the database; acknowledged by exit status 0. Killed with the
/// server (the worker is aborted and the child dropped).
async fn revoke(ctx: &Ctx, account: &str) -> Result<(), NotAcked> {
    let shared = &ctx.shared;
    let out = latchkey(&shared.dir)
        .args(["account", "revoke", account, "--data-dir"])
        .arg(&shared.data_dir)
        .output()
        .await
        .map_err(|_| NotAcked::Interrupted)?;
    if out.status.success() {
        Ok(())
    } else if out.status.signal().is_some() {
        Err(NotAcked::Interrupted)
    } else {
        Err(NotAcked::Refused(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

// --- the workers ------------------------------------------------------------------------------

/// Claim a user for a connect or a revoke this round: one such operation per user per round.
fn claim(model: &mut Model, kind: Kind, rng: &mut Rng) -> Option<usize> {
    let free: Vec<usize> = (0..model.users.len())
        .filter(|u| !model.claimed.contains_key(u))
        .filter(|u| kind == Kind::Connect || model.users[*u].account.is_some())
        .collect();
    let u = *rng.pick(&free)?;
    model.claimed.insert(u, kind);
    Some(u)
}

async fn do_connect(ctx: &Ctx, u: usize) {
    let (name, password) = {
        let mut m = ctx.shared.model();
        m.counts.connect.started += 1;
        (m.users[u].name.clone(), m.users[u].password.clone())
    };
    let result = connect_flow(ctx, &name, &password).await;
    let mut m = ctx.shared.model();
    match result {
        Ok(()) => {
            m.counts.connect.acked += 1;
            m.acked.insert(u);
            m.users[u].expect = Expect::Connected;
            m.users[u].acked_connects += 1;
        }
        Err(NotAcked::Refused(why)) => {
            m.counts.connect.refused += 1;
            m.counts.anomalies.push(format!("connect {name}: {why}"));
        }
        Err(NotAcked::Interrupted) => {}
    }
}

async fn do_revoke(ctx: &Ctx, u: usize) {
    let account = {
        let mut m = ctx.shared.model();
        m.counts.revoke.started += 1;
        m.users[u].account.clone().unwrap()
    };
    let result = revoke(ctx, &account).await;
    let mut m = ctx.shared.model();
    match result {
        Ok(()) => {
            m.counts.revoke.acked += 1;
            m.acked.insert(u);
            m.users[u].expect = Expect::Revoked;
            *m.acked_revokes.entry(account).or_default() += 1;
        }
        Err(NotAcked::Refused(why)) => {
            m.counts.revoke.refused += 1;
            m.counts.anomalies.push(format!("revoke {account}: {why}"));
        }
        Err(NotAcked::Interrupted) => {}
    }
}

async fn do_exchange(ctx: &Ctx, rng: &mut Rng) {
    let user_id = {
        let mut m = ctx.shared.model();
        m.counts.exchange.started += 1;
        let connected: Vec<usize> = (0..m.users.len())
            .filter(|u| m.users[*u].expect == Expect::Connected)
            .collect();
        let all: Vec<usize> = (0..m.users.len()).collect();
        let pool = if rng.chance(80) && !connected.is_empty() {
            connected
        } else {
            all
        };
        let u = *rng.pick(&pool).unwrap();
        m.users[u].id.clone()
    };
    let result = exchange(ctx, &user_id, rng).await;
    let mut m = ctx.shared.model();
    match result {
        Ok(Exchanged::Token(t)) => {
            m.counts.exchange.acked += 1;
            m.releases.push(sha256_b64(t.as_bytes()));
        }
        Ok(Exchanged::NotConnected { .. }) => m.counts.exchange_not_connected += 1,
        Ok(Exchanged::Unavailable(why)) => {
            m.counts.exchange_unavailable += 1;
            m.counts
                .anomalies
                .push(format!("exchange for {user_id}: 503 {why}"));
        }
        Ok(Exchanged::Other(status, body)) => {
            m.counts.exchange.refused += 1;
            m.counts
                .anomalies
                .push(format!("exchange for {user_id}: {status} {body}"));
        }
        Err(()) => {}
    }
}

/// Random operations until aborted: exchanges mostly, connects, revokes.
async fn worker(ctx: Arc<Ctx>, mut rng: Rng) {
    loop {
        let roll = rng.range(0, 99);
        let kind = match roll {
            0..=24 => Some(Kind::Connect),
            25..=37 => Some(Kind::Revoke),
            _ => None,
        };
        let claimed = kind.and_then(|k| {
            let mut m = ctx.shared.model();
            claim(&mut m, k, &mut rng).map(|u| (k, u))
        });
        match claimed {
            Some((Kind::Connect, u)) => do_connect(&ctx, u).await,
            Some((Kind::Revoke, u)) => do_revoke(&ctx, u).await,
            None => do_exchange(&ctx, &mut rng).await,
        }
    }
}

// --- checks -----------------------------------------------------------------------------------

async fn open_db(data_dir: &Path) -> SqlitePool {
    // Read-only: the restarted server, not this check, recovers the WAL the kill left behind.
    let options = SqliteConnectOptions::new()
        .filename(data_dir.join("latchkey.db"))
        .read_only(true);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("open the database read-only")
}

/// Whether `connected_accounts` has this column (the crash-window schema may be absent).
async fn has_column(pool: &SqlitePool, column: &str) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pragma_table_info('connected_accounts') WHERE name = ?",
    )
    .bind(column)
    .fetch_one(pool)
    .await
    .unwrap();
    n == 1
}

#[derive(Clone, Debug)]
struct AccountRow {
    id: String,
    user_id: String,
    status: String,
    reason: Option<String>,
    has_refresh: bool,
    has_access: bool,
}

async fn accounts(pool: &SqlitePool) -> Vec<AccountRow> {
    let rows: Vec<(String, String, String, Option<String>, bool, bool)> = sqlx::query_as(
        "SELECT a.id, a.user_id, a.status, a.status_reason, a.refresh_token IS NOT NULL, \
         a.access_token IS NOT NULL FROM connected_accounts a JOIN connections c ON c.id = a.connection_id \
         WHERE c.name = ?",
    )
    .bind(CONNECTION)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(
            |(id, user_id, status, reason, has_refresh, has_access)| AccountRow {
                id,
                user_id,
                status,
                reason,
                has_refresh,
                has_access,
            },
        )
        .collect()
}

/// An account as the kill left it.
struct AtKill {
    status: String,
    /// `refresh_started_at` was set: a refresh was in flight.
    marker: bool,
}

/// After a kill, before the restart: the database is sound and holds everything acknowledged.
/// Returns each account as the kill left it.
async fn check_after_kill(
    shared: &Shared,
    round: usize,
    markers: bool,
    claims: bool,
) -> HashMap<String, AtKill> {
    let pool = open_db(&shared.data_dir).await;
    let integrity: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&pool)
        .await
        .unwrap();
    let rows = accounts(&pool).await;
    let releases: Vec<Option<String>> =
        sqlx::query_scalar("SELECT reason FROM audit_events WHERE action = 'token.release'")
            .fetch_all(&pool)
            .await
            .unwrap();
    let connects: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT subject_user, COUNT(*) FROM audit_events WHERE action = 'account.connect' GROUP BY subject_user",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let revokes: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT account_id, COUNT(*) FROM audit_events WHERE action = 'account.revoke' GROUP BY account_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let in_flight: HashSet<String> = if markers {
        sqlx::query_scalar("SELECT id FROM connected_accounts WHERE refresh_started_at IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    let claimed: i64 = if markers && claims {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM connected_accounts WHERE refresh_started_at IS NOT NULL \
             AND refresh_claimed_until > ?",
        )
        .bind(SystemClock.now())
        .fetch_one(&pool)
        .await
        .unwrap()
    } else {
        0
    };
    pool.close().await;

    let mut m = shared.model();
    let mut violations = Vec::new();
    if integrity != ["ok"] {
        violations.push(format!("integrity_check: {integrity:?}"));
    }
    let released: HashSet<String> = releases
        .iter()
        .flatten()
        .filter_map(|r| r.strip_prefix("token ").map(str::to_owned))
        .collect();
    let lost = m.releases.iter().filter(|h| !released.contains(*h)).count();
    if lost > 0 {
        violations.push(format!(
            "{lost} acknowledged exchanges have no token.release row"
        ));
    }
    if m.releases.len() > releases.len() {
        violations.push(format!(
            "{} acknowledged exchanges but {} token.release rows",
            m.releases.len(),
            releases.len()
        ));
    }
    let connects: HashMap<String, i64> = connects
        .into_iter()
        .filter_map(|(u, n)| u.map(|u| (u, n)))
        .collect();
    let revokes: HashMap<String, i64> = revokes
        .into_iter()
        .filter_map(|(a, n)| a.map(|a| (a, n)))
        .collect();
    for (account, acked) in &m.acked_revokes {
        let audited = revokes.get(account).copied().unwrap_or(0);
        if audited < *acked as i64 {
            violations.push(format!(
                "{account}: {acked} acknowledged revokes, {audited} audited"
            ));
        }
    }
    let mut learned = Vec::new();
    for (u, user) in m.users.iter().enumerate() {
        let row = rows.iter().find(|r| r.user_id == user.id);
        let audited = connects.get(&user.id).copied().unwrap_or(0);
        if audited < user.acked_connects as i64 {
            violations.push(format!(
                "{}: {} acknowledged connects, {audited} audited",
                user.name, user.acked_connects
            ));
        }
        match (user.expect, row) {
            (Expect::Connected, None) | (Expect::Revoked, None) => violations.push(format!(
                "{}: expected {:?}, but the account is gone",
                user.name, user.expect
            )),
            (Expect::Connected, Some(r)) => {
                let ok = match r.status.as_str() {
                    "active" => r.has_refresh && r.has_access,
                    "needs_reauth" => true,
                    _ => false,
                };
                if !ok {
                    violations.push(format!(
                        "{}: a connect was acknowledged, but the account is {r:?}",
                        user.name
                    ));
                }
            }
            (Expect::Revoked, Some(r)) => {
                if r.status != "revoked" || r.has_refresh || r.has_access {
                    violations.push(format!(
                        "{}: a revoke was acknowledged, but the account is {r:?}",
                        user.name
                    ));
                }
            }
            (Expect::Nothing, Some(r)) => {
                violations.push(format!("{}: never connected, but has {r:?}", user.name))
            }
            (Expect::Nothing | Expect::Unknown, None) => {}
            (Expect::Unknown, Some(_)) => {}
        }
        if let Some(r) = row {
            match &user.account {
                None => learned.push((u, r.id.clone())),
                Some(id) if *id != r.id => violations.push(format!(
                    "{}: the account changed id from {id} to {}",
                    user.name, r.id
                )),
                Some(_) => {}
            }
        }
    }
    for (u, id) in learned {
        m.users[u].account = Some(id);
    }
    if !in_flight.is_empty() {
        m.counts.kills_with_markers += 1;
        m.counts.markers_at_kill += in_flight.len() as u64;
        m.counts.markers_claimed += claimed as u64;
    }
    m.counts.violations.extend(
        violations
            .into_iter()
            .map(|v| format!("round {round}: {v}")),
    );
    rows.into_iter()
        .map(|r| {
            let marker = in_flight.contains(&r.id);
            (
                r.id,
                AtKill {
                    status: r.status,
                    marker,
                },
            )
        })
        .collect()
}

/// After a restart: every `active` account works or fails honestly. Counts the accounts that
/// were `active` at the kill and came back `needs_reauth` (they hit the crash window).
async fn verify_after_restart(
    ctx: &Arc<Ctx>,
    round: usize,
    before: &HashMap<String, AtKill>,
    rng: &mut Rng,
) {
    let shared = &ctx.shared;
    let pool = open_db(&shared.data_dir).await;
    let active: Vec<AccountRow> = accounts(&pool)
        .await
        .into_iter()
        .filter(|r| r.status == "active")
        .collect();
    let connect_uri = format!("{}connect/{CONNECTION}", ctx.issuer);
    let tasks: Vec<_> = active
        .iter()
        .map(|r| {
            let (ctx, r, mut rng) = (ctx.clone(), r.clone(), rng.fork());
            tokio::spawn(async move {
                let answer = exchange(&ctx, &r.user_id, &mut rng).await;
                let alive = match &answer {
                    Ok(Exchanged::Token(t)) => ping(&ctx.shared, t).await,
                    _ => None,
                };
                (r, answer, alive)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let after: HashMap<String, AccountRow> = accounts(&pool)
        .await
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    pool.close().await;

    let mut m = shared.model();
    let mut violations = Vec::new();
    for (r, answer, alive) in results {
        let now = &after[&r.id];
        match answer {
            Ok(Exchanged::Token(t)) => {
                m.releases.push(sha256_b64(t.as_bytes()));
                if alive == Some(200) {
                    m.counts.verified_ok += 1;
                } else {
                    violations.push(format!(
                        "SILENT: {} answered 200 with a token the provider refuses ({alive:?})",
                        r.id
                    ));
                }
            }
            Ok(Exchanged::NotConnected {
                description,
                connect_uri: uri,
            }) => {
                m.counts.verified_reconnect += 1;
                if !description.contains("connect") || uri.as_deref() != Some(&connect_uri) {
                    violations.push(format!(
                        "{}: 401 without telling the user to reconnect: {description} {uri:?}",
                        r.id
                    ));
                }
                if now.status == "active" {
                    violations.push(format!(
                        "SILENT: {} answered 401 but stays active: {now:?}",
                        r.id
                    ));
                }
            }
            Ok(Exchanged::Unavailable(body)) => violations.push(format!(
                "SILENT: {} answered 503 after a restart, with the provider up: {body}",
                r.id
            )),
            Ok(Exchanged::Other(status, body)) => {
                violations.push(format!("SILENT: {} answered {status}: {body}", r.id))
            }
            Err(()) => violations.push(format!(
                "SILENT: {} got no answer from a running server",
                r.id
            )),
        }
    }
    let listed: HashSet<&str> = active.iter().map(|r| r.id.as_str()).collect();
    let mut hits = 0;
    for (id, at_kill) in before {
        let Some(now) = after.get(id) else {
            violations.push(format!("{id} disappeared across the restart"));
            continue;
        };
        if at_kill.status != "active" {
            continue;
        }
        if at_kill.marker && now.status == "active" {
            m.counts.marker_recovered += 1;
        }
        if now.status == "needs_reauth" {
            hits += 1;
            if !listed.contains(id.as_str()) {
                m.counts.window_at_startup += 1;
            }
            if !at_kill.marker {
                m.counts.window_without_marker += 1;
            }
            let reason = now.reason.as_deref().unwrap_or_default();
            if reason.contains("interrupted") {
                m.counts.window_interrupted += 1;
            } else if reason.contains("refused the stored refresh token") {
                m.counts.window_refused += 1;
            } else {
                m.counts.window_other += 1;
                m.counts
                    .anomalies
                    .push(format!("round {round}: {id} needs_reauth: {reason}"));
            }
        }
    }
    if hits > 0 {
        m.counts.kills_with_window += 1;
    }
    m.counts.violations.extend(
        violations
            .into_iter()
            .map(|v| format!("round {round}: {v}")),
    );
}

// --- the battery ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_battery() {
    let started = Instant::now();
    let seed = std::env::var("LATCHKEY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from_le_bytes(random_bytes(8).try_into().unwrap()));
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let data_dir = dir.join("data");

    // The provider, on a clock nobody moves; its access tokens live less than the refresh
    // margin, so every exchange refreshes upstream.
    let mock =
        MockUpstream::start(Arc::new(ManualClock::default()), CLIENT_ID, CLIENT_SECRET).await;
    mock.set_access_token_ttl(MOCK_ACCESS_TTL);
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HTTP_TIMEOUT)
        .build()
        .unwrap();

    // Set-up, through the CLI while the first server runs.
    let mut server = Server::start(&dir, &data_dir, 0).await;
    let secret_file = dir.join("mock.secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    let base = mock.url();
    cli(
        &dir,
        &data_dir,
        &[
            "connection",
            "add",
            CONNECTION,
            "--provider",
            "oauth2",
            "--authorize-url",
            &format!("{base}authorize"),
            "--token-url",
            &format!("{base}token"),
            "--revoke-url",
            &format!("{base}revoke"),
            "--userinfo-url",
            &format!("{base}userinfo"),
            "--client-id",
            CLIENT_ID,
            "--client-secret-file",
            secret_file.to_str().unwrap(),
            "--scopes",
            "read",
        ],
        None,
    )
    .await;
    let generated = keygen::generate(Algorithm::ES256);
    let public_key = dir.join("agent.pub.pem");
    std::fs::write(&public_key, &generated.public_pem).unwrap();
    let out = cli(
        &dir,
        &data_dir,
        &[
            "agent",
            "add",
            "crash-agent",
            "--public-key",
            public_key.to_str().unwrap(),
            "--secret",
            "--json",
        ],
        None,
    )
    .await;
    let added: Value = serde_json::from_str(&out).unwrap();
    let agent = Agent {
        id: added["client_id"].as_str().unwrap().to_owned(),
        secret: added["client_secret"].as_str().unwrap().to_owned(),
        key: SigningKey::from_pem(&generated.private_pem, Algorithm::ES256, None).unwrap(),
    };
    cli(
        &dir,
        &data_dir,
        &[
            "agent",
            "grant",
            &agent.id,
            "--connection",
            CONNECTION,
            "--scopes",
            "read",
        ],
        None,
    )
    .await;
    let mut users = Vec::new();
    for i in 0..USERS {
        let name = format!("crash{i:02}");
        let password = format!("crash battery password {i}");
        let out = cli(
            &dir,
            &data_dir,
            &["user", "add", &name, "--json"],
            Some(&format!("{password}\n")),
        )
        .await;
        let added: Value = serde_json::from_str(&out).unwrap();
        users.push(User {
            name,
            id: added["id"].as_str().unwrap().to_owned(),
            password,
            account: None,
            expect: Expect::Nothing,
            acked_connects: 0,
        });
    }
    let shared = Arc::new(Shared {
        dir: dir.clone(),
        data_dir: data_dir.clone(),
        mock: mock.clone(),
        plain,
        agent,
        model: Mutex::new(Model {
            users,
            claimed: HashMap::new(),
            acked: HashSet::new(),
            releases: Vec::new(),
            acked_revokes: HashMap::new(),
            counts: Counts::default(),
        }),
    });
    {
        let ctx = Ctx {
            shared: shared.clone(),
            issuer: server.issuer.clone(),
            http: server.http.clone(),
        };
        for u in 0..SEEDED {
            shared.model().claimed.insert(u, Kind::Connect);
            do_connect(&ctx, u).await;
            assert!(
                shared.model().acked.contains(&u),
                "set-up connect: {:?}",
                shared.model().counts.anomalies
            );
        }
        let mut m = shared.model();
        m.claimed.clear();
        m.acked.clear();
    }
    let probe = open_db(&data_dir).await;
    let markers = has_column(&probe, "refresh_started_at").await;
    let claims = has_column(&probe, "refresh_claimed_until").await;
    probe.close().await;
    let setup_time = started.elapsed();

    let (mut t_start, mut t_verify, mut t_ops, mut t_check) = (
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
    );
    for round in 0..ITERATIONS {
        // The operations, for a random while, with the provider strict or rotate-then-slow.
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            issuer: server.issuer.clone(),
            http: server.http.clone(),
        });
        if rng.chance(50) {
            mock.set(Behaviour::RotateThenSlow {
                millis: rng.range(SLOW_MILLIS.0, SLOW_MILLIS.1),
            });
            shared.model().counts.slow_rounds += 1;
        } else {
            mock.set(Behaviour::StrictRotation);
        }
        let reuse_before = mock.stats().reused_refresh_tokens;
        let phase = Instant::now();
        let workers: Vec<_> = (0..rng.range(1, MAX_WORKERS))
            .map(|_| tokio::spawn(worker(ctx.clone(), rng.fork())))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.range(0, MAX_RUN_MILLIS))).await;

        // kill -9, then stop the workers (a revoke's CLI process dies with its worker).
        let log = server.kill9().await;
        for w in &workers {
            w.abort();
        }
        for w in workers {
            if let Err(e) = w.await
                && e.is_panic()
            {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        mock.set(Behaviour::StrictRotation);
        t_ops += phase.elapsed();
        {
            let mut m = shared.model();
            m.counts.reuse_during_ops +=
                u64::from(mock.stats().reused_refresh_tokens - reuse_before);
            let claimed: Vec<usize> = m.claimed.keys().copied().collect();
            for u in claimed {
                if !m.acked.contains(&u) {
                    m.users[u].expect = Expect::Unknown;
                }
            }
            m.claimed.clear();
            m.acked.clear();
            let text = read_log(&log);
            if text.contains("panicked") {
                m.counts
                    .violations
                    .push(format!("round {round}: the server panicked:\n{text}"));
            }
        }

        // Before the restart: the database as the kill left it.
        let phase = Instant::now();
        let before = check_after_kill(&shared, round, markers, claims).await;
        t_check += phase.elapsed();

        // Restart, and every active account must work or fail honestly.
        let phase = Instant::now();
        server = Server::start(&dir, &data_dir, round + 1).await;
        t_start += phase.elapsed();
        let phase = Instant::now();
        let reuse_before = mock.stats().reused_refresh_tokens;
        let ctx = Arc::new(Ctx {
            shared: shared.clone(),
            issuer: server.issuer.clone(),
            http: server.http.clone(),
        });
        verify_after_restart(&ctx, round, &before, &mut rng).await;
        shared.model().counts.reuse_after_restart +=
            u64::from(mock.stats().reused_refresh_tokens - reuse_before);
        t_verify += phase.elapsed();
    }
    let _ = server.kill9().await;
    let final_pool = open_db(&data_dir).await;
    let final_accounts = accounts(&final_pool).await;
    final_pool.close().await;

    let m = shared.model();
    let c = &m.counts;
    let interrupted = |o: &OpCount, other: u64| o.started - o.acked - o.refused - other;
    let mut statuses: HashMap<&str, usize> = HashMap::new();
    for a in &final_accounts {
        *statuses.entry(a.status.as_str()).or_default() += 1;
    }
    let per = |d: Duration| d / ITERATIONS as u32;
    eprintln!(
        "kill -9 battery (seed {seed}): {ITERATIONS} iterations, {ITERATIONS} kills, {} with the provider rotating then slow\n\
         \x20 acknowledged before a kill: connects {} (interrupted {}, refused {}), revokes {} (interrupted {}, refused {}), \
         exchanges {} (interrupted {}, 401 not connected {}, 503 {}, other {})\n\
         \x20 after restarts: {} exchanges worked (token alive at the provider), {} answered 401 reconnect\n\
         \x20 crash window: after {} of {ITERATIONS} kills, {} accounts active at the kill came back needs_reauth ({} 'interrupted', {} 'refused the stored refresh token', {} other; \
         {} flagged by the start-up pass before any exchange; {} without a refresh_started_at mark); \
         provider reuse detections after restarts {}, during operations {}\n\
         \x20 refresh_started_at column: {markers}; set on {} accounts over {} kills ({} still claimed by the killed process's refresher), {} came back active and working\n\
         \x20 silent breakages / violations: {}; anomalies: {}\n\
         \x20 final accounts: {statuses:?}\n\
         \x20 wall time {:?} (set-up {setup_time:?}; per round: start {:?}, checks after restart {:?}, operations {:?}, database check {:?})",
        c.slow_rounds,
        c.connect.acked,
        interrupted(&c.connect, 0),
        c.connect.refused,
        c.revoke.acked,
        interrupted(&c.revoke, 0),
        c.revoke.refused,
        c.exchange.acked,
        interrupted(
            &c.exchange,
            c.exchange_not_connected + c.exchange_unavailable
        ),
        c.exchange_not_connected,
        c.exchange_unavailable,
        c.exchange.refused,
        c.verified_ok,
        c.verified_reconnect,
        c.kills_with_window,
        c.window_interrupted + c.window_refused + c.window_other,
        c.window_interrupted,
        c.window_refused,
        c.window_other,
        c.window_at_startup,
        c.window_without_marker,
        c.reuse_after_restart,
        c.reuse_during_ops,
        c.markers_at_kill,
        c.kills_with_markers,
        c.markers_claimed,
        c.marker_recovered,
        c.violations.len(),
        c.anomalies.len(),
        started.elapsed(),
        per(t_start),
        per(t_verify),
        per(t_ops),
        per(t_check),
    );
    for a in c.anomalies.iter().take(20) {
        eprintln!("  anomaly: {a}");
    }
    if !c.violations.is_empty() || std::env::var_os("LATCHKEY_CRASH_KEEP").is_some() {
        eprintln!(
            "  data directory and server logs kept in {}",
            tmp.keep().display()
        );
    }
    assert!(
        c.violations.is_empty(),
        "{} violations (seed {seed}), the first ones:\n{}",
        c.violations.len(),
        c.violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        c.connect.acked > 0 && c.revoke.acked > 0 && c.exchange.acked > 0,
        "every kind of operation was acknowledged at least once"
    );
    // With crash-window detection in the vault (the marker is written and survives kills),
    // the accounts that hit the window are flagged as interrupted.
    if markers && c.kills_with_markers > 0 {
        assert!(
            c.window_interrupted > 0,
            "refresh_started_at survived {} kills, but no account was flagged 'interrupted'",
            c.kills_with_markers
        );
    }
}
