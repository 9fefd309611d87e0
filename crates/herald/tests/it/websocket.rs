//! The Pusher protocol over real sockets, and the Pusher HTTP API, against the real server.

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::{
    connect_async,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};

use crate::{
    harness::{PATIENCE, Receiver, TestServer, eventually},
    pusher::{
        Client, Creds, Socket, channel_auth, next_json, open, pusher_api, pusher_app, sign, trigger,
    },
};

#[tokio::test]
async fn handshake_ping_and_unknown_app() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-hello").await;
    let mut client = Client::connect(&server, &creds.key).await;
    assert!(herald_core::pusher::is_socket_id(&client.socket_id));
    client
        .send(json!({"event": "pusher:ping", "data": {}}))
        .await;
    assert_eq!(client.next().await["event"], "pusher:pong");

    let mut stranger = open(&server, "no-such-key").await;
    match stranger.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::from(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }
    // A key long enough that the reason naming it would pass a close frame's 123 bytes: the
    // reason is cut (at a character), so the client still reads 4001 rather than a broken
    // frame (a browser reports 1006, and pusher-js would reconnect forever).
    let long_key = "k".repeat(110);
    let mut stranger = open(&server, &long_key).await;
    match stranger.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::from(4001));
            assert!(frame.reason.len() <= 123, "{}", frame.reason.len());
        }
        other => panic!("expected close 4001, got {other:?}"),
    }
    server.stop().await;
}

/// A client that closes gets its close frame answered with its own code, as RFC 6455 asks: a
/// browser reports that close (`wasClean`), not a dropped connection (1006).
#[tokio::test]
async fn a_client_that_closes_gets_its_close_frame_answered() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-close-reply").await;
    let mut client = Client::connect(&server, &creds.key).await;
    client.subscribe("news", None, None).await;
    client
        .socket
        .send(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            },
        )))
        .await
        .expect("close sent");
    let reply = tokio::time::timeout(PATIENCE, async {
        loop {
            match client.socket.next().await {
                Some(Ok(Message::Close(frame))) => break Some(frame),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break None,
            }
        }
    })
    .await
    .expect("answered in time");
    let frame = reply.expect("a close frame back, not a dropped connection");
    assert_eq!(frame.map(|f| f.code), Some(CloseCode::Normal));
    server.stop().await;
}

#[tokio::test]
async fn public_channel_receives_triggered_events_except_the_excluded_socket() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-public").await;
    let mut a = Client::connect(&server, &creds.key).await;
    let mut b = Client::connect(&server, &creds.key).await;
    for client in [&mut a, &mut b] {
        let ok = client.subscribe("orders", None, None).await;
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
        assert_eq!(ok["channel"], "orders");
    }
    let (status, body) = trigger(&server, &creds, json!({"name": "order.paid", "channel": "orders", "data": "{\"id\":7}", "socket_id": b.socket_id})).await;
    assert_eq!((status, body.as_str()), (200, "{}"));
    let event = a.next().await;
    assert_eq!(
        event,
        json!({"event": "order.paid", "channel": "orders", "data": "{\"id\":7}"})
    );
    // b was excluded: the next thing it sees is the following event.
    trigger(
        &server,
        &creds,
        json!({"name": "second", "channels": ["orders"], "data": "x"}),
    )
    .await;
    assert_eq!(b.next().await["event"], "second");
    server.stop().await;
}

#[tokio::test]
async fn private_channels_check_the_signature_and_bad_auth_harms_no_one_else() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-private").await;
    let mut good = Client::connect(&server, &creds.key).await;
    let mut bad = Client::connect(&server, &creds.key).await;
    let auth = channel_auth(&creds, &good.socket_id, "private-acct", None);
    assert_eq!(
        good.subscribe("private-acct", Some(auth.clone()), None)
            .await["event"],
        "pusher_internal:subscription_succeeded"
    );

    // Another socket's signature, no signature, a wrong secret: all refused with 401.
    let stolen = bad.subscribe("private-acct", Some(auth), None).await;
    assert_eq!(stolen["event"], "pusher:subscription_error", "{stolen}");
    assert_eq!(stolen["data"]["status"], 401);
    assert_eq!(
        bad.subscribe("private-acct", None, None).await["data"]["type"],
        "AuthError"
    );
    let forged = format!(
        "{}:{}",
        creds.key,
        sign("wrong-secret", &format!("{}:private-acct", bad.socket_id))
    );
    assert_eq!(
        bad.subscribe("private-acct", Some(forged), None).await["event"],
        "pusher:subscription_error"
    );
    let invalid = bad.subscribe("bad channel!", None, None).await;
    assert_eq!(invalid["data"]["type"], "InvalidChannel", "{invalid}");

    trigger(
        &server,
        &creds,
        json!({"name": "balance", "channel": "private-acct", "data": "42"}),
    )
    .await;
    assert_eq!(good.next().await["data"], "42");
    server.stop().await;
}

