//! The store conformance suite: the behaviour the domain relies on, run against every backend.
//!
//! Each test is an `async fn(&Db)` written once against `&dyn Store`; [`conformance!`] makes a
//! `sqlite::<name>` and a `postgres::<name>` test of it. The SQLite variant opens a fresh file
//! in a temporary directory; the PostgreSQL variant creates a fresh database
//! (`lk_test_<random>`) on the server named by `LATCHKEY_TEST_PG_URL` (default
//! [`DEFAULT_PG_URL`]) and drops it afterwards, also when the test fails. A server that cannot
//! be reached fails the PostgreSQL tests with a message saying so: they are never skipped.
//!
//! The few statements a test runs past the trait (to inspect or sabotage the database) are
//! written in SQL both dialects read the same way. What only one backend has (SQLite's file
//! mode and query plans, PostgreSQL's behaviour across nodes) is tested in that backend's
//! own `tests.rs`.

use std::str::FromStr;
use std::sync::Arc;

use latchkey_core::audit::{AuditKey, ChainVerifier};
use latchkey_core::model::*;
use latchkey_core::scope::Scopes;
use latchkey_core::store::*;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection as _};

use crate::{PgStore, SqliteStore};

/// Where the PostgreSQL tests create their databases unless `LATCHKEY_TEST_PG_URL` says.
pub(crate) const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh PostgreSQL database for one test, dropped (best effort) when this is dropped.
pub(crate) struct PgTestDb {
    admin: PgConnectOptions,
    name: String,
}

impl PgTestDb {
    pub(crate) async fn create() -> Self {
        let url = std::env::var("LATCHKEY_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.into());
        let admin = PgConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("LATCHKEY_TEST_PG_URL is not a PostgreSQL URL: {e}"));
        let mut conn = admin.connect().await.unwrap_or_else(|e| {
            panic!(
                "the PostgreSQL store tests need a PostgreSQL server at {}:{} (user {}), and \
                 cannot reach it: {e}\nStart it (`pg_ctlcluster --skip-systemctl-redirect \
                 $(ls /etc/postgresql) main start`) or point LATCHKEY_TEST_PG_URL at one \
                 (a URL of a database the user may CREATE DATABASE from).",
                admin.get_host(),
                admin.get_port(),
                admin.get_username()
            )
        });
        let name = unique_name();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'"
        )))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create the test database {name}: {e}"));
        let _ = conn.close().await;
        Self { admin, name }
    }

    pub(crate) fn options(&self) -> PgConnectOptions {
        self.admin.clone().database(&self.name)
    }

    /// A store (a "node") on this database: its own pool.
    pub(crate) async fn store(&self) -> PgStore {
        PgStore::connect_with(self.options(), crate::postgres::DEFAULT_POOL_SIZE)
            .await
            .unwrap()
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        // Async work in `drop`, also while a failed test unwinds: on a thread of its own with
        // its own runtime. `FORCE` ends the test's connections still open.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = admin.connect().await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()?;
                conn.close().await.ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("note: the test database {} was left behind", self.name);
        }
    }
}

/// `lk_test_` and 64 random bits (a fresh `RandomState` key, the process id and a counter).
fn unique_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!("lk_test_{:016x}", h.finish())
}

/// A backend under test: its store, and a way past the trait into its database.
pub(crate) enum Db {
    Sqlite {
        store: SqliteStore,
        path: std::path::PathBuf,
        _dir: tempfile::TempDir,
    },
    Postgres {
        store: PgStore,
        // Declared after the store: dropped after it.
        db: Box<PgTestDb>,
    },
}

impl Db {
    pub(crate) async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(&path).await.unwrap();
        Self::Sqlite {
            store,
            path,
            _dir: dir,
        }
    }

    pub(crate) async fn postgres() -> Self {
        let db = Box::new(PgTestDb::create().await);
        let store = db.store().await;
        Self::Postgres { store, db }
    }

    pub(crate) fn store(&self) -> &dyn Store {
        match self {
            Self::Sqlite { store, .. } => store,
            Self::Postgres { store, .. } => store,
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres { .. })
    }

    /// Open the same database again, as a restart (or another node) would.
    async fn reopen(&self) -> Result<Box<dyn Store>, StoreError> {
        Ok(match self {
            Self::Sqlite { path, .. } => Box::new(SqliteStore::open(path).await?),
            Self::Postgres { db, .. } => Box::new(
                PgStore::connect_with(db.options(), crate::postgres::DEFAULT_POOL_SIZE).await?,
            ),
        })
    }

    /// Run one statement past the store; the rows it changed.
    async fn exec(&self, sql: &str) -> Result<u64, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        Ok(match self {
            Self::Sqlite { store, .. } => sqlx::query(sql)
                .execute(store.pool())
                .await?
                .rows_affected(),
            Self::Postgres { store, .. } => sqlx::query(sql)
                .execute(store.pool())
                .await?
                .rows_affected(),
        })
    }

    async fn int(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Self::Sqlite { store, .. } => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
            Self::Postgres { store, .. } => sqlx::query_scalar(sql).fetch_one(store.pool()).await,
        }
        .unwrap()
    }

    async fn texts(&self, sql: &str) -> Vec<String> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Self::Sqlite { store, .. } => sqlx::query_scalar(sql).fetch_all(store.pool()).await,
            Self::Postgres { store, .. } => sqlx::query_scalar(sql).fetch_all(store.pool()).await,
        }
        .unwrap()
    }
}

/// A `sqlite::<name>` and a `postgres::<name>` test of each `async fn <name>(&Db)`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::Db::postgres().await).await;
                }
            )*
        }
    };
}

conformance!(
    a_newer_or_gapped_schema_is_refused,
    reopen_is_idempotent,
    duplicate_username_is_a_conflict_and_writes_nothing,
    release_consumes_jtis_atomically,
    quota_slots_admit_their_limit_and_a_full_one_writes_nothing,
    a_periodic_job_is_claimed_once_a_period,
    token_updates_are_fenced_by_version,
    connect_flows_are_single_use_and_expire,
    narrowed_tokens_are_fenced_and_go_with_revocation,
    totp_steps_are_used_once_and_sessions_keep_their_authentication,
    refresh_work_is_claimed_once_and_covers_every_reason,
    webhook_outbox_is_written_with_its_event_and_claimed_once,
    operator_tokens_authenticate_until_revoked,
    audit_reads_filter_and_page_newest_first,
    a_grant_keeps_its_policy_and_an_unreadable_one_releases_nothing,
    a_release_decided_at_a_stale_revision_writes_nothing,
    expired_jtis_are_purged_in_several_transactions_and_live_ones_stay,
    a_role_is_stored_changed_with_its_audit_entry_and_only_known_roles_exist,
    daily_counts_group_an_agents_allowed_actions_by_utc_day,
    data_keys_and_server_secrets_are_kept_and_resealed_only_where_unchanged,
    the_registry_round_trips_and_moves_the_configuration_revision,
    accounts_list_in_order_and_a_reconnect_bumps_the_version,
    deleting_a_user_removes_what_is_theirs_and_keeps_the_audit_trail,
    codes_families_and_refresh_tokens_are_single_use,
    account_connects_are_single_use,
    sessions_end_and_record_step_up,
    the_audit_chain_links_every_entry_and_prunes_behind_a_checkpoint,
    approvals_collapse_respect_caps_and_are_decided_and_redeemed_once,
);

