//! The provider catalog: what Latchkey knows about each upstream provider, as data.
//!
//! `catalog/providers.json` (compiled in) describes the well-known providers — GitHub, Google,
//! Microsoft, Slack, … — with their endpoints, default scopes, the authorization parameters
//! that get a refresh token, and their departures from the RFCs (scope separator, where the
//! user id is, how errors come back). Adding or correcting a provider is a data change, not
//! code; the tests below hold every entry to the same rules.
//!
//! Three providers are not in the data file: `demo` (the built-in demo provider, whose URLs
//! follow the server's issuer `{issuer}demo/…`), `oauth2` (generic: the operator gives the
//! endpoints) and `oidc` (generic: endpoints discovered from an issuer's
//! `/.well-known/openid-configuration` when the connection is added).
//!
//! A connection stores its endpoints (filled from the catalog when it is added, so an operator
//! can point at a self-hosted GitLab or a Salesforce sandbox); the catalog entry, looked up by
//! the connection's provider name, says how to talk to them.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::model::Connection;
use crate::policy::{Risk, RiskTable};
use crate::scope::Scopes;
use crate::upstream::{ClientAuth, Endpoints, Wire};
use crate::vault::NewConnection;

pub const DEMO: &str = "demo";
pub const GENERIC: &str = "oauth2";
pub const OIDC: &str = "oidc";

/// Demo provider paths, relative to `{issuer}demo/`.
pub mod demo_paths {
    pub const AUTHORIZE: &str = "demo/oauth/authorize";
    pub const TOKEN: &str = "demo/oauth/token";
    pub const REVOKE: &str = "demo/oauth/revoke";
    pub const USERINFO: &str = "demo/api/user";
    pub const API: &str = "demo/api";
    /// The scopes the demo provider knows.
    pub const SCOPES: &[&str] = &["read:user", "repo:read", "repo:write", "issues:write"];
    /// Their risk levels (the demo has no delete scope, so nothing is critical by default;
    /// `--risk repo:write=critical` shows that level). `issues:write` stays low so that the
    /// walkthrough's grant releases without an approval.
    pub const SCOPE_RISKS: &[(&str, crate::policy::Risk)] = &[
        ("read:user", crate::policy::Risk::Low),
        ("repo:read", crate::policy::Risk::Low),
        ("issues:write", crate::policy::Risk::Low),
        ("repo:write", crate::policy::Risk::High),
    ];
    /// Scopes the demo does not know (it refuses them anyway).
    pub const DEFAULT_RISK: crate::policy::Risk = crate::policy::Risk::Medium;
}

/// One catalog entry (see `catalog/providers.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub display_name: String,
    pub authorize_url: String,
    pub token_url: String,
    /// RFC 7009 revocation endpoint; `None` where the provider has none Latchkey can call.
    pub revoke_url: Option<String>,
    pub userinfo: UserInfo,
    pub api_base_url: Option<String>,
    /// Requested when a user connects, unless the operator gives `--scopes`.
    pub default_scopes: Vec<String>,
    /// Always requested: what the provider needs before it issues a refresh token
    /// (`offline_access`, Salesforce's `refresh_token`).
    #[serde(default)]
    pub offline_scopes: Vec<String>,
    /// How scopes are joined on the wire: `" "` or `","`.
    pub scope_separator: String,
    /// The authorization-request parameter carrying the scopes (Slack: `user_scope`).
    #[serde(default = "default_scope_param")]
    pub scope_param: String,
    /// Added to the authorization request (Google's `access_type=offline`, …).
    #[serde(default)]
    pub authorize_params: BTreeMap<String, String>,
    pub access_tokens_expire: bool,
    /// Whether a refresh returns a new refresh token (the vault keeps whichever it is given).
    pub refresh_tokens_rotate: bool,
    /// Whether the provider honours `scope` on the refresh grant (RFC 6749 §6), documented.
    pub narrows_on_refresh: bool,
    /// Whether the refresh grant must carry `scope` (Microsoft): Latchkey then sends the
    /// consented scopes when it does not narrow.
    #[serde(default)]
    pub refresh_needs_scope: bool,
    /// Whether PKCE is documented. Latchkey sends a challenge either way: RFC 6749 servers
    /// ignore parameters they do not know.
    pub pkce: bool,
    /// Refresh idle accounts this often (days) because the provider revokes refresh tokens left
    /// unused (Google after six months, Microsoft after 90 days of inactivity).
    #[serde(default)]
    pub keep_alive_days: Option<u32>,
    /// The RFC 9207 `iss` value in authorization responses, where the provider documents one.
    pub iss: Option<String>,
    /// Risk level per scope (exact names, or patterns with one `*`), from the provider's
    /// documentation: read-only low, writes high, deletion and administration critical.
    /// Grants may override a scope's level (`agent grant --risk SCOPE=LEVEL`).
    #[serde(default)]
    pub scope_risks: BTreeMap<String, Risk>,
    /// The level of scopes `scope_risks` does not name; `low` when absent.
    #[serde(default)]
    pub default_risk: Option<Risk>,
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub token_response: TokenResponse,
    /// What is uncertain or surprising about this provider.
    pub notes: String,
}

