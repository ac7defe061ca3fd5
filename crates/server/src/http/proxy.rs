//! `/proxy/{connection}/{path…}`: the credential-injecting proxy. The agent authenticates
//! (its agent token and `Latchkey-User`, a user's token, or a privileged-worker JWT), the
//! vault decides and records the release (`Vault::release_for_call`), and Latchkey forwards
//! the call to the connection's API base URL with the upstream token injected. The agent
//! never sees the token.
//!
//! Only the API base URL's origin is reachable: the path is checked before anything goes out
//! (no absolute URLs, no `..` or encoded traversal, no backslashes, no `@` where it could
//! read as credentials), the built URL must still be under the base, and redirects are
//! followed only within the same origin. The SSRF guard (`latchkey_upstream::guard`) applies
//! to every call and every redirect: a base URL on a loopback, private, link-local or
//! metadata address (directly or after resolution) is refused unless the operator allows it.
//! The agent's `Authorization`, cookies, hop-by-hop and `Latchkey-*` headers never reach the
//! provider. Request bodies are read up to a cap before anything goes out (so a 401 can be
//! retried once after a refresh); responses stream back under a size cap and a deadline.
//! Every call has a `proxy.request` entry written before it goes out and a `proxy.response`
//! entry (status, bytes, time) once it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use latchkey_core::OAuthError;
use latchkey_core::vault::{AgentCaller, ApiCall, CallOutcome, CallToken, USER_HEADER};
use latchkey_upstream::guard::{Blocked, GuardedClient, OutboundPolicy};
use secrecy::ExposeSecret;

use super::errors::oauth_error;
use super::web::context;
use super::{AppState, RequestMeta};

/// Limits on calls through the proxy.
#[derive(Clone, Debug)]
pub struct ProxyLimits {
    pub max_request_bytes: usize,
    pub max_response_bytes: u64,
    /// For the whole call: connecting, sending, and reading the answer to its end.
    pub timeout: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: 10 * 1024 * 1024,
            max_response_bytes: 50 * 1024 * 1024,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The proxy's HTTP client and limits.
pub struct Proxy {
    client: GuardedClient,
    limits: ProxyLimits,
}

/// Same-origin redirects followed at most this many times.
const MAX_REDIRECTS: usize = 5;
/// Header an agent may use to narrow the scopes of the injected token.
const SCOPE_HEADER: &str = "latchkey-scope";
/// Set on answers Latchkey itself gives (not the provider's), with the error code.
const ERROR_HEADER: &str = "latchkey-error";
/// Most header bytes forwarded to a provider, counted as HTTP/2 does (name, value and 32 per
/// field): HTTP/2 servers commonly allow 16 KiB (hyper's default), and one refusing more
/// tears down the whole connection — every call in flight on it with the oversized one.
pub(super) const MAX_FORWARDED_HEADER_BYTES: usize = 16 * 1024;
/// Longest path and query forwarded (the common request-line limit of HTTP servers).
pub(super) const MAX_TARGET_BYTES: usize = 8 * 1024;

impl Proxy {
    pub fn limits(&self) -> &ProxyLimits {
        &self.limits
    }

