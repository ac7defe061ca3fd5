//! Asynchronous approval: OpenID CIBA in poll mode — `POST /bc-authorize`, then the
//! `urn:openid:params:grant-type:ciba` grant at `/oauth/token` — and the approvals behind it,
//! which the user decides on Latchkey's approvals page (or an operator with `latchkey
//! approvals`). Token exchanges the policy holds for the user (`approvals.rs`) become the same
//! kind of approval and are polled with the same grant.
//!
//! An approval is one stored request: who asked (the client), for whom, for what (a CIBA
//! `scope` and `authorization_details`, or an exchange's connection and scopes), its risk, and
//! a digest of exactly that request. The client polls with an `auth_req_id`: an HMAC of the
//! approval's random id under a server key (256 bits), stored only as its SHA-256. Being
//! recomputable, an identical request asked again while the first is pending gets the same
//! `auth_req_id` — one prompt, not two. It is bound to the client that asked, redeemed once,
//! and dies with the request's deadline.
//!
//! This module holds the wire (`/bc-authorize`, the grant, redemption) and the record itself;
//! `approvals.rs` the exchange's gate, the decisions and expiry.
//!
//! Every change of state is one transaction with its audit entry (`approval.request`,
//! `approval.approve`, `approval.deny`, `approval.expire`, `approval.redeem`) and, when
//! webhooks are configured, its `approval.requested` / `approval.decided` event.

use serde_json::{Value, json};

use super::exchange::{Attempt, AuthenticatedClient, ip_allowed};
use super::oidc::Issue;
use super::*;
use crate::error::ErrorSource;
use crate::store::{ApprovalCaps, ApprovalCreated, ApprovalUpdate};

pub const GRANT_CIBA: &str = "urn:openid:params:grant-type:ciba";
/// `slow_down` adds this to the interval (CIBA §11, as RFC 8628 §3.5).
const SLOW_DOWN_STEP: i64 = 5;
const MAX_INTERVAL: i64 = 60;
const MAX_BINDING_MESSAGE: usize = 64;
/// Largest `authorization_details` accepted (characters of JSON).
const MAX_AUTHORIZATION_DETAILS: usize = 4096;

/// Deadlines, polling, step-up and anti-fatigue caps of approvals.
#[derive(Clone, Debug)]
pub struct ApprovalSettings {
    /// Seconds a request waits for the decision when the client names none.
    pub default_expiry: i64,
    /// Longest `requested_expiry` honoured; longer ones are cut to it.
    pub max_expiry: i64,
    /// Seconds a client must leave between polls; each `slow_down` adds five.
    pub interval: i64,
    /// Once approved: seconds in which the `auth_req_id` may be redeemed, and in which the
    /// approval covers identical exchanges (unless single use).
    pub valid_for: i64,
    /// Approving a high or critical request needs a TOTP code given within this many minutes.
    pub step_up_minutes: i64,
    /// Pending requests one user may have at a time (anti-fatigue).
    pub pending_per_user: i64,
    /// Pending requests one agent may have at a time.
    pub pending_per_agent: i64,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        Self {
            default_expiry: 300,
            max_expiry: 300,
            interval: 5,
            valid_for: 300,
            step_up_minutes: 5,
            pending_per_user: 10,
            pending_per_agent: 20,
        }
    }
}

/// The answer of `/bc-authorize`.
#[derive(Debug)]
pub struct BackchannelResponse {
    pub auth_req_id: String,
    pub expires_in: i64,
    pub interval: i64,
}

fn with_code(code: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError {
        code,
        ..OAuthError::invalid_request(description)
    }
}

fn access_denied(why: &str) -> OAuthError {
    with_code(
        "access_denied",
        format!("The end-user denied the authorization request or it has been expired: {why}"),
    )
}

/// `binding_message`: short, and letters, digits, spaces and `+-_.,:#` only (Auth0's rule),
/// so that it reads the same on every screen it is shown on.
pub(super) fn valid_binding_message(m: &str) -> bool {
    m.chars().count() <= MAX_BINDING_MESSAGE
        && m.chars()
            .all(|c| c.is_alphanumeric() || " +-_.,:#".contains(c))
}

