//! The group commit of the hot writes on PostgreSQL: message creates from the Svix API and
//! attempt records whose endpoint does not change.
//!
//! Each of these was a statement committed on its own, so every message cost PostgreSQL two
//! commits (the create and its attempt record), each a WAL flush, a round trip and a backend
//! wake-up; at 64 creates in flight those commits filled the database's share of the CPU, and
//! the records, outnumbered by the creates waiting for the same backends, held an endpoint's
//! leases for 50-80 ms each, so one endpoint's delivery fell behind its intake.
//!
//! Now callers queue their write here, and a task takes every write waiting into a batch, in
//! arrival order, and commits it as one statement: creates with [`CREATE_MESSAGES`], records
//! with [`RECORD_ATTEMPTS`] (arrays unnested into rows; in a transaction that keeps its plan
//! on the deliveries' key, [`BEGIN_RECORDS`]). Creates and records have a task and a
//! queue each ([`Batches`]), so a record, which holds an endpoint's lease
//! until it commits, never waits behind a crowd of creates. Each task runs up to
//! [`BATCHES_IN_FLIGHT`] batches at once, each on a connection of its own; while they run, the
//! next batch gathers. A caller is answered once its statement has committed, so a message is
//! durable before its 201 as before. A write alone is a batch of one: no timer holds it back.
//!
//! A batch's statement fails as a whole (an endpoint deleted between the create's read and
//! its insert breaks the deliveries' foreign key; a deadlock with a manual resend): then its
//! writes are applied one by one with the single-write statements, so each caller gets its own
//! outcome, exactly what it would have got unbatched.

use std::{collections::HashSet, sync::Arc, time::Instant};

use herald_core::{
    EndpointId,
    model::{DeliveryStatus, Message, TriggerType},
};
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    messages::{self, MESSAGE_CONFLICT},
    rows::{millis, opt_json},
    wake::DueNotifier,
};
use crate::{AttemptRecord, Result, StoreError};

/// Batches running at once, each on its own connection (the pool's other connections serve
/// claims, reads and the transactions of publications and ingest).
const BATCHES_IN_FLIGHT: usize = 4;

/// Writes in one batch at most: bounds a statement's parameters and a batch's latency.
const MAX_BATCH: usize = 512;

/// Writes waiting for a batch at most; a caller beyond waits to queue (back-pressure).
const QUEUE: usize = 4096;

/// Every message of the batch, and its first deliveries only if the message went in (a
/// repeated `(app_id, event_id)` goes in once, the first in the arrays; its later copies get
/// the eventId conflict). Returns the ids inserted. The deliveries' arrays are flat: one entry
/// per (message, endpoint).
const CREATE_MESSAGES: &str = concat!(
    "WITH inserted AS (
         INSERT INTO messages (id, app_id, event_id, event_type, channels, tags, payload,
                               created_at, payload_expires_at)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::bytea[], $8::bigint[], $9::bigint[])
         ON CONFLICT DO NOTHING RETURNING id, app_id, created_at
     ), queued AS (
         INSERT INTO deliveries (msg_id, endpoint_id, app_id, status, attempts, trigger_type,
                                 next_attempt_at, updated_at)
         SELECT inserted.id, d.endpoint_id, inserted.app_id, $12, 0, $13, ",
    first_attempt_due!("inserted.created_at"),
    ", inserted.created_at
         FROM UNNEST($10::text[], $11::text[]) AS d(msg_id, endpoint_id)
         JOIN inserted ON inserted.id = d.msg_id
     )
     SELECT id FROM inserted"
);

