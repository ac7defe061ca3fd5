//! stdio transport: newline-delimited JSON-RPC on a byte stream, for MCP clients that start
//! Latchkey as a child process. One process serves one authenticated caller, so the caller is
//! fixed up front instead of read from each request.

use std::sync::Arc;

use rmcp::ServiceExt;
use rmcp::service::ServerInitializeError;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::backend::Backend;
use crate::server::McpServer;

/// Why serving a stream stopped other than by the client closing it.
#[derive(Debug, thiserror::Error)]
#[error("MCP over stdio: {0}")]
pub struct ServeError(String);

/// Serves MCP on the process's stdin/stdout as `caller` until the client closes stdin.
/// Nothing else may write to stdout meanwhile (log to stderr).
pub async fn serve_stdio<B: Backend>(backend: Arc<B>, caller: B::Caller) -> Result<(), ServeError> {
    serve_io(backend, caller, tokio::io::stdin(), tokio::io::stdout()).await
}

/// Serves MCP on any byte stream pair as `caller` until `reader` reaches end of file.
/// [`serve_stdio`] is this on stdin/stdout; tests use an in-memory pipe.
pub async fn serve_io<B, R, W>(
    backend: Arc<B>,
    caller: B::Caller,
    reader: R,
    writer: W,
) -> Result<(), ServeError>
where
    B: Backend,
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let server = McpServer::with_caller(backend, caller);
    let running = match server.serve((reader, writer)).await {
        Ok(running) => running,
        // The client went away before saying anything: a normal end, not a failure.
        Err(ServerInitializeError::ConnectionClosed(_)) => return Ok(()),
        Err(e) => return Err(ServeError(e.to_string())),
    };
    running
        .waiting()
        .await
        .map(|_reason| ())
        .map_err(|e| ServeError(e.to_string()))
}
