//! Upstream refresh: single flight per connected account.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_exchanges_one_refresh() {
    let ts = std::sync::Arc::new(TestServer::start().await);
    ts.connect_demo_account().await;
    // The first exchange asks the provider for a token narrowed to the grant (one refresh).
    let old = ts.post_form(&ts.exchange_params()).await.token().to_owned();
    let before = ts.demo.stats().refresh_grants;
    assert_eq!(before, 1);

    // The demo provider's access tokens live 300 s: move past their expiry.
    ts.clock.advance(301);
    assert_eq!(
        ts.demo_api(&old, "user").await.0,
        401,
        "the old upstream token has expired"
    );

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let ts = ts.clone();
        let params = ts.exchange_params();
        tasks.push(tokio::spawn(async move { ts.post_form(&params).await }));
    }
    let mut tokens = std::collections::HashSet::new();
    for t in tasks {
        let a = t.await.unwrap();
        tokens.insert(a.token().to_owned());
        assert!(
            a.body["expires_in"].as_i64().unwrap() > 250,
            "a fresh token: {:?}",
            a.body
        );
    }
    assert_eq!(
        ts.demo.stats().refresh_grants,
        before + 1,
        "exactly one upstream refresh"
    );
    assert_eq!(tokens.len(), 1, "all 50 got the refreshed token");
    let fresh = tokens.into_iter().next().unwrap();
    assert_ne!(fresh, old);
    assert_eq!(ts.demo_api(&fresh, "user").await.0, 200);
    let account = &ts.vault.store().list_accounts(None).await.unwrap()[0];
    assert!(
        account
            .last_refreshed_at
            .is_some_and(|t| (t - ts.now()).abs() <= 5),
        "the refresh is recorded"
    );

    // The rotated refresh token was stored: a later expiry refreshes again, successfully.
    ts.clock.advance(301);
    let a = ts.post_form(&ts.exchange_params()).await;
    assert_eq!(ts.demo_api(a.token(), "repos").await.0, 200);
    assert_eq!(ts.demo.stats().refresh_grants, before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_refresh_token_asks_the_user_to_reconnect() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    // Kill the token family at the provider behind the vault's back.
    let refresh = ts.stored_refresh_token(&account).await;
    let revoked = ts
        .demo_client_post(
            "/demo/oauth/revoke",
            &[("token", &refresh), ("token_type_hint", "refresh_token")],
        )
        .await;
    assert_eq!(revoked.0, 200);
    ts.clock.advance(301);
    let a = ts.post_form(&ts.exchange_params()).await;
    a.assert_error(401, "federated_connection_refresh_token_not_found");
    assert!(
        a.body["error_description"]
            .as_str()
            .unwrap()
            .contains("refused the stored refresh token"),
        "the agent is told why: {:?}",
        a.body
    );
    let stored = ts
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status.as_str(), "needs_reauth");
    // Operators see the status and the reason.
    let out = ts.cli(&["account", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["status"], "needs_reauth");
    assert!(
        list[0]["status_reason"]
            .as_str()
            .unwrap()
            .contains("connect again")
    );
    // Reconnecting brings it back.
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_refresher_keeps_used_tokens_fresh() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
    let refreshes = ts.demo.stats().refresh_grants;

    // 200 s later the token has 100 s left: an exchange would not refresh it yet, the
    // refresher (window 120 s) does, ahead of time.
    ts.clock.advance(200);
    let report = ts.vault.refresh_due(100, 0).await;
    assert_eq!((report.refreshed, report.failed), (1, 0));
    assert_eq!(ts.demo.stats().refresh_grants, refreshes + 1);
    // Later, when the old token would have been expired, the exchange does not wait on the
    // provider: it gets the token the refresher stored.
    ts.clock.advance(120);
    let a = ts.post_form(&ts.exchange_params()).await;
    assert!(a.body["expires_in"].as_i64().unwrap() > 150, "{:?}", a.body);
    assert_eq!(
        ts.demo.stats().refresh_grants,
        refreshes + 1,
        "no refresh inside the exchange"
    );
    assert_eq!(ts.demo_api(a.token(), "user").await.0, 200);
    // Nothing is due right after: a second pass does nothing.
    assert_eq!(ts.vault.refresh_due(100, 0).await.refreshed, 0);

    // An account nobody used for a day is left alone.
    ts.clock.advance(25 * 3600);
    assert_eq!(ts.vault.refresh_due(100, 0).await, Default::default());
    assert_eq!(ts.demo.stats().refresh_grants, refreshes + 1);
}
