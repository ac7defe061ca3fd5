//! Clients nobody here wrote: Auth0's Python SDK (auth0-python from PyPI, unchanged) and a
//! hand-written Node agent (Node's own crypto and fetch). `scripts/test` prepares
//! `interop/.venv`; LATCHKEY_INTEROP_PYTHON may point at another interpreter.

use std::path::PathBuf;
use std::process::Command;

use latchkey_core::scope::Scopes;
use latchkey_core::vault::Actor;
use latchkey_crypto::Algorithm;
use latchkey_crypto::jws::PublicKey;
use latchkey_crypto::keygen::generate;

use crate::harness::*;

fn python() -> PathBuf {
    std::env::var_os("LATCHKEY_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("interop/.venv/bin/python"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_python_sdk_privileged_worker() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let python = python();
    assert!(
        python.exists(),
        "{} is missing: run scripts/test (it creates interop/.venv with auth0-python)",
        python.display()
    );
    let domain = ts
        .issuer
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let run = || {
        Command::new(&python)
            .arg(workspace_root().join("interop/python/privileged_worker.py"))
            .env("LK_DOMAIN", &domain)
            .env("LK_CLIENT_ID", &ts.info.agent_id)
            .env("LK_KEY_FILE", &ts.info.agent_key)
            .env("LK_USER_ID", &ts.info.user_id)
            .env("LK_CONNECTION", "demo-git")
            .env("REQUESTS_CA_BUNDLE", &ts.ca_path)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].is_i64());
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(ts.demo_api(token, "user").await.0, 200);
    let audit = ts.vault.store().list_audit(5).await.unwrap();
    assert_eq!(
        audit[0].record.audit_context.as_deref(),
        Some("auth0-python interop test")
    );
    assert_eq!(audit[0].record.auth_method, "private_key_jwt");

    // The SDK surfaces Latchkey's errors as Auth0Error with the code: revoke, then retry.
    let account = ts
        .vault
        .store()
        .list_accounts(Some(&ts.info.user_id))
        .await
        .unwrap()[0]
        .id
        .clone();
    ts.vault
        .revoke_account(&account, &Actor::cli())
        .await
        .unwrap();
    let out = run();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (err["status"].as_i64(), err["error"].as_str()),
        (
            Some(401),
            Some("federated_connection_refresh_token_not_found")
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_node_agent() {
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    let key = generate(Algorithm::RS256);
    let key_file = ts.dir.path().join("node-agent.key");
    std::fs::write(&key_file, key.private_pem.as_bytes()).unwrap();
    let public = PublicKey::parse(&key.public_pem, Some(Algorithm::RS256), None).unwrap();
    let (agent, secret) = ts
        .vault
        .add_agent("node-agent", &[public], true, &Actor::cli())
        .await
        .unwrap();
    ts.vault
        .grant(
            &agent.id,
            "demo-git",
            Scopes::parse("read:user"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();

    let out = Command::new("node")
        .arg(workspace_root().join("interop/node/privileged_worker.mjs"))
        .env("LK_ISSUER", &ts.issuer)
        .env("LK_CLIENT_ID", &agent.id)
        .env(
            "LK_CLIENT_SECRET",
            secrecy::ExposeSecret::expose_secret(&secret.unwrap()),
        )
        .env("LK_KEY_FILE", &key_file)
        .env("LK_USER_ID", &ts.info.user_id)
        .env("LK_CONNECTION", "demo-git")
        .env("NODE_EXTRA_CA_CERTS", &ts.ca_path)
        .output()
        .expect("node is installed (scripts/test checks)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["contentType"], "application/json");
    assert_eq!(answer["body"]["scope"], "read:user");
    let token = answer["body"]["access_token"].as_str().unwrap();
    assert_eq!(ts.demo_api(token, "user").await.0, 200);
    assert_eq!(
        ts.demo_api(token, "repos").await.0,
        403,
        "the upstream token itself is narrowed to the grant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth0_python_sdk_refresh_token_exchange() {
    use crate::oidc::*;
    let ts = TestServer::start().await;
    ts.connect_demo_account().await;
    // A confidential app with a secret and a key, allowed demo-git for its users.
    let key = generate(Algorithm::RS256);
    let key_file = ts.dir.path().join("app.key");
    std::fs::write(&key_file, key.private_pem.as_bytes()).unwrap();
    let public = PublicKey::parse(&key.public_pem, Some(Algorithm::RS256), None).unwrap();
    let app1 = app(
        &ts,
        "notes",
        latchkey_core::vault::NewClient {
            keys: vec![public],
            ..confidential()
        },
    )
    .await;
    ts.vault
        .grant(
            &app1.id,
            "demo-git",
            Scopes::parse("read:user"),
            vec![],
            &Actor::cli(),
        )
        .await
        .unwrap();
    let p = pkce();
    let code = sign_in_for_code(&ts, &authorize_url(&ts, &app1.id, &p, &[])).await;
    let signed_in = code_grant(&ts, &app1, &code, &p.verifier).await;
    let refresh = signed_in.body["refresh_token"].as_str().unwrap().to_owned();

    let domain = ts
        .issuer
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let run = |auth: (&str, &std::ffi::OsStr), hint: Option<&str>| {
        let mut cmd = Command::new(python());
        cmd.arg(workspace_root().join("interop/python/refresh_token_exchange.py"))
            .env("LK_DOMAIN", &domain)
            .env("LK_CLIENT_ID", &app1.id)
            .env(auth.0, auth.1)
            .env("LK_SUBJECT_TOKEN", &refresh)
            .env("LK_CONNECTION", "demo-git")
            .env("REQUESTS_CA_BUNDLE", &ts.ca_path);
        if let Some(h) = hint {
            cmd.env("LK_LOGIN_HINT", h);
        }
        let out = cmd.output().unwrap();
        let body: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), body)
    };
    // T3: client secret in a JSON body.
    let (code, body) = run(("LK_CLIENT_SECRET", app1.secret.as_ref()), None);
    assert_eq!(code, Some(0), "{body}");
    assert_eq!(
        (body["token_type"].as_str(), body["scope"].as_str()),
        (Some("Bearer"), Some("read:user"))
    );
    assert_eq!(
        ts.demo_api(body["access_token"].as_str().unwrap(), "user")
            .await
            .0,
        200
    );
    // T4: private_key_jwt, the SDK minting the assertion.
    let (code, body) = run(("LK_KEY_FILE", key_file.as_os_str()), None);
    assert_eq!(code, Some(0), "{body}");
    assert_eq!(
        ts.vault.store().list_audit(1).await.unwrap()[0]
            .record
            .auth_method,
        "private_key_jwt"
    );
    // T5: login_hint selects the account by its upstream id; an unknown one is a 401.
    let (code, _) = run(("LK_CLIENT_SECRET", app1.secret.as_ref()), Some("1001"));
    assert_eq!(code, Some(0));
    let (code, body) = run(("LK_CLIENT_SECRET", app1.secret.as_ref()), Some("9999"));
    assert_eq!(code, Some(3));
    assert_eq!(
        (body["status"].as_i64(), body["error"].as_str()),
        (
            Some(401),
            Some("federated_connection_refresh_token_not_found")
        )
    );
}
