//! The five tools: their argument types, names, descriptions and input schemas.
//!
//! The doc comments on the argument fields become the schema descriptions a language model
//! reads, so they are written for it. `tools.json` beside `Cargo.toml` is the checked-in
//! `tools/list` answer built from this module; a test fails when the two drift.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use rmcp::handler::server::common::schema_for_input;
use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use rmcp::schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

/// Arguments of `call_api`: one HTTP request to the provider's API, made by Latchkey with the
/// user's credential.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
pub struct CallApiArgs {
    /// Name of the connection to use, exactly as list_connections shows it (for example
    /// "github").
    pub connection: String,
    /// HTTP method: GET, POST, PUT, PATCH, DELETE or HEAD. Defaults to GET.
    pub method: Option<String>,
    /// Path relative to the provider's API base URL, starting with "/" and optionally ending
    /// in a query string, for example "/user/repos?per_page=5". Not a full URL: Latchkey
    /// only calls the provider's own API.
    pub path: String,
    /// Extra request headers, name to value (for example {"Accept":
    /// "application/vnd.github+json"}). Never set Authorization or other credentials:
    /// Latchkey adds them.
    pub headers: Option<BTreeMap<String, String>>,
    /// Request body sent exactly as given, as text. Set a matching Content-Type header. Do not
    /// combine with `json`.
    pub body: Option<String>,
    /// Request body as a JSON value, sent with Content-Type: application/json. Do not combine
    /// with `body`.
    pub json: Option<Value>,
    /// Space-separated scopes this call needs (for example "repo read:user"). Latchkey then
    /// uses a token narrowed to them. Leave out to use the scopes already granted.
    pub scopes: Option<String>,
}

/// Arguments of `request_connection` and `get_access_token`: a connection and, optionally,
/// the scopes wanted on it.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
pub struct ConnectionArgs {
    /// Name of the connection, as list_connections shows it (for example "github").
    pub connection: String,
    /// Space-separated scopes you need (for example "repo read:user"). Leave out to use the
    /// scopes already granted.
    pub scopes: Option<String>,
}

/// Arguments of `request_approval`: the connection and the `call_api` call the approval is
/// for.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
pub struct RequestApprovalArgs {
    /// Name of the connection, as list_connections shows it (for example "github").
    pub connection: String,
    /// Space-separated scopes of the call_api call the approval is for, if you passed any.
    pub scopes: Option<String>,
    /// HTTP method of the call_api call the approval is for. Defaults to GET.
    pub method: Option<String>,
    /// Path of the call_api call the approval is for, exactly as you passed it to call_api
    /// (for example "/repos/acme/site/merges").
    pub path: Option<String>,
}

/// `list_connections` takes no arguments; the empty struct still rejects unknown ones.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "rmcp::schemars")]
pub(crate) struct NoArgs {}

/// Tool names, in the order `tools/list` answers them.
pub const LIST_CONNECTIONS: &str = "list_connections";
/// See [`LIST_CONNECTIONS`].
pub const CALL_API: &str = "call_api";
/// See [`LIST_CONNECTIONS`].
pub const REQUEST_CONNECTION: &str = "request_connection";
/// See [`LIST_CONNECTIONS`].
pub const REQUEST_APPROVAL: &str = "request_approval";
/// See [`LIST_CONNECTIONS`].
pub const GET_ACCESS_TOKEN: &str = "get_access_token";

const LIST_CONNECTIONS_DESCRIPTION: &str = "\
List the user's connected accounts that you may use through Latchkey. Each entry names a \
connection (pass that name as `connection` to the other tools), its provider, its health \
(whether it works now or the user must reconnect) and the scopes granted. Call this first to \
learn what you can reach. Takes no arguments.";

