//! The PostgreSQL broker: publications reach every node's hub through LISTEN/NOTIFY, with
//! PostgreSQL alone.
//!
//! Two kinds of publication travel two ways, one LISTEN session per node hearing both:
//! - **History channels** are announced by the store itself, in the commit that assigns their
//!   offsets ([`HISTORY_CHANNEL`], see `herald_store::postgres` history). PostgreSQL delivers
//!   notifications at commit and in commit order, and one channel's offsets are assigned under
//!   a row lock held to commit, so every node, the publishing one included, hears a channel's
//!   publications in offset order, once each. [`PostgresBroker::publish`] does nothing more
//!   for them. Each subscriber also drops an offset it already has (one it read from the store
//!   while joining), so a client that moves to another node resumes exactly.
//! - **Other channels** keep no history and have no offsets: the publishing node hands them to
//!   its own hub at once and notifies the others ([`PUBLICATIONS_CHANNEL`]), in its publishing
//!   order.
//!
//! A notification carries at most 8,000 bytes: larger publications go by reference (a row in
//! `broker_payloads`, read by each node as the notification arrives and swept after
//! [`PAYLOAD_KEEP`]; large history entries are read from `channel_history`).
//!
//! When the LISTEN session is lost, what was notified meanwhile is not heard. On reconnecting,
//! the node reads what its history channels' subscribers missed from the store, in order
//! ([`PostgresBroker::catch_up`]); publications on channels without history sent during the
//! gap are lost for this node's subscribers (as they are for a client that was offline).
//!
//! **With a bus** (`broker.url`: Redis or NATS, see [`crate::bus`]) publications travel there
//! instead, and the LISTEN session keeps the rest (deliveries, control, presence). Every
//! publication, history channels' included, is sent to the bus by the node that published it,
//! after its commit, so two nodes publishing on one channel may be heard in either order.
//! History channels stay exact because each node checks offsets as they arrive
//! ([`PostgresBroker::hear_ordered`]): an offset past the next one its subscribers need means
//! the earlier ones were committed first (offsets are assigned under a row lock held to commit)
//! and are still on their way or were lost, so they are read from the store and handed on
//! first; when they arrive later each subscriber drops them as duplicates. History
//! publications reach the publishing node's own hub through the bus too, so each hub hears one
//! ordered stream per channel. Other channels go to the local hub at once and to the bus.
//!
//! The same session hears [`DELIVERIES_CHANNEL`] (another node queued a delivery, so this
//! node's dispatcher wakes and may claim it), [`CONTROL_CHANNEL`] (another node deleted an app:
//! its connections here close too), [`CONFIG_CHANNEL`] (an app, endpoint, token or source
//! changed: this node's store cache is emptied, see [`PostgresBroker::keep_cache`]) and
//! presence notices (see `presence`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use chrono::Utc;
use herald_channels::{
    EventData, Hub, Publication,
    broker::{Broker, BrokerError},
};
use herald_core::{
    AppId,
    history::{HistoryEntry, Position},
};
use herald_metrics::{ClusterMetrics, NoticeVia};
use herald_store::{
    Cache, ClusterClock, HistoryQuery, Store,
    postgres::{
        CONFIG_CHANNEL, DELIVERIES_CHANNEL, DueLanes, HISTORY_CHANNEL, HistoryNotice, read_clock,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{Bus, Hearing},
    presence::PresenceRecord,
};

/// The first byte of a presence notice on a bus (publications are JSON objects, `{`).
pub const PRESENCE_NOTICE_MARK: &[u8] = b"P";

/// The NOTIFY channel of publications on channels that keep no history.
pub const PUBLICATIONS_CHANNEL: &str = "herald_publications";

/// The NOTIFY channel of what one node tells the others to do to their connections.
pub const CONTROL_CHANNEL: &str = "herald_control";

/// What one node tells the others (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct ControlNotice {
    #[serde(rename = "s")]
    node: String,
    /// An app was deleted: end its connections and streams.
    #[serde(
        rename = "removed_app",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    removed_app: Option<String>,
    /// The sending node's history publications could not go out on the bus: every node catches
    /// its history subscribers up from the store once its own bus link is up (the other nodes
    /// hear those publications from the bus only, so they would otherwise wait for the
    /// channel's next one).
    #[serde(
        rename = "catch_up",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    catch_up: bool,
}

/// A notification payload must be shorter than 8,000 bytes.
const MAX_NOTICE_BYTES: usize = 7_900;

/// How long a large publication's row is kept: far longer than a notification takes to
/// arrive at a connected node.
pub const PAYLOAD_KEEP: Duration = Duration::from_secs(600);

/// How often each node deletes rows older than [`PAYLOAD_KEEP`].
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The most events one channel's catch-up reads after a lost LISTEN session; a subscriber that
/// missed more has a gap, which its client detects by offset and resumes from.
const CATCH_UP_LIMIT: u32 = 1000;

/// How many events a catch-up reads at a time, handing each read on before the next: entries
/// may be as large as an API message, and a thousand of them need not be in memory at once.
const CATCH_UP_READ: u32 = 50;

/// How often a node whose send to the bus failed checks whether it is back, to catch up.
const RETRY_MISSED: Duration = Duration::from_secs(1);
/// The longest wait between catch-ups that keep failing.
const MAX_CATCH_UP_WAIT: Duration = Duration::from_secs(30);

/// How often the LISTEN session is asked the database's time, and how long its answer may
/// take. Its connection otherwise only receives: one that died without a reset (a NAT or
/// firewall dropping it, a partition) would never say so, and the node would hear no other
/// node's changes until restarted, its cache serving what they replaced. The answer measures
/// the store's clock again (see `herald_store::ClusterClock`).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(15);
const KEEPALIVE_PATIENCE: Duration = Duration::from_secs(10);

/// How long applying the terminations missed while a link was down may take at a time; the
/// link's task hears nothing else meanwhile. Past it, it is tried again at the next retry tick.
const REPLAY_PATIENCE: Duration = Duration::from_secs(5);

/// `terminations_from` when no missed terminations are waiting to be applied.
const NO_TERMINATIONS_DUE: i64 = i64::MIN;

/// Waits between attempts to re-open the LISTEN session: doubling from the first to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_LAST: Duration = Duration::from_secs(5);

/// A publication on a channel without history, as notified (JSON with one-letter keys).
#[derive(Debug, Serialize, Deserialize)]
struct PublicationNotice {
    /// The publishing node: it delivered to its own hub already.
    #[serde(rename = "s")]
    node: String,
    /// The node's count of its notices: NOTIFY folds identical payloads sent in one
    /// transaction into one, and two equal publications must both arrive.
    #[serde(rename = "q")]
    sequence: u64,
    /// The publication, unless it was too large: then its `broker_payloads` row.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    publication: Option<NoticedPublication>,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    reference: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct NoticedPublication {
    #[serde(rename = "a")]
    app_id: String,
    #[serde(rename = "c")]
    channel: String,
    #[serde(rename = "n")]
    event: String,
    #[serde(rename = "d")]
    data: String,
    #[serde(rename = "j", default)]
    raw_json: bool,
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    user_id: Option<String>,
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    except: Option<String>,
}

impl NoticedPublication {
    fn of(publication: &Publication) -> Self {
        Self {
            app_id: publication.app_id.as_str().to_owned(),
            channel: publication.channel.clone(),
            event: publication.event.clone(),
            data: publication.data.as_str().to_owned(),
            raw_json: publication.data.is_json(),
            user_id: publication.user_id.clone(),
            except: publication.except.clone(),
        }
    }

    fn into_publication(self) -> Result<Publication, String> {
        let app_id = AppId::parse(&self.app_id).map_err(|e| format!("app id: {e}"))?;
        let data = if self.raw_json {
            EventData::Json(RawValue::from_string(self.data).map_err(|e| format!("data: {e}"))?)
        } else {
            EventData::text(self.data)
        };
        Ok(Publication::new(&app_id, self.channel, self.event, data)
            .with_user(self.user_id)
            .except(self.except))
    }
}

/// A publication on the bus (JSON with one-letter keys).
#[derive(Debug, Serialize, Deserialize)]
struct BusMessage {
    /// The publishing node (it handed a channel without history to its own hub already).
    #[serde(rename = "s")]
    node: String,
    #[serde(rename = "p")]
    publication: NoticedPublication,
    /// A history channel's position; `None` for other channels.
    #[serde(rename = "e", default, skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    /// Too large for the bus: the data is read from the store by offset.
    #[serde(rename = "r", default, skip_serializing_if = "std::ops::Not::not")]
    by_reference: bool,
}

/// An open LISTEN session, from [`PostgresBroker::listen`] to [`PostgresBroker::run`].
pub struct Session(PgListener);

