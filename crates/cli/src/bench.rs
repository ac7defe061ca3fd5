//! `latchkey bench …`: hidden helpers for the load benchmarks in `bench/`, not part of the
//! product's interface (the subcommand is hidden from `--help`).
//!
//! - `verify-cost` times the JWS verification the token endpoint runs for every subject token
//!   and client assertion ([`verify_jws`]: parse, header checks, signature with the key parsed
//!   once at registration) for RS256 (RSA-2048) and ES256 (P-256) on this machine, on one
//!   thread, so the benchmark can print what a core can verify at most.
//! - `seed-accounts` writes N users, each with one active connected account on a connection,
//!   straight into the SQLite database — not through the API, which would take hours for 10⁶.
//!   Each account's access token is sealed for its own row (the AAD names table, field and
//!   row), exactly as the vault seals it, so the server opens them like any other. No audit
//!   entries are written for them: this is a fixture, not an event.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use jsonwebtoken::Algorithm;
use latchkey_core::Vault;
use latchkey_core::clock::{Clock, SystemClock};
use latchkey_core::vault::account_slot;
use latchkey_crypto::jws::{TypRule, verify_jws};
use latchkey_crypto::keygen::{SigningKey, generate};
use latchkey_server::config::{Config, Database};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Time one JWS verification (RS256 and ES256) on one thread; prints JSON.
    VerifyCost {
        /// Verifications per round (5 rounds; the median round is reported).
        #[arg(long, default_value_t = 2000)]
        iterations: u32,
    },
    /// Write N users, each with an active connected account on CONNECTION, directly into the
    /// SQLite database (server stopped or running); prints JSON. Users are
    /// `usr_bench_{i}` (username `bench-{i}`), accounts `acc_bench_{i}`, for i in 0..N.
    SeedAccounts {
        #[arg(long)]
        connection: String,
        #[arg(long)]
        count: u64,
        /// The consented scopes of every account (the benchmark's grant, so that no narrowed
        /// token has to be fetched from the provider).
        #[arg(long)]
        scopes: String,
        /// Seconds until the seeded access tokens expire.
        #[arg(long, default_value_t = 30 * 86_400)]
        expires_in: i64,
        /// Rows per transaction.
        #[arg(long, default_value_t = 20_000)]
        batch: u64,
    },
}

/// Commands that need no vault.
pub fn verify_cost(iterations: u32) -> Result<()> {
    let mut out = serde_json::Map::new();
    for alg in [Algorithm::RS256, Algorithm::ES256] {
        let generated = generate(alg);
        let key = SigningKey::from_pem(&generated.private_pem, alg, None)?;
        let now = SystemClock.now();
        let claims = serde_json::json!({
            "iss": "agt_bench", "sub": "usr_bench_0", "aud": "https://127.0.0.1:8750/",
            "iat": now, "exp": now + 60, "jti": "bench-verify-cost", "audit_context": "bench",
        });
        let token = key.sign(Some("token-vault-req+jwt"), &claims);
        let keys = [key.public.clone()];
        let rule = TypRule::Exactly("token-vault-req+jwt");
        verify_jws(&token, rule, &keys).context("the benchmark token does not verify")?;

        let full = median_round(iterations, || verify_jws(&token, rule, &keys).is_ok());
        out.insert(
            format!("{alg:?}"),
            serde_json::json!({ "verify_jws_us": full }),
        );
    }
    out.insert("iterations".into(), iterations.into());
    out.insert("rounds".into(), 5.into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

/// Microseconds per call, the median of 5 rounds of `iterations` calls (a round disturbed by
/// other work on the machine does not decide the figure).
fn median_round(iterations: u32, mut f: impl FnMut() -> bool) -> f64 {
    let mut rounds: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let mut ok = 0u32;
            for _ in 0..iterations {
                ok += u32::from(std::hint::black_box(f()));
            }
            assert_eq!(ok, iterations, "every verification succeeds");
            t.elapsed().as_secs_f64() * 1e6 / f64::from(iterations)
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

pub async fn seed_accounts(
    config: &Config,
    vault: Arc<Vault>,
    connection: &str,
    count: u64,
    scopes: &str,
    expires_in: i64,
    batch: u64,
) -> Result<()> {
    let path = match config.database().map_err(anyhow::Error::msg)? {
        Database::Sqlite(path) => path,
        Database::Postgres(_) => bail!("latchkey bench seed-accounts writes SQLite databases only"),
    };
    let conn = vault
        .store()
        .connection_by_name(connection)
        .await?
        .with_context(|| format!("no connection named {connection}"))?;
    let scopes = latchkey_core::scope::Scopes::parse(scopes).to_string_spaced();
    let started = Instant::now();
    let seeded = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut db = rusqlite::Connection::open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        db.busy_timeout(std::time::Duration::from_secs(30))?;
        // A fixture: the last batch may be lost on a crash, and the benchmark starts over.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let now = SystemClock.now();
        let mut i = 0u64;
        while i < count {
            let end = (i + batch.max(1)).min(count);
            let tx = db.transaction()?;
            {
                let mut user = tx.prepare_cached(
                    "INSERT INTO users (id, username, password_hash, role, created_at) \
                     VALUES (?1, ?2, NULL, 'user', ?3)",
                )?;
                let mut account = tx.prepare_cached(
                    "INSERT INTO connected_accounts (id, user_id, connection_id, upstream_account_id, \
                     scopes, access_token, access_expires_at, refresh_token, status, created_at, \
                     updated_at, last_used_at, last_refreshed_at, token_version) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, 'active', ?8, ?8, NULL, ?8, 1)",
                )?;
                for n in i..end {
                    let user_id = format!("usr_bench_{n}");
                    let account_id = format!("acc_bench_{n}");
                    let token = latchkey_crypto::secrets::random_token(24);
                    let sealed = vault
                        .keys
                        .seal(account_slot(&account_id, "access_token"), token.as_bytes());
                    user.execute(rusqlite::params![user_id, format!("bench-{n}"), now])?;
                    account.execute(rusqlite::params![
                        account_id,
                        user_id,
                        conn.id,
                        format!("bench-upstream-{n}"),
                        scopes,
                        sealed,
                        now + expires_in,
                        now,
                    ])?;
                }
            }
            tx.commit()?;
            i = end;
        }
        Ok(i)
    })
    .await
    .context("the seeding thread failed")??;
    println!(
        "{}",
        serde_json::json!({
            "seeded": seeded,
            "seconds": started.elapsed().as_secs_f64(),
            "connection": connection,
            "users": "usr_bench_{i}",
        })
    );
    Ok(())
}
