//! The bus over Redis pub/sub: every node `PUBLISH`es to one channel (the topic) and holds one
//! subscribed connection hearing it.
//!
//! Redis delivers one connection's publications to every subscriber in the order they were
//! sent, which is all the broker needs; durability is PostgreSQL's. Sending goes through
//! redis-rs's connection manager (one multiplexed connection, reconnected by itself); hearing
//! through a dedicated pub/sub connection that this bus re-opens with backoff when it is lost,
//! pinging it so a silently dead link is noticed within [`PING_EVERY`] + [`PING_TIMEOUT`].
//! Publications sent while a node is not subscribed are not heard by it (Redis keeps nothing
//! for absent subscribers): the broker catches its history channels up from the store when
//! [`Hearing::resumed`] is called.
//!
//! What this node hears waits for its turn in a bounded queue ([`HEAR_QUEUE`] messages, as
//! many as async-nats keeps for a subscription). redis-rs reads its pub/sub connection into a
//! queue of its own without a bound, so the bus drains that one as fast as Redis sends and
//! bounds its own: when handing messages on falls behind (a slow store read, a presence
//! record's writes), those that do not fit are dropped and counted, and once the queue is
//! handed on the node catches up ([`Hearing::resumed`]), as after a lost link and as the NATS
//! bus does for a slow consumer.
//!
//! Redis Cluster is configuration: classic pub/sub is broadcast to every node of a Redis
//! Cluster, so pointing `broker.url` at any one of its nodes works. Sentinel is not supported.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::{
    Client,
    aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream},
};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Hearing, redacted};

const ENGINE: &str = "Redis";

/// Redis's limit on one value (`proto-max-bulk-len`).
const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// How long connecting and each command may take before the link counts as down.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The subscribed connection is pinged this often, and lost if a ping takes longer than
/// [`PING_TIMEOUT`].
const PING_EVERY: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits between attempts to re-subscribe: doubling from the first to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_LAST: Duration = Duration::from_secs(5);

/// How many heard messages may wait to be handed on (see the module doc).
const HEAR_QUEUE: usize = 64 * 1024;

/// A subscribed connection, split into its command half (pings) and its messages.
struct Subscription {
    sink: PubSubSink,
    messages: PubSubStream,
}

/// The Redis [`Bus`] (see the module doc).
pub struct RedisBus {
    client: Client,
    url: String,
    topic: String,
    sender: ConnectionManager,
    subscribed: AtomicBool,
    first: Mutex<Option<Subscription>>,
    /// [`HEAR_QUEUE`], smaller in tests.
    hear_queue: usize,
    /// Messages heard that did not fit the queue, since the start.
    dropped: AtomicU64,
}

