//! Herald's channel layer: what every real-time face (WebSockets, SSE) shares, cut by role.
//!
//! [`publisher::Publisher`] is the one publish path: every producer hands it a
//! [`publisher::Publish`]; it picks webhook targets, stores the message and the history
//! entries in one commit (the store assigns offsets), wakes delivery, and hands one
//! [`publication::Publication`] per channel to the [`broker::Broker`], the only path to the
//! hubs ([`broker::LocalBroker`] on one node). [`hub::Hub`] is the local hub: per app, who is
//! subscribed to which channel (presence members counted per user, signed-in users), and the
//! fan-out of shared publications into each subscriber's bounded [`hub::Outbox`]; one that
//! cannot keep up is cancelled instead of growing memory ([`queue`] is that outbox's queue,
//! which holds no allocation while empty: most connections are idle). Every change of channel
//! state goes to a [`hub::ChannelObserver`]. [`history::History`] is channel history:
//! retention rules, what a resuming subscriber missed ([`history::History::recover`], merged by offset with
//! what the hub held for it), pages and purges. [`presence::PresenceManager`] answers
//! occupancy and member queries. [`protocol`] builds the Pusher frames. [`limits`] counts
//! connections and replayed history per client address, for WebSockets and SSE alike.
//! [`channel_webhooks`] observes the hub and turns its channel events into Pusher channel
//! webhooks, stored through the publisher. `turns` keeps each history channel's order on this
//! node while several of its publications share a commit.
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
pub mod queue;
pub mod tail;
mod turns;

pub use herald_metrics::Transport;
pub use hub::Hub;
pub use protocol::Frame;
pub use publication::{EventData, Outgoing, Publication};
pub use publisher::{Publish, PublishError, Published, Publisher, Webhook};
pub use tail::{Source, Tail, TailData, TailEvent};

/// Now, at the millisecond precision the store keeps.
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(3)
}
