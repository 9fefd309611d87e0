//! Herald's metrics: Prometheus families grouped by role, each group a struct of
//! `prometheus-client` handles shared behind an `Arc` with the component that updates it.
//!
//! There is no global recorder. `herald::run` builds one [`Registry`], calls [`Metrics::new`]
//! on it and hands each group to its component's constructor (the channel hub, the publisher,
//! channel webhooks, the delivery worker, the listener), as linkerd2-proxy threads its registry
//! through its stacks. Serving the registry (a `/metrics` route encoding it) is then purely
//! additive. Tests and `Default`s use [`Metrics::detached`]: the same handles, registered
//! nowhere.
//!
//! Every name is prefixed `herald_`; counters get the `_total` suffix when encoded:
//!
//! | metric | type | group |
//! |---|---|---|
//! | `herald_connections` | gauge | [`ChannelMetrics`] |
//! | `herald_transport_connections{transport}` | gauge | [`ChannelMetrics`] |
//! | `herald_subscriptions{transport}` | gauge | [`ChannelMetrics`] |
//! | `herald_outbox_overflows_total` | counter | [`ChannelMetrics`] |
//! | `herald_channel_webhook_events_dropped_total` | counter | [`ChannelMetrics`] |
//! | `herald_publications_total{source}` | counter | [`PublishMetrics`] |
//! | `herald_fanout_deliveries_total` | counter | [`PublishMetrics`] |
//! | `herald_publish_failures_total` | counter | [`PublishMetrics`] |
//! | `herald_broker_publish_seconds` | histogram | [`PublishMetrics`] |
//! | `herald_store_commit_seconds` | histogram | [`StoreMetrics`] |
//! | `herald_store_commit_writes` | histogram | [`StoreMetrics`] |
//! | `herald_delivery_attempts_total{outcome}` | counter | [`DeliveryMetrics`] |
//! | `herald_delivery_claimed_jobs_total` | counter | [`DeliveryMetrics`] |
//! | `herald_delivery_claims_total{lane}` | counter | [`DeliveryMetrics`] |
//! | `herald_webhook_attempts_total{status_class}` | counter | [`DeliveryMetrics`] |
//! | `herald_delivery_queue_due` | gauge | [`QueueMetrics`] |
//! | `herald_delivery_queue_oldest_due_age_seconds` | gauge | [`QueueMetrics`] |
//! | `herald_ingest_requests_total{outcome}` | counter | [`ApiMetrics`] |
//! | `herald_limits_hit_total{limit}` | counter | [`ApiMetrics`] |
//! | `herald_listener_connections_accepted_total` | counter | [`ListenerMetrics`] |
//! | `herald_listener_connections_refused_total{reason}` | counter | [`ListenerMetrics`] |
//! | `herald_cluster_listening` | gauge | [`ClusterMetrics`] |
//! | `herald_cluster_bus_connected` | gauge | [`ClusterMetrics`] |
//! | `herald_cluster_listen_sessions_opened_total` | counter | [`ClusterMetrics`] |
//! | `herald_cluster_listen_sessions_lost_total` | counter | [`ClusterMetrics`] |
//! | `herald_cluster_notices_failed_total{via}` | counter | [`ClusterMetrics`] |
//! | `herald_cluster_bus_sends_failed_total` | counter | [`ClusterMetrics`] |
//! | `herald_cluster_catch_ups_total` | counter | [`ClusterMetrics`] |
//! | `herald_cluster_caught_up_events_total` | counter | [`ClusterMetrics`] |
//! | `herald_cluster_presence_resync_notices_total` | counter | [`ClusterMetrics`] |
//!
//! The cluster group is registered only on a node that runs as part of a cluster (on the
//! PostgreSQL store): [`ClusterMetrics::register`].

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
};
use std::sync::atomic::AtomicU64;

pub use prometheus_client;
pub use prometheus_client::registry::Registry;

/// Every group, each shared with the component that updates it.
#[derive(Clone, Default)]
pub struct Metrics {
    pub channels: Arc<ChannelMetrics>,
    pub publish: Arc<PublishMetrics>,
    pub delivery: Arc<DeliveryMetrics>,
    pub listener: Arc<ListenerMetrics>,
    pub queue: Arc<QueueMetrics>,
    pub api: Arc<ApiMetrics>,
    pub store: Arc<StoreMetrics>,
    /// Registered by `herald::run` only on a clustered node (see [`ClusterMetrics::register`]).
    pub cluster: Arc<ClusterMetrics>,
}