fn default_scope_param() -> String {
    "scope".into()
}

/// Where and how to learn the connected account's id at the provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserInfo {
    pub url: String,
    /// Dotted path to the id in the JSON answer (`id`, `sub`, `data.viewer.id`).
    pub id_path: String,
    /// POST this JSON body instead of a GET (`""`: POST without a body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// How the provider's token responses depart from RFC 6749 §5.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_in: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_grant_errors: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assumed_expires_in: Option<i64>,
}

static CATALOG: LazyLock<Vec<Provider>> = LazyLock::new(|| {
    // Compiled-in data, held to its rules by the tests below.
    serde_json::from_str(include_str!("catalog/providers.json"))
        .expect("catalog/providers.json is valid")
});

/// Every catalog entry, by name.
pub fn providers() -> &'static [Provider] {
    &CATALOG
}

pub fn provider(name: &str) -> Option<&'static Provider> {
    CATALOG.iter().find(|p| p.name == name)
}

pub fn known_provider(name: &str) -> bool {
    matches!(name, DEMO | GENERIC | OIDC) || provider(name).is_some()
}

/// Every provider name `--provider` accepts.
pub fn provider_names() -> Vec<&'static str> {
    let mut names = vec![DEMO, GENERIC, OIDC];
    names.extend(CATALOG.iter().map(|p| p.name.as_str()));
    names
}

/// Whether the provider honours `scope` on the refresh grant (RFC 6749 §6), so Latchkey can
/// hand out an upstream token that is itself narrowed to the request. Where it does not,
/// narrowing is Latchkey's policy only (the answer's `scope`).
pub fn narrows_upstream(conn: &Connection) -> bool {
    conn.provider == DEMO || provider(&conn.provider).is_some_and(|p| p.narrows_on_refresh)
}

static DEMO_RISKS: LazyLock<BTreeMap<String, Risk>> = LazyLock::new(|| {
    demo_paths::SCOPE_RISKS
        .iter()
        .map(|(s, r)| ((*s).to_owned(), *r))
        .collect()
});
static NO_RISKS: BTreeMap<String, Risk> = BTreeMap::new();

/// The risk table of a connection's provider: the catalog entry's `scope_risks` and
/// `default_risk`; the demo's own table; for generic `oauth2` and `oidc` connections (and any
/// provider without a table) every scope is `low` unless a grant says otherwise.
pub fn risk_table(conn: &Connection) -> RiskTable<'static> {
    if conn.provider == DEMO {
        return RiskTable {
            scopes: &DEMO_RISKS,
            default: demo_paths::DEFAULT_RISK,
        };
    }
    match provider(&conn.provider) {
        Some(p) => RiskTable {
            scopes: &p.scope_risks,
            default: p.default_risk.unwrap_or_default(),
        },
        None => RiskTable {
            scopes: &NO_RISKS,
            default: Risk::Low,
        },
    }
}

/// Whether a refresh must name its scopes even when it does not narrow.
pub fn refresh_needs_scope(conn: &Connection) -> bool {
    provider(&conn.provider).is_some_and(|p| p.refresh_needs_scope)
}

