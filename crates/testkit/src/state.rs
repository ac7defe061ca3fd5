//! The mock's bookkeeping: authorization codes, token families, refresh and access tokens and
//! counters, behind one mutex. Pure logic over a given `now`; the HTTP layer decides how to
//! answer from the results.

use std::collections::HashMap;

use latchkey_crypto::secrets::{ct_eq, random_token, sha256_b64};

use crate::{Behaviour, MockStats};

/// Lifetime of an authorization code, in seconds.
pub(crate) const CODE_TTL: i64 = 60;

struct CodeGrant {
    redirect_uri: String,
    /// PKCE S256 challenge.
    challenge: String,
    scope: String,
    expires_at: i64,
    /// The family the code was exchanged for, once used: a second use revokes it.
    used_for: Option<usize>,
}

/// Everything issued from one authorization code.
struct Family {
    scope: String,
    revoked: bool,
    /// The newest refresh token (answered again on a grace-period reuse).
    current_refresh: Option<String>,
}

enum RefreshState {
    Live,
    /// Replaced by a newer token; usable until `grace_until` (exclusive).
    Rotated {
        grace_until: i64,
    },
}

struct RefreshRecord {
    family: usize,
    state: RefreshState,
}

struct AccessRecord {
    family: usize,
    expires_at: Option<i64>,
    revoked: bool,
}

/// A successful token answer.
#[derive(Debug)]
pub(crate) struct Issued {
    pub(crate) access_token: String,
    pub(crate) refresh_token: Option<String>,
    pub(crate) expires_in: Option<i64>,
    pub(crate) scope: String,
}

