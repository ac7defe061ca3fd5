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

/// Another node of `ts`'s deployment: a second server in this process on its own port, with
/// the same data directory (key file, certificates), the same PostgreSQL database and the same
/// public URL (the issuer every node answers as). Stop it by sending on the channel, or kill it
/// by aborting the task (it stops accepting; what it already acknowledged is committed).
async fn node(
    ts: &TestServer,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        public_url: Some(ts.issuer.clone()),
        ..ts.config.clone()
    };
    let server = latchkey_server::Server::with_listener(
        &config,
        listener,
        latchkey_server::ServeOptions {
            demo: true,
            clock: std::sync::Arc::new(ts.clock.clone()),
        },
    )
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = server
            .run(async {
                let _ = rx.await;
            })
            .await;
    });
    (format!("https://{addr}/"), tx, task)
}

/// POST an exchange to one node; the status and body (a connection failure is status 0).
async fn exchange_at(ts: &TestServer, base: &str, params: &[(String, String)]) -> (u16, String) {
    match ts
        .http
        .post(format!("{base}oauth/token"))
        .form(params)
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Three nodes on one PostgreSQL database: a request replayed on all three at once is
/// released once; a revocation committed through one node stops every exchange that starts
/// afterwards on the others; 200 exchanges at once over the nodes when a refresh is due make
/// exactly one upstream refresh; a node killed under load leaves every acknowledged release on
/// the trail, and the trail verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_postgresql() {
    let url = fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        database_url: Some(url.clone()),
        ..Config::default()
    };
    let ts = TestServer::start_with(dir, config).await;
    let account = ts.connect_demo_account().await;
    let a = ts.issuer.clone();
    let (b, stop_b, task_b) = node(&ts).await;
    let (c, _stop_c, task_c) = node(&ts).await;
    let nodes = [a.clone(), b.clone(), c.clone()];
    // Every node answers (one warm-up exchange each: the upstream token is cached by then).
    for n in &nodes {
        let (status, body) = exchange_at(&ts, n, &ts.exchange_params()).await;
        assert_eq!(status, 200, "{n}: {body}");
    }

    // One request, replayed on all three nodes at once: exactly one release, every round.
    const ROUNDS: usize = 1000;
    let mut winners = 0;
    for _ in 0..ROUNDS {
        let params = ts.exchange_params();
        let answers =
            futures_util::future::join_all(nodes.iter().map(|n| exchange_at(&ts, n, &params)))
                .await;
        let ok = answers.iter().filter(|(s, _)| *s == 200).count();
        assert_eq!(ok, 1, "{answers:?}");
        winners += ok;
    }
    assert_eq!(winners, ROUNDS);

    // A revocation committed through node A: nothing that starts afterwards, on B or C.
    ts.vault
        .revoke_account(&account, &latchkey_core::vault::Actor::cli())
        .await
        .unwrap();
    let mut released_after = 0;
    for round in 0..ROUNDS / 2 {
        let params_b = ts.exchange_params();
        let params_c = ts.exchange_params();
        let (rb, rc) = tokio::join!(
            exchange_at(&ts, &b, &params_b),
            exchange_at(&ts, &c, &params_c)
        );
        for (status, body) in [rb, rc] {
            if status == 200 {
                released_after += 1;
            } else {
                assert_eq!(status, 401, "round {round}: {body}");
            }
        }
    }
    assert_eq!(
        released_after, 0,
        "no release after the revocation committed"
    );

    // Reconnect. The first exchanges need a refresh (for the grant's narrower scopes), and
    // later the upstream token expires: 200 exchanges at once over the three nodes, each time,
    // make exactly one upstream refresh (the demo rotates refresh tokens, so a second one
    // would present a spent token and end the account).
    ts.connect_demo_account().await;
    for phase in [
        "right after the reconnect",
        "right after the upstream token expired",
    ] {
        if phase.ends_with("expired") {
            ts.clock.advance(301);
        }
        let before = ts.demo.stats().refresh_grants;
        let batch: Vec<Vec<(String, String)>> = (0..200).map(|_| ts.exchange_params()).collect();
        let answers = futures_util::future::join_all(
            batch
                .iter()
                .enumerate()
                .map(|(i, p)| exchange_at(&ts, &nodes[i % 3], p)),
        )
        .await;
        let refused: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s != 200).collect();
        assert!(refused.is_empty(), "{phase}: {refused:?}");
        assert_eq!(
            ts.demo.stats().refresh_grants - before,
            1,
            "{phase}: exactly one upstream refresh"
        );
    }

    // Load on all three while node C is killed halfway: the others keep serving, and every
    // release any node acknowledged is on the trail.
    let releases_before = ts
        .vault
        .store()
        .list_audit(100_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.record.action == "token.release")
        .count();
    let mut acknowledged = 0;
    let mut after_kill = [0usize; 3];
    for round in 0..300 {
        if round == 150 {
            task_c.abort();
        }
        let batch: Vec<Vec<(String, String)>> = (0..3).map(|_| ts.exchange_params()).collect();
        let answers = futures_util::future::join_all(
            nodes
                .iter()
                .zip(&batch)
                .map(|(n, p)| exchange_at(&ts, n, p)),
        )
        .await;
        for (i, (status, body)) in answers.iter().enumerate() {
            match status {
                200 => {
                    acknowledged += 1;
                    if round > 150 {
                        after_kill[i] += 1;
                    }
                }
                0 => assert!(i == 2 && round >= 150, "only the killed node fails"),
                other => panic!("node {i} answered {other}: {body}"),
            }
        }
    }
    assert!(
        after_kill[0] > 0 && after_kill[1] > 0,
        "A and B keep serving"
    );
    let releases = ts
        .vault
        .store()
        .list_audit(100_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.record.action == "token.release")
        .count();
    assert!(
        releases - releases_before >= acknowledged,
        "{acknowledged} acknowledged, {} on the trail",
        releases - releases_before
    );
    let v = ts.vault.verify_audit(None).await.unwrap().unwrap();
    assert!(v.entries as usize >= releases, "{v:?}");

    let _ = stop_b.send(());
    let _ = task_b.await;
    ts.stop().await;
    drop_database(&url).await;
}
