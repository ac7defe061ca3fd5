//! Test support for Latchkey: [`MockUpstream`], a mock upstream OAuth 2.0 provider whose
//! behaviour can be switched while a test runs.
//!
//! Latchkey is an OAuth client of providers such as GitHub or Google. Its hardest code paths —
//! single-flight refresh under load, refresh-token rotation and reuse detection, a provider that
//! is slow, rate-limiting, failing or answering garbage, a grant killed behind the vault's back,
//! revocation — depend on what the provider does. Real providers cannot be made to misbehave on
//! demand, and the built-in demo provider (`latchkey-demo`) is deliberately well behaved. This
//! mock is a plain-HTTP server on `127.0.0.1:0` that a test registers as a generic `oauth2`
//! connection (Latchkey accepts `http` for loopback hosts) and then steers with
//! [`MockUpstream::set`], while [`MockUpstream::stats`] shows exactly what the vault asked for.
//!
//! | Method | Path | |
//! |---|---|---|
//! | GET  | `/authorize` | no UI: checks `client_id`, `redirect_uri`, `response_type=code` and a PKCE S256 challenge, then 302 straight back with `code` and `state` |
//! | POST | `/token` | `authorization_code` (PKCE checked) and `refresh_token` grants; client authentication by HTTP Basic or in the form body |
//! | POST | `/revoke` | RFC 7009; revoking a refresh token revokes its whole family (and the family's access tokens) |
//! | GET  | `/userinfo` | bearer; `{"sub": "mock-user"}` |
//! | GET  | `/api/ping` | bearer; 200 `{"ok": true}` or 401 |
//!
//! [`Behaviour`] decides how the token endpoint answers. The rotation behaviours shape every
//! token answer; the fault behaviours apply to the **refresh grant only**, so connecting an
//! account (the authorization-code grant) keeps working whatever is set.
//!
//! | [`Behaviour`] | refresh grant |
//! |---|---|
//! | `StrictRotation` (default) | new refresh token; the one presented dies; reusing it revokes the family |
//! | `GraceRotation { seconds }` | rotation; a replaced token keeps working for `seconds` |
//! | `NonRotating` | answers the refresh token presented |
//! | `NonExpiring` | no `expires_in`, no refresh token (either grant) |
//! | `Slow { millis }` | waits, then rotates; a client that gave up consumed nothing |
//! | `RotateThenSlow { millis }` | rotates at once, then waits before answering; the rotation stands if the client gives up (the crash window) |
//! | `ServerError { status }`, `RateLimited { retry_after }` | 5xx / 429 + `Retry-After` |
//! | `MalformedJson`, `OversizedJson` | 200 with `{not json` / a body over 1 MiB |
//! | `MissingRefreshToken`, `MissingExpiresIn` | a valid answer without that field |
//!
//! Time comes from the injected [`Clock`] (share the test server's `ManualClock` so that moving
//! it expires the mock's access tokens too); the mock never reads the system clock. Only
//! [`Behaviour::Slow`] and [`Behaviour::RotateThenSlow`] really wait, with `tokio::time::sleep`.
//! State is in memory; opaque values are stored as SHA-256 digests, except each family's
//! current refresh token (kept so a grace-period reuse can answer with it, and reported in
//! [`MockStats`] for assertions). Request data never panics the mock: every malformed request
//! gets an OAuth-shaped error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use latchkey_core::clock::Clock;

mod http;
mod state;

/// The mock's codes, access and refresh tokens start with this; see [`assert_no_canary`].
pub const CANARY_PREFIX: &str = "lkmock_";

/// The prefixes of every upstream secret the tests' providers (the mock and the built-in demo
/// provider) issue.
pub const CANARY_PREFIXES: [&str; 2] = [CANARY_PREFIX, latchkey_demo::CANARY_PREFIX];

/// Fail if `text` (a log, an error body, a database file, a page) holds an upstream secret
/// issued by a test provider: an upstream code, access or refresh token must never be written
/// to a log, an error, a page or the database in plaintext. `place` names what was scanned.
pub fn assert_no_canary(place: &str, text: &[u8]) {
    for prefix in CANARY_PREFIXES {
        let needle = prefix.as_bytes();
        if let Some(at) = text.windows(needle.len()).position(|w| w == needle) {
            let from = at.saturating_sub(200);
            let to = (at + 200).min(text.len());
            panic!(
                "an upstream secret ({prefix}…) is in {place}:\n…{}…",
                String::from_utf8_lossy(&text[from..to])
            );
        }
    }
}

#[cfg(test)]
mod tests;

/// The account id `/userinfo` reports (`sub`).
pub const MOCK_SUBJECT: &str = "mock-user";

/// Default access-token lifetime, in seconds.
pub const DEFAULT_ACCESS_TOKEN_TTL: i64 = 300;