impl Metrics {
    /// Builds every group and registers it in `registry`, under the prefix `herald`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::detached();
        let registry = registry.sub_registry_with_prefix("herald");
        metrics.channels.register(registry);
        metrics.publish.register(registry);
        metrics.delivery.register(registry);
        metrics.listener.register(registry);
        metrics.queue.register(registry);
        metrics.api.register(registry);
        metrics.store.register(registry);
        metrics
    }

    /// The same handles, registered nowhere: they count, and nobody reads them (tests, and
    /// the `Default`s tests use).
    pub fn detached() -> Self {
        Self::default()
    }
}

/// How a subscriber is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A WebSocket speaking the Pusher Channels protocol.
    Pusher,
    /// A Socket.IO connection.
    SocketIo,
    /// A Server-Sent Events stream.
    Sse,
}

impl Transport {
    pub const ALL: [Self; 3] = [Self::Pusher, Self::SocketIo, Self::Sse];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pusher => "pusher",
            Self::SocketIo => "socketio",
            Self::Sse => "sse",
        }
    }
}

impl EncodeLabelValue for Transport {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: Transport,
}

/// Where a publication came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The Svix-shaped message API (and replays through it).
    Api,
    /// The Pusher HTTP API.
    Pusher,
    /// A verified inbound webhook (`/ingest/{source}`).
    Ingest,
    /// A client event sent by a WebSocket or Socket.IO client.
    Client,
}

impl Source {
    pub const ALL: [Self; 4] = [Self::Api, Self::Pusher, Self::Ingest, Self::Client];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Pusher => "pusher",
            Self::Ingest => "ingest",
            Self::Client => "client",
        }
    }
}

impl EncodeLabelValue for Source {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: Source,
}

/// The channel layer's hub: connections and slow subscribers; channel webhooks.
#[derive(Debug)]
pub struct ChannelMetrics {
    /// Open WebSocket connections and SSE streams, counted where the app's connection quota
    /// admits and releases them.
    pub connections: Gauge,
    /// The same, by transport.
    pub transport_connections: Family<TransportLabels, Gauge>,
    /// Channel subscriptions on this node, by the transport of the connection holding them.
    pub subscriptions: Family<TransportLabels, Gauge>,
    /// Subscribers closed as too slow: their bounded outbox overflowed (each counted once).
    pub outbox_overflows_total: Counter,
    /// Channel webhook events dropped because too many were waiting to be stored.
    pub channel_webhook_events_dropped_total: Counter,
    /// Socket.IO namespaces this node holds open ahead of their clients (`herald_socketio`'s
    /// `Face::open_app`): two per app with Socket.IO settings, one with no uid.
    pub socketio_namespaces: Gauge,
}

impl Default for ChannelMetrics {
    fn default() -> Self {
        let transport_connections = Family::<TransportLabels, Gauge>::default();
        let subscriptions = Family::<TransportLabels, Gauge>::default();
        for transport in Transport::ALL {
            drop(transport_connections.get_or_create(&TransportLabels { transport }));
            drop(subscriptions.get_or_create(&TransportLabels { transport }));
        }
        Self {
            connections: Gauge::default(),
            transport_connections,
            subscriptions,
            outbox_overflows_total: Counter::default(),
            channel_webhook_events_dropped_total: Counter::default(),
            socketio_namespaces: Gauge::default(),
        }
    }
}

impl ChannelMetrics {
    /// A connection over `transport` opened (`opened`) or closed.
    pub fn connection(&self, transport: Transport, opened: bool) {
        let by_transport = self
            .transport_connections
            .get_or_create(&TransportLabels { transport });
        if opened {
            self.connections.inc();
            by_transport.inc();
        } else {
            self.connections.dec();
            by_transport.dec();
        }
    }

    /// A subscription added (or, `added` false, removed) on a connection over `transport`.
    pub fn subscription(&self, transport: Transport, added: bool) {
        let gauge = self
            .subscriptions
            .get_or_create(&TransportLabels { transport });
        if added {
            gauge.inc();
        } else {
            gauge.dec();
        }
    }

    /// Subscriptions held over `transport`.
    pub fn subscriptions_over(&self, transport: Transport) -> i64 {
        self.subscriptions
            .get_or_create(&TransportLabels { transport })
            .get()
    }

