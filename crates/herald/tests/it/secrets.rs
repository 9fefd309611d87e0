//! Secrets at rest: endpoint, ingest source and Pusher secrets are never stored in clear (the
//! SQLite files' bytes, PostgreSQL's columns), a rotation of the main key moves every one of
//! them to the new key, secrets an earlier version stored in clear are read and encrypted at
//! start, and no secret reaches the logs, even at trace level.

use std::{path::Path, process::Stdio, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use herald_store::secrets::{Keyring, MainKey};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::Command,
};

use crate::{
    harness::{
        ADMIN_TOKEN, Backend, PATIENCE, Receiver, TestServer, backend, database_for_dir,
        test_config,
    },
    ingest::{now, post, source, stripe_header},
};

/// A random text of `n` bytes in hex: secrets no test could contain by chance.
fn random_hex(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    hex::encode(bytes)
}

fn endpoint_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!("whsec_{}", STANDARD.encode(key))
}

/// The stored values [`write_secrets`] leaves encrypted: the app's two Pusher secrets, the
/// endpoint's secret, its retired secrets and its headers, and the source's secrets.
const SECRET_VALUES: u64 = 6;

/// The secrets one test wrote through the API, each known to the test.
struct Written {
    app: String,
    /// The app's Pusher secrets: the current one and the one it retired.
    pusher: [String; 2],
    endpoint: String,
    /// The endpoint's secrets: the current one and the one it retired.
    endpoint_secrets: [String; 2],
    /// What the endpoint sends in a header of its own (`X-Partner-Ref`: not one of the
    /// credential headers, which are never read back).
    endpoint_header: String,
    source: Value,
    source_secret: String,
}

impl Written {
    /// Every secret, and for endpoint secrets their base64 part too.
    fn needles(&self) -> Vec<String> {
        let mut needles: Vec<String> = self.pusher.to_vec();
        for secret in &self.endpoint_secrets {
            needles.push(secret.clone());
            needles.push(secret.trim_start_matches("whsec_").to_owned());
        }
        needles.push(self.source_secret.clone());
        needles.push(self.endpoint_header.clone());
        needles
    }
}

