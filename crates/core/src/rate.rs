//! Request budgets: a per-agent request budget per minute (the `agent_requests_per_minute`
//! floor, before anything else is checked; counted in this process), and the grants' quotas
//! (per agent and per user, per minute and per day; see [`crate::policy::Quotas`]), in fixed
//! windows.
//!
//! A quota is counted twice over. [`QuotaCounters`] is this process's count, checked when the
//! request is decided, so a request over the limit is refused before it costs an upstream
//! refresh or an approval. The database's count is the one that holds: the release carries its
//! slots ([`QuotaReservation::uses`]) and the store counts them in the release's own
//! transaction, so the limit holds across nodes and restarts.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::policy::QuotaWindow;
use crate::store::QuotaUse;

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

/// The grants' quotas: counters per (who, window), checked and counted under one lock, so a
/// node admits exactly the limit however many requests race for the last slot.
#[derive(Default)]
pub struct QuotaCounters {
    inner: Mutex<QuotaState>,
}

#[derive(Default)]
struct QuotaState {
    counts: HashMap<QuotaKey, u32>,
    /// Drop past windows' counters when the map grows beyond this.
    prune_at: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct QuotaKey {
    counter: String,
    window: QuotaWindow,
    index: i64,
}

/// One limit to check for a request: the counter it reads (`agent:…` or `user:…`), the window,
/// the limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaCheck {
    pub counter: String,
    pub window: QuotaWindow,
    pub limit: u32,
}

/// A check that refused: which one (its index in the request's list), and when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaExceeded {
    pub index: usize,
    pub retry_after: u64,
}

/// Slots taken by an admitted request. Dropped without [`QuotaReservation::keep`] (the request
/// failed later, or was abandoned), it gives them back while their windows last.
#[must_use]
pub struct QuotaReservation<'a> {
    counters: &'a QuotaCounters,
    keys: Vec<QuotaKey>,
    /// Each key's limit.
    limits: Vec<u32>,
}

impl QuotaReservation<'_> {
    /// The slots as the store counts them with the release, in the order of the checks.
    pub fn uses(&self) -> Vec<QuotaUse> {
        self.keys
            .iter()
            .zip(&self.limits)
            .map(|(k, &limit)| QuotaUse {
                key: format!("{}:{}:{}", k.counter, k.window.as_str(), k.index),
                limit,
                window_end: (k.index + 1) * k.window.seconds(),
            })
            .collect()
    }

    /// The request released its token: the slots stay used.
    pub fn keep(mut self) {
        self.keys.clear();
    }
}

