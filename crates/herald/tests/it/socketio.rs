//! Socket.IO clients over real sockets: a raw Engine.IO 4 / Socket.IO 5 client written here
//! (so tests can also send what a library never would), next to Pusher clients, the Svix API
//! and webhooks, on one event stream. The official `socket.io-client` is driven from `.ci/run`
//! (`interop/socketio`).

use std::collections::VecDeque;

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, client::IntoClientRequest},
};

use crate::{
    harness::{PATIENCE, Receiver, TestServer, eventually},
    pusher::{self, Creds},
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One event as a client receives it: name, arguments, binary attachments.
#[derive(Debug)]
struct Event {
    name: String,
    args: Vec<Value>,
    attachments: Vec<Vec<u8>>,
}

/// A Socket.IO client on the WebSocket transport, in one namespace.
struct Sio {
    ws: Ws,
    ns: String,
    events: VecDeque<Event>,
    next_ack: u64,
}

/// What the server said to a CONNECT.
enum Connected {
    Yes(Box<Sio>),
    Refused(String),
}

impl Connected {
    fn expect(self, what: &str) -> Sio {
        match self {
            Self::Yes(sio) => *sio,
            Self::Refused(message) => panic!("{what}: CONNECT refused: {message}"),
        }
    }

    fn refusal(self) -> String {
        match self {
            Self::Yes(_) => panic!("the CONNECT was accepted"),
            Self::Refused(message) => message,
        }
    }
}

async fn open_ws(server: &TestServer, origin: Option<&str>) -> Ws {
    let url = format!(
        "{}/socket.io/?EIO=4&transport=websocket",
        server.base.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().expect("request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("origin"));
    }
    let (mut ws, _) = connect_async(request).await.expect("connect");
    let open = next_text(&mut ws).await;
    assert!(open.starts_with("0{"), "Engine.IO OPEN first: {open}");
    let open: Value = serde_json::from_str(&open[1..]).expect("OPEN is JSON");
    assert!(
        open["sid"].is_string() && open["pingInterval"].is_number(),
        "{open}"
    );
    ws
}

async fn next_text(ws: &mut Ws) -> String {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("timed out waiting for a frame")
}

impl Sio {
    async fn connect(server: &TestServer, ns: &str, auth: Option<Value>) -> Connected {
        Self::connect_from(server, ns, auth, None).await
    }

    async fn connect_from(
        server: &TestServer,
        ns: &str,
        auth: Option<Value>,
        origin: Option<&str>,
    ) -> Connected {
        Self::connect_on(open_ws(server, origin).await, ns, auth).await
    }

    /// CONNECT on an open Engine.IO session.
    async fn connect_on(mut ws: Ws, ns: &str, auth: Option<Value>) -> Connected {
        let auth = auth.map(|a| a.to_string()).unwrap_or_default();
        ws.send(Message::text(format!("40/{ns},{auth}")))
            .await
            .expect("send CONNECT");
        let mut sio = Self {
            ws,
            ns: ns.to_owned(),
            events: VecDeque::new(),
            next_ack: 1,
        };
        loop {
            let text = sio.read_text().await;
            let Some(rest) = text.strip_prefix('4') else {
                continue;
            };
            let Some((kind, body)) = sio.split_packet(rest) else {
                continue;
            };
            match kind {
                '0' => return Connected::Yes(Box::new(sio)),
                '4' => {
                    let body: Value = serde_json::from_str(body).expect("CONNECT_ERROR is JSON");
                    return Connected::Refused(body["message"].as_str().unwrap_or("").to_owned());
                }
                _ => panic!("unexpected packet before the CONNECT answer: {text}"),
            }
        }
    }

    /// `<type><ns>,<rest>` of a Socket.IO packet in this namespace (`None` for another).
    fn split_packet<'a>(&self, packet: &'a str) -> Option<(char, &'a str)> {
        let mut chars = packet.chars();
        let kind = chars.next()?;
        let rest = chars.as_str();
        let prefix = format!("/{},", self.ns);
        // Binary packets put the attachment count before the namespace.
        let (count, rest) = match rest.find('-') {
            Some(i) if matches!(kind, '5' | '6') => (&rest[..=i], &rest[i + 1..]),
            _ => ("", rest),
        };
        let body = rest.strip_prefix(&prefix)?;
        let _ = count;
        Some((kind, body))
    }

    /// The next text frame, answering Engine.IO pings on the way.
    async fn read_text(&mut self) -> String {
        loop {
            let text = next_text(&mut self.ws).await;
            if text == "2" {
                self.ws.send(Message::text("3")).await.expect("pong");
                continue;
            }
            return text;
        }
    }

    async fn read_binary(&mut self) -> Vec<u8> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Binary(bytes))) => return bytes.to_vec(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("expected a binary frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("timed out waiting for an attachment")
    }

    /// Reads one packet: an event is queued; an ack is returned as `(id, args)`.
    async fn read_packet(&mut self) -> Option<(u64, Vec<Value>)> {
        let text = self.read_text().await;
        let packet = text.strip_prefix('4')?;
        let kind = packet.chars().next().unwrap_or(' ');
        let attachments = if matches!(kind, '5' | '6') {
            packet[1..]
                .split_once('-')
                .and_then(|(n, _)| n.parse::<usize>().ok())
                .unwrap_or(0)
        } else {
            0
        };
        let (_, body) = self.split_packet(packet)?;
        let digits = body.chars().take_while(char::is_ascii_digit).count();
        let id: Option<u64> = body[..digits].parse().ok();
        let args: Vec<Value> = serde_json::from_str(&body[digits..]).expect("packet JSON");
        let mut binaries = Vec::new();
        for _ in 0..attachments {
            binaries.push(self.read_binary().await);
        }
        match kind {
            '2' | '5' => {
                let mut args = args.into_iter();
                let name = args.next().and_then(|n| n.as_str().map(str::to_owned));
                self.events.push_back(Event {
                    name: name.expect("event name"),
                    args: args.collect(),
                    attachments: binaries,
                });
                None
            }
            '3' | '6' => Some((id.expect("ack id"), args)),
            '1' => panic!("the server disconnected the socket"),
            _ => None,
        }
    }

    async fn emit(&mut self, event: &str, args: &[Value]) {
        let mut packet = vec![json!(event)];
        packet.extend_from_slice(args);
        self.ws
            .send(Message::text(format!(
                "42/{},{}",
                self.ns,
                Value::Array(packet)
            )))
            .await
            .expect("send event");
    }

    /// Emits with an ack id and returns the ack's first argument.
    async fn emit_ack(&mut self, event: &str, args: &[Value]) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        let mut packet = vec![json!(event)];
        packet.extend_from_slice(args);
        self.ws
            .send(Message::text(format!(
                "42/{},{id}{}",
                self.ns,
                Value::Array(packet)
            )))
            .await
            .expect("send event");
        loop {
            if let Some((ack, mut args)) = self.read_packet().await
                && ack == id
            {
                return args.drain(..).next().unwrap_or(Value::Null);
            }
        }
    }

    /// The next event named `name` (others are dropped).
    async fn expect(&mut self, name: &str) -> Event {
        loop {
            while let Some(event) = self.events.pop_front() {
                if event.name == name {
                    return event;
                }
            }
            self.read_packet().await;
        }
    }

    /// Joins `room` and waits for its confirmation.
    async fn join(&mut self, room: Value) -> Value {
        let ack = self.emit_ack("join", &[room]).await;
        assert_eq!(ack["ok"], true, "join: {ack}");
        ack
    }

    /// No event named `name` arrives within a short while (other events are kept).
    async fn quiet(&mut self, name: &str) {
        let wait = tokio::time::timeout(std::time::Duration::from_millis(300), async {
            loop {
                if self.events.iter().any(|e| e.name == name) {
                    return;
                }
                self.read_packet().await;
            }
        })
        .await;
        assert!(wait.is_err(), "unexpected {name}: {:?}", self.events);
    }
}

