//! The token endpoint: client authentication, grant dispatch, the three token-vault subject
//! types (privileged-worker JWT, Latchkey refresh token, Latchkey access token), and the
//! release decision.

use super::*;

pub(super) struct AuthenticatedClient {
    pub(super) agent: Agent,
    pub(super) method: &'static str,
    pub(super) keys: Option<Arc<Vec<PublicKey>>>,
    pub(super) assertion_jti: Option<JtiUse>,
}

/// What a token request had shown by the time it was refused: the facts for the refusal's
/// audit entry. Filled as the request is checked; read only when it fails.
#[derive(Default)]
pub(super) struct Attempt {
    /// Client authentication has started (and failed, while `client` is `None`).
    authenticating: bool,
    /// The authenticated client and how it authenticated.
    client: Option<(String, &'static str)>,
    pub(super) subject_user: Option<String>,
    pub(super) connection: Option<String>,
    pub(super) account_id: Option<String>,
    pub(super) scopes: Option<String>,
    audit_context: Option<String>,
    /// The configuration revision the request was decided at, when it read the cache.
    pub(super) revision: Option<i64>,
}

/// How many times one token request is decided, at most, when the configuration changes under
/// it (see `hot.rs`).
const MAX_DECISIONS: usize = 3;

impl Attempt {
    /// A request whose client authentication failed before anything else was learnt.
    pub(super) fn failed_authentication() -> Self {
        Self {
            authenticating: true,
            ..Self::default()
        }
    }
}

/// Longest reason (error code and description) recorded for a refusal; descriptions can echo
/// request parameters, so they are cut.
const MAX_REFUSAL_REASON: usize = 300;
/// Longest claimed client id recorded for a failed client authentication.
const MAX_CLAIMED_ID: usize = 64;

pub(super) fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// The client a request claims to be (unverified) and the authentication methods it tried:
/// what a failed client authentication is recorded as. Never a secret: an assertion's `iss`
/// is only read when no `client_id` names the client.
fn claimed_client(params: &Params, basic: Option<&BasicCredentials>) -> (String, String) {
    let tried: Vec<&str> = [
        (basic.is_some(), "client_secret_basic"),
        (params.get("client_secret").is_some(), "client_secret_post"),
        (params.get("client_assertion").is_some(), "private_key_jwt"),
    ]
    .into_iter()
    .filter_map(|(used, name)| used.then_some(name))
    .collect();
    let method = if tried.is_empty() {
        "none".to_owned()
    } else {
        tried.join("+")
    };
    let id = basic
        .map(|b| b.client_id.clone())
        .or_else(|| params.get("client_id").map(str::to_owned))
        .or_else(|| {
            params
                .get("client_assertion")
                .and_then(|a| peek_str_claim(a, "iss"))
        })
        .map(|id| cut(&id, MAX_CLAIMED_ID))
        .unwrap_or_else(|| "unknown".to_owned());
    (id, method)
}

/// An upstream token about to leave for an agent, as its release records it.
pub(super) struct Release<'a> {
    pub agent: &'a Agent,
    /// How the agent authenticated.
    pub method: &'static str,
    /// `token.release` (an exchange) or `proxy.request` (an API call through Latchkey).
    pub action: &'static str,
    pub user_id: &'a str,
    pub connection: &'a Connection,
    pub account_id: &'a str,
    pub scopes: &'a Scopes,
    /// Recorded only as its SHA-256 digest.
    pub token: &'a SecretString,
    /// Appended to the entry's reason (an approval, …).
    pub note: String,
    pub audit_context: Option<String>,
    pub ctx: &'a RequestContext,
    pub jtis: &'a [JtiUse],
    /// The grant's policy, and the release's slots in its quotas
    /// ([`crate::rate::QuotaReservation::uses`]), counted by the store with the release.
    pub policy: &'a crate::policy::GrantPolicy,
    pub quotas: Vec<crate::store::QuotaUse>,
    /// The configuration revision the release was decided at, if it read the cache: it
    /// commits only if the configuration is still there.
    pub revision: Option<i64>,
}

impl Vault {
    /// `POST /oauth/token`.
    pub async fn token(
        &self,
        params: &Params,
        basic: Option<BasicCredentials>,
        ctx: &RequestContext,
    ) -> Result<TokenResponse, OAuthError> {
        let basic_ref = basic.as_ref();
        let (result, attempt) = self
            .redecided(|mut attempt| async move {
                let result = self.token_inner(params, basic_ref, ctx, &mut attempt).await;
                (result, attempt)
            })
            .await;
        let outcome = match &result {
            Ok(_) => "released",
            Err(e) => e.code,
        };
        metrics::counter!("latchkey_exchanges_total", "outcome" => outcome).increment(1);
        if let Err(e) = &result {
            self.audit_refusal(e, attempt, params, basic.as_ref(), ctx)
                .await;
        }
        result
    }

