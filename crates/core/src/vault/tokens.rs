//! Upstream access tokens: cached, narrowed, and refreshed one at a time per account.

use futures_util::StreamExt;

use super::*;

/// Extra attempts after a refresh that certainly did not reach the provider.
const MAX_REFRESH_RETRIES: u32 = 2;

/// How long the background refresher holds its claim on an account (seconds): the next pass
/// after a failure comes no sooner.
const REFRESH_CLAIM_SECS: i64 = 120;

/// Accounts the background refresher works on at once.
const REFRESH_CONCURRENCY: usize = 4;

impl Vault {
    /// The stored access token is good for more than `margin` seconds.
    fn is_fresh(&self, a: &ConnectedAccount, margin: i64) -> bool {
        a.access_token.is_some() && a.access_expires_at.is_none_or(|t| t - self.now() > margin)
    }

    async fn open_access(
        &self,
        a: &ConnectedAccount,
    ) -> Result<(SecretString, Option<i64>), OAuthError> {
        let blob = a
            .access_token
            .as_deref()
            .ok_or_else(OAuthError::server_error)?;
        let token = self
            .keys
            .open_string(account_slot(&a.id, "access_token"), blob)
            .await
            .map_err(key_err)?;
        Ok((token, a.access_expires_at))
    }

    pub(super) async fn endpoints(&self, conn: &Connection) -> Result<Endpoints, OAuthError> {
        let secret = match &conn.client_secret {
            Some(blob) => Some(
                self.keys
                    .open_string(
                        Slot {
                            table: "connections",
                            field: "client_secret",
                            row: &conn.id,
                        },
                        blob,
                    )
                    .await
                    .map_err(key_err)?,
            ),
            None => None,
        };
        Ok(catalog::endpoints(conn, &self.config.issuer, secret))
    }

    /// An upstream access token for `scope` on this account, refreshed first if it is (nearly)
    /// expired. When `scope` is narrower than the user's consent and the provider honours
    /// `scope` on refresh, the token itself is narrowed (and cached per scope set); otherwise
    /// the narrowing is Latchkey's policy and the answer's `scope`. At most one refresh per
    /// account runs at a time; the others wait, re-read, and reuse its result.
    /// `margin`: refresh when fewer seconds than this are left (the exchange's small margin,
    /// or the background refresher's wider window).
    pub(super) async fn fresh_access_token(
        &self,
        account: ConnectedAccount,
        conn: &Connection,
        scope: &Scopes,
        margin: i64,
    ) -> Result<(SecretString, Option<i64>), OAuthError> {
        if catalog::narrows_upstream(conn) && *scope != account.scopes {
            return self.fresh_scoped_token(account, conn, scope, margin).await;
        }
        if self.is_fresh(&account, margin) {
            return self.open_access(&account).await;
        }
        let _guard = self.refresh_locks.lock(&account.id).await;
        let _lease = self
            .store
            .refresh_lease(&account.id)
            .await
            .map_err(store_err)?;
        let current = self.active_account(&account.id, conn).await?;
        if self.is_fresh(&current, margin) {
            return self.open_access(&current).await;
        }
        let updated = self.refresh_own_token(current, conn).await?;
        self.open_access(&updated).await
    }

    /// Refresh the account's own (unnarrowed) token and commit the new pair. The caller holds
    /// the account's lock and has just re-read it.
    async fn refresh_own_token(
        &self,
        current: ConnectedAccount,
        conn: &Connection,
    ) -> Result<ConnectedAccount, OAuthError> {
        // Some providers (Microsoft) require `scope` on every refresh: the consent, unnarrowed.
        let consent = current.scopes.clone();
        let scope = catalog::refresh_needs_scope(conn).then_some(&consent);
        let (current, tokens) = self.call_refresh(current, conn, scope).await?;
        let updated = self.apply_tokens(current.clone(), tokens, None);
        if !self
            .store
            .update_account_tokens(&updated, current.token_version)
            .await
            .map_err(store_err)?
        {
            // Another process changed the account meanwhile. The token in hand is valid, and the
            // release transaction still refuses it if the account was revoked.
            tracing::warn!(account = %current.id, "refreshed tokens lost a concurrent update");
        }
        Ok(updated)
    }

