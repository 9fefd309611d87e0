//! The bus over NATS core subjects: every node publishes to one subject (the topic) and holds
//! one subscription to it, on one client connection.
//!
//! Core NATS, no JetStream: a NATS server delivers one connection's messages to every
//! subscriber in the order they were published, which is all the broker needs; durability is
//! PostgreSQL's, so nothing here is stored by NATS.
//!
//! async-nats keeps the link: when it is lost the client reconnects by itself (without limit,
//! waiting [`RECONNECT_FIRST`] doubling to [`RECONNECT_LAST`] between attempts) and
//! re-subscribes before delivering again; the client pings the server every [`PING_EVERY`], so
//! a silently dead link is noticed within a few pings. While the link is down, [`Bus::send`]
//! refuses at once (rather than letting the client queue publications for an unknown time) and
//! [`Bus::is_connected`] is false. Messages sent while a node is disconnected are not heard by
//! it (core NATS keeps nothing for absent subscribers): once the node is subscribed again it
//! calls [`Hearing::resumed`], and the broker catches its history channels up from the store.
//! "Subscribed again" is proven, not assumed: the node publishes a probe (an empty message with
//! a [`PROBE_HEADER`] header, which every node skips) and waits to hear it back, so the
//! server has the subscription by the time the broker reads the store. The first subscription
//! is proven the same way before [`NatsBus::connect`] returns, so a node hears the others
//! before it serves.
//!
//! A NATS cluster is configuration: `broker.url` may list several servers, comma-separated
//! (`nats://a:4222,nats://b:4222`); the client connects to one of them, learns the rest of the
//! cluster from it, and moves to another when its server goes away (a cluster routes core
//! messages between its servers). Credentials in the URL (`nats://user:password@host:4222`)
//! are used and never logged.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::{
    Client, ConnectErrorKind, ConnectOptions, Event, HeaderMap, Message, Subject, Subscriber,
    connection::State,
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Hearing, redacted};

const ENGINE: &str = "NATS";

/// The limit on one message when the server did not say (NATS's default `max_payload`).
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// How long connecting to one server (TCP, TLS, handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Bus::send`] may take to hand its messages to the socket.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a node waits to hear its own probe before it counts as subscribed anyway (after a
/// reconnection) or gives up (when connecting).
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);

/// The client pings the server this often; a link with more than two pings unanswered is
/// dropped and reconnected.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Waits between attempts to reconnect: doubling from the first to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_LAST: Duration = Duration::from_secs(5);

/// The header that marks a probe (its value: the probing bus and its count); its payload is
/// empty and it is never handed to the [`Hearing`].
pub const PROBE_HEADER: &str = "Herald-Probe";

/// What the client's event callback tells [`NatsBus::run`] about the link.
#[derive(Debug)]
enum Link {
    Lost,
    Back,
    /// The client dropped messages this node did not take fast enough.
    Missed,
}

/// What [`NatsBus::run`] takes: the subscription made by [`NatsBus::connect`].
struct Hearer {
    subscriber: Subscriber,
    link: mpsc::UnboundedReceiver<Link>,
    /// Messages heard while [`NatsBus::connect`] waited for its probe, in order.
    early: Vec<Bytes>,
}

/// The NATS [`Bus`] (see the module doc).
pub struct NatsBus {
    client: Client,
    topic: Subject,
    /// The server list, without credentials, for logs and errors.
    servers: String,
    /// This bus's name in its probes.
    id: String,
    probes: AtomicU64,
    /// Set when the client dropped messages, until [`NatsBus::run`] has caught up.
    missed: Arc<AtomicBool>,
    hearer: Mutex<Option<Hearer>>,
}

/// The servers a NATS URL lists (comma-separated), and the list as logged (without
/// passwords).
pub(crate) fn servers(url: &str) -> (Vec<&str>, String) {
    let parts: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect();
    let shown = parts
        .iter()
        .map(|part| redacted(part))
        .collect::<Vec<_>>()
        .join(",");
    (parts, shown)
}

