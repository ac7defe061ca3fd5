//! Errors that say what to do, mapped from Latchkey's answers.
//!
//! Latchkey answers every refusal with an RFC 6749 JSON body (`error`, `error_description`,
//! and per case `connect_uri`, `auth_req_id`, `approval_uri`, `interval`, `expires_in`) and
//! `Retry-After` on 429 and 503. [`Error`] sorts those answers by what the caller should do
//! next: send the user to connect ([`Error::NotConnected`]), wait for their approval
//! ([`Error::ApprovalRequired`]), give up or ask for less ([`Error::Denied`]), retry later
//! ([`Error::RateLimited`], [`Error::Unavailable`]), or fix the agent's set-up
//! ([`Error::InvalidClient`], [`Error::Rejected`]). Every variant built from an answer keeps
//! the server's `error_description` as `description`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::approval::{ApprovalFor, PendingApproval};

/// What went wrong, sorted by what to do about it.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The user has not connected the account (or revoked it, or must reconnect): send them to
    /// `connect_url`, then try again. (`federated_connection_refresh_token_not_found`: 401 from
    /// the token endpoint, 403 from the proxy.)
    #[error("{connection} is not connected for this user (or must be reconnected){}: {description}",
        connect_url.as_deref().map(|u| format!("; the user connects it at {u}")).unwrap_or_default())]
    NotConnected {
        /// The connection asked for.
        connection: String,
        /// Where the user connects it (the server's `connect_uri`).
        connect_url: Option<String>,
        /// The HTTP status.
        status: u16,
        /// The server's `error_description`.
        description: String,
    },

    /// The grant's policy needs the user's approval and none covers this request yet (403
    /// `authorization_pending`). Show the user `approval_url`, then
    /// [`Client::wait_for_approval`](crate::Client::wait_for_approval) (a token) or repeat
    /// the call (the proxy).
    #[error("this needs the user's approval; they decide at {}: {}", .0.approval_url, .0.description)]
    ApprovalRequired(Box<PendingApproval>),

    /// Policy refuses the request: no grant for this agent and connection, an address the
    /// grant does not allow (`unauthorized_client`), scopes outside the grant or the user's
    /// consent (`invalid_scope`), outside the grant's hours or an approval denied
    /// (`access_denied`). Repeating it unchanged will not help.
    #[error("refused ({code}): {description}")]
    Denied {
        /// The OAuth error code.
        code: String,
        /// The HTTP status.
        status: u16,
        /// The server's `error_description` (why).
        description: String,
    },

    /// A quota of the grant, or the agent's request rate, is used up (429): retry after
    /// `retry_after`.
    #[error("rate limited{}: {description}",
        retry_after.map(|d| format!("; retry in {} s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
        /// The server's `error_description`.
        description: String,
    },

    /// Latchkey or the provider behind it cannot serve now (503 `temporarily_unavailable`:
    /// the provider is down, or the audit record could not be written so nothing was
    /// released; or a 5xx from the proxy): retry after `retry_after`.
    #[error("unavailable ({code}){}: {description}",
        retry_after.map(|d| format!("; retry in {} s", d.as_secs())).unwrap_or_default())]
    Unavailable {
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
        /// The HTTP status.
        status: u16,
        /// The OAuth error code.
        code: String,
        /// The server's `error_description`.
        description: String,
    },

    /// The agent's credentials were not accepted: unknown client id, wrong secret, a key
    /// that is not registered, a disabled agent (`invalid_client`, or `invalid_token` for
    /// the agent's own token at the proxy). Fix the set-up; retrying will not help.
    #[error("the agent's credentials were not accepted ({code}): {description}")]
    InvalidClient {
        /// The OAuth error code.
        code: String,
        /// The HTTP status.
        status: u16,
        /// The server's `error_description`.
        description: String,
    },

    /// [`Client::wait_for_approval`](crate::Client::wait_for_approval) gave up before the
    /// user decided. The request is still pending: wait again with it, or give up.
    #[error("the user has not decided yet (waited as long as asked); they decide at {}", .0.approval_url)]
    ApprovalTimedOut(Box<PendingApproval>),

    /// The approval request expired before the user decided. Make the request again for a
    /// new one.
    #[error("the approval request expired before the user decided: {description}")]
    ApprovalExpired {
        /// The request that expired.
        approval: Box<PendingApproval>,
        /// The server's `error_description` (or, when it expired before the last poll, ours).
        description: String,
    },

    /// Latchkey refused the request as malformed or unusable (`invalid_request`,
    /// `invalid_grant` — e.g. an unknown user or a clock far off —, `invalid_target`,
    /// `unsupported_grant_type`, …): a bug or a set-up mistake on the agent's side.
    #[error("{code} ({status}): {description}")]
    Rejected {
        /// The OAuth error code.
        code: String,
        /// The HTTP status.
        status: u16,
        /// The server's `error_description`.
        description: String,
    },

    /// An answer that is not what the protocol says (not JSON, no `error`, no
    /// `access_token`).
    #[error("unexpected answer from Latchkey{}: {description}",
        status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Protocol {
        /// The HTTP status, if there was an answer.
        status: Option<u16>,
        /// What was wrong, with the start of the answer.
        description: String,
    },

    /// Latchkey could not be reached, or the answer could not be read (network, TLS, timeout).
    #[error("calling Latchkey: {0}")]
    Transport(Arc<reqwest::Error>),

    /// The client's set-up is unusable (a key or CA that does not load, an issuer that is not
    /// a URL, a token asked for without a private key).
    #[error("{0}")]
    Config(String),
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Self {
        Self::Transport(Arc::new(e))
    }
}

