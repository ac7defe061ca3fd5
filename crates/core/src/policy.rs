//! Per-grant policy (agent × connection): the risk of what is asked for and what each risk level
//! requires, the hours a grant may be used, a cap on the reported token lifetime, and quotas.
//! Pure: parsing, evaluation and the shapes the exchange and the approvals work share; no I/O
//! and no clock (every function that needs the time takes it).
//!
//! - **Risk.** Each scope has a level, [`Risk::Low`] < [`Risk::Medium`] < [`Risk::High`] <
//!   [`Risk::Critical`]: the grant's own override for that scope if it has one, else the
//!   provider catalog's table ([`RiskTable`]: exact names, then `*` patterns, then the entry's
//!   `default_risk`, `low` where the entry names none). A request's risk is the highest level
//!   among its scopes. [`Risk::requirement`] says what a level needs before a token is released.
//! - **Hours.** [`TimeWindow`]s such as `mon-fri 09:00-18:00 Europe/Berlin`, in the wall-clock
//!   time of an IANA time zone; a grant with windows is usable only inside one of them.
//! - **Lifetime.** `max_lifetime` caps the `expires_in` Latchkey reports (the upstream token
//!   itself cannot be shortened; see docs/policy.md).
//! - **Quotas.** Exchanges per minute and per day, per agent (on this grant's connection) and
//!   per user (on this connection, counted across the grants that have a per-user quota). The
//!   windows are fixed UTC minutes and days ([`QuotaWindow`]); the counting lives in
//!   [`crate::rate::QuotaCounters`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scope::Scopes;
use crate::store::JtiUse;

/// Why a policy (or a part of one) was refused. The message says what to write instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// Risk
// ---------------------------------------------------------------------------------------------

/// How much harm a scope can do in the wrong hands. Ordered: `Low < Medium < High < Critical`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Risk {
    #[default]
    Low,
    Medium,
    High,
    Critical,
}

impl Risk {
    pub const ALL: [Risk; 4] = [Risk::Low, Risk::Medium, Risk::High, Risk::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
            Risk::Critical => "critical",
        }
    }

    /// `low`, `medium`, `high` or `critical`, exactly (lower case).
    pub fn parse(s: &str) -> Result<Self, PolicyError> {
        Risk::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                PolicyError(format!(
                    "unknown risk level `{s}` (use low, medium, high or critical)"
                ))
            })
    }

    /// What a release at this level needs: low nothing; medium the user's approval; high an
    /// approval by a user who authenticated with a second factor recently; critical the same,
    /// and each approval serves one release only.
    pub fn requirement(self) -> Requirement {
        match self {
            Risk::Low => Requirement::NONE,
            Risk::Medium => Requirement {
                approval: true,
                recent_mfa: false,
                single_use: false,
            },
            Risk::High => Requirement {
                approval: true,
                recent_mfa: true,
                single_use: false,
            },
            Risk::Critical => Requirement {
                approval: true,
                recent_mfa: true,
                single_use: true,
            },
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Risk {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Risk::parse(s)
    }
}

impl Serialize for Risk {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Risk {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Risk::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What must happen before a token of some risk is released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Requirement {
    /// The user approves this request.
    pub approval: bool,
    /// The approving user authenticated with a second factor recently.
    pub recent_mfa: bool,
    /// An approval serves one release, not every identical request after it.
    pub single_use: bool,
}

impl Requirement {
    pub const NONE: Requirement = Requirement {
        approval: false,
        recent_mfa: false,
        single_use: false,
    };
}

/// A provider's risk table, from the catalog: exact scope names and `*` patterns (one `*`,
/// standing for any run of characters: `write:*`, `*.readonly`), and the level of every scope
/// it does not name.
#[derive(Clone, Copy, Debug)]
pub struct RiskTable<'a> {
    pub scopes: &'a BTreeMap<String, Risk>,
    pub default: Risk,
}

impl RiskTable<'_> {
    /// The level of one scope: its exact entry; else the matching pattern with the longest
    /// literal part (the higher level on a tie); else the default.
    pub fn risk_of(&self, scope: &str) -> Risk {
        if let Some(r) = self.scopes.get(scope) {
            return *r;
        }
        self.scopes
            .iter()
            .filter(|(pattern, _)| pattern_matches(pattern, scope))
            .max_by_key(|(pattern, risk)| (pattern.len(), **risk))
            .map_or(self.default, |(_, r)| *r)
    }

    /// Every key is a scope or a pattern with exactly one `*`, without spaces or commas.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for key in self.scopes.keys() {
            if key.is_empty() || key.contains([' ', ',']) || key.matches('*').count() > 1 {
                return err(format!(
                    "`{key}` is neither a scope nor a pattern with one `*`"
                ));
            }
            if key == "*" {
                return err("`*` alone is what `default_risk` is for");
            }
        }
        Ok(())
    }
}

/// `pattern` (with at most one `*`) matches `scope`; without `*` only itself.
fn pattern_matches(pattern: &str, scope: &str) -> bool {
    match pattern.split_once('*') {
        None => false,
        Some((prefix, suffix)) => {
            scope.len() >= prefix.len() + suffix.len()
                && scope.starts_with(prefix)
                && scope.ends_with(suffix)
        }
    }
}

/// The risk of a requested scope set and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    /// The highest level among the scopes (`low` for none).
    pub risk: Risk,
    /// Each scope with its level, in scope order.
    pub scopes: Vec<(String, Risk)>,
}

