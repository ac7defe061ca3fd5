//! The one place errors become HTTP responses.
//!
//! OAuth errors: RFC 6749 JSON, `Content-Type: application/json` exactly (some SDKs refuse a
//! charset parameter), `Cache-Control: no-store`, `Retry-After` on 429/503, and never a
//! `WWW-Authenticate` header on the token endpoint (openid-client would discard the body).
//! Internal failures answer a bare 500 and log the detail.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use latchkey_core::OAuthError;
use latchkey_core::error::ErrorSource;

pub fn oauth_error(e: &OAuthError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = serde_json::json!({ "error": e.code, "error_description": e.description });
    if let Some(uri) = &e.connect_uri {
        body["connect_uri"] = serde_json::Value::String(uri.clone());
    }
    for (name, value) in &e.extra {
        body[*name] = value.clone();
    }
    if e.source == ErrorSource::Internal && status.is_server_error() {
        tracing::warn!(code = e.code, "request failed internally");
    }
    json_response(status, &body, e.retry_after)
}

pub fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    retry_after: Option<u64>,
) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if let Some(s) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

pub async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": "not_found", "error_description": "no such endpoint"}),
        None,
    )
}

pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &serde_json::json!({"error": "server_error", "error_description": "internal error"}),
        None,
    )
}