/// The [`Broker`] of a cluster on PostgreSQL (see the module doc). [`PostgresBroker::run`]
/// holds its LISTEN session; start it once per node.
pub struct PostgresBroker {
    node: String,
    pool: PgPool,
    hub: Arc<Hub>,
    store: Arc<dyn Store>,
    sequence: AtomicU64,
    listening: AtomicBool,
    wake_deliveries: Box<dyn Fn(DueLanes) + Send + Sync>,
    /// Where publications travel instead of NOTIFY (Redis, NATS), if configured.
    bus: Option<Arc<dyn Bus>>,
    /// A send to the bus failed, or a history event heard could not be handed on: history
    /// subscribers are caught up from the store at the next retry tick (once the bus, if
    /// any, is back).
    missed: AtomicBool,
    /// Catch-ups that failed in a row, and when the retry tick may try again: each failure
    /// doubles the wait from [`RETRY_MISSED`] up to [`MAX_CATCH_UP_WAIT`], since every try
    /// reads each occupied history channel from a store that is failing.
    catch_up_failures: std::sync::Mutex<(u32, Option<tokio::time::Instant>)>,
    presence: std::sync::OnceLock<Arc<dyn PresenceRecord>>,
    /// The store's node cache, served only while this session hears [`CONFIG_CHANNEL`].
    cache: std::sync::OnceLock<Arc<Cache>>,
    /// How many LISTEN sessions have been opened (the first, then each re-opened one).
    sessions: tokio::sync::watch::Sender<u64>,
    /// The schema Herald's tables are in (`current_schema()` of the session): the payload of
    /// the [`CONFIG_CHANNEL`] notices that concern this node.
    schema: std::sync::OnceLock<String>,
    /// Told when the configuration may have changed ([`PostgresBroker::on_config_change`]).
    config_changed: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// How often the session is checked, and how long a check may take ([`KEEPALIVE_EVERY`]).
    keepalive: (Duration, Duration),
    /// The store's clock, which each check of the session measures again, and in which the
    /// large publications' rows are dated and swept.
    clock: ClusterClock,
    /// The link's health, for `/metrics` (registered by `herald::run`).
    metrics: Arc<ClusterMetrics>,
    /// When this node's links were last known to work (the cluster's Unix milliseconds; 0
    /// before the first check): the LISTEN session answered its check and the bus, if any,
    /// was connected. Terminations from a little before it on may have been missed.
    links_good_at: AtomicI64,
    /// Terminations missed while a link was down are still to be applied, from this time on
    /// (see [`PostgresBroker::replay_terminations`]); [`NO_TERMINATIONS_DUE`] when none are.
    terminations_from: AtomicI64,
}

impl PostgresBroker {
    /// `pool` is the PostgreSQL store's (same database and schema); `wake_deliveries` is
    /// called with the lanes concerned when a node queued a due delivery, and with
    /// [`DueLanes::Any`] after every (re)connection. What happens to the link is counted in
    /// `metrics`.
    pub fn new(
        node: String,
        pool: PgPool,
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        wake_deliveries: Box<dyn Fn(DueLanes) + Send + Sync>,
        bus: Option<Arc<dyn Bus>>,
        metrics: Arc<ClusterMetrics>,
    ) -> Arc<Self> {
        metrics.bus_connected.set(i64::from(
            bus.as_ref().is_some_and(|bus| bus.is_connected()),
        ));
        Arc::new(Self {
            node,
            pool,
            hub,
            sequence: AtomicU64::new(0),
            listening: AtomicBool::new(false),
            wake_deliveries,
            bus,
            missed: AtomicBool::new(false),
            catch_up_failures: std::sync::Mutex::new((0, None)),
            presence: std::sync::OnceLock::new(),
            cache: std::sync::OnceLock::new(),
            sessions: tokio::sync::watch::Sender::new(0),
            schema: std::sync::OnceLock::new(),
            config_changed: std::sync::OnceLock::new(),
            keepalive: (KEEPALIVE_EVERY, KEEPALIVE_PATIENCE),
            clock: store.clock(),
            store,
            metrics,
            links_good_at: AtomicI64::new(0),
            terminations_from: AtomicI64::new(NO_TERMINATIONS_DUE),
        })
    }

    /// This broker with its session checked every `every`, each check given `patience`.
    #[cfg(test)]
    fn with_keepalive(mut self: Arc<Self>, every: Duration, patience: Duration) -> Arc<Self> {
        if let Some(broker) = Arc::get_mut(&mut self) {
            broker.keepalive = (every, patience);
        }
        self
    }

    /// How many LISTEN sessions this node has opened: 1 once [`PostgresBroker::listen`]
    /// returns, and one more each time a lost session is re-opened (after its cache serves
    /// again, before it catches up).
    pub fn sessions_opened(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sessions.subscribe()
    }

    /// A session listens: the cache serves again, from empty.
    fn opened(&self) {
        if self.links_good_at.load(Ordering::Relaxed) == 0 {
            self.links_good_at
                .store(self.clock.now().timestamp_millis(), Ordering::Relaxed);
        }
        self.listening.store(true, Ordering::Relaxed);
        self.metrics.listening.set(1);
        self.metrics.listen_sessions_opened_total.inc();
        self.with_cache(Cache::resume);
        self.config_may_have_changed();
        self.sessions.send_modify(|n| *n += 1);
    }

    /// Calls `hook` whenever the cluster's configuration (apps, endpoints, tokens, sources)
    /// may have changed on another node: at each [`CONFIG_CHANNEL`] notice, and when a session
    /// opens (what was notified while none listened went unheard). It must return at once:
    /// it runs on the LISTEN session's loop. Call before [`PostgresBroker::listen`].
    pub fn on_config_change(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.config_changed.set(hook);
    }

    fn config_may_have_changed(&self) {
        if let Some(hook) = self.config_changed.get() {
            hook();
        }
    }

    /// Keeps the store's node cache (`PostgresStore::cache`) in step with the cluster: resumed
    /// once the LISTEN session hears [`CONFIG_CHANNEL`], emptied on each notification there
    /// and whenever the session was re-opened (what was notified meanwhile went unheard), and
    /// paused while the session is lost. Call before [`PostgresBroker::listen`].
    pub fn keep_cache(&self, cache: Arc<Cache>) {
        let _ = self.cache.set(cache);
    }

    fn with_cache(&self, change: impl FnOnce(&Cache)) {
        if let Some(cache) = self.cache.get() {
            change(cache);
        }
    }

    /// The bus publications travel on, if not NOTIFY.
    pub fn bus(&self) -> Option<&Arc<dyn Bus>> {
        self.bus.as_ref()
    }

    /// Where presence notices that refer to the record are read (a member's `user_info`
    /// too large for its notice): the one [`PostgresBroker::record_presence_in`] named, else
    /// the PostgreSQL tables.
    fn presence_record(&self) -> Arc<dyn PresenceRecord> {
        match self.presence.get() {
            Some(record) => Arc::clone(record),
            None => Arc::new(crate::presence::postgres::PostgresRecord::new(
                self.pool.clone(),
            )),
        }
    }

    /// The presence record of this cluster, when it is not the PostgreSQL one (a presence
    /// record on the bus's engine announces its notices on the bus).
    pub fn record_presence_in(&self, record: Arc<dyn PresenceRecord>) {
        let _ = self.presence.set(record);
    }

    /// Whether the LISTEN session is open: while it is not, this node hears no other node.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// This node's name in notifications.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Holds the LISTEN session until `shutdown`: hands what it hears to the hub, re-opens a
    /// lost session (with backoff) and then catches up, and sweeps old payload rows.
    /// Opens the first LISTEN session: call it before the node serves, so a client it admits
    /// never misses what another node publishes meanwhile. Hand the session to
    /// [`PostgresBroker::run`].
    pub async fn listen(&self) -> Result<Session, sqlx::Error> {
        let listener = self.try_open().await?;
        self.opened();
        Ok(Session(listener))
    }

    pub async fn run(self: Arc<Self>, first: Session, shutdown: CancellationToken) {
        match self.bus.clone() {
            Some(bus) => {
                let hearing = Arc::clone(&self) as Arc<dyn Hearing>;
                tokio::join!(
                    Arc::clone(&self).hold_session(first, shutdown.clone()),
                    bus.run(hearing, shutdown),
                );
            }
            None => self.hold_session(first, shutdown).await,
        }
    }