pub(crate) fn audit(action: &str) -> AuditRecord {
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

pub(crate) fn user(id: &str, username: &str) -> User {
    User {
        id: id.into(),
        username: username.into(),
        password_hash: None,
        totp_seed: None,
        totp_enabled: false,
        role: Role::User,
        created_at: 1,
    }
}

pub(crate) fn connection(id: &str, name: &str) -> Connection {
    Connection {
        id: id.into(),
        name: name.into(),
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
    }
}

pub(crate) fn account(id: &str, user_id: &str, created_at: i64) -> ConnectedAccount {
    ConnectedAccount {
        id: id.into(),
        user_id: user_id.into(),
        connection_id: "con_1".into(),
        upstream_account_id: Some("1001".into()),
        scopes: Scopes::parse("a b"),
        access_token: Some(vec![1]),
        access_expires_at: Some(100),
        refresh_token: Some(vec![2]),
        status: AccountStatus::Active,
        status_reason: None,
        created_at,
        updated_at: created_at,
        last_used_at: None,
        last_refreshed_at: None,
        token_version: 0,
        refresh_started_at: None,
    }
}

/// A user `usr_1`, a connection `con_1` and the user's account `cac_1` on it.
pub(crate) async fn seed(s: &dyn Store) -> ConnectedAccount {
    s.insert_user(&user("usr_1", "alice"), &audit("u"))
        .await
        .unwrap();
    s.insert_connection(&connection("con_1", "demo-git"), &audit("c"))
        .await
        .unwrap();
    let a = account("cac_1", "usr_1", 1);
    s.upsert_account(&a, &audit("a")).await.unwrap();
    a
}

pub(crate) fn jti(key: &str) -> JtiUse {
    JtiUse {
        key: key.into(),
        expires_at: 10,
    }
}

pub(crate) fn audit_key(byte: u8) -> Arc<AuditKey> {
    Arc::new(AuditKey(zeroize::Zeroizing::new(vec![byte; 32])))
}

/// Walk the whole stored chain with the core's verifier; the number of entries checked.
pub(crate) async fn verify_chain(s: &dyn Store, key: &AuditKey) -> u64 {
    let mut v = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = s.audit_range(after, 100).await.unwrap();
        for e in &page {
            v.check(key, e).unwrap();
        }
        match page.last() {
            Some(e) => after = e.seq,
            None => return v.count,
        }
    }
}

async fn a_newer_or_gapped_schema_is_refused(db: &Db) {
    db.exec("INSERT INTO schema_migrations (version, applied_at) VALUES (1000, 0)")
        .await
        .unwrap();
    let err = db.reopen().await.err().unwrap().to_string();
    assert!(err.contains("newer than this Latchkey"), "{err}");
    db.exec("DELETE FROM schema_migrations WHERE version = 1000")
        .await
        .unwrap();
    db.reopen().await.unwrap();

    // A history with a hole in it: SQLite loses a middle version; PostgreSQL (one version so
    // far) gains one below its first.
    let gap = if db.is_postgres() {
        "INSERT INTO schema_migrations (version, applied_at) VALUES (0, 0)"
    } else {
        "DELETE FROM schema_migrations WHERE version = 2"
    };
    db.exec(gap).await.unwrap();
    let err = db.reopen().await.err().unwrap().to_string();
    assert!(err.contains("gaps"), "{err}");
}

async fn reopen_is_idempotent(db: &Db) {
    let s = db.store();
    s.insert_user(&user("u", "x"), &audit("u")).await.unwrap();
    let again = db.reopen().await.unwrap();
    assert!(again.user_by_id("u").await.unwrap().is_some());
    assert_eq!(again.list_audit(10).await.unwrap().len(), 1);
}

async fn duplicate_username_is_a_conflict_and_writes_nothing(db: &Db) {
    let s = db.store();
    let u = user("u1", "alice");
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

async fn release_consumes_jtis_atomically(db: &Db) {
    let s = db.store();
    seed(s).await;
    s.commit_release(
        None,
        &[jti("a:1"), jti("s:1")],
        &[],
        Some("cac_1"),
        &audit("token.release"),
    )
    .await
    .unwrap();
    // Replaying either jti fails and writes nothing (the fresh one is not consumed either).
    assert!(matches!(
        s.commit_release(
            None,
            &[jti("a:2"), jti("s:1")],
            &[],
            Some("cac_1"),
            &audit("token.release")
        )
        .await,
        Err(ReleaseError::Replay(1))
    ));
    // The same jti twice in one release: the second is the replay.
    assert!(matches!(
        s.commit_release(
            None,
            &[jti("a:9"), jti("a:9")],
            &[],
            Some("cac_1"),
            &audit("token.release")
        )
        .await,
        Err(ReleaseError::Replay(1))
    ));
    s.commit_release(
        None,
        &[jti("a:2"), jti("s:2")],
        &[],
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
    // A release without an account (an agent's own token) needs none.
    s.commit_release(None, &[jti("a:3")], &[], None, &audit("token.release"))
        .await
        .unwrap();
    // A revoked account releases nothing, and neither does one that does not exist.
    assert!(
        s.revoke_account("cac_1", &audit("account.revoke"))
            .await
            .unwrap()
    );
    assert!(matches!(
        s.commit_release(
            None,
            &[jti("s:3")],
            &[],
            Some("cac_1"),
            &audit("token.release")
        )
        .await,
        Err(ReleaseError::AccountInactive)
    ));
    assert!(matches!(
        s.commit_release(
            None,
            &[jti("s:4")],
            &[],
            Some("cac_x"),
            &audit("token.release")
        )
        .await,
        Err(ReleaseError::AccountInactive)
    ));
    let a = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert!(a.access_token.is_none() && a.refresh_token.is_none());
    assert_eq!(s.purge_expired_jtis(11).await.unwrap(), 5);
}

pub(crate) fn quota(key: &str, limit: u32, window_end: i64) -> QuotaUse {
    QuotaUse {
        key: key.into(),
        limit,
        window_end,
    }
}

async fn quota_slots_admit_their_limit_and_a_full_one_writes_nothing(db: &Db) {
    let s = db.store();
    seed(s).await;
    let minute = quota("agent:agt_1:con_1:minute:1", 2, 120);
    let day = quota("user:usr_1:con_1:day:0", 5, 86_400);
    let release = |key: &str, quotas: Vec<QuotaUse>| {
        let key = key.to_owned();
        async move {
            s.commit_release(
                None,
                &[jti(&key)],
                &quotas,
                Some("cac_1"),
                &audit("token.release"),
            )
            .await
        }
    };
    release("q:1", vec![minute.clone(), day.clone()])
        .await
        .unwrap();
    release("q:2", vec![minute.clone()]).await.unwrap();
    let entries = s.list_audit(100).await.unwrap().len();
    // The minute is full: refused, naming it, and nothing of the release is written — not
    // its jti, not its entry, not its use of the day's slot.
    let refused = release("q:3", vec![day.clone(), minute.clone()]).await;
    assert!(
        matches!(refused, Err(ReleaseError::QuotaReached(1))),
        "{refused:?}"
    );
    assert_eq!(
        db.int("SELECT COUNT(*) FROM used_jtis WHERE key = 'q:3'")
            .await,
        0
    );
    assert_eq!(s.list_audit(100).await.unwrap().len(), entries);
    assert_eq!(
        db.int("SELECT n FROM quota_counts WHERE key = 'user:usr_1:con_1:day:0'")
            .await,
        1
    );
    // A limit of 0 admits nothing.
    assert!(matches!(
        release("q:4", vec![quota("agent:agt_1:con_1:day:0", 0, 86_400)]).await,
        Err(ReleaseError::QuotaReached(0))
    ));
    // The next window counts afresh; the day goes on counting.
    let next = quota("agent:agt_1:con_1:minute:2", 2, 180);
    release("q:5", vec![next.clone(), day.clone()])
        .await
        .unwrap();
    assert_eq!(
        db.int("SELECT n FROM quota_counts WHERE key = 'user:usr_1:con_1:day:0'")
            .await,
        2
    );
    // A reopened store (a restart, another node) sees the same counts.
    let again = db.reopen().await.unwrap();
    assert!(matches!(
        again
            .commit_release(
                None,
                &[jti("q:6")],
                std::slice::from_ref(&minute),
                Some("cac_1"),
                &audit("token.release"),
            )
            .await,
        Err(ReleaseError::QuotaReached(0))
    ));
    // Windows that have ended are purged; the others stay.
    s.purge_expired_jtis(120).await.unwrap();
    assert_eq!(
        db.texts("SELECT key FROM quota_counts ORDER BY key").await,
        ["agent:agt_1:con_1:minute:2", "user:usr_1:con_1:day:0"]
    );
}

async fn a_periodic_job_is_claimed_once_a_period(db: &Db) {
    let s = db.store();
    assert!(s.claim_job("audit.checkpoint", 1_000, 600).await.unwrap());
    assert!(!s.claim_job("audit.checkpoint", 1_000, 600).await.unwrap());
    assert!(!s.claim_job("audit.checkpoint", 1_599, 600).await.unwrap());
    // Another job is claimed on its own.
    assert!(s.claim_job("audit.prune", 1_000, 60).await.unwrap());
    // Once the period has passed, again (once), by whichever store asks first.
    let other = db.reopen().await.unwrap();
    assert!(
        other
            .claim_job("audit.checkpoint", 1_600, 600)
            .await
            .unwrap()
    );
    assert!(!s.claim_job("audit.checkpoint", 1_600, 600).await.unwrap());
}

async fn token_updates_are_fenced_by_version(db: &Db) {
    let s = db.store();
    let a = seed(s).await;
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
    // The current version wins, records why, and an inactive account takes no tokens.
    let reason = AuditRecord {
        reason: Some("invalid_grant".into()),
        ..audit("account.needs_reauth")
    };
    assert!(
        s.set_account_status("cac_1", AccountStatus::NeedsReauth, 1, &reason)
            .await
            .unwrap()
    );
    let stored = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.status,
            stored.status_reason.as_deref(),
            stored.token_version
        ),
        (AccountStatus::NeedsReauth, Some("invalid_grant"), 2)
    );
    assert!(!s.update_account_tokens(&newer, 2).await.unwrap());
}

