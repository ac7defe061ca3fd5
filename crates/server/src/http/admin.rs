//! The admin API (`/api/v1/*`): what an operator does with the CLI, over HTTP, authenticated
//! by a bearer token from `latchkey api-token create NAME`.
//!
//! JSON in and out; errors are RFC 9457 problems (`application/problem+json`, the same
//! [`Problem`] shape as the My Account API). Every change goes through the `Vault` method the
//! CLI uses, with the token's name as the audit actor; listings read the registry and never
//! show a token, a sealed blob, a password hash or a client secret. `openapi.json` (served,
//! unauthenticated, at `/api/v1/openapi.json`) describes exactly the routes of [`router`].

use std::collections::HashMap;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use latchkey_core::OAuthError;
use latchkey_core::audit::rfc3339;
use latchkey_core::catalog;
use latchkey_core::model::{AccountStatus, Agent, ConnectedAccount, Connection, Grant};
use latchkey_core::scope::Scopes;
use latchkey_core::store::{AuditQuery, StoreError};
use latchkey_core::vault::{Actor, AdminError, Problem};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use super::errors::json_response;

/// The OpenAPI 3.1 document of this API (checked in; the integration tests hold it to the
/// router).
pub const OPENAPI: &str = include_str!("openapi.json");

/// No endpoint takes a body yet; anything bigger than this is refused before a handler runs.
const MAX_BODY: usize = 16 * 1024;
const PROBLEM_JSON: &str = "application/problem+json";
const REALM: &str = "Bearer realm=\"latchkey\"";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/accounts", get(list_accounts))
        .route("/accounts/{id}", get(get_account).delete(revoke_account))
        .route("/users", get(list_users))
        .route("/users/{user}", delete(delete_user))
        .route("/connections", get(list_connections))
        .route("/agents", get(list_agents))
        .route("/agents/{id}/disable", post(disable_agent))
        .route("/agents/{id}/enable", post(enable_agent))
        .route("/agents/{id}/grants/{connection}", delete(remove_grant))
        .route("/audit", get(read_audit))
        .fallback(unknown_route)
        .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY))
        // Outermost: axum's and tower's own refusals (405, 413, …) become problems too.
        .layer(middleware::map_response(problem_for_bare_errors))
}

// --- errors -------------------------------------------------------------------------------

/// A [`Problem`] as an HTTP response (the orphan rule keeps `IntoResponse` off `Problem`).
pub struct ApiError {
    problem: Problem,
    /// `WWW-Authenticate` for 401s.
    challenge: Option<&'static str>,
}

fn fail(status: u16, title: &'static str, detail: impl Into<String>) -> ApiError {
    ApiError {
        problem: Problem {
            status,
            title,
            detail: detail.into(),
            validation_errors: Vec::new(),
        },
        challenge: None,
    }
}

fn invalid(field: &str, what: &str) -> ApiError {
    let mut e = fail(400, "Bad Request", format!("`{field}` {what}"));
    e.problem.validation_errors = vec![(field.to_owned(), what.to_owned())];
    e
}

fn unavailable() -> ApiError {
    fail(
        503,
        "Service Unavailable",
        "the vault's storage is unavailable; retry shortly",
    )
}

fn problem_response(p: &Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_REQUEST);
    let retry_after = (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1);
    let mut resp = json_response(status, &p.to_json(), retry_after);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = problem_response(&self.problem);
        if let Some(c) = self.challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        resp
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Invalid(d) => fail(400, "Bad Request", d),
            AdminError::NotFound(d) => fail(404, "Not Found", d),
            AdminError::Conflict(d) => fail(409, "Conflict", d),
            AdminError::Storage(d) => {
                tracing::error!(error = %d, "admin API: storage failure");
                unavailable()
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        AdminError::from(e).into()
    }
}

