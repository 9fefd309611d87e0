//! [`IngestStore`] on SQLite: ingest sources and received requests; a request is recorded
//! with its message in one group commit.

use herald_core::{AppId, EndpointId, SourceId};
use herald_core::{
    history::NewHistoryEntry,
    model::{IngestEvent, IngestSource, Message},
};
use sqlx::QueryBuilder;

use super::{
    SqliteStore,
    batch::WriteOp,
    paginate,
    rows::{self, conflict_as, millis, to_json},
};
use crate::{IngestRecorded, IngestStore, Page, Result, StoreError};

#[async_trait::async_trait]
impl IngestStore for SqliteStore {
    async fn create_source(&self, source: &IngestSource) -> Result<()> {
        sqlx::query(
            "INSERT INTO ingest_sources (id, app_id, uid, name, kind, secrets, hmac, tolerance_secs,
                                         event_type, channels, default_channel, created_at,
                                         updated_at, trust_unsigned_headers)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(source.id.as_str())
        .bind(source.app_id.as_str())
        .bind(&source.uid)
        .bind(&source.name)
        .bind(source.kind.as_str())
        .bind(to_json(&source.secrets))
        .bind(rows::hmac_json(source.hmac.as_ref()))
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

    async fn get_source(&self, app_id: &AppId, id_or_uid: &str) -> Result<Option<IngestSource>> {
        sqlx::query(
            "SELECT * FROM ingest_sources WHERE app_id = $1 AND (id = $2 OR uid = $2) \
             ORDER BY id = $2 DESC LIMIT 1",
        )
        .bind(app_id.as_str())
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

    async fn list_sources(&self, app_id: &AppId, page: &Page) -> Result<Vec<IngestSource>> {
        let mut q = QueryBuilder::new("SELECT * FROM ingest_sources WHERE app_id = ");
        q.push_bind(app_id.to_string());
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
        .bind(source.id.as_str())
        .bind(source.app_id.as_str())
        .bind(&source.uid)
        .bind(&source.name)
        .bind(source.kind.as_str())
        .bind(to_json(&source.secrets))
        .bind(rows::hmac_json(source.hmac.as_ref()))
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

    async fn delete_source(&self, app_id: &AppId, id: &SourceId) -> Result<bool> {
        let done = sqlx::query("DELETE FROM ingest_sources WHERE app_id = $1 AND id = $2")
            .bind(app_id.as_str())
            .bind(id.as_str())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn record_ingest(
        &self,
        event: IngestEvent,
        message: Message,
        endpoint_ids: Vec<EndpointId>,
        history: Vec<NewHistoryEntry>,
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
            Ok(positions) => Ok(IngestRecorded::New(positions)),
            Err(StoreError::Conflict(what)) if what == super::batch::INGEST_DUPLICATE => {
                let earlier = sqlx::query(
                    "SELECT * FROM ingest_events WHERE source_id = $1 AND delivery_id = $2",
                )
                .bind(source_id.as_str())
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

    async fn list_ingest_events(
        &self,
        source_id: &SourceId,
        page: &Page,
    ) -> Result<Vec<IngestEvent>> {
        let mut q = QueryBuilder::new("SELECT * FROM ingest_events WHERE source_id = ");
        q.push_bind(source_id.to_string());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
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
        sqlx::query("SELECT * FROM ingest_events WHERE source_id = $1 AND id = $2")
            .bind(source_id.as_str())
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::ingest_event(&row))
            .transpose()
    }
}
