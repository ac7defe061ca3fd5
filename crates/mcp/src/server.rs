//! The rmcp `ServerHandler`: lists the tools, parses a call's arguments, finds the caller and
//! maps the backend's answer onto a `CallToolResult`. One handler serves both transports; only
//! where the caller comes from differs.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::request::Parts;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::backend::{Backend, ToolFailure, ToolResult};
use crate::tools::{
    CALL_API, CallApiArgs, GET_ACCESS_TOKEN, LIST_CONNECTIONS, NoArgs, REQUEST_APPROVAL,
    REQUEST_CONNECTION, TOOLS,
};

/// The server's name in `initialize` / `server/discover`.
pub const SERVER_NAME: &str = "latchkey";

/// What the server tells the model it is for (`instructions` in the handshake).
pub const INSTRUCTIONS: &str = "\
Latchkey keeps the user's API credentials (GitHub, Google and other providers) and makes \
API calls for you with them, so you never handle a password or token. Start with \
list_connections to see which accounts you may use, then call_api to call a provider's API. \
When a connection is missing or lacks a scope, request_connection gives a URL for the user; \
when a call needs the user's approval, show them the approval URL and use request_approval \
to follow it. Pass URLs to the user as they are.";

/// Where the handler finds the caller.
enum CallerSource<C> {
    /// In the HTTP request's extensions, put there by the embedding server's auth layer.
    HttpExtensions,
    /// Fixed for the whole connection (stdio: one process, one authenticated agent).
    Fixed(C),
}

/// The MCP server for one backend. Cheap to clone: the Streamable HTTP service builds one per
/// request.
pub(crate) struct McpServer<B: Backend> {
    backend: Arc<B>,
    caller: Arc<CallerSource<B::Caller>>,
}

impl<B: Backend> Clone for McpServer<B> {
    fn clone(&self) -> Self {
        Self {
            backend: Arc::clone(&self.backend),
            caller: Arc::clone(&self.caller),
        }
    }
}

impl<B: Backend> McpServer<B> {
    /// A server that reads the caller from each HTTP request's extensions.
    pub(crate) fn for_http(backend: Arc<B>) -> Self {
        Self {
            backend,
            caller: Arc::new(CallerSource::HttpExtensions),
        }
    }

    /// A server whose every call is made as `caller`.
    pub(crate) fn with_caller(backend: Arc<B>, caller: B::Caller) -> Self {
        Self {
            backend,
            caller: Arc::new(CallerSource::Fixed(caller)),
        }
    }

    fn caller(&self, context: &RequestContext<RoleServer>) -> Option<B::Caller> {
        match &*self.caller {
            CallerSource::Fixed(caller) => Some(caller.clone()),
            // rmcp's Streamable HTTP service moves the request's `http::request::Parts` into
            // the request context; the embedding server's middleware put the caller into
            // those parts' extensions.
            CallerSource::HttpExtensions => context
                .extensions
                .get::<Parts>()
                .and_then(|parts| parts.extensions.get::<B::Caller>())
                .cloned(),
        }
    }

    async fn dispatch(
        &self,
        name: &str,
        arguments: Option<JsonObject>,
        caller: Option<B::Caller>,
    ) -> Result<ToolResult, ErrorData> {
        // Arguments are checked before the caller so a malformed call is a protocol error
        // whoever sends it; the backend is only reached with both in hand.
        let backend = &*self.backend;
        Ok(match name {
            LIST_CONNECTIONS => {
                let NoArgs {} = parse(name, arguments)?;
                let Some(caller) = caller else {
                    return Ok(not_authenticated());
                };
                backend.list_connections(&caller).await
            }
            CALL_API => {
                let args: CallApiArgs = parse(name, arguments)?;
                if args.body.is_some() && args.json.is_some() {
                    return Err(ErrorData::invalid_params(
                        "call_api: give the request body as either `body` or `json`, not both",
                        None,
                    ));
                }
                let Some(caller) = caller else {
                    return Ok(not_authenticated());
                };
                backend.call_api(&caller, args).await
            }
            REQUEST_CONNECTION => {
                let args = parse(name, arguments)?;
                let Some(caller) = caller else {
                    return Ok(not_authenticated());
                };
                backend.request_connection(&caller, args).await
            }
            REQUEST_APPROVAL => {
                let args = parse(name, arguments)?;
                let Some(caller) = caller else {
                    return Ok(not_authenticated());
                };
                backend.request_approval(&caller, args).await
            }
            GET_ACCESS_TOKEN => {
                let args = parse(name, arguments)?;
                let Some(caller) = caller else {
                    return Ok(not_authenticated());
                };
                backend.get_access_token(&caller, args).await
            }
            other => {
                return Err(ErrorData::invalid_params(
                    format!("unknown tool `{other}`; tools/list names the tools"),
                    None,
                ));
            }
        })
    }
}