    /// Connections open over `transport`.
    pub fn connections_over(&self, transport: Transport) -> i64 {
        self.transport_connections
            .get_or_create(&TransportLabels { transport })
            .get()
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections",
            "Open WebSocket connections and SSE streams",
            self.connections.clone(),
        );
        registry.register(
            "transport_connections",
            "Open connections by transport: pusher (WebSocket), socketio, sse",
            self.transport_connections.clone(),
        );
        registry.register(
            "subscriptions",
            "Channel subscriptions by the transport of their connection",
            self.subscriptions.clone(),
        );
        registry.register(
            "outbox_overflows",
            "Subscribers closed as too slow: their outbox overflowed",
            self.outbox_overflows_total.clone(),
        );
        registry.register(
            "channel_webhook_events_dropped",
            "Channel webhook events dropped: too many were waiting to be stored",
            self.channel_webhook_events_dropped_total.clone(),
        );
        registry.register(
            "socketio_namespaces",
            "Socket.IO namespaces held open ahead of their clients (apps with Socket.IO settings)",
            self.socketio_namespaces.clone(),
        );
    }
}

/// The publish path.
#[derive(Debug)]
pub struct PublishMetrics {
    /// Publications committed (or, with nothing to store, such as a client event, accepted
    /// for fan-out), by source; a repeated inbound webhook publishes nothing and is not
    /// counted.
    pub publications_total: Family<SourceLabels, Counter>,
    /// Subscribers on this node a publication was handed to.
    pub fanout_deliveries_total: Counter,
    /// Publications that failed: the store failed (nothing was published), or the broker
    /// failed to fan a committed one out (history channels' subscribers recover it by offset).
    pub publish_failures_total: Counter,
    /// How long handing a publication to the broker took: this node's fan-out and, in a
    /// cluster, the send to the other nodes (a Redis or NATS publish, or PostgreSQL's NOTIFY).
    pub broker_publish_seconds: Histogram,
}

impl Default for PublishMetrics {
    fn default() -> Self {
        let publications_total = Family::<SourceLabels, Counter>::default();
        for source in Source::ALL {
            drop(publications_total.get_or_create(&SourceLabels { source }));
        }
        Self {
            publications_total,
            fanout_deliveries_total: Counter::default(),
            publish_failures_total: Counter::default(),
            broker_publish_seconds: seconds_histogram(),
        }
    }
}

impl PublishMetrics {
    /// Counts one publication from `source`.
    pub fn published(&self, source: Source) {
        self.publications_total
            .get_or_create(&SourceLabels { source })
            .inc();
    }

    /// Publications counted from `source`.
    pub fn publications(&self, source: Source) -> u64 {
        self.publications_total
            .get_or_create(&SourceLabels { source })
            .get()
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "publications",
            "Publications committed, by source",
            self.publications_total.clone(),
        );
        registry.register(
            "fanout_deliveries",
            "Subscribers on this node a publication was handed to",
            self.fanout_deliveries_total.clone(),
        );
        registry.register(
            "publish_failures",
            "Publications that failed in the store or the broker",
            self.publish_failures_total.clone(),
        );
        registry.register(
            "broker_publish_seconds",
            "Time to hand a publication to the broker: local fan-out and the send to other nodes",
            self.broker_publish_seconds.clone(),
        );
    }
}

/// An attempt's outcome, as the delivery worker classifies the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptOutcome {
    /// Any 2xx.
    Success,
    /// 410: the receiver asked never to be called again.
    Gone,
    /// 429, 502, 504 or a timeout.
    Overloaded,
    /// Anything else, including requests never sent (refused address, connection error).
    Failed,
}

impl AttemptOutcome {
    pub const ALL: [Self; 4] = [Self::Success, Self::Gone, Self::Overloaded, Self::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Gone => "gone",
            Self::Overloaded => "overloaded",
            Self::Failed => "failed",
        }
    }
}

impl EncodeLabelValue for AttemptOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AttemptLabels {
    pub outcome: AttemptOutcome,
}

/// The class of an attempt's HTTP status, or that no response came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
    /// Refused, timed out, a blocked address, a connection error: no status at all.
    NoResponse,
}

impl StatusClass {
    pub const ALL: [Self; 6] = [
        Self::Informational,
        Self::Success,
        Self::Redirection,
        Self::ClientError,
        Self::ServerError,
        Self::NoResponse,
    ];

    /// The class of `code` (0, or anything outside 100-599: no response).
    pub fn of(code: i32) -> Self {
        match code {
            100..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            500..=599 => Self::ServerError,
            _ => Self::NoResponse,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
            Self::NoResponse => "none",
        }
    }
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StatusClassLabels {
    pub status_class: StatusClass,
}

/// A dispatcher's claim lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClaimLane {
    FirstAttempts,
    /// Retries and manual attempts.
    Retries,
}

