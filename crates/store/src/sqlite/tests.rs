//! Store behaviour the domain relies on. (This becomes the conformance suite every backend runs.)

use super::*;

async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("t.db")).await.unwrap();
    (dir, s)
}

fn audit(action: &str) -> AuditRecord {
    AuditRecord {
        at: 1,
        actor_type: "operator".into(),
        actor_id: "t".into(),
        auth_method: "test".into(),
        action: action.into(),
        decision: "allow".into(),
        ..Default::default()
    }
}

async fn seed(s: &SqliteStore) -> ConnectedAccount {
    s.insert_user(
        &User {
            id: "usr_1".into(),
            username: "alice".into(),
            password_hash: None,
            totp_seed: None,
            totp_enabled: false,
            role: Role::User,
            created_at: 1,
        },
        &audit("u"),
    )
    .await
    .unwrap();
    let c = Connection {
        id: "con_1".into(),
        name: "demo-git".into(),
        provider: "demo".into(),
        client_id: "c".into(),
        client_secret: None,
        authorize_url: String::new(),
        token_url: String::new(),
        revoke_url: None,
        userinfo_url: None,
        api_base_url: None,
        issuer: Some("https://idp.example".into()),
        scopes: Scopes::parse("a b"),
        keep_alive_secs: Some(1000),
        created_at: 1,
    };
    s.insert_connection(&c, &audit("c")).await.unwrap();
    let a = ConnectedAccount {
        id: "cac_1".into(),
        user_id: "usr_1".into(),
        connection_id: "con_1".into(),
        upstream_account_id: Some("1001".into()),
        scopes: Scopes::parse("a b"),
        access_token: Some(vec![1]),
        access_expires_at: Some(100),
        refresh_token: Some(vec![2]),
        status: AccountStatus::Active,
        status_reason: None,
        created_at: 1,
        updated_at: 1,
        last_used_at: None,
        last_refreshed_at: None,
        token_version: 0,
        refresh_started_at: None,
    };
    s.upsert_account(&a, &audit("a")).await.unwrap();
    a
}

#[tokio::test]
async fn a_newer_or_gapped_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let s = SqliteStore::open(&path).await.unwrap();
    let known = MIGRATIONS.last().unwrap().0;
    sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)")
        .bind(known + 1)
        .execute(s.pool())
        .await
        .unwrap();
    s.pool().close().await;
    let err = SqliteStore::open(&path).await.unwrap_err().to_string();
    assert!(err.contains("newer than this Latchkey"), "{err}");

    let path = dir.path().join("gap.db");
    let s = SqliteStore::open(&path).await.unwrap();
    sqlx::query("DELETE FROM schema_migrations WHERE version = 2")
        .execute(s.pool())
        .await
        .unwrap();
    s.pool().close().await;
    let err = SqliteStore::open(&path).await.unwrap_err().to_string();
    assert!(err.contains("gaps"), "{err}");
}

#[tokio::test]
async fn reopen_is_idempotent_and_file_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let s = SqliteStore::open(&path).await.unwrap();
    s.insert_user(
        &User {
            id: "u".into(),
            username: "x".into(),
            password_hash: None,
            totp_seed: None,
            totp_enabled: false,
            role: Role::User,
            created_at: 1,
        },
        &audit("u"),
    )
    .await
    .unwrap();
    drop(s);
    let s = SqliteStore::open(&path).await.unwrap();
    assert!(s.user_by_id("u").await.unwrap().is_some());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[tokio::test]
