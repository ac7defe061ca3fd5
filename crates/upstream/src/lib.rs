//! The HTTP client Latchkey uses as an OAuth client of upstream providers.
//!
//! Every call goes through the SSRF guard ([`guard`]: loopback, private, link-local and
//! metadata addresses refused unless the operator allows them, checked after resolution and
//! pinned), has a deadline and a response-size cap, follows no redirects, and parses token
//! responses strictly. Failures are classified for the vault: `invalid_grant` (the grant is
//! dead), transient (timeouts, 5xx, 429 — retry later, keep the stored token), or protocol
//! (malformed answers). Response bodies are never echoed into errors: they may hold tokens.

pub mod guard;

use std::time::Duration;

use async_trait::async_trait;
use latchkey_core::scope::Scopes;
use latchkey_core::upstream::{
    ClientAuth, Endpoints, Upstream, UpstreamError, UpstreamTokens, Wire,
};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};

use crate::guard::{Blocked, GuardedClient, OutboundPolicy};

/// Largest provider response read, in bytes.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct HttpUpstream {
    client: GuardedClient,
}

#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    pub timeout: Duration,
    /// Extra trusted root (PEM), e.g. Latchkey's own local CA for the built-in demo provider.
    pub extra_root_pem: Option<Vec<u8>>,
    /// Which addresses may be called (the default refuses every non-public one).
    pub outbound: OutboundPolicy,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            extra_root_pem: None,
            outbound: OutboundPolicy::default(),
        }
    }
}

impl HttpUpstream {
    pub fn new(options: UpstreamOptions) -> Result<Self, String> {
        let settings = || {
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
            Ok(builder)
        };
        Ok(Self {
            client: GuardedClient::new(options.outbound.clone(), settings)?,
        })
    }

    /// A request to `url`, if the guard lets it out.
    fn request(
        &self,
        method: reqwest::Method,
        url: &str,
    ) -> Result<reqwest::RequestBuilder, UpstreamError> {
        let (client, url) = self.client.for_url(url).map_err(blocked_error)?;
        Ok(client.request(method, url))
    }

    async fn token_request(
        &self,
        ep: &Endpoints,
        form: &[(&str, &str)],
    ) -> Result<UpstreamTokens, UpstreamError> {
        let req = self
            .request(reqwest::Method::POST, &ep.token_url)?
            .header("Accept", "application/json");
        let mut body: Vec<(&str, &str)> = form.to_vec();
        let req = client_auth(req, ep, &mut body);
        let resp = req.form(&body).send().await.map_err(transport_error)?;
        let status = resp.status();
        let retry_after = retry_after(&resp);
        let bytes = read_capped(resp).await?;
        token_answer(status, retry_after, &bytes, &ep.wire)
    }
}

/// Classify a token-endpoint answer: tokens, a dead grant (`invalid_grant` or what the
/// provider calls it), a transient failure, or malformed data.
fn token_answer(
    status: StatusCode,
    retry_after: Option<u64>,
    bytes: &[u8],
    wire: &Wire,
) -> Result<UpstreamTokens, UpstreamError> {
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Err(UpstreamError::Transient {
            message: format!("token endpoint answered {status}"),
            retry_after,
            retryable: status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_none(),
        });
    }
    let json = serde_json::from_slice::<serde_json::Value>(bytes).ok();
    let code = json
        .as_ref()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()));
    // Some providers (GitHub, Slack) answer errors with 200 and an `error` member.
    let is_error = !status.is_success()
        || json
            .as_ref()
            .is_some_and(|v| token_object(v, wire).is_none() && code.is_some());
    if !is_error {
        return parse_tokens(bytes, wire);
    }
    match code {
        Some(c) if c == "invalid_grant" || wire.invalid_grant_errors.iter().any(|e| e == c) => {
            Err(UpstreamError::InvalidGrant(sanitize(c)))
        }
        Some(other) => Err(UpstreamError::Protocol(format!(
            "token endpoint answered {status} {}",
            sanitize(other)
        ))),
        None => Err(UpstreamError::Protocol(format!(
            "token endpoint answered {status}"
        ))),
    }
}

