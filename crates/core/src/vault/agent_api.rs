//! The agent API: how an agent uses upstream APIs without ever holding an upstream token.
//!
//! - An agent gets a Latchkey access token of its own: `grant_type=client_credentials`, for
//!   the agent API resource `{issuer}mcp` (RFC 8707 `resource`), short-lived, never with a
//!   refresh token.
//! - Its calls to the credential-injecting proxy and the MCP server are authenticated here
//!   ([`Vault::authenticate_agent`]): that token plus the user it acts for, a user's access
//!   token issued to the agent for the agent API, or a privileged-worker JWT (single use).
//! - [`Vault::release_for_call`] decides and records the release of an upstream token for one
//!   API call, with the exchange's policy ([`Vault::decide`]); the proxy injects it and then
//!   records how the call went ([`Vault::record_call`]).

use serde_json::json;

use super::exchange::{ApiCall, Ask, Attempt, AuthenticatedClient, Decided, Release};
use super::*;

/// Lifetime of an agent's own access token (seconds).
pub const AGENT_TOKEN_TTL: i64 = 300;
/// Header naming the user an agent token acts for.
pub const USER_HEADER: &str = "latchkey-user";

/// A caller of the agent API (proxy, MCP), authenticated.
#[derive(Clone, Debug)]
pub struct AgentCaller {
    pub agent: Agent,
    /// How the agent proved itself: `agent_token` (its client-credentials token and the user
    /// it names), `user_token` (a user's access token issued to it for the agent API) or
    /// `worker_jwt` (a privileged-worker JWT, single use).
    pub method: &'static str,
    /// The user the agent acts for.
    pub user_id: String,
    /// The agent's stated reason (privileged-worker JWTs).
    pub audit_context: Option<String>,
    /// A privileged-worker JWT's `jti`, consumed with the first release it is used for.
    jti: Option<JtiUse>,
}

impl AgentCaller {
    /// What this caller asks to be released on `connection`.
    fn ask<'a>(
        &'a self,
        connection: &'a str,
        scope: Option<&'a str>,
        call: Option<ApiCall<'a>>,
    ) -> Ask<'a> {
        Ask {
            agent: &self.agent,
            user_id: &self.user_id,
            audit_context: self.audit_context.as_deref(),
            connection,
            scope,
            login_hint: None,
            binding_message: None,
            authorization_details: None,
            call,
        }
    }
}

/// An upstream token released for one API call, and where the call goes.
pub struct CallToken {
    pub token: SecretString,
    /// The connection's API base URL (see [`catalog::api_base_url`]).
    pub api_base: String,
    pub connection: Connection,
    pub account_id: String,
    pub scope: Scopes,
}

/// How an API call made through Latchkey went, for its audit entry.
pub struct CallOutcome<'a> {
    pub call: ApiCall<'a>,
    /// The upstream status, or `None` when the call failed before an answer (the reason
    /// says why).
    pub status: Option<u16>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub millis: u64,
    /// Why the call failed or was cut short, if it was; a refresh-and-retry after a 401.
    pub note: Option<String>,
}

impl Vault {
    /// The agent API's resource identifier: the audience of agent access tokens, accepted by
    /// `/proxy` and `/mcp` (RFC 9728 metadata is served for it).
    pub fn agent_resource(&self) -> String {
        format!("{}mcp", self.config.issuer)
    }

