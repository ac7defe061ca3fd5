//! Reading the audit trail over the admin API (`GET /api/v1/audit`) against a real server:
//! a mix of real entries (sign-ins, a connect, releases, an agent disabled and enabled through
//! the API, a revocation), each filter answering exactly the entries it should, cursor pages
//! that walk everything once while new entries arrive, problems for bad values, and no token
//! value anywhere in what is shown.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::harness::*;

const OPS: &str = "audit-reader";

struct Reply {
    status: u16,
    www_authenticate: Option<String>,
    text: String,
    body: Value,
}

async fn get(ts: &TestServer, path_and_query: &str, token: Option<&str>) -> Reply {
    let mut req = ts.http.get(ts.url(path_and_query));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let www_authenticate = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{path_and_query} → {status}: not JSON: {text}"));
    let expected_type = if status >= 400 {
        "application/problem+json"
    } else {
        "application/json"
    };
    assert_eq!(content_type.as_deref(), Some(expected_type), "{text}");
    assert!(status < 500, "{path_and_query} → {status}: {text}");
    Reply {
        status,
        www_authenticate,
        text,
        body,
    }
}

fn create_token(ts: &TestServer, name: &str) -> String {
    let out = ts.cli(&["api-token", "create", name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn rfc3339(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .unwrap()
        .format(&Rfc3339)
        .unwrap()
}

fn at(entry: &Value) -> i64 {
    OffsetDateTime::parse(entry["at"].as_str().unwrap(), &Rfc3339)
        .unwrap()
        .unix_timestamp()
}

fn seqs(entries: &[Value]) -> Vec<i64> {
    entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
}

/// Every page of `query` (`limit` each), following `next_cursor`; `between` runs after each
/// page. Returns the entries and all response texts.
async fn walk(
    ts: &TestServer,
    token: &str,
    query: &str,
    limit: u32,
    mut between: impl AsyncFnMut(),
) -> (Vec<Value>, Vec<String>) {
    let (mut entries, mut texts) = (Vec::new(), Vec::new());
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("/api/v1/audit?limit={limit}");
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = get(ts, &url, Some(token)).await;
        assert_eq!(r.status, 200, "{url}: {}", r.text);
        let page = r.body["entries"].as_array().unwrap().clone();
        assert!(page.len() <= limit as usize, "{url}");
        cursor = r.body["next_cursor"].as_str().map(str::to_owned);
        assert!(
            cursor.is_none() || page.len() == limit as usize,
            "only a full page has a next one: {}",
            r.text
        );
        entries.extend(page);
        texts.push(r.text);
        if cursor.is_none() {
            return (entries, texts);
        }
        between().await;
    }
}

/// The reference for a filter, applied to the shown entries.
struct Filter<'a> {
    user: Option<&'a str>,
    agent: Option<&'a str>,
    connection: Option<&'a str>,
    action: Option<&'a str>,
    decision: Option<&'a str>,
    since: Option<i64>,
    until: Option<i64>,
}

const ANY: Filter<'static> = Filter {
    user: None,
    agent: None,
    connection: None,
    action: None,
    decision: None,
    since: None,
    until: None,
};

