//! The real binary as a child process: crash and SIGTERM without losing messages.

use std::{collections::HashSet, path::Path, process::Stdio, time::Duration};

use reqwest::Method;
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::harness::{
    ADMIN_TOKEN, Backend, PATIENCE, Receiver, Reply, TestServer, ThrowawayDatabase, backend,
    cluster_broker_env, database_for_dir, sqlite_only,
};

/// A `herald serve` process on a random port; `api` talks to it through the usual helpers.
pub struct HeraldProcess {
    pub child: Child,
    pub api: TestServer,
}

async fn spawn_herald(data: &Path) -> HeraldProcess {
    spawn_herald_with(data, &[]).await
}

/// `herald serve` with extra flags.
async fn spawn_herald_with(data: &Path, flags: &[&str]) -> HeraldProcess {
    spawn_herald_env(data, flags, &[]).await
}

/// The store for a process serving `data`: nothing more on SQLite (`--data` names it); on
/// PostgreSQL, `HERALD_STORE__URL` naming the database that stands in for that directory, the
/// same for every process started on it (so a restart finds what the last one stored).
async fn store_env(data: &Path) -> Vec<(&'static str, String)> {
    match backend() {
        Backend::Sqlite => Vec::new(),
        Backend::Postgres => vec![("HERALD_STORE__URL", database_for_dir(data).await)],
    }
}

/// `herald serve` with extra flags and environment variables (`HERALD_*` settings; a
/// `HERALD_STORE__URL` among them wins over the suite's backend). A process given a
/// PostgreSQL `HERALD_STORE__URL` is a node of that database's cluster: it carries
/// publications over the suite's broker ([`cluster_broker_env`]) unless `env` names one.
pub async fn spawn_herald_env(data: &Path, flags: &[&str], env: &[(&str, &str)]) -> HeraldProcess {
    let given = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let mut store = match given("HERALD_STORE__URL") {
        Some(_) => Vec::new(),
        None => store_env(data).await,
    };
    if let Some(url) = given("HERALD_STORE__URL")
        && given("HERALD_BROKER__URL").is_none()
    {
        store.extend(cluster_broker_env(url));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(flags)
        .arg("--data")
        .arg(data)
        .envs(store)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_DELIVERY__ALLOW_PRIVATE_TARGETS", "true")
        .env("HERALD_DELIVERY__RETRY_SCHEDULE_SECS", "[0.05, 0.05, 0.05]")
        .env("HERALD_DELIVERY__REQUEST_TIMEOUT_SECS", "30")
        .env("HERALD_SHUTDOWN_GRACE_SECS", "10")
        // The crash tests publish to one app as fast as they can.
        .env("HERALD_API__PUBLISH_PER_SECOND_PER_APP", "0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(url) = line.strip_prefix("herald listening on ") {
                return url.to_owned();
            }
        }
        panic!("herald exited before listening");
    })
    .await
    .expect("herald did not start");
    HeraldProcess {
        child,
        api: TestServer::remote(base),
    }
}

/// Collects successful deliveries until every id in `want` has arrived once.
async fn await_all(receiver: &mut Receiver, want: &HashSet<String>) {
    await_all_within(receiver, want, PATIENCE).await;
}

/// [`await_all`], waiting up to `patience` for each delivery.
pub(crate) async fn await_all_within(
    receiver: &mut Receiver,
    want: &HashSet<String>,
    patience: Duration,
) {
    let mut got = HashSet::new();
    while !want.is_subset(&got) {
        let delivery = receiver.next_within(patience).await;
        if delivery.succeeded() {
            got.insert(delivery.header("webhook-id").to_owned());
        }
    }
}

pub(crate) async fn send_many(api: &TestServer, app: &str, n: usize) -> HashSet<String> {
    let mut ids = HashSet::new();
    for i in 0..n {
        let msg = api
            .send(
                app,
                json!({"eventType": "order.created", "payload": {"i": i}}),
            )
            .await;
        ids.insert(msg["id"].as_str().expect("id").to_owned());
    }
    ids
}