impl Error {
    /// The OAuth error code Latchkey answered, if this came from an answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::NotConnected { .. } => Some(NOT_CONNECTED),
            Self::ApprovalRequired(_) => Some("authorization_pending"),
            Self::RateLimited { .. } => Some("too_many_requests"),
            Self::Denied { code, .. }
            | Self::Unavailable { code, .. }
            | Self::InvalidClient { code, .. }
            | Self::Rejected { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status Latchkey answered, if this came from an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::NotConnected { status, .. }
            | Self::Denied { status, .. }
            | Self::Unavailable { status, .. }
            | Self::InvalidClient { status, .. }
            | Self::Rejected { status, .. } => Some(*status),
            Self::ApprovalRequired(p) => Some(p.status),
            Self::RateLimited { .. } => Some(429),
            Self::Protocol { status, .. } => *status,
            _ => None,
        }
    }

    /// The server's `error_description`, if this came from an answer.
    pub fn description(&self) -> Option<&str> {
        match self {
            Self::NotConnected { description, .. }
            | Self::Denied { description, .. }
            | Self::RateLimited { description, .. }
            | Self::Unavailable { description, .. }
            | Self::InvalidClient { description, .. }
            | Self::ApprovalExpired { description, .. }
            | Self::Rejected { description, .. } => Some(description),
            Self::ApprovalRequired(p) => Some(&p.description),
            _ => None,
        }
    }

    /// How long to wait before trying again, when the server said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::Unavailable { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// Whether the same request may succeed later without anything changing (rate limits,
    /// unavailability, the network).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Unavailable { .. } | Self::Transport(_)
        )
    }
}

pub(crate) const NOT_CONNECTED: &str = "federated_connection_refresh_token_not_found";

/// An OAuth error answer, parsed.
#[derive(Debug)]
pub(crate) struct OAuthAnswer {
    pub status: u16,
    pub code: String,
    pub description: String,
    pub body: Value,
    pub retry_after: Option<Duration>,
}