impl Filter<'_> {
    fn matches(&self, e: &Value) -> bool {
        let is = |v: &Value, want: Option<&str>| want.is_none_or(|w| v.as_str() == Some(w));
        is(&e["subject_user"], self.user)
            && self.agent.is_none_or(|a| {
                (e["actor"]["type"] == "agent" && e["actor"]["id"] == a)
                    || e["target"]["agent_id"] == a
            })
            && is(&e["target"]["connection"], self.connection)
            && self.action.is_none_or(|a| match a.strip_suffix('*') {
                Some(prefix) => e["action"].as_str().unwrap().starts_with(prefix),
                None => e["action"] == a,
            })
            && is(&e["decision"], self.decision)
            && self.since.is_none_or(|t| at(e) >= t)
            && self.until.is_none_or(|t| at(e) < t)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_read_the_audit_trail_by_filter_and_page() {
    let ts = TestServer::start().await;
    let token = create_token(&ts, OPS);
    let (user, agent) = (ts.info.user_id.clone(), ts.info.agent_id.clone());

    // Sign-ins (one refused) and a connect.
    ts.clock.advance(100);
    let account = ts.connect_demo_account().await;
    let mut canaries = vec![ts.stored_refresh_token(&account).await];
    let (_, _, page) = ts.browse("/login?next=/ui/accounts").await;
    let csrf = hidden_field(&page, "csrf");
    let (status, _, _) = ts
        .submit(
            "/login",
            &[
                ("username", "demo"),
                ("password", "not the password"),
                ("csrf", &csrf),
                ("next", "/ui/accounts"),
            ],
        )
        .await;
    assert_eq!(status, 401);

    // Three releases in their own window of time; one says what it does in JSON.
    ts.clock.advance(100);
    let releases_from = ts.now();
    let mut released = Vec::new();
    for context in [
        "integration test",
        r#"{"task":"triage","ticket":7}"#,
        "nightly",
    ] {
        let subject = ts.subject(json!({ "audit_context": context }));
        let params = ts.params_with(subject, ts.assertion(json!({})));
        released.push(ts.post_form(&params).await.token().to_owned());
    }
    ts.clock.advance(100);
    let releases_until = ts.now();
    canaries.extend(released.iter().cloned());
    canaries.push(ts.stored_refresh_token(&account).await);

    // The agent disabled and enabled through the API, then the account revoked.
    ts.clock.advance(100);
    for what in ["disable", "enable"] {
        let resp = ts
            .http
            .post(ts.url(&format!("/api/v1/agents/{agent}/{what}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = ts
        .http
        .delete(ts.url(&format!("/api/v1/accounts/{account}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    canaries.extend([token.clone(), ts.info.password.clone()]);

    // Everything, newest first, is what the store holds.
    let r = get(&ts, "/api/v1/audit?limit=500", Some(&token)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["next_cursor"], Value::Null, "{}", r.text);
    let all = r.body["entries"].as_array().unwrap().clone();
    let stored = ts.vault.store().list_audit(100_000).await.unwrap();
    assert_eq!(
        seqs(&all),
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        "every entry, by descending seq"
    );
    let mut texts = vec![r.text];
    // The default page is 100 entries: all of these.
    let r = get(&ts, "/api/v1/audit", Some(&token)).await;
    assert_eq!(r.body["entries"].as_array().unwrap().len(), all.len());

    // The shape of an entry.
    for e in &all {
        let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys.retain(|k| *k != "mac");
        assert_eq!(
            keys,
            [
                "action",
                "actor",
                "at",
                "audit_context",
                "client_ip",
                "decision",
                "reason",
                "request_id",
                "scopes",
                "seq",
                "subject_user",
                "target"
            ],
            "{e}"
        );
        assert_eq!(
            e["actor"].as_object().unwrap().len(),
            3,
            "type, id, auth_method: {e}"
        );
        assert_eq!(
            e["target"].as_object().unwrap().len(),
            3,
            "connection, account_id, agent_id: {e}"
        );
        assert!(e["scopes"].is_array(), "{e}");
        if let Some(mac) = e.get("mac") {
            let mac = mac.as_str().unwrap();
            assert!(
                !mac.is_empty() && mac.bytes().all(|b| b.is_ascii_hexdigit()),
                "{e}"
            );
        }
    }

    // Releases: the agent, the user, the connection, the scopes, what the agent said, and the
    // token only as its hash.
    let releases: Vec<&Value> = all
        .iter()
        .filter(|e| e["action"] == "token.release")
        .collect();
    assert_eq!(releases.len(), 3);
    for (e, (token_value, context)) in releases.iter().rev().zip(released.iter().zip([
        json!("integration test"),
        json!({"task": "triage", "ticket": 7}),
        json!("nightly"),
    ])) {
        assert_eq!(
            e["actor"],
            json!({"type": "agent", "id": agent, "auth_method": "private_key_jwt"})
        );
        assert_eq!(e["subject_user"], user.as_str());
        assert_eq!(e["target"]["connection"], "demo-git");
        assert_eq!(e["target"]["account_id"], account.as_str());
        assert_eq!(e["decision"], "allow");
        assert_eq!(e["audit_context"], context);
        assert!(!e["scopes"].as_array().unwrap().is_empty(), "{e}");
        assert_eq!(
            e["reason"],
            format!(
                "token {}",
                latchkey_crypto::secrets::sha256_b64(token_value.as_bytes())
            )
        );
        assert!(
            e.get("mac").is_some_and(Value::is_string),
            "a release is on the chain: {e}"
        );
        assert!((releases_from..releases_until).contains(&at(e)), "{e}");
    }
    let disable = all
        .iter()
        .find(|e| e["action"] == "client.disable")
        .expect("the disable is on the trail");
    assert_eq!(
        disable["actor"],
        json!({"type": "operator", "id": OPS, "auth_method": "api_token"})
    );
    assert_eq!(disable["target"]["agent_id"], agent.as_str());

    // Each filter answers exactly its entries, newest first.
    let cases: Vec<(String, Filter<'_>, RangeInclusive<usize>)> = vec![
        (
            format!("user={user}"),
            Filter {
                user: Some(&user),
                ..ANY
            },
            // created, signed in, connect, releases ×3, revoke (the refused sign-in names no
            // user: it shows no more than the username tried)
            7..=7,
        ),
        (
            format!("agent={agent}"),
            Filter {
                agent: Some(&agent),
                ..ANY
            },
            // created, granted, releases ×3, disabled, enabled
            7..=7,
        ),
        (
            "connection=demo-git".into(),
            Filter {
                connection: Some("demo-git"),
                ..ANY
            },
            // created, granted, connect, releases ×3, revoke
            7..=7,
        ),
        (
            "action=token.release".into(),
            Filter {
                action: Some("token.release"),
                ..ANY
            },
            3..=3,
        ),
        (
            "action=account.*".into(),
            Filter {
                action: Some("account.*"),
                ..ANY
            },
            2..=2,
        ),
        (
            "action=account".into(),
            Filter {
                action: Some("account"),
                ..ANY
            },
            0..=0,
        ),
        (
            "decision=deny".into(),
            Filter {
                decision: Some("deny"),
                ..ANY
            },
            1..=1,
        ),
        (
            "decision=allow".into(),
            Filter {
                decision: Some("allow"),
                ..ANY
            },
            all.len() - 1..=all.len() - 1,
        ),
        (
            format!(
                "since={}&until={}",
                rfc3339(releases_from),
                rfc3339(releases_until)
            ),
            Filter {
                since: Some(releases_from),
                until: Some(releases_until),
                ..ANY
            },
            3..=3,
        ),
        (
            // The same window, written with an offset.
            format!(
                "since={}&until={}",
                OffsetDateTime::from_unix_timestamp(releases_from)
                    .unwrap()
                    .to_offset(time::macros::offset!(+02:00))
                    .format(&Rfc3339)
                    .unwrap()
                    .replace('+', "%2B"),
                rfc3339(releases_until)
            ),
            Filter {
                since: Some(releases_from),
                until: Some(releases_until),
                ..ANY
            },
            3..=3,
        ),
        (
            format!("since={}", rfc3339(releases_until)),
            Filter {
                since: Some(releases_until),
                ..ANY
            },
            // disable, enable, revoke
            3..=3,
        ),
        (
            format!(
                "agent={agent}&action=token.release&decision=allow&user={user}&connection=demo-git"
            ),
            Filter {
                user: Some(&user),
                agent: Some(&agent),
                connection: Some("demo-git"),
                action: Some("token.release"),
                decision: Some("allow"),
                ..ANY
            },
            3..=3,
        ),
        (
            format!("agent={agent}&action=client.*"),
            Filter {
                agent: Some(&agent),
                action: Some("client.*"),
                ..ANY
            },
            // created, disabled, enabled
            3..=3,
        ),
        (
            "user=usr_nobody".into(),
            Filter {
                user: Some("usr_nobody"),
                ..ANY
            },
            0..=0,
        ),
    ];
    for (query, filter, count) in &cases {
        let want: Vec<Value> = all.iter().filter(|e| filter.matches(e)).cloned().collect();
        let r = get(&ts, &format!("/api/v1/audit?{query}"), Some(&token)).await;
        assert_eq!(r.status, 200, "{query}: {}", r.text);
        assert_eq!(r.body["entries"], Value::Array(want.clone()), "{query}");
        assert!(count.contains(&want.len()), "{query}: {}", r.text);
        assert_eq!(r.body["next_cursor"], Value::Null, "{query}");
        texts.push(r.text);
        // Paged by 2, the same entries.
        let (paged, page_texts) = walk(&ts, &token, query, 2, async || {}).await;
        assert_eq!(paged, want, "{query} by 2");
        texts.extend(page_texts);
    }
    let actions: BTreeSet<&str> = all
        .iter()
        .filter(|e| {
            Filter {
                action: Some("account.*"),
                ..ANY
            }
            .matches(e)
        })
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        BTreeSet::from(["account.connect", "account.revoke"])
    );

    // Paging by 2 while entries that match are appended between pages (the agent disabled,
    // enabled, …): exactly the entries there were when the walk began, once each, by
    // descending seq; the new ones are on a fresh first page.
    let toggles = std::cell::Cell::new(0);
    for query in ["", &format!("agent={agent}") as &str] {
        let before = get(&ts, "/api/v1/audit?limit=500", Some(&token)).await;
        let before = before.body["entries"].as_array().unwrap().clone();
        let (walked, page_texts) = walk(&ts, &token, query, 2, async || {
            toggles.set(toggles.get() + 1);
            let what = ["enable", "disable"][toggles.get() % 2];
            let resp = ts
                .http
                .post(ts.url(&format!("/api/v1/agents/{agent}/{what}")))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        })
        .await;
        texts.extend(page_texts);
        let filter = if query.is_empty() {
            ANY
        } else {
            Filter {
                agent: Some(&agent),
                ..ANY
            }
        };
        let want: Vec<Value> = before
            .iter()
            .filter(|e| filter.matches(e))
            .cloned()
            .collect();
        assert!(want.len() > 4, "several pages");
        assert_eq!(walked, want, "walk {query:?}");
        let unique: BTreeSet<i64> = seqs(&walked).into_iter().collect();
        assert_eq!(unique.len(), walked.len(), "no entry twice");
        let fresh = get(&ts, &format!("/api/v1/audit?limit=1&{query}"), Some(&token)).await;
        let newest = &fresh.body["entries"][0];
        assert!(
            newest["seq"].as_i64().unwrap() > before[0]["seq"].as_i64().unwrap(),
            "{}",
            fresh.text
        );
        assert!(
            newest["action"].as_str().unwrap().starts_with("client."),
            "{}",
            fresh.text
        );
        assert!(fresh.body["next_cursor"].is_string());
    }

    // Bad values are problems naming the parameter; without a token, 401.
    let cursor_of_other_kind =
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, "seq=3");
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("decision=maybe", "decision"),
        ("since=yesterday", "since"),
        ("since=1717243200", "since"),
        ("until=2025-06-01", "until"),
        (
            "since=2025-06-02T00:00:00Z&until=2025-06-01T00:00:00Z",
            "until",
        ),
        ("cursor=not*base64", "cursor"),
        ("cursor=czA", "cursor"),
        (&format!("cursor={cursor_of_other_kind}"), "cursor"),
        ("action=acc*", "action"),
        ("action=*", "action"),
        ("action=.*", "action"),
        ("action=a*b.*", "action"),
        ("action=token.*.release", "action"),
        ("user=", "user"),
        ("agent=a&agent=b", "agent"),
        ("colour=red", "colour"),
    ] {
        let r = get(&ts, &format!("/api/v1/audit?{query}"), Some(&token)).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text);
        assert_eq!(r.body["status"], 400);
        assert_eq!(r.body["validation_errors"][0]["field"], field, "{query}");
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("`{field}`")),
            "{query}: {}",
            r.text
        );
    }
    let r = get(&ts, "/api/v1/audit", None).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(
        r.www_authenticate.as_deref(),
        Some("Bearer realm=\"latchkey\"")
    );
    let r = get(&ts, "/api/v1/audit", Some("lk_op_unknown")).await;
    assert_eq!(r.status, 401, "{}", r.text);

    // No token value the test saw is in anything shown.
    for text in &texts {
        for canary in &canaries {
            assert!(!text.contains(canary.as_str()), "a token leaked: {text}");
        }
        assert!(!text.contains("\"access_token\"") && !text.contains("\"refresh_token\""));
    }
}