    /// The audit entry of a refused token request (or a failed client authentication at
    /// `/oauth/revoke`): written on its own, since a refusal changes nothing. Client mistakes
    /// and policy refusals only: a storage or provider failure decided nothing. If it cannot
    /// be written, the client still gets its error; the failure is logged.
    pub(super) async fn audit_refusal(
        &self,
        e: &OAuthError,
        attempt: Attempt,
        params: &Params,
        basic: Option<&BasicCredentials>,
        ctx: &RequestContext,
    ) {
        // A CIBA poll of a request still waiting for the user is no decision (and would flood
        // the trail): the request and its outcome are recorded as `approval.*` entries.
        if e.source != crate::error::ErrorSource::Client
            || (params.get("grant_type") == Some(super::ciba::GRANT_CIBA)
                && matches!(e.code, "authorization_pending" | "slow_down"))
        {
            return;
        }
        let client_failed =
            e.code == "invalid_client" || (attempt.authenticating && attempt.client.is_none());
        let (actor_id, method) = match attempt.client {
            Some((id, method)) => (id, method.to_owned()),
            None => claimed_client(params, basic),
        };
        let audit = AuditRecord {
            at: self.now(),
            actor_type: "agent".into(),
            agent_id: (actor_id != "unknown").then(|| actor_id.clone()),
            actor_id,
            auth_method: method,
            subject_user: attempt.subject_user,
            action: if client_failed {
                "client.authenticate"
            } else {
                "token.deny"
            }
            .into(),
            connection: attempt.connection,
            account_id: attempt.account_id,
            scopes: attempt.scopes,
            decision: "deny".into(),
            reason: Some(cut(
                &format!("{}: {}", e.code, e.description),
                MAX_REFUSAL_REASON,
            )),
            audit_context: attempt.audit_context,
            request_id: ctx.request_id.clone(),
            client_ip: ctx.client_ip.map(|ip| ip.to_string()),
            notify: None,
        };
        if let Err(err) = self.store.append_audit(&audit).await {
            tracing::warn!(error = %err, action = %audit.action, "the audit entry of a refused request could not be written");
        }
    }

    async fn token_inner(
        &self,
        params: &Params,
        basic: Option<&BasicCredentials>,
        ctx: &RequestContext,
        attempt: &mut Attempt,
    ) -> Result<TokenResponse, OAuthError> {
        let grant_type = params.require("grant_type")?;
        // Token-vault exchanges, the hot path, read the configuration through the cache.
        let at = if grant_type == GRANT_TOKEN_VAULT {
            Some(self.hot.begin(&*self.store).await.map_err(store_err)?)
        } else {
            None
        };
        attempt.revision = at;
        attempt.authenticating = true;
        let client = self.authenticate_client_at(at, params, basic).await?;
        attempt.client = Some((client.agent.id.clone(), client.method));
        if let Err(retry_after) = self.rate.check(
            &client.agent.id,
            self.config.agent_requests_per_minute,
            self.now(),
        ) {
            return Err(OAuthError::too_many_requests(
                format!(
                    "agent {} exceeded {} token requests per minute",
                    client.agent.id, self.config.agent_requests_per_minute
                ),
                retry_after,
            ));
        }
        match grant_type {
            GRANT_TOKEN_VAULT => {
                self.token_vault_exchange(params, client, ctx, attempt)
                    .await
            }
            "authorization_code" if !client.agent.redirect_uris.is_empty() => {
                self.code_grant(params, &client.agent, ctx, attempt).await
            }
            "refresh_token" if !client.agent.redirect_uris.is_empty() => {
                self.refresh_grant(params, &client.agent, ctx, attempt)
                    .await
            }
            super::ciba::GRANT_CIBA => self.ciba_grant(params, &client, ctx, attempt).await,
            "client_credentials" => self.client_credentials_grant(params, client, ctx).await,
            "authorization_code" | "refresh_token" => Err(OAuthError::unauthorized_client(
                "this client is not an app with redirect URIs",
            )),
            other => Err(OAuthError::unsupported_grant_type(format!(
                "grant_type `{other}` is not supported"
            ))),
        }
    }

    pub(super) async fn authenticate_client(
        &self,
        params: &Params,
        basic: Option<&BasicCredentials>,
    ) -> Result<AuthenticatedClient, OAuthError> {
        self.authenticate_client_at(None, params, basic).await
    }

