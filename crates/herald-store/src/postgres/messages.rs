//! [`MessageStore`] on PostgreSQL: messages and publications, and the shared delivery queue
//! (claims with leases kept in the rows, fenced attempt records).
//!
//! Every write is one transaction. A message goes in with its first deliveries through
//! [`insert_message`] (shared with ingest and channel webhooks); a publication adds its history
//! entries in the same transaction through `history::append_entries`. A claim is one statement
//! per pass (see `claim_statement`); an attempt record is one transaction: the attempt row
//! always, the delivery's next state and the endpoint change only under the claim's token.
//! Per-endpoint and per-app limits count the request's `in_flight` / `app_in_flight` maps, as
//! the SQLite store does (cluster-wide counting from `deliveries_leased` is a later step).
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
//!   `lease_token = nextval('delivery_lease_tokens'), leased_until = lease_until`.
//!   Indexes: deliveries_due_first / deliveries_due_retry (next_attempt_at, partial per lane),
//!   deliveries_leased (app_id, endpoint_id, leased_until) WHERE lease_token IS NOT NULL (what
//!   is in flight cluster-wide). A record applies only `WHERE lease_token = $token` and clears
//!   lease_token and leased_until; enqueue_manual / enqueue_failed clear them (take back);
//!   `requeue_leased` is for single-node stores only (a shared store's leases expire).
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
use sqlx::{AssertSqlSafe, PgConnection, QueryBuilder, Row, postgres::PgRow};

use super::{
    PostgresStore, paginate,
    rows::{self, millis, opt_json},
};
use crate::{
    AttemptRecord, ClaimRequest, DeliveryJob, EndpointChange, LeaseToken, MessageQuery,
    MessageStore, NextStep, Page, Recorded, Result, StoreError,
};

/// A repeated `(app_id, event_id)`: the same text the SQLite store reports.
pub(super) const MESSAGE_CONFLICT: &str = "a message with this eventId already exists";

