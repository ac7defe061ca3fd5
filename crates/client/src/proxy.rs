//! Calling a provider's API through Latchkey's credential-injecting proxy, so the agent never
//! holds an upstream token.
//!
//! A [`ProxyRequest`] goes to `{issuer}proxy/{connection}/{path}` with the agent's own Latchkey
//! token (client credentials, cached and renewed before it expires) as
//! `Authorization: Bearer …` and the user in `Latchkey-User`. Latchkey decides the release as
//! for an exchange, injects the user's upstream token, forwards the call and hands back the
//! provider's answer as it is: that is the `Ok` [`reqwest::Response`], whatever its status.
//! Answers by Latchkey itself (they carry `Latchkey-Error`) become an [`Error`]: not
//! connected, approval required (repeat the call once the user approved: the approval covers
//! the same call), denied, rate limited… An agent token refused as expired is renewed and the
//! call sent once more (when its body can be sent twice).

use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, RequestBuilder, Response};
use serde::Serialize;

use crate::Client;
use crate::approval::ApprovalFor;
use crate::error::{Asked, Error, OAuthAnswer, classify};

const USER_HEADER: &str = "latchkey-user";
const SCOPE_HEADER: &str = "latchkey-scope";
const ERROR_HEADER: &str = "latchkey-error";

/// Calls to one connection's API for one user, through Latchkey. Made by [`Client::proxy`];
/// cheap to clone.
#[derive(Clone, Debug)]
pub struct Proxy {
    client: Client,
    connection: String,
    user: String,
    scope: Option<String>,
}

impl Client {
    /// Calls to `connection`'s API acting for `user` (a user id or username), through
    /// Latchkey's proxy.
    pub fn proxy(&self, connection: impl Into<String>, user: impl Into<String>) -> Proxy {
        Proxy {
            client: self.clone(),
            connection: connection.into(),
            user: user.into(),
            scope: None,
        }
    }
}

impl Proxy {
    /// Narrow the upstream token Latchkey injects to these scopes (space-separated; sent as
    /// `Latchkey-Scope`). Default: everything the grant allows and the user consented to.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// The proxy URL of `path` (relative to the connection's API base URL; it may carry a
    /// `?query`, and is sent as given: percent-encode what needs it).
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}proxy/{}/{}",
            self.client.inner.issuer,
            self.connection,
            path.trim_start_matches('/')
        )
    }

    /// A request with any method.
    pub fn request(&self, method: Method, path: &str) -> ProxyRequest {
        ProxyRequest {
            proxy: self.clone(),
            builder: self.client.inner.http.request(method, self.url(path)),
        }
    }

    /// A GET request.
    pub fn get(&self, path: &str) -> ProxyRequest {
        self.request(Method::GET, path)
    }

    /// A POST request.
    pub fn post(&self, path: &str) -> ProxyRequest {
        self.request(Method::POST, path)
    }

    /// A PUT request.
    pub fn put(&self, path: &str) -> ProxyRequest {
        self.request(Method::PUT, path)
    }

    /// A PATCH request.
    pub fn patch(&self, path: &str) -> ProxyRequest {
        self.request(Method::PATCH, path)
    }

    /// A DELETE request.
    pub fn delete(&self, path: &str) -> ProxyRequest {
        self.request(Method::DELETE, path)
    }
}

/// A call through the proxy, being built: set headers, query and body as with
/// [`reqwest::RequestBuilder`] (not `Authorization`: Latchkey refuses a second one; a query
/// goes in the path), then [`ProxyRequest::send`].
#[derive(Debug)]
pub struct ProxyRequest {
    proxy: Proxy,
    builder: RequestBuilder,
}

impl ProxyRequest {
    /// Add a header (forwarded to the provider, except those Latchkey strips).
    pub fn header<K, V>(self, name: K, value: V) -> Self
    where
        HeaderName: TryFrom<K>,
        <HeaderName as TryFrom<K>>::Error: Into<http::Error>,
        HeaderValue: TryFrom<V>,
        <HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        self.map(|b| b.header(name, value))
    }

    /// A JSON body.
    pub fn json<T: Serialize + ?Sized>(self, json: &T) -> Self {
        self.map(|b| b.json(json))
    }

    /// A form body.
    pub fn form<T: Serialize + ?Sized>(self, form: &T) -> Self {
        self.map(|b| b.form(form))
    }

    /// A raw body.
    pub fn body(self, body: impl Into<reqwest::Body>) -> Self {
        self.map(|b| b.body(body))
    }

    /// A deadline for this call (the client's default otherwise).
    pub fn timeout(self, timeout: Duration) -> Self {
        self.map(|b| b.timeout(timeout))
    }

    /// Anything else [`reqwest::RequestBuilder`] offers.
    pub fn map(mut self, f: impl FnOnce(RequestBuilder) -> RequestBuilder) -> Self {
        self.builder = f(self.builder);
        self
    }

    /// Send it: the provider's answer (any status), or Latchkey's refusal as an [`Error`].
    pub async fn send(self) -> Result<Response, Error> {
        let Self { proxy, mut builder } = self;
        let client = &proxy.client;
        // A second try only for a body that can be sent twice.
        let mut spare = builder.try_clone();
        loop {
            let token = client.agent_token().await?;
            let mut req = builder
                .bearer_auth(token.secret())
                .header(USER_HEADER, &proxy.user);
            if let Some(scope) = &proxy.scope {
                req = req.header(SCOPE_HEADER, scope);
            }
            let at = client.inner.clock.now();
            let resp = req.send().await?;
            let Some(code) = resp.headers().get(ERROR_HEADER) else {
                return Ok(resp);
            };
            if code == "invalid_token"
                && let Some(again) = spare.take()
            {
                // Expired or revoked since it was cached: a new one, once.
                client.forget_agent_token(&token);
                builder = again;
                continue;
            }
            return Err(refusal(resp, &proxy.connection, at).await);
        }
    }
}

/// Latchkey's own answer from the proxy, as an error.
async fn refusal(resp: Response, connection: &str, at: i64) -> Error {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => return e.into(),
    };
    match OAuthAnswer::parse(status, retry_after.as_deref(), &text) {
        Ok(answer) => classify(
            answer,
            Asked {
                connection,
                approval_for: ApprovalFor::Call,
                at,
            },
        ),
        Err(e) => e,
    }
}
