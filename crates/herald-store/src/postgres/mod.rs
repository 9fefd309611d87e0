//! The shared store: PostgreSQL, for several Herald nodes behind one database (issue 11).
//!
//! One connection pool ([`PostgresOptions`]: its sizes, the acquire timeout and an optional
//! schema); the schema comes from `migrations/postgres/`, run at every [`PostgresStore::open`].
//! Apps, their endpoints, API tokens and ingest sources, which every request reads, are kept in
//! a node cache ([`crate::Cache`]) while the node's broker listens on [`CONFIG_CHANNEL`]:
//! triggers on those tables (migration 0011) notify it in the transaction of every change, on
//! whichever node or connection made it, and the broker empties this node's cache as the
//! notification arrives. Without a listening broker (a lost session, a store opened on its own)
//! every read goes to the database. What SQLite keeps in its one process's memory lives in rows
//! here: delivery leases
//! (`deliveries.lease_token`, `leased_until`, counted from `delivery_leases`), so a claim holds
//! across nodes and a dead node's claims expire; channel offsets are assigned in the publishing transaction from
//! `channel_positions` (see the migration).
//!
//! This file holds the struct, `open` and `close`, the helpers every part shares, and the test
//! that runs the conformance suite (`crate::conformance`) against a throwaway schema of the
//! server named by `HERALD_TEST_POSTGRES_URL`; each store sub-trait is implemented in its own
//! file (`apps.rs`, `event_types.rs`, `endpoints.rs`, `messages.rs`, `attempts.rs`,
//! `history.rs`, `ingest.rs`, `idempotency.rs`, `channel_webhooks.rs`).

/// When a message's first attempts fall due, as SQL over its `created_at` (milliseconds):
/// then, or now by the database's clock if that is earlier. `created_at` is the creating
/// node's clock; claims read the cluster's (the database's, see `crate::ClusterClock`), so a
/// node whose clock runs ahead would otherwise queue deliveries no claim finds due until its
/// clock's lead has passed.
macro_rules! first_attempt_due {
    ($created_at:literal) => {
        concat!(
            "LEAST(",
            $created_at,
            ", (extract(epoch FROM statement_timestamp()) * 1000)::bigint)"
        )
    };
}

mod apps;
mod attempts;
mod batch;
mod channel_webhooks;
mod endpoints;
mod event_types;
mod history;
mod idempotency;
mod ingest;
mod messages;
mod paces;
mod retention;
mod rows;
mod secrets;
mod tokens;
mod wake;

/// The channel notified when deliveries fall due now, for the dispatchers' listener.
pub use messages::{DELIVERIES_CHANNEL, DueLanes};

/// What the store announces at commit, for the PostgreSQL broker.
pub use history::{HISTORY_CHANNEL, HistoryNotice, NoticeEvent};

/// The channel the triggers of migration 0011 notify in every transaction that changes an
/// app, an endpoint, an API token or an ingest source. The payload is the schema of the table
/// changed (channels are the database's, shared by every schema). The broker that hears its
/// own schema there empties its node's cache ([`PostgresStore::cache`]).
pub const CONFIG_CHANNEL: &str = "herald_config";

use std::{str::FromStr, time::Duration};

use sqlx::{
    AssertSqlSafe, Executor, PgPool, Postgres, QueryBuilder,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{Page, Result, StoreLifecycle};

/// The connection pool's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// Connections open at most (the node's share of the server's `max_connections`).
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long a query waits for a free connection before it fails.
    pub acquire_timeout: Duration,
    /// The schema Herald's tables live in (every connection's `search_path`), which must
    /// exist; `None`: the server's default (`public`, as the role's `search_path` says). Lets
    /// several Herald deployments, or tests, share one database.
    pub schema: Option<String>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(10),
            schema: None,
        }
    }
}

pub struct PostgresStore {
    pool: PgPool,
    /// Whether a commit that assigns history offsets announces them with `pg_notify` (see
    /// `history`); off when the cluster's publications travel on a bus instead.
    announce_history: std::sync::atomic::AtomicBool,
    /// Encrypts the secrets written and decrypts those read (see `crate::secrets`).
    keys: crate::secrets::Keyring,
    /// Tells the other nodes, after the commit, that new deliveries are due (see `wake`).
    due: std::sync::Arc<wake::DueNotifier>,
    /// Where each commit of a hot write is recorded, once `observe_commits` says.
    commits: batch::CommitMetrics,
    /// The group commits of message creates and attempt records (see `batch`).
    batches: batch::Batches,
    /// Apps, endpoints, tokens and sources as last read; paused until the broker listens on
    /// [`CONFIG_CHANNEL`] (see the module doc).
    cache: std::sync::Arc<crate::Cache>,
    /// The database's clock as this node reads it: what leases, due times and heartbeats are
    /// compared in (see [`crate::ClusterClock`]). Measured at open; the broker's session
    /// checks measure it again.
    clock: crate::ClusterClock,
}

