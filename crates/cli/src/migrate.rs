//! `latchkey migrate --from sqlite:PATH --to postgres://…`: move a deployment from its SQLite
//! file to an empty PostgreSQL database.
//!
//! 1. The source's audit chain is verified (with the deployment's key-encryption key); a
//!    source that does not verify is not moved.
//! 2. The target is migrated to the current schema and must hold nothing yet.
//! 3. Every table is copied, row by row and column by column, in one PostgreSQL transaction
//!    (the configuration revision excepted: the target keeps counting its own). Column types
//!    follow the target's schema; ciphertexts are copied as they are (their AAD names table,
//!    column and row, which do not change), so the same key opens them.
//! 4. The target's audit chain is verified and must hold exactly the source's entries.

use anyhow::{Context, Result, bail};
use clap::Args;
use latchkey_server::config::Config;
use sqlx::{Row, ValueRef};

/// The tables, parents before children (the order of the PostgreSQL schema).
const TABLES: &[&str] = &[
    "data_keys",
    "server_secrets",
    "users",
    "connections",
    "connected_accounts",
    "scoped_tokens",
    "agents",
    "agent_keys",
    "grants",
    "used_jtis",
    "auth_codes",
    "token_families",
    "refresh_tokens",
    "sessions",
    "connect_flows",
    "account_connects",
    "audit_events",
    "audit_checkpoints",
    "webhook_outbox",
    "operator_tokens",
    "approvals",
    "quota_counts",
    "job_claims",
];

#[derive(Args)]
pub struct MigrateArgs {
    /// The SQLite database to move (`sqlite:PATH`).
    #[arg(long)]
    from: String,
    /// The empty PostgreSQL database to move it to (`postgres://USER@HOST:PORT/DB`).
    #[arg(long)]
    to: String,
}

pub async fn run(config: &Config, args: MigrateArgs) -> Result<()> {
    let source = Config {
        database_url: Some(args.from.clone()),
        ..config.clone()
    };
    let target = Config {
        database_url: Some(args.to.clone()),
        ..config.clone()
    };
    let latchkey_server::config::Database::Sqlite(path) =
        source.database().map_err(anyhow::Error::msg)?
    else {
        bail!("--from must be sqlite:PATH");
    };
    let latchkey_server::config::Database::Postgres(url) =
        target.database().map_err(anyhow::Error::msg)?
    else {
        bail!("--to must be postgres://…");
    };
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }

    let before = crate::admin_vault(&source)
        .await?
        .verify_audit(None)
        .await
        .map_err(|e| anyhow::anyhow!("reading the source's audit trail: {e}"))?
        .map_err(|e| {
            anyhow::anyhow!("the source's audit chain does not verify, so it is not moved: {e}")
        })?;
    println!(
        "source {}: audit chain verified ({} entries)",
        path.display(),
        before.entries
    );

    let store = latchkey_store::PgStore::connect(&url, config.database_pool_size)
        .await
        .context("opening the target")?;
    let pg = store.pool().clone();
    let sqlite = sqlx::SqlitePool::connect(&format!("sqlite:{}?mode=ro", path.display()))
        .await
        .context("opening the source read-only")?;
    let mut tx = pg.begin().await?;
    for table in TABLES {
        let (n,): (i64,) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(&mut *tx)
                .await?;
        if n > 0 {
            bail!("the target is not empty ({table} holds {n} rows); migrate into a new database");
        }
    }
    let mut copied = 0u64;
    for table in TABLES {
        copied += copy_table(&sqlite, &mut tx, table).await?;
    }
    tx.commit().await.context("committing the copy")?;
    sqlite.close().await;
    drop(store);
    println!(
        "copied {copied} rows into {}",
        target.database().map_err(anyhow::Error::msg)?.describe()
    );

    let after = crate::admin_vault(&target)
        .await?
        .verify_audit(None)
        .await
        .map_err(|e| anyhow::anyhow!("reading the target's audit trail: {e}"))?
        .map_err(|e| anyhow::anyhow!("the target's audit chain does not verify: {e}"))?;
    if after.entries != before.entries || after.last_seq != before.last_seq {
        bail!(
            "the target's audit trail differs: {} entries up to {:?}, the source had {} up to {:?}",
            after.entries,
            after.last_seq,
            before.entries,
            before.last_seq
        );
    }
    println!(
        "target: audit chain verified ({} entries, the same as the source). Point database_url at it; \
         keep the key file (or LATCHKEY_KEK_FILE) with every node.",
        after.entries
    );
    Ok(())
}

/// Copy one table: the target's columns (its schema says the types), read from the source
/// by name. An identity column (`approvals.ord`) takes the source's `rowid`, and its sequence
/// continues after the largest.
async fn copy_table(
    sqlite: &sqlx::SqlitePool,
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
) -> Result<u64> {
    let columns: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_identity = 'YES' FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(&mut **tx)
    .await?;
    if columns.is_empty() {
        bail!("the target has no table {table}");
    }
    let select: Vec<String> = columns
        .iter()
        .map(|(name, _, identity)| {
            if *identity {
                format!("rowid AS {name}")
            } else {
                name.clone()
            }
        })
        .collect();
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM {table}",
        select.join(", ")
    )))
    .fetch_all(sqlite)
    .await
    .with_context(|| format!("reading {table} from the source"))?;
    let names: Vec<&str> = columns.iter().map(|(n, _, _)| n.as_str()).collect();
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    let identity = columns.iter().any(|(_, _, id)| *id);
    let insert = format!(
        "INSERT INTO {table} ({}) {}VALUES ({})",
        names.join(", "),
        if identity {
            "OVERRIDING SYSTEM VALUE "
        } else {
            ""
        },
        placeholders.join(", ")
    );
    for row in &rows {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(insert.clone()));
        for (i, (name, ty, _)) in columns.iter().enumerate() {
            let null = row.try_get_raw(i)?.is_null();
            q = match ty.as_str() {
                "boolean" => q.bind((!null).then(|| row.get::<i64, _>(i) != 0)),
                "bigint" | "integer" | "smallint" => q.bind((!null).then(|| row.get::<i64, _>(i))),
                "bytea" => q.bind((!null).then(|| row.get::<Vec<u8>, _>(i))),
                "text" | "character varying" => q.bind((!null).then(|| row.get::<String, _>(i))),
                other => bail!("{table}.{name}: no copy rule for the column type `{other}`"),
            };
        }
        q.execute(&mut **tx)
            .await
            .with_context(|| format!("writing a row of {table}"))?;
    }
    if let Some((name, _, _)) = columns.iter().find(|(_, _, id)| *id) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT setval(pg_get_serial_sequence('{table}', '{name}'), \
             GREATEST((SELECT MAX({name}) FROM {table}), 1))"
        )))
        .execute(&mut **tx)
        .await?;
    }
    Ok(rows.len() as u64)
}