#[tokio::test]
async fn presence_members_join_and_leave_once_per_user() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-presence").await;
    let channel = "presence-room";
    let alice_data = r#"{"user_id":"alice","user_info":{"name":"Alice"}}"#;
    let bob_data = r#"{"user_id":"bob","user_info":{"name":"Bob"}}"#;

    let mut alice = Client::connect(&server, &creds.key).await;
    let auth = channel_auth(&creds, &alice.socket_id, channel, Some(alice_data));
    let joined = alice.subscribe(channel, Some(auth), Some(alice_data)).await;
    let snapshot: Value =
        serde_json::from_str(joined["data"].as_str().expect("string")).expect("json");
    assert_eq!(snapshot["presence"]["ids"], json!(["alice"]));

    let mut bob = Client::connect(&server, &creds.key).await;
    let auth = channel_auth(&creds, &bob.socket_id, channel, Some(bob_data));
    let joined = bob.subscribe(channel, Some(auth), Some(bob_data)).await;
    let snapshot: Value =
        serde_json::from_str(joined["data"].as_str().expect("string")).expect("json");
    assert_eq!(snapshot["presence"]["count"], 2);
    assert_eq!(snapshot["presence"]["hash"]["alice"]["name"], "Alice");
    let added = alice.expect("pusher_internal:member_added").await;
    let added: Value = serde_json::from_str(added["data"].as_str().expect("string")).expect("json");
    assert_eq!(
        added,
        json!({"user_id": "bob", "user_info": {"name": "Bob"}})
    );

    // Alice subscribes again on the same connection: confirmed with the members, as a first
    // subscription is (pusher-js reads them from it), and still one member to the others.
    let auth = channel_auth(&creds, &alice.socket_id, channel, Some(alice_data));
    let again = alice.subscribe(channel, Some(auth), Some(alice_data)).await;
    assert_eq!(
        again["event"], "pusher_internal:subscription_succeeded",
        "{again}"
    );
    let snapshot: Value =
        serde_json::from_str(again["data"].as_str().expect("string")).expect("json");
    assert_eq!(snapshot["presence"]["ids"], json!(["alice", "bob"]));
    assert_eq!(snapshot["presence"]["hash"]["bob"]["name"], "Bob");

    // Bob on a second tab: no second member_added.
    let mut bob2 = Client::connect(&server, &creds.key).await;
    let auth = channel_auth(&creds, &bob2.socket_id, channel, Some(bob_data));
    bob2.subscribe(channel, Some(auth), Some(bob_data)).await;

    let path = format!("/apps/{}/channels/{channel}", creds.id);
    let (status, info) = pusher_api(
        &server,
        &creds,
        "GET",
        &path,
        &[("info", "user_count,subscription_count")],
        None,
    )
    .await;
    assert_eq!(status, 200, "{info}");
    let info: Value = serde_json::from_str(&info).expect("json");
    assert_eq!(
        info,
        json!({"occupied": true, "user_count": 2, "subscription_count": 3})
    );
    let (_, users) = pusher_api(&server, &creds, "GET", &format!("{path}/users"), &[], None).await;
    assert_eq!(
        serde_json::from_str::<Value>(&users).expect("json"),
        json!({"users": [{"id": "alice"}, {"id": "bob"}]})
    );
    // A name no channel can have is refused, as `GET .../channels/{channel}` refuses it.
    let bad_name = format!("/apps/{}/channels/presence-a%20b/users", creds.id);
    let (status, refused) = pusher_api(&server, &creds, "GET", &bad_name, &[], None).await;
    assert_eq!(status, 400, "{refused}");

    drop(bob2);
    drop(bob);
    let removed = alice.expect("pusher_internal:member_removed").await;
    assert_eq!(
        removed["data"], "{\"user_id\":\"bob\"}",
        "one removal for both of bob's sockets"
    );
    let (_, list) = pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels", creds.id),
        &[("filter_by_prefix", "presence-"), ("info", "user_count")],
        None,
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&list).expect("json"),
        json!({"channels": {"presence-room": {"user_count": 1}}})
    );
    server.stop().await;
}

