//! Pusher channel webhooks: occupied/vacated, member added/removed and client events, signed
//! with the app's Pusher key and secret and delivered through the durable engine.

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    harness::{PATIENCE, Receiver, Reply, TestServer, eventually},
    process::spawn_herald_env,
    pusher::{Client, Creds, channel_auth, pusher_app},
};

/// Short, so the tests do not wait Pusher's 3 s; long enough to rejoin within.
const DELAY_MS: u64 = 400;

async fn server() -> TestServer {
    TestServer::start_with(|c| c.ws.webhook_delay_ms = DELAY_MS).await
}

async fn pusher_endpoint(server: &TestServer, app: &str, url: &str, extra: Value) -> Value {
    let mut body = json!({"url": url, "format": "pusher"});
    body.as_object_mut()
        .expect("object")
        .extend(extra.as_object().expect("object").clone());
    server.create_endpoint(app, body).await
}

/// Reads deliveries until `count` events have arrived; checks every delivery's Pusher
/// signature against the app secret, and that no Standard Webhooks headers came along.
async fn events(receiver: &mut Receiver, creds: &Creds, count: usize) -> Vec<Value> {
    let mut all = Vec::new();
    while all.len() < count {
        all.extend(one_body(receiver, creds).await);
    }
    assert_eq!(all.len(), count, "more events than expected: {all:?}");
    all
}

/// The events of the next delivery, checked as [`events`] checks each.
async fn one_body(receiver: &mut Receiver, creds: &Creds) -> Vec<Value> {
    let delivery = receiver.next().await;
    assert_eq!(delivery.header("x-pusher-key"), creds.key);
    assert_eq!(
        delivery.header("x-pusher-signature"),
        herald_core::pusher::webhook_signature(&creds.secret, &delivery.body),
        "signature over the raw body"
    );
    assert!(delivery.headers.get("webhook-signature").is_none());
    let body: Value = serde_json::from_slice(&delivery.body).expect("JSON body");
    let time_ms = body["time_ms"].as_i64().expect("time_ms");
    let now = chrono::Utc::now().timestamp_millis();
    assert!((now - 60_000..=now).contains(&time_ms), "time_ms {time_ms}");
    body["events"].as_array().expect("events").clone()
}

