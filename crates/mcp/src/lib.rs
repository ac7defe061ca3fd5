//! Latchkey's MCP server: the tools an AI agent uses to reach the user's APIs through the
//! vault (`list_connections`, `call_api`, `request_connection`, `request_approval`,
//! `get_access_token`).
//!
//! Built on the official Rust SDK, rmcp; every rmcp type stays inside this crate so an rmcp
//! upgrade touches nothing else. The crate knows nothing of the vault: the server crate
//! implements [`Backend`], authenticates the agent, and either nests [`http_service`] into its
//! Router (putting the caller into each request's extensions) or runs [`serve_stdio`] with a
//! fixed caller.
//!
//! Tool names, descriptions and input schemas live in [`tools`]; `tools.json` beside
//! `Cargo.toml` is the checked-in copy of the `tools/list` answer, regenerated with
//! `LATCHKEY_BLESS=1 cargo test -p latchkey-mcp`.

mod backend;
mod http;
mod server;
mod stdio;
pub mod tools;

pub use backend::{Backend, DEFAULT_ERROR_KIND, ToolFailure, ToolResult};
pub use http::{
    DEFAULT_MAX_REQUEST_BODY_BYTES, HttpConfig, LOOPBACK_HOSTS, McpHttpService, http_service,
};
pub use server::{INSTRUCTIONS, SERVER_NAME};
pub use stdio::{ServeError, serve_io, serve_stdio};
pub use tools::{CallApiArgs, ConnectionArgs, RequestApprovalArgs, tools_json};

#[cfg(test)]
mod tests;