    /// The LISTEN session's loop (see [`PostgresBroker::run`]).
    async fn hold_session(self: Arc<Self>, first: Session, shutdown: CancellationToken) {
        let mut retry = tokio::time::interval(RETRY_MISSED);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconnecting = false;
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (every, patience) = self.keepalive;
        let mut first = Some(first.0);
        loop {
            let opened = match first.take() {
                Some(listener) => Some(listener),
                None => self.open(&shutdown).await,
            };
            let Some(mut listener) = opened else {
                return;
            };
            if reconnecting {
                self.opened();
                tracing::info!(
                    node = self.node,
                    "broker: LISTEN session re-opened; catching up"
                );
                self.catch_up().await;
                // Off the session's loop: one read per app this node serves, which the
                // notices queued meanwhile need not wait for.
                let broker = Arc::clone(&self);
                tokio::spawn(async move { broker.close_apps_deleted_meanwhile().await });
                // Only if presence notices come by NOTIFY: a presence record on the bus's
                // engine sends them on the bus, whose own resume resyncs them.
                if self.presence.get().is_none() {
                    self.resync_presence().await;
                }
            }
            (self.wake_deliveries)(DueLanes::Any);
            reconnecting = true;
            let mut keepalive =
                tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let mut check = false;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = sweep.tick() => self.sweep().await,
                    _ = keepalive.tick() => check = true,
                    // Always polled, the flags read when it ticks: as a branch condition
                    // they were read when the select began, so a flag the bus's side set
                    // meanwhile (a history event it could not hand on, a replay that failed
                    // in its resume) waited for the next keep-alive, 15 s, not a second.
                    _ = retry.tick() => {
                        if (self.missed.load(Ordering::Relaxed)
                            || self.terminations_from.load(Ordering::Relaxed) != NO_TERMINATIONS_DUE)
                            && self.bus.as_ref().is_none_or(|bus| bus.is_connected())
                        {
                            if self.catch_up_due() && self.missed.swap(false, Ordering::Relaxed) {
                                tracing::info!(node = self.node, "broker: catching up history events that could not be sent or handed on");
                                self.catch_up().await;
                            }
                            self.replay_terminations().await;
                        }
                    }
                    received = listener.try_recv() => match received {
                        Ok(Some(notification)) => {
                            self.hear(notification.channel(), notification.payload()).await;
                        }
                        // The connection was lost (see `try_open`): re-opened above, after
                        // which the cache serves again and the node catches up.
                        Ok(None) => {
                            self.lost();
                            tracing::warn!(node = self.node, "broker: LISTEN session lost; re-opening");
                            break;
                        }
                        Err(e) => {
                            self.lost();
                            tracing::warn!(node = self.node, error = %e, "broker: LISTEN session lost; re-opening");
                            break;
                        }
                    },
                }
                if check {
                    let answered =
                        tokio::time::timeout(patience, read_clock(&mut listener, &self.clock))
                            .await;
                    self.note_bus();
                    let answered = matches!(answered, Ok(Ok(_)));
                    if answered && self.bus.as_ref().is_none_or(|bus| bus.is_connected()) {
                        self.links_good_at
                            .store(self.clock.now().timestamp_millis(), Ordering::Relaxed);
                    }
                    if !answered {
                        self.lost();
                        tracing::warn!(
                            node = self.node,
                            ?patience,
                            "broker: LISTEN session did not answer its check; re-opening"
                        );
                        break;
                    }
                }
            }
        }
    }

    /// The session is gone: nothing from the other nodes is heard, and the cache, which
    /// could no longer hear their changes, pauses until a new session listens.
    fn lost(&self) {
        self.listening.store(false, Ordering::Relaxed);
        self.metrics.listening.set(0);
        self.metrics.listen_sessions_lost_total.inc();
        self.with_cache(Cache::pause);
    }

    /// Sets the bus's gauge from what the bus says now.
    fn note_bus(&self) {
        if let Some(bus) = &self.bus {
            self.metrics
                .bus_connected
                .set(i64::from(bus.is_connected()));
        }
    }

    /// Opens a LISTEN session on every channel the broker hears, retrying with backoff until it
    /// succeeds or `shutdown`.
    async fn open(&self, shutdown: &CancellationToken) -> Option<PgListener> {
        let mut wait = RECONNECT_FIRST;
        loop {
            // Bounded: a connection that hangs without an error (as the lost one did) is
            // given up and tried again.
            match tokio::time::timeout(self.keepalive.1, self.try_open()).await {
                Ok(Ok(listener)) => return Some(listener),
                Ok(Err(e)) => {
                    tracing::warn!(node = self.node, error = %e, retry_in = ?wait, "broker: cannot open the LISTEN session");
                }
                Err(_) => {
                    tracing::warn!(node = self.node, retry_in = ?wait, "broker: opening the LISTEN session did not finish in time");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RECONNECT_LAST);
        }
    }

    /// One attempt at a LISTEN session on every channel the broker hears.
    async fn try_open(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        // A lost connection is reported at once (`Ok(None)`) and re-opened by `hold_session`,
        // which pauses the cache meanwhile; sqlx would re-open it first, unannounced.
        listener.eager_reconnect(false);
        if self.schema.get().is_none() {
            let schema: String = sqlx::query_scalar("SELECT current_schema()")
                .fetch_one(&mut listener)
                .await?;
            let _ = self.schema.set(schema);
        }
        let control = [
            DELIVERIES_CHANNEL,
            CONTROL_CHANNEL,
            CONFIG_CHANNEL,
            crate::presence::PRESENCE_CHANNEL,
        ];
        if self.bus.is_none() {
            listener
                .listen_all([HISTORY_CHANNEL, PUBLICATIONS_CHANNEL])
                .await?;
        }
        listener.listen_all(control).await?;
        Ok(listener)
    }

    async fn hear(&self, channel: &str, payload: &str) {
        let heard = match channel {
            HISTORY_CHANNEL => self.hear_history(payload).await,
            PUBLICATIONS_CHANNEL => self.hear_publication(payload).await,
            CONTROL_CHANNEL => self.hear_control(payload),
            // Another deployment's schema in the same database changes nothing here.
            CONFIG_CHANNEL => {
                if self.schema.get().is_none_or(|schema| schema == payload) {
                    self.with_cache(Cache::invalidate);
                    self.config_may_have_changed();
                }
                Ok(())
            }
            DELIVERIES_CHANNEL => {
                (self.wake_deliveries)(DueLanes::of_payload(payload));
                Ok(())
            }
            crate::presence::PRESENCE_CHANNEL => {
                let record = self.presence_record();
                crate::presence::hear(&self.hub, record.as_ref(), &self.node, payload).await
            }
            _ => Ok(()),
        };
        if let Err(e) = heard {
            self.metrics.notice_failed(NoticeVia::Notify);
            tracing::warn!(node = self.node, channel, error = %e, "broker: a notification could not be handed on");
            if channel == HISTORY_CHANNEL {
                // Read from the store at the next retry tick, not lost until the channel's
                // next event (or for good, if it was the last).
                self.missed.store(true, Ordering::Relaxed);
            }
        }
    }

    /// A committed history entry: to this node's subscribers of its channel, if any.
    async fn hear_history(&self, payload: &str) -> Result<(), String> {
        let notice: HistoryNotice =
            serde_json::from_str(payload).map_err(|e| format!("history notice: {e}"))?;
        let app_id = AppId::parse(&notice.app_id).map_err(|e| format!("app id: {e}"))?;
        let Some(app) = self.hub.existing(&app_id) else {
            return Ok(());
        };
        if app.channel_info(&notice.channel).is_none() {
            return Ok(());
        }
        // Offsets an earlier notice failed to hand on come first, from the store.
        self.hear_ordered(&app, &notice.channel, notice.offset)
            .await?;
        let entry = match notice.entry() {
            Some(entry) => entry,
            None => self
                .read_entry(&app_id, &notice.channel, notice.offset)
                .await?
                .ok_or_else(|| {
                    format!(
                        "offset {} of {} is no longer kept (retention ran first)",
                        notice.offset, notice.channel
                    )
                })?,
        };
        let publication = Publication::from_history(&entry).except(notice.except);
        app.broadcast(&Arc::new(publication));
        Ok(())
    }

    /// A publication heard on the bus.
    async fn hear_bus(&self, payload: &[u8]) -> Result<(), String> {
        // A presence notice (`P` and its JSON), from a presence record on the bus's engine.
        if let Some(notice) = payload.strip_prefix(PRESENCE_NOTICE_MARK) {
            let notice =
                std::str::from_utf8(notice).map_err(|e| format!("presence notice: {e}"))?;
            let record = self.presence_record();
            return crate::presence::hear(&self.hub, record.as_ref(), &self.node, notice).await;
        }
        let message: BusMessage =
            serde_json::from_slice(payload).map_err(|e| format!("bus message: {e}"))?;
        let app_id =
            AppId::parse(&message.publication.app_id).map_err(|e| format!("app id: {e}"))?;
        let Some(app) = self.hub.existing(&app_id) else {
            return Ok(());
        };
        let (Some(epoch), Some(offset)) = (message.epoch, message.offset) else {
            if message.node != self.node {
                app.broadcast(&Arc::new(message.publication.into_publication()?));
            }
            return Ok(());
        };
        let channel = message.publication.channel.clone();
        if app.channel_info(&channel).is_none() {
            return Ok(());
        }
        self.hear_ordered(&app, &channel, offset).await?;
        let publication = if message.by_reference {
            let entry = self
                .read_entry(&app_id, &channel, offset)
                .await?
                .ok_or_else(|| {
                    format!("offset {offset} of {channel} is no longer kept (retention ran first)")
                })?;
            Publication::from_history(&entry).except(message.publication.except)
        } else {
            message
                .publication
                .into_publication()?
                .with_position(Some(Position { epoch, offset }))
        };
        app.broadcast(&Arc::new(publication));
        Ok(())
    }

    /// Before `offset` of a history channel goes to this node's subscribers: if they need
    /// earlier offsets, those were committed before it (see the module doc) and are read from
    /// the store and handed on first, in order: a few dozen at a time, each read handed on
    /// before the next (events may be as large as an API message, and a node that fell
    /// behind may find hundreds missing), at most [`CATCH_UP_LIMIT`] in all.
    async fn hear_ordered(
        &self,
        app: &herald_channels::hub::AppHub,
        channel: &str,
        offset: u64,
    ) -> Result<(), String> {
        let Some(from) = app.catch_up_from(channel) else {
            return Ok(());
        };
        let mut after = from;
        let mut handed = 0;
        while offset > after.saturating_add(1) && handed < CATCH_UP_LIMIT {
            let limit = CATCH_UP_READ.min(CATCH_UP_LIMIT - handed);
            let publications = herald_channels::history::kept_between(
                self.store.as_ref(),
                app.app_id(),
                channel,
                after,
                offset,
                u64::from(limit),
            )
            .await
            .map_err(|e| format!("reading offsets {after}..{offset} of {channel}: {e}"))?;
            for publication in &publications {
                app.broadcast(publication);
            }
            handed += u32::try_from(publications.len()).unwrap_or(u32::MAX);
            match publications.last().and_then(|p| p.offset()) {
                Some(last) if publications.len() == limit as usize => after = last,
                _ => break,
            }
        }
        Ok(())
    }

    /// The bus messages for `publications`, and those handed to this node's hub already.
    fn bus_messages(
        &self,
        bus: &dyn Bus,
        publications: &[Arc<Publication>],
    ) -> Result<(Vec<Bytes>, usize), BrokerError> {
        let mut messages = Vec::with_capacity(publications.len());
        let mut sent = 0;
        for publication in publications {
            let position = publication.position.as_ref();
            if position.is_none() {
                sent += self
                    .hub
                    .existing(&publication.app_id)
                    .map_or(0, |app| app.broadcast(publication));
            }
            let mut message = BusMessage {
                node: self.node.clone(),
                publication: NoticedPublication::of(publication),
                epoch: position.map(|p| p.epoch.clone()),
                offset: position.map(|p| p.offset),
                by_reference: false,
            };
            let mut encoded = encode(&message)?;
            if encoded.len() > bus.max_message_bytes() {
                if position.is_none() {
                    // Nothing else to send it by: this node's subscribers have it, the
                    // others do not (the operator raises the bus's limit).
                    tracing::error!(
                        node = self.node,
                        engine = bus.engine(),
                        size = encoded.len(),
                        limit = bus.max_message_bytes(),
                        channel = publication.channel,
                        "broker: a publication is larger than the bus takes; other nodes' subscribers do not get it"
                    );
                    continue;
                }
                message.publication.data = String::new();
                message.by_reference = true;
                encoded = encode(&message)?;
            }
            messages.push(Bytes::from(encoded));
        }
        Ok((messages, sent))
    }

    /// One kept event, by offset.
    async fn read_entry(
        &self,
        app_id: &AppId,
        channel: &str,
        offset: u64,
    ) -> Result<Option<HistoryEntry>, String> {
        let entries = self
            .store
            .history(
                app_id,
                channel,
                &HistoryQuery {
                    after: Some(offset.saturating_sub(1)),
                    before: Some(offset.saturating_add(1)),
                    limit: 1,
                    newest_first: false,
                    not_before: chrono::DateTime::<Utc>::MIN_UTC,
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(entries.into_iter().next())
    }

    /// Closes the connections of this node's apps that were deleted on another node while
    /// this node's LISTEN session was down: the notice that would have closed them went
    /// unheard, and nothing else would (a connection re-reads its app only to authorize a
    /// private channel or a sign-in).
    async fn close_apps_deleted_meanwhile(&self) {
        for app in self.hub.apps() {
            if app.is_removed() {
                continue;
            }
            match self.store.get_app(app.app_id().as_str()).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::info!(node = self.node, app = %app.app_id(),
                        "broker: an app deleted while the LISTEN session was down: closing its connections");
                    self.hub.remove_app(app.app_id());
                }
                Err(e) => tracing::warn!(node = self.node, app = %app.app_id(), error = %e,
                    "broker: could not check whether an app still exists"),
            }
        }
    }

    /// Another node's instruction.
    fn hear_control(&self, payload: &str) -> Result<(), String> {
        let notice: ControlNotice =
            serde_json::from_str(payload).map_err(|e| format!("control notice: {e}"))?;
        if notice.node == self.node {
            return Ok(());
        }
        if let Some(app_id) = notice.removed_app {
            let app_id = AppId::parse(&app_id).map_err(|e| format!("app id: {e}"))?;
            self.hub.remove_app(&app_id);
        }
        if notice.catch_up {
            // Caught up at the next retry tick at which this node's bus link is up.
            self.missed.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Another node's publication on a channel without history.
    async fn hear_publication(&self, payload: &str) -> Result<(), String> {
        let notice: PublicationNotice =
            serde_json::from_str(payload).map_err(|e| format!("publication notice: {e}"))?;
        if notice.node == self.node {
            return Ok(());
        }
        let noticed = match (notice.publication, notice.reference) {
            (Some(publication), _) => publication,
            (None, Some(reference)) => {
                let body: Option<String> =
                    sqlx::query_scalar("SELECT body FROM broker_payloads WHERE id = $1")
                        .bind(reference)
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(|e| e.to_string())?;
                let body = body.ok_or_else(|| format!("payload {reference} is gone"))?;
                serde_json::from_str(&body).map_err(|e| format!("payload {reference}: {e}"))?
            }
            (None, None) => return Err("a notice with neither publication nor reference".into()),
        };
        let app_id = AppId::parse(&noticed.app_id).map_err(|e| format!("app id: {e}"))?;
        if let Some(app) = self.hub.existing(&app_id) {
            app.broadcast(&Arc::new(noticed.into_publication()?));
        }
        Ok(())
    }

    /// After a lost LISTEN session: each history channel with live subscribers here gets, in
    /// order, what was kept after the oldest position among them (each subscriber drops what it
    /// has). Returns how many events were handed on. A read that fails ends the pass, and the
    /// whole catch-up is tried again later (`missed` is set; see `catch_up_failures`): the
    /// live subscribers have no reason to subscribe again, and a channel may never publish
    /// again to fill the gap.
    pub async fn catch_up(&self) -> usize {
        let mut handed = 0;
        let mut failed = 0;
        'pass: for app in self.hub.apps() {
            for (channel, _) in app.channels("") {
                let Some(mut from) = app.catch_up_from(&channel) else {
                    continue;
                };
                let mut read = 0;
                while read < CATCH_UP_LIMIT {
                    let limit = CATCH_UP_READ.min(CATCH_UP_LIMIT - read);
                    let entries = self
                        .store
                        .history(
                            app.app_id(),
                            &channel,
                            &HistoryQuery {
                                after: Some(from),
                                before: None,
                                limit,
                                newest_first: false,
                                not_before: chrono::DateTime::<Utc>::MIN_UTC,
                            },
                        )
                        .await;
                    let entries = match entries {
                        Ok(entries) => entries,
                        Err(e) => {
                            // The rest of the pass waits too: the store is failing, and this
                            // runs inside the LISTEN loop, whose notices would wait for a read
                            // of every other channel.
                            if failed == 0 {
                                tracing::warn!(node = self.node, channel, error = %e, "broker: catching up a channel failed; tried again after a wait that doubles while it fails (at most {MAX_CATCH_UP_WAIT:?})");
                            }
                            failed += 1;
                            break 'pass;
                        }
                    };
                    for entry in &entries {
                        app.broadcast(&Arc::new(Publication::from_history(entry)));
                    }
                    handed += entries.len();
                    read += u32::try_from(entries.len()).unwrap_or(u32::MAX);
                    match entries.last() {
                        Some(last) if entries.len() == limit as usize => from = last.offset,
                        _ => break,
                    }
                }
            }
        }
        {
            let mut failures = self
                .catch_up_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *failures = if failed > 0 {
                let wait = RETRY_MISSED
                    .saturating_mul(1 << failures.0.min(5))
                    .min(MAX_CATCH_UP_WAIT);
                (
                    failures.0.saturating_add(1),
                    Some(tokio::time::Instant::now() + wait),
                )
            } else {
                (0, None)
            };
        }
        if failed > 0 {
            self.missed.store(true, Ordering::Relaxed);
        }
        self.metrics.caught_up(handed);
        handed
    }

    /// Whether the retry tick may catch up now (see `catch_up_failures`).
    fn catch_up_due(&self) -> bool {
        let failures = self
            .catch_up_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failures
            .1
            .is_none_or(|not_before| tokio::time::Instant::now() >= not_before)
    }

    /// After a lost link: this node's presence subscribers are told the member notices they
    /// missed ([`crate::presence::resync`]).
    async fn resync_presence(&self) {
        let record = self.presence_record();
        let sent = crate::presence::resync(&self.hub, record.as_ref(), &self.node).await;
        if sent > 0 {
            tracing::info!(
                node = self.node,
                sent,
                "broker: presence subscribers told of member changes they missed"
            );
        }
        self.metrics
            .presence_resync_notices_total
            .inc_by(u64::try_from(sent).unwrap_or(u64::MAX));
        // Terminations travel with the presence notices: those sent meanwhile were missed
        // too. From a check period before the links were last known good (a bus that dropped
        // and came back between two checks looked connected at both), less the second by
        // which nodes' readings of the cluster's time may differ.
        let from = match self.links_good_at.load(Ordering::Relaxed) {
            0 => 0,
            good_at => good_at.saturating_sub(
                i64::try_from((self.keepalive.0 + Duration::from_secs(2)).as_millis())
                    .unwrap_or(i64::MAX),
            ),
        };
        // An earlier start asked for and not yet applied stays.
        let _ = self
            .terminations_from
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |due| {
                Some(if due == NO_TERMINATIONS_DUE {
                    from
                } else {
                    due.min(from)
                })
            });
        self.replay_terminations().await;
    }

    /// Applies the terminations kept from `terminations_from` on ([`crate::terminations`]),
    /// if any are due; one that fails (the database slow or away) is tried again at the next
    /// retry tick.
    async fn replay_terminations(&self) {
        let from = self.terminations_from.load(Ordering::Relaxed);
        if from == NO_TERMINATIONS_DUE {
            return;
        }
        let replayed = tokio::time::timeout(
            REPLAY_PATIENCE,
            crate::terminations::replay(&self.pool, &self.hub, &self.clock, from),
        )
        .await;
        match replayed {
            Ok(Ok(closed)) => {
                // Unless a later loss asked for an earlier start meanwhile.
                let _ = self.terminations_from.compare_exchange(
                    from,
                    NO_TERMINATIONS_DUE,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if closed > 0 {
                    tracing::info!(
                        node = self.node,
                        closed,
                        "broker: connections closed by terminate_connections sent while this node's link was down"
                    );
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(node = self.node, error = %e, "broker: reading the terminations this node may have missed failed; trying again shortly")
            }
            Err(_) => {
                tracing::warn!(node = self.node, patience = ?REPLAY_PATIENCE, "broker: reading the terminations this node may have missed took too long; trying again shortly")
            }
        }
    }

    /// Deletes large publications' rows older than [`PAYLOAD_KEEP`].
    async fn sweep(&self) {
        let before =
            self.clock.now() - chrono::Duration::from_std(PAYLOAD_KEEP).unwrap_or_default();
        if let Err(e) = sqlx::query("DELETE FROM broker_payloads WHERE created_at < $1")
            .bind(before.timestamp_millis())
            .execute(&self.pool)
            .await
        {
            tracing::warn!(node = self.node, error = %e, "broker: sweeping old payloads failed");
        }
    }

    /// The notification payload for `publication`: whole if it fits, else by reference to a
    /// new `broker_payloads` row.
    async fn notice(&self, publication: &Publication) -> Result<String, BrokerError> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let noticed = NoticedPublication::of(publication);
        let mut notice = PublicationNotice {
            node: self.node.clone(),
            sequence,
            publication: Some(noticed),
            reference: None,
        };
        let whole = encode(&notice)?;
        if whole.len() <= MAX_NOTICE_BYTES {
            return Ok(whole);
        }
        let body = encode(&notice.publication)?;
        let reference: i64 = sqlx::query_scalar(
            "INSERT INTO broker_payloads (body, created_at) VALUES ($1, $2) RETURNING id",
        )
        .bind(body)
        .bind(self.clock.now().timestamp_millis())
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        notice.publication = None;
        notice.reference = Some(reference);
        encode(&notice)
    }
}

fn encode<T: Serialize>(value: &T) -> Result<String, BrokerError> {
    serde_json::to_string(value).map_err(|e| BrokerError::Unavailable(format!("encoding: {e}")))
}

impl PostgresBroker {
    /// Sends `notice` to every node on [`CONTROL_CHANNEL`] (PostgreSQL carries control notices
    /// whatever the bus).
    async fn notify_control(&self, notice: ControlNotice) -> Result<(), BrokerError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CONTROL_CHANNEL)
            .bind(encode(&notice)?)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Tells every node to catch its history subscribers up from the store
    /// ([`ControlNotice::catch_up`]). Best effort: with PostgreSQL unreachable too, the
    /// publication failed anyway.
    async fn tell_others_to_catch_up(&self) {
        let notice = ControlNotice {
            node: self.node.clone(),
            removed_app: None,
            catch_up: true,
        };
        if let Err(e) = self.notify_control(notice).await {
            tracing::warn!(node = self.node, error = %e, "broker: could not ask the other nodes to catch up");
        }
    }
}

