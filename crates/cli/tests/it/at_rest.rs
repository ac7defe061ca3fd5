//! Secrets at rest: no plaintext in the database files (WAL included) or in a `pg_dump` of the
//! PostgreSQL database, ciphertexts bound to their row, a wrong key refuses to start, and keys
//! rotate while serving.

use base64::Engine;
use latchkey_core::model::Role;
use latchkey_core::vault::{Actor, NewConnection};
use serde_json::json;

use crate::harness::*;

fn encodings(secret: &str) -> Vec<Vec<u8>> {
    let b = secret.as_bytes();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    vec![
        b.to_vec(),
        base64::engine::general_purpose::STANDARD
            .encode(b)
            .into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(b)
            .into_bytes(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        b.iter().flat_map(|c| [*c, 0]).collect(), // UTF-16LE
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_secret_in_the_database_files() {
    no_plaintext_secret(Backend::Sqlite).await;
}

/// The same secrets, looked for in a full `pg_dump` of the database (schema and data; sealed
/// columns come out as hex, so a secret stored as plain bytes would be found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_secret_in_pg_dump_on_postgresql() {
    no_plaintext_secret(Backend::Postgres).await;
}

/// What the database holds, as (where, bytes): SQLite's files (the WAL included), or a dump
/// of the PostgreSQL database.
fn database_contents(ts: &TestServer) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    match &ts.config.database_url {
        None => {
            for suffix in ["", "-wal", "-shm"] {
                let path = format!("{}{suffix}", ts.db_path().display());
                if let Ok(bytes) = std::fs::read(&path) {
                    files.push((path, bytes));
                }
            }
            assert!(
                files
                    .iter()
                    .any(|(p, b)| p.ends_with("-wal") && !b.is_empty()),
                "the WAL is scanned too"
            );
        }
        Some(url) => {
            let out = std::process::Command::new("pg_dump")
                .args(["--no-owner", "--dbname", url])
                .output()
                .expect("pg_dump (PostgreSQL's client tools) is installed");
            assert!(
                out.status.success(),
                "pg_dump: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dump = out.stdout;
            // The dump is whole: the audit trail and the sealed columns are in it.
            let text = String::from_utf8_lossy(&dump);
            assert!(text.contains("COPY public.audit_events"), "{text}");
            assert!(text.contains("COPY public.connected_accounts"), "{text}");
            files.push(("pg_dump".to_owned(), dump));
        }
    }
    files
}

async fn no_plaintext_secret(backend: Backend) {
    let (ts, db) = TestServer::start_on(backend).await;
    ts.connect_demo_account().await;
    // Canaries: an upstream client secret we choose, the demo provider's client secret, and
    // the upstream access tokens the vault holds (read back through exchanges).
    let canary = format!("canary-{}", uuid::Uuid::new_v4());
    ts.vault
        .add_connection(
            NewConnection {
                name: "canary".into(),
                provider: "oauth2".into(),
                client_id: "c".into(),
                client_secret: Some(canary.clone().into()),
                authorize_url: "https://idp.example/authorize".into(),
                token_url: "https://idp.example/token".into(),
                revoke_url: None,
                userinfo_url: None,
                api_base_url: None,
                issuer: None,
                scopes: Default::default(),
                keep_alive_secs: None,
            },
            &Actor::cli(),
        )
        .await
        .unwrap();
    let first = ts.post_form(&ts.exchange_params()).await.token().to_owned();
    ts.clock.advance(301);
    let refreshed = ts.post_form(&ts.exchange_params()).await.token().to_owned();
    let demo_secret = latchkey_server::demo::demo_client_secret(&ts.vault)
        .await
        .unwrap();
    // A TOTP seed, as base32 (what the user's app holds).
    let out = ts.cli(&["user", "mfa", "demo", "--json"]);
    let uri: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let totp_secret = uri["otpauth_uri"]
        .as_str()
        .unwrap()
        .split("secret=")
        .nth(1)
        .unwrap();
    let totp_secret = totp_secret.split('&').next().unwrap().to_owned();

    let files = database_contents(&ts);
    for secret in [&canary, &first, &refreshed, &demo_secret, &totp_secret] {
        for needle in encodings(secret) {
            for (path, bytes) in &files {
                assert!(
                    !contains(bytes, &needle),
                    "a secret is in {path} in plaintext"
                );
            }
        }
    }
    // Sanity check of the scan itself: non-secret values are found.
    assert!(
        files
            .iter()
            .any(|(_, b)| contains(b, ts.info.user_id.as_bytes()))
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for (path, _) in files.iter().filter(|_| backend == Backend::Sqlite) {
            assert_eq!(
                std::fs::metadata(path).unwrap().permissions().mode() & 0o077,
                0,
                "{path} is private"
            );
        }
        let kek = std::fs::metadata(ts.config.data_dir.join("kek")).unwrap();
        assert_eq!(kek.permissions().mode() & 0o777, 0o600);
    }
    ts.stop().await;
    drop(db);
}

/// Issue 12 item 5, the suite-wide canary scan: every upstream code, access and refresh token
/// the test providers issue starts with a canary prefix, and every in-process server of every
/// test (the harness) checks, as it stops, that none is in what the servers logged (captured at
/// debug level), in an error body or page the test read, or in its SQLite files. This test
/// shows the parts work: the demo provider's tokens carry the prefix, the capture holds the
/// servers' log lines, and the scanner finds a planted secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_wide_canary_scan_sees_logs_tokens_and_plants() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    let refresh = ts.stored_refresh_token(&account).await;
    assert!(refresh.starts_with("lkdemo_rt_"), "{refresh}");
    let answer = ts.post_form(&ts.exchange_params()).await;
    assert!(answer.token().starts_with("lkdemo_at_"));
    assert!(
        captured_logs_contain("latchkey"),
        "the servers' log lines are captured"
    );
    let planted = format!("refresh failed: {refresh}");
    let found = std::panic::catch_unwind(|| {
        latchkey_testkit::assert_no_canary("a planted line", planted.as_bytes())
    });
    assert!(found.is_err(), "the scanner finds a planted refresh token");
    for prefix in latchkey_testkit::CANARY_PREFIXES {
        let planted = format!("xx{prefix}at_abc");
        assert!(
            std::panic::catch_unwind(|| {
                latchkey_testkit::assert_no_canary("a planted line", planted.as_bytes())
            })
            .is_err()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ciphertext_moved_to_another_row_does_not_open() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    let bob = ts
        .vault
        .add_user("bob", None, Role::User, &Actor::cli())
        .await
        .unwrap();
    // Copy the demo user's account row, sealed tokens included, to bob.
    let pool = ts.sql_pool().await;
    sqlx::query(
        "INSERT INTO connected_accounts (id, user_id, connection_id, upstream_account_id, scopes, access_token, \
         access_expires_at, refresh_token, status, created_at, updated_at, token_version) \
         SELECT 'cac_stolen', ?, connection_id, upstream_account_id, scopes, access_token, access_expires_at, \
         refresh_token, status, created_at, updated_at, token_version FROM connected_accounts WHERE id = ?",
    )
    .bind(&bob.id)
    .bind(&account)
    .execute(&pool)
    .await
    .unwrap();
    let releases = ts.releases().await;
    let params = ts.params_with(ts.subject(json!({"sub": bob.id})), ts.assertion(json!({})));
    let resp = ts
        .http
        .post(ts.url("/oauth/token"))
        .form(&params)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (500, Some("server_error")),
        "{body}"
    );
    assert!(body.get("access_token").is_none());
    assert_eq!(ts.releases().await, releases, "nothing released for bob");
    // The rightful owner is unaffected.
    ts.post_form(&ts.exchange_params()).await.token();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_refuses_to_start_and_the_right_one_restarts() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    // One exchange stores a narrowed token; after the restart it is served from the vault (the
    // demo provider itself keeps its state in memory and forgets it on restart).
    let token = ts.post_form(&ts.exchange_params()).await.token().to_owned();
    let (dir, config) = ts.stop().await;

    // A different key: refused, with a message that says why and what to do.
    let wrong = latchkey_crypto::envelope::Kek::generate()
        .encode()
        .to_string();
    let bad = latchkey_server::Config {
        kek: Some(wrong.clone()),
        ..config.clone()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = latchkey_server::Server::with_listener(&bad, listener, Default::default())
        .await
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("sealed") && msg.contains("does not open this database"),
        "{msg}"
    );

    // The CLI refuses the same way.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["account", "list", "--data-dir"])
        .arg(&config.data_dir)
        .env("LATCHKEY_KEK", &wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sealed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A missing key file: refused too, never a fresh key over an existing database.
    let kek_file = config.data_dir.join("kek");
    let saved = std::fs::read(&kek_file).unwrap();
    std::fs::remove_file(&kek_file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = latchkey_server::Server::with_listener(&config, listener, Default::default())
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("sealed"), "{err:#}");
    std::fs::write(&kek_file, saved).unwrap();

    // The right key: everything is still there.
    let ts = TestServer::start_with(dir, config).await;
    assert_eq!(ts.post_form(&ts.exchange_params()).await.token(), token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_while_serving() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let version_of = |blob: &[u8]| latchkey_crypto::envelope::blob_version(blob).unwrap();

    let out = ts.cli(&["key", "rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let accounts = ts.vault.store().list_accounts(None).await.unwrap();
    assert_eq!(
        version_of(accounts[0].refresh_token.as_deref().unwrap()),
        2,
        "re-sealed under data key v2"
    );
    // The running server loads the new data key on first sight.
    ts.post_form(&ts.exchange_params()).await.token();

    let old_kek = std::fs::read(ts.config.data_dir.join("kek")).unwrap();
    let out = ts.cli(&["key", "rotate", "--kek"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        std::fs::read(ts.config.data_dir.join("kek")).unwrap(),
        old_kek
    );
    ts.post_form(&ts.exchange_params()).await.token();
    // A restart with the new key file opens everything.
    let (dir, config) = ts.stop().await;
    let ts = TestServer::start_with(dir, config).await;
    ts.post_form(&ts.exchange_params()).await.token();
    let audit = ts.vault.store().list_audit(1000).await.unwrap();
    assert!(audit.iter().any(|e| e.record.action == "key.rotate"));
    assert!(audit.iter().any(|e| e.record.action == "key.rotate_kek"));
}