/// An app with these Socket.IO settings; returns its id and Pusher credentials.
async fn socketio_app(server: &TestServer, uid: &str, settings: Value) -> (String, Creds) {
    let (status, app) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": uid, "uid": uid, "socketio": settings})),
        )
        .await;
    assert_eq!(status, 201, "{app}");
    let p = &app["pusher"];
    (
        app["id"].as_str().expect("id").to_owned(),
        Creds {
            id: p["appId"].as_str().expect("appId").into(),
            key: p["key"].as_str().expect("key").into(),
            secret: p["secret"].as_str().expect("secret").into(),
        },
    )
}

fn token(creds: &Creds, claims: Value) -> String {
    let mut claims = claims;
    if claims.get("exp").is_none() {
        claims["exp"] = json!(chrono::Utc::now().timestamp() + 600);
    }
    herald_socketio::token::sign(&creds.secret, &claims)
}

fn chat_rules() -> Value {
    json!({
        "allowedOrigins": ["http://allowed.example"],
        "events": [
            {"event": "chat message", "relay": "everyone"},
            {"event": "typing", "relay": "others"},
            {"event": "note", "relay": "rooms"},
            {"event": "order.placed", "relay": "none", "webhook": true},
            {"event": "secret", "relay": "refuse"}
        ]
    })
}

/// [`chat_rules`], and any other event relayed to everyone.
fn chat_rules_relaying_any_event() -> Value {
    let mut rules = chat_rules();
    rules["events"]
        .as_array_mut()
        .expect("rules")
        .push(json!({"event": "*", "relay": "everyone"}));
    rules
}

/// Triggers `name` on `channel` through the Pusher HTTP API, with `{}` as its data.
async fn trigger_empty(server: &TestServer, creds: &Creds, name: &str, channel: &str) {
    let (status, body) = pusher::pusher_api(
        server,
        creds,
        "POST",
        &format!("/apps/{}/events", creds.id),
        &[],
        Some(json!({"name": name, "channel": channel, "data": "{}"})),
    )
    .await;
    assert_eq!(status, 200, "{name}: {body}");
}

