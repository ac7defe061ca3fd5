//! The Latchkey server: configuration, TLS, storage and key loading, and the HTTP surface.
//!
//! - [`config`] — layered configuration;
//! - [`tls`] — the local CA or operator certificates;
//! - [`demo`] — seeding the demo user, connection and agent for `latchkey demo`;
//! - `http` — the axum router: thin handlers over [`latchkey_core::Vault`], one error-to-HTTP
//!   module, metrics and security headers.
//!
//! [`Server::bind`] / [`Server::with_listener`] prepare everything (a wrong key refuses here,
//! before anything listens for requests); [`Server::run`] serves until the future it is given
//! completes.

pub mod config;
pub mod demo;
mod http;
pub mod kek;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use config::Database;
use latchkey_core::clock::Clock;
use latchkey_core::store::Store;
use latchkey_core::{Vault, VaultConfig};
use latchkey_demo::{DemoConfig, DemoProvider};
use latchkey_store::{PgStore, SqliteStore};
use latchkey_upstream::{HttpUpstream, UpstreamOptions};
use tokio::net::TcpListener;

pub use config::Config;

/// Options that are not configuration: how this process runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// Mount the built-in demo provider under `/demo`.
    pub demo: bool,
    pub clock: Arc<dyn Clock>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            demo: false,
            clock: Arc::new(latchkey_core::clock::SystemClock),
        }
    }
}

/// A prepared server: unsealed vault, TLS, router, bound listener.
pub struct Server {
    pub vault: Arc<Vault>,
    pub issuer: String,
    /// The local CA certificate to trust, when Latchkey generated it.
    pub ca_path: Option<PathBuf>,
    pub demo: Option<DemoProvider>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    audit_retention_days: u32,
}

/// The issuer for a server listening on `addr`.
pub fn issuer_for(config: &Config, addr: SocketAddr) -> String {
    match &config.public_url {
        Some(u) if u.ends_with('/') => u.clone(),
        Some(u) => format!("{u}/"),
        None => {
            let scheme = if config.http { "http" } else { "https" };
            format!("{scheme}://{addr}/")
        }
    }
}

/// Open the store and unseal the vault (shared by the server and the CLI's admin commands).
pub async fn open_vault(
    config: &Config,
    issuer: &str,
    clock: Arc<dyn Clock>,
    extra_root_pem: Option<Vec<u8>>,
) -> Result<Arc<Vault>> {
    create_private_dir(&config.data_dir)?;
    let database = config.database().map_err(anyhow::Error::msg)?;
    let described = database.describe();
    let (store, database_is_new): (Arc<dyn Store>, bool) = match &database {
        Database::Sqlite(path) => {
            let new = !path.exists();
            let store = SqliteStore::open(path)
                .await
                .with_context(|| format!("opening {described}"))?;
            (Arc::new(store), new)
        }
        Database::Postgres(url) => {
            let store = PgStore::connect(url, config.database_pool_size)
                .await
                .with_context(|| format!("opening {described}"))?;
            let new = store.data_keys().await?.is_empty();
            (Arc::new(store), new)
        }
    };
    let (kek, reload) = kek::load(config, database_is_new, &described)?;
    let mut vault_config = VaultConfig::new(issuer);
    vault_config.agent_requests_per_minute = config.agent_requests_per_minute;
    vault_config.approvals = config.approvals().map_err(anyhow::Error::msg)?;
    vault_config.webhook = config
        .webhook()
        .map_err(anyhow::Error::msg)?
        .map(|(url, secret)| latchkey_core::vault::WebhookConfig {
            url,
            secret: secret.into(),
            audit_entries: config.audit_webhook,
        });
    let upstream = HttpUpstream::new(UpstreamOptions {
        timeout: Duration::from_secs(config.upstream_timeout_secs),
        extra_root_pem,
        outbound: config.outbound(issuer).map_err(anyhow::Error::msg)?,
    })
    .map_err(anyhow::Error::msg)?;
    let vault = Vault::open(vault_config, store, clock, Arc::new(upstream), kek, reload).await?;
    Ok(Arc::new(vault))
}

fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

impl Server {
    /// Bind `config.listen` and prepare.
    pub async fn bind(config: &Config, options: ServeOptions) -> Result<Self> {
        let listener = TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        Self::with_listener(config, listener, options).await
    }

