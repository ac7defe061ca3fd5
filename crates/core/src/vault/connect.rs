//! Connecting an account: authorization code + PKCE towards the provider, with the request
//! shaped by the provider's catalog entry; and OpenID discovery for new `oidc` connections.

use super::*;

impl Vault {
    /// Start connecting `connection` for `user_id`; returns the provider's authorize URL.
    pub async fn connect_start(
        &self,
        user_id: &str,
        connection: &str,
    ) -> Result<String, OAuthError> {
        self.connect_begin(user_id, connection, &Scopes::default(), &[], String::new())
            .await
    }

    /// Start connecting with extra scopes and provider parameters; `then_to` says where the
    /// browser goes once the provider answers (see [`ConnectDone::next`]). The scopes asked
    /// for are the connection's, those the user granted before (incremental consent), and
    /// `extra`.
    pub(super) async fn connect_begin(
        &self,
        user_id: &str,
        connection: &str,
        extra: &Scopes,
        extra_params: &[(String, String)],
        then_to: String,
    ) -> Result<String, OAuthError> {
        let mut conn = self
            .store
            .connection_by_name(connection)
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request(format!("connection `{connection}` does not exist"))
            })?;
        let ep = self.endpoints(&conn).await?;
        let mut scopes = conn.scopes.union(extra);
        for earlier in self
            .store
            .accounts_for(user_id, &conn.id)
            .await
            .map_err(store_err)?
        {
            if earlier.status == AccountStatus::Active {
                scopes = scopes.union(&earlier.scopes);
            }
        }
        conn.scopes = scopes.clone();
        let state = secrets::random_token(32);
        let verifier = secrets::random_token(32);
        let challenge = secrets::sha256_b64(verifier.as_bytes());
        let state_hash = secrets::sha256_b64(state.as_bytes());
        let redirect_uri = self.config.connect_redirect_uri(&conn.name);
        let flow = ConnectFlow {
            code_verifier: self.keys.seal(
                Slot {
                    table: "connect_flows",
                    field: "code_verifier",
                    row: &state_hash,
                },
                verifier.as_bytes(),
            ),
            state_hash,
            user_id: user_id.to_owned(),
            connection_id: conn.id.clone(),
            redirect_uri: redirect_uri.clone(),
            scopes,
            then_to,
            expires_at: self.now() + self.config.connect_flow_ttl,
        };
        self.store
            .insert_connect_flow(&flow)
            .await
            .map_err(store_err)?;
        let provider_params = catalog::authorize_params(&conn);
        let mut params = vec![
            ("response_type", "code"),
            ("client_id", ep.client_id.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
        ];
        params.extend(
            provider_params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        // Parameters the app forwards (My Account `authorization_params`) may not override ours.
        let reserved = [
            "response_type",
            "client_id",
            "redirect_uri",
            "state",
            "code_challenge",
            "code_challenge_method",
            "scope",
        ];
        params.extend(
            extra_params
                .iter()
                .filter(|(k, _)| !reserved.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        params.extend([
            ("state", state.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ]);
        Ok(url_with_query(&ep.authorize_url, &params))
    }

    /// Finish a connect flow for the signed-in `user_id` with the provider's `code`.
    /// `connection` is the one whose callback URL the answer arrived at; `iss` the answer's
    /// RFC 9207 parameter, when the provider sent one.
    pub async fn connect_finish(
        &self,
        user_id: &str,
        connection: &str,
        state: &str,
        code: &str,
        iss: Option<&str>,
    ) -> Result<ConnectDone, OAuthError> {
        self.connect_finish_in(
            user_id,
            connection,
            state,
            code,
            iss,
            &RequestContext::default(),
        )
        .await
    }

    /// [`Vault::connect_finish`] in an HTTP request (its id and address go in the audit entry).
    pub async fn connect_finish_in(
        &self,
        user_id: &str,
        connection: &str,
        state: &str,
        code: &str,
        iss: Option<&str>,
        ctx: &RequestContext,
    ) -> Result<ConnectDone, OAuthError> {
        let state_hash = secrets::sha256_b64(state.as_bytes());
        let flow = self
            .store
            .take_connect_flow(&state_hash, self.now())
            .await
            .map_err(store_err)?
            .ok_or_else(|| {
                OAuthError::invalid_request("unknown or expired connect request; start again")
            })?;
        if flow.user_id != user_id {
            return Err(OAuthError::invalid_request(
                "this connect request was started by another user",
            ));
        }
        let conn = self
            .store
            .connection_by_id(&flow.connection_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_request("the connection was removed"))?;
        if conn.name != connection {
            return Err(OAuthError::invalid_request(format!(
                "this answer arrived at {connection}'s callback, but the request was for {}; start again",
                conn.name
            )));
        }
        // Mix-up defence: an answer that names another issuer is not this provider's.
        if let (Some(expected), Some(got)) = (catalog::expected_iss(&conn), iss)
            && expected != got
        {
            return Err(OAuthError::invalid_request(format!(
                "the authorization response names issuer `{got}`, not {}'s `{expected}`; start again",
                conn.name
            )));
        }
        let verifier = self
            .keys
            .open_string(
                Slot {
                    table: "connect_flows",
                    field: "code_verifier",
                    row: &state_hash,
                },
                &flow.code_verifier,
            )
            .await
            .map_err(key_err)?;
        let ep = self.endpoints(&conn).await?;
        let tokens = self
            .upstream
            .exchange_code(&ep, code, verifier.expose_secret(), &flow.redirect_uri)
            .await
            .map_err(|e| match e {
                UpstreamError::InvalidGrant(why) => {
                    OAuthError::invalid_grant(format!("{} refused the code: {why}", conn.name))
                }
                other => OAuthError::upstream_unavailable(format!("{}: {other}", conn.name), 5),
            })?;
        let upstream_account_id = match &ep.userinfo_url {
            Some(_) => match self.upstream.userinfo(&ep, &tokens.access_token).await {
                Ok(info) => catalog::upstream_account_id(&conn, &info),
                Err(e) => {
                    tracing::warn!(connection = %conn.name, error = %e, "could not read the upstream account id");
                    None
                }
            },
            None => None,
        };
        let now = self.now();
        let existing = self
            .store
            .accounts_for(user_id, &conn.id)
            .await
            .map_err(store_err)?
            .into_iter()
            .find(|a| a.upstream_account_id == upstream_account_id);
        let recovered = existing
            .as_ref()
            .is_some_and(|a| a.status == AccountStatus::NeedsReauth);
        let base = existing.unwrap_or_else(|| ConnectedAccount {
            id: secrets::random_id("cac"),
            user_id: user_id.to_owned(),
            connection_id: conn.id.clone(),
            upstream_account_id: upstream_account_id.clone(),
            scopes: Scopes::default(),
            access_token: None,
            access_expires_at: None,
            refresh_token: None,
            status: AccountStatus::Active,
            status_reason: None,
            created_at: now,
            updated_at: now,
            last_used_at: None,
            last_refreshed_at: None,
            token_version: 0,
            refresh_started_at: None,
        });
        let mut account = self.apply_tokens(base, tokens, Some(&flow.scopes));
        account.status = AccountStatus::Active;
        let audit = AuditRecord {
            subject_user: Some(user_id.to_owned()),
            connection: Some(conn.name.clone()),
            account_id: Some(account.id.clone()),
            scopes: Some(account.scopes.to_string_spaced()),
            notify: recovered
                .then(|| self.account_event("account.recovered", &account, &conn, None))
                .flatten(),
            ..self.audit_in(&Actor::user(user_id), "account.connect", ctx)
        };
        let id = self
            .store
            .upsert_account(&account, &audit)
            .await
            .map_err(store_err)?;
        account.id = id;
        let next = match flow.then_to.split_once(':') {
            Some(("return", path)) => Some(path.to_owned()),
            Some(("app", session)) => Some(self.connect_code_for_app(session, &account.id).await?),
            _ => None,
        };
        Ok(ConnectDone { account, next })
    }

    /// Read an OpenID provider's discovery document once, for `connection add --provider
    /// oidc`: the endpoints to store on the connection, checked against `issuer` (see
    /// [`catalog::from_discovery`]).
    pub async fn discover_oidc(&self, issuer: &str) -> Result<catalog::Discovered, AdminError> {
        catalog::check_url("issuer", issuer).map_err(AdminError::Invalid)?;
        let url = catalog::discovery_url(issuer);
        let doc = self
            .upstream
            .get_json(&url)
            .await
            .map_err(|e| AdminError::Invalid(format!("reading {url}: {e}")))?;
        catalog::from_discovery(issuer, &doc).map_err(AdminError::Invalid)
    }
}

/// A finished connect flow.
#[derive(Debug)]
pub struct ConnectDone {
    pub account: ConnectedAccount,
    /// Where the browser goes now: an `/authorize` request to resume, or the app's redirect URI
    /// with a `connect_code`; `None` means Latchkey's own account page.
    pub next: Option<String>,
}
