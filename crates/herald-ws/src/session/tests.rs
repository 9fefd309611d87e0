//! Scripted transcripts: client messages in, server frames out, with a real hub and outbox
//! and a scripted [`Backend`] (known credentials, channels named `history-*` keep history).
//! No sockets; the clock is paused, so rate limits refill only when a test advances it.

use herald_core::AppId;
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use herald_channels::Publication;
use herald_core::{
    history::{Position, Recovery, Retention},
    model::PusherCredentials,
    pusher,
};
use herald_store::StoreError;
use serde_json::{Value, json, value::RawValue};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{Hub, WsConfig, hub::AppHub, protocol::client::parse};

const KEY: &str = "app-key";
const SECRET: &str = "app-secret";

/// Known credentials, or unreadable ones; `history-*` channels keep history, and a join
/// replays `replay` (while it "reads", the publications at `published_meanwhile` offsets are
/// broadcast, as a concurrent publisher's would be). Client events are published the way the
/// publisher does: kept on history channels (with the next offset), then relayed.
struct Scripted {
    credentials: Result<PusherCredentials, Unavailable>,
    replay: Vec<Arc<Publication>>,
    published_meanwhile: Vec<u64>,
    /// Client events kept in history: (channel, event, data).
    kept: Mutex<Vec<(String, String, String)>>,
    /// Client events fail to publish (the store refused them).
    refuse_publish: bool,
    /// How many reads of the store (credentials, history) fail before they succeed.
    failing_reads: AtomicU32,
    /// How many reads of history alone fail before they succeed.
    failing_history: AtomicU32,
    /// Set by [`Client::open`].
    hub: Mutex<Option<Arc<AppHub>>>,
}

/// A publication on `channel` at `offset`.
fn published(channel: &str, data: &str, offset: u64) -> Arc<Publication> {
    Arc::new(
        Publication::new(
            &AppId::parse("app_1").expect("valid"),
            channel,
            "e",
            herald_channels::EventData::text(data),
        )
        .with_position(Some(Position {
            epoch: "e1".into(),
            offset,
        })),
    )
}

impl Scripted {
    fn new() -> Self {
        Self {
            credentials: Ok(PusherCredentials {
                app_id: 1,
                key: KEY.into(),
                secret: SECRET.into(),
                previous: None,
            }),
            replay: Vec::new(),
            published_meanwhile: Vec::new(),
            kept: Mutex::default(),
            refuse_publish: false,
            failing_reads: AtomicU32::new(0),
            failing_history: AtomicU32::new(0),
            hub: Mutex::default(),
        }
    }
}