impl ClaimLane {
    pub const ALL: [Self; 2] = [Self::FirstAttempts, Self::Retries];

    pub fn of(first_attempts: bool) -> Self {
        if first_attempts {
            Self::FirstAttempts
        } else {
            Self::Retries
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstAttempts => "first_attempts",
            Self::Retries => "retries",
        }
    }
}

impl EncodeLabelValue for ClaimLane {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClaimLaneLabels {
    pub lane: ClaimLane,
}

/// The webhook delivery worker.
#[derive(Debug)]
pub struct DeliveryMetrics {
    /// Attempts made, by outcome.
    pub attempts_total: Family<AttemptLabels, Counter>,
    /// Attempts made, by the class of the receiver's HTTP status.
    pub attempt_statuses_total: Family<StatusClassLabels, Counter>,
    /// Deliveries claimed from the queue.
    pub claimed_jobs_total: Counter,
    /// Claims asked of the store, by lane (each a query, on PostgreSQL a transaction): with
    /// `claimed_jobs_total`, what a claim takes on average.
    pub claims_total: Family<ClaimLaneLabels, Counter>,
    /// `claims_total`'s two series, in `ClaimLane::ALL`'s order: a claim follows nearly every
    /// finished attempt, so it counts without the family's lookup.
    claims_by_lane: [Counter; 2],
    /// Claimed deliveries not sent because their endpoint's `throttleRate` gave them no turn
    /// within their lease: claimed again once it runs out.
    pub paced_past_lease_total: Counter,
    /// Claimed deliveries not sent for a passing reason of this server's (its store
    /// unreachable, out of file descriptors): not charged to the endpoint, claimed again once
    /// their leases run out.
    pub not_sent_total: Counter,
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        let attempts_total = Family::<AttemptLabels, Counter>::default();
        // Every outcome from the start, so a rate over it never starts from nothing.
        for outcome in AttemptOutcome::ALL {
            drop(attempts_total.get_or_create(&AttemptLabels { outcome }));
        }
        let attempt_statuses_total = Family::<StatusClassLabels, Counter>::default();
        for status_class in StatusClass::ALL {
            drop(attempt_statuses_total.get_or_create(&StatusClassLabels { status_class }));
        }
        let claims_total = Family::<ClaimLaneLabels, Counter>::default();
        let claims_by_lane = ClaimLane::ALL.map(|lane| {
            claims_total
                .get_or_create(&ClaimLaneLabels { lane })
                .clone()
        });
        Self {
            attempts_total,
            attempt_statuses_total,
            claimed_jobs_total: Counter::default(),
            claims_total,
            claims_by_lane,
            paced_past_lease_total: Counter::default(),
            not_sent_total: Counter::default(),
        }
    }
}

impl DeliveryMetrics {
    /// Counts one attempt.
    pub fn attempt(&self, outcome: AttemptOutcome) {
        self.attempts_total
            .get_or_create(&AttemptLabels { outcome })
            .inc();
    }

    /// Counts one attempt's response status (`0`: no response).
    pub fn attempt_status(&self, code: i32) {
        self.attempt_statuses_total
            .get_or_create(&StatusClassLabels {
                status_class: StatusClass::of(code),
            })
            .inc();
    }

    /// Counts one claimed delivery left unsent by its endpoint's pace.
    pub fn paced_past_lease(&self) {
        self.paced_past_lease_total.inc();
    }

    /// Counts one claimed delivery this server could not send for a reason of its own.
    pub fn not_sent(&self) {
        self.not_sent_total.inc();
    }

    /// Counts one claim asked of the store for a lane.
    pub fn claim(&self, first_attempts: bool) {
        self.claims_by_lane[ClaimLane::of(first_attempts) as usize].inc();
    }