#[tokio::test]
async fn killed_mid_delivery_every_accepted_message_arrives_after_restart() {
    let data = tempfile::tempdir().expect("dir");
    let mut receiver = Receiver::start().await;
    // The receiver holds every request open, so the kill lands while attempts are in flight.
    receiver.fallback(Reply::Hang);

    // On SQLite the restarted process owns the store and re-queues what the dead one leased.
    // A PostgreSQL store is shared: the dead node's leases (request timeout + shutdown grace +
    // 30 s) must expire before another process takes its deliveries over, so they are
    // shortened here and waited for.
    let (settings, patience): (&[(&str, &str)], Duration) = match backend() {
        Backend::Sqlite => (&[], PATIENCE),
        Backend::Postgres => (
            &[
                ("HERALD_DELIVERY__REQUEST_TIMEOUT_SECS", "5"),
                ("HERALD_SHUTDOWN_GRACE_SECS", "1"),
            ],
            Duration::from_secs(5 + 1 + 30) + PATIENCE,
        ),
    };
    let mut first = spawn_herald_env(data.path(), &[], settings).await;
    let app = first.api.create_app("crash").await;
    first
        .api
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let ids = send_many(&first.api, &app, 30).await;
    receiver.next().await;
    first.child.start_kill().expect("SIGKILL");
    first.child.wait().await.expect("reap");

    receiver.fallback(Reply::Status(200));
    let mut second = spawn_herald_env(data.path(), &[], settings).await;
    await_all_within(&mut receiver, &ids, patience).await;
    let (status, list) = second
        .api
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/msg?limit=100"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(list["data"].as_array().map(Vec::len), Some(30));
    second.child.start_kill().expect("kill");
}

#[tokio::test]
async fn sigterm_drains_in_flight_attempts_and_exits_cleanly() {
    let data = tempfile::tempdir().expect("dir");
    let mut receiver = Receiver::start().await;
    receiver.fallback(Reply::Status(500));

    // Retries a second apart: no message may use up its attempts against the failing
    // receiver in the moments between the first delivery and the exit (with the suite's 50 ms
    // schedule, a loaded machine let some fail for good before the restart).
    let schedule = [("HERALD_DELIVERY__RETRY_SCHEDULE_SECS", "[1, 1, 1]")];
    let mut herald = spawn_herald_env(data.path(), &[], &schedule).await;
    let app = herald.api.create_app("drain").await;
    let ep = herald
        .api
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let ids = send_many(&herald.api, &app, 10).await;
    receiver.next().await;

    let pid = herald.child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(15), herald.child.wait())
        .await
        .expect("herald exits within its grace period")
        .expect("wait");
    assert!(status.success(), "clean exit after SIGTERM: {status}");

    receiver.fallback(Reply::Status(200));
    let again = spawn_herald_env(data.path(), &[], &schedule).await;
    await_all(&mut receiver, &ids).await;
    let stats = again
        .api
        .settled(&app, ep["id"].as_str().expect("id"))
        .await;
    assert_eq!(stats["success"], 10, "{stats}");
}

