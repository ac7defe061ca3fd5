//! Streamable HTTP transport: a tower service the server nests into its axum Router.
//!
//! Stateless (no `Mcp-Session-Id`, every POST stands alone) with plain JSON answers, so one
//! POST of one JSON-RPC message gets one JSON answer and any replica can serve any request.
//! The Host / Origin checks and the body cap are rmcp's, set from [`HttpConfig`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::Request;
use axum::response::{IntoResponse, Response};
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::backend::Backend;
use crate::server::McpServer;

/// rmcp's own default cap on a POST body.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The loopback names an empty [`HttpConfig::allowed_hosts`] stands for.
pub const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Security settings of the HTTP transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// `Host` header values accepted (DNS-rebinding protection): `"host"` matches any port,
    /// `"host:port"` only that port. A request with any other Host gets 403.
    ///
    /// **Empty means loopback only** ([`LOOPBACK_HOSTS`], any port), which is right for a
    /// server on the user's machine and refuses every public name. A single `"*"` entry turns
    /// the check off; use it only behind a proxy that already pins the Host.
    pub allowed_hosts: Vec<String>,
    /// Browser origins accepted, as `scheme://host:port` (`:*` for any port; `"null"` for
    /// `Origin: null`). Requests without an `Origin` header (every non-browser MCP client)
    /// always pass; a request whose Origin is not listed gets 403.
    ///
    /// **Empty means no browser origin at all**: any request carrying an `Origin` header is
    /// refused. (rmcp itself reads an empty list as "no check", which leaves the CSRF gap of
    /// RUSTSEC-2026-0140; this crate does not.)
    pub allowed_origins: Vec<String>,
    /// Largest accepted POST body in bytes, enforced while streaming (chunked bodies too).
    /// Bigger bodies get 413.
    pub max_request_body_bytes: usize,
}

impl Default for HttpConfig {
    /// Loopback hosts only, no browser origins, rmcp's 4 MiB body cap.
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
        }
    }
}

impl HttpConfig {
    fn to_rmcp(&self) -> StreamableHttpServerConfig {
        let config = StreamableHttpServerConfig::default()
            // Stateless: initialize is answered but opens no session; tools/call needs none.
            .with_legacy_session_mode(false)
            // One JSON answer per POST unless a handler streams (ours never do).
            .with_json_response(true)
            // No SSE streams exist in stateless JSON mode, so no keep-alive pings either.
            .with_sse_keep_alive(None)
            .with_max_request_body_bytes(self.max_request_body_bytes);
        let config = if self.allowed_hosts.is_empty() {
            config.with_allowed_hosts(LOOPBACK_HOSTS)
        } else if self.allowed_hosts.iter().any(|h| h == "*") {
            config.disable_allowed_hosts()
        } else {
            config.with_allowed_hosts(self.allowed_hosts.iter().cloned())
        };
        config
            .with_allowed_origins(self.allowed_origins.iter().cloned())
            .enforce_origin_validation()
    }
}

/// The MCP endpoint as a tower service: `Router::nest_service("/mcp", http_service(..))`.
///
/// Accepts POST only (GET and DELETE get 405: there are no sessions or server-sent streams).
/// Before a request reaches it, the embedding server's auth middleware must put the caller
/// (a `B::Caller`) into the request's extensions; without one, tool calls answer
/// "not authenticated" (`initialize` and `tools/list` still work).
pub struct McpHttpService<B: Backend> {
    inner: StreamableHttpService<McpServer<B>, NeverSessionManager>,
}

impl<B: Backend> Clone for McpHttpService<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for McpHttpService<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpHttpService").finish_non_exhaustive()
    }
}

/// Builds the HTTP MCP service for `backend` with the security settings of `cfg`.
pub fn http_service<B: Backend>(backend: Arc<B>, cfg: HttpConfig) -> McpHttpService<B> {
    let server = McpServer::for_http(backend);
    let inner = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(NeverSessionManager::default()),
        cfg.to_rmcp(),
    );
    McpHttpService { inner }
}

impl<B: Backend> tower::Service<Request<Body>> for McpHttpService<B> {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(inner.handle(request).await.into_response()) })
    }
}
