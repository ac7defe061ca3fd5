//! The vault service: every decision about releasing a credential is made here.
//!
//! Handlers and CLI commands call one method each. The token exchange reads, in order:
//! client authentication → subject token → connection → grant (deny by default) → scopes
//! (requested ⊆ grant ⊆ consent) → user → connected account → a fresh upstream access token
//! (single-flight refresh) → one transaction that consumes the `jti`s, re-checks the account
//! and writes the audit record. Only after that commits does a token leave. Agents, keys,
//! connections and grants are read through an in-memory cache that the release transaction
//! checks against the database's configuration revision (`hot`).
//!
//! The parts: `exchange` (the token endpoint), `tokens` (upstream tokens: cache, narrowing,
//! single-flight refresh), `connect` (authorization code + PKCE towards a provider), `admin`
//! (the registry), `users` (accounts, passwords, TOTP, sign-in and sessions), `ciba` (CIBA:
//! `/bc-authorize`, its grant, the approval record), `approvals` (the exchange's approval gate,
//! the user's and operators' decisions, step-up, expiry), `hot` (the exchange's configuration
//! cache). This file holds the service itself
//! and what they share.

use std::net::IpAddr;
use std::sync::Arc;

use latchkey_crypto::envelope::{Kek, Slot};
use latchkey_crypto::jws::{
    AssertionRules, Claims, JwsError, PublicKey, TypRule, verify_client_assertion, verify_jws,
};
use latchkey_crypto::keygen::SigningKey;
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
use crate::store::{
    AccountConnect, CodeRedemption, ConnectFlow, JtiUse, RefreshQuery, RefreshWhy, RefreshWork,
    ReleaseError, Store, StoreError,
};
use crate::upstream::{Endpoints, Upstream, UpstreamError, UpstreamTokens};

mod admin;
mod agent_api;
mod approvals;
mod audit;
mod ciba;
mod connect;
mod exchange;
mod hot;
mod my_account;
mod oidc;
mod tokens;
mod users;
mod webhooks;

