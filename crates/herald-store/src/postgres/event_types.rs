//! [`EventTypeStore`] on PostgreSQL: the environment's event types.

use herald_core::model::EventType;
use sqlx::QueryBuilder;

use super::{
    PostgresStore, paginate,
    rows::{self, conflict_as, millis, opt_json},
};
use crate::{EventTypeStore, Page, Result, StoreError};

#[async_trait::async_trait]
impl EventTypeStore for PostgresStore {
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
        .execute(&self.pool)
        .await
        .map_err(conflict_as("an event type with this name already exists"))?;
        Ok(())
    }

    async fn get_event_type(&self, name: &str) -> Result<Option<EventType>> {
        sqlx::query("SELECT * FROM event_types WHERE name = $1")
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
        let mut q = QueryBuilder::new("SELECT * FROM event_types WHERE 1 = 1");
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
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }
}