    /// `grant_type=client_credentials`: the agent's own short-lived access token for the
    /// agent API. Recorded like any credential issued; the client assertion is consumed with
    /// the entry.
    pub(super) async fn client_credentials_grant(
        &self,
        params: &Params,
        client: AuthenticatedClient,
        ctx: &RequestContext,
    ) -> Result<TokenResponse, OAuthError> {
        if client.method == "none" {
            return Err(OAuthError::invalid_client(
                "client credentials need client authentication (private_key_jwt or a secret)",
            ));
        }
        let resource = self.agent_resource();
        for name in ["resource", "audience"] {
            if let Some(v) = params.get(name)
                && v != resource
            {
                return Err(OAuthError::invalid_target(format!(
                    "agent tokens are only issued for the agent API `{resource}`"
                )));
            }
        }
        if params.get("scope").is_some_and(|s| !s.trim().is_empty()) {
            return Err(OAuthError::invalid_scope(
                "agent tokens carry no scopes: the agent's grants decide what it may do",
            ));
        }
        let agent = &client.agent;
        let now = self.now();
        let token = self.signing().current.sign(
            Some(ACCESS_TOKEN_TYP),
            &json!({
                "iss": self.config.issuer, "sub": agent.id, "aud": resource,
                "client_id": agent.id, "iat": now, "exp": now + AGENT_TOKEN_TTL,
                "jti": secrets::random_token(16),
            }),
        );
        let audit = AuditRecord {
            at: now,
            actor_type: "agent".into(),
            actor_id: agent.id.clone(),
            auth_method: client.method.into(),
            subject_user: None,
            action: "agent.token".into(),
            connection: None,
            account_id: None,
            agent_id: Some(agent.id.clone()),
            scopes: None,
            decision: "allow".into(),
            reason: Some(format!(
                "agent access token for {resource}, {AGENT_TOKEN_TTL} s; token {}",
                secrets::sha256_b64(token.as_bytes())
            )),
            audit_context: None,
            request_id: ctx.request_id.clone(),
            client_ip: ctx.client_ip.map(|ip| ip.to_string()),
            notify: None,
        };
        let jtis: Vec<JtiUse> = client.assertion_jti.into_iter().collect();
        match self
            .store
            .commit_release(None, &jtis, &[], None, &audit)
            .await
        {
            Ok(()) => {}
            Err(ReleaseError::Replay(_)) => {
                return Err(OAuthError::invalid_client(
                    "client assertion rejected: `jti` was already used",
                ));
            }
            Err(ReleaseError::Store(e)) => return Err(store_err(e)),
            Err(
                ReleaseError::AccountInactive
                | ReleaseError::Stale(_)
                | ReleaseError::QuotaReached(_),
            ) => {
                return Err(OAuthError::storage_unavailable());
            }
        }
        Ok(TokenResponse {
            access_token: SecretString::from(token),
            expires_in: AGENT_TOKEN_TTL,
            scope: String::new(),
            issued_token_type: None,
            id_token: None,
            refresh_token: None,
            authorization_details: None,
        })
    }

