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
//! | `herald_outbox_overflows_total` | counter | [`ChannelMetrics`] |
//! | `herald_channel_webhook_events_dropped_total` | counter | [`ChannelMetrics`] |
//! | `herald_publications_total` | counter | [`PublishMetrics`] |
//! | `herald_fanout_deliveries_total` | counter | [`PublishMetrics`] |
//! | `herald_publish_failures_total` | counter | [`PublishMetrics`] |
//! | `herald_delivery_attempts_total{outcome}` | counter | [`DeliveryMetrics`] |
//! | `herald_delivery_claimed_jobs_total` | counter | [`DeliveryMetrics`] |
//! | `herald_listener_connections_accepted_total` | counter | [`ListenerMetrics`] |
//! | `herald_listener_connections_refused_total{reason}` | counter | [`ListenerMetrics`] |

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

pub use prometheus_client;
pub use prometheus_client::registry::Registry;

/// Every group, each shared with the component that updates it.
#[derive(Clone, Default)]
pub struct Metrics {
    pub channels: Arc<ChannelMetrics>,
    pub publish: Arc<PublishMetrics>,
    pub delivery: Arc<DeliveryMetrics>,
    pub listener: Arc<ListenerMetrics>,
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
        metrics
    }

    /// The same handles, registered nowhere: they count, and nobody reads them (tests, and
    /// the `Default`s tests use).
    pub fn detached() -> Self {
        Self::default()
    }
}

/// The channel layer's hub: connections and slow subscribers; channel webhooks.
#[derive(Debug, Default)]
pub struct ChannelMetrics {
    /// Open WebSocket connections and SSE streams, counted where the app's connection quota
    /// admits and releases them.
    pub connections: Gauge,
    /// Subscribers closed as too slow: their bounded outbox overflowed (each counted once).
    pub outbox_overflows_total: Counter,
    /// Channel webhook events dropped because too many were waiting to be stored.
    pub channel_webhook_events_dropped_total: Counter,
}

impl ChannelMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections",
            "Open WebSocket connections and SSE streams",
            self.connections.clone(),
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
    }
}

/// The publish path.
#[derive(Debug, Default)]
pub struct PublishMetrics {
    /// Publications committed (or, with nothing to store, such as a client event, accepted
    /// for fan-out); a repeated inbound webhook publishes nothing and is not counted.
    pub publications_total: Counter,
    /// Subscribers on this node a publication was handed to.
    pub fanout_deliveries_total: Counter,
    /// Publications that failed: the store failed (nothing was published), or the broker
    /// failed to fan a committed one out (history channels' subscribers recover it by offset).
    pub publish_failures_total: Counter,
}

impl PublishMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "publications",
            "Publications committed",
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

/// The webhook delivery worker.
#[derive(Debug)]
pub struct DeliveryMetrics {
    /// Attempts made, by outcome.
    pub attempts_total: Family<AttemptLabels, Counter>,
    /// Deliveries claimed from the queue.
    pub claimed_jobs_total: Counter,
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        let attempts_total = Family::<AttemptLabels, Counter>::default();
        // Every outcome from the start, so a rate over it never starts from nothing.
        for outcome in AttemptOutcome::ALL {
            drop(attempts_total.get_or_create(&AttemptLabels { outcome }));
        }
        Self {
            attempts_total,
            claimed_jobs_total: Counter::default(),
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
            "delivery_claimed_jobs",
            "Webhook deliveries claimed from the queue",
            self.claimed_jobs_total.clone(),
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
            "# TYPE herald_outbox_overflows counter",
            "herald_outbox_overflows_total 0",
            "herald_channel_webhook_events_dropped_total 0",
            "herald_publications_total 0",
            "herald_fanout_deliveries_total 0",
            "herald_publish_failures_total 0",
            "herald_delivery_attempts_total{outcome=\"success\"} 0",
            "herald_delivery_attempts_total{outcome=\"gone\"} 0",
            "herald_delivery_attempts_total{outcome=\"overloaded\"} 0",
            "herald_delivery_attempts_total{outcome=\"failed\"} 0",
            "herald_delivery_claimed_jobs_total 0",
            "herald_listener_connections_accepted_total 0",
            "herald_listener_connections_refused_total{reason=\"global_cap\"} 0",
            "herald_listener_connections_refused_total{reason=\"per_address_cap\"} 0",
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
        metrics.channels.connections.inc();
        let out = text(&registry);
        for line in [
            "herald_fanout_deliveries_total 3",
            "herald_delivery_attempts_total{outcome=\"success\"} 1",
            "herald_listener_connections_refused_total{reason=\"per_address_cap\"} 1",
            "herald_connections 1",
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