#[tokio::test]
async fn occupied_and_vacated_are_sent_once_and_a_quick_rejoin_does_not_flap() {
    let server = server().await;
    let (app, creds) = pusher_app(&server, "hooks-occupancy").await;
    let mut receiver = Receiver::start().await;
    let mut standard = Receiver::start().await;
    pusher_endpoint(&server, &app, &receiver.url, json!({})).await;
    let standard_ep = server
        .create_endpoint(&app, json!({"url": standard.url}))
        .await;

    let mut a = Client::connect(&server, &creds.key).await;
    a.subscribe("room", None, None).await;
    assert_eq!(
        events(&mut receiver, &creds, 1).await,
        [json!({"name": "channel_occupied", "channel": "room"})]
    );

    // Leave and come back within the delay: neither vacated nor occupied is sent.
    a.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "room"}}))
        .await;
    a.subscribe("room", None, None).await;
    // A second subscriber and its departure change nothing either.
    let mut b = Client::connect(&server, &creds.key).await;
    b.subscribe("room", None, None).await;
    drop(b);

    // Now leave for good: vacated arrives after the delay, and it is the only event since.
    let left = std::time::Instant::now();
    a.send(json!({"event": "pusher:unsubscribe", "data": {"channel": "room"}}))
        .await;
    assert_eq!(
        events(&mut receiver, &creds, 1).await,
        [json!({"name": "channel_vacated", "channel": "room"})]
    );
    assert!(
        left.elapsed() >= std::time::Duration::from_millis(DELAY_MS),
        "vacated waited out the delay"
    );

    // Every channel webhook this app ever stored: just the two.
    let (_, messages) = server
        .call(Method::GET, &format!("/api/v1/app/{app}/msg"), None)
        .await;
    let stored: Vec<Value> = messages["data"]
        .as_array()
        .expect("messages")
        .iter()
        .rev()
        .inspect(|m| assert_eq!(m["eventType"], "pusher.channel_webhook"))
        .flat_map(|m| m["payload"]["events"].as_array().expect("events").clone())
        .collect();
    assert_eq!(
        stored,
        [
            json!({"name": "channel_occupied", "channel": "room"}),
            json!({"name": "channel_vacated", "channel": "room"}),
        ]
    );

    // Channel webhooks never reach Standard Webhooks endpoints.
    let stats = server
        .stats(&app, standard_ep["id"].as_str().expect("id"))
        .await;
    for status in ["success", "pending", "sending", "fail"] {
        assert_eq!(stats[status], 0, "{stats}");
    }
    assert!(standard.drain().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn presence_members_are_reported_once_per_user_and_client_events_are_forwarded() {
    let server = server().await;
    let (app, creds) = pusher_app(&server, "hooks-presence").await;
    let mut receiver = Receiver::start().await;
    let mut client_events = Receiver::start().await;
    pusher_endpoint(
        &server,
        &app,
        &receiver.url,
        json!({"eventTypes": ["channel_occupied", "channel_vacated", "member_added", "member_removed"]}),
    )
    .await;
    pusher_endpoint(
        &server,
        &app,
        &client_events.url,
        json!({"eventTypes": ["client_event"]}),
    )
    .await;

    let channel = "presence-lobby";
    let alice = r#"{"user_id":"alice","user_info":{"name":"Alice"}}"#;
    let bob = r#"{"user_id":"bob"}"#;
    let join = |client: &Client, data: &str| {
        Some(channel_auth(&creds, &client.socket_id, channel, Some(data)))
    };

    let mut alice_1 = Client::connect(&server, &creds.key).await;
    alice_1
        .subscribe(channel, join(&alice_1, alice), Some(alice))
        .await;
    assert_eq!(
        events(&mut receiver, &creds, 2).await,
        [
            json!({"name": "channel_occupied", "channel": channel}),
            json!({"name": "member_added", "channel": channel, "user_id": "alice"}),
        ]
    );
    // Alice's second tab is not a new member.
    let mut alice_2 = Client::connect(&server, &creds.key).await;
    alice_2
        .subscribe(channel, join(&alice_2, alice), Some(alice))
        .await;
    let mut bob_1 = Client::connect(&server, &creds.key).await;
    bob_1.subscribe(channel, join(&bob_1, bob), Some(bob)).await;
    assert_eq!(
        events(&mut receiver, &creds, 1).await,
        [json!({"name": "member_added", "channel": channel, "user_id": "bob"})]
    );

    // A client event: relayed, and forwarded to the endpoint that asked for client events only.
    bob_1
        .send(json!({"event": "client-typing", "channel": channel, "data": {"typing": true}}))
        .await;
    alice_1.expect("client-typing").await;
    assert_eq!(
        events(&mut client_events, &creds, 1).await,
        [json!({
            "name": "client_event",
            "channel": channel,
            "event": "client-typing",
            "data": r#"{"typing":true}"#,
            "socket_id": bob_1.socket_id,
            "user_id": "bob",
        })]
    );

    // Alice closes one tab: still a member. Then the other: removed after the delay. Bob last.
    drop(alice_1);
    drop(alice_2);
    assert_eq!(
        events(&mut receiver, &creds, 1).await,
        [json!({"name": "member_removed", "channel": channel, "user_id": "alice"})]
    );
    // The last member's leave and the channel's vacancy fall due together: one body, in
    // that order (leaves due within 100 ms of each other are sent as one batch).
    drop(bob_1);
    assert_eq!(
        one_body(&mut receiver, &creds).await,
        [
            json!({"name": "member_removed", "channel": channel, "user_id": "bob"}),
            json!({"name": "channel_vacated", "channel": channel}),
        ]
    );
    assert!(client_events.drain().is_empty(), "only client events there");
    server.stop().await;
}

#[tokio::test]
async fn failed_channel_webhooks_are_retried_with_the_same_signed_body() {
    let server = server().await;
    let (app, creds) = pusher_app(&server, "hooks-retry").await;
    let mut receiver = Receiver::start().await;
    receiver.script(&[Reply::Status(500)]);
    let endpoint = pusher_endpoint(&server, &app, &receiver.url, json!({})).await;
    assert_eq!(endpoint["format"], "pusher");

    let mut client = Client::connect(&server, &creds.key).await;
    client.subscribe("orders", None, None).await;
    let first = receiver.next().await;
    assert!(matches!(first.reply, Reply::Status(500)));
    let retry = receiver.next().await;
    assert_eq!(retry.body, first.body, "the stored body is sent again");
    assert_eq!(
        retry.header("x-pusher-signature"),
        herald_core::pusher::webhook_signature(&creds.secret, &retry.body)
    );
    let body: Value = serde_json::from_slice(&retry.body).expect("JSON");
    assert_eq!(
        body["events"],
        json!([{"name": "channel_occupied", "channel": "orders"}])
    );
    // The attempt log has both, newest first.
    let path = format!(
        "/api/v1/app/{app}/attempt/endpoint/{}",
        endpoint["id"].as_str().expect("id")
    );
    let codes = eventually("both attempts recorded", || async {
        let (_, attempts) = server.call(Method::GET, &path, None).await;
        let codes: Vec<i64> = attempts["data"]
            .as_array()
            .expect("attempts")
            .iter()
            .map(|a| a["responseStatusCode"].as_i64().expect("code"))
            .collect();
        (codes.len() == 2).then_some(codes)
    })
    .await;
    assert_eq!(codes, [200, 500]);
    server.stop().await;
}

#[tokio::test]
async fn endpoint_format_is_validated_and_kept_by_updates_that_omit_it() {
    let server = TestServer::start().await;
    let (app, _) = pusher_app(&server, "hooks-format").await;
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/endpoint"),
            Some(json!({"url": "https://example.com/hook", "format": "slack"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "format"]));
    assert!(
        body["detail"][0]["msg"]
            .as_str()
            .expect("msg")
            .contains("\"slack\"")
    );

    let created = pusher_endpoint(&server, &app, "https://example.com/hook", json!({})).await;
    let id = created["id"].as_str().expect("id");
    // An SDK's PUT does not know the field: the endpoint stays a Pusher endpoint.
    let (status, updated) = server
        .call(
            Method::PUT,
            &format!("/api/v1/app/{app}/endpoint/{id}"),
            Some(json!({"url": "https://example.com/other"})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["format"], "pusher");
    let (_, patched) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}/endpoint/{id}"),
            Some(json!({"format": "standard-webhooks"})),
        )
        .await;
    assert_eq!(patched["format"], "standard-webhooks");
    server.stop().await;
}

