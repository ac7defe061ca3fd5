//! `/mcp`: Latchkey's MCP server over Streamable HTTP (the tools themselves are in the
//! `latchkey-mcp` crate; this is the vault behind them). Every request carries the agent's
//! bearer token, checked as for `/proxy`; without one the answer is 401 with the RFC 9728
//! protected-resource metadata URL. `call_api` goes through the proxy's own path, so an MCP
//! call is checked, injected, capped and audited exactly as a `/proxy` call.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use latchkey_core::OAuthError;
use latchkey_core::vault::{AgentCaller, ApiCall, ApprovalState, RequestContext};
use latchkey_mcp::{
    Backend, CallApiArgs, ConnectionArgs, HttpConfig, RequestApprovalArgs, ToolFailure, ToolResult,
};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use super::errors::json_response;
use super::proxy::{self, Outgoing};
use super::web::context;
use super::{AppState, RequestMeta};

/// Largest provider answer a `call_api` tool result carries (a model reads it whole).
const MAX_TOOL_ANSWER: usize = 1024 * 1024;

/// Who calls a tool: the authenticated agent and user, and the request's id and address.
#[derive(Clone)]
pub struct McpCaller {
    caller: AgentCaller,
    ctx: RequestContext,
}

/// The vault behind the MCP tools.
pub struct VaultTools {
    state: AppState,
}

/// The `/mcp` route and its protected-resource metadata.
pub fn router(state: AppState) -> Router {
    let host = url::Url::parse(&state.vault.config.issuer)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default();
    let origin = state.vault.config.issuer.trim_end_matches('/').to_owned();
    let service = latchkey_mcp::http_service(
        Arc::new(VaultTools {
            state: state.clone(),
        }),
        HttpConfig {
            allowed_hosts: vec![host],
            allowed_origins: vec![origin],
            max_request_body_bytes: state.proxy.limits().max_request_bytes + 64 * 1024,
        },
    );
    Router::new()
        .route_service("/mcp", service)
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            axum::routing::get(resource_metadata),
        )
        .route(
            "/.well-known/oauth-protected-resource",
            axum::routing::get(resource_metadata),
        )
        .with_state(state)
}

/// RFC 9728 protected-resource metadata for the agent API.
async fn resource_metadata(State(state): State<AppState>) -> Response {
    let issuer = &state.vault.config.issuer;
    json_response(
        axum::http::StatusCode::OK,
        &json!({
            "resource": state.vault.agent_resource(),
            "authorization_servers": [issuer],
            "bearer_methods_supported": ["header"],
            "resource_name": "Latchkey agent API (MCP and /proxy)",
            "resource_documentation": format!("{issuer}ui"),
        }),
        None,
    )
}