async fn duplicate_username_is_a_conflict_and_writes_nothing() {
    let (_d, s) = store().await;
    let u = User {
        id: "u1".into(),
        username: "alice".into(),
        password_hash: None,
        totp_seed: None,
        totp_enabled: false,
        role: Role::User,
        created_at: 1,
    };
    s.insert_user(&u, &audit("user.create")).await.unwrap();
    let again = User {
        id: "u2".into(),
        ..u
    };
    assert!(matches!(
        s.insert_user(&again, &audit("user.create")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.list_audit(10).await.unwrap().len(),
        1,
        "the failed insert left no audit entry"
    );
}

#[tokio::test]
async fn release_consumes_jtis_atomically() {
    let (_d, s) = store().await;
    seed(&s).await;
    let j = |k: &str| JtiUse {
        key: k.into(),
        expires_at: 10,
    };
    s.commit_release(
        None,
        &[j("a:1"), j("s:1")],
        Some("cac_1"),
        &audit("token.release"),
    )
    .await
    .unwrap();
    // Replaying either jti fails and writes nothing (the fresh one is not consumed either).
    assert!(matches!(
        s.commit_release(
            None,
            &[j("a:2"), j("s:1")],
            Some("cac_1"),
            &audit("token.release")
        )
        .await,
        Err(ReleaseError::Replay(1))
    ));
    s.commit_release(
        None,
        &[j("a:2"), j("s:2")],
        Some("cac_1"),
        &audit("token.release"),
    )
    .await
    .unwrap();
    let releases = s
        .list_audit(100)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.record.action == "token.release")
        .count();
    assert_eq!(releases, 2);
    // A revoked account releases nothing.
    assert!(
        s.revoke_account("cac_1", &audit("account.revoke"))
            .await
            .unwrap()
    );
    assert!(matches!(
        s.commit_release(None, &[j("s:3")], Some("cac_1"), &audit("token.release"))
            .await,
        Err(ReleaseError::AccountInactive)
    ));
    let a = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert!(a.access_token.is_none() && a.refresh_token.is_none());
    assert_eq!(s.purge_expired_jtis(11).await.unwrap(), 4);
}

#[tokio::test]
async fn token_updates_are_fenced_by_version() {
    let (_d, s) = store().await;
    let a = seed(&s).await;
    let mut newer = a.clone();
    newer.access_token = Some(vec![9]);
    newer.updated_at = 77;
    assert!(s.update_account_tokens(&newer, 0).await.unwrap());
    let refreshed = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(
        (refreshed.updated_at, refreshed.last_refreshed_at),
        (77, Some(77)),
        "the new time, not the old"
    );
    // A writer still holding version 0 loses.
    assert!(!s.update_account_tokens(&newer, 0).await.unwrap());
    assert!(
        !s.set_account_status("cac_1", AccountStatus::NeedsReauth, 0, &audit("x"))
            .await
            .unwrap()
    );
    let stored = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(
        (stored.token_version, stored.access_token),
        (1, Some(vec![9]))
    );
}

#[tokio::test]
async fn connect_flows_are_single_use_and_expire() {
    let (_d, s) = store().await;
    seed(&s).await;
    let f = ConnectFlow {
        state_hash: "h".into(),
        user_id: "usr_1".into(),
        connection_id: "con_1".into(),
        code_verifier: vec![1],
        redirect_uri: "r".into(),
        scopes: Scopes::parse("a b"),
        then_to: "return:/authorize?x=1".into(),
        expires_at: 50,
    };
    s.insert_connect_flow(&f).await.unwrap();
    let taken = s.take_connect_flow("h", 10).await.unwrap().unwrap();
    assert_eq!(
        (
            taken.scopes.to_string_spaced().as_str(),
            taken.then_to.as_str()
        ),
        ("a b", "return:/authorize?x=1")
    );
    assert!(s.take_connect_flow("h", 10).await.unwrap().is_none());
    s.insert_connect_flow(&f).await.unwrap();
    assert!(
        s.take_connect_flow("h", 60).await.unwrap().is_none(),
        "expired flows are not returned"
    );
}

#[tokio::test]
async fn narrowed_tokens_are_fenced_and_go_with_revocation() {
    let (_d, s) = store().await;
    let a = seed(&s).await;
    let t = ScopedToken {
        id: "cac_1 a".into(),
        account_id: "cac_1".into(),
        scopes: Scopes::parse("a"),
        access_token: vec![7],
        expires_at: Some(50),
    };
    let mut rotated = a.clone();
    rotated.refresh_token = Some(vec![3]);
    assert!(s.store_scoped_token(&rotated, 0, &t).await.unwrap());
    assert!(
        !s.store_scoped_token(&rotated, 0, &t).await.unwrap(),
        "a stale version loses"
    );
    let stored = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(
        (stored.token_version, stored.refresh_token),
        (1, Some(vec![3]))
    );
    assert_eq!(
        s.scoped_token("cac_1 a")
            .await
            .unwrap()
            .unwrap()
            .access_token,
        vec![7]
    );
    assert!(
        s.sealed_fields()
            .await
            .unwrap()
            .iter()
            .any(|f| f.table == "scoped_tokens")
    );
    s.revoke_account("cac_1", &audit("account.revoke"))
        .await
        .unwrap();
    assert!(s.scoped_token("cac_1 a").await.unwrap().is_none());
}

#[tokio::test]
async fn totp_steps_are_used_once_and_sessions_keep_their_authentication() {
    let (_d, s) = store().await;
    seed(&s).await;
    s.set_totp("usr_1", Some(&[1, 2, 3]), true, &audit("user.totp"))
        .await
        .unwrap();
    let u = s.user_by_id("usr_1").await.unwrap().unwrap();
    assert_eq!((u.totp_seed, u.totp_enabled), (Some(vec![1, 2, 3]), true));
    assert!(s.consume_totp_step("usr_1", 100).await.unwrap());
    assert!(
        !s.consume_totp_step("usr_1", 100).await.unwrap(),
        "the same step twice"
    );
    assert!(
        !s.consume_totp_step("usr_1", 99).await.unwrap(),
        "an earlier step"
    );
    assert!(s.consume_totp_step("usr_1", 101).await.unwrap());
    assert!(matches!(
        s.set_totp("nobody", None, false, &audit("user.totp")).await,
        Err(StoreError::NotFound)
    ));
    let session = Session {
        user_id: "usr_1".into(),
        auth_methods: "pwd otp".into(),
        authenticated_at: 5,
        pending_mfa: false,
        mfa_at: Some(5),
    };
    s.insert_session("h", &session, 50).await.unwrap();
    assert_eq!(s.session("h", 10).await.unwrap(), Some(session));
    assert_eq!(s.session("h", 60).await.unwrap(), None, "expired");
}

fn query(now: i64, expiring_before: i64, used_since: i64) -> RefreshQuery {
    RefreshQuery {
        now,
        expiring_before,
        used_since,
        interrupted_before: 0,
        claim_until: now + 10,
        limit: 10,
    }
}

async fn claim(s: &SqliteStore, q: RefreshQuery) -> Vec<(String, Option<Scopes>, RefreshWhy)> {
    s.claim_refresh_work(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.account.id, w.scope, w.why))
        .collect()
}

