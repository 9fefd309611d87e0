//! [`HistoryStore`] on SQLite: channel positions and kept events; appends go through the
//! group commit, which assigns their offsets.

use chrono::{DateTime, Utc};
use herald_core::AppId;
use herald_core::history::{ChannelPosition, HistoryEntry, NewHistoryEntry, Position};
use sqlx::{QueryBuilder, Row};

use super::{
    SqliteStore,
    batch::WriteOp,
    rows::{self, millis},
};
use crate::{HistoryQuery, HistoryStore, Result, StoreError};

#[async_trait::async_trait]
impl HistoryStore for SqliteStore {
    async fn channel_position(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelPosition>> {
        let row = sqlx::query(
            "SELECT epoch, next_offset FROM channel_positions WHERE app_id = $1 AND channel = $2",
        )
        .bind(app_id.as_str())
        .bind(channel)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| {
            Ok(ChannelPosition {
                epoch: row.try_get("epoch")?,
                next_offset: u64::try_from(row.try_get::<i64, _>("next_offset")?)
                    .map_err(|_| StoreError::Corrupt("next_offset".into()))?,
            })
        })
        .transpose()
    }

    async fn forget_unused_channel_positions(&self) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM channel_positions WHERE next_offset <= 1 AND NOT EXISTS (
                 SELECT 1 FROM channel_history h
                 WHERE h.app_id = channel_positions.app_id AND h.channel = channel_positions.channel)",
        )
        .execute(&self.writer)
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
        sqlx::query("DELETE FROM channel_history WHERE app_id = $1 AND channel = $2")
            .bind(app_id.as_str())
            .bind(channel)
            .execute(&mut *tx)
            .await?;
        // Offsets go on counting: a client's old offset can never name an event of the new
        // epoch.
        let row = sqlx::query(
            "INSERT INTO channel_positions (app_id, channel, epoch, next_offset)
             VALUES ($1, $2, $3, 1)
             ON CONFLICT (app_id, channel) DO UPDATE SET epoch = excluded.epoch
             RETURNING epoch, next_offset",
        )
        .bind(app_id.as_str())
        .bind(channel)
        .bind(epoch)
        .fetch_one(&mut *tx)
        .await?;
        let position = ChannelPosition {
            epoch: row.try_get("epoch")?,
            next_offset: u64::try_from(row.try_get::<i64, _>("next_offset")?)
                .map_err(|_| StoreError::Corrupt("next_offset".into()))?,
        };
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
        let mut q = QueryBuilder::new("SELECT * FROM channel_history WHERE app_id = ");
        q.push_bind(app_id.to_string());
        q.push(" AND channel = ").push_bind(channel.to_owned());
        q.push(" AND created_at >= ")
            .push_bind(millis(query.not_before));
        if let Some(after) = query.after {
            q.push(" AND seq > ")
                .push_bind(i64::try_from(after).unwrap_or(i64::MAX));
        }
        if let Some(before) = query.before {
            q.push(" AND seq < ")
                .push_bind(i64::try_from(before).unwrap_or(i64::MAX));
        }
        q.push(if query.newest_first {
            " ORDER BY seq DESC"
        } else {
            " ORDER BY seq ASC"
        });
        q.push(" LIMIT ").push_bind(i64::from(query.limit));
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
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(seq) FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND created_at >= $3",
        )
        .bind(app_id.as_str())
        .bind(channel)
        .bind(millis(not_before))
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
             WHERE (app_id, channel) > ($1, $2) ORDER BY app_id, channel LIMIT $3",
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
                ChannelPosition {
                    epoch: row.try_get("epoch")?,
                    next_offset: u64::try_from(row.try_get::<i64, _>("next_offset")?)
                        .map_err(|_| StoreError::Corrupt("next_offset".into()))?,
                },
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
        let done = sqlx::query(
            "DELETE FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND (seq <= $3 OR created_at < $4)",
        )
        .bind(app_id.as_str())
        .bind(channel)
        .bind(i64::try_from(up_to_offset).unwrap_or(i64::MAX))
        .bind(millis(not_before))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}
