//! Upstream access tokens through the privileged-worker token exchange, and the agent's own
//! Latchkey token (client credentials) for the proxy and `/mcp`.
//!
//! The exchange is Auth0's privileged-worker exchange: a subject JWT
//! (`typ: token-vault-req+jwt`, `iss` = the client id, `sub` = the user, `aud` = the issuer,
//! `iat`, `exp` a minute later, a fresh `jti`, `audit_context`) signed with the agent's key,
//! and client authentication by a `private_key_jwt` assertion signed with the same key, or by
//! the agent's client secret.

use std::collections::BTreeSet;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use crate::Inner;
use crate::approval::ApprovalFor;
use crate::cache::Fresh;
use crate::error::{Asked, Error, OAuthAnswer, classify, excerpt};

pub(crate) const GRANT_TOKEN_VAULT: &str =
    "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token";
pub(crate) const GRANT_CIBA: &str = "urn:openid:params:grant-type:ciba";
pub(crate) const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub(crate) const TOKEN_TYPE_VAULT_ACCESS: &str =
    "http://auth0.com/oauth/token-type/token-vault-access-token";
pub(crate) const ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub(crate) const SUBJECT_JWT_TYP: &str = "token-vault-req+jwt";
/// Lifetime of the JWTs the client signs (Latchkey refuses subject JWTs older than 60 s).
const JWT_LIFETIME: i64 = 60;

/// What to ask for: a connection, the user the agent acts for, and optionally narrower scopes
/// or one of several accounts. It is also the cache key: two requests that differ in anything
/// here are cached apart (scopes as a set: `"b a"` and `"a b"` are the same request).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenRequest {
    connection: String,
    user: String,
    scopes: Option<BTreeSet<String>>,
    login_hint: Option<String>,
}

impl TokenRequest {
    /// A token for `connection` (e.g. `github`) acting for `user` (a Latchkey user id), with
    /// every scope the agent's grant allows and the user consented to.
    pub fn new(connection: impl Into<String>, user: impl Into<String>) -> Self {
        Self {
            connection: connection.into(),
            user: user.into(),
            scopes: None,
            login_hint: None,
        }
    }

    /// Narrow the token to these scopes (space-separated, as OAuth's `scope`); they must lie
    /// within the grant and the user's consent. An empty string asks for the default.
    pub fn scope(mut self, scope: &str) -> Self {
        let set: BTreeSet<String> = scope.split_whitespace().map(str::to_owned).collect();
        self.scopes = (!set.is_empty()).then_some(set);
        self
    }

    /// Pick one of the user's several accounts at the connection by its upstream user id.
    pub fn login_hint(mut self, hint: impl Into<String>) -> Self {
        self.login_hint = Some(hint.into());
        self
    }

    /// The connection asked for.
    pub fn connection(&self) -> &str {
        &self.connection
    }

    /// The user the agent acts for.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The scopes asked for, space-separated and sorted; `None` for the grant's default.
    pub fn scopes(&self) -> Option<String> {
        self.scopes
            .as_ref()
            .map(|s| s.iter().map(String::as_str).collect::<Vec<_>>().join(" "))
    }
}

/// A token Latchkey released: an upstream access token from the exchange, or the agent's own
/// token for the proxy. `Debug` does not show the token.
#[derive(Clone)]
pub struct AccessToken {
    token: SecretString,
    token_type: String,
    scope: String,
    issued_token_type: Option<String>,
    expires_in: i64,
    expires_at: i64,
    extra: Map<String, Value>,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    /// Parse a successful token answer received at `at` (the client's clock).
    pub(crate) fn parse(text: &str, at: i64) -> Result<Self, Error> {
        let protocol = |why: &str| Error::Protocol {
            status: Some(200),
            description: format!("{why}: {}", excerpt(text)),
        };
        let Ok(Value::Object(mut body)) = serde_json::from_str::<Value>(text) else {
            return Err(Error::Protocol {
                status: Some(200),
                description: "the token answer is not a JSON object".into(),
            });
        };
        let token = match body.remove("access_token") {
            Some(Value::String(t)) if !t.is_empty() => SecretString::from(t),
            _ => return Err(protocol("no access_token in the answer")),
        };
        // Never kept beside the access token: not issued by these grants, and secrets.
        body.remove("refresh_token");
        body.remove("id_token");
        let take_str = |body: &mut Map<String, Value>, k: &str| match body.remove(k) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let token_type = take_str(&mut body, "token_type").unwrap_or_else(|| "Bearer".into());
        let scope = take_str(&mut body, "scope").unwrap_or_default();
        let issued_token_type = take_str(&mut body, "issued_token_type");
        // Without `expires_in` the token's life is unknown: it is not served from the cache.
        let expires_in = body
            .remove("expires_in")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        Ok(Self {
            token,
            token_type,
            scope,
            issued_token_type,
            expires_in,
            expires_at: at.saturating_add(expires_in),
            extra: body,
        })
    }

