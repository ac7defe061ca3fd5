//! The worked examples in `examples/`, each run to completion the way a person runs it — as a
//! subprocess, from the directory holding `latchkey-data`, with the environment its README
//! section names — against a fresh `latchkey demo`: the real binary in its own process with its
//! own data directory, its demo account connected through the same form posts a browser makes.
//! Each test checks the example's own verdict (its exit status: wrong before the account is
//! connected, right after) and then the outcome itself, read back independently (the comment on
//! the demo provider, the releases on the audit trail). The Rust bounty agent
//! (`crates/client/examples/bounty_agent.rs`) runs in this process, its approval given with
//! `latchkey approvals approve`. Last, the newcomer's run: the README's two set-up commands,
//! taken from README.md's text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use latchkey_server::demo::DemoInfo;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::harness::{hidden_field, workspace_root};

/// Bound on every subprocess and wait, so that a stuck example fails the test.
const DEADLINE: Duration = Duration::from_secs(180);

/// A command with none of the caller's `LATCHKEY_*` settings, run in `dir`, killed if dropped.
fn command(program: impl AsRef<std::ffi::OsStr>, dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LATCHKEY_") {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("RUST_LOG")
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Run to completion (bounded by [`DEADLINE`]).
async fn run(what: &str, cmd: &mut tokio::process::Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: still running after {DEADLINE:?}"))
        .unwrap()
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `latchkey demo …` as its own process, in a fresh directory of its own (its working
/// directory, so `latchkey-data` lands there, as for a person who runs it in their checkout).
struct Demo {
    _child: tokio::process::Child,
    dir: tempfile::TempDir,
    /// Everything it printed up to the end of its walkthrough.
    printed: String,
    log: PathBuf,
    issuer: String,
    info: DemoInfo,
    http: reqwest::Client,
    cookies: Mutex<HashMap<String, String>>,
}

/// The demo process's log and database hold no upstream secret (see `at_rest.rs`,
/// the suite-wide canary scan).
impl Drop for Demo {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            latchkey_testkit::assert_no_canary("the demo's log", self.server_log().as_bytes());
            crate::harness::assert_no_canary_in_db(&self.data_dir().join("latchkey.db"));
        }
    }
}

impl Demo {
    /// On a port of its own: `latchkey demo --listen 127.0.0.1:0 --data-dir <dir>/latchkey-data`.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("latchkey-data");
        let mut args: Vec<std::ffi::OsString> = vec!["demo".into(), "--listen".into()];
        args.extend(["127.0.0.1:0".into(), "--data-dir".into(), data.into()]);
        Self::start_with(dir, &args).await
    }

    /// `latchkey ARGS` in `dir`; returns once it has printed its walkthrough (its last line).
    async fn start_with(dir: tempfile::TempDir, args: &[std::ffi::OsString]) -> Self {
        let log = dir.path().join("demo.stderr");
        let mut child = command(env!("CARGO_BIN_EXE_latchkey"), dir.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed = String::new();
        let walkthrough = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                printed.push_str(&line);
                printed.push('\n');
                if line.starts_with("3. Revoke it") {
                    return true;
                }
            }
            false
        })
        .await;
        if walkthrough != Ok(true) {
            panic!(
                "latchkey {args:?} did not print its walkthrough:\n{printed}--- stderr\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        // Keep reading what it prints, so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let issuer = printed
            .lines()
            .find_map(|l| l.strip_prefix("Latchkey is listening on "))
            .and_then(|rest| rest.split_once("(issuer "))
            .map(|(_, issuer)| issuer.trim_end_matches(')').to_owned())
            .unwrap_or_else(|| panic!("no listening line in:\n{printed}"));
        let data = dir.path().join("latchkey-data");
        let info: DemoInfo =
            serde_json::from_str(&std::fs::read_to_string(data.join("demo.json")).unwrap())
                .unwrap();
        let ca = std::fs::read(data.join("tls").join("ca.pem")).unwrap();
        let http = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Self {
            _child: child,
            dir,
            printed,
            log,
            issuer,
            info,
            http,
            cookies: Mutex::new(HashMap::new()),
        }
    }

    fn cwd(&self) -> &Path {
        self.dir.path()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("latchkey-data")
    }

    fn ca(&self) -> PathBuf {
        self.data_dir().join("tls").join("ca.pem")
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.issuer, path.trim_start_matches('/'))
    }

    /// `host:port`, the `domain` Auth0's SDKs take.
    fn domain(&self) -> String {
        self.issuer
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned()
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An administrative command on the demo's data directory, as the operator runs it; its
    /// standard output.
    async fn cli(&self, args: &[&str]) -> String {
        let out = run(
            &format!("latchkey {args:?}"),
            command(env!("CARGO_BIN_EXE_latchkey"), self.cwd())
                .args(args)
                .arg("--data-dir")
                .arg(self.data_dir())
                .env("LATCHKEY_PUBLIC_URL", &self.issuer),
        )
        .await;
        assert!(out.status.success(), "latchkey {args:?}: {}", show(&out));
        stdout(&out)
    }

    /// The audit trail, oldest first.
    async fn audit(&self) -> Vec<Value> {
        self.cli(&["audit", "export", "--after", "0"])
            .await
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `hello-world`'s issues with their comments, read from the demo provider.
    async fn issues(&self) -> Value {
        let token = self.upstream_token("repo:read").await;
        self.http
            .get(self.url("/demo/api/repos/hello-world/issues"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// An upstream token for the demo user, as the demo agent (`latchkey token`).
    async fn upstream_token(&self, scope: &str) -> String {
        let out = run(
            "latchkey token",
            command(env!("CARGO_BIN_EXE_latchkey"), self.cwd())
                .args(["token", "--issuer", &self.issuer, "--client-id"])
                .args([&self.info.agent_id, "--user", &self.info.user_id])
                .args(["--connection", "demo-git", "--scope", scope])
                .args(["--audit-context", "examples test: read back"])
                .arg("--ca-cert")
                .arg(self.ca())
                .arg("--key")
                .arg(&self.info.agent_key),
        )
        .await;
        assert!(out.status.success(), "{}", show(&out));
        stdout(&out).trim().to_owned()
    }

    // --- a browser: cookies by hand ---------------------------------------------------------

    fn absolute(&self, url: &str) -> String {
        if url.starts_with('/') {
            self.url(url)
        } else {
            url.to_owned()
        }
    }

    async fn finish(&self, resp: reqwest::Response) -> (StatusCode, Option<String>, String) {
        {
            let mut jar = self.cookies.lock().unwrap();
            for v in resp.headers().get_all("set-cookie") {
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
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|l| self.absolute(l.to_str().unwrap()));
        (status, location, resp.text().await.unwrap())
    }

    fn cookie_header(&self) -> String {
        let jar = self.cookies.lock().unwrap();
        let pairs: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join("; ")
    }

    async fn browse(&self, url: &str) -> (StatusCode, Option<String>, String) {
        let resp = self
            .http
            .get(self.absolute(url))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    async fn submit(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, String) {
        let resp = self
            .http
            .post(self.absolute(url))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    /// Latchkey's sign-in form, reached at `login` (a `/login?next=…` URL): posts the demo
    /// user's name and password; where it sends the browser next.
    async fn log_in(&self, login: &str, password: &str) -> String {
        let (status, _, page) = self.browse(login).await;
        assert_eq!(status, 200, "{login}: {page}");
        let next = url::Url::parse(login)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "next")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        let csrf = hidden_field(&page, "csrf");
        let form = [
            ("username", self.info.username.as_str()),
            ("password", password),
            ("csrf", &csrf),
            ("next", &next),
        ];
        let (status, location, body) = self.submit("/login", &form).await;
        assert_eq!(status, 303, "signed in: {body}");
        location.unwrap()
    }

    /// What the walkthrough's step 1 has a person do in a browser: open `connect_url`, sign in
    /// as the demo user, approve on the demo provider's consent page, land on the dashboard.
    async fn connect_demo_account_at(&self, connect_url: &str, password: &str) {
        let (status, mut location, _) = self.browse(connect_url).await;
        assert_eq!(status, 303, "{connect_url} redirects");
        // Unless this browser is signed in already (to an app, say), sign in first.
        if location.as_deref().is_some_and(|l| l.contains("/login?")) {
            let back = self.log_in(&location.unwrap(), password).await;
            let (status, to, _) = self.browse(&back).await;
            assert_eq!(status, 303, "connect redirects to the provider");
            location = to;
        }
        let authorize = location;
        assert!(
            authorize
                .as_deref()
                .is_some_and(|a| a.starts_with(&self.url("/demo/oauth/authorize?"))),
            "{authorize:?}"
        );
        let (status, _, page) = self.browse(&authorize.unwrap()).await;
        assert_eq!(status, 200, "the provider's consent page");
        let consent = hidden_field(&page, "consent");
        let form = [("consent", consent.as_str()), ("decision", "approve")];
        let (status, callback, _) = self.submit("/demo/oauth/authorize", &form).await;
        assert_eq!(status, 302, "consent redirects back");
        let (status, location, body) = self.browse(&callback.unwrap()).await;
        assert_eq!(status, 303, "the callback completes: {body}");
        assert!(
            location
                .unwrap()
                .ends_with("/ui/accounts?connected=demo-git"),
            "connected"
        );
    }

    async fn connect_demo_account(&self) {
        let password = self.info.password.clone();
        self.connect_demo_account_at(&self.url("/connect/demo-git"), &password)
            .await;
    }

    /// A person signing in to an app at `authorize` (Latchkey's `/authorize`): the sign-in
    /// form, then the redirect back to the app; the app's redirect URI with the code.
    async fn sign_in_to_app(&self, authorize: &str) -> String {
        let (status, login, body) = self.browse(authorize).await;
        assert_eq!(status, 303, "{authorize} asks to sign in: {body}");
        let password = self.info.password.clone();
        let back = self.log_in(&login.unwrap(), &password).await;
        let (status, callback, body) = self.browse(&back).await;
        assert_eq!(status, 302, "back to the app: {body}");
        callback.unwrap()
    }
}

fn releases_by<'a>(audit: &'a [Value], actor: &str) -> Vec<&'a Value> {
    audit
        .iter()
        .filter(|e| e["action"] == "token.release" && e["actor"]["id"] == actor)
        .collect()
}

// --- examples/shell -----------------------------------------------------------------------------

/// `examples/shell/comment-on-issue.sh`: refuses (non-zero, naming the connect URL) before the
/// account is connected; afterwards comments on an issue of `hello-world`, and the comment is
/// there when read back through the demo API; the release it used is on the audit trail,
/// narrowed to the scopes the script asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_example_comments_on_an_issue() {
    let demo = Demo::start().await;
    let script = workspace_root().join("examples/shell/comment-on-issue.sh");
    let run_script = || {
        let mut cmd = command("bash", demo.cwd());
        cmd.arg(&script)
            .env("LATCHKEY", env!("CARGO_BIN_EXE_latchkey"))
            .env("LATCHKEY_ISSUER", &demo.issuer);
        cmd
    };

    let out = run("the shell example", &mut run_script()).await;
    assert!(!out.status.success(), "not connected yet: {}", show(&out));
    assert!(
        stderr(&out).contains(&demo.url("/connect/demo-git")),
        "says where to connect: {}",
        show(&out)
    );

    demo.connect_demo_account().await;
    let out = run("the shell example", &mut run_script()).await;
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    let last = text.lines().last().unwrap_or_default();
    let (issue, rest) = last
        .strip_prefix("ok: hello-world#")
        .and_then(|r| r.split_once(" comment "))
        .unwrap_or_else(|| panic!("no ok line: {}", show(&out)));
    let (comment, body) = rest.split_once(": ").unwrap();
    let (issue, comment): (u64, u64) = (issue.parse().unwrap(), comment.parse().unwrap());

    // Read back independently: the comment is on the issue, at the provider.
    let issues = demo.issues().await;
    let on_issue: Vec<&Value> = issues
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["number"] == issue)
        .flat_map(|i| i["comments"].as_array().unwrap())
        .filter(|c| c["id"] == comment)
        .collect();
    assert_eq!(on_issue.len(), 1, "comment {comment} on #{issue}: {issues}");
    assert_eq!(on_issue[0]["body"], body);
    assert_eq!(on_issue[0]["user"], "octo-demo");

    // The script's release, with its reason and only the scopes it asked for.
    let audit = demo.audit().await;
    let released: Vec<&Value> = releases_by(&audit, &demo.info.agent_id)
        .into_iter()
        .filter(|e| e["audit_context"] == "examples/shell: comment on an issue")
        .collect();
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(
        released[0]["scopes"],
        serde_json::json!(["issues:write", "repo:read"])
    );
}

// --- examples/python ----------------------------------------------------------------------------

/// The Python that has `examples/python/requirements.txt` installed (`scripts/test` creates
/// `examples/python/.venv`; `LATCHKEY_EXAMPLES_PYTHON` names another).
fn examples_python() -> PathBuf {
    let python = std::env::var_os("LATCHKEY_EXAMPLES_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("examples/python/.venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates examples/python/.venv from \
         examples/python/requirements.txt)",
        python.display()
    );
    python
}

/// A loopback port for the sign-in helper's redirect URI, which must be registered (exactly)
/// before the helper listens on it; [`python_example_uses_the_token_vault`] retries when the
/// port was taken in between.
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `examples/python`: the app registered and granted with the CLI as its README says, the
/// user's Latchkey refresh token from `sign_in.py` (its URL opened by the test's browser), then
/// `agent.py` — a LangChain tool wrapped by `auth0-ai-langchain`'s `with_token_vault`, pointed
/// at Latchkey. Before the account is connected it exits 2 with the connect URL (the SDK's
/// Token Vault interrupt); afterwards 0 with the demo account's profile and repositories, and
/// the app's release is on the audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_uses_the_token_vault() {
    let python = examples_python();
    let demo = Demo::start().await;
    let dir = workspace_root().join("examples/python");

    let mut attempt = 0;
    let (app, secret, refresh_token) = loop {
        attempt += 1;
        let redirect = format!("http://127.0.0.1:{}/callback", unused_port());
        // Another attempt registers another app.
        let name = match attempt {
            1 => "langchain-agent".to_owned(),
            n => format!("langchain-agent-{n}"),
        };
        let app: Value = serde_json::from_str(
            &demo
                .cli(&["app", "add", &name, "--redirect-uri", &redirect, "--json"])
                .await,
        )
        .unwrap();
        let id = app["client_id"].as_str().unwrap().to_owned();
        let secret = app["client_secret"].as_str().unwrap().to_owned();
        let scopes = [
            "--connection",
            "demo-git",
            "--scopes",
            "read:user repo:read",
        ];
        demo.cli(&[&["agent", "grant", &id][..], &scopes].concat())
            .await;
        let mut sign_in = command(&python, demo.cwd());
        sign_in
            .arg(dir.join("sign_in.py"))
            .args([
                "--no-browser",
                "--timeout",
                "120",
                "--redirect-uri",
                &redirect,
            ])
            .env("AUTH0_DOMAIN", demo.domain())
            .env("AUTH0_CLIENT_ID", &id)
            .env("AUTH0_CLIENT_SECRET", &secret)
            .env("REQUESTS_CA_BUNDLE", demo.ca())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = sign_in.spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = tokio::time::timeout(DEADLINE, err.next_line())
            .await
            .expect("sign_in.py says something")
            .unwrap()
            .unwrap_or_default();
        let Some(authorize) = first.strip_prefix("Sign in as the demo user here: ") else {
            assert!(
                first.contains("cannot listen") && attempt < 5,
                "sign_in.py: {first}"
            );
            continue;
        };
        assert!(
            authorize.starts_with(&demo.url("/authorize?")),
            "{authorize}"
        );
        let callback = demo.sign_in_to_app(authorize).await;
        assert!(callback.starts_with(&format!("{redirect}?")), "{callback}");
        // The browser comes back to the helper with the code.
        let page = demo.http.get(&callback).send().await.unwrap();
        assert_eq!(page.status(), 200);
        let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
            .await
            .expect("sign_in.py finishes")
            .unwrap();
        let mut rest = String::new();
        while let Ok(Some(line)) = err.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        assert!(out.status.success(), "sign_in.py: {}{rest}", show(&out));
        break (id, secret, stdout(&out).trim().to_owned());
    };
    assert!(!refresh_token.is_empty());

    let agent = || {
        let mut cmd = command(&python, demo.cwd());
        cmd.arg(dir.join("agent.py"))
            .env("AUTH0_DOMAIN", demo.domain())
            .env("AUTH0_CLIENT_ID", &app)
            .env("AUTH0_CLIENT_SECRET", &secret)
            .env("REQUESTS_CA_BUNDLE", demo.ca())
            .env("LATCHKEY_REFRESH_TOKEN", &refresh_token);
        cmd
    };
    let out = run("agent.py", &mut agent()).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "not connected yet: {}",
        show(&out)
    );
    assert!(
        stderr(&out).contains(&demo.url("/connect/demo-git")),
        "says where to connect: {}",
        show(&out)
    );

    demo.connect_demo_account().await;
    let out = run("agent.py", &mut agent()).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        show(&out),
        demo.server_log()
    );
    let answer: Value = serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(answer["login"], "octo-demo", "{answer}");
    assert_eq!(
        answer["repositories"],
        serde_json::json!(["hello-world", "latchkey-notes"])
    );
    let audit = demo.audit().await;
    let released = releases_by(&audit, &app);
    assert_eq!(released.len(), 1, "one exchange by the app: {released:?}");
    assert_eq!(released[0]["subject_user"], demo.info.user_id.as_str());
}