/// An app with a rotated Pusher secret, an endpoint (to `url`) with a rotated secret and a
/// Stripe source, every secret chosen here.
async fn write_secrets(server: &TestServer, uid: &str, url: &str) -> Written {
    let app = server.create_app(uid).await;
    let pusher = [random_hex(16), random_hex(16)];
    for secret in pusher.iter().rev() {
        let (status, body) = server
            .call(
                Method::POST,
                &format!("/api/v1/app/{app}/pusher/secret/rotate"),
                Some(json!({"secret": secret, "gracePeriodSeconds": 3600})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let endpoint_secrets = [endpoint_secret(), endpoint_secret()];
    let endpoint_header = format!("key-{}", random_hex(16));
    let endpoint = server
        .create_endpoint(
            &app,
            json!({"url": url, "secret": endpoint_secrets[1],
                   "headers": {"x-partner-ref": endpoint_header}}),
        )
        .await["id"]
        .as_str()
        .expect("endpoint id")
        .to_owned();
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint/{endpoint}/secret/rotate"),
            Some(json!({"key": endpoint_secrets[0], "gracePeriodSeconds": 3600})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let source_secret = format!("whsec_{}", random_hex(20));
    let source = source(
        server,
        &app,
        json!({"kind": "stripe", "secrets": [source_secret], "defaultChannel": "payments"}),
    )
    .await;
    Written {
        app,
        pusher,
        endpoint,
        endpoint_secrets,
        endpoint_header,
        source,
        source_secret,
    }
}

/// Everything above the store still sees the secrets in clear: the API shows them, and the
/// source's secret verifies a signed request.
async fn assert_readable(server: &TestServer, written: &Written) {
    let (status, app) = server
        .call(Method::GET, &format!("/api/v1/app/{}", written.app), None)
        .await;
    assert_eq!(status, 200, "{app}");
    assert_eq!(app["pusher"]["secret"], written.pusher[0].as_str());
    let (status, secret) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{}/endpoint/{}/secret",
                written.app, written.endpoint
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "{secret}");
    assert_eq!(secret["key"], written.endpoint_secrets[0].as_str());
    let (status, headers) = server
        .call(
            Method::GET,
            &format!(
                "/api/v1/app/{}/endpoint/{}/headers",
                written.app, written.endpoint
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "{headers}");
    assert_eq!(
        headers["headers"]["x-partner-ref"],
        written.endpoint_header.as_str()
    );
    let body = format!(
        r#"{{"id":"evt_{}","type":"payment_intent.succeeded","data":{{"object":{{}}}}}}"#,
        random_hex(8)
    );
    let header = stripe_header(&written.source_secret, body.as_bytes(), now());
    let (status, answer) = post(server, &written.source, &[header], body.as_bytes()).await;
    assert_eq!(status, 200, "the source's secret still verifies: {answer}");
}

/// The store `dir` stands for: its SQLite files, or the PostgreSQL database the harness keeps
/// for it.
async fn store_url(dir: &Path) -> Option<String> {
    match backend() {
        Backend::Sqlite => None,
        Backend::Postgres => Some(database_for_dir(dir).await),
    }
}

/// The stored value of every secret column, read past the store.
async fn stored_values(dir: &Path) -> Vec<String> {
    const SQL: &str = "SELECT pusher_secret AS v FROM apps
         UNION ALL SELECT pusher_previous_secret FROM apps WHERE pusher_previous_secret IS NOT NULL
         UNION ALL SELECT secret FROM endpoints
         UNION ALL SELECT previous_secrets FROM endpoints
         UNION ALL SELECT headers FROM endpoints
         UNION ALL SELECT secrets FROM ingest_sources";
    match store_url(dir).await {
        Some(url) => {
            use sqlx::{Connection, PgConnection};
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            sqlx::query_scalar(SQL)
                .fetch_all(&mut conn)
                .await
                .expect("read secrets")
        }
        None => {
            let mut conn = sqlite(dir).await;
            sqlx::query_scalar(SQL)
                .fetch_all(&mut conn)
                .await
                .expect("read secrets")
        }
    }
}

async fn sqlite(dir: &Path) -> sqlx::SqliteConnection {
    use sqlx::{ConnectOptions, sqlite::SqliteConnectOptions};
    SqliteConnectOptions::new()
        .filename(dir.join(herald_store::sqlite::DB_FILE))
        .connect()
        .await
        .expect("open the database file")
}

/// Runs `sql` on the store `dir` stands for, past the store.
async fn execute(dir: &Path, sql: &str, binds: &[&str]) {
    match store_url(dir).await {
        Some(url) => {
            use sqlx::{Connection, PgConnection};
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
            for bind in binds {
                query = query.bind(*bind);
            }
            query.execute(&mut conn).await.expect(sql);
        }
        None => {
            let mut conn = sqlite(dir).await;
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()));
            for bind in binds {
                query = query.bind(*bind);
            }
            query.execute(&mut conn).await.expect(sql);
        }
    }
}

/// Everything the store keeps, as raw as it can be had: on SQLite the database file and its
/// WAL after a checkpoint, byte for byte; on PostgreSQL every row of the tables that hold
/// secrets, as text.
async fn raw_store(dir: &Path) -> Vec<u8> {
    match store_url(dir).await {
        Some(url) => {
            use sqlx::{Connection, PgConnection};
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            let mut raw = Vec::new();
            for table in ["apps", "endpoints", "ingest_sources", "generated_main_key"] {
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT t::text FROM {table} t"
                )))
                .fetch_all(&mut conn)
                .await
                .expect("read rows");
                for row in rows {
                    raw.extend_from_slice(row.as_bytes());
                }
            }
            raw
        }
        None => {
            let mut conn = sqlite(dir).await;
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&mut conn)
                .await
                .expect("checkpoint");
            drop(conn);
            let db = dir.join(herald_store::sqlite::DB_FILE);
            let mut raw = std::fs::read(&db).expect("read the database file");
            let wal = dir.join(format!("{}-wal", herald_store::sqlite::DB_FILE));
            if let Ok(bytes) = std::fs::read(&wal) {
                raw.extend_from_slice(&bytes);
            }
            raw
        }
    }
}