    /// Attempts so far with this outcome.
    pub fn attempts(&self, outcome: AttemptOutcome) -> u64 {
        self.attempts_total
            .get_or_create(&AttemptLabels { outcome })
            .get()
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "delivery_attempts",
            "Webhook delivery attempts, by outcome",
            self.attempts_total.clone(),
        );
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts, by the class of the receiver's HTTP status (none: no response)",
            self.attempt_statuses_total.clone(),
        );
        registry.register(
            "delivery_claimed_jobs",
            "Webhook deliveries claimed from the queue",
            self.claimed_jobs_total.clone(),
        );
        registry.register(
            "delivery_claims",
            "Claims of due webhook deliveries asked of the store, by lane (first_attempts, retries)",
            self.claims_total.clone(),
        );
        registry.register(
            "delivery_paced_past_lease",
            "Claimed webhook deliveries not sent because their endpoint's throttleRate gave them no turn within their lease (let go, and claimed again once their turn is near)",
            self.paced_past_lease_total.clone(),
        );
        registry.register(
            "delivery_not_sent",
            "Claimed webhook deliveries not sent for a passing reason of this server's (its store unreachable, out of file descriptors): not charged to the endpoint, claimed again once their leases run out",
            self.not_sent_total.clone(),
        );
    }
}

/// Why the listener closed a connection at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The listener was at `max_connections`.
    GlobalCap,
    /// The client's address (IPv6: /64) was at `max_connections_per_ip`.
    PerAddressCap,
}

impl Refusal {
    pub const ALL: [Self; 2] = [Self::GlobalCap, Self::PerAddressCap];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::GlobalCap => "global_cap",
            Self::PerAddressCap => "per_address_cap",
        }
    }
}

impl EncodeLabelValue for Refusal {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: Refusal,
}

/// The HTTP listener every face shares.
#[derive(Debug)]
pub struct ListenerMetrics {
    /// TCP connections accepted and served.
    pub connections_accepted_total: Counter,
    /// TCP connections closed at once, by reason.
    pub connections_refused_total: Family<RefusalLabels, Counter>,
}

impl Default for ListenerMetrics {
    fn default() -> Self {
        let connections_refused_total = Family::<RefusalLabels, Counter>::default();
        for reason in Refusal::ALL {
            drop(connections_refused_total.get_or_create(&RefusalLabels { reason }));
        }
        Self {
            connections_accepted_total: Counter::default(),
            connections_refused_total,
        }
    }
}

impl ListenerMetrics {
    /// Counts one refused connection.
    pub fn refused(&self, reason: Refusal) {
        self.connections_refused_total
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "listener_connections_accepted",
            "TCP connections the listener accepted",
            self.connections_accepted_total.clone(),
        );
        registry.register(
            "listener_connections_refused",
            "TCP connections the listener closed at once, by reason",
            self.connections_refused_total.clone(),
        );
    }
}

/// The webhook delivery queue, read from the store when `/metrics` is scraped (the store is
/// the queue's truth, shared by every node of a cluster).
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Deliveries due and not finished, those being attempted included.
    pub due: Gauge,
    /// How long ago the earliest of them fell due, in seconds (0 with none).
    pub oldest_due_age_seconds: Gauge<f64, AtomicU64>,
}

impl QueueMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "delivery_queue_due",
            "Webhook deliveries due and not finished (in the whole store), those being attempted included",
            self.due.clone(),
        );
        registry.register(
            "delivery_queue_oldest_due_age_seconds",
            "How long ago the earliest unfinished due webhook delivery fell due",
            self.oldest_due_age_seconds.clone(),
        );
    }
}

/// Seconds from 100 µs to about 13 s, doubling: a commit, a fan-out.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The store's commits of the hot writes (messages, publications, attempt records).
#[derive(Debug)]
pub struct StoreMetrics {
    /// How long a commit took, from the store taking its writes to the commit's end.
    pub commit_seconds: Histogram,
    /// How many writes a commit carried: SQLite's group commit gathers the writes waiting;
    /// PostgreSQL groups message creates and attempt records (`postgres/batch.rs`) and
    /// commits the rest one by one.
    pub commit_writes: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            commit_seconds: seconds_histogram(),
            commit_writes: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
        }
    }
}

impl StoreMetrics {
    /// Records one commit of `writes` writes that took `took`.
    pub fn commit(&self, writes: usize, took: std::time::Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_writes.observe(writes as f64);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "store_commit_seconds",
            "Time the store took to commit a group of hot writes",
            self.commit_seconds.clone(),
        );
        registry.register(
            "store_commit_writes",
            "Writes per store commit (SQLite groups them all; PostgreSQL groups message creates and attempt records)",
            self.commit_writes.clone(),
        );
    }
}

/// How a notice from another node arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NoticeVia {
    /// A PostgreSQL notification on the LISTEN session.
    Notify,
    /// A message on the bus (Redis or NATS).
    Bus,
}

impl NoticeVia {
    pub const ALL: [Self; 2] = [Self::Notify, Self::Bus];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Bus => "bus",
        }
    }
}

