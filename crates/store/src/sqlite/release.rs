//! Group commit for token releases: the hot path's only write.
//!
//! Every release consumes its `jti`s, re-checks the configuration revision and the account,
//! counts its quota slots, and appends its audit entry, and must be durable (`synchronous=FULL`) before the token
//! leaves. One transaction per release would make the disk's fsync rate the ceiling of the
//! exchange rate. Instead, one writer takes the releases waiting at that moment and writes them
//! in one transaction, each inside its own savepoint (so a replayed `jti`, a revoked account or
//! a stale revision undoes only that release), then commits once and answers each. A release
//! is answered only after the commit that holds it.
//!
//! The writer is a dedicated OS thread that owns its own `rusqlite` connection to the same
//! file, and runs a whole batch synchronously. Through sqlx every statement is a round trip to
//! the connection's worker thread (a channel send, a futex wake, two context switches), and a
//! release takes about six statements: that hand-off, not SQLite, was where the server spent
//! its CPU. Here a batch costs one wake-up of the writer thread, and each statement is a plain
//! function call on a cached prepared statement. Both connections use the one SQLite library
//! that sqlx links (the same `libsqlite3-sys`), so they share its locks and WAL index; the
//! audit chain's rules are the ones `insert_audit` uses (see [`audit_link`]).
//!
//! Around the batches, so that nothing else holds the write lock or stalls a commit: under
//! load the writer waits 200 µs for a small batch to fill; each batch also deletes expired
//! `jti`s (a bounded number); and a checkpointer thread copies the WAL back into the database
//! file every 100 ms. Commits over 100 ms are logged.

use std::path::Path;
use std::sync::mpsc::Receiver;

use rusqlite::{OptionalExtension, params};
use tokio::sync::oneshot;

use super::*;

/// Releases written per transaction, at most.
const MAX_BATCH: usize = 256;

const REVISION: &str = "SELECT value FROM config_revision WHERE id = 1";
const JTI_INSERT: &str =
    "INSERT INTO used_jtis (key, expires_at) VALUES (?, ?) ON CONFLICT(key) DO NOTHING";
const JTI_PURGE: &str = "DELETE FROM used_jtis WHERE key IN \
     (SELECT key FROM used_jtis WHERE expires_at < ? LIMIT ?)";
const ACCOUNT_STATE: &str =
    "SELECT status = 'active', last_used_at FROM connected_accounts WHERE id = ?";
const ACCOUNT_TOUCH: &str = "UPDATE connected_accounts SET last_used_at = ? WHERE id = ?";
/// One more use of a quota slot, unless it is at its limit (then nothing changes).
const QUOTA_COUNT: &str = "INSERT INTO quota_counts (key, window_end, n) VALUES (?1, ?2, 1) \
     ON CONFLICT(key) DO UPDATE SET n = n + 1 WHERE n < ?3";
/// `last_used_at` is kept to this many seconds: rewriting the account's row on every release
/// would add a page to nearly every commit for a value nobody reads that finely.
const LAST_USED_RESOLUTION: i64 = 60;

pub(super) struct ReleaseJob {
    /// The configuration revision the release was decided at, if the caller used a cache.
    pub revision: Option<i64>,
    pub jtis: Vec<JtiUse>,
    pub quotas: Vec<QuotaUse>,
    /// The account whose token is released, if one is (an agent's own token has none).
    pub account_id: Option<String>,
    pub audit: AuditRecord,
    pub reply: oneshot::Sender<Result<(), ReleaseError>>,
}

/// How often the checkpointer copies the WAL back (passively: it never blocks anyone).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// A commit taking this long is logged (its releases' callers all waited for it).
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(100);

/// How long the writer waits for more releases when the batch is small under load…
const LINGER: std::time::Duration = std::time::Duration::from_micros(200);
/// …and how small is small.
const LINGER_BELOW: usize = 16;

