//! The registry: connections, agents, grants and revocation — what the CLI (and later the
//! admin API and dashboard) change, each change with its audit entry.

use super::*;
use crate::policy::GrantPolicy;

impl Vault {
    // ---------------------------------------------------------------------------------------
    // Registry administration (CLI, later the admin API and dashboard)
    // ---------------------------------------------------------------------------------------

    pub async fn add_connection(
        &self,
        mut new: NewConnection,
        actor: &Actor,
    ) -> Result<Connection, AdminError> {
        validate_name("connection name", &new.name)?;
        catalog::complete(&mut new).map_err(AdminError::Invalid)?;
        let id = secrets::random_id("con");
        let client_secret = new.client_secret.as_ref().map(|s| {
            self.keys.seal(
                Slot {
                    table: "connections",
                    field: "client_secret",
                    row: &id,
                },
                s.expose_secret().as_bytes(),
            )
        });
        let conn = Connection {
            id,
            name: new.name,
            provider: new.provider,
            client_id: new.client_id,
            client_secret,
            authorize_url: new.authorize_url,
            token_url: new.token_url,
            revoke_url: new.revoke_url,
            userinfo_url: new.userinfo_url,
            api_base_url: new.api_base_url,
            issuer: new.issuer,
            scopes: new.scopes,
            keep_alive_secs: new.keep_alive_secs,
            created_at: self.now(),
        };
        let audit = AuditRecord {
            connection: Some(conn.name.clone()),
            ..self.audit(actor, "connection.create")
        };
        self.store.insert_connection(&conn, &audit).await?;
        Ok(conn)
    }

    /// Register an agent with public keys and, if asked, a generated client secret (returned
    /// once, stored only as an HMAC).
    pub async fn add_agent(
        &self,
        name: &str,
        keys: &[PublicKey],
        with_secret: bool,
        actor: &Actor,
    ) -> Result<(Agent, Option<SecretString>), AdminError> {
        self.add_client(
            NewClient {
                name: name.into(),
                keys: keys.to_vec(),
                with_secret,
                ..Default::default()
            },
            actor,
        )
        .await
    }

    /// Register a client: an agent, an app whose users sign in through `/authorize`, or both.
    pub async fn add_client(
        &self,
        new: NewClient,
        actor: &Actor,
    ) -> Result<(Agent, Option<SecretString>), AdminError> {
        validate_name("client name", &new.name)?;
        if new.keys.is_empty() && !new.with_secret && !new.public_client {
            return Err(AdminError::Invalid(
                "a client needs a public key or a client secret (or to be a public app)".into(),
            ));
        }
        if new.public_client && (new.with_secret || !new.keys.is_empty()) {
            return Err(AdminError::Invalid(
                "a public app has no secret and no keys".into(),
            ));
        }
        if new.public_client && new.redirect_uris.is_empty() {
            return Err(AdminError::Invalid(
                "a public app needs a redirect URI".into(),
            ));
        }
        for uri in &new.redirect_uris {
            validate_redirect_uri(uri)?;
        }
        let secret = new.with_secret.then(|| secrets::random_token(32));
        let agent = Agent {
            id: secrets::random_id(if new.redirect_uris.is_empty() {
                "agt"
            } else {
                "app"
            }),
            name: new.name.clone(),
            secret_hash: secret.as_deref().map(|s| self.secret_hash(s)),
            disabled: false,
            redirect_uris: new.redirect_uris.clone(),
            public_client: new.public_client,
            rotate_refresh_tokens: new.rotate_refresh_tokens,
            resource_server: new.resource_server.clone(),
            created_at: self.now(),
        };
        let rows: Vec<AgentKey> = new
            .keys
            .iter()
            .map(|k| AgentKey {
                agent_id: agent.id.clone(),
                kid: k.kid.clone(),
                alg: latchkey_crypto::jws::alg_name(k.alg).into(),
                jwk: k.to_jwk_json(),
                created_at: agent.created_at,
            })
            .collect();
        let audit = AuditRecord {
            agent_id: Some(agent.id.clone()),
            reason: Some(format!(
                "{} key(s), secret: {}, redirect URIs: {}",
                rows.len(),
                new.with_secret,
                agent.redirect_uris.len()
            )),
            ..self.audit(actor, "client.create")
        };
        self.store.insert_agent(&agent, &rows, &audit).await?;
        Ok((agent, secret.map(SecretString::from)))
    }

    /// Allow an agent `scopes` on a connection (replacing an earlier grant), with no policy
    /// beyond them: catalog risks, any hour, no lifetime cap, no quota.
    pub async fn grant(
        &self,
        agent_id: &str,
        connection: &str,
        scopes: Scopes,
        ip_allowlist: Vec<String>,
        actor: &Actor,
    ) -> Result<Grant, AdminError> {
        self.grant_with_policy(
            agent_id,
            connection,
            scopes,
            ip_allowlist,
            GrantPolicy::default(),
            actor,
        )
        .await
    }

