//! The token exchange's memory of the configuration: agents (by client-secret digest and by
//! id), their parsed public keys, connections by name, and grants.
//!
//! A token-vault exchange reads all of these; reading them from the database on every request
//! cost more than everything else the exchange does. They change rarely (an operator's edit),
//! so they are kept here — but never trusted past the database: the store keeps a
//! configuration revision that every change to those tables moves forward (database triggers,
//! so a change by the CLI or another node counts), and
//!
//! - a request takes the revision of the cache when it starts ([`ConfigCache::begin`]); every
//!   entry it then sees was loaded at that revision or later;
//! - its release commits only if the database is still at that revision
//!   ([`crate::store::Store::commit_release`]), else it changes nothing and the request is
//!   decided again from fresh reads;
//! - a refusal decided from the cache is re-checked the same way before it is answered, so an
//!   agent that was just registered or granted is not refused from an old memory.
//!
//! An entry is stored only under the revision its request started at and only while the cache
//! is still at that revision, so a slow request cannot put an old row into a newer cache.
//! Misses (an unknown secret, a missing grant) are never stored; each map is cleared when it
//! reaches [`MAX_ENTRIES`].

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use latchkey_crypto::jws::PublicKey;

use crate::model::{Agent, Connection, Grant};
use crate::store::{Store, StoreResult};

/// Entries per map, at most; a full map is emptied (configuration is small, so this only
/// bounds memory against a pathological registry).
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub(super) struct ConfigCache {
    inner: Mutex<Generation>,
}

/// Everything loaded at one revision (or later).
#[derive(Default)]
pub(super) struct Generation {
    revision: Option<i64>,
    pub(super) agents_by_secret: HashMap<String, Agent>,
    pub(super) agents: HashMap<String, Agent>,
    pub(super) keys: HashMap<String, Arc<Vec<PublicKey>>>,
    pub(super) connections: HashMap<String, Connection>,
    pub(super) grants: HashMap<(String, String), Grant>,
}

/// Which map of a [`Generation`].
pub(super) type Pick<K, V> = fn(&mut Generation) -> &mut HashMap<K, V>;

impl ConfigCache {
    /// The revision a request is decided at: the cache's, or the store's when the cache has
    /// none yet.
    pub(super) async fn begin(&self, store: &dyn Store) -> StoreResult<i64> {
        if let Some(r) = self.inner.lock().expect("config cache lock").revision {
            return Ok(r);
        }
        let r = store.config_revision().await?;
        self.advance(r);
        Ok(r)
    }

    /// The store is at `revision`: forget everything older. A cache already there (or past it,
    /// after a concurrent request saw a newer one) is left as it is.
    pub(super) fn advance(&self, revision: i64) {
        let mut g = self.inner.lock().expect("config cache lock");
        if g.revision.is_none_or(|r| r < revision) {
            *g = Generation {
                revision: Some(revision),
                ..Generation::default()
            };
        }
    }

    /// Through the cache when a request is decided at a revision (`at`), else straight from
    /// the store (`load`): the entry under `key`, or what `load` finds (stored if the cache is
    /// still at `at`).
    pub(super) async fn through<K, V, F>(
        &self,
        at: Option<i64>,
        pick: Pick<K, V>,
        key: K,
        load: F,
    ) -> StoreResult<Option<V>>
    where
        K: Hash + Eq,
        V: Clone,
        F: Future<Output = StoreResult<Option<V>>>,
    {
        let Some(at) = at else {
            return load.await;
        };
        {
            let mut g = self.inner.lock().expect("config cache lock");
            if let Some(v) = pick(&mut g).get(&key) {
                return Ok(Some(v.clone()));
            }
        }
        let found = load.await?;
        if let Some(v) = &found {
            let mut g = self.inner.lock().expect("config cache lock");
            if g.revision == Some(at) {
                let map = pick(&mut g);
                if map.len() >= MAX_ENTRIES {
                    map.clear();
                }
                map.insert(key, v.clone());
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(name: &str) -> Connection {
        Connection {
            id: format!("con_{name}"),
            name: name.into(),
            provider: "demo".into(),
            client_id: "c".into(),
            client_secret: None,
            authorize_url: String::new(),
            token_url: String::new(),
            revoke_url: None,
            userinfo_url: None,
            api_base_url: None,
            issuer: None,
            scopes: crate::scope::Scopes::parse("read"),
            keep_alive_secs: None,
            created_at: 0,
        }
    }

    async fn found(c: Connection) -> StoreResult<Option<Connection>> {
        Ok(Some(c))
    }

    #[tokio::test]
    async fn entries_are_kept_only_under_the_revision_they_were_loaded_at() {
        let cache = ConfigCache::default();
        cache.advance(5);
        let pick: Pick<String, Connection> = |g| &mut g.connections;
        // Loaded at 5 while the cache is at 5: kept, and answered without loading again.
        cache
            .through(Some(5), pick, "a".into(), found(conn("a")))
            .await
            .unwrap();
        let again = cache
            .through(Some(5), pick, "a".into(), async { Ok(None) })
            .await
            .unwrap();
        assert_eq!(again.unwrap().id, "con_a");
        // A request that started at 5 finishes its load after the cache moved to 6: not kept.
        cache.advance(6);
        cache
            .through(Some(5), pick, "b".into(), found(conn("b")))
            .await
            .unwrap();
        let b = cache
            .through(Some(6), pick, "b".into(), async { Ok(None) })
            .await
            .unwrap();
        assert!(b.is_none(), "an entry loaded at an older revision leaked");
        // Moving forward forgot `a`; moving back is ignored.
        let a = cache
            .through(Some(6), pick, "a".into(), async { Ok(None) })
            .await
            .unwrap();
        assert!(a.is_none());
        cache
            .through(Some(6), pick, "c".into(), found(conn("c")))
            .await
            .unwrap();
        cache.advance(4);
        let c = cache
            .through(Some(6), pick, "c".into(), async { Ok(None) })
            .await
            .unwrap();
        assert!(
            c.is_some(),
            "an older revision must not clear a newer cache"
        );
    }

    #[tokio::test]
    async fn misses_are_not_stored() {
        let cache = ConfigCache::default();
        cache.advance(1);
        let pick: Pick<String, Connection> = |g| &mut g.connections;
        assert!(
            cache
                .through(Some(1), pick, "x".into(), async { Ok(None) })
                .await
                .unwrap()
                .is_none()
        );
        let x = cache
            .through(Some(1), pick, "x".into(), found(conn("x")))
            .await
            .unwrap();
        assert_eq!(x.unwrap().id, "con_x");
    }
}
