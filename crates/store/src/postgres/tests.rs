//! What only PostgreSQL has: several nodes writing one database at once. Each test opens two
//! (or more) `PgStore`s, each with its own pool, on a fresh database, and races them; what it
//! asserts is what SQLite gets from its single writer. (Everything a single node does is in the
//! conformance suite, `crate::conformance`.)

use std::sync::Arc;

use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::*;
use crate::conformance::{
    PgTestDb, account, approval, audit, audit_key, auth_code, family, jti, quota, seed, user,
    verify_chain,
};

/// A fresh database and `n` nodes on it.
async fn nodes(n: usize) -> (PgTestDb, Vec<PgStore>) {
    let db = PgTestDb::create().await;
    let mut stores = Vec::new();
    for _ in 0..n {
        stores.push(db.store().await);
    }
    (db, stores)
}

/// Run `per_node` copies of `f` on each node at once (all released by one barrier); the
/// results, in no particular order.
async fn race<T, F, Fut>(stores: &[PgStore], per_node: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(PgStore, usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(stores.len() * per_node));
    let mut tasks = JoinSet::new();
    let mut i = 0;
    for _ in 0..per_node {
        for s in stores {
            let (barrier, work) = (barrier.clone(), f(s.clone(), i));
            tasks.spawn(async move {
                barrier.wait().await;
                work.await
            });
            i += 1;
        }
    }
    tasks.join_all().await
}