async fn connect_flows_are_single_use_and_expire(db: &Db) {
    let s = db.store();
    seed(s).await;
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
            taken.then_to.as_str(),
            taken.code_verifier
        ),
        ("a b", "return:/authorize?x=1", vec![1])
    );
    assert!(s.take_connect_flow("h", 10).await.unwrap().is_none());
    s.insert_connect_flow(&f).await.unwrap();
    assert!(
        s.take_connect_flow("h", 60).await.unwrap().is_none(),
        "expired flows are not returned"
    );
}

async fn narrowed_tokens_are_fenced_and_go_with_revocation(db: &Db) {
    let s = db.store();
    let a = seed(s).await;
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
    // The same scope set again replaces the narrowed token.
    let newer = ScopedToken {
        access_token: vec![8],
        expires_at: Some(90),
        ..t.clone()
    };
    assert!(s.store_scoped_token(&rotated, 1, &newer).await.unwrap());
    let kept = s.scoped_token("cac_1 a").await.unwrap().unwrap();
    assert_eq!((kept.access_token, kept.expires_at), (vec![8], Some(90)));
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
    let revoked = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(
        (revoked.status, revoked.status_reason.as_deref()),
        (AccountStatus::Revoked, Some("revoked by operator t"))
    );
    assert!(
        !s.revoke_account("cac_x", &audit("account.revoke"))
            .await
            .unwrap()
    );
}

async fn totp_steps_are_used_once_and_sessions_keep_their_authentication(db: &Db) {
    let s = db.store();
    seed(s).await;
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
    // Re-enrolling forgets the last step.
    s.set_totp("usr_1", None, false, &audit("user.totp"))
        .await
        .unwrap();
    let u = s.user_by_id("usr_1").await.unwrap().unwrap();
    assert_eq!((u.totp_seed, u.totp_enabled), (None, false));
    assert!(s.consume_totp_step("usr_1", 50).await.unwrap());
    assert!(matches!(
        s.set_totp("nobody", None, false, &audit("user.totp")).await,
        Err(StoreError::NotFound)
    ));
    assert!(!s.consume_totp_step("nobody", 1).await.unwrap());
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

async fn claim(s: &dyn Store, q: RefreshQuery) -> Vec<(String, Option<Scopes>, RefreshWhy)> {
    s.claim_refresh_work(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.account.id, w.scope, w.why))
        .collect()
}

async fn refresh_work_is_claimed_once_and_covers_every_reason(db: &Db) {
    let s = db.store();
    let a = seed(s).await; // expires at 100, never used, keep-alive every 1000 s
    assert!(
        claim(s, query(60, 200, 0)).await.is_empty(),
        "never used: not due"
    );
    s.commit_release(
        None,
        &[jti("k")],
        &[],
        Some("cac_1"),
        &AuditRecord {
            at: 50,
            ..audit("token.release")
        },
    )
    .await
    .unwrap();
    assert!(
        claim(s, query(60, 90, 0)).await.is_empty(),
        "not expiring yet"
    );
    assert!(
        claim(s, query(60, 200, 55)).await.is_empty(),
        "idle since before 55"
    );
    let expiring = ("cac_1".to_owned(), None, RefreshWhy::Expiring);
    assert_eq!(claim(s, query(60, 200, 0)).await, vec![expiring.clone()]);
    assert!(
        claim(s, query(65, 200, 0)).await.is_empty(),
        "claimed until 70 by the first pass"
    );
    assert_eq!(claim(s, query(70, 200, 0)).await, vec![expiring]);

    // With a narrowed token in use, that one is due, not the account's own.
    let t = ScopedToken {
        id: "cac_1 a".into(),
        account_id: "cac_1".into(),
        scopes: Scopes::parse("a"),
        access_token: vec![7],
        expires_at: Some(150),
    };
    assert!(s.store_scoped_token(&a, 0, &t).await.unwrap());
    let due = claim(s, query(80, 200, 0)).await;
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
        claim(s, interrupted.clone()).await,
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
            s,
            RefreshQuery {
                now: 200,
                ..interrupted
            }
        )
        .await
        .is_empty()
    );

    // Idle longer than the connection's keep-alive interval (1000 s since the last refresh).
    assert!(claim(s, query(1095, 0, 0)).await.is_empty());
    assert_eq!(
        claim(s, query(1096, 0, 0)).await,
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
    assert!(claim(s, query(5000, 9999, 0)).await.is_empty());
}

async fn webhook_outbox_is_written_with_its_event_and_claimed_once(db: &Db) {
    let s = db.store();
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

    // Oldest first, at most `limit`; and with the audit webhook on, every entry is one too.
    s.enable_audit_webhook();
    let named = |at, event: &str| AuditRecord {
        at,
        notify: Some(Notification {
            event: event.into(),
            body: "{}".into(),
        }),
        ..audit("x")
    };
    s.append_audit(&named(300, "late")).await.unwrap();
    s.append_audit(&named(200, "early")).await.unwrap();
    let first = s.claim_webhooks(1000, 2000, 3).await.unwrap();
    let rest = s.claim_webhooks(1000, 2000, 10).await.unwrap();
    assert_eq!((first.len(), rest.len()), (3, 1));
    let events = |items: &[OutboxItem]| {
        let mut e: Vec<String> = items.iter().map(|i| i.event.clone()).collect();
        e.sort();
        e
    };
    assert_eq!(events(&first[..2]), ["audit.entry", "early"]);
    assert_eq!(
        events(&[first[2].clone(), rest[0].clone()]),
        ["audit.entry", "late"]
    );
    for item in first.iter().chain(&rest) {
        if item.event == "audit.entry" {
            let body: serde_json::Value = serde_json::from_str(&item.body).unwrap();
            assert!(body.is_object(), "{body}");
        }
    }
}