impl RedisBus {
    /// Connects for sending and subscribes to `topic`, so this node hears the others from
    /// now on.
    pub async fn connect(url: &str, topic: &str) -> Result<Arc<Self>, BusError> {
        let client = Client::open(url)
            .map_err(|e| BusError::Url(format!("{} is not a Redis URL: {e}", redacted(url))))?;
        let shown = redacted(url);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(2)
            .set_min_delay(RECONNECT_FIRST)
            .set_max_delay(RECONNECT_LAST);
        let sender = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| unavailable(&shown, &e))?;
        let bus = Self {
            client,
            url: shown,
            topic: topic.to_owned(),
            sender,
            subscribed: AtomicBool::new(false),
            first: Mutex::new(None),
            hear_queue: HEAR_QUEUE,
            dropped: AtomicU64::new(0),
        };
        let subscription = bus.subscribe().await?;
        bus.subscribed.store(true, Ordering::Relaxed);
        *bus.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(subscription);
        Ok(Arc::new(bus))
    }

    /// One attempt at a subscribed connection.
    async fn subscribe(&self) -> Result<Subscription, BusError> {
        let opened = tokio::time::timeout(TIMEOUT, async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.topic).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match opened {
            Ok(Ok(pubsub)) => {
                let (sink, messages) = pubsub.split();
                Ok(Subscription { sink, messages })
            }
            Ok(Err(e)) => Err(unavailable(&self.url, &e)),
            Err(_) => Err(BusError::Unavailable {
                engine: ENGINE,
                reason: format!("{}: no answer within {TIMEOUT:?}", self.url),
            }),
        }
    }

    /// Re-subscribes with backoff until it succeeds or `shutdown`.
    async fn resubscribe(&self, shutdown: &CancellationToken) -> Option<Subscription> {
        let mut wait = RECONNECT_FIRST;
        loop {
            match self.subscribe().await {
                Ok(subscription) => return Some(subscription),
                Err(e) => {
                    tracing::warn!(engine = ENGINE, error = %e, retry_in = ?wait, "broker: cannot subscribe");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RECONNECT_LAST);
        }
    }

    /// Hands on what `subscription` hears until it is lost (`true`, once what it heard before
    /// is handed on) or `shutdown` (`false`).
    async fn hear(
        &self,
        subscription: &mut Subscription,
        hearing: &dyn Hearing,
        shutdown: &CancellationToken,
    ) -> bool {
        let (queue, mut heard) = tokio::sync::mpsc::channel::<Bytes>(self.hear_queue);
        // Set when a message is dropped; the catch-up comes once the queue is empty, after the
        // messages heard before the drop.
        let missed = AtomicBool::new(false);
        let reading = async {
            let lost = self.read(subscription, &queue, &missed, shutdown).await;
            if lost {
                // Down from now on (readiness, sends refused at once), not once the messages
                // heard before are handed on.
                self.subscribed.store(false, Ordering::Relaxed);
            }
            drop(queue);
            lost
        };
        let handing_on = async {
            while let Some(message) = heard.recv().await {
                hearing.message(message).await;
                if heard.is_empty() && missed.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        engine = ENGINE,
                        dropped_since_start = self.dropped.load(Ordering::Relaxed),
                        "broker: this node fell behind what it heard and dropped messages; catching up"
                    );
                    hearing.resumed().await;
                }
            }
        };
        tokio::select! {
            (lost, ()) = async { tokio::join!(reading, handing_on) } => lost,
            () = shutdown.cancelled() => false,
        }
    }

    /// Reads `subscription` into `queue` until it is lost (`true`) or `shutdown` (`false`),
    /// pinging it; a message that does not fit is dropped and counted, and `missed` set.
    async fn read(
        &self,
        subscription: &mut Subscription,
        queue: &tokio::sync::mpsc::Sender<Bytes>,
        missed: &AtomicBool,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                message = subscription.messages.next() => match message {
                    Some(message) => {
                        let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                        if queue.try_send(payload).is_err() {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                            missed.store(true, Ordering::Relaxed);
                        }
                    }
                    None => {
                        tracing::warn!(engine = ENGINE, url = self.url, "broker: the subscribed connection was closed");
                        return true;
                    }
                },
                _ = ping.tick() => {
                    let answered =
                        tokio::time::timeout(PING_TIMEOUT, subscription.sink.ping::<()>()).await;
                    if !matches!(answered, Ok(Ok(()))) {
                        tracing::warn!(engine = ENGINE, url = self.url, "broker: the subscribed connection stopped answering");
                        return true;
                    }
                }
            }
        }
    }
}

fn unavailable(url: &str, e: &redis::RedisError) -> BusError {
    BusError::Unavailable {
        engine: ENGINE,
        reason: format!("{url}: {e}"),
    }
}