/// Authenticate as the vault's client: `client_secret_basic` when there is a secret (its parts
/// form-encoded first, RFC 6749 §2.3.1) or `client_secret_post` where the catalog says the
/// provider expects it, else a public client naming itself in the body.
fn client_auth<'a>(
    req: reqwest::RequestBuilder,
    ep: &'a Endpoints,
    body: &mut Vec<(&str, &'a str)>,
) -> reqwest::RequestBuilder {
    match (&ep.client_secret, ep.wire.client_auth) {
        (Some(secret), ClientAuth::Basic) => req.basic_auth(
            form_encode(&ep.client_id),
            Some(form_encode(secret.expose_secret())),
        ),
        (Some(secret), ClientAuth::Post) => {
            body.push(("client_id", &ep.client_id));
            body.push(("client_secret", secret.expose_secret()));
            req
        }
        (None, _) => {
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

/// A destination the guard refused: transient for the vault (the stored tokens stay; an
/// operator's change of `outbound_allow` or of the connection fixes it), never retried at
/// once, with the reason for the operator's log.
fn blocked_error(b: Blocked) -> UpstreamError {
    UpstreamError::Transient {
        message: b.to_string(),
        retry_after: None,
        retryable: false,
    }
}

fn transport_error(e: reqwest::Error) -> UpstreamError {
    if let Some(b) = Blocked::in_error(&e) {
        return blocked_error(b.clone());
    }
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
        // Only a connection that never opened certainly carried nothing to the provider.
        retryable: e.is_connect(),
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

/// The object holding the token fields: the provider's nested one when present (Slack's
/// `authed_user`), else the top level; `None` when neither has an `access_token`.
fn token_object<'v>(v: &'v serde_json::Value, wire: &Wire) -> Option<&'v serde_json::Value> {
    let nested = wire.token_nested_in.as_deref().and_then(|k| v.get(k));
    [nested, Some(v)]
        .into_iter()
        .flatten()
        .find(|o| o.get("access_token").is_some())
}

fn parse_tokens(bytes: &[u8], wire: &Wire) -> Result<UpstreamTokens, UpstreamError> {
    let top: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|_| UpstreamError::Protocol("token response is not JSON".into()))?;
    let v = token_object(&top, wire).unwrap_or(&top);
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
        && !wire.token_types.iter().any(|a| a.eq_ignore_ascii_case(&t))
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
    }
    .or(wire.assumed_expires_in);
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
        let scope = scope.map(|s| {
            let extra = ep.wire.refresh_scope_extra.iter().map(String::as_str);
            let all: Scopes = s.iter().chain(extra).collect();
            all.iter()
                .collect::<Vec<_>>()
                .join(&ep.wire.scope_separator)
        });
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
        let req = self.request(reqwest::Method::POST, url)?;
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
                retryable: false,
            })
        } else {
            Err(UpstreamError::Protocol(format!(
                "revocation endpoint answered {status}"
            )))
        }
    }

    async fn userinfo(
        &self,
        ep: &Endpoints,
        access_token: &SecretString,
    ) -> Result<serde_json::Value, UpstreamError> {
        let Some(url) = &ep.userinfo_url else {
            return Err(UpstreamError::Protocol("no user-info URL".into()));
        };
        let mut req = match &ep.wire.userinfo_post {
            None => self.request(reqwest::Method::GET, url)?,
            Some(body) if body.is_empty() => self.request(reqwest::Method::POST, url)?,
            Some(body) => self
                .request(reqwest::Method::POST, url)?
                .header("Content-Type", "application/json")
                .body(body.clone()),
        };
        for (name, value) in &ep.wire.userinfo_headers {
            req = req.header(name.as_str(), value.as_str());
        }
        let resp = req
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

    async fn get_json(&self, url: &str) -> Result<serde_json::Value, UpstreamError> {
        let resp = self
            .request(reqwest::Method::GET, url)?
            .header("Accept", "application/json")
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        let bytes = read_capped(resp).await?;
        if !status.is_success() {
            return Err(UpstreamError::Protocol(format!("{url} answered {status}")));
        }
        serde_json::from_slice(&bytes)
            .map_err(|_| UpstreamError::Protocol(format!("{url} did not answer JSON")))
    }

    async fn post_webhook(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: &str,
    ) -> Result<(), String> {
        let (client, url) = self
            .client
            .for_url(url)
            .map_err(|b| format!("the receiver's address is refused: {b}"))?;
        let mut req = client
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.to_owned());
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let resp = req.send().await.map_err(|e| {
            if let Some(b) = Blocked::in_error(&e) {
                format!("the receiver's address is refused: {b}")
            } else if e.is_timeout() {
                "the receiver did not answer in time".to_owned()
            } else {
                "the receiver could not be reached".to_owned()
            }
        })?;
        let status = resp.status();
        // Drain (capped) so the connection can be reused; the answer itself does not matter.
        let _ = read_capped(resp).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }
}

