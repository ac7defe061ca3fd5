//! Approvals end to end: CIBA (`/bc-authorize` and its grant, poll mode), the approvals page
//! and `latchkey approvals`, step-up, anti-fatigue, exchanges held for approval, and the
//! audit entries and webhooks of every decision.

use latchkey_core::model::Role;
use latchkey_core::vault::Actor;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::harness::*;
use crate::login::password_step;
use crate::oidc::{claims_unverified, userinfo};

/// Guessers running at once (each guess is refused through the whole token endpoint, audit
/// entry included).
const GUESS_TASKS: usize = 8;

pub(crate) const CIBA: &str = "urn:openid:params:grant-type:ciba";

pub(crate) struct Client {
    pub id: String,
    pub secret: String,
}

/// A confidential client (agent with a secret) that starts CIBA requests.
pub(crate) async fn secret_client(ts: &TestServer, name: &str) -> Client {
    let (agent, secret) = ts
        .vault
        .add_agent(name, &[], true, &Actor::cli())
        .await
        .unwrap();
    Client {
        id: agent.id,
        secret: secret.unwrap().expose_secret().to_owned(),
    }
}

/// The demo user as a CIBA `login_hint`, spaced as auth0-ai (Python) writes it.
pub(crate) fn login_hint(ts: &TestServer) -> String {
    format!(
        "{{ \"format\": \"iss_sub\", \"iss\": \"{}\", \"sub\": \"{}\" }}",
        ts.issuer, ts.info.user_id
    )
}

