//! History channels: positions on every event, exact resumption across reconnects and
//! restarts, and plain answers when resumption is impossible.

use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    harness::TestServer,
    pusher::{Client, Creds, channel_auth, pusher_app, trigger},
};

async fn publish(server: &TestServer, creds: &Creds, channel: &str, n: u64) {
    let (status, body) = trigger(
        server,
        creds,
        json!({"name": "note", "channel": channel, "data": json!({"n": n}).to_string()}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Subscribes (resuming after `resume`, if given); returns the `history` status.
pub(crate) async fn join(client: &mut Client, channel: &str, resume: Option<(&str, u64)>) -> Value {
    join_with(client, json!({"channel": channel}), resume).await
}

/// Subscribes with `data` (channel, and auth where needed), resuming after `resume`.
async fn join_with(client: &mut Client, mut data: Value, resume: Option<(&str, u64)>) -> Value {
    if let Some((epoch, offset)) = resume {
        data["epoch"] = json!(epoch);
        data["offset"] = json!(offset);
    }
    client
        .send(json!({"event": "pusher:subscribe", "data": data}))
        .await;
    let ok = client
        .expect("pusher_internal:subscription_succeeded")
        .await;
    let confirmation: Value =
        serde_json::from_str(ok["data"].as_str().expect("data string")).expect("json");
    confirmation["history"].clone()
}

/// Reads `note` events until `last` arrives; returns their offsets (and checks the epoch).
async fn offsets_until(client: &mut Client, epoch: &str, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let event = client.expect("note").await;
        assert_eq!(event["epoch"], epoch, "{event}");
        let offset = event["offset"].as_u64().expect("offset");
        let data: Value =
            serde_json::from_str(event["data"].as_str().expect("data")).expect("json");
        assert_eq!(data["n"], offset, "the payload published as event {offset}");
        seen.push(offset);
        if offset >= last {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_client_that_reconnects_gets_exactly_what_it_missed_even_while_events_keep_coming() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "history-seam").await;
    let channel = "history-room";

    let mut first = Client::connect(&server, &creds.key).await;
    let status = join(&mut first, channel, None).await;
    assert_eq!(status["offset"], 0, "{status}");
    let epoch = status["epoch"].as_str().expect("epoch").to_owned();
    for n in 1..=3 {
        publish(&server, &creds, channel, n).await;
    }
    assert_eq!(offsets_until(&mut first, &epoch, 3).await, [1, 2, 3]);
    drop(first);

    // Missed while away.
    for n in 4..=8 {
        publish(&server, &creds, channel, n).await;
    }
    // Reconnect and resume from 3 while another 20 are being published: the seam.
    let mut again = Client::connect(&server, &creds.key).await;
    let publisher = {
        let (base, creds) = (server.base.clone(), Creds { ..creds.clone() });
        tokio::spawn(async move {
            let remote = TestServer::remote(base);
            for n in 9..=28 {
                publish(&remote, &creds, channel, n).await;
            }
        })
    };
    let status = join(&mut again, channel, Some((&epoch, 3))).await;
    assert_eq!(status["recovered"], true, "{status}");
    assert_eq!(status["epoch"], epoch.as_str());
    let missed = status["missed"].as_u64().expect("missed");
    assert!(
        missed >= 5,
        "at least the five published while away: {status}"
    );
    publisher.await.expect("publisher");
    let offsets = offsets_until(&mut again, &epoch, 28).await;
    assert_eq!(
        offsets,
        (4..=28).collect::<Vec<u64>>(),
        "in order, no gap, no duplicate"
    );
    server.stop().await;
}

#[tokio::test]
async fn resumption_survives_a_restart_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().to_owned();
    let server = TestServer::start_with(|c| c.data_dir = data_dir.clone()).await;
    let (_, creds) = pusher_app(&server, "history-restart").await;
    let channel = "private-history-orders";
    let mut client = Client::connect(&server, &creds.key).await;
    let auth = channel_auth(&creds, &client.socket_id, channel, None);
    let status = join_with(&mut client, json!({"channel": channel, "auth": auth}), None).await;
    let epoch = status["epoch"].as_str().expect("epoch").to_owned();
    publish(&server, &creds, channel, 1).await;
    assert_eq!(offsets_until(&mut client, &epoch, 1).await, [1]);
    drop(client);
    for n in 2..=3 {
        publish(&server, &creds, channel, n).await;
    }
    server.stop().await;

    let server = TestServer::start_with(|c| c.data_dir = data_dir.clone()).await;
    for n in 4..=5 {
        publish(&server, &creds, channel, n).await;
    }
    let mut client = Client::connect(&server, &creds.key).await;
    let auth = channel_auth(&creds, &client.socket_id, channel, None);
    let data = json!({"channel": channel, "auth": auth});
    let status = join_with(&mut client, data, Some((&epoch, 1))).await;
    assert_eq!(status["recovered"], true, "{status}");
    assert_eq!(status["missed"], 4);
    assert_eq!(offsets_until(&mut client, &epoch, 5).await, [2, 3, 4, 5]);
    server.stop().await;
}

#[tokio::test]
async fn impossible_resumptions_are_reported_with_the_current_position() {
    let server = TestServer::start().await;
    let (app, creds) = pusher_app(&server, "history-limits").await;
    // This app keeps 3 events on feed-* channels.
    let (status, updated) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}"),
            Some(json!({"history": [{"pattern": "feed-*", "maxEvents": 3, "maxAgeSecs": 3600}]})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    let channel = "feed-prices";
    let mut watcher = Client::connect(&server, &creds.key).await;
    let epoch = join(&mut watcher, channel, None).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    for n in 1..=6 {
        publish(&server, &creds, channel, n).await;
    }
    assert_eq!(offsets_until(&mut watcher, &epoch, 6).await.len(), 6);

    let mut late = Client::connect(&server, &creds.key).await;
    let status = join(&mut late, channel, Some((&epoch, 1))).await;
    assert_eq!(
        status,
        json!({"epoch": epoch, "offset": 6, "recovered": false, "reason": "offset_too_old"})
    );
    let mut other = Client::connect(&server, &creds.key).await;
    let status = join(&mut other, "feed-other", Some(("0000000000000000", 2))).await;
    assert_eq!(status["recovered"], false);
    assert_eq!(status["reason"], "epoch_changed");
    let mut ok = Client::connect(&server, &creds.key).await;
    let status = join(&mut ok, channel, Some((&epoch, 4))).await;
    assert_eq!(status["recovered"], true);
    assert_eq!(offsets_until(&mut ok, &epoch, 6).await, [5, 6]);

    // Channels outside the rules carry no positions: the default rules no longer apply.
    let mut plain = Client::connect(&server, &creds.key).await;
    assert_eq!(join(&mut plain, "history-x", None).await, Value::Null);

    // The history API pages through what is kept.
    let (status, page) = crate::pusher::pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels/{channel}/history", creds.id),
        &[("limit", "2")],
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let page: Value = serde_json::from_str(&page).expect("json");
    assert_eq!(page["epoch"], epoch.as_str());
    assert_eq!(page["offset"], 6);
    let offsets: Vec<u64> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["offset"].as_u64().expect("offset"))
        .collect();
    assert_eq!(offsets, [6, 5], "newest first by default");
    let (_, oldest) = crate::pusher::pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels/{channel}/history", creds.id),
        &[("direction", "forward"), ("after", "3")],
        None,
    )
    .await;
    let oldest: Value = serde_json::from_str(&oldest).expect("json");
    assert_eq!(
        oldest["events"][0],
        json!({"offset": 4, "event": "note", "data": "{\"n\":4}",
               "time_ms": oldest["events"][0]["time_ms"]})
    );
    assert_eq!(oldest["events"].as_array().expect("events").len(), 3);

    // A reset drops the events and changes the epoch; offsets go on.
    let history_path = format!("/apps/{}/channels/{channel}/history", creds.id);
    let (status, reset) =
        crate::pusher::pusher_api(&server, &creds, "DELETE", &history_path, &[], None).await;
    assert_eq!(status, 200, "{reset}");
    let reset: Value = serde_json::from_str(&reset).expect("json");
    assert_ne!(reset["epoch"], epoch.as_str());
    assert_eq!(reset["offset"], 6);
    let mut after_reset = Client::connect(&server, &creds.key).await;
    let status = join(&mut after_reset, channel, Some((&epoch, 6))).await;
    assert_eq!(status["reason"], "epoch_changed", "{status}");
    assert_eq!(status["epoch"], reset["epoch"]);
    publish(&server, &creds, channel, 7).await;
    let new_epoch = reset["epoch"].as_str().expect("epoch");
    assert_eq!(offsets_until(&mut after_reset, new_epoch, 7).await, [7]);
    let (status, _) = crate::pusher::pusher_api(
        &server,
        &creds,
        "DELETE",
        &format!("/apps/{}/channels/plain/history", creds.id),
        &[],
        None,
    )
    .await;
    assert_eq!(status, 404, "plain channels keep no history");
    server.stop().await;
}

