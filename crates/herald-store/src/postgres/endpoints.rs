//! [`EndpointStore`] on PostgreSQL: an app's webhook endpoints (an app's list read through the
//! node cache, see the module doc of `postgres`) and their statistics.
//!
//! Tables (migrations/postgres/0001_init.sql):
//! - `endpoints`: id TEXT PK, app_id TEXT (apps, cascade), uid TEXT (UNIQUE with app_id), url,
//!   description TEXT, throttle_rate BIGINT, disabled BOOLEAN, event_types TEXT (JSON array or
//!   NULL), channels TEXT (JSON array or NULL), metadata TEXT (JSON object), headers TEXT (JSON
//!   object), secret TEXT, previous_secrets TEXT (JSON `[[secret, expires_millis]]`),
//!   failing_since BIGINT NULL, created_at / updated_at BIGINT millis, format TEXT
//!   ('standard-webhooks' | 'pusher'). Index endpoints_app (app_id, id).
//!   `rows::endpoint(row, prefix)` reads them; `sql::insert_endpoint!` and
//!   `sql::update_endpoint!` (shared with SQLite) write them.
//! - `deliveries` (for `endpoint_stats`): endpoint_id, status INTEGER (0 success, 1 pending,
//!   2 fail, 3 sending) and the lease columns; indexes deliveries_endpoint_unsettled
//!   (endpoint_id, status, msg_id) `WHERE status <> 0` (migration 0010) and
//!   deliveries_endpoint_msg (endpoint_id, msg_id).
//!
//! `update_endpoint` is a compare-and-set on `updated_at`, which every write moves (the
//! worker's disable too, in `messages.rs`: `GREATEST(updated_at + 1, now)`), so an update
//! prepared before another node's write conflicts instead of overwriting it. `get_endpoint` and
//! `list_endpoints` (the API's reads, which an update compares against) read the database.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_core::{
    AppId, EndpointId,
    model::{DeliveryStatus, Endpoint, EndpointStats},
};
use sqlx::{QueryBuilder, Row};

use super::{
    PostgresStore, paginate,
    rows::{self, conflict_as, millis},
};
use crate::{ENDPOINT_CHANGED, EndpointStore, Page, Result, StoreError, sql};

const UID_TAKEN: &str = "an endpoint with this uid already exists";

/// The update of an endpoint, bound by `sql::update_endpoint!`.
const UPDATE_ENDPOINT: &str =
    "UPDATE endpoints SET uid = $3, url = $4, description = $5, throttle_rate = $6,
                    failing_since = CASE WHEN disabled AND NOT $7 THEN NULL
                                         ELSE failing_since END,
                    disabled = $7, event_types = $8, channels = $9, metadata = $10, headers = $11,
                    secret = $12, previous_secrets = $13, updated_at = $14, format = $15
             WHERE id = $1 AND app_id = $2 AND updated_at = $16";

#[async_trait::async_trait]
impl EndpointStore for PostgresStore {
    async fn create_endpoint(&self, ep: &Endpoint) -> Result<()> {
        let created = sql::insert_endpoint!(ep, &self.keys)
            .execute(&self.pool)
            .await
            .map_err(conflict_as(UID_TAKEN));
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
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::endpoint(&row, "", &self.keys))
            .transpose()
    }

    async fn list_endpoints(&self, app_id: &AppId, page: &Page) -> Result<Vec<Endpoint>> {
        let mut q = QueryBuilder::new(sql::LIST_ENDPOINTS);
        q.push_bind(app_id.to_string());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| rows::endpoint(row, "", &self.keys))
            .collect()
    }

    async fn update_endpoint(&self, ep: &Endpoint, read_at: DateTime<Utc>) -> Result<()> {
        // `failing_since` is the worker's: kept, except that re-enabling clears it.
        let done = sql::update_endpoint!(UPDATE_ENDPOINT, ep, read_at, &self.keys)
            .execute(&self.pool)
            .await
            .map_err(conflict_as(UID_TAKEN))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            let exists = sqlx::query(sql::ENDPOINT_EXISTS)
                .bind(ep.id.as_str())
                .bind(ep.app_id.as_str())
                .fetch_optional(&self.pool)
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
            .execute(&self.pool)
            .await?;
        self.cache.invalidate();
        Ok(done.rows_affected() > 0)
    }

    async fn cached_app_endpoints(&self, app_id: &AppId) -> Result<Option<Arc<Vec<Endpoint>>>> {
        if !self.cache.is_serving() {
            return Ok(None);
        }
        self.app_endpoints(app_id).await.map(Some)
    }

    async fn app_endpoints(&self, app_id: &AppId) -> Result<Arc<Vec<Endpoint>>> {
        if let Some(endpoints) = self.cache.endpoints(app_id) {
            return Ok(endpoints);
        }
        let generation = self.cache.generation();
        let endpoints = sqlx::query("SELECT * FROM endpoints WHERE app_id = $1 ORDER BY id")
            .bind(app_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| rows::endpoint(row, "", &self.keys))
            .collect::<Result<Vec<_>>>()?;
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
        // A pending delivery under a live lease is in flight: it counts as sending. Successes
        // are not indexed by status (migration 0010): they are the endpoint's deliveries (the
        // row with no status) less the others, counted in one statement so both read one
        // snapshot. `status <> 0` is written out so the planner can use the partial index.
        let counts = sqlx::query(
            "SELECT status, (lease_token IS NOT NULL AND leased_until > $2) AS leased,
                    COUNT(*) AS n
             FROM deliveries
             WHERE endpoint_id = $1 AND status <> 0 AND msg_id >= $3 AND msg_id < $4
             GROUP BY 1, 2
             UNION ALL
             SELECT NULL, FALSE, COUNT(*) FROM deliveries
             WHERE endpoint_id = $1 AND msg_id >= $3 AND msg_id < $4",
        )
        .bind(endpoint_id.as_str())
        .bind(millis(self.clock.now()))
        .bind(&from)
        .bind(&to)
        .fetch_all(&self.pool)
        .await?;
        let counts = counts
            .iter()
            .map(|row| {
                let code: Option<i32> = row.try_get("status")?;
                let status = match code.map(rows::status).transpose()? {
                    Some(DeliveryStatus::Pending) if row.try_get::<bool, _>("leased")? => {
                        Some(DeliveryStatus::Sending)
                    }
                    status => status,
                };
                Ok((status, row.try_get("n")?))
            })
            .collect::<Result<Vec<_>>>()?;
        sql::endpoint_stats(counts)
    }
}