    /// Client authentication, reading agents and keys through the configuration cache when
    /// the request is decided at a revision (`at`).
    async fn authenticate_client_at(
        &self,
        at: Option<i64>,
        params: &Params,
        basic: Option<&BasicCredentials>,
    ) -> Result<AuthenticatedClient, OAuthError> {
        let body_secret = params.get("client_secret");
        let assertion = params.get("client_assertion");
        let methods = [basic.is_some(), body_secret.is_some(), assertion.is_some()];
        match methods.iter().filter(|m| **m).count() {
            0 => {
                // Only a public app may name itself without proof (PKCE protects its codes).
                if let Some(id) = params.get("client_id") {
                    let agent = self.store.agent_by_id(id).await.map_err(store_err)?;
                    if let Some(agent) = agent.filter(|a| a.public_client && !a.disabled) {
                        return Ok(AuthenticatedClient {
                            agent,
                            method: "none",
                            keys: None,
                            assertion_jti: None,
                        });
                    }
                }
                return Err(OAuthError::invalid_client(
                    "client authentication is required (client_secret, HTTP Basic, or private_key_jwt)",
                ));
            }
            1 => {}
            _ => {
                return Err(OAuthError::invalid_request(
                    "use exactly one client authentication method",
                ));
            }
        }
        let client_id = params.get("client_id");
        if let Some(basic) = basic {
            if client_id.is_some_and(|id| id != basic.client_id) {
                return Err(OAuthError::invalid_client(
                    "client_id does not match the Basic credentials",
                ));
            }
            return self
                .secret_client(
                    at,
                    Some(&basic.client_id),
                    basic.client_secret.expose_secret(),
                    "client_secret_basic",
                )
                .await;
        }
        if let Some(secret) = body_secret {
            return self
                .secret_client(at, client_id, secret, "client_secret_post")
                .await;
        }
        let assertion = assertion.unwrap_or_default();
        if params.get("client_assertion_type") != Some(ASSERTION_TYPE_JWT_BEARER) {
            return Err(OAuthError::invalid_client(format!(
                "client_assertion_type must be {ASSERTION_TYPE_JWT_BEARER}"
            )));
        }
        self.assertion_client(at, client_id, assertion).await
    }

    async fn secret_client(
        &self,
        at: Option<i64>,
        client_id: Option<&str>,
        secret: &str,
        method: &'static str,
    ) -> Result<AuthenticatedClient, OAuthError> {
        let bad = || OAuthError::invalid_client("unknown client or wrong client secret");
        let hash = self.secret_hash(secret);
        let agent = self
            .hot
            .through(
                at,
                |g| &mut g.agents_by_secret,
                hash.clone(),
                self.store.agent_by_secret_hash(&hash),
            )
            .await
            .map_err(store_err)?
            .ok_or_else(bad)?;
        if client_id.is_some_and(|id| id != agent.id) || agent.disabled {
            return Err(bad());
        }
        Ok(AuthenticatedClient {
            agent,
            method,
            keys: None,
            assertion_jti: None,
        })
    }

    pub(super) async fn agent_public_keys(
        &self,
        at: Option<i64>,
        agent_id: &str,
    ) -> Result<Arc<Vec<PublicKey>>, OAuthError> {
        let load = async {
            let rows = self.store.agent_keys(agent_id).await?;
            let keys = rows
                .iter()
                .filter_map(|k| match PublicKey::from_jwk_json(&k.jwk) {
                    Ok(pk) => Some(pk),
                    Err(e) => {
                        tracing::error!(agent = agent_id, kid = %k.kid, error = %e, "stored agent key is unusable");
                        None
                    }
                })
                .collect();
            Ok(Some(Arc::new(keys)))
        };
        Ok(self
            .hot
            .through(at, |g| &mut g.keys, agent_id.to_owned(), load)
            .await
            .map_err(store_err)?
            .unwrap_or_default())
    }

    async fn assertion_client(
        &self,
        at: Option<i64>,
        client_id: Option<&str>,
        assertion: &str,
    ) -> Result<AuthenticatedClient, OAuthError> {
        let bad =
            |why: &str| OAuthError::invalid_client(format!("client assertion rejected: {why}"));
        let iss = peek_str_claim(assertion, "iss").ok_or_else(|| bad("no readable `iss` claim"))?;
        if client_id.is_some_and(|id| id != iss) {
            return Err(bad("`iss` is not the client_id"));
        }
        let agent = self
            .hot
            .through(
                at,
                |g| &mut g.agents,
                iss.clone(),
                self.store.agent_by_id(&iss),
            )
            .await
            .map_err(store_err)?
            .filter(|a| !a.disabled)
            .ok_or_else(|| bad("unknown client"))?;
        let keys = self.agent_public_keys(at, &agent.id).await?;
        let rules = AssertionRules {
            client_id: &agent.id,
            issuer: &self.config.issuer,
            now: self.now(),
            max_lifetime: self.config.max_assertion_lifetime,
            future_skew: self.config.future_skew,
        };
        let verified =
            verify_client_assertion(assertion, &keys, &rules).map_err(|e| bad(&e.to_string()))?;
        let jti = JtiUse {
            key: format!("assertion:{}:{}", agent.id, verified.jti),
            expires_at: verified.exp + self.config.future_skew,
        };
        Ok(AuthenticatedClient {
            agent,
            method: "private_key_jwt",
            keys: Some(keys),
            assertion_jti: Some(jti),
        })
    }

    fn not_in_future(&self, c: &Claims) -> Result<(), String> {
        let limit = self.now() + self.config.future_skew;
        for name in ["iat", "nbf"] {
            if c.opt_int(name)
                .map_err(|e| e.to_string())?
                .is_some_and(|t| t > limit)
            {
                return Err(format!("`{name}` is in the future"));
            }
        }
        Ok(())
    }