/// The bearer token (and `Latchkey-User`) of every `/mcp` request, checked before the MCP
/// service sees it.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    // A HEAD answer carries no content (RFC 9110 §9.3.2), and the MCP service below, not a
    // method router, would send one (an HTTP/2 client then sees a broken stream).
    if req.method() == Method::HEAD {
        let mut resp = axum::http::StatusCode::METHOD_NOT_ALLOWED.into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let ctx = req
        .extensions()
        .get::<RequestMeta>()
        .map(context)
        .unwrap_or_default();
    let result = match proxy::agent_credentials(req.headers()) {
        Ok((bearer, user)) => {
            state
                .vault
                .authenticate_agent(&bearer, user.as_deref(), &ctx)
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(caller) => {
            req.extensions_mut().insert(McpCaller { caller, ctx });
            next.run(req).await
        }
        Err(e) => {
            let mut resp = super::errors::oauth_error(&e);
            if e.status == 401 {
                let metadata = format!(
                    "Bearer resource_metadata=\"{}.well-known/oauth-protected-resource/mcp\"",
                    state.vault.config.issuer
                );
                if let Ok(v) = HeaderValue::from_str(&metadata) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            resp
        }
    }
}

/// A refusal by the vault, for the model: what to do next, and the facts as fields.
fn failure(e: &OAuthError) -> ToolFailure {
    let field = |name: &str| {
        e.extra
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or(Value::Null)
    };
    match (e.code, &e.connect_uri) {
        ("authorization_pending", _) => {
            let uri = field("approval_uri");
            ToolFailure::new(
                format!(
                    "The user must approve this first: ask them to open {} and approve, then make the same call again.",
                    uri.as_str().unwrap_or("the Latchkey dashboard")
                ),
                json!({"error": "approval_pending", "approval_uri": uri, "expires_in": field("expires_in")}),
            )
        }
        (_, Some(connect)) => ToolFailure::new(
            format!(
                "The user has not connected {} (or must reconnect it): ask them to open {connect}, then call again.",
                connect.rsplit('/').next().unwrap_or("the account")
            ),
            json!({"error": "not_connected", "connect_url": connect}),
        )
        .with_url_elicitation(connect.clone()),
        _ => ToolFailure::new(e.description.clone(), json!({"error": e.code})),
    }
}

fn invalid(why: impl Into<String>) -> ToolFailure {
    ToolFailure::kind("invalid_arguments", why)
}

#[async_trait::async_trait]
impl Backend for VaultTools {
    type Caller = McpCaller;

    async fn list_connections(&self, c: &McpCaller) -> ToolResult {
        let list = self
            .state
            .vault
            .agent_connections(&c.caller)
            .await
            .map_err(|e| failure(&e))?;
        Ok(json!({ "connections": list }))
    }

    async fn call_api(&self, c: &McpCaller, args: CallApiArgs) -> ToolResult {
        let method = args.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| invalid("method must be an HTTP method such as GET or POST"))?;
        let raw = if args.path.starts_with('/') {
            args.path.clone()
        } else {
            format!("/{}", args.path)
        };
        let (path, query) = match raw.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (raw, None),
        };
        let path = proxy::checked_path(&path).map_err(invalid)?;
        let mut headers = HeaderMap::new();
        for (name, value) in args.headers.iter().flatten() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("`{name}` is not a valid header name")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid(format!("the value of `{name}` is not a valid header")))?;
            headers.append(name, value);
        }
        let body = match (args.body, args.json) {
            (Some(_), Some(_)) => return Err(invalid("give `body` or `json`, not both")),
            (Some(text), None) => Bytes::from(text),
            (None, Some(v)) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(v.to_string())
            }
            (None, None) => Bytes::new(),
        };
        let forwarded = proxy::forwarded_headers(&headers);
        if let Some(e) = proxy::oversized_call(&forwarded, &path, query.as_deref()) {
            return Err(invalid(e.description));
        }
        let max = self.state.proxy.limits().max_request_bytes;
        if body.len() > max {
            return Err(invalid(format!(
                "the body exceeds the proxy's limit of {max} bytes"
            )));
        }
        let call = ApiCall {
            method: method.as_str(),
            path: &path,
        };
        let released = self
            .state
            .vault
            .release_for_call(
                &c.caller,
                &args.connection,
                args.scopes.as_deref(),
                Some(call),
                &c.ctx,
            )
            .await
            .map_err(|e| failure(&e))?;
        let resp = proxy::forward(
            &self.state,
            c.caller.clone(),
            released,
            Outgoing {
                method: method.clone(),
                path,
                query,
                headers: forwarded,
                body,
            },
            c.ctx.clone(),
        )
        .await;
        answer(resp).await
    }

    async fn request_connection(&self, c: &McpCaller, args: ConnectionArgs) -> ToolResult {
        let (missing, connect_url) = self
            .state
            .vault
            .connection_needs(&c.caller, &args.connection, args.scopes.as_deref())
            .await
            .map_err(|e| failure(&e))?;
        if missing.is_empty() {
            return Ok(json!({
                "connection": args.connection, "connected": true, "missing_scopes": [],
                "connect_url": connect_url,
                "message": format!("The user's {} account is connected with the scopes asked for.", args.connection),
            }));
        }
        // Not there yet: an error result with the URL, or for a client that can open it, a
        // URL elicitation.
        Err(ToolFailure::new(
            format!(
                "Ask the user to open {connect_url} to connect {} (missing: {}), then call again.",
                args.connection,
                missing.join(" ")
            ),
            json!({
                "error": "not_connected", "connection": args.connection, "connected": false,
                "missing_scopes": missing, "connect_url": connect_url,
            }),
        )
        .with_url_elicitation(connect_url))
    }

    async fn request_approval(&self, c: &McpCaller, args: RequestApprovalArgs) -> ToolResult {
        let method = args.method.as_deref().map(str::to_ascii_uppercase);
        let path = match &args.path {
            Some(p) => {
                let p = if p.starts_with('/') {
                    p.clone()
                } else {
                    format!("/{p}")
                };
                let p = p.split_once('?').map_or(p.as_str(), |(p, _)| p).to_owned();
                Some(proxy::checked_path(&p).map_err(invalid)?)
            }
            None => None,
        };
        let call = match (&method, &path) {
            (Some(m), Some(p)) => Some(ApiCall { method: m, path: p }),
            (None, None) => None,
            _ => return Err(invalid("give both `method` and `path`, or neither")),
        };
        let state = self
            .state
            .vault
            .approval_for(
                &c.caller,
                &args.connection,
                args.scopes.as_deref(),
                call,
                &c.ctx,
            )
            .await
            .map_err(|e| failure(&e))?;
        Ok(match state {
            ApprovalState::NotNeeded => json!({
                "status": "not_needed",
                "message": "This needs no approval: go ahead.",
            }),
            ApprovalState::Approved { approval_id } => json!({
                "status": "approved", "approval_id": approval_id,
                "message": "The user approved this: make the call now.",
            }),
            ApprovalState::Pending {
                approval_uri,
                expires_in,
            } => json!({
                "status": "pending", "approval_uri": approval_uri, "expires_in": expires_in,
                "message": format!("Waiting for the user: ask them to open {approval_uri} and approve, then call this tool again to see where it stands."),
            }),
        })
    }

    async fn get_access_token(&self, c: &McpCaller, args: ConnectionArgs) -> ToolResult {
        let t = self
            .state
            .vault
            .release_for_call(
                &c.caller,
                &args.connection,
                args.scopes.as_deref(),
                None,
                &c.ctx,
            )
            .await
            .map_err(|e| failure(&e))?;
        Ok(json!({
            "access_token": t.token.expose_secret(),
            "token_type": "Bearer",
            "scope": t.scope.to_string_spaced(),
            "api_base_url": t.api_base,
        }))
    }
}

