//! The web dashboard end to end in a real browser: Debian's headless Chromium, driven by
//! playwright-core (`interop/node/dashboard.mjs`, pinned in interop/node's package-lock.json),
//! signs in with TOTP, connects the demo provider through its consent page, approves an agent's
//! critical request with step-up, reads the audit trail and disconnects.
//!
//! The browser plays the user; this test plays everything else over a line protocol on the
//! driver's stdin/stdout: the server's clock (TOTP codes come from the `ManualClock`, and each
//! step is usable once, so every code moves the clock 30 s) and the agent (its token exchange,
//! made here through the harness). Between the driver's requests it checks what the pages
//! cannot show: the approval row, the audit entries and the account's status. The driver
//! checks that every response from Latchkey's origin carries a Content-Security-Policy, that
//! nothing is loaded from another origin, that no CSP violation is reported and that no page
//! shows the password, the TOTP secret once on, or the agent's token; and writes a screenshot
//! of every page to `target/ui-screenshots/`.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use latchkey_core::model::{AccountStatus, ApprovalStatus};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::approvals::entries;
use crate::harness::*;
use crate::login::base32_decode;

const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser session, start to `done` and exit.
const OVERALL: Duration = Duration::from_secs(120);
/// Past `step_up_minutes` (5): an approval then needs a fresh code.
const PAST_STEP_UP: i64 = 6 * 60;
const NOT_CONNECTED: &str = "federated_connection_refresh_token_not_found";

/// What this side saw and checked while serving the driver.
#[derive(Default)]
struct Seen {
    /// Every exchange the agent made: (status, error).
    exchanges: Vec<(u16, Option<String>)>,
    /// The approval the critical request waits for.
    approval: Option<String>,
    codes: usize,
    checked_approved: bool,
    checked_release: bool,
    checked_revoked: bool,
    done: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test drives a real headless Chromium; \
         run `apt-get install chromium` (.ci/run does it on a fresh machine)"
    );
    let node = workspace_root().join("interop/node");
    assert!(
        node.join("node_modules/playwright-core").is_dir(),
        "{}/node_modules/playwright-core is missing: run scripts/test (it runs npm ci there)",
        node.display()
    );
    let shots = workspace_root().join("target/ui-screenshots");
    // Only this run's pages in there.
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    println!("dashboard screenshots: {}", shots.display());

    let ts = TestServer::start().await;
    // repo:read is critical: the exchange waits for an approval given with step-up.
    ts.grant("read:user repo:read", &["--risk", "repo:read=critical"]);

    let mut child = tokio::process::Command::new("node")
        .arg(node.join("dashboard.mjs"))
        .current_dir(&node)
        .env("LK_ISSUER", &ts.issuer)
        .env("LK_USERNAME", &ts.info.username)
        .env("LK_PASSWORD", &ts.info.password)
        .env("LK_SCREENSHOTS", &shots)
        .env("LK_CHROMIUM", CHROMIUM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node is installed (scripts/test checks)");
    let mut to_driver = child.stdin.take().unwrap();
    let mut from_driver = BufReader::new(child.stdout.take().unwrap()).lines();
    // The driver's log, echoed as it comes and kept for the failure message.
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let log_task = {
        let log = log.clone();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[dashboard.mjs] {line}");
                log.lock().unwrap().push(line);
            }
        })
    };
    let tail = |log: &Mutex<Vec<String>>| {
        let log = log.lock().unwrap();
        log[log.len().saturating_sub(30)..].join("\n")
    };

    let mut seen = Seen::default();
    let session = async {
        while let Some(line) = from_driver.next_line().await.unwrap() {
            let request: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("dashboard.mjs wrote a non-JSON line: {line}"));
            if request["done"] == true {
                seen.done = true;
                break;
            }
            let answer = answer(&ts, &request, &mut seen).await;
            to_driver
                .write_all(format!("{answer}\n").as_bytes())
                .await
                .unwrap();
            to_driver.flush().await.unwrap();
        }
        drop(to_driver);
        child.wait().await.unwrap()
    };
    let status = match tokio::time::timeout(OVERALL, session).await {
        Ok(status) => status,
        Err(_) => panic!(
            "the dashboard session did not finish within {} s; the driver's last words:\n{}",
            OVERALL.as_secs(),
            tail(&log)
        ),
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), log_task).await;
    assert!(
        status.success() && seen.done,
        "dashboard.mjs failed ({status}, done: {}); screenshots in {}; its last words:\n{}",
        seen.done,
        shots.display(),
        tail(&log)
    );

    // The whole story happened, in order, and each server-side fact was checked on the way.
    assert_eq!(
        seen.exchanges,
        [
            (403, Some("authorization_pending".to_owned())),
            (200, None),
            (401, Some(NOT_CONNECTED.to_owned())),
        ],
        "the agent's exchanges"
    );
    assert!(seen.checked_approved && seen.checked_release && seen.checked_revoked);
    assert!(seen.codes >= 3, "codes for enrolment, sign-in and step-up");
    let user = ts
        .vault
        .store()
        .user_by_id(&ts.info.user_id)
        .await
        .unwrap()
        .unwrap();
    assert!(user.totp_enabled, "two-step verification was turned on");
    let shots_written = std::fs::read_dir(&shots)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .count();
    assert!(shots_written >= 10, "{shots_written} screenshots");
    println!(
        "dashboard screenshots: {shots_written} in {}",
        shots.display()
    );
}

