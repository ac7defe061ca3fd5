//! Latchkey's Rust SDK for agents.
//!
//! Latchkey keeps users' upstream accounts (GitHub, Google, Slack, …)
//! and lets a registered agent act for them within its grant. This crate is what an agent
//! written in Rust needs, and what the `latchkey token` and `latchkey mcp` commands use:
//!
//! - [`Client::token`] / [`Client::token_for`]: the user's **upstream access token** through
//!   the privileged-worker token exchange, optionally narrowed by scopes, from an in-memory
//!   cache that serves repeated calls without any network traffic until a safety margin
//!   ([`ClientBuilder::cache_margin`], 60 s by default) before the token expires. Concurrent
//!   calls for the same request make **one** exchange; different requests never wait for each
//!   other.
//! - Typed [`Error`]s that say what to do: [`Error::NotConnected`] (send the user to
//!   `connect_url`), [`Error::ApprovalRequired`] (show `approval_url`, then
//!   [`Client::wait_for_approval`]), [`Error::Denied`], [`Error::RateLimited`] and
//!   [`Error::Unavailable`] (with `retry_after`), [`Error::InvalidClient`], …
//! - [`Client::proxy`]: calls to the provider's API **through Latchkey**, which injects the
//!   token, so the agent never holds one. It authenticates with the agent's own short-lived
//!   Latchkey token ([`Client::agent_token`], client credentials, cached and renewed).
//!
//! ```no_run
//! use std::time::Duration;
//! use latchkey_client::{Client, Error, TokenRequest};
//!
//! # async fn run() -> Result<(), Error> {
//! let latchkey = Client::builder()
//!     .issuer("https://127.0.0.1:8750/")
//!     .ca_cert_file("latchkey-data/tls/ca.pem") // Latchkey's local CA
//!     .client_id("agt_…")
//!     .private_key_file("latchkey-data/demo-agent.key") // PKCS#8 PEM: RS256, ES256, EdDSA
//!     .audit_context("nightly triage")
//!     .build()?;
//!
//! // The upstream token, cached until a minute before it expires.
//! match latchkey.token_for(&TokenRequest::new("demo-git", "usr_…").scope("repo:read")).await {
//!     Ok(token) => println!("{} scopes: {}", token.token_type(), token.scope()),
//!     Err(Error::NotConnected { connect_url, .. }) => println!("connect at {connect_url:?}"),
//!     Err(Error::ApprovalRequired(pending)) => {
//!         println!("approve at {}", pending.approval_url);
//!         let token = latchkey.wait_for_approval(&pending, Duration::from_secs(300)).await?;
//!         println!("approved: {}", token.scope());
//!     }
//!     Err(e) => return Err(e),
//! }
//!
//! // Or never hold the token: call the API through Latchkey.
//! let profile = latchkey.proxy("demo-git", "demo").get("/user").send().await?;
//! println!("{}", profile.status());
//! # Ok(())
//! # }
//! ```
//!
//! The client is cheap to clone (one shared cache) and needs a Tokio runtime. It keeps
//! tokens only in memory and never logs them; [`AccessToken`]'s `Debug` hides the token.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use latchkey_crypto::keygen::{SigningKey, guess_alg};
use secrecy::SecretString;
use zeroize::Zeroizing;

mod approval;
mod cache;
mod clock;
mod error;
mod proxy;
mod token;

pub use approval::PendingApproval;
pub use clock::{Clock, SystemClock};
pub use error::Error;
/// JWS algorithms, for [`ClientBuilder::algorithm`].
pub use latchkey_crypto::Algorithm;
pub use proxy::{Proxy, ProxyRequest};
pub use token::{AccessToken, TokenRequest};

use cache::Cache;

/// Default [`ClientBuilder::cache_margin`].
pub const DEFAULT_CACHE_MARGIN: Duration = Duration::from_secs(60);
/// Default [`ClientBuilder::timeout`]: above the proxy's own default deadline (60 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);
/// Default [`ClientBuilder::audit_context`].
pub const DEFAULT_AUDIT_CONTEXT: &str = "latchkey-client";

/// A Latchkey client for one agent. Build it with [`Client::builder`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("issuer", &self.inner.issuer)
            .field("client_id", &self.inner.client_id)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    /// With a trailing slash.
    issuer: String,
    client_id: String,
    key: Option<SigningKey>,
    secret: Option<SecretString>,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    /// Seconds.
    margin: i64,
    audit_context: String,
    tokens: Cache<TokenRequest, AccessToken>,
    agent_token: Cache<(), AccessToken>,
}

