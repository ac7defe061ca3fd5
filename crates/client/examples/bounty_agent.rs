//! The bounty agent from Latchkey's origin story, on `latchkey-client`: it reads a
//! repository's issues on the demo provider, finds the bounties, says "working on this" on each
//! bounty issue, and claims the bounties worth more than a threshold only once the user has
//! approved it.
//!
//! ```sh
//! cargo run -p latchkey-client --example bounty_agent -- --threshold 100
//! ```
//!
//! - **Bounties** are written `bounty: $N` in an issue's title or body: any case, whole dollars,
//!   thousands may be separated by commas (`Bounty: $1,500`); the first one counts.
//! - **Work.** Every bounty issue gets the comment `working on this [bounty-agent]`, posted with
//!   an upstream token narrowed to `issues:write` (low risk in the demo catalog: Latchkey
//!   releases it at once).
//! - **Claims.** A bounty above the threshold (`--threshold`, $100 by default) is claimed with a
//!   second comment, `claiming the $N bounty [bounty-agent]`, posted with a token for
//!   `issues:write repo:write`. `repo:write` is high risk in the demo catalog, so Latchkey holds
//!   that exchange for the user's approval ([`Error::ApprovalRequired`]): the agent prints where
//!   to decide, waits ([`Client::wait_for_approval`], at most `--approval-timeout`) and posts the
//!   claim with the approved token. Denied, expired or still undecided: no claim. A bounty at or
//!   below the threshold needs no claim beyond "working on this".
//! - **Its own outcome.** Last, it reads the issues back and checks that each comment it
//!   counts on is there, and that no claim is where none was approved. It exits 0 only then
//!   (a denial is an outcome: reported, exit 0); 1 when something is missing, a claim is still
//!   undecided or the grant does not allow claiming; 2 when the demo account is not connected
//!   (with the URL to connect it at).
//!
//! Run again, it does not repeat itself: its comments already on an issue count as done.
//!
//! It reads what `latchkey demo` writes to its data directory: `demo.json` (the agent's id, the
//! user's id, the agent's key file) and `tls/ca.pem` (Latchkey's local CA). The demo agent's
//! grant leaves out `repo:write` (the demo shows narrowing), so give it before claiming:
//! `latchkey agent grant agt_… --connection demo-git --scopes 'read:user repo:read issues:write
//! repo:write'`. `examples/README.md` walks through it; `crates/client/tests/sdk.rs` and
//! `crates/cli/tests/it/examples.rs` run [`run`] against a real Latchkey.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use latchkey_client::{AccessToken, Client, Error, TokenRequest};
use serde_json::{Value, json};

/// The demo's connection.
pub const CONNECTION: &str = "demo-git";
/// Listing issues (and reading them back).
pub const READ_SCOPE: &str = "repo:read";
/// "Working on this": low risk, released at once.
pub const WORK_SCOPE: &str = "issues:write";
/// A claim: `repo:write` is high risk in the demo catalog, so this needs the user's approval.
pub const CLAIM_SCOPE: &str = "issues:write repo:write";
/// What every bounty issue gets.
pub const WORKING_ON_IT: &str = "working on this [bounty-agent]";
/// Recorded with each release in Latchkey's audit trail.
pub const AUDIT_CONTEXT: &str = "examples/bounty_agent: work on bounties";
const SIGNATURE: &str = " [bounty-agent]";

/// The claim comment for a bounty of `amount` dollars.
pub fn claim_body(amount: u64) -> String {
    format!("claiming the ${amount} bounty{SIGNATURE}")
}

/// Whether `body` is one of this agent's claims.
pub fn is_claim(body: &str) -> bool {
    body.starts_with("claiming the $") && body.ends_with(SIGNATURE)
}