/// The token-response parser, for the fuzz target (`fuzz/fuzz_targets/upstream_tokens.rs`).
#[doc(hidden)]
pub fn parse_token_response(bytes: &[u8], wire: &Wire) -> Result<UpstreamTokens, UpstreamError> {
    parse_tokens(bytes, wire)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<UpstreamTokens, UpstreamError> {
        parse_tokens(bytes, &Wire::default())
    }

    #[test]
    fn token_parsing_is_strict() {
        let ok = parse(br#"{"access_token":"a","token_type":"bearer","expires_in":60,"refresh_token":"r","scope":"x,y"}"#).unwrap();
        assert_eq!(ok.expires_in, Some(60));
        assert_eq!(ok.scope.unwrap().to_string_spaced(), "x y");
        assert!(
            parse(br#"{"access_token":"a","expires_in":"60"}"#)
                .unwrap()
                .expires_in
                == Some(60)
        );
        for bad in [
            &br#"{}"#[..],
            br#"{"access_token":""}"#,
            br#"{"access_token":5}"#,
            br#"{"access_token":"a","token_type":"mac"}"#,
            br#"{"access_token":"a","token_type":"user"}"#,
            br#"{"access_token":"a","expires_in":-1}"#,
            br#"{"access_token":"a","expires_in":[1]}"#,
            br#"not json"#,
        ] {
            assert!(
                matches!(parse(bad), Err(UpstreamError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn catalog_quirks() {
        let slack = Wire {
            token_nested_in: Some("authed_user".into()),
            token_types: vec!["user".into()],
            ..Wire::default()
        };
        let t = parse_tokens(
            br#"{"ok":true,"access_token":"bot","token_type":"bot","authed_user":{"id":"U1","access_token":"xoxp","token_type":"user","scope":"a,b","refresh_token":"r","expires_in":43200}}"#,
            &slack,
        )
        .unwrap();
        assert_eq!(t.access_token.expose_secret(), "xoxp");
        assert_eq!(t.expires_in, Some(43200));
        assert_eq!(t.scope.unwrap().to_string_spaced(), "a b");
        // A refresh answer has the fields at the top level.
        let t = parse_tokens(
            br#"{"ok":true,"access_token":"x2","token_type":"user"}"#,
            &slack,
        );
        assert_eq!(t.unwrap().access_token.expose_secret(), "x2");

        let salesforce = Wire {
            assumed_expires_in: Some(900),
            ..Wire::default()
        };
        let t = parse_tokens(
            br#"{"access_token":"a","token_type":"Bearer"}"#,
            &salesforce,
        );
        assert_eq!(t.unwrap().expires_in, Some(900));
    }

    #[test]
    fn errors_in_a_200_answer() {
        let github = Wire {
            invalid_grant_errors: vec!["bad_refresh_token".into()],
            ..Wire::default()
        };
        let ok = StatusCode::OK;
        let dead = token_answer(ok, None, br#"{"error":"bad_refresh_token"}"#, &github);
        assert!(matches!(dead, Err(UpstreamError::InvalidGrant(_))));
        let other = token_answer(
            ok,
            None,
            br#"{"ok":false,"error":"invalid_client_id"}"#,
            &github,
        );
        assert!(
            matches!(other, Err(UpstreamError::Protocol(m)) if m.contains("invalid_client_id"))
        );
        let plain = token_answer(
            StatusCode::BAD_REQUEST,
            None,
            br#"{"error":"invalid_grant"}"#,
            &Wire::default(),
        );
        assert!(matches!(plain, Err(UpstreamError::InvalidGrant(_))));
        let alias_elsewhere = token_answer(
            StatusCode::BAD_REQUEST,
            None,
            br#"{"error":"bad_refresh_token"}"#,
            &Wire::default(),
        );
        assert!(matches!(alias_elsewhere, Err(UpstreamError::Protocol(_))));
        let busy = token_answer(StatusCode::SERVICE_UNAVAILABLE, Some(7), b"", &github);
        assert!(matches!(
            busy,
            Err(UpstreamError::Transient {
                retry_after: Some(7),
                ..
            })
        ));
        assert!(token_answer(ok, None, br#"{"access_token":"a"}"#, &github).is_ok());
    }
}