    async fn token_vault_exchange(
        &self,
        params: &Params,
        client: AuthenticatedClient,
        ctx: &RequestContext,
        attempt: &mut Attempt,
    ) -> Result<TokenResponse, OAuthError> {
        attempt.scopes = params.get("scope").map(|s| cut(s, MAX_REFUSAL_REASON));
        let at = attempt.revision;
        let subject_token = params.require("subject_token")?;
        let subject_type = params.require("subject_token_type")?;
        let requested = params.require("requested_token_type")?;
        let issued_token_type = match requested {
            TOKEN_TYPE_VAULT_ACCESS => TOKEN_TYPE_VAULT_ACCESS,
            TOKEN_TYPE_FEDERATED_ACCESS => TOKEN_TYPE_FEDERATED_ACCESS,
            other => {
                return Err(OAuthError::invalid_request(format!(
                    "requested_token_type `{other}` is not supported; use {TOKEN_TYPE_VAULT_ACCESS}"
                )));
            }
        };
        let connection_name = params.require("connection")?;
        if params.get("actor_token").is_some() || params.get("actor_token_type").is_some() {
            return Err(OAuthError::invalid_request(
                "actor tokens are not supported",
            ));
        }
        if params.get("audience").is_some_and(|a| a != "None") || params.get("resource").is_some() {
            return Err(OAuthError::invalid_target(
                "audience and resource are not used by this grant",
            ));
        }
        if client.method == "none" {
            return Err(OAuthError::invalid_client(
                "public clients cannot use the token vault; authenticate the app",
            ));
        }
        let agent = &client.agent;
        let subject = match subject_type {
            // An unattended agent: a JWT signed by its own key, for this vault, fresh and single-use.
            TOKEN_TYPE_JWT => {
                let keys = match &client.keys {
                    Some(k) => k.clone(),
                    None => self.agent_public_keys(at, &agent.id).await?,
                };
                let claims = verify_jws(subject_token, TypRule::Exactly(SUBJECT_JWT_TYP), &keys)
                    .map_err(|e| {
                        OAuthError::invalid_grant(format!(
                            "subject_token rejected: {}",
                            jws_reason(&e)
                        ))
                    })?;
                self.check_subject(&claims, &agent.id).map_err(|why| {
                    OAuthError::invalid_grant(format!("subject_token rejected: {why}"))
                })?
            }
            // A present user, through the app they signed in to: the app's own refresh token.
            TOKEN_TYPE_REFRESH => {
                let hash = secrets::sha256_b64(subject_token.as_bytes());
                let family = self.live_refresh_token(&hash, agent, ctx).await?;
                Subject {
                    user_id: family.user_id,
                    audit_context: None,
                    jti: None,
                }
            }
            // A present user, through an API (resource server) that received their access token.
            TOKEN_TYPE_ACCESS => {
                let Some(api) = agent.resource_server.as_deref() else {
                    return Err(OAuthError::unauthorized_client(
                        "only a client registered for an API (resource server) may exchange access tokens",
                    ));
                };
                let token = self
                    .verify_access_token(subject_token, api)
                    .await
                    .map_err(|e| OAuthError {
                        status: 400,
                        code: "invalid_grant",
                        ..e
                    })?;
                Subject {
                    user_id: token.user_id,
                    audit_context: None,
                    jti: None,
                }
            }
            other => {
                return Err(OAuthError::invalid_request(format!(
                    "unknown subject_token_type `{other}`"
                )));
            }
        };
        let user_id = subject.user_id.as_str();
        let decided = self
            .decide(
                &Ask {
                    agent,
                    user_id,
                    audit_context: subject.audit_context.as_deref(),
                    connection: connection_name,
                    scope: params.get("scope"),
                    login_hint: params.get("login_hint"),
                    binding_message: params.get("binding_message"),
                    authorization_details: params.get("authorization_details"),
                    call: None,
                },
                ctx,
                attempt,
            )
            .await?;
        let Decided {
            connection,
            account,
            scope,
            policy,
            quota,
            approval,
            risk,
        } = decided;

        let (access_token, expires_at) = self
            .fresh_access_token(
                account.clone(),
                &connection,
                &scope,
                self.config.refresh_margin,
            )
            .await?;
        let now = self.now();
        // The grant's cap shortens what the answer says (and so how long SDKs cache it); the
        // upstream token itself lives as long as the provider made it.
        let expires_in = policy.cap_lifetime(match expires_at {
            Some(t) => (t - now).max(1),
            None => self.config.non_expiring_ttl,
        });

        let mut jtis = Vec::with_capacity(2);
        let assertion_index = client.assertion_jti.as_ref().map(|_| 0);
        jtis.extend(client.assertion_jti);
        jtis.extend(subject.jti);
        // A single-use approval is consumed in the release's transaction, like a `jti`.
        let mut approval_index = None;
        let mut approval_note = String::new();
        if let Some(crate::policy::ApprovalOutcome::Approved {
            approval_id,
            approved_by,
            single_use,
        }) = approval
        {
            approval_note = format!(
                "; risk {risk}, approved by {approved_by} ({approval_id}{})",
                if single_use.is_some() {
                    ", single use"
                } else {
                    ""
                }
            );
            if let Some(key) = single_use {
                approval_index = Some(jtis.len());
                jtis.push(key);
            }
        }
        let release = Release {
            agent,
            method: client.method,
            action: "token.release",
            user_id,
            connection: &connection,
            account_id: &account.id,
            scopes: &scope,
            token: &access_token,
            note: approval_note,
            audit_context: subject.audit_context,
            ctx,
            jtis: &jtis,
            policy: &policy,
            quotas: quota.uses(),
            revision: at,
        };
        self.commit_agent_release(release, |i| {
            if Some(i) == approval_index {
                OAuthError::access_denied(
                    "the approval of this request was single use and is already used; ask again",
                )
            } else if Some(i) == assertion_index {
                OAuthError::invalid_client("client assertion rejected: `jti` was already used")
            } else {
                OAuthError::invalid_grant("subject_token rejected: `jti` was already used")
            }
        })
        .await?;
        quota.keep();
        Ok(TokenResponse {
            access_token,
            expires_in,
            scope: scope.to_string_spaced(),
            issued_token_type: Some(issued_token_type),
            id_token: None,
            refresh_token: None,
            authorization_details: None,
        })
    }

