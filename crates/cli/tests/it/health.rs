//! Connection health beyond the exchange: signed webhooks on failure and recovery, refreshes
//! a crash interrupted, and keep-alive refreshes of idle accounts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode as AxumStatus};
use latchkey_core::vault::webhook_signature;

use crate::harness::*;

pub(crate) const SECRET: &str = "a-webhook-secret-of-more-than-32-characters";

/// A webhook receiver on 127.0.0.1:0 that records every request and fails the first
/// `fail_next` of them with 500.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, String)>>>,
    fail_next: Arc<AtomicUsize>,
}

impl Receiver {
    pub(crate) async fn start() -> (String, Self) {
        let rx = Self::default();
        let state = rx.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(|headers: HeaderMap, body: String| async move {
                state.got.lock().unwrap().push((headers, body));
                let failing = state
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if failing {
                    AxumStatus::INTERNAL_SERVER_ERROR
                } else {
                    AxumStatus::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, rx)
    }

    pub(crate) fn requests(&self) -> Vec<(HeaderMap, String)> {
        self.got.lock().unwrap().clone()
    }
}

pub(crate) async fn server_with_webhook(audit_webhook: bool) -> (TestServer, Receiver) {
    let (url, rx) = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = latchkey_server::Config {
        data_dir: dir.path().join("data"),
        listen: "127.0.0.1:0".into(),
        webhook_url: Some(url),
        webhook_secret: Some(SECRET.into()),
        audit_webhook,
        outbound_allow: loopback_allowed(),
        ..Default::default()
    };
    (TestServer::start_with(dir, config).await, rx)
}

/// Deliver (moving the clock past each retry delay) until the receiver has seen `n` requests.
pub(crate) async fn deliver_until(ts: &TestServer, rx: &Receiver, n: usize) {
    for _ in 0..10 {
        ts.vault.deliver_webhooks(10).await;
        if rx.requests().len() >= n {
            return;
        }
        ts.clock.advance(70);
    }
    panic!(
        "only {} of {n} webhook requests arrived",
        rx.requests().len()
    );
}

pub(crate) fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).unwrap().to_str().unwrap()
}

