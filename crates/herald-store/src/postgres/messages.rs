//! [`MessageStore`] on PostgreSQL: messages and publications, and the shared delivery queue
//! (claims with leases kept in the rows, fenced attempt records).
//!
//! Every write is one transaction. A message goes in with its first deliveries in one
//! statement: the Svix API's `create_message` joins the group commit of `batch` (the creates
//! waiting go in as one statement, `batch::CREATE_MESSAGES`, or one by one with
//! [`CREATE_MESSAGE`] if that fails); publications, ingest and channel webhooks run
//! [`CREATE_MESSAGE`] in their transaction through [`insert_message`]; a publication adds its
//! history entries in the same transaction through `history::append_entries`. A claim is one
//! statement per pass (see `claim_statement`; a pass walks the queue in due order, or endpoint
//! by endpoint when that walk is crowded out and the first says a walk by endpoint could lease
//! something, so one endpoint's backlog does not make every claim read it all); an attempt
//! record writes the attempt row always, the delivery's next state and the endpoint change
//! only under the claim's token: when the endpoint does not change, grouped with the records
//! waiting (`batch::RECORD_ATTEMPTS`, or [`RECORD_ATTEMPT`] alone), else one transaction
//! ([`record_one`]).
//!
//! Limits hold cluster-wide. A claim's transaction (READ COMMITTED) begins with
//! [`BEGIN_CLAIM`]: it takes the claim's advisory lock (`pg_advisory_xact_lock`, released at
//! its commit) and keeps the planner on index reads and cached plans. So claims on all nodes
//! take turns, and each pass's statement, with a snapshot of its own taken under the lock,
//! sees every lease the earlier claims committed. Each pass counts the live leases
//! (`delivery_leases` rows with `leased_until > now`) per endpoint and per app, less the
//! caller's records being saved (`saving`: attempts that are over), and holds an
//! endpoint or app at the larger of that count and the request's `in_flight` /
//! `app_in_flight` (the caller's own deliveries are live leases too, so the two are not
//! added; the request's can be the larger, for a caller whose leases ran out mid-attempt).
//! So `per_endpoint_limit` and `per_app_limit` bound what all nodes hold together.
//!
//! Wake-ups: every write that makes a delivery due now notifies [`DELIVERIES_CHANNEL`]
//! (`pg_notify`). New messages with targets (messages, publications, ingest and channel
//! webhooks) notify after their commit, with the payload that names the first-attempt lane
//! ([`DueLanes`]), coalesced per node (see `wake`: a notifying
//! transaction holds a database-wide lock through its commit, so notifying in each message's
//! transaction made their commits take turns); `enqueue_manual`, and `enqueue_failed` when it
//! requeued any, notify in their own transaction (sent by PostgreSQL only on commit), with an
//! empty payload (either lane). Retries falling due later notify nothing: a dispatcher's retry
//! lane sleeps until `next_due_at` for those.
//!
//! Tables (migrations/postgres/0001_init.sql):
//! - `messages`: id TEXT PK, app_id TEXT (apps, cascade), event_id TEXT (UNIQUE with app_id:
//!   a unique violation is the eventId `Conflict`), event_type TEXT, channels TEXT (JSON array
//!   or NULL; filter with `channels::jsonb ? $1`), tags TEXT (JSON array or NULL), payload
//!   BYTEA (exact bytes), created_at BIGINT millis. Index messages_app (app_id, id).
//!   `rows::message` reads them.
//! - `deliveries`: (msg_id, endpoint_id) PK, app_id TEXT, status INTEGER (0 success,
//!   1 pending, 2 fail, 3 sending), attempts INTEGER (0: first attempt still due),
//!   trigger_type INTEGER (0 scheduled, 1 manual), next_attempt_at BIGINT NULL, updated_at
//!   BIGINT, lease_token BIGINT NULL, leased_until BIGINT NULL (millis).
//!   A claim: `SELECT ... FOR UPDATE SKIP LOCKED` of due rows (`status IN (1, 3) AND
//!   next_attempt_at <= now AND (lease_token IS NULL OR leased_until <= now)`, lane:
//!   `(attempts = 0 AND trigger_type = 0) = first_attempts`), then set
//!   `lease_token = nextval('delivery_lease_tokens'), leased_until = lease_until`, and note
//!   the lease in `delivery_leases` (replacing a lapsed lease's row). No index names the lease
//!   columns, so a lease is a HOT update where the page has room (fillfactor 80, migration
//!   0014): no index entry, where it was seven.
//!   Indexes: deliveries_due_first / deliveries_due_retry (next_attempt_at, partial per lane,
//!   only rows with a due time: migration 0012),
//!   deliveries_due_first_by_endpoint / deliveries_due_retry_by_endpoint (endpoint_id,
//!   next_attempt_at, the same predicates: the walk by endpoint, migration 0009),
//!   A record applies only `WHERE lease_token = $token`, clears lease_token and leased_until
//!   and deletes its lease's `delivery_leases` row (same token); enqueue_manual clears them
//!   and deletes the row (take back), as does a claim refusing a disabled endpoint's delivery,
//!   and `release_unattempted` (a stopping node's claims never attempted, fenced on the token);
//!   `requeue_leased` is for single-node stores only (a shared store's leases expire).
//! - `delivery_leases` (migration 0014): (msg_id, endpoint_id) PK and foreign key to the
//!   delivery (cascade), app_id, lease_token, leased_until. What is in flight cluster-wide:
//!   each claim pass counts the rows with `leased_until > now` through delivery_leases_live
//!   (leased_until) INCLUDE (app_id, endpoint_id). A lapsed lease's row stays until its
//!   delivery is leased again, finished or deleted, and is not counted.
//! - `attempts` (written with each record): see attempts.rs.
//! - `endpoints.failing_since`, `disabled`, `updated_at` (the record's endpoint change; a
//!   disable moves updated_at: `GREATEST(updated_at + 1, $now)`).
//! - `channel_history`, `channel_positions` (publications): see history.rs.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use herald_core::{
    AppId, EndpointId, MessageId,
    history::{NewHistoryEntry, Position},
    id,
    model::{DeliveryStatus, Message, TriggerType},
};
use sqlx::{AssertSqlSafe, PgConnection, Postgres, QueryBuilder, Row, postgres::PgRow};

use super::{
    PostgresStore, paginate,
    rows::{self, millis},
};
use crate::{
    AttemptRecord, ClaimRequest, DeliveryJob, EndpointChange, LeaseToken, MessageQuery,
    MessageStore, NextStep, Page, Recorded, Result, StoreError, sql,
};

/// A repeated `(app_id, event_id)`: the same text the SQLite store reports.
pub(super) const MESSAGE_CONFLICT: &str = "a message with this eventId already exists";

/// The channel every transaction that makes a delivery due now notifies (`pg_notify`), so the
/// dispatchers of idle nodes wake. PostgreSQL delivers a notification only when its
/// transaction commits, and the same channel and payload notified several times in one
/// transaction once. The payload says which claim lanes may have work ([`DueLanes`]).
pub const DELIVERIES_CHANNEL: &str = "herald_deliveries";

/// The payload of a notification on [`DELIVERIES_CHANNEL`] sent for new messages' deliveries.
pub(super) const FIRST_ATTEMPTS_PAYLOAD: &str = "first";

/// Which of a dispatcher's claim lanes a notification on [`DELIVERIES_CHANNEL`] concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DueLanes {
    /// New messages' first attempts only.
    FirstAttempts,
    /// Either lane: manual attempts (a resend, a recovery) are in the retry lane. Also what
    /// an empty payload means, as nodes before the payload sent for everything.
    Any,
}

impl DueLanes {
    pub fn of_payload(payload: &str) -> Self {
        if payload == FIRST_ATTEMPTS_PAYLOAD {
            Self::FirstAttempts
        } else {
            Self::Any
        }
    }
}

/// Tells idle nodes, on commit of the caller's transaction, that deliveries are due.
async fn notify_due(conn: &mut PgConnection) -> Result<()> {
    // Empty payload: `DueLanes::Any`.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(DELIVERIES_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A message and its first deliveries (one per endpoint in `$10`, due at the message's
/// creation, or now by the database's clock if earlier: `first_attempt_due`) in one statement: the deliveries are inserted only if the message was (a
/// data-modifying `WITH` runs whether or not it is read), and the result is the number of
/// messages inserted, 0 for a repeated `(app_id, event_id)`.
const CREATE_MESSAGE: &str = concat!(
    "WITH inserted AS (
         INSERT INTO messages (id, app_id, event_id, event_type, channels, tags, payload,
                               created_at, payload_expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT DO NOTHING RETURNING id
     ), queued AS (
         INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                 next_attempt_at, updated_at)
         SELECT inserted.id, e, $2, $11, 0, $12, ",
    first_attempt_due!("$8"),
    ", $8
         FROM inserted, UNNEST($10::text[]) AS e
     )
     SELECT count(*) FROM inserted"
);

/// An attempt record whose endpoint does not change, in one statement: the attempt row always
/// (it happened), and the delivery's next state only while it is still leased under the
/// claim's token `$15` (the fence: a later claim or a manual enqueue changed or cleared it),
/// which releases the lease. The result is the number of deliveries moved: 0 is a stale lease.
const RECORD_ATTEMPT: &str = "WITH logged AS (
         INSERT INTO attempts (id, msg_id, endpoint_id, app_id, url, status,
                               response_status_code, response, response_duration_ms,
                               trigger_type, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
     ), moved AS (
         UPDATE deliveries
         SET status = $12, next_attempt_at = $13, attempts = attempts + $14, updated_at = $11,
             lease_token = NULL, leased_until = NULL
         WHERE msg_id = $2 AND endpoint_id = $3 AND lease_token = $15
         RETURNING 1
     ), released AS (
         DELETE FROM delivery_leases
         WHERE msg_id = $2 AND endpoint_id = $3 AND lease_token = $15
     )
     SELECT count(*) FROM moved";

/// Inserts `message` and its first deliveries (one per endpoint, due at the message's creation)
/// with [`CREATE_MESSAGE`] on `executor`: alone (committed on its own) or in the caller's
/// transaction. A message whose id or `(app_id, event_id)` exists already is the eventId
/// [`StoreError::Conflict`], and then nothing is inserted.
pub(super) async fn insert_with<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    message: &Message,
    endpoint_ids: &[EndpointId],
) -> Result<()> {
    let endpoints: Vec<&str> = endpoint_ids.iter().map(EndpointId::as_str).collect();
    let inserted: i64 = sql::message_columns!(sqlx::query_scalar(CREATE_MESSAGE), message)
        .bind(&endpoints)
        .bind(DeliveryStatus::Pending as i32)
        .bind(TriggerType::Scheduled as i32)
        .fetch_one(executor)
        .await?;
    if inserted == 0 {
        return Err(StoreError::Conflict(MESSAGE_CONFLICT.to_owned()));
    }
    Ok(())
}

/// [`insert_with`] in the caller's transaction; returns whether it queued any delivery, so the
/// caller wakes the other nodes once it has committed (`DueNotifier::committed`).
pub(super) async fn insert_message(
    conn: &mut sqlx::PgConnection,
    message: &Message,
    endpoint_ids: &[EndpointId],
) -> Result<bool> {
    insert_with(&mut *conn, message, endpoint_ids).await?;
    Ok(!endpoint_ids.is_empty())
}

#[async_trait::async_trait]
impl MessageStore for PostgresStore {
    async fn create_message(&self, message: Message, endpoint_ids: Vec<EndpointId>) -> Result<()> {
        let app_id = message.app_id.clone();
        // Committed with the other creates waiting (see `batch`).
        match self.batches.create(message, endpoint_ids).await {
            Ok(()) => Ok(()),
            Err(e) => Err(crate::unless_app_gone(self, &app_id, e).await),
        }
    }

