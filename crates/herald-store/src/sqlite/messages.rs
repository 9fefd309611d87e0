//! [`MessageStore`] on SQLite: messages and publications (through the group commit) and the
//! delivery queue: manual attempts, claims within the per-endpoint and per-app limits (leases
//! kept in memory), attempt records and the requeue at start.

use herald_core::{AppId, EndpointId, MessageId};
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use herald_core::{
    history::{NewHistoryEntry, Position},
    id,
    model::{DeliveryStatus, Message, TriggerType},
};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{
    SqliteStore,
    batch::{STALE_LEASE, WriteOp},
    gate::{MAX_QUIET, Plan, Summary},
    leases::DeliveryKey,
    paginate,
    rows::{self, millis, to_json},
};
use crate::{
    AttemptRecord, ClaimRequest, DeliveryJob, MessageQuery, MessageStore, Page, QueuedCommit,
    Recorded, Result, StoreError, sql,
};

#[async_trait::async_trait]
impl MessageStore for SqliteStore {
    async fn create_message(&self, message: Message, endpoint_ids: Vec<EndpointId>) -> Result<()> {
        let app_id = message.app_id.clone();
        match self
            .submit(WriteOp::CreateMessage(
                self.new_message(message, endpoint_ids),
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(crate::unless_app_gone(self, &app_id, e).await),
        }
    }

    async fn store_publication(
        &self,
        message: Option<(Message, Vec<EndpointId>)>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<Vec<Position>> {
        let message = message.map(|(message, targets)| self.new_message(message, targets));
        self.submit(WriteOp::Publication { message, history }).await
    }

    async fn queue_publication(
        &self,
        message: Option<(Message, Vec<EndpointId>)>,
        history: Vec<NewHistoryEntry>,
    ) -> Result<QueuedCommit<Vec<Position>>> {
        let message = message.map(|(message, targets)| self.new_message(message, targets));
        // In the writer's queue once this returns: its offsets are fixed relative to every
        // other write's, though not yet assigned.
        let outcome = self
            .enqueue(WriteOp::Publication { message, history })
            .await?;
        Ok(Box::pin(async move {
            outcome.await.map_err(|_| StoreError::Closed)?
        }))
    }

    async fn get_message(&self, app_id: &AppId, id_or_event_id: &str) -> Result<Option<Message>> {
        sqlx::query(sql::GET_MESSAGE)
            .bind(app_id.as_str())
            .bind(id_or_event_id)
            .fetch_optional(&self.reader)
            .await?
            .map(|row| rows::message(&row))
            .transpose()
    }

    async fn get_messages(&self, app_id: &AppId, ids: &[MessageId]) -> Result<Vec<Message>> {
        let ids: Vec<&str> = ids.iter().map(MessageId::as_str).collect();
        sqlx::query(
            "SELECT * FROM messages WHERE app_id = $1
             AND id IN (SELECT value FROM json_each($2))",
        )
        .bind(app_id.as_str())
        .bind(to_json(&ids))
        .fetch_all(&self.reader)
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
            .fetch_all(&self.reader)
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
        // Held until the lease is revoked: see `take_back`.
        let mut writer = self.writer.acquire().await?;
        let queued = sqlx::query(concat!(
            sql::resend_insert!(""),
            sql::resend_set!("MIN"),
            " RETURNING msg_id"
        ))
        .bind(msg_id.as_str())
        .bind(endpoint_id.as_str())
        .bind(app_id.as_str())
        .bind(DeliveryStatus::Pending as i64)
        .bind(TriggerType::Manual as i64)
        .bind(millis(now))
        .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
        .fetch_optional(&mut *writer)
        .await?
        .is_some();
        if queued {
            self.take_back(writer, &[(msg_id.to_owned(), endpoint_id.to_owned())]);
            self.gate.stir();
        }
        Ok(queued)
    }

    async fn enqueue_failed(
        &self,
        endpoint_id: &EndpointId,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        // In batches, each its own statement on the writer, which other writes (the group
        // commit's above all) take in between: a recovery of a long outage can be millions of
        // rows. Paged by message id, so a row this recovery requeued that has failed again
        // meanwhile (an attempt between two batches) is not requeued twice.
        let mut requeued_total = 0_u64;
        let mut after = id::lower_bound(id::MESSAGE, since);
        loop {
            // Held until the leases are revoked: see `take_back`.
            let mut writer = self.writer.acquire().await?;
            // Message ids sort by creation time, so a time window is an id range: a seek in
            // deliveries_endpoint_unsettled, which `status <> 0` lets SQLite use. A message
            // whose payload expired stays failed: a retry never sends `{"expired":true}`.
            let requeued = sqlx::query(
                "UPDATE deliveries SET status = $1, trigger_type = $2, next_attempt_at = $3,
                                       updated_at = $3
                 WHERE rowid IN (
                     SELECT rowid FROM deliveries
                     WHERE endpoint_id = $4 AND status <> 0 AND status = $5
                       AND msg_id > $6 AND msg_id < $7
                       AND NOT EXISTS (SELECT 1 FROM messages m
                                       WHERE m.id = deliveries.msg_id
                                         AND (m.payload = $9 OR m.payload_expires_at <= $3))
                     ORDER BY msg_id
                     LIMIT $8)
                 RETURNING msg_id",
            )
            .bind(DeliveryStatus::Pending as i64)
            .bind(TriggerType::Manual as i64)
            .bind(millis(now))
            .bind(endpoint_id.as_str())
            .bind(DeliveryStatus::Fail as i64)
            .bind(&after)
            .bind(id::lower_bound(id::MESSAGE, until))
            .bind(i64::from(crate::RETENTION_BATCH))
            .bind(herald_core::model::EXPIRED_PAYLOAD.as_bytes())
            .fetch_all(&mut *writer)
            .await?;
            let keys = requeued
                .iter()
                .map(|row| Ok((rows::id(row, "msg_id")?, endpoint_id.clone())))
                .collect::<Result<Vec<DeliveryKey>>>()?;
            if let Some(last) = keys.iter().map(|(msg_id, _)| msg_id.as_str()).max() {
                after = last.to_owned();
            }
            self.take_back(writer, &keys);
            self.gate.stir();
            requeued_total += keys.len() as u64;
            if keys.len() < crate::RETENTION_BATCH as usize {
                return Ok(requeued_total);
            }
            tokio::task::yield_now().await;
        }
    }

    async fn claim_due(&self, request: &ClaimRequest) -> Result<Vec<DeliveryJob>> {
        // Read before anything else: a change after this point keeps the claim from leaving
        // a summary that could have missed it.
        let generation = self.gate.generation();
        match self.gate.plan(request) {
            Plan::Nothing => Ok(Vec::new()),
            Plan::Endpoints(endpoints) => {
                self.claim_of_endpoints(request, generation, endpoints)
                    .await
            }
            Plan::Everything => self.claim_everything(request, generation).await,
        }
    }

    async fn next_due_at(&self, first_attempts: bool) -> Result<Option<DateTime<Utc>>> {
        if let Some(due) = self.gate.next_due(Utc::now(), first_attempts) {
            return Ok(Some(due));
        }
        // Leased deliveries are in flight, not waiting: counting them would make everything
        // look due already, and the dispatcher would sleep through the next real due time.
        let row = sqlx::query(
            "SELECT MIN(next_attempt_at) AS due FROM deliveries
             WHERE status IN (1, 3) AND ((attempts = 0 AND trigger_type = 0) = $2)
               AND rowid NOT IN (SELECT value FROM json_each($1))",
        )
        .bind(to_json(&self.leases.held(Utc::now())))
        .bind(first_attempts)
        .fetch_one(&self.reader)
        .await?;
        row.try_get::<Option<i64>, _>("due")?
            .map(rows::time)
            .transpose()
    }

    async fn due_deliveries(&self, now: DateTime<Utc>) -> Result<crate::DueDeliveries> {
        let row = sqlx::query(crate::sql::DUE_DELIVERIES)
            .bind(millis(now))
            .fetch_one(&self.reader)
            .await?;
        Ok(crate::DueDeliveries {
            count: u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0),
            oldest_due_at: row
                .try_get::<Option<i64>, _>("oldest")?
                .map(rows::time)
                .transpose()?,
        })
    }

    async fn record_attempt(&self, record: AttemptRecord) -> Result<Recorded> {
        // Any change of the endpoint's row: disabling changes which endpoints a message goes
        // to, and a failing streak's start or end is what the next first attempts (handed over
        // with the cached endpoint) must decide from. Both are rare: a state change, not an
        // attempt.
        let changes_endpoint = record.endpoint_change != crate::EndpointChange::Unchanged;
        let retries = matches!(record.next, crate::NextStep::RetryAt(_))
            || matches!(
                record.endpoint_change,
                crate::EndpointChange::Disable {
                    retry_at: Some(_),
                    ..
                }
            );
        let key = (
            record.attempt.msg_id.clone(),
            record.attempt.endpoint_id.clone(),
        );
        let token = record.lease;
        // The group commit checks the lease when it applies the record (inside the
        // transaction), not here: the lease may run out while the record waits for its commit.
        let result = self
            .submit(WriteOp::RecordAttempt {
                record,
                leases: self.leases.clone(),
            })
            .await;
        // Released after the commit: the delivery's new state is visible before it is
        // claimable again. Only this claim's lease: a later claim's stays. A record that did
        // not apply keeps it until it runs out, as on PostgreSQL: the attempt is then made
        // again, a lease later. Released at once, the delivery was claimed and sent again at
        // once, and again, for as long as records failed (a full disk, a failed fsync), with
        // its attempts never counted, so it never reached the retry schedule or gave up.
        if result.is_ok() {
            self.leases.release(&key, token);
            // A retry is claimable when it falls due: after the release.
            if retries {
                self.gate.stir();
            }
        }
        let recorded = match result {
            Ok(_) => Recorded::Applied,
            Err(StoreError::Conflict(reason)) if reason == STALE_LEASE => {
                return Ok(Recorded::Stale);
            }
            Err(e) => return Err(e),
        };
        if changes_endpoint {
            self.cache.invalidate();
        }
        Ok(recorded)
    }

    async fn release_unattempted(&self, jobs: &[DeliveryJob]) -> Result<u64> {
        // Leases live in memory (see `leases`): releasing one is all it takes, and the rows'
        // `pending` state and due times are what they were at the claim.
        let released = jobs
            .iter()
            .filter(|job| {
                self.leases
                    .release(&(job.msg_id.clone(), job.endpoint.id.clone()), job.lease)
            })
            .count();
        if released > 0 {
            self.gate.stir();
        }
        Ok(released as u64)
    }

    async fn requeue_leased(&self, now: DateTime<Utc>) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE deliveries SET status = $1, next_attempt_at = $2 WHERE status = $3",
        )
        .bind(DeliveryStatus::Pending as i64)
        .bind(millis(now))
        .bind(DeliveryStatus::Sending as i64)
        .execute(&self.writer)
        .await?;
        self.gate.stir();
        Ok(done.rows_affected())
    }

    fn hand_fresh_deliveries_to(&self, to: std::sync::Arc<dyn crate::FreshDeliveries>) {
        if self.fresh.set(to).is_err() {
            tracing::warn!("new deliveries already go to a dispatcher; a second one gets none");
        }
    }
}