fn assert_absent(raw: &[u8], needles: &[String]) {
    for needle in needles {
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} is in the store"
        );
    }
}

/// A server on `dir` (SQLite there, or the harness's database for it) with `keys`.
async fn server_on(dir: &Path, main: Option<&MainKey>, previous: &[&MainKey]) -> TestServer {
    let (main, previous) = (
        main.map(|k| k.to_base64().into()),
        previous.iter().map(|k| k.to_base64().into()).collect(),
    );
    TestServer::start_with(|config| {
        config.data_dir = dir.to_owned();
        config.main_key = main;
        config.previous_main_keys = herald::config::KeyList(previous);
    })
    .await
}

/// The store `dir` stands for, as `herald rotate-main-key` would name it.
async fn store_config(dir: &Path) -> herald::store::StoreConfig {
    let mut config = test_config(dir);
    config.store.url = store_url(dir).await;
    config.store_config().expect("store config")
}

#[tokio::test]
async fn no_secret_is_stored_in_clear() {
    let dir = tempfile::tempdir().expect("dir");
    let server = server_on(dir.path(), None, &[]).await;
    let written = write_secrets(&server, "secrets-at-rest", "http://127.0.0.1:9/").await;
    assert_readable(&server, &written).await;
    server.stop().await;

    let raw = raw_store(dir.path()).await;
    assert!(!raw.is_empty());
    assert_absent(&raw, &written.needles());
    let values = stored_values(dir.path()).await;
    assert_eq!(values.len() as u64, SECRET_VALUES, "{values:?}");
    for value in &values {
        assert!(value.starts_with("hk1."), "{value}");
    }
    if backend() == Backend::Sqlite {
        // The key generated beside the data, owner-only.
        let key = dir.path().join(herald_store::sqlite::KEY_FILE);
        let text = std::fs::read_to_string(&key).expect("the generated key");
        MainKey::from_base64(&text).expect("a main key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}

/// Data written under key A; the store switched to B with A as a previous key and rotated
/// (the library function); then B alone reads everything, and no value is under A any more.
#[tokio::test]
async fn a_rotation_moves_every_secret_to_the_new_key() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, b) = (MainKey::generate(), MainKey::generate());
    let server = server_on(dir.path(), Some(&a), &[]).await;
    let written = write_secrets(&server, "rotation", "http://127.0.0.1:9/").await;
    server.stop().await;
    let under_a = stored_values(dir.path()).await;
    assert!(
        under_a
            .iter()
            .all(|v| v.starts_with(&format!("hk1.{}.", a.id())))
    );

    // B alone cannot open a store that holds secrets under A: it says which key is missing.
    let config = store_config(dir.path()).await;
    let refused = herald::store::open(&config, Some(Keyring::new(&b, &[])))
        .await
        .err()
        .expect("B alone is refused before the rotation");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains(&a.id()) && refused.contains("previous_main_keys"),
        "{refused}"
    );

    // A server with B as main and A as previous reads both while the rotation runs.
    let rotating = server_on(dir.path(), Some(&b), &[&a]).await;
    let (done, key) =
        herald::store::rotate_main_key(&config, Some(Keyring::new(&b, std::slice::from_ref(&a))))
            .await
            .expect("rotate");
    assert_eq!(key, b.id());
    assert_eq!(done.rewritten + done.skipped, SECRET_VALUES, "{done:?}");
    assert_readable(&rotating, &written).await;
    rotating.stop().await;

    let server = server_on(dir.path(), Some(&b), &[]).await;
    assert_readable(&server, &written).await;
    server.stop().await;
    for value in stored_values(dir.path()).await {
        assert!(value.starts_with(&format!("hk1.{}.", b.id())), "{value}");
    }
    let raw = raw_store(dir.path()).await;
    assert_absent(&raw, &under_a);
    assert_absent(&raw, &written.needles());
}

