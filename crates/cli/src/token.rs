//! `latchkey token`: what an unattended agent does, as a shell command. It signs a
//! privileged-worker subject JWT (`typ: token-vault-req+jwt`) and a `private_key_jwt` client
//! assertion with the agent's key, exchanges them at `/oauth/token`, and prints the upstream
//! access token.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use latchkey_core::clock::{Clock, SystemClock};
use latchkey_core::vault::{
    ASSERTION_TYPE_JWT_BEARER, GRANT_TOKEN_VAULT, SUBJECT_JWT_TYP, TOKEN_TYPE_JWT,
    TOKEN_TYPE_VAULT_ACCESS,
};
use latchkey_crypto::keygen::{SigningKey, guess_alg};

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
    let mut issuer = args.issuer.clone();
    if !issuer.ends_with('/') {
        issuer.push('/');
    }
    let key = agent_key(&args.key, args.alg.as_deref())?;
    let now = SystemClock.now();
    let jti = || uuid::Uuid::new_v4().to_string();
    let subject = key.sign(
        Some(SUBJECT_JWT_TYP),
        &serde_json::json!({
            "iss": args.client_id, "sub": args.user, "aud": issuer,
            "iat": now, "exp": now + 60, "jti": jti(), "audit_context": args.audit_context,
        }),
    );
    let assertion = client_assertion(&key, &args.client_id, &issuer);
    let mut form = vec![
        ("grant_type", GRANT_TOKEN_VAULT.to_owned()),
        ("client_id", args.client_id.clone()),
        (
            "client_assertion_type",
            ASSERTION_TYPE_JWT_BEARER.to_owned(),
        ),
        ("client_assertion", assertion),
        ("subject_token_type", TOKEN_TYPE_JWT.to_owned()),
        ("subject_token", subject),
        ("requested_token_type", TOKEN_TYPE_VAULT_ACCESS.to_owned()),
        ("connection", args.connection.clone()),
    ];
    if let Some(s) = &args.scope {
        form.push(("scope", s.clone()));
    }
    let resp = http_client(args.ca_cert.as_deref())?
        .post(format!("{issuer}oauth/token"))
        .form(&form)
        .send()
        .await
        .with_context(|| format!("calling {issuer}oauth/token"))?;
    let status = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .context("the token endpoint did not answer JSON")?;
    if !status.is_success() {
        bail!(
            "{} ({}): {}",
            body["error"].as_str().unwrap_or("error"),
            status.as_u16(),
            body["error_description"].as_str().unwrap_or("")
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!(
            "{}",
            body["access_token"]
                .as_str()
                .context("no access_token in the response")?
        );
    }
    Ok(())
}

/// The agent's private key from a PKCS#8 PEM file; the algorithm from `alg` or the key.
pub(crate) fn agent_key(path: &std::path::Path, alg: Option<&str>) -> Result<SigningKey> {
    let pem =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let alg = match alg {
        Some(a) => a
            .parse()
            .map_err(|_| anyhow::anyhow!("unknown algorithm `{a}`"))?,
        None => guess_alg(&pem).context("the key file is not a PKCS#8 private key")?,
    };
    Ok(SigningKey::from_pem(&pem, alg, None)?)
}

/// A fresh `private_key_jwt` client assertion (RFC 7523) for `issuer`, valid one minute.
pub(crate) fn client_assertion(key: &SigningKey, client_id: &str, issuer: &str) -> String {
    let now = SystemClock.now();
    key.sign(
        None,
        &serde_json::json!({
            "iss": client_id, "sub": client_id, "aud": issuer, "iat": now, "exp": now + 60,
            "jti": uuid::Uuid::new_v4().to_string(),
        }),
    )
}

/// An HTTP client for calling Latchkey, trusting `ca` (its local CA) besides the system's.
pub(crate) fn http_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client> {
    let mut client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(90));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        client = client.tls_certs_merge([reqwest::Certificate::from_pem(&pem)?]);
    }
    Ok(client.build()?)
}
