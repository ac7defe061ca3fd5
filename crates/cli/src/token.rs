//! `latchkey token`: what an unattended agent does, as a shell command. Through the Rust SDK
//! (`latchkey-client`) it signs a privileged-worker subject JWT (`typ: token-vault-req+jwt`)
//! and a `private_key_jwt` client assertion with the agent's key, exchanges them at
//! `/oauth/token`, and prints the upstream access token.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use latchkey_client::{Client, ClientBuilder, TokenRequest};
use latchkey_crypto::keygen::guess_alg;

#[derive(Args)]
pub struct TokenArgs {
    /// Latchkey's issuer URL, e.g. https://127.0.0.1:8750/
    #[arg(long, env = "LATCHKEY_ISSUER")]
    issuer: String,
    /// The agent's client id.
    #[arg(long, env = "LATCHKEY_CLIENT_ID")]
    client_id: String,
    /// The agent's private key (PKCS#8 PEM).
    #[arg(long, env = "LATCHKEY_AGENT_KEY")]
    key: PathBuf,
    /// Key algorithm (default from the key: RSA → RS256, P-256 → ES256, Ed25519 → EdDSA).
    #[arg(long)]
    alg: Option<String>,
    /// The user the agent acts for (user id).
    #[arg(long)]
    user: String,
    /// The connection, e.g. demo-git.
    #[arg(long)]
    connection: String,
    /// Narrow the token to these scopes (must be within the agent's grant).
    #[arg(long)]
    scope: Option<String>,
    /// Why the agent needs the token; recorded in the audit trail (1–256 characters, no PII).
    #[arg(long, default_value = "latchkey token")]
    audit_context: String,
    /// CA certificate to trust (e.g. latchkey-data/tls/ca.pem).
    #[arg(long, env = "LATCHKEY_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Print the whole JSON response instead of just the token.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: TokenArgs) -> Result<()> {
    let client = sdk_client(
        &args.issuer,
        &args.client_id,
        &args.key,
        args.alg.as_deref(),
        args.ca_cert.as_deref(),
    )?
    .audit_context(&args.audit_context)
    .build()?;
    let mut req = TokenRequest::new(&args.connection, &args.user);
    if let Some(s) = &args.scope {
        req = req.scope(s);
    }
    let token = client
        .token_for(&req)
        .await
        .map_err(|e| sdk_error(e, &format!("{}oauth/token", client.issuer())))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&token.to_json())?);
    } else {
        println!("{}", token.secret());
    }
    Ok(())
}

/// An SDK client builder for the agent: its key from a PKCS#8 PEM file (the algorithm from
/// `alg` or the key), trusting `ca` (Latchkey's local CA) besides the system's.
pub(crate) fn sdk_client(
    issuer: &str,
    client_id: &str,
    key: &Path,
    alg: Option<&str>,
    ca: Option<&Path>,
) -> Result<ClientBuilder> {
    let pem = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let alg = match alg {
        Some(a) => a
            .parse()
            .map_err(|_| anyhow::anyhow!("unknown algorithm `{a}`"))?,
        None => guess_alg(&pem).context("the key file is not a PKCS#8 private key")?,
    };
    let mut builder = Client::builder()
        .issuer(issuer)
        .client_id(client_id)
        .private_key_pem(pem.as_bytes())
        .algorithm(alg);
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder.ca_cert_pem(pem);
    }
    Ok(builder)
}

/// An SDK error as the command reports it: Latchkey's answers as `code (status): description`,
/// a failed call with the URL called.
pub(crate) fn sdk_error(e: latchkey_client::Error, url: &str) -> anyhow::Error {
    match (&e, e.code(), e.status()) {
        (latchkey_client::Error::Transport(t), _, _) => {
            anyhow::Error::new(t.clone()).context(format!("calling {url}"))
        }
        (_, Some(code), Some(status)) => {
            anyhow::anyhow!("{code} ({status}): {}", e.description().unwrap_or_default())
        }
        _ => e.into(),
    }
}
