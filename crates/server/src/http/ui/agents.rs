//! Agents (operators only): register one with its public key (PEM, JWK or a JWKS document) and
//! optionally a client secret, edit its grants — connection, scopes, risk overrides, allowed
//! hours, lifetime cap, quotas, IP allowlist — disable or enable it, and see what it did.

use askama::Template;
use axum::extract::{Form, FromRequest, Multipart, Path, Query, Request};
use axum::http::{StatusCode, header};
use axum::response::Response;
use latchkey_core::model::{Agent, Connection, Grant};
use latchkey_core::policy::{GrantPolicy, Quotas, TimeWindow, parse_risk_override};
use latchkey_core::scope::Scopes;
use latchkey_core::store::AuditQuery;
use latchkey_core::vault::{Actor, AdminError};
use latchkey_crypto::Algorithm;
use latchkey_crypto::jws::PublicKey;

use super::activity::{ActivityRow, activity_rows};
use super::{
    CsrfForm, Nav, NoticeQuery, OperatorView, S, Viewer, message, render, unavailable, when,
};

/// Changes made in the dashboard are an operator's, named by their user id.
pub(super) fn operator(v: &Viewer) -> Actor {
    Actor {
        kind: "operator",
        id: v.user.id.clone(),
        method: "dashboard",
    }
}

pub(super) fn admin_failure(v: &Viewer, title: &str, e: AdminError) -> Response {
    let (status, text) = match e {
        AdminError::Invalid(d) => (StatusCode::BAD_REQUEST, d),
        AdminError::NotFound(d) => (StatusCode::NOT_FOUND, d),
        AdminError::Conflict(d) => (StatusCode::CONFLICT, d),
        AdminError::Storage(_) => return unavailable(),
    };
    let mut text = text;
    if let Some(first) = text.get(..1) {
        text = first.to_uppercase() + &text[1..];
    }
    message(
        status,
        title,
        &format!("{text}. Nothing changed."),
        Some(v.nav("agents")),
    )
}

// --- the list and registration -------------------------------------------------------------

struct AgentRow {
    id: String,
    name: String,
    auth: String,
    state: &'static str,
    grants: usize,
    created: String,
}

#[derive(Template)]
#[template(path = "agents.html")]
struct Agents {
    title: &'static str,
    nav: Option<Nav>,
    agents: Vec<AgentRow>,
    form: RegisterForm,
}

async fn list_page(
    s: &S,
    v: &Viewer,
    status: StatusCode,
    form: RegisterForm,
    error: Option<String>,
) -> Response {
    let store = s.vault.store();
    let (Ok(agents), Ok(grants)) = (store.list_agents().await, store.list_grants().await) else {
        return unavailable();
    };
    let mut nav = v.nav("agents");
    nav.error = error;
    let agents = agents
        .into_iter()
        .filter(|a| a.redirect_uris.is_empty() && !a.public_client)
        .map(|a| AgentRow {
            grants: grants.iter().filter(|g| g.agent_id == a.id).count(),
            auth: if a.secret_hash.is_some() {
                "key or secret".into()
            } else {
                "key".into()
            },
            state: if a.disabled { "disabled" } else { "enabled" },
            created: when(a.created_at),
            id: a.id,
            name: a.name,
        })
        .collect();
    render(
        status,
        &Agents {
            title: "Agents",
            nav: Some(nav),
            agents,
            form,
        },
    )
}

pub async fn list(s: S, OperatorView(v): OperatorView) -> Response {
    list_page(&s, &v, StatusCode::OK, RegisterForm::default(), None).await
}

#[derive(serde::Deserialize, Default)]
pub struct RegisterForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    /// PEM, one JWK, or a JWKS (`{"keys": [...]}`).
    #[serde(default)]
    public_key: String,
    #[serde(default)]
    alg: String,
    /// Also issue a client secret (shown once).
    #[serde(default)]
    secret: Option<String>,
}

/// The keys in `text`: one PEM or JWK, or every key of a JWKS.
fn parse_keys(text: &str, alg: Option<Algorithm>) -> Result<Vec<PublicKey>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let jwks = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("keys").and_then(|k| k.as_array()).cloned());
    let one = |t: &str| PublicKey::parse(t, alg, None).map_err(|e| format!("the public key: {e}"));
    match jwks {
        Some(keys) if keys.is_empty() => Err("the JWKS has no keys".into()),
        Some(keys) if keys.len() > 10 => Err("a JWKS of more than 10 keys is refused".into()),
        Some(keys) => keys.iter().map(|k| one(&k.to_string())).collect(),
        None => Ok(vec![one(text)?]),
    }
}