/// A store started without a main key (its generated one) keeps reading once a key is
/// configured, and a rotation moves everything to the configured key.
#[tokio::test]
async fn a_configured_key_takes_over_from_the_generated_one() {
    let dir = tempfile::tempdir().expect("dir");
    let server = server_on(dir.path(), None, &[]).await;
    let written = write_secrets(&server, "generated-first", "http://127.0.0.1:9/").await;
    server.stop().await;
    let generated = stored_values(dir.path()).await;

    let key = MainKey::generate();
    let server = server_on(dir.path(), Some(&key), &[]).await;
    assert_readable(&server, &written).await;
    server.stop().await;
    let config = store_config(dir.path()).await;
    let (done, id) = herald::store::rotate_main_key(&config, Some(Keyring::new(&key, &[])))
        .await
        .expect("rotate");
    assert_eq!((done.rewritten, id), (SECRET_VALUES, key.id()));
    for value in stored_values(dir.path()).await {
        assert!(value.starts_with(&format!("hk1.{}.", key.id())), "{value}");
    }
    assert_absent(&raw_store(dir.path()).await, &generated);
    let server = server_on(dir.path(), Some(&key), &[]).await;
    assert_readable(&server, &written).await;
    server.stop().await;
}

/// `herald rotate-main-key`, the real binary, against a store a server is using.
#[tokio::test]
async fn the_rotate_main_key_command_rotates_while_a_server_runs() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, b) = (MainKey::generate(), MainKey::generate());
    let server = server_on(dir.path(), Some(&a), &[]).await;
    let written = write_secrets(&server, "rotation-command", "http://127.0.0.1:9/").await;
    server.stop().await;
    let under_a = stored_values(dir.path()).await;

    let running = server_on(dir.path(), Some(&b), &[&a]).await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .args(["rotate-main-key", "--data"])
        .arg(dir.path())
        .env("HERALD_MAIN_KEY", b.to_base64())
        .env("HERALD_PREVIOUS_MAIN_KEYS", a.to_base64())
        .env_remove("HERALD_STORE__URL");
    if let Some(url) = store_url(dir.path()).await {
        command.env("HERALD_STORE__URL", url);
    }
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("rotate-main-key finished in time")
        .expect("run rotate-main-key");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&b.id())
            && stdout.contains(&format!("re-encrypted {SECRET_VALUES} secret(s)"))
            && stdout.contains("it decrypts nothing now: delete it"),
        "{stdout}"
    );
    assert_readable(&running, &written).await;
    running.stop().await;

    let server = server_on(dir.path(), Some(&b), &[]).await;
    assert_readable(&server, &written).await;
    server.stop().await;
    let raw = raw_store(dir.path()).await;
    assert_absent(&raw, &under_a);
    for secret in [a.to_base64(), b.to_base64()] {
        assert!(!stdout.contains(&secret) && !stderr.contains(&secret));
    }
}

/// A store from before encryption at rest holds its secrets in clear: they read as they are,
/// and the next start encrypts them.
#[tokio::test]
async fn secrets_stored_in_clear_are_read_and_encrypted_at_start() {
    let dir = tempfile::tempdir().expect("dir");
    let server = server_on(dir.path(), None, &[]).await;
    let written = write_secrets(&server, "legacy", "http://127.0.0.1:9/").await;
    server.stop().await;
    // What an earlier version wrote: every secret in clear.
    let expires = chrono::Utc::now().timestamp_millis() + 3_600_000;
    execute(
        dir.path(),
        "UPDATE apps SET pusher_secret = $1, pusher_previous_secret = $2",
        &[&written.pusher[0], &written.pusher[1]],
    )
    .await;
    execute(
        dir.path(),
        "UPDATE endpoints SET secret = $1, previous_secrets = $2, headers = $3",
        &[
            &written.endpoint_secrets[0],
            &json!([[written.endpoint_secrets[1], expires]]).to_string(),
            &json!({"x-partner-ref": written.endpoint_header}).to_string(),
        ],
    )
    .await;
    execute(
        dir.path(),
        "UPDATE ingest_sources SET secrets = $1",
        &[&json!([written.source_secret]).to_string()],
    )
    .await;
    let values = stored_values(dir.path()).await;
    assert!(values.contains(&written.pusher[0]), "{values:?}");

    let mut receiver = Receiver::start().await;
    execute(
        dir.path(),
        "UPDATE endpoints SET url = $1",
        &[&receiver.url],
    )
    .await;
    let server = server_on(dir.path(), None, &[]).await;
    assert_readable(&server, &written).await;
    // The retired endpoint secret, read from the JSON in clear, still signs.
    server
        .send(&written.app, json!({"eventType": "t", "payload": {}}))
        .await;
    let delivery = receiver.next().await;
    assert_eq!(
        delivery.header("webhook-signature").matches("v1,").count(),
        2
    );
    assert_eq!(
        delivery.header("x-partner-ref"),
        written.endpoint_header,
        "the header read in clear is sent"
    );
    server.stop().await;
    // Only the columns are checked: SQLite may keep the old bytes in pages it has freed.
    let values = stored_values(dir.path()).await;
    for value in &values {
        assert!(value.starts_with("hk1."), "still in clear: {value}");
    }
    assert_absent(values.concat().as_bytes(), &written.needles());
}