/// The start of a claim's query: the delivery, its message and its endpoint, for due
/// deliveries of the lane (`$2`) not leased (`$3`, rowids).
macro_rules! claim_query {
    () => {
        "SELECT d.rowid AS d_rowid, d.msg_id, d.attempts, d.trigger_type,
        m.app_id AS m_app_id, m.event_type,
        m.payload, e.id AS e_id, e.app_id AS e_app_id, e.uid AS e_uid,
        e.url AS e_url, e.description AS e_description,
        e.throttle_rate AS e_throttle_rate, e.disabled AS e_disabled,
        e.event_types AS e_event_types, e.channels AS e_channels,
        e.metadata AS e_metadata, e.headers AS e_headers, e.secret AS e_secret,
        e.previous_secrets AS e_previous_secrets,
        e.failing_since AS e_failing_since, e.created_at AS e_created_at,
        e.updated_at AS e_updated_at, e.format AS e_format
 FROM deliveries d
 JOIN messages m ON m.id = d.msg_id
 JOIN endpoints e ON e.id = d.endpoint_id
 WHERE d.status IN (1, 3) AND d.next_attempt_at <= $1
   AND ((d.attempts = 0 AND d.trigger_type = 0) = $2)
   AND d.rowid NOT IN (SELECT value FROM json_each($3))"
    };
}