fn unavailable(e: sqlx::Error) -> BrokerError {
    BrokerError::Unavailable(format!("PostgreSQL: {e}"))
}

#[async_trait::async_trait]
impl Broker for PostgresBroker {
    async fn remove_app(&self, app_id: &AppId) -> Result<(), BrokerError> {
        self.hub.remove_app(app_id);
        self.notify_control(ControlNotice {
            node: self.node.clone(),
            removed_app: Some(app_id.as_str().to_owned()),
            catch_up: false,
        })
        .await
    }

    fn is_ready(&self) -> bool {
        self.is_listening() && self.bus.as_ref().is_none_or(|bus| bus.is_connected())
    }

    async fn publish(&self, publications: &[Arc<Publication>]) -> Result<usize, BrokerError> {
        if let Some(bus) = &self.bus {
            let (messages, sent) = self.bus_messages(bus.as_ref(), publications)?;
            if messages.is_empty() {
                return Ok(sent);
            }
            if let Err(e) = bus.send(messages).await {
                self.missed.store(true, Ordering::Relaxed);
                self.metrics.bus_sends_failed_total.inc();
                self.note_bus();
                if publications.iter().any(|p| p.position.is_some()) {
                    self.tell_others_to_catch_up().await;
                }
                return Err(BrokerError::Unavailable(e.to_string()));
            }
            return Ok(sent);
        }
        // History channels' publications were announced by their commit (see the module doc).
        let others: Vec<&Arc<Publication>> = publications
            .iter()
            .filter(|p| p.position.is_none())
            .collect();
        if others.is_empty() {
            return Ok(0);
        }
        let sent = others
            .iter()
            .map(|p| {
                self.hub
                    .existing(&p.app_id)
                    .map_or(0, |app| app.broadcast(p))
            })
            .sum();
        let mut notices = Vec::with_capacity(others.len());
        for publication in &others {
            notices.push(self.notice(publication).await?);
        }
        // One statement, one transaction: delivered together, in this order.
        sqlx::query(
            "SELECT pg_notify($1, notice)
             FROM unnest($2::text[]) WITH ORDINALITY AS n(notice, ord)
             ORDER BY ord",
        )
        .bind(PUBLICATIONS_CHANNEL)
        .bind(&notices)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(sent)
    }
}

