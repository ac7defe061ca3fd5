//! The HTTP client Latchkey uses as an OAuth client of upstream providers.
//!
//! Every call has a deadline and a response-size cap, follows no redirects, and parses token
//! responses strictly. Failures are classified for the vault: `invalid_grant` (the grant is
//! dead), transient (timeouts, 5xx, 429 — retry later, keep the stored token), or protocol
//! (malformed answers). Response bodies are never echoed into errors: they may hold tokens.

use std::time::Duration;

use async_trait::async_trait;
use latchkey_core::scope::Scopes;
use latchkey_core::upstream::{Endpoints, Upstream, UpstreamError, UpstreamTokens};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};

/// Largest provider response read, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct HttpUpstream {
    client: reqwest::Client,
}

#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    pub timeout: Duration,
    /// Extra trusted root (PEM), e.g. Latchkey's own local CA for the built-in demo provider.
    pub extra_root_pem: Option<Vec<u8>>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            extra_root_pem: None,
        }
    }
}

impl HttpUpstream {
    pub fn new(options: UpstreamOptions) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &options.extra_root_pem {
            let cert = reqwest::Certificate::from_pem(pem)
                .map_err(|e| format!("extra root certificate: {e}"))?;
            builder = builder.tls_certs_merge([cert]);
        }
        Ok(Self {
            client: builder.build().map_err(|e| e.to_string())?,
        })
    }

    async fn token_request(
        &self,
        ep: &Endpoints,
        form: &[(&str, &str)],
    ) -> Result<UpstreamTokens, UpstreamError> {
        let req = self
            .client
            .post(&ep.token_url)
            .header("Accept", "application/json");
        let mut body: Vec<(&str, &str)> = form.to_vec();
        let req = client_auth(req, ep, &mut body);
        let resp = req.form(&body).send().await.map_err(transport_error)?;
        let status = resp.status();
        let retry_after = retry_after(&resp);
        let bytes = read_capped(resp).await?;
        if status.is_success() {
            return parse_tokens(&bytes);
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(UpstreamError::Transient {
                message: format!("token endpoint answered {status}"),
                retry_after,
            });
        }
        let code = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
        match code.as_deref() {
            Some("invalid_grant") => Err(UpstreamError::InvalidGrant("invalid_grant".into())),
            Some(other) => Err(UpstreamError::Protocol(format!(
                "token endpoint answered {status} {}",
                sanitize(other)
            ))),
            None => Err(UpstreamError::Protocol(format!(
                "token endpoint answered {status}"
            ))),
        }
    }
}

/// Authenticate as the vault's client: `client_secret_basic` when there is a secret (its parts
/// form-encoded first, RFC 6749 §2.3.1), else a public client naming itself in the body.
fn client_auth<'a>(
    req: reqwest::RequestBuilder,
    ep: &'a Endpoints,
    body: &mut Vec<(&str, &'a str)>,
) -> reqwest::RequestBuilder {
    match &ep.client_secret {
        Some(secret) => req.basic_auth(
            form_encode(&ep.client_id),
            Some(form_encode(secret.expose_secret())),
        ),
        None => {
            body.push(("client_id", &ep.client_id));
            req
        }
    }
}

/// RFC 6749 §2.3.1: client credentials are form-encoded before Basic encoding.
fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn sanitize(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

fn transport_error(e: reqwest::Error) -> UpstreamError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    UpstreamError::Transient {
        message: kind.into(),
        retry_after: None,
    }
}

fn retry_after(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s.min(3600))
}