#[derive(Template)]
#[template(path = "agent_created.html")]
struct Created {
    title: &'static str,
    nav: Option<Nav>,
    id: String,
    name: String,
    kids: Vec<String>,
    secret: Option<String>,
}

/// The registration form, sent as `multipart/form-data` (with the key as an uploaded file,
/// `public_key_file`, which wins over the text box when given) or URL-encoded.
async fn register_form(req: Request) -> Result<RegisterForm, String> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.starts_with("multipart/form-data"));
    if !multipart {
        return Form::<RegisterForm>::from_request(req, &())
            .await
            .map(|Form(f)| f)
            .map_err(|e| e.body_text());
    }
    let mut parts = Multipart::from_request(req, &())
        .await
        .map_err(|e| e.body_text())?;
    let mut f = RegisterForm::default();
    let mut file = String::new();
    while let Some(field) = parts.next_field().await.map_err(|e| e.body_text())? {
        let name = field.name().unwrap_or_default().to_owned();
        let text = field.text().await.map_err(|e| e.body_text())?;
        match name.as_str() {
            "csrf" => f.csrf = text,
            "name" => f.name = text,
            "public_key" => f.public_key = text,
            "public_key_file" => file = text,
            "alg" => f.alg = text,
            "secret" => f.secret = Some(text),
            _ => {}
        }
    }
    if !file.trim().is_empty() {
        f.public_key = file;
    }
    Ok(f)
}

/// `POST /ui/agents`: register an agent.
pub async fn register(s: S, OperatorView(v): OperatorView, req: Request) -> Response {
    let f = match register_form(req).await {
        Ok(f) => f,
        Err(why) => {
            return message(
                StatusCode::BAD_REQUEST,
                "Agent not registered",
                &format!("The form could not be read: {why}"),
                Some(v.nav("agents")),
            );
        }
    };
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let alg = match f.alg.trim() {
        "" => None,
        a => match a.parse::<Algorithm>() {
            Ok(a) => Some(a),
            Err(_) => {
                return list_page(
                    &s,
                    &v,
                    StatusCode::BAD_REQUEST,
                    f,
                    Some("Unknown algorithm.".into()),
                )
                .await;
            }
        },
    };
    let keys = match parse_keys(&f.public_key, alg) {
        Ok(k) => k,
        Err(e) => {
            let e = format!("Not registered: {e}.");
            return list_page(&s, &v, StatusCode::BAD_REQUEST, f, Some(e)).await;
        }
    };
    let with_secret = f.secret.is_some();
    match s
        .vault
        .add_agent(f.name.trim(), &keys, with_secret, &operator(&v))
        .await
    {
        Ok((agent, secret)) => render(
            StatusCode::CREATED,
            &Created {
                title: "Agent registered",
                nav: Some(v.nav("agents")),
                id: agent.id,
                name: agent.name,
                kids: keys.iter().map(|k| k.kid.clone()).collect(),
                secret: secret.map(|s| secrecy::ExposeSecret::expose_secret(&s).to_owned()),
            },
        ),
        Err(AdminError::Storage(_)) => unavailable(),
        Err(e) => {
            let e = format!("Not registered: {e}.");
            list_page(&s, &v, StatusCode::BAD_REQUEST, f, Some(e)).await
        }
    }
}

// --- one agent -------------------------------------------------------------------------------

struct GrantRow {
    connection: String,
    scopes: String,
    risk: String,
    hours: String,
    max_lifetime: String,
    quotas: String,
    ips: String,
}

/// The grant editor's fields (also what it was submitted with, to show again on an error).
#[derive(serde::Deserialize, Default)]
pub struct GrantForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    connection: String,
    #[serde(default)]
    scopes: String,
    /// `scope=level`, one per line.
    #[serde(default)]
    risk: String,
    /// Time windows, one per line (`mon-fri 09:00-17:00 Europe/Berlin`).
    #[serde(default)]
    hours: String,
    #[serde(default)]
    max_lifetime: String,
    #[serde(default)]
    per_minute: String,
    #[serde(default)]
    per_day: String,
    #[serde(default)]
    user_per_minute: String,
    #[serde(default)]
    user_per_day: String,
    /// Addresses or CIDR blocks, whitespace- or comma-separated.
    #[serde(default)]
    ips: String,
    /// The checkbox: `on` when the MCP `get_access_token` tool may release raw tokens.
    #[serde(default)]
    token_tool: String,
}

