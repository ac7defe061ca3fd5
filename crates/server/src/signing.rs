//! Latchkey's own signing key (RS256), published in the JWKS. Stored sealed in the database,
//! created on first start.

use anyhow::Result;
use latchkey_core::Vault;
use latchkey_crypto::Algorithm;
use latchkey_crypto::envelope::Slot;
use latchkey_crypto::keygen::{SigningKey, generate};

const NAME: &str = "signing_key_rs256";

pub async fn load_or_create(vault: &Vault) -> Result<SigningKey> {
    let slot = Slot {
        table: "server_secrets",
        field: "value",
        row: NAME,
    };
    let blob = match vault.store().server_secret(NAME).await? {
        Some(b) => b,
        None => {
            let pem = generate(Algorithm::RS256).private_pem;
            let sealed = vault.keys.seal(slot, pem.as_bytes());
            vault.store().init_server_secret(NAME, &sealed).await?
        }
    };
    let pem = vault.keys.open(slot, &blob).await?;
    let pem = std::str::from_utf8(&pem)?;
    Ok(SigningKey::from_pem(pem, Algorithm::RS256, None)?)
}
