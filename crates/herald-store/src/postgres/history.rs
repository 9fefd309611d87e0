//! [`HistoryStore`] on PostgreSQL: channel positions and kept events, offsets assigned in the
//! database.
//!
//! Schema (migrations/postgres/0001_init.sql):
//! - `channel_history`: (app_id, channel, seq) PK, app_id TEXT (apps, cascade), channel TEXT,
//!   seq BIGINT (the offset), epoch TEXT, event TEXT, data TEXT, created_at BIGINT millis,
//!   raw_json BOOLEAN, user_id TEXT NULL, except_subscriber TEXT NULL. `rows::history_entry` reads them.
//! - `channel_positions`: (app_id, channel) PK, epoch TEXT, next_offset BIGINT.
//!
//! Offsets: [`append_entries`] runs inside the caller's transaction (an append, a publication,
//! an ingest) and, per channel, upserts its `channel_positions` row advancing `next_offset` by
//! the number of entries (`INSERT ... ON CONFLICT (app_id, channel) DO UPDATE SET next_offset
//! = channel_positions.next_offset + $n RETURNING epoch, next_offset - $n`; a new channel
//! starts under its first entry's `first_epoch` or a new epoch, at offset 1). The upsert
//! row-locks the position until commit, so appends to one channel from every node take turns,
//! offsets are gap-free and strictly increasing, and a rollback consumes none. Channels are
//! locked in sorted order, so transactions touching several channels cannot deadlock on each
//! other. `reset_history` takes the same row lock, so an append commits wholly before or after
//! it. Channels are trimmed to retention on every [`sql::TRIM_EVERY`]th offset, as SQLite does.
//!
//! Announcements: in the same transaction, every kept entry is announced on
//! [`HISTORY_CHANNEL`] with `pg_notify` as a [`HistoryNotice`]. PostgreSQL delivers a
//! transaction's notifications only when it commits, and delivers them to every listening
//! session in commit order; since a channel's offsets are assigned under a row lock held to
//! commit, each listener (each node's broker) hears one channel's entries in offset order,
//! once each, never one that rolled back. A notification carries at most 8,000 bytes: a
//! larger entry is announced by reference (without its event), to be read from
//! `channel_history`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use herald_core::{
    AppId,
    history::{ChannelPosition, HistoryEntry, NewHistoryEntry, Position, new_epoch},
};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use super::{
    PostgresStore,
    rows::{self, millis},
};
use crate::{HistoryQuery, HistoryStore, Result, StoreError, sql};

/// History rows per INSERT statement (9 parameters each, well under PostgreSQL's 65535).
const ROWS_PER_STATEMENT: usize = 1000;

/// The NOTIFY channel every committed history entry is announced on.
pub const HISTORY_CHANNEL: &str = "herald_history";

/// A notification's payload must be shorter than 8,000 bytes; larger entries go by reference.
const MAX_NOTICE_BYTES: usize = 7_900;

/// A committed history entry, as announced on [`HISTORY_CHANNEL`] (JSON with one-letter
/// keys: notifications are small).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryNotice {
    #[serde(rename = "a")]
    pub app_id: String,
    #[serde(rename = "c")]
    pub channel: String,
    #[serde(rename = "e")]
    pub epoch: String,
    #[serde(rename = "o")]
    pub offset: u64,
    /// A socket that must not receive it live.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub except: Option<String>,
    /// The event, unless it was too large to announce: then it is read from the store.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub event: Option<NoticeEvent>,
}

/// The kept event in a [`HistoryNotice`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NoticeEvent {
    #[serde(rename = "n")]
    pub name: String,
    #[serde(rename = "d")]
    pub data: String,
    #[serde(rename = "j", default)]
    pub raw_json: bool,
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    #[serde(rename = "t")]
    pub created_at: i64,
}

