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
        // Its deliveries are locked together, in another order than a batch of attempt
        // records may lock two of them: run again if it was a deadlock's victim.
        Ok(crate::sql::retrying_deadlocks(|| self.expunge_once(app_id, id_or_event_id)).await?)
    }

    async fn expunge_once(&self, app_id: &AppId, id_or_event_id: &str) -> sqlx::Result<bool> {
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
        // The delivery's rows are locked before their leases' rows, as a claim locks them. The
        // leases go in a statement of their own: one a claim committed while this waited for
        // its delivery's row is not in the first statement's snapshot.
        sqlx::query(
            "UPDATE deliveries SET status = $1, next_attempt_at = NULL, updated_at = $2,
                                   lease_token = NULL, leased_until = NULL
             WHERE msg_id = $3 AND status IN (1, 3)",
        )
        .bind(DeliveryStatus::Fail as i32)
        .bind(millis(chrono::Utc::now()))
        .bind(&msg_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM delivery_leases l USING deliveries d
             WHERE l.msg_id = $1 AND d.msg_id = l.msg_id AND d.endpoint_id = l.endpoint_id
               AND d.lease_token IS NULL",
        )
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