    async fn store_publication(
        &self,
        message: Option<(Message, Vec<EndpointId>)>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<Vec<Position>> {
        let started = std::time::Instant::now();
        let mut tx = self.pool.begin().await?;
        let mut queued = false;
        if let Some((message, endpoint_ids)) = &message {
            // A conflict returns here: the transaction rolls back as it is dropped, before any
            // history entry took an offset.
            queued = insert_message(&mut tx, message, endpoint_ids).await?;
        }
        let positions =
            super::history::append_entries(&mut tx, &history, self.announces_history()).await?;
        tx.commit().await?;
        self.committed(started);
        if queued {
            self.due.committed();
        }
        Ok(positions)
    }

    async fn get_message(&self, app_id: &AppId, id_or_event_id: &str) -> Result<Option<Message>> {
        sqlx::query(sql::GET_MESSAGE)
            .bind(app_id.as_str())
            .bind(id_or_event_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::message(&row))
            .transpose()
    }

    async fn get_messages(&self, app_id: &AppId, ids: &[MessageId]) -> Result<Vec<Message>> {
        let ids: Vec<&str> = ids.iter().map(MessageId::as_str).collect();
        sqlx::query("SELECT * FROM messages WHERE app_id = $1 AND id = ANY($2)")
            .bind(app_id.as_str())
            .bind(ids)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::message)
            .collect()
    }

    async fn list_messages(
        &self,
        app_id: &AppId,
        page: &Page,
        query: &MessageQuery,
    ) -> Result<Vec<Message>> {
        let mut q = QueryBuilder::new(sql::LIST_MESSAGES);
        q.push_bind(app_id.to_string());
        push_message_filters(&mut q, "messages", "id", query);
        paginate(&mut q, "id", page);
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::message)
            .collect()
    }

    async fn enqueue_manual(
        &self,
        app_id: &AppId,
        msg_id: &MessageId,
        endpoint_id: &EndpointId,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        // Clearing the lease takes the delivery back from any claim holding it: that claim's
        // record, fenced on its token, is then stale (the row lock orders the two). The
        // message's row is share-locked before the delivery's, in the order an expunge locks
        // them: an expunge under way is waited for, and its payload then seen.
        let mut tx = self.pool.begin().await?;
        let queued = sqlx::query(concat!(
            sql::resend_insert!("FOR SHARE"),
            sql::resend_set!("LEAST"),
            ", lease_token = NULL, leased_until = NULL RETURNING msg_id"
        ))
        .bind(msg_id.as_str())
        .bind(endpoint_id.as_str())
        .bind(app_id.as_str())
        .bind(DeliveryStatus::Pending as i32)
        .bind(TriggerType::Manual as i32)
        .bind(millis(now))
        .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
        if !queued {
            return Ok(false);
        }
        sqlx::query("DELETE FROM delivery_leases WHERE msg_id = $1 AND endpoint_id = $2")
            .bind(msg_id.as_str())
            .bind(endpoint_id.as_str())
            .execute(&mut *tx)
            .await?;
        notify_due(&mut tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn enqueue_failed(
        &self,
        endpoint_id: &EndpointId,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        // Message ids sort by creation time, so a time window is an id range. In batches, each
        // its own transaction: a recovery of a long outage can be millions of rows, which one
        // transaction would hold row locks on (and the claims wait for) until it ended. Paged
        // by message id, so a row this recovery requeued that has failed again meanwhile (any
        // node may attempt it between two batches) is not requeued twice.
        //
        // The messages are locked (shared) before their deliveries are changed, in the order
        // an expunge takes them: a recovery meeting an expunge under way waits for it and then
        // sees the payload gone, rather than requeueing a delivery the expunge left failed (it
        // would send a signed `{"expired":true}`), as a resend does (`resend_insert`).
        let mut requeued_total = 0_u64;
        let mut after = id::lower_bound(id::MESSAGE, since);
        loop {
            let mut tx = self.pool.begin().await?;
            let (last, scanned, requeued): (Option<String>, i64, i64) = sqlx::query_as(
                "WITH candidates AS (
                     SELECT msg_id FROM deliveries
                     WHERE endpoint_id = $4 AND status <> 0 AND status = $5
                       AND msg_id > $6 AND msg_id < $7
                       AND NOT EXISTS (SELECT 1 FROM messages m
                                       WHERE m.id = deliveries.msg_id
                                         AND (m.payload = $9 OR m.payload_expires_at <= $3))
                     ORDER BY msg_id
                     LIMIT $8
                 ), kept AS (
                     SELECT m.id FROM messages m
                     WHERE m.id IN (SELECT msg_id FROM candidates)
                       AND m.payload <> $9
                       AND (m.payload_expires_at IS NULL OR m.payload_expires_at > $3)
                     ORDER BY m.id
                     FOR SHARE
                 ), requeued AS (
                     UPDATE deliveries SET status = $1, trigger_type = $2, next_attempt_at = $3,
                                           updated_at = $3, lease_token = NULL, leased_until = NULL
                     WHERE endpoint_id = $4 AND status = $5 AND msg_id IN (SELECT id FROM kept)
                     RETURNING msg_id
                 )
                 SELECT (SELECT MAX(msg_id) FROM candidates),
                        (SELECT COUNT(*) FROM candidates),
                        (SELECT COUNT(*) FROM requeued)",
            )
            .bind(DeliveryStatus::Pending as i32)
            .bind(TriggerType::Manual as i32)
            .bind(millis(now))
            .bind(endpoint_id.as_str())
            .bind(DeliveryStatus::Fail as i32)
            .bind(&after)
            .bind(id::lower_bound(id::MESSAGE, until))
            .bind(i64::from(crate::RETENTION_BATCH))
            .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
            .fetch_one(&mut *tx)
            .await?;
            if requeued > 0 {
                notify_due(&mut tx).await?;
            }
            tx.commit().await?;
            requeued_total += u64::try_from(requeued).unwrap_or(0);
            let full = scanned >= i64::from(crate::RETENTION_BATCH);
            match last {
                Some(last) if full => after = last,
                _ => return Ok(requeued_total),
            }
        }
    }

    /// Cluster-wide: under the claim lock ([`BEGIN_CLAIM`]), an endpoint or app holds the
    /// larger of its live leases in the database (every node's) and the request's own count,
    /// so the limits bound all nodes together, not each node alone.
    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DeliveryJob>> {
        let limit = request.limit as usize;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut walk = Walk::InTimeOrder;
        // What this claim takes, on top of what the caller already holds.
        let mut taken_endpoints: HashMap<EndpointId, u32> = HashMap::new();
        let mut taken_apps: HashMap<AppId, u32> = HashMap::new();
        let mut jobs: Vec<DeliveryJob> = Vec::new();
        let saving = Held::new(&request.saving, &HashMap::new());
        let mut tx = self.pool.begin_with(BEGIN_CLAIM).await?;
        for _ in 0..CLAIM_PASSES {
            let endpoints = Held::new(&request.in_flight, &taken_endpoints);
            let apps = Held::new(&request.app_in_flight, &taken_apps);
            let wanted = limit - jobs.len();
            let fetch = candidates_to_fetch(wanted);
            let statement = claim_statement(request.first_attempts, walk);
            let rows = bind_pass(
                &statement, walk, request, &endpoints, &apps, &saving, wanted,
            )
            .fetch_all(&mut *tx)
            .await?;
            let (mut candidates, mut enabled, mut claimed) = (0_i64, 0_i64, 0_i64);
            let mut walk_ended_early = false;
            let mut room_elsewhere = false;
            for row in &rows {
                candidates = row.try_get("n_candidates")?;
                enabled = row.try_get("n_enabled")?;
                walk_ended_early =
                    row.try_get::<i64, _>("n_walked")? >= row.try_get::<i64, _>("walk_cap")?;
                room_elsewhere = row.try_get("room_elsewhere")?;
                // The summary row alone (nothing leased) has no delivery columns.
                if row.try_get::<Option<String>, _>("msg_id")?.is_none() {
                    continue;
                }
                let job = match job(row, &self.keys) {
                    Ok(job) => job,
                    // One endpoint whose secret does not open (a key this node lacks, a
                    // tampered value) must not stop every delivery behind it: it stays leased
                    // (tried again when the lease runs out, on any node) and the claim goes on.
                    Err(StoreError::Secret(e)) => {
                        tracing::error!(error = %e, "a delivery's endpoint secret cannot be decrypted; skipped until its lease runs out");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                *taken_endpoints.entry(job.endpoint.id.clone()).or_insert(0) += 1;
                *taken_apps.entry(job.app_id.clone()).or_insert(0) += 1;
                claimed += 1;
                jobs.push(job);
            }
            if jobs.len() >= limit {
                break;
            }
            let short = candidates < i64::try_from(fetch).unwrap_or(i64::MAX);
            // The walk in time order stopped at its length with too few candidates: what it
            // read belonged to endpoints or apps at their limit (one busy endpoint's backlog)
            // or was in flight. Whatever else is due is further down: look endpoint by
            // endpoint, which costs a probe per endpoint instead of a row per backlogged
            // delivery (reading it all cost 34 ms a claim at 200,000 queued: PERFORMANCE.md).
            // Only if the walk's statement found an endpoint that such a walk could still lease
            // from: when one endpoint's backlog filled the walk and the endpoint is now full,
            // that walk would find nothing, and was most of a busy claim's second statement.
            if walk_ended_early && short {
                if !room_elsewhere {
                    break;
                }
                walk = Walk::ByEndpoint;
                continue;
            }
            // Look again only if candidates were locked and not leased (in a walk by endpoint,
            // rows of apps that filled up), which others' rows, further down the queue, could
            // have been. The next pass leaves the full ones out in the query.
            let crowded_out = enabled > claimed;
            if !crowded_out || short {
                break;
            }
        }
        tx.commit().await?;
        Ok(jobs)
    }

    async fn next_due_at(&self, first_attempts: bool) -> Result<Option<DateTime<Utc>>> {
        let statement = if first_attempts {
            NEXT_DUE_FIRST_ATTEMPT
        } else {
            NEXT_DUE_RETRY
        };
        let row = sqlx::query(statement)
            .bind(millis(self.clock.now()))
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => rows::opt_time(&row, "due"),
            None => Ok(None),
        }
    }

    async fn due_deliveries(&self, now: DateTime<Utc>) -> Result<crate::DueDeliveries> {
        let row = sqlx::query(DUE_DELIVERIES)
            .bind(millis(now))
            .fetch_one(&self.pool)
            .await?;
        Ok(crate::DueDeliveries {
            count: u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0),
            oldest_due_at: rows::opt_time(&row, "oldest")?,
        })
    }

    async fn record_attempt(&self, record: AttemptRecord) -> Result<Recorded> {
        let applied = if record.endpoint_change == EndpointChange::Unchanged {
            // The usual record: committed with the other records waiting (see `batch`).
            self.batches.record(record).await?
        } else {
            let started = std::time::Instant::now();
            let applied = record_one(&self.pool, &record).await;
            // The endpoint's row changed (or may have, if the commit's outcome is unknown).
            self.cache.invalidate();
            let applied = applied?;
            self.committed(started);
            applied
        };
        Ok(if applied {
            Recorded::Applied
        } else {
            Recorded::Stale
        })
    }

    async fn reserve_turn(
        &self,
        endpoint: &EndpointId,
        rate: u16,
        now: DateTime<Utc>,
        latest: DateTime<Utc>,
    ) -> Result<crate::Turn> {
        super::paces::reserve_turn(&self.pool, endpoint, rate, now, latest).await
    }

    async fn release_unattempted(&self, jobs: &[DeliveryJob]) -> Result<u64> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let msg_ids: Vec<&str> = jobs.iter().map(|job| job.msg_id.as_str()).collect();
        let endpoint_ids: Vec<&str> = jobs.iter().map(|job| job.endpoint.id.as_str()).collect();
        // A token beyond BIGINT was never handed out by the sequence: NULL matches no row.
        let tokens: Vec<Option<i64>> = jobs
            .iter()
            .map(|job| i64::try_from(job.lease.0).ok())
            .collect();
        // Fenced on the token, as a record is: a delivery taken back or claimed again since
        // keeps its newer lease. The delivery's row is locked before its lease's row, as a
        // claim locks them, so the two cannot deadlock. Other nodes' dispatchers are woken to
        // claim what was let go.
        let mut tx = self.pool.begin().await?;
        let released: i64 = sqlx::query_scalar(
            "WITH released AS (
                 UPDATE deliveries AS d SET lease_token = NULL, leased_until = NULL
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS r(msg_id, endpoint_id, token)
                 WHERE d.msg_id = r.msg_id AND d.endpoint_id = r.endpoint_id
                   AND d.lease_token = r.token
                 RETURNING d.msg_id, d.endpoint_id, r.token
             ), gone AS (
                 DELETE FROM delivery_leases l USING released r
                 WHERE l.msg_id = r.msg_id AND l.endpoint_id = r.endpoint_id
                   AND l.lease_token = r.token
             )
             SELECT count(*) FROM released",
        )
        .bind(&msg_ids)
        .bind(&endpoint_ids)
        .bind(&tokens)
        .fetch_one(&mut *tx)
        .await?;
        if released > 0 {
            notify_due(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(u64::try_from(released).unwrap_or(0))
    }

    async fn requeue_leased(&self, now: DateTime<Utc>) -> Result<u64> {
        // Single-node stores only: every lease is this node's, and nothing is in flight after a
        // restart. A shared store's leases run out instead.
        let done = sqlx::query(
            "WITH released AS (DELETE FROM delivery_leases)
             UPDATE deliveries SET status = $1, next_attempt_at = $2, lease_token = NULL,
                                   leased_until = NULL
             WHERE lease_token IS NOT NULL OR status = $3",
        )
        .bind(DeliveryStatus::Pending as i32)
        .bind(millis(now))
        .bind(DeliveryStatus::Sending as i32)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// `MessageStore::due_deliveries` (the health check's count of deliveries due now, and the
/// oldest due time), one lane's time index each: no index holds both lanes (migration 0013).
/// `$1`: now, in milliseconds.
const DUE_DELIVERIES: &str = "SELECT COALESCE(SUM(n), 0)::bigint AS n, MIN(oldest) AS oldest
     FROM (SELECT COUNT(*) AS n, MIN(next_attempt_at) AS oldest FROM deliveries
           WHERE status IN (1, 3) AND attempts = 0 AND trigger_type = 0
             AND next_attempt_at <= $1
           UNION ALL
           SELECT COUNT(*), MIN(next_attempt_at) FROM deliveries
           WHERE status IN (1, 3) AND NOT (attempts = 0 AND trigger_type = 0)
             AND next_attempt_at <= $1) lanes";

/// When the lane's earliest delivery that is not in flight falls due: the first row in the
/// lane's time index that is unleased or whose lease ran out (claimable again once due, as
/// SQLite leaves out only its held leases). One walk of the index in due order that stops at
/// that row: a `MIN` over every unfinished delivery read the whole backlog (4.7-6.2 ms with one
/// endpoint's backlog, PERFORMANCE.md), and a second walk for lapsed leases alone was planned
/// on the lane's by-endpoint index, reading the whole lane (3.3 ms). The leased rows the walk
/// steps over are the earliest due, no more of them than the nodes have in flight.
///
/// Exact when nothing is due yet. When the first such row is a lapsed lease, the answer is
/// when its lease ran out, which is past: something is due now, if maybe since earlier. (A
/// leased row's due time is no later than its claim, which is before its lease ends: leases
/// are taken of due rows, and every change of a row's due time ends its lease.) `$1`: now.
macro_rules! next_due_statement {
    ($lane:literal) => {
        concat!(
            "SELECT CASE WHEN d.lease_token IS NULL THEN d.next_attempt_at
                         ELSE GREATEST(d.next_attempt_at, d.leased_until) END AS due
             FROM deliveries d
             WHERE d.status IN (1, 3) AND ",
            $lane,
            " AND d.next_attempt_at IS NOT NULL
               AND (d.lease_token IS NULL OR d.leased_until <= $1)
             ORDER BY d.next_attempt_at
             LIMIT 1"
        )
    };
}
const NEXT_DUE_FIRST_ATTEMPT: &str = next_due_statement!("d.attempts = 0 AND d.trigger_type = 0");
const NEXT_DUE_RETRY: &str = next_due_statement!("NOT (d.attempts = 0 AND d.trigger_type = 0)");

/// Queries one claim may make: a walk in time order that ended before finding enough is
/// followed by one endpoint by endpoint, and a pass whose candidates were crowded out (an app
/// whose endpoints' rows, each within its endpoint's room, overfill the app's; a row whose
/// endpoint secret does not open) by one that leaves the full ones out, as the SQLite store
/// does.
const CLAIM_PASSES: usize = 3;

/// How a claim pass finds its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// The lane's due deliveries in due order, leaving out endpoints and apps at their limit,
    /// for at most the rows in flight plus the candidates wanted plus [`WALK_BEYOND`]: cheap
    /// when the earliest due rows are claimable, which is the usual case.
    InTimeOrder,
    /// Endpoint by endpoint (a skip scan of `deliveries_due_*_by_endpoint`), the endpoints at
    /// their limit skipped at the cost of one index probe each.
    ByEndpoint,
}

/// Rows a walk in time order reads beyond the ones in flight and the candidates it wants,
/// before it gives way to a walk by endpoint.
const WALK_BEYOND: usize = 64;

/// How many candidates a pass that wants `wanted` more rows locks at most: more than needed,
/// since some may belong to an endpoint or app that fills up.
fn candidates_to_fetch(wanted: usize) -> usize {
    wanted.saturating_mul(4)
}

/// A pass's statement (`claim_statement(request.first_attempts, walk)`) with its parameters
/// bound: the request's times and limits, what each endpoint and app holds, and the rows still
/// wanted.
fn bind_pass<'q>(
    statement: &'q str,
    walk: Walk,
    request: &ClaimRequest,
    endpoints: &'q Held,
    apps: &'q Held,
    saving: &'q Held,
    wanted: usize,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let query = sqlx::query(AssertSqlSafe(statement))
        .bind(millis(request.now))
        .bind(i64::try_from(candidates_to_fetch(wanted)).unwrap_or(i64::MAX))
        .bind(&endpoints.ids)
        .bind(&endpoints.counts)
        .bind(i64::from(request.per_endpoint_limit))
        .bind(&apps.ids)
        .bind(&apps.counts)
        .bind(i64::from(request.per_app_limit))
        .bind(i64::try_from(wanted).unwrap_or(i64::MAX))
        .bind(millis(request.lease_until))
        .bind(&saving.ids)
        .bind(&saving.counts);
    match walk {
        Walk::InTimeOrder => query.bind(walk_length(wanted)),
        Walk::ByEndpoint => query,
    }
}

