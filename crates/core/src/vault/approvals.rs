//! Approvals of risky token exchanges (the grant policy's medium, high and critical levels).
//!
//! [`Vault::approval_gate`] is asked by the exchange (`exchange.rs`) when the policy says a
//! request needs the user's approval. It looks for an approval of exactly this request (the
//! policy's [`crate::policy::request_hash`] of agent, user, connection and scopes): approved,
//! unexpired and not used up. With one, the exchange goes ahead — and a single-use (critical)
//! approval is consumed here, atomically, so that it serves one release. Without one, the
//! request becomes a pending approval (or joins the identical one already pending: one prompt
//! however often the agent asks) and the exchange answers `403 authorization_pending` carrying
//! the approval's `auth_req_id`, `expires_in`, `interval` and `approval_uri`: the agent polls the
//! CIBA grant with it (`ciba.rs`) and, once the user approves, receives the upstream token for
//! exactly the approved connection and scopes — or repeats the exchange.
//!
//! A request for more (another scope, another connection) has another hash: not covered.
//!
//! Here too: the decisions — the user on the approvals page (with step-up for high and
//! critical requests), an operator with `latchkey approvals` — and expiry.

use serde_json::json;

use super::ciba::GRANT_CIBA;
use super::users::StepUp;
use super::*;
use crate::policy::{ApprovalOutcome, ApprovalRequest};
use crate::store::{ApprovalFilter, ApprovalUpdate};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalDecision {
    Approve,
    Deny,
}

/// Who decides.
pub enum Decider<'a> {
    /// The user on the approvals page: their session cookie value and, for step-up, a code.
    User {
        session_token: &'a str,
        totp: Option<&'a str>,
        ctx: &'a RequestContext,
    },
    /// An operator (`latchkey approvals approve|deny`).
    Operator(&'a Actor),
}

/// Why a decision was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum DecideError {
    /// No such approval (or not the signed-in user's).
    NotFound,
    /// Already decided, expired or used.
    NotPending(ApprovalStatus),
    /// Approving it needs a recent TOTP code: ask for one.
    StepUpRequired,
    /// The code given was wrong (or used before); the request stays pending.
    WrongCode,
    /// Too many wrong codes: try again in this many seconds.
    Throttled(u64),
    /// It needs a second factor and the user has none enrolled.
    NoSecondFactor,
    Unavailable,
}

impl std::fmt::Display for DecideError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound => f.write_str("no such approval request"),
            Self::NotPending(s) => write!(f, "the request is no longer pending ({})", s.as_str()),
            Self::StepUpRequired => {
                f.write_str("approving this request needs a current code from your authenticator")
            }
            Self::WrongCode => f.write_str("that code is not valid; the request is still pending"),
            Self::Throttled(wait) => write!(
                f,
                "too many wrong codes; try again in {} minute(s)",
                wait.div_ceil(60)
            ),
            Self::NoSecondFactor => f.write_str(
                "this request needs a second factor and none is set up: deny it, or ask an operator",
            ),
            Self::Unavailable => f.write_str("the vault is unavailable; retry shortly"),
        }
    }
}

impl std::error::Error for DecideError {}

impl From<OAuthError> for DecideError {
    fn from(_: OAuthError) -> Self {
        Self::Unavailable
    }
}

impl From<StoreError> for DecideError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failure");
        Self::Unavailable
    }
}

fn is_high(risk: &str) -> bool {
    matches!(risk, "high" | "critical")
}

impl Vault {
    /// Decide whether a request that needs the user's approval may go ahead: `Ok` with the
    /// approval that covers it, or the error the client gets (nothing is released).
    pub(super) async fn approval_gate(
        &self,
        req: &ApprovalRequest,
    ) -> Result<ApprovalOutcome, OAuthError> {
        let agent = Actor {
            kind: "agent",
            id: req.agent_id.clone(),
            method: "token_exchange",
        };
        if let Some(outcome) = self.covering_approval(req, &agent).await? {
            return Ok(outcome);
        }
        if let Some(m) = &req.binding_message
            && !super::ciba::valid_binding_message(m)
        {
            return Err(OAuthError::invalid_request(
                "binding_message must be at most 64 letters, digits, spaces and +-_.,:#",
            ));
        }
        let mut a = self.new_approval(ApprovalKind::Exchange, &req.agent_id, &req.user_id);
        a.connection = Some(req.connection.clone());
        a.scopes = req.scopes.clone();
        a.risk = req.risk.as_str().to_owned();
        a.step_up = req.requirement.recent_mfa;
        a.single_use = req.requirement.single_use;
        a.request_hash = req.request_hash.clone();
        a.binding_message.clone_from(&req.binding_message);
        a.authorization_details
            .clone_from(&req.authorization_details);
        a.audit_context.clone_from(&req.audit_context);
        a.login_hint.clone_from(&req.login_hint);
        let (a, pending) = self
            .open_approval(a, &agent, &RequestContext::default())
            .await?;
        let uri = self.approval_uri(&a.id);
        Err(OAuthError {
            status: 403,
            code: "authorization_pending",
            description: format!(
                "this request needs the user's approval (risk {}); they decide at {uri}. Poll \
                 grant_type={GRANT_CIBA} with auth_req_id every `interval` seconds, or repeat \
                 this request once it is approved",
                a.risk
            ),
            extra: vec![
                ("auth_req_id", json!(pending.auth_req_id)),
                ("expires_in", json!(pending.expires_in)),
                ("interval", json!(pending.interval)),
                ("approval_uri", json!(uri)),
            ],
            ..OAuthError::access_denied("")
        })
    }

