//! [`crate::RetentionStore`] on PostgreSQL, and the batched deletion of an app's data
//! (`sql::retention_store!`, shared with SQLite).
//!
//! Several nodes may sweep at once: each batch takes only rows no other transaction holds
//! (`FOR UPDATE SKIP LOCKED`), and deleting or expunging a row twice changes nothing, so two
//! sweepers split the work instead of waiting on each other. Autovacuum makes the space of
//! deleted rows reusable, so at a steady rate the tables stop growing.

use herald_core::{AppId, model::DeliveryStatus};

use super::{PostgresStore, rows::millis};

impl PostgresStore {
    /// [`crate::RetentionStore::expunge_payload`]: the payload and the failing of the
    /// message's deliveries still to be made in one transaction, their leases cleared (an
    /// attempt in flight then records a stale attempt, fenced on its token).
    async fn expunge_payload_and_fail_deliveries(
        &self,
        app_id: &AppId,
        id_or_event_id: &str,
    ) -> crate::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let msg_id: Option<String> = sqlx::query_scalar(crate::sql::EXPUNGE_PAYLOAD)
            .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
            .bind(app_id.as_str())
            .bind(id_or_event_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(msg_id) = msg_id else {
            return Ok(false);
        };
        // The delivery's row is locked before its lease's row, as a claim locks them.
        sqlx::query(
            "WITH failed AS (
                 UPDATE deliveries SET status = $1, next_attempt_at = NULL, updated_at = $2,
                                       lease_token = NULL, leased_until = NULL
                 WHERE msg_id = $3 AND status IN (1, 3)
                 RETURNING msg_id, endpoint_id
             )
             DELETE FROM delivery_leases l USING failed f
             WHERE l.msg_id = f.msg_id AND l.endpoint_id = f.endpoint_id",
        )
        .bind(DeliveryStatus::Fail as i32)
        .bind(millis(chrono::Utc::now()))
        .bind(&msg_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

crate::sql::retention_store!(
    PostgresStore, pool, pool,
    key: "id",
    lock: "FOR UPDATE SKIP LOCKED",
    scope_has_path: "strpos(scope, $1 || '/') > 0 OR right(scope, length($1)) = $1",
);