/// One endpoint's due deliveries of a lane, earliest first: a seek on
/// `deliveries_due_by_endpoint`.
pub(super) const CLAIM_OF_ENDPOINT: &str = concat!(
    claim_query!(),
    " AND d.endpoint_id = $4
     ORDER BY d.next_attempt_at
     LIMIT CAST($5 AS BIGINT)"
);

/// A due delivery a claim read.
enum Candidate {
    Job {
        rowid: i64,
        job: Box<DeliveryJob>,
    },
    /// Its endpoint is disabled, or its secret does not open: marked failed instead.
    Refused {
        rowid: i64,
    },
}

impl SqliteStore {
    fn candidate(&self, row: &sqlx::sqlite::SqliteRow) -> Result<Candidate> {
        let rowid: i64 = row.try_get("d_rowid")?;
        // From the cache when it holds the endpoint's app (the publisher keeps it filled): the
        // row's copy would be decoded and its secret decrypted for every delivery claimed. The
        // cache is exact (every change of an endpoint's row invalidates it), so either copy is
        // the endpoint as last committed.
        let cached = self
            .cache
            .endpoint(row.try_get("e_app_id")?, row.try_get("e_id")?);
        let endpoint = match cached.map_or_else(|| rows::endpoint(row, "e_", &self.keys), Ok) {
            Ok(endpoint) => endpoint,
            // One endpoint whose secret does not open (a key this node lacks, a tampered
            // value) must not stop every delivery behind it: its delivery fails (recoverable
            // once the key is back) and the claim goes on.
            Err(StoreError::Secret(e)) => {
                tracing::error!(error = %e, "a delivery's endpoint secret cannot be decrypted; the delivery is marked failed");
                return Ok(Candidate::Refused { rowid });
            }
            Err(e) => return Err(e),
        };
        if endpoint.disabled {
            // Disabled endpoints receive nothing; the delivery stays recoverable as failed.
            return Ok(Candidate::Refused { rowid });
        }
        let payload: Vec<u8> = row.try_get("payload")?;
        Ok(Candidate::Job {
            rowid,
            job: Box::new(DeliveryJob {
                msg_id: rows::id(row, "msg_id")?,
                app_id: rows::id(row, "m_app_id")?,
                event_type: row.try_get("event_type")?,
                payload: payload.into(),
                endpoint,
                attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                trigger: TriggerType::from_code(row.try_get("trigger_type")?),
                lease: self.leases.new_token(),
            }),
        })
    }