impl NatsBus {
    /// Connects to the servers `url` lists (see the module doc), failing at once when none
    /// answers, and subscribes to `topic`, proven by hearing a probe back.
    pub async fn connect(url: &str, topic: &str) -> Result<Arc<Self>, BusError> {
        let (parts, servers) = servers(url);
        if parts.is_empty() {
            return Err(BusError::Url("the NATS URL names no server".to_owned()));
        }
        let (link_tx, link_rx) = mpsc::unbounded_channel();
        let missed = Arc::new(AtomicBool::new(false));
        let options = ConnectOptions::new()
            .name("herald")
            .connection_timeout(CONNECT_TIMEOUT)
            .ping_interval(PING_EVERY)
            .max_reconnects(None)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback({
                let missed = Arc::clone(&missed);
                move |event| {
                    on_event(&link_tx, &missed, event);
                    std::future::ready(())
                }
            });
        let client = options.connect(parts.as_slice()).await.map_err(|e| {
            if e.kind() == ConnectErrorKind::ServerParse {
                BusError::Url(format!("{servers}: {e}"))
            } else {
                BusError::Unavailable {
                    engine: ENGINE,
                    reason: format!("cannot connect to {servers}: {e}"),
                }
            }
        })?;
        let mut subscriber = client.subscribe(topic.to_owned()).await.map_err(|e| {
            BusError::Url(format!(
                "the topic {topic:?} is no NATS subject to subscribe to: {e}"
            ))
        })?;
        let bus = Self {
            client,
            topic: Subject::from(topic),
            servers,
            id: crate::new_node_id(),
            probes: AtomicU64::new(0),
            missed,
            hearer: Mutex::new(None),
        };
        let early = bus.confirm_subscribed(&mut subscriber).await?;
        tracing::info!(
            engine = ENGINE,
            servers = bus.servers,
            topic,
            max_message_bytes = bus.max_message_bytes(),
            "bus: connected and subscribed"
        );
        *bus.hearer.lock().unwrap_or_else(PoisonError::into_inner) = Some(Hearer {
            subscriber,
            link: link_rx,
            early,
        });
        Ok(Arc::new(bus))
    }

    /// Waits to hear a probe back on `subscriber`; returns what it heard before it.
    async fn confirm_subscribed(
        &self,
        subscriber: &mut Subscriber,
    ) -> Result<Vec<Bytes>, BusError> {
        let mut early = Vec::new();
        let Some(probe) = self
            .probe()
            .await
            .map_err(|reason| self.unavailable(reason))?
        else {
            return Ok(early);
        };
        let hearing = async {
            while let Some(message) = subscriber.next().await {
                match probe_of(&message) {
                    Some(heard) if heard == probe => return true,
                    Some(_) => {}
                    None => early.push(message.payload),
                }
            }
            false
        };
        match tokio::time::timeout(ECHO_TIMEOUT, hearing).await {
            Ok(true) => Ok(early),
            Ok(false) => Err(self.unavailable("the connection closed while subscribing".into())),
            Err(_) => Err(self.unavailable(format!(
                "subscribed to {}, but did not hear its own message back within {ECHO_TIMEOUT:?} \
                 (may this user publish to it?)",
                self.topic
            ))),
        }
    }

    /// Publishes a probe and flushes it; returns its value, or `None` when the server takes no
    /// headers (then the flush alone stands for the proof).
    async fn probe(&self) -> Result<Option<String>, String> {
        let sending = async {
            if !self.client.server_info().headers {
                self.client.flush().await.map_err(|e| e.to_string())?;
                return Ok(None);
            }
            let count = self.probes.fetch_add(1, Ordering::Relaxed);
            let probe = format!("{}.{count}", self.id);
            let mut headers = HeaderMap::new();
            headers.insert(PROBE_HEADER, probe.as_str());
            self.client
                .publish_with_headers(self.topic.clone(), headers, Bytes::new())
                .await
                .map_err(|e| e.to_string())?;
            self.client.flush().await.map_err(|e| e.to_string())?;
            Ok(Some(probe))
        };
        tokio::time::timeout(SEND_TIMEOUT, sending)
            .await
            .unwrap_or_else(|_| Err(format!("sending took longer than {SEND_TIMEOUT:?}")))
    }