/// The first `bounty: $N` in `text` (case-insensitive), in dollars.
pub fn find_bounty(text: &str) -> Option<u64> {
    const MARK: &str = "bounty:";
    // ASCII lowercasing keeps byte offsets.
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(at) = lower[from..].find(MARK) {
        from += at + MARK.len();
        let Some(amount) = lower[from..].trim_start().strip_prefix('$') else {
            continue;
        };
        let digits: String = amount
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    None
}

/// The bounty of an issue from the demo API (`title`, `body`): the title's, else the body's.
pub fn bounty_of(issue: &Value) -> Option<u64> {
    let text = |k: &str| issue[k].as_str().unwrap_or_default().to_owned();
    find_bounty(&text("title")).or_else(|| find_bounty(&text("body")))
}

// --- options --------------------------------------------------------------------------------

/// What to work on, and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// Latchkey's domain (`host:port`): the issuer is `https://{domain}/`.
    pub domain: String,
    /// The demo's data directory: `demo.json`, the agent's key, `tls/ca.pem`.
    pub data_dir: PathBuf,
    /// The repository on the demo provider.
    pub repo: String,
    /// Bounties above this many dollars are claimed, after approval.
    pub threshold: u64,
    /// How long to wait for each decision.
    pub approval_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            domain: "127.0.0.1:8750".into(),
            data_dir: "latchkey-data".into(),
            repo: "hello-world".into(),
            threshold: 100,
            approval_timeout: Duration::from_secs(300),
        }
    }
}

pub const USAGE: &str = "\
usage: bounty_agent [--domain HOST:PORT] [--data-dir DIR] [--repo NAME] [--threshold DOLLARS]
                    [--approval-timeout SECONDS]

  --domain            Latchkey's domain (default 127.0.0.1:8750, as `latchkey demo` listens)
  --data-dir          the demo's data directory (default latchkey-data)
  --repo              the demo repository (default hello-world)
  --threshold         bounties above this many dollars are claimed after approval (default 100)
  --approval-timeout  seconds to wait for each decision (default 300)
";

/// The command line (without the program name); `None` for `--help`.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
    let mut opts = Options::default();
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        if matches!(flag.as_str(), "-h" | "--help") {
            return Ok(None);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: `{v}` is not a whole number"))
        };
        match name.as_str() {
            "--domain" => opts.domain = value()?,
            "--data-dir" => opts.data_dir = value()?.into(),
            "--repo" => opts.repo = value()?,
            "--threshold" => opts.threshold = number(value()?)?,
            "--approval-timeout" => {
                opts.approval_timeout = Duration::from_secs(number(value()?)?);
            }
            _ => return Err(format!("unknown argument `{flag}`")),
        }
    }
    let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if opts.repo.is_empty() || !opts.repo.chars().all(name_ok) || opts.repo.starts_with('.') {
        return Err(format!("--repo: `{}` is not a repository name", opts.repo));
    }
    Ok(Some(opts))
}

// --- what happened --------------------------------------------------------------------------

/// What the agent did, checked against the demo provider.
#[derive(Debug)]
pub struct Report {
    pub repo: String,
    /// Issues in the repository.
    pub issues: usize,
    /// The issues with a bounty, in issue order.
    pub bounties: Vec<Bounty>,
}

/// One bounty issue.
#[derive(Debug)]
pub struct Bounty {
    pub issue: u64,
    pub title: String,
    /// Dollars.
    pub amount: u64,
    /// The id of the "working on this" comment (posted now or by an earlier run).
    pub working_comment: u64,
    pub claim: Claim,
}

/// What became of a bounty's claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// At or below the threshold: "working on this" is all.
    NotNeeded,
    /// Claimed now. `approval` is the approval waited for (`apr_…`); `None` when Latchkey
    /// released the token without asking (an earlier approval of the same request still
    /// covered it, or the grant's policy needs none).
    Claimed {
        comment: u64,
        approval: Option<String>,
    },
    /// Claimed by an earlier run.
    AlreadyClaimed { comment: u64 },
    /// The user (or an operator) denied it: nothing posted.
    Denied { approval: Option<String> },
    /// Not decided within `--approval-timeout`: still pending; decide, then run again.
    Undecided { approval_url: String },
    /// The request expired before anyone decided: run again for a new one.
    Expired,
    /// The grant does not allow [`CLAIM_SCOPE`].
    NotAllowed { description: String },
}

impl Report {
    /// Every claim was decided (claimed or denied) or not needed.
    pub fn complete(&self) -> bool {
        self.bounties.iter().all(|b| {
            !matches!(
                b.claim,
                Claim::Undecided { .. } | Claim::Expired | Claim::NotAllowed { .. }
            )
        })
    }
}