/// RFC 9396: a JSON array of objects, each with a string `type`.
pub(super) fn parse_authorization_details(text: &str) -> Result<Value, OAuthError> {
    let bad = |why: &str| {
        with_code(
            "invalid_authorization_details",
            format!("authorization_details {why}"),
        )
    };
    if text.chars().count() > MAX_AUTHORIZATION_DETAILS {
        return Err(bad(&format!(
            "exceeds {MAX_AUTHORIZATION_DETAILS} characters"
        )));
    }
    let v: Value = serde_json::from_str(text).map_err(|_| bad("is not JSON"))?;
    let items = v
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("must be a non-empty JSON array"))?;
    if !items
        .iter()
        .all(|i| i["type"].as_str().is_some_and(|t| !t.is_empty()))
    {
        return Err(bad("entries must be objects with a `type`"));
    }
    if items.iter().any(|i| i["type"] == API_CALL) {
        return Err(bad(&format!(
            "type `{API_CALL}` is Latchkey's own (the approval of one call through /proxy); use another type"
        )));
    }
    Ok(v)
}

/// The `authorization_details` type Latchkey itself writes for the approval of one API call it
/// makes for an agent (`/proxy`, MCP `call_api`). Agents may not send it, so an approval that
/// shows the user an API call never releases a token.
pub(super) const API_CALL: &str = "api_call";

/// The call an approval covers (`METHOD PATH`) when Latchkey asked for it for one API call.
pub(super) fn approved_call(details: Option<&str>) -> Option<String> {
    let v: Value = serde_json::from_str(details?).ok()?;
    let call = v.as_array()?.iter().find(|d| d["type"] == API_CALL)?;
    Some(format!(
        "{} {}",
        call["method"].as_str().unwrap_or("?"),
        call["path"].as_str().unwrap_or("?")
    ))
}

/// Digest of exactly what was asked: what an approval is bound to.
pub(super) fn request_digest(parts: &Value) -> String {
    secrets::sha256_b64(parts.to_string().as_bytes())
}

impl Vault {
    /// The `auth_req_id` of an approval: HMAC of its id under the server pepper. Stored only
    /// as [`secrets::sha256_b64`] of it.
    fn auth_req_id(&self, approval_id: &str) -> String {
        secrets::hmac_b64(
            &self.pepper,
            format!("latchkey auth_req_id\n{approval_id}").as_bytes(),
        )
    }

    /// Where the user decides on an approval.
    pub fn approval_uri(&self, id: &str) -> String {
        format!("{}ui/approvals/{id}", self.config.issuer)
    }

    /// An approval as the CLI, the webhooks and the page show it. Never the `auth_req_id`.
    pub fn approval_json(&self, a: &Approval, agent_name: Option<&str>) -> Value {
        let details = a
            .authorization_details
            .as_deref()
            .and_then(|d| serde_json::from_str::<Value>(d).ok());
        json!({
            "id": a.id,
            "kind": a.kind.as_str(),
            "status": a.status.as_str(),
            "agent": {"id": a.client_id, "name": agent_name},
            "user_id": a.user_id,
            "connection": a.connection,
            "scopes": a.scopes.iter().collect::<Vec<_>>(),
            "audience": a.audience,
            "risk": a.risk,
            "step_up": a.step_up,
            "single_use": a.single_use,
            "binding_message": a.binding_message,
            "authorization_details": details,
            "audit_context": a.audit_context,
            "created_at": a.created_at,
            "expires_at": a.expires_at,
            "decided_by": a.decided_by,
            "decided_at": a.decided_at,
            "stepped_up": a.stepped_up,
            "reason": a.reason,
            "approval_uri": self.approval_uri(&a.id),
        })
    }

    /// An `approval.requested` / `approval.decided` event, if webhooks are configured.
    pub(super) async fn approval_event(&self, event: &str, a: &Approval) -> Option<Notification> {
        self.config.webhook.as_ref()?;
        let agent = self.store.agent_by_id(&a.client_id).await.ok().flatten();
        let user = self.store.user_by_id(&a.user_id).await.ok().flatten();
        let mut data = self.approval_json(a, agent.as_ref().map(|g| g.name.as_str()));
        data["username"] = json!(user.map(|u| u.username));
        let body = json!({ "type": event, "created_at": self.now(), "data": data });
        Some(Notification {
            event: event.to_owned(),
            body: body.to_string(),
        })
    }

