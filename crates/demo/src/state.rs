//! In-memory state: pending consents, authorization codes, token families and the demo repos.
//!
//! Every secret the provider hands out (consent tickets, codes, access and refresh tokens) is
//! kept only as its SHA-256 digest, so the maps never hold a usable credential and lookups by
//! digest do not reveal, through timing, how much of a guessed token was right.
//!
//! A *family* is everything descended from one authorization-code exchange: the first
//! access/refresh pair and every pair produced by rotating it. Revoking a family deletes all of
//! its tokens at once; that is what code reuse, refresh-token reuse and revoking a refresh token
//! do.

use std::collections::{HashMap, HashSet};

use latchkey_crypto::secrets::{ct_eq, random_token, sha256_b64};
use serde::Serialize;

use crate::scope::ScopeSet;

/// How long a consent page stays usable.
pub(crate) const CONSENT_TTL: i64 = 600;
/// Authorization codes live 60 s (RFC 6749 recommends at most 10 minutes).
pub(crate) const CODE_TTL: i64 = 60;
/// Used codes are remembered this long past their expiry so a late replay still revokes the
/// tokens issued from them.
const CODE_RETENTION: i64 = 600;
/// Rotated refresh tokens are remembered this long so a replay is recognised and kills the
/// family; after that they are simply unknown (which is also `invalid_grant`).
const SUPERSEDED_RETENTION: i64 = 7 * 24 * 3600;
/// Consent tickets and codes are created without client authentication, so their number is
/// capped; the oldest is dropped first.
const MAX_PENDING: usize = 1024;
/// Bounds on what API callers can make the demo remember.
pub(crate) const MAX_ISSUES_PER_REPO: usize = 200;
pub(crate) const MAX_COMMENTS_PER_ISSUE: usize = 50;

/// Entropy of every token the provider issues, in bytes (256 bits).
const TOKEN_BYTES: usize = 32;

/// A validated authorization request waiting for the user's decision.
#[derive(Clone, Debug)]
pub(crate) struct Consent {
    pub client_id: String,
    pub redirect_uri: String,
    pub scopes: ScopeSet,
    pub state: Option<String>,
    pub code_challenge: String,
    pub expires_at: i64,
}

#[derive(Debug)]
struct Code {
    client_id: String,
    redirect_uri: String,
    code_challenge: String,
    scopes: ScopeSet,
    expires_at: i64,
    used: bool,
    /// The family issued from this code, so a replay can revoke it.
    family: Option<u64>,
}

#[derive(Debug)]
struct Family {
    client_id: String,
    /// What the resource owner granted; refreshes may narrow it, never widen it.
    scopes: ScopeSet,
}

#[derive(Debug)]
struct Access {
    family: u64,
    scopes: ScopeSet,
    expires_at: i64,
}

#[derive(Debug)]
struct Refresh {
    family: u64,
    /// Set when the token was rotated away; presenting it again is reuse.
    superseded_at: Option<i64>,
}

/// Tokens handed out by a successful grant. Held only long enough to serialise the response.
pub(crate) struct Issued {
    pub access_token: String,
    pub refresh_token: String,
    pub scopes: ScopeSet,
}

