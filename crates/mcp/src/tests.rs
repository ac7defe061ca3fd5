//! The MCP server over real HTTP (axum on 127.0.0.1:0, plain reqwest JSON-RPC POSTs) and over
//! an in-memory stdio pipe, against a fake backend that records what reached it.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::{
    Backend, CallApiArgs, ConnectionArgs, HttpConfig, RequestApprovalArgs, ToolFailure, ToolResult,
    http_service, serve_io, tools_json,
};

#[derive(Debug, Clone, PartialEq)]
struct Agent(String);

#[derive(Debug, Clone, PartialEq)]
enum Call {
    List,
    Api(CallApiArgs),
    Connect(ConnectionArgs),
    Approve(RequestApprovalArgs),
    Token(ConnectionArgs),
}

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<(String, Call)>>,
}

impl Fake {
    fn record(&self, caller: &Agent, call: Call) {
        self.calls
            .lock()
            .expect("calls lock")
            .push((caller.0.clone(), call));
    }

    fn calls(&self) -> Vec<(String, Call)> {
        self.calls.lock().expect("calls lock").clone()
    }
}

#[async_trait::async_trait]
impl Backend for Fake {
    type Caller = Agent;

    async fn list_connections(&self, caller: &Agent) -> ToolResult {
        self.record(caller, Call::List);
        Ok(json!({"connections": [{"connection": "github", "health": "ok", "scopes": "repo"}]}))
    }

    async fn call_api(&self, caller: &Agent, args: CallApiArgs) -> ToolResult {
        let path = args.path.clone();
        self.record(caller, Call::Api(args));
        if path == "/needs-approval" {
            return Err(ToolFailure::new(
                "The user must approve this call first: show them https://l.example/a/1",
                json!({"error": "approval_required", "approval_url": "https://l.example/a/1"}),
            ));
        }
        Ok(json!({"status": 200, "body": "hello"}))
    }

    async fn request_connection(&self, caller: &Agent, args: ConnectionArgs) -> ToolResult {
        self.record(caller, Call::Connect(args));
        Ok(json!({"connect_url": "https://l.example/connect/github"}))
    }

    async fn request_approval(&self, caller: &Agent, args: RequestApprovalArgs) -> ToolResult {
        self.record(caller, Call::Approve(args));
        Ok(json!({"status": "pending", "approval_url": "https://l.example/a/1"}))
    }

    async fn get_access_token(&self, caller: &Agent, args: ConnectionArgs) -> ToolResult {
        self.record(caller, Call::Token(args));
        Err(ToolFailure::kind(
            "token_export_disabled",
            "Token export is off for this grant; use call_api.",
        ))
    }
}

/// Stands in for the server's auth layer: `X-Test-Agent: NAME` authenticates as NAME.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let agent = request
        .headers()
        .get("x-test-agent")
        .and_then(|v| v.to_str().ok())
        .map(|name| Agent(name.to_owned()));
    if let Some(agent) = agent {
        request.extensions_mut().insert(agent);
    }
    next.run(request).await
}

struct Served {
    base: String,
    fake: Arc<Fake>,
    http: reqwest::Client,
}

async fn serve(cfg: HttpConfig) -> Served {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .nest_service("/mcp", http_service(Arc::clone(&fake), cfg))
        .layer(middleware::from_fn(authenticate));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    Served {
        base: format!("http://{addr}/mcp"),
        fake,
        http: reqwest::Client::new(),
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text))
    }
}

impl Served {
    async fn post_raw(&self, body: String, headers: &[(&str, &str)]) -> Answer {
        let mut request = self
            .http
            .post(&self.base)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("send");
        Answer {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.expect("body"),
        }
    }

    async fn rpc(&self, method: &str, params: Value, headers: &[(&str, &str)]) -> Answer {
        let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
        self.post_raw(body.to_string(), headers).await
    }