#[tokio::test]
async fn refresh_work_is_claimed_once_and_covers_every_reason() {
    let (_d, s) = store().await;
    let a = seed(&s).await; // expires at 100, never used, keep-alive every 1000 s
    assert!(
        claim(&s, query(60, 200, 0)).await.is_empty(),
        "never used: not due"
    );
    let j = JtiUse {
        key: "k".into(),
        expires_at: 10,
    };
    s.commit_release(
        None,
        &[j],
        Some("cac_1"),
        &AuditRecord {
            at: 50,
            ..audit("token.release")
        },
    )
    .await
    .unwrap();
    assert!(
        claim(&s, query(60, 90, 0)).await.is_empty(),
        "not expiring yet"
    );
    assert!(
        claim(&s, query(60, 200, 55)).await.is_empty(),
        "idle since before 55"
    );
    let expiring = ("cac_1".to_owned(), None, RefreshWhy::Expiring);
    assert_eq!(claim(&s, query(60, 200, 0)).await, vec![expiring.clone()]);
    assert!(
        claim(&s, query(65, 200, 0)).await.is_empty(),
        "claimed until 70 by the first pass"
    );
    assert_eq!(claim(&s, query(70, 200, 0)).await, vec![expiring]);

    // With a narrowed token in use, that one is due, not the account's own.
    let t = ScopedToken {
        id: "cac_1 a".into(),
        account_id: "cac_1".into(),
        scopes: Scopes::parse("a"),
        access_token: vec![7],
        expires_at: Some(150),
    };
    assert!(s.store_scoped_token(&a, 0, &t).await.unwrap());
    let due = claim(&s, query(80, 200, 0)).await;
    assert_eq!(
        due,
        vec![(
            "cac_1".to_owned(),
            Some(Scopes::parse("a")),
            RefreshWhy::Expiring
        )]
    );

    // A refresh that started and never committed is found, first, once it is old enough.
    assert!(s.mark_refresh_started("cac_1", 1, 85).await.unwrap());
    assert!(
        !s.mark_refresh_started("cac_1", 0, 85).await.unwrap(),
        "stale version"
    );
    let interrupted = RefreshQuery {
        interrupted_before: 86,
        ..query(100, 0, 0)
    };
    assert_eq!(
        claim(&s, interrupted.clone()).await,
        vec![("cac_1".to_owned(), None, RefreshWhy::Interrupted)]
    );
    // Committing the refresh's outcome clears the mark.
    let mut b = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(b.refresh_started_at, Some(85));
    b.updated_at = 95;
    assert!(s.update_account_tokens(&b, 1).await.unwrap());
    let b = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(
        (b.refresh_started_at, b.last_refreshed_at),
        (None, Some(95))
    );
    assert!(
        claim(
            &s,
            RefreshQuery {
                now: 200,
                ..interrupted
            }
        )
        .await
        .is_empty()
    );

    // Idle longer than the connection's keep-alive interval (1000 s since the last refresh).
    assert!(claim(&s, query(1095, 0, 0)).await.is_empty());
    assert_eq!(
        claim(&s, query(1096, 0, 0)).await,
        vec![("cac_1".to_owned(), None, RefreshWhy::KeepAlive)]
    );
    // A status change clears the mark too, and inactive accounts are never due.
    assert!(s.mark_refresh_started("cac_1", 2, 1100).await.unwrap());
    assert!(
        s.set_account_status("cac_1", AccountStatus::NeedsReauth, 2, &audit("x"))
            .await
            .unwrap()
    );
    let b = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(b.refresh_started_at, None);
    assert!(claim(&s, query(5000, 9999, 0)).await.is_empty());
}