/// How the mock's token endpoint behaves. The default is [`Behaviour::StrictRotation`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Every refresh returns a new refresh token and kills the one presented; presenting a dead
    /// one again answers `invalid_grant` and revokes the whole family (reuse detection).
    #[default]
    StrictRotation,
    /// Rotation, but a replaced refresh token keeps working for `seconds` (answering with the
    /// family's current refresh token); after that, reuse revokes the family.
    GraceRotation { seconds: i64 },
    /// The refresh grant answers the same refresh token it was given.
    NonRotating,
    /// No `expires_in` and no refresh token, from either grant (GitHub's classic OAuth apps):
    /// access tokens live until revoked.
    NonExpiring,
    /// The refresh grant sleeps this long, then answers as [`Behaviour::StrictRotation`]. A
    /// client that gives up first closes its connection and the server drops the request, so
    /// nothing is consumed (a provider that rotates anyway is not modelled).
    Slow { millis: u64 },
    /// The refresh grant acts at once, exactly as [`Behaviour::StrictRotation`] (the refresh
    /// token presented is dead from that moment and the new pair is issued), and only then
    /// sleeps `millis` before answering. A client that gives up or dies during the sleep never
    /// sees the new pair, but the rotation stands: this is a provider that acted while its
    /// answer was lost before the vault committed it (the crash window of a rotating provider).
    /// Errors (an unknown or replaced token) are answered after the same sleep.
    RotateThenSlow { millis: u64 },
    /// The refresh grant answers this status with a JSON error body.
    ServerError { status: u16 },
    /// The refresh grant answers 429 with `Retry-After: retry_after`.
    RateLimited { retry_after: u64 },
    /// The refresh grant answers 200 with the body `{not json`.
    MalformedJson,
    /// The refresh grant answers 200 with a syntactically valid JSON body over 1 MiB.
    OversizedJson,
    /// The refresh grant answers a valid token response without `refresh_token`; the refresh
    /// token presented stays valid.
    MissingRefreshToken,
    /// The refresh grant rotates as [`Behaviour::StrictRotation`] but leaves `expires_in` out
    /// (the access token then does not expire at the mock).
    MissingExpiresIn,
}

/// What the mock has seen. A snapshot: later requests do not change it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MockStats {
    /// Refresh-grant requests received, whatever they were answered.
    pub refresh_calls: u32,
    /// Refresh-grant requests by the SHA-256 (base64url, as
    /// `latchkey_crypto::secrets::sha256_b64`) of the refresh token presented.
    pub refresh_calls_per_token: HashMap<String, u32>,
    /// Authorization-code grants answered with tokens.
    pub code_grants: u32,
    /// `invalid_grant` answers from the token endpoint (either grant).
    pub invalid_grants: u32,
    /// Refresh-grant requests that presented a replaced refresh token after its grace period:
    /// reuse detection, which revoked the token's family. A vault that lost a rotation (the
    /// crash window) shows up here when it presents its stale token.
    pub reused_refresh_tokens: u32,
    /// Revocation requests that named a token the mock issued.
    pub revocations: u32,
    /// The refresh token in the most recent token answer that carried one.
    pub last_issued_refresh_token: Option<String>,
}

/// A running mock provider. Clones share it; it stops accepting connections when the last
/// clone is dropped (connections already open end with the test's runtime).
#[derive(Clone)]
pub struct MockUpstream {
    inner: Arc<http::Inner>,
    addr: SocketAddr,
    _server: Arc<ServerTask>,
}

/// Aborts the server task on drop.
struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl MockUpstream {
    /// Bind `127.0.0.1:0` and serve, with one registered client. Panics if no loopback port can
    /// be bound (a broken test environment).
    pub async fn start(clock: Arc<dyn Clock>, client_id: &str, client_secret: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the mock provider");
        Self::start_on(listener, clock, client_id, client_secret)
            .expect("the mock provider's listener has a local address")
    }

    /// Serve on a listener the caller bound (e.g. to `127.0.0.1:0`).
    pub fn start_on(
        listener: tokio::net::TcpListener,
        clock: Arc<dyn Clock>,
        client_id: &str,
        client_secret: &str,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(http::Inner {
            clock,
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            state: Mutex::new(state::State::new(DEFAULT_ACCESS_TOKEN_TTL)),
        });
        let router = http::router(inner.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                // The test that owns the mock sees its requests fail; say why.
                eprintln!("mock upstream stopped: {e}");
            }
        });
        Ok(Self {
            inner,
            addr,
            _server: Arc::new(ServerTask(task)),
        })
    }

    /// The base URL, with a trailing slash: `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The registered client id.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// Switch behaviour; requests already past their behaviour check are not affected.
    pub fn set(&self, b: Behaviour) {
        self.inner.lock().behaviour = b;
    }

    pub fn behaviour(&self) -> Behaviour {
        self.inner.lock().behaviour
    }

    /// Lifetime of access tokens issued from now on, in seconds (default 300).
    pub fn set_access_token_ttl(&self, seconds: i64) {
        self.inner.lock().access_ttl = seconds;
    }

    pub fn stats(&self) -> MockStats {
        self.inner.lock().stats.clone()
    }

    /// The provider kills every grant it issued: all refresh and access tokens stop working.
    /// Not counted in [`MockStats::revocations`] (nobody asked for it).
    pub fn revoke_all(&self) {
        self.inner.lock().revoke_all();
    }
}
