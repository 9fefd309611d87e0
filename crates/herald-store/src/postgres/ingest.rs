//! [`IngestStore`] on PostgreSQL: ingest sources and the requests they received; a request is
//! recorded with its message, deliveries and history entries in one transaction.
//!
//! Schema (migrations/postgres/0001_init.sql):
//! - `ingest_sources`: id TEXT PK, app_id TEXT (apps, cascade), uid TEXT (UNIQUE with app_id),
//!   name TEXT, kind TEXT, secrets TEXT (JSON array), hmac TEXT (JSON `{header, encoding,
//!   prefix, idHeader}` or NULL; `rows::hmac_json` writes it, as the SQLite store does),
//!   tolerance_secs BIGINT, event_type TEXT (JSON array), channels TEXT (JSON array),
//!   default_channel TEXT NULL, created_at / updated_at BIGINT millis, trust_unsigned_headers
//!   BOOLEAN. Index ingest_sources_app (app_id, id). `rows::ingest_source` reads them.
//! - `ingest_events`: id TEXT PK, source_id TEXT (ingest_sources, cascade), app_id TEXT,
//!   delivery_id TEXT (UNIQUE with source_id: the dedup key), headers TEXT (JSON), body BYTEA,
//!   event_type TEXT, channels TEXT (JSON array), msg_id TEXT, received_at BIGINT millis.
//!   Index ingest_events_source (source_id, id). `rows::ingest_event` reads them.
//!
//! `record_ingest` inserts the event first (`ON CONFLICT (source_id, delivery_id) DO
//! NOTHING RETURNING id`): a delivery id seen before (on any node: the unique index makes a
//! concurrent insert of the same key wait for the first to commit or roll back) returns the
//! earlier record, writing nothing and consuming no offset. Otherwise the message and its
//! deliveries go in with it. Without history entries that is one statement
//! ([`RECORD_INGEST`]), committed on its own; with them, a transaction that also assigns
//! their offsets (`history::append_entries`).

use herald_core::{
    AppId, EndpointId, SourceId,
    history::NewHistoryEntry,
    model::{DeliveryStatus, IngestEvent, IngestSource, Message, TriggerType},
};
use sqlx::QueryBuilder;

use super::{
    PostgresStore, history, messages, paginate,
    rows::{self, conflict_as},
};
use crate::{Cache, IngestRecorded, IngestStore, Page, Result, StoreError, sql};

#[async_trait::async_trait]
impl IngestStore for PostgresStore {
    async fn create_source(&self, source: &IngestSource) -> Result<()> {
        let created = sql::insert_source!(source, &self.keys)
            .execute(&self.pool)
            .await
            .map_err(conflict_as("a source with this uid already exists"));
        match created {
            Ok(_) => Ok(()),
            Err(e) => Err(crate::unless_app_gone(self, &source.app_id, e).await),
        }
    }

    async fn get_source(&self, app_id: &AppId, id_or_uid: &str) -> Result<Option<IngestSource>> {
        // An exact id wins over another source's uid equal to it.
        sqlx::query(sql::GET_SOURCE)
            .bind(app_id.as_str())
            .bind(id_or_uid)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::ingest_source(&row, &self.keys))
            .transpose()
    }

    /// Every webhook posted to a source reads it: through the node cache, as its app is.
    async fn find_source(&self, id: &str) -> Result<Option<IngestSource>> {
        let read = async {
            sqlx::query(sql::FIND_SOURCE)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| rows::ingest_source(&row, &self.keys))
                .transpose()
        };
        self.cache
            .read_through(self.cache.source(id), read, Cache::put_source)
            .await
    }

    async fn list_sources(&self, app_id: &AppId, page: &Page) -> Result<Vec<IngestSource>> {
        let mut q = QueryBuilder::new(sql::LIST_SOURCES);
        q.push_bind(app_id.to_string());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| rows::ingest_source(row, &self.keys))
            .collect()
    }

    async fn update_source(
        &self,
        source: &IngestSource,
        read_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        let done = sql::update_source!(source, &self.keys, read_at)
            .execute(&self.pool)
            .await
            .map_err(conflict_as("a source with this uid already exists"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            let exists = sqlx::query(sql::SOURCE_EXISTS)
                .bind(source.id.as_str())
                .bind(source.app_id.as_str())
                .fetch_optional(&self.pool)
                .await?
                .is_some();
            return Err(if exists {
                StoreError::Conflict(crate::SOURCE_CHANGED.to_owned())
            } else {
                StoreError::NotFound
            });
        }
        Ok(())
    }

    async fn delete_source(&self, app_id: &AppId, id: &SourceId) -> Result<bool> {
        let done = sqlx::query(sql::DELETE_SOURCE)
            .bind(app_id.as_str())
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        self.cache.invalidate();
        Ok(done.rows_affected() > 0)
    }

    async fn record_ingest(
        &self,
        event: IngestEvent,
        message: Message,
        endpoint_ids: Vec<EndpointId>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<IngestRecorded> {
        let (app_id, source_id) = (event.app_id.clone(), event.source_id.clone());
        match self
            .record_ingest_now(event, message, endpoint_ids, history)
            .await
        {
            Err(e) => Err(crate::unless_source_gone(self, &app_id, &source_id, e).await),
            recorded => recorded,
        }
    }

    async fn list_ingest_events(
        &self,
        source_id: &SourceId,
        page: &Page,
    ) -> Result<Vec<IngestEvent>> {
        let mut q = QueryBuilder::new(sql::LIST_INGEST_EVENTS);
        q.push_bind(source_id.to_string());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::ingest_event)
            .collect()
    }

    async fn get_ingest_event(
        &self,
        source_id: &SourceId,
        id: &str,
    ) -> Result<Option<IngestEvent>> {
        sqlx::query(sql::GET_INGEST_EVENT)
            .bind(source_id.as_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::ingest_event(&row))
            .transpose()
    }
}