impl EncodeLabelValue for NoticeVia {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NoticeLabels {
    pub via: NoticeVia,
}

/// A node's link to the rest of its cluster: the PostgreSQL LISTEN session it hears other
/// nodes' notices on, the bus if one carries publications, and the catch-ups from the store
/// that make up for what either lost. What an operator alerts on: `listening` or
/// `bus_connected` at 0 for long, sessions lost again and again, notices failing.
#[derive(Debug)]
pub struct ClusterMetrics {
    /// 1 while the LISTEN session is open (this node hears the others and its cache serves).
    pub listening: Gauge,
    /// 1 while the bus is connected; 0 while it is lost, and on a node without one.
    pub bus_connected: Gauge,
    /// LISTEN sessions opened: the first, then one per re-open after a loss.
    pub listen_sessions_opened_total: Counter,
    /// LISTEN sessions lost: closed, failed, or silent past their check.
    pub listen_sessions_lost_total: Counter,
    /// Notices heard that could not be handed on to this node's subscribers (history events
    /// among them are caught up from the store), by how they came.
    pub notices_failed_total: Family<NoticeLabels, Counter>,
    /// Sends of publications the bus refused (history ones are caught up by every node).
    pub bus_sends_failed_total: Counter,
    /// Catch-ups of history subscribers from the store: after a re-opened session or bus, or
    /// a history event that was not sent or not handed on.
    pub catch_ups_total: Counter,
    /// History events those catch-ups handed on.
    pub caught_up_events_total: Counter,
    /// Presence notices (`member_added`, `member_removed`) sent to this node's subscribers by
    /// resyncs after a lost link: the ones they missed.
    pub presence_resync_notices_total: Counter,
}

impl Default for ClusterMetrics {
    fn default() -> Self {
        let notices_failed_total = Family::<NoticeLabels, Counter>::default();
        for via in NoticeVia::ALL {
            drop(notices_failed_total.get_or_create(&NoticeLabels { via }));
        }
        Self {
            listening: Gauge::default(),
            bus_connected: Gauge::default(),
            listen_sessions_opened_total: Counter::default(),
            listen_sessions_lost_total: Counter::default(),
            notices_failed_total,
            bus_sends_failed_total: Counter::default(),
            catch_ups_total: Counter::default(),
            caught_up_events_total: Counter::default(),
            presence_resync_notices_total: Counter::default(),
        }
    }
}

impl ClusterMetrics {
    /// Counts one notice that could not be handed on.
    pub fn notice_failed(&self, via: NoticeVia) {
        self.notices_failed_total
            .get_or_create(&NoticeLabels { via })
            .inc();
    }

    /// Counts one catch-up that handed on `events` events.
    pub fn caught_up(&self, events: usize) {
        self.catch_ups_total.inc();
        self.caught_up_events_total
            .inc_by(u64::try_from(events).unwrap_or(u64::MAX));
    }

    /// Registers the group in `registry`, under the prefix `herald` (as [`Metrics::new`] does
    /// the others): only a clustered node has these.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("herald");
        registry.register(
            "cluster_listening",
            "1 while this node's PostgreSQL LISTEN session is open (it hears the other nodes)",
            self.listening.clone(),
        );
        registry.register(
            "cluster_bus_connected",
            "1 while the bus (Redis or NATS) is connected; 0 while lost or without one",
            self.bus_connected.clone(),
        );
        registry.register(
            "cluster_listen_sessions_opened",
            "LISTEN sessions opened: the first, then one per re-open after a loss",
            self.listen_sessions_opened_total.clone(),
        );
        registry.register(
            "cluster_listen_sessions_lost",
            "LISTEN sessions lost (closed, failed, or silent past their check)",
            self.listen_sessions_lost_total.clone(),
        );
        registry.register(
            "cluster_notices_failed",
            "Notices from other nodes that could not be handed on here, by how they came",
            self.notices_failed_total.clone(),
        );
        registry.register(
            "cluster_bus_sends_failed",
            "Sends of publications the bus refused",
            self.bus_sends_failed_total.clone(),
        );
        registry.register(
            "cluster_catch_ups",
            "Catch-ups of history subscribers from the store",
            self.catch_ups_total.clone(),
        );
        registry.register(
            "cluster_caught_up_events",
            "History events handed on by catch-ups",
            self.caught_up_events_total.clone(),
        );
        registry.register(
            "cluster_presence_resync_notices",
            "Presence notices this node's subscribers missed, sent by resyncs after a lost link",
            self.presence_resync_notices_total.clone(),
        );
    }
}

