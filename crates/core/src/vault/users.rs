//! Users: accounts, passwords (Argon2id, off the async runtime), TOTP (RFC 6238, seed sealed
//! at rest), sign-in and browser sessions.
//!
//! Sign-in is throttled per username and per client address (failures in a 15-minute window),
//! spends the same Argon2 time whether or not the user exists, and is audited either way. A
//! user with TOTP first gets a *pending* session (the password was right, a code is owed); the
//! code turns it into a new, signed-in session. Every session records how and when its user
//! authenticated, for step-up later.

use std::net::IpAddr;

use latchkey_crypto::totp;

use super::*;

/// Failed sign-ins allowed per username, and per client address, in [`FAILURE_WINDOW`].
const FAILURES_PER_USER: u32 = 5;
const FAILURES_PER_ADDRESS: u32 = 30;
const FAILURE_WINDOW: i64 = 15 * 60;
/// A pending (code-owed) session lasts this long.
const PENDING_TTL: i64 = 5 * 60;

/// What a sign-in step achieved. The tokens are cookie values (stored only as hashes).
#[derive(Debug)]
pub enum SignIn {
    /// Signed in.
    Session(String),
    /// The password was right; a TOTP code is owed on this pending session.
    TotpRequired(String),
    /// Wrong credentials (deliberately not saying which).
    Failed,
    /// Too many failures: try again in this many seconds.
    Throttled(u64),
}

/// What a step-up code achieved.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StepUp {
    Verified,
    Wrong,
    /// Too many failures: try again in this many seconds.
    Throttled(u64),
    /// The user has no second factor to give.
    NotEnrolled,
}

fn user_totp_slot(user_id: &str) -> Slot<'_> {
    Slot {
        table: "users",
        field: "totp_seed",
        row: user_id,
    }
}