    async fn fresh_scoped_token(
        &self,
        account: ConnectedAccount,
        conn: &Connection,
        scope: &Scopes,
        margin: i64,
    ) -> Result<(SecretString, Option<i64>), OAuthError> {
        let id = format!("{} {}", account.id, scope.to_string_spaced());
        let cached = || async {
            let t = self.store.scoped_token(&id).await.map_err(store_err)?;
            match t {
                Some(t) if t.expires_at.is_none_or(|e| e - self.now() > margin) => {
                    let token = self
                        .keys
                        .open_string(scoped_slot(&t.id), &t.access_token)
                        .await
                        .map_err(key_err)?;
                    Ok::<_, OAuthError>(Some((token, t.expires_at)))
                }
                _ => Ok(None),
            }
        };
        if let Some(hit) = cached().await? {
            return Ok(hit);
        }
        let _guard = self.refresh_locks.lock(&account.id).await;
        let _lease = self
            .store
            .refresh_lease(&account.id)
            .await
            .map_err(store_err)?;
        if let Some(hit) = cached().await? {
            return Ok(hit);
        }
        let current = self.active_account(&account.id, conn).await?;
        let (current, tokens) = self.call_refresh(current, conn, Some(scope)).await?;
        let now = self.now();
        let scoped = ScopedToken {
            access_token: self.keys.seal(
                scoped_slot(&id),
                tokens.access_token.expose_secret().as_bytes(),
            ),
            id,
            account_id: current.id.clone(),
            scopes: scope.clone(),
            expires_at: tokens.expires_in.map(|e| now + e),
        };
        let mut updated = current.clone();
        if let Some(r) = &tokens.refresh_token {
            updated.refresh_token = Some(self.keys.seal(
                account_slot(&updated.id, "refresh_token"),
                r.expose_secret().as_bytes(),
            ));
        }
        updated.updated_at = now;
        if !self
            .store
            .store_scoped_token(&updated, current.token_version, &scoped)
            .await
            .map_err(store_err)?
        {
            tracing::warn!(account = %current.id, "narrowed token lost a concurrent update");
        }
        Ok((tokens.access_token, scoped.expires_at))
    }

    /// The account as stored now, if it is still active.
    async fn active_account(
        &self,
        id: &str,
        conn: &Connection,
    ) -> Result<ConnectedAccount, OAuthError> {
        let not_connected =
            || OAuthError::not_connected(&conn.name, self.config.connect_uri(&conn.name));
        let account = self
            .store
            .account_by_id(id)
            .await
            .map_err(store_err)?
            .ok_or_else(not_connected)?;
        if account.status != AccountStatus::Active {
            return Err(not_connected());
        }
        Ok(account)
    }

