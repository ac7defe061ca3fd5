//! The vault service: every decision about releasing a credential is made here.
//!
//! Handlers and CLI commands call one method each. The token exchange reads, in order:
//! client authentication → subject token → connection → grant (deny by default) → scopes
//! (requested ⊆ grant ⊆ consent) → user → connected account → a fresh upstream access token
//! (single-flight refresh) → one transaction that consumes the `jti`s, re-checks the account
//! and writes the audit record. Only after that commits does a token leave.

use std::net::IpAddr;
use std::sync::Arc;

use latchkey_crypto::envelope::{Kek, Slot};
use latchkey_crypto::jws::{Claims, JwsError, PublicKey, TypRule, verify_jws};
use latchkey_crypto::secrets;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::catalog;
use crate::clock::Clock;
use crate::error::OAuthError;
use crate::keys::{KeyError, KeyService};
use crate::model::*;
use crate::params::Params;
use crate::refresh::RefreshLocks;
use crate::scope::Scopes;
use crate::store::{ConnectFlow, JtiUse, ReleaseError, Store, StoreError};
use crate::upstream::{Endpoints, Upstream, UpstreamError, UpstreamTokens};

pub const GRANT_TOKEN_VAULT: &str =
    "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_REFRESH: &str = "urn:ietf:params:oauth:token-type:refresh_token";
pub const TOKEN_TYPE_ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TOKEN_TYPE_VAULT_ACCESS: &str =
    "http://auth0.com/oauth/token-type/token-vault-access-token";
pub const TOKEN_TYPE_FEDERATED_ACCESS: &str =
    "http://auth0.com/oauth/token-type/federated-connection-access-token";
pub const ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const SUBJECT_JWT_TYP: &str = "token-vault-req+jwt";

#[derive(Clone, Debug)]
pub struct VaultConfig {
    /// `https://host:port/`, with the trailing slash.
    pub issuer: String,
    /// Subject tokens older than this (by `iat`) are refused.
    pub subject_max_age: i64,
    /// How far in the future `iat`/`nbf` may be (clock skew between agent and vault).
    pub future_skew: i64,
    /// Longest client-assertion lifetime accepted (`exp` − now).
    pub max_assertion_lifetime: i64,
    /// Refresh upstream tokens this many seconds before they expire.
    pub refresh_margin: i64,
    /// `expires_in` reported for upstream tokens that carry no expiry.
    pub non_expiring_ttl: i64,
    pub connect_flow_ttl: i64,
    pub session_ttl: i64,
    /// Token requests one agent may make per minute on this node (0: unlimited).
    pub agent_requests_per_minute: u32,
}

impl VaultConfig {
    pub fn new(issuer: impl Into<String>) -> Self {
        let mut issuer = issuer.into();
        if !issuer.ends_with('/') {
            issuer.push('/');
        }
        Self {
            issuer,
            subject_max_age: 60,
            future_skew: 10,
            max_assertion_lifetime: 300,
            refresh_margin: 30,
            non_expiring_ttl: 3600,
            connect_flow_ttl: 600,
            session_ttl: 8 * 3600,
            agent_requests_per_minute: 0,
        }
    }

    pub fn connect_uri(&self, connection: &str) -> String {
        format!("{}connect/{connection}", self.issuer)
    }

    pub fn connect_redirect_uri(&self) -> String {
        format!("{}connect/callback", self.issuer)
    }
}

/// Who is asking, beyond the body: for audit and IP allow-lists.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    pub request_id: Option<String>,
    pub client_ip: Option<IpAddr>,
}

/// Client id and secret from an `Authorization: Basic` header.
#[derive(Clone)]
pub struct BasicCredentials {
    pub client_id: String,
    pub client_secret: SecretString,
}

/// A successful exchange.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: SecretString,
    pub expires_in: i64,
    pub scope: String,
    pub issued_token_type: &'static str,
}

struct AuthenticatedClient {
    agent: Agent,
    method: &'static str,
    keys: Option<Vec<PublicKey>>,
    assertion_jti: Option<JtiUse>,
}

/// New connection settings (CLI and admin API).
#[derive(Clone, Debug)]
pub struct NewConnection {
    pub name: String,
    pub provider: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub authorize_url: String,
    pub token_url: String,
    pub revoke_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub api_base_url: Option<String>,
    pub scopes: Scopes,
}

/// Who performs an administrative change (for its audit entry).
#[derive(Clone, Debug)]
pub struct Actor {
    pub kind: &'static str,
    pub id: String,
    pub method: &'static str,
}

impl Actor {
    pub fn cli() -> Self {
        Self {
            kind: "operator",
            id: "local".into(),
            method: "cli",
        }
    }
    pub fn user(id: &str) -> Self {
        Self {
            kind: "user",
            id: id.into(),
            method: "session",
        }
    }
}