/// `POST /bc-authorize` with a valid request, `changes` replacing (or, with "", removing)
/// parameters.
async fn bc_authorize(ts: &TestServer, c: &Client, changes: &[(&str, &str)]) -> Answer {
    let hint = login_hint(ts);
    let mut form: Vec<(String, String)> = [
        ("client_id", c.id.as_str()),
        ("client_secret", c.secret.as_str()),
        ("scope", "openid"),
        ("login_hint", hint.as_str()),
        ("binding_message", "Confirm 42"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in changes {
        form.retain(|(name, _)| name != k);
        if !v.is_empty() {
            form.push(((*k).to_owned(), (*v).to_owned()));
        }
    }
    let resp = ts
        .http
        .post(ts.url("/bc-authorize"))
        .form(&form)
        .send()
        .await
        .unwrap();
    Answer::read(resp).await
}

async fn poll(ts: &TestServer, c: &Client, auth_req_id: &str) -> Answer {
    ts.post_form(
        &[
            ("grant_type", CIBA),
            ("client_id", &c.id),
            ("client_secret", &c.secret),
            ("auth_req_id", auth_req_id),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .await
}

/// The newest approval request's id (`apr_…`), as the CLI lists it.
pub(crate) fn newest_approval(ts: &TestServer) -> Value {
    let out = ts.cli(&["approvals", "list", "--all", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list[0].clone()
}

/// Audit entries of `action`, newest first.
pub(crate) async fn entries(
    ts: &TestServer,
    action: &str,
) -> Vec<latchkey_core::model::AuditRecord> {
    ts.vault
        .store()
        .list_audit(100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.record.action == action)
        .map(|e| e.record)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciba_pending_slow_down_approve_on_the_page_redeem_once() {
    let ts = TestServer::start().await;
    let c = secret_client(&ts, "ciba-bot").await;
    let details = r#"[{"type":"payment_initiation","amount":{"currency":"EUR","value":"42.00"},"creditor":"<ACME & Co>"}]"#;
    let started = bc_authorize(
        &ts,
        &c,
        &[
            ("requested_expiry", "900"),
            ("audience", "None"),
            ("authorization_details", details),
            ("scope", "openid offline_access"),
        ],
    )
    .await;
    assert_eq!(started.status, 200, "{:?}", started.body);
    let auth_req_id = started.body["auth_req_id"].as_str().unwrap().to_owned();
    assert!(auth_req_id.len() >= 43, "≥ 256 bits: {auth_req_id}");
    assert_eq!(
        started.body["expires_in"], 300,
        "clamped to the server's maximum"
    );
    assert_eq!(started.body["interval"], 5);
    // Stored only as its hash.
    let pool = ts.sql_pool().await;
    let (hash,): (String,) = sqlx::query_as("SELECT req_hash FROM approvals")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_ne!(hash, auth_req_id);
    assert_eq!(
        hash,
        latchkey_crypto::secrets::sha256_b64(auth_req_id.as_bytes())
    );

    // Pending, then too fast.
    poll(&ts, &c, &auth_req_id)
        .await
        .assert_error(400, "authorization_pending");
    let fast = poll(&ts, &c, &auth_req_id).await;
    fast.assert_error(400, "slow_down");
    assert_eq!(fast.body["interval"], 10);
    assert_eq!(fast.headers.get("retry-after").unwrap(), "10");
    ts.clock.advance(10);
    poll(&ts, &c, &auth_req_id)
        .await
        .assert_error(400, "authorization_pending");

    // The user sees exactly what was asked, and approves.
    let approval = newest_approval(&ts);
    let id = approval["id"].as_str().unwrap().to_owned();
    assert_eq!(approval["status"], "pending");
    assert_eq!(approval["risk"], "medium");
    assert_eq!(approval["binding_message"], "Confirm 42");
    assert_eq!(
        approval["authorization_details"],
        serde_json::from_str::<Value>(details).unwrap()
    );
    assert!(approval.get("auth_req_id").is_none());
    assert_eq!(password_step(&ts, &ts.info.password).await.0, 303);
    let (status, _, list) = ts.browse("/ui/approvals").await;
    assert_eq!(status, 200);
    assert!(list.contains(&id), "{list}");
    let (status, _, page) = ts.browse(&format!("/ui/approvals/{id}")).await;
    assert_eq!(status, 200);
    for shown in [
        "ciba-bot",
        c.id.as_str(),
        "Confirm 42",
        "offline_access",
        "medium",
        // Verbatim, escaped.
        "&#34;creditor&#34;:&#34;&#60;ACME &#38; Co&#62;&#34;",
    ] {
        assert!(page.contains(shown), "{shown} in {page}");
    }
    assert!(!page.contains("<ACME"), "escaped");
    let csrf = hidden_field(&page, "csrf");
    let (status, location, _) = ts
        .submit(
            &format!("/ui/approvals/{id}"),
            &[("csrf", &csrf), ("decision", "approve")],
        )
        .await;
    assert_eq!(status, 303);
    assert!(location.unwrap().ends_with(&format!("/ui/approvals/{id}")));
    // Decided: no more form.
    let (_, _, page) = ts.browse(&format!("/ui/approvals/{id}")).await;
    assert!(page.contains("approved by user:"), "{page}");
    assert!(!page.contains("value=\"deny\""), "{page}");

    // Tokens: an ID token for this client, an access token, a refresh token, the details.
    ts.clock.advance(10);
    let done = poll(&ts, &c, &auth_req_id).await;
    assert_eq!(done.status, 200, "{:?}", done.body);
    assert_eq!(done.body["token_type"], "Bearer");
    assert!(done.body["expires_in"].is_i64());
    assert!(done.body["refresh_token"].is_string());
    assert_eq!(
        done.body["authorization_details"],
        serde_json::from_str::<Value>(details).unwrap()
    );
    let id_token = claims_unverified(done.body["id_token"].as_str().unwrap());
    assert_eq!(id_token["iss"], ts.issuer);
    assert_eq!(id_token["aud"], c.id);
    assert_eq!(id_token["sub"], ts.info.user_id);
    let (status, me, _) = userinfo(&ts, done.token()).await;
    assert_eq!(
        (status, me["sub"].as_str()),
        (200, Some(ts.info.user_id.as_str()))
    );

    // Redeemable once.
    ts.clock.advance(10);
    poll(&ts, &c, &auth_req_id)
        .await
        .assert_error(400, "invalid_grant");

    // The trail: requested, approved, redeemed (with tokens issued), each with its reason.
    let request = &entries(&ts, "approval.request").await[0];
    assert_eq!(
        (request.actor_id.as_str(), request.decision.as_str()),
        (c.id.as_str(), "allow")
    );
    assert!(request.reason.as_deref().unwrap().starts_with(&id));
    assert!(request.reason.as_deref().unwrap().ends_with("Confirm 42"));
    let approve = &entries(&ts, "approval.approve").await[0];
    assert_eq!(
        (
            approve.actor_type.as_str(),
            approve.actor_id.as_str(),
            approve.subject_user.as_deref()
        ),
        (
            "user",
            ts.info.user_id.as_str(),
            Some(ts.info.user_id.as_str())
        )
    );
    assert_eq!(
        approve.reason.as_deref(),
        Some(format!("{id}: approved").as_str())
    );
    assert!(approve.request_id.is_some());
    let redeem = &entries(&ts, "approval.redeem").await[0];
    assert!(redeem.reason.as_deref().unwrap().contains("tokens issued"));
    assert_eq!(entries(&ts, "token.issue").await.len(), 1);
    // Polls that only waited wrote nothing.
    assert!(
        entries(&ts, "token.deny").await.iter().all(|e| e
            .reason
            .as_deref()
            .unwrap()
            .starts_with("invalid_grant")),
        "pending and slow_down polls are not audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciba_denied_and_expired_answer_access_denied() {
    let ts = TestServer::start().await;
    let c = secret_client(&ts, "ciba-bot").await;

    // Denied by the operator.
    let started = bc_authorize(&ts, &c, &[]).await;
    let denied_id = started.body["auth_req_id"].as_str().unwrap().to_owned();
    let id = newest_approval(&ts)["id"].as_str().unwrap().to_owned();
    let out = ts.cli_ok(&["approvals", "list"]);
    assert!(out.contains(&id) && out.contains("Confirm 42"), "{out}");
    ts.cli_ok(&["approvals", "deny", &id, "--note", "not expected"]);
    poll(&ts, &c, &denied_id)
        .await
        .assert_error(400, "access_denied");
    ts.clock.advance(10);
    poll(&ts, &c, &denied_id)
        .await
        .assert_error(400, "access_denied");
    let out = ts.cli(&["approvals", "approve", &id]);
    assert!(!out.status.success(), "decided once");
    let deny = &entries(&ts, "approval.deny").await[0];
    assert_eq!(
        (
            deny.actor_type.as_str(),
            deny.auth_method.as_str(),
            deny.decision.as_str()
        ),
        ("operator", "cli", "deny")
    );
    assert_eq!(
        deny.reason.as_deref(),
        Some(format!("{id}: denied (not expected)").as_str())
    );

    // Expired: the deadline passes without a decision.
    let started = bc_authorize(&ts, &c, &[("requested_expiry", "60")]).await;
    assert_eq!(started.body["expires_in"], 60);
    let expired_id = started.body["auth_req_id"].as_str().unwrap().to_owned();
    let id = newest_approval(&ts)["id"].as_str().unwrap().to_owned();
    ts.clock.advance(61);
    poll(&ts, &c, &expired_id)
        .await
        .assert_error(400, "access_denied");
    let expire = &entries(&ts, "approval.expire").await[0];
    assert_eq!(
        (expire.actor_id.as_str(), expire.decision.as_str()),
        ("vault", "deny")
    );
    assert_eq!(
        expire.reason.as_deref(),
        Some(format!("{id}: not decided in time").as_str())
    );
    assert_eq!(newest_approval(&ts)["status"], "expired");
    let out = ts.cli(&["approvals", "approve", &id]);
    assert!(
        !out.status.success(),
        "an expired request cannot be approved"
    );

    // The periodic sweep expires what nobody polls.
    bc_authorize(&ts, &c, &[("requested_expiry", "30")]).await;
    ts.clock.advance(31);
    assert_eq!(ts.vault.expire_approvals(100).await.unwrap(), 1);
    assert_eq!(newest_approval(&ts)["status"], "expired");
    assert_eq!(entries(&ts, "approval.expire").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_req_id_is_bound_to_its_client_and_unguessable() {
    let ts = TestServer::start().await;
    let c = secret_client(&ts, "ciba-bot").await;
    let other = secret_client(&ts, "other-bot").await;
    let started = bc_authorize(&ts, &c, &[]).await;
    let auth_req_id = started.body["auth_req_id"].as_str().unwrap().to_owned();
    let id = newest_approval(&ts)["id"].as_str().unwrap().to_owned();
    ts.cli_ok(&["approvals", "approve", &id]);

    // Another client cannot redeem it (and learns nothing: as unknown as a guess).
    poll(&ts, &other, &auth_req_id)
        .await
        .assert_error(400, "invalid_grant");
    // Guesses: random ids, and near misses of the real one.
    let mut guesses: Vec<String> = (0..99_000)
        .map(|_| latchkey_crypto::secrets::random_token(32))
        .collect();
    for i in 0..1_000 {
        let mut near: Vec<char> = auth_req_id.chars().collect();
        let at = i % near.len();
        near[at] = if near[at] == 'A' { 'B' } else { 'A' };
        guesses.push(near.into_iter().collect());
    }
    let mut tasks = Vec::new();
    for chunk in guesses.chunks(guesses.len() / GUESS_TASKS) {
        let chunk = chunk.to_vec();
        let vault = ts.vault.clone();
        let (id, secret) = (c.id.clone(), c.secret.clone());
        tasks.push(tokio::spawn(async move {
            let mut answers = std::collections::HashMap::<&'static str, usize>::new();
            for guess in chunk {
                let params = latchkey_core::params::Params::from_pairs(
                    [
                        ("grant_type", CIBA),
                        ("client_id", &id),
                        ("client_secret", &secret),
                        ("auth_req_id", &guess),
                    ]
                    .map(|(k, v)| (k.to_owned(), v.to_owned())),
                )
                .unwrap();
                let code = match vault.token(&params, None, &Default::default()).await {
                    Ok(_) => "released",
                    Err(e) => e.code,
                };
                *answers.entry(code).or_default() += 1;
            }
            answers
        }));
    }
    let mut refused = 0;
    for t in tasks {
        let answers = t.await.unwrap();
        assert_eq!(
            answers.keys().collect::<Vec<_>>(),
            vec![&"invalid_grant"],
            "{answers:?}"
        );
        refused += answers["invalid_grant"];
    }
    assert_eq!(refused, 100_000);
    // The owner still redeems it, once.
    assert_eq!(poll(&ts, &c, &auth_req_id).await.status, 200);
    poll(&ts, &c, &auth_req_id)
        .await
        .assert_error(400, "invalid_grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bc_authorize_refuses_bad_requests_and_changes_nothing() {
    let ts = TestServer::start().await;
    let c = secret_client(&ts, "ciba-bot").await;
    let hint =
        |iss: &str, sub: &str| json!({"format": "iss_sub", "iss": iss, "sub": sub}).to_string();
    let without_slash = hint(ts.issuer.trim_end_matches('/'), &ts.info.user_id);
    let foreign = hint("https://elsewhere.example/", &ts.info.user_id);
    let nobody = hint(&ts.issuer, "usr_nobody");
    let long_message = "x".repeat(65);
    // (parameters changed, status, error code)
    type Case<'a> = (Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (vec![("scope", "")], 400, "invalid_request"),
        (vec![("scope", "profile")], 400, "invalid_scope"),
        (vec![("login_hint", "")], 400, "invalid_request"),
        (vec![("login_hint", "usr_x")], 400, "invalid_request"),
        (vec![("login_hint", &foreign)], 400, "invalid_request"),
        (vec![("login_hint", &nobody)], 400, "unknown_user_id"),
        (vec![("id_token_hint", "x.y.z")], 400, "invalid_request"),
        (
            vec![("binding_message", "<script>")],
            400,
            "invalid_request",
        ),
        (
            vec![("binding_message", &long_message)],
            400,
            "invalid_request",
        ),
        (vec![("requested_expiry", "0")], 400, "invalid_request"),
        (vec![("requested_expiry", "soon")], 400, "invalid_request"),
        (
            vec![("audience", "https://api.unknown")],
            400,
            "invalid_target",
        ),
        (
            vec![("authorization_details", "{\"type\":\"x\"}")],
            400,
            "invalid_authorization_details",
        ),
        (
            vec![("authorization_details", "[{\"no\":\"type\"}]")],
            400,
            "invalid_authorization_details",
        ),
        (vec![("client_secret", "wrong")], 401, "invalid_client"),
    ];
    for (changes, status, code) in &cases {
        let a = bc_authorize(&ts, &c, changes).await;
        a.assert_error(*status, code);
    }
    let pool = ts.sql_pool().await;
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM approvals")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing was created");
    pool.close().await;
    let refusals = entries(&ts, "approval.request").await;
    assert_eq!(
        refusals.len(),
        cases.len() - 1,
        "each refusal is recorded once"
    );
    assert!(refusals.iter().all(|e| e.decision == "deny"));
    assert_eq!(entries(&ts, "client.authenticate").await.len(), 1);

    // Tolerated: the issuer without its slash, an empty audience, `audience=None`.
    for changes in [
        vec![("login_hint", without_slash.as_str())],
        vec![("audience", "")],
        vec![("audience", "None"), ("binding_message", "Other 1")],
    ] {
        let a = bc_authorize(&ts, &c, &changes).await;
        assert_eq!(a.status, 200, "{changes:?}: {:?}", a.body);
    }

    // A user with no way to see the request (no password, no webhook): invalid_request,
    // which the AI SDKs report as "no notification channel".
    let ghost = ts
        .vault
        .add_user("ghost", None, Role::User, &Actor::cli())
        .await
        .unwrap();
    bc_authorize(&ts, &c, &[("login_hint", &hint(&ts.issuer, &ghost.id))])
        .await
        .assert_error(400, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_collapse_and_pending_requests_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let config = latchkey_server::Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        approvals_pending_per_user: 3,
        approvals_pending_per_agent: 2,
        outbound_allow: loopback_allowed(),
        ..Default::default()
    };
    let ts = TestServer::start_with(dir, config).await;
    let c = secret_client(&ts, "ciba-bot").await;
    let first = bc_authorize(&ts, &c, &[]).await;
    let again = bc_authorize(&ts, &c, &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(
        first.body["auth_req_id"], again.body["auth_req_id"],
        "an identical pending request is the same request"
    );
    assert_eq!(
        entries(&ts, "approval.request").await.len(),
        1,
        "one prompt"
    );
    // Per agent: a second distinct request fits, a third does not.
    assert_eq!(
        bc_authorize(&ts, &c, &[("binding_message", "Second")])
            .await
            .status,
        200
    );
    let over = bc_authorize(&ts, &c, &[("binding_message", "Third")]).await;
    over.assert_error(429, "too_many_requests");
    let wait: i64 = over
        .headers
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&wait), "{wait}");
    // Per user: another agent adds one more, then the user's cap holds.
    let other = secret_client(&ts, "other-bot").await;
    assert_eq!(bc_authorize(&ts, &other, &[]).await.status, 200);
    bc_authorize(&ts, &other, &[("binding_message", "Fourth")])
        .await
        .assert_error(429, "too_many_requests");
    // A decision frees a place.
    let id = newest_approval(&ts)["id"].as_str().unwrap().to_owned();
    ts.cli_ok(&["approvals", "deny", &id]);
    assert_eq!(
        bc_authorize(&ts, &other, &[("binding_message", "Fourth")])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_advertises_ciba() {
    let ts = TestServer::start().await;
    let d: Value = ts
        .http
        .get(ts.url("/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        d["backchannel_authentication_endpoint"],
        ts.url("/bc-authorize")
    );
    assert_eq!(
        d["backchannel_token_delivery_modes_supported"],
        json!(["poll"])
    );
    assert!(
        d["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&json!(CIBA))
    );
}

// --- exchanges held for approval ---------------------------------------------------------------

/// Grant the demo agent `scopes` on demo-git with `--risk` overrides, through the CLI.
fn grant(ts: &TestServer, scopes: &str, risks: &[&str]) {
    let mut args = vec![
        "agent",
        "grant",
        ts.info.agent_id.as_str(),
        "--connection",
        "demo-git",
        "--scopes",
        scopes,
    ];
    for r in risks {
        args.extend(["--risk", r]);
    }
    ts.cli_ok(&args);
}

/// The demo agent's privileged-worker exchange for `scope`.
fn exchange(ts: &TestServer, scope: &str) -> Vec<(String, String)> {
    let mut p = ts.exchange_params();
    p.push(("scope".into(), scope.into()));
    p
}

/// The demo agent polls the CIBA grant (private_key_jwt).
async fn agent_poll(ts: &TestServer, auth_req_id: &str) -> Answer {
    ts.post_form(
        &[
            ("grant_type", CIBA.to_owned()),
            ("client_id", ts.info.agent_id.clone()),
            ("client_assertion_type", JWT_BEARER.to_owned()),
            ("client_assertion", ts.assertion(json!({}))),
            ("auth_req_id", auth_req_id.to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    )
    .await
}

/// An exchange the policy holds: 403 `authorization_pending` with what to poll. Returns the
/// `auth_req_id` and the approval's id.
async fn held(ts: &TestServer, scope: &str) -> (String, String) {
    let releases = ts.releases().await;
    let a = ts.post_form(&exchange(ts, scope)).await;
    a.assert_error(403, "authorization_pending");
    assert_eq!(ts.releases().await, releases);
    assert_eq!(a.body["interval"], 5);
    assert!(a.body["expires_in"].as_i64().unwrap() > 0);
    let uri = a.body["approval_uri"].as_str().unwrap();
    let id = uri.rsplit('/').next().unwrap().to_owned();
    assert_eq!(uri, ts.url(&format!("/ui/approvals/{id}")));
    (a.body["auth_req_id"].as_str().unwrap().to_owned(), id)
}

async fn approval_status(ts: &TestServer, id: &str) -> latchkey_core::model::Approval {
    ts.vault.store().approval(id).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_covers_exactly_the_request_it_was_shown_for() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    grant(&ts, "read:user repo:read", &["repo:read=medium"]);

    // Scope A (medium) is held; asking again is the same request, not a second prompt.
    let (auth_req_id, id) = held(&ts, "repo:read").await;
    let (again, same) = held(&ts, "repo:read").await;
    assert_eq!(
        (again.as_str(), same.as_str()),
        (auth_req_id.as_str(), id.as_str())
    );
    assert_eq!(entries(&ts, "approval.request").await.len(), 1);
    agent_poll(&ts, &auth_req_id)
        .await
        .assert_error(400, "authorization_pending");
    let a = approval_status(&ts, &id).await;
    assert_eq!(
        (a.kind.as_str(), a.connection.as_deref(), a.risk.as_str()),
        ("exchange", Some("demo-git"), "medium")
    );
    assert_eq!(a.scopes.to_string_spaced(), "repo:read");
    assert_eq!(a.audit_context.as_deref(), Some("integration test"));
    assert!(!a.single_use && !a.step_up);

    // The user approves on the page (medium: no step-up).
    assert_eq!(password_step(&ts, &ts.info.password).await.0, 303);
    let (_, _, page) = ts.browse(&format!("/ui/approvals/{id}")).await;
    for shown in [
        "demo-agent",
        "demo-git",
        "repo:read",
        "medium",
        "integration test",
    ] {
        assert!(page.contains(shown), "{shown} in {page}");
    }
    assert!(!page.contains("name=\"code\""), "no step-up for medium");
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            &format!("/ui/approvals/{id}"),
            &[("csrf", &csrf), ("decision", "approve")],
        )
        .await;
    assert_eq!(status, 303);

    // The CIBA grant now answers the Token Vault response: the upstream token for exactly
    // the approved connection and scopes.
    let done = agent_poll(&ts, &auth_req_id).await;
    assert_eq!(done.status, 200, "{:?}", done.body);
    assert_eq!(done.body["scope"], "repo:read");
    assert_eq!(done.body["token_type"], "Bearer");
    assert_eq!(done.body["issued_token_type"], VAULT_TOKEN_TYPE);
    assert!(done.body.get("id_token").is_none());
    assert_eq!(ts.demo_api(done.token(), "repos").await.0, 200);
    assert_eq!(
        ts.demo_api(done.token(), "user").await.0,
        403,
        "narrowed to the approved scope"
    );
    let release = &entries(&ts, "token.release").await[0];
    assert!(release.reason.as_deref().unwrap().contains(&id));
    // Once.
    agent_poll(&ts, &auth_req_id)
        .await
        .assert_error(400, "invalid_grant");

    // Not single use: the identical exchange goes ahead while the approval lasts…
    let a = ts.post_form(&exchange(&ts, "repo:read")).await;
    assert_eq!(a.body["scope"], "repo:read", "{:?}", a.body);
    // …but a request for more (A + B) is another request: a new approval is needed.
    let (wider, wider_id) = held(&ts, "read:user repo:read").await;
    assert_ne!(
        (wider.as_str(), wider_id.as_str()),
        (auth_req_id.as_str(), id.as_str())
    );
    // Once the window ends, A needs asking again too.
    ts.clock.advance(301);
    let (_, later) = held(&ts, "repo:read").await;
    assert_ne!(later, id);
    ts.vault.expire_approvals(100).await.unwrap();
    assert_eq!(approval_status(&ts, &id).await.status.as_str(), "expired");
    // (The wider request expires in the same sweep, in no particular order.)
    let lapsed = entries(&ts, "approval.expire").await;
    let reasons: Vec<_> = lapsed.iter().filter_map(|e| e.reason.as_deref()).collect();
    assert!(
        reasons.contains(&format!("{id}: approved, but its window ended").as_str()),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_approvals_need_step_up_and_serve_one_release() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    grant(&ts, "read:user repo:read", &["repo:read=critical"]);
    let seed = crate::login::enrol(&ts);
    ts.clock.advance(30);
    // Signed in with password and code; then longer ago than the step-up window.
    assert_eq!(password_step(&ts, &ts.info.password).await.0, 303);
    let code = latchkey_crypto::totp::code_at(&seed, ts.now());
    assert_eq!(crate::login::code_step(&ts, &code).await.0, 303);
    ts.clock.advance(6 * 60);

    let (auth_req_id, id) = held(&ts, "repo:read").await;
    let a = approval_status(&ts, &id).await;
    assert!(a.single_use && a.step_up && a.risk == "critical");
    let (_, _, page) = ts.browse(&format!("/ui/approvals/{id}")).await;
    assert!(page.contains("name=\"code\""), "the page asks for the code");
    let decide = |code: Option<String>| {
        let (ts, id) = (&ts, &id);
        async move {
            let (_, _, page) = ts.browse(&format!("/ui/approvals/{id}")).await;
            let csrf = hidden_field(&page, "csrf");
            let mut form = vec![("csrf", csrf), ("decision", "approve".to_owned())];
            if let Some(c) = code {
                form.push(("code", c));
            }
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, _, body) = ts.submit(&format!("/ui/approvals/{id}"), &form).await;
            (status.as_u16(), body)
        }
    };
    // Without a recent code: refused until the code is given.
    let (status, body) = decide(None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("needs a current code"), "{body}");
    // A wrong code: still pending, and recorded.
    let right = latchkey_crypto::totp::code_at(&seed, ts.now());
    let wrong = if right == "111111" {
        "222222"
    } else {
        "111111"
    };
    let (status, body) = decide(Some(wrong.into())).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(approval_status(&ts, &id).await.status.as_str(), "pending");
    agent_poll(&ts, &auth_req_id)
        .await
        .assert_error(400, "authorization_pending");
    let failed = &entries(&ts, "approval.approve").await[0];
    assert_eq!(failed.decision, "deny");
    assert_eq!(
        failed.reason.as_deref(),
        Some(format!("{id}: step-up failed (wrong TOTP code); still pending").as_str())
    );
    // The right code: approved, stepped up.
    let (status, body) = decide(Some(right)).await;
    assert_eq!(status, 303, "{body}");
    let a = approval_status(&ts, &id).await;
    assert_eq!(a.status.as_str(), "approved");
    assert!(a.stepped_up);
    let approved = &entries(&ts, "approval.approve").await[0];
    assert_eq!(
        (approved.decision.as_str(), approved.auth_method.as_str()),
        ("allow", "session+totp")
    );
    assert_eq!(
        approved.reason.as_deref(),
        Some(format!("{id}: approved with step-up").as_str())
    );

    // One release: the CIBA grant gives the token, and nothing else is covered.
    ts.clock.advance(5);
    assert_eq!(agent_poll(&ts, &auth_req_id).await.status, 200);
    let (_, next) = held(&ts, "repo:read").await;
    assert_ne!(next, id, "a critical approval cannot be used twice");
    assert_eq!(approval_status(&ts, &id).await.status.as_str(), "redeemed");

    // Within the step-up window the code is not asked again (and the approval says so); this
    // time the exchange itself is repeated, once.
    let (_, _, page) = ts.browse(&format!("/ui/approvals/{next}")).await;
    assert!(!page.contains("name=\"code\""), "{page}");
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            &format!("/ui/approvals/{next}"),
            &[("csrf", &csrf), ("decision", "approve")],
        )
        .await;
    assert_eq!(status, 303);
    assert!(approval_status(&ts, &next).await.stepped_up);
    let first = ts.post_form(&exchange(&ts, "repo:read")).await;
    assert_eq!(first.body["scope"], "repo:read", "{:?}", first.body);
    let (_, third) = held(&ts, "repo:read").await;
    assert_ne!(third, next, "consumed by the first release");
    let redeem = &entries(&ts, "approval.redeem").await[0];
    assert_eq!(
        redeem.reason.as_deref(),
        Some(format!("{next}: consumed by an exchange (single use)").as_str())
    );

    // A user without a second factor cannot approve it at all.
    assert!(
        ts.cli(&["user", "mfa", "demo", "--disable"])
            .status
            .success()
    );
    let (_, _, page) = ts.browse(&format!("/ui/approvals/{third}")).await;
    let csrf = hidden_field(&page, "csrf");
    let (status, _, body) = ts
        .submit(
            &format!("/ui/approvals/{third}"),
            &[("csrf", &csrf), ("decision", "approve")],
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("second factor"), "{body}");
    let csrf = hidden_field(&body, "csrf");
    let (status, _, _) = ts
        .submit(
            &format!("/ui/approvals/{third}"),
            &[("csrf", &csrf), ("decision", "deny")],
        )
        .await;
    assert_eq!(status, 303, "denying needs no step-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_reach_the_user_by_signed_webhook() {
    use crate::health::{Receiver, assert_signed, deliver_until, header, server_with_webhook};
    let (ts, rx): (TestServer, Receiver) = server_with_webhook(false).await;
    ts.connect_demo_account().await;
    grant(&ts, "repo:read", &["repo:read=high"]);
    let (_, id) = held(&ts, "repo:read").await;
    deliver_until(&ts, &rx, 1).await;
    let (headers, body) = rx.requests()[0].clone();
    assert_eq!(header(&headers, "latchkey-event"), "approval.requested");
    assert_signed(&headers, &body);
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "approval.requested");
    let data = &event["data"];
    assert_eq!(data["id"], id.as_str());
    assert_eq!(data["approval_uri"], ts.url(&format!("/ui/approvals/{id}")));
    assert_eq!(data["agent"]["name"], "demo-agent");
    assert_eq!(data["username"], "demo");
    assert_eq!(data["connection"], "demo-git");
    assert_eq!(data["scopes"], json!(["repo:read"]));
    assert_eq!(data["risk"], "high");
    assert!(!body.contains("auth_req_id"), "no secret in the body");

    // (The server's own vault: a CLI process sends webhooks only when its configuration
    // names them, as the server's does.)
    ts.vault
        .decide_approval(
            &id,
            latchkey_core::vault::ApprovalDecision::Deny,
            Some("not now"),
            latchkey_core::vault::Decider::Operator(&Actor::cli()),
        )
        .await
        .unwrap();
    deliver_until(&ts, &rx, 2).await;
    let (headers, body) = rx.requests()[1].clone();
    assert_eq!(header(&headers, "latchkey-event"), "approval.decided");
    assert_signed(&headers, &body);
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            event["data"]["status"].as_str(),
            event["data"]["decided_by"].as_str()
        ),
        (Some("denied"), Some("operator:local"))
    );
}