/// Every attempt row of the batch (they happened), and each delivery's next state only while
/// it is still leased under its record's token (the fence of `messages::RECORD_ATTEMPT`),
/// which releases the lease. Returns the ids of the attempts whose delivery moved; a record
/// whose attempt is not among them is stale. A delivery has one lease at a time, so no two
/// records of a batch move the same row.
const RECORD_ATTEMPTS: &str = "WITH logged AS (
         INSERT INTO attempts (id, msg_id, endpoint_id, app_id, url, status,
                               response_status_code, response, response_duration_ms,
                               trigger_type, created_at)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::int[], $7::int[], $8::text[], $9::bigint[], $10::int[],
                              $11::bigint[])
     ), moved AS (
         UPDATE deliveries AS d
         SET status = r.status, next_attempt_at = r.next_at, attempts = d.attempts + r.counted,
             updated_at = r.at, lease_token = NULL, leased_until = NULL
         FROM UNNEST($1::text[], $2::text[], $3::text[], $12::int[], $13::bigint[],
                     $14::int[], $11::bigint[], $15::bigint[])
              AS r(attempt_id, msg_id, endpoint_id, status, next_at, counted, at, token)
         WHERE d.msg_id = r.msg_id AND d.endpoint_id = r.endpoint_id
           AND d.lease_token = r.token
         RETURNING r.attempt_id
     ), released AS (
         DELETE FROM delivery_leases l
         USING UNNEST($2::text[], $3::text[], $15::bigint[]) AS r(msg_id, endpoint_id, token)
         WHERE l.msg_id = r.msg_id AND l.endpoint_id = r.endpoint_id AND l.lease_token = r.token
     )
     SELECT attempt_id FROM moved";

/// A write waiting for its batch, and where its outcome goes.
struct Queued<W, T> {
    write: W,
    reply: oneshot::Sender<Result<T>>,
}

/// A message to create with its first deliveries (`MessageStore::create_message`).
struct NewMessage {
    message: Message,
    endpoint_ids: Vec<EndpointId>,
}

type Create = Queued<NewMessage, ()>;
/// An attempt record whose endpoint does not change; its outcome is whether the fence held.
type Record = Queued<AttemptRecord, bool>;

/// Where a batch reports its commits (the store's `observe_commits`, set once).
pub(crate) type CommitMetrics = Arc<std::sync::OnceLock<Arc<herald_metrics::StoreMetrics>>>;

/// The queues of the two group commits. Their tasks end once this is dropped and the batches
/// they started have answered.
pub(crate) struct Batches {
    creates: mpsc::Sender<Create>,
    records: mpsc::Sender<Record>,
}

impl Batches {
    pub(super) fn start(pool: &PgPool, metrics: &CommitMetrics, due: &Arc<DueNotifier>) -> Self {
        let creates = {
            let (pool, metrics, due) = (pool.clone(), Arc::clone(metrics), Arc::clone(due));
            spawn(move |batch| {
                apply_creates(pool.clone(), batch, Arc::clone(&metrics), Arc::clone(&due))
            })
        };
        let records = {
            let (pool, metrics) = (pool.clone(), Arc::clone(metrics));
            spawn(move |batch| apply_records(pool.clone(), batch, Arc::clone(&metrics)))
        };
        Self { creates, records }
    }

    /// Creates `message` with a delivery to each of `endpoint_ids` in the next batch: `Ok`
    /// once committed, or the eventId conflict.
    pub(super) async fn create(
        &self,
        message: Message,
        endpoint_ids: Vec<EndpointId>,
    ) -> Result<()> {
        submit(
            &self.creates,
            NewMessage {
                message,
                endpoint_ids,
            },
        )
        .await
    }

    /// Writes `record` (its endpoint does not change) in the next batch; returns whether the
    /// fence held.
    pub(super) async fn record(&self, record: AttemptRecord) -> Result<bool> {
        submit(&self.records, record).await
    }
}

async fn submit<W, T>(queue: &mpsc::Sender<Queued<W, T>>, write: W) -> Result<T> {
    let (reply, outcome) = oneshot::channel();
    queue
        .send(Queued { write, reply })
        .await
        .map_err(|_| StoreError::Closed)?;
    // Dropped unanswered only when the runtime shuts down under the batch.
    outcome.await.map_err(|_| StoreError::Closed)?
}

