//! The embedded store: one SQLite file in WAL mode.
//!
//! Two pools: a single-connection writer (SQLite has one writer at a time, so queuing writes in
//! the pool beats retrying on `SQLITE_BUSY`) and a small read-only pool that WAL lets run
//! beside it. The two hot writes, new messages and attempt results, go through the group-commit
//! task in [`batch`]; everything else writes through the writer pool directly.

mod batch;
mod cache;
mod leases;
mod permissions;
mod rows;

use std::{collections::HashMap, path::Path, str::FromStr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use herald_core::{
    id,
    model::{
        App, Attempt, DeliveryStatus, Endpoint, EndpointStats, EventType, IngestEvent,
        IngestSource, Message, TriggerType,
    },
};
use sqlx::{
    QueryBuilder, Row, Sqlite, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::{
    batch::{PendingWrite, WriteOp},
    rows::{conflict_as, millis, opt_json, to_json},
};
use herald_core::history::{ChannelPosition, HistoryEntry, Retention};

use crate::{
    AttemptQuery, AttemptRecord, AttemptScope, ClaimRequest, DeliveryJob, HistoryQuery,
    IngestRecorded, MessageQuery, OccupancyChange, Occupant, Page, Result, Store, StoreError,
    TokenScope,
};

/// The database file inside the data directory.
pub const DB_FILE: &str = "herald.db";
const READERS: u32 = 4;

pub struct SqliteStore {
    cache: cache::Cache,
    leases: leases::Leases,
    reader: SqlitePool,
    writer: SqlitePool,
    writes: mpsc::Sender<PendingWrite>,
    shutdown: CancellationToken,
    batcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl SqliteStore {
    /// Open (creating if needed) the store in `dir` and bring its schema up to date.
    pub async fn open(dir: &Path) -> Result<Self> {
        // The database holds secrets: directory 0700, database files 0600 (unix).
        permissions::prepare(dir, DB_FILE)?;
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(dir.join(DB_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Acknowledged writes must survive power loss; group commit pays for the fsyncs.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options.read_only(true))
            .await?;
        // SQLite has made its -wal and -shm files by now, with the database file's mode.
        permissions::secure_files(dir, DB_FILE)?;

        let (writes, queue) = mpsc::channel(batch::QUEUE_DEPTH);
        let shutdown = CancellationToken::new();
        let batcher = tokio::spawn(batch::run(writer.clone(), queue, shutdown.clone()));
        Ok(Self {
            cache: cache::Cache::default(),
            leases: leases::Leases::default(),
            reader,
            writer,
            writes,
            shutdown,
            batcher: Mutex::new(Some(batcher)),
        })
    }

    /// An app looked up by `query` with `value`, remembered in the cache under `cache_key`.
    /// (Cache keys cannot collide with ids or uids, which have no ':'.)
    async fn cached_app(
        &self,
        cache_key: String,
        query: &'static str,
        value: &str,
    ) -> Result<Option<App>> {
        if let Some(app) = self.cache.app(&cache_key) {
            return Ok(Some(app));
        }
        let generation = self.cache.generation();
        let app = sqlx::query(query)
            .bind(value)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::app(&row))
            .transpose()?;
        if let Some(app) = &app {
            self.cache.put_app_as(generation, &cache_key, app);
        }
        Ok(app)
    }

    async fn submit(&self, op: WriteOp) -> Result<()> {
        let (done, outcome) = oneshot::channel();
        self.writes
            .send(PendingWrite { op, done })
            .await
            .map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }
}

/// Appends the keyset-pagination clause and ordering; fetches one extra row so the caller can
/// tell whether another page exists.
fn paginate(query: &mut QueryBuilder<Sqlite>, column: &str, page: &Page) {
    if let Some(iterator) = &page.iterator {
        let op = if page.descending { " < " } else { " > " };
        query.push(format!(" AND {column}{op}"));
        query.push_bind(iterator.clone());
    }
    let order = if page.descending { "DESC" } else { "ASC" };
    query.push(format!(" ORDER BY {column} {order} LIMIT "));
    query.push_bind(i64::from(page.limit) + 1);
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_app(&self, app: &App) -> Result<()> {
        sqlx::query(
            "INSERT INTO apps (id, uid, name, throttle_rate, metadata, created_at, updated_at,
                               pusher_app_id, pusher_key, pusher_secret, history_rules)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&app.id)
        .bind(&app.uid)
        .bind(&app.name)
        .bind(app.throttle_rate)
        .bind(to_json(&app.metadata))
        .bind(millis(app.created_at))
        .bind(millis(app.updated_at))
        .bind(app.pusher.app_id)
        .bind(&app.pusher.key)
        .bind(&app.pusher.secret)
        .bind(opt_json(&app.history))
        .execute(&self.writer)
        .await
        .map_err(conflict_as(
            "an application with this uid (or Pusher app id or key) already exists",
        ))?;
        Ok(())
    }

    async fn get_app(&self, id_or_uid: &str) -> Result<Option<App>> {
        if let Some(app) = self.cache.app(id_or_uid) {
            return Ok(Some(app));
        }
        let generation = self.cache.generation();
        let app = sqlx::query(
            "SELECT * FROM apps WHERE id = $1 OR uid = $1 ORDER BY id = $1 DESC LIMIT 1",
        )
        .bind(id_or_uid)
        .fetch_optional(&self.reader)
        .await?
        .map(|row| rows::app(&row))
        .transpose()?;
        if let Some(app) = &app {
            self.cache.put_app(generation, app);
        }
        Ok(app)
    }

    async fn get_app_by_pusher_key(&self, key: &str) -> Result<Option<App>> {
        self.cached_app(
            format!("pusher-key:{key}"),
            "SELECT * FROM apps WHERE pusher_key = $1",
            key,
        )
        .await
    }

    async fn get_app_by_pusher_id(&self, app_id: i64) -> Result<Option<App>> {
        self.cached_app(
            format!("pusher-id:{app_id}"),
            "SELECT * FROM apps WHERE pusher_app_id = $1",
            &app_id.to_string(),
        )
        .await
    }

    async fn list_apps(&self, page: &Page) -> Result<Vec<App>> {
        let mut q = QueryBuilder::new("SELECT * FROM apps WHERE 1 = 1");
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::app)
            .collect()
    }

    async fn update_app(&self, app: &App) -> Result<()> {
        let done = sqlx::query(
            "UPDATE apps SET uid = $2, name = $3, throttle_rate = $4, metadata = $5, updated_at = $6,
                    history_rules = $7
             WHERE id = $1",
        )
        .bind(&app.id)
        .bind(&app.uid)
        .bind(&app.name)
        .bind(app.throttle_rate)
        .bind(to_json(&app.metadata))
        .bind(millis(app.updated_at))
        .bind(opt_json(&app.history))
        .execute(&self.writer)
        .await
        .map_err(conflict_as("an application with this uid already exists"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn set_pusher_credentials(
        &self,
        app_id: &str,
        credentials: &herald_core::model::PusherCredentials,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE apps SET pusher_key = $2, pusher_secret = $3, pusher_previous_secret = $4,
                             pusher_previous_secret_until = $5
             WHERE id = $1",
        )
        .bind(app_id)
        .bind(&credentials.key)
        .bind(&credentials.secret)
        .bind(credentials.previous.as_ref().map(|p| p.secret.as_str()))
        .bind(credentials.previous.as_ref().map(|p| millis(p.until)))
        .execute(&self.writer)
        .await
        .map_err(conflict_as("another application has this Pusher key"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn delete_app(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM apps WHERE id = $1")
            .bind(id)
            .execute(&self.writer)
            .await?;
        self.cache.invalidate();
        Ok(done.rows_affected() > 0)
    }

    async fn add_token(&self, token_hash: &[u8], scope: &TokenScope, name: &str) -> Result<()> {
        let app_id = match scope {
            TokenScope::Environment => None,
            TokenScope::App(id) => Some(id.as_str()),
        };
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, app_id, name, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (token_hash) DO NOTHING",
        )
        .bind(token_hash)
        .bind(app_id)
        .bind(name)
        .bind(millis(Utc::now()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn remove_token(&self, token_hash: &[u8]) -> Result<bool> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn token_scope(&self, token_hash: &[u8]) -> Result<Option<TokenScope>> {
        let row = sqlx::query("SELECT app_id FROM api_tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.reader)
            .await?;
        Ok(match row {
            None => None,
            Some(row) => Some(match row.try_get::<Option<String>, _>("app_id")? {
                None => TokenScope::Environment,
                Some(app) => TokenScope::App(app),
            }),
        })
    }

    async fn create_event_type(&self, et: &EventType) -> Result<()> {
        sqlx::query(
            "INSERT INTO event_types (name, description, archived, deprecated, schemas, group_name,
                                      feature_flags, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&et.name)
        .bind(&et.description)
        .bind(et.archived)
        .bind(et.deprecated)
        .bind(&et.schemas)
        .bind(&et.group_name)
        .bind(opt_json(&et.feature_flags))
        .bind(millis(et.created_at))
        .bind(millis(et.updated_at))
        .execute(&self.writer)
        .await
        .map_err(conflict_as("an event type with this name already exists"))?;
        Ok(())
    }

    async fn get_event_type(&self, name: &str) -> Result<Option<EventType>> {
        sqlx::query("SELECT * FROM event_types WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::event_type(&row))
            .transpose()
    }

    async fn list_event_types(
        &self,
        page: &Page,
        include_archived: bool,
    ) -> Result<Vec<EventType>> {
        let mut q = QueryBuilder::new("SELECT * FROM event_types WHERE 1 = 1");
        if !include_archived {
            q.push(" AND archived = 0");
        }
        paginate(&mut q, "name", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::event_type)
            .collect()
    }

    async fn update_event_type(&self, et: &EventType) -> Result<()> {
        let done = sqlx::query(
            "UPDATE event_types SET description = $2, archived = $3, deprecated = $4, schemas = $5,
                                    group_name = $6, feature_flags = $7, updated_at = $8
             WHERE name = $1",
        )
        .bind(&et.name)
        .bind(&et.description)
        .bind(et.archived)
        .bind(et.deprecated)
        .bind(&et.schemas)
        .bind(&et.group_name)
        .bind(opt_json(&et.feature_flags))
        .bind(millis(et.updated_at))
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn create_endpoint(&self, ep: &Endpoint) -> Result<()> {
        sqlx::query(
            "INSERT INTO endpoints (id, app_id, uid, url, description, throttle_rate, disabled,
                                    event_types, channels, metadata, headers, secret,
                                    previous_secrets, failing_since, created_at, updated_at,
                                    format)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(&ep.id)
        .bind(&ep.app_id)
        .bind(&ep.uid)
        .bind(&ep.url)
        .bind(&ep.description)
        .bind(ep.throttle_rate)
        .bind(ep.disabled)
        .bind(opt_json(&ep.event_types))
        .bind(opt_json(&ep.channels))
        .bind(to_json(&ep.metadata))
        .bind(to_json(&ep.headers))
        .bind(&ep.secret)
        .bind(rows::previous_secrets_json(ep))
        .bind(ep.failing_since.map(millis))
        .bind(millis(ep.created_at))
        .bind(millis(ep.updated_at))
        .bind(ep.format.as_str())
        .execute(&self.writer)
        .await
        .map_err(conflict_as("an endpoint with this uid already exists"))?;
        self.cache.invalidate();
        Ok(())
    }

    async fn get_endpoint(&self, app_id: &str, id_or_uid: &str) -> Result<Option<Endpoint>> {
        sqlx::query(
            "SELECT * FROM endpoints WHERE app_id = $1 AND (id = $2 OR uid = $2) \
             ORDER BY id = $2 DESC LIMIT 1",
        )
        .bind(app_id)
        .bind(id_or_uid)
        .fetch_optional(&self.reader)
        .await?
        .map(|row| rows::endpoint(&row, ""))
        .transpose()
    }

    async fn list_endpoints(&self, app_id: &str, page: &Page) -> Result<Vec<Endpoint>> {
        let mut q = QueryBuilder::new("SELECT * FROM endpoints WHERE app_id = ");
        q.push_bind(app_id.to_owned());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| rows::endpoint(row, ""))
            .collect()
    }

    async fn update_endpoint(&self, ep: &Endpoint) -> Result<()> {
        let done = sqlx::query(
            "UPDATE endpoints SET uid = $3, url = $4, description = $5, throttle_rate = $6,
                    disabled = $7, event_types = $8, channels = $9, metadata = $10, headers = $11,
                    secret = $12, previous_secrets = $13, failing_since = $14, updated_at = $15,
                    format = $16
             WHERE id = $1 AND app_id = $2",
        )
        .bind(&ep.id)
        .bind(&ep.app_id)
        .bind(&ep.uid)
        .bind(&ep.url)
        .bind(&ep.description)
        .bind(ep.throttle_rate)
        .bind(ep.disabled)
        .bind(opt_json(&ep.event_types))
        .bind(opt_json(&ep.channels))
        .bind(to_json(&ep.metadata))
        .bind(to_json(&ep.headers))
        .bind(&ep.secret)
        .bind(rows::previous_secrets_json(ep))
        .bind(ep.failing_since.map(millis))
        .bind(millis(ep.updated_at))
        .bind(ep.format.as_str())
        .execute(&self.writer)
        .await
        .map_err(conflict_as("an endpoint with this uid already exists"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn delete_endpoint(&self, app_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM endpoints WHERE app_id = $1 AND id = $2")
            .bind(app_id)
            .bind(id)
            .execute(&self.writer)
            .await?;
        self.cache.invalidate();
        Ok(done.rows_affected() > 0)
    }

    async fn app_endpoints(&self, app_id: &str) -> Result<Arc<Vec<Endpoint>>> {
        if let Some(endpoints) = self.cache.endpoints(app_id) {
            return Ok(endpoints);
        }
        let generation = self.cache.generation();
        let endpoints: Vec<Endpoint> = sqlx::query("SELECT * FROM endpoints WHERE app_id = $1")
            .bind(app_id)
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| rows::endpoint(row, ""))
            .collect::<Result<_>>()?;
        let endpoints = Arc::new(endpoints);
        self.cache.put_endpoints(generation, app_id, &endpoints);
        Ok(endpoints)
    }

    async fn endpoint_stats(&self, endpoint_id: &str) -> Result<EndpointStats> {
        let counts = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM deliveries WHERE endpoint_id = $1 GROUP BY status",
        )
        .bind(endpoint_id)
        .fetch_all(&self.reader)
        .await?;
        let mut stats = EndpointStats::default();
        // In-flight deliveries are pending in the table; their leases live in memory.
        let sending = self.leases.count_for(endpoint_id);
        stats.sending = sending;
        for row in counts {
            let n: i64 = row.try_get("n")?;
            match rows::status(row.try_get("status")?)? {
                DeliveryStatus::Success => stats.success = n,
                DeliveryStatus::Pending => stats.pending = (n - sending).max(0),
                DeliveryStatus::Fail => stats.fail = n,
                DeliveryStatus::Sending => stats.sending += n,
            }
        }
        Ok(stats)
    }

    async fn channel_position(
        &self,
        app_id: &str,
        channel: &str,
    ) -> Result<Option<ChannelPosition>> {
        let row = sqlx::query(
            "SELECT epoch, next_offset FROM channel_positions WHERE app_id = $1 AND channel = $2",
        )
        .bind(app_id)
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

    async fn record_channel_events(
        &self,
        messages: Vec<(Message, Vec<String>)>,
        changes: Vec<OccupancyChange>,
    ) -> Result<()> {
        self.submit(WriteOp::ChannelEvents { messages, changes })
            .await
    }

    async fn occupants(&self) -> Result<Vec<Occupant>> {
        sqlx::query("SELECT app_id, channel, user_id FROM channel_occupancy ORDER BY app_id, channel, user_id")
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| {
                let user_id: String = row.try_get("user_id")?;
                Ok(Occupant {
                    app_id: row.try_get("app_id")?,
                    channel: row.try_get("channel")?,
                    user_id: (!user_id.is_empty()).then_some(user_id),
                })
            })
            .collect()
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
        app_id: &str,
        channel: &str,
        position: &ChannelPosition,
    ) -> Result<()> {
        let next = i64::try_from(position.next_offset)
            .map_err(|_| StoreError::Corrupt("next_offset".into()))?;
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM channel_history WHERE app_id = $1 AND channel = $2")
            .bind(app_id)
            .bind(channel)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO channel_positions (app_id, channel, epoch, next_offset)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (app_id, channel) DO UPDATE SET epoch = excluded.epoch,
                                                         next_offset = excluded.next_offset",
        )
        .bind(app_id)
        .bind(channel)
        .bind(&position.epoch)
        .bind(next)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn append_history(&self, entry: HistoryEntry, retention: Retention) -> Result<()> {
        self.submit(WriteOp::AppendHistory {
            entry: Box::new(entry),
            retention,
        })
        .await
    }

    async fn history(
        &self,
        app_id: &str,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<Vec<HistoryEntry>> {
        let mut q = QueryBuilder::new("SELECT * FROM channel_history WHERE app_id = ");
        q.push_bind(app_id.to_owned());
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
        app_id: &str,
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
        .bind(app_id)
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
        app_id: &str,
        channel: &str,
        not_before: DateTime<Utc>,
    ) -> Result<Option<u64>> {
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(seq) FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND created_at >= $3",
        )
        .bind(app_id)
        .bind(channel)
        .bind(millis(not_before))
        .fetch_one(&self.reader)
        .await?;
        Ok(oldest.and_then(|o| u64::try_from(o).ok()))
    }

    async fn history_channels(
        &self,
        after: Option<(&str, &str)>,
        limit: u32,
    ) -> Result<Vec<(String, String, ChannelPosition)>> {
        let (app, channel) = after.unwrap_or(("", ""));
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
                row.try_get("app_id")?,
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
        app_id: &str,
        channel: &str,
        up_to_offset: u64,
        not_before: DateTime<Utc>,
    ) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM channel_history
             WHERE app_id = $1 AND channel = $2 AND (seq <= $3 OR created_at < $4)",
        )
        .bind(app_id)
        .bind(channel)
        .bind(i64::try_from(up_to_offset).unwrap_or(i64::MAX))
        .bind(millis(not_before))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn create_source(&self, source: &IngestSource) -> Result<()> {
        sqlx::query(
            "INSERT INTO ingest_sources (id, app_id, uid, name, kind, secrets, hmac, tolerance_secs,
                                         event_type, channels, default_channel, created_at,
                                         updated_at, trust_unsigned_headers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&source.id)
        .bind(&source.app_id)
        .bind(&source.uid)
        .bind(&source.name)
        .bind(source.kind.as_str())
        .bind(to_json(&source.secrets))
        .bind(opt_json(&source.hmac))
        .bind(source.tolerance_secs)
        .bind(to_json(&source.event_type))
        .bind(to_json(&source.channels))
        .bind(&source.default_channel)
        .bind(millis(source.created_at))
        .bind(millis(source.updated_at))
        .bind(source.trust_unsigned_headers)
        .execute(&self.writer)
        .await
        .map_err(conflict_as("a source with this uid already exists"))?;
        Ok(())
    }

    async fn get_source(&self, app_id: &str, id_or_uid: &str) -> Result<Option<IngestSource>> {
        sqlx::query(
            "SELECT * FROM ingest_sources WHERE app_id = $1 AND (id = $2 OR uid = $2) \
             ORDER BY id = $2 DESC LIMIT 1",
        )
        .bind(app_id)
        .bind(id_or_uid)
        .fetch_optional(&self.reader)
        .await?
        .map(|row| rows::ingest_source(&row))
        .transpose()
    }

    async fn find_source(&self, id: &str) -> Result<Option<IngestSource>> {
        sqlx::query("SELECT * FROM ingest_sources WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::ingest_source(&row))
            .transpose()
    }

    async fn list_sources(&self, app_id: &str, page: &Page) -> Result<Vec<IngestSource>> {
        let mut q = QueryBuilder::new("SELECT * FROM ingest_sources WHERE app_id = ");
        q.push_bind(app_id.to_owned());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::ingest_source)
            .collect()
    }

    async fn update_source(&self, source: &IngestSource) -> Result<()> {
        let done = sqlx::query(
            "UPDATE ingest_sources SET uid = $3, name = $4, kind = $5, secrets = $6, hmac = $7,
                    tolerance_secs = $8, event_type = $9, channels = $10, default_channel = $11,
                    updated_at = $12, trust_unsigned_headers = $13
             WHERE id = $1 AND app_id = $2",
        )
        .bind(&source.id)
        .bind(&source.app_id)
        .bind(&source.uid)
        .bind(&source.name)
        .bind(source.kind.as_str())
        .bind(to_json(&source.secrets))
        .bind(opt_json(&source.hmac))
        .bind(source.tolerance_secs)
        .bind(to_json(&source.event_type))
        .bind(to_json(&source.channels))
        .bind(&source.default_channel)
        .bind(millis(source.updated_at))
        .bind(source.trust_unsigned_headers)
        .execute(&self.writer)
        .await
        .map_err(conflict_as("a source with this uid already exists"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn delete_source(&self, app_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM ingest_sources WHERE app_id = $1 AND id = $2")
            .bind(app_id)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn record_ingest(
        &self,
        event: IngestEvent,
        message: Message,
        endpoint_ids: Vec<String>,
        history: Vec<(HistoryEntry, Retention)>,
    ) -> Result<IngestRecorded> {
        let (source_id, delivery_id) = (event.source_id.clone(), event.delivery_id.clone());
        match self
            .submit(WriteOp::RecordIngest {
                event: Box::new(event),
                message,
                endpoint_ids,
                history,
            })
            .await
        {
            Ok(()) => Ok(IngestRecorded::New),
            Err(StoreError::Conflict(what)) if what == batch::INGEST_DUPLICATE => {
                let earlier = sqlx::query(
                    "SELECT * FROM ingest_events WHERE source_id = $1 AND delivery_id = $2",
                )
                .bind(&source_id)
                .bind(&delivery_id)
                .fetch_one(&self.writer)
                .await?;
                Ok(IngestRecorded::Duplicate(Box::new(rows::ingest_event(
                    &earlier,
                )?)))
            }
            Err(e) => Err(e),
        }
    }

    async fn list_ingest_events(&self, source_id: &str, page: &Page) -> Result<Vec<IngestEvent>> {
        let mut q = QueryBuilder::new("SELECT * FROM ingest_events WHERE source_id = ");
        q.push_bind(source_id.to_owned());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::ingest_event)
            .collect()
    }

    async fn get_ingest_event(&self, source_id: &str, id: &str) -> Result<Option<IngestEvent>> {
        sqlx::query("SELECT * FROM ingest_events WHERE source_id = $1 AND id = $2")
            .bind(source_id)
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::ingest_event(&row))
            .transpose()
    }

    async fn create_message(&self, message: Message, endpoint_ids: Vec<String>) -> Result<()> {
        self.submit(WriteOp::CreateMessage {
            message,
            endpoint_ids,
        })
        .await
    }

    async fn store_publication(
        &self,
        message: Option<(Message, Vec<String>)>,
        history: Vec<(HistoryEntry, Retention)>,
    ) -> Result<()> {
        self.submit(WriteOp::Publication { message, history }).await
    }

    async fn get_message(&self, app_id: &str, id_or_event_id: &str) -> Result<Option<Message>> {
        sqlx::query(
            "SELECT * FROM messages WHERE app_id = $1 AND (id = $2 OR event_id = $2) \
             ORDER BY id = $2 DESC LIMIT 1",
        )
        .bind(app_id)
        .bind(id_or_event_id)
        .fetch_optional(&self.reader)
        .await?
        .map(|row| rows::message(&row))
        .transpose()
    }

    async fn list_messages(
        &self,
        app_id: &str,
        page: &Page,
        query: &MessageQuery,
    ) -> Result<Vec<Message>> {
        let mut q = QueryBuilder::new("SELECT * FROM messages WHERE app_id = ");
        q.push_bind(app_id.to_owned());
        if let Some(channel) = &query.channel {
            q.push(" AND EXISTS (SELECT 1 FROM json_each(messages.channels) WHERE value = ");
            q.push_bind(channel.clone());
            q.push(")");
        }
        if let Some(types) = &query.event_types {
            q.push(" AND event_type IN (SELECT value FROM json_each(");
            q.push_bind(to_json(types));
            q.push("))");
        }
        if let Some(before) = query.before {
            q.push(" AND created_at < ");
            q.push_bind(millis(before));
        }
        if let Some(after) = query.after {
            q.push(" AND created_at > ");
            q.push_bind(millis(after));
        }
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::message)
            .collect()
    }

    async fn enqueue_manual(
        &self,
        app_id: &str,
        msg_id: &str,
        endpoint_id: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                     next_attempt_at, updated_at)
             VALUES ($1, $2, $3, $4, 0, $5, $6, $6)
             ON CONFLICT (msg_id, endpoint_id) DO UPDATE
             SET status = excluded.status, trigger_type = excluded.trigger_type,
                 next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at",
        )
        .bind(msg_id)
        .bind(endpoint_id)
        .bind(app_id)
        .bind(DeliveryStatus::Pending as i64)
        .bind(TriggerType::Manual as i64)
        .bind(millis(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn enqueue_failed(
        &self,
        endpoint_id: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        // Message ids sort by creation time, so a time window is an id range.
        let done = sqlx::query(
            "UPDATE deliveries SET status = $1, trigger_type = $2, next_attempt_at = $3,
                                   updated_at = $3
             WHERE endpoint_id = $4 AND status = $5 AND msg_id >= $6 AND msg_id < $7",
        )
        .bind(DeliveryStatus::Pending as i64)
        .bind(TriggerType::Manual as i64)
        .bind(millis(now))
        .bind(endpoint_id)
        .bind(DeliveryStatus::Fail as i64)
        .bind(id::lower_bound(id::MESSAGE, since))
        .bind(id::lower_bound(id::MESSAGE, until))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DeliveryJob>> {
        let limit = request.limit as usize;
        // What this claim takes, on top of what the caller already holds.
        let mut taken_endpoints: HashMap<String, u32> = HashMap::new();
        let mut taken_apps: HashMap<String, u32> = HashMap::new();
        let mut jobs = Vec::new();
        let mut leased: Vec<i64> = Vec::new();
        let mut refused: Vec<i64> = Vec::new();
        let mut passed: Vec<i64> = self.leases.held(request.now);
        for _ in 0..CLAIM_PASSES {
            let full_endpoints = at_limit(
                &request.in_flight,
                &taken_endpoints,
                request.per_endpoint_limit,
            );
            let full_apps = at_limit(&request.app_in_flight, &taken_apps, request.per_app_limit);
            // Fetch more candidates than needed: some may belong to an endpoint or app that
            // fills up.
            let fetch = (limit - jobs.len()) * 4;
            let candidates = sqlx::query(
                "SELECT d.rowid AS d_rowid, d.msg_id, d.attempts, d.trigger_type,
                        m.app_id AS m_app_id, m.event_type,
                        m.payload, e.id AS e_id, e.app_id AS e_app_id, e.uid AS e_uid,
                        e.url AS e_url, e.description AS e_description,
                        e.throttle_rate AS e_throttle_rate, e.disabled AS e_disabled,
                        e.event_types AS e_event_types, e.channels AS e_channels,
                        e.metadata AS e_metadata, e.headers AS e_headers, e.secret AS e_secret,
                        e.previous_secrets AS e_previous_secrets,
                        e.failing_since AS e_failing_since, e.created_at AS e_created_at,
                        e.updated_at AS e_updated_at, e.format AS e_format
                 FROM deliveries d
                 JOIN messages m ON m.id = d.msg_id
                 JOIN endpoints e ON e.id = d.endpoint_id
                 WHERE d.status IN (1, 3) AND d.next_attempt_at <= $1
                   AND ((d.attempts = 0 AND d.trigger_type = 0) = $2)
                   AND d.endpoint_id NOT IN (SELECT value FROM json_each($3))
                   AND d.app_id NOT IN (SELECT value FROM json_each($4))
                   AND d.rowid NOT IN (SELECT value FROM json_each($5))
                 ORDER BY d.next_attempt_at
                 LIMIT $6",
            )
            .bind(millis(request.now))
            .bind(request.first_attempts)
            .bind(to_json(&full_endpoints))
            .bind(to_json(&full_apps))
            .bind(to_json(&passed))
            .bind(i64::try_from(fetch).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await?;

            // Rows left because their endpoint or app filled up during this pass.
            let mut crowded_out = false;
            for row in &candidates {
                if jobs.len() >= limit {
                    break;
                }
                let rowid: i64 = row.try_get("d_rowid")?;
                let endpoint = rows::endpoint(row, "e_")?;
                if endpoint.disabled {
                    // Disabled endpoints receive nothing; the delivery stays recoverable as failed.
                    refused.push(rowid);
                    passed.push(rowid);
                    continue;
                }
                let app_id: String = row.try_get("m_app_id")?;
                let endpoint_held = request.in_flight.get(&endpoint.id).copied().unwrap_or(0)
                    + taken_endpoints.get(&endpoint.id).copied().unwrap_or(0);
                let app_held = request.app_in_flight.get(&app_id).copied().unwrap_or(0)
                    + taken_apps.get(&app_id).copied().unwrap_or(0);
                if endpoint_held >= request.per_endpoint_limit || app_held >= request.per_app_limit
                {
                    crowded_out = true;
                    continue;
                }
                *taken_endpoints.entry(endpoint.id.clone()).or_insert(0) += 1;
                *taken_apps.entry(app_id.clone()).or_insert(0) += 1;
                leased.push(rowid);
                passed.push(rowid);
                let payload: Vec<u8> = row.try_get("payload")?;
                jobs.push(DeliveryJob {
                    msg_id: row.try_get("msg_id")?,
                    app_id,
                    event_type: row.try_get("event_type")?,
                    payload: payload.into(),
                    endpoint,
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                    trigger: TriggerType::from_code(row.try_get("trigger_type")?),
                });
            }
            // Look again only if rows of endpoints or apps that filled up took candidate places
            // that others' rows, further down the queue, could have had. The next pass leaves
            // the full ones out in the query.
            if !crowded_out || candidates.len() < fetch || jobs.len() >= limit {
                break;
            }
        }
        self.leases.take(&jobs, &leased, request.lease_until);
        if !refused.is_empty() {
            sqlx::query(
                "UPDATE deliveries SET status = $1, next_attempt_at = NULL, updated_at = $2
                 WHERE rowid IN (SELECT value FROM json_each($3))",
            )
            .bind(DeliveryStatus::Fail as i64)
            .bind(millis(request.now))
            .bind(to_json(&refused))
            .execute(&self.writer)
            .await?;
        }
        Ok(jobs)
    }

    async fn next_due_at(&self) -> Result<Option<DateTime<Utc>>> {
        // Leased deliveries are in flight, not waiting: counting them would make everything
        // look due already, and the dispatcher would sleep through the next real due time.
        let row = sqlx::query(
            "SELECT MIN(next_attempt_at) AS due FROM deliveries
             WHERE status IN (1, 3) AND rowid NOT IN (SELECT value FROM json_each($1))",
        )
        .bind(to_json(&self.leases.held(Utc::now())))
        .fetch_one(&self.reader)
        .await?;
        row.try_get::<Option<i64>, _>("due")?
            .map(rows::time)
            .transpose()
    }

    async fn record_attempt(&self, record: AttemptRecord) -> Result<()> {
        let changes_endpoint = record.endpoint_change == crate::EndpointChange::Disable;
        let key = (
            record.attempt.msg_id.clone(),
            record.attempt.endpoint_id.clone(),
        );
        let result = self.submit(WriteOp::RecordAttempt(record)).await;
        // Released after the commit: the delivery's new state is visible before it is
        // claimable again. On failure too, so the attempt is retried rather than stranded.
        self.leases.release(&key);
        if changes_endpoint {
            // Only disabling changes what message fan-out sees.
            self.cache.invalidate();
        }
        result
    }

    async fn requeue_leased(&self, now: DateTime<Utc>) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE deliveries SET status = $1, next_attempt_at = $2 WHERE status = $3",
        )
        .bind(DeliveryStatus::Pending as i64)
        .bind(millis(now))
        .bind(DeliveryStatus::Sending as i64)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn list_attempts(
        &self,
        app_id: &str,
        scope: &AttemptScope,
        query: &AttemptQuery,
        page: &Page,
    ) -> Result<Vec<Attempt>> {
        let mut q = QueryBuilder::new("SELECT * FROM attempts WHERE app_id = ");
        q.push_bind(app_id.to_owned());
        match scope {
            AttemptScope::Endpoint(endpoint) => {
                q.push(" AND endpoint_id = ");
                q.push_bind(endpoint.clone());
            }
            AttemptScope::Message(msg) => {
                q.push(" AND msg_id = ");
                q.push_bind(msg.clone());
            }
        }
        if let Some(endpoint) = &query.endpoint_id {
            q.push(" AND endpoint_id = ");
            q.push_bind(endpoint.clone());
        }
        if let Some(status) = query.status {
            q.push(" AND status = ");
            q.push_bind(status as i64);
        }
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(rows::attempt)
            .collect()
    }

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

    async fn close(&self) {
        self.shutdown.cancel();
        let batcher = self.batcher.lock().await.take();
        if let Some(task) = batcher
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "store writer task failed");
        }
        self.writer.close().await;
        self.reader.close().await;
    }

    async fn list_endpoint_deliveries(
        &self,
        app_id: &str,
        endpoint_id: &str,
        query: &crate::DeliveryQuery,
        page: &Page,
    ) -> Result<Vec<(Message, crate::DeliveryState)>> {
        // In-flight deliveries are pending in the table; their leases live in memory.
        let leased = to_json(&self.leases.held(Utc::now()));
        let mut q = QueryBuilder::new(
            "SELECT m.*, d.status AS d_status, d.next_attempt_at AS d_next_attempt_at,
                    d.rowid IN (SELECT value FROM json_each(",
        );
        q.push_bind(leased.clone());
        q.push(
            ")) AS d_leased
             FROM deliveries d JOIN messages m ON m.id = d.msg_id
             WHERE d.app_id = ",
        );
        q.push_bind(app_id.to_owned());
        q.push(" AND d.endpoint_id = ");
        q.push_bind(endpoint_id.to_owned());
        let filter = &query.message;
        if let Some(channel) = &filter.channel {
            q.push(" AND EXISTS (SELECT 1 FROM json_each(m.channels) WHERE value = ");
            q.push_bind(channel.clone());
            q.push(")");
        }
        if let Some(tag) = &query.tag {
            q.push(" AND EXISTS (SELECT 1 FROM json_each(m.tags) WHERE value = ");
            q.push_bind(tag.clone());
            q.push(")");
        }
        if let Some(types) = &filter.event_types {
            q.push(" AND m.event_type IN (SELECT value FROM json_each(");
            q.push_bind(to_json(types));
            q.push("))");
        }
        if let Some(before) = filter.before {
            q.push(" AND m.created_at < ");
            q.push_bind(millis(before));
        }
        if let Some(after) = filter.after {
            q.push(" AND m.created_at > ");
            q.push_bind(millis(after));
        }
        if let Some(status) = query.status {
            let leased_rows = |q: &mut QueryBuilder<Sqlite>| {
                q.push("d.rowid IN (SELECT value FROM json_each(");
                q.push_bind(leased.clone());
                q.push("))");
            };
            match status {
                DeliveryStatus::Pending => {
                    q.push(" AND d.status = 1 AND NOT ");
                    leased_rows(&mut q);
                }
                DeliveryStatus::Sending => {
                    q.push(" AND (d.status = 3 OR (d.status = 1 AND ");
                    leased_rows(&mut q);
                    q.push("))");
                }
                DeliveryStatus::Success | DeliveryStatus::Fail => {
                    q.push(" AND d.status = ");
                    q.push_bind(status as i64);
                }
            }
        }
        paginate(&mut q, "m.id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| Ok((rows::message(row)?, delivery_state(row)?)))
            .collect()
    }

    async fn list_message_deliveries(
        &self,
        app_id: &str,
        msg_id: &str,
        page: &Page,
    ) -> Result<Vec<(Endpoint, crate::DeliveryState)>> {
        let mut q = QueryBuilder::new(
            "SELECT e.*, d.status AS d_status, d.next_attempt_at AS d_next_attempt_at,
                    d.rowid IN (SELECT value FROM json_each(",
        );
        q.push_bind(to_json(&self.leases.held(Utc::now())));
        q.push(
            ")) AS d_leased
             FROM deliveries d JOIN endpoints e ON e.id = d.endpoint_id
             WHERE d.app_id = ",
        );
        q.push_bind(app_id.to_owned());
        q.push(" AND d.msg_id = ");
        q.push_bind(msg_id.to_owned());
        paginate(&mut q, "d.endpoint_id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| Ok((rows::endpoint(row, "")?, delivery_state(row)?)))
            .collect()
    }
}

/// A delivery's state from the `d_`-aliased columns of [`Store::list_endpoint_deliveries`] and
/// [`Store::list_message_deliveries`]: a leased pending delivery is being sent, and only a
/// pending one has a next attempt.
fn delivery_state(row: &sqlx::sqlite::SqliteRow) -> Result<crate::DeliveryState> {
    let leased: bool = row.try_get("d_leased")?;
    let status = match rows::status(row.try_get("d_status")?)? {
        DeliveryStatus::Pending if leased => DeliveryStatus::Sending,
        status => status,
    };
    let next_attempt = match status {
        DeliveryStatus::Pending => row
            .try_get::<Option<i64>, _>("d_next_attempt_at")?
            .map(rows::time)
            .transpose()?,
        _ => None,
    };
    Ok(crate::DeliveryState {
        status,
        next_attempt,
    })
}

/// Queries one claim may make: a pass whose candidates were crowded out by endpoints or apps
/// that filled up is followed by one that leaves those out.
const CLAIM_PASSES: usize = 3;

/// The keys whose count, held already plus taken by this claim, has reached `limit`: a claim
/// leaves their deliveries out in the query.
fn at_limit<'a>(
    held: &'a HashMap<String, u32>,
    taken: &'a HashMap<String, u32>,
    limit: u32,
) -> Vec<&'a String> {
    let count =
        |key: &String| held.get(key).copied().unwrap_or(0) + taken.get(key).copied().unwrap_or(0);
    held.keys()
        .chain(taken.keys().filter(|key| !held.contains_key(*key)))
        .filter(|key| count(key) >= limit)
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use herald_core::model::Metadata;

    use super::*;

    async fn store_with_app() -> (tempfile::TempDir, SqliteStore, App) {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).await.expect("open");
        let now = Utc::now();
        let app = App {
            id: id::new_id(id::APP, now),
            uid: None,
            name: "test".into(),
            throttle_rate: None,
            metadata: Metadata::new(),
            pusher: herald_core::model::PusherCredentials::generate(),
            history: None,
            created_at: now,
            updated_at: now,
        };
        store.create_app(&app).await.expect("app");
        (dir, store, app)
    }

    fn message(app_id: &str, event_id: Option<&str>) -> Message {
        let now = Utc::now();
        Message {
            id: id::new_id(id::MESSAGE, now),
            app_id: app_id.into(),
            event_id: event_id.map(str::to_owned),
            event_type: "t".into(),
            channels: None,
            tags: None,
            payload: Bytes::from_static(b"{}"),
            created_at: now,
        }
    }

    #[tokio::test]
    async fn repeated_event_id_in_one_batch_conflicts_once() {
        let (_dir, store, app) = store_with_app().await;
        let (a, b, c) = tokio::join!(
            store.create_message(message(&app.id, Some("evt-1")), vec![]),
            store.create_message(message(&app.id, Some("evt-1")), vec![]),
            store.create_message(message(&app.id, None), vec![]),
        );
        let conflicts = [&a, &b]
            .iter()
            .filter(|r| matches!(r, Err(StoreError::Conflict(_))))
            .count();
        assert_eq!(conflicts, 1, "{a:?} {b:?}");
        assert!(c.is_ok());
        store.close().await;
    }

    fn test_endpoint(app: &str) -> herald_core::model::Endpoint {
        let now = Utc::now();
        herald_core::model::Endpoint {
            id: id::new_id(id::ENDPOINT, now),
            app_id: app.into(),
            uid: None,
            url: "https://example.com".into(),
            description: String::new(),
            throttle_rate: None,
            disabled: false,
            format: herald_core::model::EndpointFormat::StandardWebhooks,
            event_types: None,
            channels: None,
            metadata: Metadata::new(),
            headers: Default::default(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            previous_secrets: vec![],
            failing_since: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[tokio::test]
    async fn a_claim_leaves_out_apps_at_their_share_and_looks_past_their_backlog() {
        let (_dir, store, a) = store_with_app().await;
        let b = App {
            id: id::new_id(id::APP, Utc::now()),
            pusher: herald_core::model::PusherCredentials::generate(),
            ..a.clone()
        };
        store.create_app(&b).await.expect("b");
        let (ea, eb) = (test_endpoint(&a.id), test_endpoint(&b.id));
        store.create_endpoint(&ea).await.expect("ea");
        store.create_endpoint(&eb).await.expect("eb");
        for _ in 0..20 {
            store
                .create_message(message(&a.id, None), vec![ea.id.clone()])
                .await
                .expect("m");
        }
        store
            .create_message(message(&b.id, None), vec![eb.id.clone()])
            .await
            .expect("m");
        let now = Utc::now() + chrono::Duration::seconds(1);
        let jobs = store
            .claim_due(&ClaimRequest {
                now,
                lease_until: now + chrono::Duration::seconds(60),
                limit: 4,
                first_attempts: true,
                in_flight: HashMap::new(),
                per_endpoint_limit: 100,
                app_in_flight: HashMap::from([(a.id.clone(), 6)]),
                per_app_limit: 8,
            })
            .await
            .expect("claim");
        let mut apps: Vec<&str> = jobs
            .iter()
            .map(|j| if j.app_id == a.id { "A" } else { "B" })
            .collect();
        apps.sort_unstable();
        assert_eq!(
            apps,
            ["A", "A", "B"],
            "A's two free slots, then B, though A has 18 more due"
        );
        // Now: the same without room for A at all: one pass, B.
        let jobs = store
            .claim_due(&ClaimRequest {
                now,
                lease_until: now + chrono::Duration::seconds(60),
                limit: 4,
                first_attempts: true,
                in_flight: HashMap::new(),
                per_endpoint_limit: 100,
                app_in_flight: HashMap::from([(a.id.clone(), 8)]),
                per_app_limit: 8,
            })
            .await
            .expect("claim");
        assert!(
            jobs.is_empty(),
            "B's row is leased, A is full: {}",
            jobs.len()
        );
        // Endpoint limit: A's endpoint may take 3 more, no app limit.
        let jobs = store
            .claim_due(&ClaimRequest {
                now,
                lease_until: now + chrono::Duration::seconds(60),
                limit: 10,
                first_attempts: true,
                in_flight: HashMap::from([(ea.id.clone(), 7)]),
                per_endpoint_limit: 10,
                app_in_flight: HashMap::new(),
                per_app_limit: 100,
            })
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn an_exact_id_wins_over_a_uid_equal_to_it_in_sql_and_in_the_cache() {
        // The API refuses such uids now; rows written before that rule must still resolve.
        // A is written first, so a scan without the exact-id rule would find it first.
        let (_dir, store, existing) = store_with_app().await;
        let now = Utc::now();
        let b_id = id::new_id(id::APP, now);
        let a = App {
            id: id::new_id(id::APP, now),
            uid: Some(b_id.clone()),
            name: "A".into(),
            pusher: herald_core::model::PusherCredentials::generate(),
            ..existing.clone()
        };
        store.create_app(&a).await.expect("app a");
        let b = App {
            id: b_id,
            uid: None,
            name: "B".into(),
            pusher: herald_core::model::PusherCredentials::generate(),
            ..existing
        };
        store.create_app(&b).await.expect("app b");
        for round in ["from SQL", "from the cache"] {
            let found = store.get_app(&b.id).await.expect("read").expect("found");
            assert_eq!(found.id, b.id, "{round}");
            // Reading A fills the cache under A's uid too; that must not shadow B's id.
            let found = store.get_app(&a.id).await.expect("read").expect("found");
            assert_eq!(found.id, a.id, "{round}");
        }
        // A read first, after an invalidation: B's id is still not answered from A's uid.
        store
            .set_pusher_credentials(&b.id, &b.pusher)
            .await
            .expect("a write clears the cache");
        let found = store.get_app(&a.id).await.expect("read").expect("found");
        assert_eq!(found.id, a.id);
        let found = store.get_app(&b.id).await.expect("read").expect("found");
        assert_eq!(found.id, b.id, "A cached first, B looked up by id");
        store.close().await;
    }

    #[tokio::test]
    async fn idempotency_purge_keeps_at_most_the_newest_records() {
        let (_dir, store, _app) = store_with_app().await;
        let now = Utc::now();
        for n in 0..5 {
            store
                .save_idempotent_response("scope", &format!("key-{n}"), 201, b"{}", now)
                .await
                .expect("save");
        }
        let purged = store
            .purge_idempotency(now - chrono::Duration::hours(1), 2, u64::MAX)
            .await
            .expect("purge");
        assert_eq!(purged, 3);
        for (n, kept) in [(0, false), (2, false), (3, true), (4, true)] {
            let found = store
                .idempotent_response("scope", &format!("key-{n}"))
                .await
                .expect("read");
            assert_eq!(found.is_some(), kept, "key-{n}");
        }
        // By size: three bodies of 100 bytes with room for 250 keep the newest two.
        for n in 5..8 {
            store
                .save_idempotent_response("scope", &format!("key-{n}"), 201, &[b'x'; 100], now)
                .await
                .expect("save");
        }
        store
            .purge_idempotency(now - chrono::Duration::hours(1), 100, 250)
            .await
            .expect("purge");
        for (n, kept) in [(4, false), (5, false), (6, true), (7, true)] {
            let found = store
                .idempotent_response("scope", &format!("key-{n}"))
                .await
                .expect("read");
            assert_eq!(found.is_some(), kept, "key-{n}");
        }
        store.close().await;
    }

    #[tokio::test]
    async fn a_failing_write_does_not_sink_its_batch() {
        let (_dir, store, app) = store_with_app().await;
        // A message for an app that does not exist violates a foreign key: the grouped insert
        // fails and the batch is redone one write at a time.
        let (good, bad) = tokio::join!(
            store.create_message(message(&app.id, None), vec![]),
            store.create_message(message("app_missing", None), vec![]),
        );
        assert!(good.is_ok(), "{good:?}");
        assert!(matches!(bad, Err(StoreError::Database(_))), "{bad:?}");
        let page = Page {
            limit: 10,
            iterator: None,
            descending: true,
            backwards: false,
        };
        let stored = store
            .list_messages(&app.id, &page, &MessageQuery::default())
            .await
            .expect("list");
        assert_eq!(stored.len(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn history_appends_advance_the_position_and_trim_to_the_retention() {
        let (_dir, store, app) = store_with_app().await;
        let retention = Retention {
            max_events: 3,
            max_age: Duration::from_secs(3600),
        };
        let epoch = "e1".to_owned();
        store
            .reset_history(
                &app.id,
                "history-x",
                &ChannelPosition {
                    epoch: epoch.clone(),
                    next_offset: 1,
                },
            )
            .await
            .expect("reset");
        // Concurrent appends of different channels share batches; one channel's are ordered.
        for offset in 1..=32 {
            let entry = |channel: &str| HistoryEntry {
                app_id: app.id.clone(),
                channel: channel.to_owned(),
                epoch: epoch.clone(),
                offset,
                event: "e".into(),
                data: offset.to_string(),
                raw_json: false,
                user_id: None,
                created_at: Utc::now(),
            };
            let (a, b) = tokio::join!(
                store.append_history(entry("history-x"), retention),
                store.append_history(entry("history-y"), retention),
            );
            a.expect("append x");
            b.expect("append y");
        }
        let position = store
            .channel_position(&app.id, "history-x")
            .await
            .expect("read")
            .expect("position");
        assert_eq!(
            position,
            ChannelPosition {
                epoch,
                next_offset: 33
            }
        );
        let all = store
            .history(
                &app.id,
                "history-x",
                &HistoryQuery {
                    after: None,
                    before: None,
                    limit: 100,
                    newest_first: false,
                    not_before: DateTime::<Utc>::MIN_UTC,
                },
            )
            .await
            .expect("history");
        let offsets: Vec<u64> = all.iter().map(|e| e.offset).collect();
        assert_eq!(
            offsets,
            [30, 31, 32],
            "trimmed at offset 32 to the last three"
        );
        assert_eq!(
            store
                .oldest_history_offset(&app.id, "history-y", DateTime::<Utc>::MIN_UTC)
                .await
                .expect("oldest"),
            Some(30)
        );
    }
}