impl PostgresStore {
    /// Connect to the database `url` names and bring its schema up to date. Errors never
    /// repeat the URL, which may hold a password. Secrets are encrypted under the key the
    /// cluster generated into the database (see [`PostgresStore::open_with_keys`]).
    pub async fn open(url: &str, options: PostgresOptions) -> Result<Self> {
        Self::open_with_keys(url, options, None).await
    }

    /// [`PostgresStore::open`], with secrets encrypted under `keys` (the configured main key,
    /// and previous ones that still decrypt); `None`: under a key the first node generates
    /// into the database itself, which protects nothing from whoever reads the database
    /// (logged at every start). Fails if the store holds secrets under a key this node is not
    /// given; encrypts any secret an earlier version stored in clear.
    pub async fn open_with_keys(
        url: &str,
        options: PostgresOptions,
        keys: Option<crate::secrets::Keyring>,
    ) -> Result<Self> {
        // No JIT: Herald's statements are short OLTP work, and the planner's cost estimates
        // for the claim (a walk of a queue it cannot size) crossed `jit_above_cost`, so each
        // claim compiled itself first: 57 ms of a 60 ms claim at 200,000 queued.
        let connect = PgConnectOptions::from_str(url)?.options([("jit", "off")]);
        let mut pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(options.min_connections.min(options.max_connections))
            .acquire_timeout(options.acquire_timeout);
        if let Some(schema) = &options.schema {
            let set = format!("SET search_path TO {}", quote_identifier(schema));
            pool = pool.after_connect(move |conn, _meta| {
                let set = AssertSqlSafe(set.clone());
                Box::pin(async move {
                    conn.execute(set).await?;
                    Ok(())
                })
            });
        }
        let pool = pool.connect_with(connect).await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let census = secrets::census(&pool).await?;
        let keys = secrets::resolve_keys(&pool, keys, &census).await?;
        if let Some(key_ids) = census.missing_from(&keys) {
            return Err(crate::secrets::SecretError::KeysMissing { key_ids }.into());
        }
        if census.plaintext > 0 {
            // Written by a version before encryption at rest.
            let done = secrets::reencrypt(&pool, &keys, false, 100).await?;
            tracing::info!(
                encrypted = done.rewritten,
                "encrypted the secrets an earlier version stored in clear"
            );
        }
        let clock = crate::ClusterClock::default();
        read_clock(&pool, &clock).await?;
        let due = wake::DueNotifier::new(pool.clone());
        let commits = batch::CommitMetrics::default();
        Ok(Self {
            clock,
            batches: batch::Batches::start(&pool, &commits, &due),
            due,
            commits,
            pool,
            announce_history: std::sync::atomic::AtomicBool::new(true),
            keys,
            cache: std::sync::Arc::new(crate::Cache::paused()),
        })
    }

    /// This store as a node whose own clock reads `local` would open it: measured against
    /// the database's clock again, as at open. For the tests of what the measurement corrects.
    #[cfg(any(test, feature = "conformance"))]
    pub async fn reading_local_clock(
        mut self,
        local: fn() -> chrono::DateTime<chrono::Utc>,
    ) -> Result<Self> {
        self.clock = crate::ClusterClock::reading(local);
        read_clock(&self.pool, &self.clock).await?;
        Ok(self)
    }

    /// This node's cache of apps, endpoints, API tokens and ingest sources. It starts paused
    /// (every read goes to the database); the broker resumes it once its LISTEN session hears
    /// [`CONFIG_CHANNEL`], empties it on each notification there, and pauses it whenever the
    /// session is lost, so it never serves what another node has changed after the
    /// notification of that change arrived.
    pub fn cache(&self) -> std::sync::Arc<crate::Cache> {
        std::sync::Arc::clone(&self.cache)
    }

