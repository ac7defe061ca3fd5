//! The protected resource: a GitHub-flavoured API over the demo account's repositories.
//!
//! Bearer tokens follow RFC 6750 §3: a bad token is 401 `invalid_token`, a good token without
//! the needed scope is 403 `insufficient_scope` naming the scope. Error bodies are GitHub-style
//! `{"message": …}`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::state::{BearerCheck, Comment, Issue, MAX_COMMENTS_PER_ISSUE, MAX_ISSUES_PER_REPO};
use crate::{DEMO_LOGIN, DemoProvider, Inner};

const MAX_TITLE_CHARS: usize = 256;
const MAX_TEXT_BYTES: usize = 64 * 1024;

fn message(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "message": text }))).into_response()
}

/// Every way an API request can fail; small, so handlers can use `?`.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// 401: missing, unknown, expired or revoked bearer token.
    Unauthorized(&'static str),
    /// 403: the token lacks this scope.
    Forbidden(&'static str),
    NotFound,
    /// 422: the body parsed badly or failed validation.
    Unprocessable(String),
    /// The body could not be read (too large, broken stream); always a 4xx.
    Unreadable(StatusCode),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Unauthorized(text) => {
                let mut r = message(StatusCode::UNAUTHORIZED, text);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                r
            }
            ApiError::Forbidden(scope) => {
                let mut r = message(
                    StatusCode::FORBIDDEN,
                    &format!("the access token lacks the `{scope}` scope"),
                );
                // `scope` is one of our own constants, so it is always a valid header value;
                // the fallback only exists to avoid a panic path.
                let value = HeaderValue::from_str(&format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{scope}\""
                ))
                .unwrap_or_else(|_| {
                    HeaderValue::from_static("Bearer error=\"insufficient_scope\"")
                });
                r.headers_mut().insert(header::WWW_AUTHENTICATE, value);
                r
            }
            ApiError::NotFound => message(StatusCode::NOT_FOUND, "Not Found"),
            ApiError::Unprocessable(text) => message(StatusCode::UNPROCESSABLE_ENTITY, &text),
            ApiError::Unreadable(status) => {
                message(status, "the request body could not be read or is too large")
            }
        }
    }
}

fn unprocessable(text: &str) -> ApiError {
    ApiError::Unprocessable(text.to_owned())
}

/// Count the call, then check the bearer token carries `scope`.
fn guard(inner: &Inner, headers: &HeaderMap, scope: &'static str) -> Result<(), ApiError> {
    inner.stats.api_calls.fetch_add(1, Ordering::Relaxed);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(ApiError::Unauthorized("a bearer access token is required"));
    };
    let now = inner.clock.now();
    match inner.lock().check_bearer(token, now) {
        BearerCheck::Invalid => Err(ApiError::Unauthorized(
            "the access token is invalid, expired or revoked",
        )),
        BearerCheck::Valid(scopes) if !scopes.contains(scope) => Err(ApiError::Forbidden(scope)),
        BearerCheck::Valid(_) => Ok(()),
    }
}

/// Parse a JSON body; any failure is 422 (GitHub's answer for unusable input), never 5xx.
fn json_body<T: for<'de> Deserialize<'de>>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        ApiError::Unreadable(if e.status().is_client_error() {
            e.status()
        } else {
            StatusCode::BAD_REQUEST
        })
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::Unprocessable(format!("invalid JSON body: {e}")))
}

/// `GET /api/user`.
pub(crate) async fn user(
    State(provider): State<DemoProvider>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    guard(&provider.inner, &headers, "read:user")?;
    Ok(
        Json(json!({ "login": DEMO_LOGIN, "id": crate::DEMO_ID, "name": crate::DEMO_NAME }))
            .into_response(),
    )
}

/// `GET /api/repos`.
pub(crate) async fn repos(
    State(provider): State<DemoProvider>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    guard(&provider.inner, &headers, "repo:read")?;
    let repos = provider.inner.lock().repos.clone();
    Ok(Json(repos).into_response())
}

/// `GET /api/repos/{name}/issues`.
pub(crate) async fn list_issues(
    State(provider): State<DemoProvider>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    guard(&provider.inner, &headers, "repo:read")?;
    let mut st = provider.inner.lock();
    match st.repo_mut(&name) {
        Some(repo) => Ok(Json(&repo.issues).into_response()),
        None => Err(ApiError::NotFound),
    }
}

#[derive(Deserialize)]
struct NewIssue {
    title: String,
    #[serde(default)]
    body: Option<String>,
}

/// `POST /api/repos/{name}/issues`.
pub(crate) async fn create_issue(
    State(provider): State<DemoProvider>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    guard(&provider.inner, &headers, "issues:write")?;
    let new: NewIssue = json_body(body)?;
    if new.title.trim().is_empty() || new.title.chars().count() > MAX_TITLE_CHARS {
        return Err(unprocessable("title must be 1-256 characters"));
    }
    if new.body.as_ref().is_some_and(|b| b.len() > MAX_TEXT_BYTES) {
        return Err(unprocessable("body must be at most 64 KiB"));
    }
    let mut st = provider.inner.lock();
    let Some(repo) = st.repo_mut(&name) else {
        return Err(ApiError::NotFound);
    };
    if repo.issues.len() >= MAX_ISSUES_PER_REPO {
        return Err(unprocessable("this demo repository holds no more issues"));
    }
    let issue = Issue {
        number: repo.issues.len() as u64 + 1,
        title: new.title,
        body: new.body,
        comments: Vec::new(),
    };
    let response = (StatusCode::CREATED, Json(&issue)).into_response();
    repo.issues.push(issue);
    Ok(response)
}

#[derive(Deserialize)]
struct NewComment {
    body: String,
}

/// `POST /api/repos/{name}/issues/{number}/comments`.
pub(crate) async fn create_comment(
    State(provider): State<DemoProvider>,
    Path((name, number)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    guard(&provider.inner, &headers, "issues:write")?;
    let new: NewComment = json_body(body)?;
    if new.body.trim().is_empty() || new.body.len() > MAX_TEXT_BYTES {
        return Err(unprocessable("body must be 1 byte to 64 KiB"));
    }
    // A non-numeric issue number names no issue: 404, like any other unknown issue.
    let Ok(number) = number.parse::<u64>() else {
        return Err(ApiError::NotFound);
    };
    let mut guard = provider.inner.lock();
    let st = &mut *guard;
    let id = st.next_comment_id;
    let Some(repo) = st.repos.iter_mut().find(|r| r.name == name) else {
        return Err(ApiError::NotFound);
    };
    let Some(issue) = repo.issues.iter_mut().find(|i| i.number == number) else {
        return Err(ApiError::NotFound);
    };
    if issue.comments.len() >= MAX_COMMENTS_PER_ISSUE {
        return Err(unprocessable("this demo issue holds no more comments"));
    }
    let comment = Comment {
        id,
        body: new.body,
        user: DEMO_LOGIN,
    };
    let response = (StatusCode::CREATED, Json(&comment)).into_response();
    issue.comments.push(comment);
    st.next_comment_id += 1;
    Ok(response)
}