/// How many rows a walk in due order reads beyond the ones in flight, for a claim that wants
/// `wanted` more: what it wants plus [`WALK_BEYOND`]. Every row walked is numbered per endpoint
/// and app, so the walk is most of a busy claim's cost; rows it did not reach are found by a
/// walk by endpoint, when one could lease anything.
fn walk_length(wanted: usize) -> i64 {
    i64::try_from(wanted.saturating_add(WALK_BEYOND)).unwrap_or(i64::MAX)
}

/// The key of the transaction-scoped advisory lock every claim takes first
/// (`pg_advisory_xact_lock`, in [`BEGIN_CLAIM`], which spells it in decimal), so claims run one
/// at a time across all nodes of the database and each counts the others' committed leases.
/// "heraldcl" in ASCII; advisory locks belong to the database, so deployments sharing one
/// database in different schemas take turns too.
#[cfg(test)]
const CLAIM_LOCK_KEY: i64 = 0x6865_7261_6c64_636c;

/// What the caller says its endpoints or apps hold (its in flight plus what earlier passes of
/// this claim took), as the claim statement's array parameters. The statement takes, per key,
/// the larger of this and the live leases it counts.
struct Held {
    ids: Vec<String>,
    counts: Vec<i64>,
}

impl Held {
    fn new<K: std::hash::Hash + Eq + AsRef<str>>(
        held: &HashMap<K, u32>,
        taken: &HashMap<K, u32>,
    ) -> Self {
        let mut this = Self {
            ids: Vec::new(),
            counts: Vec::new(),
        };
        let keys = held
            .keys()
            .chain(taken.keys().filter(|key| !held.contains_key(*key)));
        for key in keys {
            let count = held.get(key).copied().unwrap_or(0) + taken.get(key).copied().unwrap_or(0);
            this.ids.push(key.as_ref().to_owned());
            this.counts.push(i64::from(count));
        }
        this
    }
}

/// The planner settings of a claim's transaction (`SET LOCAL`: for it alone). Every read of a
/// pass is meant to be an index probe or an index read in the index's order, planned once per
/// connection:
/// - `enable_seqscan` off: estimating an endpoint's share of the queue from the table's
///   statistics, the planner otherwise scans the whole table for the rows of one endpoint in
///   a walk by endpoint (seen at 200,000 queued: 35 ms a claim).
/// - `enable_bitmapscan` off: the count of live leases (`live` in `claim_statement`) reads
///   `delivery_leases_live`, where every finished lease leaves an entry until a vacuum (a
///   record deletes the lease's row; its entry stays). A plain or
///   index-only scan that finds an entry's row version dead to every transaction marks the
///   entry (`LP_DEAD`): later scans step over it without reading the table, and an insert into
///   a full page removes it instead of splitting the page. A bitmap scan marks nothing, so
///   every claim read every lease finished since the last vacuum again, from the table: after
///   10 s at 1,400 deliveries a second, 36,000 entries and 2-5 ms per claim (PERFORMANCE.md).
/// - `plan_cache_mode` `force_generic_plan`: a claim's statements are prepared, and PostgreSQL
///   planned a third of their runs again for the values at hand, 2.2-2.5 ms each (more than
///   running the retry lane's pass). The plan does not depend on the values: the settings
///   above and the indexes' predicates decide its shape.
macro_rules! claim_settings {
    () => {
        "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; \
         SET LOCAL plan_cache_mode = force_generic_plan"
    };
}

/// [`claim_settings`], for the tests that plan a claim's statements.
#[cfg(test)]
const CLAIM_SETTINGS: &str = claim_settings!();

/// A claim's transaction begins in one round trip: READ COMMITTED whatever the server's
/// default (each statement after the lock must see the leases the previous lock holder
/// committed, which a snapshot taken at the lock would not), the claim lock
/// (`CLAIM_LOCK_KEY` in decimal: claims take turns cluster-wide and the live leases each one
/// counts are all there are; released with the transaction), `synchronous_commit` off, and
/// [`claim_settings`].
///
/// `synchronous_commit` off: the claim's commit does not wait for its WAL to reach the disk
/// (1.0-1.3 ms of a claim's round trips on a busy machine, PERFORMANCE.md). It is visible to
/// the next claim at once all the same, and the next commit that waits (a record, a message)
/// flushes it too. What a crash of the database server can lose is the last fraction of a
/// second's leases (and refusals of disabled endpoints' rows, made again by the next claim):
/// those deliveries are claimable again and may be attempted twice, which webhooks
/// (at-least-once, with a message id for receivers to de-duplicate) allow; an attempt's
/// record then finds its lease gone and changes nothing. Messages and records keep their
/// synchronous commits: nothing acknowledged is lost.
const BEGIN_CLAIM: &str = concat!(
    "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock(7522544515348194156); \
     SET LOCAL synchronous_commit = off; ",
    claim_settings!()
);

