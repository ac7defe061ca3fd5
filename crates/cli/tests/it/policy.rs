//! The grant policy matrix, end to end through `POST /oauth/token` and the `latchkey` CLI:
//! deny by default, scopes outside the grant, each risk level, allowed hours (moving the
//! clock in and out of a window), the IP allow-list, the lifetime cap, and quotas under
//! concurrency (10× the limit admits the limit, the rest get 429 with `Retry-After`), per
//! agent and per user, and across a restart. Every refusal is a `token.deny` audit entry
//! naming the rule.

use std::sync::Arc;

use latchkey_core::vault::Actor;
use latchkey_crypto::Algorithm;
use latchkey_crypto::jws::PublicKey;
use latchkey_crypto::keygen::{SigningKey, generate};
use serde_json::{Value, json};

use crate::harness::*;

/// The demo agent's exchange, narrowed to `scope` when given.
fn exchange(ts: &TestServer, scope: Option<&str>) -> Vec<(String, String)> {
    let mut p = ts.exchange_params();
    if let Some(s) = scope {
        p.push(("scope".into(), s.into()));
    }
    p
}

/// The newest audit entry.
async fn last_audit(ts: &TestServer) -> latchkey_core::model::AuditRecord {
    ts.vault.store().list_audit(1).await.unwrap()[0]
        .record
        .clone()
}

/// Refused with `status`/`code`, nothing released, and a `token.deny` entry whose reason holds
/// `reason`.
async fn refused(
    ts: &TestServer,
    params: &[(String, String)],
    status: u16,
    code: &str,
    reason: &str,
) -> Answer {
    let releases = ts.releases().await;
    let a = ts.post_form(params).await;
    a.assert_error(status, code);
    assert_eq!(ts.releases().await, releases, "nothing released on {code}");
    let entry = last_audit(ts).await;
    assert_eq!(
        (entry.action.as_str(), entry.decision.as_str()),
        ("token.deny", "deny")
    );
    let why = entry.reason.unwrap_or_default();
    assert!(
        why.starts_with(&format!("{code}: ")) && why.contains(reason),
        "audit reason `{why}` should name `{reason}`"
    );
    a
}

/// What the approval gate answers while no approval covers the request: 403
/// `authorization_pending` with the `auth_req_id` to poll (see `vault/approvals.rs`).
async fn needs_approval(ts: &TestServer, scope: Option<&str>, level: &str) {
    refused(
        ts,
        &exchange(ts, scope),
        403,
        "authorization_pending",
        &format!("needs the user's approval (risk {level})"),
    )
    .await;
}

/// Another agent with its own key.
struct OtherAgent {
    id: String,
    key: SigningKey,
}

async fn other_agent(ts: &TestServer, name: &str) -> OtherAgent {
    let pair = generate(Algorithm::RS256);
    let key = SigningKey::from_pem(&pair.private_pem, Algorithm::RS256, None).unwrap();
    let public = PublicKey::parse(&pair.public_pem, Some(Algorithm::RS256), None).unwrap();
    let (agent, _) = ts
        .vault
        .add_agent(name, &[public], false, &Actor::cli())
        .await
        .unwrap();
    OtherAgent { id: agent.id, key }
}

impl OtherAgent {
    fn params(&self, ts: &TestServer) -> Vec<(String, String)> {
        let now = ts.now();
        let jti = || uuid::Uuid::new_v4().to_string();
        let subject = self.key.sign(
            Some("token-vault-req+jwt"),
            &json!({"iss": self.id, "sub": ts.info.user_id, "aud": ts.issuer, "iat": now,
                    "exp": now + 60, "jti": jti(), "audit_context": "policy test"}),
        );
        let assertion = self.key.sign(
            None,
            &json!({"iss": self.id, "sub": self.id, "aud": ts.issuer, "iat": now,
                    "exp": now + 60, "jti": jti()}),
        );
        let mut p = ts.params_with(subject, assertion);
        for (k, v) in &mut p {
            if k == "client_id" {
                *v = self.id.clone();
            }
        }
        p
    }
}

