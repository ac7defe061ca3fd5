//! Configuration: defaults → `latchkey.toml` → `LATCHKEY_*` environment (secrets also as
//! `LATCHKEY_*_FILE`) → command-line flags. Unknown keys are an error, so typos are caught.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment_file_provider_adapter::FileAdapter;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: String,
    /// Where the database, keys and certificates live.
    pub data_dir: PathBuf,
    /// Serve plain HTTP (behind a TLS-terminating proxy). Requires `public_url`, unless local.
    pub http: bool,
    /// The public base URL, used as the issuer (`https://vault.example.com/`). Defaults to
    /// `https://{listen}/`.
    pub public_url: Option<String>,
    /// Operator-supplied certificate chain and key (PEM). Without them a local CA and a server
    /// certificate are generated into `{data_dir}/tls/`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The key-encryption key (base64 of 32 bytes). Default: the file `{data_dir}/kek`, created
    /// on first start. Prefer `LATCHKEY_KEK_FILE` to passing the key itself.
    pub kek: Option<String>,
    /// Defaults to `sqlite:{data_dir}/latchkey.db`.
    pub database_url: Option<String>,
    /// PostgreSQL: connections this node opens at most (an upstream refresh holds one for the
    /// provider call). Keep the sum over all nodes below the server's `max_connections`.
    pub database_pool_size: u32,
    /// Log filter (`info`, `latchkey=debug`, …).
    pub log: String,
    /// Deadline for every call to an upstream provider, in seconds.
    pub upstream_timeout_secs: u64,
    /// Lifetime of access tokens the built-in demo provider issues, in seconds.
    pub demo_access_token_ttl: i64,
    /// Token requests one agent may make per minute on this node; 0 means unlimited.
    pub agent_requests_per_minute: u32,
    /// Where signed webhooks (account health) are POSTed; https, or http on a loopback host.
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key that signs webhooks (at least 32 characters). Prefer
    /// `LATCHKEY_WEBHOOK_SECRET_FILE`.
    pub webhook_secret: Option<String>,
    /// Delete audit entries older than this many days (after signing a checkpoint that covers
    /// them); 0 keeps everything.
    pub audit_retention_days: u32,
    /// Also send every audit entry to `webhook_url` (event `audit.entry`), at least once,
    /// off the request path.
    pub audit_webhook: bool,
    /// Longest time an approval request (CIBA `requested_expiry`, or an exchange held for
    /// approval) waits for the user's decision, in seconds; also the default.
    pub approval_expiry_secs: i64,
    /// Seconds a client must wait between polls of a request (`interval`).
    pub approval_interval_secs: i64,
    /// Once approved, seconds in which it may be redeemed (and covers identical exchanges).
    pub approval_valid_secs: i64,
    /// Approving a high or critical request needs a TOTP code given within this many minutes.
    pub step_up_minutes: i64,
    /// Pending approval requests one user may have at a time (more: 429).
    pub approvals_pending_per_user: i64,
    /// Pending approval requests one agent may have at a time (more: 429).
    pub approvals_pending_per_agent: i64,
    /// Largest request body an agent may send through `/proxy` (bytes; more: 413).
    pub proxy_max_request_bytes: usize,
    /// Largest answer a provider may send back through `/proxy` (bytes; more is cut).
    pub proxy_max_response_bytes: u64,
    /// Deadline for a whole call through `/proxy`, answer included, in seconds.
    pub proxy_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8750".into(),
            data_dir: PathBuf::from("./latchkey-data"),
            http: false,
            public_url: None,
            tls_cert: None,
            tls_key: None,
            kek: None,
            database_url: None,
            database_pool_size: 10,
            log: "info".into(),
            upstream_timeout_secs: 10,
            demo_access_token_ttl: 300,
            agent_requests_per_minute: 0,
            webhook_url: None,
            webhook_secret: None,
            audit_retention_days: 0,
            audit_webhook: false,
            approval_expiry_secs: 300,
            approval_interval_secs: 5,
            approval_valid_secs: 300,
            step_up_minutes: 5,
            approvals_pending_per_user: 10,
            approvals_pending_per_agent: 20,
            proxy_max_request_bytes: 10 * 1024 * 1024,
            proxy_max_response_bytes: 50 * 1024 * 1024,
            proxy_timeout_secs: 60,
        }
    }
}

