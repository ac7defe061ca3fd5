//! `latchkey backup --out FILE`: an online, consistent copy of the SQLite database, safe while
//! the server runs and writes.
//!
//! 1. SQLite's online backup API copies every page of the database in one step, that is in
//!    one read transaction: the copy is the database as of one commit. In WAL mode a reader
//!    never blocks the writer, so the server keeps answering meanwhile. (Copying in several
//!    steps would restart whenever another connection writes, and might never finish under
//!    load.) It goes to a hidden file beside FILE, created mode 0600.
//! 2. The copy is checked: `PRAGMA integrity_check`, then a throwaway duplicate of it is
//!    opened as a vault with this deployment's key-encryption key, and its audit chain is
//!    verified (as `latchkey audit verify` does). The duplicate, not the copy itself, because
//!    opening a database through the store migrates it and switches it to WAL: the backup
//!    stays exactly the bytes the backup API wrote.
//! 3. Only then the copy is synced and renamed to FILE.
//!
//! The backup holds ciphertexts only. The key-encryption key never enters the database, so it
//! is not in the backup: without it the backup opens nothing, and the operator must keep the
//! key file safe separately. PostgreSQL deployments use PostgreSQL's own tools.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use latchkey_server::config::{Config, Database};
use rusqlite::backup::StepResult;
use rusqlite::{Connection, OpenFlags};

#[derive(Args)]
pub struct BackupArgs {
    /// The file to write: a new file (an existing one is not overwritten), in a directory that
    /// exists. It is created mode 0600.
    #[arg(long)]
    out: PathBuf,
}

/// What the copy step saw.
struct Copied {
    pages: i32,
    bytes: u64,
    schema_version: i64,
}

pub async fn run(config: &Config, args: BackupArgs) -> Result<()> {
    let source = match config.database().map_err(anyhow::Error::msg)? {
        Database::Sqlite(path) => path,
        Database::Postgres(_) => bail!(
            "latchkey backup copies a SQLite database, and this deployment's database_url is \
             PostgreSQL ({}). Back it up with PostgreSQL's own tools: `pg_dump` for a logical \
             copy, or base backups with WAL archiving for point-in-time recovery (see \
             docs/operations.md). The key file is not in the database either way: back it up \
             separately.",
            config.database().map_err(anyhow::Error::msg)?.describe()
        ),
    };
    if !source.exists() {
        bail!("{} does not exist: nothing to back up", source.display());
    }
    let out = args.out;
    if out.exists() {
        bail!(
            "{} already exists; give a new file name (the backup never overwrites a file)",
            out.display()
        );
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let partial = tempfile::Builder::new()
        .prefix(".latchkey-backup-")
        .suffix(".partial")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;

    let (from, to) = (source.clone(), partial.path().to_path_buf());
    let copied = tokio::task::spawn_blocking(move || copy(&from, &to))
        .await
        .context("the backup thread failed")??;
    println!(
        "copied {} ({} pages, {} bytes, schema version {})",
        source.display(),
        copied.pages,
        copied.bytes,
        copied.schema_version
    );

    let verified = verify(config, partial.path(), &dir).await?;
    println!(
        "verified the copy: it opens with this deployment's key, and its audit chain verifies: \
         {} entries (last {})",
        verified.entries,
        verified.last_seq.map_or("none".into(), |s| s.to_string())
    );

    partial.as_file().sync_all().context("syncing the backup")?;
    partial
        .persist(&out)
        .with_context(|| format!("renaming the backup to {}", out.display()))?;
    // The rename itself is durable once the directory is synced.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    println!("backup written to {}", out.display());
    let key = if config.kek.is_some() {
        "the key-encryption key (LATCHKEY_KEK, LATCHKEY_KEK_FILE or `kek` in the configuration)"
            .to_owned()
    } else {
        format!(
            "the key file {}",
            latchkey_server::kek::kek_path(config).display()
        )
    };
    println!(
        "The backup holds only ciphertexts: {key} is NOT in it and is needed to restore it. \
         Back up the key separately, and store it apart from the backups (whoever holds both \
         can open every stored token)."
    );
    Ok(())
}

/// Copy `source` to the empty file `dest` with the online backup API, in one step, and check
/// the copy's integrity.
fn copy(source: &Path, dest: &Path) -> Result<Copied> {
    // Read-write without `CREATE`, like the server's own readers, with writes switched off: a
    // read-only connection to a WAL database needs its `-shm` file to exist already.
    let src = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", source.display()))?;
    src.busy_timeout(Duration::from_secs(10))?;
    src.execute_batch("PRAGMA query_only = ON;")?;
    let mut dst = Connection::open(dest).with_context(|| format!("opening {}", dest.display()))?;
    let pages = {
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)?;
        // -1: every page in one step, one read transaction (see the module docs). Busy or
        // locked means the step could not start; it is retried, for a while.
        let mut waited = Duration::ZERO;
        loop {
            match backup.step(-1).context("copying the database")? {
                StepResult::Done => break,
                StepResult::More => {}
                _ if waited >= Duration::from_secs(30) => {
                    bail!("the database stayed locked for 30 s; try again")
                }
                _ => {
                    // On the blocking thread `run` gave this copy, not on the runtime.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(Duration::from_millis(50));
                    waited += Duration::from_millis(50);
                }
            }
        }
        backup.progress().pagecount
    };
    drop(src);
    let check: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        bail!("the copy fails SQLite's integrity check: {check}");
    }
    let schema_version: i64 = dst
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .context("the database has no schema_migrations table: is it Latchkey's?")?;
    dst.close().map_err(|(_, e)| e)?;
    let bytes = std::fs::metadata(dest)?.len();
    Ok(Copied {
        pages,
        bytes,
        schema_version,
    })
}

/// Open a duplicate of the copy as a vault (this deployment's key) and verify its audit chain.
async fn verify(
    config: &Config,
    copy: &Path,
    dir: &Path,
) -> Result<latchkey_core::vault::AuditVerification> {
    let scratch = tempfile::Builder::new()
        .prefix(".latchkey-backup-verify-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a directory in {}", dir.display()))?;
    let duplicate = scratch.path().join("latchkey.db");
    std::fs::copy(copy, &duplicate).context("duplicating the copy for verification")?;
    let opened = Config {
        database_url: Some(format!("sqlite:{}", duplicate.display())),
        ..config.clone()
    };
    let vault = crate::admin_vault(&opened)
        .await
        .context("the copy does not open with this deployment's key")?;
    let verified = vault
        .verify_audit(None)
        .await
        .map_err(|e| anyhow::anyhow!("reading the copy's audit trail: {e}"))?
        .map_err(|b| {
            anyhow::anyhow!(
                "the copy's audit chain does not verify (entry {}: {}); no backup written",
                b.seq,
                b.why
            )
        })?;
    Ok(verified)
}
