//! The provider catalog through the real CLI and server: a catalog provider needs only client
//! credentials, its authorization request carries the provider's parameters, and an `oidc`
//! connection is built from a discovery document checked against its issuer. No real provider
//! is contacted: OpenID discovery runs against a tiny local provider on 127.0.0.1.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use crate::harness::*;
use serde_json::{Value, json};

fn query(url: &str) -> HashMap<String, String> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_providers_need_only_client_credentials() {
    let ts = TestServer::start().await;
    let secret = ts.dir.path().join("client.secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let secret = secret.to_str().unwrap();

    ok(&ts.cli(&[
        "connection",
        "add",
        "gh",
        "--provider",
        "github",
        "--client-id",
        "x",
        "--client-secret-file",
        secret,
    ]));
    let conn = ts
        .vault
        .store()
        .connection_by_name("gh")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conn.provider, "github");
    assert_eq!(
        conn.token_url,
        "https://github.com/login/oauth/access_token"
    );
    assert_eq!(
        conn.userinfo_url.as_deref(),
        Some("https://api.github.com/user")
    );
    assert_eq!(conn.scopes.to_string_spaced(), "read:user repo");

    let url = ts
        .vault
        .connect_start(&ts.info.user_id, "gh")
        .await
        .unwrap();
    assert!(
        url.starts_with("https://github.com/login/oauth/authorize?"),
        "{url}"
    );
    let q = query(&url);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "x");
    assert_eq!(q["redirect_uri"], ts.url("/connect/gh/callback"));
    assert_eq!(q["scope"], "read:user repo");
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["state"].len() >= 32 && q["code_challenge"].len() == 43);
    assert!(!q.contains_key("access_type") && !q.contains_key("prompt"));

    // Google: --scopes replaces the defaults; the offline-access parameters come from the catalog.
    ok(&ts.cli(&[
        "connection",
        "add",
        "gmail",
        "--provider",
        "google",
        "--client-id",
        "g",
        "--client-secret-file",
        secret,
        "--scopes",
        "openid https://www.googleapis.com/auth/gmail.readonly",
    ]));
    let url = ts
        .vault
        .connect_start(&ts.info.user_id, "gmail")
        .await
        .unwrap();
    assert!(
        url.starts_with("https://accounts.google.com/o/oauth2/v2/auth?"),
        "{url}"
    );
    assert!(
        url.contains("&access_type=offline&prompt=consent&"),
        "{url}"
    );
    assert_eq!(
        query(&url)["scope"],
        "https://www.googleapis.com/auth/gmail.readonly openid"
    );

    // Slack: a user token, comma-separated scopes under `user_scope`.
    ok(&ts.cli(&[
        "connection",
        "add",
        "slack",
        "--provider",
        "slack",
        "--client-id",
        "s",
        "--client-secret-file",
        secret,
        "--scopes",
        "chat:write channels:read",
    ]));
    let q = query(
        &ts.vault
            .connect_start(&ts.info.user_id, "slack")
            .await
            .unwrap(),
    );
    assert_eq!(q["user_scope"], "channels:read,chat:write");
    assert!(!q.contains_key("scope"));

    // Mistakes are refused with a reason, and create nothing.
    let err = fails(&ts.cli(&[
        "connection",
        "add",
        "x1",
        "--provider",
        "nope",
        "--client-id",
        "x",
    ]));
    assert!(
        err.contains("unknown provider") && err.contains("github"),
        "{err}"
    );
    let err = fails(&ts.cli(&["connection", "add", "x2", "--provider", "github"]));
    assert!(err.contains("--client-id"), "{err}");
    let err = fails(&ts.cli(&["connection", "add", "x3", "--client-id", "x"]));
    assert!(err.contains("--authorize-url"), "{err}");
    let err = fails(&ts.cli(&[
        "connection",
        "add",
        "x4",
        "--provider",
        "github",
        "--client-id",
        "x",
        "--token-url",
        "http://github.example/token",
    ]));
    assert!(err.contains("https"), "{err}");
    assert!(
        ts.vault
            .store()
            .connection_by_name("x4")
            .await
            .unwrap()
            .is_none()
    );

    // The catalog, for people and for scripts.
    let text = ok(&ts.cli(&["connection", "providers"]));
    assert!(text.contains("github") && text.contains("Google") && text.contains("oidc"));
    let list: Value =
        serde_json::from_str(&ok(&ts.cli(&["connection", "providers", "--json"]))).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 10);
    let google = list.iter().find(|p| p["name"] == "google").unwrap();
    assert_eq!(google["display_name"], "Google");
    assert_eq!(google["authorize_params"]["access_type"], "offline");
    assert!(
        google["default_scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("openid"))
    );
    for cmd in [
        &["connection", "add", "--help"][..],
        &["connection", "providers", "--help"],
    ] {
        assert!(ok(&ts.cli(cmd)).contains("Example"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_connection_by_discovery() {
    let ts = TestServer::start().await;
    let base = fake_openid_provider();
    let secret = ts.dir.path().join("client.secret");
    std::fs::write(&secret, "s3cret").unwrap();
    let secret = secret.to_str().unwrap();
    let issuer = format!("{base}/good");

    ok(&ts.cli(&[
        "connection",
        "add",
        "corp",
        "--provider",
        "oidc",
        "--issuer",
        &issuer,
        "--client-id",
        "latchkey",
        "--client-secret-file",
        secret,
    ]));
    let conn = ts
        .vault
        .store()
        .connection_by_name("corp")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(conn.provider, "oidc");
    assert_eq!(conn.authorize_url, format!("{issuer}/auth"));
    assert_eq!(conn.token_url, format!("{issuer}/token"));
    assert_eq!(conn.revoke_url, Some(format!("{issuer}/revoke")));
    assert_eq!(conn.userinfo_url, Some(format!("{issuer}/userinfo")));
    assert_eq!(conn.scopes.to_string_spaced(), "offline_access openid");

    // RFC 9207: an authorization response naming another issuer is refused (mix-up defence).
    assert_eq!(conn.issuer.as_deref(), Some(issuer.as_str()));
    let url = ts
        .vault
        .connect_start(&ts.info.user_id, "corp")
        .await
        .unwrap();
    let state = query(&url)["state"].clone();
    let err = ts
        .vault
        .connect_finish(
            &ts.info.user_id,
            "corp",
            &state,
            "code-1",
            Some("https://evil.example"),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_request");
    assert!(
        err.description.contains("names issuer"),
        "{}",
        err.description
    );

    // Connect end to end against it: the account id is the userinfo `sub`.
    let url = ts
        .vault
        .connect_start(&ts.info.user_id, "corp")
        .await
        .unwrap();
    assert!(url.starts_with(&format!("{issuer}/auth?")), "{url}");
    let state = query(&url)["state"].clone();
    let account = ts
        .vault
        .connect_finish(&ts.info.user_id, "corp", &state, "code-1", Some(&issuer))
        .await
        .unwrap();
    assert_eq!(
        account.account.upstream_account_id.as_deref(),
        Some("user-42")
    );
    assert_eq!(
        account.account.scopes.to_string_spaced(),
        "offline_access openid"
    );

    // A document that names another issuer is refused, and nothing is created.
    let err = fails(&ts.cli(&[
        "connection",
        "add",
        "evil",
        "--provider",
        "oidc",
        "--issuer",
        &format!("{base}/bad"),
        "--client-id",
        "latchkey",
    ]));
    assert!(
        err.contains("https://evil.example") && err.contains("refusing"),
        "{err}"
    );
    assert!(
        ts.vault
            .store()
            .connection_by_name("evil")
            .await
            .unwrap()
            .is_none()
    );
    let err = fails(&ts.cli(&[
        "connection",
        "add",
        "gone",
        "--provider",
        "oidc",
        "--issuer",
        &format!("{base}/missing"),
        "--client-id",
        "latchkey",
    ]));
    assert!(err.contains("404"), "{err}");
    let err = fails(&ts.cli(&[
        "connection",
        "add",
        "mixed",
        "--provider",
        "github",
        "--issuer",
        &issuer,
        "--client-id",
        "x",
    ]));
    assert!(err.contains("--issuer"), "{err}");
}

/// A tiny OpenID provider on `127.0.0.1:0` over plain HTTP (loopback is allowed), on its own
/// thread. Under `/good` a consistent one; `/bad` publishes a document naming another issuer.
fn fake_openid_provider() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let here = base.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some((method, path)) = read_request(&mut stream) else {
                continue;
            };
            let (status, body) = answer(&here, &method, &path);
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    base
}

fn answer(base: &str, method: &str, path: &str) -> (&'static str, String) {
    let doc = |issuer: &str| {
        json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{base}/good/auth"),
            "token_endpoint": format!("{base}/good/token"),
            "revocation_endpoint": format!("{base}/good/revoke"),
            "userinfo_endpoint": format!("{base}/good/userinfo"),
            "scopes_supported": ["openid", "profile", "offline_access"],
        })
    };
    let body = match (method, path) {
        ("GET", "/good/.well-known/openid-configuration") => doc(&format!("{base}/good")),
        ("GET", "/bad/.well-known/openid-configuration") => doc("https://evil.example"),
        ("POST", "/good/token") => json!({
            "access_token": "at-1", "token_type": "Bearer", "expires_in": 3600,
            "refresh_token": "rt-1", "scope": "openid offline_access",
        }),
        ("GET", "/good/userinfo") => json!({"sub": "user-42", "id": "not-this"}),
        _ => return ("404 Not Found", "{}".into()),
    };
    ("200 OK", body.to_string())
}

/// The request line's method and path; the headers and body are read and dropped.
fn read_request(stream: &mut std::net::TcpStream) -> Option<(String, String)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((method, path))
}
