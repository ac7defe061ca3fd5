//! The mock's HTTP surface. Query strings and bodies are parsed by hand so that every malformed
//! request gets an OAuth-shaped answer rather than a framework rejection or a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use latchkey_core::clock::Clock;
use latchkey_demo::client_auth::{Client, ClientAuthError, secret_eq};
use serde_json::json;

use crate::state::{GrantError, Issued, State as MockState};
use crate::{Behaviour, MOCK_SUBJECT};

/// Request bodies above this are refused.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Size of the [`Behaviour::OversizedJson`] answer.
const OVERSIZED_BYTES: usize = 1024 * 1024 + 64 * 1024;

pub(crate) struct Inner {
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) state: Mutex<MockState>,
}

impl Inner {
    /// The state; a panic elsewhere while it was held does not poison the mock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, MockState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> i64 {
        self.clock.now()
    }
}

type Shared = Arc<Inner>;

pub(crate) fn router(inner: Shared) -> Router {
    Router::new()
        .route("/authorize", get(authorize))
        .route("/token", post(token))
        .route("/revoke", post(revoke))
        .route("/userinfo", get(userinfo))
        .route("/api/ping", get(ping))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(inner)
}

// --- parameters ------------------------------------------------------------------------------

/// Form-encoded parameters (a query string or a body); repeated names are remembered.
struct Params {
    values: HashMap<String, String>,
    repeated: bool,
}

impl Params {
    fn parse(input: &[u8]) -> Self {
        let mut values = HashMap::new();
        let mut repeated = false;
        for (k, v) in form_urlencoded::parse(input) {
            repeated |= values.insert(k.into_owned(), v.into_owned()).is_some();
        }
        Self { values, repeated }
    }

    /// RFC 6749 §3.1: a parameter without a value is treated as omitted.
    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Read a form body; the error is an `invalid_request` description.
fn form_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Params, &'static str> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err("the body must be application/x-www-form-urlencoded");
    }
    let body = body.map_err(|_| "the body could not be read or is too large")?;
    let params = Params::parse(&body);
    if params.repeated {
        return Err("a parameter was repeated");
    }
    Ok(params)
}

// --- answers ---------------------------------------------------------------------------------

fn json_answer(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        body.to_string(),
    )
        .into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_answer(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn invalid_request(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_client(description: &str) -> Response {
    let mut resp = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"mock-upstream\""),
    );
    resp
}

fn grant_error(e: GrantError) -> Response {
    match e {
        GrantError::InvalidGrant(d) => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", d),
        GrantError::InvalidScope(d) => oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", d),
    }
}

fn tokens(issued: Issued) -> Response {
    let mut body = json!({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "scope": issued.scope,
    });
    if let Some(e) = issued.expires_in {
        body["expires_in"] = json!(e);
    }
    if let Some(r) = issued.refresh_token {
        body["refresh_token"] = json!(r);
    }
    json_answer(StatusCode::OK, &body)
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// 302 to `redirect_uri` with `params` added to its query.
fn redirect(redirect_uri: &url::Url, params: &[(&str, &str)]) -> Response {
    let mut url = redirect_uri.clone();
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    match HeaderValue::from_str(url.as_str()) {
        Ok(location) => (
            StatusCode::FOUND,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
        Err(_) => plain(StatusCode::BAD_REQUEST, "redirect_uri cannot be used"),
    }
}

// --- client authentication (RFC 6749 §2.3.1) --------------------------------------------------

/// The refusal to send if the request does not authenticate the configured client.
fn authenticate(inner: &Inner, headers: &HeaderMap, params: &Params) -> Option<Response> {
    let client = Client {
        id: &inner.client_id,
        secret: &inner.client_secret,
    };
    client
        .authenticate(
            headers.get(header::AUTHORIZATION),
            params.get("client_id"),
            params.get("client_secret"),
        )
        .err()
        .map(|e| match e {
            ClientAuthError::Request(d) => invalid_request(d),
            ClientAuthError::Client(d) => invalid_client(d),
        })
}

// --- endpoints -------------------------------------------------------------------------------

/// `GET /authorize`: no consent page; the user always approves.
async fn authorize(State(inner): State<Shared>, RawQuery(query): RawQuery) -> Response {
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    if params.repeated {
        return plain(StatusCode::BAD_REQUEST, "a parameter was repeated");
    }
    if !params
        .get("client_id")
        .is_some_and(|id| secret_eq(id, &inner.client_id))
    {
        return plain(StatusCode::BAD_REQUEST, "unknown or missing client_id");
    }
    // Until redirect_uri is known good, errors are shown here, never redirected.
    let Some(redirect_uri) = params
        .get("redirect_uri")
        .and_then(|u| url::Url::parse(u).ok())
        .filter(|u| matches!(u.scheme(), "http" | "https"))
    else {
        return plain(StatusCode::BAD_REQUEST, "missing or invalid redirect_uri");
    };
    let state = params.get("state");
    let fail = |error: &str, description: &str| {
        let mut p = vec![("error", error), ("error_description", description)];
        p.extend(state.map(|s| ("state", s)));
        redirect(&redirect_uri, &p)
    };
    if params.get("response_type") != Some("code") {
        return fail(
            "unsupported_response_type",
            "only response_type=code is supported",
        );
    }
    let Some(challenge) = params.get("code_challenge") else {
        return fail("invalid_request", "PKCE is required (code_challenge)");
    };
    if params.get("code_challenge_method") != Some("S256") {
        return fail("invalid_request", "code_challenge_method must be S256");
    }
    let scope = params.get("scope").unwrap_or_default();
    let raw_redirect = params.get("redirect_uri").unwrap_or_default();
    let code = inner
        .lock()
        .new_code(inner.now(), raw_redirect, challenge, scope);
    let mut p = vec![("code", code.as_str())];
    p.extend(state.map(|s| ("state", s)));
    redirect(&redirect_uri, &p)
}

/// `POST /token`.
async fn token(
    State(inner): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let params = match form_body(&headers, body) {
        Ok(p) => p,
        Err(why) => return invalid_request(why),
    };
    if let Some(refused) = authenticate(&inner, &headers, &params) {
        return refused;
    }
    match params.get("grant_type") {
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri), Some(verifier)) = (
                params.get("code"),
                params.get("redirect_uri"),
                params.get("code_verifier"),
            ) else {
                return invalid_request("code, redirect_uri and code_verifier are required");
            };
            let result = inner
                .lock()
                .exchange_code(inner.now(), code, redirect_uri, verifier);
            result.map_or_else(grant_error, tokens)
        }
        Some("refresh_token") => refresh(&inner, &params).await,
        Some(_) => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only authorization_code and refresh_token are supported",
        ),
        None => invalid_request("grant_type is required"),
    }
}