#[async_trait::async_trait]
impl Hearing for PostgresBroker {
    async fn message(&self, payload: Bytes) {
        if let Err(e) = self.hear_bus(&payload).await {
            self.metrics.notice_failed(NoticeVia::Bus);
            tracing::warn!(node = self.node, error = %e, "broker: a bus message could not be handed on");
            // A history event: caught up from the store at the next retry tick, not held until
            // the channel's next event. Presence notices and publications without an offset
            // have nothing to catch up, and neither has a message that is not Herald's (the
            // topic may be shared): catching up for each would read every history channel.
            let history = !payload.starts_with(PRESENCE_NOTICE_MARK)
                && serde_json::from_slice::<BusMessage>(&payload)
                    .is_ok_and(|message| message.offset.is_some());
            if history {
                self.missed.store(true, Ordering::Relaxed);
            }
        }
    }

    async fn resumed(&self) {
        self.note_bus();
        self.catch_up().await;
        // Only if presence notices ride the bus (a record on its engine).
        if self.presence.get().is_some() {
            self.resync_presence().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_schema::Schema;
    use herald_channels::{Outgoing, hub::Outbox};
    use herald_core::history::{NewHistoryEntry, Retention};
    use herald_store::prelude::*;

    fn entry(app_id: &AppId, n: u64) -> NewHistoryEntry {
        NewHistoryEntry {
            app_id: app_id.clone(),
            channel: "history-c".into(),
            event: "note".into(),
            data: format!("n{n}"),
            raw_json: false,
            user_id: None,
            created_at: Utc::now(),
            retention: Retention {
                max_events: 100,
                max_age: Duration::from_secs(3600),
            },
            first_epoch: None,
            except: None,
        }
    }

    /// A bus message for a kept event, as the publishing node sends it.
    fn message(app_id: &AppId, position: &Position, n: u64) -> Vec<u8> {
        let publication = Publication::new(
            app_id,
            "history-c",
            "note",
            EventData::text(format!("n{n}")),
        );
        serde_json::to_vec(&BusMessage {
            node: "other".into(),
            publication: NoticedPublication::of(&publication),
            epoch: Some(position.epoch.clone()),
            offset: Some(position.offset),
            by_reference: false,
        })
        .expect("encodes")
    }

    /// The ids of `app_id`'s endpoints, as `store` reads them.
    async fn endpoints(
        store: &herald_store::postgres::PostgresStore,
        app_id: &AppId,
    ) -> Vec<String> {
        let list = store.app_endpoints(app_id).await.expect("endpoints");
        list.iter().map(|e| e.id.to_string()).collect()
    }

    /// Ends the LISTEN session of the store opened as `name` (`Schema::store_named`) from the
    /// server's side, as a restart or a dropped connection would.
    async fn cut_listen_session(schema: &Schema, name: &str) {
        let cut: Vec<i32> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid)::int FROM pg_stat_activity
             WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        )
        .bind(name)
        .fetch_all(&schema.pool().await)
        .await
        .expect("cut the session");
        assert_eq!(cut, [1], "one LISTEN session");
    }

    /// While a node listens, the apps' endpoint lists it reads come from its memory; another
    /// node's change reaches them when the change's notification arrives, and a change whose
    /// notification this node never heard (its session was lost) once the session re-opens.
    #[tokio::test]
    async fn the_node_cache_follows_other_nodes_changes_through_notifications_and_lost_sessions() {
        let Some(schema) = Schema::create("node cache").await else {
            return;
        };
        let name = format!("herald_cache_{}", crate::new_node_id().to_lowercase());
        let here = Arc::new(schema.store_named(&name).await);
        let other = schema.store().await;
        let metrics = Arc::new(ClusterMetrics::default());
        let broker = PostgresBroker::new(
            "here".into(),
            here.pool().clone(),
            Arc::new(Hub::default()),
            Arc::clone(&here) as Arc<dyn Store>,
            Box::new(|_| {}),
            None,
            Arc::clone(&metrics),
        );
        let mut sessions = broker.sessions_opened();
        broker.keep_cache(here.cache());
        // Made before the session listens, so that its notification is not heard later on.
        let app = herald_store::conformance::stored_app(&other, "cache").await;
        assert!(
            !here.cache().is_serving(),
            "paused until the session listens"
        );
        let session = broker.listen().await.expect("listen");
        assert!(here.cache().is_serving());
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(Arc::clone(&broker).run(session, shutdown.clone()));
        assert!(endpoints(&here, &app.id).await.is_empty());

        // A change whose notification never comes (the trigger off for it) is not seen: the
        // list is served from memory.
        let admin = schema.pool().await;
        let trigger = |on: bool| {
            let sql = format!(
                "ALTER TABLE endpoints {} TRIGGER endpoints_config_changed",
                if on { "ENABLE" } else { "DISABLE" }
            );
            let admin = admin.clone();
            async move {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&admin)
                    .await
                    .expect("alter the trigger");
            }
        };
        trigger(false).await;
        let unheard = herald_store::conformance::endpoint(&app.id);
        other.create_endpoint(&unheard).await.expect("create");
        trigger(true).await;
        assert!(
            endpoints(&here, &app.id).await.is_empty(),
            "read from memory"
        );
        assert_eq!(endpoints(&other, &app.id).await, [unheard.id.to_string()]);

