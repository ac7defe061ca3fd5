//! Activity: the audit trail with filters and paging (a user sees the entries about
//! themselves; an operator sees every entry and can filter by user), the chain's verification
//! status, and the filtered entries as JSON Lines.

use askama::Template;
use axum::extract::{Form, Query};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use latchkey_core::model::AuditEntry;
use latchkey_core::store::AuditQuery;
use std::collections::HashMap;

use tokio::sync::Mutex;

use super::{CsrfForm, Nav, NoticeQuery, S, Viewer, message, render, unavailable, when};

const PAGE: i64 = 50;
/// How long a verification result is shown before the chain is walked again.
const CHAIN_FRESH_SECS: i64 = 300;
/// The export's cap per download (page with `before=` for more).
const EXPORT_MAX: i64 = 10_000;

/// One entry as the page shows it: users and agents by name, their ids beside.
pub(super) struct ActivityRow {
    pub seq: i64,
    pub at: String,
    /// `user alice (session)`, `agent reporter (private_key_jwt)`, `operator local (cli)`.
    pub actor: String,
    pub actor_id: String,
    pub action: String,
    pub target: String,
    pub scopes: String,
    pub decision: String,
    pub reason: String,
    /// The subject user's name (empty when the entry has none).
    pub subject: String,
    pub subject_id: String,
}

/// `entries` as rows, with the names of the users and agents they mention (an id stays an id
/// when its owner is gone, or when the names cannot be read).
pub(super) async fn activity_rows(s: &S, entries: &[AuditEntry]) -> Vec<ActivityRow> {
    let store = s.vault.store();
    let mut names: HashMap<String, String> = HashMap::new();
    if entries
        .iter()
        .any(|e| e.record.subject_user.is_some() || e.record.actor_type != "agent")
    {
        names.extend(
            store
                .list_users()
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|u| (u.id, u.username)),
        );
    }
    if entries.iter().any(|e| e.record.actor_type == "agent") {
        names.extend(
            store
                .list_agents()
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|a| (a.id, a.name)),
        );
    }
    let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_owned());
    entries
        .iter()
        .map(|e| {
            let r = &e.record;
            let target = [
                r.connection.as_deref(),
                r.account_id.as_deref(),
                r.agent_id.as_deref().filter(|a| *a != r.actor_id),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" · ");
            let subject_id = r.subject_user.clone().unwrap_or_default();
            ActivityRow {
                seq: e.seq,
                at: when(r.at),
                actor: format!("{} {} ({})", r.actor_type, name(&r.actor_id), r.auth_method),
                actor_id: r.actor_id.clone(),
                action: r.action.clone(),
                target,
                scopes: r.scopes.clone().unwrap_or_default(),
                decision: r.decision.clone(),
                reason: r.reason.clone().unwrap_or_default(),
                subject: if subject_id.is_empty() {
                    String::new()
                } else {
                    name(&subject_id)
                },
                subject_id,
            }
        })
        .collect()
}

/// The filter form, as submitted (every field optional; empty means no filter).
#[derive(serde::Deserialize, Default, Clone)]
pub struct Filters {
    #[serde(default)]
    action: String,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    connection: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    /// Operators only: whose entries.
    #[serde(default)]
    user: String,
    /// The cursor: entries below this sequence number.
    #[serde(default)]
    before: String,
    #[serde(flatten)]
    notice: NoticeQuery,
}

impl Filters {
    /// The store query for `v`, or what is wrong with the filters.
    fn query(&self, v: &Viewer, limit: i64) -> Result<AuditQuery, String> {
        let some = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let (action, action_prefix) = match some(&self.action) {
            None => (None, None),
            Some(a) => AuditQuery::action_filter(&a)
                .ok_or("Action takes `*` only at the end, as in `account.*`.")?,
        };
        let decision = match some(&self.decision).as_deref() {
            None => None,
            Some(d @ ("allow" | "deny")) => Some(d.to_owned()),
            Some(_) => return Err("Decision is `allow` or `deny`.".into()),
        };
        let since = day(&self.from, "From")?;
        // "To" includes its whole day.
        let until = day(&self.to, "To")?.map(|d| d + 86_400);
        if let (Some(a), Some(b)) = (since, until)
            && a >= b
        {
            return Err("“To” must not be before “From”.".into());
        }
        let before_seq = match some(&self.before) {
            None => None,
            Some(b) => Some(
                b.parse::<i64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("That page link is not valid; start again from the first page.")?,
            ),
        };
        // A user's own entries only; operators may pick a user.
        let subject_user = if v.operator() {
            some(&self.user)
        } else {
            Some(v.user.id.clone())
        };
        Ok(AuditQuery {
            subject_user,
            agent: some(&self.agent),
            connection: some(&self.connection),
            action,
            action_prefix,
            decision,
            since,
            until,
            before_seq,
            limit,
        })
    }

    /// These filters as a query string (without the cursor), for links.
    fn link(&self, before: Option<i64>) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, val) in [
            ("action", &self.action),
            ("agent", &self.agent),
            ("connection", &self.connection),
            ("decision", &self.decision),
            ("from", &self.from),
            ("to", &self.to),
            ("user", &self.user),
        ] {
            if !val.trim().is_empty() {
                q.append_pair(k, val.trim());
            }
        }
        if let Some(b) = before {
            q.append_pair("before", &b.to_string());
        }
        q.finish()
    }
}