    pub fn new(
        limits: ProxyLimits,
        extra_root_pem: Option<&[u8]>,
        outbound: OutboundPolicy,
    ) -> Result<Self, String> {
        let guard = Arc::new(outbound.clone());
        let settings = || {
            let guard = guard.clone();
            // Same origin means the same host, resolved (for a name) through the same guard;
            // the literal check is repeated so that no redirect can ever leave it.
            let policy = reqwest::redirect::Policy::custom(move |attempt| {
                let same_origin = attempt
                    .previous()
                    .first()
                    .is_some_and(|first| first.origin() == attempt.url().origin());
                if same_origin
                    && attempt.previous().len() <= MAX_REDIRECTS
                    && guard.check_url(attempt.url()).is_ok()
                {
                    attempt.follow()
                } else {
                    attempt.stop()
                }
            });
            let mut builder = reqwest::Client::builder()
                .timeout(limits.timeout)
                .connect_timeout(limits.timeout.min(Duration::from_secs(10)))
                .redirect(policy)
                .user_agent(concat!("latchkey-proxy/", env!("CARGO_PKG_VERSION")));
            if let Some(pem) = extra_root_pem {
                let cert = reqwest::Certificate::from_pem(pem)
                    .map_err(|e| format!("extra root certificate: {e}"))?;
                builder = builder.tls_certs_merge([cert]);
            }
            Ok(builder)
        };
        Ok(Self {
            client: GuardedClient::new(outbound, settings)?,
            limits,
        })
    }
}

/// A refusal by Latchkey (not the provider): the OAuth error body, marked with
/// `Latchkey-Error`.
fn refusal(e: &OAuthError) -> Response {
    let mut e = e.clone();
    // The agent did authenticate; the user has not connected. 401 would read as "your
    // Latchkey token is bad".
    if e.connect_uri.is_some() && e.status == 401 {
        e.status = 403;
    }
    let mut resp = oauth_error(&e);
    if let Ok(v) = HeaderValue::from_str(e.code) {
        resp.headers_mut()
            .insert(HeaderName::from_static(ERROR_HEADER), v);
    }
    if e.status == 401 {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"latchkey\""),
        );
    }
    resp
}

fn bad_request(why: impl Into<String>) -> Response {
    refusal(&OAuthError::invalid_request(why))
}

fn gateway(status: u16, code: &'static str, why: impl Into<String>) -> Response {
    refusal(&OAuthError {
        status,
        code,
        ..OAuthError::invalid_request(why)
    })
}

/// The bearer token of a request to the agent API, and the user it names: one
/// `Authorization: Bearer` header exactly.
pub(super) fn agent_credentials(
    headers: &HeaderMap,
) -> Result<(String, Option<String>), OAuthError> {
    let mut auth = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (auth.next(), auth.next()) else {
        if headers.contains_key(header::AUTHORIZATION) {
            return Err(OAuthError::invalid_request(
                "send exactly one Authorization header: your Latchkey token. Latchkey adds the provider's credential itself",
            ));
        }
        return Err(OAuthError::invalid_token(
            "send your Latchkey token as `Authorization: Bearer …` (an agent token from grant_type=client_credentials, a user's token for the agent API, or a privileged-worker JWT)",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            OAuthError::invalid_token(
                "the Authorization header must be `Bearer <your Latchkey token>`",
            )
        })?;
    let mut users = headers.get_all(USER_HEADER).iter();
    let user = match (users.next(), users.next()) {
        (None, _) => None,
        (Some(v), None) => Some(
            v.to_str()
                .map_err(|_| {
                    OAuthError::invalid_request("Latchkey-User must be a user id or username")
                })?
                .trim()
                .to_owned(),
        ),
        _ => return Err(OAuthError::invalid_request("send one Latchkey-User header")),
    };
    Ok((token, user))
}

/// `/proxy/{connection}/{path…}`, any method.
pub async fn proxy(
    State(state): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let raw = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let Some((connection, path)) = split_proxy_path(&raw) else {
        return bad_request(
            "use /proxy/{connection}/{path}: the connection's name, then the API path",
        );
    };
    let path = match checked_path(path) {
        Ok(p) => p,
        Err(why) => return bad_request(why),
    };
    let (bearer, user) = match agent_credentials(&parts.headers) {
        Ok(c) => c,
        Err(e) => return refusal(&e),
    };
    let scope = match parts.headers.get(SCOPE_HEADER).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(s)) => Some(s.to_owned()),
        Some(Err(_)) => return bad_request("Latchkey-Scope must be space-separated scopes"),
    };
    if let Some(refused) =
        oversized_call(&forwarded_headers(&parts.headers), &path, query.as_deref())
    {
        return refusal(&refused);
    }
    let limits = &state.proxy.limits;
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > limits.max_request_bytes as u64)
    {
        return too_large_request(limits.max_request_bytes);
    }
    let ctx = context(&meta);
    let caller = match state
        .vault
        .authenticate_agent(&bearer, user.as_deref(), &ctx)
        .await
    {
        Ok(c) => c,
        Err(e) => return refusal(&e),
    };
    // Read (only for an authenticated caller) before anything goes out: an oversized body is
    // refused without a connection, and the body can be sent again after a refresh.
    let body = match axum::body::to_bytes(body, limits.max_request_bytes).await {
        Ok(b) => b,
        Err(_) => return too_large_request(limits.max_request_bytes),
    };
    let call = ApiCall {
        method: parts.method.as_str(),
        path: &path,
    };
    let released = match state
        .vault
        .release_for_call(&caller, connection, scope.as_deref(), Some(call), &ctx)
        .await
    {
        Ok(t) => t,
        Err(e) => return refusal(&e),
    };
    let outgoing = Outgoing {
        method: parts.method.clone(),
        path: path.clone(),
        query,
        headers: forwarded_headers(&parts.headers),
        body,
    };
    forward(&state, caller, released, outgoing, ctx).await
}

