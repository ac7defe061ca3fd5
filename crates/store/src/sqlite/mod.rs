//! The SQLite store: one file in the data directory, zero set-up.
//!
//! Durability: WAL with `synchronous=FULL`, so an acknowledged commit survives a power cut.
//! Concurrency: SQLite has one writer at a time; every multi-statement write runs in
//! `BEGIN IMMEDIATE`, taking the write lock up front, so concurrent writers wait (busy
//! timeout) instead of failing on a read→write upgrade. The file is created 0600.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use latchkey_core::audit::AuditKey;
use latchkey_core::model::*;
use latchkey_core::scope::Scopes;
use latchkey_core::store::*;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

mod reads;
mod release;

use crate::shared::{
    AuditSettings, AuditSink, SEALED_COLUMNS, audit_entry_event, audit_link, conflict, unavailable,
};
use reads::{Columns, Readers, sqlite};

const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("schema.sql")),
    (2, include_str!("v2_lifecycle.sql")),
    (3, include_str!("v3_audit_chain.sql")),
    (4, include_str!("v4_audit_read.sql")),
    (5, include_str!("v5_policy.sql")),
    (6, include_str!("v6_approvals.sql")),
    (7, include_str!("v7_config_revision.sql")),
    (8, include_str!("v8_roles.sql")),
    (9, include_str!("v9_cluster.sql")),
];

#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The audit chain's MAC key (once the vault has unsealed it) and webhook switch.
    audit: AuditSettings,
    /// Synchronous readers for the exchange's hot path (see `reads.rs`).
    readers: Arc<Readers>,
    /// The group-commit writer of token releases, a thread of its own (see `release.rs`).
    releases: std::sync::mpsc::Sender<release::ReleaseJob>,
}

impl SqliteStore {
    /// Open (creating if missing, mode 0600) and migrate the database at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            create_private_file(path)
                .map_err(|e| StoreError::Unavailable(format!("create {}: {e}", path.display())))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(unavailable)?;
        // The release writer opens its own connection, once the schema is in place.
        let (releases, jobs) = std::sync::mpsc::channel();
        let store = Self {
            pool,
            audit: AuditSettings::default(),
            readers: Arc::new(Readers::new(path)),
            releases,
        };
        store.migrate().await?;
        release::spawn_writer(path, jobs, store.audit.clone())?;
        Ok(store)
    }

    /// What [`insert_audit`] needs: the chain key, and whether entries go to the webhook.
    fn audit_sink(&self) -> AuditSink {
        self.audit.sink()
    }

    /// The underlying pool (tests use it to inspect or sabotage the database).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
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
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, strftime('%s','now'))")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    /// The row matching one key, mapped.
    async fn find<T>(
        &self,
        sql: &'static str,
        key: &str,
        map: impl Fn(&SqliteRow) -> T,
    ) -> StoreResult<Option<T>> {
        let row = sqlx::query(sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(map))
    }

    /// One statement and its audit entry in one transaction; the entry is written only when
    /// the statement changed a row. Returns whether it did.
    async fn audited(
        &self,
        statement: sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments>,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let changed = statement
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
            > 0;
        if changed {
            insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(changed)
    }

    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)
    }
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(|_| ())
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map(|_| ())
}

/// The last link of the audit chain: its `seq` and `mac`.
const AUDIT_LAST: &str = "SELECT seq, mac FROM audit_events ORDER BY seq DESC LIMIT 1";

/// An audit entry: `seq`, the record's columns in this order, then `mac`.
const AUDIT_INSERT: &str = "INSERT INTO audit_events (seq, at, actor_type, actor_id, auth_method, \
     subject_user, action, connection, account_id, agent_id, scopes, decision, reason, \
     audit_context, request_id, client_ip, mac) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// A webhook to deliver: event, body, created_at, next_attempt_at.
const OUTBOX_INSERT: &str = "INSERT INTO webhook_outbox (id, event, body, created_at, next_attempt_at) \
     VALUES ('whk_' || lower(hex(randomblob(16))), ?, ?, ?, ?)";