impl GrantForm {
    fn of(g: &Grant, connection: &str) -> Self {
        let n = |v: Option<u32>| v.map(|n| n.to_string()).unwrap_or_default();
        GrantForm {
            connection: connection.to_owned(),
            scopes: g.scopes.to_string_spaced(),
            risk: g
                .policy
                .risk
                .iter()
                .map(|(s, r)| format!("{s}={r}"))
                .collect::<Vec<_>>()
                .join("\n"),
            hours: g
                .policy
                .hours
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
            max_lifetime: g
                .policy
                .max_lifetime
                .map(|n| n.to_string())
                .unwrap_or_default(),
            per_minute: n(g.policy.quotas.agent_per_minute),
            per_day: n(g.policy.quotas.agent_per_day),
            user_per_minute: n(g.policy.quotas.user_per_minute),
            user_per_day: n(g.policy.quotas.user_per_day),
            ips: g.ip_allowlist.join(" "),
            token_tool: if g.policy.token_tool { "on" } else { "" }.into(),
            ..Default::default()
        }
    }

    /// The grant's scopes, IP allowlist and policy, or what is wrong with the form.
    fn parse(&self) -> Result<(Scopes, Vec<String>, GrantPolicy), String> {
        fn number<T: std::str::FromStr>(text: &str, what: &str) -> Result<Option<T>, String> {
            match text.trim() {
                "" => Ok(None),
                t => t
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{what} must be a whole number (or empty for none)")),
            }
        }
        let mut policy = GrantPolicy {
            max_lifetime: number(&self.max_lifetime, "Max lifetime")?,
            quotas: Quotas {
                agent_per_minute: number(&self.per_minute, "Agent per minute")?,
                agent_per_day: number(&self.per_day, "Agent per day")?,
                user_per_minute: number(&self.user_per_minute, "User per minute")?,
                user_per_day: number(&self.user_per_day, "User per day")?,
            },
            token_tool: self.token_tool == "on",
            ..GrantPolicy::default()
        };
        for line in self.risk.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (scope, level) = parse_risk_override(line).map_err(|e| e.to_string())?;
            if policy.risk.insert(scope.clone(), level).is_some() {
                return Err(format!("risk names `{scope}` twice"));
            }
        }
        for line in self.hours.lines().map(str::trim).filter(|l| !l.is_empty()) {
            policy
                .hours
                .push(TimeWindow::parse(line).map_err(|e| e.to_string())?);
        }
        let ips = self
            .ips
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Ok((Scopes::parse(&self.scopes), ips, policy))
    }
}

#[derive(Template)]
#[template(path = "agent.html")]
struct AgentPage {
    title: String,
    nav: Option<Nav>,
    agent: Agent,
    created: String,
    keys: Vec<(String, String)>,
    grants: Vec<GrantRow>,
    connections: Vec<String>,
    form: GrantForm,
    editing: bool,
    recent: Vec<ActivityRow>,
}

#[derive(serde::Deserialize, Default)]
pub struct DetailQuery {
    edit: Option<String>,
    #[serde(flatten)]
    notice: NoticeQuery,
}

fn grant_row(g: &Grant, connections: &[Connection]) -> GrantRow {
    let p = &g.policy;
    let q = &p.quotas;
    let quotas = q
        .rules()
        .iter()
        .map(|r| format!("{} {}", r.flag().trim_start_matches("--"), r.limit))
        .collect::<Vec<_>>()
        .join(", ");
    GrantRow {
        connection: connections
            .iter()
            .find(|c| c.id == g.connection_id)
            .map_or_else(|| g.connection_id.clone(), |c| c.name.clone()),
        scopes: g.scopes.to_string_spaced(),
        risk: p
            .risk
            .iter()
            .map(|(s, r)| format!("{s}={r}"))
            .collect::<Vec<_>>()
            .join(", "),
        hours: p
            .hours
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join("; "),
        max_lifetime: p.max_lifetime.map(|n| format!("{n} s")).unwrap_or_default(),
        quotas,
        ips: g.ip_allowlist.join(" "),
    }
}

