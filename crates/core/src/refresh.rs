//! Single flight per connected account, within this process.
//!
//! The first request that finds an account's access token stale takes the account's lock and
//! refreshes; the others wait on the same lock, then re-read storage and find the fresh token.
//! Across processes the conditional update on `token_version` fences writers (a PostgreSQL
//! advisory lock joins this for several nodes later).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct RefreshLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Held while refreshing; removes the account's entry when the last holder is done.
pub struct RefreshGuard<'a> {
    owner: &'a RefreshLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl RefreshLocks {
    pub async fn lock(&self, account_id: &str) -> RefreshGuard<'_> {
        let lock = {
            let mut map = self.locks.lock().expect("refresh lock map");
            map.entry(account_id.to_owned()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        RefreshGuard {
            owner: self,
            key: account_id.to_owned(),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap().len()
    }
}

impl Drop for RefreshGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.owner.locks.lock().expect("refresh lock map");
        // Only the map holds it now: nobody waits, so forget the entry.
        if map
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn one_holder_at_a_time_and_entries_are_freed() {
        let locks = Arc::new(RefreshLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (locks, inside, max) = (locks.clone(), inside.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("cac_1").await;
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0);
    }
}
