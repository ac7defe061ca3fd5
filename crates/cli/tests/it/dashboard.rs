//! The dashboard over plain HTTP (the browser run is `dashboard_e2e`): who may see and do
//! what, checked on the server by calling the endpoints directly; CSRF; the headers and
//! same-origin rule of every page; the operator's agent and grant forms.

use std::collections::HashMap;
use std::sync::Mutex;

use latchkey_core::model::{AccountStatus, ApprovalStatus, Role};
use latchkey_core::vault::Actor;
use latchkey_crypto::Algorithm;
use latchkey_crypto::keygen::generate;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::*;

/// One browser: its own cookie jar, no redirects followed.
struct Browser<'a> {
    ts: &'a TestServer,
    cookies: Mutex<HashMap<String, String>>,
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl<'a> Browser<'a> {
    fn new(ts: &'a TestServer) -> Self {
        Self {
            ts,
            cookies: Mutex::new(HashMap::new()),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            self.ts.url(path)
        }
    }

    async fn finish(&self, resp: reqwest::Response) -> Page {
        {
            let mut jar = self.cookies.lock().unwrap();
            for c in resp.headers().get_all("set-cookie") {
                let c = c.to_str().unwrap();
                let (name, rest) = c.split_once('=').unwrap();
                let value = rest.split(';').next().unwrap();
                if value.is_empty() {
                    jar.remove(name);
                } else {
                    jar.insert(name.to_owned(), value.to_owned());
                }
            }
        }
        let status = resp.status();
        let headers = resp.headers().clone();
        let location = headers
            .get("location")
            .map(|l| self.url(l.to_str().unwrap()));
        Page {
            status,
            location,
            headers,
            body: resp.text().await.unwrap(),
        }
    }

    fn cookie_header(&self) -> String {
        let jar = self.cookies.lock().unwrap();
        jar.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn get(&self, path: &str) -> Page {
        let resp = self
            .ts
            .http
            .get(self.url(path))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Page {
        let resp = self
            .ts
            .http
            .post(self.url(path))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    /// A `multipart/form-data` POST; `files` are (field, file name, content).
    async fn post_multipart(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        files: &[(&str, &str, &str)],
    ) -> Page {
        const BOUNDARY: &str = "latchkey-test-boundary-7d1f";
        let mut body = String::new();
        for (name, value) in fields {
            body.push_str(&format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            ));
        }
        for (name, file, content) in files {
            body.push_str(&format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n{content}\r\n"
            ));
        }
        body.push_str(&format!("--{BOUNDARY}--\r\n"));
        let resp = self
            .ts
            .http
            .post(self.url(path))
            .header("cookie", self.cookie_header())
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(body)
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    async fn sign_in(&self, username: &str, password: &str) {
        let page = self.get("/login?next=/ui").await;
        let csrf = hidden_field(&page.body, "csrf");
        let done = self
            .post(
                "/login",
                &[
                    ("username", username),
                    ("password", password),
                    ("csrf", &csrf),
                    ("next", "/ui"),
                ],
            )
            .await;
        assert_eq!(done.status, 303, "{}", done.body);
        assert_eq!(done.location.as_deref(), Some(self.ts.url("/ui").as_str()));
    }

    /// The session's CSRF token, as the dashboard's forms carry it.
    async fn csrf(&self) -> String {
        hidden_field(&self.get("/ui/security").await.body, "csrf")
    }

    /// Connect `demo-git` through the demo provider's consent page; the new account's id.
    async fn connect_demo(&self, user_id: &str) -> String {
        let start = self.get("/connect/demo-git").await;
        assert_eq!(start.status, 303);
        let consent_page = self.get(start.location.as_deref().unwrap()).await;
        let consent = hidden_field(&consent_page.body, "consent");
        let back = self
            .post(
                "/demo/oauth/authorize",
                &[("consent", &consent), ("decision", "approve")],
            )
            .await;
        let done = self.get(back.location.as_deref().unwrap()).await;
        assert_eq!(done.status, 303, "{}", done.body);
        assert!(
            done.location
                .as_deref()
                .unwrap()
                .ends_with("/ui/accounts?connected=demo-git")
        );
        let accounts = self
            .ts
            .vault
            .store()
            .list_accounts(Some(user_id))
            .await
            .unwrap();
        accounts.last().unwrap().id.clone()
    }
}

/// The page's error message.
fn alert(html: &str) -> &str {
    html.split("role=\"alert\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap_or("(no alert)")
}

/// A user with `role` and a password; their id.
async fn user(ts: &TestServer, name: &str, role: Role) -> String {
    ts.vault
        .add_user(name, Some("a long enough password"), role, &Actor::cli())
        .await
        .unwrap()
        .id
}

async fn account_status(ts: &TestServer, id: &str) -> AccountStatus {
    ts.vault
        .store()
        .account_by_id(id)
        .await
        .unwrap()
        .unwrap()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_reach_only_their_own_accounts_approvals_and_activity() {
    let ts = TestServer::start().await;
    let alice_id = user(&ts, "alice", Role::User).await;
    let bob_id = user(&ts, "bob", Role::User).await;
    let (alice, bob) = (Browser::new(&ts), Browser::new(&ts));
    alice.sign_in("alice", "a long enough password").await;
    bob.sign_in("bob", "a long enough password").await;
    let alices = alice.connect_demo(&alice_id).await;
    let bobs = bob.connect_demo(&bob_id).await;

    // An approval for Alice: the demo agent asks for a high-risk scope on her account.
    ts.grant("read:user repo:read", &["--risk", "repo:read=high"]);
    let mut p = ts.params_with(
        ts.subject(json!({"sub": alice_id})),
        ts.assertion(json!({})),
    );
    p.push(("scope".into(), "repo:read".into()));
    let held = ts.post_form(&p).await;
    held.assert_error(403, "authorization_pending");
    let approval = held.body["approval_uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        held.body["approval_uri"],
        ts.url(&format!("/ui/approvals/{approval}"))
    );

    // Alice sees her account and the request.
    let page = alice.get("/ui/accounts").await;
    assert!(page.body.contains(&alices) && !page.body.contains(&bobs));
    assert!(alice.get("/ui/approvals").await.body.contains(&approval));

    // Bob: lists without them; direct requests answer 404 and change nothing.
    let bob_csrf = bob.csrf().await;
    let page = bob.get("/ui/accounts").await;
    assert!(page.body.contains(&bobs) && !page.body.contains(&alices));
    assert!(!bob.get("/ui").await.body.contains(&approval));
    assert!(!bob.get("/ui/approvals").await.body.contains(&approval));
    let path = format!("/ui/accounts/{alices}/disconnect");
    assert_eq!(bob.get(&path).await.status, 404);
    assert_eq!(bob.post(&path, &[("csrf", &bob_csrf)]).await.status, 404);
    assert_eq!(account_status(&ts, &alices).await, AccountStatus::Active);
    let path = format!("/ui/approvals/{approval}");
    assert_eq!(bob.get(&path).await.status, 404);
    let tried = bob
        .post(&path, &[("csrf", &bob_csrf), ("decision", "approve")])
        .await;
    assert_eq!(tried.status, 404);
    let a = ts.vault.store().approval(&approval).await.unwrap().unwrap();
    assert_eq!(a.status, ApprovalStatus::Pending);

    // Activity: Bob's own entries only, whatever the filter asks for.
    for path in [
        "/ui/activity".to_owned(),
        format!("/ui/activity?user={alice_id}"),
        format!("/ui/activity?connection=demo-git&user={alice_id}"),
    ] {
        let page = bob.get(&path).await;
        assert_eq!(page.status, 200);
        assert!(page.body.contains(&bobs), "{path}: Bob's connect is listed");
        assert!(!page.body.contains(&alices), "{path}: {}", page.body);
        assert!(!page.body.contains(&alice_id), "{path}");
    }
    let export = bob
        .get(&format!("/ui/activity/export?user={alice_id}"))
        .await;
    assert_eq!(export.status, 200);
    let lines: Vec<serde_json::Value> = export
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|e| e["subject_user"] == bob_id.as_str()));
    // Alice's activity shows her account.
    assert!(alice.get("/ui/activity").await.body.contains(&alices));

    // Operator pages are refused to users, and their forms change nothing.
    let agents_before = ts.vault.store().list_agents().await.unwrap().len();
    assert_eq!(bob.get("/ui/agents").await.status, 403);
    assert_eq!(bob.get("/ui/users").await.status, 403);
    let refused = bob
        .post(
            &format!("/ui/users/{bob_id}/role"),
            &[("csrf", &bob_csrf), ("role", "operator")],
        )
        .await;
    assert_eq!(refused.status, 403);
    let bob_now = ts.vault.store().user_by_id(&bob_id).await.unwrap().unwrap();
    assert_eq!(bob_now.role, Role::User);
    assert_eq!(
        bob.get(&format!("/ui/agents/{}", ts.info.agent_id))
            .await
            .status,
        403
    );
    let refused = bob
        .post("/ui/agents", &[("csrf", &bob_csrf), ("name", "sneaky")])
        .await;
    assert_eq!(refused.status, 403);
    let refused = bob
        .post(
            &format!("/ui/agents/{}/state", ts.info.agent_id),
            &[("csrf", &bob_csrf), ("state", "disabled")],
        )
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        ts.vault.store().list_agents().await.unwrap().len(),
        agents_before
    );
    assert!(
        !ts.vault
            .store()
            .agent_by_id(&ts.info.agent_id)
            .await
            .unwrap()
            .unwrap()
            .disabled
    );

    // CSRF: without the token, with a wrong one, or with another session's, refused.
    let path = format!("/ui/accounts/{alices}/disconnect");
    for form in [
        vec![],
        vec![("csrf", "forged")],
        vec![("csrf", bob_csrf.as_str())],
    ] {
        let refused = alice.post(&path, &form).await;
        assert_eq!(refused.status, 403, "{form:?}");
        assert_eq!(account_status(&ts, &alices).await, AccountStatus::Active);
    }
    let refused = alice
        .post(
            &format!("/ui/approvals/{approval}"),
            &[("decision", "approve")],
        )
        .await;
    assert_eq!(refused.status, 403);
    // With her token, Alice disconnects her own account.
    let alice_csrf = alice.csrf().await;
    let done = alice.post(&path, &[("csrf", &alice_csrf)]).await;
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(account_status(&ts, &alices).await, AccountStatus::Revoked);
    assert_eq!(account_status(&ts, &bobs).await, AccountStatus::Active);
    let notice = alice.get(done.location.as_deref().unwrap()).await;
    assert!(notice.body.contains("Disconnected demo-git."));

    // Signed out: every page sends to sign-in, every form too.
    let stranger = Browser::new(&ts);
    let page = stranger.get("/ui/activity").await;
    assert_eq!(page.status, 303);
    let to = page.location.unwrap();
    assert!(to.ends_with("/login?next=%2Fui%2Factivity"), "{to}");
    let page = stranger.post(&path, &[("csrf", &alice_csrf)]).await;
    assert_eq!(page.status, 303);
    // htmx's background refresh: the whole page goes to sign-in, not the fragment.
    let polled = ts
        .http
        .get(ts.url("/ui/approvals/pending"))
        .header("hx-request", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(polled.status(), 204);
    assert_eq!(polled.headers()["hx-redirect"], "/login?next=%2Fui");
}

/// Every `src`, `href` and `action` in `html`: same origin (a path) only.
fn assert_same_origin(path: &str, html: &str) {
    for attr in ["src=\"", "href=\"", "action=\"", "hx-get=\"", "hx-post=\""] {
        for part in html.split(attr).skip(1) {
            let value = part.split('"').next().unwrap();
            assert!(
                value.starts_with('/') && !value.starts_with("//") || value.starts_with('#'),
                "{path}: {attr}{value}\" leaves the origin"
            );
        }
    }
    assert!(!html.contains("<script>"), "{path}: inline script");
    assert!(!html.contains(" style=\""), "{path}: inline style");
    assert!(!html.contains("<style"), "{path}: inline style");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_has_the_csp_and_loads_only_from_its_origin() {
    let ts = TestServer::start().await;
    let b = Browser::new(&ts);
    b.sign_in(&ts.info.username, &ts.info.password).await;
    let account = b.connect_demo(&ts.info.user_id).await;
    ts.grant("read:user repo:read", &["--risk", "repo:read=high"]);
    let mut p = ts.exchange_params();
    p.push(("scope".into(), "repo:read".into()));
    let held = ts.post_form(&p).await;
    let approval = held.body["approval_uri"].as_str().unwrap().to_owned();
    let mut p = ts.exchange_params();
    p.push(("scope".into(), "read:user".into()));
    assert!(ts.post_form(&p).await.status.is_success());

    let pages = [
        "/ui".to_owned(),
        "/ui/accounts".to_owned(),
        format!("/ui/accounts/{account}/disconnect"),
        "/ui/approvals".to_owned(),
        "/ui/approvals/pending".to_owned(),
        approval,
        "/ui/activity".to_owned(),
        "/ui/activity?action=token.*&decision=allow".to_owned(),
        "/ui/security".to_owned(),
        "/ui/agents".to_owned(),
        format!("/ui/agents/{}", ts.info.agent_id),
        "/ui/agents/agt_nope".to_owned(),
        "/ui/activity?from=yesterday".to_owned(),
        "/login".to_owned(),
    ];
    for path in &pages {
        let page = b.get(path).await;
        assert!(
            page.status.is_success() || page.status.is_client_error(),
            "{path}: {}",
            page.status
        );
        let csp = page.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(page.headers["x-frame-options"], "DENY");
        assert_eq!(page.headers["x-content-type-options"], "nosniff");
        assert_eq!(page.headers["cache-control"], "no-store");
        assert_same_origin(path, &page.body);
    }
    // The overview draws the release as a bar of its chart.
    let overview = b.get("/ui").await.body;
    assert!(overview.contains("id=\"release-chart\""));
    assert!(
        overview.contains("Last 14 days, by agent: 1 in all."),
        "{overview}"
    );
    // Bad filters are the client's mistake: 400 with what to fix, not an error page.
    let bad = b.get("/ui/activity?from=yesterday").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("From is a date like"));
    // The vendored script and the stylesheet come from the binary, with their types.
    let js = b.get("/ui/static/htmx-2.0.8.min.js").await;
    assert_eq!(js.status, 200);
    assert!(
        js.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let css = b.get("/ui/static/app.css").await;
    assert!(
        css.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    assert_eq!(b.get("/ui/static/nope.js").await.status, 404);
    // Old links lead to the dashboard.
    let old = b.get("/account").await;
    assert_eq!(old.status, 308);
    assert!(old.location.unwrap().ends_with("/ui/accounts"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_register_agents_and_edit_grants() {
    let ts = TestServer::start().await;
    user(&ts, "olga", Role::Operator).await;
    let b = Browser::new(&ts);
    b.sign_in("olga", "a long enough password").await;
    let csrf = b.csrf().await;
    let agents_before = ts.vault.store().list_agents().await.unwrap().len();

    // Bad input: a private key, garbage, no key and no secret — refused, nothing created.
    let private = generate(Algorithm::ES256);
    for (key, why) in [
        (private.private_pem.as_str(), "private"),
        ("not a key", "not a pem public key or a jwk"),
        ("", "needs a public key or a client secret"),
    ] {
        let page = b
            .post(
                "/ui/agents",
                &[("csrf", &csrf), ("name", "bad"), ("public_key", key)],
            )
            .await;
        assert_eq!(page.status, 400, "{why}");
        assert!(
            page.body.to_lowercase().contains(why),
            "{why}: {}",
            page.body
        );
    }
    assert_eq!(
        ts.vault.store().list_agents().await.unwrap().len(),
        agents_before
    );

    // A JWKS of one key, and a client secret shown once.
    let jwk: serde_json::Value = serde_json::from_str(
        &latchkey_crypto::jws::PublicKey::parse(&private.public_pem, None, None)
            .unwrap()
            .to_jwk_json(),
    )
    .unwrap();
    let jwks = json!({ "keys": [jwk] }).to_string();
    let created = b
        .post(
            "/ui/agents",
            &[
                ("csrf", &csrf),
                ("name", "reporter"),
                ("public_key", &jwks),
                ("secret", "yes"),
            ],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created
        .body
        .split("id=\"client-id\">")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    assert!(created.body.contains("id=\"client-secret\""));
    let agent = ts.vault.store().agent_by_id(&id).await.unwrap().unwrap();
    assert!(agent.secret_hash.is_some());
    assert_eq!(ts.vault.store().agent_keys(&id).await.unwrap().len(), 1);

    // The key as an uploaded file, as the page's form sends it (the empty text box loses).
    let uploaded = generate(Algorithm::EdDSA);
    let created = b
        .post_multipart(
            "/ui/agents",
            &[("csrf", &csrf), ("name", "uploader"), ("public_key", "")],
            &[("public_key_file", "agent.pub.pem", &uploaded.public_pem)],
        )
        .await;
    assert_eq!(created.status, 201, "{}", alert(&created.body));
    assert!(!created.body.contains("id=\"client-secret\""));
    let private = b
        .post_multipart(
            "/ui/agents",
            &[("csrf", &csrf), ("name", "oops")],
            &[("public_key_file", "agent.pem", &uploaded.private_pem)],
        )
        .await;
    assert_eq!(private.status, 400);
    let forged = b
        .post_multipart(
            "/ui/agents",
            &[("csrf", "forged"), ("name", "forged")],
            &[("public_key_file", "agent.pub.pem", &uploaded.public_pem)],
        )
        .await;
    assert_eq!(forged.status, 403);
    assert_eq!(
        ts.vault.store().list_agents().await.unwrap().len(),
        agents_before + 2
    );

    // A grant with a policy; bad policies are refused and change nothing.
    let grant = |risk: &'static str, per_day: &'static str| {
        let (b, id, csrf) = (&b, &id, &csrf);
        async move {
            b.post(
                &format!("/ui/agents/{id}/grants"),
                &[
                    ("csrf", csrf),
                    ("connection", "demo-git"),
                    ("scopes", "read:user repo:read"),
                    ("risk", risk),
                    ("hours", "mon-fri 09:00-17:00 UTC"),
                    ("per_day", per_day),
                    ("ips", "10.0.0.0/8, 192.0.2.7"),
                ],
            )
            .await
        }
    };
    for (risk, per_day, why) in [
        ("repo:write=high", "5", "not one of the grant"),
        ("repo:read=extreme", "5", "extreme"),
        ("repo:read=high", "0", "between 1 and"),
        ("repo:read=high", "many", "whole number"),
    ] {
        let page = grant(risk, per_day).await;
        assert_eq!(page.status, 400, "{why}");
        assert!(page.body.contains(why), "{why}: {}", alert(&page.body));
        assert!(
            ts.vault
                .store()
                .list_grants()
                .await
                .unwrap()
                .iter()
                .all(|g| g.agent_id != id)
        );
    }
    let saved = grant("repo:read=critical", "5").await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let g = ts
        .vault
        .store()
        .list_grants()
        .await
        .unwrap()
        .into_iter()
        .find(|g| g.agent_id == id)
        .unwrap();
    assert_eq!(g.scopes.to_string_spaced(), "read:user repo:read");
    assert_eq!(g.policy.quotas.agent_per_day, Some(5));
    assert_eq!(g.policy.risk["repo:read"].to_string(), "critical");
    assert_eq!(g.policy.hours.len(), 1);
    assert_eq!(g.ip_allowlist, ["10.0.0.0/8", "192.0.2.7"]);
    // The editor shows it again, filled in.
    let edit = b.get(&format!("/ui/agents/{id}?edit=demo-git")).await.body;
    assert!(edit.contains("repo:read=critical") && edit.contains("Edit the grant"));

    // Disable, enable, remove the grant; each is on the agent's activity.
    let state = |s: &'static str| {
        let (b, id, csrf) = (&b, &id, &csrf);
        async move {
            b.post(
                &format!("/ui/agents/{id}/state"),
                &[("csrf", csrf), ("state", s)],
            )
            .await
        }
    };
    assert_eq!(state("disabled").await.status, 303);
    assert!(
        ts.vault
            .store()
            .agent_by_id(&id)
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    assert_eq!(state("sideways").await.status, 400);
    assert_eq!(state("enabled").await.status, 303);
    assert!(
        !ts.vault
            .store()
            .agent_by_id(&id)
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    let removed = b
        .post(
            &format!("/ui/agents/{id}/grants/demo-git/remove"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(removed.status, 303);
    assert!(
        ts.vault
            .store()
            .list_grants()
            .await
            .unwrap()
            .iter()
            .all(|g| g.agent_id != id)
    );
    let page = b.get(&format!("/ui/agents/{id}")).await.body;
    for action in [
        "client.create",
        "grant.upsert",
        "client.disable",
        "grant.delete",
    ] {
        assert!(page.contains(action), "{action} in {page}");
    }
    // The operator is named as such in the trail.
    let entries = ts.vault.store().list_audit(20).await.unwrap();
    let upsert = entries
        .iter()
        .find(|e| e.record.action == "grant.upsert")
        .unwrap();
    assert_eq!(
        (
            upsert.record.actor_type.as_str(),
            upsert.record.auth_method.as_str()
        ),
        ("operator", "dashboard")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_users_but_not_themselves() {
    let ts = TestServer::start().await;
    let olga = user(&ts, "olga", Role::Operator).await;
    let b = Browser::new(&ts);
    b.sign_in("olga", "a long enough password").await;
    let csrf = b.csrf().await;
    let users_before = ts.vault.store().list_users().await.unwrap().len();
    for (name, password, role, why) in [
        ("carol", "short", "user", "at least 12 characters"),
        ("carol", "a long enough password", "root", "Choose the role"),
        (
            "no spaces allowed",
            "a long enough password",
            "user",
            "Not created",
        ),
    ] {
        let page = b
            .post(
                "/ui/users",
                &[
                    ("csrf", &csrf),
                    ("username", name),
                    ("password", password),
                    ("role", role),
                ],
            )
            .await;
        assert_eq!(page.status, 400, "{why}");
        assert!(
            alert(&page.body).contains(why),
            "{why}: {}",
            alert(&page.body)
        );
    }
    assert_eq!(
        ts.vault.store().list_users().await.unwrap().len(),
        users_before
    );
    let created = b
        .post(
            "/ui/users",
            &[
                ("csrf", &csrf),
                ("username", "carol"),
                ("password", "a long enough password"),
                ("role", "user"),
            ],
        )
        .await;
    assert_eq!(created.status, 303);
    let shown = b.get(created.location.as_deref().unwrap()).await.body;
    assert!(shown.contains("Created carol (user)."), "{shown}");
    let carol = ts
        .vault
        .store()
        .user_by_username("carol")
        .await
        .unwrap()
        .unwrap();
    // Carol can sign in; promoted, she sees the operator pages.
    let c = Browser::new(&ts);
    c.sign_in("carol", "a long enough password").await;
    assert_eq!(c.get("/ui/agents").await.status, 403);
    let promoted = b
        .post(
            &format!("/ui/users/{}/role", carol.id),
            &[("csrf", &csrf), ("role", "operator")],
        )
        .await;
    assert_eq!(promoted.status, 303);
    assert_eq!(c.get("/ui/agents").await.status, 200);
    // Olga cannot demote or delete herself.
    for path in [
        format!("/ui/users/{olga}/role"),
        format!("/ui/users/{olga}/delete"),
    ] {
        let page = b.post(&path, &[("csrf", &csrf), ("role", "user")]).await;
        assert_eq!(page.status, 409, "{path}");
    }
    assert_eq!(
        ts.vault
            .store()
            .user_by_id(&olga)
            .await
            .unwrap()
            .unwrap()
            .role,
        Role::Operator
    );
    // Deleting asks first, then removes the user.
    let confirm = b.get(&format!("/ui/users/{}/delete", carol.id)).await;
    assert!(confirm.body.contains("Delete carol?"));
    let deleted = b
        .post(
            &format!("/ui/users/{}/delete", carol.id),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(deleted.status, 303);
    assert!(
        ts.vault
            .store()
            .user_by_id(&carol.id)
            .await
            .unwrap()
            .is_none()
    );
    // A signed-in session of a deleted user is over.
    assert_eq!(c.get("/ui").await.status, 303);
}
