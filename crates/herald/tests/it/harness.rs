//! Test server and webhook receiver.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::post,
};
use herald::Config;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// Upper bound for anything a test waits on; generous because CI machines are shared.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The store the suite runs on: `HERALD_TEST_STORE` (`sqlite`, the default, or `postgres`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const POSTGRES_URL_VAR: &str = "HERALD_TEST_POSTGRES_URL";

pub fn backend() -> Backend {
    match std::env::var("HERALD_TEST_STORE").as_deref() {
        Err(_) | Ok("" | "sqlite") => Backend::Sqlite,
        Ok("postgres") => Backend::Postgres,
        Ok(other) => panic!("HERALD_TEST_STORE={other}: the backends are sqlite and postgres"),
    }
}

/// True (after saying so) when the suite runs on PostgreSQL: for tests about what SQLite
/// keeps on disk (files, pages, `PRAGMA`s), which have no PostgreSQL counterpart.
pub fn sqlite_only(why: &str) -> bool {
    let skip = backend() == Backend::Postgres;
    if skip {
        herald_test_support::skip!("on postgres: {why}");
    }
    skip
}

/// The PostgreSQL server the suite runs on; a run that asked for postgres without naming one
/// stops here.
pub fn postgres_admin_url() -> String {
    std::env::var(POSTGRES_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "HERALD_TEST_STORE=postgres needs {POSTGRES_URL_VAR} \
             (postgres://USER:PASSWORD@HOST:PORT/DATABASE, a role that may CREATE DATABASE)"
        )
    })
}

/// How a cluster's nodes carry publications to each other: `HERALD_TEST_BROKER` (`postgres`,
/// the default: LISTEN/NOTIFY; `redis` or `nats`: a bus on the server `HERALD_TEST_REDIS_URL`
/// or `HERALD_TEST_NATS_URL` names). The store stays PostgreSQL either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBroker {
    Postgres,
    Redis,
    Nats,
}

pub fn test_broker() -> TestBroker {
    match std::env::var("HERALD_TEST_BROKER").as_deref() {
        Err(_) | Ok("" | "postgres") => TestBroker::Postgres,
        Ok("redis") => TestBroker::Redis,
        Ok("nats") => TestBroker::Nats,
        Ok(other) => {
            panic!("HERALD_TEST_BROKER={other}: the brokers are postgres, redis and nats")
        }
    }
}

impl TestBroker {
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::Nats => "nats",
        }
    }

    /// The bus's `broker.url`, `None` for LISTEN/NOTIFY; a run that asked for a bus without
    /// naming its server stops here.
    pub fn url(self) -> Option<String> {
        let var = match self {
            Self::Postgres => return None,
            Self::Redis => "HERALD_TEST_REDIS_URL",
            Self::Nats => "HERALD_TEST_NATS_URL",
        };
        Some(std::env::var(var).unwrap_or_else(|_| {
            panic!(
                "HERALD_TEST_BROKER={} needs {var} (the server's URL, e.g. {})",
                self.name(),
                match self {
                    Self::Nats => "nats://127.0.0.1:4222",
                    _ => "redis://127.0.0.1:6379",
                }
            )
        }))
    }
}

/// `broker.url` and `broker.topic` for the nodes sharing the database `db_name` (one cluster),
/// or `None` when the suite's broker is PostgreSQL's LISTEN/NOTIFY. The topic is the
/// database's own, so clusters of tests running at once never hear each other.
pub fn cluster_broker(db_name: &str) -> Option<(String, String)> {
    let url = test_broker().url()?;
    Some((url, format!("herald.test.{db_name}")))
}

/// Sets `config.broker` for a node of the cluster on the database `db_name` (see
/// [`cluster_broker`]).
pub fn join_cluster_broker(config: &mut Config, db_name: &str) {
    if let Some((url, topic)) = cluster_broker(db_name) {
        config.broker.url = Some(url);
        config.broker.topic = topic;
    }
}

