//! Where the key-encryption key comes from: `kek` / `LATCHKEY_KEK` / `LATCHKEY_KEK_FILE`, or
//! the file `{data_dir}/kek` (mode 0600), created together with a fresh database. A database
//! without its key stays sealed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use latchkey_crypto::envelope::Kek;

use crate::config::Config;

pub type Reloader = Box<dyn Fn() -> Option<Kek> + Send + Sync>;

pub fn kek_path(config: &Config) -> PathBuf {
    config.data_dir.join("kek")
}

/// Load (or, for a new database, create) the KEK. `database_is_new`: nothing is stored yet
/// (no SQLite file; no data keys in PostgreSQL), so a missing key file may be created; an
/// existing database without its key stays sealed. The reloader re-reads a key file after
/// another process rotated it.
pub fn load(
    config: &Config,
    database_is_new: bool,
    database: &str,
) -> Result<(Kek, Option<Reloader>)> {
    if let Some(text) = &config.kek {
        let kek = Kek::decode(text)
            .context("the configured KEK (LATCHKEY_KEK / kek) is not base64 of 32 bytes")?;
        return Ok((kek, None));
    }
    let path = kek_path(config);
    if !path.exists() {
        if !database_is_new {
            bail!(
                "sealed: the database {database} exists but its key file {} does not. Restore the key file, or set \
                 LATCHKEY_KEK_FILE to it (every node of a PostgreSQL deployment needs the same key)",
                path.display()
            );
        }
        let kek = Kek::generate();
        crate::tls::write_private(&path, kek.encode().as_bytes())?;
        tracing::info!(path = %path.display(), "created a new key-encryption key; back it up with the database");
    }
    let read = |p: &Path| -> Result<Kek> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        Kek::decode(&text).with_context(|| format!("{} is not a Latchkey key file", p.display()))
    };
    let kek = read(&path)?;
    let reload_path = path.clone();
    Ok((kek, Some(Box::new(move || read(&reload_path).ok()))))
}
