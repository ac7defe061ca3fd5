//! The provider catalog: how a connection's provider name turns into endpoints.
//!
//! `oauth2` connections carry their own endpoints. `demo` is the built-in demo provider, mounted
//! under `{issuer}demo/` in demo mode; its URLs follow the server's issuer, so they stay right
//! when the port or host changes.

use crate::model::Connection;
use crate::upstream::Endpoints;

pub const DEMO: &str = "demo";
pub const GENERIC: &str = "oauth2";

/// Demo provider paths, relative to `{issuer}demo/`.
pub mod demo_paths {
    pub const AUTHORIZE: &str = "demo/oauth/authorize";
    pub const TOKEN: &str = "demo/oauth/token";
    pub const REVOKE: &str = "demo/oauth/revoke";
    pub const USERINFO: &str = "demo/api/user";
    pub const API: &str = "demo/api";
    /// The scopes the demo provider knows.
    pub const SCOPES: &[&str] = &["read:user", "repo:read", "repo:write", "issues:write"];
}

/// Whether the provider honours `scope` on the refresh grant (RFC 6749 §6), so Latchkey can
/// hand out an upstream token that is itself narrowed to the request. Where it does not,
/// narrowing is Latchkey's policy only (the answer's `scope`).
pub fn narrows_upstream(conn: &Connection) -> bool {
    conn.provider == DEMO
}

pub fn known_provider(name: &str) -> bool {
    matches!(name, DEMO | GENERIC)
}

/// Endpoints for `conn`; `client_secret` is the already-opened secret.
pub fn endpoints(
    conn: &Connection,
    issuer: &str,
    client_secret: Option<secrecy::SecretString>,
) -> Endpoints {
    if conn.provider == DEMO {
        let at = |p: &str| format!("{issuer}{p}");
        Endpoints {
            client_id: conn.client_id.clone(),
            client_secret,
            authorize_url: at(demo_paths::AUTHORIZE),
            token_url: at(demo_paths::TOKEN),
            revoke_url: Some(at(demo_paths::REVOKE)),
            userinfo_url: Some(at(demo_paths::USERINFO)),
            api_base_url: Some(at(demo_paths::API)),
        }
    } else {
        Endpoints {
            client_id: conn.client_id.clone(),
            client_secret,
            authorize_url: conn.authorize_url.clone(),
            token_url: conn.token_url.clone(),
            revoke_url: conn.revoke_url.clone(),
            userinfo_url: conn.userinfo_url.clone(),
            api_base_url: conn.api_base_url.clone(),
        }
    }
}
