//! [`HistoryStore`] on SQLite: channel positions and kept events; appends go through the
//! group commit, which assigns their offsets.

use chrono::{DateTime, Utc};
use herald_core::AppId;
use herald_core::history::{ChannelPosition, HistoryEntry, NewHistoryEntry, Position};
use sqlx::Row;

use super::{
    SqliteStore,
    batch::WriteOp,
    rows::{self, millis},
};
use crate::{HistoryQuery, HistoryStore, Result, StoreError, sql};

#[async_trait::async_trait]
impl HistoryStore for SqliteStore {
    async fn channel_position(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelPosition>> {
        sqlx::query(sql::CHANNEL_POSITION)
            .bind(app_id.as_str())
            .bind(channel)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::channel_position(&row))
            .transpose()
    }

    async fn forget_unused_channel_positions(&self) -> Result<u64> {
        // Holding the writer connection, so no batch runs between the emptying and the delete.
        let mut writer = self.writer.acquire().await?;
        self.positions.forget_all();
        let done = sqlx::query(sql::FORGET_UNUSED_CHANNEL_POSITIONS)
            .execute(&mut *writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn reset_history(
        &self,
        app_id: &AppId,
        channel: &str,
        epoch: &str,
    ) -> Result<ChannelPosition> {
        // The writer pool is the group commit's single connection: this transaction runs
        // wholly before or after a batch of appends, never between a batch's read of the
        // positions and its commit.
        let mut tx = self.writer.begin().await?;
        // Holding that connection: no batch can take a position from the cache until after
        // this commits (or fails).
        self.positions.forget_all();
        sqlx::query(sql::DELETE_CHANNEL_HISTORY)
            .bind(app_id.as_str())
            .bind(channel)
            .execute(&mut *tx)
            .await?;
        // Offsets go on counting: a client's old offset can never name an event of the new
        // epoch.
        let row = sql::reset_channel_position!(app_id, channel, epoch)
            .fetch_one(&mut *tx)
            .await?;
        let position = rows::channel_position(&row)?;
        tx.commit().await?;
        Ok(position)
    }

    async fn append_history(&self, entry: NewHistoryEntry) -> Result<Position> {
        self.submit(WriteOp::AppendHistory {
            entry: Box::new(entry),
        })
        .await?
        .pop()
        .ok_or_else(|| StoreError::Batch("an appended event was given no position".into()))
    }

    async fn history(
        &self,
        app_id: &AppId,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<Vec<HistoryEntry>> {
        let mut q = sql::history_query!(app_id, channel, query);
        // WAL readers see every commit made before the read began: every awaited append.
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::history_entry)
            .collect()
    }

    async fn history_bytes(
        &self,
        app_id: &AppId,
        channel: &str,
        after: u64,
        before: u64,
        not_before: DateTime<Utc>,
    ) -> Result<u64> {
        // octet_length, not length: bytes, not characters, and SQLite answers it from the
        // record header without loading the values (which may sit in overflow pages).
        let bytes: Option<i64> = sqlx::query_scalar(
            "SELECT SUM(octet_length(data) + octet_length(event)
                        + COALESCE(octet_length(user_id), 0))
             FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND seq > $3 AND seq < $4 AND created_at >= $5",
        )
        .bind(app_id.as_str())
        .bind(channel)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::try_from(before).unwrap_or(i64::MAX))
        .bind(millis(not_before))
        .fetch_one(&self.reader)
        .await?;
        Ok(bytes.and_then(|b| u64::try_from(b).ok()).unwrap_or(0))
    }

    async fn oldest_history_offset(
        &self,
        app_id: &AppId,
        channel: &str,
        not_before: DateTime<Utc>,
    ) -> Result<Option<u64>> {
        let oldest = sql::oldest_history_offset!(app_id, channel, not_before)
            .fetch_one(&self.reader)
            .await?;
        Ok(oldest.and_then(|o| u64::try_from(o).ok()))
    }

    async fn history_channels(
        &self,
        after: Option<(&AppId, &str)>,
        limit: u32,
    ) -> Result<Vec<(AppId, String, ChannelPosition)>> {
        let (app, channel) = after.map_or(("", ""), |(app, channel)| (app.as_str(), channel));
        sqlx::query(
            "SELECT app_id, channel, epoch, next_offset FROM channel_positions
             WHERE (app_id, channel) > ($1, $2) ORDER BY app_id, channel LIMIT CAST($3 AS BIGINT)",
        )
        .bind(app)
        .bind(channel)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|row| {
            Ok((
                rows::id(row, "app_id")?,
                row.try_get("channel")?,
                rows::channel_position(row)?,
            ))
        })
        .collect()
    }

    async fn trim_history(
        &self,
        app_id: &AppId,
        channel: &str,
        up_to_offset: u64,
        not_before: DateTime<Utc>,
    ) -> Result<u64> {
        let done = sql::trim_history!(app_id, channel, up_to_offset, not_before)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}