#[tokio::test]
async fn the_chat_example_relays_to_everyone_in_order_and_follows_each_rule() {
    let server = TestServer::start().await;
    socketio_app(&server, "chat", chat_rules()).await;
    let mut a = Sio::connect(&server, "chat", None).await.expect("a");
    let mut b = Sio::connect(&server, "chat", None).await.expect("b");
    a.expect("herald:subscribed").await;
    b.expect("herald:subscribed").await;

    // `everyone` (io.emit): every socket, the sender too, in the order sent.
    for i in 0..5 {
        a.emit("chat message", &[json!(format!("hello {i}"))]).await;
    }
    for client in [&mut a, &mut b] {
        for i in 0..5 {
            let event = client.expect("chat message").await;
            assert_eq!(event.args[0], json!(format!("hello {i}")));
            assert_eq!(event.args[1], json!({"channel": "socket.io"}));
        }
    }
    // `others` (socket.broadcast.emit): not the sender.
    let ack = a.emit_ack("typing", &[json!({"who": "a"})]).await;
    assert_eq!(ack, json!({"ok": true}));
    assert_eq!(b.expect("typing").await.args[0], json!({"who": "a"}));
    a.quiet("typing").await;
    // `rooms` (socket.to(room)): the rooms the sender joined, not the sender.
    let ack = a.emit_ack("note", &[json!("n")]).await;
    assert_eq!(ack["error"]["code"], "no_room", "{ack}");
    a.join(json!("room-1")).await;
    b.join(json!("room-1")).await;
    a.emit_ack("note", &[json!("n1")]).await;
    let note = b.expect("note").await;
    assert_eq!(note.args, [json!("n1"), json!({"channel": "room-1"})]);
    a.quiet("note").await;
    // Refused, unknown, too many arguments: an ack says why; without one, herald:error.
    assert_eq!(
        a.emit_ack("secret", &[json!(1)]).await["error"]["code"],
        "refused"
    );
    let unknown = a.emit_ack("nope", &[json!(1)]).await;
    assert_eq!(unknown["ok"], false);
    assert_eq!(unknown["error"]["code"], "unknown_event");
    assert!(
        unknown["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{unknown}"
    );
    assert_eq!(
        a.emit_ack("chat message", &[json!(1), json!(2)]).await["error"]["code"],
        "too_many_arguments"
    );
    a.emit("nope", &[json!(1)]).await;
    let error = a.expect("herald:error").await;
    assert_eq!(error.args[0]["event"], "nope");
    assert_eq!(error.args[0]["code"], "unknown_event");
    // The refusals reached nobody.
    b.quiet("secret").await;
    b.quiet("nope").await;
    server.stop().await;
}

#[tokio::test]
async fn socketio_pusher_clients_and_the_apis_share_one_channel() {
    let server = TestServer::start().await;
    let (app_id, creds) = socketio_app(&server, "mixed", chat_rules()).await;
    let grant = token(&creds, json!({"sub": "u1", "rooms": ["private-mixed"]}));
    let mut sio = Sio::connect(&server, "mixed", Some(json!({"token": grant})))
        .await
        .expect("sio");
    // The namespace channel, then the token's room.
    assert_eq!(
        sio.expect("herald:subscribed").await.args[0]["room"],
        "socket.io"
    );
    assert_eq!(
        sio.expect("herald:subscribed").await.args[0]["room"],
        "private-mixed"
    );
    let mut pusher_client = pusher::Client::connect(&server, &creds.key).await;
    let auth = pusher::channel_auth(&creds, &pusher_client.socket_id, "private-mixed", None);
    let subscribed = pusher_client
        .subscribe("private-mixed", Some(auth), None)
        .await;
    assert_eq!(
        subscribed["event"],
        "pusher_internal:subscription_succeeded"
    );

    // Socket.IO → Pusher.
    sio.emit_ack("note", &[json!({"text": "from sio"})]).await;
    let seen = pusher_client.expect("note").await;
    assert_eq!(seen["channel"], "private-mixed");
    assert_eq!(seen["data"], json!({"text": "from sio"}));
    // The sender's user id travels on presence rooms only, as with Pusher client events.
    assert!(seen.get("user_id").is_none(), "{seen}");
    // Pusher client event → Socket.IO, data as sent.
    pusher_client
        .send(json!({"event": "client-typing", "channel": "private-mixed", "data": {"who": "p"}}))
        .await;
    let typing = sio.expect("client-typing").await;
    assert_eq!(
        typing.args,
        [json!({"who": "p"}), json!({"channel": "private-mixed"})]
    );
    // The Pusher HTTP API: a string of JSON arrives parsed, other text as a string.
    let (status, body) = pusher::pusher_api(
        &server,
        &creds,
        "POST",
        &format!("/apps/{}/events", creds.id),
        &[],
        Some(json!({"name": "paid", "channel": "private-mixed", "data": "{\"order\":7}"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sio.expect("paid").await.args[0], json!({"order": 7}));
    pusher::pusher_api(
        &server,
        &creds,
        "POST",
        &format!("/apps/{}/events", creds.id),
        &[],
        Some(json!({"name": "plain", "channel": "private-mixed", "data": "not json"})),
    )
    .await;
    assert_eq!(sio.expect("plain").await.args[0], json!("not json"));
    // A Svix message with channels: its event type and payload.
    server
        .send(
            &app_id,
            json!({"eventType": "order.shipped", "payload": {"id": "o1"}, "channels": ["private-mixed"]}),
        )
        .await;
    assert_eq!(
        sio.expect("order.shipped").await.args[0],
        json!({"id": "o1"})
    );
    server.stop().await;
}

#[tokio::test]
async fn a_forwarded_event_reaches_the_apps_webhook_endpoint() {
    let server = TestServer::start_with(|c| c.delivery.allow_private_targets = true).await;
    let (app_id, _) = socketio_app(&server, "hooks", chat_rules()).await;
    let mut receiver = Receiver::start().await;
    server
        .create_endpoint(
            &app_id,
            json!({"url": receiver.url, "filterTypes": ["order.placed"]}),
        )
        .await;
    let mut sio = Sio::connect(&server, "hooks", None).await.expect("sio");
    let ack = sio.emit_ack("order.placed", &[json!({"order": 42})]).await;
    assert_eq!(ack, json!({"ok": true}));
    let delivery = receiver.next().await;
    assert!(!delivery.header("webhook-id").is_empty());
    let body: Value = serde_json::from_slice(&delivery.body).expect("JSON");
    assert_eq!(body, json!({"order": 42}));
    server.stop().await;
}

#[tokio::test]
async fn private_and_presence_rooms_need_a_token_that_names_them() {
    let server = TestServer::start().await;
    let (_, creds) = socketio_app(&server, "rooms", chat_rules()).await;
    let mut anonymous = Sio::connect(&server, "rooms", None).await.expect("anon");
    let refused = anonymous.emit_ack("join", &[json!("private-x")]).await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    assert_eq!(
        anonymous.emit_ack("join", &[json!("bad name!")]).await["error"]["code"],
        "invalid_room"
    );
    // A token given with the join grants it.
    let grant = token(&creds, json!({"rooms": ["private-x"]}));
    anonymous
        .join(json!({"room": "private-x", "token": grant}))
        .await;
    // Presence: the token's user joins as a member, listed and announced.
    let alice = token(
        &creds,
        json!({"sub": "alice", "info": {"name": "Alice"}, "rooms": ["presence-lobby"]}),
    );
    let mut a = Sio::connect(&server, "rooms", Some(json!({"token": alice})))
        .await
        .expect("alice");
    let lobby = loop {
        let event = a.expect("herald:subscribed").await;
        if event.args[0]["room"] == "presence-lobby" {
            break event;
        }
    };
    assert_eq!(
        lobby.args[0]["members"],
        json!({"alice": {"name": "Alice"}})
    );
    let bob = token(&creds, json!({"sub": "bob", "rooms": ["presence-lobby"]}));
    let mut b = Sio::connect(&server, "rooms", Some(json!({"token": bob})))
        .await
        .expect("bob");
    let added = a.expect("herald:member_added").await;
    assert_eq!(
        added.args[0],
        json!({"room": "presence-lobby", "user_id": "bob", "user_info": null})
    );
    b.emit_ack("leave", &[json!("presence-lobby")]).await;
    let removed = a.expect("herald:member_removed").await;
    assert_eq!(removed.args[0]["user_id"], "bob");
    // A presence room needs a user.
    let no_user = token(&creds, json!({"rooms": ["presence-lobby"]}));
    let refused = anonymous
        .emit_ack(
            "join",
            &[json!({"room": "presence-lobby", "token": no_user})],
        )
        .await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    server.stop().await;
}

#[tokio::test]
async fn bad_handshakes_get_a_connect_error_saying_why() {
    let server = TestServer::start().await;
    let (_, creds) = socketio_app(&server, "strict", chat_rules()).await;
    let mut bystander = Sio::connect(&server, "strict", None)
        .await
        .expect("bystander");
    bystander.expect("herald:subscribed").await;

    let unknown = Sio::connect(&server, "no-such-app", None).await.refusal();
    assert!(unknown.contains("unknown app"), "{unknown}");
    // A key no app can have is refused before any lookup, saying what a key is (and its
    // namespace is dropped at once, rather than kept for good).
    for key in ["x".repeat(257), "no~such~app".to_owned()] {
        let refusal = Sio::connect(&server, &key, None).await.refusal();
        assert!(
            refusal.contains("1 to 256 letters, digits, '-', '_' or '.'"),
            "{key}: {refusal}"
        );
    }
    let expired = token(&creds, json!({"exp": chrono::Utc::now().timestamp() - 5}));
    let message = Sio::connect(&server, "strict", Some(json!({"token": expired})))
        .await
        .refusal();
    assert!(message.contains("expired"), "{message}");
    let forged = herald_socketio::token::sign(
        "not-the-secret",
        &json!({"exp": chrono::Utc::now().timestamp() + 60}),
    );
    let message = Sio::connect(&server, "strict", Some(json!({"token": forged})))
        .await
        .refusal();
    assert!(message.contains("signature"), "{message}");
    let message = Sio::connect(&server, "strict", Some(json!({"tokn": "x"})))
        .await
        .refusal();
    assert!(
        message.contains("tokn"),
        "unknown auth fields are named: {message}"
    );
    let message = Sio::connect_from(&server, "strict", None, Some("http://evil.example"))
        .await
        .refusal();
    assert!(message.contains("not allowed"), "{message}");
    Sio::connect_from(&server, "strict", None, Some("http://allowed.example"))
        .await
        .expect("an allowed origin");

    // None of it disturbed the socket already connected.
    bystander.emit("chat message", &[json!("still here")]).await;
    assert_eq!(
        bystander.expect("chat message").await.args[0],
        json!("still here")
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_and_oversize_packets_cost_only_their_sender() {
    let server = TestServer::start_with(|c| {
        c.socketio.max_payload_bytes = 10_000;
        c.socketio.max_event_bytes = 1_000;
    })
    .await;
    socketio_app(&server, "limits", chat_rules()).await;
    // Data over max_event_bytes is refused before anything is stored or sent.
    let mut chatty = Sio::connect(&server, "limits", None).await.expect("chatty");
    let refused = chatty
        .emit_ack("chat message", &[json!("x".repeat(2_000))])
        .await;
    assert_eq!(refused["error"]["code"], "too_large", "{refused}");
    let mut bystander = Sio::connect(&server, "limits", None)
        .await
        .expect("bystander");
    bystander.expect("herald:subscribed").await;

    // A packet that is not Socket.IO (JSON cut short, an event without a name, an unknown
    // packet type): the sender's connection is closed (Engine.IO's "parse error").
    for packet in ["42/limits,[not json", "42/limits,[1,2]", "49/limits,"] {
        let mut garbage = Sio::connect(&server, "limits", None)
            .await
            .expect("garbage");
        garbage.ws.send(Message::text(packet)).await.expect("send");
        expect_closed(&mut garbage.ws, packet).await;
    }
    // Over max_payload_bytes: closed too.
    let mut big = Sio::connect(&server, "limits", None).await.expect("big");
    big.emit("chat message", &[json!("x".repeat(20_000))]).await;
    expect_closed(&mut big.ws, "an oversize message").await;
    // Over the polling transport, an oversize body is refused with 413.
    let http = crate::harness::http_client();
    let open = http
        .get(format!(
            "{}/socket.io/?EIO=4&transport=polling",
            server.base
        ))
        .send()
        .await
        .expect("handshake")
        .text()
        .await
        .expect("body");
    let sid: Value = serde_json::from_str(&open[1..]).expect("OPEN");
    let sid = sid["sid"].as_str().expect("sid");
    let status = http
        .post(format!(
            "{}/socket.io/?EIO=4&transport=polling&sid={sid}",
            server.base
        ))
        .body("4".to_owned() + &"x".repeat(20_000))
        .send()
        .await
        .expect("post")
        .status();
    assert_eq!(status, 413);

    bystander.emit("chat message", &[json!("fine")]).await;
    assert_eq!(
        bystander.expect("chat message").await.args[0],
        json!("fine")
    );
    server.stop().await;
}

async fn expect_closed(ws: &mut Ws, what: &str) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match ws.next().await {
                None | Some(Err(_) | Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the connection was not closed"));
}

#[tokio::test]
async fn binary_attachments_reach_socketio_clients_as_binary_and_pusher_clients_as_base64() {
    let server = TestServer::start().await;
    let (_, creds) = socketio_app(&server, "files", chat_rules()).await;
    let mut sender = Sio::connect(&server, "files", None).await.expect("sender");
    let mut receiver = Sio::connect(&server, "files", None)
        .await
        .expect("receiver");
    sender.join(json!("uploads")).await;
    receiver.join(json!("uploads")).await;
    let mut pusher_client = pusher::Client::connect(&server, &creds.key).await;
    pusher_client.subscribe("uploads", None, None).await;

    let bytes: Vec<u8> = (0..=255).collect();
    sender
        .ws
        .send(Message::text(
            r#"451-/files,9["note",{"name":"a.bin","body":{"_placeholder":true,"num":0}}]"#,
        ))
        .await
        .expect("send");
    sender
        .ws
        .send(Message::binary(bytes.clone()))
        .await
        .expect("attachment");
    let note = receiver.expect("note").await;
    assert_eq!(note.args[0]["name"], "a.bin");
    assert_eq!(note.args[0]["body"]["_placeholder"], true);
    assert_eq!(note.attachments, std::slice::from_ref(&bytes));
    let seen = pusher_client.expect("note").await;
    use base64::Engine;
    assert_eq!(
        seen["data"]["body"]["$binary"],
        json!(base64::engine::general_purpose::STANDARD.encode(&bytes))
    );
    server.stop().await;
}

#[tokio::test]
async fn a_reconnecting_client_recovers_what_it_missed_from_its_position() {
    let server = TestServer::start().await;
    socketio_app(&server, "recover", chat_rules()).await;
    let mut writer = Sio::connect(&server, "recover", None)
        .await
        .expect("writer");
    writer.join(json!("history-notes")).await;
    let mut reader = Sio::connect(&server, "recover", None)
        .await
        .expect("reader");
    reader.join(json!("history-notes")).await;
    writer.emit_ack("note", &[json!(1)]).await;
    let first = reader.expect("note").await;
    let meta = first.args[1].clone();
    assert_eq!(meta["channel"], "history-notes");
    assert!(
        meta["offset"].is_u64() && meta["epoch"].is_string(),
        "{meta}"
    );
    drop(reader);
    for n in 2..=4 {
        writer.emit_ack("note", &[json!(n)]).await;
    }
    let positions = json!({"history-notes": {"epoch": meta["epoch"], "offset": meta["offset"]}});
    let mut reader = Sio::connect(&server, "recover", Some(json!({"positions": positions})))
        .await
        .expect("reader again");
    // The handshake's positions apply when the room is joined (here by `join`).
    let joined = reader.join(json!("history-notes")).await;
    assert_eq!(joined["history"]["recovered"], true, "{joined}");
    for n in 2..=4 {
        assert_eq!(reader.expect("note").await.args[0], json!(n));
    }
    writer.emit_ack("note", &[json!(5)]).await;
    assert_eq!(reader.expect("note").await.args[0], json!(5));
    server.stop().await;
}

/// A socket.io-client connection (an Engine.IO session and its first namespace) costs its
/// address one connection of the rate, as a WebSocket does: charged twice, half of a burst of
/// reconnects behind one address got a `connect_error`, after which socket.io-client does not
/// reconnect by itself.
#[tokio::test]
async fn a_connection_costs_its_address_one_connection_of_the_rate() {
    const BURST: u32 = 4;
    let server = TestServer::start_with(|c| {
        c.ws.connections_per_second_per_ip = 1;
        c.ws.connection_burst_per_ip = BURST;
    })
    .await;
    socketio_app(&server, "herd", json!({})).await;
    let mut sockets = Vec::new();
    for n in 0..BURST {
        match Sio::connect(&server, "herd", None).await {
            Connected::Yes(socket) => sockets.push(socket),
            Connected::Refused(why) => panic!("connection {n} was refused: {why}"),
        }
    }
    assert_eq!(sockets.len(), BURST as usize);
    server.stop().await;
}

/// `terminate_connections` (the Pusher HTTP API's ban) closes a user's Socket.IO sockets as
/// it closes their signed-in WebSockets: told why, then disconnected; other users stay.
#[tokio::test]
async fn terminate_connections_disconnects_the_users_sockets() {
    let server = TestServer::start().await;
    let (_, creds) = socketio_app(&server, "ban", chat_rules()).await;
    let banned = token(&creds, json!({"sub": "u1"}));
    let mut a = Sio::connect(&server, "ban", Some(json!({"token": banned})))
        .await
        .expect("u1");
    a.expect("herald:subscribed").await;
    let other = token(&creds, json!({"sub": "u2"}));
    let mut b = Sio::connect(&server, "ban", Some(json!({"token": other})))
        .await
        .expect("u2");
    b.expect("herald:subscribed").await;
    // A user named by a later join's token counts too.
    let mut c = Sio::connect(&server, "ban", None).await.expect("anonymous");
    c.expect("herald:subscribed").await;
    let late = token(&creds, json!({"sub": "u1", "rooms": ["private-x"]}));
    c.join(json!({"room": "private-x", "token": late})).await;

    let path = format!("/apps/{}/users/u1/terminate_connections", creds.id);
    let (status, body) =
        pusher::pusher_api(&server, &creds, "POST", &path, &[], Some(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    for socket in [&mut a, &mut c] {
        let told = socket.expect("herald:error").await;
        assert_eq!(told.args[0]["code"], "terminated", "{:?}", told.args);
        let disconnect = "41/ban";
        while !socket.read_text().await.starts_with(disconnect) {}
    }
    assert_eq!(
        b.emit_ack("typing", &[json!({"who": "b"})]).await,
        json!({"ok": true})
    );
    server.stop().await;
}

/// A join refused for want of its token does not spend the handshake's position: the join
/// with the token still replays what the socket missed.
#[tokio::test]
async fn a_refused_join_keeps_the_handshakes_position_for_the_join_that_succeeds() {
    let server = TestServer::start().await;
    let (_, creds) = socketio_app(&server, "keep-position", chat_rules()).await;
    let room = "private-history-notes";
    let grant = token(&creds, json!({"rooms": [room]}));
    let mut reader = Sio::connect(&server, "keep-position", None)
        .await
        .expect("reader");
    let joined = reader
        .join(json!({"room": room, "token": grant.clone()}))
        .await;
    let epoch = joined["history"]["epoch"].clone();
    trigger_empty(&server, &creds, "n1", room).await;
    let seen = reader.expect("n1").await.args[1].clone();
    assert_eq!(seen["offset"], 1, "{seen}");
    drop(reader);
    trigger_empty(&server, &creds, "n2", room).await;
    trigger_empty(&server, &creds, "n3", room).await;

    let positions = json!({room: {"epoch": epoch, "offset": 1}});
    let mut reader = Sio::connect(
        &server,
        "keep-position",
        Some(json!({"positions": positions})),
    )
    .await
    .expect("reader again");
    let refused = reader.emit_ack("join", &[json!(room)]).await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    let joined = reader.join(json!({"room": room, "token": grant})).await;
    assert_eq!(joined["history"]["recovered"], true, "{joined}");
    assert_eq!(joined["history"]["missed"], 2, "{joined}");
    reader.expect("n2").await;
    reader.expect("n3").await;
    server.stop().await;
}

/// A socket opened before the app's history rules changed relays by the rules as they are
/// now, as the API's publications to the same room do: its events are kept, with positions.
#[tokio::test]
async fn relayed_events_follow_history_rules_changed_while_their_socket_is_open() {
    let server = TestServer::start().await;
    let (app, _) = socketio_app(&server, "rules-change", chat_rules()).await;
    let mut writer = Sio::connect(&server, "rules-change", None)
        .await
        .expect("writer");
    writer.join(json!("chat-1")).await;
    let mut reader = Sio::connect(&server, "rules-change", None)
        .await
        .expect("reader");
    reader.join(json!("chat-1")).await;
    writer.emit_ack("note", &[json!(1)]).await;
    let meta = reader.expect("note").await.args[1].clone();
    assert!(meta.get("offset").is_none(), "not kept yet: {meta}");
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app}"),
            Some(json!({"history": [{"pattern": "chat-*", "maxEvents": 100, "maxAgeSecs": 3600}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    writer.emit_ack("note", &[json!(2)]).await;
    let meta = reader.expect("note").await.args[1].clone();
    assert_eq!(meta["offset"], 1, "kept, with its position: {meta}");
    server.stop().await;
}

#[tokio::test]
async fn the_polling_transport_answers_cors_for_any_origin() {
    let server = TestServer::start().await;
    let http = crate::harness::http_client();
    let preflight = http
        .request(
            Method::OPTIONS,
            format!("{}/socket.io/?EIO=4&transport=polling", server.base),
        )
        .header("origin", "http://page.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "http://page.example"
    );
    let open = http
        .get(format!(
            "{}/socket.io/?EIO=4&transport=polling",
            server.base
        ))
        .header("origin", "http://page.example")
        .send()
        .await
        .expect("handshake");
    assert_eq!(
        open.headers()["access-control-allow-origin"],
        "http://page.example"
    );
    // Other paths are the API's, untouched.
    let (status, _) = server.call(Method::GET, "/api/v1/app", None).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn socketio_settings_are_validated_and_shown_by_the_api() {
    let server = TestServer::start().await;
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(json!({"name": "x", "socketio": {"events": [{"event": "join", "relay": "everyone"}]}})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("events[0].event"), "{body}");
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/app",
            Some(
                json!({"name": "x", "socketio": {"events": [{"event": "a", "relay": "sideways"}]}}),
            ),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let (app_id, _) = socketio_app(&server, "shown", chat_rules()).await;
    let (_, app) = server
        .call(Method::GET, &format!("/api/v1/app/{app_id}"), None)
        .await;
    assert_eq!(app["socketio"]["events"][0]["relay"], "everyone");
    let (status, patched) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/app/{app_id}"),
            Some(json!({"socketio": {"allowedOrigins": ["*"]}})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["socketio"]["allowedOrigins"], json!(["*"]));
    assert_eq!(patched["socketio"]["events"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn socketio_clients_on_two_nodes_of_a_cluster_share_rooms_and_presence() {
    let Some(cluster) = crate::cluster::Cluster::start(
        "socketio_clients_on_two_nodes_of_a_cluster_share_rooms_and_presence",
        2,
    )
    .await
    else {
        return;
    };
    let (one, two) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, creds) = socketio_app(one, "nodes", chat_rules()).await;
    let grant = |user: &str| token(&creds, json!({"sub": user, "rooms": ["presence-room"]}));
    let mut a = Sio::connect(one, "nodes", Some(json!({"token": grant("a")})))
        .await
        .expect("a on node 1");
    // a's own join is recorded once its snapshot is sent: b, joining after, is announced.
    while a.expect("herald:subscribed").await.args[0]["room"] != "presence-room" {}
    let mut b = Sio::connect(two, "nodes", Some(json!({"token": grant("b")})))
        .await
        .expect("b on node 2");
    // b's snapshot on node 2 lists a, who joined on node 1 (presence is cluster-wide).
    let lobby = loop {
        let event = b.expect("herald:subscribed").await;
        if event.args[0]["room"] == "presence-room" {
            break event;
        }
    };
    assert!(
        lobby.args[0]["members"].get("a").is_some(),
        "{:?}",
        lobby.args
    );
    assert_eq!(
        a.expect("herald:member_added").await.args[0]["user_id"],
        "b"
    );
    // Each sees the other's messages, in order, across nodes; the namespace channel too.
    for i in 0..5 {
        a.emit_ack("note", &[json!(i)]).await;
    }
    for i in 0..5 {
        assert_eq!(b.expect("note").await.args[0], json!(i));
    }
    b.emit_ack("chat message", &[json!("hi from 2")]).await;
    assert_eq!(a.expect("chat message").await.args[0], json!("hi from 2"));
    drop((a, b));
    cluster.stop().await;
}

/// An app created on one node of a cluster has its namespaces held open on the others too
/// (they hear the configuration change), so a herd of first CONNECTs there all join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_created_on_one_node_is_held_open_on_every_node() {
    let Some(cluster) =
        crate::cluster::Cluster::start("an_app_created_on_one_node_is_held_open_on_every_node", 2)
            .await
    else {
        return;
    };
    let (one, two) = (&cluster.nodes[0], &cluster.nodes[1]);
    let held = |text: &str| crate::metrics::sample(text, "herald_socketio_namespaces");
    assert_eq!(held(&crate::metrics::scrape(two).await), 0.0);
    let (id, _) = socketio_app(one, "everywhere", json!({})).await;
    eventually("node 2 to hold the new app's uid and id open", || async {
        (held(&crate::metrics::scrape(two).await) == 2.0).then_some(())
    })
    .await;
    let apps = [("everywhere".to_owned(), id)];
    herd_joins(two, &apps, false).await;
    herd_joins(two, &apps, true).await;
    cluster.stop().await;
}

#[tokio::test]
async fn an_event_sent_right_after_the_connect_answer_is_handled() {
    // The socket's handler is in place before the server answers CONNECT: an event sent at
    // once is queued, never dropped for want of a handler (it once raced the connect task).
    let server = TestServer::start().await;
    socketio_app(&server, "eager", chat_rules()).await;
    for i in 0..30 {
        let mut sio = Sio::connect(&server, "eager", None).await.expect("connect");
        let ack = sio.emit_ack("join", &[json!(format!("room-{i}"))]).await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    server.stop().await;
}

/// Each app met by a herd of sockets (by uid, or by id with `by_id`), one app after the
/// other: the herd's Engine.IO sessions open first, then all its CONNECTs are sent at once,
/// and each socket must join a room. A socket left in a namespace that another first CONNECT
/// replaced would have its transport closed at its join (see `Face::open_app`).
async fn herd_joins(server: &TestServer, apps: &[(String, String)], by_id: bool) {
    const HERD: usize = 16;
    let mut joined = Vec::new();
    for (uid, id) in apps {
        let ns = if by_id { id } else { uid };
        let together = std::sync::Arc::new(tokio::sync::Barrier::new(HERD));
        let mut herd = tokio::task::JoinSet::new();
        for i in 0..HERD {
            let ws = open_ws(server, None).await;
            let (ns, together) = (ns.clone(), std::sync::Arc::clone(&together));
            herd.spawn(async move {
                together.wait().await;
                let mut sio = Sio::connect_on(ws, &ns, None).await.expect("herd connect");
                sio.join(json!(format!("room-{i}"))).await;
                sio
            });
        }
        while let Some(sio) = herd.join_next().await {
            joined.push(sio.expect("a herd socket failed to connect and join"));
        }
    }
    assert_eq!(joined.len(), apps.len() * HERD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_herds_on_new_apps_and_after_a_restart_all_join() {
    const HERDS: usize = 25;
    let dir = tempfile::tempdir().expect("dir");
    let data_dir = dir.path().to_owned();
    let unlimited = |c: &mut herald::Config| {
        c.data_dir = data_dir.clone();
        c.ws.max_connections_per_ip = 0;
        c.ws.connections_per_second_per_ip = 0;
        c.listener.max_connections_per_ip = 0;
    };
    let server = TestServer::start_with(unlimited).await;
    let mut apps = Vec::new();
    for n in 0..HERDS {
        let uid = format!("herd-{n}");
        let (id, _) = socketio_app(&server, &uid, json!({})).await;
        apps.push((uid, id));
    }
    // Apps created through this node's API: their namespaces open with them.
    herd_joins(&server, &apps, false).await;
    server.stop().await;

    // A restart: every client reconnects at once, to namespaces the node opens before it
    // listens.
    let server = TestServer::start_with(unlimited).await;
    herd_joins(&server, &apps, true).await;
    herd_joins(&server, &apps, false).await;

    // A deleted app's namespaces close (a socket still in one is disconnected from it); one
    // created again under the same uid opens anew.
    let (uid, old_id) = apps.swap_remove(0);
    let mut live = Sio::connect(&server, &uid, None).await.expect("live");
    live.join(json!("room-live")).await;
    let (status, _) = server
        .call(Method::DELETE, &format!("/api/v1/app/{uid}"), None)
        .await;
    assert_eq!(status, 204);
    let disconnect = format!("41/{uid}");
    while !live.read_text().await.starts_with(&disconnect) {}
    for key in [&uid, &old_id] {
        let refusal = Sio::connect(&server, key, None).await.refusal();
        assert!(refusal.contains("unknown app"), "{key}: {refusal}");
    }
    let (id, _) = socketio_app(&server, &uid, json!({})).await;
    herd_joins(&server, &[(uid, id)], false).await;
    server.stop().await;
}

#[tokio::test]
async fn a_stripe_payment_through_webhooks_in_reaches_a_socketio_room_once() {
    use crate::ingest::{now, post, source, stripe_header};
    let server = TestServer::start().await;
    let (app_id, creds) = socketio_app(&server, "shop", chat_rules()).await;
    let secret = "whsec_socketio_test";
    let stripe = source(
        &server,
        &app_id,
        json!({"kind": "stripe", "secrets": [secret],
               "channels": ["private-order-{data.object.metadata.order_id}"]}),
    )
    .await;
    let grant = token(&creds, json!({"rooms": ["private-order-42"]}));
    let mut page = Sio::connect(&server, "shop", Some(json!({"token": grant})))
        .await
        .expect("the order page");
    while page.expect("herald:subscribed").await.args[0]["room"] != "private-order-42" {}

    let body = br#"{"id":"evt_sio","type":"payment_intent.succeeded","data":{"object":{"metadata":{"order_id":"42"}}}}"#;
    for _ in 0..2 {
        // Stripe's retry: acknowledged, not published again.
        let (status, answer) = post(
            &server,
            &stripe,
            &[stripe_header(secret, body, now())],
            body,
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    let paid = page.expect("payment_intent.succeeded").await;
    assert_eq!(paid.args[0]["id"], "evt_sio");
    assert_eq!(paid.args[1], json!({"channel": "private-order-42"}));
    page.quiet("payment_intent.succeeded").await;
    server.stop().await;
}

#[tokio::test]
async fn clients_cannot_relay_reserved_names_switch_users_or_outrun_their_join_budget() {
    let server = TestServer::start_with(|c| {
        c.socketio.joins_per_second = 1;
        c.socketio.join_burst = 3;
    })
    .await;
    let (_, creds) = socketio_app(&server, "guarded", chat_rules_relaying_any_event()).await;
    let alice = token(
        &creds,
        json!({"sub": "alice", "rooms": ["private-a", "private-encrypted-e", "#server-to-user-alice"]}),
    );
    let mut sio = Sio::connect(&server, "guarded", Some(json!({"token": alice})))
        .await
        .expect("alice");
    // Even under `*`, names other clients trust are never relayed.
    for name in [
        "herald:member_added",
        "pusher_internal:member_added",
        "disconnect",
    ] {
        let refused = sio.emit_ack(name, &[json!({})]).await;
        assert_eq!(refused["error"]["code"], "refused", "{name}: {refused}");
    }
    // A token for another user does not change who the socket is.
    let bob = token(&creds, json!({"sub": "bob", "rooms": ["private-b"]}));
    let refused = sio
        .emit_ack("join", &[json!({"room": "private-b", "token": bob})])
        .await;
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    // `rooms` never relays into an end-to-end encrypted room, nor into a user's channel
    // (what arrives there is the server's own, as `pusher.user.bind` trusts).
    sio.emit_ack("leave", &[json!("private-a")]).await;
    let refused = sio.emit_ack("note", &[json!(1)]).await;
    assert_eq!(refused["error"]["code"], "no_room", "{refused}");
    // Joins and leaves have a budget: 3 at once here, two spent above, one more now.
    sio.join(json!("public-0")).await;
    let limited = sio.emit_ack("join", &[json!("public-1")]).await;
    assert_eq!(limited["error"]["code"], "rate_limited", "{limited}");
    server.stop().await;
}

#[tokio::test]
async fn a_grant_stops_authorizing_rooms_when_its_token_expires() {
    let server = TestServer::start().await;
    let (_, creds) = socketio_app(&server, "expiring", chat_rules()).await;
    // Five seconds: time for the first join below even on a busy machine.
    let expires = chrono::Utc::now().timestamp() + 5;
    let short = token(&creds, json!({"exp": expires, "rooms": ["private-short"]}));
    let mut sio = Sio::connect(&server, "expiring", Some(json!({"token": short})))
        .await
        .expect("connect");
    // The grant authorizes the room while the token lives (`join` asserts it was joined)...
    sio.join(json!("private-short")).await;
    // ...and rejoining is refused once it has expired, not before.
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let left = sio.emit_ack("leave", &[json!("private-short")]).await;
        assert_eq!(left["ok"], true, "{left}");
        let joined = sio.emit_ack("join", &[json!("private-short")]).await;
        if joined["ok"] == false {
            assert_eq!(joined["error"]["code"], "forbidden", "{joined}");
            assert!(
                chrono::Utc::now().timestamp() >= expires,
                "refused before the token expired: {joined}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the grant never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn refused_events_cost_their_sender_and_malformed_names_and_data_are_refused() {
    let server = TestServer::start_with(|c| {
        c.socketio.events_per_second = 1;
        c.socketio.event_burst = 4;
    })
    .await;
    socketio_app(&server, "strict", chat_rules_relaying_any_event()).await;
    let mut sio = Sio::connect(&server, "strict", None).await.expect("sio");
    // Too long, or with NUL in the name or the data: nothing a store could keep.
    let long = "n".repeat(herald_core::validate::MAX_CLIENT_EVENT_NAME + 1);
    let refused = sio.emit_ack(&long, &[json!(1)]).await;
    assert_eq!(refused["error"]["code"], "invalid_event", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 200 bytes")),
        "{refused}"
    );
    // (A name with NUL never gets this far: socketioxide closes the session on any escape in
    // an event's name.)
    let refused = sio.emit_ack("fine", &[json!({"text": "a\u{0}b"})]).await;
    assert_eq!(refused["error"]["code"], "invalid_event", "{refused}");
    // Refused by the rules: still charged, so the budget of 4 is spent after two more.
    for name in ["secret", "disconnect"] {
        let refused = sio.emit_ack(name, &[json!(1)]).await;
        assert_eq!(refused["error"]["code"], "refused", "{name}: {refused}");
    }
    let limited = sio.emit_ack("fine", &[json!(1)]).await;
    assert_eq!(limited["error"]["code"], "rate_limited", "{limited}");
    server.stop().await;
}

#[tokio::test]
async fn events_the_server_publishes_under_socketio_reserved_names_are_not_sent_to_sockets() {
    let server = TestServer::start().await;
    let (_, creds) = socketio_app(&server, "reserved", chat_rules()).await;
    let mut sio = Sio::connect(&server, "reserved", None).await.expect("sio");
    sio.expect("herald:subscribed").await;
    for name in ["disconnect", "connect_error", "herald:subscribed", "after"] {
        trigger_empty(&server, &creds, name, "socket.io").await;
    }
    // In order: only `after` arrives.
    loop {
        if let Some(event) = sio.events.pop_front() {
            assert_eq!(event.name, "after", "{:?}", event.args);
            break;
        }
        sio.read_packet().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn one_engine_io_session_in_an_app_by_uid_and_by_id_gets_each_event_on_both() {
    let server = TestServer::start().await;
    let (app_id, creds) = socketio_app(&server, "twice", chat_rules()).await;
    let mut ws = open_ws(&server, None).await;
    for ns in ["twice", app_id.as_str()] {
        ws.send(Message::text(format!("40/{ns},")))
            .await
            .expect("send CONNECT");
    }
    // Both CONNECTs answered, and both sockets in the namespace channel.
    let mut connected = 0;
    let mut subscribed = 0;
    while connected < 2 || subscribed < 2 {
        let text = next_text(&mut ws).await;
        if text == "2" {
            ws.send(Message::text("3")).await.expect("pong");
        } else if text.starts_with("40/") {
            connected += 1;
        } else if text.contains("herald:subscribed") {
            subscribed += 1;
        }
    }
    trigger_empty(&server, &creds, "hello", "socket.io").await;
    let mut heard = std::collections::BTreeSet::new();
    while heard.len() < 2 {
        let text = next_text(&mut ws).await;
        if text == "2" {
            ws.send(Message::text("3")).await.expect("pong");
            continue;
        }
        if text.contains("\"hello\"") {
            let ns = text
                .strip_prefix("42/")
                .and_then(|rest| rest.split_once(','))
                .map(|(ns, _)| ns.to_owned())
                .expect("an event packet");
            assert!(heard.insert(ns.clone()), "{ns} heard twice");
        }
    }
    assert_eq!(
        heard,
        ["twice".to_owned(), app_id].into_iter().collect(),
        "each namespace's socket gets the event"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_connect_that_recovers_several_rooms_gets_every_replay_though_they_outgrow_the_outbox() {
    // An outbox of 16 frames; three rooms of 6 missed events and their confirmations are 21.
    let server = TestServer::start_with(|c| c.socketio.outbox_frames = 16).await;
    let (_, creds) = socketio_app(&server, "replays", chat_rules()).await;
    let rooms = ["history-a", "history-b", "history-c"];
    let grant = || token(&creds, json!({"rooms": rooms}));
    let mut reader = Sio::connect(&server, "replays", Some(json!({"token": grant()})))
        .await
        .expect("reader");
    let mut positions = serde_json::Map::new();
    while positions.len() < rooms.len() {
        let subscribed = reader.expect("herald:subscribed").await.args[0].clone();
        if let Some(history) = subscribed.get("history") {
            let room = subscribed["room"].as_str().expect("room").to_owned();
            positions.insert(
                room,
                json!({"epoch": history["epoch"], "offset": history["offset"]}),
            );
        }
    }
    drop(reader);
    let mut writer = Sio::connect(&server, "replays", Some(json!({"token": grant()})))
        .await
        .expect("writer");
    for n in 0..6 {
        let ack = writer.emit_ack("note", &[json!(n)]).await;
        assert_eq!(ack["ok"], true, "{ack}");
    }
    let mut reader = Sio::connect(
        &server,
        "replays",
        Some(json!({"token": grant(), "positions": positions})),
    )
    .await
    .expect("reader again");
    let mut recovered = 0;
    let mut notes: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    while recovered < rooms.len() || notes.values().map(Vec::len).sum::<usize>() < 18 {
        reader.read_packet().await;
        while let Some(event) = reader.events.pop_front() {
            match event.name.as_str() {
                "herald:subscribed" if event.args[0].get("history").is_some() => {
                    assert_eq!(
                        event.args[0]["history"]["recovered"], true,
                        "{:?}",
                        event.args
                    );
                    recovered += 1;
                }
                "note" => notes
                    .entry(
                        event.args[1]["channel"]
                            .as_str()
                            .expect("channel")
                            .to_owned(),
                    )
                    .or_default()
                    .push(event.args[0].clone()),
                _ => {}
            }
        }
    }
    for room in rooms {
        assert_eq!(
            notes[room],
            (0..6).map(|n| json!(n)).collect::<Vec<_>>(),
            "{room}"
        );
    }
    server.stop().await;
}

/// An Engine.IO session on the polling transport (socket.io-client's default start): the
/// server's packets wait in the socket's send buffer until the client's next GET.
struct Polling {
    http: reqwest::Client,
    url: String,
}

impl Polling {
    async fn open(server: &TestServer) -> Self {
        let http = crate::harness::http_client();
        let base = format!("{}/socket.io/?EIO=4&transport=polling", server.base);
        let open = http.get(&base).send().await.expect("handshake");
        assert_eq!(open.status(), 200);
        let text = open.text().await.expect("handshake body");
        let handshake: Value =
            serde_json::from_str(text.strip_prefix('0').expect("an OPEN packet")).expect("JSON");
        let sid = handshake["sid"].as_str().expect("sid");
        Self {
            http,
            url: format!("{base}&sid={sid}"),
        }
    }

    /// Sends one packet; false if the session is gone.
    async fn post(&self, packet: &str) -> bool {
        let answer = self
            .http
            .post(&self.url)
            .body(packet.to_owned())
            .send()
            .await
            .expect("POST");
        answer.status() == 200
    }

    /// What the server has sent since the last GET (waiting for at least one packet),
    /// answering its pings (the next is `ping_interval` away); `None` once the session is
    /// gone.
    async fn get(&self) -> Option<Vec<String>> {
        let answer = tokio::time::timeout(PATIENCE, self.http.get(&self.url).send())
            .await
            .expect("a GET answered in time")
            .expect("GET");
        if answer.status() != 200 {
            return None;
        }
        let text = answer.text().await.expect("GET body");
        let mut packets = Vec::new();
        for packet in text.split('\u{1e}') {
            match packet {
                "2" => assert!(self.post("3").await, "pong"),
                _ => packets.push(packet.to_owned()),
            }
        }
        Some(packets)
    }
}

/// A socket whose send buffer is full when an event it sent is answered: the answer (its
/// ack) cannot be dropped while the socket goes on, since a client waiting for it would send
/// the event again. The socket is disconnected as too slow instead, as when a broadcast finds
/// the buffer full.
#[tokio::test]
async fn an_answer_that_finds_the_send_buffer_full_is_not_lost_while_the_socket_goes_on() {
    let server = TestServer::start_with(|c| c.socketio.outbox_frames = 4).await;
    let (_, creds) = socketio_app(&server, "full", chat_rules()).await;
    let client = Polling::open(&server).await;
    assert!(client.post("40/full,").await, "CONNECT");
    // The CONNECT answer and the namespace channel's confirmation: the buffer is empty after.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|p: &String| p.contains("herald:subscribed"))
    {
        seen.extend(client.get().await.expect("the session"));
    }
    assert!(seen[0].starts_with("40/full,"), "{seen:?}");
    // Four events fill the buffer (4 frames), with no GET to drain it; the socket's task
    // writes them before it handles the packet posted after.
    for n in 0..4 {
        trigger_empty(&server, &creds, &format!("fill{n}"), "socket.io").await;
    }
    assert!(client.post(r#"42/full,7["leave","nowhere"]"#).await);
    // What follows: the ack, or the socket disconnected; never a later ack without it.
    let (mut answered, mut disconnected, mut fills) = (false, false, 0);
    let mut next_asked = false;
    'reading: loop {
        let Some(packets) = client.get().await else {
            disconnected = true;
            break;
        };
        for packet in packets {
            if packet.starts_with(r#"42/full,["fill"#) {
                fills += 1;
            } else if packet.starts_with("43/full,7") {
                answered = true;
            } else if packet.starts_with("43/full,8") {
                assert!(answered, "ack 8 came, and ack 7 never did");
                break 'reading;
            } else if packet.starts_with("41/full") || packet == "1" {
                disconnected = true;
                break 'reading;
            }
        }
        if !next_asked {
            next_asked = true;
            if !client.post(r#"42/full,8["leave","nowhere"]"#).await {
                disconnected = true;
                break;
            }
        }
    }
    assert_eq!(fills, 4, "the events in the buffer are still sent");
    assert!(answered || disconnected);
    server.stop().await;
}