#[tokio::test]
async fn webhook_outbox_is_written_with_its_event_and_claimed_once() {
    let (_d, s) = store().await;
    let with_event = |at| AuditRecord {
        at,
        notify: Some(Notification {
            event: "account.needs_reauth".into(),
            body: "{}".into(),
        }),
        ..audit("x")
    };
    s.append_audit(&with_event(10)).await.unwrap();
    s.append_audit(&with_event(11)).await.unwrap();
    s.append_audit(&audit("no event")).await.unwrap();
    let due = s.claim_webhooks(20, 80, 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].event, "account.needs_reauth");
    assert!(due[0].id.starts_with("whk_") && due[0].id != due[1].id);
    assert!(
        s.claim_webhooks(50, 110, 10).await.unwrap().is_empty(),
        "claimed"
    );
    s.webhook_delivered(&due[0].id, 30).await.unwrap();
    s.webhook_failed(&due[1].id, 30, Some(100), "503")
        .await
        .unwrap();
    assert!(s.claim_webhooks(99, 150, 10).await.unwrap().is_empty());
    let again = s.claim_webhooks(100, 150, 10).await.unwrap();
    assert_eq!((again.len(), again[0].attempts), (1, 1));
    s.webhook_failed(&again[0].id, 101, None, "gone")
        .await
        .unwrap();
    assert!(
        s.claim_webhooks(10_000, 10_050, 10)
            .await
            .unwrap()
            .is_empty(),
        "given up"
    );
}

#[tokio::test]
async fn operator_tokens_authenticate_until_revoked() {
    let (_d, s) = store().await;
    let t = OperatorToken {
        id: "opt_1".into(),
        name: "ci".into(),
        created_at: 1,
        last_used_at: None,
        revoked_at: None,
    };
    s.insert_operator_token(&t, "h1", &audit("c"))
        .await
        .unwrap();
    assert!(matches!(
        s.insert_operator_token(&t, "h2", &audit("c")).await,
        Err(StoreError::Conflict(_))
    ));
    let used = s.use_operator_token("h1", 7).await.unwrap().unwrap();
    assert_eq!((used.name.as_str(), used.last_used_at), ("ci", Some(7)));
    assert!(s.use_operator_token("h2", 7).await.unwrap().is_none());
    assert!(s.revoke_operator_token("ci", &audit("r")).await.unwrap());
    assert!(!s.revoke_operator_token("ci", &audit("r")).await.unwrap());
    assert!(s.use_operator_token("h1", 8).await.unwrap().is_none());
    assert!(
        s.list_operator_tokens().await.unwrap()[0]
            .revoked_at
            .is_some()
    );
}

/// A mixed trail for the audit-read tests: who, what, where and when vary independently of
/// the order of writing (`at` is not monotonic in `seq`).
fn trail_entry(i: usize) -> AuditRecord {
    let (actor_type, actor_id) = [
        ("agent", "agt_1"),
        ("agent", "agt_2"),
        // Not an agent, though the id looks like one: `agent=agt_1` must not match it.
        ("operator", "agt_1"),
        ("user", "usr_a"),
    ][i % 4];
    AuditRecord {
        at: 1000 + ((i * 37) % 400) as i64,
        actor_type: actor_type.into(),
        actor_id: actor_id.into(),
        auth_method: "test".into(),
        subject_user: [Some("usr_a"), Some("usr_b"), None][i % 3].map(Into::into),
        action: [
            "token.release",
            "account.connect",
            "account.revoke",
            // Shares the text `account` but not the prefix `account.`.
            "accounts.list",
            "client.disable",
        ][(i / 3) % 5]
            .into(),
        connection: [Some("demo-git"), Some("github"), None][(i / 2) % 3].map(Into::into),
        agent_id: [Some("agt_1"), Some("agt_2"), None, None, None][i % 5].map(Into::into),
        decision: if i.is_multiple_of(7) { "deny" } else { "allow" }.into(),
        scopes: Some("a b".into()),
        ..Default::default()
    }
}

/// What `q` must return, computed from the entries themselves.
fn expected(all: &[AuditEntry], q: &AuditQuery) -> Vec<i64> {
    let mut seqs: Vec<i64> = all
        .iter()
        .filter(|e| {
            let r = &e.record;
            q.subject_user
                .as_ref()
                .is_none_or(|u| r.subject_user.as_ref() == Some(u))
                && q.agent.as_ref().is_none_or(|a| {
                    (r.actor_type == "agent" && &r.actor_id == a) || r.agent_id.as_ref() == Some(a)
                })
                && q.connection
                    .as_ref()
                    .is_none_or(|c| r.connection.as_ref() == Some(c))
                && q.action.as_ref().is_none_or(|a| &r.action == a)
                && q.action_prefix
                    .as_ref()
                    .is_none_or(|p| r.action.starts_with(p.as_str()))
                && q.decision.as_ref().is_none_or(|d| &r.decision == d)
                && q.since.is_none_or(|t| r.at >= t)
                && q.until.is_none_or(|t| r.at < t)
                && q.before_seq.is_none_or(|s| e.seq < s)
        })
        .map(|e| e.seq)
        .collect();
    seqs.sort_unstable_by(|a, b| b.cmp(a));
    seqs
}