/// A call too large to forward — its headers or its path and query over what providers
/// accept — refused before anything is released or sent.
pub(super) fn oversized_call(
    headers: &HeaderMap,
    path: &str,
    query: Option<&str>,
) -> Option<OAuthError> {
    let header_bytes: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    if header_bytes > MAX_FORWARDED_HEADER_BYTES {
        return Some(OAuthError {
            status: 431,
            ..OAuthError::invalid_request(format!(
                "the headers to forward exceed the proxy's limit of {MAX_FORWARDED_HEADER_BYTES} bytes"
            ))
        });
    }
    if path.len() + query.map_or(0, str::len) > MAX_TARGET_BYTES {
        return Some(OAuthError {
            status: 414,
            ..OAuthError::invalid_request(format!(
                "the path and query exceed the proxy's limit of {MAX_TARGET_BYTES} bytes"
            ))
        });
    }
    None
}

fn too_large_request(max: usize) -> Response {
    refusal(&OAuthError {
        status: 413,
        ..OAuthError::invalid_request(format!(
            "the request body exceeds the proxy's limit of {max} bytes"
        ))
    })
}

/// What goes to the provider, minus the credential.
pub(super) struct Outgoing {
    pub method: Method,
    /// Checked by [`checked_path`].
    pub path: String,
    pub query: Option<String>,
    /// Filtered by [`forwarded_headers`].
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Send the call with the injected token (once more after a refresh if the provider answers
/// 401) and stream the answer back.
pub(super) async fn forward(
    state: &AppState,
    caller: AgentCaller,
    t: CallToken,
    out: Outgoing,
    ctx: latchkey_core::vault::RequestContext,
) -> Response {
    let vault = state.vault.clone();
    let proxy = state.proxy.clone();
    let recorder = Arc::new(Recorder {
        vault: vault.clone(),
        caller,
        ctx,
        method: out.method.to_string(),
        path: out.path.clone(),
        sent: out.body.len() as u64,
        started: Instant::now(),
    });
    let url = match target_url(&t.api_base, &out.path, out.query.as_deref()) {
        Ok(u) => u,
        Err(why) => {
            recorder.record(&t, None, 0, Some(why.clone())).await;
            return gateway(502, "bad_gateway", why);
        }
    };
    let client = match proxy.client.for_url(url.as_str()) {
        Ok((client, _)) => client,
        Err(blocked) => return refused_destination(&recorder, &t, &blocked).await,
    };
    let send = |token: &secrecy::SecretString| {
        let mut headers = out.headers.clone();
        if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())) {
            v.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, v);
        }
        client
            .request(out.method.clone(), url.clone())
            .headers(headers)
            .body(out.body.clone())
            .send()
    };
    let mut note = None;
    let mut answer = send(&t.token).await;
    if matches!(&answer, Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED) {
        match vault.refresh_for_call(&t).await {
            Ok(fresh) => {
                note = Some(
                    "the provider answered 401; retried once with a refreshed token".to_owned(),
                );
                answer = send(&fresh).await;
            }
            Err(e) => {
                note = Some(format!(
                    "the provider answered 401 and the refresh failed: {}",
                    e.code
                ));
            }
        }
    }
    let resp = match answer {
        Ok(r) => r,
        Err(e) => {
            if let Some(blocked) = Blocked::in_error(&e) {
                return refused_destination(&recorder, &t, blocked).await;
            }
            let (status, code, why) = if e.is_timeout() {
                (
                    504,
                    "gateway_timeout",
                    "the provider did not answer in time",
                )
            } else {
                (502, "bad_gateway", "the provider could not be reached")
            };
            tracing::info!(error = %e, connection = %t.connection.name, "proxied call failed");
            recorder.record(&t, None, 0, Some(why.to_owned())).await;
            return gateway(status, code, why);
        }
    };
    let status = resp.status();
    if status.is_redirection()
        && let Some(location) = resp.headers().get(header::LOCATION)
    {
        let elsewhere = location
            .to_str()
            .ok()
            .and_then(|l| resp.url().join(l).ok())
            .is_none_or(|to| to.origin() != url.origin());
        if elsewhere {
            let why = "the provider redirected to another host; Latchkey does not follow it";
            recorder
                .record(&t, Some(status.as_u16()), 0, Some(why.to_owned()))
                .await;
            return gateway(502, "redirect_refused", why);
        }
    }
    let limits = &proxy.limits;
    if resp
        .content_length()
        .is_some_and(|n| n > limits.max_response_bytes)
    {
        let why = format!(
            "the provider's answer exceeds the proxy's limit of {} bytes",
            limits.max_response_bytes
        );
        recorder
            .record(&t, Some(status.as_u16()), 0, Some(why.clone()))
            .await;
        return gateway(502, "response_too_large", why);
    }
    let mut builder = Response::builder().status(status.as_u16());
    for (name, value) in resp.headers() {
        if passes_back(name) {
            builder = builder.header(name, value);
        }
    }
    let finish: Finish = Box::new(move |received, cut| {
        let note = match (note, cut) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        tokio::spawn(async move {
            recorder
                .record(&t, Some(status.as_u16()), received, note)
                .await;
        });
    });
    let body = Metered {
        expected: resp.content_length(),
        inner: Box::pin(resp.bytes_stream()),
        received: 0,
        cap: limits.max_response_bytes,
        finish: Some(finish),
    };
    builder
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// The guard refused the connection's API address: 502 (the agent did nothing wrong; the
/// operator's configuration points somewhere Latchkey does not call), the reason for the
/// operator in the log and the audit entry.
async fn refused_destination(recorder: &Recorder, t: &CallToken, blocked: &Blocked) -> Response {
    tracing::warn!(connection = %t.connection.name, reason = %blocked, "proxied call refused by the outbound guard");
    recorder
        .record(
            t,
            None,
            0,
            Some(format!("refused by the outbound guard: {blocked}")),
        )
        .await;
    gateway(
        502,
        "bad_gateway",
        "the connection's API address is not one Latchkey calls (loopback, private, link-local \
         and metadata addresses are refused unless an operator allows them)",
    )
}