/// Starts a task that takes the writes queued on the returned sender in batches and hands
/// each batch to `apply`, up to [`BATCHES_IN_FLIGHT`] at once.
fn spawn<W, T, F, A>(apply: A) -> mpsc::Sender<Queued<W, T>>
where
    W: Send + 'static,
    T: Send + 'static,
    A: Fn(Vec<Queued<W, T>>) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (queue, mut writes) = mpsc::channel::<Queued<W, T>>(QUEUE);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        while let Some(first) = writes.recv().await {
            // A slot first, then the batch: while every slot is busy, writes gather in the
            // queue and the next batch takes them all.
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return; // The semaphore is never closed.
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match writes.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            let applied = apply(batch);
            tokio::spawn(async move {
                applied.await;
                drop(slot);
            });
        }
    });
    queue
}

fn observe(metrics: &CommitMetrics, writes: usize, started: Instant) {
    if let Some(metrics) = metrics.get() {
        metrics.commit(writes, started.elapsed());
    }
}

async fn apply_creates(
    pool: PgPool,
    creates: Vec<Create>,
    metrics: CommitMetrics,
    due: Arc<DueNotifier>,
) {
    let started = Instant::now();
    match insert_messages(&pool, &creates).await {
        Ok(inserted) => {
            observe(&metrics, creates.len(), started);
            let mut queued = false;
            for Queued { write, reply } in creates {
                let outcome = if inserted.contains(write.message.id.as_str()) {
                    queued |= !write.endpoint_ids.is_empty();
                    Ok(())
                } else {
                    Err(StoreError::Conflict(MESSAGE_CONFLICT.to_owned()))
                };
                let _ = reply.send(outcome);
            }
            if queued {
                due.committed();
            }
        }
        Err(e) if e.is_unavailable() => {
            // One by one would wait for the database once per write (a connection timeout
            // each): every caller hears now that it is unreachable, and nothing was stored.
            tracing::warn!(error = %e, writes = creates.len(),
                "a batch of message creates failed: the database is unreachable");
            for Queued { reply, .. } in creates {
                let _ = reply.send(Err(unreachable_like(&e)));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, writes = creates.len(),
                "a batch of message creates failed as a whole; applying them one by one");
            for Queued { write, reply } in creates {
                let started = Instant::now();
                let outcome =
                    messages::insert_with(&pool, &write.message, &write.endpoint_ids).await;
                if outcome.is_ok() {
                    observe(&metrics, 1, started);
                    if !write.endpoint_ids.is_empty() {
                        due.committed();
                    }
                }
                let _ = reply.send(outcome);
            }
        }
    }
}

/// An error for one caller of a batch that failed with `e`, an unreachable database: one of
/// the same kind (the API answers 503 `store_unavailable`), with `e`'s words.
fn unreachable_like(e: &StoreError) -> StoreError {
    StoreError::Database(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        e.to_string(),
    )))
}

/// [`CREATE_MESSAGES`] for `creates`; returns the ids that went in.
async fn insert_messages(pool: &PgPool, creates: &[Create]) -> Result<HashSet<String>> {
    let n = creates.len();
    let mut ids = Vec::with_capacity(n);
    let mut app_ids = Vec::with_capacity(n);
    let mut event_ids = Vec::with_capacity(n);
    let mut event_types = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut expires = Vec::with_capacity(n);
    let mut delivery_msgs = Vec::new();
    let mut delivery_endpoints = Vec::new();
    for Queued {
        write: NewMessage {
            message,
            endpoint_ids,
        },
        ..
    } in creates
    {
        ids.push(message.id.as_str());
        app_ids.push(message.app_id.as_str());
        event_ids.push(message.event_id.as_deref());
        event_types.push(message.event_type.as_str());
        channels.push(opt_json(&message.channels));
        tags.push(opt_json(&message.tags));
        payloads.push(message.payload.as_ref());
        created.push(millis(message.created_at));
        expires.push(message.payload_expires_at.map(millis));
        for endpoint_id in endpoint_ids {
            delivery_msgs.push(message.id.as_str());
            delivery_endpoints.push(endpoint_id.as_str());
        }
    }
    let inserted: Vec<String> = sqlx::query_scalar(CREATE_MESSAGES)
        .bind(&ids)
        .bind(&app_ids)
        .bind(&event_ids)
        .bind(&event_types)
        .bind(&channels)
        .bind(&tags)
        .bind(&payloads)
        .bind(&created)
        .bind(&expires)
        .bind(&delivery_msgs)
        .bind(&delivery_endpoints)
        .bind(DeliveryStatus::Pending as i32)
        .bind(TriggerType::Scheduled as i32)
        .fetch_all(pool)
        .await?;
    Ok(inserted.into_iter().collect())
}

