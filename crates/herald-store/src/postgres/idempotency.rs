//! [`IdempotencyStore`] on PostgreSQL: saved `Idempotency-Key` responses and their purge by
//! age, rows and bytes (oldest first, by insertion order `seq`, as SQLite's rowid).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{PostgresStore, rows::millis};
use crate::{IdempotencyStore, Result, StoreError};

#[async_trait::async_trait]
impl IdempotencyStore for PostgresStore {
    async fn idempotent_response(&self, scope: &str, key: &str) -> Result<Option<(u16, Vec<u8>)>> {
        let row = sqlx::query("SELECT status, body FROM idempotency WHERE scope = $1 AND key = $2")
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            let status: i32 = row.try_get("status")?;
            let status = u16::try_from(status)
                .map_err(|_| StoreError::Corrupt(format!("idempotency status {status}")))?;
            Ok((status, row.try_get("body")?))
        })
        .transpose()
    }

    async fn save_idempotent_response(
        &self,
        scope: &str,
        key: &str,
        status: u16,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<()> {
        // The first response saved under a key stays (as in SQLite's batch).
        sqlx::query(
            "INSERT INTO idempotency (scope, key, status, body, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(scope)
        .bind(key)
        .bind(i32::from(status))
        .bind(body)
        .bind(millis(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn purge_idempotency(
        &self,
        older_than: DateTime<Utc>,
        max_rows: u64,
        max_bytes: u64,
    ) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let expired = sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(millis(older_than))
            .execute(&mut *tx)
            .await?;
        // Everything older than the newest `max_rows` rows.
        let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
        let excess_rows = sqlx::query(
            "DELETE FROM idempotency WHERE seq <= \
             (SELECT seq FROM idempotency ORDER BY seq DESC LIMIT 1 OFFSET $1)",
        )
        .bind(keep)
        .execute(&mut *tx)
        .await?;
        // Then, newest first, everything from the row where the bodies add up past the cap.
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let excess_bytes = sqlx::query(
            "DELETE FROM idempotency WHERE seq <= (
                 SELECT seq FROM (
                     SELECT seq, SUM(octet_length(body)) OVER (ORDER BY seq DESC) AS kept
                     FROM idempotency) AS running
                 WHERE kept > $1 ORDER BY seq DESC LIMIT 1)",
        )
        .bind(budget)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(expired.rows_affected() + excess_rows.rows_affected() + excess_bytes.rows_affected())
    }
}
