//! Reads on the exchange's hot path, run on the caller's thread.
//!
//! Through sqlx, a query is a round trip to a connection's worker thread (a channel send, a
//! futex wake, context switches both ways), which costs far more than the indexed lookup
//! itself. The few reads every token exchange makes go instead through a small pool of
//! `rusqlite` connections, synchronously: in WAL mode a reader never waits for the writer, and
//! an indexed lookup takes microseconds, so it does not hold up the async runtime. The
//! connections are opened on demand (at most one per thread that reads at once) and are
//! read-only (`query_only`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{OpenFlags, OptionalExtension};

use super::*;

/// Idle connections kept, at most.
const MAX_IDLE: usize = 8;

#[derive(Debug)]
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl Readers {
    pub(super) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Run `f` on an idle connection (or a new one), then put the connection back.
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> StoreResult<T> {
        let idle = self.idle.lock().expect("reader pool lock").pop();
        let conn = match idle {
            Some(c) => c,
            None => open(&self.path, true).map_err(sqlite)?,
        };
        let out = f(&conn).map_err(sqlite);
        let mut idle = self.idle.lock().expect("reader pool lock");
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        out
    }

    /// The row `sql` finds for `key`, mapped by `map`.
    pub(super) fn find<T>(
        &self,
        sql: &str,
        key: &str,
        map: impl FnOnce(&rusqlite::Row<'_>) -> T,
    ) -> StoreResult<Option<T>> {
        self.read(|c| {
            c.prepare_cached(sql)?
                .query_row([key], |r| Ok(map(r)))
                .optional()
        })
    }
}

/// A connection to the existing (migrated, WAL) database at `path`, with the per-connection
/// settings every Latchkey connection has; `query_only` for readers.
pub(super) fn open(path: &Path, query_only: bool) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    if query_only {
        conn.execute_batch("PRAGMA query_only = ON;")?;
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

pub(super) fn sqlite(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A result row, whichever library read it: lets one function map a table's row to its type.
pub(super) trait Columns {
    fn text(&self, name: &str) -> String;
    fn opt_text(&self, name: &str) -> Option<String>;
    fn int(&self, name: &str) -> i64;
    fn opt_int(&self, name: &str) -> Option<i64>;
    fn blob(&self, name: &str) -> Vec<u8>;
    fn opt_blob(&self, name: &str) -> Option<Vec<u8>>;
}

impl Columns for SqliteRow {
    fn text(&self, name: &str) -> String {
        self.get(name)
    }
    fn opt_text(&self, name: &str) -> Option<String> {
        self.get(name)
    }
    fn int(&self, name: &str) -> i64 {
        self.get(name)
    }
    fn opt_int(&self, name: &str) -> Option<i64> {
        self.get(name)
    }
    fn blob(&self, name: &str) -> Vec<u8> {
        self.get(name)
    }
    fn opt_blob(&self, name: &str) -> Option<Vec<u8>> {
        self.get(name)
    }
}

/// Like sqlx's `Row::get`, a column that is missing or of the wrong type is a bug in the query
/// (the schema is ours), so it panics with the column's name.
impl Columns for rusqlite::Row<'_> {
    fn text(&self, name: &str) -> String {
        self.get(name)
            .unwrap_or_else(|e| panic!("column {name}: {e}"))
    }
    fn opt_text(&self, name: &str) -> Option<String> {
        self.get(name)
            .unwrap_or_else(|e| panic!("column {name}: {e}"))
    }
    fn int(&self, name: &str) -> i64 {
        self.get(name)
            .unwrap_or_else(|e| panic!("column {name}: {e}"))
    }
    fn opt_int(&self, name: &str) -> Option<i64> {
        self.get(name)
            .unwrap_or_else(|e| panic!("column {name}: {e}"))
    }
    fn blob(&self, name: &str) -> Vec<u8> {
        self.get(name)
            .unwrap_or_else(|e| panic!("column {name}: {e}"))
    }
    fn opt_blob(&self, name: &str) -> Option<Vec<u8>> {
        self.get(name)
            .unwrap_or_else(|e| panic!("column {name}: {e}"))
    }
}