fn store_err(e: StoreError) -> OAuthError {
    tracing::error!(error = %e, "storage failure");
    OAuthError::storage_unavailable()
}

fn key_err(e: KeyError) -> OAuthError {
    tracing::error!(error = %e, "a stored secret could not be opened");
    OAuthError::server_error()
}

const PEPPER_NAME: &str = "client_secret_pepper";

pub struct Vault {
    pub config: VaultConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    upstream: Arc<dyn Upstream>,
    pub keys: KeyService,
    pepper: Zeroizing<Vec<u8>>,
    refresh_locks: RefreshLocks,
    rate: crate::rate::RateLimiter,
}

impl Vault {
    /// Unseal with `kek` (refusing a key that does not open the database) and load server secrets.
    pub async fn open(
        config: VaultConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        upstream: Arc<dyn Upstream>,
        kek: Kek,
        reload_kek: Option<Box<dyn Fn() -> Option<Kek> + Send + Sync>>,
    ) -> Result<Self, KeyError> {
        let keys = KeyService::unseal(store.clone(), kek, reload_kek, clock.now()).await?;
        let pepper = keys
            .server_secret(PEPPER_NAME, || secrets::random_bytes(32))
            .await?;
        Ok(Self {
            config,
            store,
            clock,
            upstream,
            keys,
            pepper,
            refresh_locks: RefreshLocks::default(),
            rate: Default::default(),
        })
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn audit(&self, actor: &Actor, action: &str) -> AuditRecord {
        AuditRecord {
            at: self.now(),
            actor_type: actor.kind.into(),
            actor_id: actor.id.clone(),
            auth_method: actor.method.into(),
            action: action.into(),
            decision: "allow".into(),
            ..Default::default()
        }
    }

    fn secret_hash(&self, secret: &str) -> String {
        secrets::hmac_b64(&self.pepper, secret.as_bytes())
    }

    // ---------------------------------------------------------------------------------------
    // Token endpoint
    // ---------------------------------------------------------------------------------------

    /// `POST /oauth/token`.
    pub async fn token(
        &self,
        params: &Params,
        basic: Option<BasicCredentials>,
        ctx: &RequestContext,
    ) -> Result<TokenResponse, OAuthError> {
        let result = self.token_inner(params, basic, ctx).await;
        let outcome = match &result {
            Ok(_) => "released",
            Err(e) => e.code,
        };
        metrics::counter!("latchkey_exchanges_total", "outcome" => outcome).increment(1);
        result
    }

    async fn token_inner(
        &self,
        params: &Params,
        basic: Option<BasicCredentials>,
        ctx: &RequestContext,
    ) -> Result<TokenResponse, OAuthError> {
        let grant_type = params.require("grant_type")?;
        let client = self.authenticate_client(params, basic).await?;
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
        if grant_type != GRANT_TOKEN_VAULT {
            return Err(OAuthError::unsupported_grant_type(format!(
                "grant_type `{grant_type}` is not supported; use {GRANT_TOKEN_VAULT}"
            )));
        }
        self.token_vault_exchange(params, client, ctx).await
    }

    async fn authenticate_client(
        &self,
        params: &Params,
        basic: Option<BasicCredentials>,
    ) -> Result<AuthenticatedClient, OAuthError> {
        let body_secret = params.get("client_secret");
        let assertion = params.get("client_assertion");
        let methods = [basic.is_some(), body_secret.is_some(), assertion.is_some()];
        match methods.iter().filter(|m| **m).count() {
            0 => {
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
                    Some(&basic.client_id),
                    basic.client_secret.expose_secret(),
                    "client_secret_basic",
                )
                .await;
        }
        if let Some(secret) = body_secret {
            return self
                .secret_client(client_id, secret, "client_secret_post")
                .await;
        }
        let assertion = assertion.unwrap_or_default();
        if params.get("client_assertion_type") != Some(ASSERTION_TYPE_JWT_BEARER) {
            return Err(OAuthError::invalid_client(format!(
                "client_assertion_type must be {ASSERTION_TYPE_JWT_BEARER}"
            )));
        }
        self.assertion_client(client_id, assertion).await
    }

    async fn secret_client(
        &self,
        client_id: Option<&str>,
        secret: &str,
        method: &'static str,
    ) -> Result<AuthenticatedClient, OAuthError> {
        let bad = || OAuthError::invalid_client("unknown client or wrong client secret");
        let agent = self
            .store
            .agent_by_secret_hash(&self.secret_hash(secret))
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

    async fn agent_public_keys(&self, agent_id: &str) -> Result<Vec<PublicKey>, OAuthError> {
        let rows = self.store.agent_keys(agent_id).await.map_err(store_err)?;
        Ok(rows
            .iter()
            .filter_map(|k| match PublicKey::from_jwk_json(&k.jwk) {
                Ok(pk) => Some(pk),
                Err(e) => {
                    tracing::error!(agent = agent_id, kid = %k.kid, error = %e, "stored agent key is unusable");
                    None
                }
            })
            .collect())
    }

    async fn assertion_client(
        &self,
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
            .store
            .agent_by_id(&iss)
            .await
            .map_err(store_err)?
            .filter(|a| !a.disabled)
            .ok_or_else(|| bad("unknown client"))?;
        let keys = self.agent_public_keys(&agent.id).await?;
        let claims =
            verify_jws(assertion, TypRule::JwtOrAbsent, &keys).map_err(|e| bad(&jws_reason(&e)))?;
        let now = self.now();
        let check = || -> Result<JtiUse, String> {
            let c = &claims;
            if c.str("iss").map_err(|e| e.to_string())? != agent.id
                || c.str("sub").map_err(|e| e.to_string())? != agent.id
            {
                return Err("`iss` and `sub` must both be the client id".into());
            }
            c.audience_is(&self.config.issuer)
                .map_err(|e| e.to_string())?;
            let exp = c.int("exp").map_err(|e| e.to_string())?;
            if exp <= now {
                return Err("expired".into());
            }
            if exp - now > self.config.max_assertion_lifetime + self.config.future_skew {
                return Err(format!(
                    "lifetime exceeds {} seconds",
                    self.config.max_assertion_lifetime
                ));
            }
            self.not_in_future(c)?;
            let jti = valid_jti(c)?;
            Ok(JtiUse {
                key: format!("assertion:{}:{jti}", agent.id),
                expires_at: exp + self.config.future_skew,
            })
        };
        let jti = check().map_err(|why| bad(&why))?;
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
    ) -> Result<TokenResponse, OAuthError> {
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
        match subject_type {
            TOKEN_TYPE_JWT => {}
            TOKEN_TYPE_REFRESH | TOKEN_TYPE_ACCESS => {
                return Err(OAuthError::invalid_request(format!(
                    "subject_token_type `{subject_type}` is not supported yet; privileged workers use {TOKEN_TYPE_JWT}"
                )));
            }
            other => {
                return Err(OAuthError::invalid_request(format!(
                    "unknown subject_token_type `{other}`"
                )));
            }
        }

        // The subject token: signed by this agent's key, for this vault, fresh and single-use.
        let agent = &client.agent;
        let keys = match client.keys {
            Some(k) => k,
            None => self.agent_public_keys(&agent.id).await?,
        };
        let claims =
            verify_jws(subject_token, TypRule::Exactly(SUBJECT_JWT_TYP), &keys).map_err(|e| {
                OAuthError::invalid_grant(format!("subject_token rejected: {}", jws_reason(&e)))
            })?;
        let subject = self
            .check_subject(&claims, &agent.id)
            .map_err(|why| OAuthError::invalid_grant(format!("subject_token rejected: {why}")))?;

        // Policy: deny unless a grant covers (agent, connection, scopes) and the address.
        let connection = self
            .store
            .connection_by_name(connection_name)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request(format!(
                    "connection `{connection_name}` does not exist"
                ))
            })?;
        let grant = self
            .store
            .grant_for(&agent.id, &connection.id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::unauthorized_client(format!(
                    "agent {} has no grant for connection {connection_name}",
                    agent.id
                ))
            })?;
        if !grant.ip_allowlist.is_empty()
            && !ctx
                .client_ip
                .is_some_and(|ip| ip_allowed(ip, &grant.ip_allowlist))
        {
            return Err(OAuthError::unauthorized_client(
                "the request comes from an address the grant does not allow",
            ));
        }
        let wanted = match params.get("scope") {
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

        let user = self
            .store
            .user_by_id(&subject.user_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_grant(format!(
                    "subject_token names an unknown user `{}`",
                    subject.user_id
                ))
            })?;
        let account = self
            .pick_account(&user.id, &connection, params.get("login_hint"))
            .await?;
        let scope = if params.get("scope").is_some() {
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

        let (access_token, expires_at) = self
            .fresh_access_token(account.clone(), &connection, &scope)
            .await?;
        let now = self.now();
        let expires_in = match expires_at {
            Some(t) => (t - now).max(1),
            None => self.config.non_expiring_ttl,
        };

        let mut jtis = Vec::with_capacity(2);
        let assertion_index = client.assertion_jti.as_ref().map(|_| 0);
        jtis.extend(client.assertion_jti);
        jtis.push(subject.jti);
        let audit = AuditRecord {
            at: now,
            actor_type: "agent".into(),
            actor_id: agent.id.clone(),
            auth_method: client.method.into(),
            subject_user: Some(user.id.clone()),
            action: "token.release".into(),
            connection: Some(connection.name.clone()),
            account_id: Some(account.id.clone()),
            scopes: Some(scope.to_string_spaced()),
            decision: "allow".into(),
            reason: Some(format!(
                "token {}",
                secrets::sha256_b64(access_token.expose_secret().as_bytes())
            )),
            audit_context: Some(subject.audit_context),
            request_id: ctx.request_id.clone(),
            client_ip: ctx.client_ip.map(|ip| ip.to_string()),
        };
        match self.store.commit_release(&jtis, &account.id, &audit).await {
            Ok(()) => {}
            Err(ReleaseError::Replay(i)) if Some(i) == assertion_index => {
                return Err(OAuthError::invalid_client(
                    "client assertion rejected: `jti` was already used",
                ));
            }
            Err(ReleaseError::Replay(_)) => {
                return Err(OAuthError::invalid_grant(
                    "subject_token rejected: `jti` was already used",
                ));
            }
            Err(ReleaseError::AccountInactive) => {
                return Err(OAuthError::not_connected(
                    connection_name,
                    self.config.connect_uri(connection_name),
                ));
            }
            Err(ReleaseError::Store(e)) => return Err(store_err(e)),
        }
        Ok(TokenResponse {
            access_token,
            expires_in,
            scope: scope.to_string_spaced(),
            issued_token_type,
        })
    }