async fn operator_tokens_authenticate_until_revoked(db: &Db) {
    let s = db.store();
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
    s.ping().await.unwrap();
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
async fn walk(s: &dyn Store, q: &AuditQuery, limit: i64) -> Vec<i64> {
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

async fn audit_reads_filter_and_page_newest_first(db: &Db) {
    let s = db.store();
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
            assert_eq!(walk(s, q, limit).await, want, "{q:?} by {limit}");
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

async fn a_grant_keeps_its_policy_and_an_unreadable_one_releases_nothing(db: &Db) {
    use latchkey_core::policy::{GrantPolicy, Quotas, Risk, TimeWindow};
    let s = db.store();
    seed(s).await;
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
    assert_eq!(db.texts("SELECT policy FROM grants").await, ["{}"]);
    // Edited by hand into something that does not read back: the grant releases nothing.
    db.exec("UPDATE grants SET policy = '{\"hours\":[\"whenever\"]}'")
        .await
        .unwrap();
    let broken = s.grant_for("agt_1", "con_1").await.unwrap().unwrap();
    assert!(broken.policy.unreadable.unwrap().contains("whenever"));
}

async fn a_release_decided_at_a_stale_revision_writes_nothing(db: &Db) {
    let s = db.store();
    seed(s).await;
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
            &[jti("a:1")],
            &[],
            Some("cac_1"),
            &audit("token.release"),
        )
        .await;
    assert!(
        matches!(refused, Err(ReleaseError::Stale(now)) if now == current),
        "{refused:?}"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM used_jtis").await, 0);
    assert_eq!(s.list_audit(100).await.unwrap().len(), entries);

    // At the current revision the same release goes through, chained after the others.
    s.commit_release(
        Some(current),
        &[jti("a:1")],
        &[],
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
    // Also without an account.
    s.commit_release(
        Some(current),
        &[jti("a:2")],
        &[],
        None,
        &audit("token.release"),
    )
    .await
    .unwrap();
    assert!(matches!(
        s.commit_release(
            Some(stale),
            &[jti("a:3")],
            &[],
            None,
            &audit("token.release")
        )
        .await,
        Err(ReleaseError::Stale(_))
    ));
}

async fn expired_jtis_are_purged_in_several_transactions_and_live_ones_stay(db: &Db) {
    let s = db.store();
    db.exec(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 1233) \
         INSERT INTO used_jtis (key, expires_at) SELECT 'old:' || i, 10 + i % 7 FROM n",
    )
    .await
    .unwrap();
    db.exec(
        "INSERT INTO used_jtis (key, expires_at) VALUES \
         ('live:0', 100), ('live:1', 100), ('live:2', 100), ('live:3', 100), ('live:4', 100)",
    )
    .await
    .unwrap();
    assert_eq!(s.purge_expired_jtis(50).await.unwrap(), 1_234);
    assert_eq!(
        db.texts("SELECT key FROM used_jtis ORDER BY key").await,
        (0..5).map(|i| format!("live:{i}")).collect::<Vec<_>>()
    );
}

async fn a_role_is_stored_changed_with_its_audit_entry_and_only_known_roles_exist(db: &Db) {
    let s = db.store();
    seed(s).await;
    assert_eq!(
        s.user_by_id("usr_1").await.unwrap().unwrap().role,
        Role::User
    );
    let op = User {
        role: Role::Operator,
        created_at: 2,
        ..user("usr_2", "olga")
    };
    s.insert_user(&op, &audit("user.create")).await.unwrap();
    assert_eq!(
        s.user_by_username("olga").await.unwrap().unwrap().role,
        Role::Operator
    );

    let before = s.list_audit(100).await.unwrap().len();
    let revision = s.config_revision().await.unwrap();
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
    assert_eq!(
        s.config_revision().await.unwrap(),
        revision,
        "a role does not change what a release is decided on"
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
    let bad = db
        .exec("UPDATE users SET role = 'admin' WHERE id = 'usr_1'")
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

async fn daily_counts_group_an_agents_allowed_actions_by_utc_day(db: &Db) {
    let s = db.store();
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
    async fn counts(s: &dyn Store, user: Option<&str>, since: i64) -> Vec<(i64, String, i64)> {
        s.audit_daily_counts("token.release", user, since)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.day, c.agent_id, c.count))
            .collect()
    }
    let row = |day: i64, agent: &str, count: i64| (day, agent.to_owned(), count);

    assert_eq!(
        counts(s, Some("usr_a"), d0).await,
        [
            row(d0, "agt_1", 2),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1)
        ]
    );
    assert_eq!(
        counts(s, None, d0).await,
        [
            row(d0, "agt_1", 2),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1),
            row(d1, "agt_2", 2)
        ]
    );
    // `since` is a time, not a day: the entry before it, on the same day, is left out.
    assert_eq!(
        counts(s, Some("usr_a"), d0 + 11).await,
        [
            row(d0, "agt_1", 1),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1)
        ]
    );
    assert_eq!(
        counts(s, Some("usr_a"), d0 - DAY).await,
        [
            row(d0 - DAY, "agt_1", 1),
            row(d0, "agt_1", 2),
            row(d0, "agt_2", 1),
            row(d1, "agt_1", 1)
        ]
    );
    assert_eq!(counts(s, Some("usr_b"), d1 + 6).await, []);
    assert_eq!(counts(s, Some("nobody"), 0).await, []);
    assert_eq!(
        s.audit_daily_counts("token.issue", None, 0).await.unwrap(),
        [DailyCount {
            day: d0,
            agent_id: "agt_1".into(),
            count: 1
        }]
    );
    // Before 1970 too, a day starts at its own 00:00.
    s.append_audit(&counted(-DAY - 1, a1, None, "old", true))
        .await
        .unwrap();
    assert_eq!(
        s.audit_daily_counts("old", None, i64::MIN).await.unwrap(),
        [DailyCount {
            day: -2 * DAY,
            agent_id: "agt_1".into(),
            count: 1
        }]
    );
}

async fn data_keys_and_server_secrets_are_kept_and_resealed_only_where_unchanged(db: &Db) {
    let s = db.store();
    let key = |version, wrapped: u8| DataKeyRow {
        version,
        kek_id: "kek_1".into(),
        wrapped: vec![wrapped; 4],
        created_at: 1,
    };
    s.insert_data_key(&key(2, 2), &audit("key.create"))
        .await
        .unwrap();
    s.insert_data_key(&key(1, 1), &audit("key.create"))
        .await
        .unwrap();
    assert!(matches!(
        s.insert_data_key(&key(1, 9), &audit("key.create")).await,
        Err(StoreError::Conflict(_))
    ));
    let versions: Vec<(u32, Vec<u8>)> = s
        .data_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.version, k.wrapped))
        .collect();
    assert_eq!(versions, [(1, vec![1; 4]), (2, vec![2; 4])]);
    let rewrapped = [
        DataKeyRow {
            kek_id: "kek_2".into(),
            ..key(1, 11)
        },
        DataKeyRow {
            kek_id: "kek_2".into(),
            ..key(2, 12)
        },
    ];
    s.rewrap_data_keys(&rewrapped, &audit("kek.rotate"))
        .await
        .unwrap();
    let keys = s.data_keys().await.unwrap();
    assert!(keys.iter().all(|k| k.kek_id == "kek_2"));
    assert_eq!(keys[1].wrapped, vec![12; 4]);
    assert_eq!(s.list_audit(10).await.unwrap().len(), 3);

    // A server secret is created once: the second start gets the first's value.
    assert_eq!(s.server_secret("pepper").await.unwrap(), None);
    assert_eq!(
        s.init_server_secret("pepper", &[1, 2]).await.unwrap(),
        vec![1, 2]
    );
    assert_eq!(
        s.init_server_secret("pepper", &[3, 4]).await.unwrap(),
        vec![1, 2]
    );
    s.put_server_secrets(
        &[("pepper", vec![5]), ("signing", vec![6, 0, 255])],
        &audit("keys.rotate"),
    )
    .await
    .unwrap();
    assert_eq!(s.server_secret("pepper").await.unwrap(), Some(vec![5]));
    assert_eq!(
        s.server_secret("signing").await.unwrap(),
        Some(vec![6, 0, 255])
    );

    // Re-sealing replaces a blob only where it is still the one read.
    seed(s).await;
    let fields = s.sealed_fields().await.unwrap();
    let mut found: Vec<(&str, &str, &str)> = fields
        .iter()
        .map(|f| (f.table, f.field, f.row.as_str()))
        .collect();
    found.sort_unstable();
    assert_eq!(
        found,
        [
            ("connected_accounts", "access_token", "cac_1"),
            ("connected_accounts", "refresh_token", "cac_1"),
            ("server_secrets", "value", "pepper"),
            ("server_secrets", "value", "signing"),
        ]
    );
    let pepper = fields.iter().find(|f| f.row == "pepper").unwrap().clone();
    let refresh = fields
        .iter()
        .find(|f| f.field == "refresh_token")
        .unwrap()
        .clone();
    // A writer changed the refresh token meanwhile: that one is left alone.
    let mut a = s.account_by_id("cac_1").await.unwrap().unwrap();
    a.refresh_token = Some(vec![42]);
    assert!(s.update_account_tokens(&a, 0).await.unwrap());
    let changed = s
        .reseal_fields(&[(pepper, vec![50]), (refresh, vec![51])])
        .await
        .unwrap();
    assert_eq!(changed, 1);
    assert_eq!(s.server_secret("pepper").await.unwrap(), Some(vec![50]));
    assert_eq!(
        s.account_by_id("cac_1")
            .await
            .unwrap()
            .unwrap()
            .refresh_token,
        Some(vec![42])
    );
}

