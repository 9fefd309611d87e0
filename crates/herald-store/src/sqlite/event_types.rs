//! [`EventTypeStore`] on SQLite: the environment's event types.

use herald_core::model::EventType;
use sqlx::QueryBuilder;

use super::{
    SqliteStore, paginate,
    rows::{self, conflict_as},
};
use crate::{EventTypeStore, Page, Result, StoreError, sql};

#[async_trait::async_trait]
impl EventTypeStore for SqliteStore {
    async fn create_event_type(&self, et: &EventType) -> Result<()> {
        sql::insert_event_type!(et)
            .execute(&self.writer)
            .await
            .map_err(conflict_as("an event type with this name already exists"))?;
        Ok(())
    }

    async fn get_event_type(&self, name: &str) -> Result<Option<EventType>> {
        sqlx::query(sql::GET_EVENT_TYPE)
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
        let mut q = QueryBuilder::new(sql::LIST_EVENT_TYPES);
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
        let done = sql::update_event_type!(et).execute(&self.writer).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