    fn check_subject(&self, c: &Claims, agent_id: &str) -> Result<Subject, String> {
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
            audit_context: audit_context.to_owned(),
            jti: JtiUse {
                key: format!("subject:{agent_id}:{jti}"),
                expires_at,
            },
        })
    }

    async fn pick_account(
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
        accounts
            .into_iter()
            .filter(|a| a.status == AccountStatus::Active)
            .find(|a| login_hint.is_none_or(|h| a.upstream_account_id.as_deref() == Some(h)))
            .ok_or_else(|| {
                OAuthError::not_connected(
                    &connection.name,
                    self.config.connect_uri(&connection.name),
                )
            })
    }

    // ---------------------------------------------------------------------------------------
    // Upstream tokens
    // ---------------------------------------------------------------------------------------

    fn is_fresh(&self, a: &ConnectedAccount) -> bool {
        a.access_token.is_some()
            && a.access_expires_at
                .is_none_or(|t| t - self.now() > self.config.refresh_margin)
    }

    async fn open_access(
        &self,
        a: &ConnectedAccount,
    ) -> Result<(SecretString, Option<i64>), OAuthError> {
        let blob = a
            .access_token
            .as_deref()
            .ok_or_else(OAuthError::server_error)?;
        let token = self
            .keys
            .open_string(account_slot(&a.id, "access_token"), blob)
            .await
            .map_err(key_err)?;
        Ok((token, a.access_expires_at))
    }

    async fn endpoints(&self, conn: &Connection) -> Result<Endpoints, OAuthError> {
        let secret = match &conn.client_secret {
            Some(blob) => Some(
                self.keys
                    .open_string(
                        Slot {
                            table: "connections",
                            field: "client_secret",
                            row: &conn.id,
                        },
                        blob,
                    )
                    .await
                    .map_err(key_err)?,
            ),
            None => None,
        };
        Ok(catalog::endpoints(conn, &self.config.issuer, secret))
    }

    /// An upstream access token for `scope` on this account, refreshed first if it is (nearly)
    /// expired. When `scope` is narrower than the user's consent and the provider honours
    /// `scope` on refresh, the token itself is narrowed (and cached per scope set); otherwise
    /// the narrowing is Latchkey's policy and the answer's `scope`. At most one refresh per
    /// account runs at a time; the others wait, re-read, and reuse its result.
    async fn fresh_access_token(
        &self,
        account: ConnectedAccount,
        conn: &Connection,
        scope: &Scopes,
    ) -> Result<(SecretString, Option<i64>), OAuthError> {
        if catalog::narrows_upstream(conn) && *scope != account.scopes {
            return self.fresh_scoped_token(account, conn, scope).await;
        }
        if self.is_fresh(&account) {
            return self.open_access(&account).await;
        }
        let _guard = self.refresh_locks.lock(&account.id).await;
        let current = self.active_account(&account.id, conn).await?;
        if self.is_fresh(&current) {
            return self.open_access(&current).await;
        }
        let (current, tokens) = self.call_refresh(current, conn, None).await?;
        let updated = self.apply_tokens(current.clone(), tokens, None);
        if !self
            .store
            .update_account_tokens(&updated, current.token_version)
            .await
            .map_err(store_err)?
        {
            // Another process changed the account meanwhile. The token in hand is valid, and the
            // release transaction still refuses it if the account was revoked.
            tracing::warn!(account = %current.id, "refreshed tokens lost a concurrent update");
        }
        self.open_access(&updated).await
    }

    async fn fresh_scoped_token(
        &self,
        account: ConnectedAccount,
        conn: &Connection,
        scope: &Scopes,
    ) -> Result<(SecretString, Option<i64>), OAuthError> {
        let id = format!("{} {}", account.id, scope.to_string_spaced());
        let cached = || async {
            let t = self.store.scoped_token(&id).await.map_err(store_err)?;
            match t {
                Some(t)
                    if t.expires_at
                        .is_none_or(|e| e - self.now() > self.config.refresh_margin) =>
                {
                    let token = self
                        .keys
                        .open_string(scoped_slot(&t.id), &t.access_token)
                        .await
                        .map_err(key_err)?;
                    Ok::<_, OAuthError>(Some((token, t.expires_at)))
                }
                _ => Ok(None),
            }
        };
        if let Some(hit) = cached().await? {
            return Ok(hit);
        }
        let _guard = self.refresh_locks.lock(&account.id).await;
        if let Some(hit) = cached().await? {
            return Ok(hit);
        }
        let current = self.active_account(&account.id, conn).await?;
        let (current, tokens) = self.call_refresh(current, conn, Some(scope)).await?;
        let now = self.now();
        let scoped = ScopedToken {
            access_token: self.keys.seal(
                scoped_slot(&id),
                tokens.access_token.expose_secret().as_bytes(),
            ),
            id,
            account_id: current.id.clone(),
            scopes: scope.clone(),
            expires_at: tokens.expires_in.map(|e| now + e),
        };
        let mut updated = current.clone();
        if let Some(r) = &tokens.refresh_token {
            updated.refresh_token = Some(self.keys.seal(
                account_slot(&updated.id, "refresh_token"),
                r.expose_secret().as_bytes(),
            ));
        }
        updated.updated_at = now;
        if !self
            .store
            .store_scoped_token(&updated, current.token_version, &scoped)
            .await
            .map_err(store_err)?
        {
            tracing::warn!(account = %current.id, "narrowed token lost a concurrent update");
        }
        Ok((tokens.access_token, scoped.expires_at))
    }

    /// The account as stored now, if it is still active.
    async fn active_account(
        &self,
        id: &str,
        conn: &Connection,
    ) -> Result<ConnectedAccount, OAuthError> {
        let not_connected =
            || OAuthError::not_connected(&conn.name, self.config.connect_uri(&conn.name));
        let account = self
            .store
            .account_by_id(id)
            .await
            .map_err(store_err)?
            .ok_or_else(not_connected)?;
        if account.status != AccountStatus::Active {
            return Err(not_connected());
        }
        Ok(account)
    }

    /// The provider's refresh grant for `current`, called under the account's lock. On
    /// `invalid_grant` the account is re-read first: if another writer rotated the refresh token
    /// meanwhile, the call is retried once with the new one, so a losing racer never declares
    /// the winner's token dead. Otherwise the account needs the user to reconnect. Timeouts,
    /// 5xx and 429 leave everything stored untouched and answer 503 with `Retry-After`.
    async fn call_refresh(
        &self,
        mut current: ConnectedAccount,
        conn: &Connection,
        scope: Option<&Scopes>,
    ) -> Result<(ConnectedAccount, UpstreamTokens), OAuthError> {
        let not_connected =
            || OAuthError::not_connected(&conn.name, self.config.connect_uri(&conn.name));
        let ep = self.endpoints(conn).await?;
        for attempt in 0..2 {
            let Some(blob) = current.refresh_token.as_deref() else {
                return Err(not_connected());
            };
            let refresh_token = self
                .keys
                .open_string(account_slot(&current.id, "refresh_token"), blob)
                .await
                .map_err(key_err)?;
            let result = self.upstream.refresh(&ep, &refresh_token, scope).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(UpstreamError::InvalidGrant(_)) => "invalid_grant",
                Err(UpstreamError::Transient { .. }) => "unavailable",
                Err(UpstreamError::Protocol(_)) => "malformed",
            };
            metrics::counter!("latchkey_upstream_refreshes_total", "outcome" => outcome)
                .increment(1);
            match result {
                Ok(tokens) => return Ok((current, tokens)),
                Err(UpstreamError::InvalidGrant(why)) => {
                    let again = self
                        .store
                        .account_by_id(&current.id)
                        .await
                        .map_err(store_err)?
                        .ok_or_else(not_connected)?;
                    if attempt == 0
                        && again.status == AccountStatus::Active
                        && again.token_version != current.token_version
                    {
                        current = again;
                        continue;
                    }
                    let audit = AuditRecord {
                        subject_user: Some(current.user_id.clone()),
                        connection: Some(conn.name.clone()),
                        account_id: Some(current.id.clone()),
                        reason: Some(format!("provider refused the refresh token: {why}")),
                        ..self.audit(
                            &Actor {
                                kind: "operator",
                                id: "vault".into(),
                                method: "refresh",
                            },
                            "account.needs_reauth",
                        )
                    };
                    self.store
                        .set_account_status(
                            &current.id,
                            AccountStatus::NeedsReauth,
                            current.token_version,
                            &audit,
                        )
                        .await
                        .map_err(store_err)?;
                    return Err(not_connected());
                }
                Err(UpstreamError::Transient {
                    message,
                    retry_after,
                }) => {
                    tracing::warn!(connection = %conn.name, %message, "upstream refresh failed, token left untouched");
                    return Err(OAuthError::upstream_unavailable(
                        format!("{} is temporarily unavailable; retry shortly", conn.name),
                        retry_after.unwrap_or(5),
                    ));
                }
                Err(UpstreamError::Protocol(message)) => {
                    tracing::warn!(connection = %conn.name, %message, "upstream refresh answered malformed data");
                    return Err(OAuthError::upstream_unavailable(
                        format!("{} answered malformed data; retry shortly", conn.name),
                        5,
                    ));
                }
            }
        }
        Err(not_connected())
    }

    /// The account with new upstream tokens sealed in (old refresh token kept if none came).
    fn apply_tokens(
        &self,
        mut a: ConnectedAccount,
        t: UpstreamTokens,
        default_scopes: Option<&Scopes>,
    ) -> ConnectedAccount {
        let now = self.now();
        a.access_token = Some(self.keys.seal(
            account_slot(&a.id, "access_token"),
            t.access_token.expose_secret().as_bytes(),
        ));
        a.access_expires_at = t.expires_in.map(|e| now + e);
        if let Some(r) = t.refresh_token {
            a.refresh_token = Some(self.keys.seal(
                account_slot(&a.id, "refresh_token"),
                r.expose_secret().as_bytes(),
            ));
        }
        if let Some(s) = t.scope.filter(|s| !s.is_empty()) {
            a.scopes = s;
        } else if let Some(d) = default_scopes {
            a.scopes = d.clone();
        }
        a.updated_at = now;
        a.token_version += 1;
        a
    }

    // ---------------------------------------------------------------------------------------
    // Connecting an account (authorization code + PKCE towards the provider)
    // ---------------------------------------------------------------------------------------

    /// Start connecting `connection` for `user_id`; returns the provider's authorize URL.
    pub async fn connect_start(
        &self,
        user_id: &str,
        connection: &str,
    ) -> Result<String, OAuthError> {
        let conn = self
            .store
            .connection_by_name(connection)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request(format!("connection `{connection}` does not exist"))
            })?;
        let ep = self.endpoints(&conn).await?;
        let state = secrets::random_token(32);
        let verifier = secrets::random_token(32);
        let challenge = secrets::sha256_b64(verifier.as_bytes());
        let state_hash = secrets::sha256_b64(state.as_bytes());
        let redirect_uri = self.config.connect_redirect_uri();
        let flow = ConnectFlow {
            code_verifier: self.keys.seal(
                Slot {
                    table: "connect_flows",
                    field: "code_verifier",
                    row: &state_hash,
                },
                verifier.as_bytes(),
            ),
            state_hash,
            user_id: user_id.to_owned(),
            connection_id: conn.id.clone(),
            redirect_uri: redirect_uri.clone(),
            expires_at: self.now() + self.config.connect_flow_ttl,
        };
        self.store
            .insert_connect_flow(&flow)
            .await
            .map_err(store_err)?;
        let mut url = url_with_query(
            &ep.authorize_url,
            &[
                ("response_type", "code"),
                ("client_id", &ep.client_id),
                ("redirect_uri", &redirect_uri),
                ("scope", &conn.scopes.to_string_spaced()),
                ("state", &state),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        );
        if conn.scopes.is_empty() {
            url = url.replace("&scope=&", "&");
        }
        Ok(url)
    }

    /// Finish a connect flow for the signed-in `user_id` with the provider's `code`.
    pub async fn connect_finish(
        &self,
        user_id: &str,
        state: &str,
        code: &str,
    ) -> Result<ConnectedAccount, OAuthError> {
        let state_hash = secrets::sha256_b64(state.as_bytes());
        let flow = self
            .store
            .take_connect_flow(&state_hash, self.now())
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request("unknown or expired connect request; start again")
            })?;
        if flow.user_id != user_id {
            return Err(OAuthError::invalid_request(
                "this connect request was started by another user",
            ));
        }
        let conn = self
            .store
            .connection_by_id(&flow.connection_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_request("the connection was removed"))?;
        let verifier = self
            .keys
            .open_string(
                Slot {
                    table: "connect_flows",
                    field: "code_verifier",
                    row: &state_hash,
                },
                &flow.code_verifier,
            )
            .await
            .map_err(key_err)?;
        let ep = self.endpoints(&conn).await?;
        let tokens = self
            .upstream
            .exchange_code(&ep, code, verifier.expose_secret(), &flow.redirect_uri)
            .await
            .map_err(|e| match e {
                UpstreamError::InvalidGrant(why) => {
                    OAuthError::invalid_grant(format!("{} refused the code: {why}", conn.name))
                }
                other => OAuthError::upstream_unavailable(format!("{}: {other}", conn.name), 5),
            })?;
        let upstream_account_id = match &ep.userinfo_url {
            Some(url) => match self.upstream.userinfo(url, &tokens.access_token).await {
                Ok(info) => ["id", "sub", "login"]
                    .iter()
                    .find_map(|k| match info.get(*k) {
                        Some(serde_json::Value::String(s)) => Some(s.clone()),
                        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                        _ => None,
                    }),
                Err(e) => {
                    tracing::warn!(connection = %conn.name, error = %e, "could not read the upstream account id");
                    None
                }
            },
            None => None,
        };
        let now = self.now();
        let existing = self
            .store
            .accounts_for(user_id, &conn.id)
            .await
            .map_err(store_err)?
            .into_iter()
            .find(|a| a.upstream_account_id == upstream_account_id);
        let base = existing.unwrap_or_else(|| ConnectedAccount {
            id: secrets::random_id("cac"),
            user_id: user_id.to_owned(),
            connection_id: conn.id.clone(),
            upstream_account_id: upstream_account_id.clone(),
            scopes: Scopes::default(),
            access_token: None,
            access_expires_at: None,
            refresh_token: None,
            status: AccountStatus::Active,
            created_at: now,
            updated_at: now,
            last_used_at: None,
            token_version: 0,
        });
        let mut account = self.apply_tokens(base, tokens, Some(&conn.scopes));
        account.status = AccountStatus::Active;
        let audit = AuditRecord {
            subject_user: Some(user_id.to_owned()),
            connection: Some(conn.name.clone()),
            account_id: Some(account.id.clone()),
            scopes: Some(account.scopes.to_string_spaced()),
            ..self.audit(&Actor::user(user_id), "account.connect")
        };
        let id = self
            .store
            .upsert_account(&account, &audit)
            .await
            .map_err(store_err)?;
        account.id = id;
        Ok(account)
    }

    // ---------------------------------------------------------------------------------------
    // Users and sessions
    // ---------------------------------------------------------------------------------------

    pub async fn add_user(
        &self,
        username: &str,
        password: Option<&str>,
        actor: &Actor,
    ) -> Result<User, AdminError> {
        validate_name("username", username)?;
        let password_hash = match password {
            Some(p) => Some(hash_password(p).await?),
            None => None,
        };
        let user = User {
            id: secrets::random_id("usr"),
            username: username.to_owned(),
            password_hash,
            created_at: self.now(),
        };
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            ..self.audit(actor, "user.create")
        };
        self.store.insert_user(&user, &audit).await?;
        Ok(user)
    }

    pub async fn set_password(
        &self,
        user_ref: &str,
        password: &str,
        actor: &Actor,
    ) -> Result<User, AdminError> {
        let user = self.find_user(user_ref).await?;
        let hash = hash_password(password).await?;
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            ..self.audit(actor, "user.password")
        };
        self.store.set_password(&user.id, &hash, &audit).await?;
        Ok(user)
    }

    /// A user by id or username.
    pub async fn find_user(&self, user_ref: &str) -> Result<User, AdminError> {
        if let Some(u) = self.store.user_by_id(user_ref).await? {
            return Ok(u);
        }
        self.store
            .user_by_username(user_ref)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no user `{user_ref}`")))
    }

    /// Check a password; spends the same Argon2 time whether or not the user exists.
    pub async fn login(&self, username: &str, password: &str) -> Result<Option<User>, OAuthError> {
        let user = self
            .store
            .user_by_username(username)
            .await
            .map_err(store_err)?;
        let hash = user
            .as_ref()
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| latchkey_crypto::password::dummy_hash().to_owned());
        let password = Zeroizing::new(password.to_owned());
        let ok = tokio::task::spawn_blocking(move || {
            latchkey_crypto::password::verify_password(&password, &hash)
        })
        .await
        .unwrap_or(false);
        let ok = ok && user.as_ref().is_some_and(|u| u.password_hash.is_some());
        let audit = AuditRecord {
            subject_user: user.as_ref().map(|u| u.id.clone()),
            decision: if ok { "allow" } else { "deny" }.into(),
            reason: (!ok).then(|| "wrong username or password".into()),
            ..self.audit(
                &Actor {
                    kind: "user",
                    id: username.chars().take(64).collect(),
                    method: "password",
                },
                "user.login",
            )
        };
        self.store.append_audit(&audit).await.map_err(store_err)?;
        Ok(if ok { user } else { None })
    }

    /// Create a browser session; returns the cookie value (stored only as a hash).
    pub async fn create_session(&self, user_id: &str) -> Result<String, OAuthError> {
        let token = secrets::random_token(32);
        self.store
            .insert_session(
                &secrets::sha256_b64(token.as_bytes()),
                user_id,
                self.now() + self.config.session_ttl,
            )
            .await
            .map_err(store_err)?;
        Ok(token)
    }

    pub async fn session_user(&self, token: &str) -> Result<Option<String>, OAuthError> {
        self.store
            .session_user(&secrets::sha256_b64(token.as_bytes()), self.now())
            .await
            .map_err(store_err)
    }

    pub async fn end_session(&self, token: &str) -> Result<(), OAuthError> {
        self.store
            .delete_session(&secrets::sha256_b64(token.as_bytes()))
            .await
            .map_err(store_err)
    }

    // ---------------------------------------------------------------------------------------
    // Registry administration (CLI, later the admin API and dashboard)
    // ---------------------------------------------------------------------------------------

    pub async fn add_connection(
        &self,
        new: NewConnection,
        actor: &Actor,
    ) -> Result<Connection, AdminError> {
        validate_name("connection name", &new.name)?;
        if !catalog::known_provider(&new.provider) {
            return Err(AdminError::Invalid(format!(
                "unknown provider `{}` (known: demo, oauth2)",
                new.provider
            )));
        }
        if new.provider == catalog::GENERIC {
            for (what, u) in [
                ("authorize URL", &new.authorize_url),
                ("token URL", &new.token_url),
            ] {
                let parsed = url::Url::parse(u)
                    .map_err(|_| AdminError::Invalid(format!("{what} `{u}` is not a URL")))?;
                if parsed.scheme() != "https" && !is_loopback_host(&parsed) {
                    return Err(AdminError::Invalid(format!("{what} must use https")));
                }
            }
        }
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
            scopes: new.scopes,
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
        validate_name("agent name", name)?;
        if keys.is_empty() && !with_secret {
            return Err(AdminError::Invalid(
                "an agent needs a public key or a client secret".into(),
            ));
        }
        let secret = with_secret.then(|| secrets::random_token(32));
        let agent = Agent {
            id: secrets::random_id("agt"),
            name: name.to_owned(),
            secret_hash: secret.as_deref().map(|s| self.secret_hash(s)),
            disabled: false,
            created_at: self.now(),
        };
        let rows: Vec<AgentKey> = keys
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
            reason: Some(format!("{} key(s), secret: {with_secret}", rows.len())),
            ..self.audit(actor, "agent.create")
        };
        self.store.insert_agent(&agent, &rows, &audit).await?;
        Ok((agent, secret.map(SecretString::from)))
    }

    /// Allow an agent `scopes` on a connection (replacing an earlier grant).
    pub async fn grant(
        &self,
        agent_id: &str,
        connection: &str,
        scopes: Scopes,
        ip_allowlist: Vec<String>,
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
        let grant = Grant {
            agent_id: agent.id,
            connection_id: conn.id,
            scopes,
            ip_allowlist,
            created_at: self.now(),
        };
        let audit = AuditRecord {
            connection: Some(conn.name),
            scopes: Some(grant.scopes.to_string_spaced()),
            reason: Some(format!("grant to {}", grant.agent_id)),
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
            ..self.audit(actor, "account.revoke")
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

    /// Rotate the data key and re-seal every stored secret (online).
    pub async fn rotate_data_key(&self) -> Result<crate::keys::RotationReport, KeyError> {
        self.keys.rotate_data_key(self.now()).await
    }
}

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

async fn hash_password(password: &str) -> Result<String, AdminError> {
    if password.chars().count() < 8 {
        return Err(AdminError::Invalid(
            "passwords need at least 8 characters".into(),
        ));
    }
    let p = Zeroizing::new(password.to_owned());
    tokio::task::spawn_blocking(move || latchkey_crypto::password::hash_password(&p))
        .await
        .map_err(|_| AdminError::Storage("password hashing failed".into()))
}

fn validate_name(what: &str, name: &str) -> Result<(), AdminError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(AdminError::Invalid(format!(
            "{what} must be 1–64 characters of letters, digits, - _ . @"
        )))
    }
}

struct Subject {
    user_id: String,
    audit_context: String,
    jti: JtiUse,
}

fn scoped_slot(id: &str) -> Slot<'_> {
    Slot {
        table: "scoped_tokens",
        field: "access_token",
        row: id,
    }
}

pub fn account_slot<'a>(id: &'a str, field: &'static str) -> Slot<'a> {
    Slot {
        table: "connected_accounts",
        field,
        row: id,
    }
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
fn peek_str_claim(token: &str, name: &str) -> Option<String> {
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

fn url_with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut s = String::from(base);
    s.push(if base.contains('?') { '&' } else { '?' });
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
            )
        })
        .collect();
    s.push_str(&encoded.join("&"));
    s
}

fn is_loopback_host(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
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

fn ip_allowed(ip: IpAddr, list: &[String]) -> bool {
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