    /// Authenticate a call to the agent API from its bearer token and, for an agent token,
    /// the user it names (`Latchkey-User`: a user id or username). Errors are `invalid_token`
    /// (401) or `invalid_request` (400) and say what to send; a rejected token is recorded as
    /// `client.authenticate` (as at the token endpoint), under the client it claims.
    pub async fn authenticate_agent(
        &self,
        bearer: &str,
        named_user: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<AgentCaller, OAuthError> {
        let result = self.verify_agent_bearer(bearer, named_user).await;
        if let Err(e) = &result
            && e.code == "invalid_token"
        {
            let claimed = super::exchange::peek_str_claim(bearer, "client_id")
                .or_else(|| super::exchange::peek_str_claim(bearer, "iss"))
                .filter(|id| id.starts_with("agt_"))
                .map(|id| super::exchange::cut(&id, 64))
                .unwrap_or_else(|| "unknown".to_owned());
            let audit = AuditRecord {
                at: self.now(),
                actor_type: "agent".into(),
                agent_id: (claimed != "unknown").then(|| claimed.clone()),
                actor_id: claimed,
                auth_method: "bearer".into(),
                subject_user: None,
                action: "client.authenticate".into(),
                connection: None,
                account_id: None,
                scopes: None,
                decision: "deny".into(),
                reason: Some(super::exchange::cut(
                    &format!("agent API: {}: {}", e.code, e.description),
                    300,
                )),
                audit_context: None,
                request_id: ctx.request_id.clone(),
                client_ip: ctx.client_ip.map(|ip| ip.to_string()),
                notify: None,
            };
            if let Err(err) = self.store.append_audit(&audit).await {
                tracing::warn!(error = %err, "the audit entry of a refused agent token could not be written");
            }
        }
        result
    }

    async fn verify_agent_bearer(
        &self,
        bearer: &str,
        named_user: Option<&str>,
    ) -> Result<AgentCaller, OAuthError> {
        let bad = |why: &str| OAuthError::invalid_token(format!("bearer token rejected: {why}"));
        if peek_typ(bearer).as_deref() == Some(SUBJECT_JWT_TYP) {
            // A privileged worker: a JWT signed by its own key, naming the user in `sub`.
            let iss = super::exchange::peek_str_claim(bearer, "iss")
                .ok_or_else(|| bad("no readable `iss` claim"))?;
            let agent = self.live_agent(&iss).await?;
            let keys = self.agent_public_keys(None, &agent.id).await?;
            let claims = verify_jws(bearer, TypRule::Exactly(SUBJECT_JWT_TYP), &keys)
                .map_err(|e| bad(&e.to_string()))?;
            let subject = self
                .check_subject(&claims, &agent.id)
                .map_err(|why| bad(&why))?;
            let user_id = self.same_user(subject.user_id, named_user).await?;
            return Ok(AgentCaller {
                agent,
                method: "worker_jwt",
                user_id,
                audit_context: subject.audit_context,
                jti: subject.jti,
            });
        }
        let claims = verify_jws(
            bearer,
            TypRule::Exactly(ACCESS_TOKEN_TYP),
            &self.signing().public_keys(),
        )
        .map_err(|e| bad(&e.to_string()))?;
        let s = |n: &str| {
            claims
                .str(n)
                .map(str::to_owned)
                .map_err(|e| bad(&e.to_string()))
        };
        if s("iss")? != self.config.issuer {
            return Err(bad("issued by someone else"));
        }
        claims.audience_is(&self.agent_resource()).map_err(|_| {
            bad(&format!(
                "not for the agent API `{}`",
                self.agent_resource()
            ))
        })?;
        if claims.int("exp").map_err(|e| bad(&e.to_string()))? <= self.now() {
            return Err(bad("expired; get a new one"));
        }
        let agent = self.live_agent(&s("client_id")?).await?;
        let sub = s("sub")?;
        if claims.opt_str("fam").ok().flatten().is_some() {
            // A user's token, issued to the agent at sign-in: it acts for that user.
            let token = self
                .verify_access_token(bearer, &self.agent_resource())
                .await?;
            let user_id = self.same_user(token.user_id, named_user).await?;
            return Ok(AgentCaller {
                agent,
                method: "user_token",
                user_id,
                audit_context: None,
                jti: None,
            });
        }
        if sub != agent.id {
            return Err(bad("`sub` is not the client"));
        }
        let Some(named) = named_user else {
            return Err(OAuthError::invalid_request(
                "name the user this call acts for in the Latchkey-User header (a user id or username)",
            ));
        };
        let user = self.user_named(named).await?.ok_or_else(|| {
            OAuthError::invalid_request(format!("Latchkey-User names an unknown user `{named}`"))
        })?;
        Ok(AgentCaller {
            agent,
            method: "agent_token",
            user_id: user.id,
            audit_context: None,
            jti: None,
        })
    }

    async fn live_agent(&self, id: &str) -> Result<Agent, OAuthError> {
        self.hot
            .through(
                None,
                |g| &mut g.agents,
                id.to_owned(),
                self.store.agent_by_id(id),
            )
            .await
            .map_err(store_err)?
            .filter(|a| !a.disabled)
            .ok_or_else(|| {
                OAuthError::invalid_token("bearer token rejected: unknown or disabled agent")
            })
    }

    async fn user_named(&self, name: &str) -> Result<Option<User>, OAuthError> {
        if name.is_empty() || name.len() > 256 {
            return Ok(None);
        }
        if let Some(u) = self.store.user_by_id(name).await.map_err(store_err)? {
            return Ok(Some(u));
        }
        self.store.user_by_username(name).await.map_err(store_err)
    }

    /// The token's user, refusing a `Latchkey-User` header that names someone else.
    async fn same_user(&self, user_id: String, named: Option<&str>) -> Result<String, OAuthError> {
        if let Some(named) = named {
            let same = named == user_id
                || self
                    .user_named(named)
                    .await?
                    .is_some_and(|u| u.id == user_id);
            if !same {
                return Err(OAuthError::invalid_request(
                    "Latchkey-User names another user than the token's subject; leave it out",
                ));
            }
        }
        Ok(user_id)
    }

    /// Decide and record the release of an upstream token for one API call: the exchange's
    /// policy ([`Vault::decide`]), approvals bound to the call (method and path), then one
    /// transaction with the `proxy.request` entry. Only after it commits may the token be
    /// used.
    ///
    /// `call: None` is the MCP `get_access_token` tool: the raw token goes to the agent, only
    /// if the grant allows it (`token_tool`), recorded as `token.release`.
    pub async fn release_for_call(
        &self,
        caller: &AgentCaller,
        connection: &str,
        scope: Option<&str>,
        call: Option<ApiCall<'_>>,
        ctx: &RequestContext,
    ) -> Result<CallToken, OAuthError> {
        let agent = &caller.agent;
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
        // Decided through the configuration cache, as the token exchange is: the release
        // commits only if the configuration is still what the decision read, else it is
        // decided again.
        let (result, attempt) = self
            .redecided(|mut attempt| async move {
                let result = match self.hot.begin(&*self.store).await {
                    Ok(at) => {
                        attempt.revision = Some(at);
                        self.call_release(caller, connection, scope, call, ctx, &mut attempt)
                            .await
                    }
                    Err(e) => Err(store_err(e)),
                };
                (result, attempt)
            })
            .await;
        let outcome = match &result {
            Ok(_) => "released",
            Err(e) => e.code,
        };
        metrics::counter!("latchkey_proxy_releases_total", "outcome" => outcome).increment(1);
        if let Err(e) = &result {
            self.audit_call_refusal(caller, e, attempt, call, ctx).await;
        }
        result
    }

    async fn call_release(
        &self,
        caller: &AgentCaller,
        connection: &str,
        scope: Option<&str>,
        call: Option<ApiCall<'_>>,
        ctx: &RequestContext,
        attempt: &mut Attempt,
    ) -> Result<CallToken, OAuthError> {
        let agent = &caller.agent;
        // A raw token the grant does not allow is refused before any approval is asked for.
        if call.is_none()
            && let Some(conn) = self
                .store
                .connection_by_name(connection)
                .await
                .map_err(store_err)?
            && !self.grant_of(None, agent, &conn).await?.policy.token_tool
        {
            return Err(no_token_tool(&conn.name));
        }
        let Decided {
            connection,
            account,
            scope,
            policy,
            quota,
            approval,
            risk,
        } = self
            .decide(&caller.ask(connection, scope, call), ctx, attempt)
            .await?;
        // (Checked again on the grant the decision read, in case it changed meanwhile.)
        if call.is_none() && !policy.token_tool {
            return Err(no_token_tool(&connection.name));
        }
        let Some(api_base) = catalog::api_base_url(&connection, &self.config.issuer) else {
            return Err(OAuthError::invalid_request(format!(
                "connection `{}` has no API base URL; an operator must set one before calls can go through Latchkey",
                connection.name
            )));
        };
        let (token, _) = self
            .fresh_access_token(
                account.clone(),
                &connection,
                &scope,
                self.config.refresh_margin,
            )
            .await?;
        let mut jtis: Vec<JtiUse> = caller.jti.iter().cloned().collect();
        let worker_index = caller.jti.as_ref().map(|_| 0);
        let mut note = match call {
            Some(call) => format!("; {} {}", call.method, call.path),
            None => "; MCP get_access_token".to_owned(),
        };
        let mut approval_index = None;
        if let Some(crate::policy::ApprovalOutcome::Approved {
            approval_id,
            approved_by,
            single_use,
        }) = approval
        {
            note.push_str(&format!(
                "; risk {risk}, approved by {approved_by} ({approval_id})"
            ));
            if let Some(key) = single_use {
                approval_index = Some(jtis.len());
                jtis.push(key);
            }
        }
        self.commit_agent_release(
            Release {
                agent,
                method: caller.method,
                action: if call.is_some() {
                    "proxy.request"
                } else {
                    "token.release"
                },
                user_id: &caller.user_id,
                connection: &connection,
                account_id: &account.id,
                scopes: &scope,
                token: &token,
                note,
                audit_context: caller.audit_context.clone(),
                ctx,
                jtis: &jtis,
                policy: &policy,
                quotas: quota.uses(),
                revision: attempt.revision,
            },
            |i| {
                if Some(i) == approval_index {
                    OAuthError::access_denied(
                        "the approval of this call was single use and is already used; ask again",
                    )
                } else {
                    debug_assert_eq!(Some(i), worker_index);
                    OAuthError::invalid_token("bearer token rejected: `jti` was already used")
                }
            },
        )
        .await?;
        quota.keep();
        Ok(CallToken {
            token,
            api_base,
            connection,
            account_id: account.id,
            scope,
        })
    }

    /// After the provider answered 401 to a call: refresh the upstream token once (the
    /// provider may have revoked it early) and return the new one for a single retry.
    pub async fn refresh_for_call(&self, t: &CallToken) -> Result<SecretString, OAuthError> {
        let account = self
            .store
            .account_by_id(&t.account_id)
            .await
            .map_err(store_err)?
            .filter(|a| a.status == AccountStatus::Active)
            .ok_or_else(|| {
                OAuthError::not_connected(
                    &t.connection.name,
                    self.config.connect_uri(&t.connection.name),
                )
            })?;
        // Any token with less than a day left counts as stale: that forces the refresh.
        let (token, _) = self
            .fresh_access_token(account, &t.connection, &t.scope, i64::from(i32::MAX))
            .await?;
        Ok(token)
    }

    /// Record how an API call made through Latchkey went (`proxy.response`): method, path,
    /// status, bytes each way, time; never a token. The release was recorded before the call
    /// (`proxy.request`); if this entry cannot be written the failure is logged.
    pub async fn record_call(
        &self,
        caller: &AgentCaller,
        t: &CallToken,
        outcome: CallOutcome<'_>,
        ctx: &RequestContext,
    ) {
        let status = outcome
            .status
            .map_or_else(|| "no answer".to_owned(), |s| s.to_string());
        let audit = AuditRecord {
            at: self.now(),
            actor_type: "agent".into(),
            actor_id: caller.agent.id.clone(),
            auth_method: caller.method.into(),
            subject_user: Some(caller.user_id.clone()),
            action: "proxy.response".into(),
            connection: Some(t.connection.name.clone()),
            account_id: Some(t.account_id.clone()),
            agent_id: Some(caller.agent.id.clone()),
            scopes: Some(t.scope.to_string_spaced()),
            decision: if outcome.status.is_some() {
                "allow"
            } else {
                "error"
            }
            .into(),
            reason: Some(format!(
                "{} {} → {status}; {} bytes sent, {} received, {} ms{}",
                outcome.call.method,
                outcome.call.path,
                outcome.bytes_sent,
                outcome.bytes_received,
                outcome.millis,
                outcome.note.map(|n| format!("; {n}")).unwrap_or_default()
            )),
            audit_context: caller.audit_context.clone(),
            request_id: ctx.request_id.clone(),
            client_ip: ctx.client_ip.map(|ip| ip.to_string()),
            notify: None,
        };
        // Through the release writer (nothing to consume, no account to check): it commits
        // many entries per transaction under load.
        if let Err(err) = self
            .store
            .commit_release(None, &[], &[], None, &audit)
            .await
        {
            let err = match err {
                ReleaseError::Store(e) => e.to_string(),
                other => format!("{other:?}"),
            };
            tracing::warn!(error = %err, "the audit entry of a proxied call's answer could not be written");
        }
    }

    /// The audit entry of a refused call (`proxy.deny`), as `audit_refusal` does for the
    /// token endpoint: policy refusals and client mistakes only.
    async fn audit_call_refusal(
        &self,
        caller: &AgentCaller,
        e: &OAuthError,
        attempt: Attempt,
        call: Option<ApiCall<'_>>,
        ctx: &RequestContext,
    ) {
        if e.source != crate::error::ErrorSource::Client || e.code == "authorization_pending" {
            return;
        }
        let audit = AuditRecord {
            at: self.now(),
            actor_type: "agent".into(),
            actor_id: caller.agent.id.clone(),
            auth_method: caller.method.into(),
            subject_user: Some(caller.user_id.clone()),
            action: if call.is_some() {
                "proxy.deny"
            } else {
                "token.deny"
            }
            .into(),
            connection: attempt.connection,
            account_id: attempt.account_id,
            agent_id: Some(caller.agent.id.clone()),
            scopes: attempt.scopes,
            decision: "deny".into(),
            reason: Some(super::exchange::cut(
                &match call {
                    Some(call) => format!(
                        "{} {}: {}: {}",
                        call.method, call.path, e.code, e.description
                    ),
                    None => format!("MCP get_access_token: {}: {}", e.code, e.description),
                },
                400,
            )),
            audit_context: caller.audit_context.clone(),
            request_id: ctx.request_id.clone(),
            client_ip: ctx.client_ip.map(|ip| ip.to_string()),
            notify: None,
        };
        if let Err(err) = self.store.append_audit(&audit).await {
            tracing::warn!(error = %err, "the audit entry of a refused call could not be written");
        }
    }
}

/// A connection an agent may use, as the MCP `list_connections` tool shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentConnection {
    pub connection: String,
    pub provider: String,
    /// What the agent's grant allows on it.
    pub granted_scopes: Vec<String>,
    /// The user's accounts there (none: the user has not connected it).
    pub accounts: Vec<AgentAccount>,
    /// Where the user connects (or reconnects) it.
    pub connect_url: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AgentAccount {
    /// `healthy`, `needs_reconnect` or `revoked`.
    pub health: &'static str,
    pub scopes: Vec<String>,
    pub last_used_at: Option<i64>,
}

/// Where an approval for a call stands (MCP `request_approval`).
#[derive(Clone, Debug)]
pub enum ApprovalState {
    /// The risk of the call needs no approval.
    NotNeeded,
    Approved {
        approval_id: String,
    },
    Pending {
        approval_uri: String,
        expires_in: Option<i64>,
    },
}

impl Vault {
    /// The connections the agent has grants on, with the caller's user's accounts there.
    pub async fn agent_connections(
        &self,
        caller: &AgentCaller,
    ) -> Result<Vec<AgentConnection>, OAuthError> {
        let grants = self.store.list_grants().await.map_err(store_err)?;
        let mut out = Vec::new();
        for g in grants.iter().filter(|g| g.agent_id == caller.agent.id) {
            let Some(conn) = self
                .store
                .connection_by_id(&g.connection_id)
                .await
                .map_err(store_err)?
            else {
                continue;
            };
            let accounts = self
                .store
                .accounts_for(&caller.user_id, &conn.id)
                .await
                .map_err(store_err)?
                .into_iter()
                .map(|a| AgentAccount {
                    health: match a.status {
                        AccountStatus::Active => "healthy",
                        AccountStatus::NeedsReauth => "needs_reconnect",
                        _ => "revoked",
                    },
                    scopes: a.scopes.iter().map(str::to_owned).collect(),
                    last_used_at: a.last_used_at,
                })
                .collect();
            out.push(AgentConnection {
                connect_url: self.config.connect_uri(&conn.name),
                granted_scopes: g.scopes.iter().map(str::to_owned).collect(),
                connection: conn.name,
                provider: conn.provider,
                accounts,
            });
        }
        out.sort_by(|a, b| a.connection.cmp(&b.connection));
        Ok(out)
    }