/// Runs `herald serve ARGS --data DIR` to its exit (it must exit by itself); returns whether
/// it succeeded and its stderr.
async fn serve_until_exit(data: &Path, args: &[&str]) -> (bool, String) {
    let store = store_env(data).await;
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .args(args)
            .arg("--data")
            .arg(data)
            .envs(store)
            .env_remove("HERALD_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("herald should exit by itself")
    .expect("run herald");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The review's finding: after a `--dev` run, a start without `--dev` on the same data
/// directory silently accepted `demo-token` and `demo-secret`. Now it refuses to start until
/// they are removed, and `--dev` refuses to listen beyond loopback unless forced.
#[tokio::test]
async fn dev_credentials_do_not_survive_into_a_start_without_dev() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("store");

    // A --dev run seeds the demo app and token.
    let mut dev = spawn_herald_with(&data, &["--dev"]).await;
    let (status, _) = dev
        .api
        .call_as(Some("demo-token"), Method::GET, "/api/v1/app", None, None)
        .await;
    assert_eq!(status, 200);
    terminate(&mut dev.child).await;

    // Without --dev: refused, with a message that says how to proceed.
    let (ok, stderr) = serve_until_exit(&data, &["--listen", "127.0.0.1:0"]).await;
    assert!(
        !ok,
        "a start without --dev must refuse the demo credentials"
    );
    assert!(
        stderr.contains("demo-token") && stderr.contains("--remove-dev-credentials"),
        "{stderr}"
    );

    // --dev beyond loopback: refused unless forced.
    let (ok, stderr) = serve_until_exit(&data, &["--dev", "--listen", "0.0.0.0:0"]).await;
    assert!(!ok);
    assert!(stderr.contains("--dev-allow-remote"), "{stderr}");

    // Removing them: the server starts, demo-token is refused, the demo app has new
    // Pusher credentials.
    let mut cleaned = spawn_herald_with(&data, &["--remove-dev-credentials"]).await;
    let api = &cleaned.api;
    let (status, _) = api
        .call_as(Some("demo-token"), Method::GET, "/api/v1/app", None, None)
        .await;
    assert_eq!(status, 401, "demo-token no longer works");
    let (status, demo) = api.call(Method::GET, "/api/v1/app/demo", None).await;
    assert_eq!(status, 200, "the demo app and its data are kept: {demo}");
    assert_ne!(demo["pusher"]["secret"], "demo-secret");
    assert_ne!(demo["pusher"]["key"], "demo-key");
    terminate(&mut cleaned.child).await;

    // And a plain start now works.
    let mut plain = spawn_herald(&data).await;
    let (status, _) = plain.api.call(Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200);
    plain.child.kill().await.expect("kill");
}

/// SIGTERM, then a clean exit.
async fn terminate(child: &mut Child) {
    let pid = child.id().expect("pid").to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("herald exits on SIGTERM")
        .expect("wait");
    assert!(status.success(), "clean exit after SIGTERM: {status}");
}

/// A reader that takes the banner's first line and closes the pipe (`herald serve | head -1`)
/// must not stop the server: writing the rest of the banner used to panic on the closed stdout.
#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_server() {
    let dir = tempfile::tempdir().expect("dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args([
            "serve",
            "--dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data",
        ])
        .arg(dir.path())
        .envs(store_env(dir.path()).await)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald");
    // Close the read end before the server writes anything.
    drop(child.stdout.take());
    let api = TestServer::remote(format!("http://127.0.0.1:{port}"));
    crate::harness::eventually("the server to answer", || async {
        let client = crate::harness::http_client();
        let response = client
            .get(format!("{}/api/v1/health", api.base))
            .send()
            .await
            .ok()?;
        (response.status() == 204).then_some(())
    })
    .await;
    assert!(
        child.try_wait().expect("status").is_none(),
        "herald is still running"
    );
    child.kill().await.expect("kill");
}