/// `YYYY-MM-DD` (the date input's format) as that day's 00:00 UTC.
fn day(text: &str, field: &str) -> Result<Option<i64>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, format)
        .map(|d| Some(d.midnight().assume_utc().unix_timestamp()))
        .map_err(|_| format!("{field} is a date like 2026-11-22."))
}

// --- the chain's status --------------------------------------------------------------------------

/// The last verification of the chain, shared by every page view (walking the chain costs
/// time in proportion to its length, so it is not redone for every view).
#[derive(Default)]
pub struct ChainCache(Mutex<Option<ChainStatus>>);

#[derive(Clone)]
pub(super) struct ChainStatus {
    pub ok: bool,
    pub text: String,
    pub checked_at: i64,
}

async fn chain_status(s: &S, force: bool) -> ChainStatus {
    let mut cached = s.ui.0.lock().await;
    let now = s.vault.now();
    if let Some(c) = cached.as_ref()
        && !force
        && now - c.checked_at < CHAIN_FRESH_SECS
    {
        return c.clone();
    }
    let status = match s.vault.verify_audit(None).await {
        Ok(Ok(v)) => ChainStatus {
            ok: true,
            text: match v.last_seq {
                Some(last) => format!(
                    "Chain verified through entry {last} ({} entries, {} signed checkpoints).",
                    v.entries, v.checkpoints
                ),
                None => "The trail is empty.".into(),
            },
            checked_at: now,
        },
        Ok(Err(b)) => ChainStatus {
            ok: false,
            text: format!("The chain is broken at entry {}: {}.", b.seq, b.why),
            checked_at: now,
        },
        Err(_) => {
            return ChainStatus {
                ok: false,
                text: "The chain could not be checked just now (the database is unavailable)."
                    .into(),
                checked_at: now,
            };
        }
    };
    *cached = Some(status.clone());
    status
}

// --- pages -------------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "activity.html")]
struct Activity {
    title: &'static str,
    nav: Option<Nav>,
    f: Filters,
    rows: Vec<ActivityRow>,
    older: Option<String>,
    newest: Option<String>,
    export: String,
    chain: ChainStatus,
    checked: String,
}

/// The filters `v` may use: the user filter is an operator's.
fn allowed(v: &Viewer, mut f: Filters) -> Filters {
    if !v.operator() {
        f.user.clear();
    }
    f
}

pub async fn page(s: S, v: Viewer, Query(f): Query<Filters>) -> Response {
    let f = allowed(&v, f);
    let mut nav = v.nav("activity");
    nav.notice = v.notice(&f.notice);
    let (status, rows, more) = match f.query(&v, PAGE + 1) {
        Ok(q) => match s.vault.store().query_audit(&q).await {
            Ok(mut entries) => {
                let more = entries.len() as i64 > PAGE;
                entries.truncate(PAGE as usize);
                (StatusCode::OK, activity_rows(&s, &entries).await, more)
            }
            Err(_) => return unavailable(),
        },
        Err(e) => {
            nav.error = Some(e);
            (StatusCode::BAD_REQUEST, Vec::new(), false)
        }
    };
    let older = more
        .then(|| {
            rows.last()
                .map(|r| format!("/ui/activity?{}", f.link(Some(r.seq))))
        })
        .flatten();
    let newest = (!f.before.trim().is_empty()).then(|| format!("/ui/activity?{}", f.link(None)));
    let export = format!("/ui/activity/export?{}", f.link(None));
    let chain = chain_status(&s, false).await;
    let checked = when(chain.checked_at);
    render(
        status,
        &Activity {
            title: "Activity",
            nav: Some(nav),
            f,
            rows,
            older,
            newest,
            export,
            chain,
            checked,
        },
    )
}

/// `GET /ui/activity/export`: the filtered entries, newest first, as JSON Lines (the same
/// fields and MACs as `latchkey audit export`).
pub async fn export(s: S, v: Viewer, Query(f): Query<Filters>) -> Response {
    let f = allowed(&v, f);
    let q = match f.query(&v, EXPORT_MAX) {
        Ok(q) => q,
        Err(e) => {
            return message(
                StatusCode::BAD_REQUEST,
                "Export",
                &e,
                Some(v.nav("activity")),
            );
        }
    };
    let Ok(entries) = s.vault.store().query_audit(&q).await else {
        return unavailable();
    };
    let mut body = String::new();
    for e in &entries {
        match serde_json::to_string(&latchkey_core::audit::entry_view(e)) {
            Ok(line) => {
                body.push_str(&line);
                body.push('\n');
            }
            Err(_) => return unavailable(),
        }
    }
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jsonl; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"latchkey-activity.jsonl\""),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `POST /ui/activity/verify`: walk the chain now (operators; it reads every entry).
pub async fn verify(s: S, v: Viewer, Form(f): Form<CsrfForm>) -> Response {
    if let Some(refused) = v.csrf_refusal(&f.csrf) {
        return refused;
    }
    if !v.operator() {
        return message(
            StatusCode::FORBIDDEN,
            "Operators only",
            "Only an operator can start a verification of the whole trail.",
            Some(v.nav("activity")),
        );
    }
    let status = chain_status(&s, true).await;
    v.done("/ui/activity", &status.text)
}