    /// A claim over the whole queue, earliest due first, in up to [`CLAIM_PASSES`] queries.
    /// If it took everything it could, it leaves the gate a summary of what is left.
    async fn claim_everything(
        &self,
        request: &ClaimRequest,
        generation: u64,
    ) -> Result<Vec<DeliveryJob>> {
        let limit = request.limit as usize;
        // What this claim takes, on top of what the caller already holds.
        let mut taken_endpoints: HashMap<EndpointId, u32> = HashMap::new();
        let mut taken_apps: HashMap<AppId, u32> = HashMap::new();
        let mut jobs = Vec::new();
        let mut leased: Vec<i64> = Vec::new();
        let mut refused: Vec<i64> = Vec::new();
        // Before the read: a delivery released after this is not taken (see `leases`).
        let mark = self.leases.mark();
        let mut passed: Vec<i64> = self.leases.held(request.now);
        // Whether every due delivery not left out was read: then what is left belongs to the
        // endpoints and apps at their limits.
        let mut complete = false;
        for _ in 0..CLAIM_PASSES {
            let full_endpoints = at_limit(
                &request.in_flight,
                &taken_endpoints,
                request.per_endpoint_limit,
            );
            let full_apps = at_limit(&request.app_in_flight, &taken_apps, request.per_app_limit);
            // Fetch more candidates than needed: some may belong to an endpoint or app that
            // fills up.
            let fetch = (limit - jobs.len()) * 4;
            let candidates = sqlx::query(concat!(
                claim_query!(),
                " AND d.endpoint_id NOT IN (SELECT value FROM json_each($4))
                  AND d.app_id NOT IN (SELECT value FROM json_each($5))
                 ORDER BY d.next_attempt_at
                 LIMIT CAST($6 AS BIGINT)"
            ))
            .bind(millis(request.now))
            .bind(request.first_attempts)
            .bind(to_json(&passed))
            .bind(as_json(&full_endpoints))
            .bind(as_json(&full_apps))
            .bind(i64::try_from(fetch).unwrap_or(i64::MAX))
            .fetch_all(&self.reader)
            .await?;

            // Rows left because their endpoint or app filled up during this pass.
            let mut crowded_out = false;
            let mut read_all = true;
            for row in &candidates {
                if jobs.len() >= limit {
                    read_all = false;
                    break;
                }
                let (rowid, job) = match self.candidate(row)? {
                    Candidate::Refused { rowid } => {
                        refused.push(rowid);
                        passed.push(rowid);
                        continue;
                    }
                    Candidate::Job { rowid, job } => (rowid, job),
                };
                let endpoint_held = request
                    .in_flight
                    .get(&job.endpoint.id)
                    .copied()
                    .unwrap_or(0)
                    + taken_endpoints.get(&job.endpoint.id).copied().unwrap_or(0);
                let app_held = request.app_in_flight.get(&job.app_id).copied().unwrap_or(0)
                    + taken_apps.get(&job.app_id).copied().unwrap_or(0);
                if endpoint_held >= request.per_endpoint_limit || app_held >= request.per_app_limit
                {
                    crowded_out = true;
                    continue;
                }
                *taken_endpoints.entry(job.endpoint.id.clone()).or_insert(0) += 1;
                *taken_apps.entry(job.app_id.clone()).or_insert(0) += 1;
                leased.push(rowid);
                passed.push(rowid);
                jobs.push(*job);
            }
            complete = read_all && candidates.len() < fetch && jobs.len() < limit;
            // Look again only if rows of endpoints or apps that filled up took candidate places
            // that others' rows, further down the queue, could have had. The next pass leaves
            // the full ones out in the query.
            if !crowded_out || candidates.len() < fetch || jobs.len() >= limit {
                break;
            }
        }
        // Refused first: if that fails, nothing is leased in memory for a claim that returns
        // an error (its jobs would wait for their leases to run out).
        self.refuse(&refused, request.now).await?;
        let jobs = self
            .leases
            .take(jobs, &leased, request.lease_until, request.now, &mark);
        drop(mark);
        if complete {
            let summary = Summary {
                until: self.quiet_until(request.now).await?,
                endpoints: at_limit(
                    &request.in_flight,
                    &taken_endpoints,
                    request.per_endpoint_limit,
                )
                .into_iter()
                .cloned()
                .collect(),
                apps: at_limit(&request.app_in_flight, &taken_apps, request.per_app_limit)
                    .into_iter()
                    .cloned()
                    .collect(),
            };
            self.gate
                .settle(generation, request.first_attempts, summary);
        }
        Ok(jobs)
    }