async fn agent_page(
    s: &S,
    v: &Viewer,
    id: &str,
    status: StatusCode,
    form: Option<GrantForm>,
    notice: Option<String>,
    error: Option<String>,
) -> Response {
    let store = s.vault.store();
    let agent = match store.agent_by_id(id).await {
        Ok(Some(a)) => a,
        Ok(None) => return super::not_found(v, "agent"),
        Err(_) => return unavailable(),
    };
    let (Ok(keys), Ok(grants), Ok(connections), Ok(recent)) = (
        store.agent_keys(id).await,
        store.list_grants().await,
        store.list_connections().await,
        store
            .query_audit(&AuditQuery {
                agent: Some(id.to_owned()),
                limit: 20,
                ..AuditQuery::default()
            })
            .await,
    ) else {
        return unavailable();
    };
    let grants: Vec<&Grant> = grants.iter().filter(|g| g.agent_id == id).collect();
    let editing = form.is_some();
    let form = form.unwrap_or_default();
    let mut nav = v.nav("agents");
    nav.notice = notice;
    nav.error = error;
    render(
        status,
        &AgentPage {
            title: format!("Agent {}", agent.name),
            nav: Some(nav),
            created: when(agent.created_at),
            keys: keys.into_iter().map(|k| (k.kid, k.alg)).collect(),
            grants: grants.iter().map(|g| grant_row(g, &connections)).collect(),
            connections: connections.iter().map(|c| c.name.clone()).collect(),
            form,
            editing,
            recent: activity_rows(s, &recent).await,
            agent,
        },
    )
}

/// `GET /ui/agents/{id}` (`?edit=<connection>` fills the editor with that grant).
pub async fn detail(
    s: S,
    OperatorView(v): OperatorView,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
) -> Response {
    let mut form = None;
    if let Some(name) = q.edit.as_deref() {
        let store = s.vault.store();
        if let (Ok(Some(conn)), Ok(grants)) = (
            store.connection_by_name(name).await,
            store.list_grants().await,
        ) && let Some(g) = grants
            .iter()
            .find(|g| g.agent_id == id && g.connection_id == conn.id)
        {
            form = Some(GrantForm::of(g, name));
        }
    }
    let notice = v.notice(&q.notice);
    agent_page(&s, &v, &id, StatusCode::OK, form, notice, None).await
}

/// `POST /ui/agents/{id}/grants`: add a grant, or replace the agent's grant on that connection.
pub async fn save_grant(
    s: S,
    OperatorView(v): OperatorView,
    Path(id): Path<String>,
    Form(f): Form<GrantForm>,
) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let (scopes, ips, policy) = match f.parse() {
        Ok(p) => p,
        Err(e) => {
            let e = format!("Not saved: {e}.");
            return agent_page(&s, &v, &id, StatusCode::BAD_REQUEST, Some(f), None, Some(e)).await;
        }
    };
    match s
        .vault
        .grant_with_policy(&id, f.connection.trim(), scopes, ips, policy, &operator(&v))
        .await
    {
        Ok(g) => v.done(
            &format!("/ui/agents/{id}"),
            &format!("Saved the grant on {}: {}.", f.connection.trim(), g.scopes),
        ),
        Err(AdminError::Storage(_)) => unavailable(),
        Err(AdminError::NotFound(d)) if d.starts_with("no agent") => super::not_found(&v, "agent"),
        Err(e) => {
            let e = format!("Not saved: {e}.");
            agent_page(&s, &v, &id, StatusCode::BAD_REQUEST, Some(f), None, Some(e)).await
        }
    }
}

/// `POST /ui/agents/{id}/grants/{connection}/remove`.
pub async fn remove_grant(
    s: S,
    OperatorView(v): OperatorView,
    Path((id, connection)): Path<(String, String)>,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    match s.vault.remove_grant(&id, &connection, &operator(&v)).await {
        Ok(()) => v.done(
            &format!("/ui/agents/{id}"),
            &format!("Removed the grant on {connection}."),
        ),
        Err(e) => admin_failure(&v, "Grant not removed", e),
    }
}

#[derive(serde::Deserialize)]
pub struct StateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    state: String,
}

/// `POST /ui/agents/{id}/state`: `state=disabled` or `enabled`.
pub async fn set_state(
    s: S,
    OperatorView(v): OperatorView,
    Path(id): Path<String>,
    Form(f): Form<StateForm>,
) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    let disabled = match f.state.as_str() {
        "disabled" => true,
        "enabled" => false,
        _ => {
            return message(
                StatusCode::BAD_REQUEST,
                "Agent",
                "Choose enabled or disabled.",
                Some(v.nav("agents")),
            );
        }
    };
    match s
        .vault
        .set_agent_disabled(&id, disabled, &operator(&v))
        .await
    {
        Ok(()) => v.done(
            &format!("/ui/agents/{id}"),
            if disabled {
                "Disabled: every request of this agent is refused."
            } else {
                "Enabled."
            },
        ),
        Err(e) => admin_failure(&v, "Agent unchanged", e),
    }
}
