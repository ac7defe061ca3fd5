//! `latchkey mcp`: Latchkey's MCP server on stdio, for MCP clients that start their tools as
//! child processes. It is a bridge to the server's `/mcp` endpoint: each JSON-RPC message read
//! from stdin is POSTed there with the agent's own Latchkey token (client credentials with
//! `private_key_jwt`, renewed before it expires) and the user it acts for, and the answer is
//! written to stdout. The process holds only the agent's key: no vault key, no database, no
//! upstream token (the tools run in the server, which injects them). The agent's token comes
//! from the Rust SDK (`latchkey-client`), which caches and renews it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use latchkey_client::{AccessToken, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::token::{sdk_client, sdk_error};

#[derive(Args)]
pub struct McpArgs {
    /// Latchkey's issuer URL, e.g. https://127.0.0.1:8750/
    #[arg(long, env = "LATCHKEY_ISSUER")]
    issuer: String,
    /// The agent's client id.
    #[arg(long, env = "LATCHKEY_CLIENT_ID")]
    client_id: String,
    /// The agent's private key (PKCS#8 PEM).
    #[arg(long, env = "LATCHKEY_AGENT_KEY")]
    key: PathBuf,
    /// Key algorithm (default from the key).
    #[arg(long)]
    alg: Option<String>,
    /// The user the agent acts for (user id or username).
    #[arg(long, env = "LATCHKEY_USER")]
    user: String,
    /// CA certificate to trust (e.g. latchkey-data/tls/ca.pem).
    #[arg(long, env = "LATCHKEY_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

/// The agent's Latchkey token from the SDK's cache (renewed a minute before it expires).
async fn agent_token(client: &Client) -> Result<AccessToken> {
    client.agent_token().await.map_err(|e| {
        sdk_error(e, &format!("{}oauth/token", client.issuer()))
            .context("getting the agent's token")
    })
}

pub async fn run(args: McpArgs) -> Result<()> {
    let client = sdk_client(
        &args.issuer,
        &args.client_id,
        &args.key,
        args.alg.as_deref(),
        args.ca_cert.as_deref(),
    )?
    .build()?;
    // Fail at start, with the reason on stderr, rather than on the client's first message.
    agent_token(&client).await?;
    let endpoint = format!("{}mcp", client.issuer());
    let mut protocol: Option<String> = None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let message: Option<Value> = serde_json::from_str(&line).ok();
        let id = message.as_ref().and_then(|m| m.get("id")).cloned();
        let answers = match forward(&client, &endpoint, &args.user, &protocol, &line).await {
            Ok(answers) => answers,
            Err(e) => {
                eprintln!("latchkey mcp: {e:#}");
                // A request gets an error answer; a notification gets nothing.
                id.map(|id| {
                    vec![json!({
                        "jsonrpc": "2.0", "id": id,
                        "error": {"code": -32000, "message": format!("{e:#}")},
                    })]
                })
                .unwrap_or_default()
            }
        };
        for answer in answers {
            let is_init = message
                .as_ref()
                .is_some_and(|m| m["method"] == "initialize");
            if is_init && let Some(v) = answer["result"]["protocolVersion"].as_str() {
                protocol = Some(v.to_owned());
            }
            stdout
                .write_all(format!("{}\n", serde_json::to_string(&answer)?).as_bytes())
                .await?;
            stdout.flush().await?;
        }
    }
    Ok(())
}

/// POST one message to `/mcp` (once more with a new token if it was refused as expired) and
/// return the JSON-RPC messages of the answer: none for a notification, one from a JSON
/// answer, any number from an event stream.
async fn forward(
    client: &Client,
    endpoint: &str,
    user: &str,
    protocol: &Option<String>,
    body: &str,
) -> Result<Vec<Value>> {
    let mut renewed = false;
    loop {
        let token = agent_token(client).await?;
        let mut req = client
            .http()
            .post(endpoint)
            .bearer_auth(token.secret())
            .header("latchkey-user", user)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_owned());
        for (name, value) in routing_headers(body, protocol) {
            req = req.header(name, value);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("calling {endpoint}"))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED && !renewed {
            client.forget_agent_token(&token);
            renewed = true;
            continue;
        }
        let event_stream = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let text = resp.text().await.context("reading the answer")?;
        if status == reqwest::StatusCode::ACCEPTED || text.trim().is_empty() && status.is_success()
        {
            return Ok(Vec::new());
        }
        let parsed: Vec<Value> = if event_stream {
            text.lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .filter_map(|d| serde_json::from_str(d.trim()).ok())
                .collect()
        } else {
            serde_json::from_str::<Value>(&text).into_iter().collect()
        };
        let is_jsonrpc = parsed.iter().any(|m| m.get("jsonrpc").is_some());
        if !is_jsonrpc {
            let why = parsed
                .first()
                .and_then(|v| v["error_description"].as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| text.chars().take(300).collect());
            bail!("Latchkey answered {}: {why}", status.as_u16());
        }
        return Ok(parsed);
    }
}

/// The headers Streamable HTTP wants beside a message: its protocol version (the message's own
/// `_meta` under the 2026-07-28 revision, else the one negotiated at `initialize`), and from
/// 2026-07-28 on its method (`Mcp-Method`) and, for a call, the tool's name (`Mcp-Name`).
fn routing_headers(body: &str, negotiated: &Option<String>) -> Vec<(&'static str, String)> {
    let Ok(message) = serde_json::from_str::<Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let version = message["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| negotiated.clone());
    if let Some(v) = version {
        out.push(("mcp-protocol-version", v));
    }
    if let Some(method) = message["method"].as_str() {
        out.push(("mcp-method", method.to_owned()));
        let name = match method {
            "tools/call" | "prompts/get" => message["params"]["name"].as_str(),
            "resources/read" => message["params"]["uri"].as_str(),
            _ => None,
        };
        if let Some(n) = name {
            out.push(("mcp-name", n.to_owned()));
        }
    }
    out
}