#[tokio::test]
async fn client_events_reach_others_but_not_the_sender_and_are_rate_limited() {
    let server = TestServer::start_with(|c| c.ws.client_events_per_second = 3).await;
    let (_, creds) = pusher_app(&server, "ws-chat").await;
    let channel = "private-chat";
    let mut a = Client::connect(&server, &creds.key).await;
    let mut b = Client::connect(&server, &creds.key).await;
    for client in [&mut a, &mut b] {
        let auth = channel_auth(&creds, &client.socket_id, channel, None);
        client.subscribe(channel, Some(auth), None).await;
    }
    a.send(json!({"event": "client-typing", "channel": channel, "data": {"text": "hi"}}))
        .await;
    let got = b.next().await;
    assert_eq!(
        got,
        json!({"event": "client-typing", "channel": channel, "data": {"text": "hi"}})
    );
    a.send(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(
        a.next().await["event"],
        "pusher:pong",
        "the sender did not get its own event"
    );

    // On a public channel a client event is refused, and the connection lives on.
    a.subscribe("lobby", None, None).await;
    a.send(json!({"event": "client-x", "channel": "lobby", "data": {}}))
        .await;
    let refused = a.next().await;
    assert_eq!(refused["event"], "pusher:error", "{refused}");

    // Beyond the rate, each is dropped with `pusher:error` 4301 and the connection stays (a
    // close from 4300 up would be final for pusher-js).
    for n in 0..10 {
        a.send(json!({"event": "client-spam", "channel": channel, "data": {"n": n}}))
            .await;
    }
    // Each client gets its answers in order: a ping's pong comes after everything before it.
    a.send(json!({"event": "pusher:ping", "data": {}})).await;
    let mut refused = 0;
    loop {
        let told = a.next().await;
        if told["event"] == "pusher:pong" {
            break;
        }
        assert_eq!(told["event"], "pusher:error", "{told}");
        assert_eq!(told["data"]["code"], 4301, "{told}");
        refused += 1;
    }
    b.send(json!({"event": "pusher:ping", "data": {}})).await;
    let mut relayed = 0;
    loop {
        let got = b.next().await;
        if got["event"] == "pusher:pong" {
            break;
        }
        assert_eq!(got["event"], "client-spam", "{got}");
        relayed += 1;
    }
    assert_eq!(relayed + refused, 10, "each relayed or refused");
    assert!(
        refused >= 5,
        "3 a second: most of a burst of 10 is refused ({refused})"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_frames_get_errors_and_oversize_closes_1009() {
    let server = TestServer::start_with(|c| c.ws.max_message_bytes = 512).await;
    let (_, creds) = pusher_app(&server, "ws-bad").await;
    let mut client = Client::connect(&server, &creds.key).await;
    client
        .socket
        .send(Message::text("{not json"))
        .await
        .expect("send");
    let error = client.next().await;
    assert_eq!(error["event"], "pusher:error");
    assert!(
        error["data"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("invalid JSON"),
        "{error}"
    );
    client
        .send(json!({"event": "pusher:subscribe", "data": {"nochannel": 1}}))
        .await;
    assert_eq!(client.next().await["event"], "pusher:error");
    client
        .send(json!({"event": "pusher:ping", "data": {}}))
        .await;
    assert_eq!(
        client.next().await["event"],
        "pusher:pong",
        "still connected"
    );

    let mut other = Client::connect(&server, &creds.key).await;
    client
        .socket
        .send(Message::text(format!(
            "{{\"event\":\"x\",\"data\":\"{}\"}}",
            "a".repeat(600)
        )))
        .await
        .expect("send");
    assert_eq!(client.closed().await, 1009);
    other
        .send(json!({"event": "pusher:ping", "data": {}}))
        .await;
    assert_eq!(
        other.next().await["event"],
        "pusher:pong",
        "others untouched"
    );
    server.stop().await;
}

#[tokio::test]
async fn http_api_refuses_bad_signatures_unknown_apps_and_oversize_data() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-http").await;
    let forged = Creds {
        id: creds.id.clone(),
        key: creds.key.clone(),
        secret: "not-the-secret".into(),
    };
    let (status, body) = trigger(
        &server,
        &forged,
        json!({"name": "x", "channel": "c", "data": "1"}),
    )
    .await;
    assert_eq!(status, 401);
    assert!(body.contains("auth_signature"), "{body}");
    let unknown = Creds {
        id: "999".into(),
        ..forged
    };
    assert_eq!(
        trigger(
            &server,
            &unknown,
            json!({"name": "x", "channel": "c", "data": "1"})
        )
        .await
        .0,
        404
    );
    let big = "x".repeat(11 * 1024);
    assert_eq!(
        trigger(
            &server,
            &creds,
            json!({"name": "x", "channel": "c", "data": big})
        )
        .await
        .0,
        413
    );
    assert_eq!(
        trigger(&server, &creds, json!({"name": "x", "data": "1"}))
            .await
            .0,
        400
    );
    let (status, body) = pusher_api(
        &server,
        &creds,
        "POST",
        &format!("/apps/{}/batch_events", creds.id),
        &[],
        Some(json!({"batch": [
            {"name": "a", "channel": "c1", "data": "1"},
            {"name": "b", "channel": "presence-c2", "data": "2", "info": "user_count"}
        ]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("json"),
        json!({"batch": [{}, {"user_count": 0}]})
    );
    server.stop().await;
}

/// Every refusal a trigger can meet comes before it publishes: a 400 leaves the subscribers
/// with nothing (the next event they see is the one published after it), and a batch with one
/// bad event publishes none of the others.
#[tokio::test]
async fn a_refused_trigger_or_batch_publishes_nothing() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-refused").await;
    let mut client = Client::connect(&server, &creds.key).await;
    client.subscribe("news", None, None).await;

    let (status, body) = trigger(
        &server,
        &creds,
        json!({"name": "early", "channel": "news", "data": "1", "info": "user_count"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("presence"), "{body}");
    let (status, body) = trigger(
        &server,
        &creds,
        json!({"name": "early", "channel": "news", "data": "1", "info": "member_count"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("unknown info attribute"), "{body}");
    // Event names are counted in characters, as the SDKs count them.
    let (status, body) = trigger(
        &server,
        &creds,
        json!({"name": "名".repeat(200), "channel": "elsewhere", "data": "1"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = trigger(
        &server,
        &creds,
        json!({"name": "名".repeat(201), "channel": "elsewhere", "data": "1"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // The channel list knows user_count only.
    let (status, body) = pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels", creds.id),
        &[("info", "subscription_count")],
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unknown info attribute"), "{body}");
    // A parameter given twice is refused rather than one value winning; `info` given twice is
    // one list.
    let (status, body) = pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels", creds.id),
        &[
            ("filter_by_prefix", "presence-"),
            ("filter_by_prefix", "private-"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("filter_by_prefix is given more than once"),
        "{body}"
    );
    let (status, body) = pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels/news", creds.id),
        &[
            ("info", "subscription_count"),
            ("info", "subscription_count"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("subscription_count"), "{body}");
    let batch_path = format!("/apps/{}/batch_events", creds.id);
    for (bad, why) in [
        (
            json!({"name": "b", "channel": "news", "data": "2", "info": "user_count"}),
            "presence",
        ),
        (
            json!({"name": "b", "channels": ["news", "other"], "data": "2"}),
            "one channel",
        ),
    ] {
        let (status, body) = pusher_api(
            &server,
            &creds,
            "POST",
            &batch_path,
            &[],
            Some(json!({"batch": [{"name": "early", "channel": "news", "data": "1"}, bad]})),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(why), "{body}");
    }
    let (status, body) = pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels/news", creds.id),
        &[("info", "user_count")],
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let (status, _) = trigger(
        &server,
        &creds,
        json!({"name": "after", "channel": "news", "data": "3"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        client.next().await["event"],
        "after",
        "nothing refused was published"
    );
    server.stop().await;
}

#[tokio::test]
async fn one_event_stream_between_webhooks_and_websockets() {
    let server = TestServer::start().await;
    let mut receiver = Receiver::start().await;
    let (app, creds) = pusher_app(&server, "ws-bridge").await;
    server
        .create_endpoint(&app, json!({"url": receiver.url, "channels": ["orders"]}))
        .await;
    let mut client = Client::connect(&server, &creds.key).await;
    client.subscribe("orders", None, None).await;

    // Webhooks API → WebSocket subscribers (and the endpoint).
    server
        .send(
            &app,
            json!({"eventType": "order.paid", "channels": ["orders"], "payload": {"id": 1}}),
        )
        .await;
    let event = client.next().await;
    assert_eq!(
        event,
        json!({"event": "order.paid", "channel": "orders", "data": "{\"id\":1}"})
    );
    assert_eq!(&receiver.next().await.body[..], br#"{"id":1}"#);

    // Pusher HTTP API → the same subscribers and the endpoint.
    trigger(
        &server,
        &creds,
        json!({"name": "order.shipped", "channel": "orders", "data": "{\"id\":2}"}),
    )
    .await;
    assert_eq!(client.next().await["event"], "order.shipped");
    let delivery = receiver.next().await;
    assert!(delivery.header("webhook-id").starts_with("msg_"));
    assert_eq!(&delivery.body[..], br#"{"id":2}"#);
    trigger(
        &server,
        &creds,
        json!({"name": "note", "channel": "orders", "data": "plain text"}),
    )
    .await;
    assert_eq!(&receiver.next().await.body[..], br#"{"data":"plain text"}"#);
    server.stop().await;
}

#[tokio::test]
async fn slow_consumers_are_disconnected_with_4100() {
    let server = TestServer::start_with(|c| c.ws.outbox_frames = 4).await;
    let (_, creds) = pusher_app(&server, "ws-slow").await;
    let mut slow = Client::connect(&server, &creds.key).await;
    slow.subscribe("firehose", None, None).await;
    // The client reads nothing while ~20 MB are published; socket buffers fill, then the
    // outbox, and the server gives up on it.
    let data = "y".repeat(10 * 1000);
    let batch: Vec<Value> = (0..10)
        .map(|_| json!({"name": "tick", "channel": "firehose", "data": data}))
        .collect();
    let path = format!("/apps/{}/batch_events", creds.id);
    for _ in 0..200 {
        let (status, _) = pusher_api(
            &server,
            &creds,
            "POST",
            &path,
            &[],
            Some(json!({"batch": batch})),
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(slow.closed().await, 4100);
    server.stop().await;
}

/// A client that stops reading for good: once its socket buffers and its outbox are full, the
/// server closes it without waiting for it to read again (the write it was blocked in gives
/// way to the overflow) and its subscription is gone, while a client reading on the same
/// channel receives every event.
#[tokio::test]
async fn a_client_that_never_reads_again_is_dropped_without_waiting_for_it() {
    use crate::pusher::{publish_ten_large_events, subscription_count};
    let server = TestServer::start_with(|c| c.ws.outbox_frames = 64).await;
    let (_, creds) = pusher_app(&server, "ws-stalled").await;
    let mut stalled = Client::connect(&server, &creds.key).await;
    stalled.subscribe("firehose", None, None).await;
    let mut reader = Client::connect(&server, &creds.key).await;
    reader.subscribe("firehose", None, None).await;
    let subscriptions = || subscription_count(&server, &creds, "firehose");
    assert_eq!(subscriptions().await, 2);

    // Until the stalled connection is gone (socket buffers on loopback hold a few MB; 50 MB is
    // far more than they and the outbox can take).
    let mut batches = 0;
    while subscriptions().await == 2 {
        assert!(batches < 500, "the stalled connection was never closed");
        publish_ten_large_events(&server, &creds, "firehose").await;
        for _ in 0..10 {
            assert_eq!(reader.expect("tick").await["channel"], "firehose");
        }
        batches += 1;
    }
    assert_eq!(subscriptions().await, 1, "the reader is still subscribed");

    // Only now does the stalled client read: what was buffered, then the end: the 4100 close
    // frame if it fitted in the socket, else the connection's end.
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match stalled.socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the stalled connection ends");
    assert!(matches!(end, None | Some(4100)), "closed with {end:?}");
    server.stop().await;
}

/// Signs `client` in as `user_id` (`pusher:signin`, signed with the app's secret).
async fn sign_in(client: &mut Client, creds: &Creds, user_id: &str) {
    let user_data = json!({"id": user_id}).to_string();
    let auth = format!(
        "{}:{}",
        creds.key,
        sign(
            &creds.secret,
            &format!("{}::user::{user_data}", client.socket_id)
        )
    );
    client
        .send(json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}))
        .await;
    assert_eq!(client.next().await["event"], "pusher:signin_success");
}

/// A signed-in user's own channel, `#server-to-user-<id>`: pusher-js subscribes to it with an
/// empty auth right after `pusher:signin`, and what the server SDKs' `sendToUser` triggers there
/// reaches that user's connections. Nobody else may subscribe to it.
#[tokio::test]
async fn a_signed_in_user_subscribes_to_its_own_channel_and_receives_what_is_sent_to_it() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-user-channel").await;
    let mut client = Client::connect(&server, &creds.key).await;
    let mut other = Client::connect(&server, &creds.key).await;
    let own = "#server-to-user-u-7";
    let refused = other.subscribe(own, Some(String::new()), None).await;
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["data"]["status"], 403, "not signed in: {refused}");

    sign_in(&mut client, &creds, "u-7").await;
    let ok = client.subscribe(own, Some(String::new()), None).await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    let someone_else = client
        .subscribe("#server-to-user-u-8", Some(String::new()), None)
        .await;
    assert_eq!(
        someone_else["data"]["status"], 403,
        "another user's channel: {someone_else}"
    );

    let (status, body) = trigger(
        &server,
        &creds,
        json!({"name": "order-shipped", "channel": own, "data": "{\"id\":1}"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let event = client.next().await;
    assert_eq!(event["event"], "order-shipped", "{event}");
    assert_eq!(event["channel"], own, "{event}");
    server.stop().await;
}

#[tokio::test]
async fn terminate_connections_closes_a_signed_in_users_sockets() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-terminate").await;
    let mut client = Client::connect(&server, &creds.key).await;
    sign_in(&mut client, &creds, "u-9").await;
    let path = format!("/apps/{}/users/u-9/terminate_connections", creds.id);
    let (status, _) = pusher_api(&server, &creds, "POST", &path, &[], Some(json!({}))).await;
    assert_eq!(status, 200);
    assert_eq!(client.closed().await, 4009);

    // A user id the SDK's HTTP client percent-encodes (Python's requests, PHP's Guzzle): the
    // SDK signed it as given.
    let mut client = Client::connect(&server, &creds.key).await;
    sign_in(&mut client, &creds, "auth0|123").await;
    let (status, body) = crate::pusher::pusher_api_sent_as(
        &server,
        &creds,
        &format!("/apps/{}/users/auth0|123/terminate_connections", creds.id),
        &format!("/apps/{}/users/auth0%7C123/terminate_connections", creds.id),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.closed().await, 4009);
    server.stop().await;
}

#[tokio::test]
async fn the_echo_route_for_conformance_tests_exists_only_in_dev_mode() {
    let production = TestServer::start().await;
    let url = format!("{}/_dev/echo", production.base.replace("http://", "ws://"));
    assert!(
        connect_async(&url).await.is_err(),
        "no echo route outside --dev"
    );
    production.stop().await;

    let dev = TestServer::start_with(|c| c.dev = true).await;
    let url = format!("{}/_dev/echo", dev.base.replace("http://", "ws://"));
    let (mut socket, _) = connect_async(&url).await.expect("echo route in --dev");
    socket.send(Message::text("hello")).await.expect("send");
    assert_eq!(
        socket.next().await.expect("reply").expect("ok"),
        Message::text("hello")
    );
    drop(socket);
    dev.stop().await;
}

#[tokio::test]
async fn idle_connections_are_pinged_and_closed_with_4201_when_silent() {
    let server = TestServer::start_with(|c| {
        c.ws.activity_timeout_secs = 1;
        c.ws.pong_timeout_secs = 1;
    })
    .await;
    let (_, creds) = pusher_app(&server, "ws-idle").await;
    let mut silent = open(&server, &creds.key).await;
    let mut lively = open(&server, &creds.key).await;
    for socket in [&mut silent, &mut lively] {
        let hello = next_json(socket).await;
        let data: Value =
            serde_json::from_str(hello["data"].as_str().expect("string")).expect("json");
        assert_eq!(data["activity_timeout"], 1);
    }

    // After a second of silence the server pings both.
    assert_eq!(next_json(&mut silent).await["event"], "pusher:ping");
    assert_eq!(next_json(&mut lively).await["event"], "pusher:ping");
    lively
        .send(Message::text(
            json!({"event": "pusher:pong", "data": {}}).to_string(),
        ))
        .await
        .expect("pong");

    // The one that answered is pinged again later; the silent one is closed with 4201.
    let closed = async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("ended without a close frame: {other:?}"),
            }
        }
    };
    let code = tokio::time::timeout(crate::harness::PATIENCE, closed)
        .await
        .expect("closed in time");
    assert_eq!(code, Some(4201));
    assert_eq!(next_json(&mut lively).await["event"], "pusher:ping");
    server.stop().await;
}

#[tokio::test]
async fn limits_on_connections_channels_and_presence_members_hold() {
    let server = TestServer::start_with(|c| {
        c.ws.max_connections_per_app = 2;
        c.ws.max_channels_per_connection = 2;
        c.ws.max_presence_members = 1;
        c.ws.max_user_info_bytes = 32;
    })
    .await;
    let (_, creds) = pusher_app(&server, "ws-limits").await;
    let mut first = Client::connect(&server, &creds.key).await;
    let mut second = Client::connect(&server, &creds.key).await;

    // A third connection is over the app's quota.
    let mut third = open(&server, &creds.key).await;
    let code = loop {
        match third.next().await {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(4004));

    // One member per presence channel: a second user is refused (403).
    let room = "presence-room";
    let alice = r#"{"user_id":"alice"}"#;
    let bob = r#"{"user_id":"bob"}"#;
    let auth = |client: &Client, data: &str| {
        Some(channel_auth(&creds, &client.socket_id, room, Some(data)))
    };
    let ok = second
        .subscribe(room, auth(&second, alice), Some(alice))
        .await;
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    let full = first.subscribe(room, auth(&first, bob), Some(bob)).await;
    assert_eq!(full["event"], "pusher:subscription_error", "{full}");
    assert_eq!(full["data"]["status"], 403);

    // Two channels per connection; a third is refused and the connection stays.
    first.subscribe("a", None, None).await;
    first.subscribe("b", None, None).await;
    let refused = first.subscribe("c", None, None).await;
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["data"]["status"], 400);
    assert_eq!(refused["data"]["type"], "LimitReached");

    // user_info over its limit is refused.
    let big = r#"{"user_id":"carol","user_info":{"bio":"far more than thirty-two bytes of text"}}"#;
    let wide = "presence-wide";
    let auth = Some(channel_auth(&creds, &second.socket_id, wide, Some(big)));
    let too_big = second.subscribe(wide, auth, Some(big)).await;
    assert_eq!(too_big["event"], "pusher:subscription_error", "{too_big}");
    assert_eq!(too_big["data"]["type"], "InvalidChannelData");

    // Both connections still work.
    let (status, _) = trigger(
        &server,
        &creds,
        json!({"name": "still-here", "channels": ["a", room], "data": "{}"}),
    )
    .await;
    assert_eq!(status, 200);
    first.expect("still-here").await;
    second.expect("still-here").await;
    server.stop().await;
}

/// A client frame built by hand, so it can break the rules: `head` is the first byte (FIN,
/// reserved bits, opcode); the payload is masked unless `masked` is false.
fn raw_frame(head: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = vec![head];
    match u8::try_from(payload.len()) {
        Ok(len) if len < 126 => frame.push(mask_bit | len),
        _ => match u16::try_from(payload.len()) {
            Ok(len) => {
                frame.push(mask_bit | 126);
                frame.extend(len.to_be_bytes());
            }
            Err(_) => {
                frame.push(mask_bit | 127);
                frame.extend((payload.len() as u64).to_be_bytes());
            }
        },
    }
    if !masked {
        frame.extend(payload);
        return frame;
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    frame.extend(key);
    frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    frame
}

const FIN_TEXT: u8 = 0x81;
const TEXT_FRAGMENT: u8 = 0x01;
const FIN_CONTINUATION: u8 = 0x80;

/// Writes raw bytes under the WebSocket client, past its own checks.
async fn write_raw(socket: &mut Socket, bytes: &[u8]) {
    let tcp = socket.get_mut();
    tcp.write_all(bytes).await.expect("write raw frame");
    tcp.flush().await.expect("flush raw frame");
}

/// Everything the server sends until it closes, and the close code.
async fn until_close(socket: &mut Socket) -> (Vec<Value>, u16) {
    tokio::time::timeout(PATIENCE, async {
        let mut frames = Vec::new();
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => {
                    return (frames, frame.map_or(1005, |f| u16::from(f.code)));
                }
                Some(Ok(Message::Text(text))) => {
                    frames.push(serde_json::from_str(text.as_str()).expect("server sent JSON"));
                }
                Some(Ok(_)) => {}
                other => panic!("connection ended without a close frame: {other:?}"),
            }
        }
    })
    .await
    .expect("timed out waiting for close")
}

#[tokio::test]
async fn messages_far_over_the_limit_close_1009_even_when_fragmented() {
    let server = TestServer::start_with(|c| c.ws.max_message_bytes = 512).await;
    let (_, creds) = pusher_app(&server, "ws-huge").await;

    // Far over the limit (128x) in one frame: refused from the frame header on.
    let mut huge = Client::connect(&server, &creds.key).await;
    let text = format!("{{\"event\":\"x\",\"data\":\"{}\"}}", "a".repeat(64 * 1024));
    huge.socket.send(Message::text(text)).await.expect("send");
    assert_eq!(huge.closed().await, 1009);

    // Over the limit only in total: four fragments of 200 bytes each.
    let mut fragmented = Client::connect(&server, &creds.key).await;
    let part = [b'a'; 200];
    let mut bytes = raw_frame(TEXT_FRAGMENT, true, &part);
    for _ in 0..2 {
        bytes.extend(raw_frame(0x00, true, &part));
    }
    bytes.extend(raw_frame(FIN_CONTINUATION, true, &part));
    write_raw(&mut fragmented.socket, &bytes).await;
    assert_eq!(fragmented.closed().await, 1009);

    // Exactly at the limit is accepted.
    let mut fits = Client::connect(&server, &creds.key).await;
    let ping = r#"{"event":"pusher:ping","data":{}}"#;
    let padded = format!("{ping}{}", " ".repeat(512 - ping.len()));
    fits.socket.send(Message::text(padded)).await.expect("send");
    assert_eq!(fits.next().await["event"], "pusher:pong");
    // Gone before shutdown, which would otherwise wait for its close reply.
    drop((huge, fragmented, fits));
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_1007() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "ws-utf8").await;
    let mut whole = Client::connect(&server, &creds.key).await;
    write_raw(
        &mut whole.socket,
        &raw_frame(FIN_TEXT, true, b"{\"event\":\"\xff\xfe\"}"),
    )
    .await;
    assert_eq!(whole.closed().await, 1007);

    // Invalid across fragments: a sequence cut in two and completed wrongly.
    let mut split = Client::connect(&server, &creds.key).await;
    let mut bytes = raw_frame(TEXT_FRAGMENT, true, b"caf\xc3");
    bytes.extend(raw_frame(FIN_CONTINUATION, true, b"\x28"));
    write_raw(&mut split.socket, &bytes).await;
    assert_eq!(split.closed().await, 1007);
    server.stop().await;
}

#[tokio::test]
async fn protocol_violations_close_1002_on_the_app_and_echo_routes() {
    let server = TestServer::start_with(|c| c.dev = true).await;
    let (_, creds) = pusher_app(&server, "ws-protocol").await;
    let ping = br#"{"event":"pusher:ping","data":{}}"#;
    let violations: [(&str, Vec<u8>); 4] = [
        ("reserved bit set", raw_frame(FIN_TEXT | 0x40, true, ping)),
        ("unmasked client frame", raw_frame(FIN_TEXT, false, ping)),
        (
            "continuation without a start",
            raw_frame(FIN_CONTINUATION, true, ping),
        ),
        ("reserved opcode", raw_frame(0x83, true, ping)),
    ];
    for (what, bytes) in &violations {
        let mut client = Client::connect(&server, &creds.key).await;
        write_raw(&mut client.socket, bytes).await;
        assert_eq!(client.closed().await, 1002, "{what}");
    }
    let url = format!("{}/_dev/echo", server.base.replace("http://", "ws://"));
    for (what, bytes) in &violations {
        let (mut echo, _) = connect_async(&url).await.expect("echo route in --dev");
        write_raw(&mut echo, bytes).await;
        assert_eq!(until_close(&mut echo).await.1, 1002, "echo: {what}");
    }
    server.stop().await;
}

#[tokio::test]
async fn deleting_an_app_closes_its_sockets_with_4001_and_relays_nothing_after() {
    let server = TestServer::start().await;
    let (app, creds) = pusher_app(&server, "ws-deleted").await;
    let (_, kept) = pusher_app(&server, "ws-kept").await;
    let channel = "private-room";
    let mut a = Client::connect(&server, &creds.key).await;
    let mut b = Client::connect(&server, &creds.key).await;
    for client in [&mut a, &mut b] {
        let auth = channel_auth(&creds, &client.socket_id, channel, None);
        let ok = client.subscribe(channel, Some(auth), None).await;
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
    }
    let mut bystander = Client::connect(&server, &kept.key).await;
    let auth = channel_auth(&kept, &bystander.socket_id, channel, None);
    bystander.subscribe(channel, Some(auth), None).await;
    let mut sse = crate::harness::http_client()
        .get(format!(
            "{}/apps/{}/sse?channels=news",
            server.base, creds.id
        ))
        .send()
        .await
        .expect("sse request");
    assert_eq!(sse.status().as_u16(), 200);

    let (status, body) = server
        .call(Method::DELETE, &format!("/api/v1/app/{app}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    // Sent after the deletion was acknowledged: it must reach no one. (The send itself may
    // fail if the close has already arrived.)
    let late = json!({"event": "client-late", "channel": channel, "data": {}});
    let _ = a.socket.send(Message::text(late.to_string())).await;

    assert_eq!(until_close(&mut a.socket).await.1, 4001);
    let (seen, code) = until_close(&mut b.socket).await;
    assert_eq!(code, 4001);
    assert!(
        seen.iter().all(|frame| frame["event"] != "client-late"),
        "relayed after the deletion: {seen:?}"
    );
    let mut again = open(&server, &creds.key).await;
    assert_eq!(until_close(&mut again).await.1, 4001, "the key is gone");

    // The app's SSE stream ends too.
    tokio::time::timeout(PATIENCE, async {
        while sse.chunk().await.expect("read sse").is_some() {}
    })
    .await
    .expect("the SSE stream ended");

    // Another app's connection is untouched.
    bystander
        .send(json!({"event": "pusher:ping", "data": {}}))
        .await;
    assert_eq!(bystander.next().await["event"], "pusher:pong");
    drop((a, b, again, bystander));
    server.stop().await;
}

/// Opens `/app/{key}`, sending `X-Forwarded-For` if given.
async fn open_forwarded(server: &TestServer, key: &str, forwarded_for: Option<&str>) -> Socket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/app/{key}?protocol=7&client=js&version=8.4.0",
        server.base.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().expect("a WebSocket request");
    if let Some(forwarded_for) = forwarded_for {
        request.headers_mut().insert(
            "x-forwarded-for",
            forwarded_for.parse().expect("a header value"),
        );
    }
    connect_async(request).await.expect("connect").0
}

/// The server's first word: `Ok` for `pusher:connection_established`, else the close code.
async fn greeting(socket: &mut Socket) -> Result<(), u16> {
    let (frames, code) = tokio::time::timeout(PATIENCE, async {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let first: Value = serde_json::from_str(text.as_str()).expect("JSON");
                assert_eq!(first["event"], "pusher:connection_established", "{first}");
                (vec![first], None)
            }
            Some(Ok(Message::Close(frame))) => {
                (Vec::new(), Some(frame.map_or(1005, |f| u16::from(f.code))))
            }
            other => panic!("expected a greeting or a close frame, got {other:?}"),
        }
    })
    .await
    .expect("timed out waiting for the server's first frame");
    match code {
        Some(code) => {
            assert!(frames.is_empty());
            Err(code)
        }
        None => Ok(()),
    }
}

/// Opens an SSE stream on `channel`, from the test's address; the response stays open.
async fn sse(server: &TestServer, creds: &Creds, channel: &str) -> reqwest::Response {
    reqwest::get(format!(
        "{}/apps/{}/sse?channels={channel}",
        server.base, creds.id
    ))
    .await
    .expect("SSE request")
}

#[tokio::test]
async fn one_address_holds_at_most_max_connections_per_ip_websockets_and_sse_together() {
    // Before per-address limits, one client with only the public key could open as many
    // sockets as the app's quota (10,000 in 3.8 s) and lock every other user out with 4004.
    let server = TestServer::start_with(|c| {
        c.ws.max_connections_per_ip = 5;
        c.ws.connections_per_second_per_ip = 0;
    })
    .await;
    let (_, a) = pusher_app(&server, "per-ip-a").await;
    let (_, b) = pusher_app(&server, "per-ip-b").await;
    let mut held = Vec::new();
    for creds in [&a, &a, &a, &b] {
        held.push(Client::connect(&server, &creds.key).await);
    }
    let stream = sse(&server, &a, "news").await;
    assert_eq!(
        stream.status(),
        200,
        "the fifth connection is an SSE stream"
    );

    // The sixth, on either app and either transport, is refused: 4100 tells pusher-js to back
    // off and reconnect; SSE gets 429 with Retry-After.
    for creds in [&a, &b] {
        let mut sixth = open(&server, &creds.key).await;
        let (frames, code) = until_close(&mut sixth).await;
        assert_eq!(code, 4100, "{frames:?}");
        assert!(
            frames.is_empty(),
            "refused before the handshake: {frames:?}"
        );
    }
    let refused = sse(&server, &b, "news").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let body = refused.text().await.expect("body");
    assert!(
        body.contains("too many connections from your address"),
        "{body}"
    );

    // The five still work.
    let (status, _) = trigger(
        &server,
        &a,
        json!({"name": "still-here", "channel": "lobby", "data": "{}"}),
    )
    .await;
    assert_eq!(status, 200);
    held[0].subscribe("lobby", None, None).await;
    held[0]
        .send(json!({"event": "pusher:ping", "data": {}}))
        .await;
    assert_eq!(held[0].next().await["event"], "pusher:pong");

    // Closing one frees its place for the next.
    let mut first = held.remove(0);
    first.socket.close(None).await.expect("close");
    drop(first);
    eventually("a freed place to be usable", || async {
        let mut socket = open(&server, &b.key).await;
        greeting(&mut socket).await.ok().map(|()| socket)
    })
    .await;
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn new_connections_from_one_address_are_rate_limited_with_a_burst() {
    let server = TestServer::start_with(|c| {
        c.ws.max_connections_per_ip = 0;
        c.ws.connections_per_second_per_ip = 1;
        c.ws.connection_burst_per_ip = 3;
    })
    .await;
    let (_, creds) = pusher_app(&server, "per-ip-rate").await;
    let started = std::time::Instant::now();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for _ in 0..10 {
        let mut socket = open(&server, &creds.key).await;
        match greeting(&mut socket).await {
            Ok(()) => accepted.push(socket),
            Err(code) => {
                assert_eq!(code, 4100);
                refused += 1;
            }
        }
    }
    // Three at once, then one a second: without the limit all ten were accepted.
    let allowed = 3 + started.elapsed().as_secs() as usize + 1;
    assert!(
        accepted.len() <= allowed,
        "{} accepted, at most {allowed} allowed",
        accepted.len()
    );
    assert!(refused > 0, "ten connections at once are over a burst of 3");

    // SSE streams draw from the same bucket.
    let mut answers = Vec::new();
    for _ in 0..5 {
        let response = sse(&server, &creds, "news").await;
        let status = response.status().as_u16();
        if status == 429 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!((1..=2).contains(&retry_after), "{retry_after}");
            answers.push(status);
            break;
        }
        answers.push(status);
    }
    assert_eq!(answers.last(), Some(&429), "{answers:?}");
    server.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_address_gets_its_own_quota() {
    let server = TestServer::start_with(|c| {
        c.ws.max_connections_per_ip = 2;
        c.ws.connections_per_second_per_ip = 0;
        c.ws.trusted_proxies = vec!["127.0.0.0/8".parse().expect("subnet")];
    })
    .await;
    let (_, creds) = pusher_app(&server, "per-ip-proxy").await;
    let mut held = Vec::new();
    let connect = |forwarded: &'static str| {
        let (server, key) = (&server, creds.key.clone());
        async move {
            let mut socket = open_forwarded(server, &key, Some(forwarded)).await;
            greeting(&mut socket).await.map(|()| socket)
        }
    };
    for forwarded in ["203.0.113.1", "203.0.113.1"] {
        held.push(
            connect(forwarded)
                .await
                .expect("within 203.0.113.1's quota"),
        );
    }
    assert_eq!(
        connect("203.0.113.1").await.err(),
        Some(4100),
        "over its quota"
    );
    // Another forwarded address has its own quota; a proxy chain counts its right-most
    // untrusted hop, so a client cannot pick its address by sending the header itself.
    held.push(connect("203.0.113.2").await.expect("another client"));
    held.push(
        connect("203.0.113.2, 127.0.0.9")
            .await
            .expect("the same client through two proxies: its second"),
    );
    assert_eq!(
        connect("198.51.100.77, 203.0.113.2").await.err(),
        Some(4100),
        "a spoofed left-most address is not believed"
    );
    // The proxy's own connections (no header) are counted as the proxy's.
    let mut direct = open(&server, &creds.key).await;
    assert_eq!(greeting(&mut direct).await, Ok(()));
    server.stop().await;
}

#[tokio::test]
async fn an_untrusted_peers_forwarded_for_is_ignored() {
    let server = TestServer::start_with(|c| {
        c.ws.max_connections_per_ip = 2;
        c.ws.connections_per_second_per_ip = 0;
        c.ws.trusted_proxies = vec!["10.0.0.0/8".parse().expect("subnet")];
    })
    .await;
    let (_, creds) = pusher_app(&server, "per-ip-untrusted").await;
    let mut held = Vec::new();
    for forwarded in ["203.0.113.1", "203.0.113.2"] {
        let mut socket = open_forwarded(&server, &creds.key, Some(forwarded)).await;
        assert_eq!(greeting(&mut socket).await, Ok(()));
        held.push(socket);
    }
    // 127.0.0.1 is not a trusted proxy: all three are 127.0.0.1's, whatever they claim.
    let mut third = open_forwarded(&server, &creds.key, Some("203.0.113.3")).await;
    assert_eq!(greeting(&mut third).await, Err(4100));
    server.stop().await;
}

#[tokio::test]
async fn subscribes_over_the_rate_wait_their_turn_and_a_flood_gets_429() {
    // Anonymous subscribes to distinct public channels were used to hammer the store. Beyond
    // the rate a subscribe waits (pusher-js, refused, would keep the channel pending for the
    // connection's life); beyond the channels a connection may have, waiting and subscribed
    // together, it is refused.
    let server = TestServer::start_with(|c| {
        c.ws.subscribes_per_second = 4;
        c.ws.subscribe_burst = 5;
        c.ws.max_channels_per_connection = 8;
    })
    .await;
    let (_, creds) = pusher_app(&server, "subscribe-rate").await;
    let mut client = Client::connect(&server, &creds.key).await;
    let started = std::time::Instant::now();
    let channels: Vec<String> = (0..12).map(|n| format!("history-spam-{n}")).collect();
    for channel in &channels {
        client
            .send(json!({"event": "pusher:subscribe", "data": {"channel": channel}}))
            .await;
    }
    let (mut subscribed, mut limited) = (Vec::new(), Vec::new());
    while subscribed.len() + limited.len() < channels.len() {
        let answer = client.next().await;
        let channel = answer["channel"].as_str().expect("a channel").to_owned();
        match answer["event"].as_str() {
            Some("pusher_internal:subscription_succeeded") => subscribed.push(channel),
            Some("pusher:subscription_error") => {
                let data = &answer["data"];
                assert_eq!(data["status"], 429, "{answer}");
                assert_eq!(data["type"], "RateLimited", "{answer}");
                let error = data["error"].as_str().expect("error");
                assert!(error.contains("too many subscribes"), "{error}");
                limited.push(channel);
            }
            _ => panic!("unexpected answer {answer}"),
        }
    }
    // Five at once, three in their turn (a token every 250 ms), in the order sent; the four
    // beyond are refused at once.
    assert_eq!(subscribed, channels[..8], "confirmed in order");
    assert_eq!(limited, channels[8..], "refused");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(700),
        "the third waiting subscribe was answered after {:?}",
        started.elapsed()
    );

    // The connection stays and its subscriptions work.
    let (status, _) = trigger(
        &server,
        &creds,
        json!({"name": "still-here", "channel": subscribed[7], "data": "{}"}),
    )
    .await;
    assert_eq!(status, 200);
    let event = client.expect("still-here").await;
    assert_eq!(event["channel"], subscribed[7].as_str());
    server.stop().await;
}
