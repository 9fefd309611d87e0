//! What every request and new message needs to read (the API token presented, its app, the
//! app's endpoints, the ingest source a webhook is posted to), kept in memory.
//!
//! Exact, not eventually consistent: every write that could change an entry goes through this
//! store and calls [`Cache::invalidate`] once it has committed. A read that raced with such a
//! write must not put its stale result back, so fills carry the generation they started in and
//! are dropped if an invalidation happened meanwhile. (A store shared by several nodes needs
//! cross-node invalidation; that belongs to the PostgreSQL implementation.)

use herald_core::AppId;
use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use herald_core::model::{App, Endpoint, IngestSource};

use crate::ApiToken;

#[derive(Default)]
pub(crate) struct Cache {
    generation: AtomicU64,
    entries: RwLock<Entries>,
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
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
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
        if self.generation() != generation {
            return;
        }
        entries.tokens.insert(token_hash.to_vec(), token.clone());
    }

    pub(crate) fn source(&self, id: &str) -> Option<IngestSource> {
        self.read().sources.get(id).cloned()
    }

    pub(crate) fn put_source(&self, generation: u64, source: &IngestSource) {
        let mut entries = self.write();
        if self.generation() != generation {
            return;
        }
        entries
            .sources
            .insert(source.id.to_string(), source.clone());
    }

    pub(crate) fn put_app(&self, generation: u64, app: &App) {
        let mut entries = self.write();
        if self.generation() != generation {
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
        if self.generation() != generation {
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
        if self.generation() != generation {
            return;
        }
        entries
            .endpoints
            .insert(app_id.clone(), Arc::clone(endpoints));
    }

    /// Forget everything. Writes to apps, endpoints, tokens and sources are rare next to
    /// messages, so clearing all is simpler than working out which entries a write touched,
    /// and just as fast.
    pub(crate) fn invalidate(&self) {
        let mut entries = self.write();
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