impl Client {
    /// Start building a client.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The issuer (with its trailing slash), e.g. `https://127.0.0.1:8750/`.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The agent's client id.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The HTTP client used to call Latchkey (it trusts the configured CA): for calls this
    /// SDK does not wrap, such as `/mcp`.
    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// The user's upstream access token for `connection`, with the grant's default scopes:
    /// [`Client::token_for`] with a plain [`TokenRequest`].
    pub async fn token(&self, connection: &str, user: &str) -> Result<AccessToken, Error> {
        self.token_for(&TokenRequest::new(connection, user)).await
    }

    /// The upstream access token for `req`: from the cache while it is fresh (until
    /// [`ClientBuilder::cache_margin`] before it expires), else from one exchange shared by
    /// every concurrent caller asking the same.
    pub async fn token_for(&self, req: &TokenRequest) -> Result<AccessToken, Error> {
        let inner = Arc::clone(&self.inner);
        let r = req.clone();
        self.inner
            .tokens
            .get(req.clone(), self.inner.clock.now(), move || {
                inner.exchange(r)
            })
            .await
    }

    /// Drop the cached token for `req` (say, the provider refused it): the next call
    /// exchanges again.
    pub fn forget_token(&self, req: &TokenRequest) {
        self.inner.tokens.forget(req, |_| true);
    }

    /// Drop every cached upstream token and the agent's token.
    pub fn clear_cache(&self) {
        self.inner.tokens.clear();
        self.inner.agent_token.clear();
    }

    /// The agent's own Latchkey token for the agent API (`/proxy`, `/mcp`): client
    /// credentials, audience `{issuer}mcp`, cached like upstream tokens and renewed
    /// [`ClientBuilder::cache_margin`] before it expires.
    pub async fn agent_token(&self) -> Result<AccessToken, Error> {
        let inner = Arc::clone(&self.inner);
        self.inner
            .agent_token
            .get((), self.inner.clock.now(), move || {
                inner.fetch_agent_token()
            })
            .await
    }

    /// Drop the agent's token if it is still `refused` (Latchkey answered `401` to it): the
    /// next [`Client::agent_token`] gets a new one. A newer token already cached is kept.
    pub fn forget_agent_token(&self, refused: &AccessToken) {
        self.inner
            .agent_token
            .forget(&(), |t| t.secret() == refused.secret());
    }
}

/// Where a PEM comes from.
enum Source {
    Bytes(Zeroizing<Vec<u8>>),
    File(PathBuf),
}

impl Source {
    fn read(&self, what: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
        match self {
            Self::Bytes(b) => Ok(b.clone()),
            Self::File(p) => std::fs::read(p)
                .map(Zeroizing::new)
                .map_err(|e| Error::Config(format!("reading {what} {}: {e}", p.display()))),
        }
    }
}

/// Builds a [`Client`]. The issuer and the client id are required, and a private key or a
/// client secret (or both: the secret then authenticates the client, the key signs the
/// exchange's subject JWT).
#[derive(Default)]
pub struct ClientBuilder {
    issuer: Option<String>,
    client_id: Option<String>,
    key: Option<Source>,
    algorithm: Option<Algorithm>,
    key_id: Option<String>,
    secret: Option<SecretString>,
    cas: Vec<Source>,
    http: Option<reqwest::Client>,
    timeout: Option<Duration>,
    margin: Option<Duration>,
    audit_context: Option<String>,
    clock: Option<Arc<dyn Clock>>,
}

impl ClientBuilder {
    /// Latchkey's issuer URL, e.g. `https://127.0.0.1:8750/` (a missing trailing slash is
    /// added).
    pub fn issuer(mut self, url: impl Into<String>) -> Self {
        self.issuer = Some(url.into());
        self
    }

    /// Latchkey's domain, as Auth0's SDKs take it: `vault.example.com` means the issuer
    /// `https://vault.example.com/`.
    pub fn domain(self, domain: &str) -> Self {
        let issuer = format!("https://{}/", domain.trim_end_matches('/'));
        self.issuer(issuer)
    }