async fn apply_records(pool: PgPool, records: Vec<Record>, metrics: CommitMetrics) {
    let started = Instant::now();
    match record_attempts(&pool, &records).await {
        Ok(applied) => {
            observe(&metrics, records.len(), started);
            for Queued { write, reply } in records {
                let _ = reply.send(Ok(applied.contains(write.attempt.id.as_str())));
            }
        }
        Err(e) if e.is_unavailable() => {
            tracing::warn!(error = %e, writes = records.len(),
                "a batch of attempt records failed: the database is unreachable");
            for Queued { reply, .. } in records {
                let _ = reply.send(Err(unreachable_like(&e)));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, writes = records.len(),
                "a batch of attempt records failed as a whole; applying them one by one");
            for Queued { write, reply } in records {
                let started = Instant::now();
                let outcome = messages::record_one(&pool, &write).await;
                if outcome.is_ok() {
                    observe(&metrics, 1, started);
                }
                let _ = reply.send(outcome);
            }
        }
    }
}

/// [`RECORD_ATTEMPTS`] for `records`, in a transaction begun with [`BEGIN_RECORDS`]; returns
/// the ids of the attempts whose fence held.
async fn record_attempts(pool: &PgPool, records: &[Record]) -> Result<HashSet<String>> {
    let columns = RecordColumns::new(records.iter().map(|queued| &queued.write));
    let mut tx = pool.begin_with(BEGIN_RECORDS).await?;
    let applied: Vec<String> = columns
        .bind(sqlx::query_scalar(RECORD_ATTEMPTS))
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(applied.into_iter().collect())
}

/// A batch of records' transaction, begun in one round trip with two planner settings for it
/// alone:
/// - `enable_seqscan` off: [`RECORD_ATTEMPTS`]'s update must find each delivery by its key,
///   one index probe per record. The planner weighs those probes against a hash join over the
///   whole table, and took the table whenever its statistics made it look small: a fresh
///   database, a queue grown since autovacuum's last analysis (it looks once a minute), or the
///   plan PostgreSQL caches for a prepared statement, costed when the table was small and kept
///   until the next analysis. A batch then read 10,000-20,000 deliveries, 4-9 ms, for a few
///   dozen records (PERFORMANCE.md).
/// - `plan_cache_mode` `force_generic_plan`: the statement was planned again for three in four
///   batches (the arrays' lengths vary), 0.23 ms each; with the scan ruled out the plan is the
///   same for any batch.
const BEGIN_RECORDS: &str =
    "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL plan_cache_mode = force_generic_plan";

/// [`RECORD_ATTEMPTS`]'s parameters: one array per column, one entry per record.
struct RecordColumns<'a> {
    ids: Vec<&'a str>,
    msg_ids: Vec<&'a str>,
    endpoint_ids: Vec<&'a str>,
    app_ids: Vec<&'a str>,
    urls: Vec<&'a str>,
    statuses: Vec<i32>,
    codes: Vec<i32>,
    responses: Vec<&'a str>,
    durations: Vec<i64>,
    triggers: Vec<i32>,
    at: Vec<i64>,
    next_statuses: Vec<i32>,
    next_at: Vec<Option<i64>>,
    counted: Vec<i32>,
    tokens: Vec<Option<i64>>,
}

