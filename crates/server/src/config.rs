//! Configuration: defaults → `latchkey.toml` → `LATCHKEY_*` environment (secrets also as
//! `LATCHKEY_*_FILE`) → command-line flags. Unknown keys are an error, so typos are caught.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use figment_file_provider_adapter::FileAdapter;
use serde::{Deserialize, Serialize};

/// The server's configuration. `docs/configuration.md` is generated from this struct (its doc
/// comments and `Config::default()`); `LATCHKEY_BLESS=1 cargo test -p latchkey-server --lib
/// configuration_reference` rewrites it after a change here.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port to listen on, `HOST:PORT` (`0.0.0.0:8750` for every IPv4 interface,
    /// `[::]:8750` for IPv6). Also `--listen` on `latchkey serve` and `latchkey demo`. On a
    /// wildcard address, set `public_url`: the default issuer is built from the bound address.
    pub listen: String,
    /// Directory for what one node keeps on disk: the SQLite database `latchkey.db` (with its
    /// `-wal` and `-shm` files), the key file `kek`, and `tls/` with the generated local CA and
    /// server certificate (`latchkey demo` also writes `demo.json` and `demo-agent.key`).
    /// Created mode 0700 if missing. Also `--data-dir` on every command.
    pub data_dir: PathBuf,
    /// Serve plain HTTP instead of HTTPS, for running behind a TLS-terminating proxy. On a
    /// non-loopback address it requires `public_url` (the proxy's `https://` URL). Also
    /// `--http` on `latchkey serve` and `latchkey demo`.
    pub http: bool,
    /// The public base URL clients use, which is also the issuer identifier in tokens,
    /// discovery and assertions' `aud` (`https://vault.example.com/`; a trailing slash is
    /// added if missing). Unset: `https://{listen}/` (`http://` with `http`). Every node of a
    /// deployment must have the same one.
    pub public_url: Option<String>,
    /// PEM file with the server's certificate chain (leaf first), for HTTPS with the
    /// operator's own certificate; needs `tls_key`. Unset (both): a local CA is kept in
    /// `{data_dir}/tls/` (`ca.pem`, `ca-key.pem`) and signs a fresh server certificate for
    /// `localhost`, the loopback addresses and the issuer's host at every start.
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1); needs `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The key-encryption key that wraps the data keys: base64 of 32 random bytes. Unset: the
    /// file `{data_dir}/kek` (mode 0600), created together with a new database; an existing
    /// database without its key stays sealed (the server refuses to start). Prefer
    /// `LATCHKEY_KEK_FILE` (a file holding the key) to the key itself in the environment or
    /// the configuration file. It is never stored in the database or its backups: back it up
    /// separately. With this set, `latchkey key rotate --kek` refuses (rotate it where it is
    /// kept).
    #[schemars(extend("x-secret" = true))]
    pub kek: Option<String>,
    /// The database: `sqlite:PATH` (also `sqlite://PATH`), or
    /// `postgres://USER[:PASSWORD]@HOST:PORT/DATABASE` (also `postgresql://`; add
    /// `?sslmode=require` or `?sslmode=verify-full` for TLS). Unset:
    /// `sqlite:{data_dir}/latchkey.db`. With PostgreSQL the data directory keeps only the key
    /// file and certificates (`docs/postgres.md`).
    pub database_url: Option<String>,
    /// PostgreSQL: the most connections this node opens (an upstream refresh holds one for the
    /// provider call). At least 1. Keep the sum over all nodes below the server's
    /// `max_connections`.
    pub database_pool_size: u32,
    /// Log filter for `latchkey serve` and `latchkey demo`, in `tracing` `EnvFilter` syntax
    /// (`info`, `warn`, `latchkey_core=debug,info`). `RUST_LOG`, when set, wins. Logs go to
    /// standard error; administrative commands log at `warn`.
    pub log: String,
    /// Deadline for each call to an upstream provider's OAuth endpoints (code exchange,
    /// refresh, revocation), connecting included, in seconds.
    pub upstream_timeout_secs: u64,
    /// `latchkey demo` only: lifetime of the access tokens the built-in demo provider issues,
    /// in seconds.
    pub demo_access_token_ttl: i64,
    /// Token requests one agent may make per minute, counted per node in memory (a restart
    /// empties it); 0 means unlimited. Over it: `429 too_many_requests` with `Retry-After`.
    /// The grants' own quotas (`docs/policy.md`) are counted in the database instead.
    pub agent_requests_per_minute: u32,
    /// Where signed webhooks are POSTed (`account.needs_reauth`, `account.recovered`,
    /// `approval.requested`, `approval.decided`, and `audit.entry` with `audit_webhook`):
    /// `https://`, or `http://` on a loopback host. Needs `webhook_secret`. See
    /// `docs/webhooks.md`.
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key that signs webhooks, at least 32 characters (surrounding
    /// whitespace is trimmed). Needs `webhook_url`. Prefer `LATCHKEY_WEBHOOK_SECRET_FILE`.
    #[schemars(extend("x-secret" = true))]
    pub webhook_secret: Option<String>,
    /// Delete audit entries older than this many days, checked every minute: a signed
    /// checkpoint covering them is stored first, and an `audit.prune` entry records the cut.
    /// 0 keeps everything.
    pub audit_retention_days: u32,
    /// Also send every audit entry to `webhook_url` (event `audit.entry`), at least once, from
    /// an outbox written in the entry's own transaction; delivery never blocks a request.
    /// Needs `webhook_url`.
    pub audit_webhook: bool,
    /// Longest time an approval request waits for the user's decision, in seconds: the default
    /// for CIBA requests and exchanges held for approval, and the most a CIBA
    /// `requested_expiry` may ask. At least 1.
    pub approval_expiry_secs: i64,
    /// Seconds a client must wait between polls of an approval request (the `interval` it is
    /// told; faster polls get `slow_down`). At least 1.
    pub approval_interval_secs: i64,
    /// Once approved, seconds in which the request may be redeemed; a medium or high approval
    /// also covers identical exchanges for this long. At least 1.
    pub approval_valid_secs: i64,
    /// Approving a high or critical request needs a TOTP code given within this many minutes
    /// (otherwise the approvals page asks for one). 0 asks every time.
    pub step_up_minutes: i64,
    /// Pending approval requests one user may have at a time (more: 429). At least 1.
    pub approvals_pending_per_user: i64,
    /// Pending approval requests one agent may have at a time (more: 429). At least 1.
    pub approvals_pending_per_agent: i64,
    /// Largest request body an agent may send through `/proxy`, in bytes (more: 413, before
    /// anything goes to the provider).
    pub proxy_max_request_bytes: usize,
    /// Largest answer a provider may send back through `/proxy`, in bytes: a larger
    /// `Content-Length` is answered 502, a longer body without one is cut.
    pub proxy_max_response_bytes: u64,
    /// Deadline for a whole call through `/proxy`, answer included, in seconds (more: 504; at
    /// least 1).
    pub proxy_timeout_secs: u64,
    /// Networks or single addresses that outbound calls may reach although they are not
    /// public: CIDRs (`10.20.0.0/16`, `fd12:3456::/32`) or addresses (`192.168.1.7`, `::1`).
    /// Outbound calls are the providers' token, revocation and user-info endpoints, their
    /// APIs through `/proxy`, OpenID discovery, and webhooks; by default they refuse loopback,
    /// private, shared (CGNAT), link-local and cloud metadata addresses, multicast and
    /// reserved ranges, and IPv6 forms embedding such an IPv4 address, checked after the name
    /// is resolved (the connection goes to the checked address). Latchkey's own public URL is
    /// always reachable (the built-in demo provider is served there). List here a provider or
    /// webhook receiver on a private network. In the environment, a TOML list:
    /// `LATCHKEY_OUTBOUND_ALLOW='["10.20.0.0/16", "192.168.1.7"]'`. See `docs/threat-model.md`.
    pub outbound_allow: Vec<String>,
    /// Let outbound calls reach every address, loopback and cloud metadata included: the guard
    /// of `outbound_allow` is off. For a trusted network only; prefer listing what is needed in
    /// `outbound_allow`.
    pub outbound_allow_private: bool,
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
            outbound_allow: Vec::new(),
            outbound_allow_private: false,
        }
    }
}

