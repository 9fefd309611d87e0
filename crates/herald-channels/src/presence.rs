//! Presence and occupancy, as the Pusher HTTP API and channel queries see them: which channels
//! of an app are occupied, by how many subscriptions, and which users are in a presence
//! channel.
//!
//! [`PresenceManager`] is the seam: one node answers from its own hub ([`LocalPresence`]); a
//! cluster answers for every node (entries per node with a lease, in PostgreSQL, Redis or
//! NATS) behind the same trait, and the API that asks does not change. The hub still decides
//! membership changes on this node (first socket of a user in, last one out), under its channel
//! lock, so the events it reports for channel webhooks keep their order.

use herald_core::AppId;
use std::sync::Arc;

use crate::{Hub, hub::ChannelInfo};

/// Why presence could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
}

/// Occupancy and presence members per app, across every node.
#[async_trait::async_trait]
pub trait PresenceManager: Send + Sync + 'static {
    /// The channel's subscription count (and user count, for presence channels), or `None`
    /// if nobody is subscribed.
    async fn channel_info(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelInfo>, PresenceError>;
    /// Occupied channels whose names start with `prefix`, by name.
    async fn channels(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<Vec<(String, ChannelInfo)>, PresenceError>;
    /// The user ids in a presence channel.
    async fn users(&self, app_id: &AppId, channel: &str) -> Result<Vec<String>, PresenceError>;
    /// Closes every connection signed in as `user_id`; returns how many.
    async fn terminate_user(&self, app_id: &AppId, user_id: &str) -> Result<usize, PresenceError>;
}

/// One node: the answers are this process's hub's.
pub struct LocalPresence {
    hub: Arc<Hub>,
}

impl LocalPresence {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait::async_trait]
impl PresenceManager for LocalPresence {
    async fn channel_info(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelInfo>, PresenceError> {
        Ok(self.hub.app(app_id).channel_info(channel))
    }

    async fn channels(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<Vec<(String, ChannelInfo)>, PresenceError> {
        Ok(self.hub.app(app_id).channels(prefix))
    }

    async fn users(&self, app_id: &AppId, channel: &str) -> Result<Vec<String>, PresenceError> {
        Ok(self.hub.app(app_id).users(channel))
    }

    async fn terminate_user(&self, app_id: &AppId, user_id: &str) -> Result<usize, PresenceError> {
        Ok(self.hub.app(app_id).terminate_user(user_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Joining, Outbox};

    #[tokio::test]
    async fn local_presence_answers_from_the_hub() {
        let hub = Arc::new(Hub::default());
        let presence = LocalPresence::new(Arc::clone(&hub));
        let app = hub.app(&AppId::parse("app_1").expect("valid"));
        let (outbox, _rx, _) = Outbox::new(4);
        let joining = Joining {
            user_id: "u1".into(),
            info: None,
        };
        app.subscribe("presence-room", "1.1", &outbox, Some(joining), 10)
            .expect("subscribed");
        app.subscribe("public", "1.1", &outbox, None, 10)
            .expect("subscribed");
        let info = presence
            .channel_info(&AppId::parse("app_1").expect("valid"), "presence-room")
            .await
            .expect("read")
            .expect("occupied");
        assert_eq!((info.subscription_count, info.user_count), (1, Some(1)));
        assert_eq!(
            presence
                .users(&AppId::parse("app_1").expect("valid"), "presence-room")
                .await
                .expect("read"),
            ["u1"]
        );
        let listed = presence
            .channels(&AppId::parse("app_1").expect("valid"), "presence-")
            .await
            .expect("read");
        assert_eq!(listed.len(), 1);
        assert!(
            presence
                .channel_info(&AppId::parse("app_2").expect("valid"), "presence-room")
                .await
                .expect("read")
                .is_none(),
            "apps are apart"
        );
        let token = app.connection_token();
        app.sign_in("u1", "1.1", token.clone());
        assert_eq!(
            presence
                .terminate_user(&AppId::parse("app_1").expect("valid"), "u1")
                .await
                .expect("ok"),
            1
        );
        assert!(token.is_cancelled());
    }
}
