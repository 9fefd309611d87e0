//! The embedded store: one SQLite file in WAL mode.
//!
//! Two pools: a single-connection writer (SQLite has one writer at a time, so queuing writes in
//! the pool beats retrying on `SQLITE_BUSY`) and a small read-only pool that WAL lets run
//! beside it. The hot writes (messages and publications, attempt results, history appends,
//! ingest and idempotency records) go through the group-commit task in [`batch`], which also
//! assigns channel history offsets; everything else writes through the writer pool directly.
//!
//! This file holds the struct, `open` and `close`, and the helpers every part shares; each
//! store sub-trait is implemented in its own file (`apps.rs`, `event_types.rs`,
//! `endpoints.rs`, `messages.rs`, `attempts.rs`, `history.rs`, `ingest.rs`, `idempotency.rs`,
//! `channel_webhooks.rs`). The tests run the conformance suite (`crate::conformance`) against
//! a store in a temporary directory, plus the checks that only concern SQLite.

mod apps;
mod attempts;
mod batch;
mod channel_webhooks;
#[cfg(test)]
mod durable_tests;
mod endpoints;
mod event_types;
mod gate;
#[cfg(test)]
mod handoff_tests;
mod history;
mod idempotency;
mod ingest;
mod leases;
mod messages;
mod permissions;
mod retention;
mod serving;
mod tokens;
// Shared with the PostgreSQL store: the JSON shapes of the text columns and the id parsing.
pub(crate) mod rows;
mod secrets;

pub use secrets::{KEY_FILE, read_key_file};
pub use serving::{LOCK_FILE, ServingLock, ServingLockError};

