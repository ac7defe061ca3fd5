//! The approvals inbox: what agents wait for (refreshed in place every few seconds with htmx,
//! or by reloading), each request in full — agent, connection, scopes, risk, binding message,
//! the agent's reason, `authorization_details` verbatim — approve (with the TOTP code when the
//! request needs step-up) or deny, and the history.

use askama::Template;
use axum::extract::{Extension, Form, Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use latchkey_core::model::{Approval, ApprovalKind, ApprovalStatus};
use latchkey_core::vault::{ApprovalDecision, DecideError, Decider};

use super::super::RequestMeta;
use super::super::web::context;
use super::{Nav, NoticeQuery, S, Viewer, message, not_found, render, unavailable, when};

/// One request, as the pages show it.
pub(super) struct ApprovalRow {
    pub id: String,
    pub agent: String,
    pub agent_id: String,
    pub what: String,
    pub connection: Option<String>,
    pub scopes: Vec<String>,
    pub risk: String,
    pub message: Option<String>,
    pub status: String,
    pub created: String,
    pub pending: bool,
}

/// `status` as shown: a pending request past its deadline is `expired`.
fn status_text(a: &Approval, now: i64) -> String {
    if a.status == ApprovalStatus::Pending && a.expires_at <= now {
        return "expired".into();
    }
    if a.status == ApprovalStatus::Pending {
        return format!("pending, decide by {}", when(a.expires_at));
    }
    let mut s = a.status.as_str().to_owned();
    if let Some(by) = &a.decided_by {
        s.push_str(&format!(" by {by}"));
    }
    if let Some(at) = a.decided_at {
        s.push_str(&format!(" at {}", when(at)));
    }
    if a.stepped_up {
        s.push_str(" (with step-up)");
    }
    s
}

pub(super) async fn approval_rows(s: &S, list: &[Approval]) -> Vec<ApprovalRow> {
    let agents = s.vault.store().list_agents().await.unwrap_or_default();
    let now = s.vault.now();
    list.iter()
        .map(|a| ApprovalRow {
            id: a.id.clone(),
            agent: agents
                .iter()
                .find(|g| g.id == a.client_id)
                .map_or_else(|| "unknown agent".into(), |g| g.name.clone()),
            agent_id: a.client_id.clone(),
            what: match a.kind {
                ApprovalKind::Exchange => "a token for one of your connected accounts".into(),
                ApprovalKind::Ciba => "to act as you (sign-in tokens)".into(),
            },
            connection: a.connection.clone(),
            scopes: a.scopes.iter().map(str::to_owned).collect(),
            risk: a.risk.clone(),
            message: a.binding_message.clone(),
            status: status_text(a, now),
            created: when(a.created_at),
            pending: a.status == ApprovalStatus::Pending && a.expires_at > now,
        })
        .collect()
}

/// The viewer's requests, split into waiting and decided.
pub(super) async fn split(s: &S, v: &Viewer) -> Option<(Vec<ApprovalRow>, Vec<ApprovalRow>)> {
    let all = s.vault.user_approvals(&v.user.id, None, 100).await.ok()?;
    let rows = approval_rows(s, &all).await;
    Some(rows.into_iter().partition(|r| r.pending))
}

#[derive(Template)]
#[template(path = "approvals.html")]
struct Inbox {
    title: &'static str,
    nav: Option<Nav>,
    pending: Vec<ApprovalRow>,
    history: Vec<ApprovalRow>,
}

pub async fn inbox(s: S, v: Viewer, Query(q): Query<NoticeQuery>) -> Response {
    let Some((pending, history)) = split(&s, &v).await else {
        return unavailable();
    };
    let mut nav = v.nav("approvals");
    nav.notice = v.notice(&q);
    render(
        StatusCode::OK,
        &Inbox {
            title: "Approvals",
            nav: Some(nav),
            pending,
            history,
        },
    )
}

#[derive(Template)]
#[template(path = "approvals_pending.html")]
struct PendingFragment {
    pending: Vec<ApprovalRow>,
}

/// `GET /ui/approvals/pending`: the waiting list alone, for htmx to refresh in place.
pub async fn pending_fragment(s: S, v: Viewer) -> Response {
    let Some((pending, _)) = split(&s, &v).await else {
        return unavailable();
    };
    render(StatusCode::OK, &PendingFragment { pending })
}

#[derive(Template)]
#[template(path = "approval.html")]
struct Detail {
    title: &'static str,
    nav: Option<Nav>,
    a: ApprovalRow,
    audience: Option<String>,
    reason: Option<String>,
    authorization_details: Option<String>,
    single_use: bool,
    step_up: bool,
}

async fn show(
    s: &S,
    v: &Viewer,
    a: &Approval,
    status: StatusCode,
    error: Option<String>,
) -> Response {
    let mut nav = v.nav("approvals");
    nav.error = error;
    let row = approval_rows(s, std::slice::from_ref(a))
        .await
        .pop()
        .expect("one row per approval");
    let step_up = row.pending && s.vault.needs_step_up(a, &v.session);
    render(
        status,
        &Detail {
            title: "Approval request",
            nav: Some(nav),
            a: row,
            audience: a.audience.clone(),
            reason: a.audit_context.clone(),
            authorization_details: a.authorization_details.clone(),
            single_use: a.single_use,
            step_up,
        },
    )
}

/// `GET /ui/approvals/{id}`.
pub async fn detail(s: S, v: Viewer, Path(id): Path<String>) -> Response {
    match s.vault.user_approval(&id, &v.user.id).await {
        Ok(Some(a)) => show(&s, &v, &a, StatusCode::OK, None).await,
        Ok(None) => not_found(&v, "approval request"),
        Err(_) => unavailable(),
    }
}

#[derive(serde::Deserialize)]
pub struct DecisionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    decision: String,
    code: Option<String>,
}

/// `POST /ui/approvals/{id}`: approve or deny.
pub async fn decide(
    s: S,
    v: Viewer,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    Form(f): Form<DecisionForm>,
) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let again = |status: StatusCode, error: String| {
        let (s, v, id) = (&s, &v, &id);
        async move {
            match s.vault.user_approval(id, &v.user.id).await {
                Ok(Some(a)) => show(s, v, &a, status, Some(error)).await,
                Ok(None) => not_found(v, "approval request"),
                Err(_) => unavailable(),
            }
        }
    };
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
                session_token: &v.token,
                totp: code,
                ctx: &ctx,
            },
        )
        .await;
    match result {
        Ok(_) => Redirect::to(&format!("/ui/approvals/{id}")).into_response(),
        Err(e) => {
            let status = match e {
                DecideError::NotFound => return not_found(&v, "approval request"),
                DecideError::NotPending(_) => StatusCode::CONFLICT,
                DecideError::StepUpRequired | DecideError::NoSecondFactor => StatusCode::FORBIDDEN,
                DecideError::WrongCode => StatusCode::UNAUTHORIZED,
                DecideError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
                DecideError::Unavailable => {
                    return message(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Approval request",
                        "The database is unavailable; nothing was decided. Retry shortly.",
                        Some(v.nav("approvals")),
                    );
                }
            };
            let mut text = e.to_string();
            if let Some(first) = text.get(..1) {
                text = first.to_uppercase() + &text[1..];
            }
            again(status, format!("{text}.")).await
        }
    }
}