/// The signature header checks out against the raw body.
pub(crate) fn assert_signed(h: &HeaderMap, body: &str) {
    let sig = header(h, "latchkey-signature");
    let t: i64 = sig
        .strip_prefix("t=")
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(sig, webhook_signature(SECRET.as_bytes(), t, body));
    assert_ne!(
        sig,
        webhook_signature(SECRET.as_bytes(), t, &format!("{body} "))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_report_failure_and_recovery_signed_and_retried() {
    let (ts, rx) = server_with_webhook(false).await;
    let account = ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
    assert!(rx.requests().is_empty(), "a first connect is no event");

    // The provider kills the grant; the next refresh finds out.
    let refresh = ts.stored_refresh_token(&account).await;
    ts.demo_client_post(
        "/demo/oauth/revoke",
        &[("token", &refresh), ("token_type_hint", "refresh_token")],
    )
    .await;
    rx.fail_next.store(2, Ordering::SeqCst);
    ts.clock.advance(301);
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");

    // Two failed attempts, then delivered: three requests of the same delivery.
    deliver_until(&ts, &rx, 3).await;
    let got = rx.requests();
    assert_eq!(got.len(), 3);
    let delivery = header(&got[0].0, "latchkey-delivery").to_owned();
    for (h, body) in &got {
        assert_eq!(
            header(h, "latchkey-delivery"),
            delivery,
            "retries keep the id"
        );
        assert_eq!(header(h, "latchkey-event"), "account.needs_reauth");
        assert_eq!(header(h, "content-type"), "application/json");
        assert_signed(h, body);
        assert!(!body.contains(&refresh), "no token in a webhook");
    }
    let event: serde_json::Value = serde_json::from_str(&got[2].1).unwrap();
    assert_eq!(event["type"], "account.needs_reauth");
    assert_eq!(event["data"]["account_id"], account.as_str());
    assert_eq!(event["data"]["status"], "needs_reauth");
    assert_eq!(event["data"]["connect_uri"], ts.url("/connect/demo-git"));
    assert!(
        event["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("refused the stored refresh token")
    );
    // Delivered: nothing more is sent.
    ts.clock.advance(4000);
    ts.vault.deliver_webhooks(10).await;
    assert_eq!(rx.requests().len(), 3);

    // The user reconnects: recovery is reported too.
    ts.connect_demo_account().await;
    deliver_until(&ts, &rx, 4).await;
    let (h, body) = &rx.requests()[3];
    assert_eq!(header(h, "latchkey-event"), "account.recovered");
    assert_ne!(header(h, "latchkey-delivery"), delivery);
    assert_signed(h, body);
    let event: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (
            event["data"]["account_id"].as_str(),
            event["data"]["status"].as_str()
        ),
        (Some(account.as_str()), Some("active"))
    );
    let pool = ts.sql_pool().await;
    let (delivered, attempts): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), SUM(attempts) FROM webhook_outbox WHERE delivered_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((delivered, attempts), (2, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_is_given_up_after_bounded_retries() {
    let (ts, rx) = server_with_webhook(false).await;
    let account = ts.connect_demo_account().await;
    let refresh = ts.stored_refresh_token(&account).await;
    ts.demo_client_post(
        "/demo/oauth/revoke",
        &[("token", &refresh), ("token_type_hint", "refresh_token")],
    )
    .await;
    rx.fail_next.store(usize::MAX, Ordering::SeqCst);
    ts.clock.advance(301);
    ts.post_form(&ts.exchange_params()).await;
    let mut given_up = 0;
    for _ in 0..20 {
        given_up += ts.vault.deliver_webhooks(10).await.given_up;
        ts.clock.advance(4000);
    }
    assert_eq!(given_up, 1);
    assert_eq!(rx.requests().len(), 8, "eight attempts, then no more");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_refresh_is_resolved_honestly() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
    let store = ts.vault.store();
    // A refresh whose outcome never got committed, the provider never having seen it (the
    // process died before the request left): the next pass refreshes and clears the mark.
    let version = store
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap()
        .token_version;
    let marked = store.mark_refresh_started(&account, version, ts.now());
    assert!(marked.await.unwrap());
    let before = ts.demo.stats().refresh_grants;
    let report = ts.vault.refresh_due(100, ts.now() + 1).await;
    assert_eq!((report.refreshed, report.failed), (1, 0));
    assert_eq!(ts.demo.stats().refresh_grants, before + 1);
    let a = store.account_by_id(&account).await.unwrap().unwrap();
    assert_eq!((a.status.as_str(), a.refresh_started_at), ("active", None));
    ts.post_form(&ts.exchange_params()).await.token();

    // The provider did rotate the token, and the answer was lost: the account is marked
    // needs_reauth with a reason that says so, never left silently broken.
    let refresh = ts.stored_refresh_token(&account).await;
    let lost = ts
        .demo_client_post(
            "/demo/oauth/token",
            &[("grant_type", "refresh_token"), ("refresh_token", &refresh)],
        )
        .await;
    assert_eq!(lost.0, 200, "{:?}", lost.1);
    ts.clock.advance(121); // past the first pass's claim on the account
    let marked = store.mark_refresh_started(&account, a.token_version, ts.now());
    assert!(marked.await.unwrap());
    let report = ts.vault.refresh_due(100, ts.now() + 1).await;
    assert_eq!((report.refreshed, report.failed), (0, 1));
    let a = store.account_by_id(&account).await.unwrap().unwrap();
    assert_eq!(a.status.as_str(), "needs_reauth");
    assert!(
        a.status_reason.as_deref().unwrap().contains("interrupted"),
        "{:?}",
        a.status_reason
    );
    let e = ts.post_form(&ts.exchange_params()).await;
    e.assert_error(401, "federated_connection_refresh_token_not_found");
    assert!(
        e.body["error_description"]
            .as_str()
            .unwrap()
            .contains("interrupted")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_accounts_are_kept_alive_on_their_connections_interval() {
    let ts = TestServer::start().await;
    sqlx::query("UPDATE connections SET keep_alive_secs = 86400 WHERE name = 'demo-git'")
        .execute(&ts.sql_pool().await)
        .await
        .unwrap();
    let account = ts.connect_demo_account().await;
    let before = ts.demo.stats().refresh_grants;
    assert_eq!(ts.vault.refresh_due(100, 0).await, Default::default());

    // Never used, a day later: refreshed once so the provider keeps the grant alive.
    ts.clock.advance(86_401);
    let report = ts.vault.refresh_due(100, 0).await;
    assert_eq!((report.refreshed, report.failed), (1, 0));
    assert_eq!(ts.demo.stats().refresh_grants, before + 1);
    let a = ts
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.last_refreshed_at, Some(ts.now()));
    ts.clock.advance(600);
    assert_eq!(ts.vault.refresh_due(100, 0).await, Default::default());
    assert_eq!(ts.demo.stats().refresh_grants, before + 1);
    // The stored pair still works.
    ts.post_form(&ts.exchange_params()).await.token();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_audit_entry_can_go_to_the_webhook() {
    let (ts, rx) = server_with_webhook(true).await;
    let pool = ts.sql_pool().await;
    let max = || async {
        sqlx::query_scalar::<_, i64>("SELECT MAX(seq) FROM audit_events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // The first start's key creation comes before the webhook is set up; the rest is sent.
    let first = max().await;
    let outbox = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM webhook_outbox")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = outbox().await as usize;
    ts.connect_demo_account().await;
    let token = ts.post_form(&ts.exchange_params()).await.token().to_owned();
    let last = max().await;
    deliver_until(&ts, &rx, before + (last - first) as usize).await;
    let got = rx.requests();
    let mut seqs = Vec::new();
    for (h, body) in &got {
        assert_eq!(header(h, "latchkey-event"), "audit.entry");
        assert_signed(h, body);
        assert!(!body.contains(&token), "no token in the audit sink");
        let e: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(e["mac"].as_str().map(str::len), Some(64), "{e}");
        seqs.push(e["seq"].as_i64().unwrap());
    }
    seqs.sort_unstable();
    let sent: Vec<i64> = seqs.iter().copied().filter(|s| *s > first).collect();
    assert_eq!(
        sent,
        (first + 1..=last).collect::<Vec<_>>(),
        "each entry once"
    );
    seqs.dedup();
    assert_eq!(seqs.len(), got.len(), "no entry sent twice");
    let release = got
        .iter()
        .map(|(_, b)| serde_json::from_str::<serde_json::Value>(b).unwrap())
        .find(|e| e["action"] == "token.release")
        .expect("the release is sent");
    assert_eq!(release["actor"]["type"], "agent");
    assert_eq!(release["target"]["connection"], "demo-git");
}