    /// The provider's refresh grant for `current`, called under the account's lock. On
    /// `invalid_grant` the account is re-read first: if another writer rotated the refresh token
    /// meanwhile, the call is retried once with the new one, so a losing racer never declares
    /// the winner's token dead. Otherwise the account needs the user to reconnect. Timeouts,
    /// 5xx and 429 leave everything stored untouched and answer 503 with `Retry-After`.
    async fn call_refresh(
        &self,
        mut current: ConnectedAccount,
        conn: &Connection,
        scope: Option<&Scopes>,
    ) -> Result<(ConnectedAccount, UpstreamTokens), OAuthError> {
        let not_connected =
            || OAuthError::not_connected(&conn.name, self.config.connect_uri(&conn.name));
        let ep = self.endpoints(conn).await?;
        // A refresh of this very token started before and its outcome never committed: the
        // provider may have rotated it and Latchkey lost the answer.
        let mut interrupted = current.refresh_started_at.is_some();
        let mut reread = false;
        let mut fenced = 0;
        let mut retries = 0u32;
        loop {
            let Some(blob) = current.refresh_token.as_deref() else {
                return Err(not_connected());
            };
            // Keep the window between the provider's answer and the commit visible: a crash
            // inside it leaves this mark, which the next start finds and resolves.
            if !self
                .store
                .mark_refresh_started(&current.id, current.token_version, self.now())
                .await
                .map_err(store_err)?
            {
                // Another writer changed the account since it was read: presenting the older
                // refresh token could trip the provider's reuse detection. Use the newer one.
                fenced += 1;
                let again = self.active_account(&current.id, conn).await?;
                if fenced > 2 {
                    return Err(OAuthError::upstream_unavailable(
                        format!("{} is being refreshed elsewhere; retry shortly", conn.name),
                        1,
                    ));
                }
                interrupted = again.refresh_started_at.is_some();
                current = again;
                continue;
            }
            let refresh_token = self
                .keys
                .open_string(account_slot(&current.id, "refresh_token"), blob)
                .await
                .map_err(key_err)?;
            let result = self.upstream.refresh(&ep, &refresh_token, scope).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(UpstreamError::InvalidGrant(_)) => "invalid_grant",
                Err(UpstreamError::Transient { .. }) => "unavailable",
                Err(UpstreamError::Protocol(_)) => "malformed",
            };
            metrics::counter!("latchkey_upstream_refreshes_total", "outcome" => outcome)
                .increment(1);
            match result {
                Ok(tokens) => return Ok((current, tokens)),
                Err(UpstreamError::InvalidGrant(why)) => {
                    let again = self
                        .store
                        .account_by_id(&current.id)
                        .await
                        .map_err(store_err)?
                        .ok_or_else(not_connected)?;
                    if !reread
                        && again.status == AccountStatus::Active
                        && again.token_version != current.token_version
                    {
                        reread = true;
                        interrupted = false;
                        current = again;
                        continue;
                    }
                    let reason = if interrupted {
                        format!(
                            "an earlier refresh was interrupted before Latchkey could save the \
                             provider's answer, and {} no longer accepts the stored refresh token \
                             ({why}), so the user must connect again",
                            conn.name
                        )
                    } else {
                        format!(
                            "{} refused the stored refresh token ({why}), so the user must connect again",
                            conn.name
                        )
                    };
                    let audit = AuditRecord {
                        subject_user: Some(current.user_id.clone()),
                        connection: Some(conn.name.clone()),
                        account_id: Some(current.id.clone()),
                        reason: Some(reason.clone()),
                        notify: self.account_event(
                            "account.needs_reauth",
                            &current,
                            conn,
                            Some(&reason),
                        ),
                        ..self.audit(
                            &Actor {
                                kind: "operator",
                                id: "vault".into(),
                                method: "refresh",
                            },
                            "account.needs_reauth",
                        )
                    };
                    self.store
                        .set_account_status(
                            &current.id,
                            AccountStatus::NeedsReauth,
                            current.token_version,
                            &audit,
                        )
                        .await
                        .map_err(store_err)?;
                    let mut err = not_connected();
                    err.description = format!(
                        "the user must reconnect {} at {}: {reason}",
                        conn.name,
                        self.config.connect_uri(&conn.name)
                    );
                    return Err(err);
                }
                Err(UpstreamError::Transient {
                    retryable: true, ..
                }) if retries < MAX_REFRESH_RETRIES => {
                    // Bounded, with jitter, so that many accounts failing together do not retry
                    // in lockstep.
                    retries += 1;
                    let jitter = u64::from(secrets::random_bytes(1)[0]) % 100;
                    tokio::time::sleep(std::time::Duration::from_millis(
                        100 * (1 << retries) + jitter,
                    ))
                    .await;
                    continue;
                }
                Err(UpstreamError::Transient {
                    message,
                    retry_after,
                    ..
                }) => {
                    tracing::warn!(connection = %conn.name, %message, "upstream refresh failed, token left untouched");
                    return Err(OAuthError::upstream_unavailable(
                        format!("{} is temporarily unavailable; retry shortly", conn.name),
                        retry_after.unwrap_or(5),
                    ));
                }
                Err(UpstreamError::Protocol(message)) => {
                    tracing::warn!(connection = %conn.name, %message, "upstream refresh answered malformed data");
                    return Err(OAuthError::upstream_unavailable(
                        format!("{} answered malformed data; retry shortly", conn.name),
                        5,
                    ));
                }
            }
        }
    }

    /// The account with new upstream tokens sealed in (old refresh token kept if none came).
    pub(super) fn apply_tokens(
        &self,
        mut a: ConnectedAccount,
        t: UpstreamTokens,
        default_scopes: Option<&Scopes>,
    ) -> ConnectedAccount {
        let now = self.now();
        a.access_token = Some(self.keys.seal(
            account_slot(&a.id, "access_token"),
            t.access_token.expose_secret().as_bytes(),
        ));
        a.access_expires_at = t.expires_in.map(|e| now + e);
        if let Some(r) = t.refresh_token {
            a.refresh_token = Some(self.keys.seal(
                account_slot(&a.id, "refresh_token"),
                r.expose_secret().as_bytes(),
            ));
        }
        if let Some(s) = t.scope.filter(|s| !s.is_empty()) {
            a.scopes = s;
        } else if let Some(d) = default_scopes {
            a.scopes = d.clone();
        }
        a.updated_at = now;
        a.token_version += 1;
        a
    }
}