async fn the_registry_round_trips_and_moves_the_configuration_revision(db: &Db) {
    let s = db.store();
    let r0 = s.config_revision().await.unwrap();
    s.insert_user(&user("usr_1", "alice"), &audit("user.create"))
        .await
        .unwrap();
    s.set_password("usr_1", "$argon2id$x", &audit("user.password"))
        .await
        .unwrap();
    assert_eq!(
        s.user_by_username("alice")
            .await
            .unwrap()
            .unwrap()
            .password_hash
            .as_deref(),
        Some("$argon2id$x")
    );
    assert!(matches!(
        s.set_password("nobody", "x", &audit("user.password")).await,
        Err(StoreError::NotFound)
    ));
    let r1 = s.config_revision().await.unwrap();
    assert!(r1 > r0, "a new user");

    // Connections list by name, byte order (upper case before lower), whatever the locale.
    let mut github = connection("con_2", "github");
    github.client_secret = Some(vec![9, 9]);
    github.keep_alive_secs = None;
    s.insert_connection(&github, &audit("c")).await.unwrap();
    s.insert_connection(&connection("con_1", "Zed"), &audit("c"))
        .await
        .unwrap();
    s.insert_connection(&connection("con_3", "demo-git"), &audit("c"))
        .await
        .unwrap();
    assert!(matches!(
        s.insert_connection(&connection("con_4", "github"), &audit("c"))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let names: Vec<String> = s
        .list_connections()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["Zed", "demo-git", "github"]);
    let c = s.connection_by_name("github").await.unwrap().unwrap();
    assert_eq!(
        (
            c.id.as_str(),
            c.client_secret,
            c.keep_alive_secs,
            c.scopes.to_string_spaced()
        ),
        ("con_2", Some(vec![9, 9]), None, "a b".to_owned())
    );
    assert_eq!(
        s.connection_by_id("con_3").await.unwrap().unwrap().name,
        "demo-git"
    );
    assert!(s.connection_by_id("con_x").await.unwrap().is_none());
    let r2 = s.config_revision().await.unwrap();
    assert!(r2 > r1, "new connections");

    // Agents, their keys, and the secret they are found by.
    let app = Agent {
        id: "agt_b".into(),
        name: "app".into(),
        secret_hash: Some("hash_b".into()),
        redirect_uris: vec!["https://a/cb".into(), "https://b/cb".into()],
        public_client: true,
        rotate_refresh_tokens: true,
        resource_server: Some("https://api".into()),
        created_at: 5,
        ..Default::default()
    };
    let k = |kid: &str, at| AgentKey {
        agent_id: "agt_b".into(),
        kid: kid.into(),
        alg: "ES256".into(),
        jwk: "{}".into(),
        created_at: at,
    };
    s.insert_agent(
        &app,
        &[k("k2", 1), k("k1", 1), k("k0", 2)],
        &audit("client.create"),
    )
    .await
    .unwrap();
    let bot = Agent {
        id: "agt_a".into(),
        name: "bot".into(),
        created_at: 5,
        ..Default::default()
    };
    s.insert_agent(&bot, &[], &audit("client.create"))
        .await
        .unwrap();
    assert!(matches!(
        s.insert_agent(&bot, &[], &audit("client.create")).await,
        Err(StoreError::Conflict(_))
    ));
    let entry = &s.list_audit(1).await.unwrap()[0];
    assert_eq!(entry.record.reason.as_deref(), Some("agt_a ()"));
    let found = s.agent_by_secret_hash("hash_b").await.unwrap().unwrap();
    assert_eq!(
        (
            found.id.as_str(),
            found.redirect_uris.clone(),
            found.public_client,
            found.rotate_refresh_tokens,
            found.resource_server.as_deref(),
            found.disabled
        ),
        (
            "agt_b",
            vec!["https://a/cb".to_owned(), "https://b/cb".to_owned()],
            true,
            true,
            Some("https://api"),
            false
        )
    );
    let kids: Vec<String> = s
        .agent_keys("agt_b")
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(kids, ["k1", "k2", "k0"]);
    let ids: Vec<String> = s
        .list_agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, ["agt_a", "agt_b"]);
    let r3 = s.config_revision().await.unwrap();
    assert!(r3 > r2, "new agents and keys");

    assert!(
        s.set_agent_disabled("agt_a", true, &audit("client.disable"))
            .await
            .unwrap()
    );
    assert!(s.agent_by_id("agt_a").await.unwrap().unwrap().disabled);
    assert!(
        !s.set_agent_disabled("agt_x", true, &audit("client.disable"))
            .await
            .unwrap()
    );
    let r4 = s.config_revision().await.unwrap();
    assert!(r4 > r3, "a disabled agent");

    // Grants list by agent, then connection; deleting one is audited once.
    for (agent, conn) in [("agt_b", "con_1"), ("agt_a", "con_2"), ("agt_a", "con_1")] {
        let g = Grant {
            agent_id: agent.into(),
            connection_id: conn.into(),
            scopes: Scopes::parse("a"),
            ip_allowlist: vec!["10.0.0.0/8".into(), "::1".into()],
            policy: Default::default(),
            created_at: 1,
        };
        s.upsert_grant(&g, &audit("grant.upsert")).await.unwrap();
    }
    let grants: Vec<(String, String)> = s
        .list_grants()
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.agent_id, g.connection_id))
        .collect();
    assert_eq!(
        grants,
        [
            ("agt_a".into(), "con_1".into()),
            ("agt_a".into(), "con_2".into()),
            ("agt_b".into(), "con_1".into())
        ]
    );
    assert_eq!(
        s.grant_for("agt_a", "con_2")
            .await
            .unwrap()
            .unwrap()
            .ip_allowlist,
        ["10.0.0.0/8", "::1"]
    );
    let r5 = s.config_revision().await.unwrap();
    assert!(r5 > r4, "new grants");
    let entries = s.list_audit(1000).await.unwrap().len();
    assert!(
        s.delete_grant("agt_a", "con_2", &audit("grant.delete"))
            .await
            .unwrap()
    );
    assert!(
        !s.delete_grant("agt_a", "con_2", &audit("grant.delete"))
            .await
            .unwrap()
    );
    assert!(s.grant_for("agt_a", "con_2").await.unwrap().is_none());
    assert_eq!(s.list_audit(1000).await.unwrap().len(), entries + 1);
    assert!(s.config_revision().await.unwrap() > r5, "a deleted grant");
}

