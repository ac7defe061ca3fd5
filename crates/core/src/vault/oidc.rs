//! Latchkey as the OpenID provider of first-party apps: `/authorize` (code + PKCE S256 only),
//! the `authorization_code` and `refresh_token` grants, ID tokens and `at+jwt` access tokens
//! (RS256, Latchkey's key in the JWKS), `/userinfo`, and RFC 7009 revocation.
//!
//! What one sign-in grants an app is a *token family*: its refresh tokens (opaque, stored as
//! hashes, rotated on use when the app asks for it) and its access tokens (JWTs carrying the
//! family id) derive from it, and revoking the family — by `/oauth/revoke`, a replayed code or
//! a reused rotated refresh token — ends all of them at once.

use latchkey_crypto::jws::Claims;
use serde_json::{Value, json};

use super::*;

/// The My Account API audience is `{issuer}me/`; these are its scopes.
pub const MY_ACCOUNT_SCOPES: [&str; 3] = [
    "create:me:connected_accounts",
    "read:me:connected_accounts",
    "delete:me:connected_accounts",
];
/// The OpenID PAPE policy an app names in `acr_values` to require a second factor.
pub const MFA_ACR: &str = "http://schemas.openid.net/pape/policies/2007/06/multi-factor";
const CODE_TTL: i64 = 60;
const ACCESS_TOKEN_TTL: i64 = 600;
const ID_TOKEN_TTL: i64 = 3600;
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// What `/authorize` should do with the browser.
#[derive(Debug, PartialEq, Eq)]
pub enum Authorize {
    /// The request cannot be answered at the app (unknown client, redirect URI not registered):
    /// show this message, never redirect.
    ErrorPage(String),
    /// Send the browser to the app's redirect URI (with a code, or an error).
    Redirect(String),
    /// The user must sign in (again), then come back to `/authorize?{return_query}`.
    SignIn { return_query: String },
}

/// What to put in the tokens one grant issues.
pub(super) struct Issue<'a> {
    pub(super) scope: &'a Scopes,
    pub(super) audience: &'a str,
    pub(super) nonce: Option<&'a str>,
    pub(super) refresh: Option<String>,
}

/// A verified Latchkey access token.
#[derive(Debug, Clone)]
pub struct AccessToken {
    pub user_id: String,
    pub client_id: String,
    pub scope: Scopes,
    pub audience: String,
    pub family_id: String,
}

fn amr_list(amr: &str) -> Vec<&str> {
    let mut list: Vec<&str> = amr.split_whitespace().collect();
    if list.contains(&"otp") {
        list.push("mfa");
    }
    list
}

