//! A per-agent request budget per minute (fixed windows, this process). Quotas per grant and
//! per user, consistent across nodes, come with the policy work; this is the floor.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<String, (i64, u32)>>,
}

impl RateLimiter {
    /// Count one request for `key` at `now`; `Err(retry_after_seconds)` once `limit` requests
    /// were already counted in the current minute. A `limit` of 0 means unlimited.
    pub fn check(&self, key: &str, limit: u32, now: i64) -> Result<(), u64> {
        if limit == 0 {
            return Ok(());
        }
        let window = now.div_euclid(60);
        let mut map = self.windows.lock().expect("rate limiter lock");
        if map.len() > 10_000 {
            map.retain(|_, (w, _)| *w == window);
        }
        let entry = map.entry(key.to_owned()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        if entry.1 >= limit {
            return Err((60 - now.rem_euclid(60)).max(1) as u64);
        }
        entry.1 += 1;
        Ok(())
    }
}

/// Failed attempts per key (a username, an address) in a window that starts at the first
/// failure; once `limit` failures are counted, the key is blocked until the window ends.
#[derive(Default)]
pub struct FailureLimiter {
    entries: Mutex<HashMap<String, (i64, u32)>>,
}

impl FailureLimiter {
    /// Seconds until `key` may try again, if it is blocked.
    pub fn blocked(&self, key: &str, limit: u32, window: i64, now: i64) -> Option<u64> {
        let map = self.entries.lock().expect("failure limiter lock");
        match map.get(key) {
            Some((start, count)) if now - start < window && *count >= limit => {
                Some((start + window - now).max(1) as u64)
            }
            _ => None,
        }
    }

    pub fn record(&self, key: &str, window: i64, now: i64) {
        let mut map = self.entries.lock().expect("failure limiter lock");
        if map.len() > 100_000 {
            map.retain(|_, (start, _)| now - *start < window);
        }
        let entry = map.entry(key.to_owned()).or_insert((now, 0));
        if now - entry.0 >= window {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failures_block_until_the_window_ends() {
        let f = super::FailureLimiter::default();
        for t in 0..3 {
            assert_eq!(f.blocked("u", 3, 900, 100 + t), None);
            f.record("u", 900, 100 + t);
        }
        assert_eq!(f.blocked("u", 3, 900, 200), Some(800));
        assert_eq!(f.blocked("other", 3, 900, 200), None);
        assert_eq!(f.blocked("u", 3, 900, 1000), None, "the window ended");
    }

    #[test]
    fn windows() {
        let r = super::RateLimiter::default();
        assert!(r.check("a", 2, 120).is_ok());
        assert!(r.check("a", 2, 130).is_ok());
        assert_eq!(r.check("a", 2, 150), Err(30));
        assert!(r.check("b", 2, 150).is_ok(), "per key");
        assert!(r.check("a", 2, 180).is_ok(), "a new minute");
        assert!(
            r.check("a", 0, 180).is_ok() && r.check("a", 0, 180).is_ok(),
            "0 is unlimited"
        );
    }
}
