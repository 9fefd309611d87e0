//! Group commit for the hot writes.
//!
//! With `synchronous=FULL` every SQLite commit costs an fsync (about 7 k/s on this class of
//! disk), so committing each new message alone would cap intake there. Instead, callers hand
//! their write to this task and wait; the task commits whatever has queued up in one
//! transaction, each write inside its own savepoint so one caller's conflict does not undo the
//! others'. A caller's `await` returns only after the commit that contains its write.

use herald_core::model::{DeliveryStatus, Message, TriggerType};
use sqlx::{Acquire, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::rows::{conflict_as, millis, opt_json};

mod grouped;
use crate::{AttemptRecord, EndpointChange, NextStep, Result, StoreError};

/// Largest number of writes committed together.
const MAX_BATCH: usize = 512;
/// Writes waiting for a commit before callers are made to wait for room.
pub(crate) const QUEUE_DEPTH: usize = 8192;

pub(crate) enum WriteOp {
    CreateMessage {
        message: Message,
        endpoint_ids: Vec<String>,
    },
    RecordAttempt(AttemptRecord),
    /// The Svix SDKs send an Idempotency-Key with every POST, so this rides along with the
    /// message it answers for instead of costing a commit of its own.
    SaveIdempotent {
        scope: String,
        key: String,
        status: u16,
        body: Vec<u8>,
        at: i64,
    },
}

pub(crate) struct PendingWrite {
    pub op: WriteOp,
    pub done: oneshot::Sender<Result<()>>,
}

pub(crate) async fn run(
    pool: SqlitePool,
    mut queue: mpsc::Receiver<PendingWrite>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            n = queue.recv_many(&mut batch, MAX_BATCH) => n,
            () = shutdown.cancelled() => {
                // Refuse new writes but commit everything already handed to us.
                queue.close();
                while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    commit(&pool, &mut batch).await;
                }
                return;
            }
        };
        if received == 0 {
            return;
        }
        commit(&pool, &mut batch).await;
    }
}

async fn commit(pool: &SqlitePool, batch: &mut Vec<PendingWrite>) {
    match apply_all(pool, batch).await {
        Ok(outcomes) => {
            for (write, outcome) in batch.drain(..).zip(outcomes) {
                // The caller may have given up waiting; its write is committed regardless.
                let _ = write.done.send(outcome);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, writes = batch.len(), "batched commit failed");
            let message = e.to_string();
            for write in batch.drain(..) {
                let _ = write.done.send(Err(StoreError::Batch(message.clone())));
            }
        }
    }
}

async fn apply_all(pool: &SqlitePool, batch: &[PendingWrite]) -> Result<Vec<Result<()>>> {
    let mut tx = pool.begin().await?;
    match grouped::apply(&mut tx, batch).await {
        Ok(outcomes) => {
            tx.commit().await?;
            return Ok(outcomes);
        }
        Err(e) => {
            // Something other than an expected conflict (say, a foreign key: the app was
            // deleted meanwhile). Redo the batch one write at a time so only the writes that
            // fail report an error.
            tracing::warn!(error = %e, writes = batch.len(), "grouped write failed; retrying one by one");
            tx.rollback().await?;
        }
    }
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for write in batch {
        let mut savepoint = tx.begin().await?;
        match apply(&mut savepoint, &write.op).await {
            Ok(()) => {
                savepoint.commit().await?;
                outcomes.push(Ok(()));
            }
            Err(e) => {
                savepoint.rollback().await?;
                outcomes.push(Err(e));
            }
        }
    }
    tx.commit().await?;
    Ok(outcomes)
}

async fn apply(conn: &mut SqliteConnection, op: &WriteOp) -> Result<()> {
    match op {
        WriteOp::CreateMessage {
            message,
            endpoint_ids,
        } => create_message(conn, message, endpoint_ids).await,
        WriteOp::RecordAttempt(record) => record_attempt(conn, record).await,
        WriteOp::SaveIdempotent {
            scope,
            key,
            status,
            body,
            at,
        } => {
            sqlx::query(
                "INSERT INTO idempotency (scope, key, status, body, created_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (scope, key) DO NOTHING",
            )
            .bind(scope)
            .bind(key)
            .bind(i64::from(*status))
            .bind(body)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            Ok(())
        }
    }
}

