//! The exchange keeps agents, keys, connections and grants in memory (`vault/hot.rs`). These
//! tests change that configuration behind the running server's back — the `latchkey` CLI
//! (another process) and plain SQL on the database file — and check that the very next
//! exchange follows the change, and that under concurrent exchanges no token is released
//! once a revocation has committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use latchkey_crypto::Algorithm;
use latchkey_crypto::keygen::{SigningKey, generate};
use serde_json::json;

use crate::harness::*;

/// The demo agent's exchange for `scope`.
fn exchange(ts: &TestServer, scope: &str) -> Vec<(String, String)> {
    let mut p = ts.exchange_params();
    p.push(("scope".into(), scope.into()));
    p
}

/// The demo agent's exchange, signed (subject and client assertion) with `key`.
fn signed_by(ts: &TestServer, key: &SigningKey) -> Vec<(String, String)> {
    let (agent, now) = (&ts.info.agent_id, ts.now());
    let jti = || uuid::Uuid::new_v4().to_string();
    let subject = key.sign(
        Some("token-vault-req+jwt"),
        &json!({"iss": agent, "sub": ts.info.user_id, "aud": ts.issuer, "iat": now,
                "exp": now + 60, "jti": jti(), "audit_context": "config cache test"}),
    );
    let assertion = key.sign(
        None,
        &json!({"iss": agent, "sub": agent, "aud": ts.issuer, "iat": now, "exp": now + 60,
                "jti": jti()}),
    );
    ts.params_with(subject, assertion)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_elsewhere_apply_to_the_next_exchange() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();

    // Disabled and enabled again by another process.
    let agent = ts.info.agent_id.clone();
    ts.cli_ok(&["agent", "disable", &agent]);
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "invalid_client");
    ts.cli_ok(&["agent", "enable", &agent]);
    ts.post_form(&ts.exchange_params()).await.token();

    // A grant narrowed, then widened: a refusal decided from memory is checked again.
    ts.grant("repo:read", &[]);
    ts.post_form(&exchange(&ts, "read:user"))
        .await
        .assert_error(400, "invalid_scope");
    ts.grant("read:user repo:read", &[]);
    ts.post_form(&exchange(&ts, "read:user")).await.token();

    // The agent's key replaced in the database: the old key stops working at once, the new
    // one works at once.
    let pair = generate(Algorithm::RS256);
    let new_key = SigningKey::from_pem(&pair.private_pem, Algorithm::RS256, None).unwrap();
    let public =
        latchkey_crypto::jws::PublicKey::parse(&pair.public_pem, Some(Algorithm::RS256), None)
            .unwrap();
    let (kid, jwk) = (public.kid.clone(), public.to_jwk_json());
    let pool = ts.sql_pool().await;
    sqlx::query("DELETE FROM agent_keys WHERE agent_id = ?")
        .bind(&agent)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO agent_keys (agent_id, kid, alg, jwk, created_at) VALUES (?, ?, 'RS256', ?, 0)",
    )
    .bind(&agent)
    .bind(&kid)
    .bind(&jwk)
    .execute(&pool)
    .await
    .unwrap();
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "invalid_client");
    ts.post_form(&signed_by(&ts, &new_key)).await.token();

    // The grant deleted by hand: refused, though it was in memory a moment ago.
    sqlx::query("DELETE FROM grants WHERE agent_id = ?")
        .bind(&agent)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    ts.post_form(&signed_by(&ts, &new_key))
        .await
        .assert_error(403, "unauthorized_client");
}

/// Exchanges run concurrently while another process deletes the grant. Every exchange that
/// started after the deletion committed is refused; the ones before it succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_release_after_a_revocation_commits() {
    let ts = Arc::new(TestServer::start().await);
    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (ts, stop) = (ts.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let params = ts.exchange_params();
                let started = Instant::now();
                let status = ts.post_form(&params).await.status.as_u16();
                seen.push((started, status));
            }
            seen
        }));
    }
    // Let them run, then revoke from outside the server.
    while ts.releases().await < 40 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let pool = ts.sql_pool().await;
    sqlx::query("DELETE FROM grants WHERE agent_id = ?")
        .bind(&ts.info.agent_id)
        .execute(&pool)
        .await
        .unwrap();
    let committed = Instant::now();
    pool.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut before, mut after) = (0, 0);
    for w in workers {
        for (started, status) in w.await.unwrap() {
            if started > committed {
                assert_eq!(
                    status, 403,
                    "an exchange started after the revocation got {status}"
                );
                after += 1;
            } else if status == 200 {
                before += 1;
            }
        }
    }
    // The 40 releases waited for include the one made before the workers started.
    assert!(
        before >= 39,
        "{before} exchanges succeeded before the revocation"
    );
    assert!(after > 0, "no exchange ran after the revocation");
}