impl Scripted {
    /// Whether this read fails, as the store's would in an outage.
    fn read_fails(&self) -> bool {
        self.failing_reads
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl Backend for Scripted {
    async fn credentials(&self) -> Result<PusherCredentials, Unavailable> {
        if self.read_fails() {
            return Err(Unavailable {
                kind: "ServerError",
                message: "the app's credentials could not be read",
                status: 503,
                close: None,
            });
        }
        self.credentials.clone()
    }

    fn retention(&self, channel: &str) -> Option<Retention> {
        channel.contains("history-").then_some(Retention {
            max_events: 100,
            max_age: Duration::from_secs(3600),
        })
    }

    async fn history_between(
        &self,
        _channel: &str,
        _after: u64,
        _before: u64,
    ) -> Result<Vec<Arc<Publication>>, StoreError> {
        Ok(Vec::new())
    }

    async fn recover(
        &self,
        channel: &str,
        _retention: Retention,
        resume: Option<&Resume>,
        _max_replay: u64,
    ) -> Result<Joined, StoreError> {
        let history_fails = self
            .failing_history
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if self.read_fails() || history_fails {
            return Err(StoreError::Batch("the store is down".into()));
        }
        let hub = self.hub.lock().expect("lock").clone().expect("opened");
        for offset in &self.published_meanwhile {
            hub.broadcast(&published(channel, "meanwhile", *offset));
        }
        Ok(Joined {
            epoch: "e1".into(),
            offset: self.replay.len() as u64,
            recovery: resume.map(|r| Recovery::Complete {
                missed: self.replay.len() as u64 - r.offset,
            }),
            replay: self.replay.clone(),
            rate_limited: false,
            missed_beyond_room: None,
        })
    }

    async fn publish_client_event(
        &self,
        channel: &str,
        event: &str,
        data: &RawValue,
        user_id: Option<&str>,
        sender: &str,
    ) -> Result<(), PublishError> {
        if self.refuse_publish {
            return Err(PublishError::Store(StoreError::Conflict(
                "the store refused the write".into(),
            )));
        }
        let position = self.retention(channel).map(|_| {
            let mut kept = self.kept.lock().expect("lock");
            kept.push((channel.into(), event.into(), data.get().into()));
            Position {
                epoch: "e1".into(),
                offset: kept.len() as u64,
            }
        });
        let publication = Publication::new(
            &AppId::parse("app_1").expect("valid"),
            channel,
            event,
            herald_channels::EventData::Json(data.to_owned()),
        )
        .with_user(user_id.map(str::to_owned))
        .with_position(position)
        .except(Some(sender.to_owned()));
        let hub = self.hub.lock().expect("lock").clone().expect("opened");
        hub.broadcast(&Arc::new(publication));
        Ok(())
    }
}

/// One scripted connection.
struct Client {
    session: Session<Scripted>,
    frames: crate::hub::Frames,
    overflowed: CancellationToken,
    socket_id: String,
}

impl Client {
    fn open(hub: &Arc<AppHub>, socket_id: &str, config: &WsConfig, backend: Scripted) -> Self {
        let (outbox, frames, overflowed) = Outbox::new(256);
        *backend.hub.lock().expect("lock") = Some(Arc::clone(hub));
        let session = Session::new(
            backend,
            Arc::clone(hub),
            Arc::new(config.clone()),
            socket_id.into(),
            outbox,
            hub.connection_token(),
        );
        Self {
            session,
            frames,
            overflowed,
            socket_id: socket_id.into(),
        }
    }

    async fn send(&mut self, text: &str) -> Option<Close> {
        self.session.handle(parse(text)).await
    }

    /// Moves the clock to the first deferred subscribe and runs what is due then, as the
    /// connection's loop does; false if nothing waits.
    async fn run_next_deferred(&mut self) -> bool {
        let Some(due) = self.session.next_deferred() else {
            return false;
        };
        tokio::time::advance(due.saturating_duration_since(tokio::time::Instant::now())).await;
        self.session.run_deferred().await;
        true
    }

    /// The frames queued since the last call, as JSON with double-encoded `data` decoded.
    fn received(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(frame) = self.frames.try_recv() {
            let mut value: Value =
                serde_json::from_str(frame.pusher_frame().as_str()).expect("frames are JSON");
            if let Some(inner) = value["data"]
                .as_str()
                .and_then(|d| serde_json::from_str::<Value>(d).ok())
            {
                value["data"] = inner;
            }
            out.push(value);
        }
        assert!(!self.overflowed.is_cancelled(), "the outbox overflowed");
        out
    }

    /// The events of the frames queued since the last call.
    fn events(&mut self) -> Vec<String> {
        self.received()
            .iter()
            .map(|f| f["event"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The one frame queued since the last call.
    fn only(&mut self) -> Value {
        let mut frames = self.received();
        assert_eq!(frames.len(), 1, "expected one frame, got {frames:?}");
        frames.remove(0)
    }

    fn subscribe_auth(&self, channel: &str, channel_data: Option<&str>) -> String {
        let signed = match channel_data {
            Some(data) => format!("{}:{channel}:{data}", self.socket_id),
            None => format!("{}:{channel}", self.socket_id),
        };
        format!("{KEY}:{}", pusher::sign(SECRET, &signed))
    }
}

fn subscribe(channel: &str) -> String {
    json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string()
}

fn subscribe_signed(client: &Client, channel: &str, channel_data: Option<&str>) -> String {
    let mut data =
        json!({"channel": channel, "auth": client.subscribe_auth(channel, channel_data)});
    if let Some(channel_data) = channel_data {
        data["channel_data"] = channel_data.into();
    }
    json!({"event": "pusher:subscribe", "data": data}).to_string()
}

fn client_event(channel: &str, data: &str) -> String {
    format!(r#"{{"event":"client-typing","channel":"{channel}","data":{data}}}"#)
}

fn setup(config: &WsConfig) -> (Arc<AppHub>, Client) {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let mut client = Client::open(&hub, "1.1", config, Scripted::new());
    assert_eq!(client.events(), ["pusher:connection_established"]);
    (hub, client)
}

fn assert_subscription_error(frame: &Value, channel: &str, kind: &str, status: u16) {
    assert_eq!(frame["event"], "pusher:subscription_error", "{frame}");
    assert_eq!(frame["channel"], channel, "{frame}");
    assert_eq!(frame["data"]["type"], kind, "{frame}");
    assert_eq!(frame["data"]["status"], status, "{frame}");
}

#[tokio::test(start_paused = true)]
async fn a_session_opens_with_its_socket_id_and_answers_ping_with_pong() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let config = WsConfig::default();
    let mut client = Client::open(&hub, "1.1", &config, Scripted::new());
    let established = client.only();
    assert_eq!(established["event"], "pusher:connection_established");
    assert_eq!(established["data"]["socket_id"], "1.1");
    assert_eq!(established["data"]["activity_timeout"], 120);
    assert_eq!(
        client.send(r#"{"event":"pusher:ping","data":{}}"#).await,
        None
    );
    assert_eq!(client.events(), ["pusher:pong"]);
    assert_eq!(
        client.send(r#"{"event":"pusher:pong","data":{}}"#).await,
        None
    );
    assert!(client.received().is_empty());
}

#[tokio::test(start_paused = true)]
async fn malformed_and_unknown_messages_get_pusher_error_and_the_connection_stays() {
    let (_hub, mut client) = setup(&WsConfig::default());
    assert_eq!(client.send("{not json").await, None);
    let error = client.only();
    assert_eq!(error["event"], "pusher:error");
    assert!(
        error["data"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid JSON"))
    );
    assert_eq!(client.send(r#"{"event":"pusher:subscribe"}"#).await, None);
    assert_eq!(
        client.only()["data"]["message"],
        "invalid pusher:subscribe: missing data"
    );
    assert_eq!(client.send(r#"{"event":"pusher:what"}"#).await, None);
    assert_eq!(
        client.only()["data"]["message"],
        r#"unknown event "pusher:what""#
    );
    assert_eq!(client.send(&subscribe("still-here")).await, None);
    assert_eq!(client.events(), ["pusher_internal:subscription_succeeded"]);
}

#[tokio::test(start_paused = true)]
async fn a_public_subscribe_is_confirmed_and_a_repeat_is_confirmed_again() {
    let (hub, mut client) = setup(&WsConfig::default());
    client.send(&subscribe("news")).await;
    let confirmed = client.only();
    assert_eq!(confirmed["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(confirmed["channel"], "news");
    assert!(hub.is_subscribed("news", "1.1"));
    client.send(&subscribe("news")).await;
    assert_eq!(client.events(), ["pusher_internal:subscription_succeeded"]);
    assert_eq!(
        hub.channel_info("news").map(|i| i.subscription_count),
        Some(1)
    );
    client
        .send(r#"{"event":"pusher:unsubscribe","data":{"channel":"news"}}"#)
        .await;
    assert!(client.received().is_empty(), "unsubscribing is silent");
    assert!(!hub.is_subscribed("news", "1.1"));
}

#[tokio::test(start_paused = true)]
async fn bad_channel_names_are_refused_with_invalid_channel_400() {
    let (hub, mut client) = setup(&WsConfig::default());
    for channel in ["", "has space", "new\nline", &"x".repeat(300)] {
        client.send(&subscribe(channel)).await;
        assert_subscription_error(&client.only(), channel, "InvalidChannel", 400);
    }
    assert!(hub.channels("").is_empty());
}

#[tokio::test(start_paused = true)]
async fn private_and_presence_channels_need_auth_and_presence_needs_channel_data() {
    let (hub, mut client) = setup(&WsConfig::default());
    client.send(&subscribe("private-a")).await;
    assert_subscription_error(&client.only(), "private-a", "AuthError", 401);
    let auth = client.subscribe_auth("presence-a", None);
    client
        .send(
            &json!({"event": "pusher:subscribe", "data": {"channel": "presence-a", "auth": auth}})
                .to_string(),
        )
        .await;
    let refused = client.only();
    assert_subscription_error(&refused, "presence-a", "AuthError", 401);
    assert_eq!(
        refused["data"]["error"],
        "presence channels need channel_data"
    );
    assert!(hub.channels("").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_bad_signature_is_refused_and_the_right_one_accepted() {
    let (hub, mut client) = setup(&WsConfig::default());
    let wrong = format!("{KEY}:{}", pusher::sign("other-secret", "1.1:private-a"));
    client
        .send(
            &json!({"event": "pusher:subscribe", "data": {"channel": "private-a", "auth": wrong}})
                .to_string(),
        )
        .await;
    let refused = client.only();
    assert_subscription_error(&refused, "private-a", "AuthError", 401);
    assert!(
        refused["data"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("auth refused"))
    );
    // Signed for another socket.
    let other_socket = format!("{KEY}:{}", pusher::sign(SECRET, "2.2:private-a"));
    client
        .send(
            &json!({"event": "pusher:subscribe", "data": {"channel": "private-a", "auth": other_socket}})
                .to_string(),
        )
        .await;
    assert_subscription_error(&client.only(), "private-a", "AuthError", 401);
    assert!(!hub.is_subscribed("private-a", "1.1"));
    let good = subscribe_signed(&client, "private-a", None);
    client.send(&good).await;
    assert_eq!(client.events(), ["pusher_internal:subscription_succeeded"]);
    assert!(hub.is_subscribed("private-a", "1.1"));
}

#[tokio::test(start_paused = true)]
async fn a_deleted_apps_credentials_refuse_and_the_connection_stays() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let backend = Scripted {
        credentials: Err(Unavailable {
            kind: "AuthError",
            message: APP_DELETED,
            status: 401,
            close: Some(close::APP_DOES_NOT_EXIST),
        }),
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "1.1", &WsConfig::default(), backend);
    client.received();
    let subscribe = subscribe_signed(&client, "private-a", None);
    assert_eq!(client.send(&subscribe).await, None);
    assert_subscription_error(&client.only(), "private-a", "AuthError", 401);
    assert_eq!(client.session.next_deferred(), None, "not tried again");
    let signin = json!({"event": "pusher:signin", "data": {"auth": "k:s", "user_data": "{}"}});
    assert_eq!(client.send(&signin.to_string()).await, None);
    let error = client.only();
    assert_eq!(error["event"], "pusher:error");
    assert_eq!(error["data"]["code"], close::APP_DOES_NOT_EXIST);
    assert_eq!(
        error["data"]["message"],
        "sign-in refused: the app was deleted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_subscribe_the_store_could_not_serve_is_told_once_and_tried_until_it_succeeds() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let backend = Scripted {
        failing_reads: AtomicU32::new(3),
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "1.1", &WsConfig::default(), backend);
    client.received();
    let signed = subscribe_signed(&client, "private-a", None);
    let started = tokio::time::Instant::now();
    assert_eq!(client.send(&signed).await, None);
    let refused = client.only();
    assert_subscription_error(&refused, "private-a", "ServerError", 503);
    assert_eq!(
        refused["data"]["error"],
        "the app's credentials could not be read; the subscribe is tried again until it succeeds"
    );
    // Two more failures, answered by nothing (pusher-js still waits), each wait longer.
    let mut waits = Vec::new();
    for _ in 0..2 {
        let before = tokio::time::Instant::now();
        assert!(client.run_next_deferred().await);
        waits.push(before.elapsed());
        assert!(client.received().is_empty());
        assert!(!hub.is_subscribed("private-a", "1.1"));
    }
    assert!(client.run_next_deferred().await);
    assert_eq!(client.events(), ["pusher_internal:subscription_succeeded"]);
    assert!(hub.is_subscribed("private-a", "1.1"));
    assert_eq!(client.session.next_deferred(), None);
    // With jitter, each wait is half to all of 1 s, 2 s, 4 s.
    assert!(
        waits[0] >= Duration::from_millis(500) && waits[0] <= Duration::from_secs(1),
        "{waits:?}"
    );
    assert!(
        waits[1] >= Duration::from_secs(1) && waits[1] <= Duration::from_secs(2),
        "{waits:?}"
    );
    assert!(
        started.elapsed() <= Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );

    // A history channel whose history could not be read: subscribed to nothing meanwhile.
    let backend = Scripted {
        failing_reads: AtomicU32::new(1),
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "2.2", &WsConfig::default(), backend);
    client.received();
    client.send(&subscribe("history-a")).await;
    assert_subscription_error(&client.only(), "history-a", "HistoryUnavailable", 503);
    assert!(!hub.is_subscribed("history-a", "2.2"));
    assert!(client.run_next_deferred().await);
    let confirmed = client.only();
    assert_eq!(confirmed["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(confirmed["channel"], "history-a");
    assert!(hub.is_subscribed("history-a", "2.2"));
}

/// A presence member whose history channel could not be read is seen to come and go once,
/// not at every retry: a retry reads the history before it joins.
#[tokio::test(start_paused = true)]
async fn a_retried_presence_join_is_announced_to_the_others_once() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let channel = "presence-history-a";
    let mut other = Client::open(&hub, "2.2", &WsConfig::default(), Scripted::new());
    other.received();
    let data = r#"{"user_id":"u2"}"#;
    other
        .send(&subscribe_signed(&other, channel, Some(data)))
        .await;
    assert_eq!(other.events(), ["pusher_internal:subscription_succeeded"]);
    let backend = Scripted {
        failing_history: AtomicU32::new(3),
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "1.1", &WsConfig::default(), backend);
    client.received();
    let data = r#"{"user_id":"u1"}"#;
    client
        .send(&subscribe_signed(&client, channel, Some(data)))
        .await;
    assert_subscription_error(&client.only(), channel, "HistoryUnavailable", 503);
    while client.run_next_deferred().await {}
    assert_eq!(client.events(), ["pusher_internal:subscription_succeeded"]);
    assert_eq!(
        other.events(),
        [
            "pusher_internal:member_added",
            "pusher_internal:member_removed",
            "pusher_internal:member_added"
        ],
        "the first join, undone, then the one that held; none for the two retries between"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deferred_subscribe_is_dropped_by_an_unsubscribe_and_answered_once_if_sent_again() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let backend = Scripted {
        failing_reads: AtomicU32::new(2),
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "1.1", &WsConfig::default(), backend);
    client.received();
    client.send(&subscribe("history-a")).await;
    client.send(&subscribe("history-b")).await;
    assert_eq!(client.received().len(), 2, "each told once");
    client
        .send(r#"{"event":"pusher:unsubscribe","data":{"channel":"history-a"}}"#)
        .await;
    client.send(&subscribe("history-b")).await;
    assert!(client.received().is_empty());
    while client.run_next_deferred().await {}
    let frames = client.received();
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["channel"], "history-b");
    assert!(!hub.is_subscribed("history-a", "1.1"));
    assert!(hub.is_subscribed("history-b", "1.1"));
}

#[tokio::test(start_paused = true)]
async fn oversize_presence_user_info_is_refused_with_invalid_channel_data_400() {
    let config = WsConfig {
        max_user_info_bytes: 16,
        ..WsConfig::default()
    };
    let (hub, mut client) = setup(&config);
    let data = r#"{"user_id":"u1","user_info":{"name":"a name longer than sixteen bytes"}}"#;
    client
        .send(&subscribe_signed(&client, "presence-room", Some(data)))
        .await;
    let refused = client.only();
    assert_subscription_error(&refused, "presence-room", "InvalidChannelData", 400);
    assert_eq!(
        refused["data"]["error"],
        "channel_data.user_info is larger than 16 bytes"
    );
    assert!(hub.users("presence-room").is_empty());
}

#[tokio::test(start_paused = true)]
async fn presence_members_are_announced_to_the_others_and_their_leaving_too() {
    let config = WsConfig::default();
    let (hub, mut first) = setup(&config);
    let mut second = Client::open(&hub, "2.2", &config, Scripted::new());
    second.received();
    let one = r#"{"user_id":"u1","user_info":{"n":1}}"#;
    let two = r#"{"user_id":"u2"}"#;
    first
        .send(&subscribe_signed(&first, "presence-room", Some(one)))
        .await;
    let confirmed = first.only();
    assert_eq!(confirmed["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(confirmed["data"]["presence"]["count"], 1);
    second
        .send(&subscribe_signed(&second, "presence-room", Some(two)))
        .await;
    let confirmed = second.only();
    assert_eq!(confirmed["data"]["presence"]["count"], 2);
    assert_eq!(confirmed["data"]["presence"]["hash"]["u1"], json!({"n": 1}));
    let added = first.only();
    assert_eq!(added["event"], "pusher_internal:member_added");
    assert_eq!(added["data"], json!({"user_id": "u2", "user_info": null}));
    second.session.leave_all();
    let removed = first.only();
    assert_eq!(removed["event"], "pusher_internal:member_removed");
    assert_eq!(removed["data"], json!({"user_id": "u2"}));
    assert!(second.received().is_empty());
    assert_eq!(hub.users("presence-room"), ["u1"]);
}

#[tokio::test(start_paused = true)]
async fn too_many_channels_is_limit_reached_400() {
    let config = WsConfig {
        max_channels_per_connection: 2,
        ..WsConfig::default()
    };
    let (_hub, mut client) = setup(&config);
    client.send(&subscribe("a")).await;
    client.send(&subscribe("b")).await;
    client.send(&subscribe("c")).await;
    let frames = client.received();
    assert_eq!(frames.len(), 3);
    assert_subscription_error(&frames[2], "c", "LimitReached", 400);
    // A channel it already has is confirmed again.
    client.send(&subscribe("a")).await;
    assert_eq!(client.events(), ["pusher_internal:subscription_succeeded"]);
}

#[tokio::test(start_paused = true)]
async fn subscribes_beyond_the_burst_wait_their_turn_in_order_and_a_flood_gets_429() {
    let config = WsConfig {
        subscribes_per_second: 2,
        subscribe_burst: 3,
        max_channels_per_connection: 6,
        ..WsConfig::default()
    };
    let (hub, mut client) = setup(&config);
    for channel in ["a", "b", "c", "d"] {
        client.send(&subscribe(channel)).await;
    }
    assert_eq!(client.received().len(), 3, "d waits");
    // Invalid subscribes count too, and queue behind.
    client.send(&subscribe("has space")).await;
    // Subscribed and waiting, the connection is at its 6 channels: a flood is refused.
    client.send(&subscribe("e")).await;
    assert!(client.received().is_empty());
    client.send(&subscribe("f")).await;
    assert_subscription_error(&client.only(), "f", "RateLimited", 429);

    let started = tokio::time::Instant::now();
    assert!(client.run_next_deferred().await);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "a token every 500 ms"
    );
    let confirmed = client.only();
    assert_eq!(confirmed["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(confirmed["channel"], "d");
    assert!(hub.is_subscribed("d", "1.1"));
    assert!(client.run_next_deferred().await);
    assert_subscription_error(&client.only(), "has space", "InvalidChannel", 400);
    assert!(client.run_next_deferred().await);
    assert_eq!(client.only()["channel"], "e");
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    assert!(!client.run_next_deferred().await);
}

#[tokio::test(start_paused = true)]
async fn client_events_are_refused_without_a_channel_a_subscription_or_a_private_channel() {
    let (hub, mut client) = setup(&WsConfig::default());
    let mut other = Client::open(&hub, "2.2", &WsConfig::default(), Scripted::new());
    other.send(&subscribe("news")).await;
    other.received();
    assert_eq!(
        client.send(r#"{"event":"client-typing","data":{}}"#).await,
        None
    );
    assert_eq!(
        client.only()["data"]["message"],
        "client events need a channel"
    );
    client.send(&client_event("news", "{}")).await;
    assert_eq!(
        client.only()["data"]["message"],
        "client event refused: not subscribed to news"
    );
    client.send(&subscribe("news")).await;
    client.received();
    client.send(&client_event("news", "{}")).await;
    assert_eq!(
        client.only()["data"]["message"],
        "client event refused: news is not a private or presence channel"
    );
    assert!(other.received().is_empty(), "nothing was relayed");
}

#[tokio::test(start_paused = true)]
async fn client_events_reach_the_others_verbatim_and_never_their_sender() {
    let config = WsConfig::default();
    let (hub, mut first) = setup(&config);
    let mut second = Client::open(&hub, "2.2", &config, Scripted::new());
    second.received();
    first
        .send(&subscribe_signed(&first, "private-chat", None))
        .await;
    second
        .send(&subscribe_signed(&second, "private-chat", None))
        .await;
    first.received();
    second.received();
    assert_eq!(
        first
            .send(&client_event("private-chat", r#"{ "t" : 1 }"#))
            .await,
        None
    );
    assert!(first.received().is_empty(), "not echoed");
    let frame = second.frames.try_recv().expect("relayed");
    assert_eq!(
        frame.pusher_frame().as_str(),
        r#"{"event":"client-typing","channel":"private-chat","data":{ "t" : 1 }}"#
    );
}

#[tokio::test(start_paused = true)]
async fn client_events_on_a_history_channel_are_kept_then_relayed_with_their_position() {
    let (hub, mut client) = setup(&WsConfig::default());
    let mut other = Client::open(&hub, "2.2", &WsConfig::default(), Scripted::new());
    for c in [&mut client, &mut other] {
        c.send(&subscribe_signed(c, "private-history-chat", None))
            .await;
        c.received();
    }
    client
        .send(&client_event("private-history-chat", r#""hi""#))
        .await;
    let kept = client.session.backend.kept.lock().expect("lock").clone();
    assert_eq!(
        kept,
        [(
            "private-history-chat".to_owned(),
            "client-typing".to_owned(),
            r#""hi""#.to_owned()
        )]
    );
    assert!(client.received().is_empty(), "not echoed");
    let relayed = other.only();
    assert_eq!(
        (relayed["data"].clone(), relayed["offset"].clone()),
        (json!("hi"), json!(1))
    );
}

/// Records the channel events a hub reports.
#[derive(Default)]
struct Reported(Mutex<Vec<herald_channels::hub::ChannelEvent>>);

impl herald_channels::hub::ChannelObserver for Reported {
    fn observe(&self, _app_id: &AppId, event: herald_channels::hub::ChannelEvent) {
        self.0.lock().expect("lock").push(event);
    }
}

/// A client event is reported for `client_event` webhooks only once it is published: one the
/// store refused reaches no subscriber and no webhook, so the client's retry is reported once.
#[tokio::test(start_paused = true)]
async fn a_client_event_that_could_not_be_published_is_not_reported() {
    let reported = Arc::new(Reported::default());
    let hub = Hub::new(
        Arc::clone(&reported) as Arc<dyn herald_channels::hub::ChannelObserver>,
        Arc::default(),
    )
    .app(&AppId::parse("app_1").expect("valid"));
    let config = WsConfig::default();
    let refusing = Scripted {
        refuse_publish: true,
        ..Scripted::new()
    };
    let mut failing = Client::open(&hub, "1.1", &config, refusing);
    let mut working = Client::open(&hub, "2.2", &config, Scripted::new());
    for c in [&mut failing, &mut working] {
        c.send(&subscribe_signed(c, "private-history-chat", None))
            .await;
        c.received();
    }
    let client_events = || {
        reported
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| matches!(e, herald_channels::hub::ChannelEvent::ClientEvent { .. }))
            .count()
    };
    failing
        .send(&client_event("private-history-chat", r#""lost?""#))
        .await;
    let told = failing.only();
    assert_eq!(told["event"], "pusher:error", "{told}");
    assert!(
        told["data"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("could not be published; try again")),
        "{told}"
    );
    assert_eq!(client_events(), 0, "not reported");
    assert!(working.received().is_empty(), "not relayed");

    working
        .send(&client_event("private-history-chat", r#""kept""#))
        .await;
    assert_eq!(client_events(), 1, "a published one is reported");
}

#[tokio::test(start_paused = true)]
async fn client_events_beyond_the_rate_are_dropped_with_error_4301() {
    let config = WsConfig {
        client_events_per_second: 2,
        ..WsConfig::default()
    };
    let (_hub, mut client) = setup(&config);
    // Refused events (pusher-js sends whispers before the subscription is confirmed) spend
    // none of the allowance.
    for _ in 0..3 {
        client.send(&client_event("private-a", "early")).await;
        client.send(&client_event("public-a", "not private")).await;
    }
    let refused = client.received();
    assert_eq!(refused.len(), 6, "{refused:?}");
    assert!(
        refused.iter().all(|f| f["data"]["code"].is_null()),
        "none for the rate: {refused:?}"
    );
    client
        .send(&subscribe_signed(&client, "private-a", None))
        .await;
    client.received();
    assert_eq!(client.send(&client_event("private-a", "1")).await, None);
    assert_eq!(client.send(&client_event("private-a", "2")).await, None);
    let refused = client.send(&client_event("private-a", "3")).await;
    assert_eq!(refused, None, "the connection stays");
    let told = client.received();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0]["event"], "pusher:error");
    assert_eq!(told[0]["data"]["code"], close::CLIENT_EVENT_RATE_LIMIT);
    assert_eq!(
        told[0]["data"]["message"],
        "client event rejected: more than 2 per second"
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    assert_eq!(client.send(&client_event("private-a", "4")).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_history_join_confirms_with_its_status_then_replays_in_order() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let backend = Scripted {
        replay: vec![
            published("history-x", "1", 1),
            published("history-x", "2", 2),
        ],
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "1.1", &WsConfig::default(), backend);
    client.received();
    client
        .send(r#"{"event":"pusher:subscribe","data":{"channel":"history-x","epoch":"e1","offset":0}}"#)
        .await;
    let frames = client.received();
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(frames[0]["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(
        frames[0]["data"]["history"],
        json!({"epoch": "e1", "offset": 2, "recovered": true, "missed": 2})
    );
    assert_eq!(frames[1]["offset"], 1);
    assert_eq!(frames[2]["offset"], 2);
    assert!(hub.is_subscribed("history-x", "1.1"));
}

#[tokio::test(start_paused = true)]
async fn what_is_published_while_a_join_reads_follows_the_replay_once() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    // The replay was read up to offset 2; offset 2 was also broadcast while the join read
    // (committed just before the read), and 3 and 4 after.
    let backend = Scripted {
        replay: vec![
            published("history-x", "1", 1),
            published("history-x", "2", 2),
        ],
        published_meanwhile: vec![2, 3, 4],
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "1.1", &WsConfig::default(), backend);
    client.received();
    client
        .send(r#"{"event":"pusher:subscribe","data":{"channel":"history-x","epoch":"e1","offset":0}}"#)
        .await;
    let frames = client.received();
    let offsets: Vec<&Value> = frames.iter().skip(1).map(|f| &f["offset"]).collect();
    assert_eq!(frames[0]["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(offsets, [1, 2, 3, 4], "in order, none twice, none missing");
    hub.broadcast(&published("history-x", "5", 5));
    assert_eq!(client.only()["offset"], 5, "then live");
}

#[tokio::test(start_paused = true)]
async fn sign_in_needs_a_valid_signature_and_keeps_one_user() {
    let (hub, mut client) = setup(&WsConfig::default());
    let signin = |user_data: &str, secret: &str| {
        let auth = format!(
            "{KEY}:{}",
            pusher::sign(secret, &format!("1.1::user::{user_data}"))
        );
        json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})
            .to_string()
    };
    client.send(&signin(r#"{"id":"u1"}"#, "wrong")).await;
    let refused = client.only();
    assert_eq!(refused["event"], "pusher:error");
    assert_eq!(refused["data"]["code"], close::UNAUTHORIZED);
    client.send(&signin(r#"{"id":"u1"}"#, SECRET)).await;
    let success = client.only();
    assert_eq!(success["event"], "pusher:signin_success");
    assert_eq!(success["data"]["user_data"], r#"{"id":"u1"}"#);
    client.send(&signin(r#"{"id":"u2"}"#, SECRET)).await;
    assert_eq!(
        client.only()["data"]["message"],
        "sign-in refused: the connection is signed in as another user"
    );
    client.send(&signin(r#"{"name":"no id"}"#, SECRET)).await;
    assert_eq!(client.only()["data"]["code"], close::UNAUTHORIZED);
    assert_eq!(hub.terminate_user("u1"), 1);
}

/// pusher-js sends `pusher:signin` once per connection: one the store could not serve is
/// told once and tried again until it succeeds, or the connection would stay signed out.
#[tokio::test(start_paused = true)]
async fn a_sign_in_the_store_could_not_serve_is_told_once_and_tried_until_it_succeeds() {
    let hub = Hub::default().app(&AppId::parse("app_1").expect("valid"));
    let backend = Scripted {
        failing_reads: AtomicU32::new(2),
        ..Scripted::new()
    };
    let mut client = Client::open(&hub, "1.1", &WsConfig::default(), backend);
    client.received();
    let user_data = r#"{"id":"u1"}"#;
    let auth = format!(
        "{KEY}:{}",
        pusher::sign(SECRET, &format!("1.1::user::{user_data}"))
    );
    let signin = json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}});
    assert_eq!(client.send(&signin.to_string()).await, None);
    let told = client.only();
    assert_eq!(told["event"], "pusher:error");
    assert_eq!(
        told["data"]["message"],
        "sign-in delayed: the app's credentials could not be read; it is tried again until it succeeds"
    );
    assert!(client.run_next_deferred().await, "tried again");
    assert!(client.received().is_empty(), "told once");
    assert_eq!(hub.terminate_user("u1"), 0);
    assert!(client.run_next_deferred().await, "and again");
    assert_eq!(client.events(), ["pusher:signin_success"]);
    assert_eq!(client.session.next_deferred(), None);
    assert_eq!(hub.terminate_user("u1"), 1, "signed in");
}

#[tokio::test(start_paused = true)]
async fn leaving_all_unsubscribes_every_channel_and_signs_out() {
    let (hub, mut client) = setup(&WsConfig::default());
    client.send(&subscribe("a")).await;
    client
        .send(&subscribe_signed(&client, "private-b", None))
        .await;
    client.received();
    client.session.leave_all();
    assert!(!hub.is_subscribed("a", "1.1"));
    assert!(!hub.is_subscribed("private-b", "1.1"));
    assert!(hub.channels("").is_empty());
}