impl HistoryNotice {
    /// The notification payload for `entry` kept at `position`: whole if it fits, else by
    /// reference.
    fn payload(entry: &NewHistoryEntry, position: &Position) -> Result<String> {
        let mut notice = Self {
            app_id: entry.app_id.as_str().to_owned(),
            channel: entry.channel.clone(),
            epoch: position.epoch.clone(),
            offset: position.offset,
            except: entry.except.clone(),
            event: Some(NoticeEvent {
                name: entry.event.clone(),
                data: entry.data.clone(),
                raw_json: entry.raw_json,
                user_id: entry.user_id.clone(),
                created_at: millis(entry.created_at),
            }),
        };
        let whole = serde_json::to_string(&notice)
            .map_err(|e| StoreError::Corrupt(format!("history notice: {e}")))?;
        if whole.len() <= MAX_NOTICE_BYTES {
            return Ok(whole);
        }
        notice.event = None;
        serde_json::to_string(&notice)
            .map_err(|e| StoreError::Corrupt(format!("history notice: {e}")))
    }

    /// The entry it announces, if it carries the event; `None` for one announced by reference
    /// (read it with [`HistoryStore::history`]) or with an app id that is not one.
    pub fn entry(&self) -> Option<HistoryEntry> {
        let event = self.event.as_ref()?;
        Some(HistoryEntry {
            app_id: AppId::parse(&self.app_id).ok()?,
            channel: self.channel.clone(),
            epoch: self.epoch.clone(),
            offset: self.offset,
            event: event.name.clone(),
            data: event.data.clone(),
            raw_json: event.raw_json,
            user_id: event.user_id.clone(),
            created_at: rows::time(event.created_at).ok()?,
            except: self.except.clone(),
        })
    }
}

/// A u64 offset as BIGINT, saturating (offsets never come near `i64::MAX`).
fn bigint(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

/// Assigns each entry its channel's epoch and next offset, keeps them, and trims the channels
/// whose new offsets include a multiple of [`sql::TRIM_EVERY`]. Returns each entry's position, in
/// the order given.
///
/// Must run inside a transaction on `conn`: each channel's `channel_positions` row stays locked
/// until it commits (see the module doc). Channels are locked in sorted `(app_id, channel)`
/// order.
pub(super) async fn append_entries(
    conn: &mut PgConnection,
    entries: &[NewHistoryEntry],
    announce: bool,
) -> Result<Vec<Position>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    // Every channel touched, sorted: (epoch a new channel starts under — its first entry's —,
    // number of entries).
    let mut channels: BTreeMap<(&str, &str), (Option<&str>, i64)> = BTreeMap::new();
    for entry in entries {
        let slot = channels
            .entry((entry.app_id.as_str(), entry.channel.as_str()))
            .or_insert((entry.first_epoch.as_deref(), 0));
        slot.1 += 1;
    }

    // Reserve each channel's offsets: (epoch, next offset to hand out).
    let mut assigning: BTreeMap<(&str, &str), (String, i64)> = BTreeMap::new();
    for (&(app_id, channel), &(first_epoch, count)) in &channels {
        let row = sqlx::query(
            "INSERT INTO channel_positions (app_id, channel, epoch, next_offset)
             VALUES ($1, $2, $3, 1 + $4)
             ON CONFLICT (app_id, channel)
             DO UPDATE SET next_offset = channel_positions.next_offset + $4
             RETURNING epoch, next_offset - $4 AS first_offset",
        )
        .bind(app_id)
        .bind(channel)
        .bind(first_epoch.map_or_else(new_epoch, str::to_owned))
        .bind(count)
        .fetch_one(&mut *conn)
        .await?;
        let first: i64 = row.try_get("first_offset")?;
        if first < 1 {
            return Err(StoreError::Corrupt("next_offset".into()));
        }
        assigning.insert((app_id, channel), (row.try_get("epoch")?, first));
    }

    // Offsets in the order given.
    let mut assigned: Vec<(&NewHistoryEntry, i64, String)> = Vec::with_capacity(entries.len());
    for entry in entries {
        let (epoch, next) = assigning
            .get_mut(&(entry.app_id.as_str(), entry.channel.as_str()))
            .ok_or_else(|| StoreError::Batch("a history channel was not reserved".into()))?;
        assigned.push((entry, *next, epoch.clone()));
        *next += 1;
    }

    for chunk in assigned.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
            "INSERT INTO channel_history (app_id, channel, seq, epoch, event, data, created_at,
                                          raw_json, user_id, except_subscriber) ",
        );
        q.push_values(chunk, |mut row, (e, seq, epoch)| {
            row.push_bind(e.app_id.as_str())
                .push_bind(&e.channel)
                .push_bind(*seq)
                .push_bind(epoch.as_str())
                .push_bind(&e.event)
                .push_bind(&e.data)
                .push_bind(millis(e.created_at))
                .push_bind(e.raw_json)
                .push_bind(&e.user_id)
                .push_bind(&e.except);
        });
        q.build().execute(&mut *conn).await?;
    }

    for (entry, seq, _) in &assigned {
        if seq % sql::TRIM_EVERY != 0 {
            continue;
        }
        let (keep_from, expired) = sql::kept_from(entry, *seq);
        // Bounded by `seq` (see the SQLite group commit's trim): past the count, or before the
        // first entry still young enough, so the scan stops at what it deletes.
        sqlx::query(
            "DELETE FROM channel_history
             WHERE app_id = $1 AND channel = $2
               AND seq < GREATEST($3, COALESCE((SELECT seq FROM channel_history
                                                WHERE app_id = $1 AND channel = $2
                                                  AND created_at >= $4
                                                ORDER BY seq LIMIT 1), $3))",
        )
        .bind(entry.app_id.as_str())
        .bind(&entry.channel)
        .bind(keep_from)
        .bind(expired)
        .execute(&mut *conn)
        .await?;
    }

    let positions = assigned
        .iter()
        .map(|(_, seq, epoch)| {
            Ok(Position {
                epoch: epoch.clone(),
                offset: u64::try_from(*seq)
                    .map_err(|_| StoreError::Corrupt("history offset".into()))?,
            })
        })
        .collect::<Result<Vec<Position>>>()?;

    if !announce {
        return Ok(positions);
    }
    // Announced at commit, in offset order (see the module doc). `ORDER BY` makes PostgreSQL
    // call the volatile `pg_notify` after sorting, so in the order given.
    let notices = assigned
        .iter()
        .zip(&positions)
        .map(|((entry, _, _), position)| HistoryNotice::payload(entry, position))
        .collect::<Result<Vec<String>>>()?;
    sqlx::query(
        "SELECT pg_notify($1, notice)
         FROM unnest($2::text[]) WITH ORDINALITY AS n(notice, ord)
         ORDER BY ord",
    )
    .bind(HISTORY_CHANNEL)
    .bind(&notices)
    .execute(&mut *conn)
    .await?;
    Ok(positions)
}