/// A rule keeping the last 2 events of `pattern` for an hour.
fn rule(pattern: &str) -> herald_core::history::HistoryRule {
    herald_core::history::HistoryRule {
        pattern: pattern.into(),
        max_events: 2,
        max_age_secs: 3600,
    }
}

/// An app `id` keeping history by `rules`.
fn app_keeping(id: &str, rules: Vec<herald_core::history::HistoryRule>) -> herald_core::model::App {
    let now = chrono::Utc::now();
    herald_core::model::App {
        id: herald_core::AppId::parse(id).expect("valid"),
        uid: None,
        name: id.into(),
        throttle_rate: None,
        metadata: Default::default(),
        pusher: herald_core::model::PusherCredentials::generate(),
        history: Some(rules),
        socketio: None,
        payload_retention_days: None,
        created_at: now,
        updated_at: now,
    }
}

/// A channel whose trim fails every time (here a trigger refuses its deletes) is passed over:
/// the channels after it are still purged, and the failure is reported.
#[tokio::test]
async fn a_channel_whose_trim_fails_holds_back_none_after_it() {
    use std::sync::Arc;

    use herald_channels::history::{History, HistoryConfig};

    let dir = tempfile::tempdir().expect("dir");
    let (store, db) = crate::harness::test_store(dir.path()).await;
    let now = chrono::Utc::now();
    let app = app_keeping("app_trim", vec![rule("h-*")]);
    store.create_app(&app).await.expect("app");
    let history = Arc::new(History::new(Arc::clone(&store), HistoryConfig::default()));
    let publisher = publisher_over(&store, &history);
    for channel in ["h-a", "h-bad", "h-z"] {
        for n in 1..=5 {
            publish_note(&publisher, &app, channel, &n.to_string()).await;
        }
    }
    // The store refuses to delete anything of h-bad, as a statement timeout would each hour.
    match &db {
        None => {
            let url = format!(
                "sqlite://{}",
                dir.path().join(herald_store::sqlite::DB_FILE).display()
            );
            let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
            sqlx::query(
                "CREATE TRIGGER refuse_trim BEFORE DELETE ON channel_history
                 WHEN old.channel = 'h-bad'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END",
            )
            .execute(&pool)
            .await
            .expect("trigger");
            pool.close().await;
        }
        Some(db) => {
            let pool = sqlx::PgPool::connect(&db.url).await.expect("postgres");
            for statement in [
                "CREATE FUNCTION refuse_trim() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
                "CREATE TRIGGER refuse_trim BEFORE DELETE ON channel_history FOR EACH ROW
                 WHEN (OLD.channel = 'h-bad') EXECUTE FUNCTION refuse_trim()",
            ] {
                sqlx::query(statement)
                    .execute(&pool)
                    .await
                    .expect("trigger");
            }
            pool.close().await;
        }
    }
    assert!(history.purge().await.is_err(), "the failure is reported");
    // What the store keeps (a page would show the last two of each whatever is kept): h-bad
    // its five, and the channel after it trimmed all the same.
    let mut oldest = Vec::new();
    for channel in ["h-a", "h-bad", "h-z"] {
        let kept_from = store
            .oldest_history_offset(&app.id, channel, now - chrono::Duration::days(1))
            .await
            .expect("oldest");
        oldest.push(kept_from);
    }
    assert_eq!(oldest, [Some(4), Some(1), Some(4)]);
    store.close().await;
}

#[tokio::test]
async fn housekeeping_purges_quiet_channels_and_channels_no_rule_keeps() {
    use std::sync::Arc;

    use herald_channels::history::{History, HistoryConfig};

    let dir = tempfile::tempdir().expect("dir");
    let (store, _db) = crate::harness::test_store(dir.path()).await;
    let mut app = app_keeping("app_purge", vec![rule("h-*"), rule("old-*")]);
    store.create_app(&app).await.expect("app");
    let history = Arc::new(History::new(Arc::clone(&store), HistoryConfig::default()));
    let publisher = publisher_over(&store, &history);
    for n in 1..=5 {
        publish_note(&publisher, &app, "h-1", &n.to_string()).await;
    }
    for n in 1..=3 {
        publish_note(&publisher, &app, "old-1", &n.to_string()).await;
    }
    // The app stops keeping old-*.
    app.history = Some(vec![rule("h-*")]);
    store
        .update_app(&app, app.updated_at)
        .await
        .expect("update");

    assert_eq!(history.purge().await.expect("purge"), 3 + 3);
    let kept = history
        .page(&app, "h-1", None, None, 10, false)
        .await
        .expect("page")
        .expect("a history channel");
    let offsets: Vec<u64> = kept.entries.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, [4, 5]);
    assert_eq!(history.purge().await.expect("purge again"), 0);
    store.close().await;
}