pub use admin::{AdminError, NewClient, OPERATOR_TOKEN_PREFIX, RevokeOutcome};
pub use agent_api::{
    AGENT_TOKEN_TTL, AgentAccount, AgentCaller, AgentConnection, ApprovalState, CallOutcome,
    CallToken, USER_HEADER,
};
pub use approvals::{ApprovalDecision, DecideError, Decider};
pub use audit::AuditVerification;
pub use ciba::{ApprovalSettings, BackchannelResponse, GRANT_CIBA};
pub use connect::ConnectDone;
pub use exchange::ApiCall;
pub use exchange::parse_cidr;
pub use my_account::Problem;
pub use oidc::{ACCESS_TOKEN_TYP, AccessToken, Authorize, MFA_ACR, MY_ACCOUNT_SCOPES};
pub use tokens::RefreshReport;
pub use users::SignIn;
pub use webhooks::{DeliveryReport, WebhookConfig, webhook_signature};

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
    /// The background refresher refreshes tokens with fewer seconds left than this…
    pub proactive_refresh_window: i64,
    /// …of accounts used within this many seconds.
    pub refresh_idle_after: i64,
    /// `expires_in` reported for upstream tokens that carry no expiry.
    pub non_expiring_ttl: i64,
    pub connect_flow_ttl: i64,
    pub session_ttl: i64,
    /// Token requests one agent may make per minute on this node (0: unlimited).
    pub agent_requests_per_minute: u32,
    /// Signed webhooks for account health (and later approvals and audit), if configured.
    pub webhook: Option<WebhookConfig>,
    /// CIBA requests and approvals: deadlines, polling, step-up, anti-fatigue caps.
    pub approvals: ApprovalSettings,
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
            proactive_refresh_window: 120,
            refresh_idle_after: 24 * 3600,
            non_expiring_ttl: 3600,
            connect_flow_ttl: 600,
            session_ttl: 8 * 3600,
            agent_requests_per_minute: 0,
            webhook: None,
            approvals: ApprovalSettings::default(),
        }
    }

    pub fn connect_uri(&self, connection: &str) -> String {
        format!("{}connect/{connection}", self.issuer)
    }

    /// Each connection has its own callback, so an answer is only accepted at the redirect URI
    /// of the provider its flow was started for (RFC 9700 §4.4 mix-up defence).
    pub fn connect_redirect_uri(&self, connection: &str) -> String {
        format!("{}connect/{connection}/callback", self.issuer)
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
    /// Set for token exchanges (RFC 8693).
    pub issued_token_type: Option<&'static str>,
    /// For apps' `openid` sign-ins.
    pub id_token: Option<String>,
    /// For apps' `offline_access` sign-ins (never for token exchanges).
    pub refresh_token: Option<SecretString>,
    /// A CIBA request's RFC 9396 `authorization_details`, echoed as approved.
    pub authorization_details: Option<serde_json::Value>,
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
    /// The provider's issuer, where known (OIDC discovery), for the RFC 9207 `iss` check.
    pub issuer: Option<String>,
    pub scopes: Scopes,
    /// Refresh idle accounts at least this often (seconds); default from the catalog.
    pub keep_alive_secs: Option<i64>,
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
const AUDIT_CHAIN_KEY: &str = "audit_chain_key";
const AUDIT_CHECKPOINT_KEY: &str = "audit_checkpoint_key";

pub struct Vault {
    pub config: VaultConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    upstream: Arc<dyn Upstream>,
    pub keys: KeyService,
    pepper: Zeroizing<Vec<u8>>,
    /// Latchkey's own signing keys (ID tokens, access tokens), published in the JWKS.
    signing: std::sync::RwLock<Arc<SigningKeys>>,
    refresh_locks: RefreshLocks,
    rate: crate::rate::RateLimiter,
    /// The grants' quotas (per agent and per user, per minute and per day), this node's count.
    quotas: crate::rate::QuotaCounters,
    login_failures: crate::rate::FailureLimiter,
    /// Signs audit checkpoints.
    checkpoints: latchkey_crypto::audit::CheckpointSigner,
    audit_key: Arc<crate::audit::AuditKey>,
    /// What token-vault exchanges read of the configuration, kept in memory (see `hot.rs`).
    hot: hot::ConfigCache,
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
        let signing =
            std::sync::RwLock::new(Arc::new(SigningKeys::load(&keys, store.as_ref()).await?));
        // The audit chain: its MAC key and the checkpoint signing key, sealed under the KEK.
        let chain_key = keys
            .server_secret(AUDIT_CHAIN_KEY, || secrets::random_bytes(32))
            .await?;
        let audit_key = Arc::new(crate::audit::AuditKey(chain_key));
        store.install_audit_key(audit_key.clone());
        store.chain_unchained_audit().await?;
        if config.webhook.as_ref().is_some_and(|w| w.audit_entries) {
            store.enable_audit_webhook();
        }
        let seed = keys
            .server_secret(AUDIT_CHECKPOINT_KEY, || secrets::random_bytes(32))
            .await?;
        let checkpoints = latchkey_crypto::audit::CheckpointSigner::from_seed(&seed)
            .map_err(|e| KeyError::Store(StoreError::Unavailable(e)))?;
        Ok(Self {
            signing,
            checkpoints,
            audit_key,
            config,
            store,
            clock,
            upstream,
            keys,
            pepper,
            refresh_locks: RefreshLocks::default(),
            rate: Default::default(),
            quotas: Default::default(),
            login_failures: Default::default(),
            hot: Default::default(),
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

    /// [`Vault::audit`] for a change made in an HTTP request: with its request id and address.
    fn audit_in(&self, actor: &Actor, action: &str, ctx: &RequestContext) -> AuditRecord {
        AuditRecord {
            request_id: ctx.request_id.clone(),
            client_ip: ctx.client_ip.map(|ip| ip.to_string()),
            ..self.audit(actor, action)
        }
    }

    fn secret_hash(&self, secret: &str) -> String {
        secrets::hmac_b64(&self.pepper, secret.as_bytes())
    }
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

/// Names of users, connections and agents: short, plain, safe in URLs and logs.
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

/// `base` with `pairs` appended as a form-encoded query.
pub(super) fn url_with_query(base: &str, pairs: &[(&str, &str)]) -> String {
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

const SIGNING_CURRENT: &str = "signing_key_rs256";
const SIGNING_PREVIOUS: &str = "signing_key_rs256_previous";

fn server_secret_slot(name: &str) -> Slot<'_> {
    Slot {
        table: "server_secrets",
        field: "value",
        row: name,
    }
}

/// Latchkey's signing keys: `current` signs; after a rotation `previous` stays published in the
/// JWKS and accepted, so tokens signed just before the rotation keep verifying (overlap).
pub(super) struct SigningKeys {
    pub(super) current: SigningKey,
    pub(super) previous: Option<SigningKey>,
}

fn parse_signing_key(pem: &[u8]) -> Result<SigningKey, KeyError> {
    std::str::from_utf8(pem)
        .ok()
        .and_then(|pem| SigningKey::from_pem(pem, latchkey_crypto::Algorithm::RS256, None).ok())
        .ok_or(KeyError::Envelope(
            latchkey_crypto::envelope::EnvelopeError::Malformed,
        ))
}

impl SigningKeys {
    async fn load(keys: &KeyService, store: &dyn Store) -> Result<Self, KeyError> {
        let current = keys
            .server_secret(SIGNING_CURRENT, || {
                latchkey_crypto::keygen::generate(latchkey_crypto::Algorithm::RS256)
                    .private_pem
                    .as_bytes()
                    .to_vec()
            })
            .await?;
        let previous = match store.server_secret(SIGNING_PREVIOUS).await? {
            Some(blob) => Some(parse_signing_key(
                &keys
                    .open(server_secret_slot(SIGNING_PREVIOUS), &blob)
                    .await?,
            )?),
            None => None,
        };
        Ok(Self {
            current: parse_signing_key(&current)?,
            previous,
        })
    }

    /// The keys tokens are verified with.
    pub(super) fn public_keys(&self) -> Vec<PublicKey> {
        std::iter::once(self.current.public.clone())
            .chain(self.previous.as_ref().map(|p| p.public.clone()))
            .collect()
    }
}

impl Vault {
    pub(super) fn signing(&self) -> Arc<SigningKeys> {
        self.signing.read().expect("signing keys lock").clone()
    }

    /// Re-read the signing keys (another process may have rotated them).
    pub async fn reload_signing_keys(&self) -> Result<(), KeyError> {
        let fresh = SigningKeys::load(&self.keys, self.store.as_ref()).await?;
        *self.signing.write().expect("signing keys lock") = Arc::new(fresh);
        Ok(())
    }

    /// A new signing key signs from now on; the current one stays published and accepted until
    /// the next rotation. Returns the new key's `kid`.
    pub async fn rotate_signing_key(&self, actor: &Actor) -> Result<String, KeyError> {
        // The current key always exists once the vault is open (`SigningKeys::load` made it).
        let blob = self
            .store
            .server_secret(SIGNING_CURRENT)
            .await?
            .ok_or(KeyError::Store(StoreError::NotFound))?;
        let current = self
            .keys
            .open(server_secret_slot(SIGNING_CURRENT), &blob)
            .await?;
        let new = latchkey_crypto::keygen::generate(latchkey_crypto::Algorithm::RS256);
        let new_kid = parse_signing_key(new.private_pem.as_bytes())?.public.kid;
        let writes = [
            (
                SIGNING_PREVIOUS,
                self.keys
                    .seal(server_secret_slot(SIGNING_PREVIOUS), &current),
            ),
            (
                SIGNING_CURRENT,
                self.keys.seal(
                    server_secret_slot(SIGNING_CURRENT),
                    new.private_pem.as_bytes(),
                ),
            ),
        ];
        let audit = AuditRecord {
            reason: Some(format!("new signing key {new_kid}")),
            ..self.audit(actor, "key.rotate_signing")
        };
        self.store.put_server_secrets(&writes, &audit).await?;
        self.reload_signing_keys().await?;
        Ok(new_kid)
    }
}
