//! Persistence, as the domain needs it. Each method that must be atomic is one call, so a
//! backend implements it as one transaction (SQLite `BEGIN IMMEDIATE`, PostgreSQL row locks).

use async_trait::async_trait;

use crate::model::*;
use crate::scope::Scopes;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("already exists: {0}")]
    Conflict(String),
    /// The database failed; detail for the log only.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A data key wrapped by the KEK.
#[derive(Clone, Debug)]
pub struct DataKeyRow {
    pub version: u32,
    pub kek_id: String,
    pub wrapped: Vec<u8>,
    pub created_at: i64,
}

/// A sealed value and where it lives, for re-encryption during key rotation.
#[derive(Clone, Debug)]
pub struct SealedField {
    pub table: &'static str,
    pub field: &'static str,
    pub row: String,
    pub blob: Vec<u8>,
}

/// A single-use identifier (`jti`) being consumed.
#[derive(Clone, Debug)]
pub struct JtiUse {
    /// Namespaced key, e.g. `assertion:agt_x:abc`.
    pub key: String,
    pub expires_at: i64,
}

/// One slot of a quota window, counted by a release: the counter `key` (its subject and
/// window, e.g. `agent:agt_x:con_y:minute:29000000`) admits at most `limit` releases, and
/// may be forgotten once `window_end` (seconds since the epoch) has passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaUse {
    pub key: String,
    pub limit: u32,
    pub window_end: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// `jtis[index]` was already used.
    #[error("jti already used")]
    Replay(usize),
    /// `quotas[index]` already counted its limit in this window (on any node).
    #[error("quota reached")]
    QuotaReached(usize),
    /// The account stopped being active (revoked, needs reauth) before the release committed.
    #[error("account is no longer active")]
    AccountInactive,
    /// The configuration the release was decided on changed before it committed: the
    /// [`Store::config_revision`] is now this value. Nothing was written.
    #[error("the configuration changed (revision {0})")]
    Stale(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What redeeming an authorization code found.
#[derive(Debug)]
pub enum CodeRedemption {
    Fresh(Box<AuthCode>),
    /// Used before: the family issued from it (if any) must be revoked.
    Reused {
        family_id: Option<String>,
    },
    Unknown,
}

/// A refresh token's row and its family.
#[derive(Debug, Clone)]
pub struct RefreshTokenRecord {
    /// `active` or `rotated`.
    pub state: String,
    pub family: TokenFamily,
}

/// What the background refresher looks for (all times in Unix seconds).
#[derive(Clone, Debug)]
pub struct RefreshQuery {
    pub now: i64,
    /// Tokens expiring before this are due …
    pub expiring_before: i64,
    /// … if the account was used since this.
    pub used_since: i64,
    /// Refreshes started before this and never committed were interrupted.
    pub interrupted_before: i64,
    pub claim_until: i64,
    pub limit: i64,
}

/// Why an account is due for a background refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshWhy {
    /// Used recently and its token (the account's own, or a narrowed one) expires soon.
    Expiring,
    /// Idle longer than its connection's keep-alive interval: refresh so the provider does
    /// not revoke the refresh token for disuse.
    KeepAlive,
    /// A refresh started and its outcome was never committed (a crash, or an answer lost).
    Interrupted,
}

/// An account claimed for a background refresh.
#[derive(Clone, Debug)]
pub struct RefreshWork {
    pub account: ConnectedAccount,
    /// For [`RefreshWhy::Expiring`]: the narrowed token's scope set, `None` for the own token.
    pub scope: Option<Scopes>,
    pub why: RefreshWhy,
}

/// A read of the audit trail ([`Store::query_audit`]): every filter that is set must match
/// (AND); values are compared with what is stored, exactly. Times are Unix seconds.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// `subject_user`.
    pub subject_user: Option<String>,
    /// The agent as the actor (`actor_type = 'agent'` and `actor_id`) or as the target of an
    /// administrative change (`agent_id`).
    pub agent: Option<String>,
    /// The connection's name.
    pub connection: Option<String>,
    /// The exact action, e.g. `token.release`.
    pub action: Option<String>,
    /// Actions starting with this, e.g. `account.` (matched literally, no wildcards).
    pub action_prefix: Option<String>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// Entries at or after this time …
    pub since: Option<i64>,
    /// … and strictly before this one.
    pub until: Option<i64>,
    /// Only entries with a `seq` below this (the previous page's last entry).
    pub before_seq: Option<i64>,
    pub limit: i64,
}