async fn refresh(inner: &Inner, params: &Params) -> Response {
    let presented = params.get("refresh_token");
    let behaviour = {
        let mut state = inner.lock();
        state.count_refresh_call(presented);
        state.behaviour
    };
    match behaviour {
        Behaviour::Slow { millis } => tokio::time::sleep(Duration::from_millis(millis)).await,
        Behaviour::ServerError { status } => {
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(|s| s.is_server_error())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let code = if status == StatusCode::SERVICE_UNAVAILABLE {
                "temporarily_unavailable"
            } else {
                "server_error"
            };
            return oauth_error(status, code, "the mock provider is failing on purpose");
        }
        Behaviour::RateLimited { retry_after } => {
            let mut resp = oauth_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down");
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return resp;
        }
        Behaviour::MalformedJson => {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                "{not json",
            )
                .into_response();
        }
        Behaviour::OversizedJson => {
            let body = format!(
                "{{\"access_token\":\"oversized\",\"token_type\":\"Bearer\",\"expires_in\":300,\"padding\":\"{}\"}}",
                "x".repeat(OVERSIZED_BYTES)
            );
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from(body),
            )
                .into_response();
        }
        _ => {}
    }
    let Some(presented) = presented else {
        return invalid_request("refresh_token is required");
    };
    let result = inner
        .lock()
        .refresh(inner.now(), behaviour, presented, params.get("scope"));
    if let Behaviour::RotateThenSlow { millis } = behaviour {
        // Done and committed above: if the client disconnects now, this future is dropped but
        // the rotation stands.
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    result.map_or_else(grant_error, tokens)
}

/// `POST /revoke` (RFC 7009): 200 whether or not the token was known.
async fn revoke(
    State(inner): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let params = match form_body(&headers, body) {
        Ok(p) => p,
        Err(why) => return invalid_request(why),
    };
    if let Some(refused) = authenticate(&inner, &headers, &params) {
        return refused;
    }
    let Some(token) = params.get("token") else {
        return invalid_request("token is required");
    };
    inner.lock().revoke(token);
    StatusCode::OK.into_response()
}

/// Whether the request carries a live bearer access token.
fn bearer_ok(inner: &Inner, headers: &HeaderMap) -> bool {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    token.is_some_and(|t| inner.lock().bearer_ok(inner.now(), t))
}

fn unauthorized() -> Response {
    let mut resp = json_answer(
        StatusCode::UNAUTHORIZED,
        &json!({"error": "invalid_token", "error_description": "missing, unknown, expired or revoked access token"}),
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    resp
}

async fn userinfo(State(inner): State<Shared>, headers: HeaderMap) -> Response {
    if bearer_ok(&inner, &headers) {
        json_answer(StatusCode::OK, &json!({"sub": MOCK_SUBJECT}))
    } else {
        unauthorized()
    }
}

async fn ping(State(inner): State<Shared>, headers: HeaderMap) -> Response {
    if bearer_ok(&inner, &headers) {
        json_answer(StatusCode::OK, &json!({"ok": true}))
    } else {
        unauthorized()
    }
}