/// Move the clock to `seconds` past the start of the next window of that length (a minute, a
/// day), so that a test's requests fall in one window.
fn align(ts: &TestServer, window: i64, seconds: i64) {
    ts.clock
        .advance(window - ts.now().rem_euclid(window) + seconds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_default_and_scopes_outside_the_grant() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();

    // No grant: nothing, whatever is asked for.
    ts.cli_ok(&[
        "agent",
        "ungrant",
        &ts.info.agent_id,
        "--connection",
        "demo-git",
    ]);
    for scope in [None, Some("read:user")] {
        refused(
            &ts,
            &exchange(&ts, scope),
            403,
            "unauthorized_client",
            "has no grant for connection demo-git",
        )
        .await;
    }
    // An agent that was never granted anything.
    let stranger = other_agent(&ts, "stranger").await;
    refused(
        &ts,
        &stranger.params(&ts),
        403,
        "unauthorized_client",
        "has no grant",
    )
    .await;

    // Scopes outside the grant (the user consented to all of them).
    ts.grant("repo:read", &[]);
    for scope in ["repo:write", "read:user", "repo:read repo:write", "admin"] {
        refused(
            &ts,
            &exchange(&ts, Some(scope)),
            400,
            "invalid_scope",
            "scope outside the agent's grant",
        )
        .await;
    }
    assert_eq!(
        ts.post_form(&exchange(&ts, None)).await.body["scope"],
        "repo:read"
    );

    // A stored policy that does not read back (edited by hand) releases nothing.
    let pool = ts.sql_pool().await;
    sqlx::query("UPDATE grants SET policy = '{\"max_lifetime\":\"soon\"}'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    refused(
        &ts,
        &exchange(&ts, None),
        403,
        "access_denied",
        "cannot be read",
    )
    .await;
    ts.grant("repo:read", &[]);
    ts.post_form(&exchange(&ts, None)).await.token();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_risk_level_behaves_as_specified() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    // The demo catalog: read:user, repo:read, issues:write low; repo:write high. The grant
    // raises issues:write to medium and repo:read to critical.
    ts.grant(
        "read:user repo:read repo:write issues:write",
        &[
            "--risk",
            "issues:write=medium",
            "--risk",
            "repo:read=critical",
        ],
    );
    // Low: released at once.
    let a = ts.post_form(&exchange(&ts, Some("read:user"))).await;
    assert_eq!(a.body["scope"], "read:user");
    assert_eq!(ts.demo_api(a.token(), "user").await.0, 200);
    // Medium, high, critical: the approval gate decides (for now it refuses: no approvals yet).
    needs_approval(&ts, Some("issues:write"), "medium").await;
    needs_approval(&ts, Some("repo:write"), "high").await;
    needs_approval(&ts, Some("repo:read"), "critical").await;
    // A request's risk is its riskiest scope.
    needs_approval(&ts, Some("read:user issues:write"), "medium").await;
    needs_approval(&ts, Some("read:user repo:write issues:write"), "high").await;
    needs_approval(&ts, None, "critical").await;

    // The operator lowers repo:write to low: released without an approval.
    ts.grant("read:user repo:write", &["--risk", "repo:write=low"]);
    assert_eq!(
        ts.post_form(&exchange(&ts, Some("repo:write"))).await.body["scope"],
        "repo:write"
    );
    // And back to the catalog's level when the grant is replaced without the flag.
    ts.grant("read:user repo:write", &[]);
    needs_approval(&ts, Some("repo:write"), "high").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hours_follow_the_clock_and_the_zone() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let berlin = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
    // Two days from now, Berlin time: a window 10:00-12:00 on that weekday only.
    let day = jiff::Timestamp::from_second(ts.now())
        .unwrap()
        .to_zoned(berlin.clone())
        .date()
        .checked_add(jiff::Span::new().days(2))
        .unwrap();
    let weekday = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [day.weekday().to_monday_zero_offset() as usize];
    let window = format!("{weekday} 10:00-12:00 Europe/Berlin");
    ts.grant("read:user repo:read issues:write", &["--hours", &window]);
    let at = |h: i8, m: i8| {
        day.at(h, m, 0, 0)
            .to_zoned(berlin.clone())
            .unwrap()
            .timestamp()
            .as_second()
    };

    // Now (two days before): outside, and the answer names the window and the time there.
    let a = refused(
        &ts,
        &ts.exchange_params(),
        403,
        "access_denied",
        &format!("outside the hours the grant allows ({window})"),
    )
    .await;
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("Europe/Berlin"),
        "{:?}",
        a.body
    );
    // 09:59 there: still outside.
    ts.clock.advance(at(9, 59) - ts.now());
    refused(
        &ts,
        &ts.exchange_params(),
        403,
        "access_denied",
        "outside the hours",
    )
    .await;
    // 10:01: inside.
    ts.clock.advance(at(10, 1) - ts.now());
    ts.post_form(&ts.exchange_params()).await.token();
    // 11:58: inside.
    ts.clock.advance(at(11, 58) - ts.now());
    ts.post_form(&ts.exchange_params()).await.token();
    // 12:01: outside again.
    ts.clock.advance(at(12, 1) - ts.now());
    refused(&ts, &ts.exchange_params(), 403, "access_denied", &window).await;
    // A second window makes the grant usable again.
    let later = format!("{weekday} 12:00-13:00 Europe/Berlin");
    ts.grant(
        "read:user repo:read issues:write",
        &["--hours", &window, "--hours", &later],
    );
    ts.post_form(&ts.exchange_params()).await.token();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_allow_list_and_lifetime_cap() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.grant("read:user", &["--ip", "10.0.0.0/8", "--ip", "192.168.0.1"]);
    refused(
        &ts,
        &ts.exchange_params(),
        403,
        "unauthorized_client",
        "address the grant does not allow",
    )
    .await;
    ts.grant("read:user", &["--ip", "10.0.0.0/8", "--ip", "127.0.0.0/8"]);
    let uncapped = ts.post_form(&ts.exchange_params()).await;
    let full = uncapped.body["expires_in"].as_i64().unwrap();
    assert!(full > 120, "the demo's tokens live five minutes: {full}");

    // The cap shortens what is reported; the upstream token is the same (it cannot be
    // shortened), so the agent's SDK drops it sooner and asks again.
    ts.grant("read:user", &["--ip", "127.0.0.1", "--max-lifetime", "60"]);
    let capped = ts.post_form(&ts.exchange_params()).await;
    assert_eq!(capped.body["expires_in"], 60);
    assert_eq!(capped.token(), uncapped.token());
    ts.grant("read:user", &["--max-lifetime", "86400"]);
    let a = ts.post_form(&ts.exchange_params()).await;
    assert!(
        a.body["expires_in"].as_i64().unwrap() <= full,
        "a cap never lengthens"
    );
}

