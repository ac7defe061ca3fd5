//! `POST /bc-authorize` (CIBA; its grant is polled at `/oauth/token`). Users decide requests
//! in the dashboard (`/ui/approvals`); the older `/approvals` links redirect there.

use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Redirect, Response};

use super::errors::{json_response, oauth_error};
use super::oauth::client_request;
use super::web::context;
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

/// Approval links given out before the dashboard (`approval_uri`, webhooks) still lead to the
/// request.
pub async fn to_dashboard() -> Redirect {
    Redirect::permanent("/ui/approvals")
}

pub async fn to_dashboard_one(Path(id): Path<String>) -> Redirect {
    let id: String = url::form_urlencoded::byte_serialize(id.as_bytes()).collect();
    Redirect::permanent(&format!("/ui/approvals/{id}"))
}