    /// Prepare on an already-bound listener (tests bind `127.0.0.1:0`).
    pub async fn with_listener(
        config: &Config,
        listener: TcpListener,
        options: ServeOptions,
    ) -> Result<Self> {
        let addr = listener.local_addr()?;
        if config.http && config.public_url.is_none() && !addr.ip().is_loopback() {
            anyhow::bail!(
                "--http on a non-loopback address needs public_url (the https URL of the TLS proxy)"
            );
        }
        let issuer = issuer_for(config, addr);
        create_private_dir(&config.data_dir)?;
        let tls = if config.http {
            None
        } else {
            Some(match (&config.tls_cert, &config.tls_key) {
                (Some(c), Some(k)) => tls::operator_supplied(c, k)?,
                (None, None) => {
                    let host = url::Url::parse(&issuer)
                        .ok()
                        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_owned()));
                    tls::local_ca(&config.data_dir, &host.into_iter().collect::<Vec<_>>())?
                }
                _ => anyhow::bail!("tls_cert and tls_key go together"),
            })
        };
        let ca_path = tls.as_ref().and_then(|t| t.ca_path.clone());
        let extra_root = match &ca_path {
            Some(p) => Some(std::fs::read(p)?),
            None => None,
        };
        let vault = open_vault(config, &issuer, options.clock.clone(), extra_root.clone()).await?;
        let demo = if options.demo {
            let secret = demo::demo_client_secret(&vault).await?;
            Some(DemoProvider::new(
                DemoConfig {
                    client_id: demo::DEMO_CLIENT_ID.into(),
                    client_secret: secret,
                    redirect_uris: Vec::new(),
                    redirect_uri_pattern: Some((
                        format!("{}connect/", vault.config.issuer),
                        "/callback".into(),
                    )),
                    access_token_ttl: config.demo_access_token_ttl,
                },
                options.clock.clone(),
            ))
        } else {
            None
        };
        let limits = http::ProxyLimits {
            max_request_bytes: config.proxy_max_request_bytes,
            max_response_bytes: config.proxy_max_response_bytes,
            timeout: Duration::from_secs(config.proxy_timeout_secs.max(1)),
        };
        let outbound = config.outbound(&issuer).map_err(anyhow::Error::msg)?;
        let state = http::AppState::new(
            vault.clone(),
            tls.is_some(),
            limits,
            extra_root.as_deref(),
            outbound,
        )
        .map_err(anyhow::Error::msg)?;
        let router = http::router(state, demo.as_ref());
        Ok(Self {
            vault,
            issuer,
            ca_path,
            demo,
            listener,
            tls: tls.map(|t| t.server_config),
            router,
            audit_retention_days: config.audit_retention_days,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serve until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let vault = self.vault.clone();
        let retention = i64::from(self.audit_retention_days) * 86_400;
        // Housekeeping every minute: purge expired single-use identifiers, sessions and connect
        // flows; reload signing keys.
        let purger = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                if let Err(e) = vault.store().purge_expired_jtis(vault.now()).await {
                    tracing::warn!(error = %e, "purging expired identifiers failed");
                }
                // Approval requests past their deadline: expired, recorded, reported.
                if let Err(e) = vault.expire_approvals(500).await {
                    tracing::warn!(code = e.code, "expiring approval requests failed");
                }
                // Retention: one node a minute (a claim through the database).
                let prune = retention > 0
                    && vault
                        .store()
                        .claim_job("audit.prune", vault.now(), 60)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!(error = %e, "claiming the audit retention job failed");
                            false
                        });
                if prune {
                    match vault.prune_audit(vault.now() - retention).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(entries = n, "old audit entries pruned"),
                        Err(e) => tracing::warn!(code = e.code, "pruning the audit trail failed"),
                    }
                }
                // A signed checkpoint of the audit chain every ten minutes while it grows.
                if let Err(e) = vault.periodic_audit_checkpoint(600).await {
                    tracing::warn!(code = e.code, "writing an audit checkpoint failed");
                }
                // Pick up a signing-key rotation made by `latchkey key rotate --signing`.
                if let Err(e) = vault.reload_signing_keys().await {
                    tracing::warn!(error = %e, "reloading the signing keys failed");
                }
            }
        });
        // The background refresher: tokens of recently used accounts are refreshed ahead of
        // expiry, so exchanges in steady state never wait on a provider.
        // It starts by resolving refreshes a crash interrupted (all marks left are stale when
        // this process starts); later passes leave a refresh running elsewhere its deadline.
        let vault = self.vault.clone();
        let refresher = tokio::spawn(async move {
            const PASS: usize = 500;
            let report = vault.refresh_due(PASS, vault.now()).await;
            if report != Default::default() {
                tracing::info!(?report, "start-up refresh pass");
            }
            loop {
                let jitter = u64::from(latchkey_crypto::secrets::random_bytes(1)[0]) * 20;
                tokio::time::sleep(Duration::from_millis(30_000 + jitter)).await;
                // A full pass means more is due: keep going without the pause.
                while vault.refresh_due(PASS, vault.now() - 300).await.total() == PASS {}
            }
        });
        // Webhook deliveries: every few seconds, what is due in the outbox.
        let vault = self.vault.clone();
        let webhooks = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                vault.deliver_webhooks(50).await;
            }
        });
        let result = http::serve(self.listener, self.tls, self.router, shutdown).await;
        purger.abort();
        refresher.abort();
        webhooks.abort();
        result
    }
}