#[tokio::test]
async fn client_events_on_history_channels_are_kept_and_replayed_with_their_sender() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "history-chat").await;
    let channel = "presence-history-chat";
    async fn enter(
        server: &TestServer,
        creds: &Creds,
        user: &str,
        resume: Option<(&str, u64)>,
    ) -> (Client, Value) {
        let channel = "presence-history-chat";
        let mut client = Client::connect(server, &creds.key).await;
        let member = json!({"user_id": user}).to_string();
        let auth = channel_auth(creds, &client.socket_id, channel, Some(&member));
        let data = json!({"channel": channel, "auth": auth, "channel_data": member});
        let status = join_with(&mut client, data, resume).await;
        (client, status)
    }
    let say =
        |text: &str| json!({"event": "client-message", "channel": channel, "data": {"text": text}});

    let (mut alice, status) = enter(&server, &creds, "alice", None).await;
    let epoch = status["epoch"].as_str().expect("epoch").to_owned();
    let (mut bob, _) = enter(&server, &creds, "bob", None).await;
    bob.send(say("hi alice")).await;
    let first = alice.expect("client-message").await;
    assert_eq!(
        first["data"],
        json!({"text": "hi alice"}),
        "the client's JSON, as sent"
    );
    assert_eq!(first["user_id"], "bob");
    assert_eq!(
        (first["epoch"].as_str(), first["offset"].as_u64()),
        (Some(epoch.as_str()), Some(1))
    );
    drop(alice);

    bob.send(say("are you there?")).await;
    bob.send(say("I'll wait")).await;
    // Both are kept before alice comes back (client events travel on bob's own socket).
    let path = format!("/apps/{}/channels/{channel}/history", creds.id);
    crate::harness::eventually("bob's messages kept", || async {
        let (_, page) = crate::pusher::pusher_api(&server, &creds, "GET", &path, &[], None).await;
        let page: Value = serde_json::from_str(&page).expect("json");
        (page["offset"] == 3).then_some(())
    })
    .await;
    // Bob's own messages never come back to him: he sees only alice leave and return.
    let (mut alice, status) = enter(&server, &creds, "alice", Some((&epoch, 1))).await;
    assert_eq!(status["recovered"], true, "{status}");
    assert_eq!(status["missed"], 2);
    for (offset, text) in [(2, "are you there?"), (3, "I'll wait")] {
        let missed = alice.expect("client-message").await;
        assert_eq!(missed["offset"], offset);
        assert_eq!(missed["data"], json!({"text": text}));
        assert_eq!(missed["user_id"], "bob");
    }
    for expected in [
        "pusher_internal:member_removed",
        "pusher_internal:member_added",
    ] {
        let next = bob.next().await;
        assert_eq!(next["event"], expected, "{next}");
    }
    server.stop().await;
}

/// A socket may stay open for days: a history rule added meanwhile applies to the client
/// events it sends, as it does to the API's publications of the same channel.
#[tokio::test]
async fn client_events_follow_history_rules_changed_while_their_socket_is_open() {
    let server = TestServer::start().await;
    let (app, creds) = pusher_app(&server, "rules-change").await;
    let channel = "private-chat-1";
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = Client::connect(&server, &creds.key).await;
        let auth = channel_auth(&creds, &client.socket_id, channel, None);
        let status = join_with(&mut client, json!({"channel": channel, "auth": auth}), None).await;
        assert!(status.is_null(), "not a history channel yet: {status}");
        clients.push(client);
    }
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}"),
            Some(json!({"history": [{"pattern": "private-chat-*", "maxEvents": 100, "maxAgeSecs": 3600}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let [mut sender, mut receiver] = <[Client; 2]>::try_from(clients).ok().expect("two");
    sender
        .send(json!({"event": "client-typing", "channel": channel, "data": {"who": "bob"}}))
        .await;
    let heard = receiver.expect("client-typing").await;
    assert_eq!(heard["offset"], 1, "kept, with its position: {heard}");
    let path = format!("/apps/{}/channels/{channel}/history", creds.id);
    let (_, page) = crate::pusher::pusher_api(&server, &creds, "GET", &path, &[], None).await;
    let page: Value = serde_json::from_str(&page).expect("json");
    assert_eq!(page["offset"], 1, "{page}");
    server.stop().await;
}

/// The review's attack: anonymous subscribes to distinct public `history-*` channels each
/// wrote a permanent, fsynced `channel_positions` row (10,000 in 5.7 s). Now a position is
/// stored by a channel's first event, so subscribing writes nothing.
#[tokio::test]
async fn subscribing_to_history_channels_stores_nothing_until_the_first_event() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "history-subscribe-flood").await;
    for connection in 0..4 {
        let mut client = Client::connect(&server, &creds.key).await;
        for n in 0..50 {
            let status = join(
                &mut client,
                &format!("history-flood-{connection}-{n}"),
                None,
            )
            .await;
            assert_eq!(status["offset"], 0, "{status}");
        }
    }
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM channel_positions")
            .await,
        0,
        "200 subscribes stored no positions"
    );

    let mut client = Client::connect(&server, &creds.key).await;
    let status = join(&mut client, "history-flood-0-0", None).await;
    let epoch = status["epoch"].as_str().expect("epoch").to_owned();
    publish(&server, &creds, "history-flood-0-0", 1).await;
    assert_eq!(offsets_until(&mut client, &epoch, 1).await, [1]);
    assert_eq!(
        server
            .store_scalar("SELECT COUNT(*) FROM channel_positions")
            .await,
        1,
        "the first event stores its channel's position"
    );
    server.stop().await;
}

