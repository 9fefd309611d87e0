//! What every request and new message needs to read (the API token presented, its app, the
//! app's endpoints, the ingest source a webhook is posted to), kept in memory.
//!
//! Every write of this node that could change an entry calls [`Cache::invalidate`] once it has
//! committed, so this node reads its own writes at once. A read that raced with such a write
//! must not put its stale result back, so fills carry the generation they started in and are
//! dropped if an invalidation happened meanwhile.
//!
//! - **SQLite**: one process owns the database, so that is all it takes: the cache is exact.
//! - **PostgreSQL**: other nodes write too. Their commits reach this node as a notification
//!   (`postgres::CONFIG_CHANNEL`, sent by triggers on the tables, so no write path can forget
//!   it), which its broker's LISTEN session turns into [`Cache::invalidate`]: a change made on
//!   another node is seen here once its notification has arrived. The cache serves only while
//!   that session is open: it starts paused, [`Cache::resume`] when the session listens, and
//!   [`Cache::pause`] the moment it is lost, until a new one listens (what was notified
//!   meanwhile was not heard, so both empty it).

use herald_core::AppId;
use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use herald_core::model::{App, Endpoint, IngestSource};

use crate::ApiToken;

/// See the module doc. `Default` serves from the start (SQLite); [`Cache::paused`] waits for
/// [`Cache::resume`] (PostgreSQL).
pub struct Cache {
    generation: AtomicU64,
    /// Whether lookups may be answered and fills kept. Changed only under the entries' write
    /// lock, with the generation, so a fill checks both at once.
    serving: AtomicBool,
    entries: RwLock<Entries>,
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            generation: AtomicU64::new(0),
            serving: AtomicBool::new(true),
            entries: RwLock::default(),
        }
    }
}

#[derive(Default)]
struct Entries {
    /// Keyed by id (and by the extra keys of [`Cache::put_app_as`]).
    apps: HashMap<String, App>,
    /// Keyed by uid, apart from ids: a lookup tries ids first, so a uid that happens to equal
    /// another app's id can never shadow that app.
    apps_by_uid: HashMap<String, App>,
    endpoints: HashMap<AppId, Arc<Vec<Endpoint>>>,
    /// Tokens found, by the digest presented. Only stored tokens get here, so the map is as
    /// large as the token table at most; an unknown digest is looked up every time.
    tokens: HashMap<Vec<u8>, ApiToken>,
    /// Ingest sources found, by id (their secrets decrypted: a read from the store decrypts
    /// them too). Only stored sources get here, as with tokens.
    sources: HashMap<String, IngestSource>,
}

impl Cache {
    /// A cache that answers nothing and keeps nothing until [`Cache::resume`].
    pub fn paused() -> Self {
        let cache = Self::default();
        cache.serving.store(false, Ordering::Release);
        cache
    }

    /// Stop serving and forget everything: this node can no longer hear other nodes' changes
    /// (its LISTEN session is lost). Every lookup goes to the store until [`Cache::resume`].
    pub fn pause(&self) {
        self.set_serving(false);
    }

    /// Serve again, from empty: this node hears other nodes' changes from now on. A fill
    /// started before (it may hold what an unheard change replaced) is dropped.
    pub fn resume(&self) {
        self.set_serving(true);
    }

    /// Whether lookups are answered from memory.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    fn set_serving(&self, serving: bool) {
        let mut entries = self.write();
        self.serving.store(serving, Ordering::Release);
        self.clear(&mut entries);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A lookup through the cache: `cached` if it had the entry, else what `read` finds in the
    /// store, handed to `keep` (one of the `put_*`) with the generation taken before the read
    /// began, so a read that raced an invalidation is not kept. `read` is a future, so it does
    /// not start before this takes the generation. What the store lacks is not remembered.
    pub(crate) async fn read_through<T>(
        &self,
        cached: Option<T>,
        read: impl std::future::Future<Output = crate::Result<Option<T>>>,
        keep: impl FnOnce(&Self, u64, &T),
    ) -> crate::Result<Option<T>> {
        if cached.is_some() {
            return Ok(cached);
        }
        let generation = self.generation();
        let found = read.await?;
        if let Some(value) = &found {
            keep(self, generation, value);
        }
        Ok(found)
    }

    /// Whether a fill that started in `generation` may be kept: nothing was invalidated since,
    /// and the cache serves. Called under the write lock.
    fn keeps(&self, generation: u64) -> bool {
        self.generation() == generation && self.is_serving()
    }

    pub(crate) fn app(&self, id_or_uid: &str) -> Option<App> {
        let entries = self.read();
        if let Some(app) = entries.apps.get(id_or_uid) {
            return Some(app.clone());
        }
        // Something shaped like an app id is an id: a miss goes to the store, whose lookup ranks
        // an exact id first, never to a uid (older versions let uids look like ids).
        if herald_core::id::has_prefix(id_or_uid, herald_core::id::APP) {
            return None;
        }
        entries.apps_by_uid.get(id_or_uid).cloned()
    }