    /// An app looked up by `query` with `value`, remembered under `cache_key` (extra keys
    /// contain ':', which ids and uids cannot, so they never collide with them).
    async fn cached_app(
        &self,
        cache_key: &str,
        query: &'static str,
        value: impl for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
    ) -> Result<Option<herald_core::model::App>> {
        let read = async {
            sqlx::query(query)
                .bind(value)
                .fetch_optional(&self.pool)
                .await?
                .map(|row| rows::app(&row, &self.keys))
                .transpose()
        };
        self.cache
            .read_through(self.cache.app(cache_key), read, |cache, generation, app| {
                cache.put_app_as(generation, cache_key, app);
            })
            .await
    }

    /// Whether committed history entries are announced on `HISTORY_CHANNEL` (the PostgreSQL
    /// broker hears them there). A cluster whose publications travel on Redis or NATS turns
    /// it off: nobody listens, and each announcement costs the commit a queue write.
    pub fn announce_history(&self, announce: bool) {
        self.announce_history
            .store(announce, std::sync::atomic::Ordering::Relaxed);
    }

    fn announces_history(&self) -> bool {
        self.announce_history
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The connection pool, shared with the PostgreSQL broker (its LISTEN session and the
    /// notifications it sends run on the same database and schema).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// The server and database a connection URL names, for messages and logs: `host:port,
/// database name`, never the user or password. `None` if the URL does not parse.
pub fn describe_server(url: &str) -> Option<String> {
    let options = PgConnectOptions::from_str(url).ok()?;
    let database = options
        .get_database()
        .map(|d| format!(", database {d}"))
        .unwrap_or_default();
    Some(format!(
        "{}:{}{database}",
        options.get_host(),
        options.get_port()
    ))
}

/// Connects to the database `url` names and reads its schema version and clock, without
/// writing (`herald doctor`). A database Herald has not migrated yet reports 0 applied.
pub async fn inspect(url: &str) -> Result<crate::Inspection> {
    let known_migrations = sqlx::migrate!("./migrations/postgres").iter().count();
    let connect = PgConnectOptions::from_str(url)?;
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect_with(&connect).await?;
    let server_time = server_time(&mut connection).await?;
    let has_table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut connection)
        .await?;
    let applied_migrations = if has_table {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(&mut connection)
            .await?;
        usize::try_from(count).unwrap_or(0)
    } else {
        0
    };
    sqlx::Connection::close(connection).await?;
    Ok(crate::Inspection {
        applied_migrations,
        known_migrations,
        server_time: Some(server_time),
    })
}

/// `name` as a quoted SQL identifier: any text names exactly that schema.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Appends the keyset-pagination clause and ordering; fetches one extra row so the caller can
/// tell whether another page exists (as the SQLite store's `paginate`).
fn paginate(query: &mut QueryBuilder<Postgres>, column: &str, page: &Page) {
    if let Some(iterator) = &page.iterator {
        let op = if page.descending { " < " } else { " > " };
        query.push(format!(" AND {column}{op}"));
        query.push_bind(iterator.clone());
    }
    let order = if page.descending { "DESC" } else { "ASC" };
    query.push(format!(" ORDER BY {column} {order} LIMIT "));
    query.push_bind(i64::from(page.limit) + 1);
}

#[async_trait::async_trait]
impl StoreLifecycle for PostgresStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        // Every write commits before its call returns (a batched one too: its caller waits for
        // the batch's commit): nothing is pending but the connections.
        self.pool.close().await;
    }

    fn observe_commits(&self, metrics: std::sync::Arc<herald_metrics::StoreMetrics>) {
        let _ = self.commits.set(metrics);
    }

    fn clock(&self) -> crate::ClusterClock {
        self.clock.clone()
    }
}

/// Measures `clock` against the database's clock: one round trip on `executor` (see
/// [`crate::ClusterClock::observe`]).
pub async fn read_clock<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    clock: &crate::ClusterClock,
) -> Result<()> {
    let sent = std::time::Instant::now();
    let reference = server_time(executor).await?;
    clock.observe(sent, reference, std::time::Instant::now());
    Ok(())
}

/// The database server's clock now (`clock_timestamp()`, to the microsecond).
async fn server_time<'e>(
    executor: impl sqlx::PgExecutor<'e>,
) -> Result<chrono::DateTime<chrono::Utc>> {
    let micros: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
            .fetch_one(executor)
            .await?;
    chrono::DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| crate::StoreError::Corrupt(format!("server time {micros} µs")))
}

