//! The PostgreSQL store: several Latchkey nodes sharing one database.
//!
//! Every method behaves as its SQLite counterpart does (the conformance suite runs against
//! both). SQLite gets its guarantees from having one writer at a time (`BEGIN IMMEDIATE`, the
//! release writer); here any number of processes write at once, each transaction at `READ
//! COMMITTED`, and the guarantees come from the database itself:
//!
//! - **Conditional updates** (`… WHERE token_version = $n`, `WHERE state = 'active'`,
//!   `WHERE NOT used`, …): a second writer of the same row waits for the first to commit, then
//!   re-evaluates its `WHERE` against the committed row and finds nothing to change. Exactly one
//!   of any number of racers wins, on whichever node.
//! - **Unique inserts**: a `jti` is a primary key; two nodes inserting it at once both wait on
//!   the index entry and only one insert survives.
//! - **Advisory transaction locks** where SQLite relied on its single writer for something that
//!   is not one row (all taken with `pg_advisory_xact_lock*`, so a crashed node's locks go with
//!   its connection; the keys are in [`locks`]):
//!   - the audit chain: each entry's `seq` and MAC follow from the last entry, so appending
//!     takes the chain lock, reads the last entry, inserts, and commits; entries from every
//!     node form one gap-free chain. It is taken last in every transaction, right before the
//!     entry is written, so it is held only for the append and the commit;
//!   - the configuration revision: the triggers that move it (`v1_schema.sql`) take the
//!     configuration lock exclusively; a release holds it shared from its revision check to its
//!     commit (`release.rs`);
//!   - an account's status: revoking, re-connecting, marking for re-authentication and deleting
//!     the user take the account's lock exclusively before touching its row; a release holds it
//!     shared from its check that the account is active to its commit. So once a revocation
//!     commits, no release of that account commits after it, on any node;
//!   - the background refresher's claim pass and the approval caps (per user, per client):
//!     each is a read followed by writes that must see every earlier pass or request.
//!
//!   Advisory locks queue fairly, so a stream of releases cannot starve a revocation (shared
//!   row locks, `FOR SHARE`, could).
//! - **`FOR UPDATE SKIP LOCKED`** for webhook deliveries: senders on several nodes take
//!   disjoint batches without waiting for each other.
//!
//! Advisory locks are always taken in one order (accounts, then the configuration, then the
//! audit chain, last), and the few waits for a row are placed so that no cycle of waits forms
//! (see `release.rs` and `claim_refresh_work`). Should one ever form, PostgreSQL ends one of
//! its transactions and that caller gets `Unavailable`: an error, never a wrong result.
//!
//! Migrations follow SQLite's rules: a database whose schema is newer than this build, or whose
//! history has gaps, is refused. Nodes starting together migrate one at a time.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use latchkey_core::audit::AuditKey;
use latchkey_core::model::*;
use latchkey_core::scope::Scopes;
use latchkey_core::store::*;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use crate::shared::{
    AuditSettings, AuditSink, SEALED_COLUMNS, audit_entry_event, audit_link, conflict, unavailable,
};

mod release;

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("v1_schema.sql")),
    (2, include_str!("v2_cluster.sql")),
];

/// Connections per node unless configured (`database_pool_size`). Every request holds one only
/// for its statements, so a few serve many.
pub const DEFAULT_POOL_SIZE: u32 = 10;
/// No statement (lock waits included) runs longer: a stuck one fails instead of holding locks.
const STATEMENT_TIMEOUT: &str = "30s";
/// A transaction left open by a stalled node is ended, releasing its locks.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "60s";

/// Advisory lock keys (the two-`int4` form: a class and a key within it). The first class
/// holds single locks; the others one lock per row key (`hashtext` of the id: two ids sharing
/// a hash only share a lock). `v1_schema.sql` uses [`GLOBAL`]`, `[`CONFIG`] in its trigger.
pub(crate) mod locks {
    /// "LK" followed by a class number.
    pub const GLOBAL: i32 = 0x4c4b_0000;
    pub const AUDIT_CHAIN: i32 = 1;
    pub const CONFIG: i32 = 2;
    pub const MIGRATIONS: i32 = 3;
    pub const REFRESH_CLAIMS: i32 = 4;
    /// An account's status (key: `hashtext(account id)`).
    pub const ACCOUNT: i32 = 0x4c4b_0001;
    /// A user's pending approvals (key: `hashtext(user id)`).
    pub const APPROVALS_OF_USER: i32 = 0x4c4b_0002;
    /// A client's pending approvals (key: `hashtext(client id)`).
    pub const APPROVALS_OF_CLIENT: i32 = 0x4c4b_0003;
    /// One upstream refresh of an account at a time (key: `hashtext(account id)`), held at
    /// session level on a connection of its own for the length of the provider call.
    pub const REFRESH_LEASE: i32 = 0x4c4b_0004;
}

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// The audit chain's MAC key and webhook switch.
    audit: AuditSettings,
}

type Tx = Transaction<'static, Postgres>;

impl PgStore {
    /// Connect to the database at `url` (`postgres://user:password@host:port/database?…`; TLS
    /// as `sslmode` says), with at most `pool_size` connections, migrate it, and be ready.
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("the PostgreSQL URL: {e}")))?;
        Self::connect_with(options, pool_size).await
    }

    /// [`PgStore::connect`] with options built by the caller.
    pub async fn connect_with(
        options: PgConnectOptions,
        pool_size: u32,
    ) -> Result<Self, StoreError> {
        let options = if options.get_application_name().is_none() {
            options.application_name("latchkey")
        } else {
            options
        };
        let options = options.options([
            ("statement_timeout", STATEMENT_TIMEOUT),
            (
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT,
            ),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connect to PostgreSQL: {e}")))?;
        let store = Self {
            pool,
            audit: AuditSettings::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The underlying pool (tests use it to inspect or sabotage the database).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        // A long migration, or waiting for another node's, is not a stuck statement.
        sqlx::query("SET LOCAL statement_timeout = 0")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        // Nodes starting together: one migrates, the others then find it done.
        lock(&mut tx, locks::GLOBAL, locks::MIGRATIONS).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let (current, applied): (i64, i64) =
            sqlx::query_as("SELECT COALESCE(MAX(version), 0), COUNT(*) FROM schema_migrations")
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
        let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if current > known {
            return Err(StoreError::Unavailable(format!(
                "the database has schema version {current}, newer than this Latchkey knows ({known}): \
                 run the Latchkey version that last used it"
            )));
        }
        if applied != current {
            return Err(StoreError::Unavailable(format!(
                "the database's schema history has gaps ({applied} migrations recorded up to version \
                 {current}); it was not created by Latchkey's migrations"
            )));
        }
        for (version, sql) in MIGRATIONS {
            if *version <= current {
                continue;
            }
            sqlx::raw_sql(*sql)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            sqlx::query(
                "INSERT INTO schema_migrations (version, applied_at) \
                 VALUES ($1, EXTRACT(EPOCH FROM now())::BIGINT)",
            )
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn begin(&self) -> Result<Tx, StoreError> {
        self.pool.begin().await.map_err(unavailable)
    }

    /// The row matching one key, mapped.
    async fn find<T>(
        &self,
        sql: &'static str,
        key: &str,
        map: impl Fn(&PgRow) -> T,
    ) -> StoreResult<Option<T>> {
        let row = sqlx::query(sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(map))
    }

    /// Every row of `sql`, mapped.
    async fn all<T>(&self, sql: &'static str, map: impl Fn(&PgRow) -> T) -> StoreResult<Vec<T>> {
        let rows = sqlx::query(sql)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(map).collect())
    }

    /// One statement and its audit entry in one transaction; the entry is written only when
    /// the statement changed a row. Returns whether it did.
    async fn audited(
        &self,
        statement: sqlx::query::Query<'_, Postgres, PgArguments>,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let changed = statement
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
            > 0;
        if changed {
            insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(changed)
    }

    /// [`PgStore::audited`] for a change of an account's status: the account's lock first.
    async fn audited_account(
        &self,
        account_id: &str,
        statement: sqlx::query::Query<'_, Postgres, PgArguments>,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        lock_account(&mut tx, account_id).await?;
        let changed = statement
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
            > 0;
        if changed {
            insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(changed)
    }
}

/// The connection holding a [`PgStore::refresh_lease`].
struct LeaseConnection {
    conn: Option<sqlx::pool::PoolConnection<Postgres>>,
    account_id: String,
}

impl Drop for LeaseConnection {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let account_id = std::mem::take(&mut self.account_id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, hashtext($2))")
                        .bind(locks::REFRESH_LEASE)
                        .bind(&account_id)
                        .execute(&mut *conn)
                        .await;
                    if unlocked.is_err() {
                        // Closing the session releases its locks.
                        let _ = conn.close().await;
                    }
                });
            }
            // No runtime to unlock on: end the session, which releases the lock.
            Err(_) => drop(conn.detach()),
        }
    }
}