    /// What stands between the agent and `scopes` on `connection` for its user: the scopes
    /// the user has not consented to (all of them when there is no healthy account), and
    /// the URL where the user connects. `scopes: None` means what the grant allows.
    pub async fn connection_needs(
        &self,
        caller: &AgentCaller,
        connection: &str,
        scopes: Option<&str>,
    ) -> Result<(Vec<String>, String), OAuthError> {
        let conn = self
            .store
            .connection_by_name(connection)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request(format!("connection `{connection}` does not exist"))
            })?;
        let grant = self.grant_of(None, &caller.agent, &conn).await?;
        let wanted = match scopes {
            Some(s) => {
                let s = Scopes::parse(s);
                if !s.is_subset(&grant.scopes) {
                    return Err(OAuthError::invalid_scope(format!(
                        "scope outside the agent's grant: {}",
                        s.missing_from(&grant.scopes).join(" ")
                    )));
                }
                s
            }
            None => grant.scopes.clone(),
        };
        let accounts = self
            .store
            .accounts_for(&caller.user_id, &conn.id)
            .await
            .map_err(store_err)?;
        let consented = accounts
            .iter()
            .filter(|a| a.status == AccountStatus::Active)
            .map(|a| &a.scopes)
            .find(|s| wanted.is_subset(s))
            .or_else(|| {
                accounts
                    .iter()
                    .find(|a| a.status == AccountStatus::Active)
                    .map(|a| &a.scopes)
            });
        let missing = match consented {
            Some(s) => wanted.missing_from(s),
            None => wanted.iter().map(str::to_owned).collect(),
        };
        Ok((missing, self.config.connect_uri(&conn.name)))
    }

    /// Start (or find) the approval a call would need, without releasing anything: what the
    /// MCP `request_approval` tool reports. `call: None` asks for the scopes themselves (what
    /// `get_access_token` would need).
    pub async fn approval_for(
        &self,
        caller: &AgentCaller,
        connection: &str,
        scope: Option<&str>,
        call: Option<ApiCall<'_>>,
        ctx: &RequestContext,
    ) -> Result<ApprovalState, OAuthError> {
        let mut attempt = Attempt::default();
        let decided = self
            .decide(&caller.ask(connection, scope, call), ctx, &mut attempt)
            .await;
        match decided {
            // The quota slots go back: nothing was released.
            Ok(d) => Ok(match d.approval {
                Some(crate::policy::ApprovalOutcome::Approved { approval_id, .. }) => {
                    ApprovalState::Approved { approval_id }
                }
                None => ApprovalState::NotNeeded,
            }),
            Err(e) if e.code == "authorization_pending" => {
                let field = |name: &str| {
                    e.extra
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, v)| v.clone())
                };
                Ok(ApprovalState::Pending {
                    approval_uri: field("approval_uri")
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    expires_in: field("expires_in").and_then(|v| v.as_i64()),
                })
            }
            Err(e) => Err(e),
        }
    }
}

fn no_token_tool(connection: &str) -> OAuthError {
    OAuthError::access_denied(format!(
        "the grant for {connection} does not let this agent take raw tokens; call the API through Latchkey (call_api) instead, or ask an operator to allow the token tool on the grant"
    ))
}

/// The JWS header's `typ`, read without verifying anything: only to choose how to verify.
fn peek_typ(token: &str) -> Option<String> {
    use base64::Engine;
    if token.len() > latchkey_crypto::jws::MAX_JWS_LEN {
        return None;
    }
    let header = token.split('.').next()?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v.get("typ")?.as_str().map(str::to_owned)
}