#[tokio::test]
async fn replay_per_address_stays_within_its_byte_budget_then_resumes_say_rate_limited() {
    // 30 resubscribes from offset 0 on a public history channel used to replay 151 MB in a
    // second from 3 KB sent. Each replay here is ten events of about 1.1 KB.
    const BURST: u64 = 25_000;
    let server = TestServer::start_with(|c| {
        c.ws.replay_bytes_per_second_per_ip = 1;
        c.ws.replay_burst_bytes_per_ip = BURST;
    })
    .await;
    let (_, creds) = pusher_app(&server, "history-replay-budget").await;
    let channel = "history-big";
    let padding = "x".repeat(1000);
    for n in 1..=10 {
        let data = json!({"n": n, "padding": padding}).to_string();
        let (status, body) = trigger(
            &server,
            &creds,
            json!({"name": "note", "channel": channel, "data": data}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut client = Client::connect(&server, &creds.key).await;
    let status = join(&mut client, channel, None).await;
    let epoch = status["epoch"].as_str().expect("epoch").to_owned();
    let unsubscribe = json!({"event": "pusher:unsubscribe", "data": {"channel": channel}});

    let started = std::time::Instant::now();
    let (mut replayed_bytes, mut recovered, mut statuses) = (0, 0, Vec::new());
    for _ in 0..30 {
        client.send(unsubscribe.clone()).await;
        let status = join(&mut client, channel, Some((&epoch, 0))).await;
        if status["recovered"] == true {
            assert_eq!(status["missed"], 10, "{status}");
            for _ in 0..10 {
                let event = client.expect("note").await;
                replayed_bytes += event.to_string().len() as u64;
            }
            recovered += 1;
        } else {
            assert_eq!(
                status,
                json!({"epoch": epoch, "offset": 10, "recovered": false, "reason": "rate_limited"})
            );
        }
        statuses.push(status["recovered"] == true);
    }
    let budget = BURST + started.elapsed().as_secs() + 1;
    assert!(
        replayed_bytes <= budget,
        "{replayed_bytes} bytes replayed in {recovered} replays; the budget is {budget}"
    );
    assert!(recovered >= 1, "the budget allows a replay or two");
    let first_refused = statuses.iter().position(|ok| !ok).expect("some refused");
    assert!(
        statuses[first_refused..].iter().all(|ok| !ok),
        "once over budget, every later resume is refused: {statuses:?}"
    );

    // An SSE stream from the same address resuming with Last-Event-ID shares the budget.
    let response = crate::harness::http_client()
        .get(format!(
            "{}/apps/{}/sse?channels={channel}",
            server.base, creds.id
        ))
        .header("last-event-id", format!("{channel}:{epoch}:0"))
        .send()
        .await
        .expect("SSE request");
    assert_eq!(response.status(), 200);
    let first = first_sse_data(response).await;
    assert_eq!(first["event"], "herald:subscription_succeeded", "{first}");
    assert_eq!(first["data"][channel]["reason"], "rate_limited", "{first}");

    // Live events still flow to the refused subscriber, from the position it was given.
    publish(&server, &creds, channel, 11).await;
    assert_eq!(offsets_until(&mut client, &epoch, 11).await, [11]);
    server.stop().await;
}

/// The `data` of an SSE response's first event.
async fn first_sse_data(mut response: reqwest::Response) -> Value {
    let mut text = String::new();
    tokio::time::timeout(crate::harness::PATIENCE, async {
        while !text.contains("\n\n") {
            let chunk = response.chunk().await.expect("read").expect("stream open");
            text.push_str(std::str::from_utf8(&chunk).expect("utf8"));
        }
    })
    .await
    .expect("timed out waiting for an SSE event");
    let data = text
        .lines()
        .find_map(|line| line.strip_prefix("data:"))
        .expect("a data line");
    serde_json::from_str(data.trim()).expect("JSON data")
}

/// A publisher over `store` and `history`, fanning out to a hub of its own (returned).
fn publisher_with_hub(
    store: &std::sync::Arc<dyn herald_store::Store>,
    history: &std::sync::Arc<herald_channels::history::History>,
) -> (
    std::sync::Arc<herald_channels::Publisher>,
    std::sync::Arc<herald_channels::Hub>,
) {
    publisher_with_metrics(store, history, std::sync::Arc::default())
}

/// [`publisher_with_hub`], counting in `metrics`.
fn publisher_with_metrics(
    store: &std::sync::Arc<dyn herald_store::Store>,
    history: &std::sync::Arc<herald_channels::history::History>,
    metrics: std::sync::Arc<herald_metrics::PublishMetrics>,
) -> (
    std::sync::Arc<herald_channels::Publisher>,
    std::sync::Arc<herald_channels::Hub>,
) {
    use std::sync::Arc;

    use herald_channels::{Hub, Publisher, broker::LocalBroker};
    use herald_delivery::{DeliveryConfig, Dispatcher, WebhookClient};

    let config = DeliveryConfig::default();
    let client = WebhookClient::new(&config).expect("client");
    let dispatcher = Dispatcher::new(Arc::clone(store), client, config, Arc::default());
    let hub = Arc::new(Hub::default());
    let publisher = Publisher::new(
        Arc::clone(store),
        Arc::new(LocalBroker::new(Arc::clone(&hub))),
        Arc::clone(history),
        dispatcher.handle(),
        metrics,
    );
    (Arc::new(publisher), hub)
}

pub(crate) fn publisher_over(
    store: &std::sync::Arc<dyn herald_store::Store>,
    history: &std::sync::Arc<herald_channels::history::History>,
) -> std::sync::Arc<herald_channels::Publisher> {
    publisher_with_hub(store, history).0
}

/// Publishes a `note` event with `data` to `channel` through the publisher.
async fn publish_note(
    publisher: &herald_channels::Publisher,
    app: &herald_core::model::App,
    channel: &str,
    data: &str,
) {
    let publish = herald_channels::Publish::pusher_event("note", &[channel.to_owned()], data, None);
    publisher.publish(app, publish).await.expect("publish");
}

/// A store, an app keeping the default history rules, the `History` over them, and a
/// publisher fanning out to its own hub, in process: for what the listener cannot show.
struct InProcess {
    store: std::sync::Arc<dyn herald_store::Store>,
    app: herald_core::model::App,
    history: std::sync::Arc<herald_channels::history::History>,
    publisher: std::sync::Arc<herald_channels::Publisher>,
    hub: std::sync::Arc<herald_channels::Hub>,
}

async fn in_process_history(dir: &std::path::Path) -> InProcess {
    use std::sync::Arc;

    use herald_channels::history::{History, HistoryConfig};
    let (store, db) = crate::harness::test_store(dir).await;
    // Callers take what they need from `InProcess`: the database outlives the test (the next
    // run's sweep drops it).
    if let Some(db) = db {
        db.keep();
    }
    let now = chrono::Utc::now();
    let app = herald_core::model::App {
        id: herald_core::AppId::parse("app_positions").expect("valid"),
        uid: None,
        name: "positions".into(),
        throttle_rate: None,
        metadata: Default::default(),
        pusher: herald_core::model::PusherCredentials::generate(),
        history: None,
        socketio: None,
        payload_retention_days: None,
        created_at: now,
        updated_at: now,
    };
    store.create_app(&app).await.expect("app");
    let history = Arc::new(History::new(Arc::clone(&store), HistoryConfig::default()));
    let (publisher, hub) = publisher_with_hub(&store, &history);
    InProcess {
        store,
        app,
        history,
        publisher,
        hub,
    }
}

/// A page of history stops once its events reach `MAX_PAGE_BYTES` (holding at least one), in
/// either direction, so a page of large events is never read or answered whole; the next page
/// goes on from its last offset and nothing is skipped.
#[tokio::test]
async fn a_history_page_stops_at_its_byte_budget_and_the_next_goes_on_from_it() {
    use herald_channels::history::MAX_PAGE_BYTES;

    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        publisher,
        ..
    } = in_process_history(dir.path()).await;
    // Three of these reach the budget.
    let large = "x".repeat(MAX_PAGE_BYTES / 3 + 1);
    for _ in 0..7 {
        publish_note(&publisher, &app, "history-large", &large).await;
    }
    publish_note(&publisher, &app, "history-large", "small").await;
    let offsets = |after: Option<u64>, newest_first: bool| {
        let (history, app) = (&history, &app);
        async move {
            history
                .page(app, "history-large", after, None, 100, newest_first)
                .await
                .expect("page")
                .expect("a history channel")
                .entries
                .iter()
                .map(|e| e.offset)
                .collect::<Vec<u64>>()
        }
    };
    assert_eq!(offsets(None, false).await, [1, 2, 3]);
    assert_eq!(offsets(Some(3), false).await, [4, 5, 6]);
    assert_eq!(offsets(Some(6), false).await, [7, 8]);
    assert_eq!(offsets(Some(8), false).await, Vec::<u64>::new());
    assert_eq!(offsets(None, true).await, [8, 7, 6, 5], "newest first");
    // Small events fill a page up to its limit.
    for n in 0..40 {
        publish_note(&publisher, &app, "history-small", &n.to_string()).await;
    }
    let page = history
        .page(&app, "history-small", None, None, 30, false)
        .await
        .expect("page")
        .expect("a history channel");
    let offsets: Vec<u64> = page.entries.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (1..=30).collect::<Vec<u64>>());
    store.close().await;
}

/// The publish metrics count what the publisher did: one publication handed to each of a
/// channel's N subscribers on this node adds N fan-out deliveries (the socket it excepts
/// gets nothing and is not counted).
#[tokio::test]
async fn publishing_to_n_subscribers_counts_n_fanout_deliveries() {
    use std::sync::Arc;

    use herald_channels::{Publish, hub::Outbox};

    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        ..
    } = in_process_history(dir.path()).await;
    let metrics = Arc::new(herald_metrics::PublishMetrics::default());
    let (publisher, hub) = publisher_with_metrics(&store, &history, Arc::clone(&metrics));
    let app_hub = hub.app(&app.id);
    let mut receivers = Vec::new();
    for n in 1..=3 {
        let (outbox, frames, _) = Outbox::new(4);
        app_hub
            .subscribe("news", &format!("{n}.{n}"), &outbox, None, 10)
            .expect("subscribed");
        receivers.push(frames);
    }
    publish_note(&publisher, &app, "news", "{}").await;
    assert_eq!(metrics.fanout_deliveries_total.get(), 3);
    let except = Publish::pusher_event("note", &["news".to_owned()], "{}", Some("1.1"));
    let published = publisher.publish(&app, except).await.expect("publish");
    assert_eq!(published.sent, 2);
    assert_eq!(metrics.fanout_deliveries_total.get(), 5, "3 + 2");
    assert_eq!(
        metrics.publications(herald_metrics::Source::Pusher),
        2,
        "both came through the Pusher API"
    );
    assert_eq!(metrics.publish_failures_total.get(), 0);
    let received: Vec<usize> = receivers
        .iter_mut()
        .map(|frames| std::iter::from_fn(|| frames.try_recv().ok()).count())
        .collect();
    assert_eq!(received, [1, 2, 2]);
    store.close().await;
}

