//! An in-memory token cache with single-flight fetching.
//!
//! Each key holds either a value that is fresh until some instant, or the one fetch in flight
//! for it. A caller that finds a fresh value gets it without any network traffic; callers that
//! find none while a fetch is in flight join that fetch (one request however many ask); the
//! first caller to find neither starts the fetch. The map's lock is held only to look up or
//! update a slot, never across an await, so keys never wait for one another.
//!
//! The fetch runs as a task of its own: a caller that gives up (its future dropped, a timeout)
//! does not cancel the request the others are waiting for, and the result is stored anyway.
//! Errors are shared with the callers of that flight and not cached: the next call tries again.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use crate::Error;

/// Slots beyond this many are swept of stale values when a new fetch starts.
const SWEEP_ABOVE: usize = 256;

/// A fetched value and the instant (Unix seconds) until which it may be served from the cache.
pub(crate) struct Fresh<V> {
    pub value: V,
    pub fresh_until: i64,
}

type Flight<V> = Shared<BoxFuture<'static, Result<V, Error>>>;

enum Slot<V> {
    Ready { value: V, fresh_until: i64 },
    Fetching { flight: u64, result: Flight<V> },
}

struct Slots<K, V> {
    map: HashMap<K, Slot<V>>,
    next_flight: u64,
}

pub(crate) struct Cache<K, V> {
    slots: Arc<Mutex<Slots<K, V>>>,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self {
            slots: Arc::new(Mutex::new(Slots {
                map: HashMap::new(),
                next_flight: 0,
            })),
        }
    }
}

