//! The whole vault on PostgreSQL (`database_url = postgres://…`): the same server, CLI and
//! flows as on SQLite, on a fresh database of the machine's PostgreSQL (127.0.0.1:5432, or
//! `LATCHKEY_TEST_PG_URL`). The store's own conformance suite (`crates/store`) covers every
//! method on both backends; this shows the server wired to it.

use crate::harness::*;
use latchkey_server::config::Config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_runs_on_postgresql() {
    let (ts, _db) = TestServer::start_on(Backend::Postgres).await;
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

    let db = PgDatabase::fresh().await;
    let url = db.url.clone();
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
}

/// The periodic jobs go to one node: three vaults on one database asked at once for the
/// audit checkpoint that is due write one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_audit_checkpoint_is_written_by_one_node() {
    let (ts, _db) = TestServer::start_on(Backend::Postgres).await;
    let mut vaults = vec![ts.vault.clone()];
    for _ in 0..2 {
        let clock = std::sync::Arc::new(ts.clock.clone());
        let vault = latchkey_server::open_vault(&ts.config, &ts.issuer, clock, None)
            .await
            .unwrap();
        vaults.push(vault);
    }
    for round in 0..3 {
        // Due: entries since the last checkpoint (the server's own, at start), ten minutes on.
        ts.connect_demo_account().await;
        ts.clock.advance(600);
        let before = ts.vault.store().audit_checkpoints().await.unwrap().len();
        let written =
            futures_util::future::join_all(vaults.iter().map(|v| v.periodic_audit_checkpoint(600)))
                .await;
        assert!(written.iter().all(Result::is_ok), "{written:?}");
        let after = ts.vault.store().audit_checkpoints().await.unwrap().len();
        assert_eq!(after - before, 1, "round {round}: one checkpoint");
    }
    ts.stop().await;
}

/// Another node of `ts`'s deployment: a second server in this process on its own port, with
/// the same data directory (key file, certificates), the same PostgreSQL database, the same
/// public URL (the issuer every node answers as) and the same movable clock. Stop it by
/// sending on the channel.
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
/// exactly one upstream refresh; a quota admits its limit over all the nodes together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_postgresql() {
    let (ts, _db) = TestServer::start_on(Backend::Postgres).await;
    let account = ts.connect_demo_account().await;
    let a = ts.issuer.clone();
    let (b, stop_b, task_b) = node(&ts).await;
    let (c, stop_c, task_c) = node(&ts).await;
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

    // A quota counts every node's releases: 60 exchanges at once over the three nodes, with
    // room for 20 in the minute, release exactly 20 (the count is the database's).
    ts.grant("read:user repo:read", &["--per-minute", "20"]);
    ts.clock.advance(60 - ts.now().rem_euclid(60) + 1);
    let minute = ts.now().div_euclid(60);
    let releases_before = releases(&ts).await;
    let batch: Vec<Vec<(String, String)>> = (0..60).map(|_| ts.exchange_params()).collect();
    let answers = futures_util::future::join_all(
        batch
            .iter()
            .enumerate()
            .map(|(i, p)| exchange_at(&ts, &nodes[i % 3], p)),
    )
    .await;
    let admitted = answers.iter().filter(|(s, _)| *s == 200).count();
    for (status, body) in &answers {
        assert!(
            *status == 200 || (*status == 429 && body.contains("quota reached")),
            "{status}: {body}"
        );
    }
    if ts.now().div_euclid(60) == minute {
        assert_eq!(admitted, 20, "one count across the nodes");
    } else {
        assert!(
            admitted <= 40,
            "{admitted}: the minute rolled over, two windows at most"
        );
    }
    assert_eq!(releases(&ts).await - releases_before, admitted);
    let v = ts.vault.verify_audit(None).await.unwrap().unwrap();
    assert!(v.entries > 0, "{v:?}");

    for (stop, task) in [(stop_b, task_b), (stop_c, task_c)] {
        let _ = stop.send(());
        let _ = task.await;
    }
    ts.stop().await;
}

/// The `token.release` entries on the trail.
async fn releases(ts: &TestServer) -> usize {
    ts.vault
        .store()
        .query_audit(&latchkey_core::store::AuditQuery {
            action: Some("token.release".into()),
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .len()
}

/// Until `done`; fails the test after a minute instead of hanging it.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A node of `ts`'s deployment as its own process: `latchkey serve` with the same data
/// directory, database and public URL, on a port of its own (read from what it prints). It
/// runs on the real clock, so `ts`'s clock must not have been moved. Killed when dropped.
struct NodeProcess {
    child: tokio::process::Child,
    url: String,
    log: std::path::PathBuf,
}

impl NodeProcess {
    async fn start(ts: &TestServer, name: &str) -> Self {
        use tokio::io::AsyncBufReadExt;
        let log = ts.dir.path().join(format!("{name}.log"));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("LATCHKEY_") {
                cmd.env_remove(&k);
            }
        }
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&ts.config.data_dir)
            .env_remove("RUST_LOG")
            .env("LATCHKEY_LOG", "warn")
            .env(
                "LATCHKEY_DATABASE_URL",
                ts.config.database_url.as_ref().unwrap(),
            )
            .env("LATCHKEY_PUBLIC_URL", &ts.issuer)
            .env(
                "LATCHKEY_OUTBOUND_ALLOW",
                crate::harness::outbound_allow_env(&ts.config.outbound_allow),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.strip_prefix("Latchkey is listening on ") {
                    return Some(rest.split_whitespace().next().unwrap().to_owned());
                }
            }
            None
        })
        .await;
        let Ok(Some(addr)) = listening else {
            panic!(
                "{name} did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        // Keep reading what it prints, so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            url: format!("https://{addr}/"),
            log,
        }
    }

    /// SIGKILL: no shutdown, no flush, whatever it was doing.
    async fn kill9(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the node died on its own:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        self.child.kill().await.unwrap();
    }
}

