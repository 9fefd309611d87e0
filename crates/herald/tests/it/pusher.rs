//! A Pusher protocol test client and Pusher HTTP API signing, shared by the WebSocket tests.

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite::Message};

use crate::harness::{PATIENCE, TestServer};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A Pusher app's credentials, as the app API returns them.
#[derive(Clone)]
pub struct Creds {
    pub id: String,
    pub key: String,
    pub secret: String,
}

pub async fn pusher_app(server: &TestServer, uid: &str) -> (String, Creds) {
    let (_, app) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": uid, "uid": uid})),
        )
        .await;
    let p = &app["pusher"];
    let creds = Creds {
        id: p["appId"].as_str().expect("appId").into(),
        key: p["key"].as_str().expect("key").into(),
        secret: p["secret"].as_str().expect("secret").into(),
    };
    (app["id"].as_str().expect("id").into(), creds)
}

pub struct Client {
    pub socket: Socket,
    pub socket_id: String,
}

impl Client {
    pub async fn connect(server: &TestServer, key: &str) -> Self {
        let mut socket = open(server, key).await;
        let first = next_json(&mut socket).await;
        assert_eq!(first["event"], "pusher:connection_established", "{first}");
        let data: Value =
            serde_json::from_str(first["data"].as_str().expect("string")).expect("json");
        assert_eq!(data["activity_timeout"], 120);
        Self {
            socket,
            socket_id: data["socket_id"].as_str().expect("socket_id").into(),
        }
    }

    pub async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .expect("send");
    }

    pub async fn next(&mut self) -> Value {
        next_json(&mut self.socket).await
    }

    /// The next event named `name`, skipping others.
    pub async fn expect(&mut self, name: &str) -> Value {
        loop {
            let event = self.next().await;
            if event["event"] == name {
                return event;
            }
        }
    }

    pub async fn subscribe(
        &mut self,
        channel: &str,
        auth: Option<String>,
        channel_data: Option<&str>,
    ) -> Value {
        let mut data = json!({"channel": channel});
        if let Some(auth) = auth {
            data["auth"] = json!(auth);
        }
        if let Some(channel_data) = channel_data {
            data["channel_data"] = json!(channel_data);
        }
        self.send(json!({"event": "pusher:subscribe", "data": data}))
            .await;
        self.next().await
    }

    /// Waits for the server to close the connection; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        return frame.map_or(1005, |f| u16::from(f.code));
                    }
                    Some(Ok(_)) => {}
                    other => panic!("connection ended without a close frame: {other:?}"),
                }
            }
        })
        .await
        .expect("timed out waiting for close")
    }
}

pub async fn open(server: &TestServer, key: &str) -> Socket {
    let url = format!(
        "{}/app/{key}?protocol=7&client=js&version=8.4.0",
        server.base.replace("http://", "ws://")
    );
    connect_async(url).await.expect("connect").0
}

pub async fn next_json(socket: &mut Socket) -> Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str()).expect("server sent JSON");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("timed out waiting for a frame")
}

pub fn sign(secret: &str, data: &str) -> String {
    herald_core::pusher::sign(secret, data)
}

pub fn channel_auth(
    creds: &Creds,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    let signed = match channel_data {
        Some(d) => format!("{socket_id}:{channel}:{d}"),
        None => format!("{socket_id}:{channel}"),
    };
    format!("{}:{}", creds.key, sign(&creds.secret, &signed))
}

/// Calls the Pusher HTTP API with a request signed as the Pusher server SDKs sign it.
pub async fn pusher_api(
    server: &TestServer,
    creds: &Creds,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let query: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let params = herald_core::pusher::sign_request(
        &creds.key,
        &creds.secret,
        method,
        path,
        &query,
        body.as_bytes(),
        chrono::Utc::now().timestamp(),
    );
    send_signed(server, method, path, &params, body).await
}

/// [`pusher_api`] with the request signed over `signed_path` and sent to `sent_path`: an SDK
/// signs the path it was given, and its HTTP client may percent-encode it on the way.
pub async fn pusher_api_sent_as(
    server: &TestServer,
    creds: &Creds,
    signed_path: &str,
    sent_path: &str,
    body: Value,
) -> (u16, String) {
    let body = body.to_string();
    let params = herald_core::pusher::sign_request(
        &creds.key,
        &creds.secret,
        "POST",
        signed_path,
        &[],
        body.as_bytes(),
        chrono::Utc::now().timestamp(),
    );
    send_signed(server, "POST", sent_path, &params, body).await
}