impl Vault {
    /// The public half of Latchkey's signing key(s), for `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .signing()
            .public_keys()
            .iter()
            .filter_map(|k| serde_json::from_str(&k.to_jwk_json()).ok())
            .collect();
        json!({ "keys": keys })
    }

    fn redirect_with(&self, uri: &str, pairs: &[(&str, &str)]) -> String {
        let mut all: Vec<(&str, &str)> = pairs.to_vec();
        // RFC 9207: say who answered, so a client of several providers can detect mix-up.
        all.push(("iss", &self.config.issuer));
        url_with_query(uri, &all)
    }

    /// `GET /authorize`. `session` is the browser's signed-in session, if any; `query` the raw
    /// query string (to come back to after signing in).
    pub async fn authorize(
        &self,
        params: &Params,
        session: Option<&Session>,
        query: &str,
    ) -> Result<Authorize, OAuthError> {
        // Until the client and its redirect URI are known good, nothing may redirect.
        let Some(client_id) = params.get("client_id") else {
            return Ok(Authorize::ErrorPage(
                "The request names no client_id.".into(),
            ));
        };
        let client = self.store.agent_by_id(client_id).await.map_err(store_err)?;
        let Some(client) = client.filter(|c| !c.disabled && !c.redirect_uris.is_empty()) else {
            return Ok(Authorize::ErrorPage(format!(
                "Unknown application `{client_id}`."
            )));
        };
        let Some(redirect_uri) = params.get("redirect_uri") else {
            return Ok(Authorize::ErrorPage(
                "The request names no redirect_uri.".into(),
            ));
        };
        // Exact string comparison: no case folding, no trailing-slash or query tolerance.
        if !client.redirect_uris.iter().any(|r| r == redirect_uri) {
            return Ok(Authorize::ErrorPage(format!(
                "The redirect URI is not registered for application `{client_id}`."
            )));
        }
        let state = params.get("state").unwrap_or("");
        let fail = |error: &str, description: &str| {
            let mut pairs = vec![("error", error), ("error_description", description)];
            if !state.is_empty() {
                pairs.push(("state", state));
            }
            Ok(Authorize::Redirect(
                self.redirect_with(redirect_uri, &pairs),
            ))
        };
        if params.get("response_type") != Some("code") {
            return fail(
                "unsupported_response_type",
                "only response_type=code is supported",
            );
        }
        if params.get("request").is_some() || params.get("request_uri").is_some() {
            return fail("request_not_supported", "request objects are not supported");
        }
        let Some(challenge) = params.get("code_challenge") else {
            return fail(
                "invalid_request",
                "PKCE is required: send code_challenge with S256",
            );
        };
        if params.get("code_challenge_method") != Some("S256")
            || !(43..=128).contains(&challenge.len())
        {
            return fail(
                "invalid_request",
                "code_challenge_method must be S256 with a 43–128 character challenge",
            );
        }
        let audience = match params.get("audience") {
            None | Some("None") => self.config.issuer.clone(),
            Some(a) if self.known_audience(a, false).await? => a.to_owned(),
            Some(_) => return fail("invalid_target", "unknown audience"),
        };
        let max_age = match params.get("max_age") {
            None => None,
            Some(m) => match m.parse::<i64>() {
                Ok(v) if v >= 0 => Some(v),
                _ => return fail("invalid_request", "max_age must be a non-negative integer"),
            },
        };
        let prompt = params.get("prompt").unwrap_or("");
        let wants_mfa = params
            .get("acr_values")
            .is_some_and(|a| a.split_whitespace().any(|v| v == MFA_ACR));

        // Is the user signed in well enough for this request?
        let now = self.now();
        let session = session.filter(|s| !s.pending_mfa);
        let sign_in = || {
            // After signing in, come back without `prompt=login` (or it would loop).
            let back: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .filter(|(k, v)| !(k == "prompt" && v == "login"))
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let query = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(back)
                .finish();
            Ok(Authorize::SignIn {
                return_query: query,
            })
        };
        let Some(session) = session else {
            return if prompt == "none" {
                fail("login_required", "the user is not signed in")
            } else {
                sign_in()
            };
        };
        let too_old = max_age.is_some_and(|m| now - session.authenticated_at > m);
        let needs_mfa = wants_mfa && !session.auth_methods.split_whitespace().any(|m| m == "otp");
        if prompt.split_whitespace().any(|p| p == "login") || too_old || needs_mfa {
            if prompt == "none" {
                return fail("login_required", "the user must sign in again");
            }
            if needs_mfa {
                let user = self
                    .store
                    .user_by_id(&session.user_id)
                    .await
                    .map_err(store_err)?;
                if !user.is_some_and(|u| u.totp_enabled) {
                    return fail(
                        "access_denied",
                        "this application requires a second factor, and the user has none enrolled",
                    );
                }
            }
            return sign_in();
        }

        // The older Auth0 connect flow: connect the provider during sign-in, then come back here.
        if let Some(connection) = params.get("connection") {
            let extra = Scopes::parse(params.get("connection_scope").unwrap_or(""));
            let back: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| {
                    !matches!(
                        k.as_ref(),
                        "connection" | "connection_scope" | "access_type"
                    )
                })
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let back = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(back)
                .finish();
            return match self
                .connect_begin(
                    &session.user_id,
                    connection,
                    &extra,
                    &[],
                    format!("return:/authorize?{back}"),
                )
                .await
            {
                Ok(to) => Ok(Authorize::Redirect(to)),
                Err(e) if e.status < 500 => fail("invalid_request", &e.description),
                Err(e) => Err(e),
            };
        }

        let code = secrets::random_token(32);
        let record = AuthCode {
            hash: secrets::sha256_b64(code.as_bytes()),
            client_id: client.id.clone(),
            user_id: session.user_id.clone(),
            redirect_uri: redirect_uri.to_owned(),
            scope: Scopes::parse(params.get("scope").unwrap_or("openid")),
            nonce: params.get("nonce").map(str::to_owned),
            code_challenge: challenge.to_owned(),
            audience,
            auth_time: session.authenticated_at,
            amr: session.auth_methods.clone(),
            expires_at: now + CODE_TTL,
        };
        self.store
            .insert_auth_code(&record)
            .await
            .map_err(store_err)?;
        let mut pairs = vec![("code", code.as_str())];
        if !state.is_empty() {
            pairs.push(("state", state));
        }
        Ok(Authorize::Redirect(
            self.redirect_with(redirect_uri, &pairs),
        ))
    }

    /// `grant_type=authorization_code`.
    pub(super) async fn code_grant(
        &self,
        params: &Params,
        client: &Agent,
        ctx: &RequestContext,
        attempt: &mut super::exchange::Attempt,
    ) -> Result<TokenResponse, OAuthError> {
        let code = params.require("code")?;
        let redirect_uri = params.require("redirect_uri")?;
        let hash = secrets::sha256_b64(code.as_bytes());
        let record = match self
            .store
            .redeem_auth_code(&hash)
            .await
            .map_err(store_err)?
        {
            CodeRedemption::Fresh(c) => c,
            CodeRedemption::Reused { family_id } => {
                // A replayed code may be a stolen one: revoke what the first use obtained.
                if let Some(family) = family_id {
                    self.revoke_family(&family, client, "authorization code replayed", ctx)
                        .await?;
                }
                return Err(OAuthError::invalid_grant(
                    "the authorization code was already used; tokens issued from it are revoked",
                ));
            }
            CodeRedemption::Unknown => {
                return Err(OAuthError::invalid_grant("unknown authorization code"));
            }
        };
        if record.client_id != client.id {
            return Err(OAuthError::invalid_grant(
                "the authorization code was issued to another client",
            ));
        }
        attempt.subject_user = Some(record.user_id.clone());
        if record.expires_at <= self.now() {
            return Err(OAuthError::invalid_grant(
                "the authorization code has expired",
            ));
        }
        if record.redirect_uri != redirect_uri {
            return Err(OAuthError::invalid_grant(
                "redirect_uri does not match the authorization request",
            ));
        }
        let Some(verifier) = params.get("code_verifier") else {
            return Err(OAuthError::invalid_grant(
                "code_verifier is required (PKCE)",
            ));
        };
        let verifier_ok = (43..=128).contains(&verifier.len())
            && verifier
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
            && secrets::ct_eq(
                secrets::sha256_b64(verifier.as_bytes()).as_bytes(),
                record.code_challenge.as_bytes(),
            );
        if !verifier_ok {
            return Err(OAuthError::invalid_grant(
                "code_verifier does not match the code_challenge",
            ));
        }
        let user = self
            .store
            .user_by_id(&record.user_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_grant("the user no longer exists"))?;
        let family = TokenFamily {
            id: secrets::random_id("fam"),
            client_id: client.id.clone(),
            user_id: user.id.clone(),
            scope: record.scope.clone(),
            auth_time: record.auth_time,
            amr: record.amr.clone(),
            revoked: false,
            created_at: self.now(),
        };
        let refresh = record
            .scope
            .iter()
            .any(|s| s == "offline_access")
            .then(|| secrets::random_token(32));
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            agent_id: Some(client.id.clone()),
            scopes: Some(record.scope.to_string_spaced()),
            reason: Some(format!("authorization code; family {}", family.id)),
            ..self.audit_in(
                &Actor {
                    kind: "agent",
                    id: client.id.clone(),
                    method: "authorization_code",
                },
                "token.issue",
                ctx,
            )
        };
        let refresh_hash = refresh
            .as_deref()
            .map(|r| secrets::sha256_b64(r.as_bytes()));
        self.store
            .insert_token_family(&family, &hash, refresh_hash.as_deref(), &audit)
            .await
            .map_err(store_err)?;
        Ok(self.tokens_for(
            &user,
            client,
            &family,
            Issue {
                scope: &record.scope,
                audience: &record.audience,
                nonce: record.nonce.as_deref(),
                refresh,
            },
        ))
    }

    /// `grant_type=refresh_token` (also to another audience: the My Account API).
    pub(super) async fn refresh_grant(
        &self,
        params: &Params,
        client: &Agent,
        ctx: &RequestContext,
        attempt: &mut super::exchange::Attempt,
    ) -> Result<TokenResponse, OAuthError> {
        let token = params.require("refresh_token")?;
        let hash = secrets::sha256_b64(token.as_bytes());
        let family = self.live_refresh_token(&hash, client, ctx).await?;
        attempt.subject_user = Some(family.user_id.clone());
        attempt.scopes = params.get("scope").map(str::to_owned);
        let my_account = format!("{}me/", self.config.issuer);
        let audience = match params.get("audience") {
            None | Some("None") => self.config.issuer.clone(),
            Some(a) if self.known_audience(a, true).await? => a.to_owned(),
            Some(_) => return Err(OAuthError::invalid_target("unknown audience")),
        };
        let scope = match params.get("scope") {
            None if audience == my_account => {
                return Err(OAuthError::invalid_scope(
                    "name the My Account scopes you need",
                ));
            }
            None => family.scope.clone(),
            Some(s) => {
                let s = Scopes::parse(s);
                // For the My Account API: its scopes, plus the sign-in's own (SDKs such as
                // auth0-server-python send their default `openid profile offline_access` along).
                let allowed = if audience == my_account {
                    family
                        .scope
                        .union(&MY_ACCOUNT_SCOPES.iter().copied().collect())
                } else {
                    family.scope.clone()
                };
                if s.is_empty() || !s.is_subset(&allowed) {
                    return Err(OAuthError::invalid_scope(format!(
                        "scope outside what this refresh token allows: {}",
                        s.missing_from(&allowed).join(" ")
                    )));
                }
                s
            }
        };
        let user = self
            .store
            .user_by_id(&family.user_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_grant("the user no longer exists"))?;
        let next_refresh = if client.rotate_refresh_tokens {
            let new = secrets::random_token(32);
            let rotated = self
                .store
                .rotate_refresh_token(&hash, &secrets::sha256_b64(new.as_bytes()), self.now())
                .await
                .map_err(store_err)?;
            if !rotated {
                return Err(OAuthError::invalid_grant(
                    "the refresh token was just used; use the newer one",
                ));
            }
            Some(new)
        } else {
            None
        };
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            agent_id: Some(client.id.clone()),
            scopes: Some(scope.to_string_spaced()),
            reason: Some(format!("refresh for {audience}; family {}", family.id)),
            ..self.audit_in(
                &Actor {
                    kind: "agent",
                    id: client.id.clone(),
                    method: "refresh_token",
                },
                "token.issue",
                ctx,
            )
        };
        self.store.append_audit(&audit).await.map_err(store_err)?;
        Ok(self.tokens_for(
            &user,
            client,
            &family,
            Issue {
                scope: &scope,
                audience: &audience,
                nonce: None,
                refresh: next_refresh,
            },
        ))
    }

    /// Audiences Latchkey issues access tokens for: itself, the agent API (`/proxy`, `/mcp`:
    /// the app then acts for the signed-in user), the My Account API (by refresh only), and
    /// the APIs registered as resource servers.
    pub(super) async fn known_audience(
        &self,
        audience: &str,
        allow_my_account: bool,
    ) -> Result<bool, OAuthError> {
        if audience == self.config.issuer
            || audience == self.agent_resource()
            || (allow_my_account && audience == format!("{}me/", self.config.issuer))
        {
            return Ok(true);
        }
        let clients = self.store.list_agents().await.map_err(store_err)?;
        Ok(clients
            .iter()
            .any(|c| c.resource_server.as_deref() == Some(audience)))
    }

    /// The family behind a refresh token presented by `client`, if it is usable. A rotated
    /// token presented again means it leaked: the whole family is revoked.
    pub(super) async fn live_refresh_token(
        &self,
        hash: &str,
        client: &Agent,
        ctx: &RequestContext,
    ) -> Result<TokenFamily, OAuthError> {
        let record = self
            .store
            .refresh_token(hash)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_grant("unknown or invalid refresh token"))?;
        if record.family.client_id != client.id {
            return Err(OAuthError::invalid_grant(
                "the refresh token was issued to another client",
            ));
        }
        if record.family.revoked {
            return Err(OAuthError::invalid_grant("the refresh token was revoked"));
        }
        if record.state != "active" {
            self.revoke_family(
                &record.family.id,
                client,
                "rotated refresh token reused",
                ctx,
            )
            .await?;
            return Err(OAuthError::invalid_grant(
                "the refresh token was already used; every token of its sign-in is now revoked",
            ));
        }
        Ok(record.family)
    }

    /// Revoke a sign-in's token family, once: a family already revoked is left alone, so a
    /// replayed code or token cannot make the vault write an entry per replay.
    async fn revoke_family(
        &self,
        family_id: &str,
        client: &Agent,
        why: &str,
        ctx: &RequestContext,
    ) -> Result<(), OAuthError> {
        let family = self
            .store
            .token_family(family_id)
            .await
            .map_err(store_err)?;
        let Some(family) = family.filter(|f| !f.revoked) else {
            return Ok(());
        };
        let audit = AuditRecord {
            subject_user: Some(family.user_id.clone()),
            agent_id: Some(client.id.clone()),
            reason: Some(format!("family {family_id}: {why}")),
            ..self.audit_in(
                &Actor {
                    kind: "agent",
                    id: client.id.clone(),
                    method: "token",
                },
                "token.revoke",
                ctx,
            )
        };
        self.store
            .revoke_token_family(family_id, &audit)
            .await
            .map_err(store_err)
    }

    pub(super) fn tokens_for(
        &self,
        user: &User,
        client: &Agent,
        family: &TokenFamily,
        issue: Issue<'_>,
    ) -> TokenResponse {
        let Issue {
            scope,
            audience,
            nonce,
            refresh,
        } = issue;
        let now = self.now();
        let signing = self.signing();
        let access = signing.current.sign(
            Some(ACCESS_TOKEN_TYP),
            &json!({
                "iss": self.config.issuer, "sub": user.id, "aud": audience, "client_id": client.id,
                "scope": scope.to_string_spaced(), "iat": now, "exp": now + ACCESS_TOKEN_TTL,
                "jti": secrets::random_token(16), "auth_time": family.auth_time, "fam": family.id,
            }),
        );
        let id_token = (scope.iter().any(|s| s == "openid") && audience == self.config.issuer)
            .then(|| {
                let mut claims = json!({
                    "iss": self.config.issuer, "sub": user.id, "aud": client.id, "azp": client.id,
                    "iat": now, "exp": now + ID_TOKEN_TTL, "auth_time": family.auth_time,
                    "amr": amr_list(&family.amr), "preferred_username": user.username,
                });
                if let Some(n) = nonce {
                    claims["nonce"] = json!(n);
                }
                if family.amr.split_whitespace().any(|m| m == "otp") {
                    claims["acr"] = json!(MFA_ACR);
                }
                signing.current.sign(Some("JWT"), &claims)
            });
        TokenResponse {
            access_token: SecretString::from(access),
            expires_in: ACCESS_TOKEN_TTL,
            scope: scope.to_string_spaced(),
            issued_token_type: None,
            id_token,
            refresh_token: refresh.map(SecretString::from),
            authorization_details: None,
        }
    }

    /// Verify a Latchkey access token for `audience`: signature and `typ`, issuer, audience,
    /// expiry, and that its sign-in was not revoked since.
    pub async fn verify_access_token(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<AccessToken, OAuthError> {
        let bad = |why: &str| OAuthError::invalid_token(format!("access token rejected: {why}"));
        let claims: Claims = verify_jws(
            token,
            TypRule::Exactly(ACCESS_TOKEN_TYP),
            &self.signing().public_keys(),
        )
        .map_err(|e| bad(&e.to_string()))?;
        let s = |n: &str| {
            claims
                .str(n)
                .map(str::to_owned)
                .map_err(|e| bad(&e.to_string()))
        };
        if s("iss")? != self.config.issuer {
            return Err(bad("issued by someone else"));
        }
        claims
            .audience_is(audience)
            .map_err(|_| bad("not for this audience"))?;
        if claims.int("exp").map_err(|e| bad(&e.to_string()))? <= self.now() {
            return Err(bad("expired"));
        }
        let family_id = s("fam")?;
        let family = self
            .store
            .token_family(&family_id)
            .await
            .map_err(store_err)?;
        if family.is_none_or(|f| f.revoked) {
            return Err(bad("revoked"));
        }
        Ok(AccessToken {
            user_id: s("sub")?,
            client_id: s("client_id")?,
            scope: Scopes::parse(&s("scope")?),
            audience: audience.to_owned(),
            family_id,
        })
    }

    /// `/userinfo` for a bearer access token.
    pub async fn userinfo(&self, bearer: &str) -> Result<Value, OAuthError> {
        let token = self
            .verify_access_token(bearer, &self.config.issuer.clone())
            .await?;
        let user = self
            .store
            .user_by_id(&token.user_id)
            .await
            .map_err(store_err)?
            .ok_or_else(|| OAuthError::invalid_token("the user no longer exists"))?;
        Ok(json!({ "sub": user.id, "preferred_username": user.username }))
    }

    /// `POST /oauth/revoke` (RFC 7009): the client's own refresh token (or access token) ends
    /// its whole sign-in. Unknown tokens and other clients' tokens are answered 200 and left
    /// alone; a storage failure is a 503, never a false 200.
    pub async fn revoke(
        &self,
        params: &Params,
        basic: Option<BasicCredentials>,
        ctx: &RequestContext,
    ) -> Result<(), OAuthError> {
        let client = match self.authenticate_client(params, basic.as_ref()).await {
            Ok(c) => c.agent,
            Err(e) => {
                let attempt = super::exchange::Attempt::failed_authentication();
                self.audit_refusal(&e, attempt, params, basic.as_ref(), ctx)
                    .await;
                return Err(e);
            }
        };
        let token = params.require("token")?;
        let hash = secrets::sha256_b64(token.as_bytes());
        let family = match self.store.refresh_token(&hash).await.map_err(store_err)? {
            Some(record) => Some(record.family),
            None => match verify_jws(
                token,
                TypRule::Exactly(ACCESS_TOKEN_TYP),
                &self.signing().public_keys(),
            ) {
                Ok(claims) => match claims.str("fam") {
                    Ok(id) => self.store.token_family(id).await.map_err(store_err)?,
                    Err(_) => None,
                },
                Err(_) => None,
            },
        };
        if let Some(f) = family.filter(|f| f.client_id == client.id && !f.revoked) {
            self.revoke_family(&f.id, &client, "revoked by the client", ctx)
                .await?;
        }
        Ok(())
    }
}
