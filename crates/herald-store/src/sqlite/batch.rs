//! Group commit for the hot writes.
//!
//! With `synchronous=FULL` every SQLite commit costs an fsync (about 7 k/s on this class of
//! disk), so committing each new message alone would cap intake there. Instead, callers hand
//! their write to this task and wait; the task commits whatever has queued up in one
//! transaction (see `grouped` for how). One caller's conflict does not undo the others'
//! writes, and a caller's `await` returns only after the commit that contains its write.
//!
//! Channel history offsets are assigned here, inside that transaction, in the order the writes
//! were handed over: each channel's offsets are gap-free and increase in commit order, and
//! each caller gets back the positions its entries landed at. The writer pool has a single
//! connection, so a `reset_history` (which writes through that pool directly) commits wholly
//! before or after a batch, never inside one.

use herald_core::EndpointId;
use herald_core::{
    history::{NewHistoryEntry, Position},
    model::{DeliveryStatus, IngestEvent, Message},
};
use sqlx::{Acquire, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::rows::millis;

mod grouped;

use crate::{AttemptRecord, EndpointChange, NextStep, Result, StoreError};

/// Largest number of writes committed together.
const MAX_BATCH: usize = 512;
/// Writes waiting for a commit before callers are made to wait for room.
pub(crate) const QUEUE_DEPTH: usize = 8192;

pub(crate) enum WriteOp {
    CreateMessage {
        message: Message,
        endpoint_ids: Vec<EndpointId>,
    },
    /// Applied only if the delivery is still leased under the record's token when the batch
    /// commits; otherwise only the attempt row goes in and the write reports [`STALE_LEASE`].
    RecordAttempt {
        record: AttemptRecord,
        leases: super::leases::Leases,
    },
    /// One channel history event; rides the group commit like messages do.
    AppendHistory { entry: Box<NewHistoryEntry> },
    /// A verified inbound webhook and the message it became, committed together so a
    /// provider's retry is either the first delivery or a recognised duplicate, never lost.
    RecordIngest {
        event: Box<IngestEvent>,
        message: Message,
        endpoint_ids: Vec<EndpointId>,
        history: Vec<NewHistoryEntry>,
    },
    /// A message (if any) and the channel history entries it becomes, committed together, so
    /// a crash never leaves one without the other.
    Publication {
        message: Option<(Message, Vec<EndpointId>)>,
        history: Vec<NewHistoryEntry>,
    },
    /// Channel webhook messages and the occupancy changes they report, committed together.
    ChannelEvents {
        messages: Vec<(Message, Vec<EndpointId>)>,
        changes: Vec<crate::OccupancyChange>,
    },
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

/// What a committed write reports to its caller: the positions assigned to its channel history
/// entries, in the order it gave them (empty for a write without history).
pub(crate) type Committed = Vec<Position>;

pub(crate) struct PendingWrite {
    pub op: WriteOp,
    pub done: oneshot::Sender<Result<Committed>>,
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

async fn apply_all(pool: &SqlitePool, batch: &[PendingWrite]) -> Result<Vec<Result<Committed>>> {
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
    // Each write alone, in order: a write's offsets are assigned from the positions the writes
    // before it left in this transaction, so a failed write consumes none.
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for write in batch {
        let mut savepoint = tx.begin().await?;
        match grouped::apply(&mut savepoint, std::slice::from_ref(write)).await {
            Ok(mut outcome) => {
                savepoint.commit().await?;
                outcomes.push(outcome.pop().unwrap_or_else(|| Ok(Vec::new())));
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

pub(crate) const MESSAGE_CONFLICT: &str = "a message with this eventId already exists";
pub(crate) const INGEST_DUPLICATE: &str = "this delivery was already received";
/// The outcome of an attempt record whose lease had run out: the attempt row is committed, the
/// delivery's state is not (`record_attempt` turns this into `Recorded::Stale`).
pub(crate) const STALE_LEASE: &str = "the delivery's lease ran out before the record committed";

/// The delivery's status and due time after an attempt.
pub(crate) fn next_state(next: NextStep) -> (DeliveryStatus, Option<i64>) {
    match next {
        NextStep::Delivered => (DeliveryStatus::Success, None),
        NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(millis(at))),
        NextStep::Failed => (DeliveryStatus::Fail, None),
    }
}

pub(crate) async fn endpoint_change(
    conn: &mut SqliteConnection,
    endpoint_id: &EndpointId,
    change: EndpointChange,
    now: i64,
) -> Result<()> {
    let update = match change {
        EndpointChange::Unchanged => return Ok(()),
        EndpointChange::StreakEnded => sqlx::query(
            "UPDATE endpoints SET failing_since = NULL WHERE id = $1 AND failing_since IS NOT NULL",
        )
        .bind(endpoint_id.as_str()),
        EndpointChange::StreakStarted { at } => sqlx::query(
            "UPDATE endpoints SET failing_since = $2 WHERE id = $1 AND failing_since IS NULL",
        )
        .bind(endpoint_id.as_str())
        .bind(millis(at)),
        EndpointChange::Disable => {
            // `updated_at` must move, even within the millisecond of the last update: an API
            // update prepared before this one compares it (`update_endpoint`).
            sqlx::query(
                "UPDATE endpoints SET disabled = 1, updated_at = MAX(updated_at + 1, $2)
                 WHERE id = $1",
            )
            .bind(endpoint_id.as_str())
            .bind(now)
        }
    };
    update.execute(&mut *conn).await?;
    Ok(())
}
