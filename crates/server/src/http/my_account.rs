//! The My Account API's Connected Accounts endpoints (`/me/v1/connected-accounts/*`): bearer
//! authentication with a `{issuer}me/` access token and a scope per endpoint, JSON bodies,
//! problem-JSON errors. The decisions are in `latchkey_core::vault::my_account`.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use latchkey_core::params::Params;
use latchkey_core::vault::Problem;
use serde_json::Value;

use super::errors::json_response;
use super::{AppState, RequestMeta};

const CREATE: &str = "create:me:connected_accounts";
const READ: &str = "read:me:connected_accounts";
const DELETE: &str = "delete:me:connected_accounts";
const MAX_BODY: usize = 64 * 1024;

fn problem(p: &Problem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(status, &p.to_json(), None)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim().to_owned())
}

async fn json_body(headers: &HeaderMap, body: Body) -> Result<Value, Problem> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
    let fail = |status: u16, title: &'static str, detail: &str| Problem {
        status,
        title,
        detail: detail.to_owned(),
        validation_errors: Vec::new(),
    };
    if !is_json {
        return Err(fail(415, "Unsupported Media Type", "send application/json"));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| fail(413, "Payload Too Large", "the body is too large"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| fail(400, "Bad Request", "the body is not valid JSON"))
}

fn answer(result: Result<(StatusCode, Value), Problem>) -> Response {
    match result {
        Ok((status, body)) => json_response(status, &body, None),
        Err(p) => problem(&p),
    }
}

pub async fn connect(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    answer(
        async {
            let token = s
                .vault
                .my_account_token(bearer(&headers).as_deref(), CREATE)
                .await?;
            let body = json_body(&headers, body).await?;
            Ok((
                StatusCode::CREATED,
                s.vault.my_account_connect(&token, &body).await?,
            ))
        }
        .await,
    )
}

pub async fn complete(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    answer(
        async {
            let token = s
                .vault
                .my_account_token(bearer(&headers).as_deref(), CREATE)
                .await?;
            let body = json_body(&headers, body).await?;
            Ok((
                StatusCode::CREATED,
                s.vault.my_account_complete(&token, &body).await?,
            ))
        }
        .await,
    )
}

/// The query, with `connection` allowed to repeat (form/explode) and everything else once.
fn list_query(uri: &axum::http::Uri) -> Result<(Params, Vec<String>), Problem> {
    let mut connections = Vec::new();
    let mut rest = Vec::new();
    for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if k == "connection" {
            connections.extend(v.split(',').filter(|c| !c.is_empty()).map(str::to_owned));
        } else {
            rest.push((k.into_owned(), v.into_owned()));
        }
    }
    let params = Params::from_pairs(rest).map_err(Problem::from)?;
    Ok((params, connections))
}

pub async fn accounts(
    State(s): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    answer(
        async {
            let token = s
                .vault
                .my_account_token(bearer(&headers).as_deref(), READ)
                .await?;
            let (query, connections) = list_query(&uri)?;
            Ok((
                StatusCode::OK,
                s.vault
                    .my_account_accounts(&token, &query, &connections)
                    .await?,
            ))
        }
        .await,
    )
}

pub async fn connections(
    State(s): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    answer(
        async {
            s.vault
                .my_account_token(bearer(&headers).as_deref(), READ)
                .await?;
            let (query, _) = list_query(&uri)?;
            Ok((
                StatusCode::OK,
                s.vault.my_account_connections(&query).await?,
            ))
        }
        .await,
    )
}

pub async fn delete(
    State(s): State<AppState>,
    Extension(meta): Extension<RequestMeta>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let result = async {
        let token = s
            .vault
            .my_account_token(bearer(&headers).as_deref(), DELETE)
            .await?;
        // An id that is not UTF-8 once decoded: a problem like any other bad input.
        let Path(id) = id.map_err(|_| Problem {
            status: 400,
            title: "Bad Request",
            detail: "the account id is not valid UTF-8".into(),
            validation_errors: Vec::new(),
        })?;
        s.vault
            .my_account_delete(&token, &id, &super::web::context(&meta))
            .await
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(p) => problem(&p),
    }
}
