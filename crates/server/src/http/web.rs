//! The browser legs outside the dashboard: sign in (password, then TOTP when enrolled), sign
//! out, connecting an account (the provider's redirect and callback), Latchkey's own
//! `/authorize`, and the My Account connect ticket. Pages share the dashboard's layout
//! (`templates/`); the session cookie is `HttpOnly`, `SameSite=Lax` and `Secure` over TLS;
//! the sign-in forms carry a double-submit CSRF token; every value placed in HTML is escaped.

use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;

use latchkey_core::vault::{Authorize, ConnectDone, RequestContext, SignIn};

use super::{AppState, RequestMeta};

/// The request's id and address, for the audit entries of what it does.
pub(super) fn context(meta: &RequestMeta) -> RequestContext {
    RequestContext {
        request_id: Some(meta.request_id.clone()),
        client_ip: meta.client_ip,
    }
}

pub(super) const SESSION: &str = "latchkey_session";
pub(super) const CSRF: &str = "latchkey_csrf";

pub(super) fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

/// A page of the layout without navigation; `body` is HTML its callers built with [`esc`].
#[derive(askama::Template)]
#[template(path = "plain.html")]
struct Plain<'a> {
    title: &'a str,
    body: &'a str,
    nav: Option<super::ui::Nav>,
}

pub(super) fn page(status: StatusCode, title: &str, body: &str) -> Response {
    super::ui::render(
        status,
        &Plain {
            title,
            body,
            nav: None,
        },
    )
}

pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

pub(super) fn set_cookie(resp: &mut Response, s: &AppState, name: &str, value: &str, max_age: i64) {
    let secure = if s.tls { "; Secure" } else { "" };
    let c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}");
    if let Ok(v) = HeaderValue::from_str(&c) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

async fn session_user(s: &AppState, headers: &HeaderMap) -> Option<String> {
    let token = cookie(headers, SESSION)?;
    s.vault.session_user(&token).await.ok().flatten()
}

/// Only same-site relative paths are followed after login (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.len() <= 4096 =>
        {
            n.to_owned()
        }
        _ => "/ui".to_owned(),
    }
}

pub(super) fn login_to(next: &str) -> Response {
    let target: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/login?next={target}")).into_response()
}

pub async fn home() -> Redirect {
    Redirect::to("/ui")
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn login_page(State(s): State<AppState>, Query(q): Query<NextQuery>) -> Response {
    login_form(&s, &safe_next(q.next.as_deref()), None)
}

#[derive(askama::Template)]
#[template(path = "login.html")]
struct Login<'a> {
    title: &'a str,
    nav: Option<super::ui::Nav>,
    csrf: &'a str,
    next: &'a str,
    error: Option<&'a str>,
    /// The second step: the TOTP code.
    totp: bool,
}

/// The sign-in form (or its TOTP step), with a fresh double-submit CSRF token.
fn sign_in_form(s: &AppState, next: &str, error: Option<&str>, totp: bool) -> Response {
    let csrf = latchkey_crypto::secrets::random_token(24);
    let status = if error.is_none() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut resp = super::ui::render(
        status,
        &Login {
            title: if totp {
                "Two-step verification"
            } else {
                "Sign in"
            },
            nav: None,
            csrf: &csrf,
            next,
            error,
            totp,
        },
    );
    set_cookie(&mut resp, s, CSRF, &csrf, if totp { 300 } else { 600 });
    resp
}

fn login_form(s: &AppState, next: &str, error: Option<&str>) -> Response {
    sign_in_form(s, next, error, false)
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

pub(super) fn csrf_ok(headers: &HeaderMap, submitted: &str) -> bool {
    cookie(headers, CSRF)
        .is_some_and(|c| latchkey_crypto::secrets::ct_eq(c.as_bytes(), submitted.as_bytes()))
}

fn unavailable(e: &latchkey_core::OAuthError) -> Response {
    page(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "Sign in",
        &esc(&e.description),
    )
}

fn throttled(wait: u64) -> Response {
    let minutes = wait.div_ceil(60);
    let mut resp = page(
        StatusCode::TOO_MANY_REQUESTS,
        "Sign in",
        &format!(
            "<p role=\"alert\">Too many failed sign-in attempts. Try again in {minutes} minute(s).</p>"
        ),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(wait));
    resp
}

/// Signed in: set the session cookie, drop the form's CSRF cookie, go on.
fn signed_in(s: &AppState, token: &str, next: &str) -> Response {
    let mut resp = Redirect::to(next).into_response();
    set_cookie(&mut resp, s, SESSION, token, s.vault.config.session_ttl);
    set_cookie(&mut resp, s, CSRF, "", 0);
    resp
}

pub async fn login(
    State(s): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    if !csrf_ok(&headers, &f.csrf) {
        return login_form(
            &s,
            &next,
            Some("Your sign-in form expired. Please try again."),
        );
    }
    match s
        .vault
        .sign_in(&f.username, &f.password, &context(&meta))
        .await
    {
        Ok(SignIn::Session(token)) => signed_in(&s, &token, &next),
        Ok(SignIn::TotpRequired(pending)) => {
            let target: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
            let mut resp = Redirect::to(&format!("/login/totp?next={target}")).into_response();
            set_cookie(&mut resp, &s, SESSION, &pending, 300);
            resp
        }
        Ok(SignIn::Failed) => login_form(&s, &next, Some("Wrong username or password.")),
        Ok(SignIn::Throttled(wait)) => throttled(wait),
        Err(e) => unavailable(&e),
    }
}

fn totp_form(s: &AppState, next: &str, error: Option<&str>) -> Response {
    sign_in_form(s, next, error, true)
}

async fn pending_session(s: &AppState, headers: &HeaderMap) -> Option<String> {
    let token = cookie(headers, SESSION)?;
    let session = s.vault.session(&token).await.ok().flatten()?;
    session.pending_mfa.then_some(token)
}

pub async fn totp_page(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if pending_session(&s, &headers).await.is_none() {
        return login_to(&next);
    }
    totp_form(&s, &next, None)
}

#[derive(Deserialize)]
pub struct TotpForm {
    code: String,
    csrf: String,
    next: Option<String>,
}

pub async fn totp(
    State(s): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    headers: HeaderMap,
    Form(f): Form<TotpForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    let Some(pending) = pending_session(&s, &headers).await else {
        return login_to(&next);
    };
    if !csrf_ok(&headers, &f.csrf) {
        return totp_form(&s, &next, Some("Your form expired. Please try again."));
    }
    match s
        .vault
        .sign_in_totp(&pending, &f.code, &context(&meta))
        .await
    {
        Ok(SignIn::Session(token)) => signed_in(&s, &token, &next),
        Ok(SignIn::Throttled(wait)) => throttled(wait),
        Ok(_) => totp_form(
            &s,
            &next,
            Some("That code is not valid. Enter the current code."),
        ),
        Err(e) => unavailable(&e),
    }
}

pub async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = cookie(&headers, SESSION) {
        let _ = s.vault.end_session(&token).await;
    }
    let mut resp = Redirect::to("/login").into_response();
    set_cookie(&mut resp, &s, SESSION, "", 0);
    resp
}

