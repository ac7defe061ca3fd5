//! The registry: users, connections, connected accounts, agents, their keys and grants, and
//! the audit record. Sealed fields hold envelope ciphertexts (see `latchkey_crypto::envelope`),
//! never plaintext.

use crate::scope::Scopes;

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub username: String,
    /// Argon2id PHC string; `None` for a user who cannot log in with a password.
    pub password_hash: Option<String>,
    /// Sealed TOTP seed (RFC 6238), present from enrolment on.
    pub totp_seed: Option<Vec<u8>>,
    /// Enrolment confirmed with a valid code: sign-in then asks for one.
    pub totp_enabled: bool,
    /// What the user may do in the dashboard.
    pub role: Role,
    pub created_at: i64,
}

/// A user's role in the dashboard. An operator manages agents, connections and users; a user
/// sees only their own accounts, approvals and activity. (The command line and the admin API
/// are operator tools whatever the role: they act as `operator`, not as a user.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    User,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }
}

/// A browser session, and how and when its user authenticated (what step-up will check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    /// `pwd`, or `pwd otp` after a TOTP code.
    pub auth_methods: String,
    pub authenticated_at: i64,
    /// The password was right but the TOTP code is still owed: not signed in yet.
    pub pending_mfa: bool,
    /// When the user last gave a TOTP code in this session (sign-in or step-up).
    pub mfa_at: Option<i64>,
}

/// An upstream provider configuration ("github", "demo-git", …).
#[derive(Clone, Debug)]
pub struct Connection {
    pub id: String,
    pub name: String,
    /// Catalog entry: `demo` or `oauth2` (generic endpoints below).
    pub provider: String,
    pub client_id: String,
    /// Sealed upstream client secret.
    pub client_secret: Option<Vec<u8>>,
    pub authorize_url: String,
    pub token_url: String,
    pub revoke_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub api_base_url: Option<String>,
    /// The provider's issuer (OIDC discovery), checked against the `iss` parameter of its
    /// authorization responses (RFC 9207, mix-up defence).
    pub issuer: Option<String>,
    /// Scopes requested when a user connects.
    pub scopes: Scopes,
    /// Refresh idle accounts at least this often (seconds), for providers that revoke refresh
    /// tokens left unused.
    pub keep_alive_secs: Option<i64>,
    pub created_at: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountStatus {
    Active,
    /// The provider refused the refresh token; the user must reconnect.
    NeedsReauth,
    Revoked,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::NeedsReauth => "needs_reauth",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "needs_reauth" => Self::NeedsReauth,
            _ => Self::Revoked,
        }
    }
}

/// A user's account at a provider, with its sealed tokens.
#[derive(Clone, Debug)]
pub struct ConnectedAccount {
    pub id: String,
    pub user_id: String,
    pub connection_id: String,
    /// The account's id at the provider (`login_hint` matches it).
    pub upstream_account_id: Option<String>,
    /// Scopes the user consented to at the provider.
    pub scopes: Scopes,
    pub access_token: Option<Vec<u8>>,
    pub access_expires_at: Option<i64>,
    pub refresh_token: Option<Vec<u8>>,
    pub status: AccountStatus,
    /// Why the account is not active (shown to operators and, for `needs_reauth`, to agents).
    pub status_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_used_at: Option<i64>,
    pub last_refreshed_at: Option<i64>,
    /// Bumped on every token change; a conditional update on it fences concurrent writers.
    pub token_version: i64,
    /// Set just before an upstream refresh, cleared when its outcome is committed: still set
    /// after a restart, it means the provider's answer may have been lost.
    pub refresh_started_at: Option<i64>,
}

/// An upstream access token narrowed to a scope set, cached per (account, scopes).
#[derive(Clone, Debug)]
pub struct ScopedToken {
    /// `{account id} {space-delimited scopes}`; also the row in the sealing AAD.
    pub id: String,
    pub account_id: String,
    pub scopes: Scopes,
    /// Sealed access token.
    pub access_token: Vec<u8>,
    pub expires_at: Option<i64>,
}

/// A registered OAuth client: an agent (keys and/or a secret, for the token exchange), an app
/// whose users sign in through `/authorize` (redirect URIs), or both.
#[derive(Clone, Debug, Default)]
pub struct Agent {
    pub id: String,
    pub name: String,
    /// HMAC-SHA-256 of the client secret under the server pepper; `None` if key-only.
    pub secret_hash: Option<String>,
    pub disabled: bool,
    /// Exact redirect URIs (apps only).
    pub redirect_uris: Vec<String>,
    /// A public app (no secret; PKCE is its only proof).
    pub public_client: bool,
    /// Rotate this app's refresh tokens on use (off for apps that use the vault, as Auth0 requires).
    pub rotate_refresh_tokens: bool,
    /// The API identifier this client serves, for the access-token exchange.
    pub resource_server: Option<String>,
    pub created_at: i64,
}

/// An authorization code (stored as a hash), bound to everything it was issued for.
#[derive(Clone, Debug)]
pub struct AuthCode {
    pub hash: String,
    pub client_id: String,
    pub user_id: String,
    pub redirect_uri: String,
    pub scope: Scopes,
    pub nonce: Option<String>,
    pub code_challenge: String,
    pub audience: String,
    pub auth_time: i64,
    /// `pwd` or `pwd otp`.
    pub amr: String,
    pub expires_at: i64,
}