#[async_trait::async_trait]
impl HistoryStore for PostgresStore {
    async fn channel_position(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelPosition>> {
        sqlx::query(sql::CHANNEL_POSITION)
            .bind(app_id.as_str())
            .bind(channel)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::channel_position(&row))
            .transpose()
    }

    async fn forget_unused_channel_positions(&self) -> Result<u64> {
        let done = sqlx::query(sql::FORGET_UNUSED_CHANNEL_POSITIONS)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn reset_history(
        &self,
        app_id: &AppId,
        channel: &str,
        epoch: &str,
    ) -> Result<ChannelPosition> {
        let mut tx = self.pool.begin().await?;
        // Take the position's row lock first (as an append does), so an append to this channel
        // commits wholly before or after the reset, never with its event deleted but its
        // offset kept, or the reverse. Offsets go on counting: a client's old offset can never
        // name an event of the new epoch.
        let row = sql::reset_channel_position!(app_id, channel, epoch)
            .fetch_one(&mut *tx)
            .await?;
        let position = rows::channel_position(&row)?;
        sqlx::query(sql::DELETE_CHANNEL_HISTORY)
            .bind(app_id.as_str())
            .bind(channel)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(position)
    }

    async fn append_history(&self, entry: NewHistoryEntry) -> Result<Position> {
        let mut tx = self.pool.begin().await?;
        let position = append_entries(
            &mut tx,
            std::slice::from_ref(&entry),
            self.announces_history(),
        )
        .await?
        .pop()
        .ok_or_else(|| StoreError::Batch("an appended event was given no position".into()))?;
        tx.commit().await?;
        Ok(position)
    }

    async fn history(
        &self,
        app_id: &AppId,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<Vec<HistoryEntry>> {
        let mut q = sql::history_query!(app_id, channel, query);
        q.build()
            .fetch_all(&self.pool)
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
        // octet_length: bytes, not characters, as the SQLite store counts. SUM of BIGINT is
        // NUMERIC in PostgreSQL: cast back.
        let bytes: Option<i64> = sqlx::query_scalar(
            "SELECT SUM(octet_length(data)::BIGINT + octet_length(event)
                        + COALESCE(octet_length(user_id), 0))::BIGINT
             FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND seq > $3 AND seq < $4 AND created_at >= $5",
        )
        .bind(app_id.as_str())
        .bind(channel)
        .bind(bigint(after))
        .bind(bigint(before))
        .bind(millis(not_before))
        .fetch_one(&self.pool)
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
            .fetch_one(&self.pool)
            .await?;
        Ok(oldest.and_then(|o| u64::try_from(o).ok()))
    }

    async fn history_channels(
        &self,
        after: Option<(&AppId, &str)>,
        limit: u32,
    ) -> Result<Vec<(AppId, String, ChannelPosition)>> {
        let mut q =
            QueryBuilder::new("SELECT app_id, channel, epoch, next_offset FROM channel_positions");
        if let Some((app, channel)) = after {
            // Row comparison under the columns' collation: the same order as ORDER BY.
            q.push(" WHERE (app_id, channel) > (")
                .push_bind(app.as_str().to_owned())
                .push(", ")
                .push_bind(channel.to_owned())
                .push(")");
        }
        q.push(" ORDER BY app_id, channel LIMIT ")
            .push_bind(i64::from(limit));
        q.build()
            .fetch_all(&self.pool)
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
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc, time::Duration};

    use herald_core::{
        AppId,
        history::{NewHistoryEntry, Retention},
    };
    use sqlx::{AssertSqlSafe, Connection, Executor};
    use tokio::task::JoinSet;

    use super::super::{PostgresOptions, PostgresStore, quote_identifier};
    use crate::{HistoryQuery, HistoryStore, StoreLifecycle};

    const URL_VAR: &str = "HERALD_TEST_POSTGRES_URL";
    const PER_NODE: u64 = 100;

    fn entry(app_id: &AppId, data: String) -> NewHistoryEntry {
        NewHistoryEntry {
            app_id: app_id.clone(),
            channel: "two-nodes".into(),
            event: "e".into(),
            data,
            raw_json: false,
            user_id: None,
            created_at: chrono::Utc::now(),
            retention: Retention {
                max_events: 10_000,
                max_age: Duration::from_secs(3600),
            },
            first_epoch: None,
            except: None,
        }
    }

    /// Two stores on one schema (two nodes of a cluster) append to one channel at once:
    /// every offset from 1 to 200 is assigned exactly once, under one epoch, and each returned
    /// position is where its event is read back.
    async fn two_nodes_publish_concurrently(url: String, schema: String) {
        let options = PostgresOptions {
            max_connections: 8,
            schema: Some(schema),
            ..PostgresOptions::default()
        };
        let first = Arc::new(
            PostgresStore::open(&url, options.clone())
                .await
                .expect("open node 1"),
        );
        let second = Arc::new(
            PostgresStore::open(&url, options)
                .await
                .expect("open node 2"),
        );
        let app = crate::conformance::stored_app(first.as_ref(), "two nodes").await;

        let mut appends = JoinSet::new();
        for n in 0..PER_NODE {
            for (node, store) in [("a", &first), ("b", &second)] {
                let store = Arc::clone(store);
                let entry = entry(&app.id, format!("{node}{n}"));
                appends.spawn(async move {
                    let data = entry.data.clone();
                    (data, store.append_history(entry).await)
                });
            }
        }
        let mut returned = HashMap::new();
        while let Some(joined) = appends.join_next().await {
            let (data, position) = joined.expect("an append task");
            let position = position.expect("append");
            assert!(
                returned
                    .insert(position.offset, (position.epoch, data))
                    .is_none(),
                "offset {} given twice",
                returned.len()
            );
        }
        let mut offsets: Vec<u64> = returned.keys().copied().collect();
        offsets.sort_unstable();
        assert_eq!(offsets, (1..=2 * PER_NODE).collect::<Vec<_>>());

        let kept = second
            .history(
                &app.id,
                "two-nodes",
                &HistoryQuery {
                    after: None,
                    before: None,
                    limit: 1_000,
                    newest_first: false,
                    not_before: chrono::DateTime::<chrono::Utc>::MIN_UTC,
                },
            )
            .await
            .expect("history");
        assert_eq!(kept.len(), returned.len());
        let epoch = &kept[0].epoch;
        for event in &kept {
            assert_eq!(
                returned.get(&event.offset),
                Some(&(epoch.clone(), event.data.clone())),
                "offset {}",
                event.offset
            );
        }
        let position = first
            .channel_position(&app.id, "two-nodes")
            .await
            .expect("read")
            .expect("position");
        assert_eq!(position.next_offset, 2 * PER_NODE + 1);
        assert_eq!(&position.epoch, epoch);
        first.close().await;
        second.close().await;
    }

    /// A store told not to announce (its cluster's publications travel on a bus) commits
    /// entries without a notification; told again, it announces the next one.
    async fn announcing_can_be_turned_off(url: String, schema: String) {
        let options = PostgresOptions {
            schema: Some(schema),
            ..PostgresOptions::default()
        };
        let store = PostgresStore::open(&url, options).await.expect("open");
        let app = crate::conformance::stored_app(&store, "quiet").await;
        let mut listener = sqlx::postgres::PgListener::connect_with(store.pool())
            .await
            .expect("listen");
        listener
            .listen(super::HISTORY_CHANNEL)
            .await
            .expect("listen");
        store.announce_history(false);
        let quiet = store
            .append_history(entry(&app.id, "quiet".into()))
            .await
            .expect("append");
        store.announce_history(true);
        let heard = store
            .append_history(entry(&app.id, "heard".into()))
            .await
            .expect("append");
        // Notifications are the database's: other tests' stores announce too.
        let ours = async {
            loop {
                let notification = listener.recv().await.expect("received");
                let notice: super::HistoryNotice =
                    serde_json::from_str(notification.payload()).expect("a history notice");
                if notice.app_id == app.id.as_str() {
                    return notice;
                }
            }
        };
        let notice = tokio::time::timeout(Duration::from_secs(10), ours)
            .await
            .expect("a notification of this app within 10 s");
        assert_eq!((quiet.offset, heard.offset), (1, 2));
        assert_eq!(
            notice.offset, 2,
            "the first notification is the second entry's"
        );
        // The listener holds one of the pool's connections, which closing waits for.
        drop(listener);
        store.close().await;
    }

    #[tokio::test]
    async fn a_store_can_commit_history_without_announcing_it() {
        let Ok(url) = std::env::var(URL_VAR) else {
            herald_test_support::skip!("{URL_VAR} is unset (the announcement test needs a server)");
            return;
        };
        with_schema(&url, "quiet", announcing_can_be_turned_off).await;
    }

    /// Runs `test` in a throwaway schema of its own, dropped whether it passes or panics.
    async fn with_schema<F, Fut>(url: &str, name: &str, test: F)
    where
        F: FnOnce(String, String) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = format!("herald_test_{name}_{}_{nanos}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        conn.execute(AssertSqlSafe(format!(
            "CREATE SCHEMA {}",
            quote_identifier(&schema)
        )))
        .await
        .expect("create the test schema");
        let outcome = tokio::spawn(test(url.to_owned(), schema.clone())).await;
        conn.execute(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            quote_identifier(&schema)
        )))
        .await
        .expect("drop the test schema");
        conn.close().await.expect("close");
        if let Err(failed) = outcome {
            std::panic::resume_unwind(failed.into_panic());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_get_each_offset_of_a_channel_once() {
        let Ok(url) = std::env::var(URL_VAR) else {
            herald_test_support::skip!(
                "{URL_VAR} is unset (the two-node history test needs a server)"
            );
            return;
        };
        with_schema(&url, "nodes", two_nodes_publish_concurrently).await;
    }
}
