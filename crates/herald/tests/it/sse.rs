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
        reqwest::Client::new().get(format!("{}/apps/{}/sse?{query}", server.base, creds.id));
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
    let (_, hello) = stream.data().await;
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
    let mut last_id = String::new();
    let mut text = String::new();
    for expected_offset in 1..=3 {
        let (id, event) = stream.data().await;
        assert_eq!(event["channel"], "history-answer");
        assert_eq!(event["offset"], expected_offset);
        let id = id.expect("history events carry an id");
        assert_eq!(id, format!("history-answer:{epoch}:{expected_offset}"));
        text.push_str(event["data"].as_str().expect("data"));
        last_id = id;
    }
    let (id, news) = stream.data().await;
    assert_eq!(news["channel"], "news");
    assert_eq!(
        id.as_deref(),
        Some(last_id.as_str()),
        "the position is unchanged by news"
    );
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
        c.ws.replay_burst_bytes_per_ip = 1_500;
    })
    .await;
    let (_, creds) = pusher_app(&server, "sse-refused-resume").await;
    let padding = "x".repeat(1000);
    for _ in 0..3 {
        publish(&server, &creds, "history-big", &padding).await;
    }
    let query = "channels=history-big";
    let mut stream = SseClient::open(&server, &creds, query, None).await;
    let (id, hello) = stream.data().await;
    let epoch = hello["data"]["history-big"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    assert_eq!(id, Some(format!("history-big:{epoch}:3")));
    drop(stream);

    // Three 1 KB events do not fit the 1.5 KB budget: refused, and the id still says offset 0,
    // so the browser's next reconnect asks for them again instead of skipping them.
    let from_start = format!("history-big:{epoch}:0");
    let mut refused = SseClient::open(&server, &creds, query, Some(&from_start)).await;
    let (id, hello) = refused.data().await;
    assert_eq!(
        hello["data"]["history-big"]["reason"], "rate_limited",
        "{hello}"
    );
    assert_eq!(id, Some(from_start));
    drop(refused);
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
    let unknown = reqwest::get(format!("{}/apps/99/sse?channels=a", server.base))
        .await
        .expect("request");
    assert_eq!(status(unknown), 404);
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