    /// Allow an agent `scopes` on a connection under `policy` (risk overrides, hours, lifetime
    /// cap, quotas), replacing an earlier grant whole. Everything is checked before anything
    /// is written.
    pub async fn grant_with_policy(
        &self,
        agent_id: &str,
        connection: &str,
        scopes: Scopes,
        ip_allowlist: Vec<String>,
        policy: GrantPolicy,
        actor: &Actor,
    ) -> Result<Grant, AdminError> {
        let agent = self
            .store
            .agent_by_id(agent_id)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no agent `{agent_id}`")))?;
        let conn = self
            .store
            .connection_by_name(connection)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no connection `{connection}`")))?;
        if scopes.is_empty() {
            return Err(AdminError::Invalid(
                "a grant needs at least one scope".into(),
            ));
        }
        for entry in &ip_allowlist {
            parse_cidr(entry).ok_or_else(|| {
                AdminError::Invalid(format!("`{entry}` is not an IP address or CIDR block"))
            })?;
        }
        policy
            .validate(&scopes)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        let grant = Grant {
            agent_id: agent.id,
            connection_id: conn.id,
            scopes,
            ip_allowlist,
            policy,
            created_at: self.now(),
        };
        let reason = if grant.policy == GrantPolicy::default() {
            format!("grant to {}", grant.agent_id)
        } else {
            format!(
                "grant to {}; policy {}",
                grant.agent_id,
                grant.policy.to_json()
            )
        };
        let audit = AuditRecord {
            connection: Some(conn.name),
            agent_id: Some(grant.agent_id.clone()),
            scopes: Some(grant.scopes.to_string_spaced()),
            reason: Some(reason),
            ..self.audit(actor, "grant.upsert")
        };
        self.store.upsert_grant(&grant, &audit).await?;
        Ok(grant)
    }

    /// Revoke a connected account: exchanges stop at once (the row is revoked and its tokens
    /// erased in one commit), then the provider is asked to revoke the refresh token.
    pub async fn revoke_account(
        &self,
        account_id: &str,
        actor: &Actor,
    ) -> Result<RevokeOutcome, AdminError> {
        self.revoke_account_noted(account_id, actor, None, &RequestContext::default())
            .await
    }

    /// [`Vault::revoke_account`], with a note for the audit entry (how the actor came) and the
    /// request it was made in.
    pub(super) async fn revoke_account_noted(
        &self,
        account_id: &str,
        actor: &Actor,
        note: Option<String>,
        ctx: &RequestContext,
    ) -> Result<RevokeOutcome, AdminError> {
        let account =
            self.store.account_by_id(account_id).await?.ok_or_else(|| {
                AdminError::NotFound(format!("no connected account `{account_id}`"))
            })?;
        let conn = self.store.connection_by_id(&account.connection_id).await?;
        let refresh = match &account.refresh_token {
            Some(b) => self
                .keys
                .open_string(account_slot(&account.id, "refresh_token"), b)
                .await
                .ok(),
            None => None,
        };
        let audit = AuditRecord {
            subject_user: Some(account.user_id.clone()),
            connection: conn.as_ref().map(|c| c.name.clone()),
            account_id: Some(account.id.clone()),
            reason: note,
            ..self.audit_in(actor, "account.revoke", ctx)
        };
        self.store.revoke_account(&account.id, &audit).await?;
        let mut upstream_revoked = false;
        if let (Some(conn), Some(refresh)) = (conn, refresh)
            && let Ok(ep) = self.endpoints(&conn).await
            && ep.revoke_url.is_some()
        {
            match self.upstream.revoke(&ep, &refresh, "refresh_token").await {
                Ok(()) => upstream_revoked = true,
                Err(e) => {
                    tracing::warn!(account = %account.id, error = %e, "provider revocation failed")
                }
            }
        }
        Ok(RevokeOutcome { upstream_revoked })
    }

    /// Disable (or re-enable) a client: from the next request on it cannot authenticate, so
    /// none of its grants is usable.
    pub async fn set_agent_disabled(
        &self,
        agent_id: &str,
        disabled: bool,
        actor: &Actor,
    ) -> Result<(), AdminError> {
        let audit = AuditRecord {
            agent_id: Some(agent_id.to_owned()),
            reason: Some(format!(
                "{agent_id} {}",
                if disabled { "disabled" } else { "enabled" }
            )),
            ..self.audit(
                actor,
                if disabled {
                    "client.disable"
                } else {
                    "client.enable"
                },
            )
        };
        if self
            .store
            .set_agent_disabled(agent_id, disabled, &audit)
            .await?
        {
            Ok(())
        } else {
            Err(AdminError::NotFound(format!("no agent `{agent_id}`")))
        }
    }

    /// Remove an agent's grant for a connection: its next exchange there is refused.
    pub async fn remove_grant(
        &self,
        agent_id: &str,
        connection: &str,
        actor: &Actor,
    ) -> Result<(), AdminError> {
        let conn = self
            .store
            .connection_by_name(connection)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no connection `{connection}`")))?;
        let audit = AuditRecord {
            connection: Some(conn.name.clone()),
            agent_id: Some(agent_id.to_owned()),
            reason: Some(format!("grant of {agent_id} removed")),
            ..self.audit(actor, "grant.delete")
        };
        if self.store.delete_grant(agent_id, &conn.id, &audit).await? {
            Ok(())
        } else {
            Err(AdminError::NotFound(format!(
                "agent `{agent_id}` has no grant for `{connection}`"
            )))
        }
    }