use std::{
    path::Path,
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use herald_core::EndpointId;
use herald_core::model::{App, Message, TriggerType};
use sqlx::{
    QueryBuilder, Sqlite, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::batch::{PendingWrite, WriteOp};

use crate::{DeliveryJob, Page, Result, StoreError, StoreLifecycle};

/// The database file inside the data directory.
pub const DB_FILE: &str = "herald.db";
const READERS: u32 = 4;

pub struct SqliteStore {
    cache: crate::cache::Cache,
    leases: leases::Leases,
    /// What is known about the claimable deliveries, to skip or narrow claims.
    gate: Arc<gate::ClaimGate>,
    /// Where new deliveries go as they commit, once the dispatcher has said (see
    /// [`crate::MessageStore::hand_fresh_deliveries_to`]).
    fresh: Arc<OnceLock<Arc<dyn crate::FreshDeliveries>>>,
    /// `Idempotency-Key`s claimed by requests still running in this process.
    claims: idempotency::Claims,
    reader: SqlitePool,
    writer: SqlitePool,
    writes: mpsc::Sender<PendingWrite>,
    shutdown: CancellationToken,
    batcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Where the group commit records each commit, once `observe_commits` says.
    commits: Arc<OnceLock<Arc<herald_metrics::StoreMetrics>>>,
    /// The group commit's channel positions: whatever else writes `channel_positions` empties
    /// it (see `batch::positions`).
    positions: Arc<batch::PositionCache>,
    /// Encrypts the secrets written and decrypts those read (see `crate::secrets`).
    keys: crate::secrets::Keyring,
    /// Set once an fsync failed: every write is refused until a restart (see `batch`).
    broken: Arc<OnceLock<String>>,
}

impl SqliteStore {
    /// Open (creating if needed) the store in `dir` and bring its schema up to date. Secrets
    /// are encrypted under the main key generated into `dir` ([`KEY_FILE`]) on first use.
    pub async fn open(dir: &Path) -> Result<Self> {
        Self::open_with_keys(dir, None).await
    }

    /// [`SqliteStore::open`], with secrets encrypted under `keys` (the configured main key,
    /// and previous ones that still decrypt) instead of the generated key, which then only
    /// decrypts what was written under it. Fails if the store holds secrets under a key it is
    /// not given; encrypts any secret an earlier version stored in clear.
    pub async fn open_with_keys(dir: &Path, keys: Option<crate::secrets::Keyring>) -> Result<Self> {
        let wal = Arc::new(batch::WalFile::of(&dir.join(DB_FILE)));
        Self::open_with(dir, keys, wal).await
    }

    /// [`SqliteStore::open_with_keys`], with the group commit's batches made durable by
    /// `durable` (tests hold it back to watch what waits for it).
    async fn open_with(
        dir: &Path,
        keys: Option<crate::secrets::Keyring>,
        durable: Arc<dyn batch::Durable>,
    ) -> Result<Self> {
        // The database holds everything Herald keeps: directory 0700, files 0600 (unix).
        permissions::prepare(dir, DB_FILE)?;
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(dir.join(DB_FILE))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Acknowledged writes must survive power loss; group commit pays for the fsyncs.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Zero what a write frees inside the pages it writes anyway: a secret replaced
            // (re-encrypted, rotated) leaves no copy in the page's free space, at no extra I/O.
            .pragma("secure_delete", "fast")
            .busy_timeout(Duration::from_secs(10));
        // Held until the schema is migrated and the readers are open: a new database's first
        // connection switches it to WAL, which another process's connection at that moment
        // fails on at once ("database is locked"), and sqlx's migrator takes no lock of its own.
        let migrating = serving::lock_for_migration(dir).await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            // Never recycled: the writer is what keeps the WAL file in place between commits
            // (the last connection to close checkpoints and removes it), and its handle is lent
            // to the group commit for its prepared statements.
            .max_lifetime(None)
            .idle_timeout(None)
            // A connection to a local file does not go stale the way a network one can, and
            // sqlx's check before lending it is a round trip to its thread (one per batch).
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        drop(migrating);
        // SQLite has made its -wal and -shm files by now, with the database file's mode.
        permissions::secure_files(dir, DB_FILE)?;

        let census = secrets::census(&reader).await?;
        let keys = secrets::resolve_keys(dir, keys, &census)?;
        if let Some(key_ids) = census.missing_from(&keys) {
            return Err(crate::secrets::SecretError::KeysMissing { key_ids }.into());
        }
        if census.plaintext > 0 {
            // Written by a version before encryption at rest.
            let done = secrets::reencrypt(&writer, &keys, false, 100).await?;
            tracing::info!(
                encrypted = done.rewritten,
                "encrypted the secrets an earlier version stored in clear"
            );
        }

        let (writes, queue) = mpsc::channel(batch::QUEUE_DEPTH);
        let shutdown = CancellationToken::new();
        let shared = batch::Shared {
            leases: leases::Leases::default(),
            gate: Arc::default(),
            fresh: Arc::default(),
            commits: Arc::default(),
            durable,
            positions: Arc::default(),
            broken: Arc::default(),
        };
        let batcher = tokio::spawn(batch::run(
            writer.clone(),
            shared.clone(),
            queue,
            shutdown.clone(),
        ));
        Ok(Self {
            cache: crate::cache::Cache::default(),
            leases: shared.leases,
            gate: shared.gate,
            fresh: shared.fresh,
            claims: idempotency::Claims::default(),
            reader,
            writer,
            writes,
            shutdown,
            batcher: Mutex::new(Some(batcher)),
            commits: shared.commits,
            positions: shared.positions,
            keys,
            broken: shared.broken,
        })
    }

    /// An app looked up by `query` with `value`, remembered in the cache under `cache_key`.
    /// (Cache keys cannot collide with ids or uids, which have no ':'.)
    async fn cached_app(
        &self,
        cache_key: String,
        query: &'static str,
        value: &str,
    ) -> Result<Option<App>> {
        let read = async {
            sqlx::query(query)
                .bind(value)
                .fetch_optional(&self.reader)
                .await?
                .map(|row| rows::app(&row, &self.keys))
                .transpose()
        };
        self.cache
            .read_through(
                self.cache.app(&cache_key),
                read,
                |cache, generation, app| {
                    cache.put_app_as(generation, &cache_key, app);
                },
            )
            .await
    }

    /// Hands `op` to the group commit and waits for the commit that contains it.
    async fn submit(&self, op: WriteOp) -> Result<batch::Committed> {
        let outcome = self.enqueue(op).await?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    /// Hands `op` to the group commit; the receiver answers with the commit that contains it.
    /// Once this returns, `op` is in the writer's queue: the group commit takes writes in
    /// queue order and assigns history offsets in that order, so `op`'s come after those of
    /// every write queued before it (`queue_publication` promises that much).
    async fn enqueue(&self, op: WriteOp) -> Result<oneshot::Receiver<Result<batch::Committed>>> {
        let (done, outcome) = oneshot::channel();
        // Refused, or cancelled while it waits for room: the write is dropped, and a new
        // message gives its deliveries' rooms back as it goes (`batch::NewMessage`'s drop).
        if self.writes.send(PendingWrite { op, done }).await.is_err() {
            return Err(StoreError::Closed);
        }
        Ok(outcome)
    }

    /// A new message for the group commit, with a job for each delivery the dispatcher has
    /// room for now (see [`crate::FreshDeliveries`]). The endpoints come from the cache the
    /// publisher has just chosen them from; one not found there (the cache was cleared
    /// meanwhile) is left to claims, which read it from its row.
    fn new_message(&self, message: Message, endpoint_ids: Vec<EndpointId>) -> batch::NewMessage {
        let fresh = match (self.fresh.get(), self.cache.endpoints(&message.app_id)) {
            (Some(sink), Some(endpoints)) if !endpoint_ids.is_empty() => {
                // The publisher chose the targets from this same list, in its order, so one
                // walk finds them. (Should the cache have been refilled in another order
                // meanwhile, the targets it walks past are left to claims.)
                let mut endpoints = endpoints.iter();
                endpoint_ids
                    .iter()
                    .filter_map(|id| {
                        let endpoint = endpoints.find(|endpoint| endpoint.id == *id)?;
                        if endpoint.disabled || !sink.reserve(&message.app_id, id) {
                            return None;
                        }
                        Some(DeliveryJob {
                            msg_id: message.id.clone(),
                            app_id: message.app_id.clone(),
                            event_type: message.event_type.clone(),
                            payload: message.payload.clone(),
                            endpoint: endpoint.clone(),
                            attempts: 0,
                            trigger: TriggerType::Scheduled,
                            lease: self.leases.new_token(),
                        })
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        batch::NewMessage {
            message,
            endpoint_ids,
            fresh,
            sink: self.fresh.get().cloned(),
        }
    }
}

/// Appends the keyset-pagination clause and ordering; fetches one extra row so the caller can
/// tell whether another page exists.
fn paginate(query: &mut QueryBuilder<Sqlite>, column: &str, page: &Page) {
    if let Some(iterator) = &page.iterator {
        let op = if page.descending { " < " } else { " > " };
        query.push(format!(" AND {column}{op}"));
        query.push_bind(iterator.clone());
    }
    let order = if page.descending { "DESC" } else { "ASC" };
    // A bound limit is cast, or SQLite prepares the statement again at every execution (see
    // the notes of `crate::sql`).
    query.push(format!(" ORDER BY {column} {order} LIMIT CAST("));
    query.push_bind(i64::from(page.limit) + 1);
    query.push(" AS BIGINT)");
}

#[async_trait::async_trait]
impl StoreLifecycle for SqliteStore {
    async fn ping(&self) -> Result<()> {
        if self.shutdown.is_cancelled() {
            return Err(StoreError::Closed);
        }
        // A store that refuses every write until a restart is not ready, however well it
        // reads: readiness is what tells the load balancer and the orchestrator.
        if let Some(why) = self.broken.get() {
            return Err(StoreError::Batch(why.clone()));
        }
        if self
            .batcher
            .try_lock()
            .is_ok_and(|task| task.as_ref().is_some_and(|t| t.is_finished()))
        {
            return Err(StoreError::Batch(
                "the group commit has stopped; restart Herald".into(),
            ));
        }
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn close(&self) {
        self.shutdown.cancel();
        let batcher = self.batcher.lock().await.take();
        if let Some(task) = batcher
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "store writer task failed");
        }
        self.writer.close().await;
        self.reader.close().await;
    }

    fn observe_commits(&self, metrics: Arc<herald_metrics::StoreMetrics>) {
        let _ = self.commits.set(metrics);
    }
}

/// Reads the schema version of the store in `dir` without writing to it (`herald doctor`).
/// A directory without a database reports nothing applied: `serve` creates it.
pub async fn inspect(dir: &Path) -> Result<crate::Inspection> {
    let known_migrations = sqlx::migrate!("./migrations/sqlite").iter().count();
    let file = dir.join(DB_FILE);
    if !file.exists() {
        return Ok(crate::Inspection {
            applied_migrations: 0,
            known_migrations,
            server_time: None,
        });
    }
    let options = SqliteConnectOptions::new()
        .filename(&file)
        .read_only(true)
        .busy_timeout(Duration::from_secs(5));
    let mut connection =
        <sqlx::SqliteConnection as sqlx::Connection>::connect_with(&options).await?;
    let applied: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_one(&mut connection)
    .await?;
    let applied_migrations = if applied == 0 {
        0
    } else {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut connection)
            .await?;
        usize::try_from(count).unwrap_or(0)
    };
    sqlx::Connection::close(connection).await?;
    Ok(crate::Inspection {
        applied_migrations,
        known_migrations,
        server_time: None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;
    use chrono::Utc;
    use herald_core::{
        history::{NewHistoryEntry, Retention},
        model::{
            Attempt, DeliveryStatus, Endpoint, EndpointFormat, Message, Metadata,
            PusherCredentials, TriggerType,
        },
    };

    use super::*;
    use crate::{
        AppStore, AttemptRecord, ChannelWebhookStore, ClaimRequest, EndpointChange, EndpointStore,
        HistoryStore, MessageQuery, MessageStore, NextStep, Recorded, conformance,
    };

    async fn open_in_tempdir() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).await.expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn passes_the_store_conformance_suite() {
        conformance::run_all(open_in_tempdir).await;
    }

    /// A constraint the database enforces is data it refuses (the same write fails again); a
    /// pool that timed out, a closed store or a failed batch may pass on the next try.
    #[tokio::test]
    async fn a_constraint_is_data_refused_and_a_timeout_is_not() {
        let (_dir, store) = open_in_tempdir().await;
        let app = conformance::stored_app(&store, "A").await;
        // Through the group commit, as channel webhooks are stored: a message of an app that
        // does not exist breaks a foreign key, and that write's own error comes back.
        let orphan = conformance::message(&herald_core::AppId::new(Utc::now()), None);
        let refused = store
            .record_channel_events(vec![(orphan, Vec::new())], Vec::new())
            .await
            .expect_err("no such app");
        assert!(refused.refuses_the_data(), "{refused:?}");
        let unique = sqlx::query("INSERT INTO apps (id) VALUES ($1)")
            .bind(app.id.as_str())
            .execute(&store.writer)
            .await
            .expect_err("a NOT NULL column left out, or the same key");
        assert!(StoreError::from(unique).refuses_the_data());
        for passing in [
            StoreError::Database(sqlx::Error::PoolTimedOut),
            StoreError::Closed,
            StoreError::Batch("disk I/O error".into()),
        ] {
            assert!(!passing.refuses_the_data(), "{passing:?}");
        }
        store.close().await;
    }

    #[tokio::test]
    async fn inspect_reads_the_schema_version_without_creating_anything() {
        let dir = tempfile::tempdir().expect("dir");
        let fresh = inspect(dir.path()).await.expect("inspect an empty dir");
        assert_eq!(fresh.applied_migrations, 0);
        assert!(fresh.known_migrations >= 14, "{fresh:?}");
        assert!(
            !dir.path().join(DB_FILE).exists(),
            "inspect created nothing"
        );

        let store = SqliteStore::open(dir.path()).await.expect("open");
        store.close().await;
        let migrated = inspect(dir.path()).await.expect("inspect");
        assert_eq!(migrated.applied_migrations, migrated.known_migrations);
        assert_eq!(migrated.server_time, None);
    }

    fn message(app_id: &herald_core::AppId) -> Message {
        let now = Utc::now();
        Message {
            id: herald_core::MessageId::new(now),
            app_id: app_id.clone(),
            event_id: None,
            event_type: "t".into(),
            channels: None,
            tags: None,
            payload: Bytes::from_static(b"{}"),
            created_at: now,
            payload_expires_at: None,
        }
    }

    fn test_app() -> App {
        let now = Utc::now();
        App {
            id: herald_core::AppId::new(now),
            uid: None,
            name: "test".into(),
            throttle_rate: None,
            metadata: Metadata::new(),
            pusher: PusherCredentials::generate(),
            history: None,
            socketio: None,
            payload_retention_days: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[tokio::test]
    async fn a_failing_write_does_not_sink_its_batch() {
        let (_dir, store) = open_in_tempdir().await;
        let app = test_app();
        store.create_app(&app).await.expect("app");
        // A message for an app that does not exist violates a foreign key: the grouped insert
        // fails and the batch is redone one write at a time.
        let (good, bad) = tokio::join!(
            store.create_message(message(&app.id), vec![]),
            store.create_message(
                message(&herald_core::AppId::parse("app_missing").expect("valid")),
                vec![]
            ),
        );
        assert!(good.is_ok(), "{good:?}");
        assert!(matches!(bad, Err(StoreError::NotFound)), "{bad:?}");
        let page = Page {
            limit: 10,
            iterator: None,
            descending: true,
            backwards: false,
        };
        let stored = store
            .list_messages(&app.id, &page, &MessageQuery::default())
            .await
            .expect("list");
        assert_eq!(stored.len(), 1);
        assert_writer_is_clean(&store).await;
        store.close().await;
    }

    /// The group commit runs its statements on the writer's handle outside sqlx
    /// (`batch/locked.rs`): whatever path a batch took, it must hand the connection back
    /// outside a transaction and with its fsyncs on, as sqlx lent it.
    async fn assert_writer_is_clean(store: &SqliteStore) {
        let mut writer = store.writer.acquire().await.expect("writer");
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *writer)
            .await
            .expect("synchronous");
        assert_eq!(synchronous, 2, "the writer is back at synchronous = FULL");
        // `BEGIN` inside an open transaction fails ("cannot start a transaction within a
        // transaction").
        sqlx::raw_sql("BEGIN; ROLLBACK")
            .execute(&mut *writer)
            .await
            .expect("the writer is outside a transaction");
    }

    /// The group commit keeps the writer connection across batches while writes keep coming
    /// (`batch::LOAN_FOR`), but not for good: a write that needs the connection itself (here a
    /// plain statement, as an endpoint update or `reset_history` makes) gets its turn while a
    /// backlog of writes is still waiting, not after it, and the connection comes back clean.
    /// (With loans that last while writes are waiting, the count below is the whole backlog.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_group_commit_still_lends_the_writer_to_others() {
        let (_dir, store) = open_in_tempdir().await;
        let store = std::sync::Arc::new(store);
        let app = test_app();
        store.create_app(&app).await.expect("app");
        // The group commit waits for the connection while a backlog builds up: a full queue
        // (`batch::QUEUE_DEPTH`) and more writes waiting for room, so writes are waiting
        // whenever a batch ends until the backlog has drained.
        let held = store.writer.acquire().await.expect("writer");
        let backlog = batch::QUEUE_DEPTH + 4 * batch::MAX_BATCH;
        let mut writes = tokio::task::JoinSet::new();
        for _ in 0..backlog {
            let (store, app_id) = (store.clone(), app.id.clone());
            writes.spawn(async move { store.create_message(message(&app_id), vec![]).await });
        }
        while store.writes.capacity() > 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        // The group commit has the connection now (it asked first); ask again.
        let mut writer = store.writer.acquire().await.expect("writer");
        let by_then: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
            .fetch_one(&mut *writer)
            .await
            .expect("count");
        drop(writer);
        assert!(
            by_then > 0 && by_then < backlog as i64,
            "the connection came back after a loan, with writes still waiting \
             ({by_then} of {backlog} committed)"
        );
        while let Some(done) = writes.join_next().await {
            done.expect("task").expect("message");
        }
        assert_writer_is_clean(&store).await;
        match std::sync::Arc::try_unwrap(store) {
            Ok(store) => store.close().await,
            Err(_) => panic!("the store is still shared"),
        }
    }

    #[tokio::test]
    async fn a_recovery_larger_than_a_batch_requeues_every_failed_delivery() {
        let (_dir, store) = open_in_tempdir().await;
        conformance::a_recovery_larger_than_a_batch_requeues_every_failed_delivery(
            &store,
            || async {
                sqlx::query("UPDATE deliveries SET status = $1, next_attempt_at = NULL")
                    .bind(DeliveryStatus::Fail as i64)
                    .execute(&store.writer)
                    .await
                    .expect("fail them");
            },
        )
        .await;
    }

    /// A claim marks failed the deliveries of a disabled endpoint it read; a delivery resent
    /// after that read (the endpoint enabled again) is the resend's and stays due.
    #[tokio::test]
    async fn a_refusal_leaves_a_delivery_resent_since_the_claim_read_it() {
        let (_dir, store) = open_in_tempdir().await;
        let now = Utc::now();
        let app = test_app();
        store.create_app(&app).await.expect("app");
        let ep = conformance::endpoint(&app.id);
        store.create_endpoint(&ep).await.expect("endpoint");
        let msg = message(&app.id);
        store
            .create_message(msg.clone(), vec![ep.id.clone()])
            .await
            .expect("message");
        let rowid: i64 = sqlx::query_scalar("SELECT rowid FROM deliveries")
            .fetch_one(&store.reader)
            .await
            .expect("rowid");
        let status = || async {
            sqlx::query_scalar::<_, i64>("SELECT status FROM deliveries")
                .fetch_one(&store.reader)
                .await
                .expect("status")
        };
        let (claimed_at, resent_at) = (
            now + chrono::Duration::seconds(1),
            now + chrono::Duration::seconds(2),
        );
        store
            .enqueue_manual(&app.id, &msg.id, &ep.id, resent_at)
            .await
            .expect("resend");
        store.refuse(&[rowid], claimed_at).await.expect("refuse");
        assert_eq!(
            status().await,
            DeliveryStatus::Pending as i64,
            "resent after the claim read it"
        );
        store
            .refuse(&[rowid], resent_at + chrono::Duration::seconds(1))
            .await
            .expect("refuse");
        assert_eq!(status().await, DeliveryStatus::Fail as i64);
    }

    /// A failed delivery can still be leased for a moment (between its record's commit and the
    /// lease's release); recovering it then takes it back from that lease too, so a record
    /// under the old lease is stale and the recovered delivery is claimed under a new one.
    #[tokio::test]
    async fn a_recovery_takes_the_delivery_back_from_its_lease() {
        let (_dir, store) = open_in_tempdir().await;
        let now = Utc::now();
        let app = test_app();
        store.create_app(&app).await.expect("app");
        let ep = Endpoint {
            id: herald_core::EndpointId::new(now),
            app_id: app.id.clone(),
            uid: None,
            url: "https://example.com".into(),
            description: String::new(),
            throttle_rate: None,
            disabled: false,
            format: EndpointFormat::StandardWebhooks,
            event_types: None,
            channels: None,
            metadata: Metadata::new(),
            headers: Default::default(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            previous_secrets: vec![],
            failing_since: None,
            created_at: now,
            updated_at: now,
        };
        store.create_endpoint(&ep).await.expect("endpoint");
        let msg = message(&app.id);
        store
            .create_message(msg.clone(), vec![ep.id.clone()])
            .await
            .expect("message");
        let at = now + chrono::Duration::seconds(1);
        let request = |first_attempts| ClaimRequest {
            now: at,
            lease_until: at + chrono::Duration::seconds(60),
            limit: 10,
            first_attempts,
            in_flight: HashMap::new(),
            per_endpoint_limit: 10,
            app_in_flight: HashMap::new(),
            per_app_limit: 100,
            saving: Default::default(),
        };
        let first = store.claim_due(&request(true)).await.expect("claim");
        assert_eq!(first.len(), 1);
        // The delivery failed for good while its lease is still held.
        sqlx::query("UPDATE deliveries SET status = $1, next_attempt_at = NULL")
            .bind(DeliveryStatus::Fail as i64)
            .execute(&store.writer)
            .await
            .expect("fail the delivery");
        let key = (msg.id.clone(), ep.id.clone());
        assert!(store.leases.holds(&key, first[0].lease));

        let recovered = store
            .enqueue_failed(&ep.id, now - chrono::Duration::seconds(1), at, at)
            .await
            .expect("recover");
        assert_eq!(recovered, 1);
        assert!(!store.leases.holds(&key, first[0].lease), "taken back");

        let record = |lease, trigger_type, next| AttemptRecord {
            attempt: Attempt {
                id: herald_core::AttemptId::new(at),
                msg_id: msg.id.clone(),
                endpoint_id: ep.id.clone(),
                app_id: app.id.clone(),
                url: ep.url.clone(),
                status: DeliveryStatus::Fail,
                response_status_code: 500,
                response: String::new(),
                response_duration_ms: 5,
                trigger_type,
                created_at: at,
            },
            next,
            endpoint_change: EndpointChange::Unchanged,
            lease,
        };
        let stale = store
            .record_attempt(record(
                first[0].lease,
                TriggerType::Scheduled,
                NextStep::Failed,
            ))
            .await
            .expect("stale record");
        assert_eq!(stale, Recorded::Stale);

        let manual = store
            .claim_due(&request(false))
            .await
            .expect("manual claim");
        assert_eq!(manual.len(), 1, "the recovered delivery is claimable");
        assert_eq!(manual[0].trigger, TriggerType::Manual);
        assert_ne!(manual[0].lease, first[0].lease);
        let retry_at = at + chrono::Duration::hours(1);
        let applied = store
            .record_attempt(record(
                manual[0].lease,
                TriggerType::Manual,
                NextStep::RetryAt(retry_at),
            ))
            .await
            .expect("manual record");
        assert_eq!(applied, Recorded::Applied);
        assert_eq!(
            store
                .next_due_at(false)
                .await
                .expect("next due")
                .map(|due| due.timestamp_millis()),
            Some(retry_at.timestamp_millis())
        );
        store.close().await;
    }

    /// Redone one write at a time, a batch still assigns offsets in order and gap-free: the
    /// failing write consumes none.
    #[tokio::test]
    async fn a_failing_write_consumes_no_offset_of_its_batch() {
        let (_dir, store) = open_in_tempdir().await;
        let now = Utc::now();
        let app = test_app();
        store.create_app(&app).await.expect("app");
        let entry = |app_id: &herald_core::AppId| NewHistoryEntry {
            app_id: app_id.clone(),
            channel: "history-f".into(),
            event: "e".into(),
            data: "d".into(),
            raw_json: false,
            user_id: None,
            created_at: now,
            retention: Retention {
                max_events: 100,
                max_age: std::time::Duration::from_secs(3600),
            },
            first_epoch: None,
            except: None,
        };
        let missing = herald_core::AppId::parse("app_missing").expect("valid");
        let publish = |app_id: &herald_core::AppId| {
            store.store_publication(Some((message(app_id), vec![])), vec![entry(app_id)])
        };
        let (first, bad, second) =
            tokio::join!(publish(&app.id), publish(&missing), publish(&app.id));
        assert!(matches!(bad, Err(StoreError::Sqlite(_))), "{bad:?}");
        let (first, second) = (first.expect("first"), second.expect("second"));
        assert_eq!((first[0].offset, second[0].offset), (1, 2));
        assert_eq!(first[0].epoch, second[0].epoch);
        let next = store.append_history(entry(&app.id)).await.expect("append");
        assert_eq!(next.offset, 3);
        assert_writer_is_clean(&store).await;
        store.close().await;
    }
}