    /// An approval of exactly `req` that still covers it; a single-use one is consumed here
    /// (approved → redeemed, with its `approval.redeem` entry), and its key goes on to the
    /// release's transaction as well.
    async fn covering_approval(
        &self,
        req: &ApprovalRequest,
        agent: &Actor,
    ) -> Result<Option<ApprovalOutcome>, OAuthError> {
        let now = self.now();
        let Some(a) = self
            .store
            .usable_approval(&req.request_hash, &req.agent_id, &req.user_id, now)
            .await
            .map_err(store_err)?
        else {
            return Ok(None);
        };
        // The hash binds these; checked again so that a hash collision could not widen a grant.
        if a.kind != ApprovalKind::Exchange
            || a.connection.as_deref() != Some(req.connection.as_str())
            || a.scopes != req.scopes
        {
            return Ok(None);
        }
        let approved_by = a.decided_by.clone().unwrap_or_default();
        if !a.single_use {
            return Ok(Some(ApprovalOutcome::Approved {
                approval_id: a.id,
                approved_by,
                single_use: None,
            }));
        }
        let update = ApprovalUpdate {
            id: a.id.clone(),
            from: ApprovalStatus::Approved,
            to: ApprovalStatus::Redeemed,
            at: now,
            live: true,
            decided_by: None,
            stepped_up: false,
            expires_at: None,
            redeem: true,
            reason: None,
        };
        let audit = self.approval_audit(
            &a,
            "approval.redeem",
            agent,
            None,
            format!("{}: consumed by an exchange (single use)", a.id),
        );
        if !self
            .store
            .update_approval(&update, &audit)
            .await
            .map_err(store_err)?
        {
            // Another exchange consumed it first: this one needs a new approval.
            return Ok(None);
        }
        Ok(Some(ApprovalOutcome::Approved {
            single_use: Some(JtiUse {
                key: format!("approval:{}", a.id),
                expires_at: a.expires_at.max(now) + 60,
            }),
            approval_id: a.id,
            approved_by,
        }))
    }

    // --- decisions -----------------------------------------------------------------------------

    /// Mark an approval whose deadline passed as expired (once), with its entry and event.
    pub(super) async fn expire_approval(&self, a: &Approval) -> Result<bool, OAuthError> {
        let reason = match a.status {
            ApprovalStatus::Pending => format!("{}: not decided in time", a.id),
            _ => format!("{}: approved, but its window ended", a.id),
        };
        let mut expired = a.clone();
        expired.status = ApprovalStatus::Expired;
        let actor = Actor {
            kind: "operator",
            id: "vault".into(),
            method: "expiry",
        };
        let audit = AuditRecord {
            decision: "deny".into(),
            notify: if a.status == ApprovalStatus::Pending {
                self.approval_event("approval.decided", &expired).await
            } else {
                None
            },
            ..self.approval_audit(a, "approval.expire", &actor, None, reason.clone())
        };
        let update = ApprovalUpdate {
            id: a.id.clone(),
            from: a.status,
            to: ApprovalStatus::Expired,
            at: self.now(),
            live: false,
            decided_by: None,
            stepped_up: false,
            expires_at: None,
            redeem: false,
            reason: Some(reason),
        };
        self.store
            .update_approval(&update, &audit)
            .await
            .map_err(store_err)
    }