/// The claim, one statement for a whole pass, run under the claim lock ([`BEGIN_CLAIM`]).
/// `live` counts what every node holds: deliveries under a lease that has not run out at `$1`
/// (the `deliveries_leased` index; this claim's earlier passes are in it too, being the same
/// transaction). `endpoint_held` / `app_held` take, per key, the larger of that and the
/// caller's own count (its in-flight deliveries are live leases as well: never added).
/// `cand` locks (`SKIP LOCKED`: rows locked by a record or an enqueue are passed over) the
/// earliest due, unleased or lease-expired rows of the lane, no more per endpoint than its
/// room (`limit - held`), found by the pass's [`Walk`]: in due order for at most `$13` rows
/// beyond those in flight (`walked`, of which `in_room` keeps what fits each endpoint's room,
/// then each app's), or endpoint by endpoint (`endpoints_due`, a skip scan, then each
/// endpoint's earliest due rows, up to its room). Disabled endpoints' rows take no room: they
/// go to `refused`. Of the rest, `by_endpoint` keeps each endpoint's first `limit - held` rows
/// and `by_app` each app's first `limit - held` of those (the walk in due order has applied
/// both already; the walk by endpoint, only the endpoint's), and `chosen` the earliest `$9`
/// overall — the rows a greedy walk in due order would take, since an endpoint belongs to one
/// app. `leased` gives each a fresh token; `refused` fails disabled endpoints' rows as the
/// SQLite store does. The summary row (candidates, enabled candidates) comes back even when
/// nothing is leased.
///
/// Parameters: $1 now, $2 candidates to fetch, $3/$4 endpoint ids and the caller's counts, $5
/// per-endpoint limit, $6/$7 app ids and the caller's counts, $8 per-app limit, $9 rows
/// wanted, $10 lease until, $11/$12 endpoint ids and the caller's records being saved (their
/// leases are left out of `live`), and for a walk in due order $13 the rows it reads beyond
/// those in flight. The summary row also says how many rows that walk read and how many it could
/// (`n_walked`, `walk_cap`): a walk that read all it could and found too few is followed by a
/// walk by endpoint, if that walk could lease anything (`room_elsewhere`, below).
fn claim_statement(first_attempts: bool, walk: Walk) -> String {
    // Literal, not a parameter, so the planner can use the lane's partial index.
    let lane = if first_attempts {
        "d.attempts = 0 AND d.trigger_type = 0"
    } else {
        "NOT (d.attempts = 0 AND d.trigger_type = 0)"
    };
    let (candidates, walked) = match walk {
        Walk::InTimeOrder => (
            // The lane's earliest due rows, leased ones too: the walk stops after `$13` rows
            // beyond what is in flight, however many of them belong to full endpoints.
            format!(
                "walk_cap AS (
                     SELECT ($13 + COALESCE(SUM(n), 0))::bigint AS n FROM live
                 ),
                 walked AS (
                     SELECT d.msg_id, d.endpoint_id, d.app_id, d.next_attempt_at,
                            d.lease_token, d.leased_until
                     FROM deliveries d
                     WHERE d.status IN (1, 3) AND d.next_attempt_at <= $1 AND {lane}
                     ORDER BY d.next_attempt_at
                     LIMIT (SELECT n FROM walk_cap)
                 ),
                 -- The walked rows a greedy walk in due order would take: claimable, and
                 -- within their endpoint's room, then their app's. Only these are locked:
                 -- locking every claimable row walked cost more than leasing the ones kept
                 -- when one endpoint's backlog filled the walk (PERFORMANCE.md). A disabled
                 -- endpoint's rows are failed (`refused`), not leased, so they take no room.
                 endpoint_turns AS (
                     SELECT w.msg_id, w.endpoint_id, w.app_id, w.next_attempt_at, e.disabled,
                            row_number() OVER (PARTITION BY w.endpoint_id
                                               ORDER BY w.next_attempt_at, w.msg_id) AS n
                     FROM walked w
                     JOIN endpoints e ON e.id = w.endpoint_id
                     WHERE w.lease_token IS NULL OR w.leased_until <= $1
                 ),
                 app_turns AS (
                     SELECT t.msg_id, t.endpoint_id, t.app_id, t.next_attempt_at, t.disabled,
                            row_number() OVER (PARTITION BY t.app_id, t.disabled
                                               ORDER BY t.next_attempt_at, t.msg_id) AS n
                     FROM endpoint_turns t
                     LEFT JOIN endpoint_held h ON h.id = t.endpoint_id
                     WHERE t.disabled OR t.n <= $5::bigint - COALESCE(h.held, 0)
                 ),
                 in_room AS (
                     SELECT t.msg_id, t.endpoint_id, t.app_id, t.next_attempt_at, t.disabled
                     FROM app_turns t
                     LEFT JOIN app_held h ON h.id = t.app_id
                     WHERE t.disabled OR t.n <= $8::bigint - COALESCE(h.held, 0)
                     ORDER BY t.next_attempt_at, t.msg_id
                     LIMIT $2
                 ),
                 cand AS (
                     SELECT d.msg_id, d.endpoint_id, d.app_id, d.next_attempt_at, w.disabled
                     FROM in_room w
                     -- Each row kept for its room (a row another transaction holds is passed
                     -- over, and its endpoint takes it at a later claim), locked by its
                     -- primary key, and its current values checked after the lock (its
                     -- endpoint's `disabled` is the one `endpoint_turns` read, in this
                     -- statement's snapshot). The `LIMIT 1` (a key names one row anyway) keeps
                     -- the planner from pushing those checks into the lookup, where they made a
                     -- partial index of the lane look cheaper than the key and each lookup
                     -- scanned the endpoint's whole backlog.
                     CROSS JOIN LATERAL (
                         SELECT d.msg_id, d.endpoint_id, d.app_id, d.next_attempt_at, d.status,
                                d.attempts, d.trigger_type, d.lease_token, d.leased_until
                         FROM deliveries d
                         WHERE d.msg_id = w.msg_id AND d.endpoint_id = w.endpoint_id
                         LIMIT 1
                         FOR UPDATE OF d SKIP LOCKED
                     ) d
                     WHERE d.status IN (1, 3) AND d.next_attempt_at <= $1 AND {lane}
                       AND (d.lease_token IS NULL OR d.leased_until <= $1)
                     LIMIT $2
                 ),"
            ),
            format!(
                "(SELECT COUNT(*) FROM walked) AS n_walked, (SELECT n FROM walk_cap) AS walk_cap,
                 -- Whether a walk by endpoint could lease anything after this one: an endpoint
                 -- with a claimable row in the lane that is disabled (its rows are failed) or
                 -- has room in itself and in its app, counting what this walk chose (its
                 -- leases are not in this statement's snapshot). Asked only when that walk
                 -- would follow (this one read all it could and found too few), and it stops at
                 -- the first such endpoint: the endpoints it passes over are full ones.
                 -- The apps that are full are gathered once, before the scan (an app's count
                 -- taken per endpoint scanned cost 200 ms over 100 endpoints of one app).
                 CASE WHEN (SELECT COUNT(*) FROM walked) >= (SELECT n FROM walk_cap)
                           AND COUNT(*) < $2
                 THEN EXISTS (
                     SELECT 1
                     FROM endpoints_due p
                     JOIN endpoints e ON e.id = p.id
                     LEFT JOIN endpoint_held h ON h.id = p.id
                     LEFT JOIN (SELECT endpoint_id, COUNT(*) AS n FROM chosen
                                GROUP BY endpoint_id) t ON t.endpoint_id = p.id
                     WHERE p.id IS NOT NULL
                       AND (e.disabled
                            OR (COALESCE(h.held, 0) + COALESCE(t.n, 0) < $5
                                AND e.app_id <> ALL(ARRAY(
                                    SELECT a.id
                                    FROM (SELECT id, held FROM app_held
                                          UNION ALL
                                          SELECT app_id, 1 FROM chosen) a
                                    GROUP BY a.id
                                    HAVING SUM(a.held) >= $8))))
                       -- A probe of the endpoint's rows, written as a subquery with a
                       -- `LIMIT`, which the planner keeps as a probe per endpoint: as an
                       -- `EXISTS` it became a join against the whole lane, read once and
                       -- walked for every endpoint when the lane's statistics said it held one
                       -- row (120 ms over 100 endpoints and 15,000 due rows).
                       AND (SELECT 1 FROM deliveries d
                            WHERE (d.endpoint_id, d.next_attempt_at)
                                      >= (p.id, (-9223372036854775808)::bigint)
                              AND (d.endpoint_id, d.next_attempt_at) <= (p.id, $1)
                              AND d.status IN (1, 3) AND {lane}
                              AND (d.lease_token IS NULL OR d.leased_until <= $1)
                            ORDER BY d.endpoint_id, d.next_attempt_at
                            LIMIT 1) IS NOT NULL
                 )
                 ELSE FALSE END AS room_elsewhere"
            ),
        ),
        Walk::ByEndpoint => (
            // The skip scan of `endpoints_due`, then each endpoint with room's earliest due
            // rows.
            format!(
                "cand AS (
                     SELECT d.msg_id, d.endpoint_id, d.app_id, d.next_attempt_at, e.disabled
                     FROM endpoints_due p
                     JOIN endpoints e ON e.id = p.id
                     LEFT JOIN endpoint_held h ON h.id = p.id
                     CROSS JOIN LATERAL (
                         SELECT d.msg_id, d.endpoint_id, d.app_id, d.next_attempt_at
                         FROM deliveries d
                         -- The endpoint's due rows as a range of the by-endpoint index, in
                         -- its order. Written as row comparisons, not `endpoint_id = p.id`:
                         -- with an equality the planner may read the lane's time index in due
                         -- order instead, filtering every row for this endpoint (it cannot know
                         -- how much of the queue one endpoint holds), and that walk is the one
                         -- this pass exists to avoid.
                         WHERE (d.endpoint_id, d.next_attempt_at)
                                   >= (p.id, (-9223372036854775808)::bigint)
                           AND (d.endpoint_id, d.next_attempt_at) <= (p.id, $1)
                           AND d.status IN (1, 3) AND {lane}
                           AND (d.lease_token IS NULL OR d.leased_until <= $1)
                         -- Due order for one endpoint, as many as it has room for (a disabled
                         -- one's are failed, not leased: up to the pass's candidates): the
                         -- index read stops early, and no row beyond its room is locked. (Never
                         -- negative: a full endpoint is filtered out below, but the planner
                         -- decides whether before or after this runs.)
                         ORDER BY d.endpoint_id, d.next_attempt_at
                         LIMIT CASE WHEN e.disabled THEN $2
                                    ELSE GREATEST(0, LEAST($2, $5::bigint - COALESCE(h.held, 0)))
                               END
                         FOR UPDATE OF d SKIP LOCKED
                     ) d
                     -- An endpoint's app is its deliveries' app: full apps are left out
                     -- here, before their rows are read.
                     WHERE COALESCE(h.held, 0) < $5
                       AND e.app_id <> ALL(ARRAY(SELECT id FROM app_held WHERE held >= $8))
                 ),"
            ),
            "0::bigint AS n_walked, 1::bigint AS walk_cap, FALSE AS room_elsewhere".to_owned(),
        ),
    };
    format!(
        "WITH RECURSIVE live AS (
             SELECT l.app_id, l.endpoint_id, GREATEST(0, l.n - COALESCE(s.n, 0)) AS n
             FROM (SELECT app_id, endpoint_id, COUNT(*) AS n
                   FROM delivery_leases
                   WHERE leased_until > $1
                   GROUP BY app_id, endpoint_id) l
             LEFT JOIN UNNEST($11::text[], $12::bigint[]) AS s(id, n) ON s.id = l.endpoint_id
         ),
         endpoint_held AS (
             SELECT id, MAX(n) AS held
             FROM (SELECT endpoint_id AS id, n FROM live
                   UNION ALL
                   SELECT id, n FROM UNNEST($3::text[], $4::bigint[]) AS own(id, n)) h
             GROUP BY id
         ),
         app_held AS (
             SELECT id, MAX(n) AS held
             FROM (SELECT app_id AS id, SUM(n)::bigint AS n FROM live GROUP BY app_id
                   UNION ALL
                   SELECT id, n FROM UNNEST($6::text[], $7::bigint[]) AS own(id, n)) h
             GROUP BY id
         ),
         -- The endpoints with unfinished deliveries in the lane, in id order: a skip scan, one
         -- index probe each, full or not. Read only as far as a statement reads it (a walk by
         -- endpoint, or a walk in due order asking whether one should follow).
         endpoints_due AS (
             (SELECT d.endpoint_id AS id FROM deliveries d
              WHERE d.status IN (1, 3) AND {lane}
              ORDER BY d.endpoint_id LIMIT 1)
             UNION ALL
             SELECT (SELECT d.endpoint_id FROM deliveries d
                     WHERE d.status IN (1, 3) AND {lane} AND d.endpoint_id > p.id
                     ORDER BY d.endpoint_id LIMIT 1)
             FROM endpoints_due p
             WHERE p.id IS NOT NULL
         ),
         {candidates}
         by_endpoint AS (
             SELECT c.msg_id, c.endpoint_id, c.app_id, c.next_attempt_at,
                    row_number() OVER (PARTITION BY c.endpoint_id
                                       ORDER BY c.next_attempt_at, c.msg_id) AS n,
                    $5::bigint - COALESCE(h.held, 0) AS room
             FROM cand c
             LEFT JOIN endpoint_held h ON h.id = c.endpoint_id
             WHERE NOT c.disabled
         ),
         by_app AS (
             SELECT b.msg_id, b.endpoint_id, b.app_id, b.next_attempt_at,
                    row_number() OVER (PARTITION BY b.app_id
                                       ORDER BY b.next_attempt_at, b.msg_id) AS n,
                    $8::bigint - COALESCE(h.held, 0) AS room
             FROM by_endpoint b
             LEFT JOIN app_held h ON h.id = b.app_id
             WHERE b.n <= b.room
         ),
         chosen AS (
             SELECT msg_id, endpoint_id, app_id FROM by_app WHERE n <= room
             ORDER BY next_attempt_at, msg_id
             LIMIT $9
         ),
         refused AS (
             UPDATE deliveries d
             SET status = 2, next_attempt_at = NULL, updated_at = $1,
                 lease_token = NULL, leased_until = NULL
             FROM cand c
             WHERE c.disabled AND d.msg_id = c.msg_id AND d.endpoint_id = c.endpoint_id
         ),
         refused_leases AS (
             DELETE FROM delivery_leases l
             USING cand c
             WHERE c.disabled AND l.msg_id = c.msg_id AND l.endpoint_id = c.endpoint_id
         ),
         -- No index names the lease columns, so this is a HOT update where the page has room
         -- (migration 0014); the lease is counted from `delivery_leases`.
         leased AS (
             UPDATE deliveries d
             SET lease_token = nextval('delivery_lease_tokens'), leased_until = $10
             FROM chosen c
             WHERE d.msg_id = c.msg_id AND d.endpoint_id = c.endpoint_id
             RETURNING d.msg_id, d.endpoint_id, d.app_id, d.attempts, d.trigger_type,
                       d.lease_token, d.next_attempt_at
         ),
         -- A lapsed lease taken over replaces its row.
         noted AS (
             INSERT INTO delivery_leases (msg_id, endpoint_id, app_id, lease_token, leased_until)
             SELECT msg_id, endpoint_id, app_id, lease_token, $10 FROM leased
             ON CONFLICT (msg_id, endpoint_id) DO UPDATE
             SET lease_token = excluded.lease_token, leased_until = excluded.leased_until
         ),
         summary AS (
             SELECT COUNT(*) AS n_candidates,
                    COUNT(*) FILTER (WHERE NOT disabled) AS n_enabled,
                    {walked}
             FROM cand
         )
         SELECT s.n_candidates, s.n_enabled, s.n_walked, s.walk_cap, s.room_elsewhere,
                j.msg_id, j.attempts, j.trigger_type, j.lease_token, j.m_app_id, j.event_type,
                j.payload, j.e_id, j.e_app_id, j.e_uid, j.e_url, j.e_description,
                j.e_throttle_rate, j.e_disabled, j.e_event_types, j.e_channels, j.e_metadata,
                j.e_headers, j.e_secret, j.e_previous_secrets, j.e_failing_since,
                j.e_created_at, j.e_updated_at, j.e_format
         FROM summary s
         LEFT JOIN (
             SELECT l.msg_id, l.attempts, l.trigger_type, l.lease_token, l.next_attempt_at,
                    m.app_id AS m_app_id, m.event_type, m.payload,
                    e.id AS e_id, e.app_id AS e_app_id, e.uid AS e_uid, e.url AS e_url,
                    e.description AS e_description, e.throttle_rate AS e_throttle_rate,
                    e.disabled AS e_disabled, e.event_types AS e_event_types,
                    e.channels AS e_channels, e.metadata AS e_metadata,
                    e.headers AS e_headers, e.secret AS e_secret,
                    e.previous_secrets AS e_previous_secrets,
                    e.failing_since AS e_failing_since, e.created_at AS e_created_at,
                    e.updated_at AS e_updated_at, e.format AS e_format
             FROM leased l
             JOIN messages m ON m.id = l.msg_id
             JOIN endpoints e ON e.id = l.endpoint_id
         ) j ON TRUE
         ORDER BY j.next_attempt_at, j.msg_id"
    )
}