// --- examples/mcp -------------------------------------------------------------------------------

/// The Python that has the MCP SDK (`interop/.venv`, from interop/python/requirements.txt).
fn interop_python() -> PathBuf {
    let python = std::env::var_os("LATCHKEY_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("interop/.venv/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates interop/.venv)",
        python.display()
    );
    python
}

/// `examples/mcp/check.py` loads `examples/mcp/mcp.json` (the very file a person copies into
/// their MCP client), starts each server entry it names — `latchkey mcp` over stdio, `/mcp` over
/// Streamable HTTP — and checks the tools. Before the account is connected it fails naming the
/// connect URL for both entries; afterwards both pass, and the two `GET /user` calls are on
/// the audit trail as proxied calls answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_example_config_works_over_stdio_and_http() {
    let python = interop_python();
    let demo = Demo::start().await;
    let check = workspace_root().join("examples/mcp/check.py");
    let run_check = |extra: &[&str]| {
        let mut cmd = command(&python, demo.cwd());
        cmd.arg(&check)
            .args(["--issuer", &demo.issuer])
            .args(extra)
            .env("LATCHKEY", env!("CARGO_BIN_EXE_latchkey"));
        cmd
    };

    // The filled-in config names the binary and the demo's files, and nothing is left to fill
    // but the agent token (fetched when checking).
    let out = run("check.py --print", &mut run_check(&["--print"])).await;
    assert!(out.status.success(), "{}", show(&out));
    let config: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let stdio = &config["mcpServers"]["latchkey"];
    assert_eq!(stdio["command"], env!("CARGO_BIN_EXE_latchkey"));
    let args: Vec<&str> = stdio["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let key = demo
        .data_dir()
        .join("demo-agent.key")
        .canonicalize()
        .unwrap();
    for (flag, value) in [
        ("--issuer", demo.issuer.clone()),
        ("--client-id", demo.info.agent_id.clone()),
        ("--key", key.display().to_string()),
        ("--user", demo.info.username.clone()),
    ] {
        let at = args.iter().position(|a| *a == flag).unwrap();
        assert_eq!(args[at + 1], value, "{flag}");
    }
    assert_eq!(
        config["mcpServers"]["latchkey-http"]["url"],
        demo.url("/mcp")
    );
    let text = stdout(&out).replace("<agent-token>", "");
    assert!(!text.contains('<'), "a placeholder left: {text}");

    let out = run("check.py", &mut run_check(&[])).await;
    assert!(!out.status.success(), "not connected yet: {}", show(&out));
    let connect = format!("not connected: open {}", demo.url("/connect/demo-git"));
    for entry in ["latchkey", "latchkey-http"] {
        assert!(
            stderr(&out).contains(&format!("error: {entry}: the demo account is {connect}")),
            "{entry}: {}",
            show(&out)
        );
    }

    demo.connect_demo_account().await;
    let before = demo.audit().await.len();
    let out = run("check.py", &mut run_check(&[])).await;
    assert!(
        out.status.success(),
        "{}\n{}",
        show(&out),
        demo.server_log()
    );
    let text = stdout(&out);
    for line in [
        "ok: latchkey (stdio): 5 tools; demo-git healthy; GET /user -> octo-demo",
        "ok: latchkey-http (http): 5 tools; demo-git healthy; GET /user -> octo-demo",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}: {}", show(&out));
    }
    let audit = demo.audit().await;
    let proxied: Vec<&Value> = audit[before..]
        .iter()
        .filter(|e| {
            e["action"] == "proxy.response"
                && e["actor"]["id"] == demo.info.agent_id.as_str()
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("GET /user → 200"))
        })
        .collect();
    assert_eq!(proxied.len(), 2, "one GET /user per entry: {proxied:?}");
}