/// The same as environment variables for a `herald` process whose store is `store_url`:
/// `HERALD_BROKER__URL` and `HERALD_BROKER__TOPIC` when it is a PostgreSQL database and the
/// suite's broker is a bus, nothing otherwise (SQLite has no cluster).
pub fn cluster_broker_env(store_url: &str) -> Vec<(&'static str, String)> {
    let Ok(url) = url::Url::parse(store_url) else {
        return Vec::new();
    };
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Vec::new();
    }
    let db_name = url.path().trim_start_matches('/');
    cluster_broker(db_name).map_or_else(Vec::new, |(url, topic)| {
        vec![("HERALD_BROKER__URL", url), ("HERALD_BROKER__TOPIC", topic)]
    })
}

pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: data_dir.to_owned(),
        admin_token: Some(ADMIN_TOKEN.into()),
        shutdown_grace_secs: 5.0,
        ..Config::default()
    };
    let d = &mut config.delivery;
    d.allow_private_targets = true;
    d.retry_schedule_secs = vec![0.05, 0.05, 0.05];
    d.retry_jitter = 0.0;
    d.overload_penalty_secs = 0.05;
    d.request_timeout_secs = 2.0;
    config
}

/// A throwaway database on the server `HERALD_TEST_POSTGRES_URL` names, dropped by
/// [`ThrowawayDatabase::drop_now`] or, failing that, when dropped (best effort).
pub struct ThrowawayDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
    dropped: bool,
}

/// Databases are named `herald_it_<pid>_<n>`: a later run drops those of processes that no
/// longer exist (a test's data directory kept across restarts, a killed run).
const DB_PREFIX: &str = "herald_it_";

impl ThrowawayDatabase {
    /// `None` (and a note saying so) when `HERALD_TEST_POSTGRES_URL` is unset: for tests
    /// that need PostgreSQL whatever the suite's backend.
    pub async fn create_if_configured(test: &str) -> Option<Self> {
        if std::env::var(POSTGRES_URL_VAR).is_err() {
            herald_test_support::skip!(
                "{test}: {POSTGRES_URL_VAR} is unset (it needs a PostgreSQL server)"
            );
            return None;
        }
        Some(Self::create().await)
    }

    /// A new, empty database; panics when `HERALD_TEST_POSTGRES_URL` is unset.
    pub async fn create() -> Self {
        use sqlx::{Connection, PgConnection};
        use std::sync::atomic::{AtomicU64, Ordering};

        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
        let admin_url = postgres_admin_url();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "{DB_PREFIX}{}_{nanos}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {POSTGRES_URL_VAR}: {e}"));
        SWEPT.get_or_init(|| sweep_leftovers(&mut conn)).await;
        // The name is made of digits and underscores here, never of input.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create a database");
        conn.close().await.expect("close");
        let mut url = url::Url::parse(&admin_url).expect("a URL");
        url.set_path(&name);
        Self {
            admin_url,
            name,
            url: url.to_string(),
            dropped: false,
        }
    }

    pub async fn drop_now(mut self) {
        self.dropped = true;
        // `WITH (FORCE)` cannot end a session of another role (an autovacuum worker that just
        // started on the database): retry while it finishes; a database still left is dropped
        // by a later run's sweep, so a cleanup never fails the test.
        for attempt in 1..=10u64 {
            match drop_database(&self.admin_url, &self.name).await {
                Ok(()) => return,
                Err(e) if attempt == 10 => {
                    eprintln!("could not drop the test database {}: {e}", self.name);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100 * attempt)).await,
            }
        }
    }

    /// Keeps the database past this value (a later run's sweep drops it).
    pub fn keep(mut self) {
        self.dropped = true;
    }
}

impl Drop for ThrowawayDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop cannot await: drop the database on a thread with a runtime of its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(drop_database(&admin_url, &name))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    use sqlx::{Connection, PgConnection};
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await
}