impl Assessment {
    pub fn requirement(&self) -> Requirement {
        self.risk.requirement()
    }

    /// The scopes at the assessed level: what makes the request as risky as it is.
    pub fn riskiest(&self) -> Vec<&str> {
        self.scopes
            .iter()
            .filter(|(_, r)| *r == self.risk)
            .map(|(s, _)| s.as_str())
            .collect()
    }
}

/// Assess `scopes`: the grant's `overrides` first, then the catalog's `table`.
pub fn assess(
    scopes: &Scopes,
    table: RiskTable<'_>,
    overrides: &BTreeMap<String, Risk>,
) -> Assessment {
    let scopes: Vec<(String, Risk)> = scopes
        .iter()
        .map(|s| {
            let r = overrides
                .get(s)
                .copied()
                .unwrap_or_else(|| table.risk_of(s));
            (s.to_owned(), r)
        })
        .collect();
    Assessment {
        risk: scopes.iter().map(|(_, r)| *r).max().unwrap_or_default(),
        scopes,
    }
}

// ---------------------------------------------------------------------------------------------
// Time windows
// ---------------------------------------------------------------------------------------------

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_DAY: u16 = 24 * 60;

/// Hours a grant may be used: days of the week, a start and an end time, in the wall-clock time
/// of an IANA time zone. Written `DAYS HH:MM-HH:MM ZONE`:
///
/// - DAYS: `daily`, or a comma-separated list of days (`mon` … `sun`) and ranges (`mon-fri`;
///   a range may wrap, `fri-mon`); each day at most once.
/// - `HH:MM-HH:MM`: 24-hour times, the start included and the end not; `24:00` ends at
///   midnight. An end before the start runs past midnight into the next day: `mon 22:00-06:00`
///   is Monday 22:00 to Tuesday 06:00 (the window belongs to the day it starts on).
/// - ZONE: an IANA name (`Europe/Berlin`, `America/New_York`, `UTC`).
///
/// Wall-clock time means daylight saving follows the zone: `09:00` is 09:00 on the clocks
/// there, summer and winter. On the day the clocks go forward the skipped times do not exist
/// (a window inside the gap is empty that day); on the day they go back, the repeated hour is
/// inside a window covering it both times.
#[derive(Clone, Debug)]
pub struct TimeWindow {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after midnight, `start` in `0..1440`, `end` in `1..=1440`, never equal.
    start: u16,
    end: u16,
    zone: jiff::tz::TimeZone,
    zone_name: String,
}

impl PartialEq for TimeWindow {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for TimeWindow {}

const WINDOW_FORM: &str = "write `DAYS HH:MM-HH:MM ZONE`, e.g. `mon-fri 09:00-18:00 Europe/Berlin`";

impl TimeWindow {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let parts: Vec<&str> = text.split_ascii_whitespace().collect();
        let [days, times, zone] = parts[..] else {
            return err(format!("time window `{text}`: {WINDOW_FORM}"));
        };
        let bad = |why: String| PolicyError(format!("time window `{text}`: {why}"));
        let days = parse_days(days).map_err(bad)?;
        let (start, end) = times
            .split_once('-')
            .ok_or_else(|| bad(format!("`{times}` is not HH:MM-HH:MM; {WINDOW_FORM}")))?;
        let start = parse_clock(start, false).map_err(bad)?;
        let end = parse_clock(end, true).map_err(bad)?;
        if start == end {
            return Err(bad(
                "the start and the end are the same time; use 00:00-24:00 for the whole day".into(),
            ));
        }
        let tz = jiff::tz::TimeZone::get(zone).map_err(|_| {
            bad(format!(
                "unknown time zone `{zone}` (use an IANA name such as Europe/Berlin, America/New_York or UTC)"
            ))
        })?;
        Ok(Self {
            days,
            start,
            end,
            zone: tz,
            zone_name: zone.to_owned(),
        })
    }

    /// Whether the instant `unix` (seconds) falls inside the window.
    pub fn contains(&self, unix: i64) -> bool {
        let Some((weekday, minute)) = self.local(unix) else {
            return false;
        };
        let yesterday = (weekday + 6) % 7;
        if self.start < self.end {
            self.days[weekday] && (self.start..self.end).contains(&minute)
        } else {
            (self.days[weekday] && minute >= self.start)
                || (self.days[yesterday] && minute < self.end)
        }
    }

    /// The local weekday (Monday 0) and minute of the day at `unix`, in the window's zone.
    fn local(&self, unix: i64) -> Option<(usize, u16)> {
        let zoned = jiff::Timestamp::from_second(unix)
            .ok()?
            .to_zoned(self.zone.clone());
        let weekday = zoned.weekday().to_monday_zero_offset() as usize;
        let minute = zoned.hour() as u16 * 60 + zoned.minute() as u16;
        Some((weekday, minute))
    }

    /// `Sat 10:15 Europe/Berlin`: the local time at `unix` in the window's zone (for error
    /// messages).
    pub fn local_time(&self, unix: i64) -> String {
        match self.local(unix) {
            Some((d, m)) => {
                let name = DAY_NAMES[d];
                let cap = name[..1].to_ascii_uppercase() + &name[1..];
                format!("{cap} {:02}:{:02} {}", m / 60, m % 60, self.zone_name)
            }
            None => "out of range".into(),
        }
    }