/// The review's finding: after a crash no `channel_vacated` or `member_removed` was ever sent
/// for channels occupied before it, so receivers believed members present forever. Occupancy
/// is now recorded with the webhooks that report it, and the next start reports the leaves.
#[tokio::test]
async fn leaves_a_killed_process_never_reported_are_sent_after_it_restarts() {
    let dir = tempfile::tempdir().expect("dir");
    // On a shared store (the PostgreSQL pass) the killed node's rows leave when the new one
    // takes it for dead: within a short TTL, not the default 15 s.
    let settings = [
        ("HERALD_WS__WEBHOOK_DELAY_MS", "200"),
        ("HERALD_CLUSTER__NODE_TTL_SECS", "2"),
    ];
    let mut first = spawn_herald_env(dir.path(), &[], &settings).await;
    let (app, creds) = pusher_app(&first.api, "hooks-crash").await;
    let mut receiver = Receiver::start().await;
    let endpoint = pusher_endpoint(&first.api, &app, &receiver.url, json!({})).await;
    let endpoint = endpoint["id"].as_str().expect("endpoint id");

    let channel = "presence-crash";
    let alice = r#"{"user_id":"alice"}"#;
    let mut client = Client::connect(&first.api, &creds.key).await;
    let auth = channel_auth(&creds, &client.socket_id, channel, Some(alice));
    client.subscribe(channel, Some(auth), Some(alice)).await;
    assert_eq!(
        events(&mut receiver, &creds, 2).await,
        [
            json!({"name": "channel_occupied", "channel": channel}),
            json!({"name": "member_added", "channel": channel, "user_id": "alice"}),
        ]
    );

    // Delivered and recorded, so the restart has nothing of it to deliver again.
    first.api.settled(&app, endpoint).await;
    first.child.start_kill().expect("SIGKILL");
    first.child.wait().await.expect("killed");
    drop(client);

    let mut second = spawn_herald_env(dir.path(), &[], &settings).await;
    // Reported at the restart together, they may travel in two deliveries, and deliveries to
    // one endpoint run side by side: their order is not the test's (receivers order Pusher
    // webhooks by `time_ms`).
    let mut reported = events(&mut receiver, &creds, 2).await;
    reported.sort_by_key(|event| event["name"].as_str().map(str::to_owned));
    assert_eq!(
        reported,
        [
            json!({"name": "channel_vacated", "channel": channel}),
            json!({"name": "member_removed", "channel": channel, "user_id": "alice"}),
        ],
        "the leaves the killed process never reported"
    );
    second.child.kill().await.expect("kill");
}

