//! Latchkey's own signing key (RS256), published in the JWKS. Stored sealed in the database,
//! created on first start.

use anyhow::Result;
use latchkey_core::Vault;
use latchkey_crypto::Algorithm;
use latchkey_crypto::keygen::{SigningKey, generate};

const NAME: &str = "signing_key_rs256";

pub async fn load_or_create(vault: &Vault) -> Result<SigningKey> {
    let pem = vault
        .keys
        .server_secret(NAME, || {
            generate(Algorithm::RS256).private_pem.as_bytes().to_vec()
        })
        .await?;
    Ok(SigningKey::from_pem(
        std::str::from_utf8(&pem)?,
        Algorithm::RS256,
        None,
    )?)
}