/// `LATCHKEY_*` variables that belong to the command line, not to this configuration: the
/// configuration file's path and the agent-side commands' settings (`latchkey token`,
/// `latchkey mcp`, the upstream client secret of `connection add`), and the test suite's.
/// They are not configuration keys, so the unknown-key check must not trip over them when
/// an operator's shell exports them.
pub const COMMAND_LINE_ENV: &[&str] = &[
    "CONFIG",
    "CLIENT_SECRET",
    "ISSUER",
    "CLIENT_ID",
    "AGENT_KEY",
    "USER",
    "CA_CERT",
    "BLESS",
    "TEST_PG_URL",
    // The adversarial request corpus (`crates/cli/tests/it/corpus.rs`, `scripts/corpus`).
    "CORPUS_SEED",
    "CORPUS_LONG",
    "CORPUS_REQUESTS",
];

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
            .merge(
                FileAdapter::wrap(Env::prefixed("LATCHKEY_").ignore(COMMAND_LINE_ENV))
                    .only(&["kek", "webhook_secret"]),
            )
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

    /// What outbound calls may reach (`outbound_allow`, `outbound_allow_private`), checked,
    /// with Latchkey's own origin (`issuer`) trusted.
    pub fn outbound(
        &self,
        issuer: &str,
    ) -> Result<latchkey_upstream::guard::OutboundPolicy, String> {
        latchkey_upstream::guard::OutboundPolicy::new(
            self.outbound_allow_private,
            &self.outbound_allow,
        )
        .map_err(|e| format!("outbound_allow: {e}"))?
        .trust_origin(issuer)
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
            // The command line's own variables are not configuration, and not typos.
            for name in COMMAND_LINE_ENV {
                assert!(
                    INTRO.contains(&format!("`LATCHKEY_{name}`")),
                    "{name} documented"
                );
                jail.set_env(format!("LATCHKEY_{name}"), "x");
            }
            let c = Config::load(None).map_err(|e| *e)?;
            assert_eq!(c.log, "warn");
            jail.set_env("LATCHKEY_LSITEN", "127.0.0.1:1");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("lsiten"),
                "a typo in the environment is refused: {err}"
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

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn outbound_settings_load_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            let issuer = "https://127.0.0.1:8750/";
            let c = Config::load(None).map_err(|e| *e)?;
            let policy = c.outbound(issuer).unwrap();
            assert!(
                policy.check_ip("127.0.0.1".parse().unwrap()).is_err(),
                "default: block"
            );
            jail.create_file("o.toml", "outbound_allow = [\"192.168.1.7\"]")?;
            let c = Config::load(Some(Path::new("o.toml"))).map_err(|e| *e)?;
            assert_eq!(c.outbound_allow, ["192.168.1.7"]);
            jail.set_env("LATCHKEY_OUTBOUND_ALLOW", r#"["10.20.0.0/16", "::1"]"#);
            let c = Config::load(None).map_err(|e| *e)?;
            assert_eq!(c.outbound_allow, ["10.20.0.0/16", "::1"]);
            let policy = c.outbound(issuer).unwrap();
            assert!(policy.check_ip("10.20.1.2".parse().unwrap()).is_ok());
            assert!(policy.check_ip("10.21.1.2".parse().unwrap()).is_err());
            assert!(policy.check_ip("::1".parse().unwrap()).is_ok());
            jail.set_env("LATCHKEY_OUTBOUND_ALLOW", r#"["10.20.0.1/16"]"#);
            let err = Config::load(None)
                .map_err(|e| *e)?
                .outbound(issuer)
                .unwrap_err();
            assert!(err.starts_with("outbound_allow: "), "{err}");
            jail.set_env("LATCHKEY_OUTBOUND_ALLOW", "[]");
            jail.set_env("LATCHKEY_OUTBOUND_ALLOW_PRIVATE", "true");
            let c = Config::load(None).map_err(|e| *e)?;
            let policy = c.outbound(issuer).unwrap();
            assert!(policy.check_ip("169.254.169.254".parse().unwrap()).is_ok());
            Ok(())
        });
    }

    // --- docs/configuration.md, generated from this struct ----------------------------------

    /// How the reference groups the keys; a key in no group is listed under "Other keys", so
    /// a new key never goes missing from the page.
    const SECTIONS: &[(&str, &[&str])] = &[
        (
            "Listening and TLS",
            &["listen", "public_url", "http", "tls_cert", "tls_key"],
        ),
        (
            "Storage and keys",
            &["data_dir", "database_url", "database_pool_size", "kek"],
        ),
        (
            "Providers",
            &["upstream_timeout_secs", "demo_access_token_ttl"],
        ),
        (
            "Outbound calls",
            &["outbound_allow", "outbound_allow_private"],
        ),
        (
            "Agents and the proxy",
            &[
                "agent_requests_per_minute",
                "proxy_max_request_bytes",
                "proxy_max_response_bytes",
                "proxy_timeout_secs",
            ],
        ),
        (
            "Approvals",
            &[
                "approval_expiry_secs",
                "approval_interval_secs",
                "approval_valid_secs",
                "step_up_minutes",
                "approvals_pending_per_user",
                "approvals_pending_per_agent",
            ],
        ),
        (
            "Webhooks and the audit trail",
            &[
                "webhook_url",
                "webhook_secret",
                "audit_webhook",
                "audit_retention_days",
            ],
        ),
        ("Logging", &["log"]),
    ];

    const INTRO: &str = "\
# Configuration reference

