//! The token endpoint's body decoding (form and JSON, `Params::from_body`). Oracle: no panic,
//! and whatever is accepted obeys the parameter rules (bounded names and values, no NUL).
#![no_main]

use latchkey_core::params::{MAX_VALUE_LEN, Params};
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 5] = [
    Some("application/x-www-form-urlencoded"),
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("text/plain"),
    None,
];

const NAMES: [&str; 8] = [
    "grant_type",
    "client_id",
    "client_assertion",
    "subject_token",
    "connection",
    "scope",
    "auth_req_id",
    "refresh_token",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let content_type = TYPES[usize::from(pick) % TYPES.len()];
    if let Ok(params) = Params::from_body(content_type, body) {
        for name in NAMES {
            if let Some(v) = params.get(name) {
                assert!(!v.is_empty() && v.len() <= MAX_VALUE_LEN && !v.contains('\0'));
            }
            let _ = params.require(name);
        }
    }
});
