//! The one seam between the MCP layer and the vault: the embedding server implements
//! [`Backend`]; this crate only parses arguments, finds the caller and shapes results.

use serde_json::{Map, Value};

use crate::tools::{CallApiArgs, ConnectionArgs, RequestApprovalArgs};

/// What a tool call answers: a JSON value on success (sent as the tool's structured content),
/// or a [`ToolFailure`] the model is meant to read and act on.
///
/// Make the success value a JSON object: MCP revisions before 2026-07-28 allow only objects as
/// structured content, and rmcp drops anything else for those clients (the text content still
/// carries it).
pub type ToolResult = Result<Value, ToolFailure>;

/// A tool call that did not succeed.
///
/// It reaches the model as a tool result with `isError: true`, not as a protocol error: the
/// model reads `message` and can act on it (show a URL to the user, pick another connection).
/// The structured content is `{"error": .., "message": message, ..data}`: the fields of
/// `data` (an object) are merged in, its `error` field names the failure kind
/// (`"tool_error"` when absent), and `message` always is [`ToolFailure::message`].
#[derive(Debug, Clone, PartialEq)]
pub struct ToolFailure {
    /// What went wrong and what to do next, written for the model (and the user it talks to).
    pub message: String,
    /// Structured detail, e.g. `{"error": "not_connected", "connect_url": "https://.."}`.
    /// Not an object (say `null`): nothing is merged; any other non-object value is kept
    /// under `detail`.
    pub data: Value,
    /// A page the user must visit before the call can succeed (connect an account, grant a
    /// scope). A client that declared URL-mode elicitation gets the failure as a JSON-RPC
    /// `-32042` "URL elicitation required" error naming this URL, so it can open the page
    /// for the user; other clients get the ordinary error result.
    pub elicit_url: Option<String>,
}

/// The failure kind used when [`ToolFailure::data`] names none.
pub const DEFAULT_ERROR_KIND: &str = "tool_error";

impl ToolFailure {
    /// A failure with a message and structured detail.
    pub fn new(message: impl Into<String>, data: Value) -> Self {
        Self {
            message: message.into(),
            data,
            elicit_url: None,
        }
    }

    /// The same failure, asking clients that can for a URL-mode elicitation of `url`.
    pub fn with_url_elicitation(mut self, url: impl Into<String>) -> Self {
        self.elicit_url = Some(url.into());
        self
    }

    /// A failure of kind `error` (the `error` field of the structured content) with no other
    /// detail.
    pub fn kind(error: &str, message: impl Into<String>) -> Self {
        Self::new(message, serde_json::json!({ "error": error }))
    }

    /// The structured content sent to the client: `{"error", "message", ..data}`.
    pub fn structured(&self) -> Value {
        let mut out = Map::new();
        out.insert("error".into(), Value::String(DEFAULT_ERROR_KIND.into()));
        match &self.data {
            Value::Object(fields) => {
                for (name, value) in fields {
                    out.insert(name.clone(), value.clone());
                }
            }
            Value::Null => {}
            other => {
                out.insert("detail".into(), other.clone());
            }
        }
        out.insert("message".into(), Value::String(self.message.clone()));
        Value::Object(out)
    }
}

/// The vault behind the tools. The server crate implements it; this crate never sees
/// credentials, policy or storage.
///
/// Every method gets the authenticated caller and the parsed arguments and answers a
/// [`ToolResult`]. Errors the model should see (not connected, approval needed, scope
/// missing) are `Err(ToolFailure)`; there is no separate internal-error channel, so a
/// backend that hits one says so in a `ToolFailure` without leaking detail.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Whoever the embedding server authenticated (an agent and its grant, say). The server
    /// puts a value of this type into the HTTP request's extensions
    /// ([`http::Request::extensions_mut`](axum::http::Request::extensions_mut)) before the
    /// request reaches [`crate::http_service`]; for stdio it is fixed per process
    /// ([`crate::serve_stdio`]).
    type Caller: Clone + Send + Sync + 'static;

    /// The user's connected accounts for the connections this agent may use, with health
    /// and scopes. Tool `list_connections`.
    async fn list_connections(&self, caller: &Self::Caller) -> ToolResult;

    /// Call the provider's API with the credential injected. Tool `call_api`.
    async fn call_api(&self, caller: &Self::Caller, args: CallApiArgs) -> ToolResult;

    /// The URL where the user connects the account or grants missing scopes.
    /// Tool `request_connection`.
    async fn request_connection(&self, caller: &Self::Caller, args: ConnectionArgs) -> ToolResult;

    /// Start (or look up) the user's approval for a call and report its status.
    /// Tool `request_approval`.
    async fn request_approval(
        &self,
        caller: &Self::Caller,
        args: RequestApprovalArgs,
    ) -> ToolResult;

    /// A raw upstream access token, when the operator allowed it on the grant.
    /// Tool `get_access_token`.
    async fn get_access_token(&self, caller: &Self::Caller, args: ConnectionArgs) -> ToolResult;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn failure_merges_data_and_keeps_its_message() {
        let f = ToolFailure::new(
            "Connect GitHub first.",
            json!({"error": "not_connected", "connect_url": "https://l/c", "message": "x"}),
        );
        assert_eq!(
            f.structured(),
            json!({"error": "not_connected", "connect_url": "https://l/c", "message": "Connect GitHub first."})
        );
    }

    #[test]
    fn failure_without_kind_gets_the_default_and_odd_data_is_kept() {
        assert_eq!(
            ToolFailure::new("m", Value::Null).structured(),
            json!({"error": "tool_error", "message": "m"})
        );
        assert_eq!(
            ToolFailure::new("m", json!([1])).structured(),
            json!({"error": "tool_error", "message": "m", "detail": [1]})
        );
    }
}