/// A leased row of the claim statement as a job.
fn job(row: &PgRow, keys: &crate::secrets::Keyring) -> Result<DeliveryJob> {
    let payload: Vec<u8> = row.try_get("payload")?;
    let token: i64 = row.try_get("lease_token")?;
    Ok(DeliveryJob {
        msg_id: rows::id(row, "msg_id")?,
        app_id: rows::id(row, "m_app_id")?,
        event_type: row.try_get("event_type")?,
        payload: payload.into(),
        endpoint: rows::endpoint(row, "e_", keys)?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(u32::MAX),
        trigger: TriggerType::from_code(i64::from(row.try_get::<i32, _>("trigger_type")?)),
        lease: LeaseToken(
            u64::try_from(token)
                .map_err(|_| StoreError::Corrupt(format!("lease token {token}")))?,
        ),
    })
}

/// Writes one attempt record with [`RECORD_ATTEMPT`]: alone when the endpoint does not change
/// (a batch's fallback), else in a transaction with the endpoint's change, applied only if the
/// fence held. Returns whether it did.
pub(super) async fn record_one(pool: &sqlx::PgPool, record: &AttemptRecord) -> Result<bool> {
    let a = &record.attempt;
    // A token beyond BIGINT was never handed out by the sequence: no row holds it.
    let token = i64::try_from(record.lease.0).ok();
    let (status, next_at) = next_state(record.next);
    let query = sqlx::query_scalar::<_, i64>(RECORD_ATTEMPT)
        .bind(a.id.as_str())
        .bind(a.msg_id.as_str())
        .bind(a.endpoint_id.as_str())
        .bind(a.app_id.as_str())
        .bind(&a.url)
        .bind(a.status as i32)
        .bind(a.response_status_code)
        .bind(&a.response)
        .bind(a.response_duration_ms)
        .bind(a.trigger_type as i32)
        .bind(millis(a.created_at))
        .bind(status as i32)
        .bind(next_at)
        .bind(i32::from(a.trigger_type == TriggerType::Scheduled))
        .bind(token);
    if record.endpoint_change == EndpointChange::Unchanged {
        return Ok(query.fetch_one(pool).await? > 0);
    }
    // The endpoint changes only if the fence held: a transaction, to read its outcome.
    let mut tx = pool.begin().await?;
    let applied = query.fetch_one(&mut *tx).await? > 0;
    if applied {
        endpoint_change(
            &mut tx,
            &a.msg_id,
            &a.endpoint_id,
            record.endpoint_change,
            millis(a.created_at),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// The delivery's status and due time after an attempt (as the SQLite store's).
pub(super) fn next_state(next: NextStep) -> (DeliveryStatus, Option<i64>) {
    match next {
        NextStep::Delivered => (DeliveryStatus::Success, None),
        NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(millis(at))),
        NextStep::Failed => (DeliveryStatus::Fail, None),
    }
}

/// Applies an applied record's change to the endpoint, in its transaction, after the record
/// has set `msg_id`'s delivery to the endpoint.
async fn endpoint_change(
    conn: &mut PgConnection,
    msg_id: &MessageId,
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
        EndpointChange::Disable {
            streak_since,
            retry_at,
        } => {
            // `updated_at` must move, even within the millisecond of the last update: an API
            // update prepared before this one compares it (`update_endpoint`).
            let disabled = sqlx::query(
                "UPDATE endpoints SET disabled = TRUE, updated_at = GREATEST(updated_at + 1, $2)
                 WHERE id = $1 AND ($3::BIGINT IS NULL OR failing_since <= $3)",
            )
            .bind(endpoint_id.as_str())
            .bind(now)
            .bind(streak_since.map(millis))
            .execute(&mut *conn)
            .await?
            .rows_affected();
            // Declined (the streak ended meanwhile): the delivery goes on with its schedule.
            match retry_at {
                Some(at) if disabled == 0 => sqlx::query(
                    "UPDATE deliveries SET status = $3, next_attempt_at = $4
                     WHERE msg_id = $1 AND endpoint_id = $2",
                )
                .bind(msg_id.as_str())
                .bind(endpoint_id.as_str())
                .bind(DeliveryStatus::Pending as i32)
                .bind(millis(at)),
                _ => return Ok(()),
            }
        }
    };
    update.execute(&mut *conn).await?;
    Ok(())
}

/// Adds to `q` the terms of `filter` on the messages of the table or alias `table`; a time
/// window also bounds `id_column`, the message ids the read walks ([`sql::push_id_window`]).
pub(super) fn push_message_filters(
    q: &mut QueryBuilder<Postgres>,
    table: &str,
    id_column: &str,
    filter: &MessageQuery,
) {
    if let Some(channel) = &filter.channel {
        q.push(format_args!(" AND {table}.channels::jsonb ? "));
        q.push_bind(channel.clone());
    }
    if let Some(tag) = &filter.tag {
        q.push(format_args!(" AND {table}.tags::jsonb ? "));
        q.push_bind(tag.clone());
    }
    if let Some(types) = &filter.event_types {
        q.push(format_args!(" AND {table}.event_type = ANY("));
        q.push_bind(types.clone());
        q.push(")");
    }
    if let Some(before) = filter.before {
        q.push(format_args!(" AND {table}.created_at < "));
        q.push_bind(millis(before));
    }
    if let Some(after) = filter.after {
        q.push(format_args!(" AND {table}.created_at > "));
        q.push_bind(millis(after));
    }
    sql::push_id_window(
        q,
        id_column,
        herald_core::id::MESSAGE,
        filter.after,
        filter.before,
    );
    if let Some(except) = &filter.except_event_type {
        q.push(format_args!(" AND {table}.event_type <> "));
        q.push_bind(except.clone());
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::{collections::HashSet, sync::Arc, time::Duration};

    use herald_core::model::{App, Endpoint};
    use sqlx::{Connection, postgres::PgListener};

    use super::super::tests::{SchemaGuard, open_in_fresh_schema, open_in_schema};
    use super::*;
    use crate::{AppStore, EndpointStore, StoreLifecycle, conformance};

    const URL_VAR: &str = "HERALD_TEST_POSTGRES_URL";

    /// The server's URL, or `None` (the test is skipped) when it is unset.
    pub(in crate::postgres) fn server_url() -> Option<String> {
        let url = std::env::var(URL_VAR).ok();
        if url.is_none() {
            herald_test_support::skip!("{URL_VAR} is unset (this test needs a PostgreSQL server)");
        }
        url
    }

    /// Two nodes of one cluster: two stores, each with its own pool, on one fresh schema.
    async fn two_nodes(url: &str) -> (SchemaGuard, PostgresStore, PostgresStore) {
        let (guard, a) = open_in_fresh_schema(url.to_owned()).await;
        let b = open_in_schema(url, &guard).await;
        (guard, a, b)
    }

    async fn stored_app(store: &PostgresStore) -> App {
        conformance::stored_app(store, "A").await
    }

    async fn stored_endpoint(store: &PostgresStore, app_id: &AppId) -> Endpoint {
        let endpoint = conformance::endpoint(app_id);
        store
            .create_endpoint(&endpoint)
            .await
            .expect("create endpoint");
        endpoint
    }

    fn message(app_id: &AppId) -> Message {
        conformance::message(app_id, None)
    }

    /// `count` messages of `app_id`, each to every one of `endpoints`.
    async fn queue(store: &PostgresStore, app_id: &AppId, endpoints: &[&Endpoint], count: usize) {
        let targets: Vec<EndpointId> = endpoints.iter().map(|e| e.id.clone()).collect();
        for _ in 0..count {
            store
                .create_message(message(app_id), targets.clone())
                .await
                .expect("create message");
        }
    }

    /// A first-attempt claim of up to `limit` rows, leased for a minute.
    fn claim(
        now: DateTime<Utc>,
        limit: u32,
        per_endpoint_limit: u32,
        per_app_limit: u32,
    ) -> ClaimRequest {
        ClaimRequest {
            now,
            lease_until: now + chrono::Duration::seconds(60),
            limit,
            first_attempts: true,
            in_flight: HashMap::new(),
            per_endpoint_limit,
            app_in_flight: HashMap::new(),
            per_app_limit,
            saving: Default::default(),
        }
    }

    /// Records `job`'s attempt as delivered, under its lease.
    async fn delivered(store: &PostgresStore, job: &DeliveryJob, at: DateTime<Utc>) {
        let recorded = store
            .record_attempt(conformance::job_record(
                job,
                job.lease,
                at,
                NextStep::Delivered,
            ))
            .await
            .expect("record");
        assert_eq!(recorded, Recorded::Applied, "the lease still holds");
    }

    /// `count` messages of `app` (`msg_1` to `msg_{count}`), each with a delivery to
    /// `endpoint` due and leased, the lease ends spread over `count` milliseconds from
    /// `lease_ends_from` in no relation to the rows' order (as after many leases and records);
    /// then the table's statistics taken, all in `tx`.
    pub(in crate::postgres) async fn leased_rows(
        tx: &mut PgConnection,
        app: &AppId,
        endpoint: &EndpointId,
        count: i64,
        now: DateTime<Utc>,
        lease_ends_from: DateTime<Utc>,
    ) {
        sqlx::query(
            "INSERT INTO messages (id, app_id, event_type, payload, created_at)
             SELECT 'msg_' || g, $1, 'order.paid', '\\x7b7d'::bytea, $2
             FROM generate_series(1, $3) g",
        )
        .bind(app.as_str())
        .bind(millis(now))
        .bind(count)
        .execute(&mut *tx)
        .await
        .expect("messages");
        sqlx::query(
            "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                     next_attempt_at, updated_at, lease_token, leased_until)
             SELECT 'msg_' || g, $1, $2, 1, 0, 0, $3, $3, g, $4 + (g * 7919) % $5
             FROM generate_series(1, $5) g",
        )
        .bind(endpoint.as_str())
        .bind(app.as_str())
        .bind(millis(now))
        .bind(millis(lease_ends_from))
        .bind(count)
        .execute(&mut *tx)
        .await
        .expect("leased deliveries");
        sqlx::query(
            "INSERT INTO delivery_leases (msg_id, endpoint_id, app_id, lease_token, leased_until)
             SELECT msg_id, endpoint_id, app_id, lease_token, leased_until FROM deliveries
             WHERE endpoint_id = $1 AND lease_token IS NOT NULL",
        )
        .bind(endpoint.as_str())
        .execute(&mut *tx)
        .await
        .expect("their leases");
        sqlx::query("ANALYZE deliveries, delivery_leases")
            .execute(&mut *tx)
            .await
            .expect("analyze");
    }

    /// Planned for the values at hand, and as PostgreSQL plans a prepared statement it has
    /// run often, for any values (a generic plan).
    pub(in crate::postgres) const PLAN_CACHE_MODES: [&str; 2] =
        ["force_custom_plan", "force_generic_plan"];

    /// Plans `tx`'s next statements in `plan_cache_mode` (one of [`PLAN_CACHE_MODES`]).
    pub(in crate::postgres) async fn plan_as(tx: &mut PgConnection, plan_cache_mode: &str) {
        sqlx::query("SELECT set_config('plan_cache_mode', $1, true)")
            .bind(plan_cache_mode)
            .execute(&mut *tx)
            .await
            .expect("plan_cache_mode");
    }

    /// The plan, line by line, of a pass's statement for `request` with nothing held.
    async fn explain_pass(
        tx: &mut PgConnection,
        walk: Walk,
        request: &ClaimRequest,
        wanted: usize,
    ) -> Vec<String> {
        let nothing_held = Held::new(&request.in_flight, &HashMap::new());
        let statement = format!("EXPLAIN {}", claim_statement(request.first_attempts, walk));
        let explain = bind_pass(
            &statement,
            walk,
            request,
            &nothing_held,
            &nothing_held,
            &nothing_held,
            wanted,
        );
        plan_lines(tx, explain).await
    }

    /// What an `EXPLAIN` query answers, line by line.
    async fn plan_lines(
        tx: &mut PgConnection,
        explain: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Vec<String> {
        explain
            .fetch_all(&mut *tx)
            .await
            .expect("explain")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// An app's deletion that PostgreSQL aborts to break a deadlock with a writer of its
    /// deliveries (as a batch of attempt records is) runs its batch again and succeeds. Here the
    /// other writer holds the message's second delivery while the deletion's cascade holds the
    /// first and waits for the second, then asks for the first. PostgreSQL looks for a cycle
    /// once per wait, `deadlock_timeout` after it began: the deletion, waiting first, is the
    /// victim, unless the writer's request came later than that (a loaded machine); then the
    /// writer is, and the scenario runs again with a new app.
    #[tokio::test]
    async fn an_apps_deletion_outlives_a_deadlock_with_a_writer_of_its_deliveries() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        for _ in 0..5 {
            if deletion_against_a_writer(&store).await {
                return;
            }
        }
        panic!("the deletion was never the deadlock's victim in five tries");
    }

    /// One round of the test above; whether the deletion was the deadlock's victim (and ran its
    /// batch again). The deletion succeeds and leaves nothing either way.
    async fn deletion_against_a_writer(store: &PostgresStore) -> bool {
        let app = stored_app(store).await;
        let mut endpoints = [
            stored_endpoint(store, &app.id).await.id,
            stored_endpoint(store, &app.id).await.id,
        ];
        // The cascade deletes them in key order.
        endpoints.sort();
        let [first, second] = endpoints.clone();
        let message = message(&app.id);
        let msg_id = message.id.clone();
        store
            .create_message(message, endpoints.to_vec())
            .await
            .expect("create");

        let mut writer = store.pool.begin().await.expect("begin");
        let writer_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *writer)
            .await
            .expect("pid");
        let touch = "UPDATE deliveries SET updated_at = updated_at + 1
                     WHERE msg_id = $1 AND endpoint_id = $2";
        sqlx::query(touch)
            .bind(msg_id.as_str())
            .bind(second.as_str())
            .execute(&mut *writer)
            .await
            .expect("hold the second delivery");
        let deleting = store.delete_app(&app.id);
        let closing_the_cycle = async {
            // Until the deletion waits for the writer (it holds the first delivery by then).
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                )
                .bind(writer_pid)
                .fetch_one(&store.pool)
                .await
                .expect("waiters");
                if waiting > 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the deletion never waited"
                );
                tokio::task::yield_now().await;
            }
            // It gets the first delivery once the deletion is aborted.
            let deletion_aborted = match sqlx::query(touch)
                .bind(msg_id.as_str())
                .bind(first.as_str())
                .execute(&mut *writer)
                .await
            {
                Ok(_) => true,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("40P01") => false,
                Err(e) => panic!("the writer's second update: {e}"),
            };
            if deletion_aborted {
                writer.commit().await.expect("commit");
            } else {
                writer.rollback().await.expect("rollback");
            }
            deletion_aborted
        };
        let (deleted, deletion_aborted) = tokio::join!(deleting, closing_the_cycle);
        assert!(
            deleted.expect("the deletion ran its batch again"),
            "deleted"
        );
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE msg_id = $1")
            .bind(msg_id.as_str())
            .fetch_one(&store.pool)
            .await
            .expect("count");
        assert_eq!(left, 0);
        deletion_aborted
    }

    /// Two nodes claiming with nothing in flight of their own lease an endpoint's limit
    /// between them, not each; a node's own in-flight count is the same leases the database
    /// counts (not added to them); a recorded attempt frees a place for any node.
    #[tokio::test]
    async fn two_nodes_hold_an_endpoint_to_its_limit_together() {
        let Some(url) = server_url() else { return };
        let (_guard, a, b) = two_nodes(&url).await;
        let app = stored_app(&a).await;
        let ep = stored_endpoint(&a, &app.id).await;
        queue(&a, &app.id, &[&ep], 10).await;
        let now = Utc::now() + chrono::Duration::seconds(1);
        let request = claim(now, 10, 2, 100);

        let on_a = a.claim_due(&request).await.expect("claim on a");
        let on_b = b.claim_due(&request).await.expect("claim on b");
        assert_eq!((on_a.len(), on_b.len()), (2, 0), "2 in all, not 2 per node");

        delivered(&b, &on_a[0], now).await;
        // a still holds on_a[1], and says so: that is the one live lease, counted once.
        let mut own = request.clone();
        own.in_flight = HashMap::from([(ep.id.clone(), 1)]);
        let again_on_a = a.claim_due(&own).await.expect("claim on a");
        assert_eq!(again_on_a.len(), 1, "a's own lease is not counted twice");
        assert!(b.claim_due(&request).await.expect("claim on b").is_empty());

        delivered(&a, &on_a[1], now).await;
        let again_on_b = b.claim_due(&request).await.expect("claim on b");
        assert_eq!(again_on_b.len(), 1, "a's record freed a place for b");
        assert!(a.claim_due(&request).await.expect("claim on a").is_empty());
    }

    /// An endpoint's `throttleRate` is one pace for the cluster: turns reserved on either node
    /// follow one another (before, each node paced its own attempts, so two nodes sent twice
    /// the rate). At 4 a second: a burst of 4, then one every 250 ms, whichever node asks.
    #[tokio::test]
    async fn two_nodes_take_an_endpoints_turns_from_one_pace() {
        let Some(url) = server_url() else { return };
        let (_guard, a, b) = two_nodes(&url).await;
        let app = stored_app(&a).await;
        let ep = stored_endpoint(&a, &app.id).await;
        // Turns are kept in nanoseconds, as chrono's times.
        let now = Utc::now();
        let ms = chrono::Duration::milliseconds;
        let far = now + ms(10_000);
        let mut turns = Vec::new();
        for node in [&a, &b, &a, &b, &a, &b, &b] {
            turns.push(node.reserve_turn(&ep.id, 4, now, far).await.expect("turn"));
        }
        // Each reservation's `due` is its theoretical time plus an interval; the burst's
        // tolerance (three intervals) lets the first four go at once.
        let expected: Vec<_> = [(0, 250), (0, 500), (0, 750), (0, 1000)]
            .into_iter()
            .chain([(250, 1250), (500, 1500), (750, 1750)])
            .map(|(at, due)| crate::Turn::At {
                at: now + ms(at),
                due: now + ms(due),
            })
            .collect();
        assert_eq!(turns, expected);
        // A turn past the latest start is refused on either node, and reserves nothing.
        let soon = now + ms(900);
        assert_eq!(
            a.reserve_turn(&ep.id, 4, now, soon).await.expect("turn"),
            crate::Turn::TooLate {
                due: Some(now + ms(1750))
            }
        );
        assert_eq!(
            b.reserve_turn(&ep.id, 4, now, far).await.expect("turn"),
            crate::Turn::At {
                at: now + ms(1000),
                due: now + ms(2000)
            }
        );
        // At Svix's highest rate turns are 15,260 ns apart (15,259.03, rounded up): never over the rate.
        let fast = stored_endpoint(&a, &app.id).await;
        let mut last = None;
        for _ in 0..16 {
            last = Some(
                a.reserve_turn(&fast.id, 65_535, now, far)
                    .await
                    .expect("turn"),
            );
        }
        let Some(crate::Turn::At { due, .. }) = last else {
            panic!("a turn: {last:?}")
        };
        assert_eq!(due - now, chrono::Duration::nanoseconds(15_260 * 16));
        // Deleting the endpoint deletes its pace.
        a.delete_endpoint(&app.id, &ep.id).await.expect("delete");
        let paces: Vec<String> = sqlx::query_scalar("SELECT endpoint_id FROM endpoint_paces")
            .fetch_all(&a.pool)
            .await
            .expect("paces");
        assert_eq!(paces, [fast.id.as_str()]);
    }

    /// The per-app limit holds across nodes and over the app's endpoints.
    #[tokio::test]
    async fn two_nodes_hold_an_app_to_its_limit_together() {
        let Some(url) = server_url() else { return };
        let (_guard, a, b) = two_nodes(&url).await;
        let app = stored_app(&a).await;
        let (e1, e2) = (
            stored_endpoint(&a, &app.id).await,
            stored_endpoint(&a, &app.id).await,
        );
        queue(&a, &app.id, &[&e1, &e2], 10).await;
        let now = Utc::now() + chrono::Duration::seconds(1);
        let request = claim(now, 10, 100, 3);

        let on_a = a.claim_due(&request).await.expect("claim on a");
        let on_b = b.claim_due(&request).await.expect("claim on b");
        assert_eq!((on_a.len(), on_b.len()), (3, 0), "3 in all, not 3 per node");

        delivered(&a, &on_a[0], now).await;
        let again_on_b = b.claim_due(&request).await.expect("claim on b");
        assert_eq!(again_on_b.len(), 1, "a's record freed a place for b");
        let mut own = request.clone();
        own.app_in_flight = HashMap::from([(app.id.clone(), 2)]);
        assert!(
            a.claim_due(&own).await.expect("claim on a").is_empty(),
            "a holds 2 and b 1: the app is at its limit"
        );
    }

    /// Nodes compare leases and due times in the database's time, whatever their own clocks
    /// say. Node b's clock runs two minutes ahead, past the lease (a minute here, 45 s in a
    /// deployment): the message it creates is due at once for node a, and a's lease is live
    /// for b. Read on b's own clock, b took the delivery a was still sending.
    #[tokio::test]
    async fn a_node_whose_clock_runs_ahead_neither_takes_live_leases_nor_delays_its_messages() {
        fn two_minutes_ahead() -> DateTime<Utc> {
            Utc::now() + chrono::Duration::minutes(2)
        }
        let Some(url) = server_url() else { return };
        let (_guard, a, b) = two_nodes(&url).await;
        let b = b
            .reading_local_clock(two_minutes_ahead)
            .await
            .expect("measure b's clock");
        let off = (b.clock().now() - Utc::now()).abs();
        assert!(
            off < chrono::Duration::seconds(1),
            "b reads the database's time: {off}"
        );
        let app = stored_app(&a).await;
        let ep = stored_endpoint(&a, &app.id).await;
        // Created on b, stamped with b's own clock, as its API does.
        let mut created = message(&app.id);
        created.created_at = b.clock().local_now();
        b.create_message(created, vec![ep.id.clone()])
            .await
            .expect("create on b");

        let on_a = a
            .claim_due(&claim(a.clock().now(), 10, 10, 10))
            .await
            .expect("claim on a");
        assert_eq!(on_a.len(), 1, "due at once, not once b's lead has passed");
        let on_b = b
            .claim_due(&claim(b.clock().now(), 10, 10, 10))
            .await
            .expect("claim on b");
        assert!(on_b.is_empty(), "a's lease is live in the database's time");
        let stolen = b
            .claim_due(&claim(b.clock().local_now(), 10, 10, 10))
            .await
            .expect("claim on b's own clock");
        assert_eq!(stolen.len(), 1, "b's own clock is past a's lease");
    }

    /// Many claims at once from both nodes, round after round: together they never lease
    /// more than the limits, and they fill them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_from_two_nodes_never_exceed_the_limits() {
        let Some(url) = server_url() else { return };
        let (_guard, a, b) = two_nodes(&url).await;
        let app = stored_app(&a).await;
        let mut endpoints = Vec::new();
        for _ in 0..3 {
            endpoints.push(stored_endpoint(&a, &app.id).await);
        }
        let targets: Vec<&Endpoint> = endpoints.iter().collect();
        queue(&a, &app.id, &targets, 30).await;
        let (a, b) = (Arc::new(a), Arc::new(b));
        let (per_endpoint, per_app) = (2, 5);
        for round in 0..4 {
            let now = Utc::now() + chrono::Duration::seconds(1);
            let request = claim(now, 3, per_endpoint, per_app);
            let mut claims = tokio::task::JoinSet::new();
            for i in 0..16 {
                let store = Arc::clone(if i % 2 == 0 { &a } else { &b });
                let request = request.clone();
                claims.spawn(async move { store.claim_due(&request).await.expect("claim") });
            }
            let jobs: Vec<DeliveryJob> = claims.join_all().await.into_iter().flatten().collect();
            let mut per_ep: HashMap<&EndpointId, u32> = HashMap::new();
            for job in &jobs {
                *per_ep.entry(&job.endpoint.id).or_insert(0) += 1;
            }
            assert!(
                per_ep.values().all(|n| *n <= per_endpoint),
                "round {round}: {per_ep:?}"
            );
            assert_eq!(
                jobs.len(),
                per_app as usize,
                "round {round}: the app's limit, filled"
            );
            let leases: HashSet<LeaseToken> = jobs.iter().map(|j| j.lease).collect();
            assert_eq!(leases.len(), jobs.len(), "round {round}: one lease per job");
            for job in &jobs {
                delivered(&a, job, now).await;
            }
        }
    }

    /// What a walk in due order says about the walk by endpoint that may follow it: whether
    /// it read all it could, and whether a walk by endpoint could lease anything after it.
    /// The statement runs alone, with a claim of one row and the given limits, and is rolled
    /// back.
    async fn after_a_walk_in_due_order(
        store: &PostgresStore,
        per_endpoint_limit: u32,
        per_app_limit: u32,
    ) -> (bool, bool) {
        let request = claim(
            Utc::now() + chrono::Duration::seconds(1),
            1,
            per_endpoint_limit,
            per_app_limit,
        );
        let nothing_held = Held::new(&request.in_flight, &HashMap::new());
        let mut tx = store.pool.begin().await.expect("begin");
        let walk = Walk::InTimeOrder;
        let statement = claim_statement(true, walk);
        let rows = bind_pass(
            &statement,
            walk,
            &request,
            &nothing_held,
            &nothing_held,
            &nothing_held,
            1,
        )
        .fetch_all(&mut *tx)
        .await
        .expect("claim statement");
        // Rolled back before anything is asserted: a transaction left open would hold its
        // locks against the schema's drop at the end of the test.
        tx.rollback().await.expect("rollback");
        let row = rows.first().expect("the summary row");
        let read_all: bool = row.get::<i64, _>("n_walked") >= row.get::<i64, _>("walk_cap");
        (read_all, row.get("room_elsewhere"))
    }

    /// A walk in due order filled by one endpoint's backlog is followed by a walk by endpoint
    /// only when that walk could lease something: not when the backlog's endpoint is full and
    /// nothing else is due (most of a busy single-endpoint claim's second statement, before),
    /// but when the endpoint still has room, or another endpoint with room has a delivery
    /// behind the backlog, unless their app is full.
    #[tokio::test]
    async fn a_walk_by_endpoint_follows_only_when_it_could_lease() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let app = stored_app(&store).await;
        let busy = stored_endpoint(&store, &app.id).await;
        // Longer than the walk: the rows in flight (none) + 1 wanted + WALK_BEYOND.
        queue(&store, &app.id, &[&busy], WALK_BEYOND + 10).await;

        let (read_all, room_elsewhere) = after_a_walk_in_due_order(&store, 1, 100).await;
        assert!(read_all, "the backlog is longer than the walk");
        assert!(
            !room_elsewhere,
            "busy takes its one place, and nothing else is due"
        );
        let (_, room_elsewhere) = after_a_walk_in_due_order(&store, 2, 100).await;
        assert!(
            room_elsewhere,
            "busy has a place left, for rows beyond the walk"
        );

        let quiet = stored_endpoint(&store, &app.id).await;
        queue(&store, &app.id, &[&quiet], 1).await;
        let (read_all, room_elsewhere) = after_a_walk_in_due_order(&store, 1, 100).await;
        assert!(read_all);
        assert!(room_elsewhere, "quiet's delivery is behind busy's backlog");
        let (_, room_elsewhere) = after_a_walk_in_due_order(&store, 1, 1).await;
        assert!(!room_elsewhere, "busy's one row fills the app, quiet's too");
    }

    /// A walk by endpoint, and the skip scan over the endpoints with due deliveries that it
    /// shares with the walk in due order's `room_elsewhere`, cannot read a lane's time index:
    /// with statistics taken while the queue was nearly empty the planner could not tell the two
    /// paths apart, and reading the time index once per endpoint cost 480 ms a claim over 100
    /// endpoints (migration 0012). Shown with every other index that could serve them dropped
    /// (in a transaction rolled back), where the time index was the planner's choice before.
    #[tokio::test]
    async fn walks_by_endpoint_cannot_read_a_lanes_time_index() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let mut tx = store.pool.begin().await.expect("begin");
        sqlx::query(
            "DROP INDEX deliveries_due_first_by_endpoint, deliveries_due_retry_by_endpoint,
                        deliveries_endpoint_unsettled, deliveries_endpoint_msg",
        )
        .execute(&mut *tx)
        .await
        .expect("drop the other indexes");
        sqlx::raw_sql(CLAIM_SETTINGS)
            .execute(&mut *tx)
            .await
            .expect("as claims run");
        let mut request = claim(Utc::now(), 1, 2, 8);
        let mut plans = Vec::new();
        for first_attempts in [true, false] {
            request.first_attempts = first_attempts;
            plans.push(explain_pass(&mut tx, Walk::ByEndpoint, &request, 1).await);
        }
        tx.rollback().await.expect("rollback");
        for plan in &plans {
            assert!(
                !plan.iter().any(|line| line.contains("deliveries_due_first")
                    || line.contains("deliveries_due_retry")),
                "a walk by endpoint reads a lane's time index: {plan:#?}"
            );
        }
    }

    /// The claim lock a claim's transaction begins with is [`CLAIM_LOCK_KEY`] (written out in
    /// [`BEGIN_CLAIM`], a literal), with the settings the tests plan under.
    #[test]
    fn a_claim_begins_with_the_claim_lock_and_its_settings() {
        assert!(BEGIN_CLAIM.contains(&format!("pg_advisory_xact_lock({CLAIM_LOCK_KEY});")));
        assert!(BEGIN_CLAIM.contains("SET LOCAL synchronous_commit = off;"));
        assert!(BEGIN_CLAIM.ends_with(CLAIM_SETTINGS));
    }

    /// A claim counts the live leases (`live`) with scans that mark finished leases' entries in
    /// `delivery_leases_live`, never a bitmap scan, which marks none (see [`BEGIN_CLAIM`]): not even
    /// when the statistics say the index holds many live leases, as they do in a busy queue.
    /// Shown for both lanes and both walks, over 20,000 leased rows analysed in a transaction
    /// rolled back, whose lease ends are in no relation to their place in the table (as after
    /// many leases and records); with the planner's defaults, the plans count them with a
    /// bitmap scan.
    #[tokio::test]
    async fn claims_count_leases_without_a_bitmap_scan() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let app = stored_app(&store).await;
        let endpoint = stored_endpoint(&store, &app.id).await;
        let request = claim(Utc::now(), 16, 16, 64);
        let mut tx = store.pool.begin().await.expect("begin");
        leased_rows(
            &mut tx,
            &app.id,
            &endpoint.id,
            20_000,
            request.now,
            request.lease_until,
        )
        .await;
        sqlx::raw_sql(CLAIM_SETTINGS)
            .execute(&mut *tx)
            .await
            .expect("as claims run");
        let mut plans = Vec::new();
        // Planned for the values at hand, and as a prepared claim's cached plan is, for any
        // values (a generic plan, which estimates a third of the index to be live leases).
        for plan_cache_mode in PLAN_CACHE_MODES {
            plan_as(&mut tx, plan_cache_mode).await;
            for (first_attempts, walk) in [true, false]
                .into_iter()
                .flat_map(|lane| [(lane, Walk::InTimeOrder), (lane, Walk::ByEndpoint)])
            {
                let mut request = request.clone();
                request.first_attempts = first_attempts;
                plans.push(explain_pass(&mut tx, walk, &request, 16).await);
            }
        }
        tx.rollback().await.expect("rollback");
        for plan in &plans {
            assert!(
                plan.iter()
                    .any(|line| line.contains("delivery_leases_live")),
                "the live leases are counted through their index: {plan:#?}"
            );
            assert!(
                !plan.iter().any(|line| line.contains("Bitmap")),
                "a claim reads an index with a bitmap scan: {plan:#?}"
            );
        }
    }

    /// The plan, line by line, of one of our statements whose only parameter is now.
    async fn explain_at(tx: &mut PgConnection, statement: &str, now: DateTime<Utc>) -> Vec<String> {
        // Our own constants.
        let explain = sqlx::query(AssertSqlSafe(format!("EXPLAIN {statement}"))).bind(millis(now));
        plan_lines(tx, explain).await
    }

    /// A message whose one delivery failed, and an expunge of its payload under way: its first
    /// statement run, its transaction left open.
    struct ExpungeUnderWay {
        app: herald_core::model::App,
        endpoint: herald_core::model::Endpoint,
        msg: herald_core::model::Message,
        now: DateTime<Utc>,
        expunge: OpenExpunge,
    }

    struct OpenExpunge {
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        pid: i32,
    }

    impl OpenExpunge {
        /// Commits once another session waits on this one, or after 10 s if none ever does
        /// (the other statement then ran on the payload it read before, which the caller's
        /// assertions catch).
        async fn commit_once_waited_for(self, watcher: &sqlx::PgPool) {
            for _ in 0..1000 {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE $1 = ANY(pg_blocking_pids(pid))",
                )
                .bind(self.pid)
                .fetch_one(watcher)
                .await
                .expect("blocked");
                if waiting > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.tx.commit().await.expect("commit");
        }
    }

    async fn expunge_under_way(store: &PostgresStore) -> ExpungeUnderWay {
        let app = stored_app(store).await;
        let endpoint = stored_endpoint(store, &app.id).await;
        let msg = message(&app.id);
        store
            .create_message(msg.clone(), vec![endpoint.id.clone()])
            .await
            .expect("create");
        let now = Utc::now() + chrono::Duration::seconds(1);
        let jobs = store.claim_due(&claim(now, 1, 1, 8)).await.expect("claim");
        assert_eq!(jobs.len(), 1);
        let failed = conformance::job_record(&jobs[0], jobs[0].lease, now, NextStep::Failed);
        assert_eq!(
            store.record_attempt(failed).await.expect("record"),
            Recorded::Applied
        );

        let mut tx = store.pool.begin().await.expect("begin");
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *tx)
            .await
            .expect("pid");
        let expunged: Option<String> = sqlx::query_scalar(crate::sql::EXPUNGE_PAYLOAD)
            .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
            .bind(app.id.as_str())
            .bind(msg.id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .expect("expunge");
        assert_eq!(expunged.as_deref(), Some(msg.id.as_str()));
        ExpungeUnderWay {
            app,
            endpoint,
            msg,
            now,
            expunge: OpenExpunge { tx, pid },
        }
    }

    /// A resend that reads the message while an expunge of its payload is under way waits for
    /// it (the share lock on the message's row) and then queues nothing: the delivery the
    /// expunge leaves failed is not queued again to send `{"expired":true}`.
    #[tokio::test]
    async fn a_resend_waits_for_an_expunge_under_way_and_queues_nothing() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let ExpungeUnderWay {
            app,
            endpoint,
            msg,
            now,
            expunge,
        } = expunge_under_way(&store).await;
        let (queued, ()) = tokio::join!(
            store.enqueue_manual(&app.id, &msg.id, &endpoint.id, now),
            expunge.commit_once_waited_for(&store.pool),
        );
        assert!(!queued.expect("resend"), "nothing to resend");
        let later = now + chrono::Duration::minutes(1);
        let retry_lane = ClaimRequest {
            first_attempts: false,
            ..claim(later, 1, 1, 8)
        };
        assert!(
            store
                .claim_due(&retry_lane)
                .await
                .expect("claim")
                .is_empty(),
            "the failed delivery stays failed"
        );
    }

    /// A recovery that meets an expunge of a message's payload under way waits for it (the
    /// share lock on the message's row, taken before its delivery's) and then requeues
    /// nothing: the delivery the expunge leaves failed is not queued to send
    /// `{"expired":true}`.
    #[tokio::test]
    async fn a_recovery_waits_for_an_expunge_under_way_and_requeues_nothing() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let ExpungeUnderWay {
            endpoint,
            msg,
            now,
            expunge,
            ..
        } = expunge_under_way(&store).await;
        let since = msg.created_at - chrono::Duration::seconds(1);
        let until = now + chrono::Duration::seconds(1);
        let (requeued, ()) = tokio::join!(
            store.enqueue_failed(&endpoint.id, since, until, now),
            expunge.commit_once_waited_for(&store.pool),
        );
        assert_eq!(requeued.expect("recover"), 0, "nothing to recover");
        let later = now + chrono::Duration::minutes(1);
        for first_attempts in [true, false] {
            let lane = ClaimRequest {
                first_attempts,
                ..claim(later, 1, 1, 8)
            };
            assert!(
                store.claim_due(&lane).await.expect("claim").is_empty(),
                "the failed delivery stays failed"
            );
        }
    }

    /// A lease is counted from `delivery_leases` until its record or a take-back removes it: a
    /// manual attempt of a leased delivery frees its endpoint's place at once. And no index of
    /// `deliveries` names the lease columns, so a lease stays a HOT update (migration 0014).
    #[tokio::test]
    async fn a_lease_holds_its_place_until_its_delivery_is_taken_back() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let app = stored_app(&store).await;
        let endpoint = stored_endpoint(&store, &app.id).await;
        let first = conformance::message(&app.id, None);
        let first_id = first.id.clone();
        for message in [first, conformance::message(&app.id, None)] {
            store
                .create_message(message, vec![endpoint.id.clone()])
                .await
                .expect("create");
        }
        let now = Utc::now() + chrono::Duration::seconds(1);
        let leased = store.claim_due(&claim(now, 1, 1, 8)).await.expect("claim");
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].msg_id, first_id, "the earlier message");
        assert!(
            store
                .claim_due(&claim(now, 1, 1, 8))
                .await
                .expect("claim")
                .is_empty(),
            "the endpoint's one place is held"
        );
        store
            .enqueue_manual(&app.id, &first_id, &endpoint.id, now)
            .await
            .expect("take back");
        let next = store.claim_due(&claim(now, 1, 1, 8)).await.expect("claim");
        assert_eq!(next.len(), 1, "the taken-back lease holds no place");

        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT indexdef FROM pg_indexes
             WHERE tablename = 'deliveries' AND schemaname = current_schema()",
        )
        .fetch_all(&store.pool)
        .await
        .expect("indexes");
        assert!(indexes.len() > 3, "{indexes:#?}");
        for index in &indexes {
            assert!(!index.contains("lease"), "{index}");
        }
    }

    /// The health check's count of due deliveries reads each lane's time index, with no index
    /// of both lanes (migration 0013), and counts both lanes.
    #[tokio::test]
    async fn the_count_of_due_deliveries_reads_the_lanes_time_indexes() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let app = stored_app(&store).await;
        let endpoint = stored_endpoint(&store, &app.id).await;
        let now = Utc::now();
        let mut tx = store.pool.begin().await.expect("begin");
        leased_rows(&mut tx, &app.id, &endpoint.id, 20_000, now, now).await;
        // Most deliveries done, a few hundred due in each lane.
        sqlx::query(
            "UPDATE deliveries
             SET lease_token = NULL, leased_until = NULL,
                 status = CASE WHEN lease_token <= 600 THEN 1 ELSE 0 END,
                 next_attempt_at = CASE WHEN lease_token <= 600 THEN next_attempt_at END,
                 attempts = CASE WHEN lease_token <= 300 THEN 1 ELSE 0 END",
        )
        .execute(&mut *tx)
        .await
        .expect("mostly done");
        sqlx::query("ANALYZE deliveries")
            .execute(&mut *tx)
            .await
            .expect("analyze");
        let mut plans = Vec::new();
        for plan_cache_mode in PLAN_CACHE_MODES {
            plan_as(&mut tx, plan_cache_mode).await;
            plans.push(explain_at(&mut tx, DUE_DELIVERIES, now).await);
        }
        let row = sqlx::query(DUE_DELIVERIES)
            .bind(millis(now))
            .fetch_one(&mut *tx)
            .await
            .expect("count");
        assert_eq!(row.get::<i64, _>("n"), 600, "both lanes counted");
        tx.rollback().await.expect("rollback");
        for plan in &plans {
            for index in ["deliveries_due_first", "deliveries_due_retry"] {
                assert!(
                    plan.iter().any(|line| line.contains(index)),
                    "{index}: {plan:#?}"
                );
            }
            assert!(
                !plan.iter().any(|line| line.contains("Seq Scan")),
                "no table scan: {plan:#?}"
            );
        }
    }

    /// A lane's next due time is one walk of its time index in due order that stops at the
    /// first row not in flight, whatever the plan cache does: not a read of the whole lane
    /// (through its by-endpoint index, then sorted or aggregated), which is what a lane holding
    /// one endpoint's long backlog made of every look at an idle lane.
    #[tokio::test]
    async fn the_next_due_time_walks_the_lanes_time_index() {
        let Some(url) = server_url() else { return };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let app = stored_app(&store).await;
        let endpoint = stored_endpoint(&store, &app.id).await;
        let now = Utc::now();
        let mut tx = store.pool.begin().await.expect("begin");
        leased_rows(
            &mut tx,
            &app.id,
            &endpoint.id,
            20_000,
            now,
            now + chrono::Duration::minutes(1),
        )
        .await;
        // A backlog in both lanes, behind a few hundred leases.
        sqlx::query(
            "UPDATE deliveries
             SET lease_token = NULL, leased_until = NULL,
                 attempts = CASE WHEN lease_token % 2 = 0 THEN 1 ELSE 0 END
             WHERE lease_token > 300",
        )
        .execute(&mut *tx)
        .await
        .expect("backlog");
        let mut plans = Vec::new();
        for plan_cache_mode in PLAN_CACHE_MODES {
            plan_as(&mut tx, plan_cache_mode).await;
            for (statement, index) in [
                (NEXT_DUE_FIRST_ATTEMPT, "deliveries_due_first"),
                (NEXT_DUE_RETRY, "deliveries_due_retry"),
            ] {
                plans.push((index, explain_at(&mut tx, statement, now).await));
            }
        }
        tx.rollback().await.expect("rollback");
        for (index, plan) in &plans {
            assert!(
                plan.iter()
                    .any(|line| line.contains(&format!("Index Scan using {index} on"))),
                "the lane's time index, in order: {plan:#?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|line| line.contains("Sort") || line.contains("Aggregate")),
                "read whole: {plan:#?}"
            );
        }
    }

    /// Whether a notification on [`DELIVERIES_CHANNEL`] sent by a session named `sender`
    /// (its `application_name`) arrives within `wait`. Other tests share the server and the
    /// channel (notifications are per database, not per schema): theirs are passed over.
    async fn notified_by(
        listener: &mut PgListener,
        admin: &mut sqlx::PgConnection,
        sender: &str,
        wait: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(received) = tokio::time::timeout_at(deadline, listener.recv()).await {
            let notification = received.expect("listen");
            if notification.channel() != DELIVERIES_CHANNEL {
                continue;
            }
            let pid = i32::try_from(notification.process_id()).expect("a pid");
            let name: Option<String> =
                sqlx::query_scalar("SELECT application_name FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_optional(&mut *admin)
                    .await
                    .expect("pg_stat_activity");
            if name.as_deref() == Some(sender) {
                return true;
            }
        }
        false
    }

    /// A message with an endpoint and a manual enqueue notify DELIVERIES_CHANNEL when they
    /// commit; a message without endpoints queues nothing and notifies nothing.
    #[tokio::test]
    async fn due_deliveries_notify_the_deliveries_channel() {
        let Some(url) = server_url() else { return };
        let (guard, store) = open_in_fresh_schema(url.clone()).await;
        // The store's sessions carry a name of their own, so its notifications can be told
        // from other tests'.
        let sender = format!(
            "herald_notify_{}_{}",
            std::process::id(),
            Utc::now().timestamp_micros()
        );
        let separator = if url.contains('?') { '&' } else { '?' };
        let named = open_in_schema(
            &format!("{url}{separator}application_name={sender}"),
            &guard,
        )
        .await;
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
        let mut listener = PgListener::connect(&url).await.expect("listener");
        listener.listen(DELIVERIES_CHANNEL).await.expect("listen");
        let app = stored_app(&store).await;
        let ep = stored_endpoint(&store, &app.id).await;

        named
            .create_message(message(&app.id), vec![])
            .await
            .expect("a message without endpoints");
        assert!(
            !notified_by(
                &mut listener,
                &mut admin,
                &sender,
                Duration::from_millis(500)
            )
            .await,
            "nothing was queued"
        );

        let msg = message(&app.id);
        named
            .create_message(msg.clone(), vec![ep.id.clone()])
            .await
            .expect("a message to an endpoint");
        assert!(
            notified_by(&mut listener, &mut admin, &sender, Duration::from_secs(5)).await,
            "a message with an endpoint wakes idle nodes"
        );

        named
            .enqueue_manual(&app.id, &msg.id, &ep.id, Utc::now())
            .await
            .expect("enqueue manual");
        assert!(
            notified_by(&mut listener, &mut admin, &sender, Duration::from_secs(5)).await,
            "a manual enqueue wakes idle nodes"
        );
    }
}