impl From<OAuthError> for ApiError {
    fn from(e: OAuthError) -> Self {
        ApiError {
            problem: Problem::from(e),
            challenge: None,
        }
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok(body: &impl Serialize) -> ApiResult {
    let value = serde_json::to_value(body).expect("plain data serializes");
    Ok(json_response(StatusCode::OK, &value, None))
}

async fn unknown_route() -> ApiError {
    fail(404, "Not Found", "no such admin API endpoint")
}

/// Refusals produced outside the handlers (unknown method, body too large, …) get the same
/// problem shape as everything else; headers such as `Allow` are kept.
async fn problem_for_bare_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == PROBLEM_JSON);
    if is_problem || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let detail = match status {
        StatusCode::METHOD_NOT_ALLOWED => "this endpoint does not take this method".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => format!("the body exceeds {MAX_BODY} bytes"),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let title = match status {
        StatusCode::METHOD_NOT_ALLOWED => "Method Not Allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "Payload Too Large",
        s if s.is_server_error() => "Internal Server Error",
        _ => "Bad Request",
    };
    let mut fresh = problem_response(&Problem {
        status: status.as_u16(),
        title,
        detail,
        validation_errors: Vec::new(),
    });
    for name in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = resp.headers().get(&name) {
            fresh.headers_mut().insert(name, v.clone());
        }
    }
    fresh
}

// --- authentication -----------------------------------------------------------------------

/// The operator behind the request's bearer token, as the audit actor of what it changes.
/// Taken first by every handler, so nothing is read or changed before it succeeds.
pub struct Operator(Actor);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let unauthorized = |presented: bool, detail: &str| ApiError {
            challenge: Some(if presented {
                "Bearer realm=\"latchkey\", error=\"invalid_token\""
            } else {
                REALM
            }),
            ..fail(401, "Unauthorized", detail)
        };
        // RFC 6750: only a bearer credential counts as a presented token.
        let secret = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty());
        let Some(secret) = secret else {
            return Err(unauthorized(
                false,
                "send an operator token (`latchkey api-token create NAME`) as `Authorization: Bearer …`",
            ));
        };
        match s.vault.authenticate_operator(secret).await? {
            Some(token) => Ok(Operator(Actor {
                kind: "operator",
                id: token.name,
                method: "api_token",
            })),
            None => Err(unauthorized(
                true,
                "the operator token is unknown or revoked",
            )),
        }
    }
}

// --- request parts --------------------------------------------------------------------------

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|r| fail(400, "Bad Request", r.body_text()))
}

/// The query's parameters, each at most once and each one of `allowed`.
fn query(uri: &Uri, allowed: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(invalid(&k, "is not a parameter of this endpoint"));
        }
        if v.is_empty() {
            return Err(invalid(&k, "must not be empty"));
        }
        if out.insert(k.clone().into_owned(), v.into_owned()).is_some() {
            return Err(invalid(&k, "must not be repeated"));
        }
    }
    Ok(out)
}

// --- what the API shows ---------------------------------------------------------------------

fn scope_list(s: &Scopes) -> Vec<String> {
    s.iter().map(str::to_owned).collect()
}

#[derive(Serialize)]
struct AccountView {
    id: String,
    user_id: String,
    connection: String,
    upstream_account_id: Option<String>,
    scopes: Vec<String>,
    status: &'static str,
    status_reason: Option<String>,
    created_at: String,
    updated_at: String,
    last_used_at: Option<String>,
    last_refreshed_at: Option<String>,
}

/// An account without its tokens; `connection` is the connection's name.
fn account_view(a: ConnectedAccount, connections: &[Connection]) -> AccountView {
    let connection = connections
        .iter()
        .find(|c| c.id == a.connection_id)
        .map_or(a.connection_id, |c| c.name.clone());
    AccountView {
        id: a.id,
        user_id: a.user_id,
        connection,
        upstream_account_id: a.upstream_account_id,
        scopes: scope_list(&a.scopes),
        status: a.status.as_str(),
        status_reason: a.status_reason,
        created_at: rfc3339(a.created_at),
        updated_at: rfc3339(a.updated_at),
        last_used_at: a.last_used_at.map(rfc3339),
        last_refreshed_at: a.last_refreshed_at.map(rfc3339),
    }
}