/// A message with channels is stored with its history entries in one commit: a SIGKILL while
/// messages pour in can never leave one that webhooks will deliver but history lacks (with
/// two commits, a kill between them did).
#[tokio::test]
async fn a_kill_never_leaves_a_message_without_its_history_entries() {
    let dir = tempfile::tempdir().expect("dir");
    let mut herald = spawn_herald(dir.path()).await;
    let app = herald.api.create_app("crash-history").await;
    // Retention far above what can pour in before the kill, so trimming never makes the
    // history count differ from the message count (the default keeps 1,000 per channel).
    let (status, updated) = herald
        .api
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}"),
            Some(json!({"history": [{"pattern": "history-*", "maxEvents": 100000, "maxAgeSecs": 86400}]})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    let receiver = Receiver::start().await;
    herald
        .api
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let api = std::sync::Arc::new(herald.api);
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for sender in 0..8 {
        let (api, app, acknowledged) = (
            std::sync::Arc::clone(&api),
            app.clone(),
            std::sync::Arc::clone(&acknowledged),
        );
        senders.push(tokio::spawn(async move {
            for n in 0..10_000 {
                let body = json!({
                    "eventType": "order.created",
                    "channels": ["history-orders", "history-audit"],
                    "payload": {"sender": sender, "n": n},
                });
                let (status, _) = api
                    .try_call(Method::POST, &format!("/api/v1/app/{app}/msg"), body)
                    .await;
                if status != Some(201) {
                    return;
                }
                acknowledged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    crate::harness::eventually("messages to pour in", || async {
        (acknowledged.load(std::sync::atomic::Ordering::Relaxed) >= 200).then_some(())
    })
    .await;
    herald.child.start_kill().expect("SIGKILL");
    herald.child.wait().await.expect("killed");
    for sender in senders {
        sender.await.expect("sender");
    }

    // A restart recovers the store (SQLite: its WAL); then read it with the server stopped.
    let mut again = spawn_herald(dir.path()).await;
    terminate(&mut again.child).await;
    let postgres = store_env(dir.path()).await.pop().map(|(_, url)| url);
    let count = |sql: &'static str| {
        let path = dir.path().join(herald_store::sqlite::DB_FILE);
        let postgres = postgres.clone();
        async move {
            use sqlx::{ConnectOptions, Connection, PgConnection, sqlite::SqliteConnectOptions};
            if let Some(url) = postgres {
                let mut conn = PgConnection::connect(&url).await.expect("connect");
                return sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&mut conn)
                    .await
                    .expect("count");
            }
            let mut conn = SqliteConnectOptions::new()
                .filename(path)
                .connect()
                .await
                .expect("open the store");
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&mut conn)
                .await
                .expect("count")
        }
    };
    let messages = count("SELECT COUNT(*) FROM messages WHERE event_type = 'order.created'").await;
    let orders =
        count("SELECT COUNT(*) FROM channel_history WHERE channel = 'history-orders'").await;
    let audit = count("SELECT COUNT(*) FROM channel_history WHERE channel = 'history-audit'").await;
    assert!(messages >= 200, "{messages} messages stored");
    assert_eq!(
        (orders, audit),
        (messages, messages),
        "every stored message is in both channels' history, and nothing else is"
    );
}

/// `store.url` chooses the store: `sqlite://DIR` serves from DIR (over `--data`); a PostgreSQL
/// server that cannot be reached stops the start with a message that names it without its
/// password; an unknown scheme names the backends that exist.
#[tokio::test]
async fn store_url_chooses_the_sqlite_directory_and_bad_urls_stop_the_start() {
    if sqlite_only("store.url = sqlite://DIR and --data choose SQLite directories") {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let flag_data = dir.path().join("from-flag");
    let url_data = dir.path().join("from-url");
    let url = format!("sqlite://{}", url_data.display());

    let mut by_url = spawn_herald_env(&flag_data, &[], &[("HERALD_STORE__URL", &url)]).await;
    let (status, app) = by_url
        .api
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": "Chosen by url", "uid": "by-url"})),
        )
        .await;
    assert_eq!(status, 201, "{app}");
    terminate(&mut by_url.child).await;
    assert!(
        url_data.join(herald_store::sqlite::DB_FILE).exists(),
        "the database is in the url's directory"
    );
    assert!(
        !flag_data.exists(),
        "--data is not used when store.url is set"
    );

    // The same directory through --data alone holds the same app.
    let mut by_flag = spawn_herald(&url_data).await;
    let (status, app) = by_flag
        .api
        .call(Method::GET, "/api/v1/app/by-url", None)
        .await;
    assert_eq!(status, 200, "{app}");
    terminate(&mut by_flag.child).await;

    let refused = |url: &'static str| {
        let flag_data = flag_data.clone();
        async move {
            let output = tokio::time::timeout(
                PATIENCE,
                Command::new(env!("CARGO_BIN_EXE_herald"))
                    .args(["serve", "--listen", "127.0.0.1:0", "--data"])
                    .arg(&flag_data)
                    .env("HERALD_STORE__URL", url)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("herald should exit by itself")
            .expect("run herald");
            assert!(!output.status.success());
            String::from_utf8_lossy(&output.stderr).into_owned()
        }
    };
    // Nothing listens on port 1.
    let stderr = refused("postgres://herald:secret@127.0.0.1:1/herald").await;
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
    assert!(
        !stderr.contains("secret"),
        "the URL's password is not echoed: {stderr}"
    );
    let stderr = refused("mysql://herald:secret@127.0.0.1/herald").await;
    assert!(
        stderr.contains("sqlite") && stderr.contains("postgres"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
    assert!(!flag_data.exists(), "nothing was created");
}

/// The binary on PostgreSQL (`store.url = postgres://...`): migrations run at start, an app,
/// an endpoint and a message are stored, the message is delivered signed through the shared
/// queue's leases, and everything is still there after a restart.
#[tokio::test]
async fn herald_serves_from_postgresql_and_keeps_its_data_across_restarts() {
    let Some(db) = ThrowawayDatabase::create_if_configured("herald_serves_from_postgresql").await
    else {
        return;
    };
    let unused = tempfile::tempdir().expect("dir");
    let env = [("HERALD_STORE__URL", db.url.as_str())];
    let mut receiver = Receiver::start().await;

    let mut first = spawn_herald_env(unused.path(), &[], &env).await;
    let app = first.api.create_app("on-postgres").await;
    let endpoint = first
        .api
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let sent = first
        .api
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": {"id": 7}}),
        )
        .await;
    let delivery = tokio::time::timeout(PATIENCE, receiver.next())
        .await
        .expect("delivered");
    assert_eq!(
        delivery.header("webhook-id"),
        sent["id"].as_str().expect("id")
    );
    assert!(delivery.header("webhook-signature").starts_with("v1,"));
    let endpoint_id = endpoint["id"].as_str().expect("id").to_owned();
    first.api.settled(&app, &endpoint_id).await;
    terminate(&mut first.child).await;
    assert!(
        std::fs::read_dir(unused.path())
            .expect("dir")
            .next()
            .is_none(),
        "no SQLite files were written"
    );

    let mut second = spawn_herald_env(unused.path(), &[], &env).await;
    let (status, listed) = second
        .api
        .call(Method::GET, &format!("/api/v1/app/{app}/msg"), None)
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["data"][0]["id"], sent["id"], "{listed}");
    let stats = second.api.stats(&app, &endpoint_id).await;
    assert_eq!(stats["success"], 1, "{stats}");
    terminate(&mut second.child).await;
    db.drop_now().await;
}

/// A second `herald serve` on a SQLite data directory that one already serves refuses to start
/// and names the process that holds it (the leases that keep a delivery from going out twice
/// live in the serving process); `herald migrate` still runs beside the server, and once the
/// first has stopped the directory can be served again.
#[tokio::test]
async fn a_second_server_on_one_sqlite_directory_refuses_to_start() {
    let dir = tempfile::tempdir().expect("dir");
    let sqlite = format!("sqlite://{}", dir.path().display());
    let on_sqlite = [
        ("HERALD_STORE__URL", sqlite.as_str()),
        ("HERALD_BROKER__URL", ""),
    ];
    let mut first = spawn_herald_env(dir.path(), &[], &on_sqlite).await;
    let second = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .envs(on_sqlite)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .expect("run a second herald serve");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second server must not start");
    assert!(
        stderr.contains("another Herald process")
            && stderr.contains(&format!("pid {}", first.child.id().expect("pid"))),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("herald listening"),
        "no banner from the refused server"
    );
    let migrate = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["migrate", "--data"])
        .arg(dir.path())
        .envs(on_sqlite)
        .output()
        .await
        .expect("run herald migrate");
    assert!(
        migrate.status.success(),
        "migrate runs beside a server: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let (status, _) = first.api.call(Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200, "the first server serves on");
    terminate(&mut first.child).await;
    let mut again = spawn_herald_env(dir.path(), &[], &on_sqlite).await;
    terminate(&mut again.child).await;
}

/// `herald migrate` brings the store's schema up to date and exits, naming the store; a server
/// started on it afterwards finds nothing to do.
#[tokio::test]
async fn herald_migrate_brings_the_store_up_to_date_and_exits() {
    let dir = tempfile::tempdir().expect("dir");
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["migrate", "--data"])
        .arg(dir.path())
        .envs(store_env(dir.path()).await)
        .output()
        .await
        .expect("run herald migrate");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("is up to date"), "{stdout}");
    assert!(
        !stdout.contains("herald:herald@"),
        "a database URL's password is never printed: {stdout}"
    );
    let mut herald = spawn_herald(dir.path()).await;
    let (status, _) = herald.api.call(Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200);
    terminate(&mut herald.child).await;
}