/// Send `n` exchanges at once; the answers.
async fn burst(
    ts: &Arc<TestServer>,
    n: usize,
    mut params: impl FnMut(&TestServer) -> Vec<(String, String)>,
) -> Vec<Answer> {
    let requests: Vec<_> = (0..n).map(|_| params(ts)).collect();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|p| {
            let ts = ts.clone();
            tokio::spawn(async move { ts.post_form(&p).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

/// The successes among `answers`; every other one is a 429 with a `Retry-After` of at most
/// `max_retry` seconds.
fn count_admitted(answers: &[Answer], max_retry: u64) -> usize {
    let mut ok = 0;
    for a in answers {
        if a.status == 200 {
            ok += 1;
            continue;
        }
        a.assert_error(429, "too_many_requests");
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=max_retry).contains(&retry), "Retry-After {retry}");
        assert!(
            a.body["error_description"]
                .as_str()
                .unwrap()
                .contains("quota reached"),
            "{:?}",
            a.body
        );
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_hold_at_ten_times_the_limit() {
    let ts = Arc::new(TestServer::start().await);
    ts.connect_demo_account().await;
    const LIMIT: usize = 20;
    ts.grant("read:user repo:read", &["--per-minute", &LIMIT.to_string()]);

    align(&ts, 60, 1);
    let minute = ts.now().div_euclid(60);
    let releases = ts.releases().await;
    let answers = burst(&ts, 10 * LIMIT, |ts| ts.exchange_params()).await;
    let ok = count_admitted(&answers, 60);
    let same_minute = ts.now().div_euclid(60) == minute;
    let allowed = if same_minute { LIMIT } else { 2 * LIMIT }; // the window rolled over mid-burst
    assert!(
        ok <= allowed + allowed / 20,
        "{ok} of {} admitted; limit {LIMIT} + 5 %",
        10 * LIMIT
    );
    if same_minute {
        assert_eq!(ok, LIMIT, "one node counts exactly");
    }
    assert_eq!(
        ts.releases().await,
        releases + ok,
        "each admitted request released once"
    );
    // Refusals are on the trail, naming the quota.
    let denials: Vec<_> = ts
        .vault
        .store()
        .list_audit(1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.record.action == "token.deny")
        .collect();
    assert_eq!(denials.len(), 10 * LIMIT - ok);
    assert!(denials.iter().all(|e| {
        e.record
            .reason
            .as_deref()
            .unwrap()
            .contains("(--per-minute 20)")
    }));

    // Once the minute has passed, requests are admitted again.
    ts.clock.advance(60);
    ts.post_form(&ts.exchange_params()).await.token();

    // Per day (UTC days): three, then 429 until midnight UTC, even a minute later.
    ts.grant("read:user repo:read", &["--per-day", "3"]);
    align(&ts, 86_400, 3600);
    for _ in 0..3 {
        ts.post_form(&ts.exchange_params()).await.token();
    }
    let a = refused(
        &ts,
        &ts.exchange_params(),
        429,
        "too_many_requests",
        "(--per-day 3)",
    )
    .await;
    let retry: i64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (82_700..=82_800).contains(&retry),
        "until midnight UTC: {retry}"
    );
    ts.clock.advance(120);
    refused(
        &ts,
        &ts.exchange_params(),
        429,
        "too_many_requests",
        "this day",
    )
    .await;
    ts.clock.advance(retry);
    ts.post_form(&ts.exchange_params()).await.token();
}

/// The count that holds is the database's (counted with each release): a restart does not
/// give the day's quota back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_across_a_restart() {
    use latchkey_core::clock::{Clock, SystemClock};
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.grant("read:user repo:read", &["--per-day", "3"]);
    align(&ts, 86_400, 3600);
    for _ in 0..3 {
        ts.post_form(&ts.exchange_params()).await.token();
    }
    // The restarted server's clock is moved to where this one's was: the same UTC day.
    let offset = ts.now() - SystemClock.now();
    let (dir, config) = ts.stop().await;
    let ts = TestServer::start_with(dir, config).await;
    ts.clock.advance(offset);
    refused(
        &ts,
        &ts.exchange_params(),
        429,
        "too_many_requests",
        "(--per-day 3)",
    )
    .await;
    // The next day, admitted again (reconnected: the restarted demo provider forgot its
    // tokens, and the stored one has expired by then).
    align(&ts, 86_400, 60);
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_quota_counts_across_agents() {
    let ts = Arc::new(TestServer::start().await);
    ts.connect_demo_account().await;
    let b = other_agent(&ts, "agent-b").await;
    let c = other_agent(&ts, "agent-c").await;
    // A's and B's grants count the user's exchanges; C's has no per-user quota.
    ts.grant("read:user", &["--user-per-minute", "4"]);
    ts.cli_ok(&[
        "agent",
        "grant",
        &b.id,
        "--connection",
        "demo-git",
        "--scopes",
        "read:user",
        "--user-per-minute",
        "4",
    ]);
    ts.cli_ok(&[
        "agent",
        "grant",
        &c.id,
        "--connection",
        "demo-git",
        "--scopes",
        "read:user",
    ]);

    align(&ts, 60, 1);
    // Two by A, two by B: the user's four for this minute.
    ts.post_form(&ts.exchange_params()).await.token();
    ts.post_form(&b.params(&ts)).await.token();
    ts.post_form(&ts.exchange_params()).await.token();
    ts.post_form(&b.params(&ts)).await.token();
    let user = &ts.info.user_id;
    refused(
        &ts,
        &ts.exchange_params(),
        429,
        "too_many_requests",
        &format!("user {user}"),
    )
    .await;
    refused(
        &ts,
        &b.params(&ts),
        429,
        "too_many_requests",
        "(--user-per-minute 4)",
    )
    .await;
    // C's grant has no per-user quota: neither limited nor counted.
    ts.post_form(&c.params(&ts)).await.token();

    // Concurrently, the next minute: eight requests of A and B, four admitted.
    ts.clock.advance(60);
    let ok = count_admitted(
        &burst(&ts, 8, {
            let b_params = move |ts: &TestServer| b.params(ts);
            let mut i = 0;
            move |ts: &TestServer| {
                i += 1;
                if i % 2 == 0 {
                    ts.exchange_params()
                } else {
                    b_params(ts)
                }
            }
        })
        .await,
        60,
    );
    assert_eq!(ok, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_validates_and_shows_the_policy() {
    let ts = TestServer::start().await;
    let agent = ts.info.agent_id.clone();
    let out = ts.cli_ok(&[
        "agent",
        "grant",
        &agent,
        "--connection",
        "demo-git",
        "--scopes",
        "read:user repo:read",
        "--risk",
        "repo:read=medium",
        "--hours",
        "mon-fri 09:00-18:00 Europe/Berlin",
        "--hours",
        "sat 22:00-02:00 UTC",
        "--max-lifetime",
        "600",
        "--per-minute",
        "10",
        "--per-day",
        "100",
        "--user-per-minute",
        "5",
        "--user-per-day",
        "50",
    ]);
    assert!(out.contains("policy: "), "{out}");
    let expected = json!({
        "risk": {"repo:read": "medium"},
        "hours": ["mon-fri 09:00-18:00 Europe/Berlin", "sat 22:00-02:00 UTC"],
        "max_lifetime": 600,
        "quotas": {"agent_per_minute": 10, "agent_per_day": 100, "user_per_minute": 5, "user_per_day": 50},
    });
    let listed = || -> Value {
        let list: Value = serde_json::from_str(&ts.cli_ok(&["agent", "list", "--json"])).unwrap();
        let me = list
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["client_id"] == agent.as_str())
            .unwrap()
            .clone();
        me["grants"].clone()
    };
    let grants = listed();
    assert_eq!(grants[0]["connection"], "demo-git");
    assert_eq!(grants[0]["scopes"], "read:user repo:read");
    assert_eq!(grants[0]["policy"], expected);
    // The change is on the audit trail with the policy.
    let entry = ts.vault.store().list_audit(1).await.unwrap()[0]
        .record
        .clone();
    assert_eq!(entry.action, "grant.upsert");
    assert!(entry.reason.unwrap().contains("\"max_lifetime\":600"));

    // The admin API shows it too.
    let token = ts.cli_ok(&["api-token", "create", "ops"]).trim().to_owned();
    let resp = ts
        .http
        .get(ts.url("/api/v1/agents"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    let me = body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == agent.as_str())
        .unwrap();
    assert_eq!(me["grants"][0]["policy"], expected);

    // Bad input: a clear error, and nothing changes (the grant, the trail).
    let audit_len = ts.vault.store().list_audit(100_000).await.unwrap().len();
    for (flags, says) in [
        (
            vec!["--risk", "repo:read=severe"],
            "unknown risk level `severe`",
        ),
        (vec!["--risk", "repo:read"], "SCOPE=LEVEL"),
        (
            vec!["--risk", "repo:write=high"],
            "not one of the grant's scopes",
        ),
        (
            vec!["--risk", "read:user=low", "--risk", "read:user=high"],
            "twice",
        ),
        (vec!["--hours", "mon-fri 9-18 Europe/Berlin"], "not a time"),
        (
            vec!["--hours", "weekdays 09:00-18:00 Europe/Berlin"],
            "not a day",
        ),
        (
            vec!["--hours", "mon-fri 09:00-18:00 Mars/Olympus"],
            "unknown time zone",
        ),
        (
            vec!["--hours", "mon-fri 09:00-18:00"],
            "DAYS HH:MM-HH:MM ZONE",
        ),
        (vec!["--hours", "mon 09:00-09:00 UTC"], "same time"),
        (
            vec!["--max-lifetime", "0"],
            "--max-lifetime must be between 1 and 86400",
        ),
        (
            vec!["--max-lifetime", "90000"],
            "--max-lifetime must be between 1 and 86400",
        ),
        (vec!["--per-minute", "0"], "--per-minute must be between 1"),
        (
            vec!["--user-per-day", "0"],
            "--user-per-day must be between 1",
        ),
        (vec!["--per-day=-3"], "--per-day"),
        (vec!["--per-minute", "many"], "--per-minute"),
        (
            vec!["--ip", "10.0.0.0/33"],
            "not an IP address or CIDR block",
        ),
    ] {
        let mut args = vec![
            "agent",
            "grant",
            &agent,
            "--connection",
            "demo-git",
            "--scopes",
            "read:user repo:read",
        ];
        args.extend(flags.iter().copied());
        let out = ts.cli(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert_eq!(listed()[0]["policy"], expected, "the grant is unchanged");
    assert_eq!(
        ts.vault.store().list_audit(100_000).await.unwrap().len(),
        audit_len
    );

    // Replacing the grant without policy flags clears the policy.
    ts.cli_ok(&[
        "agent",
        "grant",
        &agent,
        "--connection",
        "demo-git",
        "--scopes",
        "read:user",
    ]);
    assert_eq!(listed()[0]["policy"], json!({}));
}
