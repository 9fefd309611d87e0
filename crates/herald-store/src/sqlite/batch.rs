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

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, OnceLock},
};

use herald_core::{AppId, EndpointId, MessageId};
use herald_core::{
    history::{NewHistoryEntry, Position},
    model::{DeliveryStatus, IngestEvent, Message},
};
use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{
    gate::ClaimGate,
    leases::{DeliveryKey, Leases},
    rows::millis,
};

mod durable;
mod grouped;
mod locked;
mod positions;

pub(crate) use durable::{Durable, WalFile};
pub(crate) use positions::PositionCache;

use crate::{
    AttemptRecord, DeliveryJob, EndpointChange, FreshDeliveries, NextStep, Result, StoreError,
};

/// Largest number of writes committed together.
pub(crate) const MAX_BATCH: usize = 512;
/// Writes waiting for a commit before callers are made to wait for room.
pub(crate) const QUEUE_DEPTH: usize = 8192;

/// A new message, the endpoints it goes to, and the first attempts to hand to the dispatcher as
/// it commits.
pub(crate) struct NewMessage {
    pub message: Message,
    pub endpoint_ids: Vec<EndpointId>,
    /// One job per delivery the dispatcher reserved room for (see `SqliteStore::new_message`):
    /// leased in the transaction that commits the message, handed over once it has committed,
    /// and the room given back if it does not commit.
    pub fresh: Vec<DeliveryJob>,
    /// Where the rooms of `fresh` go back if the message is dropped with them still here.
    pub sink: Option<Arc<dyn FreshDeliveries>>,
}

/// A new message dropped before the group commit took its jobs (its write refused by a closed
/// queue, or its caller cancelled while it waited for room in the queue, as a request whose
/// client went away is) gives their rooms back; without this they stayed reserved for good,
/// and an endpoint whose rooms had all leaked got no more deliveries until a restart.
impl Drop for NewMessage {
    fn drop(&mut self) {
        if let (Some(sink), false) = (&self.sink, self.fresh.is_empty()) {
            sink.give_back(
                self.fresh
                    .iter()
                    .map(|job| (job.app_id.clone(), job.endpoint.id.clone()))
                    .collect(),
            );
        }
    }
}