    /// A claim of the deliveries of a few endpoints only (held back before, with room now),
    /// each an index seek: what the gate knows says nothing else is claimable.
    async fn claim_of_endpoints(
        &self,
        request: &ClaimRequest,
        generation: u64,
        endpoints: Vec<EndpointId>,
    ) -> Result<Vec<DeliveryJob>> {
        // Before the read: a delivery released after this is not taken (see `leases`).
        let mark = self.leases.mark();
        let held = to_json(&self.leases.held(request.now));
        let mut room_left = request.limit;
        let mut jobs = Vec::new();
        let mut leased = Vec::new();
        let mut refused = Vec::new();
        for endpoint_id in endpoints {
            let endpoint_room = request
                .per_endpoint_limit
                .saturating_sub(request.in_flight.get(&endpoint_id).copied().unwrap_or(0));
            let app_room = |app: &AppId| {
                request
                    .per_app_limit
                    .saturating_sub(request.app_in_flight.get(app).copied().unwrap_or(0))
            };
            let want = endpoint_room.min(room_left);
            if want == 0 {
                continue;
            }
            let rows = sqlx::query(CLAIM_OF_ENDPOINT)
                .bind(millis(request.now))
                .bind(request.first_attempts)
                .bind(&held)
                .bind(endpoint_id.as_str())
                .bind(i64::from(want))
                .fetch_all(&self.reader)
                .await?;
            let mut taken = 0;
            // Rows its app had no room for: still claimable, so the endpoint is not drained.
            let mut left_for_app = false;
            for row in &rows {
                match self.candidate(row)? {
                    Candidate::Refused { rowid } => refused.push(rowid),
                    // The app's room is counted with what this claim took of it before.
                    Candidate::Job { rowid, job }
                        if app_room(&job.app_id)
                            > jobs
                                .iter()
                                .filter(|j: &&DeliveryJob| j.app_id == job.app_id)
                                .count() as u32 =>
                    {
                        leased.push(rowid);
                        jobs.push(*job);
                        taken += 1;
                    }
                    Candidate::Job { .. } => left_for_app = true,
                }
            }
            if rows.len() < want as usize && !left_for_app {
                // Everything it had due is taken now (or refused).
                self.gate
                    .drained(generation, request.first_attempts, &endpoint_id);
            }
            room_left = room_left.saturating_sub(taken);
        }
        self.refuse(&refused, request.now).await?;
        let jobs = self
            .leases
            .take(jobs, &leased, request.lease_until, request.now, &mark);
        Ok(jobs)
    }