const CALL_API_DESCRIPTION: &str = "\
Call a connected provider's HTTP API through Latchkey. Give the connection and a path \
relative to the provider's API base URL; Latchkey adds the user's credential, so you never \
see it and must not send one yourself. The result carries the upstream status, content type and \
body (and `json`, parsed, when the body is JSON). Some calls need the user's approval first: then the result is an error that says so and \
gives the approval URL to show the user; after they approve, make the same call again \
(request_approval reports the approval's status). If the connection is not connected or \
lacks a scope, the error says so and request_connection gives the URL where the user fixes \
it.";

const REQUEST_CONNECTION_DESCRIPTION: &str = "\
Get the URL where the user connects an account for a connection, or grants scopes it is \
missing. Use it when list_connections shows no usable account, or when call_api reports that \
the connection is not connected or lacks a scope. Show the URL to the user and wait until \
they say they are done: this tool connects nothing by itself.";

const REQUEST_APPROVAL_DESCRIPTION: &str = "\
Ask the user to approve a call_api call that needs approval, or check on an approval already \
asked for. Give the same connection, method, path and scopes as the call_api call. The result \
reports the approval's status (for example pending, approved or denied) and, while it is \
pending, the URL where the user approves. Once approved, repeat the call_api call.";

const GET_ACCESS_TOKEN_DESCRIPTION: &str = "\
Get a raw access token for a connection, for a program that must talk to the provider \
directly (an SDK or a git remote, say). This works only when the operator allowed token \
export on this agent's grant, which is off by default; otherwise it fails and you should use \
call_api instead. Treat the token as a secret: never print it, log it or send it anywhere but \
the provider.";

fn input_schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    // Only fails for a type whose schema root is not an object: a programming error that the
    // tools.json test catches before anything ships.
    let mut schema = schema_for_input::<T>()
        .unwrap_or_else(|e| panic!("tool input schema: {e}"))
        .as_ref()
        .clone();
    // Some clients reject an object schema without `properties`, even an empty one.
    schema
        .entry("properties")
        .or_insert_with(|| Value::Object(JsonObject::new()));
    for value in schema.values_mut() {
        unwrap_doc_lines(value);
    }
    Arc::new(schema)
}