    fn unavailable(&self, reason: String) -> BusError {
        BusError::Unavailable {
            engine: ENGINE,
            reason: format!("{}: {reason}", self.servers),
        }
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    /// Publishes `messages` in order and flushes them to the socket, or refuses at once while
    /// the link is down (what was handed to the client is still sent when the link is back
    /// if the link drops during a send).
    async fn send(&self, messages: Vec<Bytes>) -> Result<(), BusError> {
        let limit = self.max_message_bytes();
        if let Some(message) = messages.iter().find(|message| message.len() > limit) {
            return Err(BusError::TooLarge {
                engine: ENGINE,
                size: message.len(),
                limit,
            });
        }
        if messages.is_empty() {
            return Ok(());
        }
        let state = self.client.connection_state();
        if state != State::Connected {
            return Err(self.unavailable(format!("not connected ({state})")));
        }
        let sending = async {
            for message in messages {
                self.client
                    .publish(self.topic.clone(), message)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            self.client.flush().await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(SEND_TIMEOUT, sending).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(self.unavailable(reason)),
            Err(_) => Err(self.unavailable(format!("sending took longer than {SEND_TIMEOUT:?}"))),
        }
    }

    /// The server's `max_payload` (learnt at each connection).
    fn max_message_bytes(&self) -> usize {
        match self.client.max_payload() {
            0 => DEFAULT_MAX_MESSAGE_BYTES,
            limit => limit,
        }
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    async fn run(self: Arc<Self>, hearing: Arc<dyn Hearing>, shutdown: CancellationToken) {
        let taken = self
            .hearer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(Hearer {
            mut subscriber,
            mut link,
            early,
        }) = taken
        else {
            tracing::error!(
                engine = ENGINE,
                "bus: run was called twice; this call returns"
            );
            return;
        };
        for payload in early {
            hearing.message(payload).await;
        }
        // The link was lost and is not back yet.
        let mut lost = false;
        // Back, and waiting for this probe (or this instant) to call `resumed`.
        let mut awaiting: Option<(Option<String>, Instant)> = None;
        let mut link_open = true;
        loop {
            let deadline = awaiting.as_ref().map(|(_, deadline)| *deadline);
            tokio::select! {
                () = shutdown.cancelled() => return,
                message = subscriber.next() => {
                    let Some(message) = message else {
                        if !shutdown.is_cancelled() {
                            tracing::error!(
                                engine = ENGINE,
                                servers = self.servers,
                                "bus: the NATS client closed; this node hears no other node until it restarts"
                            );
                            shutdown.cancelled().await;
                        }
                        return;
                    };
                    match probe_of(&message) {
                        None => hearing.message(message.payload).await,
                        Some(heard) => {
                            let ours = awaiting
                                .as_ref()
                                .is_some_and(|(probe, _)| probe.as_deref() == Some(heard));
                            if ours {
                                awaiting = None;
                                tracing::debug!(engine = ENGINE, "bus: re-subscribed; catching up");
                                hearing.resumed().await;
                            }
                        }
                    }
                }
                change = link.recv(), if link_open => match change {
                    None => link_open = false,
                    Some(Link::Lost) => {
                        if !lost {
                            tracing::warn!(
                                engine = ENGINE,
                                servers = self.servers,
                                "bus: lost the link to NATS; reconnecting"
                            );
                        }
                        lost = true;
                        awaiting = None;
                    }
                    // The first connection is announced too: only a return counts.
                    Some(Link::Back) if lost => {
                        lost = false;
                        tracing::info!(
                            engine = ENGINE,
                            servers = self.servers,
                            "bus: reconnected to NATS; re-subscribing"
                        );
                        let probe = match self.probe().await {
                            Ok(Some(probe)) => Some(probe),
                            Ok(None) => None,
                            Err(reason) => {
                                tracing::debug!(engine = ENGINE, reason, "bus: probe not sent");
                                None
                            }
                        };
                        let wait = if probe.is_some() { ECHO_TIMEOUT } else { Duration::ZERO };
                        awaiting = Some((probe, Instant::now() + wait));
                    }
                    Some(Link::Back) => {}
                    Some(Link::Missed) => {
                        self.missed.store(false, Ordering::Relaxed);
                        // A pending resumption catches this up too.
                        if !lost && awaiting.is_none() {
                            tracing::warn!(
                                engine = ENGINE,
                                "bus: NATS dropped messages this node took too slowly; catching up"
                            );
                            hearing.resumed().await;
                        }
                    }
                },
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let probed = awaiting.take().is_some_and(|(probe, _)| probe.is_some());
                    if probed {
                        tracing::warn!(
                            engine = ENGINE,
                            "bus: did not hear its probe back within {ECHO_TIMEOUT:?}; catching up anyway"
                        );
                    }
                    hearing.resumed().await;
                }
            }
        }
    }
}

/// The probe `message` is, if it is one.
fn probe_of(message: &Message) -> Option<&str> {
    message
        .headers
        .as_ref()?
        .get(PROBE_HEADER)
        .map(|value| value.as_str())
}

/// Hands what [`NatsBus::run`] needs of the client's `event` on.
fn on_event(link: &mpsc::UnboundedSender<Link>, missed: &AtomicBool, event: Event) {
    let change = match event {
        Event::Connected => Link::Back,
        Event::Disconnected => Link::Lost,
        // One event per dropped message: one catch-up for them all.
        Event::SlowConsumer(_) if !missed.swap(true, Ordering::Relaxed) => Link::Missed,
        Event::SlowConsumer(_) => return,
        Event::LameDuckMode => {
            tracing::info!(
                engine = ENGINE,
                "bus: the NATS server is shutting down (lame duck mode); the client will move"
            );
            return;
        }
        Event::ServerError(e) => {
            tracing::warn!(engine = ENGINE, error = %e, "bus: the NATS server reported an error");
            return;
        }
        Event::ClientError(e) => {
            tracing::debug!(engine = ENGINE, error = %e, "bus: NATS client error");
            return;
        }
        Event::Draining | Event::Closed => return,
    };
    // Closed only when the client is gone, and `run` with it.
    let _ = link.send(change);
}

/// The wait before reconnection attempt `attempt` (1 for the first): none before the first,
/// then [`RECONNECT_FIRST`] doubling to [`RECONNECT_LAST`]. async-nats also asks it before the
/// very first connection (attempt 1), which must not wait.
fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempt - 2).unwrap_or(u32::MAX).min(16);
    RECONNECT_FIRST
        .saturating_mul(1 << doublings)
        .min(RECONNECT_LAST)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::{SystemTime, UNIX_EPOCH};