impl Config {
    /// Load from `file` (default `latchkey.toml`, skipped if absent) and the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let path = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("latchkey.toml"));
        if file.is_some() && !path.exists() {
            return Err(Box::new(figment::Error::from(format!(
                "config file {} does not exist",
                path.display()
            ))));
        }
        Figment::new()
            .merge(Serialized::defaults(Config::default()))
            .merge(FileAdapter::wrap(Toml::file(&path)).only(&["kek", "webhook_secret"]))
            .merge(FileAdapter::wrap(Env::prefixed("LATCHKEY_")).only(&["kek", "webhook_secret"]))
            .extract()
            .map_err(Box::new)
    }

    /// The webhook destination and key, checked: both or neither.
    pub fn webhook(&self) -> Result<Option<(String, String)>, String> {
        if self.audit_webhook && self.webhook_url.is_none() {
            return Err("audit_webhook needs webhook_url".into());
        }
        match (&self.webhook_url, &self.webhook_secret) {
            (None, None) => Ok(None),
            (Some(url), Some(secret)) => {
                latchkey_core::catalog::check_url("webhook_url", url)?;
                if secret.trim().len() < 32 {
                    return Err("webhook_secret must be at least 32 characters".into());
                }
                Ok(Some((url.clone(), secret.trim().to_owned())))
            }
            (Some(_), None) => {
                Err("webhook_url needs webhook_secret (or LATCHKEY_WEBHOOK_SECRET_FILE)".into())
            }
            (None, Some(_)) => Err("webhook_secret is set but webhook_url is not".into()),
        }
    }

    /// The approval settings, checked.
    pub fn approvals(&self) -> Result<latchkey_core::vault::ApprovalSettings, String> {
        let positive = [
            ("approval_expiry_secs", self.approval_expiry_secs),
            ("approval_interval_secs", self.approval_interval_secs),
            ("approval_valid_secs", self.approval_valid_secs),
            (
                "approvals_pending_per_user",
                self.approvals_pending_per_user,
            ),
            (
                "approvals_pending_per_agent",
                self.approvals_pending_per_agent,
            ),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v < 1) {
            return Err(format!("{name} must be at least 1"));
        }
        if self.step_up_minutes < 0 {
            return Err("step_up_minutes must not be negative".into());
        }
        Ok(latchkey_core::vault::ApprovalSettings {
            default_expiry: self.approval_expiry_secs,
            max_expiry: self.approval_expiry_secs,
            interval: self.approval_interval_secs,
            valid_for: self.approval_valid_secs,
            step_up_minutes: self.step_up_minutes,
            pending_per_user: self.approvals_pending_per_user,
            pending_per_agent: self.approvals_pending_per_agent,
        })
    }

    /// The database: the SQLite file (default `{data_dir}/latchkey.db`), or a PostgreSQL URL.
    pub fn database(&self) -> Result<Database, String> {
        match &self.database_url {
            None => Ok(Database::Sqlite(self.data_dir.join("latchkey.db"))),
            Some(_) if self.database_pool_size < 1 => {
                Err("database_pool_size must be at least 1".into())
            }
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Database::Postgres(url.clone()))
            }
            Some(url) => url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .map(|p| Database::Sqlite(PathBuf::from(p)))
                .ok_or_else(|| {
                    "unsupported database_url: use sqlite:PATH or postgres://USER@HOST:PORT/DB"
                        .to_owned()
                }),
        }
    }
}

/// Where the data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    /// A `postgres://` URL (it may hold a password: never print it whole).
    Postgres(String),
}

impl Database {
    /// How to name it in messages: the SQLite path, or the PostgreSQL host and database
    /// without credentials.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(p) => p.display().to_string(),
            Database::Postgres(url) => url::Url::parse(url)
                .map(|u| {
                    format!(
                        "postgres://{}:{}{}",
                        u.host_str().unwrap_or("?"),
                        u.port().unwrap_or(5432),
                        u.path()
                    )
                })
                .unwrap_or_else(|_| "postgres (unparsable URL)".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn layering_and_file_secrets() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "latchkey.toml",
                "listen = \"127.0.0.1:9000\"\nlog = \"debug\"",
            )?;
            jail.create_file("kek.txt", "c2VjcmV0")?;
            jail.set_env("LATCHKEY_LOG", "warn");
            jail.set_env("LATCHKEY_KEK_FILE", "kek.txt");
            let c = Config::load(None).map_err(|e| *e)?;
            assert_eq!(c.listen, "127.0.0.1:9000");
            assert_eq!(c.log, "warn", "environment beats the file");
            assert_eq!(c.kek.as_deref(), Some("c2VjcmV0"));
            jail.create_file("hook.secret", &"s".repeat(40))?;
            jail.set_env("LATCHKEY_WEBHOOK_URL", "https://hooks.example/latchkey");
            jail.set_env("LATCHKEY_WEBHOOK_SECRET_FILE", "hook.secret");
            let c = Config::load(None).map_err(|e| *e)?;
            assert_eq!(
                c.webhook().unwrap(),
                Some(("https://hooks.example/latchkey".into(), "s".repeat(40)))
            );
            jail.create_file("bad.toml", "lsiten = \"x\"")?;
            assert!(
                Config::load(Some(Path::new("bad.toml"))).is_err(),
                "unknown keys are refused"
            );
            Ok(())
        });
    }

    #[test]
    fn webhook_settings_are_checked() {
        let with = |url: Option<&str>, secret: Option<&str>| Config {
            webhook_url: url.map(Into::into),
            webhook_secret: secret.map(Into::into),
            ..Config::default()
        };
        let long = "k".repeat(32);
        assert_eq!(with(None, None).webhook(), Ok(None));
        assert!(
            with(Some("http://127.0.0.1:9/h"), Some(&long))
                .webhook()
                .is_ok()
        );
        for (url, secret, why) in [
            (Some("http://hooks.example/h"), Some(long.as_str()), "https"),
            (
                Some("https://hooks.example/h"),
                Some("short"),
                "32 characters",
            ),
            (
                Some("https://hooks.example/h"),
                None,
                "needs webhook_secret",
            ),
            (None, Some(long.as_str()), "webhook_url is not"),
            (Some("not a url"), Some(long.as_str()), "not a URL"),
        ] {
            let err = with(url, secret).webhook().unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