    pub(crate) fn endpoints(&self, app_id: &str) -> Option<Arc<Vec<Endpoint>>> {
        self.read().endpoints.get(app_id).cloned()
    }

    /// One endpoint of `app_id`'s cached list, if the list is cached.
    pub(crate) fn endpoint(&self, app_id: &str, id: &str) -> Option<Endpoint> {
        let entries = self.read();
        let endpoints = entries.endpoints.get(app_id)?;
        endpoints.iter().find(|e| e.id.as_str() == id).cloned()
    }

    pub(crate) fn token(&self, token_hash: &[u8]) -> Option<ApiToken> {
        self.read().tokens.get(token_hash).cloned()
    }

    pub(crate) fn put_token(&self, generation: u64, token_hash: &[u8], token: &ApiToken) {
        let mut entries = self.write();
        if !self.keeps(generation) {
            return;
        }
        entries.tokens.insert(token_hash.to_vec(), token.clone());
    }

    pub(crate) fn source(&self, id: &str) -> Option<IngestSource> {
        self.read().sources.get(id).cloned()
    }

    pub(crate) fn put_source(&self, generation: u64, source: &IngestSource) {
        let mut entries = self.write();
        if !self.keeps(generation) {
            return;
        }
        entries
            .sources
            .insert(source.id.to_string(), source.clone());
    }

    pub(crate) fn put_app(&self, generation: u64, app: &App) {
        let mut entries = self.write();
        if !self.keeps(generation) {
            return;
        }
        entries.apps.insert(app.id.to_string(), app.clone());
        if let Some(uid) = &app.uid {
            entries.apps_by_uid.insert(uid.clone(), app.clone());
        }
    }

    /// Remembers `app` under an extra lookup key (its Pusher key or numeric id).
    pub(crate) fn put_app_as(&self, generation: u64, key: &str, app: &App) {
        let mut entries = self.write();
        if !self.keeps(generation) {
            return;
        }
        entries.apps.insert(key.to_owned(), app.clone());
    }

    pub(crate) fn put_endpoints(
        &self,
        generation: u64,
        app_id: &AppId,
        endpoints: &Arc<Vec<Endpoint>>,
    ) {
        let mut entries = self.write();
        if !self.keeps(generation) {
            return;
        }
        entries
            .endpoints
            .insert(app_id.clone(), Arc::clone(endpoints));
    }

    /// Forget everything. Writes to apps, endpoints, tokens and sources are rare next to
    /// messages, so clearing all is simpler than working out which entries a write touched,
    /// and just as fast.
    pub fn invalidate(&self) {
        let mut entries = self.write();
        self.clear(&mut entries);
    }

    /// Forget the tokens only (one was removed): the rest stays, so revocations, rare as they
    /// are, cost no other entry. Fills of any kind started before are dropped.
    pub fn forget_tokens(&self) {
        let mut entries = self.write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.tokens.clear();
    }

    fn clear(&self, entries: &mut Entries) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        entries.apps.clear();
        entries.apps_by_uid.clear();
        entries.endpoints.clear();
        entries.tokens.clear();
        entries.sources.clear();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        crate::conformance::app("cached")
    }

    #[test]
    fn a_fill_is_kept_only_if_nothing_was_invalidated_since_it_started() {
        let cache = Cache::default();
        let app = app();
        let started = cache.generation();
        cache.invalidate();
        cache.put_app(started, &app);
        assert!(
            cache.app(app.id.as_str()).is_none(),
            "raced an invalidation"
        );
        cache.put_app(cache.generation(), &app);
        assert_eq!(cache.app(app.id.as_str()).map(|a| a.id), Some(app.id));
    }

    #[test]
    fn a_paused_cache_keeps_nothing_and_a_resumed_one_drops_fills_begun_before() {
        let cache = Cache::paused();
        let app = app();
        assert!(!cache.is_serving());
        cache.put_app(cache.generation(), &app);
        assert!(cache.app(app.id.as_str()).is_none(), "paused: nothing kept");

        // A read that began while paused may hold what an unheard change replaced.
        let begun_paused = cache.generation();
        cache.resume();
        cache.put_app(begun_paused, &app);
        assert!(cache.app(app.id.as_str()).is_none());
        cache.put_app(cache.generation(), &app);
        assert!(cache.app(app.id.as_str()).is_some(), "serving");

        cache.pause();
        assert!(cache.app(app.id.as_str()).is_none(), "pausing empties it");
        assert!(!cache.is_serving());
    }
}