async fn read_capped(mut resp: reqwest::Response) -> Result<Vec<u8>, UpstreamError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(UpstreamError::Protocol("response too large".into()));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn parse_tokens(bytes: &[u8]) -> Result<UpstreamTokens, UpstreamError> {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|_| UpstreamError::Protocol("token response is not JSON".into()))?;
    let str_field = |name: &str| -> Result<Option<String>, UpstreamError> {
        match v.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(UpstreamError::Protocol(format!(
                "`{name}` is not a non-empty string"
            ))),
        }
    };
    let access_token = str_field("access_token")?
        .ok_or_else(|| UpstreamError::Protocol("no access_token".into()))?;
    if let Some(t) = str_field("token_type")?
        && !t.eq_ignore_ascii_case("bearer")
    {
        return Err(UpstreamError::Protocol("token_type is not Bearer".into()));
    }
    let expires_in = match v.get("expires_in") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(
            n.as_i64()
                .filter(|s| *s > 0 && *s < 10 * 365 * 86400)
                .ok_or_else(|| UpstreamError::Protocol("expires_in out of range".into()))?,
        ),
        Some(serde_json::Value::String(s)) => Some(
            s.parse::<i64>()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| UpstreamError::Protocol("expires_in is not a number".into()))?,
        ),
        Some(_) => return Err(UpstreamError::Protocol("expires_in is not a number".into())),
    };
    Ok(UpstreamTokens {
        access_token: SecretString::from(access_token),
        refresh_token: str_field("refresh_token")?.map(SecretString::from),
        expires_in,
        scope: str_field("scope")?.map(|s| Scopes::parse(&s)),
    })
}

#[async_trait]
impl Upstream for HttpUpstream {
    async fn exchange_code(
        &self,
        ep: &Endpoints,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
    ) -> Result<UpstreamTokens, UpstreamError> {
        self.token_request(
            ep,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", code_verifier),
            ],
        )
        .await
    }

    async fn refresh(
        &self,
        ep: &Endpoints,
        refresh_token: &SecretString,
        scope: Option<&Scopes>,
    ) -> Result<UpstreamTokens, UpstreamError> {
        let scope = scope.map(Scopes::to_string_spaced);
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
        ];
        if let Some(s) = &scope {
            form.push(("scope", s));
        }
        self.token_request(ep, &form).await
    }

    async fn revoke(
        &self,
        ep: &Endpoints,
        token: &SecretString,
        hint: &str,
    ) -> Result<(), UpstreamError> {
        let Some(url) = &ep.revoke_url else {
            return Ok(());
        };
        let req = self.client.post(url);
        let mut body = vec![("token", token.expose_secret()), ("token_type_hint", hint)];
        let req = client_auth(req, ep, &mut body);
        let resp = req.form(&body).send().await.map_err(transport_error)?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Err(UpstreamError::Transient {
                message: format!("revocation endpoint answered {status}"),
                retry_after: retry_after(&resp),
            })
        } else {
            Err(UpstreamError::Protocol(format!(
                "revocation endpoint answered {status}"
            )))
        }
    }

    async fn userinfo(
        &self,
        url: &str,
        access_token: &SecretString,
    ) -> Result<serde_json::Value, UpstreamError> {
        let resp = self
            .client
            .get(url)
            .bearer_auth(access_token.expose_secret())
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        let bytes = read_capped(resp).await?;
        if !status.is_success() {
            return Err(UpstreamError::Protocol(format!(
                "user-info endpoint answered {status}"
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|_| UpstreamError::Protocol("user info is not JSON".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_parsing_is_strict() {
        let ok = parse_tokens(br#"{"access_token":"a","token_type":"bearer","expires_in":60,"refresh_token":"r","scope":"x,y"}"#).unwrap();
        assert_eq!(ok.expires_in, Some(60));
        assert_eq!(ok.scope.unwrap().to_string_spaced(), "x y");
        assert!(
            parse_tokens(br#"{"access_token":"a","expires_in":"60"}"#)
                .unwrap()
                .expires_in
                == Some(60)
        );
        for bad in [
            &br#"{}"#[..],
            br#"{"access_token":""}"#,
            br#"{"access_token":5}"#,
            br#"{"access_token":"a","token_type":"mac"}"#,
            br#"{"access_token":"a","expires_in":-1}"#,
            br#"{"access_token":"a","expires_in":[1]}"#,
            br#"not json"#,
        ] {
            assert!(
                matches!(parse_tokens(bad), Err(UpstreamError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