/// Every page of `q`, `limit` at a time, following the last seq of each page.
async fn walk(s: &SqliteStore, q: &AuditQuery, limit: i64) -> Vec<i64> {
    let mut q = AuditQuery {
        limit,
        before_seq: None,
        ..q.clone()
    };
    let mut seen = Vec::new();
    loop {
        let page = s.query_audit(&q).await.unwrap();
        assert!(page.len() as i64 <= limit);
        seen.extend(page.iter().map(|e| e.seq));
        if (page.len() as i64) < limit {
            return seen;
        }
        q.before_seq = page.last().map(|e| e.seq);
    }
}

#[tokio::test]
async fn audit_reads_filter_and_page_newest_first() {
    let (_d, s) = store().await;
    for i in 0..60 {
        s.append_audit(&trail_entry(i)).await.unwrap();
    }
    let all = s.list_audit(1000).await.unwrap();
    assert_eq!(all.len(), 60);

    let some = |v: &str| Some(v.to_owned());
    let queries = [
        AuditQuery::default(),
        AuditQuery {
            subject_user: some("usr_a"),
            ..Default::default()
        },
        AuditQuery {
            agent: some("agt_1"),
            ..Default::default()
        },
        AuditQuery {
            agent: some("agt_2"),
            decision: some("allow"),
            ..Default::default()
        },
        AuditQuery {
            connection: some("github"),
            ..Default::default()
        },
        AuditQuery {
            action: some("token.release"),
            ..Default::default()
        },
        AuditQuery {
            action_prefix: some("account."),
            ..Default::default()
        },
        AuditQuery {
            decision: some("deny"),
            ..Default::default()
        },
        AuditQuery {
            since: Some(1100),
            until: Some(1250),
            ..Default::default()
        },
        AuditQuery {
            subject_user: some("usr_b"),
            agent: some("agt_1"),
            connection: some("demo-git"),
            ..Default::default()
        },
        AuditQuery {
            agent: some("agt_1"),
            action_prefix: some("account."),
            since: Some(1050),
            ..Default::default()
        },
        AuditQuery {
            connection: some("demo-git"),
            action: some("client.disable"),
            until: Some(1300),
            ..Default::default()
        },
        AuditQuery {
            subject_user: some("nobody"),
            ..Default::default()
        },
        AuditQuery {
            action: some("account"),
            ..Default::default()
        },
    ];
    for q in &queries {
        let want = expected(&all, q);
        // A filter that matches nothing is fine only where the data says so.
        if q.subject_user.as_deref() != Some("nobody") && q.action.as_deref() != Some("account") {
            assert!(!want.is_empty(), "{q:?} matches something");
        }
        let one_page = s
            .query_audit(&AuditQuery {
                limit: 1000,
                ..q.clone()
            })
            .await
            .unwrap();
        assert_eq!(
            one_page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            want,
            "{q:?}"
        );
        // Any page size walks the same entries, each once, newest first.
        for limit in [1, 2, 3, 7, 500] {
            assert_eq!(walk(&s, q, limit).await, want, "{q:?} by {limit}");
        }
        // `limit` is a cap.
        let capped = s
            .query_audit(&AuditQuery {
                limit: 2,
                ..q.clone()
            })
            .await
            .unwrap();
        assert_eq!(
            capped.iter().map(|e| e.seq).collect::<Vec<_>>(),
            want.iter().copied().take(2).collect::<Vec<_>>()
        );
    }
    // `agent` is the agent as actor, or the target: never another kind of actor with that id.
    let agt_1 = expected(
        &all,
        &AuditQuery {
            agent: some("agt_1"),
            ..Default::default()
        },
    );
    let as_actor = all
        .iter()
        .filter(|e| e.record.actor_type == "agent" && e.record.actor_id == "agt_1")
        .count();
    let as_target_only = all
        .iter()
        .filter(|e| e.record.agent_id.as_deref() == Some("agt_1"))
        .filter(|e| !(e.record.actor_type == "agent" && e.record.actor_id == "agt_1"))
        .count();
    assert!(as_actor > 0 && as_target_only > 0);
    assert_eq!(agt_1.len(), as_actor + as_target_only);

    // Entries appended mid-walk do not show up in (or shift) the pages after the cursor.
    let q = AuditQuery {
        subject_user: some("usr_a"),
        limit: 3,
        ..Default::default()
    };
    let want = expected(&all, &q);
    let mut seen = Vec::new();
    let mut page = s.query_audit(&q).await.unwrap();
    while !page.is_empty() {
        seen.extend(page.iter().map(|e| e.seq));
        for i in 0..3 {
            s.append_audit(&trail_entry(i)).await.unwrap();
        }
        page = s
            .query_audit(&AuditQuery {
                before_seq: seen.last().copied(),
                ..q.clone()
            })
            .await
            .unwrap();
    }
    assert_eq!(seen, want);
    // A fresh first page shows them.
    let fresh = s.query_audit(&q).await.unwrap();
    assert!(fresh[0].seq > all[0].seq);

    // The entry comes back whole.
    let one = s
        .query_audit(&AuditQuery {
            before_seq: Some(all[59].seq + 1),
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let (got, put) = (&one[0].record, trail_entry(0));
    assert_eq!(
        (
            one[0].seq,
            got.at,
            got.actor_type.as_str(),
            got.actor_id.as_str(),
            got.subject_user.as_deref(),
            got.action.as_str(),
            got.connection.as_deref(),
            got.agent_id.as_deref(),
            got.scopes.as_deref(),
            got.decision.as_str(),
        ),
        (
            all[59].seq,
            put.at,
            put.actor_type.as_str(),
            put.actor_id.as_str(),
            put.subject_user.as_deref(),
            put.action.as_str(),
            put.connection.as_deref(),
            put.agent_id.as_deref(),
            put.scopes.as_deref(),
            put.decision.as_str(),
        )
    );
}

#[tokio::test]
async fn audit_reads_walk_an_index_from_the_cursor() {
    let (_d, s) = store().await;
    for (sql, index) in [
        (AUDIT_BY_USER, "audit_events_subject_user"),
        (AUDIT_BY_CONNECTION, "audit_events_connection"),
        (AUDIT_BY_ACTION, "audit_events_action"),
        (AUDIT_BY_AGENT, "audit_events_agent_actor"),
        (AUDIT_BY_AGENT, "audit_events_agent_target"),
    ] {
        let plan: Vec<String> =
            sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .bind("x")
                .bind("x")
                .bind("x")
                .bind("x")
                .bind("x")
                .bind("x")
                .bind(0_i64)
                .bind(i64::MAX)
                .bind(i64::MAX)
                .bind(10_i64)
                .fetch_all(s.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<String, _>("detail"))
                .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains(&format!("USING INDEX {index} (")) && plan.contains("rowid<?"),
            "{sql}\n{plan}"
        );
        assert!(
            !plan.contains("USE TEMP B-TREE FOR ORDER BY") || sql == AUDIT_BY_AGENT,
            "{plan}"
        );
    }
}

#[tokio::test]
async fn a_grant_keeps_its_policy_and_an_unreadable_one_releases_nothing() {
    use latchkey_core::policy::{GrantPolicy, Quotas, Risk, TimeWindow};
    let (_d, s) = store().await;
    seed(&s).await;
    let agent = Agent {
        id: "agt_1".into(),
        name: "bot".into(),
        created_at: 1,
        ..Default::default()
    };
    s.insert_agent(&agent, &[], &audit("client.create"))
        .await
        .unwrap();
    let policy = GrantPolicy {
        risk: [("a".to_owned(), Risk::Critical)].into(),
        hours: vec![TimeWindow::parse("mon-fri 09:00-18:00 Europe/Berlin").unwrap()],
        max_lifetime: Some(600),
        quotas: Quotas {
            user_per_day: Some(7),
            ..Quotas::default()
        },
        token_tool: false,
        unreadable: None,
    };
    let mut g = Grant {
        agent_id: "agt_1".into(),
        connection_id: "con_1".into(),
        scopes: Scopes::parse("a b"),
        ip_allowlist: vec![],
        policy: policy.clone(),
        created_at: 1,
    };
    s.upsert_grant(&g, &audit("grant.upsert")).await.unwrap();
    assert_eq!(
        s.grant_for("agt_1", "con_1").await.unwrap().unwrap().policy,
        policy
    );
    assert_eq!(s.list_grants().await.unwrap()[0].policy, policy);
    // Replacing the grant replaces the policy whole.
    g.policy = GrantPolicy::default();
    s.upsert_grant(&g, &audit("grant.upsert")).await.unwrap();
    let stored = s.grant_for("agt_1", "con_1").await.unwrap().unwrap();
    assert_eq!(stored.policy, GrantPolicy::default());
    let raw: String = sqlx::query_scalar("SELECT policy FROM grants")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(raw, "{}");
    // Edited by hand into something that does not read back: the grant releases nothing.
    sqlx::query("UPDATE grants SET policy = '{\"hours\":[\"whenever\"]}'")
        .execute(s.pool())
        .await
        .unwrap();
    let broken = s.grant_for("agt_1", "con_1").await.unwrap().unwrap();
    assert!(broken.policy.unreadable.unwrap().contains("whenever"));
}

#[tokio::test]
async fn a_release_decided_at_a_stale_revision_writes_nothing() {
    let (_d, s) = store().await;
    seed(&s).await;
    let j = |k: &str| JtiUse {
        key: k.into(),
        expires_at: 10,
    };
    let stale = s.config_revision().await.unwrap();
    // Adding an agent moves the revision forward.
    let agent = Agent {
        id: "agt_1".into(),
        name: "bot".into(),
        created_at: 1,
        ..Default::default()
    };
    s.insert_agent(&agent, &[], &audit("client.create"))
        .await
        .unwrap();
    let current = s.config_revision().await.unwrap();
    assert!(current > stale, "{current} after {stale}");
    let entries = s.list_audit(100).await.unwrap().len();

    let refused = s
        .commit_release(
            Some(stale),
            &[j("a:1")],
            Some("cac_1"),
            &audit("token.release"),
        )
        .await;
    assert!(
        matches!(refused, Err(ReleaseError::Stale(now)) if now == current),
        "{refused:?}"
    );
    let jtis: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_jtis")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(jtis, 0);
    assert_eq!(s.list_audit(100).await.unwrap().len(), entries);

    // At the current revision the same release goes through, chained after the others.
    s.commit_release(
        Some(current),
        &[j("a:1")],
        Some("cac_1"),
        &audit("token.release"),
    )
    .await
    .unwrap();
    let log = s.list_audit(100).await.unwrap();
    assert_eq!(log.len(), entries + 1);
    assert_eq!(log[0].record.action, "token.release");
    let mut seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=log.len() as i64).collect::<Vec<_>>());
    let a = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(a.last_used_at, Some(1));
    assert_eq!(s.config_revision().await.unwrap(), current);
}

