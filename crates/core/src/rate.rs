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

#[cfg(test)]
mod tests {
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
