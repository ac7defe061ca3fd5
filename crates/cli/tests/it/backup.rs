//! `latchkey backup`: an online backup taken while the server answers exchanges, restored into
//! a fresh data directory with the same key file, and served from there (`docs/operations.md`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine;
use latchkey_core::model::AccountStatus;

use crate::harness::*;

/// The `latchkey` binary on a data directory no server runs on.
fn latchkey(data_dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("LATCHKEY_KEK")
        .env_remove("LATCHKEY_DATABASE_URL")
        .output()
        .unwrap()
}

/// The entry count in `… N entries (last …)`, as `backup` and `audit verify` print it.
fn entries(printed: &str) -> usize {
    let before = printed
        .split(" entries")
        .next()
        .unwrap_or_else(|| panic!("no entry count in {printed}"));
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no entry count in {printed}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_restores_into_a_fresh_data_dir() {
    let ts = Arc::new(TestServer::start().await);
    let account = ts.connect_demo_account().await;
    // The token the vault caches for the grant; after the restore it is served from the
    // backup (the restored server's demo provider is new and knows no tokens).
    let token = ts.post_form(&ts.exchange_params()).await.token().to_owned();

    // A long read transaction (a slow report, say) keeps the server's checkpoints from
    // copying later commits into the database file: they stay in `latchkey.db-wal`. A copy
    // of the file alone would lose them; the backup must not.
    let pool = ts.sql_pool().await;
    let mut pin = pool.begin().await.unwrap();
    let _: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_events")
        .fetch_one(&mut *pin)
        .await
        .unwrap();

    // Writes while the backup runs: exchanges, each a consumed `jti` and an audit entry
    // committed before it is answered.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let (ts, stop, done) = (ts.clone(), stop.clone(), done.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                ts.post_form(&ts.exchange_params()).await.token();
                done.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    while done.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let out = ts.dir.path().join("backup.db");
    let released_before = ts.releases().await;
    let writes_before = done.load(Ordering::SeqCst);
    let printed = tokio::task::spawn_blocking({
        let (ts, out) = (ts.clone(), out.clone());
        move || ts.cli_ok(&["backup", "--out", out.to_str().unwrap()])
    })
    .await
    .unwrap();
    let writes_during = done.load(Ordering::SeqCst) - writes_before;
    let released_after = ts.releases().await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    pin.rollback().await.unwrap();
    pool.close().await;
    assert!(
        writes_during > 0,
        "the server kept answering exchanges while the backup ran"
    );
    let in_backup = entries(&printed);
    assert!(printed.contains("audit chain verifies"), "{printed}");
    assert!(printed.contains("is NOT in it"), "{printed}");

    // The backup is one file, owner-only, without the key-encryption key.
    let bytes = std::fs::read(&out).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let kek_text = std::fs::read_to_string(ts.config.data_dir.join("kek")).unwrap();
    let kek_raw = base64::engine::general_purpose::STANDARD
        .decode(kek_text.trim())
        .unwrap();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(kek_text.trim().as_bytes()) && !contains(&kek_raw));
    for side in ["-wal", "-shm"] {
        let mut name = out.clone().into_os_string();
        name.push(side);
        assert!(!Path::new(&name).exists(), "{side} file beside the backup");
    }
    // An existing file is never overwritten.
    let again = ts.cli(&["backup", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    // After the backup, the source moves on: the account is revoked there.
    ts.cli_ok(&["account", "revoke", &account]);
    let source_entries = entries(&ts.cli_ok(&["audit", "verify"]));
    assert!(source_entries > in_backup);
    let ts = Arc::into_inner(ts).expect("the writer is done");
    let (old_dir, config) = ts.stop().await;

    // Restore into a fresh data directory: the backup as latchkey.db, and the same key file.
    // (`demo.json` is the demo's own note of its user and agent, so the restored demo server
    // does not seed new ones; the agent's key stays where it is, with the agent.)
    let fresh = tempfile::tempdir().unwrap();
    let data = fresh.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(&out, data.join("latchkey.db")).unwrap();
    std::fs::copy(config.data_dir.join("demo.json"), data.join("demo.json")).unwrap();

    // Without the key file the backup opens nothing: sealed.
    let sealed = latchkey(&data, &["audit", "verify"]);
    assert!(!sealed.status.success());
    let why = String::from_utf8_lossy(&sealed.stderr);
    assert!(why.contains("sealed"), "{why}");
    assert!(!data.join("kek").exists(), "no new key is made up for it");

    std::fs::copy(config.data_dir.join("kek"), data.join("kek")).unwrap();
    let restored = TestServer::start_with(
        fresh,
        latchkey_server::Config {
            data_dir: data,
            ..config.clone()
        },
    )
    .await;
    let verified = restored.cli_ok(&["audit", "verify"]);
    assert_eq!(
        entries(&verified),
        in_backup,
        "the restored chain verifies with the backup's entries: {verified}"
    );
    // One moment between the backup's start and its end: every release acknowledged before
    // it started, none that had not been by its end.
    let released = restored.releases().await;
    assert!(
        (released_before..=released_after).contains(&released),
        "{released} releases restored; {released_before} before the backup, {released_after} after"
    );

    // The account revoked after the backup is connected in the restored vault, and an
    // exchange with the restored account serves the stored token.
    let stored = restored
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .expect("the account is in the backup");
    assert_eq!(stored.status, AccountStatus::Active);
    let answer = restored.post_form(&restored.exchange_params()).await;
    assert_eq!(answer.token(), token);
    assert_eq!(
        entries(&restored.cli_ok(&["audit", "verify"])),
        in_backup + 1,
        "the exchange on the restored vault continues its chain"
    );
    restored.stop().await;
    drop(old_dir);
}

#[test]
fn postgresql_is_refused_with_a_pointer_to_pg_dump() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("backup.db");
    let answer = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["backup", "--out", out.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("LATCHKEY_KEK")
        .env(
            "LATCHKEY_DATABASE_URL",
            "postgres://latchkey:hunter2@db.internal:5432/latchkey",
        )
        .output()
        .unwrap();
    assert!(!answer.status.success());
    let why = String::from_utf8_lossy(&answer.stderr);
    assert!(
        why.contains("PostgreSQL") && why.contains("pg_dump"),
        "{why}"
    );
    assert!(
        !why.contains("hunter2"),
        "no password in the message: {why}"
    );
    assert!(!out.exists());
}