    /// The audit entry of a change to `a`.
    pub(super) fn approval_audit(
        &self,
        a: &Approval,
        action: &str,
        actor: &Actor,
        ctx: Option<&RequestContext>,
        reason: String,
    ) -> AuditRecord {
        let base = match ctx {
            Some(c) => self.audit_in(actor, action, c),
            None => self.audit(actor, action),
        };
        AuditRecord {
            subject_user: Some(a.user_id.clone()),
            connection: a.connection.clone(),
            agent_id: Some(a.client_id.clone()),
            scopes: Some(a.scopes.to_string_spaced()),
            audit_context: a.audit_context.clone(),
            reason: Some(reason),
            ..base
        }
    }

    /// A new pending approval (random id, its `auth_req_id` hash, deadline, interval) for
    /// the caller to fill in.
    pub(super) fn new_approval(
        &self,
        kind: ApprovalKind,
        client_id: &str,
        user_id: &str,
    ) -> Approval {
        let id = secrets::random_id("apr");
        let now = self.now();
        let s = &self.config.approvals;
        Approval {
            req_hash: secrets::sha256_b64(self.auth_req_id(&id).as_bytes()),
            id,
            kind,
            client_id: client_id.to_owned(),
            user_id: user_id.to_owned(),
            connection: None,
            scopes: Scopes::default(),
            audience: None,
            authorization_details: None,
            binding_message: None,
            audit_context: None,
            login_hint: None,
            risk: "medium".into(),
            step_up: false,
            single_use: true,
            request_hash: String::new(),
            status: ApprovalStatus::Pending,
            created_at: now,
            expires_at: now + s.default_expiry,
            interval: s.interval,
            last_polled_at: None,
            decided_by: None,
            decided_at: None,
            stepped_up: false,
            redeemed_at: None,
            reason: None,
        }
    }

