//! The authorization server: `/oauth/authorize`, `/oauth/token` and `/oauth/revoke`.
//!
//! Request bodies and query strings are parsed by hand rather than with axum's `Form`/`Query`
//! extractors so that every malformed request gets a protocol-shaped answer (an OAuth JSON error
//! or the HTML error page) instead of a framework rejection, and so that repeated parameters can
//! be refused as RFC 6749 §3.1 requires.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::client_auth::{Client, ClientAuthError};
use crate::scope::ScopeSet;
use crate::state::{CONSENT_TTL, Consent, GrantError, Issued, is_pkce_string};
use crate::{DEMO_LOGIN, DemoConfig, DemoProvider};

/// Longest `state` we will carry around for a client.
const MAX_STATE_LEN: usize = 1024;

/// Parsed `application/x-www-form-urlencoded` parameters (body or query string).
pub(crate) struct Params {
    values: HashMap<String, String>,
    duplicates: Vec<String>,
}

impl Params {
    pub(crate) fn parse(input: &[u8]) -> Self {
        let mut values = HashMap::new();
        let mut duplicates = Vec::new();
        for (k, v) in form_urlencoded::parse(input) {
            if values.contains_key(k.as_ref()) {
                duplicates.push(k.into_owned());
            } else {
                values.insert(k.into_owned(), v.into_owned());
            }
        }
        Self { values, duplicates }
    }

    /// RFC 6749 §3.1: a parameter sent without a value is treated as omitted.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.values
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn is_duplicated(&self, name: &str) -> bool {
        self.duplicates.iter().any(|d| d == name)
    }
}

/// Read a form body: the content type must be urlencoded and the body within the size cap.
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
    let body = body.map_err(|_| "the request body could not be read or is too large")?;
    let params = Params::parse(&body);
    if !params.duplicates.is_empty() {
        return Err("a parameter was repeated");
    }
    Ok(params)
}

// ---------------------------------------------------------------------------------------------
// JSON responses for the token and revocation endpoints (RFC 6749 §5.1, §5.2)

fn no_store_json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ],
        Json(body),
    )
        .into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    no_store_json(
        status,
        json!({ "error": error, "error_description": description }),
    )
}

fn invalid_request(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_client(description: &str) -> Response {
    let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    // RFC 6749 §5.2: a 401 must advertise the authentication scheme.
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"latchkey-demo\""),
    );
    response
}

fn grant_error(e: GrantError) -> Response {
    match e {
        GrantError::InvalidGrant(d) => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", d),
        GrantError::InvalidScope(d) => oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", d),
    }
}

