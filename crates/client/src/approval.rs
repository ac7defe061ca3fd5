//! Exchanges held for the user's approval, and waiting for the decision.
//!
//! When the grant's policy says a request needs the user's approval, Latchkey answers the
//! exchange with `403 authorization_pending` and the approval's `auth_req_id`, `interval`,
//! `expires_in` and `approval_uri` ([`Error::ApprovalRequired`]). The agent shows the user
//! the link and polls the CIBA grant (`urn:openid:params:grant-type:ciba`) with the
//! `auth_req_id` every `interval` seconds; once the user approves, the poll answers the token
//! for exactly the approved connection and scopes. [`Client::wait_for_approval`] does the
//! polling, slows down when told to, and caches the token it gets like any other.

use std::time::Duration;

use crate::cache::Fresh;
use crate::error::{Asked, Error, OAuthAnswer, classify};
use crate::token::{GRANT_CIBA, TokenRequest};
use crate::{Client, Inner};

/// CIBA's default polling interval, when an answer names none.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Each `slow_down` adds this much (CIBA §11).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// What an approval is for.
#[derive(Clone, Debug)]
pub(crate) enum ApprovalFor {
    /// A token exchange: the approved token comes from polling.
    Token(TokenRequest),
    /// A call through the proxy: repeat the call once approved.
    Call,
}

/// A request waiting for the user's decision. `Debug` does not show the `auth_req_id`.
#[derive(Clone)]
pub struct PendingApproval {
    auth_req_id: String,
    /// The approval's id (`apr_…`), as the dashboard and `latchkey approvals` name it.
    pub approval_id: Option<String>,
    /// Where the user decides (the server's `approval_uri`): show it to them.
    pub approval_url: String,
    /// The least time between polls the server asked for.
    pub interval: Duration,
    /// How long the request waits for the decision, from when it was answered.
    pub expires_in: Duration,
    /// The HTTP status of the answer (403).
    pub status: u16,
    /// The server's `error_description`.
    pub description: String,
    requested_at: i64,
    approval_for: ApprovalFor,
}

impl std::fmt::Debug for PendingApproval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingApproval")
            .field("approval_id", &self.approval_id)
            .field("approval_url", &self.approval_url)
            .field("interval", &self.interval)
            .field("expires_in", &self.expires_in)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl PendingApproval {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        auth_req_id: String,
        approval_url: String,
        interval: Duration,
        expires_in: Duration,
        requested_at: i64,
        approval_for: ApprovalFor,
        status: u16,
        description: String,
    ) -> Self {
        let approval_id = approval_url
            .rsplit('/')
            .next()
            .filter(|id| id.starts_with("apr_"))
            .map(str::to_owned);
        Self {
            auth_req_id,
            approval_id,
            approval_url,
            interval,
            expires_in,
            status,
            description,
            requested_at,
            approval_for,
        }
    }

    /// The CIBA `auth_req_id` to poll with (it works only for this client, and once).
    pub fn auth_req_id(&self) -> &str {
        &self.auth_req_id
    }

    /// When the request stops waiting: Unix seconds on the client's clock.
    pub fn expires_at(&self) -> i64 {
        self.requested_at
            .saturating_add(self.expires_in.as_secs() as i64)
    }

    /// The token request this approval is for; `None` for a call through the proxy (repeat
    /// the call once the user approved: the approval covers the same call).
    pub fn token_request(&self) -> Option<&TokenRequest> {
        match &self.approval_for {
            ApprovalFor::Token(r) => Some(r),
            ApprovalFor::Call => None,
        }
    }
}

/// One poll's outcome, short of a token.
enum Poll {
    Pending,
    SlowDown(Option<Duration>),
    Failed(Error),
}

impl Client {
    /// Wait until the user decides on a held exchange, polling every `interval` (slower when
    /// told), for at most `timeout`: the token once approved (cached like any other, so the
    /// next [`Client::token_for`] of the same request is served without a call);
    /// [`Error::Denied`] if the user denied it; [`Error::ApprovalExpired`] if the request
    /// expired first; [`Error::ApprovalTimedOut`] if `timeout` passed first (the request is
    /// still pending: wait again, or give up). Rate limits and outages while polling are
    /// waited out.
    pub async fn wait_for_approval(
        &self,
        pending: &PendingApproval,
        timeout: Duration,
    ) -> Result<crate::AccessToken, Error> {
        let Some(req) = pending.token_request() else {
            return Err(Error::Config(
                "this approval is for a call through the proxy: repeat the call once the user \
                 has approved it (the approval covers the same call)"
                    .into(),
            ));
        };
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = pending.interval.max(Duration::from_secs(1));
        // The first poll one interval after the request was answered (CIBA), or now if that
        // has passed.
        let elapsed = inner
            .clock
            .now()
            .saturating_sub(pending.requested_at)
            .max(0) as u64;
        let mut wait = interval.saturating_sub(Duration::from_secs(elapsed));
        loop {
            if tokio::time::Instant::now() + wait > deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(Error::ApprovalTimedOut(Box::new(pending.clone())));
            }
            tokio::time::sleep(wait).await;
            match inner.poll(pending).await {
                Ok(fresh) => {
                    let token = fresh.value.clone();
                    inner.tokens.insert(req.clone(), fresh);
                    return Ok(token);
                }
                Err(Poll::Pending) => wait = interval,
                Err(Poll::SlowDown(asked)) => {
                    interval = asked.unwrap_or(interval + SLOW_DOWN_STEP).max(interval);
                    wait = interval;
                }
                Err(Poll::Failed(e)) if e.is_transient() => {
                    wait = e.retry_after().unwrap_or(interval).max(interval);
                }
                Err(Poll::Failed(Error::Denied {
                    code, description, ..
                })) if code == "access_denied"
                    // Latchkey (as Auth0) answers access_denied for an expired request too.
                    && inner.clock.now() >= pending.expires_at() - 1 =>
                {
                    return Err(Error::ApprovalExpired {
                        approval: Box::new(pending.clone()),
                        description,
                    });
                }
                Err(Poll::Failed(e)) => return Err(e),
            }
        }
    }
}

impl Inner {
    /// Poll the CIBA grant once.
    async fn poll(&self, pending: &PendingApproval) -> Result<Fresh<crate::AccessToken>, Poll> {
        let at = self.clock.now();
        let form = vec![
            ("grant_type", GRANT_CIBA.to_owned()),
            ("auth_req_id", pending.auth_req_id.clone()),
        ];
        let answer = self.post_token(form, at).await.map_err(Poll::Failed)?;
        if answer.status == 200 {
            return self
                .token_answer(answer, at, "", pending.approval_for.clone())
                .map_err(Poll::Failed);
        }
        let parsed = OAuthAnswer::parse(answer.status, answer.retry_after.as_deref(), &answer.text)
            .map_err(Poll::Failed)?;
        match parsed.code.as_str() {
            "authorization_pending" => Err(Poll::Pending),
            "slow_down" => {
                let asked = parsed
                    .body
                    .get("interval")
                    .and_then(serde_json::Value::as_u64)
                    .or_else(|| parsed.retry_after.map(|d| d.as_secs()))
                    .map(Duration::from_secs);
                Err(Poll::SlowDown(asked))
            }
            _ => {
                let connection = pending
                    .token_request()
                    .map(TokenRequest::connection)
                    .unwrap_or_default();
                Err(Poll::Failed(classify(
                    parsed,
                    Asked {
                        connection,
                        approval_for: pending.approval_for.clone(),
                        at,
                    },
                )))
            }
        }
    }
}