    /// The token itself, for an `Authorization: Bearer` header. Do not log it.
    pub fn secret(&self) -> &str {
        self.token.expose_secret()
    }

    /// `Bearer`.
    pub fn token_type(&self) -> &str {
        &self.token_type
    }

    /// The scopes granted, space-separated (the upstream provider's, for an exchange).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The scopes granted, one by one.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split_whitespace()
    }

    /// `http://auth0.com/oauth/token-type/token-vault-access-token` for an exchange.
    pub fn issued_token_type(&self) -> Option<&str> {
        self.issued_token_type.as_deref()
    }

    /// The `expires_in` Latchkey answered when it released the token (seconds; the remaining
    /// life of the upstream token, possibly capped by the grant).
    pub fn expires_in(&self) -> i64 {
        self.expires_in
    }

    /// When the token expires: Unix seconds on the client's clock.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// The answer as Latchkey gave it, token included (`access_token`, `expires_in`,
    /// `scope`, `issued_token_type`, `token_type`, and any other member) — for printing it, as
    /// `latchkey token --json` does.
    pub fn to_json(&self) -> Value {
        let mut out = self.extra.clone();
        out.insert("access_token".into(), json!(self.secret()));
        out.insert("expires_in".into(), json!(self.expires_in));
        out.insert("scope".into(), json!(self.scope));
        if let Some(t) = &self.issued_token_type {
            out.insert("issued_token_type".into(), json!(t));
        }
        out.insert("token_type".into(), json!(self.token_type));
        Value::Object(out)
    }
}

/// Until when a token released at `at` that lives `expires_in` seconds is served from the
/// cache: `margin` seconds before it expires. One that lives no longer than the margin is
/// not served from the cache at all.
pub(crate) fn fresh_until(at: i64, expires_in: i64, margin: i64) -> i64 {
    at.saturating_add(expires_in).saturating_sub(margin)
}

/// An answer of the token endpoint, read.
pub(crate) struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub text: String,
}

