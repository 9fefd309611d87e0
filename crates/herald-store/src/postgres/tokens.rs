//! [`crate::TokenStore`] on PostgreSQL: API token digests, read from the database on every
//! request (another node's revocation takes effect at once; nothing is cached). The statements
//! are shared with SQLite (`sql::token_store!`).

use super::{PostgresStore, paginate, rows};
use crate::sqlite::cache::Cache;

crate::sql::token_store!(PostgresStore, pool, pool);

impl PostgresStore {
    fn token_cache(&self) -> Option<&Cache> {
        None
    }

    fn forget_tokens(&self) {}
}
