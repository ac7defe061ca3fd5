//! Where approvals meet HTTP: `POST /bc-authorize` (CIBA; its grant is polled at
//! `/oauth/token`) and the minimal approvals pages — `GET /approvals` lists the signed-in
//! user's requests, `GET /approvals/{id}` shows one exactly as asked (agent, connection, scopes,
//! risk, binding message, `authorization_details` verbatim) with Approve and Deny, and `POST
//! /approvals/{id}` decides it, asking for a TOTP code when the request needs step-up. (The
//! full dashboard replaces these pages later.) Same rules as the other pages: no script, every
//! value escaped, a double-submit CSRF token on the form, `SameSite=Lax` session cookie.

use axum::body::Body;
use axum::extract::{Extension, Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use latchkey_core::model::{Approval, ApprovalStatus, Session};
use latchkey_core::vault::{ApprovalDecision, DecideError, Decider};
use serde::Deserialize;

use super::errors::{json_response, oauth_error};
use super::oauth::client_request;
use super::web::{CSRF, SESSION, context, cookie, csrf_ok, esc, login_to, page, set_cookie};
use super::{AppState, RequestMeta};

/// `POST /bc-authorize`: start a CIBA request; the answer is `{auth_req_id, expires_in,
/// interval}`.
pub async fn bc_authorize(
    State(state): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (params, basic) = client_request(&headers, body).await?;
        state
            .vault
            .bc_authorize(&params, basic, &context(&meta))
            .await
    }
    .await;
    match result {
        Ok(r) => json_response(
            StatusCode::OK,
            &serde_json::json!({
                "auth_req_id": r.auth_req_id,
                "expires_in": r.expires_in,
                "interval": r.interval,
            }),
            None,
        ),
        Err(e) => oauth_error(&e),
    }
}

/// The signed-in session behind the cookie (its value and record).
async fn signed_in(s: &AppState, headers: &HeaderMap) -> Option<(String, Session)> {
    let token = cookie(headers, SESSION)?;
    let session = s.vault.session(&token).await.ok().flatten()?;
    (!session.pending_mfa).then_some((token, session))
}

fn unavailable() -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Approvals",
        "<p role=\"alert\">The database is unavailable; retry shortly.</p>",
    )
}

fn when(vault_now: i64, t: i64) -> String {
    let d = t - vault_now;
    if d >= 0 {
        format!("in {} s", d)
    } else {
        format!("{} s ago", -d)
    }
}

/// `GET /approvals`: the user's requests, pending first.
pub async fn list(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let Some((_, session)) = signed_in(&s, &headers).await else {
        return login_to("/approvals");
    };
    let Ok(all) = s.vault.user_approvals(&session.user_id, None, 50).await else {
        return unavailable();
    };
    let now = s.vault.now();
    let (pending, done): (Vec<&Approval>, Vec<&Approval>) = all
        .iter()
        .partition(|a| a.status == ApprovalStatus::Pending && a.expires_at > now);
    let item = |a: &Approval| {
        let what = match &a.connection {
            Some(c) => format!("{} on {}", a.scopes, c),
            None => a.scopes.to_string(),
        };
        format!(
            "<li><a href=\"/approvals/{id}\">{id}</a>: <code>{agent}</code> asks for {what} (risk {risk}){msg} — {status}</li>",
            id = esc(&a.id),
            agent = esc(&a.client_id),
            what = esc(&what),
            risk = esc(&a.risk),
            msg = a
                .binding_message
                .as_deref()
                .map(|m| format!(", “{}”", esc(m)))
                .unwrap_or_default(),
            status = if a.status == ApprovalStatus::Pending && a.expires_at <= now {
                "expired"
            } else {
                a.status.as_str()
            },
        )
    };
    let pending_html = if pending.is_empty() {
        "<p>Nothing is waiting for you.</p>".to_owned()
    } else {
        format!(
            "<ul>{}</ul>",
            pending.iter().map(|a| item(a)).collect::<String>()
        )
    };
    let body = format!(
        "<h2>Waiting for you</h2>{pending_html}<h2>Earlier</h2><ul>{}</ul>",
        done.iter().map(|a| item(a)).collect::<String>()
    );
    page(StatusCode::OK, "Approvals", &body)
}