/// A graceful restart closes every connection, and its clients reconnect to the next start:
/// the leaves still within their delay at the stop stay recorded, that start reports them
/// after the delay, and a client back within it cancels them. Before, every channel and member
/// left and rejoined (vacated, then occupied) at every restart.
#[tokio::test]
async fn a_client_back_within_the_delay_after_a_graceful_restart_neither_leaves_nor_rejoins() {
    const RESTART_DELAY_MS: u64 = 2_000;
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().to_owned();
    let start = || {
        TestServer::start_with(|c| {
            c.data_dir = data.clone();
            c.ws.webhook_delay_ms = RESTART_DELAY_MS;
        })
    };
    let first = start().await;
    if first.on_postgres() {
        herald_test_support::skip!(
            "on PostgreSQL: a node of a cluster reports its leaves when it stops (the others keep no record of its clients to report them later)"
        );
        first.stop().await;
        return;
    }
    let (app, creds) = pusher_app(&first, "hooks-restart").await;
    let mut receiver = Receiver::start().await;
    pusher_endpoint(&first, &app, &receiver.url, json!({})).await;
    let mut client = Client::connect(&first, &creds.key).await;
    client.subscribe("room", None, None).await;
    assert_eq!(
        events(&mut receiver, &creds, 1).await,
        [json!({"name": "channel_occupied", "channel": "room"})]
    );
    first.stop().await;
    drop(client);

    let second = start().await;
    let mut client = Client::connect(&second, &creds.key).await;
    client.subscribe("room", None, None).await;
    // Now leave for good: the one event since the first is this vacated.
    client
        .send(json!({"event": "pusher:unsubscribe", "data": {"channel": "room"}}))
        .await;
    assert_eq!(
        events(&mut receiver, &creds, 1).await,
        [json!({"name": "channel_vacated", "channel": "room"})]
    );
    let (_, messages) = second
        .call(Method::GET, &format!("/api/v1/app/{app}/msg"), None)
        .await;
    let stored: Vec<Value> = messages["data"]
        .as_array()
        .expect("messages")
        .iter()
        .rev()
        .flat_map(|m| m["payload"]["events"].as_array().expect("events").clone())
        .collect();
    assert_eq!(
        stored,
        [
            json!({"name": "channel_occupied", "channel": "room"}),
            json!({"name": "channel_vacated", "channel": "room"}),
        ],
        "no leave at the stop and no rejoin after it"
    );
    second.stop().await;
}

