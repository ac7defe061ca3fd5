//! The README walkthrough as a test: connect through the browser flow, exchange as the agent,
//! call the demo API, revoke with the CLI, and see the next exchange fail.

use crate::harness::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_exchange_call_revoke() {
    let ts = TestServer::start().await;

    // Before connecting, the exchange says what to do, with the connect URL.
    let a = ts.post_form(&ts.exchange_params()).await;
    a.assert_error(401, "federated_connection_refresh_token_not_found");
    assert_eq!(a.body["connect_uri"], json!(ts.url("/connect/demo-git")));

    let account = ts.connect_demo_account().await;

    // Exchange as the agent (private_key_jwt + privileged-worker subject JWT).
    let a = ts.post_form(&ts.exchange_params()).await;
    let token = a.token().to_owned();
    assert_eq!(a.body["token_type"], "Bearer");
    assert_eq!(a.body["issued_token_type"], VAULT_TOKEN_TYPE);
    assert_eq!(
        a.body["scope"], "issues:write read:user repo:read",
        "the grant, within the consent"
    );
    let expires_in = a.body["expires_in"].as_i64().unwrap();
    assert!(
        (290..=300).contains(&expires_in),
        "the upstream token's remaining life: {expires_in}"
    );

    // The upstream token works at the provider's API.
    let (status, user) = ts.demo_api(&token, "user").await;
    assert_eq!(
        (status.as_u16(), user["login"].as_str()),
        (200, Some("octo-demo"))
    );

    // Narrowing: only what the agent asks for, within its grant.
    // The provider honours narrowing, so the upstream token itself carries only that scope.
    let mut params = ts.exchange_params();
    params.push(("scope".into(), "repo:read".into()));
    let narrow = ts.post_form(&params).await;
    assert_eq!(narrow.body["scope"], "repo:read");
    assert_eq!(ts.demo_api(narrow.token(), "repos").await.0, 200);
    assert_eq!(ts.demo_api(narrow.token(), "user").await.0, 403);
    // The same scope set again is served from the vault, without another provider call.
    let refreshes = ts.demo.stats().refresh_grants;
    let mut params = ts.exchange_params();
    params.push(("scope".into(), "repo:read".into()));
    let again = ts.post_form(&params).await;
    assert_eq!(again.token(), narrow.token());
    assert_eq!(ts.demo.stats().refresh_grants, refreshes);

    // The release is on the audit trail, with who, for whom, what and why — and no token.
    let audit = ts.vault.store().list_audit(10).await.unwrap();
    let release = audit
        .iter()
        .find(|e| e.record.action == "token.release")
        .unwrap();
    assert_eq!(release.record.actor_id, ts.info.agent_id);
    assert_eq!(
        release.record.subject_user.as_deref(),
        Some(ts.info.user_id.as_str())
    );
    assert_eq!(
        release.record.audit_context.as_deref(),
        Some("integration test")
    );
    assert_eq!(release.record.auth_method, "private_key_jwt");
    assert!(
        !format!("{:?}", audit).contains(&token),
        "the audit trail never holds a token"
    );

    // The walkthrough's one command: `latchkey token` prints the upstream token.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args([
            "token",
            "--issuer",
            &ts.issuer,
            "--client-id",
            &ts.info.agent_id,
            "--user",
            &ts.info.user_id,
        ])
        .args(["--connection", "demo-git", "--ca-cert"])
        .arg(&ts.ca_path)
        .arg("--key")
        .arg(&ts.info.agent_key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(ts.demo_api(&cli_token, "repos").await.0, 200);

    // `account list` shows it; `account revoke` takes effect on the very next exchange.
    let list = ts.cli(&["account", "list", "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains(&account));
    let revocations_before = ts.demo.stats().revocations;
    let out = ts.cli(&["account", "revoke", &account]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("revoked its refresh token"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        ts.demo.stats().revocations,
        revocations_before + 1,
        "the provider was asked to revoke"
    );

    let releases = ts.releases().await;
    let a = ts.post_form(&ts.exchange_params()).await;
    a.assert_error(401, "federated_connection_refresh_token_not_found");
    assert_eq!(ts.releases().await, releases);
    // The provider revoked the whole token family: the earlier token is dead upstream too.
    assert_eq!(ts.demo_api(&token, "user").await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_json_body_and_basic() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let key =
        latchkey_crypto::jws::PublicKey::parse(&ts.agent_key.public.to_jwk_json(), None, None)
            .unwrap();
    let (agent, secret) = ts
        .vault
        .add_agent(
            "secret-agent",
            &[key],
            true,
            &latchkey_core::vault::Actor::cli(),
        )
        .await
        .unwrap();
    let secret = secrecy::ExposeSecret::expose_secret(&secret.unwrap()).to_owned();
    ts.vault
        .grant(
            &agent.id,
            "demo-git",
            latchkey_core::scope::Scopes::parse("repo:read"),
            vec![],
            &latchkey_core::vault::Actor::cli(),
        )
        .await
        .unwrap();
    let subject = |ts: &TestServer| ts.subject(json!({"iss": agent.id}));

    // JSON body, secret in the body (Auth0's Python SDK and @auth0/ai shape).
    let a = ts
        .post_json(&json!({
            "grant_type": GRANT, "client_id": agent.id, "client_secret": secret,
            "subject_token_type": JWT_TYPE, "subject_token": subject(&ts),
            "requested_token_type": VAULT_TOKEN_TYPE, "connection": "demo-git",
        }))
        .await;
    assert_eq!(a.body["scope"], "repo:read");
    a.token();

    // Secret without client_id (the Node SDK's tokenForConnection shape).
    let a = ts
        .post_json(&json!({
            "grant_type": GRANT, "client_secret": secret,
            "subject_token_type": JWT_TYPE, "subject_token": subject(&ts),
            "requested_token_type": VAULT_TOKEN_TYPE, "connection": "demo-git",
        }))
        .await;
    a.token();

    // HTTP Basic with client_id also in the form (Auth0's server-python shape).
    let resp = ts
        .http
        .post(ts.url("/oauth/token"))
        .basic_auth(&agent.id, Some(&secret))
        .form(&[
            ("grant_type", GRANT),
            ("client_id", &agent.id),
            ("subject_token_type", JWT_TYPE),
            ("subject_token", &subject(&ts)),
            (
                "requested_token_type",
                "http://auth0.com/oauth/token-type/federated-connection-access-token",
            ),
            ("connection", "demo-git"),
        ])
        .send()
        .await
        .unwrap();
    let a = Answer::read(resp).await;
    a.token();
    assert_eq!(
        a.body["issued_token_type"],
        "http://auth0.com/oauth/token-type/federated-connection-access-token"
    );

    // A wrong secret is invalid_client; so is a right secret with another client's id.
    let mut bad = json!({
        "grant_type": GRANT, "client_id": agent.id, "client_secret": "wrong",
        "subject_token_type": JWT_TYPE, "subject_token": subject(&ts),
        "requested_token_type": VAULT_TOKEN_TYPE, "connection": "demo-git",
    });
    ts.post_json(&bad).await.assert_error(401, "invalid_client");
    bad["client_secret"] = json!(secret);
    bad["client_id"] = json!(ts.info.agent_id);
    ts.post_json(&bad).await.assert_error(401, "invalid_client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_answers_are_bound_to_the_session_and_the_provider() {
    let ts = TestServer::start().await;
    let actor = latchkey_core::vault::Actor::cli();
    // The demo user starts a connect and approves at the provider…
    let (_, _, page) = ts.browse("/login?next=/connect/demo-git").await;
    let csrf = hidden_field(&page, "csrf");
    let (_, to_connect, _) = ts
        .submit(
            "/login",
            &[
                ("username", "demo"),
                ("password", &ts.info.password),
                ("csrf", &csrf),
                ("next", "/connect/demo-git"),
            ],
        )
        .await;
    let (_, to_provider, _) = ts.browse(&to_connect.unwrap()).await;
    let (_, _, consent) = ts.browse(&to_provider.unwrap()).await;
    let consent = hidden_field(&consent, "consent");
    let (_, callback, _) = ts
        .submit(
            "/demo/oauth/authorize",
            &[("consent", &consent), ("decision", "approve")],
        )
        .await;
    let callback = callback.unwrap();
    assert!(
        callback.starts_with(&ts.url("/connect/demo-git/callback?")),
        "each connection has its own callback"
    );
    // …but the answer is delivered in another user's session: refused, nothing connected.
    ts.vault
        .add_user(
            "mallory",
            Some("mallory's long password"),
            latchkey_core::model::Role::User,
            &actor,
        )
        .await
        .unwrap();
    ts.submit("/logout", &[]).await;
    let (_, _, page) = ts.browse("/login").await;
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            "/login",
            &[
                ("username", "mallory"),
                ("password", "mallory's long password"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(status, 303);
    let (status, _, body) = ts.browse(&callback).await;
    assert_eq!(status, 400);
    assert!(body.contains("another user"), "{body}");
    assert!(
        ts.vault
            .store()
            .list_accounts(None)
            .await
            .unwrap()
            .is_empty()
    );

    // An answer that arrives at another provider's callback is refused (mix-up defence).
    ts.vault
        .add_connection(
            latchkey_server::demo::demo_connection(&ts.vault, "other-git")
                .await
                .unwrap(),
            &actor,
        )
        .await
        .unwrap();
    let url = ts
        .vault
        .connect_start(&ts.info.user_id, "demo-git")
        .await
        .unwrap();
    let state = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let err = ts
        .vault
        .connect_finish(&ts.info.user_id, "other-git", &state, "code", None)
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_request");
    assert!(
        err.description.contains("other-git's callback"),
        "{}",
        err.description
    );
    assert!(
        ts.vault
            .store()
            .list_accounts(None)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cascades_from_the_cli() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
    let agent = ts.info.agent_id.clone();
    let run = |args: &[&str]| {
        let out = ts.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Removing the grant stops that grant at once.
    run(&["agent", "ungrant", &agent, "--connection", "demo-git"]);
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(403, "unauthorized_client");
    run(&[
        "agent",
        "grant",
        &agent,
        "--connection",
        "demo-git",
        "--scopes",
        "read:user",
    ]);
    ts.post_form(&ts.exchange_params()).await.token();

    // Disabling the agent stops everything it could do; enabling brings it back.
    run(&["agent", "disable", &agent]);
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "invalid_client");
    run(&["agent", "enable", &agent]);
    ts.post_form(&ts.exchange_params()).await.token();

    // Deleting the user revokes their accounts at the provider and removes everything of theirs.
    let revocations = ts.demo.stats().revocations;
    run(&["user", "delete", "demo"]);
    assert_eq!(
        ts.demo.stats().revocations,
        revocations + 1,
        "the provider was asked to revoke"
    );
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(400, "invalid_grant");
    assert!(
        ts.vault
            .store()
            .list_accounts(None)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        ts.vault
            .store()
            .user_by_username("demo")
            .await
            .unwrap()
            .is_none()
    );
    let actions: Vec<String> = ts
        .vault
        .store()
        .list_audit(50)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.record.action)
        .collect();
    for action in [
        "grant.delete",
        "client.disable",
        "client.enable",
        "account.revoke",
        "user.delete",
    ] {
        assert!(actions.iter().any(|a| a == action), "{action} is audited");
    }
    // The CLI says clearly when there is nothing to act on.
    run(&["agent", "ungrant", &agent, "--connection", "demo-git"]);
    let out = ts.cli(&["agent", "ungrant", &agent, "--connection", "demo-git"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no grant for `demo-git`"));
}