    /// What a test [`Hearing`] heard.
    #[derive(Debug, PartialEq)]
    enum Heard {
        Message(Bytes),
        Resumed,
    }

    struct Recorder(mpsc::UnboundedSender<Heard>);

    #[async_trait::async_trait]
    impl Hearing for Recorder {
        async fn message(&self, payload: Bytes) {
            let _ = self.0.send(Heard::Message(payload));
        }

        async fn resumed(&self) {
            let _ = self.0.send(Heard::Resumed);
        }
    }

    /// A bus running with a recorder, and what it hears.
    fn hear(bus: &Arc<NatsBus>, shutdown: &CancellationToken) -> mpsc::UnboundedReceiver<Heard> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Arc::clone(bus).run(Arc::new(Recorder(tx)), shutdown.clone()));
        rx
    }

    async fn next(heard: &mut mpsc::UnboundedReceiver<Heard>, within: Duration) -> Heard {
        match tokio::time::timeout(within, heard.recv()).await {
            Ok(Some(heard)) => heard,
            Ok(None) => panic!("the bus stopped"),
            Err(_) => panic!("nothing heard within {within:?}"),
        }
    }

    /// Held (shared) by every test using the server, and alone by the one restarting it.
    static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

    fn unique_topic(test: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        format!("herald.test.{test}.{nanos}.{}", crate::new_node_id())
    }

    fn message(text: &str) -> Heard {
        Heard::Message(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn reconnecting_backs_off_from_100_ms_to_5_s() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(7), Duration::from_millis(3200));
        assert_eq!(reconnect_delay(8), Duration::from_secs(5));
        assert_eq!(reconnect_delay(usize::MAX), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn every_node_hears_every_message_in_send_order() {
        let Some(url) = crate::test_nats_url("every_node_hears_every_message_in_send_order") else {
            return;
        };
        let _server = SERVER.read().await;
        let topic = unique_topic("order");
        let shutdown = CancellationToken::new();
        let b = NatsBus::connect(&url, &topic).await.expect("B connects");
        let a = NatsBus::connect(&url, &topic).await.expect("A connects");
        assert!(a.is_connected() && b.is_connected());
        assert_eq!(a.engine(), "NATS");
        let mut heard_by_a = hear(&a, &shutdown);
        let mut heard_by_b = hear(&b, &shutdown);

        let sent: Vec<String> = (0..20).map(|i| format!("message {i}")).collect();
        a.send(sent[..15].iter().map(|m| Bytes::from(m.clone())).collect())
            .await
            .expect("sent");
        a.send(sent[15..].iter().map(|m| Bytes::from(m.clone())).collect())
            .await
            .expect("sent");
        for heard in [&mut heard_by_a, &mut heard_by_b] {
            for m in &sent {
                assert_eq!(next(heard, Duration::from_secs(5)).await, message(m));
            }
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_message_over_the_server_limit_is_refused_with_both_sizes() {
        let Some(url) =
            crate::test_nats_url("a_message_over_the_server_limit_is_refused_with_both_sizes")
        else {
            return;
        };
        let _server = SERVER.read().await;
        let bus = NatsBus::connect(&url, &unique_topic("large"))
            .await
            .expect("connects");
        let limit = bus.max_message_bytes();
        assert_eq!(limit, bus.client.server_info().max_payload);
        let Err(e) = bus.send(vec![Bytes::from(vec![b'x'; limit + 1])]).await else {
            panic!("a message over the limit was sent");
        };
        assert!(
            matches!(e, BusError::TooLarge { size, limit: l, .. } if size == limit + 1 && l == limit),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains(&limit.to_string()), "{text}");
        assert!(text.contains(&(limit + 1).to_string()), "{text}");
        bus.send(vec![Bytes::from(vec![b'x'; limit])])
            .await
            .expect("a message of the limit is sent");
    }

    #[tokio::test]
    async fn connecting_where_no_server_listens_fails_fast_without_the_password() {
        // Needs no server: nothing listens on port 1.
        let started = std::time::Instant::now();
        let url = "nats://user:hunter2@127.0.0.1:1,nats://other:swordfish@127.0.0.1:2";
        let connecting = NatsBus::connect(url, "herald.test.refused");
        let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), connecting).await else {
            panic!("connecting did not fail within 10 s");
        };
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(e, BusError::Unavailable { engine: "NATS", .. }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("swordfish"),
            "{text}"
        );
        assert!(
            text.contains("nats://127.0.0.1:1,nats://127.0.0.1:2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_url_that_is_no_nats_url_is_refused() {
        let Err(e) = NatsBus::connect("nats://user:hunter2@[::1", "t").await else {
            panic!("connected");
        };
        assert!(matches!(e, BusError::Url(_)), "{e:?}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    /// Restarts the server with `HERALD_TEST_NATS_RESTART` (a shell command) and checks that
    /// both nodes resume and hear each other again.
    #[tokio::test]
    async fn after_the_server_restarts_nodes_resume_and_hear_again() {
        let test = "after_the_server_restarts_nodes_resume_and_hear_again";
        let Some(url) = crate::test_nats_url(test) else {
            return;
        };
        let Ok(restart) = std::env::var("HERALD_TEST_NATS_RESTART") else {
            herald_test_support::skip!("{test}: HERALD_TEST_NATS_RESTART is unset");
            return;
        };
        let _server = SERVER.write().await;
        let topic = unique_topic("restart");
        let shutdown = CancellationToken::new();
        let a = NatsBus::connect(&url, &topic).await.expect("A connects");
        let b = NatsBus::connect(&url, &topic).await.expect("B connects");
        let mut heard_by_a = hear(&a, &shutdown);
        let mut heard_by_b = hear(&b, &shutdown);
        a.send(vec![Bytes::from_static(b"before")])
            .await
            .expect("sent");
        for heard in [&mut heard_by_a, &mut heard_by_b] {
            assert_eq!(next(heard, Duration::from_secs(5)).await, message("before"));
        }

        let status = tokio::process::Command::new("sh")
            .args(["-c", &restart])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .expect("the restart command runs");
        assert!(status.success(), "the restart command failed: {status}");

        for heard in [&mut heard_by_a, &mut heard_by_b] {
            assert_eq!(next(heard, Duration::from_secs(15)).await, Heard::Resumed);
        }
        assert!(a.is_connected() && b.is_connected());
        b.send(vec![Bytes::from_static(b"after")])
            .await
            .expect("sent");
        for heard in [&mut heard_by_a, &mut heard_by_b] {
            assert_eq!(next(heard, Duration::from_secs(5)).await, message("after"));
        }
        shutdown.cancel();
    }
}