    pub fn zone_name(&self) -> &str {
        &self.zone_name
    }
}

impl fmt::Display for TimeWindow {
    /// The canonical form: `daily` or day ranges in week order, then the times and the zone.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = if self.days.iter().all(|d| *d) {
            "daily".to_owned()
        } else {
            let mut runs = Vec::new();
            let mut i = 0;
            while i < 7 {
                if !self.days[i] {
                    i += 1;
                    continue;
                }
                let first = i;
                while i + 1 < 7 && self.days[i + 1] {
                    i += 1;
                }
                runs.push(if first == i {
                    DAY_NAMES[i].to_owned()
                } else {
                    format!("{}-{}", DAY_NAMES[first], DAY_NAMES[i])
                });
                i += 1;
            }
            runs.join(",")
        };
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(
            f,
            "{days} {}-{} {}",
            hm(self.start),
            hm(self.end),
            self.zone_name
        )
    }
}

impl Serialize for TimeWindow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeWindow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TimeWindow::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn day_index(name: &str) -> Result<usize, String> {
    let lower = name.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| *d == lower)
        .ok_or_else(|| format!("`{name}` is not a day (mon, tue, wed, thu, fri, sat, sun)"))
}

fn parse_days(text: &str) -> Result<[bool; 7], String> {
    if text.eq_ignore_ascii_case("daily") {
        return Ok([true; 7]);
    }
    let mut days = [false; 7];
    for item in text.split(',') {
        if item.is_empty() {
            return Err(format!("`{text}` has an empty day"));
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (day_index(a)?, day_index(b)?),
            None => {
                let d = day_index(item)?;
                (d, d)
            }
        };
        if first == last && item.contains('-') {
            return Err(format!(
                "`{item}` is a range of one day; write `{}`",
                DAY_NAMES[first]
            ));
        }
        let mut d = first;
        loop {
            if days[d] {
                return Err(format!("`{}` is listed twice in `{text}`", DAY_NAMES[d]));
            }
            days[d] = true;
            if d == last {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(days)
}

/// `HH:MM` as minutes after midnight; `24:00` (1440) only as an end.
fn parse_clock(text: &str, is_end: bool) -> Result<u16, String> {
    let bad = || format!("`{text}` is not a time (HH:MM, 00:00 to 23:59, or 24:00 as an end)");
    let b = text.as_bytes();
    if b.len() != 5
        || b[2] != b':'
        || !b
            .iter()
            .enumerate()
            .all(|(i, c)| i == 2 || c.is_ascii_digit())
    {
        return Err(bad());
    }
    let h = u16::from(b[0] - b'0') * 10 + u16::from(b[1] - b'0');
    let m = u16::from(b[3] - b'0') * 10 + u16::from(b[4] - b'0');
    match (h, m) {
        (24, 0) if is_end => Ok(MINUTES_PER_DAY),
        (0..=23, 0..=59) => Ok(h * 60 + m),
        _ => Err(bad()),
    }
}

/// Whether `unix` falls in one of `windows`; no windows means any time.
pub fn within_hours(windows: &[TimeWindow], unix: i64) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(unix))
}

// ---------------------------------------------------------------------------------------------
// Quotas
// ---------------------------------------------------------------------------------------------

/// Exchanges allowed per window; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_per_day: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_per_day: Option<u32>,
}

/// Largest quota accepted (per window).
pub const MAX_QUOTA: u32 = 10_000_000;

impl Quotas {
    pub fn is_empty(&self) -> bool {
        *self == Quotas::default()
    }

    /// Each limit that is set, with whose exchanges it counts and over which window.
    pub fn rules(&self) -> Vec<QuotaRule> {
        [
            (
                QuotaSubject::Agent,
                QuotaWindow::Minute,
                self.agent_per_minute,
            ),
            (QuotaSubject::Agent, QuotaWindow::Day, self.agent_per_day),
            (
                QuotaSubject::User,
                QuotaWindow::Minute,
                self.user_per_minute,
            ),
            (QuotaSubject::User, QuotaWindow::Day, self.user_per_day),
        ]
        .into_iter()
        .filter_map(|(subject, window, limit)| {
            limit.map(|limit| QuotaRule {
                subject,
                window,
                limit,
            })
        })
        .collect()
    }

    pub fn validate(&self) -> Result<(), PolicyError> {
        for rule in self.rules() {
            if !(1..=MAX_QUOTA).contains(&rule.limit) {
                return err(format!(
                    "{} must be between 1 and {MAX_QUOTA} (leave it out for no limit; remove the grant to allow nothing)",
                    rule.flag()
                ));
            }
        }
        Ok(())
    }
}

/// Whose exchanges a quota counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuotaSubject {
    /// The agent's, on the grant's connection.
    Agent,
    /// The user's, on the grant's connection (through every grant with a per-user quota).
    User,
}

/// A fixed window: a UTC minute or a UTC day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuotaWindow {
    Minute,
    Day,
}

impl QuotaWindow {
    pub fn seconds(self) -> i64 {
        match self {
            QuotaWindow::Minute => 60,
            QuotaWindow::Day => 86_400,
        }
    }

    /// Which window `now` is in.
    pub fn index(self, now: i64) -> i64 {
        now.div_euclid(self.seconds())
    }

    /// Seconds until the window containing `now` ends (at least 1): the `Retry-After`.
    pub fn retry_after(self, now: i64) -> u64 {
        (self.seconds() - now.rem_euclid(self.seconds())).max(1) as u64
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuotaWindow::Minute => "minute",
            QuotaWindow::Day => "day",
        }
    }
}