/// A verified inbound webhook without history entries, its message and the message's first
/// deliveries, in one statement (one round trip and one commit instead of a transaction's
/// four): the message goes in only if the event did, and the deliveries only if the message
/// did. The message insert has no `ON CONFLICT`: were its eventId taken, the whole statement
/// fails and records nothing, as the transaction would. The result is the number of events
/// inserted: 0 for a delivery id the source has already received.
const RECORD_INGEST: &str = concat!(
    "WITH recorded AS (
         INSERT INTO ingest_events (id, source_id, app_id, delivery_id, headers, body,
                                    event_type, channels, msg_id, received_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (source_id, delivery_id) DO NOTHING RETURNING id
     ), inserted AS (
         INSERT INTO messages (id, app_id, event_id, event_type, channels, tags, payload,
                               created_at, payload_expires_at)
         SELECT $11, $12, $13, $14, $15, $16, $17, $18, $19 FROM recorded
         RETURNING id
     ), queued AS (
         INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                 next_attempt_at, updated_at)
         SELECT inserted.id, e, $12, $21, 0, $22, ",
    first_attempt_due!("$18"),
    ", $18
         FROM inserted, UNNEST($20::text[]) AS e
     )
     SELECT count(*) FROM recorded"
);

impl PostgresStore {
    /// [`IngestStore::record_ingest`]: the request, its message and its history entries in
    /// one transaction (the request alone in one statement when nothing is kept).
    async fn record_ingest_now(
        &self,
        event: IngestEvent,
        message: Message,
        endpoint_ids: Vec<EndpointId>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<IngestRecorded> {
        if history.is_empty() {
            return self
                .record_ingest_alone(&event, &message, &endpoint_ids)
                .await;
        }
        let mut tx = self.pool.begin().await?;
        let inserted: Option<String> = sql::ingest_event_columns!(
            sqlx::query_scalar(
                "INSERT INTO ingest_events (id, source_id, app_id, delivery_id, headers, body,
                                            event_type, channels, msg_id, received_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (source_id, delivery_id) DO NOTHING RETURNING id",
            ),
            &event
        )
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            tx.rollback().await?;
            return self.earlier(&event).await;
        }
        let queued = messages::insert_message(&mut tx, &message, &endpoint_ids).await?;
        let positions =
            history::append_entries(&mut tx, &history, self.announces_history()).await?;
        tx.commit().await?;
        if queued {
            self.due.committed();
        }
        Ok(IngestRecorded::New(positions))
    }

    /// [`IngestStore::record_ingest`] for an event without history entries: [`RECORD_INGEST`].
    async fn record_ingest_alone(
        &self,
        event: &IngestEvent,
        message: &Message,
        endpoint_ids: &[EndpointId],
    ) -> Result<IngestRecorded> {
        let endpoints: Vec<&str> = endpoint_ids.iter().map(EndpointId::as_str).collect();
        let recorded: i64 = sql::message_columns!(
            sql::ingest_event_columns!(sqlx::query_scalar(RECORD_INGEST), event),
            message
        )
        .bind(&endpoints)
        .bind(DeliveryStatus::Pending as i32)
        .bind(TriggerType::Scheduled as i32)
        .fetch_one(&self.pool)
        .await
        .map_err(conflict_as(messages::MESSAGE_CONFLICT))?;
        if recorded == 0 {
            return self.earlier(event).await;
        }
        if !endpoint_ids.is_empty() {
            self.due.committed();
        }
        Ok(IngestRecorded::New(Vec::new()))
    }

    /// The record of an earlier delivery with `event`'s delivery id. The conflicting row is
    /// committed (the insert that found it waited for its transaction to end): a statement
    /// begun after sees it.
    async fn earlier(&self, event: &IngestEvent) -> Result<IngestRecorded> {
        let earlier = sqlx::query(sql::EARLIER_INGEST_EVENT)
            .bind(event.source_id.as_str())
            .bind(&event.delivery_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(IngestRecorded::Duplicate(Box::new(rows::ingest_event(
            &earlier,
        )?)))
    }
}
