//! [`RetentionStore`] on SQLite, and the batched deletion of an app's data.
//!
//! Each call is one statement on the writer connection, over at most `limit` rows found by an
//! index (message, attempt and received-request ids sort by creation time, so "older than" is
//! a range of the primary key), so the group commit waits at most one short batch. Freed pages
//! are reused by later rows: at a steady rate the file stops growing (see the README's
//! "Retention").

use chrono::{DateTime, Utc};
use herald_core::{AppId, id, model::EXPIRED_PAYLOAD};
use sqlx::Row;

use super::{SqliteStore, rows::millis};
use crate::{RETENTION_BATCH, Result, RetentionStore};

/// Deliveries in these states still need their message's payload (pending, sending).
const UNDONE: &str = "d.status IN (1, 3)";

#[async_trait::async_trait]
impl RetentionStore for SqliteStore {
    async fn expire_payloads(
        &self,
        now: DateTime<Utc>,
        recheck_at: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE messages SET payload = $1, payload_expires_at = NULL
             WHERE rowid IN (
                 SELECT m.rowid FROM messages m
                 WHERE m.payload_expires_at <= $2
                   AND NOT EXISTS (SELECT 1 FROM deliveries d
                                   WHERE d.msg_id = m.id AND {UNDONE})
                 ORDER BY m.payload_expires_at LIMIT $3)"
        )))
        .bind(EXPIRED_PAYLOAD.as_bytes())
        .bind(millis(now))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        // Payloads past their time whose deliveries are still under way are looked at again
        // later, not at every batch: left at the head of the index, a long backlog of them
        // (an endpoint down for a day) would be walked past by every statement.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE messages SET payload_expires_at = $1
             WHERE rowid IN (
                 SELECT m.rowid FROM messages m
                 WHERE m.payload_expires_at <= $2
                   AND EXISTS (SELECT 1 FROM deliveries d
                               WHERE d.msg_id = m.id AND {UNDONE})
                 ORDER BY m.payload_expires_at LIMIT $3)"
        )))
        .bind(millis(recheck_at))
        .bind(millis(now))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn expunge_payload(&self, app_id: &AppId, id_or_event_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE messages SET payload = $1, payload_expires_at = NULL
             WHERE rowid = (SELECT rowid FROM messages WHERE app_id = $2
                            AND (id = $3 OR event_id = $3) ORDER BY id = $3 DESC LIMIT 1)",
        )
        .bind(EXPIRED_PAYLOAD.as_bytes())
        .bind(app_id.as_str())
        .bind(id_or_event_id)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_attempts_before(&self, before: DateTime<Utc>, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM attempts WHERE rowid IN (
                 SELECT rowid FROM attempts WHERE id < $1 ORDER BY id LIMIT $2)",
        )
        .bind(id::lower_bound(id::ATTEMPT, before))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn delete_messages_before(&self, before: DateTime<Utc>, limit: u32) -> Result<u64> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM messages WHERE rowid IN (
                 SELECT m.rowid FROM messages m
                 WHERE m.id < $1
                   AND NOT EXISTS (SELECT 1 FROM deliveries d
                                   WHERE d.msg_id = m.id AND {UNDONE})
                 ORDER BY m.id LIMIT $2)"
        )))
        .bind(id::lower_bound(id::MESSAGE, before))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn delete_ingest_events_before(&self, before: DateTime<Utc>, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM ingest_events WHERE rowid IN (
                 SELECT rowid FROM ingest_events WHERE id < $1 ORDER BY id LIMIT $2)",
        )
        .bind(id::lower_bound(id::INGEST_EVENT, before))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

impl SqliteStore {
    /// Empties the app's large tables a batch at a time, then deletes the app: its
    /// endpoints, sources, channel history and positions and scoped tokens go by cascade.
    /// Tables without a foreign key to the app (attempts, occupancy, kept idempotent
    /// responses) are deleted here by name.
    pub(super) async fn delete_app_data(&self, app_id: &AppId) -> Result<bool> {
        let uid: Option<Option<String>> = sqlx::query("SELECT uid FROM apps WHERE id = $1")
            .bind(app_id.as_str())
            .fetch_optional(&self.reader)
            .await?
            .map(|row| row.try_get("uid"))
            .transpose()?;
        let Some(uid) = uid else {
            return Ok(false);
        };
        for table in ["attempts", "ingest_events", "messages"] {
            loop {
                // Messages take their deliveries with them (cascade).
                let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE rowid IN (
                         SELECT rowid FROM {table} WHERE app_id = $1 LIMIT $2)"
                )))
                .bind(app_id.as_str())
                .bind(i64::from(RETENTION_BATCH))
                .execute(&self.writer)
                .await?;
                if done.rows_affected() < u64::from(RETENTION_BATCH) {
                    break;
                }
                // Let queued writes have the connection between batches.
                tokio::task::yield_now().await;
            }
        }
        sqlx::query("DELETE FROM channel_occupancy WHERE app_id = $1")
            .bind(app_id.as_str())
            .execute(&self.writer)
            .await?;
        // Kept `Idempotency-Key` responses of the app's routes (scopes end in the path, and
        // a path names the app by id or uid): they may hold its payloads.
        for name in std::iter::once(app_id.as_str()).chain(uid.as_deref()) {
            let path = format!(":/api/v1/app/{name}");
            sqlx::query(
                "DELETE FROM idempotency
                 WHERE instr(scope, $1 || '/') > 0 OR substr(scope, -length($1)) = $1",
            )
            .bind(&path)
            .execute(&self.writer)
            .await?;
        }
        let done = sqlx::query(crate::sql::DELETE_APP)
            .bind(app_id.as_str())
            .execute(&self.writer)
            .await?;
        // Attempts have no key to the app: one a delivery in flight recorded after the loop
        // above (or a row it skipped while locked) goes now, with the app gone, a handful at
        // most.
        sqlx::query("DELETE FROM attempts WHERE app_id = $1")
            .bind(app_id.as_str())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
