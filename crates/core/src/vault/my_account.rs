//! The Connected Accounts part of the My Account API (`/me/v1/connected-accounts/*`, as Auth0's
//! SDKs call it): an app, holding a user's access token for `{issuer}me/`, starts a connect
//! (`connect`), sends the browser to Latchkey with a single-use ticket, Latchkey runs the
//! provider's consent and returns the browser to the app with a single-use `connect_code`, and
//! the app finishes with `complete` (PKCE-checked, bound to the same user and app). Apps can
//! also list and delete the user's connected accounts. Errors are problem JSON.

use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;

use super::*;

/// How long a connect transaction (ticket, browser leg, completion) may take.
const CONNECT_TTL: i64 = 300;
const DEFAULT_PAGE: usize = 10;
const MAX_PAGE: usize = 20;

/// An RFC 9457-style problem, as the My Account API answers errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u16,
    pub title: &'static str,
    pub detail: String,
    /// `(field, what is wrong)`.
    pub validation_errors: Vec<(String, String)>,
}

impl Problem {
    fn new(status: u16, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
            validation_errors: Vec::new(),
        }
    }

    fn invalid(field: &str, what: &str) -> Self {
        Self {
            validation_errors: vec![(field.to_owned(), what.to_owned())],
            ..Self::new(400, "Bad Request", format!("`{field}` {what}"))
        }
    }

    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "type": format!("https://latchkey.dev/problems/{}", self.title.to_lowercase().replace(' ', "-")),
            "status": self.status,
            "title": self.title,
            "detail": self.detail,
        });
        if !self.validation_errors.is_empty() {
            body["validation_errors"] = self
                .validation_errors
                .iter()
                .map(|(field, detail)| json!({ "field": field, "detail": detail, "pointer": format!("/{field}") }))
                .collect();
        }
        body
    }
}

impl From<OAuthError> for Problem {
    fn from(e: OAuthError) -> Self {
        let title = match e.status {
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            429 => "Too Many Requests",
            s if s >= 500 => "Service Unavailable",
            _ => "Bad Request",
        };
        Problem::new(e.status, title, e.description)
    }
}

fn iso(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Read a JSON object's string field with a length range; `None` if absent.
fn text(
    body: &Map<String, Value>,
    field: &str,
    range: std::ops::RangeInclusive<usize>,
) -> Result<Option<String>, Problem> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if range.contains(&s.chars().count()) => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(Problem::invalid(
            field,
            &format!("must be {}–{} characters", range.start(), range.end()),
        )),
        Some(_) => Err(Problem::invalid(field, "must be a string")),
    }
}

fn required(v: Option<String>, field: &str) -> Result<String, Problem> {
    v.ok_or_else(|| Problem::invalid(field, "is required"))
}

fn object(body: &Value) -> Result<&Map<String, Value>, Problem> {
    body.as_object()
        .ok_or_else(|| Problem::new(400, "Bad Request", "the body must be a JSON object"))
}

fn only_fields(body: &Map<String, Value>, allowed: &[&str]) -> Result<(), Problem> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(Problem::invalid(k, "is not a known property")),
        None => Ok(()),
    }
}

/// The optional page size and cursor of a list request.
fn page(query: &Params) -> Result<(usize, usize), Problem> {
    let take = match query.get("take") {
        None => DEFAULT_PAGE,
        Some(t) => match t.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return Err(Problem::invalid("take", "must be an integer from 1 to 20")),
        },
    };
    // Auth0's SDKs send the cursor as `from`, Next.js as `next`: accept both.
    let from = match query.get("from").or(query.get("next")) {
        None => 0,
        Some(c) => c
            .parse::<usize>()
            .map_err(|_| Problem::invalid("from", "is not a cursor this API issued"))?,
    };
    Ok((from, take))
}

fn paged(items: Vec<Value>, from: usize, take: usize, key: &str) -> Value {
    let total = items.len();
    let page: Vec<Value> = items.into_iter().skip(from).take(take).collect();
    let mut body = json!({ key: page });
    if from + take < total {
        body["next"] = json!((from + take).to_string());
    }
    body
}

