//! `latchkey mcp`: Latchkey's MCP server on stdio, for MCP clients that start their tools as
//! child processes. It is a bridge to the server's `/mcp` endpoint: each JSON-RPC message read
//! from stdin is POSTed there with the agent's own Latchkey token (client credentials with
//! `private_key_jwt`, renewed before it expires) and the user it acts for, and the answer is
//! written to stdout. The process holds only the agent's key: no vault key, no database, no
//! upstream token (the tools run in the server, which injects them).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use latchkey_crypto::keygen::SigningKey;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::token::{agent_key, client_assertion, http_client};

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

/// The agent's Latchkey token, renewed a minute before it expires (or when refused).
struct TokenSource {
    http: reqwest::Client,
    issuer: String,
    client_id: String,
    key: SigningKey,
    current: Option<(String, Instant)>,
}

impl TokenSource {
    async fn get(&mut self) -> Result<String> {
        if let Some((token, until)) = &self.current
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let form = [
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", self.client_id.clone()),
            (
                "client_assertion_type",
                latchkey_core::vault::ASSERTION_TYPE_JWT_BEARER.to_owned(),
            ),
            (
                "client_assertion",
                client_assertion(&self.key, &self.client_id, &self.issuer),
            ),
            ("resource", format!("{}mcp", self.issuer)),
        ];
        let resp = self
            .http
            .post(format!("{}oauth/token", self.issuer))
            .form(&form)
            .send()
            .await
            .with_context(|| format!("calling {}oauth/token", self.issuer))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .context("the token endpoint did not answer JSON")?;
        if !status.is_success() {
            bail!(
                "getting the agent's token: {} ({}): {}",
                body["error"].as_str().unwrap_or("error"),
                status.as_u16(),
                body["error_description"].as_str().unwrap_or("")
            );
        }
        let token = body["access_token"]
            .as_str()
            .context("no access_token in the answer")?
            .to_owned();
        let lifetime = body["expires_in"].as_u64().unwrap_or(60);
        let until = Instant::now() + Duration::from_secs(lifetime.saturating_sub(60).max(5));
        self.current = Some((token.clone(), until));
        Ok(token)
    }
}

pub async fn run(args: McpArgs) -> Result<()> {
    let mut issuer = args.issuer.clone();
    if !issuer.ends_with('/') {
        issuer.push('/');
    }
    let http = http_client(args.ca_cert.as_deref())?;
    let mut tokens = TokenSource {
        http: http.clone(),
        issuer: issuer.clone(),
        client_id: args.client_id.clone(),
        key: agent_key(&args.key, args.alg.as_deref())?,
        current: None,
    };
    // Fail at start, with the reason on stderr, rather than on the client's first message.
    tokens.get().await?;
    let endpoint = format!("{issuer}mcp");
    let mut protocol: Option<String> = None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let message: Option<Value> = serde_json::from_str(&line).ok();
        let id = message.as_ref().and_then(|m| m.get("id")).cloned();
        let answers =
            match forward(&http, &mut tokens, &endpoint, &args.user, &protocol, &line).await {
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
    http: &reqwest::Client,
    tokens: &mut TokenSource,
    endpoint: &str,
    user: &str,
    protocol: &Option<String>,
    body: &str,
) -> Result<Vec<Value>> {
    let mut renewed = false;
    loop {
        let token = tokens.get().await?;
        let mut req = http
            .post(endpoint)
            .bearer_auth(&token)
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
            tokens.current = None;
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