/// Drops the databases earlier runs left behind (their process is gone).
async fn sweep_leftovers(conn: &mut sqlx::PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'herald\\_it\\_%'")
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    for name in names {
        let Some(pid) = name
            .strip_prefix(DB_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&mut *conn)
            .await;
        }
    }
}

/// The database standing in for a data directory a test chose itself (to restart on the same
/// state): one per directory for the life of this process, reused by every server started
/// on it, left for the next run's sweep.
pub async fn database_for_dir(dir: &std::path::Path) -> String {
    static BY_DIR: std::sync::LazyLock<
        tokio::sync::Mutex<std::collections::HashMap<std::path::PathBuf, String>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut by_dir = BY_DIR.lock().await;
    if let Some(url) = by_dir.get(dir) {
        return url.clone();
    }
    let db = ThrowawayDatabase::create().await;
    let url = db.url.clone();
    db.keep();
    by_dir.insert(dir.to_owned(), url.clone());
    url
}

/// A store for in-process tests on the suite's backend, in `dir` (SQLite) or a throwaway
/// database (PostgreSQL; dropped with the returned guard).
pub async fn test_store(
    dir: &std::path::Path,
) -> (Arc<dyn herald_store::Store>, Option<ThrowawayDatabase>) {
    match backend() {
        Backend::Sqlite => {
            let store = herald_store::sqlite::SqliteStore::open(dir)
                .await
                .expect("store");
            (Arc::new(store), None)
        }
        Backend::Postgres => {
            let db = ThrowawayDatabase::create().await;
            let store = herald_store::postgres::PostgresStore::open(
                &db.url,
                herald_store::postgres::PostgresOptions::default(),
            )
            .await
            .expect("store");
            (Arc::new(store), Some(db))
        }
    }
}

/// reqwest is built without a bundled TLS provider (see herald-delivery); install ring once.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub struct TestServer {
    pub base: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    /// `None` for a server running in another process.
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// PostgreSQL: the database this server's store is in.
    store_url: Option<String>,
    /// PostgreSQL: the database made for this server alone, dropped with it.
    db: Option<ThrowawayDatabase>,
    _dir: Option<tempfile::TempDir>,
}

/// The in-process servers' log filter (as `HERALD_LOG` is the binary's), e.g.
/// `herald_cluster=debug`. Their lines go to the test's captured output, shown when it fails:
/// a rare failure then carries its story.
const LOG_VAR: &str = "HERALD_TEST_LOG";

