//! An adversarial request corpus against every endpoint (issue 12 item 2).
//!
//! [`ROUTES`] lists every route the server exposes (method, path, how it authenticates, the
//! shape of its errors and the error codes it may answer); [`every_route_is_in_the_corpus`]
//! holds that table to the router's source (see there why a source scan), and each corpus run
//! checks through `/metrics` that its requests were matched to the route's template, not to
//! the fallback.
//!
//! For each route a valid request is built with real credentials (a signed-in session and its
//! CSRF token, an operator token, an agent's signed assertion or secret, a user's or an
//! agent's bearer token), so that mutations reach the handler's own validation rather than
//! stopping at authentication. Most requests are then mutated, one to three times over:
//! parameters dropped, repeated (same and other value), emptied, made oversized (50–150 KiB),
//! replaced by generated values (control characters, NUL, non-ASCII, numbers, ids, URLs,
//! JSON), broken percent-encoding and invalid UTF-8, wrong JSON types and deep nesting, the
//! wrong Content-Type (JSON, form, text, multipart, none), 1 MiB bodies, a 64 KiB header, every
//! method, garbage, doubled, tampered or other users' credentials, other users' and missing
//! ids in the path, and scopes beyond the grant. Generated values come from proptest
//! strategies driven by one seed per run (per route and request index, so a run repeats
//! exactly); the seed is printed with every failure.
//!
//! Every answer must be below 500, carry the route's error shape (RFC 6749 JSON with an
//! allowed `error`; RFC 9457 problems with an allowed `title`; an HTML page for browser
//! routes; JSON-RPC errors for MCP) and no upstream secret. Afterwards: the other user's
//! account, approval and refresh token are untouched, no upstream token was released but by
//! a 200, and `latchkey audit verify` passes. Each route must have answered at least one
//! success and several distinct refusals, so a corpus that stopped at the door would fail.
//!
//! Budget: [`per_route`] requests per route (10,000 in CI), in one `#[tokio::test]` per surface
//! so nextest runs them side by side. `LATCHKEY_CORPUS_LONG=1` (or `bash scripts/corpus
//! --long`) runs ten times as many; `LATCHKEY_CORPUS_REQUESTS=N` sets the count;
//! `LATCHKEY_CORPUS_SEED=S` repeats a run. `bash scripts/corpus [--long]` runs them all.
//!
//! The servers run on a data directory in `/dev/shm` when there is one (the corpus is about
//! inputs, not fsync). Rate limits: the per-agent budget is off (its default) and the pending
//! approval limits are raised; the sign-in throttle has no setting (5 failures per username,
//! 30 per address, 15 minutes), so the sign-in corpus moves its server's clock on between
//! batches, and most of its wrong passwords are answered 429 — itself an answer under test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use latchkey_core::model::{ApprovalStatus, Role};
use latchkey_core::scope::Scopes;
use latchkey_core::vault::Actor;
use latchkey_crypto::Algorithm;
use latchkey_crypto::jws::PublicKey;
use latchkey_crypto::keygen::{self, SigningKey};
use latchkey_server::Config;
use proptest::prelude::*;
use proptest::strategy::{SBoxedStrategy, Union, ValueTree};
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::harness::*;
use crate::oidc::{App, REDIRECT, app, code_grant, confidential, pkce, token};

// --- the routes ------------------------------------------------------------------------------

/// How a route authenticates its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    Public,
    /// A signed-in browser session (and its CSRF token for forms).
    Session,
    /// A session of a user with the operator role.
    OperatorSession,
    /// A sign-in still owing its TOTP code.
    PendingSession,
    /// An admin API bearer token (`latchkey api-token create`).
    ApiToken,
    /// OAuth client authentication (assertion, secret) in the body or Basic header.
    Client,
    /// An agent's bearer token for the agent API, with `Latchkey-User`.
    Agent,
    /// A user's access token (`/userinfo`, My Account with its scopes).
    UserToken,
    /// The demo provider's own credentials.
    Demo,
}

/// The shape of a route's error answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// RFC 6749 JSON, `Content-Type: application/json` exactly; `codes` are `error` values.
    OAuth,
    /// RFC 9457 problem JSON (`application/json`); `codes` are titles.
    MyAccount,
    /// RFC 9457 problem JSON (`application/problem+json`, every error); `codes` are titles.
    Admin,
    /// Browser routes: errors are HTML pages; `codes` are statuses.
    Html,
    /// `/mcp`: OAuth JSON from the bearer check, JSON-RPC errors from the MCP service;
    /// `codes` are OAuth codes, JSON-RPC codes and bare statuses.
    Mcp,
    /// The credential-injecting proxy: Latchkey's refusals are OAuth JSON marked
    /// `Latchkey-Error` (`codes`); anything else is the provider's own answer.
    Proxy,
    /// Operations and documents: any status below 500; `codes` are statuses.
    Plain,
    /// The built-in demo provider (demo mode only): `codes` are `error` values or statuses.
    DemoProvider,
}

struct Route {
    method: &'static str,
    path: &'static str,
    auth: Auth,
    shape: Shape,
    codes: &'static [&'static str],
}

const TOKEN_CODES: &[&str] = &[
    "invalid_request",
    "invalid_authorization_details",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "invalid_scope",
    "invalid_target",
    "unsupported_grant_type",
    "access_denied",
    "authorization_pending",
    "slow_down",
    "expired_token",
    "too_many_requests",
    "federated_connection_refresh_token_not_found",
];
const REVOKE_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "unauthorized_client",
    "unsupported_token_type",
];
const CIBA_CODES: &[&str] = &[
    "invalid_request",
    "invalid_authorization_details",
    "invalid_client",
    "unauthorized_client",
    "invalid_scope",
    "invalid_target",
    "unknown_user_id",
    "access_denied",
    "too_many_requests",
    "invalid_binding_message",
    "expired_login_hint_token",
];
const USERINFO_CODES: &[&str] = &["invalid_token", "invalid_request", "insufficient_scope"];
const PROBLEM_TITLES: &[&str] = &[
    "Bad Request",
    "Unauthorized",
    "Forbidden",
    "Not Found",
    "Method Not Allowed",
    "Conflict",
    "Payload Too Large",
    "Unsupported Media Type",
    "Too Many Requests",
];
const HTML_STATUSES: &[&str] = &[
    "400", "401", "403", "404", "405", "409", "413", "415", "422", "429",
];
const AGENT_CODES: &[&str] = &[
    "invalid_request",
    "invalid_token",
    "invalid_scope",
    "invalid_target",
    "access_denied",
    "unauthorized_client",
    "insufficient_scope",
    "too_many_requests",
    "authorization_pending",
    "federated_connection_refresh_token_not_found",
    "not_found",
];
const MCP_CODES: &[&str] = &[
    "invalid_request",
    "invalid_token",
    "access_denied",
    "unauthorized_client",
    "too_many_requests",
    // JSON-RPC: parse error, invalid request, method not found, invalid params.
    "-32700",
    "-32600",
    "-32601",
    "-32602",
    // Bare refusals of the Streamable HTTP transport (Host, Origin, Accept, media type).
    "400",
    "403",
    "404",
    "405",
    "406",
    "413",
    "415",
];
const PLAIN_STATUSES: &[&str] = &["400", "404", "405", "413", "415", "422"];
const DEMO_CODES: &[&str] = &[
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unsupported_grant_type",
    "invalid_token",
    "insufficient_scope",
    "not_found",
    "invalid_scope",
    "400",
    "401",
    "403",
    "404",
    "405",
    "413",
    "415",
    "422",
];

macro_rules! route {
    ($m:literal $p:literal, $auth:ident, $shape:ident, $codes:expr) => {
        Route {
            method: $m,
            path: $p,
            auth: Auth::$auth,
            shape: Shape::$shape,
            codes: $codes,
        }
    };
}

/// Every route of `latchkey_server::http::router` (demo mode), as the router spells it.
/// `ANY` is a route taking every method (`any(…)`, a nested service).
static ROUTES: &[Route] = &[
    // OAuth and OpenID: token, revocation, CIBA, userinfo.
    route!("POST" "/oauth/token", Client, OAuth, TOKEN_CODES),
    route!("POST" "/oauth/revoke", Client, OAuth, REVOKE_CODES),
    route!("POST" "/bc-authorize", Client, OAuth, CIBA_CODES),
    route!("GET" "/userinfo", UserToken, OAuth, USERINFO_CODES),
    route!("POST" "/userinfo", UserToken, OAuth, USERINFO_CODES),
    // My Account API: Connected Accounts.
    route!("POST" "/me/v1/connected-accounts/connect", UserToken, MyAccount, PROBLEM_TITLES),
    route!("POST" "/me/v1/connected-accounts/complete", UserToken, MyAccount, PROBLEM_TITLES),
    route!("GET" "/me/v1/connected-accounts/accounts", UserToken, MyAccount, PROBLEM_TITLES),
    route!("DELETE" "/me/v1/connected-accounts/accounts/{id}", UserToken, MyAccount, PROBLEM_TITLES),
    route!("GET" "/me/v1/connected-accounts/connections", UserToken, MyAccount, PROBLEM_TITLES),
    // Browser legs outside the dashboard.
    route!("GET" "/authorize", Session, Html, HTML_STATUSES),
    route!("GET" "/connected-accounts/connect", Session, Html, HTML_STATUSES),
    route!("GET" "/connect/{connection}", Session, Html, HTML_STATUSES),
    route!("GET" "/connect/{connection}/callback", Session, Html, HTML_STATUSES),
    route!("GET" "/approvals", Public, Html, HTML_STATUSES),
    route!("GET" "/approvals/{id}", Public, Html, HTML_STATUSES),
    route!("GET" "/", Public, Html, HTML_STATUSES),
    route!("GET" "/account", Public, Html, HTML_STATUSES),
    route!("POST" "/logout", Session, Html, HTML_STATUSES),
    route!("GET" "/login", Public, Html, HTML_STATUSES),
    route!("GET" "/login/totp", PendingSession, Html, HTML_STATUSES),
    route!("POST" "/login", Public, Html, HTML_STATUSES),
    route!("POST" "/login/totp", PendingSession, Html, HTML_STATUSES),
    // Discovery and operations.
    route!("GET" "/.well-known/openid-configuration", Public, Plain, PLAIN_STATUSES),
    route!("GET" "/.well-known/jwks.json", Public, Plain, PLAIN_STATUSES),
    route!("GET" "/healthz", Public, Plain, PLAIN_STATUSES),
    route!("GET" "/readyz", Public, Plain, PLAIN_STATUSES),
    route!("GET" "/metrics", Public, Plain, PLAIN_STATUSES),
    // Admin API.
    route!("GET" "/api/v1/openapi.json", Public, Admin, PROBLEM_TITLES),
    route!("GET" "/api/v1/accounts", ApiToken, Admin, PROBLEM_TITLES),
    route!("GET" "/api/v1/accounts/{id}", ApiToken, Admin, PROBLEM_TITLES),
    route!("DELETE" "/api/v1/accounts/{id}", ApiToken, Admin, PROBLEM_TITLES),
    route!("GET" "/api/v1/users", ApiToken, Admin, PROBLEM_TITLES),
    route!("DELETE" "/api/v1/users/{user}", ApiToken, Admin, PROBLEM_TITLES),
    route!("GET" "/api/v1/connections", ApiToken, Admin, PROBLEM_TITLES),
    route!("GET" "/api/v1/agents", ApiToken, Admin, PROBLEM_TITLES),
    route!("POST" "/api/v1/agents/{id}/disable", ApiToken, Admin, PROBLEM_TITLES),
    route!("POST" "/api/v1/agents/{id}/enable", ApiToken, Admin, PROBLEM_TITLES),
    route!("DELETE" "/api/v1/agents/{id}/grants/{connection}", ApiToken, Admin, PROBLEM_TITLES),
    route!("GET" "/api/v1/audit", ApiToken, Admin, PROBLEM_TITLES),
    // Dashboard pages.
    route!("GET" "/ui", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/static/{file}", Public, Plain, PLAIN_STATUSES),
    route!("GET" "/ui/accounts", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/accounts/{id}/disconnect", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/approvals", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/approvals/pending", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/approvals/{id}", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/activity", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/activity/export", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/security", Session, Html, HTML_STATUSES),
    route!("GET" "/ui/agents", OperatorSession, Html, HTML_STATUSES),
    route!("GET" "/ui/agents/{id}", OperatorSession, Html, HTML_STATUSES),
    route!("GET" "/ui/users", OperatorSession, Html, HTML_STATUSES),
    route!("GET" "/ui/users/{id}/delete", OperatorSession, Html, HTML_STATUSES),
    // Dashboard forms.
    route!("POST" "/ui/accounts/{id}/disconnect", Session, Html, HTML_STATUSES),
    route!("POST" "/ui/approvals/{id}", Session, Html, HTML_STATUSES),
    route!("POST" "/ui/activity/verify", Session, Html, HTML_STATUSES),
    route!("POST" "/ui/security/totp", Session, Html, HTML_STATUSES),
    route!("POST" "/ui/security/totp/confirm", Session, Html, HTML_STATUSES),
    route!("POST" "/ui/agents", OperatorSession, Html, HTML_STATUSES),
    route!("POST" "/ui/agents/{id}/grants", OperatorSession, Html, HTML_STATUSES),
    route!("POST" "/ui/agents/{id}/grants/{connection}/remove", OperatorSession, Html, HTML_STATUSES),
    route!("POST" "/ui/agents/{id}/state", OperatorSession, Html, HTML_STATUSES),
    route!("POST" "/ui/users", OperatorSession, Html, HTML_STATUSES),
    route!("POST" "/ui/users/{id}/role", OperatorSession, Html, HTML_STATUSES),
    route!("POST" "/ui/users/{id}/delete", OperatorSession, Html, HTML_STATUSES),
    // Agent API: the proxy and MCP.
    route!("ANY" "/proxy/{connection}", Agent, Proxy, AGENT_CODES),
    route!("ANY" "/proxy/{connection}/{*path}", Agent, Proxy, AGENT_CODES),
    route!("ANY" "/mcp", Agent, Mcp, MCP_CODES),
    route!("GET" "/.well-known/oauth-protected-resource", Public, Plain, PLAIN_STATUSES),
    route!("GET" "/.well-known/oauth-protected-resource/mcp", Public, Plain, PLAIN_STATUSES),
    // The demo provider (demo mode).
    route!("GET" "/demo/oauth/authorize", Public, DemoProvider, DEMO_CODES),
    route!("POST" "/demo/oauth/authorize", Public, DemoProvider, DEMO_CODES),
    route!("POST" "/demo/oauth/token", Demo, DemoProvider, DEMO_CODES),
    route!("POST" "/demo/oauth/revoke", Demo, DemoProvider, DEMO_CODES),
    route!("GET" "/demo/api/user", Demo, DemoProvider, DEMO_CODES),
    route!("GET" "/demo/api/repos", Demo, DemoProvider, DEMO_CODES),
    route!("GET" "/demo/api/repos/{name}/issues", Demo, DemoProvider, DEMO_CODES),
    route!("POST" "/demo/api/repos/{name}/issues", Demo, DemoProvider, DEMO_CODES),
    route!("POST" "/demo/api/repos/{name}/issues/{number}/comments", Demo, DemoProvider, DEMO_CODES),
];

fn route(method: &str, path: &str) -> &'static Route {
    ROUTES
        .iter()
        .find(|r| r.method == method && r.path == path)
        .unwrap_or_else(|| panic!("{method} {path} is not in ROUTES"))
}

// --- the route table against the router -----------------------------------------------------

/// Where each source file's routes are mounted. A file not listed here that defines routes
/// fails [`every_route_is_in_the_corpus`]: add it (and its routes to [`ROUTES`]).
const ROUTE_FILES: &[(&str, &str)] = &[
    ("crates/server/src/http/mod.rs", ""),
    ("crates/server/src/http/admin.rs", "/api/v1"),
    ("crates/server/src/http/ui/mod.rs", "/ui"),
    ("crates/server/src/http/mcp.rs", ""),
    ("crates/demo/src/lib.rs", "/demo"),
];

/// The routes a source file defines: `.route("PATH", get(…).post(…))` gives `GET PATH` and
/// `POST PATH`, `any(…)` and `.route_service(…)` give `ANY PATH`.
fn routes_in(source: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route") {
        rest = &rest[at + ".route".len()..];
        let service = rest.starts_with("_service(");
        let layer = rest.starts_with("_layer(");
        if layer || !(service || rest.starts_with('(')) {
            continue;
        }
        let open = rest.find('(').unwrap();
        // The call's text, up to its closing parenthesis.
        let (mut depth, mut end) = (0usize, open);
        for (i, c) in rest[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &rest[open + 1..end];
        let path = call.split('"').nth(1).expect("a route's path is a literal");
        let full = match (prefix, path) {
            (p, "/") if !p.is_empty() => p.to_owned(),
            (p, path) => format!("{p}{path}"),
        };
        let mut methods = Vec::new();
        if service {
            methods.push("ANY");
        }
        for (word, method) in [
            ("get(", "GET"),
            ("post(", "POST"),
            ("put(", "PUT"),
            ("patch(", "PATCH"),
            ("delete(", "DELETE"),
            ("head(", "HEAD"),
            ("options(", "OPTIONS"),
            ("any(", "ANY"),
        ] {
            for (i, _) in call.match_indices(word) {
                let before = call[..i].chars().next_back().unwrap_or(' ');
                if !(before.is_alphanumeric() || before == '_') {
                    methods.push(method);
                }
            }
        }
        assert!(!methods.is_empty(), "no method read from .route({call})");
        methods.sort();
        methods.dedup();
        out.extend(methods.into_iter().map(|m| format!("{m} {full}")));
        rest = &rest[end..];
    }
    out
}

/// A source file without its comment lines.
fn code_only(source: &str) -> String {
    source
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The corpus covers exactly the routes the router defines. Read from the source, not from a
/// running server: axum cannot list a router's routes, and probing paths would only find the
/// routes one already knows about. The scan is of the `.route(…)` calls themselves (with the
/// mount point of each file and a check that nothing else nests or defines routes), so a new
/// route, a new method on a route, or a new file of routes fails here until the corpus covers
/// it. The runtime half: each corpus run checks in `/metrics` that its requests were matched
/// to these templates.
#[test]
fn every_route_is_in_the_corpus() {
    let root = workspace_root();
    let mut defined = BTreeSet::new();
    let mut files = Vec::new();
    for dir in ["crates/server/src/http", "crates/demo/src"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    files.push(p);
                }
            }
        }
    }
    for file in files {
        let rel = file.strip_prefix(&root).unwrap().display().to_string();
        if rel.ends_with("tests.rs") {
            continue;
        }
        let source = code_only(&std::fs::read_to_string(&file).unwrap());
        let prefix = ROUTE_FILES.iter().find(|(f, _)| *f == rel).map(|(_, p)| *p);
        let found = routes_in(&source, prefix.unwrap_or(""));
        match prefix {
            Some(_) => defined.extend(found),
            None => assert!(
                found.is_empty(),
                "{rel} defines routes {found:?}: add it to ROUTE_FILES and its routes to ROUTES"
            ),
        }
        if rel != "crates/server/src/http/mod.rs" {
            assert!(
                !source.contains(".nest("),
                "{rel} nests a router: add its mount point to ROUTE_FILES"
            );
        }
    }
    let mod_rs =
        code_only(&std::fs::read_to_string(root.join("crates/server/src/http/mod.rs")).unwrap());
    let nests: Vec<&str> = mod_rs
        .match_indices(".nest(")
        .map(|(i, _)| &mod_rs[i..i + 40])
        .collect();
    assert_eq!(nests.len(), 3, "mount points changed: {nests:?}");
    assert!(mod_rs.contains(".nest(\"/api/v1\", admin::router())"));
    assert!(mod_rs.contains(".nest(\"/ui\", ui::router())"));
    assert!(mod_rs.contains(".nest(\"/demo\", demo.router())"));
    let table: BTreeSet<String> = ROUTES
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(ROUTES.len(), table.len(), "a route is listed twice");
    let missing: Vec<_> = defined.difference(&table).collect();
    let stale: Vec<_> = table.difference(&defined).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "routes not in the corpus: {missing:?}; listed but not defined: {stale:?}"
    );
    // The scan itself works: it found the routes of every file.
    assert!(defined.len() >= 80, "{defined:?}");
}