fn at(at: i64, action: &str) -> AuditRecord {
    AuditRecord {
        at,
        ..audit(action)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let db = PgTestDb::create().await;
    let options = db.options();
    let mut tasks = JoinSet::new();
    for _ in 0..4 {
        let options = options.clone();
        tasks.spawn(async move { PgStore::connect_with(options, DEFAULT_POOL_SIZE).await });
    }
    let stores: Vec<PgStore> = tasks
        .join_all()
        .await
        .into_iter()
        .map(|s| s.unwrap())
        .collect();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(stores[0].pool())
        .await
        .unwrap();
    let known: Vec<i64> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, known);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jti_is_consumed_once_across_nodes() {
    let (_db, stores) = nodes(2).await;
    seed(&stores[0]).await;
    for round in 0..5 {
        let outcomes = race(&stores, 8, |s, i| async move {
            s.commit_release(
                None,
                &[
                    jti(&format!("own:{round}:{i}")),
                    jti(&format!("shared:{round}")),
                ],
                &[],
                Some("cac_1"),
                &at(100 + round, "token.release"),
            )
            .await
        })
        .await;
        let won = outcomes.iter().filter(|o| o.is_ok()).count();
        let replays = outcomes
            .iter()
            .filter(|o| matches!(o, Err(ReleaseError::Replay(1))))
            .count();
        assert_eq!((won, replays), (1, 15), "{outcomes:?}");
    }
    let s = &stores[1];
    // Only the winners' jtis stayed, and only their entries were written.
    let jtis: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_jtis")
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(jtis, 10);
    let releases = s
        .query_audit(&AuditQuery {
            action: Some("token.release".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(releases.len(), 5);
}

/// A quota counted by three nodes at once admits exactly its limit, whichever node releases;
/// the refused releases write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_admits_exactly_its_limit_across_nodes() {
    let (_db, stores) = nodes(3).await;
    seed(&stores[0]).await;
    for round in 0..3 {
        let key = format!("agent:agt_1:con_1:minute:{round}");
        let outcomes = race(&stores, 8, |s, i| {
            let key = key.clone();
            async move {
                s.commit_release(
                    None,
                    &[jti(&format!("q:{round}:{i}"))],
                    &[quota(&key, 10, 60 * (round + 1))],
                    Some("cac_1"),
                    &at(100 + round, "token.release"),
                )
                .await
            }
        })
        .await;
        let won = outcomes.iter().filter(|o| o.is_ok()).count();
        let full = outcomes
            .iter()
            .filter(|o| matches!(o, Err(ReleaseError::QuotaReached(0))))
            .count();
        assert_eq!((won, full), (10, 14), "{outcomes:?}");
    }
    let s = &stores[2];
    let jtis: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_jtis")
        .fetch_one(s.pool())
        .await
        .unwrap();
    let counts: Vec<i64> = sqlx::query_scalar("SELECT n FROM quota_counts ORDER BY key")
        .fetch_all(s.pool())
        .await
        .unwrap();
    assert_eq!((jtis, counts), (30, vec![10, 10, 10]));
    let releases = s
        .query_audit(&AuditQuery {
            action: Some("token.release".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(releases.len(), 30);
}

/// Nodes claiming a periodic job at once: one gets it, each period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_job_goes_to_one_node_a_period() {
    let (_db, stores) = nodes(3).await;
    for period in 0..3 {
        let claims = race(&stores, 4, |s, _| async move {
            s.claim_job("audit.checkpoint", 1_000 + 600 * period, 600)
                .await
                .unwrap()
        })
        .await;
        assert_eq!(claims.iter().filter(|c| **c).count(), 1, "{claims:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fenced_token_update_wins_across_nodes() {
    let (_db, stores) = nodes(2).await;
    let a = seed(&stores[0]).await;
    let mut narrowed_wins = 0;
    for round in 0..5_i64 {
        let version = stores[1]
            .account_by_id("cac_1")
            .await
            .unwrap()
            .unwrap()
            .token_version;
        assert_eq!(version, round);
        let a = a.clone();
        let outcomes = race(&stores, 6, move |s, i| {
            let mut mine = a.clone();
            mine.access_token = Some(vec![i as u8]);
            mine.refresh_token = Some(vec![i as u8]);
            mine.updated_at = 10 + round;
            async move {
                // Half refresh the account's own token, half a narrowed one: one fence.
                let won = if i % 2 == 0 {
                    s.update_account_tokens(&mine, version).await.unwrap()
                } else {
                    let t = ScopedToken {
                        // One id per round and task: two rounds' winners never share a row.
                        id: format!("cac_1 {round} {i}"),
                        account_id: "cac_1".into(),
                        scopes: Scopes::parse("a"),
                        access_token: vec![i as u8],
                        expires_at: None,
                    };
                    s.store_scoped_token(&mine, version, &t).await.unwrap()
                };
                won.then_some(i)
            }
        })
        .await;
        let winners: Vec<usize> = outcomes.into_iter().flatten().collect();
        assert_eq!(winners.len(), 1, "{winners:?}");
        narrowed_wins += (winners[0] % 2) as i64;
        // The winner's token is the one stored: no loser overwrote it.
        let stored = stores[0].account_by_id("cac_1").await.unwrap().unwrap();
        assert_eq!(
            (stored.token_version, stored.refresh_token),
            (round + 1, Some(vec![winners[0] as u8]))
        );
    }
    // Only winners wrote a narrowed token (one per round an odd task won).
    let narrowed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM scoped_tokens")
        .fetch_one(stores[0].pool())
        .await
        .unwrap();
    assert_eq!(narrowed, narrowed_wins);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_every_node_form_one_gap_free_chain() {
    let (_db, stores) = nodes(3).await;
    let key = audit_key(3);
    for s in &stores {
        s.install_audit_key(key.clone());
    }
    seed(&stores[0]).await;
    let written = race(&stores, 4, |s, i| async move {
        for n in 0..15 {
            let record = AuditRecord {
                reason: Some(format!("{i}/{n}")),
                ..at(i as i64, "x")
            };
            if n % 3 == 0 {
                // Releases append through their own transaction.
                s.commit_release(
                    None,
                    &[jti(&format!("{i}/{n}"))],
                    &[],
                    Some("cac_1"),
                    &record,
                )
                .await
                .unwrap();
            } else {
                s.append_audit(&record).await.unwrap();
            }
        }
        15
    })
    .await;
    let total = 3 + written.iter().sum::<u64>();
    assert_eq!(verify_chain(&stores[1], &key).await, total);
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM audit_events ORDER BY seq")
        .fetch_all(stores[2].pool())
        .await
        .unwrap();
    assert_eq!(seqs, (1..=total as i64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_claim_disjoint_refresh_work_and_webhooks() {
    let (_db, stores) = nodes(2).await;
    let s = &stores[0];
    seed(s).await;
    // 40 accounts, all used and expiring.
    for i in 0..40 {
        let a = ConnectedAccount {
            last_used_at: Some(50),
            ..account(&format!("cac_{i:02}"), "usr_1", 2)
        };
        s.upsert_account(&a, &audit("a")).await.unwrap();
    }
    let q = RefreshQuery {
        now: 60,
        expiring_before: 200,
        used_since: 0,
        interrupted_before: 0,
        claim_until: 1000,
        limit: 3,
    };
    let claimed = race(&stores, 3, |s, _| {
        let q = q.clone();
        async move {
            let mut mine = Vec::new();
            loop {
                let work = s.claim_refresh_work(&q).await.unwrap();
                if work.is_empty() {
                    return mine;
                }
                mine.extend(work.into_iter().map(|w| w.account.id));
            }
        }
    })
    .await;
    let mut all: Vec<String> = claimed.into_iter().flatten().collect();
    all.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("cac_{i:02}")).collect();
    want.sort();
    assert_eq!(all, want, "every account claimed exactly once");

    // Webhook deliveries: 60 due, taken five at a time from both nodes.
    for i in 0..60 {
        s.append_audit(&AuditRecord {
            notify: Some(Notification {
                event: "e".into(),
                body: format!("{i}"),
            }),
            ..at(10, "x")
        })
        .await
        .unwrap();
    }
    let claimed = race(&stores, 3, |s, _| async move {
        let mut mine = Vec::new();
        loop {
            let due = s.claim_webhooks(20, 500, 5).await.unwrap();
            if due.is_empty() {
                return mine;
            }
            mine.extend(due.into_iter().map(|d| d.body));
        }
    })
    .await;
    let mut all: Vec<i64> = claimed
        .into_iter()
        .flatten()
        .map(|b| b.parse().unwrap())
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..60).collect::<Vec<_>>(),
        "each delivery claimed once"
    );
}

/// Releases on one node race a revocation on another: none commits after the revocation does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_release_commits_after_a_revocation_on_another_node() {
    let (_db, stores) = nodes(2).await;
    seed(&stores[0]).await;
    let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let releaser = stores[0].clone();
    let flag = revoked.clone();
    let releases = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        for t in 0..4 {
            let (s, flag) = (releaser.clone(), flag.clone());
            tasks.spawn(async move {
                let (mut ok, mut late) = (0, 0);
                for n in 0.. {
                    let after_revocation = flag.load(std::sync::atomic::Ordering::SeqCst);
                    let outcome = s
                        .commit_release(
                            None,
                            &[jti(&format!("{t}/{n}"))],
                            &[],
                            Some("cac_1"),
                            &at(5, "token.release"),
                        )
                        .await;
                    match outcome {
                        Ok(()) if after_revocation => late += 1,
                        Ok(()) => ok += 1,
                        Err(ReleaseError::AccountInactive) => return (ok, late),
                        Err(e) => panic!("{e:?}"),
                    }
                }
                unreachable!()
            });
        }
        tasks.join_all().await
    });
    // Let some releases through first.
    loop {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_jtis")
            .fetch_one(stores[1].pool())
            .await
            .unwrap();
        if n >= 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert!(
        stores[1]
            .revoke_account("cac_1", &at(6, "account.revoke"))
            .await
            .unwrap()
    );
    revoked.store(true, std::sync::atomic::Ordering::SeqCst);
    let counts = releases.await.unwrap();
    assert!(counts.iter().map(|(ok, _)| ok).sum::<i32>() >= 20);
    assert_eq!(
        counts.iter().map(|(_, late)| late).sum::<i32>(),
        0,
        "a release that started after the revocation committed succeeded"
    );
    // And in the trail: every release before the revocation.
    let log = stores[1].list_audit(10_000).await.unwrap();
    let revoke = log
        .iter()
        .find(|e| e.record.action == "account.revoke")
        .unwrap()
        .seq;
    let last_release = log
        .iter()
        .filter(|e| e.record.action == "token.release")
        .map(|e| e.seq)
        .max()
        .unwrap();
    assert!(last_release < revoke, "{last_release} after {revoke}");
}

/// Releases decided at a revision race a configuration change on another node: those that
/// commit do so before the change, and the rest are told the revision moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_change_on_another_node_waits_for_releases_decided_before_it() {
    let (_db, stores) = nodes(2).await;
    seed(&stores[0]).await;
    let revision = stores[0].config_revision().await.unwrap();
    let releaser = stores[0].clone();
    let releases = tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        for t in 0..4 {
            let s = releaser.clone();
            tasks.spawn(async move {
                let mut ok = 0;
                for n in 0.. {
                    let outcome = s
                        .commit_release(
                            Some(revision),
                            &[jti(&format!("{t}/{n}"))],
                            &[],
                            // Half with an account, half an agent's own token.
                            (n % 2 == 0).then_some("cac_1"),
                            &AuditRecord {
                                reason: Some(format!("{t}/{n}")),
                                ..at(5, "token.release")
                            },
                        )
                        .await;
                    match outcome {
                        Ok(()) => ok += 1,
                        Err(ReleaseError::Stale(now)) => return (ok, now),
                        Err(e) => panic!("{e:?}"),
                    }
                }
                unreachable!()
            });
        }
        tasks.join_all().await
    });
    loop {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM used_jtis")
            .fetch_one(stores[1].pool())
            .await
            .unwrap();
        if n >= 20 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    stores[1]
        .insert_user(&user("usr_2", "bob"), &at(6, "user.create"))
        .await
        .unwrap();
    let now = stores[1].config_revision().await.unwrap();
    assert!(now > revision);
    for (_, seen) in releases.await.unwrap() {
        assert_eq!(seen, now);
    }
    let log = stores[1].list_audit(10_000).await.unwrap();
    let change = log
        .iter()
        .find(|e| e.record.action == "user.create")
        .unwrap()
        .seq;
    let late: Vec<(i64, Option<String>)> = log
        .iter()
        .filter(|e| e.record.action == "token.release" && e.seq > change)
        .map(|e| (e.seq, e.record.reason.clone()))
        .collect();
    assert!(
        late.is_empty(),
        "a release decided at revision {revision} committed after the change ({change}): {late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_collapse_and_caps_hold_across_nodes() {
    let (_db, stores) = nodes(2).await;
    seed(&stores[0]).await;
    let caps = ApprovalCaps {
        per_user: 3,
        per_client: 100,
    };
    // The same request from everywhere at once: one row, the others see it.
    let outcomes = race(&stores, 5, |s, i| async move {
        let a = Approval {
            request_hash: "the same".into(),
            ..approval(&format!("apr_{i}"), 10, 100)
        };
        s.create_approval(&a, caps, &audit("approval.create"))
            .await
            .unwrap()
    })
    .await;
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, ApprovalCreated::Created))
        .count();
    let existing = outcomes
        .iter()
        .filter(|o| matches!(o, ApprovalCreated::Existing(_)))
        .count();
    assert_eq!((created, existing), (1, 9), "{outcomes:?}");
    // Different requests at once: the cap of three pending per user holds.
    let outcomes = race(&stores, 5, |s, i| async move {
        s.create_approval(
            &approval(&format!("apr_x{i}"), 10, 100),
            caps,
            &audit("approval.create"),
        )
        .await
        .unwrap()
    })
    .await;
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, ApprovalCreated::Created))
        .count();
    assert_eq!(created, 2, "{outcomes:?}");
    let pending = stores[0]
        .list_approvals(&ApprovalFilter {
            user_id: Some("usr_1".into()),
            status: Some(ApprovalStatus::Pending),
            limit: 100,
        })
        .await
        .unwrap();
    assert_eq!(pending.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_values_are_used_once_across_nodes() {
    let (_db, stores) = nodes(2).await;
    let s = &stores[0];
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
    let fresh = race(&stores, 4, |s, _| async move {
        matches!(
            s.redeem_auth_code("code").await.unwrap(),
            CodeRedemption::Fresh(_)
        )
    })
    .await;
    assert_eq!(fresh.iter().filter(|f| **f).count(), 1);

    s.insert_token_family(&family("fam_1"), "code", Some("rt_1"), &audit("login"))
        .await
        .unwrap();
    let rotated = race(&stores, 4, |s, i| async move {
        s.rotate_refresh_token("rt_1", &format!("rt_new_{i}"), 5)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(rotated.iter().filter(|r| **r).count(), 1);

    let steps = race(&stores, 4, |s, _| async move {
        s.consume_totp_step("usr_1", 77).await.unwrap()
    })
    .await;
    assert_eq!(steps.iter().filter(|r| **r).count(), 1);

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
    let taken = race(&stores, 4, |s, _| async move {
        s.take_connect_flow("flow", 1).await.unwrap().is_some()
    })
    .await;
    assert_eq!(taken.iter().filter(|t| **t).count(), 1);
}

/// With sequential scans off, each audit read is an index walk backwards from the cursor, and
/// the daily counts a range of their partial index (what the tiny test table cannot show).
#[tokio::test]
async fn audit_reads_walk_an_index_from_the_cursor() {
    let (_db, stores) = nodes(1).await;
    let mut conn = stores[0].pool().acquire().await.unwrap();
    sqlx::raw_sql("SET enable_seqscan = off; SET enable_bitmapscan = off; ANALYZE audit_events")
        .execute(&mut *conn)
        .await
        .unwrap();
    // Which of $1–$4 the statement is driven by, and the index it walks.
    for (sql, driver, index) in [
        (AUDIT_BY_USER, 0, "audit_events_subject_user"),
        (AUDIT_BY_CONNECTION, 2, "audit_events_connection"),
        (AUDIT_BY_ACTION, 3, "audit_events_action"),
        (AUDIT_BY_AGENT, 1, "audit_events_agent_actor"),
        (AUDIT_BY_AGENT, 1, "audit_events_agent_target"),
        (AUDIT_SCAN, 9, "audit_events_pkey"),
    ] {
        let filter = |i: usize| (i == driver).then_some("x");
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
            .bind(filter(0))
            .bind(filter(1))
            .bind(filter(2))
            .bind(filter(3))
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(0_i64)
            .bind(i64::MAX)
            .bind(1000_i64)
            .bind(Some(10_i64))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains(&format!("Index Scan Backward using {index} ")),
            "{sql}\n{plan}"
        );
        assert!(
            !plan.contains("Sort") || sql == AUDIT_BY_AGENT,
            "{sql}\n{plan}"
        );
    }
    let plan: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {AUDIT_DAILY_COUNTS}")))
            .bind("token.release")
            .bind(Some("usr_a"))
            .bind(0_i64)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Only Scan using audit_events_agent_daily"),
        "{plan}"
    );
}

/// A change to the configuration in progress (made by hand here, so it stays open): a release
/// decided before it waits for it, and is then stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_waits_for_a_configuration_change_in_progress() {
    let (_db, stores) = nodes(2).await;
    seed(&stores[0]).await;
    let revision = stores[0].config_revision().await.unwrap();
    let mut change = stores[1].pool().begin().await.unwrap();
    sqlx::query("INSERT INTO users (id, username, created_at) VALUES ('usr_x', 'x', 1)")
        .execute(&mut *change)
        .await
        .unwrap();
    let s = stores[0].clone();
    let release = tokio::spawn(async move {
        s.commit_release(
            Some(revision),
            &[jti("j")],
            &[],
            None,
            &audit("token.release"),
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!release.is_finished(), "{:?}", release.await);
    change.commit().await.unwrap();
    let outcome = release.await.unwrap();
    assert!(
        matches!(outcome, Err(ReleaseError::Stale(now)) if now == revision + 1),
        "{outcome:?}"
    );
}

/// A stuck statement or a transaction left open by a stalled node ends, releasing its locks.
#[tokio::test]
async fn connections_carry_timeouts_and_a_name() {
    let (_db, stores) = nodes(1).await;
    let pool = stores[0].pool();
    let show = |setting: &'static str| async move {
        sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {setting}")))
            .fetch_one(pool)
            .await
            .unwrap()
    };
    assert_eq!(show("statement_timeout").await, "30s");
    assert_eq!(show("idle_in_transaction_session_timeout").await, "1min");
    assert_eq!(show("application_name").await, "latchkey");
}

#[test]
fn the_schema_locks_the_configuration_with_the_key_releases_share() {
    let schema = MIGRATIONS[0].1;
    let call = format!(
        "pg_advisory_xact_lock({}, {})",
        locks::GLOBAL,
        locks::CONFIG
    );
    assert!(schema.contains(&call), "{call}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_lease_is_held_by_one_node_at_a_time() {
    let (_db, stores) = nodes(2).await;
    let lease = stores[0].refresh_lease("cac_1").await.unwrap();
    // Another account is not held up.
    drop(stores[1].refresh_lease("cac_2").await.unwrap());
    let second = tokio::spawn({
        let s = stores[1].clone();
        async move { s.refresh_lease("cac_1").await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second node waits for the first's lease"
    );
    drop(lease);
    tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second node gets the lease once the first drops it")
        .unwrap()
        .unwrap();
    // A holder that dies (its session ends: here its backend is terminated, as when a node's
    // process or network goes) gives the lease up too.
    let held = stores[0].refresh_lease("cac_3").await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND classid = $1::bigint::oid AND objsubid = 2 AND granted",
    )
    .bind(i64::from(locks::REFRESH_LEASE))
    .execute(stores[1].pool())
    .await
    .unwrap();
    std::mem::forget(held);
    tokio::time::timeout(Duration::from_secs(10), stores[1].refresh_lease("cac_3"))
        .await
        .expect("a dead holder's lease ends with its session")
        .unwrap();
}

/// A request cancelled mid-transaction (a client that disconnects, a deadline) must not hand
/// its pooled connection on with a transaction still open: the next borrower's statements would
/// run inside it, hold its locks, and be lost when the session ends. sqlx 0.9.0 left exactly
/// that behind when the cancel landed during `BEGIN`'s round trip (launchbadge/sqlx#4393, fixed
/// in 0.9.1). One connection, cancels at every point of an audited write, and after each one
/// the next statement must start a transaction of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_write_leaves_no_open_transaction_behind() {
    let db = PgTestDb::create().await;
    let s = PgStore::connect_with(db.options(), 1).await.unwrap();
    let key = audit_key(9);
    s.install_audit_key(key.clone());
    let (mut cancelled, mut written) = (0, 0);
    for i in 0..400u64 {
        let deadline = std::time::Duration::from_micros((i * 37) % 1500);
        match tokio::time::timeout(deadline, s.append_audit(&audit("cancel.test"))).await {
            Ok(done) => {
                done.unwrap();
                written += 1;
            }
            Err(_) => cancelled += 1,
        }
        // `now()` is the transaction's start: two statements a moment apart see two values
        // unless they run inside one (leftover) transaction.
        let now = || async {
            sqlx::query_scalar::<_, f64>("SELECT extract(epoch FROM now())::float8")
                .fetch_one(s.pool())
                .await
                .unwrap()
        };
        let first = now().await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        assert!(
            now().await > first,
            "after round {i} the pooled connection was still inside a transaction"
        );
    }
    assert!(
        cancelled > 50 && written > 50,
        "{cancelled} cancelled, {written} written"
    );
    // A write cancelled after its COMMIT left may have landed; the chain holds every one.
    let chained = verify_chain(&s, &key).await;
    assert!(
        (written..=written + cancelled).contains(&chained),
        "{chained} chained"
    );
}