/// Why a grant was refused; maps onto RFC 6749 §5.2 error codes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum GrantError {
    InvalidGrant(&'static str),
    InvalidScope(&'static str),
}

/// What an API request's bearer token resolved to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BearerCheck {
    Valid(ScopeSet),
    Invalid,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Repo {
    pub name: &'static str,
    pub description: &'static str,
    pub private: bool,
    #[serde(skip)]
    pub issues: Vec<Issue>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Issue {
    pub number: u64,
    pub title: String,
    pub body: Option<String>,
    pub comments: Vec<Comment>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Comment {
    pub id: u64,
    pub body: String,
    pub user: &'static str,
}

pub(crate) struct State {
    consents: HashMap<String, Consent>,
    codes: HashMap<String, Code>,
    families: HashMap<u64, Family>,
    access: HashMap<String, Access>,
    refresh: HashMap<String, Refresh>,
    next_family: u64,
    pub repos: Vec<Repo>,
    pub next_comment_id: u64,
}

fn digest(secret: &str) -> String {
    sha256_b64(secret.as_bytes())
}

/// RFC 7636 §4.1: 43–128 characters from the unreserved set.
pub(crate) fn is_pkce_string(s: &str) -> bool {
    (43..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Drop the entry that expires first when a map is at its cap.
fn evict_oldest<V>(map: &mut HashMap<String, V>, expires_at: impl Fn(&V) -> i64) {
    if map.len() < MAX_PENDING {
        return;
    }
    if let Some(key) = map
        .iter()
        .min_by_key(|(_, v)| expires_at(v))
        .map(|(k, _)| k.clone())
    {
        map.remove(&key);
    }
}

impl State {
    pub(crate) fn new() -> Self {
        Self {
            consents: HashMap::new(),
            codes: HashMap::new(),
            families: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            next_family: 1,
            repos: vec![
                Repo {
                    name: "hello-world",
                    description: "My first repository on the demo provider",
                    private: false,
                    issues: Vec::new(),
                },
                Repo {
                    name: "latchkey-notes",
                    description: "Private notes about Latchkey",
                    private: true,
                    issues: Vec::new(),
                },
            ],
            next_comment_id: 1,
        }
    }

    /// Forget whatever has expired. Called on the OAuth paths; the maps are small, so a full
    /// sweep is cheaper than bookkeeping.
    pub(crate) fn prune(&mut self, now: i64) {
        self.consents.retain(|_, c| c.expires_at > now);
        self.codes
            .retain(|_, c| c.expires_at + CODE_RETENTION > now);
        self.access.retain(|_, a| a.expires_at > now);
        self.refresh.retain(|_, r| {
            r.superseded_at
                .is_none_or(|t| t + SUPERSEDED_RETENTION > now)
        });
        // A family with no token left is dead; dropping it keeps the map bounded.
        let live: HashSet<u64> = self
            .access
            .values()
            .map(|a| a.family)
            .chain(self.refresh.values().map(|r| r.family))
            .collect();
        self.families.retain(|id, _| live.contains(id));
    }

    /// Store a validated request and return the single-use ticket that refers to it.
    pub(crate) fn add_consent(&mut self, consent: Consent) -> String {
        evict_oldest(&mut self.consents, |c| c.expires_at);
        let ticket = random_token(TOKEN_BYTES);
        self.consents.insert(digest(&ticket), consent);
        ticket
    }

    /// Redeem a consent ticket. It is removed whether or not it is still fresh.
    pub(crate) fn take_consent(&mut self, ticket: &str, now: i64) -> Option<Consent> {
        self.consents
            .remove(&digest(ticket))
            .filter(|c| c.expires_at > now)
    }

    /// Turn an approved consent into an authorization code.
    pub(crate) fn add_code(&mut self, consent: Consent, now: i64) -> String {
        evict_oldest(&mut self.codes, |c| c.expires_at);
        let code = format!("{}code_{}", crate::CANARY_PREFIX, random_token(TOKEN_BYTES));
        self.codes.insert(
            digest(&code),
            Code {
                client_id: consent.client_id,
                redirect_uri: consent.redirect_uri,
                code_challenge: consent.code_challenge,
                scopes: consent.scopes,
                expires_at: now + CODE_TTL,
                used: false,
                family: None,
            },
        );
        code
    }

    fn issue(&mut self, family: u64, access_scopes: ScopeSet, now: i64, ttl: i64) -> Issued {
        let access_token = format!("{}at_{}", crate::CANARY_PREFIX, random_token(TOKEN_BYTES));
        let refresh_token = format!("{}rt_{}", crate::CANARY_PREFIX, random_token(TOKEN_BYTES));
        self.access.insert(
            digest(&access_token),
            Access {
                family,
                scopes: access_scopes,
                expires_at: now + ttl,
            },
        );
        self.refresh.insert(
            digest(&refresh_token),
            Refresh {
                family,
                superseded_at: None,
            },
        );
        Issued {
            access_token,
            refresh_token,
            scopes: access_scopes,
        }
    }

    /// Delete every token of `family`.
    pub(crate) fn revoke_family(&mut self, family: u64) {
        self.families.remove(&family);
        self.access.retain(|_, a| a.family != family);
        self.refresh.retain(|_, r| r.family != family);
    }

    /// `grant_type=authorization_code`. The code is burnt by the first redemption attempt,
    /// successful or not: a failed PKCE check means someone other than the client may hold it.
    pub(crate) fn exchange_code(
        &mut self,
        code: &str,
        client_id: &str,
        redirect_uri: &str,
        code_verifier: &str,
        now: i64,
        ttl: i64,
    ) -> Result<(u64, Issued), GrantError> {
        let Some(entry) = self.codes.get_mut(&digest(code)) else {
            return Err(GrantError::InvalidGrant("unknown authorization code"));
        };
        if entry.used {
            // RFC 6749 §4.1.2: a replayed code should revoke what was issued from it.
            if let Some(family) = entry.family {
                tracing::warn!(
                    family,
                    "demo provider: authorization code replayed; revoking its tokens"
                );
                self.revoke_family(family);
            }
            return Err(GrantError::InvalidGrant("authorization code already used"));
        }
        entry.used = true;
        if entry.expires_at <= now {
            return Err(GrantError::InvalidGrant("authorization code expired"));
        }
        if entry.client_id != client_id {
            return Err(GrantError::InvalidGrant(
                "authorization code was issued to another client",
            ));
        }
        if entry.redirect_uri != redirect_uri {
            return Err(GrantError::InvalidGrant(
                "redirect_uri does not match the authorization request",
            ));
        }
        let computed = digest(code_verifier);
        if !is_pkce_string(code_verifier)
            || !ct_eq(computed.as_bytes(), entry.code_challenge.as_bytes())
        {
            return Err(GrantError::InvalidGrant(
                "code_verifier does not match the code_challenge",
            ));
        }
        let scopes = entry.scopes;
        let family = self.next_family;
        self.next_family += 1;
        entry.family = Some(family);
        self.families.insert(
            family,
            Family {
                client_id: client_id.to_owned(),
                scopes,
            },
        );
        Ok((family, self.issue(family, scopes, now, ttl)))
    }

    /// `grant_type=refresh_token` with rotation. Presenting a rotated-away token is treated as
    /// theft (RFC 9700 §4.14.2): the whole family is revoked, so the legitimate holder of the
    /// newest token is forced back through consent too.
    pub(crate) fn rotate_refresh(
        &mut self,
        refresh_token: &str,
        client_id: &str,
        requested: Option<ScopeSet>,
        now: i64,
        ttl: i64,
    ) -> Result<(u64, Issued), GrantError> {
        let key = digest(refresh_token);
        let Some(entry) = self.refresh.get(&key) else {
            return Err(GrantError::InvalidGrant("unknown or revoked refresh token"));
        };
        let family_id = entry.family;
        if entry.superseded_at.is_some() {
            tracing::warn!(
                family = family_id,
                "demo provider: rotated refresh token replayed; revoking the family"
            );
            self.revoke_family(family_id);
            return Err(GrantError::InvalidGrant("refresh token was already used"));
        }
        let Some(family) = self.families.get(&family_id) else {
            return Err(GrantError::InvalidGrant("unknown or revoked refresh token"));
        };
        if family.client_id != client_id {
            return Err(GrantError::InvalidGrant(
                "refresh token was issued to another client",
            ));
        }
        let scopes = match requested {
            None => family.scopes,
            Some(s) if s.is_empty() => family.scopes,
            Some(s) if s.is_subset_of(family.scopes) => s,
            Some(_) => {
                return Err(GrantError::InvalidScope(
                    "requested scope exceeds the original grant",
                ));
            }
        };
        if let Some(entry) = self.refresh.get_mut(&key) {
            entry.superseded_at = Some(now);
        }
        Ok((family_id, self.issue(family_id, scopes, now, ttl)))
    }

    /// RFC 7009 revocation. Returns what was revoked, for logging; unknown tokens are a no-op.
    pub(crate) fn revoke(&mut self, token: &str, client_id: &str) -> Option<&'static str> {
        let key = digest(token);
        let owner = |families: &HashMap<u64, Family>, family: u64| {
            families
                .get(&family)
                .is_some_and(|f| f.client_id == client_id)
        };
        if let Some(r) = self.refresh.get(&key) {
            let family = r.family;
            if owner(&self.families, family) {
                self.revoke_family(family);
                return Some("refresh token family");
            }
            return None;
        }
        if let Some(a) = self.access.get(&key) {
            if owner(&self.families, a.family) {
                self.access.remove(&key);
                return Some("access token");
            }
            return None;
        }
        None
    }

    /// Resolve a bearer token presented to the API.
    pub(crate) fn check_bearer(&self, token: &str, now: i64) -> BearerCheck {
        match self.access.get(&digest(token)) {
            Some(a) if a.expires_at > now && self.families.contains_key(&a.family) => {
                BearerCheck::Valid(a.scopes)
            }
            _ => BearerCheck::Invalid,
        }
    }

    pub(crate) fn repo_mut(&mut self, name: &str) -> Option<&mut Repo> {
        self.repos.iter_mut().find(|r| r.name == name)
    }
}