impl OAuthAnswer {
    /// Parse an error answer: a JSON object with a string `error`; anything else is a
    /// [`Error::Protocol`] (or, for a 5xx without a JSON body, [`Error::Unavailable`]).
    pub(crate) fn parse(status: u16, retry_after: Option<&str>, text: &str) -> Result<Self, Error> {
        let retry_after = retry_after
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body: Option<Value> = serde_json::from_str(text).ok();
        let code = body
            .as_ref()
            .and_then(|b| b.get("error"))
            .and_then(Value::as_str);
        match (body.as_ref(), code) {
            (Some(body), Some(code)) => Ok(Self {
                status,
                code: code.to_owned(),
                description: body
                    .get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                body: body.clone(),
                retry_after,
            }),
            _ if status >= 500 => Err(Error::Unavailable {
                retry_after,
                status,
                code: "server_error".into(),
                description: excerpt(text),
            }),
            _ => Err(Error::Protocol {
                status: Some(status),
                description: format!("not an OAuth error answer: {}", excerpt(text)),
            }),
        }
    }

    fn str_field(&self, name: &str) -> Option<String> {
        self.body
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
    }

    fn secs_field(&self, name: &str) -> Option<Duration> {
        self.body
            .get(name)
            .and_then(Value::as_u64)
            .map(Duration::from_secs)
    }
}

/// The start of an answer, for a message.
pub(crate) fn excerpt(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    if t.is_empty() { "(empty)".into() } else { t }
}

/// What the request was, for the errors that need it.
pub(crate) struct Asked<'a> {
    /// The connection asked for.
    pub connection: &'a str,
    /// What an approval would be for.
    pub approval_for: ApprovalFor,
    /// When the request was made (the client's clock).
    pub at: i64,
}

