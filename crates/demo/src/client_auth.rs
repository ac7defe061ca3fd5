//! Client authentication at a provider's token and revocation endpoints (RFC 6749 §2.3.1):
//! HTTP Basic or `client_secret_post`, never both. Shared by the demo provider and the test
//! kit's mock provider, which both play the upstream Latchkey authenticates to.

use axum::http::HeaderValue;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use latchkey_crypto::secrets::{ct_eq, sha256_b64};

/// The client a provider knows.
pub struct Client<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

/// Why client authentication failed.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientAuthError {
    /// 400 `invalid_request` (e.g. two authentication methods at once).
    Request(&'static str),
    /// 401 `invalid_client`.
    Client(&'static str),
}

/// Compare digests so neither the content nor the length of the expected value leaks through
/// timing.
pub fn secret_eq(presented: &str, expected: &str) -> bool {
    ct_eq(
        sha256_b64(presented.as_bytes()).as_bytes(),
        sha256_b64(expected.as_bytes()).as_bytes(),
    )
}

impl Client<'_> {
    fn matches(&self, id: &str, secret: &str) -> bool {
        // Evaluate both comparisons: `&` rather than `&&` keeps the timing independent of
        // which one failed.
        secret_eq(id, self.id) & secret_eq(secret, self.secret)
    }

    /// Authenticate a request by its `Authorization` header or its body's `client_id` and
    /// `client_secret` (empty values count as absent).
    pub fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
        body_client_id: Option<&str>,
        body_secret: Option<&str>,
    ) -> Result<(), ClientAuthError> {
        match (authorization, body_secret) {
            (Some(_), Some(_)) => Err(ClientAuthError::Request(
                "use only one client authentication method",
            )),
            (Some(value), None) => {
                let basic = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                    .and_then(|(_, b64)| STANDARD.decode(b64.trim()).ok())
                    .and_then(|bytes| String::from_utf8(bytes).ok());
                let Some((id, secret)) = basic.as_deref().and_then(|s| s.split_once(':')) else {
                    return Err(ClientAuthError::Client("malformed Authorization header"));
                };
                let mut ok = false;
                for id in basic_candidates(id) {
                    for secret in basic_candidates(secret) {
                        ok |= self.matches(&id, &secret);
                    }
                }
                // A client_id in the body as well must name the same client.
                let body_id_ok = body_client_id.is_none_or(|b| secret_eq(b, self.id));
                if ok && body_id_ok {
                    Ok(())
                } else {
                    Err(ClientAuthError::Client("client authentication failed"))
                }
            }
            (None, Some(secret)) => {
                if self.matches(body_client_id.unwrap_or_default(), secret) {
                    Ok(())
                } else {
                    Err(ClientAuthError::Client("client authentication failed"))
                }
            }
            (None, None) => Err(ClientAuthError::Client("client authentication is required")),
        }
    }
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, `%XX` a byte.
/// A malformed escape is kept literally; the result then simply fails to match.
fn form_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decode one half of HTTP Basic credentials. RFC 6749 §2.3.1 says they are form-urlencoded
/// before base64; many clients skip that, so both the raw and the decoded form are accepted.
fn basic_candidates(raw: &str) -> Vec<String> {
    let decoded = form_decode(raw);
    if decoded == raw {
        vec![raw.to_owned()]
    } else {
        vec![raw.to_owned(), decoded]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_keeps_malformed_escapes() {
        assert_eq!(form_decode("a%2Bb+c%3a"), "a+b c:");
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(form_decode("%zz%4"), "%zz%4");
    }
}