    /// Delete a user and everything that belongs to them: each connected account is revoked
    /// (at the provider too, where it can be), then the user, their sessions, sign-ins and
    /// pending flows go in one transaction. Returns how many accounts the providers revoked.
    pub async fn delete_user(&self, user_ref: &str, actor: &Actor) -> Result<usize, AdminError> {
        let user = self.find_user(user_ref).await?;
        let mut revoked_upstream = 0;
        for account in self.store.list_accounts(Some(&user.id)).await? {
            if account.status != AccountStatus::Revoked
                && self
                    .revoke_account(&account.id, actor)
                    .await?
                    .upstream_revoked
            {
                revoked_upstream += 1;
            }
        }
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            reason: Some(format!("user {} deleted", user.username)),
            ..self.audit(actor, "user.delete")
        };
        self.store.delete_user(&user.id, &audit).await?;
        Ok(revoked_upstream)
    }

    /// Create a bearer token for the admin API. The secret is returned once and stored only as
    /// an HMAC under the server's pepper.
    pub async fn add_operator_token(
        &self,
        name: &str,
        actor: &Actor,
    ) -> Result<(OperatorToken, SecretString), AdminError> {
        validate_name("token name", name)?;
        let secret = format!("{OPERATOR_TOKEN_PREFIX}{}", secrets::random_token(32));
        let token = OperatorToken {
            id: secrets::random_id("opt"),
            name: name.to_owned(),
            created_at: self.now(),
            last_used_at: None,
            revoked_at: None,
        };
        let audit = AuditRecord {
            reason: Some(format!("operator token {name}")),
            ..self.audit(actor, "operator_token.create")
        };
        self.store
            .insert_operator_token(&token, &self.secret_hash(&secret), &audit)
            .await?;
        Ok((token, SecretString::from(secret)))
    }

    /// The unrevoked operator token this bearer secret belongs to.
    pub async fn authenticate_operator(
        &self,
        secret: &str,
    ) -> Result<Option<OperatorToken>, OAuthError> {
        if !secret.starts_with(OPERATOR_TOKEN_PREFIX) {
            return Ok(None);
        }
        self.store
            .use_operator_token(&self.secret_hash(secret), self.now())
            .await
            .map_err(store_err)
    }

    /// Revoke an operator token by name: the next request with it is refused.
    pub async fn revoke_operator_token(&self, name: &str, actor: &Actor) -> Result<(), AdminError> {
        let audit = AuditRecord {
            reason: Some(format!("operator token {name}")),
            ..self.audit(actor, "operator_token.revoke")
        };
        if self.store.revoke_operator_token(name, &audit).await? {
            Ok(())
        } else {
            Err(AdminError::NotFound(format!(
                "no active operator token named {name}"
            )))
        }
    }

    /// Rotate the data key and re-seal every stored secret (online).
    pub async fn rotate_data_key(&self) -> Result<crate::keys::RotationReport, KeyError> {
        self.keys.rotate_data_key(self.now()).await
    }
}

/// Operator tokens start with this, so a leaked one is recognisable (secret scanners).
pub const OPERATOR_TOKEN_PREFIX: &str = "lk_op_";

/// What `revoke_account` achieved beyond the local revocation.
#[derive(Debug, Clone, Copy)]
pub struct RevokeOutcome {
    pub upstream_revoked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("storage: {0}")]
    Storage(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => AdminError::Conflict(format!("{what} already exists")),
            StoreError::NotFound => AdminError::NotFound("not found".into()),
            StoreError::Unavailable(d) => AdminError::Storage(d),
        }
    }
}

fn is_loopback_host(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// What registering a client takes (see [`Vault::add_client`]).
#[derive(Clone, Debug, Default)]
pub struct NewClient {
    pub name: String,
    pub keys: Vec<PublicKey>,
    pub with_secret: bool,
    pub redirect_uris: Vec<String>,
    pub public_client: bool,
    pub rotate_refresh_tokens: bool,
    pub resource_server: Option<String>,
}

/// Redirect URIs are matched exactly later, so they must be exact now: absolute, https (or
/// http on loopback), no fragment, no wildcards.
fn validate_redirect_uri(uri: &str) -> Result<(), AdminError> {
    let bad = |why: &str| AdminError::Invalid(format!("redirect URI `{uri}` {why}"));
    let parsed = url::Url::parse(uri).map_err(|_| bad("is not an absolute URL"))?;
    if parsed.fragment().is_some() || uri.contains('*') {
        return Err(bad("must not have a fragment or wildcard"));
    }
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(&parsed) => Ok(()),
        _ => Err(bad("must use https (http only on loopback)")),
    }
}
