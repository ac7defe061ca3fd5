//! The built-in demo OAuth 2.0 provider: an authorization server plus a small GitHub-flavoured
//! API, so Latchkey can be tried end to end without registering an app anywhere.
//!
//! The server mounts [`DemoProvider::router`] under `/demo` only in demo mode, and the vault's
//! catalog (`latchkey_core::catalog::demo_paths`) points a `demo` connection at it. The vault
//! talks to it over real HTTP exactly as it would to GitHub: the authorization-code flow with
//! PKCE (S256 only), confidential-client authentication (HTTP Basic or `client_secret_post`),
//! refresh-token rotation with reuse detection, RFC 7009 revocation and bearer-protected API
//! calls. That makes it a faithful target for the vault's own refresh and revocation logic, and
//! [`DemoProvider::stats`] lets the demo UI and tests show what the vault actually asked for.
//!
//! Routes, relative to the mount point:
//!
//! | Method | Path | |
//! |---|---|---|
//! | GET  | `/oauth/authorize` | validate the request, render the consent page |
//! | POST | `/oauth/authorize` | the user's decision → 302 back to the client |
//! | POST | `/oauth/token` | `authorization_code` and `refresh_token` grants |
//! | POST | `/oauth/revoke` | RFC 7009 revocation |
//! | GET  | `/api/user` | `read:user` |
//! | GET  | `/api/repos` | `repo:read` |
//! | GET  | `/api/repos/{name}/issues` | `repo:read` |
//! | POST | `/api/repos/{name}/issues` | `issues:write` |
//! | POST | `/api/repos/{name}/issues/{number}/comments` | `issues:write` |
//!
//! There is exactly one resource owner (`octo-demo`) and no login: whoever reaches the consent
//! page speaks for that account. This is a demo, not an identity provider.
//!
//! **All state is in memory.** Consents, codes, tokens and created issues are forgotten on
//! restart; tokens the vault still holds then fail with `invalid_token`/`invalid_grant`, which
//! exercises the vault's reconnect path rather than breaking anything. Secrets are stored only
//! as SHA-256 digests and never logged. Time comes from the injected [`Clock`], never from the
//! system clock, so tests can expire tokens by moving a `ManualClock`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use latchkey_core::clock::Clock;

mod api;
pub mod client_auth;
mod html;
mod oauth;
mod scope;
mod state;

#[cfg(test)]
mod tests;

/// The demo account every grant is for.
/// The demo provider's codes, access and refresh tokens start with this (as GitHub's start with
/// `ghp_`/`gho_`), which makes them canaries: the test suite looks for it in every log line,
/// error body, stored row and dashboard page, where an upstream secret must never show.
pub const CANARY_PREFIX: &str = "lkdemo_";

pub(crate) const DEMO_LOGIN: &str = "octo-demo";
pub(crate) const DEMO_ID: &str = "1001";
pub(crate) const DEMO_NAME: &str = "Octo Demo";

/// Request bodies larger than this are refused before parsing. It leaves room for a 64 KiB
/// issue or comment body plus JSON escaping; the per-field limits are checked separately.
const MAX_BODY_BYTES: usize = 128 * 1024;

/// The demo provider's configuration: one registered client (the vault).
#[derive(Clone)]
pub struct DemoConfig {
    /// The one registered OAuth client.
    pub client_id: String,
    pub client_secret: String,
    /// Exact-match allow-list for `redirect_uri`.
    pub redirect_uris: Vec<String>,
    /// Also allowed: `{prefix}{name}{suffix}` where `name` is a connection name (letters,
    /// digits, `-_.@`, 1–64): the vault gives each connection its own callback, and demo
    /// connections may be added while the provider runs.
    pub redirect_uri_pattern: Option<(String, String)>,
    /// Access-token lifetime in seconds, e.g. 300.
    pub access_token_ttl: i64,
}

impl DemoConfig {
    /// Whether `uri` is a registered redirect URI (exactly, or by the connection pattern).
    pub fn allows_redirect(&self, uri: &str) -> bool {
        if self.redirect_uris.iter().any(|r| r == uri) {
            return true;
        }
        let Some((prefix, suffix)) = &self.redirect_uri_pattern else {
            return false;
        };
        uri.strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_suffix(suffix.as_str()))
            .is_some_and(|name| {
                (1..=64).contains(&name.len())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
            })
    }
}

impl fmt::Debug for DemoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("redirect_uris", &self.redirect_uris)
            .field("redirect_uri_pattern", &self.redirect_uri_pattern)
            .field("access_token_ttl", &self.access_token_ttl)
            .finish()
    }
}

/// Counters of what the provider was asked to do. Each counts requests, successful or not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DemoStats {
    /// `POST /oauth/token` with `grant_type=authorization_code`.
    pub authorization_code_grants: u64,
    /// `POST /oauth/token` with `grant_type=refresh_token`.
    pub refresh_grants: u64,
    /// `POST /oauth/revoke`.
    pub revocations: u64,
    /// Requests to any `/api/…` route.
    pub api_calls: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub authorization_code_grants: AtomicU64,
    pub refresh_grants: AtomicU64,
    pub revocations: AtomicU64,
    pub api_calls: AtomicU64,
}

pub(crate) struct Inner {
    pub config: DemoConfig,
    pub clock: Arc<dyn Clock>,
    pub stats: Counters,
    state: Mutex<state::State>,
}

impl Inner {
    /// The state lock. Handlers never hold it across an `.await`. A panic while holding it
    /// cannot leave the maps half-updated in a way that matters for a demo, so poisoning is
    /// ignored rather than turned into a panic on every later request.
    pub(crate) fn lock(&self) -> MutexGuard<'_, state::State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The demo provider. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct DemoProvider {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for DemoProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoProvider")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl DemoProvider {
    pub fn new(config: DemoConfig, clock: Arc<dyn Clock>) -> Self {
        let mut config = config;
        // A non-positive lifetime would mint tokens that are dead on arrival.
        config.access_token_ttl = config.access_token_ttl.max(1);
        Self {
            inner: Arc::new(Inner {
                config,
                clock,
                stats: Counters::default(),
                state: Mutex::new(state::State::new()),
            }),
        }
    }

    /// Routes relative to the mount point; the server does
    /// `Router::new().nest("/demo", provider.router())`.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/oauth/authorize",
                get(oauth::authorize_page).post(oauth::authorize_decision),
            )
            .route("/oauth/token", post(oauth::token))
            .route("/oauth/revoke", post(oauth::revoke))
            .route("/api/user", get(api::user))
            .route("/api/repos", get(api::repos))
            .route(
                "/api/repos/{name}/issues",
                get(api::list_issues).post(api::create_issue),
            )
            .route(
                "/api/repos/{name}/issues/{number}/comments",
                post(api::create_comment),
            )
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.clone())
    }

    pub fn stats(&self) -> DemoStats {
        let c = &self.inner.stats;
        DemoStats {
            authorization_code_grants: c.authorization_code_grants.load(Ordering::Relaxed),
            refresh_grants: c.refresh_grants.load(Ordering::Relaxed),
            revocations: c.revocations.load(Ordering::Relaxed),
            api_calls: c.api_calls.load(Ordering::Relaxed),
        }
    }
}
