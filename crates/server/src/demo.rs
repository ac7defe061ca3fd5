//! `latchkey demo`: a demo user (an operator), the `demo-git` connection to the built-in demo
//! provider, and an agent whose key pair is written to the data directory — everything needed
//! to try Latchkey offline. Seeding is idempotent: a second run reuses what the first created
//! (`demo.json`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use latchkey_core::Vault;
use latchkey_core::catalog;
use latchkey_core::model::Role;
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewConnection};
use latchkey_crypto::jws::PublicKey;
use latchkey_crypto::{Algorithm, keygen, secrets};
use serde::{Deserialize, Serialize};

/// The client id the vault uses at the demo provider.
pub const DEMO_CLIENT_ID: &str = "latchkey-demo";
pub const DEMO_CONNECTION: &str = "demo-git";
/// What the demo agent may obtain (not `repo:write`: the demo shows narrowing).
pub const DEMO_GRANT: &str = "read:user repo:read issues:write";

/// What `latchkey demo` seeded, and what its walkthrough prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoInfo {
    pub username: String,
    pub password: String,
    pub user_id: String,
    pub agent_id: String,
    pub agent_key: PathBuf,
    pub connection: String,
}

/// The demo provider's client secret, shared by the provider and every `demo` connection.
pub async fn demo_client_secret(vault: &Vault) -> Result<String> {
    let secret = vault
        .keys
        .server_secret("demo_client_secret", || {
            secrets::random_token(32).into_bytes()
        })
        .await?;
    Ok(String::from_utf8(secret.to_vec())?)
}

/// A `demo` connection (used by `connection add --provider demo` and by [`seed`]).
pub async fn demo_connection(vault: &Vault, name: &str) -> Result<NewConnection> {
    Ok(NewConnection {
        name: name.into(),
        provider: catalog::DEMO.into(),
        client_id: DEMO_CLIENT_ID.into(),
        client_secret: Some(demo_client_secret(vault).await?.into()),
        authorize_url: String::new(),
        token_url: String::new(),
        revoke_url: None,
        userinfo_url: None,
        api_base_url: None,
        issuer: None,
        scopes: catalog::demo_paths::SCOPES.iter().copied().collect(),
        keep_alive_secs: None,
    })
}

pub async fn seed(vault: &Vault, data_dir: &Path) -> Result<DemoInfo> {
    let info_path = data_dir.join("demo.json");
    if let Ok(text) = std::fs::read_to_string(&info_path) {
        let info: DemoInfo =
            serde_json::from_str(&text).context("demo.json is unreadable; delete it to re-seed")?;
        if vault.store().user_by_id(&info.user_id).await?.is_some()
            && vault.store().agent_by_id(&info.agent_id).await?.is_some()
        {
            return Ok(info);
        }
    }
    let actor = Actor::cli();
    let password = secrets::random_token(12);
    // The demo's one person runs the place: an operator, who sees every page of the dashboard.
    let user = match vault.store().user_by_username("demo").await? {
        Some(u) => {
            let u = vault.set_password(&u.id, &password, &actor).await?;
            if u.role == Role::Operator {
                u
            } else {
                vault.set_user_role(&u.id, Role::Operator, &actor).await?
            }
        }
        None => {
            vault
                .add_user("demo", Some(&password), Role::Operator, &actor)
                .await?
        }
    };
    if vault
        .store()
        .connection_by_name(DEMO_CONNECTION)
        .await?
        .is_none()
    {
        vault
            .add_connection(demo_connection(vault, DEMO_CONNECTION).await?, &actor)
            .await?;
    }
    let key = keygen::generate(Algorithm::RS256);
    let agent_key = data_dir.join("demo-agent.key");
    crate::tls::write_private(&agent_key, key.private_pem.as_bytes())?;
    let public = PublicKey::parse(&key.public_pem, Some(Algorithm::RS256), None)?;
    let (agent, _) = vault
        .add_agent("demo-agent", &[public], false, &actor)
        .await?;
    vault
        .grant(
            &agent.id,
            DEMO_CONNECTION,
            Scopes::parse(DEMO_GRANT),
            vec![],
            &actor,
        )
        .await?;
    let info = DemoInfo {
        username: user.username,
        password,
        user_id: user.id,
        agent_id: agent.id,
        agent_key: std::fs::canonicalize(&agent_key).unwrap_or(agent_key),
        connection: DEMO_CONNECTION.into(),
    };
    crate::tls::write_private(&info_path, serde_json::to_string_pretty(&info)?.as_bytes())?;
    Ok(info)
}
