//! [`crate::TokenStore`] on SQLite: API token digests, read from the database on every request
//! (a revocation takes effect at once); writes go through the writer pool. The statements are
//! shared with PostgreSQL (`sql::token_store!`).

use super::{SqliteStore, paginate, rows};

crate::sql::token_store!(SqliteStore, writer, reader);