/// Why the agent stopped.
#[derive(Debug)]
pub enum Failure {
    /// Its set-up is unusable (no `demo.json`, a bad key).
    Setup(String),
    /// The demo account is not connected: the user connects it at `connect_url`.
    NotConnected { connect_url: Option<String> },
    /// Latchkey refused or could not be reached.
    Latchkey(Error),
    /// The demo provider's API answered something else than expected.
    Api { what: String, answer: String },
    /// After acting, what it did is not there.
    Unverified(Vec<String>),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Setup(why) => write!(f, "{why}"),
            Self::NotConnected { connect_url } => write!(
                f,
                "the demo account is not connected: open {} and approve",
                connect_url
                    .as_deref()
                    .unwrap_or("the connect URL `latchkey demo` printed")
            ),
            Self::Latchkey(e) => write!(f, "Latchkey: {e}"),
            Self::Api { what, answer } => write!(f, "{what}: the demo API answered {answer}"),
            Self::Unverified(problems) => {
                write!(
                    f,
                    "read back, its outcome is not there: {}",
                    problems.join("; ")
                )
            }
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        match e {
            Error::NotConnected { connect_url, .. } => Self::NotConnected { connect_url },
            e => Self::Latchkey(e),
        }
    }
}

/// The process's exit status for `result`.
pub fn exit_code(result: &Result<Report, Failure>) -> i32 {
    match result {
        Ok(report) if report.complete() => 0,
        Err(Failure::NotConnected { .. }) => 2,
        _ => 1,
    }
}

// --- the agent ------------------------------------------------------------------------------

/// The demo agent's client and the demo user's id, from the demo's data directory.
pub fn client(opts: &Options) -> Result<(Client, String), Failure> {
    let demo_json = opts.data_dir.join("demo.json");
    let text = std::fs::read_to_string(&demo_json).map_err(|e| {
        Failure::Setup(format!(
            "reading {}: {e} (run this where `latchkey demo` runs, or pass --data-dir)",
            demo_json.display()
        ))
    })?;
    let demo: Value = serde_json::from_str(&text)
        .map_err(|e| Failure::Setup(format!("{} is not JSON: {e}", demo_json.display())))?;
    let field = |k: &str| {
        demo[k]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Failure::Setup(format!("{} has no {k}", demo_json.display())))
    };
    let mut builder = Client::builder()
        .domain(&opts.domain)
        .client_id(field("agent_id")?)
        .private_key_file(field("agent_key")?)
        .audit_context(AUDIT_CONTEXT);
    // Latchkey's local CA, unless it serves a certificate the system already trusts.
    let ca = opts.data_dir.join("tls").join("ca.pem");
    if ca.exists() {
        builder = builder.ca_cert_file(ca);
    }
    let client = builder.build().map_err(|e| Failure::Setup(e.to_string()))?;
    Ok((client, field("user_id")?))
}

/// Do the work (see the module's documentation), then check it is there.
pub async fn run(opts: &Options) -> Result<Report, Failure> {
    let (client, user) = client(opts)?;
    let api = Api {
        http: client.http().clone(),
        issues_url: format!("{}demo/api/repos/{}/issues", client.issuer(), opts.repo),
    };
    let read = TokenRequest::new(CONNECTION, &user).scope(READ_SCOPE);
    let issues = api.issues(&client.token_for(&read).await?).await?;
    let found: Vec<(&Value, u64)> = issues
        .iter()
        .filter_map(|i| bounty_of(i).map(|amount| (i, amount)))
        .collect();
    println!(
        "{}: {} issue(s), {} with a bounty (claims above ${})",
        opts.repo,
        issues.len(),
        found.len(),
        opts.threshold
    );

    // 1. "Working on this" on every bounty issue first: a claim waiting for the user holds up
    //    nothing else.
    let mut bounties = Vec::new();
    if !found.is_empty() {
        let work = client
            .token_for(&TokenRequest::new(CONNECTION, &user).scope(WORK_SCOPE))
            .await?;
        for (issue, amount) in &found {
            let number = issue["number"].as_u64().unwrap_or_default();
            let working_comment = match comments(issue).find(|c| c.1 == WORKING_ON_IT) {
                Some((id, _)) => {
                    println!("#{number} ${amount}: already working on it (comment {id})");
                    id
                }
                None => {
                    let id = api.comment(&work, number, WORKING_ON_IT).await?;
                    println!("#{number} ${amount}: working on this (comment {id})");
                    id
                }
            };
            bounties.push(Bounty {
                issue: number,
                title: issue["title"].as_str().unwrap_or_default().to_owned(),
                amount: *amount,
                working_comment,
                claim: Claim::NotNeeded,
            });
        }
    }

    // 2. The claims above the threshold, each after the user's approval.
    for (b, (issue, _)) in bounties.iter_mut().zip(&found) {
        if b.amount <= opts.threshold {
            continue;
        }
        b.claim = match comments(issue).find(|c| is_claim(&c.1)) {
            Some((comment, _)) => Claim::AlreadyClaimed { comment },
            None => claim(&client, &api, &user, b, opts).await?,
        };
    }

    // 3. Read back: is it all there?
    let after = api.issues(&client.token_for(&read).await?).await?;
    verify(&bounties, &after).map_err(Failure::Unverified)?;
    let report = Report {
        repo: opts.repo.clone(),
        issues: issues.len(),
        bounties,
    };
    print_summary(&report);
    Ok(report)
}

