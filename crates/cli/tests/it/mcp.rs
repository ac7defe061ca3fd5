//! The MCP server with the official MCP Python SDK (`mcp` from PyPI) as the client, over
//! Streamable HTTP (`/mcp`) and stdio (`latchkey mcp`, a bridge holding only the agent's key):
//! the tools are listed, `call_api` reaches the demo API, a missing connection answers the
//! connect URL, a high-risk call waits for the user's approval and then succeeds, and the
//! whole transcript never contains an upstream token.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use latchkey_core::vault::{Actor, ApprovalDecision, Decider};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::harness::*;

const STEP_TIMEOUT: Duration = Duration::from_secs(60);

fn python() -> PathBuf {
    std::env::var_os("LATCHKEY_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("interop/.venv/bin/python"))
}

/// `interop/python/mcp_driver.py`: one JSON object per line each way; killed when dropped.
struct Driver {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr_file: PathBuf,
    /// Every line the client printed: what an agent built on it would have seen.
    transcript: String,
}

impl Driver {
    async fn start(ts: &TestServer, mode: &str, args: &[String]) -> Self {
        let stderr_file = ts.dir.path().join(format!("mcp-{mode}.stderr"));
        let mut child = Command::new(python())
            .arg(workspace_root().join("interop/python/mcp_driver.py"))
            .arg(mode)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
            _child: child,
            stderr_file,
            transcript: String::new(),
        }
    }

    async fn next(&mut self, step: &str) -> Value {
        let line = tokio::time::timeout(STEP_TIMEOUT, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("no {step:?} from the driver: {}", self.stderr()))
            .unwrap()
            .unwrap_or_else(|| panic!("the driver ended before {step:?}: {}", self.stderr()));
        self.transcript.push_str(&line);
        self.transcript.push('\n');
        let msg: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("not JSON: {line}\n{}", self.stderr()));
        assert_eq!(msg["step"], step, "{msg}\n{}", self.stderr());
        msg
    }

    async fn call(&mut self, tool: &str, args: Value) -> Value {
        self.call_expecting(tool, args, "result").await
    }

    /// A tool call answered with `step` ("result", or "elicitation" for a -32042 error).
    async fn call_expecting(&mut self, tool: &str, args: Value, step: &str) -> Value {
        let line = json!({"tool": tool, "args": args}).to_string();
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        self.next(step).await
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }
}

/// Over HTTP the client declares URL-mode elicitation: a missing connection comes as a
/// "URL elicitation required" error naming the connect URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_python_sdk_over_streamable_http() {
    let ts = TestServer::start().await;
    let token = ts.agent_token().await;
    let args = vec![
        "--elicitation".into(),
        ts.url("/mcp"),
        "--header".into(),
        format!("Authorization: Bearer {token}"),
        "--header".into(),
        format!("Latchkey-User: {}", ts.info.username),
        "--cafile".into(),
        ts.ca_path.display().to_string(),
    ];
    let driver = Driver::start(&ts, "http", &args).await;
    scenario(&ts, driver, true).await;
}

/// Over stdio the client declares no elicitation: a missing connection is an error result
/// with the connect URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_python_sdk_over_stdio() {
    let ts = TestServer::start().await;
    let driver = Driver::start(&ts, "stdio", &stdio_args(&ts, false)).await;
    scenario(&ts, driver, false).await;
}

/// The URL elicitation also crosses the stdio bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_url_elicitation_over_stdio() {
    let ts = TestServer::start().await;
    let mut d = Driver::start(&ts, "stdio", &stdio_args(&ts, true)).await;
    d.next("tools").await;
    let asked = d
        .call_expecting(
            "request_connection",
            json!({"connection": "demo-git"}),
            "elicitation",
        )
        .await;
    assert_eq!(asked["elicitations"][0]["mode"], "url", "{asked}");
    assert_eq!(
        asked["elicitations"][0]["url"],
        ts.url("/connect/demo-git").as_str()
    );
    ts.connect_demo_account().await;
    let ok = d
        .call("request_connection", json!({"connection": "demo-git"}))
        .await;
    assert_eq!(ok["structured"]["connected"], true, "{ok}");
}

fn stdio_args(ts: &TestServer, elicitation: bool) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    if elicitation {
        args.push("--elicitation".into());
    }
    args.extend([
        "--".into(),
        env!("CARGO_BIN_EXE_latchkey").into(),
        "mcp".into(),
        "--issuer".into(),
        ts.issuer.clone(),
        "--ca-cert".into(),
        ts.ca_path.display().to_string(),
        "--client-id".into(),
        ts.info.agent_id.clone(),
        "--key".into(),
        ts.info.agent_key.display().to_string(),
        "--user".into(),
        ts.info.username.clone(),
    ]);
    args
}