/// Take what else is waiting, up to [`MAX_BATCH`].
fn drain(jobs: &Receiver<ReleaseJob>, batch: &mut Vec<ReleaseJob>) {
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Open the writer's connection to the (already migrated) database at `path` and start the
/// writer thread on `jobs`; it stops when every sender is gone (the store was dropped).
pub(super) fn spawn_writer(
    path: &Path,
    jobs: Receiver<ReleaseJob>,
    audit: AuditSettings,
) -> Result<(), StoreError> {
    let opened = |p: &Path| {
        super::reads::open(p, false)
            .map_err(|e| StoreError::Unavailable(format!("open {}: {e}", p.display())))
    };
    let conn = opened(path)?;
    // The WAL is copied back into the database file by a thread of its own, often, so the
    // writer's own automatic checkpoint (every 1,000 pages, inside a commit) finds little left
    // to copy: copying a whole megabytes-long WAL and syncing the file stalled every release
    // for 100–200 ms. The writer's checkpoint still runs, and still restarts the WAL.
    let (alive, writer_gone) = std::sync::mpsc::channel::<()>();
    let checkpointer = opened(path)?;
    std::thread::Builder::new()
        .name("latchkey-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                writer_gone.recv_timeout(CHECKPOINT_EVERY)
            {
                if let Err(e) = checkpointer.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("start the checkpointer: {e}")))?;
    std::thread::Builder::new()
        .name("latchkey-release".into())
        .spawn(move || {
            // Dropped with this thread: the checkpointer then stops too.
            let _alive = alive;
            let mut last_batch = 0;
            while let Ok(first) = jobs.recv() {
                let mut batch = vec![first];
                drain(&jobs, &mut batch);
                // Under concurrent load, a moment's wait fills the batch: fewer commits, each
                // writing its pages once for many releases. A lone request never waits.
                if last_batch > 1 && batch.len() < LINGER_BELOW {
                    #[allow(clippy::disallowed_methods)]
                    // the writer's own thread, not the runtime
                    std::thread::sleep(LINGER);
                    drain(&jobs, &mut batch);
                }
                last_batch = batch.len();
                let sink = audit.sink();
                let started = std::time::Instant::now();
                let outcomes = write_batch(&conn, &sink, &batch);
                let took = started.elapsed();
                metrics::histogram!("latchkey_release_batch_size").record(batch.len() as f64);
                metrics::histogram!("latchkey_release_commit_seconds").record(took.as_secs_f64());
                if took >= SLOW_COMMIT {
                    tracing::warn!(
                        releases = batch.len(),
                        ms = took.as_millis() as u64,
                        "a release commit was slow; every release in it waited"
                    );
                }
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
        })
        .map_err(|e| StoreError::Unavailable(format!("start the release writer: {e}")))?;
    Ok(())
}

/// One transaction for the batch; each job's outcome (all fail, and nothing of the batch is
/// kept, if the transaction itself fails).
fn write_batch(
    conn: &rusqlite::Connection,
    sink: &AuditSink,
    batch: &[ReleaseJob],
) -> Vec<Result<(), ReleaseError>> {
    match try_batch(conn, sink, batch) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            if !conn.is_autocommit() {
                // Best effort: if even this fails, the connection is unusable and every later
                // batch fails the same way.
                let _ = run(conn, "ROLLBACK");
            }
            let msg = e.to_string();
            batch
                .iter()
                .map(|_| Err(ReleaseError::Store(StoreError::Unavailable(msg.clone()))))
                .collect()
        }
    }
}