#[derive(Debug)]
pub(crate) enum GrantError {
    InvalidGrant(&'static str),
    InvalidScope(&'static str),
}

/// What a successful refresh does with refresh tokens.
#[derive(Clone, Copy)]
enum RefreshShape {
    /// A new refresh token; the one presented dies after `grace` seconds.
    Rotate { grace: i64 },
    /// Answer the refresh token presented.
    Keep,
    /// No `refresh_token` in the answer; the one presented stays valid.
    Omit,
}

struct Shape {
    expires: bool,
    refresh: RefreshShape,
}

/// How `b` shapes a token answer. The authorization-code grant is healthy under every fault
/// behaviour; only [`Behaviour::NonExpiring`] changes it.
fn shape(b: Behaviour, code_grant: bool) -> Shape {
    let strict = Shape {
        expires: true,
        refresh: RefreshShape::Rotate { grace: 0 },
    };
    match b {
        Behaviour::NonExpiring => Shape {
            expires: false,
            refresh: RefreshShape::Omit,
        },
        _ if code_grant => strict,
        Behaviour::GraceRotation { seconds } => Shape {
            expires: true,
            refresh: RefreshShape::Rotate {
                grace: seconds.max(0),
            },
        },
        Behaviour::NonRotating => Shape {
            expires: true,
            refresh: RefreshShape::Keep,
        },
        Behaviour::MissingRefreshToken => Shape {
            expires: true,
            refresh: RefreshShape::Omit,
        },
        Behaviour::MissingExpiresIn => Shape {
            expires: false,
            ..strict
        },
        Behaviour::StrictRotation
        | Behaviour::Slow { .. }
        | Behaviour::RotateThenSlow { .. }
        | Behaviour::ServerError { .. }
        | Behaviour::RateLimited { .. }
        | Behaviour::MalformedJson
        | Behaviour::OversizedJson => strict,
    }
}

/// Whether every space-separated scope in `wanted` is in `granted`.
fn scope_subset(wanted: &str, granted: &str) -> bool {
    let granted: Vec<&str> = granted.split_whitespace().collect();
    wanted.split_whitespace().all(|s| granted.contains(&s))
}

pub(crate) struct State {
    pub(crate) behaviour: Behaviour,
    pub(crate) access_ttl: i64,
    pub(crate) stats: MockStats,
    codes: HashMap<String, CodeGrant>,
    families: Vec<Family>,
    refresh: HashMap<String, RefreshRecord>,
    access: HashMap<String, AccessRecord>,
}

impl State {
    pub(crate) fn new(access_ttl: i64) -> Self {
        Self {
            behaviour: Behaviour::default(),
            access_ttl,
            stats: MockStats::default(),
            codes: HashMap::new(),
            families: Vec::new(),
            refresh: HashMap::new(),
            access: HashMap::new(),
        }
    }

    /// Remember a new authorization code; returns it.
    pub(crate) fn new_code(
        &mut self,
        now: i64,
        redirect_uri: &str,
        challenge: &str,
        scope: &str,
    ) -> String {
        let code = format!("{}code_{}", crate::CANARY_PREFIX, random_token(32));
        self.codes.insert(
            sha256_b64(code.as_bytes()),
            CodeGrant {
                redirect_uri: redirect_uri.to_owned(),
                challenge: challenge.to_owned(),
                scope: scope.to_owned(),
                expires_at: now + CODE_TTL,
                used_for: None,
            },
        );
        code
    }

    fn refuse(&mut self, why: &'static str) -> GrantError {
        self.stats.invalid_grants += 1;
        GrantError::InvalidGrant(why)
    }

    /// The authorization-code grant.
    pub(crate) fn exchange_code(
        &mut self,
        now: i64,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Issued, GrantError> {
        let hash = sha256_b64(code.as_bytes());
        let Some(grant) = self.codes.get(&hash) else {
            return Err(self.refuse("unknown authorization code"));
        };
        if let Some(family) = grant.used_for {
            // RFC 6749 §4.1.2: a code used twice revokes what it produced.
            self.families[family].revoked = true;
            return Err(self.refuse("the authorization code was already used"));
        }
        if grant.expires_at <= now {
            return Err(self.refuse("the authorization code expired"));
        }
        if grant.redirect_uri != redirect_uri {
            return Err(self.refuse("redirect_uri does not match the authorization request"));
        }
        let computed = sha256_b64(verifier.as_bytes());
        if !ct_eq(computed.as_bytes(), grant.challenge.as_bytes()) {
            return Err(self.refuse("PKCE verification failed"));
        }
        let scope = grant.scope.clone();
        let family = self.families.len();
        self.families.push(Family {
            scope: scope.clone(),
            revoked: false,
            current_refresh: None,
        });
        if let Some(grant) = self.codes.get_mut(&hash) {
            grant.used_for = Some(family);
        }
        self.stats.code_grants += 1;
        let shape = shape(self.behaviour, true);
        let refresh = match shape.refresh {
            RefreshShape::Omit => None,
            RefreshShape::Rotate { .. } | RefreshShape::Keep => Some(self.new_refresh(family)),
        };
        Ok(self.answer(now, family, shape.expires, refresh, scope))
    }

    /// The refresh-token grant, shaped by `behaviour` (the fault behaviours are handled before
    /// this is called).
    pub(crate) fn refresh(
        &mut self,
        now: i64,
        behaviour: Behaviour,
        presented: &str,
        scope: Option<&str>,
    ) -> Result<Issued, GrantError> {
        let hash = sha256_b64(presented.as_bytes());
        let Some(record) = self.refresh.get(&hash) else {
            return Err(self.refuse("unknown refresh token"));
        };
        let family = record.family;
        if self.families[family].revoked {
            return Err(self.refuse("the grant was revoked"));
        }
        let in_grace = match record.state {
            RefreshState::Live => false,
            RefreshState::Rotated { grace_until } if now < grace_until => true,
            RefreshState::Rotated { .. } => {
                // Reuse of a replaced token: assume it was stolen, kill the family.
                self.families[family].revoked = true;
                self.stats.reused_refresh_tokens += 1;
                return Err(self.refuse("refresh token reuse detected; the grant is revoked"));
            }
        };
        let granted = self.families[family].scope.clone();
        let scope = match scope {
            Some(s) if !scope_subset(s, &granted) => {
                return Err(GrantError::InvalidScope(
                    "scope exceeds what the user granted",
                ));
            }
            Some(s) => s.to_owned(),
            None => granted,
        };
        let shape = shape(behaviour, false);
        let refresh = match shape.refresh {
            RefreshShape::Omit => None,
            // Within the grace period: the family's newest refresh token, no further rotation.
            _ if in_grace => self.families[family].current_refresh.clone(),
            RefreshShape::Keep => Some(presented.to_owned()),
            RefreshShape::Rotate { grace } => {
                if let Some(r) = self.refresh.get_mut(&hash) {
                    r.state = RefreshState::Rotated {
                        grace_until: now + grace,
                    };
                }
                Some(self.new_refresh(family))
            }
        };
        Ok(self.answer(now, family, shape.expires, refresh, scope))
    }

    fn new_refresh(&mut self, family: usize) -> String {
        let token = format!("{}rt_{}", crate::CANARY_PREFIX, random_token(32));
        self.refresh.insert(
            sha256_b64(token.as_bytes()),
            RefreshRecord {
                family,
                state: RefreshState::Live,
            },
        );
        self.families[family].current_refresh = Some(token.clone());
        token
    }

    /// Issue an access token and assemble the answer.
    fn answer(
        &mut self,
        now: i64,
        family: usize,
        expires: bool,
        refresh_token: Option<String>,
        scope: String,
    ) -> Issued {
        let access_token = format!("{}at_{}", crate::CANARY_PREFIX, random_token(32));
        let expires_in = expires.then_some(self.access_ttl);
        self.access.insert(
            sha256_b64(access_token.as_bytes()),
            AccessRecord {
                family,
                expires_at: expires_in.map(|ttl| now + ttl),
                revoked: false,
            },
        );
        if let Some(r) = &refresh_token {
            self.stats.last_issued_refresh_token = Some(r.clone());
        }
        Issued {
            access_token,
            refresh_token,
            expires_in,
            scope,
        }
    }

    /// Count a refresh-grant request (before anything else happens to it).
    pub(crate) fn count_refresh_call(&mut self, presented: Option<&str>) {
        self.stats.refresh_calls += 1;
        if let Some(token) = presented {
            *self
                .stats
                .refresh_calls_per_token
                .entry(sha256_b64(token.as_bytes()))
                .or_default() += 1;
        }
    }

    /// Whether `token` is a live access token now.
    pub(crate) fn bearer_ok(&self, now: i64, token: &str) -> bool {
        self.access
            .get(&sha256_b64(token.as_bytes()))
            .is_some_and(|a| {
                !a.revoked
                    && !self.families[a.family].revoked
                    && a.expires_at.is_none_or(|e| now < e)
            })
    }

    /// RFC 7009: a refresh token takes its family down; an access token only itself. Returns
    /// whether the token was one the mock issued.
    pub(crate) fn revoke(&mut self, token: &str) -> bool {
        let hash = sha256_b64(token.as_bytes());
        let known = if let Some(r) = self.refresh.get(&hash) {
            self.families[r.family].revoked = true;
            true
        } else if let Some(a) = self.access.get_mut(&hash) {
            a.revoked = true;
            true
        } else {
            false
        };
        if known {
            self.stats.revocations += 1;
        }
        known
    }

    pub(crate) fn revoke_all(&mut self) {
        for f in &mut self.families {
            f.revoked = true;
        }
    }
}