<!-- Generated from `Config` in crates/server/src/config.rs (its doc comments and
`Config::default()`). Do not edit by hand: change the doc comments, then run
`LATCHKEY_BLESS=1 cargo test -p latchkey-server --lib configuration_reference`. -->

Every key of the server's configuration, as `latchkey serve`, `latchkey demo` and the
administrative commands read it. Each value comes from the first of these that sets it:

1. **command-line flags**: `--data-dir DIR` (a global flag), `--listen ADDR` and `--http`
   (`serve` and `demo`);
2. **environment variables** `LATCHKEY_<KEY>`: the key in capitals (`LATCHKEY_DATABASE_URL`).
   Secrets can also be read from a file: `LATCHKEY_<KEY>_FILE=/path` (the file's contents
   are the value), which keeps them out of the process environment;
3. **the configuration file**, TOML: `latchkey.toml` in the working directory when it exists,
   or the file given with `--config FILE` (which must exist). Secrets there can be
   `<key>_file = \"/path\"` as well;
4. **the defaults** below.

An unknown key is an error, in the file and in the environment alike: any variable that
starts with `LATCHKEY_` must name a key below (typos are caught, not ignored), or be one of
the command line's own: `LATCHKEY_CONFIG` (the file, as `--config`), `LATCHKEY_CLIENT_SECRET`
(`connection add`), the agent-side `LATCHKEY_ISSUER`, `LATCHKEY_CLIENT_ID`,
`LATCHKEY_AGENT_KEY`, `LATCHKEY_USER` and `LATCHKEY_CA_CERT` (`latchkey token`, `latchkey
mcp`), and the test suite's `LATCHKEY_BLESS`, `LATCHKEY_TEST_PG_URL`, `LATCHKEY_CORPUS_SEED`,
`LATCHKEY_CORPUS_LONG` and `LATCHKEY_CORPUS_REQUESTS`.