/// Doc comments keep their source line breaks; the model should read each description as
/// one paragraph. A blank line (a deliberate break) stays.
fn unwrap_doc_lines(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                match field {
                    Value::String(text) if name == "description" => {
                        *text = text
                            .split("\n\n")
                            .map(|paragraph| paragraph.split('\n').collect::<Vec<_>>().join(" "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    other => unwrap_doc_lines(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_doc_lines),
        _ => {}
    }
}

fn tool(
    name: &'static str,
    title: &str,
    description: &'static str,
    schema: Arc<JsonObject>,
    annotations: ToolAnnotations,
) -> Tool {
    let mut tool = Tool::new(name, description, schema);
    tool.title = Some(title.to_owned());
    tool.annotations = Some(annotations);
    tool
}

/// The tool definitions, built once.
pub(crate) static TOOLS: LazyLock<Vec<Tool>> = LazyLock::new(|| {
    // Hints tell clients which calls may change things upstream (and so deserve a prompt).
    // Every tool but list_connections reaches outside Latchkey (the provider, or the user).
    vec![
        tool(
            LIST_CONNECTIONS,
            "List connected accounts",
            LIST_CONNECTIONS_DESCRIPTION,
            input_schema::<NoArgs>(),
            ToolAnnotations::new()
                .read_only(true)
                .idempotent(true)
                .open_world(false),
        ),
        tool(
            CALL_API,
            "Call a provider's API",
            CALL_API_DESCRIPTION,
            input_schema::<CallApiArgs>(),
            ToolAnnotations::new()
                .read_only(false)
                .destructive(true)
                .idempotent(false)
                .open_world(true),
        ),
        tool(
            REQUEST_CONNECTION,
            "Get a connect URL",
            REQUEST_CONNECTION_DESCRIPTION,
            input_schema::<ConnectionArgs>(),
            ToolAnnotations::new()
                .read_only(false)
                .destructive(false)
                .idempotent(true)
                .open_world(true),
        ),
        tool(
            REQUEST_APPROVAL,
            "Request or check an approval",
            REQUEST_APPROVAL_DESCRIPTION,
            input_schema::<RequestApprovalArgs>(),
            ToolAnnotations::new()
                .read_only(false)
                .destructive(false)
                .idempotent(true)
                .open_world(true),
        ),
        tool(
            GET_ACCESS_TOKEN,
            "Get a raw access token",
            GET_ACCESS_TOKEN_DESCRIPTION,
            input_schema::<ConnectionArgs>(),
            ToolAnnotations::new()
                .read_only(true)
                .idempotent(false)
                .open_world(true),
        ),
    ]
});

/// The `tools/list` answer as JSON: `{"tools": [{name, title, description, inputSchema,
/// annotations}, ..]}` in the fixed order above. `tools.json` holds exactly this.
pub fn tools_json() -> Value {
    serde_json::json!({ "tools": *TOOLS })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;

    fn tools_file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools.json")
    }

    /// The checked-in schemas are what agents and the docs see; CI fails when code and file
    /// disagree. `LATCHKEY_BLESS=1` rewrites the file from the code.
    #[test]
    fn tools_json_matches_the_checked_in_file() {
        let built = format!(
            "{}\n",
            serde_json::to_string_pretty(&tools_json()).expect("tools serialise")
        );
        let path = tools_file();
        if std::env::var_os("LATCHKEY_BLESS").is_some_and(|v| v == "1") {
            std::fs::write(&path, &built).expect("write tools.json");
            return;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == built,
            "crates/mcp/tools.json is out of date with the tool definitions in \
             crates/mcp/src/tools.rs. Review the change, then run \
             `LATCHKEY_BLESS=1 cargo test -p latchkey-mcp` to rewrite it."
        );
    }

    #[test]
    fn names_are_the_five_tools_in_order() {
        let names: Vec<_> = TOOLS.iter().map(|t| t.name.to_string()).collect();
        assert_eq!(
            names,
            [
                LIST_CONNECTIONS,
                CALL_API,
                REQUEST_CONNECTION,
                REQUEST_APPROVAL,
                GET_ACCESS_TOKEN
            ]
        );
    }

    #[test]
    fn schemas_require_what_the_structs_require_and_close_the_object() {
        let tools = tools_json();
        let schema = |i: usize| tools["tools"][i]["inputSchema"].clone();
        assert_eq!(schema(1)["required"], json!(["connection", "path"]));
        assert_eq!(schema(2)["required"], json!(["connection"]));
        assert_eq!(schema(3)["required"], json!(["connection"]));
        for i in 0..5 {
            assert_eq!(schema(i)["type"], "object", "tool {i}");
            assert_eq!(schema(i)["additionalProperties"], false, "tool {i}");
        }
        assert_eq!(schema(0)["properties"], json!({}));
        // Field docs reach the model, one line each.
        let path = &schema(1)["properties"]["path"]["description"];
        assert!(path.as_str().is_some_and(|d| d.contains("relative to")));
        let text = tools.to_string();
        assert!(!text.contains("\\n"), "no wrapped doc lines in {text}");
        assert!(
            !text.contains("\"default\""),
            "absent optional fields have no default"
        );
    }

    #[test]
    fn arguments_parse_and_unknown_fields_are_refused() {
        let args: CallApiArgs = serde_json::from_value(json!({
            "connection": "github", "path": "/user", "json": {"a": 1}
        }))
        .expect("parse");
        assert_eq!(args.method, None);
        assert_eq!(args.json, Some(json!({"a": 1})));
        let err = serde_json::from_value::<CallApiArgs>(json!({
            "connection": "github", "path": "/user", "url": "https://x"
        }))
        .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field `url`"), "{err}");
        assert!(serde_json::from_value::<NoArgs>(json!({"x": 1})).is_err());
    }
}
