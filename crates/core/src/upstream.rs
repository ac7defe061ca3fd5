//! The OAuth client side: what the vault needs from a provider. Implemented over HTTP in
//! `latchkey-upstream`; tests may substitute their own.

use async_trait::async_trait;
use secrecy::SecretString;

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
    #[error("provider temporarily unavailable: {message}")]
    Transient {
        message: String,
        retry_after: Option<u64>,
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

    /// GET the provider's user-info URL with the access token; used to learn the account id.
    async fn userinfo(
        &self,
        url: &str,
        access_token: &SecretString,
    ) -> Result<serde_json::Value, UpstreamError>;
}