    /// Record a pending approval (one transaction with its `approval.request` entry and
    /// webhook), or find the identical one already pending. Over a cap: 429.
    pub(super) async fn open_approval(
        &self,
        a: Approval,
        actor: &Actor,
        ctx: &RequestContext,
    ) -> Result<(Approval, BackchannelResponse), OAuthError> {
        let s = &self.config.approvals;
        let reason = format!(
            "{} ({}, risk {}{}){}",
            a.id,
            a.kind.as_str(),
            a.risk,
            if a.step_up { ", step-up" } else { "" },
            a.binding_message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
        let audit = AuditRecord {
            notify: self.approval_event("approval.requested", &a).await,
            ..self.approval_audit(&a, "approval.request", actor, Some(ctx), reason)
        };
        let caps = ApprovalCaps {
            per_user: s.pending_per_user,
            per_client: s.pending_per_agent,
        };
        let a = match self
            .store
            .create_approval(&a, caps, &audit)
            .await
            .map_err(store_err)?
        {
            ApprovalCreated::Created => a,
            ApprovalCreated::Existing(existing) => *existing,
            ApprovalCreated::TooMany { per, next_expiry } => {
                let cap = if per == "user" {
                    s.pending_per_user
                } else {
                    s.pending_per_agent
                };
                return Err(OAuthError::too_many_requests(
                    format!(
                        "this {per} already has {cap} approval requests waiting for the user; \
                         wait for a decision (or for one to expire) before asking again"
                    ),
                    (next_expiry - self.now()).max(1) as u64,
                ));
            }
        };
        let response = BackchannelResponse {
            auth_req_id: self.auth_req_id(&a.id),
            expires_in: (a.expires_at - self.now()).max(1),
            interval: a.interval,
        };
        Ok((a, response))
    }

    // --- /bc-authorize ------------------------------------------------------------------------

    /// `POST /bc-authorize` (CIBA, poll mode).
    pub async fn bc_authorize(
        &self,
        params: &Params,
        basic: Option<BasicCredentials>,
        ctx: &RequestContext,
    ) -> Result<BackchannelResponse, OAuthError> {
        let authenticated = match self.authenticate_client(params, basic.as_ref()).await {
            Ok(c) if c.method == "none" => Err(OAuthError::invalid_client(
                "public clients cannot start backchannel requests; authenticate the client",
            )),
            other => other,
        };
        let client = match authenticated {
            Ok(c) => c,
            Err(e) => {
                self.audit_refusal(
                    &e,
                    Attempt::failed_authentication(),
                    params,
                    basic.as_ref(),
                    ctx,
                )
                .await;
                return Err(e);
            }
        };
        let mut user = None;
        let result = self
            .bc_authorize_inner(params, &client, ctx, &mut user)
            .await;
        if let Err(e) = &result
            && e.source == ErrorSource::Client
        {
            let audit = AuditRecord {
                at: self.now(),
                actor_type: "agent".into(),
                actor_id: client.agent.id.clone(),
                auth_method: client.method.into(),
                subject_user: user,
                action: "approval.request".into(),
                agent_id: Some(client.agent.id.clone()),
                scopes: params.get("scope").map(|s| s.chars().take(300).collect()),
                decision: "deny".into(),
                reason: Some(
                    format!("{}: {}", e.code, e.description)
                        .chars()
                        .take(300)
                        .collect(),
                ),
                request_id: ctx.request_id.clone(),
                client_ip: ctx.client_ip.map(|ip| ip.to_string()),
                ..Default::default()
            };
            if let Err(err) = self.store.append_audit(&audit).await {
                tracing::warn!(error = %err, "the audit entry of a refused backchannel request could not be written");
            }
        }
        result
    }

    async fn bc_authorize_inner(
        &self,
        params: &Params,
        client: &AuthenticatedClient,
        ctx: &RequestContext,
        user_seen: &mut Option<String>,
    ) -> Result<BackchannelResponse, OAuthError> {
        let agent = &client.agent;
        if let Err(retry_after) =
            self.rate
                .check(&agent.id, self.config.agent_requests_per_minute, self.now())
        {
            return Err(OAuthError::too_many_requests(
                format!(
                    "agent {} exceeded {} requests per minute",
                    agent.id, self.config.agent_requests_per_minute
                ),
                retry_after,
            ));
        }
        if params.get("login_hint_token").is_some() || params.get("id_token_hint").is_some() {
            return Err(OAuthError::invalid_request(
                "only `login_hint` (JSON, format iss_sub) identifies the user here",
            ));
        }
        let scope = Scopes::parse(params.require("scope")?);
        if !scope.iter().any(|s| s == "openid") {
            return Err(OAuthError::invalid_scope("scope must include openid"));
        }
        let user_id = self.login_hint_subject(params.require("login_hint")?)?;
        *user_seen = Some(user_id.clone());
        let Some(user) = self.store.user_by_id(&user_id).await.map_err(store_err)? else {
            return Err(with_code(
                "unknown_user_id",
                "login_hint names no user of this vault",
            ));
        };
        // The user must be able to see the request: sign in to the approvals page, or be
        // reached through the webhook.
        if user.password_hash.is_none() && self.config.webhook.is_none() {
            return Err(OAuthError::invalid_request(
                "the user has no way to receive approval requests (they cannot sign in and no webhook is configured)",
            ));
        }
        let binding_message = params.get("binding_message");
        if binding_message.is_some_and(|m| !valid_binding_message(m)) {
            return Err(OAuthError::invalid_request(format!(
                "binding_message must be at most {MAX_BINDING_MESSAGE} letters, digits, spaces and +-_.,:#"
            )));
        }
        // AI SDKs send `audience=` (absent here already) or, from Python, `audience=None`.
        let audience = match (
            params.get("audience").filter(|a| *a != "None"),
            params.get("resource"),
        ) {
            (Some(_), Some(_)) => {
                return Err(OAuthError::invalid_request(
                    "send audience or resource, not both",
                ));
            }
            (None, None) => None,
            (Some(a), None) | (None, Some(a)) => {
                if !self.known_audience(a, false).await? {
                    return Err(OAuthError::invalid_target("unknown audience"));
                }
                Some(a.to_owned())
            }
        };
        let s = &self.config.approvals;
        let expiry = match params
            .get("requested_expiry")
            .or_else(|| params.get("request_expiry"))
        {
            None => s.default_expiry,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n > 0 => n.min(s.max_expiry),
                _ => {
                    return Err(OAuthError::invalid_request(
                        "requested_expiry must be a positive number of seconds",
                    ));
                }
            },
        };
        let details = params
            .get("authorization_details")
            .map(|d| parse_authorization_details(d).map(|v| (d, v)))
            .transpose()?;

        let mut a = self.new_approval(ApprovalKind::Ciba, &agent.id, &user.id);
        a.expires_at = a.created_at + expiry;
        a.scopes = scope;
        a.audience = audience;
        a.binding_message = binding_message.map(str::to_owned);
        a.authorization_details = details.as_ref().map(|(text, _)| (*text).to_owned());
        a.request_hash = request_digest(&json!([
            "ciba",
            a.client_id,
            a.user_id,
            a.scopes.to_string_spaced(),
            a.audience,
            details.as_ref().map(|(_, v)| v),
            a.binding_message,
        ]));
        let actor = Actor {
            kind: "agent",
            id: agent.id.clone(),
            method: client.method,
        };
        Ok(self.open_approval(a, &actor, ctx).await?.1)
    }