/// What an inbound webhook request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IngestOutcome {
    /// Verified and published.
    Accepted,
    /// Verified, and a delivery the provider had sent before: acknowledged, not published.
    Duplicate,
    /// Verified: a provider's URL handshake (Slack's challenge), answered.
    Challenge,
    /// The signature did not verify (wrong secret, altered body, expired timestamp).
    InvalidSignature,
    /// Refused before verification: unknown source, unreadable or oversize body.
    Rejected,
    /// Over the per-address or per-source rate: not verified.
    RateLimited,
    /// Verified but not stored (the store failed): the provider will retry.
    Failed,
}

impl IngestOutcome {
    pub const ALL: [Self; 7] = [
        Self::Accepted,
        Self::Duplicate,
        Self::Challenge,
        Self::InvalidSignature,
        Self::Rejected,
        Self::RateLimited,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Challenge => "challenge",
            Self::InvalidSignature => "invalid_signature",
            Self::Rejected => "rejected",
            Self::RateLimited => "rate_limited",
            Self::Failed => "failed",
        }
    }
}

impl EncodeLabelValue for IngestOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct IngestLabels {
    pub outcome: IngestOutcome,
}

/// A rate limit the API enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Events an app may publish through the API per second.
    PublishPerApp,
    /// Inbound webhook requests per client address per second.
    IngestPerAddress,
    /// Inbound webhook requests per source per second.
    IngestPerSource,
    /// Failed authentications (unknown or expired API tokens, unknown Pusher apps, wrong
    /// Pusher signatures) per client address per second.
    AuthFailuresPerAddress,
}

impl Limit {
    pub const ALL: [Self; 4] = [
        Self::PublishPerApp,
        Self::IngestPerAddress,
        Self::IngestPerSource,
        Self::AuthFailuresPerAddress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PublishPerApp => "publish_per_app",
            Self::IngestPerAddress => "ingest_per_address",
            Self::IngestPerSource => "ingest_per_source",
            Self::AuthFailuresPerAddress => "auth_failures_per_address",
        }
    }
}

impl EncodeLabelValue for Limit {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: Limit,
}

/// The HTTP API's own doors: inbound webhooks and the request rate limits.
#[derive(Debug)]
pub struct ApiMetrics {
    /// Inbound webhook requests, by what they came to.
    pub ingest_requests_total: Family<IngestLabels, Counter>,
    /// Requests refused with 429, by the limit they hit (connection caps: the listener's).
    pub limits_hit_total: Family<LimitLabels, Counter>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        let ingest_requests_total = Family::<IngestLabels, Counter>::default();
        for outcome in IngestOutcome::ALL {
            drop(ingest_requests_total.get_or_create(&IngestLabels { outcome }));
        }
        let limits_hit_total = Family::<LimitLabels, Counter>::default();
        for limit in Limit::ALL {
            drop(limits_hit_total.get_or_create(&LimitLabels { limit }));
        }
        Self {
            ingest_requests_total,
            limits_hit_total,
        }
    }
}

impl ApiMetrics {
    /// Counts one inbound webhook request.
    pub fn ingest(&self, outcome: IngestOutcome) {
        self.ingest_requests_total
            .get_or_create(&IngestLabels { outcome })
            .inc();
    }

