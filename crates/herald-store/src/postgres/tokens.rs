//! [`crate::TokenStore`] on PostgreSQL: API token digests, read from the database on every
//! request (a revocation takes effect at once). The statements are shared with SQLite
//! (`sql::token_store!`).

use super::{PostgresStore, paginate, rows};

crate::sql::token_store!(PostgresStore, pool, pool);