    /// Marks failed the deliveries a claim made at `now` would not send (disabled endpoint,
    /// secret that does not open), unless one changed since the claim read it: a delivery
    /// resent meanwhile (its endpoint enabled again) is the resend's, and stays due.
    pub(super) async fn refuse(&self, refused: &[i64], now: DateTime<Utc>) -> Result<()> {
        if refused.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE deliveries SET status = $1, next_attempt_at = NULL, updated_at = $2
             WHERE rowid IN (SELECT value FROM json_each($3))
               AND status IN (1, 3) AND updated_at <= $2",
        )
        .bind(DeliveryStatus::Fail as i64)
        .bind(millis(now))
        .bind(to_json(&refused))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// How long a summary made now may stand: until the next delivery falls due (a retry), the
    /// first lease runs out, or [`MAX_QUIET`] has passed, whichever comes first.
    async fn quiet_until(&self, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
        let next_due: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(next_attempt_at) FROM deliveries
             WHERE status IN (1, 3) AND next_attempt_at > $1",
        )
        .bind(millis(now))
        .fetch_one(&self.reader)
        .await?;
        let mut until = now + chrono::Duration::from_std(MAX_QUIET).unwrap_or_default();
        if let Some(due) = next_due.map(rows::time).transpose()? {
            until = until.min(due);
        }
        if let Some(expiry) = self.leases.first_expiry() {
            until = until.min(expiry);
        }
        Ok(until)
    }
}