```toml
# /etc/latchkey/latchkey.toml
listen = \"0.0.0.0:8750\"
public_url = \"https://vault.example.com/\"
data_dir = \"/var/lib/latchkey\"
tls_cert = \"/etc/latchkey/tls/fullchain.pem\"
tls_key = \"/etc/latchkey/tls/key.pem\"
webhook_url = \"https://hooks.example.com/latchkey\"
webhook_secret_file = \"/etc/latchkey/webhook.secret\"
```
";

    fn markdown_value(key: &str, v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Null => "unset".into(),
            serde_json::Value::String(s) => format!("`\"{s}\"`"),
            serde_json::Value::Number(n) => {
                let mib = n
                    .as_u64()
                    .filter(|b| key.ends_with("_bytes") && b % (1 << 20) == 0);
                match mib {
                    Some(b) => format!("`{n}` ({} MiB)", b >> 20),
                    None => format!("`{n}`"),
                }
            }
            other => format!("`{other}`"),
        }
    }

    fn markdown_type(p: &serde_json::Value) -> String {
        let types: Vec<&str> = match &p["type"] {
            serde_json::Value::String(t) => vec![t.as_str()],
            serde_json::Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
            _ => vec![],
        };
        let optional = types.contains(&"null");
        let base = types
            .iter()
            .find(|t| **t != "null")
            .copied()
            .unwrap_or("any");
        let base = match (base, p["minimum"].as_f64()) {
            ("integer", Some(0.0)) => "integer ≥ 0".to_owned(),
            ("array", _) if p["items"]["type"] == "string" => "list of strings".to_owned(),
            (t, _) => t.to_owned(),
        };
        if optional {
            format!("{base}, optional")
        } else {
            base
        }
    }

    /// The Markdown reference for `Config`.
    fn configuration_markdown() -> String {
        let schema = serde_json::to_value(schemars::schema_for!(Config)).expect("schema");
        let properties = schema["properties"].as_object().expect("properties");
        let defaults = serde_json::to_value(Config::default()).expect("defaults");
        let mut sections: Vec<(&str, Vec<&str>)> = SECTIONS
            .iter()
            .map(|(title, keys)| {
                let known = keys.iter().copied().filter(|k| properties.contains_key(*k));
                (*title, known.collect())
            })
            .collect();
        let grouped: Vec<&str> = SECTIONS
            .iter()
            .flat_map(|(_, k)| k.iter().copied())
            .collect();
        let other: Vec<&str> = properties
            .keys()
            .map(String::as_str)
            .filter(|k| !grouped.contains(k))
            .collect();
        if !other.is_empty() {
            sections.push(("Other keys", other));
        }

        let env = |key: &str, p: &serde_json::Value| {
            let name = format!("LATCHKEY_{}", key.to_uppercase());
            if p["x-secret"] == serde_json::Value::Bool(true) {
                format!("`{name}`, `{name}_FILE`")
            } else {
                format!("`{name}`")
            }
        };
        let mut out = String::from(INTRO);
        out.push_str(
            "\n## All keys\n\n| key | type | default | environment |\n|---|---|---|---|\n",
        );
        for (_, keys) in &sections {
            for key in keys {
                let p = &properties[*key];
                out.push_str(&format!(
                    "| [`{key}`](#{key}) | {} | {} | {} |\n",
                    markdown_type(p),
                    markdown_value(key, &defaults[*key]),
                    env(key, p)
                ));
            }
        }
        for (title, keys) in &sections {
            out.push_str(&format!("\n## {title}\n"));
            for key in keys {
                let p = &properties[*key];
                let text: Vec<&str> = ["title", "description"]
                    .iter()
                    .filter_map(|f| p[*f].as_str())
                    .collect();
                out.push_str(&format!(
                    "\n### `{key}`\n\n{}; default {}; environment {}.\n\n{}\n",
                    markdown_type(p),
                    markdown_value(key, &defaults[*key]),
                    env(key, p),
                    text.join("\n\n")
                ));
            }
        }
        out
    }

    /// `docs/configuration.md` is what operators read; CI fails when it and the struct
    /// disagree. `LATCHKEY_BLESS=1` rewrites it from the code. (Run it with the filter below:
    /// the other tests here read the environment, and `LATCHKEY_BLESS` is no configuration
    /// key.)
    #[test]
    fn configuration_reference_matches_docs() {
        let built = configuration_markdown();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
        if std::env::var_os("LATCHKEY_BLESS").is_some_and(|v| v == "1") {
            std::fs::write(&path, &built).expect("write docs/configuration.md");
            return;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == built,
            "docs/configuration.md is out of date with `Config` in crates/server/src/config.rs. \
             Review the change, then run \
             `LATCHKEY_BLESS=1 cargo test -p latchkey-server --lib configuration_reference` \
             to rewrite it."
        );
    }

    #[test]
    fn configuration_reference_documents_every_key() {
        let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap();
        let properties = schema["properties"].as_object().unwrap();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let documented: Vec<&str> = SECTIONS
            .iter()
            .flat_map(|(_, k)| k.iter().copied())
            .collect();
        for (key, p) in properties {
            assert!(
                p["description"].as_str().is_some_and(|d| d.len() > 20),
                "`{key}` needs a doc comment: it becomes its entry in docs/configuration.md"
            );
            assert!(defaults.get(key).is_some(), "`{key}` has no default");
            assert!(
                documented.contains(&key.as_str()),
                "`{key}` is in no section of SECTIONS (it would be listed under \"Other keys\")"
            );
        }
        for key in documented {
            assert!(
                properties.contains_key(key),
                "SECTIONS names `{key}`, which is no key"
            );
        }
    }

    /// The keys the reference marks as secrets are exactly those that load from
    /// `LATCHKEY_<KEY>_FILE` and `<key>_file`.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API
    fn secrets_and_only_secrets_load_from_files() {
        let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap();
        let properties = schema["properties"].as_object().unwrap().clone();
        for (key, p) in &properties {
            let secret = p["x-secret"] == serde_json::Value::Bool(true);
            for how in ["env", "toml"] {
                figment::Jail::expect_with(|jail| {
                    jail.create_file("value.txt", "a-value-from-a-file")?;
                    let loaded = if how == "env" {
                        jail.set_env(format!("LATCHKEY_{}_FILE", key.to_uppercase()), "value.txt");
                        Config::load(None)
                    } else {
                        jail.create_file("file.toml", &format!("{key}_file = \"value.txt\""))?;
                        Config::load(Some(Path::new("file.toml")))
                    };
                    match loaded {
                        Ok(c) => {
                            assert!(
                                secret,
                                "{key} loads from a file ({how}) but is not marked x-secret"
                            );
                            let value = serde_json::to_value(&c).unwrap()[key.as_str()].clone();
                            assert_eq!(value, "a-value-from-a-file", "{key} ({how})");
                        }
                        Err(e) => assert!(
                            !secret,
                            "{key} is marked x-secret but a file ({how}) failed: {e}"
                        ),
                    }
                    Ok(())
                });
            }
        }
    }
}