/// Sort an error answer by what the caller should do.
pub(crate) fn classify(a: OAuthAnswer, asked: Asked<'_>) -> Error {
    let OAuthAnswer {
        status,
        ref code,
        ref description,
        retry_after,
        ..
    } = a;
    let (code, description) = (code.clone(), description.clone());
    match code.as_str() {
        NOT_CONNECTED => Error::NotConnected {
            connection: asked.connection.to_owned(),
            connect_url: a.str_field("connect_uri"),
            status,
            description,
        },
        "authorization_pending" if a.body.get("auth_req_id").is_some() => {
            let interval = a
                .secs_field("interval")
                .unwrap_or(crate::approval::DEFAULT_INTERVAL);
            let expires_in = a.secs_field("expires_in").unwrap_or(Duration::ZERO);
            let approval_url = a.str_field("approval_uri").unwrap_or_default();
            Error::ApprovalRequired(Box::new(PendingApproval::new(
                a.str_field("auth_req_id").unwrap_or_default(),
                approval_url,
                interval,
                expires_in,
                asked.at,
                asked.approval_for,
                status,
                description,
            )))
        }
        "access_denied" | "invalid_scope" | "unauthorized_client" => Error::Denied {
            code,
            status,
            description,
        },
        "invalid_client" | "invalid_token" => Error::InvalidClient {
            code,
            status,
            description,
        },
        "too_many_requests" | "slow_down" => Error::RateLimited {
            retry_after: retry_after.or_else(|| a.secs_field("interval")),
            description,
        },
        _ if status == 429 => Error::RateLimited {
            retry_after,
            description,
        },
        _ if code == "temporarily_unavailable" || status >= 500 => Error::Unavailable {
            retry_after,
            status,
            code,
            description,
        },
        _ => Error::Rejected {
            code,
            status,
            description,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::TokenRequest;

    fn answer(status: u16, retry_after: Option<&str>, body: Value) -> Error {
        let a = OAuthAnswer::parse(status, retry_after, &body.to_string()).unwrap();
        classify(
            a,
            Asked {
                connection: "demo-git",
                approval_for: ApprovalFor::Token(TokenRequest::new("demo-git", "usr_1")),
                at: 1000,
            },
        )
    }

    #[test]
    fn not_connected_carries_the_connect_url() {
        // The token endpoint's answer (crates/core/src/error.rs, OAuthError::not_connected).
        let e = answer(
            401,
            None,
            json!({"error": NOT_CONNECTED,
                   "error_description": "Federated connection Refresh Token not found: the user must connect demo-git at https://h/connect/demo-git",
                   "connect_uri": "https://h/connect/demo-git"}),
        );
        let Error::NotConnected {
            connection,
            connect_url,
            status,
            description,
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!(connection, "demo-git");
        assert_eq!(connect_url.as_deref(), Some("https://h/connect/demo-git"));
        assert_eq!(*status, 401);
        assert!(description.starts_with("Federated connection"));
        assert!(e.to_string().contains("https://h/connect/demo-git"));
        assert_eq!(e.code(), Some(NOT_CONNECTED));
    }

    #[test]
    fn a_held_exchange_is_an_approval_to_wait_for() {
        let e = answer(
            403,
            None,
            json!({"error": "authorization_pending", "error_description": "needs approval",
                   "auth_req_id": "req-secret", "expires_in": 300, "interval": 5,
                   "approval_uri": "https://h/ui/approvals/apr_123"}),
        );
        let Error::ApprovalRequired(p) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(p.auth_req_id(), "req-secret");
        assert_eq!(p.approval_id.as_deref(), Some("apr_123"));
        assert_eq!(p.approval_url, "https://h/ui/approvals/apr_123");
        assert_eq!(p.interval, Duration::from_secs(5));
        assert_eq!(p.expires_in, Duration::from_secs(300));
        assert_eq!(p.expires_at(), 1300);
        assert_eq!(p.description, "needs approval");
        assert!(
            !format!("{e:?}").contains("req-secret"),
            "Debug does not show the auth_req_id"
        );
    }

    #[test]
    fn policy_refusals_are_denials() {
        for (status, code) in [
            (403, "access_denied"),
            (400, "invalid_scope"),
            (403, "unauthorized_client"),
        ] {
            let e = answer(
                status,
                None,
                json!({"error": code, "error_description": "why"}),
            );
            assert!(
                matches!(&e, Error::Denied { code: c, status: s, description }
                    if c == code && *s == status && description == "why"),
                "{e:?}"
            );
        }
    }

    #[test]
    fn limits_and_outages_carry_retry_after() {
        let e = answer(
            429,
            Some("17"),
            json!({"error": "too_many_requests", "error_description": "quota"}),
        );
        assert!(
            matches!(&e, Error::RateLimited { retry_after: Some(d), description }
            if d.as_secs() == 17 && description == "quota")
        );
        assert!(e.is_transient());
        let e = answer(
            503,
            Some("1"),
            json!({"error": "temporarily_unavailable", "error_description": "audit down"}),
        );
        assert!(
            matches!(&e, Error::Unavailable { retry_after: Some(d), status: 503, .. }
            if d.as_secs() == 1)
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
        // A bare 502 from a proxy in front of Latchkey.
        let e = OAuthAnswer::parse(502, None, "<html>bad gateway</html>").unwrap_err();
        assert!(matches!(e, Error::Unavailable { status: 502, .. }), "{e:?}");
    }

    #[test]
    fn credentials_and_malformed_requests() {
        let e = answer(
            401,
            None,
            json!({"error": "invalid_client", "error_description": "wrong secret"}),
        );
        assert!(
            matches!(&e, Error::InvalidClient { status: 401, .. }),
            "{e:?}"
        );
        let e = answer(
            400,
            None,
            json!({"error": "invalid_grant", "error_description": "subject_token rejected"}),
        );
        assert!(matches!(&e, Error::Rejected { code, status: 400, .. } if code == "invalid_grant"));
        assert_eq!(e.to_string(), "invalid_grant (400): subject_token rejected");
        let e = OAuthAnswer::parse(400, None, "{\"no\": 1}").unwrap_err();
        assert!(
            matches!(
                e,
                Error::Protocol {
                    status: Some(400),
                    ..
                }
            ),
            "{e:?}"
        );
    }
}
