//! [`EndpointStore`] on SQLite: endpoints (served from the exact cache for matching) and their
//! statistics.

use herald_core::{AppId, EndpointId};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use herald_core::model::{DeliveryStatus, Endpoint, EndpointStats};
use sqlx::{QueryBuilder, Row};

use super::{
    SqliteStore, paginate,
    rows::{self, conflict_as, millis, opt_json, to_json},
};
use crate::{ENDPOINT_CHANGED, EndpointStore, Page, Result, StoreError};

#[async_trait::async_trait]
impl EndpointStore for SqliteStore {
    async fn create_endpoint(&self, ep: &Endpoint) -> Result<()> {
        sqlx::query(
            "INSERT INTO endpoints (id, app_id, uid, url, description, throttle_rate, disabled,
                                    event_types, channels, metadata, headers, secret,
                                    previous_secrets, failing_since, created_at, updated_at,
                                    format)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(ep.id.as_str())
        .bind(ep.app_id.as_str())
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

    async fn get_endpoint(&self, app_id: &AppId, id_or_uid: &str) -> Result<Option<Endpoint>> {
        sqlx::query(
            "SELECT * FROM endpoints WHERE app_id = $1 AND (id = $2 OR uid = $2) \
             ORDER BY id = $2 DESC LIMIT 1",
        )
        .bind(app_id.as_str())
        .bind(id_or_uid)
        .fetch_optional(&self.reader)
        .await?
        .map(|row| rows::endpoint(&row, ""))
        .transpose()
    }

    async fn list_endpoints(&self, app_id: &AppId, page: &Page) -> Result<Vec<Endpoint>> {
        let mut q = QueryBuilder::new("SELECT * FROM endpoints WHERE app_id = ");
        q.push_bind(app_id.to_string());
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.reader)
            .await?
            .iter()
            .map(|row| rows::endpoint(row, ""))
            .collect()
    }

    async fn update_endpoint(&self, ep: &Endpoint, read_at: DateTime<Utc>) -> Result<()> {
        // `failing_since` is the worker's; `$14` is only whether the update re-enables.
        let done = sqlx::query(
            "UPDATE endpoints SET uid = $3, url = $4, description = $5, throttle_rate = $6,
                    failing_since = CASE WHEN disabled = 1 AND $7 = 0 THEN NULL
                                         ELSE failing_since END,
                    disabled = $7, event_types = $8, channels = $9, metadata = $10, headers = $11,
                    secret = $12, previous_secrets = $13, updated_at = $14, format = $15
             WHERE id = $1 AND app_id = $2 AND updated_at = $16",
        )
        .bind(ep.id.as_str())
        .bind(ep.app_id.as_str())
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
        .bind(millis(ep.updated_at))
        .bind(ep.format.as_str())
        .bind(millis(read_at))
        .execute(&self.writer)
        .await
        .map_err(conflict_as("an endpoint with this uid already exists"))?;
        self.cache.invalidate();
        if done.rows_affected() == 0 {
            let exists = sqlx::query("SELECT 1 FROM endpoints WHERE id = $1 AND app_id = $2")
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
        let done = sqlx::query("DELETE FROM endpoints WHERE app_id = $1 AND id = $2")
            .bind(app_id.as_str())
            .bind(id.as_str())
            .execute(&self.writer)
            .await?;
        self.cache.invalidate();
        Ok(done.rows_affected() > 0)
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
            .map(|row| rows::endpoint(row, ""))
            .collect::<Result<_>>()?;
        let endpoints = Arc::new(endpoints);
        self.cache.put_endpoints(generation, app_id, &endpoints);
        Ok(endpoints)
    }

    async fn endpoint_stats(&self, endpoint_id: &EndpointId) -> Result<EndpointStats> {
        let counts = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM deliveries WHERE endpoint_id = $1 GROUP BY status",
        )
        .bind(endpoint_id.as_str())
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
}