impl SqliteStore {
    /// Takes manually enqueued deliveries back from the claims holding them, once the enqueue
    /// has committed and before `writer` (the single writer connection) goes back to the pool.
    ///
    /// Why: an attempt in flight when its delivery is resent (or recovered) must not have the
    /// last word. Left leased, its record would still apply and overwrite the manual request
    /// (say, with `Failed`), so the resend the API acknowledged would never happen. Revoked,
    /// the record is stale: logged, but changing neither the delivery nor the endpoint.
    ///
    /// Why here: the group commit checks a record's lease in its transaction on that same
    /// connection, so it runs wholly before the enqueue (the lease holds, the record applies,
    /// and the enqueue's row change then overwrites it) or wholly after the revocation (the
    /// record is stale). Revoking before the commit instead would let a claim lease the
    /// delivery from its row as it was before the enqueue, and that claim's record would then
    /// overwrite the manual request. A claim whose read began before the enqueue committed does
    /// not take the delivery, leased then or not (its read may predate the change: an expunge
    /// fails the delivery); the next claim takes a resend.
    pub(super) fn take_back(
        &self,
        writer: sqlx::pool::PoolConnection<sqlx::Sqlite>,
        keys: &[DeliveryKey],
    ) {
        self.leases.revoke(keys);
        drop(writer);
    }
}

/// Queries one claim may make: a pass whose candidates were crowded out by endpoints or apps
/// that filled up is followed by one that leaves those out.
const CLAIM_PASSES: usize = 3;

/// The keys whose count, held already plus taken by this claim, has reached `limit`: a claim
/// leaves their deliveries out in the query.
fn at_limit<'a, K: std::hash::Hash + Eq + AsRef<str>>(
    held: &'a HashMap<K, u32>,
    taken: &'a HashMap<K, u32>,
    limit: u32,
) -> Vec<&'a K> {
    let count =
        |key: &K| held.get(key).copied().unwrap_or(0) + taken.get(key).copied().unwrap_or(0);
    held.keys()
        .chain(taken.keys().filter(|key| !held.contains_key(*key)))
        .filter(|key| count(key) >= limit)
        .collect()
}

/// [`at_limit`]'s keys as the JSON array a claim query leaves out.
fn as_json<K: AsRef<str>>(keys: &[&K]) -> String {
    to_json(
        &keys
            .iter()
            .map(|key| (*key).as_ref())
            .collect::<Vec<&str>>(),
    )
}

/// Adds to `q` the terms of `filter` on the messages of the table or alias `table`; a time
/// window also bounds `id_column`, the message ids the read walks ([`sql::push_id_window`]).
pub(super) fn push_message_filters(
    q: &mut QueryBuilder<Sqlite>,
    table: &str,
    id_column: &str,
    filter: &MessageQuery,
) {
    if let Some(channel) = &filter.channel {
        q.push(format_args!(
            " AND EXISTS (SELECT 1 FROM json_each({table}.channels) WHERE value = "
        ));
        q.push_bind(channel.clone());
        q.push(")");
    }
    if let Some(tag) = &filter.tag {
        q.push(format_args!(
            " AND EXISTS (SELECT 1 FROM json_each({table}.tags) WHERE value = "
        ));
        q.push_bind(tag.clone());
        q.push(")");
    }
    if let Some(types) = &filter.event_types {
        q.push(format_args!(
            " AND {table}.event_type IN (SELECT value FROM json_each("
        ));
        q.push_bind(to_json(types));
        q.push("))");
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