    async fn call(&self, tool: &str, arguments: Value, agent: Option<&str>) -> Value {
        let headers: Vec<(&str, &str)> = agent.map(|a| ("x-test-agent", a)).into_iter().collect();
        let answer = self
            .rpc(
                "tools/call",
                json!({"name": tool, "arguments": arguments}),
                &headers,
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        answer.json()
    }
}

fn initialize_params() -> Value {
    json!({
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"}
    })
}

#[tokio::test]
async fn initialize_names_the_server_and_opens_no_session() {
    let s = serve(HttpConfig::default()).await;
    let answer = s.rpc("initialize", initialize_params(), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(
        answer.headers["content-type"]
            .to_str()
            .is_ok_and(|v| v.starts_with("application/json")),
        "plain JSON answer, not SSE"
    );
    assert!(answer.headers.get("mcp-session-id").is_none(), "stateless");
    let result = &answer.json()["result"];
    assert_eq!(result["protocolVersion"], "2025-11-25");
    assert_eq!(result["serverInfo"]["name"], "latchkey");
    assert_eq!(result["serverInfo"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(result["instructions"], crate::INSTRUCTIONS);
    assert!(result["capabilities"]["tools"].is_object());
}

#[tokio::test]
async fn tools_list_is_the_checked_in_list() {
    let s = serve(HttpConfig::default()).await;
    let answer = s.rpc("tools/list", json!({}), &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["result"]["tools"], tools_json()["tools"]);
}

#[tokio::test]
async fn a_successful_call_is_structured_content_and_the_same_json_as_text() {
    let s = serve(HttpConfig::default()).await;
    let answer = s.call("list_connections", json!({}), Some("alice")).await;
    let result = &answer["result"];
    let expected =
        json!({"connections": [{"connection": "github", "health": "ok", "scopes": "repo"}]});
    assert_eq!(result["isError"], false);
    assert_eq!(result["structuredContent"], expected);
    let text = result["content"][0]["text"].as_str().expect("text content");
    assert_eq!(
        serde_json::from_str::<Value>(text).expect("text is JSON"),
        expected
    );
    assert_eq!(s.fake.calls(), [("alice".to_owned(), Call::List)]);
}

#[tokio::test]
async fn each_tool_gets_its_parsed_arguments_and_the_caller() {
    let s = serve(HttpConfig::default()).await;
    let api = json!({
        "connection": "github", "method": "POST", "path": "/repos?x=1",
        "headers": {"Accept": "application/json"}, "json": {"title": "t"}, "scopes": "repo"
    });
    s.call("call_api", api, Some("alice")).await;
    let answer = s
        .call(
            "request_connection",
            json!({"connection": "google"}),
            Some("bob"),
        )
        .await;
    assert_eq!(
        answer["result"]["structuredContent"]["connect_url"],
        "https://l.example/connect/github"
    );
    s.call(
        "request_approval",
        json!({"connection": "github", "method": "DELETE", "path": "/r"}),
        Some("bob"),
    )
    .await;
    s.call(
        "get_access_token",
        json!({"connection": "github", "scopes": "read"}),
        Some("bob"),
    )
    .await;

    let calls = s.fake.calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(
        calls[0],
        (
            "alice".to_owned(),
            Call::Api(CallApiArgs {
                connection: "github".into(),
                method: Some("POST".into()),
                path: "/repos?x=1".into(),
                headers: Some([("Accept".to_owned(), "application/json".to_owned())].into()),
                body: None,
                json: Some(json!({"title": "t"})),
                scopes: Some("repo".into()),
            })
        )
    );
    assert_eq!(
        calls[1],
        (
            "bob".to_owned(),
            Call::Connect(ConnectionArgs {
                connection: "google".into(),
                scopes: None
            })
        )
    );
    assert_eq!(
        calls[2],
        (
            "bob".to_owned(),
            Call::Approve(RequestApprovalArgs {
                connection: "github".into(),
                scopes: None,
                method: Some("DELETE".into()),
                path: Some("/r".into()),
            })
        )
    );
    assert_eq!(
        calls[3],
        (
            "bob".to_owned(),
            Call::Token(ConnectionArgs {
                connection: "github".into(),
                scopes: Some("read".into())
            })
        )
    );
}

#[tokio::test]
async fn a_failure_is_an_error_result_the_model_can_read() {
    let s = serve(HttpConfig::default()).await;
    let answer = s
        .call(
            "call_api",
            json!({"connection": "github", "path": "/needs-approval"}),
            Some("alice"),
        )
        .await;
    assert!(
        answer.get("error").is_none(),
        "a tool error, not a protocol one"
    );
    let result = &answer["result"];
    assert_eq!(result["isError"], true);
    let message = "The user must approve this call first: show them https://l.example/a/1";
    assert_eq!(result["content"][0]["text"], message);
    assert_eq!(
        result["structuredContent"],
        json!({"error": "approval_required", "approval_url": "https://l.example/a/1", "message": message})
    );

    let answer = s
        .call(
            "get_access_token",
            json!({"connection": "github"}),
            Some("alice"),
        )
        .await;
    assert_eq!(
        answer["result"]["structuredContent"]["error"],
        "token_export_disabled"
    );
}

#[tokio::test]
async fn without_a_caller_tools_answer_not_authenticated_and_reach_no_backend() {
    let s = serve(HttpConfig::default()).await;
    for (tool, args) in [
        ("list_connections", json!({})),
        ("call_api", json!({"connection": "github", "path": "/user"})),
        ("request_connection", json!({"connection": "github"})),
        ("request_approval", json!({"connection": "github"})),
        ("get_access_token", json!({"connection": "github"})),
    ] {
        let answer = s.call(tool, args, None).await;
        let result = &answer["result"];
        assert_eq!(result["isError"], true, "{tool}");
        assert_eq!(
            result["structuredContent"]["error"], "not_authenticated",
            "{tool}"
        );
        assert!(
            result["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("Not authenticated")),
            "{tool}"
        );
    }
    assert_eq!(s.fake.calls(), []);
}

#[tokio::test]
async fn malformed_arguments_are_invalid_params_and_reach_no_backend() {
    let s = serve(HttpConfig::default()).await;
    let cases = [
        (
            "call_api",
            json!({"connection": "github"}),
            "missing field `path`",
        ),
        (
            "call_api",
            json!({"connection": "github", "path": "/", "url": "https://evil"}),
            "unknown field `url`",
        ),
        (
            "call_api",
            json!({"connection": "github", "path": "/", "body": "a", "json": {}}),
            "not both",
        ),
        (
            "request_connection",
            json!({"connection": 5}),
            "invalid type",
        ),
        (
            "list_connections",
            json!({"all": true}),
            "unknown field `all`",
        ),
        ("delete_everything", json!({}), "unknown tool"),
    ];
    for (tool, args, needle) in cases {
        let answer = s.call(tool, args, Some("alice")).await;
        let error = &answer["error"];
        assert_eq!(error["code"], -32602, "{tool}: {answer}");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle)),
            "{tool}: {answer}"
        );
    }
    assert_eq!(s.fake.calls(), []);
}

#[tokio::test]
async fn a_request_in_the_2026_protocol_without_initialize_works() {
    let s = serve(HttpConfig::default()).await;
    let params = json!({
        "name": "list_connections",
        "arguments": {},
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "0"}
        }
    });
    let answer = s
        .rpc(
            "tools/call",
            params,
            &[
                ("x-test-agent", "carol"),
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "list_connections"),
            ],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["result"]["isError"], false, "{}", answer.text);
    assert_eq!(s.fake.calls(), [("carol".to_owned(), Call::List)]);
}

