//! Server-Sent Events with a real HTTP client: events, ids, keep-alives, and a dropped
//! connection resumed with Last-Event-ID without loss or duplication.

use serde_json::{Value, json};

use crate::{
    harness::{PATIENCE, TestServer, eventually},
    pusher::{Creds, pusher_app, trigger},
};

/// One SSE event, or a comment.
#[derive(Debug, Default)]
struct SseEvent {
    id: Option<String>,
    data: String,
    comment: Option<String>,
}

struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

impl SseClient {
    async fn open(server: &TestServer, creds: &Creds, query: &str, last_id: Option<&str>) -> Self {
        let response = request(server, creds, query, last_id).await;
        assert_eq!(response.status().as_u16(), 200);
        let headers = response.headers();
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        assert_eq!(headers["x-accel-buffering"], "no");
        Self {
            response,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> SseEvent {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut event = SseEvent::default();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                            event.id = Some(v.to_owned());
                        } else if let Some(v) =
                            line.strip_prefix("data: ").or(line.strip_prefix("data:"))
                        {
                            event.data.push_str(v);
                        } else if let Some(v) = line.strip_prefix(':') {
                            event.comment = Some(v.trim().to_owned());
                        }
                    }
                    return event;
                }
                let chunk = self
                    .response
                    .chunk()
                    .await
                    .expect("read")
                    .expect("stream open");
                self.buffer
                    .push_str(std::str::from_utf8(&chunk).expect("utf8"));
            }
        })
        .await
        .expect("timed out waiting for an SSE event")
    }

    /// Whether the stream ends with no further event (comments aside).
    async fn ends(&mut self) -> bool {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if self.buffer.contains("data:") {
                    return false;
                }
                match self.response.chunk().await {
                    Ok(Some(chunk)) => self
                        .buffer
                        .push_str(std::str::from_utf8(&chunk).expect("utf8")),
                    Ok(None) => return true,
                    Err(_) => return true,
                }
            }
        })
        .await
        .expect("timed out waiting for the stream to end")
    }

    /// The next event that is not a comment, as JSON.
    async fn data(&mut self) -> (Option<String>, Value) {
        loop {
            let event = self.next().await;
            if event.comment.is_none() {
                return (
                    event.id,
                    serde_json::from_str(&event.data).expect("JSON data"),
                );
            }
        }
    }
}

async fn request(
    server: &TestServer,
    creds: &Creds,
    query: &str,
    last_id: Option<&str>,
) -> reqwest::Response {
    let mut request =
        crate::harness::http_client().get(format!("{}/apps/{}/sse?{query}", server.base, creds.id));
    if let Some(id) = last_id {
        request = request.header("last-event-id", id);
    }
    request.send().await.expect("request")
}

