//! [`EndpointStore`] on SQLite: endpoints (served from the exact cache for matching) and their
//! statistics.

use herald_core::{AppId, EndpointId};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_core::model::{Endpoint, EndpointStats};
use sqlx::{QueryBuilder, Row};

use super::{
    SqliteStore, paginate,
    rows::{self, conflict_as},
};
use crate::{ENDPOINT_CHANGED, EndpointStore, Page, Result, StoreError, sql};

/// The update of an endpoint, bound by `sql::update_endpoint!`.
const UPDATE_ENDPOINT: &str =
    "UPDATE endpoints SET uid = $3, url = $4, description = $5, throttle_rate = $6,
                    failing_since = CASE WHEN disabled = 1 AND $7 = 0 THEN NULL
                                         ELSE failing_since END,
                    disabled = $7, event_types = $8, channels = $9, metadata = $10, headers = $11,
                    secret = $12, previous_secrets = $13, updated_at = $14, format = $15
             WHERE id = $1 AND app_id = $2 AND updated_at = $16";

#[async_trait::async_trait]
impl EndpointStore for SqliteStore {
    async fn create_endpoint(&self, ep: &Endpoint) -> Result<()> {
        let created = sql::insert_endpoint!(ep, &self.keys)
            .execute(&self.writer)
            .await
            .map_err(conflict_as("an endpoint with this uid already exists"));
        if let Err(e) = created {
            return Err(crate::unless_app_gone(self, &ep.app_id, e).await);
        }
        self.cache.invalidate();
        Ok(())
    }

    async fn get_endpoint(&self, app_id: &AppId, id_or_uid: &str) -> Result<Option<Endpoint>> {
        sqlx::query(sql::GET_ENDPOINT)
            .bind(app_id.as_str())
            .bind(id_or_uid)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::endpoint(&row, "", &self.keys))
            .transpose()
    }

    async fn list_endpoints(&self, app_id: &AppId, page: &Page) -> Result<Vec<Endpoint>> {
        let mut q = QueryBuilder::new(sql::LIST_ENDPOINTS);
        q.push_bind(app_id.to_string());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| rows::endpoint(row, "", &self.keys))
            .collect()
    }

    async fn update_endpoint(&self, ep: &Endpoint, read_at: DateTime<Utc>) -> Result<()> {
        // `failing_since` is the worker's; `$14` is only whether the update re-enables.
        let done = sql::update_endpoint!(UPDATE_ENDPOINT, ep, read_at, &self.keys)
            .execute(&self.writer)
            .await
            .map_err(conflict_as("an endpoint with this uid already exists"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            let exists = sqlx::query(sql::ENDPOINT_EXISTS)
                .bind(ep.id.as_str())
                .bind(ep.app_id.as_str())
                .fetch_optional(&self.writer)
                .await?
                .is_some();
            return Err(if exists {
                StoreError::Conflict(ENDPOINT_CHANGED.to_owned())
            } else {
                StoreError::NotFound
            });
        }
        Ok(())
    }

    async fn delete_endpoint(&self, app_id: &AppId, id: &EndpointId) -> Result<bool> {
        let done = sqlx::query(sql::DELETE_ENDPOINT)
            .bind(app_id.as_str())
            .bind(id.as_str())
            .execute(&self.writer)
            .await?;
        self.cache.invalidate();
        Ok(done.rows_affected() > 0)
    }

    async fn cached_app_endpoints(&self, app_id: &AppId) -> Result<Option<Arc<Vec<Endpoint>>>> {
        // One process owns the database: the cache always serves, and is exact.
        self.app_endpoints(app_id).await.map(Some)
    }

    async fn app_endpoints(&self, app_id: &AppId) -> Result<std::sync::Arc<Vec<Endpoint>>> {
        if let Some(endpoints) = self.cache.endpoints(app_id) {
            return Ok(endpoints);
        }
        let generation = self.cache.generation();
        let endpoints: Vec<Endpoint> = sqlx::query("SELECT * FROM endpoints WHERE app_id = $1")
            .bind(app_id.as_str())
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| rows::endpoint(row, "", &self.keys))
            .collect::<Result<_>>()?;
        let endpoints = Arc::new(endpoints);
        self.cache.put_endpoints(generation, app_id, &endpoints);
        Ok(endpoints)
    }

    async fn endpoint_stats(
        &self,
        endpoint_id: &EndpointId,
        window: &crate::StatsWindow,
    ) -> Result<EndpointStats> {
        let (from, to) = window.message_ids();
        // Successes are not indexed by status (migration 0015): they are the endpoint's
        // deliveries (the row with no status, from deliveries_endpoint_msg) less the others,
        // counted in the same statement so both read one snapshot. `status <> 0` is written
        // out so SQLite can use the partial index deliveries_endpoint_unsettled.
        let counts = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM deliveries
             WHERE endpoint_id = $1 AND status <> 0 AND msg_id >= $2 AND msg_id < $3
             GROUP BY status
             UNION ALL
             SELECT NULL, COUNT(*) FROM deliveries
             WHERE endpoint_id = $1 AND msg_id >= $2 AND msg_id < $3",
        )
        .bind(endpoint_id.as_str())
        .bind(&from)
        .bind(&to)
        .fetch_all(&self.reader)
        .await?;
        let counts = counts
            .iter()
            .map(|row| {
                let code: Option<i64> = row.try_get("status")?;
                Ok((code.map(rows::status).transpose()?, row.try_get("n")?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut stats = sql::endpoint_stats(counts)?;
        // In-flight deliveries are pending in the table; their leases live in memory.
        let sending = self.leases.count_for(endpoint_id, &from, &to);
        stats.pending = (stats.pending - sending).max(0);
        stats.sending += sending;
        Ok(stats)
    }
}