impl Vault {
    pub async fn add_user(
        &self,
        username: &str,
        password: Option<&str>,
        role: Role,
        actor: &Actor,
    ) -> Result<User, AdminError> {
        validate_name("username", username)?;
        let password_hash = match password {
            Some(p) => Some(hash_password(p).await?),
            None => None,
        };
        let user = User {
            id: secrets::random_id("usr"),
            username: username.to_owned(),
            password_hash,
            totp_seed: None,
            totp_enabled: false,
            role,
            created_at: self.now(),
        };
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            reason: Some(format!("role {}", role.as_str())),
            ..self.audit(actor, "user.create")
        };
        self.store.insert_user(&user, &audit).await?;
        Ok(user)
    }

    /// Make a user an operator of the dashboard, or a plain user again. Setting the role a
    /// user already has is audited like any other change. Returns the user as now stored.
    pub async fn set_user_role(
        &self,
        user_ref: &str,
        role: Role,
        actor: &Actor,
    ) -> Result<User, AdminError> {
        let user = self.find_user(user_ref).await?;
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            reason: Some(format!(
                "role {} (was {})",
                role.as_str(),
                user.role.as_str()
            )),
            ..self.audit(actor, "user.role")
        };
        if !self.store.set_user_role(&user.id, role, &audit).await? {
            // Deleted between the lookup and the update.
            return Err(AdminError::NotFound(format!("no user `{user_ref}`")));
        }
        Ok(User { role, ..user })
    }

    pub async fn set_password(
        &self,
        user_ref: &str,
        password: &str,
        actor: &Actor,
    ) -> Result<User, AdminError> {
        let user = self.find_user(user_ref).await?;
        let hash = hash_password(password).await?;
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            ..self.audit(actor, "user.password")
        };
        self.store.set_password(&user.id, &hash, &audit).await?;
        Ok(user)
    }

    /// A user by id or username.
    pub async fn find_user(&self, user_ref: &str) -> Result<User, AdminError> {
        if let Some(u) = self.store.user_by_id(user_ref).await? {
            return Ok(u);
        }
        self.store
            .user_by_username(user_ref)
            .await?
            .ok_or_else(|| AdminError::NotFound(format!("no user `{user_ref}`")))
    }

    // --- TOTP enrolment -----------------------------------------------------------------------

    /// Start (or restart) TOTP enrolment: a new sealed seed, not yet enabled. Returns the
    /// `otpauth://` URI for an authenticator app.
    pub async fn totp_enrol(&self, user_ref: &str, actor: &Actor) -> Result<String, AdminError> {
        let user = self.find_user(user_ref).await?;
        let seed = totp::generate_seed();
        let sealed = self.keys.seal(user_totp_slot(&user.id), &seed);
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            reason: Some("enrolment started".into()),
            ..self.audit(actor, "user.totp")
        };
        self.store
            .set_totp(&user.id, Some(&sealed), false, &audit)
            .await?;
        Ok(totp::otpauth_uri("Latchkey", &user.username, &seed))
    }

    /// Confirm enrolment with a current code; from then on sign-in asks for one.
    pub async fn totp_confirm(
        &self,
        user_ref: &str,
        code: &str,
        actor: &Actor,
    ) -> Result<(), AdminError> {
        let user = self.find_user(user_ref).await?;
        let Some(sealed) = user.totp_seed.clone() else {
            return Err(AdminError::Invalid(
                "no TOTP enrolment to confirm; start one first".into(),
            ));
        };
        if !self
            .totp_code_ok(&user.id, &sealed, code)
            .await
            .map_err(|e| AdminError::Storage(e.to_string()))?
        {
            return Err(AdminError::Invalid(
                "that code is not valid now; check the authenticator's clock and try the next one"
                    .into(),
            ));
        }
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            reason: Some("enabled".into()),
            ..self.audit(actor, "user.totp")
        };
        self.store
            .set_totp(&user.id, Some(&sealed), true, &audit)
            .await?;
        // Setting the seed clears the replay guard: mark this code's step used again.
        if let Some(step) = totp::verify(
            &self.open_totp_seed(&user.id, &sealed).await?,
            code,
            self.now(),
        ) {
            self.store.consume_totp_step(&user.id, step).await?;
        }
        Ok(())
    }

    pub async fn totp_disable(&self, user_ref: &str, actor: &Actor) -> Result<(), AdminError> {
        let user = self.find_user(user_ref).await?;
        let audit = AuditRecord {
            subject_user: Some(user.id.clone()),
            reason: Some("disabled".into()),
            ..self.audit(actor, "user.totp")
        };
        Ok(self.store.set_totp(&user.id, None, false, &audit).await?)
    }

    async fn open_totp_seed(
        &self,
        user_id: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, AdminError> {
        self.keys
            .open(user_totp_slot(user_id), sealed)
            .await
            .map_err(|e| AdminError::Storage(e.to_string()))
    }

    /// A code is valid for the user's seed and its step was not used before (atomically).
    async fn totp_code_ok(
        &self,
        user_id: &str,
        sealed: &[u8],
        code: &str,
    ) -> Result<bool, AdminError> {
        let seed = self.open_totp_seed(user_id, sealed).await?;
        match totp::verify(&seed, code, self.now()) {
            Some(step) => Ok(self.store.consume_totp_step(user_id, step).await?),
            None => Ok(false),
        }
    }

    /// [`Self::totp_code_ok`] for an enrolled user, at sign-in or step-up: a failure to check
    /// is logged and answered as an internal error.
    async fn enrolled_totp_code_ok(&self, user: &User, code: &str) -> Result<bool, OAuthError> {
        let sealed = user.totp_seed.clone().unwrap_or_default();
        self.totp_code_ok(&user.id, &sealed, code)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "TOTP check failed");
                OAuthError::server_error()
            })
    }

    // --- sign-in ------------------------------------------------------------------------------

    fn throttle_keys(username: &str, ip: Option<IpAddr>) -> Vec<(String, u32)> {
        let mut keys = vec![(
            format!("user:{}", username.to_lowercase()),
            FAILURES_PER_USER,
        )];
        if let Some(ip) = ip {
            keys.push((format!("ip:{ip}"), FAILURES_PER_ADDRESS));
        }
        keys
    }

    fn throttled(&self, keys: &[(String, u32)]) -> Option<u64> {
        keys.iter()
            .filter_map(|(k, limit)| {
                self.login_failures
                    .blocked(k, *limit, FAILURE_WINDOW, self.now())
            })
            .max()
    }

    async fn record_sign_in(
        &self,
        who: &str,
        user: Option<&User>,
        method: &'static str,
        failure: Option<&str>,
        keys: &[(String, u32)],
        ctx: &RequestContext,
    ) -> Result<(), OAuthError> {
        if failure.is_some() {
            for (k, _) in keys {
                self.login_failures.record(k, FAILURE_WINDOW, self.now());
            }
        }
        let audit = AuditRecord {
            subject_user: user.map(|u| u.id.clone()),
            decision: if failure.is_none() { "allow" } else { "deny" }.into(),
            reason: failure.map(str::to_owned),
            ..self.audit_in(
                &Actor {
                    kind: "user",
                    id: who.chars().take(64).collect(),
                    method,
                },
                "user.login",
                ctx,
            )
        };
        self.store.append_audit(&audit).await.map_err(store_err)
    }

    /// First step: username and password. Spends the same Argon2 time whether or not the user
    /// exists (or has a password).
    pub async fn sign_in(
        &self,
        username: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<SignIn, OAuthError> {
        let keys = Self::throttle_keys(username, ctx.client_ip);
        if let Some(wait) = self.throttled(&keys) {
            self.record_sign_in(username, None, "password", Some("throttled"), &[], ctx)
                .await?;
            return Ok(SignIn::Throttled(wait));
        }
        let user = self
            .store
            .user_by_username(username)
            .await
            .map_err(store_err)?;
        let hash = user
            .as_ref()
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| latchkey_crypto::password::dummy_hash().to_owned());
        let password = Zeroizing::new(password.to_owned());
        let ok = tokio::task::spawn_blocking(move || {
            latchkey_crypto::password::verify_password(&password, &hash)
        })
        .await
        .unwrap_or(false);
        let user = user.filter(|u| ok && u.password_hash.is_some());
        let Some(user) = user else {
            self.record_sign_in(
                username,
                None,
                "password",
                Some("wrong username or password"),
                &keys,
                ctx,
            )
            .await?;
            return Ok(SignIn::Failed);
        };
        if user.totp_enabled {
            let token = self.new_session(&user.id, "pwd", true, PENDING_TTL).await?;
            return Ok(SignIn::TotpRequired(token));
        }
        self.record_sign_in(username, Some(&user), "password", None, &keys, ctx)
            .await?;
        Ok(SignIn::Session(
            self.new_session(&user.id, "pwd", false, self.config.session_ttl)
                .await?,
        ))
    }

    /// Second step, on a pending session: the TOTP code. Success replaces the pending session
    /// with a new signed-in one (a fresh cookie value: no session fixation).
    pub async fn sign_in_totp(
        &self,
        pending_token: &str,
        code: &str,
        ctx: &RequestContext,
    ) -> Result<SignIn, OAuthError> {
        let Some(pending) = self.session(pending_token).await?.filter(|s| s.pending_mfa) else {
            return Ok(SignIn::Failed);
        };
        let user = self
            .store
            .user_by_id(&pending.user_id)
            .await
            .map_err(store_err)?;
        let Some(user) = user.filter(|u| u.totp_enabled) else {
            return Ok(SignIn::Failed);
        };
        let keys = Self::throttle_keys(&user.username, ctx.client_ip);
        if let Some(wait) = self.throttled(&keys) {
            self.record_sign_in(
                &user.username,
                Some(&user),
                "password+totp",
                Some("throttled"),
                &[],
                ctx,
            )
            .await?;
            return Ok(SignIn::Throttled(wait));
        }
        let ok = self.enrolled_totp_code_ok(&user, code).await?;
        if !ok {
            self.record_sign_in(
                &user.username,
                Some(&user),
                "password+totp",
                Some("wrong TOTP code"),
                &keys,
                ctx,
            )
            .await?;
            return Ok(SignIn::Failed);
        }
        self.end_session(pending_token).await?;
        self.record_sign_in(
            &user.username,
            Some(&user),
            "password+totp",
            None,
            &keys,
            ctx,
        )
        .await?;
        Ok(SignIn::Session(
            self.new_session(&user.id, "pwd otp", false, self.config.session_ttl)
                .await?,
        ))
    }

    /// A TOTP code given to confirm a risky decision (step-up): checked like the sign-in code
    /// step — throttled per username and address, each code's step usable once — without
    /// touching any session.
    pub(super) async fn step_up_code(
        &self,
        user: &User,
        code: &str,
        ip: Option<IpAddr>,
    ) -> Result<StepUp, OAuthError> {
        if !user.totp_enabled {
            return Ok(StepUp::NotEnrolled);
        }
        let keys = Self::throttle_keys(&user.username, ip);
        if let Some(wait) = self.throttled(&keys) {
            return Ok(StepUp::Throttled(wait));
        }
        let ok = self.enrolled_totp_code_ok(user, code).await?;
        if ok {
            return Ok(StepUp::Verified);
        }
        for (k, _) in &keys {
            self.login_failures.record(k, FAILURE_WINDOW, self.now());
        }
        Ok(StepUp::Wrong)
    }

    async fn new_session(
        &self,
        user_id: &str,
        methods: &str,
        pending_mfa: bool,
        ttl: i64,
    ) -> Result<String, OAuthError> {
        let token = secrets::random_token(32);
        let now = self.now();
        let session = Session {
            user_id: user_id.to_owned(),
            auth_methods: methods.to_owned(),
            authenticated_at: now,
            pending_mfa,
            mfa_at: methods
                .split_whitespace()
                .any(|m| m == "otp")
                .then_some(now),
        };
        self.store
            .insert_session(&secrets::sha256_b64(token.as_bytes()), &session, now + ttl)
            .await
            .map_err(store_err)?;
        Ok(token)
    }

    /// The session behind a cookie value, signed in or pending.
    pub async fn session(&self, token: &str) -> Result<Option<Session>, OAuthError> {
        self.store
            .session(&secrets::sha256_b64(token.as_bytes()), self.now())
            .await
            .map_err(store_err)
    }

    /// The signed-in user behind a cookie value (pending sessions are not signed in).
    pub async fn session_user(&self, token: &str) -> Result<Option<String>, OAuthError> {
        Ok(self
            .session(token)
            .await?
            .filter(|s| !s.pending_mfa)
            .map(|s| s.user_id))
    }

    pub async fn end_session(&self, token: &str) -> Result<(), OAuthError> {
        self.store
            .delete_session(&secrets::sha256_b64(token.as_bytes()))
            .await
            .map_err(store_err)
    }
}

async fn hash_password(password: &str) -> Result<String, AdminError> {
    if password.chars().count() < 8 {
        return Err(AdminError::Invalid(
            "passwords need at least 8 characters".into(),
        ));
    }
    let p = Zeroizing::new(password.to_owned());
    tokio::task::spawn_blocking(move || latchkey_crypto::password::hash_password(&p))
        .await
        .map_err(|_| AdminError::Storage("password hashing failed".into()))
}