/// A node process killed with SIGKILL in the middle of load: the other nodes keep serving,
/// every release a node acknowledged (the killed one included) is on the trail, nothing is on
/// it that was neither acknowledged nor in flight at the kill, the trail verifies, and the
/// node started again serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_nothing_acknowledged() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (ts, _db) = TestServer::start_on(Backend::Postgres).await;
    let ts = std::sync::Arc::new(ts);
    ts.connect_demo_account().await;
    let b = NodeProcess::start(&ts, "node-b").await;
    let mut c = NodeProcess::start(&ts, "node-c").await;
    let nodes = [ts.issuer.clone(), b.url.clone(), c.url.clone()];
    for n in &nodes {
        let (status, body) = exchange_at(&ts, n, &ts.exchange_params()).await;
        assert_eq!(status, 200, "{n}: {body}");
    }
    let before = releases(&ts).await;

    // Two workers per node, each exchanging in a loop until told to stop. A worker of the
    // killed node stops at its first request without an answer, counted as cut off: it may or
    // may not have committed (one per worker at most: the one in flight at the kill, or the
    // first one sent after it).
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let killing = std::sync::Arc::new(AtomicBool::new(false));
    let killed = std::sync::Arc::new(AtomicBool::new(false));
    let acknowledged = std::sync::Arc::new([0, 1, 2].map(|_| AtomicUsize::new(0)));
    let after_kill = std::sync::Arc::new([0, 1, 2].map(|_| AtomicUsize::new(0)));
    let cut_off = std::sync::Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..6 {
        let node = w % 3;
        let (ts, base) = (ts.clone(), nodes[node].clone());
        let (stop, killing, killed, acknowledged, after_kill, cut_off) = (
            stop.clone(),
            killing.clone(),
            killed.clone(),
            acknowledged.clone(),
            after_kill.clone(),
            cut_off.clone(),
        );
        workers.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let was_killed = killed.load(Ordering::SeqCst);
                let (status, body) = exchange_at(&ts, &base, &ts.exchange_params()).await;
                match status {
                    200 => {
                        acknowledged[node].fetch_add(1, Ordering::SeqCst);
                        if was_killed {
                            after_kill[node].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    0 if node == 2 && killing.load(Ordering::SeqCst) => {
                        cut_off.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    other => panic!("node {node} answered {other}: {body}"),
                }
            }
        });
    }
    // Load for a while, then the kill, then load on the others for a while.
    wait_for("150 releases on C", || {
        acknowledged[2].load(Ordering::SeqCst) >= 150
    })
    .await;
    killing.store(true, Ordering::SeqCst);
    c.kill9().await;
    killed.store(true, Ordering::SeqCst);
    let at_kill: usize = acknowledged.iter().map(|n| n.load(Ordering::SeqCst)).sum();
    wait_for("100 releases each on A and B after the kill", || {
        after_kill[0].load(Ordering::SeqCst) >= 100 && after_kill[1].load(Ordering::SeqCst) >= 100
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    while let Some(w) = workers.join_next().await {
        w.unwrap();
    }
    let acked: usize = acknowledged.iter().map(|n| n.load(Ordering::SeqCst)).sum();
    assert!(acked > at_kill, "A and B kept serving after the kill");

    // Every acknowledged release is on the trail; beyond them only those cut off by the kill
    // may be.
    let on_trail = releases(&ts).await - before;
    let cut_off = cut_off.load(Ordering::SeqCst);
    assert_eq!(
        cut_off, 2,
        "each worker of the killed node lost one request"
    );
    assert!(
        (acked..=acked + cut_off).contains(&on_trail),
        "{acked} acknowledged, {cut_off} cut off, {on_trail} on the trail"
    );
    let v = ts.vault.verify_audit(None).await.unwrap().unwrap();
    assert!(v.entries as usize >= on_trail, "{v:?}");
    eprintln!(
        "kill -9 of node C: {acked} releases acknowledged ({at_kill} before the kill), \
         {cut_off} cut off, {on_trail} on the trail; {} entries verify",
        v.entries
    );

    // The node, started again, serves: nothing it held was needed by anyone else.
    let c = NodeProcess::start(&ts, "node-c-again").await;
    let (status, body) = exchange_at(&ts, &c.url, &ts.exchange_params()).await;
    assert_eq!(status, 200, "{body}");
    drop((b, c));
    std::sync::Arc::into_inner(ts).unwrap().stop().await;
}