#[async_trait::async_trait]
impl Bus for RedisBus {
    fn engine(&self) -> &'static str {
        ENGINE
    }

    async fn send(&self, messages: Vec<Bytes>) -> Result<(), BusError> {
        // Redis refuses an empty pipeline ("empty command").
        if messages.is_empty() {
            return Ok(());
        }
        if let Some(large) = messages.iter().find(|m| m.len() > MAX_MESSAGE_BYTES) {
            return Err(BusError::TooLarge {
                engine: ENGINE,
                size: large.len(),
                limit: MAX_MESSAGE_BYTES,
            });
        }
        // While the subscribed connection is lost, Redis is taken for down: refused at once,
        // as the NATS bus refuses while not connected, rather than each publication waiting
        // out the connection manager's reconnects (seconds each, with the publishing
        // channel's turn held meanwhile). The publisher counts the refusal as missed.
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err(BusError::Unavailable {
                engine: ENGINE,
                reason: format!("{}: the link is down (resubscribing)", self.url),
            });
        }
        // One pipeline: sent together on the manager's connection, in this order.
        let mut pipeline = redis::pipe();
        for message in &messages {
            pipeline.publish(&self.topic, message.as_ref()).ignore();
        }
        let mut sender = self.sender.clone();
        match tokio::time::timeout(TIMEOUT, pipeline.query_async::<()>(&mut sender)).await {
            Ok(sent) => sent.map_err(|e| unavailable(&self.url, &e)),
            Err(_) => Err(BusError::Unavailable {
                engine: ENGINE,
                reason: format!("{}: no answer within {TIMEOUT:?}", self.url),
            }),
        }
    }

    fn max_message_bytes(&self) -> usize {
        MAX_MESSAGE_BYTES
    }

    fn is_connected(&self) -> bool {
        self.subscribed.load(Ordering::Relaxed)
    }

    async fn run(self: Arc<Self>, hearing: Arc<dyn Hearing>, shutdown: CancellationToken) {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut subscription) = first else {
            tracing::error!(engine = ENGINE, "broker: run was started twice");
            return;
        };
        loop {
            if !self
                .hear(&mut subscription, hearing.as_ref(), &shutdown)
                .await
            {
                return;
            }
            self.subscribed.store(false, Ordering::Relaxed);
            let Some(resubscribed) = self.resubscribe(&shutdown).await else {
                return;
            };
            subscription = resubscribed;
            self.subscribed.store(true, Ordering::Relaxed);
            tracing::info!(
                engine = ENGINE,
                url = self.url,
                "broker: subscribed again; catching up"
            );
            hearing.resumed().await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a real server: `HERALD_TEST_REDIS_URL` names it (`.ci/run` starts one).

    use super::*;
    use tokio::sync::mpsc;

    struct Heard(mpsc::UnboundedSender<Bytes>);

    #[async_trait::async_trait]
    impl Hearing for Heard {
        async fn message(&self, payload: Bytes) {
            let _ = self.0.send(payload);
        }
        async fn resumed(&self) {}
    }

    fn server(test: &str) -> Option<String> {
        let url = std::env::var("HERALD_TEST_REDIS_URL").ok();
        if url.is_none() {
            herald_test_support::skip!("{test}: HERALD_TEST_REDIS_URL is unset");
        }
        url
    }

    fn topic() -> String {
        format!("herald.test.{}", crate::new_node_id())
    }

    async fn listening(bus: &Arc<RedisBus>) -> mpsc::UnboundedReceiver<Bytes> {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(Arc::clone(bus).run(Arc::new(Heard(sender)), CancellationToken::new()));
        receiver
    }

    async fn next(heard: &mut mpsc::UnboundedReceiver<Bytes>) -> Bytes {
        tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .expect("heard within 10 s")
            .expect("open")
    }

    #[tokio::test]
    async fn every_node_hears_each_senders_messages_in_order() {
        let Some(url) = server("redis bus order") else {
            return;
        };
        let topic = topic();
        let a = RedisBus::connect(&url, &topic).await.expect("a");
        let b = RedisBus::connect(&url, &topic).await.expect("b");
        let (mut on_a, mut on_b) = (listening(&a).await, listening(&b).await);
        assert!(a.is_connected() && b.is_connected());
        let sent: Vec<Bytes> = (0..100).map(|n| Bytes::from(format!("m{n}"))).collect();
        a.send(Vec::new())
            .await
            .expect("nothing to send is no error");
        a.send(sent[..50].to_vec()).await.expect("send");
        a.send(sent[50..].to_vec()).await.expect("send");
        for heard in [&mut on_a, &mut on_b] {
            let mut got = Vec::new();
            for _ in 0..100 {
                got.push(next(heard).await);
            }
            assert_eq!(got, sent);
        }
    }

    /// What a node is told, in order: each message, and `None` for each catch-up.
    struct Slow {
        told: mpsc::UnboundedSender<Option<Bytes>>,
        /// Told when the first message comes, which is handed on only once this has a permit.
        entered: tokio::sync::Notify,
        first: tokio::sync::Semaphore,
        started: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Hearing for Slow {
        async fn message(&self, payload: Bytes) {
            if !self.started.swap(true, Ordering::Relaxed) {
                self.entered.notify_one();
                let _ = self.first.acquire().await.expect("open");
            }
            let _ = self.told.send(Some(payload));
        }
        async fn resumed(&self) {
            let _ = self.told.send(None);
        }
    }

    /// A node that hands messages on more slowly than it hears them keeps at most its queue's
    /// worth waiting: the rest are dropped and counted, and once what waited is handed on the
    /// node catches up (the store has what a history channel missed), then goes on hearing.
    #[tokio::test]
    async fn a_node_that_falls_behind_drops_what_does_not_fit_and_catches_up() {
        let Some(url) = server("redis bus bounded queue") else {
            return;
        };
        let mut bus = RedisBus::connect(&url, &topic()).await.expect("bus");
        Arc::get_mut(&mut bus).expect("not shared yet").hear_queue = 4;
        let (told, mut heard) = mpsc::unbounded_channel();
        let slow = Arc::new(Slow {
            told,
            entered: tokio::sync::Notify::new(),
            first: tokio::sync::Semaphore::new(0),
            started: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(Arc::clone(&bus).run(
            Arc::clone(&slow) as Arc<dyn Hearing>,
            CancellationToken::new(),
        ));
        let sent: Vec<Bytes> = (0..20).map(|n| Bytes::from(format!("m{n}"))).collect();
        bus.send(sent[..1].to_vec()).await.expect("send");
        tokio::time::timeout(Duration::from_secs(10), slow.entered.notified())
            .await
            .expect("the first is being handed on");
        bus.send(sent[1..].to_vec()).await.expect("send");
        // The first is being handed on and four wait: fifteen do not fit.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while bus.dropped.load(Ordering::Relaxed) < 15 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "dropped {} of the 15 that do not fit",
                bus.dropped.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        slow.first.add_permits(1);
        let mut got = Vec::new();
        for _ in 0..6 {
            let told = tokio::time::timeout(Duration::from_secs(10), heard.recv())
                .await
                .expect("told within 10 s")
                .expect("open");
            got.push(told);
        }
        let expected: Vec<Option<Bytes>> =
            sent[..5].iter().cloned().map(Some).chain([None]).collect();
        assert_eq!(got, expected, "what fitted, then one catch-up");
        assert_eq!(bus.dropped.load(Ordering::Relaxed), 15);
        bus.send(vec![Bytes::from_static(b"after")])
            .await
            .expect("send");
        let after = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .expect("told within 10 s")
            .expect("open");
        assert_eq!(after, Some(Bytes::from_static(b"after")), "and hears on");
    }

    /// A TCP relay to Redis that can be cut, as a Redis going away would cut it.
    struct Relay {
        url: String,
        tasks: tokio::task::JoinSet<()>,
    }

    impl Relay {
        async fn to(url: &str) -> Self {
            let upstream = url::Url::parse(url).expect("url");
            let upstream = format!(
                "{}:{}",
                upstream.host_str().expect("host"),
                upstream.port().unwrap_or(6379)
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let mut tasks = tokio::task::JoinSet::new();
            tasks.spawn(async move {
                let mut pipes = tokio::task::JoinSet::new();
                while let Ok((mut client, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    pipes.spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            });
            Self {
                url: format!("redis://127.0.0.1:{port}"),
                tasks,
            }
        }

        /// Closes every relayed connection and stops listening.
        fn cut(&mut self) {
            self.tasks.abort_all();
        }
    }

    #[tokio::test]
    async fn while_the_link_is_down_a_send_is_refused_at_once() {
        let Some(url) = server("redis bus refused while down") else {
            return;
        };
        let mut relay = Relay::to(&url).await;
        let bus = RedisBus::connect(&relay.url, &topic()).await.expect("bus");
        let mut heard = listening(&bus).await;
        bus.send(vec![Bytes::from_static(b"up")])
            .await
            .expect("sent while up");
        assert_eq!(next(&mut heard).await, Bytes::from_static(b"up"));
        relay.cut();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while bus.is_connected() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lost subscription was noticed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..5 {
            let started = tokio::time::Instant::now();
            let refused = bus
                .send(vec![Bytes::from_static(b"down")])
                .await
                .expect_err("the link is down");
            assert!(refused.to_string().contains("link is down"), "{refused}");
            // Well under the send timeout, which a send waiting out reconnects would reach.
            assert!(
                started.elapsed() < TIMEOUT / 3,
                "refused at once, not after reconnects: {:?}",
                started.elapsed()
            );
        }
    }

    #[tokio::test]
    async fn tls_to_redis_is_refused_as_not_built_in() {
        let Err(e) = RedisBus::connect("rediss://:hunter2@127.0.0.1:1", "t").await else {
            panic!("TLS is not built in")
        };
        let message = e.to_string();
        assert!(message.contains("TLS"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_clear_error_without_the_password() {
        let Err(e) = RedisBus::connect("redis://:hunter2@127.0.0.1:1", "t").await else {
            panic!("nothing listens on port 1")
        };
        let message = e.to_string();
        assert!(message.contains("Redis is unavailable"), "{message}");
        assert!(message.contains("127.0.0.1:1"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}