/// `herald serve` on `data` with `args`, logging a line per response (at debug, so each
/// request's span shows on a line of its own) to a piped stderr; returns it once it listens,
/// with its base URL.
async fn serve_with_request_logs(data: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--data")
        .arg(data)
        .envs(store_env(data).await)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("HERALD_LOG", "info,tower_http=debug")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stdout.next_line().await.expect("stdout") {
            if let Some(url) = line.strip_prefix("herald listening on ") {
                return url.to_owned();
            }
        }
        panic!("herald exited before listening");
    })
    .await
    .expect("herald started");
    (child, base)
}

#[tokio::test]
async fn json_logs_carry_each_requests_id_which_the_response_returns() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, base) = serve_with_request_logs(dir.path(), &["--log-format", "json"]).await;

    let http = crate::harness::http_client();
    let given = http
        .get(format!("{base}/api/v1/app"))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .expect("answered");
    assert_eq!(given.status(), 200);
    assert_eq!(given.headers()["x-request-id"], "trace-me-42");
    let made = http
        .get(format!("{base}/health/live"))
        .send()
        .await
        .expect("answered");
    let made = made.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(made.starts_with("req_"), "{made}");

    // Every line is a JSON object; the request's lines carry its id in their span.
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let found = tokio::time::timeout(PATIENCE, async {
        let mut seen = std::collections::HashSet::new();
        while let Some(line) = stderr.next_line().await.expect("stderr") {
            let value: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            if let Some(id) = value["span"]["request_id"].as_str() {
                assert_eq!(value["span"]["name"], "request", "{line}");
                seen.insert(id.to_owned());
                if seen.contains("trace-me-42") && seen.contains(&made) {
                    return value;
                }
            }
        }
        panic!("herald's log ended without both requests' ids");
    })
    .await
    .expect("both requests logged with their ids");
    assert!(found["span"]["path"].is_string(), "{found}");
    child.kill().await.expect("stopped");
}