/// The proxy's answer as a tool result: Latchkey's own refusals as failures, the provider's
/// answer (any status) as `{status, content_type, body | body_base64, json}`.
async fn answer(resp: Response) -> ToolResult {
    let status = resp.status().as_u16();
    let refused = resp.headers().contains_key("latchkey-error");
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(resp.into_body(), MAX_TOOL_ANSWER)
        .await
        .map_err(|_| {
            ToolFailure::kind(
                "answer_too_large",
                format!(
                    "the provider's answer is larger than a tool result may be ({MAX_TOOL_ANSWER} bytes) or was cut; ask for less (paging, filters)"
                ),
            )
        })?;
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    if refused {
        let body = parsed.unwrap_or(Value::Null);
        let code = body["error"].as_str().unwrap_or("refused").to_owned();
        let description = body["error_description"]
            .as_str()
            .unwrap_or("Latchkey refused the call")
            .to_owned();
        return Err(ToolFailure::new(
            description,
            json!({"error": code, "status": status}),
        ));
    }
    let mut out = json!({ "status": status, "content_type": content_type });
    match String::from_utf8(bytes.to_vec()) {
        Ok(text) => out["body"] = Value::String(text),
        Err(_) => {
            use base64::Engine;
            out["body_base64"] =
                Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes));
        }
    }
    if let Some(v) = parsed {
        out["json"] = v;
    }
    Ok(out)
}