/// Where `conn`'s API lives (what `/proxy/{connection}/…` forwards to): the connection's own
/// setting, else the demo provider's API under the issuer.
pub fn api_base_url(conn: &Connection, issuer: &str) -> Option<String> {
    conn.api_base_url
        .clone()
        .or_else(|| (conn.provider == DEMO).then(|| format!("{issuer}{}", demo_paths::API)))
}

/// Endpoints for `conn`; `client_secret` is the already-opened secret.
pub fn endpoints(
    conn: &Connection,
    issuer: &str,
    client_secret: Option<secrecy::SecretString>,
) -> Endpoints {
    if conn.provider == DEMO {
        let at = |p: &str| format!("{issuer}{p}");
        return Endpoints {
            client_id: conn.client_id.clone(),
            client_secret,
            authorize_url: at(demo_paths::AUTHORIZE),
            token_url: at(demo_paths::TOKEN),
            revoke_url: Some(at(demo_paths::REVOKE)),
            userinfo_url: Some(at(demo_paths::USERINFO)),
            api_base_url: Some(at(demo_paths::API)),
            wire: Wire::default(),
        };
    }
    Endpoints {
        client_id: conn.client_id.clone(),
        client_secret,
        authorize_url: conn.authorize_url.clone(),
        token_url: conn.token_url.clone(),
        revoke_url: conn.revoke_url.clone(),
        userinfo_url: conn.userinfo_url.clone(),
        api_base_url: conn.api_base_url.clone(),
        wire: provider(&conn.provider).map(wire).unwrap_or_default(),
    }
}