#[derive(Serialize)]
struct GrantView {
    connection: String,
    scopes: Vec<String>,
    ip_allowlist: Vec<String>,
    policy: latchkey_core::policy::GrantPolicy,
    created_at: String,
}

#[derive(Serialize)]
struct AgentView {
    id: String,
    name: String,
    disabled: bool,
    created_at: String,
    grants: Vec<GrantView>,
}

fn agent_view(a: Agent, grants: &[Grant], connections: &[Connection]) -> AgentView {
    let grants = grants
        .iter()
        .filter(|g| g.agent_id == a.id)
        .map(|g| GrantView {
            connection: connections
                .iter()
                .find(|c| c.id == g.connection_id)
                .map_or_else(|| g.connection_id.clone(), |c| c.name.clone()),
            scopes: scope_list(&g.scopes),
            ip_allowlist: g.ip_allowlist.clone(),
            policy: g.policy.clone(),
            created_at: rfc3339(g.created_at),
        })
        .collect();
    AgentView {
        id: a.id,
        name: a.name,
        disabled: a.disabled,
        created_at: rfc3339(a.created_at),
        grants,
    }
}

/// The audit page cursor: opaque to clients, it names the last entry of the page before.
fn audit_cursor(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("s{seq}"))
}

fn audit_cursor_seq(cursor: &str) -> Option<i64> {
    let raw = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let digits = std::str::from_utf8(&raw).ok()?.strip_prefix('s')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i64>().ok().filter(|s| *s > 0)
}

/// A `since`/`until` value: RFC 3339 with an offset (`2025-06-01T12:00:00Z`), to the second
/// (a fraction is dropped).
fn audit_time(q: &HashMap<String, String>, field: &str) -> Result<Option<i64>, ApiError> {
    q.get(field)
        .map(|v| {
            time::OffsetDateTime::parse(v, &Rfc3339)
                .map(|t| t.unix_timestamp())
                .map_err(|_| {
                    invalid(
                        field,
                        "must be an RFC 3339 timestamp, e.g. `2025-06-01T12:00:00Z`",
                    )
                })
        })
        .transpose()
}

const AUDIT_DEFAULT_LIMIT: i64 = 100;
const AUDIT_MAX_LIMIT: i64 = 500;

// --- handlers -------------------------------------------------------------------------------

