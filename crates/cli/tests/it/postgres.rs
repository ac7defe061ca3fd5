//! The whole vault on PostgreSQL (`database_url = postgres://…`): the same server, CLI and
//! flows as on SQLite, on a fresh database of the machine's PostgreSQL (127.0.0.1:5432, or
//! `LATCHKEY_TEST_PG_URL`). The store's own conformance suite (`crates/store`) covers every
//! method on both backends; this shows the server wired to it.

use latchkey_server::config::Config;
use sqlx::Connection;

use crate::harness::*;

/// A new, empty database; its URL.
async fn fresh_database() -> String {
    let admin = std::env::var("LATCHKEY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {admin} is needed for this test ({e}); start it with \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
            )
        });
    let name = format!("lk_it_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_path(&name);
    url.to_string()
}

async fn drop_database(url: &str) {
    let mut admin = url::Url::parse(url).unwrap();
    let name = admin.path().trim_start_matches('/').to_owned();
    admin.set_path("postgres");
    if let Ok(mut conn) = sqlx::PgConnection::connect(admin.as_str()).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_runs_on_postgresql() {
    let url = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        database_url: Some(url.clone()),
        ..Config::default()
    };
    let ts = TestServer::start_with(dir, config).await;
    // Nothing of the vault in the data directory but keys and certificates.
    assert!(!ts.config.data_dir.join("latchkey.db").exists());

    let account = ts.connect_demo_account().await;
    let params = ts.exchange_params();
    let answer = ts.post_form(&params).await;
    let (status, user) = ts.demo_api(answer.token(), "user").await;
    assert_eq!(
        (status.as_u16(), user["login"].as_str()),
        (200, Some("octo-demo"))
    );
    // Single use across the database: the same request again is refused.
    ts.post_form(&params)
        .await
        .assert_error(401, "invalid_client");
    // The proxy and the CLI work the same.
    let token = ts.agent_token().await;
    let resp = ts
        .http
        .get(ts.url("/proxy/demo-git/user"))
        .bearer_auth(&token)
        .header("latchkey-user", &ts.info.username)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let listed = ts.cli_ok(&["account", "list"]);
    assert!(listed.contains(&account), "{listed}");
    ts.cli_ok(&["account", "revoke", &account]);
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");

    // The trail verifies, and the upstream token is nowhere in the database's audit rows.
    let v = ts.vault.verify_audit(None).await.unwrap().unwrap();
    assert!(v.entries > 0, "{v:?}");
    let entries = ts.vault.store().list_audit(1000).await.unwrap();
    let upstream = answer.token();
    assert!(entries.iter().all(|e| !format!("{e:?}").contains(upstream)));

    // A restart finds everything where it was (the key file opens the database).
    let (dir, config) = ts.stop().await;
    let ts = TestServer::start_with(dir, config).await;
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");
    ts.stop().await;
    drop_database(&url).await;
}

/// `latchkey migrate` moves a SQLite deployment to PostgreSQL: the audit chain verifies before
/// and after, the server then runs on the copy with the same key file, and a target that is
/// not empty is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_deployment_moves_to_postgresql() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    let released = ts.post_form(&ts.exchange_params()).await;
    let upstream = released.token().to_owned();
    let sqlite_path = ts.db_path();
    let entries_before = ts.vault.verify_audit(None).await.unwrap().unwrap().entries;
    let (dir, config) = ts.stop().await;

    let url = fresh_database().await;
    let migrate = |to: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(["migrate", "--from"])
            .arg(format!("sqlite:{}", sqlite_path.display()))
            .args(["--to", to, "--data-dir"])
            .arg(&config.data_dir)
            .env_remove("LATCHKEY_KEK")
            .env_remove("LATCHKEY_DATABASE_URL")
            .output()
            .unwrap()
    };
    let out = migrate(&url);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("audit chain verified ({entries_before} entries")),
        "{stdout}"
    );
    assert!(stdout.contains("the same as the source"), "{stdout}");
    // Into a database that already holds a deployment: refused, nothing changed.
    let again = migrate(&url);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The server on the copy: same users, agents, grants, accounts; the sealed tokens open
    // with the same key file; the trail goes on from where it was.
    let config = Config {
        database_url: Some(url.clone()),
        ..config
    };
    let ts = TestServer::start_with(dir, config).await;
    let accounts = ts
        .vault
        .store()
        .list_accounts(Some(&ts.info.user_id))
        .await
        .unwrap();
    assert_eq!(accounts[0].id, account);
    let again = ts.post_form(&ts.exchange_params()).await;
    assert_eq!(
        again.token(),
        upstream,
        "the cached upstream token, opened on PostgreSQL"
    );
    let after = ts.vault.verify_audit(None).await.unwrap().unwrap();
    assert_eq!(after.entries, entries_before + 1);
    ts.stop().await;
    drop_database(&url).await;
}