        // A change with its notification: seen once it has arrived.
        let heard = herald_store::conformance::endpoint(&app.id);
        other.create_endpoint(&heard).await.expect("create");
        let mut both = vec![unheard.id.to_string(), heard.id.to_string()];
        both.sort();
        tokio::time::timeout(Duration::from_secs(10), async {
            while endpoints(&here, &app.id).await != both {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the notification empties the cache");

        // Another unheard change, then the session is lost: re-opened, it serves afresh.
        trigger(false).await;
        other
            .delete_endpoint(&app.id, &unheard.id)
            .await
            .expect("delete");
        trigger(true).await;
        assert_eq!(endpoints(&here, &app.id).await, both, "read from memory");
        cut_listen_session(&schema, &name).await;
        tokio::time::timeout(Duration::from_secs(10), sessions.wait_for(|n| *n == 2))
            .await
            .expect("re-opened in time")
            .expect("the broker runs");
        assert!(here.cache().is_serving());
        assert_eq!(endpoints(&here, &app.id).await, [heard.id.to_string()]);
        // What an operator sees of it: two sessions opened, one lost, listening again, and
        // the catch-up that follows the re-open.
        assert_eq!(metrics.listen_sessions_opened_total.get(), 2);
        assert_eq!(metrics.listen_sessions_lost_total.get(), 1);
        assert_eq!(metrics.listening.get(), 1);
        assert_eq!(metrics.bus_connected.get(), 0, "no bus");
        tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.catch_ups_total.get() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the re-open's catch-up is counted");
        assert_eq!(
            metrics.caught_up_events_total.get(),
            0,
            "nobody to catch up"
        );

        shutdown.cancel();
        running.await.expect("the broker stops");
        schema.drop_now().await;
    }

    /// A bus that refuses every send, or takes them and delivers nothing.
    struct TestBus {
        refuses: bool,
    }

    #[async_trait::async_trait]
    impl crate::bus::Bus for TestBus {
        fn engine(&self) -> &'static str {
            "test"
        }

        async fn send(&self, _messages: Vec<bytes::Bytes>) -> Result<(), crate::bus::BusError> {
            if self.refuses {
                return Err(crate::bus::BusError::Unavailable {
                    engine: "test",
                    reason: "refused by the test".into(),
                });
            }
            Ok(())
        }

        fn max_message_bytes(&self) -> usize {
            1 << 20
        }

        fn is_connected(&self) -> bool {
            true
        }

        async fn run(
            self: Arc<Self>,
            _hearing: Arc<dyn crate::bus::Hearing>,
            shutdown: CancellationToken,
        ) {
            shutdown.cancelled().await;
        }
    }

    /// A node whose history publication could not go out on the bus tells the other nodes,
    /// through PostgreSQL, to catch their history subscribers up from the store: they hear
    /// such publications from the bus only, and would otherwise wait for the channel's next.
    #[tokio::test]
    async fn a_history_publication_the_bus_refused_makes_every_node_catch_up() {
        let Some(schema) = Schema::create("bus send refused").await else {
            return;
        };
        let store = Arc::new(schema.store().await);
        let node = |name: &str, refuses: bool| {
            PostgresBroker::new(
                name.into(),
                store.pool().clone(),
                Arc::new(Hub::default()),
                Arc::clone(&store) as Arc<dyn Store>,
                Box::new(|_| {}),
                Some(Arc::new(TestBus { refuses }) as Arc<dyn crate::bus::Bus>),
                Arc::default(),
            )
        };
        let (sender, other) = (node("sender", true), node("other", false));
        let session = other.listen().await.expect("listen");
        // Its retry tick would catch up and clear the flag: watch the notice's effect alone.
        let heard = Arc::clone(&other);
        let hearing = tokio::spawn(async move {
            let Session(mut listener) = session;
            while let Ok(notification) = listener.recv().await {
                heard
                    .hear(notification.channel(), notification.payload())
                    .await;
                if heard.missed.load(Ordering::Relaxed) {
                    return;
                }
            }
        });
        let app_id = herald_store::conformance::stored_app(store.as_ref(), "bus")
            .await
            .id;
        let kept = Arc::new(
            Publication::new(&app_id, "history-c", "note", EventData::text("n1")).with_position(
                Some(Position {
                    epoch: "e1".into(),
                    offset: 1,
                }),
            ),
        );
        assert!(sender.publish(&[kept]).await.is_err(), "the bus refused it");
        assert_eq!(sender.metrics.bus_sends_failed_total.get(), 1, "counted");
        assert_eq!(
            sender.metrics.bus_connected.get(),
            1,
            "the bus says it is connected: a refused send is not a lost link"
        );
        tokio::time::timeout(Duration::from_secs(10), hearing)
            .await
            .expect("the other node was told to catch up")
            .expect("hearing");
        assert!(other.missed.load(Ordering::Relaxed));
        schema.drop_now().await;
    }

    /// A broker for `hub` on `store` that hears other nodes by NOTIFY alone.
    fn broker_without_bus(
        node: &str,
        store: &Arc<herald_store::postgres::PostgresStore>,
        hub: &Arc<Hub>,
    ) -> Arc<PostgresBroker> {
        PostgresBroker::new(
            node.into(),
            store.pool().clone(),
            Arc::clone(hub),
            Arc::clone(store) as Arc<dyn Store>,
            Box::new(|_| {}),
            None,
            Arc::default(),
        )
    }

    /// An app deleted on another node while this node's LISTEN session was down (its notice
    /// unheard) has its connections here closed when the session is back; other apps' stay.
    #[tokio::test]
    async fn an_app_deleted_while_the_session_was_down_is_closed_when_it_is_back() {
        let Some(schema) = Schema::create("app deleted while not listening").await else {
            return;
        };
        let store = Arc::new(schema.store().await);
        let hub = Arc::new(Hub::default());
        let broker = broker_without_bus("node", &store, &hub);
        let kept = herald_store::conformance::stored_app(store.as_ref(), "kept").await;
        let deleted = herald_store::conformance::stored_app(store.as_ref(), "deleted").await;
        let (kept_hub, deleted_hub) = (hub.app(&kept.id), hub.app(&deleted.id));
        assert!(store.delete_app(&deleted.id).await.expect("delete"));
        broker.close_apps_deleted_meanwhile().await;
        assert!(deleted_hub.is_removed(), "its connections are told 4001");
        assert!(!kept_hub.is_removed());
        schema.drop_now().await;
    }

    /// A catch-up reads a few dozen events at a time and hands each read on before the next:
    /// more than one read's worth arrive whole and in order.
    #[tokio::test]
    async fn a_catch_up_longer_than_one_read_hands_on_every_event_in_order() {
        let Some(schema) = Schema::create("catch up in reads").await else {
            return;
        };
        let OneSubscriber {
            store,
            broker,
            app_id,
            mut frames,
            overflowed,
            ..
        } = subscriber_at(&schema, 0, 256, 0).await;
        // Within the 100 events `entry` keeps.
        let missed = u64::from(CATCH_UP_READ) + 7;
        for n in 1..=missed {
            store.append_history(entry(&app_id, n)).await.expect("kept");
        }
        assert_eq!(broker.catch_up().await, missed as usize);
        let mut offsets = Vec::new();
        while let Ok(Outgoing::Publication(p)) = frames.try_recv() {
            offsets.push(p.offset().expect("a position"));
        }
        assert_eq!(offsets, (1..=missed).collect::<Vec<_>>());
        assert!(!overflowed.is_cancelled());
        schema.drop_now().await;
    }

    /// A catch-up the store could not serve is not given up: the next retry tick (which
    /// catches up when `missed` is set) hands on what the live subscriber missed, though the
    /// channel publishes nothing more.
    #[tokio::test]
    async fn a_catch_up_the_store_could_not_serve_is_tried_again() {
        let Some(schema) = Schema::create("catch up fails").await else {
            return;
        };
        let OneSubscriber {
            store,
            broker,
            app_id,
            mut frames,
            ..
        } = subscriber_at(&schema, 0, 16, 0).await;
        for n in 1..=3 {
            store.append_history(entry(&app_id, n)).await.expect("kept");
        }
        // The history cannot be read for now (a privilege is checked when a statement runs).
        let history_read = |grant: bool| {
            let pool = store.pool().clone();
            async move {
                let statement = if grant {
                    "GRANT SELECT ON channel_history TO CURRENT_USER"
                } else {
                    "REVOKE SELECT ON channel_history FROM CURRENT_USER"
                };
                sqlx::query(statement)
                    .execute(&pool)
                    .await
                    .expect("privilege");
            }
        };
        history_read(false).await;
        assert_eq!(broker.catch_up().await, 0);
        assert!(broker.missed.load(Ordering::Relaxed), "tried again");
        // Not at the next tick: the wait doubles while the store fails.
        assert!(!broker.catch_up_due());
        assert_eq!(broker.catch_up().await, 0);
        assert_eq!(
            broker.catch_up_failures.lock().expect("lock").0,
            2,
            "two failures in a row"
        );
        history_read(true).await;
        // What the retry tick does once the wait is over.
        assert!(broker.missed.swap(false, Ordering::Relaxed));
        assert_eq!(broker.catch_up().await, 3);
        assert!(!broker.missed.load(Ordering::Relaxed), "nothing left");
        assert!(
            broker.catch_up_due(),
            "no wait after a catch-up that worked"
        );
        let mut offsets = Vec::new();
        while let Ok(Outgoing::Publication(p)) = frames.try_recv() {
            offsets.push(p.offset().expect("a position"));
        }
        assert_eq!(offsets, [1, 2, 3]);
        schema.drop_now().await;
    }

    struct NoWebhooks;

    impl herald_channels::hub::ChannelObserver for NoWebhooks {
        fn observe(&self, _: &AppId, _: herald_channels::hub::ChannelEvent) {}
    }

    /// Two nodes' presence over one PostgreSQL record: `here` (its hub the broker's, with one
    /// presence subscriber, u1, told of u1 alone) and `there`, where u2 has joined without
    /// `here` hearing of it (nothing of `here` listened yet).
    struct MissedJoin {
        hub: Arc<Hub>,
        frames: herald_channels::hub::Frames,
        stop: CancellationToken,
        runs: Vec<tokio::task::JoinHandle<()>>,
        _there_hub: Arc<Hub>,
    }

    async fn missed_join(store: &Arc<herald_store::postgres::PostgresStore>) -> MissedJoin {
        use crate::presence::{ClusterPresence, postgres::PostgresRecord};
        use herald_channels::presence::PresenceManager;
        let record: Arc<dyn crate::presence::PresenceRecord> =
            Arc::new(PostgresRecord::new(store.pool().clone()));
        let presence_on = |node: &str, hub: &Arc<Hub>| {
            ClusterPresence::new(
                node.into(),
                Arc::clone(&record),
                Arc::clone(hub),
                Arc::new(NoWebhooks) as _,
                Duration::from_secs(15),
                store.clock(),
            )
        };
        let hub = Arc::new(Hub::default());
        let here = presence_on("here", &hub);
        let there_hub = Arc::new(Hub::default());
        let there = presence_on("there", &there_hub);
        here.register().await.expect("register");
        there.register().await.expect("register");
        let stop = CancellationToken::new();
        let runs = vec![
            tokio::spawn(Arc::clone(&here).run(stop.clone(), CancellationToken::new())),
            tokio::spawn(Arc::clone(&there).run(stop.clone(), CancellationToken::new())),
        ];
        // An app of its own: NOTIFY channels are the database's, not the schema's, and other
        // tests' nodes announce members of their apps in the same database.
        let app_id = AppId::new(Utc::now());
        let (outbox, frames, _) = Outbox::new(16);
        let app = hub.app(&app_id);
        let joining = |user: &str| herald_channels::hub::Joining {
            user_id: user.into(),
            info: serde_json::value::RawValue::from_string(format!(r#"{{"name":"{user}"}}"#)).ok(),
        };
        app.subscribe_joining("presence-x", "1.1", &outbox, Some(joining("u1")), 10)
            .expect("subscribed");
        app.know_members("presence-x", "1.1", vec!["u1".into()]);
        assert!(app.go_live("presence-x", "1.1", 0, |_| {}));
        let (other_outbox, _other_frames, _) = Outbox::new(16);
        there_hub
            .app(&app_id)
            .subscribe("presence-x", "2.2", &other_outbox, Some(joining("u2")), 10)
            .expect("subscribed");
        tokio::time::timeout(Duration::from_secs(10), async {
            while !here
                .users(&app_id, "presence-x")
                .await
                .is_ok_and(|users| users.contains(&"u2".to_owned()))
            {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the other node records u2");
        MissedJoin {
            hub,
            frames,
            stop,
            runs,
            _there_hub: there_hub,
        }
    }

    impl MissedJoin {
        /// The broker of node `here`, over `bus` if any, and what it counts.
        fn broker(
            &self,
            store: &Arc<herald_store::postgres::PostgresStore>,
            bus: Option<Arc<dyn crate::bus::Bus>>,
        ) -> (Arc<PostgresBroker>, Arc<ClusterMetrics>) {
            let metrics = Arc::new(ClusterMetrics::default());
            let broker = PostgresBroker::new(
                "here".into(),
                store.pool().clone(),
                Arc::clone(&self.hub),
                Arc::clone(store) as Arc<dyn Store>,
                Box::new(|_| {}),
                bus,
                Arc::clone(&metrics),
            );
            (broker, metrics)
        }

        /// The frames the subscriber got since the last call.
        fn told(&mut self) -> Vec<String> {
            std::iter::from_fn(|| self.frames.try_recv().ok())
                .filter_map(|item| match item {
                    Outgoing::Frame(frame) => {
                        Some(String::from_utf8_lossy(frame.as_ref()).into_owned())
                    }
                    Outgoing::Publication(_) => None,
                })
                .collect()
        }

        async fn stop(self) {
            self.stop.cancel();
            for run in self.runs {
                run.await.expect("stopped");
            }
        }
    }

    fn is_u2_added(told: &[String]) -> bool {
        told.len() == 1
            && told[0].contains("member_added")
            && told[0].contains("u2")
            && told[0].contains("name")
    }

    /// A node on a bus, whose bus came back ([`Hearing::resumed`]): its presence subscribers
    /// are told of the member changes they missed, with the user_info, and counted.
    #[tokio::test]
    async fn a_bus_that_comes_back_tells_presence_subscribers_what_they_missed() {
        let Some(schema) = Schema::create("presence after a bus outage").await else {
            return;
        };
        let store = Arc::new(schema.store().await);
        let mut missed = missed_join(&store).await;
        let bus = Arc::new(TestBus { refuses: false }) as Arc<dyn crate::bus::Bus>;
        let (broker, metrics) = missed.broker(&store, Some(bus));
        // As a record on the bus's engine is (its notices ride the bus): here, the same
        // PostgreSQL rows.
        broker.record_presence_in(Arc::new(crate::presence::postgres::PostgresRecord::new(
            store.pool().clone(),
        )));
        assert!(missed.told().is_empty());
        Hearing::resumed(broker.as_ref()).await;
        let told = missed.told();
        assert!(is_u2_added(&told), "{told:?}");
        assert_eq!(metrics.presence_resync_notices_total.get(), 1);
        missed.stop().await;
        schema.drop_now().await;
    }

    /// A node whose link came back applies the `terminate_connections` sent meanwhile (kept
    /// in the database by the node that was asked) to the user's connections that signed in
    /// before it, and leaves those that signed in since alone.
    #[tokio::test]
    async fn a_link_that_comes_back_applies_the_terminations_it_missed() {
        let Some(schema) = Schema::create("terminations after a bus outage").await else {
            return;
        };
        let store = Arc::new(schema.store().await);
        let hub = Arc::new(Hub::default());
        let broker = PostgresBroker::new(
            "here".into(),
            store.pool().clone(),
            Arc::clone(&hub),
            Arc::clone(&store) as Arc<dyn Store>,
            Box::new(|_| {}),
            Some(Arc::new(TestBus { refuses: false }) as Arc<dyn crate::bus::Bus>),
            Arc::new(ClusterMetrics::default()),
        );
        broker.record_presence_in(Arc::new(crate::presence::postgres::PostgresRecord::new(
            store.pool().clone(),
        )));
        let app_id = AppId::new(Utc::now());
        let app = hub.app(&app_id);
        let (before, since, other) = (
            app.connection_token(),
            app.connection_token(),
            app.connection_token(),
        );
        app.sign_in("u1", "1.1", before.clone());
        app.sign_in("u2", "1.3", other.clone());
        // The termination falls between the two sign-ins: the clock has to move on (a
        // termination applies to what signed in before it, to the millisecond).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let at = store.clock().now().timestamp_millis();
        crate::terminations::remember(store.pool(), app_id.as_str(), "u1", at)
            .await
            .expect("kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.sign_in("u1", "1.2", since.clone());
        assert!(!before.is_cancelled(), "nothing heard yet");

        Hearing::resumed(broker.as_ref()).await;
        assert!(before.is_cancelled(), "signed in before the termination");
        assert!(!since.is_cancelled(), "signed in after it");
        assert!(!other.is_cancelled(), "another user");
        schema.drop_now().await;
    }

    /// A node without a bus, whose LISTEN session is lost and re-opened: the same, from the
    /// session's own loop, and the terminations sent meanwhile are applied.
    #[tokio::test]
    async fn a_listen_session_that_comes_back_tells_presence_subscribers_what_they_missed() {
        let Some(schema) = Schema::create("presence after a lost session").await else {
            return;
        };
        let name = format!("herald_resync_{}", crate::new_node_id().to_lowercase());
        let store = Arc::new(schema.store_named(&name).await);
        let mut missed = missed_join(&store).await;
        let (broker, metrics) = missed.broker(&store, None);
        let mut sessions = broker.sessions_opened();
        let session = broker.listen().await.expect("listen");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(Arc::clone(&broker).run(session, shutdown.clone()));
        assert!(missed.told().is_empty(), "a first session resyncs nothing");
        // A signed-in user whose termination this node will not hear: kept by the node asked.
        let terminated = AppId::new(Utc::now());
        let connection = missed.hub.app(&terminated).connection_token();
        missed
            .hub
            .app(&terminated)
            .sign_in("u9", "9.9", connection.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        crate::terminations::remember(
            store.pool(),
            terminated.as_str(),
            "u9",
            store.clock().now().timestamp_millis(),
        )
        .await
        .expect("kept");
        cut_listen_session(&schema, &name).await;
        tokio::time::timeout(Duration::from_secs(10), sessions.wait_for(|n| *n == 2))
            .await
            .expect("re-opened in time")
            .expect("the broker runs");
        tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.presence_resync_notices_total.get() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the re-open's resync is counted");
        let told = missed.told();
        assert!(is_u2_added(&told), "{told:?}");
        tokio::time::timeout(Duration::from_secs(10), async {
            while !connection.is_cancelled() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the missed termination is applied after the re-open");
        shutdown.cancel();
        running.await.expect("the broker stopped");
        missed.stop().await;
        schema.drop_now().await;
    }

    /// A TCP proxy whose connections open so far can be frozen: bytes stop flowing both ways
    /// and the sockets stay open, as with a connection a NAT or firewall dropped without a
    /// reset. Connections opened after a freeze flow.
    struct Freezer {
        addr: std::net::SocketAddr,
        /// Connections accepted so far (each is numbered in order).
        opened: Arc<AtomicU64>,
        /// Connections numbered below this are frozen.
        frozen_below: Arc<AtomicU64>,
    }

    impl Freezer {
        async fn to(upstream: String) -> Self {
            use tokio::net::{TcpListener, TcpStream};
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let frozen_below = Arc::new(AtomicU64::new(0));
            let opened = Arc::new(AtomicU64::new(0));
            let (frozen, count) = (Arc::clone(&frozen_below), Arc::clone(&opened));
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let number = count.fetch_add(1, Ordering::SeqCst);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, number, Arc::clone(&frozen)));
                    tokio::spawn(pump(server_read, client_write, number, Arc::clone(&frozen)));
                }
            });
            Self {
                addr,
                opened,
                frozen_below,
            }
        }

        fn freeze_open_connections(&self) {
            self.frozen_below
                .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        number: u64,
        frozen_below: Arc<AtomicU64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buffer = vec![0; 16 * 1024];
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            if number < frozen_below.load(Ordering::SeqCst) {
                // Frozen: nothing more goes through, and nothing is closed.
                let _held = (from, to);
                std::future::pending::<()>().await;
                return;
            }
            if to.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    }

    /// A LISTEN session whose connection stops answering without being closed is found out by
    /// its keepalive check and re-opened; before, it waited forever, and the node heard no
    /// other node's changes until restarted.
    #[tokio::test]
    async fn a_listen_session_that_stops_answering_is_reopened() {
        let Some(schema) = Schema::create("silent LISTEN session").await else {
            return;
        };
        let proxy = Freezer::to(schema.server()).await;
        // The LISTEN session's pool, through the proxy, holds nothing else: the session is
        // the one connection the freeze below silences.
        let through_proxy = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&schema.url_via(&proxy.addr.to_string()))
            .await
            .expect("connect through the proxy");
        let direct = Arc::new(schema.store().await);
        let broker = PostgresBroker::new(
            "here".into(),
            through_proxy,
            Arc::new(Hub::default()),
            Arc::clone(&direct) as Arc<dyn Store>,
            Box::new(|_| {}),
            None,
            Arc::default(),
        )
        .with_keepalive(Duration::from_millis(200), Duration::from_millis(300));
        let mut sessions = broker.sessions_opened();
        let session = broker.listen().await.expect("listen");
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(Arc::clone(&broker).run(session, shutdown.clone()));
        // Every connection made so far, the LISTEN session's among them, goes silent.
        proxy.freeze_open_connections();
        tokio::time::timeout(Duration::from_secs(10), sessions.wait_for(|n| *n >= 2))
            .await
            .expect("the silent session was found out and re-opened")
            .expect("the broker runs");
        assert!(
            broker.metrics.listen_sessions_lost_total.get() >= 1,
            "the silent session counted as lost"
        );
        shutdown.cancel();
        running.abort();
        schema.drop_now().await;
    }

    /// A node without a bus over `schema`, whose store keeps offsets 1 to `kept` of
    /// `history-c` (data `n1`, `n2`, ...), and one subscriber of it on this node that has seen
    /// offset 1.
    struct OneSubscriber {
        store: Arc<herald_store::postgres::PostgresStore>,
        broker: Arc<PostgresBroker>,
        app_id: AppId,
        positions: Vec<Position>,
        frames: herald_channels::hub::Frames,
        overflowed: CancellationToken,
    }

    /// A broker without a bus, `kept` events of `history-c` in its store, and one live
    /// subscriber of it that has offset 1.
    async fn one_subscriber(schema: &Schema, kept: u64) -> OneSubscriber {
        subscriber_at(schema, kept, 16, 1).await
    }

    /// [`one_subscriber`] with an outbox of `outbox_frames` that has offset `has` (0: none).
    async fn subscriber_at(
        schema: &Schema,
        kept: u64,
        outbox_frames: usize,
        has: u64,
    ) -> OneSubscriber {
        let store = Arc::new(schema.store().await);
        let hub = Arc::new(Hub::default());
        let broker = broker_without_bus("this", &store, &hub);
        let app_id = herald_store::conformance::stored_app(store.as_ref(), "history")
            .await
            .id;
        let mut positions = Vec::new();
        for n in 1..=kept {
            let position = store.append_history(entry(&app_id, n)).await;
            positions.push(position.expect("append"));
        }
        let app = hub.app(&app_id);
        let (outbox, frames, overflowed) = Outbox::new(outbox_frames);
        app.subscribe_joining("history-c", "1.1", &outbox, None, 10)
            .expect("subscribed");
        assert!(app.go_live("history-c", "1.1", has, |_| {}), "live");
        OneSubscriber {
            store,
            broker,
            app_id,
            positions,
            frames,
            overflowed,
        }
    }

    /// The publications a subscriber got since the last call: offsets and data.
    fn heard(frames: &mut herald_channels::hub::Frames) -> Vec<(Option<u64>, String)> {
        let mut heard = Vec::new();
        while let Ok(item) = frames.try_recv() {
            if let Outgoing::Publication(p) = item {
                heard.push((p.offset(), p.data.as_str().to_owned()));
            }
        }
        heard
    }

    /// A client event's sender is left out of it even when the event is read back from the
    /// store: here the node hears offset 3 before the sender's own offset 2 (two nodes'
    /// publications may come over the bus in either order), so 2 is read from the store to
    /// fill the gap, and the store kept its `except`.
    #[tokio::test]
    async fn an_event_read_back_to_fill_a_gap_still_leaves_its_sender_out() {
        let Some(schema) = Schema::create("gap fill leaves the sender out").await else {
            return;
        };
        let OneSubscriber {
            broker,
            app_id,
            mut positions,
            mut frames,
            ..
        } = one_subscriber(&schema, 1).await;
        let store = schema.store().await;
        let own = NewHistoryEntry {
            except: Some("1.1".into()),
            ..entry(&app_id, 2)
        };
        positions.push(store.append_history(own).await.expect("append"));
        positions.push(
            store
                .append_history(entry(&app_id, 3))
                .await
                .expect("append"),
        );
        Hearing::message(
            broker.as_ref(),
            Bytes::from(message(&app_id, &positions[2], 3)),
        )
        .await;
        assert_eq!(
            heard(&mut frames),
            [(Some(3), "n3".to_owned())],
            "its own n2 is not echoed to the sender"
        );
        schema.drop_now().await;
    }

    /// Without a bus, history events come by NOTIFY. One that could not be handed on (here a
    /// notice that does not decode; in life, an entry by reference whose read failed) marks
    /// the node to catch up from the store, and the channel's next event brings it first, in
    /// order: it is neither lost nor left for the subscriber to find by its offsets.
    #[tokio::test]
    async fn a_history_notice_not_handed_on_is_caught_up_and_comes_before_the_next() {
        let Some(schema) = Schema::create("history notice not handed on").await else {
            return;
        };
        let OneSubscriber {
            broker,
            app_id,
            positions,
            mut frames,
            ..
        } = one_subscriber(&schema, 3).await;

        // A message on the bus's topic that is not Herald's is counted, not caught up for.
        Hearing::message(broker.as_ref(), Bytes::from_static(b"{not herald's")).await;
        assert!(
            !broker.missed.load(Ordering::Relaxed),
            "a foreign bus message has nothing to catch up"
        );
        broker.hear(HISTORY_CHANNEL, "{not a notice").await;
        assert!(
            broker.missed.load(Ordering::Relaxed),
            "marked to catch up at the next retry tick"
        );
        let failed = |via| {
            broker
                .metrics
                .notices_failed_total
                .get_or_create(&herald_metrics::NoticeLabels { via })
                .get()
        };
        assert_eq!(failed(NoticeVia::Notify), 1, "counted");
        assert_eq!(
            failed(NoticeVia::Bus),
            1,
            "the foreign bus message, counted"
        );
        assert!(frames.try_recv().is_err(), "nothing handed on yet");

        let third = herald_store::postgres::HistoryNotice {
            app_id: app_id.as_str().to_owned(),
            channel: "history-c".into(),
            epoch: positions[2].epoch.clone(),
            offset: positions[2].offset,
            except: None,
            event: Some(herald_store::postgres::NoticeEvent {
                name: "note".into(),
                data: "n3".into(),
                raw_json: false,
                user_id: None,
                created_at: Utc::now().timestamp_millis(),
            }),
        };
        let payload = serde_json::to_string(&third).expect("json");
        broker.hear(HISTORY_CHANNEL, &payload).await;
        assert_eq!(
            heard(&mut frames),
            [(Some(2), "n2".to_owned()), (Some(3), "n3".to_owned())]
        );
        schema.drop_now().await;
    }

    /// A gap longer than one read is filled a read at a time, every event in order before the
    /// one heard.
    #[tokio::test]
    async fn a_gap_longer_than_one_read_is_filled_in_order_before_the_offset_heard() {
        let Some(schema) = Schema::create("bus gap in reads").await else {
            return;
        };
        let newest = u64::from(CATCH_UP_READ) * 2 + 3;
        let OneSubscriber {
            broker,
            app_id,
            positions,
            mut frames,
            overflowed,
            ..
        } = subscriber_at(&schema, newest, 256, 1).await;
        let last = usize::try_from(newest - 1).expect("small");
        broker
            .hear_bus(&message(&app_id, &positions[last], newest))
            .await
            .expect("heard");
        let offsets: Vec<Option<u64>> = heard(&mut frames).into_iter().map(|(o, _)| o).collect();
        assert_eq!(offsets, (2..=newest).map(Some).collect::<Vec<_>>());
        assert!(!overflowed.is_cancelled());
        schema.drop_now().await;
    }

    /// Two nodes' publications on one channel can cross on a bus: an offset heard before the
    /// ones its subscribers need next brings those from the store first, and when they arrive
    /// late they are not sent again.
    #[tokio::test]
    async fn offsets_heard_out_of_order_on_a_bus_reach_subscribers_in_order_once() {
        let Some(schema) = Schema::create("bus offsets in order").await else {
            return;
        };
        let OneSubscriber {
            broker,
            app_id,
            positions,
            mut frames,
            ..
        } = one_subscriber(&schema, 5).await;

        for n in [4, 2, 3, 5] {
            let index = usize::try_from(n - 1).expect("small");
            broker
                .hear_bus(&message(&app_id, &positions[index], n))
                .await
                .expect("heard");
        }
        assert_eq!(
            heard(&mut frames),
            [
                (Some(2), "n2".to_owned()),
                (Some(3), "n3".to_owned()),
                (Some(4), "n4".to_owned()),
                (Some(5), "n5".to_owned()),
            ]
        );
        schema.drop_now().await;
    }
}