/// What one background-refresher pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RefreshReport {
    pub refreshed: usize,
    pub failed: usize,
}

impl RefreshReport {
    pub fn total(&self) -> usize {
        self.refreshed + self.failed
    }
}

impl Vault {
    /// The background refresher's pass over the accounts it claims (see [`RefreshWhy`]):
    /// tokens of recently used accounts are refreshed ahead of expiry
    /// (`proactive_refresh_window`, `refresh_idle_after`), so that exchanges in steady state
    /// never wait on the provider; idle accounts are refreshed on their connection's keep-alive
    /// interval; refreshes interrupted before `interrupted_before` are resolved (at start-up,
    /// every mark left is one). It goes through the same single-flight path as the exchange,
    /// so it never races one. At most `limit` accounts per pass, a few at a time.
    pub async fn refresh_due(&self, limit: usize, interrupted_before: i64) -> RefreshReport {
        let now = self.now();
        let window = self.config.proactive_refresh_window;
        let query = RefreshQuery {
            now,
            expiring_before: now + window,
            used_since: now - self.config.refresh_idle_after,
            interrupted_before,
            claim_until: now + REFRESH_CLAIM_SECS,
            limit: limit as i64,
        };
        let work = match self.store.claim_refresh_work(&query).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "listing tokens due for refresh failed");
                return RefreshReport::default();
            }
        };
        // A few accounts at a time: each waits on its provider, not on the machine.
        let outcomes: Vec<Result<bool, OAuthError>> = futures_util::stream::iter(work)
            .map(|w| self.refresh_claimed(w, window))
            .buffer_unordered(REFRESH_CONCURRENCY)
            .collect()
            .await;
        let mut report = RefreshReport::default();
        for outcome in outcomes {
            match outcome {
                Ok(true) => report.refreshed += 1,
                Ok(false) => {}
                Err(_) => report.failed += 1,
            }
        }
        metrics::counter!("latchkey_background_refreshes_total").increment(report.refreshed as u64);
        report
    }

    /// One claimed account: true if its token was refreshed.
    async fn refresh_claimed(&self, w: RefreshWork, window: i64) -> Result<bool, OAuthError> {
        let RefreshWork {
            account,
            scope,
            why,
        } = w;
        let conn = match self.store.connection_by_id(&account.connection_id).await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(false),
            Err(e) => return Err(store_err(e)),
        };
        let result = match why {
            RefreshWhy::Expiring => {
                let scope = scope.unwrap_or_else(|| account.scopes.clone());
                self.fresh_access_token(account, &conn, &scope, window)
                    .await
                    .map(|_| true)
            }
            RefreshWhy::KeepAlive | RefreshWhy::Interrupted => {
                self.refresh_if_unchanged(account, &conn).await
            }
        };
        if let Err(e) = &result {
            tracing::info!(connection = %conn.name, code = e.code, ?why, "background refresh did not succeed");
        }
        result
    }

    /// Refresh the account now unless someone changed its tokens since it was read (then the
    /// keep-alive or the interrupted refresh is already taken care of). True if refreshed.
    async fn refresh_if_unchanged(
        &self,
        seen: ConnectedAccount,
        conn: &Connection,
    ) -> Result<bool, OAuthError> {
        let _guard = self.refresh_locks.lock(&seen.id).await;
        let _lease = self
            .store
            .refresh_lease(&seen.id)
            .await
            .map_err(store_err)?;
        let current = self.active_account(&seen.id, conn).await?;
        if current.token_version != seen.token_version {
            return Ok(false);
        }
        self.refresh_own_token(current, conn).await?;
        Ok(true)
    }
}