    /// Expire what is due (the server does this every minute); the number expired.
    pub async fn expire_approvals(&self, limit: i64) -> Result<usize, OAuthError> {
        let due = self
            .store
            .due_approvals(self.now(), limit)
            .await
            .map_err(store_err)?;
        let mut n = 0;
        for a in &due {
            if self.expire_approval(a).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The signed-in user's approvals (pending first is the caller's choice of `status`).
    pub async fn user_approvals(
        &self,
        user_id: &str,
        status: Option<ApprovalStatus>,
        limit: i64,
    ) -> Result<Vec<Approval>, OAuthError> {
        self.store
            .list_approvals(&ApprovalFilter {
                user_id: Some(user_id.to_owned()),
                status,
                limit,
            })
            .await
            .map_err(store_err)
    }

    /// An approval, if it belongs to `user_id`.
    pub async fn user_approval(
        &self,
        id: &str,
        user_id: &str,
    ) -> Result<Option<Approval>, OAuthError> {
        Ok(self
            .store
            .approval(id)
            .await
            .map_err(store_err)?
            .filter(|a| a.user_id == user_id))
    }

    /// Whether approving `a` in this session needs a TOTP code first.
    pub fn needs_step_up(&self, a: &Approval, session: &Session) -> bool {
        let window = self.config.approvals.step_up_minutes * 60;
        let now = self.now();
        (a.step_up || is_high(&a.risk))
            && !session
                .mfa_at
                .is_some_and(|t| t <= now && now - t <= window)
    }

    /// Approve or deny a pending request. The user must be signed in as its user; approving a
    /// high or critical one needs a TOTP code given within `step_up_minutes` (a wrong code
    /// leaves it pending, and is recorded). An operator may decide any request.
    pub async fn decide_approval(
        &self,
        id: &str,
        decision: ApprovalDecision,
        note: Option<&str>,
        decider: Decider<'_>,
    ) -> Result<Approval, DecideError> {
        let a = self
            .store
            .approval(id)
            .await?
            .ok_or(DecideError::NotFound)?;
        let now = self.now();
        let (mut actor, ctx, session) = match &decider {
            Decider::User {
                session_token, ctx, ..
            } => {
                let session = self
                    .session(session_token)
                    .await?
                    .filter(|s| !s.pending_mfa && s.user_id == a.user_id)
                    .ok_or(DecideError::NotFound)?;
                (Actor::user(&a.user_id), Some(*ctx), Some(session))
            }
            Decider::Operator(actor) => ((*actor).clone(), None, None),
        };
        if a.status != ApprovalStatus::Pending {
            return Err(DecideError::NotPending(a.status));
        }
        if a.expires_at <= now {
            self.expire_approval(&a).await?;
            return Err(DecideError::NotPending(ApprovalStatus::Expired));
        }
        let approve = decision == ApprovalDecision::Approve;
        // Step-up: only the user can give their second factor. An operator's decision is
        // recorded as theirs, without it.
        let mut stepped_up = false;
        if let (
            Some(session),
            Decider::User {
                session_token,
                totp,
                ctx,
            },
        ) = (&session, &decider)
            && approve
            && (a.step_up || is_high(&a.risk))
        {
            let user = self
                .store
                .user_by_id(&a.user_id)
                .await?
                .ok_or(DecideError::NotFound)?;
            if !user.totp_enabled {
                return Err(DecideError::NoSecondFactor);
            }
            if self.needs_step_up(&a, session) {
                let code = totp.ok_or(DecideError::StepUpRequired)?;
                let failed = match self.step_up_code(&user, code, ctx.client_ip).await? {
                    StepUp::Verified => None,
                    StepUp::Wrong => Some((DecideError::WrongCode, "wrong TOTP code")),
                    StepUp::Throttled(wait) => Some((DecideError::Throttled(wait), "throttled")),
                    StepUp::NotEnrolled => Some((DecideError::NoSecondFactor, "no second factor")),
                };
                if let Some((err, why)) = failed {
                    let audit = AuditRecord {
                        decision: "deny".into(),
                        ..self.approval_audit(
                            &a,
                            "approval.approve",
                            &Actor {
                                method: "session+totp",
                                ..actor.clone()
                            },
                            Some(ctx),
                            format!("{}: step-up failed ({why}); still pending", a.id),
                        )
                    };
                    if let Err(e) = self.store.append_audit(&audit).await {
                        tracing::warn!(error = %e, "the audit entry of a failed step-up could not be written");
                    }
                    return Err(err);
                }
                self.store
                    .record_session_mfa(&secrets::sha256_b64(session_token.as_bytes()), now)
                    .await?;
                actor.method = "session+totp";
            }
            stepped_up = true;
        }
        let note = note.map(|n| n.chars().take(200).collect::<String>());
        let reason = format!(
            "{}: {}{}{}",
            a.id,
            if approve { "approved" } else { "denied" },
            if stepped_up { " with step-up" } else { "" },
            note.as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        let mut decided = a.clone();
        decided.status = if approve {
            ApprovalStatus::Approved
        } else {
            ApprovalStatus::Denied
        };
        decided.decided_by = Some(format!("{}:{}", actor.kind, actor.id));
        decided.decided_at = Some(now);
        decided.stepped_up = stepped_up;
        decided.reason = Some(reason.clone());
        if approve {
            decided.expires_at = now + self.config.approvals.valid_for;
        }
        let audit = AuditRecord {
            decision: if approve { "allow" } else { "deny" }.into(),
            notify: self.approval_event("approval.decided", &decided).await,
            ..self.approval_audit(
                &a,
                if approve {
                    "approval.approve"
                } else {
                    "approval.deny"
                },
                &actor,
                ctx,
                reason.clone(),
            )
        };
        let update = ApprovalUpdate {
            id: a.id.clone(),
            from: ApprovalStatus::Pending,
            to: decided.status,
            at: now,
            live: true,
            decided_by: decided.decided_by.clone(),
            stepped_up,
            expires_at: approve.then_some(decided.expires_at),
            redeem: false,
            reason: Some(reason),
        };
        if !self.store.update_approval(&update, &audit).await? {
            let now_status = self
                .store
                .approval(id)
                .await?
                .map_or(ApprovalStatus::Expired, |a| a.status);
            return Err(DecideError::NotPending(now_status));
        }
        Ok(decided)
    }
}