pub(crate) const MESSAGE_CONFLICT: &str = "a message with this eventId already exists";

async fn create_message(
    conn: &mut SqliteConnection,
    message: &Message,
    endpoint_ids: &[String],
) -> Result<()> {
    let created = millis(message.created_at);
    sqlx::query(
        "INSERT INTO messages (id, app_id, event_id, event_type, channels, tags, payload, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&message.id)
    .bind(&message.app_id)
    .bind(&message.event_id)
    .bind(&message.event_type)
    .bind(opt_json(&message.channels))
    .bind(opt_json(&message.tags))
    .bind(message.payload.as_ref())
    .bind(created)
    .execute(&mut *conn)
    .await
    .map_err(conflict_as(MESSAGE_CONFLICT))?;
    for endpoint_id in endpoint_ids {
        sqlx::query(
            "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                     next_attempt_at, updated_at)
             VALUES ($1, $2, $3, $4, 0, $5, $6, $6)",
        )
        .bind(&message.id)
        .bind(endpoint_id)
        .bind(&message.app_id)
        .bind(DeliveryStatus::Pending as i64)
        .bind(TriggerType::Scheduled as i64)
        .bind(created)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The delivery's status and due time after an attempt.
pub(crate) fn next_state(next: NextStep) -> (DeliveryStatus, Option<i64>) {
    match next {
        NextStep::Delivered => (DeliveryStatus::Success, None),
        NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(millis(at))),
        NextStep::Failed => (DeliveryStatus::Fail, None),
    }
}

async fn record_attempt(conn: &mut SqliteConnection, record: &AttemptRecord) -> Result<()> {
    let a = &record.attempt;
    let now = millis(a.created_at);
    sqlx::query(
        "INSERT INTO attempts (id, msg_id, endpoint_id, app_id, url, status, response_status_code,
                               response, response_duration_ms, trigger_type, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&a.id)
    .bind(&a.msg_id)
    .bind(&a.endpoint_id)
    .bind(&a.app_id)
    .bind(&a.url)
    .bind(a.status as i64)
    .bind(a.response_status_code)
    .bind(&a.response)
    .bind(a.response_duration_ms)
    .bind(a.trigger_type as i64)
    .bind(now)
    .execute(&mut *conn)
    .await?;

    let (status, next_at) = next_state(record.next);
    let scheduled = i64::from(a.trigger_type == TriggerType::Scheduled);
    sqlx::query(
        "UPDATE deliveries SET status = $1, next_attempt_at = $2, attempts = attempts + $3,
                               updated_at = $4
         WHERE msg_id = $5 AND endpoint_id = $6",
    )
    .bind(status as i64)
    .bind(next_at)
    .bind(scheduled)
    .bind(now)
    .bind(&a.msg_id)
    .bind(&a.endpoint_id)
    .execute(&mut *conn)
    .await?;

    endpoint_change(conn, &a.endpoint_id, record.endpoint_change, now).await
}

pub(crate) async fn endpoint_change(
    conn: &mut SqliteConnection,
    endpoint_id: &str,
    change: EndpointChange,
    now: i64,
) -> Result<()> {
    let update = match change {
        EndpointChange::Unchanged => return Ok(()),
        EndpointChange::StreakEnded => sqlx::query(
            "UPDATE endpoints SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
        )
        .bind(endpoint_id),
        EndpointChange::StreakStarted { at } => sqlx::query(
            "UPDATE endpoints SET failing_since = $2 WHERE id = $1 AND failing_since IS NULL",
        )
        .bind(endpoint_id)
        .bind(millis(at)),
        EndpointChange::Disable => {
            sqlx::query("UPDATE endpoints SET disabled = 1, updated_at = $2 WHERE id = $1")
                .bind(endpoint_id)
                .bind(now)
        }
    };
    update.execute(&mut *conn).await?;
    Ok(())
}
