//! Connected accounts: the catalog of connections to connect, the user's accounts with their
//! scopes, last use and health, reconnect when the provider asks for it, and disconnect (which
//! revokes at the provider too) behind a confirmation page.

use askama::Template;
use axum::extract::{Extension, Form, Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use latchkey_core::model::{AccountStatus, ConnectedAccount, Connection};
use latchkey_core::vault::Actor;

use super::super::RequestMeta;
use super::super::web::context;
use super::{CsrfForm, Nav, NoticeQuery, S, Viewer, message, not_found, render, unavailable, when};

/// One account as the page shows it.
pub(super) struct AccountRow {
    pub id: String,
    pub connection: String,
    pub account: String,
    pub scopes: String,
    pub last_used: String,
    /// `healthy`, `needs reconnect` or `revoked`.
    pub health: &'static str,
    /// The CSS class of the health cell.
    pub health_class: &'static str,
    pub reason: Option<String>,
    pub live: bool,
    pub needs_reconnect: bool,
}

pub(super) fn health(status: AccountStatus) -> (&'static str, &'static str) {
    match status {
        AccountStatus::Active => ("healthy", "healthy"),
        AccountStatus::NeedsReauth => ("needs reconnect", "needs-reconnect"),
        AccountStatus::Revoked => ("revoked", "revoked"),
    }
}

pub(super) fn rows(accounts: &[ConnectedAccount], connections: &[Connection]) -> Vec<AccountRow> {
    accounts
        .iter()
        .map(|a| {
            let (health, health_class) = health(a.status);
            AccountRow {
                id: a.id.clone(),
                connection: connections
                    .iter()
                    .find(|c| c.id == a.connection_id)
                    .map_or_else(|| a.connection_id.clone(), |c| c.name.clone()),
                account: a
                    .upstream_account_id
                    .clone()
                    .unwrap_or_else(|| "(unnamed)".into()),
                scopes: a.scopes.to_string_spaced(),
                last_used: a.last_used_at.map_or_else(|| "never".into(), when),
                health,
                health_class,
                reason: a
                    .status_reason
                    .clone()
                    .filter(|_| a.status != AccountStatus::Active),
                live: a.status != AccountStatus::Revoked,
                needs_reconnect: a.status == AccountStatus::NeedsReauth,
            }
        })
        .collect()
}

#[derive(Template)]
#[template(path = "accounts.html")]
struct Accounts {
    title: &'static str,
    nav: Option<Nav>,
    accounts: Vec<AccountRow>,
    connections: Vec<(String, String)>,
}

#[derive(serde::Deserialize, Default)]
pub struct AccountsQuery {
    /// Set by the connect callback: shown only if it names a connection of the user's.
    connected: Option<String>,
    #[serde(flatten)]
    notice: NoticeQuery,
}

/// The user's accounts and the connections they can connect.
async fn own(s: &S, v: &Viewer) -> Option<(Vec<ConnectedAccount>, Vec<Connection>)> {
    let store = s.vault.store();
    let mut accounts = store.list_accounts(Some(&v.user.id)).await.ok()?;
    // Live accounts first, newest first; revoked ones stay visible as history.
    accounts.sort_by_key(|a| (a.status == AccountStatus::Revoked, -a.created_at));
    Some((accounts, store.list_connections().await.ok()?))
}

pub async fn list(s: S, v: Viewer, Query(q): Query<AccountsQuery>) -> Response {
    let Some((accounts, connections)) = own(&s, &v).await else {
        return unavailable();
    };
    let mut nav = v.nav("accounts");
    let connected = q.connected.filter(|c| {
        accounts.iter().any(|a| {
            connections
                .iter()
                .any(|k| k.id == a.connection_id && k.name == *c)
        })
    });
    nav.notice = connected
        .map(|c| format!("Connected {c}."))
        .or_else(|| v.notice(&q.notice));
    render(
        StatusCode::OK,
        &Accounts {
            title: "Connected accounts",
            nav: Some(nav),
            accounts: rows(&accounts, &connections),
            connections: connections
                .iter()
                .map(|c| (c.name.clone(), c.provider.clone()))
                .collect(),
        },
    )
}

#[derive(Template)]
#[template(path = "disconnect.html")]
struct Disconnect {
    title: String,
    nav: Option<Nav>,
    account: AccountRow,
}

/// The user's live account `id`, as a row; `None` for anything else.
async fn live_row(s: &S, v: &Viewer, id: &str) -> Result<Option<AccountRow>, Response> {
    let Some((accounts, connections)) = own(s, v).await else {
        return Err(unavailable());
    };
    Ok(rows(&accounts, &connections)
        .into_iter()
        .find(|r| r.id == id && r.live))
}

/// `GET /ui/accounts/{id}/disconnect`: what will happen, and the button.
pub async fn confirm_disconnect(s: S, v: Viewer, Path(id): Path<String>) -> Response {
    match live_row(&s, &v, &id).await {
        Ok(Some(account)) => render(
            StatusCode::OK,
            &Disconnect {
                title: format!("Disconnect {}?", account.connection),
                nav: Some(v.nav("accounts")),
                account,
            },
        ),
        Ok(None) => not_found(&v, "connected account"),
        Err(resp) => resp,
    }
}

/// `POST /ui/accounts/{id}/disconnect`: revoke here and at the provider.
pub async fn disconnect(
    s: S,
    v: Viewer,
    Extension(meta): Extension<RequestMeta>,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let row = match live_row(&s, &v, &id).await {
        Ok(Some(row)) => row,
        Ok(None) => return not_found(&v, "connected account"),
        Err(resp) => return resp,
    };
    let actor = Actor::user(&v.user.id);
    match s
        .vault
        .disconnect_own(
            &actor,
            &id,
            Some("disconnected in the dashboard".into()),
            &context(&meta),
        )
        .await
    {
        Ok(true) => v.done("/ui/accounts", &format!("Disconnected {}.", row.connection)),
        Ok(false) => not_found(&v, "connected account"),
        Err(e) => {
            tracing::error!(error = %e, "disconnecting an account failed");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not disconnected",
                "The account could not be disconnected just now; nothing changed. Retry shortly.",
                Some(v.nav("accounts")),
            )
        }
    }
}