/// One answer to the driver.
async fn answer(ts: &TestServer, request: &Value, seen: &mut Seen) -> Value {
    match request["need"].as_str() {
        Some("totp") => {
            let secret: String = request["secret"]
                .as_str()
                .expect("a totp request names the secret")
                .trim_end_matches('=')
                .to_ascii_uppercase();
            // A new step: each one is accepted once.
            ts.clock.advance(30);
            seen.codes += 1;
            let code = latchkey_crypto::totp::code_at(&base32_decode(&secret), ts.now());
            json!({ "code": code })
        }
        Some("step_up_window") => {
            ts.clock.advance(PAST_STEP_UP);
            json!({ "ok": true })
        }
        Some("agent") => {
            let scope = request["scope"]
                .as_str()
                .expect("an agent request names a scope");
            agent(ts, scope, seen).await
        }
        _ => panic!("dashboard.mjs asked for something unknown: {request}"),
    }
}

/// The agent's token exchange for `scope`, with the server-side facts that go with each
/// answer.
async fn agent(ts: &TestServer, scope: &str, seen: &mut Seen) -> Value {
    let store = ts.vault.store();
    // Approved on the page: the row says so, with step-up, before anything redeems it.
    if let Some(id) = &seen.approval
        && !seen.checked_approved
    {
        let a = store.approval(id).await.unwrap().unwrap();
        assert_eq!(a.status, ApprovalStatus::Approved, "{id} after the page");
        assert!(a.stepped_up, "{id} was approved with step-up");
        assert_eq!(
            a.decided_by.as_deref(),
            Some(format!("user:{}", ts.info.user_id).as_str())
        );
        // With a code typed into the page (past the window, the session alone is not enough).
        let approve = &entries(ts, "approval.approve").await[0];
        assert_eq!(
            (
                approve.decision.as_str(),
                approve.auth_method.as_str(),
                approve.reason.as_deref()
            ),
            (
                "allow",
                "session+totp",
                Some(format!("{id}: approved with step-up").as_str())
            )
        );
        seen.checked_approved = true;
    }
    let mut params = ts.exchange_params();
    params.push(("scope".into(), scope.into()));
    let a = ts.post_form(&params).await;
    let error = a.body["error"].as_str().map(str::to_owned);
    seen.exchanges.push((a.status.as_u16(), error.clone()));
    let mut answer = json!({ "status": a.status.as_u16(), "error": error });
    match (a.status.as_u16(), error.as_deref()) {
        (403, Some("authorization_pending")) => {
            let uri = a.body["approval_uri"].as_str().unwrap();
            let id = uri.rsplit('/').next().unwrap().to_owned();
            let approval = store.approval(&id).await.unwrap().unwrap();
            assert_eq!(approval.status, ApprovalStatus::Pending);
            assert!(approval.step_up && approval.single_use && approval.risk == "critical");
            // The account it is for was connected in the browser, and is live.
            let accounts = store.list_accounts(Some(&ts.info.user_id)).await.unwrap();
            assert_eq!(accounts.len(), 1, "one account, connected on the page");
            assert_eq!(accounts[0].status, AccountStatus::Active);
            answer["approval_id"] = json!(id);
            seen.approval = Some(id);
        }
        (200, _) => {
            let (status, _) = ts.demo_api(a.token(), "repos").await;
            answer["token_ok"] = json!(status == 200);
            // For the driver to check that no page ever shows it.
            answer["token"] = json!(a.token());
            answer["scope"] = a.body["scope"].clone();
            let id = seen.approval.as_deref().expect("approved before released");
            // Single use: this release consumed it, and the trail has the release.
            let approval = store.approval(id).await.unwrap().unwrap();
            assert_eq!(approval.status, ApprovalStatus::Redeemed);
            let release = entries(ts, "token.release")
                .await
                .into_iter()
                .next()
                .expect("a token.release entry");
            assert_eq!(
                (
                    release.decision.as_str(),
                    release.agent_id.as_deref(),
                    release.connection.as_deref(),
                    release.scopes.as_deref(),
                ),
                (
                    "allow",
                    Some(ts.info.agent_id.as_str()),
                    Some("demo-git"),
                    Some(scope)
                )
            );
            let redeem = &entries(ts, "approval.redeem").await[0];
            assert!(
                redeem.reason.as_deref().is_some_and(|r| r.starts_with(id)),
                "{redeem:?}"
            );
            seen.checked_release = true;
        }
        (401, Some(NOT_CONNECTED)) => {
            // Disconnected on the page: revoked (tokens erased), by the user.
            let accounts = store.list_accounts(Some(&ts.info.user_id)).await.unwrap();
            assert_eq!(accounts.len(), 1);
            assert_eq!(accounts[0].status, AccountStatus::Revoked);
            assert!(accounts[0].refresh_token.is_none());
            let revoke = entries(ts, "account.revoke")
                .await
                .into_iter()
                .next()
                .expect("an account.revoke entry");
            assert_eq!(
                (revoke.actor_type.as_str(), revoke.actor_id.as_str()),
                ("user", ts.info.user_id.as_str())
            );
            seen.checked_revoked = true;
        }
        // Anything else: the driver sees it and fails with the step it was on.
        _ => eprintln!("unexpected exchange answer: {} {}", a.status, a.body),
    }
    answer
}