impl<K, V> Cache<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The value for `key`: from the cache if it is fresh at `now`, else from the fetch in
    /// flight, else from a new fetch made by `fetch`.
    pub(crate) async fn get<F, Fut>(&self, key: K, now: i64, fetch: F) -> Result<V, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fresh<V>, Error>> + Send + 'static,
    {
        let flight = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            match slots.map.get(&key) {
                Some(Slot::Ready { value, fresh_until }) if *fresh_until > now => {
                    return Ok(value.clone());
                }
                Some(Slot::Fetching { result, .. }) => result.clone(),
                _ => {
                    if slots.map.len() > SWEEP_ABOVE {
                        slots.map.retain(|_, s| match s {
                            Slot::Ready { fresh_until, .. } => *fresh_until > now,
                            Slot::Fetching { .. } => true,
                        });
                    }
                    slots.next_flight += 1;
                    let id = slots.next_flight;
                    let fut = fetch();
                    let shared = Arc::clone(&self.slots);
                    let k = key.clone();
                    // The task's own update of the slot waits for this lock, so it always
                    // finds the `Fetching` slot inserted below.
                    let task = tokio::spawn(async move {
                        let out = fut.await;
                        let mut slots = shared.lock().unwrap_or_else(PoisonError::into_inner);
                        let ours = matches!(
                            slots.map.get(&k),
                            Some(Slot::Fetching { flight, .. }) if *flight == id
                        );
                        match &out {
                            Ok(f) if ours => {
                                slots.map.insert(
                                    k,
                                    Slot::Ready {
                                        value: f.value.clone(),
                                        fresh_until: f.fresh_until,
                                    },
                                );
                            }
                            Err(_) if ours => {
                                slots.map.remove(&k);
                            }
                            _ => {}
                        }
                        out.map(|f| f.value)
                    });
                    let result = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Error::Protocol {
                                status: None,
                                description: format!("the token request failed: {e}"),
                            })
                        })
                    }
                    .boxed()
                    .shared();
                    slots.map.insert(
                        key,
                        Slot::Fetching {
                            flight: id,
                            result: result.clone(),
                        },
                    );
                    result
                }
            }
        };
        flight.await
    }

    /// Store a value fetched some other way (a token redeemed after an approval).
    pub(crate) fn insert(&self, key: K, fresh: Fresh<V>) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.map.insert(
            key,
            Slot::Ready {
                value: fresh.value,
                fresh_until: fresh.fresh_until,
            },
        );
    }

    /// Forget the cached value for `key` if `stale` says so (a fetch in flight is kept).
    pub(crate) fn forget(&self, key: &K, stale: impl FnOnce(&V) -> bool) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(Slot::Ready { value, .. }) = slots.map.get(key)
            && stale(value)
        {
            slots.map.remove(key);
        }
    }

    /// Forget every cached value.
    pub(crate) fn clear(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.map.retain(|_, s| matches!(s, Slot::Fetching { .. }));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn counted(
        fetches: &Arc<AtomicUsize>,
        value: &'static str,
        fresh_until: i64,
        delay: Duration,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<Fresh<String>, Error>> {
        let fetches = Arc::clone(fetches);
        move || {
            async move {
                fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                Ok(Fresh {
                    value: value.to_owned(),
                    fresh_until,
                })
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn fresh_values_are_served_until_their_instant() {
        let cache: Cache<&str, String> = Cache::default();
        let n = Arc::new(AtomicUsize::new(0));
        let get = |now, v| cache.get("k", now, counted(&n, v, 1100, Duration::ZERO));
        assert_eq!(get(1000, "a").await.unwrap(), "a");
        assert_eq!(get(1000, "b").await.unwrap(), "a");
        assert_eq!(get(1099, "b").await.unwrap(), "a");
        assert_eq!(n.load(Ordering::SeqCst), 1);
        // At the instant itself the value is stale: fetched again.
        assert_eq!(get(1100, "b").await.unwrap(), "b");
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let cache: Arc<Cache<&str, String>> = Arc::new(Cache::default());
        let n = Arc::new(AtomicUsize::new(0));
        let calls = (0..100).map(|_| {
            let (cache, n) = (Arc::clone(&cache), Arc::clone(&n));
            tokio::spawn(async move {
                cache
                    .get("k", 0, counted(&n, "v", 10, Duration::from_millis(50)))
                    .await
            })
        });
        for call in futures_util::future::join_all(calls).await {
            assert_eq!(call.unwrap().unwrap(), "v");
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn keys_do_not_wait_for_each_other() {
        let cache: Cache<&str, String> = Cache::default();
        let n = Arc::new(AtomicUsize::new(0));
        // A fetch for `slow` that takes an hour does not hold up `fast`.
        let slow = cache.get("slow", 0, counted(&n, "s", 10, Duration::from_secs(3600)));
        let fast = cache.get("fast", 0, counted(&n, "f", 10, Duration::ZERO));
        tokio::select! {
            _ = slow => panic!("the slow fetch finished first"),
            v = fast => assert_eq!(v.unwrap(), "f"),
        }
    }

    #[tokio::test]
    async fn errors_are_shared_but_not_cached() {
        let cache: Arc<Cache<&str, String>> = Arc::new(Cache::default());
        let n = Arc::new(AtomicUsize::new(0));
        let failing = |n: &Arc<AtomicUsize>| {
            let n = Arc::clone(n);
            move || {
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<Fresh<String>, _>(Error::Config("no".into()))
                }
                .boxed()
            }
        };
        let calls = (0..10).map(|_| {
            let (cache, n) = (Arc::clone(&cache), Arc::clone(&n));
            tokio::spawn(async move { cache.get("k", 0, failing(&n)).await })
        });
        for call in futures_util::future::join_all(calls).await {
            assert!(matches!(call.unwrap(), Err(Error::Config(_))));
        }
        assert_eq!(n.load(Ordering::SeqCst), 1, "one flight for all ten");
        assert!(cache.get("k", 0, failing(&n)).await.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 2, "the next call tries again");
    }

    #[tokio::test]
    async fn a_caller_giving_up_does_not_cancel_the_fetch() {
        let cache: Cache<&str, String> = Cache::default();
        let n = Arc::new(AtomicUsize::new(0));
        let first = cache.get("k", 0, counted(&n, "v", 10, Duration::from_millis(100)));
        assert!(
            tokio::time::timeout(Duration::from_millis(10), first)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Stored by the fetch's own task although nobody waited for it.
        assert_eq!(
            cache
                .get("k", 0, counted(&n, "w", 10, Duration::ZERO))
                .await
                .unwrap(),
            "v"
        );
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn forget_drops_only_a_matching_value() {
        let cache: Cache<&str, String> = Cache::default();
        let n = Arc::new(AtomicUsize::new(0));
        cache
            .get("k", 0, counted(&n, "v", 10, Duration::ZERO))
            .await
            .unwrap();
        cache.forget(&"k", |v| v == "other");
        cache
            .get("k", 0, counted(&n, "w", 10, Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        cache.forget(&"k", |v| v == "v");
        let v = cache
            .get("k", 0, counted(&n, "w", 10, Duration::ZERO))
            .await
            .unwrap();
        assert_eq!((v.as_str(), n.load(Ordering::SeqCst)), ("w", 2));
    }
}
