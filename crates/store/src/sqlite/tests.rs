//! What only SQLite has: the file's mode, the query plans its indexes were made for, and its
//! own migrations' upgrades. Everything else the store does is in the conformance suite
//! (`crate::conformance`), run against SQLite and PostgreSQL alike.

use super::*;

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    (dir, s)
}

#[tokio::test]
async fn the_database_file_is_private() {
    let (dir, _s) = store().await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(dir.path().join("t.db"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[tokio::test]
async fn audit_reads_walk_an_index_from_the_cursor() {
    let (_d, s) = store().await;
    for (sql, index) in [
        (AUDIT_BY_USER, "audit_events_subject_user"),
        (AUDIT_BY_CONNECTION, "audit_events_connection"),
        (AUDIT_BY_ACTION, "audit_events_action"),
        (AUDIT_BY_AGENT, "audit_events_agent_actor"),
        (AUDIT_BY_AGENT, "audit_events_agent_target"),
    ] {
        let plan: Vec<String> =
            sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .bind("x")
                .bind("x")
                .bind("x")
                .bind("x")
                .bind("x")
                .bind("x")
                .bind(0_i64)
                .bind(i64::MAX)
                .bind(i64::MAX)
                .bind(10_i64)
                .fetch_all(s.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>("detail"))
                .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains(&format!("USING INDEX {index} (")) && plan.contains("rowid<?"),
            "{sql}\n{plan}"
        );
        assert!(
            !plan.contains("USE TEMP B-TREE FOR ORDER BY") || sql == AUDIT_BY_AGENT,
            "{plan}"
        );
    }
}

#[tokio::test]
async fn daily_counts_walk_an_index_range() {
    let (_d, s) = store().await;
    for user in [Some("usr_a"), None] {
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {AUDIT_DAILY_COUNTS}"
        )))
        .bind("token.release")
        .bind(user)
        .bind(0_i64)
        .fetch_all(s.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("USING COVERING INDEX audit_events_agent_daily (action=? AND at>?)"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN audit_events"), "{plan}");
    }
}

#[tokio::test]
async fn users_from_before_roles_become_users() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let s = SqliteStore::open(&path).await.unwrap();
    // Back to version 7, with a user written then.
    sqlx::raw_sql(
        "DROP TABLE quota_counts; DROP TABLE job_claims; DELETE FROM schema_migrations WHERE version = 9; \
         DROP INDEX audit_events_agent_daily; ALTER TABLE users DROP COLUMN role; \
         DELETE FROM schema_migrations WHERE version = 8; \
         INSERT INTO users (id, username, created_at) VALUES ('usr_old', 'old', 1);",
    )
    .execute(s.pool())
    .await
    .unwrap();
    s.pool().close().await;
    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(
        s.user_by_id("usr_old").await.unwrap().unwrap().role,
        Role::User
    );
}