pub(crate) enum WriteOp {
    CreateMessage(NewMessage),
    /// Applied only if the delivery is still leased under the record's token when the batch
    /// commits; otherwise only the attempt row goes in and the write reports [`STALE_LEASE`].
    RecordAttempt {
        record: AttemptRecord,
        leases: super::leases::Leases,
    },
    /// One channel history event; rides the group commit like messages do.
    AppendHistory {
        entry: Box<NewHistoryEntry>,
    },
    /// A verified inbound webhook and the message it became, committed together so a
    /// provider's retry is either the first delivery or a recognised duplicate, never lost.
    RecordIngest {
        event: Box<IngestEvent>,
        message: NewMessage,
        history: Vec<NewHistoryEntry>,
    },
    /// A message (if any) and the channel history entries it becomes, committed together, so
    /// a crash never leaves one without the other.
    Publication {
        message: Option<NewMessage>,
        history: Vec<NewHistoryEntry>,
    },
    /// Channel webhook messages and the occupancy changes they report, committed together.
    ChannelEvents {
        messages: Vec<NewMessage>,
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

impl WriteOp {
    /// The new messages this write stores, if it goes in.
    fn new_messages(&self) -> &[NewMessage] {
        match self {
            WriteOp::CreateMessage(new) => std::slice::from_ref(new),
            WriteOp::RecordIngest { message, .. } => std::slice::from_ref(message),
            WriteOp::Publication {
                message: Some(new), ..
            } => std::slice::from_ref(new),
            WriteOp::ChannelEvents { messages, .. } => messages,
            _ => &[],
        }
    }

    /// Its jobs for the dispatcher, taken out once the write has committed.
    pub(crate) fn take_fresh(&mut self) -> Vec<DeliveryJob> {
        match self {
            WriteOp::CreateMessage(new)
            | WriteOp::RecordIngest { message: new, .. }
            | WriteOp::Publication {
                message: Some(new), ..
            } => std::mem::take(&mut new.fresh),
            WriteOp::ChannelEvents { messages, .. } => messages
                .iter_mut()
                .flat_map(|new| std::mem::take(&mut new.fresh))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// What the group commit shares with the store.
#[derive(Clone)]
pub(crate) struct Shared {
    pub leases: Leases,
    pub gate: Arc<ClaimGate>,
    pub fresh: Arc<OnceLock<Arc<dyn FreshDeliveries>>>,
    pub commits: Arc<OnceLock<Arc<herald_metrics::StoreMetrics>>>,
    /// Makes the committed batches durable before their callers hear of them.
    pub durable: Arc<dyn Durable>,
    /// Channel positions as committed, so appends need not read them (see `positions`).
    pub positions: Arc<PositionCache>,
    /// Set by the syncer once an fsync has failed, with the reason every later write is
    /// refused for: from then on the writer applies nothing (see [`run_syncer`]).
    pub broken: Arc<OnceLock<String>>,
}

/// Committed batches waiting for their fsync. Bounded, so a slow disk holds the writer back
/// instead of letting answered-to-nobody commits pile up.
const AWAITING_SYNC: usize = 16;

/// A batch the writer is done with: committed (but not yet durable), or failed.
struct Committing {
    batch: Vec<PendingWrite>,
    applied: Result<Applied>,
    started: std::time::Instant,
}

/// Each write's outcome, and the jobs whose delivery could not be leased.
type Applied = (Vec<Result<Committed>>, HashSet<DeliveryKey>);

pub(crate) async fn run(
    pool: SqlitePool,
    shared: Shared,
    mut queue: mpsc::Receiver<PendingWrite>,
    shutdown: CancellationToken,
) {
    let (to_sync, committed) = mpsc::channel(AWAITING_SYNC);
    let syncer = tokio::spawn(run_syncer(shared.clone(), committed));
    let mut batch = Vec::new();
    loop {
        let received = tokio::select! {
            n = queue.recv_many(&mut batch, MAX_BATCH) => n,
            () = shutdown.cancelled() => {
                // Refuse new writes but commit everything already handed to us.
                queue.close();
                while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    let committed = commit_while_busy(
                        &pool, &shared, &mut queue, &mut batch, &to_sync, &shutdown,
                    );
                    if committed.await.is_err() {
                        break;
                    }
                }
                break;
            }
        };
        if received == 0 {
            break;
        }
        if commit_while_busy(&pool, &shared, &mut queue, &mut batch, &to_sync, &shutdown)
            .await
            .is_err()
        {
            // The syncer is gone (it panicked): nobody can be answered any more.
            tracing::error!("the store's syncer stopped; refusing writes");
            return;
        }
    }
    // Every batch committed is answered before the store reports itself closed.
    drop(to_sync);
    if let Err(e) = syncer.await {
        tracing::error!(error = %e, "the store's syncer failed");
    }
}

/// How long the group commit keeps the writer connection once it has it, before the
/// connection's other users (API writes, `reset_history`) get their turn. A batch takes a
/// millisecond or two, so under load a loan serves several.
const LOAN_FOR: std::time::Duration = std::time::Duration::from_millis(10);

/// How many times a loan lets the runtime's other ready tasks run before it takes its next
/// batch. Each turn lets more writers queue; two gave a quarter fewer commits than one for the
/// same history load, and less CPU per write, without a longer create at 16 in flight
/// (PERFORMANCE.md, "One loan of the writer connection for many batches").
const YIELDS_BEFORE_A_BATCH: usize = 2;

/// The syncer has stopped: no batch can be answered any more.
struct SyncerGone;

/// Commits `batch` on the writer connection, then the writes that come meanwhile, batch after
/// batch on the same loan of the connection (one lock, statements prepared once; see `locked`)
/// for up to [`LOAN_FOR`] or until shutdown. Each batch goes to the syncer once committed (not
/// yet durable), or failed; `batch` is left empty.
async fn commit_while_busy(
    pool: &SqlitePool,
    shared: &Shared,
    queue: &mut mpsc::Receiver<PendingWrite>,
    batch: &mut Vec<PendingWrite>,
    to_sync: &mpsc::Sender<Committing>,
    shutdown: &CancellationToken,
) -> std::result::Result<(), SyncerGone> {
    let lent_at = std::time::Instant::now();
    let failed = |batch: &mut Vec<PendingWrite>, e: StoreError| Committing {
        batch: std::mem::take(batch),
        applied: Err(e),
        started: lent_at,
    };
    let mut lent = match pool.acquire().await {
        Ok(conn) => Lent {
            conn,
            positions: &shared.positions,
            clean: false,
        },
        Err(e) => {
            return to_sync
                .send(failed(batch, e.into()))
                .await
                .map_err(|_| SyncerGone);
        }
    };
    let loan = async {
        let loan = locked::Loan::new(lent.conn.lock_handle().await?)?;
        // The loan's transactions skip the fsync at commit: the syncer does it for them (see
        // `durable`).
        loan.conn().execute_batch("PRAGMA synchronous = NORMAL")?;
        Ok::<_, StoreError>(loan)
    };
    let loan = match loan.await {
        Ok(loan) => loan,
        Err(e) => return to_sync.send(failed(batch, e)).await.map_err(|_| SyncerGone),
    };
    loop {
        let done = commit(loan.conn(), shared, std::mem::take(batch));
        let committed = done.applied.is_ok();
        to_sync.send(done).await.map_err(|_| SyncerGone)?;
        if !committed {
            // The connection may be inside a transaction: `lent` closes it.
            return Ok(());
        }
        let left = LOAN_FOR.saturating_sub(lent_at.elapsed());
        if left.is_zero() {
            break;
        }
        // The writes already waiting, or the next to come while the loan lasts: under a
        // steady load the queue is often empty for a moment between batches (their callers
        // are waiting for the fsync), and the next write is better served on this loan.
        let more = tokio::select! {
            // Writes first: once shut down, those still queued are committed on this loan.
            biased;
            received = tokio::time::timeout(left, queue.recv_many(batch, MAX_BATCH)) => {
                received.unwrap_or(0)
            }
            () = shutdown.cancelled() => 0,
        };
        if more == 0 {
            break;
        }
        // Let the tasks that are ready to write queue their writes too before this batch
        // commits: one commit for many is what keeps a commit's cost per write low.
        for _ in 0..YIELDS_BEFORE_A_BATCH {
            tokio::task::yield_now().await;
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
    }
    // Every other write on the writer connection stays durable at its own commit.
    let restored = loan.conn().execute_batch("PRAGMA synchronous = FULL");
    // Its statements are finalized and the lock given back before the connection goes back.
    drop(loan);
    lent.clean = restored.is_ok();
    // (Writes that queued after the last look wait for the next loan: `batch` is empty.)
    Ok(())
}

/// Applies and commits `batch` (without waiting for the disk) on the lent writer connection.
fn commit(conn: &rusqlite::Connection, shared: &Shared, batch: Vec<PendingWrite>) -> Committing {
    let started = std::time::Instant::now();
    if let Some(why) = shared.broken.get() {
        // Nothing is applied once the disk has lost a write: a write committed now would be
        // visible (claimed, delivered, given offsets) while its caller hears it failed.
        return Committing {
            batch,
            applied: Err(StoreError::Batch(why.clone())),
            started,
        };
    }
    let applied = apply_locked(conn, shared, &batch);
    if let Ok((outcomes, missed)) = &applied {
        // Deliveries that went in unleased are due now: claims must find them. (They are
        // visible to readers from the commit on, durable or not yet.)
        let unleased: Vec<(&AppId, &EndpointId)> = batch
            .iter()
            .zip(outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .flat_map(|(write, _)| write.op.new_messages())
            .flat_map(|new| {
                without_job(new)
                    .chain(new.fresh.iter().map(|job| &job.endpoint.id).filter(|ep| {
                        !missed.is_empty()
                            && missed.contains(&(new.message.id.clone(), (*ep).clone()))
                    }))
                    .map(|ep| (&new.message.app_id, ep))
            })
            .collect();
        if !unleased.is_empty() {
            shared.gate.add_first_attempts(unleased);
        }
    }
    Committing {
        batch,
        applied,
        started,
    }
}

/// Makes the committed batches durable, then answers their callers, in commit order: one
/// fsync for every batch committed while the one before ran. Once an fsync has failed, no
/// later one can be trusted to cover what the failed one lost (the kernel may have dropped
/// those pages and reports the error once), so every batch after it fails too.
async fn run_syncer(shared: Shared, mut committed: mpsc::Receiver<Committing>) {
    let mut group = Vec::with_capacity(AWAITING_SYNC);
    while committed.recv_many(&mut group, AWAITING_SYNC).await > 0 {
        if shared.broken.get().is_none() && group.iter().any(|done| done.applied.is_ok()) {
            let durable = shared.durable.clone();
            let synced = match tokio::task::spawn_blocking(move || durable.sync()).await {
                Ok(synced) => synced.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = synced {
                tracing::error!(error = %e, "could not fsync the store's WAL; refusing writes until restarted");
                let _ = shared.broken.set(format!(
                    "the store could not make its writes durable (fsync of the WAL failed: {e}); restart Herald"
                ));
            }
        }
        let broken = shared.broken.get().cloned();
        for done in group.drain(..) {
            finish(&shared, done, broken.as_deref());
        }
    }
}

/// Hands the batch's new deliveries to the dispatcher (or gives their room back) and answers
/// its callers: the outcome of each write once it is durable, or why the batch failed.
fn finish(shared: &Shared, done: Committing, sync_failed: Option<&str>) {
    let Committing {
        mut batch,
        applied,
        started,
    } = done;
    let applied = match (applied, sync_failed) {
        (Ok((outcomes, _)), Some(why)) => {
            // Committed but not known durable: its leases go, so the deliveries wait for a
            // claim like any unleased one, and its callers hear it failed.
            revoke_fresh(shared, &batch, &outcomes);
            Err(StoreError::Batch(why.to_owned()))
        }
        (applied, _) => applied,
    };
    if let Some(metrics) = shared.commits.get() {
        metrics.commit(batch.len(), started.elapsed());
    }
    // Jobs of the new deliveries: handed over if leased in a commit that happened, their room
    // given back otherwise.
    let mut handed = Vec::new();
    let mut given_back = Vec::new();
    for (i, write) in batch.iter_mut().enumerate() {
        let fresh = write.op.take_fresh();
        for job in fresh {
            let leased = match &applied {
                Ok((outcomes, missed)) => {
                    outcomes[i].is_ok()
                        && (missed.is_empty()
                            || !missed.contains(&(job.msg_id.clone(), job.endpoint.id.clone())))
                }
                Err(_) => false,
            };
            if leased {
                handed.push(job);
            } else {
                given_back.push((job.app_id, job.endpoint.id));
            }
        }
    }
    if let Some(sink) = shared.fresh.get() {
        if !given_back.is_empty() {
            sink.give_back(given_back);
        }
        if !handed.is_empty() {
            sink.hand_over(handed, started);
        }
    }
    match applied {
        Ok((outcomes, _)) => {
            for (write, outcome) in batch.drain(..).zip(outcomes) {
                // The caller may have given up waiting; its write is committed regardless.
                let _ = write.done.send(outcome);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, writes = batch.len(), "batched commit failed");
            let message = match e {
                StoreError::Batch(message) => message,
                e => e.to_string(),
            };
            for write in batch.drain(..) {
                let _ = write.done.send(Err(StoreError::Batch(message.clone())));
            }
        }
    }
}

/// The targets of `new` no job was made for (the dispatcher had no room). Jobs are made for a
/// subsequence of the targets, in their order, so one walk pairs them.
fn without_job(new: &NewMessage) -> impl Iterator<Item = &EndpointId> {
    let mut jobs = new.fresh.iter().peekable();
    new.endpoint_ids.iter().filter(move |ep| {
        if jobs.peek().is_some_and(|job| job.endpoint.id == **ep) {
            jobs.next();
            false
        } else {
            true
        }
    })
}

/// The jobs of the writes that went in.
fn fresh_of_applied<'a>(
    batch: &'a [PendingWrite],
    outcomes: &'a [Result<Committed>],
) -> impl Iterator<Item = &'a DeliveryJob> {
    batch
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| outcome.is_ok())
        .flat_map(|(write, _)| write.op.new_messages())
        .flat_map(|new| &new.fresh)
}

/// Takes back the leases `lease_fresh` gave the new deliveries of the writes that went in, for
/// a batch whose commit failed or cannot be vouched for.
fn revoke_fresh(shared: &Shared, batch: &[PendingWrite], outcomes: &[Result<Committed>]) {
    let leased: Vec<DeliveryKey> = fresh_of_applied(batch, outcomes)
        .map(|job| (job.msg_id.clone(), job.endpoint.id.clone()))
        .collect();
    shared.leases.revoke(&leased);
}

const RETRY_FROM_SCRATCH: &str = "ROLLBACK; BEGIN";

/// The writer connection, lent to the group commit. If a batch does not end cleanly (an error,
/// or its future dropped while it waited for the connection's lock), the connection may be
/// inside a transaction or without its fsyncs, so it is closed rather than returned: SQLite
/// rolls back what was open, and the pool opens a new one from its options
/// (`synchronous = FULL`).
///
/// Such a batch may also have committed without taking its positions into the cache, so the
/// cache starts again too.
struct Lent<'a> {
    conn: sqlx::pool::PoolConnection<sqlx::Sqlite>,
    positions: &'a PositionCache,
    clean: bool,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
            self.positions.forget_all();
        }
    }
}

/// Runs a statement without parameters or rows, prepared once per loan.
fn execute_kept(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Applies the batch in one transaction and commits it, leasing (just before the commit) the
/// new deliveries that have jobs to hand over. Returns each write's outcome and the jobs whose
/// delivery could not be leased (its rowid did not come back: never expected; it stays
/// claimable). The commit is not yet durable: the caller hands the batch to the syncer.
///
/// The statements run on this thread, on the writer's SQLite handle (see `locked`); nothing
/// in between awaits, so a batch that has begun also ends, committed or rolled back. Only a
/// batch that succeeds leaves the connection outside a transaction.
fn apply_locked(
    conn: &rusqlite::Connection,
    shared: &Shared,
    batch: &[PendingWrite],
) -> Result<Applied> {
    execute_kept(conn, "BEGIN")?;
    let mut rowids = HashMap::new();
    let mut positions = grouped::BatchPositions {
        cache: &shared.positions,
        written: Vec::new(),
    };
    let outcomes = match grouped::apply(conn, batch, &mut rowids, Some(&mut positions)) {
        Ok(outcomes) => outcomes,
        Err(e) => {
            // Something other than an expected conflict (say, a foreign key: the app was
            // deleted meanwhile). Redo the batch one write at a time so only the writes that
            // fail report an error. That reads every position from the database and leaves
            // positions the cache cannot follow, so the cache starts again.
            tracing::warn!(error = %e, writes = batch.len(), "grouped write failed; retrying one by one");
            shared.positions.forget_all();
            positions.written.clear();
            rowids.clear();
            conn.execute_batch(RETRY_FROM_SCRATCH)?;
            one_by_one(conn, batch, &mut rowids)?
        }
    };
    let missed = lease_fresh(shared, batch, &outcomes, &rowids);
    if let Err(e) = execute_kept(conn, "COMMIT") {
        // (The connection is closed and the positions cache emptied as the lent connection
        // drops.)
        revoke_fresh(shared, batch, &outcomes);
        return Err(e.into());
    }
    // Still holding the connection: no other write can come between the commit and this.
    shared.positions.remember(positions.written);
    Ok((outcomes, missed))
}

/// Each write alone, in order, in the open transaction, each in a savepoint: a write's offsets
/// are assigned from the positions the writes before it left in this transaction, so a failed
/// write consumes none.
fn one_by_one(
    conn: &rusqlite::Connection,
    batch: &[PendingWrite],
    rowids: &mut HashMap<DeliveryKey, i64>,
) -> Result<Vec<Result<Committed>>> {
    let mut outcomes = Vec::with_capacity(batch.len());
    for write in batch {
        conn.execute_batch("SAVEPOINT one_write")?;
        let mut write_rowids = HashMap::new();
        match grouped::apply(conn, std::slice::from_ref(write), &mut write_rowids, None) {
            Ok(mut outcome) => {
                conn.execute_batch("RELEASE one_write")?;
                rowids.extend(write_rowids);
                outcomes.push(outcome.pop().unwrap_or_else(|| Ok(Vec::new())));
            }
            Err(e) => {
                conn.execute_batch("ROLLBACK TO one_write; RELEASE one_write")?;
                outcomes.push(Err(e));
            }
        }
    }
    Ok(outcomes)
}

/// Leases the deliveries of the writes that went in and have a job to hand over, inside the
/// transaction that commits them: no claim can see such a delivery before it is leased.
/// Returns the jobs it could not lease.
fn lease_fresh(
    shared: &Shared,
    batch: &[PendingWrite],
    outcomes: &[Result<Committed>],
    rowids: &HashMap<DeliveryKey, i64>,
) -> HashSet<DeliveryKey> {
    let mut missed = HashSet::new();
    let Some(sink) = shared.fresh.get() else {
        return missed;
    };
    let until = chrono::Utc::now()
        + chrono::Duration::from_std(sink.lease()).unwrap_or(chrono::Duration::MAX);
    let leases: Vec<(DeliveryKey, i64, crate::LeaseToken)> = fresh_of_applied(batch, outcomes)
        .filter_map(|job| {
            let key = (job.msg_id.clone(), job.endpoint.id.clone());
            match rowids.get(&key) {
                Some(rowid) => Some((key, *rowid, job.lease)),
                None => {
                    missed.insert(key);
                    None
                }
            }
        })
        .collect();
    shared.leases.lease_new(leases, until);
    missed
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

/// Applies an attempt's change to its endpoint's failure streak or state, after the record
/// has set `msg_id`'s delivery to the endpoint.
pub(crate) fn endpoint_change(
    conn: &rusqlite::Connection,
    msg_id: &MessageId,
    endpoint_id: &EndpointId,
    change: EndpointChange,
    now: i64,
) -> Result<()> {
    match change {
        EndpointChange::Unchanged => {}
        EndpointChange::StreakEnded => {
            conn.execute(
                "UPDATE endpoints SET failing_since = NULL WHERE id = ?1 AND failing_since IS NOT NULL",
                [endpoint_id.as_str()],
            )?;
        }
        EndpointChange::StreakStarted { at } => {
            conn.execute(
                "UPDATE endpoints SET failing_since = ?2 WHERE id = ?1 AND failing_since IS NULL",
                rusqlite::params![endpoint_id.as_str(), millis(at)],
            )?;
        }
        // `updated_at` must move, even within the millisecond of the last update: an API
        // update prepared before this one compares it (`update_endpoint`).
        EndpointChange::Disable {
            streak_since,
            retry_at,
        } => {
            let disabled = conn.execute(
                "UPDATE endpoints SET disabled = 1, updated_at = MAX(updated_at + 1, ?2)
                 WHERE id = ?1 AND (?3 IS NULL OR failing_since <= ?3)",
                rusqlite::params![endpoint_id.as_str(), now, streak_since.map(millis)],
            )?;
            // Declined (the streak ended meanwhile): the delivery goes on with its schedule.
            if disabled == 0
                && let Some(at) = retry_at
            {
                conn.execute(
                    "UPDATE deliveries SET status = ?3, next_attempt_at = ?4
                     WHERE msg_id = ?1 AND endpoint_id = ?2",
                    rusqlite::params![
                        msg_id.as_str(),
                        endpoint_id.as_str(),
                        DeliveryStatus::Pending as i64,
                        millis(at)
                    ],
                )?;
            }
        }
    }
    Ok(())
}