/// Inserts `message` and its first deliveries (one per endpoint, due at the message's creation)
/// in the caller's transaction. A message whose id or `(app_id, event_id)` exists already is
/// the eventId [`StoreError::Conflict`], and then nothing is inserted.
pub(super) async fn insert_message(
    conn: &mut sqlx::PgConnection,
    message: &Message,
    endpoint_ids: &[EndpointId],
) -> Result<()> {
    let created = millis(message.created_at);
    let inserted = sqlx::query(
        "INSERT INTO messages (id, app_id, event_id, event_type, channels, tags, payload,
                               created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(message.id.as_str())
    .bind(message.app_id.as_str())
    .bind(&message.event_id)
    .bind(&message.event_type)
    .bind(opt_json(&message.channels))
    .bind(opt_json(&message.tags))
    .bind(message.payload.as_ref())
    .bind(created)
    .fetch_optional(&mut *conn)
    .await?;
    if inserted.is_none() {
        return Err(StoreError::Conflict(MESSAGE_CONFLICT.to_owned()));
    }
    if endpoint_ids.is_empty() {
        return Ok(());
    }
    let endpoints: Vec<&str> = endpoint_ids.iter().map(EndpointId::as_str).collect();
    sqlx::query(
        "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                 next_attempt_at, updated_at)
         SELECT $1, e, $2, $3, 0, $4, $5, $5 FROM UNNEST($6::text[]) AS e",
    )
    .bind(message.id.as_str())
    .bind(message.app_id.as_str())
    .bind(DeliveryStatus::Pending as i32)
    .bind(TriggerType::Scheduled as i32)
    .bind(created)
    .bind(&endpoints)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MessageStore for PostgresStore {
    async fn create_message(&self, message: Message, endpoint_ids: Vec<EndpointId>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_message(&mut tx, &message, &endpoint_ids).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn store_publication(
        &self,
        message: Option<(Message, Vec<EndpointId>)>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<Vec<Position>> {
        let mut tx = self.pool.begin().await?;
        if let Some((message, endpoint_ids)) = &message {
            // A conflict returns here: the transaction rolls back as it is dropped, before any
            // history entry took an offset.
            insert_message(&mut tx, message, endpoint_ids).await?;
        }
        let positions = super::history::append_entries(&mut tx, &history).await?;
        tx.commit().await?;
        Ok(positions)
    }

    async fn get_message(&self, app_id: &AppId, id_or_event_id: &str) -> Result<Option<Message>> {
        sqlx::query(
            "SELECT * FROM messages WHERE app_id = $1 AND (id = $2 OR event_id = $2) \
             ORDER BY id = $2 DESC LIMIT 1",
        )
        .bind(app_id.as_str())
        .bind(id_or_event_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| rows::message(&row))
        .transpose()
    }

    async fn list_messages(
        &self,
        app_id: &AppId,
        page: &Page,
        query: &MessageQuery,
    ) -> Result<Vec<Message>> {
        let mut q = QueryBuilder::new("SELECT * FROM messages WHERE app_id = ");
        q.push_bind(app_id.to_string());
        if let Some(channel) = &query.channel {
            q.push(" AND channels::jsonb ? ");
            q.push_bind(channel.clone());
        }
        if let Some(types) = &query.event_types {
            q.push(" AND event_type = ANY(");
            q.push_bind(types.clone());
            q.push(")");
        }
        if let Some(before) = query.before {
            q.push(" AND created_at < ");
            q.push_bind(millis(before));
        }
        if let Some(after) = query.after {
            q.push(" AND created_at > ");
            q.push_bind(millis(after));
        }
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
    ) -> Result<()> {
        // Clearing the lease takes the delivery back from any claim holding it: that claim's
        // record, fenced on its token, is then stale (the row lock orders the two).
        sqlx::query(
            "INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                     next_attempt_at, updated_at)
             VALUES ($1, $2, $3, $4, 0, $5, $6, $6)
             ON CONFLICT (msg_id, endpoint_id) DO UPDATE
             SET status = excluded.status, trigger_type = excluded.trigger_type,
                 next_attempt_at = excluded.next_attempt_at, updated_at = excluded.updated_at,
                 lease_token = NULL, leased_until = NULL",
        )
        .bind(msg_id.as_str())
        .bind(endpoint_id.as_str())
        .bind(app_id.as_str())
        .bind(DeliveryStatus::Pending as i32)
        .bind(TriggerType::Manual as i32)
        .bind(millis(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn enqueue_failed(
        &self,
        endpoint_id: &EndpointId,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        // Message ids sort by creation time, so a time window is an id range.
        let done = sqlx::query(
            "UPDATE deliveries SET status = $1, trigger_type = $2, next_attempt_at = $3,
                                   updated_at = $3, lease_token = NULL, leased_until = NULL
             WHERE endpoint_id = $4 AND status = $5 AND msg_id >= $6 AND msg_id < $7",
        )
        .bind(DeliveryStatus::Pending as i32)
        .bind(TriggerType::Manual as i32)
        .bind(millis(now))
        .bind(endpoint_id.as_str())
        .bind(DeliveryStatus::Fail as i32)
        .bind(id::lower_bound(id::MESSAGE, since))
        .bind(id::lower_bound(id::MESSAGE, until))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DeliveryJob>> {
        let limit = request.limit as usize;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let statement = claim_statement(request.first_attempts);
        // What this claim takes, on top of what the caller already holds.
        let mut taken_endpoints: HashMap<EndpointId, u32> = HashMap::new();
        let mut taken_apps: HashMap<AppId, u32> = HashMap::new();
        let mut jobs: Vec<DeliveryJob> = Vec::new();
        let mut tx = self.pool.begin().await?;
        for _ in 0..CLAIM_PASSES {
            let endpoints = Held::new(
                &request.in_flight,
                &taken_endpoints,
                request.per_endpoint_limit,
            );
            let apps = Held::new(&request.app_in_flight, &taken_apps, request.per_app_limit);
            let wanted = limit - jobs.len();
            // More candidates than needed: some may belong to an endpoint or app that fills up.
            let fetch = wanted.saturating_mul(4);
            let rows = sqlx::query(AssertSqlSafe(statement.as_str()))
                .bind(millis(request.now))
                .bind(&endpoints.full)
                .bind(&apps.full)
                .bind(i64::try_from(fetch).unwrap_or(i64::MAX))
                .bind(&endpoints.ids)
                .bind(&endpoints.counts)
                .bind(i64::from(request.per_endpoint_limit))
                .bind(&apps.ids)
                .bind(&apps.counts)
                .bind(i64::from(request.per_app_limit))
                .bind(i64::try_from(wanted).unwrap_or(i64::MAX))
                .bind(millis(request.lease_until))
                .fetch_all(&mut *tx)
                .await?;
            let (mut candidates, mut enabled, mut claimed) = (0_i64, 0_i64, 0_i64);
            for row in &rows {
                candidates = row.try_get("n_candidates")?;
                enabled = row.try_get("n_enabled")?;
                // The summary row alone (nothing leased) has no delivery columns.
                if row.try_get::<Option<String>, _>("msg_id")?.is_none() {
                    continue;
                }
                let job = job(row)?;
                *taken_endpoints.entry(job.endpoint.id.clone()).or_insert(0) += 1;
                *taken_apps.entry(job.app_id.clone()).or_insert(0) += 1;
                claimed += 1;
                jobs.push(job);
            }
            // Look again only if rows of endpoints or apps that filled up took candidate places
            // that others' rows, further down the queue, could have had. The next pass leaves
            // the full ones out in the query.
            let crowded_out = enabled > claimed;
            if !crowded_out
                || candidates < i64::try_from(fetch).unwrap_or(i64::MAX)
                || jobs.len() >= limit
            {
                break;
            }
        }
        tx.commit().await?;
        Ok(jobs)
    }

    async fn next_due_at(&self) -> Result<Option<DateTime<Utc>>> {
        // Deliveries under a live lease are in flight, not waiting (as SQLite leaves out its
        // held leases); one whose lease ran out is claimable again, once it is due.
        let row = sqlx::query(
            "SELECT MIN(CASE WHEN lease_token IS NULL THEN next_attempt_at
                             ELSE GREATEST(next_attempt_at, leased_until) END) AS due
             FROM deliveries
             WHERE status IN (1, 3) AND (lease_token IS NULL OR leased_until <= $1)",
        )
        .bind(millis(Utc::now()))
        .fetch_one(&self.pool)
        .await?;
        rows::opt_time(&row, "due")
    }

    async fn record_attempt(&self, record: AttemptRecord) -> Result<Recorded> {
        let a = &record.attempt;
        let mut tx = self.pool.begin().await?;
        // The attempt happened: logged whether or not the lease still holds.
        sqlx::query(
            "INSERT INTO attempts (id, msg_id, endpoint_id, app_id, url, status,
                                   response_status_code, response, response_duration_ms,
                                   trigger_type, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
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
        .execute(&mut *tx)
        .await?;
        // A token beyond BIGINT was never handed out by the sequence: no row holds it.
        let applied = match i64::try_from(record.lease.0) {
            Ok(token) => {
                let (status, next_at) = next_state(record.next);
                // The fence: only while the delivery is still leased under this claim's token
                // (a later claim or a manual enqueue changed or cleared it). Releases the lease.
                sqlx::query(
                    "UPDATE deliveries
                     SET status = $3, next_attempt_at = $4, attempts = attempts + $5,
                         updated_at = $6, lease_token = NULL, leased_until = NULL
                     WHERE msg_id = $1 AND endpoint_id = $2 AND lease_token = $7",
                )
                .bind(a.msg_id.as_str())
                .bind(a.endpoint_id.as_str())
                .bind(status as i32)
                .bind(next_at)
                .bind(i32::from(a.trigger_type == TriggerType::Scheduled))
                .bind(millis(a.created_at))
                .bind(token)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    > 0
            }
            Err(_) => false,
        };
        if applied {
            endpoint_change(
                &mut tx,
                &a.endpoint_id,
                record.endpoint_change,
                millis(a.created_at),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(if applied {
            Recorded::Applied
        } else {
            Recorded::Stale
        })
    }

    async fn requeue_leased(&self, now: DateTime<Utc>) -> Result<u64> {
        // Single-node stores only: every lease is this node's, and nothing is in flight after a
        // restart. A shared store's leases run out instead.
        let done = sqlx::query(
            "UPDATE deliveries SET status = $1, next_attempt_at = $2, lease_token = NULL,
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

/// Queries one claim may make: a pass whose candidates were crowded out by endpoints or apps
/// that filled up is followed by one that leaves those out (as the SQLite store does).
const CLAIM_PASSES: usize = 3;

/// What a claim's endpoints or apps hold (in flight plus taken by earlier passes), as the
/// claim statement's array parameters.
struct Held {
    /// The keys at their limit: the claim leaves their deliveries out.
    full: Vec<String>,
    /// Every key holding something, with its count.
    ids: Vec<String>,
    counts: Vec<i64>,
}

impl Held {
    fn new<K: std::hash::Hash + Eq + AsRef<str>>(
        held: &HashMap<K, u32>,
        taken: &HashMap<K, u32>,
        limit: u32,
    ) -> Self {
        let mut this = Self {
            full: Vec::new(),
            ids: Vec::new(),
            counts: Vec::new(),
        };
        let keys = held
            .keys()
            .chain(taken.keys().filter(|key| !held.contains_key(*key)));
        for key in keys {
            let count = held.get(key).copied().unwrap_or(0) + taken.get(key).copied().unwrap_or(0);
            if count >= limit {
                this.full.push(key.as_ref().to_owned());
            }
            this.ids.push(key.as_ref().to_owned());
            this.counts.push(i64::from(count));
        }
        this
    }
}

/// The claim, one statement for a whole pass. `cand` locks (`SKIP LOCKED`: rows another node
/// is claiming are passed over) the earliest due, unleased or lease-expired rows of the lane,
/// leaving out endpoints and apps already at their limit; of these, `by_endpoint` keeps each
/// endpoint's first `limit - held` rows (disabled endpoints' rows go to `refused`), `by_app`
/// each app's first `limit - held` of those, and `chosen` the earliest `$11` overall — the
/// rows a greedy walk in due order would take, since an endpoint belongs to one app. `leased`
/// gives each a fresh token; `refused` fails disabled endpoints' rows as the SQLite store does.
/// The summary row (candidates, enabled candidates) comes back even when nothing is leased.
///
/// Parameters: $1 now, $2 full endpoints, $3 full apps, $4 candidates to fetch, $5/$6 endpoint
/// ids and held counts, $7 per-endpoint limit, $8/$9 app ids and held counts, $10 per-app
/// limit, $11 rows wanted, $12 lease until.
fn claim_statement(first_attempts: bool) -> String {
    // Literal, not a parameter, so the planner can use the lane's partial index.
    let lane = if first_attempts {
        "d.attempts = 0 AND d.trigger_type = 0"
    } else {
        "NOT (d.attempts = 0 AND d.trigger_type = 0)"
    };
    format!(
        "WITH cand AS (
             SELECT d.msg_id, d.endpoint_id, d.app_id, d.next_attempt_at, e.disabled
             FROM deliveries d JOIN endpoints e ON e.id = d.endpoint_id
             WHERE d.status IN (1, 3) AND d.next_attempt_at <= $1 AND {lane}
               AND (d.lease_token IS NULL OR d.leased_until <= $1)
               AND d.endpoint_id <> ALL($2::text[]) AND d.app_id <> ALL($3::text[])
             ORDER BY d.next_attempt_at
             LIMIT $4
             FOR UPDATE OF d SKIP LOCKED
         ),
         by_endpoint AS (
             SELECT c.msg_id, c.endpoint_id, c.app_id, c.next_attempt_at,
                    row_number() OVER (PARTITION BY c.endpoint_id
                                       ORDER BY c.next_attempt_at, c.msg_id) AS n,
                    $7::bigint - COALESCE(h.held, 0) AS room
             FROM cand c
             LEFT JOIN UNNEST($5::text[], $6::bigint[]) AS h(id, held) ON h.id = c.endpoint_id
             WHERE NOT c.disabled
         ),
         by_app AS (
             SELECT b.msg_id, b.endpoint_id, b.next_attempt_at,
                    row_number() OVER (PARTITION BY b.app_id
                                       ORDER BY b.next_attempt_at, b.msg_id) AS n,
                    $10::bigint - COALESCE(h.held, 0) AS room
             FROM by_endpoint b
             LEFT JOIN UNNEST($8::text[], $9::bigint[]) AS h(id, held) ON h.id = b.app_id
             WHERE b.n <= b.room
         ),
         chosen AS (
             SELECT msg_id, endpoint_id FROM by_app WHERE n <= room
             ORDER BY next_attempt_at, msg_id
             LIMIT $11
         ),
         refused AS (
             UPDATE deliveries d
             SET status = 2, next_attempt_at = NULL, updated_at = $1,
                 lease_token = NULL, leased_until = NULL
             FROM cand c
             WHERE c.disabled AND d.msg_id = c.msg_id AND d.endpoint_id = c.endpoint_id
         ),
         leased AS (
             UPDATE deliveries d
             SET lease_token = nextval('delivery_lease_tokens'), leased_until = $12
             FROM chosen c
             WHERE d.msg_id = c.msg_id AND d.endpoint_id = c.endpoint_id
             RETURNING d.msg_id, d.endpoint_id, d.attempts, d.trigger_type, d.lease_token,
                       d.next_attempt_at
         ),
         summary AS (
             SELECT COUNT(*) AS n_candidates,
                    COUNT(*) FILTER (WHERE NOT disabled) AS n_enabled
             FROM cand
         )
         SELECT s.n_candidates, s.n_enabled,
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
fn job(row: &PgRow) -> Result<DeliveryJob> {
    let payload: Vec<u8> = row.try_get("payload")?;
    let token: i64 = row.try_get("lease_token")?;
    Ok(DeliveryJob {
        msg_id: rows::id(row, "msg_id")?,
        app_id: rows::id(row, "m_app_id")?,
        event_type: row.try_get("event_type")?,
        payload: payload.into(),
        endpoint: rows::endpoint(row, "e_")?,
        attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(u32::MAX),
        trigger: TriggerType::from_code(i64::from(row.try_get::<i32, _>("trigger_type")?)),
        lease: LeaseToken(
            u64::try_from(token)
                .map_err(|_| StoreError::Corrupt(format!("lease token {token}")))?,
        ),
    })
}

/// The delivery's status and due time after an attempt (as the SQLite store's).
fn next_state(next: NextStep) -> (DeliveryStatus, Option<i64>) {
    match next {
        NextStep::Delivered => (DeliveryStatus::Success, None),
        NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(millis(at))),
        NextStep::Failed => (DeliveryStatus::Fail, None),
    }
}

/// Applies an applied record's change to the endpoint, in its transaction.
async fn endpoint_change(
    conn: &mut PgConnection,
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
                "UPDATE endpoints SET disabled = TRUE, updated_at = GREATEST(updated_at + 1, $2)
                 WHERE id = $1",
            )
            .bind(endpoint_id.as_str())
            .bind(now)
        }
    };
    update.execute(&mut *conn).await?;
    Ok(())
}