impl<'a> RecordColumns<'a> {
    fn new(records: impl ExactSizeIterator<Item = &'a AttemptRecord>) -> Self {
        let n = records.len();
        let mut columns = Self {
            ids: Vec::with_capacity(n),
            msg_ids: Vec::with_capacity(n),
            endpoint_ids: Vec::with_capacity(n),
            app_ids: Vec::with_capacity(n),
            urls: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            codes: Vec::with_capacity(n),
            responses: Vec::with_capacity(n),
            durations: Vec::with_capacity(n),
            triggers: Vec::with_capacity(n),
            at: Vec::with_capacity(n),
            next_statuses: Vec::with_capacity(n),
            next_at: Vec::with_capacity(n),
            counted: Vec::with_capacity(n),
            tokens: Vec::with_capacity(n),
        };
        for record in records {
            let a = &record.attempt;
            let (status, next) = messages::next_state(record.next);
            columns.ids.push(a.id.as_str());
            columns.msg_ids.push(a.msg_id.as_str());
            columns.endpoint_ids.push(a.endpoint_id.as_str());
            columns.app_ids.push(a.app_id.as_str());
            columns.urls.push(a.url.as_str());
            columns.statuses.push(a.status as i32);
            columns.codes.push(a.response_status_code);
            columns.responses.push(a.response.as_str());
            columns.durations.push(a.response_duration_ms);
            columns.triggers.push(a.trigger_type as i32);
            columns.at.push(millis(a.created_at));
            columns.next_statuses.push(status as i32);
            columns.next_at.push(next);
            columns
                .counted
                .push(i32::from(a.trigger_type == TriggerType::Scheduled));
            // A token beyond BIGINT was never handed out by the sequence: NULL matches no row.
            columns.tokens.push(i64::try_from(record.lease.0).ok());
        }
        columns
    }

    /// `query` ([`RECORD_ATTEMPTS`], or a statement around it) with the columns bound.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.msg_ids)
            .bind(&self.endpoint_ids)
            .bind(&self.app_ids)
            .bind(&self.urls)
            .bind(&self.statuses)
            .bind(&self.codes)
            .bind(&self.responses)
            .bind(&self.durations)
            .bind(&self.triggers)
            .bind(&self.at)
            .bind(&self.next_statuses)
            .bind(&self.next_at)
            .bind(&self.counted)
            .bind(&self.tokens)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::Utc;
    use herald_core::{
        AppId, MessageId,
        model::{App, Endpoint},
    };
    use herald_metrics::prometheus_client::{encoding::text::encode, registry::Registry};

    use super::super::{
        PostgresStore,
        messages::tests::{PLAN_CACHE_MODES, leased_rows, plan_as, server_url},
        tests::{SchemaGuard, open_in_fresh_schema},
    };
    use super::*;
    use crate::{
        ClaimRequest, EndpointChange, EndpointStore, LeaseToken, MessageStore, NextStep, Recorded,
        StoreLifecycle, conformance,
    };

    /// A store in a fresh schema, with an app and one endpoint; `None` (the test is skipped)
    /// without a server.
    async fn store_with_endpoint() -> Option<(SchemaGuard, PostgresStore, App, Endpoint)> {
        let url = server_url()?;
        let (guard, store) = open_in_fresh_schema(url).await;
        let app = conformance::stored_app(&store, "A").await;
        let endpoint = conformance::endpoint(&app.id);
        store.create_endpoint(&endpoint).await.expect("endpoint");
        Some((guard, store, app, endpoint))
    }