pub async fn openapi() -> Response {
    let mut resp = (StatusCode::OK, OPENAPI).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `GET /accounts?user=&connection=&status=`
async fn list_accounts(_: Operator, State(s): State<AppState>, uri: Uri) -> ApiResult {
    let q = query(&uri, &["user", "connection", "status"])?;
    let store = s.vault.store();
    let user_id = match q.get("user") {
        Some(u) => match s.vault.find_user(u).await {
            Ok(user) => Some(user.id),
            Err(AdminError::NotFound(_)) => return Err(invalid("user", "names no user")),
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    let connections = store.list_connections().await?;
    let connection_id = match q.get("connection") {
        Some(name) => Some(
            connections
                .iter()
                .find(|c| &c.name == name)
                .map(|c| c.id.clone())
                .ok_or_else(|| invalid("connection", "names no connection"))?,
        ),
        None => None,
    };
    let status = match q.get("status").map(String::as_str) {
        None => None,
        Some(v @ ("active" | "needs_reauth" | "revoked")) => Some(AccountStatus::parse(v)),
        Some(_) => {
            return Err(invalid(
                "status",
                "must be one of `active`, `needs_reauth`, `revoked`",
            ));
        }
    };
    let accounts: Vec<AccountView> = store
        .list_accounts(user_id.as_deref())
        .await?
        .into_iter()
        .filter(|a| connection_id.as_ref().is_none_or(|c| &a.connection_id == c))
        .filter(|a| status.is_none_or(|st| a.status == st))
        .map(|a| account_view(a, &connections))
        .collect();
    ok(&serde_json::json!({ "accounts": accounts }))
}

async fn find_account(s: &AppState, id: &str) -> Result<ConnectedAccount, ApiError> {
    s.vault
        .store()
        .account_by_id(id)
        .await?
        .ok_or_else(|| fail(404, "Not Found", format!("no connected account `{id}`")))
}

/// `GET /accounts/{id}`
async fn get_account(
    _: Operator,
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> ApiResult {
    let id = path(id)?;
    query(&uri, &[])?;
    let account = find_account(&s, &id).await?;
    let connections = s.vault.store().list_connections().await?;
    ok(&account_view(account, &connections))
}

/// `DELETE /accounts/{id}`: revoke, as `latchkey account revoke`.
async fn revoke_account(
    Operator(actor): Operator,
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> ApiResult {
    let id = path(id)?;
    query(&uri, &[])?;
    if find_account(&s, &id).await?.status == AccountStatus::Revoked {
        return Err(fail(
            404,
            "Not Found",
            format!("connected account `{id}` is already revoked"),
        ));
    }
    let outcome = s.vault.revoke_account(&id, &actor).await?;
    ok(&serde_json::json!({
        "id": id,
        "status": AccountStatus::Revoked.as_str(),
        "upstream_revoked": outcome.upstream_revoked,
    }))
}

/// `GET /users`
async fn list_users(_: Operator, State(s): State<AppState>, uri: Uri) -> ApiResult {
    query(&uri, &[])?;
    let users: Vec<serde_json::Value> = s
        .vault
        .store()
        .list_users()
        .await?
        .into_iter()
        .map(|u| {
            serde_json::json!({
                "id": u.id,
                "username": u.username,
                "created_at": rfc3339(u.created_at),
                "totp_enabled": u.totp_enabled,
                "role": u.role.as_str(),
            })
        })
        .collect();
    ok(&serde_json::json!({ "users": users }))
}

/// `DELETE /users/{id or username}`: as `latchkey user delete`.
async fn delete_user(
    Operator(actor): Operator,
    State(s): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> ApiResult {
    let user_ref = path(user)?;
    query(&uri, &[])?;
    let user = s.vault.find_user(&user_ref).await?;
    let revoked = s.vault.delete_user(&user.id, &actor).await?;
    ok(&serde_json::json!({
        "id": user.id,
        "username": user.username,
        "accounts_revoked_upstream": revoked,
    }))
}

/// `GET /connections`: the endpoints in effect (a `demo` connection's are the server's own).
async fn list_connections(_: Operator, State(s): State<AppState>, uri: Uri) -> ApiResult {
    query(&uri, &[])?;
    let issuer = &s.vault.config.issuer;
    let connections: Vec<serde_json::Value> = s
        .vault
        .store()
        .list_connections()
        .await?
        .into_iter()
        .map(|c| {
            // No secret passed: only the public parts are shown.
            let ep = catalog::endpoints(&c, issuer, None);
            serde_json::json!({
                "id": c.id,
                "name": c.name,
                "provider": c.provider,
                "client_id": ep.client_id,
                "endpoints": {
                    "authorize_url": ep.authorize_url,
                    "token_url": ep.token_url,
                    "revoke_url": ep.revoke_url,
                    "userinfo_url": ep.userinfo_url,
                    "api_base_url": ep.api_base_url,
                    "issuer": c.issuer,
                },
                "scopes": scope_list(&c.scopes),
                "keep_alive_secs": c.keep_alive_secs,
                "created_at": rfc3339(c.created_at),
            })
        })
        .collect();
    ok(&serde_json::json!({ "connections": connections }))
}

/// `GET /agents`
async fn list_agents(_: Operator, State(s): State<AppState>, uri: Uri) -> ApiResult {
    query(&uri, &[])?;
    let store = s.vault.store();
    let (grants, connections) = (store.list_grants().await?, store.list_connections().await?);
    let agents: Vec<AgentView> = store
        .list_agents()
        .await?
        .into_iter()
        .map(|a| agent_view(a, &grants, &connections))
        .collect();
    ok(&serde_json::json!({ "agents": agents }))
}

async fn set_disabled(
    actor: Actor,
    s: AppState,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
    disabled: bool,
) -> ApiResult {
    let id = path(id)?;
    query(&uri, &[])?;
    s.vault.set_agent_disabled(&id, disabled, &actor).await?;
    let store = s.vault.store();
    let agent = store
        .agent_by_id(&id)
        .await?
        .ok_or_else(|| fail(404, "Not Found", format!("no agent `{id}`")))?;
    let (grants, connections) = (store.list_grants().await?, store.list_connections().await?);
    ok(&agent_view(agent, &grants, &connections))
}

/// `POST /agents/{id}/disable`: from the next request on the agent cannot authenticate.
async fn disable_agent(
    Operator(actor): Operator,
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> ApiResult {
    set_disabled(actor, s, id, uri, true).await
}

/// `POST /agents/{id}/enable`
async fn enable_agent(
    Operator(actor): Operator,
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> ApiResult {
    set_disabled(actor, s, id, uri, false).await
}

/// `DELETE /agents/{id}/grants/{connection}`
async fn remove_grant(
    Operator(actor): Operator,
    State(s): State<AppState>,
    ids: Result<Path<(String, String)>, PathRejection>,
    uri: Uri,
) -> ApiResult {
    let (id, connection) = path(ids)?;
    query(&uri, &[])?;
    s.vault.remove_grant(&id, &connection, &actor).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /audit?user=&agent=&connection=&action=&decision=&since=&until=&limit=&cursor=`: the
/// audit trail, newest first, one page at a time. `next_cursor` continues strictly below the
/// page's last entry, so entries appended meanwhile never shift the walk (they appear on a
/// fresh first page).
async fn read_audit(_: Operator, State(s): State<AppState>, uri: Uri) -> ApiResult {
    let q = query(
        &uri,
        &[
            "user",
            "agent",
            "connection",
            "action",
            "decision",
            "since",
            "until",
            "limit",
            "cursor",
        ],
    )?;
    let (action, action_prefix) = match q.get("action") {
        None => (None, None),
        Some(a) => AuditQuery::action_filter(a).ok_or_else(|| {
            invalid(
                "action",
                "takes `*` only as a final `.*` (e.g. `account.*`)",
            )
        })?,
    };
    let decision = match q.get("decision").map(String::as_str) {
        None => None,
        Some(d @ ("allow" | "deny")) => Some(d.to_owned()),
        Some(_) => return Err(invalid("decision", "must be `allow` or `deny`")),
    };
    let since = audit_time(&q, "since")?;
    let until = audit_time(&q, "until")?;
    if let (Some(a), Some(b)) = (since, until)
        && a >= b
    {
        return Err(invalid("until", "must be later than `since`"));
    }
    let limit = match q.get("limit") {
        None => AUDIT_DEFAULT_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=AUDIT_MAX_LIMIT).contains(n))
            .ok_or_else(|| invalid("limit", "must be an integer from 1 to 500"))?,
    };
    let before_seq = q
        .get("cursor")
        .map(|c| {
            audit_cursor_seq(c).ok_or_else(|| {
                invalid(
                    "cursor",
                    "is not a cursor this endpoint gave (`next_cursor`)",
                )
            })
        })
        .transpose()?;
    let mut entries = s
        .vault
        .store()
        .query_audit(&AuditQuery {
            subject_user: q.get("user").cloned(),
            agent: q.get("agent").cloned(),
            connection: q.get("connection").cloned(),
            action,
            action_prefix,
            decision,
            since,
            until,
            before_seq,
            // One more than the page: whether there is a next page, without an empty last one.
            limit: limit + 1,
        })
        .await?;
    let more = entries.len() as i64 > limit;
    entries.truncate(limit as usize);
    let next_cursor = more
        .then(|| entries.last().map(|e| audit_cursor(e.seq)))
        .flatten();
    let entries: Vec<_> = entries
        .iter()
        .map(latchkey_core::audit::entry_view)
        .collect();
    ok(&serde_json::json!({ "entries": entries, "next_cursor": next_cursor }))
}