/// Writes a call's `proxy.response` entry.
struct Recorder {
    vault: Arc<latchkey_core::Vault>,
    caller: AgentCaller,
    ctx: latchkey_core::vault::RequestContext,
    method: String,
    path: String,
    sent: u64,
    started: Instant,
}

impl Recorder {
    async fn record(
        &self,
        t: &CallToken,
        status: Option<u16>,
        received: u64,
        note: Option<String>,
    ) {
        let outcome = CallOutcome {
            call: ApiCall {
                method: &self.method,
                path: &self.path,
            },
            status,
            bytes_sent: self.sent,
            bytes_received: received,
            millis: self.started.elapsed().as_millis() as u64,
            note,
        };
        self.vault
            .record_call(&self.caller, t, outcome, &self.ctx)
            .await;
    }
}

type Finish = Box<dyn FnOnce(u64, Option<String>) + Send>;

/// The provider's answer on its way to the agent: counted, cut at the cap, and recorded once
/// it ends (completely, cut, failed, or dropped because the agent went away).
struct Metered {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    /// The answer's `Content-Length`: once that much has passed the answer is complete (the
    /// server may stop polling before the stream says so).
    expected: Option<u64>,
    received: u64,
    cap: u64,
    finish: Option<Finish>,
}

impl Metered {
    fn end(&mut self, cut: Option<String>) {
        if let Some(f) = self.finish.take() {
            f(self.received, cut);
        }
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finish.is_none() && Some(self.received) != self.expected {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.end(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(chunk))) => {
                self.received += chunk.len() as u64;
                if self.received > self.cap {
                    let why = format!("answer cut at the proxy's limit of {} bytes", self.cap);
                    self.end(Some(why.clone()));
                    return Poll::Ready(Some(Err(std::io::Error::other(why))));
                }
                if Some(self.received) == self.expected {
                    self.end(None);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                let why = if e.is_timeout() {
                    "answer cut: the call took longer than the proxy allows".to_owned()
                } else {
                    "answer cut: the provider's connection failed".to_owned()
                };
                self.end(Some(why.clone()));
                Poll::Ready(Some(Err(std::io::Error::other(why))))
            }
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.end(Some("the agent stopped reading the answer".into()));
    }
}

/// `/proxy/{connection}{rest}` → (connection, rest), from the raw (still percent-encoded)
/// path.
fn split_proxy_path(raw: &str) -> Option<(&str, &str)> {
    let after = raw.strip_prefix("/proxy/")?;
    let (connection, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    let valid = !connection.is_empty()
        && connection.len() <= 64
        && connection
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    valid.then_some((connection, rest))
}

/// The API path an agent gave, checked: relative, no traversal (plain, percent-encoded or
/// double-encoded), no backslash, no encoded slash, no control characters, and no `@` or `:`
/// in its first segment (where a URL parser could read a host or a scheme). The answer is
/// the path as given (still percent-encoded), starting with `/`.
pub(super) fn checked_path(raw: &str) -> Result<String, String> {
    let path = if raw.is_empty() { "/" } else { raw };
    if path.starts_with("//") {
        return Err(
            "the path must be relative to the connection's API base URL, not a URL (`//host/…`)"
                .into(),
        );
    }
    let lower = path.to_ascii_lowercase();
    if path.contains('\\') || lower.contains("%5c") {
        return Err("backslashes are not allowed in the path".into());
    }
    if lower.contains("%2f") {
        return Err("encoded slashes (%2F) are not allowed in the path".into());
    }
    if lower.contains("%25") {
        return Err("double-encoded characters (%25…) are not allowed in the path".into());
    }
    let decoded: Vec<u8> = percent_decode(path.as_bytes());
    if decoded.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return Err("control characters are not allowed in the path".into());
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for seg in &segments {
        let d = percent_decode(seg.as_bytes());
        if d == b"." || d == b".." {
            return Err(
                "`.` and `..` segments (plain or percent-encoded) are not allowed in the path"
                    .into(),
            );
        }
    }
    if let Some(first) = segments.first() {
        let d = String::from_utf8_lossy(&percent_decode(first.as_bytes())).into_owned();
        if d.contains('@') {
            return Err(
                "`@` is not allowed in the path's first segment (it could name another host)"
                    .into(),
            );
        }
        if d.contains(':') {
            return Err("absolute URLs are not allowed: give a path relative to the connection's API base URL".into());
        }
    }
    Ok(path.to_owned())
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && i + 2 < s.len()
            && let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// The provider URL for `path` (already checked) under the connection's API base URL, or why
/// there is none: the base must be an http(s) URL without credentials, and the result must
/// keep the base's origin and stay under its path exactly as built (nothing normalised away).
fn target_url(base: &str, path: &str, query: Option<&str>) -> Result<reqwest::Url, String> {
    let parsed =
        reqwest::Url::parse(base).map_err(|_| "the connection's API base URL is not a URL")?;
    if !matches!(parsed.scheme(), "https" | "http")
        || parsed.host_str().is_none()
        || !parsed.username().is_empty()
        || parsed.password().is_some()
        || base.contains('\\')
    {
        return Err(
            "the connection's API base URL must be an http(s) URL without credentials".into(),
        );
    }
    let prefix = parsed.path().trim_end_matches('/');
    let mut url = parsed.clone();
    url.set_query(None);
    url.set_fragment(None);
    let wanted = format!("{prefix}{path}");
    url.set_path(&wanted);
    url.set_query(query);
    if url.origin() != parsed.origin() || url.path() != wanted {
        return Err("the path does not stay under the connection's API base URL".into());
    }
    Ok(url)
}

/// Request headers that go on to the provider: not the agent's credentials or cookies, not
/// hop-by-hop headers (nor those `Connection` names), not Latchkey's own, not forwarding
/// headers that would describe Latchkey's network.
pub(super) fn forwarded_headers(h: &HeaderMap) -> HeaderMap {
    let named_by_connection: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in h {
        let n = name.as_str();
        let dropped = is_hop_by_hop(n)
            || matches!(
                n,
                "authorization"
                    | "cookie"
                    | "host"
                    | "content-length"
                    | "forwarded"
                    | "x-real-ip"
                    | "x-request-id"
                    | "origin"
                    | "referer"
            )
            || n.starts_with("latchkey-")
            || n.starts_with("x-forwarded-")
            || named_by_connection.iter().any(|c| c == n);
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Response headers that go back to the agent: not hop-by-hop, not cookies.
fn passes_back(name: &HeaderName) -> bool {
    let n = name.as_str();
    !is_hop_by_hop(n) && n != "set-cookie" && n != "set-cookie2"
}

impl ProxyLimits {
    pub(super) fn shared(
        self,
        extra_root_pem: Option<&[u8]>,
        outbound: OutboundPolicy,
    ) -> Result<Arc<Proxy>, String> {
        Proxy::new(self, extra_root_pem, outbound).map(Arc::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_leave_the_base_are_refused() {
        for bad in [
            "/http://127.0.0.1:9/x",
            "/https:%2F%2Fevil",
            "//evil.example/x",
            "/a/../b",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/.%2e",
            "/%252e%252e/x",
            "/a\\b",
            "/a%5Cb",
            "/a%2Fb",
            "/@127.0.0.1:9/x",
            "/user%40evil/x",
            "/a%00b",
            "/./x",
        ] {
            assert!(checked_path(bad).is_err(), "{bad} passed");
        }
        for good in [
            "/user",
            "/repos/demo/issues",
            "/users/@me",
            "/a%20b",
            "/",
            "",
        ] {
            assert!(checked_path(good).is_ok(), "{good} refused");
        }
    }

    #[test]
    fn the_target_stays_under_the_base() {
        let u = target_url("https://api.example.com/v1", "/user", Some("a=1")).unwrap();
        assert_eq!(u.as_str(), "https://api.example.com/v1/user?a=1");
        let u = target_url("https://api.example.com/", "/", None).unwrap();
        assert_eq!(u.as_str(), "https://api.example.com/");
        assert!(target_url("https://u:p@api.example.com", "/x", None).is_err());
        assert!(target_url("https://api.example.com\\@evil", "/x", None).is_err());
        assert!(target_url("ftp://api.example.com", "/x", None).is_err());
    }

    #[test]
    fn split_names_the_connection() {
        assert_eq!(
            split_proxy_path("/proxy/demo/user"),
            Some(("demo", "/user"))
        );
        assert_eq!(split_proxy_path("/proxy/demo"), Some(("demo", "")));
        assert_eq!(split_proxy_path("/proxy//user"), None);
        assert_eq!(split_proxy_path("/proxy/de%2fmo/x"), None);
    }

    #[test]
    fn agent_credentials_and_hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer lk"));
        h.insert("cookie", HeaderValue::from_static("a=b"));
        h.insert(
            "connection",
            HeaderValue::from_static("x-secret, keep-alive"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("latchkey-user", HeaderValue::from_static("u"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("accept", HeaderValue::from_static("application/json"));
        let out = forwarded_headers(&h);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out.contains_key("accept"));
    }
}