#[tokio::test]
async fn a_foreign_host_is_refused() {
    let s = serve(HttpConfig::default()).await;
    let answer = s
        .rpc("tools/list", json!({}), &[("host", "evil.example")])
        .await;
    assert_eq!(answer.status, 403, "{}", answer.text);

    let s = serve(HttpConfig {
        allowed_hosts: vec!["mcp.example.com".into()],
        ..HttpConfig::default()
    })
    .await;
    let answer = s
        .rpc("tools/list", json!({}), &[("host", "mcp.example.com")])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    // Listing a public name replaces loopback rather than adding to it.
    let answer = s.rpc("tools/list", json!({}), &[]).await;
    assert_eq!(answer.status, 403, "{}", answer.text);
}

#[tokio::test]
async fn origins_are_checked_and_an_empty_list_admits_no_browser() {
    let s = serve(HttpConfig::default()).await;
    let answer = s
        .rpc("tools/list", json!({}), &[("origin", "http://127.0.0.1")])
        .await;
    assert_eq!(answer.status, 403, "{}", answer.text);
    let answer = s.rpc("tools/list", json!({}), &[]).await;
    assert_eq!(answer.status, 200, "no Origin: not a browser, passes");

    let s = serve(HttpConfig {
        allowed_origins: vec!["https://app.example.com:443".into()],
        ..HttpConfig::default()
    })
    .await;
    let answer = s
        .rpc(
            "tools/list",
            json!({}),
            &[("origin", "https://app.example.com")],
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let answer = s.call_with_origin("https://evil.example", "alice").await;
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert_eq!(s.fake.calls(), [], "a refused request reaches no backend");
}

impl Served {
    async fn call_with_origin(&self, origin: &str, agent: &str) -> Answer {
        self.rpc(
            "tools/call",
            json!({"name": "list_connections", "arguments": {}}),
            &[("origin", origin), ("x-test-agent", agent)],
        )
        .await
    }
}

#[tokio::test]
async fn an_oversized_body_is_413() {
    let s = serve(HttpConfig {
        max_request_body_bytes: 16 * 1024,
        ..HttpConfig::default()
    })
    .await;
    let big = "x".repeat(32 * 1024);
    let args = json!({"connection": "github", "path": "/", "body": big});
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "call_api", "arguments": args}});
    let answer = s
        .post_raw(body.to_string(), &[("x-test-agent", "alice")])
        .await;
    assert_eq!(answer.status, 413, "{}", answer.text);
    assert_eq!(s.fake.calls(), []);

    // Just under the cap still works.
    let args = json!({"connection": "github", "path": "/", "body": "x".repeat(8 * 1024)});
    s.call("call_api", args, Some("alice")).await;
    assert_eq!(s.fake.calls().len(), 1);
}