/// Text logs written to a pipe (a file, a journal, a container's log) are plain text: no
/// terminal colour codes around the level, the target or the request span's fields.
#[tokio::test]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut child, base) = serve_with_request_logs(dir.path(), &[]).await;
    let answered = crate::harness::http_client()
        .get(format!("{base}/health/live"))
        .header("x-request-id", "plain-text-7")
        .send()
        .await
        .expect("answered");
    assert!(answered.status().is_success(), "{}", answered.status());

    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let request_line = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stderr.next_line().await.expect("stderr") {
            assert!(
                !line.contains('\u{1b}'),
                "a colour code in a piped log line: {line:?}"
            );
            if line.contains("plain-text-7") {
                return line;
            }
        }
        panic!("herald's log ended without the request's line");
    })
    .await
    .expect("the request was logged");
    assert!(
        request_line
            .contains(r#"request{request_id="plain-text-7" method=GET path="/health/live"}"#),
        "{request_line}"
    );
    child.kill().await.expect("stopped");
}

/// A process started with a low soft open-file limit (systemd and Docker commonly give 1024
/// under a far higher hard limit) raises it to the hard limit, or the listener's connection
/// cap could never be reached: accepts would fail first with "too many open files".
#[tokio::test]
async fn serve_raises_the_soft_open_file_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().expect("dir");
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -Sn 512 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .envs(store_env(dir.path()).await)
        .env("HERALD_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald under sh");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if line.starts_with("herald listening on ") {
                return;
            }
        }
        panic!("herald exited before listening");
    })
    .await
    .expect("herald did not start");
    // `exec` made the shell's process herald's.
    let pid = child.id().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("the open-file limit")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files.len(), 2, "{limits}");
    assert_ne!(open_files[0], "512", "raised: {limits}");
    assert_eq!(open_files[0], open_files[1], "to the hard limit: {limits}");
    child.kill().await.expect("kill");
}
