//! The minimal browser flow of the first release: sign in, see your connections, connect one.
//! (The full dashboard replaces these pages later.) Plain server-rendered HTML, no script;
//! the session cookie is `HttpOnly`, `SameSite=Lax` and `Secure` over TLS; the login form
//! carries a double-submit CSRF token; every value placed in HTML is escaped.

use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
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

pub(super) fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" \
         content=\"width=device-width, initial-scale=1\"><title>{t} · Latchkey</title></head><body><main>\
         <h1>{t}</h1>{body}</main></body></html>",
        t = esc(title)
    );
    let mut resp = (status, Html(html)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
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
        _ => "/account".to_owned(),
    }
}

pub(super) fn login_to(next: &str) -> Response {
    let target: String = url::form_urlencoded::byte_serialize(next.as_bytes()).collect();
    Redirect::to(&format!("/login?next={target}")).into_response()
}

pub async fn home() -> Redirect {
    Redirect::to("/account")
}

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn login_page(State(s): State<AppState>, Query(q): Query<NextQuery>) -> Response {
    login_form(&s, &safe_next(q.next.as_deref()), None)
}

fn login_form(s: &AppState, next: &str, error: Option<&str>) -> Response {
    let csrf = latchkey_crypto::secrets::random_token(24);
    let error = error
        .map(|e| format!("<p role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    let body = format!(
        "{error}<form method=\"post\" action=\"/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <p><label for=\"username\">Username</label><br><input id=\"username\" name=\"username\" autocomplete=\"username\" required></p>\
         <p><label for=\"password\">Password</label><br><input id=\"password\" name=\"password\" type=\"password\" \
         autocomplete=\"current-password\" required></p><p><button type=\"submit\">Sign in</button></p></form>",
        next = esc(next)
    );
    let status = if error.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut resp = page(status, "Sign in", &body);
    set_cookie(&mut resp, s, CSRF, &csrf, 600);
    resp
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
    let csrf = latchkey_crypto::secrets::random_token(24);
    let error = error
        .map(|e| format!("<p role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    let body = format!(
        "{error}<form method=\"post\" action=\"/login/totp\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><input type=\"hidden\" name=\"next\" value=\"{next}\">\
         <p><label for=\"code\">Code from your authenticator app</label><br><input id=\"code\" name=\"code\" \
         inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9]{{6}}\" maxlength=\"6\" required></p>\
         <p><button type=\"submit\">Verify</button></p></form>",
        next = esc(next)
    );
    let status = if error.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut resp = page(status, "Two-step verification", &body);
    set_cookie(&mut resp, s, CSRF, &csrf, 300);
    resp
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

#[derive(Deserialize)]
pub struct AccountQuery {
    connected: Option<String>,
}

pub async fn account(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<AccountQuery>,
) -> Response {
    let Some(user_id) = session_user(&s, &headers).await else {
        return login_to("/account");
    };
    let store = s.vault.store();
    let (Ok(connections), Ok(accounts)) = (
        store.list_connections().await,
        store.list_accounts(Some(&user_id)).await,
    ) else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Your connections",
            "The database is unavailable; retry shortly.",
        );
    };
    let mut rows = String::new();
    for c in &connections {
        let mine: Vec<_> = accounts
            .iter()
            .filter(|a| a.connection_id == c.id)
            .collect();
        let status = if mine.is_empty() {
            "not connected".to_owned()
        } else {
            mine.iter()
                .map(|a| {
                    format!(
                        "{} ({}, {}; scopes: {})",
                        esc(a.upstream_account_id.as_deref().unwrap_or("account")),
                        esc(&a.id),
                        a.status.as_str(),
                        esc(&a.scopes.to_string_spaced())
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        rows.push_str(&format!(
            "<li><strong>{name}</strong>: {status} — <a href=\"/connect/{name}\">Connect {name}</a></li>",
            name = esc(&c.name)
        ));
    }
    let notice = q
        .connected
        .map(|c| format!("<p role=\"status\">Connected {}.</p>", esc(&c)))
        .unwrap_or_default();
    let body = format!(
        "{notice}<p>Signed in as <code>{}</code>.</p><ul>{rows}</ul>\
         <form method=\"post\" action=\"/logout\"><button type=\"submit\">Sign out</button></form>",
        esc(&user_id)
    );
    page(StatusCode::OK, "Your connections", &body)
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
        return login_to("/account");
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
            Redirect::to(&format!("/account?connected={q}")).into_response()
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
