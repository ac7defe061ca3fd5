//! Users signing in: two-step sign-in with TOTP, throttling, and the session's record of how
//! the user authenticated.

use latchkey_crypto::totp;

use crate::harness::*;

pub(crate) fn base32_decode(s: &str) -> Vec<u8> {
    let (mut out, mut buffer, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => panic!("not base32: {s}"),
        };
        buffer = (buffer << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            out.push((buffer >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

/// Enrol and confirm TOTP for the demo user through the CLI; returns the seed.
pub(crate) fn enrol(ts: &TestServer) -> Vec<u8> {
    let out = ts.cli(&["user", "mfa", "demo", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uri = v["otpauth_uri"].as_str().unwrap();
    assert!(
        uri.starts_with("otpauth://totp/Latchkey:demo?secret="),
        "{uri}"
    );
    let secret = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let seed = base32_decode(secret);
    // The CLI runs on the real clock.
    let real_now = std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64;
    let bad = ts.cli(&["user", "mfa", "demo", "--confirm", "000000"]);
    if totp::code_at(&seed, real_now) != "000000" {
        assert!(!bad.status.success(), "a wrong code does not enable TOTP");
    }
    let out = ts.cli(&[
        "user",
        "mfa",
        "demo",
        "--confirm",
        &totp::code_at(&seed, real_now),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    seed
}

pub(crate) async fn password_step(
    ts: &TestServer,
    password: &str,
) -> (u16, Option<String>, String) {
    let (_, _, page) = ts.browse("/login?next=/ui/accounts").await;
    let csrf = hidden_field(&page, "csrf");
    let (status, location, body) = ts
        .submit(
            "/login",
            &[
                ("username", "demo"),
                ("password", password),
                ("csrf", &csrf),
                ("next", "/ui/accounts"),
            ],
        )
        .await;
    (status.as_u16(), location, body)
}

pub(crate) async fn code_step(ts: &TestServer, code: &str) -> (u16, Option<String>) {
    let (status, _, page) = ts.browse("/login/totp?next=/ui/accounts").await;
    assert_eq!(status, 200, "the code form is shown to a pending session");
    let csrf = hidden_field(&page, "csrf");
    let (status, location, _) = ts
        .submit(
            "/login/totp",
            &[("code", code), ("csrf", &csrf), ("next", "/ui/accounts")],
        )
        .await;
    (status.as_u16(), location)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_two_step_sign_in() {
    let ts = TestServer::start().await;
    let seed = enrol(&ts);
    // The CLI used the current real step; the server's clock moves on so its codes are new.
    ts.clock.advance(30);

    let (status, location, _) = password_step(&ts, &ts.info.password).await;
    assert_eq!(status, 303);
    assert!(location.unwrap().contains("/login/totp"));
    // Password alone is not signed in.
    let (status, location, _) = ts.browse("/ui/accounts").await;
    assert_eq!(status, 303);
    assert!(location.unwrap().contains("/login"));

    assert_eq!(code_step(&ts, "123456x").await.0, 401);
    let wrong = if totp::code_at(&seed, ts.now()) == "111111" {
        "222222"
    } else {
        "111111"
    };
    assert_eq!(code_step(&ts, wrong).await.0, 401);
    let code = totp::code_at(&seed, ts.now());
    let (status, location) = code_step(&ts, &code).await;
    assert_eq!(
        (status, location.as_deref()),
        (303, Some(ts.url("/ui/accounts").as_str()))
    );
    let (status, _, _) = ts.browse("/ui/accounts").await;
    assert_eq!(status, 200);

    // The session records how and when the user authenticated.
    let audit = ts.vault.store().list_audit(5).await.unwrap();
    let login = audit
        .iter()
        .find(|e| e.record.action == "user.login")
        .unwrap();
    assert_eq!(
        (
            login.record.auth_method.as_str(),
            login.record.decision.as_str()
        ),
        ("password+totp", "allow")
    );

    // The same code cannot be used again.
    let (status, _, _) = password_step(&ts, &ts.info.password).await;
    assert_eq!(status, 303);
    assert_eq!(code_step(&ts, &code).await.0, 401, "a used code is refused");
    ts.clock.advance(30);
    assert_eq!(code_step(&ts, &totp::code_at(&seed, ts.now())).await.0, 303);

    // Disabled: the password is enough again.
    assert!(
        ts.cli(&["user", "mfa", "demo", "--disable"])
            .status
            .success()
    );
    assert_eq!(
        password_step(&ts, &ts.info.password).await.1.as_deref(),
        Some(ts.url("/ui/accounts").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_record_the_authentication() {
    let ts = TestServer::start().await;
    let (status, _, _) = password_step(&ts, &ts.info.password).await;
    assert_eq!(status, 303);
    let pool = ts.sql_pool().await;
    let row: (String, i64, i64) =
        sqlx::query_as("SELECT auth_methods, authenticated_at, pending_mfa FROM sessions ORDER BY rowid DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(row.0, "pwd");
    assert!((row.1 - ts.now()).abs() < 5);
    assert_eq!(row.2, 0);
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_is_throttled() {
    let ts = TestServer::start().await;
    for _ in 0..5 {
        let (status, _, body) = password_step(&ts, "wrong password").await;
        assert_eq!(status, 401);
        assert!(body.contains("Wrong username or password"));
    }
    // Now even the right password waits, and the answer says for how long.
    let (status, _, body) = password_step(&ts, &ts.info.password).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("Too many failed sign-in attempts"));
    // An unknown user is answered like a wrong password (no user enumeration).
    let (_, _, page) = ts.browse("/login").await;
    let csrf = hidden_field(&page, "csrf");
    let (status, _, body) = ts
        .submit(
            "/login",
            &[
                ("username", "nobody"),
                ("password", "whatever1"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(status, 401);
    assert!(body.contains("Wrong username or password"));
    // After the window, the right password works.
    ts.clock.advance(15 * 60);
    assert_eq!(password_step(&ts, &ts.info.password).await.0, 303);
    let denied = ts
        .vault
        .store()
        .list_audit(100)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.record.action == "user.login" && e.record.decision == "deny")
        .count();
    assert!(
        denied >= 7,
        "failures and throttled attempts are audited ({denied})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commands() {
    let ts = TestServer::start().await;
    let run = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(args)
            .arg("--data-dir")
            .arg(&ts.config.data_dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(&["user", "add", "alice", "--json"], "short\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 8 characters"));
    let out = run(
        &["user", "add", "alice", "--json"],
        "a long enough password\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["user", "add", "alice"], "another long password\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = run(&["user", "passwd", "alice"], "a new long password\n");
    assert!(out.status.success());
    let (_, _, page) = ts.browse("/login").await;
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            "/login",
            &[
                ("username", "alice"),
                ("password", "a new long password"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(status, 303);
    let out = run(&["user", "mfa", "nobody"], "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user `nobody`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_roles_are_set_and_listed_by_the_cli() {
    let ts = TestServer::start().await;
    // Every user's role, by username (users made in the same second list by name).
    let roles = || -> Vec<(String, String)> {
        let v: serde_json::Value =
            serde_json::from_str(&ts.cli_ok(&["user", "list", "--json"])).unwrap();
        let mut roles: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["username"].as_str().unwrap().to_owned(),
                    u["role"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        roles.sort();
        roles
    };
    let pair = |u: &str, r: &str| (u.to_owned(), r.to_owned());

    // The demo's user runs the place.
    assert_eq!(roles(), [pair("demo", "operator")]);
    let v: serde_json::Value = serde_json::from_str(&ts.cli_ok(&[
        "user",
        "add",
        "bob",
        "--operator",
        "--no-password",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        (&v["username"], &v["role"]),
        (&"bob".into(), &"operator".into())
    );
    let bob = v["id"].as_str().unwrap().to_owned();
    let out = ts.cli_ok(&["user", "add", "carol", "--no-password"]);
    assert!(out.starts_with("created user carol"), "{out}");
    assert_eq!(
        roles(),
        [
            pair("bob", "operator"),
            pair("carol", "user"),
            pair("demo", "operator")
        ]
    );

    let out = ts.cli_ok(&["user", "role", "bob", "user"]);
    assert_eq!(out, format!("role of bob ({bob}) set to user\n"));
    let out = ts.cli_ok(&["user", "role", "carol", "operator"]);
    assert!(out.ends_with("set to operator\n"), "{out}");
    assert_eq!(
        roles(),
        [
            pair("bob", "user"),
            pair("carol", "operator"),
            pair("demo", "operator")
        ]
    );
    let text = ts.cli_ok(&["user", "list"]);
    assert!(text.contains(&format!("{bob}\tbob\tuser\n")), "{text}");

    // A role that does not exist, or a user who does not: refused, nothing changed or recorded.
    let audit = ts.vault.store().list_audit(1).await.unwrap()[0].seq;
    for (args, says) in [
        (
            ["user", "role", "bob", "admin"],
            "invalid value 'admin' for '<ROLE>'",
        ),
        (
            ["user", "role", "bob", "Operator"],
            "[possible values: user, operator]",
        ),
        (["user", "role", "nobody", "operator"], "no user `nobody`"),
    ] {
        let out = ts.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = ts.cli(&["user", "role", "bob"]);
    assert!(!out.status.success());
    assert_eq!(
        roles(),
        [
            pair("bob", "user"),
            pair("carol", "operator"),
            pair("demo", "operator")
        ]
    );
    assert_eq!(
        ts.vault.store().list_audit(1).await.unwrap()[0].seq,
        audit,
        "no audit entry for a refused change"
    );
}