fn log_if_asked() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env(LOG_VAR) {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server on the suite's backend ([`backend`]). On PostgreSQL each server gets a
    /// database of its own, dropped when it stops; a test that sets `data_dir` itself (to
    /// restart on the same state) gets one database per directory, shared by its servers.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        log_if_asked();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let (mut store_url, mut db) = (None, None);
        if backend() == Backend::Postgres && config.store.url.is_none() {
            let url = if config.data_dir == dir.path() {
                let fresh = ThrowawayDatabase::create().await;
                let url = fresh.url.clone();
                db = Some(fresh);
                url
            } else {
                database_for_dir(&config.data_dir).await
            };
            config.store.url = Some(url.clone());
            store_url = Some(url);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        // A server that stops by itself says why: a test meeting its closed port then fails
        // with the cause in its output, not only "connection refused".
        let run = herald::run(listener, config, shutdown.clone());
        let name = base.clone();
        let task = tokio::spawn(async move {
            let ended = run.await;
            if let Err(e) = &ended {
                eprintln!("server {name} stopped with an error: {e:#}");
            }
            ended
        });
        Self {
            base,
            http: http_client(),
            shutdown,
            task: Some(task),
            store_url,
            db,
            _dir: Some(dir),
        }
    }

    /// One number read from the server's store through a separate connection, for tests
    /// about what is kept (rows, bytes): the SQLite file read-only, or the server's
    /// PostgreSQL database (the value cast to BIGINT there, as `COUNT` and `SUM` differ).
    pub async fn store_scalar(&self, sql: &'static str) -> i64 {
        if let Some(url) = &self.store_url {
            use sqlx::{Connection, PgConnection};
            let mut conn = PgConnection::connect(url)
                .await
                .expect("connect to the store");
            let value: Option<i64> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT ({sql})::BIGINT")))
                    .fetch_one(&mut conn)
                    .await
                    .expect("query the store");
            let _ = conn.close().await;
            return value.unwrap_or(0);
        }
        use sqlx::{
            ConnectOptions,
            sqlite::{SqliteConnectOptions, SqliteConnection},
        };
        let dir = self._dir.as_ref().expect("a server started by this test");
        let mut conn: SqliteConnection = SqliteConnectOptions::new()
            .filename(dir.path().join(herald_store::sqlite::DB_FILE))
            .read_only(true)
            .connect()
            .await
            .expect("open the store read-only");
        let value: Option<i64> = sqlx::query_scalar(sql)
            .fetch_one(&mut conn)
            .await
            .expect("query the store");
        value.unwrap_or(0)
    }

    /// The server's data directory (SQLite's files), if this test started it.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self._dir.as_ref().map(|dir| dir.path())
    }

    /// Whether the server's store is PostgreSQL.
    pub fn on_postgres(&self) -> bool {
        self.store_url.is_some()
    }

    /// PostgreSQL: the URL of the server's database.
    pub fn store_url(&self) -> Option<&str> {
        self.store_url.as_deref()
    }

    /// API helpers for a server started elsewhere (a child process).
    pub fn remote(base: String) -> Self {
        Self {
            base,
            http: http_client(),
            shutdown: CancellationToken::new(),
            task: None,
            store_url: None,
            db: None,
            _dir: None,
        }
    }

    /// Ends the server task abruptly, as a kill would: no graceful stop runs (tasks it
    /// spawned are not awaited either).
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server did not stop in time")
                .expect("server task panicked")
                .expect("server stopped with an error");
        }
        if let Some(db) = self.db.take() {
            db.drop_now().await;
        }
    }

    /// Calls the API as the admin; returns status and JSON body (`null` when empty).
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(Some(ADMIN_TOKEN), method, path, body, None)
            .await
    }

    /// Calls the API as the admin on a server that may be gone: the status, or `None` when the
    /// request failed (refused, reset).
    pub async fn try_call(&self, method: Method, path: &str, body: Value) -> (Option<u16>, ()) {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await;
        (response.ok().map(|r| r.status().as_u16()), ())
    }

    pub async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
        idempotency_key: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("non-JSON body: {}", String::from_utf8_lossy(&bytes)))
        };
        (status, value)
    }

    pub async fn raw_post(&self, path: &str, body: &'static str) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON error body"))
    }

    pub async fn create_app(&self, uid: &str) -> String {
        let (status, app) = self
            .call(
                Method::POST,
                "/api/v1/app",
                Some(json!({"name": uid, "uid": uid})),
            )
            .await;
        assert_eq!(status, 201, "{app}");
        app["id"].as_str().expect("app id").to_owned()
    }

    pub async fn create_endpoint(&self, app: &str, body: Value) -> Value {
        let (status, ep) = self
            .call(
                Method::POST,
                &format!("/api/v1/app/{app}/endpoint"),
                Some(body),
            )
            .await;
        assert_eq!(status, 201, "{ep}");
        ep
    }

    pub async fn send(&self, app: &str, body: Value) -> Value {
        let (status, msg) = self
            .call(Method::POST, &format!("/api/v1/app/{app}/msg"), Some(body))
            .await;
        assert_eq!(status, 201, "{msg}");
        msg
    }

    pub async fn stats(&self, app: &str, endpoint: &str) -> Value {
        let (status, stats) = self
            .call(
                Method::GET,
                &format!("/api/v1/app/{app}/endpoint/{endpoint}/stats"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{stats}");
        stats
    }

    /// Waits until the endpoint has no delivery pending or in flight.
    pub async fn settled(&self, app: &str, endpoint: &str) -> Value {
        eventually("deliveries to settle", || async {
            let stats = self.stats(app, endpoint).await;
            (stats["pending"] == 0 && stats["sending"] == 0).then_some(stats)
        })
        .await
    }
}

/// Polls `check` until it yields a value, failing the test after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// A status with `Retry-After: <secs>`.
    RetryAfter(u16, u64),
    /// Never answer (until the client gives up or dies).
    Hang,
    /// A status with this body.
    Body(u16, &'static [u8]),
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub path: String,
    pub reply: Reply,
}

impl Delivery {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("missing header {name}"))
    }

    pub fn succeeded(&self) -> bool {
        matches!(
            self.reply,
            Reply::Status(200..=299) | Reply::Body(200..=299, _)
        )
    }
}