/// Take a single advisory lock, exclusively, until the end of `tx`.
async fn lock(tx: &mut Tx, class: i32, key: i32) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(class)
        .bind(key)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Take the lock on an account's status, exclusively, until the end of `tx`: no release of the
/// account is between its check and its commit meanwhile, and none starts one until `tx` ends.
async fn lock_account(tx: &mut Tx, account_id: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(locks::ACCOUNT)
        .bind(account_id)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// SQLite reads a negative `LIMIT` as "no limit"; PostgreSQL refuses it, and reads NULL so.
fn limit(n: i64) -> Option<i64> {
    (n >= 0).then_some(n)
}

/// The chain's last link: its `seq` and `mac`.
const AUDIT_LAST: &str = "SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1";

/// An audit entry: `seq`, the record's columns in this order, then `mac`.
const AUDIT_INSERT: &str = "INSERT INTO audit_events (seq, at, actor_type, actor_id, auth_method, \
     subject_user, action, connection, account_id, agent_id, scopes, decision, reason, \
     audit_context, request_id, client_ip, mac) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)";

/// A webhook to deliver: event, body, and the time (created, first attempt).
const OUTBOX_INSERT: &str = "INSERT INTO webhook_outbox (id, event, body, created_at, next_attempt_at) \
     VALUES ('whk_' || replace(gen_random_uuid()::text, '-', ''), $1, $2, $3, $3)";

/// Append an entry (and its webhooks, if any) inside `tx`, chained to the last one (see
/// [`audit_link`]). The chain lock, held to the end of `tx`, makes the read of the last entry
/// and the insert one step for every node: the lock is granted only after the previous holder
/// committed, and the read, a statement of its own, sees that commit.
async fn insert_audit(tx: &mut Tx, sink: &AuditSink, a: &AuditRecord) -> Result<(), StoreError> {
    lock(tx, locks::GLOBAL, locks::AUDIT_CHAIN).await?;
    let last: Option<(i64, Option<String>)> = sqlx::query_as(AUDIT_LAST)
        .fetch_optional(&mut **tx)
        .await
        .map_err(unavailable)?;
    let (seq, mac) = audit_link(sink, last, a)?;
    sqlx::query(AUDIT_INSERT)
        .bind(seq)
        .bind(a.at)
        .bind(&a.actor_type)
        .bind(&a.actor_id)
        .bind(&a.auth_method)
        .bind(&a.subject_user)
        .bind(&a.action)
        .bind(&a.connection)
        .bind(&a.account_id)
        .bind(&a.agent_id)
        .bind(&a.scopes)
        .bind(&a.decision)
        .bind(&a.reason)
        .bind(&a.audit_context)
        .bind(&a.request_id)
        .bind(&a.client_ip)
        .bind(&mac)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    let entry_event = audit_entry_event(sink, seq, a, &mac);
    for n in a.notify.iter().chain(entry_event.as_ref()) {
        sqlx::query(OUTBOX_INSERT)
            .bind(&n.event)
            .bind(&n.body)
            .bind(a.at)
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// A sign-in's token family and its first refresh token (if any), inside `tx`.
async fn insert_family(
    tx: &mut Tx,
    f: &TokenFamily,
    refresh_hash: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO token_families (id, client_id, user_id, scope, auth_time, amr, revoked, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, FALSE, $7)",
    )
    .bind(&f.id)
    .bind(&f.client_id)
    .bind(&f.user_id)
    .bind(f.scope.to_string_spaced())
    .bind(f.auth_time)
    .bind(&f.amr)
    .bind(f.created_at)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    if let Some(h) = refresh_hash {
        sqlx::query(
            "INSERT INTO refresh_tokens (hash, family_id, state, created_at) VALUES ($1, $2, 'active', $3)",
        )
        .bind(h)
        .bind(&f.id)
        .bind(f.created_at)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    }
    Ok(())
}

fn user_row(r: &PgRow) -> User {
    User {
        id: r.get("id"),
        username: r.get("username"),
        password_hash: r.get("password_hash"),
        totp_seed: r.get("totp_seed"),
        totp_enabled: r.get("totp_enabled"),
        // The column's CHECK admits only known roles; anything else would get the least power.
        role: Role::parse(r.get("role")).unwrap_or_default(),
        created_at: r.get("created_at"),
    }
}

fn connection_row(r: &PgRow) -> Connection {
    Connection {
        id: r.get("id"),
        name: r.get("name"),
        provider: r.get("provider"),
        client_id: r.get("client_id"),
        client_secret: r.get("client_secret"),
        authorize_url: r.get("authorize_url"),
        token_url: r.get("token_url"),
        revoke_url: r.get("revoke_url"),
        userinfo_url: r.get("userinfo_url"),
        api_base_url: r.get("api_base_url"),
        issuer: r.get("issuer"),
        scopes: Scopes::parse(r.get::<&str, _>("scopes")),
        keep_alive_secs: r.get("keep_alive_secs"),
        created_at: r.get("created_at"),
    }
}

fn account_row(r: &PgRow) -> ConnectedAccount {
    ConnectedAccount {
        id: r.get("id"),
        user_id: r.get("user_id"),
        connection_id: r.get("connection_id"),
        upstream_account_id: r.get("upstream_account_id"),
        scopes: Scopes::parse(r.get::<&str, _>("scopes")),
        access_token: r.get("access_token"),
        access_expires_at: r.get("access_expires_at"),
        refresh_token: r.get("refresh_token"),
        status: AccountStatus::parse(r.get::<&str, _>("status")),
        status_reason: r.get("status_reason"),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        last_used_at: r.get("last_used_at"),
        last_refreshed_at: r.get("last_refreshed_at"),
        token_version: r.get("token_version"),
        refresh_started_at: r.get("refresh_started_at"),
    }
}

fn operator_token_row(r: &PgRow) -> OperatorToken {
    OperatorToken {
        id: r.get("id"),
        name: r.get("name"),
        created_at: r.get("created_at"),
        last_used_at: r.get("last_used_at"),
        revoked_at: r.get("revoked_at"),
    }
}

fn agent_row(r: &PgRow) -> Agent {
    Agent {
        id: r.get("id"),
        name: r.get("name"),
        secret_hash: r.get("secret_hash"),
        disabled: r.get("disabled"),
        redirect_uris: r
            .get::<&str, _>("redirect_uris")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        public_client: r.get("public_client"),
        rotate_refresh_tokens: r.get("rotate_refresh_tokens"),
        resource_server: r.get("resource_server"),
        created_at: r.get("created_at"),
    }
}

fn agent_key_row(r: &PgRow) -> AgentKey {
    AgentKey {
        agent_id: r.get("agent_id"),
        kid: r.get("kid"),
        alg: r.get("alg"),
        jwk: r.get("jwk"),
        created_at: r.get("created_at"),
    }
}

fn grant_row(r: &PgRow) -> Grant {
    Grant {
        agent_id: r.get("agent_id"),
        connection_id: r.get("connection_id"),
        scopes: Scopes::parse(r.get::<&str, _>("scopes")),
        ip_allowlist: r
            .get::<&str, _>("ip_allowlist")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        policy: {
            let policy = latchkey_core::policy::GrantPolicy::from_stored(r.get("policy"));
            if let Some(why) = &policy.unreadable {
                tracing::error!(
                    agent = r.get::<&str, _>("agent_id"),
                    connection = r.get::<&str, _>("connection_id"),
                    error = %why,
                    "a grant's stored policy does not read back; the grant releases nothing"
                );
            }
            policy
        },
        created_at: r.get("created_at"),
    }
}

fn account_connect_row(r: &PgRow) -> AccountConnect {
    AccountConnect {
        id: r.get("id"),
        ticket_hash: r.get("ticket_hash"),
        user_id: r.get("user_id"),
        client_id: r.get("client_id"),
        connection_id: r.get("connection_id"),
        redirect_uri: r.get("redirect_uri"),
        state: r.get("state"),
        code_challenge: r.get("code_challenge"),
        scopes: Scopes::parse(r.get::<&str, _>("scopes")),
        params: serde_json::from_str(r.get::<&str, _>("params")).unwrap_or_default(),
        account_id: r.get("account_id"),
        completed: r.get("completed"),
        expires_at: r.get("expires_at"),
    }
}

fn family_row(r: &PgRow) -> TokenFamily {
    TokenFamily {
        id: r.get("id"),
        client_id: r.get("client_id"),
        user_id: r.get("user_id"),
        scope: Scopes::parse(r.get::<&str, _>("scope")),
        auth_time: r.get("auth_time"),
        amr: r.get("amr"),
        revoked: r.get("revoked"),
        created_at: r.get("created_at"),
    }
}

fn auth_code_row(r: &PgRow) -> AuthCode {
    AuthCode {
        hash: r.get("hash"),
        client_id: r.get("client_id"),
        user_id: r.get("user_id"),
        redirect_uri: r.get("redirect_uri"),
        scope: Scopes::parse(r.get::<&str, _>("scope")),
        nonce: r.get("nonce"),
        code_challenge: r.get("code_challenge"),
        audience: r.get("audience"),
        auth_time: r.get("auth_time"),
        amr: r.get("amr"),
        expires_at: r.get("expires_at"),
    }
}

fn connect_flow_row(r: &PgRow) -> ConnectFlow {
    ConnectFlow {
        state_hash: r.get("state_hash"),
        user_id: r.get("user_id"),
        connection_id: r.get("connection_id"),
        code_verifier: r.get("code_verifier"),
        redirect_uri: r.get("redirect_uri"),
        scopes: Scopes::parse(r.get::<&str, _>("scopes")),
        then_to: r.get("then_to"),
        expires_at: r.get("expires_at"),
    }
}

fn session_row(r: &PgRow) -> Session {
    Session {
        user_id: r.get("user_id"),
        auth_methods: r.get("auth_methods"),
        authenticated_at: r.get("authenticated_at"),
        pending_mfa: r.get("pending_mfa"),
        mfa_at: r.get("mfa_at"),
    }
}

fn audit_row(r: &PgRow) -> AuditEntry {
    AuditEntry {
        seq: r.get("seq"),
        record: AuditRecord {
            at: r.get("at"),
            actor_type: r.get("actor_type"),
            actor_id: r.get("actor_id"),
            auth_method: r.get("auth_method"),
            subject_user: r.get("subject_user"),
            action: r.get("action"),
            connection: r.get("connection"),
            account_id: r.get("account_id"),
            scopes: r.get("scopes"),
            decision: r.get("decision"),
            agent_id: r.get("agent_id"),
            notify: None,
            reason: r.get("reason"),
            audit_context: r.get("audit_context"),
            request_id: r.get("request_id"),
            client_ip: r.get("client_ip"),
        },
        mac: r.get("mac"),
    }
}

fn approval_row(r: &PgRow) -> Approval {
    Approval {
        id: r.get("id"),
        req_hash: r.get("req_hash"),
        kind: ApprovalKind::parse(r.get("kind")),
        client_id: r.get("client_id"),
        user_id: r.get("user_id"),
        connection: r.get("connection"),
        scopes: Scopes::parse(r.get("scopes")),
        audience: r.get("audience"),
        authorization_details: r.get("authorization_details"),
        binding_message: r.get("binding_message"),
        audit_context: r.get("audit_context"),
        login_hint: r.get("login_hint"),
        risk: r.get("risk"),
        step_up: r.get("step_up"),
        single_use: r.get("single_use"),
        request_hash: r.get("request_hash"),
        // An unknown status is read as expired: never usable.
        status: ApprovalStatus::parse(r.get("status")).unwrap_or(ApprovalStatus::Expired),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
        interval: r.get("interval"),
        last_polled_at: r.get("last_polled_at"),
        decided_by: r.get("decided_by"),
        decided_at: r.get("decided_at"),
        stepped_up: r.get("stepped_up"),
        redeemed_at: r.get("redeemed_at"),
        reason: r.get("reason"),
    }
}

fn outbox_row(r: &PgRow) -> OutboxItem {
    OutboxItem {
        id: r.get("id"),
        event: r.get("event"),
        body: r.get("body"),
        attempts: r.get("attempts"),
    }
}

/// Per method, where its guarantee across nodes comes from, when it is more than "one
/// statement" or "one transaction".
#[async_trait]
impl Store for PgStore {
    async fn data_keys(&self) -> StoreResult<Vec<DataKeyRow>> {
        self.all(
            "SELECT version, kek_id, wrapped, created_at FROM data_keys ORDER BY version",
            |r| DataKeyRow {
                version: r.get::<i64, _>("version") as u32,
                kek_id: r.get("kek_id"),
                wrapped: r.get("wrapped"),
                created_at: r.get("created_at"),
            },
        )
        .await
    }

    /// Two nodes adding the same version: the primary key lets one in (the other: Conflict).
    async fn insert_data_key(&self, row: &DataKeyRow, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO data_keys (version, kek_id, wrapped, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(row.version as i64)
        .bind(&row.kek_id)
        .bind(&row.wrapped)
        .bind(row.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("data key version"))?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn rewrap_data_keys(&self, rows: &[DataKeyRow], audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for row in rows {
            sqlx::query("UPDATE data_keys SET kek_id = $1, wrapped = $2 WHERE version = $3")
                .bind(&row.kek_id)
                .bind(&row.wrapped)
                .bind(row.version as i64)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn server_secret(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        self.find(
            "SELECT value FROM server_secrets WHERE name = $1",
            name,
            |r| r.get("value"),
        )
        .await
    }

    /// Nodes starting together: the insert of the second waits for the first's to commit and
    /// then does nothing; the read after it (a statement of its own) sees the first's value.
    async fn init_server_secret(&self, name: &str, sealed: &[u8]) -> StoreResult<Vec<u8>> {
        sqlx::query(
            "INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(sealed)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        sqlx::query_scalar("SELECT value FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn put_server_secrets(
        &self,
        secrets: &[(&str, Vec<u8>)],
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for (name, value) in secrets {
            sqlx::query(
                "INSERT INTO server_secrets (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn sealed_fields(&self) -> StoreResult<Vec<SealedField>> {
        let mut out = Vec::new();
        for (table, field, key) in SEALED_COLUMNS {
            let sql = format!(
                "SELECT {key} AS row_id, {field} AS blob FROM {table} WHERE {field} IS NOT NULL"
            );
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            out.extend(rows.iter().map(|r| SealedField {
                table,
                field,
                row: r.get("row_id"),
                blob: r.get("blob"),
            }));
        }
        Ok(out)
    }

    /// Each update is conditional on the blob read: a concurrent writer's new value (or a
    /// concurrent rotation's) makes it change nothing.
    async fn reseal_fields(&self, old_and_new: &[(SealedField, Vec<u8>)]) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        let mut changed = 0;
        for (old, new) in old_and_new {
            let key = SEALED_COLUMNS
                .iter()
                .find(|(t, f, _)| *t == old.table && *f == old.field)
                .map(|(_, _, k)| *k)
                .ok_or(StoreError::NotFound)?;
            let sql = format!(
                "UPDATE {} SET {} = $1 WHERE {key} = $2 AND {} = $3",
                old.table, old.field, old.field
            );
            changed += sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(new)
                .bind(&old.row)
                .bind(&old.blob)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?
                .rows_affected() as usize;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(changed)
    }

    async fn insert_user(&self, user: &User, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO users (id, username, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(&user.password_hash)
        .bind(user.role.as_str())
        .bind(user.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("a user with this username"))?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>> {
        self.find("SELECT * FROM users WHERE id = $1", id, user_row)
            .await
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        self.find(
            "SELECT * FROM users WHERE username = $1",
            username,
            user_row,
        )
        .await
    }

    async fn set_password(
        &self,
        user_id: &str,
        hash: &str,
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        let changed = self
            .audited(
                sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
                    .bind(hash)
                    .bind(user_id),
                audit,
            )
            .await?;
        if changed {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn set_totp(
        &self,
        user_id: &str,
        seed: Option<&[u8]>,
        enabled: bool,
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        let changed = self
            .audited(
                sqlx::query(
                    "UPDATE users SET totp_seed = $1, totp_enabled = $2, totp_last_step = NULL \
                     WHERE id = $3",
                )
                .bind(seed)
                .bind(enabled)
                .bind(user_id),
                audit,
            )
            .await?;
        if changed {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    /// Conditional update: of two nodes accepting the same step, the second re-checks the
    /// first's committed step and changes nothing.
    async fn consume_totp_step(&self, user_id: &str, step: i64) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE users SET totp_last_step = $1 \
             WHERE id = $2 AND (totp_last_step IS NULL OR totp_last_step < $1)",
        )
        .bind(step)
        .bind(user_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        self.all(
            "SELECT * FROM users ORDER BY created_at, username",
            user_row,
        )
        .await
    }

    async fn set_user_role(
        &self,
        user_id: &str,
        role: Role,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        self.audited(
            sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
                .bind(role.as_str())
                .bind(user_id),
            audit,
        )
        .await
    }

    async fn insert_connection(&self, c: &Connection, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO connections (id, name, provider, client_id, client_secret, authorize_url, token_url, \
             revoke_url, userinfo_url, api_base_url, issuer, scopes, keep_alive_secs, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&c.id)
        .bind(&c.name)
        .bind(&c.provider)
        .bind(&c.client_id)
        .bind(&c.client_secret)
        .bind(&c.authorize_url)
        .bind(&c.token_url)
        .bind(&c.revoke_url)
        .bind(&c.userinfo_url)
        .bind(&c.api_base_url)
        .bind(&c.issuer)
        .bind(c.scopes.to_string_spaced())
        .bind(c.keep_alive_secs)
        .bind(c.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("a connection with this name"))?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn connection_by_name(&self, name: &str) -> StoreResult<Option<Connection>> {
        self.find(
            "SELECT * FROM connections WHERE name = $1",
            name,
            connection_row,
        )
        .await
    }

    async fn connection_by_id(&self, id: &str) -> StoreResult<Option<Connection>> {
        self.find(
            "SELECT * FROM connections WHERE id = $1",
            id,
            connection_row,
        )
        .await
    }

    async fn list_connections(&self) -> StoreResult<Vec<Connection>> {
        self.all("SELECT * FROM connections ORDER BY name", connection_row)
            .await
    }

    /// The account's lock first (a re-connect changes its status), then an atomic upsert.
    async fn upsert_account(
        &self,
        a: &ConnectedAccount,
        audit: &AuditRecord,
    ) -> StoreResult<String> {
        let mut tx = self.begin().await?;
        lock_account(&mut tx, &a.id).await?;
        sqlx::query(
            "INSERT INTO connected_accounts (id, user_id, connection_id, upstream_account_id, scopes, access_token, \
             access_expires_at, refresh_token, status, created_at, updated_at, last_used_at, token_version) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (id) DO UPDATE SET scopes = excluded.scopes, access_token = excluded.access_token, \
             access_expires_at = excluded.access_expires_at, refresh_token = excluded.refresh_token, \
             status = excluded.status, status_reason = NULL, updated_at = excluded.updated_at, \
             refresh_started_at = NULL, token_version = connected_accounts.token_version + 1",
        )
        .bind(&a.id)
        .bind(&a.user_id)
        .bind(&a.connection_id)
        .bind(&a.upstream_account_id)
        .bind(a.scopes.to_string_spaced())
        .bind(&a.access_token)
        .bind(a.access_expires_at)
        .bind(&a.refresh_token)
        .bind(a.status.as_str())
        .bind(a.created_at)
        .bind(a.updated_at)
        .bind(a.last_used_at)
        .bind(a.token_version)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        // A new consent may grant other scopes: narrowed tokens of the old one go.
        sqlx::query("DELETE FROM scoped_tokens WHERE account_id = $1")
            .bind(&a.id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(a.id.clone())
    }

    async fn account_by_id(&self, id: &str) -> StoreResult<Option<ConnectedAccount>> {
        self.find(
            "SELECT * FROM connected_accounts WHERE id = $1",
            id,
            account_row,
        )
        .await
    }

    async fn accounts_for(
        &self,
        user_id: &str,
        connection_id: &str,
    ) -> StoreResult<Vec<ConnectedAccount>> {
        let rows = sqlx::query(
            "SELECT * FROM connected_accounts WHERE user_id = $1 AND connection_id = $2 \
             ORDER BY created_at DESC, id",
        )
        .bind(user_id)
        .bind(connection_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows.iter().map(account_row).collect())
    }

    async fn list_accounts(&self, user_id: Option<&str>) -> StoreResult<Vec<ConnectedAccount>> {
        let rows = sqlx::query(
            "SELECT * FROM connected_accounts WHERE ($1::text IS NULL OR user_id = $1) \
             ORDER BY created_at, id",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows.iter().map(account_row).collect())
    }

    /// Fenced by `token_version`: of two nodes committing a refresh of the same version, the
    /// second waits for the first, re-checks the version against its commit, and loses.
    async fn update_account_tokens(
        &self,
        a: &ConnectedAccount,
        expected_version: i64,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE connected_accounts SET scopes = $1, access_token = $2, access_expires_at = $3, \
             refresh_token = $4, updated_at = $5, last_refreshed_at = $5, refresh_started_at = NULL, \
             token_version = $6 WHERE id = $7 AND token_version = $8 AND status = 'active'",
        )
        .bind(a.scopes.to_string_spaced())
        .bind(&a.access_token)
        .bind(a.access_expires_at)
        .bind(&a.refresh_token)
        .bind(a.updated_at)
        .bind(expected_version + 1)
        .bind(&a.id)
        .bind(expected_version)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?
        .rows_affected();
        Ok(n == 1)
    }

    /// The account's lock (releases in flight finish first, later ones see the new status),
    /// then an update fenced by `token_version`.
    async fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
        expected_version: i64,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        self.audited_account(
            id,
            sqlx::query(
                "UPDATE connected_accounts SET status = $1, status_reason = $2, \
                 refresh_started_at = NULL, token_version = token_version + 1 \
                 WHERE id = $3 AND token_version = $4",
            )
            .bind(status.as_str())
            .bind(&audit.reason)
            .bind(id)
            .bind(expected_version),
            audit,
        )
        .await
    }

    async fn scoped_token(&self, id: &str) -> StoreResult<Option<ScopedToken>> {
        self.find("SELECT * FROM scoped_tokens WHERE id = $1", id, |r| {
            ScopedToken {
                id: r.get("id"),
                account_id: r.get("account_id"),
                scopes: Scopes::parse(r.get::<&str, _>("scopes")),
                access_token: r.get("access_token"),
                expires_at: r.get("expires_at"),
            }
        })
        .await
    }

    /// Claim passes are serialised across nodes by the claim lock: each pass reads after the
    /// previous one committed its claims, exactly as SQLite's passes do under its write lock,
    /// so no two passes (on any nodes) claim the same account, except an interrupted refresh
    /// (which, as on SQLite, ignores claims).
    async fn claim_refresh_work(&self, q: &RefreshQuery) -> StoreResult<Vec<RefreshWork>> {
        // Active, refreshable, and not claimed by another pass ($1 is `now`).
        macro_rules! free {
            () => {
                "a.status = 'active' AND a.refresh_token IS NOT NULL \
                 AND (a.refresh_claimed_until IS NULL OR a.refresh_claimed_until <= $1)"
            };
        }
        let mut tx = self.begin().await?;
        lock(&mut tx, locks::GLOBAL, locks::REFRESH_CLAIMS).await?;
        let mut work: Vec<RefreshWork> = Vec::new();
        // Interrupted refreshes ignore claims: the claim may be the dead process's own, and no
        // live refresh is as old as `interrupted_before`.
        let interrupted = sqlx::query(
            "SELECT a.* FROM connected_accounts a WHERE a.status = 'active' \
             AND a.refresh_token IS NOT NULL AND a.refresh_started_at < $1 \
             ORDER BY a.refresh_started_at, a.id LIMIT $2",
        )
        .bind(q.interrupted_before)
        .bind(limit(q.limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        work.extend(interrupted.iter().map(|r| RefreshWork {
            account: account_row(r),
            scope: None,
            why: RefreshWhy::Interrupted,
        }));
        let own = sqlx::query(concat!(
            "SELECT a.* FROM connected_accounts a WHERE ",
            free!(),
            " AND a.last_used_at >= $2 \
             AND a.access_expires_at IS NOT NULL AND a.access_expires_at < $3 \
             AND NOT EXISTS (SELECT 1 FROM scoped_tokens s WHERE s.account_id = a.id) \
             ORDER BY a.access_expires_at, a.id LIMIT $4"
        ))
        .bind(q.now)
        .bind(q.used_since)
        .bind(q.expiring_before)
        .bind(limit(q.limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        work.extend(own.iter().map(|r| RefreshWork {
            account: account_row(r),
            scope: None,
            why: RefreshWhy::Expiring,
        }));
        let narrowed = sqlx::query(concat!(
            "SELECT a.*, s.scopes AS narrowed_scopes FROM scoped_tokens s \
             JOIN connected_accounts a ON a.id = s.account_id WHERE ",
            free!(),
            " AND a.last_used_at >= $2 \
             AND s.expires_at IS NOT NULL AND s.expires_at < $3 ORDER BY s.expires_at, s.id LIMIT $4"
        ))
        .bind(q.now)
        .bind(q.used_since)
        .bind(q.expiring_before)
        .bind(limit(q.limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        work.extend(narrowed.iter().map(|r| RefreshWork {
            account: account_row(r),
            scope: Some(Scopes::parse(r.get::<&str, _>("narrowed_scopes"))),
            why: RefreshWhy::Expiring,
        }));
        let idle = sqlx::query(concat!(
            "SELECT a.* FROM connected_accounts a JOIN connections c ON c.id = a.connection_id \
             WHERE ",
            free!(),
            " AND c.keep_alive_secs IS NOT NULL \
             AND COALESCE(a.last_refreshed_at, a.created_at) + c.keep_alive_secs < $1 \
             ORDER BY COALESCE(a.last_refreshed_at, a.created_at), a.id LIMIT $2"
        ))
        .bind(q.now)
        .bind(limit(q.limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        work.extend(idle.iter().map(|r| RefreshWork {
            account: account_row(r),
            scope: None,
            why: RefreshWhy::KeepAlive,
        }));
        // One entry per account (the first reason found wins), at most `limit`.
        let mut seen = std::collections::HashSet::new();
        work.retain(|w| seen.insert(w.account.id.clone()));
        work.truncate(q.limit.max(0) as usize);
        if !work.is_empty() {
            // A row another transaction is writing right now (a refresh committing, a release
            // stamping its use) is left for the next pass rather than waited for: a pass then
            // never waits for a row, so it can be part of no cycle of waits.
            let ids: Vec<&str> = work.iter().map(|w| w.account.id.as_str()).collect();
            let claimed: std::collections::HashSet<String> = sqlx::query_scalar(
                "UPDATE connected_accounts SET refresh_claimed_until = $1 WHERE id IN \
                 (SELECT id FROM connected_accounts WHERE id = ANY($2) \
                 FOR NO KEY UPDATE SKIP LOCKED) RETURNING id",
            )
            .bind(q.claim_until)
            .bind(ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?
            .into_iter()
            .collect();
            work.retain(|w| claimed.contains(&w.account.id));
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(work)
    }

    /// Fenced by `token_version` (see `update_account_tokens`).
    /// A session-level advisory lock on a connection taken from the pool for the lease's
    /// life: the next node waits for it (up to the statement timeout), and a node that dies
    /// releases it with its connection. Dropping the lease unlocks and returns the connection
    /// (or closes it if the unlock fails, which also releases the lock).
    async fn refresh_lease(&self, account_id: &str) -> StoreResult<RefreshLease> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
            .bind(locks::REFRESH_LEASE)
            .bind(account_id)
            .execute(&mut *conn)
            .await
            .map_err(unavailable)?;
        Ok(RefreshLease::held(Box::new(LeaseConnection {
            conn: Some(conn),
            account_id: account_id.to_owned(),
        })))
    }

    async fn mark_refresh_started(
        &self,
        id: &str,
        expected_version: i64,
        at: i64,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE connected_accounts SET refresh_started_at = $1 WHERE id = $2 AND token_version = $3",
        )
        .bind(at)
        .bind(id)
        .bind(expected_version)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?
        .rows_affected();
        Ok(n == 1)
    }

    /// Fenced by `token_version`; the narrowed token is written only by the winner, in its
    /// transaction (the account's row stays locked until then).
    async fn store_scoped_token(
        &self,
        a: &ConnectedAccount,
        expected_version: i64,
        t: &ScopedToken,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE connected_accounts SET refresh_token = $1, updated_at = $2, last_refreshed_at = $2, \
             refresh_started_at = NULL, token_version = $3 \
             WHERE id = $4 AND token_version = $5 AND status = 'active'",
        )
        .bind(&a.refresh_token)
        .bind(a.updated_at)
        .bind(expected_version + 1)
        .bind(&a.id)
        .bind(expected_version)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        if n == 1 {
            sqlx::query(
                "INSERT INTO scoped_tokens (id, account_id, scopes, access_token, expires_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE \
                 SET access_token = excluded.access_token, expires_at = excluded.expires_at",
            )
            .bind(&t.id)
            .bind(&t.account_id)
            .bind(t.scopes.to_string_spaced())
            .bind(&t.access_token)
            .bind(t.expires_at)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(n == 1)
    }

    /// The account's lock: releases of it that already checked it finish first; every later
    /// one, on any node, waits for this commit and then finds the account revoked.
    async fn revoke_account(&self, id: &str, audit: &AuditRecord) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        lock_account(&mut tx, id).await?;
        let n = sqlx::query(
            "UPDATE connected_accounts SET status = 'revoked', status_reason = $1, access_token = NULL, \
             refresh_token = NULL, access_expires_at = NULL, token_version = token_version + 1, \
             updated_at = $2 WHERE id = $3",
        )
        .bind(format!("revoked by {} {}", audit.actor_type, audit.actor_id))
        .bind(audit.at)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        if n == 1 {
            sqlx::query("DELETE FROM scoped_tokens WHERE account_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(n == 1)
    }

    async fn insert_agent(
        &self,
        agent: &Agent,
        keys: &[AgentKey],
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO agents (id, name, secret_hash, disabled, redirect_uris, public_client, \
             rotate_refresh_tokens, resource_server, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&agent.id)
        .bind(&agent.name)
        .bind(&agent.secret_hash)
        .bind(agent.disabled)
        .bind(agent.redirect_uris.join(" "))
        .bind(agent.public_client)
        .bind(agent.rotate_refresh_tokens)
        .bind(&agent.resource_server)
        .bind(agent.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("agent"))?;
        for k in keys {
            sqlx::query(
                "INSERT INTO agent_keys (agent_id, kid, alg, jwk, created_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&k.agent_id)
            .bind(&k.kid)
            .bind(&k.alg)
            .bind(&k.jwk)
            .bind(k.created_at)
            .execute(&mut *tx)
            .await
            .map_err(conflict("a key with this kid"))?;
        }
        let mut audit = audit.clone();
        audit.reason = Some(format!(
            "{} ({})",
            agent.id,
            audit.reason.unwrap_or_default()
        ));
        insert_audit(&mut tx, &self.audit.sink(), &audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn agent_by_id(&self, id: &str) -> StoreResult<Option<Agent>> {
        self.find("SELECT * FROM agents WHERE id = $1", id, agent_row)
            .await
    }

    async fn agent_by_secret_hash(&self, hash: &str) -> StoreResult<Option<Agent>> {
        self.find(
            "SELECT * FROM agents WHERE secret_hash = $1",
            hash,
            agent_row,
        )
        .await
    }

    async fn agent_keys(&self, agent_id: &str) -> StoreResult<Vec<AgentKey>> {
        let rows =
            sqlx::query("SELECT * FROM agent_keys WHERE agent_id = $1 ORDER BY created_at, kid")
                .bind(agent_id)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(rows.iter().map(agent_key_row).collect())
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        self.all("SELECT * FROM agents ORDER BY created_at, id", agent_row)
            .await
    }

    async fn upsert_grant(&self, g: &Grant, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO grants (agent_id, connection_id, scopes, ip_allowlist, policy, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (agent_id, connection_id) DO UPDATE \
             SET scopes = excluded.scopes, ip_allowlist = excluded.ip_allowlist, policy = excluded.policy",
        )
        .bind(&g.agent_id)
        .bind(&g.connection_id)
        .bind(g.scopes.to_string_spaced())
        .bind(g.ip_allowlist.join(" "))
        .bind(g.policy.to_json())
        .bind(g.created_at)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn grant_for(&self, agent_id: &str, connection_id: &str) -> StoreResult<Option<Grant>> {
        let row = sqlx::query("SELECT * FROM grants WHERE agent_id = $1 AND connection_id = $2")
            .bind(agent_id)
            .bind(connection_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(grant_row))
    }

    async fn list_grants(&self) -> StoreResult<Vec<Grant>> {
        self.all(
            "SELECT * FROM grants ORDER BY agent_id, connection_id",
            grant_row,
        )
        .await
    }

    async fn set_agent_disabled(
        &self,
        id: &str,
        disabled: bool,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        self.audited(
            sqlx::query("UPDATE agents SET disabled = $1 WHERE id = $2")
                .bind(disabled)
                .bind(id),
            audit,
        )
        .await
    }

    async fn delete_grant(
        &self,
        agent_id: &str,
        connection_id: &str,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        self.audited(
            sqlx::query("DELETE FROM grants WHERE agent_id = $1 AND connection_id = $2")
                .bind(agent_id)
                .bind(connection_id),
            audit,
        )
        .await
    }

    /// The user's accounts' locks first (their releases finish, later ones find no account),
    /// then their rows in `id` order, then the deletes.
    async fn delete_user(&self, user_id: &str, audit: &AuditRecord) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock($1, hashtext(id)) FROM \
             (SELECT id FROM connected_accounts WHERE user_id = $2 ORDER BY id) AS a",
        )
        .bind(locks::ACCOUNT)
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        sqlx::query("SELECT id FROM connected_accounts WHERE user_id = $1 ORDER BY id FOR UPDATE")
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        // Children first (foreign keys), the user last.
        const STATEMENTS: [&str; 10] = [
            "DELETE FROM approvals WHERE user_id = $1",
            "DELETE FROM scoped_tokens WHERE account_id IN (SELECT id FROM connected_accounts WHERE user_id = $1)",
            "DELETE FROM account_connects WHERE user_id = $1",
            "DELETE FROM connected_accounts WHERE user_id = $1",
            "DELETE FROM sessions WHERE user_id = $1",
            "DELETE FROM connect_flows WHERE user_id = $1",
            "DELETE FROM refresh_tokens WHERE family_id IN (SELECT id FROM token_families WHERE user_id = $1)",
            "DELETE FROM auth_codes WHERE user_id = $1",
            "DELETE FROM token_families WHERE user_id = $1",
            "DELETE FROM users WHERE id = $1",
        ];
        let mut deleted = 0;
        for sql in STATEMENTS {
            deleted = sqlx::query(sql)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?
                .rows_affected();
        }
        if deleted == 1 {
            insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(deleted == 1)
    }

    async fn config_revision(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT value FROM config_revision WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    /// See `release.rs`: the account's and the configuration's locks shared, the `jti`s as
    /// unique inserts, the audit chain's lock last.
    async fn commit_release(
        &self,
        revision: Option<i64>,
        jtis: &[JtiUse],
        quotas: &[QuotaUse],
        account_id: Option<&str>,
        audit: &AuditRecord,
    ) -> Result<(), ReleaseError> {
        release::commit(self, revision, jtis, quotas, account_id, audit).await
    }

    /// In small transactions, as on SQLite (no long-held locks); `SKIP LOCKED`, so nodes
    /// purging at the same time take different rows instead of waiting for each other.
    async fn purge_expired_jtis(&self, now: i64) -> StoreResult<u64> {
        const CHUNK: i64 = 500;
        let mut n = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM used_jtis WHERE key IN \
                 (SELECT key FROM used_jtis WHERE expires_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(now)
            .bind(CHUNK)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
            n += deleted;
            if deleted < CHUNK as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        sqlx::query("DELETE FROM sessions WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM connect_flows WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM quota_counts WHERE window_end <= $1")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(n)
    }

    async fn insert_session(
        &self,
        hash: &str,
        session: &Session,
        expires_at: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO sessions (hash, user_id, auth_methods, authenticated_at, pending_mfa, expires_at, mfa_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(hash)
        .bind(&session.user_id)
        .bind(&session.auth_methods)
        .bind(session.authenticated_at)
        .bind(session.pending_mfa)
        .bind(expires_at)
        .bind(session.mfa_at)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn session(&self, hash: &str, now: i64) -> StoreResult<Option<Session>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE hash = $1 AND expires_at > $2")
            .bind(hash)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(session_row))
    }

    async fn delete_session(&self, hash: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM sessions WHERE hash = $1")
            .bind(hash)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn insert_connect_flow(&self, f: &ConnectFlow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO connect_flows (state_hash, user_id, connection_id, code_verifier, redirect_uri, \
             scopes, then_to, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&f.state_hash)
        .bind(&f.user_id)
        .bind(&f.connection_id)
        .bind(&f.code_verifier)
        .bind(&f.redirect_uri)
        .bind(f.scopes.to_string_spaced())
        .bind(&f.then_to)
        .bind(f.expires_at)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// `DELETE … RETURNING`: of two nodes taking the same flow, one gets the row.
    async fn take_connect_flow(
        &self,
        state_hash: &str,
        now: i64,
    ) -> StoreResult<Option<ConnectFlow>> {
        let row = sqlx::query("DELETE FROM connect_flows WHERE state_hash = $1 RETURNING *")
            .bind(state_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row
            .as_ref()
            .map(connect_flow_row)
            .filter(|f| f.expires_at > now))
    }

    async fn insert_auth_code(&self, c: &AuthCode) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO auth_codes (hash, client_id, user_id, redirect_uri, scope, nonce, code_challenge, \
             audience, auth_time, amr, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&c.hash)
        .bind(&c.client_id)
        .bind(&c.user_id)
        .bind(&c.redirect_uri)
        .bind(c.scope.to_string_spaced())
        .bind(&c.nonce)
        .bind(&c.code_challenge)
        .bind(&c.audience)
        .bind(c.auth_time)
        .bind(&c.amr)
        .bind(c.expires_at)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// A conditional update (`WHERE NOT used`): of two nodes redeeming one code, the second
    /// re-checks the first's commit and sees a reuse.
    async fn redeem_auth_code(&self, hash: &str) -> StoreResult<CodeRedemption> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(
            "UPDATE auth_codes SET used = TRUE WHERE hash = $1 AND NOT used RETURNING *",
        )
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let result = match row {
            Some(r) => CodeRedemption::Fresh(Box::new(auth_code_row(&r))),
            None => match sqlx::query("SELECT family_id FROM auth_codes WHERE hash = $1")
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?
            {
                Some(r) => CodeRedemption::Reused {
                    family_id: r.get("family_id"),
                },
                None => CodeRedemption::Unknown,
            },
        };
        tx.commit().await.map_err(unavailable)?;
        Ok(result)
    }

    async fn insert_token_family(
        &self,
        f: &TokenFamily,
        code_hash: &str,
        refresh_hash: Option<&str>,
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        insert_family(&mut tx, f, refresh_hash).await?;
        sqlx::query("UPDATE auth_codes SET family_id = $1 WHERE hash = $2")
            .bind(&f.id)
            .bind(code_hash)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn refresh_token(&self, hash: &str) -> StoreResult<Option<RefreshTokenRecord>> {
        self.find(
            "SELECT t.state AS state, f.* FROM refresh_tokens t \
             JOIN token_families f ON f.id = t.family_id WHERE t.hash = $1",
            hash,
            |r| RefreshTokenRecord {
                state: r.get("state"),
                family: family_row(r),
            },
        )
        .await
    }

    /// A conditional update (`WHERE state = 'active'`): one of two concurrent rotations wins.
    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new_hash: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let family: Option<String> = sqlx::query_scalar(
            "UPDATE refresh_tokens SET state = 'rotated' WHERE hash = $1 AND state = 'active' \
             RETURNING family_id",
        )
        .bind(old_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(family) = family else {
            return Ok(false);
        };
        sqlx::query(
            "INSERT INTO refresh_tokens (hash, family_id, state, created_at) VALUES ($1, $2, 'active', $3)",
        )
        .bind(new_hash)
        .bind(family)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    async fn token_family(&self, id: &str) -> StoreResult<Option<TokenFamily>> {
        self.find("SELECT * FROM token_families WHERE id = $1", id, family_row)
            .await
    }

    async fn revoke_token_family(&self, id: &str, audit: &AuditRecord) -> StoreResult<()> {
        self.audited(
            sqlx::query("UPDATE token_families SET revoked = TRUE WHERE id = $1 AND NOT revoked")
                .bind(id),
            audit,
        )
        .await?;
        Ok(())
    }

    async fn insert_account_connect(&self, c: &AccountConnect) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO account_connects (id, ticket_hash, user_id, client_id, connection_id, redirect_uri, \
             state, code_challenge, scopes, params, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&c.id)
        .bind(&c.ticket_hash)
        .bind(&c.user_id)
        .bind(&c.client_id)
        .bind(&c.connection_id)
        .bind(&c.redirect_uri)
        .bind(&c.state)
        .bind(&c.code_challenge)
        .bind(c.scopes.to_string_spaced())
        .bind(serde_json::to_string(&c.params).unwrap_or_default())
        .bind(c.expires_at)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    /// A conditional update: one of two concurrent uses of a ticket gets the row.
    async fn take_account_connect_ticket(
        &self,
        ticket_hash: &str,
        now: i64,
    ) -> StoreResult<Option<AccountConnect>> {
        let row = sqlx::query(
            "UPDATE account_connects SET ticket_hash = NULL \
             WHERE ticket_hash = $1 AND expires_at > $2 RETURNING *",
        )
        .bind(ticket_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(row.as_ref().map(account_connect_row))
    }

    async fn set_account_connect_code(
        &self,
        id: &str,
        code_hash: &str,
        account_id: &str,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE account_connects SET code_hash = $1, account_id = $2 WHERE id = $3")
            .bind(code_hash)
            .bind(account_id)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn account_connect(&self, id: &str) -> StoreResult<Option<AccountConnect>> {
        self.find(
            "SELECT * FROM account_connects WHERE id = $1",
            id,
            account_connect_row,
        )
        .await
    }

    /// A conditional update (`WHERE NOT completed`): one of two concurrent completions wins.
    async fn complete_account_connect(&self, id: &str, code_hash: &str) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE account_connects SET completed = TRUE \
             WHERE id = $1 AND code_hash = $2 AND NOT completed",
        )
        .bind(id)
        .bind(code_hash)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?
        .rows_affected();
        Ok(n == 1)
    }

    fn install_audit_key(&self, key: Arc<AuditKey>) {
        self.audit.install_key(key);
    }

    fn enable_audit_webhook(&self) {
        self.audit.enable_webhook();
    }

    /// Under the chain lock: no node appends while the beginning is sealed, and a node that
    /// appended first (with its key) makes this a no-op.
    async fn chain_unchained_audit(&self) -> StoreResult<usize> {
        let Some(key) = self.audit.sink().key else {
            return Err(StoreError::Unavailable(
                "the audit chain key is not installed".into(),
            ));
        };
        let mut tx = self.begin().await?;
        lock(&mut tx, locks::GLOBAL, locks::AUDIT_CHAIN).await?;
        // Once anything was chained or checkpointed, a missing MAC is tampering, not a
        // beginning: never seal over it.
        let chained: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM audit_events WHERE mac IS NOT NULL) \
             + (SELECT COUNT(*) FROM audit_checkpoints)",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        if chained > 0 {
            return Ok(0);
        }
        let rows = sqlx::query("SELECT * FROM audit_events ORDER BY seq")
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut prev: Option<String> = None;
        for r in &rows {
            let e = audit_row(r);
            let mac = key.mac(prev.as_deref(), e.seq, &e.record);
            sqlx::query("UPDATE audit_events SET mac = $1 WHERE seq = $2")
                .bind(&mac)
                .bind(e.seq)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            prev = Some(mac);
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(rows.len())
    }

    async fn audit_range(&self, after: i64, limit_: i64) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query("SELECT * FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(after)
            .bind(limit(limit_))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(audit_row).collect())
    }

    async fn insert_audit_checkpoint(&self, cp: &AuditCheckpoint) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, mac, at, public_key, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(cp.seq)
        .bind(&cp.mac)
        .bind(cp.at)
        .bind(&cp.public_key)
        .bind(&cp.signature)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn audit_checkpoints(&self) -> StoreResult<Vec<AuditCheckpoint>> {
        self.all("SELECT * FROM audit_checkpoints ORDER BY seq", |r| {
            AuditCheckpoint {
                seq: r.get("seq"),
                mac: r.get("mac"),
                at: r.get("at"),
                public_key: r.get("public_key"),
                signature: r.get("signature"),
            }
        })
        .await
    }

    async fn audit_seq_before(&self, at: i64) -> StoreResult<Option<i64>> {
        sqlx::query_scalar("SELECT MAX(seq) FROM audit_events WHERE at < $1")
            .bind(at)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    /// Under the chain lock from the start, so the deletion and the appended record are one
    /// step of the chain for every node.
    async fn prune_audit(&self, through: i64, audit: &AuditRecord) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        lock(&mut tx, locks::GLOBAL, locks::AUDIT_CHAIN).await?;
        let n = sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
            .bind(through)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(n)
    }

    /// The chain lock (see `insert_audit`): entries from every node form one chain.
    async fn append_audit(&self, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn list_audit(&self, limit_: i64) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query("SELECT * FROM audit_events ORDER BY seq DESC LIMIT $1")
            .bind(limit(limit_))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(audit_row).collect())
    }

    /// One conditional upsert: the row's lock orders claimants, and only the first finds the
    /// period over.
    async fn claim_job(&self, name: &str, now: i64, period: i64) -> StoreResult<bool> {
        let claimed = sqlx::query(
            "INSERT INTO job_claims (name, next_at) VALUES ($1, $2 + $3) \
             ON CONFLICT (name) DO UPDATE SET next_at = $2 + $3 WHERE job_claims.next_at <= $2",
        )
        .bind(name)
        .bind(now)
        .bind(period)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?
        .rows_affected();
        Ok(claimed == 1)
    }

    /// `FOR UPDATE SKIP LOCKED`: senders on several nodes take disjoint batches; a delivery
    /// claimed and committed by another sender meanwhile is re-checked and no longer due.
    async fn claim_webhooks(
        &self,
        now: i64,
        claim_until: i64,
        limit_: i64,
    ) -> StoreResult<Vec<OutboxItem>> {
        let rows = sqlx::query(
            "WITH due AS (SELECT id FROM webhook_outbox WHERE delivered_at IS NULL \
             AND failed_at IS NULL AND next_attempt_at <= $1 ORDER BY created_at, id LIMIT $3 \
             FOR UPDATE SKIP LOCKED) \
             UPDATE webhook_outbox w SET next_attempt_at = $2 FROM due WHERE w.id = due.id \
             RETURNING w.id, w.event, w.body, w.attempts, w.created_at",
        )
        .bind(now)
        .bind(claim_until)
        .bind(limit(limit_))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        // `RETURNING` keeps no order: oldest first, as the trait says.
        let mut items: Vec<(i64, OutboxItem)> = rows
            .iter()
            .map(|r| (r.get("created_at"), outbox_row(r)))
            .collect();
        items.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.id.cmp(&y.id)));
        Ok(items.into_iter().map(|(_, item)| item).collect())
    }

    async fn webhook_delivered(&self, id: &str, at: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhook_outbox SET delivered_at = $1, attempts = attempts + 1, last_error = NULL \
             WHERE id = $2",
        )
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn webhook_failed(
        &self,
        id: &str,
        at: i64,
        retry_at: Option<i64>,
        error: &str,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $1, \
             next_attempt_at = COALESCE($2, next_attempt_at), \
             failed_at = CASE WHEN $2::bigint IS NULL THEN $3 END WHERE id = $4",
        )
        .bind(error)
        .bind(retry_at)
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn insert_operator_token(
        &self,
        t: &OperatorToken,
        secret_hash: &str,
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO operator_tokens (id, name, secret_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(secret_hash)
        .bind(t.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("an operator token with this name"))?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn use_operator_token(&self, hash: &str, now: i64) -> StoreResult<Option<OperatorToken>> {
        let row = sqlx::query(
            "UPDATE operator_tokens SET last_used_at = $1 \
             WHERE secret_hash = $2 AND revoked_at IS NULL RETURNING *",
        )
        .bind(now)
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(row.as_ref().map(operator_token_row))
    }

    async fn list_operator_tokens(&self) -> StoreResult<Vec<OperatorToken>> {
        self.all(
            "SELECT * FROM operator_tokens ORDER BY created_at, name",
            operator_token_row,
        )
        .await
    }

    async fn revoke_operator_token(&self, name: &str, audit: &AuditRecord) -> StoreResult<bool> {
        self.audited(
            sqlx::query(
                "UPDATE operator_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
            )
            .bind(audit.at)
            .bind(name),
            audit,
        )
        .await
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        // One fixed statement per driving filter, so that its index (value, seq) is walked
        // backwards from the cursor and the walk stops after `limit`, whatever plan PostgreSQL
        // settles on for the prepared statement.
        let sql = if q.subject_user.is_some() {
            AUDIT_BY_USER
        } else if q.agent.is_some() {
            AUDIT_BY_AGENT
        } else if q.connection.is_some() {
            AUDIT_BY_CONNECTION
        } else if q.action.is_some() {
            AUDIT_BY_ACTION
        } else {
            AUDIT_SCAN
        };
        let rows = sqlx::query(sql)
            .bind(&q.subject_user)
            .bind(&q.agent)
            .bind(&q.connection)
            .bind(&q.action)
            .bind(&q.action_prefix)
            .bind(&q.decision)
            .bind(q.since.unwrap_or(i64::MIN))
            .bind(q.until.unwrap_or(i64::MAX))
            .bind(q.before_seq.unwrap_or(i64::MAX))
            .bind(limit(q.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(audit_row).collect())
    }

    async fn audit_daily_counts(
        &self,
        action: &str,
        subject_user: Option<&str>,
        since: i64,
    ) -> StoreResult<Vec<DailyCount>> {
        let rows: Vec<(i64, String, i64)> = sqlx::query_as(AUDIT_DAILY_COUNTS)
            .bind(action)
            .bind(subject_user)
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .map(|(day, agent_id, count)| DailyCount {
                day,
                agent_id,
                count,
            })
            .collect())
    }

    /// The user's and then the client's approval locks: two nodes creating the same request
    /// (or the request that would pass a cap) one after the other, each seeing the other's.
    async fn create_approval(
        &self,
        a: &Approval,
        caps: ApprovalCaps,
        audit: &AuditRecord,
    ) -> StoreResult<ApprovalCreated> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock($1, hashtext($2)), pg_advisory_xact_lock($3, hashtext($4))",
        )
        .bind(locks::APPROVALS_OF_USER)
        .bind(&a.user_id)
        .bind(locks::APPROVALS_OF_CLIENT)
        .bind(&a.client_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let existing = sqlx::query(
            "SELECT * FROM approvals WHERE request_hash = $1 AND client_id = $2 AND user_id = $3 \
             AND status = 'pending' AND expires_at > $4 ORDER BY created_at, ord LIMIT 1",
        )
        .bind(&a.request_hash)
        .bind(&a.client_id)
        .bind(&a.user_id)
        .bind(a.created_at)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        if let Some(row) = existing {
            return Ok(ApprovalCreated::Existing(Box::new(approval_row(&row))));
        }
        for (per, sql, value, cap) in [
            (
                "user",
                "SELECT COUNT(*), MIN(expires_at) FROM approvals WHERE user_id = $1 \
                 AND status = 'pending' AND expires_at > $2",
                &a.user_id,
                caps.per_user,
            ),
            (
                "agent",
                "SELECT COUNT(*), MIN(expires_at) FROM approvals WHERE client_id = $1 \
                 AND status = 'pending' AND expires_at > $2",
                &a.client_id,
                caps.per_client,
            ),
        ] {
            let (count, next): (i64, Option<i64>) = sqlx::query_as(sql)
                .bind(value)
                .bind(a.created_at)
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            if count >= cap {
                return Ok(ApprovalCreated::TooMany {
                    per,
                    next_expiry: next.unwrap_or(a.created_at),
                });
            }
        }
        sqlx::query(
            "INSERT INTO approvals (id, req_hash, kind, client_id, user_id, connection, scopes, audience, \
             authorization_details, binding_message, audit_context, login_hint, risk, step_up, single_use, \
             request_hash, status, created_at, expires_at, \"interval\", last_polled_at, decided_by, \
             decided_at, stepped_up, redeemed_at, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
             $19, $20, $21, $22, $23, $24, $25, $26)",
        )
        .bind(&a.id)
        .bind(&a.req_hash)
        .bind(a.kind.as_str())
        .bind(&a.client_id)
        .bind(&a.user_id)
        .bind(&a.connection)
        .bind(a.scopes.to_string_spaced())
        .bind(&a.audience)
        .bind(&a.authorization_details)
        .bind(&a.binding_message)
        .bind(&a.audit_context)
        .bind(&a.login_hint)
        .bind(&a.risk)
        .bind(a.step_up)
        .bind(a.single_use)
        .bind(&a.request_hash)
        .bind(a.status.as_str())
        .bind(a.created_at)
        .bind(a.expires_at)
        .bind(a.interval)
        .bind(a.last_polled_at)
        .bind(&a.decided_by)
        .bind(a.decided_at)
        .bind(a.stepped_up)
        .bind(a.redeemed_at)
        .bind(&a.reason)
        .execute(&mut *tx)
        .await
        .map_err(conflict("an approval with this id"))?;
        insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(ApprovalCreated::Created)
    }

    async fn approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        self.find("SELECT * FROM approvals WHERE id = $1", id, approval_row)
            .await
    }

    async fn approval_by_req_hash(&self, hash: &str) -> StoreResult<Option<Approval>> {
        self.find(
            "SELECT * FROM approvals WHERE req_hash = $1",
            hash,
            approval_row,
        )
        .await
    }

    async fn usable_approval(
        &self,
        request_hash: &str,
        client_id: &str,
        user_id: &str,
        now: i64,
    ) -> StoreResult<Option<Approval>> {
        let row = sqlx::query(
            "SELECT * FROM approvals WHERE request_hash = $1 AND client_id = $2 AND user_id = $3 \
             AND status = 'approved' AND expires_at > $4 \
             ORDER BY decided_at DESC NULLS LAST, id LIMIT 1",
        )
        .bind(request_hash)
        .bind(client_id)
        .bind(user_id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(row.as_ref().map(approval_row))
    }

    async fn list_approvals(&self, f: &ApprovalFilter) -> StoreResult<Vec<Approval>> {
        let rows = sqlx::query(
            "SELECT * FROM approvals WHERE ($1::text IS NULL OR user_id = $1) \
             AND ($2::text IS NULL OR status = $2) ORDER BY created_at DESC, ord DESC LIMIT $3",
        )
        .bind(&f.user_id)
        .bind(f.status.map(ApprovalStatus::as_str))
        .bind(limit(f.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows.iter().map(approval_row).collect())
    }

    /// A conditional update on the expected state: one of two concurrent decisions (or
    /// redemptions) wins, and only the winner's audit entry is written.
    async fn update_approval(&self, u: &ApprovalUpdate, audit: &AuditRecord) -> StoreResult<bool> {
        self.audited(
            sqlx::query(
                "UPDATE approvals SET status = $1, \
                 decided_by = COALESCE($2, decided_by), \
                 decided_at = CASE WHEN $2::text IS NULL THEN decided_at ELSE $3 END, \
                 stepped_up = stepped_up OR $4, \
                 expires_at = COALESCE($5, expires_at), \
                 redeemed_at = CASE WHEN $6 THEN $3 ELSE redeemed_at END, \
                 reason = COALESCE($7, reason) \
                 WHERE id = $8 AND status = $9 AND (NOT $10 OR expires_at > $3) \
                 AND (NOT $6 OR redeemed_at IS NULL)",
            )
            .bind(u.to.as_str())
            .bind(&u.decided_by)
            .bind(u.at)
            .bind(u.stepped_up)
            .bind(u.expires_at)
            .bind(u.redeem)
            .bind(&u.reason)
            .bind(&u.id)
            .bind(u.from.as_str())
            .bind(u.live),
            audit,
        )
        .await
    }

    async fn record_approval_poll(&self, id: &str, at: i64, interval: i64) -> StoreResult<()> {
        sqlx::query("UPDATE approvals SET last_polled_at = $1, \"interval\" = $2 WHERE id = $3")
            .bind(at)
            .bind(interval)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// A conditional update (`WHERE status = 'approved' AND redeemed_at IS NULL`): one of two
    /// concurrent redemptions wins, and only it writes the family and the entries.
    async fn redeem_ciba_approval(
        &self,
        id: &str,
        at: i64,
        f: &TokenFamily,
        refresh_hash: Option<&str>,
        audits: &[AuditRecord],
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let won = sqlx::query(
            "UPDATE approvals SET status = 'redeemed', redeemed_at = $1 \
             WHERE id = $2 AND status = 'approved' AND expires_at > $1 AND redeemed_at IS NULL",
        )
        .bind(at)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected()
            == 1;
        if !won {
            return Ok(false);
        }
        insert_family(&mut tx, f, refresh_hash).await?;
        for audit in audits {
            insert_audit(&mut tx, &self.audit.sink(), audit).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    async fn due_approvals(&self, now: i64, limit_: i64) -> StoreResult<Vec<Approval>> {
        let rows = sqlx::query(
            "SELECT * FROM approvals WHERE status IN ('pending', 'approved') AND expires_at <= $1 \
             ORDER BY expires_at, id LIMIT $2",
        )
        .bind(now)
        .bind(limit(limit_))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows.iter().map(approval_row).collect())
    }

    async fn record_session_mfa(&self, hash: &str, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE sessions SET mfa_at = $1 WHERE hash = $2")
            .bind(at)
            .bind(hash)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// The conditions of every audit read, with parameters bound in this order by `query_audit`:
/// $1 subject user, $2 agent, $3 connection, $4 action, $5 action prefix, $6 decision,
/// $7 since, $8 until, $9 before seq (`i64::MAX` for none), $10 limit.
macro_rules! audit_where {
    () => {
        "($1::text IS NULL OR subject_user = $1) \
         AND ($2::text IS NULL OR (actor_type = 'agent' AND actor_id = $2) OR agent_id = $2) \
         AND ($3::text IS NULL OR connection = $3) \
         AND ($4::text IS NULL OR action = $4) \
         AND ($5::text IS NULL OR left(action, length($5)) = $5) \
         AND ($6::text IS NULL OR decision = $6) \
         AND at >= $7 AND at < $8 AND seq < $9"
    };
}

macro_rules! audit_select {
    ($drive:literal) => {
        concat!(
            "SELECT * FROM audit_events WHERE ",
            $drive,
            audit_where!(),
            " ORDER BY seq DESC LIMIT $10"
        )
    };
}

const AUDIT_SCAN: &str = audit_select!("");
const AUDIT_BY_USER: &str = audit_select!("subject_user = $1 AND ");
const AUDIT_BY_CONNECTION: &str = audit_select!("connection = $3 AND ");
const AUDIT_BY_ACTION: &str = audit_select!("action = $4 AND ");
/// The agent as actor or as target: two index walks, each stopping after `limit`, merged.
/// (A row matching both is the same row in both halves, and `UNION` keeps it once.)
const AUDIT_BY_AGENT: &str = concat!(
    "(",
    audit_select!("actor_type = 'agent' AND actor_id = $2 AND "),
    ") UNION (",
    audit_select!("agent_id = $2 AND "),
    ") ORDER BY seq DESC LIMIT $10"
);

/// `audit_daily_counts`: $1 action, $2 subject user (NULL for all), $3 since. The literal
/// `actor_type` and `decision` terms match the partial index `audit_events_agent_daily`. The
/// day is `at` rounded down to 00:00 UTC (floored, so a time before 1970 too lands on its own
/// day's start).
const AUDIT_DAILY_COUNTS: &str = "SELECT at - ((at % 86400) + 86400) % 86400 AS day, \
     actor_id, COUNT(*) AS count FROM audit_events \
     WHERE action = $1 AND at >= $3 AND actor_type = 'agent' AND decision = 'allow' \
     AND ($2::text IS NULL OR subject_user = $2) \
     GROUP BY day, actor_id ORDER BY day, actor_id";

#[cfg(test)]
mod tests;