impl PostgresStore {
    /// Records the commit of a hot write that committed alone, if metrics are observed.
    pub(crate) fn committed(&self, started: std::time::Instant) {
        if let Some(metrics) = self.commits.get() {
            metrics.commit(1, started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use sqlx::Connection;

    use super::*;
    use crate::conformance;

    const URL_VAR: &str = "HERALD_TEST_POSTGRES_URL";

    #[tokio::test]
    async fn inspect_reads_the_servers_clock_and_the_schema_version() {
        let Ok(url) = std::env::var(URL_VAR) else {
            herald_test_support::skip!("{URL_VAR} is not set");
            return;
        };
        let inspection = inspect(&url).await.expect("inspect");
        assert!(inspection.known_migrations >= 9, "{inspection:?}");
        let skew = chrono::Utc::now() - inspection.server_time.expect("a server clock");
        assert!(
            skew.num_seconds().abs() < 60,
            "the same machine's clock: {skew}"
        );
        let refused = inspect("postgres://nobody:wrong@127.0.0.1:1/none").await;
        assert!(refused.is_err(), "nothing listens on port 1");
    }

    /// Drops its schema (and everything in it) when dropped, even after a failed check.
    pub(super) struct SchemaGuard {
        url: String,
        schema: String,
    }

    impl Drop for SchemaGuard {
        fn drop(&mut self) {
            // Drop cannot await: drop the schema on a thread with a runtime of its own.
            let (url, schema) = (self.url.clone(), self.schema.clone());
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async move {
                    let mut conn = sqlx::PgConnection::connect(&url).await?;
                    let drop = format!(
                        "DROP SCHEMA IF EXISTS {} CASCADE",
                        quote_identifier(&schema)
                    );
                    conn.execute(AssertSqlSafe(drop)).await?;
                    conn.close().await
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("could not drop the test schema {}", self.schema);
            }
        }
    }

    /// A store in a new, empty schema of its own.
    pub(super) async fn open_in_fresh_schema(url: String) -> (SchemaGuard, PostgresStore) {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let schema = format!(
            "herald_test_{}_{nanos}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        conn.execute(AssertSqlSafe(format!(
            "CREATE SCHEMA {}",
            quote_identifier(&schema)
        )))
        .await
        .expect("create the test schema");
        conn.close().await.expect("close");
        let guard = SchemaGuard {
            url: url.clone(),
            schema,
        };
        let store = open_in_schema(&url, &guard).await;
        (guard, store)
    }

    /// Another store on `guard`'s schema (another node of the same cluster), connecting with
    /// `url`: the guard's server, with connection parameters a test may add.
    pub(super) async fn open_in_schema(url: &str, guard: &SchemaGuard) -> PostgresStore {
        let options = PostgresOptions {
            max_connections: 8,
            schema: Some(guard.schema.clone()),
            ..PostgresOptions::default()
        };
        PostgresStore::open(url, options).await.expect("open")
    }

    /// A constraint, or a value PostgreSQL cannot hold (SQLSTATE classes 23 and 22), is data
    /// it refuses; a pool that timed out is not.
    #[tokio::test]
    async fn a_constraint_or_a_bad_value_is_data_refused() {
        let Some(url) = messages::tests::server_url() else {
            return;
        };
        let (_guard, store) = open_in_fresh_schema(url).await;
        let app = conformance::stored_app(&store, "A").await;
        let unique = sqlx::query("INSERT INTO apps (id) VALUES ($1)")
            .bind(app.id.as_str())
            .execute(&store.pool)
            .await
            .expect_err("the same key, or a NOT NULL column left out");
        assert!(crate::StoreError::from(unique).refuses_the_data());
        let nul = sqlx::query("SELECT $1::text")
            .bind("a\u{0}b")
            .execute(&store.pool)
            .await
            .expect_err("PostgreSQL text holds no NUL");
        assert!(crate::StoreError::from(nul).refuses_the_data());
        assert!(!crate::StoreError::Database(sqlx::Error::PoolTimedOut).refuses_the_data());
        store.close().await;
    }

    #[tokio::test]
    async fn passes_the_store_conformance_suite() {
        let Some(url) = messages::tests::server_url() else {
            return;
        };
        // With the node cache serving, as on a node whose broker listens: this node's writes
        // must reach its own reads at once, without a notification.
        conformance::run_all(|| async {
            let (guard, store) = open_in_fresh_schema(url.clone()).await;
            store.cache().resume();
            (guard, store)
        })
        .await;
    }

    #[tokio::test]
    async fn a_recovery_larger_than_a_batch_requeues_every_failed_delivery() {
        let Some(url) = messages::tests::server_url() else {
            return;
        };
        let (_guard, store) = open_in_fresh_schema(url).await;
        conformance::a_recovery_larger_than_a_batch_requeues_every_failed_delivery(
            &store,
            || async {
                sqlx::query("UPDATE deliveries SET status = $1, next_attempt_at = NULL")
                    .bind(herald_core::model::DeliveryStatus::Fail as i32)
                    .execute(store.pool())
                    .await
                    .expect("fail them");
            },
        )
        .await;
        store.close().await;
    }

    #[tokio::test]
    async fn passes_the_store_conformance_suite_with_the_cache_paused() {
        let Some(url) = messages::tests::server_url() else {
            return;
        };
        // As on a node whose LISTEN session is lost: every read goes to the database.
        conformance::run_all(|| open_in_fresh_schema(url.clone())).await;
    }

    /// Ids sort by time in byte order only. On a database whose default collation is not byte
    /// order (ICU's en-US here, as on many hosted databases), every id column still compares
    /// bytewise: otherwise retention's `id < <a time's lower bound>` deletes young rows.
    #[tokio::test]
    async fn id_columns_compare_bytewise_whatever_the_databases_collation() {
        use crate::{MessageStore, RetentionStore};
        use chrono::Utc;
        use herald_core::model::Message;
        let Some(url) = messages::tests::server_url() else {
            return;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let database = format!("herald_test_icu_{}_{nanos}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
        admin
            .execute(AssertSqlSafe(format!(
                "CREATE DATABASE {} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'",
                quote_identifier(&database)
            )))
            .await
            .expect("create a database collating by ICU's en-US");
        let (server, _) = url.rsplit_once('/').expect("a URL naming a database");
        let store =
            PostgresStore::open(&format!("{server}/{database}"), PostgresOptions::default())
                .await
                .expect("open and migrate");
        let by_default: bool = sqlx::query_scalar("SELECT 'msg_3Jb' < 'msg_3JK'")
            .fetch_one(store.pool())
            .await
            .expect("compare");
        assert!(by_default, "the database's own collation is not byte order");
        let not_bytewise: Vec<String> = sqlx::query_scalar(
            r"SELECT table_name || '.' || column_name FROM information_schema.columns
             WHERE table_schema = current_schema() AND data_type = 'text'
               AND (column_name = 'id' OR column_name LIKE '%\_id')
               AND table_name NOT LIKE '\_sqlx%'
               AND collation_name IS DISTINCT FROM 'C'",
        )
        .fetch_all(store.pool())
        .await
        .expect("columns");
        assert_eq!(not_bytewise, Vec::<String>::new());
        // Retention: a message younger than the cutoff whose id the database's own collation
        // would put below the cutoff's lower bound (a lowercase letter against an uppercase
        // one a few hours on) is kept.
        let cutoff = Utc::now();
        let bound = herald_core::id::lower_bound("msg", cutoff);
        let mut young = None;
        for hours in 1..=24 * 60 {
            let at = cutoff + chrono::Duration::hours(hours);
            let id = herald_core::MessageId::new(at);
            let below: bool = sqlx::query_scalar("SELECT $1::text < $2::text")
                .bind(id.as_str())
                .bind(&bound)
                .fetch_one(store.pool())
                .await
                .expect("compare");
            if below {
                young = Some((id, at));
                break;
            }
        }
        let (id, at) = young.expect("within 60 days an id collates below the cutoff's bound");
        let app = conformance::stored_app(&store, "collation").await;
        let message = Message {
            id: id.clone(),
            created_at: at,
            ..conformance::message(&app.id, None)
        };
        store.create_message(message, vec![]).await.expect("create");
        let deleted = store
            .delete_messages_before(cutoff, crate::RETENTION_BATCH)
            .await
            .expect("retention");
        assert_eq!(deleted, 0, "{id}, created after the cutoff, is kept");
        assert!(
            store
                .get_message(&app.id, id.as_str())
                .await
                .expect("read")
                .is_some()
        );
        store.close().await;
        admin
            .execute(AssertSqlSafe(format!(
                "DROP DATABASE {} WITH (FORCE)",
                quote_identifier(&database)
            )))
            .await
            .expect("drop the database");
    }

    #[test]
    fn a_server_is_described_without_its_credentials() {
        let described = describe_server("postgres://herald:secret@db.internal:5433/herald");
        assert_eq!(
            described.as_deref(),
            Some("db.internal:5433, database herald")
        );
        assert_eq!(describe_server("not a url"), None);
    }

    #[test]
    fn identifiers_are_quoted_whole() {
        assert_eq!(quote_identifier("herald"), "\"herald\"");
        assert_eq!(quote_identifier("a\"b; DROP"), "\"a\"\"b; DROP\"");
    }
}
