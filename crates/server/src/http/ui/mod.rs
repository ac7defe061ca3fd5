//! The dashboard under `/ui`: server-rendered pages (askama templates in `templates/`, which
//! escape every value), htmx vendored under `/ui/static` for the few places that refresh in
//! place. Every action is a plain form first, so the dashboard works without JavaScript.
//!
//! Rules every page follows:
//! - A strict Content-Security-Policy: scripts and styles from this origin only, no inline
//!   script, no `eval` (htmx is configured with `allowEval: false`).
//! - Who may see what is decided here, on the server, for every request: [`Viewer`] is a
//!   signed-in user (password, and TOTP when enrolled); [`OperatorView`] is a viewer with the
//!   operator role. A user reaches only their own accounts, approvals and activity; a row of
//!   another user's answers 404, exactly like a row that does not exist.
//! - Every form that changes something carries a CSRF token bound to the session (a hash of
//!   the session token, which the page can show without revealing the cookie), checked before
//!   anything else happens.

mod accounts;
mod activity;
mod agents;
mod approvals;
mod chart;
mod overview;
mod security;
mod users;

use askama::Template;
use axum::Router;
use axum::extract::{FromRequestParts, OriginalUri, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use latchkey_core::model::{Role, Session, User};

use super::AppState;
use super::web::{SESSION, cookie, login_to};

pub use activity::ChainCache;

/// Scripts and styles from this origin only; no inline script and no `eval`.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(overview::page))
        .route("/static/{file}", get(asset))
        .route("/accounts", get(accounts::list))
        .route(
            "/accounts/{id}/disconnect",
            get(accounts::confirm_disconnect).post(accounts::disconnect),
        )
        .route("/approvals", get(approvals::inbox))
        .route("/approvals/pending", get(approvals::pending_fragment))
        .route(
            "/approvals/{id}",
            get(approvals::detail).post(approvals::decide),
        )
        .route("/activity", get(activity::page))
        .route("/activity/export", get(activity::export))
        .route("/activity/verify", post(activity::verify))
        .route("/security", get(security::page))
        .route("/security/totp", post(security::start))
        .route("/security/totp/confirm", post(security::confirm))
        .route("/agents", get(agents::list).post(agents::register))
        .route("/agents/{id}", get(agents::detail))
        .route("/agents/{id}/grants", post(agents::save_grant))
        .route(
            "/agents/{id}/grants/{connection}/remove",
            post(agents::remove_grant),
        )
        .route("/agents/{id}/state", post(agents::set_state))
        .route("/users", get(users::list).post(users::create))
        .route("/users/{id}/role", post(users::set_role))
        .route(
            "/users/{id}/delete",
            get(users::confirm_delete).post(users::delete),
        )
        // Forms and key files are small.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::map_response(page_for_bare_errors))
}

/// Refusals made before a handler runs — a form or query that does not parse, a body over
/// the limit, a form sent as another media type, a path that is not UTF-8, a method the page
/// does not take — are pages of the layout too, not axum's plain-text reason (which would
/// echo what the client sent). Headers such as `Allow` are kept.
pub(super) async fn page_for_bare_errors(resp: Response) -> Response {
    let status = resp.status();
    let html = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html || !status.is_client_error() {
        return resp;
    }
    let text = match status {
        StatusCode::METHOD_NOT_ALLOWED => "This page does not take this method.",
        StatusCode::PAYLOAD_TOO_LARGE => "What was sent is too large.",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            "Send the form as a browser does (application/x-www-form-urlencoded)."
        }
        StatusCode::NOT_FOUND => "There is no such page.",
        _ => "The request could not be read. Go back, reload the page and try again.",
    };
    let mut fresh = message(
        status,
        status.canonical_reason().unwrap_or("Refused"),
        text,
        None,
    );
    for name in [header::ALLOW, header::RETRY_AFTER] {
        if let Some(v) = resp.headers().get(&name) {
            fresh.headers_mut().insert(name, v.clone());
        }
    }
    fresh
}

// --- responses ---------------------------------------------------------------------------------

/// A rendered page with the dashboard's headers.
pub(super) fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => with_headers((status, Html(html)).into_response()),
        Err(e) => {
            tracing::error!(error = %e, "rendering a page failed");
            with_headers(
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The page could not be rendered.",
                )
                    .into_response(),
            )
        }
    }
}

fn with_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Longest notice carried by a redirect after a change, in characters.
const MAX_NOTICE: usize = 300;

/// The header, navigation and messages every signed-in page shares.
pub(super) struct Nav {
    pub username: String,
    pub operator: bool,
    /// The session's CSRF token, for every form on the page.
    pub csrf: String,
    /// Which navigation entry is this page's.
    pub active: &'static str,
    pub notice: Option<String>,
    pub error: Option<String>,
}

/// A page that only says something (an error, a refusal), inside the layout.
#[derive(Template)]
#[template(path = "message.html")]
pub(super) struct Message<'a> {
    pub title: &'a str,
    pub text: &'a str,
    /// `None` outside a session (sign-in errors and the like).
    pub nav: Option<Nav>,
}

/// A message page with `status`.
pub(super) fn message(status: StatusCode, title: &str, text: &str, nav: Option<Nav>) -> Response {
    render(status, &Message { title, text, nav })
}

pub(super) fn unavailable() -> Response {
    message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "The database is unavailable; retry shortly.",
        None,
    )
}

/// A row that is not there, or not this viewer's: the same answer.
pub(super) fn not_found(v: &Viewer, what: &str) -> Response {
    message(
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("There is no such {what} for you."),
        Some(v.nav("")),
    )
}

