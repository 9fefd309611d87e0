//! [`crate::RetentionStore`] on SQLite, and the batched deletion of an app's data
//! (`sql::retention_store!`, shared with PostgreSQL).
//!
//! Each sweep call is one statement on the writer connection, over at most `limit` rows found
//! by an index (an expunge by hand is one short transaction of two), so the group commit waits
//! at most one short batch, and queued writes get the
//! connection between the batches of an app's deletion. Freed pages are reused by later rows:
//! at a steady rate the file stops growing (see the README's "Retention").

use herald_core::{AppId, model::DeliveryStatus};
use sqlx::Connection;

use super::{
    SqliteStore,
    leases::DeliveryKey,
    rows::{self, millis},
};

impl SqliteStore {
    /// [`crate::RetentionStore::expunge_payload`]: the payload and the failing of the
    /// message's deliveries still to be made in one transaction, their leases revoked once it
    /// has committed (see `take_back`).
    async fn expunge_payload_and_fail_deliveries(
        &self,
        app_id: &AppId,
        id_or_event_id: &str,
    ) -> crate::Result<bool> {
        let mut writer = self.writer.acquire().await?;
        let mut tx = writer.begin().await?;
        let expunged = sqlx::query(crate::sql::EXPUNGE_PAYLOAD)
            .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
            .bind(app_id.as_str())
            .bind(id_or_event_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(expunged) = expunged else {
            return Ok(false);
        };
        let msg_id: herald_core::MessageId = rows::id(&expunged, "id")?;
        let failed = sqlx::query(
            "UPDATE deliveries SET status = $1, next_attempt_at = NULL, updated_at = $2
             WHERE msg_id = $3 AND status IN (1, 3)
             RETURNING endpoint_id",
        )
        .bind(DeliveryStatus::Fail as i64)
        .bind(millis(chrono::Utc::now()))
        .bind(msg_id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        // Read before the commit: once committed, the leases must be taken back.
        let keys = failed
            .iter()
            .map(|row| Ok((msg_id.clone(), rows::id(row, "endpoint_id")?)))
            .collect::<crate::Result<Vec<DeliveryKey>>>()?;
        tx.commit().await?;
        self.take_back(writer, &keys);
        Ok(true)
    }
}

crate::sql::retention_store!(
    SqliteStore, writer, reader,
    key: "rowid",
    lock: "",
    scope_has_path: "instr(scope, $1 || '/') > 0 OR substr(scope, -length($1)) = $1",
    between_batches: tokio::task::yield_now().await,
);
