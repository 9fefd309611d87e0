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
    rows::{self, conflict_as},
};
use crate::{Cache, IngestRecorded, IngestStore, Page, Result, StoreError, sql};

#[async_trait::async_trait]
impl IngestStore for SqliteStore {
    async fn create_source(&self, source: &IngestSource) -> Result<()> {
        let created = sql::insert_source!(source, &self.keys)
            .execute(&self.writer)
            .await
            .map_err(conflict_as("a source with this uid already exists"));
        match created {
            Ok(_) => Ok(()),
            Err(e) => Err(crate::unless_app_gone(self, &source.app_id, e).await),
        }
    }

    async fn get_source(&self, app_id: &AppId, id_or_uid: &str) -> Result<Option<IngestSource>> {
        sqlx::query(sql::GET_SOURCE)
            .bind(app_id.as_str())
            .bind(id_or_uid)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::ingest_source(&row, &self.keys))
            .transpose()
    }

    /// Every webhook posted to a source reads it: cached (see `crate::cache`), as its app is.
    async fn find_source(&self, id: &str) -> Result<Option<IngestSource>> {
        let read = async {
            sqlx::query(sql::FIND_SOURCE)
                .bind(id)
                .fetch_optional(&self.reader)
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
            .fetch_all(&self.reader)
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
            .execute(&self.writer)
            .await
            .map_err(conflict_as("a source with this uid already exists"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            let exists = sqlx::query(sql::SOURCE_EXISTS)
                .bind(source.id.as_str())
                .bind(source.app_id.as_str())
                .fetch_optional(&self.writer)
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
            .execute(&self.writer)
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
        let (source_id, delivery_id) = (event.source_id.clone(), event.delivery_id.clone());
        let app_id = event.app_id.clone();
        match self
            .submit(WriteOp::RecordIngest {
                event: Box::new(event),
                message: self.new_message(message, endpoint_ids),
                history,
            })
            .await
        {
            Ok(positions) => Ok(IngestRecorded::New(positions)),
            Err(StoreError::Conflict(what)) if what == super::batch::INGEST_DUPLICATE => {
                let earlier = sqlx::query(sql::EARLIER_INGEST_EVENT)
                    .bind(source_id.as_str())
                    .bind(&delivery_id)
                    .fetch_one(&self.writer)
                    .await?;
                Ok(IngestRecorded::Duplicate(Box::new(rows::ingest_event(
                    &earlier,
                )?)))
            }
            Err(e) => Err(crate::unless_source_gone(self, &app_id, &source_id, e).await),
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
        sqlx::query(sql::GET_INGEST_EVENT)
            .bind(source_id.as_str())
            .bind(id)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::ingest_event(&row))
            .transpose()
    }
}