/// The review's finding: every distinct history channel anyone joined kept a position, so
/// anonymous subscribes to millions of public `history-*` names grew memory or disk without
/// bound. Joining a channel nothing was appended to stores nothing, and its epoch is the same
/// at every join; a client that saw nothing of it recovers the first event whatever the epoch
/// it was told.
#[tokio::test]
async fn joining_channels_nothing_was_appended_to_stores_nothing() {
    use herald_channels::limits::ClientPermit;

    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        publisher,
        ..
    } = in_process_history(dir.path()).await;
    let budget = ClientPermit::unlimited();
    let join = |channel: String, resume: Option<herald_channels::history::Resume>| {
        let (history, app) = (std::sync::Arc::clone(&history), app.clone());
        let budget = &budget;
        async move {
            let retention = history
                .retention(&app, &channel)
                .expect("a history channel");
            let joined = history
                .recover(&app, &channel, retention, resume.as_ref(), budget)
                .await
                .expect("join");
            (joined.epoch.clone(), joined.offset, joined.status())
        }
    };
    for n in 0..2_000 {
        let (_, offset, _) = join(format!("history-flood-{n}"), None).await;
        assert_eq!(offset, 0);
    }
    assert!(
        store
            .history_channels(None, 10)
            .await
            .expect("read")
            .is_empty(),
        "2,000 joins store nothing"
    );

    let (epoch, _, _) = join("history-later".into(), None).await;
    let (again, _, _) = join("history-later".into(), None).await;
    assert_eq!(epoch, again, "the same epoch at every join");
    let resume = herald_channels::history::Resume {
        epoch: epoch.clone(),
        offset: 0,
    };
    let (_, _, status) = join("history-later".into(), Some(resume.clone())).await;
    assert_eq!(status["recovered"], true, "{status}");
    publish_note(&publisher, &app, "history-later", "{}").await;
    let (_, _, status) = join("history-later".into(), Some(resume)).await;
    assert_eq!(status["recovered"], true, "{status}");
    assert_eq!(status["missed"], 1, "{status}");
    store.close().await;
}

