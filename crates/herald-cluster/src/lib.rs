//! Several Herald nodes as one. Everything here stands on engines the operator already runs
//! (PostgreSQL, and Redis or NATS for publications and presence); nothing here is consensus, replication
//! or gossip of our own.
//!
//! - [`postgres::PostgresBroker`]: the [`Broker`](herald_channels::broker::Broker) over
//!   PostgreSQL's LISTEN/NOTIFY. History channels' publications are announced by the store in
//!   the commit that assigns their offsets, so every node hears a channel in offset order;
//!   other publications are notified by the node that published them. It also wakes this
//!   node's dispatcher when another node queues a delivery. With a [`bus::Bus`]
//!   ([`redis_bus::RedisBus`], [`nats_bus::NatsBus`]) publications travel there instead.
//! - [`presence::ClusterPresence`]: presence and occupancy across nodes over a presence record
//!   (PostgreSQL: [`presence::postgres::PostgresRecord`]; on the bus's engine:
//!   [`presence::redis::RedisRecord`], [`presence::nats::NatsRecord`]), entries per node with a
//!   heartbeat, so `member_added`/`member_removed`, the channel webhooks and the Pusher HTTP
//!   API's answers are the cluster's, once each; a dead node's members are swept.

pub mod bus;
pub mod nats_bus;
pub mod postgres;
pub mod presence;
pub mod redis_bus;
pub mod terminations;
#[cfg(test)]
mod test_schema;

/// This process's name in the cluster: random, new at every start (a restarted node is a new
/// node; what the old one held is recovered by leases, not by its name).
pub fn new_node_id() -> String {
    herald_core::history::new_epoch()
}

/// The NATS server of the tests that need one (`HERALD_TEST_NATS_URL`), or `None` and a line
/// saying `test` was skipped.
#[cfg(test)]
pub(crate) fn test_nats_url(test: &str) -> Option<String> {
    let url = std::env::var("HERALD_TEST_NATS_URL").ok();
    if url.is_none() {
        herald_test_support::skip!("{test}: HERALD_TEST_NATS_URL is unset");
    }
    url
}
