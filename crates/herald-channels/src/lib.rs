//! Herald's channel layer: what every real-time face (WebSockets, SSE) shares, cut by role.
//!
//! [`hub::Hub`] is the local hub: per app, who is subscribed to which channel (presence
//! members counted per user, signed-in users), and the fan-out: each event is serialized once
//! into a [`Frame`] whose bytes every subscriber shares, and each subscriber has a bounded
//! [`hub::Outbox`]; one that cannot keep up is cancelled instead of growing memory. Every
//! change of channel state goes to a [`hub::ChannelObserver`]. [`history::History`] is channel
//! history: offsets, epochs, appends before broadcasts (`publish_with`) and the recovery join.
//! [`protocol`] builds the server frames the hub and history send. [`limits`] counts
//! connections and replayed history per client address, for WebSockets and SSE alike.
//! [`channel_webhooks`] observes the hub and turns its channel events into Pusher channel
//! webhooks.
//!
//! Metrics are injected, never global: the hub, the publisher and channel webhooks each take
//! their group of `herald-metrics` handles in their constructors.

pub mod broker;
pub mod channel_webhooks;
pub mod history;
pub mod hub;
pub mod limits;
pub mod presence;
pub mod protocol;
pub mod publication;
pub mod publisher;

pub use hub::Hub;
pub use protocol::Frame;
pub use publication::{EventData, Outgoing, Publication};
pub use publisher::{Publish, PublishError, Published, Publisher, Webhook};

/// Now, at the millisecond precision the store keeps.
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(3)
}
