//! The overview: the user's accounts and their health, what waits for their approval, tokens
//! released per day by agent, and their recent activity.

use askama::Template;
use axum::http::StatusCode;
use axum::response::Response;
use latchkey_core::store::AuditQuery;

use super::accounts::{AccountRow, rows};
use super::activity::{ActivityRow, activity_rows};
use super::approvals::{ApprovalRow, split};
use super::chart::{DAYS, draw};
use super::{Nav, S, Viewer, render, unavailable};

#[derive(Template)]
#[template(path = "overview.html")]
struct Overview {
    title: &'static str,
    nav: Option<Nav>,
    accounts: Vec<AccountRow>,
    pending: Vec<ApprovalRow>,
    chart_svg: String,
    legend: Vec<(String, String, i64)>,
    released: i64,
    recent: Vec<ActivityRow>,
}

pub async fn page(s: S, v: Viewer) -> Response {
    let store = s.vault.store();
    let today = s.vault.now().div_euclid(86_400) * 86_400;
    let since = today - (DAYS - 1) * 86_400;
    let (Ok(accounts), Ok(connections), Ok(agents), Ok(counts), Ok(recent)) = (
        store.list_accounts(Some(&v.user.id)).await,
        store.list_connections().await,
        store.list_agents().await,
        store
            .audit_daily_counts("token.release", Some(&v.user.id), since)
            .await,
        store
            .query_audit(&AuditQuery {
                subject_user: Some(v.user.id.clone()),
                limit: 10,
                ..AuditQuery::default()
            })
            .await,
    ) else {
        return unavailable();
    };
    let Some((pending, _)) = split(&s, &v).await else {
        return unavailable();
    };
    let chart = draw(&counts, today, |id| {
        agents
            .iter()
            .find(|a| a.id == id)
            .map_or_else(|| id.to_owned(), |a| a.name.clone())
    });
    let mut accounts = rows(&accounts, &connections);
    accounts.retain(|a| a.live);
    render(
        StatusCode::OK,
        &Overview {
            title: "Overview",
            nav: Some(v.nav("overview")),
            accounts,
            pending,
            chart_svg: chart.svg,
            legend: chart.legend,
            released: chart.total,
            recent: activity_rows(&s, &recent).await,
        },
    )
}
