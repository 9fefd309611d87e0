//! Presence and occupancy, as the Pusher HTTP API and channel queries see them: which channels
//! of an app are occupied, by how many subscriptions, and which users are in a presence
//! channel.
//!
//! [`PresenceManager`] is the seam: one node answers from its own hub ([`LocalPresence`]); a
//! cluster answers for every node (entries per node with a lease, in PostgreSQL, Redis or
//! NATS) behind the same trait, and the API that asks does not change. The hub still decides
//! membership changes on this node (first socket of a user in, last one out), under its channel
//! lock, so the events it reports for channel webhooks keep their order.
//!
//! [`PresenceSync`] is the hub's other seam, for a cluster: a hub that has one hands it this
//! node's changes ([`LocalChange`]) instead of reporting them as channel webhooks and having
//! the connection announce members itself, because only the cluster knows whether a user's
//! first socket on this node is the user's first anywhere (and so whether `member_added`, the
//! `channel_occupied` webhook, and their leaves happen at all). It also reads the members other
//! nodes hold, for a presence subscriber's snapshot. One node has none: nothing changes there.

use herald_core::AppId;
use std::{future::Future, pin::Pin, sync::Arc};

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

/// A change of this node's channel state, as the hub decided it under its channel lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalChange {
    /// The channel got its first subscriber on this node.
    Occupied { channel: String },
    /// The channel's last subscriber on this node left.
    Vacated { channel: String },
    /// A user's first socket on this node joined a presence channel.
    Joined {
        channel: String,
        user_id: String,
        /// The user's `user_info` as JSON text.
        info: Option<String>,
        /// The joining socket, which is not told of its own arrival.
        socket_id: String,
    },
    /// A user's last socket on this node left a presence channel.
    Left { channel: String, user_id: String },
}

/// A presence member held elsewhere: its user id and `user_info` as JSON text.
pub type RemoteMember = (String, Option<String>);

/// What reading other nodes' members returns.
pub type MembersFuture =
    Pin<Box<dyn Future<Output = Result<Vec<RemoteMember>, PresenceError>> + Send + 'static>>;

/// How a hub shares its presence and occupancy with other nodes (see the module doc).
pub trait PresenceSync: Send + Sync + 'static {
    /// Called with the channel lock held, in the order changes happen: it must only queue.
    fn changed(&self, app_id: &AppId, change: LocalChange);
    /// The members of `channel` that other nodes hold.
    fn members_elsewhere(&self, app_id: &AppId, channel: &str) -> MembersFuture;
}

/// Adds `others` to a `{"presence": {"ids", "hash", "count"}}` snapshot (this node's members
/// win where both have a user: theirs is the same user's info).
pub fn merge_snapshot(snapshot: &mut serde_json::Value, others: Vec<RemoteMember>) {
    let Some(presence) = snapshot
        .get_mut("presence")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    let mut hash = match presence.remove("hash") {
        Some(serde_json::Value::Object(hash)) => hash,
        _ => serde_json::Map::new(),
    };
    for (user_id, info) in others {
        hash.entry(user_id).or_insert_with(|| {
            info.as_deref()
                .and_then(|i| serde_json::from_str(i).ok())
                .unwrap_or(serde_json::Value::Null)
        });
    }
    let mut ids: Vec<String> = hash.keys().cloned().collect();
    ids.sort();
    presence.insert("count".into(), hash.len().into());
    presence.insert("ids".into(), ids.into());
    presence.insert("hash".into(), serde_json::Value::Object(hash));
}

/// Completes a joining presence subscriber's `{"presence": ...}` snapshot with the members
/// other nodes hold (`elsewhere`, from [`AppHub::members_elsewhere`](crate::hub::AppHub)),
/// then tells the hub which members it lists, so member notices that crossed the snapshot are
/// not repeated to it. If the other nodes cannot be read, this node's members still are, and
/// the others arrive as they change.
pub async fn complete_snapshot(
    hub: &crate::hub::AppHub,
    channel: &str,
    socket_id: &str,
    snapshot: &mut serde_json::Value,
    elsewhere: MembersFuture,
) {
    match elsewhere.await {
        Ok(others) => merge_snapshot(snapshot, others),
        Err(e) => {
            tracing::warn!(error = %e, channel, "reading other nodes' presence members failed");
        }
    }
    let listed = snapshot["presence"]["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    hub.know_members(channel, socket_id, listed);
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

    #[test]
    fn a_snapshot_merges_other_nodes_members_once_each() {
        let mut snapshot = serde_json::json!({"presence": {
            "ids": ["u2"], "hash": {"u2": {"name": "two"}}, "count": 1
        }});
        merge_snapshot(
            &mut snapshot,
            vec![
                ("u1".into(), Some(r#"{"name":"one"}"#.into())),
                ("u2".into(), Some(r#"{"name":"other"}"#.into())),
                ("u3".into(), None),
            ],
        );
        assert_eq!(
            snapshot,
            serde_json::json!({"presence": {
                "ids": ["u1", "u2", "u3"],
                "hash": {"u1": {"name": "one"}, "u2": {"name": "two"}, "u3": null},
                "count": 3
            }})
        );
    }
}
