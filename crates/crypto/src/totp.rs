//! TOTP (RFC 6238): HMAC-SHA-1, 30-second steps, 6 digits — what every authenticator app
//! speaks. A code is accepted for the current step and one step either side (clock drift);
//! callers store the last accepted step so a code cannot be used twice.

use aws_lc_rs::hmac;

pub const STEP_SECONDS: i64 = 30;
pub const DIGITS: u32 = 6;

/// A fresh 160-bit seed (the size RFC 4226 recommends).
pub fn generate_seed() -> Vec<u8> {
    crate::secrets::random_bytes(20)
}

/// The step a Unix time falls in.
pub fn step_at(unix: i64) -> i64 {
    unix.div_euclid(STEP_SECONDS)
}

/// The code for `step` with `digits` digits (RFC 4226 dynamic truncation).
pub fn code_for_step(seed: &[u8], step: i64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, seed);
    let mac = hmac::sign(&key, &(step as u64).to_be_bytes());
    let mac = mac.as_ref();
    let offset = (mac[19] & 0x0f) as usize;
    let binary = u32::from_be_bytes([
        mac[offset] & 0x7f,
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]);
    binary % 10u32.pow(digits)
}

/// The 6-digit code at `unix`, zero-padded.
pub fn code_at(seed: &[u8], unix: i64) -> String {
    format!("{:06}", code_for_step(seed, step_at(unix), DIGITS))
}

/// The step whose code `code` is, within one step of `unix`, if any. Non-digit input or a
/// wrong length never matches. Compared in constant time.
pub fn verify(seed: &[u8], code: &str, unix: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_at(unix);
    (now - 1..=now + 1).find(|step| {
        let expected = format!("{:06}", code_for_step(seed, *step, DIGITS));
        crate::secrets::ct_eq(expected.as_bytes(), code.as_bytes())
    })
}

/// RFC 4648 base32 without padding, as authenticator apps expect.
pub fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in data {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The `otpauth://` URI an authenticator app scans.
pub fn otpauth_uri(issuer: &str, account: &str, seed: &[u8]) -> String {
    let enc = |s: &str| -> String { url_escape(s) };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECONDS}",
        enc(issuer),
        enc(account),
        base32(seed),
        enc(issuer)
    )
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6238 Appendix B, SHA-1, 8 digits.
    const SEED: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_vectors() {
        for (time, expected) in [
            (59, 94287082),
            (1111111109, 7081804),
            (1111111111, 14050471),
            (1234567890, 89005924),
            (2000000000, 69279037),
            (20000000000, 65353130),
        ] {
            assert_eq!(code_for_step(SEED, step_at(time), 8), expected, "t={time}");
        }
        assert_eq!(code_at(SEED, 59), "287082");
    }

    #[test]
    fn window_and_garbage() {
        let now = 1_700_000_000;
        let code = code_at(SEED, now);
        assert_eq!(verify(SEED, &code, now), Some(step_at(now)));
        assert_eq!(
            verify(SEED, &code, now + 30),
            Some(step_at(now)),
            "one step late is fine"
        );
        assert_eq!(
            verify(SEED, &code, now + 90),
            None,
            "three steps late is not"
        );
        for bad in ["", "12345", "1234567", "abcdef", "12 345"] {
            assert_eq!(verify(SEED, bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn base32_and_uri() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI"); // RFC 4648 §10
        assert_eq!(base32(b"f"), "MY");
        let uri = otpauth_uri("Latchkey", "alice@example", SEED);
        assert!(uri.starts_with("otpauth://totp/Latchkey:alice%40example?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Latchkey"));
    }
}