/// `elicitation`: whether the client declared URL-mode elicitation.
async fn scenario(ts: &TestServer, mut d: Driver, elicitation: bool) {
    let tools = d.next("tools").await;
    let mut names: Vec<&str> = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "call_api",
            "get_access_token",
            "list_connections",
            "request_approval",
            "request_connection"
        ]
    );

    // Nothing connected yet: the connect URL, from every tool that needs the account.
    let listed = d.call("list_connections", json!({})).await;
    assert_eq!(listed["is_error"], false, "{listed}");
    let conns = &listed["structured"]["connections"];
    assert_eq!(conns[0]["connection"], "demo-git", "{listed}");
    assert_eq!(conns[0]["accounts"], json!([]));
    let connect_url = ts.url("/connect/demo-git");
    for (tool, args) in [
        (
            "call_api",
            json!({"connection": "demo-git", "path": "/user"}),
        ),
        ("request_connection", json!({"connection": "demo-git"})),
    ] {
        if elicitation {
            let asked = d.call_expecting(tool, args, "elicitation").await;
            let e = &asked["elicitations"][0];
            assert_eq!(
                (e["mode"].as_str(), e["url"].as_str()),
                (Some("url"), Some(connect_url.as_str())),
                "{asked}"
            );
            assert!(asked["message"].as_str().unwrap().contains(&connect_url));
        } else {
            let missing = d.call(tool, args).await;
            assert_eq!(missing["is_error"], true, "{missing}");
            assert_eq!(missing["structured"]["error"], "not_connected");
            assert_eq!(missing["structured"]["connect_url"], connect_url.as_str());
            assert!(missing["text"].as_str().unwrap().contains(&connect_url));
        }
    }

    ts.connect_demo_account().await;
    let listed = d.call("list_connections", json!({})).await;
    let account = &listed["structured"]["connections"][0]["accounts"][0];
    assert_eq!(account["health"], "healthy", "{listed}");

    // The demo API's answer, through Latchkey.
    let user = d
        .call(
            "call_api",
            json!({"connection": "demo-git", "path": "/user"}),
        )
        .await;
    assert_eq!(user["is_error"], false, "{user}");
    assert_eq!(user["structured"]["status"], 200);
    assert_eq!(user["structured"]["json"]["login"], "octo-demo", "{user}");
    let repos = d
        .call(
            "call_api",
            json!({"connection": "demo-git", "method": "GET", "path": "repos", "scopes": "repo:read"}),
        )
        .await;
    assert_eq!(repos["structured"]["status"], 200, "{repos}");

    // A high-risk call waits for the user, then goes through.
    ts.grant(
        "read:user repo:read issues:write",
        &["--risk", "issues:write=high"],
    );
    let issue = json!({
        "connection": "demo-git", "method": "POST", "path": "/repos/hello-world/issues",
        "json": {"title": "filed over MCP"}, "scopes": "issues:write",
    });
    let pending = d.call("call_api", issue.clone()).await;
    assert_eq!(pending["is_error"], true, "{pending}");
    assert_eq!(pending["structured"]["error"], "approval_pending");
    let uri = pending["structured"]["approval_uri"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(uri.starts_with(&ts.url("/ui/approvals/")), "{uri}");
    let status = d
        .call(
            "request_approval",
            json!({"connection": "demo-git", "scopes": "issues:write", "method": "POST", "path": "/repos/hello-world/issues"}),
        )
        .await;
    assert_eq!(status["structured"]["status"], "pending", "{status}");
    assert_eq!(status["structured"]["approval_uri"], uri.as_str());
    let id = uri.rsplit('/').next().unwrap();
    ts.vault
        .decide_approval(
            id,
            ApprovalDecision::Approve,
            None,
            Decider::Operator(&Actor::cli()),
        )
        .await
        .unwrap();
    let status = d
        .call(
            "request_approval",
            json!({"connection": "demo-git", "scopes": "issues:write", "method": "POST", "path": "/repos/hello-world/issues"}),
        )
        .await;
    assert_eq!(status["structured"]["status"], "approved", "{status}");
    let created = d.call("call_api", issue).await;
    assert_eq!(created["is_error"], false, "{created}");
    assert_eq!(created["structured"]["status"], 201);
    assert_eq!(created["structured"]["json"]["title"], "filed over MCP");

    // Raw tokens only where the grant allows them (off by default).
    let refused = d
        .call("get_access_token", json!({"connection": "demo-git"}))
        .await;
    assert_eq!(refused["is_error"], true, "{refused}");
    assert_eq!(refused["structured"]["error"], "access_denied");

    // The transcript holds none of the upstream tokens used (fetched here by exchanges, under
    // a grant that needs no approval: the same cached tokens).
    ts.grant("read:user repo:read issues:write", &[]);
    let mut upstream = Vec::new();
    for scope in [None, Some("issues:write"), Some("repo:read")] {
        let mut params = ts.exchange_params();
        if let Some(s) = scope {
            params.push(("scope".into(), s.into()));
        }
        let answer = ts.post_form(&params).await;
        upstream.push(answer.token().to_owned());
    }
    for t in &upstream {
        assert!(
            !d.transcript.contains(t.as_str()),
            "an upstream token reached the agent"
        );
    }
    assert!(!d.transcript.contains("Bearer "), "{}", d.transcript);
    let audit = ts.vault.store().list_audit(1000).await.unwrap();
    assert!(
        audit
            .iter()
            .filter(|e| e.record.action == "proxy.request")
            .count()
            >= 3
    );
}

/// `/mcp` is a protected resource (RFC 9728): no bearer, no MCP; the metadata names Latchkey
/// as its authorization server; a foreign Origin is refused even with a good token.
#[tokio::test]
async fn mcp_endpoint_is_a_protected_resource() {
    let ts = TestServer::start().await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}});
    let resp = ts
        .http
        .post(ts.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let metadata_url = ts.url("/.well-known/oauth-protected-resource/mcp");
    assert!(challenge.contains(&metadata_url), "{challenge}");
    let metadata: Value = ts
        .http
        .get(&metadata_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["resource"], ts.url("/mcp").as_str());
    assert_eq!(metadata["authorization_servers"], json!([ts.issuer]));

    let token = ts.agent_token().await;
    let post = |origin: Option<&str>| {
        let mut r = ts
            .http
            .post(ts.url("/mcp"))
            .bearer_auth(&token)
            .header("latchkey-user", &ts.info.username)
            .header("accept", "application/json, text/event-stream")
            .json(&init);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let ok = post(None).await.unwrap();
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["result"]["serverInfo"]["name"], "latchkey", "{body}");
    assert_eq!(
        post(Some("https://evil.example")).await.unwrap().status(),
        403
    );
}
