//! [`crate::TokenStore`] on PostgreSQL: API token digests, read through the node cache (see
//! the module doc of `postgres`: another node's revocation takes effect here once its
//! notification has arrived). The statements are shared with SQLite (`sql::token_store!`).

use super::{PostgresStore, paginate, rows};
use crate::cache::Cache;

crate::sql::token_store!(PostgresStore, pool, pool);

impl PostgresStore {
    fn token_cache(&self) -> Option<&Cache> {
        Some(&self.cache)
    }

    fn forget_tokens(&self) {
        self.cache.forget_tokens();
    }
}