// --- requests ----------------------------------------------------------------------------------

/// Where a request's parameters travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    Query,
    Form,
    Json,
}

#[derive(Clone)]
struct Req {
    method: Method,
    /// The route template; `{…}` segments are filled from `ids`.
    template: &'static str,
    /// Path parameters: (value, already encoded).
    ids: Vec<(String, bool)>,
    loc: Loc,
    params: Vec<(String, Value)>,
    /// Pre-encoded `key=value` text appended to the query or form (broken encodings).
    raw: Vec<String>,
    /// Query parameters of a request whose parameters travel in the body.
    query: Vec<(String, String)>,
    headers: Vec<(String, Vec<u8>)>,
    /// `Some(None)`: no Content-Type at all.
    content_type: Option<Option<String>>,
    body: Option<Vec<u8>>,
    mutations: Vec<String>,
}

impl Req {
    fn new(method: &str, template: &'static str, loc: Loc) -> Self {
        Self {
            method: Method::from_bytes(method.as_bytes()).unwrap(),
            template,
            ids: Vec::new(),
            loc,
            params: Vec::new(),
            raw: Vec::new(),
            query: Vec::new(),
            headers: Vec::new(),
            content_type: None,
            body: None,
            mutations: Vec::new(),
        }
    }
    fn id(mut self, v: &str) -> Self {
        self.ids.push((v.to_owned(), false));
        self
    }
    fn p(mut self, k: &str, v: impl Into<Value>) -> Self {
        self.params.push((k.to_owned(), v.into()));
        self
    }
    fn h(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_owned(), v.as_bytes().to_vec()));
        self
    }
    fn bearer(self, t: &str) -> Self {
        self.h("authorization", &format!("Bearer {t}"))
    }
    fn cookies(self, c: &[(&str, &str)]) -> Self {
        let v: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.h("cookie", &v.join("; "))
    }

    fn path(&self) -> String {
        let mut ids = self.ids.iter();
        let segments: Vec<String> = self
            .template
            .split('/')
            .map(|s| {
                if s.starts_with('{') {
                    match ids.next() {
                        Some((v, true)) => v.clone(),
                        Some((v, false)) if s.starts_with("{*") => v.clone(),
                        Some((v, false)) => encode_segment(v),
                        None => "x".into(),
                    }
                } else {
                    s.to_owned()
                }
            })
            .collect();
        segments.join("/")
    }

    fn pairs_text(&self, pairs: &[(String, Value)]) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(k, &text_of(v));
        }
        let mut out = s.finish();
        for r in &self.raw {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(r);
        }
        out
    }

    /// The URL (path and query) and body to send.
    fn wire(&self) -> (String, Option<String>, Vec<u8>) {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.query {
            query.append_pair(k, v);
        }
        let mut query = query.finish();
        let (ct, body) = match self.loc {
            Loc::Query => {
                let q = self.pairs_text(&self.params);
                if !q.is_empty() {
                    if !query.is_empty() {
                        query.push('&');
                    }
                    query.push_str(&q);
                }
                (None, Vec::new())
            }
            Loc::Form => (
                Some("application/x-www-form-urlencoded".to_owned()),
                self.pairs_text(&self.params).into_bytes(),
            ),
            Loc::Json => {
                // Repeated keys stay repeated: serialise by hand.
                let members: Vec<String> = self
                    .params
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v))
                    .collect();
                (
                    Some("application/json".to_owned()),
                    format!("{{{}}}", members.join(",")).into_bytes(),
                )
            }
        };
        let ct = match &self.content_type {
            Some(c) => c.clone(),
            None => ct,
        };
        let body = self.body.clone().unwrap_or(body);
        let mut url = self.path();
        if !query.is_empty() {
            url.push('?');
            url.push_str(&query);
        }
        (url, ct, body)
    }

    /// The request for a failure report: tokens, cookies and long values cut short.
    fn describe(&self) -> String {
        let (url, ct, body) = self.wire();
        let mut out = format!(
            "{} {} [{}]\n",
            self.method,
            cut(&url, 300),
            self.mutations.join(", ")
        );
        for (k, v) in &self.headers {
            let v = String::from_utf8_lossy(v);
            let secret = matches!(k.as_str(), "authorization" | "cookie");
            out.push_str(&format!(
                "  {k}: {}\n",
                cut(&v, if secret { 16 } else { 120 })
            ));
        }
        out.push_str(&format!("  content-type: {ct:?}\n"));
        out.push_str(&format!(
            "  body ({} bytes): {}",
            body.len(),
            cut(&String::from_utf8_lossy(&body), 200)
        ));
        out
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// --- generated values ----------------------------------------------------------------------

/// One request's generator: proptest strategies on a runner seeded for this request alone.
struct Gen {
    runner: TestRunner,
}

impl Gen {
    fn new(seed: u64, route: usize, index: usize) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&(route as u64).to_le_bytes());
        bytes[16..24].copy_from_slice(&(index as u64).to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        Self {
            runner: TestRunner::new_with_rng(proptest::test_runner::Config::default(), rng),
        }
    }
    fn draw<S: Strategy>(&mut self, s: S) -> S::Value {
        s.new_tree(&mut self.runner)
            .expect("strategies here never reject")
            .current()
    }
    fn below(&mut self, n: usize) -> usize {
        self.draw(0..n.max(1))
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn nasty_text() -> &'static SBoxedStrategy<String> {
    static S: std::sync::OnceLock<SBoxedStrategy<String>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Union::new(vec![
            Just(String::new()).sboxed(),
            "[ -~]{1,40}".sboxed(),
            ".{1,24}".sboxed(),
            "[\\x00-\\x1f\\x7f]{1,8}".sboxed(),
            "[a-z]{1,8}\\x00[a-z]{0,8}".sboxed(),
            (1usize..=3)
                .prop_map(|n| "A".repeat(n * 20 * 1024))
                .sboxed(),
            any::<i64>().prop_map(|n| n.to_string()).sboxed(),
            proptest::sample::select(vec![
                "-1",
                "0",
                "99999999999999999999999999",
                "1e309",
                "NaN",
                "true",
                "null",
                "[]",
                "{\"a\":[1,{\"b\":null}]}",
                "../../../etc/passwd",
                "%2e%2e%2f%2e%2e%2f",
                "\\\\host\\share",
                "\u{FEFF}\u{202E}evil",
                "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
                "*",
                "' OR '1'='1",
                "<script>alert(1)</script>",
            ])
            .prop_map(str::to_owned)
            .sboxed(),
            "(usr|agt|app|cac|apr|opt|lkrt|lkat)_[A-Za-z0-9_-]{0,40}".sboxed(),
            "https?://[a-z0-9.-]{1,20}(:[0-9]{1,5})?/[ -~]{0,20}".sboxed(),
            "[a-z:_.*]{1,12}( [a-z:_.*]{1,12}){0,6}".sboxed(),
            "[À-ÿ一-龥😀-🙏]{1,8}".sboxed(),
        ])
        .sboxed()
    })
}

/// Pre-encoded text that does not decode cleanly: broken escapes, invalid UTF-8, NUL.
fn broken_encoding() -> &'static SBoxedStrategy<String> {
    static S: std::sync::OnceLock<SBoxedStrategy<String>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Union::new(vec![
            "%[0-9A-Fa-f]?".sboxed(),
            "%[G-Zg-z]{2}".sboxed(),
            "(%[89A-Fa-f][0-9A-Fa-f]){1,8}".sboxed(),
            "[a-z]{0,4}%".sboxed(),
            proptest::sample::select(vec![
                "%00",
                "%C0%AF",
                "%ED%A0%80",
                "%FF%FE%00",
                "%25%",
                "+%2B+&&==",
                "%0D%0ASet-Cookie:%20x=1",
            ])
            .prop_map(str::to_owned)
            .sboxed(),
        ])
        .sboxed()
    })
}

fn wrong_json() -> &'static SBoxedStrategy<Value> {
    static S: std::sync::OnceLock<SBoxedStrategy<Value>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Union::new(vec![
            any::<i64>().prop_map(Value::from).sboxed(),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from)
                .sboxed(),
            any::<bool>().prop_map(Value::from).sboxed(),
            Just(Value::Null).sboxed(),
            proptest::collection::vec("[a-z:]{0,10}", 0..4)
                .prop_map(|v| json!(v))
                .sboxed(),
            "[a-z]{1,6}"
                .prop_map(|k| json!({ k: {"x": [1, "y"]} }))
                .sboxed(),
            (100usize..300)
                .prop_map(|depth| {
                    let mut v = json!(1);
                    for _ in 0..depth {
                        v = json!([v]);
                    }
                    v
                })
                .sboxed(),
        ])
        .sboxed()
    })
}

fn garbage_bytes() -> &'static SBoxedStrategy<Vec<u8>> {
    static S: std::sync::OnceLock<SBoxedStrategy<Vec<u8>>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        Union::new(vec![
            proptest::collection::vec(any::<u8>(), 0..512).sboxed(),
            Just(b"\xff\xfe\xfd".to_vec()).sboxed(),
            Just(b"{\"a\":\"\xc3\x28\"}".to_vec()).sboxed(),
            Just(b"a=\xff\xfe&b=\x00".to_vec()).sboxed(),
            Just(b"{".to_vec()).sboxed(),
            Just(b"[[[[[[[[[[[[[[[[[[[[".to_vec()).sboxed(),
            Just(
                b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--x--\r\n".to_vec(),
            )
            .sboxed(),
            Just(b"\x00\x00\x00\x00".to_vec()).sboxed(),
        ])
        .sboxed()
    })
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"];
const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some("application/json"),
    Some("application/x-www-form-urlencoded"),
    Some("text/plain"),
    Some("multipart/form-data; boundary=x"),
    Some("multipart/form-data"),
    Some("application/json; charset=utf-16"),
    Some("application/x-www-form-urlencoded; charset=latin1"),
    Some("application/jsonx"),
    Some("*/*"),
    Some(""),
    Some("application/problem+json"),
];