/// The recovery seam is a merge, not a lock: subscribe with broadcasts held, read what was
/// missed, then go live past it. Many channels, each joined (resuming from offset 0) while
/// three events are published to it at once: every subscriber gets offsets 1, 2, 3 exactly
/// once and in order, whichever side of the read each one fell on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seam_between_join_and_publish_is_exact_under_races() {
    use std::sync::Arc;

    use herald_channels::{
        Outgoing,
        history::{Joined, Resume},
        hub::Outbox,
        limits::ClientPermit,
    };

    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        publisher,
        hub,
    } = in_process_history(dir.path()).await;
    let mut tasks = Vec::new();
    for n in 0..200 {
        let channel = format!("history-race-{n}");
        let (history, publisher, hub, app) = (
            Arc::clone(&history),
            Arc::clone(&publisher),
            Arc::clone(&hub),
            app.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (outbox, mut frames, overflowed) = Outbox::new(16);
            let joiner = {
                let (history, hub, app, channel) = (
                    Arc::clone(&history),
                    hub.app(&app.id),
                    app.clone(),
                    channel.clone(),
                );
                tokio::spawn(async move {
                    let retention = history.retention(&app, &channel).expect("history");
                    hub.subscribe_joining(&channel, "1.1", &outbox, None, 10)
                        .expect("subscribed");
                    let resume = Resume {
                        epoch: "told-before".into(),
                        offset: 0,
                    };
                    let Joined { offset, replay, .. } = history
                        .recover(
                            &app,
                            &channel,
                            retention,
                            Some(&resume),
                            &ClientPermit::unlimited(),
                        )
                        .await
                        .expect("recover");
                    hub.go_live(&channel, "1.1", offset, |outbox| {
                        for publication in replay {
                            outbox.send(Outgoing::Publication(publication));
                        }
                    });
                })
            };
            for k in 1..=3 {
                publish_note(&publisher, &app, &channel, &k.to_string()).await;
            }
            joiner.await.expect("joiner");
            let mut offsets = Vec::new();
            while offsets.len() < 3 {
                let item = tokio::time::timeout(crate::harness::PATIENCE, frames.recv())
                    .await
                    .expect("every event, replayed or live")
                    .expect("an item");
                let Outgoing::Publication(p) = item else {
                    panic!("only publications were sent");
                };
                offsets.push(p.offset().expect("a position"));
            }
            assert_eq!(offsets, [1, 2, 3], "{channel}");
            assert!(frames.try_recv().is_err(), "nothing twice");
            assert!(!overflowed.is_cancelled());
        }));
    }
    for task in tasks {
        task.await.expect("no lost, doubled or reordered event");
    }
    store.close().await;
}

/// Over a bus, another node's publication may come before an earlier one of a third node: a
/// subscriber still joining (the only one on its node, so no catch-up covers it) reads the
/// offsets its held publications skip from the store before going live, and gets nothing
/// twice when the late one arrives.
#[tokio::test]
async fn a_join_reads_from_the_store_the_offsets_its_held_publications_skip() {
    use std::sync::Arc;

    use herald_channels::{Outgoing, Publication, hub::Outbox, limits::ClientPermit};
    use herald_core::history::{HistoryEntry, NewHistoryEntry};

    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        publisher,
        hub,
    } = in_process_history(dir.path()).await;
    let channel = "history-bus";
    publish_note(&publisher, &app, channel, "1").await;
    let app_hub = hub.app(&app.id);
    let (outbox, mut frames, overflowed) = Outbox::new(16);
    app_hub
        .subscribe_joining(channel, "1.1", &outbox, None, 10)
        .expect("subscribed");
    let retention = history.retention(&app, channel).expect("history");
    let joined = history
        .recover(&app, channel, retention, None, &ClientPermit::unlimited())
        .await
        .expect("recover");
    assert_eq!(joined.offset, 1);
    // Two other nodes commit 2 and 3; this node hears 3 first.
    let mut heard = Vec::new();
    for data in ["2", "3"] {
        let position = store
            .append_history(NewHistoryEntry {
                app_id: app.id.clone(),
                channel: channel.to_owned(),
                event: "note".into(),
                data: data.into(),
                raw_json: false,
                user_id: None,
                created_at: chrono::Utc::now(),
                retention,
                first_epoch: None,
                except: None,
            })
            .await
            .expect("append");
        heard.push(Arc::new(Publication::from_history(&HistoryEntry {
            app_id: app.id.clone(),
            channel: channel.to_owned(),
            epoch: position.epoch,
            offset: position.offset,
            event: "note".into(),
            data: data.into(),
            raw_json: false,
            user_id: None,
            created_at: chrono::Utc::now(),
            except: None,
        })));
    }
    app_hub.broadcast(&heard[1]);
    let live = app_hub
        .go_live_in_order(
            channel,
            "1.1",
            joined.offset,
            |_| {},
            joined.replay,
            |after, before| history.between(&app.id, channel, after, before),
        )
        .await
        .expect("the store is read");
    assert!(live);
    app_hub.broadcast(&heard[0]);
    let mut received = Vec::new();
    while let Ok(Outgoing::Publication(p)) = frames.try_recv() {
        received.push((
            p.offset().expect("a position"),
            p.json_data().get().to_owned(),
        ));
    }
    assert_eq!(
        received,
        [(2, "2".to_owned()), (3, "3".to_owned())],
        "2 read from the store, then 3 as held, and the late 2 not again"
    );
    assert!(!overflowed.is_cancelled());
    store.close().await;
}

/// The store prices a range of history in bytes (data, event names, user ids as kept) without
/// reading it out.
#[tokio::test]
async fn the_store_prices_a_history_range_in_bytes() {
    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        publisher,
        ..
    } = in_process_history(dir.path()).await;
    let channel = "history-priced";
    // Multi-byte text: bytes, not characters.
    let data = ["é".repeat(100), "x".repeat(1000), "日本".repeat(10)];
    for text in &data {
        publish_note(&publisher, &app, channel, text).await;
    }
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let bytes = |after, before| store.history_bytes(&app.id, channel, after, before, since);
    assert_eq!(bytes(0, 4).await.expect("sum"), 200 + 1000 + 60 + 3 * 4);
    assert_eq!(bytes(1, 3).await.expect("sum"), 1000 + 4, "exclusive ends");
    assert_eq!(bytes(2, 4).await.expect("sum"), 60 + 4);
    assert_eq!(bytes(4, 10).await.expect("sum"), 0, "nothing there");
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    assert_eq!(
        store
            .history_bytes(&app.id, channel, 0, 4, future)
            .await
            .expect("sum"),
        0,
        "past retention"
    );
    store.close().await;
}

