//! Users (operators only): who can sign in, with which role and whether they have a second
//! factor; create a user, change a role, delete a user (their accounts are revoked at the
//! providers first, behind a confirmation page). An operator cannot demote or delete
//! themselves, so the dashboard cannot lock its last operator out by accident.

use askama::Template;
use axum::extract::{Form, Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use latchkey_core::model::{AccountStatus, Role, User};
use latchkey_core::vault::AdminError;

use super::agents::{admin_failure, operator};
use super::{
    CsrfForm, Nav, NoticeQuery, OperatorView, S, Viewer, message, not_found, render, unavailable,
    when,
};

struct UserRow {
    id: String,
    username: String,
    role: &'static str,
    totp: bool,
    accounts: usize,
    created: String,
    me: bool,
}

#[derive(Template)]
#[template(path = "users.html")]
struct Users {
    title: &'static str,
    nav: Option<Nav>,
    users: Vec<UserRow>,
    name: String,
}

async fn users_page(s: &S, v: &Viewer, status: StatusCode, nav: Nav, name: String) -> Response {
    let store = s.vault.store();
    let (Ok(users), Ok(accounts)) = (store.list_users().await, store.list_accounts(None).await)
    else {
        return unavailable();
    };
    let users = users
        .into_iter()
        .map(|u| UserRow {
            accounts: accounts
                .iter()
                .filter(|a| a.user_id == u.id && a.status != AccountStatus::Revoked)
                .count(),
            role: u.role.as_str(),
            totp: u.totp_enabled,
            created: when(u.created_at),
            me: u.id == v.user.id,
            id: u.id,
            username: u.username,
        })
        .collect();
    render(
        status,
        &Users {
            title: "Users",
            nav: Some(nav),
            users,
            name,
        },
    )
}

pub async fn list(s: S, OperatorView(v): OperatorView, Query(q): Query<NoticeQuery>) -> Response {
    let mut nav = v.nav("users");
    nav.notice = v.notice(&q);
    users_page(&s, &v, StatusCode::OK, nav, String::new()).await
}

#[derive(serde::Deserialize)]
pub struct NewUser {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    role: String,
}

/// `POST /ui/users`: create a user with a first password.
pub async fn create(s: S, OperatorView(v): OperatorView, Form(f): Form<NewUser>) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let again = |error: String| {
        let mut nav = v.nav("users");
        nav.error = Some(error);
        nav
    };
    let Some(role) = Role::parse(&f.role) else {
        let nav = again("Choose the role user or operator.".into());
        return users_page(&s, &v, StatusCode::BAD_REQUEST, nav, f.username).await;
    };
    if f.password.chars().count() < 12 {
        let nav = again("Not created: the first password needs at least 12 characters.".into());
        return users_page(&s, &v, StatusCode::BAD_REQUEST, nav, f.username).await;
    }
    match s
        .vault
        .add_user(f.username.trim(), Some(&f.password), role, &operator(&v))
        .await
    {
        Ok(u) => v.done(
            "/ui/users",
            &format!("Created {} ({}).", u.username, role.as_str()),
        ),
        Err(AdminError::Storage(_)) => unavailable(),
        Err(e) => {
            let nav = again(format!("Not created: {e}."));
            users_page(&s, &v, StatusCode::BAD_REQUEST, nav, f.username).await
        }
    }
}

/// The user `id`, unless it is the viewer (who may not demote or delete themselves).
async fn other_user(s: &S, v: &Viewer, id: &str) -> Result<User, Response> {
    match s.vault.store().user_by_id(id).await {
        Ok(Some(u)) if u.id == v.user.id => Err(message(
            StatusCode::CONFLICT,
            "Users",
            "You cannot change your own role or delete yourself here; ask another operator (or use the CLI).",
            Some(v.nav("users")),
        )),
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(not_found(v, "user")),
        Err(_) => Err(unavailable()),
    }
}

#[derive(serde::Deserialize)]
pub struct RoleForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    role: String,
}

/// `POST /ui/users/{id}/role`.
pub async fn set_role(
    s: S,
    OperatorView(v): OperatorView,
    Path(id): Path<String>,
    Form(f): Form<RoleForm>,
) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let user = match other_user(&s, &v, &id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let Some(role) = Role::parse(&f.role) else {
        return message(
            StatusCode::BAD_REQUEST,
            "Users",
            "Choose the role user or operator.",
            Some(v.nav("users")),
        );
    };
    match s.vault.set_user_role(&user.id, role, &operator(&v)).await {
        Ok(_) => v.done(
            "/ui/users",
            &format!("{} is now {}.", user.username, role.as_str()),
        ),
        Err(e) => admin_failure(&v, "Role unchanged", e),
    }
}

#[derive(Template)]
#[template(path = "user_delete.html")]
struct ConfirmDelete {
    title: String,
    nav: Option<Nav>,
    id: String,
    accounts: usize,
}

/// `GET /ui/users/{id}/delete`: what deleting does, and the button.
pub async fn confirm_delete(
    s: S,
    OperatorView(v): OperatorView,
    Path(id): Path<String>,
) -> Response {
    let user = match other_user(&s, &v, &id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    let Ok(accounts) = s.vault.store().list_accounts(Some(&user.id)).await else {
        return unavailable();
    };
    render(
        StatusCode::OK,
        &ConfirmDelete {
            title: format!("Delete {}?", user.username),
            nav: Some(v.nav("users")),
            id: user.id,
            accounts: accounts
                .iter()
                .filter(|a| a.status != AccountStatus::Revoked)
                .count(),
        },
    )
}

/// `POST /ui/users/{id}/delete`.
pub async fn delete(
    s: S,
    OperatorView(v): OperatorView,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let user = match other_user(&s, &v, &id).await {
        Ok(u) => u,
        Err(resp) => return resp,
    };
    match s.vault.delete_user(&user.id, &operator(&v)).await {
        Ok(_) => v.done("/ui/users", &format!("Deleted {}.", user.username)),
        Err(e) => admin_failure(&v, "Not deleted", e),
    }
}