// --- mutations -----------------------------------------------------------------------------

/// What the corpus knows about one route beyond its valid request.
#[derive(Default, Clone)]
struct Ctx {
    /// Path ids to try: other users' rows, missing rows.
    ids: Vec<String>,
    /// Whole `Authorization`/`Cookie`/`Latchkey-User` headers of other callers.
    other_auth: Vec<(String, String)>,
    /// Parameters or headers asking for more than the grant.
    escalations: Vec<(String, String)>,
}

const ESCALATION_HEADER: &str = "header:";

fn mutate(req: &mut Req, g: &mut Gen, ctx: &Ctx) {
    let label = |r: &mut Req, s: String| r.mutations.push(s);
    let n = req.params.len();
    let kind = g.below(20);
    match kind {
        0..=7 if n == 0 => {
            let (k, v) = (g.draw("[a-z_]{1,12}"), g.draw(nasty_text()));
            label(req, format!("add param {k}"));
            req.params.push((k, Value::String(v)));
        }
        0 => {
            let i = g.below(n);
            label(req, format!("drop {}", req.params[i].0));
            req.params.remove(i);
        }
        1 => {
            let i = g.below(n);
            label(req, format!("repeat {}", req.params[i].0));
            let p = req.params[i].clone();
            req.params.insert(i + g.below(2), p);
        }
        2 => {
            let i = g.below(n);
            let v = g.draw(nasty_text());
            label(
                req,
                format!("repeat {} with another value", req.params[i].0),
            );
            let k = req.params[i].0.clone();
            req.params.push((k, Value::String(v)));
        }
        3 => {
            let i = g.below(n);
            label(req, format!("empty {}", req.params[i].0));
            req.params[i].1 = Value::String(String::new());
        }
        4 => {
            let i = g.below(n);
            label(req, format!("oversize {}", req.params[i].0));
            // A URI is at most 64 KiB (the `http` crate's limit): a little less in the query.
            let size = if req.loc == Loc::Query {
                60 * 1024
            } else {
                100 * 1024
            };
            req.params[i].1 = Value::String("x".repeat(size));
        }
        5 | 6 => {
            let i = g.below(n);
            let v = g.draw(nasty_text());
            label(req, format!("{} = generated", req.params[i].0));
            req.params[i].1 = Value::String(v);
        }
        7 => {
            let i = g.below(n);
            label(req, format!("{} broken encoding", req.params[i].0));
            match req.loc {
                Loc::Json => {
                    // Invalid UTF-8 (or a NUL escape) inside the string.
                    let marker = "\u{1}CORPUS\u{1}";
                    req.params[i].1 = Value::String(marker.into());
                    let (_, _, body) = req.wire();
                    let text = String::from_utf8_lossy(&body).into_owned();
                    let options: [&[u8]; 4] =
                        [b"\xff\xfe", b"\\u0000", b"\xed\xa0\x80", b"\\ud800"];
                    let bad = *g.pick(&options);
                    let escaped = serde_json::to_string(marker).unwrap();
                    let escaped = &escaped[1..escaped.len() - 1];
                    let bytes = text.replace(escaped, "\u{0}").into_bytes();
                    let mut out = Vec::new();
                    for b in bytes {
                        if b == 0 {
                            out.extend_from_slice(bad);
                        } else {
                            out.push(b);
                        }
                    }
                    req.body = Some(out);
                }
                _ => {
                    let (k, _) = req.params.remove(i);
                    let v = g.draw(broken_encoding());
                    req.raw.push(format!("{k}={v}"));
                }
            }
        }
        8 => {
            if req.loc == Loc::Json && n > 0 {
                let i = g.below(n);
                let v = g.draw(wrong_json());
                label(req, format!("{} wrong JSON type", req.params[i].0));
                req.params[i].1 = v;
            } else {
                let k = g.draw("[a-z_]{1,12}|connection|scope|client_id|user|id|next");
                let v = g.draw(nasty_text());
                label(req, format!("unknown param {k}"));
                req.params.push((k, Value::String(v)));
            }
        }
        9 => {
            let m = *g.pick(METHODS);
            label(req, format!("method {m}"));
            req.method = Method::from_bytes(m.as_bytes()).unwrap();
        }
        10 => {
            let ct = *g.pick(CONTENT_TYPES);
            label(req, format!("content-type {ct:?}"));
            req.content_type = Some(ct.map(str::to_owned));
        }
        11 => match g.below(4) {
            0 => {
                label(req, "1 MiB body".into());
                let mut body = b"a=".to_vec();
                body.resize(1024 * 1024, b'a');
                req.body = Some(body);
            }
            1 => {
                label(req, "empty body".into());
                req.body = Some(Vec::new());
            }
            _ => {
                label(req, "garbage body".into());
                req.body = Some(g.draw(garbage_bytes()));
            }
        },
        12 => {
            let name = *g.pick(&[
                "x-corpus-pad",
                "authorization",
                "cookie",
                "latchkey-user",
                "user-agent",
            ]);
            label(req, format!("64 KiB {name}"));
            let value = match name {
                "authorization" => format!("Bearer {}", "A".repeat(64 * 1024)),
                "cookie" => format!("latchkey_session={}", "A".repeat(64 * 1024)),
                _ => "A".repeat(64 * 1024),
            };
            req.headers.retain(|(k, _)| k != name);
            req.headers.push((name.into(), value.into_bytes()));
        }
        13 | 14 => credentials(req, g, ctx),
        15 if !req.ids.is_empty() => {
            let i = g.below(req.ids.len());
            match g.below(4) {
                0 | 1 if !ctx.ids.is_empty() => {
                    let id = g.pick(&ctx.ids).clone();
                    label(req, format!("path id {id}"));
                    req.ids[i] = (id, false);
                }
                2 => {
                    let v = g.draw(broken_encoding());
                    label(req, format!("path id raw {v}"));
                    req.ids[i] = (v, true);
                }
                _ => {
                    let v = g.draw(nasty_text());
                    label(req, "path id generated".into());
                    req.ids[i] = (v, false);
                }
            }
        }
        16 => {
            let (k, v) = match g.below(6) {
                0 => ("origin", "https://evil.example".to_owned()),
                1 => ("accept", g.draw("[ -~]{0,30}")),
                2 => ("x-request-id", g.draw(nasty_text())),
                3 => ("latchkey-scope", g.draw(nasty_text())),
                4 => ("host", g.draw("[a-z.]{1,20}(:[0-9]{1,5})?")),
                _ => ("hx-request", "true".to_owned()),
            };
            label(req, format!("header {k}"));
            req.headers.push((k.into(), v.into_bytes()));
        }
        17 if !ctx.escalations.is_empty() => {
            let (k, v) = g.pick(&ctx.escalations).clone();
            label(req, format!("escalate {k}={v}"));
            if let Some(h) = k.strip_prefix(ESCALATION_HEADER) {
                req.headers.retain(|(n, _)| n != h);
                req.headers.push((h.to_owned(), v.into_bytes()));
            } else {
                let v = match req.loc {
                    Loc::Json => serde_json::from_str(&v).unwrap_or(Value::String(v)),
                    _ => Value::String(v),
                };
                req.params.retain(|(n, _)| *n != k);
                req.params.push((k, v));
            }
        }
        _ => {
            // Query noise on a body route, or parameters in the query instead of the body.
            if req.loc != Loc::Query && g.chance(50) {
                label(req, "parameters in the query".into());
                for (k, v) in std::mem::take(&mut req.params) {
                    req.query.push((k, text_of(&v)));
                }
            } else {
                let k = g.draw("[a-z_]{1,8}");
                let v = g.draw(nasty_text());
                label(req, format!("query {k}"));
                req.query.push((k, v));
            }
        }
    }
}

/// The credentials of the request: dropped, garbage, doubled, tampered, or someone else's.
fn credentials(req: &mut Req, g: &mut Gen, ctx: &Ctx) {
    let auth_headers = ["authorization", "cookie", "latchkey-user"];
    match g.below(6) {
        0 => {
            req.mutations.push("no credentials".into());
            req.headers
                .retain(|(k, _)| !auth_headers.contains(&k.as_str()));
        }
        1 if !ctx.other_auth.is_empty() => {
            let (k, v) = g.pick(&ctx.other_auth).clone();
            req.mutations.push(format!("other caller's {k}"));
            req.headers.retain(|(n, _)| *n != k);
            req.headers.push((k, v.into_bytes()));
        }
        2 => {
            let i = req
                .headers
                .iter()
                .position(|(k, _)| auth_headers.contains(&k.as_str()));
            if let Some(i) = i {
                req.mutations.push(format!("{} twice", req.headers[i].0));
                let h = req.headers[i].clone();
                req.headers.push(h);
            } else {
                req.mutations.push("two authorization headers".into());
                req.headers
                    .push(("authorization".into(), b"Bearer a".to_vec()));
                req.headers
                    .push(("authorization".into(), b"Bearer b".to_vec()));
            }
        }
        3 => {
            // One character of the credential changed, or the credential cut short.
            let i = req
                .headers
                .iter()
                .position(|(k, _)| auth_headers.contains(&k.as_str()));
            if let Some(i) = i {
                req.mutations.push(format!("tampered {}", req.headers[i].0));
                let v = &mut req.headers[i].1;
                if g.chance(50) && v.len() > 2 {
                    let at = 1 + g.below(v.len() - 1);
                    v[at] = if v[at] == b'A' { b'B' } else { b'A' };
                } else {
                    let keep = g.below(v.len());
                    v.truncate(keep);
                }
            }
        }
        4 => {
            let scheme = *g.pick(&["Basic", "Bearer", "bearer", "DPoP", "Digest", ""]);
            let v = g.draw(nasty_text());
            req.mutations
                .push(format!("authorization {scheme} generated"));
            req.headers.retain(|(k, _)| k != "authorization");
            let value = format!("{scheme} {}", v.chars().take(2048).collect::<String>());
            req.headers
                .push(("authorization".into(), value.into_bytes()));
        }
        _ => {
            let v = g.draw(nasty_text());
            let name = *g.pick(&["cookie", "latchkey-user"]);
            req.mutations.push(format!("{name} generated"));
            req.headers.retain(|(k, _)| k != name);
            let value = match name {
                "cookie" => format!(
                    "latchkey_session={}; latchkey_csrf={}",
                    cut(&v, 256),
                    cut(&v, 256)
                ),
                _ => cut(&v, 256),
            };
            req.headers.push((name.into(), value.into_bytes()));
        }
    }
}

// --- answers -------------------------------------------------------------------------------

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

/// Check one answer against its route: the kind of answer for the statistics, or what is
/// wrong with it.
fn check(r: &Route, resp: &Resp, head: bool) -> Result<String, String> {
    let status = resp.status;
    if status >= 500 {
        return Err(format!(
            "{status}: {}",
            cut(&String::from_utf8_lossy(&resp.body), 300)
        ));
    }
    if status >= 400 {
        latchkey_testkit::assert_no_canary("an error answer", &resp.body);
    }
    let ct = resp
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let json: Option<Value> = serde_json::from_slice(&resp.body).ok();
    let text = String::from_utf8_lossy(&resp.body);
    let bad = |what: &str| Err(format!("{status} {what}: {ct:?} {}", cut(&text, 300)));
    if status < 400 {
        if status == 200
            && json
                .as_ref()
                .is_some_and(|j| j["issued_token_type"].is_string())
        {
            return Ok("200 release".into());
        }
        let location = resp
            .headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if location.starts_with("/login") {
            return Ok(format!("{status} to sign-in"));
        }
        return Ok(status.to_string());
    }
    if head && resp.body.is_empty() {
        return Ok(format!("{status} HEAD"));
    }
    // hyper's refusal of a header block over its HTTP/2 limit (16 KiB), before any route.
    if status == 431 && resp.body.is_empty() {
        return Ok("431 transport".into());
    }
    // A path no route matches (an id that is empty or holds a `/`): the server's JSON fallback.
    let no_route = status == 404
        && json.as_ref().is_some_and(|j| {
            j["error"] == "not_found" && j["error_description"] == "no such endpoint"
        });
    if no_route && !matches!(r.shape, Shape::Admin | Shape::Proxy) {
        return Ok("404 no such route".into());
    }
    // The router's own 405 (a method the route does not take): empty, with `Allow`.
    let router_405 = status == 405 && resp.headers.contains_key("allow") && resp.body.is_empty();
    let code = match r.shape {
        Shape::OAuth | Shape::Proxy => {
            if router_405 && r.shape == Shape::OAuth {
                return Ok("405".into());
            }
            if r.shape == Shape::Proxy && !resp.headers.contains_key("latchkey-error") {
                // The provider's own answer, passed through.
                return Ok(format!("{status} upstream"));
            }
            if ct != "application/json" {
                return bad("not application/json");
            }
            match json.as_ref().and_then(|j| j["error"].as_str()) {
                Some(c) => c.to_owned(),
                None => return bad("no error code"),
            }
        }
        Shape::MyAccount | Shape::Admin => {
            if router_405 && r.shape == Shape::MyAccount {
                return Ok("405".into());
            }
            let want = if r.shape == Shape::Admin {
                "application/problem+json"
            } else {
                "application/json"
            };
            if ct != want {
                return bad("not a problem");
            }
            match json.as_ref() {
                Some(j) if j["status"] == status && j["title"].is_string() => {
                    j["title"].as_str().unwrap().to_owned()
                }
                _ => return bad("not a problem"),
            }
        }
        Shape::Html => {
            if router_405 {
                return Ok("405".into());
            }
            if !ct.starts_with("text/html") {
                return bad("not an HTML page");
            }
            status.to_string()
        }
        Shape::Mcp => match json.as_ref() {
            Some(j) if j["error"].is_string() => {
                if ct != "application/json" {
                    return bad("not application/json");
                }
                j["error"].as_str().unwrap().to_owned()
            }
            Some(j) if j["error"]["code"].is_i64() => j["error"]["code"].to_string(),
            _ => status.to_string(),
        },
        Shape::Plain => status.to_string(),
        Shape::DemoProvider => match json.as_ref().and_then(|j| j["error"].as_str()) {
            Some(c) => c.to_owned(),
            None => status.to_string(),
        },
    };
    if !r.codes.contains(&code.as_str()) {
        return Err(format!(
            "{status} with code {code:?}, not one of {:?}: {}",
            r.codes,
            cut(&text, 300)
        ));
    }
    Ok(format!("{status} {code}"))
}