    /// The user a CIBA `login_hint` names: `{"format":"iss_sub","iss":<this issuer>,"sub":…}`,
    /// with or without the issuer's trailing slash.
    fn login_hint_subject(&self, hint: &str) -> Result<String, OAuthError> {
        let bad = |why: &str| {
            OAuthError::invalid_request(format!(
                "login_hint must be JSON {{\"format\":\"iss_sub\",\"iss\":\"{}\",\"sub\":\"<user id>\"}}: {why}",
                self.config.issuer
            ))
        };
        let v: Value = serde_json::from_str(hint).map_err(|_| bad("not JSON"))?;
        if v["format"] != "iss_sub" {
            return Err(bad("format is not iss_sub"));
        }
        let iss = v["iss"].as_str().ok_or_else(|| bad("no iss"))?;
        if iss.trim_end_matches('/') != self.config.issuer.trim_end_matches('/') {
            return Err(bad("iss is not this vault"));
        }
        let sub = v["sub"].as_str().ok_or_else(|| bad("no sub"))?;
        if sub.is_empty() || sub.len() > 256 {
            return Err(bad("sub must be 1–256 characters"));
        }
        Ok(sub.to_owned())
    }

    // --- the CIBA grant ------------------------------------------------------------------------

    /// `grant_type=urn:openid:params:grant-type:ciba`: poll a request by its `auth_req_id`.
    pub(super) async fn ciba_grant(
        &self,
        params: &Params,
        client: &AuthenticatedClient,
        ctx: &RequestContext,
        attempt: &mut Attempt,
    ) -> Result<TokenResponse, OAuthError> {
        let id = params.require("auth_req_id")?;
        let unknown = || OAuthError::invalid_grant("unknown or already used auth_req_id");
        let a = self
            .store
            .approval_by_req_hash(&secrets::sha256_b64(id.as_bytes()))
            .await
            .map_err(store_err)?
            // Another client's request is as unknown as a guessed one.
            .filter(|a| a.client_id == client.agent.id)
            .ok_or_else(unknown)?;
        attempt.subject_user = Some(a.user_id.clone());
        attempt.connection.clone_from(&a.connection);
        attempt.scopes = Some(a.scopes.to_string_spaced());
        let now = self.now();
        match a.status {
            ApprovalStatus::Denied => Err(access_denied("the user denied it")),
            ApprovalStatus::Expired => Err(access_denied("it expired")),
            ApprovalStatus::Redeemed => Err(unknown()),
            ApprovalStatus::Approved if a.redeemed_at.is_some() => Err(unknown()),
            _ if a.expires_at <= now => {
                self.expire_approval(&a).await?;
                Err(access_denied("it expired"))
            }
            ApprovalStatus::Pending => {
                let too_fast = a.last_polled_at.is_some_and(|t| now - t < a.interval);
                let interval = if too_fast {
                    (a.interval + SLOW_DOWN_STEP).min(MAX_INTERVAL)
                } else {
                    a.interval
                };
                self.store
                    .record_approval_poll(&a.id, now, interval)
                    .await
                    .map_err(store_err)?;
                if too_fast {
                    let mut e = with_code(
                        "slow_down",
                        format!(
                            "You are polling faster than allowed. Try again in {interval} seconds."
                        ),
                    );
                    e.retry_after = Some(interval as u64);
                    e.extra.push(("interval", json!(interval)));
                    return Err(e);
                }
                Err(with_code(
                    "authorization_pending",
                    "The end-user authorization is pending",
                ))
            }
            ApprovalStatus::Approved => match a.kind {
                ApprovalKind::Ciba => self.redeem_ciba(&a, client, ctx).await,
                ApprovalKind::Exchange => self.redeem_exchange(&a, client, ctx, attempt).await,
            },
        }
    }