    /// A batch of records finds each delivery by its key, never by reading the whole table (see
    /// [`BEGIN_RECORDS`]): 64 records over 2,000 leased deliveries, planned for the values at
    /// hand and as PostgreSQL plans a prepared statement it has run often (a generic plan).
    /// Without the setting, both plans join the batch to the table by a hash over a sequential
    /// scan.
    #[tokio::test]
    async fn a_batch_of_records_finds_its_deliveries_by_key() {
        let Some((_guard, store, app, endpoint)) = store_with_endpoint().await else {
            return;
        };
        let now = Utc::now();
        let records: Vec<AttemptRecord> = (1..=64)
            .map(|i| {
                let msg_id = MessageId::parse(format!("msg_{i}")).expect("a message id");
                AttemptRecord {
                    attempt: conformance::attempt(
                        &msg_id,
                        &app.id,
                        &endpoint,
                        now,
                        TriggerType::Scheduled,
                        NextStep::Delivered,
                    ),
                    next: NextStep::Delivered,
                    endpoint_change: EndpointChange::Unchanged,
                    lease: LeaseToken(i),
                }
            })
            .collect();
        let columns = RecordColumns::new(records.iter());
        let mut tx = store.pool.begin_with(BEGIN_RECORDS).await.expect("begin");
        leased_rows(
            &mut tx,
            &app.id,
            &endpoint.id,
            2_000,
            now,
            now + chrono::Duration::seconds(60),
        )
        .await;
        let statement = format!("EXPLAIN {RECORD_ATTEMPTS}");
        let mut plans = Vec::new();
        for plan_cache_mode in PLAN_CACHE_MODES {
            plan_as(&mut tx, plan_cache_mode).await;
            let plan: Vec<String> = columns
                .bind(sqlx::query_scalar(sqlx::AssertSqlSafe(statement.as_str())))
                .fetch_all(&mut *tx)
                .await
                .expect("explain");
            plans.push(plan);
        }
        tx.rollback().await.expect("rollback");
        for plan in &plans {
            assert!(
                plan.iter()
                    .any(|line| line.contains("Update on deliveries")),
                "the plan is the records' update: {plan:#?}"
            );
            assert!(
                !plan
                    .iter()
                    .any(|line| line.contains("Seq Scan on deliveries")),
                "a batch of records reads the whole deliveries table: {plan:#?}"
            );
        }
    }

    /// Commits and the writes they carried, from the store's commit metrics.
    fn commits(registry: &Registry) -> (u64, u64) {
        let mut text = String::new();
        encode(&mut text, registry).expect("encode");
        let read = |name: &str| -> u64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        (
            read("herald_store_commit_writes_count "),
            read("herald_store_commit_writes_sum "),
        )
    }

    fn observed(store: &PostgresStore) -> Registry {
        let mut registry = Registry::default();
        let metrics = herald_metrics::Metrics::new(&mut registry);
        store.observe_commits(Arc::clone(&metrics.store));
        registry
    }