/// One limit of a grant's quotas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaRule {
    pub subject: QuotaSubject,
    pub window: QuotaWindow,
    pub limit: u32,
}

impl QuotaRule {
    /// The `agent grant` flag that sets it.
    pub fn flag(&self) -> &'static str {
        match (self.subject, self.window) {
            (QuotaSubject::Agent, QuotaWindow::Minute) => "--per-minute",
            (QuotaSubject::Agent, QuotaWindow::Day) => "--per-day",
            (QuotaSubject::User, QuotaWindow::Minute) => "--user-per-minute",
            (QuotaSubject::User, QuotaWindow::Day) => "--user-per-day",
        }
    }

    /// The counter this rule reads, for one exchange: `agent:{agent}:{connection id}` or
    /// `user:{user}:{connection id}`.
    pub fn counter(&self, agent_id: &str, user_id: &str, connection_id: &str) -> String {
        match self.subject {
            QuotaSubject::Agent => format!("agent:{agent_id}:{connection_id}"),
            QuotaSubject::User => format!("user:{user_id}:{connection_id}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The grant's policy
// ---------------------------------------------------------------------------------------------

/// Longest token lifetime cap accepted (seconds).
pub const MAX_LIFETIME_CAP: i64 = 86_400;

/// Everything a grant says beyond its scopes and address allow-list. Stored as JSON with the
/// grant (`grants.policy`); the default (`{}`) adds nothing: catalog risks, any hour, the
/// upstream token's own lifetime, no quota.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantPolicy {
    /// Risk levels that replace the catalog's, by exact scope name (scopes of the grant).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub risk: BTreeMap<String, Risk>,
    /// When the grant may be used; empty means at any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hours: Vec<TimeWindow>,
    /// Cap on the `expires_in` reported (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<i64>,
    #[serde(default, skip_serializing_if = "Quotas::is_empty")]
    pub quotas: Quotas,
    /// Whether the MCP server's `get_access_token` tool may hand the raw upstream token to
    /// the agent. Off by default: agents on MCP call APIs through Latchkey instead.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub token_tool: bool,
    /// Set when the stored policy could not be read back (never stored): the grant then
    /// releases nothing until an operator sets its policy again.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

impl GrantPolicy {
    /// Check the policy against the grant's scopes.
    pub fn validate(&self, grant_scopes: &Scopes) -> Result<(), PolicyError> {
        for scope in self.risk.keys() {
            if !grant_scopes.iter().any(|s| s == scope) {
                return err(format!(
                    "--risk names `{scope}`, which is not one of the grant's scopes ({})",
                    grant_scopes.to_string_spaced()
                ));
            }
        }
        if let Some(cap) = self.max_lifetime
            && !(1..=MAX_LIFETIME_CAP).contains(&cap)
        {
            return err(format!(
                "--max-lifetime must be between 1 and {MAX_LIFETIME_CAP} seconds"
            ));
        }
        for (i, w) in self.hours.iter().enumerate() {
            if self.hours[..i].contains(w) {
                return err(format!("--hours `{w}` is given twice"));
            }
        }
        self.quotas.validate()
    }

    /// The stored JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a policy serialises")
    }

    /// Read the stored JSON; what cannot be read becomes a policy that releases nothing.
    pub fn from_stored(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_else(|e| GrantPolicy {
            unreadable: Some(e.to_string()),
            ..GrantPolicy::default()
        })
    }

    /// Cap an `expires_in` at the grant's `max_lifetime`.
    pub fn cap_lifetime(&self, expires_in: i64) -> i64 {
        match self.max_lifetime {
            Some(cap) => expires_in.min(cap),
            None => expires_in,
        }
    }
}

/// `SCOPE=LEVEL` (the `--risk` flag).
pub fn parse_risk_override(text: &str) -> Result<(String, Risk), PolicyError> {
    let Some((scope, level)) = text.split_once('=') else {
        return err(format!(
            "--risk `{text}`: write SCOPE=LEVEL, e.g. repo=high"
        ));
    };
    if scope.is_empty() || scope.contains([' ', ',', '*']) {
        return err(format!("--risk `{text}`: `{scope}` is not a scope"));
    }
    Ok((
        scope.to_owned(),
        Risk::parse(level).map_err(|e| PolicyError(format!("--risk `{text}`: {e}")))?,
    ))
}

// ---------------------------------------------------------------------------------------------
// Approvals: what the exchange asks the approvals service, and what it answers
// ---------------------------------------------------------------------------------------------

/// A token request that needs the user's approval before it is released (risk medium or
/// above). Built by the exchange, answered by `Vault::approval_gate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovalRequest {
    pub agent_id: String,
    pub user_id: String,
    /// The connection's name.
    pub connection: String,
    /// The scopes that would be released.
    pub scopes: Scopes,
    pub risk: Risk,
    /// Each scope's level.
    pub scope_risks: Vec<(String, Risk)>,
    pub requirement: Requirement,
    /// [`request_hash`] of (agent, user, connection, scopes): an approval covers exactly this.
    pub request_hash: String,
    /// `binding_message` from the request, if it had one (shown to the user).
    pub binding_message: Option<String>,
    /// `authorization_details` (RFC 9396) from the request, as sent (JSON text), if any.
    pub authorization_details: Option<String>,
    /// The agent's stated reason (a privileged worker's `audit_context`).
    pub audit_context: Option<String>,
    /// The request's `login_hint` (which of the user's accounts at the connection).
    pub login_hint: Option<String>,
}

/// What the approvals service answers when a request may go ahead. (A request that is not
/// approved is an `OAuthError`.)
#[derive(Clone, Debug)]
pub enum ApprovalOutcome {
    Approved {
        /// The approval's id, recorded with the release.
        approval_id: String,
        /// The user who approved.
        approved_by: String,
        /// For single-use approvals: a key consumed in the release's own transaction, like a
        /// `jti`, so the approval serves exactly one release even under concurrency. `None` for
        /// approvals that cover every identical request until they expire.
        single_use: Option<JtiUse>,
    },
}

/// SHA-256 (base64url) of the JSON array `[agent, user, connection, [scopes, sorted]]`: what an
/// approval is bound to.
pub fn request_hash(agent_id: &str, user_id: &str, connection: &str, scopes: &Scopes) -> String {
    let scopes: Vec<&str> = scopes.iter().collect(); // sorted: Scopes is an ordered set
    let canonical = serde_json::json!([agent_id, user_id, connection, scopes]).to_string();
    latchkey_crypto::secrets::sha256_b64(canonical.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_second()
    }

    fn table(entries: &[(&str, Risk)]) -> BTreeMap<String, Risk> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn levels_are_ordered_and_parse_strictly() {
        assert!(
            Risk::Low < Risk::Medium && Risk::Medium < Risk::High && Risk::High < Risk::Critical
        );
        for r in Risk::ALL {
            assert_eq!(Risk::parse(r.as_str()).unwrap(), r);
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
        }
        for bad in ["", "HIGH", "High", " high", "severe", "lowest"] {
            assert!(
                Risk::parse(bad)
                    .unwrap_err()
                    .0
                    .contains("low, medium, high or critical")
            );
        }
        assert!(serde_json::from_str::<Risk>("\"extreme\"").is_err());
    }

    #[test]
    fn each_level_requires_what_it_says() {
        assert_eq!(Risk::Low.requirement(), Requirement::NONE);
        let m = Risk::Medium.requirement();
        assert!(m.approval && !m.recent_mfa && !m.single_use);
        let h = Risk::High.requirement();
        assert!(h.approval && h.recent_mfa && !h.single_use);
        let c = Risk::Critical.requirement();
        assert!(c.approval && c.recent_mfa && c.single_use);
    }

    #[test]
    fn risk_is_the_max_over_scopes_with_overrides_first() {
        let map = table(&[
            ("repo", Risk::High),
            ("read:*", Risk::Low),
            ("write:*", Risk::High),
            ("write:discussion", Risk::Medium),
            ("admin:*", Risk::Critical),
            ("delete_repo", Risk::Critical),
            ("*.readonly", Risk::Low),
        ]);
        let t = RiskTable {
            scopes: &map,
            default: Risk::Medium,
        };
        assert_eq!(t.risk_of("repo"), Risk::High);
        assert_eq!(t.risk_of("read:user"), Risk::Low);
        assert_eq!(t.risk_of("write:packages"), Risk::High);
        assert_eq!(
            t.risk_of("write:discussion"),
            Risk::Medium,
            "exact beats a pattern"
        );
        assert_eq!(t.risk_of("admin:org"), Risk::Critical);
        assert_eq!(t.risk_of("gist"), Risk::Medium, "unknown: the default");
        assert_eq!(
            t.risk_of("https://www.googleapis.com/auth/drive.readonly"),
            Risk::Low
        );
        let none = BTreeMap::new();
        assert_eq!(
            RiskTable {
                scopes: &none,
                default: Risk::Low
            }
            .risk_of("anything"),
            Risk::Low
        );

        let a = assess(&Scopes::parse("read:user repo"), t, &BTreeMap::new());
        assert_eq!(a.risk, Risk::High);
        assert_eq!(a.riskiest(), vec!["repo"]);
        assert_eq!(
            assess(
                &Scopes::parse("read:user delete_repo repo"),
                t,
                &BTreeMap::new()
            )
            .risk,
            Risk::Critical
        );
        assert_eq!(
            assess(&Scopes::parse("read:user"), t, &BTreeMap::new()).risk,
            Risk::Low
        );
        assert_eq!(
            assess(&Scopes::default(), t, &BTreeMap::new()).risk,
            Risk::Low
        );
        // The operator lowers `repo` and raises `read:user`.
        let overrides: BTreeMap<String, Risk> = [
            ("repo".to_owned(), Risk::Low),
            ("read:user".to_owned(), Risk::Medium),
        ]
        .into();
        let a = assess(&Scopes::parse("read:user repo"), t, &overrides);
        assert_eq!(a.risk, Risk::Medium);
        assert_eq!(
            a.scopes,
            vec![
                ("read:user".to_owned(), Risk::Medium),
                ("repo".to_owned(), Risk::Low)
            ]
        );
    }

    #[test]
    fn pattern_specificity() {
        let map: BTreeMap<String, Risk> = [
            ("read:*".to_owned(), Risk::Low),
            ("*:history".to_owned(), Risk::Medium),
            ("a*".to_owned(), Risk::High),
            ("*b".to_owned(), Risk::Critical),
        ]
        .into();
        let t = RiskTable {
            scopes: &map,
            default: Risk::Low,
        };
        // `*:history` has the longer literal part, so it decides for `read:history`.
        assert_eq!(t.risk_of("read:history"), Risk::Medium);
        // Equal literal lengths: the higher level.
        assert_eq!(t.risk_of("ab"), Risk::Critical);
        assert!(
            !pattern_matches("ab*ba", "aba"),
            "prefix and suffix may not overlap"
        );
        assert!(pattern_matches("ab*ba", "abba"));
        assert!(t.validate().is_ok());
        for bad in ["*", "a**", "a b", "x,y", ""] {
            let m: BTreeMap<String, Risk> = [(bad.to_owned(), Risk::Low)].into();
            assert!(
                RiskTable {
                    scopes: &m,
                    default: Risk::Low
                }
                .validate()
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn windows_parse_strictly() {
        let w = TimeWindow::parse("mon-fri 09:00-18:00 Europe/Berlin").unwrap();
        assert_eq!(w.to_string(), "mon-fri 09:00-18:00 Europe/Berlin");
        for (text, canonical) in [
            ("daily 00:00-24:00 UTC", "daily 00:00-24:00 UTC"),
            (
                "Mon,WED,fri 08:30-12:00 America/New_York",
                "mon,wed,fri 08:30-12:00 America/New_York",
            ),
            ("sat-sun 10:00-14:00 UTC", "sat-sun 10:00-14:00 UTC"),
            (
                "fri-mon 22:00-06:00 Asia/Tokyo",
                "mon,fri-sun 22:00-06:00 Asia/Tokyo",
            ),
            ("mon-sun 07:00-08:00 UTC", "daily 07:00-08:00 UTC"),
            ("  tue   01:00-02:00   UTC ", "tue 01:00-02:00 UTC"),
        ] {
            assert_eq!(
                TimeWindow::parse(text).unwrap().to_string(),
                canonical,
                "{text}"
            );
            // The canonical form parses to the same window.
            assert_eq!(
                TimeWindow::parse(canonical).unwrap(),
                TimeWindow::parse(text).unwrap()
            );
        }
        for (text, says) in [
            ("", "DAYS HH:MM-HH:MM ZONE"),
            ("mon-fri 09:00-18:00", "DAYS HH:MM-HH:MM ZONE"),
            (
                "mon-fri 09:00-18:00 Europe/Berlin extra",
                "DAYS HH:MM-HH:MM ZONE",
            ),
            ("monday 09:00-18:00 UTC", "not a day"),
            ("mon-fry 09:00-18:00 UTC", "not a day"),
            ("mon,,fri 09:00-18:00 UTC", "empty day"),
            ("mon,mon 09:00-18:00 UTC", "listed twice"),
            ("mon-fri,wed 09:00-18:00 UTC", "listed twice"),
            ("mon-mon 09:00-18:00 UTC", "range of one day"),
            ("mon 9:00-18:00 UTC", "not a time"),
            ("mon 09:00-18:60 UTC", "not a time"),
            ("mon 25:00-26:00 UTC", "not a time"),
            ("mon 24:00-06:00 UTC", "not a time"),
            ("mon 09:00 UTC", "HH:MM-HH:MM"),
            ("mon 09:00-09:00 UTC", "same time"),
            ("mon 00:00-00:00 UTC", "same time"),
            ("mon 00:00-24:00 Mars/Olympus", "unknown time zone"),
            ("mon 00:00-24:00 +02:00", "unknown time zone"),
            ("mon 09h00-18h00 UTC", "not a time"),
        ] {
            let e = TimeWindow::parse(text).unwrap_err().0;
            assert!(e.contains(says), "{text}: {e}");
        }
        // Windows round-trip through JSON as their text.
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, "\"mon-fri 09:00-18:00 Europe/Berlin\"");
        assert_eq!(serde_json::from_str::<TimeWindow>(&json).unwrap(), w);
    }

    #[test]
    fn office_hours_follow_the_zone_and_daylight_saving() {
        let w = TimeWindow::parse("mon-fri 09:00-18:00 Europe/Berlin").unwrap();
        // Winter (CET, UTC+1): Monday 2026-01-12.
        assert!(!w.contains(ts("2026-01-12T07:59:59Z")));
        assert!(w.contains(ts("2026-01-12T08:00:00Z")), "09:00 Berlin");
        assert!(w.contains(ts("2026-01-12T16:59:59Z")));
        assert!(
            !w.contains(ts("2026-01-12T17:00:00Z")),
            "18:00 Berlin: the end is excluded"
        );
        // Summer (CEST, UTC+2): Monday 2026-07-13; 09:00 there is 07:00 UTC.
        assert!(!w.contains(ts("2026-07-13T06:59:59Z")));
        assert!(w.contains(ts("2026-07-13T07:00:00Z")));
        assert!(!w.contains(ts("2026-07-13T16:00:00Z")));
        // Weekend.
        assert!(!w.contains(ts("2026-01-17T10:00:00Z")));
        assert_eq!(
            w.local_time(ts("2026-01-17T09:15:00Z")),
            "Sat 10:15 Europe/Berlin"
        );
        // The instant is the same everywhere; the window is in Berlin time: Friday 23:30 in
        // Los Angeles is already Saturday in Berlin.
        assert!(!w.contains(ts("2026-01-17T07:30:00Z")));
    }

    #[test]
    fn dst_boundaries() {
        // Berlin springs forward on Sunday 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC).
        let gap = TimeWindow::parse("sun 02:00-03:00 Europe/Berlin").unwrap();
        for t in [
            "2026-03-29T00:59:59Z",
            "2026-03-29T01:00:00Z",
            "2026-03-29T01:30:00Z",
        ] {
            assert!(!gap.contains(ts(t)), "the skipped hour does not exist: {t}");
        }
        // A week earlier the same window is an hour long.
        assert!(gap.contains(ts("2026-03-22T01:30:00Z")));
        let early = TimeWindow::parse("sun 01:00-04:00 Europe/Berlin").unwrap();
        assert!(early.contains(ts("2026-03-29T00:59:59Z")), "01:59:59 CET");
        assert!(early.contains(ts("2026-03-29T01:00:00Z")), "03:00 CEST");
        assert!(!early.contains(ts("2026-03-29T02:00:00Z")), "04:00 CEST");
        // Berlin falls back on Sunday 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC), so
        // 02:00-03:00 happens twice, and both are inside.
        let twice = TimeWindow::parse("sun 02:00-03:00 Europe/Berlin").unwrap();
        assert!(!twice.contains(ts("2026-10-24T23:59:59Z")), "01:59:59 CEST");
        assert!(twice.contains(ts("2026-10-25T00:00:00Z")), "02:00 CEST");
        assert!(twice.contains(ts("2026-10-25T00:59:59Z")), "02:59:59 CEST");
        assert!(
            twice.contains(ts("2026-10-25T01:00:00Z")),
            "02:00 CET, again"
        );
        assert!(twice.contains(ts("2026-10-25T01:59:59Z")), "02:59:59 CET");
        assert!(!twice.contains(ts("2026-10-25T02:00:00Z")), "03:00 CET");
        // New York: 09:00 local is 14:00 UTC in winter, 13:00 UTC after 2026-03-08.
        let ny = TimeWindow::parse("daily 09:00-10:00 America/New_York").unwrap();
        assert!(
            ny.contains(ts("2026-03-07T14:30:00Z")) && !ny.contains(ts("2026-03-07T13:30:00Z"))
        );
        assert!(
            ny.contains(ts("2026-03-09T13:30:00Z")) && !ny.contains(ts("2026-03-09T14:30:00Z"))
        );
    }

    #[test]
    fn windows_wrap_past_midnight() {
        // Friday 22:00 to Saturday 06:00, and Monday 22:00 to Tuesday 06:00 (UTC).
        let night = TimeWindow::parse("mon,fri 22:00-06:00 UTC").unwrap();
        assert!(night.contains(ts("2026-01-16T22:00:00Z")), "Friday 22:00");
        assert!(
            night.contains(ts("2026-01-17T05:59:59Z")),
            "Saturday 05:59, Friday's window"
        );
        assert!(!night.contains(ts("2026-01-17T06:00:00Z")));
        assert!(
            !night.contains(ts("2026-01-17T22:30:00Z")),
            "Saturday night is not listed"
        );
        assert!(
            !night.contains(ts("2026-01-16T05:00:00Z")),
            "Friday early: Thursday's window, not listed"
        );
        assert!(
            night.contains(ts("2026-01-13T03:00:00Z")),
            "Tuesday 03:00, Monday's window"
        );
        assert!(
            !night.contains(ts("2026-01-12T03:00:00Z")),
            "Monday 03:00: Sunday's window, not listed"
        );
        // Sunday night into Monday wraps around the week too.
        let sunday = TimeWindow::parse("sun 23:00-01:00 UTC").unwrap();
        assert!(sunday.contains(ts("2026-01-12T00:30:00Z")), "Monday 00:30");
        // 24:00 ends at midnight; whole days.
        let whole = TimeWindow::parse("sat 00:00-24:00 UTC").unwrap();
        assert!(
            whole.contains(ts("2026-01-17T00:00:00Z"))
                && whole.contains(ts("2026-01-17T23:59:59Z"))
        );
        assert!(!whole.contains(ts("2026-01-18T00:00:00Z")));
        // Several windows: any one admits.
        let windows = vec![
            TimeWindow::parse("mon-fri 09:00-12:00 UTC").unwrap(),
            TimeWindow::parse("mon-fri 13:00-17:00 UTC").unwrap(),
        ];
        assert!(within_hours(&windows, ts("2026-01-12T10:00:00Z")));
        assert!(!within_hours(&windows, ts("2026-01-12T12:30:00Z")));
        assert!(within_hours(&windows, ts("2026-01-12T13:30:00Z")));
        assert!(
            within_hours(&[], ts("2026-01-12T12:30:00Z")),
            "no windows: any time"
        );
    }

    #[test]
    fn quota_windows() {
        let t = ts("2026-01-12T10:00:00Z");
        assert_eq!(
            QuotaWindow::Minute.index(t),
            QuotaWindow::Minute.index(t + 59)
        );
        assert_ne!(
            QuotaWindow::Minute.index(t),
            QuotaWindow::Minute.index(t + 60)
        );
        assert_eq!(QuotaWindow::Minute.retry_after(t), 60);
        assert_eq!(QuotaWindow::Minute.retry_after(t + 45), 15);
        assert_eq!(QuotaWindow::Minute.retry_after(t + 59), 1);
        assert_eq!(
            QuotaWindow::Day.retry_after(t),
            14 * 3600,
            "until UTC midnight"
        );
        assert_eq!(
            QuotaWindow::Day.index(t),
            QuotaWindow::Day.index(ts("2026-01-12T23:59:59Z"))
        );
        assert_ne!(
            QuotaWindow::Day.index(t),
            QuotaWindow::Day.index(ts("2026-01-13T00:00:00Z"))
        );
        assert_eq!(
            QuotaWindow::Minute.retry_after(-1),
            1,
            "before 1970 still works"
        );

        let q = Quotas {
            agent_per_minute: Some(10),
            user_per_day: Some(100),
            ..Quotas::default()
        };
        let rules = q.rules();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0].counter("agt_a", "usr_u", "con_c"),
            "agent:agt_a:con_c"
        );
        assert_eq!(
            rules[1].counter("agt_a", "usr_u", "con_c"),
            "user:usr_u:con_c"
        );
        assert_eq!(rules[1].flag(), "--user-per-day");
        assert!(q.validate().is_ok());
        for (q, flag) in [
            (
                Quotas {
                    agent_per_minute: Some(0),
                    ..Quotas::default()
                },
                "--per-minute",
            ),
            (
                Quotas {
                    user_per_day: Some(MAX_QUOTA + 1),
                    ..Quotas::default()
                },
                "--user-per-day",
            ),
        ] {
            assert!(q.validate().unwrap_err().0.contains(flag));
        }
        assert!(Quotas::default().is_empty() && Quotas::default().rules().is_empty());
    }

    #[test]
    fn grant_policy_round_trip_and_validation() {
        let scopes = Scopes::parse("read:user repo");
        let p = GrantPolicy {
            risk: [("repo".to_owned(), Risk::Critical)].into(),
            hours: vec![TimeWindow::parse("mon-fri 09:00-18:00 Europe/Berlin").unwrap()],
            max_lifetime: Some(600),
            quotas: Quotas {
                agent_per_minute: Some(5),
                ..Quotas::default()
            },
            token_tool: true,
            unreadable: None,
        };
        p.validate(&scopes).unwrap();
        let json = p.to_json();
        assert_eq!(
            json,
            r#"{"risk":{"repo":"critical"},"hours":["mon-fri 09:00-18:00 Europe/Berlin"],"max_lifetime":600,"quotas":{"agent_per_minute":5},"token_tool":true}"#
        );
        assert_eq!(GrantPolicy::from_stored(&json), p);
        assert_eq!(GrantPolicy::default().to_json(), "{}");
        assert_eq!(GrantPolicy::from_stored("{}"), GrantPolicy::default());
        // What cannot be read releases nothing.
        for bad in [
            "",
            "{\"hours\":[\"never\"]}",
            "{\"risk\":{\"a\":\"huge\"}}",
            "{\"extra\":1}",
        ] {
            assert!(GrantPolicy::from_stored(bad).unreadable.is_some(), "{bad}");
        }
        assert_eq!(p.cap_lifetime(3600), 600);
        assert_eq!(p.cap_lifetime(42), 42);
        assert_eq!(GrantPolicy::default().cap_lifetime(3600), 3600);

        let mut outside = p.clone();
        outside.risk.insert("delete_repo".into(), Risk::Critical);
        assert!(
            outside
                .validate(&scopes)
                .unwrap_err()
                .0
                .contains("not one of the grant's scopes")
        );
        for cap in [0, -1, MAX_LIFETIME_CAP + 1] {
            let q = GrantPolicy {
                max_lifetime: Some(cap),
                ..GrantPolicy::default()
            };
            assert!(
                q.validate(&scopes)
                    .unwrap_err()
                    .0
                    .contains("--max-lifetime")
            );
        }
        let mut twice = p.clone();
        twice
            .hours
            .push(TimeWindow::parse("mon-fri 09:00-18:00 Europe/Berlin").unwrap());
        assert!(twice.validate(&scopes).unwrap_err().0.contains("twice"));
    }

    #[test]
    fn risk_overrides_parse() {
        assert_eq!(
            parse_risk_override("repo=high").unwrap(),
            ("repo".into(), Risk::High)
        );
        assert_eq!(
            parse_risk_override("https://mail.google.com/=critical")
                .unwrap()
                .0,
            "https://mail.google.com/"
        );
        for bad in [
            "repo",
            "=high",
            "repo=",
            "repo=HIGH",
            "re po=low",
            "write:*=low",
        ] {
            assert!(parse_risk_override(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_request_hash_binds_all_four_and_ignores_scope_order() {
        let h = request_hash("agt_a", "usr_u", "github", &Scopes::parse("repo read:user"));
        assert_eq!(
            h,
            request_hash("agt_a", "usr_u", "github", &Scopes::parse("read:user,repo"))
        );
        assert_eq!(h.len(), 43, "SHA-256, base64url without padding");
        for other in [
            request_hash("agt_b", "usr_u", "github", &Scopes::parse("repo read:user")),
            request_hash("agt_a", "usr_v", "github", &Scopes::parse("repo read:user")),
            request_hash("agt_a", "usr_u", "gitlab", &Scopes::parse("repo read:user")),
            request_hash("agt_a", "usr_u", "github", &Scopes::parse("repo")),
            // No ambiguity from joining: the parts are JSON strings.
            request_hash(
                "agt_a",
                "usr_u\",\"github",
                "",
                &Scopes::parse("repo read:user"),
            ),
        ] {
            assert_ne!(h, other);
        }
    }
}