    /// An approved CIBA request: Latchkey's own tokens (ID token, access token, a refresh
    /// token with `offline_access`), in the transaction that marks it redeemed.
    async fn redeem_ciba(
        &self,
        a: &Approval,
        client: &AuthenticatedClient,
        ctx: &RequestContext,
    ) -> Result<TokenResponse, OAuthError> {
        let user = self
            .store
            .user_by_id(&a.user_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_grant("the user no longer exists"))?;
        let now = self.now();
        let family = TokenFamily {
            id: secrets::random_id("fam"),
            client_id: client.agent.id.clone(),
            user_id: user.id.clone(),
            scope: a.scopes.clone(),
            auth_time: a.decided_at.unwrap_or(now),
            amr: if a.stepped_up { "pwd otp" } else { "pwd" }.into(),
            revoked: false,
            created_at: now,
        };
        let refresh = a
            .scopes
            .iter()
            .any(|s| s == "offline_access")
            .then(|| secrets::random_token(32));
        let actor = Actor {
            kind: "agent",
            id: client.agent.id.clone(),
            method: client.method,
        };
        let audits = [
            self.approval_audit(
                a,
                "approval.redeem",
                &actor,
                Some(ctx),
                format!("{}: tokens issued; family {}", a.id, family.id),
            ),
            AuditRecord {
                subject_user: Some(user.id.clone()),
                agent_id: Some(client.agent.id.clone()),
                scopes: Some(a.scopes.to_string_spaced()),
                reason: Some(format!("ciba {}; family {}", a.id, family.id)),
                ..self.audit_in(
                    &Actor {
                        kind: "agent",
                        id: client.agent.id.clone(),
                        method: "ciba",
                    },
                    "token.issue",
                    ctx,
                )
            },
        ];
        let refresh_hash = refresh
            .as_deref()
            .map(|r| secrets::sha256_b64(r.as_bytes()));
        if !self
            .store
            .redeem_ciba_approval(&a.id, now, &family, refresh_hash.as_deref(), &audits)
            .await
            .map_err(store_err)?
        {
            return Err(OAuthError::invalid_grant(
                "unknown or already used auth_req_id",
            ));
        }
        let audience = a
            .audience
            .clone()
            .unwrap_or_else(|| self.config.issuer.clone());
        let mut tokens = self.tokens_for(
            &user,
            &client.agent,
            &family,
            Issue {
                scope: &a.scopes,
                audience: &audience,
                nonce: None,
                refresh,
            },
        );
        tokens.authorization_details = a
            .authorization_details
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok());
        Ok(tokens)
    }

    /// An approved exchange: the upstream token for exactly the approved connection and
    /// scopes (the grant is checked again: it may have changed since), released in one
    /// transaction that also consumes the `auth_req_id`.
    async fn redeem_exchange(
        &self,
        a: &Approval,
        client: &AuthenticatedClient,
        ctx: &RequestContext,
        attempt: &mut Attempt,
    ) -> Result<TokenResponse, OAuthError> {
        // Approved as one call through Latchkey: the agent repeats that call, and gets no
        // token for it.
        if let Some(call) = approved_call(a.authorization_details.as_deref()) {
            return Err(OAuthError::invalid_grant(format!(
                "this approval covers one API call through Latchkey ({call}), not a token: repeat that call"
            )));
        }
        let agent = &client.agent;
        let connection_name = a.connection.as_deref().unwrap_or_default();
        let connection = self
            .store
            .connection_by_name(connection_name)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_grant(format!(
                    "connection `{connection_name}` no longer exists"
                ))
            })?;
        let grant = self.grant_of(None, agent, &connection).await?;
        if !a.scopes.is_subset(&grant.scopes) {
            return Err(OAuthError::invalid_scope(
                "the approved scopes are no longer within the agent's grant",
            ));
        }
        // The grant's policy holds at redemption as at the request: readable, within its
        // hours, within its quotas; its lifetime cap shortens the answer.
        let policy = &grant.policy;
        if let Some(why) = &policy.unreadable {
            return Err(OAuthError::access_denied(format!(
                "the policy stored with the grant cannot be read ({why}); an operator must set the grant again"
            )));
        }
        if !crate::policy::within_hours(&policy.hours, self.now()) {
            return Err(OAuthError::access_denied(
                "outside the hours the grant allows; redeem the approval within them",
            ));
        }
        if !grant.ip_allowlist.is_empty()
            && !ctx
                .client_ip
                .is_some_and(|ip| ip_allowed(ip, &grant.ip_allowlist))
        {
            return Err(OAuthError::unauthorized_client(
                "the request comes from an address the grant does not allow",
            ));
        }
        let quota = self.reserve_quota(&grant, &connection, &a.user_id)?;
        let account = self
            .pick_account(&a.user_id, &connection, a.login_hint.as_deref())
            .await?;
        attempt.account_id = Some(account.id.clone());
        if !a.scopes.is_subset(&account.scopes) {
            return Err(OAuthError::invalid_scope(format!(
                "the user has not consented to {}; they must reconnect {connection_name}",
                a.scopes.missing_from(&account.scopes).join(" ")
            )));
        }
        let (access_token, expires_at) = self
            .fresh_access_token(
                account.clone(),
                &connection,
                &a.scopes,
                self.config.refresh_margin,
            )
            .await?;
        let now = self.now();
        let expires_in = policy.cap_lifetime(match expires_at {
            Some(t) => (t - now).max(1),
            None => self.config.non_expiring_ttl,
        });
        // The auth_req_id is single use in the release's own transaction (a unique insert),
        // so two racing polls never both release.
        let mut jtis = vec![JtiUse {
            key: format!("approval:{}", a.id),
            expires_at: a.expires_at.max(now) + 60,
        }];
        jtis.extend(client.assertion_jti.clone());
        let release = super::exchange::Release {
            agent,
            method: client.method,
            action: "token.release",
            user_id: &a.user_id,
            connection: &connection,
            account_id: &account.id,
            scopes: &a.scopes,
            token: &access_token,
            note: format!("; approval {}", a.id),
            audit_context: a.audit_context.clone(),
            ctx,
            jtis: &jtis,
            policy,
            quotas: quota.uses(),
            revision: None,
        };
        self.commit_agent_release(release, |i| {
            if i == 0 {
                OAuthError::invalid_grant("unknown or already used auth_req_id")
            } else {
                OAuthError::invalid_client("client assertion rejected: `jti` was already used")
            }
        })
        .await?;
        quota.keep();
        // Released: record the redemption. If this write fails the release above still
        // stands and the `approval:` identifier keeps the auth_req_id from working twice.
        let actor = Actor {
            kind: "agent",
            id: agent.id.clone(),
            method: client.method,
        };
        let update = ApprovalUpdate {
            id: a.id.clone(),
            from: ApprovalStatus::Approved,
            to: if a.single_use {
                ApprovalStatus::Redeemed
            } else {
                ApprovalStatus::Approved
            },
            at: now,
            live: false,
            decided_by: None,
            stepped_up: false,
            expires_at: None,
            redeem: true,
            reason: None,
        };
        let note = format!(
            "{}: upstream token released at the CIBA grant{}",
            a.id,
            if a.single_use {
                "; single use, consumed"
            } else {
                ""
            }
        );
        let audit = self.approval_audit(a, "approval.redeem", &actor, Some(ctx), note);
        if let Err(e) = self.store.update_approval(&update, &audit).await {
            tracing::warn!(error = %e, approval = %a.id, "recording an approval's redemption failed");
        }
        Ok(TokenResponse {
            access_token,
            expires_in,
            scope: a.scopes.to_string_spaced(),
            issued_token_type: Some(TOKEN_TYPE_VAULT_ACCESS),
            id_token: None,
            refresh_token: None,
            authorization_details: None,
        })
    }
}
