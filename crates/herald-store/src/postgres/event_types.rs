//! [`EventTypeStore`] on PostgreSQL: the environment's event types.

use herald_core::model::EventType;
use sqlx::QueryBuilder;

use super::{
    PostgresStore, paginate,
    rows::{self, conflict_as},
};
use crate::{EventTypeStore, Page, Result, StoreError, sql};

#[async_trait::async_trait]
impl EventTypeStore for PostgresStore {
    async fn create_event_type(&self, et: &EventType) -> Result<()> {
        sql::insert_event_type!(et)
            .execute(&self.pool)
            .await
            .map_err(conflict_as("an event type with this name already exists"))?;
        Ok(())
    }

    async fn get_event_type(&self, name: &str) -> Result<Option<EventType>> {
        sqlx::query(sql::GET_EVENT_TYPE)
            .bind(name)
            .fetch_optional(&self.pool)
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
            q.push(" AND NOT archived");
        }
        paginate(&mut q, "name", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::event_type)
            .collect()
    }

    async fn update_event_type(&self, et: &EventType) -> Result<()> {
        let done = sql::update_event_type!(et).execute(&self.pool).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
