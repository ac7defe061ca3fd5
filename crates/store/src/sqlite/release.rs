//! Group commit for token releases: the hot path's only write.
//!
//! Every release consumes its `jti`s, re-checks the account and appends its audit entry, and
//! must be durable (`synchronous=FULL`) before the token leaves. One transaction per release
//! would make the disk's fsync rate the ceiling of the exchange rate. Instead, one task takes
//! the releases waiting at that moment and writes them in one transaction, each inside its own
//! savepoint (so a replayed `jti` or a revoked account undoes only that release), then commits
//! once and answers each. A release is answered only after the commit that holds it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::*;

/// Releases written per transaction, at most.
const MAX_BATCH: usize = 256;

pub(super) struct ReleaseJob {
    pub jtis: Vec<JtiUse>,
    pub account_id: String,
    pub audit: AuditRecord,
    pub reply: oneshot::Sender<Result<(), ReleaseError>>,
}

/// Start the writer; it stops when every sender is gone (the store was dropped).
pub(super) fn spawn_writer(
    pool: SqlitePool,
    key: Arc<RwLock<Option<Arc<AuditKey>>>>,
    webhook: Arc<AtomicBool>,
) -> mpsc::UnboundedSender<ReleaseJob> {
    let (tx, mut rx) = mpsc::unbounded_channel::<ReleaseJob>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let sink = AuditSink {
                key: key.read().expect("audit key lock").clone(),
                webhook: webhook.load(Ordering::Relaxed),
            };
            let outcomes = write_batch(&pool, &sink, &batch).await;
            metrics::histogram!("latchkey_release_batch_size").record(batch.len() as f64);
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
        }
    });
    tx
}

/// One transaction for the batch; each job's outcome (all fail if the commit does).
async fn write_batch(
    pool: &SqlitePool,
    sink: &AuditSink,
    batch: &[ReleaseJob],
) -> Vec<Result<(), ReleaseError>> {
    let failed = |e: &StoreError| {
        (0..batch.len())
            .map(|_| Err(ReleaseError::Store(StoreError::Unavailable(e.to_string()))))
            .collect()
    };
    let mut tx = match pool.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => return failed(&unavailable(e)),
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch {
        let step = async {
            sqlx::query("SAVEPOINT release")
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            let outcome = release_one(&mut tx, sink, job).await;
            let end = if outcome.is_ok() {
                "RELEASE release"
            } else {
                "ROLLBACK TO release; RELEASE release"
            };
            sqlx::raw_sql(end)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            Ok::<_, StoreError>(outcome)
        };
        match step.await {
            Ok(outcome) => outcomes.push(outcome),
            // The transaction itself is in trouble: nothing of the batch is kept.
            Err(e) => return failed(&e),
        }
    }
    if let Err(e) = tx.commit().await {
        return failed(&unavailable(e));
    }
    outcomes
}

async fn release_one(
    tx: &mut Transaction<'static, Sqlite>,
    sink: &AuditSink,
    job: &ReleaseJob,
) -> Result<(), ReleaseError> {
    for (i, j) in job.jtis.iter().enumerate() {
        let n = sqlx::query(
            "INSERT INTO used_jtis (key, expires_at) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
        )
        .bind(&j.key)
        .bind(j.expires_at)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        if n == 0 {
            return Err(ReleaseError::Replay(i));
        }
    }
    let n = sqlx::query(
        "UPDATE connected_accounts SET last_used_at = ? WHERE id = ? AND status = 'active'",
    )
    .bind(job.audit.at)
    .bind(&job.account_id)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?
    .rows_affected();
    if n == 0 {
        return Err(ReleaseError::AccountInactive);
    }
    insert_audit(tx, sink, &job.audit).await?;
    Ok(())
}
