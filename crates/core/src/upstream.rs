//! The OAuth client side: what the vault needs from a provider. Implemented over HTTP in
//! `latchkey-upstream`; tests may substitute their own.

use async_trait::async_trait;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::scope::Scopes;

/// Resolved endpoints and client credentials for one connection.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub authorize_url: String,
    pub token_url: String,
    pub revoke_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub api_base_url: Option<String>,
    /// Where this provider departs from plain RFC 6749 on the wire (from the catalog).
    pub wire: Wire,
}

/// How the vault authenticates to a provider's token and revocation endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// `client_secret_basic` (RFC 6749 §2.3.1).
    #[default]
    Basic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    Post,
}

/// A provider's departures from plain RFC 6749 / 7009, as the catalog describes them. The
/// default is none: Basic client authentication, space-separated scopes, a `Bearer` token at the
/// top level of the token response, errors as `4xx` with `error`, a `GET` user-info call.
#[derive(Clone, Debug)]
pub struct Wire {
    pub client_auth: ClientAuth,
    /// Joins scopes in requests (`" "`, or `","` for providers such as Slack and Linear).
    pub scope_separator: String,
    /// An object in the token response holding the user's token fields (Slack: `authed_user`);
    /// top-level fields are read when it is absent.
    pub token_nested_in: Option<String>,
    /// `token_type` values accepted besides `Bearer` (Slack: `user`).
    pub token_types: Vec<String>,
    /// Error codes that mean the grant is dead, besides `invalid_grant` (GitHub:
    /// `bad_refresh_token`).
    pub invalid_grant_errors: Vec<String>,
    /// Lifetime assumed for access tokens when the response carries no `expires_in` (Salesforce
    /// sends none although its tokens expire).
    pub assumed_expires_in: Option<i64>,
    /// Added to any `scope` sent on the refresh grant, so the answer still carries a refresh
    /// token (Microsoft: `offline_access`).
    pub refresh_scope_extra: Vec<String>,
    /// POST (instead of GET) to the user-info URL, with this JSON body (`""`: no body).
    pub userinfo_post: Option<String>,
    /// Extra request headers for the user-info call (Notion: `Notion-Version`).
    pub userinfo_headers: Vec<(String, String)>,
}

impl Default for Wire {
    fn default() -> Self {
        Self {
            client_auth: ClientAuth::Basic,
            scope_separator: " ".into(),
            token_nested_in: None,
            token_types: Vec::new(),
            invalid_grant_errors: Vec::new(),
            assumed_expires_in: None,
            refresh_scope_extra: Vec::new(),
            userinfo_post: None,
            userinfo_headers: Vec::new(),
        }
    }
}

/// A token response from a provider.
#[derive(Debug)]
pub struct UpstreamTokens {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<i64>,
    pub scope: Option<Scopes>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The provider refused the grant (`invalid_grant`): the refresh token or code is dead.
    #[error("provider refused the grant: {0}")]
    InvalidGrant(String),
    /// Timeout, connection failure, 5xx, or 429: try again later; `retry_after` in seconds.
    /// `retryable` only when the provider certainly did not act on the request (the connection
    /// failed before it was sent, or 503): re-sending a rotating refresh token the provider did
    /// consume would revoke the whole grant.
    #[error("provider temporarily unavailable: {message}")]
    Transient {
        message: String,
        retry_after: Option<u64>,
        retryable: bool,
    },
    /// The provider answered something that is not a valid OAuth response.
    #[error("provider answered malformed data: {0}")]
    Protocol(String),
}

#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    async fn exchange_code(
        &self,
        ep: &Endpoints,
        code: &str,
        code_verifier: &str,
        redirect_uri: &str,
    ) -> Result<UpstreamTokens, UpstreamError>;

    /// The refresh-token grant; `scope` asks for a narrower access token (RFC 6749 §6).
    async fn refresh(
        &self,
        ep: &Endpoints,
        refresh_token: &SecretString,
        scope: Option<&Scopes>,
    ) -> Result<UpstreamTokens, UpstreamError>;

    /// RFC 7009 revocation at the provider (best effort by callers).
    async fn revoke(
        &self,
        ep: &Endpoints,
        token: &SecretString,
        hint: &str,
    ) -> Result<(), UpstreamError>;

    /// Call the provider's user-info URL (`ep.userinfo_url`) with the access token; used to learn
    /// the account id.
    async fn userinfo(
        &self,
        ep: &Endpoints,
        access_token: &SecretString,
    ) -> Result<serde_json::Value, UpstreamError>;

    /// GET a public JSON document without credentials (OpenID discovery at `connection add`).
    async fn get_json(&self, url: &str) -> Result<serde_json::Value, UpstreamError>;

    /// POST a JSON webhook body with these headers; `Err` (a message for the operator) unless
    /// the receiver answered 2xx.
    async fn post_webhook(
        &self,
        url: &str,
        headers: &[(&'static str, String)],
        body: &str,
    ) -> Result<(), String>;
}