async fn accounts_list_in_order_and_a_reconnect_bumps_the_version(db: &Db) {
    let s = db.store();
    seed(s).await;
    s.insert_user(&user("usr_2", "bob"), &audit("u"))
        .await
        .unwrap();
    s.upsert_account(&account("cac_3", "usr_1", 3), &audit("a"))
        .await
        .unwrap();
    s.upsert_account(&account("cac_2", "usr_1", 3), &audit("a"))
        .await
        .unwrap();
    s.upsert_account(&account("cac_9", "usr_2", 2), &audit("a"))
        .await
        .unwrap();
    let ids = |v: Vec<ConnectedAccount>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.accounts_for("usr_1", "con_1").await.unwrap()),
        ["cac_2", "cac_3", "cac_1"],
        "newest first, then by id"
    );
    assert!(s.accounts_for("usr_1", "con_x").await.unwrap().is_empty());
    assert_eq!(
        ids(s.list_accounts(None).await.unwrap()),
        ["cac_1", "cac_9", "cac_2", "cac_3"]
    );
    assert_eq!(
        ids(s.list_accounts(Some("usr_2")).await.unwrap()),
        ["cac_9"]
    );

    // A reconnect replaces tokens, scopes and status, bumps the version and drops narrowed
    // tokens; the account keeps its identity and creation time.
    let a = s.account_by_id("cac_1").await.unwrap().unwrap();
    let t = ScopedToken {
        id: "cac_1 a".into(),
        account_id: "cac_1".into(),
        scopes: Scopes::parse("a"),
        access_token: vec![7],
        expires_at: None,
    };
    assert!(s.store_scoped_token(&a, 0, &t).await.unwrap());
    assert!(
        s.set_account_status("cac_1", AccountStatus::NeedsReauth, 1, &audit("x"))
            .await
            .unwrap()
    );
    let again = ConnectedAccount {
        scopes: Scopes::parse("a b c"),
        access_token: Some(vec![30]),
        refresh_token: Some(vec![31]),
        created_at: 50,
        updated_at: 50,
        ..account("cac_1", "usr_1", 50)
    };
    assert_eq!(
        s.upsert_account(&again, &audit("account.connect"))
            .await
            .unwrap(),
        "cac_1"
    );
    let stored = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.status,
            stored.status_reason,
            stored.token_version,
            stored.scopes.to_string_spaced(),
            stored.refresh_token,
            stored.created_at,
            stored.updated_at
        ),
        (
            AccountStatus::Active,
            None,
            3,
            "a b c".to_owned(),
            Some(vec![31]),
            1,
            50
        )
    );
    assert!(s.scoped_token("cac_1 a").await.unwrap().is_none());
}

async fn deleting_a_user_removes_what_is_theirs_and_keeps_the_audit_trail(db: &Db) {
    let s = db.store();
    seed(s).await;
    s.insert_user(&user("usr_2", "bob"), &audit("u"))
        .await
        .unwrap();
    s.upsert_account(&account("cac_2", "usr_2", 1), &audit("a"))
        .await
        .unwrap();
    let app = Agent {
        id: "agt_1".into(),
        name: "app".into(),
        created_at: 1,
        ..Default::default()
    };
    s.insert_agent(&app, &[], &audit("client.create"))
        .await
        .unwrap();
    let t = ScopedToken {
        id: "cac_1 a".into(),
        account_id: "cac_1".into(),
        scopes: Scopes::parse("a"),
        access_token: vec![7],
        expires_at: None,
    };
    let a = s.account_by_id("cac_1").await.unwrap().unwrap();
    assert!(s.store_scoped_token(&a, 0, &t).await.unwrap());
    let session = Session {
        user_id: "usr_1".into(),
        auth_methods: "pwd".into(),
        authenticated_at: 1,
        pending_mfa: false,
        mfa_at: None,
    };
    s.insert_session("sess", &session, 100).await.unwrap();
    s.insert_connect_flow(&ConnectFlow {
        state_hash: "flow".into(),
        user_id: "usr_1".into(),
        connection_id: "con_1".into(),
        code_verifier: vec![1],
        redirect_uri: "r".into(),
        scopes: Scopes::parse("a"),
        then_to: String::new(),
        expires_at: 100,
    })
    .await
    .unwrap();
    s.insert_auth_code(&auth_code("code")).await.unwrap();
    s.insert_token_family(&family("fam_1"), "code", Some("rt_1"), &audit("login"))
        .await
        .unwrap();
    s.insert_account_connect(&account_connect("acx_1"))
        .await
        .unwrap();
    s.create_approval(
        &approval("apr_1", 1, 100),
        caps(10, 10),
        &audit("approval.create"),
    )
    .await
    .unwrap();
    let revision = s.config_revision().await.unwrap();
    let entries = s.list_audit(1000).await.unwrap().len();

    assert!(s.delete_user("usr_1", &audit("user.delete")).await.unwrap());
    assert!(s.user_by_id("usr_1").await.unwrap().is_none());
    assert!(s.account_by_id("cac_1").await.unwrap().is_none());
    assert!(s.scoped_token("cac_1 a").await.unwrap().is_none());
    assert!(s.session("sess", 1).await.unwrap().is_none());
    assert!(s.take_connect_flow("flow", 1).await.unwrap().is_none());
    assert!(matches!(
        s.redeem_auth_code("code").await.unwrap(),
        CodeRedemption::Unknown
    ));
    assert!(s.token_family("fam_1").await.unwrap().is_none());
    assert!(s.refresh_token("rt_1").await.unwrap().is_none());
    assert!(s.account_connect("acx_1").await.unwrap().is_none());
    assert!(s.approval("apr_1").await.unwrap().is_none());
    // Someone else's things stay; the trail keeps every entry and gains one.
    assert!(s.account_by_id("cac_2").await.unwrap().is_some());
    assert_eq!(s.list_audit(1000).await.unwrap().len(), entries + 1);
    assert!(s.config_revision().await.unwrap() > revision);
    // A release of the deleted user's account finds no account.
    assert!(matches!(
        s.commit_release(
            None,
            &[jti("j")],
            &[],
            Some("cac_1"),
            &audit("token.release")
        )
        .await,
        Err(ReleaseError::AccountInactive)
    ));
    assert!(!s.delete_user("usr_1", &audit("user.delete")).await.unwrap());
    assert_eq!(s.list_audit(1000).await.unwrap().len(), entries + 1);
}

pub(crate) fn auth_code(hash: &str) -> AuthCode {
    AuthCode {
        hash: hash.into(),
        client_id: "agt_1".into(),
        user_id: "usr_1".into(),
        redirect_uri: "https://a/cb".into(),
        scope: Scopes::parse("openid offline_access"),
        nonce: Some("n".into()),
        code_challenge: "cc".into(),
        audience: "https://api".into(),
        auth_time: 3,
        amr: "pwd otp".into(),
        expires_at: 60,
    }
}

pub(crate) fn family(id: &str) -> TokenFamily {
    TokenFamily {
        id: id.into(),
        client_id: "agt_1".into(),
        user_id: "usr_1".into(),
        scope: Scopes::parse("openid offline_access"),
        auth_time: 3,
        amr: "pwd".into(),
        revoked: false,
        created_at: 4,
    }
}

pub(crate) fn account_connect(id: &str) -> AccountConnect {
    AccountConnect {
        id: id.into(),
        ticket_hash: Some(format!("ticket_{id}")),
        user_id: "usr_1".into(),
        client_id: "agt_1".into(),
        connection_id: "con_1".into(),
        redirect_uri: "https://a/cb".into(),
        state: Some("st".into()),
        code_challenge: None,
        scopes: Scopes::parse("a"),
        params: vec![("prompt".into(), "consent".into())],
        account_id: None,
        completed: false,
        expires_at: 50,
    }
}