    /// Commit a release of an upstream token to an agent: its identifiers consumed and its
    /// `token.release` entry, in one transaction. `replay(i)` says what a reused `jtis[i]`
    /// means to the caller.
    pub(super) async fn commit_agent_release(
        &self,
        r: Release<'_>,
        replay: impl Fn(usize) -> OAuthError,
    ) -> Result<(), OAuthError> {
        let audit = AuditRecord {
            at: self.now(),
            actor_type: "agent".into(),
            actor_id: r.agent.id.clone(),
            auth_method: r.method.into(),
            subject_user: Some(r.user_id.to_owned()),
            action: r.action.into(),
            connection: Some(r.connection.name.clone()),
            account_id: Some(r.account_id.to_owned()),
            agent_id: Some(r.agent.id.clone()),
            scopes: Some(r.scopes.to_string_spaced()),
            decision: "allow".into(),
            reason: Some(format!(
                "token {}{}",
                secrets::sha256_b64(r.token.expose_secret().as_bytes()),
                r.note
            )),
            audit_context: r.audit_context,
            request_id: r.ctx.request_id.clone(),
            client_ip: r.ctx.client_ip.map(|ip| ip.to_string()),
            notify: None,
        };
        match self
            .store
            .commit_release(r.revision, r.jtis, &r.quotas, Some(r.account_id), &audit)
            .await
        {
            Ok(()) => Ok(()),
            Err(ReleaseError::Replay(i)) => Err(replay(i)),
            // Other nodes (or this one before a restart) used up the window.
            Err(ReleaseError::QuotaReached(i)) => Err(quota_reached(
                &r.policy.quotas.rules()[i],
                &r.agent.id,
                r.user_id,
                &r.connection.name,
                (r.quotas[i].window_end - audit.at).max(1) as u64,
            )),
            Err(ReleaseError::AccountInactive) => Err(OAuthError::not_connected(
                &r.connection.name,
                self.config.connect_uri(&r.connection.name),
            )),
            Err(ReleaseError::Store(e)) => Err(store_err(e)),
            // Decided on a configuration that has changed since: nothing was written, and
            // `token` decides the request again.
            Err(ReleaseError::Stale(now)) => {
                self.hot.advance(now);
                Err(OAuthError::storage_unavailable())
            }
        }
    }

