//! A token release, in one transaction that holds across nodes what SQLite's single writer
//! gives (`sqlite/release.rs`):
//!
//! 1. The account's lock and the configuration's lock, both **shared** (so releases never wait
//!    for each other): a revocation, a status change or a user's deletion takes the account's
//!    lock exclusively, and every change to the configuration takes the configuration's lock
//!    exclusively (the triggers of `v1_schema.sql`). A change in progress makes the release
//!    wait for its commit; a release in progress makes the change wait for this commit.
//! 2. The configuration revision and the account's status, read *after* the locks are granted
//!    (a statement of its own, so it sees every change that committed before): a revision other
//!    than the one the release was decided at is [`ReleaseError::Stale`], an account that is not
//!    active is [`ReleaseError::AccountInactive`].
//! 3. The `jti`s, as unique inserts (`ON CONFLICT DO NOTHING`), in key order so that two
//!    releases sharing `jti`s never wait for each other crosswise. A `jti` already stored, or
//!    being stored by a release on another node that then commits, is not inserted:
//!    [`ReleaseError::Replay`].
//! 4. The quota slots, one more use each unless at its limit ([`ReleaseError::QuotaReached`]):
//!    an upsert whose row lock makes concurrent releases on any node count one after another,
//!    in key order (as the `jti`s) so that two releases never wait for each other crosswise.
//! 5. The audit entry, under the audit chain's lock (taken last, held to the commit).
//!
//! Nothing is written unless all of it is: any refusal rolls the transaction back. The errors
//! take SQLite's precedence (stale, then replay, then inactive account, then quota).

use super::*;

/// `last_used_at` is kept to this many seconds, as on SQLite: rewriting the account's row on
/// every release would only add writes for a value nobody reads that finely.
const LAST_USED_RESOLUTION: i64 = 60;

pub(super) async fn commit(
    store: &PgStore,
    revision: Option<i64>,
    jtis: &[JtiUse],
    quotas: &[QuotaUse],
    account_id: Option<&str>,
    audit: &AuditRecord,
) -> Result<(), ReleaseError> {
    let mut tx = store.begin().await?;
    // 1. The locks, account before configuration (the order every writer keeps).
    let locking = match (account_id, revision) {
        (Some(account), Some(_)) => Some(
            sqlx::query(
                "SELECT pg_advisory_xact_lock_shared($1, hashtext($2)), \
                 pg_advisory_xact_lock_shared($3, $4)",
            )
            .bind(locks::ACCOUNT)
            .bind(account)
            .bind(locks::GLOBAL)
            .bind(locks::CONFIG),
        ),
        (Some(account), None) => Some(
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1, hashtext($2))")
                .bind(locks::ACCOUNT)
                .bind(account),
        ),
        (None, Some(_)) => Some(
            sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)")
                .bind(locks::GLOBAL)
                .bind(locks::CONFIG),
        ),
        (None, None) => None,
    };
    if let Some(statement) = locking {
        statement.execute(&mut *tx).await.map_err(unavailable)?;
    }
    // 2. What the release depends on, as committed now.
    let (current, active, last_used): (i64, Option<bool>, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT value FROM config_revision WHERE id = 1), \
         a.status = 'active', a.last_used_at \
         FROM (SELECT 1) AS one LEFT JOIN connected_accounts a ON a.id = $1",
    )
    .bind(account_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(unavailable)?;
    if revision.is_some_and(|expected| expected != current) {
        return Err(ReleaseError::Stale(current));
    }
    let active = account_id.is_none() || active == Some(true);
    // Stamp the account's last use before the `jti`s: a release waits for another's row lock
    // only while it holds no `jti` yet, so two releases never wait for each other crosswise.
    if let Some(account) = account_id
        && active
        && last_used.is_none_or(|t| audit.at - t >= LAST_USED_RESOLUTION)
    {
        // Re-checked in the update: of releases that read the same old stamp, the first
        // writes it, and the others (waiting for its row lock meanwhile) leave it.
        sqlx::query(
            "UPDATE connected_accounts SET last_used_at = $1 WHERE id = $2 \
             AND (last_used_at IS NULL OR last_used_at <= $1 - $3)",
        )
        .bind(audit.at)
        .bind(account)
        .bind(LAST_USED_RESOLUTION)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    }
    // 3. The `jti`s.
    if !jtis.is_empty() {
        let mut sorted: Vec<&JtiUse> = jtis.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = sorted.iter().map(|j| j.key.as_str()).collect();
        let expiries: Vec<i64> = sorted.iter().map(|j| j.expires_at).collect();
        let inserted: Vec<String> = sqlx::query_scalar(
            "INSERT INTO used_jtis (key, expires_at) \
             SELECT k, e FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS j(k, e, n) \
             ORDER BY n ON CONFLICT (key) DO NOTHING RETURNING key",
        )
        .bind(keys)
        .bind(expiries)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        if let Some(i) = first_replay(jtis, inserted) {
            return Err(ReleaseError::Replay(i));
        }
    }
    if !active {
        return Err(ReleaseError::AccountInactive);
    }
    // 4. The quota slots.
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by(|&a, &b| quotas[a].key.cmp(&quotas[b].key));
    for i in order {
        let q = &quotas[i];
        let counted = q.limit > 0
            && sqlx::query(
                "INSERT INTO quota_counts (key, window_end, n) VALUES ($1, $2, 1) \
                 ON CONFLICT (key) DO UPDATE SET n = quota_counts.n + 1 \
                 WHERE quota_counts.n < $3",
            )
            .bind(&q.key)
            .bind(q.window_end)
            .bind(i64::from(q.limit))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected()
                == 1;
        if !counted {
            return Err(ReleaseError::QuotaReached(i));
        }
    }
    // 5. The audit entry, and the commit.
    insert_audit(&mut tx, &store.audit.sink(), audit).await?;
    tx.commit().await.map_err(unavailable)?;
    Ok(())
}

/// The index (in the caller's order) of the first `jti` that was not inserted: already used, or
/// the same key again later in the same release (as SQLite, inserting one by one, finds it).
fn first_replay(jtis: &[JtiUse], inserted: Vec<String>) -> Option<usize> {
    let mut fresh: std::collections::HashSet<String> = inserted.into_iter().collect();
    jtis.iter().position(|j| !fresh.remove(&j.key))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn the_first_jti_not_inserted_is_the_replay() {
        let j = |k: &str| JtiUse {
            key: k.into(),
            expires_at: 1,
        };
        let ins = |ks: &[&str]| ks.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        assert_eq!(first_replay(&[j("a"), j("b")], ins(&["b", "a"])), None);
        assert_eq!(first_replay(&[j("a"), j("b")], ins(&["a"])), Some(1));
        assert_eq!(first_replay(&[j("a"), j("b")], ins(&[])), Some(0));
        // The same key twice: the second use is the replay.
        assert_eq!(first_replay(&[j("a"), j("a")], ins(&["a"])), Some(1));
    }
}
