//! Retention: payloads expunged after the server's, the app's or the message's retention (but
//! never under a delivery still pending), attempts, old messages and received requests
//! deleted after theirs, the expunge route, the deletion of all an app's data, and a soak
//! showing that the store stops growing under a steady stream.
//!
//! Days are shortened by `retention.day_secs`, so a "day" passes in a second.

use std::time::{Duration, Instant};

use herald::config::Config;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    harness::{Receiver, Reply, TestServer, eventually},
    ingest::{post, source, stripe_header},
};

/// Retention in seconds: a day lasts one second, sweeps run every 50 ms.
fn fast(config: &mut Config) {
    let r = &mut config.retention;
    r.day_secs = 1.0;
    r.sweep_interval_secs = 0.05;
    r.batch_pause_ms = 1;
}

/// A count (or any number) read from the store; `sql` is built per test, so it is leaked
/// (a handful of short strings per test run).
async fn scalar(server: &TestServer, sql: String) -> i64 {
    server.store_scalar(Box::leak(sql.into_boxed_str())).await
}

async fn message(server: &TestServer, app: &str, msg: &str) -> Value {
    let (status, body) = server
        .call(Method::GET, &format!("/api/v1/app/{app}/msg/{msg}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the message's payload reads as expunged.
async fn expunged(server: &TestServer, app: &str, msg: &str) {
    eventually(&format!("{msg}'s payload to be expunged"), || async {
        (message(server, app, msg).await["payload"] == json!({"expired": true})).then_some(())
    })
    .await;
}

fn id(value: &Value) -> String {
    value["id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn payloads_expire_after_the_message_s_the_app_s_or_the_server_s_retention() {
    let server = TestServer::start_with(|config| {
        fast(config);
        config.retention.payload_days = 3;
    })
    .await;
    let plain = server.create_app("retention-default").await;
    let (status, short) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(
                json!({"name": "short", "uid": "retention-short", "retention": {"payloadDays": 1}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{short}");
    assert_eq!(short["retention"], json!({"payloadDays": 1}));
    let short = id(&short);

    let payload = json!({"card": "4242"});
    let send = |app: &str, extra: Value| {
        let mut body = json!({"eventType": "card.saved", "payload": payload});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let app = app.to_owned();
        let server = &server;
        async move { id(&server.send(&app, body).await) }
    };
    let hours = send(&plain, json!({"payloadRetentionHours": 1})).await;
    let by_app = send(&short, json!({})).await;
    let by_default = send(&plain, json!({})).await;
    let by_message = send(&short, json!({"payloadRetentionPeriod": 10})).await;
    let started = Instant::now();

    // One "hour" is 1/24 s; the app's day 1 s; the server's 3 s; the message's 10 s.
    expunged(&server, &plain, &hours).await;
    expunged(&server, &short, &by_app).await;
    expunged(&server, &plain, &by_default).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the server's retention (3 days) is not the app's (1 day)"
    );
    assert_eq!(
        message(&server, &short, &by_message).await["payload"],
        payload,
        "the message's own retention (10 days) outlives the app's"
    );
    // The message and its metadata stay: only the content went.
    let kept = message(&server, &plain, &by_default).await;
    assert_eq!(kept["eventType"], "card.saved");
    assert_eq!(
        scalar(
            &server,
            format!("SELECT COUNT(*) FROM messages WHERE id = '{by_default}'")
        )
        .await,
        1
    );

    // Svix's rules on the fields.
    for (body, field) in [
        (
            json!({"eventType": "a", "payload": {}, "payloadRetentionPeriod": 1, "payloadRetentionHours": 1}),
            "payloadRetentionHours",
        ),
        (
            json!({"eventType": "a", "payload": {}, "payloadRetentionPeriod": 0}),
            "payloadRetentionPeriod",
        ),
        (
            json!({"eventType": "a", "payload": {}, "payloadRetentionHours": -1}),
            "payloadRetentionHours",
        ),
    ] {
        let (status, error) = server
            .call(
                Method::POST,
                &format!("/api/v1/app/{plain}/msg"),
                Some(body),
            )
            .await;
        assert_eq!(status, 422, "{error}");
        assert_eq!(error["detail"][0]["loc"], json!(["body", field]), "{error}");
    }
    let (status, error) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{plain}"),
            Some(json!({"retention": {"payloadDays": 0}})),
        )
        .await;
    assert_eq!(status, 422, "{error}");
    assert_eq!(
        error["detail"][0]["loc"],
        json!(["body", "retention", "payloadDays"])
    );
    server.stop().await;
}

#[tokio::test]
async fn a_payload_is_kept_while_a_delivery_of_it_is_pending() {
    let server = TestServer::start_with(|config| {
        fast(config);
        // The retry comes a second later: many sweeps run meanwhile.
        config.delivery.retry_schedule_secs = vec![1.0];
    })
    .await;
    let app = server.create_app("retention-pending").await;
    let mut receiver = Receiver::start().await;
    receiver.script(&[Reply::Status(503), Reply::Status(200)]);
    server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let payload = json!({"order": 7});
    let msg = id(&server
        .send(
            &app,
            json!({"eventType": "order.paid", "payload": payload, "payloadRetentionHours": 1}),
        )
        .await);
    let first = receiver.next().await;
    assert!(!first.succeeded());
    // Expired 1/24 s after its creation, but the retry still needs it.
    let retry = receiver.next().await;
    assert!(retry.succeeded());
    assert_eq!(
        serde_json::from_slice::<Value>(&retry.body).expect("JSON"),
        payload,
        "the retry carries the payload, though its retention passed before it"
    );
    expunged(&server, &app, &msg).await;
    server.stop().await;
}

#[tokio::test]
async fn attempts_old_messages_and_received_requests_are_deleted_after_their_retention() {
    let server = TestServer::start_with(|config| {
        fast(config);
        config.retention.attempt_days = 2;
        config.retention.ingest_days = 3;
    })
    .await;
    let app = server.create_app("retention-rows").await;
    let mut receiver = Receiver::start().await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let secret = "whsec_retention";
    let src = source(
        &server,
        &app,
        json!({"kind": "stripe", "secrets": [secret]}),
    )
    .await;
    let body = br#"{"id":"evt_1","type":"charge.succeeded","data":{}}"#;
    let (status, answer) = post(
        &server,
        &src,
        &[stripe_header(secret, body, crate::ingest::now())],
        body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    server
        .send(&app, json!({"eventType": "a.b", "payload": {"n": 1}}))
        .await;
    receiver.next().await;
    receiver.next().await;
    server
        .settled(&app, endpoint["id"].as_str().expect("id"))
        .await;
    let count = |table: &str| scalar(&server, format!("SELECT COUNT(*) FROM {table}"));
    assert_eq!(count("attempts").await, 2);
    assert_eq!(count("ingest_events").await, 1);

    eventually(
        "attempts and messages past retention to be deleted",
        || async { (count("attempts").await == 0 && count("messages").await == 0).then_some(()) },
    )
    .await;
    assert_eq!(count("deliveries").await, 0, "with their messages");
    eventually("received requests past retention to be deleted", || async {
        (count("ingest_events").await == 0).then_some(())
    })
    .await;
    // Its delivery id is forgotten with it, by the node's recent deliveries too: sent again,
    // it is a new delivery.
    let (status, answer) = post(
        &server,
        &src,
        &[stripe_header(secret, body, crate::ingest::now())],
        body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["duplicate"], false, "{answer}");
    // The endpoint and the source are configuration: kept.
    assert_eq!(count("endpoints").await, 1);
    assert_eq!(count("ingest_sources").await, 1);
    server.stop().await;
}

#[tokio::test]
async fn expunging_a_message_s_content_removes_the_payload_from_the_store() {
    let server = TestServer::start().await;
    let app = server.create_app("retention-expunge").await;
    let mut receiver = Receiver::start().await;
    let endpoint = server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let msg = server
        .send(
            &app,
            json!({"eventType": "user.created", "eventId": "evt-expunge", "payload": {"ssn": "078-05-1120"}}),
        )
        .await;
    let msg = id(&msg);
    receiver.next().await;
    server
        .settled(&app, endpoint["id"].as_str().expect("id"))
        .await;
    let holding = "SELECT COUNT(*) FROM messages WHERE CAST(payload AS TEXT) LIKE '%078-05-1120%'";
    let holding = if server.on_postgres() {
        "SELECT COUNT(*) FROM messages WHERE position('078-05-1120' in convert_from(payload, 'UTF8')) > 0"
    } else {
        holding
    };
    assert_eq!(server.store_scalar(holding).await, 1);

    // By eventId, as Svix allows.
    let (status, body) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/app/{app}/msg/evt-expunge/content"),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(server.store_scalar(holding).await, 0, "gone from the store");
    let read = message(&server, &app, &msg).await;
    assert_eq!(read["payload"], json!({"expired": true}));
    assert_eq!(read["eventId"], "evt-expunge");
    let (status, attempts) = server
        .call(
            Method::GET,
            &format!("/api/v1/app/{app}/attempt/msg/{msg}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{attempts}");
    assert_eq!(
        attempts["data"].as_array().map(Vec::len),
        Some(1),
        "the attempt log stays"
    );
    // Nothing is left to resend by hand (Svix's `missing_payload`).
    let (status, refused) = server
        .call(
            Method::POST,
            &format!(
                "/api/v1/app/{app}/msg/{msg}/endpoint/{}/resend",
                endpoint["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["code"], "missing_payload", "{refused}");

    let (status, body) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/app/{app}/msg/msg_2Z9fZ9fZ9fZ9fZ9fZ9fZ9fZ9fZ9/content"),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
    server.stop().await;
}

/// Everything the app owns, table by table: `(table, rows of the app)`.
async fn app_rows(server: &TestServer, app: &str) -> Vec<(&'static str, i64)> {
    let mut rows = Vec::new();
    for table in [
        "messages",
        "deliveries",
        "attempts",
        "endpoints",
        "ingest_sources",
        "ingest_events",
        "channel_history",
        "channel_positions",
        "api_tokens",
    ] {
        let n = scalar(
            server,
            format!("SELECT COUNT(*) FROM {table} WHERE app_id = '{app}'"),
        )
        .await;
        rows.push((table, n));
    }
    rows
}

#[tokio::test]
async fn deleting_an_app_deletes_all_its_data_and_nothing_else() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let mut apps = Vec::new();
    for uid in ["gdpr-gone", "gdpr-kept"] {
        let app = server.create_app(uid).await;
        let endpoint = server
            .create_endpoint(&app, json!({"url": receiver.url}))
            .await;
        let secret = "whsec_gdpr";
        let src = source(
            &server,
            &app,
            json!({"kind": "stripe", "secrets": [secret]}),
        )
        .await;
        let body = br#"{"id":"evt_gdpr","type":"charge.succeeded","data":{}}"#;
        let (status, answer) = post(
            &server,
            &src,
            &[stripe_header(secret, body, crate::ingest::now())],
            body,
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        // More than one batch of messages (and of their attempts).
        for n in 0..(herald_store::RETENTION_BATCH + 20) {
            server
                .send(
                    &app,
                    json!({"eventType": "a.b", "payload": {"n": n}, "channels": ["history-gdpr"]}),
                )
                .await;
        }
        let (status, token) = server
            .call(
                Method::POST,
                "/api/v1/auth/token",
                Some(json!({"name": "scoped", "appId": app})),
            )
            .await;
        assert_eq!(status, 201, "{token}");
        server
            .settled(&app, endpoint["id"].as_str().expect("id"))
            .await;
        apps.push(app);
    }
    receiver.drain();
    let (gone, kept) = (&apps[0], &apps[1]);
    let before = app_rows(&server, gone).await;
    assert!(
        before.iter().all(|(_, n)| *n > 0),
        "every table holds some of the app: {before:?}"
    );

    let (status, body) = server
        .call(Method::DELETE, &format!("/api/v1/app/{gone}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    let after = app_rows(&server, gone).await;
    assert!(after.iter().all(|(_, n)| *n == 0), "{after:?}");
    assert_eq!(
        app_rows(&server, kept).await,
        before,
        "the other app is untouched"
    );
    server.stop().await;
}

/// Bytes the store takes: the SQLite file and its WAL, or every relation of the server's
/// PostgreSQL schema with its indexes and TOAST.
async fn store_bytes(server: &TestServer) -> i64 {
    if server.on_postgres() {
        return server
            .store_scalar(
                "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = current_schema() AND c.relkind = 'r'",
            )
            .await;
    }
    let dir = server.data_dir().expect("a local server");
    ["", "-wal"]
        .iter()
        .map(|suffix| {
            let path = dir.join(format!("{}{suffix}", herald_store::sqlite::DB_FILE));
            std::fs::metadata(path).map_or(0, |m| i64::try_from(m.len()).unwrap_or(i64::MAX))
        })
        .sum()
}

/// A steady stream with retention of a few seconds: messages sent grow linearly, the store
/// does not. (PostgreSQL: the test runs `VACUUM` every few seconds, standing in for
/// autovacuum, whose default naptime of a minute is this whole run.)
#[tokio::test]
async fn under_a_steady_stream_the_store_stops_growing() {
    const RUN: Duration = Duration::from_secs(60);
    const RATE: u32 = 50;
    let server = TestServer::start_with(|config| {
        fast(config);
        config.retention.sweep_interval_secs = 0.5;
        config.retention.payload_days = 2;
        config.retention.attempt_days = 4;
    })
    .await;
    let app = server.create_app("soak").await;
    let mut receiver = Receiver::start().await;
    server
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let padding = "x".repeat(2048);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    let mut sent = 0_u64;
    let mut samples: Vec<(Duration, u64, i64)> = Vec::new();
    let mut next_sample = Duration::from_secs(5);
    while started.elapsed() < RUN {
        tick.tick().await;
        server
            .send(
                &app,
                json!({"eventType": "soak.tick", "payload": {"n": sent, "padding": padding}}),
            )
            .await;
        sent += 1;
        if started.elapsed() >= next_sample {
            receiver.drain();
            if server.on_postgres() {
                vacuum(&server).await;
            }
            let bytes = store_bytes(&server).await;
            samples.push((started.elapsed(), sent, bytes));
            eprintln!(
                "soak: {:>5.1} s, {sent:>5} messages sent, store {bytes:>9} bytes",
                started.elapsed().as_secs_f64()
            );
            next_sample += Duration::from_secs(5);
        }
    }
    let middle = samples[samples.len() / 2 - 1];
    let end = samples[samples.len() - 1];
    assert!(
        end.1 >= middle.1 * 19 / 10,
        "the stream went on at its rate: {samples:?}"
    );
    assert!(
        end.2 * 10 <= middle.2 * 11,
        "the store grew by more than 10% over the second half: {} -> {} bytes ({samples:?})",
        middle.2,
        end.2
    );
    server.stop().await;
}

/// PostgreSQL: what autovacuum does, now.
async fn vacuum(server: &TestServer) {
    use sqlx::{Connection, PgConnection};
    let Some(url) = server.store_url() else {
        return;
    };
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query("VACUUM")
        .execute(&mut conn)
        .await
        .expect("vacuum");
    let _ = conn.close().await;
}