    /// The agent's grant for the connection (deny by default), through the configuration
    /// cache when the request is decided at a revision (`at`).
    pub(super) async fn grant_of(
        &self,
        at: Option<i64>,
        agent: &Agent,
        connection: &Connection,
    ) -> Result<Grant, OAuthError> {
        self.hot
            .through(
                at,
                |g| &mut g.grants,
                (agent.id.clone(), connection.id.clone()),
                self.store.grant_for(&agent.id, &connection.id),
            )
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::unauthorized_client(format!(
                    "agent {} has no grant for connection {}",
                    agent.id, connection.name
                ))
            })
    }

    /// Run `decide` (a request decided, perhaps from the cached configuration at the revision
    /// it sets in the attempt) and, while it is refused (or stale at commit) and the
    /// configuration has moved since, decide again, up to [`MAX_DECISIONS`] times: an answer
    /// stands only if the configuration is still what the decision saw.
    pub(super) async fn redecided<T, F, Fut>(
        &self,
        mut decide: F,
    ) -> (Result<T, OAuthError>, Attempt)
    where
        F: FnMut(Attempt) -> Fut,
        Fut: Future<Output = (Result<T, OAuthError>, Attempt)>,
    {
        let mut decisions = 0;
        loop {
            let (result, attempt) = decide(Attempt::default()).await;
            decisions += 1;
            if let (Err(_), Some(at)) = (&result, attempt.revision)
                && decisions < MAX_DECISIONS
                && self.config_moved_since(at).await
            {
                continue;
            }
            return (result, attempt);
        }
    }

    /// Whether the configuration has moved past `at` (then the cache forgets what it held).
    /// A store that cannot answer counts as not moved: the answer already in hand stands.
    async fn config_moved_since(&self, at: i64) -> bool {
        match self.store.config_revision().await {
            Ok(now) if now != at => {
                self.hot.advance(now);
                true
            }
            _ => false,
        }
    }

    /// The grant's policy for a release about to happen, beyond scopes and address: a policy
    /// that reads back, the allowed hours, then the quotas (counted now; the slots come back
    /// unless the caller [`keep`](crate::rate::QuotaReservation::keep)s them after the release
    /// commits). Every release of an upstream token under a grant goes through it; the caller
    /// also caps `expires_in` with [`crate::policy::GrantPolicy::cap_lifetime`].
    pub(super) fn grant_policy_gate(
        &self,
        grant: &Grant,
        connection: &Connection,
        user_id: &str,
    ) -> Result<crate::rate::QuotaReservation<'_>, OAuthError> {
        let policy = &grant.policy;
        if let Some(why) = &policy.unreadable {
            return Err(OAuthError::access_denied(format!(
                "the policy stored with the grant cannot be read ({why}); an operator must set the grant again"
            )));
        }
        let now = self.now();
        if !crate::policy::within_hours(&policy.hours, now) {
            let hours: Vec<String> = policy.hours.iter().map(ToString::to_string).collect();
            return Err(OAuthError::access_denied(format!(
                "outside the hours the grant allows ({}); it is now {}",
                hours.join("; "),
                policy.hours[0].local_time(now)
            )));
        }
        self.reserve_quota(grant, connection, user_id)
    }

    /// Count this exchange against the grant's quotas (all or nothing), or refuse it: 429 with
    /// `Retry-After` until the window that is full ends. The slots are given back if the
    /// exchange fails later.
    pub(super) fn reserve_quota(
        &self,
        grant: &Grant,
        connection: &Connection,
        user_id: &str,
    ) -> Result<crate::rate::QuotaReservation<'_>, OAuthError> {
        let rules = grant.policy.quotas.rules();
        let checks: Vec<crate::rate::QuotaCheck> = rules
            .iter()
            .map(|r| crate::rate::QuotaCheck {
                counter: r.counter(&grant.agent_id, user_id, &connection.id),
                window: r.window,
                limit: r.limit,
            })
            .collect();
        self.quotas.reserve(&checks, self.now()).map_err(|e| {
            quota_reached(
                &rules[e.index],
                &grant.agent_id,
                user_id,
                &connection.name,
                e.retry_after,
            )
        })
    }

    /// The release decision shared by the token exchange and the agent API (proxy, MCP): the
    /// connection, the agent's grant (deny by default) and address, the scopes (requested ⊆
    /// grant ⊆ consent), the user's account, the grant's hours and quotas, and the approval
    /// the risk calls for. Refusals name the rule. Nothing is released yet.
    pub(super) async fn decide(
        &self,
        ask: &Ask<'_>,
        ctx: &RequestContext,
        attempt: &mut Attempt,
    ) -> Result<Decided<'_>, OAuthError> {
        let (agent, user_id, connection_name) = (ask.agent, ask.user_id, ask.connection);
        let at = attempt.revision;
        attempt.subject_user = Some(user_id.to_owned());
        attempt.audit_context = ask.audit_context.map(str::to_owned);

        let connection = self
            .hot
            .through(
                at,
                |g| &mut g.connections,
                connection_name.to_owned(),
                self.store.connection_by_name(connection_name),
            )
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request(format!(
                    "connection `{connection_name}` does not exist"
                ))
            })?;
        attempt.connection = Some(connection.name.clone());
        let grant = self.grant_of(at, agent, &connection).await?;
        if !grant.ip_allowlist.is_empty()
            && !ctx
                .client_ip
                .is_some_and(|ip| ip_allowed(ip, &grant.ip_allowlist))
        {
            return Err(OAuthError::unauthorized_client(
                "the request comes from an address the grant does not allow",
            ));
        }
        let wanted = match ask.scope {
            Some(s) => {
                let s = Scopes::parse(s);
                if s.is_empty() {
                    return Err(OAuthError::invalid_scope("scope is empty"));
                }
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

        // An active account means the user exists (deleting a user deletes their accounts in
        // the same transaction); the user is looked up only to say why there is none.
        let account = match self
            .pick_account(user_id, &connection, ask.login_hint)
            .await
        {
            Ok(account) => account,
            Err(e) => {
                if self
                    .store
                    .user_by_id(user_id)
                    .await
                    .map_err(store_err)?
                    .is_none()
                {
                    return Err(OAuthError::invalid_grant(format!(
                        "the request names an unknown user `{user_id}`"
                    )));
                }
                return Err(e);
            }
        };
        attempt.account_id = Some(account.id.clone());
        let scope = if ask.scope.is_some() {
            if !wanted.is_subset(&account.scopes) {
                return Err(OAuthError::invalid_scope(format!(
                    "the user has not consented to {}; they must reconnect {connection_name} at {}",
                    wanted.missing_from(&account.scopes).join(" "),
                    self.config.connect_uri(connection_name)
                )));
            }
            wanted
        } else {
            let s = wanted.intersection(&account.scopes);
            if s.is_empty() {
                return Err(OAuthError::invalid_scope(format!(
                    "none of the granted scopes were consented by the user; they must reconnect {connection_name}"
                )));
            }
            s
        };

        // Policy beyond the scopes: the grant's hours, its quotas, and the risk of what would
        // be released (an approval for medium and above).
        let quota = self.grant_policy_gate(&grant, &connection, user_id)?;
        let assessment =
            crate::policy::assess(&scope, catalog::risk_table(&connection), &grant.policy.risk);
        let approval = if assessment.requirement().approval {
            // An API call through Latchkey is approved as that call (method and path); an
            // exchange, as the scopes it releases.
            let (request_hash, authorization_details) = match &ask.call {
                None => {
                    // The agent's own details, shown to the user: checked here (Latchkey's
                    // own `api_call` type is refused).
                    if let Some(d) = ask.authorization_details {
                        super::ciba::parse_authorization_details(d)?;
                    }
                    (
                        crate::policy::request_hash(&agent.id, user_id, &connection.name, &scope),
                        ask.authorization_details.map(str::to_owned),
                    )
                }
                Some(call) => {
                    let details = serde_json::json!([{
                        "type": super::ciba::API_CALL,
                        "connection": connection.name,
                        "method": call.method,
                        "path": call.path,
                    }]);
                    let scopes: Vec<&str> = scope.iter().collect();
                    let canonical = serde_json::json!([
                        agent.id,
                        user_id,
                        connection.name,
                        scopes,
                        call.method,
                        call.path
                    ]);
                    (
                        super::ciba::request_digest(&canonical),
                        Some(details.to_string()),
                    )
                }
            };
            Some(
                self.approval_gate(&crate::policy::ApprovalRequest {
                    agent_id: agent.id.clone(),
                    user_id: user_id.to_owned(),
                    connection: connection.name.clone(),
                    scopes: scope.clone(),
                    risk: assessment.risk,
                    scope_risks: assessment.scopes.clone(),
                    requirement: assessment.requirement(),
                    request_hash,
                    binding_message: ask.binding_message.map(str::to_owned),
                    authorization_details,
                    audit_context: ask.audit_context.map(str::to_owned),
                    login_hint: ask.login_hint.map(str::to_owned),
                })
                .await?,
            )
        } else {
            None
        };
        Ok(Decided {
            connection,
            account,
            scope,
            policy: grant.policy,
            quota,
            approval,
            risk: assessment.risk,
        })
    }

    pub(super) fn check_subject(&self, c: &Claims, agent_id: &str) -> Result<Subject, String> {
        let s = |n: &str| c.str(n).map_err(|e| e.to_string());
        if s("iss")? != agent_id {
            return Err("`iss` must be the client id".into());
        }
        let user_id = s("sub")?.to_owned();
        if user_id.is_empty() || user_id.len() > 256 {
            return Err("`sub` must be 1–256 characters".into());
        }
        c.audience_is(&self.config.issuer)
            .map_err(|e| e.to_string())?;
        let now = self.now();
        let iat = c.int("iat").map_err(|e| e.to_string())?;
        if now - iat > self.config.subject_max_age {
            return Err(format!(
                "`iat` is older than {} seconds",
                self.config.subject_max_age
            ));
        }
        self.not_in_future(c)?;
        let exp = c.opt_int("exp").map_err(|e| e.to_string())?;
        if exp.is_some_and(|e| e <= now) {
            return Err("expired".into());
        }
        let jti = valid_jti(c)?;
        let audit_context = s("audit_context")?;
        let chars = audit_context.chars().count();
        if !(1..=256).contains(&chars) {
            return Err("`audit_context` must be 1–256 characters".into());
        }
        // Kept until the token could no longer pass the age check anyway.
        let expires_at =
            (iat + self.config.subject_max_age).max(exp.unwrap_or(0)) + self.config.future_skew;
        Ok(Subject {
            user_id,
            audit_context: Some(audit_context.to_owned()),
            jti: Some(JtiUse {
                key: format!("subject:{agent_id}:{jti}"),
                expires_at,
            }),
        })
    }

    pub(super) async fn pick_account(
        &self,
        user_id: &str,
        connection: &Connection,
        login_hint: Option<&str>,
    ) -> Result<ConnectedAccount, OAuthError> {
        let accounts = self
            .store
            .accounts_for(user_id, &connection.id)
            .await
            .map_err(store_err)?;
        let matching = |a: &ConnectedAccount| {
            login_hint.is_none_or(|h| a.upstream_account_id.as_deref() == Some(h))
        };
        if let Some(a) = accounts
            .iter()
            .find(|a| a.status == AccountStatus::Active && matching(a))
        {
            return Ok(a.clone());
        }
        let mut err =
            OAuthError::not_connected(&connection.name, self.config.connect_uri(&connection.name));
        // Say why, when the account exists but the provider stopped honouring it.
        if let Some(reason) = accounts
            .iter()
            .find(|a| a.status == AccountStatus::NeedsReauth && matching(a))
            .map(|a| a.status_reason.clone().unwrap_or_default())
        {
            err.description = format!(
                "the user must reconnect {} at {}: {reason}",
                connection.name,
                self.config.connect_uri(&connection.name)
            );
        }
        Err(err)
    }
}