/// What one sign-in granted an app: its refresh tokens and access tokens derive from it.
#[derive(Clone, Debug)]
pub struct TokenFamily {
    pub id: String,
    pub client_id: String,
    pub user_id: String,
    pub scope: Scopes,
    pub auth_time: i64,
    pub amr: String,
    pub revoked: bool,
    pub created_at: i64,
}

#[derive(Clone, Debug)]
pub struct AgentKey {
    pub agent_id: String,
    pub kid: String,
    pub alg: String,
    /// Normalised public JWK.
    pub jwk: String,
    pub created_at: i64,
}

/// What an agent may obtain for a connection.
#[derive(Clone, Debug)]
pub struct Grant {
    pub agent_id: String,
    pub connection_id: String,
    pub scopes: Scopes,
    /// CIDR blocks or addresses; empty means any address.
    pub ip_allowlist: Vec<String>,
    /// Risk overrides, allowed hours, lifetime cap, quotas (stored as JSON with the grant).
    pub policy: crate::policy::GrantPolicy,
    pub created_at: i64,
}

/// One audit entry. Never holds a secret: tokens appear only as hashes.
#[derive(Clone, Debug, Default)]
pub struct AuditRecord {
    pub at: i64,
    /// `agent`, `user` or `operator`.
    pub actor_type: String,
    pub actor_id: String,
    /// How the actor authenticated: `private_key_jwt`, `client_secret_basic`, `cli`, …
    pub auth_method: String,
    pub subject_user: Option<String>,
    /// e.g. `token.release`, `account.connect`, `account.revoke`, `agent.create`.
    pub action: String,
    pub connection: Option<String>,
    pub account_id: Option<String>,
    /// The agent an administrative change is about (the actor, for an agent's own requests).
    pub agent_id: Option<String>,
    pub scopes: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    pub reason: Option<String>,
    pub audit_context: Option<String>,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    /// A webhook to deliver, enqueued in the same transaction as the entry.
    pub notify: Option<Notification>,
}

/// A webhook event: its type and JSON body (never a secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub event: String,
    pub body: String,
}

/// A webhook delivery waiting in the outbox.
#[derive(Clone, Debug)]
pub struct OutboxItem {
    pub id: String,
    pub event: String,
    pub body: String,
    pub attempts: i64,
}

/// A bearer token for the admin API (its secret stored only as an HMAC).
#[derive(Clone, Debug)]
pub struct OperatorToken {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A stored audit entry.
#[derive(Clone, Debug)]
pub struct AuditEntry {
    pub seq: i64,
    pub record: AuditRecord,
    /// The chain MAC (hex); `None` only for entries written before the chain key existed.
    pub mac: Option<String>,
}

/// A signed statement that the audit chain held entry `seq` with this MAC at time `at`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditCheckpoint {
    pub seq: i64,
    pub mac: String,
    pub at: i64,
    /// The Ed25519 public key (base64url) that signed it.
    pub public_key: String,
    pub signature: String,
}

/// What an approval was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalKind {
    /// A client's CIBA request (`/bc-authorize`): Latchkey's own tokens once approved.
    Ciba,
    /// A token exchange the policy holds for the user: the upstream token once approved.
    Exchange,
}

impl ApprovalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ciba => "ciba",
            Self::Exchange => "exchange",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "exchange" {
            Self::Exchange
        } else {
            Self::Ciba
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    /// Used up: a CIBA request whose tokens were issued, or a single-use approval consumed.
    Redeemed,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Redeemed => "redeemed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "denied" => Self::Denied,
            "expired" => Self::Expired,
            "redeemed" => Self::Redeemed,
            _ => return None,
        })
    }
}

/// A request waiting for (or given) the user's decision. Its `auth_req_id` is never stored:
/// only its SHA-256 (`req_hash`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    /// `apr_…`: names the approval on the page, in the CLI and in webhooks (not a secret).
    pub id: String,
    pub req_hash: String,
    pub kind: ApprovalKind,
    /// The client that asked; only it may redeem the `auth_req_id`.
    pub client_id: String,
    pub user_id: String,
    /// The connection (name) of an exchange.
    pub connection: Option<String>,
    /// Upstream scopes of an exchange, or the CIBA `scope`.
    pub scopes: Scopes,
    /// The CIBA `audience`, when one was named.
    pub audience: Option<String>,
    /// RFC 9396 `authorization_details`, verbatim as sent.
    pub authorization_details: Option<String>,
    pub binding_message: Option<String>,
    /// A privileged worker's stated reason.
    pub audit_context: Option<String>,
    /// The exchange's `login_hint` (which of the user's accounts).
    pub login_hint: Option<String>,
    /// `low`, `medium`, `high` or `critical`.
    pub risk: String,
    /// Approving needs the user's TOTP code within the step-up window.
    pub step_up: bool,
    /// Consumed by its first redemption.
    pub single_use: bool,
    /// Digest of exactly what was asked: an approval covers that request and nothing more.
    pub request_hash: String,
    pub status: ApprovalStatus,
    pub created_at: i64,
    /// Pending: the decision deadline; approved: until when it may be redeemed.
    pub expires_at: i64,
    /// Seconds the client must leave between polls.
    pub interval: i64,
    pub last_polled_at: Option<i64>,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
    /// The approver gave a TOTP code for it (or had, within the step-up window).
    pub stepped_up: bool,
    /// When the `auth_req_id` was redeemed at the token endpoint.
    pub redeemed_at: Option<i64>,
    /// Why it was decided so (a denial's reason, an expiry).
    pub reason: Option<String>,
}
