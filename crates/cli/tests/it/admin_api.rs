//! The admin API (`/api/v1/*`) against a real server: bearer authentication with operator
//! tokens made by `latchkey api-token create`, every documented route refusing without one,
//! listings that never show a secret, changes that take effect for the very next exchange and
//! name the token in the audit trail, and problem answers for bad input.

use std::sync::Arc;

use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, account_slot};
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::harness::*;

const OPS: &str = "ops-bot";

/// An admin API answer, with the checks every answer must pass: never a 5xx for what a
/// client sent, errors as problem JSON, successes as JSON.
struct Reply {
    status: u16,
    headers: HeaderMap,
    text: String,
    body: Value,
}

impl Reply {
    fn www_authenticate(&self) -> &str {
        self.headers
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap())
            .unwrap_or_default()
    }

    fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or_default()
    }
}

/// `authorization` is the whole header value (so tests can send other schemes too).
async fn call_with(
    ts: &TestServer,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    body: Option<Vec<u8>>,
) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = ts.http.request(method.clone(), ts.url(path));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    // 503 is the storage being down (tested below), never the client's fault.
    assert!(
        status < 500 || status == 503,
        "no 5xx: {method} {path} → {status} {text}"
    );
    let content_type = headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = if status == 204 {
        assert!(text.is_empty());
        Value::Null
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path} → {status}: not JSON: {text}"))
    };
    if status >= 400 {
        assert_eq!(
            content_type.as_deref(),
            Some("application/problem+json"),
            "{method} {path} → {status}"
        );
        assert_eq!(body["status"], status, "{text}");
        assert!(
            body["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("https://")),
            "{text}"
        );
        assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    } else if status != 204 {
        assert_eq!(content_type.as_deref(), Some("application/json"));
    }
    Reply {
        status,
        headers,
        text,
        body,
    }
}

async fn call(ts: &TestServer, method: &str, path: &str, token: &str) -> Reply {
    call_with(ts, method, path, Some(&format!("Bearer {token}")), None).await
}