impl Vault {
    /// The caller's My Account access token, checked for `scope`.
    pub async fn my_account_token(
        &self,
        bearer: Option<&str>,
        scope: &str,
    ) -> Result<AccessToken, Problem> {
        let Some(bearer) = bearer else {
            return Err(Problem::new(
                401,
                "Unauthorized",
                "send a My Account access token as `Authorization: Bearer …`",
            ));
        };
        let token = self
            .verify_access_token(bearer, &format!("{}me/", self.config.issuer))
            .await?;
        if !token.scope.iter().any(|s| s == scope) {
            return Err(Problem::new(
                403,
                "Forbidden",
                format!("the access token lacks the `{scope}` scope"),
            ));
        }
        Ok(token)
    }

    fn account_view(&self, a: &ConnectedAccount, connection: &str) -> Value {
        let mut v = json!({
            "id": a.id,
            "connection": connection,
            "access_type": "offline",
            "scopes": a.scopes.iter().collect::<Vec<_>>(),
            "created_at": iso(a.created_at),
        });
        if let Some(e) = a.access_expires_at.filter(|_| a.refresh_token.is_none()) {
            v["expires_at"] = json!(iso(e));
        }
        v
    }

    /// `POST /me/v1/connected-accounts/connect` → 201 body.
    pub async fn my_account_connect(
        &self,
        token: &AccessToken,
        body: &Value,
    ) -> Result<Value, Problem> {
        let body = object(body)?;
        only_fields(
            body,
            &[
                "connection",
                "redirect_uri",
                "state",
                "code_challenge",
                "code_challenge_method",
                "scopes",
                "authorization_params",
            ],
        )?;
        let connection = required(text(body, "connection", 1..=128)?, "connection")?;
        let redirect_uri = required(text(body, "redirect_uri", 1..=2048)?, "redirect_uri")?;
        let state = text(body, "state", 1..=4096)?;
        let code_challenge = text(body, "code_challenge", 43..=128)?;
        match (
            text(body, "code_challenge_method", 1..=16)?.as_deref(),
            &code_challenge,
        ) {
            (Some("S256"), Some(_)) | (None, None) => {}
            _ => {
                return Err(Problem::invalid(
                    "code_challenge_method",
                    "must be S256, with a code_challenge",
                ));
            }
        }
        let scopes = match body.get("scopes") {
            None | Some(Value::Null) => Scopes::default(),
            Some(Value::Array(items)) if (1..=100).contains(&items.len()) => {
                let mut out = Vec::new();
                for item in items {
                    match item.as_str() {
                        Some(s)
                            if (1..=255).contains(&s.len())
                                && !s.contains(' ')
                                && !out.contains(&s) =>
                        {
                            out.push(s)
                        }
                        _ => {
                            return Err(Problem::invalid(
                                "scopes",
                                "must be unique strings of 1–255 characters",
                            ));
                        }
                    }
                }
                out.into_iter().collect()
            }
            Some(_) => {
                return Err(Problem::invalid(
                    "scopes",
                    "must be an array of 1–100 scopes",
                ));
            }
        };
        const FORWARDED: [&str; 9] = [
            "acr_values",
            "audience",
            "resource",
            "display",
            "id_token_hint",
            "login_hint",
            "max_age",
            "prompt",
            "ui_locales",
        ];
        let mut params = Vec::new();
        match body.get("authorization_params") {
            None | Some(Value::Null) => {}
            Some(Value::Object(p)) => {
                only_fields(p, &FORWARDED).map_err(|_| {
                    Problem::invalid("authorization_params", "has an unknown property")
                })?;
                for (k, v) in p {
                    let v = match v {
                        Value::String(s) if s.len() <= 2048 => s.clone(),
                        Value::Number(n) if k == "max_age" => n.to_string(),
                        Value::Null => continue,
                        _ => {
                            return Err(Problem::invalid(
                                "authorization_params",
                                &format!("`{k}` has the wrong type"),
                            ));
                        }
                    };
                    params.push((k.clone(), v));
                }
            }
            Some(_) => {
                return Err(Problem::invalid(
                    "authorization_params",
                    "must be an object",
                ));
            }
        }
        let conn = self
            .store
            .connection_by_name(&connection)
            .await
            .map_err(store_err)?
            .ok_or_else(|| Problem::invalid("connection", "is not a connection of this tenant"))?;
        let client = self
            .store
            .agent_by_id(&token.client_id)
            .await
            .map_err(store_err)?;
        if !client.is_some_and(|c| c.redirect_uris.contains(&redirect_uri)) {
            return Err(Problem::invalid(
                "redirect_uri",
                "is not registered for this application",
            ));
        }
        let auth_session = secrets::random_token(32);
        let ticket = secrets::random_token(32);
        let record = AccountConnect {
            id: secrets::sha256_b64(auth_session.as_bytes()),
            ticket_hash: Some(secrets::sha256_b64(ticket.as_bytes())),
            user_id: token.user_id.clone(),
            client_id: token.client_id.clone(),
            connection_id: conn.id,
            redirect_uri,
            state,
            code_challenge,
            scopes,
            params,
            account_id: None,
            completed: false,
            expires_at: self.now() + CONNECT_TTL,
        };
        self.store
            .insert_account_connect(&record)
            .await
            .map_err(store_err)?;
        Ok(json!({
            "auth_session": auth_session,
            "connect_uri": format!("{}connected-accounts/connect", self.config.issuer),
            "connect_params": { "ticket": ticket },
            "expires_in": CONNECT_TTL,
        }))
    }