/// What an agent asks to be released (see [`Vault::decide`]).
pub(super) struct Ask<'a> {
    pub agent: &'a Agent,
    pub user_id: &'a str,
    /// The agent's stated reason (privileged workers).
    pub audit_context: Option<&'a str>,
    /// The connection's name.
    pub connection: &'a str,
    /// The requested scopes (space-separated); `None` for all the grant allows and the user
    /// consented to.
    pub scope: Option<&'a str>,
    pub login_hint: Option<&'a str>,
    pub binding_message: Option<&'a str>,
    pub authorization_details: Option<&'a str>,
    /// Set when the token is for one API call made through Latchkey.
    pub call: Option<ApiCall<'a>>,
}

/// An API call Latchkey makes for an agent: what its approval is bound to.
#[derive(Clone, Copy, Debug)]
pub struct ApiCall<'a> {
    pub method: &'a str,
    /// The path relative to the provider's API base URL, without the query.
    pub path: &'a str,
}

/// A release that policy allows (see [`Vault::decide`]).
pub(super) struct Decided<'q> {
    pub connection: Connection,
    pub account: ConnectedAccount,
    pub scope: Scopes,
    pub policy: crate::policy::GrantPolicy,
    /// Given back unless kept once the release commits.
    pub quota: crate::rate::QuotaReservation<'q>,
    pub approval: Option<crate::policy::ApprovalOutcome>,
    pub risk: crate::policy::Risk,
}

