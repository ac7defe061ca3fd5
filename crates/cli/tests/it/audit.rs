//! The audit trail: fail closed (nothing is released without its entry), and tamper evidence
//! (the MAC chain and signed checkpoints name the first bad entry), on SQLite and on
//! PostgreSQL alike.

use std::path::{Path, PathBuf};

use latchkey_server::Config;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audit_no_token() {
    no_audit_no_token_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audit_no_token_on_postgresql() {
    no_audit_no_token_on(Backend::Postgres).await;
}

/// A trigger that refuses every audit insert (the audit sink down), and the statement that
/// removes it.
fn audit_fault(backend: Backend) -> (&'static str, &'static str) {
    match backend {
        Backend::Sqlite => (
            "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'audit sink down'); END",
            "DROP TRIGGER audit_down",
        ),
        Backend::Postgres => (
            "CREATE FUNCTION audit_down() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'audit sink down'; END $$; \
             CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
             FOR EACH ROW EXECUTE FUNCTION audit_down();",
            "DROP TRIGGER audit_down ON audit_events; DROP FUNCTION audit_down();",
        ),
    }
}

async fn no_audit_no_token_on(backend: Backend) {
    let (ts, db) = TestServer::start_on(backend).await;
    ts.connect_demo_account().await;
    let sql = ts.sql().await;
    let jtis = || sql.scalar("SELECT COUNT(*) FROM used_jtis");
    let (fault, repair) = audit_fault(backend);
    sql.execute(fault).await;
    let (releases, used) = (ts.releases().await, jtis().await);
    for _ in 0..5 {
        let a = ts.post_form(&ts.exchange_params()).await;
        a.assert_error(503, "temporarily_unavailable");
        assert!(a.headers.get("retry-after").is_some());
        assert!(a.body.get("access_token").is_none());
    }
    assert_eq!(
        (ts.releases().await, jtis().await),
        (releases, used),
        "the jti was not consumed either"
    );

    sql.execute(repair).await;
    ts.post_form(&ts.exchange_params()).await.token();
    assert_eq!(ts.releases().await, releases + 1);
    // No gap: the chain verifies end to end.
    let v = ts.vault.verify_audit(None).await.unwrap().unwrap();
    let max = sql.scalar("SELECT MAX(seq) FROM audit_events").await;
    assert_eq!((v.entries as i64, v.last_seq), (max, Some(max)));
    sql.close().await;
    ts.stop().await;
    drop(db);
}

/// `latchkey audit verify` on a data directory (and, on PostgreSQL, a database): success, and
/// what it printed.
fn verify(
    data_dir: &Path,
    database_url: Option<&str>,
    checkpoint: Option<&Path>,
) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
    cmd.args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .env_remove("LATCHKEY_KEK")
        .env_remove("LATCHKEY_DATABASE_URL");
    if let Some(url) = database_url {
        cmd.env("LATCHKEY_DATABASE_URL", url);
    }
    if let Some(c) = checkpoint {
        cmd.arg("--checkpoint").arg(c);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A tampered copy of a stopped server's database.
struct Tampered {
    /// SQLite: the copied data directory, database and key file.
    _copy: Option<tempfile::TempDir>,
    data_dir: PathBuf,
    /// PostgreSQL: the copied database (the key file stays in the original data directory).
    db: Option<PgDatabase>,
}

impl Tampered {
    fn verify(&self, checkpoint: Option<&Path>) -> (bool, String) {
        verify(
            &self.data_dir,
            self.db.as_ref().map(|d| d.url.as_str()),
            checkpoint,
        )
    }
}

/// A copy of the stopped server's database (`original`: its PostgreSQL database, if any) with
/// `sql` applied to it.
async fn tampered(config: &Config, original: Option<&PgDatabase>, sql: &str) -> Tampered {
    let tampered = match original {
        None => {
            let copy = tempfile::tempdir().unwrap();
            let data = copy.path().join("data");
            std::fs::create_dir(&data).unwrap();
            for entry in std::fs::read_dir(&config.data_dir).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_file() {
                    std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
                }
            }
            Tampered {
                _copy: Some(copy),
                data_dir: data,
                db: None,
            }
        }
        Some(db) => Tampered {
            _copy: None,
            data_dir: config.data_dir.clone(),
            db: Some(db.copy().await),
        },
    };
    let pool = Sql::connect(&Config {
        data_dir: tampered.data_dir.clone(),
        database_url: tampered.db.as_ref().map(|d| d.url.clone()),
        ..Config::default()
    })
    .await;
    pool.execute(sql).await;
    pool.close().await;
    tampered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_named_by_audit_verify() {
    tampering_is_named_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_named_by_audit_verify_on_postgresql() {
    tampering_is_named_on(Backend::Postgres).await;
}

async fn tampering_is_named_on(backend: Backend) {
    let (ts, db) = TestServer::start_on(backend).await;
    ts.connect_demo_account().await;
    for _ in 0..4 {
        ts.post_form(&ts.exchange_params()).await.token();
    }
    let outside = tempfile::tempdir().unwrap();
    let exported = outside.path().join("checkpoint.json");
    let out = ts.cli(&["audit", "checkpoint", "--out", exported.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let cp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&exported).unwrap()).unwrap();
    let (dir, config) = ts.stop().await;
    let data = config.data_dir.clone();
    let url = config.database_url.as_deref();
    let last = cp["seq"].as_i64().unwrap();
    assert!(last >= 8, "enough entries to tamper with: {last}");

    let (ok, text) = verify(&data, url, Some(&exported));
    assert!(ok, "the untouched database verifies: {text}");
    assert!(text.contains(&format!("{last} entries")), "{text}");

    let mid = last / 2;
    let cases = [
        (
            "edit a field",
            format!("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = {mid}"),
            mid,
        ),
        (
            "delete a row",
            format!("DELETE FROM audit_events WHERE seq = {mid}"),
            mid,
        ),
        (
            "swap two rows",
            format!(
                "UPDATE audit_events SET seq = -1 WHERE seq = {mid}; \
                 UPDATE audit_events SET seq = {mid} WHERE seq = {n}; \
                 UPDATE audit_events SET seq = {n} WHERE seq = -1;",
                n = mid + 2
            ),
            mid,
        ),
        (
            "insert a forged row",
            format!(
                "INSERT INTO audit_events (seq, at, actor_type, actor_id, auth_method, action, decision, mac) \
                 SELECT {n}, at, 'operator', 'local', 'cli', 'agent.delete', 'allow', mac \
                 FROM audit_events WHERE seq = {last}",
                n = last + 1
            ),
            last + 1,
        ),
        (
            "truncate the tail (checkpoints in the database deleted too)",
            format!(
                "DELETE FROM audit_events WHERE seq > {n}; DELETE FROM audit_checkpoints;",
                n = last - 3
            ),
            last - 2,
        ),
    ];
    for (what, sql, first_bad) in cases {
        let copy = tampered(&config, db.as_ref(), &sql).await;
        let (ok, text) = copy.verify(Some(&exported));
        assert!(!ok, "{what}: verify must fail");
        assert!(
            text.contains(&format!("BROKEN at entry {first_bad}:")),
            "{what}: expected entry {first_bad} named: {text}"
        );
    }
    // Truncation with the database's own checkpoint left in place is caught without the
    // exported one; the exported one must be this vault's.
    let truncated = tampered(
        &config,
        db.as_ref(),
        &format!("DELETE FROM audit_events WHERE seq > {}", last - 3),
    )
    .await;
    let (ok, text) = truncated.verify(None);
    assert!(
        !ok && text.contains(&format!("BROKEN at entry {}:", last - 2)),
        "{text}"
    );
    let mut forged_cp = cp.clone();
    forged_cp["at"] = serde_json::json!(cp["at"].as_i64().unwrap() + 1);
    let forged_path = outside.path().join("forged.json");
    std::fs::write(&forged_path, forged_cp.to_string()).unwrap();
    let (ok, text) = verify(&data, url, Some(&forged_path));
    assert!(!ok && text.contains("not signed by this vault"), "{text}");
    drop(truncated);
    drop(db);
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_behind_a_signed_checkpoint() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
    let pool = ts.sql_pool().await;
    let max = || async {
        sqlx::query_scalar::<_, i64>("SELECT MAX(seq) FROM audit_events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let old_head = max().await;
    ts.clock.advance(2 * 86_400);
    ts.post_form(&ts.exchange_params()).await.token();

    let pruned = ts.vault.prune_audit(ts.now() - 86_400).await.unwrap();
    assert_eq!(pruned, old_head as u64, "everything older than a day");
    let first: i64 = sqlx::query_scalar("SELECT MIN(seq) FROM audit_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(first, old_head + 1);
    let v = ts.vault.verify_audit(None).await.unwrap().unwrap();
    assert_eq!(v.last_seq, Some(max().await));
    assert_eq!(ts.vault.prune_audit(ts.now() - 86_400).await.unwrap(), 0);

    // Deleting more from the front is not a pruning: verify refuses.
    sqlx::query("DELETE FROM audit_events WHERE seq = ?")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    let broken = ts.vault.verify_audit(None).await.unwrap().unwrap_err();
    assert_eq!(broken.seq, 1, "{broken}");
    pool.close().await;
}
