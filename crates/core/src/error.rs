//! Errors that leave the vault, each carrying its RFC 6749 code and HTTP status.
//!
//! Where an error came from decides how it is answered (pingora's `ErrorSource` idea):
//! client mistakes are 4xx with a description that says what to do; upstream trouble is a
//! 503 with `Retry-After` (the stored token is untouched); internal failures are a 500 whose
//! detail goes to the log only.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Upstream,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthError {
    pub status: u16,
    pub code: &'static str,
    pub description: String,
    pub source: ErrorSource,
    /// Seconds, for 429 and 503 answers.
    pub retry_after: Option<u64>,
    /// Where the user can connect the missing account (on `federated_connection_…_not_found`).
    pub connect_uri: Option<String>,
    /// More members of the JSON error body: `interval` on `slow_down`; `auth_req_id`,
    /// `expires_in`, `interval` on an exchange waiting for approval.
    pub extra: Vec<(&'static str, serde_json::Value)>,
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.description)
    }
}

impl std::error::Error for OAuthError {}

impl OAuthError {
    fn client(status: u16, code: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            code,
            description: description.into(),
            source: ErrorSource::Client,
            retry_after: None,
            connect_uri: None,
            extra: Vec::new(),
        }
    }

    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::client(400, "invalid_request", d)
    }
    pub fn invalid_client(d: impl Into<String>) -> Self {
        Self::client(401, "invalid_client", d)
    }
    pub fn invalid_grant(d: impl Into<String>) -> Self {
        Self::client(400, "invalid_grant", d)
    }
    pub fn unauthorized_client(d: impl Into<String>) -> Self {
        Self::client(403, "unauthorized_client", d)
    }
    /// A bearer token presented to a resource (e.g. `/userinfo`) is not valid.
    pub fn invalid_token(d: impl Into<String>) -> Self {
        Self::client(401, "invalid_token", d)
    }
    pub fn invalid_scope(d: impl Into<String>) -> Self {
        Self::client(400, "invalid_scope", d)
    }
    pub fn invalid_target(d: impl Into<String>) -> Self {
        Self::client(400, "invalid_target", d)
    }
    pub fn unsupported_grant_type(d: impl Into<String>) -> Self {
        Self::client(400, "unsupported_grant_type", d)
    }
    /// The request is well-formed and the client known, but policy refuses it now (outside the
    /// grant's hours, an approval missing or denied).
    pub fn access_denied(d: impl Into<String>) -> Self {
        Self::client(403, "access_denied", d)
    }
    pub fn too_many_requests(d: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::client(429, "too_many_requests", d)
        }
    }

    /// The user has no usable connected account for the connection (Auth0's code and status).
    pub fn not_connected(connection: &str, connect_uri: String) -> Self {
        Self {
            connect_uri: Some(connect_uri.clone()),
            ..Self::client(
                401,
                "federated_connection_refresh_token_not_found",
                format!(
                    "Federated connection Refresh Token not found: the user must connect {connection} at {connect_uri}"
                ),
            )
        }
    }

    /// The provider is unreachable, slow, or answering 5xx/429; nothing stored was changed.
    pub fn upstream_unavailable(d: impl Into<String>, retry_after: u64) -> Self {
        Self {
            status: 503,
            code: "temporarily_unavailable",
            description: d.into(),
            source: ErrorSource::Upstream,
            retry_after: Some(retry_after),
            connect_uri: None,
            extra: Vec::new(),
        }
    }

    /// Storage or audit could not be written: fail closed, release nothing.
    pub fn storage_unavailable() -> Self {
        Self {
            status: 503,
            code: "temporarily_unavailable",
            description:
                "the vault could not record this request, so nothing was released; retry shortly"
                    .into(),
            source: ErrorSource::Internal,
            retry_after: Some(1),
            connect_uri: None,
            extra: Vec::new(),
        }
    }

    /// A bug or an unexpected internal failure. Detail is logged by the caller, not returned.
    pub fn server_error() -> Self {
        Self {
            status: 500,
            code: "server_error",
            description: "internal error".into(),
            source: ErrorSource::Internal,
            retry_after: None,
            connect_uri: None,
            extra: Vec::new(),
        }
    }
}