    /// Counts one request refused by `limit`.
    pub fn limit_hit(&self, limit: Limit) {
        self.limits_hit_total
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "ingest_requests",
            "Inbound webhook requests, by what they came to",
            self.ingest_requests_total.clone(),
        );
        registry.register(
            "limits_hit",
            "API requests refused with 429, by the rate limit they hit",
            self.limits_hit_total.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).expect("encodes");
        out
    }

    #[test]
    fn new_registers_every_family_under_the_herald_prefix() {
        let mut registry = Registry::default();
        let _metrics = Metrics::new(&mut registry);
        let out = text(&registry);
        for name in [
            "# TYPE herald_connections gauge",
            "herald_transport_connections{transport=\"socketio\"} 0",
            "# TYPE herald_outbox_overflows counter",
            "herald_outbox_overflows_total 0",
            "herald_channel_webhook_events_dropped_total 0",
            "herald_socketio_namespaces 0",
            "herald_publications_total{source=\"api\"} 0",
            "herald_publications_total{source=\"client\"} 0",
            "herald_fanout_deliveries_total 0",
            "herald_publish_failures_total 0",
            "herald_delivery_attempts_total{outcome=\"success\"} 0",
            "herald_delivery_attempts_total{outcome=\"gone\"} 0",
            "herald_delivery_attempts_total{outcome=\"overloaded\"} 0",
            "herald_delivery_attempts_total{outcome=\"failed\"} 0",
            "herald_delivery_claimed_jobs_total 0",
            "herald_delivery_claims_total{lane=\"first_attempts\"} 0",
            "herald_delivery_claims_total{lane=\"retries\"} 0",
            "herald_webhook_attempts_total{status_class=\"2xx\"} 0",
            "herald_webhook_attempts_total{status_class=\"none\"} 0",
            "# TYPE herald_delivery_queue_due gauge",
            "# TYPE herald_delivery_queue_oldest_due_age_seconds gauge",
            "herald_ingest_requests_total{outcome=\"invalid_signature\"} 0",
            "herald_limits_hit_total{limit=\"publish_per_app\"} 0",
            "herald_listener_connections_accepted_total 0",
            "# TYPE herald_store_commit_seconds histogram",
            "# TYPE herald_store_commit_writes histogram",
            "# TYPE herald_broker_publish_seconds histogram",
            "herald_listener_connections_refused_total{reason=\"global_cap\"} 0",
            "herald_listener_connections_refused_total{reason=\"per_address_cap\"} 0",
            "herald_limits_hit_total{limit=\"auth_failures_per_address\"} 0",
        ] {
            assert!(out.contains(name), "{name} missing from:\n{out}");
        }
        assert!(
            !out.contains("herald_cluster_"),
            "the cluster's group is registered apart: {out}"
        );
    }

    #[test]
    fn the_cluster_group_registers_under_the_herald_prefix_and_counts() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.cluster.register(&mut registry);
        metrics.cluster.listening.set(1);
        metrics.cluster.notice_failed(NoticeVia::Bus);
        metrics.cluster.caught_up(3);
        let out = text(&registry);
        for name in [
            "herald_cluster_listening 1",
            "herald_cluster_bus_connected 0",
            "herald_cluster_listen_sessions_opened_total 0",
            "herald_cluster_listen_sessions_lost_total 0",
            "herald_cluster_notices_failed_total{via=\"notify\"} 0",
            "herald_cluster_notices_failed_total{via=\"bus\"} 1",
            "herald_cluster_bus_sends_failed_total 0",
            "herald_cluster_catch_ups_total 1",
            "herald_cluster_caught_up_events_total 3",
            "herald_cluster_presence_resync_notices_total 0",
            "herald_connections 0",
        ] {
            assert!(out.contains(name), "{name} missing from:\n{out}");
        }
    }

    #[test]
    fn the_registry_reads_what_the_handles_count() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.publish.fanout_deliveries_total.inc_by(3);
        metrics.delivery.attempt(AttemptOutcome::Success);
        metrics.listener.refused(Refusal::PerAddressCap);
        metrics.channels.connection(Transport::Sse, true);
        metrics.delivery.attempt_status(503);
        metrics.delivery.attempt_status(0);
        metrics.api.ingest(IngestOutcome::Duplicate);
        metrics.api.limit_hit(Limit::IngestPerSource);
        metrics.queue.oldest_due_age_seconds.set(1.5);
        let out = text(&registry);
        for line in [
            "herald_fanout_deliveries_total 3",
            "herald_delivery_attempts_total{outcome=\"success\"} 1",
            "herald_listener_connections_refused_total{reason=\"per_address_cap\"} 1",
            "herald_connections 1",
            "herald_transport_connections{transport=\"sse\"} 1",
            "herald_transport_connections{transport=\"pusher\"} 0",
            "herald_webhook_attempts_total{status_class=\"5xx\"} 1",
            "herald_webhook_attempts_total{status_class=\"none\"} 1",
            "herald_ingest_requests_total{outcome=\"duplicate\"} 1",
            "herald_limits_hit_total{limit=\"ingest_per_source\"} 1",
            "herald_delivery_queue_oldest_due_age_seconds 1.5",
        ] {
            assert!(out.contains(line), "{line} missing from:\n{out}");
        }
        assert_eq!(metrics.delivery.attempts(AttemptOutcome::Success), 1);
    }

    #[test]
    fn detached_metrics_count_without_a_registry() {
        let metrics = Metrics::detached();
        metrics.channels.outbox_overflows_total.inc();
        assert_eq!(metrics.channels.outbox_overflows_total.get(), 1);
        assert_eq!(metrics.delivery.attempts(AttemptOutcome::Failed), 0);
    }
}