/// Publishes `count` events of about `size` bytes each to `channel`, ten to a batch.
async fn publish_padded(
    server: &TestServer,
    creds: &Creds,
    channel: &str,
    count: u64,
    size: usize,
) {
    let padding = "x".repeat(size);
    let mut n = 1;
    while n <= count {
        let batch: Vec<Value> = (n..=count.min(n + 9))
            .map(|n| {
                let data = json!({"n": n, "padding": padding}).to_string();
                json!({"name": "note", "channel": channel, "data": data})
            })
            .collect();
        n += batch.len() as u64;
        let path = format!("/apps/{}/batch_events", creds.id);
        let (status, body) = crate::pusher::pusher_api(
            server,
            creds,
            "POST",
            &path,
            &[],
            Some(json!({"batch": batch})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The review's finding: the default replay burst (4 MiB) was smaller than one full replay of
/// ordinary events (`history.max_replay`, 500, of 9 KB: 4.5 MB), so a client that reconnected
/// after missing them could never recover and was told to page. The default budget now holds
/// it.
#[tokio::test]
async fn a_full_replay_of_typical_events_fits_the_default_replay_budget() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "history-full-replay").await;
    let channel = "history-typical";
    let mut client = Client::connect(&server, &creds.key).await;
    let epoch = join(&mut client, channel, None).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let unsubscribe = json!({"event": "pusher:unsubscribe", "data": {"channel": channel}});
    client.send(unsubscribe).await;
    publish_padded(&server, &creds, channel, 500, 9 * 1024).await;

    let status = join(&mut client, channel, Some((&epoch, 0))).await;
    assert_eq!(status["recovered"], true, "{status}");
    assert_eq!(status["missed"], 500, "{status}");
    let offsets = offsets_until(&mut client, &epoch, 500).await;
    assert_eq!(
        offsets,
        (1..=500).collect::<Vec<u64>>(),
        "in full, in order"
    );
    server.stop().await;
}

/// The review's finding: the replay budget was checked for being above zero, then up to
/// `history.max_replay` events were read before being charged, so a resume larger than the
/// burst could never succeed and left the address in debt, refusing its next small resume
/// too. Now a resume is priced by the store first and refused unread, taking nothing.
#[tokio::test]
async fn a_resume_over_the_replay_budget_is_refused_unread_and_leaves_no_debt() {
    const BURST: u64 = 50_000;
    let server = TestServer::start_with(|c| {
        c.ws.replay_bytes_per_second_per_ip = 1;
        c.ws.replay_burst_bytes_per_ip = BURST;
    })
    .await;
    let (_, creds) = pusher_app(&server, "history-replay-price").await;
    let channel = "history-large";
    let mut client = Client::connect(&server, &creds.key).await;
    let epoch = join(&mut client, channel, None).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    let unsubscribe = json!({"event": "pusher:unsubscribe", "data": {"channel": channel}});
    client.send(unsubscribe.clone()).await;
    // Twenty events of about 5 KB: 100 KB, twice the burst. More than the budget could ever
    // pay is refused for good (`too_many_missed`: asking again would never help).
    publish_padded(&server, &creds, channel, 20, 5000).await;

    let status = join(&mut client, channel, Some((&epoch, 0))).await;
    assert_eq!(
        status,
        json!({"epoch": epoch, "offset": 20, "recovered": false, "reason": "too_many_missed"})
    );
    // What fits is replayed in full: the refusal took nothing from the budget.
    for _ in 0..2 {
        client.send(unsubscribe.clone()).await;
        let status = join(&mut client, channel, Some((&epoch, 16))).await;
        assert_eq!(status["recovered"], true, "{status}");
        assert_eq!(status["missed"], 4, "{status}");
        assert_eq!(
            offsets_until(&mut client, &epoch, 20).await,
            [17, 18, 19, 20]
        );
    }
    server.stop().await;
}

/// A producer that goes away mid-commit (an HTTP client disconnecting drops its handler's
/// future) cannot leave a committed event unsent: the commit and the fan-out run on a task of
/// their own. The publish future is polled once, into its commit, then dropped; the
/// subscriber still gets the event, with the position the store kept it at.
#[tokio::test]
async fn a_publication_whose_producer_went_away_mid_commit_still_reaches_subscribers() {
    use std::{future::Future, task::Poll};

    use herald_channels::{Outgoing, Publish, hub::Outbox};

    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        publisher,
        hub,
        ..
    } = in_process_history(dir.path()).await;
    // Warm the endpoint cache, so the first poll goes straight into the commit.
    publish_note(&publisher, &app, "history-warm", "{}").await;
    let (outbox, mut frames, _) = Outbox::new(4);
    hub.app(&app.id)
        .subscribe("history-gone", "1.1", &outbox, None, 10)
        .expect("subscribed");
    // A name no event type can have: no endpoint lookup precedes the commit, whether or not
    // the store caches endpoints (SQLite does, PostgreSQL asks the database every time).
    let publish = Publish::pusher_event("note:gone", &["history-gone".to_owned()], "{}", None);
    let mut producer = Box::pin(publisher.publish(&app, publish));
    let first = std::future::poll_fn(|cx| Poll::Ready(producer.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "the commit had started");
    drop(producer);
    let item = tokio::time::timeout(crate::harness::PATIENCE, frames.recv())
        .await
        .expect("the event reaches the subscriber")
        .expect("an item");
    let Outgoing::Publication(publication) = item else {
        panic!("a publication");
    };
    assert_eq!(publication.offset(), Some(1));
    let page = publisher
        .history()
        .page(&app, "history-gone", None, None, 10, false)
        .await
        .expect("page")
        .expect("a history channel");
    assert_eq!(page.entries.len(), 1, "and it is kept");
    store.close().await;
}

/// A broker that records the (channel, offset) of every publication it is handed, in order,
/// and fans out nowhere. It can hold its first hand-over until the store has committed every
/// event of a channel.
struct RecordingBroker {
    handed: std::sync::Mutex<Vec<(String, u64)>>,
    /// Hold the first hand-over until this channel's next offset in the store is this one.
    hold_first_until: Option<(
        std::sync::Arc<dyn herald_store::Store>,
        herald_core::AppId,
        String,
        u64,
    )>,
    /// Refuse every hand-over, as a broker that cannot reach the other nodes.
    refuses: bool,
}

impl RecordingBroker {
    fn handed(&self) -> Vec<(String, u64)> {
        self.handed.lock().expect("not poisoned").clone()
    }
}

#[async_trait::async_trait]
impl herald_channels::broker::Broker for RecordingBroker {
    async fn publish(
        &self,
        publications: &[std::sync::Arc<herald_channels::Publication>],
    ) -> Result<usize, herald_channels::broker::BrokerError> {
        if self.refuses {
            return Err(herald_channels::broker::BrokerError::Unavailable(
                "the bus is down".into(),
            ));
        }
        let first = self.handed.lock().expect("not poisoned").is_empty();
        if let (true, Some((store, app_id, channel, next))) = (first, &self.hold_first_until) {
            crate::harness::eventually("every publication committed", || async {
                let position = store
                    .channel_position(app_id, channel)
                    .await
                    .expect("position");
                position
                    .is_some_and(|p| p.next_offset == *next)
                    .then_some(())
            })
            .await;
        }
        self.handed.lock().expect("not poisoned").extend(
            publications
                .iter()
                .filter_map(|p| Some((p.channel.clone(), p.offset()?))),
        );
        Ok(0)
    }

    async fn remove_app(
        &self,
        _: &herald_core::AppId,
    ) -> Result<(), herald_channels::broker::BrokerError> {
        Ok(())
    }
}

/// A publisher over `store` and `history` that hands its publications to `broker`.
fn publisher_to(
    store: &std::sync::Arc<dyn herald_store::Store>,
    history: &std::sync::Arc<herald_channels::history::History>,
    broker: std::sync::Arc<RecordingBroker>,
) -> std::sync::Arc<herald_channels::Publisher> {
    use std::sync::Arc;

    use herald_delivery::{DeliveryConfig, Dispatcher, WebhookClient};

    let config = DeliveryConfig::default();
    let client = WebhookClient::new(&config).expect("client");
    let dispatcher = Dispatcher::new(Arc::clone(store), client, config, Arc::default());
    Arc::new(herald_channels::Publisher::new(
        Arc::clone(store),
        broker,
        Arc::clone(history),
        dispatcher.handle(),
        Arc::default(),
    ))
}

/// A broker that cannot reach the other nodes: an event on a channel without history is
/// reported as reaching this node only, since nothing would catch the other nodes up; one on a
/// history channel is not (they catch up by offset).
#[tokio::test]
async fn a_publication_the_broker_could_not_hand_on_says_so_unless_history_catches_it_up() {
    use std::sync::Arc;

    use herald_channels::Publish;

    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        ..
    } = in_process_history(dir.path()).await;
    let broker = Arc::new(RecordingBroker {
        handed: Default::default(),
        hold_first_until: None,
        refuses: true,
    });
    let publisher = publisher_to(&store, &history, broker);
    let plain = publisher
        .publish(
            &app,
            Publish::pusher_event("note", &["news".into()], "1", None),
        )
        .await
        .expect("committed and published here");
    assert!(
        plain
            .not_elsewhere
            .as_deref()
            .is_some_and(|why| why.contains("the bus is down")),
        "{:?}",
        plain.not_elsewhere
    );
    let kept = publisher
        .publish(
            &app,
            Publish::pusher_event("note", &["history-kept".into()], "1", None),
        )
        .await
        .expect("committed");
    assert!(kept.not_elsewhere.is_none(), "{:?}", kept.not_elsewhere);
    store.close().await;
}

/// Issue 15's pipelining: a history channel's publications no longer hold the channel from
/// their commit to their hand-over. While the first one's hand-over is held, every later one
/// commits (on SQLite, several in one group commit); the broker still gets them all in offset
/// order, contiguous, each once, and events of another channel in the same publications keep
/// their own order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publications_to_one_history_channel_reach_the_broker_in_offset_order() {
    use std::sync::Arc;

    const N: u64 = 64;
    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        ..
    } = in_process_history(dir.path()).await;
    let broker = Arc::new(RecordingBroker {
        handed: Default::default(),
        hold_first_until: Some((
            Arc::clone(&store),
            app.id.clone(),
            "history-pipe".into(),
            N + 1,
        )),
        refuses: false,
    });
    let publisher = publisher_to(&store, &history, Arc::clone(&broker));
    let mut tasks = Vec::new();
    for n in 0..N {
        let (publisher, app) = (Arc::clone(&publisher), app.clone());
        tasks.push(tokio::spawn(async move {
            // Every fourth also goes to a second history channel.
            let mut channels = vec!["history-pipe".to_owned()];
            if n % 4 == 0 {
                channels.push("history-beside".to_owned());
            }
            let publish =
                herald_channels::Publish::pusher_event("note", &channels, &n.to_string(), None);
            publisher.publish(&app, publish).await.expect("publish");
        }));
    }
    for task in tasks {
        task.await.expect("published");
    }
    let handed = broker.handed();
    let on = |channel: &str| -> Vec<u64> {
        handed
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, offset)| *offset)
            .collect()
    };
    assert_eq!(on("history-pipe"), (1..=N).collect::<Vec<_>>());
    assert_eq!(on("history-beside"), (1..=N / 4).collect::<Vec<_>>());
    store.close().await;
}