/// htmx and the stylesheet, served from the binary (no CDN).
async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match file.as_str() {
        "htmx-2.0.8.min.js" => (
            include_bytes!("../../../static/htmx-2.0.8.min.js"),
            "text/javascript; charset=utf-8",
        ),
        "app.css" => (
            include_bytes!("../../../static/app.css"),
            "text/css; charset=utf-8",
        ),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut resp = (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

// --- who is asking -----------------------------------------------------------------------------

/// A signed-in user (password, and the TOTP code when enrolled).
pub(super) struct Viewer {
    pub token: String,
    pub session: Session,
    pub user: User,
    pub csrf: String,
}

impl Viewer {
    pub fn operator(&self) -> bool {
        self.user.role == Role::Operator
    }

    pub fn nav(&self, active: &'static str) -> Nav {
        Nav {
            username: self.user.username.clone(),
            operator: self.operator(),
            csrf: self.csrf.clone(),
            active,
            notice: None,
            error: None,
        }
    }

    /// After a change: back to `to` with a notice. The notice travels in the URL with a
    /// signature bound to this session, so a crafted link cannot put words on a page.
    pub fn done(&self, to: &str, notice: &str) -> Response {
        // Notices can echo what was submitted (a grant's scopes): bounded, so the redirect's
        // `Location` stays a size every client reads (HTTP/2 clients refuse large headers).
        let notice = if notice.chars().count() > MAX_NOTICE {
            format!("{}…", notice.chars().take(MAX_NOTICE).collect::<String>())
        } else {
            notice.to_owned()
        };
        let notice = notice.as_str();
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("notice", notice)
            .append_pair("sig", &self.notice_sig(notice));
        let sep = if to.contains('?') { '&' } else { '?' };
        Redirect::to(&format!("{to}{sep}{}", q.finish())).into_response()
    }

    fn notice_sig(&self, notice: &str) -> String {
        latchkey_crypto::secrets::sha256_b64(
            format!("latchkey-ui-notice\0{}\0{notice}", self.token).as_bytes(),
        )
    }

    /// The notice of [`Self::done`], if its signature is this session's.
    pub fn notice(&self, q: &NoticeQuery) -> Option<String> {
        let (notice, sig) = (q.notice.as_deref()?, q.sig.as_deref()?);
        latchkey_crypto::secrets::ct_eq(self.notice_sig(notice).as_bytes(), sig.as_bytes())
            .then(|| notice.to_owned())
    }

    /// The refusal of a form without this session's CSRF token (checked before anything
    /// else happens); `None` when the token is right.
    pub fn csrf_refusal(&self, submitted: &str) -> Option<Response> {
        if latchkey_crypto::secrets::ct_eq(self.csrf.as_bytes(), submitted.as_bytes()) {
            None
        } else {
            Some(message(
                StatusCode::FORBIDDEN,
                "Form refused",
                "This form did not come from your current session (or it expired). Reload the page and try again.",
                Some(self.nav("")),
            ))
        }
    }
}

/// The CSRF token of a session: derived from its token, so it needs no storage and dies with
/// the session; a hash, so the page can carry it without giving the cookie away.
fn csrf_for(session_token: &str) -> String {
    latchkey_crypto::secrets::sha256_b64(format!("latchkey-ui-csrf\0{session_token}").as_bytes())
}

/// Signed out: to the sign-in page. A request htmx made in the background (the refreshing
/// approvals list) gets `HX-Redirect`, so the whole page goes there instead of a fragment.
fn to_sign_in(parts: &Parts, back: &str) -> Response {
    if !parts.headers.contains_key("hx-request") {
        return login_to(back);
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert("hx-redirect", HeaderValue::from_static("/login?next=%2Fui"));
    resp
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Response> {
        // After signing in, come back here (a form's target is not a page: go to the overview).
        // (Inside `/ui` the router sees the path without its prefix: use the original.)
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map_or(&parts.uri, |o| &o.0);
        let back = match parts.method {
            Method::GET => uri
                .path_and_query()
                .map_or("/ui", |p| p.as_str())
                .to_owned(),
            _ => "/ui".to_owned(),
        };
        let Some(token) = cookie(&parts.headers, SESSION) else {
            return Err(to_sign_in(parts, &back));
        };
        let session = match s.vault.session(&token).await {
            Ok(Some(session)) if !session.pending_mfa => session,
            Ok(_) => return Err(to_sign_in(parts, &back)),
            Err(_) => return Err(unavailable()),
        };
        let user = match s.vault.store().user_by_id(&session.user_id).await {
            Ok(Some(user)) => user,
            Ok(None) => return Err(to_sign_in(parts, &back)),
            Err(_) => return Err(unavailable()),
        };
        Ok(Viewer {
            csrf: csrf_for(&token),
            token,
            session,
            user,
        })
    }
}

/// A viewer with the operator role; anyone else gets 403.
pub(super) struct OperatorView(pub Viewer);

impl FromRequestParts<AppState> for OperatorView {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Response> {
        let v = Viewer::from_request_parts(parts, s).await?;
        if !v.operator() {
            return Err(message(
                StatusCode::FORBIDDEN,
                "Operators only",
                "This page is for operators. Ask an operator if you need an agent registered or changed.",
                Some(v.nav("")),
            ));
        }
        Ok(OperatorView(v))
    }
}

/// A form whose only field is the CSRF token (a button that does one thing).
#[derive(serde::Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

/// `?notice=…&sig=…` of a redirect after a change ([`Viewer::done`]).
#[derive(serde::Deserialize, Default, Clone)]
pub(super) struct NoticeQuery {
    pub notice: Option<String>,
    pub sig: Option<String>,
}

/// A time as `2026-11-22 20:14 UTC` (pages show minutes; the export has seconds).
pub(super) fn when(t: i64) -> String {
    use time::macros::format_description;
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// An axum state handle for the handlers of this module.
pub(super) type S = State<AppState>;