async fn publish(server: &TestServer, creds: &Creds, channel: &str, text: &str) {
    let (status, body) = trigger(
        server,
        creds,
        json!({"name": "token", "channel": channel, "data": text}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_dropped_stream_resumes_from_last_event_id_without_loss_or_duplicates() {
    let server = TestServer::start_with(|c| c.history.sse_keepalive_secs = 1).await;
    let (_, creds) = pusher_app(&server, "sse-resume").await;
    let query = "channels=history-answer,news";
    let mut stream = SseClient::open(&server, &creds, query, None).await;
    let (first_id, hello) = stream.data().await;
    assert_eq!(hello["event"], "herald:subscription_succeeded");
    assert_eq!(hello["data"]["history-answer"]["offset"], 0);
    let epoch = hello["data"]["history-answer"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();

    for word in ["The", " answer", " is"] {
        publish(&server, &creds, "history-answer", word).await;
    }
    publish(&server, &creds, "news", "unrelated").await;
    // Order is kept per channel: on PostgreSQL a history channel's events reach the stream
    // when the node hears their commit, so `news` may come before them.
    let mut last_id = first_id.expect("the first event carries the starting position");
    let mut text = String::new();
    let mut expected_offset = 1;
    for _ in 0..4 {
        let (id, event) = stream.data().await;
        if event["channel"] == "news" {
            assert_eq!(
                id.as_deref(),
                Some(last_id.as_str()),
                "the position is unchanged by news"
            );
            continue;
        }
        assert_eq!(event["channel"], "history-answer");
        assert_eq!(event["offset"], expected_offset);
        let id = id.expect("history events carry an id");
        assert_eq!(id, format!("history-answer:{epoch}:{expected_offset}"));
        text.push_str(event["data"].as_str().expect("data"));
        last_id = id;
        expected_offset += 1;
    }
    assert_eq!(expected_offset, 4, "three history events and the news");
    // Idle: keep-alive comments flow.
    loop {
        if stream.next().await.comment.as_deref() == Some("keep-alive") {
            break;
        }
    }
    drop(stream);

    for word in [" forty", "-two", "."] {
        publish(&server, &creds, "history-answer", word).await;
    }
    let mut resumed = SseClient::open(&server, &creds, query, Some(&last_id)).await;
    let (_, hello) = resumed.data().await;
    assert_eq!(
        hello["data"]["history-answer"]["recovered"], true,
        "{hello}"
    );
    assert_eq!(hello["data"]["history-answer"]["missed"], 3);
    publish(&server, &creds, "history-answer", "\n").await;
    for expected_offset in 4..=7 {
        let (id, event) = resumed.data().await;
        assert_eq!(event["offset"], expected_offset, "{event}");
        assert_eq!(
            id,
            Some(format!("history-answer:{epoch}:{expected_offset}"))
        );
        text.push_str(event["data"].as_str().expect("data"));
    }
    assert_eq!(text, "The answer is forty-two.\n");
    server.stop().await;
}

#[tokio::test]
async fn a_stream_dropped_before_its_first_channel_event_resumes_from_the_first_events_id() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "sse-first-id").await;
    // One channel never published to, one with an event already.
    publish(&server, &creds, "history-old", "before").await;
    let query = "channels=history-new,history-old,news";
    let mut stream = SseClient::open(&server, &creds, query, None).await;
    let (first_id, hello) = stream.data().await;
    assert_eq!(hello["event"], "herald:subscription_succeeded");
    let epoch = |channel: &str| {
        hello["data"][channel]["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned()
    };
    let (new_epoch, old_epoch) = (epoch("history-new"), epoch("history-old"));
    let first_id = first_id.expect("the first event carries the stream's starting position");
    assert_eq!(
        first_id,
        format!("history-new:{new_epoch}:0|history-old:{old_epoch}:1")
    );
    drop(stream);

    // Published while the client is away.
    publish(&server, &creds, "history-new", "one").await;
    publish(&server, &creds, "history-old", "two").await;
    publish(&server, &creds, "history-new", "three").await;
    let mut resumed = SseClient::open(&server, &creds, query, Some(&first_id)).await;
    let (id, hello) = resumed.data().await;
    assert_eq!(id.as_deref(), Some(first_id.as_str()), "resumed from there");
    for (channel, missed) in [("history-new", 2), ("history-old", 1)] {
        assert_eq!(hello["data"][channel]["recovered"], true, "{hello}");
        assert_eq!(hello["data"][channel]["missed"], missed, "{hello}");
    }
    // Each channel's missed events in order, then live ones: nothing more, nothing twice.
    publish(&server, &creds, "history-old", "four").await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let (id, event) = resumed.data().await;
        got.push((
            event["channel"].as_str().expect("channel").to_owned(),
            event["offset"].as_u64().expect("offset"),
            event["data"].as_str().expect("data").to_owned(),
            id.expect("history events carry an id"),
        ));
    }
    let (channels, offsets, texts): (Vec<_>, Vec<_>, Vec<_>) = (
        got.iter().map(|g| g.0.as_str()).collect(),
        got.iter().map(|g| g.1).collect(),
        got.iter().map(|g| g.2.as_str()).collect(),
    );
    assert_eq!(
        (channels, offsets, texts),
        (
            vec!["history-new", "history-new", "history-old", "history-old"],
            vec![1, 2, 2, 3],
            vec!["one", "three", "two", "four"],
        )
    );
    assert_eq!(
        got[3].3,
        format!("history-new:{new_epoch}:2|history-old:{old_epoch}:3")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_resumption_the_replay_budget_refuses_keeps_its_position_in_the_first_events_id() {
    let server = TestServer::start_with(|c| {
        c.ws.replay_bytes_per_second_per_ip = 1;
        c.ws.replay_burst_bytes_per_ip = 4_000;
    })
    .await;
    let (_, creds) = pusher_app(&server, "sse-refused-resume").await;
    let padding = "x".repeat(1000);
    for _ in 0..6 {
        publish(&server, &creds, "history-big", &padding).await;
    }
    let query = "channels=history-big";
    let mut stream = SseClient::open(&server, &creds, query, None).await;
    let (id, hello) = stream.data().await;
    let epoch = hello["data"]["history-big"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    assert_eq!(id, Some(format!("history-big:{epoch}:6")));
    drop(stream);

    // Six 1 KB events are more than the 4 KB budget could ever pay: refused for good,
    // `too_many_missed`, and the stream follows the channel from its newest event rather than
    // ending and asking again for ever. (The pricing costs 1 KB of the budget.)
    let from_start = format!("history-big:{epoch}:0");
    let mut too_many = SseClient::open(&server, &creds, query, Some(&from_start)).await;
    let (id, hello) = too_many.data().await;
    assert_eq!(
        hello["data"]["history-big"]["reason"], "too_many_missed",
        "{hello}"
    );
    assert_eq!(id, Some(format!("history-big:{epoch}:6")));
    publish(&server, &creds, "history-big", "live").await;
    let (id, event) = too_many.data().await;
    assert_eq!(event["data"], "live", "{event}");
    assert_eq!(id, Some(format!("history-big:{epoch}:7")));
    drop(too_many);

    // Four events (3 KB) could be paid, but not now, with 1 KB of the budget left after the
    // pricing: refused for now, and the id still says offset 3, so the browser's next reconnect
    // asks for them again instead of skipping them.
    let from_three = format!("history-big:{epoch}:3");
    let mut refused = SseClient::open(&server, &creds, query, Some(&from_three)).await;
    let (id, hello) = refused.data().await;
    assert_eq!(
        hello["data"]["history-big"]["reason"], "rate_limited",
        "{hello}"
    );
    assert_eq!(id, Some(from_three));
    // The stream ends there, so the browser does ask again; a live event on the channel meanwhile
    // would have moved the id past what is still missed.
    assert!(refused.ends().await, "the refused stream ends");
    drop(refused);

    // An id that is not a stream position is refused, not read as a fresh start.
    for bad in [
        "history-big",
        "history-big:e:x",
        "history-big::1",
        "history-big:e:1|junk",
    ] {
        let response = request(&server, &creds, query, Some(bad)).await;
        assert_eq!(response.status().as_u16(), 400, "{bad}");
        let text = response.text().await.expect("text");
        assert!(text.contains("is not a stream position"), "{bad}: {text}");
    }
    // Nor is a header that is not visible ASCII, rather than read as none.
    let response = crate::harness::http_client()
        .get(format!("{}/apps/{}/sse?{query}", server.base, creds.id))
        .header(
            "last-event-id",
            reqwest::header::HeaderValue::from_bytes(b"history-big:\xe9:1").expect("obs-text"),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 400);
    let text = response.text().await.expect("text");
    assert!(text.contains("not visible ASCII"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_replay_that_fits_only_alone_is_asked_for_again_and_one_too_long_alone_is_too_many_missed()
 {
    // An outbox of 16: the replays of one stream take at most 12 frames together.
    let server = TestServer::start_with(|c| c.ws.outbox_frames = 16).await;
    let (_, creds) = pusher_app(&server, "sse-replay-room").await;
    let query = "channels=history-a,history-b";
    let mut stream = SseClient::open(&server, &creds, query, None).await;
    let (_, hello) = stream.data().await;
    let epoch = |channel: &str| {
        hello["data"][channel]["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned()
    };
    let (epoch_a, epoch_b) = (epoch("history-a"), epoch("history-b"));
    drop(stream);
    for i in 0..8 {
        publish(&server, &creds, "history-a", &format!("a{i}")).await;
        publish(&server, &creds, "history-b", &format!("b{i}")).await;
    }

    // 8 + 8 missed: history-a is replayed; history-b fits alone but not beside it, so it is
    // asked for again (`rate_limited`), its position kept, and the stream ends once a's replay
    // is sent.
    let from_start = format!("history-a:{epoch_a}:0|history-b:{epoch_b}:0");
    let mut resumed = SseClient::open(&server, &creds, query, Some(&from_start)).await;
    let (_, hello) = resumed.data().await;
    assert_eq!(hello["data"]["history-a"]["recovered"], true, "{hello}");
    assert_eq!(hello["data"]["history-a"]["missed"], 8, "{hello}");
    assert_eq!(hello["data"]["history-b"]["recovered"], false, "{hello}");
    assert_eq!(
        hello["data"]["history-b"]["reason"], "rate_limited",
        "{hello}"
    );
    let mut last_id = None;
    for i in 0..8 {
        let (id, event) = resumed.data().await;
        assert_eq!(event["channel"], "history-a", "{event}");
        assert_eq!(event["data"], format!("a{i}"), "{event}");
        last_id = id;
    }
    let last_id = last_id.expect("replayed events carry ids");
    assert_eq!(
        last_id,
        format!("history-a:{epoch_a}:8|history-b:{epoch_b}:0")
    );
    assert!(
        resumed.ends().await,
        "the stream ends so the browser asks again"
    );

    // The browser's reconnect gets history-b's replay, the room now free, and stays live.
    let mut again = SseClient::open(&server, &creds, query, Some(&last_id)).await;
    let (_, hello) = again.data().await;
    assert_eq!(hello["data"]["history-a"]["missed"], 0, "{hello}");
    assert_eq!(hello["data"]["history-b"]["recovered"], true, "{hello}");
    assert_eq!(hello["data"]["history-b"]["missed"], 8, "{hello}");
    for i in 0..8 {
        let (_, event) = again.data().await;
        assert_eq!(event["channel"], "history-b", "{event}");
        assert_eq!(event["data"], format!("b{i}"), "{event}");
    }
    publish(&server, &creds, "history-a", "live").await;
    let (last_id, event) = again.data().await;
    assert_eq!(
        (&event["channel"], &event["data"]),
        (&json!("history-a"), &json!("live"))
    );
    let last_id = last_id.expect("an id");
    drop(again);

    // 13 missed on one channel would not fit even alone: `too_many_missed`, and the stream
    // follows the channel live rather than ending and asking again for ever.
    for i in 0..13 {
        publish(&server, &creds, "history-b", &format!("more{i}")).await;
    }
    let mut too_many = SseClient::open(&server, &creds, query, Some(&last_id)).await;
    let (_, hello) = too_many.data().await;
    assert_eq!(hello["data"]["history-a"]["missed"], 0, "{hello}");
    assert_eq!(
        hello["data"]["history-b"]["reason"], "too_many_missed",
        "{hello}"
    );
    publish(&server, &creds, "history-b", "live").await;
    let (_, event) = too_many.data().await;
    assert_eq!(
        (&event["channel"], &event["data"]),
        (&json!("history-b"), &json!("live"))
    );
    drop(too_many);
    server.stop().await;
}

/// The stream hands out its replay room largest backlog first: a channel named later but far
/// behind is not pushed out, on every reconnect, by one named first that misses a little
/// during each reconnect.
#[tokio::test]
async fn the_largest_backlog_is_replayed_first() {
    let server = TestServer::start_with(|c| c.ws.outbox_frames = 16).await;
    let (_, creds) = pusher_app(&server, "sse-largest-first").await;
    let query = "channels=history-small,history-large";
    let mut stream = SseClient::open(&server, &creds, query, None).await;
    let (start, _) = stream.data().await;
    let start = start.expect("the starting position");
    drop(stream);
    for i in 0..3 {
        publish(&server, &creds, "history-small", &format!("s{i}")).await;
    }
    for i in 0..10 {
        publish(&server, &creds, "history-large", &format!("l{i}")).await;
    }
    // 3 + 10 missed, 12 frames of room: the 10 go first; the 3 are asked for again.
    let mut resumed = SseClient::open(&server, &creds, query, Some(&start)).await;
    let (_, hello) = resumed.data().await;
    assert_eq!(hello["data"]["history-large"]["missed"], 10, "{hello}");
    assert_eq!(
        hello["data"]["history-small"]["reason"], "rate_limited",
        "{hello}"
    );
    let mut last_id = None;
    for i in 0..10 {
        let (id, event) = resumed.data().await;
        assert_eq!(event["data"], format!("l{i}"), "{event}");
        last_id = id;
    }
    assert!(resumed.ends().await);
    let last_id = last_id.expect("an id");
    let mut again = SseClient::open(&server, &creds, query, Some(&last_id)).await;
    let (_, hello) = again.data().await;
    assert_eq!(hello["data"]["history-small"]["missed"], 3, "{hello}");
    for i in 0..3 {
        let (_, event) = again.data().await;
        assert_eq!(event["data"], format!("s{i}"), "{event}");
    }
    server.stop().await;
}

#[tokio::test]
async fn private_channels_need_a_signed_token_and_bad_requests_are_refused() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "sse-private").await;
    let status = |r: reqwest::Response| r.status().as_u16();

    let unsigned = request(&server, &creds, "channels=private-inbox", None).await;
    assert_eq!(status(unsigned), 401);
    let expires = chrono::Utc::now().timestamp() + 60;
    let token = herald_core::pusher::sse_token(&creds.secret, "private-inbox", expires);
    let mut stream = SseClient::open(
        &server,
        &creds,
        &format!("channels=private-inbox&token={token}"),
        None,
    )
    .await;
    assert_eq!(
        stream.data().await.1["event"],
        "herald:subscription_succeeded"
    );
    publish(&server, &creds, "private-inbox", "hello").await;
    assert_eq!(stream.data().await.1["data"], "hello");
    let other = request(
        &server,
        &creds,
        &format!("channels=private-other&token={token}"),
        None,
    )
    .await;
    assert_eq!(status(other), 401, "a token is for its channels only");
    let expired = herald_core::pusher::sse_token(&creds.secret, "private-inbox", expires - 3600);
    let late = request(
        &server,
        &creds,
        &format!("channels=private-inbox&token={expired}"),
        None,
    )
    .await;
    assert_eq!(status(late), 401);
    assert_eq!(
        status(request(&server, &creds, "channels=presence-x", None).await),
        400
    );
    assert_eq!(
        status(request(&server, &creds, "channels=bad%20name", None).await),
        400
    );
    assert_eq!(
        status(request(&server, &creds, "channels=", None).await),
        400
    );
    assert_eq!(
        status(request(&server, &creds, "channels=a&channels=b", None).await),
        400,
        "a parameter given twice"
    );
    // At most 10 channels, however many names are given (thousands are refused at the 11th).
    for count in [11, 3_000] {
        let names: Vec<String> = (0..count).map(|n| format!("c{n}")).collect();
        let response = request(
            &server,
            &creds,
            &format!("channels={}", names.join(",")),
            None,
        )
        .await;
        assert_eq!(response.status().as_u16(), 400, "{count} channels");
        let text = response.text().await.expect("text");
        assert!(text.contains("1 to 10 channels"), "{text}");
    }
    let unknown = reqwest::get(format!("{}/apps/99/sse?channels=a", server.base))
        .await
        .expect("request");
    assert_eq!(status(unknown), 404);
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn a_channel_whose_name_holds_a_comma_streams_when_named_by_channel() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "sse-comma").await;
    let expires = chrono::Utc::now().timestamp() + 60;
    let channel = "private-orders,2024";
    // The token of the `channel=` form signs each name followed by a newline.
    let two_channels = herald_core::pusher::sse_token(&creds.secret, channel, expires);
    let refused = request(
        &server,
        &creds,
        &format!("channel=private-orders%2C2024&token={two_channels}"),
        None,
    )
    .await;
    assert_eq!(
        refused.status().as_u16(),
        401,
        "a token for the channels private-orders and 2024 is not one for private-orders,2024"
    );
    let token =
        herald_core::pusher::sse_token(&creds.secret, &format!("{channel}\nnews\n"), expires);
    let mut stream = SseClient::open(
        &server,
        &creds,
        &format!("channel=private-orders%2C2024&channel=news&token={token}"),
        None,
    )
    .await;
    let (_, first) = stream.data().await;
    assert_eq!(first["event"], "herald:subscription_succeeded");
    publish(&server, &creds, channel, "paid").await;
    let (_, event) = stream.data().await;
    assert_eq!(
        (event["channel"].as_str(), event["data"].as_str()),
        (Some(channel), Some("paid"))
    );
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn sse_tokens_expiring_more_than_24_hours_ahead_are_refused() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "sse-token-lifetime").await;
    let lifetime = herald_core::pusher::SSE_TOKEN_MAX_LIFETIME_SECS;
    let now = chrono::Utc::now().timestamp();
    let query = |expires: i64| {
        let token = herald_core::pusher::sse_token(&creds.secret, "private-inbox", expires);
        format!("channels=private-inbox&token={token}")
    };
    // A minute's margin either side of the limit keeps the test off the clock's edge.
    for expires in [now + lifetime + 60, i64::MAX] {
        let response = request(&server, &creds, &query(expires), None).await;
        assert_eq!(response.status().as_u16(), 401, "expires={expires}");
        let body = response.text().await.expect("body");
        assert!(body.contains("24 hours"), "expires={expires}: {body}");
    }
    let response = request(&server, &creds, &query(i64::MIN), None).await;
    assert_eq!(response.status().as_u16(), 401);
    let body = response.text().await.expect("body");
    assert!(body.contains("token expired"), "{body}");

    let mut stream = SseClient::open(&server, &creds, &query(now + lifetime - 60), None).await;
    assert_eq!(
        stream.data().await.1["event"],
        "herald:subscription_succeeded"
    );
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn sse_streams_count_against_the_per_address_limits_and_are_refused_with_429() {
    let server = TestServer::start_with(|c| {
        c.ws.max_connections_per_ip = 2;
        c.ws.connections_per_second_per_ip = 0;
        // Keep-alives show the server soon that a dropped stream is gone.
        c.history.sse_keepalive_secs = 1;
    })
    .await;
    let (_, creds) = pusher_app(&server, "sse-per-ip").await;
    let socket = crate::pusher::Client::connect(&server, &creds.key).await;
    let mut stream = SseClient::open(&server, &creds, "channels=news", None).await;
    assert_eq!(
        stream.data().await.1["event"],
        "herald:subscription_succeeded"
    );

    // The address holds a WebSocket and a stream: a third connection is refused.
    let refused = request(&server, &creds, "channels=news", None).await;
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let body = refused.text().await.expect("body");
    assert!(
        body.contains("too many connections from your address"),
        "{body}"
    );

    // The stream that was open still gets its events.
    publish(&server, &creds, "news", "hello").await;
    let (_, event) = stream.data().await;
    assert_eq!(event["data"], "hello");

    // A stream that ends gives its place back.
    drop(stream);
    let stream = eventually("the dropped stream's place to be free", || async {
        let response = request(&server, &creds, "channels=news", None).await;
        (response.status().as_u16() == 200).then_some(response)
    })
    .await;
    drop((stream, socket));
    server.stop().await;
}

/// A stream read off a plain TCP socket, to see the bytes Herald's listener writes when it
/// serves the stream itself, off hyper (see `herald::listener`): the head, each chunk, the
/// last chunk and the end of the connection.
struct RawStream {
    socket: tokio::net::TcpStream,
    read: Vec<u8>,
}

impl RawStream {
    async fn connect(server: &TestServer) -> Self {
        let address = server.base.trim_start_matches("http://");
        let socket = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        Self {
            socket,
            read: Vec::new(),
        }
    }

    async fn send(&mut self, request: &str) {
        use tokio::io::AsyncWriteExt;
        self.socket
            .write_all(request.as_bytes())
            .await
            .expect("write");
    }

    /// Reads until `read` holds `end`; returns what came before it (and drops `end`).
    async fn until(&mut self, end: &[u8]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(at) = self.read.windows(end.len()).position(|w| w == end) {
                    let taken: Vec<u8> = self.read.drain(..at + end.len()).collect();
                    return taken[..at].to_vec();
                }
                let mut buf = [0u8; 4096];
                let n = self.socket.read(&mut buf).await.expect("read");
                assert!(n > 0, "the connection ended early: {:?}", self.text());
                self.read.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("timed out reading the stream")
    }

    /// The response head, lower-cased.
    async fn head(&mut self) -> String {
        String::from_utf8(self.until(b"\r\n\r\n").await)
            .expect("utf8")
            .to_lowercase()
    }

    /// The next chunk's data (empty: the last chunk).
    async fn chunk(&mut self) -> String {
        let size = String::from_utf8(self.until(b"\r\n").await).expect("utf8");
        let size = usize::from_str_radix(&size, 16).expect("a chunk size");
        let data = self.until(b"\r\n").await;
        assert_eq!(data.len(), size, "the chunk is as long as it says");
        String::from_utf8(data).expect("utf8")
    }

    async fn closed(&mut self) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(PATIENCE, self.socket.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.read).into_owned()
    }
}

fn stream_request(creds: &Creds, query: &str) -> String {
    format!(
        "GET /apps/{}/sse?{query} HTTP/1.1\r\nhost: herald\r\naccept: text/event-stream\r\n\r\n",
        creds.id
    )
}

#[tokio::test]
async fn a_stream_is_written_by_the_listener_chunked_and_ends_with_the_last_chunk_at_shutdown() {
    let server = TestServer::start_with(|c| c.history.sse_keepalive_secs = 1).await;
    let (_, creds) = pusher_app(&server, "sse-raw").await;
    let mut stream = RawStream::connect(&server).await;
    stream.send(&stream_request(&creds, "channels=news")).await;
    let head = stream.head().await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for line in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "x-accel-buffering: no",
        "access-control-allow-origin: *",
        "transfer-encoding: chunked",
        "connection: close",
    ] {
        assert!(head.lines().any(|l| l == line), "{line} in {head}");
    }
    assert!(head.lines().any(|l| l.starts_with("date: ")), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    let first = stream.chunk().await;
    assert!(
        first.contains("herald:subscription_succeeded") && first.ends_with("\n\n"),
        "{first:?}"
    );

    publish(&server, &creds, "news", "hello").await;
    let event = loop {
        let chunk = stream.chunk().await;
        if !chunk.starts_with(':') {
            break chunk;
        }
    };
    assert!(event.starts_with("data: "), "{event:?}");
    let data: Value = serde_json::from_str(event["data: ".len()..].trim_end()).expect("JSON data");
    assert_eq!(data["data"], "hello");
    // Idle: keep-alive comments, each a chunk of its own.
    assert_eq!(stream.chunk().await, ": keep-alive\n\n");

    // Shutdown ends the stream as a stream: the last chunk, then the connection's end.
    server.stop().await;
    loop {
        let chunk = stream.chunk().await;
        if chunk.is_empty() {
            break;
        }
        assert!(
            chunk.starts_with(':'),
            "only keep-alives before the end: {chunk:?}"
        );
    }
    assert!(stream.closed().await, "the connection ends with the stream");
}

#[tokio::test]
async fn a_stream_opens_on_a_kept_alive_connection_and_a_head_request_gets_only_the_head() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "sse-keepalive").await;
    let mut connection = RawStream::connect(&server).await;
    // A HEAD is answered by hyper, with no body, and the connection stays open for more.
    connection
        .send(&format!(
            "HEAD /apps/{}/sse?channels=news HTTP/1.1\r\nhost: herald\r\n\r\n",
            creds.id
        ))
        .await;
    let head = connection.head().await;
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    connection
        .send("GET /health/live HTTP/1.1\r\nhost: herald\r\n\r\n")
        .await;
    let head = connection.head().await;
    assert!(head.starts_with("http/1.1 204 no content\r\n"), "{head}");
    // The same connection now carries a stream.
    connection
        .send(&stream_request(&creds, "channels=news"))
        .await;
    let head = connection.head().await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(
        connection
            .chunk()
            .await
            .contains("herald:subscription_succeeded")
    );
    publish(&server, &creds, "news", "again").await;
    assert!(connection.chunk().await.contains("again"));
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_hangs_up_ends_its_stream_without_waiting_for_a_keep_alive() {
    let server = TestServer::start_with(|c| {
        c.ws.max_connections_per_ip = 1;
        c.ws.connections_per_second_per_ip = 0;
        // Far beyond the test's patience: only reading the socket can notice the hang-up.
        c.history.sse_keepalive_secs = 3600;
    })
    .await;
    let (_, creds) = pusher_app(&server, "sse-hangup").await;
    let mut stream = RawStream::connect(&server).await;
    stream.send(&stream_request(&creds, "channels=news")).await;
    stream.head().await;
    assert!(stream.chunk().await.contains("subscription_succeeded"));
    assert_eq!(
        request(&server, &creds, "channels=news", None)
            .await
            .status()
            .as_u16(),
        429,
        "the address's one stream is taken"
    );
    drop(stream);
    let reopened = eventually("the hung-up stream's place to be free", || async {
        let response = request(&server, &creds, "channels=news", None).await;
        (response.status().as_u16() == 200).then_some(response)
    })
    .await;
    drop(reopened);
    server.stop().await;
}

/// A stream whose client stops reading for good: once its socket buffers and its outbox are
/// full, the listener's write gives way to the overflow and the stream ends, its subscription
/// with it, without waiting for the client to read again (the body is not polled while the
/// write is blocked, so only the writer can see the overflow).
#[tokio::test]
async fn a_stream_whose_client_stopped_reading_ends_once_its_outbox_overflows() {
    stalled_stream_ends("HTTP/1.1").await;
}

/// The same over HTTP/1.0, whose stream the listener writes unframed (no chunks), ending with
/// the connection.
#[tokio::test]
async fn an_http_1_0_stream_whose_client_stopped_reading_ends_once_its_outbox_overflows() {
    stalled_stream_ends("HTTP/1.0").await;
}

async fn stalled_stream_ends(version: &str) {
    use crate::pusher::{publish_ten_large_events, subscription_count};
    let server = TestServer::start_with(|c| c.ws.outbox_frames = 16).await;
    let (_, creds) = pusher_app(&server, "sse-stalled").await;
    let mut stalled = RawStream::connect(&server).await;
    let request = stream_request(&creds, "channels=firehose").replace("HTTP/1.1", version);
    stalled.send(&request).await;
    let head = stalled.head().await;
    assert!(
        head.starts_with(&format!("{} 200 ok", version.to_lowercase())),
        "{head}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(
        head.contains("transfer-encoding: chunked"),
        version == "HTTP/1.1",
        "chunks for HTTP/1.1 only: {head}"
    );
    let first = String::from_utf8(stalled.until(b"\n\n").await).expect("utf8");
    assert!(first.contains("subscription_succeeded"), "{first}");
    assert_eq!(subscription_count(&server, &creds, "firehose").await, 1);

    // Until the stream is gone: socket buffers on loopback hold a few MB, 50 MB is far more
    // than they and the outbox can take.
    let mut batches = 0;
    while subscription_count(&server, &creds, "firehose").await == 1 {
        assert!(batches < 500, "the stalled stream was never ended");
        publish_ten_large_events(&server, &creds, "firehose").await;
        batches += 1;
    }
    // Reading now finds what was buffered, then the connection's end.
    let end = tokio::time::timeout(PATIENCE, async {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stalled.socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stalled stream's connection ends");
    server.stop().await;
}

/// Wrongly signed private-channel tokens and unknown apps count against the client's address,
/// as on the Pusher HTTP API (expired tokens do not): beyond the burst, private streams and
/// lookups of apps this node does not hold are refused with 429 and `Retry-After` before
/// anything is looked up, API requests from the address too, until a failure is due; public
/// streams of an app it holds are served.
#[tokio::test]
async fn an_address_that_keeps_failing_stream_authentication_is_refused_for_a_while() {
    let server = TestServer::start_with(|c| {
        c.api.auth_failures_per_second_per_ip = 1;
        c.api.auth_failure_burst_per_ip = 3;
    })
    .await;
    let (_, creds) = pusher_app(&server, "sse-auth-failures").await;
    let status = |r: reqwest::Response| r.status().as_u16();
    let expires = chrono::Utc::now().timestamp() + 60;
    let forged = herald_core::pusher::sse_token("not-the-secret", "private-inbox", expires);
    let wrong_token = format!("channels=private-inbox&token={forged}");
    // An expired token the secret signed is a page left open, not a guess: never counted.
    let expired = herald_core::pusher::sse_token(&creds.secret, "private-inbox", expires - 3600);
    for _ in 0..5 {
        let late = request(
            &server,
            &creds,
            &format!("channels=private-inbox&token={expired}"),
            None,
        )
        .await;
        assert_eq!(status(late), 401, "expired, and not counted");
    }
    for attempt in 0..2 {
        let refused = request(&server, &creds, &wrong_token, None).await;
        assert_eq!(status(refused), 401, "wrong token {attempt}");
    }
    let unknown = Creds {
        id: "987654321".into(),
        ..creds.clone()
    };
    assert_eq!(
        status(request(&server, &unknown, "channels=news", None).await),
        404,
        "an unknown app is the third failure"
    );
    assert_eq!(
        status(request(&server, &unknown, "channels=news", None).await),
        429,
        "the burst is spent: a fourth lookup is refused before it is made"
    );
    let good = herald_core::pusher::sse_token(&creds.secret, "private-inbox", expires);
    let good_token = format!("channels=private-inbox&token={good}");
    let refused = request(&server, &creds, &good_token, None).await;
    assert_eq!(refused.status().as_u16(), 429, "even a good token waits");
    assert_eq!(
        refused.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(
        refused
            .text()
            .await
            .expect("body")
            .contains("too many failed authentications from this address"),
        "says why"
    );
    let (status_code, _) = crate::pusher::pusher_api(
        &server,
        &creds,
        "GET",
        &format!("/apps/{}/channels", creds.id),
        &[],
        None,
    )
    .await;
    assert_eq!(status_code, 429, "the address's API requests wait too");
    // A public stream of an app this node holds proves nothing and costs no lookup: served.
    let public = request(&server, &creds, "channels=news", None).await;
    assert_eq!(status(public), 200, "public streams are not refused");
    eventually("the address may open private streams again", || async {
        let response = request(&server, &creds, &good_token, None).await;
        (response.status().as_u16() == 200).then_some(())
    })
    .await;
}
