//! [`IdempotencyStore`] on SQLite: saved `Idempotency-Key` responses and their purge by age,
//! rows and bytes.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{SqliteStore, batch::WriteOp, rows::millis};
use crate::{IdempotencyStore, Result, StoreError};

#[async_trait::async_trait]
impl IdempotencyStore for SqliteStore {
    async fn idempotent_response(&self, scope: &str, key: &str) -> Result<Option<(u16, Vec<u8>)>> {
        let row = sqlx::query("SELECT status, body FROM idempotency WHERE scope = $1 AND key = $2")
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|row| {
            let status: i64 = row.try_get("status")?;
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
        self.submit(WriteOp::SaveIdempotent {
            scope: scope.to_owned(),
            key: key.to_owned(),
            status,
            body: body.to_vec(),
            at: millis(now),
        })
        .await
        .map(drop)
    }

    async fn purge_idempotency(
        &self,
        older_than: DateTime<Utc>,
        max_rows: u64,
        max_bytes: u64,
    ) -> Result<u64> {
        let expired = sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(millis(older_than))
            .execute(&self.writer)
            .await?;
        // Rowids grow with insertion, so the newest rows are the highest: no sort needed.
        let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
        let excess_rows = sqlx::query(
            "DELETE FROM idempotency WHERE rowid <= \
             (SELECT rowid FROM idempotency ORDER BY rowid DESC LIMIT 1 OFFSET $1)",
        )
        .bind(keep)
        .execute(&self.writer)
        .await?;
        // Then, newest first, everything from the row where the bodies add up past the cap.
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let excess_bytes = sqlx::query(
            "DELETE FROM idempotency WHERE rowid <= (
                 SELECT rowid FROM (
                     SELECT rowid, SUM(LENGTH(body)) OVER (ORDER BY rowid DESC) AS kept
                     FROM idempotency)
                 WHERE kept > $1 ORDER BY rowid DESC LIMIT 1)",
        )
        .bind(budget)
        .execute(&self.writer)
        .await?;
        Ok(expired.rows_affected() + excess_rows.rows_affected() + excess_bytes.rows_affected())
    }
}
