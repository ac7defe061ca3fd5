//! `latchkey`: the server, the demo, administration of the configured store, and the
//! agent-side `token` command — one binary.

mod backup;
mod bench;
mod mcp;
mod migrate;
mod token;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use latchkey_core::clock::SystemClock;
use latchkey_core::model::Role;
use latchkey_core::policy::{GrantPolicy, Quotas};
use latchkey_core::scope::Scopes;
use latchkey_core::vault::{Actor, NewConnection};
use latchkey_core::{Vault, catalog};
use latchkey_crypto::jws::PublicKey;
use latchkey_server::{Config, ServeOptions, Server, demo};
use secrecy::SecretString;

/// glibc's allocator spent about a tenth of the exchange's CPU in `malloc`/`free` (many small,
/// short-lived allocations across threads); mimalloc is built for that pattern.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "latchkey",
    version,
    about = "A self-hosted token vault for AI agents",
    after_help = "Examples:\n  latchkey demo    # try it: HTTPS on 127.0.0.1:8750 with a demo provider\n  latchkey serve --data-dir /var/lib/latchkey\n  latchkey agent add bot --public-key bot.pub.pem --json"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Global {
    /// Configuration file (default: ./latchkey.toml when present).
    #[arg(long, global = true, env = "LATCHKEY_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, keys, certificates). Overrides the configuration.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    #[command(
        after_help = "Example:\n  latchkey serve --listen 0.0.0.0:8750 --data-dir /var/lib/latchkey"
    )]
    Serve(ServeArgs),
    /// Run the server with the built-in demo provider, a demo user, connection and agent.
    #[command(after_help = "Example:\n  latchkey demo")]
    Demo(ServeArgs),
    /// Manage users.
    #[command(
        subcommand,
        after_help = "Example:\n  echo 'a long password' | latchkey user add alice"
    )]
    User(UserCmd),
    /// Manage connections (upstream providers).
    #[command(
        subcommand,
        after_help = "Example:\n  latchkey connection add demo-git --provider demo"
    )]
    Connection(ConnectionCmd),
    /// Manage agents and their grants.
    #[command(
        subcommand,
        after_help = "Example:\n  latchkey agent grant agt_… --connection demo-git --scopes repo:read"
    )]
    Agent(AgentCmd),
    /// Manage apps: clients whose users sign in through Latchkey (OpenID Connect).
    #[command(
        subcommand,
        after_help = "Example:\n  latchkey app add notes-app --redirect-uri https://notes.example/callback --json"
    )]
    App(AppCmd),
    /// Inspect and revoke connected accounts.
    #[command(
        subcommand,
        after_help = "Example:\n  latchkey account list --user alice"
    )]
    Account(AccountCmd),
    /// Manage encryption keys.
    #[command(subcommand, after_help = "Example:\n  latchkey key rotate")]
    Key(KeyCmd),
    /// Verify, checkpoint and export the tamper-evident audit trail.
    #[command(
        subcommand,
        after_help = "Examples:\n  latchkey audit checkpoint --out /mnt/offsite/latchkey-checkpoint.json\n  latchkey audit verify --checkpoint /mnt/offsite/latchkey-checkpoint.json\n  latchkey audit export --after 1000 > audit.jsonl"
    )]
    Audit(AuditCmd),
    /// See and decide approval requests (CIBA requests, exchanges held for the user).
    #[command(
        subcommand,
        after_help = "Examples:\n  latchkey approvals list\n  latchkey approvals approve apr_…\n  latchkey approvals deny apr_… --note 'not expected'"
    )]
    Approvals(ApprovalsCmd),
    /// Manage bearer tokens for the admin API (`/api/v1`).
    #[command(
        subcommand,
        name = "api-token",
        after_help = "Example:\n  TOKEN=$(latchkey api-token create ci)\n  curl -H \"Authorization: Bearer $TOKEN\" https://127.0.0.1:8750/api/v1/accounts"
    )]
    ApiToken(ApiTokenCmd),
    /// Agent side: sign a privileged-worker request with a key file and print the upstream token.
    #[command(
        after_help = "Example:\n  TOKEN=$(latchkey token --issuer https://127.0.0.1:8750/ --ca-cert latchkey-data/tls/ca.pem \\\n      --client-id agt_… --key latchkey-data/demo-agent.key --user usr_… --connection demo-git)"
    )]
    Token(token::TokenArgs),
    /// Agent side: Latchkey's MCP server on stdio (a bridge to the server's /mcp, holding only
    /// the agent's key). Point an MCP client's "command" at it.
    #[command(
        after_help = "Example (an MCP client's server entry):\n  latchkey mcp --issuer https://127.0.0.1:8750/ --ca-cert latchkey-data/tls/ca.pem \\\n      --client-id agt_… --key latchkey-data/demo-agent.key --user demo"
    )]
    Mcp(mcp::McpArgs),
    /// Move a deployment from its SQLite file to an empty PostgreSQL database, verifying the
    /// audit chain before and after (uses this deployment's key file).
    #[command(
        after_help = "Example:\n  latchkey migrate --from sqlite:latchkey-data/latchkey.db --to postgres://latchkey@db.internal/latchkey"
    )]
    Migrate(migrate::MigrateArgs),
    /// Write an online, consistent backup of the SQLite database (safe while the server runs),
    /// verified before it is kept. The key file is not in it: back that up separately.
    #[command(
        after_help = "Example:\n  latchkey backup --out /var/backups/latchkey/latchkey-$(date +%F).db\n\nRestore: stop the server, put the file back as {data_dir}/latchkey.db (remove any\nlatchkey.db-wal and latchkey.db-shm beside it), keep the same key file, start."
    )]
    Backup(backup::BackupArgs),
    /// Helpers for the load benchmarks in bench/ (not a stable interface).
    #[command(subcommand, hide = true)]
    Bench(bench::BenchCmd),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:8750).
    #[arg(long)]
    listen: Option<String>,
    /// Serve plain HTTP, for running behind a TLS-terminating proxy.
    #[arg(long)]
    http: bool,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a user. The password is read from standard input (one line) unless --no-password.
    #[command(after_help = "Example:\n  echo 'correct horse battery' | latchkey user add alice")]
    Add {
        username: String,
        /// Create the user without a password (cannot sign in until `user passwd`).
        #[arg(long)]
        no_password: bool,
        /// Make the user an operator: in the dashboard they manage agents, connections and
        /// users (a user sees only their own accounts, approvals and activity).
        #[arg(long)]
        operator: bool,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Set a user's role in the dashboard: `operator` (manages agents, connections and users)
    /// or `user` (sees only their own accounts, approvals and activity).
    #[command(
        after_help = "Examples:\n  latchkey user role alice operator\n  latchkey user role alice user"
    )]
    Role {
        /// The user's id or username.
        user: String,
        /// The new role.
        role: RoleArg,
    },
    /// Set up, confirm or remove a user's second factor (TOTP, any authenticator app).
    #[command(
        after_help = "Examples:\n  latchkey user mfa alice                   # prints an otpauth:// URI for the authenticator app\n  \
        latchkey user mfa alice --confirm 123456  # the app's current code turns it on\n  latchkey user mfa alice --disable"
    )]
    Mfa {
        user: String,
        /// A current code from the authenticator, to finish enrolment.
        #[arg(long, conflicts_with = "disable")]
        confirm: Option<String>,
        /// Remove the second factor.
        #[arg(long)]
        disable: bool,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Set a user's password (read from standard input).
    #[command(after_help = "Example:\n  echo 'new password here' | latchkey user passwd alice")]
    Passwd { user: String },
    /// Delete a user and everything that is theirs; their connected accounts are revoked at
    /// the providers first.
    #[command(after_help = "Example:\n  latchkey user delete alice")]
    Delete { user: String },
    /// List users.
    #[command(after_help = "Example:\n  latchkey user list --json")]
    List {
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
}

/// A role as the command line names it.
#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    User,
    Operator,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::User => Role::User,
            RoleArg::Operator => Role::Operator,
        }
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum ConnectionCmd {
    /// Register an upstream provider: from the catalog (`connection providers`), by OpenID
    /// discovery (`--provider oidc --issuer`), or with explicit endpoints (`--provider oauth2`).
    #[command(after_help = "Examples:\n  \
        latchkey connection add github --provider github --client-id Iv1.abc --client-secret-file github.secret\n  \
        latchkey connection add gmail --provider google --client-id 123.apps.googleusercontent.com \\\n      \
        --client-secret-file google.secret --scopes 'openid email https://www.googleapis.com/auth/gmail.readonly'\n  \
        latchkey connection add corp --provider oidc --issuer https://login.example.com/realms/corp \\\n      \
        --client-id latchkey --client-secret-file corp.secret\n  \
        latchkey connection add internal --provider oauth2 --authorize-url https://idp.example/authorize \\\n      \
        --token-url https://idp.example/token --client-id latchkey --client-secret-file idp.secret --scopes 'read write'\n  \
        latchkey connection add demo-git --provider demo")]
    Add {
        name: String,
        /// A catalog provider (github, google, …; see `connection providers`), `oidc` (endpoints
        /// discovered from --issuer), `oauth2` (endpoints given below) or `demo` (built in).
        #[arg(long, default_value = "oauth2")]
        provider: String,
        /// OpenID issuer URL (`--provider oidc`): endpoints come from its discovery document.
        #[arg(long)]
        issuer: Option<String>,
        /// Authorization endpoint (required for `oauth2`; overrides the catalog's).
        #[arg(long)]
        authorize_url: Option<String>,
        /// Token endpoint (required for `oauth2`; overrides the catalog's).
        #[arg(long)]
        token_url: Option<String>,
        /// RFC 7009 revocation endpoint (overrides the catalog's).
        #[arg(long)]
        revoke_url: Option<String>,
        /// Where to read the user's id at the provider (overrides the catalog's).
        #[arg(long)]
        userinfo_url: Option<String>,
        /// The provider's API base URL (overrides the catalog's).
        #[arg(long)]
        api_base_url: Option<String>,
        /// The client id Latchkey was registered with at the provider.
        #[arg(long)]
        client_id: Option<String>,
        /// File holding the upstream client secret (or set LATCHKEY_CLIENT_SECRET).
        #[arg(long)]
        client_secret_file: Option<PathBuf>,
        /// Scopes requested when a user connects (space- or comma-separated). Replaces the
        /// provider's default scopes; its offline-access scopes are always added.
        #[arg(long, default_value = "")]
        scopes: String,
        /// Refresh idle accounts at least every this many days, for providers that revoke
        /// refresh tokens left unused (default from the catalog: Google and Microsoft 30).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        keep_alive_days: Option<u32>,
    },
    /// List the providers Latchkey knows: endpoints, default scopes and quirks come from its
    /// catalog, so `connection add --provider NAME` needs only client credentials.
    #[command(
        after_help = "Examples:\n  latchkey connection providers\n  latchkey connection providers --json | jq '.[] | select(.name == \"google\")'"
    )]
    Providers {
        /// Print the whole catalog as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// List connections.
    #[command(after_help = "Example:\n  latchkey connection list")]
    List {
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AppCmd {
    /// Register an app. Confidential apps get a client secret (printed once); public apps
    /// (single-page, mobile) rely on PKCE alone. Use `agent grant` to let an app use the vault.
    #[command(
        after_help = "Examples:\n  latchkey app add notes-app --redirect-uri https://notes.example/callback --json\n  \
        latchkey app add notes-spa --public --redirect-uri http://127.0.0.1:3000/callback\n  \
        latchkey app add notes-api --resource-server https://api.notes.example --json"
    )]
    Add {
        name: String,
        /// Exact redirect URI (https, or http on loopback); repeat for several.
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        /// A public app: no client secret.
        #[arg(long)]
        public: bool,
        /// Rotate refresh tokens on use (leave off for apps that exchange them at the vault).
        #[arg(long)]
        rotate_refresh_tokens: bool,
        /// The API identifier this client serves (lets it exchange users' access tokens).
        #[arg(long)]
        resource_server: Option<String>,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Register an agent with public keys (PEM or JWK files) and/or a generated client secret.
    #[command(
        after_help = "Example:\n  latchkey agent add nightly-bot --public-key bot.pub.pem --json"
    )]
    Add {
        name: String,
        /// Public key file (PEM `PUBLIC KEY` or a JWK); repeat for several keys.
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
        /// Algorithm of the keys: RS256, PS256, ES256, EdDSA (default: from the key type; RSA → RS256).
        #[arg(long)]
        alg: Option<String>,
        /// Also generate a client secret (printed once).
        #[arg(long)]
        secret: bool,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Allow an agent scopes on a connection, with its policy (replaces an earlier grant for
    /// that connection whole: flags left out are unset). See docs/policy.md.
    #[command(
        after_help = "Examples:\n  latchkey agent grant agt_… --connection demo-git --scopes 'repo:read issues:write'\n  \
        latchkey agent grant agt_… --connection github --scopes 'repo read:user' --risk repo=critical \\\n      \
        --hours 'mon-fri 09:00-18:00 Europe/Berlin' --max-lifetime 600 --per-minute 10 --user-per-day 200"
    )]
    Grant {
        agent: String,
        #[arg(long)]
        connection: String,
        #[arg(long)]
        scopes: String,
        /// Allowed client address or CIDR block; repeat for several. Default: any.
        #[arg(long = "ip")]
        ip_allowlist: Vec<String>,
        /// A scope's risk level for this grant, replacing the catalog's: SCOPE=LEVEL with LEVEL
        /// low, medium (needs the user's approval), high (approval after a recent second
        /// factor) or critical (the same, each approval single use). Repeat for several.
        #[arg(long = "risk", value_name = "SCOPE=LEVEL")]
        risks: Vec<String>,
        /// When the grant may be used: 'DAYS HH:MM-HH:MM ZONE', e.g. 'mon-fri 09:00-18:00
        /// Europe/Berlin' (an IANA zone; an end before the start runs past midnight). Repeat
        /// for several windows. Default: any time.
        #[arg(long = "hours", value_name = "WINDOW")]
        hours: Vec<String>,
        /// Cap on the token lifetime Latchkey reports (`expires_in`), in seconds (1–86400).
        #[arg(long, value_name = "SECONDS")]
        max_lifetime: Option<i64>,
        /// Exchanges this agent may make on the connection per minute (all users).
        #[arg(long, value_name = "N")]
        per_minute: Option<u32>,
        /// Exchanges this agent may make on the connection per day (UTC).
        #[arg(long, value_name = "N")]
        per_day: Option<u32>,
        /// Exchanges per minute for one user on the connection, counted across every grant
        /// with a per-user quota.
        #[arg(long, value_name = "N")]
        user_per_minute: Option<u32>,
        /// Exchanges per day (UTC) for one user on the connection, as --user-per-minute.
        #[arg(long, value_name = "N")]
        user_per_day: Option<u32>,
        /// Let the MCP server's `get_access_token` tool hand this agent the raw upstream
        /// token (off by default: MCP agents call the API through Latchkey instead).
        #[arg(long)]
        allow_token_tool: bool,
    },
    /// Remove an agent's (or app's) grant for a connection.
    #[command(after_help = "Example:\n  latchkey agent ungrant agt_… --connection demo-git")]
    Ungrant {
        agent: String,
        #[arg(long)]
        connection: String,
    },
    /// Disable an agent (or app): it cannot authenticate any more, so none of its grants works.
    #[command(after_help = "Example:\n  latchkey agent disable agt_…")]
    Disable { agent: String },
    /// Enable a disabled agent (or app) again.
    #[command(after_help = "Example:\n  latchkey agent enable agt_…")]
    Enable { agent: String },
    /// List agents.
    #[command(after_help = "Example:\n  latchkey agent list --json")]
    List {
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AccountCmd {
    /// List connected accounts.
    #[command(after_help = "Example:\n  latchkey account list --user demo")]
    List {
        /// Only this user's accounts (id or username).
        #[arg(long)]
        user: Option<String>,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Revoke a connected account: the very next exchange fails; the provider is asked to
    /// revoke the refresh token too.
    #[command(after_help = "Example:\n  latchkey account revoke cac_…")]
    Revoke {
        /// The connected account id (`cac_…`, see `account list`).
        account: String,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Start a new data key and re-encrypt every stored secret with it (safe while serving).
    /// With --kek, also replace the key-encryption key file and re-wrap the data keys.
    #[command(
        after_help = "Examples:\n  latchkey key rotate\n  latchkey key rotate --kek\n  latchkey key rotate --signing"
    )]
    Rotate {
        /// Also replace the key-encryption key file and re-wrap the data keys.
        #[arg(long, conflicts_with = "signing")]
        kek: bool,
        /// Rotate Latchkey's token-signing key instead: the new key signs, the old one stays in
        /// the JWKS (and valid) until the next rotation. Running servers pick it up within a minute.
        #[arg(long)]
        signing: bool,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the MAC chain from the first entry to the last, and every checkpoint; names the
    /// first missing, altered, moved or forged entry and exits 1 if there is one.
    Verify {
        /// A checkpoint exported earlier (kept off this machine): also catches a truncated tail.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Sign a checkpoint of the chain's head now and print it (JSON), or write it to a file.
    Checkpoint {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print entries as JSON Lines, oldest first.
    Export {
        /// Only entries with a sequence number above this.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// List approval requests, newest first (default: the pending ones).
    #[command(
        after_help = "Examples:\n  latchkey approvals list\n  latchkey approvals list --all --user alice --json"
    )]
    List {
        /// Only this user's requests (id or username).
        #[arg(long)]
        user: Option<String>,
        /// Every status, not only pending requests.
        #[arg(long)]
        all: bool,
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending request as the operator (recorded as yours; no step-up).
    #[command(after_help = "Example:\n  latchkey approvals approve apr_…")]
    Approve {
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        note: Option<String>,
    },
    /// Deny a pending request: the agent's next poll gets `access_denied`.
    #[command(after_help = "Example:\n  latchkey approvals deny apr_… --note 'not expected'")]
    Deny {
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand)]
enum ApiTokenCmd {
    /// Create a token and print it (once: only its HMAC is stored).
    Create { name: String },
    /// List tokens: name, created, last used, revoked.
    List {
        /// Print JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by name: the next request with it is refused.
    Revoke { name: String },
}

fn load_config(global: &Global, serve: Option<&ServeArgs>) -> Result<Config> {
    let mut config = Config::load(global.config.as_deref()).context("loading configuration")?;
    if let Some(d) = &global.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(s) = serve {
        if let Some(l) = &s.listen {
            config.listen = l.clone();
        }
        config.http |= s.http;
    }
    Ok(config)
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The vault as administrative commands see it (same database and keys as the server).
async fn admin_vault(config: &Config) -> Result<Arc<Vault>> {
    let issuer = config.public_url.clone().unwrap_or_else(|| {
        format!(
            "{}://{}/",
            if config.http { "http" } else { "https" },
            config.listen
        )
    });
    // Trust Latchkey's own local CA, so revocation reaches the built-in demo provider.
    let local_ca = std::fs::read(config.data_dir.join("tls").join("ca.pem")).ok();
    latchkey_server::open_vault(config, &issuer, Arc::new(SystemClock), local_ca).await
}

fn read_password() -> Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let p = line.trim_end_matches(['\n', '\r']).to_owned();
    if p.is_empty() {
        bail!("no password on standard input (pipe it in, or use --no-password)");
    }
    Ok(p)
}

fn self_command() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.to_str().map(str::to_owned))
        .filter(|p| !p.contains(' '))
        .unwrap_or_else(|| "latchkey".into())
}

async fn serve(global: &Global, args: &ServeArgs, demo_mode: bool) -> Result<()> {
    let config = load_config(global, Some(args))?;
    init_logging(&config.log);
    let server = Server::bind(
        &config,
        ServeOptions {
            demo: demo_mode,
            ..Default::default()
        },
    )
    .await?;
    println!(
        "Latchkey is listening on {} (issuer {})",
        server.local_addr(),
        server.issuer
    );
    if let Some(ca) = &server.ca_path {
        let ca = std::fs::canonicalize(ca).unwrap_or(ca.clone());
        println!(
            "HTTPS uses a local CA. Trust it with:\n  export SSL_CERT_FILE={ca}    # curl, Rust, many tools (curl also: --cacert {ca})\n  \
             export REQUESTS_CA_BUNDLE={ca}    # Python requests\n  export NODE_EXTRA_CA_CERTS={ca}    # Node.js",
            ca = ca.display()
        );
    }
    if demo_mode {
        let info = demo::seed(&server.vault, &config.data_dir).await?;
        print_walkthrough(&server, &info);
    }
    // SIGINT (Ctrl-C) and SIGTERM (systemd, container runtimes) both stop it gracefully.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    };
    server.run(shutdown).await
}

fn print_walkthrough(server: &Server, info: &demo::DemoInfo) {
    let me = self_command();
    let issuer = &server.issuer;
    let ca = server
        .ca_path
        .as_ref()
        .map(|p| {
            std::fs::canonicalize(p)
                .unwrap_or(p.clone())
                .display()
                .to_string()
        })
        .unwrap_or_default();
    let cacert = if ca.is_empty() {
        String::new()
    } else {
        format!(" --ca-cert {ca}")
    };
    let curl_ca = if ca.is_empty() {
        String::new()
    } else {
        format!(" --cacert {ca}")
    };
    println!(
        "\nDemo ready. Walkthrough:\n\
         1. Connect the demo account: open {issuer}connect/{conn}\n   sign in as `{user}` with password `{pw}`, then press Approve on the demo provider's page.\n\
         2. Act as the agent: fetch a short-lived token for that user and call the demo API with it:\n   \
         TOKEN=$({me} token --issuer {issuer}{cacert} --client-id {agent} --key {key} --user {uid} --connection {conn} --audit-context 'demo walkthrough')\n   \
         curl{curl_ca} -H \"Authorization: Bearer $TOKEN\" {issuer}demo/api/user\n\
         3. Revoke it: {me} account list, then {me} account revoke <id>; step 2 now fails with federated_connection_refresh_token_not_found.\n",
        conn = info.connection,
        user = info.username,
        pw = info.password,
        agent = info.agent_id,
        key = info.agent_key.display(),
        uid = info.user_id,
    );
}

/// `latchkey connection providers`: the catalog, plus the generic providers.
fn print_providers(json: bool) {
    if json {
        print_json(&serde_json::json!(catalog::providers()));
        return;
    }
    for p in catalog::providers() {
        let scopes: Vec<&str> = p
            .default_scopes
            .iter()
            .chain(&p.offline_scopes)
            .map(String::as_str)
            .collect();
        let scopes = if scopes.is_empty() {
            "(no scopes)".to_owned()
        } else {
            scopes.join(" ")
        };
        println!("{:<11} {:<30} {scopes}", p.name, p.display_name);
    }
    println!(
        "\nGeneric: oidc (--issuer URL: endpoints by OpenID discovery), oauth2 (--authorize-url and \
         --token-url), demo (the built-in demo provider).\n\
         Details and caveats per provider: latchkey connection providers --json"
    );
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Serve(args) => serve(g, &args, false).await,
        Command::Demo(args) => serve(g, &args, true).await,
        Command::Token(args) => token::run(args).await,
        Command::Mcp(args) => mcp::run(args).await,
        Command::Migrate(args) => {
            let config = load_config(g, None)?;
            init_logging("warn");
            migrate::run(&config, args).await
        }
        Command::Backup(args) => {
            let config = load_config(g, None)?;
            init_logging("warn");
            backup::run(&config, args).await
        }
        Command::Bench(bench::BenchCmd::VerifyCost { iterations }) => {
            bench::verify_cost(iterations)
        }
        Command::Bench(bench::BenchCmd::SeedAccounts {
            connection,
            count,
            scopes,
            expires_in,
            batch,
        }) => {
            let config = load_config(g, None)?;
            init_logging("warn");
            let vault = admin_vault(&config).await?;
            bench::seed_accounts(
                &config,
                vault,
                &connection,
                count,
                &scopes,
                expires_in,
                batch,
            )
            .await
        }
        Command::Connection(ConnectionCmd::Providers { json }) => {
            print_providers(json);
            Ok(())
        }
        other => {
            let config = load_config(g, None)?;
            init_logging("warn");
            let vault = admin_vault(&config).await?;
            admin(&vault, &config, other).await
        }
    }
}

async fn admin(vault: &Vault, config: &Config, command: Command) -> Result<()> {
    let actor = Actor::cli();
    match command {
        Command::User(UserCmd::Add {
            username,
            no_password,
            operator,
            json,
        }) => {
            let password = if no_password {
                None
            } else {
                Some(read_password()?)
            };
            let role = if operator { Role::Operator } else { Role::User };
            let u = vault
                .add_user(&username, password.as_deref(), role, &actor)
                .await?;
            if json {
                print_json(&serde_json::json!({
                    "id": u.id, "username": u.username, "role": u.role.as_str(),
                }));
            } else {
                println!("created {} {} ({})", u.role.as_str(), u.username, u.id);
            }
        }
        Command::User(UserCmd::Role { user, role }) => {
            let u = vault.set_user_role(&user, role.into(), &actor).await?;
            println!(
                "role of {} ({}) set to {}",
                u.username,
                u.id,
                u.role.as_str()
            );
        }
        Command::User(UserCmd::Passwd { user }) => {
            let u = vault.set_password(&user, &read_password()?, &actor).await?;
            println!("password set for {} ({})", u.username, u.id);
        }
        Command::User(UserCmd::Mfa {
            user,
            confirm,
            disable,
            json,
        }) => {
            if disable {
                vault.totp_disable(&user, &actor).await?;
                println!("second factor removed for {user}");
            } else if let Some(code) = confirm {
                vault.totp_confirm(&user, &code, &actor).await?;
                println!("second factor enabled for {user}: sign-in now asks for a code");
            } else {
                let uri = vault.totp_enrol(&user, &actor).await?;
                if json {
                    print_json(&serde_json::json!({ "otpauth_uri": uri }));
                } else {
                    println!(
                        "Add this to an authenticator app (most can scan it as a QR code):\n  {uri}\n\
                         Then turn it on with the app's current code:\n  latchkey user mfa {user} --confirm <code>"
                    );
                }
            }
        }
        Command::User(UserCmd::Delete { user }) => {
            let revoked = vault.delete_user(&user, &actor).await?;
            println!("deleted {user}; {revoked} connected account(s) revoked at their providers");
        }
        Command::User(UserCmd::List { json }) => {
            let users = vault.store().list_users().await?;
            if json {
                print_json(&serde_json::json!(
                    users
                        .iter()
                        .map(|u| serde_json::json!({
                            "id": u.id, "username": u.username, "role": u.role.as_str(),
                        }))
                        .collect::<Vec<_>>()
                ));
            } else {
                for u in users {
                    println!("{}\t{}\t{}", u.id, u.username, u.role.as_str());
                }
            }
        }
        Command::Connection(ConnectionCmd::Add {
            name,
            provider,
            issuer,
            authorize_url,
            token_url,
            revoke_url,
            userinfo_url,
            api_base_url,
            client_id,
            client_secret_file,
            scopes,
            keep_alive_days,
        }) => {
            if issuer.is_some() != (provider == catalog::OIDC) {
                bail!("--issuer goes with --provider oidc, and --provider oidc needs --issuer");
            }
            let new = if provider == catalog::DEMO {
                demo::demo_connection(vault, &name).await?
            } else {
                let secret = match (
                    client_secret_file,
                    std::env::var("LATCHKEY_CLIENT_SECRET").ok(),
                ) {
                    (Some(f), _) => Some(
                        std::fs::read_to_string(&f)
                            .with_context(|| format!("reading {}", f.display()))?
                            .trim()
                            .to_owned(),
                    ),
                    (None, s) => s,
                };
                let mut new = NewConnection {
                    name,
                    provider,
                    client_id: client_id.context("--client-id is required")?,
                    client_secret: secret.map(SecretString::from),
                    authorize_url: authorize_url.unwrap_or_default(),
                    token_url: token_url.unwrap_or_default(),
                    revoke_url,
                    userinfo_url,
                    api_base_url,
                    issuer: None,
                    scopes: Scopes::parse(&scopes),
                    keep_alive_secs: keep_alive_days.map(|d| i64::from(d) * 86_400),
                };
                if let Some(issuer) = issuer {
                    if !new.authorize_url.is_empty()
                        || !new.token_url.is_empty()
                        || new.revoke_url.is_some()
                        || new.userinfo_url.is_some()
                    {
                        bail!(
                            "--provider oidc takes its endpoints from --issuer's discovery document"
                        );
                    }
                    let found = vault.discover_oidc(&issuer).await?;
                    new.issuer = Some(issuer.clone());
                    new.authorize_url = found.authorize_url;
                    new.token_url = found.token_url;
                    new.revoke_url = found.revoke_url;
                    new.userinfo_url = found.userinfo_url;
                    if new.scopes.is_empty() {
                        new.scopes = found.default_scopes;
                    }
                } else if new.provider == catalog::GENERIC
                    && (new.authorize_url.is_empty() || new.token_url.is_empty())
                {
                    bail!(
                        "--provider oauth2 needs --authorize-url and --token-url \
                         (or pick a catalog provider: `latchkey connection providers`)"
                    );
                }
                new
            };
            let c = vault.add_connection(new, &actor).await?;
            println!(
                "created connection {} ({}, provider {}, scopes `{}`)",
                c.name, c.id, c.provider, c.scopes
            );
        }
        Command::Connection(ConnectionCmd::List { json }) => {
            let list = vault.store().list_connections().await?;
            if json {
                print_json(&serde_json::json!(list
                    .iter()
                    .map(|c| serde_json::json!({"id": c.id, "name": c.name, "provider": c.provider, "scopes": c.scopes.to_string_spaced()}))
                    .collect::<Vec<_>>()));
            } else {
                for c in list {
                    println!("{}\t{}\t{}\t{}", c.id, c.name, c.provider, c.scopes);
                }
            }
        }
        Command::App(AppCmd::Add {
            name,
            redirect_uris,
            public,
            rotate_refresh_tokens,
            resource_server,
            json,
        }) => {
            let (app, secret) = vault
                .add_client(
                    latchkey_core::vault::NewClient {
                        name,
                        with_secret: !public,
                        redirect_uris,
                        public_client: public,
                        rotate_refresh_tokens,
                        resource_server,
                        ..Default::default()
                    },
                    &actor,
                )
                .await?;
            let secret = secret.map(|s| secrecy::ExposeSecret::expose_secret(&s).to_owned());
            if json {
                print_json(&serde_json::json!({
                    "client_id": app.id, "name": app.name, "client_secret": secret,
                    "redirect_uris": app.redirect_uris, "public": app.public_client,
                }));
            } else {
                println!("created app {} with client id {}", app.name, app.id);
                if let Some(s) = secret {
                    println!("client secret (shown once, stored only as a hash): {s}");
                }
            }
        }
        Command::Agent(AgentCmd::Add {
            name,
            public_keys,
            alg,
            secret,
            json,
        }) => {
            let alg = match alg.as_deref() {
                None => None,
                Some(a) => Some(
                    a.parse::<latchkey_crypto::Algorithm>()
                        .map_err(|_| anyhow::anyhow!("unknown algorithm `{a}`"))?,
                ),
            };
            let mut keys = Vec::new();
            for path in &public_keys {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                keys.push(
                    PublicKey::parse(&text, alg, None)
                        .with_context(|| format!("{}", path.display()))?,
                );
            }
            let (agent, secret) = vault.add_agent(&name, &keys, secret, &actor).await?;
            let secret = secret.map(|s| secrecy::ExposeSecret::expose_secret(&s).to_owned());
            if json {
                print_json(&serde_json::json!({
                    "client_id": agent.id, "name": agent.name,
                    "kids": keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(),
                    "client_secret": secret,
                }));
            } else {
                println!("created agent {} with client id {}", agent.name, agent.id);
                if let Some(s) = secret {
                    println!("client secret (shown once, stored only as a hash): {s}");
                }
            }
        }
        Command::Agent(AgentCmd::Grant {
            agent,
            connection,
            scopes,
            ip_allowlist,
            risks,
            hours,
            max_lifetime,
            per_minute,
            per_day,
            user_per_minute,
            user_per_day,
            allow_token_tool,
        }) => {
            let mut policy = GrantPolicy {
                max_lifetime,
                token_tool: allow_token_tool,
                quotas: Quotas {
                    agent_per_minute: per_minute,
                    agent_per_day: per_day,
                    user_per_minute,
                    user_per_day,
                },
                ..GrantPolicy::default()
            };
            for r in &risks {
                let (scope, level) = latchkey_core::policy::parse_risk_override(r)?;
                if policy.risk.insert(scope.clone(), level).is_some() {
                    bail!("--risk names `{scope}` twice");
                }
            }
            for h in &hours {
                policy
                    .hours
                    .push(latchkey_core::policy::TimeWindow::parse(h)?);
            }
            let g = vault
                .grant_with_policy(
                    &agent,
                    &connection,
                    Scopes::parse(&scopes),
                    ip_allowlist,
                    policy,
                    &actor,
                )
                .await?;
            println!("granted {} on {connection}: {}", g.agent_id, g.scopes);
            if g.policy != GrantPolicy::default() {
                println!("policy: {}", g.policy.to_json());
            }
        }
        Command::Agent(AgentCmd::Ungrant { agent, connection }) => {
            vault.remove_grant(&agent, &connection, &actor).await?;
            println!("removed the grant of {agent} on {connection}");
        }
        Command::Agent(AgentCmd::Disable { agent }) => {
            vault.set_agent_disabled(&agent, true, &actor).await?;
            println!("disabled {agent}");
        }
        Command::Agent(AgentCmd::Enable { agent }) => {
            vault.set_agent_disabled(&agent, false, &actor).await?;
            println!("enabled {agent}");
        }
        Command::Agent(AgentCmd::List { json }) => {
            let list = vault.store().list_agents().await?;
            let grants = vault.store().list_grants().await?;
            let connections = vault.store().list_connections().await?;
            let conn_name = |id: &str| {
                connections
                    .iter()
                    .find(|c| c.id == id)
                    .map_or_else(|| id.to_owned(), |c| c.name.clone())
            };
            let grants_of = |agent: &str| {
                grants
                    .iter()
                    .filter(|g| g.agent_id == agent)
                    .collect::<Vec<_>>()
            };
            if json {
                print_json(&serde_json::json!(
                    list.iter()
                        .map(|a| serde_json::json!({
                            "client_id": a.id, "name": a.name, "disabled": a.disabled,
                            "grants": grants_of(&a.id).into_iter().map(|g| serde_json::json!({
                                "connection": conn_name(&g.connection_id),
                                "scopes": g.scopes.to_string_spaced(),
                                "ip_allowlist": g.ip_allowlist,
                                "policy": g.policy,
                            })).collect::<Vec<_>>(),
                        }))
                        .collect::<Vec<_>>()
                ));
            } else {
                for a in &list {
                    println!(
                        "{}\t{}{}",
                        a.id,
                        a.name,
                        if a.disabled { "\t(disabled)" } else { "" }
                    );
                    for g in grants_of(&a.id) {
                        let policy = if g.policy == GrantPolicy::default() {
                            String::new()
                        } else {
                            format!("\tpolicy {}", g.policy.to_json())
                        };
                        println!(
                            "  grant\t{}\t{}{policy}",
                            conn_name(&g.connection_id),
                            g.scopes
                        );
                    }
                }
            }
        }
        Command::Account(AccountCmd::List { user, json }) => {
            let user_id = match user {
                Some(u) => Some(vault.find_user(&u).await?.id),
                None => None,
            };
            let connections = vault.store().list_connections().await?;
            let name = |id: &str| {
                connections
                    .iter()
                    .find(|c| c.id == id)
                    .map(|c| c.name.clone())
                    .unwrap_or_default()
            };
            let list = vault.store().list_accounts(user_id.as_deref()).await?;
            if json {
                print_json(&serde_json::json!(list
                    .iter()
                    .map(|a| serde_json::json!({
                        "id": a.id, "user_id": a.user_id, "connection": name(&a.connection_id),
                        "upstream_account_id": a.upstream_account_id, "scopes": a.scopes.to_string_spaced(),
                        "status": a.status.as_str(), "status_reason": a.status_reason,
                        "last_used_at": a.last_used_at, "last_refreshed_at": a.last_refreshed_at,
                    }))
                    .collect::<Vec<_>>()));
            } else {
                for a in list {
                    let reason = a
                        .status_reason
                        .as_deref()
                        .map(|r| format!("\t({r})"))
                        .unwrap_or_default();
                    println!(
                        "{}\t{}\t{}\t{}\t{}{reason}",
                        a.id,
                        a.user_id,
                        name(&a.connection_id),
                        a.status.as_str(),
                        a.scopes
                    );
                }
            }
        }
        Command::Account(AccountCmd::Revoke { account }) => {
            let outcome = vault.revoke_account(&account, &actor).await?;
            println!(
                "revoked {account}; the provider {}",
                if outcome.upstream_revoked {
                    "revoked its refresh token"
                } else {
                    "could not be asked to revoke (see logs)"
                }
            );
        }
        Command::Key(KeyCmd::Rotate { signing: true, .. }) => {
            let kid = vault.rotate_signing_key(&actor).await?;
            println!(
                "signing key {kid} is active; the previous key stays published until the next rotation"
            );
        }
        Command::Key(KeyCmd::Rotate { kek, .. }) => {
            if kek {
                rotate_kek(vault, config).await?;
            }
            let report = vault.rotate_data_key().await?;
            println!(
                "data key v{} is active; {} stored secrets re-encrypted",
                report.new_version, report.resealed
            );
        }
        Command::Audit(AuditCmd::Verify { checkpoint }) => {
            let extra = match checkpoint {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    Some(
                        serde_json::from_str::<latchkey_core::model::AuditCheckpoint>(&text)
                            .with_context(|| format!("{} is not a checkpoint", path.display()))?,
                    )
                }
                None => None,
            };
            match vault.verify_audit(extra.as_ref()).await? {
                Ok(v) => println!(
                    "audit chain ok: {} entries (last {}), {} checkpoint(s) verified",
                    v.entries,
                    v.last_seq.map_or("none".into(), |s| s.to_string()),
                    v.checkpoints
                ),
                Err(b) => {
                    eprintln!("audit chain BROKEN at entry {}: {}", b.seq, b.why);
                    std::process::exit(1);
                }
            }
        }
        Command::Audit(AuditCmd::Checkpoint { out }) => {
            let Some(cp) = vault.audit_checkpoint().await? else {
                bail!("the audit trail is empty: nothing to checkpoint");
            };
            let json = serde_json::to_string_pretty(&cp)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, format!("{json}\n"))
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!(
                        "checkpoint of entry {} written to {}",
                        cp.seq,
                        path.display()
                    );
                }
                None => println!("{json}"),
            }
        }
        Command::Audit(AuditCmd::Export { after }) => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut after = after;
            loop {
                let batch = vault.store().audit_range(after, 5_000).await?;
                let Some(last) = batch.last() else { break };
                after = last.seq;
                for e in &batch {
                    writeln!(
                        out,
                        "{}",
                        serde_json::to_string(&latchkey_core::audit::entry_view(e))?
                    )?;
                }
            }
            out.flush()?;
        }
        Command::Approvals(ApprovalsCmd::List { user, all, json }) => {
            let user_id = match user {
                Some(u) => Some(vault.find_user(&u).await?.id),
                None => None,
            };
            let list = vault
                .store()
                .list_approvals(&latchkey_core::store::ApprovalFilter {
                    user_id,
                    status: (!all).then_some(latchkey_core::model::ApprovalStatus::Pending),
                    limit: 500,
                })
                .await?;
            if json {
                print_json(&serde_json::json!(
                    list.iter()
                        .map(|a| vault.approval_json(a, None))
                        .collect::<Vec<_>>()
                ));
            } else {
                for a in list {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\trisk {}\t{}",
                        a.id,
                        a.status.as_str(),
                        a.client_id,
                        a.user_id,
                        a.connection.as_deref().unwrap_or("-"),
                        a.scopes,
                        a.risk,
                        a.binding_message.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Command::Approvals(ApprovalsCmd::Approve { id, note }) => {
            let a = vault
                .decide_approval(
                    &id,
                    latchkey_core::vault::ApprovalDecision::Approve,
                    note.as_deref(),
                    latchkey_core::vault::Decider::Operator(&actor),
                )
                .await?;
            println!("approved {} (until {})", a.id, a.expires_at);
        }
        Command::Approvals(ApprovalsCmd::Deny { id, note }) => {
            let a = vault
                .decide_approval(
                    &id,
                    latchkey_core::vault::ApprovalDecision::Deny,
                    note.as_deref(),
                    latchkey_core::vault::Decider::Operator(&actor),
                )
                .await?;
            println!("denied {}", a.id);
        }
        Command::ApiToken(ApiTokenCmd::Create { name }) => {
            let (_, secret) = vault.add_operator_token(&name, &actor).await?;
            println!("{}", secrecy::ExposeSecret::expose_secret(&secret));
        }
        Command::ApiToken(ApiTokenCmd::List { json }) => {
            let tokens = vault.store().list_operator_tokens().await?;
            if json {
                print_json(&serde_json::json!(
                    tokens
                        .iter()
                        .map(|t| serde_json::json!({
                            "id": t.id, "name": t.name, "created_at": t.created_at,
                            "last_used_at": t.last_used_at, "revoked_at": t.revoked_at,
                        }))
                        .collect::<Vec<_>>()
                ));
            } else {
                for t in tokens {
                    let state = if t.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!(
                        "{}\t{}\t{state}\tcreated {}\tlast used {}",
                        t.id,
                        t.name,
                        t.created_at,
                        t.last_used_at.map_or("never".into(), |t| t.to_string())
                    );
                }
            }
        }
        Command::ApiToken(ApiTokenCmd::Revoke { name }) => {
            vault.revoke_operator_token(&name, &actor).await?;
            println!("api token {name} revoked");
        }
        Command::Serve(_)
        | Command::Demo(_)
        | Command::Token(_)
        | Command::Mcp(_)
        | Command::Migrate(_)
        | Command::Backup(_)
        | Command::Bench(_)
        | Command::Connection(ConnectionCmd::Providers { .. }) => unreachable!("handled by run"),
    }
    Ok(())
}

/// Replace the KEK file: the new key is written beside the old one first, the data keys are
/// re-wrapped in one transaction, then the new file replaces the old. If the process dies in
/// between, `kek.new` holds the key the database now needs.
async fn rotate_kek(vault: &Vault, config: &Config) -> Result<()> {
    if config.kek.is_some() {
        bail!(
            "the KEK comes from LATCHKEY_KEK / LATCHKEY_KEK_FILE / the config file; rotate it where it is kept"
        );
    }
    let path = latchkey_server::kek::kek_path(config);
    let staged = path.with_extension("new");
    let new = latchkey_crypto::envelope::Kek::generate();
    latchkey_server::tls::write_private(&staged, new.encode().as_bytes())?;
    let fingerprint = new.fingerprint();
    vault.keys.rotate_kek(new, vault.now()).await?;
    std::fs::rename(&staged, &path).with_context(|| format!("replacing {}", path.display()))?;
    println!(
        "key-encryption key {fingerprint} is active ({}); back it up with the database",
        path.display()
    );
    Ok(())
}