// --- the world: two users, their accounts, approvals, agents and tokens -----------------------

/// What one user has, and the credentials to act as them.
struct Person {
    user_id: String,
    username: String,
    password: String,
    session: String,
    /// The dashboard's CSRF token of `session`.
    csrf: String,
    account: String,
    /// A My Account token with every Connected Accounts scope, and one with `read` only.
    my_account: String,
    my_account_read: String,
    /// An access and a refresh token of an app the user signed in to.
    access: String,
    refresh: String,
    /// A pending CIBA approval for this user, its `auth_req_id` and the client that asked.
    approval: String,
    auth_req_id: String,
}

struct World {
    ts: TestServer,
    clients: Vec<reqwest::Client>,
    alice: Person,
    bob: Person,
    /// An agent with an EdDSA key (cheap signatures) and a secret, granted like the demo agent.
    agent_id: String,
    agent_secret: String,
    agent_key: SigningKey,
    /// Bob's agent (a secret, no grant) and app.
    bob_agent: String,
    bob_agent_secret: String,
    app1: App,
    bob_app: App,
    /// The agent's token for the agent API.
    agent_token: String,
    operator_token: String,
    /// Rows the corpus may change or delete: users, agents, an account.
    victim_users: Vec<String>,
    victim_agents: Vec<String>,
    victim_account: String,
    /// A user with TOTP, its seed, and a pending sign-in (renewed between batches).
    totp_user: String,
    totp_seed: Vec<u8>,
    pending: Mutex<String>,
    /// A spare refresh token of alice's that `/oauth/revoke` may revoke.
    spare_refresh: String,
    /// An upstream access token and refresh token for the demo provider's own routes.
    upstream_access: String,
    upstream_refresh: String,
    /// A public key PEM for agent registration forms.
    public_pem: String,
    /// A stale connect flow: My Account `auth_session`, ticket, and callback state.
    auth_session: String,
    ticket: String,
    counter: std::sync::atomic::AtomicUsize,
}

/// A browser with its own cookies.
struct Browser<'a> {
    ts: &'a TestServer,
    jar: Mutex<HashMap<String, String>>,
}

impl<'a> Browser<'a> {
    fn new(ts: &'a TestServer) -> Self {
        Self {
            ts,
            jar: Mutex::new(HashMap::new()),
        }
    }
    fn cookie(&self, name: &str) -> Option<String> {
        self.jar.lock().unwrap().get(name).cloned()
    }
    async fn go(
        &self,
        method: Method,
        url: &str,
        form: Option<&[(&str, &str)]>,
    ) -> (u16, String, String) {
        let url = if url.starts_with("http") {
            url.to_owned()
        } else {
            self.ts.url(url)
        };
        let cookies: Vec<String> = self
            .jar
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut rb = self
            .ts
            .http
            .request(method, &url)
            .header("cookie", cookies.join("; "));
        if let Some(f) = form {
            rb = rb.form(f);
        }
        let resp = rb.send().await.unwrap();
        {
            let mut jar = self.jar.lock().unwrap();
            for v in resp.headers().get_all("set-cookie") {
                let v = v.to_str().unwrap();
                let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
                let (k, val) = pair.split_once('=').unwrap();
                if attrs.contains("Max-Age=0") {
                    jar.remove(k);
                } else {
                    jar.insert(k.to_owned(), val.to_owned());
                }
            }
        }
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, location, resp.text().await.unwrap())
    }

    async fn sign_in(&self, username: &str, password: &str) -> u16 {
        let (_, _, page) = self.go(Method::GET, "/login", None).await;
        let csrf = hidden_field(&page, "csrf");
        let (status, _, _) = self
            .go(
                Method::POST,
                "/login",
                Some(&[
                    ("username", username),
                    ("password", password),
                    ("csrf", &csrf),
                    ("next", "/ui"),
                ]),
            )
            .await;
        status
    }

    /// Connect `demo-git` through the provider's consent page.
    async fn connect(&self) {
        let (status, to, _) = self.go(Method::GET, "/connect/demo-git", None).await;
        assert_eq!(status, 303);
        let (status, _, page) = self.go(Method::GET, &to, None).await;
        assert_eq!(status, 200);
        let consent = hidden_field(&page, "consent");
        let (status, callback, _) = self
            .go(
                Method::POST,
                "/demo/oauth/authorize",
                Some(&[("consent", &consent), ("decision", "approve")]),
            )
            .await;
        assert_eq!(status, 302);
        let (status, _, body) = self.go(Method::GET, &callback, None).await;
        assert_eq!(status, 303, "{body}");
    }

    /// Sign in to `app` (already signed in to Latchkey): its tokens.
    async fn app_tokens(&self, app: &App) -> (String, String) {
        let p = pkce();
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("response_type", "code")
            .append_pair("client_id", &app.id)
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("scope", "openid offline_access")
            .append_pair("state", "s")
            .append_pair("code_challenge", &p.challenge)
            .append_pair("code_challenge_method", "S256");
        let (status, to, body) = self
            .go(Method::GET, &format!("/authorize?{}", q.finish()), None)
            .await;
        assert_eq!(status, 302, "{body}");
        let code = url::Url::parse(&to)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "code")
            .unwrap()
            .1
            .into_owned();
        let a = code_grant(self.ts, app, &code, &p.verifier).await;
        (
            a.token().to_owned(),
            a.body["refresh_token"].as_str().unwrap().to_owned(),
        )
    }
}

const ALL_ME: &str =
    "create:me:connected_accounts read:me:connected_accounts delete:me:connected_accounts";

fn csrf_of(session: &str) -> String {
    latchkey_crypto::secrets::sha256_b64(format!("latchkey-ui-csrf\0{session}").as_bytes())
}

async fn my_account_token(ts: &TestServer, app: &App, refresh: &str, scope: &str) -> String {
    let me = format!("{}me/", ts.issuer);
    token(
        ts,
        app,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh),
            ("audience", &me),
            ("scope", scope),
        ],
    )
    .await
    .token()
    .to_owned()
}

async fn ciba(ts: &TestServer, client: &str, secret: &str, user: &str) -> String {
    let hint = format!(
        "{{\"format\":\"iss_sub\",\"iss\":\"{}\",\"sub\":\"{user}\"}}",
        ts.issuer
    );
    let resp = ts
        .http
        .post(ts.url("/bc-authorize"))
        .form(&[
            ("client_id", client),
            ("client_secret", secret),
            ("scope", "openid"),
            ("login_hint", &hint),
            ("binding_message", "corpus"),
        ])
        .send()
        .await
        .unwrap();
    let a = Answer::read(resp).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["auth_req_id"].as_str().unwrap().to_owned()
}

impl World {
    async fn new() -> Self {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let config = Config {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".into(),
            agent_requests_per_minute: 0,
            approvals_pending_per_user: 1_000_000,
            approvals_pending_per_agent: 1_000_000,
            ..Config::default()
        };
        let ts = TestServer::start_with(dir, config).await;
        let actor = Actor::cli();
        let ca = std::fs::read(&ts.ca_path).unwrap();
        // HTTP/1.1 and HTTP/2 (ALPN) clients: their header limits differ.
        let clients = (0..5)
            .map(|i| {
                let b = reqwest::Client::builder()
                    .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
                    .redirect(reqwest::redirect::Policy::none());
                if i < 2 { b.http1_only() } else { b }.build().unwrap()
            })
            .collect();

        // The corpus agent: an EdDSA key and a secret, granted as the demo agent is.
        let key = keygen::generate(Algorithm::EdDSA);
        let agent_key = SigningKey::from_pem(&key.private_pem, Algorithm::EdDSA, None).unwrap();
        let public = PublicKey::parse(&key.public_pem, Some(Algorithm::EdDSA), None).unwrap();
        let (agent, secret) = ts
            .vault
            .add_agent("corpus-agent", &[public], true, &actor)
            .await
            .unwrap();
        ts.vault
            .grant(
                &agent.id,
                "demo-git",
                Scopes::parse("read:user repo:read issues:write"),
                vec![],
                &actor,
            )
            .await
            .unwrap();
        let agent_secret = secret.unwrap().expose_secret().to_owned();
        let (bob_agent, bob_secret) = ts
            .vault
            .add_agent("bob-agent", &[], true, &actor)
            .await
            .unwrap();
        let bob_agent_secret = bob_secret.unwrap().expose_secret().to_owned();

        let app1 = app(&ts, "corpus-app", confidential()).await;
        let bob_app = app(&ts, "bob-app", confidential()).await;

        // Alice is the demo user (an operator); Bob a plain user.
        let bob_password = "bob-password-long-enough";
        let bob_user = ts
            .vault
            .add_user("bob", Some(bob_password), Role::User, &actor)
            .await
            .unwrap();
        let mut people = Vec::new();
        for (username, password, user_id, the_app) in [
            (
                ts.info.username.clone(),
                ts.info.password.clone(),
                ts.info.user_id.clone(),
                &app1,
            ),
            (
                "bob".to_owned(),
                bob_password.to_owned(),
                bob_user.id.clone(),
                &bob_app,
            ),
        ] {
            let b = Browser::new(&ts);
            assert_eq!(b.sign_in(&username, &password).await, 303);
            b.connect().await;
            let account = ts
                .vault
                .store()
                .list_accounts(Some(&user_id))
                .await
                .unwrap()
                .last()
                .unwrap()
                .id
                .clone();
            let (access, refresh) = b.app_tokens(the_app).await;
            let my_account = my_account_token(&ts, the_app, &refresh, ALL_ME).await;
            let my_account_read =
                my_account_token(&ts, the_app, &refresh, "read:me:connected_accounts").await;
            let (client, secret) = if username == "bob" {
                (&bob_agent.id, &bob_agent_secret)
            } else {
                (&agent.id, &agent_secret)
            };
            let auth_req_id = ciba(&ts, client, secret, &user_id).await;
            let approval = ts
                .vault
                .user_approvals(&user_id, Some(ApprovalStatus::Pending), 10)
                .await
                .unwrap()
                .last()
                .unwrap()
                .id
                .clone();
            let session = b.cookie("latchkey_session").unwrap();
            people.push(Person {
                user_id,
                username,
                password,
                csrf: csrf_of(&session),
                session,
                account,
                my_account,
                my_account_read,
                access,
                refresh,
                approval,
                auth_req_id,
            });
        }
        let bob = people.pop().unwrap();
        let alice = people.pop().unwrap();
        let alice_browser = Browser::new(&ts);
        alice_browser
            .sign_in(&alice.username, &alice.password)
            .await;
        let (_, spare_refresh) = alice_browser.app_tokens(&app1).await;

        // Victims: rows the corpus may change or delete.
        let mut victim_users = Vec::new();
        for i in 0..3 {
            let u = ts
                .vault
                .add_user(&format!("victim{i}"), None, Role::User, &actor)
                .await
                .unwrap();
            victim_users.push(u.id);
        }
        let mut victim_agents = Vec::new();
        for i in 0..3 {
            let (a, _) = ts
                .vault
                .add_agent(&format!("victim-agent{i}"), &[], true, &actor)
                .await
                .unwrap();
            ts.vault
                .grant(
                    &a.id,
                    "demo-git",
                    Scopes::parse("read:user"),
                    vec![],
                    &actor,
                )
                .await
                .unwrap();
            victim_agents.push(a.id);
        }
        let victim_password = "victim-password-long";
        ts.vault
            .add_user(
                "victim-connected",
                Some(victim_password),
                Role::User,
                &actor,
            )
            .await
            .unwrap();
        let vb = Browser::new(&ts);
        vb.sign_in("victim-connected", victim_password).await;
        vb.connect().await;
        let victim_user = ts.vault.find_user("victim-connected").await.unwrap();
        let victim_account = ts
            .vault
            .store()
            .list_accounts(Some(&victim_user.id))
            .await
            .unwrap()[0]
            .id
            .clone();

        // A user with TOTP, for the second sign-in step.
        let totp_password = "carol-password-long";
        ts.vault
            .add_user("carol", Some(totp_password), Role::User, &actor)
            .await
            .unwrap();
        let uri = ts.vault.totp_enrol("carol", &actor).await.unwrap();
        let secret = uri
            .split("secret=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        let totp_seed = crate::login::base32_decode(secret);
        ts.vault
            .totp_confirm(
                "carol",
                &latchkey_crypto::totp::code_at(&totp_seed, ts.now()),
                &actor,
            )
            .await
            .unwrap();

        let (_, operator) = ts.vault.add_operator_token("corpus", &actor).await.unwrap();

        // The agent's own token for the agent API (client secret: no signature needed).
        let resp = ts
            .http
            .post(ts.url("/oauth/token"))
            .basic_auth(&agent.id, Some(&agent_secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("resource", &ts.url("/mcp")),
            ])
            .send()
            .await
            .unwrap();
        let agent_token = Answer::read(resp).await.token().to_owned();

        let upstream = ts.post_form(&ts.exchange_params()).await;
        let upstream_access = upstream.token().to_owned();
        let upstream_refresh = ts.stored_refresh_token(&alice.account).await;

        // A connect flow started and left: its auth_session and ticket are stale material.
        let start = json!({
            "connection": "demo-git", "redirect_uri": REDIRECT, "state": "s",
            "code_challenge": pkce().challenge, "code_challenge_method": "S256",
        });
        let started: Value = ts
            .http
            .post(ts.url("/me/v1/connected-accounts/connect"))
            .bearer_auth(&alice.my_account)
            .json(&start)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let auth_session = started["auth_session"].as_str().unwrap().to_owned();
        let ticket = started["connect_params"]["ticket"]
            .as_str()
            .unwrap()
            .to_owned();

        let world = Self {
            clients,
            alice,
            bob,
            agent_id: agent.id,
            agent_secret,
            agent_key,
            bob_agent: bob_agent.id,
            bob_agent_secret,
            app1,
            bob_app,
            agent_token,
            operator_token: operator.expose_secret().to_owned(),
            victim_users,
            victim_agents,
            victim_account,
            totp_user: "carol".into(),
            totp_seed,
            pending: Mutex::new(String::new()),
            spare_refresh,
            upstream_access,
            upstream_refresh,
            public_pem: keygen::generate(Algorithm::EdDSA).public_pem,
            auth_session,
            ticket,
            counter: Default::default(),
            ts,
        };
        world.renew_pending().await;
        world
    }

    /// A fresh pending sign-in (password right, TOTP code owed) for the TOTP user.
    async fn renew_pending(&self) {
        let b = Browser::new(&self.ts);
        assert_eq!(b.sign_in(&self.totp_user, "carol-password-long").await, 303);
        *self.pending.lock().unwrap() = b.cookie("latchkey_session").unwrap();
    }

    fn unique(&self) -> usize {
        self.counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn subject_jwt(&self, overrides: Value) -> String {
        let now = self.ts.now();
        let base = json!({
            "iss": self.agent_id, "sub": self.alice.user_id, "aud": self.ts.issuer,
            "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string(),
            "audit_context": "adversarial corpus",
        });
        self.agent_key
            .sign(Some("token-vault-req+jwt"), &merge(base, overrides))
    }

    fn assertion(&self, overrides: Value) -> String {
        let now = self.ts.now();
        let id = &self.agent_id;
        let base = json!({"iss": id, "sub": id, "aud": self.ts.issuer, "iat": now, "exp": now + 60, "jti": uuid::Uuid::new_v4().to_string()});
        self.agent_key.sign(None, &merge(base, overrides))
    }

    fn session(&self, p: &Person) -> String {
        format!("latchkey_session={}", p.session)
    }

    fn basic(id: &str, secret: &str) -> String {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        )
    }

    /// The ids and credentials of the other user (and of nobody), for a route of `auth`.
    fn ctx(&self, auth: Auth) -> Ctx {
        let b = &self.bob;
        let mut ids = vec![
            b.account.clone(),
            b.approval.clone(),
            b.user_id.clone(),
            self.bob_agent.clone(),
            self.bob_app.id.clone(),
            "cac_0000000000000000000000".into(),
            "apr_nope".into(),
            "usr_nope".into(),
            "agt_nope".into(),
            "demo-git".into(),
            "nope".into(),
        ];
        ids.push(self.alice.account.clone());
        let other_auth = match auth {
            Auth::Session | Auth::OperatorSession | Auth::PendingSession => vec![
                ("cookie".into(), self.session(b)),
                (
                    "cookie".into(),
                    format!("latchkey_session={}", *self.pending.lock().unwrap()),
                ),
            ],
            Auth::UserToken => vec![
                ("authorization".into(), format!("Bearer {}", b.my_account)),
                ("authorization".into(), format!("Bearer {}", b.access)),
                (
                    "authorization".into(),
                    format!("Bearer {}", self.alice.my_account_read),
                ),
                (
                    "authorization".into(),
                    format!("Bearer {}", self.agent_token),
                ),
                (
                    "authorization".into(),
                    format!("Bearer {}", self.operator_token),
                ),
            ],
            Auth::ApiToken => vec![
                (
                    "authorization".into(),
                    format!("Bearer {}", self.agent_token),
                ),
                (
                    "authorization".into(),
                    format!("Bearer {}", self.alice.access),
                ),
                (
                    "authorization".into(),
                    "Bearer lkop_0000000000000000000000000000000000000000000".into(),
                ),
                ("cookie".into(), self.session(&self.alice)),
            ],
            Auth::Agent => vec![
                ("latchkey-user".into(), b.username.clone()),
                ("latchkey-user".into(), b.user_id.clone()),
                ("latchkey-user".into(), "victim-connected".into()),
                (
                    "authorization".into(),
                    format!("Bearer {}", self.alice.access),
                ),
                ("authorization".into(), format!("Bearer {}", b.access)),
                (
                    "authorization".into(),
                    format!("Bearer {}", self.operator_token),
                ),
            ],
            Auth::Client => vec![
                (
                    "authorization".into(),
                    Self::basic(&self.bob_agent, &self.bob_agent_secret),
                ),
                (
                    "authorization".into(),
                    Self::basic(&self.bob_app.id, &self.bob_app.secret),
                ),
                ("authorization".into(), Self::basic(&self.agent_id, "wrong")),
            ],
            Auth::Demo => vec![("authorization".into(), format!("Bearer {}", b.access))],
            Auth::Public => vec![("cookie".into(), self.session(b))],
        };
        Ctx {
            ids,
            other_auth,
            escalations: Vec::new(),
        }
    }
}

// --- running a route ------------------------------------------------------------------------

/// Requests per route: 10,000, ten times as many with `LATCHKEY_CORPUS_LONG=1`, or
/// `LATCHKEY_CORPUS_REQUESTS`.
fn per_route() -> usize {
    if let Some(n) = std::env::var("LATCHKEY_CORPUS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    match std::env::var("LATCHKEY_CORPUS_LONG").as_deref() {
        Ok("1") | Ok("true") => 100_000,
        _ => 10_000,
    }
}

fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        std::env::var("LATCHKEY_CORPUS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            // A fresh seed each run (printed with any failure, to repeat it).
            .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0)
    })
}