/// Who an exchange is for, and what must be recorded about the request.
pub(super) struct Subject {
    pub user_id: String,
    /// The agent's stated reason (privileged workers), recorded in the audit entry.
    pub audit_context: Option<String>,
    /// The subject token's single-use identifier, consumed with the release.
    pub jti: Option<JtiUse>,
}

/// 429 for a quota `rule` that has no room left in its window (counted by this node, or by
/// the database across every node).
fn quota_reached(
    rule: &crate::policy::QuotaRule,
    agent_id: &str,
    user_id: &str,
    connection: &str,
    retry_after: u64,
) -> OAuthError {
    let who = match rule.subject {
        crate::policy::QuotaSubject::Agent => format!("agent {agent_id}"),
        crate::policy::QuotaSubject::User => format!("user {user_id}"),
    };
    OAuthError::too_many_requests(
        format!(
            "quota reached: {who} has had {} exchanges on {connection} this {} ({} {}); retry in {retry_after} s",
            rule.limit,
            rule.window.as_str(),
            rule.flag(),
            rule.limit,
        ),
        retry_after,
    )
}

fn valid_jti(c: &Claims) -> Result<String, String> {
    let jti = c.str("jti").map_err(|e| e.to_string())?;
    if jti.is_empty() || jti.len() > 256 {
        return Err("`jti` must be 1–256 characters".into());
    }
    Ok(jti.to_owned())
}

fn jws_reason(e: &JwsError) -> String {
    e.to_string()
}

/// Read a string claim from a JWS payload *without verifying it* — only to find whose keys to
/// verify with.
pub(super) fn peek_str_claim(token: &str, name: &str) -> Option<String> {
    use base64::Engine;
    if token.len() > latchkey_crypto::jws::MAX_JWS_LEN {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v.get(name)?.as_str().map(str::to_owned)
}

/// Parse `addr` or `addr/prefix`.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    (prefix <= max).then_some((addr, prefix))
}

pub(super) fn ip_allowed(ip: IpAddr, list: &[String]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    list.iter()
        .filter_map(|c| parse_cidr(c))
        .any(|(net, prefix)| match (ip, net) {
            (IpAddr::V4(a), IpAddr::V4(n)) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix)
                };
                u32::from(a) & mask == u32::from(n) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(n)) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix)
                };
                u128::from(a) & mask == u128::from(n) & mask
            }
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matching() {
        let list = vec![
            "10.0.0.0/8".to_string(),
            "2001:db8::/32".to_string(),
            "192.168.1.7".to_string(),
        ];
        assert!(ip_allowed("10.1.2.3".parse().unwrap(), &list));
        assert!(ip_allowed("::ffff:10.1.2.3".parse().unwrap(), &list));
        assert!(ip_allowed("2001:db8::1".parse().unwrap(), &list));
        assert!(ip_allowed("192.168.1.7".parse().unwrap(), &list));
        assert!(!ip_allowed("192.168.1.8".parse().unwrap(), &list));
        assert!(!ip_allowed("11.0.0.1".parse().unwrap(), &list));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("nope").is_none());
    }

    #[test]
    fn peek_reads_unverified_iss() {
        use base64::Engine;
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let t = format!("{}.{}.sig", b("{}"), b(r#"{"iss":"agt_1"}"#));
        assert_eq!(peek_str_claim(&t, "iss").as_deref(), Some("agt_1"));
        assert_eq!(peek_str_claim("garbage", "iss"), None);
    }
}