/// A publication whose commit fails (its `eventId` is taken) among concurrent ones to the same
/// history channel: it consumes no offset, and the ones after it are handed over without it,
/// in offset order, with no gap where it would have been.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_among_concurrent_publications_releases_the_rest_and_leaves_no_gap() {
    use std::sync::Arc;

    use herald_channels::{Publish, PublishError};
    use herald_store::StoreError;

    const N: u64 = 48;
    let dir = tempfile::tempdir().expect("dir");
    let InProcess {
        store,
        app,
        history,
        ..
    } = in_process_history(dir.path()).await;
    let broker = Arc::new(RecordingBroker {
        handed: Default::default(),
        hold_first_until: None,
        refuses: false,
    });
    let publisher = publisher_to(&store, &history, Arc::clone(&broker));
    let message = |event_id: &str, channels: Option<Vec<String>>| {
        let now = chrono::Utc::now();
        herald_core::model::Message {
            id: herald_core::MessageId::new(now),
            app_id: app.id.clone(),
            event_id: Some(event_id.to_owned()),
            event_type: "note".into(),
            channels,
            tags: None,
            payload: bytes::Bytes::from_static(b"{}"),
            created_at: now,
            payload_expires_at: None,
        }
    };
    publisher
        .publish(&app, Publish::message(message("evt-taken", None)))
        .await
        .expect("the message the failing ones conflict with");
    let failing = |n: u64| n % 5 == 2;
    let mut tasks = Vec::new();
    for n in 0..N {
        let publish = if failing(n) {
            Publish::message(message("evt-taken", Some(vec!["history-pipe".into()])))
        } else {
            Publish::pusher_event("note", &["history-pipe".to_owned()], &n.to_string(), None)
        };
        let (publisher, app) = (Arc::clone(&publisher), app.clone());
        tasks.push(tokio::spawn(async move {
            (n, publisher.publish(&app, publish).await)
        }));
    }
    for task in tasks {
        let (n, published) = task.await.expect("task");
        if failing(n) {
            assert!(
                matches!(published, Err(PublishError::Store(StoreError::Conflict(_)))),
                "{n}: {published:?}"
            );
        } else {
            published.expect("published");
        }
    }
    let committed = (0..N).filter(|n| !failing(*n)).count() as u64;
    let handed: Vec<u64> = broker.handed().into_iter().map(|(_, o)| o).collect();
    assert_eq!(handed, (1..=committed).collect::<Vec<_>>());
    let kept: Vec<u64> = store
        .history(
            &app.id,
            "history-pipe",
            &herald_store::HistoryQuery {
                after: None,
                before: None,
                limit: 1_000,
                newest_first: false,
                not_before: chrono::DateTime::UNIX_EPOCH,
            },
        )
        .await
        .expect("history")
        .into_iter()
        .map(|e| e.offset)
        .collect();
    assert_eq!(
        kept, handed,
        "every committed offset kept, none consumed by a failure"
    );
    store.close().await;
}
