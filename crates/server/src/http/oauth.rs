//! `POST /oauth/token`: decode the body (form or JSON, same rules for both) and the Basic
//! header, call `Vault::token`, answer RFC 6749 JSON.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use latchkey_core::OAuthError;
use latchkey_core::params::Params;
use latchkey_core::vault::BasicCredentials;
use secrecy::{ExposeSecret, SecretString};

use super::errors::{json_response, oauth_error};
use super::web::context;
use super::{AppState, RequestMeta};

/// Largest token request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A client's request to an OAuth endpoint: its body (at most [`MAX_BODY`], else 413) as
/// parameters, and its HTTP Basic credentials if any.
pub(super) async fn client_request(
    headers: &HeaderMap,
    body: Body,
) -> Result<(Params, Option<BasicCredentials>), OAuthError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| OAuthError {
            status: 413,
            ..OAuthError::invalid_request(format!("request body exceeds {MAX_BODY} bytes"))
        })?;
    Ok((parse_body(headers, &bytes)?, basic_credentials(headers)?))
}

pub async fn token(
    State(state): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = async {
        let (params, basic) = client_request(&headers, body).await?;
        state.vault.token(&params, basic, &context(&meta)).await
    }
    .await;
    metrics::histogram!("latchkey_exchange_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(t) => {
            let mut body = serde_json::json!({
                "access_token": t.access_token.expose_secret(),
                "expires_in": t.expires_in,
                "scope": t.scope,
                "token_type": "Bearer",
            });
            if let Some(kind) = t.issued_token_type {
                body["issued_token_type"] = kind.into();
            }
            if let Some(id) = &t.id_token {
                body["id_token"] = id.as_str().into();
            }
            if let Some(r) = &t.refresh_token {
                body["refresh_token"] = r.expose_secret().into();
            }
            if let Some(d) = &t.authorization_details {
                body["authorization_details"] = d.clone();
            }
            json_response(StatusCode::OK, &body, None)
        }
        Err(e) => oauth_error(&e),
    }
}

/// `POST /oauth/revoke` (RFC 7009): 200 with an empty body, also for unknown tokens.
pub async fn revoke(
    State(state): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
            OAuthError::invalid_request(format!("request body exceeds {MAX_BODY} bytes"))
        })?;
        let params = parse_body(&headers, &bytes)?;
        let basic = basic_credentials(&headers)?;
        state.vault.revoke(&params, basic, &context(&meta)).await
    }
    .await;
    match result {
        Ok(()) => json_response(StatusCode::OK, &serde_json::json!({}), None),
        Err(e) => oauth_error(&e),
    }
}

/// `GET`/`POST /userinfo` with a bearer access token (RFC 6750 errors).
pub async fn userinfo(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    let result = match bearer {
        Some(token) => state.vault.userinfo(&token).await,
        None => Err(OAuthError::invalid_token(
            "send the access token as `Authorization: Bearer …`",
        )),
    };
    match result {
        Ok(claims) => json_response(StatusCode::OK, &claims, None),
        Err(e) => {
            let mut resp = oauth_error(&e);
            if e.code == "invalid_token" {
                let challenge = format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    e.description.replace('"', "'")
                );
                if let Ok(v) = axum::http::HeaderValue::from_str(&challenge) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            resp
        }
    }
}

pub(super) fn parse_body(headers: &HeaderMap, bytes: &[u8]) -> Result<Params, OAuthError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    Params::from_body(content_type, bytes)
}

/// `Authorization: Basic` client credentials (RFC 6749 §2.3.1: form-encoded, then base64).
/// Other schemes are ignored here (e.g. a `DPoP`-bound client sending other headers).
pub(super) fn basic_credentials(
    headers: &HeaderMap,
) -> Result<Option<BasicCredentials>, OAuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bad = || OAuthError::invalid_client("malformed HTTP Basic credentials");
    if values.next().is_some() {
        return Err(OAuthError::invalid_request(
            "more than one Authorization header",
        ));
    }
    let value = value.to_str().map_err(|_| bad())?;
    let Some((scheme, rest)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (id, secret) = text.split_once(':').ok_or_else(bad)?;
    let decode = |s: &str| -> String {
        form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (decode(id), decode(secret));
    if id.is_empty() || secret.is_empty() {
        return Err(bad());
    }
    Ok(Some(BasicCredentials {
        client_id: id,
        client_secret: SecretString::from(secret),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn bodies() {
        let form = parse_body(
            &headers("application/x-www-form-urlencoded;charset=UTF-8"),
            b"a=1&b=x%20y",
        )
        .unwrap();
        assert_eq!((form.get("a"), form.get("b")), (Some("1"), Some("x y")));
        assert!(parse_body(&headers("application/x-www-form-urlencoded"), b"a=1&a=2").is_err());
        let json =
            parse_body(&headers("application/json"), br#"{"a":"1","c":null,"n":5}"#).unwrap();
        assert_eq!(
            (json.get("a"), json.get("c"), json.get("n")),
            (Some("1"), None, Some("5"))
        );
        for bad in [
            &br#"{"a":"1","a":"2"}"#[..],
            br#"[1]"#,
            br#"{"a":{"x":1}}"#,
            b"\xff",
            b"{",
        ] {
            assert_eq!(
                parse_body(&headers("application/json"), bad)
                    .unwrap_err()
                    .code,
                "invalid_request"
            );
        }
        assert!(parse_body(&headers("text/plain"), b"a=1").is_err());
        assert!(parse_body(&HeaderMap::new(), b"a=1").is_err());
    }

    #[test]
    fn basic() {
        let mut h = HeaderMap::new();
        let enc = base64::engine::general_purpose::STANDARD.encode("agt%3Ax:s%2Bcret");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {enc}")).unwrap(),
        );
        let c = basic_credentials(&h).unwrap().unwrap();
        assert_eq!(
            (c.client_id.as_str(), c.client_secret.expose_secret()),
            ("agt:x", "s+cret")
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_credentials(&h).err().unwrap().code, "invalid_client");
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(basic_credentials(&h).unwrap().is_none());
    }
}