/// One agent's count of one audited action on one UTC day ([`Store::audit_daily_counts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DailyCount {
    /// The day's start, 00:00 UTC, in Unix seconds.
    pub day: i64,
    pub agent_id: String,
    pub count: i64,
}

impl AuditQuery {
    /// An action filter as people type it: `token.release` (exact) or `account.*` (every
    /// action starting with `account.`); `*` anywhere else is refused (`None`). Returns
    /// (`action`, `action_prefix`).
    pub fn action_filter(text: &str) -> Option<(Option<String>, Option<String>)> {
        if !text.contains('*') {
            return Some((Some(text.to_owned()), None));
        }
        match text.strip_suffix(".*") {
            Some(stem) if !stem.is_empty() && !stem.contains('*') => {
                Some((None, Some(format!("{stem}."))))
            }
            _ => None,
        }
    }
}

/// A pending connect request (authorization code + PKCE towards the provider).
#[derive(Clone, Debug)]
pub struct ConnectFlow {
    pub state_hash: String,
    pub user_id: String,
    pub connection_id: String,
    /// Sealed PKCE verifier.
    pub code_verifier: Vec<u8>,
    pub redirect_uri: String,
    /// The scopes asked of the provider.
    pub scopes: Scopes,
    /// `""`, `return:{path}` or `app:{account connect id}` (see the schema).
    pub then_to: String,
    pub expires_at: i64,
}

/// A My Account API connect transaction.
#[derive(Clone, Debug)]
pub struct AccountConnect {
    /// SHA-256 of the `auth_session` given to the app.
    pub id: String,
    pub ticket_hash: Option<String>,
    pub user_id: String,
    pub client_id: String,
    pub connection_id: String,
    pub redirect_uri: String,
    pub state: Option<String>,
    pub code_challenge: Option<String>,
    pub scopes: Scopes,
    /// Authorization parameters to forward to the provider.
    pub params: Vec<(String, String)>,
    pub account_id: Option<String>,
    pub completed: bool,
    pub expires_at: i64,
}

/// Limits on pending approvals (anti-fatigue), checked in the transaction that adds one.
#[derive(Clone, Copy, Debug)]
pub struct ApprovalCaps {
    pub per_user: i64,
    pub per_client: i64,
}

/// What [`Store::create_approval`] did.
#[derive(Debug)]
pub enum ApprovalCreated {
    Created,
    /// An identical request is already pending: it is the one the user sees (collapse).
    Existing(Box<Approval>),
    /// A cap is reached (`"user"` or `"agent"`); the earliest pending one expires at this time.
    TooMany {
        per: &'static str,
        next_expiry: i64,
    },
}

/// A change of an approval's state, applied only if it is still in `from` (and, when `live`,
/// unexpired at `at`), with its audit entry in the same transaction.
#[derive(Clone, Debug)]
pub struct ApprovalUpdate {
    pub id: String,
    pub from: ApprovalStatus,
    pub to: ApprovalStatus,
    pub at: i64,
    pub live: bool,
    /// Set on a decision: who decided (`user:usr_…`, `operator:local`, …), at `at`.
    pub decided_by: Option<String>,
    pub stepped_up: bool,
    /// A new deadline (an approval gets its redemption window).
    pub expires_at: Option<i64>,
    /// The `auth_req_id` is redeemed now (only once).
    pub redeem: bool,
    pub reason: Option<String>,
}

/// Which approvals to list, newest first.
#[derive(Clone, Debug, Default)]
pub struct ApprovalFilter {
    pub user_id: Option<String>,
    pub status: Option<ApprovalStatus>,
    pub limit: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Keys and server secrets.
    async fn data_keys(&self) -> StoreResult<Vec<DataKeyRow>>;
    async fn insert_data_key(&self, row: &DataKeyRow, audit: &AuditRecord) -> StoreResult<()>;
    /// Replace the wrapping of every data key at once (KEK rotation).
    async fn rewrap_data_keys(&self, rows: &[DataKeyRow], audit: &AuditRecord) -> StoreResult<()>;
    async fn server_secret(&self, name: &str) -> StoreResult<Option<Vec<u8>>>;
    /// Insert unless present; returns the stored value either way.
    async fn init_server_secret(&self, name: &str, sealed: &[u8]) -> StoreResult<Vec<u8>>;
    /// Write several server secrets at once (signing-key rotation), with the audit entry.
    async fn put_server_secrets(
        &self,
        secrets: &[(&str, Vec<u8>)],
        audit: &AuditRecord,
    ) -> StoreResult<()>;
    async fn sealed_fields(&self) -> StoreResult<Vec<SealedField>>;
    /// Replace blobs only where they still equal the ones read (concurrent writers win).
    async fn reseal_fields(&self, old_and_new: &[(SealedField, Vec<u8>)]) -> StoreResult<usize>;

