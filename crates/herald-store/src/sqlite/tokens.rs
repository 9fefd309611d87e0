//! [`crate::TokenStore`] on SQLite: API token digests, found through the exact cache (every
//! token write goes through this store and clears it, so a revocation takes effect at the next
//! request); writes go through the writer pool. The statements are shared with PostgreSQL
//! (`sql::token_store!`).

use super::{SqliteStore, paginate, rows};
use crate::cache::Cache;

crate::sql::token_store!(SqliteStore, writer, reader);

impl SqliteStore {
    fn token_cache(&self) -> Option<&Cache> {
        Some(&self.cache)
    }

    fn forget_tokens(&self) {
        self.cache.forget_tokens();
    }
}
