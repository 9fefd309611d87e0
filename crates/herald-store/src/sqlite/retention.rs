//! [`crate::RetentionStore`] on SQLite, and the batched deletion of an app's data
//! (`sql::retention_store!`, shared with PostgreSQL).
//!
//! Each call is one statement on the writer connection, over at most `limit` rows found by an
//! index, so the group commit waits at most one short batch, and queued writes get the
//! connection between the batches of an app's deletion. Freed pages are reused by later rows:
//! at a steady rate the file stops growing (see the README's "Retention").

use super::SqliteStore;

crate::sql::retention_store!(
    SqliteStore, writer, reader,
    key: "rowid",
    lock: "",
    scope_has_path: "instr(scope, $1 || '/') > 0 OR substr(scope, -length($1)) = $1",
    between_batches: tokio::task::yield_now().await,
);