fn try_batch(
    conn: &rusqlite::Connection,
    sink: &AuditSink,
    batch: &[ReleaseJob],
) -> rusqlite::Result<Vec<Result<(), ReleaseError>>> {
    run(conn, "BEGIN IMMEDIATE")?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch {
        run(conn, "SAVEPOINT release")?;
        let outcome = release_one(conn, sink, job);
        if outcome.is_err() {
            // Fails if the error took the whole transaction with it (e.g. a full disk): then
            // nothing of the batch is kept.
            run(conn, "ROLLBACK TO release")?;
        }
        run(conn, "RELEASE release")?;
        outcomes.push(outcome);
    }
    // Expired `jti`s go here, a few per release, in the writer's own transaction: a separate
    // purge would take the write lock and stall releases behind it. Twice as many as the batch
    // consumed, so the table cannot grow under load; the minute purger takes what is left when
    // releases stop. `now` is the vault's clock (the releases' time), not this machine's.
    if let Some(now) = batch.iter().map(|j| j.audit.at).max() {
        let consumed: usize = batch.iter().map(|j| j.jtis.len()).sum();
        conn.prepare_cached(JTI_PURGE)?
            .execute(params![now, (2 * consumed).max(2) as i64])?;
    }
    run(conn, "COMMIT")?;
    Ok(outcomes)
}

fn run(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn release_one(
    conn: &rusqlite::Connection,
    sink: &AuditSink,
    job: &ReleaseJob,
) -> Result<(), ReleaseError> {
    if let Some(expected) = job.revision {
        let now: i64 = conn
            .prepare_cached(REVISION)
            .and_then(|mut q| q.query_row([], |r| r.get(0)))
            .map_err(sqlite)?;
        if now != expected {
            return Err(ReleaseError::Stale(now));
        }
    }
    let mut insert = conn.prepare_cached(JTI_INSERT).map_err(sqlite)?;
    for (i, j) in job.jtis.iter().enumerate() {
        if insert
            .execute(params![j.key, j.expires_at])
            .map_err(sqlite)?
            == 0
        {
            return Err(ReleaseError::Replay(i));
        }
    }
    if let Some(account_id) = &job.account_id {
        let state: Option<(bool, Option<i64>)> = conn
            .prepare_cached(ACCOUNT_STATE)
            .and_then(|mut q| {
                q.query_row([account_id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(sqlite)?;
        let Some((true, last_used)) = state else {
            return Err(ReleaseError::AccountInactive);
        };
        if last_used.is_none_or(|t| job.audit.at - t >= LAST_USED_RESOLUTION) {
            conn.prepare_cached(ACCOUNT_TOUCH)
                .and_then(|mut q| q.execute(params![job.audit.at, account_id]))
                .map_err(sqlite)?;
        }
    }
    let mut count = conn.prepare_cached(QUOTA_COUNT).map_err(sqlite)?;
    for (i, q) in job.quotas.iter().enumerate() {
        if q.limit == 0
            || count
                .execute(params![q.key, q.window_end, q.limit])
                .map_err(sqlite)?
                == 0
        {
            return Err(ReleaseError::QuotaReached(i));
        }
    }
    append_audit(conn, sink, &job.audit)?;
    Ok(())
}

/// [`insert_audit`] on the writer's connection: the same chain link, row and webhooks.
fn append_audit(
    conn: &rusqlite::Connection,
    sink: &AuditSink,
    a: &AuditRecord,
) -> Result<(), StoreError> {
    let last: Option<(i64, Option<String>)> = conn
        .prepare_cached(AUDIT_LAST)
        .and_then(|mut q| q.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(sqlite)?;
    let (seq, mac) = audit_link(sink, last, a)?;
    conn.prepare_cached(AUDIT_INSERT)
        .and_then(|mut q| {
            q.execute(params![
                seq,
                a.at,
                a.actor_type,
                a.actor_id,
                a.auth_method,
                a.subject_user,
                a.action,
                a.connection,
                a.account_id,
                a.agent_id,
                a.scopes,
                a.decision,
                a.reason,
                a.audit_context,
                a.request_id,
                a.client_ip,
                mac,
            ])
        })
        .map_err(sqlite)?;
    let entry_event = audit_entry_event(sink, seq, a, &mac);
    let mut outbox = conn.prepare_cached(OUTBOX_INSERT).map_err(sqlite)?;
    for n in a.notify.iter().chain(entry_event.as_ref()) {
        outbox
            .execute(params![n.event, n.body, a.at, a.at])
            .map_err(sqlite)?;
    }
    Ok(())
}