    async fn deliveries_of(store: &PostgresStore, app_id: &AppId) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE app_id = $1")
            .bind(app_id.as_str())
            .fetch_one(store.pool())
            .await
            .expect("count")
    }

    /// Creates that arrive together commit together, and each caller still gets its own
    /// outcome: of twenty creates with one eventId exactly one goes in (with its delivery),
    /// the others get the eventId conflict; creates without one all go in.
    #[tokio::test]
    async fn creates_arriving_together_commit_together_with_their_own_outcomes() {
        let Some((_guard, store, app, endpoint)) = store_with_endpoint().await else {
            return;
        };
        let registry = observed(&store);
        let targets = vec![endpoint.id.clone()];

        let same = (0..20).map(|_| {
            store.create_message(
                conformance::message(&app.id, Some("order-1")),
                targets.clone(),
            )
        });
        let plain = (0..20)
            .map(|_| store.create_message(conformance::message(&app.id, None), targets.clone()));
        let (same, plain) = tokio::join!(
            futures_util::future::join_all(same),
            futures_util::future::join_all(plain)
        );

        assert_eq!(same.iter().filter(|r| r.is_ok()).count(), 1, "one goes in");
        assert!(
            same.iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| matches!(e, StoreError::Conflict(m) if m == MESSAGE_CONFLICT)),
            "the others conflict: {same:?}"
        );
        assert!(plain.iter().all(Result::is_ok), "{plain:?}");
        assert_eq!(
            deliveries_of(&store, &app.id).await,
            21,
            "one delivery each"
        );
        let (commits, writes) = commits(&registry);
        assert_eq!(writes, 40, "every create was counted");
        assert!(commits < writes, "{commits} commits for {writes} creates");
    }

    /// Each caller of a batch that failed because the database is unreachable hears an error
    /// of that kind (a 503 at the API, which the caller retries), with the batch's words.
    #[test]
    fn callers_of_a_batch_the_database_could_not_take_hear_it_is_unreachable() {
        let batch_error = StoreError::Database(sqlx::Error::PoolTimedOut);
        assert!(batch_error.is_unavailable());
        let each = unreachable_like(&batch_error);
        assert!(each.is_unavailable(), "{each}");
        assert!(
            each.to_string().contains(&batch_error.to_string()),
            "{each}"
        );
    }

    /// A batch whose statement fails as a whole (here one create names an endpoint that does
    /// not exist, so its delivery breaks the foreign key) is applied one write at a time: that
    /// create fails alone, and the rest go in.
    #[tokio::test]
    async fn a_batch_that_fails_as_a_whole_is_applied_one_write_at_a_time() {
        let Some((_guard, store, app, endpoint)) = store_with_endpoint().await else {
            return;
        };
        let missing = conformance::endpoint(&app.id).id;

        let creates = (0..10).map(|n| {
            let target = if n == 4 { &missing } else { &endpoint.id };
            store.create_message(conformance::message(&app.id, None), vec![target.clone()])
        });
        let outcomes = futures_util::future::join_all(creates).await;

        for (n, outcome) in outcomes.iter().enumerate() {
            assert_eq!(outcome.is_ok(), n != 4, "create {n}: {outcome:?}");
        }
        assert_eq!(deliveries_of(&store, &app.id).await, 9);
    }

    /// Records arriving together commit together, each fenced by its own lease: those under
    /// the current lease move their delivery and release it, those under a wrong one are
    /// stale and leave it leased; every attempt is logged.
    #[tokio::test]
    async fn records_arriving_together_are_each_fenced_by_their_own_lease() {
        let Some((_guard, store, app, endpoint)) = store_with_endpoint().await else {
            return;
        };
        let registry = observed(&store);
        for _ in 0..10 {
            store
                .create_message(
                    conformance::message(&app.id, None),
                    vec![endpoint.id.clone()],
                )
                .await
                .expect("create");
        }
        let now = Utc::now() + chrono::Duration::seconds(1);
        let jobs = store
            .claim_due(&ClaimRequest {
                now,
                lease_until: now + chrono::Duration::seconds(60),
                limit: 10,
                first_attempts: true,
                in_flight: HashMap::new(),
                per_endpoint_limit: 10,
                app_in_flight: HashMap::new(),
                per_app_limit: 10,
                saving: Default::default(),
            })
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 10);
        let (_, writes_before) = commits(&registry);

        let records = jobs.iter().enumerate().map(|(n, job)| {
            // Odd ones were made under a lease the delivery no longer holds.
            let lease = if n % 2 == 1 {
                LeaseToken(job.lease.0 + 1_000_000)
            } else {
                job.lease
            };
            store.record_attempt(conformance::job_record(
                job,
                lease,
                now,
                NextStep::Delivered,
            ))
        });
        let recorded = futures_util::future::join_all(records).await;

        for (n, outcome) in recorded.iter().enumerate() {
            let expected = if n % 2 == 1 {
                Recorded::Stale
            } else {
                Recorded::Applied
            };
            assert_eq!(outcome.as_ref().ok(), Some(&expected), "record {n}");
        }
        let (delivered, leased): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 0 AND lease_token IS NULL),
                    count(*) FILTER (WHERE status <> 0 AND lease_token IS NOT NULL)
             FROM deliveries WHERE app_id = $1",
        )
        .bind(app.id.as_str())
        .fetch_one(store.pool())
        .await
        .expect("count");
        assert_eq!((delivered, leased), (5, 5));
        // The leases the claims count: the records under their own lease released theirs,
        // the stale ones released none.
        let (kept, matching): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE d.lease_token = l.lease_token)
             FROM delivery_leases l
             JOIN deliveries d ON d.msg_id = l.msg_id AND d.endpoint_id = l.endpoint_id
             WHERE l.app_id = $1",
        )
        .bind(app.id.as_str())
        .fetch_one(store.pool())
        .await
        .expect("leases");
        assert_eq!((kept, matching), (5, 5));
        let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts WHERE app_id = $1")
            .bind(app.id.as_str())
            .fetch_one(store.pool())
            .await
            .expect("count");
        assert_eq!(logged, 10, "every attempt is logged");
        let (commits, writes) = commits(&registry);
        assert_eq!(writes - writes_before, 10);
        assert!(commits < writes, "{commits} commits for {writes} writes");
    }
}