    // Users.
    async fn insert_user(&self, user: &User, audit: &AuditRecord) -> StoreResult<()>;
    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>>;
    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>>;
    async fn set_password(&self, user_id: &str, hash: &str, audit: &AuditRecord)
    -> StoreResult<()>;
    /// Set (or clear) the sealed TOTP seed and whether it is enabled.
    async fn set_totp(
        &self,
        user_id: &str,
        seed: Option<&[u8]>,
        enabled: bool,
        audit: &AuditRecord,
    ) -> StoreResult<()>;
    /// Record `step` as used iff it is later than the last used one (atomic replay guard).
    async fn consume_totp_step(&self, user_id: &str, step: i64) -> StoreResult<bool>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    /// Set the user's role, with its audit entry in the same transaction. False (and nothing
    /// written) if there is no such user.
    async fn set_user_role(
        &self,
        user_id: &str,
        role: Role,
        audit: &AuditRecord,
    ) -> StoreResult<bool>;

    // Connections.
    async fn insert_connection(&self, c: &Connection, audit: &AuditRecord) -> StoreResult<()>;
    async fn connection_by_name(&self, name: &str) -> StoreResult<Option<Connection>>;
    async fn connection_by_id(&self, id: &str) -> StoreResult<Option<Connection>>;
    async fn list_connections(&self) -> StoreResult<Vec<Connection>>;