/// Append an entry (and its webhooks, if any) inside `tx`, chained to the last one (see
/// [`audit_link`]). The write lock of `tx` (`BEGIN IMMEDIATE`) keeps the chain linear. The
/// release writer does the same on its own connection (`release.rs`).
async fn insert_audit(
    tx: &mut Transaction<'static, Sqlite>,
    sink: &AuditSink,
    a: &AuditRecord,
) -> Result<(), StoreError> {
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
            .bind(a.at)
            .execute(&mut **tx)
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// A sign-in's token family and its first refresh token (if any), inside `tx`.
async fn insert_family(
    tx: &mut Transaction<'static, Sqlite>,
    f: &TokenFamily,
    refresh_hash: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO token_families (id, client_id, user_id, scope, auth_time, amr, revoked, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
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
            "INSERT INTO refresh_tokens (hash, family_id, state, created_at) VALUES (?, ?, 'active', ?)",
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

fn user_row(r: &SqliteRow) -> User {
    User {
        id: r.get("id"),
        username: r.get("username"),
        password_hash: r.get("password_hash"),
        totp_seed: r.get("totp_seed"),
        totp_enabled: r.get::<i64, _>("totp_enabled") != 0,
        // The column's CHECK admits only known roles; anything else would get the least power.
        role: Role::parse(r.get("role")).unwrap_or_default(),
        created_at: r.get("created_at"),
    }
}

fn connection_row(r: &SqliteRow) -> Connection {
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

fn account_row(r: &impl Columns) -> ConnectedAccount {
    ConnectedAccount {
        id: r.text("id"),
        user_id: r.text("user_id"),
        connection_id: r.text("connection_id"),
        upstream_account_id: r.opt_text("upstream_account_id"),
        scopes: Scopes::parse(&r.text("scopes")),
        access_token: r.opt_blob("access_token"),
        access_expires_at: r.opt_int("access_expires_at"),
        refresh_token: r.opt_blob("refresh_token"),
        status: AccountStatus::parse(&r.text("status")),
        status_reason: r.opt_text("status_reason"),
        created_at: r.int("created_at"),
        updated_at: r.int("updated_at"),
        last_used_at: r.opt_int("last_used_at"),
        last_refreshed_at: r.opt_int("last_refreshed_at"),
        token_version: r.int("token_version"),
        refresh_started_at: r.opt_int("refresh_started_at"),
    }
}

fn operator_token_row(r: &SqliteRow) -> OperatorToken {
    OperatorToken {
        id: r.get("id"),
        name: r.get("name"),
        created_at: r.get("created_at"),
        last_used_at: r.get("last_used_at"),
        revoked_at: r.get("revoked_at"),
    }
}

fn agent_row(r: &SqliteRow) -> Agent {
    Agent {
        id: r.get("id"),
        name: r.get("name"),
        secret_hash: r.get("secret_hash"),
        disabled: r.get::<i64, _>("disabled") != 0,
        redirect_uris: r
            .get::<&str, _>("redirect_uris")
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        public_client: r.get::<i64, _>("public_client") != 0,
        rotate_refresh_tokens: r.get::<i64, _>("rotate_refresh_tokens") != 0,
        resource_server: r.get("resource_server"),
        created_at: r.get("created_at"),
    }
}

fn grant_row(r: &SqliteRow) -> Grant {
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

fn account_connect_row(r: &SqliteRow) -> AccountConnect {
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
        completed: r.get::<i64, _>("completed") != 0,
        expires_at: r.get("expires_at"),
    }
}

fn family_row(r: &SqliteRow) -> TokenFamily {
    TokenFamily {
        id: r.get("id"),
        client_id: r.get("client_id"),
        user_id: r.get("user_id"),
        scope: Scopes::parse(r.get::<&str, _>("scope")),
        auth_time: r.get("auth_time"),
        amr: r.get("amr"),
        revoked: r.get::<i64, _>("revoked") != 0,
        created_at: r.get("created_at"),
    }
}

fn audit_row(r: &SqliteRow) -> AuditEntry {
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

#[async_trait]
impl Store for SqliteStore {
    async fn data_keys(&self) -> StoreResult<Vec<DataKeyRow>> {
        let rows = sqlx::query(
            "SELECT version, kek_id, wrapped, created_at FROM data_keys ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| DataKeyRow {
                version: r.get::<i64, _>("version") as u32,
                kek_id: r.get("kek_id"),
                wrapped: r.get("wrapped"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    async fn insert_data_key(&self, row: &DataKeyRow, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO data_keys (version, kek_id, wrapped, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(row.version as i64)
        .bind(&row.kek_id)
        .bind(&row.wrapped)
        .bind(row.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("data key version"))?;
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn rewrap_data_keys(&self, rows: &[DataKeyRow], audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.write().await?;
        for row in rows {
            sqlx::query("UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE version = ?")
                .bind(&row.kek_id)
                .bind(&row.wrapped)
                .bind(row.version as i64)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn server_secret(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        self.find(
            "SELECT value FROM server_secrets WHERE name = ?",
            name,
            |r| r.get("value"),
        )
        .await
    }

    async fn init_server_secret(&self, name: &str, sealed: &[u8]) -> StoreResult<Vec<u8>> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO server_secrets (name, value) VALUES (?, ?) ON CONFLICT(name) DO NOTHING",
        )
        .bind(name)
        .bind(sealed)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let value: Vec<u8> = sqlx::query("SELECT value FROM server_secrets WHERE name = ?")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?
            .get("value");
        tx.commit().await.map_err(unavailable)?;
        Ok(value)
    }

    async fn put_server_secrets(
        &self,
        secrets: &[(&str, Vec<u8>)],
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        let mut tx = self.write().await?;
        for (name, value) in secrets {
            sqlx::query(
                "INSERT INTO server_secrets (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            )
            .bind(name)
            .bind(value)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        }
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
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

    async fn reseal_fields(&self, old_and_new: &[(SealedField, Vec<u8>)]) -> StoreResult<usize> {
        let mut tx = self.write().await?;
        let mut changed = 0;
        for (old, new) in old_and_new {
            let key = SEALED_COLUMNS
                .iter()
                .find(|(t, f, _)| *t == old.table && *f == old.field)
                .map(|(_, _, k)| *k)
                .ok_or(StoreError::NotFound)?;
            let sql = format!(
                "UPDATE {} SET {} = ? WHERE {key} = ? AND {} = ?",
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
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO users (id, username, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&user.id)
        .bind(&user.username)
        .bind(&user.password_hash)
        .bind(user.role.as_str())
        .bind(user.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("a user with this username"))?;
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>> {
        self.find("SELECT * FROM users WHERE id = ?", id, user_row)
            .await
    }

    async fn user_by_username(&self, username: &str) -> StoreResult<Option<User>> {
        self.find("SELECT * FROM users WHERE username = ?", username, user_row)
            .await
    }

    async fn set_password(
        &self,
        user_id: &str,
        hash: &str,
        audit: &AuditRecord,
    ) -> StoreResult<()> {
        if self
            .audited(
                sqlx::query("UPDATE users SET password_hash = ? WHERE id = ?")
                    .bind(hash)
                    .bind(user_id),
                audit,
            )
            .await?
        {
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
        if self.audited(sqlx::query(
            "UPDATE users SET totp_seed = ?, totp_enabled = ?, totp_last_step = NULL WHERE id = ?",
        )
        .bind(seed)
        .bind(enabled as i64)
        .bind(user_id), audit).await? {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }

    async fn consume_totp_step(&self, user_id: &str, step: i64) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE users SET totp_last_step = ? WHERE id = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
        )
        .bind(step)
        .bind(user_id)
        .bind(step)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?
        .rows_affected();
        Ok(n == 1)
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let rows = sqlx::query("SELECT * FROM users ORDER BY created_at, username")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(user_row).collect())
    }

    async fn set_user_role(
        &self,
        user_id: &str,
        role: Role,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        self.audited(
            sqlx::query("UPDATE users SET role = ? WHERE id = ?")
                .bind(role.as_str())
                .bind(user_id),
            audit,
        )
        .await
    }

    async fn insert_connection(&self, c: &Connection, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO connections (id, name, provider, client_id, client_secret, authorize_url, token_url, \
             revoke_url, userinfo_url, api_base_url, issuer, scopes, keep_alive_secs, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn connection_by_name(&self, name: &str) -> StoreResult<Option<Connection>> {
        self.find(
            "SELECT * FROM connections WHERE name = ?",
            name,
            connection_row,
        )
        .await
    }

    async fn connection_by_id(&self, id: &str) -> StoreResult<Option<Connection>> {
        self.find("SELECT * FROM connections WHERE id = ?", id, connection_row)
            .await
    }

    async fn list_connections(&self) -> StoreResult<Vec<Connection>> {
        let rows = sqlx::query("SELECT * FROM connections ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(connection_row).collect())
    }

    async fn upsert_account(
        &self,
        a: &ConnectedAccount,
        audit: &AuditRecord,
    ) -> StoreResult<String> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO connected_accounts (id, user_id, connection_id, upstream_account_id, scopes, access_token, \
             access_expires_at, refresh_token, status, created_at, updated_at, last_used_at, token_version) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT(id) DO UPDATE SET scopes = excluded.scopes, access_token = excluded.access_token, \
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
        sqlx::query("DELETE FROM scoped_tokens WHERE account_id = ?")
            .bind(&a.id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(a.id.clone())
    }

    async fn account_by_id(&self, id: &str) -> StoreResult<Option<ConnectedAccount>> {
        self.find(
            "SELECT * FROM connected_accounts WHERE id = ?",
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
        // Every token exchange reads this: on the caller's thread (see `reads.rs`).
        self.readers.read(|c| {
            c.prepare_cached(
                "SELECT * FROM connected_accounts WHERE user_id = ? AND connection_id = ? ORDER BY created_at DESC, id",
            )?
            .query_map([user_id, connection_id], |r| Ok(account_row(r)))?
            .collect()
        })
    }

    async fn list_accounts(&self, user_id: Option<&str>) -> StoreResult<Vec<ConnectedAccount>> {
        let rows =
            match user_id {
                Some(u) => sqlx::query(
                    "SELECT * FROM connected_accounts WHERE user_id = ? ORDER BY created_at, id",
                )
                .bind(u)
                .fetch_all(&self.pool)
                .await,
                None => {
                    sqlx::query("SELECT * FROM connected_accounts ORDER BY created_at, id")
                        .fetch_all(&self.pool)
                        .await
                }
            }
            .map_err(unavailable)?;
        Ok(rows.iter().map(account_row).collect())
    }

    async fn update_account_tokens(
        &self,
        a: &ConnectedAccount,
        expected_version: i64,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE connected_accounts SET scopes = ?, access_token = ?, access_expires_at = ?, refresh_token = ?, \
             updated_at = ?, last_refreshed_at = ?, refresh_started_at = NULL, token_version = ? \
             WHERE id = ? AND token_version = ? AND status = 'active'",
        )
        .bind(a.scopes.to_string_spaced())
        .bind(&a.access_token)
        .bind(a.access_expires_at)
        .bind(&a.refresh_token)
        .bind(a.updated_at)
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

    async fn set_account_status(
        &self,
        id: &str,
        status: AccountStatus,
        expected_version: i64,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        self.audited(sqlx::query(
            "UPDATE connected_accounts SET status = ?, status_reason = ?, refresh_started_at = NULL, \
             token_version = token_version + 1 WHERE id = ? AND token_version = ?",
        )
        .bind(status.as_str())
        .bind(&audit.reason)
        .bind(id)
        .bind(expected_version), audit)
            .await
    }

    async fn scoped_token(&self, id: &str) -> StoreResult<Option<ScopedToken>> {
        // Every exchange narrowed below the consent reads this: on the caller's thread.
        self.readers
            .find("SELECT * FROM scoped_tokens WHERE id = ?", id, |r| {
                ScopedToken {
                    id: r.text("id"),
                    account_id: r.text("account_id"),
                    scopes: Scopes::parse(&r.text("scopes")),
                    access_token: r.blob("access_token"),
                    expires_at: r.opt_int("expires_at"),
                }
            })
    }

    async fn claim_refresh_work(&self, q: &RefreshQuery) -> StoreResult<Vec<RefreshWork>> {
        // Active, refreshable, and not claimed by another pass (binds `now` first).
        macro_rules! free {
            () => {
                "a.status = 'active' AND a.refresh_token IS NOT NULL \
                 AND (a.refresh_claimed_until IS NULL OR a.refresh_claimed_until <= ?)"
            };
        }
        let mut tx = self.write().await?;
        let mut work: Vec<RefreshWork> = Vec::new();
        // Interrupted refreshes ignore claims: the claim may be the dead process's own, and no
        // live refresh is as old as `interrupted_before`.
        let interrupted = sqlx::query(
            "SELECT a.* FROM connected_accounts a WHERE a.status = 'active' \
             AND a.refresh_token IS NOT NULL AND a.refresh_started_at < ? \
             ORDER BY a.refresh_started_at LIMIT ?",
        )
        .bind(q.interrupted_before)
        .bind(q.limit)
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
            " AND a.last_used_at >= ? \
             AND a.access_expires_at IS NOT NULL AND a.access_expires_at < ? \
             AND NOT EXISTS (SELECT 1 FROM scoped_tokens s WHERE s.account_id = a.id) \
             ORDER BY a.access_expires_at LIMIT ?"
        ))
        .bind(q.now)
        .bind(q.used_since)
        .bind(q.expiring_before)
        .bind(q.limit)
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
            " AND a.last_used_at >= ? \
             AND s.expires_at IS NOT NULL AND s.expires_at < ? ORDER BY s.expires_at LIMIT ?"
        ))
        .bind(q.now)
        .bind(q.used_since)
        .bind(q.expiring_before)
        .bind(q.limit)
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
             AND COALESCE(a.last_refreshed_at, a.created_at) + c.keep_alive_secs < ? \
             ORDER BY COALESCE(a.last_refreshed_at, a.created_at) LIMIT ?"
        ))
        .bind(q.now)
        .bind(q.now)
        .bind(q.limit)
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
        for w in &work {
            sqlx::query("UPDATE connected_accounts SET refresh_claimed_until = ? WHERE id = ?")
                .bind(q.claim_until)
                .bind(&w.account.id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(work)
    }

    async fn mark_refresh_started(
        &self,
        id: &str,
        expected_version: i64,
        at: i64,
    ) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE connected_accounts SET refresh_started_at = ? WHERE id = ? AND token_version = ?",
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

    async fn store_scoped_token(
        &self,
        a: &ConnectedAccount,
        expected_version: i64,
        t: &ScopedToken,
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE connected_accounts SET refresh_token = ?, updated_at = ?, last_refreshed_at = ?, \
             refresh_started_at = NULL, token_version = ? WHERE id = ? AND token_version = ? AND status = 'active'",
        )
        .bind(&a.refresh_token)
        .bind(a.updated_at)
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
                "INSERT INTO scoped_tokens (id, account_id, scopes, access_token, expires_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT(id) DO UPDATE SET access_token = excluded.access_token, expires_at = excluded.expires_at",
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

    async fn revoke_account(&self, id: &str, audit: &AuditRecord) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let n = sqlx::query(
            "UPDATE connected_accounts SET status = 'revoked', status_reason = ?, access_token = NULL, \
             refresh_token = NULL, access_expires_at = NULL, token_version = token_version + 1, updated_at = ? WHERE id = ?",
        )
        .bind(format!("revoked by {} {}", audit.actor_type, audit.actor_id))
        .bind(audit.at)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        if n == 1 {
            sqlx::query("DELETE FROM scoped_tokens WHERE account_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            insert_audit(&mut tx, &self.audit_sink(), audit).await?;
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
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO agents (id, name, secret_hash, disabled, redirect_uris, public_client, \
             rotate_refresh_tokens, resource_server, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&agent.id)
        .bind(&agent.name)
        .bind(&agent.secret_hash)
        .bind(agent.disabled as i64)
        .bind(agent.redirect_uris.join(" "))
        .bind(agent.public_client as i64)
        .bind(agent.rotate_refresh_tokens as i64)
        .bind(&agent.resource_server)
        .bind(agent.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("agent"))?;
        for k in keys {
            sqlx::query("INSERT INTO agent_keys (agent_id, kid, alg, jwk, created_at) VALUES (?, ?, ?, ?, ?)")
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
        insert_audit(&mut tx, &self.audit_sink(), &audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn agent_by_id(&self, id: &str) -> StoreResult<Option<Agent>> {
        self.find("SELECT * FROM agents WHERE id = ?", id, agent_row)
            .await
    }

    async fn agent_by_secret_hash(&self, hash: &str) -> StoreResult<Option<Agent>> {
        self.find(
            "SELECT * FROM agents WHERE secret_hash = ?",
            hash,
            agent_row,
        )
        .await
    }

    async fn agent_keys(&self, agent_id: &str) -> StoreResult<Vec<AgentKey>> {
        let rows =
            sqlx::query("SELECT * FROM agent_keys WHERE agent_id = ? ORDER BY created_at, kid")
                .bind(agent_id)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| AgentKey {
                agent_id: r.get("agent_id"),
                kid: r.get("kid"),
                alg: r.get("alg"),
                jwk: r.get("jwk"),
                created_at: r.get("created_at"),
            })
            .collect())
    }

    async fn list_agents(&self) -> StoreResult<Vec<Agent>> {
        let rows = sqlx::query("SELECT * FROM agents ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(agent_row).collect())
    }

    async fn upsert_grant(&self, g: &Grant, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO grants (agent_id, connection_id, scopes, ip_allowlist, policy, created_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT(agent_id, connection_id) DO UPDATE SET scopes = excluded.scopes, ip_allowlist = excluded.ip_allowlist, policy = excluded.policy",
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
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn grant_for(&self, agent_id: &str, connection_id: &str) -> StoreResult<Option<Grant>> {
        let row = sqlx::query("SELECT * FROM grants WHERE agent_id = ? AND connection_id = ?")
            .bind(agent_id)
            .bind(connection_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.as_ref().map(grant_row))
    }

    async fn list_grants(&self) -> StoreResult<Vec<Grant>> {
        let rows = sqlx::query("SELECT * FROM grants ORDER BY agent_id, connection_id")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(grant_row).collect())
    }

    async fn set_agent_disabled(
        &self,
        id: &str,
        disabled: bool,
        audit: &AuditRecord,
    ) -> StoreResult<bool> {
        self.audited(
            sqlx::query("UPDATE agents SET disabled = ? WHERE id = ?")
                .bind(disabled as i64)
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
            sqlx::query("DELETE FROM grants WHERE agent_id = ? AND connection_id = ?")
                .bind(agent_id)
                .bind(connection_id),
            audit,
        )
        .await
    }

    async fn delete_user(&self, user_id: &str, audit: &AuditRecord) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        // Children first (foreign keys), the user last.
        const STATEMENTS: [&str; 10] = [
            "DELETE FROM approvals WHERE user_id = ?",
            "DELETE FROM scoped_tokens WHERE account_id IN (SELECT id FROM connected_accounts WHERE user_id = ?)",
            "DELETE FROM account_connects WHERE user_id = ?",
            "DELETE FROM connected_accounts WHERE user_id = ?",
            "DELETE FROM sessions WHERE user_id = ?",
            "DELETE FROM connect_flows WHERE user_id = ?",
            "DELETE FROM refresh_tokens WHERE family_id IN (SELECT id FROM token_families WHERE user_id = ?)",
            "DELETE FROM auth_codes WHERE user_id = ?",
            "DELETE FROM token_families WHERE user_id = ?",
            "DELETE FROM users WHERE id = ?",
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
            insert_audit(&mut tx, &self.audit_sink(), audit).await?;
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

    async fn commit_release(
        &self,
        revision: Option<i64>,
        jtis: &[JtiUse],
        quotas: &[QuotaUse],
        account_id: Option<&str>,
        audit: &AuditRecord,
    ) -> Result<(), ReleaseError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = release::ReleaseJob {
            revision,
            jtis: jtis.to_vec(),
            quotas: quotas.to_vec(),
            account_id: account_id.map(str::to_owned),
            audit: audit.clone(),
            reply,
        };
        let gone =
            || ReleaseError::Store(StoreError::Unavailable("the release writer stopped".into()));
        self.releases.send(job).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn purge_expired_jtis(&self, now: i64) -> StoreResult<u64> {
        // In small transactions: one large delete held the write lock long enough to stall
        // every token release behind it (over a second at a few thousand releases a second).
        const CHUNK: i64 = 500;
        let mut n = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM used_jtis WHERE key IN \
                 (SELECT key FROM used_jtis WHERE expires_at < ? LIMIT ?)",
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
        sqlx::query("DELETE FROM sessions WHERE expires_at < ?")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM connect_flows WHERE expires_at < ?")
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM quota_counts WHERE window_end <= ?")
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
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(hash)
        .bind(&session.user_id)
        .bind(&session.auth_methods)
        .bind(session.authenticated_at)
        .bind(session.pending_mfa as i64)
        .bind(expires_at)
        .bind(session.mfa_at)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn session(&self, hash: &str, now: i64) -> StoreResult<Option<Session>> {
        let row = sqlx::query("SELECT * FROM sessions WHERE hash = ? AND expires_at > ?")
            .bind(hash)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Session {
            user_id: r.get("user_id"),
            auth_methods: r.get("auth_methods"),
            authenticated_at: r.get("authenticated_at"),
            pending_mfa: r.get::<i64, _>("pending_mfa") != 0,
            mfa_at: r.get("mfa_at"),
        }))
    }

    async fn delete_session(&self, hash: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM sessions WHERE hash = ?")
            .bind(hash)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn insert_connect_flow(&self, f: &ConnectFlow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO connect_flows (state_hash, user_id, connection_id, code_verifier, redirect_uri, scopes, \
             then_to, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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

    async fn take_connect_flow(
        &self,
        state_hash: &str,
        now: i64,
    ) -> StoreResult<Option<ConnectFlow>> {
        let row = sqlx::query("DELETE FROM connect_flows WHERE state_hash = ? RETURNING *")
            .bind(state_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(row
            .map(|r| ConnectFlow {
                state_hash: r.get("state_hash"),
                user_id: r.get("user_id"),
                connection_id: r.get("connection_id"),
                code_verifier: r.get("code_verifier"),
                redirect_uri: r.get("redirect_uri"),
                scopes: Scopes::parse(r.get::<&str, _>("scopes")),
                then_to: r.get("then_to"),
                expires_at: r.get("expires_at"),
            })
            .filter(|f| f.expires_at > now))
    }

    async fn insert_auth_code(&self, c: &AuthCode) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO auth_codes (hash, client_id, user_id, redirect_uri, scope, nonce, code_challenge, \
             audience, auth_time, amr, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    async fn redeem_auth_code(&self, hash: &str) -> StoreResult<CodeRedemption> {
        let mut tx = self.write().await?;
        let row =
            sqlx::query("UPDATE auth_codes SET used = 1 WHERE hash = ? AND used = 0 RETURNING *")
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
        let result = match row {
            Some(r) => CodeRedemption::Fresh(Box::new(AuthCode {
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
            })),
            None => match sqlx::query("SELECT family_id FROM auth_codes WHERE hash = ?")
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
        let mut tx = self.write().await?;
        insert_family(&mut tx, f, refresh_hash).await?;
        sqlx::query("UPDATE auth_codes SET family_id = ? WHERE hash = ?")
            .bind(&f.id)
            .bind(code_hash)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn refresh_token(&self, hash: &str) -> StoreResult<Option<RefreshTokenRecord>> {
        self.find(
            "SELECT t.state AS state, f.* FROM refresh_tokens t JOIN token_families f ON f.id = t.family_id \
             WHERE t.hash = ?",
            hash,
            |r| RefreshTokenRecord { state: r.get("state"), family: family_row(r) },
        )
        .await
    }

    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new_hash: &str,
        now: i64,
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let family: Option<String> =
            sqlx::query("UPDATE refresh_tokens SET state = 'rotated' WHERE hash = ? AND state = 'active' RETURNING family_id")
                .bind(old_hash)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?
                .map(|r| r.get("family_id"));
        let Some(family) = family else {
            return Ok(false);
        };
        sqlx::query("INSERT INTO refresh_tokens (hash, family_id, state, created_at) VALUES (?, ?, 'active', ?)")
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
        self.find("SELECT * FROM token_families WHERE id = ?", id, family_row)
            .await
    }

    async fn revoke_token_family(&self, id: &str, audit: &AuditRecord) -> StoreResult<()> {
        self.audited(
            sqlx::query("UPDATE token_families SET revoked = 1 WHERE id = ? AND revoked = 0")
                .bind(id),
            audit,
        )
        .await?;
        Ok(())
    }

    async fn insert_account_connect(&self, c: &AccountConnect) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO account_connects (id, ticket_hash, user_id, client_id, connection_id, redirect_uri, state, \
             code_challenge, scopes, params, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    async fn take_account_connect_ticket(
        &self,
        ticket_hash: &str,
        now: i64,
    ) -> StoreResult<Option<AccountConnect>> {
        let row = sqlx::query(
            "UPDATE account_connects SET ticket_hash = NULL WHERE ticket_hash = ? AND expires_at > ? RETURNING *",
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
        sqlx::query("UPDATE account_connects SET code_hash = ?, account_id = ? WHERE id = ?")
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
            "SELECT * FROM account_connects WHERE id = ?",
            id,
            account_connect_row,
        )
        .await
    }

    async fn complete_account_connect(&self, id: &str, code_hash: &str) -> StoreResult<bool> {
        let n = sqlx::query("UPDATE account_connects SET completed = 1 WHERE id = ? AND code_hash = ? AND completed = 0")
            .bind(id)
            .bind(code_hash)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
        Ok(n == 1)
    }

    fn enable_audit_webhook(&self) {
        self.audit.enable_webhook();
    }

    fn install_audit_key(&self, key: Arc<AuditKey>) {
        self.audit.install_key(key);
    }

    async fn chain_unchained_audit(&self) -> StoreResult<usize> {
        let Some(key) = self.audit_sink().key else {
            return Err(StoreError::Unavailable(
                "the audit chain key is not installed".into(),
            ));
        };
        let mut tx = self.write().await?;
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
            sqlx::query("UPDATE audit_events SET mac = ? WHERE seq = ?")
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

    async fn audit_range(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query("SELECT * FROM audit_events WHERE seq > ? ORDER BY seq LIMIT ?")
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(audit_row).collect())
    }

    async fn insert_audit_checkpoint(&self, cp: &AuditCheckpoint) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, mac, at, public_key, signature) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT(seq) DO NOTHING",
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
        let rows = sqlx::query("SELECT * FROM audit_checkpoints ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| AuditCheckpoint {
                seq: r.get("seq"),
                mac: r.get("mac"),
                at: r.get("at"),
                public_key: r.get("public_key"),
                signature: r.get("signature"),
            })
            .collect())
    }

    async fn audit_seq_before(&self, at: i64) -> StoreResult<Option<i64>> {
        sqlx::query_scalar("SELECT MAX(seq) FROM audit_events WHERE at < ?")
            .bind(at)
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn prune_audit(&self, through: i64, audit: &AuditRecord) -> StoreResult<u64> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM audit_events WHERE seq <= ?")
            .bind(through)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(n)
    }

    async fn append_audit(&self, audit: &AuditRecord) -> StoreResult<()> {
        let mut tx = self.write().await?;
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn list_audit(&self, limit: i64) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query("SELECT * FROM audit_events ORDER BY seq DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(audit_row).collect())
    }

    /// One conditional upsert: of processes claiming at once (the writer lock orders them),
    /// only the first finds the period over.
    async fn claim_job(&self, name: &str, now: i64, period: i64) -> StoreResult<bool> {
        let claimed = sqlx::query(
            "INSERT INTO job_claims (name, next_at) VALUES (?1, ?2 + ?3) \
             ON CONFLICT(name) DO UPDATE SET next_at = ?2 + ?3 WHERE next_at <= ?2",
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

    async fn claim_webhooks(
        &self,
        now: i64,
        claim_until: i64,
        limit: i64,
    ) -> StoreResult<Vec<OutboxItem>> {
        let mut tx = self.write().await?;
        let rows = sqlx::query(
            "SELECT id, event, body, attempts FROM webhook_outbox WHERE delivered_at IS NULL \
             AND failed_at IS NULL AND next_attempt_at <= ? ORDER BY created_at, id LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let items: Vec<OutboxItem> = rows
            .iter()
            .map(|r| OutboxItem {
                id: r.get("id"),
                event: r.get("event"),
                body: r.get("body"),
                attempts: r.get("attempts"),
            })
            .collect();
        for item in &items {
            sqlx::query("UPDATE webhook_outbox SET next_attempt_at = ? WHERE id = ?")
                .bind(claim_until)
                .bind(&item.id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(items)
    }

    async fn webhook_delivered(&self, id: &str, at: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE webhook_outbox SET delivered_at = ?, attempts = attempts + 1, last_error = NULL \
             WHERE id = ?",
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
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?, \
             next_attempt_at = COALESCE(?, next_attempt_at), failed_at = CASE WHEN ? IS NULL THEN ? END \
             WHERE id = ?",
        )
        .bind(error)
        .bind(retry_at)
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
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO operator_tokens (id, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(secret_hash)
        .bind(t.created_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("an operator token with this name"))?;
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn use_operator_token(&self, hash: &str, now: i64) -> StoreResult<Option<OperatorToken>> {
        let row = sqlx::query(
            "UPDATE operator_tokens SET last_used_at = ? WHERE secret_hash = ? AND revoked_at IS NULL \
             RETURNING *",
        )
        .bind(now)
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(row.as_ref().map(operator_token_row))
    }

    async fn list_operator_tokens(&self) -> StoreResult<Vec<OperatorToken>> {
        let rows = sqlx::query("SELECT * FROM operator_tokens ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(rows.iter().map(operator_token_row).collect())
    }

    async fn revoke_operator_token(&self, name: &str, audit: &AuditRecord) -> StoreResult<bool> {
        self.audited(
            sqlx::query(
                "UPDATE operator_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
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
        // One fixed statement per driving filter, so that SQLite walks that filter's index
        // (v4_audit_read.sql) in `seq` order from the cursor down, and stops after `limit`.
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
            .bind(q.limit)
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

    async fn create_approval(
        &self,
        a: &Approval,
        caps: ApprovalCaps,
        audit: &AuditRecord,
    ) -> StoreResult<ApprovalCreated> {
        let mut tx = self.write().await?;
        let existing = sqlx::query(
            "SELECT * FROM approvals WHERE request_hash = ? AND client_id = ? AND user_id = ? \
             AND status = 'pending' AND expires_at > ? ORDER BY created_at LIMIT 1",
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
                "SELECT COUNT(*), MIN(expires_at) FROM approvals WHERE user_id = ? \
                 AND status = 'pending' AND expires_at > ?",
                &a.user_id,
                caps.per_user,
            ),
            (
                "agent",
                "SELECT COUNT(*), MIN(expires_at) FROM approvals WHERE client_id = ? \
                 AND status = 'pending' AND expires_at > ?",
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
             request_hash, status, created_at, expires_at, interval, last_polled_at, decided_by, decided_at, \
             stepped_up, redeemed_at, reason) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(ApprovalCreated::Created)
    }

    async fn approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        self.find("SELECT * FROM approvals WHERE id = ?", id, approval_row)
            .await
    }

    async fn approval_by_req_hash(&self, hash: &str) -> StoreResult<Option<Approval>> {
        self.find(
            "SELECT * FROM approvals WHERE req_hash = ?",
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
            "SELECT * FROM approvals WHERE request_hash = ? AND client_id = ? AND user_id = ? \
             AND status = 'approved' AND expires_at > ? ORDER BY decided_at DESC, id LIMIT 1",
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
            "SELECT * FROM approvals WHERE (?1 IS NULL OR user_id = ?1) AND (?2 IS NULL OR status = ?2) \
             ORDER BY created_at DESC, rowid DESC LIMIT ?3",
        )
        .bind(&f.user_id)
        .bind(f.status.map(ApprovalStatus::as_str))
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows.iter().map(approval_row).collect())
    }

    async fn update_approval(&self, u: &ApprovalUpdate, audit: &AuditRecord) -> StoreResult<bool> {
        self.audited(
            sqlx::query(
                "UPDATE approvals SET status = ?1, \
                 decided_by = COALESCE(?2, decided_by), \
                 decided_at = CASE WHEN ?2 IS NULL THEN decided_at ELSE ?3 END, \
                 stepped_up = stepped_up OR ?4, \
                 expires_at = COALESCE(?5, expires_at), \
                 redeemed_at = CASE WHEN ?6 THEN ?3 ELSE redeemed_at END, \
                 reason = COALESCE(?7, reason) \
                 WHERE id = ?8 AND status = ?9 AND (NOT ?10 OR expires_at > ?3) \
                 AND (NOT ?6 OR redeemed_at IS NULL)",
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
        sqlx::query("UPDATE approvals SET last_polled_at = ?, interval = ? WHERE id = ?")
            .bind(at)
            .bind(interval)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn redeem_ciba_approval(
        &self,
        id: &str,
        at: i64,
        f: &TokenFamily,
        refresh_hash: Option<&str>,
        audits: &[AuditRecord],
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let won = sqlx::query(
            "UPDATE approvals SET status = 'redeemed', redeemed_at = ?1 \
             WHERE id = ?2 AND status = 'approved' AND expires_at > ?1 AND redeemed_at IS NULL",
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
            insert_audit(&mut tx, &self.audit_sink(), audit).await?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    async fn due_approvals(&self, now: i64, limit: i64) -> StoreResult<Vec<Approval>> {
        let rows = sqlx::query(
            "SELECT * FROM approvals WHERE status IN ('pending', 'approved') AND expires_at <= ? \
             ORDER BY expires_at, id LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows.iter().map(approval_row).collect())
    }

    async fn record_session_mfa(&self, hash: &str, at: i64) -> StoreResult<()> {
        sqlx::query("UPDATE sessions SET mfa_at = ? WHERE hash = ?")
            .bind(at)
            .bind(hash)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn approval_row(r: &SqliteRow) -> Approval {
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
        step_up: r.get::<i64, _>("step_up") != 0,
        single_use: r.get::<i64, _>("single_use") != 0,
        request_hash: r.get("request_hash"),
        // An unknown status is read as expired: never usable.
        status: ApprovalStatus::parse(r.get("status")).unwrap_or(ApprovalStatus::Expired),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
        interval: r.get("interval"),
        last_polled_at: r.get("last_polled_at"),
        decided_by: r.get("decided_by"),
        decided_at: r.get("decided_at"),
        stepped_up: r.get::<i64, _>("stepped_up") != 0,
        redeemed_at: r.get("redeemed_at"),
        reason: r.get("reason"),
    }
}

/// The conditions of every audit read, with numbered parameters bound in this order by
/// `query_audit`: ?1 subject user, ?2 agent, ?3 connection, ?4 action, ?5 action prefix,
/// ?6 decision, ?7 since, ?8 until, ?9 before seq (`i64::MAX` for none), ?10 limit. The time
/// and cursor bounds are always set, so the cursor is a range on the index in use.
macro_rules! audit_where {
    () => {
        "(?1 IS NULL OR subject_user = ?1) \
         AND (?2 IS NULL OR (actor_type = 'agent' AND actor_id = ?2) OR agent_id = ?2) \
         AND (?3 IS NULL OR connection = ?3) \
         AND (?4 IS NULL OR action = ?4) \
         AND (?5 IS NULL OR substr(action, 1, length(?5)) = ?5) \
         AND (?6 IS NULL OR decision = ?6) \
         AND at >= ?7 AND at < ?8 AND seq < ?9"
    };
}

macro_rules! audit_select {
    ($drive:literal) => {
        concat!(
            "SELECT * FROM audit_events WHERE ",
            $drive,
            audit_where!(),
            " ORDER BY seq DESC LIMIT ?10"
        )
    };
}

const AUDIT_SCAN: &str = audit_select!("");
const AUDIT_BY_USER: &str = audit_select!("subject_user = ?1 AND ");
const AUDIT_BY_CONNECTION: &str = audit_select!("connection = ?3 AND ");
const AUDIT_BY_ACTION: &str = audit_select!("action = ?4 AND ");
/// The agent as actor or as target: two index walks, each stopping after `limit`, merged.
/// (A row matching both is the same row in both halves, and `UNION` keeps it once.)
const AUDIT_BY_AGENT: &str = concat!(
    "SELECT * FROM (",
    audit_select!("actor_type = 'agent' AND actor_id = ?2 AND "),
    ") UNION SELECT * FROM (",
    audit_select!("agent_id = ?2 AND "),
    ") ORDER BY seq DESC LIMIT ?10"
);

/// `audit_daily_counts`: ?1 action, ?2 subject user (NULL for all), ?3 since. The literal
/// `actor_type` and `decision` terms let SQLite use the partial index `audit_events_agent_daily`
/// (v8_roles.sql), walked as the range (action = ?1, at >= ?3). The day is `at` rounded down
/// to 00:00 UTC (floored, so a time before 1970 too lands on its own day's start).
const AUDIT_DAILY_COUNTS: &str = "SELECT at - ((at % 86400) + 86400) % 86400 AS day, \
     actor_id, COUNT(*) AS count FROM audit_events \
     WHERE action = ?1 AND at >= ?3 AND actor_type = 'agent' AND decision = 'allow' \
     AND (?2 IS NULL OR subject_user = ?2) \
     GROUP BY day, actor_id ORDER BY day, actor_id";

#[cfg(test)]
mod tests;