/// Sends a Pusher HTTP API request with these query parameters, exactly as given.
async fn send_signed(
    server: &TestServer,
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: String,
) -> (u16, String) {
    let mut url = url::Url::parse(&format!("{}{path}", server.base)).expect("url");
    url.query_pairs_mut().extend_pairs(params);
    let client = crate::harness::http_client();
    let request = match method {
        "POST" => client
            .post(url)
            .header("content-type", "application/json")
            .body(body),
        "DELETE" => client.delete(url),
        _ => client.get(url),
    };
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

pub async fn trigger(server: &TestServer, creds: &Creds, body: Value) -> (u16, String) {
    let path = format!("/apps/{}/events", creds.id);
    pusher_api(server, creds, "POST", &path, &[], Some(body)).await
}

/// The channel's `subscription_count`, through the HTTP API (WebSockets and SSE streams).
pub async fn subscription_count(server: &TestServer, creds: &Creds, channel: &str) -> u64 {
    let (status, info) = pusher_api(
        server,
        creds,
        "GET",
        &format!("/apps/{}/channels/{channel}", creds.id),
        &[("info", "subscription_count")],
        None,
    )
    .await;
    assert_eq!(status, 200, "{info}");
    serde_json::from_str::<Value>(&info).expect("json")["subscription_count"]
        .as_u64()
        .expect("subscription_count")
}

/// Publishes ten events of 10 KB (`tick`) on `channel` in one batch: what fills a stalled
/// reader's socket buffers and outbox fastest.
pub async fn publish_ten_large_events(server: &TestServer, creds: &Creds, channel: &str) {
    let data = "z".repeat(10 * 1000);
    let batch: Vec<Value> = (0..10)
        .map(|_| json!({"name": "tick", "channel": channel, "data": data}))
        .collect();
    let path = format!("/apps/{}/batch_events", creds.id);
    let (status, body) = pusher_api(
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

#[tokio::test]
async fn http_api_refuses_auth_timestamps_at_the_ends_of_i64_without_panicking() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "pusher-timestamps").await;
    let path = format!("/apps/{}/channels", creds.id);
    let signed_at = |now_unix: i64| {
        herald_core::pusher::sign_request(
            &creds.key,
            &creds.secret,
            "GET",
            &path,
            &[],
            b"",
            now_unix,
        )
    };
    for now_unix in [
        i64::MIN,
        i64::MIN + chrono::Utc::now().timestamp(),
        i64::MAX,
    ] {
        let (status, body) =
            send_signed(&server, "GET", &path, &signed_at(now_unix), String::new()).await;
        assert_eq!(status, 401, "auth_timestamp={now_unix}: {body}");
        assert!(
            body.contains("auth_timestamp is") && body.contains("s from the server's time"),
            "auth_timestamp={now_unix}: {body}"
        );
    }
    let mut too_big = signed_at(chrono::Utc::now().timestamp());
    for (name, value) in &mut too_big {
        if name == "auth_timestamp" {
            *value = u64::MAX.to_string();
        }
    }
    let (status, body) = send_signed(&server, "GET", &path, &too_big, String::new()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("auth_timestamp is not a number"), "{body}");
    // The server is still serving: a correctly signed request succeeds.
    let (status, body) = pusher_api(&server, &creds, "GET", &path, &[], None).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

/// A trigger whose name or data holds NUL is a 400 that says so on either store (PostgreSQL's
/// text refuses NUL: on a history channel it was a 500), and a field Pusher's API does not have
/// is a 400 naming it, not ignored (a misspelt `socket_id` sent the event back to its sender).
#[tokio::test]
async fn http_api_refuses_nul_in_events_and_fields_it_does_not_know() {
    let server = TestServer::start().await;
    let (_, creds) = pusher_app(&server, "pusher-nul").await;
    for body in [
        json!({"name": "e", "channel": "history-chat", "data": "a\u{0}b"}),
        json!({"name": "e\u{0}", "channel": "chat", "data": "x"}),
    ] {
        let (status, answer) = trigger(&server, &creds, body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("may not contain NUL"), "{answer}");
    }
    let (status, answer) = trigger(
        &server,
        &creds,
        json!({"name": "e", "channel": "chat", "data": "x", "socketid": "1.2"}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("unknown field `socketid`"), "{answer}");
    let path = format!("/apps/{}/batch_events", creds.id);
    let batch = json!({"batch": [{"name": "e", "channel": "chat", "data": "x"}], "extra": 1});
    let (status, answer) = pusher_api(&server, &creds, "POST", &path, &[], Some(batch)).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("unknown field `extra`"), "{answer}");
    // Nothing was kept from the refused triggers; a good one goes through.
    let (status, answer) = trigger(
        &server,
        &creds,
        json!({"name": "e", "channel": "history-chat", "data": "fine"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    server.stop().await;
}

/// The review's finding: a Pusher app secret could not be rotated. Now a rotation gives a new
/// secret that Herald signs with at once, while the old one keeps verifying the backend's
/// requests and channel auths for the grace period; without a grace it stops at once.
#[tokio::test]
async fn a_rotated_pusher_secret_keeps_verifying_for_its_grace_period_only() {
    let server = TestServer::start().await;
    let (app, old) = pusher_app(&server, "pusher-rotation").await;
    let path = format!("/api/v1/app/{app}/pusher/secret/rotate");
    let (status, rotated) = server.call(Method::POST, &path, None).await;
    assert_eq!(status, 200, "{rotated}");
    let new = Creds {
        secret: rotated["secret"].as_str().expect("secret").into(),
        ..old.clone()
    };
    assert_ne!(new.secret, old.secret);
    assert!(rotated["previousSecretValidUntil"].is_string(), "{rotated}");
    let (_, shown) = server
        .call(Method::GET, &format!("/api/v1/app/{app}"), None)
        .await;
    assert_eq!(shown["pusher"]["secret"], new.secret.as_str());

    // Both secrets verify during the grace: the HTTP API and a private channel's auth.
    let channels = format!("/apps/{}/channels", old.id);
    for creds in [&old, &new] {
        let (status, body) = pusher_api(&server, creds, "GET", &channels, &[], None).await;
        assert_eq!(status, 200, "{body}");
        let mut client = Client::connect(&server, &creds.key).await;
        let auth = channel_auth(creds, &client.socket_id, "private-rotation", None);
        let answer = client.subscribe("private-rotation", Some(auth), None).await;
        assert_eq!(
            answer["event"], "pusher_internal:subscription_succeeded",
            "{answer}"
        );
    }

    // A rotation without grace retires both earlier secrets at once.
    let (status, rotated) = server
        .call(
            Method::POST,
            &path,
            Some(json!({"secret": "a-chosen-secret-0123456789", "gracePeriodSeconds": 0})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["secret"], "a-chosen-secret-0123456789");
    for creds in [&old, &new] {
        let (status, body) = pusher_api(&server, creds, "GET", &channels, &[], None).await;
        assert_eq!(status, 401, "{body}");
    }
    let chosen = Creds {
        secret: "a-chosen-secret-0123456789".into(),
        ..old.clone()
    };
    let (status, body) = pusher_api(&server, &chosen, "GET", &channels, &[], None).await;
    assert_eq!(status, 200, "{body}");
    let (status, refused) = server
        .call(Method::POST, &path, Some(json!({"gracePeriodSeconds": -1})))
        .await;
    assert_eq!(status, 422, "{refused}");
    server.stop().await;
}

/// The review of the rotation: each WebSocket kept the credentials it found at its handshake,
/// so on a socket opened before a rotation the old secret kept working forever (even with a
/// grace of 0) and the new one was refused. Now every signature a socket checks is checked
/// against the app's current credentials.
#[tokio::test]
async fn a_rotation_reaches_sockets_opened_before_it() {
    let server = TestServer::start().await;
    let (app, old) = pusher_app(&server, "pusher-rotation-open-socket").await;
    let mut client = Client::connect(&server, &old.key).await;
    let auth = channel_auth(&old, &client.socket_id, "private-before", None);
    let answer = client.subscribe("private-before", Some(auth), None).await;
    assert_eq!(
        answer["event"], "pusher_internal:subscription_succeeded",
        "{answer}"
    );

    let (status, rotated) = server
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/pusher/secret/rotate"),
            Some(json!({"gracePeriodSeconds": 0})),
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new = Creds {
        secret: rotated["secret"].as_str().expect("secret").into(),
        ..old.clone()
    };

    // The same socket: the retired secret is refused, the new one accepted.
    let auth = channel_auth(&old, &client.socket_id, "private-after", None);
    let refused = client.subscribe("private-after", Some(auth), None).await;
    assert_eq!(refused["event"], "pusher:subscription_error", "{refused}");
    assert_eq!(refused["data"]["status"], 401, "{refused}");
    let auth = channel_auth(&new, &client.socket_id, "private-after", None);
    let answer = client.subscribe("private-after", Some(auth), None).await;
    assert_eq!(
        answer["event"], "pusher_internal:subscription_succeeded",
        "{answer}"
    );

    // User sign-in too.
    let user_data = r#"{"id":"u-rotated"}"#;
    let signin = |creds: &Creds| {
        let signed = format!("{}::user::{user_data}", client.socket_id);
        let auth = format!("{}:{}", creds.key, sign(&creds.secret, &signed));
        json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})
    };
    let (with_old, with_new) = (signin(&old), signin(&new));
    client.send(with_old).await;
    let refused = client.next().await;
    assert_eq!(refused["event"], "pusher:error", "{refused}");
    assert_eq!(refused["data"]["code"], 4009, "{refused}");
    client.send(with_new).await;
    let accepted = client.next().await;
    assert_eq!(accepted["event"], "pusher:signin_success", "{accepted}");
    server.stop().await;
}
