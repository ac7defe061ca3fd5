//! Fail closed: if the audit record cannot be written, nothing is released.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audit_no_token() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let pool = ts.sql_pool().await;
    sqlx::query("CREATE TRIGGER audit_down BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit sink down'); END")
        .execute(&pool)
        .await
        .unwrap();
    let (releases, jtis) = (ts.releases().await, ts.used_jtis().await);
    let a = ts.post_form(&ts.exchange_params()).await;
    a.assert_error(503, "temporarily_unavailable");
    assert!(a.headers.get("retry-after").is_some());
    assert_eq!(
        (ts.releases().await, ts.used_jtis().await),
        (releases, jtis),
        "the jti was not consumed either"
    );

    sqlx::query("DROP TRIGGER audit_down")
        .execute(&pool)
        .await
        .unwrap();
    ts.post_form(&ts.exchange_params()).await.token();
    pool.close().await;
}