/// Requests in flight at once.
const IN_FLIGHT: usize = 16;
/// Requests between two calls of a route's `between` hook.
const BATCH: usize = 1000;

type Build = Box<dyn Fn(&World, &mut Gen) -> Req + Sync + Send>;

struct Spec {
    route: &'static Route,
    build: Build,
    ctx: Ctx,
    /// Requests sent unmutated, in percent.
    valid_percent: usize,
    /// Distinct refusals (status and code) this route must have answered.
    min_refusals: usize,
    /// Whether some request must succeed (a 2xx, or a redirect other than to sign-in).
    need_success: bool,
}

fn spec(
    w: &World,
    method: &str,
    path: &str,
    build: impl Fn(&World, &mut Gen) -> Req + Sync + Send + 'static,
) -> Spec {
    let route = route(method, path);
    Spec {
        route,
        build: Box::new(build),
        ctx: w.ctx(route.auth),
        valid_percent: 10,
        min_refusals: 2,
        need_success: true,
    }
}

impl Spec {
    fn refusals(mut self, n: usize) -> Self {
        self.min_refusals = n;
        self
    }
    fn no_success(mut self) -> Self {
        self.need_success = false;
        self
    }
    fn escalate(mut self, e: &[(&str, &str)]) -> Self {
        self.ctx
            .escalations
            .extend(e.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }
    fn others(mut self, auth: &[(&str, &str)]) -> Self {
        self.ctx.other_auth = auth
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }
    fn ids(mut self, keep: impl Fn(&str) -> bool) -> Self {
        self.ctx.ids.retain(|i| keep(i));
        self
    }
}

/// The statistics of one route's run.
#[derive(Default)]
struct Stats {
    kinds: BTreeMap<String, usize>,
    failures: Vec<String>,
    unsendable: usize,
    sent: usize,
}

enum Outcome {
    /// The client could not build it (an invalid header value, a URI over 64 KiB).
    Unsendable,
    /// Refused by the HTTP/2 layer closing the connection (a header block far over its limit).
    TransportRefused,
    Answer(Resp),
    Failed(String),
}

/// Requests whose header block (URI included) is this large, or with a body over 64 KiB,
/// go over HTTP/1.1 or over an HTTP/2 connection of their own: an HTTP/2 server answers a
/// header block far over its limit, or a run of refused streams, by closing the connection
/// (hyper's defences), which would take other requests in flight on it along.
const BIG_HEADERS: usize = 12 * 1024;

fn header_bytes(req: &Req) -> usize {
    let (url, _, _) = req.wire();
    url.len()
        + req
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

async fn send(w: &World, client: &reqwest::Client, req: &Req, own_h2: bool) -> Outcome {
    let (path, ct, body) = req.wire();
    let Ok(url) = reqwest::Url::parse(&format!("{}{}", w.ts.issuer.trim_end_matches('/'), path))
    else {
        return Outcome::Unsendable;
    };
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &req.headers {
        let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(k.as_bytes()),
            reqwest::header::HeaderValue::from_bytes(v),
        ) else {
            return Outcome::Unsendable;
        };
        headers.append(name, value);
    }
    if let Some(ct) = ct {
        let Ok(value) = reqwest::header::HeaderValue::from_str(&ct) else {
            return Outcome::Unsendable;
        };
        headers.insert(reqwest::header::CONTENT_TYPE, value);
    }
    let large = body.len() > 64 * 1024;
    let mut attempt = 0;
    let resp = loop {
        let result = client
            .request(req.method.clone(), url.clone())
            .headers(headers.clone())
            .body(body.clone())
            .timeout(Duration::from_secs(60))
            .send()
            .await;
        match result {
            Ok(r) => break r,
            // The client's own limits (a URI is at most 64 KiB): not sent.
            Err(e) if e.is_builder() => return Outcome::Unsendable,
            // A server may stop reading a body it refuses (413) and close the connection
            // before the client finishes writing it.
            Err(_) if large => return Outcome::Unsendable,
            Err(_) if own_h2 => return Outcome::TransportRefused,
            // A kept-alive connection the server closed (after refusing an earlier request on
            // it) just as this request went out: once more, on a fresh one.
            Err(_) if attempt == 0 => attempt += 1,
            Err(e) => return Outcome::Failed(format!("no answer: {}", error_chain(&e))),
        }
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    match resp.bytes().await {
        Ok(b) => Outcome::Answer(Resp {
            status,
            headers,
            body: b.to_vec(),
        }),
        // The server answered before reading a large body and closed the connection.
        Err(_) if large && status < 500 => Outcome::Unsendable,
        Err(e) => Outcome::Failed(format!("{status}, then the body broke off: {e}")),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}

/// One route's corpus: `n` requests, most of them mutated.
async fn run_route<F, Fut>(w: &World, index: usize, s: &Spec, n: usize, between: F) -> Stats
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let seed = seed();
    let stats = Mutex::new(Stats::default());
    let mut done = 0;
    while done < n {
        between().await;
        let batch = (n - done).min(BATCH);
        futures_util::stream::iter(done..done + batch)
            .for_each_concurrent(IN_FLIGHT, |i| {
                let stats = &stats;
                async move {
                    let mut g = Gen::new(seed, index, i);
                    let mut req = (s.build)(w, &mut g);
                    if !g.chance(s.valid_percent) {
                        let times = match g.below(10) {
                            0..=5 => 1,
                            6..=8 => 2,
                            _ => 3,
                        };
                        for _ in 0..times {
                            mutate(&mut req, &mut g, &s.ctx);
                        }
                    }
                    // Clients 0 and 1 speak HTTP/1.1, 2 and 3 HTTP/2; 4 is HTTP/2 for big
                    // header blocks alone.
                    let big = header_bytes(&req) > BIG_HEADERS
                        || req.body.as_ref().is_some_and(|b| b.len() > 64 * 1024);
                    let c = match (big, i % 2) {
                        (true, 0) => 0,
                        (true, _) => 4,
                        (false, _) => i % 4,
                    };
                    let outcome = send(w, &w.clients[c], &req, c == 4).await;
                    let mut st = stats.lock().unwrap();
                    st.sent += 1;
                    match outcome {
                        Outcome::Unsendable => st.unsendable += 1,
                        Outcome::TransportRefused => {
                            *st.kinds.entry("h2 connection refused".into()).or_default() += 1;
                        }
                        Outcome::Failed(e) => {
                            if st.failures.len() < 50 {
                                st.failures.push(format!("#{i}: {e}\n{}", req.describe()));
                            }
                        }
                        Outcome::Answer(resp) => {
                            match check(s.route, &resp, req.method == Method::HEAD) {
                                Ok(kind) => *st.kinds.entry(kind).or_default() += 1,
                                Err(e) => {
                                    if st.failures.len() < 50 {
                                        st.failures.push(format!("#{i}: {e}\n{}", req.describe()));
                                    }
                                }
                            }
                        }
                    }
                }
            })
            .await;
        done += batch;
    }
    stats.into_inner().unwrap()
}

/// Run each spec's corpus; fail with every problem found (and the seed to repeat it).
async fn run_all(w: &World, specs: &[Spec]) -> BTreeMap<String, BTreeMap<String, usize>> {
    run_all_with(w, specs, || async {}).await
}

async fn run_all_with<F, Fut>(
    w: &World,
    specs: &[Spec],
    between: F,
) -> BTreeMap<String, BTreeMap<String, usize>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let n = per_route();
    let started = Instant::now();
    let mut problems = Vec::new();
    let mut all = BTreeMap::new();
    for s in specs {
        let index = ROUTES
            .iter()
            .position(|r| std::ptr::eq(r, s.route))
            .unwrap();
        let t = Instant::now();
        let stats = run_route(w, index, s, n, &between).await;
        let label = format!("{} {}", s.route.method, s.route.path);
        println!(
            "{label}: {} requests ({} unsendable) in {:.1}s: {:?}",
            stats.sent,
            stats.unsendable,
            t.elapsed().as_secs_f64(),
            stats.kinds
        );
        for f in &stats.failures {
            problems.push(format!("{label} {f}"));
        }
        let answered: usize = stats.kinds.values().sum();
        // Reached the handler: at least one success and several distinct refusals.
        // A success: a 2xx, a redirect other than to sign-in, a provider's own answer.
        let successes: usize = stats
            .kinds
            .iter()
            .filter(|(k, _)| {
                (k.starts_with(['1', '2', '3']) && !k.contains("sign-in")) || k.contains("upstream")
            })
            .map(|(_, n)| n)
            .sum();
        // A refusal by the server itself (not by the transport, not a bare HEAD).
        let refusals = stats
            .kinds
            .keys()
            .filter(|k| {
                (k.starts_with('4')
                    && !k.contains("transport")
                    && !k.contains("HEAD")
                    && !k.contains("upstream"))
                    || k.contains("sign-in")
            })
            .count();
        if successes == 0 && s.need_success {
            problems.push(format!("{label}: no request succeeded: {:?}", stats.kinds));
        }
        if refusals < s.min_refusals {
            problems.push(format!(
                "{label}: only {refusals} kinds of refusal: {:?}",
                stats.kinds
            ));
        }
        if answered + stats.unsendable + stats.failures.len() < n || answered < n * 9 / 10 {
            problems.push(format!(
                "{label}: {answered} of {n} requests answered ({} unsendable)",
                stats.unsendable
            ));
        }
        all.insert(label, stats.kinds);
    }
    println!(
        "seed {}: {} routes × {n} requests in {:.1}s",
        seed(),
        specs.len(),
        started.elapsed().as_secs_f64()
    );
    // The requests reached the routes' templates (not the fallback): the server's own count.
    let metrics =
        w.ts.http
            .get(w.ts.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    for s in specs {
        let needle = format!("route=\"{}\"", s.route.path);
        let matched: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("latchkey_http_requests_total{") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum();
        if matched < (n as u64) / 2 {
            problems.push(format!(
                "{} {}: only {matched} requests matched its route",
                s.route.method, s.route.path
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "seed {} (LATCHKEY_CORPUS_SEED={} repeats this run): {} problems:\n{}",
        seed(),
        seed(),
        problems.len(),
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    all
}

/// What must hold after any corpus: the other user's rows untouched, the audit chain intact.
async fn assert_intact(w: &World) {
    let store = w.ts.vault.store();
    let account = store.account_by_id(&w.bob.account).await.unwrap().unwrap();
    assert_eq!(
        account.status.as_str(),
        "active",
        "bob's account was changed"
    );
    let approval = store.approval(&w.bob.approval).await.unwrap().unwrap();
    assert_eq!(
        approval.status,
        ApprovalStatus::Pending,
        "bob's approval was decided"
    );
    assert!(
        store.user_by_id(&w.bob.user_id).await.unwrap().is_some(),
        "bob was deleted"
    );
    // Bob's refresh token still works at his app (no revocation through someone else's).
    let a = token(
        &w.ts,
        &w.bob_app,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &w.bob.refresh),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "bob's refresh token: {:?}", a.body);
    let out = w.ts.cli(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- the corpus, one test per surface ---------------------------------------------------------

/// JWT claims an attacker would change: audience, lifetime, issuer, subject, replay.
fn claim_mutation(w: &World, g: &mut Gen) -> (String, Value) {
    let now = w.ts.now();
    let options = [
        ("aud elsewhere", json!({"aud": "https://evil.example/"})),
        (
            "aud list",
            json!({"aud": [w.ts.issuer, "https://evil.example/"]}),
        ),
        ("expired", json!({"exp": now - 10})),
        ("far exp", json!({"exp": now + 10_000_000})),
        ("future iat", json!({"iat": now + 3600})),
        ("nbf ahead", json!({"nbf": now + 3600})),
        ("no exp", json!({"exp": null})),
        ("no jti", json!({"jti": null})),
        ("reused jti", json!({"jti": "corpus-fixed-jti"})),
        ("iss bob's agent", json!({"iss": w.bob_agent})),
        ("sub bob", json!({"sub": w.bob.user_id})),
        ("sub nobody", json!({"sub": "usr_nope"})),
        ("sub number", json!({"sub": 12})),
        ("iss missing", json!({"iss": null})),
    ];
    let (label, v) = g.pick(&options);
    ((*label).to_owned(), v.clone())
}

fn form_or_json(g: &mut Gen) -> Loc {
    if g.chance(30) { Loc::Json } else { Loc::Form }
}

/// A token request: exchanges (private_key_jwt or secret), client credentials, refresh, CIBA
/// polling and a stale authorization code.
fn token_request(w: &World, g: &mut Gen) -> Req {
    let r = Req::new("POST", "/oauth/token", form_or_json(g));
    let exchange = |r: Req, g: &mut Gen| {
        let (label, claims) = if g.chance(15) {
            claim_mutation(w, g)
        } else {
            (String::new(), json!({}))
        };
        let mut r = r
            .p("grant_type", GRANT)
            .p("subject_token_type", JWT_TYPE)
            .p("subject_token", w.subject_jwt(claims))
            .p("requested_token_type", VAULT_TOKEN_TYPE)
            .p("connection", "demo-git");
        if g.chance(30) {
            r = r.p("scope", "repo:read");
        }
        if !label.is_empty() {
            r.mutations.push(format!("subject {label}"));
        }
        r
    };
    match g.below(8) {
        0 | 1 => {
            let (label, claims) = if g.chance(15) {
                claim_mutation(w, g)
            } else {
                (String::new(), json!({}))
            };
            let mut r = exchange(
                r.p("client_id", w.agent_id.as_str())
                    .p("client_assertion_type", JWT_BEARER)
                    .p("client_assertion", w.assertion(claims)),
                g,
            );
            if !label.is_empty() {
                r.mutations.push(format!("assertion {label}"));
            }
            r
        }
        2 | 3 => exchange(
            r.p("client_id", w.agent_id.as_str())
                .p("client_secret", w.agent_secret.as_str()),
            g,
        ),
        4 => r
            .h("authorization", &World::basic(&w.agent_id, &w.agent_secret))
            .p("grant_type", "client_credentials")
            .p("resource", w.ts.url("/mcp")),
        5 => r
            .h("authorization", &World::basic(&w.app1.id, &w.app1.secret))
            .p("grant_type", "refresh_token")
            .p("refresh_token", w.alice.refresh.as_str()),
        6 => r
            .p("grant_type", crate::approvals::CIBA)
            .p("client_id", w.agent_id.as_str())
            .p("client_secret", w.agent_secret.as_str())
            .p("auth_req_id", w.alice.auth_req_id.as_str()),
        _ => r
            .h("authorization", &World::basic(&w.app1.id, &w.app1.secret))
            .p("grant_type", "authorization_code")
            .p("code", "lkcode_stale0000000000000000000000000")
            .p("redirect_uri", REDIRECT)
            .p("code_verifier", pkce().verifier),
    }
}

/// The other user's and the unknown: a refresh token of Bob's app, a broader scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_oauth() {
    let w = World::new().await;
    let releases = w.ts.releases().await;
    let specs =
        vec![
        spec(&w, "POST", "/oauth/token", token_request).escalate(&[
            ("scope", "repo:read repo:admin"),
            ("scope", "read:user repo:read issues:write admin:org"),
            (
                "scope",
                "openid offline_access create:me:connected_accounts",
            ),
            ("connection", "other-connection"),
            ("audience", "https://evil.example/"),
            ("resource", "https://evil.example/mcp"),
            ("auth_req_id", &w.bob.auth_req_id),
            ("refresh_token", &w.bob.refresh),
            ("client_id", &w.bob_agent),
        ]),
        // Before /oauth/revoke, which may revoke the access token they present.
        spec(&w, "GET", "/userinfo", |w, _| {
            Req::new("GET", "/userinfo", Loc::Query).bearer(&w.alice.access)
        }),
        spec(&w, "POST", "/userinfo", |w, g| {
            Req::new("POST", "/userinfo", form_or_json(g)).bearer(&w.alice.access)
        }),
        spec(&w, "POST", "/oauth/revoke", |w, g| {
            let token = match g.below(3) {
                0 => w.spare_refresh.clone(),
                1 => w.alice.access.clone(),
                _ => g.draw("lkrt_[A-Za-z0-9]{20,43}"),
            };
            let mut r = Req::new("POST", "/oauth/revoke", form_or_json(g))
                .h("authorization", &World::basic(&w.app1.id, &w.app1.secret))
                .p("token", token);
            if g.chance(50) {
                r = r.p(
                    "token_type_hint",
                    *g.pick(&["refresh_token", "access_token"]),
                );
            }
            r
        })
        .escalate(&[("token", &w.bob.refresh), ("token", &w.bob.access)])
        // Not Bob's app's own credentials: with them, revoking Bob's token is its right (and
        // `assert_intact` checks it was not revoked by anyone else).
        .others(&[
            ("authorization", &World::basic(&w.bob_agent, &w.bob_agent_secret)),
            ("authorization", &World::basic(&w.bob_app.id, "wrong-secret")),
            ("authorization", &World::basic(&w.agent_id, &w.agent_secret)),
        ]),
        spec(&w, "POST", "/bc-authorize", |w, g| {
            let hint = format!(
                "{{\"format\":\"iss_sub\",\"iss\":\"{}\",\"sub\":\"{}\"}}",
                w.ts.issuer, w.alice.user_id
            );
            Req::new("POST", "/bc-authorize", form_or_json(g))
                .p("client_id", w.agent_id.as_str())
                .p("client_secret", w.agent_secret.as_str())
                .p("scope", "openid")
                .p("login_hint", hint)
                .p("binding_message", format!("corpus {}", w.unique()))
        })
        .escalate(&[
            ("scope", "openid admin"),
            ("requested_expiry", "999999999"),
            (
                "authorization_details",
                "[{\"type\":\"x\",\"actions\":[\"*\"]}]",
            ),
            ("audience", "https://evil.example/"),
            (
                "login_hint",
                "{\"format\":\"iss_sub\",\"iss\":\"https://evil.example/\",\"sub\":\"usr_nope\"}",
            ),
        ]),
    ];
    let kinds = run_all(&w, &specs).await;
    // Upstream tokens left the vault only for the 200 answers that carried one — and at most
    // for the token requests whose answer was lost when their HTTP/2 connection was torn
    // down (big header blocks share one connection; one over the limit ends it, possibly
    // under a valid exchange the server had already answered).
    let answered: usize = kinds.values().filter_map(|k| k.get("200 release")).sum();
    let lost = kinds["POST /oauth/token"]
        .get("h2 connection refused")
        .copied()
        .unwrap_or(0);
    assert!(answered > 0);
    let audited = w.ts.releases().await - releases;
    assert!(
        (answered..=answered + lost).contains(&audited),
        "token releases: {audited} audited, {answered} answered, {lost} answers lost"
    );
    assert_intact(&w).await;
    w.ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_my_account() {
    let w = World::new().await;
    let me = |w: &World| w.alice.my_account.clone();
    let specs = vec![
        spec(
            &w,
            "POST",
            "/me/v1/connected-accounts/connect",
            move |w, g| {
                let mut r = Req::new("POST", "/me/v1/connected-accounts/connect", Loc::Json)
                    .bearer(&me(w))
                    .p("connection", "demo-git")
                    .p("redirect_uri", REDIRECT)
                    .p("state", format!("s{}", w.unique()))
                    .p("code_challenge", pkce().challenge)
                    .p("code_challenge_method", "S256");
                if g.chance(50) {
                    r = r.p("scopes", json!(["repo:read", "read:user"]));
                }
                if g.chance(30) {
                    r = r.p("authorization_params", json!({"prompt": "consent"}));
                }
                r
            },
        )
        .escalate(&[
            ("scopes", "[\"repo:admin\", \"admin:org\"]"),
            ("scopes", "\"repo:read\""),
            ("connection", "other-connection"),
            ("redirect_uri", "https://evil.example/callback"),
            (
                "authorization_params",
                "{\"redirect_uri\": \"https://evil.example/\"}",
            ),
        ]),
        spec(
            &w,
            "POST",
            "/me/v1/connected-accounts/complete",
            move |w, _| {
                Req::new("POST", "/me/v1/connected-accounts/complete", Loc::Json)
                    .bearer(&me(w))
                    .p("auth_session", w.auth_session.as_str())
                    .p("connect_code", "stale-connect-code")
                    .p("redirect_uri", REDIRECT)
                    .p("code_verifier", pkce().verifier)
            },
        )
        .no_success(),
        spec(
            &w,
            "GET",
            "/me/v1/connected-accounts/accounts",
            move |w, g| {
                let mut r = Req::new("GET", "/me/v1/connected-accounts/accounts", Loc::Query)
                    .bearer(&me(w));
                if g.chance(40) {
                    r = r.p("take", g.draw(1u32..=20).to_string());
                }
                if g.chance(30) {
                    r = r.p("connection", "demo-git");
                }
                if g.chance(20) {
                    r = r.p("from", "0");
                }
                r
            },
        ),
        spec(
            &w,
            "DELETE",
            "/me/v1/connected-accounts/accounts/{id}",
            move |w, _| {
                Req::new(
                    "DELETE",
                    "/me/v1/connected-accounts/accounts/{id}",
                    Loc::Query,
                )
                .bearer(&me(w))
                .id(&w.alice.account)
            },
        ),
        spec(
            &w,
            "GET",
            "/me/v1/connected-accounts/connections",
            move |w, g| {
                let mut r = Req::new("GET", "/me/v1/connected-accounts/connections", Loc::Query)
                    .bearer(&me(w));
                if g.chance(40) {
                    r = r.p("take", g.draw(1u32..=20).to_string());
                }
                r
            },
        ),
    ];
    run_all(&w, &specs).await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

/// A browser's request signed in as Alice.
fn browser(w: &World, method: &str, path: &'static str, loc: Loc) -> Req {
    Req::new(method, path, loc).h("cookie", &w.session(&w.alice))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_browser() {
    let w = World::new().await;
    let specs = vec![
        spec(&w, "GET", "/authorize", |w, g| {
            let p = pkce();
            let mut r = browser(w, "GET", "/authorize", Loc::Query)
                .p("response_type", "code")
                .p("client_id", w.app1.id.as_str())
                .p("redirect_uri", REDIRECT)
                .p("scope", "openid offline_access")
                .p("state", "st4te")
                .p("code_challenge", p.challenge)
                .p("code_challenge_method", "S256");
            if g.chance(30) {
                r = r.p("nonce", "n0nce");
            }
            r
        })
        .escalate(&[
            ("scope", "openid offline_access admin"),
            ("redirect_uri", "https://evil.example/callback"),
            ("client_id", &w.bob_app.id),
            ("connection", "demo-git"),
            ("connection_scope", "repo:admin"),
            ("prompt", "none"),
            ("response_mode", "fragment"),
            (
                "acr_values",
                "http://schemas.openid.net/pape/policies/2007/06/multi-factor",
            ),
        ]),
        spec(&w, "GET", "/connected-accounts/connect", |w, _| {
            browser(w, "GET", "/connected-accounts/connect", Loc::Query)
                .p("ticket", w.ticket.as_str())
        })
        .no_success(),
        spec(&w, "GET", "/connect/{connection}", |w, _| {
            browser(w, "GET", "/connect/{connection}", Loc::Query).id("demo-git")
        }),
        spec(&w, "GET", "/connect/{connection}/callback", |w, g| {
            let r = browser(w, "GET", "/connect/{connection}/callback", Loc::Query).id("demo-git");
            if g.chance(20) {
                r.p("error", "access_denied").p("error_description", "no")
            } else {
                r.p("code", "lkdemo_stale")
                    .p("state", "stale-state")
                    .p("iss", w.ts.url("/demo/"))
            }
        })
        .no_success(),
        spec(&w, "GET", "/approvals", |w, _| {
            browser(w, "GET", "/approvals", Loc::Query)
        })
        .refusals(1),
        spec(&w, "GET", "/approvals/{id}", |w, _| {
            browser(w, "GET", "/approvals/{id}", Loc::Query).id(&w.alice.approval)
        })
        .refusals(1),
        spec(&w, "GET", "/", |w, _| browser(w, "GET", "/", Loc::Query)).refusals(1),
        spec(&w, "GET", "/account", |w, _| {
            browser(w, "GET", "/account", Loc::Query)
        })
        .refusals(1),
        spec(&w, "GET", "/login", |_, g| {
            let mut r = Req::new("GET", "/login", Loc::Query);
            if g.chance(50) {
                r = r.p("next", "/ui/accounts");
            }
            r
        })
        .refusals(2),
        spec(&w, "GET", "/login/totp", |w, _| {
            let pending = w.pending.lock().unwrap().clone();
            Req::new("GET", "/login/totp", Loc::Query)
                .cookies(&[("latchkey_session", &pending)])
                .p("next", "/ui")
        })
        .refusals(2),
        // Last, and with no other caller's cookie: signing out ends the session it names.
        // Signing out always ends at the sign-in page.
        spec(&w, "POST", "/logout", |_, g| {
            let bogus = g.draw("[A-Za-z0-9_-]{32}");
            Req::new("POST", "/logout", Loc::Form).cookies(&[("latchkey_session", &bogus)])
        })
        .refusals(1)
        .no_success()
        .others(&[]),
    ];
    run_all(&w, &specs).await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

/// Sign-in forms: the throttle has no setting, so the server's clock moves 16 minutes between
/// batches (and the TOTP user signs in again, for a fresh pending session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_sign_in() {
    let w = World::new().await;
    const CSRF: &str = "corpus-csrf-token-0123456789";
    let specs = vec![
        spec(&w, "POST", "/login", |w, g| {
            let r = Req::new("POST", "/login", Loc::Form).cookies(&[("latchkey_csrf", CSRF)]);
            let (user, password) = match g.below(4) {
                0 => ("bob".to_owned(), w.bob.password.clone()),
                1 => (w.alice.username.clone(), "wrong-password".to_owned()),
                _ => (w.alice.username.clone(), w.alice.password.clone()),
            };
            r.p("username", user)
                .p("password", password)
                .p("csrf", CSRF)
                .p("next", "/ui/accounts")
        })
        .escalate(&[
            ("next", "https://evil.example/"),
            ("next", "//evil.example/"),
            ("next", "/\\evil.example"),
        ]),
        spec(&w, "POST", "/login/totp", |w, _| {
            let pending = w.pending.lock().unwrap().clone();
            Req::new("POST", "/login/totp", Loc::Form)
                .cookies(&[("latchkey_session", &pending), ("latchkey_csrf", CSRF)])
                .p(
                    "code",
                    latchkey_crypto::totp::code_at(&w.totp_seed, w.ts.now()),
                )
                .p("csrf", CSRF)
                .p("next", "/ui")
        })
        .escalate(&[("next", "https://evil.example/")]),
    ];
    let wr = &w;
    run_all_with(&w, &specs, move || async move {
        wr.ts.clock.advance(16 * 60);
        wr.renew_pending().await;
    })
    .await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

fn operator(w: &World, method: &str, path: &'static str) -> Req {
    Req::new(method, path, Loc::Query).bearer(&w.operator_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_admin_api() {
    let w = World::new().await;
    let mut specs = vec![
        spec(&w, "GET", "/api/v1/openapi.json", |_, _| {
            Req::new("GET", "/api/v1/openapi.json", Loc::Query)
        })
        .refusals(1),
        spec(&w, "GET", "/api/v1/accounts", |w, g| {
            let mut r = operator(w, "GET", "/api/v1/accounts");
            if g.chance(30) {
                r = r.p("user", w.alice.username.as_str());
            }
            if g.chance(30) {
                r = r.p("connection", "demo-git");
            }
            if g.chance(30) {
                r = r.p("status", *g.pick(&["active", "needs_reauth", "revoked"]));
            }
            r
        }),
        spec(&w, "GET", "/api/v1/accounts/{id}", |w, _| {
            operator(w, "GET", "/api/v1/accounts/{id}").id(&w.alice.account)
        }),
        spec(&w, "DELETE", "/api/v1/accounts/{id}", |w, _| {
            operator(w, "DELETE", "/api/v1/accounts/{id}").id(&w.victim_account)
        }),
        spec(&w, "GET", "/api/v1/users", |w, _| {
            operator(w, "GET", "/api/v1/users")
        }),
        spec(&w, "DELETE", "/api/v1/users/{user}", |w, g| {
            let u = g.pick(&w.victim_users).clone();
            operator(w, "DELETE", "/api/v1/users/{user}").id(&u)
        }),
        spec(&w, "GET", "/api/v1/connections", |w, _| {
            operator(w, "GET", "/api/v1/connections")
        }),
        spec(&w, "GET", "/api/v1/agents", |w, _| {
            operator(w, "GET", "/api/v1/agents")
        }),
        spec(&w, "POST", "/api/v1/agents/{id}/disable", |w, g| {
            let a = g.pick(&w.victim_agents).clone();
            operator(w, "POST", "/api/v1/agents/{id}/disable").id(&a)
        }),
        spec(&w, "POST", "/api/v1/agents/{id}/enable", |w, g| {
            let a = g.pick(&w.victim_agents).clone();
            operator(w, "POST", "/api/v1/agents/{id}/enable").id(&a)
        }),
        spec(
            &w,
            "DELETE",
            "/api/v1/agents/{id}/grants/{connection}",
            |w, g| {
                let a = g.pick(&w.victim_agents).clone();
                operator(w, "DELETE", "/api/v1/agents/{id}/grants/{connection}")
                    .id(&a)
                    .id("demo-git")
            },
        ),
        spec(&w, "GET", "/api/v1/audit", |w, g| {
            let mut r = operator(w, "GET", "/api/v1/audit");
            let options: [(&str, String); 8] = [
                ("user", w.alice.user_id.clone()),
                ("agent", w.agent_id.clone()),
                ("connection", "demo-git".into()),
                (
                    "action",
                    (*g.pick(&["token.*", "user.login", "account.*"])).into(),
                ),
                ("decision", (*g.pick(&["allow", "deny"])).into()),
                ("since", "2020-01-01T00:00:00Z".into()),
                ("until", "2100-01-01T00:00:00Z".into()),
                ("limit", g.draw(1u32..=500).to_string()),
            ];
            for (k, v) in options {
                if g.chance(20) {
                    r = r.p(k, v);
                }
            }
            r
        }),
    ];
    // The operator may change anyone's rows, on any route: a read's id swapped for Bob's and
    // its method turned into DELETE is a legitimate deletion. Bob's rows and app, which
    // `assert_intact` checks, stay out of every route's ids.
    let bobs = [
        w.bob.user_id.clone(),
        w.bob.account.clone(),
        w.bob_app.id.clone(),
        "bob".to_owned(),
    ];
    for s in &mut specs {
        s.ctx.ids.retain(|id| !bobs.contains(id));
    }
    run_all(&w, &specs).await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_dashboard_pages() {
    let w = World::new().await;
    let page =
        |path: &'static str| move |w: &World, _: &mut Gen| browser(w, "GET", path, Loc::Query);
    let specs = vec![
        spec(&w, "GET", "/ui", page("/ui")),
        spec(&w, "GET", "/ui/accounts", |w, g| {
            let mut r = browser(w, "GET", "/ui/accounts", Loc::Query);
            if g.chance(30) {
                r = r.p("connected", "demo-git");
            }
            if g.chance(20) {
                r = r.p("notice", "Done.").p("sig", "forged");
            }
            r
        }),
        spec(&w, "GET", "/ui/accounts/{id}/disconnect", |w, _| {
            browser(w, "GET", "/ui/accounts/{id}/disconnect", Loc::Query).id(&w.alice.account)
        }),
        spec(&w, "GET", "/ui/approvals", page("/ui/approvals")),
        spec(
            &w,
            "GET",
            "/ui/approvals/pending",
            page("/ui/approvals/pending"),
        ),
        spec(&w, "GET", "/ui/approvals/{id}", |w, _| {
            browser(w, "GET", "/ui/approvals/{id}", Loc::Query).id(&w.alice.approval)
        }),
        spec(&w, "GET", "/ui/activity", |w, g| {
            activity(w, g, "/ui/activity")
        }),
        spec(&w, "GET", "/ui/activity/export", |w, g| {
            activity(w, g, "/ui/activity/export")
        }),
        spec(&w, "GET", "/ui/security", page("/ui/security")),
        spec(&w, "GET", "/ui/agents", page("/ui/agents")),
        spec(&w, "GET", "/ui/agents/{id}", |w, g| {
            let mut r = browser(w, "GET", "/ui/agents/{id}", Loc::Query).id(&w.agent_id);
            if g.chance(30) {
                r = r.p("edit", "demo-git");
            }
            r
        }),
        spec(&w, "GET", "/ui/users", page("/ui/users")),
        spec(&w, "GET", "/ui/users/{id}/delete", |w, _| {
            browser(w, "GET", "/ui/users/{id}/delete", Loc::Query).id(&w.victim_users[0])
        }),
    ];
    run_all(&w, &specs).await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

fn activity(w: &World, g: &mut Gen, path: &'static str) -> Req {
    let mut r = browser(w, "GET", path, Loc::Query);
    let options: [(&str, String); 8] = [
        (
            "action",
            (*g.pick(&["token.release", "user.login", ""])).into(),
        ),
        ("agent", w.agent_id.clone()),
        ("connection", "demo-git".into()),
        ("decision", (*g.pick(&["allow", "deny"])).into()),
        ("from", "2020-01-01".into()),
        ("to", "2100-01-01".into()),
        ("user", w.bob.user_id.clone()),
        ("before", g.draw(1u32..1000).to_string()),
    ];
    for (k, v) in options {
        if g.chance(20) {
            r = r.p(k, v);
        }
    }
    r
}

/// A dashboard form signed in as Alice, with her session's CSRF token.
fn form(w: &World, path: &'static str) -> Req {
    browser(w, "POST", path, Loc::Form).p("csrf", w.alice.csrf.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_dashboard_forms() {
    let w = World::new().await;
    let specs = vec![
        spec(&w, "POST", "/ui/accounts/{id}/disconnect", |w, _| {
            form(w, "/ui/accounts/{id}/disconnect").id(&w.alice.account)
        }),
        spec(&w, "POST", "/ui/approvals/{id}", |w, g| {
            let mut r = form(w, "/ui/approvals/{id}")
                .id(&w.alice.approval)
                .p("decision", *g.pick(&["approve", "deny"]));
            if g.chance(30) {
                r = r.p("code", g.draw("[0-9]{6}"));
            }
            r
        }),
        spec(&w, "POST", "/ui/activity/verify", |w, _| {
            form(w, "/ui/activity/verify")
        }),
        spec(&w, "POST", "/ui/security/totp", |w, _| {
            form(w, "/ui/security/totp")
        }),
        spec(&w, "POST", "/ui/security/totp/confirm", |w, g| {
            form(w, "/ui/security/totp/confirm")
                .p("code", g.draw("[0-9]{6}"))
                .p("uri", "otpauth://totp/Latchkey:demo?secret=AAAA")
        })
        .no_success(),
    ];
    run_all(&w, &specs).await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

/// The operator's forms: agents and users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_operator_forms() {
    let w = World::new().await;
    let bob_id = w.bob.user_id.clone();
    let mut specs = vec![
        spec(&w, "POST", "/ui/agents", |w, g| {
            let mut r = form(w, "/ui/agents")
                // Mostly a name taken already: every registered agent lengthens the page.
                .p(
                    "name",
                    if g.chance(5) {
                        format!("corpus-registered-{}", w.unique())
                    } else {
                        "corpus-registered".to_owned()
                    },
                )
                .p("public_key", w.public_pem.as_str())
                .p("alg", "EdDSA");
            if g.chance(30) {
                r = r.p("secret", "on");
            }
            if g.chance(20) {
                // The same form as multipart, the key as an uploaded file.
                let b = "corpusboundary";
                let mut body = String::new();
                for (k, v) in &r.params {
                    let k = if k == "public_key" {
                        "public_key_file\"; filename=\"k.pem"
                    } else {
                        k
                    };
                    body.push_str(&format!(
                        "--{b}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{}\r\n",
                        text_of(v)
                    ));
                }
                body.push_str(&format!("--{b}--\r\n"));
                r.content_type = Some(Some(format!("multipart/form-data; boundary={b}")));
                r.body = Some(body.into_bytes());
            }
            r
        }),
        spec(&w, "POST", "/ui/agents/{id}/grants", |w, g| {
            let a = g.pick(&w.victim_agents).clone();
            let mut r = form(w, "/ui/agents/{id}/grants")
                .id(&a)
                .p("connection", "demo-git")
                .p("scopes", "read:user");
            let options: [(&str, &str); 6] = [
                ("risk", "read:user=high"),
                ("hours", "mon-fri 09:00-17:00 Europe/Berlin"),
                ("max_lifetime", "300"),
                ("per_minute", "10"),
                ("per_day", "100"),
                ("ips", "10.0.0.0/8, 127.0.0.1"),
            ];
            for (k, v) in options {
                if g.chance(20) {
                    r = r.p(k, v);
                }
            }
            r
        })
        .escalate(&[
            ("scopes", "read:user repo:admin"),
            ("connection", "other-connection"),
        ]),
        spec(
            &w,
            "POST",
            "/ui/agents/{id}/grants/{connection}/remove",
            |w, g| {
                let a = g.pick(&w.victim_agents).clone();
                form(w, "/ui/agents/{id}/grants/{connection}/remove")
                    .id(&a)
                    .id("demo-git")
            },
        ),
        spec(&w, "POST", "/ui/agents/{id}/state", |w, g| {
            let a = g.pick(&w.victim_agents).clone();
            form(w, "/ui/agents/{id}/state")
                .id(&a)
                .p("state", *g.pick(&["disabled", "enabled"]))
        }),
        spec(&w, "POST", "/ui/users", |w, g| {
            // A valid first password costs an Argon2 hash: most requests are one short.
            let password = if g.chance(3) {
                "corpus-password-long"
            } else {
                "short"
            };
            form(w, "/ui/users")
                .p("username", format!("corpus-user-{}", w.unique()))
                .p("password", password)
                .p("role", *g.pick(&["user", "operator"]))
        }),
        spec(&w, "POST", "/ui/users/{id}/role", |w, g| {
            let u = g.pick(&w.victim_users).clone();
            form(w, "/ui/users/{id}/role")
                .id(&u)
                .p("role", *g.pick(&["user", "operator"]))
        }),
        spec(&w, "POST", "/ui/users/{id}/delete", |w, g| {
            let u = g.pick(&w.victim_users).clone();
            form(w, "/ui/users/{id}/delete").id(&u)
        })
        .ids(move |id| id != bob_id),
    ];
    // An operator may disable any client: Bob's app, which `assert_intact` uses, is left out.
    for s in &mut specs {
        s.ctx.ids.retain(|id| *id != w.bob_app.id);
    }
    run_all(&w, &specs).await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

/// The agent API as the corpus agent acting for Alice.
fn agent(w: &World, method: &str, path: &'static str, loc: Loc) -> Req {
    Req::new(method, path, loc)
        .bearer(&w.agent_token)
        .h("latchkey-user", &w.alice.username)
}

fn mcp_call(w: &World, g: &mut Gen) -> Req {
    let (method, params) = match g.below(7) {
        0 => (
            "initialize",
            json!({"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "corpus", "version": "1"}}),
        ),
        1 => ("tools/list", json!({})),
        2 => (
            "tools/call",
            json!({"name": "list_connections", "arguments": {}}),
        ),
        3 => (
            "tools/call",
            json!({"name": "call_api", "arguments": {"connection": "demo-git", "method": "GET", "path": "/user"}}),
        ),
        4 => (
            "tools/call",
            json!({"name": "request_connection", "arguments": {"connection": "demo-git", "scopes": ["repo:read"]}}),
        ),
        5 => (
            "tools/call",
            json!({"name": "request_approval", "arguments": {"connection": "demo-git", "method": "POST", "path": "/repos/x/issues"}}),
        ),
        _ => (
            "tools/call",
            json!({"name": "get_access_token", "arguments": {"connection": "demo-git"}}),
        ),
    };
    agent(w, "POST", "/mcp", Loc::Json)
        .h("accept", "application/json, text/event-stream")
        .p("jsonrpc", "2.0")
        .p("id", w.unique() as u64)
        .p("method", method)
        .p("params", params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_agent_api() {
    let w = World::new().await;
    let scope = |s: &str| (format!("{ESCALATION_HEADER}latchkey-scope"), s.to_owned());
    let escalations: Vec<(String, String)> =
        vec![scope("repo:admin"), scope("read:user admin:org")];
    let mut specs = vec![
        spec(&w, "ANY", "/proxy/{connection}", |w, _| {
            agent(w, "GET", "/proxy/{connection}", Loc::Query).id("demo-git")
        }),
        spec(&w, "ANY", "/proxy/{connection}/{*path}", |w, g| {
            let path = *g.pick(&["user", "repos", "nope"]);
            agent(w, "GET", "/proxy/{connection}/{*path}", Loc::Query).id("demo-git").id(path)
        }),
        spec(&w, "ANY", "/mcp", mcp_call).escalate(&[
            ("params", r#"{"name": "get_access_token", "arguments": {"connection": "demo-git", "scopes": ["repo:admin"]}}"#),
            ("params", r#"{"name": "call_api", "arguments": {"connection": "demo-git", "path": "https://evil.example/"}}"#),
            ("params", r#"{"name": "call_api", "arguments": {"connection": "demo-git", "path": "/../../admin"}}"#),
            ("params", r#"{"name": "get_access_token", "arguments": {"connection": "other-connection"}}"#),
            ("method", "\"resources/list\""),
        ]),
    ];
    for s in &mut specs[..2] {
        s.ctx.escalations.extend(escalations.iter().cloned());
    }
    let releases = w.ts.releases().await;
    let kinds = run_all(&w, &specs).await;
    let successes: usize = kinds
        .values()
        .flat_map(|k| k.iter())
        .filter(|(k, _)| k.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    assert!(
        w.ts.releases().await - releases <= successes,
        "a release without a success"
    );
    assert_intact(&w).await;
    w.ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_public_and_demo() {
    let w = World::new().await;
    let repos: Value =
        w.ts.http
            .get(w.ts.url("/demo/api/repos"))
            .bearer_auth(&w.upstream_access)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let repo = repos
        .as_array()
        .and_then(|a| a.first())
        .or_else(|| repos["repos"].as_array().and_then(|a| a.first()))
        .and_then(|r| r["name"].as_str())
        .unwrap_or_else(|| panic!("a demo repository: {repos}"))
        .to_owned();
    let demo_secret = latchkey_server::demo::demo_client_secret(&w.ts.vault)
        .await
        .unwrap();
    let demo_basic = World::basic(latchkey_server::demo::DEMO_CLIENT_ID, &demo_secret);
    let get = |path: &'static str| move |_: &World, _: &mut Gen| Req::new("GET", path, Loc::Query);
    let upstream = |method: &str, path: &'static str, loc: Loc, w: &World| {
        Req::new(method, path, loc).bearer(&w.upstream_access)
    };
    let (r1, r2, r3) = (repo.clone(), repo.clone(), repo);
    let (b1, b2) = (demo_basic.clone(), demo_basic);
    let specs = vec![
        spec(
            &w,
            "GET",
            "/.well-known/openid-configuration",
            get("/.well-known/openid-configuration"),
        )
        .refusals(1),
        spec(
            &w,
            "GET",
            "/.well-known/jwks.json",
            get("/.well-known/jwks.json"),
        )
        .refusals(1),
        spec(
            &w,
            "GET",
            "/.well-known/oauth-protected-resource",
            get("/.well-known/oauth-protected-resource"),
        )
        .refusals(1),
        spec(
            &w,
            "GET",
            "/.well-known/oauth-protected-resource/mcp",
            get("/.well-known/oauth-protected-resource/mcp"),
        )
        .refusals(1),
        spec(&w, "GET", "/healthz", get("/healthz")).refusals(1),
        spec(&w, "GET", "/readyz", get("/readyz")).refusals(1),
        spec(&w, "GET", "/metrics", get("/metrics")).refusals(1),
        spec(&w, "GET", "/ui/static/{file}", |_, g| {
            const FILES: [&str; 2] = ["app.css", "htmx-2.0.8.min.js"];
            let file = *g.pick(&FILES);
            Req::new("GET", "/ui/static/{file}", Loc::Query).id(file)
        })
        .refusals(2),
        spec(&w, "GET", "/demo/oauth/authorize", |w, _| {
            Req::new("GET", "/demo/oauth/authorize", Loc::Query)
                .p("response_type", "code")
                .p("client_id", latchkey_server::demo::DEMO_CLIENT_ID)
                .p("redirect_uri", w.ts.url("/connect/demo-git/callback"))
                .p("scope", "read:user repo:read")
                .p("state", "corpus-state")
                .p("code_challenge", pkce().challenge)
                .p("code_challenge_method", "S256")
        }),
        spec(&w, "POST", "/demo/oauth/authorize", |_, g| {
            Req::new("POST", "/demo/oauth/authorize", Loc::Form)
                .p("consent", g.draw("[A-Za-z0-9_-]{20,40}"))
                .p("decision", *g.pick(&["approve", "deny"]))
        })
        .no_success(),
        spec(&w, "GET", "/demo/api/user", move |w, _| {
            upstream("GET", "/demo/api/user", Loc::Query, w)
        }),
        spec(&w, "GET", "/demo/api/repos", move |w, _| {
            upstream("GET", "/demo/api/repos", Loc::Query, w)
        }),
        spec(&w, "GET", "/demo/api/repos/{name}/issues", move |w, _| {
            upstream("GET", "/demo/api/repos/{name}/issues", Loc::Query, w).id(&r1)
        }),
        spec(&w, "POST", "/demo/api/repos/{name}/issues", move |w, _| {
            upstream("POST", "/demo/api/repos/{name}/issues", Loc::Json, w)
                .id(&r2)
                .p("title", "corpus")
                .p("body", "generated")
        }),
        spec(
            &w,
            "POST",
            "/demo/api/repos/{name}/issues/{number}/comments",
            move |w, _| {
                upstream(
                    "POST",
                    "/demo/api/repos/{name}/issues/{number}/comments",
                    Loc::Json,
                    w,
                )
                .id(&r3)
                .id("1")
                .p("body", "corpus")
            },
        ),
        // After the API routes: a refresh may rotate the tokens they use.
        spec(&w, "POST", "/demo/oauth/token", move |w, _| {
            Req::new("POST", "/demo/oauth/token", Loc::Form)
                .h("authorization", &b1)
                .p("grant_type", "refresh_token")
                .p("refresh_token", w.upstream_refresh.as_str())
        }),
        spec(&w, "POST", "/demo/oauth/revoke", move |_, g| {
            // Not the token the API routes use: an unknown one (RFC 7009: 200 all the same).
            Req::new("POST", "/demo/oauth/revoke", Loc::Form)
                .h("authorization", &b2)
                .p("token", g.draw("lkdemo_[A-Za-z0-9]{20,40}"))
        }),
    ];
    run_all(&w, &specs).await;
    assert_intact(&w).await;
    w.ts.stop().await;
}

// --- what the corpus found, kept as regression tests ------------------------------------------

/// Send one request over HTTP/2 (client 2), or HTTP/1.1 for a header block over HTTP/2's
/// limit: its answer.
async fn answer_of(w: &World, req: &Req) -> Resp {
    let client = if header_bytes(req) > BIG_HEADERS {
        0
    } else {
        2
    };
    match send(w, &w.clients[client], req, false).await {
        Outcome::Answer(r) => r,
        Outcome::Unsendable => panic!("unsendable: {}", req.describe()),
        Outcome::TransportRefused => panic!("refused by the transport: {}", req.describe()),
        Outcome::Failed(e) => panic!("{e}: {}", req.describe()),
    }
}

/// Finding: browser routes answered axum's own plain-text rejections — a form missing a field
/// or repeating one, a form sent as another media type, a body over the limit, a path that is
/// not UTF-8 — echoing what was sent, instead of a page of the layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_malformed_browser_requests_get_a_page() {
    let w = World::new().await;
    let raw = |method: &str, path: &'static str, ct: &str, body: &[u8]| {
        let mut r = browser(&w, method, path, Loc::Form);
        r.content_type = Some(Some(ct.to_owned()));
        r.body = Some(body.to_vec());
        r
    };
    let form = "application/x-www-form-urlencoded";
    let disconnect = |body: String| {
        raw(
            "POST",
            "/ui/accounts/{id}/disconnect",
            form,
            body.as_bytes(),
        )
        .id(&w.alice.account)
    };
    let cases = [
        (raw("POST", "/login", form, b"csrf=x&password=y"), 422),
        (raw("POST", "/login", "text/plain", b"username=a"), 415),
        (
            raw("POST", "/login/totp", form, b"code=1&code=2&csrf=x"),
            422,
        ),
        (disconnect(format!("csrf={0}&csrf={0}", w.alice.csrf)), 422),
        (disconnect(format!("csrf={}", "a".repeat(100 * 1024))), 413),
        (
            browser(&w, "GET", "/ui/agents/{id}", Loc::Query).id("x"),
            404,
        ),
        (
            {
                let mut r = browser(&w, "GET", "/ui/agents/{id}", Loc::Query);
                r.ids.push(("%FF%FE".into(), true));
                r
            },
            400,
        ),
        (
            {
                let mut r = browser(&w, "GET", "/connect/{connection}", Loc::Query);
                r.ids.push(("%C0%AF".into(), true));
                r
            },
            400,
        ),
        (
            browser(&w, "GET", "/ui/accounts", Loc::Query)
                .p("sig", "a")
                .p("sig", "b"),
            400,
        ),
    ];
    for (req, status) in cases {
        let resp = answer_of(&w, &req).await;
        assert_eq!(resp.status, status, "{}", req.describe());
        if status >= 400 {
            let ct = resp.headers["content-type"].to_str().unwrap();
            assert!(ct.starts_with("text/html"), "{ct}: {}", req.describe());
            let page = String::from_utf8_lossy(&resp.body);
            assert!(
                page.contains("<!doctype html") || page.contains("<!DOCTYPE html"),
                "{page}"
            );
            assert!(
                !page.contains("Failed to"),
                "axum's reason leaks through: {page}"
            );
        }
    }
    w.ts.stop().await;
}

/// Finding: `DELETE /me/v1/connected-accounts/accounts/{id}` with an id that is not UTF-8 once
/// decoded answered axum's plain-text 400, not a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_my_account_path_not_utf8_is_a_problem() {
    let w = World::new().await;
    let mut req = Req::new(
        "DELETE",
        "/me/v1/connected-accounts/accounts/{id}",
        Loc::Query,
    )
    .bearer(&w.alice.my_account);
    req.ids.push(("%FF".into(), true));
    let resp = answer_of(&w, &req).await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.headers["content-type"], "application/json");
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        (body["status"].as_u64(), body["title"].as_str()),
        (Some(400), Some("Bad Request"))
    );
    assert_eq!(
        w.ts.vault
            .store()
            .account_by_id(&w.alice.account)
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "active"
    );
    w.ts.stop().await;
}

/// Finding: the proxy forwarded whatever headers and query an agent sent. Over 16 KiB of
/// headers (or a long query), the provider's HTTP/2 server tore down the shared connection:
/// this call answered 502 after a token release, and calls of other agents in flight on the
/// same connection failed with it. Now such a call is refused (431 / 414) before anything is
/// released or sent; the same limits hold for the MCP `call_api` tool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_proxy_refuses_oversized_headers_before_release() {
    let w = World::new().await;
    let call = |pad: &str| {
        agent(&w, "GET", "/proxy/{connection}/{*path}", Loc::Query)
            .id("demo-git")
            .id("user")
            .h("x-pad", pad)
    };
    // Each call the proxy makes is audited (`proxy.request`) before it goes out.
    let sent = || async {
        let audit = w.ts.vault.store().list_audit(100_000).await.unwrap();
        audit
            .iter()
            .filter(|e| e.record.action == "proxy.request")
            .count()
    };
    let before = sent().await;
    let big = answer_of(&w, &call(&"A".repeat(20 * 1024))).await;
    assert_eq!(big.status, 431);
    assert_eq!(big.headers["latchkey-error"], "invalid_request");
    let long_query = answer_of(&w, &call("a").p("q", "b".repeat(9 * 1024))).await;
    assert_eq!(long_query.status, 414);
    assert_eq!(sent().await, before, "nothing sent for a refused call");
    // Just under the limit still goes through, and the connection to the provider is fine.
    let ok = answer_of(&w, &call(&"A".repeat(8 * 1024))).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let ok = answer_of(&w, &call("a")).await;
    assert_eq!(ok.status, 200);
    // The MCP tool refuses the same call as invalid arguments.
    let tool = agent(&w, "POST", "/mcp", Loc::Json)
        .h("accept", "application/json, text/event-stream")
        .p("jsonrpc", "2.0")
        .p("id", 1)
        .p("method", "tools/call")
        .p(
            "params",
            json!({"name": "call_api", "arguments": {"connection": "demo-git", "path": "/user",
                "headers": {"x-pad": "A".repeat(20 * 1024)}}}),
        );
    let resp = answer_of(&w, &tool).await;
    assert_eq!(resp.status, 200);
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["result"]["isError"], true, "{body}");
    assert!(body.to_string().contains("exceed"), "{body}");
    assert_eq!(sent().await, before + 2, "only the two calls that went out");
    w.ts.stop().await;
}

/// Finding: a dashboard redirect's notice echoed what was submitted (a grant's scopes) whole:
/// a 20 KiB scope gave a `Location` no HTTP/2 client reads (the stream was reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_dashboard_notice_is_bounded() {
    let w = World::new().await;
    let req = form(&w, "/ui/agents/{id}/grants")
        .id(&w.victim_agents[0])
        .p("connection", "demo-git")
        .p("scopes", format!("read:user {}", "A".repeat(20 * 1024)));
    let resp = answer_of(&w, &req).await;
    assert_eq!(resp.status, 303);
    let location = resp.headers["location"].to_str().unwrap();
    assert!(location.len() < 4096, "{} bytes", location.len());
    assert!(location.starts_with(&format!("/ui/agents/{}?notice=", w.victim_agents[0])));
    w.ts.stop().await;
}

/// Finding: `HEAD /mcp` was answered with content (the MCP service is not a method router,
/// which would strip it), which an HTTP/2 client reads as a broken stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finding_head_on_mcp_has_no_content() {
    let w = World::new().await;
    for req in [
        agent(&w, "HEAD", "/mcp", Loc::Query),
        Req::new("HEAD", "/mcp", Loc::Query),
    ] {
        let resp = answer_of(&w, &req).await;
        assert_eq!(resp.status, 405);
        assert_eq!(resp.headers["allow"], "POST");
        assert!(resp.body.is_empty());
    }
    w.ts.stop().await;
}