/// Parses a tool's arguments; absent arguments are an empty object. A mismatch is the
/// client's error: JSON-RPC "invalid params" with serde's message (which names the field).
fn parse<T: DeserializeOwned>(tool: &str, arguments: Option<JsonObject>) -> Result<T, ErrorData> {
    serde_json::from_value(Value::Object(arguments.unwrap_or_default()))
        .map_err(|e| ErrorData::invalid_params(format!("invalid arguments for {tool}: {e}"), None))
}

/// JSON-RPC error code of "URL elicitation required" (MCP 2025-11-25, `URL_ELICITATION_REQUIRED`).
pub const URL_ELICITATION_REQUIRED: i32 = -32042;

/// Whether the client declared URL-mode elicitation: in this request's `_meta` (2026-07-28,
/// no sessions), else at `initialize` (earlier revisions, stdio).
fn url_elicitation_supported(
    meta: Option<&rmcp::model::RequestMetaObject>,
    context: &RequestContext<RoleServer>,
) -> bool {
    meta.and_then(|m| m.client_capabilities())
        .or_else(|| context.meta.client_capabilities())
        .or_else(|| context.peer.peer_info().map(|i| i.capabilities.clone()))
        .and_then(|c| c.elicitation)
        .is_some_and(|e| e.url.is_some())
}

/// The failure as a URL elicitation the client shows the user (`-32042`, one elicitation).
fn url_elicitation_required(failure: &ToolFailure, url: &str) -> ErrorData {
    use std::hash::{BuildHasher, Hasher};
    // Identifies this elicitation to the client; no meaning beyond that.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(url.as_bytes());
    let id = format!("lk-{:016x}", h.finish());
    ErrorData::new(
        rmcp::model::ErrorCode(URL_ELICITATION_REQUIRED),
        failure.message.clone(),
        Some(serde_json::json!({
            "elicitations": [{
                "mode": "url", "elicitationId": id, "url": url, "message": failure.message,
            }],
        })),
    )
}

fn not_authenticated() -> ToolResult {
    Err(ToolFailure::kind(
        "not_authenticated",
        "Not authenticated: this MCP connection carries no Latchkey agent credential. The \
         MCP client must be configured with this agent's Latchkey token.",
    ))
}

/// Maps the backend's answer onto the wire: success is structured content plus the same JSON
/// as text (for clients that read only text); failure is `isError` with the message as text.
pub(crate) fn to_call_tool_result(result: ToolResult) -> CallToolResult {
    match result {
        Ok(value) => {
            let text = value.to_string();
            let mut out = CallToolResult::success(vec![ContentBlock::text(text)]);
            out.structured_content = Some(value);
            out
        }
        Err(failure) => {
            let mut out = CallToolResult::error(vec![ContentBlock::text(failure.message.clone())]);
            out.structured_content = Some(failure.structured());
            out
        }
    }
}

impl<B: Backend> ServerHandler for McpServer<B> {
    fn get_info(&self) -> ServerConfig {
        let mut implementation = Implementation::new(SERVER_NAME, env!("CARGO_PKG_VERSION"));
        implementation.title = Some("Latchkey".to_owned());
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(implementation)
            .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(TOOLS.clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        TOOLS.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = self.caller(&context);
        let name: Cow<'static, str> = request.name;
        let meta = request.meta.clone();
        let result = self.dispatch(&name, request.arguments, caller).await?;
        if let Err(failure) = &result {
            tracing::debug!(tool = %name, error = %failure.structured()["error"], "tool call failed");
            if let Some(url) = &failure.elicit_url
                && url_elicitation_supported(meta.as_ref(), &context)
            {
                return Err(url_elicitation_required(failure, url));
            }
        }
        Ok(to_call_tool_result(result).into())
    }
}