/// `latchkey api-token create NAME`: the secret it prints.
fn create_token(ts: &TestServer, name: &str) -> String {
    let out = ts.cli(&["api-token", "create", name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("lk_op_"), "{secret}");
    secret
}

async fn audit_len(ts: &TestServer) -> usize {
    ts.vault.store().list_audit(100_000).await.unwrap().len()
}

/// Assert an audit entry for `action` names the API token as its actor.
async fn assert_audited_by_token(ts: &TestServer, action: &str) {
    let entries = ts.vault.store().list_audit(100_000).await.unwrap();
    let entry = entries
        .iter()
        .rev()
        .find(|e| e.record.action == action)
        .unwrap_or_else(|| panic!("no `{action}` audit entry"));
    assert_eq!(
        (
            entry.record.actor_type.as_str(),
            entry.record.actor_id.as_str(),
            entry.record.auth_method.as_str()
        ),
        ("operator", OPS, "api_token"),
        "{action}"
    );
}

/// Start `n` exchanges (all after this call) and wait for their answers.
async fn exchanges(ts: &Arc<TestServer>, n: usize) -> Vec<Answer> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let ts = ts.clone();
            let params = ts.exchange_params();
            tokio::spawn(async move { ts.post_form(&params).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers
}

async fn assert_all_refused(ts: &Arc<TestServer>, n: usize, status: u16, code: &str) {
    let releases = ts.releases().await;
    for a in exchanges(ts, n).await {
        a.assert_error(status, code);
    }
    assert_eq!(ts.releases().await, releases, "0 of {n} released a token");
}

fn openapi_doc() -> Value {
    serde_json::from_str(include_str!("../../../server/src/http/openapi.json")).unwrap()
}

/// Every (method, path) the OpenAPI document describes, with its operation.
fn documented_operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["get", "put", "post", "delete", "patch"] {
            if let Some(op) = item.get(method) {
                ops.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    ops
}

fn fill(path: &str, account: &str, agent: &str, user: &str) -> String {
    let id = if path.contains("/accounts/") {
        account
    } else {
        agent
    };
    let filled = path
        .replace("{id}", id)
        .replace("{user}", user)
        .replace("{connection}", "demo-git");
    assert!(!filled.contains('{'), "unknown path parameter in {path}");
    filled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_refuses_without_a_valid_token() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    let token = create_token(&ts, OPS);
    let revoked = create_token(&ts, "retired");
    let out = ts.cli(&["api-token", "revoke", "retired"]);
    assert!(out.status.success());

    // The document itself: served without authentication, OpenAPI 3.1.
    let served = call_with(&ts, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(served.status, 200);
    assert!(
        served.body["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        served.body["openapi"]
    );
    assert_eq!(
        served.body,
        openapi_doc(),
        "the served document is the file"
    );
    assert_eq!(
        served.body["components"]["securitySchemes"]["operatorToken"]["scheme"],
        "bearer"
    );
    for schema in ["Problem", "Account", "User", "Connection", "Agent"] {
        assert!(
            served.body["components"]["schemas"].get(schema).is_some(),
            "{schema}"
        );
    }

    let ops = documented_operations(&served.body);
    assert_eq!(
        ops.len(),
        12,
        "{:?}",
        ops.iter().map(|o| &o.1).collect::<Vec<_>>()
    );
    let audit = audit_len(&ts).await;
    let presented: [(&str, Option<String>); 6] = [
        ("no token", None),
        ("another scheme", Some("Basic b3BzOnNlY3JldA==".into())),
        ("an empty bearer", Some("Bearer ".into())),
        ("garbage", Some("Bearer garbage".into())),
        (
            "an unknown operator token",
            Some(format!("Bearer lk_op_{}", "x".repeat(43))),
        ),
        ("a revoked token", Some(format!("Bearer {revoked}"))),
    ];
    let mut protected = 0;
    for (method, path, op) in &ops {
        if op.get("security") == Some(&json!([])) {
            assert_eq!(path, "/api/v1/openapi.json", "only the document is public");
            continue;
        }
        protected += 1;
        let url = fill(path, &account, &ts.info.agent_id, &ts.info.user_id);
        for (what, authorization) in &presented {
            let r = call_with(&ts, method, &url, authorization.as_deref(), None).await;
            assert_eq!(r.status, 401, "{method} {url} with {what}: {}", r.text);
            let challenge = r.www_authenticate();
            assert!(
                challenge.starts_with("Bearer realm=\"latchkey\""),
                "{method} {url} with {what}: {challenge:?}"
            );
            let bearer_presented = authorization
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer ") && a.len() > "Bearer ".len());
            assert_eq!(
                challenge.contains("error=\"invalid_token\""),
                bearer_presented,
                "{method} {url} with {what}: {challenge:?}"
            );
        }
    }
    assert_eq!(protected, 11);
    // Nothing was changed by any of it.
    assert_eq!(audit_len(&ts).await, audit, "no audit entry, no change");
    let stored = ts
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status.as_str(), "active");
    let agent = ts
        .vault
        .store()
        .agent_by_id(&ts.info.agent_id)
        .await
        .unwrap()
        .unwrap();
    assert!(!agent.disabled);
    assert!(
        ts.vault
            .store()
            .user_by_id(&ts.info.user_id)
            .await
            .unwrap()
            .is_some()
    );
    ts.post_form(&ts.exchange_params()).await.token();

    // With the token every documented route exists: reads answer 200, changes to things that
    // do not exist answer 404 (not 405, not 5xx).
    for (method, path, _) in &ops {
        let r = if method == "GET" {
            let url = fill(path, &account, &ts.info.agent_id, &ts.info.user_id);
            let r = call(&ts, method, &url, &token).await;
            assert_eq!(r.status, 200, "{method} {url}: {}", r.text);
            r
        } else {
            let url = fill(path, "cac_missing", "agt_missing", "usr_missing");
            let r = call(&ts, method, &url, &token).await;
            assert_eq!(r.status, 404, "{method} {url}: {}", r.text);
            r
        };
        assert!(
            r.headers.get("www-authenticate").is_none(),
            "{method} {path}"
        );
    }
    // The token's use is recorded (`api-token list` shows it).
    let out = ts.cli(&["api-token", "list", "--json"]);
    let tokens: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ops_token = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == OPS)
        .unwrap();
    assert!(ops_token["last_used_at"].is_i64(), "{ops_token}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_show_status_and_never_a_secret() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    let token = create_token(&ts, OPS);
    let upstream_token = ts.post_form(&ts.exchange_params()).await.token().to_owned();

    // The provider refuses the account's refresh token (killed behind the vault's back).
    let stored = ts
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap();
    let refresh = ts
        .vault
        .keys
        .open_string(
            account_slot(&account, "refresh_token"),
            stored.refresh_token.as_deref().unwrap(),
        )
        .await
        .unwrap();
    let client_secret = latchkey_server::demo::demo_client_secret(&ts.vault)
        .await
        .unwrap();
    let resp = ts
        .http
        .post(ts.url("/demo/oauth/revoke"))
        .basic_auth(
            latchkey_server::demo::DEMO_CLIENT_ID,
            Some(client_secret.clone()),
        )
        .form(&[
            ("token", refresh.expose_secret()),
            ("token_type_hint", "refresh_token"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    ts.clock.advance(301);
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");

    let mut bodies = Vec::new();
    let r = call(&ts, "GET", "/api/v1/accounts?status=needs_reauth", &token).await;
    assert_eq!(r.status, 200);
    let list = r.body["accounts"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{}", r.text);
    let shown = &list[0];
    assert_eq!(shown["id"], account.as_str());
    assert_eq!(shown["status"], "needs_reauth");
    assert!(
        shown["status_reason"]
            .as_str()
            .unwrap()
            .contains("connect again"),
        "{shown}"
    );
    assert_eq!(shown["user_id"], ts.info.user_id.as_str());
    assert_eq!(shown["connection"], "demo-git");
    let mut keys: Vec<&str> = shown
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "connection",
            "created_at",
            "id",
            "last_refreshed_at",
            "last_used_at",
            "scopes",
            "status",
            "status_reason",
            "updated_at",
            "upstream_account_id",
            "user_id"
        ]
    );
    assert!(
        shown["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("repo:read"))
    );
    // Timestamps are RFC 3339.
    let created = shown["created_at"].as_str().unwrap();
    time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| panic!("{created}"));
    bodies.push(r.text);

    for (query, expected) in [
        ("status=active", 0),
        ("status=revoked", 0),
        ("status=needs_reauth&connection=demo-git", 1),
        ("user=demo", 1),
        (&format!("user={}", ts.info.user_id) as &str, 1),
        ("connection=demo-git", 1),
        ("", 1),
    ] {
        let r = call(&ts, "GET", &format!("/api/v1/accounts?{query}"), &token).await;
        assert_eq!(r.status, 200, "{query}: {}", r.text);
        assert_eq!(
            r.body["accounts"].as_array().unwrap().len(),
            expected,
            "{query}"
        );
        bodies.push(r.text);
    }
    let r = call(&ts, "GET", &format!("/api/v1/accounts/{account}"), &token).await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("needs_reauth"))
    );
    bodies.push(r.text);

    let r = call(&ts, "GET", "/api/v1/users", &token).await;
    assert_eq!(
        r.body["users"],
        json!([{
            "id": ts.info.user_id, "username": "demo",
            "created_at": r.body["users"][0]["created_at"], "totp_enabled": false,
            "role": "operator",
        }])
    );
    bodies.push(r.text);

    let r = call(&ts, "GET", "/api/v1/connections", &token).await;
    let conns = r.body["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0]["name"], "demo-git");
    assert_eq!(conns[0]["provider"], "demo");
    assert!(
        conns[0]["endpoints"]["token_url"]
            .as_str()
            .unwrap()
            .ends_with("/demo/oauth/token")
    );
    assert!(conns[0].get("client_secret").is_none());
    bodies.push(r.text);

    let r = call(&ts, "GET", "/api/v1/agents", &token).await;
    let agents = r.body["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], ts.info.agent_id.as_str());
    assert_eq!(agents[0]["disabled"], false);
    assert_eq!(agents[0]["grants"][0]["connection"], "demo-git");
    assert_eq!(
        agents[0]["grants"][0]["scopes"],
        json!(["issues:write", "read:user", "repo:read"])
    );
    bodies.push(r.text);
    // The document names the token prefix (`lk_op_…`) but no token field.
    let doc = call_with(&ts, "GET", "/api/v1/openapi.json", None, None)
        .await
        .text;
    assert!(!doc.contains("\"access_token\"") && !doc.contains("\"refresh_token\""));

    let password_hash = ts
        .vault
        .store()
        .user_by_id(&ts.info.user_id)
        .await
        .unwrap()
        .unwrap()
        .password_hash
        .unwrap();
    for body in &bodies {
        for secret in [
            upstream_token.as_str(),
            refresh.expose_secret(),
            client_secret.as_str(),
            token.as_str(),
            password_hash.as_str(),
            ts.info.password.as_str(),
            "\"access_token\"",
            "\"refresh_token\"",
            "lk_op_",
            "$argon2",
        ] {
            assert!(!body.contains(secret), "{secret} leaked: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_account_takes_effect_for_the_next_exchange() {
    let ts = Arc::new(TestServer::start().await);
    let account = ts.connect_demo_account().await;
    let token = create_token(&ts, OPS);
    // A token is released and cached: the revocation must beat the cache too.
    ts.post_form(&ts.exchange_params()).await.token();
    let revocations = ts.demo.stats().revocations;

    let r = call(
        &ts,
        "DELETE",
        &format!("/api/v1/accounts/{account}"),
        &token,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"id": account, "status": "revoked", "upstream_revoked": true})
    );
    assert_eq!(
        ts.demo.stats().revocations,
        revocations + 1,
        "the provider was asked to revoke"
    );
    assert_all_refused(
        &ts,
        200,
        401,
        "federated_connection_refresh_token_not_found",
    )
    .await;
    assert_audited_by_token(&ts, "account.revoke").await;

    let r = call(&ts, "GET", &format!("/api/v1/accounts/{account}"), &token).await;
    assert_eq!(r.body["status"], "revoked");
    let r = call(&ts, "GET", "/api/v1/accounts?status=revoked", &token).await;
    assert_eq!(r.body["accounts"].as_array().unwrap().len(), 1);
    // Nothing left to revoke: 404, and no second call to the provider.
    let audit = audit_len(&ts).await;
    let r = call(
        &ts,
        "DELETE",
        &format!("/api/v1/accounts/{account}"),
        &token,
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.detail().contains("already revoked"), "{}", r.text);
    assert_eq!(ts.demo.stats().revocations, revocations + 1);
    assert_eq!(audit_len(&ts).await, audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_grant_and_user_changes_take_effect_at_once() {
    let ts = Arc::new(TestServer::start().await);
    ts.connect_demo_account().await;
    let token = create_token(&ts, OPS);
    let agent = ts.info.agent_id.clone();
    ts.post_form(&ts.exchange_params()).await.token();

    // Disable: the agent can no longer authenticate; enable brings it back.
    let r = call(
        &ts,
        "POST",
        &format!("/api/v1/agents/{agent}/disable"),
        &token,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        (r.body["id"].as_str(), &r.body["disabled"]),
        (Some(agent.as_str()), &json!(true))
    );
    assert_all_refused(&ts, 50, 401, "invalid_client").await;
    assert_audited_by_token(&ts, "client.disable").await;
    let r = call(&ts, "GET", "/api/v1/agents", &token).await;
    assert_eq!(r.body["agents"][0]["disabled"], true);
    let r = call(
        &ts,
        "POST",
        &format!("/api/v1/agents/{agent}/enable"),
        &token,
    )
    .await;
    assert_eq!((r.status, &r.body["disabled"]), (200, &json!(false)));
    assert_audited_by_token(&ts, "client.enable").await;
    ts.post_form(&ts.exchange_params()).await.token();

    // Remove the grant: every exchange for that connection is refused.
    let grant = format!("/api/v1/agents/{agent}/grants/demo-git");
    let r = call(&ts, "DELETE", &grant, &token).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_all_refused(&ts, 50, 403, "unauthorized_client").await;
    assert_audited_by_token(&ts, "grant.delete").await;
    let r = call(&ts, "GET", "/api/v1/agents", &token).await;
    assert_eq!(r.body["agents"][0]["grants"], json!([]));
    let r = call(&ts, "DELETE", &grant, &token).await;
    assert_eq!(r.status, 404, "removing it twice: {}", r.text);
    assert!(r.detail().contains("has no grant"), "{}", r.text);
    ts.vault
        .grant(
            &agent,
            "demo-git",
            Scopes::parse("read:user"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    ts.post_form(&ts.exchange_params()).await.token();

    // Delete the user: their accounts are revoked at the provider, their exchanges refused.
    let revocations = ts.demo.stats().revocations;
    let user = format!("/api/v1/users/{}", ts.info.user_id);
    let r = call(&ts, "DELETE", &user, &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"id": ts.info.user_id, "username": "demo", "accounts_revoked_upstream": 1})
    );
    assert_eq!(ts.demo.stats().revocations, revocations + 1);
    assert_all_refused(&ts, 50, 400, "invalid_grant").await;
    assert_audited_by_token(&ts, "user.delete").await;
    assert_audited_by_token(&ts, "account.revoke").await;
    let r = call(&ts, "GET", "/api/v1/users", &token).await;
    assert_eq!(r.body["users"], json!([]));
    let r = call(&ts, "GET", "/api/v1/accounts", &token).await;
    assert_eq!(r.body["accounts"], json!([]));
    let r = call(&ts, "DELETE", &user, &token).await;
    assert_eq!(r.status, 404, "deleting twice: {}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_answers_a_problem_and_changes_nothing() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    let token = create_token(&ts, OPS);
    let agent = ts.info.agent_id.clone();
    let audit = audit_len(&ts).await;

    let r = call(&ts, "GET", "/api/v1/accounts/cac_nope", &token).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["title"], "Not Found");
    assert!(r.detail().contains("cac_nope"), "{}", r.text);

    for (query, field) in [
        ("status=bogus", "status"),
        ("status=", "status"),
        ("status=active&status=revoked", "status"),
        ("user=nobody", "user"),
        ("connection=nope", "connection"),
        ("colour=red", "colour"),
    ] {
        let r = call(&ts, "GET", &format!("/api/v1/accounts?{query}"), &token).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text);
        assert!(
            r.detail().contains(&format!("`{field}`")),
            "{query}: {}",
            r.text
        );
        assert_eq!(r.body["validation_errors"][0]["field"], field, "{query}");
    }
    let r = call(&ts, "GET", "/api/v1/accounts?status=bogus", &token).await;
    assert!(
        r.detail().contains("needs_reauth"),
        "says what is allowed: {}",
        r.text
    );
    let r = call(&ts, "GET", "/api/v1/users?take=5", &token).await;
    assert_eq!(r.status, 400, "{}", r.text);

    for (method, path) in [
        ("DELETE", "/api/v1/accounts/cac_nope".to_owned()),
        ("DELETE", "/api/v1/users/nobody".to_owned()),
        ("POST", "/api/v1/agents/agt_nope/disable".to_owned()),
        ("POST", "/api/v1/agents/agt_nope/enable".to_owned()),
        (
            "DELETE",
            "/api/v1/agents/agt_nope/grants/demo-git".to_owned(),
        ),
        ("DELETE", format!("/api/v1/agents/{agent}/grants/nope")),
        ("GET", "/api/v1/nothing-here".to_owned()),
    ] {
        let r = call(&ts, method, &path, &token).await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text);
    }
    // A path segment that is not UTF-8.
    let r = call(&ts, "GET", "/api/v1/accounts/%FF%FE", &token).await;
    assert_eq!(r.status, 400, "{}", r.text);
    // A method the route does not have.
    let r = call(&ts, "PUT", "/api/v1/accounts", &token).await;
    assert_eq!(r.status, 405, "{}", r.text);
    assert!(r.headers.get("allow").is_some());
    // An oversized body is refused before anything runs.
    let big = call_with(
        &ts,
        "POST",
        &format!("/api/v1/agents/{agent}/disable"),
        Some(&format!("Bearer {token}")),
        Some(vec![b' '; 64 * 1024]),
    )
    .await;
    assert_eq!(big.status, 413, "{}", big.text);

    assert_eq!(audit_len(&ts).await, audit, "nothing was changed");
    assert!(
        !ts.vault
            .store()
            .agent_by_id(&agent)
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    ts.post_form(&ts.exchange_params()).await.token();

    // Deleting twice: the second answers 404 and changes nothing.
    let path = format!("/api/v1/accounts/{account}");
    assert_eq!(call(&ts, "DELETE", &path, &token).await.status, 200);
    let audit = audit_len(&ts).await;
    let r = call(&ts, "DELETE", &path, &token).await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(audit_len(&ts).await, audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failure_answers_503_and_changes_nothing() {
    let ts = TestServer::start().await;
    let account = ts.connect_demo_account().await;
    let token = create_token(&ts, OPS);
    let pool = ts.sql_pool().await;
    sqlx::query("CREATE TRIGGER audit_down BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit sink down'); END")
        .execute(&pool)
        .await
        .unwrap();
    let revocations = ts.demo.stats().revocations;
    let r = call(
        &ts,
        "DELETE",
        &format!("/api/v1/accounts/{account}"),
        &token,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    assert!(
        !r.text.contains("audit sink down"),
        "no internal detail: {}",
        r.text
    );
    assert_eq!(
        ts.demo.stats().revocations,
        revocations,
        "the provider was not asked"
    );
    let stored = ts
        .vault
        .store()
        .account_by_id(&account)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status.as_str(), "active", "nothing changed");
    sqlx::query("DROP TRIGGER audit_down")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let r = call(
        &ts,
        "DELETE",
        &format!("/api/v1/accounts/{account}"),
        &token,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
}