fn wire(p: &Provider) -> Wire {
    Wire {
        client_auth: p.client_auth,
        scope_separator: p.scope_separator.clone(),
        token_nested_in: p.token_response.nested_in.clone(),
        token_types: p.token_response.token_types.clone(),
        invalid_grant_errors: p.token_response.invalid_grant_errors.clone(),
        assumed_expires_in: p.token_response.assumed_expires_in,
        refresh_scope_extra: p.offline_scopes.clone(),
        userinfo_post: p.userinfo.post.clone(),
        userinfo_headers: p
            .userinfo
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The authorization-request parameters that depend on the provider: the scopes (under the
/// provider's parameter name, joined with its separator; left out when there are none) and
/// the provider's extra parameters. The connect flow adds the standard ones.
pub fn authorize_params(conn: &Connection) -> Vec<(String, String)> {
    let entry = provider(&conn.provider);
    let mut out = Vec::new();
    if !conn.scopes.is_empty() {
        let (param, sep) = entry.map_or(("scope", " "), |p| {
            (p.scope_param.as_str(), p.scope_separator.as_str())
        });
        let joined = conn.scopes.iter().collect::<Vec<_>>().join(sep);
        out.push((param.to_owned(), joined));
    }
    if let Some(p) = entry {
        out.extend(
            p.authorize_params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
    }
    // OpenID Connect Core §11: a provider grants `offline_access` (a refresh token) only with
    // `prompt=consent`; compliant providers drop the scope otherwise.
    if conn.provider == OIDC
        && conn.scopes.iter().any(|s| s == "offline_access")
        && !out.iter().any(|(k, _)| k == "prompt")
    {
        out.push(("prompt".into(), "consent".into()));
    }
    out
}

/// The issuer a provider's authorization responses must name in `iss` (RFC 9207), when known:
/// the connection's discovered issuer, else the catalog's documented value.
pub fn expected_iss(conn: &Connection) -> Option<String> {
    conn.issuer
        .clone()
        .or_else(|| provider(&conn.provider).and_then(|p| p.iss.clone()))
}

/// The connected account's id in a user-info answer: at the catalog entry's path (`sub` for
/// `oidc`), else the first of `id`, `sub`, `login` (generic and demo connections).
pub fn upstream_account_id(conn: &Connection, info: &serde_json::Value) -> Option<String> {
    let path = match provider(&conn.provider) {
        Some(p) => Some(p.userinfo.id_path.as_str()),
        None if conn.provider == OIDC => Some("sub"),
        None => None,
    };
    match path {
        Some(path) => id_at(info, path),
        None => ["id", "sub", "login"].iter().find_map(|k| id_at(info, k)),
    }
}

/// A string or number at a dotted path.
fn id_at(v: &serde_json::Value, path: &str) -> Option<String> {
    let found = path.split('.').try_fold(v, |v, k| v.get(k))?;
    match found {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Check a provider and fill what the catalog knows into a new connection: for a catalog
/// provider, every endpoint not given and the default scopes (if none are given) come from its
/// entry, and its offline-access scopes are always added. Every URL must be https (loopback
/// hosts may use http, for tests and local providers).
pub fn complete(new: &mut NewConnection) -> Result<(), String> {
    if !known_provider(&new.provider) {
        return Err(format!(
            "unknown provider `{}` (known: {})",
            new.provider,
            provider_names().join(", ")
        ));
    }
    if new.provider == DEMO {
        return Ok(());
    }
    if let Some(p) = provider(&new.provider) {
        let fill = |given: &mut String, default: &str| {
            if given.is_empty() {
                *given = default.to_owned();
            }
        };
        fill(&mut new.authorize_url, &p.authorize_url);
        fill(&mut new.token_url, &p.token_url);
        new.revoke_url = new.revoke_url.take().or_else(|| p.revoke_url.clone());
        new.userinfo_url = new
            .userinfo_url
            .take()
            .or_else(|| Some(p.userinfo.url.clone()));
        new.api_base_url = new.api_base_url.take().or_else(|| p.api_base_url.clone());
        new.keep_alive_secs = new
            .keep_alive_secs
            .or(p.keep_alive_days.map(|d| i64::from(d) * 86_400));
        if new.scopes.is_empty() {
            new.scopes = p.default_scopes.iter().collect();
        }
        new.scopes = new
            .scopes
            .iter()
            .chain(p.offline_scopes.iter().map(String::as_str))
            .collect();
    }
    if new.authorize_url.is_empty() || new.token_url.is_empty() {
        return Err(format!(
            "provider `{}` needs an authorize URL and a token URL",
            new.provider
        ));
    }
    for (what, url) in [
        ("authorize URL", Some(&new.authorize_url)),
        ("token URL", Some(&new.token_url)),
        ("revocation URL", new.revoke_url.as_ref()),
        ("user-info URL", new.userinfo_url.as_ref()),
        ("API base URL", new.api_base_url.as_ref()),
    ] {
        if let Some(url) = url {
            check_url(what, url)?;
        }
    }
    Ok(())
}

/// A provider URL must be https (http only to a loopback host), with a host, and without
/// credentials or backslashes (`https://api.example.com@evil.example/` names evil.example).
pub fn check_url(what: &str, url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|_| format!("{what} `{url}` is not a URL"))?;
    if url.contains('\\')
        || !parsed.username().is_empty()
        || parsed.password().is_some()
        || parsed.host().is_none()
    {
        return Err(format!(
            "{what} `{url}` must name a host, without credentials (`user@`) or backslashes"
        ));
    }
    let loopback = match parsed.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!("{what} `{url}` must use https")),
    }
}

/// Where an OpenID provider publishes its metadata (OpenID Connect Discovery 1.0 §4).
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// Endpoints read from an OpenID provider's discovery document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    pub authorize_url: String,
    pub token_url: String,
    pub revoke_url: Option<String>,
    pub userinfo_url: Option<String>,
    /// `openid`, and `offline_access` when the provider lists it (to get a refresh token).
    pub default_scopes: Scopes,
}

/// Check a discovery document against the issuer the operator gave: its `issuer` must be that
/// exact string (OpenID Connect Discovery §4.3, so a document cannot speak for another
/// issuer), and every endpoint must be https (loopback http allowed).
pub fn from_discovery(issuer: &str, doc: &serde_json::Value) -> Result<Discovered, String> {
    check_url("issuer", issuer)?;
    match doc.get("issuer").and_then(|v| v.as_str()) {
        Some(i) if i == issuer => {}
        Some(other) => {
            return Err(format!(
                "the discovery document names issuer `{other}`, not `{issuer}`; refusing it"
            ));
        }
        None => return Err("the discovery document has no issuer".into()),
    }
    let field = |name: &str| -> Result<Option<String>, String> {
        match doc.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(u)) => {
                check_url(name, u)?;
                Ok(Some(u.clone()))
            }
            Some(_) => Err(format!(
                "`{name}` in the discovery document is not a string"
            )),
        }
    };
    let required =
        |name: &str| field(name)?.ok_or_else(|| format!("the discovery document has no {name}"));
    let offline = doc
        .get("scopes_supported")
        .and_then(|s| s.as_array())
        .is_some_and(|s| s.iter().any(|v| v.as_str() == Some("offline_access")));
    let mut default_scopes = vec!["openid"];
    if offline {
        default_scopes.push("offline_access");
    }
    Ok(Discovered {
        authorize_url: required("authorization_endpoint")?,
        token_url: required("token_endpoint")?,
        revoke_url: field("revocation_endpoint")?,
        userinfo_url: field("userinfo_endpoint")?,
        default_scopes: default_scopes.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn new_conn(provider: &str) -> NewConnection {
        NewConnection {
            name: "c".into(),
            provider: provider.into(),
            client_id: "client".into(),
            client_secret: None,
            authorize_url: String::new(),
            token_url: String::new(),
            revoke_url: None,
            userinfo_url: None,
            api_base_url: None,
            issuer: None,
            scopes: Scopes::default(),
            keep_alive_secs: None,
        }
    }

    fn conn(new: NewConnection) -> Connection {
        Connection {
            id: "con_1".into(),
            name: new.name,
            provider: new.provider,
            client_id: new.client_id,
            client_secret: None,
            authorize_url: new.authorize_url,
            token_url: new.token_url,
            revoke_url: new.revoke_url,
            userinfo_url: new.userinfo_url,
            api_base_url: new.api_base_url,
            issuer: None,
            scopes: new.scopes,
            keep_alive_secs: new.keep_alive_secs,
            created_at: 0,
        }
    }

    fn completed(provider: &str) -> Connection {
        let mut new = new_conn(provider);
        complete(&mut new).unwrap();
        conn(new)
    }

    #[test]
    fn every_entry_follows_the_rules() {
        let expected = [
            "atlassian",
            "dropbox",
            "github",
            "gitlab",
            "google",
            "linear",
            "microsoft",
            "notion",
            "salesforce",
            "slack",
        ];
        let names: Vec<&str> = providers().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, expected, "every provider, once, in name order");
        for p in providers() {
            let n = &p.name;
            assert!(!matches!(n.as_str(), DEMO | GENERIC | OIDC), "{n}");
            assert!(!p.display_name.is_empty() && !p.notes.is_empty(), "{n}");
            for url in [
                Some(&p.authorize_url),
                Some(&p.token_url),
                Some(&p.userinfo.url),
            ]
            .into_iter()
            .chain([p.revoke_url.as_ref(), p.api_base_url.as_ref()])
            .flatten()
            {
                assert!(url.starts_with("https://"), "{n}: {url}");
                check_url(n, url).unwrap();
            }
            assert!(
                !p.userinfo.id_path.is_empty()
                    && p.userinfo.id_path.split('.').all(|s| !s.is_empty()),
                "{n}: user-id path"
            );
            assert!(matches!(p.scope_separator.as_str(), " " | ","), "{n}");
            assert!(
                matches!(p.scope_param.as_str(), "scope" | "user_scope"),
                "{n}"
            );
            for reserved in [
                "response_type",
                "client_id",
                "redirect_uri",
                "scope",
                "state",
            ] {
                assert!(
                    !p.authorize_params.contains_key(reserved),
                    "{n}: {reserved}"
                );
            }
            for s in p.default_scopes.iter().chain(&p.offline_scopes) {
                assert!(!s.is_empty() && !s.contains([' ', ',']), "{n}: scope `{s}`");
            }
            if let Some(body) = p.userinfo.post.as_deref().filter(|b| !b.is_empty()) {
                serde_json::from_str::<serde_json::Value>(body).unwrap();
            }
            if let Some(iss) = &p.iss {
                assert!(iss.starts_with("https://"), "{n}");
            }
            assert!(p.token_response.assumed_expires_in.is_none_or(|s| s > 0));
            assert!(known_provider(n));
        }
    }

    /// Every entry's risk table parses (the levels are checked as the catalog loads) and is
    /// well formed; the scopes that only get a refresh token are low; each provider with
    /// scopes says something about them.
    #[test]
    fn every_entry_has_valid_risks() {
        for p in providers() {
            let n = &p.name;
            let table = RiskTable {
                scopes: &p.scope_risks,
                default: p.default_risk.unwrap_or_default(),
            };
            table.validate().unwrap_or_else(|e| panic!("{n}: {e}"));
            for s in &p.offline_scopes {
                assert_eq!(table.risk_of(s), Risk::Low, "{n}: offline scope {s}");
            }
            assert!(
                p.default_risk.is_some(),
                "{n}: name a default_risk for scopes the table does not list"
            );
            if !p.default_scopes.is_empty() {
                assert!(!p.scope_risks.is_empty(), "{n}: no scope_risks");
            }
        }
        // The raw JSON: levels are lower-case names, nothing else.
        let raw: serde_json::Value =
            serde_json::from_str(include_str!("catalog/providers.json")).unwrap();
        for entry in raw.as_array().unwrap() {
            for level in entry["scope_risks"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
                .chain(entry.get("default_risk"))
            {
                Risk::parse(level.as_str().unwrap()).unwrap();
            }
        }
        // A level the catalog does not know is refused as it loads.
        let bad = r#"{"scope_risks": {"repo": "severe"}}"#;
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Only {
            scope_risks: BTreeMap<String, Risk>,
        }
        assert!(serde_json::from_str::<Only>(bad).is_err());
    }

    #[test]
    fn catalog_risks_follow_the_issue() {
        let gh = completed("github");
        let t = risk_table(&gh);
        for (scope, risk) in [
            ("read:user", Risk::Low),
            ("read:org", Risk::Low),
            ("user:email", Risk::Low),
            ("repo", Risk::High),
            ("public_repo", Risk::High),
            ("write:packages", Risk::High),
            ("workflow", Risk::High),
            ("delete_repo", Risk::Critical),
            ("admin:org", Risk::Critical),
            ("admin:repo_hook", Risk::Critical),
            ("gist", Risk::Medium),
        ] {
            assert_eq!(t.risk_of(scope), risk, "github {scope}");
        }
        let google = risk_table(&completed("google"));
        assert_eq!(google.risk_of("openid"), Risk::Low);
        assert_eq!(
            google.risk_of("https://www.googleapis.com/auth/drive.readonly"),
            Risk::Low
        );
        assert_eq!(
            google.risk_of("https://www.googleapis.com/auth/gmail.send"),
            Risk::High
        );
        assert_eq!(google.risk_of("https://mail.google.com/"), Risk::Critical);
        let ms = risk_table(&completed("microsoft"));
        assert_eq!(ms.risk_of("User.Read"), Risk::Low);
        assert_eq!(ms.risk_of("Mail.ReadWrite"), Risk::High);
        assert_eq!(ms.risk_of("Directory.ReadWrite.All"), Risk::Critical);
        let slack = risk_table(&completed("slack"));
        assert_eq!(slack.risk_of("channels:read"), Risk::Low);
        assert_eq!(slack.risk_of("chat:write"), Risk::High);
        let demo = risk_table(&completed(DEMO));
        for s in demo_paths::SCOPES {
            assert!(
                demo_paths::SCOPE_RISKS.iter().any(|(k, _)| k == s),
                "demo scope {s} has a level"
            );
        }
        assert_eq!(demo.risk_of("repo:read"), Risk::Low);
        assert_eq!(demo.risk_of("repo:write"), Risk::High);
        // Generic connections: low unless a grant says otherwise.
        let mut generic = completed("github");
        generic.provider = GENERIC.into();
        assert_eq!(risk_table(&generic).risk_of("delete_everything"), Risk::Low);
    }

    #[test]
    fn github_from_the_catalog() {
        let c = completed("github");
        assert_eq!(c.authorize_url, "https://github.com/login/oauth/authorize");
        assert_eq!(c.token_url, "https://github.com/login/oauth/access_token");
        assert_eq!(
            c.userinfo_url.as_deref(),
            Some("https://api.github.com/user")
        );
        assert_eq!(c.revoke_url, None);
        assert_eq!(c.scopes.to_string_spaced(), "read:user repo");
        let ep = endpoints(&c, "https://vault/", None);
        assert_eq!(ep.authorize_url, c.authorize_url);
        assert_eq!(ep.api_base_url.as_deref(), Some("https://api.github.com"));
        assert_eq!(ep.wire.client_auth, ClientAuth::Post);
        assert!(
            ep.wire
                .invalid_grant_errors
                .contains(&"bad_refresh_token".to_owned())
        );
        assert_eq!(
            authorize_params(&c),
            vec![("scope".to_owned(), "read:user repo".to_owned())]
        );
        assert!(!narrows_upstream(&c));
        let info = json!({"login": "octocat", "id": 583231});
        assert_eq!(upstream_account_id(&c, &info).as_deref(), Some("583231"));
    }

    #[test]
    fn google_asks_for_offline_access() {
        let c = completed("google");
        assert_eq!(
            c.authorize_url,
            "https://accounts.google.com/o/oauth2/v2/auth"
        );
        assert_eq!(c.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(
            c.revoke_url.as_deref(),
            Some("https://oauth2.googleapis.com/revoke")
        );
        assert_eq!(
            authorize_params(&c),
            vec![
                ("scope".to_owned(), "email openid".to_owned()),
                ("access_type".to_owned(), "offline".to_owned()),
                ("prompt".to_owned(), "consent".to_owned()),
            ]
        );
        let info = json!({"sub": "1098", "id": "not this"});
        assert_eq!(upstream_account_id(&c, &info).as_deref(), Some("1098"));
    }

    #[test]
    fn provider_quirks_reach_the_wire() {
        let mut new = new_conn("slack");
        new.scopes = Scopes::parse("chat:write channels:read");
        complete(&mut new).unwrap();
        let slack = conn(new);
        assert_eq!(
            authorize_params(&slack),
            vec![(
                "user_scope".to_owned(),
                "channels:read,chat:write".to_owned()
            )]
        );
        let ep = endpoints(&slack, "https://vault/", None);
        assert_eq!(ep.wire.token_nested_in.as_deref(), Some("authed_user"));
        assert_eq!(ep.wire.scope_separator, ",");

        // --scopes replaces the defaults; the offline-access scope stays.
        let mut new = new_conn("microsoft");
        new.scopes = Scopes::parse("Mail.Read");
        complete(&mut new).unwrap();
        assert_eq!(new.scopes.to_string_spaced(), "Mail.Read offline_access");
        let ms = conn(new);
        assert!(narrows_upstream(&ms) && refresh_needs_scope(&ms));
        let ep = endpoints(&ms, "https://vault/", None);
        assert_eq!(
            ep.wire.refresh_scope_extra,
            vec!["offline_access".to_owned()]
        );
        assert!(!refresh_needs_scope(&completed("google")));

        let sf = endpoints(&completed("salesforce"), "https://vault/", None);
        assert_eq!(sf.wire.assumed_expires_in, Some(900));
        let linear = completed("linear");
        let info = json!({"data": {"viewer": {"id": "u-1"}}});
        assert_eq!(upstream_account_id(&linear, &info).as_deref(), Some("u-1"));
        assert!(
            endpoints(&linear, "https://vault/", None)
                .wire
                .userinfo_post
                .is_some()
        );
        let notion = endpoints(&completed("notion"), "https://vault/", None);
        assert_eq!(notion.wire.userinfo_headers[0].0, "Notion-Version");
    }

    #[test]
    fn operator_urls_override_the_catalog() {
        let mut new = new_conn("gitlab");
        new.authorize_url = "https://gitlab.example.com/oauth/authorize".into();
        complete(&mut new).unwrap();
        assert_eq!(
            new.authorize_url,
            "https://gitlab.example.com/oauth/authorize"
        );
        assert_eq!(new.token_url, "https://gitlab.com/oauth/token");
        let mut bad = new_conn("gitlab");
        bad.token_url = "http://gitlab.example.com/oauth/token".into();
        assert!(complete(&mut bad).unwrap_err().contains("https"));
    }

    #[test]
    fn demo_is_unchanged() {
        let c = completed(DEMO);
        let ep = endpoints(&c, "https://127.0.0.1:8750/", None);
        assert_eq!(
            ep.authorize_url,
            "https://127.0.0.1:8750/demo/oauth/authorize"
        );
        assert_eq!(ep.token_url, "https://127.0.0.1:8750/demo/oauth/token");
        assert_eq!(
            ep.revoke_url.as_deref(),
            Some("https://127.0.0.1:8750/demo/oauth/revoke")
        );
        assert_eq!(
            ep.userinfo_url.as_deref(),
            Some("https://127.0.0.1:8750/demo/api/user")
        );
        assert_eq!(
            ep.api_base_url.as_deref(),
            Some("https://127.0.0.1:8750/demo/api")
        );
        assert_eq!(ep.wire.client_auth, ClientAuth::Basic);
        assert!(narrows_upstream(&c));
        let info = json!({"login": "octo-demo", "id": "1001"});
        assert_eq!(upstream_account_id(&c, &info).as_deref(), Some("1001"));
    }

    #[test]
    fn generic_providers() {
        let mut new = new_conn(GENERIC);
        assert!(complete(&mut new).is_err(), "oauth2 needs its URLs");
        new.authorize_url = "https://idp.example/authorize".into();
        new.token_url = "https://idp.example/token".into();
        new.scopes = Scopes::parse("a b");
        complete(&mut new).unwrap();
        let c = conn(new);
        assert!(!narrows_upstream(&c));
        assert_eq!(
            authorize_params(&c),
            vec![("scope".to_owned(), "a b".to_owned())]
        );
        assert_eq!(
            upstream_account_id(&c, &json!({"login": "x"})).as_deref(),
            Some("x")
        );
        let mut none = c.clone();
        none.scopes = Scopes::default();
        assert!(authorize_params(&none).is_empty());
        assert!(
            complete(&mut new_conn("nope"))
                .unwrap_err()
                .contains("github")
        );
    }

    #[test]
    fn oidc_offline_access_asks_for_consent() {
        let mut c = conn(new_conn(OIDC));
        c.scopes = Scopes::parse("openid offline_access");
        assert!(authorize_params(&c).contains(&("prompt".into(), "consent".into())));
        c.scopes = Scopes::parse("openid");
        assert!(!authorize_params(&c).iter().any(|(k, _)| k == "prompt"));
    }

    #[test]
    fn discovery_is_checked_against_the_issuer() {
        let issuer = "https://idp.example/realms/a";
        assert_eq!(
            discovery_url(issuer),
            "https://idp.example/realms/a/.well-known/openid-configuration"
        );
        let doc = json!({
            "issuer": issuer,
            "authorization_endpoint": "https://idp.example/auth",
            "token_endpoint": "https://idp.example/token",
            "userinfo_endpoint": "https://idp.example/userinfo",
            "scopes_supported": ["openid", "offline_access"],
        });
        let d = from_discovery(issuer, &doc).unwrap();
        assert_eq!(d.token_url, "https://idp.example/token");
        assert_eq!(d.revoke_url, None);
        assert_eq!(d.default_scopes.to_string_spaced(), "offline_access openid");

        let mut other = doc.clone();
        other["issuer"] = json!("https://evil.example");
        assert!(from_discovery(issuer, &other).unwrap_err().contains("evil"));
        let mut plain = doc.clone();
        plain["token_endpoint"] = json!("http://idp.example/token");
        assert!(
            from_discovery(issuer, &plain)
                .unwrap_err()
                .contains("https")
        );
        let mut missing = doc;
        missing
            .as_object_mut()
            .unwrap()
            .remove("authorization_endpoint");
        assert!(from_discovery(issuer, &missing).is_err());
        assert!(from_discovery("http://idp.example", &json!({})).is_err());
    }
}

#[cfg(test)]
mod url_tests {
    use super::check_url;

    #[test]
    fn provider_urls_name_one_host_plainly() {
        check_url("API base URL", "https://api.github.com").unwrap();
        check_url("API base URL", "http://127.0.0.1:8080/api").unwrap();
        for bad in [
            "https://api.github.com@evil.example/",
            "https://user:pw@api.github.com/",
            "https://api.github.com\\@evil.example/",
            "http://evil.example/",
            "file:///etc/passwd",
            "not a url",
        ] {
            assert!(check_url("API base URL", bad).is_err(), "{bad} passed");
        }
    }
}
