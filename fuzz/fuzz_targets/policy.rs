//! Policy evaluation: a stored grant policy (JSON) read back, validated and applied — risk
//! assessment, hours, quotas, the lifetime cap — and the `--hours` / `--risk` flag parsers.
//! Oracle: no panic; a readable policy survives its own serialisation unchanged.
#![no_main]

use std::collections::BTreeMap;

use latchkey_core::policy::{
    GrantPolicy, Risk, RiskTable, TimeWindow, assess, parse_risk_override, within_hours,
};
use latchkey_core::scope::Scopes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let unix = i64::from_le_bytes(data[..8].try_into().unwrap());
    let Ok(text) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    let _ = TimeWindow::parse(text);
    let _ = parse_risk_override(text);
    let policy = GrantPolicy::from_stored(text);
    if policy.unreadable.is_none() {
        assert_eq!(GrantPolicy::from_stored(&policy.to_json()), policy);
    }
    let grant_scopes = Scopes::parse("repo read:user admin:org delete_repo");
    let _ = policy.validate(&grant_scopes);
    let _ = within_hours(&policy.hours, unix);
    for w in &policy.hours {
        let _ = w.contains(unix);
        let _ = w.local_time(unix);
    }
    for rule in policy.quotas.rules() {
        let _ = rule.counter("agt_a", "usr_b", "con_c");
    }
    let _ = policy.cap_lifetime(unix);
    let table: BTreeMap<String, Risk> = [
        ("repo".to_owned(), Risk::High),
        ("admin:*".to_owned(), Risk::Critical),
    ]
    .into();
    let assessed = assess(
        &grant_scopes,
        RiskTable {
            scopes: &table,
            default: Risk::Low,
        },
        &policy.risk,
    );
    let _ = assessed.requirement();
    let _ = assessed.riskiest();
});