fn token_response(issued: Issued, ttl: i64) -> Response {
    no_store_json(
        StatusCode::OK,
        json!({
            "access_token": issued.access_token,
            "token_type": "Bearer",
            "expires_in": ttl,
            "refresh_token": issued.refresh_token,
            "scope": issued.scopes.to_spaced(),
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Client authentication (RFC 6749 §2.3.1)

/// Authenticate the confidential client by HTTP Basic or `client_secret_post`: the refusal
/// to send, if it fails.
fn authenticate(config: &DemoConfig, headers: &HeaderMap, params: &Params) -> Option<Response> {
    let client = Client {
        id: &config.client_id,
        secret: &config.client_secret,
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

// ---------------------------------------------------------------------------------------------
// Authorization endpoint

/// 302 to the client's redirect URI with `params` appended to its query.
fn redirect_to(redirect_uri: &str, params: &[(&str, &str)]) -> Response {
    let Ok(mut url) = url::Url::parse(redirect_uri) else {
        return crate::html::error(
            StatusCode::BAD_REQUEST,
            "The registered redirect URI is not a valid URL.",
        );
    };
    {
        let mut query = url.query_pairs_mut();
        for (k, v) in params {
            query.append_pair(k, v);
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
        Err(_) => crate::html::error(StatusCode::BAD_REQUEST, "The redirect URI cannot be used."),
    }
}

/// Redirect back with an RFC 6749 §4.1.2.1 error, echoing `state`.
fn redirect_error(
    redirect_uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> Response {
    let mut params = vec![("error", error), ("error_description", description)];
    if let Some(state) = state {
        params.push(("state", state));
    }
    redirect_to(redirect_uri, &params)
}

/// `GET /oauth/authorize`: validate the request and render the consent page.
pub(crate) async fn authorize_page(
    State(provider): State<DemoProvider>,
    RawQuery(query): RawQuery,
) -> Response {
    let inner = &provider.inner;
    let config = &inner.config;
    let params = Params::parse(query.as_deref().unwrap_or_default().as_bytes());

    // Until client and redirect URI are known-good, errors are shown, never redirected: an
    // open redirector would hand codes or error pages to an attacker's URL.
    let client_id = match params.get("client_id") {
        Some(id) if !params.is_duplicated("client_id") && id == config.client_id => id,
        _ => return crate::html::error(StatusCode::BAD_REQUEST, "Unknown or missing client_id."),
    };
    let redirect_uri = match params.get("redirect_uri") {
        Some(uri) if !params.is_duplicated("redirect_uri") && config.allows_redirect(uri) => uri,
        _ => {
            return crate::html::error(
                StatusCode::BAD_REQUEST,
                "The redirect_uri is missing or not registered for this client.",
            );
        }
    };

    let state = params.get("state");
    // An over-long state is dropped from the error redirect rather than echoed.
    let echo_state = state.filter(|s| s.len() <= MAX_STATE_LEN);
    let fail = |error: &str, description: &str| {
        redirect_error(redirect_uri, error, description, echo_state)
    };

    if let Some(dup) = params.duplicates.first() {
        return fail(
            "invalid_request",
            &format!("parameter `{dup}` was repeated"),
        );
    }
    if state.is_some_and(|s| s.len() > MAX_STATE_LEN) {
        return fail("invalid_request", "state is too long");
    }
    match params.get("response_type") {
        Some("code") => {}
        Some(_) => {
            return fail(
                "unsupported_response_type",
                "only response_type=code is supported",
            );
        }
        None => return fail("invalid_request", "response_type is required"),
    }
    match params.get("code_challenge_method") {
        Some("S256") => {}
        Some(_) => return fail("invalid_request", "code_challenge_method must be S256"),
        None => {
            return fail(
                "invalid_request",
                "PKCE is required: code_challenge_method=S256",
            );
        }
    }
    let code_challenge = match params.get("code_challenge") {
        Some(c) if is_pkce_string(c) => c,
        Some(_) => {
            return fail(
                "invalid_request",
                "code_challenge must be 43-128 unreserved characters",
            );
        }
        None => return fail("invalid_request", "PKCE is required: code_challenge"),
    };
    let scopes = match params.get("scope").map(ScopeSet::parse) {
        Some(Ok(s)) if !s.is_empty() => s,
        Some(Err(_)) => return fail("invalid_scope", "unknown scope requested"),
        _ => return fail("invalid_scope", "scope is required"),
    };

    let now = inner.clock.now();
    let ticket = {
        let mut st = inner.lock();
        st.prune(now);
        st.add_consent(Consent {
            client_id: client_id.to_owned(),
            redirect_uri: redirect_uri.to_owned(),
            scopes,
            state: state.map(str::to_owned),
            code_challenge: code_challenge.to_owned(),
            expires_at: now + CONSENT_TTL,
        })
    };
    crate::html::consent(client_id, DEMO_LOGIN, scopes, redirect_uri, &ticket)
}

/// `POST /oauth/authorize`: the user's decision on a consent ticket.
pub(crate) async fn authorize_decision(
    State(provider): State<DemoProvider>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let inner = &provider.inner;
    let params = match form_body(&headers, body) {
        Ok(p) => p,
        Err(msg) => return crate::html::error(StatusCode::BAD_REQUEST, msg),
    };
    let approve = match params.get("decision") {
        Some("approve") => true,
        Some("deny") => false,
        _ => return crate::html::error(StatusCode::BAD_REQUEST, "Choose Approve or Deny."),
    };
    let Some(ticket) = params.get("consent") else {
        return crate::html::error(StatusCode::BAD_REQUEST, "The consent form is incomplete.");
    };
    let now = inner.clock.now();
    let mut st = inner.lock();
    let Some(consent) = st.take_consent(ticket, now) else {
        return crate::html::error(
            StatusCode::BAD_REQUEST,
            "This consent request has expired or was already answered.",
        );
    };
    let redirect_uri = consent.redirect_uri.clone();
    let state = consent.state.clone();
    if approve {
        let code = st.add_code(consent, now);
        drop(st);
        tracing::info!("demo provider: authorization approved; code issued");
        let mut out = vec![("code", code.as_str())];
        if let Some(s) = state.as_deref() {
            out.push(("state", s));
        }
        redirect_to(&redirect_uri, &out)
    } else {
        drop(st);
        tracing::info!("demo provider: authorization denied by the user");
        redirect_error(
            &redirect_uri,
            "access_denied",
            "the resource owner denied the request",
            state.as_deref(),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

/// `POST /oauth/token`.
pub(crate) async fn token(
    State(provider): State<DemoProvider>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let inner = &provider.inner;
    let params = match form_body(&headers, body) {
        Ok(p) => p,
        Err(msg) => return invalid_request(msg),
    };
    let grant_type = params.get("grant_type");
    // Counted before authentication: the stats show what the provider was asked to do.
    match grant_type {
        Some("authorization_code") => {
            inner
                .stats
                .authorization_code_grants
                .fetch_add(1, Ordering::Relaxed);
        }
        Some("refresh_token") => {
            inner.stats.refresh_grants.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    if let Some(refused) = authenticate(&inner.config, &headers, &params) {
        return refused;
    }
    let ttl = inner.config.access_token_ttl;
    let client_id = inner.config.client_id.as_str();
    match grant_type {
        None => invalid_request("grant_type is required"),
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri), Some(verifier)) = (
                params.get("code"),
                params.get("redirect_uri"),
                params.get("code_verifier"),
            ) else {
                return invalid_request("code, redirect_uri and code_verifier are required");
            };
            let now = inner.clock.now();
            let result = {
                let mut st = inner.lock();
                st.prune(now);
                st.exchange_code(code, client_id, redirect_uri, verifier, now, ttl)
            };
            match result {
                Ok((family, issued)) => {
                    tracing::info!(family, scope = %issued.scopes.to_spaced(), "demo provider: code exchanged for tokens");
                    token_response(issued, ttl)
                }
                Err(e) => {
                    tracing::info!(error = ?e, "demo provider: authorization_code grant refused");
                    grant_error(e)
                }
            }
        }
        Some("refresh_token") => {
            let Some(refresh_token) = params.get("refresh_token") else {
                return invalid_request("refresh_token is required");
            };
            let requested = match params.get("scope").map(ScopeSet::parse) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(_)) => {
                    return grant_error(GrantError::InvalidScope("unknown scope requested"));
                }
            };
            let now = inner.clock.now();
            let result = {
                let mut st = inner.lock();
                st.prune(now);
                st.rotate_refresh(refresh_token, client_id, requested, now, ttl)
            };
            match result {
                Ok((family, issued)) => {
                    tracing::info!(family, scope = %issued.scopes.to_spaced(), "demo provider: refresh token rotated");
                    token_response(issued, ttl)
                }
                Err(e) => {
                    tracing::info!(error = ?e, "demo provider: refresh_token grant refused");
                    grant_error(e)
                }
            }
        }
        Some(_) => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "supported grant types: authorization_code, refresh_token",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Revocation endpoint

/// `POST /oauth/revoke` (RFC 7009). `token_type_hint` is accepted and ignored: both token kinds
/// are looked up, which the RFC allows.
pub(crate) async fn revoke(
    State(provider): State<DemoProvider>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let inner = &provider.inner;
    inner.stats.revocations.fetch_add(1, Ordering::Relaxed);
    let params = match form_body(&headers, body) {
        Ok(p) => p,
        Err(msg) => return invalid_request(msg),
    };
    if let Some(refused) = authenticate(&inner.config, &headers, &params) {
        return refused;
    }
    let Some(token) = params.get("token") else {
        return invalid_request("token is required");
    };
    let revoked = inner.lock().revoke(token, &inner.config.client_id);
    match revoked {
        Some(what) => tracing::info!(what, "demo provider: token revoked"),
        None => tracing::debug!("demo provider: revocation of an unknown token (ignored)"),
    }
    // RFC 7009 §2.2: 200 whether or not the token was known.
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn form_decoding_of_basic_credentials() {
        let client = Client {
            id: "a b",
            secret: "s",
        };
        let basic = |raw: &str| {
            let v = format!("Basic {}", STANDARD.encode(raw));
            client.authenticate(Some(&HeaderValue::from_str(&v).unwrap()), None, None)
        };
        assert_eq!(basic("a+b:s"), Ok(()), "form-encoded");
        assert_eq!(basic("a b:s"), Ok(()), "as is");
        assert!(basic("a%2Bb:s").is_err());
    }

    #[test]
    fn repeated_and_empty_parameters() {
        let p = Params::parse(b"a=1&b=&a=2");
        assert_eq!(p.get("a"), Some("1"));
        assert_eq!(p.get("b"), None);
        assert!(p.is_duplicated("a"));
        assert!(!p.is_duplicated("b"));
    }
}
