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
    };
    s.upsert_account(&a, &audit("a")).await.unwrap();
    a
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
    s.commit_release(&[j("a:1"), j("s:1")], "cac_1", &audit("token.release"))
        .await
        .unwrap();
    // Replaying either jti fails and writes nothing (the fresh one is not consumed either).
    assert!(matches!(
        s.commit_release(&[j("a:2"), j("s:1")], "cac_1", &audit("token.release"))
            .await,
        Err(ReleaseError::Replay(1))
    ));
    s.commit_release(&[j("a:2"), j("s:2")], "cac_1", &audit("token.release"))
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
        s.commit_release(&[j("s:3")], "cac_1", &audit("token.release"))
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
    };
    s.insert_session("h", &session, 50).await.unwrap();
    assert_eq!(s.session("h", 10).await.unwrap(), Some(session));
    assert_eq!(s.session("h", 60).await.unwrap(), None, "expired");
}

#[tokio::test]
async fn refresh_candidates_are_used_expiring_tokens() {
    let (_d, s) = store().await;
    let a = seed(&s).await; // expires at 100, never used
    assert!(
        s.refresh_candidates(200, 0, 10).await.unwrap().is_empty(),
        "never used: not a candidate"
    );
    let j = JtiUse {
        key: "k".into(),
        expires_at: 10,
    };
    s.commit_release(
        &[j],
        "cac_1",
        &AuditRecord {
            at: 50,
            ..audit("token.release")
        },
    )
    .await
    .unwrap();
    let due = s.refresh_candidates(200, 0, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].0.id.as_str(), due[0].1.clone()), ("cac_1", None));
    assert!(
        s.refresh_candidates(90, 0, 10).await.unwrap().is_empty(),
        "not expiring yet"
    );
    assert!(
        s.refresh_candidates(200, 60, 10).await.unwrap().is_empty(),
        "idle since before 60"
    );
    // With a narrowed token in use, that one is the candidate, not the account's own.
    let t = ScopedToken {
        id: "cac_1 a".into(),
        account_id: "cac_1".into(),
        scopes: Scopes::parse("a"),
        access_token: vec![7],
        expires_at: Some(150),
    };
    assert!(s.store_scoped_token(&a, 0, &t).await.unwrap());
    let due = s.refresh_candidates(200, 0, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].1, Some(Scopes::parse("a")));
}
