//! Discovery, keys, health, metrics, headers, and the other ways to serve (plain HTTP behind a
//! proxy, operator-supplied certificates).

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_keys_health_metrics() {
    let ts = TestServer::start().await;
    let get = |path: &str| ts.http.get(ts.url(path)).send();

    let resp = get("/.well-known/openid-configuration").await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let d: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(d["issuer"], ts.issuer);
    assert!(ts.issuer.starts_with("https://127.0.0.1:") && ts.issuer.ends_with('/'));
    assert_eq!(d["token_endpoint"], ts.url("/oauth/token"));

    let jwks: serde_json::Value = get("/.well-known/jwks.json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["alg"].as_str(),
            key["use"].as_str()
        ),
        (Some("RSA"), Some("RS256"), Some("sig"))
    );
    assert!(key.get("d").is_none(), "no private part");

    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);

    ts.connect_demo_account().await;
    ts.post_form(&ts.exchange_params()).await.token();
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    for needle in [
        "latchkey_exchanges_total",
        "outcome=\"released\"",
        "latchkey_http_requests_total",
        "latchkey_exchange_duration_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from /metrics");
    }

    let resp = get("/no/such/thing").await.unwrap();
    assert_eq!(resp.status(), 404);
    let h = resp.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    assert!(h.contains_key("strict-transport-security"));
    assert!(h.contains_key("x-request-id"));
    // GET on the token endpoint: a 405, not a 5xx.
    assert_eq!(get("/oauth/token").await.unwrap().status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificate_and_plain_http() {
    // First start generates a CA and a server certificate; reuse them as "operator-supplied".
    let ts = TestServer::start().await;
    let (dir, config) = ts.stop().await;
    let tls = config.data_dir.join("tls");
    let operator = latchkey_server::Config {
        tls_cert: Some(tls.join("server.pem")),
        tls_key: Some(tls.join("server-key.pem")),
        ..config.clone()
    };
    let ts = TestServer::start_with(dir, operator).await;
    assert_eq!(
        ts.http
            .get(ts.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (dir, config) = ts.stop().await;

    // --http: plain HTTP on loopback, for a TLS-terminating proxy in front.
    let http = latchkey_server::Config {
        http: true,
        ..config
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = latchkey_server::Server::with_listener(&http, listener, Default::default())
        .await
        .unwrap();
    let issuer = server.issuer.clone();
    assert!(issuer.starts_with("http://127.0.0.1:"));
    let task = tokio::spawn(server.run(std::future::pending()));
    let d: serde_json::Value = reqwest::get(format!("{issuer}.well-known/openid-configuration"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["issuer"], issuer);
    task.abort();
    drop(dir);
}