    // Connected accounts.
    /// Insert, or replace the tokens/scopes/status of the account with the same
    /// (user, connection, upstream account); returns the stored account id.
    async fn upsert_account(
        &self,
        a: &ConnectedAccount,
        audit: &AuditRecord,
    ) -> StoreResult<String>;
    async fn account_by_id(&self, id: &str) -> StoreResult<Option<ConnectedAccount>>;
    /// The user's accounts for a connection, newest first.
    async fn accounts_for(
        &self,
        user_id: &str,
        connection_id: &str,
    ) -> StoreResult<Vec<ConnectedAccount>>;
    async fn list_accounts(&self, user_id: Option<&str>) -> StoreResult<Vec<ConnectedAccount>>;
    /// Store refreshed tokens iff `token_version` still equals `expected_version`.
    async fn update_account_tokens(
        &self,
        a: &ConnectedAccount,
        expected_version: i64,
    ) -> StoreResult<bool>;
    /// Set a status iff `token_version` still equals `expected_version`.
    async fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
        expected_version: i64,
        audit: &AuditRecord,
    ) -> StoreResult<bool>;
    async fn scoped_token(&self, id: &str) -> StoreResult<Option<ScopedToken>>;
    /// Claim for the background refresher, until `q.claim_until`, at most `q.limit` accounts
    /// that no other pass has claimed (so that several nodes never work on the same account):
    /// see [`RefreshWhy`] for what is due. One entry per account.
    async fn claim_refresh_work(&self, q: &RefreshQuery) -> StoreResult<Vec<RefreshWork>>;
    /// Wait until no other process is refreshing this account at the provider, and keep it so
    /// until the lease is dropped: one upstream refresh per account at a time across every
    /// node (invariant 4; within a process the vault's own per-account lock does it). A holder
    /// that dies gives it up with its connection. The default, for a store that one process
    /// serves (SQLite), holds nothing.
    async fn refresh_lease(&self, _account_id: &str) -> StoreResult<RefreshLease> {
        Ok(RefreshLease::none())
    }
    /// Record that a refresh of the account's current token starts now (iff its
    /// `token_version` is still `expected_version`); the commit of the outcome clears it.
    async fn mark_refresh_started(
        &self,
        id: &str,
        expected_version: i64,
        at: i64,
    ) -> StoreResult<bool>;
    /// In one transaction, iff the account's `token_version` still equals `expected_version`:
    /// store the account's new refresh token and version, and upsert the narrowed token.
    async fn store_scoped_token(
        &self,
        account: &ConnectedAccount,
        expected_version: i64,
        scoped: &ScopedToken,
    ) -> StoreResult<bool>;
    /// Mark revoked and erase its tokens (narrowed ones too). Returns false if it did not exist.
    async fn revoke_account(&self, id: &str, audit: &AuditRecord) -> StoreResult<bool>;

    // Agents.
    async fn insert_agent(
        &self,
        agent: &Agent,
        keys: &[AgentKey],
        audit: &AuditRecord,
    ) -> StoreResult<()>;
    async fn agent_by_id(&self, id: &str) -> StoreResult<Option<Agent>>;
    async fn agent_by_secret_hash(&self, hash: &str) -> StoreResult<Option<Agent>>;
    async fn agent_keys(&self, agent_id: &str) -> StoreResult<Vec<AgentKey>>;
    async fn list_agents(&self) -> StoreResult<Vec<Agent>>;
    async fn upsert_grant(&self, grant: &Grant, audit: &AuditRecord) -> StoreResult<()>;
    async fn grant_for(&self, agent_id: &str, connection_id: &str) -> StoreResult<Option<Grant>>;
    /// Every grant, ordered by agent and connection (admin API listing).
    async fn list_grants(&self) -> StoreResult<Vec<Grant>>;
    /// Disable (or re-enable) a client. Returns false if it does not exist.
    async fn set_agent_disabled(
        &self,
        id: &str,
        disabled: bool,
        audit: &AuditRecord,
    ) -> StoreResult<bool>;
    /// Remove a grant. Returns false if there was none.
    async fn delete_grant(
        &self,
        agent_id: &str,
        connection_id: &str,
        audit: &AuditRecord,
    ) -> StoreResult<bool>;
    /// Delete a user and everything that belongs to them (accounts and their tokens, sessions,
    /// sign-ins, pending flows) in one transaction. The audit trail keeps its entries.
    async fn delete_user(&self, user_id: &str, audit: &AuditRecord) -> StoreResult<bool>;

    /// A counter that moves forward with every change to what a release is decided on:
    /// agents, their keys, grants, connections, and users being added or removed. The database
    /// moves it (triggers), so a change made by any process or node counts.
    async fn config_revision(&self) -> StoreResult<i64>;

    /// The release of a token, in one transaction: check that the configuration is still at
    /// `revision` when one is given (else [`ReleaseError::Stale`]), consume every `jti` (a
    /// unique insert; a duplicate is [`ReleaseError::Replay`]), check the account (when the
    /// release has one) is still active and stamp its last use, count one use of every quota
    /// slot (one already at its limit is [`ReleaseError::QuotaReached`]: the database holds the
    /// count, so every node and restart sees the same), and append the audit record. Nothing
    /// is written unless all of it is.
    async fn commit_release(
        &self,
        revision: Option<i64>,
        jtis: &[JtiUse],
        quotas: &[QuotaUse],
        account_id: Option<&str>,
        audit: &AuditRecord,
    ) -> Result<(), ReleaseError>;
    /// Delete expired `jti`s, sessions and connect flows, and the counts of quota windows that
    /// have ended.
    async fn purge_expired_jtis(&self, now: i64) -> StoreResult<u64>;

    // Browser sessions and connect flows (opaque values stored only as hashes).
    async fn insert_session(
        &self,
        hash: &str,
        session: &Session,
        expires_at: i64,
    ) -> StoreResult<()>;
    /// The unexpired session with this hash.
    async fn session(&self, hash: &str, now: i64) -> StoreResult<Option<Session>>;
    async fn delete_session(&self, hash: &str) -> StoreResult<()>;
    async fn insert_connect_flow(&self, flow: &ConnectFlow) -> StoreResult<()>;
    /// Remove and return the flow (single use); `None` if unknown or expired.
    async fn take_connect_flow(
        &self,
        state_hash: &str,
        now: i64,
    ) -> StoreResult<Option<ConnectFlow>>;

    // Apps: authorization codes and token families.
    async fn insert_auth_code(&self, code: &AuthCode) -> StoreResult<()>;
    /// Mark the code used, atomically; tells a first use from a replay.
    async fn redeem_auth_code(&self, hash: &str) -> StoreResult<CodeRedemption>;
    /// In one transaction: the family, its first refresh token (if any), the code's link to the
    /// family, and the audit entry.
    async fn insert_token_family(
        &self,
        family: &TokenFamily,
        code_hash: &str,
        refresh_hash: Option<&str>,
        audit: &AuditRecord,
    ) -> StoreResult<()>;
    async fn refresh_token(&self, hash: &str) -> StoreResult<Option<RefreshTokenRecord>>;
    /// Replace an active refresh token by a new one of the same family (false if it was no
    /// longer active: a concurrent use won).
    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new_hash: &str,
        now: i64,
    ) -> StoreResult<bool>;
    async fn token_family(&self, id: &str) -> StoreResult<Option<TokenFamily>>;
    /// Revoke a family and everything derived from it.
    async fn revoke_token_family(&self, id: &str, audit: &AuditRecord) -> StoreResult<()>;

    // My Account API connect transactions.
    async fn insert_account_connect(&self, c: &AccountConnect) -> StoreResult<()>;
    /// Use up a browser ticket (single use, unexpired).
    async fn take_account_connect_ticket(
        &self,
        ticket_hash: &str,
        now: i64,
    ) -> StoreResult<Option<AccountConnect>>;
    /// The provider's answer arrived: the connect code the app will present, and the account.
    async fn set_account_connect_code(
        &self,
        id: &str,
        code_hash: &str,
        account_id: &str,
    ) -> StoreResult<()>;
    async fn account_connect(&self, id: &str) -> StoreResult<Option<AccountConnect>>;
    /// Mark completed iff `code_hash` is its code and it was not completed before.
    async fn complete_account_connect(&self, id: &str, code_hash: &str) -> StoreResult<bool>;

    // Audit. Every audited write computes the entry's chain MAC inside its transaction.
    /// The chain key, installed by the vault once unsealed. Until then, entries can only be
    /// written while the chain is empty (the first start's key creation), without a MAC;
    /// [`Store::chain_unchained_audit`] then seals them.
    fn install_audit_key(&self, key: std::sync::Arc<crate::audit::AuditKey>);
    /// From now on, every entry also enqueues an `audit.entry` webhook (the entry as
    /// [`crate::audit::entry_view`] shows it) in its transaction.
    fn enable_audit_webhook(&self);
    /// If no entry has a MAC yet and there is no checkpoint, give every entry one, in order
    /// (the first start, or a database from before the chain); the number sealed.
    async fn chain_unchained_audit(&self) -> StoreResult<usize>;
    /// Entries with `seq > after`, in sequence order, at most `limit`.
    async fn audit_range(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEntry>>;
    async fn insert_audit_checkpoint(&self, cp: &AuditCheckpoint) -> StoreResult<()>;
    /// Stored checkpoints, oldest first.
    async fn audit_checkpoints(&self) -> StoreResult<Vec<AuditCheckpoint>>;
    /// The last sequence number of entries written before `at`.
    async fn audit_seq_before(&self, at: i64) -> StoreResult<Option<i64>>;
    /// In one transaction: delete the entries up to `through` and append `audit` (the record
    /// of the pruning). The number deleted.
    async fn prune_audit(&self, through: i64, audit: &AuditRecord) -> StoreResult<u64>;
    async fn append_audit(&self, audit: &AuditRecord) -> StoreResult<()>;
    async fn list_audit(&self, limit: i64) -> StoreResult<Vec<AuditEntry>>;
    /// The entries matching every filter of `q`, newest (highest `seq`) first, at most
    /// `q.limit`; with `q.before_seq`, only entries strictly older than it (cursor paging that
    /// entries appended meanwhile cannot disturb).
    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditEntry>>;
    /// How many `action` entries each agent had allowed per UTC day: entries at or after
    /// `since` with `decision = 'allow'` and an agent as the actor (`actor_type = 'agent'`,
    /// counted by `actor_id`), only the `subject_user`'s when one is given. Ordered by day,
    /// then agent; days and agents without an entry are absent.
    async fn audit_daily_counts(
        &self,
        action: &str,
        subject_user: Option<&str>,
        since: i64,
    ) -> StoreResult<Vec<DailyCount>>;

    /// Claim the periodic job `name` for the `period` seconds from `now`: true for one caller
    /// (process or node) per period, false for every other until the period has passed.
    async fn claim_job(&self, name: &str, now: i64, period: i64) -> StoreResult<bool>;

    // Webhook outbox (entries are enqueued by an audit record's `notify`).
    /// Deliveries due at `now` (neither delivered nor given up), oldest first, at most
    /// `limit`, each claimed until `claim_until` so that no other sender takes it meanwhile.
    async fn claim_webhooks(
        &self,
        now: i64,
        claim_until: i64,
        limit: i64,
    ) -> StoreResult<Vec<OutboxItem>>;
    async fn webhook_delivered(&self, id: &str, at: i64) -> StoreResult<()>;
    /// A failed attempt: try again at `retry_at`, or give up when `None`.
    async fn webhook_failed(
        &self,
        id: &str,
        at: i64,
        retry_at: Option<i64>,
        error: &str,
    ) -> StoreResult<()>;

    // Operator tokens (admin API).
    async fn insert_operator_token(
        &self,
        token: &OperatorToken,
        secret_hash: &str,
        audit: &AuditRecord,
    ) -> StoreResult<()>;
    /// The token with this secret hash, if not revoked; records its use at `now`.
    async fn use_operator_token(&self, hash: &str, now: i64) -> StoreResult<Option<OperatorToken>>;
    async fn list_operator_tokens(&self) -> StoreResult<Vec<OperatorToken>>;
    /// Revoke by name; false if there is no such unrevoked token.
    async fn revoke_operator_token(&self, name: &str, audit: &AuditRecord) -> StoreResult<bool>;

    /// Cheap liveness check of the database.
    async fn ping(&self) -> StoreResult<()>;

    // Approvals: CIBA requests and exchanges held for the user's decision.
    /// In one transaction: unless an identical request (same `request_hash`, client and user)
    /// is pending and unexpired (returned instead), or a cap on pending requests of the user or
    /// the client is reached, insert `a` with its audit entry.
    async fn create_approval(
        &self,
        a: &Approval,
        caps: ApprovalCaps,
        audit: &AuditRecord,
    ) -> StoreResult<ApprovalCreated>;
    async fn approval(&self, id: &str) -> StoreResult<Option<Approval>>;
    /// By the SHA-256 of its `auth_req_id`.
    async fn approval_by_req_hash(&self, hash: &str) -> StoreResult<Option<Approval>>;
    /// The newest approved, unexpired approval of exactly this request.
    async fn usable_approval(
        &self,
        request_hash: &str,
        client_id: &str,
        user_id: &str,
        now: i64,
    ) -> StoreResult<Option<Approval>>;
    async fn list_approvals(&self, f: &ApprovalFilter) -> StoreResult<Vec<Approval>>;
    /// Apply `u` (see [`ApprovalUpdate`]) and append `audit`, in one transaction; false (and
    /// nothing written) if the approval was no longer in the expected state.
    async fn update_approval(&self, u: &ApprovalUpdate, audit: &AuditRecord) -> StoreResult<bool>;
    /// A poll of a pending request: when, and the interval from now on (raised by `slow_down`).
    async fn record_approval_poll(&self, id: &str, at: i64, interval: i64) -> StoreResult<()>;
    /// A CIBA request's tokens are issued, in one transaction: approved → redeemed (iff still
    /// approved and unexpired at `at`), the token family and its refresh token, the audit
    /// entries. False (nothing written) if another redemption won.
    async fn redeem_ciba_approval(
        &self,
        id: &str,
        at: i64,
        family: &TokenFamily,
        refresh_hash: Option<&str>,
        audits: &[AuditRecord],
    ) -> StoreResult<bool>;
    /// Pending or approved approvals whose deadline has passed, oldest first.
    async fn due_approvals(&self, now: i64, limit: i64) -> StoreResult<Vec<Approval>>;
    /// The session's user gave a TOTP code at `at` (step-up).
    async fn record_session_mfa(&self, hash: &str, at: i64) -> StoreResult<()>;
}

/// See [`Store::refresh_lease`]: whatever the store holds for it, released when dropped.
pub struct RefreshLease(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl RefreshLease {
    /// Nothing to hold.
    pub fn none() -> Self {
        Self(None)
    }

    /// Hold `guard` until the lease is dropped.
    pub fn held(guard: Box<dyn Send + Sync>) -> Self {
        Self(Some(guard))
    }
}