impl Inner {
    /// POST a form to `/oauth/token`, with the client's authentication added.
    pub(crate) async fn post_token(
        &self,
        mut form: Vec<(&'static str, String)>,
        at: i64,
    ) -> Result<Answer, Error> {
        form.push(("client_id", self.client_id.clone()));
        if let Some(secret) = &self.secret {
            form.push(("client_secret", secret.expose_secret().to_owned()));
        } else if let Some(key) = &self.key {
            form.push(("client_assertion_type", ASSERTION_TYPE_JWT_BEARER.into()));
            form.push((
                "client_assertion",
                key.sign(
                    None,
                    &json!({
                        "iss": self.client_id, "sub": self.client_id, "aud": self.issuer,
                        "iat": at, "exp": at + JWT_LIFETIME,
                        "jti": uuid::Uuid::new_v4().to_string(),
                    }),
                ),
            ));
        }
        let resp = self
            .http
            .post(format!("{}oauth/token", self.issuer))
            .form(&form)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await?;
        Ok(Answer {
            status,
            retry_after,
            text,
        })
    }

    /// One privileged-worker exchange for `req`.
    pub(crate) async fn exchange(
        self: Arc<Self>,
        req: TokenRequest,
    ) -> Result<Fresh<AccessToken>, Error> {
        let key = self.key.as_ref().ok_or_else(|| {
            Error::Config(
                "the privileged-worker exchange needs the agent's private key (it signs the \
                 request); a client secret alone serves the proxy only"
                    .into(),
            )
        })?;
        let at = self.clock.now();
        let subject = key.sign(
            Some(SUBJECT_JWT_TYP),
            &json!({
                "iss": self.client_id, "sub": req.user, "aud": self.issuer,
                "iat": at, "exp": at + JWT_LIFETIME, "jti": uuid::Uuid::new_v4().to_string(),
                "audit_context": self.audit_context,
            }),
        );
        let mut form = vec![
            ("grant_type", GRANT_TOKEN_VAULT.to_owned()),
            ("subject_token_type", TOKEN_TYPE_JWT.to_owned()),
            ("subject_token", subject),
            ("requested_token_type", TOKEN_TYPE_VAULT_ACCESS.to_owned()),
            ("connection", req.connection.clone()),
        ];
        if let Some(scope) = req.scopes() {
            form.push(("scope", scope));
        }
        if let Some(hint) = &req.login_hint {
            form.push(("login_hint", hint.clone()));
        }
        let answer = self.post_token(form, at).await?;
        self.token_answer(answer, at, &req.connection, ApprovalFor::Token(req.clone()))
    }

    /// The agent's own Latchkey token (client credentials, audience the agent API).
    pub(crate) async fn fetch_agent_token(self: Arc<Self>) -> Result<Fresh<AccessToken>, Error> {
        let at = self.clock.now();
        let form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("resource", format!("{}mcp", self.issuer)),
        ];
        let answer = self.post_token(form, at).await?;
        self.token_answer(answer, at, "", ApprovalFor::Call)
    }

    /// A token answer: the token and how long to cache it, or the error it says.
    pub(crate) fn token_answer(
        &self,
        answer: Answer,
        at: i64,
        connection: &str,
        approval_for: ApprovalFor,
    ) -> Result<Fresh<AccessToken>, Error> {
        if answer.status == 200 {
            let token = AccessToken::parse(&answer.text, at)?;
            return Ok(Fresh {
                fresh_until: fresh_until(at, token.expires_in, self.margin),
                value: token,
            });
        }
        let parsed =
            OAuthAnswer::parse(answer.status, answer.retry_after.as_deref(), &answer.text)?;
        Err(classify(
            parsed,
            Asked {
                connection,
                approval_for,
                at,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_comes_off_the_end() {
        assert_eq!(fresh_until(1000, 300, 60), 1240);
        // A token living no longer than the margin is never served from the cache.
        assert!(fresh_until(1000, 60, 60) <= 1000);
        assert!(fresh_until(1000, 30, 60) <= 1000);
        assert_eq!(fresh_until(1000, 300, 0), 1300);
    }

    #[test]
    fn scopes_are_a_set() {
        let a = TokenRequest::new("c", "u").scope("repo:read  read:user");
        let b = TokenRequest::new("c", "u").scope("read:user repo:read read:user");
        assert_eq!(a, b);
        assert_eq!(a.scopes().as_deref(), Some("read:user repo:read"));
        assert_eq!(
            TokenRequest::new("c", "u").scope(" "),
            TokenRequest::new("c", "u")
        );
        assert_ne!(a, TokenRequest::new("c", "u"));
    }

    #[test]
    fn a_token_answer_keeps_its_members_and_hides_the_token() {
        let text = r#"{"access_token":"up-secret","expires_in":290,"scope":"repo:read",
            "issued_token_type":"http://auth0.com/oauth/token-type/token-vault-access-token",
            "token_type":"Bearer"}"#;
        let t = AccessToken::parse(text, 1000).unwrap();
        assert_eq!(t.secret(), "up-secret");
        assert_eq!((t.expires_in(), t.expires_at()), (290, 1290));
        assert_eq!(t.scopes().collect::<Vec<_>>(), ["repo:read"]);
        assert!(!format!("{t:?}").contains("up-secret"));
        assert_eq!(t.to_json(), serde_json::from_str::<Value>(text).unwrap());
        assert!(matches!(
            AccessToken::parse(r#"{"token_type":"Bearer"}"#, 0),
            Err(Error::Protocol { .. })
        ));
    }
}
