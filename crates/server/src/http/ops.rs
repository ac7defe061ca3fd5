//! Discovery, keys and operations endpoints.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use latchkey_core::vault::{GRANT_CIBA, GRANT_TOKEN_VAULT, MFA_ACR, MY_ACCOUNT_SCOPES};

use super::AppState;
use super::errors::json_response;

/// RFC 8414 metadata. It advertises only what this server enforces today.
pub async fn discovery(State(s): State<AppState>) -> Response {
    let issuer = &s.vault.config.issuer;
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}authorize"),
            "token_endpoint": format!("{issuer}oauth/token"),
            "userinfo_endpoint": format!("{issuer}userinfo"),
            "revocation_endpoint": format!("{issuer}oauth/revoke"),
            "jwks_uri": format!("{issuer}.well-known/jwks.json"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": [GRANT_TOKEN_VAULT, "authorization_code", "refresh_token", "client_credentials", GRANT_CIBA],
            "backchannel_authentication_endpoint": format!("{issuer}bc-authorize"),
            "backchannel_token_delivery_modes_supported": ["poll"],
            "backchannel_user_code_parameter_supported": false,
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256", "EdDSA"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"],
            "scopes_supported": ["openid", "profile", "offline_access", MY_ACCOUNT_SCOPES[0], MY_ACCOUNT_SCOPES[1], MY_ACCOUNT_SCOPES[2]],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "amr", "acr", "azp", "preferred_username"],
            "acr_values_supported": [MFA_ACR],
            "prompt_values_supported": ["none", "login"],
            "authorization_response_iss_parameter_supported": true,
        }),
        None,
    );
    public_cache(&mut resp);
    resp
}

pub async fn jwks(State(s): State<AppState>) -> Response {
    let mut resp = json_response(StatusCode::OK, &s.vault.jwks(), None);
    public_cache(&mut resp);
    resp
}

fn public_cache(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.remove(header::PRAGMA);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
}

/// The process is up.
pub async fn healthz() -> &'static str {
    "ok"
}

/// The process can serve: the database answers.
pub async fn readyz(State(s): State<AppState>) -> Response {
    match s.vault.store().ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
        }
    }
}

pub async fn metrics(State(s): State<AppState>) -> Response {
    let mut resp = s.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}
