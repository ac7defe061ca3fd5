//! Security: set up two-step verification (TOTP) with a QR code for the authenticator app.
//! Once it is on, sign-in asks for a code, and so do approvals that need step-up; turning it
//! off or moving it to a new device is an operator's `latchkey user mfa` (so that a stolen
//! session alone cannot remove the second factor).

use askama::Template;
use axum::extract::{Form, Query};
use axum::http::StatusCode;
use axum::response::Response;
use latchkey_core::vault::{Actor, AdminError};

use super::{CsrfForm, Nav, NoticeQuery, S, Viewer, message, render};

#[derive(Template)]
#[template(path = "security.html")]
struct Security {
    title: &'static str,
    nav: Option<Nav>,
    enabled: bool,
    /// During enrolment: the QR code (SVG), the secret in base32 and the URI it encodes.
    enrol: Option<Enrolment>,
}

struct Enrolment {
    qr_svg: String,
    secret: String,
    uri: String,
}

fn enrolment(uri: &str) -> Option<Enrolment> {
    let secret = url::Url::parse(uri)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == "secret")?
        .1
        .into_owned();
    let code = qrcode::QrCode::new(uri.as_bytes()).ok()?;
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(200, 200)
        .build();
    // The renderer starts with an XML declaration; inline SVG in HTML starts at `<svg`.
    let qr_svg = svg.get(svg.find("<svg")?..)?.to_owned();
    Some(Enrolment {
        qr_svg,
        secret,
        uri: uri.to_owned(),
    })
}

fn show(v: &Viewer, status: StatusCode, enrol: Option<Enrolment>, nav: Nav) -> Response {
    render(
        status,
        &Security {
            title: "Security",
            nav: Some(nav),
            enabled: v.user.totp_enabled,
            enrol,
        },
    )
}

pub async fn page(v: Viewer, Query(q): Query<NoticeQuery>) -> Response {
    let mut nav = v.nav("security");
    nav.notice = v.notice(&q);
    show(&v, StatusCode::OK, None, nav)
}

/// Already on: changing it needs an operator.
fn already_on(v: &Viewer) -> Response {
    message(
        StatusCode::CONFLICT,
        "Security",
        "Two-step verification is already on. To move it to a new device, ask an operator to reset it (latchkey user mfa --disable).",
        Some(v.nav("security")),
    )
}

/// `POST /ui/security/totp`: a new secret, shown once as a QR code.
pub async fn start(s: S, v: Viewer, Form(f): Form<CsrfForm>) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    if v.user.totp_enabled {
        return already_on(&v);
    }
    let uri = match s
        .vault
        .totp_enrol(&v.user.id, &Actor::user(&v.user.id))
        .await
    {
        Ok(uri) => uri,
        Err(_) => return super::unavailable(),
    };
    match enrolment(&uri) {
        Some(e) => show(&v, StatusCode::OK, Some(e), v.nav("security")),
        None => super::unavailable(),
    }
}

#[derive(serde::Deserialize)]
pub struct ConfirmForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
    /// The URI shown on the enrolment page, to show it again after a wrong code (the check
    /// itself uses the stored secret only).
    #[serde(default)]
    uri: String,
}

/// `POST /ui/security/totp/confirm`: a current code turns it on.
pub async fn confirm(s: S, v: Viewer, Form(f): Form<ConfirmForm>) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    if v.user.totp_enabled {
        return already_on(&v);
    }
    match s
        .vault
        .totp_confirm(&v.user.id, f.code.trim(), &Actor::user(&v.user.id))
        .await
    {
        Ok(()) => v.done("/ui/security", "Two-step verification is on."),
        Err(AdminError::Invalid(why)) => {
            let mut nav = v.nav("security");
            nav.error = Some(format!("Not turned on: {why}."));
            let enrol = f
                .uri
                .starts_with("otpauth://")
                .then(|| enrolment(&f.uri))
                .flatten();
            show(&v, StatusCode::BAD_REQUEST, enrol, nav)
        }
        Err(_) => super::unavailable(),
    }
}
