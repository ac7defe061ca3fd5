//! A provider's token response, as the upstream client parses it (plain RFC 6749, and Slack's
//! nested `authed_user` with its own token type). Oracle: no panic; an accepted response has a
//! non-empty access token.
#![no_main]

use latchkey_core::upstream::Wire;
use latchkey_upstream::parse_token_response;
use libfuzzer_sys::fuzz_target;
use secrecy::ExposeSecret;

fuzz_target!(|data: &[u8]| {
    let plain = Wire::default();
    let nested = Wire {
        token_nested_in: Some("authed_user".into()),
        token_types: vec!["user".into()],
        assumed_expires_in: Some(3600),
        ..Wire::default()
    };
    for wire in [&plain, &nested] {
        if let Ok(tokens) = parse_token_response(data, wire) {
            assert!(!tokens.access_token.expose_secret().is_empty());
        }
    }
});
