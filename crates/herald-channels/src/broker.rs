//! The broker: the only path from the [`Publisher`](crate::publisher::Publisher) to the hubs.
//!
//! A publication is committed first, then handed to the broker, which brings it to every
//! node's [`Hub`] (this node's included). One node needs nothing more than a function call
//! ([`LocalBroker`]); a cluster puts PostgreSQL, Redis or NATS behind the same trait, and no face
//! changes. Whatever the broker, each hub receives one channel's publications in offset order
//! and each at most once; what it cannot deliver (a broker outage) a history channel's
//! subscriber recovers from the store by offset, which is why a publication is committed before
//! it is brokered.

use std::sync::Arc;

use herald_core::AppId;

use crate::{Hub, publication::Publication};

/// Why a broker could not take publications.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
}

/// Carries committed publications to every node's hub.
#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Hands `publications` to every node's hub. The caller hands one channel's publications
    /// over in offset order (see the publisher's ordering), and every hub must receive them in
    /// that order.
    async fn publish(&self, publications: &[Arc<Publication>]) -> Result<usize, BrokerError>;

    /// Ends the connections and streams of a deleted app on every node (they close with 4001).
    async fn remove_app(&self, app_id: &AppId) -> Result<(), BrokerError>;

    /// Whether this node hears the other nodes now (`/health/ready`); one node always does.
    fn is_ready(&self) -> bool {
        true
    }
}

/// One node: publications go straight into this process's hub. Returns how many subscribers
/// they were handed to.
pub struct LocalBroker {
    hub: Arc<Hub>,
}

impl LocalBroker {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait::async_trait]
impl Broker for LocalBroker {
    async fn remove_app(&self, app_id: &AppId) -> Result<(), BrokerError> {
        self.hub.remove_app(app_id);
        Ok(())
    }

    async fn publish(&self, publications: &[Arc<Publication>]) -> Result<usize, BrokerError> {
        Ok(publications
            .iter()
            .map(|p| self.hub.app(&p.app_id).broadcast(p))
            .sum())
    }
}