#[tokio::test]
async fn expired_jtis_are_purged_in_several_transactions_and_live_ones_stay() {
    let (_d, s) = store().await;
    let mut tx = s.pool().begin().await.unwrap();
    for i in 0..1_234 {
        sqlx::query("INSERT INTO used_jtis (key, expires_at) VALUES (?, ?)")
            .bind(format!("old:{i}"))
            .bind(10 + i % 7)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    for i in 0..5 {
        sqlx::query("INSERT INTO used_jtis (key, expires_at) VALUES (?, 100)")
            .bind(format!("live:{i}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(s.purge_expired_jtis(50).await.unwrap(), 1_234);
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM used_jtis ORDER BY key")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!(
        left,
        (0..5).map(|i| format!("live:{i}")).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_role_is_stored_changed_with_its_audit_entry_and_only_known_roles_exist() {
    let (_d, s) = store().await;
    seed(&s).await;
    assert_eq!(
        s.user_by_id("usr_1").await.unwrap().unwrap().role,
        Role::User
    );
    let op = User {
        id: "usr_2".into(),
        username: "olga".into(),
        password_hash: None,
        totp_seed: None,
        totp_enabled: false,
        role: Role::Operator,
        created_at: 2,
    };
    s.insert_user(&op, &audit("user.create")).await.unwrap();
    assert_eq!(
        s.user_by_username("olga").await.unwrap().unwrap().role,
        Role::Operator
    );

    let before = s.list_audit(100).await.unwrap().len();
    let change = AuditRecord {
        subject_user: Some("usr_1".into()),
        reason: Some("role operator (was user)".into()),
        ..audit("user.role")
    };
    assert!(
        s.set_user_role("usr_1", Role::Operator, &change)
            .await
            .unwrap()
    );
    assert_eq!(
        s.user_by_id("usr_1").await.unwrap().unwrap().role,
        Role::Operator
    );
    let entries = s.list_audit(100).await.unwrap();
    assert_eq!(entries.len(), before + 1);
    let e = &entries[0].record;
    assert_eq!(
        (
            e.action.as_str(),
            e.subject_user.as_deref(),
            e.reason.as_deref()
        ),
        ("user.role", Some("usr_1"), Some("role operator (was user)"))
    );
    assert!(
        s.set_user_role("usr_2", Role::User, &audit("user.role"))
            .await
            .unwrap()
    );
    let roles: Vec<(String, Role)> = s
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.username, u.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("alice".into(), Role::Operator),
            ("olga".into(), Role::User)
        ]
    );

    // No such user: false, and no entry.
    assert!(
        !s.set_user_role("nobody", Role::Operator, &audit("user.role"))
            .await
            .unwrap()
    );
    assert_eq!(s.list_audit(100).await.unwrap().len(), before + 2);

    // The schema admits only the two roles, whoever writes the row.
    let bad = sqlx::query("UPDATE users SET role = 'admin' WHERE id = 'usr_1'")
        .execute(s.pool())
        .await;
    assert!(bad.is_err(), "{bad:?}");
    assert_eq!(
        s.user_by_id("usr_1").await.unwrap().unwrap().role,
        Role::Operator
    );
}

/// An entry for the daily-count tests.
fn counted(
    at: i64,
    actor: (&str, &str),
    user: Option<&str>,
    action: &str,
    ok: bool,
) -> AuditRecord {
    AuditRecord {
        at,
        actor_type: actor.0.into(),
        actor_id: actor.1.into(),
        auth_method: "test".into(),
        subject_user: user.map(Into::into),
        action: action.into(),
        decision: if ok { "allow" } else { "deny" }.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn daily_counts_group_an_agents_allowed_actions_by_utc_day() {
    let (_d, s) = store().await;
    const DAY: i64 = 86_400;
    let d0 = 20_000 * DAY; // 00:00 UTC
    let d1 = d0 + DAY;
    let (a1, a2) = (("agent", "agt_1"), ("agent", "agt_2"));
    let release = "token.release";
    // Written out of time order: the grouping, not the writing, orders the answer.
    for e in [
        counted(d1, a1, Some("usr_a"), release, true),
        counted(d0 + 10, a1, Some("usr_a"), release, true),
        counted(d0 + DAY - 1, a1, Some("usr_a"), release, true),
        counted(d0 + 100, a2, Some("usr_a"), release, true),
        counted(d0 - 1, a1, Some("usr_a"), release, true),
        // Another user's, and one without a user: only in the count over everyone.
        counted(d1 + 5, a2, Some("usr_b"), release, true),
        counted(d1 + 50, a2, None, release, true),
        // Never counted: refused, another action, not an agent acting.
        counted(d0 + 200, a1, Some("usr_a"), release, false),
        counted(d1 + 200, a2, Some("usr_a"), release, false),
        counted(d0 + 300, a1, Some("usr_a"), "token.issue", true),
        counted(
            d0 + 400,
            ("operator", "agt_1"),
            Some("usr_a"),
            release,
            true,
        ),
        counted(d0 + 500, ("user", "usr_a"), Some("usr_a"), release, true),
    ] {
        s.append_audit(&e).await.unwrap();
    }
    let counts = |user: Option<&'static str>, since: i64| {
        let s = s.clone();
        async move {
            s.audit_daily_counts(release, user, since)
                .await
                .unwrap()
                .into_iter()
                .map(|c| (c.day, c.agent_id, c.count))
                .collect::<Vec<_>>()
        }
    };
    let row = |day: i64, agent: &str, count: i64| (day, agent.to_owned(), count);

    assert_eq!(
        counts(Some("usr_a"), d0).await,
        [
            row(d0, "agt_1", 2),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1)
        ]
    );
    assert_eq!(
        counts(None, d0).await,
        [
            row(d0, "agt_1", 2),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1),
            row(d1, "agt_2", 2)
        ]
    );
    // `since` is a time, not a day: the entry before it, on the same day, is left out.
    assert_eq!(
        counts(Some("usr_a"), d0 + 11).await,
        [
            row(d0, "agt_1", 1),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1)
        ]
    );
    assert_eq!(
        counts(Some("usr_a"), d0 - DAY).await,
        [
            row(d0 - DAY, "agt_1", 1),
            row(d0, "agt_1", 2),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1)
        ]
    );
    assert_eq!(counts(Some("usr_b"), d1 + 6).await, []);
    assert_eq!(counts(Some("nobody"), 0).await, []);
    assert_eq!(
        s.audit_daily_counts("token.issue", None, 0).await.unwrap(),
        [DailyCount {
            day: d0,
            agent_id: "agt_1".into(),
            count: 1
        }]
    );
}

#[tokio::test]
async fn daily_counts_walk_an_index_range() {
    let (_d, s) = store().await;
    for user in [Some("usr_a"), None] {
        let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {AUDIT_DAILY_COUNTS}"
        )))
        .bind("token.release")
        .bind(user)
        .bind(0_i64)
        .fetch_all(s.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("USING COVERING INDEX audit_events_agent_daily (action=? AND at>?)"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN audit_events"), "{plan}");
    }
}

#[tokio::test]
async fn users_from_before_roles_become_users() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let s = SqliteStore::open(&path).await.unwrap();
    // Back to version 7, with a user written then.
    sqlx::raw_sql(
        "DROP INDEX audit_events_agent_daily; ALTER TABLE users DROP COLUMN role; \
         DELETE FROM schema_migrations WHERE version = 8; \
         INSERT INTO users (id, username, created_at) VALUES ('usr_old', 'old', 1);",
    )
    .execute(s.pool())
    .await
    .unwrap();
    s.pool().close().await;
    let s = SqliteStore::open(&path).await.unwrap();
    assert_eq!(
        s.user_by_id("usr_old").await.unwrap().unwrap().role,
        Role::User
    );
}
