//! The Connected Accounts API (My Account API, auth0-wire.md §4) and the older
//! `/authorize?connection=…` connect flow.

use latchkey_core::scope::Scopes;
use serde_json::{Value, json};

use crate::harness::*;
use crate::oidc::*;

const ALL: &str =
    "create:me:connected_accounts read:me:connected_accounts delete:me:connected_accounts";

/// An app, the demo user signed in to it, and a My Account token with `scope`.
async fn signed_in_app(ts: &TestServer, scope: &str) -> (App, String) {
    let app1 = app(ts, "notes", confidential()).await;
    let p = pkce();
    let code = sign_in_for_code(ts, &authorize_url(ts, &app1.id, &p, &[])).await;
    let signed_in = code_grant(ts, &app1, &code, &p.verifier).await;
    let refresh = signed_in.body["refresh_token"].as_str().unwrap().to_owned();
    let me = format!("{}me/", ts.issuer);
    let t = token(
        ts,
        &app1,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("audience", &me),
            ("scope", scope),
        ],
    )
    .await;
    (app1, t.token().to_owned())
}

async fn call(
    ts: &TestServer,
    method: reqwest::Method,
    path: &str,
    bearer: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = ts.http.request(method, ts.url(path)).bearer_auth(bearer);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    if status >= 400 {
        assert_eq!(resp.headers()["content-type"], "application/json");
    }
    assert!(status < 500, "no 5xx");
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Approve at the demo provider and follow Latchkey's callback; returns where it sends the browser.
async fn approve_at_demo(ts: &TestServer, provider_url: &str) -> String {
    let (status, _, page) = ts.browse(provider_url).await;
    assert_eq!(status, 200, "the demo provider's consent page");
    let consent = hidden_field(&page, "consent");
    let (_, callback, _) = ts
        .submit(
            "/demo/oauth/authorize",
            &[("consent", &consent), ("decision", "approve")],
        )
        .await;
    let (status, location, body) = ts.browse(&callback.unwrap()).await;
    assert_eq!(status, 302, "{body}");
    location.unwrap()
}

fn query(location: &str) -> std::collections::HashMap<String, String> {
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_complete_list_delete() {
    let ts = TestServer::start().await;
    let (_, me) = signed_in_app(&ts, ALL).await;
    let p = pkce();
    let start = json!({
        "connection": "demo-git", "redirect_uri": REDIRECT, "state": "s-1",
        "code_challenge": p.challenge, "code_challenge_method": "S256",
        "scopes": ["repo:read", "read:user"], "authorization_params": {"prompt": "consent"},
    });
    let (status, started) = call(
        &ts,
        reqwest::Method::POST,
        "/me/v1/connected-accounts/connect",
        &me,
        Some(start.clone()),
    )
    .await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(
        started["connect_uri"],
        ts.url("/connected-accounts/connect")
    );
    assert_eq!(started["expires_in"], 300);
    let auth_session = started["auth_session"].as_str().unwrap().to_owned();
    assert!(auth_session.len() <= 64);
    let ticket = started["connect_params"]["ticket"].as_str().unwrap();

    // The browser leg: Latchkey → the provider's consent → back to the app with a connect_code.
    let (status, to_provider, _) = ts
        .browse(&format!(
            "{}?ticket={ticket}",
            started["connect_uri"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 303);
    let back = approve_at_demo(&ts, &to_provider.unwrap()).await;
    assert!(back.starts_with(REDIRECT), "{back}");
    let q = query(&back);
    assert_eq!(q["state"], "s-1");
    let connect_code = q["connect_code"].clone();
    assert!(connect_code.len() <= 46);
    // The ticket is single use.
    assert_eq!(
        ts.browse(&format!("/connected-accounts/connect?ticket={ticket}"))
            .await
            .0,
        400
    );

    let complete = |code: &str, verifier: &str| json!({"auth_session": auth_session, "connect_code": code, "redirect_uri": REDIRECT, "code_verifier": verifier});
    // Wrong verifier and wrong redirect_uri first: refused, and the code is not spent.
    let (status, body) = call(
        &ts,
        reqwest::Method::POST,
        "/me/v1/connected-accounts/complete",
        &me,
        Some(complete(&connect_code, &pkce().verifier)),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["title"], "Bad Request");
    assert!(body["detail"].as_str().unwrap().contains("code_verifier"));
    let mut wrong_uri = complete(&connect_code, &p.verifier);
    wrong_uri["redirect_uri"] = json!("https://app.example/other");
    assert_eq!(
        call(
            &ts,
            reqwest::Method::POST,
            "/me/v1/connected-accounts/complete",
            &me,
            Some(wrong_uri)
        )
        .await
        .0,
        400
    );
    let (status, account) = call(
        &ts,
        reqwest::Method::POST,
        "/me/v1/connected-accounts/complete",
        &me,
        Some(complete(&connect_code, &p.verifier)),
    )
    .await;
    assert_eq!(status, 201, "{account}");
    assert!(account["id"].as_str().unwrap().starts_with("cac_"));
    assert_eq!(
        (
            account["connection"].as_str(),
            account["access_type"].as_str()
        ),
        (Some("demo-git"), Some("offline"))
    );
    assert!(
        account["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("repo:read"))
    );
    assert!(account["created_at"].as_str().unwrap().ends_with('Z'));
    // Replaying the connect_code: refused.
    let (status, _) = call(
        &ts,
        reqwest::Method::POST,
        "/me/v1/connected-accounts/complete",
        &me,
        Some(complete(&connect_code, &p.verifier)),
    )
    .await;
    assert_eq!(status, 400);

    // The agent can now exchange for this user.
    ts.post_form(&ts.exchange_params()).await.token();

    // Listing, with paging (`from` and `next` both work as the cursor).
    let (status, list) = call(
        &ts,
        reqwest::Method::GET,
        "/me/v1/connected-accounts/accounts",
        &me,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(list["accounts"].as_array().unwrap().len(), 1);
    assert!(list.get("next").is_none());
    let (_, conns) = call(
        &ts,
        reqwest::Method::GET,
        "/me/v1/connected-accounts/connections?take=1",
        &me,
        None,
    )
    .await;
    assert_eq!(conns["connections"][0]["name"], "demo-git");
    let (_, filtered) = call(
        &ts,
        reqwest::Method::GET,
        "/me/v1/connected-accounts/accounts?connection=other",
        &me,
        None,
    )
    .await;
    assert_eq!(filtered["accounts"], json!([]));
    assert_eq!(
        call(
            &ts,
            reqwest::Method::GET,
            "/me/v1/connected-accounts/accounts?take=0",
            &me,
            None
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            &ts,
            reqwest::Method::GET,
            "/me/v1/connected-accounts/accounts?from=zz",
            &me,
            None
        )
        .await
        .0,
        400
    );

    // Deleting: 204, then the exchange fails; deleting again is a 404.
    let id = account["id"].as_str().unwrap();
    let (status, _) = call(
        &ts,
        reqwest::Method::DELETE,
        &format!("/me/v1/connected-accounts/accounts/{id}"),
        &me,
        None,
    )
    .await;
    assert_eq!(status, 204);
    ts.post_form(&ts.exchange_params())
        .await
        .assert_error(401, "federated_connection_refresh_token_not_found");
    assert_eq!(
        call(
            &ts,
            reqwest::Method::DELETE,
            &format!("/me/v1/connected-accounts/accounts/{id}"),
            &me,
            None
        )
        .await
        .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn my_account_bad_input() {
    let ts = TestServer::start().await;
    let (_, me) = signed_in_app(&ts, ALL).await;
    let (_, read_only) = signed_in_app(&ts, "read:me:connected_accounts").await;
    let connect = json!({"connection": "demo-git", "redirect_uri": REDIRECT});
    // A token without the needed scope: 403; no token or a bad one: 401.
    assert_eq!(
        call(
            &ts,
            reqwest::Method::POST,
            "/me/v1/connected-accounts/connect",
            &read_only,
            Some(connect.clone())
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            &ts,
            reqwest::Method::POST,
            "/me/v1/connected-accounts/connect",
            "garbage",
            Some(connect.clone())
        )
        .await
        .0,
        401
    );
    // An access token for the issuer (not the My Account API) is refused.
    let app2 = app(&ts, "other", confidential()).await;
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &app2.id, &p, &[])).await;
    let plain = code_grant(&ts, &app2, &code, &p.verifier).await;
    assert_eq!(
        call(
            &ts,
            reqwest::Method::POST,
            "/me/v1/connected-accounts/connect",
            plain.token(),
            Some(connect.clone())
        )
        .await
        .0,
        401
    );
    // Validation: unknown property, unknown connection, unregistered redirect URI, bad PKCE,
    // bad scopes.
    for (body, field) in [
        (
            json!({"connection": "demo-git", "redirect_uri": REDIRECT, "extra": 1}),
            "extra",
        ),
        (
            json!({"connection": "nope", "redirect_uri": REDIRECT}),
            "connection",
        ),
        (
            json!({"connection": "demo-git", "redirect_uri": "https://evil.example/cb"}),
            "redirect_uri",
        ),
        (
            json!({"connection": "demo-git", "redirect_uri": REDIRECT, "code_challenge": "short", "code_challenge_method": "S256"}),
            "code_challenge",
        ),
        (
            json!({"connection": "demo-git", "redirect_uri": REDIRECT, "code_challenge": "x".repeat(43), "code_challenge_method": "plain"}),
            "code_challenge_method",
        ),
        (
            json!({"connection": "demo-git", "redirect_uri": REDIRECT, "scopes": ["a", "a"]}),
            "scopes",
        ),
        (json!({"redirect_uri": REDIRECT}), "connection"),
    ] {
        let (status, problem) = call(
            &ts,
            reqwest::Method::POST,
            "/me/v1/connected-accounts/connect",
            &me,
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{problem}");
        assert_eq!(problem["validation_errors"][0]["field"], field, "{problem}");
        assert!(problem["type"].is_string() && problem["detail"].is_string());
    }
    let resp = ts
        .http
        .post(ts.url("/me/v1/connected-accounts/connect"))
        .bearer_auth(&me)
        .body("connection=demo-git")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    // complete: a session that belongs to another app is a 409; unknown ones a 400.
    let (_, started) = call(
        &ts,
        reqwest::Method::POST,
        "/me/v1/connected-accounts/connect",
        &me,
        Some(connect.clone()),
    )
    .await;
    let refresh = plain.body["refresh_token"].as_str().unwrap().to_owned();
    let me_aud = format!("{}me/", ts.issuer);
    let other_me = token(
        &ts,
        &app2,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", &refresh),
            ("audience", &me_aud),
            ("scope", ALL),
        ],
    )
    .await
    .token()
    .to_owned();
    let body = json!({"auth_session": started["auth_session"], "connect_code": "x", "redirect_uri": REDIRECT});
    assert_eq!(
        call(
            &ts,
            reqwest::Method::POST,
            "/me/v1/connected-accounts/complete",
            &other_me,
            Some(body)
        )
        .await
        .0,
        409
    );
    let body = json!({"auth_session": "nope", "connect_code": "x", "redirect_uri": REDIRECT});
    assert_eq!(
        call(
            &ts,
            reqwest::Method::POST,
            "/me/v1/connected-accounts/complete",
            &me,
            Some(body)
        )
        .await
        .0,
        400
    );
    // An account that is not the caller's (here: none at all) is a 404.
    assert_eq!(
        call(
            &ts,
            reqwest::Method::DELETE,
            "/me/v1/connected-accounts/accounts/cac_nope",
            &me,
            None
        )
        .await
        .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_authorize_connection_flow() {
    let ts = TestServer::start().await;
    let app1 = app(&ts, "notes", confidential()).await;
    let p = pkce();
    // Sign in first (a session), then ask for a code with a connection to connect on the way.
    sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    let url = authorize_url(
        &ts,
        &app1.id,
        &p,
        &[
            ("connection", "demo-git"),
            ("connection_scope", "repo:read,issues:write"),
            ("access_type", "offline"),
        ],
    );
    let (status, to_provider, _) = ts.browse(&url).await;
    assert_eq!(status, 302);
    let to_provider = to_provider.unwrap();
    assert!(
        to_provider.contains("/demo/oauth/authorize?"),
        "{to_provider}"
    );
    // After the provider, Latchkey resumes the authorization request and the app gets its code.
    let resume = approve_at_demo(&ts, &to_provider).await;
    assert!(
        resume.starts_with(&ts.url("/authorize?")) && !resume.contains("connection="),
        "{resume}"
    );
    let (status, to_app, _) = ts.browse(&resume).await;
    assert_eq!(status, 302);
    let code = query(&to_app.unwrap())["code"].clone();
    code_grant(&ts, &app1, &code, &p.verifier).await.token();
    let accounts = ts
        .vault
        .store()
        .list_accounts(Some(&ts.info.user_id))
        .await
        .unwrap();
    assert_eq!(accounts.len(), 1);
    assert!(Scopes::parse("repo:read issues:write").is_subset(&accounts[0].scopes));
    // An unknown connection goes back to the app as an error.
    let (_, to_app, _) = ts
        .browse(&authorize_url(&ts, &app1.id, &p, &[("connection", "nope")]))
        .await;
    assert_eq!(query(&to_app.unwrap())["error"], "invalid_request");
}