/// The review's finding: leaves waiting out the rejoin delay did not count against
/// `ws.webhook_max_pending`, so memory was not bounded by it. Now six channels vacated at once
/// with room for three of the app's waiting events (half of the six that may wait, an app's
/// share) keep three (the rest are dropped and logged), and the three dropped leaves stay
/// recorded as occupied, so a restart still reports them.
#[tokio::test]
async fn delayed_leaves_count_against_the_pending_limit() {
    let server = TestServer::start_with(|c| {
        c.ws.webhook_delay_ms = DELAY_MS;
        c.ws.webhook_max_pending = 6;
    })
    .await;
    let (app, creds) = pusher_app(&server, "hooks-bounded").await;
    let mut receiver = Receiver::start().await;
    pusher_endpoint(&server, &app, &receiver.url, json!({})).await;
    let mut clients = Vec::new();
    for n in 0..6 {
        let mut client = Client::connect(&server, &creds.key).await;
        client.subscribe(&format!("room-{n}"), None, None).await;
        // One at a time, so nothing is waiting when the next joins.
        assert_eq!(
            events(&mut receiver, &creds, 1).await[0]["name"],
            "channel_occupied"
        );
        clients.push(client);
    }
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM channel_occupancy")
            .await,
        6
    );
    drop(clients);
    let vacated = events(&mut receiver, &creds, 3).await;
    assert!(
        vacated.iter().all(|e| e["name"] == "channel_vacated"),
        "{vacated:?}"
    );
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM channel_occupancy")
            .await,
        3,
        "the dropped leaves are still recorded"
    );
    server.stop().await;
}

/// The review's finding: occupancy was recorded for every app, so anyone with an app's public
/// key could cause a write per channel subscribed, even where no channel webhook goes. Now only
/// apps with a `pusher`-format endpoint record it.
#[tokio::test]
async fn occupancy_is_recorded_only_for_apps_with_channel_webhooks() {
    let server = server().await;
    let (_, quiet) = pusher_app(&server, "hooks-none").await;
    let (app, creds) = pusher_app(&server, "hooks-some").await;
    let mut receiver = Receiver::start().await;
    pusher_endpoint(&server, &app, &receiver.url, json!({})).await;

    let mut anonymous = Client::connect(&server, &quiet.key).await;
    for n in 0..20 {
        anonymous.subscribe(&format!("room-{n}"), None, None).await;
    }
    // Events are stored in the order they happen: once this app's webhook arrives, the
    // quiet app's earlier events have been handled too.
    let mut client = Client::connect(&server, &creds.key).await;
    client.subscribe("lobby", None, None).await;
    assert_eq!(
        events(&mut receiver, &creds, 1).await,
        [json!({"name": "channel_occupied", "channel": "lobby"})]
    );
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM channel_occupancy")
            .await,
        1,
        "only the app with channel webhooks recorded its channel"
    );
    server.stop().await;
}

/// Channel webhook events the store cannot take at shutdown are counted as dropped (how many),
/// not lost without a trace: `herald_channel_webhook_events_dropped_total` says so.
#[tokio::test]
async fn events_the_store_refuses_at_shutdown_are_counted_as_dropped() {
    use std::sync::Arc;

    use herald_channels::{
        channel_webhooks::{ChannelWebhookConfig, ChannelWebhooks},
        history::{History, HistoryConfig},
        hub::{ChannelEvent, ChannelObserver},
    };

    let dir = tempfile::tempdir().expect("dir");
    let (store, _db) = crate::harness::test_store(dir.path()).await;
    let history = Arc::new(History::new(Arc::clone(&store), HistoryConfig::default()));
    let publisher = crate::history::publisher_over(&store, &history);
    let metrics = Arc::new(herald_metrics::ChannelMetrics::default());
    let webhooks = Arc::new(ChannelWebhooks::new(
        Arc::clone(&store),
        ChannelWebhookConfig {
            delay: std::time::Duration::ZERO,
            max_pending: 100,
        },
        Arc::clone(&metrics),
    ));
    let app_id = herald_core::AppId::parse("app_shutdown").expect("valid");
    for channel in ["a", "b"] {
        webhooks.observe(
            &app_id,
            ChannelEvent::Occupied {
                channel: channel.into(),
            },
        );
    }
    // The store is gone before the last batch is stored.
    store.close().await;
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    tokio::time::timeout(PATIENCE, Arc::clone(&webhooks).run(publisher, stop))
        .await
        .expect("run returns at shutdown");
    assert_eq!(metrics.channel_webhook_events_dropped_total.get(), 2);
}