impl Drop for QuotaReservation<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut state = self.counters.inner.lock().expect("quota lock");
        for key in self.keys.drain(..) {
            if let Some(n) = state.counts.get_mut(&key) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

const QUOTA_PRUNE_FLOOR: usize = 10_000;

impl QuotaCounters {
    /// Admit a request if every check has room in its current window, counting it in each
    /// (all or nothing). Refused: the check that refused with the longest wait.
    pub fn reserve(
        &self,
        checks: &[QuotaCheck],
        now: i64,
    ) -> Result<QuotaReservation<'_>, QuotaExceeded> {
        if checks.is_empty() {
            return Ok(QuotaReservation {
                counters: self,
                keys: Vec::new(),
                limits: Vec::new(),
            });
        }
        let keys: Vec<QuotaKey> = checks
            .iter()
            .map(|c| QuotaKey {
                counter: c.counter.clone(),
                window: c.window,
                index: c.window.index(now),
            })
            .collect();
        let mut state = self.inner.lock().expect("quota lock");
        let refused = checks
            .iter()
            .zip(&keys)
            .enumerate()
            .filter(|(_, (c, k))| state.counts.get(k).copied().unwrap_or(0) >= c.limit)
            .map(|(index, (c, _))| QuotaExceeded {
                index,
                retry_after: c.window.retry_after(now),
            })
            .max_by_key(|e| e.retry_after);
        if let Some(e) = refused {
            return Err(e);
        }
        if state.counts.len() >= state.prune_at.max(QUOTA_PRUNE_FLOOR) {
            state
                .counts
                .retain(|k, n| *n > 0 && k.index >= k.window.index(now));
            state.prune_at = state.counts.len() * 2;
            if state.counts.len() > 1_000_000 {
                tracing::warn!(
                    counters = state.counts.len(),
                    "quota counters for the current windows are many"
                );
            }
        }
        for k in &keys {
            *state.counts.entry(k.clone()).or_insert(0) += 1;
        }
        Ok(QuotaReservation {
            counters: self,
            keys,
            limits: checks.iter().map(|c| c.limit).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::QuotaWindow;

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

    fn check(counter: &str, window: QuotaWindow, limit: u32) -> super::QuotaCheck {
        super::QuotaCheck {
            counter: counter.into(),
            window,
            limit,
        }
    }

    #[test]
    fn quotas_admit_exactly_the_limit_per_window() {
        let q = super::QuotaCounters::default();
        let c = [check("agent:a:c", QuotaWindow::Minute, 3)];
        let t = 6_000; // a minute boundary
        for i in 0..3 {
            q.reserve(&c, t + i).unwrap().keep();
        }
        let e = q.reserve(&c, t + 20).err().unwrap();
        assert_eq!((e.index, e.retry_after), (0, 40));
        assert!(q.reserve(&c, t + 60).is_ok(), "the next minute");
    }

    #[test]
    fn the_store_counts_each_window_under_its_own_key() {
        let q = super::QuotaCounters::default();
        let checks = [
            check("agent:a:c", QuotaWindow::Minute, 5),
            check("user:u:c", QuotaWindow::Day, 2),
        ];
        let t = 86_400 * 10 + 125;
        let uses = q.reserve(&checks, t).unwrap().uses();
        let keys: Vec<(&str, u32, i64)> = uses
            .iter()
            .map(|u| (u.key.as_str(), u.limit, u.window_end))
            .collect();
        assert_eq!(
            keys,
            [
                ("agent:a:c:minute:14402", 5, 86_400 * 10 + 180),
                ("user:u:c:day:10", 2, 86_400 * 11),
            ]
        );
    }

    #[test]
    fn all_or_nothing_and_refunds() {
        let q = super::QuotaCounters::default();
        let t = 86_400 * 10;
        let both = [
            check("agent:a:c", QuotaWindow::Minute, 5),
            check("user:u:c", QuotaWindow::Day, 2),
        ];
        q.reserve(&both, t).unwrap().keep();
        // A failed request gives its slots back.
        drop(q.reserve(&both, t).unwrap());
        q.reserve(&both, t + 1).unwrap().keep();
        // The day is used up: refused, and the minute counter is not charged for it.
        let e = q.reserve(&both, t + 2).err().unwrap();
        assert_eq!((e.index, e.retry_after), (1, 86_400 - 2));
        let minute_only = [check("agent:a:c", QuotaWindow::Minute, 3)];
        q.reserve(&minute_only, t + 3).unwrap().keep();
        assert!(q.reserve(&minute_only, t + 4).is_err(), "2 + 1 = 3 counted");
        // Another user of the same agent is not affected by the first user's day.
        q.reserve(&[check("user:v:c", QuotaWindow::Day, 2)], t + 5)
            .unwrap()
            .keep();
    }

    #[test]
    fn concurrent_requests_never_exceed_the_limit() {
        let q = std::sync::Arc::new(super::QuotaCounters::default());
        let admitted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (q, admitted) = (q.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        if let Ok(r) = q.reserve(&[check("agent:a:c", QuotaWindow::Day, 1000)], 0) {
                            r.keep();
                            admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(std::sync::atomic::Ordering::Relaxed), 1000);
    }

    #[test]
    fn past_windows_are_pruned() {
        let q = super::QuotaCounters::default();
        for i in 0..(super::QUOTA_PRUNE_FLOOR as i64 + 10) {
            q.reserve(&[check(&format!("agent:{i}:c"), QuotaWindow::Minute, 1)], 0)
                .unwrap()
                .keep();
        }
        // A minute later, once the map has doubled, the old minute's counters go.
        for i in 0..(2 * super::QUOTA_PRUNE_FLOOR as i64) {
            q.reserve(
                &[check(&format!("agent:{i}:d"), QuotaWindow::Minute, 1)],
                60,
            )
            .unwrap()
            .keep();
        }
        let state = q.inner.lock().unwrap();
        assert!(state.counts.keys().all(|k| k.index == 1));
        assert!(state.counts.len() <= 2 * super::QUOTA_PRUNE_FLOOR);
    }
}