    /// `GET /connected-accounts/connect?ticket=…` in the signed-in user's browser: use up the
    /// ticket and go to the provider.
    pub async fn my_account_ticket(
        &self,
        user_id: &str,
        ticket: &str,
    ) -> Result<String, OAuthError> {
        let record = self
            .store
            .take_account_connect_ticket(&secrets::sha256_b64(ticket.as_bytes()), self.now())
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request(
                    "unknown, used or expired connect ticket; start again from the app",
                )
            })?;
        if record.user_id != user_id {
            return Err(OAuthError::invalid_request(
                "this connect request belongs to another user",
            ));
        }
        let conn = self
            .store
            .connection_by_id(&record.connection_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_request("the connection was removed"))?;
        self.connect_begin(
            user_id,
            &conn.name,
            &record.scopes,
            &record.params,
            format!("app:{}", record.id),
        )
        .await
    }

    /// The provider answered a My Account connect: give the app a single-use `connect_code`.
    pub(super) async fn connect_code_for_app(
        &self,
        session_id: &str,
        account_id: &str,
    ) -> Result<String, OAuthError> {
        let record = self
            .store
            .account_connect(session_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request("the connect request expired; start again from the app")
            })?;
        let code = secrets::random_token(24);
        self.store
            .set_account_connect_code(
                &record.id,
                &secrets::sha256_b64(code.as_bytes()),
                account_id,
            )
            .await
            .map_err(store_err)?;
        let mut pairs = vec![("connect_code", code.as_str())];
        if let Some(state) = &record.state {
            pairs.push(("state", state));
        }
        Ok(url_with_query(&record.redirect_uri, &pairs))
    }

    /// `POST /me/v1/connected-accounts/complete` → 201 body (the connected account).
    pub async fn my_account_complete(
        &self,
        token: &AccessToken,
        body: &Value,
    ) -> Result<Value, Problem> {
        let body = object(body)?;
        only_fields(
            body,
            &[
                "auth_session",
                "connect_code",
                "redirect_uri",
                "code_verifier",
            ],
        )?;
        let auth_session = required(text(body, "auth_session", 1..=64)?, "auth_session")?;
        let connect_code = required(text(body, "connect_code", 1..=46)?, "connect_code")?;
        let redirect_uri = required(text(body, "redirect_uri", 1..=2048)?, "redirect_uri")?;
        let verifier = text(body, "code_verifier", 43..=128)?;
        let record = self
            .store
            .account_connect(&secrets::sha256_b64(auth_session.as_bytes()))
            .await
            .map_err(store_err)?
            .ok_or_else(|| Problem::invalid("auth_session", "is unknown"))?;
        if record.user_id != token.user_id || record.client_id != token.client_id {
            return Err(Problem::new(
                409,
                "Conflict",
                "this connect session belongs to another user or application",
            ));
        }
        if record.expires_at <= self.now() {
            return Err(Problem::invalid("auth_session", "has expired; start again"));
        }
        if record.redirect_uri != redirect_uri {
            return Err(Problem::invalid(
                "redirect_uri",
                "does not match the connect request",
            ));
        }
        if let Some(challenge) = &record.code_challenge {
            let ok = verifier.as_deref().is_some_and(|v| {
                secrets::ct_eq(
                    secrets::sha256_b64(v.as_bytes()).as_bytes(),
                    challenge.as_bytes(),
                )
            });
            if !ok {
                return Err(Problem::invalid(
                    "code_verifier",
                    "does not match the code_challenge",
                ));
            }
        }
        let code_hash = secrets::sha256_b64(connect_code.as_bytes());
        if !self
            .store
            .complete_account_connect(&record.id, &code_hash)
            .await
            .map_err(store_err)?
        {
            return Err(Problem::invalid(
                "connect_code",
                "is invalid or was already used",
            ));
        }
        let account = match &record.account_id {
            Some(id) => self.store.account_by_id(id).await.map_err(store_err)?,
            None => None,
        }
        .ok_or_else(|| Problem::invalid("connect_code", "is invalid"))?;
        let conn = self
            .store
            .connection_by_id(&account.connection_id)
            .await
            .map_err(store_err)?;
        Ok(self.account_view(&account, &conn.map(|c| c.name).unwrap_or_default()))
    }

    /// `GET /me/v1/connected-accounts/accounts`.
    pub async fn my_account_accounts(
        &self,
        token: &AccessToken,
        query: &Params,
        connections: &[String],
    ) -> Result<Value, Problem> {
        let (from, take) = page(query)?;
        if connections.len() > 20 {
            return Err(Problem::invalid(
                "connection",
                "may be given at most 20 times",
            ));
        }
        let names: std::collections::HashMap<String, String> = self
            .store
            .list_connections()
            .await
            .map_err(store_err)?
            .into_iter()
            .map(|c| (c.id, c.name))
            .collect();
        let items: Vec<Value> = self
            .store
            .list_accounts(Some(&token.user_id))
            .await
            .map_err(store_err)?
            .iter()
            .filter(|a| a.status == AccountStatus::Active)
            .filter_map(|a| {
                let name = names.get(&a.connection_id)?;
                (connections.is_empty() || connections.contains(name))
                    .then(|| self.account_view(a, name))
            })
            .collect();
        Ok(paged(items, from, take, "accounts"))
    }

    /// `GET /me/v1/connected-accounts/connections`.
    pub async fn my_account_connections(&self, query: &Params) -> Result<Value, Problem> {
        let (from, take) = page(query)?;
        let items: Vec<Value> = self
            .store
            .list_connections()
            .await
            .map_err(store_err)?
            .iter()
            .map(|c| json!({ "name": c.name, "strategy": c.provider, "scopes": c.scopes.iter().collect::<Vec<_>>() }))
            .collect();
        Ok(paged(items, from, take, "connections"))
    }

    /// `DELETE /me/v1/connected-accounts/accounts/{id}`: the user's own accounts only; the
    /// provider is asked to revoke too (Auth0 only forgets).
    pub async fn my_account_delete(
        &self,
        token: &AccessToken,
        id: &str,
        ctx: &RequestContext,
    ) -> Result<(), Problem> {
        // The user, through an app holding their My Account access token.
        let actor = Actor {
            kind: "user",
            id: token.user_id.clone(),
            method: "access_token",
        };
        let note = format!("disconnected through {}", token.client_id);
        match self.disconnect_own(&actor, id, Some(note), ctx).await {
            Ok(true) => {}
            Ok(false) | Err(AdminError::NotFound(_)) => {
                return Err(Problem::new(404, "Not Found", "no such connected account"));
            }
            Err(other) => {
                tracing::error!(error = %other, "deleting a connected account failed");
                return Err(Problem::new(503, "Service Unavailable", "retry shortly"));
            }
        }
        Ok(())
    }

    /// A user disconnects one of their own accounts (`actor.id` is the user): revoked here and
    /// at the provider. `Ok(false)` when it is not theirs or is already revoked — the same
    /// answer, so nobody learns whether another user's account exists.
    pub async fn disconnect_own(
        &self,
        actor: &Actor,
        id: &str,
        note: Option<String>,
        ctx: &RequestContext,
    ) -> Result<bool, AdminError> {
        let account = self.store.account_by_id(id).await?;
        if !account.is_some_and(|a| a.user_id == actor.id && a.status != AccountStatus::Revoked) {
            return Ok(false);
        }
        self.revoke_account_noted(id, actor, note, ctx).await?;
        Ok(true)
    }
}