/// Chooses a reply from the request body and how many times this `webhook-id` came before.
pub type Rule = fn(&[u8], u32) -> Reply;

#[derive(Clone)]
struct ReceiverState {
    script: Arc<Mutex<VecDeque<Reply>>>,
    fallback: Arc<Mutex<Reply>>,
    rule: Arc<Mutex<Option<Rule>>>,
    times_seen: Arc<Mutex<std::collections::HashMap<String, u32>>>,
    seen: mpsc::UnboundedSender<Delivery>,
}

/// A local webhook endpoint that records every request and answers from a script.
pub struct Receiver {
    pub url: String,
    state: ReceiverState,
    seen: mpsc::UnboundedReceiver<Delivery>,
}

impl Receiver {
    pub async fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = ReceiverState {
            script: Arc::default(),
            fallback: Arc::new(Mutex::new(Reply::Status(200))),
            rule: Arc::default(),
            times_seen: Arc::default(),
            seen: tx,
        };
        let app = Router::new()
            .route("/{*path}", post(receive))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            state,
            seen: rx,
        }
    }

    /// The next replies, in order; after them, the fallback.
    pub fn script(&self, replies: &[Reply]) {
        self.state
            .script
            .lock()
            .expect("lock")
            .extend(replies.iter().copied());
    }

    /// Replies by rule instead of script and fallback.
    pub fn rule(&self, rule: Rule) {
        *self.state.rule.lock().expect("lock") = Some(rule);
    }

    pub fn fallback(&self, reply: Reply) {
        *self.state.fallback.lock().expect("lock") = reply;
    }

    pub async fn next(&mut self) -> Delivery {
        self.next_within(PATIENCE).await
    }

    /// [`Receiver::next`], waiting up to `patience`.
    pub async fn next_within(&mut self, patience: Duration) -> Delivery {
        tokio::time::timeout(patience, self.seen.recv())
            .await
            .expect("timed out waiting for a delivery")
            .expect("receiver closed")
    }

    /// Everything received so far, without waiting.
    pub fn drain(&mut self) -> Vec<Delivery> {
        let mut all = Vec::new();
        while let Ok(d) = self.seen.try_recv() {
            all.push(d);
        }
        all
    }
}

async fn receive(
    State(state): State<ReceiverState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let before = {
        let mut times = state.times_seen.lock().expect("lock");
        let n = times.entry(id).or_insert(0);
        *n += 1;
        *n - 1
    };
    let rule = *state.rule.lock().expect("lock");
    let reply = match rule {
        Some(rule) => rule(&body, before),
        None => state
            .script
            .lock()
            .expect("lock")
            .pop_front()
            .unwrap_or_else(|| *state.fallback.lock().expect("lock")),
    };
    let _ = state.seen.send(Delivery {
        headers,
        body,
        path: uri.path().to_owned(),
        reply,
    });
    let code = |c: u16| StatusCode::from_u16(c).expect("status");
    match reply {
        Reply::Status(c) => (code(c), format!("reply {c}")).into_response(),
        Reply::RetryAfter(c, secs) => {
            (code(c), [("retry-after", secs.to_string())], "slow down").into_response()
        }
        Reply::Hang => std::future::pending().await,
        Reply::Body(c, body) => (code(c), body).into_response(),
    }
}