/// Claim `b` with a token for [`CLAIM_SCOPE`], waiting for the user's approval when Latchkey
/// holds the exchange for it.
async fn claim(
    client: &Client,
    api: &Api,
    user: &str,
    b: &Bounty,
    opts: &Options,
) -> Result<Claim, Failure> {
    let (number, amount) = (b.issue, b.amount);
    let req = TokenRequest::new(CONNECTION, user).scope(CLAIM_SCOPE);
    // Each claim asks Latchkey, rather than reusing a token cached for an earlier claim:
    // whether this one needs its own approval is the grant's policy to say (a critical level
    // makes every approval single-use).
    client.forget_token(&req);
    let (token, approval) = match client.token_for(&req).await {
        Ok(token) => (token, None),
        Err(Error::ApprovalRequired(pending)) => {
            let id = pending.approval_id.clone();
            println!(
                "#{number} ${amount}: above ${}: claiming it needs the user's approval \
                 ({CLAIM_SCOPE}); waiting up to {} s",
                opts.threshold,
                opts.approval_timeout.as_secs()
            );
            println!(
                "  decide at {} or, as the operator: latchkey approvals approve {}",
                pending.approval_url,
                id.as_deref().unwrap_or("apr_…")
            );
            match client
                .wait_for_approval(&pending, opts.approval_timeout)
                .await
            {
                Ok(token) => {
                    println!("#{number} ${amount}: approved");
                    (token, id)
                }
                Err(Error::Denied { code, .. }) if code == "access_denied" => {
                    println!("#{number} ${amount}: denied; not claiming it");
                    return Ok(Claim::Denied { approval: id });
                }
                Err(Error::ApprovalTimedOut(p)) => {
                    println!("#{number} ${amount}: not decided yet; not claiming it");
                    return Ok(Claim::Undecided {
                        approval_url: p.approval_url.clone(),
                    });
                }
                Err(Error::ApprovalExpired { .. }) => {
                    println!("#{number} ${amount}: the request expired; not claiming it");
                    return Ok(Claim::Expired);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Denied {
            code, description, ..
        }) if code == "invalid_scope" => {
            println!(
                "#{number} ${amount}: the agent's grant does not allow {CLAIM_SCOPE}: \
                 latchkey agent grant {} --connection {CONNECTION} --scopes \
                 'read:user repo:read issues:write repo:write'",
                client.client_id()
            );
            return Ok(Claim::NotAllowed { description });
        }
        Err(e) => return Err(e.into()),
    };
    let comment = api.comment(&token, number, &claim_body(amount)).await?;
    println!("#{number} ${amount}: claimed (comment {comment})");
    Ok(Claim::Claimed { comment, approval })
}

/// Check `bounties` against the issues read back from the demo API: each "working on this"
/// and each claim comment counted on is on its issue with its text, and no claim of this
/// agent's is on an issue it did not claim. Every problem found.
pub fn verify(bounties: &[Bounty], issues: &[Value]) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for b in bounties {
        let Some(issue) = issues.iter().find(|i| i["number"] == b.issue) else {
            problems.push(format!("#{} is gone", b.issue));
            continue;
        };
        let has = |id: u64, body: &str| comments(issue).any(|c| c.0 == id && c.1 == body);
        if !has(b.working_comment, WORKING_ON_IT) {
            problems.push(format!(
                "#{}: no \"working on this\" comment {}",
                b.issue, b.working_comment
            ));
        }
        match &b.claim {
            Claim::Claimed { comment, .. } | Claim::AlreadyClaimed { comment } => {
                if !has(*comment, &claim_body(b.amount)) {
                    problems.push(format!("#{}: no claim comment {comment}", b.issue));
                }
            }
            unclaimed => {
                if let Some((id, _)) = comments(issue).find(|c| is_claim(&c.1)) {
                    problems.push(format!(
                        "#{}: a claim (comment {id}) where none was made ({unclaimed:?})",
                        b.issue
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn print_summary(report: &Report) {
    let what: Vec<String> = report
        .bounties
        .iter()
        .map(|b| {
            let claim = match &b.claim {
                Claim::NotNeeded => "working on it".to_owned(),
                Claim::Claimed { comment, approval } => format!(
                    "claimed (comment {comment}, {})",
                    approval.as_deref().unwrap_or("no approval asked")
                ),
                Claim::AlreadyClaimed { comment } => format!("claimed before (comment {comment})"),
                Claim::Denied { approval } => {
                    format!("denied ({})", approval.as_deref().unwrap_or("-"))
                }
                Claim::Undecided { approval_url } => format!("undecided: {approval_url}"),
                Claim::Expired => "the approval request expired".to_owned(),
                Claim::NotAllowed { description } => format!("not allowed: {description}"),
            };
            format!("#{} \"{}\" ${}: {claim}", b.issue, b.title, b.amount)
        })
        .collect();
    let verdict = if report.complete() {
        "ok"
    } else {
        "incomplete"
    };
    println!(
        "{verdict}: {} of {} issue(s) in {} carry a bounty{}{}",
        report.bounties.len(),
        report.issues,
        report.repo,
        if what.is_empty() { "" } else { ": " },
        what.join("; ")
    );
}

/// Comments of an issue from the demo API: (id, body).
fn comments(issue: &Value) -> impl Iterator<Item = (u64, String)> + '_ {
    issue["comments"].as_array().into_iter().flatten().map(|c| {
        (
            c["id"].as_u64().unwrap_or_default(),
            c["body"].as_str().unwrap_or_default().to_owned(),
        )
    })
}

/// The demo provider's issues API, called with upstream tokens from Latchkey.
struct Api {
    http: reqwest::Client,
    issues_url: String,
}

impl Api {
    async fn issues(&self, token: &AccessToken) -> Result<Vec<Value>, Failure> {
        let resp = self
            .http
            .get(&self.issues_url)
            .bearer_auth(token.secret())
            .send()
            .await
            .map_err(Error::from)?;
        match answer(resp, 200).await? {
            Value::Array(issues) => Ok(issues),
            other => Err(Failure::Api {
                what: "listing issues".into(),
                answer: other.to_string(),
            }),
        }
    }

    /// Comment on issue `number`; the comment's id.
    async fn comment(&self, token: &AccessToken, number: u64, body: &str) -> Result<u64, Failure> {
        let resp = self
            .http
            .post(format!("{}/{number}/comments", self.issues_url))
            .bearer_auth(token.secret())
            .json(&json!({ "body": body }))
            .send()
            .await
            .map_err(Error::from)?;
        let comment = answer(resp, 201).await?;
        comment["id"].as_u64().ok_or_else(|| Failure::Api {
            what: format!("commenting on #{number}"),
            answer: comment.to_string(),
        })
    }
}

/// The JSON body of an answer with status `expected`.
async fn answer(resp: reqwest::Response, expected: u16) -> Result<Value, Failure> {
    let (status, url) = (resp.status(), resp.url().path().to_owned());
    let text = resp.text().await.map_err(Error::from)?;
    let failed = |why: String| Failure::Api {
        what: url.clone(),
        answer: why,
    };
    if status.as_u16() != expected {
        return Err(failed(format!("{status}: {text}")));
    }
    serde_json::from_str(&text).map_err(|e| failed(format!("{status}, not JSON ({e}): {text}")))
}

#[tokio::main]
async fn main() {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprint!("error: {e}\n\n{USAGE}");
            std::process::exit(1);
        }
    };
    let result = run(&opts).await;
    if let Err(e) = &result {
        eprintln!("error: {e}");
    }
    std::process::exit(exit_code(&result));
}