/// One request, and the form to decide it.
async fn show(
    s: &AppState,
    a: &Approval,
    session: &Session,
    status: StatusCode,
    message: Option<&str>,
) -> Response {
    let agent = s
        .vault
        .store()
        .agent_by_id(&a.client_id)
        .await
        .ok()
        .flatten();
    let now = s.vault.now();
    let mut rows = vec![
        (
            "Agent",
            format!(
                "{} (<code>{}</code>)",
                esc(agent.as_ref().map_or("unknown", |g| g.name.as_str())),
                esc(&a.client_id)
            ),
        ),
        (
            "Asks for",
            match a.kind {
                latchkey_core::model::ApprovalKind::Exchange => {
                    "a token for one of your connected accounts".to_owned()
                }
                latchkey_core::model::ApprovalKind::Ciba => {
                    "to act as you (sign-in tokens)".to_owned()
                }
            },
        ),
        (
            "Connection",
            a.connection
                .as_deref()
                .map(|c| format!("<code>{}</code>", esc(c)))
                .unwrap_or_else(|| "—".into()),
        ),
        (
            "Scopes",
            a.scopes
                .iter()
                .map(|s| format!("<code>{}</code>", esc(s)))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("Risk", esc(&a.risk)),
        (
            "Message",
            a.binding_message
                .as_deref()
                .map(|m| format!("<strong>{}</strong>", esc(m)))
                .unwrap_or_else(|| "—".into()),
        ),
    ];
    if let Some(aud) = &a.audience {
        rows.push(("Audience", format!("<code>{}</code>", esc(aud))));
    }
    if let Some(ctx) = &a.audit_context {
        rows.push(("The agent's reason", esc(ctx)));
    }
    if let Some(d) = &a.authorization_details {
        rows.push(("Authorization details", format!("<pre>{}</pre>", esc(d))));
    }
    let live = a.status == ApprovalStatus::Pending && a.expires_at > now;
    rows.push((
        "Status",
        if live {
            format!("pending, expires {}", when(now, a.expires_at))
        } else if a.status == ApprovalStatus::Pending {
            "expired".into()
        } else {
            let by = a.decided_by.as_deref().unwrap_or("");
            format!(
                "{}{}{}",
                a.status.as_str(),
                if by.is_empty() {
                    String::new()
                } else {
                    format!(" by {}", esc(by))
                },
                if a.stepped_up { " (with step-up)" } else { "" }
            )
        },
    ));
    if a.single_use {
        rows.push(("Use", "once".into()));
    }
    let table: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th scope=\"row\">{k}</th><td>{v}</td></tr>"))
        .collect();
    let message = message
        .map(|m| format!("<p role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default();
    let csrf = latchkey_crypto::secrets::random_token(24);
    let form = if live {
        let step_up = s.vault.needs_step_up(a, session);
        let code = if step_up {
            "<p>Approving this request needs your second factor.</p>\
             <p><label for=\"code\">Code from your authenticator app</label><br><input id=\"code\" name=\"code\" \
             inputmode=\"numeric\" autocomplete=\"one-time-code\" pattern=\"[0-9]{6}\" maxlength=\"6\"></p>"
        } else {
            ""
        };
        format!(
            "<form method=\"post\" action=\"/approvals/{id}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">{code}\
             <p><button type=\"submit\" name=\"decision\" value=\"approve\">Approve</button> \
             <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button></p></form>",
            id = esc(&a.id)
        )
    } else {
        String::new()
    };
    let body = format!(
        "{message}<table>{table}</table>{form}<p><a href=\"/approvals\">All approvals</a></p>"
    );
    let mut resp = page(status, "Approval request", &body);
    if live {
        set_cookie(&mut resp, s, CSRF, &csrf, 600);
    }
    resp
}

/// `GET /approvals/{id}`.
pub async fn detail(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let Some((_, session)) = signed_in(&s, &headers).await else {
        let next: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
        return login_to(&format!("/approvals/{next}"));
    };
    match s.vault.user_approval(&id, &session.user_id).await {
        Ok(Some(a)) => show(&s, &a, &session, StatusCode::OK, None).await,
        Ok(None) => page(
            StatusCode::NOT_FOUND,
            "Approval request",
            "<p>There is no such request for you.</p>",
        ),
        Err(_) => unavailable(),
    }
}

#[derive(Deserialize)]
pub struct DecisionForm {
    csrf: String,
    decision: String,
    code: Option<String>,
}

/// `POST /approvals/{id}`: approve or deny.
pub async fn decide(
    State(s): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<DecisionForm>,
) -> Response {
    let Some((token, session)) = signed_in(&s, &headers).await else {
        return login_to("/approvals");
    };
    let again = |status: StatusCode, message: String| {
        let (s, id, session) = (&s, &id, &session);
        async move {
            match s.vault.user_approval(id, &session.user_id).await {
                Ok(Some(a)) => show(s, &a, session, status, Some(&message)).await,
                Ok(None) => page(
                    StatusCode::NOT_FOUND,
                    "Approval request",
                    "<p>There is no such request for you.</p>",
                ),
                Err(_) => unavailable(),
            }
        }
    };
    if !csrf_ok(&headers, &f.csrf) {
        return again(
            StatusCode::FORBIDDEN,
            "Your form expired. Please try again.".into(),
        )
        .await;
    }
    let decision = match f.decision.as_str() {
        "approve" => ApprovalDecision::Approve,
        "deny" => ApprovalDecision::Deny,
        _ => return again(StatusCode::BAD_REQUEST, "Choose Approve or Deny.".into()).await,
    };
    let ctx = context(&meta);
    let code = f.code.as_deref().map(str::trim).filter(|c| !c.is_empty());
    let result = s
        .vault
        .decide_approval(
            &id,
            decision,
            None,
            Decider::User {
                session_token: &token,
                totp: code,
                ctx: &ctx,
            },
        )
        .await;
    match result {
        Ok(_) => {
            let mut resp = Redirect::to(&format!("/approvals/{id}")).into_response();
            set_cookie(&mut resp, &s, CSRF, "", 0);
            resp
        }
        Err(e) => {
            let status = match e {
                DecideError::NotFound => StatusCode::NOT_FOUND,
                DecideError::NotPending(_) => StatusCode::CONFLICT,
                DecideError::StepUpRequired | DecideError::NoSecondFactor => StatusCode::FORBIDDEN,
                DecideError::WrongCode => StatusCode::UNAUTHORIZED,
                DecideError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
                DecideError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut message = e.to_string();
            if let Some(first) = message.get(..1) {
                message = first.to_uppercase() + &message[1..];
            }
            again(status, format!("{message}.")).await
        }
    }
}