/// Reads a child's output to the end.
async fn read_all(mut from: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut text = String::new();
    let _ = from.read_to_string(&mut text).await;
    text
}

/// The real binary at trace level, through everything that touches a secret: creating an app,
/// an endpoint and a source, an ingest request whose signature fails, a delivery, a rotation.
/// None of the secrets, the main key or the admin token is in what it prints.
#[tokio::test]
async fn no_secret_reaches_the_logs_even_at_trace_level() {
    let dir = tempfile::tempdir().expect("dir");
    let main_key = MainKey::generate().to_base64();
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .env("HERALD_LOG", "trace")
        .env("RUST_LOG", "trace")
        .env("HERALD_MAIN_KEY", &main_key)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_DELIVERY__ALLOW_PRIVATE_TARGETS", "true")
        .env_remove("HERALD_STORE__URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(url) = store_url(dir.path()).await {
        command.env("HERALD_STORE__URL", url);
    }
    let mut child = command.spawn().expect("spawn herald");
    let stderr = tokio::spawn(read_all(child.stderr.take().expect("stderr")));
    let mut stdout_lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stdout = String::new();
    let base = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stdout_lines.next_line().await.expect("read stdout") {
            stdout.push_str(&line);
            stdout.push('\n');
            if let Some(url) = line.strip_prefix("herald listening on ") {
                return url.to_owned();
            }
        }
        panic!("herald exited before listening");
    })
    .await
    .expect("herald did not start");
    let server = TestServer::remote(base);

    let mut receiver = Receiver::start().await;
    let written = write_secrets(&server, "quiet", &receiver.url).await;
    assert_readable(&server, &written).await;
    // A request signed with a wrong secret is refused, and the refusal logged.
    let body = br#"{"id":"evt_wrong","type":"payment_intent.succeeded","data":{"object":{}}}"#;
    let header = stripe_header("whsec_not_the_secret", body, now());
    let (status, answer) = post(&server, &written.source, &[header], body).await;
    assert_eq!(status, 401, "{answer}");
    // A delivery, signed with the endpoint's secrets.
    server
        .send(&written.app, json!({"eventType": "t", "payload": {"n": 1}}))
        .await;
    let delivery = receiver.next().await;
    assert!(delivery.succeeded());
    assert_eq!(
        delivery.header("webhook-signature").matches("v1,").count(),
        2,
        "signed with the current and the retired secret"
    );

    let pid = child.id().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("herald stopped in time")
        .expect("wait");
    assert!(status.success(), "{status}");
    while let Some(line) = stdout_lines.next_line().await.expect("read stdout") {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let stderr = tokio::time::timeout(Duration::from_secs(5), stderr)
        .await
        .expect("stderr closed")
        .expect("stderr read");
    assert!(
        stderr.contains("TRACE") && stderr.contains("DEBUG"),
        "trace logging was on"
    );
    let printed = format!("{stdout}{stderr}");
    let mut needles = written.needles();
    needles.push(main_key.clone());
    needles.push(main_key.trim_end_matches('=').to_owned());
    needles.push(ADMIN_TOKEN.to_owned());
    assert_absent(printed.as_bytes(), &needles);
}