#[tokio::test]
async fn only_post_is_served() {
    let s = serve(HttpConfig::default()).await;
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let response = s
            .http
            .request(method.clone(), &s.base)
            .header("accept", "text/event-stream")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 405, "{method}");
    }
}

/// Reads one JSON line the server wrote.
async fn read_message<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut tokio::io::Lines<R>,
) -> Value {
    let line = lines
        .next_line()
        .await
        .expect("read")
        .expect("server answered");
    serde_json::from_str(&line).expect("JSON line")
}

/// Writes one JSON line, as an MCP client does to the server's stdin.
async fn write_message<W: tokio::io::AsyncWrite + Unpin>(writer: &mut W, message: Value) {
    let mut line = message.to_string();
    line.push('\n');
    writer.write_all(line.as_bytes()).await.expect("write");
}

#[tokio::test]
async fn stdio_serves_the_fixed_caller_and_ends_on_eof() {
    let fake = Arc::new(Fake::default());
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (server_read, server_write) = tokio::io::split(server);
    let serving = tokio::spawn(serve_io(
        Arc::clone(&fake),
        Agent("dave".into()),
        server_read,
        server_write,
    ));
    let (client_read, mut client_write) = tokio::io::split(client);
    let mut lines = BufReader::new(client_read).lines();
    write_message(
        &mut client_write,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": initialize_params()}),
    )
    .await;
    let init = read_message(&mut lines).await;
    assert_eq!(init["result"]["serverInfo"]["name"], "latchkey");
    write_message(
        &mut client_write,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    write_message(&mut client_write, json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "request_connection", "arguments": {"connection": "github", "scopes": "repo"}}}))
    .await;
    let answer = read_message(&mut lines).await;
    assert_eq!(answer["id"], 2);
    assert_eq!(
        answer["result"]["structuredContent"]["connect_url"],
        "https://l.example/connect/github"
    );
    write_message(
        &mut client_write,
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "call_api", "arguments": {"connection": "github"}}}),
    )
    .await;
    let answer = read_message(&mut lines).await;
    assert_eq!(answer["error"]["code"], -32602, "{answer}");

    // End of input, as when the MCP client closes the child's stdin.
    client_write.shutdown().await.expect("shutdown");
    serving
        .await
        .expect("join")
        .expect("a closed stdin is a clean end");
    assert_eq!(
        fake.calls(),
        [(
            "dave".to_owned(),
            Call::Connect(ConnectionArgs {
                connection: "github".into(),
                scopes: Some("repo".into())
            })
        )]
    );
}

#[tokio::test]
async fn stdio_ends_cleanly_when_the_client_leaves_before_initialize() {
    let (client, server) = tokio::io::duplex(1024);
    let (server_read, server_write) = tokio::io::split(server);
    drop(client);
    serve_io(
        Arc::new(Fake::default()),
        Agent("erin".into()),
        server_read,
        server_write,
    )
    .await
    .expect("clean end");
}