/// The first release's account page lives on in the dashboard.
pub async fn account() -> Redirect {
    Redirect::permanent("/ui/accounts")
}

pub async fn connect_start(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(connection): Path<String>,
) -> Response {
    let Some(user_id) = session_user(&s, &headers).await else {
        let next: String = url::form_urlencoded::byte_serialize(connection.as_bytes()).collect();
        return login_to(&format!("/connect/{next}"));
    };
    match s.vault.connect_start(&user_id, &connection).await {
        Ok(url) => Redirect::to(&url).into_response(),
        Err(e) => page(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            "Cannot connect",
            &esc(&e.description),
        ),
    }
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    iss: Option<String>,
}

pub async fn connect_callback(
    State(s): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    Path(connection): Path<String>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let Some(user_id) = session_user(&s, &headers).await else {
        return login_to("/ui/accounts");
    };
    if let Some(err) = q.error {
        let detail = q.error_description.unwrap_or_default();
        return page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            &format!("The provider answered {}: {}", esc(&err), esc(&detail)),
        );
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            "The provider's answer is missing its code or state.",
        );
    };
    match s
        .vault
        .connect_finish_in(
            &user_id,
            &connection,
            &state,
            &code,
            q.iss.as_deref(),
            &context(&meta),
        )
        .await
    {
        // Back to the app (My Account `connect_code`) or to the /authorize request to resume.
        Ok(ConnectDone { next: Some(to), .. }) => {
            (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
        }
        Ok(ConnectDone {
            account,
            next: None,
        }) => {
            let name = s
                .vault
                .store()
                .connection_by_id(&account.connection_id)
                .await
                .ok()
                .flatten()
                .map(|c| c.name)
                .unwrap_or_default();
            let q: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
            Redirect::to(&format!("/ui/accounts?connected={q}")).into_response()
        }
        Err(e) => page(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            "Not connected",
            &esc(&e.description),
        ),
    }
}

/// `GET /authorize`: Latchkey as the OpenID provider of first-party apps.
pub async fn authorize(
    State(s): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let query = uri.query().unwrap_or("");
    let pairs = url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()));
    let params = match latchkey_core::params::Params::from_pairs(pairs) {
        Ok(p) => p,
        Err(e) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Cannot sign in",
                &esc(&e.description),
            );
        }
    };
    let session = match cookie(&headers, SESSION) {
        Some(token) => s.vault.session(&token).await.ok().flatten(),
        None => None,
    };
    match s.vault.authorize(&params, session.as_ref(), query).await {
        Ok(Authorize::Redirect(to)) => {
            let mut resp = (StatusCode::FOUND, [(header::LOCATION, to)]).into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Ok(Authorize::SignIn { return_query }) => login_to(&format!("/authorize?{return_query}")),
        Ok(Authorize::ErrorPage(message)) => page(
            StatusCode::BAD_REQUEST,
            "Cannot sign in",
            &format!("<p>{}</p>", esc(&message)),
        ),
        Err(e) => unavailable(&e),
    }
}

/// `GET /connected-accounts/connect?ticket=…`: the browser leg of a My Account connect. The
/// ticket is bound to a user; the browser must be signed in as that user.
pub async fn connect_ticket(
    State(s): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let Some(user_id) = session_user(&s, &headers).await else {
        return login_to(&format!(
            "/connected-accounts/connect?{}",
            uri.query().unwrap_or("")
        ));
    };
    let ticket = uri
        .query()
        .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "ticket"))
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    match s.vault.my_account_ticket(&user_id, &ticket).await {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(e) => page(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            "Cannot connect",
            &esc(&e.description),
        ),
    }
}