    /// The agent's client id (`agt_…`).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// The agent's private key, PKCS#8 PEM (RSA, P-256 or Ed25519). It signs the exchange's
    /// subject JWT and, unless a client secret is set, the `private_key_jwt` client assertion.
    pub fn private_key_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.key = Some(Source::Bytes(Zeroizing::new(pem.as_ref().to_vec())));
        self
    }

    /// The agent's private key from a PKCS#8 PEM file (read by [`ClientBuilder::build`]).
    pub fn private_key_file(mut self, path: impl AsRef<Path>) -> Self {
        self.key = Some(Source::File(path.as_ref().to_owned()));
        self
    }

    /// The signing algorithm. By default from the key: RSA → RS256 (set PS256 here for
    /// RSA-PSS), P-256 → ES256, Ed25519 → EdDSA.
    pub fn algorithm(mut self, alg: Algorithm) -> Self {
        self.algorithm = Some(alg);
        self
    }

    /// The `kid` the JWTs name (default: the key's RFC 7638 thumbprint, as Latchkey computes
    /// it for a registered PEM key).
    pub fn key_id(mut self, kid: impl Into<String>) -> Self {
        self.key_id = Some(kid.into());
        self
    }

    /// Authenticate the agent with its client secret (`agent add --secret`) instead of a
    /// `private_key_jwt` assertion. Enough for the proxy; the exchange still needs the key.
    pub fn client_secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(SecretString::from(secret.into()));
        self
    }

    /// Trust this CA certificate (PEM) besides the system's, e.g. Latchkey's local CA.
    pub fn ca_cert_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.cas
            .push(Source::Bytes(Zeroizing::new(pem.as_ref().to_vec())));
        self
    }

    /// Trust the CA certificate in this PEM file besides the system's (Latchkey's local CA is
    /// `latchkey-data/tls/ca.pem`).
    pub fn ca_cert_file(mut self, path: impl AsRef<Path>) -> Self {
        self.cas.push(Source::File(path.as_ref().to_owned()));
        self
    }

    /// Use this HTTP client instead of building one (then set no CA here: configure it there).
    pub fn http_client(mut self, http: reqwest::Client) -> Self {
        self.http = Some(http);
        self
    }

    /// Deadline of each call to Latchkey (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long before a token expires it stops being served from the cache (default
    /// [`DEFAULT_CACHE_MARGIN`]). A token living no longer than this is not cached.
    pub fn cache_margin(mut self, margin: Duration) -> Self {
        self.margin = Some(margin);
        self
    }

    /// Why the agent needs the tokens, recorded with each release in the audit trail (1–256
    /// characters, no personal data; default [`DEFAULT_AUDIT_CONTEXT`]).
    pub fn audit_context(mut self, context: impl Into<String>) -> Self {
        self.audit_context = Some(context.into());
        self
    }

    /// The clock for the cache and the JWTs' times (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Check the settings, load the key and the CA, and make the client.
    pub fn build(self) -> Result<Client, Error> {
        let config = |m: &str| Error::Config(m.to_owned());
        let mut issuer = self
            .issuer
            .ok_or_else(|| config("the issuer (Latchkey's URL) is required"))?;
        if !issuer.ends_with('/') {
            issuer.push('/');
        }
        let parsed = url::Url::parse(&issuer)
            .map_err(|e| Error::Config(format!("the issuer `{issuer}` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "https" | "http") || parsed.host().is_none() {
            return Err(Error::Config(format!(
                "the issuer `{issuer}` must be an https:// (or http://) URL"
            )));
        }
        let client_id = self
            .client_id
            .filter(|c| !c.is_empty())
            .ok_or_else(|| config("the agent's client id is required"))?;
        let key = match &self.key {
            None => None,
            Some(source) => {
                let pem = source.read("the private key")?;
                let pem = std::str::from_utf8(&pem)
                    .map_err(|_| config("the private key is not a PEM text"))?;
                let alg = match self.algorithm {
                    Some(a) => a,
                    None => guess_alg(pem)
                        .ok_or_else(|| config("the key is not a PKCS#8 private key"))?,
                };
                Some(
                    SigningKey::from_pem(pem, alg, self.key_id.as_deref())
                        .map_err(|e| Error::Config(format!("the private key: {e}")))?,
                )
            }
        };
        if key.is_none() && self.secret.is_none() {
            return Err(config("a private key or a client secret is required"));
        }
        let audit_context = self
            .audit_context
            .unwrap_or_else(|| DEFAULT_AUDIT_CONTEXT.into());
        if !(1..=256).contains(&audit_context.chars().count()) {
            return Err(config("the audit context must be 1–256 characters"));
        }
        let http = match self.http {
            Some(http) if self.cas.is_empty() && self.timeout.is_none() => http,
            Some(_) => {
                return Err(config(
                    "set the CA and timeout on the HTTP client given, not on the builder",
                ));
            }
            None => {
                let mut certs = Vec::new();
                for ca in &self.cas {
                    let pem = ca.read("the CA certificate")?;
                    certs.push(reqwest::Certificate::from_pem(&pem).map_err(|e| {
                        Error::Config(format!("the CA certificate is not a PEM certificate: {e}"))
                    })?);
                }
                // Answers come back as they are: the proxy hands back the provider's redirects,
                // which are not for this client to follow.
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(self.timeout.unwrap_or(DEFAULT_TIMEOUT))
                    .tls_certs_merge(certs)
                    .build()
                    .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))?
            }
        };
        let margin = self.margin.unwrap_or(DEFAULT_CACHE_MARGIN).as_secs() as i64;
        Ok(Client {
            inner: Arc::new(Inner {
                issuer,
                client_id,
                key,
                secret: self.secret,
                http,
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
                margin,
                audit_context,
                tokens: Cache::default(),
                agent_token: Cache::default(),
            }),
        })
    }
}
