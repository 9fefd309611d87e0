//! [`crate::RetentionStore`] on PostgreSQL, and the batched deletion of an app's data
//! (`sql::retention_store!`, shared with SQLite).
//!
//! Several nodes may sweep at once: each batch takes only rows no other transaction holds
//! (`FOR UPDATE SKIP LOCKED`), and deleting or expunging a row twice changes nothing, so two
//! sweepers split the work instead of waiting on each other. Autovacuum makes the space of
//! deleted rows reusable, so at a steady rate the tables stop growing.

use super::PostgresStore;

crate::sql::retention_store!(
    PostgresStore, pool, pool,
    key: "id",
    lock: "FOR UPDATE SKIP LOCKED",
    scope_has_path: "strpos(scope, $1 || '/') > 0 OR right(scope, length($1)) = $1",
);