async fn codes_families_and_refresh_tokens_are_single_use(db: &Db) {
    let s = db.store();
    seed(s).await;
    let app = Agent {
        id: "agt_1".into(),
        name: "app".into(),
        created_at: 1,
        ..Default::default()
    };
    s.insert_agent(&app, &[], &audit("client.create"))
        .await
        .unwrap();
    s.insert_auth_code(&auth_code("code")).await.unwrap();
    let CodeRedemption::Fresh(c) = s.redeem_auth_code("code").await.unwrap() else {
        panic!("a fresh code");
    };
    assert_eq!(
        (
            c.scope.to_string_spaced(),
            c.nonce.as_deref(),
            c.amr.as_str(),
            c.expires_at
        ),
        ("offline_access openid".to_owned(), Some("n"), "pwd otp", 60)
    );
    assert!(matches!(
        s.redeem_auth_code("code").await.unwrap(),
        CodeRedemption::Reused { family_id: None }
    ));
    assert!(matches!(
        s.redeem_auth_code("other").await.unwrap(),
        CodeRedemption::Unknown
    ));
    s.insert_token_family(&family("fam_1"), "code", Some("rt_1"), &audit("login"))
        .await
        .unwrap();
    assert!(matches!(
        s.redeem_auth_code("code").await.unwrap(),
        CodeRedemption::Reused { family_id: Some(f) } if f == "fam_1"
    ));

    let rt = s.refresh_token("rt_1").await.unwrap().unwrap();
    assert_eq!(
        (rt.state.as_str(), rt.family.id.as_str(), rt.family.revoked),
        ("active", "fam_1", false)
    );
    assert!(s.rotate_refresh_token("rt_1", "rt_2", 9).await.unwrap());
    assert!(
        !s.rotate_refresh_token("rt_1", "rt_3", 9).await.unwrap(),
        "a rotated token rotates no more"
    );
    assert_eq!(
        s.refresh_token("rt_1").await.unwrap().unwrap().state,
        "rotated"
    );
    assert_eq!(
        s.refresh_token("rt_2").await.unwrap().unwrap().state,
        "active"
    );
    assert!(s.refresh_token("rt_3").await.unwrap().is_none());

    let entries = s.list_audit(100).await.unwrap().len();
    s.revoke_token_family("fam_1", &audit("family.revoke"))
        .await
        .unwrap();
    s.revoke_token_family("fam_1", &audit("family.revoke"))
        .await
        .unwrap();
    assert!(s.token_family("fam_1").await.unwrap().unwrap().revoked);
    assert!(
        s.refresh_token("rt_2")
            .await
            .unwrap()
            .unwrap()
            .family
            .revoked
    );
    assert_eq!(
        s.list_audit(100).await.unwrap().len(),
        entries + 1,
        "revoked once, audited once"
    );
}

async fn account_connects_are_single_use(db: &Db) {
    let s = db.store();
    seed(s).await;
    let app = Agent {
        id: "agt_1".into(),
        name: "app".into(),
        created_at: 1,
        ..Default::default()
    };
    s.insert_agent(&app, &[], &audit("client.create"))
        .await
        .unwrap();
    s.insert_account_connect(&account_connect("acx_1"))
        .await
        .unwrap();
    assert!(
        s.take_account_connect_ticket("ticket_acx_1", 50)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
    let taken = s
        .take_account_connect_ticket("ticket_acx_1", 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            taken.id.as_str(),
            taken.params.clone(),
            taken.state.as_deref()
        ),
        (
            "acx_1",
            vec![("prompt".to_owned(), "consent".to_owned())],
            Some("st")
        )
    );
    assert!(
        s.take_account_connect_ticket("ticket_acx_1", 10)
            .await
            .unwrap()
            .is_none(),
        "used"
    );
    s.set_account_connect_code("acx_1", "code_1", "cac_1")
        .await
        .unwrap();
    let c = s.account_connect("acx_1").await.unwrap().unwrap();
    assert_eq!(
        (c.account_id.as_deref(), c.ticket_hash, c.completed),
        (Some("cac_1"), None, false)
    );
    assert!(!s.complete_account_connect("acx_1", "code_x").await.unwrap());
    assert!(s.complete_account_connect("acx_1", "code_1").await.unwrap());
    assert!(!s.complete_account_connect("acx_1", "code_1").await.unwrap());
    assert!(s.account_connect("acx_1").await.unwrap().unwrap().completed);
    assert!(s.account_connect("acx_x").await.unwrap().is_none());
}

async fn sessions_end_and_record_step_up(db: &Db) {
    let s = db.store();
    seed(s).await;
    let session = Session {
        user_id: "usr_1".into(),
        auth_methods: "pwd".into(),
        authenticated_at: 5,
        pending_mfa: true,
        mfa_at: None,
    };
    s.insert_session("a", &session, 50).await.unwrap();
    s.insert_session("b", &session, 500).await.unwrap();
    s.record_session_mfa("a", 7).await.unwrap();
    assert_eq!(
        s.session("a", 10).await.unwrap().unwrap(),
        Session {
            mfa_at: Some(7),
            ..session.clone()
        }
    );
    s.delete_session("a").await.unwrap();
    assert!(s.session("a", 10).await.unwrap().is_none());
    // Expired sessions and connect flows go with the purge.
    s.insert_session("c", &session, 50).await.unwrap();
    s.insert_connect_flow(&ConnectFlow {
        state_hash: "old".into(),
        user_id: "usr_1".into(),
        connection_id: "con_1".into(),
        code_verifier: vec![1],
        redirect_uri: "r".into(),
        scopes: Scopes::parse("a"),
        then_to: String::new(),
        expires_at: 50,
    })
    .await
    .unwrap();
    s.purge_expired_jtis(100).await.unwrap();
    assert_eq!(
        db.texts("SELECT hash FROM sessions").await,
        ["b"],
        "only the live one"
    );
    assert_eq!(db.int("SELECT COUNT(*) FROM connect_flows").await, 0);
}

async fn the_audit_chain_links_every_entry_and_prunes_behind_a_checkpoint(db: &Db) {
    let s = db.store();
    // Before the vault installs the key: only an unchained beginning.
    s.append_audit(&audit("first")).await.unwrap();
    s.append_audit(&audit("second")).await.unwrap();
    assert!(
        s.list_audit(10)
            .await
            .unwrap()
            .iter()
            .all(|e| e.mac.is_none())
    );
    assert!(matches!(
        s.chain_unchained_audit().await,
        Err(StoreError::Unavailable(_))
    ));
    let key = audit_key(7);
    s.install_audit_key(key.clone());
    assert_eq!(s.chain_unchained_audit().await.unwrap(), 2);
    assert_eq!(
        s.chain_unchained_audit().await.unwrap(),
        0,
        "sealed once only"
    );
    for i in 0..8 {
        s.append_audit(&AuditRecord {
            at: 10 + i,
            ..trail_entry(i as usize)
        })
        .await
        .unwrap();
    }
    assert_eq!(verify_chain(s, &key).await, 10);
    // Another key does not verify it.
    let first = &s.audit_range(0, 1).await.unwrap()[0];
    assert!(
        ChainVerifier::default()
            .check(&audit_key(8), first)
            .is_err()
    );

    // A store that has no key yet (a restart before unsealing) may not extend a chain.
    let fresh = db.reopen().await.unwrap();
    assert!(matches!(
        fresh.append_audit(&audit("x")).await,
        Err(StoreError::Unavailable(_))
    ));

    // Ranges, times and checkpoints.
    let range: Vec<i64> = s
        .audit_range(3, 4)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(range, [4, 5, 6, 7]);
    assert_eq!(s.audit_seq_before(13).await.unwrap(), Some(5));
    assert_eq!(s.audit_seq_before(1).await.unwrap(), None);
    let at5 = s.audit_range(4, 1).await.unwrap().remove(0);
    let cp = AuditCheckpoint {
        seq: 5,
        mac: at5.mac.clone().unwrap(),
        at: 20,
        public_key: "pk".into(),
        signature: "sig".into(),
    };
    s.insert_audit_checkpoint(&cp).await.unwrap();
    s.insert_audit_checkpoint(&AuditCheckpoint {
        signature: "other".into(),
        ..cp.clone()
    })
    .await
    .unwrap();
    s.insert_audit_checkpoint(&AuditCheckpoint {
        seq: 2,
        ..cp.clone()
    })
    .await
    .unwrap();
    let cps = s.audit_checkpoints().await.unwrap();
    assert_eq!(
        cps.iter().map(|c| c.seq).collect::<Vec<_>>(),
        [2, 5],
        "oldest first"
    );
    assert_eq!(cps[1], cp, "the first checkpoint of a seq stays");
    // Once chained, unchained entries are never sealed over.
    assert_eq!(s.chain_unchained_audit().await.unwrap(), 0);

    // Pruning through the checkpoint: the rest still verifies from it, with the pruning's own
    // entry chained at the end.
    assert_eq!(s.prune_audit(5, &audit("audit.prune")).await.unwrap(), 5);
    let mut v = ChainVerifier::after(5, &cp.mac);
    let rest = s.audit_range(0, 100).await.unwrap();
    assert_eq!(rest.first().map(|e| e.seq), Some(6));
    for e in &rest {
        v.check(&key, e).unwrap();
    }
    assert_eq!(v.count, 6);
    assert_eq!(rest.last().unwrap().record.action, "audit.prune");
}