// --- crates/client/examples/bounty_agent.rs ----------------------------------------------------

// The Rust bounty agent's `run`, with the options its `main` parses from the command line that
// examples/README.md gives (`main` only parses them and sets the exit status from the result).
#[allow(dead_code)]
#[path = "../../../client/examples/bounty_agent.rs"]
mod bounty_agent;

/// `crates/client/examples/bounty_agent.rs` against a fresh demo, set up as examples/README.md
/// says. Before the account is connected it stops naming the connect URL (exit 2). With the
/// demo's grant (no `repo:write`) it says "working on this" on the bounty issues and reports
/// the claim as not allowed (exit 1). With the README's grant the claim of the high-value
/// bounty waits — pending in `latchkey approvals list`, no claim on the provider — until the
/// operator's `latchkey approvals approve`, then lands; read back independently, each comment
/// is where the agent says, and the claim's release is on the audit trail after the approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_bounty_agent_claims_once_the_operator_approves() {
    use bounty_agent::{Claim, WORKING_ON_IT, claim_body, exit_code, parse_args};
    let demo = Demo::start().await;
    let data_dir = demo.data_dir().display().to_string();
    let args = ["--domain", &demo.domain(), "--data-dir", &data_dir];
    let opts = parse_args(args.iter().map(|a| a.to_string()))
        .unwrap()
        .unwrap();
    assert_eq!((opts.repo.as_str(), opts.threshold), ("hello-world", 100));

    let result = bounty_agent::run(&opts).await;
    assert_eq!(exit_code(&result), 2, "not connected yet: {result:?}");
    let said = result.unwrap_err().to_string();
    assert!(said.contains(&demo.url("/connect/demo-git")), "{said}");

    demo.connect_demo_account().await;
    let token = demo.upstream_token("issues:write").await;
    for (title, body) in [
        ("Docs: a typo in the quick start", "bounty: $40"),
        (
            "Crash when the config is empty (bounty: $300)",
            "see the log",
        ),
        ("How do I rotate keys?", "just asking"),
    ] {
        let resp = demo
            .http
            .post(demo.url("/demo/api/repos/hello-world/issues"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"title": title, "body": body}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let comments = || async {
        let issues = demo.issues().await;
        let issues = issues.as_array().unwrap().iter();
        let bodies = |i: &Value| -> Vec<(u64, String)> {
            let cs = i["comments"].as_array().unwrap().iter();
            cs.map(|c| {
                (
                    c["id"].as_u64().unwrap(),
                    c["body"].as_str().unwrap().into(),
                )
            })
            .collect()
        };
        issues
            .map(|i| (i["number"].as_u64().unwrap(), bodies(i)))
            .collect::<Vec<_>>()
    };

    // The demo's grant has no repo:write: the work is done, the claim is not allowed.
    let report = bounty_agent::run(&opts).await.unwrap();
    assert_eq!(report.bounties.len(), 2, "{report:?}");
    assert_eq!(report.bounties[0].claim, Claim::NotNeeded);
    assert!(
        matches!(&report.bounties[1].claim, Claim::NotAllowed { description }
            if description.contains("repo:write")),
        "{report:?}"
    );
    assert_eq!(exit_code(&Ok(report)), 1);
    let working = comments().await;
    let working_ids: Vec<u64> = [0, 1].map(|i| working[i].1[0].0).to_vec();
    assert_eq!(
        working
            .iter()
            .map(|(n, cs)| (*n, cs.iter().map(|c| c.1.as_str()).collect::<Vec<_>>()))
            .collect::<Vec<_>>(),
        vec![
            (1, vec![WORKING_ON_IT]),
            (2, vec![WORKING_ON_IT]),
            (3, vec![])
        ]
    );

    // The README's grant, then the operator's approval while the agent waits.
    let scopes = "read:user repo:read issues:write repo:write";
    let grant = [
        "agent",
        "grant",
        &demo.info.agent_id,
        "--connection",
        "demo-git",
    ];
    demo.cli(&[&grant[..], &["--scopes", scopes]].concat())
        .await;
    let agent = tokio::spawn({
        let opts = opts.clone();
        async move { bounty_agent::run(&opts).await }
    });
    let waited_since = tokio::time::Instant::now();
    let approval = loop {
        let list: Value =
            serde_json::from_str(&demo.cli(&["approvals", "list", "--json"]).await).unwrap();
        if let Some(a) = list.as_array().unwrap().first() {
            break a.clone();
        }
        assert!(
            waited_since.elapsed() < DEADLINE,
            "the agent asks for approval"
        );
        assert!(!agent.is_finished(), "{:?}", agent.await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        approval["scopes"],
        serde_json::json!(["issues:write", "repo:write"])
    );
    assert_eq!(approval["risk"], "high");
    assert_eq!(approval["audit_context"], bounty_agent::AUDIT_CONTEXT);
    assert_eq!(comments().await, working, "no claim before the approval");
    assert!(!agent.is_finished(), "waiting for the decision");
    let id = approval["id"].as_str().unwrap();
    let out = demo.cli(&["approvals", "approve", id]).await;
    assert!(out.starts_with(&format!("approved {id}")), "{out}");

    let report = tokio::time::timeout(DEADLINE, agent)
        .await
        .expect("the agent finishes once approved")
        .unwrap()
        .unwrap();
    let after = comments().await;
    let claim = after[1].1.get(1).cloned().expect("a claim on #2");
    assert_eq!(claim.1, claim_body(300));
    assert_eq!(after[0], working[0], "no claim on the $40 bounty");
    assert_eq!(after[2], working[2]);
    let outcome: Vec<(u64, u64, u64, Claim)> = report
        .bounties
        .iter()
        .map(|b| (b.issue, b.amount, b.working_comment, b.claim.clone()))
        .collect();
    assert_eq!(
        outcome,
        vec![
            (1, 40, working_ids[0], Claim::NotNeeded),
            (
                2,
                300,
                working_ids[1],
                Claim::Claimed {
                    comment: claim.0,
                    approval: Some(id.to_owned())
                }
            ),
        ]
    );
    assert_eq!(exit_code(&Ok(report)), 0);

    // The trail: the operator's approval, then the one release with repo:write, for the agent.
    let audit = demo.audit().await;
    let approved = audit
        .iter()
        .position(|e| e["action"] == "approval.approve")
        .expect("the approval is on the trail");
    let claims: Vec<usize> = audit
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e["action"] == "token.release"
                && e["actor"]["id"] == demo.info.agent_id.as_str()
                && e["audit_context"] == bounty_agent::AUDIT_CONTEXT
                && e["scopes"] == serde_json::json!(["issues:write", "repo:write"])
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert!(claims[0] > approved);
}

// --- the newcomer's run -------------------------------------------------------------------------

/// The commands of the fenced block under "## Set-up: two commands" in README.md, comments
/// and blank lines dropped.
fn readme_set_up_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split_once("\n## Set-up: two commands\n")
        .expect("README.md has a section \"## Set-up: two commands\"")
        .1;
    let section = section.split("\n## ").next().unwrap();
    let (_, block) = section
        .split_once("\n```sh\n")
        .expect("the set-up section has a ```sh block");
    let (block, _) = block.split_once("\n```").expect("the block ends");
    block
        .lines()
        .map(|l| l.split_once(" #").map_or(l, |(cmd, _)| cmd).trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// SIGTERM (what systemd and container runtimes send) stops `latchkey demo` / `serve`
/// gracefully: no new connections, the request in flight is answered, then exit status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_the_request_in_flight_then_exits_cleanly() {
    let mut demo = Demo::start().await;
    // A token request whose body arrives in two parts, with the signal in between.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let request = demo
        .http
        .post(demo.url("/oauth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let in_flight = tokio::spawn(request);
    tx.send(b"grant_type=client_credentials&client_id=agt_nobody".to_vec())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pid = demo._child.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        demo._child.try_wait().unwrap().is_none(),
        "it waits for the request in flight:\n{}",
        demo.server_log()
    );
    let fresh = reqwest::Client::builder()
        .tls_certs_only([
            reqwest::Certificate::from_pem(&std::fs::read(demo.ca()).unwrap()).unwrap(),
        ])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(
        fresh.get(demo.url("/healthz")).send().await.is_err(),
        "no new connection is accepted once it is stopping"
    );

    tx.send(b"&client_secret=not-the-secret".to_vec()).unwrap();
    drop(tx);
    let answer = in_flight
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    let json: Value = answer.json().await.unwrap();
    assert_eq!(json["error"], "invalid_client", "{json}");

    let status = tokio::time::timeout(Duration::from_secs(15), demo._child.wait())
        .await
        .expect("it exits after the request in flight")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", demo.server_log());
    assert!(
        demo.server_log().contains("shutting down"),
        "{}",
        demo.server_log()
    );
}

/// A newcomer's run: README.md's two set-up commands, read from its text, work as written.
///
/// The block must hold exactly two commands.
///
/// The first, `cargo run --release -p latchkey-cli -- demo`, is run as written but for one
/// step: instead of letting `cargo run --release` build this package's binary in release mode
/// inside the test (minutes on two cores, a second copy of the whole workspace's build in
/// `target/release`, and a build fighting the test run for the target directory's lock), the
/// test checks the command's text — exactly `cargo run --release -p latchkey-cli -- ARGS` — and
/// runs the binary that cargo builds for it, `CARGO_BIN_EXE_latchkey` of this very package
/// (latchkey-cli has one binary, the one `cargo run -p latchkey-cli` runs), with `ARGS`
/// unchanged: no `--listen`, no `--data-dir`. So it listens on the default 127.0.0.1:8750 and
/// writes `./latchkey-data` into its working directory, a fresh temporary directory standing
/// for a fresh clone. When port 8750 is taken (a `latchkey demo` already running on this
/// machine), the test fails saying so rather than testing something else. It then follows what
/// the demo printed: `/readyz` answers, the files it names exist, the account connects with the
/// URL and password it printed, and its step 2, the printed `TOKEN=$(latchkey token …)` and
/// `curl …` lines, run in `bash` as a person pastes them, reach the demo API.
///
/// The second is the test command itself, `bash scripts/test`; running it here would run this
/// test again, recursively. The test checks instead that it is the command `.ci/run` ends with
/// (CI runs the README's command, after installing what a brand-new machine lacks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_set_up_commands_work_as_written() {
    let commands = readme_set_up_commands();
    assert_eq!(
        commands.len(),
        2,
        "exactly two set-up commands: {commands:?}"
    );

    // Command 1.
    let words: Vec<&str> = commands[0].split_whitespace().collect();
    let prefix = [
        "cargo",
        "run",
        "--release",
        "-p",
        env!("CARGO_PKG_NAME"),
        "--",
    ];
    assert_eq!(
        words[..prefix.len().min(words.len())],
        prefix,
        "the first command runs this package's binary: {}",
        commands[0]
    );
    let args: Vec<std::ffi::OsString> = words[prefix.len()..].iter().map(Into::into).collect();
    assert_eq!(args, ["demo"], "{}", commands[0]);
    if let Err(e) = std::net::TcpListener::bind("127.0.0.1:8750") {
        panic!(
            "port 8750 is in use ({e}): the README's `{}` listens there. Stop whatever holds it \
             (a `latchkey demo` left running?) and run the tests again.",
            commands[0]
        );
    }
    let demo = Demo::start_with(tempfile::tempdir().unwrap(), &args).await;
    assert!(
        demo.printed
            .lines()
            .any(|l| l.starts_with("Latchkey is listening on 127.0.0.1:8750 ")),
        "{}",
        demo.printed
    );
    assert_eq!(demo.issuer, "https://127.0.0.1:8750/");
    for file in ["tls/ca.pem", "demo.json", "demo-agent.key"] {
        assert!(demo.data_dir().join(file).is_file(), "latchkey-data/{file}");
    }
    let ready = demo.http.get(demo.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "/readyz");

    // Its walkthrough, as printed: step 1 in a browser, step 2 pasted into a shell.
    let printed = &demo.printed;
    let connect_url = printed
        .lines()
        .find_map(|l| l.strip_prefix("1. Connect the demo account: open "))
        .unwrap_or_else(|| panic!("no step 1 in:\n{printed}"))
        .trim();
    let password = printed
        .split_once("with password `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(p, _)| p)
        .unwrap_or_else(|| panic!("no password in:\n{printed}"));
    assert_eq!(connect_url, demo.url("/connect/demo-git"));
    demo.connect_demo_account_at(connect_url, password).await;
    let step2: Vec<&str> = printed
        .lines()
        .skip_while(|l| !l.starts_with("2. "))
        .skip(1)
        .take_while(|l| !l.starts_with("3. "))
        .map(str::trim)
        .collect();
    assert!(
        step2.len() == 2 && step2[0].starts_with("TOKEN=$(") && step2[1].starts_with("curl "),
        "step 2 is the token command and curl: {step2:?}"
    );
    let out = run(
        "the walkthrough's step 2",
        command("bash", demo.cwd()).args(["-euo", "pipefail", "-c", &step2.join("\n")]),
    )
    .await;
    assert!(out.status.success(), "{}", show(&out));
    let user: Value =
        serde_json::from_str(&stdout(&out)).unwrap_or_else(|_| panic!("{}", show(&out)));
    assert_eq!(user["login"], "octo-demo", "{user}");

    // Command 2: what CI runs.
    let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).unwrap();
    let last = ci
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap();
    assert_eq!(
        last, commands[1],
        ".ci/run ends with the README's test command"
    );
    assert_eq!(commands[1], "bash scripts/test");
    assert!(workspace_root().join("scripts/test").is_file());
}