pub(crate) fn approval(id: &str, created_at: i64, expires_at: i64) -> Approval {
    Approval {
        id: id.into(),
        req_hash: format!("req_{id}"),
        kind: ApprovalKind::Ciba,
        client_id: "agt_1".into(),
        user_id: "usr_1".into(),
        connection: Some("demo-git".into()),
        scopes: Scopes::parse("a"),
        audience: None,
        authorization_details: Some("[{\"type\":\"x\"}]".into()),
        binding_message: Some("W-42".into()),
        audit_context: None,
        login_hint: None,
        risk: "high".into(),
        step_up: true,
        single_use: false,
        request_hash: format!("what_{id}"),
        status: ApprovalStatus::Pending,
        created_at,
        expires_at,
        interval: 5,
        last_polled_at: None,
        decided_by: None,
        decided_at: None,
        stepped_up: false,
        redeemed_at: None,
        reason: None,
    }
}

fn caps(per_user: i64, per_client: i64) -> ApprovalCaps {
    ApprovalCaps {
        per_user,
        per_client,
    }
}

async fn approvals_collapse_respect_caps_and_are_decided_and_redeemed_once(db: &Db) {
    let s = db.store();
    seed(s).await;
    let a = approval("apr_1", 10, 100);
    assert!(matches!(
        s.create_approval(&a, caps(2, 3), &audit("approval.create"))
            .await
            .unwrap(),
        ApprovalCreated::Created
    ));
    assert_eq!(s.approval("apr_1").await.unwrap().unwrap(), a);
    assert_eq!(
        s.approval_by_req_hash("req_apr_1").await.unwrap().unwrap(),
        a
    );
    // The identical request, while pending: the one already shown.
    let same = Approval {
        id: "apr_2".into(),
        req_hash: "req_apr_2".into(),
        request_hash: a.request_hash.clone(),
        created_at: 11,
        ..approval("apr_2", 11, 101)
    };
    let entries = s.list_audit(100).await.unwrap().len();
    match s
        .create_approval(&same, caps(2, 3), &audit("approval.create"))
        .await
        .unwrap()
    {
        ApprovalCreated::Existing(e) => assert_eq!(e.id, "apr_1"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.list_audit(100).await.unwrap().len(), entries);
    // Caps: the user's second pending request is the last one allowed.
    s.create_approval(
        &approval("apr_3", 11, 90),
        caps(2, 3),
        &audit("approval.create"),
    )
    .await
    .unwrap();
    match s
        .create_approval(
            &approval("apr_4", 12, 100),
            caps(2, 3),
            &audit("approval.create"),
        )
        .await
        .unwrap()
    {
        ApprovalCreated::TooMany { per, next_expiry } => {
            assert_eq!((per, next_expiry), ("user", 90))
        }
        other => panic!("{other:?}"),
    }
    match s
        .create_approval(
            &approval("apr_4", 12, 100),
            caps(5, 2),
            &audit("approval.create"),
        )
        .await
        .unwrap()
    {
        ApprovalCreated::TooMany { per, .. } => assert_eq!(per, "agent"),
        other => panic!("{other:?}"),
    }
    let same_id = Approval {
        request_hash: "something else".into(),
        ..approval("apr_1", 12, 100)
    };
    assert!(matches!(
        s.create_approval(&same_id, caps(9, 9), &audit("approval.create"))
            .await,
        Err(StoreError::Conflict(_))
    ));

    // Newest first (ties: the later insert first), filtered by user and status.
    let ids = |v: Vec<Approval>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let all = ApprovalFilter {
        limit: 10,
        ..Default::default()
    };
    assert_eq!(
        ids(s.list_approvals(&all).await.unwrap()),
        ["apr_3", "apr_1"]
    );
    s.create_approval(
        &Approval {
            user_id: "usr_x".into(),
            ..approval("apr_5", 11, 100)
        },
        caps(9, 9),
        &audit("approval.create"),
    )
    .await
    .unwrap();
    assert_eq!(
        ids(s.list_approvals(&all).await.unwrap()),
        ["apr_5", "apr_3", "apr_1"]
    );
    assert_eq!(
        ids(s
            .list_approvals(&ApprovalFilter {
                user_id: Some("usr_1".into()),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap()),
        ["apr_3"]
    );

    // A decision applies once, from the expected state, while live.
    let approve = ApprovalUpdate {
        id: "apr_1".into(),
        from: ApprovalStatus::Pending,
        to: ApprovalStatus::Approved,
        at: 20,
        live: true,
        decided_by: Some("user:usr_1".into()),
        stepped_up: true,
        expires_at: Some(300),
        redeem: false,
        reason: None,
    };
    let entries = s.list_audit(100).await.unwrap().len();
    assert!(
        !s.update_approval(
            &ApprovalUpdate {
                at: 100,
                ..approve.clone()
            },
            &audit("approval.approve")
        )
        .await
        .unwrap(),
        "expired meanwhile"
    );
    assert!(
        s.update_approval(&approve, &audit("approval.approve"))
            .await
            .unwrap()
    );
    assert!(
        !s.update_approval(&approve, &audit("approval.approve"))
            .await
            .unwrap()
    );
    assert_eq!(s.list_audit(100).await.unwrap().len(), entries + 1);
    let decided = s.approval("apr_1").await.unwrap().unwrap();
    assert_eq!(
        (
            decided.status,
            decided.decided_by.as_deref(),
            decided.decided_at,
            decided.stepped_up,
            decided.expires_at
        ),
        (
            ApprovalStatus::Approved,
            Some("user:usr_1"),
            Some(20),
            true,
            300
        )
    );
    assert_eq!(
        ids(s
            .list_approvals(&ApprovalFilter {
                status: Some(ApprovalStatus::Approved),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()),
        ["apr_1"]
    );
    let usable = |now| s.usable_approval("what_apr_1", "agt_1", "usr_1", now);
    assert_eq!(usable(50).await.unwrap().unwrap().id, "apr_1");
    assert!(usable(300).await.unwrap().is_none(), "expired");
    assert!(
        s.usable_approval("what_apr_1", "agt_2", "usr_1", 50)
            .await
            .unwrap()
            .is_none(),
        "another client's"
    );
    s.record_approval_poll("apr_3", 33, 10).await.unwrap();
    let polled = s.approval("apr_3").await.unwrap().unwrap();
    assert_eq!((polled.last_polled_at, polled.interval), (Some(33), 10));

    // A CIBA redemption happens once and brings its family and entries.
    let app = Agent {
        id: "agt_1".into(),
        name: "app".into(),
        created_at: 1,
        ..Default::default()
    };
    s.insert_agent(&app, &[], &audit("client.create"))
        .await
        .unwrap();
    let entries = s.list_audit(100).await.unwrap().len();
    let two = [audit("ciba.redeem"), audit("token.issue")];
    assert!(
        !s.redeem_ciba_approval("apr_3", 40, &family("fam_0"), None, &two)
            .await
            .unwrap(),
        "still pending"
    );
    assert!(
        s.redeem_ciba_approval("apr_1", 40, &family("fam_1"), Some("rt_1"), &two)
            .await
            .unwrap()
    );
    assert!(
        !s.redeem_ciba_approval("apr_1", 41, &family("fam_2"), Some("rt_2"), &two)
            .await
            .unwrap()
    );
    assert_eq!(s.list_audit(100).await.unwrap().len(), entries + 2);
    let redeemed = s.approval("apr_1").await.unwrap().unwrap();
    assert_eq!(
        (redeemed.status, redeemed.redeemed_at),
        (ApprovalStatus::Redeemed, Some(40))
    );
    assert!(s.refresh_token("rt_1").await.unwrap().is_some());
    assert!(s.token_family("fam_2").await.unwrap().is_none());

    // Pending and approved ones past their deadline, oldest first.
    let due = |now| async move { ids(s.due_approvals(now, 10).await.unwrap()) };
    assert!(due(89).await.is_empty());
    assert_eq!(due(90).await, ["apr_3"]);
    assert_eq!(due(1000).await, ["apr_3", "apr_5"]);
}
